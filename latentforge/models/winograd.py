"""3×3 convolutions by Winograd's minimal filtering algorithm F(m×m, 3×3), for float32 inference on the CPU.

A 3×3, stride-1, padding-1 convolution computes each m×m block of output pixels from an (m+2)×(m+2) tile
of input. Winograd (1980) and Lavin & Gray 2016 ("Fast Algorithms for Convolutional Neural Networks",
CVPR, eq. 8) write that block as

    Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A        d: input tile [a, a], g: kernel [3, 3], a = m + 2

so per tile and channel pair a² multiplications replace 9·m²: 16 for 4 outputs (F(2,3), 2.25× fewer)
or 36 for 16 outputs (F(4,3), 4× fewer). Over channels, the elementwise product becomes a² matrix products
[tiles, C_in] @ [C_in, C_out], one per tile position (Lavin & Gray §4), which is where the time goes; the
transforms are linear maps on each tile, written here as one GEMM with the Kronecker product Bᵀ⊗Bᵀ (for
d) and Aᵀ⊗Aᵀ (for the result), and G⊗G for the weights.

The matrices come from the Toom-Cook construction, derived below in exact rationals from the evaluation
points (Lavin & Gray §3; Barabasz et al. 2020, "Error analysis and improving the accuracy of Winograd
convolution for deep neural networks", ACM TOMS 46(4), for the choice of points): the correlation
y_i = Σ_k g_k d_{i+k} is the transpose of the linear convolution of polynomials, which is evaluation at
n = m + 2 points (the last at infinity), a pointwise product and interpolation:
    conv = V⁻¹ diag(V_r g) V_m   =>   correlation = V_mᵀ diag(V_r g) V⁻ᵀ,  so  Aᵀ = V_mᵀ, G = V_r, Bᵀ = V⁻ᵀ
(V: [n, n] Vandermonde of the points, V_r, V_m its first r, m columns; the row for infinity picks the top
coefficient). For F(4,3), points {0, 1, −1, ½, −2} instead of the usual {0, ±1, ±2} cut the float32 error
~3.5× (measured: 5.6e-6 against 1.9e-5 of the output's range for 320 channels; F(2,3): 7e-7; the direct
convolution: 3e-7), since ½ keeps the powers in Aᵀ and V⁻¹ small.

Inference only (training keeps the ordinary convolution and its memory-lean backward), float32 only
(half precision would lose more than its precision to the transforms), and only where it measured faster
(`plan`): many channels on maps that are not huge. Large maps go in bands of tile rows, so the
transformed tiles of one band stay in the cache and the extra memory stays bounded (`BAND_BYTES`).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from fractions import Fraction

import torch

POINTS = {2: (0, 1, -1), 4: (0, 1, -1, Fraction(1, 2), -2)}  # the finite evaluation points of F(m, 3)


def _inverse(m: list[list[Fraction]]) -> list[list[Fraction]]:
    """Gauss-Jordan inverse of a square matrix of Fractions (exact)."""
    n = len(m)
    a = [row[:] + [Fraction(int(i == j)) for j in range(n)] for i, row in enumerate(m)]
    for c in range(n):
        p = next(r for r in range(c, n) if a[r][c] != 0)
        a[c], a[p] = a[p], a[c]
        a[c] = [v / a[c][c] for v in a[c]]
        for r in range(n):
            if r != c and a[r][c] != 0:
                f = a[r][c]
                a[r] = [x - f * y for x, y in zip(a[r], a[c], strict=True)]
    return [row[n:] for row in a]


@functools.cache
def matrices(m: int, r: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Bᵀ [n, n], G [n, r], Aᵀ [m, n]) of F(m, r) in float64, n = m + r − 1, from the points in POINTS."""
    pts = [Fraction(p) for p in POINTS[m]] + [None]  # None: the point at infinity
    n = m + r - 1

    def evaluation(k: int) -> list[list[Fraction]]:  # [n, k]: a degree < k polynomial at each point
        return [[Fraction(int(j == k - 1)) if p is None else p**j for j in range(k)] for p in pts]

    v_inv = _inverse(evaluation(n))
    bt = [[v_inv[j][i] for j in range(n)] for i in range(n)]  # V⁻ᵀ
    g = evaluation(r)
    at = [list(col) for col in zip(*evaluation(m), strict=True)]  # V_mᵀ
    for i in range(n):  # scale each row of Bᵀ to max |·| = 1, and row i of G by the inverse (same product)
        f = max(abs(v) for v in bt[i])
        bt[i] = [v / f for v in bt[i]]
        g[i] = [v * f for v in g[i]]
    return tuple(
        torch.tensor([[float(v) for v in row] for row in x], dtype=torch.float64) for x in (bt, g, at)
    )


@functools.cache
def _kron(
    m: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Bᵀ⊗Bᵀ [a², a²], G⊗G [a², 9], Aᵀ⊗Aᵀ [m², a²]): the 2-D transforms as matrices on flat tiles."""
    bt, g, at = matrices(m)
    return tuple(torch.kron(x, x).to(device, dtype) for x in (bt, g, at))


# Extra working memory per band: the transformed input and product tiles of one band of tile rows.
BAND_BYTES = 32 << 20

# Each thread's workspace: inside `workspace()`, one buffer per (device, dtype), grown to the largest call
# and reused by the calls after it (`scratch`), then freed at the exit. Large fresh allocations cost page
# faults on their first touch (transforming 1280×1280 weights for F(2,3) into a new 105 MB tensor: 30 ms;
# into a reused one: 6 ms), more than the transforms themselves. Outside `workspace()`, every call
# allocates afresh.
_LOCAL = threading.local()


@contextlib.contextmanager
def workspace():
    """Reuse one working buffer across the Winograd convolutions (and other `scratch` users) run inside
    (e.g. one network forward)."""
    depth = getattr(_LOCAL, "depth", 0)
    _LOCAL.depth = depth + 1
    try:
        yield
    finally:
        _LOCAL.depth = depth
        if depth == 0:
            _LOCAL.__dict__.pop("buffers", None)


def release_workspace() -> None:
    """Free this thread's workspace buffers now (e.g. before a layer that needs the memory); the next
    Winograd call inside `workspace()` allocates afresh."""
    _LOCAL.__dict__.pop("buffers", None)


def in_workspace() -> bool:
    """Whether this thread is inside `workspace()` (where `conv3x3` takes the Winograd path)."""
    return getattr(_LOCAL, "depth", 0) > 0


def scratch(device: torch.device, dtype: torch.dtype, sizes: list[int]) -> list[torch.Tensor]:
    """Flat tensors of the given sizes, carved from this thread's workspace for (`device`, `dtype`) (fresh
    outside `workspace()`). They are valid until the next `scratch` call on this thread: a caller uses them
    for its own intermediates and returns a fresh tensor (the Winograd convolution here, the UNet's GEGLU
    feed-forward)."""
    total = sum(sizes)
    if getattr(_LOCAL, "depth", 0) == 0:
        buf = torch.empty(total, dtype=dtype, device=device)
    else:
        buffers = _LOCAL.__dict__.setdefault("buffers", {})
        buf = buffers.get((device, dtype))
        if buf is None or buf.numel() < total:
            buf = buffers[(device, dtype)] = None  # (free the old one before allocating the larger)
            buffers[(device, dtype)] = buf = torch.empty(total, dtype=dtype, device=device)
    out, at = [], 0
    for n in sizes:
        out.append(buf[at : at + n])
        at += n
    return out


def winograd_conv3x3(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, m: int
) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=1) by F(m×m, 3×3), m ∈ POINTS: x [B, C_in, H, W], weight
    [C_out, C_in, 3, 3] -> [B, C_out, H, W], in x's memory format and dtype (`conv3x3` sends float32 only;
    float64 serves the tests)."""
    b, c, h, w = x.shape
    co = weight.shape[0]
    a = m + 2
    kb, kg, ka = _kron(m, x.device, x.dtype)
    th, tw = -(-h // m), -(-w // m)  # tiles down and across (the last ones run past the edge: zero padding)
    rows = max(
        1, min(th, BAND_BYTES // (a * a * b * tw * max(c, co) * x.element_size()))
    )  # tile rows per band
    wp = m * tw + 2
    t_max = b * rows * tw
    ws_u, ws_x, ws_d, ws_v, ws_p, ws_y = scratch(
        x.device,
        x.dtype,
        [a * a * co * c, b * (m * rows + 2) * wp * c]
        + [a * a * t_max * c] * 2
        + [a * a * t_max * co, m * m * t_max * co],
    )
    # U[p] = (G g Gᵀ) at tile position p, for every (out, in) pair: [a², C_out, C_in]; used transposed.
    u = torch.mm(kg, weight.reshape(co * c, 9).T, out=ws_u.view(a * a, co * c))
    u = u.view(a * a, co, c).transpose(1, 2)  # [a², C_in, C_out]
    xl = x.permute(0, 2, 3, 1)  # [B, H, W, C] view
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    # The output in x's memory format, over whole tiles: NHWC [B, H', W', C_out] or NCHW [B, C_out, H', W'].
    shape = (b, m * th, m * tw, co) if cl else (b, co, m * th, m * tw)
    out = torch.empty(shape, dtype=x.dtype, device=x.device)
    for r0 in range(0, th, rows):
        n = min(rows, th - r0)
        t = b * n * tw
        # This band's input rows m·r0 − 1 … m·(r0 + n), NHWC, zero outside the image: [B, m·n + 2, W', C]
        xp = ws_x[: b * (m * n + 2) * wp * c].view(b, m * n + 2, wp, c)
        lo, hi = m * r0 - 1, min(m * (r0 + n) + 1, h)  # image rows present in the band: [max(lo, 0), hi)
        first = max(lo, 0)
        xp[:, : first - lo].zero_()
        xp[:, hi - lo :].zero_()
        xp[:, first - lo : hi - lo, 0].zero_()
        xp[:, first - lo : hi - lo, w + 1 :].zero_()
        xp[:, first - lo : hi - lo, 1 : w + 1].copy_(xl[:, first:hi])
        # tiles[k, l, β, i, j, γ] = xp[β, m·i + k, m·j + l, γ]: overlapping windows, as a strided view
        s_b, s_h, s_w, s_c = xp.stride()
        tiles = xp.as_strided((a, a, b, n, tw, c), (s_h, s_w, s_b, m * s_h, m * s_w, s_c))
        d = ws_d[: a * a * t * c].view(a * a, t * c)
        d.view(a, a, b, n, tw, c).copy_(tiles)  # the tiles, gathered: [a², T·C_in]
        v = torch.mm(kb, d, out=ws_v[: a * a * t * c].view(a * a, t * c)).view(a * a, t, c)  # Bᵀ d B
        prod = torch.bmm(v, u, out=ws_p[: a * a * t * co].view(a * a, t, co))  # [a², T, C_out]
        y = torch.mm(ka, prod.view(a * a, t * co), out=ws_y[: m * m * t * co].view(m * m, t * co))
        y = y.view(m, m, b, n, tw, co)  # Aᵀ (·) A per tile: [m, m, B, n, tw, C_out]
        if bias is not None:
            y += bias
        if cl:  # out[β, m(r0 + i) + k, m j + l, γ] = y[k, l, β, i, j, γ]
            out[:, m * r0 : m * (r0 + n)].view(b, n, m, tw, m, co).copy_(y.permute(2, 3, 0, 4, 1, 5))
        else:
            out[:, :, m * r0 : m * (r0 + n)].view(b, co, n, m, tw, m).copy_(y.permute(2, 5, 3, 0, 4, 1))
    if cl:
        out = out.permute(0, 3, 1, 2)  # [B, C_out, H', W'] view of NHWC memory
    if out.shape[2:] != (h, w):
        out = out[:, :, :h, :w].contiguous(
            memory_format=torch.channels_last if cl else torch.contiguous_format
        )
    return out
