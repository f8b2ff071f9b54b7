"""SD VAE decode and encode time against diffusers' `AutoencoderKL` holding the same weights, same run.

Our `AutoencoderKL` with SD's config (f = 8, 128-256-512-512 channels, 4 latent channels) and seeded random
weights (unet_forward.randomize) is converted with diffusers' own single-file converter
(`convert_ldm_vae_checkpoint`, as in tests/test_models_vae.py), so both sides run the same network on the
same inputs: one image of S×S pixels (decode: a 4×S/8×S/8 latent), float32, CPU, `torch.inference_mode()`,
untiled. Each side also runs in channels-last memory format (weights and input converted once; what
`Pipeline(channels_last=True)` / `--channels-last` does for ours, `.to(memory_format=torch.channels_last)` for
diffusers). After a warm-up the variants alternate, N repeats each; the table gives the median seconds and
the median of the per-repeat ratios diffusers / ours (> 1: we are faster) with their [min, max], each side
against the other in the same memory format and ours-channels-last against diffusers' default.

    .venv/bin/python benchmarks/vae_forward.py [--sizes 512] [--repeat 5] [--contended]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unet_forward import randomize, with_rival  # noqa: E402

from latentforge.models.vae import AutoencoderKL, AutoencoderKLConfig  # noqa: E402


def to_diffusers(model: AutoencoderKL, sample_size: int | None = None):
    """diffusers' AutoencoderKL holding `model`'s weights (its own converter); sample_size: its config's
    (the tile size of its tiling; default `model.config.resolution`)."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg = model.config
    n = len(cfg.ch_mult)
    dcfg = dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_ch, down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=[cfg.ch * m for m in cfg.ch_mult],
        layers_per_block=cfg.num_res_blocks, latent_channels=cfg.z_channels, norm_num_groups=cfg.norm_groups,
        sample_size=sample_size or cfg.resolution,
    )  # fmt: skip
    theirs = DiffusersAutoencoderKL(**dcfg).eval().requires_grad_(False)
    ckpt = {"first_stage_model." + k: v for k, v in model.state_dict().items()}
    theirs.load_state_dict(convert_ldm_vae_checkpoint(ckpt, dcfg), strict=True)
    return theirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512], help="image sizes S (S×S pixels)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--contended", action="store_true", help="a competing 1-thread process runs throughout")
    args = ap.parse_args()
    with_rival(run, args, args.contended)


@torch.inference_mode()
def run(args) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU")
    ours = randomize(AutoencoderKL(AutoencoderKLConfig())).eval().requires_grad_(False)
    theirs = to_diffusers(ours)
    cl = torch.channels_last
    ours_cl = randomize(AutoencoderKL(AutoencoderKLConfig())).eval().requires_grad_(False)
    ours_cl.load_state_dict(ours.state_dict())
    ours_cl, theirs_cl = ours_cl.to(memory_format=cl), to_diffusers(ours).to(memory_format=cl)
    for size in args.sizes:
        g = torch.Generator().manual_seed(size)
        x = torch.rand(1, 3, size, size, generator=g) * 2 - 1
        z = torch.randn(1, 4, size // 8, size // 8, generator=g)
        jobs = {
            "decode": {
                "ours": lambda z=z: ours.decode(z),
                "diffusers": lambda z=z: theirs.decode(z).sample,
                "ours_cl": lambda z=z: ours_cl.decode(z.contiguous(memory_format=cl)),
                "diffusers_cl": lambda z=z: theirs_cl.decode(z.contiguous(memory_format=cl)).sample,
            },
            "encode": {
                "ours": lambda x=x: ours.encode(x).mean,
                "diffusers": lambda x=x: theirs.encode(x).latent_dist.mean,
                "ours_cl": lambda x=x: ours_cl.encode(x.contiguous(memory_format=cl)).mean,
                "diffusers_cl": lambda x=x: theirs_cl.encode(x.contiguous(memory_format=cl)).latent_dist.mean,
            },
        }
        for job, fns in jobs.items():
            outs = {k: f() for k, f in fns.items()}  # warm-up, and the outputs compared
            scale = outs["diffusers"].abs().max()
            diff = {k: float((v - outs["diffusers"]).abs().max() / scale) for k, v in outs.items()}
            t = {k: [] for k in fns}
            for _ in range(args.repeat):
                for k, f in fns.items():
                    t0 = time.perf_counter()
                    f()
                    t[k].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in t.items()}
            print(f"\n{job} {size}²: median s " + ", ".join(f"{k} {v:.3f}" for k, v in med.items()))
            print(
                "  max |x − diffusers| / max |diffusers|: "
                + ", ".join(f"{k} {v:.1e}" for k, v in diff.items())
            )
            for a, b in (("diffusers", "ours"), ("diffusers_cl", "ours_cl"), ("diffusers", "ours_cl")):
                r = [tb / ta for ta, tb in zip(t[b], t[a], strict=True)]
                print(f"  {a} / {b}: {statistics.median(r):.3f} [{min(r):.3f}, {max(r):.3f}]")


if __name__ == "__main__":
    main()
