"""Shapes benchmark evaluator: does an image show what its prompt asks for? Analytic, no training.

The entry points: ``evaluate`` (images and prompts in memory) and ``evaluate_folder`` (a folder of generated
images, the CLI's ``latentforge eval shapes``). The parts, one idea each:

- ``detection.py``: ``detect(image) -> Scene`` (background, foreground components, colour, shape and size),
  and the feature vectors FSD compares; it relies on ``color.py`` (palette colour of a measured colour),
  ``templates.py`` (the renderer's coverage masks and template matching) and ``jpeg.py`` (re-ranking shapes
  JPEG 4:2:0 left ambiguous by simulated round trips);
- ``scoring.py``: ``score(detected, spec)`` against a prompt's partial spec, and Wilson intervals;
- ``report.py``: the aggregate report, its table, the failure grid, FSD.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from ..files import atomic_path, write_text
from . import cnn_judge
from .captions import parse
from .detection import analyze, features
from .render import Scene, check_resolution, render
from .report import Tally, complete_spec, failure_grid, fsd
from .scoring import rate, score

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def evaluate(
    images, prompts, names=None, reference: bool = True, seed: int = 0, second_judge: bool = True
) -> dict:
    """Score images against prompts (caption strings, or partial ``Scene`` specs); see ``evaluate_folder``
    for the report's layout. Prompts the grammar cannot parse are counted in ``unparsed``, never scored.
    ``reference=True`` adds ``fsd``: generated images vs renders of random scenes satisfying the same
    prompts, at the images' resolution. ``second_judge=True`` adds ``second_judge``: the CNN judge's verdicts
    (``cnn_judge.py``) beside the analytic judge's, and whether the two agree well enough to trust the
    report (``second_judge_report``)."""
    images = list(images)
    prompts = list(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    names = list(names) if names is not None else [str(i) for i in range(len(images))]
    tally = Tally()
    unparsed, records, feats, specs_ok, scored, verdicts = [], [], [], [], [], []
    for img, prompt, name in zip(images, prompts, names, strict=True):
        spec = prompt if isinstance(prompt, Scene) else parse(prompt)
        text = prompt if isinstance(prompt, str) else None
        if spec is None:
            unparsed.append({"file": name, "prompt": text})
            continue
        d = analyze(img)
        s = score(d.scene, spec, d.shape_ambiguous)
        n_wrong = tally.add(spec, d.scene, s)
        feats.append(d.features)
        specs_ok.append(spec)
        scored.append(img)
        verdicts.append(s["correct"])
        if not s["correct"]:
            records.append(
                {
                    "file": name,
                    "prompt": text,
                    "wanted": spec.to_dict(),
                    "detected": d.scene.to_dict(),
                    "shape_ambiguous": list(d.shape_ambiguous),
                    "errors": n_wrong,
                    "extra": s["extra"],
                    "_image": img,
                    "_k": len(scored) - 1,
                }
            )
    report = tally.report(unparsed)
    if second_judge and scored and cnn_judge.available():
        report["second_judge"] = second = second_judge_report(scored, specs_ok, verdicts)
        mine = second.pop("_verdicts")
        for r in records:
            r["second_judge_correct"] = mine[r["_k"]]
    for r in records:
        del r["_k"]
    if reference and len(feats) >= 2:
        rng = np.random.default_rng(seed)
        res = np.asarray(images[0]).shape[0]
        ref = [render(complete_spec(sp, rng), res) for sp in specs_ok]
        report["fsd"] = fsd(np.stack(feats), features(ref))
    records.sort(key=lambda r: -r["errors"])
    report["failures"] = records
    return report


def second_judge_report(images, specs, verdicts, model=None) -> dict:
    """The CNN judge's verdicts on scored images (``specs``: their parsed prompts; ``verdicts``: the analytic
    judge's all-correct per image): ``judge``, ``all_correct`` (rate, k, n, ci95), ``by_objects``,
    ``attributes``, ``agreement`` (share of images where the two judges' verdicts agree), ``disagree``
    (how many images each judge alone calls correct: ``{"analytic_only", "cnn_only"}``) and ``trustworthy``:
    False when they disagree on more than ``cnn_judge.MAX_DISAGREEMENT`` of the images."""
    seen = cnn_judge.judge(images, model=model)
    tally = Tally()
    mine = []
    for spec, det in zip(specs, seen, strict=True):
        s = score(det, spec)
        tally.add(spec, det, s)
        mine.append(s["correct"])
    r = tally.report([])
    n = len(mine)
    agree = sum(a == b for a, b in zip(mine, verdicts, strict=True))
    return {
        "judge": "cnn",
        "all_correct": rate(sum(mine), n),
        "by_objects": r["by_objects"],
        "attributes": r["attributes"],
        "agreement": rate(agree, n),
        "disagree": {
            "analytic_only": sum(b and not a for a, b in zip(mine, verdicts, strict=True)),
            "cnn_only": sum(a and not b for a, b in zip(mine, verdicts, strict=True)),
        },
        "trustworthy": n - agree <= cnn_judge.MAX_DISAGREEMENT * n,
        "_verdicts": mine,
    }


def _read_text(path: Path) -> str:
    """A caption file's text; one that is not UTF-8 is an error naming the file and the byte."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None


def _read_prompts(folder: Path, files: list[Path]) -> dict[str, str]:
    """Prompt of each image by its path relative to ``folder``: from ``metadata.jsonl``, else a ``.txt``.
    A ``metadata.jsonl`` line that is not a JSON object with ``file_name`` and ``text`` is an error naming
    the line; a caption file that is not UTF-8 is an error naming the file."""
    prompts: dict[str, str] = {}
    meta = folder / "metadata.jsonl"
    if meta.is_file():
        for n, line in enumerate(_read_text(meta).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{meta}: line {n} is not JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("file_name"), str) or "text" not in rec:
                raise ValueError(
                    f'{meta}: line {n} is not an object with "file_name" (a string) and "text": {line[:80]!r}'
                )
            if not isinstance(rec["text"], str):
                raise ValueError(f'{meta}: line {n}: "text" must be a string, got {str(rec["text"])[:80]!r}')
            prompts[rec["file_name"]] = rec["text"]
    for f in files:
        rel = f.relative_to(folder).as_posix()
        txt = f.with_suffix(".txt")
        if rel not in prompts and txt.is_file():
            prompts[rel] = _read_text(txt).strip()
    return prompts


def _load_images(folder: Path, size: int):
    """The images of ``folder`` that have a prompt, as uint8 [size, size, 3] (resized when another size):
    (images, prompts, names, unreadable, missing_prompt, resized)."""
    from PIL import Image

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    prompts = _read_prompts(folder, files)
    images, texts, names = [], [], []
    unreadable, missing, resized = [], [], []
    for f in files:
        rel = f.relative_to(folder).as_posix()
        if rel not in prompts:
            missing.append(rel)
            continue
        try:
            with Image.open(f) as im:
                im = im.convert("RGB")
                if im.size != (size, size):
                    resized.append(rel)
                    im = im.resize((size, size), Image.Resampling.LANCZOS)
                arr = np.asarray(im, dtype=np.uint8)
        except Exception as e:  # noqa: BLE001 -- any decoding failure means "unreadable"
            unreadable.append({"file": rel, "error": f"{type(e).__name__}: {e}"})
            continue
        images.append(arr)
        texts.append(prompts[rel])
        names.append(rel)
    return images, texts, names, unreadable, missing, resized


def evaluate_folder(
    images_dir,
    json_path=None,
    grid_path=None,
    size: int = 64,
    max_failures: int = 64,
    reference: bool = True,
    second_judge: bool = True,
    extra: dict | None = None,
) -> dict:
    """Evaluate a folder of generated images against their prompts (the CLI's entry point). ``extra``: more
    keys for the report (and its JSON), e.g. how the images were made.

    Prompts come from ``metadata.jsonl`` (``file_name``, ``text``) or a ``.txt`` beside each image. Images of
    another size than ``size`` are resized (Lanczos) with a warning; unreadable image files and images
    without a prompt are listed and skipped; prompts the grammar cannot parse are counted in ``unparsed``.

    The report: ``all_correct`` (rate in [0, 1]) with ``all_correct_ci95`` (Wilson), ``n`` (images scored),
    ``by_objects`` ("1", "2", "3" prompted objects), ``attributes`` (present, shape, color, size, position,
    relation, background: rate, k, n, ci95), ``counting``, ``counting_prompts``, ``no_extra_objects``,
    ``shape_ambiguous``, ``shape_decided``, ``decided``, ``all_correct_decided`` (ambiguous shapes counted
    apart, never as a guess: see ``report.py``), ``background_took_object_colour`` (of the prompts that leave
    the background unstated, those whose image's background has the colour of a prompted object that was
    not found in it: the object's colour flooded the background), ``confusion`` (attribute -> prompted ->
    detected -> count; "missing" when no object was found), ``fsd``, ``unparsed``, ``unreadable``,
    ``missing_prompt``, ``resized``, ``second_judge`` (the CNN judge's rates and its agreement with the
    analytic one; see ``second_judge_report``), and ``failures`` (worst first; each says whether the CNN
    judge found it correct).
    With ``json_path`` the report is written there, and a PNG grid of the worst ``max_failures`` failures
    (in ``failures`` order) to ``grid_path`` (default: beside the JSON, ``<stem>_failures.png``); both
    atomically.
    """
    from PIL import Image

    folder = Path(images_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"not a directory: {folder}")
    size = check_resolution(size)
    images, texts, names, unreadable, missing, resized = _load_images(folder, size)
    found = len(images) + len(unreadable) + len(missing)
    if not found:
        raise ValueError(f"{folder}: no images to score ({', '.join(IMAGE_EXTENSIONS)})")
    if len(missing) == found:
        raise ValueError(
            f"{folder}: none of the {found} images has a caption (metadata.jsonl, or a .txt beside each)"
        )
    if not images:
        u = unreadable[0]
        raise ValueError(
            f"{folder}: none of the images with a caption could be read ({u['file']}: {u['error']})"
        )
    if resized:
        warnings.warn(
            f"{len(resized)} image(s) are not {size}x{size} and were resized (e.g. {resized[0]})",
            stacklevel=2,
        )
    report = evaluate(images, texts, names, reference=reference, second_judge=second_judge)
    if not report["n"]:
        raise ValueError(
            f"{folder}: none of the {len(texts)} captions is a shapes prompt (e.g. {texts[0][:80]!r}); "
            "nothing to score"
        )
    report["unreadable"] = unreadable
    report["missing_prompt"] = missing
    report["resized"] = len(resized)
    report["images_dir"] = str(folder)
    report |= extra or {}
    grid_imgs = [r.pop("_image") for r in report["failures"]]
    if json_path is not None or grid_path is not None:
        if grid_path is None:
            jp = Path(json_path)
            grid_path = jp.with_name(jp.stem + "_failures.png")
        grid_path = Path(grid_path)
        with atomic_path(grid_path) as tmp:
            Image.fromarray(failure_grid(grid_imgs[:max_failures])).save(tmp, format="PNG")
        report["failure_grid"] = str(grid_path)
    if json_path is not None:
        # not files.write_json: that sorts the keys, and the report reads best in its own order
        write_text(json_path, json.dumps(report, indent=2) + "\n")
    return report
