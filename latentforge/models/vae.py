"""The KL autoencoder of latent diffusion (Rombach et al. 2022, §3 and App. G), in the LDM checkpoint layout.

    x ∈ [-1, 1]^(3×H×W) --Encoder--> moments (2·z, H/f, W/f) --quant_conv--> N(mean, exp(logvar))
    z (embed_dim, H/f, W/f) --post_quant_conv--> --Decoder--> x̂,        f = 2^(len(ch_mult) - 1)

Module paths are the keys of `first_stage_model.*` in SD1/SD2/SDXL/SD3 checkpoints
(`CompVis/stable-diffusion:ldm/modules/diffusionmodules/model.py` Encoder L368 / Decoder L462,
`ldm/models/autoencoder.py` AutoencoderKL L285; SD3: `Stability-AI/sd3.5:sd3_impls.py` L380-742, the same
topology with 16 latent channels and no quant convs). Notable layout facts:
- every norm is GroupNorm(32, eps=1e-6) (computed in float32 here) and the nonlinearity is swish x·σ(x);
- Downsample pads (0, 1, 0, 1) and then runs a stride-2 3×3 conv without padding (asymmetric);
- the mid attention is single-head over the H·W positions, with q/k/v/proj_out as 1×1 convs;
- `decoder.up` is indexed by resolution level, not by execution order: `up.{last}` runs first.

Latent scaling is not part of the network: `LatentFormat` maps VAE latents to the denoiser's space.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from latentforge.models.conv3x3 import conv3x3
from latentforge.models.embeddings import GroupNorm32
from latentforge.models.upsample import upsample_conv, use_phases
from latentforge.models.winograd import release_workspace, workspace


@dataclass(frozen=True)
class AutoencoderKLConfig:
    # Field names follow the LDM `ddconfig` (+ `embed_dim` of AutoencoderKL).
    ch: int = 128  # base channel count
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # channels per resolution level = ch·ch_mult[i]
    num_res_blocks: int = 2  # ResnetBlocks per encoder level (the decoder has one more)
    z_channels: int = 4  # latent channels at the encoder/decoder boundary
    double_z: bool = True  # encoder outputs mean and logvar (2·z_channels)
    in_channels: int = 3
    out_ch: int = 3
    resolution: int = 256  # nominal image size; only used to place attn_resolutions
    attn_resolutions: tuple[int, ...] = ()  # levels (by feature-map size) that get an AttnBlock per block
    embed_dim: int = 4  # latent channels after quant_conv
    use_quant_conv: bool = True  # SD1/2/XL: quant_conv/post_quant_conv; SD3 (16 ch): none
    # GroupNorm groups (LDM: 32, fixed). Not in the state dict (the norms' parameters are per channel). A
    # narrow VAE wants fewer: with 32 channels, 32 groups is instance norm, which erases each channel's mean
    # over the image, so the decoder's last norm cannot carry a flat background's colour (docs/MODEL_CARD.md).
    norm_groups: int = 32

    def __post_init__(self):
        for c in {self.ch * m for m in self.ch_mult}:
            if c % self.norm_groups:
                raise ValueError(
                    f"norm_groups={self.norm_groups} must divide every level's channels, got {c}"
                )
        if not self.use_quant_conv and self.embed_dim != self.z_channels:
            raise ValueError(
                "without quant convs the latent has z_channels channels: set embed_dim = z_channels"
            )


PRESETS = {
    # SD1.x / SD2.x / SDXL VAE (v1-inference.yaml, v2-inference-v.yaml, sd_xl_base.yaml ddconfig).
    "sd": AutoencoderKLConfig(),
    # SD3 / SD3.5 VAE (sd3_impls.py SDVAE): 16 latent channels, no quant convs.
    "sd3": AutoencoderKLConfig(z_channels=16, embed_dim=16, use_quant_conv=False),
}


@dataclass(frozen=True)
class LatentFormat:
    """Denoiser latent = (VAE latent − shift)·scale (`sd3_impls.py` SD3LatentFormat L271-282)."""

    scale_factor: float
    shift_factor: float = 0.0

    def process_in(self, z: torch.Tensor) -> torch.Tensor:  # VAE latent -> denoiser latent
        return (z - self.shift_factor) * self.scale_factor

    def process_out(self, z: torch.Tensor) -> torch.Tensor:  # denoiser latent -> VAE latent
        return z / self.scale_factor + self.shift_factor

    # the "latentforge.latent_format" metadata entry of files our trainers write: {"scale": s, "shift": b}
    def to_json(self) -> str:
        return json.dumps({"scale": self.scale_factor, "shift": self.shift_factor})

    @classmethod
    def from_json(cls, text: str) -> LatentFormat:
        f = json.loads(text)
        return cls(float(f["scale"]), float(f.get("shift", 0.0)))


LATENT_FORMATS = {
    "sd1": LatentFormat(0.18215),  # v1-inference.yaml scale_factor
    "sd2": LatentFormat(0.18215),  # v2-inference-v.yaml scale_factor
    "sdxl": LatentFormat(0.13025),  # sd_xl_base.yaml scale_factor
    "sd3": LatentFormat(1.5305, 0.0609),  # sd3_impls.py SD3LatentFormat
}


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))) from the moments [B, 2C, h, w] (`ldm/modules/distributions`)."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # [B, C, h, w] each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        # KL(q || N(0, I)) summed over the latent, per image: [B]
        return 0.5 * (self.mean.square() + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


# ---------------------------------------------------------------------------------------------------------
# Building blocks (model.py: Normalize, nonlinearity, ResnetBlock, AttnBlock, Downsample, Upsample).


class GroupNorm(GroupNorm32):
    """GroupNorm (Wu & He 2018, eq. 1-2) computed in float32 like the UNet's (half-precision inputs come
    back in their dtype), that tiled encode/decode can switch to other statistics.

    `mode` None: the usual per-call statistics. "record": normalize as usual and keep this call's
    per-(sample, group) mean and variance in `stats`. "fixed": normalize with `stats` instead of the input's
    own, so every tile is normalized alike. Same parameters and keys as nn.GroupNorm."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-6):
        super().__init__(num_groups, num_channels, eps=eps)
        self.mode: str | None = None
        self.stats: tuple[torch.Tensor, torch.Tensor] | None = None  # mean, var: [B, G], float32 or wider

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
        if self.mode is None:
            return super().forward(x)
        # Per channel, in x's own memory format (a channels-last x is not group-contiguous, so reshaping it
        # to [B, G, C/G·H·W] would copy the whole map): the groups are a view, [B, G, C/G, H, W].
        B, C, G = x.shape[0], x.shape[1], self.num_groups
        dt = torch.promote_types(x.dtype, torch.float32)
        if self.mode == "record":
            dims = tuple(range(2, x.dim() + 1))
            var, mean = torch.var_mean(x.unflatten(1, (G, C // G)).to(dt), dim=dims, correction=0)  # [B, G]
            self.stats = (mean, var)
            return super().forward(x)
        if self.stats is None:
            raise RuntimeError("GroupNorm in mode 'fixed' has no recorded statistics")
        mean, var = self.stats
        per_channel = (B, C) + (1,) * (x.dim() - 2)  # each group's value repeated over its C/G channels
        shift = mean.to(dt).repeat_interleave(C // G, dim=1).view(per_channel)
        scale = torch.rsqrt(var + self.eps).to(dt).repeat_interleave(C // G, dim=1).view(per_channel)
        w, b = (p.to(dt).view(per_channel[1:]) for p in (self.weight, self.bias))
        h = torch.sub(x, shift)  # x − μ in dt and in x's memory format: the one full-size result
        if torch.is_grad_enabled():
            return (h * scale * w + b).to(x.dtype)
        # Inference (every tile of a tiled decode): scaled and shifted in place (out of place, (x − μ), its
        # products and the affine output would be four maps of x's size: 728 MB at the SD decoder's
        # [1, 256, 432, 432]). Same operations in the same order as out of place: the same numbers.
        return h.mul_(scale).mul_(w).add_(b).to(x.dtype)


def Normalize(channels: int, groups: int = 32) -> GroupNorm:
    return GroupNorm(groups, channels, eps=1e-6)


def swish(h: torch.Tensor) -> torch.Tensor:
    """x·σ(x) of a norm's fresh output; without autograd in place, so the norm's output and its swish are
    not both held: at the decoder's full resolution each is a [B, 128, H, W] float32 map (91 MB at 432²)."""
    return F.silu(h, inplace=not torch.is_grad_enabled())


class ResnetBlock(nn.Module):
    # x + conv2(swish(norm2(conv1(swish(norm1(x)))))); the VAE has no timestep input and dropout 0.
    def __init__(self, in_channels: int, out_channels: int, groups: int = 32):
        super().__init__()
        self.norm1 = Normalize(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # 1×1 projection of the skip path on a channel change
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, Cin, H, W] -> [B, Cout, H, W]
        h = conv3x3(self.conv1, swish(self.norm1(x)))
        h = swish(self.norm2(h))  # (conv1's output freed here, not held through conv2)
        h = conv3x3(self.conv2, h)
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


# Query rows per scaled_dot_product_attention call in AttnBlock (see there).
ATTN_CHUNK = 4096


class AttnBlock(nn.Module):
    """Single-head self-attention over the H·W positions, softmax(q·kᵀ/√C)·v, with 1×1-conv projections.

    Memory: q, k, v are made contiguous [B, 1, H·W, C] (a transposed view, unit stride along H·W instead
    of C, sends PyTorch's CPU SDPA to its math path, which materialises the [H·W, H·W] score matrix and
    its softmax: 17 GB for a 256×256 latent in float32; contiguous, it takes the fused flash kernel, whose
    working set is a few blocks per thread). The queries also go in chunks of `ATTN_CHUNK` rows, so even
    a backend that materialises the scores (another device, dtype or head size without a fused kernel)
    holds at most [ATTN_CHUNK, H·W] of them: memory linear in the pixels. Each query row's result does not
    depend on the other rows, so chunking changes nothing but the order of work."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.norm = Normalize(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
        B, C, H, W = x.shape
        n = H * W
        h = self.norm(x)

        def tokens(t):  # [B, C, H, W] -> [B, 1, H·W, C] (one head), contiguous
            return t.reshape(B, 1, C, n).transpose(-1, -2).contiguous()

        q, k, v = tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h))
        del h
        if n <= ATTN_CHUNK:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = torch.empty_like(q)
            for i in range(0, n, ATTN_CHUNK):
                out[:, :, i : i + ATTN_CHUNK] = F.scaled_dot_product_attention(
                    q[:, :, i : i + ATTN_CHUNK], k, v
                )
        del q, k, v
        h = out.transpose(-1, -2).reshape(B, C, H, W)  # [B, 1, H·W, C] -> [B, C, H, W]
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, C, ⌊H/2⌋, ⌊W/2⌋]
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right and bottom only


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, C, 2H, 2W]
        # conv(nearest ×2 of x), computed on x itself (models/upsample.py: 16 instead of 36 MACs per pixel)
        if use_phases(self.conv, x):
            return upsample_conv(self.conv, x)
        return conv3x3(self.conv, F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    # One resolution level: keys `block.M`, `attn.M` (only at attn_resolutions), `downsample`/`upsample`.
    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)


class Mid(nn.Module):
    # block_1 -> attn_1 -> block_2 at the lowest resolution (keys `mid.block_1`, `mid.attn_1`, `mid.block_2`)
    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderKLConfig):
        super().__init__()
        n, g = len(cfg.ch_mult), cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        res, c_in = cfg.resolution, cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            c_out = cfg.ch * mult
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out, g) for j in range(cfg.num_res_blocks)]
            attns = [AttnBlock(c_out, g) for _ in blocks] if res in cfg.attn_resolutions else []
            level = Level(blocks, attns)
            if i != n - 1:
                level.downsample = Downsample(c_out)
                res //= 2
            self.down.append(level)
            c_in = c_out
        self.mid = Mid(c_in, g)
        self.norm_out = Normalize(c_in, g)
        self.conv_out = nn.Conv2d(c_in, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, 2z, H/f, W/f]
        with workspace():  # one buffer for this forward's Winograd convolutions (models/winograd.py)
            return in_channels_last(self._forward, x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # [B, ch, H, W]
        for level in self.down:  # (one loop, `h` the only reference: see Decoder._forward)
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)  # halves H and W
        h = self.mid(h)  # [B, ch·ch_mult[-1], H/f, W/f]
        return self.conv_out(swish(self.norm_out(h)))


# oneDNN's CPU convolutions are faster on NHWC activations than on NCHW ones, with the weights left as they
# are (oneDNN reorders them per call). Measured on a 2-core AVX2 machine, NCHW -> NHWC: the SD VAE at 512²
# encode 16.4 -> 13.5 s, decode 29.3 -> 25.0 s; at 128² 0.94 -> 0.80 and 1.67 -> 1.63 s; the default model's
# VAE at 64², batch 16, 0.162 -> 0.142 and 0.401 -> 0.311 s. So on the CPU an NCHW input runs through the
# network in channels-last and comes back NCHW; the two conversions touch only the 3- and 4-channel ends.
# Same arithmetic in another summation order: outputs differ by float32 rounding (~1e-5 of the range).
def in_channels_last(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    if x.device.type != "cpu" or not x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return run(x)  # GPU (the caller's format choice), or an input already channels-last (or 1×1 / 1-ch)
    return run(x.contiguous(memory_format=torch.channels_last)).contiguous()


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderKLConfig):
        super().__init__()
        n, g = len(cfg.ch_mult), cfg.norm_groups
        c_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // 2 ** (n - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = Mid(c_in, g)
        # Built from the lowest resolution up, but stored so that up[i] is level i (up[0] = full resolution).
        levels: list[Level] = []
        for i in reversed(range(n)):
            c_out = cfg.ch * cfg.ch_mult[i]
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out, g) for j in range(cfg.num_res_blocks + 1)]
            attns = [AttnBlock(c_out, g) for _ in blocks] if res in cfg.attn_resolutions else []
            level = Level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(c_out)
                res *= 2
            levels.insert(0, level)
            c_in = c_out
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(c_in, g)
        self.conv_out = nn.Conv2d(c_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # [B, z, h, w] -> [B, 3, h·f, w·f]
        return in_channels_last(self._forward, z)

    # Peak memory is set at the full-resolution level, where the maps are largest (SD VAE at 432²: the
    # upsampled [1, 256, 432, 432] input of its first block, 182 MB, and 91 MB per 128-channel map). So:
    # - the Winograd workspace (one buffer reused by the convolutions of a level, 155 MB for the SD VAE's
    #   54² tiles) is freed before each upsampling, which quadruples the maps; a level that takes the
    #   Winograd path grows it again (one allocation per level, not per convolution);
    # - the blocks run in this one loop, with `h` the only reference to the running activation, so each
    #   block's input is freed as soon as the block returns (in a helper called per level, the caller's
    #   reference would keep the level's input alive through all of its blocks).
    def _forward(self, z: torch.Tensor) -> torch.Tensor:
        with workspace():  # models/winograd.py
            h = self.mid(self.conv_in(z))  # [B, ch·ch_mult[-1], h, w]
            for level in reversed(self.up):  # execution order: lowest resolution first
                for i, block in enumerate(level.block):
                    h = block(h)
                    if len(level.attn) > 0:
                        h = level.attn[i](h)
                if hasattr(level, "upsample"):
                    release_workspace()
                    h = level.upsample(h)  # doubles H and W
        return self.conv_out(swish(self.norm_out(h)))  # [B, out_ch, h·f, w·f]


# ---------------------------------------------------------------------------------------------------------
# Tiling. Along each axis the input is cut into the fewest tiles of at most `tile` that overlap their
# neighbours by at least `overlap`, and the tile is then shrunk to the smallest size that still gives that
# overlap, so the work is about the area plus the overlaps (a fixed tile would compute up to 2x per axis on
# an input just over one tile). Each tile runs on its own; its output is added into the result with a
# weight that ramps linearly across the actual overlap with each neighbour (1 elsewhere), and the sum is
# divided by the summed weight.
#
# GroupNorm: a tile's own statistics differ from the whole image's, which shows as a change of tone from
# tile to tile. The usual remedy (the GroupNorm estimate of pkuliyi2015/multidiffusion-upscaler's Tiled
# VAE): the network first runs once on the input downscaled to fit one tile and records every GroupNorm's
# per-(sample, group) mean and variance; every tile is then normalized with those (`global_norm=True`, the
# default). Exact global statistics would need the whole activation of every layer (memory that grows with
# the area) or one pass over all tiles per GroupNorm layer (~30x the work). Measured (tests/test_models_vae):
# on a small VAE trained for 400 steps on piecewise-smooth scenes, the estimate cut the tiled-vs-untiled
# error by 1.6-1.8x (decoder) and 3.4-4x (encoder); on random weights the statistics the tiles use get
# ~2x closer to the untiled ones (the means; the variances a little), while the output error stays about
# the same (dominated by the tile borders).
#
# Peak memory: the network only ever sees one tile (or the downscaled copy, no larger than a tile), so
# its activations are bounded by the tile size whatever the image area; what grows with the area is the
# result itself plus a one-channel weight map [1, 1, H, W] (1/out_ch of the result), i.e. only the output.


def _tile_grid(length: int, tile: int, overlap: int) -> tuple[int, list[int]]:
    """(tile size, tile starts) along an axis of `length` (all in grid units), 0 <= overlap < tile.

    n = ⌈(L − o)/(T − o)⌉ tiles of size t = ⌈(L + (n−1)·o)/n⌉ <= T, with starts round(i·(L − t)/(n − 1)):
    every step between starts is at most ⌈(L − t)/(n − 1)⌉ <= t − o, so neighbours overlap by >= o."""
    if length <= tile:
        return length, [0]
    n = math.ceil((length - overlap) / (tile - overlap))  # >= 2
    size = math.ceil((length + (n - 1) * overlap) / n)
    return size, [round(i * (length - size) / (n - 1)) for i in range(n)]


def _ramp(starts: list[int], i: int, size: int, scale: int, device) -> torch.Tensor:
    # Weight along one axis of tile i, in output units ([size·scale]): rises over the overlap with tile i-1
    # and falls over the overlap with tile i+1. Values are (k + 0.5)/overlap, never 0.
    n = size * scale
    k = torch.arange(n, device=device, dtype=torch.float32) + 0.5
    w = torch.ones(n, device=device)
    if i > 0 and (ov := (starts[i - 1] + size - starts[i]) * scale) > 0:
        w = torch.minimum(w, k / ov)
    if i < len(starts) - 1 and (ov := (starts[i] + size - starts[i + 1]) * scale) > 0:
        w = torch.minimum(w, (n - k) / ov)
    return w


def _downscaled(x: torch.Tensor, tile: int, unit: int) -> torch.Tensor:
    # x [B, C, H·unit, W·unit] -> [B, C, h·unit, w·unit] with max(h, w) <= `tile` grid units (aspect kept):
    # the copy whose GroupNorm statistics stand in for the whole input's. Sampled (nearest), not averaged:
    # averaging k values shrinks the variance of a noisy input by up to k (white-noise latents), and every
    # GroupNorm's variance with it; sampling keeps the distribution of the values and of their regions.
    H, W = x.shape[-2] // unit, x.shape[-1] // unit
    s = max(H, W) / tile
    h, w = max(1, min(H, round(H / s))), max(1, min(W, round(W / s)))
    return F.interpolate(x, size=(h * unit, w * unit), mode="nearest-exact")


def _run_tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    overlap: int,
    unit_in: int,
    unit_out: int,
    norms: list[GroupNorm] | tuple[()] = (),
) -> torch.Tensor:
    # A grid unit is `unit_in` input and `unit_out` output pixels (encoder: f and 1, decoder: 1 and f).
    # `norms`: the GroupNorms inside `fn` to normalize with statistics estimated on a downscaled copy.
    if tile % unit_in or overlap % unit_in or x.shape[-2] % unit_in or x.shape[-1] % unit_in:
        raise ValueError(
            f"tile, overlap and the input size must be multiples of {unit_in}, got tile={tile}, "
            f"overlap={overlap}, input {tuple(x.shape[-2:])}"
        )
    H, W = x.shape[-2] // unit_in, x.shape[-1] // unit_in  # in grid units
    T, ov = tile // unit_in, overlap // unit_in
    if not 0 <= ov < T:
        raise ValueError(f"need 0 <= overlap < tile, got overlap={overlap}, tile={tile}")
    th, ys = _tile_grid(H, T, ov)
    tw, xs = _tile_grid(W, T, ov)
    if len(ys) == len(xs) == 1:
        return fn(x)  # one tile: exactly the untiled result
    try:
        if norms:
            for m in norms:
                m.mode = "record"
            fn(_downscaled(x, max(th, tw), unit_in))  # costs at most one more tile
            for m in norms:
                m.mode = "fixed"
        out = weight = None
        for i, y0 in enumerate(ys):
            wy = _ramp(ys, i, th, unit_out, x.device)
            for j, x0 in enumerate(xs):
                crop = x[..., y0 * unit_in : (y0 + th) * unit_in, x0 * unit_in : (x0 + tw) * unit_in]
                y = fn(crop)  # [B, C, th·unit_out, tw·unit_out]
                if out is None:
                    out = y.new_zeros((*y.shape[:2], H * unit_out, W * unit_out))
                    weight = y.new_zeros((1, 1, H * unit_out, W * unit_out))
                w = (wy[:, None] * _ramp(xs, j, tw, unit_out, x.device)[None, :]).to(y.dtype)
                rows, cols = (
                    slice(y0 * unit_out, (y0 + th) * unit_out),
                    slice(x0 * unit_out, (x0 + tw) * unit_out),
                )
                out[..., rows, cols] += y * w
                weight[..., rows, cols] += w
                del y
    finally:
        for m in norms:
            m.mode, m.stats = None, None
    return out / weight


# ---------------------------------------------------------------------------------------------------------


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: AutoencoderKLConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.use_quant_conv:
            self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
            self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        else:
            self.quant_conv = self.post_quant_conv = None

    @property
    def downscale(self) -> int:  # f: image pixels per latent pixel along each axis
        return 2 ** (len(self.config.ch_mult) - 1)

    @property
    def latent_channels(self) -> int:
        return self.config.embed_dim

    def _moments(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, 2·embed_dim, H/f, W/f]
        h = self.encoder(x)
        return self.quant_conv(h) if self.quant_conv is not None else h

    def _decode(self, z: torch.Tensor) -> torch.Tensor:  # [B, embed_dim, h, w] -> [B, 3, h·f, w·f]
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x: images in [-1, 1], [B, 3, H, W] -> q(z|x) over [B, embed_dim, H/f, W/f] (unscaled latents)."""
        return DiagonalGaussian(self._moments(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: unscaled latents [B, embed_dim, h, w] -> images [B, 3, h·f, w·f], nominally in [-1, 1]."""
        return self._decode(z)

    def _norms(self, part: nn.Module, global_norm: bool) -> list[GroupNorm]:
        return [m for m in part.modules() if isinstance(m, GroupNorm)] if global_norm else []

    def encode_tiled(
        self, x: torch.Tensor, tile: int = 512, overlap: int = 64, global_norm: bool = True
    ) -> DiagonalGaussian:
        """Encode tile by tile (tile: the largest tile, overlap: the least overlap, image pixels, multiples
        of f); blends mean and logvar. `global_norm`: GroupNorm statistics estimated once on the image
        downscaled to one tile instead of each tile's own (see the tiling notes above)."""
        norms = self._norms(self.encoder, global_norm)
        moments = _run_tiled(self._moments, x, tile, overlap, unit_in=self.downscale, unit_out=1, norms=norms)
        return DiagonalGaussian(moments)

    def decode_tiled(
        self, z: torch.Tensor, tile: int = 64, overlap: int = 16, global_norm: bool = True
    ) -> torch.Tensor:
        """Decode tile by tile (tile: the largest tile, overlap: the least overlap, latent pixels); the
        images are blended over the overlaps. `global_norm` as in `encode_tiled`."""
        norms = self._norms(self.decoder, global_norm)
        return _run_tiled(self._decode, z, tile, overlap, unit_in=1, unit_out=self.downscale, norms=norms)

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        # Reconstruction for training: (x̂, q(z|x)).
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
