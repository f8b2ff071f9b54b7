"""ControlNet's cost per sampling step against diffusers' ControlNetModel + UNet2DConditionModel, same run.

One step = one classifier-free-guidance call: batch 2 (conditional and unconditional halves), latents
4×S×S, context [2, 77, D], a control map 3×8S×8S. Three ways to run it, alternating, N repeats each:

- ours: the UNet with `control_use` applied as in a Pipeline call (the ControlNet's residuals, summed into
  the UNet's skips; the hint encoder E(c) computed once per sampling pass, so not in the step);
- ours+E: the same with E(c) recomputed in the step, which is the work diffusers does per step;
- diffusers: `ControlNetModel(x, t, ctx, hint)` then `UNet2DConditionModel(...,
  down_block_additional_residuals=..., mid_block_additional_residual=...)`, holding the same weights
  (converted by diffusers' own single-file converters, as in tests/test_controlnet.py, sharing storage);
- and the plain UNet of ours, for the ControlNet's overhead.

Configs: "tiny" is the shipped default model's UNet (shapes64: 32 channels, 3 levels, 128-wide text) with
random weights; "sd15" is SD1.5's UNet and ControlNet (control_v11p_sd15_*) with random weights. The
table gives medians in ms, the ratio diffusers / ours (> 1: we are faster) as the median of the per-pair
ratios with its [min, max] over the repeats, and the largest relative difference of the outputs.

    .venv/bin/python benchmarks/controlnet.py [--configs tiny sd15] [--size-tiny 16] [--size-sd15 32]
        [--repeat 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import statistics
import sys
import time
import warnings

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [os.path.join(ROOT, "tests"), ROOT]  # the parity tests' diffusers config helpers

from unet_forward import randomize  # noqa: E402  (seeded N(0, 1/fan_in) weights, zero-init layers too)

from latentforge.control_use import Control, prepare_controls  # noqa: E402
from latentforge.models.controlnet import ControlNet, for_unet  # noqa: E402
from latentforge.models.unet import PRESETS, UNet, UNetConfig  # noqa: E402

TINY = UNetConfig(  # the shipped default model's UNet (its file's latentforge.configs)
    model_channels=32, num_res_blocks=1, channel_mult=(1, 2, 4), attention_resolutions=(2, 4),
    num_head_channels=32, context_dim=128, use_linear_in_transformer=True, norm_groups=8,
)  # fmt: skip


@torch.no_grad()
def build(cfg: UNetConfig, seed: int = 0):
    """(our UNet, our ControlNet, diffusers' UNet, diffusers' ControlNetModel) with shared weights."""
    from diffusers import ControlNetModel
    from test_controlnet import controlnet_config

    with torch.device("meta"):
        unet, cn = UNet(cfg), ControlNet(for_unet(cfg))
    unet = randomize(unet.to_empty(device="cpu"), seed).eval().requires_grad_(False)
    cn = randomize(cn.to_empty(device="cpu"), seed + 1).eval().requires_grad_(False)
    d_unet = _diffusers_unet(unet)
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    config = controlnet_config(cn)
    with torch.device("meta"):
        d_cn = ControlNetModel(**config)
    sd = convert_controlnet_checkpoint({"control_model." + k: v for k, v in cn.state_dict().items()}, config)
    d_cn.load_state_dict(sd, strict=True, assign=True)
    return unet, cn, d_unet, d_cn.eval().requires_grad_(False)


def _diffusers_unet(model: UNet):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        create_unet_diffusers_config_from_ldm,
    )

    params = dataclasses.asdict(model.config)
    params = {k: v for k, v in params.items() if not (k in ("num_heads", "num_head_channels") and v == -1)}
    params = {k: v for k, v in params.items() if not (k == "num_classes" and v is None)}
    vae = {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}
    original = {"model": {"params": {"unet_config": {"params": params}, "first_stage_config": vae}}}
    ckpt = {"model.diffusion_model." + k: v for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        config = create_unet_diffusers_config_from_ldm(original, ckpt, image_size=64)
    config["norm_num_groups"] = model.config.norm_groups
    with torch.device("meta"):
        ref = UNet2DConditionModel(**config)
    ref.load_state_dict(convert_ldm_unet_checkpoint(ckpt, config), strict=True, assign=True)
    return ref.eval().requires_grad_(False)


class _Pipe:
    """What `prepare_controls` reads of a Pipeline: a UNet family, its net, its VAE's downscale."""

    class spec:  # noqa: N801
        net = "unet"

    family, downscale = "sd15", 8

    def __init__(self, net):
        self.net = net


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(name: str, cfg: UNetConfig, s: int, repeat: int) -> dict:
    t0 = time.perf_counter()
    unet, cn, d_unet, d_cn = build(cfg)
    gc.collect()
    n_unet, n_cn = (sum(p.numel() for p in m.parameters()) / 1e6 for m in (unet, cn))
    took = time.perf_counter() - t0
    print(f"{name}: UNet {n_unet:.1f} M, ControlNet {n_cn:.1f} M parameters, built in {took:.1f} s")
    g = torch.Generator().manual_seed(s)
    b = 2
    x = torch.randn(b, 4, s, s, generator=g)
    ctx = torch.randn(b, 77, cfg.context_dim, generator=g)
    hint = torch.rand(1, 3, 8 * s, 8 * s, generator=g)
    t = torch.full((b,), 500.0)
    sigmas = torch.tensor([14.6, 0.0])  # one step; its timestep is not used by this timing
    ms = _Sampling()
    prep = prepare_controls(_Pipe(unet), Control(cn, hint), 8 * s, 8 * s, b, False, True)
    hint2 = hint.expand(b, -1, -1, -1)

    plain = type(unet).forward  # the class's forward: no ControlNet applied by `prep`

    def ours_e():  # the hint encoder in the step, as diffusers does it
        return plain(unet, x, t, ctx, control=cn(x, hint2, t, ctx))

    def theirs():
        down, mid = d_cn(x, t, ctx, hint2, return_dict=False)
        return d_unet(
            x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample

    times = {"ours": [], "ours+E": [], "diffusers": [], "plain UNet": []}
    with torch.inference_mode(), prep.applied(unet, ms, sigmas):
        a = unet(x, t, ctx)  # warm-up, and the outputs compared
        c = theirs()
        diff = ((a - c).abs().max() / c.abs().max()).item()
        for _ in range(repeat):  # alternate so that machine load hits every way alike
            times["ours"].append(timed(lambda: unet(x, t, ctx)))
            times["ours+E"].append(timed(ours_e))
            times["diffusers"].append(timed(theirs))
            times["plain UNet"].append(timed(lambda: plain(unet, x, t, ctx)))
    ratios = [d / o for d, o in zip(times["diffusers"], times["ours"], strict=True)]
    ratios_e = [d / o for d, o in zip(times["diffusers"], times["ours+E"], strict=True)]
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    each = "; ".join(f"{k} {[round(v * 1e3, 1) for v in vs]}" for k, vs in times.items())
    print(f"  ms per step, {repeat} repeats: {each}")
    return {"name": name, "size": s, "med": med, "ratio": ratios, "ratio_e": ratios_e, "diff": diff}


class _Sampling:
    """A model sampling whose timestep is the σ's position: enough for `applied`'s step clock here."""

    @staticmethod
    def timestep(sigma):
        return torch.as_tensor(sigma) * 0 + 500.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["tiny", "sd15"], choices=["tiny", "sd15"])
    ap.add_argument("--size-tiny", type=int, default=16, help="latent size S of the tiny config (S×S)")
    ap.add_argument("--size-sd15", type=int, default=32, help="latent size S of the SD1.5 config (S×S)")
    ap.add_argument("--repeat", type=int, default=5, help="timed steps per way and config (>= 5)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU, "
          f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    rows = []
    for name in args.configs:
        cfg, s = (TINY, args.size_tiny) if name == "tiny" else (PRESETS["sd15"], args.size_sd15)
        rows.append(run(name, cfg, s, args.repeat))
        gc.collect()
    head = (
        f"{'config':>7} {'latent':>7} {'ours':>8} {'ours+E':>8} {'diffusers':>10} {'plain':>8} "
        f"{'diff/ours [min, max]':>24} {'diff/ours+E [min, max]':>26} {'CN overhead':>12} {'rel diff':>9}"
    )
    print("\nmedian ms per CFG step (batch 2)")
    print(head)
    print("-" * len(head))
    for r in rows:
        m, q, qe = r["med"], r["ratio"], r["ratio_e"]
        span = f"{statistics.median(q):.2f} [{min(q):.2f}, {max(q):.2f}]"
        span_e = f"{statistics.median(qe):.2f} [{min(qe):.2f}, {max(qe):.2f}]"
        latent = f"{r['size']}x{r['size']}"
        print(f"{r['name']:>7} {latent:>7} {m['ours']:8.1f} {m['ours+E']:8.1f} "
              f"{m['diffusers']:10.1f} {m['plain UNet']:8.1f} {span:>24} {span_e:>26} "
              f"{m['ours'] / m['plain UNet']:11.2f}x {r['diff']:9.1e}")  # fmt: skip
    load = os.getloadavg()[0]
    print(f"ratio > 1: we are faster; CN overhead = ours / plain UNet; load average now {load:.2f} "
          "(above ~2 on 2 cores: the timings are inflated by other work)")  # fmt: skip


if __name__ == "__main__":
    main()
