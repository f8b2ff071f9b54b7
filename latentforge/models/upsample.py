"""Nearest-neighbour ×2 upsampling followed by a 3×3 convolution, computed on the low-resolution input.

SD's UNet and VAE decoder upsample by repeating each pixel 2×2 (nearest) and then convolving with a 3×3
kernel W (padding 1). Every output pixel (2i + a, 2j + b), a, b ∈ {0, 1}, sees a 3×3 window of the
upsampled map, whose rows are low-resolution rows i − 1, i, i (a = 0) or i, i, i + 1 (a = 1), and the same for
columns. Summing the kernel taps that land on the same low-resolution pixel gives, per output phase (a, b),
a 2×2 kernel over the low-resolution input (the sub-pixel view of upsampling + convolution: Shi et al. 2016,
arXiv 1609.05158, §2.2, and Odena et al. 2016, "Deconvolution and checkerboard artifacts"):

    rows, a = 0: (W[0], W[1] + W[2]) over rows (i − 1, i);   a = 1: (W[0] + W[1], W[2]) over rows (i, i + 1)

and likewise for columns. The four phase kernels run as one convolution with 4·C_out output channels over the
input padded by 1, each phase reads its window, and the phases interleave into the 2H × 2W output. Same
result as the two-step form up to the rounding of the summed taps (zero padding of the upsampled map is zero
padding of the input), with 16 multiply-adds per input pixel and output channel per input channel instead of
36: the upsampling convolutions are 28% of the SD VAE decoder's work at 512², so the decoder does 16% less.
The weights keep the checkpoint's [C_out, C_in, 3, 3] layout under the usual key (`conv.weight`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latentforge.models.conv3x3 import winograd_tile

# Input pixels B·H·W below which the modules keep the two-step form: building the four phase kernels costs
# ~16·C_out·C_in memory writes per call, which the saved multiply-adds (20·C_out·C_in per input pixel) repay
# only on larger maps. Measured on 2 cores, batch 2: 1280 channels at 4² input 19 ms two-step against 100 ms,
# at 16² 188 against 206 ms; 640 channels at 32² 202 against 106 ms.
PHASE_MIN_PIXELS = 1024

# Channels from which the two-step form wins wherever its convolution takes the Winograd path
# (models/conv3x3.py; the upsampled map has 4× the pixels, so it is F(4,3)), which does 2.25× fewer
# multiply-adds than the phase kernels. Measured on 2 cores, idle, median of 5, phase / two-step:
# 1280 channels at 24² input (batch 2) 567 / 329 ms, 640 at 48² 424 / 335, 640 at 32² 197 / 194, 512 at
# 64² (batch 1) 244 / 229, 512 at 128² 1051 / 1004; with 256 channels the transforms cost more (256 at 256²:
# 1217 / 1464 ms), so there the phases stay.
PHASE_MAX_WINOGRAD_CHANNELS = 512


def use_phases(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether `upsample_conv` pays off for `conv` on x [B, C, H, W] rather than conv3x3(conv, nearest ×2 of
    x): from PHASE_MIN_PIXELS input pixels, unless that convolution would take the Winograd path with at
    least PHASE_MAX_WINOGRAD_CHANNELS channels."""
    if x.shape[0] * x.shape[2] * x.shape[3] < PHASE_MIN_PIXELS:
        return False
    winograd = winograd_tile(conv, x) > 0  # (x's shape decides F(2,3) or F(4,3) only; both > 0)
    return not (winograd and min(conv.in_channels, conv.out_channels) >= PHASE_MAX_WINOGRAD_CHANNELS)


def phase_kernels(weight: torch.Tensor) -> torch.Tensor:
    """[C_out, C_in, 3, 3] -> [4·C_out, C_in, 2, 2]: each output phase's 2×2 kernel, phase-major (a, b)."""
    rows = (
        torch.stack([weight[:, :, 0], weight[:, :, 1] + weight[:, :, 2]], 2),  # a = 0: rows (i − 1, i)
        torch.stack([weight[:, :, 0] + weight[:, :, 1], weight[:, :, 2]], 2),  # a = 1: rows (i, i + 1)
    )  # each [C_out, C_in, 2, 3]
    out = []
    for r in rows:
        out.append(torch.stack([r[..., 0], r[..., 1] + r[..., 2]], -1))  # b = 0: columns (j − 1, j)
        out.append(torch.stack([r[..., 0] + r[..., 1], r[..., 2]], -1))  # b = 1: columns (j, j + 1)
    return torch.cat(out)  # [(a, b) × C_out, C_in, 2, 2]


def upsample_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(F.interpolate(x, scale_factor=2, mode="nearest"))` for a 3×3, padding-1, stride-1 `conv`:
    [B, C_in, H, W] -> [B, C_out, 2H, 2W], in x's memory format."""
    B, _, H, W = x.shape
    c = conv.out_channels
    bias = None if conv.bias is None else conv.bias.repeat(4)
    y = F.conv2d(F.pad(x, (1, 1, 1, 1)), phase_kernels(conv.weight), bias)  # [B, 4·C_out, H + 1, W + 1]
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if cl else torch.contiguous_format
    out = torch.empty(B, c, 2 * H, 2 * W, dtype=y.dtype, device=y.device, memory_format=fmt)
    for k, (a, b) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        out[:, :, a::2, b::2] = y[:, k * c : (k + 1) * c, a : a + H, b : b + W]
    return out
