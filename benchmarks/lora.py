"""What a LoRA patched on the fly costs per sampling step on the SD1.5 UNet, against the same UNet merged.

One step = one classifier-free-guidance call of SD1.5's UNet (real config, seeded random weights): batch 2,
latents 4×S×S, context [2, 77, 768], float32, CPU, `torch.inference_mode()`. The LoRA is rank R (32 by
default) on every layer kohya's sd-scripts adapts by default (networks/lora.py: each Linear and 1×1 conv in
the transformer blocks, 128 layers), and with `--locon` also on the ResBlocks' and samplers' 3×3 convs
(LyCORIS LoCon, conv_dim = R). Ways to run it, alternating, N repeats each:

- plain: the UNet without a LoRA (= merged: `lora.merge` rewrites the weights, so a merged step is a plain
  step; merging costs once per change of LoRA, timed separately);
- patched: `lora.patch`: a forward hook adds s·B(A(x)) to each Linear / 1×1 conv; 3×3 convs get W + ΔW
  swapped in for every UNet call;
- applied: `lora.apply`, what a Pipeline call with `<lora:...>` does: patched, except the UNet's layers a
  patch would rebuild at every call (LoCon 3×3 convs, DoRA), which are merged once per generation.

The table gives median ms per step, the overheads patched / plain − 1 and applied / plain − 1 as the
median of per-pair ratios [min, max], and the one-off costs (merge + unmerge of the whole LoRA; apply +
remove, per generation).

    .venv/bin/python benchmarks/lora.py [--sizes 32 64] [--rank 32] [--locon] [--repeat 5]
"""

from __future__ import annotations

import argparse
import contextlib
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
    t0 = time.perf_counter()
    with L.apply(pipe, lora):
        pass
    apply_s = time.perf_counter() - t0
    print(f"merge {merge_s * 1e3:.0f} ms, unmerge {unmerge_s * 1e3:.0f} ms (once per change of LoRA); "
          f"apply + remove {apply_s * 1e3:.0f} ms (once per generation)\n")  # fmt: skip
    print("| latents | plain ms | patched ms | applied ms | patched / plain − 1 | applied / plain − 1 |")
    print("|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(1)
    for s in args.sizes:
        x, t = torch.randn(2, 4, s, s, generator=g), torch.tensor([500.0, 500.0])
        ctx = torch.randn(2, 77, 768, generator=g)
        times = {"plain": [], "patched": [], "applied": []}
        ways = {"plain": contextlib.nullcontext, "patched": lambda: L.patch(pipe, lora),
                "applied": lambda: L.apply(pipe, lora)}  # fmt: skip
        with torch.inference_mode():
            for way in ways.values():  # warm-up
                with way():
                    unet(x, t, ctx)
            for _ in range(args.repeat):
                for name, way in ways.items():
                    with way():
                        t0 = time.perf_counter()
                        unet(x, t, ctx)
                        times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        cells = []
        for name in ("patched", "applied"):
            r = [b / a - 1 for a, b in zip(times["plain"], times[name], strict=True)]
            cells.append(f"{statistics.median(r):+.1%} [{min(r):+.1%}, {max(r):+.1%}]")
        print(f"| {s}×{s} | {med['plain']:.0f} | {med['patched']:.0f} | {med['applied']:.0f} | "
              f"{cells[0]} | {cells[1]} |")  # fmt: skip


if __name__ == "__main__":
    main()
