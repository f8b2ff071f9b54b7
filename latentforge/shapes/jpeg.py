"""JPEG re-ranking for the shapes evaluator (analysis by synthesis).

JPEG q50 4:2:0 at 64 px leaves a small object that differs from the background mostly in chroma a blurred,
quantised outline, and template matching may then find its best two shapes nearly tied. ``suspect`` says
when: the two are within ``JPEG_MARGIN`` and the object's contrast is mostly chroma. ``rerank`` then renders
each shape (at the winning size, at its own best shift and at the renderer's position) on the measured
background, puts it through a real JPEG round trip (PIL) inside the observed image's own 16x16 blocks, and
the one reproducing the observed cell best wins -- provided the image shows JPEG's signature: the plain
render leaves a residual above ``PLAIN_FLOOR`` and the round trip explains the cell ``1 / JPEG_EVIDENCE``
times better (not so for clean, blurred or noisy images).
"""

from __future__ import annotations

import io

import numpy as np

from .render import SIZES, cell_bounds
from .templates import MAX_SHIFT, TEMPLATE_KEYS, padded_templates

JPEG_MARGIN = 0.05  # re-rank when the best two shapes' similarities are closer than this ...
JPEG_CHROMA_RATIO = 0.3  # ... and the object's squared luma contrast is below this x its squared chroma one
JPEG_QUALITY = 50  # quality of the simulated round trip (4:2:0 chroma subsampling, libjpeg's default)
JPEG_EVIDENCE = 0.25  # the round trip must explain the cell this much better than the plain render
PLAIN_FLOOR = 16.0  # mean squared RGB residual (4 levels RMS) within which the plain render explains a cell


def suspect(per_shape: np.ndarray, luma2: float, chroma2: float) -> bool:
    """Whether an object's shape may have been blurred by JPEG 4:2:0 past template matching: its squared
    luma contrast ``luma2`` is below JPEG_CHROMA_RATIO x its squared chroma contrast ``chroma2`` and its best
    two shapes' similarities (``per_shape`` [8]) are within JPEG_MARGIN."""
    if not luma2 < JPEG_CHROMA_RATIO * chroma2:
        return False
    second, first = np.partition(per_shape, -2)[-2:]
    return bool(first - second < JPEG_MARGIN)


def mcu_crop(position: str, res: int) -> tuple[int, int, int, int]:
    """Rows [y0, y1) and columns [x0, x1) of the whole 16x16 JPEG MCUs (4:2:0) that hold ``position``'s
    cell, clipped to the image."""
    r0, r1, c0, c1 = cell_bounds(position, res)
    return (r0 // 16) * 16, min(res, -(-r1 // 16) * 16), (c0 // 16) * 16, min(res, -(-c1 // 16) * 16)


def candidate_cells(
    img8: np.ndarray,
    position: str,
    background: np.ndarray,
    colors: np.ndarray,
    candidates: list[tuple[int, int, int]],
    blur: int = 0,
) -> np.ndarray:
    """Each candidate explanation of the object in ``position``'s cell, rendered like ``render`` does (the
    coverage template over ``background``, rounded to uint8) into the observed image cropped to whole MCUs
    (``mcu_crop``), edge-replicated to a multiple of 16 pixels as a JPEG encoder does: uint8 [K, H, W, 3].

    ``candidates``: K (template index, dy, dx), |dy|, |dx| <= MAX_SHIFT; ``colors`` [K, 3]: their RGB;
    ``blur``: the templates' blur (index in templates.TEMPLATE_BLURS)."""
    res = img8.shape[0]
    r0, r1, c0, c1 = cell_bounds(position, res)
    y0, y1, x0, x1 = mcu_crop(position, res)
    h, w, p = r1 - r0, c1 - c0, MAX_SHIFT
    padded = padded_templates(position, res)[blur]
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


def round_trip(tiles: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
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


def rerank(
    img8: np.ndarray,
    position: str,
    background: np.ndarray,
    color: np.ndarray,
    sim: np.ndarray,
    shift: np.ndarray,
    blur: int = 0,
) -> int | None:
    """Analysis by synthesis for an object whose best shapes are nearly tied (JPEG 4:2:0 at 64 px leaves a
    small object that differs from the background mostly in chroma a blurred, quantised outline): render each
    shape at the best template's size and ``color`` on ``background``, put it through a JPEG round trip
    (``round_trip``) and keep the one that reproduces the observed cell best (least mean squared RGB
    residual), in the spirit of analysis-by-synthesis (Yuille & Kersten 2006, "Vision as Bayesian
    inference: analysis by synthesis?", Trends Cogn. Sci. 10(7)).

    Each shape is tried at its own best template shift (``shift`` [2, 16]: dy, dx) and at the renderer's
    position (no shift), sharp and blurred like the image (``blur``: index in templates.TEMPLATE_BLURS, the
    blur the image's objects were found to have, which JPEG's quantisation can imitate). Returns the winning
    template index, or None when the image shows no sign of JPEG compression: the plain render explains the
    cell within PLAIN_FLOOR, or the round trip does not explain it JPEG_EVIDENCE times better than the plain
    render does (noise, another codec)."""
    res = img8.shape[0]
    r0, r1, c0, c1 = cell_bounds(position, res)
    y0, _, x0, _ = mcu_crop(position, res)
    window = (slice(None), slice(r0 - y0, r1 - y0), slice(c0 - x0, c1 - x0))
    obs = img8[r0:r1, c0:c1].astype(np.float32)
    best = int(np.argmax(sim))
    rgb = np.asarray(color, np.float32)[None]  # [1, 3]
    p, dy, dx = MAX_SHIFT, int(shift[0, best]), int(shift[1, best])
    m = padded_templates(position, res)[
        blur, best, p - dy : p - dy + r1 - r0, p - dx : p - dx + c1 - c0, None
    ]
    if ((np.floor(background + m * (rgb - background) + 0.5) - obs) ** 2).mean() <= PLAIN_FLOOR:
        return None  # the template match's winner, rendered, explains the cell: the usual (clean) case
    keys = [k for k in range(len(TEMPLATE_KEYS)) if k % len(SIZES) == best % len(SIZES)]
    cands = list(
        dict.fromkeys([(k, int(shift[0, k]), int(shift[1, k])) for k in keys] + [(k, 0, 0) for k in keys])
    )
    colors = np.repeat(rgb, len(cands), axis=0)
    # JPEG's quantisation can pass for blur, so the sharp render is tried too
    blurs = sorted({0, blur})
    tiles = np.concatenate([candidate_cells(img8, position, background, colors, cands, b) for b in blurs])
    plain = ((tiles[window] - obs) ** 2).mean((1, 2, 3))  # [K]
    if plain.min() <= PLAIN_FLOOR:
        return None
    jpeg = ((round_trip(tiles)[window] - obs) ** 2).mean((1, 2, 3))  # [K]
    if jpeg.min() >= JPEG_EVIDENCE * plain.min():
        return None
    return cands[int(np.argmin(jpeg)) % len(cands)][0]
