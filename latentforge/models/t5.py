"""The T5 v1.1 encoder (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer", JMLR 21(140), §2.1): SD3's third text encoder, T5-XXL, in the layout of the
released files (HF transformers' `T5EncoderModel` names).

Per block, with x [B, L, d_model] the residual stream and RMS the norm of Zhang & Sennrich 2019, Eq. 4 (a
scale only: no mean subtraction, no bias; Raffel §2.1 "a simplified version of layer normalization"):

    RMS(x) = x / sqrt(mean(x²) + ε) · g
    x = x + o(softmax(q kᵀ + b) v),  q, k, v = RMS(x) W_q, W_k, W_v per head
                                     (Vaswani et al. 2017, Eq. 1, without the 1/√d_kv)
    x = x + (GELU_tanh(RMS(x) W_0) ⊙ RMS(x) W_1) W_o
                                     (Shazeer 2020, "GLU Variants Improve Transformer", FFN_GEGLU)
    output = RMS_final(x)

with no bias anywhere. The logits are not scaled by 1/√d_kv: Mesh TensorFlow folds that factor into the
initialisation of W_q (transformers' T5Attention: scaling = 1.0; the SD3 reference multiplies k by √d_head
to cancel SDPA's scale, sd3.5 other_impls.py L730-741). b is a learned scalar per head and relative-position
bucket (Raffel §2.1 "Position embeddings": 32 buckets whose ranges grow logarithmically up to 128, beyond
which all offsets share one; the table lives in block 0 and every block adds the same b). v1.1 is the
gated-GELU feed-forward of google-research/text-to-text-transfer-transformer `released_checkpoints.md`.

Keys (in an SD3 single file under `text_encoders.t5xxl.`; a bare file such as `t5xxl_fp16.safetensors`
holds them without `transformer.`, which checkpoints.component_file adds):

    transformer.shared.weight                                             [vocab, d_model]
    transformer.encoder.block.N.layer.0.SelfAttention.{q,k,v}.weight      [heads·d_kv, d_model]
    transformer.encoder.block.N.layer.0.SelfAttention.o.weight            [d_model, heads·d_kv]
    transformer.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight    [buckets, heads]
    transformer.encoder.block.N.layer.{0,1}.layer_norm.weight             [d_model]
    transformer.encoder.block.N.layer.1.DenseReluDense.{wi_0,wi_1}.weight [d_ff, d_model]; wo [d_model, d_ff]
    transformer.encoder.final_layer_norm.weight                           [d_model]

`encoder.embed_tokens.weight`, the table transformers ties to `shared`, is accepted for `shared.weight`
(`canonical_keys`).

Half precision: T5's activations outgrow float16's 65504 in the feed-forward (transformers issues #4287,
#5651, #9295: the gated product before `wo` and `wo`'s output overflow) and along the residual stream;
Raffel et al. trained in bfloat16 (text-to-text-transfer-transformer issue #539). Here the residual stream,
every norm and the gated feed-forward after its two input projections are float32 whatever the weights'
dtype (a float16 `wo` weight is cast per call; transformers keeps `wo` in float32, `_keep_in_fp32_modules`);
the q, k, v, o, wi_0 and wi_1 projections and the attention run in the weights' dtype. Nothing is clamped.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from latentforge.models.init import Embedding


@dataclass
class T5Config:
    """Field names follow HF `T5Config` (google/t5-v1_1-xxl config.json)."""

    vocab_size: int = 32128  # the 32,100 SentencePiece pieces padded to a multiple of 128
    d_model: int = 4096
    d_kv: int = 64  # per-head width; heads · d_kv need not equal d_model
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name != "layer_norm_epsilon" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"T5Config.{f.name} must be a positive int, got {v!r}")
        buckets, far = self.relative_attention_num_buckets, self.relative_attention_max_distance
        if buckets < 4 or buckets % 2:
            raise ValueError(f"relative_attention_num_buckets must be even and >= 4, got {buckets}")
        if far <= buckets // 4:  # the logarithmic buckets span offsets buckets/4 .. max_distance
            raise ValueError(f"relative_attention_max_distance must exceed {buckets // 4}, got {far}")
        if not isinstance(self.layer_norm_epsilon, (int, float)) or not self.layer_norm_epsilon > 0:
            raise ValueError(f"layer_norm_epsilon must be a positive number, got {self.layer_norm_epsilon!r}")


PRESETS = {
    # google/t5-v1_1-xxl's encoder, SD3's text_encoders.t5xxl (sd3.5 sd3_infer.py T5_CONFIG)
    "t5xxl": T5Config(),
    # for tests: heads · d_kv (32) differs from d_model (48), as in T5-XXL (4096 = 64 · 64 by chance only)
    "tiny": T5Config(vocab_size=512, d_model=48, d_kv=8, d_ff=96, num_layers=3, num_heads=4),
}


def relative_position_bucket(
    relative: torch.Tensor, num_buckets: int = 32, max_distance: int = 128
) -> torch.Tensor:
    """The bucket of each key offset j − i (int64 tensor) for bidirectional attention (Raffel §2.1).

    Half of the buckets hold keys after the query (j − i > 0), half those at or before it. Within a half of
    n = num_buckets / 2 buckets, the first n/2 are exact offsets 0 .. n/2 − 1; the rest cover offsets n/2 ..
    max_distance logarithmically, bucket n/2 + floor(log(|d| / (n/2)) / log(max_distance / (n/2)) · n/2), and
    every larger offset falls in the last bucket of its half (Mesh TensorFlow `_relative_position_bucket`)."""
    half = num_buckets // 2
    exact = half // 2
    base = (relative > 0).long() * half
    d = relative.abs()
    # clamp: log(0) is never selected below, but must not turn into an undefined int
    scaled = torch.log(d.clamp(min=1).float() / exact) / math.log(max_distance / exact) * (half - exact)
    far = (exact + scaled.long()).clamp(max=half - 1)  # .long() truncates; the log is >= 0 here: floor
    return base + torch.where(d < exact, d, far)


class T5LayerNorm(nn.Module):
    """RMS norm computed in float32; returns float32 (the caller casts for the next linear layer)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, L, D] float32
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()


class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.q, self.k, self.v = (nn.Linear(cfg.d_model, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        self.buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance
        if has_bias:  # HF T5's initialisation of the table: N(0, 1/d_model)
            self.relative_attention_bias = Embedding(self.buckets, cfg.num_heads, std=cfg.d_model**-0.5)

    def position_bias(self, length: int, device: torch.device) -> torch.Tensor:
        """b [1, heads, L, L] float32: b[h, i, j] = table[bucket(j − i), h]."""
        pos = torch.arange(length, device=device)
        bucket = relative_position_bucket(pos[None, :] - pos[:, None], self.buckets, self.max_distance)
        return self.relative_attention_bias.weight.float()[bucket].permute(2, 0, 1)[None]

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, L, D]
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, self.heads, self.d_kv).transpose(1, 2) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)  # no 1/√d_kv
        return self.o(out.transpose(1, 2).reshape(B, L, self.heads * self.d_kv))


class T5DenseGatedActDense(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D] (weights' dtype) -> [B, L, D] float32
        h = F.gelu(self.wi_0(x).float(), approximate="tanh") * self.wi_1(x).float()  # [B, L, d_ff] float32
        w = self.wo.weight
        if w.dtype == torch.float16:  # the overflow site: wo in float32
            return F.linear(h, w.float())
        return self.wo(h.to(w.dtype)).float()


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)


class T5LayerFF(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, has_bias), T5LayerFF(cfg)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:  # x: [B, L, D] float32
        attn, ff = self.layer
        dtype = attn.SelfAttention.q.weight.dtype
        x = x + attn.SelfAttention(attn.layer_norm(x).to(dtype), bias).float()
        return x + ff.DenseReluDense(ff.layer_norm(x).to(ff.DenseReluDense.wi_0.weight.dtype))


class T5Stack(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.block = nn.ModuleList(T5Block(cfg, has_bias=i == 0) for i in range(cfg.num_layers))
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)


class T5Transformer(nn.Module):
    """HF `T5EncoderModel`'s parameters: `shared` and `encoder.{block, final_layer_norm}`."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.shared = Embedding(cfg.vocab_size, cfg.d_model, std=1.0)  # HF T5's init: N(0, 1)
        self.encoder = T5Stack(cfg)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B, L] -> [B, L, D] in the weights' dtype
        x = self.shared(input_ids).float()  # the residual stream: float32
        bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(input_ids.shape[1], x.device)
        for block in self.encoder.block:
            x = block(x, bias)  # block 0's bias, shared by all blocks
        return self.encoder.final_layer_norm(x).to(self.shared.weight.dtype)


class T5Encoder(nn.Module):
    """The `t5xxl` component: `transformer.*` as in SD3 files. `tokenizer` (t5_tokenizer.T5Tokenizer) is set
    by whoever loads it (checkpoints.load_checkpoint); the SD3 conditioning reads it from here."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.config = cfg
        self.transformer = T5Transformer(cfg)
        self.tokenizer = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L] int64 (t5_tokenizer: no BOS, EOS = 1, pad = 0; pads are attended, no mask, as
        SD3's reference and diffusers run it) -> the last block's output after the final norm
        [B, L, d_model]."""
        if input_ids.ndim != 2 or input_ids.dtype.is_floating_point:
            raise ValueError(
                f"input_ids must be [B, L] integer token ids, got {input_ids.dtype} {input_ids.shape}"
            )
        top = int(input_ids.max()) if input_ids.numel() else 0
        if top >= self.config.vocab_size or (input_ids.numel() and int(input_ids.min()) < 0):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got up to {top}")
        return self.transformer(input_ids)


def canonical_keys(sd: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """`sd` with the tied alias `{prefix}encoder.embed_tokens.weight` folded into `{prefix}shared.weight`:
    dropped when both are there (transformers' state_dict() lists the one table twice), renamed when alone."""
    alias, key = f"{prefix}encoder.embed_tokens.weight", f"{prefix}shared.weight"
    if alias not in sd:
        return dict(sd)
    out = dict(sd)
    table = out.pop(alias)
    if key in out and tuple(out[key].shape) != tuple(table.shape):
        raise ValueError(
            f"{key} {tuple(out[key].shape)} and {alias} {tuple(table.shape)} should be one tied table"
        )
    out.setdefault(key, table)
    return out


def config_from_state_dict(sd: Mapping[str, torch.Tensor], prefix: str = "transformer.") -> T5Config:
    """The T5Config of a v1.1 encoder's weights (keys as `canonical_keys` leaves them), read from the shapes;
    what the shapes do not give (ε, max_distance) is T5-XXL's. Missing keys fall back to T5-XXL's values, so
    that the strict load names them."""
    base = PRESETS["t5xxl"]
    blocks = f"{prefix}encoder.block."

    def dim(key: str, i: int, default: int) -> int:
        return int(sd[key].shape[i]) if key in sd and sd[key].ndim == 2 else default

    layers = {int(n) for k in sd if k.startswith(blocks) and (n := k[len(blocks) :].split(".")[0]).isdigit()}
    attn = f"{blocks}0.layer.0.SelfAttention."
    heads = dim(attn + "relative_attention_bias.weight", 1, base.num_heads)
    buckets = dim(attn + "relative_attention_bias.weight", 0, base.relative_attention_num_buckets)
    inner = dim(attn + "q.weight", 0, heads * base.d_kv)
    return dataclasses.replace(
        base,
        vocab_size=dim(f"{prefix}shared.weight", 0, base.vocab_size),
        d_model=dim(f"{prefix}shared.weight", 1, base.d_model),
        d_kv=inner // heads if inner % heads == 0 else base.d_kv,
        d_ff=dim(f"{blocks}0.layer.1.DenseReluDense.wi_0.weight", 0, base.d_ff),
        num_layers=max(layers) + 1 if layers else base.num_layers,
        num_heads=heads,
        relative_attention_num_buckets=buckets,
    )
