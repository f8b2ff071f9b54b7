"""Where the 2-hour recipe's training step goes: one real stage-B step taken apart.

The shipped recipe's stage B (scripts/train_default_2h.sh: the UNet and its text tower, batch 64 of cached
16×16×4 latents, ε + Min-SNR-5, AdamW, EMA) took 0.46-0.59 s a step in the training loop. This benchmark
builds the run's task from its `config.json` (the same cache, data and init weights) and times each part of
the step the way `loop.run` takes it, per step:

    data          next(loader): a batch of cached moments and captions (num_workers = --workers)
    tokenise+glue the text encoding's part outside the text tower (tokeniser, padding mask, context)
    text fwd      the CLIP text tower's forward (forward hooks on it)
    unet fwd      the UNet's forward (forward hooks)
    loss+draws    the rest of the micro-step: caption dropout, σ, the posterior and noise draws, the loss
    backward      loss.backward() through the UNet and the text tower
    clip          clip_grad_norm_ over every trained parameter
    adamw         optimizer.step() and zero_grad(set_to_none=True)
    ema           the EMA's update
    (sum)         the parts' sum, against the step's wall time

and then runs `loop.run` itself for the same number of steps on the same config (into a temporary
folder, no checkpoint, no samples) so that its own steps per second can be set against the parts' sum.
Medians over --steps steps after --warmup steps; the CPU time per step (`time.process_time`, all threads
of this process: about 2× the wall on 2 busy cores) shows whether the cores were kept busy. Figures, and
what they led to (all cache shards open, no loader worker: 0.592 -> 0.482 s a step): benchmarks/README.md.

    .venv/bin/python benchmarks/recipe_step.py --config RUN/unet-eps-minsnrB/config.json
        [--steps 30] [--warmup 5] [--workers 0 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import statistics
import tempfile
import time

import torch

from latentforge.training import dist, loop
from latentforge.training.config import DenoiserTrainConfig, from_dict
from latentforge.training.ema import EMA
from latentforge.training.feed import data_loader
from latentforge.training.trainer import DenoiserTask

PARTS = ("data", "tokenise+glue", "text fwd", "unet fwd", "loss+draws", "backward", "clip", "adamw", "ema")


class Timer:
    """Seconds per named part of the current step; forward hooks add a module's forward time."""

    def __init__(self):
        self.now: dict[str, float] = collections.defaultdict(float)
        self._t0: dict[int, float] = {}

    def hook(self, module: torch.nn.Module, name: str) -> None:
        def pre(m, args):
            self._t0[id(m)] = time.perf_counter()

        def post(m, args, out):
            self.now[name] += time.perf_counter() - self._t0.pop(id(m))

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    @staticmethod
    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t


def task_for(cfg: DenoiserTrainConfig, out: str) -> DenoiserTask:
    return DenoiserTask(cfg, dist.init("cpu"), out)


def parts_per_step(cfg: DenoiserTrainConfig, steps: int, warmup: int) -> dict:
    """The step of `loop.run` taken part by part (the same calls in the same order), `warmup` + `steps`
    steps; returns each part's median seconds, the wall and CPU seconds per step."""
    with tempfile.TemporaryDirectory() as out:
        task = task_for(cfg, out)
        model, timer = task.model, Timer()
        timer.hook(model, "model fwd")  # TextToImage.forward: the text encoding, then the UNet
        timer.hook(model.parts[cfg.net], "unet fwd")
        for m in model.encoders().values():
            timer.hook(m, "text fwd")
        optimizer, ema = task.optimizer(), EMA(model, decay=cfg.ema_decay)
        loader = iter(data_loader(cfg, task.dataset, 0, task.world))
        params = list(task.clip_parameters())

        def backward(loss):
            _, s = Timer.timed(lambda: loss.backward())
            timer.now["backward"] += s

        rows, walls, cpus = collections.defaultdict(list), [], []
        for step in range(warmup + steps):
            timer.now.clear()
            t, c = time.perf_counter(), time.process_time()
            batch, timer.now["data"] = Timer.timed(lambda: next(loader))
            mb = loop.MicroBatch(batch, step, step, task.units(), backward)
            _, micro = Timer.timed(lambda mb=mb: task.micro_step(mb))
            _, timer.now["clip"] = Timer.timed(lambda: torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            _, timer.now["adamw"] = Timer.timed(
                lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True))
            )
            _, timer.now["ema"] = Timer.timed(lambda: ema.update(model))
            wall, cpu = time.perf_counter() - t, time.process_time() - c
            n = timer.now
            n["tokenise+glue"] = n["model fwd"] - n["unet fwd"] - n["text fwd"]
            n["loss+draws"] = micro - n["model fwd"] - n["backward"]
            if step >= warmup:
                for k in PARTS:
                    rows[k].append(n[k])
                walls.append(wall)
                cpus.append(cpu)
    med = {k: statistics.median(v) for k, v in rows.items()}
    return {"parts": med, "sum": sum(med.values()), "wall": statistics.median(walls),
            "cpu": statistics.median(cpus)}  # fmt: skip


def loop_per_step(cfg: DenoiserTrainConfig, steps: int, warmup: int) -> dict:
    """`loop.run` itself for `warmup` + `steps` steps, a metrics line each: the wall seconds per step of
    the last `steps` (from the lines' times) and the CPU seconds per step over the whole call."""
    with tempfile.TemporaryDirectory() as out:
        cfg = dataclasses.replace(cfg, log_every=1)
        task = task_for(cfg, out)
        c = time.process_time()
        loop.run(task, out, progress=False, stop_after=warmup + steps)
        cpu = (time.process_time() - c) / (warmup + steps)
        with open(f"{out}/metrics.jsonl") as f:
            times = {r["step"]: r["time"] for r in map(json.loads, f) if "time" in r}
    return {"wall": (times[warmup + steps] - times[warmup]) / steps, "cpu": cpu}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--config", required=True, help="a stage-B run's config.json (its cache and data are used)"
    )
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 0])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    with open(args.config) as f:
        base = from_dict(DenoiserTrainConfig, json.load(f))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{args.steps} steps after {args.warmup} of warm-up"
    )
    results = []
    for w in args.workers:
        cfg = dataclasses.replace(
            base, num_workers=w, max_steps=10**6, checkpoint_every=10**6, sample_every=0
        )
        parts = parts_per_step(cfg, args.steps, args.warmup)
        whole = loop_per_step(cfg, args.steps, args.warmup)
        results.append({"num_workers": w, **parts, "loop": whole})
        print(f"\nnum_workers {w}: seconds per step (median)")
        for k in PARTS:
            v = parts["parts"][k]
            print(f"  {k:14s} {v:7.4f}  {100 * v / parts['wall']:5.1f}%")
        print(f"  {'(sum)':14s} {parts['sum']:7.4f}   wall {parts['wall']:.4f}, CPU {parts['cpu']:.4f}")
        print(f"  loop.run: {whole['wall']:.4f} s a step (CPU {whole['cpu']:.4f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "steps": args.steps, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
