"""Doing less work per image: step caching and token merging, on for one sampling pass and gone after it.

Three methods, each in its own file, each written from its paper:

- DeepCache (Ma et al. 2023; deepcache.py), UNets: every `cache_interval` steps a full pass caches the
  decoder's features above skip branch `cache_depth`; the steps between run that branch only.
- Block-stack residual caching (blockcache.py), DiT and MMDiT: the residual of the whole transformer
  stack (output − input) is reused on steps where it is predicted not to have changed, either at a fixed
  interval (`cache_interval`: FORA, Selvaraju et al. 2024, at the granularity of the whole stack) or when
  the accumulated relative L1 change of the first block's timestep-modulated input stays below
  `cache_threshold` (TeaCache, Liu et al. 2024).
- Token merging for SD (Bolya & Hoffman 2023; tome.py), UNets: `tome_ratio` of the tokens are merged
  before self-attention in the transformers at downsampling factor ≤ `tome_max_downsample`, and
  unmerged after it.

Names a practitioner knows: `cache_interval` / `cache_depth` are the ComfyUI DeepCache node's (diffusers'
`DeepCacheSDHelper.set_params(cache_interval, cache_branch_id)`), `cache_threshold` is TeaCache's
`rel_l1_thresh`, `tome_ratio` / `tome_max_downsample` are tomesd's `ratio` / `max_downsample` (A1111's
"Token merging ratio"). Every option's "off" value (interval 1, threshold 0, ratio 0) installs nothing, so
the output is bit-identical to a call without it.

`applied(net, options, timesteps)` patches the network for the duration of one sampling pass (Pipeline
`_sample`): a replaced `forward` on the instance (removed after) and forward hooks (removed after), so the
model's class, weights and hooks are as before once it exits, however it exits. The network's own hooks
(a LoRA's, lora.patch) still run: the replaced forward is still called through `nn.Module.__call__`.

Step counting (the cache's clock, `StepClock`): a sampler calls the network once per step for Euler-type
samplers, with classifier-free guidance's conditional and unconditional halves in ONE batched call, but
twice or more for Heun, DPM-2 and the 2S/3M-SDE family. The clock therefore counts in σ, not in calls:
a call belongs to the schedule interval [σ_{i+1}, σ_i] that holds its σ (seen as the network's timestep
t(σ), monotone in σ for every model sampling here), and the interval counts as step i. Heun's corrector
at σ_{i+1} and the next step's predictor share step i + 1, a DPM-2 midpoint belongs to its step, and a
cache refreshed at step i serves every call of steps i + 1 .. i + N − 1. Without a schedule (a bare model
called in a loop), each new timestep is a new step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

TOME_DOWNSAMPLES = (1, 2, 4, 8)  # tomesd's max_downsample values: the UNet levels' downsampling factors
MAX_CACHE_INTERVAL = 1000


@dataclass(frozen=True)
class Speedups:
    """The per-call options; the defaults are all off.

    cache_interval: UNet: DeepCache; DiT/MMDiT: FORA-style residual reuse; a full pass every N steps (1: off).
    cache_depth: DeepCache's skip branch (0: the shallowest, input_blocks[0]; up to len(input_blocks) − 1,
        which caches only the middle block). Deeper branches reuse less and recompute more.
    cache_threshold: DiT/MMDiT: TeaCache's accumulated relative L1 threshold (0: off); ~0.05-0.3.
    tome_ratio: UNet: the share of tokens merged before self-attention, in [0, 0.95] (0: off).
    tome_max_downsample: merge in transformers at downsampling factor ≤ this (1, 2, 4, 8; tomesd: 1).
    """

    cache_interval: int = 1
    cache_depth: int = 0
    cache_threshold: float = 0.0
    tome_ratio: float = 0.0
    tome_max_downsample: int = 1

    def applied(self, net: nn.Module, timesteps=None) -> contextlib.AbstractContextManager[Stats]:
        """`applied(net, self, timesteps)`: these options on `net` while a `with` block runs."""
        return applied(net, self, timesteps)

    @property
    def active(self) -> bool:
        return self.cache_interval > 1 or self.cache_threshold > 0 or self.tome_ratio > 0

    def check(self, net: nn.Module | None = None) -> Speedups:
        """Raise ValueError naming a bad value and its range (and, with `net`, an option its kind of
        network does not take); returns self."""
        ci, cd = self.cache_interval, self.cache_depth
        if isinstance(ci, bool) or not isinstance(ci, int) or not 1 <= ci <= MAX_CACHE_INTERVAL:
            raise ValueError(
                f"cache_interval must be an integer in [1, {MAX_CACHE_INTERVAL}] (1: off), got {ci!r}"
            )
        if isinstance(cd, bool) or not isinstance(cd, int) or cd < 0:
            raise ValueError(f"cache_depth must be an integer >= 0 (DeepCache's skip branch), got {cd!r}")
        th = self.cache_threshold
        if isinstance(th, bool) or not isinstance(th, (int, float)) or not (0 <= th < math.inf):
            raise ValueError(f"cache_threshold must be a finite number >= 0 (0: off), got {th!r}")
        r = self.tome_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= 0.95:
            raise ValueError(f"tome_ratio must be a number in [0, 0.95] (0: off), got {r!r}")
        if isinstance(self.tome_max_downsample, bool) or self.tome_max_downsample not in TOME_DOWNSAMPLES:
            raise ValueError(
                f"tome_max_downsample must be one of {TOME_DOWNSAMPLES}, got {self.tome_max_downsample!r}"
            )
        if ci > 1 and th > 0:
            raise ValueError("give cache_interval (a fixed interval) or cache_threshold (TeaCache), not both")
        if net is None:
            return self
        from latentforge.models.unet import UNet

        kind = type(net).__name__
        if isinstance(net, UNet):
            n = len(net.input_blocks)
            if cd >= n:
                raise ValueError(
                    f"cache_depth must be in [0, {n - 1}] for this UNet ({n} input blocks), got {cd}"
                )
            if th > 0:
                raise ValueError(
                    "cache_threshold (TeaCache) is for DiT/MMDiT; a UNet takes cache_interval (DeepCache)"
                )
        else:
            if r > 0:
                raise ValueError(f"tome_ratio (token merging for SD) is for UNets, not a {kind}")
            if cd:
                raise ValueError(
                    f"cache_depth is DeepCache's UNet skip branch; a {kind} caches its whole block stack"
                )
        return self


class StepClock:
    """The sampler step a network call belongs to, from its timestep (see the module docstring).

    timesteps: t(σ_i) of the schedule's σ > 0, in sampling order (None: count distinct timesteps)."""

    def __init__(self, timesteps: Sequence[float] | torch.Tensor | None = None):
        ts = None if timesteps is None else [float(t) for t in torch.as_tensor(timesteps).reshape(-1)]
        self.ts = ts or None
        self.rising = self.ts is None or self.ts[0] >= self.ts[-1]  # t grows with σ (every model sampling)
        # float32 timesteps against the schedule's own: far below any step's spacing
        self.tol = 0.0 if self.ts is None else 1e-5 * max(abs(t) for t in self.ts) + 1e-12
        self._last, self._count = None, -1

    def step(self, t: torch.Tensor | float) -> int:
        v = float(torch.as_tensor(t).reshape(-1)[0])
        if self.ts is None:
            if v != self._last:
                self._last, self._count = v, self._count + 1
            return self._count
        # the interval [σ_{i+1}, σ_i] holding σ: the number of schedule points at or above it, minus one
        if self.rising:
            k = sum(1 for s in self.ts if s >= v - self.tol)
        else:
            k = sum(1 for s in self.ts if s <= v + self.tol)
        return max(k - 1, 0)


class Interval:
    """A full pass at the first call, then whenever the step is N or more past the last full one (or
    before it: a new pass), or the batch's shape changed (e.g. a guidance interval dropping CFG's half)."""

    def __init__(self, n: int, clock: StepClock):
        self.n, self.clock = n, clock
        self.last: int | None = None
        self.key = None

    def full(self, t: torch.Tensor, key) -> bool:
        k = self.clock.step(t)
        if self.last is None or key != self.key or k < self.last or k - self.last >= self.n:
            self.last, self.key = k, key
            return True
        return False


@dataclass
class Stats:
    """What one pass did: network calls, those that ran the full network for every row, and (block
    caching with a threshold) those that ran it for some rows only."""

    calls: int = 0
    full: int = 0
    partial: int = 0


@contextlib.contextmanager
def applied(
    net: nn.Module, options: Speedups, timesteps: Sequence[float] | torch.Tensor | None = None
) -> Iterator[Stats]:
    """`net` patched with `options` while the block runs (nothing when they are all off); yields the Stats
    of the pass. timesteps: the schedule's t(σ_i) for σ_i > 0 (StepClock)."""
    options.check(net)
    stats = Stats()
    if not options.active:
        yield stats
        return
    from latentforge.models.unet import UNet

    with contextlib.ExitStack() as stack:
        if options.tome_ratio > 0:
            from latentforge import tome

            stack.enter_context(tome.patch(net, options.tome_ratio, options.tome_max_downsample))
        if options.cache_interval > 1 or options.cache_threshold > 0:
            clock = StepClock(timesteps)
            if isinstance(net, UNet):
                from latentforge import deepcache

                policy = Interval(options.cache_interval, clock)
                stack.enter_context(deepcache.patch(net, options.cache_depth, policy, stats))
            else:
                from latentforge import blockcache

                stack.enter_context(
                    blockcache.patch(net, options.cache_interval, options.cache_threshold, clock, stats)
                )
        yield stats


@contextlib.contextmanager
def replaced_forward(net: nn.Module, forward: Callable) -> Iterator[None]:
    """`net.forward` is `forward` while the block runs; the instance attribute is deleted after, so the
    class's forward is back. Calls still go through nn.Module.__call__ (the module's hooks run)."""
    if "forward" in vars(net):
        raise RuntimeError(f"{type(net).__name__}.forward is already replaced (two speedups on one network?)")
    net.forward = forward
    try:
        yield
    finally:
        del net.forward
