"""Streaming dataset and on-disk export for the shapes benchmark.

Sample ``i`` of a stream is a pure function of ``(seed, split, i)`` (its own ``numpy`` generator), so the
stream is the same whatever the number of DataLoader workers or ranks: global index ``i`` goes to the
shard ``i % (world_size * num_workers) == rank * num_workers + worker_id``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..files import atomic_path, write_text
from .captions import check_shares, describe, parse
from .render import SPLITS, Scene, check_resolution, coverage, normalize_split, render, sample_scene


def sample(
    seed: int,
    split: str,
    index: int,
    size: int = 64,
    relation_share: float = 0.0,
    background_share: float = 0.6,
    labelled_share: float = 0.0,
) -> tuple[np.ndarray, str, Scene, Scene]:
    """Sample ``index`` of stream ``(seed, split)``: (uint8 image HxWx3, caption, scene, stated spec).
    ``relation_share``, ``background_share``, ``labelled_share``: see ``captions.describe`` (the defaults keep
    the stream as it always was)."""
    split = normalize_split(split)
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    scene = sample_scene(rng, split=split)
    text, spec = describe(scene, rng, relation_share, background_share, labelled_share)
    return render(scene, size), text, scene, spec


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> float32 3xHxW in [-1, 1]."""
    return torch.from_numpy(img).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class ShapesDataset(torch.utils.data.IterableDataset):
    """Streams ``(image, caption, scene_dict)`` rendered on the fly; image: float32 [3, size, size], [-1, 1].

    ``length=None`` streams forever; otherwise the stream has ``length`` samples in total, shared between
    ranks and workers without duplicates. ``rank``/``world_size`` default to torch.distributed's when it is
    initialised. ``set_epoch(e)`` changes the stream (the seed becomes ``(seed, e)``). With
    ``with_spec=True`` the scene dict also holds ``"caption_spec"``: what the caption states (see captions).
    Batch with ``collate`` (images stacked, captions and scenes as lists).
    """

    def __init__(
        self,
        size: int = 64,
        seed: int = 0,
        split: str = "train",
        length: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        with_spec: bool = False,
    ):
        super().__init__()
        self.size = check_resolution(size)
        self.seed = int(seed)
        self.split = normalize_split(split)
        if length is not None and length < 0:
            raise ValueError(f"length must be >= 0 or None, got {length}")
        self.length = length
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = rank if rank is not None else (torch.distributed.get_rank() if dist else 0)
        self.world_size = (
            world_size if world_size is not None else (torch.distributed.get_world_size() if dist else 1)
        )
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        self.with_spec = with_spec
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _seed(self):
        return self.seed if self.epoch == 0 else self.seed * 1_000_003 + self.epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str, dict]]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        stride = self.world_size * nw
        i = self.rank * nw + wid
        seed = self._seed()
        while self.length is None or i < self.length:
            img, text, scene, spec = sample(seed, self.split, i, self.size)
            d = scene.to_dict()
            d["index"] = i
            if self.with_spec:
                d["caption_spec"] = spec.to_dict()
            yield to_tensor(img), text, d
            i += stride


def collate(batch):
    """DataLoader collate_fn for ShapesDataset: (images [B, 3, H, W], captions list, scene dicts list)."""
    imgs, texts, scenes = zip(*batch, strict=True)
    return torch.stack(imgs), list(texts), list(scenes)


def export(
    directory,
    n: int,
    size: int = 64,
    seed: int = 0,
    split: str = "train",
    relation_share: float = 0.0,
    background_share: float = 0.6,
    labelled_share: float = 0.0,
) -> Path:
    """Write ``n`` samples of stream ``(seed, split)`` to ``directory``: ``NNNNNN.png`` and ``NNNNNN.txt``
    (the caption), and ``metadata.jsonl`` with one ``{"file_name", "text", "scene", "caption_spec"}`` line per
    image (Hugging Face ``imagefolder`` layout). Every file is written atomically (``files.atomic_path``).
    ``relation_share``, ``background_share``, ``labelled_share``: see ``captions.describe``. Returns the
    directory."""
    size = check_resolution(size)
    split = normalize_split(split)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    check_shares(relation_share, background_share, labelled_share)  # before any file is written
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        img, text, scene, spec = sample(
            seed, split, i, size, relation_share, background_share, labelled_share
        )
        name = f"{i:06d}"
        with atomic_path(out / f"{name}.png") as tmp:
            Image.fromarray(img).save(tmp, format="PNG")
        write_text(out / f"{name}.txt", text + "\n")
        rec = {
            "file_name": f"{name}.png",
            "text": text,
            "scene": scene.to_dict(),
            "caption_spec": spec.to_dict(),
        }
        lines.append(json.dumps(rec))
    write_text(out / "metadata.jsonl", "\n".join(lines) + "\n" if lines else "")
    return out


def small_object_weights(captions: list[str], size: int, factor: int, weight: float) -> torch.Tensor:
    """Per-pixel loss weights for a batch of shapes captions, float32 [B, 1, size/factor, size/factor]:
    1 + ``weight``·c, c the largest antialiased coverage in [0, 1] of any *stated* small object (shape,
    size "small" and position all in the caption) among the cell's pixels (``factor`` pixels a side) and its
    eight neighbours' (grown by one cell all round so that the background that draws its outline counts
    too): 1 + ``weight`` on and around such an object, 1 elsewhere, between the two only on cells that its
    antialiased fringe alone reaches.

    Such an object's pixels follow from the caption alone (``render.coverage``: a stated shape, size and cell
    place it exactly), so the weight is a function of the conditioning: the weighted loss has the same
    minimiser, E[ε | x_t, caption], as the plain one at every pixel, and only moves more of the gradient
    onto the small shapes the default model draws as dots (MODEL_CARD.md). A caption outside the grammar,
    an empty one (caption dropout: the unconditional branch cannot know the layout) or one that leaves a
    size or position unstated weighs those objects 1."""
    size = check_resolution(size)
    if factor < 1 or size % factor:
        raise ValueError(f"factor must be a positive divisor of the image size {size}, got {factor}")
    if not 0 <= weight < float("inf"):  # NaN fails too
        raise ValueError(f"small-object weight must be a finite number >= 0, got {weight}")
    m = torch.zeros(len(captions), 1, size, size)
    for i, text in enumerate(captions):
        spec = parse(text) if text else None
        for o in spec.objects if spec is not None else ():
            if o.size == "small" and o.position is not None and o.shape is not None:
                r0, r1, c0, c1, a = coverage(o.shape, "small", o.position, size)
                cell = m[i, 0, r0:r1, c0:c1]
                torch.maximum(cell, torch.tensor(a[:, :, 0]), out=cell)
    m = torch.nn.functional.max_pool2d(m, factor)
    m = torch.nn.functional.max_pool2d(m, 3, stride=1, padding=1)
    return m.mul_(weight).add_(1.0)
