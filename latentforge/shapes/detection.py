"""Detection for the shapes evaluator: ``detect(image) -> Scene``, a complete scene of everything found.
Analytic, no training.

1. Background: the per-channel median of all pixels (objects cover at most ~25% of an image), named by the
   nearest palette colour.
2. Foreground: pixels of a 3x3 box-smoothed copy whose RGB distance from the background exceeds
   ``FG_THRESHOLD`` (well below the ~95 separating any two palette colours, well above smoothed noise);
   8-connected components smaller than ``MIN_AREA_FRACTION`` of a cell are dropped as specks; a component
   with at least ``SPLIT_AREA_FRACTION`` of a cell in each of several cells (neighbouring large objects whose
   blurred edges touch) is split along the cell borders; each remaining component goes to the grid cell
   holding its centroid (components in one cell are merged).
3. Colour: the median colour of the object's purest pixels (those farthest from the background), named by
   ``color.nearest_color`` (which allows for edge pixels' mixing and 4:2:0 chroma dilution).
4. Shape and size, by analysis by synthesis: the object's coverage of its palette colour (offset like the
   background) is fitted by the renderer's own coverage masks of the 8 shapes x 2 sizes at that cell,
   Gaussian-blurred by each sigma of a bank (``templates.fit``: least squares in YCbCr, luma weighted over
   chroma); objects that differ from the background mostly in chroma are also fitted under a 4:2:0
   hypothesis (chroma as JPEG's subsampling leaves it). One blur and one hypothesis per image -- the pair
   leaving the least residual summed over its objects (``_choose_model``) -- then the least residual names
   each object's shape and size. Generated images are softer than renders: sharp templates alone mistake
   small blurred shapes (86% of 64 px renders all correct after a 1.2 px blur, 100% with the bank).
5. JPEG re-ranking: when the best two shapes are nearly tied and the contrast is mostly chroma, simulated
   JPEG round trips of the candidates (sharp and blurred like the image) decide (``jpeg.suspect``,
   ``jpeg.rerank``).

Features (``features``, for FSD): per grid cell (row-major) 15 numbers -- foreground present (0/1),
foreground area as a fraction of the cell, measured colour minus background (RGB / 255, 3), best template
similarity (how clean the shape is), a softmax over the 8 shapes of their best similarities (8), and the
probability of "large" -- plus 10 x the median absolute deviation of background pixels from the background
colour (/ 255, how clean the image is) and the background colour (RGB / 255): ``N_FEATURES`` = 139.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from . import jpeg, templates
from .color import CHROMA_WEIGHT, PALETTE, YCC, nearest_color, nearest_palette
from .render import COLOR_NAMES, POSITION_NAMES, SHAPES, SIZES, Obj, Scene, cell_bounds, check_resolution

FG_THRESHOLD = 40.0  # RGB distance from the background (smoothed image) that makes a pixel foreground
MIN_AREA_FRACTION = 0.02  # components below this fraction of a cell's area are noise
SPLIT_AREA_FRACTION = 0.15  # a component with this much of a cell in each of two cells is two objects
FEATURES_PER_CELL = 15
N_FEATURES = 9 * FEATURES_PER_CELL + 4


@dataclass(frozen=True)
class Detection:
    """What ``analyze`` finds in one image: the complete scene, per-object confidence (best template
    similarity, 1 = perfect) and the feature vector used by FSD."""

    scene: Scene
    confidence: tuple[float, ...]
    features: np.ndarray
    blur: float | None = None  # the image's blur (sigma, px) as the template fit chose it; None: no objects


@dataclass(frozen=True)
class _Image:
    """One image as the per-object steps read it."""

    img8: np.ndarray  # uint8 [res, res, 3]: the image
    bg: np.ndarray  # float32 [3]: the measured background colour
    bg_idx: int  # its palette index
    diff: np.ndarray  # float32 [res, res, 3]: image minus background
    lab: np.ndarray  # int [res, res]: foreground component of each pixel (0: background)
    kept: np.ndarray  # bool [n + 1]: the components that are objects (not specks)
    dist2: np.ndarray  # float32 [res, res]: squared RGB distance from the background
    diffp: np.ndarray  # diff zero-padded by MAX_SHIFT (the template search's margin)
    labp: np.ndarray  # lab zero-padded by MAX_SHIFT

    @property
    def res(self) -> int:
        return self.img8.shape[0]


def _as_rgb(image) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4) or img.shape[0] != img.shape[1]:
        raise ValueError(f"expected a square HxWx3 image, got shape {img.shape}")
    img = img[:, :, :3]
    if img.dtype != np.uint8:
        if np.issubdtype(img.dtype, np.floating) and img.max(initial=0) <= 1.0:
            img = img * 255.0
        img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return img


@lru_cache(maxsize=16)
def _cell_map(res: int) -> np.ndarray:
    """The grid cell (0..8, row-major) of every pixel: int [res, res]."""
    m = np.zeros((res, res), dtype=np.intp)
    for k, position in enumerate(POSITION_NAMES):
        r0, r1, c0, c1 = cell_bounds(position, res)
        m[r0:r1, c0:c1] = k
    m.setflags(write=False)
    return m


def _split_across_cells(lab: np.ndarray, n: int, res: int) -> tuple[np.ndarray, int]:
    """Split components with at least SPLIT_AREA_FRACTION of a cell in each of two or more cells: neighbouring
    large objects whose blurred (e.g. chroma-subsampled) edges touch. Each such cell's part becomes its own
    component; a component's smaller slivers in other cells stay with its largest part."""
    cells = _cell_map(res)
    counts = np.bincount((lab * 9 + cells).ravel(), minlength=(n + 1) * 9).reshape(n + 1, 9)
    big = counts[1:] >= SPLIT_AREA_FRACTION * (res / 3) ** 2
    split = np.nonzero(big.sum(1) >= 2)[0] + 1
    if not len(split):
        return lab, n
    lab = lab.copy()
    for k in split:
        parts = np.nonzero(big[k - 1])[0]
        keep = parts[np.argmax(counts[k, parts])]
        for j in parts:
            if j != keep:
                n += 1
                lab[(lab == k) & (cells == j)] = n
    return lab, n


def _foreground(diff: np.ndarray, res: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Step 2's components: (foreground mask bool [res, res], labels int [res, res], number of labels)."""
    smooth = ndimage.uniform_filter(diff, size=(3, 3, 1), mode="nearest")
    fg = np.einsum("hwc,hwc->hw", smooth, smooth) > FG_THRESHOLD**2
    lab, n = ndimage.label(fg, structure=np.ones((3, 3), dtype=bool))
    if n:
        lab, n = _split_across_cells(lab, n, res)
    return fg, lab, n


def _objects_by_cell(fg: np.ndarray, lab: np.ndarray, n: int, res: int) -> dict[int, list[int]]:
    """The components that are objects, by the grid cell (0..8) holding their centroid: specks (below
    MIN_AREA_FRACTION of a cell) are dropped."""
    idx = np.arange(1, n + 1)
    areas = ndimage.sum_labels(fg, lab, idx)
    cell = res / 3
    cell_area = cell * cell
    ys, xs = np.indices(fg.shape)
    cy = ndimage.sum_labels(ys, lab, idx) / np.maximum(areas, 1)
    cx = ndimage.sum_labels(xs, lab, idx) / np.maximum(areas, 1)
    by_cell: dict[int, list[int]] = {}
    for k in range(n):
        if areas[k] < MIN_AREA_FRACTION * cell_area:
            continue
        row = min(2, max(0, int((cy[k] + 0.5) / cell)))
        col = min(2, max(0, int((cx[k] + 0.5) / cell)))
        by_cell.setdefault(row * 3 + col, []).append(k + 1)
    return by_cell


def _measured_color(im: _Image, mine: np.ndarray) -> np.ndarray:
    """Step 3: the median colour of the object's purest 30% of pixels (farthest from the background)."""
    d_mine = im.dist2[mine]
    top = d_mine >= np.quantile(d_mine, 0.7)
    return np.median(im.diff[mine][top], axis=0) + im.bg


def _window(im: _Image, own: np.ndarray, position: str) -> tuple[np.ndarray, np.ndarray]:
    """The cell of ``position`` with a MAX_SHIFT margin p, as ``templates.fit`` reads it: (image minus
    background [h + 2p, w + 2p, 3], other objects' pixels bool [h + 2p, w + 2p]); ``own``: bool [n + 1],
    the object's components."""
    r0, r1, c0, c1 = cell_bounds(position, im.res)
    rows, cols = slice(r0, r1 + 2 * templates.MAX_SHIFT), slice(c0, c1 + 2 * templates.MAX_SHIFT)
    labels = im.labp[rows, cols]
    return im.diffp[rows, cols], im.kept[labels] & ~own[labels]


@dataclass(frozen=True)
class _Found:
    """One object as measured, before the image-level choice of blur and chroma hypothesis."""

    cell: int  # its grid cell (0..8, row-major)
    color: int  # its palette colour
    area: float  # its foreground area as a fraction of the cell
    v: np.ndarray  # float32 [3]: its measured colour minus the background
    luma2: float  # squared luma contrast of its palette colour
    chroma2: float  # squared chroma contrast of its palette colour
    plain: templates.Fit  # the template fit, plain hypothesis
    sub: templates.Fit | None  # ... 4:2:0 hypothesis (objects whose contrast is mostly chroma)


def _measure(im: _Image, ci: int, labels: list[int], n: int) -> _Found:
    """Steps 3 and 4 for the object made of components ``labels`` in cell ``ci``: colour, and the template
    fit of its full-coverage palette colour (offset like the background: a colour cast moves both)."""
    own = np.zeros(n + 1, dtype=bool)
    own[labels] = True
    mine = own[im.lab]
    p = _measured_color(im, mine)
    color = nearest_color(p, im.bg, im.bg_idx)
    position = POSITION_NAMES[ci]
    full = PALETTE[color] + (im.bg - PALETTE[im.bg_idx]) - im.bg
    vp = YCC @ full
    luma2, chroma2 = float(vp[0] ** 2), float(vp[1:] @ vp[1:])
    dwin, others = _window(im, own, position)
    plain, sub = templates.fit(dwin, others, full, position, im.res, luma2 < CHROMA_WEIGHT * chroma2)
    area = float(mine.sum()) / (im.res / 3) ** 2
    return _Found(ci, color, area, p - im.bg, luma2, chroma2, plain, sub)


def _choose_model(found: list[_Found]) -> tuple[int, int]:
    """The image's chroma hypothesis (0: plain, 1: 4:2:0) and blur (index in templates.TEMPLATE_BLURS): the
    pair whose best templates leave the least residual summed over the image's objects (objects without a
    4:2:0 fit count their plain one under both)."""
    total = np.zeros((2, len(templates.TEMPLATE_BLURS)))
    for f in found:
        plain = f.plain.resid.min(1)
        total[0] += plain
        total[1] += plain if f.sub is None else f.sub.resid.min(1)
    hyp, blur = np.unravel_index(int(np.argmin(total)), total.shape)
    return int(hyp), int(blur)


def _decide(im: _Image, f: _Found, hyp: int, blur: int) -> tuple[int, np.ndarray]:
    """Step 4's decision and step 5 for one object under the image's hypothesis and blur: the index in
    templates.TEMPLATE_KEYS of its shape and size (least residual), and every template's similarity [16]."""
    fit = f.sub if hyp == 1 and f.sub is not None else f.plain
    resid, sim = fit.resid[blur], fit.sim[blur]
    best = int(np.argmin(resid))
    per_shape = sim.reshape(len(SHAPES), len(SIZES)).max(1)
    if jpeg.suspect(per_shape, f.luma2, f.chroma2):
        rgb = PALETTE[f.color] + (im.bg - PALETTE[im.bg_idx])
        k = jpeg.rerank(im.img8, POSITION_NAMES[f.cell], im.bg, rgb, sim, fit.shift[blur].T, blur)
        best = best if k is None else k
    return best, sim


def _cell_features(f: np.ndarray, found: _Found, sim: np.ndarray, best: int) -> None:
    """Write one object's FEATURES_PER_CELL features into ``f`` (see the module docstring)."""
    per_shape = sim.reshape(len(SHAPES), len(SIZES)).max(1)
    e = np.exp(20.0 * (per_shape - per_shape.max()))
    per_size = sim.reshape(len(SHAPES), len(SIZES)).max(0)
    f[0] = 1.0
    f[1] = found.area
    f[2:5] = found.v / 255.0
    f[5] = sim[best]
    f[6:14] = e / e.sum()
    f[14] = 1.0 / (1.0 + math.exp(-20.0 * (per_size[1] - per_size[0])))  # P(large)


def analyze(image) -> Detection:
    """Detect the scene of one image (uint8 HxWx3, square, 32..512 pixels); see the module docstring."""
    img8 = _as_rgb(image)
    res = check_resolution(img8.shape[0])
    img = img8.astype(np.float32)
    bg = np.median(img.reshape(-1, 3), axis=0).astype(np.float32)
    bg_idx = nearest_palette(bg)
    diff = img - bg
    fg, lab, n = _foreground(diff, res)
    feats = np.zeros(N_FEATURES, dtype=np.float32)
    feats[-3:] = bg / 255.0
    # image cleanliness: 10 x the median absolute deviation of background pixels from the background colour
    feats[-4] = 10.0 * float(np.median(np.abs(diff[~fg]))) / 255.0 if (~fg).any() else 0.0
    objects, conf = [], []
    blur = None
    if n:
        by_cell = _objects_by_cell(fg, lab, n, res)
        kept = np.zeros(n + 1, dtype=bool)
        for labels in by_cell.values():
            kept[labels] = True
        pad = templates.MAX_SHIFT
        dist2 = np.einsum("hwc,hwc->hw", diff, diff)
        diffp = np.pad(diff, ((pad, pad), (pad, pad), (0, 0)))
        im = _Image(img8, bg, bg_idx, diff, lab, kept, dist2, diffp, np.pad(lab, pad))
        found = [_measure(im, ci, by_cell[ci], n) for ci in sorted(by_cell)]
        if found:
            hyp, b = _choose_model(found)
            blur = templates.TEMPLATE_BLURS[b]
        for f in found:
            best, sim = _decide(im, f, hyp, b)
            shape, size = templates.TEMPLATE_KEYS[best]
            objects.append(Obj(shape, COLOR_NAMES[f.color], size, POSITION_NAMES[f.cell]))
            conf.append(float(sim[best]))
            _cell_features(feats[f.cell * FEATURES_PER_CELL : (f.cell + 1) * FEATURES_PER_CELL], f, sim, best)
    scene = Scene(tuple(objects), COLOR_NAMES[bg_idx])
    return Detection(scene, tuple(conf), feats, blur)


def detect(image) -> Scene:
    """The complete scene found in ``image``: background and every object with its 4 attributes (it may
    hold 0 objects, or more than a prompt can state)."""
    return analyze(image).scene


def features(images) -> np.ndarray:
    """FSD features of images: float64 [N, N_FEATURES] (see the module docstring)."""
    return np.stack([analyze(im).features for im in images]).astype(np.float64)
