"""The VAE trainer: a KL autoencoder (Rombach et al. 2022, §3) with an optional patch-GAN after a warm-up.

One step on global micro-batch m (the data feeding of both trainers, feed.py):

    x ─► vae(x) = (x̂, q(z|x)) ─► L_AE = rec + kl_weight·KL/(C·H·W) [+ λ·GAN]   (vae_losses.autoencoder_loss)
    (x, x̂.detach()) ─► L_D (hinge), only from disc_start on              (vae_losses.discriminator_loss)

The discriminator's parameters are frozen while L_AE is differentiated and the VAE's are not touched by
L_D, so one AdamW with two parameter groups (VAE; discriminator without weight decay) applies both updates at
once — what LDM's alternating two-optimizer step does on the same batch. The step loop (accumulation, fp16
scaling, clipping of the VAE's gradients, EMA, checkpoints) is loop.py's; `VAETask` supplies the micro-step.

At every sample step and at the end (EMA weights): PSNR and SSIM of held-out images reconstructed through
the posterior mean, a reconstruction grid, and at the end the latent scale factor 1/std of the latents of
the data (LDM `scale_by_std`), saved with the model: `checkpoints/last.safetensors` holds the VAE with bare
LDM keys (`encoder.*`, `decoder.*`, `quant_conv.*`: the layout of SD's standalone VAE files), its config and
`latentforge.latent_format` in the metadata; `train denoiser --vae PATH` reads both.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from latentforge.checkpoints import configs_to_json, load_vae_file, save_state_dict
from latentforge.models.init import init_weights
from latentforge.models.vae import AutoencoderKL, LatentFormat
from latentforge.training import dist, loop, run_folder
from latentforge.training.config import VAETrainConfig
from latentforge.training.ema import weights_swapped
from latentforge.training.feed import dataset_for, micro_generator
from latentforge.training.optim import adamw, autocast
from latentforge.training.samples import save_grid
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
        gdl_weight=cfg.gdl_weight,
        detail_weight=cfg.detail_weight,
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

    folder = ImageFolder(
        cfg.data, cfg.resolution, center_crop=True, seed=cfg.seed, min_size=cfg.min_image_size
    )
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


def export_vae(path: str, vae: AutoencoderKL, fmt: LatentFormat | None) -> None:
    meta = {"latentforge.configs": configs_to_json({"vae": vae.config})}
    if fmt is not None:
        meta["latentforge.latent_format"] = fmt.to_json()
    save_state_dict(vae.state_dict(), path, metadata=meta)


def train_vae(
    cfg: VAETrainConfig,
    out: str,
    resume: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    device: str | None = None,
    stop_after: int | None = None,
    strict: bool = False,
) -> dict:
    """Run (or continue, with `resume`) a VAE training run into folder `out`; returns a summary (loop.run)."""
    world = dist.init(device)
    try:
        with run_folder.claim(out, cfg, resume, world, dry_run):  # the folder's lock, checks and leftovers
            return loop.run(VAETask(cfg, world), out, resume, dry_run, progress, stop_after, strict)
    finally:
        dist.shutdown()


def narrow_posterior(vae: AutoencoderKL, logvar: float) -> None:
    """Make q(z|x) narrow: the bias of the log-variance half of the moments (quant_conv's output, else the
    encoder's conv_out) set to `logvar`, at the start of a run. With LDM's init the posterior's σ starts
    near 1 while the means are O(1), and with kl_weight 1e-6 nothing pulls σ down quickly: measured on
    shapes64-vae, σ was still 0.96 on average after 300 steps, and after 1000 steps the decoder drew the
    backgrounds but only grey blobs for the shapes (PSNR 21 dB; MODEL_CARD.md)."""
    z = vae.config.embed_dim if vae.config.use_quant_conv else vae.config.z_channels
    last = vae.quant_conv if vae.config.use_quant_conv else vae.encoder.conv_out
    with torch.no_grad():
        last.bias[z:] = logvar  # moments = [mean (z channels), logvar (z channels)]


def freeze_encoder(vae: AutoencoderKL) -> None:
    """Train the decoder only: the encoder and quant_conv stop taking gradients, so q(z|x) and the latent
    scale are those of the starting VAE and a denoiser trained on its latents keeps working with the new
    decoder (the decoder-only fine-tunes of SD's VAE, sd-vae-ft-ema / ft-mse, were made this way)."""
    vae.encoder.requires_grad_(False)
    if vae.quant_conv is not None:
        vae.quant_conv.requires_grad_(False)


class VAETask(loop.Task):
    """The VAE and its discriminator as one trained tree (`VAEAndDisc`), one AdamW over both (two groups),
    the autoencoder + discriminator micro-step, and the exported VAE file with its measured latent scale."""

    config_keys = VAE_MODEL_FIELDS
    plot_key = "rec"
    progress_keys = ("rec",)

    def __init__(self, cfg: VAETrainConfig, world: dist.World):
        init_rng = torch.Generator().manual_seed(cfg.seed)  # initial weights: from this, not the global RNG
        self.kept_format = None  # decoder only: the starting file's latent format, exported unchanged
        if cfg.init_from:
            vae, fmt = load_vae_file(cfg.init_from)
            cfg.vae = vae.config
            if cfg.train_part == "decoder":
                self.kept_format = fmt
        else:
            vae = init_weights(AutoencoderKL(cfg.vae), init_rng)
        if cfg.logvar_init is not None:
            narrow_posterior(vae, cfg.logvar_init)
        self.lcfg = loss_config(cfg)
        disc = build_discriminator(self.lcfg, generator=init_rng) if cfg.disc_weight > 0 else None
        if disc is not None and world.distributed:
            disc = nn.SyncBatchNorm.convert_sync_batchnorm(disc)
        model = VAEAndDisc(vae.train().requires_grad_(True), disc).to(world.device)
        if cfg.train_part == "decoder":
            freeze_encoder(model.vae)
        if world.main:
            n_vae = sum(p.numel() for p in model.vae.parameters())
            n_train = sum(p.numel() for p in model.vae.parameters() if p.requires_grad)
            n_disc = sum(p.numel() for p in disc.parameters()) if disc is not None else 0
            batch = loop.describe_batch(cfg, world)
            sizes = f"VAE {n_vae:,} parameters ({n_train:,} trained), discriminator {n_disc:,}"
            print(f"{sizes}; {batch}", flush=True)
        super().__init__(cfg, world, model, dataset_for(cfg, world))

    @functools.cached_property
    def held(self) -> torch.Tensor | None:
        """The held-out images of the evaluation and the latent scale (rank 0), None with eval_n = 0."""
        return heldout_images(self.cfg, self.cfg.eval_n) if self.cfg.eval_n else None

    def optimizer(self) -> torch.optim.Optimizer:
        cfg, model = self.cfg, self.model
        trained = [p for p in model.vae.parameters() if p.requires_grad]
        groups = [{"params": trained, "weight_decay": cfg.weight_decay}]
        if model.disc is not None:
            groups.append({"params": list(model.disc.parameters()), "weight_decay": 0.0})
        return adamw(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)

    def units(self) -> dict[str, nn.Module]:
        units = {"vae": self.model.vae}
        if self.model.disc is not None:
            units["disc"] = self.model.disc
        return units

    def clip_parameters(self):
        return self.model.vae.parameters()

    def compiled(self) -> list[nn.Module]:
        return [self.model.vae]

    def micro_step(self, mb: loop.MicroBatch) -> dict[str, float]:
        """L_AE through the VAE with the discriminator frozen, then (from disc_start on) L_D training it."""
        cfg, lcfg, disc = self.cfg, self.lcfg, self.model.disc
        dev = self.world.device
        x = mb.batch["image"].to(dev)
        gen = micro_generator(cfg.seed * 7919 + self.world.rank, mb.m)
        if disc is not None:
            disc.requires_grad_(False)
        with autocast(cfg.precision, dev):
            loss, logs, recon = autoencoder_loss(lcfg, mb.nets["vae"], x, mb.step, mb.nets.get("disc"), gen)
        mb.backward(loss)
        if gan_active(lcfg, mb.step, disc):
            disc.requires_grad_(True)
            with autocast(cfg.precision, dev):
                d_loss, d_logs = discriminator_loss(lcfg, mb.nets["disc"], x, recon, mb.step)
            mb.backward(d_loss)
            logs.update(d_logs)
        return logs

    def export(self, path: str, weights) -> None:
        """The VAE with `weights` (EMA) and the latent scale measured on the held-out images through them."""
        model, held = self.model, self.held
        with weights_swapped(model, weights):
            if self.kept_format is not None:  # the encoder did not train: its latents keep their format
                fmt = self.kept_format
            elif held is not None and len(held) > 1:
                fmt = LatentFormat(measure_scale(model.vae.eval(), held))
            else:
                fmt = None
            model.vae.train()
            export_vae(path, model.vae, fmt)

    def samples(self, path: str, weights) -> dict | None:
        """PSNR / SSIM of the held-out images through `weights` (EMA), and a grid (originals above)."""
        model, held = self.model, self.held
        if held is None:
            return None
        with weights_swapped(model, weights):
            vae = model.vae.eval()
            recon = reconstruct(vae, held.to(self.world.device)).float().cpu().clamp(-1, 1)
            vae.train()
        k = min(8, len(held))
        pair = torch.cat([held[:k], recon[:k]])  # [2k, 3, H, W]
        arr = ((pair + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        from PIL import Image

        save_grid([Image.fromarray(a) for a in arr], path, cols=k)
        return {"psnr": psnr(held, recon).mean().item(), "ssim": ssim(held, recon).mean().item()}
