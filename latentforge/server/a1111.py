"""A1111's `/sdapi/v1` request and response shapes, and their mapping to `Pipeline` arguments.

Field names and defaults are A1111's (`modules/api/models.py`, built from `StableDiffusionProcessingTxt2Img`
/`Img2Img`; ecosystem.md §3). Where A1111 takes a default from its settings, a field left out takes the
model's: width/height the model's size (512² for SD 1.x, 64² for the shipped model), steps the model's
(A1111's 50 when the file states none), cfg_scale, sampler and schedule the model's (7, Euler, normal
unless its file says otherwise, as A1111's). Fields of A1111 features latentforge does not have
(face restoration, tiling, scripts, styles) are refused by name when they ask for something; unknown fields
are ignored, as A1111's pydantic models do. Samplers are accepted under A1111's labels ("DPM++ 2M",
"Euler a", "DPM++ 2M Karras"), any case, or latentforge's/ComfyUI's names (`dpmpp_2m`); schedules likewise
("Karras", "karras", "automatic"), and "tuned": the schedule `latentforge tune-schedule` stored beside the
model file for the sampler and step count (refused, naming the ones the model has, when there is none).

Doing less work per image (speedups.py): A1111's own token merging setting, `override_settings`
`token_merging_ratio` (`token_merging_ratio_img2img` for img2img, `token_merging_ratio_hr` for the hires
pass, as A1111's `get_token_merging_ratio` picks them), is latentforge's `tome_ratio`, and "Token merging
ratio" in the infotext as A1111 writes it; latentforge's own request fields `cache_interval`,
`cache_depth`, `cache_threshold`, `tome_ratio`, `tome_max_downsample` are the `generate` flags of those
names (all off when left out; A1111 clients never send them).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import io
import json
import math
import os
from typing import Any

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

import latentforge
from latentforge import hires, infotext, pipeline
from latentforge.img2img import MASKED_CONTENT
from latentforge.samplers import SAMPLER_NAMES
from latentforge.schedules import SCHEDULERS
from latentforge.shapes.captions import PROMPT_COMPLETIONS
from latentforge.speedups import Speedups
from latentforge.tune_schedule import TUNED, load_tuned, tuned_files

A1111_STEPS = 50  # A1111's default when neither the request nor the model says
INPAINTING_FILL = ("fill", "original", "latent_noise")  # A1111's 0, 1, 2 ("latent nothing", 3, is refused)
# override_settings keys honoured: the model, and A1111's token merging settings (tome_ratio)
TOME_OVERRIDES = ("token_merging_ratio", "token_merging_ratio_img2img", "token_merging_ratio_hr")
OVERRIDES = ("sd_model_checkpoint", *TOME_OVERRIDES)
# latentforge's speed options (speedups.py): request fields named as the Pipeline arguments and the CLI flags
SPEEDUPS = ("cache_interval", "cache_depth", "cache_threshold", "tome_ratio", "tome_max_downsample")
# Pipeline arguments that keep a job out of a merged batch (the server's --batch-jobs)
# (jobs that differ in a speed option (SPEEDUPS) are not merged either: they are part of the batch key)
NOT_MERGED = ("subseed", "seed_resize_from", "hires_scale", "hires_size", "init_image", "mask", "controlnet")
MAX_PROMPT = 20_000  # characters (~60 chunks of 75 tokens); a longer one would hold the worker for minutes


class RequestError(ValueError):
    """A request field that cannot be honoured: HTTP 422 naming it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def check_json(value: Any, field: str) -> None:
    """Refuse what JSON lets through but a JSON response cannot carry back: NaN and Infinity (and numbers such
    as 1e999, which parse to infinity) and lone surrogates ("\\ud800"), anywhere in a value."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            raise RequestError(field, f"{v} is not a finite number")
        if isinstance(v, str) and not v.isascii():
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError(field, "the text holds a lone surrogate (not valid Unicode)") from None
        elif isinstance(v, dict):
            stack += [*v.keys(), *v.values()]
        elif isinstance(v, list | tuple):
            stack += v


class Txt2Img(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @field_validator("*", mode="before")
    @classmethod
    def _json_safe(cls, value: Any, info: ValidationInfo) -> Any:
        check_json(value, info.field_name)  # the request is echoed back: it must be valid JSON text
        return value

    prompt: str = Field("", max_length=MAX_PROMPT)
    negative_prompt: str = Field("", max_length=MAX_PROMPT)
    styles: list[str] = []
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = Field(0.0, ge=0, le=1)
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1, le=pipeline.MAX_BATCH)
    n_iter: int = Field(1, ge=1, le=pipeline.MAX_BATCH_COUNT)
    steps: int | None = Field(None, ge=1, le=pipeline.MAX_STEPS)
    cfg_scale: float | None = Field(None, ge=0, le=pipeline.MAX_CFG)
    width: int | None = Field(None, ge=1, le=pipeline.MAX_SIZE)
    height: int | None = Field(None, ge=1, le=pipeline.MAX_SIZE)
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = Field(None, ge=0, le=1)
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    script_name: str | None = None
    script_args: list = []
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = {}
    infotext: str | None = None
    # the hires fix (txt2img only)
    enable_hr: bool = False
    hr_scale: float = Field(2.0, ge=1, le=8)
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = Field(0, ge=0, le=pipeline.MAX_STEPS)
    hr_resize_x: int = Field(0, ge=0, le=pipeline.MAX_SIZE)
    hr_resize_y: int = Field(0, ge=0, le=pipeline.MAX_SIZE)
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    hr_checkpoint_name: str | None = None
    firstphase_width: int = 0
    firstphase_height: int = 0
    # latentforge's speed options (speedups.py; `generate --cache-interval` ...), checked by Speedups.check;
    # None: the flag's default (off)
    cache_interval: int | None = None
    cache_depth: int | None = None
    cache_threshold: float | None = None
    tome_ratio: float | None = None
    tome_max_downsample: int | None = None
    # latentforge's: the prompt completion of shapes prompts (Pipeline; None: the model's default)
    complete_prompt: str | None = None  # "none", "background", "layout"


class Img2Img(Txt2Img):
    init_images: list[str] = Field(min_length=1)
    resize_mode: int = 0
    denoising_strength: float | None = Field(0.75, ge=0, le=1)
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur: float | None = Field(None, ge=0, le=64)
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    inpainting_fill: int = Field(0, ge=0, le=3)
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = Field(0, ge=0, le=pipeline.MAX_SIZE)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    initial_noise_multiplier: float | None = None
    include_init_images: bool = False


class PngInfoRequest(BaseModel):
    image: str


# -- names ----------------------------------------------------------------------------------------------

_LABELS = {k.lower(): k for k in infotext.SAMPLERS}
_SCHEDULE_LABELS = {k.lower(): v for k, v in infotext.SCHEDULES.items()}


def sampler(name: str | None, scheduler: str | None, field: str = "sampler_name") -> tuple[str, str]:
    """(latentforge sampler, scheduler) from A1111's or ComfyUI's names; "automatic"/None: the sampler's
    A1111 default schedule."""
    label = (name or "Euler").strip()
    key = label.lower()
    for suffix in (" karras", " exponential"):  # old A1111 labels carry the schedule
        if key.endswith(suffix) and key[: -len(suffix)] in _LABELS:
            label = _LABELS[key[: -len(suffix)]] + suffix.title()
            break
    else:
        if key in _LABELS:
            label = _LABELS[key]
        elif key not in SAMPLER_NAMES:
            raise RequestError(
                field, f"sampler {name!r} is not known; A1111 names: {', '.join(infotext.SAMPLERS)}; "
                f"latentforge names: {', '.join(SAMPLER_NAMES)}"
            )  # fmt: skip
        else:
            label = key
    sched = None if scheduler is None else scheduler.strip()
    if sched is not None and sched.lower() in ("", "automatic"):
        sched = None
    elif sched is not None:
        if sched.lower() in _SCHEDULE_LABELS:
            sched = _SCHEDULE_LABELS[sched.lower()]
        elif sched.lower() == "uniform":
            sched = "normal"
        elif sched.lower() == TUNED:  # the model's own schedule file (checked in pipeline_args)
            sched = TUNED
        elif sched not in SCHEDULERS:
            field_s = "hr_scheduler" if field.startswith("hr_") else "scheduler"
            known = ", ".join(["automatic", *SCHEDULES_A1111, *SCHEDULERS, TUNED])
            raise RequestError(field_s, f"schedule {scheduler!r} is not known; accepted: {known}")
    return infotext.sampler_and_schedule(label, sched)


SCHEDULES_A1111 = list(infotext.SCHEDULES)


def samplers() -> list[dict]:
    """`GET /sdapi/v1/samplers`: A1111's labels with latentforge's name as alias, then the samplers A1111
    has no label for, under latentforge's name."""
    out = [{"name": k, "aliases": [v[0]], "options": {}} for k, v in infotext.SAMPLERS.items()]
    labelled = {v[0] for v in infotext.SAMPLERS.values()}
    return out + [{"name": n, "aliases": [], "options": {}} for n in SAMPLER_NAMES if n not in labelled]


def schedulers() -> list[dict]:
    """`GET /sdapi/v1/schedulers` (A1111 1.9+ shape)."""
    out = [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1,
            "need_inner_model": False}]  # fmt: skip
    return out + [
        {"name": s, "label": infotext.schedule_label(s), "aliases": None, "default_rho": -1,
         "need_inner_model": False} for s in SCHEDULERS
    ]  # fmt: skip


# -- images ---------------------------------------------------------------------------------------------


def decode_image(data: str, field: str, max_pixels: int) -> Image.Image:
    """A base64 image (a `data:image/...;base64,` URL too), checked to be a real image of at most
    max_pixels, fully decoded (a truncated file fails here, not later)."""
    if not isinstance(data, str) or not data:
        raise RequestError(field, "expected a base64-encoded image")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=False)
        with Image.open(io.BytesIO(raw)) as im:
            if im.width * im.height > max_pixels:
                raise RequestError(field, f"the image is {im.width}x{im.height}, over the server's "
                                          f"--max-pixels {max_pixels}")  # fmt: skip
            im.load()
            return im.copy()
    except RequestError:
        raise
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise RequestError(field, f"not a base64-encoded image ({type(e).__name__}: {e})") from None


def encode_png(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


# -- requests -> Pipeline arguments ---------------------------------------------------------------------


def _refuse(req: Txt2Img) -> None:
    if req.restore_faces:
        raise RequestError("restore_faces", "face restoration is not part of latentforge")
    if req.tiling:
        raise RequestError("tiling", "tiling (seamless images) is not supported")
    if req.styles:
        raise RequestError("styles", "saved styles are an A1111 UI feature; put the text in the prompt")
    if req.script_name:
        raise RequestError("script_name", f"scripts are not supported (got {req.script_name!r})")
    if req.hr_checkpoint_name:
        raise RequestError("hr_checkpoint_name", "a second model for the hires pass is not supported")
    for f in ("hr_prompt", "hr_negative_prompt"):
        value = getattr(req, f)
        same = req.prompt if f == "hr_prompt" else req.negative_prompt
        if value and value != same:
            raise RequestError(f, "a different prompt for the hires pass is not supported")


def overrides(req: Txt2Img) -> dict:
    extra = sorted(set(req.override_settings or {}) - set(OVERRIDES))
    if extra:
        raise RequestError("override_settings", f"{extra} cannot be overridden; accepted: {list(OVERRIDES)}")
    return dict(req.override_settings or {})


def pipeline_args(
    req: Txt2Img, pipe, random_seed: int, random_subseed: int, max_pixels: int, max_steps: int,
    max_batch_count: int = 100,
) -> tuple[dict, int]:  # fmt: skip
    """(the Pipeline arguments of one batch, the batch count) for an A1111 request, every field checked
    against the loaded model and the server's limits."""
    _refuse(req)
    name = req.sampler_name or req.sampler_index or infotext.sampler_label(pipe.defaults["sampler"])
    sched = req.scheduler
    if not (req.sampler_name or req.sampler_index) and not sched:
        sched = pipe.defaults["scheduler"]
    sampler_, scheduler = sampler(name, sched)
    width, height = pipe.default_size
    w = req.width if req.width else (req.firstphase_width or width)
    h = req.height if req.height else (req.firstphase_height or height)
    try:
        w, h = pipe.check_size(w, h)
    except ValueError as e:
        raise RequestError("width", str(e)) from None
    if w * h * req.batch_size > max_pixels:
        raise RequestError("width", f"width × height × batch_size = {w}×{h}×{req.batch_size} is over the "
                                    f"server's --max-pixels {max_pixels}")  # fmt: skip
    steps = req.steps or pipe.model_defaults.get("steps", A1111_STEPS)
    if steps > max_steps:
        raise RequestError("steps", f"{steps} steps is over the server's --max-steps {max_steps}")
    if req.n_iter > max_batch_count:
        raise RequestError("n_iter", f"{req.n_iter} batches is over the server's --max-batch-count "
                                     f"{max_batch_count}")  # fmt: skip
    seed = random_seed if req.seed is None or req.seed < 0 else req.seed
    top = 2**63 - 2 - req.batch_size * req.n_iter  # image k of batch j takes seed + j·batch_size + k
    for name, value in (("seed", seed), ("subseed", req.subseed)):
        if value > top:
            raise RequestError(name, f"{value} is too large: seeds go up to {top} for "
                                     f"{req.batch_size * req.n_iter} images")  # fmt: skip
    kw: dict = {"prompt": req.prompt, "negative_prompt": req.negative_prompt, "steps": steps,
                "sampler": sampler_, "scheduler": scheduler, "seed": seed,
                "cfg": pipe.defaults["cfg"] if req.cfg_scale is None else req.cfg_scale,
                "width": w, "height": h, "batch_size": req.batch_size}  # fmt: skip
    if req.complete_prompt is not None:
        if req.complete_prompt not in PROMPT_COMPLETIONS:
            known = ", ".join(PROMPT_COMPLETIONS)
            raise RequestError("complete_prompt", f"{req.complete_prompt!r} is not one of {known} (or null)")
        kw["complete_prompt"] = req.complete_prompt
    if req.subseed_strength > 0:
        kw["subseed"] = random_subseed if req.subseed is None or req.subseed < 0 else req.subseed
        kw["subseed_strength"] = req.subseed_strength
    if req.seed_resize_from_w > 0 and req.seed_resize_from_h > 0:
        kw["seed_resize_from"] = (req.seed_resize_from_w, req.seed_resize_from_h)
    if isinstance(req, Img2Img):
        kw |= _img2img_args(req, max_pixels)
    elif req.enable_hr:
        kw |= _hires_args(req, w, h, max_pixels, max_steps)
    hr = "hires_denoise" in kw
    if scheduler == TUNED:  # the model's schedule files, before queueing (none: 422, not a failed job)
        _check_tuned(pipe, sampler_, steps)
        if hr:  # the hires pass: the same schedule type, its own sampler and step count
            hr_sampler, hr_steps = kw.get("hires_sampler", sampler_), kw["hires_steps"] or steps
            _check_tuned(pipe, hr_sampler, hr_steps, " (the hires pass)")
    kw |= speedup_args(req, pipe.net, hr)
    return kw, req.n_iter


def _tome_override(key: str, value: Any) -> float:
    """An A1111 token merging setting (override_settings[key]), checked as tome_ratio is."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"override_settings.{key}", f"a number in [0, 0.95] (0: off), got {value!r}")
    try:
        Speedups(tome_ratio=value).check()
    except ValueError as e:
        raise RequestError(f"override_settings.{key}", str(e).replace("tome_ratio", key)) from None
    return float(value)


def speedup_args(req: Txt2Img, net, hires_on: bool) -> dict:
    """The Pipeline's speed options (speedups.py) of a request, those that are not off: latentforge's fields
    and A1111's token merging settings, which pick the ratio as A1111's `get_token_merging_ratio` does
    (txt2img: `token_merging_ratio`; img2img: that when overridden, else `token_merging_ratio_img2img`;
    the hires pass: `token_merging_ratio_hr`, 0 meaning the first pass's). The pipeline runs both passes
    of the hires fix with one ratio, so a different one for the second pass is refused, as is a
    `tome_ratio` that differs from the A1111 setting given. Checked against the model's network (net)."""
    over = req.override_settings or {}
    given = {k: getattr(req, k) for k in SPEEDUPS if getattr(req, k) is not None}
    ratios = {k: _tome_override(k, over[k]) for k in TOME_OVERRIDES if k in over}
    key = "token_merging_ratio" if "token_merging_ratio" in ratios else None
    if isinstance(req, Img2Img) and key is None and "token_merging_ratio_img2img" in ratios:
        key = "token_merging_ratio_img2img"
    source = "tome_ratio"  # the field a bad ratio is reported under
    if key is not None:
        if "tome_ratio" in given and given["tome_ratio"] != ratios[key]:
            raise RequestError(
                f"override_settings.{key}",
                f"{ratios[key]:g} differs from tome_ratio {given['tome_ratio']:g}; they are the same "
                "setting (A1111's token merging ratio): give one, or the same value",
            )
        if "tome_ratio" not in given:
            given["tome_ratio"], source = ratios[key], f"override_settings.{key}"
    hr, first = ratios.get("token_merging_ratio_hr", 0.0), given.get("tome_ratio", 0.0)
    if hires_on and hr and hr != first:
        raise RequestError(
            "override_settings.token_merging_ratio_hr",
            f"the hires pass runs with the first pass's token merging ratio ({first:g}); a different one "
            f"({hr:g}) is not supported: leave it out, or give 0 or the same",
        )
    try:
        Speedups(**given).check(net)
    except ValueError as e:
        msg = str(e)
        # the option the message starts with ("give cache_interval ... or cache_threshold ..., not both":
        # the threshold, the one that comes second)
        named = [k for k in SPEEDUPS if msg.startswith(k)] or [k for k in reversed(SPEEDUPS) if k in msg]
        field = named[0] if named else "request"
        raise RequestError(source if field == "tome_ratio" else field, msg) from None
    off = Speedups()
    return {k: v for k, v in given.items() if v != getattr(off, k)}


def tuned_schedules(model_path: str) -> list[tuple[str, int]]:
    """(sampler, steps) of the tuned schedule files beside a model file (tune_schedule.schedule_path)."""
    stem = os.path.basename(os.path.splitext(model_path)[0]) + ".schedule-"
    out = []
    for name in tuned_files(model_path):
        sampler_, _, steps = name[len(stem) : -len(".json")].rpartition("-")
        if sampler_ and steps.isdigit():
            out.append((sampler_, int(steps)))
    return sorted(out)


def _check_tuned(pipe, sampler_: str, steps: int, what: str = "") -> None:
    """422 on `scheduler` unless the model has a tuned schedule for this sampler and step count, naming the
    ones it has (file names only: never the server's folders)."""
    source = getattr(pipe, "source", None)
    if source is None:
        raise RequestError("scheduler", "'tuned' reads the schedule stored beside the model file; this model "
                                        "was not loaded from a file")  # fmt: skip
    have = tuned_schedules(source)
    if (sampler_, steps) not in have:
        listed = ", ".join(f"{infotext.sampler_label(s)} at {n} steps" for s, n in have)
        raise RequestError(
            "scheduler", f"no tuned schedule for sampler {infotext.sampler_label(sampler_)!r} at {steps} "
            f"steps{what} on this model; "
            + (f"it has tuned schedules for: {listed}" if have else "it has no tuned schedules")
            + " (`latentforge tune-schedule` makes them)"
        )  # fmt: skip
    try:
        load_tuned(source, sampler_, steps)
    except (OSError, ValueError) as e:
        folder = os.path.dirname(os.path.abspath(source)) + os.sep
        raise RequestError("scheduler", str(e).replace(folder, "")) from None


def _hires_args(req: Txt2Img, w: int, h: int, max_pixels: int, max_steps: int) -> dict:
    upscaler = req.hr_upscaler or "Latent"
    if upscaler not in hires.UPSCALERS:
        raise RequestError(
            "hr_upscaler", f"{upscaler!r} is not known; accepted: {', '.join(hires.UPSCALERS)}"
        )
    kw: dict = {"hires_denoise": 0.7 if req.denoising_strength is None else req.denoising_strength,
                "hires_steps": req.hr_second_pass_steps, "hires_upscaler": upscaler}  # fmt: skip
    if req.hr_resize_x or req.hr_resize_y:  # A1111: one of them 0 keeps the aspect ratio
        rx = req.hr_resize_x or round(req.hr_resize_y * w / h)
        ry = req.hr_resize_y or round(req.hr_resize_x * h / w)
        kw["hires_size"], (tw, th) = (rx, ry), (rx, ry)
    else:
        kw["hires_scale"] = req.hr_scale
        tw, th = round(w * req.hr_scale), round(h * req.hr_scale)
    if tw * th * req.batch_size > max_pixels:
        raise RequestError("hr_scale", f"the hires size {tw}x{th} × batch_size {req.batch_size} is over the "
                                       f"server's --max-pixels {max_pixels}")  # fmt: skip
    if req.hr_second_pass_steps > max_steps:
        raise RequestError("hr_second_pass_steps", f"over the server's --max-steps {max_steps}")
    if req.hr_sampler_name:
        kw["hires_sampler"] = sampler(req.hr_sampler_name, None, "hr_sampler_name")[0]
    return kw


def _img2img_args(req: Img2Img, max_pixels: int) -> dict:
    if req.resize_mode != 0:
        raise RequestError("resize_mode", f"only 0 (just resize) is supported, got {req.resize_mode}")
    images = [decode_image(d, f"init_images[{i}]", max_pixels) for i, d in enumerate(req.init_images)]
    if len(images) not in (1, req.batch_size):
        raise RequestError("init_images", f"give 1 image or one per batch image ({req.batch_size}), "
                                          f"got {len(images)}")  # fmt: skip
    kw: dict = {"init_image": images[0] if len(images) == 1 else images,
                "strength": 0.75 if req.denoising_strength is None else req.denoising_strength}  # fmt: skip
    if req.mask:
        mask = decode_image(req.mask, "mask", max_pixels).convert("L")
        if req.inpainting_mask_invert:
            mask = mask.point(lambda v: 255 - v)
        if req.inpainting_fill == 3:
            raise RequestError("inpainting_fill", "3 (latent nothing) is not supported; 0 fill, 1 original, "
                                                  "2 latent noise")  # fmt: skip
        blur = req.mask_blur if req.mask_blur is not None else (req.mask_blur_x + req.mask_blur_y) / 2
        kw |= {"mask": mask, "mask_blur": blur, "masked_content": INPAINTING_FILL[req.inpainting_fill]}
        if req.inpaint_full_res:
            kw |= {"inpaint_full_res": True, "inpaint_full_res_padding": req.inpaint_full_res_padding}
    return kw


assert set(INPAINTING_FILL) == set(MASKED_CONTENT)


def infotexts(
    kw: dict, n: int, model: str, model_hash: str | None, lora_hashes: str | None = None,
    extra: dict | None = None, prompts: list[str] | None = None, completion: str | None = None,
) -> list[str]:  # fmt: skip
    """A1111's `parameters` text for each of the n images (image i: seed + i); the prompt keeps its LoRA
    tags, and lora_hashes ("name: hash, ...", Pipeline.lora_hashes) is A1111's "Lora hashes". extra: more
    fields before "Version" (the "ControlNet k" ones). prompts: each image's prompt where they differ from
    kw's (Pipeline.image_prompts: completed); completion: the completion asked for, where one is in play."""
    hr = "hires_denoise" in kw
    out = []
    for i in range(n):
        params = {
            "Steps": kw["steps"],
            "Sampler": infotext.sampler_label(kw["sampler"]),
            "Schedule type": infotext.schedule_label(kw["scheduler"]),
            "CFG scale": kw["cfg"],
            "Seed": kw["seed"] + i,
            "Size": f"{kw['width']}x{kw['height']}",
            "Model hash": model_hash,
            "Model": model,
            "Variation seed": kw["subseed"] + i if "subseed" in kw else None,
            "Variation seed strength": kw.get("subseed_strength"),
            "Seed resize from": "{}x{}".format(*kw["seed_resize_from"]) if "seed_resize_from" in kw else None,
            "Denoising strength": kw.get("hires_denoise", kw.get("strength")),
            "Hires upscale": kw.get("hires_scale"),
            "Hires resize": "{}x{}".format(*kw["hires_size"]) if "hires_size" in kw else None,
            "Hires steps": kw.get("hires_steps") or None,
            "Hires upscaler": kw.get("hires_upscaler") if hr else None,
            "Hires sampler": infotext.sampler_label(kw["hires_sampler"]) if "hires_sampler" in kw else None,
            "Mask blur": kw.get("mask_blur"),
            "Inpaint area": "Only masked" if kw.get("inpaint_full_res") else None,
            "Masked area padding": kw.get("inpaint_full_res_padding") if kw.get("inpaint_full_res") else None,
            # A1111's names (create_infotext); the hires pass runs with the first pass's ratio (speedup_args)
            "Token merging ratio": kw.get("tome_ratio") or None,
            "Token merging ratio hr": (kw.get("tome_ratio") or None) if hr else None,
            "RNG": "CPU",
            "Lora hashes": lora_hashes,
            # ours (Pipeline's complete_prompt), where it is in play: a replay completes as this did
            "Complete prompt": completion,
            **(extra or {}),  # the ControlNet units' fields (controlnet_args)
            "Version": f"latentforge {latentforge.__version__}",
        }
        prompt = kw["prompt"] if prompts is None else prompts[i]
        out.append(infotext.build(prompt, kw["negative_prompt"], params))
    return out


def info(req: Txt2Img, kw: dict, n: int, texts: list[str], model: str, model_hash: str | None,
         interrupted: bool = False, extra: dict | None = None,
         prompts: list[str] | None = None) -> dict:  # fmt: skip
    """`Processed.js()`: the `info` object of a txt2img/img2img response (sent as a JSON string); extra:
    its `extra_generation_params` (the "ControlNet k" fields, as the extension adds them); prompts: each
    image's prompt (`all_prompts`; Pipeline.image_prompts), else the request's."""
    seeds = [kw["seed"] + i for i in range(n)]
    sub = kw.get("subseed", -1)
    subseeds = [sub + i if sub >= 0 else -1 for i in range(n)]
    return {
        "prompt": req.prompt, "all_prompts": [req.prompt] * n if prompts is None else list(prompts),
        "negative_prompt": req.negative_prompt, "all_negative_prompts": [req.negative_prompt] * n,
        "seed": kw["seed"], "all_seeds": seeds, "subseed": sub, "all_subseeds": subseeds,
        "subseed_strength": kw.get("subseed_strength", 0.0), "width": kw["width"], "height": kw["height"],
        "sampler_name": infotext.sampler_label(kw["sampler"]), "scheduler": kw["scheduler"],
        "cfg_scale": kw["cfg"], "steps": kw["steps"], "batch_size": kw["batch_size"],
        "restore_faces": False, "face_restoration_model": None, "sd_model_name": model,
        "sd_model_hash": model_hash, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": kw["seed_resize_from"][0] if "seed_resize_from" in kw else -1,
        "seed_resize_from_h": kw["seed_resize_from"][1] if "seed_resize_from" in kw else -1,
        "denoising_strength": kw.get("hires_denoise", kw.get("strength")),
        "extra_generation_params": dict(extra or {}), "index_of_first_image": 0, "infotexts": texts,
        "styles": [],
        "job_timestamp": datetime.datetime.now().strftime("%Y%m%d%H%M%S"), "clip_skip": 1,
        "is_using_inpainting_conditioning": False, "interrupted": interrupted,
        "version": f"latentforge {latentforge.__version__}",
    }  # fmt: skip


def png_info(text: str | None) -> dict:
    """`POST /sdapi/v1/png-info`: {info, items, parameters} (parameters: the parsed fields)."""
    if not text:
        return {"info": "", "items": {}, "parameters": {}}
    fields = infotext.parse(text)
    return {"info": text, "items": {"parameters": text}, "parameters": fields}


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)
