"""CLIP text encoders (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision", §2.4): a causal pre-LayerNorm transformer over 77 BPE tokens, in the two checkpoint layouts that
Stable Diffusion checkpoints carry.

- layout "openai": OpenAI CLIP as ported to HF transformers 4.x (`CLIPTextModel`, quick_gelu). Keys start with
  `transformer.text_model.` (SD1 `cond_stage_model.`, SDXL `conditioner.embedders.0.`, SD3
  `text_encoders.clip_l.` stripped); an optional `transformer.text_projection` is HF's
  `CLIPTextModelWithProjection` projection (SD3's clip_l).
- layout "open_clip": the text tower of open_clip's `CLIP` (exact gelu, fused q/k/v `in_proj_weight`, raw
  `text_projection` matrix used as x @ P). Keys start with `model.` (SD2 `cond_stage_model.`, SDXL
  `conditioner.embedders.1.` stripped).

The math is the same in both (per layer, x: [B, L, D]):
    x = x + out_proj(causal_softmax_attention(q, k, v of LN1(x)))
    x = x + fc2(act(fc1(LN2(x))))
with x_0 = token_embedding[ids] + position_embedding[:L]. The conditioning the SD families use:
    SD1            hidden of the last layer after the final LayerNorm              (layer="last")
    SD2            penultimate layer after the final LayerNorm                     (layer="penultimate")
    SDXL CLIP-L    penultimate layer, no final LayerNorm                           (final_norm=False)
    SDXL bigG      penultimate, no final LayerNorm + projected pooled output
    SD3 L / G      penultimate, no final LayerNorm + pooled (L unprojected, G projected)
The pooled output is the last layer's final-normed hidden state at the EOS token, found as argmax(ids) since
EOS = 49407 is the largest id (OpenAI CLIP `encode_text`).

Textual inversion (Gal et al. 2022, "An Image is Worth One Word", §3) replaces the token embeddings of some
positions by learned vectors before the position embeddings are added: `forward(..., override=TokenOverride)`
(A1111 `EmbeddingsWithFixes`; latentforge/textual_inversion.py builds the override).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from latentforge.models.embeddings import attention
from latentforge.models.init import Embedding, normal_

LAYOUTS = ("openai", "open_clip")


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # The sigmoid approximation of GELU that OpenAI CLIP was trained with (Hendrycks & Gimpel 2016, §2).
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}  # "gelu" = exact erf GELU (open_clip nn.GELU)


@dataclass
class CLIPTextConfig:
    """Field names follow HF `CLIPTextConfig` (also used by the SD3 reference `CLIPL_CONFIG`/`CLIPG_CONFIG`);
    the open_clip names are given in the comments."""

    layout: str = "openai"  # "openai" (HF naming under transformer.text_model.) | "open_clip" (under model.)
    vocab_size: int = 49408  # open_clip vocab_size
    max_position_embeddings: int = 77  # open_clip context_length
    hidden_size: int = 768  # open_clip width
    intermediate_size: int = 3072  # open_clip width * mlp_ratio (4)
    num_hidden_layers: int = 12  # open_clip layers
    num_attention_heads: int = 12  # open_clip heads
    hidden_act: str = "quick_gelu"  # "quick_gelu" (OpenAI) | "gelu" (OpenCLIP)
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None  # text_projection width (open_clip embed_dim); None = none

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {tuple(ACTIVATIONS)}, got {self.hidden_act!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.layout == "open_clip" and self.projection_dim is None:
            raise ValueError("the open_clip layout always has text_projection: set projection_dim")


PRESETS = {
    # SD1 cond_stage_model / SDXL conditioner.embedders.0 / SD3 clip_l: OpenAI ViT-L/14 text tower.
    # (SD3's clip_l file also has text_projection: use dataclasses.replace(..., projection_dim=768).)
    "clip-l": CLIPTextConfig(),
    # SD2: OpenCLIP ViT-H-14 (laion2b_s32b_b79k), open_clip/model_configs/ViT-H-14.json text_cfg.
    "openclip-h": CLIPTextConfig(
        layout="open_clip",
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        hidden_act="gelu",
        projection_dim=1024,
    ),
    # SDXL conditioner.embedders.1 / SD3 clip_g: OpenCLIP ViT-bigG-14 (laion2b_s39b_b160k).
    "openclip-bigg": CLIPTextConfig(
        layout="open_clip",
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        hidden_act="gelu",
        projection_dim=1280,
    ),
}


class TokenOverride(NamedTuple):
    """Token embeddings that replace the table's rows at K positions of input_ids [B, L]:
    x[rows, cols] = vectors. The ids at those positions are placeholders (0, as A1111), which also keeps
    argmax(ids) at EOS."""

    rows: torch.Tensor  # [K] int64, the batch index
    cols: torch.Tensor  # [K] int64, the position
    vectors: torch.Tensor  # [K, D]


def token_embeddings(
    table: nn.Embedding, input_ids: torch.Tensor, override: TokenOverride | None
) -> torch.Tensor:  # [B, L] -> [B, L, D]
    x = table(input_ids)
    if override is None:
        return x
    index = (override.rows.to(x.device), override.cols.to(x.device))
    return x.index_put(index, override.vectors.to(device=x.device, dtype=x.dtype))  # not in place: autograd


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d_head) + causal mask) v per head; q, k, v, output: [B, L, D]."""
    B, L, D = q.shape
    q, k, v = (t.view(B, L, heads, D // heads).transpose(1, 2) for t in (q, k, v))  # [B, H, L, D/H]
    return attention(q, k, v, causal=True)  # token i sees tokens 0..i


# ----------------------------------------------------------------------------------------------------------
# Layout "openai": HF transformers 4.x CLIPTextModel(WithProjection) names.


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        D = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, L, D]
        return self.out_proj(causal_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D]
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        # HF CLIP's initialisation: N(0, 0.02²) for both tables
        self.token_embedding = Embedding(cfg.vocab_size, cfg.hidden_size, std=0.02)
        self.position_embedding = Embedding(cfg.max_position_embeddings, cfg.hidden_size, std=0.02)
        # Stored by transformers 4.x (SD1 checkpoints list it). Not read in forward: some merged SD1
        # checkpoints carry float-rounded position_ids, and arange is what they are meant to hold.
        self.register_buffer("position_ids", torch.arange(cfg.max_position_embeddings).unsqueeze(0))

    def forward(self, input_ids: torch.Tensor, override: TokenOverride | None = None) -> torch.Tensor:
        x = token_embeddings(self.token_embedding, input_ids, override)  # [B, L] -> [B, L, D]
        return x + self.position_embedding.weight[: input_ids.shape[1]]


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class OpenAITextTower(nn.Module):
    """`transformer.text_model.*`, and `transformer.text_projection.weight` [P, D] with a projection_dim."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.text_model = CLIPTextTransformer(cfg)
        if cfg.projection_dim is not None:
            self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def embed(self, input_ids: torch.Tensor, override: TokenOverride | None = None) -> torch.Tensor:
        return self.text_model.embeddings(input_ids, override)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.text_model.encoder.layers

    @property
    def final_norm(self) -> nn.LayerNorm:
        return self.text_model.final_layer_norm

    def project(self, pooled: torch.Tensor) -> torch.Tensor | None:  # [B, D] -> [B, P]
        return self.text_projection(pooled) if hasattr(self, "text_projection") else None


# ----------------------------------------------------------------------------------------------------------
# Layout "open_clip": mlfoundations/open_clip `CLIP` text tower names (transformer.resblocks, ln_final, ...).


class OpenCLIPAttention(nn.Module):
    """nn.MultiheadAttention's parameters: in_proj_weight [3D, D] = rows q | k | v, in_proj_bias [3D]."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        D = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * D, D))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * D))
        self.out_proj = nn.Linear(D, D)
        self.initialize_weights()

    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        nn.init.xavier_uniform_(self.in_proj_weight, generator=generator)  # as nn.MultiheadAttention
        nn.init.zeros_(self.in_proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, L, D]
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # 3 x [B, L, D]
        return self.out_proj(causal_attention(q, k, v, self.heads))


class OpenCLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.c_fc = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.c_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = OpenCLIPAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = OpenCLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D]
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class OpenCLIPTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg.num_hidden_layers))


class OpenCLIPTextTower(nn.Module):
    """`model.{token_embedding, positional_embedding, transformer.resblocks.N, ln_final, text_projection,
    logit_scale}`; the attention mask is not stored (open_clip registers it non-persistent)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        D, P = cfg.hidden_size, cfg.projection_dim
        self.token_embedding = Embedding(cfg.vocab_size, D, std=0.02)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.max_position_embeddings, D))  # [77, D]
        self.transformer = OpenCLIPTransformer(cfg)
        self.ln_final = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.text_projection = nn.Parameter(torch.empty(D, P))  # [D, P], applied as pooled @ text_projection
        self.logit_scale = nn.Parameter(torch.empty(()))  # CLIP's contrastive temperature
        self.initialize_weights()

    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        # open_clip CLIP.init_parameters (token_embedding: its own N(0, 0.02²))
        normal_(self.positional_embedding, 0.01, generator)
        normal_(self.text_projection, self.text_projection.shape[0] ** -0.5, generator)
        nn.init.constant_(self.logit_scale, math.log(1 / 0.07))

    def embed(self, input_ids: torch.Tensor, override: TokenOverride | None = None) -> torch.Tensor:
        x = token_embeddings(self.token_embedding, input_ids, override)  # [B, L, D]
        return x + self.positional_embedding[: input_ids.shape[1]]

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.resblocks

    @property
    def final_norm(self) -> nn.LayerNorm:
        return self.ln_final

    def project(self, pooled: torch.Tensor) -> torch.Tensor:  # [B, D] -> [B, P]
        return pooled @ self.text_projection


# ----------------------------------------------------------------------------------------------------------


class CLIPTextOutput(NamedTuple):
    hidden: torch.Tensor  # [B, L, D] the requested layer, final LayerNorm applied if final_norm
    pooled: torch.Tensor | None  # [B, D] final-normed last layer at the EOS token (None if pooled=False)
    projected: torch.Tensor | None  # [B, P] pooled @ text_projection (None without a projection)


class CLIPTextModel(nn.Module):
    """One CLIP text transformer. `cfg.layout` picks the parameter names (`self.transformer` for "openai",
    `self.model` for "open_clip"), so `load_state_dict(prefix_stripped_checkpoint, strict=True)` works."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.config = cfg
        if cfg.layout == "openai":
            self.transformer = OpenAITextTower(cfg)
        else:
            self.model = OpenCLIPTextTower(cfg)

    @property
    def tower(self) -> OpenAITextTower | OpenCLIPTextTower:
        return self.transformer if self.config.layout == "openai" else self.model

    def num_layers_to_run(self, layer: str | int) -> int:
        """How many transformer layers produce the requested hidden state.

        "last" = all N, "penultimate" = N - 1 ("clip skip 2"); an int indexes HF's `hidden_states` tuple of
        N + 1 entries: 0 = embeddings, k = after k layers, -1 = last, -2 = penultimate (SDXL's layer_idx=11
        for CLIP-L is 11 = -2).
        """
        n = self.config.num_hidden_layers
        if layer == "last":
            return n
        if layer == "penultimate":
            return n - 1
        if isinstance(layer, int) and not isinstance(layer, bool) and -(n + 1) <= layer <= n:
            return layer if layer >= 0 else n + 1 + layer
        raise ValueError(f"layer must be 'last', 'penultimate' or an int in [{-(n + 1)}, {n}], got {layer!r}")

    def forward(
        self,
        input_ids: torch.Tensor,
        layer: str | int = "last",
        final_norm: bool = True,
        pooled: bool = True,
        override: TokenOverride | None = None,
    ) -> CLIPTextOutput:
        """input_ids: [B, L] int64, L <= max_position_embeddings (77), as `latentforge.tokenizer.tokenize`.

        Returns the hidden state of `layer` ([B, L, D], with the final LayerNorm if `final_norm`) and, if
        `pooled`, the pooled EOS state [B, D] of the last layer and its projection [B, P]. Without `pooled`
        the layers after `layer` are not run.
        """
        if input_ids.ndim != 2 or input_ids.dtype.is_floating_point:
            raise ValueError(
                f"input_ids must be [B, L] integer token ids, got {input_ids.dtype} {input_ids.shape}"
            )
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens, more than max_position_embeddings "
                f"{self.config.max_position_embeddings}"
            )
        stop = self.num_layers_to_run(layer)
        tower = self.tower
        if override is not None and override.vectors.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"override vectors are {override.vectors.shape[-1]} wide, "
                f"the encoder {self.config.hidden_size}"
            )
        x = tower.embed(input_ids, override)  # [B, L, D]
        hidden = x
        for i, block in enumerate(tower.blocks[: len(tower.blocks) if pooled else stop]):
            x = block(x)  # [B, L, D]
            if i < stop:
                hidden = x
        if final_norm:
            hidden = tower.final_norm(hidden)
        if not pooled:
            return CLIPTextOutput(hidden, None, None)
        eos = input_ids.argmax(dim=-1)  # [B]: first EOS (49407 is the largest id)
        pooled_out = tower.final_norm(x[torch.arange(x.shape[0], device=x.device), eos])  # [B, D]
        return CLIPTextOutput(hidden, pooled_out, tower.project(pooled_out))
