"""Weight initialisation that stays free on the meta device.

Models are built on the meta device and then loaded with `assign=True` (DESIGN.md); there is nothing to
draw there, and torch's meta `normal_` costs about a second the first time a process runs it (it loads
Python decompositions), which would dominate loading a checkpoint. These helpers skip meta tensors.
"""

from __future__ import annotations

import torch
from torch import nn


def normal_(t: torch.Tensor, std: float) -> torch.Tensor:
    """N(0, std²) in place, except on the meta device."""
    if t.device.type != "meta":
        nn.init.normal_(t, std=std)
    return t


def embedding(num: int, dim: int, std: float) -> nn.Embedding:
    """nn.Embedding initialised N(0, std²) (without its default N(0, 1) draw)."""
    return nn.Embedding(num, dim, _weight=normal_(torch.empty(num, dim), std))
