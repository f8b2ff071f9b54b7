"""Text-to-image on any family with one sampling loop (DESIGN.md, "One interface in the middle").

    prompt ─ conditioning.encode ─► cond / uncond dicts
    noise(seed + k)·σ₀ ─► sampler( CFGDenoiser(Denoiser(net, model_sampling)), sigmas ) ─► latent
    latent ─ LatentFormat.process_out ─ VAE decode ─► [-1, 1] ─► uint8 PIL images

What differs per family is data: its `Family` entry (families.py) names the components, the model sampling,
the latent scaling, the default image size and the conditioning.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from latentforge import canvas, conditioning, families, hires, img2img, memory, model_sampling, previews
from latentforge.checkpoints import build_component
from latentforge.control_use import ControlNets, controls_applied, prepare_controls
from latentforge.families import PIXEL_FORMAT
from latentforge.guidance import CFGDenoiser
from latentforge.infotext import build as infotext  # noqa: F401  (re-exported: A1111's parameters text)
from latentforge.lora_use import LoRAs, LoRAUse
from latentforge.model_sampling import Denoiser
from latentforge.models.vae import AutoencoderKL, LatentFormat
from latentforge.models.winograd import workspace
from latentforge.noise import variation_noise
from latentforge.offload import Offload
from latentforge.outputs import save_png  # noqa: F401  (re-exported)
from latentforge.samplers import get_sampler, sigmas_for
from latentforge.schedules import SCHEDULERS, unknown_name_error
from latentforge.shapes.captions import PROMPT_COMPLETIONS
from latentforge.speedups import Speedups
from latentforge.textual_inversion import TextualInversions
from latentforge.tune_schedule import TUNED, ShiftedDenoiser, load_tuned, read_tuned

MAX_STEPS, MAX_BATCH, MAX_CFG, MAX_SIZE = 10_000, 256, 100.0, 16_384

# latentforge's own text-to-image model (MODEL_CARD.md), shipped in the package: what "default" names
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "shapes64.safetensors")
# its few-step student (reflow, MODEL_CARD.md "Few steps"): a denoiser-only file, what "default-fast" names
# (the default model with this UNet in place: 4 Euler steps on sgm_uniform, CFG 1)
FAST_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "shapes64-fast.safetensors")


# complete_prompt: what text-to-image prompts in the shapes grammar get before the network sees them: "none",
# "background" (an unstated background drawn as the training data draws it) or "layout" (every unstated
# position too; shapes.complete_prompt); "layout" for the default model (its file says so)
GENERATION_DEFAULTS = {"steps": 20, "sampler": "euler", "scheduler": "normal", "cfg": 7.0,
                       "complete_prompt": "none"}  # fmt: skip
MAX_BATCH_COUNT = 10_000
# where the initial noise is drawn: "cpu" (the default: a seed gives the same image on any device; A1111's
# "CPU" RNG source) or "device" (the generators on the pipeline's device: A1111's "GPU" on CUDA)
RNG_SOURCES = ("cpu", "device")
# the hires fix's arguments (hires.py) and A1111's defaults for them (0 steps: the first pass's count)
HIRES_ARGS = ("hires_scale", "hires_size", "hires_denoise", "hires_steps", "hires_upscaler", "hires_sampler")
HIRES_DEFAULTS = {"hires_scale": 2.0, "hires_denoise": 0.7, "hires_steps": 0, "hires_upscaler": "Latent"}


def model_file(name: str) -> str:
    """A `--model` value as a file: "default" is the shipped model, "default-fast" its student's
    denoiser-only file (where its tuned schedules lie), anything else a path."""
    return {"default": DEFAULT_MODEL, "default-fast": FAST_MODEL}.get(name, name)


class FirstChannels(nn.Module):
    """DiT with learn_sigma outputs [ε | variance value] (8 channels); sampling uses the ε half."""

    def __init__(self, net: nn.Module, channels: int):
        super().__init__()
        self.net, self.channels = net, channels

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return self.net(x, t, **cond)[:, : self.channels]


def metadata_options(meta: dict[str, str], has_vae: bool = True) -> dict:
    """Pipeline options a file written by our trainer carries in its safetensors metadata:
    "latentforge.model_sampling" (model_sampling.to_json: the model sampling it was trained with; older
    files name the training objective instead, "latentforge.objective"), "latentforge.space" ("pixel" or
    "latent"), "latentforge.resolution" (the training size, pixels) and "latentforge.defaults" (the
    generation settings the model was tuned for: steps, sampler, scheduler, cfg) and "latentforge.latent_rgb"
    (the linear preview's factors, previews.LatentRGB.to_json)."""
    out: dict = {}
    if "latentforge.defaults" in meta:
        out["defaults"] = json.loads(meta["latentforge.defaults"])
    if "latentforge.model_sampling" in meta:
        out["model_sampling"] = model_sampling.from_json(meta["latentforge.model_sampling"])
    elif "latentforge.objective" in meta:
        obj = json.loads(meta["latentforge.objective"])
        prediction = obj.get("prediction", "eps")
        out["model_sampling"] = model_sampling.for_prediction(
            "v" if prediction == "v" else prediction,
            bool(obj.get("zero_terminal_snr", False)),
            float(obj.get("sigma_data", 0.5)),
            float(obj.get("shift", 1.0)),
        )
    if meta.get("latentforge.space") == "pixel" and not has_vae:
        out["pixel_space"] = True
    if "latentforge.resolution" in meta:
        r = int(meta["latentforge.resolution"])
        out["size"] = (r, r)
    if "latentforge.latent_format" in meta and has_vae:  # the scale/shift measured on our own VAE
        out["latent_format"] = LatentFormat.from_json(meta["latentforge.latent_format"])
    if "latentforge.latent_rgb" in meta and has_vae:  # the linear preview's factors, fit on our VAE
        out["latent_rgb"] = previews.LatentRGB.from_json(meta["latentforge.latent_rgb"])
    return out


def _int(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return int(value)


def _check_variation(subseed, strength, resize_from, batch_size: int):
    """(subseed, subseed_strength, resize_from) checked: A1111's variation seed and "resize seed from"."""
    if subseed is not None:
        subseed = _int("subseed", subseed, 0, 2**63 - 1 - batch_size)
    ok = isinstance(strength, (int, float)) and not isinstance(strength, bool) and 0 <= strength <= 1
    if not ok:
        raise ValueError(f"subseed_strength must be a number in [0, 1], got {strength!r}")
    if strength > 0 and subseed is None:
        raise ValueError(f"subseed_strength {strength} needs a subseed (the variation seed)")
    if resize_from is not None:
        if not isinstance(resize_from, Sequence) or len(resize_from) != 2:
            raise ValueError(f"seed_resize_from must be (width, height) in pixels, got {resize_from!r}")
        resize_from = (_int("seed_resize_from width", resize_from[0], 1, MAX_SIZE),
                       _int("seed_resize_from height", resize_from[1], 1, MAX_SIZE))  # fmt: skip
    return subseed, float(strength), resize_from


def _accepts(fn: Callable, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


# -- memory ------------------------------------------------------------------------------------------------


class _Stopped(Exception):
    def __init__(self, denoised: torch.Tensor):
        self.denoised = denoised


def _stopper(stop: Callable[[], bool] | None) -> Callable | None:
    """The sampler callback that ends sampling after the current step when stop() says so."""
    if stop is None:
        return None

    def callback(d: dict) -> None:
        if stop():
            raise _Stopped(d["denoised"])

    return callback


class DecodeFailed(RuntimeError):
    """Decoding failed after sampling; `path` holds the sampled latents (see Pipeline.decode_file)."""

    def __init__(self, message: str, path: str):
        super().__init__(message)
        self.path = path


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> B RGB images (clamped, rounded to uint8)."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy(), "RGB") for a in arr]


@functools.cache
def _sample_signature() -> inspect.Signature:
    """Pipeline._sample's signature, read once (inspect.signature costs ~0.1 ms a call)."""
    return inspect.signature(Pipeline._sample)


class Pipeline:
    """Text-to-image for one family.

    family: a name in families.FAMILIES.
    components: name -> module (unet | mmdit | dit, vae, clip_l | clip_h | clip_g).
    prediction: override the VP prediction ("eps" | "v"), e.g. for the SD2 512 base; shift: SD3 flow shift.
    model_sampling: use this one instead (models trained here carry theirs in the file's metadata).
    pixel_space: the network denoises RGB pixels directly (no VAE); size: default (width, height);
    latent_format: the VAE latent scale/shift when not the family's (a VAE trained here); defaults: the
    generation settings used where a caller gives none ({"steps", "sampler", "scheduler", "cfg"} or a
    subset; unset ones: 20 steps, euler, normal, cfg 7); latent_rgb: the linear preview's latent->RGB
    factors (previews.LatentRGB; None: published or fit when first needed, previews.latent_rgb); lora_dir:
    the folder where `<lora:name:w>` tags in prompts find `name.safetensors` (A1111's --lora-dir; see
    __call__); embeddings_dir: textual inversion files (`*.safetensors`, A1111/diffusers/SDXL-pair
    layouts) that prompts name by file stem or `embedding:name` (textual_inversion.py)."""

    def __init__(
        self,
        family: str,
        components: dict[str, nn.Module],
        prediction: str | None = None,
        shift: float | None = None,
        model_sampling=None,
        pixel_space: bool = False,
        size: tuple[int, int] | None = None,
        latent_format: LatentFormat | None = None,
        defaults: dict | None = None,
        latent_rgb: previews.LatentRGB | None = None,
        lora_dir: str | None = None,
        embeddings_dir: str | None = None,
    ):
        spec = families.get(family)
        needed = set(spec.configs()) - spec.optional - ({"vae"} if pixel_space else set())
        missing = sorted(c for c in needed if components.get(c) is None)
        if missing:
            hint = " (a DiT file holds no VAE: pass vae=PATH)" if missing == ["vae"] else ""
            raise ValueError(
                f"a {family} pipeline needs components {missing}{hint}; got {sorted(components)}"
            )
        extra = set(components) - needed - spec.optional
        if extra:
            raise ValueError(f"components {sorted(extra)} have no place in a {family} pipeline")
        self.family = family
        self.spec = spec
        self.components = {k: m.eval().requires_grad_(False) for k, m in components.items() if m is not None}
        if model_sampling is not None and (prediction is not None or shift is not None):
            raise ValueError("give either model_sampling or prediction/shift, not both")
        net_cfg = self.components[spec.net].config
        if prediction is None and model_sampling is None and spec.inpaint_prediction is not None:
            if img2img.is_inpaint_unet(net_cfg.in_channels, net_cfg.out_channels):  # SD2-inpainting: ε
                prediction = spec.inpaint_prediction
        self.model_sampling = model_sampling or spec.sampling(prediction, shift)
        self.pixel_space = bool(pixel_space)
        if pixel_space and latent_format is not None:
            raise ValueError("a pixel-space pipeline takes no latent_format")
        self.latent_format = PIXEL_FORMAT if pixel_space else (latent_format or spec.latent_format)
        self.size = None if size is None else (int(size[0]), int(size[1]))
        # each network keeps its config: what save_checkpoint stores
        self.configs = {k: m.config for k, m in self.components.items()}
        self.detection = None  # set by from_single_file: what decided the family
        self.source: str | None = None  # the file from_single_file read: tuned schedules lie beside it
        unknown = set(defaults or {}) - set(GENERATION_DEFAULTS)
        if unknown:
            raise ValueError(
                f"defaults: unknown settings {sorted(unknown)}; known: {list(GENERATION_DEFAULTS)}"
            )
        self.defaults = {**GENERATION_DEFAULTS, **(defaults or {})}
        self.model_defaults = dict(defaults or {})  # only those the model (its file) states
        self.latent_rgb = latent_rgb  # the linear preview's factors; None: found when first needed
        self.loras = LoRAs(lora_dir)  # where prompt tags <lora:name:w> find their files, and a file cache
        self.controlnets = ControlNets()  # the last ControlNet files read (control_use.py)
        # textual inversions: prompts name them by file stem or `embedding:name` (textual_inversion.py)
        self.embeddings = None if embeddings_dir is None else TextualInversions.from_dir(embeddings_dir)
        self.offload: Offload | None = None  # enable_offload: components move to the device one at a time

    # -- construction ------------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, configs: dict | None = None, dtype: torch.dtype = torch.float32, **kw):
        """Every component built from its preset with random init; `configs` overrides per component."""
        configs = {**families.get(name).configs(), **(configs or {})}
        components = {c: build_component(c, cfg).to(dtype) for c, cfg in configs.items()}
        return cls(name, components, **kw)

    @classmethod
    def default(cls, dtype: torch.dtype = torch.float32, fast: bool = False) -> Pipeline:
        """latentforge's own 64×64 shapes model, shipped in the package (MODEL_CARD.md); no download.
        fast: its few-step student (4 steps, CFG 1) in place of its denoiser."""
        return cls.from_single_file("default-fast" if fast else DEFAULT_MODEL, dtype=dtype)

    @classmethod
    def from_single_file(
        cls,
        path: str,
        dtype: torch.dtype = torch.float32,
        vae: str | None = None,
        text_encoders=None,
        t5: str | None = None,
        t5_tokenizer: str | None = None,
        **kw,
    ):
        """A single-file checkpoint (family detected from its keys); `vae`: a VAE file replacing its own;
        `text_encoders`: {"clip_l": path, ...} replacing or supplying its text encoders; `t5`: SD3's T5-XXL
        file (t5xxl_fp16.safetensors), `t5_tokenizer`: its tokenizer.json when not beside it
        (checkpoints.load_checkpoint); "default" as the path is the shipped model, "default-fast" its
        few-step student."""
        from latentforge.checkpoints import load_checkpoint

        if path == "default-fast":
            return cls.from_single_file(
                DEFAULT_MODEL, dtype, vae, text_encoders, t5, t5_tokenizer, **kw
            ).load_denoiser(FAST_MODEL)
        path = model_file(path)
        if t5 is not None:
            text_encoders = {**(text_encoders or {}), "t5xxl": t5}
        ckpt = load_checkpoint(path, dtype, vae, text_encoders, t5_tokenizer)
        kw = {**metadata_options(ckpt.metadata, has_vae="vae" in ckpt.components), **kw}
        pipe = cls(ckpt.family, dict(ckpt.components), **kw)
        pipe.detection = ckpt.detection
        pipe.source = path
        return pipe

    def to(self, device=None, dtype: torch.dtype | None = None) -> Pipeline:
        if device is not None and self.offload is not None:
            raise ValueError(
                f"offload to {self.offload.device} is on: the components stay in host memory between uses; "
                "make a new pipeline to place them all on one device"
            )
        for m in self.components.values():
            m.to(device=device, dtype=dtype)
        return self

    # -- where the networks run: the GPU path ------------------------------------------------------------

    def enable_offload(self, device="cuda") -> Pipeline:
        """Sequential model offload (offload.py): every component stays in host memory and moves to `device`
        when it runs, the one there before moving back first, so `device` holds one component at a time
        (diffusers' enable_model_cpu_offload; GPUs too small for the whole model). Jobs run on `device`."""
        self.offload = Offload(device, self.components)
        return self

    def optimize(self, channels_last: bool = False, compile: bool | str = False) -> Pipeline:
        """GPU-oriented options, in place. channels_last: the UNet's and the VAE's 4-D weights in NHWC, the
        layout cuDNN's (and oneDNN's) fastest convolutions take. compile: `torch.compile` the denoising
        network (`nn.Module.compile`: its state dict keeps its keys), True or a mode ("reduce-overhead":
        CUDA graphs, which the host-side schedule and the deferred NaN check make capturable; "max-autotune").
        Shapes are static per job: a new size or batch compiles again."""
        if channels_last:
            for name in ("unet", "vae"):
                if name in self.components:
                    self.components[name].to(memory_format=torch.channels_last)
        if compile:
            modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
            mode = "default" if compile is True else compile
            if mode not in modes:
                raise ValueError(f"compile mode {compile!r} is not known; accepted: True, {', '.join(modes)}")
            self.net.compile(mode=mode, dynamic=False)
        return self

    def place(self, device=None, offload: bool = False, channels_last: bool = False, compile=False):
        """The CLI's and the server's placement flags in one call: `device` (with `offload`: the device the
        components visit one at a time; offload needs an accelerator), then `optimize`."""
        if offload:
            if device is None:
                raise ValueError("offload needs the accelerator to offload to: give a device, e.g. cuda")
            self.enable_offload(device)
        elif device is not None:
            self.to(device)
        return self.optimize(channels_last, compile)

    def _use(self, *names: str) -> None:
        """With offload on: these components to the device (the others home first); else nothing."""
        if self.offload is not None:
            self.offload.use(*names)

    # -- pieces ------------------------------------------------------------------------------------------

    @property
    def net(self) -> nn.Module:
        """The denoising network: unet, mmdit or dit."""
        return self.components[self.spec.net]

    @property
    def vae(self) -> AutoencoderKL | None:
        return None if self.pixel_space else self.components["vae"]

    @property
    def device(self) -> torch.device:
        """Where jobs run: the networks' device, or the offload device."""
        if self.offload is not None:
            return self.offload.device
        return next(self.net.parameters()).device

    @property
    def downscale(self) -> int:
        return 1 if self.pixel_space else self.vae.downscale

    @property
    def latent_channels(self) -> int:
        if self.pixel_space:
            net = self.net
            return net.config.in_channels
        return self.vae.latent_channels

    def load_denoiser(self, path: str) -> Pipeline:
        """Replace the denoising network's weights by those of a denoiser-only file (its
        `model.diffusion_model.*` keys, strictly: e.g. a distilled student of this model) and take the
        model sampling (the student may be a flow model of an ε teacher) and generation defaults it states;
        returns self."""
        from latentforge.checkpoint_io import read_metadata, read_state_dict

        prefix = "model.diffusion_model."
        sd = read_state_dict(path)
        other = sorted(k for k in sd if not k.startswith(prefix))
        if other or not sd:
            raise ValueError(f"{path}: not a denoiser-only file (keys outside {prefix}*: {other[:3]})")
        dtype = next(self.net.parameters()).dtype
        try:
            self.net.load_state_dict({k[len(prefix) :]: v.to(dtype) for k, v in sd.items()}, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{path}: its UNet does not fit this model's: {str(e)[:300]}") from None
        meta = read_metadata(path)
        if "latentforge.model_sampling" in meta:  # e.g. a rectified-flow student of an ε-prediction model
            self.model_sampling = model_sampling.from_json(meta["latentforge.model_sampling"])
        if "latentforge.defaults" in meta:
            d = json.loads(meta["latentforge.defaults"])
            self.defaults, self.model_defaults = {**self.defaults, **d}, {**self.model_defaults, **d}
        self.source = path  # tuned schedules lie beside the denoiser file
        return self

    @property
    def default_size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        if "dit" in self.components:
            s = self.components["dit"].config.input_size * self.downscale
            return s, s
        if self.size is not None:
            return self.size
        return self.spec.size, self.spec.size

    @property
    def inpaint_model(self) -> bool:
        """A 9-channel inpainting UNet (SD1.5/SD2/SDXL-inpainting), fed by img2img.ConcatInputs."""
        if self.spec.net != "unet" or self.pixel_space:
            return False
        return img2img.is_inpaint_unet(self.net.config.in_channels, self.latent_channels)

    @property
    def default_strength(self) -> float:
        """img2img's strength when none is given: 0.75 (A1111), 1 for an inpainting model (diffusers)."""
        return 1.0 if self.inpaint_model else 0.75

    @property
    def size_step(self) -> int:
        """Widths and heights are multiples of this (check_size; a DiT takes one size only)."""
        f = self.downscale
        return f * self.components["mmdit"].config.patch_size if "mmdit" in self.components else f

    def check_size(self, width: int, height: int) -> tuple[int, int]:
        f = self.downscale
        if "dit" in self.components:  # a fixed position table: one size only
            s = self.default_size[0]
            if (width, height) != (s, s):
                raise ValueError(
                    f"this DiT generates {s}x{s} images only, got width={width}, height={height}"
                )
            return width, height
        unit, top = f, MAX_SIZE
        if "mmdit" in self.components:  # latent must be whole patches within the P×P position table
            cfg = self.components["mmdit"].config
            unit = f * cfg.patch_size
            top = min(top, cfg.pos_embed_max_size * unit)
        for name, v in (("width", width), ("height", height)):
            _int(name, v, unit, top)
            if v % unit:
                near = min(max(unit, round(v / unit) * unit), top - top % unit)
                raise ValueError(
                    f"{name} must be a multiple of {unit} for {self.family}, got {v}; "
                    f"the nearest valid size is {near}"
                )
        return width, height

    def _text_encoders(self) -> dict[str, nn.Module]:
        enc = {k: m for k, m in self.components.items() if k in self.spec.prefixes and k != self.spec.net}
        enc.pop("vae", None)
        return enc

    def encode_prompt(
        self,
        prompts: Sequence[str],
        width: int,
        height: int,
        negative: bool = False,
        weighting: str = "a1111",
        chunks: int = 1,
    ) -> dict:
        """The conditioning of `prompts` (A1111 emphasis syntax and BREAK, prompts.py; `weighting` a1111 |
        comfy | none), with at least `chunks` CLIP chunks (long prompts take more: never cut)."""
        enc = self._text_encoders()
        # Each distinct prompt is encoded once, so image k's conditioning does not depend on the batch.
        unique = list(dict.fromkeys(prompts))
        net_config = self.net.config
        self._use(*enc)
        with conditioning.pad_chunks(chunks), conditioning.use_embeddings(self.embeddings):
            cond = families.encode(self.family, enc, unique, width, height, negative, net_config, weighting)
        index = torch.tensor([unique.index(p) for p in prompts])
        return {k: v[index.to(v.device)].to(self.device) for k, v in cond.items()}

    def denoiser(self, concat: torch.Tensor | None = None) -> Denoiser:
        """D(x, σ, **cond); concat: a 9-channel inpainting UNet's mask and masked-image latents
        [B, 1 + C, h, w] (img2img.ConcatInputs)."""
        net = self.net
        if "dit" in self.components and net.config.learn_sigma:
            net = FirstChannels(net, net.config.in_channels)
        if concat is not None:
            net = img2img.ConcatInputs(net, concat)
        return Denoiser(net, self.model_sampling)

    def schedule(self, sampler: str, scheduler: str, steps: int) -> torch.Tensor:
        """The σ values `sampler` visits in `steps` steps (ending in 0): a stock `scheduler`, or "tuned": the
        schedule `latentforge tune-schedule` stored beside the model file for this sampler and step count
        (tune_schedule.py; an error naming the file to create when there is none)."""
        if scheduler == TUNED:
            return load_tuned(self.source, sampler, steps)
        return sigmas_for(sampler, scheduler, self.model_sampling, steps)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> denoiser latents [B, C, H/f, W/f]: the VAE posterior's mean
        (its mode, as A1111 and ComfyUI encode for img2img), then LatentFormat.process_in."""
        x = images.to(self.device).float()
        if self.pixel_space:
            return self.latent_format.process_in(x)
        self._use("vae")
        vae = self.vae
        dtype = next(vae.parameters()).dtype
        # one image at a time in one memory layout: the latent of an image never depends on its batch
        z = torch.cat([vae.encode(x[k : k + 1].to(dtype).contiguous()).mean.float() for k in range(len(x))])
        return self.latent_format.process_in(z)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
        """Denoiser latents [B, C, h, w] -> images [B, 3, h·f, w·f] in [-1, 1] (not clamped).
        tiled: use the VAE's tiled decode; None: when the untiled one would not fit (`check_memory`)."""
        z = self.latent_format.process_out(latents.float())
        if self.pixel_space:
            return z
        if tiled is None:  # tiles when the untiled decode would not fit in the memory available
            f, (h, w) = self.downscale, latents.shape[-2:]
            avail = memory.available_memory(self.device)
            need = self.estimate_memory(w * f, h * f, latents.shape[0]).decode
            tiled = avail is not None and need > avail
            if tiled:
                warnings.warn(
                    f"decoding {w * f}x{h * f} in tiles: the whole-image decode needs about "
                    f"{memory._gb(need)}, {memory._gb(avail)} is available",
                    stacklevel=2,
                )
        self._use("vae")
        vae = self.vae
        dtype = next(vae.parameters()).dtype
        run = vae.decode_tiled if tiled else vae.decode
        return torch.cat([run(z[k : k + 1].to(dtype)).float() for k in range(z.shape[0])])

    def save_latents(self, latents: torch.Tensor, path: str, metadata: dict[str, str] | None = None) -> str:
        """Write denoiser latents [B, C, h, w] to a .safetensors file (atomically) for `decode_file`."""
        from latentforge.checkpoint_io import save_state_dict

        info = {"family": self.family, "shape": list(latents.shape)}
        meta = {"latentforge.latents": json.dumps(info), **(metadata or {})}
        save_state_dict({"latents": latents.detach().float().cpu()}, path, metadata=meta)
        return path

    @torch.no_grad()
    def decode_file(self, path: str, tiled: bool | None = None) -> list[Image.Image]:
        """Decode latents saved by `save_latents` (e.g. after a failed decode) into images."""
        from latentforge.checkpoint_io import read_metadata, read_state_dict

        meta = read_metadata(path)
        sd = read_state_dict(path)
        z = sd.get("latents")
        c = self.latent_channels
        if "latentforge.latents" not in meta or z is None or z.ndim != 4 or z.shape[1] != c:
            got = "no latents" if z is None else f"a tensor of shape {tuple(z.shape)}"
            raise ValueError(
                f"{path!r} holds {got}, not latents [B, {c}, h, w] saved by latentforge for this model"
            )
        return to_pil(self.decode(z.to(self.device), tiled=tiled))

    # -- LoRAs (lora_use.py) ------------------------------------------------------------------------------

    @property
    def lora_dir(self) -> str | None:
        return self.loras.lora_dir

    @lora_dir.setter
    def lora_dir(self, value: str | None) -> None:
        self.loras.lora_dir = value

    def lora_uses(self, prompt, loras=None, negative_prompt="") -> tuple[str | list[str], list[LoRAUse]]:
        """(the prompt(s) without `<lora:...>` tags, the LoRAs a call with these arguments applies)."""
        return self.loras.uses(self, prompt, loras, negative_prompt)

    def lora_hashes(self, prompt, loras=None) -> str | None:
        """A1111's infotext field "Lora hashes" for a call with this prompt and `loras` (None: no file)."""
        return self.loras.hashes(self, prompt, loras)

    # -- memory ------------------------------------------------------------------------------------------

    def estimate_memory(
        self, width: int, height: int, batch_size: int = 1, cfg: float = 7.0, controlnet=None
    ) -> memory.MemoryEstimate:
        """Peak activation bytes of sampling and of decoding (memory.estimate); controlnet: the call's
        ControlNets, as `__call__` takes them (their activations, residuals and files still to load)."""
        return memory.estimate(self, width, height, batch_size, cfg, controlnet)

    def check_memory(
        self, width: int, height: int, batch_size: int = 1, cfg: float = 7.0, controlnet=None
    ) -> bool:
        """Raise NotEnoughMemory before any work, else whether decoding must be tiled (memory.check)."""
        return memory.check(self, width, height, batch_size, cfg, controlnet)

    # -- generation --------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, *args, **kwargs) -> torch.Tensor:
        """The denoised latents [B, C, h, w] (see `__call__` for the arguments; one batch, hires fix
        included); with a mask, the known region is the encoded init image (before the pixel composite
        `__call__` does)."""
        kw, hr, count, uses = self._plan(args, kwargs)
        if count != 1:
            raise ValueError(f"sample makes one batch; batch_count {count} is for __call__")
        with self.loras.applied(self, uses):
            return self._run(kw, hr)[0]

    def _plan(self, args: tuple, kwargs: dict) -> tuple[dict, dict | None, int, list[LoRAUse]]:
        """The arguments of one batch's `_sample` (model defaults filled in, LoRA tags taken out of the
        prompt), the hires fix's options (None: off), batch_count and the LoRAs to apply."""
        kwargs = dict(kwargs)
        count = _int("batch_count", kwargs.pop("batch_count", 1), 1, MAX_BATCH_COUNT)
        loras = kwargs.pop("loras", None)
        h = {k: kwargs.pop(k) for k in HIRES_ARGS if k in kwargs}
        try:
            bound = _sample_signature().bind(self, *args, **kwargs)
        except TypeError as e:
            raise TypeError(f"Pipeline: {e}") from None
        bound.apply_defaults()
        kw = dict(bound.arguments)
        del kw["self"]
        raw = kw["prompt"]
        kw["prompt"], uses = self.lora_uses(raw, loras, kw["negative_prompt"])
        for k, v in self.defaults.items():
            kw[k] = v if kw.get(k) is None else kw[k]
        # the completion is for text-to-image prompts as written (an init image has its background already;
        # a prompt with LoRA tags is outside the grammar): `_run` applies it batch by batch, seed by seed
        if kw["complete_prompt"] not in PROMPT_COMPLETIONS:
            raise ValueError(
                f"complete_prompt must be one of {', '.join(PROMPT_COMPLETIONS)} (or None: the model's "
                f"default), got {kw['complete_prompt']!r}"
            )
        img = kw["init_image"] is not None or kw["init_latent"] is not None
        if img or kw["prompt"] != raw:
            kw["complete_prompt"] = "none"
        if isinstance(kw["seed"], (list, tuple)) and count != 1:
            raise ValueError("a list of seeds (one per image) is for one batch; batch_count must be 1")
        if kw.get("strength") is None:  # img2img: 0.75, 1 for an inpainting model
            kw["strength"] = self.default_strength
        if h.get("hires_scale", 1) == 1 and h.get("hires_size") is None:
            extra = sorted(k for k in h if k not in ("hires_scale", "hires_size") and h[k] is not None)
            if extra:
                raise ValueError(
                    f"{', '.join(extra)} need hires_scale > 1 or hires_size (the hires fix is off)"
                )
            return kw, None, count, uses
        if kw["init_image"] is not None or kw["init_latent"] is not None:
            raise ValueError("the hires fix is a text-to-image option (A1111's txt2img); drop init_image")
        d = HIRES_DEFAULTS | {k: v for k, v in h.items() if v is not None}
        scale, denoise, steps, upscaler = hires.check(
            d["hires_scale"], d["hires_denoise"], d["hires_steps"], d["hires_upscaler"]
        )
        size = d.get("hires_size")
        if size is not None:
            size = (_int("hires width", size[0], 1, MAX_SIZE), _int("hires height", size[1], 1, MAX_SIZE))
        sampler = d.get("hires_sampler") or kw["sampler"]
        get_sampler(sampler)  # an unknown name fails before the first pass
        return kw, {"scale": scale, "size": size, "denoise": denoise, "steps": steps, "upscaler": upscaler,
                    "sampler": sampler}, count, uses  # fmt: skip

    @torch.no_grad()
    def _run(self, kw: dict, hr: dict | None) -> tuple[torch.Tensor, img2img.Job | None]:
        """One batch: `_sample`, then the hires fix's upscale and second pass (hires.py)."""
        if kw["complete_prompt"] != "none":  # both passes take the completed prompts
            completed = self._completed(kw["prompt"], kw["seed"], kw["batch_size"], kw["complete_prompt"])
            kw = {**kw, "prompt": completed}
        latents, job = self._sample(**kw)
        if hr is None or (kw["stop"] is not None and kw["stop"]()):  # stopped: no second pass
            return latents, job
        f = self.downscale
        w, h = hires.target_size(
            latents.shape[-1] * f, latents.shape[-2] * f, hr["scale"], self.size_step, hr["size"]
        )
        up = hires.upscale(self, latents, hr["upscaler"], w, h)
        second = {"init_latent": up, "strength": hr["denoise"], "width": w, "height": h}
        second |= {"steps": hr["steps"] or kw["steps"], "sampler": hr["sampler"]}
        return self._sample(**{**kw, **second})

    def _completed(self, prompt, seed, batch_size: int, mode: str) -> list[str]:
        """Each image's prompt completed from its own seed (image k: seed + k, or seed[k]), so that the image
        does not depend on its batch: what it leaves unstated (the background; with "layout" every position
        too) drawn as the training data draws it (shapes.complete_prompt): exact ancestral sampling of p(what
        is unstated | caption) first, as caption upsampling (Betker et al. 2023, §3.5) and layout planning
        (Lian et al. 2023) do with learned models. Text outside the shapes grammar is kept as given."""
        from latentforge.shapes import complete_prompts

        batch_size = _int("batch_size", batch_size, 1, MAX_BATCH)
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed + k for k in range(batch_size)]
        return complete_prompts(self._prompts("prompt", prompt, batch_size), mode, seeds)

    def prompt_completion(self, requested: str | None) -> str | None:
        """The completion a call with complete_prompt=`requested` asks for, where one is in play (the model
        completes, or the call asks): what an image's "Complete prompt" records so that a replay completes
        as it did; None where neither (a model without completion, asked for none)."""
        mode = requested or self.defaults["complete_prompt"]
        return None if mode == self.defaults["complete_prompt"] == "none" else mode

    def image_prompts(self, *args, **kwargs) -> list[str]:
        """The prompt each image of a `__call__` with these arguments is made from, in order (what its
        metadata should say): as given, or completed (complete_prompt, "layout" for the default model)."""
        kw, _, count, _ = self._plan(args, kwargs)
        b, mode = kw["batch_size"], kw["complete_prompt"]
        if mode == "none":  # as given: LoRA tags kept (`_plan` took them out of kw)
            raw = args[0] if args else kwargs["prompt"]
            return [p for _ in range(count) for p in self._prompts("prompt", raw, b)]
        if isinstance(kw["seed"], (list, tuple)):
            return self._completed(kw["prompt"], kw["seed"], b, mode)
        return [p for j in range(count) for p in self._completed(kw["prompt"], kw["seed"] + j * b, b, mode)]

    def job_steps(self, *args, **kwargs) -> int:
        """Sampler steps a `__call__` with these arguments takes (all batches, both hires passes)."""
        kw, hr, count, _ = self._plan(args, kwargs)
        return count * self._job_steps(kw, hr)

    def _job_steps(self, kw: dict, hr: dict | None) -> int:
        """Sampler steps one batch takes (the progress bar's share of it)."""
        n = kw["steps"] if kw["init_image"] is None else img2img.steps_kept(kw["steps"], kw["strength"])
        if hr is not None:
            n += img2img.steps_kept(hr["steps"] or kw["steps"], hr["denoise"])
        return n

    @torch.no_grad()
    def _sample(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] = "",
        steps: int | None = None,
        sampler: str | None = None,
        scheduler: str | None = None,
        cfg: float | None = None,
        seed: int = 0,
        width: int | None = None,
        height: int | None = None,
        batch_size: int = 1,
        callback: Callable | None = None,
        progress: bool = True,
        weighting: str = "a1111",
        init_image=None,
        strength: float | None = None,
        mask=None,
        mask_blur: float = 4,
        masked_content: str = "original",
        strict_size: bool = False,
        outpaint=None,
        inpaint_full_res: bool = False,
        inpaint_full_res_padding: int = 32,
        subseed: int | None = None,
        subseed_strength: float = 0.0,
        seed_resize_from: tuple[int, int] | None = None,
        init_latent: torch.Tensor | None = None,
        preview_every: int = 0,
        preview: str | previews.Previewer = "linear",
        on_preview: Callable | None = None,
        rng: str = "cpu",
        stop: Callable[[], bool] | None = None,
        cache_interval: int = 1,
        cache_depth: int = 0,
        cache_threshold: float = 0.0,
        tome_ratio: float = 0.0,
        tome_max_downsample: int = 1,
        controlnet=None,
        complete_prompt: str | None = None,
    ) -> tuple[torch.Tensor, img2img.Job | None]:
        """(latents [B, C, h, w], the img2img job or None). init_latent: img2img from these denoiser latents
        [B, C, h, w] at `strength` (the hires fix's second pass) instead of an encoded init_image.
        complete_prompt is applied to the prompts before (`_run`)."""
        d = self.defaults
        steps = d["steps"] if steps is None else steps
        sampler = d["sampler"] if sampler is None else sampler
        scheduler = d["scheduler"] if scheduler is None else scheduler
        cfg = d["cfg"] if cfg is None else cfg
        batch_size = _int("batch_size", batch_size, 1, MAX_BATCH)
        prompts = self._prompts("prompt", prompt, batch_size)
        negatives = self._prompts("negative_prompt", negative_prompt, batch_size)
        if self.spec.class_labels and any(negatives):
            raise ValueError("a DiT model has no negative prompt: its unconditional branch is the null class")
        steps = _int("steps", steps, 1, MAX_STEPS)
        sample_fn = get_sampler(sampler)
        if scheduler not in SCHEDULERS and scheduler != TUNED:
            raise unknown_name_error("scheduler", scheduler, [*SCHEDULERS, TUNED])
        if isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not 0 <= cfg <= MAX_CFG:
            raise ValueError(f"cfg must be a number in [0, {MAX_CFG:g}], got {cfg!r}")
        if isinstance(seed, (list, tuple)):  # one seed per image (the server's merged batches)
            if len(seed) != batch_size:
                raise ValueError(f"seed has {len(seed)} entries for a batch of {batch_size}")
            seeds = [_int("seed", s, 0, 2**63 - 1) for s in seed]
        else:
            seed = _int("seed", seed, 0, 2**63 - 1 - batch_size)
            seeds = [seed + k for k in range(batch_size)]
        subseed, subseed_strength, resize = _check_variation(
            subseed, subseed_strength, seed_resize_from, batch_size
        )
        dw, dh = self.default_size
        padding = None  # "inpaint only the masked area": its padding (canvas.py)
        if init_image is not None:  # img2img: the init image's size unless one is given
            strength = img2img.check_strength(self.default_strength if strength is None else strength)
            if outpaint is not None:  # a bigger canvas whose new border is the mask (canvas.py)
                init_image, mask = img2img.outpaint(
                    init_image, mask, outpaint, self.size_step, batch_size, width, height, strict_size
                )
                width = height = None
            dw, dh = img2img.image_size(init_image)
            if mask is not None:
                mask_blur = img2img.check_mask_blur(mask_blur)
                masked_content = img2img.check_masked_content(masked_content)
                if inpaint_full_res:  # the output keeps the picture's size; width×height is the working size
                    padding = canvas.check_padding(inpaint_full_res_padding)
                    dw, dh = self.default_size
        elif mask is not None or outpaint is not None:
            what = "a mask" if outpaint is None else "outpaint"
            raise ValueError(f"{what} needs an init_image: the picture to inpaint")
        if inpaint_full_res and padding is None:
            raise ValueError("inpaint_full_res (inpaint only the masked area) needs an init_image and a mask")
        if init_latent is not None:
            strength = img2img.check_strength(strength)
            dw, dh = init_latent.shape[-1] * self.downscale, init_latent.shape[-2] * self.downscale
        width, height = self.check_size(dw if width is None else width, dh if height is None else height)
        # before any work: refuse a job that cannot fit (its ControlNets included)
        self.check_memory(width, height, batch_size, cfg, controlnet)
        speed = Speedups(cache_interval, cache_depth, cache_threshold, tome_ratio, tome_max_downsample)
        speed.check(self.net)  # before any work
        preview_hook = previews.hook(self, preview, preview_every, on_preview)  # checked before any work
        # ControlNets (control_use.py): files read, fit to the UNet checked, control maps made; the hires
        # fix's second pass (init_latent) resizes them to its size without a word
        strict, hires_pass = strict_size and init_latent is None, init_latent is not None
        control = prepare_controls(self, controlnet, width, height, batch_size, strict, hires_pass)
        if control is not None and cache_interval > 1:
            raise ValueError(
                "cache_interval (DeepCache) skips the UNet blocks a ControlNet adds to: use one or the other"
            )

        # the prompt and the negative prompt padded to the same chunk count, so CFG can batch them (A1111)
        enc = self._text_encoders()
        both = prompts if cfg == 1 else [*prompts, *negatives]  # and SD3's T5 tokens to the same length
        with conditioning.use_embeddings(self.embeddings), conditioning.same_t5_length(enc, both, weighting):
            n = families.chunk_count(self.family, enc, prompts, weighting)
            if cfg != 1:
                n = max(n, families.chunk_count(self.family, enc, negatives, weighting))
            cond = self.encode_prompt(prompts, width, height, weighting=weighting, chunks=n)
            uncond = None if cfg == 1 else self.encode_prompt(negatives, width, height, True, weighting, n)
        # the schedule stays on the host (samplers read σ's as numbers: no device sync per step); a tuned one
        # may carry evaluation shifts δ_i: the network is then queried at σ_i·e^{δ_i} (tune_schedule.py)
        if scheduler == TUNED:
            sigmas, shifts, coefficients = read_tuned(self.source, sampler, steps)
        else:
            sigmas, shifts, coefficients = self.schedule(sampler, scheduler, steps), [], None
        sigmas = sigmas.cpu()
        shift = ShiftedDenoiser(None, sigmas, shifts).shift if shifts else None  # δ(σ), any σ

        def guided(model, tuned=sigmas):  # as the tuner measured it: CFG inside, the shift outside
            return model if shift is None else ShiftedDenoiser(model, tuned, shifts)

        model = guided(CFGDenoiser(self.denoiser(), scale=float(cfg)))

        f, c = self.downscale, self.latent_channels
        subseeds = None if subseed is None else [subseed + k for k in range(batch_size)]
        # drawn on the CPU, one generator per image: the same image for a seed on any device and in any batch;
        # A1111's variation seed and "resize seed from" (noise.variation_noise)
        from_latent = None if resize is None else (resize[1] // f, resize[0] // f)
        shape = (batch_size, c, height // f, width // f)
        if rng not in RNG_SOURCES:
            raise ValueError(f"rng must be one of {', '.join(RNG_SOURCES)}, got {rng!r}")
        gen_device = "cpu" if rng == "cpu" else self.device
        noise = variation_noise(shape, seeds, subseeds, subseed_strength, from_latent, gen_device)
        noise = noise.to(self.device)
        x, job = noise * sigmas[0], None
        if init_image is not None:  # img2img/inpainting start later on the same schedule (img2img.py)
            job = img2img.prepare(
                self, init_image, strength, mask, mask_blur, masked_content, seeds, width, height,
                strict_size, padding, self.inpaint_model,
            )  # fmt: skip
            sigmas, x = img2img.start(job, self.model_sampling, sigmas, noise)
            if len(sigmas) < 2:  # strength 0: no step at all, the encoded input
                return img2img.finish(job, job.latent), job
            if job.mask is not None and job.concat is None:  # a 9-channel UNet is not blended (img2img.py)
                model = img2img.InpaintDenoiser(model, job.mask, job.latent, noise)
        elif init_latent is not None:
            job = img2img.Job(None, init_latent.to(self.device, torch.float32), strength)
            sigmas, x = img2img.start(job, self.model_sampling, sigmas, noise)
            if len(sigmas) < 2:
                return job.latent, job
        if self.inpaint_model:  # the mask and the masked image's latents beside x (none: all repainted)
            concat = None if job is None else job.concat
            if concat is None:
                blank = torch.zeros(batch_size, 3, height, width, device=self.device)
                concat = img2img.inpaint_conditioning(self, blank, None)
            model = guided(CFGDenoiser(self.denoiser(concat), scale=float(cfg)))
        options = {"seed": seeds} if _accepts(sample_fn, "seed") else {}
        if coefficients is not None:  # a tuned solver's steps (tune_solver.py) are for the whole schedule
            if len(sigmas) != steps + 1:
                raise ValueError(
                    f"the tuned {sampler} schedule at {steps} steps carries solver coefficients for the "
                    "whole schedule; img2img, inpainting and the hires fix start part-way: use a schedule "
                    "tuned without --coefficients, or another scheduler"
                )
            options["coefficients"] = coefficients
        # step caching / token merging for this pass only (speedups.py); the cache counts steps by σ
        # the σ's the network is called with (the schedule's, or shifted), by which those passes count steps
        queried = sigmas
        if shift is not None:
            queried = torch.where(sigmas > 0, sigmas * shift(sigmas).exp(), 0).to(sigmas.dtype)
        ts = self.model_sampling.timestep(queried[queried > 0].float().cpu()) if speed.active else None
        controls = controls_applied(control, self.net, self.model_sampling, queried)  # on for this pass only
        self._use(self.spec.net)
        try:
            # one working buffer for the whole pass (models/winograd.py): every network call reuses the memory
            # of the one before, instead of page-faulting fresh memory at each step (3% of an SD1.5 step at
            # a 64×64 latent on the CPU); freed when the pass ends
            with speed.applied(self.net, ts), controls, workspace():
                latents = sample_fn(
                    model,
                    x,
                    sigmas,
                    extra_args={"cond": cond, "uncond": uncond},
                    callback=previews.chain(callback, preview_hook, _stopper(stop)),
                    disable=not progress,
                    **options,
                )
        except _Stopped as e:  # A1111's interrupt/skip: the last step's x̂₀ is the result
            latents = e.denoised
        if not torch.isfinite(latents).all():  # A1111's NaN check: a black image would hide the failure
            raise FloatingPointError(
                f"sampling produced NaN or infinite latents ({sampler}, {steps} steps, cfg {cfg:g}): "
                "the model's output is not finite (in float16, try float32)"
            )
        return img2img.finish(job, latents), job

    def stream(self, *args, **kwargs) -> Iterator[previews.Event]:
        """`__call__` on a worker thread, yielding Event("preview", step, images) every preview_every steps
        (default 1) while it samples, then Event("images", steps, images) (previews.stream)."""
        return previews.stream(self, *args, **kwargs)

    def __call__(self, *args, **kwargs) -> list[Image.Image]:
        """Generate `batch_size` images; image k uses seed + k, so it does not depend on the batch (seed
        may also be a list, one per image, with batch_count 1).

        complete_prompt (None: the model's default, "layout" for the default model): what a text-to-image
        prompt in the shapes grammar leaves unstated is drawn from the image's seed as the training data
        draws it before the network sees it (shapes.complete_prompt): "background" (a colour no object has),
        "layout" (every unstated position as well, in the labelled form), "none"; `image_prompts` says which
        prompt each image was made from.
        prompt: text (a class index such as "207" for DiT), or one per image. negative_prompt: the
        unconditional prompt ("" by default). steps >= 1; sampler and scheduler under ComfyUI's names;
        cfg in [0, 100] (1 skips the unconditional pass); steps, sampler, scheduler, cfg left None take
        the model's `defaults` (20, euler, normal, 7 unless its file says otherwise); width/height in
        pixels (family default if None).
        Prompts take A1111's emphasis syntax ("(word:1.3)", "[word]", BREAK; latentforge.prompts), applied as
        `weighting` says: "a1111" (scale the embeddings, restore their mean), "comfy" (interpolate from the
        empty prompt's) or "none" (literal text); prompts longer than the text tower's context are encoded
        in chunks and concatenated, never cut.
        LoRAs (lora.py; UNet families): A1111's tags in the prompt, `<lora:name>`, `<lora:name:w>`,
        `<lora:name:te_w:unet_w>` (text encoder first, as A1111), are taken out of the text before encoding;
        each names `name.safetensors` in the pipeline's `lora_dir` (names only; a missing one is an error
        naming it and what the folder has). loras=[(path or lora.LoRA, unet_w, te_w), ...] adds LoRAs from
        Python (te_w defaults to unet_w). They are patched on for the duration of the call only
        (lora.patch: the weights are never written, so nothing persists: the next call without them is
        bit-identical to one before), files read once while their size and mtime stay the same. A batch
        of different prompts must name the same LoRAs with the same weights (refused otherwise; A1111 takes
        the first prompt's); tags in the negative prompt are refused. `lora_hashes` gives the infotext's
        "Lora hashes". Not thread-safe: one call at a time per pipeline.
        callback(dict(x, i, sigma, sigma_hat, denoised)) is called after each step; progress shows a bar.
        Live previews (previews.py): with preview_every=N, on_preview(step, images) gets a picture of the
        current x̂₀ after every N-th step (step counted from 1 in each sampling pass) made by `preview`:
        "linear" (a latent->RGB projection, the default) or a previews.Previewer (e.g. "taesd" with its
        decoder file); `stream` yields them instead.
        Memory: a job that cannot fit is refused before any work (NotEnoughMemory), decoding is tiled when
        the untiled decode would not fit (`check_memory`); if decoding fails anyway the latents are saved
        to `latents_path` (default: a file in the temp folder; `latents_metadata` goes into its header) and
        DecodeFailed names it; `decode_file` decodes it again.

        Image to image (img2img.py): init_image (a PIL image, one per image, or a [B, 3, H, W] tensor in
        [-1, 1]; width/height default to its size, another size is resized with a warning, or refused with
        strict_size=True) is encoded by the VAE, noised to the start of the last ⌈steps·strength⌉ steps of
        the schedule and sampled from there: strength 0 returns its VAE round trip, 1 equals text-to-image.
        Inpainting: mask (PIL grey/RGB or a [B, 1, H, W] tensor in [0, 1]; white = repaint) blurred by
        mask_blur pixels (Gaussian σ); masked_content "original" (the image), "latent_noise" (noise in the
        masked latent) or "fill" (the mean colour of the rest); the known region is re-noised and blended
        at every step, and the original pixels are pasted back outside the blurred mask. strength left None:
        0.75, or 1 for a 9-channel inpainting checkpoint, which gets the mask and the masked image's latents
        beside x instead of the blending (as diffusers' StableDiffusionInpaintPipeline; `inpaint_model`).
        outpaint: pixels added as (left, right, top, bottom), or one number for all sides: the canvas (the
        init image at width×height if given, else its own size) grows by them, the new border is the mask
        (with any mask given) and starts as the image's edge pixels extended (masked_content "fill" and
        "latent_noise" replace it as usual); padding that would leave the size off the model's size step
        is grown to it, with a warning. inpaint_full_res: A1111's "inpaint only the masked area": the box
        around the mask plus inpaint_full_res_padding pixels (grown to the working size's aspect ratio) is
        inpainted at width×height (default: the model's size) and pasted back through the blurred mask;
        the output keeps the init image's size.

        Batches and seeds (A1111): batch_count batches of batch_size; image k of batch j takes seed
        seed + j·batch_size + k. subseed / subseed_strength: A1111's variation seed, the initial noise
        slerped from seed's towards subseed's (noise.variation_noise); seed_resize_from (width, height):
        the noise drawn at that size and centred, so a seed keeps its composition at another size. Noise
        is drawn on the CPU, so a seed gives the same image on any device (rng="cpu"; rng="device" draws it
        on the pipeline's device, as A1111's "GPU" source).
        Hires fix (hires.py, text-to-image only): hires_scale > 1 (or hires_size (w, h)) generates at the
        base size, upscales with hires_upscaler (A1111's names: hires.UPSCALERS)
        and runs img2img at the target size with strength hires_denoise (0.7) over hires_steps (0: steps),
        with hires_sampler (default: sampler). progress: one bar over the whole job, with it/s and ETA.
        stop: a function checked after every step; when it returns True, the current pass ends there and
        its x̂₀ is the batch's result (A1111's interrupt), the hires fix's second pass and later batches are
        not run. Latents that are not finite raise FloatingPointError (A1111's NaN check).
        Doing less work per image (speedups.py; all off by default, and off is bit-identical): cache_interval
        N > 1 runs the full network every N sampler steps only (steps counted in σ, so Heun's two calls and
        CFG's two halves share a step): a UNet reuses its deep features there (DeepCache; cache_depth: the
        skip branch, 0 = shallowest), a DiT/MMDiT its block stack's residual (FORA); cache_threshold > 0
        (DiT/MMDiT) reuses the residual while the first block's modulated input has changed by less than
        that in relative L1 (TeaCache); tome_ratio r merges r of the tokens before self-attention in a UNet's
        transformers at downsampling <= tome_max_downsample (1, 2, 4, 8; ToMe for SD). They apply to each
        sampling pass (the hires fix's second one too) and leave nothing on the model.
        ControlNet (control_use.py; UNet families): controlnet=control_use.Control(model, image, weight=1,
        start=0, end=1, guess=False, preprocess="none") or a list of them (or dicts of their fields): model a
        ControlNet or its file (original `control_model.*` layout or diffusers', read once while it is
        unchanged), image the control map (PIL, path, or (1|B, C, H, W) in [0, 1]) or the picture to make it
        from with preprocess "canny" | "scribble" | "seg" (control_images.py); a control image of another
        size is resized with a warning (refused with strict_size). Its residuals, times weight, are added
        to the UNet's skips and middle block at the steps i of n with start <= i/n <= end (A1111's guidance
        start/end; counted by σ, per sampling pass); guess=True: on CFG's conditional half only, residual k
        of N scaled by 0.825^(N−1−k) (the ControlNet paper's guess mode). Several ControlNets add up. Off
        (weight 0, or outside the window) is bit-identical to no ControlNet; cache_interval > 1 is refused.
        """
        latents_path = kwargs.pop("latents_path", None)
        latents_metadata = kwargs.pop("latents_metadata", None)
        kw, hr, count, uses = self._plan(args, kwargs)
        bar, user_callback = None, kw["callback"]
        if kw["progress"]:  # one bar over the whole job (all batches, both hires passes): it/s and ETA
            from tqdm.auto import tqdm

            total = count * self._job_steps(kw, hr)

            def tick(info: dict) -> None:
                nonlocal bar
                if bar is None:  # made at the first step: a job refused before any work shows no bar
                    bar = tqdm(total=total, unit="step", desc="generating")
                bar.update(1)
                if user_callback is not None:
                    user_callback(info)

            kw = {**kw, "callback": tick, "progress": False}
        images: list[Image.Image] = []
        b = kw["batch_size"]
        try:
            with self.loras.applied(self, uses):  # the LoRAs on for the whole job, off after it
                for j in range(count):  # A1111's batch count: batch j takes seeds seed + j·batch_size + k
                    if j and kw["stop"] is not None and kw["stop"]():
                        break
                    sub = None if kw["subseed"] is None else kw["subseed"] + j * b
                    seed = kw["seed"] if isinstance(kw["seed"], (list, tuple)) else kw["seed"] + j * b
                    latents, job = self._run({**kw, "seed": seed, "subseed": sub}, hr)
                    path = latents_path
                    if count > 1 and path is not None:  # one file per batch
                        root, ext = os.path.splitext(path)
                        path = f"{root}-{j}{ext}"
                    images += self._decode_images(latents, job, path, latents_metadata)
        finally:
            if bar is not None:
                bar.close()
        return images

    def _decode_images(self, latents, job, latents_path, latents_metadata) -> list[Image.Image]:
        try:
            return to_pil(img2img.composite(job, self.decode(latents)))  # (decode runs under no_grad)
        except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
            path = latents_path or os.path.join(
                tempfile.gettempdir(), f"latentforge-latents-{os.getpid()}-{time.time_ns()}.safetensors"
            )
            self.save_latents(latents, path, latents_metadata)
            f, (h, w) = self.downscale, latents.shape[-2:]
            raise DecodeFailed(
                f"decoding the {w * f}x{h * f} images failed after sampling ({type(e).__name__}: {e}); "
                f"the sampled latents are saved in {path}: decode them again with "
                f"`latentforge generate --decode {path} --model MODEL` (or Pipeline.decode_file)",
                path,
            ) from e

    @staticmethod
    def _prompts(name: str, value, batch_size: int) -> list[str]:
        if isinstance(value, str):
            return [value] * batch_size
        values = list(value) if isinstance(value, Sequence) else None
        if values is None or any(not isinstance(v, str) for v in values):
            raise ValueError(f"{name} must be a string or a list of strings, got {value!r}")
        if len(values) != batch_size:
            raise ValueError(f"{name} has {len(values)} entries for a batch of {batch_size}")
        return values
