"""Turn a reflowed student of the default model (`train denoiser --data PAIRS`) into the few-step model.

    python scripts/ship_fast_model.py RUN/checkpoints/last.safetensors --dtype float16 \
        --steps 4 --sampler euler --scheduler sgm_uniform --cfg 1

Keeps only the denoiser (`model.diffusion_model.*`, cast to --dtype): the student shares the default model's
VAE and text encoder (trained with `--train_text_encoder false`), so `--model default-fast` is the default
model with this UNet put in place (`Pipeline.load_denoiser`). Adds `latentforge.defaults` (the few-step
settings) and the student's model sampling (a rectified flow, also for an ε teacher), and writes
latentforge/data/shapes64-fast.safetensors atomically (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from latentforge.checkpoint_io import read_metadata, read_state_dict, save_state_dict  # noqa: E402
from latentforge.pipeline import FAST_MODEL, Pipeline  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="the student run's checkpoints/last.safetensors (EMA weights)")
    p.add_argument("--out", default=FAST_MODEL)
    p.add_argument(
        "--model", default="default", help="the model it must load into (default: the shipped one)"
    )
    p.add_argument("--dtype", choices=["float32", "float16"], default="float16")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", default="sgm_uniform")
    p.add_argument("--cfg", type=float, default=1.0)
    args = p.parse_args()
    prefix = "model.diffusion_model."
    sd = {
        k: v.to(getattr(torch, args.dtype))
        for k, v in read_state_dict(args.checkpoint).items()
        if k.startswith(prefix)
    }
    if not sd:
        raise SystemExit(f"{args.checkpoint}: no {prefix}* keys")
    defaults = {"steps": args.steps, "sampler": args.sampler, "scheduler": args.scheduler, "cfg": args.cfg}
    meta = {"latentforge.defaults": json.dumps(defaults)}
    # the student's own model sampling (a rectified flow, whatever its teacher's): load_denoiser takes it
    ms = read_metadata(args.checkpoint).get("latentforge.model_sampling")
    if ms is not None:
        meta["latentforge.model_sampling"] = ms
    tmp = args.out + ".tmp.safetensors"
    save_state_dict(sd, tmp, metadata=meta)
    Pipeline.from_single_file(args.model).load_denoiser(tmp)  # it must load strictly into that model
    os.replace(tmp, args.out)
    size = os.path.getsize(args.out) / 2**20
    print(f"wrote {args.out}: {len(sd)} tensors, {size:.1f} MiB, defaults {defaults}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
