"""Reflow: a rectified-flow few-step student of a text-to-image model (Liu, Gong & Liu 2022, "Flow Straight
and Fast", §2.3, Algorithm 1, "k-rectified flow"; with guidance baked in as in InstaFlow, Liu et al. 2023,
§3).

A rectified-flow model's ODE dx/dσ = v(x, σ) is sampled from σ = 1 (noise ε) to 0. Its paths bend, so a few
Euler steps miss where many land. Reflow couples each noise with the teacher's own answer and trains on the
straight lines between them:

1. **Pairs** (``make_pairs``): for prompts drawn from the shapes grammar and the pipeline's per-seed noise ε
   [B, C, h, w], the teacher's sample z = ODE_teacher(ε | prompt) with classifier-free guidance at ``cfg``,
   in the denoiser's latent space (before the VAE). Guidance is in the pairs, so the student runs at CFG 1:
   one network call per step instead of two.
2. **Training** (``train denoiser --data PAIRS``, the trainer's own flow-matching loss):
   x_σ = (1 − σ)·z + σ·ε, target v = ε − z (Liu et al. 2022, Eq. 1, with the coupling (ε, z) in place of
   independent draws). The student starts from the teacher; caption dropout must be 0 (a pair belongs to
   its prompt).

The teacher need not be a flow model. Any deterministic sampler of an ε- or v-prediction model (SD1's
1000-step table) is a map from the same unit noise ε (scaled by its σ_max to start) to a sample z, so it
gives a coupling (ε, z) just the same; the student learns the straight lines between them as a rectified
flow, whatever the teacher's parameterisation, and ships with its own model sampling in its file's metadata
(``Pipeline.load_denoiser`` takes it).

The pairs live in a folder: ``pairs.json`` (the recipe and the shard list) and shards
``pairs-00000.safetensors`` (``noise`` and ``latent`` [n, C, h, w] float32; the prompts and seeds in the
metadata), each written atomically, so an interrupted ``make_pairs`` continues where it stopped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

INDEX = "pairs.json"


def is_pairs_folder(path) -> bool:
    return os.path.isfile(os.path.join(str(path), INDEX))


def shapes_prompts(n: int, seed: int, split: str = "train") -> list[str]:
    """``n`` captions of random scenes of ``split`` (``shapes.sample_scene`` + ``captions.caption``),
    deterministic in ``seed``."""
    from latentforge.shapes import caption, sample_scene

    rng = np.random.default_rng([seed, 0x5EF10])
    return [caption(sample_scene(rng, split=split), rng) for _ in range(n)]


def make_pairs(
    pipe,
    out,
    n: int,
    steps: int,
    cfg: float,
    sampler: str = "euler",
    scheduler: str = "normal",
    seed: int = 0,
    shard: int = 1000,
    batch: int = 32,
    teacher: str = "",
    progress=None,
) -> dict:
    """Write ``n`` (noise, teacher sample) pairs for shapes prompts into the folder ``out`` (see the module
    docstring); shards already there and matching the recipe are kept (whatever ``n`` made them: pair i
    depends only on the seed and i, so a set can be extended or cut short at a shard's end). Returns the
    index."""
    from safetensors.torch import save_file

    from latentforge.files import atomic_path, write_text
    from latentforge.noise import variation_noise
    from latentforge.samplers import STOCHASTIC_SAMPLER_NAMES

    if n < 1 or shard < 1 or batch < 1:
        raise ValueError(f"n, shard and batch must be positive, got {n}, {shard}, {batch}")
    if sampler in STOCHASTIC_SAMPLER_NAMES:
        raise ValueError(
            f"reflow needs a deterministic sampler (the pair holds only the start noise); {sampler!r} adds "
            "noise at every step: give e.g. euler, heun, dpmpp_2m, uni_pc or ipndm"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = {"teacher": teacher, "steps": steps, "cfg": cfg, "sampler": sampler, "scheduler": scheduler,
              "seed": seed, "n": n, "shard": shard}  # fmt: skip
    index_path = out / INDEX
    if index_path.is_file():
        old = json.loads(index_path.read_text())
        # n may change: pair i depends only on (seed, i), so a longer or shorter set shares its first shards
        if {**old["recipe"], "n": n} != recipe:
            raise ValueError(
                f"{out} holds pairs of another recipe ({old['recipe']}); give a new folder for {recipe}"
            )
    prompts = shapes_prompts(n, seed)
    w, h = pipe.default_size
    f, c = pipe.downscale, pipe.latent_channels
    shards = [f"pairs-{k:05d}.safetensors" for k in range((n + shard - 1) // shard)]
    index = {"recipe": recipe, "shards": shards, "latent_shape": [c, h // f, w // f], "resolution": [w, h]}
    write_text(index_path, json.dumps({**index, "complete": False}, indent=2) + "\n")
    for s0 in range(0, n, shard):
        name = shards[s0 // shard]
        if (out / name).is_file():
            continue
        noises, latents = [], []
        for b0 in range(s0, min(n, s0 + shard), batch):
            idx = list(range(b0, min(n, s0 + shard, b0 + batch)))
            seeds = [seed * 1_000_003 + i for i in idx]
            noises.append(variation_noise((len(idx), c, h // f, w // f), seeds, None, 0.0, None, "cpu"))
            latents.append(
                pipe.sample([prompts[i] for i in idx], steps=steps, sampler=sampler, scheduler=scheduler,
                            cfg=cfg, seed=seeds, batch_size=len(idx), progress=False).float().cpu()
            )  # fmt: skip
            if progress is not None:
                progress(len(idx))
        meta = {"prompts": json.dumps(prompts[s0 : s0 + shard]), "first": str(s0)}
        with atomic_path(out / name) as tmp:
            save_file({"noise": torch.cat(noises), "latent": torch.cat(latents)}, str(tmp), metadata=meta)
    index["complete"] = True
    write_text(index_path, json.dumps(index, indent=2) + "\n")
    return index


class PairsTrain(torch.utils.data.Dataset):
    """A pairs folder as training data: items ``{"latent", "noise", "caption"}``, fed by epochs of shuffled
    global batches of G items (drop_last), the order a pure function of (seed, epoch)."""

    def __init__(self, folder, G: int, seed: int):
        from safetensors import safe_open

        folder = Path(folder)
        index = json.loads((folder / INDEX).read_text())
        if not index.get("complete"):
            raise ValueError(
                f"{folder}: the pairs are not all written yet (run reflow-pairs again to finish)"
            )
        noise, latent, self.captions = [], [], []
        for name in index["shards"]:
            path = folder / name
            if not path.is_file():
                raise FileNotFoundError(f"{path} is listed in {folder / INDEX} but missing")
            with safe_open(str(path), "pt") as fh:
                noise.append(fh.get_tensor("noise"))
                latent.append(fh.get_tensor("latent"))
                self.captions += json.loads(fh.metadata()["prompts"])
        self.noise, self.latent = torch.cat(noise), torch.cat(latent)
        self.index, self.G, self.seed = index, int(G), int(seed)
        self.per_epoch = len(self.captions) // self.G
        if self.per_epoch == 0:
            raise ValueError(f"{folder}: {len(self.captions)} pairs, fewer than one global batch of {G}")
        self._epoch, self._perm = -1, None

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict:
        return {"latent": self.latent[i], "noise": self.noise[i], "caption": self.captions[i]}

    def global_batch(self, m: int, G: int) -> list[int]:
        epoch, k = divmod(m, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(len(self.captions), generator=gen).tolist()
        return self._perm[k * G : (k + 1) * G]
