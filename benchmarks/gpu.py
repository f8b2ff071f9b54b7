"""Denoiser speed on a CUDA GPU against diffusers, same weights, same run: SD1.5, SDXL and SD3-medium sizes.

Each network is built at its published size with seeded random weights (no download), converted with
diffusers' own single-file converters (as benchmarks/unet_forward.py and mmdit_forward.py do on the CPU), and
both run the same inputs in float16 (or `--dtype bfloat16`) under `torch.inference_mode()`:

    model        image   latents            conditioning
    sd15         512²    [2, 4, 64, 64]     context [2, 77, 768]
    sdxl         1024²   [2, 4, 128, 128]   context [2, 77, 2048], y [2, 2816] (diffusers: pooled + time_ids)
    sd3-medium   1024²   [2, 16, 128, 128]  context [2, 154, 4096], pooled [2, 2048]

Batch 2 is one CFG step. After warm-up the sides alternate, `--repeat` forwards each, timed with CUDA
events; the table gives steps per second (forwards/s) and the ratio ours / diffusers (> 1: we are faster)
as the median of per-pair ratios [min, max]. `--compile` adds our denoiser under `torch.compile`
(mode max-autotune-no-cudagraphs) and `--channels-last` our UNets in NHWC, each as its own row.

`--dry-run` builds everything on the `meta` device and runs one forward of each side there: it checks the
script and the conversions on a machine without a GPU (no timing).

    .venv/bin/python benchmarks/gpu.py [--models sd15 sdxl sd3-medium] [--repeat 10] [--compile] [--dry-run]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mmdit_forward import to_diffusers as sd3_to_diffusers  # noqa: E402
from unet_forward import to_diffusers  # noqa: E402

from latentforge.models.mmdit import PRESETS as MMDIT_PRESETS  # noqa: E402
from latentforge.models.mmdit import MMDiT  # noqa: E402
from latentforge.models.unet import PRESETS as UNET_PRESETS  # noqa: E402
from latentforge.models.unet import UNet, sdxl_vector  # noqa: E402

LATENT = {"sd15": 64, "sdxl": 128, "sd3-medium": 128}


def _fill(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Materialise a meta-built model on `device` with seeded N(0, 1/fan_in) weights in `dtype`."""
    model = model.to_empty(device=device).eval().requires_grad_(False)
    if device.type != "meta":
        g = torch.Generator(device=device).manual_seed(0)
        for k, t in model.state_dict().items():
            std = t[0].numel() ** -0.5 if t.ndim >= 2 and k != "pos_embed" else 0.02
            t.normal_(0, std, generator=g)
    return model.to(dtype)


def build(name: str, device: torch.device, dtype: torch.dtype):
    """(ours, theirs, run_ours, run_theirs) for one model size."""
    s = LATENT[name]
    g = torch.Generator().manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    t = torch.tensor([999.0, 999.0], device=device)
    if name in ("sd15", "sdxl"):
        with torch.device("meta"):
            ours = UNet(UNET_PRESETS["sd15" if name == "sd15" else "sdxl-base"])
        ours = _fill(ours, device, dtype)
        theirs = to_diffusers(ours)
        theirs = theirs.to(device, dtype)
        ctx = rand(2, 77, ours.config.context_dim)
        x = rand(2, 4, s, s)
        if name == "sd15":
            return ours, theirs, lambda: ours(x, t, ctx), lambda: theirs(x, t, ctx).sample
        pooled_host = torch.randn(2, 1280, generator=g)
        pooled = pooled_host.to(device, dtype)
        size = (s * 8, s * 8)
        y = sdxl_vector(pooled_host, size, (0, 0), size).to(device, dtype)
        ids = torch.tensor([[*size, 0, 0, *size]] * 2, device=device, dtype=dtype)
        added = {"text_embeds": pooled, "time_ids": ids}
        return (ours, theirs, lambda: ours(x, t, ctx, y=y),
                lambda: theirs(x, t, ctx, added_cond_kwargs=added).sample)  # fmt: skip
    cfg = MMDIT_PRESETS["sd3-medium"]
    with torch.device("meta"):
        ours = MMDiT(cfg)
    ours = _fill(ours, device, dtype)
    theirs = sd3_to_diffusers(ours).to(device, dtype)
    x, ctx, y = rand(2, cfg.in_channels, s, s), rand(2, 154, cfg.context_dim), rand(2, cfg.adm_in_channels)

    def run_theirs():
        return theirs(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t).sample

    return ours, theirs, lambda: ours(x, t, y=y, context=ctx), run_theirs


def seconds(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(LATENT), choices=list(LATENT))
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    ap.add_argument("--compile", action="store_true", help="also time our denoiser under torch.compile")
    ap.add_argument("--channels-last", action="store_true", help="also time our UNets in NHWC")
    ap.add_argument("--dry-run", action="store_true", help="build and run once on the meta device, no GPU")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.dry_run:
        device = torch.device("meta")
    elif not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device here; nothing measured (--dry-run checks the script)")
        return
    else:
        device = torch.device("cuda")
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {args.dtype}")
    print("| model | ours steps/s | diffusers steps/s | ours / diffusers | max rel diff |")
    print("|---|---|---|---|---|")
    for name in args.models:
        ours, theirs, run_ours, run_theirs = build(name, device, dtype)
        with torch.inference_mode():
            a, b = run_ours(), run_theirs()
            if device.type == "meta":
                assert a.shape == b.shape, (name, a.shape, b.shape)
                print(f"| {name} | (meta) | (meta) | shapes {tuple(a.shape)} agree | - |")
                continue
            diff = float((a.float() - b.float()).abs().max() / b.float().abs().max())
            variants = [("", run_ours)]
            if args.channels_last and name != "sd3-medium":
                ours.to(memory_format=torch.channels_last)
                variants.append((" channels-last", run_ours))
            if args.compile:
                ours.compile(mode="max-autotune-no-cudagraphs", dynamic=False)
                for _ in range(3):
                    run_ours()  # compiles
                variants.append((" compiled", run_ours))
            for label, fn in variants:
                for _ in range(3):
                    fn(), run_theirs()
                t_ours, t_theirs = [], []
                for _ in range(args.repeat):
                    t_ours.append(seconds(fn))
                    t_theirs.append(seconds(run_theirs))
                r = [tb / ta for ta, tb in zip(t_ours, t_theirs, strict=True)]
                mo, mt = statistics.median(t_ours), statistics.median(t_theirs)
                print(f"| {name}{label} | {1 / mo:.2f} | {1 / mt:.2f} | {statistics.median(r):.2f} "
                      f"[{min(r):.2f}, {max(r):.2f}] | {diff:.1e} |", flush=True)  # fmt: skip
        del ours, theirs, run_ours, run_theirs
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
