"""DeepCache for the LDM/SGM UNet (Ma, Fang & Wang 2023, "DeepCache: Accelerating Diffusion Models for
Free", arXiv:2312.00858).

A UNet's skip branches (§3.1): skip branch i joins input_blocks[i]'s output (the down path's D_i) to
output_blocks[n − 1 − i] (its up path's U_i), n = len(input_blocks). What enters U_i besides the skip is
the output of everything deeper, the "high-level features"

    F_i = output_blocks[n − 2 − i](...)         [B, C_i, h_i, w_i]   (the middle block's output for i = n − 1)

which change slowly from one denoising step to the next (the paper's Fig. 2: their similarity between
adjacent steps stays high). So (§3.2, Eq. 4-5, "uniform 1:N" strategy of §3.3): at every N-th step run the
whole UNet and keep F_i; at the steps between, run only D_0 .. D_i (input_blocks[0..i]), then U_i .. U_0
on [F_i (cached) | skip_i] and the shallower skips, and the output head. Branch 0 recomputes the least
(conv_in, the last output block, the head), deeper branches recompute more and drift less.

Steps are counted in σ by the sampler's schedule (speedups.StepClock): with classifier-free guidance the
conditional and unconditional halves are one batched call and share the cache ([2B, C, h, w]); Heun-type
corrector calls count at the σ they evaluate, so a refresh every N steps costs ⌈steps / N⌉ full passes
for any sampler. A call whose batch or size differs from the cached features' runs the full UNet.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from latentforge.models.unet import UNet, embed
from latentforge.models.winograd import workspace
from latentforge.speedups import Interval, Stats, replaced_forward


@contextlib.contextmanager
def patch(unet: UNet, depth: int, policy: Interval, stats: Stats) -> Iterator[None]:
    """`unet` runs DeepCache at skip branch `depth` while the block runs; `policy.full(t, key)` says which
    calls run the whole network. Nothing is left on the module after (speedups.replaced_forward)."""
    n = len(unet.input_blocks)
    if not 0 <= depth < n:
        raise ValueError(f"cache_depth must be in [0, {n - 1}] for this UNet, got {depth}")
    join = n - 1 - depth  # output_blocks[join] takes [F_depth | skip_depth]
    cache: dict[str, torch.Tensor] = {}

    def forward(x: torch.Tensor, timesteps, context=None, y=None, context_mask=None) -> torch.Tensor:
        with workspace():  # as UNet.forward: its 3×3 convolutions take the same (Winograd) path
            return run(x, timesteps, context, y, context_mask)

    def run(x: torch.Tensor, timesteps, context, y, context_mask) -> torch.Tensor:
        emb, context, dtype = embed(unet, x, timesteps, context, y, context_mask)  # UNet.forward's prologue
        key = (tuple(x.shape), x.dtype, x.device)
        full = policy.full(timesteps, key) or "features" not in cache
        stats.calls += 1
        stats.full += full
        h, skips = x.to(dtype), []
        for block in unet.input_blocks if full else unet.input_blocks[: depth + 1]:
            h = block(h, emb, context, context_mask=context_mask)  # D_0 .. D_{n-1} (full) or D_0 .. D_depth
            skips.append(h)
        if full:
            h = unet.middle_block(h, emb, context, context_mask=context_mask)
        for j in range(0 if full else join, n):
            if j == join:
                if full:
                    cache["features"] = h  # F_depth [B, C, h, w]: nothing writes into it later
                else:
                    h = cache["features"]
            h = torch.cat([h, skips.pop()], dim=1)
            size = skips[-1].shape[-2:] if skips else None
            h = unet.output_blocks[j](h, emb, context, size, context_mask)
        return unet.out(h).to(x.dtype)

    with replaced_forward(unet, forward):
        yield
