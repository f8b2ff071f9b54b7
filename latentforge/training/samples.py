"""What the trainers make at a sample step: image grids, and for the denoiser on shapes data the shapes
evaluator's score on held-out prompts with its chance level."""

from __future__ import annotations

import os

import numpy as np


def denoiser_samples(cfg, pipe, path: str) -> dict | None:
    """A grid of the fixed prompts at `path` and, with shapes data, the evaluator's score on `eval_n`
    held-out prompts (returned, for metrics.jsonl)."""
    save_grid(generate(cfg, pipe, sample_prompts(cfg), seed=0), path)
    if cfg.data == "shapes" and cfg.eval_n > 0:
        return shapes_eval(cfg, pipe)
    return None


def sample_prompts(cfg) -> list[str]:
    if cfg.sample_prompts:
        return list(cfg.sample_prompts)
    if cfg.data != "shapes":
        return ["a photograph", ""]
    from latentforge.shapes import caption, sample_scene

    rng = np.random.default_rng(1234)
    return [caption(sample_scene(rng, split="validation"), rng) for _ in range(8)]


def generate(cfg, pipe, prompts: list[str], seed: int, chunk: int = 32):
    images = []
    for s in range(0, len(prompts), chunk):
        part = prompts[s : s + chunk]
        images += pipe(
            part,
            steps=cfg.sample_steps,
            sampler=cfg.sample_sampler,
            scheduler=cfg.sample_scheduler,
            cfg=cfg.sample_cfg,
            seed=seed + s,
            batch_size=len(part),
            progress=False,
        )
    return images


def shapes_eval(cfg, pipe) -> dict:
    from latentforge.shapes import caption, sample_scene
    from latentforge.shapes.evaluate import evaluate

    rng = np.random.default_rng(4321)
    prompts = [caption(sample_scene(rng, split="heldout"), rng) for _ in range(cfg.eval_n)]
    images = [np.asarray(im) for im in generate(cfg, pipe, prompts, seed=10_000)]
    rep = evaluate(images, prompts, reference=False)
    attrs = {k: v["rate"] for k, v in rep["attributes"].items()}
    # chance level for these very images: each scored against another image's prompt (a cyclic shift, so no
    # image keeps its own); adherence to the prompt is the margin over it
    chance = evaluate(images, prompts[1:] + prompts[:1], reference=False)
    return {
        "eval_all_correct": rep["all_correct"],
        "eval_n": rep["n"],
        "eval_attributes": attrs,
        "eval_chance_attributes": {k: v["rate"] for k, v in chance["attributes"].items()},
    }


def save_grid(images, path: str, cols: int = 8, scale: int = 2) -> None:
    """PIL images in rows of `cols` on white, every pixel repeated `scale` times (nearest), as a PNG."""
    from PIL import Image

    from latentforge.plot import save_png

    w, h = images[0].size
    rows = -(-len(images) // cols)
    grid = Image.new("RGB", (min(cols, len(images)) * w, rows * h), "white")
    for k, im in enumerate(images):
        grid.paste(im, ((k % cols) * w, (k // cols) * h))
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_png(grid, path)
