"""The canvas around an inpainting job: outpainting and "inpaint only the masked area" (issue 12).

Outpainting pads the picture on any side and inpaints the new border: the border is the mask (white), its
pixels start as the image's edge repeated outwards ("original"; "fill" and "latent_noise" then replace
them as for any mask, img2img.prepare). A padded size that is not a multiple of the model's size step is
made one by growing the padding (with a warning naming both numbers), never by cropping the picture.

"Inpaint only the masked area" is A1111's `inpaint_full_res`: the bounding box of the (blurred) mask,
grown by `inpaint_full_res_padding` pixels (modules/masking.py `get_crop_region`) and then to the working
size's aspect ratio (`expand_crop_region`), is cut out, scaled to the working size and inpainted there;
the result is scaled back and pasted into the picture through the blurred mask, so the picture keeps its
size and only the masked area changes. Images here are [B, 3, H, W] in [-1, 1], masks [B, 1, H, W] in
[0, 1] (1 = repaint); a region is (x1, y1, x2, y2) in pixels, end-exclusive.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

MAX_PAD = 16_384  # pixels on one side (the padded size is checked against the model's own limit after)
SIDES = ("left", "right", "top", "bottom")
MASKED = 0.5 / 255  # a blurred mask pixel that an 8-bit mask (A1111's) would not round to 0


def _pixels(name: str, value, hi: int) -> int:
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or not 0 <= value <= hi:
        raise ValueError(f"{name} must be a whole number of pixels in [0, {hi}], got {value!r}")
    return int(value)


def check_outpaint(value) -> tuple[int, int, int, int]:
    """outpaint: one number (every side) or (left, right, top, bottom), pixels >= 0, at least one > 0."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != 4:
            raise ValueError(
                f"outpaint must be one number of pixels or four (left, right, top, bottom), got {value!r}"
            )
        pad = tuple(_pixels(f"outpaint {s}", v, MAX_PAD) for s, v in zip(SIDES, value, strict=True))
    else:
        pad = (_pixels("outpaint", value, MAX_PAD),) * 4
    if not any(pad):
        raise ValueError(f"outpaint {pad} adds no pixel; give at least one side > 0")
    return pad  # type: ignore[return-value]


def check_padding(value) -> int:
    """inpaint_full_res_padding: pixels of context around the mask's bounding box."""
    return _pixels("inpaint_full_res_padding", value, MAX_PAD)


def round_padding(size: int, pad: tuple[int, int, int, int], step: int) -> tuple[int, int, int, int]:
    """Grow the padding so that the padded width and height are multiples of `step`: the pixels missing on
    an axis go to its right (bottom) side when that side is padded, else to its left (top) side; an axis
    with no padding is left alone (the size check names it). Warns with the old and new numbers."""
    pad = list(pad)
    for axis, (a, b) in enumerate(((0, 1), (2, 3))):
        total = size[axis] + pad[a] + pad[b]
        extra = -total % step
        if extra == 0 or pad[a] + pad[b] == 0:
            continue
        side = b if pad[b] else a
        old = pad[side]
        pad[side] += extra
        dim = ("width", "height")[axis]
        warnings.warn(
            f"outpaint: {SIDES[side]} padding rounded up from {old} to {pad[side]} pixels so that the "
            f"{dim}, {total + extra}, is a multiple of {step}",
            stacklevel=4,
        )
    return tuple(pad)  # type: ignore[return-value]


def pad_canvas(images: torch.Tensor, mask: torch.Tensor | None, pad: tuple[int, int, int, int]):
    """(images [B, 3, H + t + b, W + l + r] with the edge pixels repeated outwards, mask with the new border
    white (1) and `mask` (or black) inside)."""
    left, right, top, bottom = pad
    canvas = F.pad(images, (left, right, top, bottom), mode="replicate")
    inner = torch.zeros_like(images[:, :1]) if mask is None else mask
    return canvas, F.pad(inner, (left, right, top, bottom), value=1.0)


def crop_region(mask: torch.Tensor, padding: int) -> tuple[int, int, int, int]:
    """A1111's `get_crop_region`: the bounding box of every masked pixel of the batch [B, 1, H, W], grown by
    `padding` on each side and clipped to the image; the whole image when nothing is masked."""
    h, w = mask.shape[-2:]
    hit = (mask > MASKED).flatten(0, 1).any(dim=0)  # [H, W]
    if not hit.any():
        return 0, 0, w, h
    rows, cols = hit.any(dim=1).nonzero()[:, 0], hit.any(dim=0).nonzero()[:, 0]
    x1, x2, y1, y2 = int(cols[0]), int(cols[-1]) + 1, int(rows[0]), int(rows[-1]) + 1
    return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, w), min(y2 + padding, h)


def _grow(lo: int, hi: int, more: int, size: int) -> tuple[int, int]:
    """[lo, hi) grown by `more` (half each side), shifted back inside [0, size), clipped."""
    lo, hi = lo - more // 2, hi + more - more // 2
    if hi > size:
        lo, hi = lo - (hi - size), size
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, size)


def expand_crop_region(region, width: int, height: int, image_w: int, image_h: int):
    """A1111's `expand_crop_region`: grow the region's short side to the aspect ratio of the working size
    width×height, centred, shifted to stay inside the image (and clipped where the image is too small)."""
    x1, y1, x2, y2 = region
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / ratio - (y2 - y1)), image_h)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * ratio - (x2 - x1)), image_w)
    return x1, y1, x2, y2


def full_res_region(mask: torch.Tensor, padding: int, width: int, height: int) -> tuple[int, int, int, int]:
    """The region "inpaint only the masked area" works on, for a working size width×height."""
    h, w = mask.shape[-2:]
    return expand_crop_region(crop_region(mask, padding), width, height, w, h)


def _resize(t: torch.Tensor, width: int, height: int, mode: str) -> torch.Tensor:
    if tuple(t.shape[-2:]) == (height, width):
        return t
    return F.interpolate(t, size=(height, width), mode=mode, antialias=True, align_corners=False)


def crop_resize(t: torch.Tensor, region, width: int, height: int, mode: str = "bicubic") -> torch.Tensor:
    """[B, C, H, W] -> the region scaled to [B, C, height, width]."""
    x1, y1, x2, y2 = region
    return _resize(t[..., y1:y2, x1:x2], width, height, mode)


def paste(decoded: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, region) -> torch.Tensor:
    """The inpainted crop (decoded, [B, 3, h, w]) scaled back to the region and laid over the full images
    through the blurred full-size mask (A1111's overlay): m·pasted + (1 − m)·images."""
    x1, y1, x2, y2 = region
    full = images.clone()
    full[..., y1:y2, x1:x2] = _resize(decoded.to(images.dtype), x2 - x1, y2 - y1, "bicubic")
    return mask * full + (1 - mask) * images
