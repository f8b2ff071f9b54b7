"""How close torch's CPU attention already runs to the machine's float32 matmul peak at SD1.5's shapes.

Issue 15 asks the SD1.5 UNet forward to be ≥ 1.25× diffusers' at every size. Both sides call the same
`F.scaled_dot_product_attention` for the self-attention, so its time is a floor shared by both: the larger
its share of a forward, the less the rest can move the ratio. This prints, for the self-attention of each
UNet level at latents S×S (batch 2 for CFG; SD1.5: 8 heads, head width 40 / 80 / 160 at 320 / 640 / 1280
channels over S² / (S/2)² / (S/4)² tokens), the SDPA time, its FLOPs (4·B·heads·L²·d: QKᵀ and PV), the
achieved GFLOP/s against the measured matmul peak (unet_forward.matmul_peak), and the seconds the
self-attentions of one forward take (SD1.5 has 2 + 3 transformer blocks at the first level, 2 + 3 at the
second, 2 + 3 at the third). Two alternatives are timed for the first level: the head padded to a multiple
of 16 floats (zeros in q, k, v; the same result) and an explicit chunked softmax(QKᵀ)V.

    .venv/bin/python benchmarks/attention_peak.py [--sizes 32 64 96] [--repeat 3]

Measured 2026-12-05 on the 2-core Intel Xeon (AVX-512), idle: benchmarks/README.md, "SD1.5 UNet forward".
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from unet_forward import matmul_peak  # noqa: E402

LEVELS = ((1, 40), (2, 80), (4, 160))  # (downsampling, head width) of SD1.5's three attention levels
BLOCKS_PER_LEVEL = 5  # 2 input + 3 output transformer blocks at each level (1 middle block at the 4th)
HEADS, BATCH = 8, 2


def best(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def chunked(q, k, v, rows: int = 512):
    out, kt = torch.empty_like(q), k.transpose(-1, -2) * q.shape[-1] ** -0.5
    for i in range(0, q.shape[2], rows):
        torch.matmul(torch.softmax(q[:, :, i : i + rows] @ kt, -1), v, out=out[:, :, i : i + rows])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 96])
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    peak = matmul_peak()
    print(f"float32 matmul peak {peak:.1f} GFLOP/s, {torch.get_num_threads()} threads")
    g = torch.Generator().manual_seed(0)
    for s in args.sizes:
        total = 0.0
        for down, d in LEVELS:
            tokens = (s // down) ** 2
            q, k, v = (torch.randn(BATCH, HEADS, tokens, d, generator=g) for _ in range(3))
            t = best(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v), args.repeat)
            flops = 4 * BATCH * HEADS * tokens**2 * d
            total += BLOCKS_PER_LEVEL * t
            print(
                f"{s}x{s} level 1/{down}: [{BATCH}, {HEADS}, {tokens}, {d}] SDPA {t * 1e3:8.1f} ms, "
                f"{flops / t / 1e9:6.1f} GFLOP/s ({100 * flops / t / 1e9 / peak:.0f}% of the matmul peak)"
            )
            if down == 1:
                ref = F.scaled_dot_product_attention(q, k, v)
                for width in (48, 64):
                    qp, kp, vp = (F.pad(x, (0, width - d)) for x in (q, k, v))

                    def padded(qp=qp, kp=kp, vp=vp, d=d):
                        return F.scaled_dot_product_attention(qp, kp, vp, scale=d**-0.5)[..., :d]

                    tp = best(padded, args.repeat)
                    err = (padded() - ref).abs().max()
                    print(f"    head padded to {width}: {tp * 1e3:8.1f} ms (max difference {err:.1e})")
                tc = best(lambda q=q, k=k, v=v: chunked(q, k, v), args.repeat)
                print(f"    explicit chunked softmax: {tc * 1e3:8.1f} ms")
        print(f"{s}x{s}: the self-attentions of one forward take about {total:.2f} s")


if __name__ == "__main__":
    main()
