"""SD VAE tiled decode and encode of a large image against diffusers' tiling: time and peak memory.

The SD VAE (f = 8, 128-256-512-512 channels) with seeded random weights, shared with diffusers through its
own converter (vae_forward.to_diffusers), float32, CPU, `torch.inference_mode()`, one S×S image (default
1024²). Both sides tile as they do by default for SD1.5's VAE:
- ours: `decode_tiled` (64-latent-pixel tiles, ≥ 16 of overlap, shrunk to the smallest tile that keeps it;
  GroupNorm statistics from one pass over a downscaled copy) and `encode_tiled` (512-pixel tiles, ≥ 64 px
  of overlap), what `Pipeline.decode(tiled=True)` runs;
- diffusers: `enable_tiling()` with the SD1.5 VAE's `sample_size` 512 (512-px / 64-latent tiles, a quarter
  of overlap, each tile with its own GroupNorm statistics).
So the two do about the same work: at 1024², decode 9 tiles of 54² latents plus the 54² statistics pass
(29,160 latent pixels) against 9 tiles cut from a stride-48 grid (64, 64 and 32 wide: 25,600); encode 9 tiles
of 384² plus one 384² pass (1.47 Mpx) against 512, 512 and 256 wide tiles (1.64 Mpx).

Time: after a warm-up the two alternate, N repeats; median seconds and the median of the per-repeat ratios
diffusers / ours [min, max]. Memory: each (side, job) once more in its own subprocess; its peak RSS
(VmHWM, reset once the model and the input are built and the other side's model dropped) minus the RSS at
that point: what the tiled job adds at its peak.

    .venv/bin/python benchmarks/vae_tiled.py [--size 1024] [--repeat 3] [--no-memory | --no-timing]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unet_forward import randomize  # noqa: E402
from vae_forward import to_diffusers  # noqa: E402

from latentforge.models.vae import AutoencoderKL, AutoencoderKLConfig  # noqa: E402

SD15_SAMPLE_SIZE = 512  # diffusers' config of the SD1.5 VAE: its tile size in pixels


def build(size: int):
    """(ours, diffusers', image x [1, 3, S, S], latent z [1, 4, S/8, S/8]), tiling on on both sides."""
    torch.manual_seed(0)
    ours = randomize(AutoencoderKL(AutoencoderKLConfig())).eval().requires_grad_(False)
    theirs = to_diffusers(ours, sample_size=SD15_SAMPLE_SIZE)
    theirs.enable_tiling()
    g = torch.Generator().manual_seed(size)
    x = torch.rand(1, 3, size, size, generator=g) * 2 - 1
    z = torch.randn(1, 4, size // 8, size // 8, generator=g)
    return ours, theirs, x, z


def jobs(ours, theirs, x, z) -> dict:
    return {
        "decode": {"ours": lambda: ours.decode_tiled(z), "diffusers": lambda: theirs.decode(z).sample},
        "encode": {
            "ours": lambda: ours.encode_tiled(x).mean,
            "diffusers": lambda: theirs.encode(x).latent_dist.mean,
        },
    }


def status(key: str) -> int:  # /proc/self/status's VmRSS (resident now) or VmHWM (peak since reset), bytes
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


@torch.inference_mode()
def child(size: int, job: str, side: str) -> None:
    ours, theirs, x, z = build(size)
    fn = jobs(ours if side == "ours" else None, theirs if side == "diffusers" else None, x, z)[job][side]
    del ours, theirs  # only the side measured stays alive (in fn)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the resident set (Linux >= 4.0)
        f.write("5")
    before = status("VmRSS")
    fn()
    print(json.dumps({"added": status("VmHWM") - before}))


def memory(size: int) -> None:
    print(f"\npeak memory added by the tiled job ({size}², one run each, own process):")
    for job in ("decode", "encode"):
        got = {}
        for side in ("ours", "diffusers"):
            cmd = [sys.executable, __file__, "--child", job, side, "--size", str(size)]
            out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
            got[side] = json.loads(out.strip().splitlines()[-1])["added"] / 2**30
        print(f"  {job}: ours {got['ours']:.2f} GiB, diffusers {got['diffusers']:.2f} GiB")


@torch.inference_mode()
def timing(size: int, repeat: int) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU, {size}², tiled")
    for job, fns in jobs(*build(size)).items():
        outs = {k: f() for k, f in fns.items()}  # warm-up, and the outputs compared
        scale = outs["diffusers"].abs().max()
        diff = float((outs["ours"] - outs["diffusers"]).abs().max() / scale)
        t = {k: [] for k in fns}
        for _ in range(repeat):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                t[k].append(time.perf_counter() - t0)
        r = [b / a for a, b in zip(t["ours"], t["diffusers"], strict=True)]
        med = {k: statistics.median(v) for k, v in t.items()}
        print(f"\n{job} {size}² tiled: median s ours {med['ours']:.2f}, diffusers {med['diffusers']:.2f}")
        print(f"  diffusers / ours: {statistics.median(r):.3f} [{min(r):.3f}, {max(r):.3f}]")
        print(f"  max |ours − diffusers| / max |diffusers|: {diff:.1e} (tilings differ)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024, help="image size S (S×S pixels), a multiple of 8")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-memory", action="store_true", help="time only")
    ap.add_argument("--no-timing", action="store_true", help="memory only")
    ap.add_argument("--child", nargs=2, metavar=("JOB", "SIDE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.size < 8 or args.size % 8:
        raise SystemExit(f"--size must be a positive multiple of 8, got {args.size}")
    if args.child:
        return child(args.size, *args.child)
    if not args.no_timing:
        timing(args.size, args.repeat)
    if not args.no_memory:
        memory(args.size)


if __name__ == "__main__":
    main()
