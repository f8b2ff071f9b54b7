"""latentforge.training.data: folder dataset, captions, skips, resize/crop, buckets, sampler, latent cache."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from latentforge.training.cache import LatentCache
from latentforge.training.data import (
    BucketBatchSampler,
    ImageFolder,
    assign_bucket,
    collate,
    make_buckets,
    resize_and_crop,
)


def _png(path, w, h, color=(10, 200, 30), mode="RGB"):
    if mode == "RGB":
        img = Image.new("RGB", (w, h), color)
    else:
        img = Image.new(mode, (w, h))
    img.save(path)
    return path


def _folder(tmp_path, sizes, captions=True):
    for i, (w, h) in enumerate(sizes):
        _png(tmp_path / f"img{i:03d}.png", w, h, color=(i * 7 % 256, 100, 50))
        if captions:
            (tmp_path / f"img{i:03d}.txt").write_text(f"caption {i}\n")
    return tmp_path


def test_captions_from_txt(tmp_path):
    _folder(tmp_path, [(40, 40), (50, 30)])
    ds = ImageFolder(tmp_path, resolution=32)
    assert len(ds) == 2 and not ds.skipped and not ds.missing_captions
    assert [ds[i]["caption"] for i in range(2)] == ["caption 0", "caption 1"]


def test_captions_from_metadata_win_over_txt(tmp_path):
    _folder(tmp_path, [(40, 40), (50, 30), (30, 30)])
    sub = tmp_path / "sub"
    sub.mkdir()
    _png(sub / "deep.png", 20, 20)
    lines = [
        {"file_name": "img000.png", "text": "from metadata 0"},
        {"file_name": "img001.png", "text": "from metadata 1"},
        {"file_name": "sub/deep.png", "text": "deep one"},
        {"file_name": "gone.png", "text": "no such file"},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    ds = ImageFolder(tmp_path, resolution=16)
    caps = {os.path.basename(it.path): it.caption for it in ds.items}
    # metadata wins; an image it does not list falls back to its .txt
    assert caps == {
        "img000.png": "from metadata 0",
        "img001.png": "from metadata 1",
        "img002.png": "caption 2",
        "deep.png": "deep one",
    }
    assert [os.path.basename(p) for p, _ in ds.skipped] == ["gone.png"]
    assert ds.missing_captions == []


def test_corrupt_files_skipped_and_counted(tmp_path):
    _folder(tmp_path, [(40, 40), (40, 40)])
    good = (tmp_path / "img000.png").read_bytes()
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(big)
    data = big.read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    big.unlink()
    (tmp_path / "text.jpg").write_text("this is not a jpeg\n")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "header_only.png").write_bytes(good[:40])
    (tmp_path / "notes.md").write_text("ignored: not an image extension")
    ds = ImageFolder(tmp_path, resolution=32)
    assert len(ds) == 2
    bad = sorted(os.path.basename(p) for p, _ in ds.skipped)
    assert bad == ["empty.png", "header_only.png", "text.jpg", "truncated.png"]
    assert all(reason for _, reason in ds.skipped)
    for i in range(len(ds)):  # every kept item loads
        assert ds[i]["image"].shape == (3, 32, 32)


def test_missing_caption_counted(tmp_path):
    _folder(tmp_path, [(40, 40), (40, 40)])
    (tmp_path / "img001.txt").unlink()
    ds = ImageFolder(tmp_path, resolution=32)
    assert [os.path.basename(p) for p in ds.missing_captions] == ["img001.png"]
    assert ds[1]["caption"] == ""


def test_resize_center_crop_sizes_and_coords(tmp_path):
    _png(tmp_path / "wide.png", 100, 50)
    _png(tmp_path / "tall.png", 30, 90)
    ds = ImageFolder(tmp_path, resolution=40)
    by = {os.path.basename(ds[i]["path"]): ds[i] for i in range(len(ds))}
    w = by["wide.png"]  # 100x50 -> 80x40, crop 40 wide centred: left 20
    assert w["image"].shape == (3, 40, 40)
    assert w["original_size"] == (50, 100) and w["target_size"] == (40, 40) and w["crop_coords"] == (0, 20)
    t = by["tall.png"]  # 30x90 -> 40x120, top (120-40)/2 = 40
    assert t["original_size"] == (90, 30) and t["crop_coords"] == (40, 0)
    img = w["image"]
    assert img.dtype == torch.float32 and img.min() >= -1 and img.max() <= 1


def test_random_crop_seeded_and_in_range(tmp_path):
    _png(tmp_path / "wide.png", 200, 50)
    ds = ImageFolder(tmp_path, resolution=32, center_crop=False, random_flip=True, seed=3)
    lefts = []
    for epoch in range(8):
        ds.set_epoch(epoch)
        a, b = ds[0], ds[0]
        assert a["crop_coords"] == b["crop_coords"] and torch.equal(a["image"], b["image"])
        top, left = a["crop_coords"]
        assert top == 0 and 0 <= left <= 128 - 32
        lefts.append(left)
    assert len(set(lefts)) > 1
    ds2 = ImageFolder(tmp_path, resolution=32, center_crop=False, random_flip=True, seed=3)
    ds2.set_epoch(7)
    assert ds2[0]["crop_coords"] == (0, lefts[7])


def test_resize_and_crop_explicit():
    img = Image.new("RGB", (64, 48))
    out, (top, left) = resize_and_crop(img, (24, 16), crop=(0, 5))
    assert out.size == (16, 24) and (top, left) == (0, 5)  # 64x48 -> 32x24, crop 16 wide at left 5
    with pytest.raises(ValueError):
        resize_and_crop(img, (24, 16), crop=(0, 17))


def test_rgba_la_palette_over_white(tmp_path):
    Image.new("RGBA", (16, 16), (255, 0, 0, 0)).save(tmp_path / "clear.png")  # fully transparent red
    Image.new("RGBA", (16, 16), (0, 0, 255, 255)).save(tmp_path / "blue.png")
    Image.new("LA", (16, 16), (0, 0)).save(tmp_path / "la.png")
    p = Image.new("P", (16, 16), 0)
    p.putpalette([0, 0, 0] * 256)
    p.info["transparency"] = 0
    p.save(tmp_path / "pal.png", transparency=0)
    Image.new("L", (16, 16), 0).save(tmp_path / "grey.png")
    ds = ImageFolder(tmp_path, resolution=16)
    assert not ds.skipped
    by = {os.path.basename(ds[i]["path"]): ds[i]["image"] for i in range(len(ds))}
    assert all(v.shape == (3, 16, 16) for v in by.values())
    assert torch.allclose(by["clear.png"], torch.ones(3, 16, 16))  # white background
    assert torch.allclose(by["la.png"], torch.ones(3, 16, 16))
    assert torch.allclose(by["pal.png"], torch.ones(3, 16, 16))
    assert torch.allclose(by["blue.png"][2], torch.ones(16, 16)) and by["blue.png"][0].max() == -1
    assert torch.allclose(by["grey.png"], -torch.ones(3, 16, 16))


def test_exif_orientation_swaps_size(tmp_path):
    img = Image.new("RGB", (40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    ds = ImageFolder(tmp_path, resolution=16)
    assert ds.items[0].size == (40, 20)
    assert ds[0]["original_size"] == (40, 20)


def test_make_buckets_kohya_rules():
    b = make_buckets(512 * 512, 64, 256, 1024)
    assert (512, 512) in b and (768, 320) in b and (320, 768) in b
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in b)
    assert all(256 <= w <= 1024 and 256 <= h <= 1024 for w, h in b)
    assert b == sorted(set(b))
    assert b[assign_bucket(b, (512, 512))] == (512, 512)
    bw, bh = b[assign_bucket(b, (300, 1000))]  # h=300, w=1000: wide
    assert bw > bh


def _bucket_folder(tmp_path, n=37):
    rng = np.random.default_rng(0)
    shapes = [(64, 64), (96, 48), (48, 96), (80, 56), (120, 40)]
    sizes = [shapes[int(rng.integers(len(shapes)))] for _ in range(n)]
    return _folder(tmp_path, sizes)


def test_bucketed_items_match_their_bucket(tmp_path):
    ds = ImageFolder(_bucket_folder(tmp_path), resolution=64, buckets=True, bucket_step=16)
    assert len(set(ds.bucket_ids)) >= 3
    for w, h in ds.buckets:
        assert w % 16 == 0 and h % 16 == 0 and w * h <= 64 * 64
    for i in range(0, len(ds), 5):
        it = ds[i]
        bw, bh = ds.buckets[ds.items[i].bucket]
        assert it["image"].shape == (3, bh, bw) and it["target_size"] == (bh, bw)
        h, w = it["original_size"]
        ar = w / h
        assert all(abs(bw / bh - ar) <= abs(x / y - ar) + 1e-12 for x, y in ds.buckets)


@pytest.mark.parametrize("drop_last", [False, True])
def test_bucket_sampler_single_bucket_covering_deterministic(tmp_path, drop_last):
    ds = ImageFolder(_bucket_folder(tmp_path), resolution=64, buckets=True, bucket_step=16)
    ids = ds.bucket_ids
    s = BucketBatchSampler(ds, batch_size=4, seed=1, drop_last=drop_last)
    s.set_epoch(0)
    e0 = list(s)
    assert len(e0) == len(s)
    for b in e0:
        assert len({ids[i] for i in b}) == 1
        assert len(b) == 4 or not drop_last
    seen = Counter(i for b in e0 for i in b)
    assert max(seen.values()) == 1
    if not drop_last:
        assert set(seen) == set(range(len(ds)))
    else:  # only the short tail batch of each bucket is dropped
        per_bucket = Counter(ids)
        assert len(seen) == sum(c // 4 * 4 for c in per_bucket.values())
    again = BucketBatchSampler(ds, batch_size=4, seed=1, drop_last=drop_last)
    assert list(again) == e0  # same seed + epoch: same batches
    s.set_epoch(1)
    assert list(s) != e0


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_bucket_sampler_rank_shards(world_size, drop_last):
    ids = [i % 3 for i in range(50)] + [3] * 7
    shards = []
    for r in range(world_size):
        s = BucketBatchSampler(ids, 4, seed=5, drop_last=drop_last, rank=r, world_size=world_size)
        s.set_epoch(2)
        shards.append(list(s))
        assert len(shards[-1]) == len(s)
        assert all(len({ids[i] for i in b}) == 1 for b in shards[-1])
    flat = [set(i for b in sh for i in b) for sh in shards]
    for a in range(world_size):
        for b in range(a + 1, world_size):
            assert not flat[a] & flat[b]
    union = set().union(*flat)
    if drop_last:
        assert len({len(sh) for sh in shards}) == 1  # every rank runs the same number of steps
    else:
        assert union == set(range(len(ids)))
        assert sum(len(b) for sh in shards for b in sh) == len(ids)


def test_dataloader_with_sampler_and_collate(tmp_path):
    ds = ImageFolder(_bucket_folder(tmp_path, n=12), resolution=64, buckets=True, bucket_step=16)
    dl = torch.utils.data.DataLoader(ds, batch_sampler=BucketBatchSampler(ds, 3, seed=0), collate_fn=collate)
    n = 0
    for batch in dl:
        B = batch["image"].shape[0]
        n += B
        assert batch["original_size"].shape == (B, 2) and batch["crop_coords"].shape == (B, 2)
        assert (batch["target_size"] == batch["target_size"][0]).all()
        assert len(batch["caption"]) == B
    assert n == len(ds)


def test_cache_hit_miss_and_atomic(tmp_path):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    _folder(img_dir, [(40, 40), (48, 32), (32, 48), (40, 40), (40, 40)])
    ds = ImageFolder(img_dir, resolution=32)
    cache_dir = tmp_path / "cache"
    fp = "vae:test-v1:float32"

    def encode(i):
        x = ds[i]["image"]
        return {"mean": x[:, ::8, ::8].clone(), "std": torch.full((3, 4, 4), float(i))}

    # first pass: all misses, shards of 2 items
    cache = LatentCache(cache_dir, shard_size=2)
    for i in range(len(ds)):
        k = ds.cache_key(i, fp)
        assert cache.get(k) is None
        cache.put(k, encode(i))
    cache.flush()
    assert cache.misses == len(ds)
    shards = sorted(p.name for p in cache_dir.glob("shard-*.safetensors"))
    assert len(shards) == 3
    assert sorted(os.listdir(cache_dir)) == sorted(shards + ["index.json"])  # no temp files left

    # second pass from a fresh object: every item hits, same tensors
    cache2 = LatentCache(cache_dir, shard_size=2)
    for i in range(len(ds)):
        got = cache2.get(ds.cache_key(i, fp))
        assert got is not None
        ref = encode(i)
        assert torch.equal(got["mean"], ref["mean"]) and torch.equal(got["std"], ref["std"])
    assert cache2.hits == len(ds) and cache2.misses == 0

    # a modified image (new mtime) misses; a different encoder fingerprint misses; params matter
    p = ds.items[1].path
    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert cache2.get(ds.cache_key(1, fp)) is None
    assert cache2.get(ds.cache_key(0, fp)) is not None
    assert cache2.get(ds.cache_key(0, "vae:other")) is None
    ds64 = ImageFolder(img_dir, resolution=64)
    assert ds64.cache_key(0, fp) != ds.cache_key(0, fp)

    # recompute the miss, prune stale entries: old shards go, nothing else is left behind
    cache2.put(ds.cache_key(1, fp), encode(1))
    keep = {ds.cache_key(i, fp) for i in range(len(ds))}
    cache2.prune(keep)
    assert len(cache2) == len(ds)
    assert not [n for n in os.listdir(cache_dir) if n.startswith(".")]
    cache3 = LatentCache(cache_dir)
    assert all(cache3.get(k) is not None for k in keep)


def test_cache_interrupted_write_keeps_previous_state(tmp_path, monkeypatch):
    cache = LatentCache(tmp_path, shard_size=10)
    cache.put("a", {"x": torch.ones(2)})
    cache.flush()
    cache.put("b", {"x": torch.zeros(2)})
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        cache.flush()
    monkeypatch.undo()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # temp file removed
    fresh = LatentCache(tmp_path)
    assert torch.equal(fresh.get("a")["x"], torch.ones(2)) and fresh.get("b") is None
    with LatentCache(tmp_path) as c:  # a with block flushes
        c.put("b", {"x": torch.zeros(2)})
    assert torch.equal(LatentCache(tmp_path).get("b")["x"], torch.zeros(2))


def test_cache_key_refuses_random_transforms(tmp_path):
    _folder(tmp_path, [(40, 40)])
    with pytest.raises(ValueError, match="deterministic"):
        ImageFolder(tmp_path, resolution=32, center_crop=False).cache_key(0, "x")
    with pytest.raises(ValueError, match="deterministic"):
        ImageFolder(tmp_path, resolution=32, random_flip=True).cache_key(0, "x")


def test_shapes_export_is_readable(tmp_path):
    from latentforge.shapes.data import export, sample

    export(tmp_path, 6, size=64, seed=4)
    ds = ImageFolder(tmp_path, resolution=64)
    assert len(ds) == 6 and not ds.skipped and not ds.missing_captions
    for i in range(6):
        img, text, _, _ = sample(4, "train", i, 64)
        item = ds[i]
        assert item["caption"] == text
        ref = torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1
        assert torch.allclose(item["image"], ref)  # same size: no resampling
    # the kohya view of the same folder (without metadata.jsonl) gives the same captions
    (tmp_path / "metadata.jsonl").unlink()
    ds2 = ImageFolder(tmp_path, resolution=64)
    assert [it.caption for it in ds2.items] == [it.caption for it in ds.items]


def test_cache_missing_shard_is_a_miss(tmp_path):
    with LatentCache(tmp_path, shard_size=1) as c:
        c.put("a", {"x": torch.ones(1)})
        c.put("b", {"x": torch.zeros(1)})
    shard_a = json.loads((tmp_path / "index.json").read_text())["items"]["a"]["shard"]
    (tmp_path / shard_a).unlink()
    fresh = LatentCache(tmp_path)
    assert fresh.get("a") is None and fresh.get("b") is not None
    assert "a" not in fresh and len(fresh) == 1


def test_cache_keeps_up_to_max_open_shards_open_and_reads_right_after_closing(tmp_path):
    # a training batch draws from random shards: by default every shard of a 1000-item cache stays open
    # (reopening one per item cost 10× the read in the 2-hour recipe); a small max_open closes the least
    # recently used and reopens it on demand with the same values
    with LatentCache(tmp_path, shard_size=1) as c:
        for k in range(12):
            c.put(str(k), {"x": torch.full((2,), float(k))})
    every = LatentCache(tmp_path)
    few = LatentCache(tmp_path, max_open=2)
    for _ in range(2):
        for k in (3, 0, 5, 11, 7, 9, 1, 6, 10, 8, 4, 2):
            assert torch.equal(every.get(str(k))["x"], torch.full((2,), float(k)))
            assert torch.equal(few.get(str(k))["x"], torch.full((2,), float(k)))
    assert len(every._open) == 12 and len(few._open) == 2
    assert list(few._open) == [every._entries[k]["shard"] for k in ("4", "2")]  # the two used last
