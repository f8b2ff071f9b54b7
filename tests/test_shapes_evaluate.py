"""Shapes benchmark evaluator: detection accuracy on clean and degraded held-out renders, wrong prompts
flagged, scoring semantics, Wilson intervals, FSD, and the folder entry point."""

import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from latentforge.shapes import Obj, Scene, export, parse, render, sample_scene, satisfies
from latentforge.shapes import evaluate as shapes_eval
from latentforge.shapes.captions import describe
from latentforge.shapes.evaluate import (
    N_FEATURES,
    complete_spec,
    degrade,
    detect,
    evaluate,
    evaluate_folder,
    features,
    format_report,
    fsd,
    perturb,
    score,
    wilson,
)
from latentforge.shapes.render import COLORS, SHAPES, cell_bounds


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


# Small objects whose contrast with the background is mostly chroma: the cases JPEG 4:2:0 makes ambiguous.
CHROMA_PAIRS = (
    ("orange", "cyan"),
    ("red", "purple"),
    ("pink", "orange"),
    ("green", "gray"),
    ("blue", "purple"),
)


def test_candidate_cells_reproduce_render():
    # Independent reference: render itself. A candidate at the renderer's position with the true colours is
    # the render pixel for pixel (the whole MCU crop, the other object's pixels included), and a candidate
    # displaced by (dy, dx) is the render rolled by (dy, dx) inside the cell.
    scene = Scene((Obj("star", "red", "small", "center"), Obj("heart", "blue", "large", "top_left")), "white")
    img = render(scene, 64)
    k = shapes_eval._TEMPLATE_KEYS.index(("star", "small"))
    bg, red = np.array(COLORS["white"], np.float32), np.array(COLORS["red"], np.float32)
    tiles = shapes_eval._candidate_cells(img, "center", bg, np.stack([red, red]), [(k, 0, 0), (k, 2, -1)])
    y0, y1, x0, x1 = shapes_eval._mcu_crop("center", 64)
    assert (y0, y1, x0, x1) == (16, 48, 16, 48)  # the cell [21, 43) lies in MCUs 1..2 of 16 pixels
    assert tiles.shape == (2, 32, 32, 3) and tiles.dtype == np.uint8
    assert np.array_equal(tiles[0], img[y0:y1, x0:x1])
    moved = np.roll(render(Scene((scene.objects[0],), "white"), 64), (2, -1), axis=(0, 1))
    r0, r1, c0, c1 = cell_bounds("center", 64)
    assert np.array_equal(tiles[1, r0 - y0 : r1 - y0, c0 - x0 : c1 - x0], moved[r0:r1, c0:c1])


def test_jpeg_round_trip_matches_pil_per_tile():
    # Independent reference: each tile compressed on its own by PIL. Tiles are whole MCUs, so everything but
    # the outermost pixel columns (libjpeg's fancy chroma upsampling reads one sample across a tile border)
    # is bit-identical.
    rng = np.random.default_rng(0)
    tiles = np.repeat(np.repeat(rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8), 4, 1), 4, 2)
    out = shapes_eval._jpeg_round_trip(tiles, quality=50)
    assert out.shape == tiles.shape and out.dtype == np.uint8
    for tile, got in zip(tiles, out, strict=True):
        buf = io.BytesIO()
        Image.fromarray(tile).save(buf, format="JPEG", quality=50, subsampling=2)
        ref = np.asarray(Image.open(buf).convert("RGB"))
        assert np.array_equal(got[:, 1:-1], ref[:, 1:-1])
        assert np.abs(got.astype(int) - tile).max() > 10  # it really was compressed


def test_jpeg_rerank_recovers_shapes_from_the_round_trip():
    # With no help from template matching (all similarities tied), the JPEG round trip alone names the shape
    # of small chroma-contrast objects after JPEG q50 4:2:0; on the clean render (which the plain render
    # explains) and on a blurred one (no JPEG signature) it declines. Blue on purple (luma contrast 9/255) is
    # left out of the shape check: JPEG leaves star/diamond and hexagon/cross indistinguishable there.
    rng = np.random.default_rng(0)
    sim, shift = np.zeros(16, np.float32), np.zeros((2, 16), np.intp)
    for color, background in CHROMA_PAIRS:
        bg, rgb = np.array(COLORS[background], np.float32), np.array(COLORS[color], np.float32)
        for shape in SHAPES:
            img = render(Scene((Obj(shape, color, "small", "center"),), background), 64)
            truth = shapes_eval._TEMPLATE_KEYS.index((shape, "small"))
            if (color, background) != ("blue", "purple"):
                jpeg = degrade(img, "jpeg420", rng)
                assert shapes_eval._jpeg_rerank(jpeg, "center", bg, rgb, sim, shift) == truth, (shape, color)
            assert shapes_eval._jpeg_rerank(img, "center", bg, rgb, sim, shift) is None
            blurred = degrade(img, "blur", rng)
            assert shapes_eval._jpeg_rerank(blurred, "center", bg, rgb, sim, shift) is None


def test_jpeg_rerank_in_detect(monkeypatch):
    # 120 small chroma-contrast objects (5 colour pairs x 8 shapes x 3 cells) after JPEG q50 4:2:0: measured
    # 116/120 scenes exactly right with the re-ranking and 84/120 without it (JPEG_MARGIN < 0 turns it off);
    # the bounds leave room for other libjpeg builds (the simulation and the degradation share one).
    rng = np.random.default_rng(0)
    cases = []
    for color, background in CHROMA_PAIRS:
        for shape in SHAPES:
            for position in ("center", "top_left", "bottom_right"):
                scene = Scene((Obj(shape, color, "small", position),), background)
                cases.append((scene, degrade(render(scene, 64), "jpeg420", rng)))
    with_rerank = sum(detect(img) == scene for scene, img in cases)
    monkeypatch.setattr(shapes_eval, "JPEG_MARGIN", -1.0)
    without = sum(detect(img) == scene for scene, img in cases)
    assert with_rerank >= 112 and without <= 100, (with_rerank, without)


def test_shift_bookkeeping(monkeypatch):
    # Each template's best shift as handed to the re-ranking. The search-order offsets enumerate every shift
    # once per metric (plain search) and once (4:2:0 search, by parity); the 4:2:0 offsets are marked +100
    # here to tell which search won. On a clean render rolled by (dy, dx) the plain search wins and finds the
    # true template exactly at (dy, dx); after JPEG 4:2:0 the 4:2:0 search wins and finds it there too.
    p = shapes_eval.MAX_SHIFT
    grid = np.stack(np.mgrid[-p : p + 1, -p : p + 1], -1)  # [2p+1, 2p+1, 2]: (dy, dx) of each window offset
    plain, parity = shapes_eval._shift_offsets()
    assert np.array_equal(plain, np.tile(grid.reshape(-1, 2), (len(shapes_eval._METRICS), 1)))
    parts = [grid[(p + py) % 2 :: 2, (p + px) % 2 :: 2].reshape(-1, 2) for py in range(2) for px in range(2)]
    assert np.array_equal(parity, np.concatenate(parts))
    assert sorted(map(tuple, parity)) == sorted(map(tuple, grid.reshape(-1, 2)))
    seen = {}

    def capture(img8, position, background, color, sim, shift):
        seen[position] = tuple(int(x) for x in shift[:, shapes_eval._TEMPLATE_KEYS.index(("heart", "small"))])
        return None

    monkeypatch.setattr(shapes_eval, "_shift_offsets", lambda: (plain, parity + 100))
    monkeypatch.setattr(shapes_eval, "JPEG_MARGIN", 2.0)  # re-rank every object whose contrast is chroma
    monkeypatch.setattr(shapes_eval, "_jpeg_rerank", capture)
    img = render(Scene((Obj("heart", "orange", "small", "center"),), "cyan"), 64)
    for dy, dx in ((2, -1), (-3, 1), (1, 2), (0, 0)):
        rolled = np.roll(img, (dy, dx), axis=(0, 1))
        assert detect(rolled).objects[0].shape == "heart"
        assert seen.pop("center") == (dy, dx)
        detect(degrade(rolled, "jpeg420", np.random.default_rng(0)))
        assert seen.pop("center") == (dy + 100, dx + 100)


def test_degrade_is_bounded_and_deterministic():
    img = render(sample_scene(np.random.default_rng(0)), 64)
    for kind in ("blur", "noise", "jpeg", "jpeg420", "color", "shift", "affine", "all"):
        a = degrade(img, kind, np.random.default_rng(3))
        b = degrade(img, kind, np.random.default_rng(3))
        assert a.dtype == np.uint8 and a.shape == img.shape and np.array_equal(a, b)
    with pytest.raises(ValueError, match="degradation"):
        degrade(img, "smear", np.random.default_rng(0))


def test_score_semantics():
    det = Scene(
        (Obj("star", "red", "large", "top_left"), Obj("circle", "blue", "small", "bottom_right")), "white"
    )
    ok = score(det, parse("a red star above a blue circle on a white background"))
    assert ok["correct"] and ok["count"] and ok["extra"] == 0 and ok["relations"] == [True]
    assert ok["background"] is True and all(o["shape"] and o["color"] for o in ok["objects"])
    bad = score(det, parse("a red star below a blue circle"))
    assert not bad["correct"] and bad["relations"] == [False] and bad["background"] is None
    one = score(det, parse("a small red star"))
    assert not one["correct"] and one["extra"] == 1 and not one["count"]
    assert one["objects"][0]["shape"] and one["objects"][0]["size"] is False
    assert one["objects"][0]["position"] is None
    three = score(det, parse("three red stars"))
    assert not three["correct"] and [o["present"] for o in three["objects"]] == [True, False, False]
    assert three["extra"] == 1  # the blue circle is not a red star gone wrong


def test_empty_and_foreign_images():
    assert detect(np.full((64, 64, 3), 128, np.uint8)).objects == ()
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)  # pure noise: anything, but no crash
    assert isinstance(detect(img), Scene)
    assert detect(render(sample_scene(rng), 128)) is not None  # other resolutions work too
    with pytest.raises(ValueError):
        detect(np.zeros((64, 32, 3), np.uint8))


def test_wilson_interval():
    lo, hi = wilson(81, 263)  # Wilson (1927) / Newcombe (1998) worked example: 0.2553 to 0.3662
    assert lo == pytest.approx(0.2553, abs=1e-4) and hi == pytest.approx(0.3662, abs=1e-4)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == pytest.approx(1.0)
    assert wilson(0, 0) == (0.0, 1.0)
    k, n, z = 37, 50, 1.959963984540054
    p = k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert wilson(k, n) == pytest.approx((c - h, c + h))


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
