"""Latents and text conditioning computed once and read from disk (kohya's `cache_latents` /
`cache_text_encoder_outputs`), in `LatentCache` safetensors shards.

Keys say what the tensors depend on, so a cache is reused exactly when its inputs have not changed:
- an image's latent: the file (path, size, mtime), its transform (target size, crop, interpolation) and the
  VAE's weights fingerprint (`ImageFolder.cache_key`). Stored: the posterior's "mean" and "std"
  [C, h, w], so each epoch still draws its own z = mean + std·ε;
- a caption's conditioning (only when the text encoders are frozen): sha256 of the caption, the image size
  (SDXL's micro-conditioning) and the encoders' fingerprints. Stored: the family's conditioning tensors
  (e.g. "context" [L, D], "y" [D']).
Rank 0 fills the cache before training; the other ranks wait, then every process only reads.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from latentforge import conditioning, families
from latentforge.training import dist
from latentforge.training.cache import LatentCache


def fingerprint(module: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a module's state dict."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(json.dumps([k, str(t.dtype), list(t.shape)]).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


def text_key(caption: str, size: tuple[int, int], fp: str) -> str:
    return hashlib.sha256(json.dumps(["text", caption, list(size), fp]).encode()).hexdigest()


class Precomputed:
    """What a `FolderTrain` reads instead of decoding images and running frozen text encoders."""

    def __init__(self, directory: str, latent_keys: list[str], text_fp: str | None):
        self.directory, self.latent_keys, self.text_fp = directory, latent_keys, text_fp
        self._cache: LatentCache | None = None

    def cache(self) -> LatentCache:
        if self._cache is None:  # opened lazily: once per DataLoader worker process
            self._cache = LatentCache(self.directory)
        return self._cache

    def item(self, index: int, caption: str, size: tuple[int, int]) -> dict:
        lat = self.cache().get(self.latent_keys[index])
        if lat is None:
            raise RuntimeError(
                f"latent cache {self.directory}: item {index} is missing (was the cache pruned?)"
            )
        out = {"latent_mean": lat["mean"], "latent_std": lat["std"]}
        if self.text_fp is not None:
            out.update({f"cond.{k}": v for k, v in self.text(caption, size).items()})
        return out

    def text(self, caption: str, size: tuple[int, int]) -> dict[str, torch.Tensor]:
        got = self.cache().get(text_key(caption, size, self.text_fp))
        if got is None:
            raise RuntimeError(
                f"text cache {self.directory}: no conditioning for caption {caption!r} at {size}"
            )
        return got

    def __getstate__(self):  # worker processes open their own shard handles
        return {**self.__dict__, "_cache": None}


def _text_rows(cfg, setup, captions: list[str], size: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
    """The frozen text encoders' conditioning of each caption at image size (h, w), a row each: every
    caption cut to its first chunk, as the trainer encodes (one context length), so a row encodes as it
    would alone; floats as float32, the bool context_mask stays bool."""
    h, w = size
    net_config = setup.model.parts[cfg.net].config
    with conditioning.first_chunk_only():
        cond = families.encode(cfg.family, setup.model.frozen, captions, w, h, False, net_config, "none")
    return [
        {k: (v[j].float() if v.is_floating_point() else v[j]).cpu() for k, v in cond.items()}
        for j in range(len(captions))
    ]


def _encode_captions(cfg, setup, cache, missing: list, text_fp: str, chunk: int) -> None:
    """Cache the frozen text encoders' conditioning of each (caption, (h, w)) in `missing`, `chunk` captions
    a batch."""
    by_size: dict[tuple[int, int], list[str]] = {}
    for cap, size in missing:
        by_size.setdefault(size, []).append(cap)
    for size, caps in by_size.items():
        for s in range(0, len(caps), chunk):
            part = caps[s : s + chunk]
            for cap, row in zip(part, _text_rows(cfg, setup, part, size), strict=True):
                cache.put(text_key(cap, size, text_fp), row)


class EncodeOnRead:
    """A dry run's stand-in for `Precomputed` (a dry run writes nothing): each item's latent moments, and
    the frozen text encoders' conditioning where a cached run caches it, computed as the item is read and
    kept nowhere. The step a dry run then counts (FLOPs) and times is a cached run's step, without the VAE
    encode and the frozen encoders (the cache pays those once, before training)."""

    def __init__(self, cfg, setup, folder):
        if setup.vae is None:
            raise ValueError("cache_latents needs a VAE (pixel-space training has no latents to cache)")
        self.cfg, self.setup, self.folder = cfg, setup, folder
        self.frozen_text = not cfg.train_text_encoder and bool(setup.model.frozen)

    @torch.no_grad()
    def item(self, index: int, caption: str, size: tuple[int, int]) -> dict:
        vae = self.setup.vae
        p = next(vae.parameters())
        post = vae.encode(self.folder[index]["image"][None].to(p.device, p.dtype))
        out = {"latent_mean": post.mean[0].float().cpu(), "latent_std": post.std[0].float().cpu()}
        if self.frozen_text:
            out.update({f"cond.{k}": v for k, v in self.text(caption, size).items()})
        return out

    @torch.no_grad()
    def text(self, caption: str, size: tuple[int, int]) -> dict[str, torch.Tensor]:
        return _text_rows(self.cfg, self.setup, [caption], size)[0]


@torch.no_grad()
def build(
    cfg, setup, data, world: dist.World, directory: str, chunk: int = 16, text_chunk: int = 64
) -> Precomputed:
    """Fill the cache for every item of `data` (a FolderTrain) on rank 0 and attach it to `data`."""
    folder = data.ds
    vae = setup.vae
    if vae is None:
        raise ValueError("cache_latents needs a VAE (pixel-space training has no latents to cache)")
    vfp = "vae:" + fingerprint(vae)
    keys = [folder.cache_key(i, vfp) for i in range(len(folder))]  # refuses random crops / flips
    frozen = setup.model.frozen
    text_fp = None
    if not cfg.train_text_encoder and frozen:
        text_fp = "text:" + ",".join(f"{n}={fingerprint(m)}" for n, m in sorted(frozen.items()))
        if getattr(setup.model.parts[cfg.net].config, "mask_text_padding", False):
            text_fp += ",context_mask"  # the cached conditioning then holds the mask too
    if world.main:
        cache = LatentCache(directory)
        todo = [i for i, k in enumerate(keys) if k not in cache]
        dev = next(vae.parameters()).device
        dtype = next(vae.parameters()).dtype
        by_size: dict[tuple[int, int], list[int]] = {}
        for i in todo:
            by_size.setdefault(folder.target_size(i), []).append(i)
        for idx in by_size.values():
            for s in range(0, len(idx), chunk):
                part = idx[s : s + chunk]
                x = torch.stack([folder[i]["image"] for i in part]).to(dev, dtype)
                post = vae.encode(x)
                for j, i in enumerate(part):
                    cache.put(keys[i], {"mean": post.mean[j].float(), "std": post.std[j].float()})
        n_text = 0
        if text_fp is not None:
            wanted = {(folder.items[i].caption, folder.target_size(i)) for i in range(len(folder))}
            wanted |= {("", folder.target_size(i)) for i in range(len(folder))}  # caption dropout
            missing = sorted(w for w in wanted if text_key(w[0], w[1], text_fp) not in cache)
            _encode_captions(cfg, setup, cache, missing, text_fp, text_chunk)
            n_text = len(missing)
        cache.flush()
        print(f"cache {directory}: {len(todo)} latents encoded, {len(keys) - len(todo)} reused; "
              f"{n_text} captions encoded", flush=True)  # fmt: skip
    dist.barrier(world)
    pre = Precomputed(directory, keys, text_fp)
    data.pre = pre
    return pre
