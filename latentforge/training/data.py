"""Training data from a folder of images: captions, resize/crop, aspect-ratio buckets.

Layouts (both as written by `latentforge.shapes.export`):

* kohya style: ``name.png`` beside ``name.txt`` (the caption, `caption_ext`);
* diffusers ``imagefolder`` style: a ``metadata.jsonl`` at the root with one ``{"file_name", "text"}`` object
  per line. When it exists its captions win over the ``.txt`` files; images it does not list fall back to
  their ``.txt``.

Every image is opened and fully decoded once when the dataset is built, so an unreadable file is skipped
and counted (`ImageFolder.skipped`, with the reason) instead of crashing a run mid-epoch; so is an image with
a side below `min_size` (training: the config's min_image_size, 32), which would otherwise be upscaled.

Aspect-ratio buckets follow kohya sd-scripts (`make_bucket_resolutions`, NovelAI's scheme): (w, h) pairs
that are multiples of `bucket_step`, with w*h <= `max_area`; each image goes to the bucket whose aspect
ratio is closest to its own, is resized to cover it and cropped to it. `BucketBatchSampler` yields batches
that never mix buckets.

`ImageFolder.cache_key` gives an item's key in a `latentforge.training.cache.LatentCache`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from latentforge.training.cache import LatentCache

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_RESAMPLE = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC}


# --------------------------------------------------------------------------------------------------------
# image helpers


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL image as RGB; transparency (RGBA, LA, palette with transparency) is composited over
    `background`; 16-bit and float greyscale are scaled to 8 bits."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I") and a.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open, apply the EXIF orientation and convert to RGB (decoded, file closed)."""
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        return to_rgb(im)


def _probe(path: str) -> tuple[int, int]:
    """(h, w) after EXIF orientation; raises when the file is not a fully decodable image."""
    with Image.open(path) as im:
        im.verify()  # structure and checksums (PNG CRCs); the object is unusable afterwards
    with Image.open(path) as im:
        im.load()  # a full decode: catches truncated data that verify() lets through
        w, h = im.size
        orientation = im.getexif().get(0x0112, 1)
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    if w < 1 or h < 1:
        raise ValueError(f"empty image {w}x{h}")
    return h, w


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W] in [-1, 1]."""
    a = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def resize_and_crop(
    img: Image.Image,
    target: tuple[int, int],
    crop: str | tuple[int, int] = "center",
    rng: np.random.Generator | None = None,
    interpolation: str = "lanczos",
) -> tuple[Image.Image, tuple[int, int]]:
    """Scale `img` so that it covers `target` (h, w) (the shorter side, relative to the target, matches),
    then crop to `target`. `crop` is "center", "random" (with `rng`) or explicit (top, left).
    Returns (image, (top, left)) with the crop offsets in the resized image."""
    th, tw = target
    w, h = img.size
    scale = max(tw / w, th / h)
    rw, rh = max(tw, round(w * scale)), max(th, round(h * scale))
    if (rw, rh) != (w, h):
        img = img.resize((rw, rh), _RESAMPLE[interpolation])
    if isinstance(crop, tuple):
        top, left = crop
    elif crop == "center":
        top, left = int(round((rh - th) / 2.0)), int(round((rw - tw) / 2.0))
    elif crop == "random":
        rng = rng if rng is not None else np.random.default_rng()
        top, left = int(rng.integers(0, rh - th + 1)), int(rng.integers(0, rw - tw + 1))
    else:
        raise ValueError(f"crop must be 'center', 'random' or (top, left), got {crop!r}")
    if not (0 <= top <= rh - th and 0 <= left <= rw - tw):
        raise ValueError(f"crop {(top, left)} does not fit a {rh}x{rw} image for a {th}x{tw} target")
    if (rw, rh) != (tw, th):
        img = img.crop((left, top, left + tw, top + th))
    return img, (top, left)


# --------------------------------------------------------------------------------------------------------
# buckets


def make_buckets(
    max_area: int, step: int = 64, min_size: int = 256, max_size: int = 1024
) -> list[tuple[int, int]]:
    """kohya's bucket resolutions: sorted (w, h) pairs, multiples of `step`, with sides in
    [min_size, max_size] and w*h <= max_area, plus the largest square."""
    if step < 1 or min_size < step or max_size < min_size:
        raise ValueError(f"need 1 <= step <= min_size <= max_size, got {step}, {min_size}, {max_size}")
    side = int(math.isqrt(max_area) // step) * step
    if side < step:
        raise ValueError(f"max_area {max_area} is smaller than one {step}x{step} bucket")
    resos = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, (max_area // width) // step * step)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += step
    return sorted(resos)


def assign_bucket(buckets: Sequence[tuple[int, int]], size_hw: tuple[int, int]) -> int:
    """Index of the bucket (w, h) whose aspect ratio w/h is closest to the image's (ties: the first)."""
    h, w = size_hw
    ar = w / h
    errs = [abs(bw / bh - ar) for bw, bh in buckets]
    return int(np.argmin(errs))


# --------------------------------------------------------------------------------------------------------
# the dataset


@dataclass
class Item:
    path: str
    caption: str
    size: tuple[int, int]  # (h, w), after EXIF orientation
    bucket: int  # index into ImageFolder.buckets


def _norm_res(resolution) -> tuple[int, int]:
    if isinstance(resolution, int):
        return resolution, resolution
    h, w = resolution
    return int(h), int(w)


class ImageFolder(torch.utils.data.Dataset):
    """A folder of images with captions (see the module docstring), as a map-style dataset.

    ``dataset[i]`` is a dict: ``image`` float32 [3, H, W] in [-1, 1]; ``caption``; ``path``;
    ``original_size`` (h, w); ``crop_coords`` (top, left) in the resized image; ``target_size`` (h, w);
    ``index``. The last three sizes are SDXL's micro-conditioning.

    ``resolution``: an int (square) or (h, w). Without buckets every image is resized to cover it and
    cropped to it. With ``buckets=True`` the target is the image's bucket (``dataset.buckets[b]`` is (w, h));
    ``max_area`` defaults to the resolution's area and bucket sides range over
    [``min_bucket_reso``, ``max_bucket_reso``] (default half and twice the resolution's shorter side).
    Random crops and flips are a function of (``seed``, epoch, index) — call ``set_epoch`` — so they do not
    depend on the number of workers. ``subfolders``: search the folder tree (default) or only the root.

    After construction: ``items`` (the kept images), ``skipped`` (list of (path, reason)),
    ``missing_captions`` (paths with no caption; their caption is "").
    """

    def __init__(
        self,
        root: str | os.PathLike,
        resolution: int | tuple[int, int] = 512,
        center_crop: bool = True,
        random_flip: bool = False,
        buckets: bool = False,
        bucket_step: int = 64,
        max_area: int | None = None,
        min_bucket_reso: int | None = None,
        max_bucket_reso: int | None = None,
        seed: int = 0,
        caption_ext: str = ".txt",
        caption_column: str = "text",
        interpolation: str = "lanczos",
        subfolders: bool = True,
        min_size: int = 1,
    ):
        super().__init__()
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {str(self.root)!r} does not exist")
        if interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {list(_RESAMPLE)}, got {interpolation!r}")
        self.resolution = _norm_res(resolution)
        self.center_crop = bool(center_crop)
        self.random_flip = bool(random_flip)
        self.use_buckets = bool(buckets)
        self.bucket_step = int(bucket_step)
        self.seed = int(seed)
        self.epoch = 0
        self.caption_ext = caption_ext
        self.caption_column = caption_column
        self.interpolation = interpolation
        self.min_size = int(min_size)  # images with a side below this are skipped, never upscaled
        rh, rw = self.resolution
        if self.use_buckets:
            area = int(max_area) if max_area is not None else rh * rw
            short = min(rh, rw)
            step = self.bucket_step
            lo = min_bucket_reso if min_bucket_reso is not None else max(step, short // 2 // step * step)
            hi = max_bucket_reso if max_bucket_reso is not None else short * 2 // step * step
            self.max_area = area
            self.buckets = make_buckets(area, step, lo, hi)
        else:
            self.max_area = rh * rw
            self.buckets = [(rw, rh)]
        self.skipped: list[tuple[str, str]] = []
        self.missing_captions: list[str] = []
        self.items: list[Item] = []
        self._index(subfolders)

    # -- indexing --------------------------------------------------------------------------------------

    def _metadata(self) -> dict[str, str | None] | None:
        meta_path = self.root / "metadata.jsonl"
        if not meta_path.is_file():
            return None
        out: dict[str, str | None] = {}
        with open(meta_path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    name = rec["file_name"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    self.skipped.append((f"{meta_path}:{n}", f"bad metadata line: {e}"))
                    continue
                text = rec.get(self.caption_column)
                out[os.path.normpath(name)] = text if isinstance(text, str) else None
        return out

    def _index(self, subfolders: bool) -> None:
        meta = self._metadata()
        files = []
        walker = os.walk(self.root) if subfolders else [(str(self.root), [], os.listdir(self.root))]
        for dirpath, dirnames, filenames in walker:
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                if not name.startswith(".") and name.lower().endswith(IMAGE_EXTS):
                    files.append(os.path.relpath(os.path.join(dirpath, name), self.root))
        files.sort()
        if meta is not None:
            present = set(files)
            for name in sorted(set(meta) - present):
                self.skipped.append((str(self.root / name), "listed in metadata.jsonl but missing"))
        for rel in files:
            path = str(self.root / rel)
            try:
                size = _probe(path)
            except Exception as e:  # any decoder error: UnidentifiedImageError, OSError, SyntaxError, ...
                self.skipped.append((path, f"{type(e).__name__}: {e}"))
                continue
            if min(size) < self.min_size:
                h, w = size
                self.skipped.append((path, f"too small: {w}x{h}, below min_image_size={self.min_size}"))
                continue
            caption = meta.get(os.path.normpath(rel)) if meta is not None else None
            if caption is None:
                caption = self._caption_file(path)
            if caption is None:
                self.missing_captions.append(path)
                caption = ""
            bucket = assign_bucket(self.buckets, size) if self.use_buckets else 0
            self.items.append(Item(path, caption, size, bucket))

    def _caption_file(self, path: str) -> str | None:
        cap = os.path.splitext(path)[0] + self.caption_ext
        try:
            with open(cap, encoding="utf-8") as f:
                return f.read().strip()
        except (OSError, UnicodeDecodeError):
            return None

    # -- access ------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def bucket_ids(self) -> list[int]:
        return [it.bucket for it in self.items]

    def target_size(self, index: int) -> tuple[int, int]:
        """(h, w) of item `index` once transformed."""
        bw, bh = self.buckets[self.items[index].bucket]
        return bh, bw

    def transform_params(self, index: int) -> dict:
        """What, besides the file, decides item `index`'s pixels (for cache keys)."""
        return {
            "target_size": list(self.target_size(index)),
            "crop": "center" if self.center_crop else "random",
            "random_flip": self.random_flip,
            "interpolation": self.interpolation,
        }

    def cache_key(self, index: int, fingerprint: str) -> str:
        """The `LatentCache` key of item `index` for an encoder described by `fingerprint`. Only for
        deterministic transforms: a cached random crop or flip would freeze one draw for every epoch."""
        if not self.center_crop or self.random_flip:
            raise ValueError(
                "caching needs a deterministic transform (center_crop=True, random_flip=False); "
                "a cached random crop or flip would repeat the same draw every epoch"
            )
        return LatentCache.make_key(self.items[index].path, self.transform_params(index), fingerprint)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        img = load_image(item.path)
        flip = self.random_flip and bool(rng.random() < 0.5)
        if flip:  # flip before the crop (diffusers' SDXL script): crop_coords refer to the flipped image
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        target = self.target_size(index)
        img, (top, left) = resize_and_crop(
            img, target, "center" if self.center_crop else "random", rng, self.interpolation
        )
        return {
            "image": image_to_tensor(img),
            "caption": item.caption,
            "path": item.path,
            "original_size": item.size,
            "crop_coords": (top, left),
            "target_size": target,
            "index": index,
        }


def collate(batch: Sequence[Mapping]) -> dict:
    """DataLoader collate_fn for ImageFolder: images stacked [B, 3, H, W] (one bucket per batch),
    captions and paths as lists, sizes as int64 [B, 2] tensors, index as int64 [B]."""
    out = {
        "image": torch.stack([b["image"] for b in batch]),
        "caption": [b["caption"] for b in batch],
        "path": [b["path"] for b in batch],
        "index": torch.tensor([b["index"] for b in batch], dtype=torch.long),
    }
    for k in ("original_size", "crop_coords", "target_size"):
        out[k] = torch.tensor([list(b[k]) for b in batch], dtype=torch.long)
    return out


# --------------------------------------------------------------------------------------------------------
# sampler


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of dataset indices that never mix buckets, for ``DataLoader(batch_sampler=...)``.

    Each epoch (``set_epoch``) the indices of every bucket are shuffled with a generator seeded by
    (seed, epoch), cut into batches of ``batch_size`` (a bucket's last, short batch is dropped with
    ``drop_last``), and the batches are shuffled together. Rank ``r`` of ``world_size`` takes batches
    ``r, r + world_size, ...``: ranks are disjoint and together cover the epoch. With ``drop_last`` the batch
    list is also cut to a multiple of ``world_size`` so every rank runs the same number of steps (what DDP
    needs); without it every item is seen exactly once and ranks may differ by one batch.

    ``dataset``: anything with ``bucket_ids`` (an ImageFolder), or a sequence of bucket ids.
    """

    def __init__(
        self,
        dataset,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        ids = dataset.bucket_ids if hasattr(dataset, "bucket_ids") else list(dataset)
        groups: dict[int, list[int]] = {}
        for i, b in enumerate(ids):
            groups.setdefault(int(b), []).append(i)
        self.groups = dict(sorted(groups.items()))
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _total_batches(self) -> int:
        bs = self.batch_size
        n = sum((len(g) // bs if self.drop_last else -(-len(g) // bs)) for g in self.groups.values())
        return n // self.world_size * self.world_size if self.drop_last else n

    def batches(self) -> list[list[int]]:
        """This rank's batches for the current epoch."""
        rng = np.random.default_rng([self.seed, self.epoch])
        out = []
        for g in self.groups.values():
            idx = list(g)
            if self.shuffle:
                idx = [idx[j] for j in rng.permutation(len(idx))]
            for s in range(0, len(idx), self.batch_size):
                b = idx[s : s + self.batch_size]
                if len(b) == self.batch_size or not self.drop_last:
                    out.append(b)
        if self.shuffle:
            out = [out[j] for j in rng.permutation(len(out))]
        out = out[: self._total_batches()]
        return out[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return len(range(self.rank, self._total_batches(), self.world_size))
