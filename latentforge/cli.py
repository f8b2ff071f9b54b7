"""The `latentforge` command: one entry point, sub-commands per job."""

from __future__ import annotations

import argparse
import json
import sys


def _bench(args) -> int:
    if args.what != "samplers":
        print(f"unknown benchmark {args.what!r}; available: samplers", file=sys.stderr)
        return 2
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


def _info(args) -> int:
    from latentforge.samplers import SAMPLER_NAMES
    from latentforge.schedules import SCHEDULERS

    print(json.dumps({"samplers": SAMPLER_NAMES, "schedulers": list(SCHEDULERS)}, indent=1))
    return 0


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

    i = sub.add_parser("info", help="list samplers and schedulers")
    i.set_defaults(func=_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
