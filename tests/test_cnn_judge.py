"""The shapes evaluator's second judge: the shipped CNN (``latentforge/shapes/cnn_judge.py``), trained by
``scripts/train_cnn_judge.py`` on degraded renders.

Its images here are degraded by ``shapes_degrade.soften`` (the analytic judge's benchmark conditions), not by
the training script's own augmentation, and come from seeds the training never drew. Each test judges N = 200
images; as in test_shapes_robust.py, a test asserting at least 98% fails at 5 wrong of 200, which a judge
whose true rate is 99.5% does with probability 0.0036.
"""

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from shapes_degrade import soften

from latentforge.shapes import cnn_judge, render, sample_scene, satisfies
from latentforge.shapes.captions import describe
from latentforge.shapes.evaluate import evaluate, second_judge_report
from latentforge.shapes.render import POSITION_NAMES, Scene
from latentforge.shapes.report import format_report

N = 200
ROOT = Path(__file__).resolve().parents[1]


def _renders(res, blur, noise, quality, seed, split="heldout"):
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, split=split) for _ in range(N)]
    return scenes, [soften(render(s, res), rng, blur, noise, quality) for s in scenes]


def test_the_shipped_judge_loads_strictly_and_is_small():
    path = cnn_judge.DEFAULT_PATH
    assert path.stat().st_size <= 2 * 1024 * 1024  # issue 10: shipped, <= 2 MB
    model = cnn_judge.load()
    n = sum(p.numel() for p in model.parameters())
    assert n == sum(p.numel() for p in cnn_judge.CnnJudge(model.cfg).parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with safe_open(str(path), "pt") as f:  # stored in float16
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}


# (resolution, blur sigma px, noise std levels, JPEG quality, the least exact-scene rate): the issue's
# conditions and their combinations. The bars were set before the shipped judge was measured, from what the
# analytic judge can tell (test_shapes_robust.py): near-perfect where a person sees every shape; at 32 px
# after blur 1.2 and noise 8 a small object is ~4 px of mush, and with JPEG q40 on top its chroma is gone
# (the analytic judge calls a third of those shapes ambiguous), so the bars drop there.
# The shipped judge does not reach three of the bars yet (measured here on the tests' 200 scenes; benchmark
# figures in MODEL_CARD.md): those cases are strict expected failures, so a judge that reaches them shows.
_SHORT = "the shipped CNN judge falls short of this bar (measured {}); MODEL_CARD.md, 'The second judge'"
CONDITIONS = [
    (64, 0.0, 0.0, None, 0.98),
    (64, 1.2, 0.0, None, 0.97),
    (64, 0.0, 8.0, None, 0.97),
    pytest.param(64, 0.0, 0.0, 40, 0.97, marks=pytest.mark.xfail(strict=True, reason=_SHORT.format("95.5%"))),
    (64, 1.2, 8.0, 40, 0.90),
    (32, 0.0, 0.0, None, 0.97),
    pytest.param(
        32, 1.2, 8.0, None, 0.80, marks=pytest.mark.xfail(strict=True, reason=_SHORT.format("67.0%"))
    ),
    pytest.param(32, 1.2, 8.0, 40, 0.50, marks=pytest.mark.xfail(strict=True, reason=_SHORT.format("42.0%"))),
]


@pytest.mark.parametrize("res,blur,noise,quality,least", CONDITIONS)
def test_the_cnn_names_every_object_of_degraded_renders(res, blur, noise, quality, least):
    scenes, images = _renders(res, blur, noise, quality, seed=900 + res + int(10 * blur) + (quality or 0))
    seen = cnn_judge.judge(images)
    exact = [satisfies(g, s) and len(g.objects) == len(s.objects) for g, s in zip(seen, scenes, strict=True)]
    assert np.mean(exact) >= least, np.mean(exact)


def test_evaluate_reports_both_judges():
    rng = np.random.default_rng(32)
    scenes, images = _renders(64, 0.0, 0.0, None, seed=32, split="validation")
    texts = [describe(s, rng)[0] for s in scenes]
    rep = evaluate(images[:60], texts[:60], reference=False)
    j = rep["second_judge"]
    assert j["judge"] == "cnn" and j["all_correct"]["n"] == 60
    assert j["agreement"]["k"] == 60 - j["disagree"]["analytic_only"] - j["disagree"]["cnn_only"]
    assert j["trustworthy"] == (j["agreement"]["k"] >= 0.97 * 60)
    assert set(j["by_objects"]) == {"1", "2", "3"} and "shape" in j["attributes"]
    assert "CNN judge: all correct" in format_report(rep) and "judges agree" in format_report(rep)


def test_evaluate_reports_both_judges_and_they_agree_on_renders():
    rng = np.random.default_rng(31)
    scenes, images = _renders(64, 0.8, 4.0, 60, seed=31, split="validation")
    texts = [describe(s, rng)[0] for s in scenes]
    # one prompt in ten made false: both judges must call those images wrong
    texts = [("a big red star on a green background" if i % 10 == 0 else t) for i, t in enumerate(texts)]
    rep = evaluate(images, texts, reference=False)
    j = rep["second_judge"]
    assert j["judge"] == "cnn" and j["trustworthy"]
    assert j["agreement"]["rate"] >= 0.97
    assert abs(j["all_correct"]["rate"] - rep["all_correct"]) <= 0.03
    assert set(j["by_objects"]) == {"1", "2", "3"}
    assert all(f["second_judge_correct"] in (True, False) for f in rep["failures"])
    text = format_report(rep)
    assert "CNN judge: all correct" in text and "judges agree" in text and "UNTRUSTWORTHY" not in text


def test_judges_that_disagree_make_the_report_untrustworthy():
    # an untrained CNN (random weights) is a judge that disagrees with the analytic one
    torch.manual_seed(0)
    scenes, images = _renders(64, 0.0, 0.0, None, seed=5)
    verdicts = [True] * len(scenes)  # what the analytic judge says of clean renders of the true scenes
    j = second_judge_report(images, scenes, verdicts, model=cnn_judge.CnnJudge().eval())
    assert not j["trustworthy"]
    assert j["agreement"]["rate"] < 0.97
    assert j["disagree"]["analytic_only"] == len(scenes) - sum(j.pop("_verdicts"))
    rep = evaluate(
        images[:2], [describe(s, np.random.default_rng(1))[0] for s in scenes[:2]], reference=False
    )
    rep["second_judge"] = j
    assert "UNTRUSTWORTHY: the judges disagree" in format_report(rep)


def test_mixed_sizes_are_judged_in_their_order():
    rng = np.random.default_rng(2)
    scenes = [sample_scene(rng, n_objects=1) for _ in range(6)]
    images = [render(s, 64 if i % 2 else 32) for i, s in enumerate(scenes)]
    seen = cnn_judge.judge(images)
    assert [g.objects[0].position for g in seen] == [s.objects[0].position for s in scenes]


def test_a_file_that_is_not_a_judge_is_refused(tmp_path):
    p = tmp_path / "x.safetensors"
    save_file({"w": torch.zeros(2)}, str(p))
    with pytest.raises(ValueError, match="not a CNN judge file"):
        cnn_judge.load(p)
    with pytest.raises(FileNotFoundError, match="train_cnn_judge"):
        cnn_judge.load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"uint8 images \[N, R, R, 3\]"):
        cnn_judge.prepare(np.zeros((2, 64, 64, 3), np.float32))


def test_the_training_script_runs_and_writes_a_loadable_judge(tmp_path):
    out = tmp_path / "judge.safetensors"
    cmd = [sys.executable, str(ROOT / "scripts" / "train_cnn_judge.py"), "--steps", "2", "--batch", "4",
           "--eval-n", "8", "--eval-every", "2", "--threads", "1", "--out", str(out)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "exact scenes" in r.stdout
    model = cnn_judge.load(out)
    assert len(cnn_judge.judge([render(sample_scene(np.random.default_rng(0)), 64)], model=model)) == 1
    # continued from that file, mirrored batches made by a worker process; the recipe chain is kept
    more = tmp_path / "judge2.safetensors"
    cmd[cmd.index("--out") + 1] = str(more)
    r = subprocess.run([*cmd, "--init", str(out), "--flip", "--workers", "1"], capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"from {out}: exact scenes" in r.stdout
    with safe_open(str(more), "pt") as f:
        recipe = f.metadata()["recipe"]
    assert recipe.startswith("scripts/train_cnn_judge.py --steps 2 ") and recipe.endswith(
        "--flip --init <that file>"
    )


def _mirrored(scene):
    """The scene with its grid's columns reversed."""
    col = {p: POSITION_NAMES[3 * (i // 3) + 2 - i % 3] for i, p in enumerate(POSITION_NAMES)}
    return Scene(
        tuple(dataclasses.replace(o, position=col[o.position]) for o in scene.objects), scene.background
    )


def test_a_mirrored_render_is_the_render_of_the_mirrored_scene():
    # what the training script's --flip relies on: every shape is symmetric about its vertical axis and the
    # renderer places it symmetrically, so the mirror image of a render is exactly another scene's render
    rng = np.random.default_rng(3)
    for i in range(60):
        s = sample_scene(rng, split=("train", "validation", "heldout")[i % 3])
        for res in (64, 32):
            np.testing.assert_array_equal(render(s, res)[:, ::-1], render(_mirrored(s), res))


def test_mirrored_training_batches_mirror_their_targets():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import train_cnn_judge as tr
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    x0, t0 = tr.train_batch(np.random.default_rng(4), 16, flip=False)
    x1, t1 = tr.train_batch(np.random.default_rng(4), 16, flip=True)
    m = (x0 != x1).flatten(1).any(1)  # the images the flip mirrored
    assert 0 < m.sum() < 16
    torch.testing.assert_close(x1[m], x0[m].flip(-1), rtol=0, atol=0)
    for k in ("shape", "color", "size"):
        assert torch.equal(t1[k][m], t0[k][m].flip(-1)) and torch.equal(t1[k][~m], t0[k][~m])
    assert torch.equal(t1["background"], t0["background"])
