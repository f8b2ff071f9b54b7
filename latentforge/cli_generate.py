"""`latentforge generate` and `latentforge info IMAGE`: the command-line face of `Pipeline.__call__`, with
A1111's batches, seeds, hires fix, output naming, and metadata that replays (`--from-image`)."""

from __future__ import annotations

import json
import os
import re
import sys
import warnings

from latentforge import cli_checks as check

IMAGE_FILES = "an image file Pillow reads (PNG, JPEG, WebP, BMP, TIFF, ...)"


def open_image(flag: str, path: str):
    """The image at `path` (fully read), or an error naming the path and what is accepted."""
    from PIL import Image, UnidentifiedImageError

    check.in_file(flag, path, IMAGE_FILES)
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:  # SyntaxError: some broken PNG chunks
        raise ValueError(f"{flag} {path!r} is not a readable image ({e}); expected {IMAGE_FILES}") from None


def check_img2img(args) -> None:
    """--init-image and the flags that need it (or --mask), checked before the model loads."""
    from latentforge.canvas import MAX_PAD
    from latentforge.img2img import MAX_MASK_BLUR

    if args.init_image is None:
        needs_init = (("--strength", args.strength), ("--mask", args.mask), ("--outpaint", args.outpaint))
        for flag, value in needs_init:
            if value is not None:
                raise ValueError(f"{flag} needs --init-image PATH (the picture to start from)")
    if args.mask is None and args.outpaint is None:
        for flag, value in (
            ("--mask-blur", args.mask_blur),
            ("--masked-content", args.masked_content),
            ("--inpaint-full-res", args.inpaint_full_res or None),
        ):
            if value is not None:
                raise ValueError(f"{flag} needs --mask PATH (white = repaint, black = keep) or --outpaint")
    if args.inpaint_full_res_padding is not None and not args.inpaint_full_res:
        raise ValueError("--inpaint-full-res-padding needs --inpaint-full-res (inpaint only the masked area)")
    check.float_in("--strength", args.strength, 0.0, 1.0)
    check.int_in("--mask-blur", args.mask_blur, 0, MAX_MASK_BLUR)
    check.int_in("--inpaint-full-res-padding", args.inpaint_full_res_padding, 0, MAX_PAD)
    if args.outpaint is not None:
        args.outpaint = check.outpaint("--outpaint", args.outpaint, MAX_PAD)


def preview_options(args) -> dict:
    """Pipeline arguments for --preview-every/--preview-dir/--preview-method/--taesd, checked (and the TAESD
    file read) before the model loads; {} when previews are off."""
    from latentforge import previews

    every = check.int_in("--preview-every", args.preview_every, 0, previews.MAX_EVERY) or 0
    if every == 0:
        given = (
            ("--preview-dir", args.preview_dir),
            ("--preview-method", args.preview_method),
            ("--taesd", args.taesd),
        )
        for flag, value in given:
            if value is not None:
                raise ValueError(f"{flag} needs --preview-every N (a preview after every N-th step, N >= 1)")
        return {}
    method = args.preview_method or "linear"
    if args.taesd is not None:
        if method != "taesd":
            raise ValueError(f"--taesd {args.taesd!r} is only used with --preview-method taesd")
        check.in_file("--taesd", args.taesd, "a TAESD decoder file (.safetensors)")
    folder = check.out_dir("--preview-dir", args.preview_dir or os.path.join(args.out, "previews"))
    previewer = previews.Previewer(method, every, taesd=args.taesd)
    return {"preview": previewer, "preview_every": every,
            "on_preview": lambda step, images: previews.save(folder, step, images)}  # fmt: skip


# flags --from-image fills when they are not given: Pipeline argument -> argparse dest
REPLAYED = {
    "prompt": "prompt", "negative_prompt": "negative", "steps": "steps", "sampler": "sampler",
    "scheduler": "scheduler", "cfg": "cfg", "seed": "seed", "width": "width", "height": "height",
    "weighting": "weighting", "subseed": "subseed", "subseed_strength": "subseed_strength",
    "seed_resize_from": "seed_resize_from", "hires_scale": "hires_scale", "hires_size": "hires_size",
    "hires_denoise": "hires_denoise", "hires_steps": "hires_steps", "hires_upscaler": "hires_upscaler",
    "hires_sampler": "hires_sampler", "strength": "strength", "mask_blur": "mask_blur",
    "masked_content": "masked_content", "outpaint": "outpaint",
    "inpaint_full_res_padding": "inpaint_full_res_padding", "rng": "rng",
    "cache_interval": "cache_interval", "cache_depth": "cache_depth", "cache_threshold": "cache_threshold",
    "tome_ratio": "tome_ratio", "tome_max_downsample": "tome_max_downsample",
    "complete_prompt": "complete_prompt",
}  # fmt: skip
IMG2IMG_ONLY = ("strength", "mask_blur", "masked_content", "outpaint", "inpaint_full_res_padding")


def image_parameters(path: str) -> tuple[dict, str, list[str]]:
    """The generation arguments stored in an image: (arguments, where from, A1111 keys not used). The
    `latentforge` JSON chunk is exact and wins; else A1111's `parameters` text (PNG chunk or EXIF)."""
    from latentforge import infotext

    check.in_file("--from-image", path, IMAGE_FILES)
    try:
        meta = infotext.read_png(path)
    except (OSError, SyntaxError) as e:
        raise ValueError(
            f"--from-image {path!r} is not a readable image ({e}); expected {IMAGE_FILES}"
        ) from None
    if meta["latentforge"] is not None:
        exact = {
            k: v
            for k, v in meta["latentforge"].items()
            if k in REPLAYED or k in ("model", "model_hash", "batch_size", "batch_index")
        }
        for k in ("seed_resize_from", "hires_size", "outpaint"):
            if isinstance(exact.get(k), list):
                exact[k] = tuple(exact[k])
        return exact, "its latentforge chunk", []
    if meta["parameters"] is None:
        raise ValueError(
            f"--from-image {path!r} has no generation parameters (no A1111 'parameters' text chunk or EXIF "
            "comment, no 'latentforge' chunk): it was not saved with its settings"
        )
    fields = infotext.parse(meta["parameters"])
    gen, ignored = infotext.generation(fields)
    if "Model hash" in fields:
        gen["model_hash"] = fields["Model hash"]
    if "Model" in fields:
        gen["model"] = fields["Model"]
    return gen, "its A1111 parameters", ignored


def apply_image_parameters(args) -> None:
    """--from-image: every replayable flag not given on the command line (None) takes the image's value."""
    gen, source, ignored = image_parameters(args.from_image)
    if ignored:
        warnings.warn(f"--from-image: these settings are not replayed: {', '.join(ignored)}", stacklevel=2)
    if args.init_image is None:
        dropped = [k for k in IMG2IMG_ONLY if gen.get(k) is not None]
        if dropped:
            warnings.warn(
                f"--from-image: the image was made from an init image ({', '.join(dropped)}); give "
                "--init-image (and --mask) to replay that, generating from text instead",
                stacklevel=2,
            )
            for k in dropped:
                gen.pop(k)
    seed_given, subseed_given = args.seed is not None, args.subseed is not None
    for key, dest in REPLAYED.items():
        if key in gen and getattr(args, dest, None) is None:
            setattr(args, dest, gen[key])
    # an image made as image k of a batch of B: sampled again in its batch (a batch's numerics differ from
    # a single image's in the last bits), and only image k written
    b, k = gen.get("batch_size"), gen.get("batch_index")
    if isinstance(b, int) and isinstance(k, int) and 0 <= k < b and b > 1 and args.batch_size is None:
        if not seed_given and isinstance(args.seed, int) and args.seed >= k:
            args.batch_size, args.seed, args.replay_index = b, args.seed - k, k
            if args.subseed is not None and not subseed_given:
                args.subseed -= k
    args.replayed_from = (args.from_image, source, gen.get("model"), gen.get("model_hash"))


def lora_flag(value: str) -> tuple[str, float, float]:
    """--lora FILE[:UNET_W[:TE_W]] -> (file, unet weight, text-encoder weight), the file checked. Weights are
    taken off the end while they are numbers, so a path holding ':' (C:\\...) still works."""
    import math

    parts, weights = value.split(":"), []
    while len(parts) > 1 and len(weights) < 2:
        try:
            w = float(parts[-1])
        except ValueError:
            break
        if not math.isfinite(w):
            raise ValueError(f"--lora {value!r}: the weights must be finite numbers")
        weights.insert(0, w)
        parts.pop()
    path = ":".join(parts)
    check.in_file("--lora", path, "a LoRA .safetensors file (FILE[:UNET_W[:TE_W]])")
    if not path.lower().endswith(".safetensors"):
        raise ValueError(f"--lora {path!r}: LoRA files are read from .safetensors only")
    unet = weights[0] if weights else 1.0
    return path, unet, weights[1] if len(weights) > 1 else unet


def check_loras(args) -> tuple[list[tuple[str, float, float]], list[tuple[str, float, float]]]:
    """(--lora files with their weights, the prompt's <lora:...> tags), checked before the model loads: the
    tags parse, --lora-dir is a folder holding every tagged name, each --lora is a .safetensors file."""
    from latentforge import lora
    from latentforge.lora_use import find_lora

    files = [lora_flag(v) for v in args.lora or []]
    if args.lora_dir is not None:
        check.in_dir("--lora-dir", args.lora_dir, "a folder of LoRA .safetensors files")
    if args.prompt is None:
        return files, []
    try:
        _, tags = lora.parse_tags(args.prompt)
    except ValueError as e:
        raise ValueError(f"the prompt: {e}") from None
    if lora._TAG.search(args.negative or ""):
        raise ValueError("--negative: LoRA tags (<lora:...>) are read from the prompt only, as in A1111")
    if tags and args.lora_dir is None:
        name = tags[0][0]
        raise ValueError(f"the prompt names LoRA {name!r} (<lora:...>): give --lora-dir DIR, the folder "
                         f"holding {name}.safetensors")  # fmt: skip
    for name, _, _ in tags:  # before the model loads: a missing one named, with what the folder has
        find_lora(name, args.lora_dir)
    return files, tags


# the speed-up flags (speedups.py): flag, type, metavar, help
SPEEDUP_FLAGS = (
    ("--cache-interval", int, "N", "UNet: DeepCache; DiT/MMDiT: block-residual reuse; a full pass every N "
     "steps (1: off)"),
    ("--cache-depth", int, "D", "DeepCache's skip branch: 0 (the shallowest, fastest) .. input blocks - 1 "
     "(default 0)"),
    ("--cache-threshold", float, "X", "DiT/MMDiT: TeaCache's relative-L1 threshold, e.g. 0.1 (0: off)"),
    ("--tome-ratio", float, "R", "UNet: token merging for SD, the share of tokens merged before "
     "self-attention, 0..0.95 (0: off)"),
    ("--tome-max-downsample", int, "F", "merge in the transformers at downsampling 1, 2, 4 or 8 and below "
     "(default 1: the highest resolution)"),
)  # fmt: skip


def add_speedup_flags(p) -> None:
    """The speed-up flags of `generate` and `eval shapes`."""
    for flag, kind, metavar, text in SPEEDUP_FLAGS:
        p.add_argument(flag, type=kind, default=None, metavar=metavar, help=text)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def add_device_flags(p) -> None:
    """Where and how the networks run (Pipeline.place): `generate` and `serve`."""
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--device", default=None, help=f"torch device: {check.DEVICES} (default: cpu)")
    p.add_argument(
        "--offload",
        action="store_true",
        help="keep the networks in host memory and move each to --device only while it runs (a GPU too "
        "small for the whole model)",
    )
    p.add_argument(
        "--channels-last", action="store_true", help="UNet and VAE weights in NHWC (faster convolutions)"
    )
    p.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=None,
        choices=COMPILE_MODES,
        help="torch.compile the denoiser (a mode; reduce-overhead: CUDA graphs); the first image compiles",
    )


def check_device_flags(args) -> None:
    """Before the model loads: the device exists, and --offload has an accelerator to offload to."""
    check.device("--device", args.device)
    if args.offload and args.device in (None, "cpu"):
        raise ValueError(
            "--offload moves the networks to an accelerator: give --device cuda "
            f"(got {args.device or 'none'})"
        )


def place(pipe, args):
    """Pipeline.place from the device flags (check_device_flags first); nothing when none is given."""
    if args.device or args.offload or args.channels_last or args.compile:
        pipe.place(args.device, args.offload, args.channels_last, args.compile or False)
    return pipe


SPEEDUP_ARGS = ("cache_interval", "cache_depth", "cache_threshold", "tome_ratio", "tome_max_downsample")


def speedup_options(args) -> dict:
    """The Pipeline arguments of the speed-up flags that were given, checked before the model loads."""
    from latentforge.speedups import Speedups

    given = {k: getattr(args, k, None) for k in SPEEDUP_ARGS}
    given = {k: v for k, v in given.items() if v is not None}
    try:
        Speedups(**given).check()
    except ValueError as e:  # the message in flag names
        msg = str(e)
        for k in SPEEDUP_ARGS:
            msg = msg.replace(k, "--" + k.replace("_", "-"))
        raise ValueError(msg) from None
    return given


# the ControlNet flags (control_use.py): flag, type, metavar, help; each given once applies to every
# --controlnet, given once per --controlnet it pairs with them in order
CONTROL_FLAGS = (
    ("--controlnet", str, "FILE", "a ControlNet file (original or diffusers layout); repeatable"),
    ("--control-image", str, "IMG", "its control map, or the picture --control-preprocess makes one from"),
    ("--control-weight", float, "W", "its strength (default 1)"),
    ("--control-start", float, "F", "the fraction of the steps where it starts acting, 0..1 (default 0)"),
    ("--control-end", float, "F", "the fraction of the steps where it stops acting, 0..1 (default 1)"),
    ("--control-preprocess", str, "NAME", "canny | scribble | seg | none (default: the image is the map)"),
)  # fmt: skip


def add_control_flags(p) -> None:
    """The ControlNet flags of `generate`."""
    for flag, kind, metavar, text in CONTROL_FLAGS:
        p.add_argument(flag, type=kind, action="append", default=None, metavar=metavar, help=text)
    p.add_argument(
        "--control-guess",
        action="store_true",
        help="guess mode: the ControlNets act on the conditional pass only, the shallow skips weaker",
    )


def control_options(args) -> dict:
    """{"controlnet": [Control, ...]} from the ControlNet flags (or {}), files and images checked and the
    numbers in range before the model loads."""
    from latentforge.control_use import Control

    files = getattr(args, "controlnet", None) or []
    given = {
        f[2:].replace("-", "_"): getattr(args, f[2:].replace("-", "_"), None) for f, *_ in CONTROL_FLAGS[1:]
    }
    if not files:
        extra = [f"--{k.replace('_', '-')}" for k, v in given.items() if v] + (
            ["--control-guess"] if getattr(args, "control_guess", False) else []
        )
        if extra:
            raise ValueError(f"{', '.join(extra)} need --controlnet FILE")
        return {}
    if not given["control_image"]:
        raise ValueError(
            "--controlnet needs --control-image IMG (the control map, or a picture to preprocess)"
        )
    per = {}
    for k, values in given.items():
        values = values or []
        if len(values) not in (0, 1, len(files)):
            flag = "--" + k.replace("_", "-")
            raise ValueError(
                f"{flag} is given {len(values)} times for {len(files)} --controlnet: once, or once for each"
            )
        per[k] = [values[0]] * len(files) if len(values) == 1 else values
    controls = []
    for i, path in enumerate(files):
        check.checkpoint("--controlnet", path)
        image = open_image("--control-image", per["control_image"][i])
        pick = {
            k: per[f"control_{k}"][i] for k in ("weight", "start", "end", "preprocess") if per[f"control_{k}"]
        }
        try:
            controls.append(Control(path, image, guess=bool(args.control_guess), **pick).check(i))
        except ValueError as e:
            msg = str(e).replace(f"controlnet[{i}]", f"--controlnet {path!r}")
            for k in ("weight", "start", "end", "preprocess"):
                msg = msg.replace(f": {k} ", f": --control-{k} ")
            raise ValueError(msg) from None
    return {"controlnet": controls}


def control_infotext(controls: list) -> dict:
    """sd-webui-controlnet's infotext fields, "ControlNet k": "Module: ..., Model: ..., Weight: ..."."""
    out = {}
    for k, c in enumerate(controls):
        name = os.path.splitext(os.path.basename(str(c.model)))[0]
        mode = "ControlNet is more important" if c.guess else "Balanced"  # guess mode's nearest A1111 mode
        out[f"ControlNet {k}"] = (
            f"Module: {c.preprocess}, Model: {name}, Weight: {c.weight:g}, Guidance Start: {c.start:g}, "
            f"Guidance End: {c.end:g}, Control Mode: {mode}"
        )
    return out


def _size_flag(flag: str, value) -> tuple[int, int] | None:
    if value is None or isinstance(value, tuple):
        return value
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(value))
    if m is None:
        raise ValueError(f"{flag} must be WIDTHxHEIGHT in pixels such as 512x768, got {value!r}")
    return int(m.group(1)), int(m.group(2))


def generate(args) -> int:
    import torch

    from latentforge import hires, infotext, outputs
    from latentforge.cli import _check_generation, _check_model, _fill_defaults, _say, _short_hash
    from latentforge.pipeline import MAX_BATCH_COUNT, DecodeFailed, Pipeline

    if args.from_image is not None:
        apply_image_parameters(args)
    args.negative = "" if args.negative is None else args.negative
    args.batch_size = 1 if args.batch_size is None else args.batch_size
    args.seed = 0 if args.seed is None else args.seed
    args.weighting = args.weighting or "a1111"
    args.rng = args.rng or "cpu"
    if args.rng not in ("cpu", "device"):
        raise ValueError(f"--rng must be cpu or device, got {args.rng!r}")
    if args.decode is not None:
        check.in_file("--decode", args.decode, "latents saved by latentforge (.safetensors)")
    elif args.prompt is None:
        raise ValueError("give a prompt (or --from-image IMG.png, or --decode LATENTS.safetensors)")
    else:
        check.utf8("the prompt", args.prompt)
    check.utf8("--negative", args.negative)
    _check_generation(args)
    check_img2img(args)
    count = check.int_in("--batch-count", args.batch_count, 1, MAX_BATCH_COUNT)
    check.int_in("--subseed", args.subseed, 0, 2**63 - 1 - args.batch_size * count)
    check.float_in("--subseed-strength", args.subseed_strength, 0.0, 1.0)
    if args.subseed_strength and args.subseed is None:
        raise ValueError("--subseed-strength needs --subseed (the variation seed)")
    resize_from = _size_flag("--seed-resize-from", args.seed_resize_from)
    hires_size = _size_flag("--hires-size", args.hires_size)
    hr = {"hires_scale": args.hires_scale, "hires_size": hires_size, "hires_denoise": args.hires_denoise,
          "hires_steps": args.hires_steps, "hires_upscaler": args.hires_upscaler,
          "hires_sampler": args.hires_sampler}  # fmt: skip
    hires_on = hr["hires_scale"] is not None or hires_size is not None
    if hires_on:
        if args.init_image is not None:
            raise ValueError("--hires-scale/--hires-size is a text-to-image option; drop --init-image")
        d = {"hires_scale": 2.0, "hires_denoise": 0.7, "hires_steps": 0, "hires_upscaler": "Latent"}
        hires.check(*[hr[k] if hr[k] is not None else d[k] for k in d])
    else:
        extra = [f"--{k.replace('_', '-')}" for k, v in hr.items() if v is not None]
        if extra:
            raise ValueError(f"{', '.join(extra)} need --hires-scale X or --hires-size WxH (the hires fix)")
    lora_files, lora_tags = check_loras(args)
    speed = speedup_options(args)
    control = control_options(args)  # ControlNets (control_use.py), if given
    name = outputs.check_name(args.name)
    init = None if args.init_image is None else open_image("--init-image", args.init_image)
    mask = None if args.mask is None else open_image("--mask", args.mask)
    if args.vae is not None:
        check.checkpoint("--vae", args.vae)
    if args.t5 is not None:
        check.checkpoint("--t5", args.t5)
    if args.t5_tokenizer is not None and not os.path.exists(args.t5_tokenizer):
        raise FileNotFoundError(
            f"--t5-tokenizer {args.t5_tokenizer!r} does not exist; expected tokenizer.json"
        )
    check_device_flags(args)
    check.out_dir("--out", args.out)
    preview = preview_options(args)
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    pipe = Pipeline.from_single_file(
        args.model,
        dtype=dtypes[args.dtype],
        vae=args.vae,
        t5=args.t5,
        t5_tokenizer=args.t5_tokenizer,
        prediction=args.prediction,
        lora_dir=args.lora_dir,
        embeddings_dir=args.embeddings_dir,
    )
    _fill_defaults(args, pipe)
    place(pipe, args)
    if args.decode is not None:  # latents saved by a run whose decode failed: its parameters are in the file
        from latentforge.checkpoint_io import read_metadata

        images = pipe.decode_file(args.decode)
        meta = read_metadata(args.decode)
        texts = json.loads(meta.get("latentforge.infotexts", "[]"))
        seeds = json.loads(meta.get("latentforge.seeds", "[]"))
        exact = json.loads(meta.get("latentforge.exact", "[]"))
        for k, image in enumerate(images):
            seed = seeds[k] if k < len(seeds) else k
            text = texts[k] if k < len(texts) else ""
            _say(
                outputs.save_png(
                    image, args.out, text, seed, name, exact=exact[k] if k < len(exact) else None
                )
            )
        return 0
    model_file = _check_model(args.model)
    model_hash = _short_hash(model_file)
    model_name = os.path.splitext(os.path.basename(model_file))[0]
    replayed = getattr(args, "replayed_from", None)
    if replayed is not None and replayed[3] and replayed[3] not in (model_hash, model_hash[:8]):
        warnings.warn(
            f"{replayed[0]} was made with model {replayed[2] or '?'} (hash {replayed[3]}); replaying it with "
            f"{model_name} (hash {model_hash}) gives other pixels",
            stacklevel=2,
        )

    strength = args.strength
    if init is not None and strength is None:
        strength = pipe.default_strength  # 0.75; 1 for inpainting models
    mask_blur = 4 if args.mask_blur is None else args.mask_blur
    padding = 32 if args.inpaint_full_res_padding is None else args.inpaint_full_res_padding
    start = {}  # img2img/inpainting arguments of Pipeline.__call__
    if init is not None:  # the init image's size unless --width/--height say otherwise (Pipeline)
        start = {"init_image": init, "strength": strength, "strict_size": args.strict_size}
        if mask is not None or args.outpaint is not None:
            masked = args.masked_content or "original"
            start |= {"mask": mask, "mask_blur": mask_blur, "masked_content": masked}
        if args.outpaint is not None:
            start["outpaint"] = args.outpaint
        if args.inpaint_full_res:
            start |= {"inpaint_full_res": True, "inpaint_full_res_padding": padding}
    if control and init is None:  # --strict-size refuses a control image of another size too
        control["strict_size"] = args.strict_size
    variation = {"subseed": args.subseed, "subseed_strength": args.subseed_strength or 0.0,
                 "seed_resize_from": resize_from}  # fmt: skip
    hires_kw = {k: v for k, v in hr.items() if v is not None} | (
        {"hires_size": hires_size} if hires_size else {}
    )
    dw, dh = init.size if init is not None else pipe.default_size
    width, height = args.width or dw, args.height or dh
    n = args.batch_size * count
    lora_kw = {"loras": lora_files} if lora_files else {}
    # A1111's "Lora hashes" (None: no LoRA)
    lora_hashes = pipe.lora_hashes(args.prompt, lora_files) if lora_files or lora_tags else None

    call = dict(prompt=args.prompt, negative_prompt=args.negative, steps=args.steps, sampler=args.sampler,
                scheduler=args.scheduler, cfg=args.cfg, seed=args.seed, width=args.width, height=args.height,
                batch_size=args.batch_size, batch_count=count, rng=args.rng, weighting=args.weighting,
                complete_prompt=args.complete_prompt,
                **variation, **hires_kw, **start, **lora_kw, **speed, **control)  # fmt: skip
    prompts = pipe.image_prompts(**call)  # image i's prompt: as given, or completed (complete_prompt)
    if prompts[0] != args.prompt:
        _say(f"prompt completed: {prompts[0]!r}" + (" (each image its own)" if n > 1 else ""))
    completion = pipe.prompt_completion(args.complete_prompt)  # saved, so that a replay completes alike

    def a1111(i: int) -> str:  # image i = batch i // batch_size, position i % batch_size: seed + i
        hr_scale = hires_kw.get("hires_scale", 2.0) if hires_on and hires_size is None else None
        return infotext.build(
            prompts[i],
            args.negative,
            {
                "Steps": args.steps,
                "Sampler": infotext.sampler_label(args.sampler),
                "Schedule type": infotext.schedule_label(args.scheduler),
                "CFG scale": args.cfg,
                "Seed": args.seed + i,
                "Size": f"{width}x{height}",
                "Model hash": model_hash,
                "Model": model_name,
                "Variation seed": None if not args.subseed_strength else args.subseed + i,
                "Variation seed strength": args.subseed_strength or None,
                "Seed resize from": None if resize_from is None else "{}x{}".format(*resize_from),
                "Denoising strength": hires_kw.get("hires_denoise", 0.7) if hires_on else (
                    None if init is None else strength),
                "Hires upscale": hr_scale,
                "Hires resize": None if hires_size is None else "{}x{}".format(*hires_size),
                "Hires steps": hires_kw.get("hires_steps") or None,
                "Hires upscaler": hires_kw.get("hires_upscaler", "Latent") if hires_on else None,
                "Hires sampler": infotext.sampler_label(args.hires_sampler) if args.hires_sampler else None,
                "Mask blur": None if mask is None and args.outpaint is None else mask_blur,
                "Inpaint area": "Only masked" if args.inpaint_full_res else None,  # A1111's names
                "Masked area padding": padding if args.inpaint_full_res else None,
                "Outpaint": None if args.outpaint is None else ",".join(map(str, args.outpaint)),
                "RNG": "CPU" if args.rng == "cpu" or pipe.device.type == "cpu" else "GPU",
                "Emphasis": {"a1111": None, "comfy": "ComfyUI", "none": "None"}[args.weighting],
                "Lora hashes": lora_hashes,
                "Token merging ratio": speed.get("tome_ratio") or None,  # A1111's name
                **control_infotext(control.get("controlnet", [])),
                "Complete prompt": completion,
                "Version": f"latentforge {__import__('latentforge').__version__}",
            },
        )  # fmt: skip

    def exact(i: int) -> dict:  # the Pipeline arguments that make image i alone (batch of one)
        out = {"prompt": prompts[i], "negative_prompt": args.negative, "steps": args.steps,
               "sampler": args.sampler, "scheduler": args.scheduler, "cfg": args.cfg, "seed": args.seed + i,
               "width": args.width, "height": args.height, "weighting": args.weighting,
               "batch_size": args.batch_size, "batch_index": i % args.batch_size, "rng": args.rng,
               "model": model_name, "model_hash": model_hash,
               "version": __import__("latentforge").__version__}  # fmt: skip
        if completion is not None:
            out["complete_prompt"] = completion
        if args.subseed is not None:
            out |= {"subseed": args.subseed + i, "subseed_strength": args.subseed_strength or 0.0}
        if lora_files:  # --lora files by name (the prompt keeps its tags), with their weights
            out["loras"] = [[os.path.basename(f), u, te] for f, u, te in lora_files]
        if resize_from is not None:
            out["seed_resize_from"] = list(resize_from)
        out |= {k: list(v) if isinstance(v, tuple) else v for k, v in hires_kw.items()}
        out |= speed
        if init is not None:
            out["strength"] = strength
            if mask is not None or args.outpaint is not None:
                out |= {"mask_blur": mask_blur, "masked_content": args.masked_content or "original"}
            if args.outpaint is not None:
                out["outpaint"] = list(args.outpaint)
            if args.inpaint_full_res:
                out["inpaint_full_res_padding"] = padding
        return out

    def fields(i: int) -> dict:
        return {"seed": args.seed + i, "subseed": None if args.subseed is None else args.subseed + i,
                "prompt": prompts[i], "negative": args.negative, "steps": args.steps,
                "sampler": args.sampler, "scheduler": args.scheduler, "cfg": args.cfg, "width": width,
                "height": height,
                "model": model_name, "model_hash": model_hash, "batch": i // args.batch_size,
                "index": i % args.batch_size}  # fmt: skip

    latents_path = os.path.join(args.out, f"latents-{args.seed}-{os.getpid()}.safetensors")
    try:
        images = pipe(
            **call,
            progress=not args.quiet,
            **preview,
            latents_path=latents_path,
            latents_metadata={
                "latentforge.infotexts": json.dumps([a1111(i) for i in range(n)]),
                "latentforge.seeds": json.dumps([args.seed + i for i in range(n)]),
                "latentforge.exact": json.dumps([exact(i) for i in range(n)]),
            },
        )
    except DecodeFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    keep = getattr(args, "replay_index", None)  # --from-image of image k of a batch: only that one
    for i, image in enumerate(images):
        if keep is not None and i != keep:
            continue
        _say(outputs.save_png(image, args.out, a1111(i), args.seed + i, name, fields(i), exact(i)))
    return 0


def info_image(path: str) -> dict:
    """`latentforge info IMG`: the image's stored texts and the arguments `--from-image` would replay."""
    from latentforge import infotext

    check.in_file("the image", path, IMAGE_FILES)
    meta = infotext.read_png(path)
    out: dict = {"file": path, "parameters": meta["parameters"], "latentforge": meta["latentforge"]}
    if meta["parameters"] is None and meta["latentforge"] is None:
        raise ValueError(
            f"{path!r} has no generation parameters (no 'parameters' or 'latentforge' text chunk)"
        )
    if meta["parameters"] is not None:
        fields = infotext.parse(meta["parameters"])
        out["a1111"] = fields
        try:
            out["replay"], out["not_replayed"] = infotext.generation(fields)
        except ValueError as e:
            out["replay_error"] = str(e)
    return out
