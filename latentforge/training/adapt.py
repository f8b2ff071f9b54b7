"""What the add-on trainers share (LoRA, lora_train.py; textual inversion, embedding_train.py): a frozen
checkpoint, a small trained module on top of it, and the denoiser trainer's loop around both.

`AdaptTask` is a `DenoiserTask` (trainer.py: data, caches, buckets, the micro-step, samples) that loads the
base with the checkpoint's own objective and latent scale, freezes every weight of it, and leaves `model`
to the subclass: the module the optimizer, the EMA, DDP and the training state see. `run` wraps loop.run
and copies the finished run's last export to `<out>/<name>.safetensors`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import torch
from torch import nn

from latentforge import families, files
from latentforge.checkpoint_io import read_metadata
from latentforge.training import config as C
from latentforge.training import dist, loop, run_folder
from latentforge.training.objectives import ObjectiveConfig
from latentforge.training.trainer import DenoiserTask


def base_checkpoint(init_from: str | None) -> str:
    """The checkpoint a run adapts: `init_from`, or the shipped default model when it is None."""
    if init_from is None:
        from latentforge.pipeline import DEFAULT_MODEL

        return DEFAULT_MODEL
    return init_from


def checkpoint_family(path: str) -> str:
    """The family of a checkpoint without loading it: its latentforge metadata, else its keys' shapes."""
    from latentforge.checkpoints import detect_family

    meta = read_metadata(path)
    if "latentforge.family" in meta:
        return meta["latentforge.family"]
    if path.lower().endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    else:
        from latentforge.checkpoint_io import read_state_dict

        shapes = {k: tuple(v.shape) for k, v in read_state_dict(path).items()}
    return detect_family(shapes).family


def base_objective(path: str, family: str) -> ObjectiveConfig:
    """The objective the base model was trained with: its file's `latentforge.objective`, else its family's
    prediction with DDPM's uniform timesteps (rectified flow: SD3's logit-normal draw)."""
    meta = read_metadata(path)
    if "latentforge.objective" in meta:
        return C.build(ObjectiveConfig, json.loads(meta["latentforge.objective"]), "objective")
    ms = families.get(family).sampling(None, None)
    if type(ms).__name__ == "DiscreteFlow":
        return ObjectiveConfig(prediction="flow", sigma_sampling="logit_normal")
    return ObjectiveConfig(prediction=getattr(ms, "prediction", "eps"))


def prepare(cfg, what: str) -> str:
    """Fill what the checkpoint decides (family; the objective when None) into `cfg`; returns its path.
    Only the UNet families are adapted here (their LoRA and embedding layouts are the ones tools share)."""
    path = base_checkpoint(cfg.init_from)
    family = checkpoint_family(path)
    if families.get(family).net != "unet" or family not in C.FAMILIES_TRAINABLE:
        unets = ", ".join(f for f in C.FAMILIES_TRAINABLE if families.get(f).net == "unet")
        raise ValueError(f"{path!r} is a {family} checkpoint; {what} training here adapts the UNet families "
                         f"({unets})")  # fmt: skip
    cfg.family = family
    if cfg.objective is None:
        cfg.objective = base_objective(path, family)
    return path


def modelspec_architecture(cfg) -> str:
    """ModelSpec's architecture id of the base (kohya's sai_model_spec.py `determine_architecture`)."""
    if cfg.family.startswith("sdxl"):
        return "stable-diffusion-xl-v1-base"
    if cfg.family == "sd21":
        return "stable-diffusion-v2-768-v" if cfg.objective.kind == "v" else "stable-diffusion-v2-512"
    return "stable-diffusion-v1"


def resolve(cls, what: str, preset: str | None = None, toml: str | None = None, overrides=None):
    """A `cls` config from a TOML file and flags (no presets); the image size defaults to the base model's
    (its file's `latentforge.resolution`, else its family's native size), and a family given is checked
    against the checkpoint's (the run takes the checkpoint's family in any case)."""
    if preset is not None:
        raise ValueError(f"train {what} has no presets (got --preset {preset!r}); give --init_from and flags")
    d: dict = {}
    if toml is not None:
        fields = C._flatten_tables(C.load_toml(toml))
        C.check_toml_fields(cls, fields, f"config file {toml!r}")
        d = C._override_dict(cls, d, fields)
    if overrides:
        d = C._override_dict(cls, d, dict(overrides))
    init = d.get("init_from")
    path = base_checkpoint(None if str(init).lower() in ("none", "null") else init)
    if "family" in d and isinstance(path, str) and os.path.isfile(path):
        family = checkpoint_family(path)
        if d["family"] != family:
            raise ValueError(
                f"family={d['family']!r}: {path!r} is a {family} checkpoint; a {what} run adapts its "
                "checkpoint as it is (leave family out)"
            )
    if "resolution" not in d:
        if isinstance(path, str) and os.path.isfile(path):
            res = read_metadata(path).get("latentforge.resolution")
            res = res or families.get(checkpoint_family(path)).size
            if res is not None:
                d["resolution"] = int(res)
    return C.build(cls, d)


class AdaptTask(DenoiserTask):
    """A DenoiserTask on a frozen base (`setup.model`, a trainer.TextToImage). Subclasses set `self.model`
    to the trained module, whose forward(x, t, prompts, size, cond) the micro-step calls. `text_runs`: the
    text encoders run every step (a LoRA on them, or an embedding in their input), so their outputs are
    not cached and they sit with the trained parts of `setup.model` (all frozen here)."""

    what = "adapter"

    def __init__(self, cfg, world: dist.World, out: str, dry_run: bool = False, text_runs: bool = False):
        self.base_path = prepare(cfg, self.what)
        self.out_dir = out
        given = cfg.init_from, cfg.train_text_encoder  # None: the shipped model, recorded as None
        cfg.init_from, cfg.train_text_encoder = self.base_path, text_runs  # what build_models reads
        try:
            super().__init__(cfg, world, out, dry_run)
        finally:
            cfg.init_from, cfg.train_text_encoder = given
        self.setup.model.requires_grad_(False).eval()
        self.steps_done = 0

    def components_of_base(self) -> dict[str, nn.Module]:
        model = self.setup.model
        return {**dict(model.parts.items()), **model.frozen, **self.setup.extra_components}

    def components(self) -> dict[str, nn.Module]:
        return {**self.components_of_base(), self.what: self.model}

    def compiled(self) -> list[nn.Module]:
        return [self.setup.model.parts[self.cfg.net]]

    def micro_step(self, mb: loop.MicroBatch) -> dict[str, torch.Tensor]:
        self.steps_done = mb.step + 1  # the step an export after this micro-step belongs to
        return super().micro_step(mb)

    def base_hashes(self) -> tuple[str, str]:
        """A1111's old model hash of the base checkpoint (SHA-256 of 64 KiB at 1 MiB, 8 hex digits; kohya's
        ss_sd_model_hash) and the file's SHA-256 (ss_new_sd_model_hash; A1111's shorthash is its first 10
        digits), computed once."""
        if not hasattr(self, "_hashes"):
            h = hashlib.sha256()
            with open(self.base_path, "rb") as f:
                f.seek(0x100000)
                old = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
                f.seek(0)
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            self._hashes = (old, h.hexdigest())
        return self._hashes


def run(task_cls, cfg, out: str, name: str, resume: bool, dry_run: bool, progress: bool, device, stop_after,
        strict: bool) -> dict:  # fmt: skip
    """loop.run of a `task_cls` run in `out`; once it has reached max_steps, its last export is copied to
    `<out>/<name>.safetensors` (summary["file"])."""
    world = dist.init(device)
    try:
        with run_folder.claim(out, cfg, resume, world, dry_run):
            task = task_cls(cfg, world, out, dry_run)
            summary = loop.run(task, out, resume, dry_run, progress, stop_after, strict)
            if not dry_run and world.main and summary.get("step") == cfg.max_steps:
                final = os.path.join(out, name + ".safetensors")
                with files.atomic_path(final) as tmp:
                    shutil.copyfile(os.path.join(out, "checkpoints", "last.safetensors"), tmp)
                summary["file"] = final
            return summary
    finally:
        dist.shutdown()
