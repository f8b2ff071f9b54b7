"""Shapes benchmark evaluator: does an image show what its prompt asks for? Analytic, no training.

Detection (``detect(image) -> Scene``, a complete scene of everything found):

1. Background: the per-channel median of all pixels (objects cover at most ~25% of an image), named by the
   nearest palette colour.
2. Foreground: pixels of a 3x3 box-smoothed copy whose RGB distance from the background exceeds
   ``FG_THRESHOLD`` (well below the ~95 separating any two palette colours, well above smoothed noise);
   8-connected components smaller than ``MIN_AREA_FRACTION`` of a cell are dropped as specks; a component
   with at least ``SPLIT_AREA_FRACTION`` of a cell in each of several cells (neighbouring large objects whose
   blurred edges touch) is split along the cell borders; each remaining component goes to the grid cell
   holding its centroid (components in one cell are merged).
3. Colour: the median colour of the object's purest pixels (those farthest from the background). Edge
   pixels mix the object with the background, so a palette colour ``c`` is scored by the distance from
   ``c`` to the segment ``bg + t (p - bg)``, ``t`` in ``[1, 1 / MIN_PURITY]`` (``p`` the measured colour):
   the colour the pixels would have at full coverage. The background's own colour is never a candidate.
   When no palette colour is within ``COLOR_TOLERANCE`` of its segment, chroma may have been diluted more
   than luma (4:2:0 chroma subsampling of small objects): luma and chroma then get separate dilution factors.
4. Shape and size: the object's coverage ``alpha`` (projection of ``pixel - bg`` on ``p - bg``, other
   objects' pixels zeroed) is matched against the renderer's own coverage masks of the 8 shapes x 2 sizes
   at that cell, shifted by up to ``MAX_SHIFT`` pixels either way; the best Dice-style similarity
   ``2 <T, alpha> / (|T|^2 + |alpha|^2)`` wins. Objects that differ from the background mostly in chroma are
   also matched under a 4:2:0 hypothesis (JPEG as usually saved): with the palette colour's contrast, luma
   coverage against the templates and chroma coverage against what chroma subsampling (2x2 average, libjpeg's
   fancy upsampling, at the right block phase for each shift) leaves of them; the hypothesis fitting better
   decides.
5. JPEG re-ranking (analysis by synthesis, ``_jpeg_rerank``): when the best two shapes are within
   ``JPEG_MARGIN`` and the object's contrast is mostly chroma, JPEG q50 4:2:0 may have left too little of
   its outline to match; each shape (at the winning size, at its own best shift and at the renderer's
   position) is rendered on the measured background, put through a real JPEG round trip (PIL) inside the
   observed image's own 16x16 blocks, and the one reproducing the observed cell best wins -- provided the
   image shows JPEG's signature: the plain render leaves a residual above ``PLAIN_FLOOR`` and the round trip
   explains the cell ``1 / JPEG_EVIDENCE`` times better (not so for clean, blurred or noisy images).

Scoring (``score(detected, spec)``): prompted objects are matched one-to-one to detected ones (the
assignment agreeing on the most stated attributes and relations); ``correct`` is exactly
``satisfies(detected, spec)``: right number of objects, every stated attribute, relation and background.
Detected objects left unassigned are *extra* objects.

FSD (Frechet Shapes Distance): the Frechet distance between Gaussians fitted to evaluator features of two
image sets (``features``): per grid cell (row-major) 15 numbers -- foreground present (0/1), foreground area
as a fraction of the cell, measured colour minus background (RGB / 255, 3), best template similarity (how
clean the shape is), a softmax over the 8 shapes of their best similarities (8), and the probability of
"large" -- plus 10 x the median absolute deviation of background pixels from the background colour (/ 255,
how clean the image is) and the background colour (RGB / 255): 139 dimensions. ``evaluate`` compares the
generated images with renders of random scenes satisfying the same prompts (``complete_spec``). With a few
hundred images per set the estimate's own bias dominates (~0.5 between two independent sets of 500 real
renders); compare FSDs at equal N, preferably thousands.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from .captions import parse
from .render import (
    COLOR_NAMES,
    COLORS,
    POSITION_NAMES,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    cell_bounds,
    check_resolution,
    coverage,
    relation_holds,
    render,
    satisfies,
)

FG_THRESHOLD = 40.0  # RGB distance from the background (smoothed image) that makes a pixel foreground
MIN_AREA_FRACTION = 0.02  # components below this fraction of a cell's area are noise
SPLIT_AREA_FRACTION = 0.15  # a component with this much of a cell in each of two cells is two objects
MIN_PURITY = 0.6  # the purest pixels of an object are at least this much object (blur, antialiasing)
MIN_CHROMA_PURITY = 0.4  # 4:2:0 subsampling can leave a small object this little of its chroma
COLOR_TOLERANCE = 25.0  # beyond this RGB distance from every palette segment, allow chroma dilution
SUBSAMPLED_CHROMA_WEIGHT = 0.3  # chroma vs luma weight in the 4:2:0 hypothesis (chroma is quantised harder)
MAX_SHIFT = 3  # template search: +-MAX_SHIFT pixels in x and y
TEMPLATE_BLURS = ()  # templates are also matched Gaussian-blurred by these sigmas (pixels)
# Ambiguous shapes are re-ranked by simulated JPEG round trips (``_jpeg_rerank``)
JPEG_MARGIN = 0.05  # re-rank when the best two shapes' similarities are closer than this ...
JPEG_CHROMA_RATIO = 0.3  # ... and the object's squared luma contrast is below this x its squared chroma one
JPEG_QUALITY = 50  # quality of the simulated round trip (4:2:0 chroma subsampling, libjpeg's default)
JPEG_EVIDENCE = 0.25  # the round trip must explain the cell this much better than the plain render
PLAIN_FLOOR = 16.0  # mean squared RGB residual (4 levels RMS) within which the plain render explains a cell
ATTRIBUTES = ("shape", "color", "size", "position")
FEATURES_PER_CELL = 15
N_FEATURES = 9 * FEATURES_PER_CELL + 4
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

_PALETTE = np.array([COLORS[c] for c in COLOR_NAMES], dtype=np.float32)
# Coverage is projected in YCbCr with chroma down-weighted by CHROMA_WEIGHT: luminance survives blur and JPEG
# chroma subsampling best. _YCC_METRIC = M^T diag(w) M for the RGB -> YCbCr matrix M.
CHROMA_WEIGHT = 0.03
_YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
_YCC_METRIC = (_YCC.T @ np.diag([1.0, CHROMA_WEIGHT, CHROMA_WEIGHT]) @ _YCC).astype(np.float32)
_PAL_YCC = _PALETTE @ _YCC.T.astype(np.float32)
_METRICS = (np.eye(3, dtype=np.float32), _YCC_METRIC)
_TEMPLATE_KEYS = tuple((s, z) for s in SHAPES for z in SIZES)


# ----------------------------------------------------------------------------------------------------------
# Detection


def _upsample2(c: np.ndarray, axis: int) -> np.ndarray:
    """libjpeg's "fancy" 2x upsampling along ``axis``: out[2i] = (3 c[i] + c[i-1]) / 4, out[2i+1] =
    (3 c[i] + c[i+1]) / 4, edges replicated."""
    c = np.moveaxis(c, axis, -1)
    prev = np.concatenate([c[..., :1], c[..., :-1]], -1)
    nxt = np.concatenate([c[..., 1:], c[..., -1:]], -1)
    out = np.empty((*c.shape[:-1], 2 * c.shape[-1]), c.dtype)
    out[..., 0::2] = (3 * c + prev) / 4
    out[..., 1::2] = (3 * c + nxt) / 4
    return np.moveaxis(out, -1, axis)


def _chroma420(x: np.ndarray) -> np.ndarray:
    """What 4:2:0 chroma subsampling leaves of full-resolution planes x [..., H, W] (H, W even): 2x2 box
    average, then fancy upsampling."""
    h, w = x.shape[-2:]
    s = x.reshape(*x.shape[:-2], h // 2, 2, w // 2, 2).mean((-3, -1))
    return _upsample2(_upsample2(s, -2), -1)


@lru_cache(maxsize=64)
def _templates(position: str, res: int):
    """Cell bounds, the 16 coverage templates of ``position`` at ``res`` and their 4:2:0 chroma versions:
    (r0, r1, c0, c1, T [16, h*w], |T|^2 [16], C [2, 2, 16, h*w], |C|^2 [2, 2, 16]). ``C[py, px]`` is what
    chroma subsampling leaves of the templates shifted by an amount of parity (py, px), shifted back (the
    result depends on the phase of the 2x2 blocks)."""
    r0, r1, c0, c1 = cell_bounds(position, res)
    h, w = r1 - r0, c1 - c0
    t = np.zeros((len(_TEMPLATE_KEYS), h, w), dtype=np.float32)
    for k, (shape, size) in enumerate(_TEMPLATE_KEYS):
        a0, a1, b0, b1, m = coverage(shape, size, position, res)
        y0, y1, x0, x1 = max(a0, r0), min(a1, r1), max(b0, c0), min(b1, c1)
        t[k, y0 - r0 : y1 - r0, x0 - c0 : x1 - c0] = m[y0 - a0 : y1 - a0, x0 - b0 : x1 - b0, 0]
    n = res + 2 + res % 2
    tc = np.zeros((2, 2, len(t), h * w), dtype=np.float32)
    for py in range(2):
        for px in range(2):
            canvas = np.zeros((len(t), n, n), dtype=np.float32)
            canvas[:, r0 + py : r1 + py, c0 + px : c1 + px] = t
            tc[py, px] = _chroma420(canvas)[:, r0 + py : r1 + py, c0 + px : c1 + px].reshape(len(t), -1)
    bank = [t] + [ndimage.gaussian_filter(t, (0, b, b), mode="constant") for b in TEMPLATE_BLURS]
    t = np.concatenate(bank).reshape(len(bank) * len(t), -1)
    t.setflags(write=False)
    tc.setflags(write=False)
    return r0, r1, c0, c1, t, (t * t).sum(1), tc, (tc * tc).sum(-1)


def _nearest_color(p: np.ndarray, bg: np.ndarray, exclude: int | None) -> int:
    """Index of the palette colour nearest the segment bg + t (p - bg), t in [1, 1 / MIN_PURITY]. When
    none is within COLOR_TOLERANCE, chroma may have been diluted more than luma (4:2:0 subsampling): then
    in YCbCr p - bg may be a (c - bg) in luma and b (c - bg) in chroma, a in [MIN_PURITY, 1], b in
    [MIN_CHROMA_PURITY, a]."""
    v = p - bg
    vv = float(v @ v)
    if vv < 1e-6:
        d = np.linalg.norm(_PALETTE - p, axis=1)
    else:
        t = np.clip(((_PALETTE - bg) @ v) / vv, 1.0, 1.0 / MIN_PURITY)
        d = np.linalg.norm(_PALETTE - (bg + t[:, None] * v), axis=1)
    if exclude is not None:
        d[exclude] = np.inf
    best = int(np.argmin(d))
    if d[best] <= COLOR_TOLERANCE:
        return best
    u = _YCC @ v
    dd = _PAL_YCC - _YCC @ bg  # [K, 3]
    dy, dc = dd[:, 0], dd[:, 1:]
    a = np.clip(u[0] * dy / np.maximum(dy * dy, 1e-6), MIN_PURITY, 1.0)
    b = np.clip((dc @ u[1:]) / np.maximum((dc * dc).sum(1), 1e-6), MIN_CHROMA_PURITY, 1.0)
    b = np.minimum(b, np.maximum(a, MIN_CHROMA_PURITY))
    dist = (u[0] - a * dy) ** 2 + ((u[1:][None, :] - b[:, None] * dc) ** 2).sum(1)
    if exclude is not None:
        dist[exclude] = np.inf
    return int(np.argmin(dist))


@lru_cache(maxsize=1)
def _shift_offsets() -> tuple[np.ndarray, np.ndarray]:
    """The (dy, dx) of each row of the template search's similarity matrices, int [rows, 2]: the plain
    search's (per metric of _METRICS, shifts row-major) and the 4:2:0 search's (by parity of dy, then of dx,
    each parity's shifts row-major); |dy|, |dx| <= MAX_SHIFT."""
    p = MAX_SHIFT
    d = np.arange(-p, p + 1)
    plain = np.stack(np.meshgrid(d, d, indexing="ij"), -1).reshape(-1, 2)
    parity = []
    for py in range(2):
        for px in range(2):
            dy, dx = d[(p + py) % 2 :: 2], d[(p + px) % 2 :: 2]
            parity.append(np.stack(np.meshgrid(dy, dx, indexing="ij"), -1).reshape(-1, 2))
    plain = np.tile(plain, (len(_METRICS), 1))
    plain.setflags(write=False)
    parity = np.concatenate(parity)
    parity.setflags(write=False)
    return plain, parity


@lru_cache(maxsize=64)
def _padded_templates(position: str, res: int) -> np.ndarray:
    """The 16 coverage templates of ``position`` zero-padded by MAX_SHIFT: float32 [16, h + 2p, w + 2p] with
    p = MAX_SHIFT; ``[k, p - dy : p - dy + h, p - dx : p - dx + w]`` is template k displaced by (dy, dx)."""
    r0, r1, c0, c1, tmpl, *_ = _templates(position, res)
    h, w, p = r1 - r0, c1 - c0, MAX_SHIFT
    out = np.pad(tmpl[: len(_TEMPLATE_KEYS)].reshape(-1, h, w), ((0, 0), (p, p), (p, p)))
    out.setflags(write=False)
    return out


def _mcu_crop(position: str, res: int) -> tuple[int, int, int, int]:
    """Rows [y0, y1) and columns [x0, x1) of the whole 16x16 JPEG MCUs (4:2:0) that hold ``position``'s
    cell, clipped to the image."""
    r0, r1, c0, c1 = cell_bounds(position, res)
    return (r0 // 16) * 16, min(res, -(-r1 // 16) * 16), (c0 // 16) * 16, min(res, -(-c1 // 16) * 16)


def _candidate_cells(
    img8: np.ndarray,
    position: str,
    background: np.ndarray,
    colors: np.ndarray,
    candidates: list[tuple[int, int, int]],
) -> np.ndarray:
    """Each candidate explanation of the object in ``position``'s cell, rendered like ``render`` does (the
    coverage template over ``background``, rounded to uint8) into the observed image cropped to whole MCUs
    (``_mcu_crop``), edge-replicated to a multiple of 16 pixels as a JPEG encoder does: uint8 [K, H, W, 3].

    ``candidates``: K (template index, dy, dx), |dy|, |dx| <= MAX_SHIFT; ``colors`` [K, 3]: their RGB."""
    res = img8.shape[0]
    r0, r1, c0, c1 = cell_bounds(position, res)
    y0, y1, x0, x1 = _mcu_crop(position, res)
    h, w, p = r1 - r0, c1 - c0, MAX_SHIFT
    padded = _padded_templates(position, res)
    hh, ww = -(-(y1 - y0) // 16) * 16, -(-(x1 - x0) // 16) * 16
    crop = img8[y0:y1, x0:x1]
    if crop.shape[:2] != (hh, ww):
        crop = np.pad(crop, ((0, hh - (y1 - y0)), (0, ww - (x1 - x0)), (0, 0)), mode="edge")
    tiles = np.repeat(crop[None], len(candidates), axis=0)  # [K, H, W, 3]
    masks = np.stack([padded[k, p - dy : p - dy + h, p - dx : p - dx + w] for k, dy, dx in candidates])
    bg = np.asarray(background, np.float32)
    cells = bg + masks[..., None] * (np.asarray(colors, np.float32)[:, None, None, :] - bg)  # [K, h, w, 3]
    tiles[:, r0 - y0 : r1 - y0, c0 - x0 : c1 - x0] = np.clip(np.floor(cells + 0.5), 0, 255)
    return tiles


def _jpeg_round_trip(tiles: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    """``tiles`` (uint8 [K, H, W, 3], H and W multiples of 16) after JPEG compression at ``quality`` with
    4:2:0 chroma subsampling and decoding (PIL's libjpeg), the K tiles side by side in one image: uint8
    [K, H, W, 3]. Tiles are whole MCUs, so each tile's DCT blocks and chroma samples are its own; only
    libjpeg's "fancy" chroma upsampling reads across a tile border (the tiles' outermost pixel columns)."""
    from PIL import Image

    k, h, w, _ = tiles.shape
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(tiles.transpose(1, 0, 2, 3)).reshape(h, k * w, 3)).save(
        buf, format="JPEG", quality=quality, subsampling=2
    )
    buf.seek(0)
    with Image.open(buf) as im:
        out = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    return out.reshape(h, k, w, 3).transpose(1, 0, 2, 3)


def _jpeg_rerank(
    img8: np.ndarray,
    position: str,
    background: np.ndarray,
    color: np.ndarray,
    sim: np.ndarray,
    shift: np.ndarray,
) -> int | None:
    """Analysis by synthesis for an object whose best shapes are nearly tied (JPEG 4:2:0 at 64 px leaves a
    small object that differs from the background mostly in chroma a blurred, quantised outline): render each
    shape at the best template's size and ``color`` on ``background``, put it through a JPEG round trip
    (``_jpeg_round_trip``) and keep the one that reproduces the observed cell best (least mean squared RGB
    residual), in the spirit of analysis-by-synthesis (Yuille & Kersten 2006, "Vision as Bayesian
    inference: analysis by synthesis?", Trends Cogn. Sci. 10(7)).

    Each shape is tried at its own best template shift (``shift`` [2, 16]: dy, dx) and at the renderer's
    position (no shift). Returns the winning template index, or None when the image shows no sign of JPEG
    compression: the plain render explains the cell within PLAIN_FLOOR, or the round trip does not explain it
    JPEG_EVIDENCE times better than the plain render does (blur, noise, another codec)."""
    res = img8.shape[0]
    r0, r1, c0, c1 = cell_bounds(position, res)
    y0, _, x0, _ = _mcu_crop(position, res)
    window = (slice(None), slice(r0 - y0, r1 - y0), slice(c0 - x0, c1 - x0))
    obs = img8[r0:r1, c0:c1].astype(np.float32)
    best = int(np.argmax(sim))
    rgb = np.asarray(color, np.float32)[None]  # [1, 3]
    p, dy, dx = MAX_SHIFT, int(shift[0, best]), int(shift[1, best])
    m = _padded_templates(position, res)[best, p - dy : p - dy + r1 - r0, p - dx : p - dx + c1 - c0, None]
    if ((np.floor(background + m * (rgb - background) + 0.5) - obs) ** 2).mean() <= PLAIN_FLOOR:
        return None  # the template match's winner, rendered, explains the cell: the usual (clean) case
    keys = [k for k in range(len(_TEMPLATE_KEYS)) if k % len(SIZES) == best % len(SIZES)]
    cands = list(
        dict.fromkeys([(k, int(shift[0, k]), int(shift[1, k])) for k in keys] + [(k, 0, 0) for k in keys])
    )
    tiles = _candidate_cells(img8, position, background, np.repeat(rgb, len(cands), axis=0), cands)
    plain = ((tiles[window] - obs) ** 2).mean((1, 2, 3))  # [K]
    if plain.min() <= PLAIN_FLOOR:
        return None
    jpeg = ((_jpeg_round_trip(tiles)[window] - obs) ** 2).mean((1, 2, 3))  # [K]
    if jpeg.min() >= JPEG_EVIDENCE * plain.min():
        return None
    return cands[int(np.argmin(jpeg))][0]


@dataclass(frozen=True)
class Detection:
    """What ``analyze`` finds in one image: the complete scene, per-object confidence (best template
    similarity, 1 = perfect) and the feature vector used by FSD."""

    scene: Scene
    confidence: tuple[float, ...]
    features: np.ndarray


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


def analyze(image) -> Detection:
    """Detect the scene of one image (uint8 HxWx3, square, 32..512 pixels); see the module docstring."""
    img8 = _as_rgb(image)
    res = check_resolution(img8.shape[0])
    img = img8.astype(np.float32)
    flat = img.reshape(-1, 3)
    bg = np.median(flat, axis=0).astype(np.float32)
    bg_idx = int(np.argmin(np.linalg.norm(_PALETTE - bg, axis=1)))
    diff = img - bg
    smooth = ndimage.uniform_filter(diff, size=(3, 3, 1), mode="nearest")
    fg = np.einsum("hwc,hwc->hw", smooth, smooth) > FG_THRESHOLD**2
    lab, n = ndimage.label(fg, structure=np.ones((3, 3), dtype=bool))
    if n:
        lab, n = _split_across_cells(lab, n, res)
    feats = np.zeros(N_FEATURES, dtype=np.float32)
    feats[-3:] = bg / 255.0
    # image cleanliness: 10 x the median absolute deviation of background pixels from the background colour
    feats[-4] = 10.0 * float(np.median(np.abs(diff[~fg]))) / 255.0 if (~fg).any() else 0.0
    objects, conf = [], []
    if n:
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
        kept = np.zeros(n + 1, dtype=bool)
        for labels in by_cell.values():
            kept[labels] = True
        dist2 = np.einsum("hwc,hwc->hw", diff, diff)
        pad = MAX_SHIFT
        diffp = np.pad(diff, ((pad, pad), (pad, pad), (0, 0)))
        labp = np.pad(lab, pad)
        for ci in sorted(by_cell):
            labels = by_cell[ci]
            own = np.zeros(n + 1, dtype=bool)
            own[labels] = True
            mine = own[lab]
            d_mine = dist2[mine]
            top = d_mine >= np.quantile(d_mine, 0.7)
            p = np.median(diff[mine][top], axis=0) + bg
            color = _nearest_color(p, bg, bg_idx)
            v = p - bg
            position = POSITION_NAMES[ci]
            r0, r1, c0, c1, tmpl, tnorm, tmplc, tnormc = _templates(position, res)
            h, w = r1 - r0, c1 - c0
            dwin = diffp[r0 : r1 + 2 * pad, c0 : c1 + 2 * pad]
            others = (
                kept[labp[r0 : r1 + 2 * pad, c0 : c1 + 2 * pad]]
                & ~own[labp[r0 : r1 + 2 * pad, c0 : c1 + 2 * pad]]
            )
            nk = len(_TEMPLATE_KEYS)
            plain_offsets, parity_offsets = _shift_offsets()
            scores = []  # per metric: similarity of every template at every shift [shifts, nk]
            for metric in _METRICS:
                wv = metric @ v
                win = np.clip((dwin @ wv) / max(float(v @ wv), 1e-6), -0.25, 1.0)
                win[others] = 0.0
                views = np.lib.stride_tricks.sliding_window_view(win, (h, w)).reshape(-1, h * w)
                wnorm = float((win * win).sum())
                dots = views @ tmpl.T  # [shifts, bank * templates]
                sc = 2 * dots / (tnorm[None, :] + wnorm)
                scores.append(sc if len(tnorm) == nk else sc.reshape(len(views), -1, nk).max(1))
            scores = np.concatenate(scores)  # [metrics * shifts, nk]
            offsets = plain_offsets  # the (dy, dx) of each row
            sim = scores.max(0)
            # 4:2:0 hypothesis for objects that differ from the background mostly in chroma
            vp = _PALETTE[color] - bg  # the full-coverage colour: the measured one is diluted by subsampling
            vy = float(_YCC[0] @ vp)
            vc = _YCC[1:] @ vp
            vcc = float(vc @ vc)
            if vy * vy < CHROMA_WEIGHT * vcc:
                # luma against the sharp templates, chroma against their subsampled versions, each weighted
                # by its squared contrast (chroma by SUBSAMPLED_CHROMA_WEIGHT: quantised harder)
                wy, wc = vy * vy, SUBSAMPLED_CHROMA_WEIGHT * vcc
                ac = np.clip((dwin @ (_YCC[1:].T @ vc).astype(np.float32)) / vcc, -0.25, 1.0)
                ay = np.clip((dwin @ _YCC[0].astype(np.float32)) / vy, -0.25, 1.0) if wy > 1e-6 else 0 * ac
                ac[others] = 0.0
                ay[others] = 0.0
                views = np.lib.stride_tricks.sliding_window_view(ac, (h, w))
                viewy = np.lib.stride_tricks.sliding_window_view(ay, (h, w))
                wnorm = wc * float((ac * ac).sum()) + wy * float((ay * ay).sum())
                scores_c = []  # [shifts, nk] by shift parity (the phase of the 2x2 chroma blocks)
                for py in range(2):
                    for px in range(2):
                        sl = (slice((pad + py) % 2, None, 2), slice((pad + px) % 2, None, 2))
                        dots = wc * (views[sl].reshape(-1, h * w) @ tmplc[py, px].T)
                        dots += wy * (viewy[sl].reshape(-1, h * w) @ tmpl[:nk].T)
                        tn = wc * tnormc[py, px] + wy * tnorm[:nk]
                        scores_c.append(2 * dots / (tn[None, :] + wnorm))
                scores_c = np.concatenate(scores_c)
                s_c = scores_c.max(0)
                if s_c.max() > sim.max():
                    sim, scores, offsets = s_c, scores_c, parity_offsets
            best = int(np.argmax(sim))
            per_shape = sim.reshape(len(SHAPES), len(SIZES)).max(1)
            if vy * vy < JPEG_CHROMA_RATIO * vcc:  # mostly-chroma contrast ...
                second, first = np.partition(per_shape, -2)[-2:]
                if first - second < JPEG_MARGIN:  # ... and a near tie: JPEG 4:2:0 may be to blame
                    # the palette colour, offset like the background (a colour cast moves both)
                    rgb = _PALETTE[color] + (bg - _PALETTE[bg_idx])
                    shift = offsets[scores.argmax(0)].T  # [2, nk]: each template's best (dy, dx)
                    k = _jpeg_rerank(img8, position, bg, rgb, sim, shift)
                    best = best if k is None else k
            shape, size = _TEMPLATE_KEYS[best]
            objects.append(Obj(shape, COLOR_NAMES[color], size, position))
            conf.append(float(sim[best]))
            # features
            f = feats[ci * FEATURES_PER_CELL : (ci + 1) * FEATURES_PER_CELL]
            e = np.exp(20.0 * (per_shape - per_shape.max()))
            per_size = sim.reshape(len(SHAPES), len(SIZES)).max(0)
            f[0] = 1.0
            f[1] = float(mine.sum()) / cell_area
            f[2:5] = v / 255.0
            f[5] = sim[best]
            f[6:14] = e / e.sum()
            f[14] = 1.0 / (1.0 + math.exp(-20.0 * (per_size[1] - per_size[0])))  # P(large)
    scene = Scene(tuple(objects), COLOR_NAMES[bg_idx])
    return Detection(scene, tuple(conf), feats)


def detect(image) -> Scene:
    """The complete scene found in ``image``: background and every object with its 4 attributes (it may
    hold 0 objects, or more than a prompt can state)."""
    return analyze(image).scene


def features(images) -> np.ndarray:
    """FSD features of images: float64 [N, N_FEATURES] (see the module docstring)."""
    return np.stack([analyze(im).features for im in images]).astype(np.float64)


# ----------------------------------------------------------------------------------------------------------
# Scoring


def _assign(detected: Scene, spec: Scene) -> tuple[tuple[int | None, ...], int]:
    """The one-to-one assignment of spec objects to detected objects (None = missing) that agrees on the
    most stated attributes and relations; returns (assignment, its score)."""
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
        s = 0
        for k, w in enumerate(want):
            j = perm[k]
            if j is None:
                continue
            o = det[j]
            s += 2 * (o.shape == w.shape) + 2 * (o.color == w.color) + 1
            s += (w.size is not None and o.size == w.size) + (
                w.position is not None and o.position == w.position
            )
        for i, rel, j in spec.relations:
            if (
                perm[i] is not None
                and perm[j] is not None
                and relation_holds(det[perm[i]], rel, det[perm[j]])
            ):
                s += 1
        if s > best_score:
            best, best_score = perm, s
    return best, best_score


def score(detected: Scene, spec: Scene) -> dict:
    """Judge a detected (complete) scene against a prompt's partial spec.

    Returns ``{"correct", "count", "extra", "background", "objects", "relations"}``: ``correct`` =
    ``satisfies(detected, spec)``; ``count``: as many objects found as prompted; ``extra``: detected objects
    no prompted object is assigned to; ``background``: None if unstated; ``objects``: per prompted object
    ``{"present", "shape", "color", "size", "position", "found"}`` (size/position None when unstated,
    ``found`` the assigned detected object's dict or None); ``relations``: one bool per stated relation.
    """
    perm, _ = _assign(detected, spec)
    det = detected.objects
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
    }


# ----------------------------------------------------------------------------------------------------------
# Statistics


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n (95% for the default z); (0, 1) when n == 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _rate(k: int, n: int) -> dict:
    lo, hi = wilson(k, n)
    return {"rate": k / n if n else None, "k": int(k), "n": int(n), "ci95": [lo, hi]}


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    s1, s2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # rank-deficient covariances are fine here
        covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        off = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    covmean = np.real(covmean)
    return float(max(0.0, diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)))


def fsd(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet Shapes Distance between two feature sets [N, D] (from ``features``); needs N >= 2 each."""
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


# ----------------------------------------------------------------------------------------------------------
# Reports


def _empty_confusion() -> dict:
    return {a: {} for a in ("shape", "color", "size", "position", "background")}


def _confuse(conf: dict, attr: str, want: str, got: str) -> None:
    row = conf[attr].setdefault(want, {})
    row[got] = row.get(got, 0) + 1


def evaluate(images, prompts, names=None, reference: bool = True, seed: int = 0) -> dict:
    """Score images against prompts (caption strings, or partial ``Scene`` specs); see ``evaluate_folder``
    for the report's layout. Prompts the grammar cannot parse are counted in ``unparsed``, never scored.
    ``reference=True`` adds ``fsd``: generated images vs renders of random scenes satisfying the same
    prompts, at the images' resolution."""
    images = list(images)
    prompts = list(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    names = list(names) if names is not None else [str(i) for i in range(len(images))]
    counts = {"correct": 0, "count": 0, "no_extra": 0, "n": 0}
    by_n = {k: [0, 0] for k in (1, 2, 3)}
    attr = {a: [0, 0] for a in ("present", *ATTRIBUTES, "relation", "background")}
    count_prompts = [0, 0]
    conf = _empty_confusion()
    unparsed, records, feats, specs_ok = [], [], [], []
    for img, prompt, name in zip(images, prompts, names, strict=True):
        spec = prompt if isinstance(prompt, Scene) else parse(prompt)
        text = prompt if isinstance(prompt, str) else None
        if spec is None:
            unparsed.append({"file": name, "prompt": text})
            continue
        d = analyze(img)
        s = score(d.scene, spec)
        counts["n"] += 1
        counts["correct"] += s["correct"]
        counts["count"] += s["count"]
        counts["no_extra"] += s["extra"] == 0
        n_obj = len(spec.objects)
        by_n[n_obj][0] += s["correct"]
        by_n[n_obj][1] += 1
        if len({(o.shape, o.color) for o in spec.objects}) < n_obj:  # a counting prompt
            count_prompts[0] += s["count"]
            count_prompts[1] += 1
        n_wrong = 0
        for w, o in zip(spec.objects, s["objects"], strict=True):
            found = o["found"]
            for a in ("present", *ATTRIBUTES):
                if o[a] is None:
                    continue
                attr[a][0] += bool(o[a])
                attr[a][1] += 1
                n_wrong += not o[a]
                if a != "present":
                    _confuse(conf, a, getattr(w, a), found[a] if found else "missing")
        for ok in s["relations"]:
            attr["relation"][0] += ok
            attr["relation"][1] += 1
            n_wrong += not ok
        if s["background"] is not None:
            attr["background"][0] += s["background"]
            attr["background"][1] += 1
            n_wrong += not s["background"]
            _confuse(conf, "background", spec.background, d.scene.background)
        n_wrong += s["extra"] + abs(len(d.scene.objects) - n_obj) * (not s["count"])
        feats.append(d.features)
        specs_ok.append(spec)
        if not s["correct"]:
            records.append(
                {
                    "file": name,
                    "prompt": text,
                    "wanted": spec.to_dict(),
                    "detected": d.scene.to_dict(),
                    "errors": n_wrong,
                    "extra": s["extra"],
                    "_image": img,
                }
            )
    n = counts["n"]
    report = {
        "all_correct": counts["correct"] / n if n else 0.0,
        "n": n,
        "all_correct_ci95": list(wilson(counts["correct"], n)),
        "by_objects": {str(k): _rate(*v) for k, v in by_n.items()},
        "attributes": {a: _rate(*v) for a, v in attr.items()},
        "counting": _rate(counts["count"], n),
        "counting_prompts": _rate(*count_prompts),
        "no_extra_objects": _rate(counts["no_extra"], n),
        "confusion": conf,
        "unparsed": {"count": len(unparsed), "items": unparsed},
    }
    if reference and len(feats) >= 2:
        rng = np.random.default_rng(seed)
        res = np.asarray(images[0]).shape[0]
        ref = [render(complete_spec(sp, rng), res) for sp in specs_ok]
        report["fsd"] = fsd(np.stack(feats), features(ref))
    records.sort(key=lambda r: -r["errors"])
    report["failures"] = records
    return report


def _read_prompts(folder: Path, files: list[Path]) -> dict[str, str]:
    prompts: dict[str, str] = {}
    meta = folder / "metadata.jsonl"
    if meta.exists():
        for line in meta.read_text().splitlines():
            if line.strip():
                try:
                    rec = json.loads(line)
                    prompts[str(rec["file_name"])] = str(rec["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
    for f in files:
        rel = f.relative_to(folder).as_posix()
        if rel not in prompts and f.with_suffix(".txt").exists():
            prompts[rel] = f.with_suffix(".txt").read_text().strip()
    return prompts


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


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


def evaluate_folder(
    images_dir,
    json_path=None,
    grid_path=None,
    size: int = 64,
    max_failures: int = 64,
    reference: bool = True,
) -> dict:
    """Evaluate a folder of generated images against their prompts (the CLI's entry point).

    Prompts come from ``metadata.jsonl`` (``file_name``, ``text``) or a ``.txt`` beside each image. Images of
    another size than ``size`` are resized (Lanczos) with a warning; unreadable image files and images
    without a prompt are listed and skipped; prompts the grammar cannot parse are counted in ``unparsed``.

    The report: ``all_correct`` (rate in [0, 1]) with ``all_correct_ci95`` (Wilson), ``n`` (images scored),
    ``by_objects`` ("1", "2", "3" prompted objects), ``attributes`` (present, shape, color, size, position,
    relation, background: rate, k, n, ci95), ``counting``, ``counting_prompts``, ``no_extra_objects``,
    ``confusion`` (attribute -> prompted -> detected -> count; "missing" when no object was found),
    ``fsd``, ``unparsed``, ``unreadable``, ``missing_prompt``, ``resized``, and ``failures`` (worst first).
    With ``json_path`` the report is written there, and a PNG grid of the worst ``max_failures`` failures
    (in ``failures`` order) to ``grid_path`` (default: beside the JSON, ``<stem>_failures.png``); both
    atomically.
    """
    from PIL import Image

    folder = Path(images_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"not a directory: {folder}")
    size = check_resolution(size)
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
    if resized:
        warnings.warn(
            f"{len(resized)} image(s) are not {size}x{size} and were resized (e.g. {resized[0]})",
            stacklevel=2,
        )
    report = evaluate(images, texts, names, reference=reference)
    report["unreadable"] = unreadable
    report["missing_prompt"] = missing
    report["resized"] = len(resized)
    report["images_dir"] = str(folder)
    fails = report["failures"]
    grid_imgs = [r.pop("_image") for r in fails]
    if json_path is not None or grid_path is not None:
        if grid_path is None:
            jp = Path(json_path)
            grid_path = jp.with_name(jp.stem + "_failures.png")
        grid_path = Path(grid_path)
        buf = io.BytesIO()
        Image.fromarray(failure_grid(grid_imgs[:max_failures])).save(buf, format="PNG")
        _atomic_write(grid_path, buf.getvalue())
        report["failure_grid"] = str(grid_path)
    if json_path is not None:
        _atomic_write(Path(json_path), (json.dumps(report, indent=2) + "\n").encode())
    return report


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
    if "fsd" in report:
        lines.append(f"  {'FSD':<22} {report['fsd']:8.4f}")
    extras = []
    u = report["unparsed"]["count"]
    if u:
        extras.append(f"{u} unparsed prompt(s)")
    for key, what in (("unreadable", "unreadable file(s)"), ("missing_prompt", "image(s) without prompt")):
        if report.get(key):
            extras.append(f"{len(report[key])} {what}")
    if report.get("resized"):
        extras.append(f"{report['resized']} resized image(s)")
    if extras:
        lines.append("  skipped/notes: " + ", ".join(extras))
    for a in ("shape", "color", "size", "position", "background"):
        errs = [(c, w, g) for w, row_ in report["confusion"][a].items() for g, c in row_.items() if g != w]
        if errs:
            errs.sort(reverse=True)
            top = ", ".join(f"{w}->{g} x{c}" for c, w, g in errs[:5])
            lines.append(f"  {a} confusions: {top}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Degradations (what generated images look like), for tests and benchmarks

DEGRADATIONS = ("blur", "noise", "jpeg", "jpeg420", "color", "shift", "affine")


def degrade(img: np.ndarray, kind: str, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """``img`` (uint8 HxWx3) degraded like a generated image; ``strength`` 1 = the benchmark's maximum:
    blur: Gaussian sigma 1 px; noise: additive Gaussian, std 0.05 of full range; jpeg: quality 50,
    full-resolution chroma (4:4:4); jpeg420: quality 50 with chroma subsampled 2x (the libjpeg default;
    at 64 px it erases the shape of small objects that differ from the background mostly in chroma);
    color: per-channel
    offsets uniform in +-15; shift: integer offsets in +-2 px; affine: scale 1 +- 3%, rotation +-3 degrees,
    sub-pixel shift +-1 px (bilinear); "all": affine, shift, blur, color, noise, jpeg in turn."""
    from PIL import Image

    x = img.astype(np.float32)
    if kind == "all":
        for k in ("affine", "shift", "blur", "color", "noise", "jpeg"):
            img = degrade(img, k, rng, strength)
        return img
    if kind == "blur":
        x = ndimage.gaussian_filter(x, sigma=(strength, strength, 0), mode="nearest")
    elif kind == "noise":
        x = x + rng.normal(0, 0.05 * 255 * strength, x.shape)
    elif kind in ("jpeg", "jpeg420"):
        q = int(round(100 - 50 * strength))
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=q, subsampling=0 if kind == "jpeg" else 2)
        buf.seek(0)
        return np.asarray(Image.open(buf).convert("RGB"))
    elif kind == "color":
        x = x + rng.uniform(-15, 15, 3) * strength
    elif kind == "shift":
        m = max(1, int(round(2 * strength)))
        dy, dx = rng.integers(-m, m + 1, 2)
        x = ndimage.shift(x, (dy, dx, 0), order=0, mode="nearest")
    elif kind == "affine":
        s = 1 + rng.uniform(-0.03, 0.03) * strength
        a = np.deg2rad(rng.uniform(-3, 3) * strength)
        t = rng.uniform(-1, 1, 2) * strength
        m = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) / s
        c = (np.array(img.shape[:2]) - 1) / 2
        off = c - m @ (c + t)
        x = np.stack(
            [ndimage.affine_transform(x[..., k], m, off, order=1, mode="nearest") for k in range(3)], -1
        )
    else:
        raise ValueError(f"unknown degradation {kind!r}; expected one of {', '.join(DEGRADATIONS)}, all")
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def perturb(spec: Scene, rng: np.random.Generator) -> Scene | None:
    """``spec`` with one stated attribute changed (shape, colour, size, position, background or a relation
    flipped), or None if nothing can be changed. The result no longer describes scenes the original did
    only if it contradicts them -- ``satisfies`` decides; tests check that it does."""
    opts = []
    for k, o in enumerate(spec.objects):
        opts += [("shape", k), ("color", k)]
        if o.size is not None:
            opts.append(("size", k))
        if o.position is not None:
            opts.append(("position", k))
    if spec.background is not None:
        opts.append(("background", None))
    opts += [("relation", k) for k in range(len(spec.relations))]
    kind, k = opts[rng.integers(len(opts))]
    objs = list(spec.objects)
    flip = {"above": "below", "below": "above", "left_of": "right_of", "right_of": "left_of"}
    if kind == "relation":
        rels = list(spec.relations)
        i, r, j = rels[k]
        rels[k] = (i, flip[r], j)
        return Scene(tuple(objs), spec.background, tuple(rels))
    if kind == "background":
        used = {o.color for o in objs} | {spec.background}
        return Scene(tuple(objs), str(rng.choice([c for c in COLOR_NAMES if c not in used])), spec.relations)
    o = objs[k]
    if kind == "shape":
        objs = [Obj(str(rng.choice([s for s in SHAPES if s != o.shape])), o.color, o.size, o.position)
                if x == o else x for x in objs]  # fmt: skip
    elif kind == "color":
        bad = {o.color, spec.background}
        new = str(rng.choice([c for c in COLOR_NAMES if c not in bad]))
        objs = [Obj(x.shape, new, x.size, x.position) if x == o else x for x in objs]
    elif kind == "size":
        new = "small" if o.size == "large" else "large"
        objs[k] = Obj(o.shape, o.color, new, o.position)
    else:
        taken = {x.position for x in objs}
        new = str(rng.choice([p for p in POSITION_NAMES if p not in taken]))
        objs[k] = Obj(o.shape, o.color, o.size, new)
    return Scene(tuple(objs), spec.background, spec.relations)


__all__ = [
    "ATTRIBUTES",
    "DEGRADATIONS",
    "Detection",
    "analyze",
    "complete_spec",
    "degrade",
    "detect",
    "evaluate",
    "evaluate_folder",
    "failure_grid",
    "features",
    "format_report",
    "frechet_distance",
    "fsd",
    "perturb",
    "score",
    "wilson",
]
