"""What "doing less work per image" buys and costs on the default model (speedups.py: DeepCache, ToMe).

For each setting, on `Pipeline.default()` at its defaults (20 steps, euler, normal, its CFG, float32):
- speed: wall time per image of a whole `pipe(...)` call (prompt encoding and VAE decode included), at
  batch 1 and at batch 16, the settings run alternately (`--repeats` rounds, the order rotated every
  round, so a load that drifts touches them alike); the speed-up is plain time / setting time within one
  round, reported as the median and interquartile range over the rounds (min, max and the raw seconds in
  the JSON); plus the full UNet passes per image;
- adherence: the shapes evaluator (`latentforge eval shapes --model`, i.e. cli._eval_generate +
  shapes.evaluate.evaluate_folder) on the same `--n` prompts with the same seeds: all-correct rate with
  its Wilson 95% interval, the paired difference from the plain run with Newcombe's interval for paired
  proportions (method 10, built from the two Wilson intervals; Newcombe 1998, Stat. Med. 17:2635), and FSD.
  A setting whose loss is larger than that interval allows (the interval's upper end below 0) is flagged.
Plain runs at fewer steps are included as the price list: a speed-up from caching is worth having when
it beats cutting steps to the same time; each setting is also compared (paired) with the plain run that
does as many full UNet passes.

DiT/MMDiT caching (FORA interval, TeaCache) has no shipped model to score; `--transformer` times the FORA
interval on a random-weight MMDiT (the work skipped does not depend on the weights) and reports no
adherence.

    nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/speedups.py [--n 500] [--repeats 7] \
        [--json out/speedups/speedups.json] [--png out/speedups/speedups.png] [--out /tmp/speedups-eval]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentforge.cli import _eval_generate  # noqa: E402
from latentforge.files import write_json  # noqa: E402
from latentforge.pipeline import Pipeline  # noqa: E402
from latentforge.shapes import caption, sample_scene  # noqa: E402
from latentforge.shapes.evaluate import evaluate_folder  # noqa: E402
from latentforge.shapes.scoring import wilson  # noqa: E402

# name -> Pipeline arguments; "plain" is the reference every other setting is compared with
SETTINGS = {
    "plain": {},
    "deepcache N=2": {"cache_interval": 2},
    "deepcache N=3": {"cache_interval": 3},
    "deepcache N=3 depth 2": {"cache_interval": 3, "cache_depth": 2},
    "tome 0.3 ds≤2": {"tome_ratio": 0.3, "tome_max_downsample": 2},
    "tome 0.5 ds≤2": {"tome_ratio": 0.5, "tome_max_downsample": 2},
    "plain 10 steps": {"steps": 10},
    "plain 7 steps": {"steps": 7},
}


def paired_difference(base: list[bool], other: list[bool]) -> dict:
    """Rate(other) − rate(base) on the same items, with Newcombe's hybrid score interval for paired
    proportions (method 10): from the Wilson intervals (l₁, u₁), (l₂, u₂) of p₁ = base, p₂ = other and the
    phi coefficient φ of the 2×2 table,
        Δ − √((p₂ − l₂)² − 2φ(p₂ − l₂)(u₁ − p₁) + (u₁ − p₁)²) ..
        Δ + √((u₂ − p₂)² − 2φ(u₂ − p₂)(p₁ − l₁) + (p₁ − l₁)²)."""
    b1, b2 = np.asarray(base, bool), np.asarray(other, bool)
    n = len(b1)
    a, b = int((b1 & b2).sum()), int((b1 & ~b2).sum())  # both right; base right, other wrong
    c, d = int((~b1 & b2).sum()), int((~b1 & ~b2).sum())
    p1, p2 = (a + b) / n, (a + c) / n
    (l1, u1), (l2, u2) = wilson(a + b, n), wilson(a + c, n)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / math.sqrt(margins) if margins else 0.0
    delta = p2 - p1
    lo = delta - math.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    hi = delta + math.sqrt(max(0.0, (u2 - p2) ** 2 - 2 * phi * (u2 - p2) * (p1 - l1) + (p1 - l1) ** 2))
    return {"diff": delta, "ci95": [lo, hi], "base_only": b, "other_only": c, "n": n}


def adherence(name: str, kw: dict, args) -> dict:
    """The evaluator on `args.n` prompts of `args.split` for one setting; per-image correctness kept."""
    speed = {k: v for k, v in kw.items() if k != "steps"}
    folder = os.path.join(args.out, name.replace(" ", "_").replace("≤", "le").replace("=", ""))
    ns = argparse.Namespace(model=args.model, out=folder, n=args.n, seed=args.seed, split=args.split,
                            steps=kw.get("steps"), sampler=None, scheduler=None, cfg=None, width=None,
                            height=None, **speed)  # fmt: skip
    t0 = time.perf_counter()
    _eval_generate(ns)
    t_gen = time.perf_counter() - t0
    rep = evaluate_folder(folder, json_path=folder + ".json")
    wrong = {f["file"] for f in rep["failures"]}
    files = sorted(p.name for p in Path(folder).glob("*.png"))
    return {
        "all_correct": rep["all_correct"],
        "all_correct_ci95": rep["all_correct_ci95"],
        "n": rep["n"],
        "fsd": rep.get("fsd"),
        "generate_s_per_image": t_gen / args.n,
        "correct": [f not in wrong for f in files],
    }


def full_passes(pipe: Pipeline, kw: dict) -> int:
    """UNet passes that reach the middle block in one image's sampling."""
    calls: list = []
    hook = pipe.net.middle_block.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        pipe("a red circle", seed=0, progress=False, **kw)
    finally:
        hook.remove()
    return len(calls)


def timing(pipe: Pipeline, repeats: int, batch: int) -> dict:
    """Seconds per image of every setting, run alternately; speed-ups against "plain" of the same round
    (`_ratios`)."""
    rng = np.random.default_rng(0)
    prompts = [caption(sample_scene(rng, split="validation"), rng) for _ in range(batch)]
    names = list(SETTINGS)
    for kw in SETTINGS.values():  # warm-up
        pipe(prompts, batch_size=batch, progress=False, **kw)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            pipe(prompts, batch_size=batch, seed=r * batch, progress=False, **SETTINGS[name])
            times[name].append((time.perf_counter() - t0) / batch)
    return _ratios(times)


def _ratios(times: dict[str, list[float]]) -> dict:
    """Per setting: median seconds, the speed-up plain/setting of each round as median, interquartile
    range and [min, max], and the raw seconds."""
    out = {}
    for name, ts in times.items():
        ratios = [p / t for p, t in zip(times["plain"], ts, strict=True)]
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        out[name] = {"s": statistics.median(ts), "speedup": statistics.median(ratios),
                     "speedup_iqr": [q1, q3], "speedup_range": [min(ratios), max(ratios)],
                     "seconds": ts}  # fmt: skip
    return out


def transformer_speed(repeats: int) -> dict:
    """FORA-interval block caching on a random-weight MMDiT (hidden 256, 4 joint blocks, 32×32 latent
    = 256 tokens, CFG batch 2, 20 euler steps): seconds per sampling run and the speed-up."""
    from latentforge.guidance import CFGDenoiser
    from latentforge.model_sampling import Denoiser, DiscreteFlow
    from latentforge.models.mmdit import MMDiT, MMDiTConfig
    from latentforge.samplers import get_sampler, sigmas_for
    from latentforge.speedups import Speedups

    torch.manual_seed(0)
    cfg = MMDiTConfig(depth=4, in_channels=16, out_channels=16, adm_in_channels=64, context_dim=64,
                      pos_embed_max_size=16, num_patches=256)  # fmt: skip
    net = MMDiT(cfg).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, p[0].numel() ** -0.5 if p.ndim > 1 else 0.02)
    ms = DiscreteFlow(shift=3.0)
    sigmas = sigmas_for("euler", "normal", ms, 20)
    cond = {"y": torch.randn(1, 64), "context": torch.randn(1, 16, 64)}
    uncond = {"y": torch.randn(1, 64), "context": torch.randn(1, 16, 64)}
    model = CFGDenoiser(Denoiser(net, ms), scale=4.0)
    settings = {
        "plain": Speedups(),
        "fora N=2": Speedups(cache_interval=2),
        "fora N=3": Speedups(cache_interval=3),
    }

    def run(opt: Speedups) -> float:
        x = torch.randn(1, 16, 32, 32) * sigmas[0]
        t0 = time.perf_counter()
        with torch.no_grad(), opt.applied(net, ms.timestep(sigmas[sigmas > 0])):
            get_sampler("euler")(model, x, sigmas, extra_args={"cond": cond, "uncond": uncond}, disable=True)
        return time.perf_counter() - t0

    for opt in settings.values():
        run(opt)
    times: dict[str, list[float]] = {n: [] for n in settings}
    names = list(settings)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(run(settings[name]))
    return _ratios(times)


def plot(res: dict, path: str) -> None:
    from latentforge.plot import curve_style, figure, save_figure

    fig = figure(
        (1100, 700), title=f"default model, {res['split']} prompts (n={res['n']}), 20 steps unless named"
    )
    ax = fig.axes[0]
    for k, (name, r) in enumerate(res["settings"].items()):
        s = r["speed_batch16"]
        x, (xlo, xhi) = s["speedup"], s["speedup_iqr"]
        y, (ylo, yhi) = r["all_correct"], r["all_correct_ci95"]
        style = curve_style(k)
        ax.errorbar(
            [x], [100 * y], xerr=[[x - xlo], [xhi - x]], yerr=[[100 * (y - ylo)], [100 * (yhi - y)]],
            fmt=style["marker"], color=style["color"], capsize=3, label=name,
        )  # fmt: skip
    ax.axhline(100 * res["settings"]["plain"]["all_correct"], color="0.6", linewidth=0.8, linestyle="--")
    ax.set_xlabel("speed-up per image, batch of 16 (median and interquartile range over alternating rounds)")
    ax.set_ylabel("all-correct % (Wilson 95%)")
    ax.grid(True, color="0.88")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize="small")
    save_figure(fig, path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--n", type=int, default=500, help="prompts scored per setting (the same for all)")
    p.add_argument("--split", default="validation", choices=["validation", "heldout"])
    p.add_argument("--seed", type=int, default=1_000_000, help="the first prompt's seed (default_model.py's)")
    p.add_argument("--repeats", type=int, default=7, help="alternating timing rounds (>= 5)")
    p.add_argument("--json", default="out/speedups/speedups.json")
    p.add_argument("--png", default="out/speedups/speedups.png")
    p.add_argument("--out", default="/tmp/speedups-eval", help="generated images and evaluator reports")
    p.add_argument("--transformer", action="store_true", help="also time FORA on a random-weight MMDiT")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    pipe = Pipeline.from_single_file(args.model)
    res: dict = {"model": args.model, "n": args.n, "split": args.split, "seed": args.seed,
                 "threads": torch.get_num_threads(), "defaults": pipe.defaults, "settings": {}}  # fmt: skip
    print(f"timing {len(SETTINGS)} settings, {args.repeats} alternating rounds ...", flush=True)
    t1, t16 = timing(pipe, args.repeats, 1), timing(pipe, args.repeats, 16)
    for name, kw in SETTINGS.items():
        r = adherence(name, kw, args)
        r |= {"kwargs": kw, "speed_batch1": t1[name], "speed_batch16": t16[name]}
        r["full_passes"] = full_passes(pipe, kw)
        res["settings"][name] = r
        print(f"  {name}: all-correct {100 * r['all_correct']:.1f}% FSD {r['fsd']:.3f}", flush=True)
    sets = res["settings"]
    # the price list: each setting against plain sampling with as many full passes (fewer steps), paired
    cuts = {r["full_passes"]: n for n, r in sets.items() if n.startswith("plain") and "steps" in r["kwargs"]}
    for name, r in sets.items():
        cut = cuts.get(r["full_passes"])
        if cut is not None and cut != name:
            r["vs_equal_full_passes"] = {"setting": cut} | paired_difference(
                sets[cut]["correct"], r["correct"]
            )
    for r in sets.values():
        r["vs_plain"] = paired_difference(sets["plain"]["correct"], r["correct"])
    for r in sets.values():
        del r["correct"]
    if args.transformer:
        res["transformer"] = transformer_speed(args.repeats)

    def ci(lo, hi, scale=100.0, fmt=".1f"):
        return f"[{scale * lo:{fmt}}, {scale * hi:{fmt}}]"

    print(f"\ndefault model, {args.split} prompts, n={args.n}, seeds from {args.seed}; {res['defaults']}")
    print("speed-ups: median [interquartile range] over the rounds; Δ: paired, Newcombe 95%")
    head = (f"{'setting':<24}{'speed-up b1':>22}{'speed-up b16':>22}{'full':>6}{'all-correct %':>22}"
            f"{'Δ vs plain, pp':>24}{'FSD':>8}")  # fmt: skip
    print(head)
    for name, r in res["settings"].items():
        s1, s16, d = r["speed_batch1"], r["speed_batch16"], r["vs_plain"]
        flag = " costs adherence" if d["ci95"][1] < 0 else ""
        print(
            f"{name:<24}{s1['speedup']:>7.2f}x {ci(*s1['speedup_iqr'], 1, '.2f'):>14}"
            f"{s16['speedup']:>7.2f}x {ci(*s16['speedup_iqr'], 1, '.2f'):>14}{r['full_passes']:>6}"
            f"{100 * r['all_correct']:>8.1f} {ci(*r['all_correct_ci95']):>13}"
            f"{100 * d['diff']:>+8.1f} {ci(*d['ci95']):>15}{r['fsd']:>8.3f}{flag}"
        )
    print("\nagainst plain sampling with as many full passes (Δ all-correct, pp, paired, Newcombe 95%):")
    for name, r in res["settings"].items():
        v = r.get("vs_equal_full_passes")
        if v is not None:
            speed = r["speed_batch1"]["speedup"] / res["settings"][v["setting"]]["speed_batch1"]["speedup"]
            print(f"  {name:<24} vs {v['setting']:<16} {100 * v['diff']:+.1f} {ci(*v['ci95'])}"
                  f"  time {1 / speed:.2f}x the plain run's")  # fmt: skip
    if args.transformer:
        print("\nrandom-weight MMDiT (speed only):")
        for name, r in res["transformer"].items():
            print(f"  {name:<10} {r['s']:.3f} s  {r['speedup']:.2f}x {ci(*r['speedup_iqr'], 1, '.2f')} (IQR)")
    write_json(args.json, res)
    plot(res, args.png)
    print(f"wrote {args.json} and {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
