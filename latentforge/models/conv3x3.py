"""How a padding-1 3×3 convolution runs at inference: `conv3x3(conv, x)` = `conv(x)`, by the fastest of three
ways measured on the CPU (training, other dtypes and devices, and hooked modules always take `conv(x)`).

- Few output pixels (B·H·W ≤ GEMM_CONV_MAX_PIXELS): im2col + one GEMM on the weight as stored. oneDNN's
  direct kernel reorders the whole weight on every call, which dominates there (SD1.5 at a 32×32 latent:
  1280-channel convs at 8×8 and 4×4 ran at ~35-100 GFLOP/s against ~180 for 320 channels at 32×32); the
  GEMM is 1.3-4× faster (~5e-7 relative apart: another summation order). 1×1 convs gain nothing this way.
- Many channels (both ≥ WINOGRAD_MIN_CHANNELS), stride 1, float32, inside `winograd.workspace()` (which
  the UNet's and the VAE's forwards open, and Pipeline around a whole sampling pass, so that the
  convolutions of one forward, and of every step, share a buffer):
  Winograd F(2×2, 3×3) on small maps and F(4×4, 3×3) on larger ones (models/winograd.py: 2.25× and 4×
  fewer multiplications). Measured on 2 cores against the direct convolution, same memory format: 1280 ch
  at 16² (batch 2) 61 → 37 ms, 640 ch at 32² 40 → 25 ms, 320 ch at 64² 40 → 26 ms, 512 ch at 256²
  (batch 1) 928 → 634 ms (channels-last 883 → 468). Output within ~4e-6 of the range of the exact
  result (F(4,3); F(2,3) ~5e-7; the direct kernel ~3e-7). With 128 channels the transforms cost more than
  they save (128 ch at 512²: 324 → 399 ms).
- Otherwise the module itself (oneDNN's direct kernel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latentforge.models.winograd import in_workspace, winograd_conv3x3

GEMM_CONV_MAX_PIXELS = 128  # B·H·W of the output at or below which the GEMM path is taken (2 × 8×8)
WINOGRAD_MIN_CHANNELS = 256  # both C_in and C_out at least this, for the Winograd path
WINOGRAD_F4_MIN_PIXELS = 1024  # B·H·W from which F(4,3) beats F(2,3) (1280 ch at 2 × 16²: 47 vs 35 ms)


def winograd_tile(conv: nn.Conv2d, x: torch.Tensor) -> int:
    """m of the F(m×m, 3×3) that `conv3x3` uses for conv on x, or 0 for none."""
    pixels = x.shape[0] * x.shape[2] * x.shape[3]
    if (
        not in_workspace()
        or x.dtype != torch.float32
        or x.device.type != "cpu"
        or conv.stride != (1, 1)
        or conv.dilation != (1, 1)
        or conv.groups != 1
        or min(conv.in_channels, conv.out_channels) < WINOGRAD_MIN_CHANNELS
        or pixels <= GEMM_CONV_MAX_PIXELS
    ):
        return 0
    return 4 if pixels >= WINOGRAD_F4_MIN_PIXELS else 2


def conv3x3(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` for a padding-1 3×3 `conv` (stride 1 or 2): [B, C_in, H, W] -> [B, C_out, H', W']."""
    assert conv.kernel_size == (3, 3) and conv.padding == (1, 1), "conv3x3 takes padding-1 3×3 convolutions"
    if torch.is_grad_enabled() or conv._forward_hooks or conv._forward_pre_hooks:
        return conv(x)  # (hooks, e.g. a LoRA on this very module, see what they expect)
    m = winograd_tile(conv, x)
    if m:
        return winograd_conv3x3(x, conv.weight, conv.bias, m)
    b, _, h, w = x.shape
    stride = conv.stride[0]
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1  # (H + 2·1 − 3) // stride + 1
    if b * ho * wo > GEMM_CONV_MAX_PIXELS or not conv.weight.is_contiguous() or conv.groups != 1:
        return conv(x)  # (channels-last weights, Pipeline.optimize: the layout the conv kernels want)
    weight = conv.weight.view(conv.out_channels, -1)  # (C_out, C_in·9), unfold's (c, ky, kx) order
    cols = F.unfold(x, 3, padding=1, stride=stride)  # (B, C_in·9, H_out·W_out)
    cols = cols.transpose(0, 1).reshape(weight.shape[1], -1)  # (C_in·9, B·H_out·W_out)
    out = torch.addmm(conv.bias[:, None], weight, cols)  # (C_out, B·H_out·W_out)
    return out.view(-1, b, ho, wo).transpose(0, 1).contiguous()  # (B, C_out, H_out, W_out)
