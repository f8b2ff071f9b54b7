"""benchmarks/compare_evals.py: pooled Wilson cells and the paired sign test the model card quotes, checked
against scipy's exact binomial test and hand-counted reports."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compare_evals  # noqa: E402

from latentforge.shapes.scoring import rate  # noqa: E402


@pytest.mark.parametrize("a,b", [(0, 5), (17, 44), (27, 60), (30, 30), (1, 0), (0, 0)])
def test_sign_test_is_the_exact_binomial_test(a, b):
    if a + b == 0:
        assert compare_evals.sign_test(a, b) == 1.0
        return
    scipy_stats = pytest.importorskip("scipy.stats")
    want = scipy_stats.binomtest(a, a + b, 0.5).pvalue
    assert compare_evals.sign_test(a, b) == pytest.approx(want, rel=1e-12)


def report(failed: list[int], n: int, ones: tuple[int, int]) -> dict:
    return {  # the fields of `eval shapes --json` it reads
        "n": n,
        "all_correct": (n - len(failed)) / n,
        "by_objects": {"1": rate(*ones)},
        "failures": [{"file": f"{i:05d}.png", "prompt": f"p{i}"} for i in failed],
    }


def test_pooled_cells_and_paired_counts(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(report([1, 2, 3], 10, (3, 4))))
    b.write_text(json.dumps(report([3, 4], 10, (4, 4))))
    assert compare_evals.main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "pooled by objects: 1: 87.5% [52.9, 97.8] (n = 8)" in out  # 7 of 8, Wilson by hand
    assert compare_evals.main(["--paired", str(a), str(b)]) == 0
    # A fails 1, 2, 3 and B fails 3, 4: only A right on 4, only B right on 1 and 2
    assert "right: 1; only" in capsys.readouterr().out
    assert compare_evals.paired(json.loads(a.read_text()), json.loads(b.read_text()))[:2] == (1, 2)


def test_bad_reports_are_refused(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    script = Path(compare_evals.__file__)
    r = subprocess.run([sys.executable, str(script), str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "not an evaluator report" in r.stderr
    good = tmp_path / "g.json"
    good.write_text(json.dumps(report([], 9, (1, 1))))
    r = subprocess.run([sys.executable, str(script), "--paired", str(good), str(tmp_path / "g.json")],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0
    other = tmp_path / "o.json"
    other.write_text(json.dumps(report([], 8, (1, 1))))
    r = subprocess.run([sys.executable, str(script), "--paired", str(good), str(other)],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode != 0 and "same prompts" in r.stderr
