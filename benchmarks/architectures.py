"""Issue 10's "choose the architecture by measurement": UNet vs DiT vs MMDiT at equal compute.

Three denoisers of the same forward FLOPs (presets `shapes64`, `shapes64-dit`, `shapes64-mmdit`; about 0.27
GFLOP per 16×16×4 latent at batch 1, latentforge/training/presets.py), differing in the network and in how
the text reaches it:

- unet: the default model's SD1-layout UNet; cross-attention to the text tokens at its 8×8 and 4×4 levels;
- dit: a DiT (adaLN-Zero) on 2×2 patches; cross-attention in every block, and the pooled EOS state added to
  the timestep embedding (the adaLN path);
- mmdit: SD3's MMDiT; the text tokens join the image tokens in one attention per block, each stream with its
  own weights, and the pooled state enters through its y_embedder.

Everything else is shared: the shipped VAE (frozen, f = 4), a fresh 3-layer CLIP text tower trained jointly,
rectified flow with logit-normal t, batch 64, lr 8e-4 held constant after the warm-up, EMA 0.998, caption
dropout 0.1, the same seed, so the same batches and noise. With `--data FOLDER` (e.g. `latentforge shapes
export --n 30000 --seed 13`) and `--cache-dir`, the three read the same exported scenes and their cached
latents instead of rendering and encoding every batch (a third of a UNet step).

The method is benchmarks/latent_vs_pixel.py's, whose functions this reuses: each model trains for `--minutes`
of the trainer's own step-loop time (stopped and continued with --resume: a later call with a larger
`--minutes` extends the same runs), its EMA exports are kept at `--points` evenly spaced times, each is
scored by `latentforge eval shapes` on `--n` validation prompts (20 euler steps, CFG 3, seed 1,000,000), the
training cost at each point is counted in FLOPs (the trainer's dry run, text tower included) and wall time,
and the compute each model needs to reach the highest level both of a pair reach is compared (all correct,
and the background and colour rates, which move early). The training loss, averaged over windows of 50
steps, is compared too: the runs share the seed, hence the batches and the noise, so it ranks the networks
on the same targets before any of them follows prompts. Sampling cost per image of the final models
(batch 1 and 16, VAE decode included; kept in <work>/sampling.json) closes it.

    nice -n 10 .venv/bin/python benchmarks/architectures.py [--minutes 30] [--n 150] [--points 4] \\
        [--data /work/runs/shapes64-train4 --cache-dir /work/runs/unet7-cache] \\
        [--work /tmp/architectures] [--json out/architectures.json] [--png out/architectures.png]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import latent_vs_pixel as lvp  # noqa: E402

from latentforge.files import write_json  # noqa: E402

PRESETS = {"unet": "shapes64", "dit": "shapes64-dit", "mmdit": "shapes64-mmdit"}
PAIRS = (("dit", "unet"), ("mmdit", "unet"), ("mmdit", "dit"))
WINDOW = 50  # steps per training-loss average


def loss_curve(folder: str, gflop: float) -> list[dict]:
    """The training loss averaged over windows of WINDOW steps, with the TFLOP spent at each window's end.
    The three runs share the seed, so the same batches and noise: their losses at equal steps compare the
    networks on the same flow-matching targets (a signal long before prompts are followed)."""
    recs = [r for r in lvp.read_metrics(os.path.join(folder, "run", "metrics.jsonl")) if "loss" in r]
    by_step = {r["step"]: r["loss"] for r in recs}  # a resumed run's repeated steps: the last record
    out = []
    for start in range(1, max(by_step, default=0) + 1, WINDOW):
        steps = [s for s in range(start, start + WINDOW) if s in by_step]
        if len(steps) == WINDOW:
            out.append({"steps": [start, start + WINDOW - 1], "tflop": (start + WINDOW - 1) * gflop / 1e3,
                        "loss": sum(by_step[s] for s in steps) / WINDOW})  # fmt: skip
    return out


def cached_sampling_cost(work: str, finals: dict[str, str], threads: int, repeats: int) -> dict:
    """lvp.sampling_cost, kept in <work>/sampling.json for the same final exports, threads and repeats."""
    path = os.path.join(work, "sampling.json")
    key = {"finals": finals, "threads": threads, "repeats": repeats}
    if os.path.exists(path):
        saved = json.loads(Path(path).read_text())
        if saved.get("key") == key:
            return saved["sampling"]
    sampling = lvp.sampling_cost(finals, threads, repeats)
    write_json(path, {"key": key, "sampling": sampling})
    return sampling


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=30.0, help="training wall time per model")
    p.add_argument("--work", default="/tmp/architectures", help="run folders, evaluations (outside the repo)")
    p.add_argument("--n", type=int, default=150, help="validation prompts per evaluation")
    p.add_argument("--points", type=int, default=4, help="evaluation points per model (and the last export)")
    p.add_argument("--checkpoint-every", type=int, default=10, help="steps between the trainers' exports")
    p.add_argument("--data", default="shapes", help="'shapes' (rendered on the fly) or an exported folder")
    p.add_argument(
        "--cache-dir", default=None, help="with a folder: its cached latents (shared by the three)"
    )
    p.add_argument("--seed", type=int, default=0, help="training seed, every model")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads everywhere")
    p.add_argument("--repeats", type=int, default=5, help="rounds of the sampling-cost measurement")
    p.add_argument("--json", default=None)
    p.add_argument("--png", default=None)
    args = p.parse_args()
    if args.data != "shapes" and not os.path.isdir(args.data):
        raise SystemExit(f"--data {args.data!r}: expected 'shapes' or an exported folder of scenes")
    os.makedirs(args.work, exist_ok=True)
    vae = lvp.extract_vae(args.work)
    extra = []
    if args.data != "shapes":
        extra = ["--cache_latents", "true"] + (["--cache_dir", args.cache_dir] if args.cache_dir else [])
    folders = {m: os.path.join(args.work, m) for m in PRESETS}

    def flags(m: str, checkpoint_every: int) -> list[str]:
        return lvp.train_flags(PRESETS[m], vae, args.seed, checkpoint_every, args.data, extra)

    dry = {m: lvp.dry_run(flags(m, 1), folders[m], args.threads) for m in PRESETS}
    for m, d in dry.items():
        print(f"{m}: {d['parameters']}; {d['gflop_per_step']:.2f} GFLOP per step; "
              f"{d['seconds_per_step']:.2f} s per step in the dry run", flush=True)  # fmt: skip
    every_s = args.minutes * 60 / args.points
    for m in PRESETS:
        saved = os.path.join(folders[m], "run", "config.json")  # a started run keeps its interval
        ce = json.loads(Path(saved).read_text())["checkpoint_every"] if os.path.exists(saved) else None
        lvp.train(m, flags(m, ce or args.checkpoint_every), args, folders[m], every_s)

    curves = {m: lvp.curve(m, folders[m], dry[m]["gflop_per_step"], args.n, args.threads) for m in PRESETS}
    equal = {
        f"{a}/{b}": {
            metric: lvp.equal_adherence(curves, metric, a, b) for metric in ("all_correct", *lvp.EASY)
        }
        for a, b in PAIRS
    }
    for pair, rows in equal.items():
        for e in rows.values():
            print(f"equal adherence {pair}, " + lvp.describe(e), flush=True)
    finals = {m: lvp.checkpoints(folders[m])[-1][1] for m in PRESETS if curves[m]}
    losses = {m: loss_curve(folders[m], dry[m]["gflop_per_step"]) for m in PRESETS}
    for i in range(min(len(v) for v in losses.values())):
        row = ", ".join(f"{m} {losses[m][i]['loss']:.4f}" for m in PRESETS)
        print(f"training loss, steps {losses['unet'][i]['steps']}: {row}", flush=True)
    full = len(finals) == len(PRESETS)
    sampling = cached_sampling_cost(args.work, finals, args.threads, args.repeats) if full else None
    if sampling:
        for m in PRESETS:
            s = sampling[m]
            print(f"sampling {m}: {s['batch1_median_s']:.3f} s per image at batch 1, "
                  f"{s['batch16_per_image_median_s']:.3f} s at batch 16, "
                  f"{s['gflop_per_image']:.2f} GFLOP per image", flush=True)  # fmt: skip
        for a, b in PAIRS:
            sampling[f"ratio_{a}_over_{b}"] = lvp.cost_ratio(sampling, a, b)
    res = {
        "settings": {
            "minutes": args.minutes,
            "n": args.n,
            "points": args.points,
            "data": args.data,
            "cache_dir": args.cache_dir,
            "seed": args.seed,
            "threads": args.threads,
            "lr_schedule": "constant",
            "eval": " ".join([*lvp.EVAL, "--seed", str(lvp.EVAL_SEED)]),
            "sampling": lvp.SAMPLE,
            "presets": PRESETS,
            "work": args.work,
        },
        "dry_run": dry,
        "curves": curves,
        "training_loss": losses,
        "equal_adherence": equal,
        "sampling": sampling,
    }
    if args.json:
        write_json(args.json, res)
        print(f"wrote {args.json}")
    if args.png and all(curves.values()):
        title = "UNet vs DiT vs MMDiT at equal forward FLOPs: adherence vs training cost"
        lvp.save_plot(curves, args.png, PRESETS, title)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
