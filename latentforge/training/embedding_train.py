"""`latentforge train embedding`: textual inversion (Gal et al. 2022, "An Image is Worth One Word", §3).

A new word S* (`token`) gets n fresh token embeddings v (`vectors` rows of the text encoder's width) that
stand in for it at the text encoder's input; every weight of the model stays frozen and only v is trained,
with the model's own denoising loss on images whose captions name S* (eq. (2): v* = argmin_v E‖ε − ε_θ(z_t,
t, c_θ(y))‖², y a caption containing S*). v starts as the token embeddings of `init_word` (the paper's
"single-word coarse descriptor"; A1111's "initialization text", default "*"), spread over the n rows as
A1111 does (row i takes init token ⌊i·m/n⌋ of m).

The run is an adapt.AdaptTask (a DenoiserTask on a frozen base): data, buckets, cached latents, resume,
torchrun, samples, the loop. The text encoders run every step (their input changes), so their outputs are
not cached. The word reaches them through latentforge.textual_inversion, the same code that applies a
loaded embedding when generating, so what trains is what a prompt will use.

The file `<out>/<token>.safetensors` (and checkpoints/step-N.safetensors) is A1111's embedding in
safetensors form: the tensor `string_to_param.*` [n, D] (A1111's `string_to_param` {'*': v}, flattened as
safetensors keys are) with `name` and `step` in the metadata, beside A1111's `sd_checkpoint` /
`sd_checkpoint_name` and kohya's `modelspec.*`; a two-tower family (SDXL) writes the `clip_l` / `clip_g`
pair instead. latentforge.textual_inversion, A1111 and ComfyUI read both; the file's stem is the word.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from latentforge import conditioning, families, tokenizer
from latentforge.checkpoint_io import save_state_dict
from latentforge.textual_inversion import PAIR_TOWERS, SINGLE, Embedding, TextualInversions
from latentforge.training import adapt, dist
from latentforge.training import config as C
from latentforge.training.config import MODEL_FIELDS, DenoiserTrainConfig
from latentforge.training.ema import weights_swapped
from latentforge.training.objectives import ObjectiveConfig
from latentforge.training.optim import adamw
from latentforge.training.trainer import pipeline_for

MAX_VECTORS = 75  # one CLIP chunk


@dataclass
class EmbeddingTrainConfig(DenoiserTrainConfig):
    """A denoiser run's fields (the model ones are the checkpoint's) plus the embedding's. Defaults as A1111's
    textual inversion tab: lr 0.005 (also Gal et al.'s base rate), no weight decay, one vector, "*"."""

    token: str = ""  # the new word; captions name it, prompts use it; the file is <token>.safetensors
    vectors: int = 1  # n: positions the word takes in a prompt
    init_word: str = "*"  # v starts as this text's token embeddings
    objective: ObjectiveConfig | None = None  # None: the base model's (set when the run starts)
    lr: float = 5e-3
    weight_decay: float = 0.0
    caption_dropout: float = 0.0
    ema_decay: float = 0.0  # 0: the export is the trained vectors
    train_text_encoder: bool = False  # must stay False: only the word's vectors train

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.token, str) or not re.fullmatch(r"[A-Za-z0-9_][\w.-]*", self.token):
            raise ValueError(
                f"token={self.token!r}: give the new word with --token NAME (letters, digits and _.-, "
                "starting with a letter or digit); it names the file and is matched as a whole word"
            )
        C._int_at_least("vectors", self.vectors, 1)
        if self.vectors > MAX_VECTORS:
            raise ValueError(f"vectors must be in [1, {MAX_VECTORS}] (one CLIP chunk), got {self.vectors}")
        if self.train_text_encoder or self.text_encoder is not None:
            raise ValueError(
                "an embedding run trains only the new word's vectors: train_text_encoder must be false and "
                "text_encoder unset (the text encoders come from init_from)"
            )
        if self.parallel != "ddp":
            raise ValueError(f"parallel={self.parallel!r}: an embedding run replicates its vectors; use ddp")


EMBEDDING_FIELDS = ("init_from", "token", "vectors")


def resolve(preset: str | None = None, toml: str | None = None, overrides=None) -> EmbeddingTrainConfig:
    return adapt.resolve(EmbeddingTrainConfig, "embedding", preset, toml, overrides)


def train_embedding(
    cfg: EmbeddingTrainConfig,
    out: str,
    resume: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    device: str | None = None,
    stop_after: int | None = None,
    strict: bool = False,
) -> dict:
    """Run (or continue) a textual inversion run into folder `out`; returns the loop's summary plus
    "embedding", the path of `<out>/<token>.safetensors` once the run has reached max_steps."""
    summary = adapt.run(EmbeddingTask, cfg, out, cfg.token, resume, dry_run, progress, device, stop_after,
                        strict)  # fmt: skip
    if "file" in summary:
        summary["embedding"] = summary.pop("file")
    return summary


def token_table(encoder: nn.Module) -> torch.Tensor:
    """A CLIP text encoder's token-embedding table [vocab, D]."""
    tower = encoder.tower
    emb = tower.text_model.embeddings if hasattr(tower, "text_model") else tower
    return emb.token_embedding.weight


def initial_vectors(encoder: nn.Module, init_word: str, n: int) -> torch.Tensor:
    """[n, D] float32: row i is the token embedding of init token ⌊i·m/n⌋ of `init_word`'s m tokens (A1111's
    create_embedding); zeros when the text has no tokens."""
    table = token_table(encoder).detach()
    ids = tokenizer.encode(init_word)[0][:n]
    out = torch.zeros(n, table.shape[1], dtype=torch.float32, device=table.device)
    for i in range(n if ids else 0):
        out[i] = table[ids[i * len(ids) // n]].float()
    return out


class EmbeddingVectors(nn.Module):
    """The new word's vectors, one [n, D] parameter per text encoder (under its component name).
    forward(x, t, prompts, size, cond) is the frozen base's (`base`, held outside the module tree) with the
    word's vectors in its text encoders' input (`ti`: a TextualInversions of this one word)."""

    def __init__(self, base: nn.Module, token: str, vectors: Mapping[str, torch.Tensor]):
        super().__init__()
        object.__setattr__(self, "base", base)  # not a submodule: frozen, not trained, not saved
        self.vectors = nn.ParameterDict({k: nn.Parameter(v.clone()) for k, v in vectors.items()})
        self.token = token
        if len(self.vectors) == 1:
            emb = Embedding(token, {SINGLE: next(iter(self.vectors.values()))}, "a1111")
        else:
            emb = Embedding(token, dict(self.vectors.items()), "pair")
        self.ti = TextualInversions({token: emb})  # holds the parameters themselves: gradients reach them

    def forward(self, x, t, prompts, size, cond=None):
        with conditioning.use_embeddings(self.ti):
            out = self.base(x, t, prompts=prompts, size=size, cond=cond)
        # + 0·Σv: every vector is part of every step's graph, also when no caption of this rank's batch
        # names the word (caption dropout), which DDP would otherwise refuse as an unused parameter
        return out + 0.0 * sum(v.sum() for v in self.vectors.values()).to(out.dtype)

    def file_tensors(self, weights: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The file's tensors for `weights` (this module's state dict, or its EMA): A1111's
        `string_to_param.*` for one text encoder, the clip_l / clip_g pair for two."""
        sd = weights if weights is not None else self.state_dict()
        vec = {k.removeprefix("vectors."): v.detach().to("cpu", torch.float32) for k, v in sd.items()}
        if len(vec) == 1:
            return {"string_to_param." + SINGLE: next(iter(vec.values()))}
        return {k: vec[k] for k in PAIR_TOWERS}


class EmbeddingTask(adapt.AdaptTask):
    """An AdaptTask whose trained module is the EmbeddingVectors of the new word."""

    config_keys = (*MODEL_FIELDS, *EMBEDDING_FIELDS)
    what = "embedding"

    def __init__(self, cfg: EmbeddingTrainConfig, world: dist.World, out: str, dry_run: bool = False):
        super().__init__(cfg, world, out, dry_run, text_runs=True)
        base = self.setup.model
        names = families.get(cfg.family).text_encoders
        if len(names) > 1 and set(names) != set(PAIR_TOWERS):  # the layouts: one tower, or SDXL's pair
            raise ValueError(f"{cfg.family}: an embedding file holds one tower's vectors or the clip_l / "
                             f"clip_g pair, not vectors for {names}")  # fmt: skip
        encoders = base.encoders()
        vectors = {n: initial_vectors(encoders[n], cfg.init_word, cfg.vectors) for n in names}
        self.vectors = EmbeddingVectors(base, cfg.token, vectors)
        self.model = self.vectors
        self._check_captions(world)
        if world.main:
            widths = ", ".join(f"{n} {v.shape[1]}" for n, v in vectors.items())
            print(f"embedding {cfg.token!r}: {cfg.vectors} vector(s) ({widths} wide) from {cfg.init_word!r}, "
                  f"on {os.path.basename(self.base_path)} ({cfg.family})", flush=True)  # fmt: skip

    def _check_captions(self, world: dist.World) -> None:
        """The data's captions must name the word somewhere, or nothing would train."""
        cfg = self.cfg
        if cfg.data == "shapes":
            raise ValueError(
                f"data='shapes': the shapes stream's captions never name {cfg.token!r}; give --data a folder "
                f"of images whose captions do (e.g. 'a {cfg.token} on a white background')"
            )
        captions = [item.caption for item in self.dataset.ds.items]
        naming = sum(any(isinstance(w, tuple) for w in self.vectors.ti.split_words(c)) for c in captions)
        if naming == 0:
            example = next((c for c in captions if c), "")
            raise ValueError(
                f"no caption in {cfg.data!r} names the word {cfg.token!r} (as a whole word), so nothing "
                f"would train; e.g. {example!r}. Put {cfg.token!r} in the captions"
            )
        if world.main:
            print(f"{naming} of {len(captions)} captions name {cfg.token!r}", flush=True)

    def optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        return adamw(self.vectors.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                     eps=cfg.adam_eps, weight_decay=cfg.weight_decay)  # fmt: skip

    def export(self, path: str, weights: Mapping[str, torch.Tensor]) -> None:
        cfg = self.cfg
        tensors = self.vectors.file_tensors(weights)
        meta = {
            "name": cfg.token,  # A1111's embedding fields
            "step": str(self.steps_done),
            "sd_checkpoint": self.base_hashes()[1][:10],
            "sd_checkpoint_name": os.path.splitext(os.path.basename(self.base_path))[0],
            "modelspec.sai_model_spec": "1.0.1",  # kohya's (sai_model_spec.py) for a textual inversion
            "modelspec.architecture": adapt.modelspec_architecture(cfg) + "/textual-inversion",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
            "modelspec.title": cfg.token,
            "modelspec.resolution": f"{cfg.resolution}x{cfg.resolution}",
            "modelspec.date": datetime.datetime.now().isoformat(timespec="seconds"),
            "latentforge.embedding": json.dumps({"vectors": cfg.vectors, "init_word": cfg.init_word}),
        }
        save_state_dict(tensors, path, metadata=meta)

    def samples(self, path: str, weights: Mapping[str, torch.Tensor]) -> dict | None:
        """The sample grid with the word's current (EMA) vectors, as a pipeline that loaded the file would
        apply them; sample prompts default to the first captions that name the word."""
        from latentforge.training.samples import denoiser_samples

        cfg = self.cfg
        if not cfg.sample_prompts:
            named = [it.caption for it in self.dataset.ds.items if cfg.token.lower() in it.caption.lower()]
            cfg = dataclasses.replace(cfg, sample_prompts=tuple(named[:8]) or (cfg.token,))
        pipe = pipeline_for(self.setup, self.ms)
        pipe.embeddings = self.vectors.ti
        with torch.no_grad(), weights_swapped(self.vectors, weights):
            return denoiser_samples(cfg, pipe, path)
