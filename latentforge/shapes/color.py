"""Colour classification for the shapes evaluator: the palette, YCbCr and the chroma weight templates are
fitted with, and the palette colour an object's measured colour stands for.

Edge pixels mix an object with the background, so a palette colour ``c`` is scored by the distance from
``c`` to the segment ``bg + t (p - bg)``, ``t`` in ``[1, 1 / MIN_PURITY]`` (``p`` the measured colour): the
colour the pixels would have at full coverage. The background's own colour is never a candidate. When no
palette colour is within ``COLOR_TOLERANCE`` of its segment, chroma may have been diluted more than luma
(4:2:0 chroma subsampling of small objects): luma and chroma then get separate dilution factors.
"""

from __future__ import annotations

import numpy as np

from .render import COLOR_NAMES, COLORS

MIN_PURITY = 0.6  # the purest pixels of an object are at least this much object (blur, antialiasing)
MIN_CHROMA_PURITY = 0.4  # 4:2:0 subsampling can leave a small object this little of its chroma
COLOR_TOLERANCE = 25.0  # beyond this RGB distance from every palette segment, allow chroma dilution
MIN_BLUR_PURITY = 0.25  # a small object blurred by up to ~1.5 px at 32 px keeps this much colour at its core

PALETTE = np.array([COLORS[c] for c in COLOR_NAMES], dtype=np.float32)
# Templates are fitted in YCbCr with chroma's squared error down-weighted by CHROMA_WEIGHT (templates.fit):
# luminance survives blur and JPEG chroma subsampling best. YCC: the RGB -> YCbCr matrix (JPEG's).
CHROMA_WEIGHT = 0.03
YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
PALETTE_YCC = PALETTE @ YCC.T.astype(np.float32)


def nearest_palette(rgb: np.ndarray) -> int:
    """Index of the palette colour nearest ``rgb`` (plain RGB distance): how the background is named."""
    return int(np.argmin(np.linalg.norm(PALETTE - rgb, axis=1)))


def nearest_color(p: np.ndarray, bg: np.ndarray, exclude: int | None) -> int:
    """Index of the palette colour nearest the segment bg + t (p - bg), t in [1, 1 / MIN_PURITY]. When
    none is within COLOR_TOLERANCE, chroma may have been diluted more than luma (4:2:0 subsampling): then
    in YCbCr p - bg may be a (c - bg) in luma and b (c - bg) in chroma, a in [MIN_PURITY, 1], b in
    [MIN_CHROMA_PURITY, a]."""
    v = p - bg
    vv = float(v @ v)
    if vv < 1e-6:
        d = np.linalg.norm(PALETTE - p, axis=1)
    else:
        t = np.clip(((PALETTE - bg) @ v) / vv, 1.0, 1.0 / MIN_PURITY)
        d = np.linalg.norm(PALETTE - (bg + t[:, None] * v), axis=1)
    if exclude is not None:
        d[exclude] = np.inf
    best = int(np.argmin(d))
    if d[best] <= COLOR_TOLERANCE:
        return best
    return _nearest_diluted(v, bg, exclude)


def color_candidates(p: np.ndarray, bg: np.ndarray, exclude: int | None) -> list[int]:
    """The palette colours measured colour ``p`` may stand for: every one within COLOR_TOLERANCE of the
    segment bg + t (p - bg), t in [1, 1 / MIN_BLUR_PURITY] (nearest first) -- a blurred small object's core
    is diluted further than MIN_PURITY, and how far only the shape fit can tell (a gray blob on black may
    be a white one, blurred) -- or, when there is none, ``nearest_color``'s (chroma diluted by 4:2:0)."""
    v = p - bg
    vv = float(v @ v)
    if vv >= 1e-6:
        t = np.clip(((PALETTE - bg) @ v) / vv, 1.0, 1.0 / MIN_BLUR_PURITY)
        d = np.linalg.norm(PALETTE - (bg + t[:, None] * v), axis=1)
        if exclude is not None:
            d[exclude] = np.inf
        near = [int(k) for k in np.argsort(d) if d[k] <= COLOR_TOLERANCE]
        if near:
            return near
    return [nearest_color(p, bg, exclude)]


def _nearest_diluted(v: np.ndarray, bg: np.ndarray, exclude: int | None) -> int:
    """``nearest_color``'s fallback: luma diluted by a in [MIN_PURITY, 1], chroma by b in
    [MIN_CHROMA_PURITY, a], each fitted per palette colour by least squares in YCbCr."""
    u = YCC @ v
    dd = PALETTE_YCC - YCC @ bg  # [K, 3]
    dy, dc = dd[:, 0], dd[:, 1:]
    a = np.clip(u[0] * dy / np.maximum(dy * dy, 1e-6), MIN_PURITY, 1.0)
    b = np.clip((dc @ u[1:]) / np.maximum((dc * dc).sum(1), 1e-6), MIN_CHROMA_PURITY, 1.0)
    b = np.minimum(b, np.maximum(a, MIN_CHROMA_PURITY))
    dist = (u[0] - a * dy) ** 2 + ((u[1:][None, :] - b[:, None] * dc) ** 2).sum(1)
    if exclude is not None:
        dist[exclude] = np.inf
    return int(np.argmin(dist))
