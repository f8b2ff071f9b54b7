"""Generation metadata that replays: A1111's `parameters` text and latentforge's exact JSON.

Every PNG latentforge writes carries two text chunks (ecosystem.md §2a):
- `parameters`: A1111's infotext, so A1111, sd.cpp, civitai and image browsers read it. A1111's layout
  (`create_infotext`): the prompt, "Negative prompt: ..." when there is one, then one line of `Key: value`
  pairs; a value holding ',', ':' or a newline is a JSON string. Samplers and schedules are written under
  A1111's labels where A1111 has the same method ("DPM++ 2M" + "Schedule type: Karras"), else under
  latentforge's (ComfyUI's) name.
- `latentforge`: a JSON object of the exact `Pipeline` arguments (`replay` takes it as it is).

`parse` reads A1111's text as A1111's `parse_generation_parameters` does: the last line is the parameter
line when it holds at least 3 `key: value` pairs, lines from one starting "Negative prompt:" on are the
negative prompt. `generation` maps its fields to `Pipeline` arguments, sampler labels included (old
labels that carry the schedule, "DPM++ 2M Karras", too); a field latentforge cannot honour is refused by
name, or reported as ignored, never silently dropped.
"""

from __future__ import annotations

import json
import re

# A1111 sampler label -> (latentforge/ComfyUI sampler, A1111's default schedule for "Automatic").
# Labels and defaults from A1111 1.9+ `sd_samplers_kdiffusion.samplers_k_diffusion` and
# `sd_samplers_timesteps` (facts; "Automatic" with no default means the model's own discretisation,
# ComfyUI's "normal").
SAMPLERS: dict[str, tuple[str, str]] = {
    "Euler a": ("euler_ancestral", "normal"),
    "Euler": ("euler", "normal"),
    "LMS": ("lms", "normal"),
    "Heun": ("heun", "normal"),
    "DPM2": ("dpm_2", "karras"),
    "DPM2 a": ("dpm_2_ancestral", "karras"),
    "DPM++ 2S a": ("dpmpp_2s_ancestral", "karras"),
    "DPM++ 2M": ("dpmpp_2m", "karras"),
    "DPM++ SDE": ("dpmpp_sde", "karras"),
    "DPM++ 2M SDE": ("dpmpp_2m_sde", "exponential"),
    "DPM++ 2M SDE Heun": ("dpmpp_2m_sde_heun", "exponential"),
    "DPM++ 3M SDE": ("dpmpp_3m_sde", "exponential"),
    "DPM fast": ("dpm_fast", "normal"),
    "DPM adaptive": ("dpm_adaptive", "normal"),
    "LCM": ("lcm", "normal"),
    "DDIM": ("ddim", "ddim_uniform"),
    "UniPC": ("uni_pc", "normal"),
}
# A1111 "Schedule type" label -> latentforge scheduler ("Uniform" is k-diffusion's get_sigmas: uniform in t)
SCHEDULES: dict[str, str] = {
    "Uniform": "normal",
    "Normal": "normal",
    "Karras": "karras",
    "Exponential": "exponential",
    "SGM Uniform": "sgm_uniform",
    "KL Optimal": "kl_optimal",
    "Simple": "simple",
    "DDIM": "ddim_uniform",
    "Beta": "beta",
}
_SAMPLER_LABEL = {v[0]: k for k, v in SAMPLERS.items()}
_SCHEDULE_LABEL = {
    "normal": "Normal",
    **{v: k for k, v in SCHEDULES.items() if k not in ("Uniform", "Normal")},
}
# A1111 upscaler names of the hires fix that latentforge has (hires.py)
EMPHASIS = {"Original": "a1111", "ComfyUI": "comfy", "None": "none"}  # "Emphasis" values (A1111 1.8+)
JSON_KEY = "latentforge"  # the PNG text chunk with the exact arguments
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # A1111's re_param_code
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def sampler_label(sampler: str) -> str:
    return _SAMPLER_LABEL.get(sampler, sampler)


def schedule_label(scheduler: str) -> str:
    return _SCHEDULE_LABEL.get(scheduler, scheduler)


def quote(value) -> str:
    """A1111 `infotext_utils.quote`: a value holding ',', ':' or a newline is written as a JSON string."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def build(prompt: str, negative_prompt: str, params: dict) -> str:
    """A1111's `parameters` text (`create_infotext`): None values dropped."""
    line = ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def parse(text: str) -> dict[str, str]:
    """A1111 infotext -> {"Prompt": ..., "Negative prompt": ..., key: value, ...} (values as text)."""
    if not isinstance(text, str):
        raise TypeError(f"infotext must be text, got {type(text).__name__}")
    *lines, last = text.strip().split("\n") if text.strip() else [""]
    fields: dict[str, str] = {}
    if len(_PARAM.findall(last)) < 3:  # not a parameter line: part of the prompt
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.strip().startswith("Negative prompt:"):
            in_negative = True
            line = line.strip()[len("Negative prompt:") :].lstrip()
        (negative if in_negative else prompt).append(line)
    fields["Prompt"] = "\n".join(prompt)
    fields["Negative prompt"] = "\n".join(negative)
    for key, value in _PARAM.findall(last):
        fields[key.strip()] = _unquote(value.strip())
    return fields


def _number(fields: dict, key: str, kind):
    try:
        return kind(fields[key])
    except ValueError:
        raise ValueError(f"the infotext's {key!r} is {fields[key]!r}, not a {kind.__name__}") from None


def _size(fields: dict, key: str) -> tuple[int, int]:
    m = _SIZE.match(fields[key].strip())
    if m is None:
        raise ValueError(f"the infotext's {key!r} is {fields[key]!r}; expected WIDTHxHEIGHT such as 512x768")
    return int(m.group(1)), int(m.group(2))


def sampler_and_schedule(sampler: str, schedule: str | None) -> tuple[str, str]:
    """An A1111 sampler label (old labels with " Karras"/" Exponential" too, or a latentforge name) and
    "Schedule type" (None or "Automatic": the sampler's A1111 default) -> (sampler, scheduler)."""
    from latentforge.samplers import SAMPLER_NAMES

    name, implied = sampler.strip(), None
    for suffix, sched in ((" Karras", "karras"), (" Exponential", "exponential")):
        if name.endswith(suffix) and name[: -len(suffix)] in SAMPLERS:
            name, implied = name[: -len(suffix)], sched
    if name in SAMPLERS:
        ours, default = SAMPLERS[name]
    elif name in SAMPLER_NAMES:
        ours, default = name, "normal"
    else:
        known = ", ".join([*SAMPLERS, *SAMPLER_NAMES])
        raise ValueError(f"the infotext's sampler {sampler!r} is not one latentforge has; known: {known}")
    if schedule is None or schedule.strip() in ("", "Automatic"):
        return ours, implied or default
    s = schedule.strip()
    from latentforge.schedules import SCHEDULERS

    if s in SCHEDULES:
        return ours, SCHEDULES[s]
    if s in SCHEDULERS or s == "tuned":  # tuned: the model's own schedule file (tune_schedule.py)
        return ours, s
    known = ", ".join([*SCHEDULES, *SCHEDULERS, "tuned"])
    raise ValueError(f"the infotext's schedule type {schedule!r} is not one latentforge has; known: {known}")


# A1111 keys that change nothing in latentforge's images, or describe the file rather than the generation
_INFORMATIONAL = {
    "Model hash",
    "Model",
    "Version",
    "VAE hash",
    "VAE",
    "User",
    "Init image hash",
    "Size-1",
    "Size-2",
    "Lora hashes",  # the prompt's <lora:...> tags replay the LoRAs; the hashes identify their files
    "TI hashes",
}


def generation(fields: dict[str, str]) -> tuple[dict, list[str]]:
    """Parsed A1111 fields -> (Pipeline/generate arguments, the keys that were not used). Errors name the
    key and the value."""
    out: dict = {"prompt": fields.get("Prompt", ""), "negative_prompt": fields.get("Negative prompt", "")}
    used = {"Prompt", "Negative prompt"}
    if "Steps" in fields:
        out["steps"] = _number(fields, "Steps", int)
    if "Sampler" in fields:
        out["sampler"], out["scheduler"] = sampler_and_schedule(
            fields["Sampler"], fields.get("Schedule type")
        )
        used |= {"Sampler", "Schedule type"}
    if "CFG scale" in fields:
        out["cfg"] = _number(fields, "CFG scale", float)
    if "Seed" in fields:
        out["seed"] = _number(fields, "Seed", int)
    if "Size" in fields:
        out["width"], out["height"] = _size(fields, "Size")
    if "Variation seed" in fields:
        out["subseed"] = _number(fields, "Variation seed", int)
        out["subseed_strength"] = (
            _number(fields, "Variation seed strength", float)
            if ("Variation seed strength" in fields)
            else 0.0
        )
        used.add("Variation seed strength")
    if "Seed resize from" in fields:
        out["seed_resize_from"] = _size(fields, "Seed resize from")
    hires = "Hires upscale" in fields or "Hires resize" in fields
    if hires:
        if "Hires upscale" in fields:
            out["hires_scale"] = _number(fields, "Hires upscale", float)
        else:
            out["hires_size"] = _size(fields, "Hires resize")
            used.add("Hires resize")
        if "Hires steps" in fields:
            out["hires_steps"] = _number(fields, "Hires steps", int)
        if "Hires upscaler" in fields:
            out["hires_upscaler"] = fields["Hires upscaler"]
        if "Hires sampler" in fields:
            out["hires_sampler"] = sampler_and_schedule(fields["Hires sampler"], None)[0]
        if "Denoising strength" in fields:
            out["hires_denoise"] = _number(fields, "Denoising strength", float)
            used.add("Denoising strength")
        used |= {"Hires upscale", "Hires steps", "Hires upscaler", "Hires sampler"}
    elif "Denoising strength" in fields:
        out["strength"] = _number(fields, "Denoising strength", float)
    # A1111's RNG source: "CPU", "GPU" (a missing key means GPU), "NV" (NVIDIA's generator emulated)
    rng = fields.get("RNG", "GPU").strip()
    if rng not in ("CPU", "GPU"):
        raise ValueError(
            f"the infotext's RNG {rng!r} is not one latentforge has; known: CPU, GPU (A1111's NV source "
            "emulates NVIDIA's generator and is not implemented)"
        )
    out["rng"] = "cpu" if rng == "CPU" else "device"
    used.add("RNG")
    if "Complete prompt" in fields:  # ours (Pipeline's complete_prompt), where a completion is in play
        from latentforge.shapes.captions import PROMPT_COMPLETIONS

        value = fields["Complete prompt"].strip()
        if value not in PROMPT_COMPLETIONS:
            known = ", ".join(PROMPT_COMPLETIONS)
            raise ValueError(f"the infotext's Complete prompt {value!r}; known: {known}")
        out["complete_prompt"] = value
        used.add("Complete prompt")
    if "Mask blur" in fields:
        out["mask_blur"] = _number(fields, "Mask blur", float)
    if "Token merging ratio" in fields:  # A1111's ToMe setting (written when > 0); ours has one ratio
        out["tome_ratio"] = _number(fields, "Token merging ratio", float)
        hr = fields.get("Token merging ratio hr")  # for both passes: an hr ratio that differs is not replayed
        if hr is None or (_number(fields, "Token merging ratio hr", float) == out["tome_ratio"]):
            used.add("Token merging ratio hr")
        used.add("Token merging ratio")
    if "Emphasis" in fields:
        if fields["Emphasis"] not in EMPHASIS:
            raise ValueError(f"the infotext's Emphasis {fields['Emphasis']!r}; known: {', '.join(EMPHASIS)}")
        out["weighting"] = EMPHASIS[fields["Emphasis"]]
    if "Clip skip" in fields and _number(fields, "Clip skip", int) != 1:
        raise ValueError(
            f"the infotext asks for Clip skip {fields['Clip skip']}; latentforge uses each family's own "
            "layer (SD1: the last, SD2/SDXL: the penultimate) and has no clip-skip setting"
        )
    used |= {
        "Steps",
        "CFG scale",
        "Seed",
        "Size",
        "Variation seed",
        "Seed resize from",
        "Mask blur",
        "Emphasis",
    }
    used |= {"Clip skip"}
    ignored = [k for k in fields if k not in used and k not in _INFORMATIONAL]
    return out, ignored


def read_png(path: str) -> dict:
    """The metadata of an image file: {"parameters": A1111 text or None, "latentforge": dict or None}.
    A JPEG/WebP's EXIF UserComment (A1111's way for those formats) counts as `parameters`."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        text = dict(getattr(im, "text", {}) or {})
        info = dict(im.info)
        exif = im.getexif()
    params = text.get("parameters", info.get("parameters"))
    if params is None and exif:
        comment = exif.get_ifd(0x8769).get(0x9286)  # Exif IFD: UserComment
        if isinstance(comment, bytes) and comment[:8] in (b"UNICODE\0", b"ASCII\0\0\0"):
            enc = "utf-16-be" if comment[:8] == b"UNICODE\0" else "ascii"
            params = comment[8:].decode(enc, errors="replace").strip("\0")
    raw = text.get(JSON_KEY, info.get(JSON_KEY))
    exact = None
    if isinstance(raw, str):
        try:
            exact = json.loads(raw)
        except json.JSONDecodeError:
            raise ValueError(f"{path!r} has a {JSON_KEY!r} chunk that is not JSON") from None
        if not isinstance(exact, dict):
            raise ValueError(f"{path!r} has a {JSON_KEY!r} chunk that is not a JSON object")
    return {"parameters": params if isinstance(params, str) else None, "latentforge": exact}
