"""DiT: Diffusion Transformer with adaLN-Zero blocks (Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers", arXiv:2212.09748), in the layout of facebookresearch/DiT `models.py`.

Attribute paths equal the keys of the released `DiT-XL-2-256x256.pt` (a bare state_dict, no prefix), so
`DiT(PRESETS["dit-xl-2-256"]).load_state_dict(torch.load(path), strict=True)` works with no renaming.

The network (N = batch, T = (input_size / patch_size)² tokens, D = hidden_size):
    x [N, C, H, W] -> patchify + fixed 2-D sin-cos pos_embed -> [N, T, D]
    c = t_embedder(t) + y_embedder(y)                          -> [N, D]
    depth × DiTBlock(x, c) (adaLN-Zero)                        -> [N, T, D]
    final_layer(x, c) -> unpatchify                            -> [N, out_channels, H, W]
With `learn_sigma` the output has 2·C channels: ε, then the variance-interpolation value v of
Nichol & Dhariwal 2021 (IDDPM) that the learned-range variance uses.

Text-conditioned variant (our own models, `context_dim > 0`): every block gets a cross-attention to a text
context [N, L, context_dim] after its self-attention (as in PixArt-α), and the pooled text [N, pooled_dim]
enters c through `y_embedder.mlp` (Linear-SiLU-Linear, the SD3 `y_embedder` form) instead of the label table.
With `context_dim == 0` the module tree is exactly the original class-conditional DiT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

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
from latentforge.models.init import Embedding, normal_


@dataclass
class DiTConfig:
    """Field names follow `DiT.__init__` in facebookresearch/DiT `models.py`."""

    input_size: int = 32  # latent height = width (256² image / 8)
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1  # > 0 adds the null class row (index num_classes) for CFG
    num_classes: int = 1000
    learn_sigma: bool = True  # doubles the output channels (ε and the IDDPM variance value)
    context_dim: int = 0  # 0: class-conditional original; > 0: cross-attention to a text context
    pooled_dim: int = 0  # text variant only: width of the pooled text vector (0: none)
    # Text variant: the cross-attention leaves out each chunk's tokens after its EOS (the padding); the
    # conditioning then passes `context_mask` [N, L] bool (conditioning.clip_text), as the UNet's flag of the
    # same name (models/unet.py). Not in the state dict: a property of how a model was trained here.
    mask_text_padding: bool = False

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels


# DiT-XL/2 (`DiT_XL_2` in models.py: depth 28, hidden 1152, patch 2, 16 heads) at 256² and 512² images.
PRESETS: dict[str, DiTConfig] = {
    "dit-xl-2-256": DiTConfig(input_size=32),
    "dit-xl-2-512": DiTConfig(input_size=64),
}


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [grid_size², embed_dim] (MAE form, models.py L274-321).

    Token k = i·grid_size + j (row i, column j). Channels [0, D/2) encode the column j and [D/2, D) the row i
    (the original's `meshgrid(grid_w, grid_h)` quirk), each as [sin(p·ω) | cos(p·ω)] with
    ω_m = 10000^(-m / (D/4)), m < D/4. Computed in float64 like the numpy original.
    """
    if embed_dim % 4:
        raise ValueError(f"hidden_size must be divisible by 4 for the 2-D sin-cos embedding, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # [D/4]
    pos = torch.arange(grid_size, dtype=torch.float64)
    out = pos[:, None] * omega[None]  # [G, D/4]
    emb_1d = torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # [G, D/2]
    col = emb_1d[None, :, :].expand(grid_size, grid_size, -1)  # [i, j] -> embedding of j
    row = emb_1d[:, None, :].expand(grid_size, grid_size, -1)  # [i, j] -> embedding of i
    return torch.cat([col, row], dim=-1).reshape(grid_size * grid_size, embed_dim)


class LabelEmbedder(nn.Module):
    """Class labels [N] -> [N, D]; row `num_classes` is the null class (models.py L67-94).

    In training mode each label is replaced by the null class with probability `dropout_prob`, as the
    original does, so the unconditional branch of classifier-free guidance is trained. At sampling time the
    guidance code passes `y = num_classes` itself.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = Embedding(num_classes + int(dropout_prob > 0), hidden_size, std=0.02)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class CrossAttention(nn.Module):
    """Text variant: tokens [N, T, D] attend to a context [N, L, context_dim]."""

    def __init__(self, dim: int, context_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None):
        # context_mask [N, L] bool: the context tokens each query may attend to (None: all)
        n, t, d = x.shape
        h, dh = self.num_heads, d // self.num_heads
        q = self.q(x).reshape(n, t, h, dh).transpose(1, 2)  # [N, heads, T, d_head]
        k, v = (
            self.kv(context).reshape(n, context.shape[1], 2, h, dh).permute(2, 0, 3, 1, 4)
        )  # [N, heads, L, dh]
        return self.proj(attention(q, k, v, key_mask=context_mask))  # [N, T, D]


class DiTBlock(nn.Module):
    """adaLN-Zero block (models.py L101-122; paper §3.2):
    x += gate_msa · attn(modulate(norm1 x, shift_msa, scale_msa))
    [text variant: x += cross_attn(norm_cross x, context)]
    x += gate_mlp · mlp(modulate(norm2 x, shift_mlp, scale_mlp))
    with (shift, scale, gate) × 2 = adaLN_modulation(c) chunked 6 ways.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, context_dim: int = 0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        if context_dim > 0:
            self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
            self.cross_attn = CrossAttention(hidden_size, context_dim, num_heads)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None, context_mask=None
    ) -> torch.Tensor:
        # x [N, T, D], c [N, D] -> six [N, D]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(
            6, dim=1
        )
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if context is not None:
            x = x + self.cross_attn(self.norm_cross(x), context, context_mask)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class DiT(nn.Module):
    """Diffusion Transformer: `forward(x [N, C, H, W], t [N], y) -> [N, out_channels, H, W]`.

    Class-conditional (`context_dim == 0`): y = labels [N] (long), `num_classes` is the null class.
    Text variant (`context_dim > 0`): y = pooled text [N, pooled_dim] (or None when pooled_dim == 0) and
    context = text tokens [N, L, context_dim].
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, d)
        self.t_embedder = TimestepEmbedder(d)
        if config.context_dim == 0:
            self.y_embedder = LabelEmbedder(config.num_classes, d, config.class_dropout_prob)
        elif config.pooled_dim > 0:
            self.y_embedder = MLPEmbedder(config.pooled_dim, d)  # SD3's `y_embedder`
        grid = config.input_size // config.patch_size
        # Fixed, but saved in the released checkpoint (a requires_grad=False Parameter there): a persistent
        # buffer keeps the key and stays out of model.parameters().
        pos_embed = sincos_pos_embed_2d(d, grid).to(device=self.x_embedder.proj.weight.device)
        self.register_buffer("pos_embed", pos_embed.float()[None], persistent=True)  # [1, T, D]
        self.blocks = nn.ModuleList(
            [DiTBlock(d, config.num_heads, config.mlp_ratio, config.context_dim) for _ in range(config.depth)]
        )
        self.final_layer = FinalLayer(d, config.patch_size, config.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        """The original init (models.py L182-216): xavier-uniform Linears with zero bias, the patch conv as a
        flattened Linear, N(0, 0.02) label table and timestep MLP, and adaLN-Zero: every adaLN modulation and
        the final linear are zero, so a fresh DiT is the identity in each block and outputs exactly zero.
        The text variant's cross-attention output projection is zeroed too (each block stays the identity).
        Draws from `generator` (None: the global RNG)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight, generator=generator)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1), generator=generator)
        nn.init.zeros_(self.x_embedder.proj.bias)
        if isinstance(getattr(self, "y_embedder", None), LabelEmbedder):
            normal_(self.y_embedder.embedding_table.weight, 0.02, generator)
        normal_(self.t_embedder.mlp[0].weight, 0.02, generator)
        normal_(self.t_embedder.mlp[2].weight, 0.02, generator)
        zero = [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for block in self.blocks:
            zero.append(block.adaLN_modulation[-1])
            if hasattr(block, "cross_attn"):
                zero.append(block.cross_attn.proj)
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N, T, p²·C] -> [N, C, H, W] (einsum 'nhwpqc->nchpwq' as the original)."""
        p, c = self.config.patch_size, self.config.out_channels
        h = w = int(round(x.shape[1] ** 0.5))
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def embed(self, x: torch.Tensor, t: torch.Tensor, y=None, context=None):
        """The inputs of the block stack: (tokens h [N, T, D], conditioning c [N, D], context or None)."""
        cfg = self.config
        if x.shape[-2:] != (cfg.input_size, cfg.input_size):
            raise ValueError(
                f"DiT expects {cfg.input_size}×{cfg.input_size} latents, got {tuple(x.shape[-2:])}"
            )
        dtype = self.x_embedder.proj.weight.dtype
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])  # a scalar t applies to the whole batch
        h = self.x_embedder(x.to(dtype)) + self.pos_embed  # [N, T, D], T = H·W / p²
        c = self.t_embedder(t)  # [N, D]
        if cfg.context_dim == 0:
            if y is None:
                raise ValueError(
                    "class-conditional DiT needs labels y [N] (use num_classes for the null class)"
                )
            c = c + self.y_embedder(y)  # [N, D]
        else:
            if context is None:
                raise ValueError("text-conditioned DiT needs context [N, L, context_dim]")
            context = context.to(dtype)
            if cfg.pooled_dim > 0:
                if y is None:
                    raise ValueError("text-conditioned DiT with pooled_dim > 0 needs the pooled text y")
                c = c + self.y_embedder(y.to(dtype))  # [N, D]
        return h, c, context

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """context_mask [N, L] bool (text variant, `mask_text_padding`): the context tokens attended to."""
        h, c, context = self.embed(x, t, y, context)
        for block in self.blocks:
            h = block(h, c, context, context_mask)  # [N, T, D]
        h = self.final_layer(h, c)  # [N, T, p²·C_out]
        return self.unpatchify(h).to(x.dtype)  # [N, C_out, H, W]
