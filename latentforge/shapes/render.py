"""Shapes benchmark: the scene spec, its vocabulary, seeded sampling with train/validation/held-out splits,
and a fast antialiased rasteriser.

A scene is 1 to 3 coloured shapes on a 3x3 grid over a plain background. Every object sits in its own grid
cell and its extent fits inside that cell (large: 80% of the cell, small: 40%), so objects never overlap or
hide each other, and an object's colour always differs from the background's.

The same dataclasses describe a *partial* spec, which is what a caption states (see ``captions.py``): any
``size``/``position`` and the ``background`` may be ``None`` (unstated), and ``relations`` records stated
spatial relations ``(i, rel, j)`` between objects ``i`` and ``j``. A complete scene (what is rendered) has
every field set and no relations; ``satisfies(scene, spec)`` checks a complete scene against a partial spec.

Rendering: each shape is an analytic signed-distance function in unit coordinates; the coverage of a pixel
is ``clip(0.5 - d, 0, 1)`` with ``d`` the signed distance of its centre in pixels (1-pixel antialiasing).
Because positions are on a grid, the coverage mask of every (shape, size, position, resolution) is computed
once, cropped to the object's box and cached; rendering a scene is then a few in-place blends.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import operator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# ----------------------------------------------------------------------------------------------------------
# Vocabulary

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart", "hexagon", "diamond")

# Well separated in RGB: the closest pair (orange/yellow) is ~95 apart, every other pair > 100.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 230, 30),
    "green": (30, 160, 50),
    "cyan": (30, 210, 230),
    "blue": (30, 80, 230),
    "purple": (150, 40, 200),
    "pink": (250, 140, 200),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

SIZES: tuple[str, ...] = ("small", "large")
# Half-extent of an object's bounding box as a fraction of the grid cell's side.
SIZE_FRACTION: dict[str, float] = {"small": 0.2, "large": 0.4}

# Grid positions, row-major; (row, col) with row 0 at the top and col 0 at the left.
POSITIONS: dict[str, tuple[int, int]] = {
    "top_left": (0, 0),
    "top": (0, 1),
    "top_right": (0, 2),
    "left": (1, 0),
    "center": (1, 1),
    "right": (1, 2),
    "bottom_left": (2, 0),
    "bottom": (2, 1),
    "bottom_right": (2, 2),
}
POSITION_NAMES: tuple[str, ...] = tuple(POSITIONS)

RELATIONS: tuple[str, ...] = ("above", "below", "left_of", "right_of")

MIN_OBJECTS, MAX_OBJECTS = 1, 3
# Chance that a multi-object scene repeats one object's shape and colour (in 2 or all of its objects).
REPEAT_PROBABILITY = 0.2
MIN_RES, MAX_RES = 32, 512

SPLITS: tuple[str, ...] = ("train", "validation", "heldout")
VALIDATION_FRACTION = 0.1

# Held-out attribute combinations: never in train/validation scenes; every held-out scene has at least one.
HELDOUT_COLOR_SHAPES: tuple[tuple[str, str], ...] = (
    ("red", "star"),
    ("blue", "heart"),
    ("green", "triangle"),
    ("yellow", "cross"),
    ("purple", "circle"),
    ("orange", "hexagon"),
)
HELDOUT_SHAPE_POSITIONS: tuple[tuple[str, str], ...] = (("diamond", "center"), ("square", "bottom_right"))
# (shape a, relation, shape b): some object of shape a stands in that relation to some object of shape b.
HELDOUT_RELATIONS: tuple[tuple[str, str, str], ...] = (
    ("heart", "above", "square"),
    ("star", "left_of", "cross"),
)


# ----------------------------------------------------------------------------------------------------------
# The spec


def _check(value, allowed, what: str, optional: bool = False):
    if value is None and optional:
        return
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")


@dataclass(frozen=True)
class Obj:
    """One object. ``size``/``position`` None = unstated (only in a partial spec)."""

    shape: str
    color: str
    size: str | None = None
    position: str | None = None

    def to_dict(self) -> dict:
        return {"shape": self.shape, "color": self.color, "size": self.size, "position": self.position}

    @classmethod
    def from_dict(cls, d: dict) -> Obj:
        return cls(d["shape"], d["color"], d.get("size"), d.get("position"))

    @property
    def complete(self) -> bool:
        return self.size is not None and self.position is not None


@dataclass(frozen=True)
class Scene:
    """Objects over a background. Complete when everything is set and there are no relations; otherwise a
    partial spec (what a caption states): ``relations`` holds ``(i, rel, j)``, "object i is rel object j"."""

    objects: tuple[Obj, ...]
    background: str | None = None
    relations: tuple[tuple[int, str, int], ...] = ()

    def to_dict(self) -> dict:
        return {
            "objects": [o.to_dict() for o in self.objects],
            "background": self.background,
            "relations": [list(r) for r in self.relations],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls(
            objects=tuple(Obj.from_dict(o) for o in d["objects"]),
            background=d.get("background"),
            relations=tuple((int(i), str(r), int(j)) for i, r, j in d.get("relations", ())),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> Scene:
        return cls.from_dict(json.loads(s))

    @property
    def complete(self) -> bool:
        return self.background is not None and not self.relations and all(o.complete for o in self.objects)

    def validate(self, complete: bool = True) -> Scene:
        """Raise ValueError unless this is a well-formed scene (``complete=True``) or partial spec."""
        n = len(self.objects)
        if not MIN_OBJECTS <= n <= MAX_OBJECTS:
            raise ValueError(f"a scene has {MIN_OBJECTS} to {MAX_OBJECTS} objects, got {n}")
        if complete and not self.complete:
            raise ValueError(f"scene is not complete (unstated attributes or relations): {self}")
        _check(self.background, COLOR_NAMES, "background colour", optional=True)
        for o in self.objects:
            _check(o.shape, SHAPES, "shape")
            _check(o.color, COLOR_NAMES, "colour")
            _check(o.size, SIZES, "size", optional=True)
            _check(o.position, POSITION_NAMES, "position", optional=True)
            if o.color == self.background:
                raise ValueError(f"object colour {o.color!r} equals the background colour")
        positions = [o.position for o in self.objects if o.position is not None]
        if len(set(positions)) != len(positions):
            raise ValueError(f"two objects share a position: {positions}")
        for i, rel, j in self.relations:
            if not (0 <= i < n and 0 <= j < n and i != j):
                raise ValueError(f"bad relation indices {(i, rel, j)} for {n} objects")
            _check(rel, RELATIONS, "relation")
        return self


def relation_holds(a: Obj, rel: str, b: Obj) -> bool:
    """Whether ``a`` is ``rel`` ``b`` on the grid (strictly: 'above' = in a higher row, any column)."""
    (ra, ca), (rb, cb) = POSITIONS[a.position], POSITIONS[b.position]
    if rel == "above":
        return ra < rb
    if rel == "below":
        return ra > rb
    if rel == "left_of":
        return ca < cb
    if rel == "right_of":
        return ca > cb
    raise ValueError(f"unknown relation {rel!r}; expected one of {', '.join(RELATIONS)}")


def true_relations(a: Obj, b: Obj) -> list[str]:
    return [r for r in RELATIONS if relation_holds(a, r, b)]


def satisfies(scene: Scene, spec: Scene) -> bool:
    """Whether complete ``scene`` is described by partial ``spec``: same number of objects, and a one-to-one
    matching of spec objects to scene objects agreeing on every stated attribute and relation."""
    if len(scene.objects) != len(spec.objects):
        return False
    if spec.background is not None and spec.background != scene.background:
        return False
    for perm in itertools.permutations(range(len(scene.objects))):
        ok = True
        for k, s in enumerate(spec.objects):
            o = scene.objects[perm[k]]
            if (
                s.shape != o.shape
                or s.color != o.color
                or (s.size is not None and s.size != o.size)
                or (s.position is not None and s.position != o.position)
            ):
                ok = False
                break
        if ok and all(
            relation_holds(scene.objects[perm[i]], r, scene.objects[perm[j]]) for i, r, j in spec.relations
        ):
            return True
    return False


# ----------------------------------------------------------------------------------------------------------
# Splits and sampling


def heldout_combos(scene: Scene) -> list[str]:
    """The held-out combinations a complete scene contains (empty for train/validation scenes)."""
    found = []
    for o in scene.objects:
        if (o.color, o.shape) in HELDOUT_COLOR_SHAPES:
            found.append(f"{o.color} {o.shape}")
        if (o.shape, o.position) in HELDOUT_SHAPE_POSITIONS:
            found.append(f"{o.shape} at {o.position}")
    for sa, rel, sb in HELDOUT_RELATIONS:
        if any(
            a.shape == sa and b.shape == sb and a is not b and relation_holds(a, rel, b)
            for a in scene.objects
            for b in scene.objects
        ):
            found.append(f"{sa} {rel} {sb}")
    return found


def scene_key(scene: Scene) -> str:
    """Canonical text of a complete scene (independent of object order)."""
    objs = sorted(scene.objects, key=lambda o: POSITION_NAMES.index(o.position))
    return scene.background + "|" + ";".join(f"{o.position},{o.shape},{o.color},{o.size}" for o in objs)


def scene_split(scene: Scene) -> str:
    """The split a complete scene belongs to: 'heldout' if it contains a held-out combination, else a stable
    hash of the scene puts VALIDATION_FRACTION of scenes in 'validation' and the rest in 'train'."""
    if heldout_combos(scene):
        return "heldout"
    h = int.from_bytes(hashlib.blake2b(scene_key(scene).encode(), digest_size=8).digest(), "little")
    return "validation" if h % 1000 < VALIDATION_FRACTION * 1000 else "train"


def normalize_split(split: str) -> str:
    aliases = {
        "val": "validation",
        "valid": "validation",
        "held-out": "heldout",
        "held_out": "heldout",
        "test": "heldout",
    }
    split = aliases.get(split, split)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return split


def _sample_any(rng: np.random.Generator, n: int) -> Scene:
    background = COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
    others = [c for c in COLOR_NAMES if c != background]
    cells = rng.permutation(len(POSITION_NAMES))[:n]
    attrs = rng.integers(0, [len(SHAPES), len(others), len(SIZES)], size=(n, 3))
    if n >= 2 and rng.random() < REPEAT_PROBABILITY:  # repeats make counting captions common enough to learn
        k = n if rng.random() < 0.5 else 2
        attrs[1:k, :2] = attrs[0, :2]
    objs = tuple(
        Obj(SHAPES[s], others[c], SIZES[z], POSITION_NAMES[p])
        for p, (s, c, z) in zip(cells, attrs, strict=True)
    )
    return Scene(objs, background)


def sample_scene(rng: np.random.Generator, n_objects: int | None = None, split: str = "train") -> Scene:
    """A random complete scene of the given split, deterministic given ``rng``'s state.

    ``n_objects`` (1..3) defaults to uniform in 1..3. Objects get distinct cells and colours different from
    the background. Scenes are rejection-sampled until ``scene_split(scene) == split``, so the splits are
    disjoint as sets of scenes by construction.
    """
    split = normalize_split(split)
    if n_objects is not None and not MIN_OBJECTS <= n_objects <= MAX_OBJECTS:
        raise ValueError(f"n_objects must be in [{MIN_OBJECTS}, {MAX_OBJECTS}], got {n_objects!r}")
    for _ in range(100_000):
        n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1)) if n_objects is None else n_objects
        scene = _sample_any(rng, n)
        if scene_split(scene) == split:
            return scene
    raise RuntimeError(f"could not sample a {split!r} scene")  # pragma: no cover (probability ~0)


# ----------------------------------------------------------------------------------------------------------
# Signed distance functions, unit coordinates (y up), bounding box centred at 0 with max half-extent 1;
# negative inside.


def _normalise(verts) -> np.ndarray:
    v = np.asarray(verts, dtype=np.float64)
    lo, hi = v.min(0), v.max(0)
    return (v - (lo + hi) / 2) / ((hi - lo).max() / 2)


def _regular(n: int, start_deg: float, radii=(1.0,)) -> np.ndarray:
    k = np.arange(n * len(radii))
    ang = np.deg2rad(start_deg) + k * 2 * np.pi / (n * len(radii))
    r = np.array(radii)[k % len(radii)]
    return np.stack([r * np.cos(ang), r * np.sin(ang)], 1)


_W = 0.34  # the cross's arm half-width
POLYGONS: dict[str, np.ndarray] = {
    "square": _normalise([(-1, -1), (1, -1), (1, 1), (-1, 1)]),
    "triangle": _normalise(_regular(3, 90)),
    "star": _normalise(_regular(5, 90, radii=(1.0, 0.42))),
    "cross": _normalise(
        [
            (_W, 1),
            (_W, _W),
            (1, _W),
            (1, -_W),
            (_W, -_W),
            (_W, -1),
            (-_W, -1),
            (-_W, -_W),
            (-1, -_W),
            (-1, _W),
            (-_W, _W),
            (-_W, 1),
        ]
    ),
    "hexagon": _normalise(_regular(6, 0)),
    "diamond": _normalise([(0, -1), (0.62, 0), (0, 1), (-0.62, 0)]),
}


def _sd_polygon(verts: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Exact signed distance to a simple polygon (after Inigo Quilez's sdPolygon), vectorised over points."""
    d = np.full(x.shape, np.inf)
    s = np.ones(x.shape)
    for i in range(len(verts)):
        (xi, yi), (xj, yj) = verts[i], verts[i - 1]
        ex, ey = xj - xi, yj - yi
        wx, wy = x - xi, y - yi
        t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        bx, by = wx - ex * t, wy - ey * t
        d = np.minimum(d, bx * bx + by * by)
        c1, c2, c3 = y >= yi, y < yj, ex * wy > ey * wx
        s = np.where((c1 & c2 & c3) | (~c1 & ~c2 & ~c3), -s, s)
    return s * np.sqrt(d)


# Quilez's heart spans x in [-h, h], y in [0, 2*yc] with h = 1/4 + sqrt(2)/4 and 2*yc = 3/4 + sqrt(2)/4.
_HEART_H = 0.25 + math.sqrt(2) / 4
_HEART_YC = (0.75 + math.sqrt(2) / 4) / 2


def _sd_heart(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    k = _HEART_H  # the larger half-extent: scale unit coordinates into Quilez's frame
    px, py = np.abs(x) * k, y * k + _HEART_YC
    d1 = np.hypot(px - 0.25, py - 0.75) - math.sqrt(2) / 4
    m = 0.5 * np.maximum(px + py, 0.0)
    d2 = np.sqrt(np.minimum(px**2 + (py - 1) ** 2, (px - m) ** 2 + (py - m) ** 2)) * np.sign(px - py)
    return np.where(px + py > 1, d1, d2) / k


def sdf(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed distance of points (x, y) (unit coordinates, y up) to ``shape``; negative inside."""
    if shape == "circle":
        return np.hypot(x, y) - 1.0
    if shape == "heart":
        return _sd_heart(x, y)
    if shape in POLYGONS:
        return _sd_polygon(POLYGONS[shape], x, y)
    _check(shape, SHAPES, "shape")
    raise AssertionError(shape)  # pragma: no cover


# ----------------------------------------------------------------------------------------------------------
# Rasteriser


def check_resolution(size) -> int:
    try:
        s = operator.index(size)
    except TypeError:
        raise ValueError(f"image size must be an integer in [{MIN_RES}, {MAX_RES}], got {size!r}") from None
    if not MIN_RES <= s <= MAX_RES:
        raise ValueError(f"image size must be an integer in [{MIN_RES}, {MAX_RES}], got {size!r}")
    return s


def cell_bounds(position: str, res: int) -> tuple[int, int, int, int]:
    """Pixel rows [r0, r1) and columns [c0, c1) whose centres lie in the position's grid cell."""
    row, col = POSITIONS[position]
    cell = res / 3

    def span(k):
        return math.ceil(k * cell - 0.5), math.ceil((k + 1) * cell - 0.5)

    (r0, r1), (c0, c1) = span(row), span(col)
    return r0, r1, c0, c1


@lru_cache(maxsize=8192)
def coverage(shape: str, size: str, position: str, res: int) -> tuple[int, int, int, int, np.ndarray]:
    """(r0, r1, c0, c1, mask): the object's antialiased coverage in [0, 1], float32 [r1-r0, c1-c0, 1],
    cropped to the pixels it can touch (all inside its cell)."""
    _check(shape, SHAPES, "shape")
    _check(size, SIZES, "size")
    _check(position, POSITION_NAMES, "position")
    res = check_resolution(res)
    row, col = POSITIONS[position]
    cell = res / 3
    cy, cx = (row + 0.5) * cell, (col + 0.5) * cell
    r = SIZE_FRACTION[size] * cell  # pixels per unit
    r0, r1 = max(0, math.floor(cy - r - 1)), min(res, math.ceil(cy + r + 1))
    c0, c1 = max(0, math.floor(cx - r - 1)), min(res, math.ceil(cx + r + 1))
    ys = np.arange(r0, r1) + 0.5
    xs = np.arange(c0, c1) + 0.5
    y = (cy - ys[:, None]) / r + np.zeros((1, len(xs)))
    x = (xs[None, :] - cx) / r + np.zeros((len(ys), 1))
    d_px = sdf(shape, x, y) * r
    mask = np.clip(0.5 - d_px, 0.0, 1.0).astype(np.float32)
    nz = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    mask = mask[nz[0][0] : nz[0][-1] + 1, nz[1][0] : nz[1][-1] + 1]
    r0, c0 = r0 + nz[0][0], c0 + nz[1][0]
    mask.setflags(write=False)
    return int(r0), int(r0 + mask.shape[0]), int(c0), int(c0 + mask.shape[1]), mask[:, :, None]


_RGB = {name: np.array(rgb, dtype=np.float32) for name, rgb in COLORS.items()}


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """Rasterise a complete scene: uint8 array [size, size, 3], antialiased. ``size`` in 32..512."""
    size = check_resolution(size)
    scene.validate(complete=True)
    return _composite(scene, size)


def _composite(scene: Scene, size: int) -> np.ndarray:
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = _RGB[scene.background]
    for o in scene.objects:
        r0, r1, c0, c1, a = coverage(o.shape, o.size, o.position, size)
        sub = img[r0:r1, c0:c1]
        sub += a * (_RGB[o.color] - sub)
    img += 0.5
    return img.astype(np.uint8)
