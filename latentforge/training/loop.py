"""What the denoiser and VAE trainers share: data feeding by global micro-batch, the optimiser, autocast,
gradient checkpointing, the metrics log, the progress bar, the loss plot and the dry-run report."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from latentforge.training import dist


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. a non-finite loss); the message names the step and the last good
    checkpoint."""


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def micro_generator(seed: int, m: int) -> torch.Generator:
    """The CPU generator of global micro-batch m: caption dropout, σ, ε (and the VAE posterior draw)."""
    return torch.Generator().manual_seed((int(seed) * 0x9E3779B97F4A7C15 + int(m)) % (2**63))


# --------------------------------------------------------------------------------------------------------
# data: every rank takes its rows of the same global micro-batch


class ShapesTrain(torch.utils.data.Dataset):
    """Item i of the shapes training stream (`latentforge.shapes.sample(seed, "train", i, size)`)."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = int(size), int(seed)

    def __getitem__(self, i: int) -> dict:
        from latentforge.shapes.data import sample, to_tensor

        img, text, _, _ = sample(self.seed, "train", int(i), self.size)
        return {"image": to_tensor(img), "caption": text}

    def global_batch(self, m: int, G: int) -> list:
        return list(range(m * G, (m + 1) * G))


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
        return ShapesTrain(cfg.resolution, cfg.seed)
    from latentforge.training.data import ImageFolder

    folder = ImageFolder(
        cfg.data,
        cfg.resolution,
        center_crop=cfg.center_crop,
        random_flip=cfg.random_flip,
        buckets=getattr(cfg, "buckets", False),
        bucket_step=getattr(cfg, "bucket_step", 64),
        seed=cfg.seed,
    )
    if world.main:
        print(
            f"data {cfg.data}: {len(folder)} images, {len(folder.skipped)} skipped (unreadable), "
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


# --------------------------------------------------------------------------------------------------------
# optimisation helpers


def build_optimizer(cfg, params: Iterable[nn.Parameter]) -> torch.optim.AdamW:
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("nothing to train: every parameter is frozen")
    return torch.optim.AdamW(
        trainable,
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
    )


def autocast(precision: str, device: torch.device):
    """Mixed precision where the device supports it: bf16 on CPU and CUDA, fp16 on CUDA (with a scaler)."""
    if precision == "no":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision='fp16' needs a CUDA device (use 'bf16' on the CPU)")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def top_level_blocks(net: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a UNet (input/middle/output blocks), DiT (blocks) or MMDiT (joint_blocks)."""
    blocks: list[nn.Module] = []
    for name in ("input_blocks", "output_blocks", "blocks", "joint_blocks"):
        blocks += list(getattr(net, name, []))
    if hasattr(net, "middle_block"):
        blocks.append(net.middle_block)
    if not blocks:
        raise ValueError(f"no top-level blocks known for {type(net).__name__}")
    return blocks


def enable_checkpointing(net: nn.Module) -> int:
    """Gradient checkpointing (Chen et al. 2016): each top-level block recomputes its activations in the
    backward pass instead of storing them. Wraps the blocks' forward (state-dict keys are unchanged);
    returns the number of blocks wrapped."""
    from torch.utils.checkpoint import checkpoint

    blocks = top_level_blocks(net)
    for block in blocks:

        def run(*args, _forward=block.forward, **kw):
            if not torch.is_grad_enabled():
                return _forward(*args, **kw)
            return checkpoint(_forward, *args, use_reentrant=False, **kw)

        block.forward = run
    return len(blocks)


def load_vae_file(path: str):
    """A frozen VAE from a file (ours from `train vae`, or any SD VAE) and its latent format: the file's
    measured scale factor when it has one, else SD's (0.18215; 1.5305/0.0609 for 16 channels)."""
    from latentforge.checkpoints import (
        _component_file,
        _load_component,
        _read_metadata,
        configs_from_json,
        preset_configs,
    )
    from latentforge.models.vae import LATENT_FORMATS, LatentFormat

    meta = _read_metadata(path)
    configs = configs_from_json(meta["latentforge.configs"]) if "latentforge.configs" in meta else {}
    sd = _component_file("vae", path)
    if "vae" in configs:
        vcfg = configs["vae"]
    elif sd.get("encoder.conv_out.weight") is not None and sd["encoder.conv_out.weight"].shape[0] == 32:
        vcfg = preset_configs("sd3-medium")["vae"]
    else:
        vcfg = preset_configs("sd15")["vae"]
    vae = _load_component("vae", vcfg, sd, torch.float32, path)
    if "latentforge.latent_format" in meta:
        fmt = LatentFormat.from_json(meta["latentforge.latent_format"])
    else:
        fmt = LATENT_FORMATS["sd3"] if vae.latent_channels == 16 else LATENT_FORMATS["sd1"]
    return vae, fmt


# --------------------------------------------------------------------------------------------------------
# logging


class MetricsLog:
    """metrics.jsonl, one JSON object per line, appended and flushed as it goes. A run resumed at step s
    first drops the records of steps after s (they are trained again); a new run starts the file."""

    def __init__(self, path: str, start_step: int, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = []
        if start_step > 0 and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a kill
                    if rec.get("step", 0) <= start_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {**record, "time": round(time.time(), 3)}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def read_metrics(path: str) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


def progress_bar(start: int, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True)


def save_loss_plot(metrics_path: str, png_path: str, key: str = "loss") -> None:
    from latentforge.plot import line_plot

    recs = [r for r in read_metrics(metrics_path) if key in r]
    if len(recs) < 2:
        return
    series = {key: ([r["step"] for r in recs], [r[key] for r in recs])}
    line_plot(
        series, png_path, title=f"training {key}", xlabel="step", ylabel=key, logy=True, size=(900, 560)
    )


# --------------------------------------------------------------------------------------------------------
# dry run


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    t = sum(p.numel() for p in module.parameters() if p.requires_grad)
    f = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    return t, f


def dry_run_report(cfg, setup, dataset, ms, optimizer, world, micro_step: Callable) -> dict:
    """Print the resolved config, parameter counts, FLOPs per optimiser step (counted with
    torch.utils.flop_counter on one real micro-batch, forward + backward, × grad_accum) and the measured
    time per step (the second of two micro-steps × grad_accum). Nothing is written."""
    from torch.utils.flop_counter import FlopCounterMode

    from latentforge.training.config import to_dict

    print(json.dumps(to_dict(cfg), indent=2))
    model = setup.model
    counts = {}
    for name, m in {**dict(model.parts.items()), **model.frozen, **setup.extra_components}.items():
        t, f = count_parameters(m)
        counts[name] = {"trainable": t, "frozen": f}
        print(f"{name:8s} {t:>14,d} trainable {f:>14,d} frozen")
    G = cfg.batch_size * world.world_size
    batch = collate([dataset[k] for k in dataset.global_batch(0, G)[world.rank :: world.world_size]])
    size = (cfg.resolution, cfg.resolution)
    with FlopCounterMode(display=False) as fc:
        micro_step(cfg, setup, ms, model, batch, 0, G, world, size, None)
    flops = fc.get_total_flops() * cfg.grad_accum
    t0 = time.perf_counter()
    micro_step(cfg, setup, ms, model, batch, 1, G, world, size, None)
    seconds = (time.perf_counter() - t0) * cfg.grad_accum
    optimizer.zero_grad(set_to_none=True)
    print(f"FLOPs per step (forward + backward, this rank): {flops / 1e9:,.2f} GFLOP")
    print(
        f"estimated time per step: {seconds:.3f} s; "
        f"{cfg.max_steps} steps ≈ {seconds * cfg.max_steps / 60:.1f} min"
    )
    return {"parameters": counts, "flops_per_step": flops, "seconds_per_step": seconds}
