"""TAESD's decoder (Ollin Boer Bohan, github.com/madebyollin/taesd, MIT), in its published file layout.

A distilled stand-in for the SD VAE decoder, about 1.2M parameters, used for fast, good-looking previews.
Written here from the architecture described in madebyollin/taesd `taesd.py` (`Decoder`, `Block`, `Clamp`);
the module is an `nn.Sequential`, so a layer's index is its key in the released
`taesd_decoder` / `taesdxl_decoder` (4 latent channels) and `taesd3_decoder` / `taef1_decoder` (16) files:

    index  layer                                     keys (shapes for C latent channels)
    0      Clamp: 3·tanh(z / 3)                      -
    1      conv 3×3 C → 64, ReLU (2)                 1.weight [64, C, 3, 3], 1.bias [64]
    3-5    Block ×3                                  b.conv.{0,2,4}.weight [64, 64, 3, 3], .bias [64]
    6      nearest upsample ×2, 7: conv (no bias)    7.weight [64, 64, 3, 3]
    8-10   Block ×3, 11 upsample, 12 conv (no bias)
    13-15  Block ×3, 16 upsample, 17 conv (no bias)
    18     Block
    19     conv 3×3 64 → 3                           19.weight [3, 64, 3, 3], 19.bias [3]

A Block is relu(conv(relu(conv(relu(conv(x))))) + x) (the 1×1 skip is the identity: 64 → 64 throughout).
That is 67 tensors and 1,222,531 parameters for C = 4, the count in the taesd README's table.

Input and output scale (taesd README "Note that TAESD uses different scaling conventions", and its
examples/Previewing_During_Image_Generation.ipynb, which calls the decoder on
`latents.mul(pipe.vae.config.scaling_factor)`): TAESD takes the *scaled* latent, the one the denoiser
works in (SD1: VAE latent × 0.18215), "no extra scale_factor is needed"; it returns RGB in [0, 1]. ComfyUI's
previewer likewise feeds the sampler's x̂₀ straight in (`latent_preview.py` TAESDPreviewerImpl). So
`decode` here takes denoiser-space latents [B, C, h, w] and returns [B, 3, 8h, 8w] in [-1, 1].
"""

from __future__ import annotations

import os

import torch
from torch import nn

UPSCALE = 8  # three ×2 upsamples: one latent pixel is 8×8 image pixels, as in the SD VAEs

# The same architecture for other VAEs (the default model's: f = 4), written here: `decoder(c, upsamples=2,
# width=32)` keeps the layout (index = key) with one stage of five modules fewer and narrower convolutions:
# 0 Clamp, 1 conv C → w, 2 ReLU, 3-7 stage, 8-12 stage, 13 Block, 14 conv w → 3. `load_decoder` reads the
# stage count and the width from the file's keys.


def _conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of the latent to (-3, 3): 3·tanh(z / 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """relu(conv3(relu(conv2(relu(conv1(x))))) + skip(x)), keys `conv.{0,2,4}.*` (`skip` has none)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(
            _conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out)
        )
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, n_in, H, W] -> [B, n_out, H, W]
        return self.fuse(self.conv(x) + self.skip(x))


def decoder(latent_channels: int = 4, upsamples: int = 3, width: int = 64) -> nn.Sequential:
    """The TAESD decoder: latents [B, C, h, w] (denoiser space) -> RGB [B, 3, 2^u·h, 2^u·w] in about [0, 1]
    (u = upsamples; the published files: u = 3, width 64)."""
    c = width

    def stage() -> list[nn.Module]:  # three blocks, then ×2 nearest and a bias-free conv
        return [Block(c, c), Block(c, c), Block(c, c), nn.Upsample(scale_factor=2), _conv(c, c, bias=False)]

    stages = [m for _ in range(upsamples) for m in stage()]
    return nn.Sequential(Clamp(), _conv(latent_channels, c), nn.ReLU(), *stages, Block(c, c), _conv(c, 3))


def upscale(net: nn.Sequential) -> int:
    """The decoder's pixels per latent pixel along a side (8 for the published files)."""
    return 2 ** sum(isinstance(m, nn.Upsample) for m in net)


def load_decoder(path: str, latent_channels: int | None = None) -> nn.Sequential:
    """A TAESD decoder file (.safetensors only: nothing is unpickled) loaded with a strict key check.

    latent_channels: what the caller needs (4 for SD1/SD2/SDXL, 16 for SD3); None: read from `1.weight`."""
    from safetensors.torch import load_file

    if not str(path).lower().endswith(".safetensors"):
        raise ValueError(
            f"TAESD file {path!r}: only .safetensors files are loaded (a .pth file is a pickle); convert one "
            "with safetensors.torch.save_file(torch.load(PTH, weights_only=True), 'NAME.safetensors')"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"TAESD file {path!r} does not exist")
    try:
        sd = load_file(path)
    except Exception as e:  # safetensors raises its own error type for bad headers and short files
        raise ValueError(f"TAESD file {path!r} is not a readable safetensors file: {e}") from e
    first = sd.get("1.weight")
    found = int(first.shape[1]) if first is not None and first.ndim == 4 else None
    if latent_channels is not None and found is not None and found != latent_channels:
        raise ValueError(
            f"TAESD file {path!r} decodes {found}-channel latents, this model's have {latent_channels} "
            "(taesd/taesdxl: 4, taesd3/taef1: 16)"
        )
    last = max((int(k.split(".")[0]) for k in sd if k.split(".")[0].isdigit()), default=19)
    stages = max((last - 4) // 5, 0)  # 4 + 5·stages is the index of the output conv
    width = int(first.shape[0]) if first is not None and first.ndim == 4 else 64
    net = decoder(latent_channels or found or 4, stages, width)
    want = net.state_dict()
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {tuple(v.shape)})" for k, v in want.items()
             if k in sd and sd[k].shape != v.shape]  # fmt: skip
    if missing or unexpected or wrong:
        parts = [f"{name}: {', '.join(keys[:8])}{' …' if len(keys) > 8 else ''}"
                 for name, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("wrong shapes", wrong)) if keys]  # fmt: skip
        raise ValueError(
            f"{path!r} is not a TAESD decoder in the published layout (taesd_decoder.safetensors: keys "
            f"1.weight … {4 + 5 * stages}.bias); {'; '.join(parts)}"
        )
    net.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return net.eval().requires_grad_(False)


def decode(net: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Denoiser-space latents [B, C, h, w] -> RGB [B, 3, f·h, f·w]: TAESD's [0, 1] mapped to [-1, 1]."""
    p = next(net.parameters())
    return net(latents.to(p.device, p.dtype)).float() * 2 - 1
