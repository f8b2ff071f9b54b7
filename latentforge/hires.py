"""Hires fix (A1111's `enable_hr`): generate at a base size, upscale, then img2img at the target size.

A1111 `StableDiffusionProcessingTxt2Img.sample_hr_pass`, as behaviour: the first pass's latents are
either resized in latent space ("Latent" upscalers: torch interpolation of the [B, C, h, w] latents) or
decoded, resized as images (Lanczos, nearest) and encoded again; the second pass is img2img from them at
`hires_denoise` strength over `hires_steps` steps (0: the first pass's count), with fresh noise of the
same seeds at the target size and, optionally, another sampler. Sizes are floored to the model's size
step (A1111 floors to 8 pixels).
"""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# A1111's names -> ("latent", torch mode, antialias) or ("image", PIL filter)
UPSCALERS: dict[str, tuple] = {
    "Latent": ("latent", "bilinear", False),
    "Latent (antialiased)": ("latent", "bilinear", True),
    "Latent (bicubic)": ("latent", "bicubic", False),
    "Latent (bicubic antialiased)": ("latent", "bicubic", True),
    "Latent (nearest)": ("latent", "nearest", False),
    "Latent (nearest-exact)": ("latent", "nearest-exact", False),
    "Lanczos": ("image", Image.Resampling.LANCZOS),
    "Nearest": ("image", Image.Resampling.NEAREST),
}
MAX_SCALE = 8.0


def check(scale, denoise, steps, upscaler) -> tuple[float, float, int, str]:
    ok = isinstance(scale, numbers.Real) and not isinstance(scale, bool) and math.isfinite(scale)
    if not ok or not 1 <= scale <= MAX_SCALE:
        raise ValueError(f"hires_scale must be a number in [1, {MAX_SCALE:g}], got {scale!r}")
    ok = isinstance(denoise, numbers.Real) and not isinstance(denoise, bool)
    if not ok or not 0 <= denoise <= 1:
        raise ValueError(f"hires_denoise must be a number in [0, 1], got {denoise!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= 10_000:
        raise ValueError(f"hires_steps must be an integer in [0, 10000] (0: the first pass's), got {steps!r}")
    if upscaler not in UPSCALERS:
        raise ValueError(f"unknown hires upscaler {upscaler!r}; known: {', '.join(UPSCALERS)}")
    return float(scale), float(denoise), steps, upscaler


def target_size(width: int, height: int, scale: float, unit: int, size: tuple[int, int] | None = None):
    """(width, height) of the second pass: size, or the base size × scale, floored to multiples of unit."""
    w, h = size if size is not None else (int(width * scale), int(height * scale))
    tw, th = max(unit, w // unit * unit), max(unit, h // unit * unit)
    if (tw, th) != (w, h):
        warnings.warn(f"the hires size {w}x{h} is floored to {tw}x{th} (multiples of {unit})", stacklevel=3)
    return tw, th


def upscale(pipe, latents: torch.Tensor, upscaler: str, width: int, height: int) -> torch.Tensor:
    """First-pass latents [B, C, h, w] -> init latents [B, C, height/f, width/f] for the second pass."""
    kind = UPSCALERS[upscaler]
    f = pipe.downscale
    if kind[0] == "latent":
        _, mode, aa = kind
        x = latents.float()
        extra = {} if mode.startswith("nearest") else {"align_corners": False, "antialias": aa}
        return F.interpolate(x, size=(height // f, width // f), mode=mode, **extra).to(latents.dtype)
    decoded = pipe.decode(latents).clamp(-1, 1)  # [B, 3, H, W]
    arr = ((decoded + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    ims = [Image.fromarray(a).resize((width, height), kind[1]) for a in arr]
    t = torch.stack([torch.from_numpy(np.array(im)) for im in ims]).permute(0, 3, 1, 2)
    return pipe.encode(t.float() / 127.5 - 1)
