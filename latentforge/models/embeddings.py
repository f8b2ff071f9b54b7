"""The pieces several networks share, one copy each: the sinusoidal timestep embedding and the embedders
built on it, the layers DiT and MMDiT have in common (both follow timm / facebookresearch/DiT: SD3's
`mmditx.py` took them from there), and the GroupNorm that computes in float32 (UNet and VAE).

Attribute names are checkpoint keys (`x_embedder.proj`, `t_embedder.mlp.{0,2}`, `mlp.fc{1,2}`,
`attn.{qkv,proj}`, `final_layer.{linear, adaLN_modulation.1}`), the same in every network that uses them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) → (B, dim) sinusoid [cos | sin] of t·ω_i, ω_i = max_period^(−i/half), i < half = dim // 2 (a zero
    column is appended for odd dim), computed in float32 whatever t's dtype; the caller casts.

    One convention serves every network here: ldm/sgm `util.timestep_embedding` (UNet, SDXL's size/crop
    vectors), GLIDE/ADM as DiT and SD3's `mmditx.py` copy it; diffusers' `get_timestep_embedding` with
    flip_sin_to_cos=True, downscale_freq_shift=0. (The LDM VAE's `get_timestep_embedding` is [sin | cos]
    with half − 1; the SD VAE does not use it.)
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class MLPEmbedder(nn.Module):
    """Linear → SiLU → Linear, keys `mlp.0`, `mlp.2` (SD3's `VectorEmbedder` for the pooled text; the MLP of
    `TimestepEmbedder`)."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_features, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class TimestepEmbedder(MLPEmbedder):
    """t (B,) → 256-d sinusoid (float32) → Linear-SiLU-Linear in the weights' dtype → (B, D)
    (DiT `models.py` L27-64; the same class in SD3's `mmditx.py`)."""

    frequency_embedding_size = 256

    def __init__(self, hidden_size: int):
        super().__init__(self.frequency_embedding_size, hidden_size)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size)  # (B, 256) float32
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches → tokens (timm `PatchEmbed`): (B, C, H, W) → (B, H/p·W/p, D)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # contiguous tokens: a transposed view would carry its layout through every residual add, so each
        # LayerNorm and Linear of the network would copy its input first (benchmarks/mmdit_forward.py)
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, L, D) · (1 + scale (B, D)) + shift (B, D) (DiT `models.py` L19-20)."""
    return x * (1 + scale[:, None]) + shift[:, None]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ / √d_head [+ causal mask]) v: q (B, heads, L, d_head), k, v (B, heads, S, d_head) →
    (B, L, heads·d_head), the heads merged back. key_mask (B, S) bool: the keys each row may attend to
    (False: left out of the softmax, as diffusers' `encoder_attention_mask`); every row needs one True."""
    mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, S), broadcast over heads
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    return out.transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection with bias (timm `Attention`, as DiT uses it),
    and SD3's options: per-head RMSNorm of q and k (`qk_norm="rms"`, keys `ln_q`, `ln_k`) and `pre_only`
    (qkv without the output projection, for the last context block of MMDiT)."""

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: str | None = None, pre_only: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        if not pre_only:
            self.proj = nn.Linear(hidden_size, hidden_size)
        self.head_dim = head_dim = hidden_size // num_heads
        if qk_norm == "rms":
            self.ln_q = nn.RMSNorm(head_dim, eps=1e-6)
            self.ln_k = nn.RMSNorm(head_dim, eps=1e-6)
        else:
            self.ln_q = self.ln_k = nn.Identity()

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, L, D) → q, k, v (B, heads, L, d_head); the qkv features are ordered (3, heads, d_head)."""
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return self.ln_q(q), self.ln_k(k), v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(attention(*self.qkv_heads(x)))


class Mlp(nn.Module):
    """fc1 → GELU(tanh) → fc2 (timm `Mlp` as DiT and SD3 build it)."""

    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)  # (B, L, 4D)
        if h.requires_grad:  # autograd keeps the pre-activation
            return self.fc2(F.gelu(h, approximate="tanh"))
        torch.ops.aten.gelu_(h, approximate="tanh")  # inference: in place, no second (B, L, 4D) buffer
        return self.fc2(h)


class FinalLayer(nn.Module):
    """LayerNorm → adaLN (shift, scale) → Linear(D, p²·out_channels) (DiT `models.py` L125-142; SD3 alike)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 × (B, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, L, p²·C_out)


# Elements per float32 piece of a half-precision GroupNorm input (GroupNorm32): 16 MiB in float32.
GROUP_NORM_PIECE = 1 << 22


class GroupNorm32(nn.GroupNorm):
    """nn.GroupNorm computed in at least float32 and returned in the input's dtype (ldm `util.normalization`,
    `GroupNorm32`): half-precision statistics over C/G·H·W values lose too much. Same parameters and keys.

    Memory: a half-precision input is normalized a few whole groups at a time (each group's statistics and
    output depend on that group alone, so the result is the same bit for bit), so the float32 copies are
    one piece of ≤ GROUP_NORM_PIECE elements, not two of the whole input (at 1024² pixels the SD VAE's
    decoder's last levels hold [1, 128, 1024, 1024]: 0.5 GiB per float32 copy)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, ...]
        dt = torch.promote_types(x.dtype, torch.float32)
        w, b = self.weight.to(dt), self.bias.to(dt)
        G, C = self.num_groups, x.shape[1]
        per_group = x.numel() // G
        step = max(1, GROUP_NORM_PIECE // max(per_group, 1)) * (C // G)  # channels per piece, whole groups
        if dt == x.dtype or step >= C:
            return F.group_norm(x.to(dt), G, w, b, self.eps).to(x.dtype)
        out = torch.empty_like(x)
        for c in range(0, C, step):
            piece = x[:, c : c + step].to(dt)
            g = piece.shape[1] * G // C
            out[:, c : c + step] = F.group_norm(piece, g, w[c : c + step], b[c : c + step], self.eps)
        return out
