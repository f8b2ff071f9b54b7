"""Data feeding by global micro-batch, shared by both trainers.

Global micro-batch m (m = step·grad_accum + a) holds the dataset items `dataset.global_batch(m, G)` with
G = batch_size·world_size; rank r takes positions r, r + W, … of it, and the randomness of a micro-step
(caption dropout, σ, ε, the VAE posterior draw) comes from `micro_generator(seed, m)`. So what a step sees
is a pure function of (seed, step): a resumed run needs no sampler state, and W ranks with batch b see what
one process with batch W·b sees.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from latentforge.training import dist


def micro_generator(seed: int, m: int) -> torch.Generator:
    """The CPU generator of global micro-batch m: caption dropout, σ, ε (and the VAE posterior draw)."""
    return torch.Generator().manual_seed((int(seed) * 0x9E3779B97F4A7C15 + int(m)) % (2**63))


class ShapesTrain(torch.utils.data.Dataset):
    """Item i of the shapes training stream (`latentforge.shapes.sample(seed, "train", i, size)`); with
    `crop` > 0 a crop × crop window of it at a position drawn from (seed, i) (VAE training: a convolutional
    autoencoder learns edges and colours from windows at a quarter of the cost of whole 64² scenes).

    `focus` in [0, 1]: the share of windows placed on one of the scene's objects (drawn uniformly), anywhere
    that holds its whole box, or inside the box where it is larger than the window; the others are uniform.
    A uniform 32² window of a 64² scene holds a small object whole about one time in seven (4.5% in a corner
    cell: 7 of the 33 offsets on each axis), so small shapes, the VAE's weak point, are rarely seen whole.
    With focus 0 the windows are today's, draw for draw."""

    def __init__(self, size: int, seed: int, crop: int = 0, focus: float = 0.0):
        self.size, self.seed, self.crop, self.focus = int(size), int(seed), int(crop), float(focus)
        if not 0 <= self.crop <= self.size:
            raise ValueError(f"crop must be in [0, {self.size}] (0: none), got {crop}")
        if not 0.0 <= self.focus <= 1.0:
            raise ValueError(f"crop_focus must be in [0, 1] (the share of windows on an object), got {focus}")
        if self.focus and not 0 < self.crop < self.size:
            raise ValueError(f"crop_focus {focus} needs a crop below the scene's {self.size}, got {crop}")

    def __getitem__(self, i: int) -> dict:
        import numpy as np

        from latentforge.shapes.data import sample, to_tensor

        img, text, scene, _ = sample(self.seed, "train", int(i), self.size)
        x = to_tensor(img)
        if self.crop and self.crop < self.size:
            rng = np.random.default_rng([self.seed, int(i), 7])
            top, left = rng.integers(0, self.size - self.crop + 1, 2)
            if self.focus and rng.random() < self.focus:
                top, left = object_window(scene, self.size, self.crop, rng)
            x = x[:, top : top + self.crop, left : left + self.crop]
        return {"image": x, "caption": text}

    def global_batch(self, m: int, G: int) -> list:
        return list(range(m * G, (m + 1) * G))


def object_window(scene, size: int, crop: int, rng) -> tuple[int, int]:
    """(top, left) of a crop × crop window on one of `scene`'s objects, drawn with `rng`: uniform over the
    windows that hold the object's whole box (`shapes.render.coverage`), or over those inside the box when
    it is larger than the window."""
    from latentforge.shapes.render import coverage

    o = scene.objects[int(rng.integers(len(scene.objects)))]
    r0, r1, c0, c1, _ = coverage(o.shape, o.size, o.position, size)
    out = []
    for a, b in ((r0, r1), (c0, c1)):  # per axis: [t, t + crop) with t ≤ a and t + crop ≥ b, or inside
        lo, hi = max(0, min(a, b - crop)), min(size - crop, max(a, b - crop))
        out.append(int(rng.integers(lo, hi + 1)))
    return out[0], out[1]


class FolderTrain(torch.utils.data.Dataset):
    """An `ImageFolder` fed by epochs of shuffled single-bucket global batches of G items (drop_last);
    items are addressed as (epoch, index) so random crops follow the epoch inside worker processes."""

    def __init__(self, folder, G: int, seed: int):
        from latentforge.training.data import BucketBatchSampler

        self.ds = folder
        self.sampler = BucketBatchSampler(folder, G, seed=seed, shuffle=True, drop_last=True)
        self.per_epoch = len(self.sampler)
        if self.per_epoch == 0:
            raise ValueError(
                f"{folder.root}: {len(folder)} usable images, fewer than one global batch of {G} in any "
                "bucket; lower batch_size or add images"
            )
        self._epoch, self._batches = -1, []
        self.pre = None  # a precompute.Precomputed once latents (and text conditioning) are cached

    def __getitem__(self, key) -> dict:
        epoch, i = key
        if self.pre is not None:  # cached: the image file is not even opened
            caption = self.ds.items[i].caption
            return {"caption": caption, **self.pre.item(i, caption, self.ds.target_size(i))}
        self.ds.set_epoch(epoch)
        d = self.ds[i]
        return {"image": d["image"], "caption": d["caption"]}

    def global_batch(self, m: int, G: int) -> list:
        epoch, k = divmod(m, self.per_epoch)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._epoch, self._batches = epoch, self.sampler.batches()
        return [(epoch, i) for i in self._batches[k]]


def dataset_for(cfg, world: dist.World):
    """The run's training data: the shapes stream or a folder (skipped files and missing captions
    reported)."""
    G = cfg.batch_size * world.world_size
    if cfg.data == "shapes":
        return ShapesTrain(cfg.resolution, cfg.seed, getattr(cfg, "crop", 0), getattr(cfg, "crop_focus", 0.0))
    from latentforge.training import reflow

    if reflow.is_pairs_folder(cfg.data):  # reflow: (noise, teacher sample) pairs, reflow.py
        for bad, why in (
            (
                getattr(cfg, "caption_dropout", 0) > 0,
                "caption_dropout must be 0 (a pair belongs to its prompt)",
            ),
            (getattr(cfg, "cache_latents", False), "cache_latents does not apply (the pairs are latents)"),
            (getattr(cfg, "pixel_space", False), "pixel_space does not apply (the pairs are latents)"),
        ):
            if bad:
                raise ValueError(f"data {cfg.data} is a folder of reflow pairs: {why}")
        pairs = reflow.PairsTrain(cfg.data, G, cfg.seed)
        if world.main:
            r = pairs.index["recipe"]
            how = f"{r['steps']} steps, {r['sampler']}/{r['scheduler']}, CFG {r['cfg']:g}"
            print(
                f"data {cfg.data}: {len(pairs)} reflow pairs of {r['teacher'] or 'a teacher'} ({how})",
                flush=True,
            )
        return pairs
    from latentforge.training.data import ImageFolder

    folder = ImageFolder(
        cfg.data,
        cfg.resolution,
        center_crop=cfg.center_crop,
        random_flip=cfg.random_flip,
        buckets=getattr(cfg, "buckets", False),
        bucket_step=getattr(cfg, "bucket_step", 64),
        seed=cfg.seed,
        min_size=getattr(cfg, "min_image_size", 1),
    )
    if world.main:
        print(
            f"data {cfg.data}: {len(folder)} images, {len(folder.skipped)} skipped "
            "(unreadable or too small), "
            f"{len(folder.missing_captions)} without a caption (trained with an empty one)",
            flush=True,
        )
        for path, why in folder.skipped[:10]:
            print(f"  skipped {path}: {why}", flush=True)
    return FolderTrain(folder, G, cfg.seed)


def collate(items: list[dict]) -> dict:
    """Tensors stacked (images, or cached latent moments and conditioning), captions as a list."""
    out = {k: torch.stack([d[k] for d in items]) for k in items[0] if k != "caption"}
    out["caption"] = [d["caption"] for d in items]
    return out


class _RankBatches(torch.utils.data.Sampler):
    """Rows rank, rank + W, … of global micro-batches start, start + 1, … (forever)."""

    def __init__(self, dataset, start: int, G: int, rank: int, world_size: int):
        self.dataset, self.start, self.G, self.rank, self.W = dataset, start, G, rank, world_size

    def __iter__(self) -> Iterator[list]:
        m = self.start
        while True:
            yield self.dataset.global_batch(m, self.G)[self.rank :: self.W]
            m += 1


def data_loader(cfg, dataset, start_micro_batch: int, world: dist.World) -> torch.utils.data.DataLoader:
    G = cfg.batch_size * world.world_size
    sampler = _RankBatches(dataset, start_micro_batch, G, world.rank, world.world_size)
    workers = cfg.num_workers
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        prefetch_factor=4 if workers else None,
        pin_memory=world.device.type == "cuda",
    )
