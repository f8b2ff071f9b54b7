"""Training configs: typed dataclasses, named presets, TOML files and command-line overrides.

A run is described by one `DenoiserTrainConfig` or `VAETrainConfig`. The resolution order is
preset → TOML file → flags: `resolve(kind, preset=..., toml=..., overrides=[...])`. A TOML file holds the
dataclass fields by name; nested configs are tables (``[objective]``, ``[unet]``, ``[text]``). A flag
``--name value`` sets a top-level field (dashes read as underscores) and ``--table.field value`` a nested one;
values are parsed by the field's declared type, so a typo or a wrong type is an error that names the field
and what it accepts. No registries built from strings: the presets are the dicts of presets.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import tomllib

from latentforge import families
from latentforge.models import (
    AutoencoderKLConfig,
    CLIPTextConfig,
    DiTConfig,
    MMDiTConfig,
    UNetConfig,
)
from latentforge.training.objectives import ObjectiveConfig
from latentforge.training.presets import DENOISER_PRESETS, VAE_PRESETS

FAMILIES_TRAINABLE = families.trainable()
NETS = ("unet", "dit", "mmdit")
PRECISIONS = ("no", "bf16", "fp16")
# Image sides a run accepts: shapes data as shapes.render renders them, a folder of images up to 4096.
SHAPES_RES_MIN, SHAPES_RES_MAX = 32, 512  # = shapes.render.MIN_RES, MAX_RES (checked in the tests)
FOLDER_RES_MIN, FOLDER_RES_MAX = 32, 4096
MIN_IMAGE_SIZE = 32  # folder images whose shorter side is below this are skipped (not upscaled)


@dataclass
class DenoiserTrainConfig:
    """Everything one denoiser run depends on. Model fields define the network (compared on --resume)."""

    # -- model ------------------------------------------------------------------------------------------
    family: str = "sd15"  # checkpoint layout the result is saved in (prefixes, conditioning)
    net: str = "unet"  # "unet" | "dit" (text variant) | "mmdit"
    unet: UNetConfig | None = None
    dit: DiTConfig | None = None
    mmdit: MMDiTConfig | None = None
    text: CLIPTextConfig | None = None  # the text encoder (clip_l for sd15; trained jointly from scratch)
    train_text_encoder: bool = True
    text_encoder: str | None = None  # a CLIP text-encoder file (e.g. clip_l.safetensors) instead of a new one
    pixel_space: bool = False  # True: diffuse RGB pixels directly, no VAE
    vae: str | None = None  # a VAE file (e.g. from `train vae`); None with init_from: the checkpoint's VAE
    init_from: str | None = None  # fine-tune this single-file checkpoint (SD1.5, SDXL, SD3 layouts)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    # -- data -------------------------------------------------------------------------------------------
    data: str = "shapes"  # "shapes" (rendered on the fly) or a folder of images with captions
    resolution: int = 64
    center_crop: bool = True
    random_flip: bool = False  # never for shapes: a flip changes "left" into "right"
    buckets: bool = False  # aspect-ratio buckets (kohya): area <= resolution², sides multiples of bucket_step
    bucket_step: int = 64
    cache_latents: bool = False  # folder data: VAE latents (and frozen text conditioning) cached on disk
    cache_dir: str | None = None  # where; None: <out>/cache. Reused across runs while inputs are unchanged
    caption_dropout: float = 0.1  # P(caption -> ""): trains the unconditional branch for CFG
    # shapes captions: each stated small object's latent pixels weigh 1 + this in the loss (0: off;
    # shapes.data.small_object_weights)
    small_object_weight: float = 0.0
    num_workers: int = 1
    min_image_size: int = MIN_IMAGE_SIZE  # folder images with a side below this are skipped and counted
    # -- optimisation -----------------------------------------------------------------------------------
    batch_size: int = 32  # per rank and micro-step
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 1e-4
    lr_schedule: str = "constant"  # "constant" | "cosine" | "linear" (after warm-up)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    ema_decay: float = 0.999
    precision: str = "no"  # autocast: "no" | "bf16" | "fp16" (fp16 with a GradScaler, CUDA only)
    grad_checkpointing: bool = False
    compile: bool = False
    parallel: str = "ddp"  # with several ranks: "ddp" (replicas) | "fsdp" (sharded parameters, fsdp.py)
    seed: int = 0
    # -- outputs ----------------------------------------------------------------------------------------
    log_every: int = 10
    checkpoint_every: int = 500
    keep_last: int = 2
    sample_every: int = 0  # 0: only at the end
    sample_prompts: tuple[str, ...] = ()  # () with shapes data: 8 fixed validation captions
    sample_steps: int = 20
    sample_sampler: str = "euler"
    sample_scheduler: str = "normal"
    sample_cfg: float = 3.0
    eval_n: int = 64  # shapes only: held-out prompts scored by the evaluator at every sample step
    overwrite: bool = False  # a new run into a non-empty folder: move its contents aside (<out>/.old-<time>/)

    def __post_init__(self):
        _choice("net", self.net, NETS)
        _choice("precision", self.precision, PRECISIONS)
        _choice("lr_schedule", self.lr_schedule, ("constant", "cosine", "linear"))
        _choice("family", self.family, FAMILIES_TRAINABLE)
        _choice("parallel", self.parallel, ("ddp", "fsdp"))
        for name in (
            "batch_size",
            "grad_accum",
            "max_steps",
            "log_every",
            "checkpoint_every",
            "sample_steps",
        ):
            _int_at_least(name, getattr(self, name), 1)
        for name in ("warmup_steps", "keep_last", "sample_every", "eval_n", "num_workers", "seed"):
            _int_at_least(name, getattr(self, name), 0)
        _int_at_least("min_image_size", self.min_image_size, 1)
        finite_floats(self)
        check_resolution(self.data, self.resolution)
        if not 0 <= self.caption_dropout <= 1:
            raise ValueError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
        if not 0 <= self.ema_decay <= 1:
            raise ValueError(f"ema_decay must be in [0, 1], got {self.ema_decay}")
        if self.small_object_weight < 0:
            raise ValueError(f"small_object_weight must be >= 0 (0: off), got {self.small_object_weight}")
        if self.small_object_weight > 0 and (
            self.buckets or not SHAPES_RES_MIN <= self.resolution <= SHAPES_RES_MAX
        ):
            raise ValueError(
                "small_object_weight weighs square shapes scenes of "
                f"{SHAPES_RES_MIN}..{SHAPES_RES_MAX} px; got resolution {self.resolution}"
                + (" with buckets (other sizes)" if self.buckets else "")
            )
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        if self.pixel_space and self.vae is not None:
            raise ValueError("pixel_space=True trains without a VAE; do not also give vae")
        if self.data == "shapes" and self.random_flip:
            raise ValueError("random_flip would contradict the shapes captions (left/right); keep it off")

    @property
    def net_config(self):
        return getattr(self, self.net)


@dataclass
class VAETrainConfig:
    """A KL autoencoder run (Rombach et al. 2022, §3 and appendix G; LDM `LPIPSWithDiscriminator` without
    LPIPS, whose weights cannot be downloaded here)."""

    vae: AutoencoderKLConfig = field(default_factory=AutoencoderKLConfig)
    init_from: str | None = None  # a VAE file or a single-file checkpoint holding one
    data: str = "shapes"
    resolution: int = 64
    center_crop: bool = True
    random_flip: bool = False
    num_workers: int = 1
    min_image_size: int = MIN_IMAGE_SIZE  # folder images with a side below this are skipped and counted
    crop: int = 0  # shapes data: train on random crop×crop windows of the scenes (0: whole scenes)
    crop_focus: float = 0.0  # shapes data: the share of those windows placed on an object (feed.ShapesTrain)
    recon: str = "l1"  # "l1" | "l2"
    gdl_weight: float = 0.0  # gradient difference loss (vae_losses.gradient_difference); 0: off, as in LDM
    detail_weight: float = 0.0  # errors weighted 1 + w·detail (vae_losses.detail_map); 0: off, as in LDM
    logvar_init: float | None = None  # q(z|x)'s log-variance bias at the start (vae_trainer.narrow_posterior)
    # "all" | "decoder": with "decoder" the encoder and quant_conv are frozen, so the latents (and a denoiser
    # trained on them) stay valid: SD's ft-EMA / ft-MSE VAEs were made this way (vae_trainer.freeze_encoder)
    train_part: str = "all"
    kl_weight: float = 1e-6
    disc_weight: float = 0.5
    disc_start: int = 50001  # the patch-GAN switches on at this step (after the warm-up)
    disc_loss: str = "hinge"
    disc_layers: int = 3
    disc_channels: int = 64
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 4.5e-6 * 16  # LDM: base_learning_rate 4.5e-6 scaled by the batch size
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.5  # LDM autoencoder: Adam(betas=(0.5, 0.9))
    adam_beta2: float = 0.9
    adam_eps: float = 1e-8
    grad_clip: float = 0.0
    ema_decay: float = 0.999
    precision: str = "no"
    compile: bool = False
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_last: int = 2
    sample_every: int = 0
    eval_n: int = 64  # held-out images for PSNR / SSIM
    overwrite: bool = False  # a new run into a non-empty folder: move its contents aside (<out>/.old-<time>/)

    def __post_init__(self):
        _choice("recon", self.recon, ("l1", "l2"))
        _choice("train_part", self.train_part, ("all", "decoder"))
        if self.train_part == "decoder" and not self.init_from:
            raise ValueError("train_part 'decoder' fine-tunes a trained VAE: give --init_from a VAE file")
        _choice("precision", self.precision, PRECISIONS)
        _choice("lr_schedule", self.lr_schedule, ("constant", "cosine", "linear"))
        for name in ("batch_size", "grad_accum", "max_steps", "log_every", "checkpoint_every"):
            _int_at_least(name, getattr(self, name), 1)
        for name in ("warmup_steps", "keep_last", "sample_every", "eval_n", "num_workers", "seed"):
            _int_at_least(name, getattr(self, name), 0)
        _int_at_least("min_image_size", self.min_image_size, 1)
        finite_floats(self)
        check_resolution(self.data, self.resolution)
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("kl_weight", "disc_weight", "gdl_weight", "detail_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.data == "shapes" and self.random_flip:
            raise ValueError("random_flip would contradict the shapes captions (left/right); keep it off")


def _choice(name: str, value, options) -> None:
    if value not in options:
        raise ValueError(
            f"{name}={value!r} is not supported; expected one of {', '.join(map(repr, options))}"
        )


def _int_at_least(name: str, value, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")


def finite_floats(cfg, where: str = "") -> None:
    """Every float field of a (nested) config dataclass is finite: `lr = inf` is refused, not trained."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            finite_floats(value, f"{where}{f.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{where}{f.name}={value!r} is not a finite number")
        elif isinstance(value, tuple) and any(isinstance(v, float) and not math.isfinite(v) for v in value):
            raise ValueError(f"{where}{f.name}={value!r} holds a number that is not finite")


def check_resolution(data: str, res) -> None:
    """The image side a run's data can be made at: shapes [32, 512] (shapes.render), folders [32, 4096]."""
    lo, hi, what = (
        (SHAPES_RES_MIN, SHAPES_RES_MAX, " for the shapes data")
        if data == "shapes"
        else (FOLDER_RES_MIN, FOLDER_RES_MAX, "")
    )
    if isinstance(res, bool) or not isinstance(res, int) or not lo <= res <= hi:
        raise ValueError(f"resolution {res!r} is out of range{what}; expected an integer in [{lo}, {hi}]")


# --------------------------------------------------------------------------------------------------------
# (de)serialisation


def to_dict(cfg) -> dict[str, Any]:
    """JSON-ready dict (tuples become lists; None stays None)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
        return tp, type(None) in typing.get_args(tp)
    return tp, False


def _coerce(path: str, tp, value):
    """`value` (from TOML/JSON or a command-line string) as type `tp`; errors name `path`."""
    base, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ValueError(f"{path} cannot be None")
    if dataclasses.is_dataclass(base):
        if isinstance(value, base):
            return value
        if isinstance(value, str):
            value = json.loads(value)
        if not isinstance(value, dict):
            raise ValueError(f"{path} must be a table of {base.__name__} fields, got {value!r}")
        return build(base, value, path)
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ValueError(f"{path} must be true or false, got {value!r}")
    if base is int:
        if isinstance(value, bool):
            raise ValueError(f"{path} must be an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{path} must be an integer, got {value!r}") from None
    if base is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{path} must be a number, got {value!r}") from None
    if base is str:
        if not isinstance(value, str):
            raise ValueError(f"{path} must be a string, got {value!r}")
        return value
    origin = typing.get_origin(base)
    if origin is tuple:
        if isinstance(value, str):
            # a command-line value: a JSON list, or else one element (never split on commas; repeat the
            # flag for more). A TOML string for a list field is refused before this (`check_toml_fields`).
            if value.strip().startswith("["):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} must be a JSON list, got {value!r} ({e})") from None
            else:
                value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{path} must be a list (e.g. [1, 2]), got {value!r}")
        args = typing.get_args(base)
        item = args[0] if args else str
        return tuple(_coerce(f"{path}[{i}]", item, v) for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):  # e.g. int | tuple[int, ...]: keep JSON-decoded value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        return tuple(value) if isinstance(value, list) else value
    return value


def build(cls, fields: dict[str, Any], path: str = ""):
    """A `cls` instance from a dict of its fields (unknown names are an error listing the known ones)."""
    hints = _hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(fields) - set(known))
    if unknown:
        where = f" in [{path}]" if path else ""
        raise ValueError(f"unknown field(s) {unknown}{where}; {cls.__name__} has: {', '.join(known)}")
    kw = {k: _coerce(f"{path}.{k}" if path else k, hints[k], v) for k, v in fields.items()}
    return cls(**kw)


def from_dict(cls, d: dict[str, Any]):
    return build(cls, d)


def apply_overrides(cfg, overrides: dict[str, Any]):
    """A new config with ``{"lr": "3e-4", "objective.prediction": "v", "unet.model_channels": 32}`` applied.
    A nested key on a None sub-config starts from that type's defaults."""
    return build(type(cfg), _override_dict(type(cfg), dataclasses.asdict(cfg), overrides))


def _override_dict(cls, d: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`d` (a config's fields, sub-configs as dicts) with the dotted `overrides` set; nothing is built, so
    the checks of the whole config run once, on the result."""
    d = dict(d)
    hints = _hints(cls)
    for key, value in overrides.items():
        top, _, rest = key.replace("-", "_").partition(".")
        if top not in hints:
            known = ", ".join(f.name for f in dataclasses.fields(cls))
            raise ValueError(f"unknown option {key!r}; {cls.__name__} has: {known}")
        if not rest:
            d[top] = value
            continue
        sub_tp, _ = _unwrap_optional(hints[top])
        if not dataclasses.is_dataclass(sub_tp):
            raise ValueError(f"{top} is not a table; cannot set {key!r}")
        sub = d.get(top)
        if sub is None:
            sub = dataclasses.asdict(sub_tp())
        elif dataclasses.is_dataclass(sub):
            sub = dataclasses.asdict(sub)
        elif not isinstance(sub, dict):
            raise ValueError(f"{top} must be a table of {sub_tp.__name__} fields, got {sub!r}")
        else:
            sub = dict(sub)
        if rest not in {f.name for f in dataclasses.fields(sub_tp)}:
            known = ", ".join(f.name for f in dataclasses.fields(sub_tp))
            raise ValueError(f"unknown option {key!r}; [{top}] has: {known}")
        sub[rest] = value
        d[top] = sub
    return d


def load_toml(path: str) -> dict[str, Any]:
    """The TOML file's tables; every error names the file (missing, a folder, unreadable, not UTF-8, not
    TOML)."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"config file {path!r} is a directory, not a TOML file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path!r} does not exist") from None
    except OSError as e:
        raise ValueError(f"config file {path!r} cannot be read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"config file {path!r} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            "a TOML file is UTF-8"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None


def check_toml_fields(cls, fields: dict[str, Any], source: str) -> None:
    """A TOML string where `cls` declares a list (`sample_prompts = "a red cube, on a blue floor"`) is an
    error, never split on commas: TOML has lists. `fields`: dotted keys as `_flatten_tables` makes them."""
    hints = _hints(cls)
    for key, value in fields.items():
        top, _, rest = key.replace("-", "_").partition(".")
        tp = hints.get(top)
        if tp is None:
            continue
        base, _ = _unwrap_optional(tp)
        if rest and dataclasses.is_dataclass(base):
            sub = _hints(base).get(rest)
            if sub is None:
                continue
            base, _ = _unwrap_optional(sub)
        if typing.get_origin(base) is tuple and isinstance(value, str):
            raise ValueError(
                f"{source}: {key} is a list field; give a TOML list such as [{json.dumps(value)}], "
                f"not a string"
            )


def run_kind(fields: dict[str, Any]) -> str | None:
    """ "denoiser", "vae", "lora" or "embedding" for a saved config.json's fields (by fields only one kind
    has), else None."""
    if not isinstance(fields, dict):
        return None
    if {"rank", "modules"} <= set(fields):  # lora_train.LoRATrainConfig (a denoiser config plus these)
        return "lora"
    if {"token", "vectors"} <= set(fields):  # embedding_train.EmbeddingTrainConfig
        return "embedding"
    if {"net", "family"} & set(fields):
        return "denoiser"
    if {"disc_weight", "recon", "kl_weight"} & set(fields):
        return "vae"
    return None


def resolve(kind: str, preset: str | None = None, toml: str | None = None, overrides=None):
    """The config of a run: preset, then the TOML file's fields, then `overrides` (dotted keys)."""
    _choice("kind", kind, ("denoiser", "vae"))
    cls, presets = (
        (DenoiserTrainConfig, DENOISER_PRESETS) if kind == "denoiser" else (VAETrainConfig, VAE_PRESETS)
    )
    base: dict[str, Any] = {}
    if preset is not None:
        if preset not in presets:
            raise ValueError(f"unknown {kind} preset {preset!r}; known: {', '.join(presets)}")
        base = {k: v for k, v in presets[preset].items()}
    # preset, file and flags merged first, the config built (and checked) once: a preset's resolution may
    # only be valid with the --data the flags give
    d = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in base.items()}
    if toml is not None:
        fields = _flatten_tables(load_toml(toml))
        check_toml_fields(cls, fields, f"config file {toml!r}")
        d = _override_dict(cls, d, fields)
    if overrides:
        d = _override_dict(cls, d, dict(overrides))
    return build(cls, d)


def _flatten_tables(d: dict[str, Any]) -> dict[str, Any]:
    """TOML {"objective": {"prediction": "v"}} -> {"objective.prediction": "v"} (one level of tables)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


MODEL_FIELDS = ("family", "net", "unet", "dit", "mmdit", "text", "pixel_space", "objective", "resolution")
