"""Scoring for the shapes evaluator: a detected (complete) scene against a prompt's partial spec, and the
Wilson intervals its rates are reported with.

``score(detected, spec)``: prompted objects are matched one-to-one to detected ones (the assignment agreeing
on the most stated attributes and relations); ``correct`` is exactly ``satisfies(detected, spec)``: right
number of objects, every stated attribute, relation and background. Detected objects left unassigned are
*extra* objects.

Ambiguous shapes: the detector may flag a detected object's shape ambiguous (another shape fits about as
well: a small object blurred, noisy or JPEG-compressed past recognition; ``detection.shape_margin``). It
still names the best fit, and ``correct`` and the per-object ``shape`` still score that best fit (their
meaning is unchanged); ``shape_ambiguous`` marks each prompted object whose found object is flagged, and
``decided`` is False when any is -- the verdict then rests on a guess, and reports count such images apart
(``report.Tally``) instead of as right or wrong.
"""

from __future__ import annotations

import itertools
import math

from .render import Scene, relation_holds, satisfies

ATTRIBUTES = ("shape", "color", "size", "position")


def _assignment_score(det, spec: Scene, perm: tuple[int | None, ...]) -> int:
    """How well ``perm`` (spec object k -> detected object perm[k], None = missing) agrees with ``spec``:
    2 per agreeing shape and colour, 1 per assigned object, 1 per agreeing stated size, position and
    relation."""
    s = 0
    for k, w in enumerate(spec.objects):
        j = perm[k]
        if j is None:
            continue
        o = det[j]
        s += 2 * (o.shape == w.shape) + 2 * (o.color == w.color) + 1
        s += (w.size is not None and o.size == w.size) + (w.position is not None and o.position == w.position)
    for i, rel, j in spec.relations:
        if perm[i] is not None and perm[j] is not None and relation_holds(det[perm[i]], rel, det[perm[j]]):
            s += 1
    return s


def _assign(detected: Scene, spec: Scene) -> tuple[tuple[int | None, ...], int]:
    """The one-to-one assignment of spec objects to detected objects (None = missing) that agrees on the
    most stated attributes and relations (the first such in a fixed order); returns (assignment, its
    score)."""
    det, want = detected.objects, spec.objects
    slots = list(range(len(det))) + [None] * len(want)
    best, best_score = tuple([None] * len(want)), -1
    # a detected object agreeing on neither shape nor colour is another object, not "this one gone wrong"
    allowed = [
        {None} | {j for j, o in enumerate(det) if o.shape == w.shape or o.color == w.color} for w in want
    ]
    perms = set(itertools.permutations(slots, len(want)))
    for perm in sorted(perms, key=lambda p: tuple(len(det) if j is None else j for j in p)):
        if any(j not in ok for j, ok in zip(perm, allowed, strict=True)):
            continue
        s = _assignment_score(det, spec, perm)
        if s > best_score:
            best, best_score = perm, s
    return best, best_score


def score(detected: Scene, spec: Scene, ambiguous=None) -> dict:
    """Judge a detected (complete) scene against a prompt's partial spec; ``ambiguous``: per detected object,
    whether the detector found its shape ambiguous (``Detection.shape_ambiguous``; None: none is).

    Returns ``{"correct", "count", "extra", "background", "objects", "relations", "decided"}``: ``correct``
    = ``satisfies(detected, spec)``; ``count``: as many objects found as prompted; ``extra``: detected
    objects no prompted object is assigned to; ``background``: None if unstated; ``objects``: per prompted
    object ``{"present", "shape", "color", "size", "position", "found", "shape_ambiguous"}`` (size/position
    None when unstated, ``found`` the assigned detected object's dict or None, ``shape_ambiguous`` whether
    that object's shape is ambiguous); ``relations``: one bool per stated relation; ``decided``: no prompted
    object's shape is ambiguous (see the module docstring).
    """
    perm, _ = _assign(detected, spec)
    det = detected.objects
    amb = [False] * len(det) if ambiguous is None or len(ambiguous) == 0 else [bool(a) for a in ambiguous]
    if len(amb) != len(det):
        raise ValueError(f"{len(amb)} ambiguity flags for {len(det)} detected objects")
    objs = []
    for k, w in enumerate(spec.objects):
        j = perm[k]
        o = det[j] if j is not None else None
        objs.append(
            {
                "present": o is not None,
                "shape": o is not None and o.shape == w.shape,
                "color": o is not None and o.color == w.color,
                "size": None if w.size is None else (o is not None and o.size == w.size),
                "position": None if w.position is None else (o is not None and o.position == w.position),
                "found": None if o is None else o.to_dict(),
                "shape_ambiguous": j is not None and amb[j],
            }
        )
    rels = [
        perm[i] is not None and perm[j] is not None and relation_holds(det[perm[i]], r, det[perm[j]])
        for i, r, j in spec.relations
    ]
    used = {j for j in perm if j is not None}
    return {
        "correct": satisfies(detected, spec),
        "count": len(det) == len(spec.objects),
        "extra": len(det) - len(used),
        "background": None if spec.background is None else detected.background == spec.background,
        "objects": objs,
        "relations": rels,
        "decided": not any(o["shape_ambiguous"] for o in objs),
    }


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n (95% for the default z); (0, 1) when n == 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(k: int, n: int) -> dict:
    """A rate as reports give it: ``{"rate": k / n (None when n == 0), "k", "n", "ci95": [lo, hi]}``, the
    interval Wilson's."""
    lo, hi = wilson(k, n)
    return {"rate": k / n if n else None, "k": int(k), "n": int(n), "ci95": [lo, hi]}
