"""Shapes benchmark evaluator: detection accuracy on clean and degraded held-out renders, wrong prompts
flagged, FSD, the aggregate report, and the folder entry point. (JPEG re-ranking: test_shapes_jpeg.py;
scoring semantics and Wilson intervals: test_shapes_scoring.py.)"""

import json

import numpy as np
import pytest
from PIL import Image
from shapes_degrade import degrade, perturb

from latentforge.shapes import Scene, export, parse, render, sample_scene, satisfies
from latentforge.shapes.captions import describe
from latentforge.shapes.detection import N_FEATURES, detect, features
from latentforge.shapes.evaluate import evaluate, evaluate_folder
from latentforge.shapes.report import complete_spec, format_report, fsd
from latentforge.shapes.scoring import score


@pytest.fixture(scope="module")
def heldout():
    rng = np.random.default_rng(2024)
    scenes = [sample_scene(rng, split="heldout") for _ in range(2000)]
    specs = [describe(s, rng)[1] for s in scenes]
    images = [render(s, 64) for s in scenes]
    return scenes, specs, images


@pytest.fixture(scope="module")
def detections(heldout):
    return [detect(im) for im in heldout[2]]


def _canon(scene):
    return sorted(scene.objects, key=lambda o: o.position), scene.background


def test_clean_heldout_accuracy(heldout, detections):
    scenes, specs, _ = heldout
    correct = np.mean([satisfies(d, sp) for d, sp in zip(detections, specs, strict=True)])
    exact = np.mean([_canon(d) == _canon(s) for d, s in zip(detections, scenes, strict=True)])
    assert correct >= 0.995, correct
    assert exact >= 0.995, exact  # the full scene, not just what captions state


def test_perturbed_prompts_flagged(heldout, detections):
    scenes, specs, _ = heldout
    rng = np.random.default_rng(1)
    flagged = total = 0
    for scene, spec, det in zip(scenes, specs, detections, strict=True):
        wrong = perturb(spec, rng)
        if wrong is None or satisfies(scene, wrong):  # only prompts that really contradict the image
            continue
        total += 1
        flagged += not score(det, wrong)["correct"]
    assert total > 1800
    assert flagged / total >= 0.995, flagged / total


DEGRADATION_SEEDS = {"blur": 11, "noise": 12, "jpeg": 13, "color": 14, "shift": 15, "affine": 16}


@pytest.mark.parametrize("kind", ["blur", "noise", "jpeg", "color", "shift", "affine"])
def test_degraded_accuracy(heldout, kind):
    scenes, specs, images = heldout
    rng = np.random.default_rng(DEGRADATION_SEEDS[kind])
    n = 600
    ok = [satisfies(detect(degrade(im, kind, rng)), sp) for im, sp in zip(images[:n], specs[:n], strict=True)]
    assert np.mean(ok) >= 0.97, (kind, np.mean(ok))


def test_jpeg420_accuracy(heldout):
    # JPEG q50 with 4:2:0 chroma subsampling (as JPEGs are usually saved): small objects that differ from the
    # background mostly in chroma keep only a blurred, heavily quantised outline. Measured 99.4% on these
    # 1000 images (85% before the 4:2:0 template hypothesis, dilution-tolerant colour and component
    # splitting; 93.9% before the JPEG round-trip re-ranking of ambiguous shapes); the target is 97%.
    scenes, specs, images = heldout
    rng = np.random.default_rng(17)
    n = 1000
    pairs = zip(images[:n], specs[:n], strict=True)
    ok = [satisfies(detect(degrade(im, "jpeg420", rng)), sp) for im, sp in pairs]
    assert np.mean(ok) >= 0.97, np.mean(ok)


def test_degrade_is_bounded_and_deterministic():
    img = render(sample_scene(np.random.default_rng(0)), 64)
    for kind in ("blur", "noise", "jpeg", "jpeg420", "color", "shift", "affine", "all"):
        a = degrade(img, kind, np.random.default_rng(3))
        b = degrade(img, kind, np.random.default_rng(3))
        assert a.dtype == np.uint8 and a.shape == img.shape and np.array_equal(a, b)
    with pytest.raises(ValueError, match="degradation"):
        degrade(img, "smear", np.random.default_rng(0))


def test_empty_and_foreign_images():
    assert detect(np.full((64, 64, 3), 128, np.uint8)).objects == ()
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)  # pure noise: anything, but no crash
    assert isinstance(detect(img), Scene)
    assert detect(render(sample_scene(rng), 128)) is not None  # other resolutions work too
    with pytest.raises(ValueError):
        detect(np.zeros((64, 32, 3), np.uint8))


def test_fsd(heldout):
    _, _, images = heldout
    rng = np.random.default_rng(5)
    other = [render(sample_scene(rng, split="heldout"), 64) for _ in range(500)]
    real_a = features(images[:500])
    assert real_a.shape == (500, N_FEATURES)
    real_b = features(other)
    noisy = features([degrade(im, "all", rng) for im in other])
    junk = features([rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(200)])
    same, deg, bad = fsd(real_a, real_b), fsd(real_a, noisy), fsd(real_a, junk)
    assert fsd(real_a, real_a) == pytest.approx(0.0, abs=1e-6)
    assert same < deg < bad, (same, deg, bad)


def test_complete_spec():
    rng = np.random.default_rng(0)
    for text in ("a red star above a blue circle", "three green hearts", "top left: a big red circle"):
        spec = parse(text)
        for _ in range(20):
            scene = complete_spec(spec, rng)
            assert scene.complete and satisfies(scene, spec)


def test_evaluate_report(heldout):
    _, specs, images = heldout
    prompts = [describe(s, np.random.default_rng(i))[0] for i, s in enumerate(heldout[0][:200])]
    prompts[3] = "a purple elephant"  # outside the grammar: counted, never guessed
    report = evaluate(images[:200], prompts)
    assert report["n"] == 199 and report["unparsed"]["count"] == 1
    assert report["all_correct"] >= 0.99
    assert sum(r["n"] for r in report["by_objects"].values()) == 199
    assert report["attributes"]["shape"]["rate"] >= 0.99
    lo, hi = report["all_correct_ci95"]
    assert 0 <= lo <= report["all_correct"] <= hi + 1e-12
    assert "fsd" in report
    text = format_report(report)
    assert "all correct" in text and "unparsed" in text
    assert specs  # fixture used


def test_evaluate_folder_round_trip(tmp_path):
    export(tmp_path / "imgs", 60, size=64, seed=3, split="heldout")
    folder = tmp_path / "imgs"
    # one wrong prompt (.txt is ignored when metadata.jsonl has the file), one unparsable, one unreadable,
    # one of another size
    lines = [json.loads(x) for x in (folder / "metadata.jsonl").read_text().splitlines()]
    lines[0]["text"] = "a purple elephant"
    objs = Scene.from_dict(lines[2]["scene"]).objects
    wrong = "heart" if objs[0].shape != "heart" else "star"
    items = [f"a {x.color} {wrong if k == 0 else x.shape}" for k, x in enumerate(objs)]
    lines[2]["text"] = ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else items[0]
    assert parse(lines[2]["text"]) is not None
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (folder / "000005.png").write_bytes(b"not a png")
    big = Image.open(folder / "000006.png").resize((128, 128), Image.Resampling.NEAREST)
    big.save(folder / "000006.png")
    out = tmp_path / "report" / "eval.json"
    with pytest.warns(UserWarning, match="resized"):
        report = evaluate_folder(folder, json_path=out)
    assert report["unparsed"]["count"] == 1
    assert [u["file"] for u in report["unreadable"]] == ["000005.png"]
    assert report["resized"] == 1
    assert report["n"] == 58
    assert report["all_correct"] >= (58 - 2) / 58
    assert any(f["file"] == "000002.png" for f in report["failures"])
    saved = json.loads(out.read_text())
    assert saved["n"] == 58 and 0 <= saved["all_correct"] <= 1
    grid = out.with_name("eval_failures.png")
    assert grid.exists() and Image.open(grid).size[0] > 0
    assert not list(out.parent.glob(".*tmp*"))
    # .txt prompts when there is no metadata.jsonl
    (folder / "metadata.jsonl").unlink()
    with pytest.warns(UserWarning, match="resized"):
        report2 = evaluate_folder(folder, reference=False)
    assert (
        report2["n"] == 59 and report2["unparsed"]["count"] == 0
    )  # only the unreadable file is skipped and "fsd" not in report2
