"""Detection for the shapes evaluator: ``detect(image) -> Scene``, a complete scene of everything found.
Analytic, no training.

1. Background: the per-channel median of all pixels (objects cover at most ~25% of an image), then of the
   pixels step 2's smoothed copy puts near it (objects and their halos left out), named by the nearest
   palette colour.
2. Foreground: pixels of a 3x3 box-smoothed copy whose RGB distance from the background exceeds
   ``FG_THRESHOLD`` (well below the ~95 separating any two palette colours, well above smoothed noise);
   8-connected components smaller than ``MIN_AREA_FRACTION`` of a cell are dropped as specks; a component
   with at least ``SPLIT_AREA_FRACTION`` of a cell in each of several cells (neighbouring large objects whose
   blurred edges touch) is split along the cell borders; each remaining component goes to the grid cell
   holding its centroid (components in one cell are merged). 2b: in cells left empty, faint objects (a
   small object blurred at 32 px) are looked for at ``FAINT_THRESHOLD`` and kept only if a template fits
   them (``_faint_candidates``, ``_fits_faint``).
3. Colour: the median colour of the object's purest pixels (those farthest from the background); the
   palette colours it may stand for (``color.color_candidates``: edge mixing, blur dilution, 4:2:0 chroma
   dilution) are each tried in step 4, and the one whose fit leaves the least residual wins.
4. Shape and size, by analysis by synthesis: the object as the renderer would draw it -- its palette colour
   (offset like the background) at the coverage of one of the renderer's own masks of the 8 shapes x 2
   sizes at that cell, Gaussian-blurred by each sigma of a bank, shifted by up to MAX_SHIFT px -- is fitted
   to the image by least squares (``templates.fit``; in RGB). Images whose chroma is blurrier than their
   luma (JPEG 4:2:0; ``templates.Fits.subsampling`` summed over the objects) are fitted in YCbCr with
   chroma down-weighted instead, and objects that differ from the background mostly in chroma also under
   a 4:2:0 hypothesis (``templates.fit_jpeg``). One chroma model and one blur per image -- those leaving
   the least residual summed over its objects (``_choose_model``) -- then the least residual names each
   object's shape and size. Generated images are softer than renders: sharp templates alone mistake small
   blurred shapes (86% of 300 held-out 64 px renders all correct after a 1.2 px blur, 100% with the bank).
5. JPEG re-ranking: when the best two shapes are nearly tied and the contrast is mostly chroma, simulated
   JPEG round trips of the candidates (sharp and blurred like the image) decide (``jpeg.suspect``,
   ``jpeg.rerank``).
6. Ambiguity: an object whose best other shape fits within SHAPE_AMBIGUITY_Z noise standard deviations
   (``shape_margin``) has its shape reported ambiguous (``Detection.shape_ambiguous``): the scene still
   names the best fit, and scoring counts such shapes apart (``scoring``, ``report``).

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
from .color import CHROMA_WEIGHT, PALETTE, YCC, color_candidates, nearest_palette
from .render import COLOR_NAMES, POSITION_NAMES, SHAPES, SIZES, Obj, Scene, cell_bounds, check_resolution

FG_THRESHOLD = 40.0  # RGB distance from the background (smoothed image) that makes a pixel foreground
MIN_AREA_FRACTION = 0.02  # components below this fraction of a cell's area are noise
SPLIT_AREA_FRACTION = 0.15  # a component with this much of a cell in each of two cells is two objects
BG_REFINE_DISTANCE = 10.0  # step 1's second pass: pixels whose smoothed distance from the background is below
# A shape is ambiguous when another shape fits within this many noise standard deviations (``shape_margin``).
# Measured on 300 held-out scenes x 9 conditions x 64 and 32 px (12,365 objects found with the right colour,
# 303 with a wrong shape): z < 2 flags no object of the clean, blurred (1.2 px) or noisy (8/255) renders at
# 64 px and leaves 17 of the 303 shape errors unflagged, while flagging 5.8% of all objects -- 2.4-7.1% under
# JPEG q40-45 4:2:0 at 64 px, 6.7% under blur 1.2 + noise 8 at 32 px and 18-30% under JPEG at 32 px, where
# the small objects' shapes are largely gone; z < 1 would leave 63 errors unflagged, z < 3 flag 7.9%.
SHAPE_AMBIGUITY_Z = 2.0
FAINT_THRESHOLD = 20.0  # step 2b: faint objects' smoothed distance from the background ...
FAINT_NOISE_FACTOR = 2.5  # ... or this x the background's median absolute deviation, if higher
# A faint candidate is an object if its best template (``templates.Fits.full``) fits it with at least this
# similarity at a shift of at most FAINT_MAX_SHIFT px -- FAINT_MIN_SIM_JPEG in images whose other objects
# show JPEG 4:2:0 (``templates.Fits.subsampling``). Measured at 32 px on 300 renders: real faint objects
# under blur 1.2 or 1.5 (+ noise 8) all fit within 0 px with >= 0.68 (0.60); JPEG q40 4:2:0 ringing, the
# bulk of spurious candidates (~1.5 per image at 32 px), mostly fits 3 px off, and within 1 px at up to
# 0.77 (95th percentile 0.65); at 64 px no spurious candidate exceeds 0.36.
FAINT_MIN_SIM = 0.55
FAINT_MIN_SIM_JPEG = 0.8
FAINT_MAX_SHIFT = 1
FEATURES_PER_CELL = 15
N_FEATURES = 9 * FEATURES_PER_CELL + 4


@dataclass(frozen=True)
class Detection:
    """What ``analyze`` finds in one image: the complete scene, per-object confidence (best template
    similarity, 1 = perfect), the feature vector used by FSD, the image's blur and, per object, whether its
    shape is ambiguous and by what margin (step 6)."""

    scene: Scene
    confidence: tuple[float, ...]
    features: np.ndarray
    blur: float | None = None  # the image's blur (sigma, px) as the template fit chose it; None: no objects
    # per object (as scene.objects): its shape is ambiguous -- another shape fits within SHAPE_AMBIGUITY_Z
    # noise standard deviations (``shape_margin``); the scene still names the best fit
    shape_ambiguous: tuple[bool, ...] = ()
    shape_margin: tuple[float, ...] = ()  # per object: ``shape_margin``'s z


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


def _median_u8(x: np.ndarray) -> np.ndarray:
    """``np.median(x, axis=0)`` of uint8 pixels x [N, 3] (N > 0), by per-channel histograms: float32 [3]."""
    n = len(x)
    out = np.empty(3, np.float32)
    for c in range(3):
        cum = np.cumsum(np.bincount(x[:, c], minlength=256))
        lo, hi = np.searchsorted(cum, [(n - 1) // 2 + 1, n // 2 + 1])  # the middle order statistic(s)
        out[c] = (lo + hi) / 2
    return out


def _refine_background(img8: np.ndarray, d2s: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Step 1 again, without the objects: the per-channel median of the pixels whose smoothed distance from
    ``bg`` is below BG_REFINE_DISTANCE (objects, their fringes and blurred halos left out; noise either way
    alike), when they are at least a quarter of the image, else ``bg``. Objects' pixels bias the median of
    a noisy image (by 3 levels at 32 px with two large objects and noise of std 8), and a biased background
    reads as coverage everywhere: it favoured the fuller of two nearly tied shapes."""
    keep = d2s < BG_REFINE_DISTANCE**2
    if keep.sum() < keep.size // 4:
        return bg
    return _median_u8(img8[keep])


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


def _foreground(diff: np.ndarray, res: int) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """Step 2's components: (foreground mask bool [res, res], labels int [res, res], number of labels, the
    smoothed image's squared distance from the background [res, res])."""
    smooth = ndimage.uniform_filter(diff, size=(3, 3, 1), mode="nearest")
    d2s = np.einsum("hwc,hwc->hw", smooth, smooth)
    fg = d2s > FG_THRESHOLD**2
    lab, n = ndimage.label(fg, structure=np.ones((3, 3), dtype=bool))
    if n:
        lab, n = _split_across_cells(lab, n, res)
    return fg, lab, n, d2s


def _faint_candidates(
    d2s: np.ndarray, objfg: np.ndarray, lab: np.ndarray, n: int, taken: set[int], noise: float
) -> tuple[np.ndarray, int, dict[int, int]]:
    """Step 2b: faint objects (a small object blurred at 32 px keeps a smoothed contrast of only ~25): the
    components of the smoothed image above FAINT_THRESHOLD (or FAINT_NOISE_FACTOR x the background's median
    absolute deviation ``noise``, if higher) that touch no object's pixel (``objfg``; specks may be part of
    them), are at least MIN_AREA_FRACTION of a cell and hold their centroid in a cell with no object
    (``taken``); the largest per cell. Returns
    (labels with each candidate added as a new component, their number, cell -> candidate's label). The
    caller keeps a candidate only if a template fits it (FAINT_MIN_SIM): noise and JPEG ringing fit none."""
    t = max(FAINT_THRESHOLD, FAINT_NOISE_FACTOR * noise)
    low = d2s > t * t
    low[objfg] = False
    res = len(d2s)
    free = np.ones(9, dtype=bool)
    free[list(taken)] = False
    if not (low & free[_cell_map(res)]).any():  # no candidate can hold its centroid in a free cell
        return lab, n, {}
    llab, ln = ndimage.label(low, structure=np.ones((3, 3), dtype=bool))
    # components touching an object are its fringes
    grown = ndimage.binary_dilation(objfg, structure=np.ones((3, 3), dtype=bool))
    touching = np.zeros(ln + 1, dtype=bool)
    touching[llab[grown]] = True
    areas, cy, cx = _centroids(llab, ln)
    cell = res / 3
    best: dict[int, int] = {}
    for k in range(ln):
        if touching[k + 1] or areas[k] < MIN_AREA_FRACTION * cell * cell:
            continue
        ci = min(2, max(0, int((cy[k] + 0.5) / cell))) * 3 + min(2, max(0, int((cx[k] + 0.5) / cell)))
        if ci not in taken and (ci not in best or areas[k] > areas[best[ci] - 1]):
            best[ci] = k + 1
    if not best:
        return lab, n, {}
    lab = lab.copy()
    out = {}
    for ci, k in best.items():
        n += 1
        lab[llab == k] = n
        out[ci] = n
    return lab, n, out


@lru_cache(maxsize=16)
def _coords(res: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of every pixel, flattened: float64 [res * res] each."""
    ys, xs = np.indices((res, res), dtype=np.float64)
    return ys.ravel(), xs.ravel()


def _centroids(lab: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Area, centroid row and column of components 1..n of ``lab``: float64 [n] each."""
    flat = lab.ravel()
    ys, xs = _coords(len(lab))
    areas = np.bincount(flat, minlength=n + 1)[1:].astype(np.float64)
    cy = np.bincount(flat, ys, minlength=n + 1)[1:] / np.maximum(areas, 1)
    cx = np.bincount(flat, xs, minlength=n + 1)[1:] / np.maximum(areas, 1)
    return areas, cy, cx


def _objects_by_cell(fg: np.ndarray, lab: np.ndarray, n: int, res: int) -> dict[int, list[int]]:
    """The components that are objects, by the grid cell (0..8) holding their centroid: specks (below
    MIN_AREA_FRACTION of a cell) are dropped."""
    areas, cy, cx = _centroids(lab, n)
    cell = res / 3
    cell_area = cell * cell
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
    # np.quantile(d_mine, 0.7) (linear interpolation), by partition
    pos = 0.7 * (len(d_mine) - 1)
    k = int(pos)
    part = np.partition(d_mine, [k, min(k + 1, len(d_mine) - 1)])
    q = part[k] + (pos - k) * (part[min(k + 1, len(d_mine) - 1)] - part[k])
    return np.median(im.diff[mine][d_mine >= q], axis=0) + im.bg


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
    """One object as measured, before the image-level choice of chroma model and blur."""

    cell: int  # its grid cell (0..8, row-major)
    color: int  # its palette colour
    area: float  # its foreground area as a fraction of the cell
    v: np.ndarray  # float32 [3]: its measured colour minus the background
    luma2: float  # squared luma contrast of its palette colour
    chroma2: float  # squared chroma contrast of its palette colour
    fits: templates.Fits  # its template fits


# The image-level chroma models: chroma as sharp as luma, weighted fully (renders, blur, noise); chroma
# down-weighted (JPEG 4:2:0 blurs and quantises it), plain or as 4:2:0 subsampling leaves it.
FULL, PLAIN, SUB = "full", "plain", "sub"


def _fit(f: _Found, model: str) -> templates.Fit:
    """An object's fit under an image-level chroma model (its plain one when it has no 4:2:0 fit)."""
    if model == FULL:
        return f.fits.full
    return f.fits.sub if model == SUB and f.fits.sub is not None else f.fits.plain


def _measure(im: _Image, ci: int, labels: list[int], n: int) -> _Found:
    """Steps 3 and 4 for the object made of components ``labels`` in cell ``ci``: colour, and the template
    fits of its full-coverage palette colour (offset like the background: a colour cast moves both). When
    its measured colour may stand for several palette colours (``color.color_candidates``: a blurred small
    object's core is diluted), the one whose fit leaves the least residual (chroma weighted fully) wins."""
    own = np.zeros(n + 1, dtype=bool)
    own[labels] = True
    mine = own[im.lab]
    p = _measured_color(im, mine)
    position = POSITION_NAMES[ci]
    dwin, others = _window(im, own, position)
    area = float(mine.sum()) / (im.res / 3) ** 2
    best = None
    for color in color_candidates(p, im.bg, im.bg_idx):
        full = PALETTE[color] + (im.bg - PALETTE[im.bg_idx]) - im.bg
        vp = YCC @ full
        luma2, chroma2 = float(vp[0] ** 2), float(vp[1:] @ vp[1:])
        fits = templates.fit(dwin, others, full, position, im.res)
        found = _Found(ci, color, area, p - im.bg, luma2, chroma2, fits)
        if best is None or found.fits.full.resid.min() < best.fits.full.resid.min():
            best = found
    return best


def _fits_faint(f: _Found, jpeg_like: bool) -> bool:
    """Whether a faint candidate is an object: its least-residual template (any blur) reaches FAINT_MIN_SIM
    (FAINT_MIN_SIM_JPEG if ``jpeg_like``) within FAINT_MAX_SHIFT pixels."""
    fit = f.fits.full
    b, k = fit.best()
    floor = FAINT_MIN_SIM_JPEG if jpeg_like else FAINT_MIN_SIM
    return fit.sim[b, k] >= floor and np.abs(fit.shift[b, k]).max() <= FAINT_MAX_SHIFT


def _choose_model(found: list[_Found]) -> tuple[str, int]:
    """The image's chroma model and blur (index in templates.TEMPLATE_BLURS). Chroma is taken for 4:2:0
    subsampled when, summed over the objects, the 4:2:0 version of their best templates fits it better
    than the templates do (``templates.Fits.subsampling``); then the model (PLAIN or SUB) and blur whose
    best templates leave the least residual summed over the objects win, else (FULL) the blur that does."""
    nb = len(templates.TEMPLATE_BLURS)
    if sum(f.fits.subsampling for f in found) <= 0:
        total = sum(f.fits.full.resid.min(1) for f in found)
        return FULL, int(np.argmin(total))
    for f in found:
        templates.fit_jpeg(f.fits, f.luma2 < CHROMA_WEIGHT * f.chroma2)
    total = np.zeros((2, nb))
    for f in found:
        total[0] += f.fits.plain.resid.min(1)
        total[1] += _fit(f, SUB).resid.min(1)
    hyp, blur = np.unravel_index(int(np.argmin(total)), total.shape)
    return (PLAIN, SUB)[int(hyp)], int(blur)


def _decide(im: _Image, f: _Found, model: str, blur: int) -> tuple[int, np.ndarray]:
    """Step 4's decision and step 5 for one object under the image's chroma model and blur: the index in
    templates.TEMPLATE_KEYS of its shape and size (least residual), and every template's similarity [16]."""
    fit = _fit(f, model)
    resid, sim = fit.resid[blur], fit.sim[blur]
    best = int(np.argmin(resid))
    per_shape = sim.reshape(len(SHAPES), len(SIZES)).max(1)
    if jpeg.suspect(per_shape, f.luma2, f.chroma2):
        rgb = PALETTE[f.color] + (im.bg - PALETTE[im.bg_idx])
        k = jpeg.rerank(im.img8, POSITION_NAMES[f.cell], im.bg, rgb, sim, fit.shift[blur].T, blur)
        best = best if k is None else k
    return best, sim


def shape_margin(f: _Found, fit: templates.Fit, model: str, blur: int, best: int) -> float:
    """How far the decided template ``best`` (under ``fit``, the image's chroma model and blur) fits better
    than the best template of any other shape, in noise standard deviations: z = (r2 - r1) / (2 sigma
    |s1 - s2|) for residuals r1, r2, the synthesised objects' difference |s1 - s2| (contrast x templates at
    their shifts) and the noise sigma^2 = r1 / (channels x window pixels) read off the residual itself
    (noise, JPEG error and misfit alike). For Gaussian noise r2 - r1 has mean |s1 - s2|^2 and standard
    deviation 2 sigma |s1 - s2| when ``best`` is right, so z ~ half the hypotheses' separation in noise
    standard deviations, plus noise; z < 0 when the JPEG re-ranking overruled the least residual."""
    resid = fit.resid[blur]
    n_shapes = len(SHAPES)
    per_shape = resid.reshape(n_shapes, len(SIZES))
    shape = best // len(SIZES)
    rival = min((s for s in range(n_shapes) if s != shape), key=lambda s: per_shape[s].min())
    k2 = rival * len(SIZES) + int(np.argmin(per_shape[rival]))
    r1, r2 = float(resid[best]), float(resid[k2])
    dwin, others, v, position, res = f.fits.window
    s1, s2 = fit.shift[blur, best], fit.shift[blur, k2]
    if (s1 == s2).all():  # |T1 - T2|^2 from the cached templates
        _, _, _, _, bank, tnorm = templates.cell_templates(position, res)
        diff2 = float(tnorm[blur, best] + tnorm[blur, k2] - 2 * bank[blur, best] @ bank[blur, k2])
    else:
        p, (h, w) = templates.MAX_SHIFT, dwin.shape[:2]
        padded = templates.padded_templates(position, res)[blur]
        placed = []
        for k, (dy, dx) in ((best, s1), (k2, s2)):
            dy, dx = int(np.clip(dy, -p, p)), int(np.clip(dx, -p, p))  # within +-p by construction
            m = np.zeros((h, w), np.float32)
            m[p + dy : h - p + dy, p + dx : w - p + dx] = padded[k, p : h - p, p : w - p]
            placed.append(m)
        diff2 = float(((placed[0] - placed[1]) ** 2).sum())
    n = float((~others).sum())
    if model == FULL:
        weight, channels = float(np.asarray(v) @ np.asarray(v)), 3.0
    else:
        weight, channels = f.luma2 + CHROMA_WEIGHT * f.chroma2, 1.0 + 2 * CHROMA_WEIGHT
    sep2 = weight * max(diff2, 0.0)
    sigma2 = max(r1, 1e-9) / (channels * n)
    return (r2 - r1) / (2.0 * math.sqrt(sigma2 * sep2) + 1e-12)


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
    bg = _median_u8(img8.reshape(-1, 3))
    fg, lab, n, d2s = _foreground(img - bg, res)
    bg = _refine_background(img8, d2s, bg)
    bg_idx = nearest_palette(bg)
    diff = img - bg
    feats = np.zeros(N_FEATURES, dtype=np.float32)
    feats[-3:] = bg / 255.0
    # image cleanliness: the median absolute deviation of background pixels from the background colour
    noise = float(np.median(np.abs(diff[~fg]))) if (~fg).any() else 0.0
    feats[-4] = 10.0 * noise / 255.0
    objects, conf, margins = [], [], []
    blur = None
    by_cell = _objects_by_cell(fg, lab, n, res) if n else {}
    is_object = np.zeros(n + 1, dtype=bool)
    for labels in by_cell.values():
        is_object[labels] = True
    objfg = is_object[lab]
    lab, n, faint = _faint_candidates(d2s, objfg, lab, n, set(by_cell), noise)
    for ci, k in faint.items():
        by_cell[ci] = [k]
    if n:
        kept = np.zeros(n + 1, dtype=bool)
        for labels in by_cell.values():
            kept[labels] = True
        pad = templates.MAX_SHIFT
        dist2 = np.einsum("hwc,hwc->hw", diff, diff)
        diffp = np.pad(diff, ((pad, pad), (pad, pad), (0, 0)))
        im = _Image(img8, bg, bg_idx, diff, lab, kept, dist2, diffp, np.pad(lab, pad))
        found = [_measure(im, ci, by_cell[ci], n) for ci in sorted(by_cell)]
        if faint:
            jpeg_like = sum(f.fits.subsampling for f in found if f.cell not in faint) > 0
            found = [f for f in found if f.cell not in faint or _fits_faint(f, jpeg_like)]
        if found:
            model, b = _choose_model(found)
            blur = templates.TEMPLATE_BLURS[b]
        for f in found:
            best, sim = _decide(im, f, model, b)
            shape, size = templates.TEMPLATE_KEYS[best]
            objects.append(Obj(shape, COLOR_NAMES[f.color], size, POSITION_NAMES[f.cell]))
            conf.append(float(sim[best]))
            margins.append(shape_margin(f, _fit(f, model), model, b, best))
            _cell_features(feats[f.cell * FEATURES_PER_CELL : (f.cell + 1) * FEATURES_PER_CELL], f, sim, best)
    scene = Scene(tuple(objects), COLOR_NAMES[bg_idx])
    ambiguous = tuple(z < SHAPE_AMBIGUITY_Z for z in margins)
    return Detection(scene, tuple(conf), feats, blur, ambiguous, tuple(margins))


def detect(image) -> Scene:
    """The complete scene found in ``image``: background and every object with its 4 attributes (it may
    hold 0 objects, or more than a prompt can state)."""
    return analyze(image).scene


def features(images) -> np.ndarray:
    """FSD features of images: float64 [N, N_FEATURES] (see the module docstring)."""
    return np.stack([analyze(im).features for im in images]).astype(np.float64)
