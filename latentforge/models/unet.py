"""The Stable Diffusion UNet (SD1.x, SD2.x, SDXL base/refiner) in the original LDM/SGM checkpoint layout.

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models" (the ADM UNet of
Dhariwal & Nichol 2021 with cross-attention transformer blocks), and Podell et al. 2023 (SDXL).
Every module path is its key under `model.diffusion_model.` in a `.ckpt`/`.safetensors`:
`input_blocks.N.M.*`, `middle_block.*`, `output_blocks.N.M.*`, `out.{0,2}`, `time_embed.{0,2}`,
`label_emb.0.{0,2}` (SDXL), so `UNet(cfg).load_state_dict(sd, strict=True)` needs no renaming.
Shapes: x (B, C, H, W) latents, timesteps (B,) float (fractional allowed), context (B, L, context_dim),
y (B, adm_in_channels) for SDXL (see `sdxl_vector`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from latentforge.models.conv3x3 import conv3x3
from latentforge.models.embeddings import GroupNorm32, attention, timestep_embedding
from latentforge.models.upsample import upsample_conv, use_phases
from latentforge.models.winograd import in_workspace, scratch, workspace


@dataclass
class UNetConfig:
    """Field names are those of `UNetModel` in ldm/sgm `openaimodel.py` (and of the original YAMLs)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    num_res_blocks: int = 2
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors `ds` that get a transformer
    num_heads: int = -1  # heads per transformer (SD1: 8), or -1 to derive from num_head_channels
    num_head_channels: int = -1  # channels per head (SD2/SDXL: 64), or -1 to derive from num_heads
    transformer_depth: int | tuple[int, ...] = 1  # int or one entry per level
    transformer_depth_middle: int | None = None  # None: the last entry of transformer_depth (sgm)
    context_dim: int | tuple[int, ...] | None = 768  # a tuple gives one dim per block of each transformer
    use_linear_in_transformer: bool = False  # proj_in/proj_out as Linear (SD2, SDXL) or 1x1 conv (SD1)
    num_classes: str | None = None  # "sequential": `label_emb` MLP on the vector y (SDXL)
    adm_in_channels: int | None = None  # width of y for num_classes="sequential"
    # GroupNorm groups (ldm: 32, fixed; not in the state dict). A narrow UNet wants fewer: 32 groups on 32
    # channels is instance norm, which erases each channel's spatial mean (a flat background's level).
    norm_groups: int = 32
    # Cross-attention leaves out each text chunk's tokens after its EOS (the padding): the conditioning then
    # passes `context_mask` (B, L) (conditioning.py). Not in ldm and not in the state dict: a property of how
    # a UNet was trained here (released SD files attend to all 77 tokens, padding included).
    mask_text_padding: bool = False

    def depths(self) -> list[int]:
        d = self.transformer_depth
        return [d] * len(self.channel_mult) if isinstance(d, int) else list(d)

    def heads(self, ch: int) -> tuple[int, int]:
        """(num_heads, dim_head) of a transformer with `ch` channels (openaimodel.py, legacy=False)."""
        if self.num_head_channels == -1:
            return self.num_heads, ch // self.num_heads
        return ch // self.num_head_channels, self.num_head_channels


PRESETS: dict[str, UNetConfig] = {
    # CompVis/stable-diffusion configs/stable-diffusion/v1-inference.yaml (epsilon prediction)
    "sd15": UNetConfig(num_heads=8, context_dim=768),
    # Stability-AI/stablediffusion configs/stable-diffusion/v2-inference-v.yaml (v prediction; the
    # 512 base model, v2-inference.yaml, has the same UNet with epsilon prediction)
    "sd21": UNetConfig(num_head_channels=64, context_dim=1024, use_linear_in_transformer=True),
    # Stability-AI/generative-models configs/inference/sd_xl_base.yaml (level 0 has no attention, so
    # the first depth entry is unused; the middle block takes the last one, 10)
    "sdxl-base": UNetConfig(
        channel_mult=(1, 2, 4),
        attention_resolutions=(4, 2),
        num_head_channels=64,
        transformer_depth=(1, 2, 10),
        context_dim=2048,
        use_linear_in_transformer=True,
        num_classes="sequential",
        adm_in_channels=2816,
    ),
    # .../sd_xl_refiner.yaml
    "sdxl-refiner": UNetConfig(
        model_channels=384,
        attention_resolutions=(4, 2),
        num_head_channels=64,
        transformer_depth=4,
        context_dim=(1280, 1280, 1280, 1280),
        use_linear_in_transformer=True,
        num_classes="sequential",
        adm_in_channels=2560,
    ),
}


def sdxl_vector(
    pooled: torch.Tensor,
    original_size: tuple[int, int] | torch.Tensor,
    crop_coords: tuple[int, int] | torch.Tensor,
    target_size: tuple[int, int] | torch.Tensor,
) -> torch.Tensor:
    """SDXL base `y` (B, 1280 + 3·512 = 2816): pooled bigG text embedding, then each of (h, w),
    (top, left), (h, w) as 256-d sinusoidal embeddings, one per number (sgm `ConcatTimestepEmbedderND`
    with outdim 256, in the order of the `conditioner` in sd_xl_base.yaml). Sizes are in pixels."""
    return _vector(pooled, [original_size, crop_coords, target_size])


def sdxl_refiner_vector(
    pooled: torch.Tensor,
    original_size: tuple[int, int] | torch.Tensor,
    crop_coords: tuple[int, int] | torch.Tensor,
    aesthetic_score: float | torch.Tensor = 6.0,
) -> torch.Tensor:
    """SDXL refiner `y` (B, 1280 + 2·512 + 256 = 2560): pooled, (h, w), (top, left), aesthetic score
    (sd_xl_refiner.yaml; 6.0 is the usual positive score, 2.5 the negative)."""
    return _vector(pooled, [original_size, crop_coords, aesthetic_score])


def _vector(pooled: torch.Tensor, groups: list) -> torch.Tensor:
    """Each group is a number, a k-tuple (shared by the batch) or a (B, k) tensor of per-sample values."""
    b, parts = pooled.shape[0], [pooled]
    for g in groups:
        g = torch.as_tensor(g, dtype=torch.float32, device=pooled.device)
        g = g.reshape(1, -1).expand(b, -1) if g.ndim <= 1 else g  # (B, k)
        emb = timestep_embedding(g.reshape(-1), 256)  # (B·k, 256), [cos | sin] per number
        parts.append(emb.reshape(b, -1).to(pooled.dtype))  # (B, k·256), number-major
    return torch.cat(parts, dim=1)


# --------------------------------------------------------------------------------------------
# Building blocks (ldm/modules/diffusionmodules/openaimodel.py, ldm/modules/attention.py)


class ResBlock(nn.Module):
    """h = conv(SiLU(GN(x))) + Linear(SiLU(emb)); h = conv(Dropout(SiLU(GN(h)))); return skip(x) + h."""

    def __init__(self, ch: int, emb_ch: int, out_ch: int, groups: int = 32):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(groups, ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, out_ch))
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_ch), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if ch == out_ch else nn.Conv2d(ch, out_ch, 1)
        self.initialize_weights()

    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        nn.init.zeros_(self.out_layers[3].weight)  # zero_module: the block starts as the identity
        nn.init.zeros_(self.out_layers[3].bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        e = self.emb_layers(emb).to(x.dtype)[:, :, None, None]  # (B, out_ch, 1, 1)
        if torch.is_grad_enabled():
            h = self.in_layers(x) + e  # (B, out_ch, H, W)
            return self.skip_connection(x) + self.out_layers(h)
        # Inference: every intermediate below is a fresh tensor, so SiLU and the adds run in place
        # (no new (B, C, H, W) allocations; a + b == b + a bit for bit).
        gn1, _, conv1 = self.in_layers
        gn2, _, drop, conv2 = self.out_layers
        h = conv3x3(conv1, F.silu(gn1(x), inplace=True))
        h += e
        h = conv3x3(conv2, drop(F.silu(gn2(h), inplace=True)))
        h += self.skip_connection(x)
        return h


class CrossAttention(nn.Module):
    """softmax(q kᵀ / √d) v with `heads` heads of `dim_head`; k, v from `context` (or x: self-attention)."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        # (Fusing q/k/v into one (C, 3·inner) product measured no faster on CPU (≤ 0.5% of a forward)
        # and needs a cached weight copy (~225 MB for SD1.5), so the three products stay separate.)
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)  # (B, N|L, inner)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, h, N, d)
        return self.to_out(attention(q, k, v, key_mask=key_mask))  # (B, N, query_dim)


class GEGLU(nn.Module):
    """Shazeer 2020: proj to 2·dim_out, a ⊙ GELU(gate) with [a | gate] = proj(x)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        if torch.is_grad_enabled():
            return a * F.gelu(gate)
        return F.gelu(gate).mul_(a)  # inference: multiply into GELU's fresh output


class FeedForward(nn.Module):
    """net.2(GEGLU(x)): (B, N, C) → (B, N, mult·C) → (B, N, C)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        geglu, drop, out = self.net
        if (
            torch.is_grad_enabled()
            or x.device.type != "cpu"
            or not in_workspace()
            or any(map(_hooked, (geglu, geglu.proj, drop, out)))
        ):
            return self.net(x)
        # CPU inference inside the UNet's workspace (models/winograd.py): the GEGLU's halves a and gate as two
        # GEMMs into scratch memory, GELU in place, a ⊙ GELU(gate) into a, then net.2 into a fresh output.
        # The (N, 2·mult·C) projection and the GELU are the largest temporaries of an SD forward (84 + 42 MB
        # per block at a 64×64 latent, batch 2); fresh ones cost a page fault per 4 KiB touched, ~30% of the
        # projection's own time, so every block reuses the same memory instead.
        f = out.in_features
        x2 = x.reshape(-1, x.shape[-1])  # (B·N, C)
        a, gate = (t.view(-1, f) for t in scratch(x.device, x.dtype, [x2.shape[0] * f] * 2))
        w, b = geglu.proj.weight, geglu.proj.bias  # (2·f, C): rows [a | gate], as chunk(2) splits them
        torch.addmm(b[:f], x2, w[:f].T, out=a)
        torch.addmm(b[f:], x2, w[f:].T, out=gate)
        torch.ops.aten.gelu_(gate)  # contiguous, so the same vectorized kernel as F.gelu
        return out(drop(a.mul_(gate)).view(*x.shape[:-1], f))  # (B, N, C)


class BasicTransformerBlock(nn.Module):
    """Pre-LN: x += attn1(norm1 x); x += attn2(norm2 x, context); x += ff(norm3 x)."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if torch.is_grad_enabled():
            x = x + self.attn1(self.norm1(x))
            x = x + self.attn2(self.norm2(x), context, context_mask)
            return x + self.ff(self.norm3(x))
        # Inference: add the residual into each sublayer's fresh output (B, N, C) instead of allocating.
        h = self.attn1(self.norm1(x))
        h += x
        x = self.attn2(self.norm2(h), context, context_mask)
        x += h
        h = self.ff(self.norm3(x))
        h += x
        return h


class SpatialTransformer(nn.Module):
    """(B, C, H, W) → GN → proj_in → (B, HW, inner) → depth × block → proj_out → + x."""

    def __init__(
        self,
        ch: int,
        heads: int,
        dim_head: int,
        depth: int,
        context_dims: list[int],
        linear: bool,
        groups: int = 32,
    ):
        super().__init__()
        inner = heads * dim_head
        self.linear = linear
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        proj = nn.Linear if linear else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = proj(ch, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dims[k]) for k in range(depth)
        )
        self.proj_out = proj(inner, ch)
        self.initialize_weights()

    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        nn.init.zeros_(self.proj_out.weight)  # zero_module
        nn.init.zeros_(self.proj_out.bias)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.norm(x)
        if not _hooked(self.proj_in):
            # SD1's 1×1 conv or SD2/XL's Linear (the same (inner, C) matrix) as one batched GEMM straight
            # into token-major memory: (B, HW, C) @ Wᵀ, reading the normalized map through a transposed view
            # (no layout conversion, no (B, HW, C) copy).
            wt = self.proj_in.weight.flatten(1).T  # (C, inner)
            t = torch.baddbmm(self.proj_in.bias, t.flatten(2).transpose(1, 2), wt.expand(b, *wt.shape))
        elif not self.linear:
            t = self.proj_in(t).flatten(2).transpose(1, 2)
        else:
            t = self.proj_in(t.flatten(2).transpose(1, 2))  # (B, HW, inner)
        for block in self.transformer_blocks:
            t = block(t, context, context_mask)
        if not _hooked(self.proj_out):
            # back: W (inner → C) @ tokensᵀ per image, straight into (B, C, HW) memory
            wo = self.proj_out.weight.flatten(1)  # (C, inner)
            t = torch.baddbmm(self.proj_out.bias[:, None], wo.expand(b, *wo.shape), t.transpose(1, 2))
            return x + t.view(b, c, h, w)
        if self.linear:
            t = self.proj_out(t)
        # (B, HW, C) → (B, C, H, W) contiguous: the blocks return token-major (B, HW, C) memory, whose
        # transposed view would reach the 1x1 conv as channels_last and pick another oneDNN kernel;
        # diffusers also makes it contiguous here.
        t = t.transpose(1, 2).reshape(b, -1, h, w).contiguous()
        if not self.linear:
            t = self.proj_out(t)
        return x + t


def _hooked(module: nn.Module) -> bool:
    """Whether calls to `module` must go through module(...) (a LoRA or another hook is attached to it)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)  # (H, W) → (⌈H/2⌉, ⌈W/2⌉)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv3x3(self.op, x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, size: torch.Size | None = None) -> torch.Tensor:
        # Nearest ×2; `size` (the next skip's H, W) also handles latents not divisible by 2^levels, where
        # the original would fail at the skip concatenation (diffusers and ComfyUI do the same).
        b, _, h, w = x.shape
        exact2x = size is None or tuple(size) == (2 * h, 2 * w)
        if exact2x and use_phases(self.conv, x):
            return upsample_conv(self.conv, x)  # the same, on x itself (models/upsample.py)
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return conv3x3(self.conv, x)


class TimestepEmbedSequential(nn.Sequential):
    """An `input_blocks.N`, `output_blocks.N` or `middle_block`: routes emb and context to its layers."""

    def forward(self, x, emb, context=None, upsample_size=None, context_mask=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, context_mask)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


# --------------------------------------------------------------------------------------------
# The encoder half: time/label embeddings, input blocks, middle block. The ControlNet (controlnet.py) is a
# trainable copy of exactly these modules, so both networks build them here.


def check_config(cfg: UNetConfig) -> None:
    if cfg.num_heads == -1 and cfg.num_head_channels == -1:
        raise ValueError("set num_heads or num_head_channels")
    if cfg.num_classes not in (None, "sequential"):
        raise ValueError(f"num_classes={cfg.num_classes!r} is not supported (only None or 'sequential')")


def make_transformer(cfg: UNetConfig, ch: int, depth: int) -> SpatialTransformer:
    heads, dim_head = cfg.heads(ch)
    cd = cfg.context_dim
    dims = [cd] * depth if isinstance(cd, int) else list(cd)
    linear, groups = cfg.use_linear_in_transformer, cfg.norm_groups
    return SpatialTransformer(ch, heads, dim_head, depth, dims, linear, groups)


def make_embeddings(cfg: UNetConfig) -> tuple[nn.Sequential, nn.Sequential | None]:
    """(`time_embed.{0,2}`, SDXL's `label_emb.0.{0,2}` or None): 4·model_channels wide."""
    mc, emb_ch = cfg.model_channels, 4 * cfg.model_channels
    time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
    if cfg.num_classes != "sequential":
        return time_embed, None
    label = nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
    return time_embed, nn.Sequential(label)


def make_input_blocks(cfg: UNetConfig) -> tuple[nn.ModuleList, list[int]]:
    """(`input_blocks`, the channels of each block's output: the skips): conv_in, then per level
    num_res_blocks × (Res [+ ST]) and a Downsample except at the last."""
    mc, emb_ch, g = cfg.model_channels, 4 * cfg.model_channels, cfg.norm_groups
    depths = cfg.depths()
    blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
    skip_chs, ch, ds = [mc], mc, 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers = [ResBlock(ch, emb_ch, mult * mc, g)]
            ch = mult * mc
            if ds in cfg.attention_resolutions:
                layers.append(make_transformer(cfg, ch, depths[level]))
            blocks.append(TimestepEmbedSequential(*layers))
            skip_chs.append(ch)
        if level != len(cfg.channel_mult) - 1:
            blocks.append(TimestepEmbedSequential(Downsample(ch)))
            skip_chs.append(ch)
            ds *= 2
    return blocks, skip_chs


def make_middle_block(cfg: UNetConfig) -> TimestepEmbedSequential:
    ch, emb_ch, g = cfg.channel_mult[-1] * cfg.model_channels, 4 * cfg.model_channels, cfg.norm_groups
    depth = cfg.depths()[-1] if cfg.transformer_depth_middle is None else cfg.transformer_depth_middle
    return TimestepEmbedSequential(
        ResBlock(ch, emb_ch, ch, g), make_transformer(cfg, ch, depth), ResBlock(ch, emb_ch, ch, g)
    )


def embed(net: nn.Module, x: torch.Tensor, timesteps, context, y, context_mask=None):
    """The forward prologue of a UNet or ControlNet `net`: (emb (B, 4·mc), context, both in the weights'
    dtype, that dtype). context_mask, if given, must be (B, L) bool for a context (B, L, D)."""
    dtype = net.time_embed[0].weight.dtype
    t = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(x.shape[0])
    emb = net.time_embed(timestep_embedding(t, net.config.model_channels).to(dtype))  # (B, 4·mc)
    if net.config.num_classes is not None:
        if y is None or y.shape[0] != x.shape[0]:
            raise ValueError("this UNet needs y of shape (B, adm_in_channels), e.g. from sdxl_vector()")
        emb = emb + net.label_emb(y.to(dtype))
    if context is not None:
        context = context.to(dtype)
    if context_mask is not None:
        check_context_mask(context, context_mask)
    return emb, context, dtype


def check_context_mask(context: torch.Tensor | None, mask: torch.Tensor) -> None:
    """A key mask for the cross-attention: (B, L) bool like the context's first two dimensions, with at least
    one token kept per row (a row with none has no softmax). The last is read back only from a CPU tensor:
    on an accelerator it would stall every step, and a row with nothing kept gives NaN there, which the
    sampler's finite check reports after the loop."""
    if context is None or mask.dtype != torch.bool or tuple(mask.shape) != tuple(context.shape[:2]):
        want = "no context" if context is None else f"(B, L) = {tuple(context.shape[:2])}"
        raise ValueError(
            f"context_mask must be a bool tensor of shape {want}, got {mask.dtype} {tuple(mask.shape)}"
        )
    if mask.device.type == "cpu" and not bool(mask.any(dim=1).all()):
        raise ValueError("context_mask leaves a row with no token to attend to; every row needs one True")


# --------------------------------------------------------------------------------------------


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        check_config(cfg)
        self.config = cfg
        mc, levels = cfg.model_channels, len(cfg.channel_mult)
        depths = cfg.depths()
        emb_ch = 4 * mc  # time_embed_dim
        g = cfg.norm_groups

        self.time_embed, label_emb = make_embeddings(cfg)
        if label_emb is not None:  # SDXL: label_emb.0.{0,2}
            self.label_emb = label_emb
        self.input_blocks, skip_chs = make_input_blocks(cfg)
        ch, ds = skip_chs[-1], 2 ** (levels - 1)
        self.middle_block = make_middle_block(cfg)

        # Decoder: per level (reversed) num_res_blocks + 1 × (Res on [h | skip] [+ ST]), then Upsample.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chs.pop(), emb_ch, mult * mc, g)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(make_transformer(cfg, ch, depths[level]))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(g, ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))
        self.initialize_weights()

    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        nn.init.zeros_(self.out[2].weight)  # zero_module
        nn.init.zeros_(self.out[2].bias)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | float,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        control: Sequence[torch.Tensor] | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, in_channels, H, W), timesteps (B,) or scalar in [0, 1000), context (B, L, context_dim),
        y (B, adm_in_channels) → (B, out_channels, H, W) in x's dtype; computed in the weights' dtype.
        context_mask (B, L) bool: the context tokens the cross-attention may attend to (None: all).
        control: a ControlNet's residuals (controlnet.py), one per input block then one for the middle
        block, each shaped as that block's output: added to the middle block's output and to each skip as
        the decoder takes it (ControlNet's `ControlledUnetModel`). None: the plain UNet, unchanged."""
        emb, context, dtype = embed(self, x, timesteps, context, y, context_mask)
        if control is not None and len(control) != len(self.input_blocks) + 1:
            raise ValueError(
                f"control has {len(control)} residuals; this UNet takes {len(self.input_blocks) + 1} "
                "(one per input block and one for the middle block)"
            )

        with workspace():  # one buffer for this forward's Winograd convolutions (models/winograd.py)
            h, skips = x.to(dtype), []
            for block in self.input_blocks:
                h = block(h, emb, context, context_mask=context_mask)
                skips.append(h)
            h = self.middle_block(h, emb, context, context_mask=context_mask)
            if control is not None:
                h = h + control[-1].to(dtype)
            for block in self.output_blocks:
                skip = skips.pop()
                if control is not None:
                    skip = skip + control[len(skips)].to(dtype)  # the residual of input block len(skips)
                h = torch.cat([h, skip], dim=1)
                h = block(h, emb, context, skips[-1].shape[-2:] if skips else None, context_mask)
            return self.out(h).to(x.dtype)
