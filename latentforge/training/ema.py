"""The exponential moving average of the trained weights (what a run samples with and exports).

`EMA` keeps a float32 average of a model's parameters (buffers are copied), with the warm-up decay
min(decay, (1 + step)/(10 + step)) of ldm's `LitEma` (CompVis/latent-diffusion, ldm/modules/ema.py) and
diffusers' `EMAModel.get_decay` (diffusers/training_utils.py). Its state is saved with the training state
(state.py: ema.safetensors, settings in state.json).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch


class EMA:
    """Exponential moving average of `model`'s parameters, kept in float32 whatever dtype the model trains in.

    ``shadow ← shadow + (1 − d)·(param − shadow)`` with d = min(decay, (1 + step)/(10 + step)) when `warmup`
    (LitEma's num_updates rule), else d = decay. Buffers (e.g. norm statistics) are copied, not averaged.
    Keys are the model's state-dict keys, so `state_dict()` is a loadable weights file.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.param_names = [n for n, _ in model.named_parameters()]
        self.shadow: dict[str, torch.Tensor] = {}
        sd = model.state_dict()
        for k, v in sd.items():
            v = v.detach()
            self.shadow[k] = v.to(torch.float32, copy=True) if v.is_floating_point() else v.clone()

    def decay_at(self, step: int) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int | None = None) -> float:
        """Fold the model's current weights in; `step` defaults to the number of updates so far.
        Returns the decay used."""
        d = self.decay_at(self.num_updates if step is None else int(step))
        params = dict(model.named_parameters())
        avg, new = [], []
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if k in params and s.is_floating_point():
                avg.append(s)
                new.append(v.detach().to(device=s.device, dtype=torch.float32))
            else:
                s.copy_(v.detach())
        if avg:  # one pass over all tensors (torch's foreach kernels), the same lerp as a loop per tensor
            torch._foreach_lerp_(avg, new, 1.0 - d)
        self.num_updates += 1
        return d

    def copy_to(self, model: torch.nn.Module) -> None:
        """Write the averaged weights into `model` (cast to each tensor's dtype, in place)."""
        load_weights(model, self.shadow)

    def swapped(self, model: torch.nn.Module) -> contextlib.AbstractContextManager[torch.nn.Module]:
        """Temporarily put the EMA weights into `model` (e.g. to sample); the training weights come back
        bit for bit on exit, even when the body raises."""
        return weights_swapped(model, self.shadow)

    def to(self, device: torch.device | str) -> EMA:
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def settings(self) -> dict[str, Any]:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates}

    @torch.no_grad()
    def load_state_dict(
        self, sd: Mapping[str, torch.Tensor], settings: Mapping[str, Any] | None = None
    ) -> None:
        missing = sorted(set(self.shadow) - set(sd))
        unexpected = sorted(set(sd) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(
                f"EMA state does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for k, v in sd.items():
            if tuple(v.shape) != tuple(self.shadow[k].shape):
                raise ValueError(f"EMA {k}: shape {tuple(v.shape)}, expected {tuple(self.shadow[k].shape)}")
            self.shadow[k].copy_(v)
        if settings:
            self.decay = float(settings.get("decay", self.decay))
            self.warmup = bool(settings.get("warmup", self.warmup))
            self.num_updates = int(settings.get("num_updates", self.num_updates))


@torch.no_grad()
def load_weights(model: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Copy `weights` (state-dict keys, any dtype and device) into `model`'s tensors in place."""
    for k, v in model.state_dict().items():
        v.copy_(weights[k])


@contextlib.contextmanager
def weights_swapped(model: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> Iterator[torch.nn.Module]:
    """`model` holding `weights` (e.g. an EMA's, or the full EMA gathered from FSDP shards) inside the block;
    its own weights come back bit for bit on exit, even when the body raises."""
    backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
    load_weights(model, weights)
    try:
        yield model
    finally:
        load_weights(model, backup)
