"""The default model's numbers for MODEL_CARD.md: adherence tables, speed and memory.

- adherence: the evaluator's all-correct rate (Wilson 95% intervals) by object count, per attribute, the
  FSD, on the validation split (unseen scenes of trained kinds) and the held-out split (compositions never
  trained on), at 20 steps on `--n` prompts and at 8 and 4 steps on `--n-small` prompts, with the model's
  default sampler and guidance;
  prompt completion as the model's defaults say ("layout" for the default model; `--complete-prompt none`
  for the network's own tables);
- speed (2 CPU cores, float32): load time, one 64×64 image at 20 steps (VAE decode included), a batch of 16
  per image, and the process's peak resident memory.

    .venv/bin/python benchmarks/default_model.py [--model default] [--n 900] [--n-small 300] \
        [--json latentforge/data/shapes64.json] [--out /tmp/shapes64-eval]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentforge.cli import _eval_generate  # noqa: E402
from latentforge.files import write_json  # noqa: E402
from latentforge.pipeline import Pipeline, model_file  # noqa: E402
from latentforge.shapes.evaluate import evaluate_folder  # noqa: E402

ATTRS = ("shape", "color", "size", "position", "relation", "background")


def _pct(r: dict) -> str:
    if not r or r.get("rate") is None:
        return "–"
    lo, hi = r["ci95"]
    return f"{100 * r['rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] (n={r['n']})"


def adherence(
    model: str, split: str, steps: int, n: int, seed: int, out: str, complete: str | None = None
) -> dict:
    ns = argparse.Namespace(
        model=model,
        out=os.path.join(out, f"{split}-{steps}"),
        n=n,
        seed=seed,
        split=split,
        steps=steps,
        sampler=None,
        scheduler=None,
        cfg=None,
        width=None,
        height=None,
        complete_prompt=complete,  # None: the model's default ("layout" for the default model)
    )
    t0 = time.perf_counter()
    folder = _eval_generate(ns)
    t_gen = time.perf_counter() - t0
    rep = evaluate_folder(folder, json_path=os.path.join(out, f"{split}-{steps}.json"))
    keep = (
        "all_correct",
        "all_correct_ci95",
        "n",
        "by_objects",
        "attributes",
        "counting",
        "counting_prompts",
        "no_extra_objects",
        "background_took_object_colour",
        "shape_ambiguous",
        "decided",
        "all_correct_decided",
        "fsd",
    )
    res = {k: rep[k] for k in keep if k in rep}
    res["generate_s"] = t_gen
    res["complete_prompt"] = ns.complete_prompt  # as _eval_generate resolved it
    return res


def speed(model: str) -> dict:
    t0 = time.perf_counter()
    pipe = Pipeline.from_single_file(model)
    t_load = time.perf_counter() - t0
    prompt = "a big red circle in the upper left corner on a black background"
    pipe(prompt, steps=2, progress=False)  # warm-up
    singles = []
    for k in range(3):
        t0 = time.perf_counter()
        pipe(prompt, seed=k, progress=False)
        singles.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    pipe(prompt, batch_size=16, progress=False)
    t16 = time.perf_counter() - t0
    return {
        "threads": torch.get_num_threads(),
        "load_s": t_load,
        "one_image_s": min(singles),
        "batch16_per_image_s": t16 / 16,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "defaults": pipe.defaults,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--n", type=int, default=900, help="prompts per split at 20 steps (~300 per object count)")
    p.add_argument("--n-small", type=int, default=300, help="prompts per split at 8 and 4 steps")
    p.add_argument("--seed", type=int, default=1_000_000)
    p.add_argument("--json", default=None, help="write the numbers here")
    p.add_argument("--out", default="/tmp/shapes64-eval", help="generated images and per-run reports")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument(
        "--complete-prompt",
        choices=("none", "background", "layout"),
        default=None,
        help="prompt completion (default: the model's; the network's own tables: none)",
    )
    args = p.parse_args()
    model = model_file(args.model)
    os.makedirs(args.out, exist_ok=True)
    res: dict = {"model": os.path.basename(model)}
    if not args.skip_speed:
        res["speed"] = speed(model)
        s = res["speed"]
        print(
            f"load {s['load_s']:.2f} s; one image {s['one_image_s']:.3f} s; batch of 16 "
            f"{s['batch16_per_image_s']:.3f} s/image; peak RSS {s['peak_rss_mib']:.0f} MiB",
            flush=True,
        )
    for split in ("validation", "heldout"):
        res[split] = {}
        for steps, n in ((20, args.n), (8, args.n_small), (4, args.n_small)):
            if n <= 0:
                continue
            r = adherence(model, split, steps, n, args.seed, args.out, args.complete_prompt)
            res[split][str(steps)] = r
            by = r["by_objects"]
            overall = {"rate": r["all_correct"], "ci95": r["all_correct_ci95"], "n": r["n"]}
            cells = " | ".join(_pct(by.get(str(k))) for k in (1, 2, 3))
            print(
                f"{split} {steps} steps: all {_pct(overall)}"
                f" | by objects {cells} | FSD {r.get('fsd', float('nan')):.3f} ({r['generate_s']:.0f} s)",
                flush=True,
            )
            if steps == 20:
                print(
                    "   "
                    + "; ".join(f"{a} {_pct(r['attributes'].get(a))}" for a in ATTRS)
                    + f"; counting {_pct(r['counting'])}",
                    flush=True,
                )
    if args.json:
        write_json(args.json, res)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
