"""What img2img and inpainting cost against text-to-image (issue 12's performance targets).

- img2img at strength s runs the last ⌈steps·s⌉ steps of the schedule, so it should cost s × the
  text-to-image time (target: (time / s) / txt2img time within ±10%); the fixed costs (prompt encoding, the
  VAE encode of the init image) are included, since a user pays them.
- inpainting (an ordinary checkpoint: re-noise and blend the known region at every σ, img2img.InpaintDenoiser)
  against img2img at the same strength, per step (target: ≤ 5% overhead). A step's time is the median of
  the gaps between consecutive step callbacks, so the one-off costs (mask blur, encodes) are not in it.

The default model (`Pipeline.default()`, 64×64, its own sampler and CFG), batch 1, float32, on the CPU
unless --device says otherwise. The variants are run interleaved, `--repeat` rounds, and medians reported,
so a load that drifts (another job on the machine) touches them alike.

    .venv/bin/python benchmarks/img2img.py [--steps 40] [--repeat 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentforge.pipeline import Pipeline  # noqa: E402

PROMPT = "a red circle above a blue square"
STRENGTHS = (0.25, 0.5, 0.75)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(pipe: Pipeline, steps: int, **kw) -> tuple[float, list[float]]:
    """(seconds for `sample`, the gaps between consecutive step callbacks)."""
    stamps: list[float] = []

    def tick(_):
        _sync(pipe.device)
        stamps.append(time.perf_counter())

    _sync(pipe.device)
    t0 = time.perf_counter()
    pipe.sample(PROMPT, steps=steps, seed=1, progress=False, callback=tick, **kw)
    _sync(pipe.device)
    return time.perf_counter() - t0, list(np.diff(stamps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    pipe = Pipeline.default().to(args.device)
    w, h = pipe.default_size
    # the init image: a text-to-image sample of the model itself (what img2img is mostly used on)
    init = pipe(PROMPT, steps=20, seed=7, progress=False)[0]
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[h // 4 : 3 * h // 4, w // 2 :] = 255  # the right half of the middle band: 25% of the picture
    mask = Image.fromarray(mask, "L")
    variants = {"txt2img": {}}
    for s in STRENGTHS:
        variants[f"img2img {s}"] = {"init_image": init, "strength": s}
    variants["inpaint 0.75"] = {"init_image": init, "strength": 0.75, "mask": mask}
    run(pipe, 4, **variants["inpaint 0.75"])  # warm-up: allocations, first-call costs
    times: dict[str, list[float]] = {k: [] for k in variants}
    gaps: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeat):
        for name, kw in variants.items():
            t, g = run(pipe, args.steps, **kw)
            times[name].append(t)
            gaps[name] += g
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    step = {k: statistics.median(v) for k, v in gaps.items()}

    d = pipe.defaults
    print(
        f"default model {w}x{h}, {args.steps} steps, {d['sampler']}, cfg {d['cfg']:g}, batch 1, "
        f"{args.device}, torch threads {torch.get_num_threads()}, {args.repeat} rounds: median (min)"
    )
    t2i = med["txt2img"]
    print(
        f"txt2img                {t2i * 1e3:8.1f} ({best['txt2img'] * 1e3:.1f}) ms   "
        f"step {step['txt2img'] * 1e3:6.2f} ms"
    )
    for s in STRENGTHS:
        name = f"img2img {s}"
        ratio, ratio_min = med[name] / (s * t2i), best[name] / (s * best["txt2img"])
        ok = "ok" if abs(ratio - 1) <= 0.10 else "OUT OF ±10%"
        print(
            f"{name:<22} {med[name] * 1e3:8.1f} ({best[name] * 1e3:.1f}) ms   "
            f"step {step[name] * 1e3:6.2f} ms   "
            f"(time / s) / txt2img = {ratio:.3f} ({ratio_min:.3f})  {ok}"
        )
    over = step["inpaint 0.75"] / step["img2img 0.75"] - 1
    ok = "ok" if over <= 0.05 else "OVER 5%"
    name = "inpaint 0.75"
    print(
        f"{name:<22} {med[name] * 1e3:8.1f} ({best[name] * 1e3:.1f}) ms   "
        f"step {step[name] * 1e3:6.2f} ms   per-step overhead vs img2img 0.75: {100 * over:+.1f}%  {ok}"
    )
    # the wrapper's own work, alone: what InpaintDenoiser adds to one step beyond the CFG denoiser call
    wrapper = _wrapper_cost(pipe, w, h, args.repeat * 200)
    print(
        f"InpaintDenoiser's own work per step (re-noise + 2 blends, timed alone): {wrapper * 1e6:.1f} µs = "
        f"{100 * wrapper / step['img2img 0.75']:.2f}% of an img2img step"
    )


def _wrapper_cost(pipe: Pipeline, w: int, h: int, n: int) -> float:
    """Seconds per call of InpaintDenoiser around a denoiser that costs nothing (returns x)."""
    from latentforge.img2img import InpaintDenoiser

    f, c = pipe.downscale, pipe.latent_channels
    shape = (1, c, h // f, w // f)
    z, noise, x = (torch.randn(shape, device=pipe.device) for _ in range(3))
    m = (torch.rand(1, 1, *shape[2:], device=pipe.device) > 0.5).float()

    class Free:
        model_sampling = pipe.model_sampling

        def __call__(self, x, sigma, **kw):
            return x

    wrapped, bare, sigma = (
        InpaintDenoiser(Free(), m, z, noise),
        Free(),
        torch.tensor([3.0], device=pipe.device),
    )
    out = []
    for model in (wrapped, bare):
        model(x, sigma)
        _sync(pipe.device)
        t0 = time.perf_counter()
        for _ in range(n):
            model(x, sigma)
        _sync(pipe.device)
        out.append((time.perf_counter() - t0) / n)
    return out[0] - out[1]


if __name__ == "__main__":
    main()
