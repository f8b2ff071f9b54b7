"""The `latentforge` command: each sub-command runs, writes what it says, and rejects bad input clearly."""

import json

from latentforge.cli import main


def test_bench_samplers_subset(tmp_path, capsys):
    assert (
        main(["bench", "samplers", "--out", str(tmp_path), "--samplers", "euler,dpmpp_2m,euler_ancestral"])
        == 0
    )
    report = json.loads((tmp_path / "samplers.json").read_text())
    assert set(report["samplers"]) == {"euler", "dpmpp_2m", "euler_ancestral"}
    nfe = [r["nfe"] for r in report["samplers"]["dpmpp_2m"]["runs"]]
    assert nfe == [5, 10, 20, 50]
    err = [r["rmse"] for r in report["samplers"]["dpmpp_2m"]["runs"]]
    assert err == sorted(err, reverse=True)  # more steps, less error against the exact ODE solution
    assert (tmp_path / "samplers.png").stat().st_size > 1000
    assert "dpmpp_2m" in capsys.readouterr().out


def test_bench_unknown_sampler(tmp_path, capsys):
    assert main(["bench", "samplers", "--out", str(tmp_path), "--samplers", "eulr"]) == 2
    assert "Did you mean 'euler'" in capsys.readouterr().err


def test_shapes_export(tmp_path, capsys):
    assert main(["shapes", "export", str(tmp_path), "--n", "3", "--size", "32", "--seed", "1"]) == 0
    lines = (tmp_path / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 3 and (tmp_path / "000002.png").exists() and (tmp_path / "000002.txt").exists()
    assert main(["shapes", "export", str(tmp_path), "--n", "3", "--size", "1000"]) == 2
    assert "[32, 512]" in capsys.readouterr().err


def test_info(capsys):
    assert main(["info"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["samplers"]) == 42 and "karras" in out["schedulers"]
