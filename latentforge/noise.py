"""Seeded noise: initial latents, per-step noise and Brownian-tree noise.

Every image in a batch owns its seed, so image k's noise never depends on the batch size
(k-diffusion #25, A1111 #5210). Noise is drawn on the CPU by default and moved to the
tensor's device, so one seed gives the same image on any device (diffusers' advice; ComfyUI's
`prepare_noise`). The Brownian-tree samplers use `SeededBrownianNoiseSampler` (latentforge.brownian:
one counter-based tree for the whole batch); `BrownianTreeNoiseSampler` (torchsde, as k-diffusion) is
kept for comparisons with k-diffusion and is used only when passed as `noise_sampler`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from latentforge.brownian import BrownianTree

NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def seeds_for(seed: int | Sequence[int] | None, batch: int) -> list[int]:
    """Per-image seeds: an int gives seed, seed+1, ... (A1111's batch convention)."""
    if seed is None:
        return [int(s) for s in torch.randint(0, 2**63 - 1, (batch,), dtype=torch.int64)]
    if isinstance(seed, int):
        return [seed + k for k in range(batch)]
    seeds = [int(s) for s in seed]
    if len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {batch}; give one seed per image or an int")
    return seeds


def randn_seeded(
    shape: Sequence[int],
    seeds: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    generator_device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Standard normal noise [B, *shape[1:]] where row k is drawn from its own generator seeded seeds[k]."""
    rows = []
    for s in seeds:
        g = torch.Generator(device=generator_device).manual_seed(int(s))
        rows.append(torch.randn(tuple(shape[1:]), generator=g, dtype=torch.float32, device=generator_device))
    return torch.stack(rows).to(device=device, dtype=dtype)


class SeededNoiseSampler:
    """`noise_sampler(sigma, sigma_next)` with one CPU generator per image.

    The step-noise stream of image k is seeded with `seeds[k] + offset`, so it is independent
    of the initial-noise stream (seeded with `seeds[k]`) and of the other images.
    """

    def __init__(self, x: torch.Tensor, seeds: Sequence[int], offset: int = 0x5EED, device: str = "cpu"):
        self.shape = tuple(x.shape[1:])
        self.dtype, self.out_device = x.dtype, x.device
        self.gens = [torch.Generator(device=device).manual_seed(int(s) + offset) for s in seeds]
        self.device = device

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        rows = [torch.randn(self.shape, generator=g, device=self.device) for g in self.gens]
        return torch.stack(rows).to(device=self.out_device, dtype=self.dtype)


def _tree_ends(sigma_min: float, sigma_max: float) -> tuple[float, float]:
    """The ends of a tree over [σ_min, σ_max], rounded to 6 significant digits, so float32 and float64
    schedules build the same tree (its splits, hence its path, depend on t0 and t1), and widened by a hair
    so queries at the ends never fall outside it."""
    return float(f"{float(sigma_min):.6g}") * (1 - 1e-5), float(f"{float(sigma_max):.6g}") * (1 + 1e-5)


class BrownianTreeNoiseSampler:
    """Normalised Brownian increments W(σ_next) − W(σ) / √|σ_next − σ| from a seeded torchsde tree, as
    k-diffusion draws them: the reference for parity tests with k-diffusion and torchsde. The samplers'
    default is `SeededBrownianNoiseSampler` (per-image seeds too, at less than the cost of this class with
    one tree for the whole batch: benchmarks/brownian.py).

    Using one Brownian path for the whole trajectory makes SDE samplers converge as steps grow
    (Kloeden & Platen; the reason k-diffusion uses it for DPM++ SDE). One tree per image.
    `cpu=True` builds the trees on the CPU (the plain sampler names); `cpu=False` on x's device
    (the `_gpu` names), which gives different noise for the same seed, as in ComfyUI.
    """

    def __init__(
        self,
        x: torch.Tensor,
        sigma_min: float,
        sigma_max: float,
        seeds: Sequence[int],
        cpu: bool = True,
        per_image: bool = True,
        tol: float = 1e-6,
    ):
        """per_image=False: one tree over the whole batch, seeded seeds[0] (fast for large batches of
        points, as in benchmarks; image k's noise then depends on the batch)."""
        import torchsde

        if not 0 <= float(sigma_min) < float(sigma_max):
            raise ValueError(f"Brownian tree needs 0 <= sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.t0, self.t1 = _tree_ends(sigma_min, sigma_max)  # (torchsde warns on queries outside)
        self.device = torch.device("cpu") if cpu else x.device
        self.out_device, self.dtype = x.device, x.dtype
        self.shape = (x.shape[0], *x.shape[1:])
        self.per_image = per_image
        shape = tuple(x.shape[1:]) if per_image else tuple(x.shape)
        w0 = torch.zeros(shape, device=self.device, dtype=torch.float64)
        self.trees = [
            torchsde.BrownianTree(t0=self.t0, w0=w0, t1=self.t1, entropy=int(s) % (2**63), tol=tol)
            for s in (seeds if per_image else seeds[:1])
        ]

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        a = min(max(float(sigma), self.t0), self.t1)
        b = min(max(float(sigma_next), self.t0), self.t1)
        lo, hi = min(a, b), max(a, b)
        if hi - lo <= 0:
            return torch.zeros(self.shape, dtype=self.dtype, device=self.out_device)
        sign = 1.0 if b >= a else -1.0
        if self.per_image:
            w = torch.stack([tree(lo, hi) for tree in self.trees])
        else:
            w = self.trees[0](lo, hi)
        w = w * (sign / (hi - lo) ** 0.5)
        return w.to(device=self.out_device, dtype=self.dtype)


class SeededBrownianNoiseSampler:
    """Normalised Brownian increments (W(σ_next) − W(σ)) / √|σ_next − σ|, image k's path seeded by seeds[k]
    alone, all images in one batched tree (`latentforge.brownian.BrownianTree`, Philox4x32-10 normals).

    The default for the Brownian-tree samplers: the same path for every step count, so SDE samplers
    converge as steps grow (Kloeden & Platen), and the same image k whatever else is in the batch, at
    0.7–0.8× the cost of one torchsde tree over the whole batch (benchmarks/brownian.py). σ outside
    [sigma_min, sigma_max] is clamped to it. `cpu=True` builds the tree on the CPU; `cpu=False` on x's
    device, which gives the same integers and normals equal up to an ulp of log/cos/sin. The noise is
    computed in float64 whatever x's dtype. rtol: the log-width of the tree's leaves; the law of W is
    exact at any points in different leaves, which points more than rtol apart in log σ always are.
    """

    def __init__(
        self,
        x: torch.Tensor,
        sigma_min: float,
        sigma_max: float,
        seeds: Sequence[int],
        cpu: bool = True,
        rtol: float = 1e-4,
    ):
        if not 0 < float(sigma_min) < float(sigma_max):
            raise ValueError(f"Brownian tree needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        if len(seeds) != x.shape[0]:
            raise ValueError(f"got {len(seeds)} seeds for a batch of {x.shape[0]}")
        self.t0, self.t1 = _tree_ends(sigma_min, sigma_max)
        self.shape, self.out_device, self.dtype = tuple(x.shape), x.device, x.dtype
        device = torch.device("cpu") if cpu else x.device
        self.tree = BrownianTree(seeds, x[0].numel(), self.t0, self.t1, rtol=rtol, device=device)

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        a = min(max(float(sigma), self.t0), self.t1)
        b = min(max(float(sigma_next), self.t0), self.t1)
        if a == b:
            return torch.zeros(self.shape, dtype=self.dtype, device=self.out_device)
        w = self.tree.increment(a, b) * (1 / abs(b - a) ** 0.5)
        return w.reshape(self.shape).to(device=self.out_device, dtype=self.dtype)


def default_noise_sampler(
    x: torch.Tensor,
    seed: int | Sequence[int] | None,
    sigmas: torch.Tensor | None = None,
    brownian: bool = False,
    cpu: bool = True,
) -> NoiseSampler:
    """The noise a stochastic sampler uses when the caller gives no `noise_sampler`.

    seed: an int (image k uses seed+k), a list (one per image) or None (drawn from torch's global RNG,
    so `torch.manual_seed` still makes a run repeatable).
    """
    seeds = seeds_for(seed, x.shape[0])
    if brownian:
        if sigmas is None:
            raise ValueError("a Brownian-tree noise sampler needs the sigmas it will be queried on")
        pos = sigmas[sigmas > 0]
        hi = float(sigmas.max())
        lo = float(pos.min()) if float(pos.min()) < hi else hi / 2  # one positive σ: any lower end works
        return SeededBrownianNoiseSampler(x, lo, hi, seeds, cpu=cpu)
    return SeededNoiseSampler(x, seeds)


# -- A1111's variation seeds ------------------------------------------------------------------------------


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation (Shoemake 1985) from a (t = 0) to b (t = 1), for each image [C, H, W].

    The angle is taken per (channel, column) along H, as A1111 does (`processing.slerp` normalises over
    dim 1 of a [C, H, W] noise), so a variation seed gives the noise A1111 gives with its CPU generator.
    Where the two are nearly parallel (cos > 0.9995 on average) it falls back to the straight line."""
    a64, b64 = a.double(), b.double()
    dot = ((a64 / a64.norm(dim=-2, keepdim=True)) * (b64 / b64.norm(dim=-2, keepdim=True))).sum(-2)
    if float(dot.mean()) > 0.9995:
        return ((1 - t) * a64 + t * b64).to(a.dtype)
    omega = torch.acos(dot.clamp(-1, 1))  # [..., C, W]
    so = torch.sin(omega)
    out = (torch.sin((1 - t) * omega) / so).unsqueeze(-2) * a64 + (torch.sin(t * omega) / so).unsqueeze(
        -2
    ) * b64
    return out.to(a.dtype)


def variation_noise(
    shape: Sequence[int],
    seeds: Sequence[int],
    subseeds: Sequence[int] | None = None,
    subseed_strength: float = 0.0,
    resize_from: tuple[int, int] | None = None,
    generator_device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The initial noise [B, C, h, w] of A1111's "Variation seed" and "Resize seed from" (its
    `create_random_tensors`, with the CPU generator that `randn_seeded` is):

    - image k's noise is drawn from seeds[k]; with subseed_strength s > 0 it is slerp(s, noise(seeds[k]),
      noise(subseeds[k])): s = 0 is the seed's image, s = 1 the variation seed's;
    - generator_device: where the generators run ("cpu": the same noise on any device);
    - resize_from (h', w') in latent pixels: both are drawn at [C, h', w'] instead, and that noise is placed
      centred into a [C, h, w] draw of seeds[k] (cropped centred where it is larger), so an image keeps its
      composition when its size changes.
    """
    b, c, h, w = shape
    src = (c, *resize_from) if resize_from is not None else (c, h, w)
    gd = {"generator_device": generator_device, "device": generator_device}
    noise = randn_seeded((b, *src), seeds, **gd)
    if subseed_strength > 0:
        if subseeds is None or len(subseeds) != b:
            raise ValueError(f"variation noise needs one subseed per image ({b}), got {subseeds!r}")
        noise = slerp(float(subseed_strength), noise, randn_seeded((b, *src), subseeds, **gd))
    if tuple(src[1:]) == (h, w):
        return noise
    out = randn_seeded((b, c, h, w), seeds, **gd)
    dy, dx = (h - src[1]) // 2, (w - src[2]) // 2  # where the source's top-left lands (negative: cropped)
    # a larger source is cut by the same margin on both sides (A1111: an odd excess loses one more row)
    hh, ww = (src[1] if dy >= 0 else src[1] + 2 * dy), (src[2] if dx >= 0 else src[2] + 2 * dx)
    ty, tx, sy, sx = max(dy, 0), max(dx, 0), max(-dy, 0), max(-dx, 0)
    out[:, :, ty : ty + hh, tx : tx + ww] = noise[:, :, sy : sy + hh, sx : sx + ww]
    return out
