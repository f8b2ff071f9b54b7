"""SD3-medium MMDiT forward time against diffusers' `SD3Transformer2DModel` with the same weights, same run.

Our `MMDiT(PRESETS["sd3-medium"])` (2.0 B parameters) with seeded random weights (N(0, 1/fan_in), as in
tests/test_models_mmdit.py) is converted by diffusers' own `convert_sd3_transformer_checkpoint_to_diffusers`
and loaded into an `SD3Transformer2DModel` of the released config (assign=True: the two models share every
tensor the converter does not split, so both fit in memory). Inputs: batch 2 (CFG), latents 16×S×S,
context [2, 154, 4096] (77 CLIP + 77 T5 tokens, SD3's reference without long prompts), pooled [2, 2048],
float32, CPU, `torch.inference_mode()`. After a warm-up the two forwards alternate, N repeats each; the
table gives median ms and diffusers / ours as the median of per-pair ratios [min, max] (> 1: we are
faster), with the largest relative difference of the outputs.

    .venv/bin/python benchmarks/mmdit_forward.py [--sizes 32 64] [--repeat 3]
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import statistics
import time

import torch

from latentforge.models.mmdit import PRESETS, MMDiT

PREFIX = "model.diffusion_model."


def to_diffusers(ours: MMDiT):
    """diffusers' SD3Transformer2DModel holding `ours`'s weights, through diffusers' single-file converter
    (built on meta and loaded with assign=True: the tensors are ours, on our device and dtype)."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    cfg = ours.config
    converted = convert_sd3_transformer_checkpoint_to_diffusers(
        {PREFIX + k: v for k, v in ours.state_dict().items()}
    )
    with torch.device("meta"):
        theirs = SD3Transformer2DModel(
            sample_size=128, patch_size=cfg.patch_size, in_channels=cfg.in_channels, num_layers=cfg.depth,
            attention_head_dim=64, num_attention_heads=cfg.num_heads, joint_attention_dim=cfg.context_dim,
            caption_projection_dim=cfg.hidden_size, pooled_projection_dim=cfg.adm_in_channels,
            out_channels=cfg.out_channels, pos_embed_max_size=cfg.pos_embed_max_size,
        )  # fmt: skip
    theirs.load_state_dict(converted, strict=True, assign=True)
    return theirs.eval().requires_grad_(False)


@torch.no_grad()
def build():
    cfg = PRESETS["sd3-medium"]
    with torch.device("meta"):
        ours = MMDiT(cfg)
    ours = ours.to_empty(device="cpu").eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    for k, t in ours.state_dict().items():
        if t.ndim >= 2 and k != "pos_embed":
            t.normal_(0, t[0].numel() ** -0.5, generator=g)
        else:
            t.normal_(0, 0.3 if k == "pos_embed" else 0.02, generator=g)
    theirs = to_diffusers(ours)
    gc.collect()
    return ours, theirs, cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="latent sizes S (S×S)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU")
    t0 = time.perf_counter()
    ours, theirs, cfg = build()
    n = sum(p.numel() for p in ours.parameters())
    print(f"built both ({n / 1e9:.2f} B parameters) in {time.perf_counter() - t0:.0f} s; load average "
          f"{os.getloadavg()[0]:.2f}\n")  # fmt: skip
    print("| latents | ours ms | diffusers ms | diffusers / ours | rel diff |")
    print("|---|---|---|---|---|")
    for s in args.sizes:
        g = torch.Generator().manual_seed(s)
        x = torch.randn(2, cfg.in_channels, s, s, generator=g)
        ctx = torch.randn(2, 154, cfg.context_dim, generator=g)
        y = torch.randn(2, cfg.adm_in_channels, generator=g)
        t = torch.tensor([999.0, 500.0])

        run_ours = functools.partial(ours, x, t, y=y, context=ctx)

        def run_theirs(x=x, t=t, y=y, ctx=ctx):
            return theirs(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t).sample

        with torch.inference_mode():
            a, b = run_ours(), run_theirs()  # warm-up
            diff = ((a - b).abs().max() / b.abs().max()).item()
            t_ours, t_theirs = [], []
            for _ in range(args.repeat):
                for fn, times in ((run_ours, t_ours), (run_theirs, t_theirs)):
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
        r = [tb / ta for ta, tb in zip(t_ours, t_theirs, strict=True)]
        mo, mt = statistics.median(t_ours) * 1e3, statistics.median(t_theirs) * 1e3
        ratio = f"{statistics.median(r):.2f} [{min(r):.2f}, {max(r):.2f}]"
        print(f"| {s}×{s} | {mo:.0f} | {mt:.0f} | {ratio} | {diff:.1e} |", flush=True)
    print(f"\nload average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
