"""What a LoRA patched on the fly costs per sampling step on the SD1.5 UNet, against the same UNet merged.

One step = one classifier-free-guidance call of SD1.5's UNet (real config, seeded random weights): batch 2,
latents 4×S×S, context [2, 77, 768], float32, CPU, `torch.inference_mode()`. The LoRA is rank R (32 by
default) on every layer kohya's sd-scripts adapts by default (networks/lora.py: each Linear and 1×1 conv in
the transformer blocks, 128 layers), and with `--locon` also on the ResBlocks' and samplers' 3×3 convs
(LyCORIS LoCon, conv_dim = R). Ways to run it, alternating, N repeats each:

- plain: the UNet without a LoRA (= merged: `lora.merge` rewrites the weights, so a merged step is a plain
  step; merging costs once per change of LoRA, timed separately);
- patched: `lora.patch`, what a Pipeline call with `<lora:...>` does: a forward hook adds s·B(A(x)) to
  each Linear / 1×1 conv; 3×3 convs get W + ΔW swapped in for the UNet's call.

The table gives median ms per step, the overhead patched / plain − 1 as the median of per-pair ratios
[min, max], and the one-off merge + unmerge time.

    .venv/bin/python benchmarks/lora.py [--sizes 32 64] [--rank 32] [--locon] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from unet_forward import randomize

from latentforge import lora as L
from latentforge.lora_keys import unet_diffusers_name
from latentforge.models import AutoencoderKLConfig, CLIPTextConfig
from latentforge.pipeline import Pipeline


def kohya_lora(unet, rank: int, locon: bool, seed: int = 0) -> L.LoRA:
    """A random rank-`rank` LoRA in kohya's layout on kohya's default targets (+ 3×3 convs with locon)."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for path, m in unet.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) or path.startswith(("time_embed", "out.")):
            continue
        if path.startswith("input_blocks.0."):
            continue
        in_transformer = ".transformer_blocks." in path or path.endswith(("proj_in", "proj_out"))
        conv3 = isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)
        if not (in_transformer or (locon and conv3)):
            continue
        w = m.weight
        down = torch.randn(rank, *w.shape[1:], generator=g) / w[0].numel() ** 0.5
        up = torch.randn(w.shape[0], rank, *([1, 1] if w.ndim == 4 else []), generator=g) * 0.01
        layers[("unet", unet_diffusers_name(unet, path).replace(".", "_"))] = L.LoRALayer(down, up, rank / 2)
    return L.LoRA("bench", "kohya", layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--locon", action="store_true")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    tiny = {  # the UNet is SD1.5's; the VAE and text encoder are not used here
        "vae": AutoencoderKLConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1),
        "clip_l": CLIPTextConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
        ),
    }
    pipe = Pipeline.from_preset("sd15", tiny)
    unet = randomize(pipe.components["unet"].eval().requires_grad_(False))
    lora = kohya_lora(unet, args.rank, args.locon)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; rank {args.rank}, "
          f"{len(lora.layers)} layers{' (LoCon 3×3 convs included)' if args.locon else ''}")  # fmt: skip
    t0 = time.perf_counter()
    with L.merge(pipe, lora):
        merge_s = time.perf_counter() - t0
    unmerge_s = time.perf_counter() - t0 - merge_s
    print(f"merge {merge_s * 1e3:.0f} ms, unmerge {unmerge_s * 1e3:.0f} ms (once per change of LoRA)\n")
    print("| latents | plain ms | patched ms | patched / plain − 1 |")
    print("|---|---|---|---|")
    g = torch.Generator().manual_seed(1)
    for s in args.sizes:
        x, t = torch.randn(2, 4, s, s, generator=g), torch.tensor([500.0, 500.0])
        ctx = torch.randn(2, 77, 768, generator=g)
        with torch.inference_mode():
            unet(x, t, ctx)  # warm-up
            with L.patch(pipe, lora):
                unet(x, t, ctx)
            plain, patched = [], []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                unet(x, t, ctx)
                plain.append(time.perf_counter() - t0)
                with L.patch(pipe, lora):
                    t0 = time.perf_counter()
                    unet(x, t, ctx)
                    patched.append(time.perf_counter() - t0)
        ratios = [b / a - 1 for a, b in zip(plain, patched, strict=True)]
        print(f"| {s}×{s} | {statistics.median(plain) * 1e3:.0f} | {statistics.median(patched) * 1e3:.0f} | "
              f"{statistics.median(ratios):+.1%} [{min(ratios):+.1%}, {max(ratios):+.1%}] |")  # fmt: skip


if __name__ == "__main__":
    main()
