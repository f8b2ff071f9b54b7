"""The `latentforge` command: one entry point, sub-commands per job.

Bad input (a missing file, a value out of range, text that is not UTF-8) is answered with one line
`error: …` that names the value and what is accepted, and exit status 2; the checks (cli_checks.py) run before
any expensive work. A traceback means a bug. Warnings (e.g. a prompt cut at the text encoder's context) are
printed as `warning: …` lines on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from latentforge import cli_checks as check
from latentforge import cli_generate


def _say(text: str) -> None:
    """Print to stdout; a path that is not UTF-8 (surrogate-escaped bytes) is shown with U+FFFD."""
    print(text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))


def _bench(args) -> int:
    from latentforge.bench import bench_samplers, format_table

    names = args.samplers.split(",") if args.samplers else None
    if names:
        from latentforge.samplers import get_sampler

        for n in names:
            get_sampler(n)  # clear error with the closest valid name
    check.out_dir("--out", args.out)
    report = bench_samplers(args.out, names=names)
    _say(format_table(report))
    _say(f"wrote {args.out}/samplers.json and {args.out}/samplers.png")
    return 0


def _shapes(args) -> int:
    from latentforge.shapes import export
    from latentforge.shapes.render import MAX_RES, MIN_RES

    check.int_in("--n", args.n, 1)
    check.int_in("--seed", args.seed, 0)
    check.int_in("--size", args.size, MIN_RES, MAX_RES)
    check.float_in("--relation_share", args.relation_share, 0.0, 1.0)
    check.float_in("--background_share", args.background_share, 0.0, 1.0)
    check.float_in("--labelled_share", args.labelled_share, 0.0, 1.0)
    check.out_dir("DIR", args.dir)
    out = export(
        args.dir,
        n=args.n,
        size=args.size,
        seed=args.seed,
        split=args.split,
        relation_share=args.relation_share,
        background_share=args.background_share,
        labelled_share=args.labelled_share,
    )
    _say(f"wrote {args.n} images with captions and metadata.jsonl to {out}")
    return 0


def _check_generation(args) -> None:
    """The generation flags `generate` and `eval shapes --model` share, checked before the model loads."""
    from latentforge.pipeline import MAX_BATCH, MAX_CFG, MAX_SIZE, MAX_STEPS
    from latentforge.samplers import get_sampler
    from latentforge.schedules import SCHEDULERS, unknown_name_error

    check.int_in("--steps", args.steps, 1, MAX_STEPS)
    check.float_in("--cfg", args.cfg, 0.0, MAX_CFG)
    check.int_in("--width", args.width, 1, MAX_SIZE)
    check.int_in("--height", args.height, 1, MAX_SIZE)
    batch = check.int_in("--batch-size", getattr(args, "batch_size", 1), 1, MAX_BATCH)
    check.int_in("--seed", args.seed, 0, 2**63 - 1 - batch - getattr(args, "n", 0))
    if args.sampler is not None:
        get_sampler(args.sampler)
    if args.scheduler is not None and args.scheduler not in SCHEDULERS and args.scheduler != "tuned":
        # "tuned": the schedule `latentforge tune-schedule` stored beside the model (tune_schedule.py)
        raise unknown_name_error("scheduler", args.scheduler, [*SCHEDULERS, "tuned"])
    _check_model(args.model)


def _check_model(name: str) -> str:
    """`--model`: "default" (the shipped model), "default-fast" (its few-step student) or a checkpoint."""
    from latentforge.pipeline import DEFAULT_MODEL, model_file

    if name in ("default", "default-fast"):
        for f in dict.fromkeys((DEFAULT_MODEL, model_file(name))):  # default-fast needs both files
            if not os.path.isfile(f):
                raise FileNotFoundError(
                    f"the {name} model's file {f} is missing from this install; reinstall latentforge "
                    "or give --model PATH"
                )
        return model_file(name)
    return check.checkpoint("--model", name)


def add_completion_flags(parser, help: str) -> None:
    """--complete-prompt MODE; --complete-background and --no-complete-background: "background", "none"."""
    from latentforge.shapes import PROMPT_COMPLETIONS

    parser.add_argument("--complete-prompt", choices=PROMPT_COMPLETIONS, default=None, help=help)
    parser.add_argument("--complete-background", dest="complete_prompt", action="store_const",
                        const="background", help="--complete-prompt background")  # fmt: skip
    parser.add_argument("--no-complete-background", dest="complete_prompt", action="store_const",
                        const="none", help="--complete-prompt none: the prompt as written")  # fmt: skip


def _fill_defaults(args, pipe) -> None:
    """Generation flags left unset take the model's own settings (Pipeline.defaults)."""
    for name in ("steps", "sampler", "scheduler", "cfg"):
        if getattr(args, name) is None:
            setattr(args, name, pipe.defaults[name])


EVAL_BATCH = 32  # prompts per sampling batch in `eval shapes --model`


def _eval_generate(args) -> str:
    """One image per held-out shapes prompt from the model; returns the folder (images + metadata)."""
    import tempfile

    import numpy as np

    from latentforge.files import atomic_path, write_text
    from latentforge.pipeline import Pipeline
    from latentforge.shapes import caption, complete_prompts, sample_scene

    speed = cli_generate.speedup_options(args)  # step caching / token merging (speedups.py), if given
    pipe = Pipeline.from_single_file(args.model)  # before any folder is made: a bad file leaves nothing
    _fill_defaults(args, pipe)
    out = args.out or tempfile.mkdtemp(prefix="latentforge-eval-")
    os.makedirs(out, exist_ok=True)
    _say(f"loaded {args.model}: {pipe.detection}")
    rng = np.random.default_rng(args.seed)
    prompts = [caption(sample_scene(rng, split=args.split), rng) for _ in range(args.n)]
    if getattr(args, "complete_prompt", None) is None:  # the model's (callers' namespaces may leave it out)
        args.complete_prompt = pipe.defaults["complete_prompt"]
    # what the model is given (image k's completion from seed + k, as Pipeline draws it); images are scored
    # against `prompts`
    sampled = complete_prompts(prompts, args.complete_prompt, [args.seed + k for k in range(len(prompts))])
    done = sum(a != b for a, b in zip(prompts, sampled, strict=True))
    if args.complete_prompt != "none":
        _say(f"prompt completion ({args.complete_prompt}): {done} of {len(prompts)} prompts completed "
             "(scored as written)")  # fmt: skip
    # what the report should say the numbers were made with (the caller passes it to evaluate_folder)
    args.prompt_completion = {"mode": args.complete_prompt, "completed": done}
    lines = []
    for start in range(0, len(prompts), EVAL_BATCH):  # image k has seed + k in any batch (Pipeline.__call__)
        chunk = sampled[start : start + EVAL_BATCH]
        images = pipe(chunk, steps=args.steps, sampler=args.sampler, scheduler=args.scheduler, cfg=args.cfg,
                      seed=args.seed + start, width=args.width, height=args.height, batch_size=len(chunk),
                      complete_prompt="none", progress=False, **speed)  # fmt: skip
        for k, img in enumerate(images, start):
            name = f"{k:06d}.png"
            with atomic_path(os.path.join(out, name)) as tmp:
                img.save(tmp, format="PNG")
            line = {"file_name": name, "text": prompts[k]}
            if sampled[k] != prompts[k]:
                line["sampled_with"] = sampled[k]
            lines.append(json.dumps(line))
    write_text(os.path.join(out, "metadata.jsonl"), "\n".join(lines) + "\n")
    return out


def _eval(args) -> int:
    from latentforge.shapes.evaluate import evaluate_folder
    from latentforge.shapes.render import MAX_RES, MIN_RES
    from latentforge.shapes.report import format_report

    if (args.images is None) == (args.model is None):
        raise ValueError("give exactly one of --images DIR or --model PATH")
    check.int_in("--n", args.n, 1)
    check.int_in("--size", args.size, MIN_RES, MAX_RES)
    if args.json is not None:
        check.out_file("--json", args.json)
    if args.images is not None:
        check.in_dir("--images", args.images, "a folder of images with .txt captions or metadata.jsonl")
        if args.complete_prompt is not None:
            raise ValueError(
                f"--complete-prompt {args.complete_prompt} is for images made here (--model); the images of "
                "--images were made from their own prompts"
            )
        folder = args.images
    else:
        _check_generation(args)
        if args.out is not None:
            check.out_dir("--out", args.out)
        folder = _eval_generate(args)
    # images made here: the report says from which prompts (prompt completion)
    made = None if args.images is not None else {"prompt_completion": args.prompt_completion}
    report = evaluate_folder(folder, json_path=args.json, size=args.size, extra=made)
    _say(format_report(report))
    if args.json:
        _say(f"wrote {args.json}")
    return 0


# The demo's grid: a dozen prompts in the shapes grammar (what the default model knows: MODEL_CARD.md).
DEMO_PROMPTS = (
    "a big red circle in the upper left corner on a black background",
    "a small yellow star in the center on a blue background",
    "a green square left of a red triangle",
    "a large white heart on a purple background",
    "a blue diamond above an orange circle",
    "a big cyan cross in the bottom right",
    "a large orange hexagon on a white background",
    "a tiny black star in the top right on a yellow background",
    "a white plus sign below a red star on a green background",
    "a big blue heart in the center",
    "a red square, a green circle and a blue triangle on a white background",
    "a purple background with a pink disk in the middle left and a little grey hexagon in the top middle",
)


def _demo(args) -> int:
    """The main job (`./run.sh`): a grid from DEMO_PROMPTS and the adherence table on held-out prompts."""
    import time

    from latentforge.pipeline import Pipeline
    from latentforge.shapes.evaluate import evaluate_folder
    from latentforge.shapes.report import format_report
    from latentforge.training.samples import save_grid

    check.int_in("--n", args.n, 0)
    check.int_in("--seed", args.seed, 0, 2**62)
    _check_model(args.model)
    check.out_dir("--out", args.out)
    t0 = time.perf_counter()
    pipe = Pipeline.from_single_file(args.model)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    images = pipe(list(DEMO_PROMPTS), seed=args.seed, batch_size=len(DEMO_PROMPTS), progress=False)
    t_grid = time.perf_counter() - t0
    grid = os.path.join(args.out, "grid.png")
    save_grid(images, grid, cols=4, scale=2)
    used = pipe.image_prompts(list(DEMO_PROMPTS), seed=args.seed, batch_size=len(DEMO_PROMPTS))
    text = "\n".join(f"{k}: {p}" for k, p in enumerate(used)) + "\n"  # as given, or completed
    from latentforge.files import write_text

    write_text(os.path.join(args.out, "grid.txt"), text)
    d = pipe.defaults
    _say(
        f"loaded {args.model} in {t_load:.2f} s; {len(images)} images ({d['steps']} steps, {d['sampler']}, "
        f"cfg {d['cfg']:g}, prompt completion {d['complete_prompt']}) in {t_grid:.1f} s"
        f"\nwrote {grid} (prompts in grid.txt, row by row)"
    )
    if args.n:
        t0 = time.perf_counter()
        ev = argparse.Namespace(model=args.model, out=os.path.join(args.out, "heldout"), n=args.n,
                                seed=args.seed, split="heldout", steps=None, sampler=None, scheduler=None,
                                cfg=None, width=None, height=None, complete_prompt=None)  # fmt: skip
        folder = _eval_generate(ev)
        report = evaluate_folder(folder, json_path=os.path.join(args.out, "heldout.json"),
                                 extra={"prompt_completion": ev.prompt_completion})  # fmt: skip
        _say(f"\nheld-out prompts (compositions never trained on), {args.n} images:")
        _say(format_report(report))
        _say(f"({time.perf_counter() - t0:.0f} s; images and report in {args.out})")
    return 0


def _info(args) -> int:
    from latentforge.samplers import EXACT_VARIANT_OF, SAMPLER_NAMES
    from latentforge.schedules import SCHEDULERS

    # samplers: ComfyUI's names, each computing what ComfyUI computes; exact_samplers: our more accurate
    # variants, each with the ComfyUI name it departs from (see latentforge.samplers)
    if args.image is not None:
        _say(json.dumps(cli_generate.info_image(args.image), indent=1, ensure_ascii=False))
        return 0
    info = {"samplers": SAMPLER_NAMES, "exact_samplers": EXACT_VARIANT_OF, "schedulers": list(SCHEDULERS)}
    _say(json.dumps(info, indent=1))
    return 0


def parse_overrides(rest: list[str]) -> dict[str, str | list[str]]:
    """["--max-steps", "200", "--objective.prediction=v", "--compile"] -> {"max_steps": "200",
    "objective.prediction": "v", "compile": "true"}: any config field as a flag (typed by the config). A flag
    given more than once collects a list (`--sample-prompts "a red cube" --sample-prompts "a blue ball"`): how
    list fields take several values besides a JSON list; one value is one element, never split on commas."""
    out: dict[str, str | list[str]] = {}
    i = 0
    while i < len(rest):
        arg = check.utf8("an option", rest[i])
        if not arg.startswith("--") or len(arg) == 2:
            raise ValueError(
                f"unexpected argument {arg!r}; options look like --field value or --table.field=value"
            )
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(rest) and not rest[i + 1].startswith("--"):
                value = check.utf8(f"the value of {arg}", rest[i + 1])
                i += 1
            else:
                value = "true"
        key = key.replace("-", "_")
        if key in out:
            prev = out[key]
            out[key] = [*prev, value] if isinstance(prev, list) else [prev, value]
        else:
            out[key] = value
        i += 1
    return out


def _trainer(what: str):
    """The function that runs a training job of kind `what` (tests replace this to stay fast)."""
    if what == "denoiser":
        from latentforge.training.trainer import train_denoiser

        return train_denoiser
    if what == "lora":
        from latentforge.training.lora_train import train_lora

        return train_lora
    if what == "embedding":
        from latentforge.training.embedding_train import train_embedding

        return train_embedding
    from latentforge.training.vae_trainer import train_vae

    return train_vae


def _train_config(args, overrides: dict):
    from latentforge.training.config import (
        DenoiserTrainConfig,
        VAETrainConfig,
        apply_overrides,
        from_dict,
        run_kind,
    )
    from latentforge.training.config import resolve as resolve_config

    addon = _addon_config(args.what)  # (config class, resolve) of train lora / embedding; else None
    cls = addon[0] if addon else DenoiserTrainConfig if args.what == "denoiser" else VAETrainConfig
    check.config_shapes(cls, overrides, "options")
    if args.config is not None:
        check.config_shapes(cls, check.read_toml("--config", args.config), f"--config {args.config!r}")
    if args.resume and args.preset is None and args.config is None:
        saved = os.path.join(args.resume, "config.json")
        if not os.path.isfile(saved):
            raise ValueError(f"--resume {args.resume!r}: no config.json there; is it a training folder?")
        try:
            with open(saved, encoding="utf-8") as f:
                fields = json.load(f)
        except ValueError as e:
            raise ValueError(f"{saved!r} is not a readable config ({check.message(e)})") from None
        if not isinstance(fields, dict):
            raise ValueError(f"{saved!r} is not a readable config (not a JSON object)")
        kind = run_kind(fields)
        if kind is not None and kind != args.what:
            raise ValueError(
                f"--resume {args.resume!r} is a {kind} run, not a {args.what} run; continue it with "
                f"`latentforge train {kind} --resume {args.resume}`"
            )
        check.config_shapes(cls, fields, repr(saved))
        return apply_overrides(from_dict(cls, fields), overrides)
    if addon:
        return addon[1](args.preset, args.config, overrides)
    return resolve_config(args.what, args.preset, args.config, overrides)


def _addon_config(what: str):
    if what == "lora":
        from latentforge.training import lora_train

        return lora_train.LoRATrainConfig, lora_train.resolve
    if what == "embedding":
        from latentforge.training import embedding_train

        return embedding_train.EmbeddingTrainConfig, embedding_train.resolve
    return None


def _train(args, rest: list[str]) -> int:
    overrides = parse_overrides(rest)
    if args.what == "lora":  # --text-encoder / --no-text-encoder: LoRA layers on the text encoders or not
        from latentforge.training.lora_train import cli_overrides

        overrides = cli_overrides(overrides)
    if args.data is not None:
        overrides["data"] = check.utf8("--data", args.data)
    if args.resume is not None:
        check.in_dir("--resume", args.resume, "the folder of a training run")
        from latentforge.training.run_folder import missing_for_resume

        missing = missing_for_resume(args.resume)
        if missing:
            raise ValueError(f"--resume {args.resume!r}: {missing}")
        if args.out is not None and os.path.realpath(args.out) != os.path.realpath(args.resume):
            raise ValueError(
                f"--out {args.out!r} with --resume {args.resume!r}: a resumed run stays in its own folder; "
                "drop --out (or start a new run with --out alone)"
            )
    out = args.resume or args.out
    if out is None and not args.dry_run:
        raise ValueError("give --out DIR for a new run (or --resume DIR to continue one)")
    if out is not None:
        check.out_dir("--resume" if args.resume else "--out", out)
    cfg = _train_config(args, overrides)
    check.train_config(cfg)
    run = _trainer(args.what)
    resume = args.resume is not None
    kw = {"strict": True} if args.strict else {}
    summary = run(cfg, out, resume=resume, dry_run=args.dry_run, progress=not args.quiet, **kw)
    if not args.dry_run and summary:
        _say(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}))
    return 0


def _short_hash(path: str) -> str:
    """A1111's model hash: the first 10 hex digits of the file's SHA-256."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:10]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latentforge", description="latentforge: a latent diffusion engine")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="run a benchmark")
    b.add_argument("what", choices=["samplers"], help="which benchmark")
    b.add_argument("--out", default="out/bench", help="output folder (samplers.json, samplers.png)")
    b.add_argument("--samplers", default="", help="comma-separated subset of sampler names (default: all)")
    b.set_defaults(func=_bench)

    sh = sub.add_parser("shapes", help="the procedural shapes benchmark data")
    shs = sh.add_subparsers(dest="shapes_command", required=True)
    ex = shs.add_parser("export", help="write rendered images, .txt captions and metadata.jsonl to DIR")
    ex.add_argument("dir", metavar="DIR", help="output folder (created if needed)")
    ex.add_argument("--n", type=int, default=1000, help="number of images, >= 1")
    ex.add_argument("--size", type=int, default=64, help="resolution, 32..512")
    ex.add_argument("--seed", type=int, default=0, help="an integer >= 0")
    ex.add_argument("--split", default="train", choices=["train", "validation", "heldout"])
    ex.add_argument(
        "--relation_share",
        type=float,
        default=0.0,
        help="caption this share of the scenes of 2+ objects with a spatial relation (0: the usual mix)",
    )
    ex.add_argument(
        "--background_share",
        type=float,
        default=0.6,
        help="the share of captions that state the background (0.6: the usual mix)",
    )
    ex.add_argument(
        "--labelled_share",
        type=float,
        default=0.0,
        help="caption this share of the scenes in the labelled form, every position stated, as the layout "
        "prompt completion writes prompts (0: the usual mix)",
    )
    ex.set_defaults(func=_shapes)

    g = sub.add_parser("generate", help="text to image from a single-file checkpoint")
    g.add_argument(
        "prompt", nargs="?", default=None, help="the prompt, UTF-8 (a class index such as 207 for DiT)"
    )
    g.add_argument(
        "--model",
        default="default",
        help="single-file checkpoint (.safetensors, .ckpt, .pt), or 'default': latentforge's shapes model",
    )
    g.add_argument("--negative", default=None, help="negative prompt (default: empty)")
    add_completion_flags(
        g,
        "what a shapes prompt leaves unstated is drawn as the training data draws it (image k's from seed "
        "+ k) before the network sees it: 'background' (a colour no object has), 'layout' (every position "
        "too), 'none' (MODEL_CARD.md); the completed prompt is the one saved in the image. Default: the "
        "model's ('layout' for the default model); text to image only",
    )
    g.add_argument(
        "--weighting",
        choices=["a1111", "comfy", "none"],
        default=None,
        help="how (word:1.3) emphasis applies: A1111 (scale, restore the mean), ComfyUI (from the empty "
        "prompt), none (literal text)",
    )
    _generation_flags(g)
    g.add_argument("--batch-size", type=int, default=None, help="images per batch, 1..256 (default 1)")
    g.add_argument(
        "--batch-count", type=int, default=1, help="batches, run one after another; image i: seed + i"
    )
    g.add_argument("--subseed", type=int, default=None, help="A1111's variation seed (image i: subseed + i)")
    g.add_argument(
        "--subseed-strength",
        type=float,
        default=None,
        help="0..1: the noise slerped from the seed's (0) to the variation seed's (1)",
    )
    g.add_argument(
        "--seed-resize-from",
        default=None,
        metavar="WxH",
        help="draw the noise at this size and centre it (A1111's 'resize seed from')",
    )
    g.add_argument(
        "--hires-scale", type=float, default=None, help="hires fix: upscale the first pass by this, 1..8"
    )
    g.add_argument(
        "--hires-size", default=None, metavar="WxH", help="hires fix: upscale to this size instead"
    )
    g.add_argument(
        "--hires-denoise",
        type=float,
        default=None,
        help="hires fix: the second pass's strength (default 0.7)",
    )
    g.add_argument(
        "--hires-steps", type=int, default=None, help="hires fix: second-pass steps (default 0: --steps)"
    )
    g.add_argument(
        "--hires-upscaler",
        default=None,
        help="hires fix: Latent (default), 'Latent (nearest)', 'Latent (bicubic)', ..., Lanczos, Nearest",
    )
    g.add_argument(
        "--hires-sampler", default=None, help="hires fix: the second pass's sampler (default: --sampler)"
    )
    g.add_argument(
        "--rng",
        choices=["cpu", "device"],
        default=None,
        help="where the noise is drawn: cpu (default; a seed gives the same image on any device) or device",
    )
    g.add_argument(
        "--from-image",
        default=None,
        metavar="IMG",
        help="replay the settings stored in IMG (latentforge's or A1111's metadata); flags given win",
    )
    g.add_argument(
        "--name",
        default="{counter:05}-{seed}",
        help="file name pattern: {counter:05}, {seed}, {prompt:40} (its first 40 characters), {steps}, "
        "{sampler}, {cfg}, {width}, {height}, {model}, {date}, {time}, ... (never overwrites: adds -1, -2)",
    )
    g.add_argument("--init-image", default=None, metavar="PATH", help="img2img: the image to start from")
    g.add_argument(
        "--strength",
        type=float,
        default=None,
        help="img2img denoising strength, 0..1: the last ceil(steps*S) steps run (default 0.75)",
    )
    g.add_argument("--mask", default=None, metavar="PATH", help="inpaint: white = repaint, black = keep")
    g.add_argument("--mask-blur", type=int, default=None, help="mask blur in pixels, 0..256 (default 4)")
    g.add_argument(
        "--masked-content",
        choices=["original", "latent_noise", "fill"],
        default=None,
        help="what the masked area starts from: the image, noise, or the mean colour (default: original)",
    )
    g.add_argument(
        "--strict-size",
        action="store_true",
        help="refuse an init image, mask or control image of another size instead of resizing it",
    )
    g.add_argument(
        "--outpaint",
        default=None,
        metavar="L,R,T,B",
        help="outpaint: pixels added left,right,top,bottom (one number: every side); the new border is "
        "inpainted, padding grown to the model's size step (with a warning)",
    )
    g.add_argument(
        "--inpaint-full-res",
        action="store_true",
        help="inpaint only the masked area: the box around the mask is inpainted at --width x --height "
        "(default: the model's size) and pasted back; the output keeps the init image's size",
    )
    g.add_argument(
        "--inpaint-full-res-padding",
        type=int,
        default=None,
        metavar="PX",
        help="pixels of context around the mask for --inpaint-full-res (default 32)",
    )
    g.add_argument(
        "--embeddings-dir",
        default=None,
        metavar="DIR",
        help="folder of textual inversions (.safetensors), named in prompts by file stem or embedding:name",
    )
    g.add_argument(
        "--lora-dir",
        default=None,
        metavar="DIR",
        help="folder where the prompt's A1111 tags <lora:name:w> (or <lora:name:te_w:unet_w>) find "
        "name.safetensors",
    )
    g.add_argument(
        "--lora",
        action="append",
        default=None,
        metavar="FILE[:UNET_W[:TE_W]]",
        help="a LoRA .safetensors file applied with these weights (default 1; TE_W: UNET_W); repeatable",
    )
    g.add_argument("--out", default="outputs", help="folder for the PNG files")
    g.add_argument("--vae", default=None, help="a separate VAE file (needed for DiT)")
    g.add_argument("--t5", default=None, metavar="FILE", help="SD3's T5-XXL file (t5xxl_fp16.safetensors)")
    g.add_argument(
        "--t5-tokenizer",
        default=None,
        metavar="PATH",
        help="the T5 tokenizer.json (or its folder) when it is not beside the T5 file or the checkpoint",
    )
    g.add_argument("--prediction", choices=["eps", "v"], default=None, help="override (SD2 512 base: eps)")
    cli_generate.add_device_flags(g)
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    cli_generate.add_speedup_flags(g)
    cli_generate.add_control_flags(g)
    g.add_argument(
        "--preview-every",
        type=int,
        default=None,
        metavar="N",
        help="a live preview after every N-th step, 0..10000 (0: off)",
    )
    g.add_argument(
        "--preview-dir",
        default=None,
        metavar="DIR",
        help="where previews go, as preview-{image}-{step:03d}.png (default: OUT/previews)",
    )
    g.add_argument(
        "--preview-method",
        choices=["linear", "taesd"],
        default=None,
        help="linear (default): a fast latent->RGB projection; taesd: a tiny TAESD decoder (--taesd, or the "
        "model's own <model>.taesd_decoder.safetensors: the shipped model has one)",
    )
    g.add_argument(
        "--taesd", default=None, metavar="PATH", help="a TAESD decoder (taesd_decoder.safetensors layout)"
    )
    g.add_argument(
        "--decode",
        default=None,
        metavar="LATENTS",
        help="decode latents saved by a run whose decode failed (LATENTS.safetensors) instead of sampling",
    )
    g.set_defaults(
        func=cli_generate.generate, seed=None, batch_size=None
    )  # None: 0, or the --from-image's seed

    ev = sub.add_parser("eval", help="score prompt adherence")
    evs = ev.add_subparsers(dest="eval_command", required=True)
    es = evs.add_parser(
        "shapes", help="the shapes benchmark: score a folder, or generate from a model and score"
    )
    es.add_argument("--images", help="folder of images with .txt captions or metadata.jsonl")
    es.add_argument(
        "--model",
        help="a checkpoint file or 'default' (the shipped model): generate from held-out prompts, then score",
    )
    es.add_argument("--n", type=int, default=500, help="prompts to generate (with --model), >= 1")
    es.add_argument(
        "--split",
        default="heldout",
        choices=["validation", "heldout"],
        help="prompts (with --model): unseen scenes of trained kinds, or compositions never trained on",
    )
    _generation_flags(es)
    es.add_argument(
        "--out", default=None, help="where generated images go (with --model; default: a temp folder)"
    )
    es.add_argument("--size", type=int, default=64, help="resolution the evaluator scores at, 32..512")
    es.add_argument("--json", default=None, help="write the report here (and a failure grid next to it)")
    add_completion_flags(
        es,
        "what each prompt leaves unstated is drawn as the training data draws it before the model sees it "
        "(shapes.complete_prompt: 'background', 'layout', 'none'); images are scored against the prompt as "
        "written. Default: the model's ('layout' for the default model)",
    )
    cli_generate.add_speedup_flags(es)
    es.set_defaults(func=_eval)

    t = sub.add_parser(
        "train",
        help="train a VAE, a denoiser, a LoRA or an embedding (every config field is a flag too: --lr 3e-4)",
        epilog="Every config field is a flag too (--lr 3e-4, --objective.shift 3). List fields take the flag "
        'repeated (--sample-prompts "a red cube" --sample-prompts "a blue ball") or a JSON list '
        '(--unet.channel_mult "[1, 2]"); one value is one element, never split on commas. In a TOML file a '
        "list field is a TOML list; a string there is an error. --overwrite: a new run into a non-empty "
        "folder moves its contents aside into .old-<time>/ there. Folder images with a side below "
        "--min-image-size (default 32) are skipped. train lora: --init_from CHECKPOINT (default: the "
        "shipped model) --rank R --alpha A --modules attn|attn+ff|all-linear[+conv] --text-encoder / "
        "--no-text-encoder; it writes <out>/<output_name>.safetensors in kohya's LoRA layout. train "
        "embedding: --init_from CHECKPOINT --data DIR --token NAME [--vectors N --init-word WORD]; captions "
        "name the token; it writes <out>/<token>.safetensors (A1111's layout).",
    )
    t.add_argument("what", choices=["denoiser", "vae", "lora", "embedding"])
    t.add_argument(
        "--preset",
        default=None,
        help="denoiser: shapes64, shapes-tiny, shapes-tiny-dit, sd15, sdxl-base, sd3-medium; "
        "vae: shapes64-vae, shapes-vae, sd",
    )
    t.add_argument("--config", default=None, help="a TOML file of config fields (applied after the preset)")
    t.add_argument(
        "--data",
        default=None,
        help=f"'shapes' (--resolution 32..512) or a folder of images with captions "
        f"(--resolution {check.TRAIN_RES_MIN}..{check.TRAIN_RES_MAX}); numbers such as --lr must be finite",
    )
    t.add_argument("--out", default=None, help="the run's folder")
    t.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="continue the run in DIR exactly (a broken newest state: the newest intact one, with a warning)",
    )
    t.add_argument(
        "--strict", action="store_true", help="with --resume: a broken newest training state is an error"
    )
    t.add_argument("--dry-run", action="store_true", help="print config, parameters, FLOPs and time per step")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_train, takes_rest=True)

    dm = sub.add_parser(
        "demo",
        help="the main job: a grid of images from the default model and its adherence on held-out prompts",
    )
    dm.add_argument("--model", default="default", help="'default' (the shipped model) or a checkpoint file")
    dm.add_argument("--out", default="out/demo", help="folder for grid.png and the evaluated images")
    dm.add_argument("--n", type=int, default=100, help="held-out prompts to generate and score (0: none)")
    dm.add_argument("--seed", type=int, default=0, help="seed of the first image, >= 0")
    dm.set_defaults(func=_demo)

    sv = sub.add_parser(
        "serve", help="the A1111-compatible HTTP API, latentforge's job queue API and the web page"
    )
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    sv.add_argument("--port", type=int, default=7860, help="port (default 7860, as A1111)")
    sv.add_argument("--models-dir", default=None, help="folder whose .safetensors files clients may name")
    sv.add_argument(
        "--lora-dir", default=None, help="folder of LoRA .safetensors files prompts name as <lora:name:w>"
    )
    sv.add_argument(
        "--embeddings-dir", default=None, help="folder of textual inversions prompts name (embedding:name)"
    )
    sv.add_argument(
        "--controlnet-dir",
        default=None,
        help="folder of ControlNet .safetensors files the units of A1111 clients (sd-webui-controlnet's "
        "alwayson_scripts.controlnet) name by file stem",
    )
    sv.add_argument(
        "--model", default=None, help="the model loaded first, by name (default: the shipped one)"
    )
    sv.add_argument("--outputs", default=None, help="folder for images clients ask to save (save_images)")
    sv.add_argument(
        "--api-key", default=None, help="required on every route when set (or $LATENTFORGE_API_KEY)"
    )
    sv.add_argument("--cors-origin", action="append", default=None, help="an origin allowed by CORS (repeat)")
    sv.add_argument("--max-queue", type=int, default=32, help="jobs that may wait; beyond: HTTP 429")
    sv.add_argument("--max-body", type=int, default=16 * 2**20, help="bytes of a request body; beyond: 413")
    sv.add_argument("--max-pixels", type=int, default=2048 * 2048, help="width × height × batch of one job")
    sv.add_argument("--max-steps", type=int, default=150, help="sampling steps of one job")
    sv.add_argument("--max-batch-count", type=int, default=100, help="batches (A1111's n_iter) of one job")
    sv.add_argument("--batch-jobs", type=int, default=0,
                    help="N > 0: waiting text-to-image jobs that differ only in prompt and seed are sampled "
                    "together, up to N images (faster; images equal alone up to float rounding)")  # fmt: skip
    cli_generate.add_device_flags(sv)
    sv.set_defaults(func=_serve)

    i = sub.add_parser("info", help="list samplers and schedulers, or show an image's generation settings")
    i.add_argument("image", nargs="?", default=None, help="an image: its stored settings, as JSON")
    i.set_defaults(func=_info)

    ts = sub.add_parser(
        "tune-schedule",
        help="choose the σ schedule that minimises a sampler's error on this model (`--scheduler tuned`)",
    )
    ts.add_argument("--model", default="default", help="a checkpoint file or 'default' (the shipped model)")
    ts.add_argument("--steps", type=int, required=True, help="sampling steps, 1..10000")
    ts.add_argument("--sampler", default=None, help="sampler name (default: the model's)")
    ts.add_argument("--prompts", type=int, default=32, help="prompts to tune on, 1..1024 (default 32)")
    ts.add_argument(
        "--prompt-file",
        default=None,
        help="tune on these prompts, one a line (default: the shapes benchmark's training split)",
    )
    ts.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's)")
    ts.add_argument("--seed", type=int, default=0, help="seed of the prompts and start noises, >= 0")
    ts.add_argument("--width", type=int, default=None, help="pixels (default: the model's size)")
    ts.add_argument("--height", type=int, default=None, help="pixels (default: the model's size)")
    ts.add_argument("--max-evals", type=int, default=300, help="schedules tried (each runs the sampler once)")
    ts.add_argument("--reference-steps", type=int, default=256, help="Heun steps of the reference solution")
    ts.add_argument(
        "--shifts",
        action="store_true",
        help="also fit one evaluation shift per step (the network queried at σ_i·e^δ_i; up to --max-evals "
        "more sampler runs); generation applies them",
    )
    ts.add_argument(
        "--coefficients",
        action="store_true",
        help="sampler ipndm: also fit each step's multistep coefficients, by gradient through the network "
        "(tune_solver.py, --iters steps); generation uses them",
    )
    ts.add_argument("--iters", type=int, default=200, help="gradient steps with --coefficients (default 200)")
    ts.add_argument(
        "--out",
        default=None,
        help="the JSON file (default: beside the model, <model>.schedule-<sampler>-<steps>.json)",
    )
    ts.set_defaults(func=_tune_schedule)

    rp = sub.add_parser(
        "reflow-pairs",
        help="(noise, teacher sample) pairs of a model (flow, ε or v), to train a few-step student on",
        description="Write reflow pairs (training/reflow.py) into a folder; then train the student with "
        "`latentforge train denoiser --init_from MODEL --data FOLDER --caption_dropout 0`.",
    )
    rp.add_argument("--model", default="default", help="the teacher: a checkpoint file or 'default'")
    rp.add_argument("--out", required=True, help="the pairs folder (continued if it holds the same recipe)")
    rp.add_argument("--n", type=int, default=20000, help="pairs, >= 1 (default 20000)")
    rp.add_argument("--steps", type=int, default=None, help="the teacher's steps (default: the model's)")
    rp.add_argument(
        "--sampler", default=None, help="the teacher's deterministic sampler (default: the model's, or euler)"
    )
    rp.add_argument("--scheduler", default=None, help="the teacher's schedule (default: the model's)")
    rp.add_argument(
        "--cfg", type=float, default=None, help="guidance baked into the pairs (default: the model's)"
    )
    rp.add_argument("--seed", type=int, default=0, help="seed of the prompts and noises, >= 0")
    rp.add_argument("--batch", type=int, default=32, help="images sampled at once, 1..256")
    rp.set_defaults(func=_reflow_pairs)
    return p


def _reflow_pairs(args) -> int:
    """`latentforge reflow-pairs`: the teacher's (noise, sample) pairs (training/reflow.py)."""
    from tqdm import tqdm

    from latentforge.pipeline import MAX_BATCH, MAX_CFG, MAX_STEPS, Pipeline
    from latentforge.samplers import STOCHASTIC_SAMPLER_NAMES, get_sampler
    from latentforge.training.reflow import make_pairs

    check.int_in("--n", args.n, 1, 10_000_000)
    check.int_in("--seed", args.seed, 0, 2**40)
    check.int_in("--batch", args.batch, 1, MAX_BATCH)
    if args.steps is not None:
        check.int_in("--steps", args.steps, 1, MAX_STEPS)
    if args.cfg is not None:
        check.float_in("--cfg", args.cfg, 0.0, MAX_CFG)
    if args.sampler is not None:
        get_sampler(args.sampler)
    _check_model(args.model)
    pipe = Pipeline.from_single_file(args.model)
    d = pipe.defaults
    steps, cfg = args.steps or d["steps"], d["cfg"] if args.cfg is None else args.cfg
    sampler, scheduler = args.sampler or d["sampler"], args.scheduler or d["scheduler"]
    if args.sampler is None and sampler in STOCHASTIC_SAMPLER_NAMES:
        sampler = "euler"  # the pair must be a function of its noise: the model's ancestral default is not
    with tqdm(total=args.n, unit="pair", desc="reflow pairs") as bar:
        index = make_pairs(pipe, args.out, args.n, steps, cfg, sampler, scheduler, args.seed,
                           batch=args.batch, teacher=args.model, progress=bar.update)  # fmt: skip
    _say(f"wrote {args.n} pairs in {len(index['shards'])} shards to {args.out} "
         f"({steps} steps, {sampler}/{scheduler}, CFG {cfg:g})")  # fmt: skip
    return 0


def _tune_schedule(args) -> int:
    """`latentforge tune-schedule`: a schedule tuned to the model (tune_schedule.py), saved beside it."""
    import numpy as np

    from latentforge.pipeline import MAX_CFG, MAX_SIZE, MAX_STEPS, Pipeline, model_file
    from latentforge.samplers import get_sampler
    from latentforge.shapes import caption, complete_prompts, sample_scene
    from latentforge.tune_schedule import save, schedule_path, tune_pipeline

    check.int_in("--steps", args.steps, 1, MAX_STEPS)
    check.int_in("--prompts", args.prompts, 1, 1024)
    check.int_in("--seed", args.seed, 0, 2**63 - 1)
    check.int_in("--max-evals", args.max_evals, 1)
    check.int_in("--reference-steps", args.reference_steps, 2, MAX_STEPS)
    check.int_in("--iters", args.iters, 1, 100_000)
    check.int_in("--width", args.width, 1, MAX_SIZE)
    check.int_in("--height", args.height, 1, MAX_SIZE)
    if args.cfg is not None:
        check.float_in("--cfg", args.cfg, 0.0, MAX_CFG)
    if args.sampler is not None:
        get_sampler(args.sampler)
    if args.out is not None:
        check.out_file("--out", args.out)
    prompts = None
    if args.prompt_file is not None:
        with open(check.in_file("--prompt-file", args.prompt_file, "a text file"), encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()][: args.prompts]
        if not prompts:
            raise ValueError(f"--prompt-file {args.prompt_file} holds no prompt (one a line)")
    _check_model(args.model)
    pipe = Pipeline.from_single_file(args.model)
    sampler = args.sampler or pipe.defaults["sampler"]
    if args.coefficients and (sampler != "ipndm" or args.steps < 3):
        raise ValueError(
            f"--coefficients tunes sampler ipndm at --steps >= 3, got {sampler!r} at {args.steps}"
        )
    if prompts is None:  # the shapes benchmark's training split: never the prompts it is evaluated on
        rng = np.random.default_rng(args.seed)
        prompts = [caption(sample_scene(rng, split="train"), rng) for _ in range(args.prompts)]
    # as the network will see them: completed as the model's generation defaults say (prompt k from seed + k,
    # as Pipeline.image_prompts draws it)
    seeds = [args.seed + k for k in range(len(prompts))]
    prompts = complete_prompts(prompts, pipe.defaults["complete_prompt"], seeds)
    ref_steps, evals = args.reference_steps, args.max_evals
    w, h = pipe.default_size
    size = (args.width or w, args.height or h)
    (res,), info = tune_pipeline(
        pipe, prompts, sampler, [args.steps], args.seed, args.cfg, ref_steps, evals, size, _say, args.shifts,
        args.coefficients, args.iters,
    )  # fmt: skip
    path = args.out or schedule_path(model_file(args.model), sampler, args.steps)
    save(path, res, model=os.path.basename(model_file(args.model)), **info)
    for name, e in sorted(res.stock.items(), key=lambda kv: kv[1]):
        _say(f"{name:14s} RMSE {e:.4g}")
    _say(f"{'tuned':14s} RMSE {res.rmse:.4g}  σ = {', '.join(f'{v:.4g}' for v in res.sigmas)}")
    if res.shifts:
        _say(f"{'':14s} evaluation shifts δ = {', '.join(f'{v:.4g}' for v in res.shifts)}")
    for i, row in enumerate(res.options.get("coefficients") or []):
        _say(f"{'':14s} step {i + 1} coefficients b = {', '.join(f'{v:.4g}' for v in row)}")
    _say(f"wrote {path} (use it with --scheduler tuned --sampler {sampler} --steps {args.steps})")
    return 0


def _serve(args) -> int:
    from latentforge.server import Settings, serve

    for name in ("port", "max_queue", "max_body", "max_pixels", "max_steps", "max_batch_count"):
        value = getattr(args, name)
        if value < 1 or (name == "port" and value > 65535):
            raise ValueError(
                f"--{name.replace('_', '-')} must be a positive number (port <= 65535), got {value}"
            )
    if args.batch_jobs < 0:
        raise ValueError(f"--batch-jobs must be >= 0 (0: off), got {args.batch_jobs}")
    cli_generate.check_device_flags(args)
    key = args.api_key or os.environ.get("LATENTFORGE_API_KEY") or None
    names = ("host", "port", "models_dir", "outputs", "cors_origin", "max_queue", "max_body", "max_pixels",
             "max_steps", "max_batch_count", "batch_jobs", "model", "lora_dir", "embeddings_dir",
             "controlnet_dir", "dtype", "device", "offload", "channels_last", "compile")  # fmt: skip
    serve(Settings(api_key=key, **{k: getattr(args, k) for k in names}))
    return 0


def _generation_flags(p: argparse.ArgumentParser) -> None:
    # unset: the model's own settings (its file's latentforge.defaults; else 20 steps, euler, normal, cfg 7)
    p.add_argument("--steps", type=int, default=None, help="sampling steps, 1..10000 (default: the model's)")
    p.add_argument(
        "--sampler",
        default=None,
        help="sampler name as in ComfyUI (see `latentforge info`; default: the model's)",
    )
    p.add_argument("--scheduler", default=None, help="scheduler name as in ComfyUI (default: the model's)")
    p.add_argument(
        "--cfg",
        type=float,
        default=None,
        help="classifier-free guidance scale, 0..100, 1 = none (default: the model's)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed >= 0 of the first image; image k: seed + k")
    p.add_argument("--width", type=int, default=None, help="pixels, 1..16384 (default: the model's size)")
    p.add_argument("--height", type=int, default=None, help="pixels, 1..16384 (default: the model's)")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "takes_rest", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = _show_warning
        try:
            return args.func(args, rest) if getattr(args, "takes_rest", False) else args.func(args)
        except check.USER_ERRORS as e:
            print(f"error: {check.message(e)}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
