"""How much memory a generation job needs, estimated from the shapes before any work is done.

`estimate(pipe, width, height, batch, cfg, controlnet)` gives the peak activation bytes of sampling and of
decoding, the call's ControlNets included (the formulas, with tensor shapes, are in its docstring; the
ControlNets' in `_controlnets`); `check` compares them with the memory available
(`available_memory`: CUDA's free memory, or MemAvailable of /proc/meminfo on Linux) and refuses a job that
would not fit, naming the size and the estimate, or says that decoding must be tiled.
"""

from __future__ import annotations

import math
import os
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
    # the part of `denoiser` the call's ControlNets add (0 without), and of that the weights of ControlNet
    # files this job loads (not held yet): they stay loaded, so `decode` and `decode_tiled` include them too
    control: int = 0
    control_weights: int = 0


def _element_bytes(module: nn.Module) -> int:
    return next(module.parameters()).element_size()


def _moved_in(pipe, name: str) -> int:
    """With offload (offload.py) a component's weights come to the device for its phase: their bytes, unless
    it is there already; 0 without offload (the weights are loaded, outside the memory available)."""
    off = getattr(pipe, "offload", None)
    if off is None or name in off.resident:
        return 0
    return sum(p.numel() * p.element_size() for p in pipe.components[name].parameters())


def _as_controls(controlnet) -> list:
    """`controlnet=` as Pipeline takes it, checked (control_use.as_controls: the same errors, earlier)."""
    if controlnet is None:
        return []
    from latentforge.control_use import as_controls

    return as_controls(controlnet)


def _control_file(pipe, path, s: int, seen: set[str]) -> tuple[int, int]:
    """(the bytes a ControlNet file's weights take once loaded: control_use.ControlNets loads it in the
    UNet's dtype, `s` bytes an element; its hint channels). 0 bytes when this pipeline holds the file
    already (its ControlNets cache, by the same key: path, size, mtime, dtype, device), when the call
    names it twice (read once), or when it cannot be read (loading refuses it then, before any work)."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except OSError:
        return 0, 3
    nets = getattr(pipe, "controlnets", None)
    cached = nets.cached(path, pipe.net) if nets is not None else None
    if cached is not None:
        return 0, cached.config.hint_channels
    first = path not in seen
    seen.add(path)
    if path.lower().endswith(".safetensors"):
        from safetensors import safe_open

        try:  # the header only: names and shapes
            with safe_open(path, framework="pt", device="cpu") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception:  # safetensors raises its own error type for bad headers and short files
            return 0, 3
        # a full ControlLDM file keeps other models beside `control_model.*`: only those are loaded
        own = [k for k in shapes if k.startswith("control_model.")] or list(shapes)
        ends = ("input_hint_block.0.weight", "controlnet_cond_embedding.conv_in.weight")  # [16, hint, 3, 3]
        hint = next((v[1] for k, v in shapes.items() if k.endswith(ends) and len(v) == 4), 3)
        return (s * sum(math.prod(shapes[k]) for k in own) if first else 0), hint
    # .pth/.ckpt/.bin: torch.load reads the whole file at once, so at least its size; its floats take
    # ≥ 2 bytes an element, so it holds at most size/2 of them, each s bytes once converted
    return (st.st_size * max(1, s // 2) if first else 0), 3


# The hint encoder's first convs run at the hint's full size (HINT_DOWNSCALE² latent pixels an image) with
# HINT_WIDTHS[0] channels: measured on the CPU, a 3×3 conv there holds 3 such tensors at once (its input,
# its output and a temporary of the same size); counted as 4.
HINT_CONV_TENSORS = 4


def _controlnets(pipe, controls, h, w, b, B, skips, work, fused, scratch) -> tuple[int, int]:
    """(peak bytes of sampling with these ControlNets, the UNet's own count included; the bytes of
    ControlNet weights this job loads). b: images, B: rows a denoiser call runs (b, ×2 with CFG); skips,
    work, scratch: the UNet's terms (`estimate`; work includes the scratch), in elements per row.

    A ControlNet is the UNet's encoder (models/controlnet.py: the same input blocks and middle block, at
    the same batch and resolution), so its levels are the UNet's. In a denoiser call every active
    ControlNet runs first, one after another, then the UNet (control_use.Prepared.applied): the nets'
    activations and the UNet's are never alive together; the residuals are, one set summed over the nets:
      R = Σ_l (num_res_blocks+1)·C_l·n_l + C_L·n_L (one [B, C, h_l, w_l] tensor per skip connection, as
          the UNet's skips count them, plus the middle block's at the last level L);
      while a ControlNet runs: the sum of the earlier nets' residuals (R), its own so far (≤ R), its
          working set (work_c: the UNet's `work` over the same levels, and the middle block's 16·C_L·n_L
          + [2·heads_L·n_L²], each with the scratch the feed-forwards of both share) and E(c) repeated to
          B rows (model_channels·n_0);
      while scaling and summing its residuals: 3·R (the sum, its own, the new sum);
      while the UNet runs: the residuals R plus its own skips + work (≤ R + work_c);
        call = s·B·( 2·R + max(work_c + model_channels·n_0, R) ),
    s the largest element size of the UNet and the ControlNets. Held for the whole pass, per ControlNet
    k (s_k its element size; a file loads in the UNet's dtype): its control map, float32 [b, hint_k,
    8h, 8w], and E(c) [b, model_channels, h, w]; once per pass, before the first call, E(·) runs, one
    net at a time: encode_k = s_k·b·(HINT_CONV_TENSORS·16 + hint_k)·64·h·w (the map in s_k, and the
    full-size 16-channel convs). Weights: a ControlNet object is loaded already (the memory available
    excludes it, as the UNet's weights); a file not held yet adds what it will take (`_control_file`):
        Σ_k (weights_k + 4·b·hint_k·64·h·w + s_k·b·model_channels·h·w) + max(max_k encode_k, call)."""
    from latentforge.models.controlnet import HINT_DOWNSCALE, HINT_WIDTHS, ControlNet

    cfg = pipe.net.config
    s_unet = _element_bytes(pipe.net)
    mc, ds = cfg.model_channels, 2 ** (len(cfg.channel_mult) - 1)
    n0, nL, CL = h * w, math.ceil(h / ds) * math.ceil(w / ds), mc * cfg.channel_mult[-1]
    R = skips + CL * nL
    work_c = max(work, 16 * CL * nL + (0 if fused else 2 * cfg.heads(CL)[0] * nL * nL) + scratch)
    pixels = HINT_DOWNSCALE**2 * n0  # the control map's, an image
    s, weights, held, encode, seen = s_unet, 0, 0, 0, set()
    for c in controls:
        if isinstance(c.model, ControlNet):
            s_k, load, hint = _element_bytes(c.model), 0, c.model.config.hint_channels
        else:
            s_k = s_unet
            load, hint = _control_file(pipe, c.model, s_unet, seen)
        s = max(s, s_k)
        weights += load
        held += 4 * b * hint * pixels + s_k * b * mc * n0
        encode = max(encode, s_k * b * (HINT_CONV_TENSORS * HINT_WIDTHS[0] + hint) * pixels)
    call = s * B * (2 * R + max(work_c + mc * n0, R))
    return weights + held + max(encode, call), weights


def estimate(
    pipe, width: int, height: int, batch_size: int = 1, cfg: float = 7.0, controlnet=None
) -> MemoryEstimate:
    """Peak activation bytes of sampling and of decoding width×height images, from the shapes alone
    (the weights are loaded already, so the memory available excludes them; ControlNet files this job
    still has to load are counted: `_controlnets`; with offload, the component each phase moves in:
    `_moved_in`). Conservative: every factor rounds up what the code
    holds at once. s: bytes per element of the network's dtype;
    B = batch_size, ×2 with CFG (cond and uncond run as one batch); (h, w) = the latent size.

    UNet, level l (downsampling ds = 2^l, C_l = model_channels·channel_mult[l], n_l = ⌈h/ds⌉·⌈w/ds⌉):
      the skip connections [B, C_l, h/ds, w/ds] kept for the decoder half, (num_res_blocks + 1) per
      level, plus the largest working set: a transformer block's [B, n_l, C_l] tokens through norm,
      q/k/v, attention output, GEGLU (8·C_l) and GELU (4·C_l), bounded by 16 such tensors; where
      attention is not fused (`_fused_attention`), its scores and softmax [B, heads_l, n_l, n_l] ×2:
        s·B·( Σ_l (num_res_blocks+1)·C_l·n_l + max_l (16·C_l·n_l + [2·heads_l·n_l²]) + [8·C_a·n_a] ),
      the last term on the CPU only: the feed-forwards' scratch memory (models/unet.py FeedForward), the
      GEGLU's two halves at the largest attention level a, held from the first feed-forward to the end of
      the sampling pass.
    With ControlNets (`controlnet`, as Pipeline's: UNet families only) the UNet term is replaced by
    `_controlnets`'s count (the same quantities, plus the residuals, the hint maps and weights to load).
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
    control = cn_weights = 0
    if "unet" in pipe.components:
        what = "the UNet"
        skips, work, scratch = 0, 0, 0
        for lvl, mult in enumerate(cfg_net.channel_mult):
            ds = 2**lvl
            n, C = math.ceil(h / ds) * math.ceil(w / ds), cfg_net.model_channels * mult
            skips += (cfg_net.num_res_blocks + 1) * C * n
            scores = 0
            if ds in cfg_net.attention_resolutions:
                scores = 0 if fused else 2 * cfg_net.heads(C)[0] * n * n
                scratch = max(scratch, 8 * C * n if pipe.device.type == "cpu" else 0)
            work = max(work, 16 * C * n + scores)
        work += scratch  # (held throughout, beside whichever working set is the largest)
        den = s * B * (skips + work)
        controls = _as_controls(controlnet)
        if controls:
            cn, cn_weights = _controlnets(pipe, controls, h, w, batch_size, B, skips, work, fused, scratch)
            count = len(controls)
            what = f"the UNet and its {count} ControlNets" if count > 1 else "the UNet and its ControlNet"
            control = cn - den
            den = cn
    else:
        what = "the MMDiT" if "mmdit" in pipe.components else "the DiT"
        p = cfg_net.patch_size
        n = math.ceil(h / p) * math.ceil(w / p) + (154 if "mmdit" in pipe.components else 0)
        D, heads = cfg_net.hidden_size, cfg_net.num_heads
        den = s * B * (16 * D * n + (0 if fused else 2 * heads * n * n))
    den += _moved_in(pipe, pipe.spec.net)
    if pipe.pixel_space:
        return MemoryEstimate(den, what, 0, 0, (h, w), control, cn_weights)
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

    held = cn_weights + _moved_in(pipe, "vae")  # ControlNet files loaded for this job stay (ControlNets)
    return MemoryEstimate(
        den,
        what,
        decoder(h, w) + 2 * images + held,
        decoder(min(h, 64), min(w, 64)) + 3 * images + held,
        (h, w),
        control,
        cn_weights,
    )


def check(pipe, width: int, height: int, batch_size: int = 1, cfg: float = 7.0, controlnet=None) -> bool:
    """Before any work: raise NotEnoughMemory when sampling, or even a tiled decode, would not fit in
    the memory available (naming the size and the estimate); else whether decoding must be tiled.
    controlnet: the call's ControlNets (`estimate`). No check (False) where the memory available is
    unknown."""
    avail = available_memory(pipe.device)
    if avail is None:
        return False
    est = estimate(pipe, width, height, batch_size, cfg, controlnet)
    h, w = est.latent
    batch = f" (a batch of {batch_size})" if batch_size > 1 else ""
    if est.denoiser > avail:
        weights = ""
        if est.control_weights:
            weights = f", {_gb(est.control_weights)} of it ControlNet weights to load"
        fewer = " or fewer ControlNets" if est.control else ""
        raise NotEnoughMemory(
            f"{width}x{height}{batch} needs about {_gb(est.denoiser)} for {est.denoiser_what}'s "
            f"activations at {w}x{h} latents{weights}; {_gb(avail)} available; use a smaller size{fewer}"
        )
    if pipe.pixel_space or est.decode <= avail:
        return False
    if est.decode_tiled > avail:
        raise NotEnoughMemory(
            f"{width}x{height}{batch} needs about {_gb(est.decode_tiled)} to decode even in tiles "
            f"({_gb(est.decode)} untiled); {_gb(avail)} available; use a smaller size"
        )
    return True
