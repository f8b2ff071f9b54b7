"""`latentforge train lora`: LoRA layers on a frozen checkpoint, trained by the denoiser trainer's own loop.

    checkpoint (init_from; default: the shipped shapes64) ─ frozen: UNet, text encoders, VAE
    lora_network.LoRANetwork: kohya-named low-rank layers hooked onto the UNet (and the text encoders)
    DenoiserTask's micro-step, data, caches, buckets, samples ─ loop.run: resume, DDP, metrics, checkpoints

Everything a denoiser run does (folder or shapes data, aspect-ratio buckets, cached latents and frozen text
conditioning, grad accumulation, the LR schedule, torchrun, exact resume, the sample grid and the shapes
evaluator) it does the same way: `LoRATask` is an adapt.AdaptTask (a DenoiserTask on a frozen base) whose
trained module is the LoRANetwork. The objective is the base model's (its file's `latentforge.objective`,
else its family's prediction).

Outputs under `out/` are a denoiser run's, except that checkpoints/step-N.safetensors and last.safetensors
are LoRA files in kohya's layout with kohya's `ss_*` metadata (sd-scripts train_network.py, whose key names
and value formats these follow) and `modelspec.*` (library/sai_model_spec.py), and the finished run copies
the last one to `<out>/<output_name>.safetensors`, the name `<lora:output_name:1>` finds in a LoRA folder.
Both latentforge.lora and diffusers' `load_lora_weights` load it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from latentforge import families
from latentforge.checkpoint_io import save_state_dict
from latentforge.training import adapt, dist
from latentforge.training import config as C
from latentforge.training.config import MODEL_FIELDS, DenoiserTrainConfig
from latentforge.training.lora_network import (
    LoRANetwork,
    kohya_hashes,
    kohya_state_dict,
    parse_modules,
    text_sites,
    unet_sites,
    used_text_sites,
)
from latentforge.training.objectives import ObjectiveConfig
from latentforge.training.optim import adamw
from latentforge.training.trainer import pipeline_for


@dataclass
class LoRATrainConfig(DenoiserTrainConfig):
    """A denoiser run's fields (the model ones are the checkpoint's) plus the LoRA's. Defaults differ where
    a LoRA run differs: kohya's rank 4 and alpha 1 (sd-scripts' network_dim and network_alpha defaults), no
    caption dropout (kohya's default), no EMA (ema_decay 0: the export is the trained weights), the text
    encoder frozen."""

    rank: int = 4  # r: rows of A (lora_down) and columns of B (lora_up)
    alpha: float = 1.0  # α: ΔW = (α/r)·B·A; α = r gives scale 1
    modules: str = "all-linear"  # "attn" | "attn+ff" | "all-linear", each optionally + "+conv"
    text_encoder_lr: float | None = None  # the text-encoder LoRA's learning rate (None: lr)
    output_name: str | None = None  # the final file's stem (None: the run folder's name)
    objective: ObjectiveConfig | None = None  # None: the base model's (set when the run starts)
    train_text_encoder: bool = False  # LoRA layers on the text encoder(s) too (--text-encoder)
    caption_dropout: float = 0.0
    ema_decay: float = 0.0  # 0: no averaging (the EMA is the weights); e.g. 0.999 for an EMA export

    def __post_init__(self):
        super().__post_init__()
        C._int_at_least("rank", self.rank, 1)
        if not self.alpha > 0:
            raise ValueError(
                f"alpha must be > 0 (ΔW = (alpha/rank)·B·A; alpha = rank gives scale 1), got {self.alpha}"
            )
        parse_modules(self.modules)
        if self.text_encoder_lr is not None and not self.text_encoder_lr > 0:
            raise ValueError(f"text_encoder_lr must be > 0 (or None: lr), got {self.text_encoder_lr}")
        if self.parallel != "ddp":
            raise ValueError(
                f"parallel={self.parallel!r}: a LoRA run replicates its small LoRA layers (DDP); the frozen "
                "base is not sharded, so use parallel='ddp'"
            )
        if self.text_encoder is not None:
            raise ValueError(
                f"text_encoder={self.text_encoder!r}: a LoRA run takes its text encoders from init_from; "
                "--text-encoder / --no-text-encoder switch LoRA layers on them on and off"
            )
        if self.output_name is not None and not re.fullmatch(r"[\w .()\[\]+-]+", self.output_name):
            raise ValueError(
                f"output_name={self.output_name!r}: letters, digits, spaces and ._-+()[] only (it names "
                "<output_name>.safetensors, and <lora:output_name:1> in a prompt)"
            )


LORA_FIELDS = ("init_from", "rank", "alpha", "modules", "train_text_encoder")


def resolve(preset: str | None = None, toml: str | None = None, overrides=None) -> LoRATrainConfig:
    """The config of a LoRA run from a TOML file and flags (no presets); the image size defaults to the
    base model's."""
    return adapt.resolve(LoRATrainConfig, "lora", preset, toml, overrides)


def cli_overrides(overrides: dict) -> dict:
    """The command line's `--text-encoder` / `--no-text-encoder` switches as `train_text_encoder`."""
    out = dict(overrides)
    for flag, on in (("text_encoder", True), ("no_text_encoder", False)):
        if flag not in out:
            continue
        value = out.pop(flag)
        if not isinstance(value, str) or value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(
                f"--{flag.replace('_', '-')} is a switch for train lora (LoRA layers on the text encoders "
                f"too, or not), got {value!r}; the text encoders come from --init_from"
            )
        truth = value.lower() in ("true", "1", "yes")
        out["train_text_encoder"] = "true" if truth == on else "false"
    return out


def output_name(cfg, out: str) -> str:
    return cfg.output_name or (os.path.basename(os.path.normpath(out)) if out else "") or "lora"


def train_lora(
    cfg: LoRATrainConfig,
    out: str,
    resume: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    device: str | None = None,
    stop_after: int | None = None,
    strict: bool = False,
) -> dict:
    """Run (or continue) a LoRA run into folder `out`; returns the loop's summary plus "lora", the path of
    `<out>/<output_name>.safetensors` once the run has reached max_steps."""
    summary = adapt.run(LoRATask, cfg, out, output_name(cfg, out), resume, dry_run, progress, device,
                        stop_after, strict)  # fmt: skip
    if "file" in summary:
        summary["lora"] = summary.pop("file")
    return summary


class LoRATask(adapt.AdaptTask):
    """An AdaptTask whose trained module is a LoRANetwork on the frozen base (`setup.model`)."""

    config_keys = (*MODEL_FIELDS, *LORA_FIELDS)
    what = "lora"

    def __init__(self, cfg: LoRATrainConfig, world: dist.World, out: str, dry_run: bool = False):
        super().__init__(cfg, world, out, dry_run, text_runs=cfg.train_text_encoder)
        self.started_at = time.time()
        self.session_id = int.from_bytes(os.urandom(4), "little")
        base = self.setup.model
        comps = base.encoders()
        names = families.get(cfg.family).text_encoders
        sites = unet_sites(base.parts[cfg.net], cfg.family, cfg.modules)
        if cfg.train_text_encoder:
            te = text_sites({n: comps[n] for n in names}, cfg.modules)
            sites += used_text_sites(base, te, cfg.resolution)
        self.network = LoRANetwork(base, sites, cfg.rank, cfg.alpha, seed=cfg.seed)
        self.model = self.network
        if world.main:
            n = sum(p.numel() for p in self.network.parameters())
            parts = sorted({s.name.split("_")[1] for s in sites})
            where = f"{os.path.basename(self.base_path)} ({cfg.family})"
            print(f"LoRA: {len(sites)} layers ({', '.join(parts)}), rank {cfg.rank}, alpha {cfg.alpha:g}, "
                  f"{n:,} parameters on {where}", flush=True)  # fmt: skip

    # -- what the loop asks of a task ----------------------------------------------------------------------

    def optimizer(self) -> torch.optim.Optimizer:
        """AdamW over the LoRA layers: the UNet's at lr, the text encoders' at text_encoder_lr (a group
        "lr_scale", which optim.set_lr applies under the schedule)."""
        cfg = self.cfg
        groups: dict[bool, list[nn.Parameter]] = {True: [], False: []}
        for name, p in self.network.named_parameters():
            groups[name.startswith("layers.lora_unet_")].append(p)
        te_scale = (cfg.text_encoder_lr or cfg.lr) / cfg.lr
        param_groups = [{"params": groups[True]}]
        if groups[False]:
            param_groups.append({"params": groups[False], "lr_scale": te_scale})
        return adamw(
            param_groups,
            lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
        )

    def export(self, path: str, weights: Mapping[str, torch.Tensor]) -> None:
        tensors = kohya_state_dict(weights)
        meta = self.metadata()
        save_state_dict(tensors, path, metadata={**meta, **kohya_hashes(tensors, meta)})

    def samples(self, path: str, weights: Mapping[str, torch.Tensor]) -> dict | None:
        """The sample grid (and shapes evaluation) of the base with this LoRA patched on by latentforge.lora,
        as a user's generation would apply the exported file; the training hooks are off meanwhile."""
        from latentforge import lora
        from latentforge.training.samples import denoiser_samples

        net = lora.lora_from_state_dict(kohya_state_dict(weights), "samples")
        pipe = pipeline_for(self.setup, self.ms)
        with torch.no_grad(), self.network.disabled(), lora.patch(pipe, net):
            return denoiser_samples(self.cfg, pipe, path)

    # -- kohya's metadata ----------------------------------------------------------------------------------

    def metadata(self) -> dict[str, str]:
        """kohya's ss_* keys (train_network.py) where they apply, values formatted as it formats them (str()
        of the Python value), and modelspec.* (sai_model_spec.py, ModelSpec 1.0.1)."""
        cfg, world = self.cfg, self.world
        G = cfg.batch_size * world.world_size
        per_epoch = getattr(self.dataset, "per_epoch", None)  # folder data: batches per epoch; shapes: none
        micro = self.steps_done * cfg.grad_accum
        n_images = len(self.dataset.ds) if per_epoch else micro * G  # the stream: images drawn so far
        kind, conv = parse_modules(cfg.modules)
        sdxl = cfg.family.startswith("sdxl")
        v2 = cfg.family == "sd21"
        pred = cfg.objective.kind
        version = "sdxl_base_v1-0" if sdxl else ("sd_v2" if v2 else "sd_v1") + ("_v" if pred == "v" else "")
        name = output_name(cfg, self.out_dir)
        te_lr = (cfg.text_encoder_lr or cfg.lr) if cfg.train_text_encoder else None
        network_args = {"conv_dim": cfg.rank, "conv_alpha": cfg.alpha} if conv else None
        ss = {
            "ss_session_id": self.session_id,
            "ss_training_started_at": self.started_at,
            "ss_training_finished_at": time.time(),
            "ss_output_name": name,
            "ss_learning_rate": cfg.lr,
            "ss_unet_lr": cfg.lr,
            "ss_text_encoder_lr": te_lr,
            "ss_num_train_images": n_images,
            "ss_num_batches_per_epoch": per_epoch,
            "ss_num_epochs": -(-cfg.max_steps * cfg.grad_accum // per_epoch) if per_epoch else None,
            "ss_steps": self.steps_done,
            "ss_epoch": micro // per_epoch if per_epoch else 0,
            "ss_batch_size_per_device": cfg.batch_size,
            "ss_total_batch_size": G * cfg.grad_accum,
            "ss_gradient_checkpointing": cfg.grad_checkpointing,
            "ss_gradient_accumulation_steps": cfg.grad_accum,
            "ss_max_train_steps": cfg.max_steps,
            "ss_lr_warmup_steps": cfg.warmup_steps,
            "ss_lr_scheduler": cfg.lr_schedule,
            "ss_network_module": "networks.lora",
            "ss_network_dim": cfg.rank,
            "ss_network_alpha": cfg.alpha,
            "ss_network_dropout": None,
            "ss_mixed_precision": cfg.precision,
            "ss_v2": v2,
            "ss_base_model_version": version,
            "ss_resolution": (cfg.resolution, cfg.resolution),
            "ss_enable_bucket": cfg.buckets,
            "ss_flip_aug": cfg.random_flip,
            "ss_random_crop": not cfg.center_crop,
            "ss_cache_latents": cfg.cache_latents,
            "ss_seed": cfg.seed,
            "ss_optimizer": f"torch.optim.adamw.AdamW(weight_decay={cfg.weight_decay},"
            f"betas=({cfg.adam_beta1}, {cfg.adam_beta2}))",
            "ss_max_grad_norm": cfg.grad_clip,
            "ss_caption_dropout_rate": cfg.caption_dropout,
            "ss_min_snr_gamma": cfg.objective.min_snr_gamma if cfg.objective.weighting == "min_snr" else None,
            "ss_zero_terminal_snr": cfg.objective.zero_terminal_snr,
            "ss_sd_model_name": os.path.basename(self.base_path),
            "ss_sd_model_hash": self.base_hashes()[0],
            "ss_new_sd_model_hash": self.base_hashes()[1],
        }
        if network_args:
            ss["ss_network_args"] = json.dumps(network_args)
        meta = {k: str(v) for k, v in ss.items()}
        sgm = "https://github.com/Stability-AI/generative-models"  # kohya: SDXL LoRAs name the SGM code
        meta.update({
            "modelspec.sai_model_spec": "1.0.1",
            "modelspec.architecture": adapt.modelspec_architecture(cfg) + "/lora",
            "modelspec.implementation": sgm if sdxl else "diffusers",
            "modelspec.title": name,
            "modelspec.resolution": f"{cfg.resolution}x{cfg.resolution}",
            "modelspec.date": datetime.datetime.fromtimestamp(self.started_at).isoformat(timespec="seconds"),
        })  # fmt: skip
        if pred in ("eps", "v"):
            meta["modelspec.prediction_type"] = "epsilon" if pred == "eps" else "v"
        meta["latentforge.lora"] = json.dumps({"modules": kind + ("+conv" if conv else ""),
                                               "objective": dataclasses.asdict(cfg.objective)})  # fmt: skip
        return meta
