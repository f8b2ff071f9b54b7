"""Turn a `train denoiser --preset shapes64` run's checkpoint into the shipped default model.

    python scripts/ship_default_model.py RUN/checkpoints/last.safetensors \
        --dtype float16 --cfg 4 --sampler euler --scheduler normal --steps 20

Copies every tensor (cast to --dtype: float16 halves the file; MODEL_CARD.md reports the evaluator's numbers
for both) and the trainer's metadata, adds `latentforge.defaults` (the generation settings `generate`,
`demo` and `Pipeline.default()` use where the caller gives none) and `latentforge.latent_rgb` (the linear
preview's latent->RGB factors, fit by least squares on the shipped VAE: previews.fit_linear on 64 rendered
training scenes) and writes latentforge/data/shapes64.safetensors atomically (or --out).

`--vae FILE` swaps in a VAE from `train vae` (bare LDM keys), e.g. one whose decoder alone was fine-tuned
(`--train_part decoder`); its latent format must be the checkpoint's, or the denoiser's latents would mean
something else, so any other is refused.

`--average FILE [FILE ...]` ships the uniform average of the checkpoint's and the files' denoiser and text
tower weights (a "uniform soup": Wortsman et al. 2022, "Model soups", ICML, §2-3: fine-tunes of one
starting point averaged weight by weight, in float32 before the cast), e.g. a fine-tune averaged with the
model it started from; the VAE stays the checkpoint's. All must have the same keys and shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from latentforge.checkpoint_io import read_metadata, read_state_dict, save_state_dict  # noqa: E402
from latentforge.pipeline import DEFAULT_MODEL, Pipeline  # noqa: E402
from latentforge.previews import fit_linear, shapes_images  # noqa: E402
from latentforge.samplers import get_sampler  # noqa: E402
from latentforge.schedules import SCHEDULERS  # noqa: E402
from latentforge.shapes.captions import PROMPT_COMPLETIONS  # noqa: E402

FORMAT = "latentforge.latent_format"


def swap_vae(sd: dict, meta: dict, path: str, dtype: torch.dtype) -> None:
    """Replace sd's `first_stage_model.*` tensors by the VAE file's (same keys, shapes and latent format)."""
    theirs, ours = read_metadata(path).get(FORMAT), meta.get(FORMAT)
    if theirs != ours:
        raise SystemExit(
            f"{path}: latent format {theirs} differs from the checkpoint's {ours}; only a VAE with the same "
            "latents can be swapped in"
        )
    vae = {"first_stage_model." + k: v for k, v in read_state_dict(path).items()}
    ours = {k for k in sd if k.startswith("first_stage_model.")}
    if set(vae) != ours or any(vae[k].shape != sd[k].shape for k in ours):
        raise SystemExit(f"{path}: its keys or shapes are not the checkpoint's VAE's")
    sd.update({k: v.to(dtype) for k, v in vae.items()})


SOUP = ("model.diffusion_model.", "cond_stage_model.")


def average_with(sd: dict, paths: list[str]) -> int:
    """sd's denoiser and text tower tensors <- the mean of sd's and the files' (float32); -> how many."""
    keys = [k for k in sd if k.startswith(SOUP) and sd[k].is_floating_point()]
    total = {k: sd[k].float() for k in keys}
    for path in paths:
        theirs = read_state_dict(path)
        if set(theirs) != set(sd) or any(theirs[k].shape != sd[k].shape for k in sd):
            raise SystemExit(
                f"{path}: its keys or shapes are not the checkpoint's; only one model's fine-tunes average"
            )
        for k in keys:
            total[k] += theirs[k].float()
    for k in keys:
        sd[k] = total[k] / (1 + len(paths))
    return len(keys)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="the run's checkpoints/last.safetensors (EMA weights)")
    p.add_argument("--out", default=DEFAULT_MODEL)
    p.add_argument("--dtype", choices=["float32", "float16"], default="float16")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", default="normal")
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument(
        "--complete-prompt",
        choices=PROMPT_COMPLETIONS,
        default="none",
        help="the prompt completion to store as a default (Pipeline: shapes.complete_prompt; MODEL_CARD.md)",
    )
    p.add_argument("--vae", default=None, help="a VAE file to ship in place of the checkpoint's")
    p.add_argument(
        "--average", nargs="+", default=None, help="files whose denoiser and text tower to average with"
    )
    args = p.parse_args()
    get_sampler(args.sampler)
    if args.scheduler not in SCHEDULERS:
        raise SystemExit(f"unknown scheduler {args.scheduler!r}; known: {sorted(SCHEDULERS)}")
    dtype = {"float32": torch.float32, "float16": torch.float16}[args.dtype]
    sd = read_state_dict(args.checkpoint)
    if args.average:
        average_with(sd, args.average)
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    meta = dict(read_metadata(args.checkpoint))
    if args.vae:
        swap_vae(sd, meta, args.vae, dtype)
    defaults = {"steps": args.steps, "sampler": args.sampler, "scheduler": args.scheduler, "cfg": args.cfg}
    if args.complete_prompt != "none":
        defaults["complete_prompt"] = args.complete_prompt
    meta["latentforge.defaults"] = json.dumps(defaults)
    meta["latentforge.name"] = "shapes64"
    save_state_dict(sd, args.out, metadata=meta)
    # the preview factors are fit on the VAE as shipped (cast to --dtype, loaded as Pipeline.default() loads
    # it), on 64 deterministic training scenes, then written into the same file's metadata
    rgb = fit_linear(Pipeline.from_single_file(args.out).vae, shapes_images(64, seed=0, split="train"))
    meta["latentforge.latent_rgb"] = rgb.to_json()
    save_state_dict(sd, args.out, metadata=meta)
    Pipeline.from_single_file(args.out)  # loads strictly, or this raises
    print(
        f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB, {args.dtype}, defaults {defaults}, "
        f"latent_rgb {meta['latentforge.latent_rgb']})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
