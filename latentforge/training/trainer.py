"""The denoiser trainer: one loop for UNet, DiT and MMDiT, in latent or pixel space, on one process or many.

    batch (images, captions) ─ VAE encode (frozen) ─ LatentFormat.process_in ─► x₀   (pixel space: x₀ = image)
    captions ─ dropout to "" (p = caption_dropout) ─► text encoders (trained jointly or frozen) ─► cond
    σ ~ objective.sigma_sampling, ε ~ N(0, I) ─► objectives.loss(cfg.objective, ms, model, x₀, cond)
    AdamW (warm-up + schedule, clipping, accumulation) ─► EMA of the weights (used for sampling and export)

Determinism. Global micro-batch m (m = step·grad_accum + a) holds dataset items m·G … m·G + G − 1 with
G = batch_size·world_size; rank r takes positions r, r + W, … of it, and the dropout mask, σ and ε of the
whole global batch are drawn from one generator seeded by (seed, m) of which rank r keeps the same rows.
So what a step sees is a pure function of (seed, step): two ranks with batch b compute exactly the terms one
process with batch 2b computes (DDP averages the gradients), and a resumed run sees the same data and
noise as an uninterrupted one without any sampler state.

Outputs under `out/`: config.json, metrics.jsonl, state/step-N/ (exact-resume state, see state.py),
checkpoints/step-N.safetensors and checkpoints/last.safetensors (EMA weights in the original single-file
layout with the configs, objective and latent format in the metadata: `latentforge generate --model` loads
them), samples/step-N.png, loss.png.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time

import numpy as np
import torch
from torch import nn

from latentforge import families, model_sampling
from latentforge.checkpoints import (
    build_component,
    component_file,
    configs_to_json,
    join_components,
    load_checkpoint,
    load_component,
    save_state_dict,
)
from latentforge.models.init import init_weights
from latentforge.models.vae import LatentFormat
from latentforge.training import dist
from latentforge.training.config import MODEL_FIELDS, DenoiserTrainConfig, to_dict
from latentforge.training.loop import (
    MetricsLog,
    TrainingError,
    autocast,
    build_optimizer,
    data_loader,
    dataset_for,
    dry_run_report,
    enable_checkpointing,
    load_vae_file,
    micro_generator,
    progress_bar,
    save_loss_plot,
    write_json_atomic,
)
from latentforge.training.objectives import loss as objective_loss
from latentforge.training.objectives import model_sampling_for, sample_sigmas
from latentforge.training.state import EMA, apply_lr, load_training_state, save_training_state, step_dirs


class TextToImage(nn.Module):
    """What the optimiser updates, as one module (what DDP wraps and the training state stores): the
    denoising network under its component name and, when trained jointly, the text encoders.
    `forward(x, t, prompts, size)` encodes the prompts with every text encoder (trained or frozen) as the
    family's conditioning does at sampling time, then runs the network."""

    def __init__(self, family: str, net_name: str, parts: dict[str, nn.Module], frozen: dict[str, nn.Module]):
        super().__init__()
        self.family, self.net_name = family, net_name
        self.parts = nn.ModuleDict(parts)
        self.frozen = frozen  # a plain dict: not trained, not in this module's state dict

    def encoders(self) -> dict[str, nn.Module]:
        return {**self.frozen, **{k: m for k, m in self.parts.items() if k != self.net_name}}

    def forward(self, x: torch.Tensor, t: torch.Tensor, prompts: list[str], size: tuple[int, int], cond=None):
        """`cond`: precomputed conditioning (cached frozen encoders) instead of encoding `prompts`."""
        net = self.parts[self.net_name]
        if cond is None:
            h, w = size
            net_config = net.config
            cond = families.encode(self.family, self.encoders(), prompts, w, h, False, net_config)
        return net(x, t, **cond)


def scratch_text_encoder(te: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """A text tower trained jointly from scratch: token and position tables drawn N(0, 1) instead of CLIP's
    N(0, 0.02²). With 0.02 the attention and MLP outputs dominate a small tower's residual stream, so every
    position's output is nearly the same vector (mean cosine 0.77 at hidden 64 at init); the UNet's cross-
    attention then has nothing to select between, its query/key gradients vanish (measured 1e-6 against 1e-2
    for its value/output projections) and training collapses the context to one vector (cosine 0.99) that
    serves as a bias. Unit-variance tables (nn.Embedding's default; the √d-scaled embeddings of Vaswani et al.
    2017, §3.4) keep the tokens distinct (mean cosine 0.18)."""
    emb = te.transformer.text_model.embeddings
    with torch.no_grad():
        emb.token_embedding.weight.normal_(0.0, 1.0, generator=generator)
        emb.position_embedding.weight.normal_(0.0, 1.0, generator=generator)
    return te


@dataclasses.dataclass
class Setup:
    cfg: DenoiserTrainConfig
    model: TextToImage
    vae: nn.Module | None
    latent_format: LatentFormat | None
    extra_components: dict[str, nn.Module]  # saved in the exported file as they are (frozen VAE)
    pre: object = None  # precompute.Precomputed when latents / text conditioning are cached


def build_models(cfg: DenoiserTrainConfig, device: torch.device) -> Setup:
    """The networks of a run: from `init_from` (fine-tuning) or built from the configs with seeded init."""
    enc_names = families.get(cfg.family).text_encoders
    extra: dict[str, nn.Module] = {}
    if cfg.init_from is not None:
        ckpt = load_checkpoint(cfg.init_from)
        if ckpt.family != cfg.family:
            raise ValueError(
                f"init_from {cfg.init_from!r} is a {ckpt.family} checkpoint ({ckpt.detection}); "
                f"the config says family={cfg.family!r}"
            )
        if cfg.net not in ckpt.components:
            raise ValueError(f"{cfg.init_from!r} holds no {cfg.net!r}; it has {sorted(ckpt.components)}")
        comps = ckpt.components
        cfg.__dict__[cfg.net] = ckpt.configs[cfg.net]  # the loaded network's config, recorded with the run
        if "clip_l" in ckpt.configs and cfg.text is None and "clip_l" in enc_names:
            cfg.text = ckpt.configs["clip_l"]
        vae = comps.get("vae") if not cfg.pixel_space else None
        if vae is not None and cfg.vae is None:
            extra["vae"] = vae
        fmt = families.get(cfg.family).latent_format
    else:
        if cfg.net_config is None:
            raise ValueError(f"net={cfg.net!r} needs a [{cfg.net}] config (or init_from a checkpoint)")
        if cfg.text is None and cfg.text_encoder is None:
            raise ValueError("training from scratch needs a [text] encoder config or a text_encoder file")
        if len(enc_names) != 1:
            raise ValueError(
                f"training {cfg.family} from scratch is not supported ({len(enc_names)} text encoders); "
                "fine-tune it with init_from, or use family sd15 / dit-text for new models"
            )
        init_rng = torch.Generator().manual_seed(cfg.seed)  # initial weights: from this, not the global RNG
        comps = {cfg.net: init_weights(build_component(cfg.net, cfg.net_config), init_rng)}
        if cfg.text_encoder is not None:  # the user's CLIP weights (frozen unless train_text_encoder)
            from latentforge.models import TEXT_PRESETS

            if cfg.text is None:
                cfg.text = TEXT_PRESETS["clip-l"]
            sd = component_file(enc_names[0], cfg.text_encoder)
            comps[enc_names[0]] = load_component(enc_names[0], cfg.text, sd, torch.float32, cfg.text_encoder)
        else:
            te = init_weights(build_component(enc_names[0], cfg.text), init_rng)
            comps[enc_names[0]] = scratch_text_encoder(te, init_rng)
        vae, fmt = None, None
    if cfg.vae is not None:
        vae, fmt = load_vae_file(cfg.vae)
        extra["vae"] = vae
    if not cfg.pixel_space and vae is None:
        raise ValueError("latent training needs a VAE: give vae=PATH, init_from a checkpoint, or pixel_space")
    if cfg.pixel_space:
        fmt = None
    parts = {cfg.net: comps[cfg.net]}
    frozen = {}
    for name in enc_names:
        if name not in comps:
            raise ValueError(f"{cfg.family} needs the text encoder {name!r}; the checkpoint has none")
        (parts if cfg.train_text_encoder else frozen)[name] = comps[name]
    for m in parts.values():
        m.train().requires_grad_(True)
    for m in [*frozen.values(), *([vae] if vae is not None else [])]:
        m.eval().requires_grad_(False).to(device)
    model = TextToImage(cfg.family, cfg.net, parts, frozen).to(device)
    if cfg.grad_checkpointing:
        enable_checkpointing(model.parts[cfg.net])
    return Setup(cfg, model, vae, fmt, extra)


def export_checkpoint(setup: Setup, path: str, ema: EMA | None) -> None:
    """The single-file checkpoint (original layout) with the EMA weights, written atomically."""
    cfg, model = setup.cfg, setup.model
    sd = {}
    state = ema.state_dict() if ema is not None else model.state_dict()
    for name in model.parts:
        pre = f"parts.{name}."
        sd[name] = {k[len(pre) :]: v for k, v in state.items() if k.startswith(pre)}
    for name, m in {**model.frozen, **setup.extra_components}.items():
        sd[name] = m.state_dict()
    configs = {n: m.config for n, m in model.parts.items()}
    configs.update({n: m.config for n, m in model.frozen.items()})
    configs.update({n: m.config for n, m in setup.extra_components.items()})
    meta = {
        "latentforge.family": cfg.family,
        "latentforge.configs": configs_to_json(configs),
        "latentforge.objective": json.dumps(dataclasses.asdict(cfg.objective)),
        "latentforge.model_sampling": model_sampling.to_json(model_sampling_for(cfg.objective)),
        "latentforge.space": "pixel" if cfg.pixel_space else "latent",
        "latentforge.resolution": str(cfg.resolution),
    }
    if setup.latent_format is not None:
        meta["latentforge.latent_format"] = setup.latent_format.to_json()
    save_state_dict(join_components(sd, cfg.family), path, metadata=meta)


def _prune_exports(folder: str, keep: int) -> None:
    files = sorted(f for f in os.listdir(folder) if f.startswith("step-") and f.endswith(".safetensors"))
    for f in files[:-keep] if keep else []:
        os.remove(os.path.join(folder, f))


def train_denoiser(
    cfg: DenoiserTrainConfig,
    out: str,
    resume: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    device: str | None = None,
    stop_after: int | None = None,
) -> dict:
    """Run (or continue, with `resume`) a denoiser training run into folder `out`; returns a summary.
    `stop_after`: return after this many steps of this call (tests; the run stays resumable)."""
    world = dist.init(device)
    try:
        return _train(cfg, out, resume, dry_run, progress, world, stop_after)
    finally:
        dist.shutdown()


def _train(cfg, out, resume, dry_run, progress, world, stop_after) -> dict:
    dev = world.device
    setup = build_models(cfg, dev)
    model = setup.model
    ms = model_sampling_for(cfg.objective)
    G = cfg.batch_size * world.world_size  # global micro-batch
    if world.main:
        print(
            f"effective batch {G * cfg.grad_accum} = {cfg.batch_size} per rank "
            f"× {world.world_size} ranks × {cfg.grad_accum} accumulation; device {dev}",
            flush=True,
        )
    dataset = dataset_for(cfg, world)
    if cfg.cache_latents:
        if cfg.data == "shapes":
            raise ValueError("cache_latents applies to folder data; the shapes stream is rendered on the fly")
        from latentforge.training import precompute

        setup.pre = precompute.build(cfg, setup, dataset, world, cfg.cache_dir or os.path.join(out, "cache"))
    optimizer = build_optimizer(cfg, model.parameters())
    if dry_run:
        return dry_run_report(cfg, setup, dataset, ms, optimizer, world, _micro_step) if world.main else {}
    state_root = os.path.join(out, "state")
    start = 0
    if world.main:
        os.makedirs(out, exist_ok=True)
    dist.barrier(world)
    existing = step_dirs(state_root) if os.path.isdir(state_root) else []
    ema = EMA(model, decay=cfg.ema_decay)
    if existing and not resume:
        raise ValueError(
            f"{out!r} already holds a run (step {existing[-1][0]}); pass --resume {out} to continue it "
            "or choose another --out"
        )
    sharded = cfg.parallel == "fsdp" and world.distributed
    info = None
    if resume and existing:
        info = load_training_state(
            state_root,
            model,
            ema,
            None if sharded else optimizer,  # FSDP: loaded after sharding, below
            rng=True,
            expected_config=to_dict(cfg),
            config_keys=MODEL_FIELDS,
        )
        start = info["step"]
        if world.main:
            print(f"resumed from {info['path']} at step {start}", flush=True)
    if sharded:
        from latentforge.training import fsdp

        units = fsdp.shard(model, model.parts[cfg.net])
        if world.main:
            local = sum(p.to_local().numel() for p in model.parameters())
            total = sum(p.numel() for p in model.parameters())
            print(f"FSDP: {units} units sharded over {world.world_size} ranks; rank 0 holds {local:,} of "
                  f"{total:,} parameters", flush=True)  # fmt: skip
        fsdp.shard_ema(ema, model)
        optimizer = build_optimizer(cfg, model.parameters())  # over the DTensor shards
        if info is not None:
            fsdp.load_optimizer(model, optimizer, info["path"])
    if world.main:
        write_json_atomic(os.path.join(out, "config.json"), to_dict(cfg))
    log = MetricsLog(os.path.join(out, "metrics.jsonl"), start, enabled=world.main)
    net = model
    if world.distributed and not sharded:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if cfg.compile:  # the denoising network, in place (same state-dict keys); tokenising stays eager
        model.parts[cfg.net].compile()
    scaler = torch.amp.GradScaler(dev.type) if cfg.precision == "fp16" else None
    loader = iter(data_loader(cfg, dataset, start * cfg.grad_accum, world))
    size = (cfg.resolution, cfg.resolution)
    bar = progress_bar(start, cfg.max_steps, enabled=progress and world.main)
    last_good = os.path.join(out, "checkpoints", "last.safetensors")
    step, t_wait, t_total, t0 = start, 0.0, 0.0, time.perf_counter()
    ran = 0
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
        total = torch.zeros((), dtype=torch.float64)
        for a in range(cfg.grad_accum):
            m = step * cfg.grad_accum + a
            tw = time.perf_counter()
            batch = next(loader)
            t_wait += time.perf_counter() - tw
            sync = a == cfg.grad_accum - 1 or not world.distributed
            if sharded:
                model.set_requires_gradient_sync(sync)
            ctx = net.no_sync() if not sync and not sharded else _null()
            with ctx:
                value = _micro_step(cfg, setup, ms, net, batch, m, G, world, size, scaler)
            total += value
        loss_value = float(dist.mean(world, total / cfg.grad_accum))
        if not math.isfinite(loss_value):
            good = last_good if os.path.exists(last_good) else "none (no checkpoint was written yet)"
            log.write({"step": step + 1, "error": f"non-finite loss {loss_value}"})
            raise TrainingError(
                f"the loss is {loss_value} at step {step + 1}; stopping. The last good checkpoint: {good}"
            )
        if scaler is not None:
            scaler.unscale_(optimizer)
        gnorm = (
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if cfg.grad_clip > 0
            else _grad_norm(model)
        )
        if hasattr(gnorm, "full_tensor"):  # FSDP: a DTensor
            gnorm = gnorm.full_tensor()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model)
        step += 1
        ran += 1
        t_total = time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            log.write(
                {
                    "step": step,
                    "loss": loss_value,
                    "lr": lr,
                    "grad_norm": float(gnorm),
                    "it_s": ran / max(t_total, 1e-9),
                    "data_wait": t_wait / max(t_total, 1e-9),
                }
            )
        end = step == cfg.max_steps
        if step % cfg.checkpoint_every == 0 or end:
            _checkpoint(cfg, setup, out, step, ema, optimizer, scaler, world, G, sharded)
        if (cfg.sample_every and step % cfg.sample_every == 0) or end:
            _samples(cfg, setup, ema, ms, out, step, world, log, sharded)
    bar.close()
    if world.main and step == cfg.max_steps:
        save_loss_plot(os.path.join(out, "metrics.jsonl"), os.path.join(out, "loss.png"))
    return {
        "step": step,
        "loss": loss_value if ran else None,
        "out": out,
        "data_wait": t_wait / max(t_total, 1e-9),
        "it_s": ran / max(t_total, 1e-9),
    }


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _grad_norm(model: nn.Module) -> torch.Tensor:
    norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.zeros(())


def _micro_step(cfg, setup, ms, net, batch, m, G, world, size, scaler) -> torch.Tensor:
    """Forward and backward of this rank's share of global micro-batch m; returns its (detached) loss."""
    dev = world.device
    captions = list(batch["caption"])
    r, W = world.rank, world.world_size
    gen = micro_generator(cfg.seed, m)
    drop = (torch.rand(G, generator=gen) < cfg.caption_dropout)[r::W]
    captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
    sigma = sample_sigmas(cfg.objective, ms, G, gen, "cpu")[r::W]
    with torch.no_grad():
        if "latent_mean" in batch:  # cached posterior moments
            mean, std = batch["latent_mean"].to(dev), batch["latent_std"].to(dev)
        elif setup.vae is not None:
            images = batch["image"].to(dev, next(setup.vae.parameters()).dtype)
            post = setup.vae.encode(images)
            mean, std = post.mean.float(), post.std.float()
        else:
            mean = None
        if mean is not None:
            eps_z = torch.randn((G, *mean.shape[1:]), generator=gen)[r::W].to(dev)
            x0 = setup.latent_format.process_in(mean + std * eps_z)
            f = setup.vae.downscale
        else:
            x0, f = batch["image"].to(dev, non_blocking=True), 1
    noise = torch.randn((G, *x0.shape[1:]), generator=gen)[r::W].to(dev)
    h, w = x0.shape[-2:]
    size = (h * f, w * f)
    cond = None
    if any(k.startswith("cond.") for k in batch):  # cached frozen-encoder conditioning; dropped rows -> ""
        cond = {k[5:]: v.clone() for k, v in batch.items() if k.startswith("cond.")}
        if drop.any():
            empty = setup.pre.text("", size)
            for k in cond:
                cond[k][drop] = empty[k].to(cond[k].dtype)
        cond = {k: v.to(dev) for k, v in cond.items()}
    model_fn = _Bound(net, captions, size, cond)
    with autocast(cfg.precision, dev):
        loss, _ = objective_loss(cfg.objective, ms, model_fn, x0, noise=noise, sigma=sigma.to(dev))
    scaled = loss / cfg.grad_accum
    (scaler.scale(scaled) if scaler is not None else scaled).backward()
    return loss.detach().double().cpu()


class _Bound:
    """net(x, t) with this micro-batch's prompts and image size bound (what objectives.loss calls)."""

    def __init__(self, net, prompts, size, cond=None):
        self.net, self.prompts, self.size, self.cond = net, prompts, size, cond

    def __call__(self, x, t):
        return self.net(x, t, prompts=self.prompts, size=self.size, cond=self.cond)


def unsharded_copy(setup: Setup, ema_state: dict[str, torch.Tensor]) -> Setup:
    """The trained parts rebuilt whole from their configs, holding `ema_state` (FSDP: what rank 0 samples
    with and exports); frozen encoders and the VAE are shared, not copied."""
    model = setup.model
    parts = {}
    for name, m in model.parts.items():
        part = build_component(name, m.config)
        pre = f"parts.{name}."
        part.load_state_dict({k[len(pre) :]: v for k, v in ema_state.items() if k.startswith(pre)})
        parts[name] = part.to(next(model.parameters()).device)
    copy = TextToImage(model.family, model.net_name, parts, model.frozen)
    return dataclasses.replace(setup, model=copy)


def _checkpoint(cfg, setup, out, step, ema, optimizer, scaler, world, G, sharded=False) -> None:
    states = None
    if sharded:  # every rank takes part in gathering; rank 0 writes
        from latentforge.training import fsdp

        states = {
            "model": fsdp.full_model(setup.model),
            "ema": fsdp.full_ema(ema),
            "optimizer": fsdp.full_optimizer(setup.model, optimizer),
        }
    if world.main:
        save_training_state(
            os.path.join(out, "state"),
            step,
            setup.model,
            ema,
            optimizer,
            scaler,
            data_position={"micro_batch": step * cfg.grad_accum, "global_batch": G},
            config=to_dict(cfg),
            keep_last=cfg.keep_last,
            states=states,
        )
        folder = os.path.join(out, "checkpoints")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"step-{step:08d}.safetensors")
        if sharded:
            export_checkpoint(unsharded_copy(setup, states["ema"]), path, None)
        else:
            export_checkpoint(setup, path, ema)
        tmp = os.path.join(folder, f".last.safetensors.tmp-{os.getpid()}")
        shutil.copyfile(path, tmp)
        os.replace(tmp, os.path.join(folder, "last.safetensors"))
        _prune_exports(folder, cfg.keep_last)
    dist.barrier(world)


def pipeline_for(setup: Setup, ms):
    """A Pipeline over the run's own modules (no copies); the caller restores their training mode."""
    from latentforge.pipeline import Pipeline

    cfg, model = setup.cfg, setup.model
    comps = {**dict(model.parts.items()), **model.frozen, **setup.extra_components}
    pipe = Pipeline(
        cfg.family,
        comps,
        model_sampling=ms,
        pixel_space=cfg.pixel_space,
        size=(cfg.resolution, cfg.resolution),
        latent_format=None if cfg.pixel_space else setup.latent_format,
    )
    return pipe


def sample_prompts(cfg: DenoiserTrainConfig) -> list[str]:
    if cfg.sample_prompts:
        return list(cfg.sample_prompts)
    if cfg.data != "shapes":
        return ["a photograph", ""]
    from latentforge.shapes import caption, sample_scene

    rng = np.random.default_rng(1234)
    return [caption(sample_scene(rng, split="validation"), rng) for _ in range(8)]


def _samples(cfg, setup, ema, ms, out, step, world, log, sharded=False) -> None:
    """Rank 0: a grid of the fixed prompts (EMA weights) and, with shapes data, the evaluator's score on
    `eval_n` held-out prompts; logged to metrics.jsonl."""
    if sharded:
        from latentforge.training import fsdp

        full = fsdp.full_ema(ema)  # collective
        if world.main:
            copy = unsharded_copy(setup, full)
            with torch.no_grad():
                pipe = pipeline_for(copy, ms)
                _save_grid(_generate(cfg, pipe, sample_prompts(cfg), seed=0), _grid_path(out, step))
                if cfg.data == "shapes" and cfg.eval_n > 0:
                    log.write({"step": step, **_shapes_eval(cfg, pipe)})
        dist.barrier(world)
        return
    if world.main:
        model = setup.model
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        try:
            with ema.swapped(model), torch.no_grad():
                pipe = pipeline_for(setup, ms)
                grid_images = _generate(cfg, pipe, sample_prompts(cfg), seed=0)
                _save_grid(grid_images, _grid_path(out, step))
                if cfg.data == "shapes" and cfg.eval_n > 0:
                    log.write({"step": step, **_shapes_eval(cfg, pipe)})
        finally:
            model.train()
            for n, p in model.named_parameters():
                p.requires_grad_(flags[n])
    dist.barrier(world)


def _grid_path(out: str, step: int) -> str:
    return os.path.join(out, "samples", f"step-{step:08d}.png")


def _generate(cfg, pipe, prompts: list[str], seed: int, chunk: int = 32):
    images = []
    for s in range(0, len(prompts), chunk):
        part = prompts[s : s + chunk]
        images += pipe(
            part,
            steps=cfg.sample_steps,
            sampler=cfg.sample_sampler,
            scheduler=cfg.sample_scheduler,
            cfg=cfg.sample_cfg,
            seed=seed + s,
            batch_size=len(part),
            progress=False,
        )
    return images


def _shapes_eval(cfg, pipe) -> dict:
    from latentforge.shapes import caption, sample_scene
    from latentforge.shapes.evaluate import evaluate

    rng = np.random.default_rng(4321)
    prompts = [caption(sample_scene(rng, split="heldout"), rng) for _ in range(cfg.eval_n)]
    images = [np.asarray(im) for im in _generate(cfg, pipe, prompts, seed=10_000)]
    rep = evaluate(images, prompts, reference=False)
    attrs = {k: v["rate"] for k, v in rep["attributes"].items()}
    # chance level for these very images: each scored against another image's prompt (a cyclic shift, so no
    # image keeps its own); adherence to the prompt is the margin over it
    chance = evaluate(images, prompts[1:] + prompts[:1], reference=False)
    return {
        "eval_all_correct": rep["all_correct"],
        "eval_n": rep["n"],
        "eval_attributes": attrs,
        "eval_chance_attributes": {k: v["rate"] for k, v in chance["attributes"].items()},
    }


def _save_grid(images, path: str, cols: int = 8, scale: int = 2) -> None:
    from PIL import Image

    from latentforge.plot import save_png

    w, h = images[0].size
    rows = -(-len(images) // cols)
    grid = Image.new("RGB", (min(cols, len(images)) * w, rows * h), "white")
    for k, im in enumerate(images):
        grid.paste(im, ((k % cols) * w, (k // cols) * h))
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_png(grid, path)
