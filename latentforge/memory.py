"""How much memory a generation job needs, estimated from the shapes before any work is done.

`estimate(pipe, width, height, batch, cfg)` gives the peak activation bytes of sampling and of decoding
(the formulas, with tensor shapes, are in its docstring); `check` compares them with the memory available
(`available_memory`: CUDA's free memory, or MemAvailable of /proc/meminfo on Linux) and refuses a job that
would not fit, naming the size and the estimate, or says that decoding must be tiled.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
from torch import nn


class NotEnoughMemory(ValueError):
    """The job would not fit in the memory available: raised before any work (a user error: a size)."""


def _meminfo_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (Linux), None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_memory(device: torch.device) -> int | None:
    """Bytes free for a job on `device`: torch.cuda.mem_get_info on CUDA, /proc/meminfo MemAvailable for
    the CPU on Linux; None (no check) anywhere else."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    if device.type == "cpu" and sys.platform.startswith("linux"):
        return _meminfo_available()
    return None


def _fused_attention(device: torch.device) -> bool:
    # PyTorch's SDPA has fused kernels (flash on the CPU; flash / memory-efficient on CUDA) that never hold
    # the score matrix; measured on the CPU for the UNet's layout and (since it is made contiguous) the VAE's.
    # Elsewhere (e.g. mps) assume the math path, which holds the scores and their softmax.
    return torch.device(device).type in ("cpu", "cuda")


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes of a job's two phases (they run one after the other; the latents between are small)."""

    denoiser: int  # sampling: the denoiser's activations (and scores where attention is not fused)
    denoiser_what: str  # "the UNet" | "the DiT" | "the MMDiT"
    decode: int  # the VAE decode, untiled (0 for pixel-space models)
    decode_tiled: int  # the VAE decode with decode_tiled's default tiles
    latent: tuple[int, int]  # (h, w) latent pixels


def _element_bytes(module: nn.Module) -> int:
    return next(module.parameters()).element_size()


def estimate(pipe, width: int, height: int, batch_size: int = 1, cfg: float = 7.0) -> MemoryEstimate:
    """Peak activation bytes of sampling and of decoding width×height images, from the shapes alone
    (the weights are loaded already, so the memory available excludes them). Conservative: every
    factor rounds up what the code holds at once. s: bytes per element of the network's dtype;
    B = batch_size, ×2 with CFG (cond and uncond run as one batch); (h, w) = the latent size.

    UNet, level l (downsampling ds = 2^l, C_l = model_channels·channel_mult[l], n_l = ⌈h/ds⌉·⌈w/ds⌉):
      the skip connections [B, C_l, h/ds, w/ds] kept for the decoder half, (num_res_blocks + 1) per
      level, plus the largest working set: a transformer block's [B, n_l, C_l] tokens through norm,
      q/k/v, attention output, GEGLU (8·C_l) and GELU (4·C_l), bounded by 16 such tensors; where
      attention is not fused (`_fused_attention`), its scores and softmax [B, heads_l, n_l, n_l] ×2:
        s·B·( Σ_l (num_res_blocks+1)·C_l·n_l + max_l (16·C_l·n_l + [2·heads_l·n_l²]) ).
    DiT / MMDiT (n = (h/p)·(w/p) image tokens, + 154 context tokens for MMDiT; D = hidden size):
        s·B·( 16·D·n + [2·heads·n²] ).
    VAE decode, one image at a time (s ≥ 4: GroupNorm computes in float32), decoder level i at
    n_i = (h·f/2^i)·(w·f/2^i) pixels with C_i = ch·ch_mult[i] channels (and the upsample from level
    i+1 delivering C_{i+1} channels there), mid attention over n_mid = h·w positions in query chunks
    of ATTN_CHUNK rows:
        s·( 5·max_i max(C_i, C_{i+1})·n_i + [2·n_mid·min(n_mid, ATTN_CHUNK)] ) + 2·4·B·3·H·W
      (the float32 images, and their concatenation). Tiled: the same at a tile of ≤ 64×64 latents
      plus 3·4·B·3·H·W (the blended result, its weights, the images)."""
    from latentforge.models.vae import ATTN_CHUNK

    f = pipe.downscale
    h, w = height // f, width // f
    fused = _fused_attention(pipe.device)
    net, cfg_net = pipe.net, pipe.net.config
    s = _element_bytes(net)
    B = batch_size * (1 if cfg == 1 else 2)
    if "unet" in pipe.components:
        what = "the UNet"
        skips, work = 0, 0
        for lvl, mult in enumerate(cfg_net.channel_mult):
            ds = 2**lvl
            n, C = math.ceil(h / ds) * math.ceil(w / ds), cfg_net.model_channels * mult
            skips += (cfg_net.num_res_blocks + 1) * C * n
            scores = 0
            if ds in cfg_net.attention_resolutions and not fused:
                scores = 2 * cfg_net.heads(C)[0] * n * n
            work = max(work, 16 * C * n + scores)
        den = s * B * (skips + work)
    else:
        what = "the MMDiT" if "mmdit" in pipe.components else "the DiT"
        p = cfg_net.patch_size
        n = math.ceil(h / p) * math.ceil(w / p) + (154 if "mmdit" in pipe.components else 0)
        D, heads = cfg_net.hidden_size, cfg_net.num_heads
        den = s * B * (16 * D * n + (0 if fused else 2 * heads * n * n))
    if pipe.pixel_space:
        return MemoryEstimate(den, what, 0, 0, (h, w))
    vae = pipe.vae
    vc = vae.config
    sv = max(4, _element_bytes(vae))
    images = 4 * batch_size * 3 * height * width

    def decoder(th: int, tw: int) -> int:
        work = 0
        L = len(vc.ch_mult)
        for i in range(L):
            n = (th * 2 ** (L - 1 - i)) * (tw * 2 ** (L - 1 - i))
            C = vc.ch * max(vc.ch_mult[i], vc.ch_mult[min(i + 1, L - 1)])
            work = max(work, 5 * C * n)
        n_mid = th * tw
        return sv * (work + (0 if fused else 2 * n_mid * min(n_mid, ATTN_CHUNK)))

    return MemoryEstimate(
        den, what, decoder(h, w) + 2 * images, decoder(min(h, 64), min(w, 64)) + 3 * images, (h, w)
    )


def check(pipe, width: int, height: int, batch_size: int = 1, cfg: float = 7.0) -> bool:
    """Before any work: raise NotEnoughMemory when sampling, or even a tiled decode, would not fit in
    the memory available (naming the size and the estimate); else whether decoding must be tiled.
    No check (False) where the memory available is unknown."""
    avail = available_memory(pipe.device)
    if avail is None:
        return False
    est = estimate(pipe, width, height, batch_size, cfg)
    h, w = est.latent
    batch = f" (a batch of {batch_size})" if batch_size > 1 else ""
    if est.denoiser > avail:
        raise NotEnoughMemory(
            f"{width}x{height}{batch} needs about {_gb(est.denoiser)} for {est.denoiser_what}'s "
            f"activations at {w}x{h} latents; {_gb(avail)} available; use a smaller size"
        )
    if pipe.pixel_space or est.decode <= avail:
        return False
    if est.decode_tiled > avail:
        raise NotEnoughMemory(
            f"{width}x{height}{batch} needs about {_gb(est.decode_tiled)} to decode even in tiles "
            f"({_gb(est.decode)} untiled); {_gb(avail)} available; use a smaller size"
        )
    return True
