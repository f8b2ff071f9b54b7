"""SD1.5 (or SDXL-base) UNet forward time against diffusers' `UNet2DConditionModel` holding the same
weights, same run.

Our `UNet(PRESETS["sd15"])` (`--preset sdxl-base`: the SDXL base UNet, context [2, 77, 2048] and the
vector y of a pooled embedding + size/crop numbers, diffusers' `text_time` conditioning) with seeded
random weights is converted with diffusers' own single-file converter
(`create_unet_diffusers_config_from_ldm` + `convert_ldm_unet_checkpoint`, as in tests/test_models_unet.py),
so both sides run the same network on the same inputs: batch 2, latents 4×S×S (S = 32, 64), context
[2, 77, 768], float32, CPU, `torch.inference_mode()`. After a warm-up the two
forwards alternate, N repeats each; the table gives the median ms per forward, the ratio diffusers / ours
(> 1: we are faster), achieved GFLOP/s (FLOPs counted once on our model with `FlopCounterMode`) and the
fraction of a measured float32 matmul peak (best of several n×n @ n×n, 2n³ / t).

With `--sampling-pass`, ours' forwards of a size all run inside one `workspace()` (models/winograd.py),
as `Pipeline` runs a sampling pass, so each forward reuses the working memory of the one before (without
it each forward allocates it afresh, as a lone call does). diffusers' forwards are unchanged.

With `--contended`, a competing process (one thread of float32 matmuls) runs on one of the cores for the
whole measurement, as when the machine also serves another job. The ratio column is the median of the
per-pair ratios, with their [min, max].

    .venv/bin/python benchmarks/unet_forward.py [--preset sd15|sdxl-base] [--sizes 32 64 96] [--repeat 5] \\
        [--contended] [--profile] [--sampling-pass]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import os
import statistics
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from latentforge.models.unet import PRESETS, UNet, sdxl_vector
from latentforge.models.winograd import workspace

PREFIX = "model.diffusion_model."


def matmul_peak(n: int = 2048, tries: int = 8) -> float:
    """Best float32 n×n @ n×n throughput in GFLOP/s (2n³ FLOPs per product)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(tries):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def to_diffusers(model: UNet):
    """diffusers' single-file path, as for an original `.ckpt` (the same call as the parity tests)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        create_unet_diffusers_config_from_ldm,
    )

    params = dataclasses.asdict(model.config)
    for k in ("num_heads", "num_head_channels"):
        if params[k] == -1:
            del params[k]
    if params["num_classes"] is None:
        del params["num_classes"]
    original = {
        "model": {
            "params": {
                "unet_config": {"params": params},
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
            }
        }
    }
    ckpt = {PREFIX + k: v for k, v in model.state_dict().items()}
    config = create_unet_diffusers_config_from_ldm(original, ckpt, image_size=64)
    with torch.device("meta"):
        ref = UNet2DConditionModel(**config)
    ref.load_state_dict(convert_ldm_unet_checkpoint(ckpt, config), strict=True, assign=True)
    return ref.float().eval().requires_grad_(False)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Seeded N(0, 1/fan_in) weights everywhere (also in the zero-initialised output layers, so no
    layer is a trivial zero product) and GroupNorm/LayerNorm scales around 1."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        elif isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            m.weight.normal_(0, m.weight[0].numel() ** -0.5, generator=g)
            if m.bias is not None:
                m.bias.normal_(0, 0.02, generator=g)
    return model


def timed(fn, *args, **kwargs) -> float:
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["sd15", "sdxl-base"], default="sd15", help="the UNet (our PRESETS)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="latent sizes S (S×S)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="timed forwards per side and size")
    ap.add_argument("--profile", action="store_true", help="torch.profiler table of one forward per side")
    ap.add_argument("--contended", action="store_true", help="a competing 1-thread process runs throughout")
    ap.add_argument(
        "--sampling-pass", action="store_true", help="ours share one workspace, as in a sampling pass"
    )
    args = ap.parse_args()
    with_rival(run, args, args.contended)


def with_rival(fn, args, contended: bool) -> None:
    """fn(args), with one core busy with float32 matmuls until it returns when `contended`."""
    rival = None
    if contended:
        code = "import torch; torch.set_num_threads(1); a = torch.randn(1024, 1024)\nwhile True: a @ a"
        rival = subprocess.Popen([sys.executable, "-c", code])
    try:
        fn(args)
    finally:
        if rival is not None:
            rival.kill()


def run(args) -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU")

    t0 = time.perf_counter()
    with torch.device("meta"):
        ours = UNet(PRESETS[args.preset])
    ours = randomize(ours.to_empty(device="cpu")).eval().requires_grad_(False)
    theirs = to_diffusers(ours)
    gc.collect()
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"built both UNets ({n_params / 1e6:.1f} M parameters each) in {time.perf_counter() - t0:.1f} s")

    peak = matmul_peak()
    print(f"float32 matmul peak (best of 8, 2048² @ 2048²): {peak:.1f} GFLOP/s; load average "
          f"{os.getloadavg()[0]:.2f}\n")  # fmt: skip

    rows = []
    for s in args.sizes:
        fwd_ours, fwd_theirs = forwards(ours, theirs, args.batch, s)
        with torch.inference_mode(), workspace() if args.sampling_pass else contextlib.nullcontext():
            with FlopCounterMode(display=False) as fc:
                ref_out = fwd_ours()
            flops = fc.get_total_flops()
            their_out = fwd_theirs()  # doubles as warm-up
            diff = (ref_out - their_out).abs().max().item() / ref_out.abs().max().item()
            del ref_out, their_out
            fwd_ours()  # warm-up (the FLOP-counting call ran under a dispatch mode)
            t_ours, t_theirs = [], []
            for _ in range(args.repeat):  # alternate so that machine load hits both alike
                t_ours.append(timed(fwd_ours))
                t_theirs.append(timed(fwd_theirs))
            if args.profile:
                profile(fwd_ours, fwd_theirs, s)
        mo, mt = statistics.median(t_ours), statistics.median(t_theirs)
        pairs = [b / a for a, b in zip(t_ours, t_theirs, strict=True)]
        rows.append((s, flops, mo, mt, min(t_ours), min(t_theirs), diff, pairs))
        print(f"  {s}x{s}: ours {[round(v * 1e3) for v in t_ours]} ms, diffusers "
              f"{[round(v * 1e3) for v in t_theirs]} ms")  # fmt: skip

    peak = max(peak, matmul_peak())  # the peak again, after the forwards (the machine may be shared)
    load = os.getloadavg()[0]
    print(f"\n{args.preset}, batch {args.batch}, context [{args.batch}, 77, {ours.config.context_dim}], "
          f"{args.repeat} forwards each; load average "
          f"now {load:.2f} (above ~2 on 2 cores: timings are inflated by other work)"
          f"{'; contended: a 1-thread rival process ran throughout' if args.contended else ''}"
          f"{'; ours in one workspace per size' if args.sampling_pass else ''}")  # fmt: skip
    head = (
        f"{'latent':>7} {'stat':>6} {'GFLOP':>6} {'ours ms':>8} {'diffusers ms':>13} {'ratio':>6} "
        f"{'ours GF/s':>10} {'diff GF/s':>10} {'ours %peak':>11} {'diff %peak':>11} {'rel diff':>9}"
    )
    print(head)
    print("-" * len(head))
    for s, flops, mo, mt, bo, bt, diff, pairs in rows:
        print(f"{f'{s}x{s}':>7} diffusers / ours per pair: median {statistics.median(pairs):.2f} "
              f"[{min(pairs):.2f}, {max(pairs):.2f}]")  # fmt: skip
        for stat, a, b in (("median", mo, mt), ("best", bo, bt)):
            go, gt = flops / a / 1e9, flops / b / 1e9
            print(
                f"{f'{s}x{s}':>7} {stat:>6} {flops / 1e9:6.1f} {a * 1e3:8.0f} {b * 1e3:13.0f} {b / a:6.2f} "
                f"{go:10.1f} {gt:10.1f} {100 * go / peak:10.0f}% {100 * gt / peak:10.0f}% {diff:9.1e}"
            )
    print(
        f"matmul peak {peak:.1f} GFLOP/s (best before/after); ratio = diffusers / ours (> 1: we are faster); "
        "rel diff = max|ours − diffusers| / max|ours| (same weights, converted by diffusers)"
    )


def forwards(ours, theirs, batch: int, s: int):
    """Seeded inputs for latents s×s and one zero-argument forward per side. SDXL's vector y (pooled
    text embedding + the six size/crop numbers, `sdxl_vector`) is diffusers' `text_time` conditioning."""
    g = torch.Generator().manual_seed(s)
    x = torch.randn(batch, 4, s, s, generator=g)
    ctx = torch.randn(batch, 77, ours.config.context_dim, generator=g)
    t = torch.tensor([999.0, 500.0] * batch)[:batch]
    if ours.config.num_classes != "sequential":
        return lambda: ours(x, t, ctx), lambda: theirs(x, t, encoder_hidden_states=ctx).sample
    pooled = torch.randn(batch, 1280, generator=g)
    px = 8 * s
    y = sdxl_vector(pooled, (px, px), (0, 0), (px, px))
    cond = {
        "text_embeds": pooled,
        "time_ids": torch.tensor([[px, px, 0, 0, px, px]] * batch, dtype=torch.float32),
    }
    return (
        lambda: ours(x, t, ctx, y=y),
        lambda: theirs(x, t, encoder_hidden_states=ctx, added_cond_kwargs=cond).sample,
    )


def profile(fwd_ours, fwd_theirs, s) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    for name, fn in (("ours", fwd_ours), ("diffusers", fwd_theirs)):
        with prof(activities=[ProfilerActivity.CPU]) as p:
            fn()
        print(f"\n--- profile {name}, {s}x{s} ---")
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
