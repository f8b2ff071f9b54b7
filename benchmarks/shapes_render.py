"""Shapes benchmark data throughput, in images per second.

- render: ``render(scene, size)`` alone, scenes sampled beforehand (coverage masks cached after warm-up);
- sample+caption+render: one full stream sample (``latentforge.shapes.data.sample``), single process;
- dataset: ``ShapesDataset`` through a DataLoader (float tensors in [-1, 1], batched), 0 and N workers.

    .venv/bin/python benchmarks/shapes_render.py [--size 64] [--n 20000] [--workers 2] [--batch 256]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from latentforge.shapes import ShapesDataset, collate, render, sample_scene
from latentforge.shapes.data import sample


def rate(fn, n: int) -> float:
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(1)
    size, n = args.size, args.n

    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(n)]
    for s in scenes[:2000]:  # warm the coverage cache
        render(s, size)

    def render_all():
        for s in scenes:
            render(s, size)

    def full():
        for i in range(n):
            sample(0, "train", i, size)

    def loader(workers):
        def go():
            ds = ShapesDataset(size=size, seed=0, length=n)
            dl = torch.utils.data.DataLoader(
                ds, batch_size=args.batch, num_workers=workers, collate_fn=collate, persistent_workers=False
            )
            k = 0
            for imgs, _, _ in dl:
                k += len(imgs)
            assert k == n

        return go

    print(f"shapes data throughput at {size}x{size}, {n} images")
    print(f"  render only (1 process):            {rate(render_all, n):9.0f} images/s")
    print(f"  sample+caption+render (1 process):  {rate(full, n):9.0f} images/s")
    print(f"  ShapesDataset, DataLoader 0 workers: {rate(loader(0), n):9.0f} images/s")
    if args.workers > 0:
        w = args.workers
        print(f"  ShapesDataset, DataLoader {w} workers: {rate(loader(w), n):9.0f} images/s (incl. start-up)")


if __name__ == "__main__":
    main()
