"""Peak memory and time of decoding with the full SD VAE, tiled and untiled.

The SD1/SD2/SDXL VAE (`AutoencoderKL(PRESETS["sd"])`, seeded random weights, float32, CPU,
`torch.inference_mode()`) decodes a random latent [1, 4, h, w] to a [1, 3, 8h, 8w] image: via `decode_tiled`
with its default tile/overlap at each of --sizes (default 1024×1024; e.g. --sizes 768,1024,1536 shows that
the peak does not grow with the area), and untiled at 512×512 (and 1024×1024 unless --no-full). The tiled
decode includes the GroupNorm-statistics pass on a downscaled copy (`global_norm=True`); --local-norm adds
rows with each tile's own statistics.
Each case runs in its own subprocess; its peak RSS (`getrusage(RUSAGE_CHILDREN).ru_maxrss`, read by a tiny
launcher so that no RSS of this process is inherited) minus the peak RSS of a child that only imported
torch + latentforge is the decode's memory, weights included; the table also gives it minus a child that
built the VAE as well (activations only). Target (the issue): tiled 1024×1024 < 3 GB.

    .venv/bin/python benchmarks/vae_tiled_memory.py [--no-full] [--sizes 768,1024] [--local-norm]
"""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys

from latentforge.models.vae import AutoencoderKL, _tile_grid

LAUNCHER = """
import json, resource, subprocess, sys
out = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, text=True, check=True).stdout
rec = json.loads(out.strip().splitlines()[-1])
rec["maxrss"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
print(json.dumps(rec))
"""

# argv: mode (imports | model | full | tiled | tiled-local), latent size h (= w)
CHILD = """
import json, sys, time, torch, latentforge, latentforge.models
mode, h = sys.argv[1], int(sys.argv[2])
rec = {"s": 0.0}
if mode != "imports":
    from latentforge.models.vae import PRESETS, AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(PRESETS["sd"]).eval().requires_grad_(False)
    rec["weights"] = sum(p.nbytes for p in vae.parameters())
    z = torch.randn(1, vae.latent_channels, h, h, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        if mode != "model":
            t0 = time.perf_counter()
            if mode.startswith("tiled"):
                img = vae.decode_tiled(z, global_norm=mode == "tiled")
            else:
                img = vae.decode(z)
            rec["s"] = time.perf_counter() - t0
            rec["shape"] = list(img.shape)
            rec["finite"] = bool(img.isfinite().all())
print(json.dumps(rec))
"""


def run(mode: str, h: int) -> dict:
    cmd = [sys.executable, "-c", LAUNCHER, sys.executable, "-c", CHILD, mode, str(h)]
    return json.loads(subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-full", action="store_true", help="skip the untiled 1024×1024 decode")
    ap.add_argument("--sizes", default="1024", help="image sizes (multiples of 8) for the tiled decodes")
    ap.add_argument("--local-norm", action="store_true", help="also tile with each tile's own GroupNorm")
    args = ap.parse_args()
    defaults = inspect.signature(AutoencoderKL.decode_tiled).parameters
    tile, overlap = defaults["tile"].default, defaults["overlap"].default
    sizes = [int(v) // 8 for v in args.sizes.split(",")]

    base = run("imports", 0)["maxrss"]
    model = run("model", 64)
    tiled = [
        (mode, h) for h in sizes for mode in (["tiled", "tiled-local"] if args.local_norm else ["tiled"])
    ]
    cases = tiled + [("full", 64)] + ([] if args.no_full else [("full", 128)])
    rows = []
    for mode, h in cases:
        r = run(mode, h)
        rows.append((mode, h, r))
        print(f"  {mode} {8 * h}x{8 * h}: {r['s']:.1f} s, peak RSS {r['maxrss'] / 1e9:.2f} GB", flush=True)

    print(
        f"\nSD VAE float32, CPU; weights {model['weights'] / 1e9:.3f} GB; peak RSS of a child that imported "
        f"torch + latentforge {base / 1e9:.2f} GB, that also built the VAE {model['maxrss'] / 1e9:.2f} GB"
    )
    head = (
        f"{'decode':<34} {'image':>10} {'tiles':>10} {'time s':>7} {'peak RSS GB':>12} {'-imports GB':>12} "
    )
    head += f"{'-model GB':>10}"
    print(head)
    print("-" * len(head))
    for mode, h, r in rows:
        label = "untiled"
        grid = ""
        if mode.startswith("tiled"):
            label = f"tiled {tile}/{overlap}, " + ("global norm" if mode == "tiled" else "per-tile norm")
            size, starts = _tile_grid(h, tile, overlap)
            grid = f"{len(starts)}x{len(starts)} of {size}"
        rss = r["maxrss"]
        print(
            f"{label:<34} {f'{8 * h}x{8 * h}':>10} {grid:>10} {r['s']:7.1f} {rss / 1e9:12.2f} "
            f"{(rss - base) / 1e9:12.2f} {(rss - model['maxrss']) / 1e9:10.2f}"
        )
    for mode, h, r in rows:
        if mode.startswith("tiled") and h == 128:
            peak = r["maxrss"] - base
            print(f"target tiled 1024x1024 < 3 GB (peak minus imports, weights included, {mode}): "
                  f"{peak / 1e9:.2f} GB -> {'met' if peak < 3e9 else 'MISSED'}")  # fmt: skip


if __name__ == "__main__":
    main()
