"""Residual caching of a transformer's block stack (DiT, MMDiT): skip every block on steps where their
combined effect is predicted not to have changed.

With h the tokens entering the stack [B, T, D] and S(h, c) its output, the cached quantity is the residual
r = S(h, c) − h of the last step that ran the stack; a skipped step returns h + r (the stack's output
had it run with the old residual) and goes on to the final layer. Two rules say when to run the stack:

- a fixed interval, every N steps (FORA, Selvaraju et al. 2024, "FORA: Fast-Forward Caching in Diffusion
  Transformer Acceleration", arXiv:2407.01425, §3: a full pass every N steps, reuse in between; FORA
  caches each layer's attention and MLP outputs, here the whole stack's residual, which saves the same
  work with one tensor). Steps count in σ (speedups.StepClock), as DeepCache's;
- TeaCache (Liu et al. 2024, "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model",
  arXiv:2411.19108, §3.3-3.4): the input of the first block modulated by the timestep embedding,
  F_t = modulate(norm1(h_t), shift(c_t), scale(c_t)) [B, T, D], tracks how much the output changes; its
  relative L1 distance to the previous call's, L1_rel = ‖F_t − F_{t−1}‖₁ / ‖F_{t−1}‖₁ (Eq. 4), is summed
  over the skipped calls, and the stack runs once the sum reaches `threshold` (the sum then restarts
  at 0). The paper rescales L1_rel with a polynomial fitted per model (Eq. 5); no such fit exists for the
  models here, so the distance is used as it is (the paper's unrescaled variant). The first call and the
  last step of the schedule always run the stack.

TeaCache's decision is taken per row of the batch (each image, and each half of CFG's doubled batch, has
its own distance and sum), so an image's result does not depend on its batch mates; rows that must run
the stack run it together, the others take their cached residual. A call whose batch or token count
differs from the cache's runs the stack for every row.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from latentforge.models.dit import DiT
from latentforge.models.embeddings import modulate
from latentforge.models.mmdit import MMDiT
from latentforge.speedups import Interval, Stats, StepClock, replaced_forward


class StackCache:
    """The cache of one sampling pass: which rows run the stack at a call, and its last residual."""

    def __init__(self, interval: int, threshold: float, clock: StepClock, stats: Stats):
        self.policy = Interval(interval, clock) if interval > 1 else None
        self.threshold, self.clock, self.stats = float(threshold), clock, stats
        self.last_step = None if clock.ts is None else len(clock.ts) - 1
        self.residual: torch.Tensor | None = None  # S(h, c) − h [B, T, D]
        self.prev: torch.Tensor | None = None  # TeaCache: the last call's modulated input [B, T, D]
        self.acc: torch.Tensor | None = None  # TeaCache: the summed relative L1 distance per row [B]
        self.key = None

    def rows(self, h: torch.Tensor, c: torch.Tensor, t, indicator: Callable) -> torch.Tensor:
        """The rows [B] (bool) that run the stack at this call."""
        key = (tuple(h.shape), h.dtype, h.device)
        fresh = self.residual is None or key != self.key
        self.key = key
        if self.policy is not None:
            full = self.policy.full(t, key) or fresh
            return torch.full((h.shape[0],), full, device=h.device)
        m = indicator(h, c).float()  # F_t [B, T, D]
        step = self.clock.step(t)
        if fresh:
            self.acc = torch.zeros(h.shape[0], device=h.device)
            run = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
        else:
            dims = tuple(range(1, m.ndim))
            rel = (m - self.prev).abs().mean(dims) / self.prev.abs().mean(dims).clamp_min(1e-12)  # Eq. 4
            self.acc = self.acc + rel
            run = (self.acc >= self.threshold) | (step == self.last_step)
        self.prev = m
        return run

    def run(self, h: torch.Tensor, c: torch.Tensor, rows_of: Sequence, t, stack: Callable, indicator):
        """The stack's output for tokens h [B, T, D] and conditioning c [B, D]; `rows_of`: the other
        per-row inputs of `stack(h, c, *rows_of)` (None where absent)."""
        run = self.rows(h, c, t, indicator)
        self.stats.calls += 1
        if bool(run.all()):
            out = stack(h, c, *rows_of)
            self.residual = out - h
            self.stats.full += 1
        elif not bool(run.any()):
            out = h + self.residual
        else:
            idx = run.nonzero().squeeze(1)
            sub = stack(h[idx], c[idx], *(None if a is None else a[idx] for a in rows_of))
            self.residual[idx] = sub - h[idx]
            out = h + self.residual
            out[idx] = sub
            self.stats.partial += 1
        if self.acc is not None:
            self.acc = torch.where(run, torch.zeros_like(self.acc), self.acc)
        return out


def _dit_forward(net: DiT, cache: StackCache):
    """DiT.forward with the block loop through the cache (the rest as in models/dit.py)."""

    def indicator(h, c):  # block 0's modulated self-attention input: modulate(norm1 h, shift_msa, scale_msa)
        b = net.blocks[0]
        shift, scale = b.adaLN_modulation(c).chunk(6, dim=1)[:2]
        return modulate(b.norm1(h), shift, scale)

    def stack(h, c, context, context_mask):
        for block in net.blocks:
            h = block(h, c, context, context_mask)  # [N, T, D]
        return h

    def forward(x: torch.Tensor, t: torch.Tensor, y=None, context=None, context_mask=None) -> torch.Tensor:
        h, c, context = net.embed(x, t, y, context)
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        h = cache.run(h, c, (context, context_mask), t, stack, indicator)
        return net.unpatchify(net.final_layer(h, c)).to(x.dtype)  # [N, C_out, H, W]

    return forward


def _mmdit_forward(net: MMDiT, cache: StackCache):
    """MMDiT.forward with the joint-block loop through the cache (MMDiT.embed before it); the
    cached residual is the image stream's (the context stream ends at the last, pre-only block)."""

    def indicator(x, c):  # block 0's image-stream attention input, modulated by (shift_msa, scale_msa)
        xb = net.joint_blocks[0].x_block
        mods = xb.adaLN_modulation(c).chunk(xb.n_mods, dim=1)
        return modulate(xb.norm1(x), mods[0], mods[1])

    def forward(
        x, t, y=None, context=None, skip_layers: Sequence[int] = (), context_mask=None
    ) -> torch.Tensor:
        def stack(x, c, context, context_mask):
            for i, block in enumerate(net.joint_blocks):
                if i not in skip_layers:
                    context, x = block(context, x, c, context_mask)
            return x

        x, c, context, (h, w) = net.embed(x, t, y, context)
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        x = cache.run(x, c, (context, context_mask), t, stack, indicator)
        return net.unpatchify(net.final_layer(x, c), h, w)  # [B, C_out, H, W]

    return forward


@contextlib.contextmanager
def patch(net: nn.Module, interval: int, threshold: float, clock: StepClock, stats: Stats) -> Iterator[None]:
    """`net` (a DiT or an MMDiT) caches its block stack's residual while the block runs: every `interval`
    steps (> 1), or TeaCache with `threshold` (> 0). Nothing is left on the module after."""
    if (interval > 1) == (threshold > 0):
        raise ValueError("block caching needs exactly one of interval > 1 or threshold > 0")
    cache = StackCache(interval, threshold, clock, stats)
    if isinstance(net, DiT):
        forward = _dit_forward(net, cache)
    elif isinstance(net, MMDiT):
        forward = _mmdit_forward(net, cache)
    else:
        raise ValueError(f"block caching takes a DiT or an MMDiT, got {type(net).__name__}")
    with replaced_forward(net, forward):
        yield
