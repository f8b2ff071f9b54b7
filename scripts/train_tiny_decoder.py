"""Train a TAESD-architecture tiny decoder for a model's VAE (the default model's: f = 4), by distillation.

TAESD (Ollin Boer Bohan, github.com/madebyollin/taesd) is a small convolutional decoder trained to
reproduce a VAE's decoder; here it learns the shipped VAE's own decode, so it previews (and can replace) the
full decoder. The architecture is models/taesd.py's, with `--upsamples` ×2 stages (2 for f = 4) and
`--width` channels, written in TAESD's file layout (index = key) beside the model as
`<model>.taesd_decoder.safetensors`, where `--preview-method taesd` finds it.

Data: `--n` training scenes of the shapes benchmark (rendered, seed `--seed`), their VAE posterior means z
(the shipped VAE's posterior is narrow: σ ≈ 0.05), in the denoiser's space as TAESD takes them, and as
targets the full VAE decode of the same z, mapped to [0, 1], computed once. Loss: mean squared error;
AdamW, cosine learning rate with warm-up. At the end: PSNR against the full decoder on `--n-eval`
validation scenes (their posterior means), and decode time per image against the full decoder (batch 1
and 16, 1 and all threads).

    .venv/bin/python scripts/train_tiny_decoder.py [--model default] [--steps 1500] [--width 32]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from latentforge.checkpoint_io import save_state_dict  # noqa: E402
from latentforge.models import taesd  # noqa: E402
from latentforge.pipeline import Pipeline, model_file  # noqa: E402
from latentforge.previews import shapes_images, tiny_decoder_path  # noqa: E402


def decoder_path(model: str) -> str:
    return tiny_decoder_path(model_file(model))


@torch.no_grad()
def encode(pipe, images: torch.Tensor, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior (mean, std) [N, C, h, w] of images in [-1, 1], in the VAE's own space."""
    means, stds = [], []
    for k in range(0, len(images), batch):
        post = pipe.vae.encode(images[k : k + batch])
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def full_decode(pipe, z_vae: torch.Tensor) -> torch.Tensor:
    """The full VAE decoder's RGB in [0, 1] for VAE-space latents."""
    return ((pipe.vae.decode(z_vae) + 1) / 2).clamp(0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = F.mse_loss(a.clamp(0, 1), b).item()
    return 10 * math.log10(1 / mse)


def timing(fn, z: torch.Tensor, repeat: int = 7) -> float:
    """Median seconds per image."""
    with torch.inference_mode():
        fn(z)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn(z)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) / len(z)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--out", default=None, help="default: beside the model file")
    p.add_argument("--n", type=int, default=4096, help="training scenes")
    p.add_argument("--n-eval", type=int, default=256, help="validation scenes for the PSNR")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--upsamples", type=int, default=None, help="default: log2 of the VAE's downscale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the measurements here")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    pipe = Pipeline.from_single_file(args.model)
    fmt, f = pipe.latent_format, pipe.downscale
    ups = args.upsamples if args.upsamples is not None else int(math.log2(f))
    net = taesd.decoder(pipe.latent_channels, ups, args.width)
    if taesd.upscale(net) != f:
        raise SystemExit(f"--upsamples {ups} gives f={taesd.upscale(net)}, the VAE has f={f}")
    n_params = sum(q.numel() for q in net.parameters())
    print(f"tiny decoder: {ups} stages, width {args.width}, {n_params:,} parameters; VAE f={f}")

    t0 = time.time()
    images = shapes_images(args.n, seed=args.seed, split="train")
    mean, _ = encode(pipe, images)
    targets = torch.cat([full_decode(pipe, mean[k : k + 64]) for k in range(0, args.n, 64)])
    inputs = fmt.process_in(mean)
    print(f"encoded and decoded {args.n} training scenes in {time.time() - t0:.0f} s")
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0)
    warm = min(100, args.steps // 10)

    def lr_factor(s: int) -> float:  # linear warm-up, then cosine to 5%
        return (s + 1) / warm if s < warm else 0.05 + 0.475 * (1 + math.cos(math.pi * s / args.steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    g = torch.Generator().manual_seed(args.seed + 1)
    net.train()
    t0 = time.time()
    for step in range(args.steps):
        idx = torch.randint(0, args.n, (args.batch,), generator=g)
        loss = F.mse_loss(net(inputs[idx]), targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.5f} ({time.time() - t0:.0f} s)", flush=True)
    net.eval().requires_grad_(False)

    val = shapes_images(args.n_eval, seed=args.seed, split="validation")
    vmean, _ = encode(pipe, val)
    with torch.inference_mode():
        ref = full_decode(pipe, vmean)
        tiny = (taesd.decode(net, fmt.process_in(vmean)) + 1) / 2
    truth = (val + 1) / 2
    report = {
        "parameters": n_params,
        "width": args.width,
        "upsamples": ups,
        "steps": args.steps,
        "seed": args.seed,
        "psnr_vs_full_decoder_db": round(psnr(tiny, ref), 2),
        "psnr_vs_scene_db": {"tiny": round(psnr(tiny, truth), 2), "full": round(psnr(ref, truth), 2)},
        "train_seconds": round(time.time() - t0),
    }
    threads = torch.get_num_threads()
    for b in (1, 16):
        z = vmean[:b]
        for nt in sorted({1, threads}):
            torch.set_num_threads(nt)
            full_s = timing(lambda z: pipe.vae.decode(z), z)
            tiny_s = timing(lambda z: net(fmt.process_in(z)), z)
            report[f"ms_per_image_batch{b}_threads{nt}"] = {
                "full": round(full_s * 1e3, 3),
                "tiny": round(tiny_s * 1e3, 3),
                "speedup": round(full_s / tiny_s, 2),
            }
        torch.set_num_threads(threads)
    out = args.out or decoder_path(args.model)
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    meta = {"latentforge.tiny_decoder": json.dumps(report)}
    save_state_dict(sd, out, metadata=meta)
    print(json.dumps(report, indent=1))
    print(f"wrote {out}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
