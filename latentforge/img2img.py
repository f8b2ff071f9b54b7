"""Image to image and inpainting for ordinary checkpoints, around the one sampling loop (DESIGN.md).

img2img is SDEdit (Meng et al. 2022, §3): encode the image, noise it to an intermediate σ, and solve the
reverse process from there. As A1111 and diffusers do, `strength` s picks the start on the full `steps`
schedule: the last ⌈steps·s⌉ steps are kept (issue 12). The noise is the model sampling's own
(`noise_scaling`: z + σ·ε for VP/EDM, (1 − σ)·z + σ·ε for rectified flow) with the seeded per-image noise
of text-to-image, so s = 1 starts from σ_max·ε exactly as text-to-image does and s = 0 takes no step.

Inpainting with an ordinary (4 or 16 latent channel) checkpoint replaces the known region by the encoded
image noised to the current σ at every step and blends it in with the mask (the replacement method of
Song et al. 2021, App. I.2 / RePaint, Lugmayr et al. 2022, Eq. 8 without resampling; A1111 and ComfyUI do
the same), then pastes the original pixels back outside the blurred mask after decoding (A1111's "mask
blur" overlay). Masks are white = repaint, [B, 1, H, W] in [0, 1] here.

A 9-channel inpainting checkpoint (SD1.5/SD2/SDXL-inpainting) is given the mask and the masked image's
latents beside x at every call (`ConcatInputs`, as diffusers' StableDiffusionInpaintPipeline does) and
repaints from pure noise by default (strength 1, diffusers' default); its known region is not blended:
the network was trained to keep it (diffusers does the same; A1111 and ComfyUI blend for every model).
The pixel overlay is still applied. Outpainting and "inpaint only the masked area" change the canvas
around this (canvas.py).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from latentforge import canvas

MASKED_CONTENT = ("original", "latent_noise", "fill")  # A1111's "Masked content" options
MAX_MASK_BLUR = 256
LATENT_NOISE_OFFSET = 0x1A7E  # "latent noise" draws from seed + this, apart from the initial noise (seed)


# -- checks ------------------------------------------------------------------------------------------------


def check_strength(strength) -> float:
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 <= strength <= 1:
        raise ValueError(f"strength must be a number in [0, 1] (0: the input unchanged), got {strength!r}")
    return float(strength)


def check_mask_blur(radius) -> float:
    ok = isinstance(radius, numbers.Real) and not isinstance(radius, bool) and math.isfinite(radius)
    if not ok or not 0 <= radius <= MAX_MASK_BLUR:
        raise ValueError(f"mask_blur must be a number of pixels in [0, {MAX_MASK_BLUR}], got {radius!r}")
    return float(radius)


def check_masked_content(name) -> str:
    if name not in MASKED_CONTENT:
        raise ValueError(f"masked_content must be one of {', '.join(MASKED_CONTENT)}; got {name!r}")
    return name


def steps_kept(steps: int, strength: float) -> int:
    """⌈steps·strength⌉, with the float error of the product removed (20 × 0.15 = 3.0000000000000004)."""
    return min(steps, math.ceil(round(steps * strength, 9)))


# -- images and masks as tensors ---------------------------------------------------------------------------


def image_size(image) -> tuple[int, int]:
    """(width, height) of a PIL image, a list of them, or a [..., H, W] tensor."""
    if isinstance(image, Image.Image):
        return image.size
    if isinstance(image, torch.Tensor):
        return int(image.shape[-1]), int(image.shape[-2])
    if isinstance(image, Sequence) and image and isinstance(image[0], Image.Image):
        return image[0].size
    raise TypeError(f"init_image must be a PIL image, a list of them or a tensor, got {type(image).__name__}")


def _batch(t: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    if t.shape[0] not in (1, batch):
        raise ValueError(f"{what} has {t.shape[0]} images for a batch of {batch}; give 1 or {batch}")
    return t.expand(batch, *t.shape[1:])


def _resize(t: torch.Tensor, width: int, height: int, what: str, strict: bool, mode: str) -> torch.Tensor:
    """[B, C, H', W'] -> [B, C, height, width], with a warning naming both sizes (an error when strict)."""
    h, w = t.shape[-2:]
    if (w, h) == (width, height):
        return t
    text = f"{what} is {w}x{h}, the output {width}x{height}"
    if strict:
        raise ValueError(f"{text}; resize it or drop strict_size (--strict-size)")
    warnings.warn(f"{text}: resizing it to {width}x{height}", stacklevel=4)
    return F.interpolate(t, size=(height, width), mode=mode, antialias=True, align_corners=False)


def to_images(image, batch: int, width: int, height: int, strict: bool = False) -> torch.Tensor:
    """init_image (PIL image or list, or a [B, 3, H, W] / [3, H, W] tensor in [-1, 1]) -> [B, 3, H, W]."""
    if isinstance(image, torch.Tensor):
        t = image.float()[None] if image.ndim == 3 else image.float()
        if t.ndim != 4 or t.shape[1] != 3:
            raise ValueError(f"init_image must be [B, 3, H, W] in [-1, 1], got shape {tuple(image.shape)}")
    else:
        images = [image] if isinstance(image, Image.Image) else list(image)
        if len({im.size for im in images}) > 1:
            raise ValueError(f"the init images differ in size: {sorted({im.size for im in images})}")
        arr = np.stack([np.array(im.convert("RGB")) for im in images])  # [B, H, W, 3] uint8
        t = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1
    t = _resize(t, width, height, "the init image", strict, "bicubic").clamp(-1, 1)
    return _batch(t, batch, "init_image")


def _alpha_only(im: Image.Image) -> bool:
    """A mask whose grey level is uniform while its alpha varies: its shape is in the alpha channel only."""
    if im.mode not in ("LA", "RGBA", "PA"):
        return False
    lo, hi = im.convert("L").getextrema()
    a_lo, a_hi = im.getchannel("A").getextrema()
    return lo == hi and a_lo != a_hi


def to_mask(mask, batch: int, width: int, height: int, strict: bool = False) -> torch.Tensor:
    """mask (PIL "L"/"RGB"/"1", or a [B, 1, H, W] / [H, W] tensor in [0, 1]; white = repaint) ->
    [B, 1, H, W]."""
    if isinstance(mask, torch.Tensor):
        t = mask.float()
        t = t.reshape(1, 1, *t.shape) if t.ndim == 2 else (t[None] if t.ndim == 3 else t)
        if t.ndim != 4 or t.shape[1] != 1:
            raise ValueError(f"mask must be [B, 1, H, W] or [H, W] in [0, 1], got shape {tuple(mask.shape)}")
    elif isinstance(mask, Image.Image):
        if _alpha_only(mask):
            raise ValueError(
                f"the mask ({mask.mode}) carries its shape in the alpha channel only; give a grey or RGB "
                "image, white = repaint, black = keep"
            )
        t = torch.from_numpy(np.array(mask.convert("L"))).float()[None, None] / 255
    else:
        raise TypeError(f"mask must be a PIL image or a tensor, got {type(mask).__name__}")
    t = _resize(t, width, height, "the mask", strict, "bilinear").clamp(0, 1)
    return _batch(t, batch, "mask")


def blur(mask: torch.Tensor, radius: float) -> torch.Tensor:
    """Gaussian blur of [B, 1, H, W] with σ = radius pixels, as A1111's "Mask blur" (a Gaussian of that σ
    over a kernel of 2·⌊2.5σ + 0.5⌋ + 1 taps, separable); edges repeat the border pixel."""
    if radius <= 0:
        return mask
    r = int(2.5 * radius + 0.5)
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-(x**2) / (2 * radius**2))
    k = (k / k.sum()).to(mask)  # [2r + 1]
    m = F.conv2d(F.pad(mask, (r, r, 0, 0), mode="replicate"), k.reshape(1, 1, 1, -1))  # along W
    return F.conv2d(F.pad(m, (0, 0, r, r), mode="replicate"), k.reshape(1, 1, -1, 1))  # along H


def fill(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A1111's "fill": the masked pixels become the mean colour of the unmasked ones (grey if all are masked).
    (A1111 spreads the surrounding colours in by repeated blurs; one mean colour is the plain form of it.)"""
    keep = 1 - mask  # [B, 1, H, W]
    area = keep.sum(dim=(2, 3), keepdim=True)
    mean = (images * keep).sum(dim=(2, 3), keepdim=True) / area.clamp_min(1e-8)  # [B, 3, 1, 1]
    mean = torch.where(area > 0, mean, torch.zeros_like(mean))
    return mask * mean + keep * images


def latent_mask(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The pixel mask [B, 1, H, W] at the latent size [B, 1, h, w]: the mean over each latent pixel's
    footprint, rounded to 0 or 1 as A1111 does (each latent pixel is generated or kept, never half)."""
    return F.interpolate(mask, size=(h, w), mode="area").round()


# -- the job -----------------------------------------------------------------------------------------------


@dataclass
class Job:
    """What img2img/inpainting changes around the sampling loop (B images of H×W pixels, h×w latents)."""

    images: torch.Tensor  # [B, 3, H, W] in [-1, 1]: the init images at the output size (pasted back)
    latent: torch.Tensor  # [B, C, h, w]: the encoded init (denoiser latents), after the masked content
    strength: float
    pixel_mask: torch.Tensor | None = None  # [B, 1, H, W] in [0, 1], blurred; 1 = repaint
    mask: torch.Tensor | None = None  # [B, 1, h, w] in {0, 1}: the latent mask
    concat: torch.Tensor | None = None  # [B, 1 + C, h, w]: a 9-channel UNet's mask and masked-image latents
    # "inpaint only the masked area": (full images [B, 3, H', W'], their blurred mask, the region worked on)
    full: tuple[torch.Tensor, torch.Tensor, tuple[int, int, int, int]] | None = None


def outpaint(init_image, mask, pad, step: int, batch: int, width=None, height=None, strict: bool = False):
    """The outpainting canvas (canvas.py): (images [B, 3, H', W'], mask [B, 1, H', W']) with the new border
    white. The init image (and mask) are first taken at width×height when given (resized with a warning),
    else at the image's size; the padding is grown where needed so that H' and W' are multiples of `step`."""
    w0, h0 = image_size(init_image)
    w, h = width or w0, height or h0
    images = to_images(init_image, batch, w, h, strict)
    m = None if mask is None else to_mask(mask, batch, w, h, strict)
    pad = canvas.round_padding((w, h), canvas.check_outpaint(pad), step)
    return canvas.pad_canvas(images, m, pad)


def prepare(
    pipe,
    init_image,
    strength: float,
    mask,
    mask_blur: float,
    masked_content: str,
    seeds: Sequence[int],
    width: int,
    height: int,
    strict_size: bool = False,
    full_res_padding: int | None = None,
    inpaint_model: bool = False,
) -> Job:
    """Check and encode the inputs; pipe: a Pipeline (its `encode`, `device`, `downscale`).
    full_res_padding: "inpaint only the masked area" with that padding (canvas.py): the init image and mask
    are taken at the image's own size and the crop around the mask is worked on at width×height.
    inpaint_model: the network is a 9-channel inpainting UNet (`Job.concat` is made for it)."""
    from latentforge.noise import randn_seeded

    b, f = len(seeds), pipe.downscale
    if mask is None:
        images = to_images(init_image, b, width, height, strict_size).to(pipe.device)
        concat = inpaint_conditioning(pipe, images, None) if inpaint_model else None
        return Job(images, pipe.encode(images), strength, concat=concat)
    full = None
    if full_res_padding is None:
        images = to_images(init_image, b, width, height, strict_size).to(pipe.device)
        pixel_mask = blur(to_mask(mask, b, width, height, strict_size).to(pipe.device), mask_blur)
    else:  # A1111: blur at full size, crop, scale to the working size (no second blur)
        w0, h0 = image_size(init_image)
        images0 = to_images(init_image, b, w0, h0, strict_size).to(pipe.device)
        mask0 = blur(to_mask(mask, b, w0, h0, strict_size).to(pipe.device), mask_blur)
        region = canvas.full_res_region(mask0, full_res_padding, width, height)
        images = canvas.crop_resize(images0, region, width, height).clamp(-1, 1)
        pixel_mask = canvas.crop_resize(mask0, region, width, height, "bilinear").clamp(0, 1)
        full = (images0, mask0, region)
    m = latent_mask(pixel_mask, height // f, width // f)
    latent = pipe.encode(fill(images, pixel_mask) if masked_content == "fill" else images)
    if masked_content == "latent_noise":  # A1111: the masked latent replaced by fresh unit noise
        other = randn_seeded(latent.shape, [s + LATENT_NOISE_OFFSET for s in seeds]).to(latent)
        latent = m * other + (1 - m) * latent
    concat = inpaint_conditioning(pipe, images, pixel_mask) if inpaint_model else None
    return Job(images, latent, strength, pixel_mask, m, concat, full)


def start(job: Job, model_sampling, sigmas: torch.Tensor, noise: torch.Tensor):
    """The kept tail of the schedule and the latent to start it from: (sigmas [n + 1], x [B, C, h, w]).
    sigmas: the full `steps` schedule; noise: the same seeded noise text-to-image would use."""
    steps = len(sigmas) - 1
    n = steps_kept(steps, job.strength)
    tail = sigmas[steps - n :]
    if n == steps:  # the top of the schedule: pure noise, as text-to-image (strength 1 equals it exactly)
        return tail, noise * sigmas[0]
    return tail, model_sampling.noise_scaling(tail[0].to(noise.device), noise, job.latent)


def finish(job: Job | None, latents: torch.Tensor) -> torch.Tensor:
    """After sampling (σ = 0): the known region is the encoded image itself (not for a 9-channel inpainting
    UNet, whose own prediction there is kept, as diffusers keeps it)."""
    if job is None or job.mask is None or job.concat is not None:
        return latents
    return job.mask * latents + (1 - job.mask) * job.latent


def composite(job: Job | None, decoded: torch.Tensor) -> torch.Tensor:
    """A1111's overlay: the original pixels pasted back outside the blurred mask ([B, 3, H, W] in [-1, 1]);
    "inpaint only the masked area": the crop scaled back into the full picture through its blurred mask."""
    if job is None or job.pixel_mask is None:
        return decoded
    if job.full is not None:
        return canvas.paste(decoded, *job.full)
    m = job.pixel_mask
    return m * decoded + (1 - m) * job.images


class InpaintDenoiser:
    """D'(x, σ) = m·D(m·x + (1 − m)·k(σ), σ) + (1 − m)·z, with k(σ) = noise_scaling(σ, ε, z): z the encoded
    image, ε the initial noise, m the latent mask (1 = repaint) [B, 1, h, w].

    Why a denoiser wrapper: every sampler in latentforge.samplers reaches the network only through D (and
    `with_uncond` for CFG++), at every σ it visits (intermediate stages, Heun corrections, adaptive steps),
    so blending here works for all of them without touching them. The x the network sees has its known
    region replaced by the image noised to that σ: the state after the sampler's previous step, set back.
    The prediction's known region is z itself, so the sampler's own state there follows z + σ·ε (flow:
    (1 − σ)·z + σ·ε), which every consistent solver integrates exactly (x̂₀ constant); `finish` sets it to
    z at σ = 0, so no rounding is left."""

    def __init__(self, model, mask: torch.Tensor, latent: torch.Tensor, noise: torch.Tensor):
        self.model, self.mask, self.latent, self.noise = model, mask, latent, noise
        self.model_sampling = getattr(model, "model_sampling", None)

    def known(self, sigma: torch.Tensor) -> torch.Tensor:  # [B, C, h, w]: z noised to σ [B]
        return self.model_sampling.noise_scaling(sigma, self.noise, self.latent)

    def blend(self, x: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        return self.mask * x + (1 - self.mask) * known

    def with_uncond(self, x, sigma, **kw):
        x = self.blend(x, self.known(sigma).to(x.dtype))
        if hasattr(self.model, "with_uncond"):
            d, u = self.model.with_uncond(x, sigma, **kw)
        else:
            d = u = self.model(x, sigma, **kw)
        z = self.latent.to(d.dtype)
        return self.blend(d, z), self.blend(u, z)

    def __call__(self, x, sigma, **kw):
        return self.with_uncond(x, sigma, **kw)[0]


# -- 9-channel inpainting checkpoints ----------------------------------------------------------------------


def is_inpaint_unet(in_channels: int, latent_channels: int) -> bool:
    """SD1.5/SD2/SDXL-inpainting: the UNet takes x, the mask and the masked image's latents, C + 1 + C."""
    return in_channels == 2 * latent_channels + 1


def inpaint_conditioning(pipe, images: torch.Tensor, pixel_mask: torch.Tensor | None) -> torch.Tensor:
    """[B, 1 + C, h, w]: what a 9-channel inpainting UNet takes beside x, as diffusers'
    StableDiffusionInpaintPipeline (`prepare_mask_latents`) and A1111 (`inpainting_image_conditioning`)
    make it:
    the mask binarised at 0.5 (white = repaint), the image with the repainted pixels set to 0 (mid grey)
    encoded like any init image (the VAE posterior's mean, scaled: Pipeline.encode), and the binary mask
    brought to the latent grid by nearest-neighbour interpolation. No mask (text-to-image or plain img2img
    on such a model): everything is repainted, so the masked image is all 0, as A1111 does."""
    if pixel_mask is None:
        pixel_mask = torch.ones_like(images[:, :1])
    binary = (pixel_mask >= 0.5).to(images.dtype)  # diffusers' VaeImageProcessor(do_binarize=True)
    masked = pipe.encode(images * (binary < 0.5))
    return torch.cat([F.interpolate(binary, size=masked.shape[-2:], mode="nearest").to(masked), masked], 1)


class ConcatInputs(nn.Module):
    """A 9-channel inpainting UNet seen as a C-channel network: net(cat([x_in, mask, masked-image latents]),
    t, **cond). The samplers, CFG and the model sampling's c_in see C channels only; the conditioning is
    repeated over CFG's doubled batch (the same for the conditional and unconditional halves, as in
    diffusers and A1111) and enters unscaled, as diffusers concatenates it after `scale_model_input`."""

    def __init__(self, net: nn.Module, concat: torch.Tensor):
        super().__init__()
        self.net, self.concat = net, concat

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        c = self.concat.to(device=x.device, dtype=x.dtype)
        if c.shape[0] != x.shape[0]:
            c = c.repeat(x.shape[0] // c.shape[0], 1, 1, 1)
        return self.net(torch.cat([x, c], dim=1), t, **cond)
