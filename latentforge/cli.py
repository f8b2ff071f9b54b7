"""The `latentforge` command: one entry point, sub-commands per job."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _bench(args) -> int:
    from latentforge.bench import bench_samplers, format_table

    names = args.samplers.split(",") if args.samplers else None
    if names:
        from latentforge.samplers import get_sampler

        for n in names:
            get_sampler(n)  # clear error with the closest valid name
    report = bench_samplers(args.out, names=names)
    print(format_table(report))
    print(f"wrote {args.out}/samplers.json and {args.out}/samplers.png")
    return 0


def _shapes(args) -> int:
    from latentforge.shapes import export

    out = export(args.dir, n=args.n, size=args.size, seed=args.seed, split=args.split)
    print(f"wrote {args.n} images with captions and metadata.jsonl to {out}")
    return 0


def _eval_generate(args) -> str:
    """One image per held-out shapes prompt from the model; returns the folder (images + metadata)."""
    import tempfile

    import numpy as np

    from latentforge.pipeline import Pipeline
    from latentforge.shapes import caption, sample_scene

    out = args.out or tempfile.mkdtemp(prefix="latentforge-eval-")
    os.makedirs(out, exist_ok=True)
    pipe = Pipeline.from_single_file(args.model)
    print(f"loaded {args.model}: {pipe.detection}")
    rng = np.random.default_rng(args.seed)
    prompts = [caption(sample_scene(rng, split="heldout"), rng) for _ in range(args.n)]
    lines = []
    for k, prompt in enumerate(prompts):
        (img,) = pipe(prompt, steps=args.steps, sampler=args.sampler, scheduler=args.scheduler, cfg=args.cfg,
                      seed=args.seed + k, width=args.width, height=args.height, progress=False)  # fmt: skip
        name = f"{k:06d}.png"
        tmp = os.path.join(out, f".{name}.tmp.png")
        img.save(tmp)
        os.replace(tmp, os.path.join(out, name))
        lines.append(json.dumps({"file_name": name, "text": prompt}))
    tmp = os.path.join(out, ".metadata.jsonl.tmp")
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, os.path.join(out, "metadata.jsonl"))
    return out


def _eval(args) -> int:
    from latentforge.shapes.evaluate import evaluate_folder
    from latentforge.shapes.report import format_report

    if (args.images is None) == (args.model is None):
        print("error: give exactly one of --images DIR or --model PATH", file=sys.stderr)
        return 2
    folder = args.images if args.images is not None else _eval_generate(args)
    if not os.path.isdir(folder):
        print(f"error: --images {folder!r} is not a folder", file=sys.stderr)
        return 2
    report = evaluate_folder(folder, json_path=args.json, size=args.size)
    print(format_report(report))
    if args.json:
        print(f"wrote {args.json}")
    return 0


def _info(args) -> int:
    from latentforge.samplers import SAMPLER_NAMES
    from latentforge.schedules import SCHEDULERS

    print(json.dumps({"samplers": SAMPLER_NAMES, "schedulers": list(SCHEDULERS)}, indent=1))
    return 0


def _generate(args) -> int:
    import os

    import torch

    from latentforge.pipeline import Pipeline, infotext, save_png

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    try:
        pipe = Pipeline.from_single_file(
            args.model, dtype=dtypes[args.dtype], vae=args.vae, prediction=args.prediction
        )
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    if args.device:
        pipe.to(args.device)
    images = pipe(
        args.prompt,
        negative_prompt=args.negative,
        steps=args.steps,
        sampler=args.sampler,
        scheduler=args.scheduler,
        cfg=args.cfg,
        seed=args.seed,
        width=args.width,
        height=args.height,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    os.makedirs(args.out, exist_ok=True)
    model_hash = _short_hash(args.model)
    for k, image in enumerate(images):
        text = infotext(
            args.prompt,
            args.negative,
            {
                "Steps": args.steps,
                "Sampler": args.sampler,
                "Schedule type": args.scheduler,
                "CFG scale": args.cfg,
                "Seed": args.seed + k,
                "Size": f"{image.width}x{image.height}",
                "Model hash": model_hash,
                "Model": os.path.splitext(os.path.basename(args.model))[0],
                "Version": f"latentforge {__import__('latentforge').__version__}",
            },
        )
        print(save_png(image, args.out, text, args.seed + k))
    return 0


def parse_overrides(rest: list[str]) -> dict[str, str]:
    """["--max-steps", "200", "--objective.prediction=v", "--compile"] -> {"max_steps": "200",
    "objective.prediction": "v", "compile": "true"}: any config field as a flag (typed by the config)."""
    out: dict[str, str] = {}
    i = 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ValueError(
                f"unexpected argument {arg!r}; options look like --field value or --table.field=value"
            )
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(rest) and not rest[i + 1].startswith("--"):
                value = rest[i + 1]
                i += 1
            else:
                value = "true"
        out[key.replace("-", "_")] = value
        i += 1
    return out


def _train(args, rest: list[str]) -> int:
    import os

    from latentforge.training.config import DenoiserTrainConfig, VAETrainConfig, apply_overrides, from_dict
    from latentforge.training.config import resolve as resolve_config

    overrides = parse_overrides(rest)
    if args.data is not None:
        overrides["data"] = args.data
    out = args.resume or args.out
    if out is None and not args.dry_run:
        raise ValueError("give --out DIR for a new run (or --resume DIR to continue one)")
    saved = os.path.join(args.resume, "config.json") if args.resume else None
    if args.resume and args.preset is None and args.config is None:
        if not os.path.isfile(saved):
            raise ValueError(f"--resume {args.resume!r}: no config.json there; is it a training folder?")
        with open(saved, encoding="utf-8") as f:
            fields = json.load(f)
        cls = DenoiserTrainConfig if args.what == "denoiser" else VAETrainConfig
        cfg = apply_overrides(from_dict(cls, fields), overrides)
    else:
        cfg = resolve_config(args.what, args.preset, args.config, overrides)
    if args.what == "denoiser":
        from latentforge.training.trainer import train_denoiser as run
    else:
        from latentforge.training.vae_trainer import train_vae as run
    summary = run(cfg, out, resume=args.resume is not None, dry_run=args.dry_run, progress=not args.quiet)
    if not args.dry_run and summary:
        print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}))
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
    ex.add_argument("dir")
    ex.add_argument("--n", type=int, default=1000, help="number of images")
    ex.add_argument("--size", type=int, default=64, help="resolution, 32..512")
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--split", default="train", choices=["train", "validation", "heldout"])
    ex.set_defaults(func=_shapes)

    g = sub.add_parser("generate", help="text to image from a single-file checkpoint")
    g.add_argument("prompt", help="the prompt (a class index such as 207 for DiT)")
    g.add_argument("--model", required=True, help="single-file checkpoint (.safetensors, .ckpt, .pt)")
    g.add_argument("--negative", default="", help="negative prompt (default: empty)")
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--sampler", default="euler", help="sampler name as in ComfyUI (see `latentforge info`)")
    g.add_argument("--scheduler", default="normal", help="scheduler name as in ComfyUI")
    g.add_argument("--cfg", type=float, default=7.0, help="classifier-free guidance scale (1 = none)")
    g.add_argument("--seed", type=int, default=0, help="seed of the first image; image k uses seed + k")
    g.add_argument("--width", type=int, default=None, help="pixels (default: the model's native size)")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=1)
    g.add_argument("--out", default="outputs", help="folder for the PNG files")
    g.add_argument("--vae", default=None, help="a separate VAE file (needed for DiT)")
    g.add_argument("--prediction", choices=["eps", "v"], default=None, help="override (SD2 512 base: eps)")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    g.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=_generate)

    ev = sub.add_parser("eval", help="score prompt adherence")
    evs = ev.add_subparsers(dest="eval_command", required=True)
    es = evs.add_parser(
        "shapes", help="the shapes benchmark: score a folder, or generate from a model and score"
    )
    es.add_argument("--images", help="folder of images with .txt captions or metadata.jsonl")
    es.add_argument("--model", help="a checkpoint: generate from held-out prompts, then score")
    es.add_argument("--n", type=int, default=500, help="prompts to generate (with --model)")
    es.add_argument("--steps", type=int, default=20)
    es.add_argument("--sampler", default="dpmpp_2m")
    es.add_argument("--scheduler", default="karras")
    es.add_argument("--cfg", type=float, default=5.0)
    es.add_argument("--seed", type=int, default=0)
    es.add_argument(
        "--out", default=None, help="where generated images go (with --model; default: a temp folder)"
    )
    es.add_argument("--width", type=int, default=None, help="generation width (default: the model's)")
    es.add_argument("--height", type=int, default=None, help="generation height (default: the model's)")
    es.add_argument("--size", type=int, default=64, help="resolution the evaluator scores at")
    es.add_argument("--json", default=None, help="write the report here (and a failure grid next to it)")
    es.set_defaults(func=_eval)

    t = sub.add_parser(
        "train",
        help="train a VAE or a denoiser (every config field is a flag too: --lr 3e-4, --objective.shift 3)",
    )
    t.add_argument("what", choices=["denoiser", "vae"])
    t.add_argument(
        "--preset",
        default=None,
        help="denoiser: shapes-tiny, shapes-tiny-dit, sd15, sdxl-base, sd3-medium; vae: shapes-vae, sd",
    )
    t.add_argument("--config", default=None, help="a TOML file of config fields (applied after the preset)")
    t.add_argument("--data", default=None, help="'shapes' or a folder of images with captions")
    t.add_argument("--out", default=None, help="the run's folder")
    t.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR exactly")
    t.add_argument("--dry-run", action="store_true", help="print config, parameters, FLOPs and time per step")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_train, takes_rest=True)

    i = sub.add_parser("info", help="list samplers and schedulers")
    i.set_defaults(func=_info)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "takes_rest", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args, rest) if getattr(args, "takes_rest", False) else args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
