"""The denoiser trainer: UNet, DiT and MMDiT, in latent or pixel space, on one process or many.

    batch (images, captions) ─ VAE encode (frozen) ─ LatentFormat.process_in ─► x₀   (pixel space: x₀ = image)
    captions ─ dropout to "" (p = caption_dropout) ─► text encoders (trained jointly or frozen) ─► cond
    σ ~ objective.sigma_sampling, ε ~ N(0, I) ─► objectives.loss(cfg.objective, ms, model, x₀, cond)
    AdamW (warm-up + schedule, clipping, accumulation) ─► EMA of the weights (used for sampling and export)

The step loop is loop.py's; `DenoiserTask` supplies the micro-step, the export and the samples.

Determinism. Global micro-batch m (m = step·grad_accum + a) holds dataset items m·G … m·G + G − 1 with
G = batch_size·world_size; rank r takes positions r, r + W, … of it, and the dropout mask, σ and ε of the
whole global batch are drawn from one generator seeded by (seed, m) of which rank r keeps the same rows
(feed.py). So what a step sees is a pure function of (seed, step): two ranks with batch b compute exactly the
terms one process with batch 2b computes (DDP averages the gradients), and a resumed run sees the same data
and noise as an uninterrupted one without any sampler state.

Outputs under `out/` (loop.py): config.json, metrics.jsonl, state/step-N/ (exact-resume state, see state.py),
checkpoints/step-N.safetensors and checkpoints/last.safetensors (EMA weights in the original single-file
layout with the configs, objective and latent format in the metadata: `latentforge generate --model` loads
them), samples/step-N.png, loss.png.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping

import torch
from torch import nn

from latentforge import conditioning, families, model_sampling
from latentforge.checkpoints import (
    build_component,
    component_file,
    configs_to_json,
    join_components,
    load_checkpoint,
    load_component,
    load_vae_file,
    save_state_dict,
)
from latentforge.models.init import init_weights
from latentforge.models.vae import LatentFormat
from latentforge.shapes.data import small_object_weights
from latentforge.training import dist, loop, run_folder
from latentforge.training.config import MODEL_FIELDS, DenoiserTrainConfig
from latentforge.training.ema import weights_swapped
from latentforge.training.feed import dataset_for, micro_generator
from latentforge.training.objectives import loss as objective_loss
from latentforge.training.objectives import model_sampling_for, sample_sigmas
from latentforge.training.optim import autocast, build_optimizer, enable_checkpointing
from latentforge.training.samples import denoiser_samples


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
        """`cond`: precomputed conditioning (cached frozen encoders) instead of encoding `prompts`. Captions
        are read literally (weighting "none", as kohya does by default): brackets in them are text."""
        net = self.parts[self.net_name]
        if cond is None:
            h, w = size
            net_config = net.config
            with conditioning.first_chunk_only():  # one context length for every caption and batch
                cond = families.encode(
                    self.family, self.encoders(), prompts, w, h, False, net_config, weighting="none"
                )
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
        net_cfg = ckpt.configs[cfg.net]
        if getattr(cfg.net_config, "mask_text_padding", False) and not net_cfg.mask_text_padding:
            # not in the state dict: a fine-tune may start masking the padding (models/unet.py)
            net_cfg = dataclasses.replace(net_cfg, mask_text_padding=True)
        cfg.__dict__[cfg.net] = net_cfg  # the loaded network's config, recorded with the run
        comps[cfg.net].config = net_cfg
        if "clip_l" in ckpt.configs and cfg.text is None and "clip_l" in enc_names:
            cfg.text = ckpt.configs["clip_l"]
        vae = comps.get("vae") if not cfg.pixel_space else None
        if vae is not None and cfg.vae is None:
            extra["vae"] = vae
        fmt = families.get(cfg.family).latent_format
        if "latentforge.latent_format" in ckpt.metadata:  # our own checkpoints: their VAE's measured scale
            fmt = LatentFormat.from_json(ckpt.metadata["latentforge.latent_format"])
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


def export_checkpoint(setup: Setup, path: str, weights: Mapping[str, torch.Tensor] | None = None) -> None:
    """The single-file checkpoint (original layout) with `weights` for the trained parts (the EMA's, in the
    model's keys; None: the model's own), written atomically."""
    cfg, model = setup.cfg, setup.model
    sd = {}
    state = weights if weights is not None else model.state_dict()
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


def train_denoiser(
    cfg: DenoiserTrainConfig,
    out: str,
    resume: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    device: str | None = None,
    stop_after: int | None = None,
    strict: bool = False,
) -> dict:
    """Run (or continue, with `resume`) a denoiser training run into folder `out`; returns a summary.
    `stop_after`: return after this many steps of this call (tests; the run stays resumable)."""
    world = dist.init(device)
    try:
        with run_folder.claim(out, cfg, resume, world, dry_run):  # the folder's lock, checks and leftovers
            task = DenoiserTask(cfg, world, out, dry_run)
            return loop.run(task, out, resume, dry_run, progress, stop_after, strict)
    finally:
        dist.shutdown()


class DenoiserTask(loop.Task):
    """The text-to-image model (`TextToImage`: the network and the jointly trained text encoders) under
    AdamW, the denoising micro-step, the single-file export and the sample grid / shapes evaluation."""

    config_keys = MODEL_FIELDS

    def __init__(self, cfg: DenoiserTrainConfig, world: dist.World, out: str, dry_run: bool = False):
        self.setup = setup = build_models(cfg, world.device)
        self.ms = model_sampling_for(cfg.objective)
        self.sharded = loop.is_sharded(cfg, world)
        if world.main:
            print(loop.describe_batch(cfg, world), flush=True)
        dataset = dataset_for(cfg, world)
        if cfg.cache_latents:
            if cfg.data == "shapes":
                raise ValueError(
                    "cache_latents applies to folder data; the shapes stream is rendered on the fly"
                )
        if cfg.cache_latents and dry_run:  # a dry run writes nothing: each item is encoded as it is read
            from latentforge.training import precompute

            setup.pre = dataset.pre = precompute.EncodeOnRead(cfg, setup, dataset.ds)
            if world.main:
                print(
                    "dry run: latents are not cached but encoded as they are read, outside the counted "
                    "step, which is then a cached run's step",
                    flush=True,
                )
        elif cfg.cache_latents:
            from latentforge.training import precompute

            setup.pre = precompute.build(
                cfg, setup, dataset, world, cfg.cache_dir or os.path.join(out, "cache")
            )
        super().__init__(cfg, world, setup.model, dataset)

    def optimizer(self) -> torch.optim.Optimizer:
        return build_optimizer(self.cfg, self.model.parameters())

    def components(self) -> dict[str, nn.Module]:
        model = self.model
        return {**dict(model.parts.items()), **model.frozen, **self.setup.extra_components}

    def compiled(self) -> list[nn.Module]:
        return [self.model.parts[self.cfg.net]]  # the denoising network; tokenising stays eager

    def fsdp_net(self) -> nn.Module:
        return self.model.parts[self.cfg.net]

    def micro_step(self, mb: loop.MicroBatch) -> dict[str, torch.Tensor]:
        """Caption dropout, σ, the latent draw and ε of the whole global micro-batch from one generator
        (this rank keeps its rows), then the objective's loss and its backward; returns the loss."""
        cfg, world, dev = self.cfg, self.world, self.world.device
        G, r, W = cfg.batch_size * world.world_size, world.rank, world.world_size
        gen = micro_generator(cfg.seed, mb.m)
        drop = (torch.rand(G, generator=gen) < cfg.caption_dropout)[r::W]
        captions = ["" if d else c for c, d in zip(mb.batch["caption"], drop.tolist(), strict=True)]
        sigma = sample_sigmas(cfg.objective, self.ms, G, gen, "cpu")[r::W]
        x0, f = self._x0(mb.batch, gen, G)
        noise = torch.randn((G, *x0.shape[1:]), generator=gen)[r::W].to(dev)
        if "noise" in mb.batch:  # reflow pairs (reflow.py): the noise the teacher's sample came from
            noise = mb.batch["noise"].to(dev, non_blocking=True)
        h, w = x0.shape[-2:]
        size = (h * f, w * f)
        model_fn = _Bound(mb.nets["model"], captions, size, self._cached_cond(mb.batch, drop, size))
        pw = None
        if cfg.small_object_weight > 0:  # [B, 1, h, w] from this rank's captions as given (dropped: 1)
            pw = small_object_weights(captions, size[0], f, cfg.small_object_weight).to(dev)
        with autocast(cfg.precision, dev):
            loss, _ = objective_loss(
                cfg.objective, self.ms, model_fn, x0, noise=noise, sigma=sigma.to(dev), pixel_weight=pw
            )
        mb.backward(loss)
        return {"loss": loss.detach().double().cpu()}

    @torch.no_grad()
    def _x0(self, batch: dict, gen: torch.Generator, G: int) -> tuple[torch.Tensor, int]:
        """x₀ and the VAE's downscale factor: a posterior draw (cached moments or the frozen VAE's encoding)
        through the latent format, or the images themselves in pixel space (factor 1)."""
        setup, dev, r, W = self.setup, self.world.device, self.world.rank, self.world.world_size
        if "latent" in batch:  # reflow pairs: the teacher's sample, already in the denoiser's latent space
            return batch["latent"].to(dev, non_blocking=True), setup.vae.downscale
        if "latent_mean" in batch:  # cached posterior moments
            mean, std = batch["latent_mean"].to(dev), batch["latent_std"].to(dev)
        elif setup.vae is not None:
            images = batch["image"].to(dev, next(setup.vae.parameters()).dtype)
            post = setup.vae.encode(images)
            mean, std = post.mean.float(), post.std.float()
        else:
            return batch["image"].to(dev, non_blocking=True), 1
        eps_z = torch.randn((G, *mean.shape[1:]), generator=gen)[r::W].to(dev)
        return setup.latent_format.process_in(mean + std * eps_z), setup.vae.downscale

    def _cached_cond(self, batch: dict, drop: torch.Tensor, size: tuple[int, int]) -> dict | None:
        """The cached frozen-encoder conditioning of the batch, dropped rows replaced by that of ""; None
        when the text is encoded in the forward pass."""
        if not any(k.startswith("cond.") for k in batch):
            return None
        cond = {k[5:]: v.clone() for k, v in batch.items() if k.startswith("cond.")}
        if drop.any():
            empty = self.setup.pre.text("", size)
            for k in cond:
                cond[k][drop] = empty[k].to(cond[k].dtype)
        return {k: v.to(self.world.device) for k, v in cond.items()}

    def export(self, path: str, weights: Mapping[str, torch.Tensor]) -> None:
        export_checkpoint(self.setup, path, weights)

    def samples(self, path: str, weights: Mapping[str, torch.Tensor]) -> dict | None:
        """Sample with `weights` put into the live model (its training weights, mode and frozen flags come
        back after), or into a whole copy of the trained parts when the live model is sharded (FSDP)."""
        if self.sharded:
            return self._samples(unsharded_copy(self.setup, weights), path)
        model = self.model
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        try:
            with weights_swapped(model, weights):
                return self._samples(self.setup, path)
        finally:
            model.train()
            for n, p in model.named_parameters():
                p.requires_grad_(flags[n])

    def _samples(self, setup: Setup, path: str) -> dict | None:
        with torch.no_grad():
            return denoiser_samples(self.cfg, pipeline_for(setup, self.ms), path)


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
