"""The shape templates the shapes evaluator matches objects against: the renderer's own coverage masks of
the 8 shapes x 2 sizes at each grid cell, and what JPEG's 4:2:0 chroma subsampling leaves of them.

An object's coverage ``alpha`` (the projection of ``pixel - bg`` on its colour contrast, other objects' pixels
zeroed) is matched against the templates at its cell, shifted by up to ``MAX_SHIFT`` pixels either way, by the
Dice-style similarity ``2 <T, alpha> / (|T|^2 + |alpha|^2)`` (``match``). Under the 4:2:0 hypothesis (JPEG as
usually saved, ``match_420``) luma coverage is matched against the templates and chroma coverage against
what chroma subsampling (2x2 average, libjpeg's fancy upsampling, at the right block phase for each shift)
leaves of them. ``shift_offsets`` names the shift of each row of the similarity matrices. The templates
depend only on (position, resolution) and are computed once and cached (read-only arrays).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import ndimage

from .color import METRICS, YCC
from .render import SHAPES, SIZES, cell_bounds, coverage

MAX_SHIFT = 3  # template search: +-MAX_SHIFT pixels in x and y
TEMPLATE_BLURS = ()  # templates are also matched Gaussian-blurred by these sigmas (pixels)
SUBSAMPLED_CHROMA_WEIGHT = 0.3  # chroma vs luma weight in the 4:2:0 hypothesis (chroma is quantised harder)
TEMPLATE_KEYS = tuple((s, z) for s in SHAPES for z in SIZES)  # (shape, size) of each template, shape-major


def upsample2(c: np.ndarray, axis: int) -> np.ndarray:
    """libjpeg's "fancy" 2x upsampling along ``axis``: out[2i] = (3 c[i] + c[i-1]) / 4, out[2i+1] =
    (3 c[i] + c[i+1]) / 4, edges replicated."""
    c = np.moveaxis(c, axis, -1)
    prev = np.concatenate([c[..., :1], c[..., :-1]], -1)
    nxt = np.concatenate([c[..., 1:], c[..., -1:]], -1)
    out = np.empty((*c.shape[:-1], 2 * c.shape[-1]), c.dtype)
    out[..., 0::2] = (3 * c + prev) / 4
    out[..., 1::2] = (3 * c + nxt) / 4
    return np.moveaxis(out, -1, axis)


def chroma420(x: np.ndarray) -> np.ndarray:
    """What 4:2:0 chroma subsampling leaves of full-resolution planes x [..., H, W] (H, W even): 2x2 box
    average, then fancy upsampling."""
    h, w = x.shape[-2:]
    s = x.reshape(*x.shape[:-2], h // 2, 2, w // 2, 2).mean((-3, -1))
    return upsample2(upsample2(s, -2), -1)


@lru_cache(maxsize=64)
def cell_templates(position: str, res: int):
    """Cell bounds, the 16 coverage templates of ``position`` at ``res`` and their 4:2:0 chroma versions:
    (r0, r1, c0, c1, T [16, h*w], |T|^2 [16], C [2, 2, 16, h*w], |C|^2 [2, 2, 16]). ``C[py, px]`` is what
    chroma subsampling leaves of the templates shifted by an amount of parity (py, px), shifted back (the
    result depends on the phase of the 2x2 blocks)."""
    r0, r1, c0, c1 = cell_bounds(position, res)
    h, w = r1 - r0, c1 - c0
    t = np.zeros((len(TEMPLATE_KEYS), h, w), dtype=np.float32)
    for k, (shape, size) in enumerate(TEMPLATE_KEYS):
        a0, a1, b0, b1, m = coverage(shape, size, position, res)
        y0, y1, x0, x1 = max(a0, r0), min(a1, r1), max(b0, c0), min(b1, c1)
        t[k, y0 - r0 : y1 - r0, x0 - c0 : x1 - c0] = m[y0 - a0 : y1 - a0, x0 - b0 : x1 - b0, 0]
    n = res + 2 + res % 2
    tc = np.zeros((2, 2, len(t), h * w), dtype=np.float32)
    for py in range(2):
        for px in range(2):
            canvas = np.zeros((len(t), n, n), dtype=np.float32)
            canvas[:, r0 + py : r1 + py, c0 + px : c1 + px] = t
            tc[py, px] = chroma420(canvas)[:, r0 + py : r1 + py, c0 + px : c1 + px].reshape(len(t), -1)
    bank = [t] + [ndimage.gaussian_filter(t, (0, b, b), mode="constant") for b in TEMPLATE_BLURS]
    t = np.concatenate(bank).reshape(len(bank) * len(t), -1)
    t.setflags(write=False)
    tc.setflags(write=False)
    return r0, r1, c0, c1, t, (t * t).sum(1), tc, (tc * tc).sum(-1)


@lru_cache(maxsize=1)
def shift_offsets() -> tuple[np.ndarray, np.ndarray]:
    """The (dy, dx) of each row of the template search's similarity matrices, int [rows, 2]: the plain
    search's (per metric of color.METRICS, shifts row-major) and the 4:2:0 search's (by parity of dy, then of
    dx, each parity's shifts row-major); |dy|, |dx| <= MAX_SHIFT."""
    p = MAX_SHIFT
    d = np.arange(-p, p + 1)
    plain = np.stack(np.meshgrid(d, d, indexing="ij"), -1).reshape(-1, 2)
    parity = []
    for py in range(2):
        for px in range(2):
            dy, dx = d[(p + py) % 2 :: 2], d[(p + px) % 2 :: 2]
            parity.append(np.stack(np.meshgrid(dy, dx, indexing="ij"), -1).reshape(-1, 2))
    plain = np.tile(plain, (len(METRICS), 1))
    plain.setflags(write=False)
    parity = np.concatenate(parity)
    parity.setflags(write=False)
    return plain, parity


@lru_cache(maxsize=64)
def padded_templates(position: str, res: int) -> np.ndarray:
    """The 16 coverage templates of ``position`` zero-padded by MAX_SHIFT: float32 [16, h + 2p, w + 2p] with
    p = MAX_SHIFT; ``[k, p - dy : p - dy + h, p - dx : p - dx + w]`` is template k displaced by (dy, dx)."""
    r0, r1, c0, c1, tmpl, *_ = cell_templates(position, res)
    h, w, p = r1 - r0, c1 - c0, MAX_SHIFT
    out = np.pad(tmpl[: len(TEMPLATE_KEYS)].reshape(-1, h, w), ((0, 0), (p, p), (p, p)))
    out.setflags(write=False)
    return out


def match(dwin: np.ndarray, others: np.ndarray, v: np.ndarray, position: str, res: int) -> np.ndarray:
    """Similarity of every template of ``position`` at every shift to the object whose colour contrast with
    the background is ``v`` [3], per metric of color.METRICS: float32 [len(METRICS) * shifts, 16], rows as
    in ``shift_offsets()[0]``. ``dwin`` [h + 2p, w + 2p, 3]: image minus background around the cell
    (p = MAX_SHIFT, zero outside the image); ``others`` (same window, bool): other objects' pixels."""
    r0, r1, c0, c1, tmpl, tnorm, _, _ = cell_templates(position, res)
    h, w = r1 - r0, c1 - c0
    nk = len(TEMPLATE_KEYS)
    scores = []  # per metric: similarity of every template at every shift [shifts, nk]
    for metric in METRICS:
        wv = metric @ v
        win = np.clip((dwin @ wv) / max(float(v @ wv), 1e-6), -0.25, 1.0)
        win[others] = 0.0
        views = np.lib.stride_tricks.sliding_window_view(win, (h, w)).reshape(-1, h * w)
        wnorm = float((win * win).sum())
        dots = views @ tmpl.T  # [shifts, bank * templates]
        sc = 2 * dots / (tnorm[None, :] + wnorm)
        scores.append(sc if len(tnorm) == nk else sc.reshape(len(views), -1, nk).max(1))
    return np.concatenate(scores)  # [metrics * shifts, nk]


def match_420(
    dwin: np.ndarray, others: np.ndarray, vy: float, vc: np.ndarray, position: str, res: int
) -> np.ndarray:
    """``match`` under the 4:2:0 hypothesis, for an object of luma contrast ``vy`` and chroma contrast ``vc``
    [2] (of its full-coverage palette colour): luma against the sharp templates, chroma against their
    subsampled versions, each weighted by its squared contrast (chroma by SUBSAMPLED_CHROMA_WEIGHT: quantised
    harder). float32 [shifts, 16], rows as in ``shift_offsets()[1]``."""
    r0, r1, c0, c1, tmpl, tnorm, tmplc, tnormc = cell_templates(position, res)
    h, w, pad = r1 - r0, c1 - c0, MAX_SHIFT
    nk = len(TEMPLATE_KEYS)
    vcc = float(vc @ vc)
    wy, wc = vy * vy, SUBSAMPLED_CHROMA_WEIGHT * vcc
    ac = np.clip((dwin @ (YCC[1:].T @ vc).astype(np.float32)) / vcc, -0.25, 1.0)
    ay = np.clip((dwin @ YCC[0].astype(np.float32)) / vy, -0.25, 1.0) if wy > 1e-6 else 0 * ac
    ac[others] = 0.0
    ay[others] = 0.0
    views = np.lib.stride_tricks.sliding_window_view(ac, (h, w))
    viewy = np.lib.stride_tricks.sliding_window_view(ay, (h, w))
    wnorm = wc * float((ac * ac).sum()) + wy * float((ay * ay).sum())
    scores = []  # [shifts, nk] by shift parity (the phase of the 2x2 chroma blocks)
    for py in range(2):
        for px in range(2):
            sl = (slice((pad + py) % 2, None, 2), slice((pad + px) % 2, None, 2))
            dots = wc * (views[sl].reshape(-1, h * w) @ tmplc[py, px].T)
            dots += wy * (viewy[sl].reshape(-1, h * w) @ tmpl[:nk].T)
            tn = wc * tnormc[py, px] + wy * tnorm[:nk]
            scores.append(2 * dots / (tn[None, :] + wnorm))
    return np.concatenate(scores)
