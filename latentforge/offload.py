"""Sequential model offload: one component on the accelerator at a time.

A text-to-image job uses its networks in turn: the text encoders once, the denoiser for every step, the
VAE at the end (and at the start for img2img). With offload every component lives in host memory and
moves to the device when it runs; the one there before moves back first. The device then needs the
largest component plus its activations, not the whole model: SDXL's UNet (2.6 B parameters, 5.1 GB in
fp16) fits where UNet + both text encoders + VAE (7 GB) do not. The cost is one host-to-device copy of each
component per job (a component already there is not moved again). This is diffusers'
`enable_model_cpu_offload` ("model offload": whole components), not accelerate's per-layer
`enable_sequential_cpu_offload`, which is far slower.
"""

from __future__ import annotations

import torch
from torch import nn

HOME = torch.device("cpu")


class Offload:
    """components: the pipeline's {name: module}, moved home now; device: where they run."""

    def __init__(self, device, components: dict[str, nn.Module]):
        self.device = torch.device(device)
        if self.device.type == "cpu":
            raise ValueError(f"offload moves components from host memory to an accelerator, got {device!r}")
        self.components = components
        for m in components.values():
            self.move(m, HOME)
        self.resident: tuple[str, ...] = ()  # the names on the device now

    def use(self, *names: str) -> None:
        """`names` on the device, every other component at home (moved out first, to free the memory)."""
        names = tuple(n for n in names if n in self.components)
        for n in self.resident:
            if n not in names:
                self.move(self.components[n], HOME)
        for n in names:
            if n not in self.resident:
                self.move(self.components[n], self.device)
        self.resident = names
        if self.device.type == "cuda":  # hand the freed blocks back, so the next component finds them
            torch.cuda.empty_cache()

    def move(self, module: nn.Module, device: torch.device) -> None:
        module.to(device)
