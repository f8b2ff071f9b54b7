"""Weight initialisation: from an explicit generator where reproducibility matters, free on the meta device.

Construction draws every network's initial weights as the original code does, from torch's global RNG
(nn.Linear/nn.Conv2d defaults, and each module's `initialize_weights()` for what differs from them).
`init_weights(model, generator)` draws all of them again, with the same distributions, from `generator`
only: what a training run that wants reproducible weights calls (the global RNG state is left alone).

Models are built on the meta device and then loaded with `assign=True` (DESIGN.md); there is nothing to
draw there, and torch's meta `normal_` costs about a second the first time a process runs it (it loads
Python decompositions), which would dominate loading a checkpoint. `normal_` and `Embedding` skip meta
tensors.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Layers whose parameters torch's own defaults initialise (reset_parameters), redrawn here from a generator.
_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)


def normal_(t: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """N(0, std²) in place (from `generator`, or the global RNG), except on the meta device."""
    if t.device.type != "meta":
        nn.init.normal_(t, std=std, generator=generator)
    return t


class Embedding(nn.Embedding):
    """nn.Embedding initialised N(0, std²) (instead of its default N(0, 1), which is never drawn)."""

    def __init__(self, num: int, dim: int, std: float):
        super().__init__(num, dim, _weight=torch.empty(num, dim))
        self.std = std
        self.initialize_weights()

    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        normal_(self.weight, self.std, generator)


def _default_init(m: nn.Module, generator: torch.Generator | None) -> None:
    """torch's `reset_parameters` of a standard layer, drawing from `generator`."""
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        # kaiming-uniform with a = √5, i.e. U(±1/√fan_in), and the bias U(±1/√fan_in) (nn.Linear/_ConvNd)
        nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
        if m.bias is not None:
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(m.weight)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(m.bias, -bound, bound, generator=generator)
    elif isinstance(m, _NORMS):
        m.reset_parameters()  # ones and zeros: nothing drawn
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, generator=generator)
        if m.padding_idx is not None:
            m.weight[m.padding_idx].zero_()
    elif any(True for _ in m.parameters(recurse=False)):
        raise TypeError(f"init_weights: {type(m).__name__} has parameters but no initialize_weights()")


@torch.no_grad()
def init_weights(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Draw every parameter of `model` afresh from `generator` (None: the global RNG), with the
    distributions construction uses: torch's defaults for Linear, Conv2d, norms and Embedding, then each
    module's own `initialize_weights(generator)` (zero-initialised output layers, DiT's xavier/adaLN-Zero,
    CLIP's tables), innermost modules first so that an outer module's choice wins, as in construction.
    Buffers are left as they are. Returns `model`."""
    modules = list(model.modules())
    for m in modules:
        if not hasattr(m, "initialize_weights"):
            _default_init(m, generator)
    for m in reversed(modules):  # every module after all the modules inside it
        if hasattr(m, "initialize_weights"):
            m.initialize_weights(generator)
    return model
