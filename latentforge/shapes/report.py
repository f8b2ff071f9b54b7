"""Reports of the shapes evaluator: the aggregate of many scored images (rates with Wilson intervals,
confusion between prompted and detected attributes, the failures worst first), its terminal table, the
failure grid image, and FSD.

Ambiguous shapes (``scoring`` module docstring) are counted apart, never as a guess: ``shape_ambiguous`` is
the share of found prompted objects whose shape the detector could not tell; ``shape_decided`` the
shape-correct rate of the others (ambiguous objects out of its denominator); ``decided`` the share of images
with no ambiguous prompted object, and ``all_correct_decided`` the all-correct rate among those images.
``all_correct`` and ``attributes`` keep scoring the best-fitting shape, ambiguous or not, as before.

FSD (Frechet Shapes Distance): the Frechet distance between Gaussians fitted to evaluator features of two
image sets (``detection.features``). ``evaluate`` compares the generated images with renders of random
scenes satisfying the same prompts (``complete_spec``). With a few hundred images per set the estimate's own
bias dominates (~0.5 between two independent sets of 500 real renders); compare FSDs at equal N, preferably
thousands.
"""

from __future__ import annotations

import math

import numpy as np

from ..stats import frechet_distance
from .render import COLOR_NAMES, POSITION_NAMES, SIZES, Obj, Scene, relation_holds, satisfies
from .scoring import ATTRIBUTES, rate, wilson

CONFUSION_ATTRIBUTES = ("shape", "color", "size", "position", "background")


class Tally:
    """The running counts of a report: ``add`` each scored image, then ``report``."""

    def __init__(self):
        self.counts = {"correct": 0, "count": 0, "no_extra": 0, "n": 0}
        self.by_n = {k: [0, 0] for k in (1, 2, 3)}  # prompted objects -> [correct, n]
        self.attr = {a: [0, 0] for a in ("present", *ATTRIBUTES, "relation", "background")}
        self.count_prompts = [0, 0]  # prompts naming one (shape, colour) more than once
        self.confusion = {a: {} for a in CONFUSION_ATTRIBUTES}  # attribute -> prompted -> detected -> count
        self.ambiguous = [0, 0]  # found prompted objects: [shape ambiguous, n]
        self.shape_decided = [0, 0]  # found prompted objects, shape not ambiguous: [shape correct, n]
        self.decided = [0, 0]  # images with no ambiguous prompted object: [all correct, n]
        # background unstated: [it took the colour of a prompted object not found in that colour, n]
        self.flooded = [0, 0]

    def _confuse(self, attr: str, want: str, got: str) -> None:
        row = self.confusion[attr].setdefault(want, {})
        row[got] = row.get(got, 0) + 1

    def add(self, spec: Scene, detected: Scene, s: dict) -> int:
        """Count one image's ``score(detected, spec)`` result ``s``; returns its number of errors (wrong
        attributes, relations and background, extra objects, and the count when it is off)."""
        counts = self.counts
        counts["n"] += 1
        counts["correct"] += s["correct"]
        counts["count"] += s["count"]
        counts["no_extra"] += s["extra"] == 0
        n_obj = len(spec.objects)
        self.by_n[n_obj][0] += s["correct"]
        self.by_n[n_obj][1] += 1
        if len({(o.shape, o.color) for o in spec.objects}) < n_obj:  # a counting prompt
            self.count_prompts[0] += s["count"]
            self.count_prompts[1] += 1
        decided = s.get("decided", True)
        self.decided[0] += decided and s["correct"]
        self.decided[1] += decided
        n_wrong = 0
        for w, o in zip(spec.objects, s["objects"], strict=True):
            found = o["found"]
            if found is not None:
                amb = bool(o.get("shape_ambiguous", False))
                self.ambiguous[0] += amb
                self.ambiguous[1] += 1
                if not amb:
                    self.shape_decided[0] += bool(o["shape"])
                    self.shape_decided[1] += 1
            for a in ("present", *ATTRIBUTES):
                if o[a] is None:
                    continue
                self.attr[a][0] += bool(o[a])
                self.attr[a][1] += 1
                n_wrong += not o[a]
                if a != "present":
                    self._confuse(a, getattr(w, a), found[a] if found else "missing")
        for ok in s["relations"]:
            self.attr["relation"][0] += ok
            self.attr["relation"][1] += 1
            n_wrong += not ok
        if s["background"] is not None:
            self.attr["background"][0] += s["background"]
            self.attr["background"][1] += 1
            n_wrong += not s["background"]
            self._confuse("background", spec.background, detected.background)
        else:  # the model chose the background: did an object's colour fill it instead of the object?
            self.flooded[0] += any(
                w.color == detected.background and not o["color"]
                for w, o in zip(spec.objects, s["objects"], strict=True)
            )
            self.flooded[1] += 1
        return n_wrong + s["extra"] + abs(len(detected.objects) - n_obj) * (not s["count"])

    def report(self, unparsed: list[dict]) -> dict:
        """The report's rates (see ``evaluate.evaluate_folder`` for its layout), without FSD and failures."""
        n, correct = self.counts["n"], self.counts["correct"]
        return {
            "all_correct": correct / n if n else 0.0,
            "n": n,
            "all_correct_ci95": list(wilson(correct, n)),
            "by_objects": {str(k): rate(*v) for k, v in self.by_n.items()},
            "attributes": {a: rate(*v) for a, v in self.attr.items()},
            "counting": rate(self.counts["count"], n),
            "counting_prompts": rate(*self.count_prompts),
            "no_extra_objects": rate(self.counts["no_extra"], n),
            "shape_ambiguous": rate(*self.ambiguous),
            "shape_decided": rate(*self.shape_decided),
            "decided": rate(self.decided[1], n),
            "all_correct_decided": rate(*self.decided),
            "background_took_object_colour": rate(*self.flooded),
            "confusion": self.confusion,
            "unparsed": {"count": len(unparsed), "items": unparsed},
        }


def format_report(report: dict) -> str:
    """A terminal table of a report from ``evaluate``/``evaluate_folder``."""

    def row(name, r):
        if not r["n"]:
            return f"  {name:<22} {'-':>7} {0:>6}"
        lo, hi = r["ci95"]
        return f"  {name:<22} {100 * r['rate']:6.2f}% {r['n']:>6}   [{100 * lo:6.2f}, {100 * hi:6.2f}]"

    lines = [f"  {'':<22} {'acc':>7} {'n':>6}   95% CI (Wilson)"]
    n, k = report["n"], round(report["all_correct"] * report["n"])
    lines.append(row("all correct", {"rate": report["all_correct"], "n": n, "k": k,
                                     "ci95": report["all_correct_ci95"]}))  # fmt: skip
    for key, r in report["by_objects"].items():
        lines.append(row(f"  {key}-object prompts", r))
    for a, r in report["attributes"].items():
        lines.append(row(a, r))
    lines.append(row("counting", report["counting"]))
    lines.append(row("counting prompts", report["counting_prompts"]))
    lines.append(row("no extra objects", report["no_extra_objects"]))
    if "background_took_object_colour" in report:
        lines.append(row("bg took object colour", report["background_took_object_colour"]))
    if "shape_ambiguous" in report:
        lines.append(row("shape ambiguous", report["shape_ambiguous"]))
        lines.append(row("shape (decided)", report["shape_decided"]))
        lines.append(row("decided images", report["decided"]))
        lines.append(row("all correct (decided)", report["all_correct_decided"]))
    if "fsd" in report:
        lines.append(f"  {'FSD':<22} {report['fsd']:8.4f}")
    if "second_judge" in report:
        j = report["second_judge"]
        lines.append(row("CNN judge: all correct", j["all_correct"]))
        for key, r in j["by_objects"].items():
            lines.append(row(f"  {key}-object prompts", r))
        lines.append(row("judges agree", j["agreement"]))
        if not j["trustworthy"]:
            off = 100 * (1 - j["agreement"]["rate"])
            lines.append(f"  UNTRUSTWORTHY: the judges disagree on {off:.1f}% of the images (more than 3%)")
    lines += _notes(report)
    for a in CONFUSION_ATTRIBUTES:
        errs = [(c, w, g) for w, row_ in report["confusion"][a].items() for g, c in row_.items() if g != w]
        if errs:
            errs.sort(reverse=True)
            top = ", ".join(f"{w}->{g} x{c}" for c, w, g in errs[:5])
            lines.append(f"  {a} confusions: {top}")
    return "\n".join(lines)


def _notes(report: dict) -> list[str]:
    """``format_report``'s line about skipped and resized images, if any."""
    extras = []
    u = report["unparsed"]["count"]
    if u:
        extras.append(f"{u} unparsed prompt(s)")
    for key, what in (("unreadable", "unreadable file(s)"), ("missing_prompt", "image(s) without prompt")):
        if report.get(key):
            extras.append(f"{len(report[key])} {what}")
    if report.get("resized"):
        extras.append(f"{report['resized']} resized image(s)")
    return ["  skipped/notes: " + ", ".join(extras)] if extras else []


def failure_grid(images, cols: int = 8, scale: int = 2, gap: int = 2) -> np.ndarray:
    """Tile images (uint8 HxWx3, same size) into one uint8 grid, upscaled ``scale``x, gray gaps."""
    images = [np.asarray(im) for im in images]
    if not images:
        return np.full((8, 8, 3), 128, np.uint8)
    s = images[0].shape[0] * scale
    cols = min(cols, len(images))
    rows = math.ceil(len(images) / cols)
    grid = np.full((rows * (s + gap) + gap, cols * (s + gap) + gap, 3), 128, np.uint8)
    for k, im in enumerate(images):
        r, c = divmod(k, cols)
        big = im.repeat(scale, 0).repeat(scale, 1)
        grid[gap + r * (s + gap) : gap + r * (s + gap) + s, gap + c * (s + gap) : gap + c * (s + gap) + s] = (
            big
        )
    return grid


def fsd(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet Shapes Distance between two feature sets [N, D] (from ``features``); needs N >= 2 each: the
    Frechet distance (``stats.frechet_distance``) between Gaussians fitted to the two sets."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("FSD needs at least 2 images in each set")
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def complete_spec(spec: Scene, rng: np.random.Generator, tries: int = 1000) -> Scene:
    """A random complete scene satisfying partial ``spec`` (unstated sizes, positions, background drawn
    uniformly, positions distinct and consistent with the stated relations)."""
    n = len(spec.objects)
    free = [p for p in POSITION_NAMES if p not in {o.position for o in spec.objects}]
    colors = {o.color for o in spec.objects}
    bgs = [c for c in COLOR_NAMES if c not in colors]
    for _ in range(tries):
        cells = iter(rng.permutation(free))
        objs = tuple(
            Obj(
                o.shape,
                o.color,
                o.size if o.size is not None else SIZES[rng.integers(len(SIZES))],
                o.position if o.position is not None else str(next(cells)),
            )
            for o in spec.objects
        )
        bg = spec.background if spec.background is not None else bgs[rng.integers(len(bgs))]
        scene = Scene(objs, bg)
        if all(relation_holds(objs[i], r, objs[j]) for i, r, j in spec.relations):
            assert n == len(objs) and satisfies(scene, spec)
            return scene
    raise ValueError(f"no complete scene satisfies {spec}")
