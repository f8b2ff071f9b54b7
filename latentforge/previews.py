"""Live previews: a picture of the current x̂₀ while sampling (DESIGN.md: "previews read the callback's x̂₀").

The sampler's callback gets dict(x, i, sigma, sigma_hat, denoised) after each step; `denoised` [B, C, h, w]
is x̂₀ in the denoiser's latent space. Two ways to turn it into RGB:

- "linear" (the default, as ComfyUI's Latent2RGB and A1111's "Approx cheap"): each latent pixel is mapped to
  one RGB pixel by an affine map of the VAE-space latent z = LatentFormat.process_out(x̂₀),
      rgb[3] = z[C] @ matrix[C, 3] + bias[3],
  then upsampled ×f (nearest) to the image size and clamped to [-1, 1]. Microseconds per image.
- "taesd": the tiny distilled decoder (models/taesd.py) for a sharper, truer preview, about 1.2M params.

Where the linear factors come from (`latent_rgb`): the model file's "latentforge.latent_rgb" metadata
(written by scripts/ship_default_model.py for the shipped model), else the published factors of the real SD
VAEs (below), else a least-squares fit on the model's own VAE (`fit_linear`), done once per pipeline.
`stream` runs a generation on a worker thread and yields the previews as they come, then the images.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from latentforge.files import atomic_path
from latentforge.models import taesd as taesd_net
from latentforge.models.vae import LATENT_FORMATS, LatentFormat

METHODS = ("linear", "taesd")
MAX_EVERY = 10_000

# -- published linear factors --------------------------------------------------------------------------------
# NOT fit here: the VAE weights of the released SD models are not on this machine. These are the values
# ComfyUI ships (comfy/latent_formats.py, classes SD15, SDXL and SD3, `latent_rgb_factors[_bias]`; commit
# 040a3243 of comfyanonymous/ComfyUI). ComfyUI applies them to the sampler's x̂₀, i.e. to the *denoiser-space*
# latent (latent_preview.py Latent2RGBPreviewer), so they are converted to VAE space below. A1111's
# "Approx cheap" (modules/sd_vae_approx.py) uses similar SD1 values, fit by Keturn:
# https://discuss.huggingface.co/t/decoding-latents-to-rgb-without-upscaling/23204/2
_SD1 = [
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
]
_SDXL = [
    [0.3651, 0.4232, 0.4341],
    [-0.2533, -0.0042, 0.1068],
    [0.1076, 0.1111, -0.0362],
    [-0.3165, -0.2492, -0.2188],
]
_SDXL_BIAS = [0.1084, -0.0175, -0.0011]
_SD3 = [
    [-0.0922, -0.0175, 0.0749], [0.0311, 0.0633, 0.0954],
    [0.1994, 0.0927, 0.0458], [0.0856, 0.0339, 0.0902],
    [0.0587, 0.0272, -0.0496], [-0.0006, 0.1104, 0.0309],
    [0.0978, 0.0306, 0.0427], [-0.0042, 0.1038, 0.1358],
    [-0.0194, 0.0020, 0.0669], [-0.0488, 0.0130, -0.0268],
    [0.0922, 0.0988, 0.0951], [-0.0278, 0.0524, -0.0542],
    [0.0332, 0.0456, 0.0895], [-0.0069, -0.0030, -0.0810],
    [-0.0596, -0.0465, -0.0293], [-0.1448, -0.1463, -0.1189],
]  # fmt: skip
_SD3_BIAS = [0.2394, 0.2135, 0.1925]
# family -> (matrix [C, 3], bias [3], the latent format the factors were published for). SD2.x and the DiT
# releases decode with the SD1 KL-f8 VAE latent space (ComfyUI uses its SD15 format for SD2; DiT uses
# sd-vae-ft-ema/mse, whose encoder is SD1's); SD3.5 keeps SD3's VAE.
PUBLISHED = {
    **dict.fromkeys(("sd15", "sd21", "dit-xl-2-256", "dit-xl-2-512"), (_SD1, [0] * 3, LATENT_FORMATS["sd1"])),
    **dict.fromkeys(("sdxl-base", "sdxl-refiner"), (_SDXL, _SDXL_BIAS, LATENT_FORMATS["sdxl"])),
    **dict.fromkeys(("sd3-medium", "sd35-medium", "sd35-large"), (_SD3, _SD3_BIAS, LATENT_FORMATS["sd3"])),
}  # fmt: skip


@dataclass(frozen=True)
class LatentRGB:
    """rgb = z @ matrix + bias for a VAE-space latent z; matrix [C, 3], bias [3] (float32, CPU)."""

    matrix: torch.Tensor
    bias: torch.Tensor

    def __post_init__(self):
        if self.matrix.ndim != 2 or self.matrix.shape[1] != 3 or self.bias.shape != (3,):
            raise ValueError(
                f"latent_rgb: expected matrix [C, 3] and bias [3], got {list(self.matrix.shape)} and "
                f"{list(self.bias.shape)}"
            )

    @property
    def channels(self) -> int:
        return self.matrix.shape[0]

    def __call__(self, z: torch.Tensor) -> torch.Tensor:  # [B, C, h, w] -> [B, 3, h, w]
        m, b = self.matrix.to(z.device, torch.float32), self.bias.to(z.device, torch.float32)
        return torch.einsum("bchw,cr->brhw", z.float(), m) + b[:, None, None]

    @classmethod
    def from_denoiser_space(cls, matrix, bias, fmt: LatentFormat) -> LatentRGB:
        """Factors for the denoiser latent u = (z − shift)·scale, as VAE-space factors:
        u @ M + b = z @ (scale·M) + (b − scale·shift·Σ_c M[c])."""
        m, b = torch.tensor(matrix, dtype=torch.float64), torch.tensor(bias, dtype=torch.float64)
        s, t = fmt.scale_factor, fmt.shift_factor
        return cls((s * m).float(), (b - s * t * m.sum(0)).float())

    # the "latentforge.latent_rgb" metadata entry: {"matrix": [[r, g, b] per channel], "bias": [r, g, b]}
    def to_json(self) -> str:
        rows = [[round(float(v), 6) for v in row] for row in self.matrix]
        return json.dumps({"matrix": rows, "bias": [round(float(v), 6) for v in self.bias]})

    @classmethod
    def from_json(cls, text: str) -> LatentRGB:
        d = json.loads(text)
        return cls(
            torch.tensor(d["matrix"], dtype=torch.float32), torch.tensor(d["bias"], dtype=torch.float32)
        )


# -- fitting -------------------------------------------------------------------------------------------------


@torch.no_grad()
def fit_linear(vae, images: torch.Tensor, batch: int = 16) -> LatentRGB:
    """Least squares with a bias of RGB on the VAE-space latent: the posterior means z [N, C, h, w] of
    `images` [N, 3, H, W] in [-1, 1] against the images average-pooled f×f, [N, 3, h, w] (one equation per
    latent pixel and colour, N·h·w rows). Solved in float64 (torch.linalg.lstsq)."""
    p = next(vae.parameters())
    f = vae.downscale
    z = torch.cat([vae.encode(images[k : k + batch].to(p.device, p.dtype)).mean.float().cpu()
                   for k in range(0, len(images), batch)])  # fmt: skip
    rgb = F.avg_pool2d(images.float().cpu(), f)  # [N, 3, h, w]
    x = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double()  # [N·h·w, C]
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)  # [N·h·w, C + 1]: the bias column
    y = rgb.permute(0, 2, 3, 1).reshape(-1, 3).double()  # [N·h·w, 3]
    sol = torch.linalg.lstsq(x, y).solution  # [C + 1, 3]
    return LatentRGB(sol[:-1].float(), sol[-1].float())


def shapes_images(n: int = 64, seed: int = 0, split: str = "train", size: int = 64) -> torch.Tensor:
    """n rendered shapes scenes [n, 3, size, size] in [-1, 1] (deterministic: shapes.data.sample)."""
    from latentforge.shapes import data

    return torch.stack([data.to_tensor(data.sample(seed, split, i, size)[0]) for i in range(n)])


def latent_rgb(pipe) -> LatentRGB:
    """The pipeline's linear factors, found once and cached on it as `pipe.latent_rgb`: the file's metadata,
    else the published ones when the VAE is its family's released one (same config and latent format), else
    a fit on 64 shapes scenes (the shipped model's training data)."""
    rgb = getattr(pipe, "latent_rgb", None)
    if rgb is None:
        pub = PUBLISHED.get(pipe.family)
        family_vae = pipe.spec.configs().get("vae")
        if pipe.pixel_space:  # the "latent" is the image itself
            rgb = LatentRGB(torch.eye(3), torch.zeros(3))
        elif pub and pipe.latent_format == pub[2] and pipe.vae.config == family_vae:
            rgb = LatentRGB.from_denoiser_space(pub[0], pub[1], pub[2])
        else:
            rgb = fit_linear(pipe.vae, shapes_images())
        pipe.latent_rgb = rgb
    if rgb.channels != pipe.latent_channels:
        raise ValueError(
            f"latent_rgb has {rgb.channels} channels, this model's latents have {pipe.latent_channels}"
        )
    return rgb


# -- previews ------------------------------------------------------------------------------------------------


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> B RGB images (clamped, rounded to uint8)."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    return [Image.fromarray(np.ascontiguousarray(a.numpy()), "RGB") for a in arr]


def _every(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= MAX_EVERY:
        raise ValueError(
            f"preview_every must be an integer in [0, {MAX_EVERY}] (0: no previews), got {value!r}"
        )
    return int(value)


class Previewer:
    """Turns the sampler's x̂₀ into preview images every `every` steps.

    method: "linear" (the latent→RGB projection) or "taesd" (the tiny decoder in the file `taesd`, a
    taesd_decoder.safetensors-style file matching the model's VAE: taesd for SD1/SD2, taesdxl for SDXL,
    taesd3 for SD3; None: the one stored beside the model file, `tiny_decoder_path`, as the shipped model
    has: scripts/train_tiny_decoder.py)."""

    def __init__(self, method: str = "linear", every: int = 1, taesd: str | None = None):
        if method not in METHODS:
            raise ValueError(f"preview method {method!r} is not known; accepted: {', '.join(METHODS)}")
        if method == "linear" and taesd:
            raise ValueError(f"a TAESD file ({taesd!r}) is only used by the 'taesd' preview method")
        self.method, self.every, self.taesd = method, _every(every), taesd
        # the TAESD file is read and checked now (strict keys), so a bad file fails before any work
        self._decoder = taesd_net.load_decoder(taesd) if method == "taesd" and taesd else None

    def prepare(self, pipe) -> Previewer:
        """Check the previews fit this pipeline and get what they need (the linear factors, or the TAESD
        decoder on the pipeline's device) before sampling starts."""
        if self.method == "linear":
            latent_rgb(pipe)
            return self
        if self._decoder is None:  # the tiny decoder stored beside the model
            path = tiny_decoder_path(pipe.source)
            if path is None or not os.path.isfile(path):
                where = f"{path} does not exist" if path else "this pipeline was not loaded from a file"
                raise ValueError(
                    f"the taesd preview needs a TAESD decoder file: none beside the model ({where}); give "
                    "one (--taesd PATH, Previewer('taesd', taesd=PATH)) or use the linear preview"
                )
            self.taesd, self._decoder = path, taesd_net.load_decoder(path)
        f = taesd_net.upscale(self._decoder)
        if pipe.downscale != f:
            raise ValueError(
                f"TAESD file {self.taesd!r} decodes the latents of an f={f} VAE; this model's VAE has "
                f"f={pipe.downscale}: use the linear preview"
            )
        c = self._decoder[1].in_channels
        if c != pipe.latent_channels:
            raise ValueError(
                f"TAESD file {self.taesd!r} decodes {c}-channel latents, this model's have "
                f"{pipe.latent_channels} (taesd/taesdxl: 4, taesd3/taef1: 16)"
            )
        self._decoder.to(pipe.device)
        return self

    @torch.no_grad()
    def __call__(self, pipe, denoised: torch.Tensor) -> list[Image.Image]:
        """x̂₀ in the denoiser's space [B, C, h, w] -> B preview images of the output size (h·f × w·f)."""
        if self.method == "taesd":  # TAESD takes the denoiser-space latent (models/taesd.py)
            return to_pil(taesd_net.decode(self._decoder, denoised))
        rgb = latent_rgb(pipe)(pipe.latent_format.process_out(denoised.float()))  # [B, 3, h, w]
        f = pipe.downscale
        return to_pil(rgb.repeat_interleave(f, -2).repeat_interleave(f, -1) if f > 1 else rgb)


def tiny_decoder_path(model_path: str | None) -> str | None:
    """Where a model's own TAESD-style decoder is stored: `<model>.taesd_decoder.safetensors` beside it."""
    return None if model_path is None else os.path.splitext(model_path)[0] + ".taesd_decoder.safetensors"


def hook(pipe, preview, preview_every, on_preview: Callable | None) -> Callable | None:
    """The sampler callback that calls on_preview(step, images) every N steps (step = steps done, 1-based;
    N = preview_every, or a Previewer's own `every` when preview_every is 0), or None when previews are off.
    Everything is checked and loaded here, before sampling."""
    every = _every(preview_every)
    if isinstance(preview, Previewer):
        every = every or preview.every
    elif preview not in METHODS:
        raise ValueError(f"preview {preview!r} is not known; accepted: {', '.join(METHODS)} or a Previewer")
    if every == 0:
        if on_preview is not None:
            raise ValueError("on_preview is given but preview_every is 0: set preview_every=N (N >= 1)")
        return None
    if on_preview is None:
        raise ValueError(
            "preview_every needs a receiver for the previews: on_preview=fn(step, images), or Pipeline.stream"
        )
    previewer = preview if isinstance(preview, Previewer) else Previewer(preview, every)
    previewer.prepare(pipe)

    def callback(d: dict) -> None:
        step = d["i"] + 1
        if step % every == 0:
            on_preview(step, previewer(pipe, d["denoised"]))

    return callback


def chain(*callbacks: Callable | None) -> Callable | None:
    """One sampler callback that calls each given one in turn (None: none given)."""
    fns = [c for c in callbacks if c is not None]
    if len(fns) <= 1:
        return fns[0] if fns else None

    def callback(d: dict) -> None:
        for fn in fns:
            fn(d)

    return callback


def save(folder: str, step: int, images: list[Image.Image]) -> list[str]:
    """Write `preview-{k}-{step:03d}.png` for image k of the batch into `folder`, each atomically (a
    viewer polling the folder never sees half a file); a later preview of the same name replaces it."""
    paths = []
    for k, image in enumerate(images):
        path = os.path.join(folder, f"preview-{k}-{step:03d}.png")
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
        paths.append(path)
    return paths


# -- streaming -----------------------------------------------------------------------------------------------


class Event(NamedTuple):
    """What `stream` yields: ("preview", step, previews) while sampling, then ("images", steps, images)."""

    kind: str
    step: int
    images: list[Image.Image]


class Cancelled(Exception):
    """Raised inside the sampling thread when the consumer of `stream` stopped reading."""


def stream(pipe, *args, preview_every: int | None = None, **kwargs) -> Iterator[Event]:
    """Run pipe(*args, **kwargs) on a worker thread and yield its previews (every step unless preview_every
    or a Previewer says otherwise), then the images. An exception in the worker is raised here; closing the
    generator early stops the sampling at the next step."""
    if "on_preview" in kwargs:
        raise ValueError("stream yields the previews itself: do not pass on_preview")
    if preview_every is None:
        preview_every = 0 if isinstance(kwargs.get("preview"), Previewer) else 1
    events: queue.Queue = queue.Queue()
    stop = threading.Event()
    user_callback = kwargs.pop("callback", None)
    last = [0]

    def callback(d: dict) -> None:
        if stop.is_set():
            raise Cancelled
        last[0] = d["i"] + 1
        if user_callback is not None:
            user_callback(d)

    def work() -> None:
        try:
            send = lambda step, ims: events.put(Event("preview", step, ims))
            images = pipe(*args, preview_every=preview_every, on_preview=send, callback=callback, **kwargs)
            events.put(Event("images", last[0], images))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            events.put(e)

    worker = threading.Thread(target=work, name="latentforge-stream", daemon=True)
    worker.start()
    try:
        while True:
            item = events.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.kind == "images":
                return
    finally:
        stop.set()
        worker.join()
