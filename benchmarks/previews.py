"""The cost of live previews: the default model with and without a linear preview after every step.

Issue 12's target: previews every step (linear projection) add <= 2% to a generation. Both variants run the
same job (same prompt, seed, steps; VAE decode included), interleaved A/B/A/B so a busy machine slows both
alike; the figure is the ratio of the medians. Because that end-to-end ratio is noisy on a shared machine,
the preview alone (x̂₀ -> VAE space -> 4x3 projection -> ×4 nearest -> PIL, `Previewer.__call__`) is also
timed in isolation and set against the time of one step, which is the same overhead measured directly.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/previews.py [--steps 20] [--batch 1] [--repeat 9]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentforge import previews  # noqa: E402
from latentforge.pipeline import Pipeline  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeat", type=int, default=9, help="runs of each variant (median)")
    args = p.parse_args()

    pipe = Pipeline.default()
    previews.latent_rgb(pipe)  # the factors (from the file, or fit once) before any timing
    job = dict(prompt="a red cube left of a blue ball", steps=args.steps, seed=0, batch_size=args.batch)
    got: list = []

    def run(every: int) -> float:
        kw = {"preview_every": every, "on_preview": lambda s, ims: got.append(ims)} if every else {}
        t0 = time.perf_counter()
        pipe(**job, progress=False, **kw)
        return time.perf_counter() - t0

    run(0), run(1)  # warm-up: allocator, first-call paths
    plain, with_preview = [], []
    for _ in range(args.repeat):
        plain.append(run(0))
        with_preview.append(run(1))
    assert len(got) == (args.repeat + 1) * args.steps  # one preview per step, as asked
    a, b = statistics.median(plain), statistics.median(with_preview)

    # the preview alone, on an x̂₀ of the job's shape
    previewer = previews.Previewer("linear").prepare(pipe)
    x0 = torch.randn(args.batch, pipe.latent_channels, 16, 16)
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        previewer(pipe, x0)
    per_preview = (time.perf_counter() - t0) / n

    print(f"default model, {args.steps} steps, batch {args.batch}, {torch.get_num_threads()} thread(s)")
    runs = lambda ts: ", ".join(f"{t * 1e3:.0f}" for t in ts)
    print(f"  without previews:  median {a * 1e3:.1f} ms  (runs {runs(plain)})")
    print(f"  preview each step: median {b * 1e3:.1f} ms  (runs {runs(with_preview)})")
    print(f"  end-to-end overhead: {100 * (b / a - 1):+.2f}%")
    print(
        f"  one preview: {per_preview * 1e6:.0f} us; {args.steps} of them: "
        f"{100 * per_preview * args.steps / a:.2f}% of a generation (target <= 2%)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
