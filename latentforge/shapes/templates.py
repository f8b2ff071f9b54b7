"""The shape templates the shapes evaluator matches objects against: the renderer's own coverage masks of
the 8 shapes x 2 sizes at each grid cell, Gaussian-blurred by each sigma of the blur bank, and what JPEG's
4:2:0 chroma subsampling leaves of them.

Analysis by synthesis. An object of full-coverage colour contrast ``v`` (its palette colour minus the
background, in YCbCr: luma ``vy``, chroma ``vc``) drawn with coverage ``A`` shows ``image - bg = A v``. Its
luma coverage ``ay = dY / vy`` and chroma coverage ``ac = (dC . vc) / |vc|^2`` (other objects' pixels zeroed)
are fitted by every template of its cell at every blur of ``TEMPLATE_BLURS`` and every shift of up to
``MAX_SHIFT`` pixels either way, by the weighted least-squares residual
``vy^2 |ay - A|^2 + w |vc|^2 |ac - A'|^2`` -- the squared error of the synthesised image in YCbCr with chroma
down-weighted by ``w = CHROMA_WEIGHT`` (luma survives blur and JPEG best) -- where ``A'`` is ``A`` itself
(the plain hypothesis) or what 4:2:0 chroma subsampling leaves of it (2x2 average, libjpeg's fancy
upsampling, at the block phase of each shift: the 4:2:0 hypothesis, for objects whose contrast is mostly
chroma). ``fit`` returns, per hypothesis, blur and template, the least residual over shifts, the Dice-style
similarity ``2 <T, a> / (|T|^2 + |a|^2) = 1 - residual / (|T|^2 + |a|^2)`` there (same weights, over the
whole window) and that shift. The detector chooses one blur and hypothesis per image (``detection.py``).
``shift_offsets`` names the shift of each search row. The templates depend only on (position, resolution)
and are computed once and cached (read-only arrays).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from .color import CHROMA_WEIGHT, YCC
from .render import SHAPES, SIZES, cell_bounds, coverage

MAX_SHIFT = 3  # template search: +-MAX_SHIFT pixels in x and y
# The blur bank: templates are matched Gaussian-blurred by each of these sigmas (pixels). Generated images are
# softer than renders; 0.3 px steps keep any blur up to ~1.6 px within ~0.15 px of a level.
TEMPLATE_BLURS = (0.0, 0.6, 0.9, 1.2, 1.5)
TEMPLATE_KEYS = tuple((s, z) for s in SHAPES for z in SIZES)  # (shape, size) of each template, shape-major
ALPHA_RANGE = (-0.5, 1.5)  # measured coverages are clipped to this range (other objects' tails, outliers)
_YCC = YCC.astype(np.float32)


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
    """Cell bounds and the blurred coverage templates of ``position`` at ``res``: (r0, r1, c0, c1,
    T [len(TEMPLATE_BLURS), 16, h*w], |T|^2 [len(TEMPLATE_BLURS), 16]). Blurring the cell crop with zeros
    around is blurring the whole canvas: every object lies inside its cell (what spills out is lost)."""
    r0, r1, c0, c1 = cell_bounds(position, res)
    h, w = r1 - r0, c1 - c0
    t = np.zeros((len(TEMPLATE_KEYS), h, w), dtype=np.float32)
    for k, (shape, size) in enumerate(TEMPLATE_KEYS):
        a0, a1, b0, b1, m = coverage(shape, size, position, res)
        y0, y1, x0, x1 = max(a0, r0), min(a1, r1), max(b0, c0), min(b1, c1)
        t[k, y0 - r0 : y1 - r0, x0 - c0 : x1 - c0] = m[y0 - a0 : y1 - a0, x0 - b0 : x1 - b0, 0]
    bank = np.stack(
        [t if b == 0 else ndimage.gaussian_filter(t, (0, b, b), mode="constant") for b in TEMPLATE_BLURS]
    )
    bank = bank.reshape(len(TEMPLATE_BLURS), len(t), h * w)
    norm = (bank * bank).sum(-1)
    bank.setflags(write=False)
    norm.setflags(write=False)
    return r0, r1, c0, c1, bank, norm


@lru_cache(maxsize=32)
def chroma_templates(position: str, res: int) -> tuple[np.ndarray, np.ndarray]:
    """What 4:2:0 chroma subsampling leaves of ``cell_templates``: (C [2, 2, len(TEMPLATE_BLURS), 16, h*w],
    |C|^2 [2, 2, len(TEMPLATE_BLURS), 16]). ``C[py, px]`` is what it leaves of the templates shifted by an
    amount of parity (py, px), shifted back (the result depends on the phase of the 2x2 blocks)."""
    r0, r1, c0, c1, bank, _ = cell_templates(position, res)
    h, w = r1 - r0, c1 - c0
    t = bank.reshape(-1, h, w)
    n = res + 2 + res % 2
    tc = np.zeros((2, 2, len(t), h * w), dtype=np.float32)
    for py in range(2):
        for px in range(2):
            canvas = np.zeros((len(t), n, n), dtype=np.float32)
            canvas[:, r0 + py : r1 + py, c0 + px : c1 + px] = t
            tc[py, px] = chroma420(canvas)[:, r0 + py : r1 + py, c0 + px : c1 + px].reshape(len(t), -1)
    tc = tc.reshape(2, 2, *bank.shape)
    norm = (tc * tc).sum(-1)
    tc.setflags(write=False)
    norm.setflags(write=False)
    return tc, norm


@lru_cache(maxsize=1)
def shift_offsets() -> tuple[np.ndarray, np.ndarray]:
    """The (dy, dx) of each row of the template search: the plain hypothesis's (shifts row-major) and the
    4:2:0 hypothesis's (by parity of dy, then of dx, each parity's shifts row-major); |dy|, |dx| <=
    MAX_SHIFT. int [(2 MAX_SHIFT + 1)^2, 2] each."""
    p = MAX_SHIFT
    d = np.arange(-p, p + 1)
    plain = np.stack(np.meshgrid(d, d, indexing="ij"), -1).reshape(-1, 2)
    parity = []
    for py in range(2):
        for px in range(2):
            dy, dx = d[(p + py) % 2 :: 2], d[(p + px) % 2 :: 2]
            parity.append(np.stack(np.meshgrid(dy, dx, indexing="ij"), -1).reshape(-1, 2))
    plain.setflags(write=False)
    parity = np.concatenate(parity)
    parity.setflags(write=False)
    return plain, parity


@lru_cache(maxsize=64)
def padded_templates(position: str, res: int) -> np.ndarray:
    """The blurred coverage templates of ``position`` zero-padded by MAX_SHIFT: float32
    [len(TEMPLATE_BLURS), 16, h + 2p, w + 2p] with p = MAX_SHIFT; ``[b, k, p - dy : p - dy + h,
    p - dx : p - dx + w]`` is template k at blur b displaced by (dy, dx)."""
    r0, r1, c0, c1, bank, _ = cell_templates(position, res)
    h, w, p = r1 - r0, c1 - c0, MAX_SHIFT
    out = np.pad(bank.reshape(*bank.shape[:2], h, w), ((0, 0), (0, 0), (p, p), (p, p)))
    out.setflags(write=False)
    return out


@dataclass(frozen=True)
class Fit:
    """One object's template fit under one hypothesis, per blur of TEMPLATE_BLURS and template:
    ``resid`` the least weighted squared residual over shifts, ``sim`` the Dice-style similarity at that
    shift, ``shift`` that shift's (dy, dx). float32 [nb, 16], float32 [nb, 16], int [nb, 16, 2]."""

    resid: np.ndarray
    sim: np.ndarray
    shift: np.ndarray

    def best(self) -> tuple[int, int]:
        """(blur index, template index) of the least residual."""
        return divmod(int(np.argmin(self.resid)), self.resid.shape[1])


@dataclass
class Fits:
    """One object's template fits. ``full``: plain RGB squared error, the least-squares fit for noise alike
    in R, G and B when chroma is as sharp as luma; ``subsampling``: how much better (squared chroma error)
    the 4:2:0 version of ``full``'s best template (at the blur of the luma) fits the object's chroma than
    the template itself -- positive when the chroma is blurrier than the luma, as JPEG 4:2:0 leaves it;
    ``plain`` and ``sub``: added by ``fit_jpeg``. ``window``: what ``fit`` was given."""

    full: Fit
    subsampling: float
    window: tuple
    plain: Fit | None = None
    sub: Fit | None = None


def _fit_from(rest: float, resid: np.ndarray, dots: np.ndarray, offsets: np.ndarray) -> Fit:
    """The Fit from every search row's residuals ``resid`` and dot products ``dots`` [rows, nb * 16] (both
    weighted; ``rest`` the part of the residuals the coverages do not carry, so that sim = 2 dots /
    (2 dots + resid - rest)); ``offsets`` [rows, 2] each row's (dy, dx)."""
    i = resid.argmin(0)
    cols = np.arange(resid.shape[1])
    r, d = resid[i, cols], dots[i, cols]
    sim = 2 * d / np.maximum(2 * d + r - rest, 1e-12)
    shape = (len(TEMPLATE_BLURS), len(TEMPLATE_KEYS))
    return Fit(r.reshape(shape), sim.reshape(shape), offsets[i].reshape(*shape, 2))


def _coverage(dwin: np.ndarray, others: np.ndarray, u: np.ndarray, u2: float) -> np.ndarray:
    """The coverage ``(dwin . u) / u2`` (rows of ``dwin`` [H, W, 3] projected on ``u`` [3]), other objects'
    pixels zeroed, clipped to ALPHA_RANGE; zero when ``u2`` is ~0."""
    if u2 < 1e-6:
        return np.zeros(dwin.shape[:2], np.float32)
    a = np.clip(dwin @ (np.asarray(u, np.float32) / np.float32(u2)), *ALPHA_RANGE)
    a[others] = 0.0
    return a


def fit(dwin: np.ndarray, others: np.ndarray, v: np.ndarray, position: str, res: int) -> Fits:
    """The object of full-coverage contrast ``v`` [3] (RGB) in ``position``'s cell fitted by every
    template, blur and shift (see the module docstring): ``Fits.full`` and ``Fits.subsampling``. ``dwin``
    [h + 2p, w + 2p, 3]: image minus background around the cell (p = MAX_SHIFT, zero outside the image);
    ``others`` (same window, bool): other objects' pixels. Residuals are the squared error of the
    synthesised window -- its part off ``v`` included, so they compare between colours -- over the whole
    window whatever the shift; the similarity is ``2 <T, a> / (|T|^2 + |a|^2)`` over it too."""
    r0, r1, c0, c1, bank, tnorm = cell_templates(position, res)
    h, w = r1 - r0, c1 - c0
    v = np.asarray(v, np.float32)
    v2 = float(v @ v)
    a = _coverage(dwin, others, v, v2)
    d = dwin[~others]
    cap = v2 * float(np.vdot(a, a))
    rest = float(np.vdot(d, d)) - cap
    views = np.lib.stride_tricks.sliding_window_view(a, (h, w)).reshape(-1, h * w)
    dots = v2 * (views @ bank.reshape(-1, h * w).T)  # [shifts, nb * 16]
    full = _fit_from(rest, (cap + rest + v2 * tnorm.reshape(1, -1)) - 2 * dots, dots, shift_offsets()[0])
    fits = Fits(full, 0.0, (dwin, others, v, position, res))
    fits.subsampling = _subsampling_evidence(fits)
    return fits


def _subsampling_evidence(fits: Fits) -> float:
    """``Fits.subsampling``: |c - vc T|^2 - |c - vc S|^2 summed over T's region (the rest of the window is
    common to both) = |vc|^2 (|T|^2 - |S|^2 - 2 <ac, T - S>), for the window's chroma difference c (chroma
    coverage ac), the chroma contrast vc, ``fits.full``'s least-residual template and shift, T that
    template at the blur its luma fits best (the luma says how blurred the object is) and S what 4:2:0
    leaves of T. For an object whose contrast is mostly chroma, T and S each at the blur fitting the chroma
    best."""
    dwin, others, v, position, res = fits.window
    u = _YCC @ v
    vc = u[1:]
    vc2 = float(vc @ vc)
    if vc2 < 1e-6:
        return 0.0
    b, k = fits.full.best()
    dy, dx = (int(x) for x in fits.full.shift[b, k])
    r0, r1, c0, c1, bank, tnorm = cell_templates(position, res)
    h, w, p = r1 - r0, c1 - c0, MAX_SHIFT
    rows, cols = slice(p + dy, p + dy + h), slice(p + dx, p + dx + w)
    vy2 = float(u[0] * u[0])
    ac = _coverage(dwin[rows, cols], others[rows, cols], _YCC[1:].T @ vc, vc2).reshape(-1)
    tc, tcnorm = chroma_templates(position, res)
    tc, tcnorm = tc[dy % 2, dx % 2, :, k], tcnorm[dy % 2, dx % 2, :, k]  # [nb, h*w], [nb]
    if vy2 < CHROMA_WEIGHT * vc2:
        # contrast mostly chroma: no luma to say how blurred; each hypothesis at its own best blur
        return vc2 * float((tnorm[:, k] - 2 * (bank[:, k] @ ac)).min() - (tcnorm - 2 * (tc @ ac)).min())
    ay = _coverage(dwin[rows, cols], others[rows, cols], _YCC[0] * u[0], vy2).reshape(-1)
    b = int(np.argmin(tnorm[:, k] - 2 * (bank[:, k] @ ay)))
    return vc2 * float(tnorm[b, k] - tcnorm[b] - 2 * ac @ (bank[b, k] - tc[b]))


def fit_jpeg(fits: Fits, subsampled: bool) -> None:
    """Add ``fits.plain`` (YCbCr, chroma's squared error weighted CHROMA_WEIGHT: luma survives blur and
    JPEG best) and, if ``subsampled``, ``fits.sub`` (``plain`` with the chroma matched against what 4:2:0
    leaves of the templates, at the 2x2 block phase of each shift): the fits for images JPEG left with
    chroma blurrier than luma (``sub`` for objects whose contrast is mostly chroma)."""
    dwin, others, v, position, res = fits.window
    r0, r1, c0, c1, bank, tnorm = cell_templates(position, res)
    h, w, p = r1 - r0, c1 - c0, MAX_SHIFT
    u = _YCC @ v
    vy, vc = float(u[0]), u[1:]
    vy2, vc2 = vy * vy, float(vc @ vc)
    ay = _coverage(dwin, others, _YCC[0] * vy, vy2)
    ac = _coverage(dwin, others, _YCC[1:].T @ vc, vc2)
    d = dwin[~others] @ _YCC.T  # [n, 3]
    cy, cc = vy2 * float(np.vdot(ay, ay)), vc2 * float(np.vdot(ac, ac))
    rest = float(d[:, 0] @ d[:, 0]) - cy + CHROMA_WEIGHT * (float((d[:, 1:] * d[:, 1:]).sum()) - cc)
    wy, wc = vy2, CHROMA_WEIGHT * vc2
    e = cy + CHROMA_WEIGHT * cc + rest  # the window's weighted |d|^2
    t = bank.reshape(-1, h * w)
    mix = np.lib.stride_tricks.sliding_window_view(wy * ay + wc * ac, (h, w)).reshape(-1, h * w)
    dots = mix @ t.T
    fits.plain = _fit_from(rest, (e + (wy + wc) * tnorm.reshape(1, -1)) - 2 * dots, dots, shift_offsets()[0])
    if not subsampled:
        return
    tc, tcnorm = chroma_templates(position, res)
    viewy = np.lib.stride_tricks.sliding_window_view(ay, (h, w))
    viewc = np.lib.stride_tricks.sliding_window_view(ac, (h, w))
    dots, resid = [], []
    for py in range(2):
        for px in range(2):
            sl = (slice((p + py) % 2, None, 2), slice((p + px) % 2, None, 2))
            y2, c2 = viewy[sl].reshape(-1, h * w), viewc[sl].reshape(-1, h * w)
            d2 = wy * (y2 @ t.T) + wc * (c2 @ tc[py, px].reshape(-1, h * w).T)
            dots.append(d2)
            resid.append((e + (wy * tnorm + wc * tcnorm[py, px]).reshape(1, -1)) - 2 * d2)
    fits.sub = _fit_from(rest, np.concatenate(resid), np.concatenate(dots), shift_offsets()[1])
