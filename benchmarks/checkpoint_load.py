"""Single-file checkpoint loading: time against a plain read of the file, and peak memory against the weights.

Writes an SD1.5-size checkpoint (UNet + VAE + CLIP-L full presets, seeded random float16 weights, about
2 GB) with `save_checkpoint` into a temporary folder, then measures

  (a) read:  a full read of the file's bytes (read once to warm the page cache, then timed), and
             `safetensors.torch.load_file` for reference;
  (b) load:  `load_checkpoint(path, dtype=torch.float16)`;
  (c) peak RSS of each, each in its own subprocess (`os.wait4` gives that child's `ru_maxrss`, the same
             figure `getrusage(RUSAGE_CHILDREN)` reports for a single child), minus the peak RSS of a child
             that only imported torch + latentforge.

Targets (the issue): load time <= 2x the read time, peak memory < 1.2x the weights' size (for the float32
load as well: the float16 tensors are converted one at a time while reading, so the stored copy is never
held in full next to the float32 one). The float32 load's time is dominated by first touching 4.3 GB of new
memory (about 1 s per GB on a 2-core VM), which a plain read of the file does not pay.

    .venv/bin/python benchmarks/checkpoint_load.py [--repeat 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from latentforge import families
from latentforge.checkpoints import build_component, save_checkpoint

LOAD = (
    "from latentforge.checkpoints import load_checkpoint\n"
    "t0 = time.perf_counter(); m = load_checkpoint(sys.argv[1], dtype=getattr(torch, sys.argv[2]))\n"
    "s = time.perf_counter() - t0; names = sorted(m.components)\n"
    "sd = [v for c in m.components.values() for v in c.state_dict().values()]\n"
)
# safetensors maps the file: a tensor may be backed by pages not read yet, so a load alone can look free.
# TOUCH reads one element per 4 KiB page of every tensor: the page-in a first forward would pay anyway.
TOUCH = (
    "t1 = time.perf_counter()\n"
    "for v in sd: v.reshape(-1)[:: 4096 // v.element_size()].float().sum()\n"
    "s_touch = time.perf_counter() - t1\n"
)
DONE = "print(json.dumps({'s': s, 's_touch': s_touch, 'bytes': sum(v.nbytes for v in sd)}))"
# Child programs: each prints one JSON line; the parent reads its peak RSS.
IMPORTS = "import json, sys, time, torch, latentforge, latentforge.checkpoints, latentforge.models\n"
CHILDREN = {
    "baseline (imports)": (IMPORTS + "print(json.dumps({'s': 0.0, 's_touch': 0.0, 'bytes': 0}))", ""),
    "safetensors load_file": (
        IMPORTS + "from safetensors.torch import load_file\n"
        "t0 = time.perf_counter(); sd = list(load_file(sys.argv[1]).values()); s = time.perf_counter() - t0\n"
        + TOUCH
        + DONE,
        "",
    ),
    "load_checkpoint fp16": (IMPORTS + LOAD + TOUCH + DONE, "float16"),
    "load_checkpoint fp32": (IMPORTS + LOAD + TOUCH + DONE, "float32"),  # converts every tensor
    # The same load a second time in one process: without one-time costs (the first `normal_` on the meta
    # device imports torch's Python decompositions, ~1 s, when CLIP's nn.Embedding initialises itself).
    "load_checkpoint fp16 #2": (IMPORTS + LOAD + "del m, sd\n" + LOAD + TOUCH + DONE, "float16"),
}


# Linux keeps a process's ru_maxrss across fork + exec, so a child started from this (large) process would
# report at least our own RSS. A tiny launcher (no torch) starts each measured child instead.
LAUNCHER = """
import json, resource, subprocess, sys
out = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, text=True, check=True).stdout
rec = json.loads(out.strip().splitlines()[-1])
rec["maxrss"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
print(json.dumps(rec))
"""


def run_child(code: str, path: str, arg: str) -> tuple[dict, float]:
    """(the child's JSON, its peak RSS in bytes)."""
    cmd = [sys.executable, "-c", LAUNCHER, sys.executable, "-c", code, path, arg]
    rec = json.loads(subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout)
    return rec, rec.pop("maxrss")


def read_file(path: str, chunk: int = 64 << 20) -> float:
    """Seconds for a full sequential read into one reused buffer (no allocation per chunk)."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(view):
            pass
    return time.perf_counter() - t0


@torch.no_grad()
def write_checkpoint(path: str) -> int:
    """SD1.5 UNet + VAE + CLIP-L, seeded random float16 weights; returns the weights' bytes."""
    g = torch.Generator().manual_seed(0)
    components = {}
    for name, cfg in families.get("sd15").file_configs().items():
        with torch.device("meta"):
            module = build_component(name, cfg).to(torch.float16)
        module = module.to_empty(device="cpu")
        for p in module.parameters():
            p.normal_(0, 0.02, generator=g)
        for k, b in module.named_buffers():
            if k.endswith("position_ids"):
                b.copy_(torch.arange(b.shape[-1]))
        components[name] = module
    save_checkpoint(path, "sd15", components)
    return sum(t.numel() * t.element_size() for m in components.values() for t in m.state_dict().values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=2, help="runs of each child (best time, max RSS)")
    ap.add_argument("--keep", help="write the checkpoint into this folder and keep it")
    args = ap.parse_args()

    folder = args.keep or tempfile.mkdtemp(prefix="lf-ckpt-")
    path = os.path.join(folder, "sd15-random-fp16.safetensors")
    try:
        t0 = time.perf_counter()
        weights = write_checkpoint(path)
        size = os.path.getsize(path)
        print(f"wrote {path}: {size / 1e9:.3f} GB file, {weights / 1e9:.3f} GB of weights, "
              f"{time.perf_counter() - t0:.1f} s")  # fmt: skip

        read_file(path)  # warm the page cache: the timings below compare against a cached read
        t_read = min(read_file(path) for _ in range(args.repeat))
        print(f"full read of the bytes: {t_read:.2f} s = {size / t_read / 1e9:.2f} GB/s\n")

        rows = {}
        for name, (code, arg) in CHILDREN.items():
            runs = [run_child(code, path, arg) for _ in range(args.repeat)]
            best = min(runs, key=lambda r: r[0]["s"] + r[0]["s_touch"])[0]
            rows[name] = (best, max(r[1] for r in runs))
        base = rows["baseline (imports)"][1]

        head = (
            f"{'step (own process)':<22} {'load s':>7} {'+touch s':>9} {'x read':>7} {'peak RSS GB':>12} "
            f"{'-baseline GB':>13} {'loaded GB':>10} {'x loaded':>9}"
        )
        print(head)
        print("-" * len(head))
        print(f"{'plain read (cached)':<22} {t_read:7.2f} {t_read:9.2f} {1:7.2f}")
        print(f"{'baseline (imports)':<22} {'':>7} {'':>9} {'':>7} {base / 1e9:12.2f}")
        for name, (r, rss) in rows.items():
            if name.startswith("baseline"):
                continue
            total, extra = r["s"] + r["s_touch"], rss - base
            print(
                f"{name:<22} {r['s']:7.2f} {total:9.2f} {total / t_read:7.2f} {rss / 1e9:12.2f} "
                f"{extra / 1e9:13.2f} {r['bytes'] / 1e9:10.3f} {extra / r['bytes']:9.2f}"
            )
        print(
            f"\nrepeat {args.repeat}: best time, highest RSS. load s = the call alone (safetensors maps the "
            "file, so weights may not be read yet); +touch s = the call plus reading one element per 4 KiB "
            "page of every tensor, i.e. until all weights are in memory. x read = (+touch s) / plain read."
        )
        r, rss = rows["load_checkpoint fp16"]
        total, ratio = r["s"] + r["s_touch"], (rss - base) / r["bytes"]
        print(
            f"target load time <= 2x read (fp16, +touch): {total / t_read:.2f}x -> "
            f"{'met' if total <= 2 * t_read else 'MISSED'}; without touching: {r['s'] / t_read:.2f}x"
        )
        print(
            f"target peak memory < 1.2x weights (fp16): {ratio:.2f}x -> {'met' if ratio < 1.2 else 'MISSED'}"
        )
        r, rss = rows["load_checkpoint fp32"]  # float16 file converted tensor by tensor while reading
        ratio = (rss - base) / r["bytes"]
        print(
            f"target peak memory < 1.2x weights (fp16 file loaded in fp32): {ratio:.2f}x -> "
            f"{'met' if ratio < 1.2 else 'MISSED'}; time {(r['s'] + r['s_touch']) / t_read:.2f}x read"
        )
    finally:
        if not args.keep:
            if os.path.exists(path):
                os.remove(path)
            os.rmdir(folder)


if __name__ == "__main__":
    main()
