"""Shapes evaluator: throughput (images/s) and accuracy on clean, wrongly-prompted and degraded renders.

- detect: ``detect(image)`` on in-memory 64x64 renders, one process;
- evaluate: ``evaluate(images, captions, reference=False)`` (parse + detect + score + report);
- folder: ``evaluate_folder`` on an exported folder (PNG decoding included, no FSD reference renders);
- detect x2 procs: ``detect`` in a 2-process pool (the 2-core figure);
- accuracy: all-correct rate of held-out renders against their true captions, the rate at which one-attribute
  perturbed prompts are flagged, and the all-correct rate under each degradation (``degrade``).

    .venv/bin/python benchmarks/shapes_eval.py [--n 4000] [--size 64] [--procs 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from latentforge.shapes import export, render, sample_scene, satisfies
from latentforge.shapes.captions import describe
from latentforge.shapes.detection import detect
from latentforge.shapes.evaluate import evaluate, evaluate_folder
from latentforge.shapes.scoring import wilson

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from shapes_degrade import DEGRADATIONS, degrade, perturb  # noqa: E402  (test helpers, not the package)


def _detect_chunk(images):
    return [detect(im) for im in images]


def _pct(k, n):
    lo, hi = wilson(k, n)
    return f"{100 * k / n:6.2f}%  [{100 * lo:.2f}, {100 * hi:.2f}]  n={n}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--procs", type=int, default=2)
    args = ap.parse_args()
    n, size = args.n, args.size
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, split="heldout") for _ in range(n)]
    described = [describe(s, rng) for s in scenes]
    texts, specs = [d[0] for d in described], [d[1] for d in described]
    images = [render(s, size) for s in scenes]
    detect(images[0])  # warm the template cache

    t = time.perf_counter()
    dets = [detect(im) for im in images]
    print(f"detect            {n / (time.perf_counter() - t):8.0f} images/s")
    t = time.perf_counter()
    evaluate(images, texts, reference=False)
    print(f"evaluate          {n / (time.perf_counter() - t):8.0f} images/s")
    with tempfile.TemporaryDirectory() as d:
        m = min(n, 2000)
        export(d, m, size=size, seed=0, split="heldout")
        t = time.perf_counter()
        evaluate_folder(d, reference=False)
        print(f"folder            {m / (time.perf_counter() - t):8.0f} images/s  (PNG decode included)")
    if args.procs > 1:
        chunks = [images[i :: args.procs] for i in range(args.procs)]
        with ProcessPoolExecutor(args.procs) as ex:
            list(ex.map(_detect_chunk, [c[:50] for c in chunks]))  # start + warm the workers
            t = time.perf_counter()
            list(ex.map(_detect_chunk, chunks))
            print(f"detect x{args.procs} procs    {n / (time.perf_counter() - t):8.0f} images/s")

    ok = sum(satisfies(d, sp) for d, sp in zip(dets, specs, strict=True))
    print(f"\nclean held-out     {_pct(ok, n)}")
    prng = np.random.default_rng(1)
    flagged = total = 0
    for scene, spec, det in zip(scenes, specs, dets, strict=True):
        wrong = perturb(spec, prng)
        if wrong is None or satisfies(scene, wrong):
            continue
        total += 1
        flagged += not satisfies(det, wrong)
    print(f"perturbed flagged  {_pct(flagged, total)}")
    for k, kind in enumerate((*DEGRADATIONS, "all")):
        drng = np.random.default_rng(100 + k)
        ok = sum(satisfies(detect(degrade(im, kind, drng)), sp) for im, sp in zip(images, specs, strict=True))
        print(f"{kind:<18} {_pct(ok, n)}")


if __name__ == "__main__":
    main()
