"""The VAE trainer: a KL autoencoder (Rombach et al. 2022, §3) with an optional patch-GAN after a warm-up.

One step on global micro-batch m (same data feeding as the denoiser trainer, see trainer.py):

    x ─► vae(x) = (x̂, q(z|x)) ─► L_AE = rec + kl_weight·KL/(C·H·W) [+ λ·GAN]   (vae_losses.autoencoder_loss)
    (x, x̂.detach()) ─► L_D (hinge), only from disc_start on              (vae_losses.discriminator_loss)

The discriminator's parameters are frozen while L_AE is differentiated and the VAE's are not touched by
L_D, so one AdamW with two parameter groups (VAE; discriminator without weight decay) applies both updates at
once — what LDM's alternating two-optimizer step does on the same batch.

At every sample step and at the end (EMA weights): PSNR and SSIM of held-out images reconstructed through
the posterior mean, a reconstruction grid, and at the end the latent scale factor 1/std of the latents of
the data (LDM `scale_by_std`), saved with the model: `checkpoints/last.safetensors` holds the VAE with bare
LDM keys (`encoder.*`, `decoder.*`, `quant_conv.*`: the layout of SD's standalone VAE files), its config and
`latentforge.latent_format` in the metadata; `train denoiser --vae PATH` reads both.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time

import numpy as np
import torch
from torch import nn

from latentforge.checkpoints import configs_to_json, save_state_dict
from latentforge.models.vae import AutoencoderKL, LatentFormat
from latentforge.training import dist
from latentforge.training.config import VAETrainConfig, to_dict
from latentforge.training.loop import (
    MetricsLog,
    TrainingError,
    autocast,
    data_loader,
    dataset_for,
    load_vae_file,
    micro_generator,
    progress_bar,
    save_loss_plot,
    write_json_atomic,
)
from latentforge.training.state import EMA, apply_lr, load_training_state, save_training_state, step_dirs
from latentforge.training.vae_losses import (
    VAELossConfig,
    autoencoder_loss,
    build_discriminator,
    discriminator_loss,
    gan_active,
    latent_scale_factor,
    psnr,
    ssim,
)

VAE_MODEL_FIELDS = ("vae", "resolution")


def loss_config(cfg: VAETrainConfig) -> VAELossConfig:
    return VAELossConfig(
        recon=cfg.recon,
        kl_weight=cfg.kl_weight,
        disc_weight=cfg.disc_weight,
        disc_start=cfg.disc_start,
        disc_loss=cfg.disc_loss,
        disc_layers=cfg.disc_layers,
        disc_channels=cfg.disc_channels,
    )


class VAEAndDisc(nn.Module):
    """The trained modules as one tree (what the training state stores): `vae` and, when used, `disc`."""

    def __init__(self, vae: AutoencoderKL, disc: nn.Module | None):
        super().__init__()
        self.vae = vae
        self.disc = disc


def heldout_images(cfg: VAETrainConfig, n: int) -> torch.Tensor:
    """[n, 3, R, R] images never trained on: the shapes validation split, or a folder's first n items."""
    if cfg.data == "shapes":
        from latentforge.shapes.data import sample, to_tensor

        return torch.stack(
            [to_tensor(sample(cfg.seed, "validation", i, cfg.resolution)[0]) for i in range(n)]
        )
    from latentforge.training.data import ImageFolder

    folder = ImageFolder(cfg.data, cfg.resolution, center_crop=True, seed=cfg.seed)
    return torch.stack([folder[i]["image"] for i in range(min(n, len(folder)))])


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, x: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """x̂ = decode(mean of q(z|x)), in chunks."""
    return torch.cat([vae.decode(vae.encode(x[s : s + chunk]).mean) for s in range(0, len(x), chunk)])


@torch.no_grad()
def measure_scale(vae: AutoencoderKL, images: torch.Tensor, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    zs = [vae.encode(images[s : s + 16]).sample(g) for s in range(0, len(images), 16)]
    return latent_scale_factor(zs)


def export_vae(path: str, vae: AutoencoderKL, scale: float | None) -> None:
    meta = {"latentforge.configs": configs_to_json({"vae": vae.config})}
    if scale is not None:
        meta["latentforge.latent_format"] = LatentFormat(scale).to_json()
    save_state_dict(vae.state_dict(), path, metadata=meta)


def train_vae(
    cfg: VAETrainConfig,
    out: str,
    resume: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    device: str | None = None,
    stop_after: int | None = None,
) -> dict:
    world = dist.init(device)
    try:
        return _train(cfg, out, resume, dry_run, progress, world, stop_after)
    finally:
        dist.shutdown()


def _train(cfg: VAETrainConfig, out, resume, dry_run, progress, world, stop_after) -> dict:
    dev = world.device
    torch.manual_seed(cfg.seed)
    vae = load_vae_file(cfg.init_from)[0] if cfg.init_from else AutoencoderKL(cfg.vae)
    if cfg.init_from:
        cfg.vae = vae.config
    lcfg = loss_config(cfg)
    disc = build_discriminator(lcfg) if cfg.disc_weight > 0 else None
    if disc is not None and world.distributed:
        disc = nn.SyncBatchNorm.convert_sync_batchnorm(disc)
    model = VAEAndDisc(vae.train().requires_grad_(True), disc).to(dev)
    groups = [{"params": list(model.vae.parameters()), "weight_decay": cfg.weight_decay}]
    if disc is not None:
        groups.append({"params": list(model.disc.parameters()), "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    n_vae = sum(p.numel() for p in model.vae.parameters())
    n_disc = sum(p.numel() for p in model.disc.parameters()) if disc is not None else 0
    G = cfg.batch_size * world.world_size
    if world.main:
        print(
            f"VAE {n_vae:,} parameters, discriminator {n_disc:,}; effective batch "
            f"{G * cfg.grad_accum} = {cfg.batch_size} per rank × {world.world_size} ranks × "
            f"{cfg.grad_accum} accumulation; device {dev}",
            flush=True,
        )
    dataset = dataset_for(cfg, world)
    if dry_run:
        if world.main:
            print(json.dumps(to_dict(cfg), indent=2))
            x = torch.stack([dataset[k]["image"] for k in dataset.global_batch(0, G)[: cfg.batch_size]]).to(
                dev
            )
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as fc:
                autoencoder_loss(lcfg, model.vae, x, 0, None)[0].backward()
            t0 = time.perf_counter()
            autoencoder_loss(lcfg, model.vae, x, 0, None)[0].backward()
            sec = (time.perf_counter() - t0) * cfg.grad_accum
            print(
                f"FLOPs per step (forward + backward, without the discriminator): "
                f"{fc.get_total_flops() * cfg.grad_accum / 1e9:,.2f} GFLOP"
            )
            print(
                f"estimated time per step: {sec:.3f} s; "
                f"{cfg.max_steps} steps ≈ {sec * cfg.max_steps / 60:.1f} min"
            )
            return {"parameters": {"vae": n_vae, "disc": n_disc}, "seconds_per_step": sec}
        return {}
    state_root = os.path.join(out, "state")
    if world.main:
        os.makedirs(out, exist_ok=True)
    dist.barrier(world)
    existing = step_dirs(state_root) if os.path.isdir(state_root) else []
    if existing and not resume:
        raise ValueError(
            f"{out!r} already holds a run (step {existing[-1][0]}); pass --resume {out} to "
            "continue it or choose another --out"
        )
    ema = EMA(model, decay=cfg.ema_decay)  # the VAE's average is what is exported (the disc's is unused)
    start = 0
    if resume and existing:
        info = load_training_state(
            state_root,
            model,
            ema,
            optimizer,
            rng=True,
            expected_config=to_dict(cfg),
            config_keys=VAE_MODEL_FIELDS,
        )
        start = info["step"]
    if world.main:
        write_json_atomic(os.path.join(out, "config.json"), to_dict(cfg))
    log = MetricsLog(os.path.join(out, "metrics.jsonl"), start, enabled=world.main)
    net_vae, net_disc = model.vae, model.disc
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [dev.index] if dev.type == "cuda" else None
        net_vae = DDP(model.vae, device_ids=ids)
        if disc is not None:
            net_disc = DDP(model.disc, device_ids=ids)
    if cfg.compile:
        net_vae = torch.compile(net_vae)
    loader = iter(data_loader(cfg, dataset, start * cfg.grad_accum, world))
    bar = progress_bar(start, cfg.max_steps, enabled=progress and world.main)
    step, ran, t0, t_wait = start, 0, time.perf_counter(), 0.0
    held = heldout_images(cfg, cfg.eval_n) if world.main and cfg.eval_n else None
    logs: dict = {}
    while step < cfg.max_steps and (stop_after is None or ran < stop_after):
        lr = apply_lr(
            optimizer,
            step,
            cfg.lr,
            warmup_steps=cfg.warmup_steps,
            total_steps=cfg.max_steps,
            schedule=cfg.lr_schedule,
            min_lr_ratio=cfg.min_lr_ratio,
        )
        active = gan_active(lcfg, step, disc)
        sums: dict[str, float] = {}
        for a in range(cfg.grad_accum):
            m = step * cfg.grad_accum + a
            tw = time.perf_counter()
            x = next(loader)["image"].to(dev)
            t_wait += time.perf_counter() - tw
            gen = micro_generator(cfg.seed * 7919 + world.rank, m)
            if disc is not None:
                model.disc.requires_grad_(False)
            with autocast(cfg.precision, dev):
                loss, logs, recon = autoencoder_loss(lcfg, net_vae, x, step, net_disc, gen)
            (loss / cfg.grad_accum).backward()
            if active:
                model.disc.requires_grad_(True)
                with autocast(cfg.precision, dev):
                    d_loss, d_logs = discriminator_loss(lcfg, net_disc, x, recon, step)
                (d_loss / cfg.grad_accum).backward()
                logs.update(d_logs)
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum
        loss_value = float(dist.mean(world, torch.tensor(sums["loss"])))
        if not math.isfinite(loss_value):
            last = os.path.join(out, "checkpoints", "last.safetensors")
            good = last if os.path.exists(last) else "none (no checkpoint was written yet)"
            log.write({"step": step + 1, "error": f"non-finite loss {loss_value}"})
            raise TrainingError(
                f"the loss is {loss_value} at step {step + 1}; stopping. The last good checkpoint: {good}"
            )
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.vae.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model)
        step += 1
        ran += 1
        elapsed = time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", rec=f"{sums['rec']:.4f}")
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            log.write(
                {
                    "step": step,
                    "lr": lr,
                    **sums,
                    "loss": loss_value,
                    "it_s": ran / elapsed,
                    "data_wait": t_wait / elapsed,
                }
            )
        end = step == cfg.max_steps
        if step % cfg.checkpoint_every == 0 or end:
            _checkpoint(cfg, model, ema, optimizer, out, step, world, held, end)
        if world.main and held is not None and ((cfg.sample_every and step % cfg.sample_every == 0) or end):
            log.write({"step": step, **_evaluate(model, ema, held, os.path.join(out, "samples"), step)})
        dist.barrier(world)
    bar.close()
    if world.main and step == cfg.max_steps:
        save_loss_plot(os.path.join(out, "metrics.jsonl"), os.path.join(out, "loss.png"), key="rec")
    return {"step": step, "loss": logs.get("loss"), "out": out}


def _checkpoint(cfg, model, ema, optimizer, out, step, world, held, end) -> None:
    if world.main:
        save_training_state(
            os.path.join(out, "state"),
            step,
            model,
            ema,
            optimizer,
            data_position={"micro_batch": step * cfg.grad_accum},
            config=to_dict(cfg),
            keep_last=cfg.keep_last,
        )
        folder = os.path.join(out, "checkpoints")
        os.makedirs(folder, exist_ok=True)
        with ema.swapped(model):
            scale = measure_scale(model.vae.eval(), held) if held is not None and len(held) > 1 else None
            model.vae.train()
            target = os.path.join(folder, f"step-{step:08d}.safetensors")
            export_vae(target, model.vae, scale)
        tmp = os.path.join(folder, f".last.safetensors.tmp-{os.getpid()}")
        shutil.copyfile(target, tmp)
        os.replace(tmp, os.path.join(folder, "last.safetensors"))
        files = sorted(f for f in os.listdir(folder) if f.startswith("step-"))
        for f in files[: -cfg.keep_last] if cfg.keep_last else []:
            os.remove(os.path.join(folder, f))
    dist.barrier(world)


def _evaluate(model: VAEAndDisc, ema: EMA, held: torch.Tensor, folder: str, step: int) -> dict:
    """PSNR / SSIM of the held-out images through the EMA weights, and a grid (originals above)."""
    from PIL import Image

    from latentforge.plot import save_png

    with ema.swapped(model):
        vae = model.vae.eval()
        dev = next(vae.parameters()).device
        recon = reconstruct(vae, held.to(dev)).float().cpu().clamp(-1, 1)
        vae.train()
    p, s = psnr(held, recon).mean().item(), ssim(held, recon).mean().item()
    k = min(8, len(held))
    pair = torch.cat([held[:k], recon[:k]])  # [2k, 3, H, W]
    arr = ((pair + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    h, w = arr.shape[1:3]
    grid = np.zeros((2 * h, k * w, 3), np.uint8)
    for i in range(2 * k):
        grid[(i // k) * h : (i // k + 1) * h, (i % k) * w : (i % k + 1) * w] = arr[i]
    os.makedirs(folder, exist_ok=True)
    img = Image.fromarray(grid).resize((2 * k * w, 4 * h), Image.Resampling.NEAREST)
    save_png(img, os.path.join(folder, f"step-{step:08d}.png"))
    return {"psnr": p, "ssim": s}
