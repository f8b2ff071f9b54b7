"""A Brownian tree for a batch of seeds, with counter-based randomness: one batched op per tree node.

SDE samplers converge as their steps shrink only if every step count samples the same Brownian path W(σ)
(strong convergence, Kloeden & Platen 1992 §10), which is why k-diffusion queries a Brownian tree
(torchsde). Per-image seeds there mean one tree object per image; here the B paths of a batch are one
tree whose every node is a single [B, …] operation:

- Randomness is counter-based (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"):
  the uniforms behind node n of image k are Philox4x32-10(counter = (block j, n, tag), key = seed_k),
  computed for all images and blocks at once with int64 tensor ops, then turned into normals by
  Box & Muller (1958). No generator objects, and image k's path is a function of seed_k alone, so it is
  the same in any batch. The integers are the same on every device; the normals agree up to an ulp of
  log/cos/sin (CPU and CUDA libm may round them differently).
- The path is built by Brownian-bridge refinement (Lévy's construction; Glasserman 2004, §3.1): given
  W(a) and W(b), W(m) = W(a) + w·(W(b) − W(a)) + √(w(1 − w)(b − a))·z with w = (m − a)/(b − a). The
  split point m is the geometric midpoint √(ab), not (a + b)/2: samplers step about evenly in log σ
  (λ = −log σ, Lu et al. 2022), so every step then costs about the same number of nodes and a leaf is a
  fixed *relative* width of σ (log(b/a) ≤ rtol) at every noise level.
- A query descends to a leaf (depth D), reusing the nodes of the previous query's path, and takes the
  bridge at the query point itself with the leaf's own normal. W(t) is thus a pure function of (seed, t),
  so W(a, c) = W(a, b) + W(b, c) exactly, and its law is exact for any set of points that lie in
  different leaves (given the node values, the bridges of distinct leaves are independent): any two
  query points more than rtol apart in log σ.

Cost: with the default rtol = 1e-4 a step of a 25-step Karras schedule on SD's σ range costs about 14
nodes, against the ~52 normal draws per query of k-diffusion's torchsde tree (tol = 1e-6). A Philox
node costs about 5× a torch.randn of the same size on the CPU, so the batched tree costs 0.7–0.8× one
torchsde tree over the batch (benchmarks/brownian.py), with per-image seeds. Memory: the last path's
node values and the last 4 queried points, about D + 6 float64 tensors of x's size.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch

MASK32 = 0xFFFFFFFF
PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # Salmon et al. 2011, Table 2 (Philox4x32 multipliers)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # Weyl key increments: golden ratio and √3 − 1, × 2³²
TAG = 0x42524F57  # "BROW": counter word 3, keeps these streams apart from any other use of a seed
# Philox blocks per batched op on the CPU: its int64 buffers (512 KiB each) stay in the cache (fastest of
# 8k–64k on a 2 MiB-L2 Xeon); other devices take the whole batch in one op
CHUNK = 32768


def philox4x32(counter: Sequence[torch.Tensor], key: Sequence[torch.Tensor], rounds: int = 10):
    """Philox4x32-R (Salmon et al. 2011, §3.3): four 32-bit counter words → four pseudo-random words.

    Words are int64 tensors holding values in [0, 2³²) that broadcast together. The 32 × 32 → 64-bit
    products wrap modulo 2⁶⁴ in int64, whose low 64 bits are exact; each round keeps the pair that is
    multiplied next masked and leaves the other pair's high bits to the mask after the xor. Tested
    against the Random123 known-answer vectors (tests/test_brownian.py).
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        p0, p1 = c0 * PHILOX_M[0], c2 * PHILOX_M[1]
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & MASK32, p1, ((p0 >> 32) ^ c3 ^ k1) & MASK32, p0
        k0, k1 = (k0 + PHILOX_W[0]) & MASK32, (k1 + PHILOX_W[1]) & MASK32
    return c0, c1 & MASK32, c2, c3 & MASK32


def _philox_stacked(x: torch.Tensor, y: torch.Tensor, keys: torch.Tensor):
    """philox4x32 on stacked pairs x = (c0, c2), y = (c1, c3) [2, …] with per-round keys [R, 2, …, 1]:
    the same function in 6 tensor ops a round, with no allocation. Products are written crosswise,
    p = (c2·M1, c0·M0), so the next x = hi(p) ^ y ^ (k0, k1) and y = lo(p) need no reordering.
    x and y are overwritten."""
    p = torch.empty_like(x)
    for r in range(keys.shape[0]):
        torch.mul(x[1], PHILOX_M[1], out=p[0])
        torch.mul(x[0], PHILOX_M[0], out=p[1])
        torch.bitwise_right_shift(p, 32, out=x)
        x.bitwise_xor_(y).bitwise_xor_(keys[r]).bitwise_and_(MASK32)
        p, y = y, p  # y = this round's products; the old y's buffer takes the next ones
    return x, y.bitwise_and_(MASK32)


def philox_keys(seeds: Sequence[int], rounds: int = 10, device: torch.device | str = "cpu") -> torch.Tensor:
    """The round keys [R, 2, B, 1] of per-image seeds: key = (low, high) 32 bits of seed mod 2⁶⁴."""
    s = [int(v) % 2**64 for v in seeds]
    k = torch.tensor([[v & MASK32 for v in s], [v >> 32 for v in s]], dtype=torch.int64)
    steps = torch.arange(rounds, dtype=torch.int64)[:, None, None] * torch.tensor(PHILOX_W)[:, None]
    return ((k + steps) & MASK32)[..., None].to(device)


def bridge(
    wa: torch.Tensor, wb: torch.Tensor, w: float, scale: float, keys: torch.Tensor, node: int
) -> torch.Tensor:
    """wa + w·(wb − wa) + scale·z [B, 4, J], z standard normal with z[k, q, j] a function of (seed_k, node,
    q, j) alone. Block j of node n is the counter (j, n mod 2³², n >> 32, TAG); its four words give two
    Box–Muller pairs (q = 0, 1 from words 0, 1 and q = 2, 3 from words 2, 3). Computed CHUNK blocks at a
    time, so each chunk's integers and normals stay in the cache."""
    out = torch.empty_like(wa)
    B, _, J = out.shape
    chunk = CHUNK if out.device.type == "cpu" else B * J
    g = max(1, min(B, chunk // J))  # images per batched op
    cb = min(J, chunk)  # blocks per batched op
    c = 2 * scale * scale
    for i in range(0, B, g):
        k = keys[:, :, i : i + g]
        for j in range(0, J, cb):
            n = min(cb, J - j)
            x = torch.empty(2, k.shape[2], n, dtype=torch.int64, device=out.device)
            x[0] = torch.arange(j, j + n, dtype=torch.int64, device=out.device)
            x[1] = (node >> 32) & MASK32
            y = torch.empty_like(x)
            y[0], y[1] = node & MASK32, TAG
            u, v = _philox_stacked(x, y, k)  # (word 0, word 2), (word 1, word 3)
            # Box–Muller, u ∈ (0, 1) never 0: scale·r = √(scale²·(−2 log((u + ½)·2⁻³²))), θ = 2π·v·2⁻³²
            r = torch.rsub(u.double().add_(0.5).log_(), c * 32 * math.log(2), alpha=c).sqrt_()
            th = v.double().mul_(2 * math.pi / 2**32)
            o = out[i : i + g, :, j : j + n]
            torch.lerp(wa[i : i + g, :, j : j + n], wb[i : i + g, :, j : j + n], w, out=o)
            o[:, 0::2].addcmul_(r.transpose(0, 1), th.cos().transpose(0, 1))
            o[:, 1::2].addcmul_(r.transpose(0, 1), th.sin_().transpose(0, 1))
    return out


class BrownianTree:
    """B Brownian paths W(t) on [t0, t1], W(t0) = 0, one per seed, for images of m elements: W(t) is a
    float64 [B, 4, J] tensor on `device` (an image's m elements padded to 4·J), `increment` gives [B, m].
    See the module docstring for the construction.

    t0 > 0 (the split points are geometric). rtol: the log-width of a leaf; depth D = ⌈log2(log(t1/t0) /
    rtol)⌉ (16 for SD's σ range at 1e-4).
    """

    def __init__(
        self,
        seeds: Sequence[int],
        m: int,
        t0: float,
        t1: float,
        rtol: float = 1e-4,
        device: torch.device | str = "cpu",
    ):
        if not 0 < t0 < t1:
            raise ValueError(f"a Brownian tree needs 0 < t0 < t1, got t0={t0}, t1={t1}")
        if not 0 < rtol < 1:
            raise ValueError(f"rtol is a leaf's log-width, in (0, 1); got {rtol}")
        self.t0, self.t1, self.m = float(t0), float(t1), int(m)
        self.depth = max(0, math.ceil(math.log2(math.log(t1 / t0) / rtol)))
        # blocks per image, a multiple of 16 so every image starts on a vector boundary (the batch does not
        # change which SIMD path computes an image's log/cos/sin)
        self.J = math.ceil(math.ceil(self.m / 4) / 16) * 16
        self.keys = philox_keys(seeds, device=device)
        self.B, self.device = len(seeds), torch.device(device)
        w0 = torch.zeros(self.B, 4, self.J, dtype=torch.float64, device=device)
        w1 = bridge(w0, w0, 0.0, math.sqrt(t1 - t0), self.keys, 0)  # node 0: W(t1)
        # the descent path: [node, depth, a, b, W(a), W(b), W(split) or None]; node 1 is [t0, t1]
        self.path: list[list] = [[1, 0, self.t0, self.t1, w0, w1, None]]
        self.points: OrderedDict[float, torch.Tensor] = OrderedDict()  # the last few W(t) asked for
        self.nodes = 0  # nodes drawn so far (for tests and benchmarks)

    def _bridge(self, node: int, a: float, b: float, t: float, wa: torch.Tensor, wb: torch.Tensor):
        """W(t) given W(a) = wa, W(b) = wb: the bridge mean plus its standard deviation times z(node)."""
        w = (t - a) / (b - a)
        self.nodes += 1
        return bridge(wa, wb, w, math.sqrt(w * (1 - w) * (b - a)), self.keys, node)

    def __call__(self, t: float) -> torch.Tensor:
        """W(t) [B, 4, J] (padded; `increment` crops it), t clamped to [t0, t1]."""
        t = min(max(float(t), self.t0), self.t1)
        if t == self.t0 or t == self.t1:  # the ends, without giving up the cached path
            return self.path[0][4 if t == self.t0 else 5]
        if t in self.points:
            self.points.move_to_end(t)
            return self.points[t]
        path = self.path
        while len(path) > 1 and not path[-1][2] <= t <= path[-1][3]:
            path.pop()  # back up to the deepest interval on the last path that holds t
        while True:
            e = path[-1]
            node, d, a, b, wa, wb, wm = e
            if t == a or t == b:
                w = wa if t == a else wb
                break
            if d == self.depth:  # a leaf: the bridge at t itself, with the leaf's own normal
                w = self._bridge(node, a, b, t, wa, wb)
                break
            mid = math.sqrt(a * b)
            if wm is None:
                wm = e[6] = self._bridge(node, a, b, mid, wa, wb)
            if t < mid:
                path.append([2 * node, d + 1, a, mid, wa, wm, None])
            else:
                path.append([2 * node + 1, d + 1, mid, b, wm, wb, None])
        self.points[t] = w
        if len(self.points) > 4:
            self.points.popitem(last=False)
        return w

    def increment(self, s: float, t: float) -> torch.Tensor:
        """W(t) − W(s) as [B, m] float64 (s first: a sampler's s is usually the last query's t, cached)."""
        ws = self(s)
        return (self(t) - ws).reshape(self.B, -1)[:, : self.m]
