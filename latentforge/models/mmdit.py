"""MMDiT: the joint-attention transformer of SD3 / SD3.5 (Esser et al. 2024, "Scaling Rectified Flow
Transformers for High-Resolution Image Synthesis", Fig. 2), in the Stability-AI/sd3.5 `mmditx.py` layout.

Attribute paths equal the checkpoint keys after the `model.diffusion_model.` prefix, so a released
SD3-medium / SD3.5-medium / SD3.5-large file loads with `load_state_dict(sd, strict=True)`.

Structure (D = 64·depth, heads = depth, head dim 64; `mmditx.py` "apply magic"):
- image tokens: `x_embedder` patchify conv (C -> D, k = s = patch) + centre crop of the `pos_embed`
  buffer [1, P², D]; text tokens: `context_embedder` Linear(4096 -> D);
- conditioning vector c = t_embedder(256-d [cos, sin] of the timestep) + y_embedder(pooled text 2048);
- `depth` JointBlocks: each stream (context, x) has its own adaLN modulation, qkv, proj and MLP, and
  both run ONE attention over the concatenated sequence [context, x] (the paper's "MM-DiT block");
  the last context block is `pre_only` (qkv only, its output is discarded);
- MMDiT-X (SD3.5-medium): x-blocks listed in `x_block_self_attn_layers` add a second self-attention
  `attn2` over image tokens only, with its own shift/scale/gate (9 modulation chunks instead of 6);
- `final_layer`: adaLN (shift, scale), Linear(D -> p·p·C_out), unpatchify.

The timestep fed in is 1000·σ (rectified flow, `sd3_impls.py`); the output is the velocity v = ε − x₀.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from latentforge.models.dit import sincos_pos_embed_2d
from latentforge.models.embeddings import (
    FinalLayer,
    Mlp,
    MLPEmbedder,
    PatchEmbed,
    SelfAttention,
    TimestepEmbedder,
    attention,
    modulate,
)
from latentforge.models.init import normal_


@dataclass(frozen=True)
class MMDiTConfig:
    patch_size: int = 2
    in_channels: int = 16  # latent channels (SD3 VAE)
    out_channels: int = 16
    depth: int = 24  # hidden size = 64·depth, heads = depth
    adm_in_channels: int = 2048  # pooled text: CLIP-L 768 ‖ CLIP-G 1280
    context_dim: int = 4096  # context_embedder in_features (T5-XXL width)
    pos_embed_max_size: int = 192  # P: the pos_embed table is a P×P grid of patches
    num_patches: int = 36864  # P², rows of the pos_embed buffer
    qk_norm: str | None = None  # None or "rms" (per-head RMSNorm of q and k, SD3.5)
    x_block_self_attn_layers: tuple[int, ...] = ()  # blocks with the extra image self-attention (MMDiT-X)
    mlp_ratio: float = 4.0
    # The joint attention leaves out the context's padding tokens as keys (each chunk's tokens after its
    # EOS); the conditioning then passes `context_mask` [B, Lc] bool (conditioning.clip_text), as the UNet's
    # flag of the same name. Not in SD3 (it attends to all tokens) nor in the state dict: a property of how a
    # model was trained here.
    mask_text_padding: bool = False

    def __post_init__(self):
        if self.num_patches != self.pos_embed_max_size**2:
            raise ValueError(
                f"num_patches {self.num_patches} != pos_embed_max_size² {self.pos_embed_max_size}²"
            )
        if self.qk_norm not in (None, "rms"):
            raise ValueError(f"qk_norm must be None or 'rms', got {self.qk_norm!r}")

    @property
    def hidden_size(self) -> int:
        return 64 * self.depth

    @property
    def num_heads(self) -> int:
        return self.depth


PRESETS = {
    # sd3_medium.safetensors: 2.03B parameters + 56.6M pos_embed buffer.
    "sd3-medium": MMDiTConfig(depth=24, pos_embed_max_size=192, num_patches=192**2),
    # sd3.5_medium.safetensors (MMDiT-X): attn2 in blocks 0..12, a 384² table for up to 768² latents.
    "sd35-medium": MMDiTConfig(
        depth=24,
        qk_norm="rms",
        x_block_self_attn_layers=tuple(range(13)),
        pos_embed_max_size=384,
        num_patches=384**2,
    ),
    # sd3.5_large.safetensors (and large-turbo): 8.06B parameters.
    "sd35-large": MMDiTConfig(depth=38, qk_norm="rms", pos_embed_max_size=192, num_patches=192**2),
}


def config_from_state_dict(sd: dict[str, torch.Tensor]) -> MMDiTConfig:
    """Infer the config from shapes and key presence, as `sd3_impls.BaseModel` does (prefix stripped)."""
    hidden, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape
    num_patches = sd["pos_embed"].shape[1]
    attn2 = {int(k.split(".")[1]) for k in sd if k.startswith("joint_blocks.") and ".x_block.attn2." in k}
    return MMDiTConfig(
        patch_size=patch,
        in_channels=in_channels,
        out_channels=sd["final_layer.linear.weight"].shape[0] // patch**2,
        depth=hidden // 64,
        adm_in_channels=sd["y_embedder.mlp.0.weight"].shape[1],
        context_dim=sd["context_embedder.weight"].shape[1],
        pos_embed_max_size=round(num_patches**0.5),
        num_patches=num_patches,
        qk_norm="rms" if "joint_blocks.0.context_block.attn.ln_q.weight" in sd else None,
        x_block_self_attn_layers=tuple(sorted(attn2)),
    )


class DismantledBlock(nn.Module):
    """One stream of a joint block: adaLN-modulated attention input, then gated residual attention and MLP.

    Split into `pre_attention` (q, k, v for the joint attention) and `post_attention` so that the context and
    image streams can share one attention call. Modulation chunks, in order:
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp[, shift_msa2, scale_msa2, gate_msa2];
    a `pre_only` block has only shift_msa, scale_msa.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        qk_norm: str | None,
        mlp_ratio: float = 4.0,
        pre_only: bool = False,
        x_block_self_attn: bool = False,
    ):
        super().__init__()
        self.pre_only = pre_only
        self.x_block_self_attn = x_block_self_attn
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads, qk_norm, pre_only=pre_only)
        if x_block_self_attn:
            self.attn2 = SelfAttention(hidden_size, num_heads, qk_norm)
        if not pre_only:
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.n_mods = 2 if pre_only else 9 if x_block_self_attn else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, self.n_mods * hidden_size))

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor):
        # x [B, L, D], c [B, D] -> (q, k, v) [B, H, L, 64] and what post_attention needs
        mods = self.adaLN_modulation(c).chunk(self.n_mods, dim=1)  # n_mods × [B, D]
        x_norm = self.norm1(x)
        qkv = self.attn.qkv_heads(modulate(x_norm, mods[0], mods[1]))
        return qkv, (mods, x_norm)

    def post_attention(self, x: torch.Tensor, attn: torch.Tensor, state) -> torch.Tensor:
        # x [B, L, D], attn [B, L, D] (this stream's rows of the joint attention) -> [B, L, D]
        mods, x_norm = state
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        x = x + gate_msa.unsqueeze(1) * self.attn.proj(attn)
        if self.x_block_self_attn:
            # MMDiT-X: image-only self-attention on the same norm1(x), modulated with its own shift/scale
            shift_msa2, scale_msa2, gate_msa2 = mods[6:]
            x = x + gate_msa2.unsqueeze(1) * self.attn2(modulate(x_norm, shift_msa2, scale_msa2))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    """MM-DiT block: separate weights per modality, one attention over the sequence [context, x]."""

    def __init__(self, hidden_size, num_heads, qk_norm, mlp_ratio, pre_only, x_block_self_attn):
        super().__init__()
        self.context_block = DismantledBlock(hidden_size, num_heads, qk_norm, mlp_ratio, pre_only=pre_only)
        self.x_block = DismantledBlock(
            hidden_size, num_heads, qk_norm, mlp_ratio, x_block_self_attn=x_block_self_attn
        )

    def forward(self, context: torch.Tensor, x: torch.Tensor, c: torch.Tensor, context_mask=None):
        # context [B, Lc, D], x [B, Lx, D], c [B, D] -> (context or None after the last block, x);
        # context_mask [B, Lc] bool: the context tokens that are keys (every image token always is)
        ctx_qkv, ctx_state = self.context_block.pre_attention(context, c)
        x_qkv, x_state = self.x_block.pre_attention(x, c)
        # one attention over the joint sequence [context, x]: q, k, v [B, H, Lc + Lx, 64]
        q, k, v = (torch.cat([a, b], dim=2) for a, b in zip(ctx_qkv, x_qkv, strict=True))
        keys = None
        if context_mask is not None:
            keys = torch.cat([context_mask.to(x.device), context_mask.new_ones(x.shape[:2])], dim=1)
        ctx_attn, x_attn = attention(q, k, v, key_mask=keys).split([context.shape[1], x.shape[1]], dim=1)
        if self.context_block.pre_only:
            context = None
        else:
            context = self.context_block.post_attention(context, ctx_attn, ctx_state)
        return context, self.x_block.post_attention(x, x_attn, x_state)


class MMDiT(nn.Module):
    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = cfg = config
        D = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = MLPEmbedder(cfg.adm_in_channels, D)
        self.context_embedder = nn.Linear(cfg.context_dim, D)
        # Fixed 2-D sin-cos table stored in the checkpoint (persistent buffer), centre-cropped per latent.
        self.register_buffer("pos_embed", torch.zeros(1, cfg.num_patches, D))
        self.joint_blocks = nn.ModuleList(
            JointBlock(
                D,
                cfg.num_heads,
                cfg.qk_norm,
                cfg.mlp_ratio,
                pre_only=i == cfg.depth - 1,
                x_block_self_attn=i in cfg.x_block_self_attn_layers,
            )
            for i in range(cfg.depth)
        )
        self.final_layer = FinalLayer(D, cfg.patch_size, cfg.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        """For training from scratch, DiT's init (Peebles & Xie 2023, §3.2 and `models.py` L182-216), which
        SD3 builds on (Esser et al. 2024, §4): xavier-uniform Linears with zero bias, the patch conv as a
        flattened Linear, N(0, 0.02) timestep MLP, and adaLN-Zero: every modulation and the final linear are
        zero, so each joint block starts as the identity on both streams and a fresh MMDiT outputs exactly
        zero. The position table is the fixed 2-D sin-cos embedding of its P×P grid (MAE form, as DiT's);
        released files carry their own. Draws from `generator` (None: the global RNG)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight, generator=generator)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1), generator=generator)
        nn.init.zeros_(self.x_embedder.proj.bias)
        normal_(self.t_embedder.mlp[0].weight, 0.02, generator)
        normal_(self.t_embedder.mlp[2].weight, 0.02, generator)
        zero = [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for block in self.joint_blocks:
            zero += [block.context_block.adaLN_modulation[-1], block.x_block.adaLN_modulation[-1]]
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        if self.pos_embed.device.type != "meta":
            table = sincos_pos_embed_2d(self.config.hidden_size, self.config.pos_embed_max_size)
            self.pos_embed.copy_(table[None].to(self.pos_embed.dtype))

    def cropped_pos_embed(self, h: int, w: int) -> torch.Tensor:
        # centre h×w window (in patches) of the P×P table: [1, P², D] -> [1, h·w, D]
        P = self.config.pos_embed_max_size
        if h > P or w > P:
            raise ValueError(f"latent of {h}x{w} patches exceeds the {P}x{P} position table")
        top, left = (P - h) // 2, (P - w) // 2
        table = self.pos_embed.view(1, P, P, -1)
        return table[:, top : top + h, left : left + w].reshape(1, h * w, -1)

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        # [B, h·w, p·p·C] (features ordered p, q, C) -> [B, C, h·p, w·p]
        p, C = self.config.patch_size, self.config.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], C, h * p, w * p)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        skip_layers: Sequence[int] = (),
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, C, H, W] latent, t [B] timestep (1000·σ), y [B, adm_in_channels] pooled text,
        context [B, Lc, context_dim] token embeddings -> velocity [B, C_out, H, W]. context_mask [B, Lc] bool
        (`mask_text_padding`): the context tokens the joint attention reads (None: all).

        `skip_layers` drops whole joint blocks (skip-layer guidance, `SkipLayerCFGDenoiser` in sd3.5).
        """
        x, c, context, (h, w) = self.embed(x, t, y, context)
        for i, block in enumerate(self.joint_blocks):
            if i not in skip_layers:
                context, x = block(context, x, c, context_mask)
        return self.unpatchify(self.final_layer(x, c), h, w)  # [B, C_out, H, W]

    def embed(self, x: torch.Tensor, t: torch.Tensor, y=None, context=None):
        """The inputs of the joint blocks: (image tokens [B, h·w, D], conditioning c [B, D], context tokens
        [B, Lc, D], the token grid (h, w))."""
        p = self.config.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"latent size {tuple(x.shape[-2:])} is not a multiple of the patch size {p}")
        h, w = x.shape[-2] // p, x.shape[-1] // p
        dtype = self.x_embedder.proj.weight.dtype
        x = x.to(dtype)
        x = self.x_embedder(x) + self.cropped_pos_embed(h, w).to(dtype)  # [B, h·w, D]
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        c = self.t_embedder(t)  # [B, D]
        if y is not None:
            c = c + self.y_embedder(y.to(dtype))  # [B, D]
        if context is None:  # no text tokens: the joint attention reduces to image self-attention
            context = x.new_zeros(x.shape[0], 0, self.config.context_dim)
        context = self.context_embedder(context.to(dtype))  # [B, Lc, D]
        return x, c, context, (h, w)
