"""Fine-tune a model's VAE decoder on its own denoiser's outputs (the encoder, and so the latents, unchanged).

A decoder trained only on encoder latents meets, at sampling time, the denoiser's x̂₀: latents near the
encoder's but not on them (a small shape's blob fainter, an edge softer). This script shows the decoder such
latents paired with the scenes they came from, so it learns E[x | ẑ] for the latents it will really decode:

1. `gen`: `--n` training-split scenes (seed `--seed`), each rendered (x), encoded, noised to the start of the
   last ⌈20·s⌉ of 20 steps and sampled back with the model at its default sampler and CFG (img2img with
   strength s, cycling over `--strengths` batch by batch). Written: the sampled latents ẑ (VAE space,
   float16) and each one's scene index and strength (`--pairs` file, safetensors).
2. `train`: the decoder (and post_quant_conv) alone, AdamW with cosine decay and EMA, on random aligned
   windows (`--crop` pixels, crop/f latent cells) of two kinds in every batch: half (ẑ, x) pairs from the
   file, half encoder latents z ~ q(z|x) of fresh scenes, so it stays a decoder of the encoder's latents.
   Loss: mean squared error in [-1, 1]. Written: a VAE file (`train vae` layout, the model's latent format)
   for `scripts/ship_default_model.py --vae`.

    .venv/bin/python scripts/decoder_on_samples.py gen --model default --n 8192 \
        --pairs runs/dos/pairs.safetensors
    .venv/bin/python scripts/decoder_on_samples.py train --model default --pairs runs/dos/pairs.safetensors \
        --init runs/vd/dec1/checkpoints/last.safetensors --steps 3000 --out runs/dos/vae.safetensors
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from latentforge.checkpoint_io import read_state_dict, save_state_dict  # noqa: E402
from latentforge.checkpoints import load_vae_file  # noqa: E402
from latentforge.pipeline import Pipeline, model_file  # noqa: E402
from latentforge.shapes.data import sample, to_tensor  # noqa: E402
from latentforge.training.ema import EMA  # noqa: E402
from latentforge.training.vae_trainer import export_vae, freeze_encoder  # noqa: E402


def scene(seed: int, index: int) -> tuple[torch.Tensor, str]:
    img, caption, _, _ = sample(seed, "train", index, 64)
    return to_tensor(img), caption


def gen(args) -> None:
    pipe = Pipeline.from_single_file(model_file(args.model))
    strengths = [float(s) for s in args.strengths.split(",")]
    latents, strength_of = [], []
    t0 = time.perf_counter()
    first, end = args.first, args.first + args.n
    for b, start in enumerate(range(first, end, args.batch)):
        idx = range(start, min(start + args.batch, end))
        xs, caps = zip(*(scene(args.seed, i) for i in idx), strict=True)
        s = strengths[b % len(strengths)]
        seed = args.seed * 1_000_003 + start
        u = pipe.sample(list(caps), init_image=torch.stack(xs), strength=s, seed=seed, batch_size=len(caps),
                        progress=False)  # fmt: skip
        latents.append(pipe.latent_format.process_out(u).half().cpu())
        strength_of += [s] * len(caps)
        if b % 20 == 0:
            print(f"{start + len(caps) - first}/{args.n} pairs, {time.perf_counter() - t0:.0f} s", flush=True)
    tensors = {
        "latents": torch.cat(latents),
        "index": torch.arange(first, end, dtype=torch.int64),
        "strength": torch.tensor(strength_of),
    }
    save_state_dict(tensors, args.pairs, metadata={"seed": str(args.seed), "model": model_file(args.model)})
    print(f"wrote {args.pairs}: {args.n} pairs in {time.perf_counter() - t0:.0f} s")


def windows(z: torch.Tensor, x: torch.Tensor, crop: int, f: int, g: torch.Generator):
    """The same random window of latents [B, C, h, w] (crop/f cells) and images [B, 3, H, W] (crop pixels)."""
    c = crop // f
    zs, xs = [], []
    for k in range(len(z)):
        top, left = (int(v) for v in torch.randint(0, z.shape[-1] - c + 1, (2,), generator=g))
        zs.append(z[k, :, top : top + c, left : left + c])
        xs.append(x[k, :, f * top : f * (top + c), f * left : f * (left + c)])
    return torch.stack(zs), torch.stack(xs)


def train(args) -> None:
    files = [read_state_dict(path) for path in args.pairs]
    pairs = {k: torch.cat([f[k] for f in files]) for k in ("latents", "index", "strength")}
    keep = pairs["strength"] <= args.max_strength + 1e-6
    if not keep.any():
        raise SystemExit(f"--max-strength {args.max_strength}: no pair has a strength that low")
    pairs = {k: v[keep] for k, v in pairs.items()}
    model = model_file(args.model)
    vae, fmt = load_vae_file(args.init or model)
    if args.init and fmt != load_vae_file(model)[1]:
        raise SystemExit(f"{args.init}: its latent format {fmt} is not the model's")
    vae.requires_grad_(True)
    freeze_encoder(vae)
    vae.train()
    f = 2 ** (len(vae.config.ch_mult) - 1)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = EMA(vae, decay=args.ema)
    g = torch.Generator().manual_seed(args.seed)
    half = args.batch // 2
    n_pairs, fresh = len(pairs["index"]), 10_000_000  # fresh scenes: indices far from the pairs'
    seed = int(args.pair_seed)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / args.warmup)
        lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        pick = torch.randint(0, n_pairs, (half,), generator=g)
        z_pair = pairs["latents"][pick].float()
        x_pair = torch.stack([scene(seed, int(pairs["index"][i]))[0] for i in pick])
        x_enc = torch.stack([scene(seed, fresh + step * half + k)[0] for k in range(half)])
        with torch.no_grad():
            z_enc = vae.encode(x_enc).sample(g)
        z, x = windows(torch.cat([z_pair, z_enc]), torch.cat([x_pair, x_enc]), args.crop, f, g)
        loss = F.mse_loss(vae.decode(z), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(vae, step)
        if step % 50 == 0 or step == args.steps:
            print(
                f"step {step} loss {loss.item():.5f} lr {lr:.2e} {time.perf_counter() - t0:.0f} s", flush=True
            )
    ema.copy_to(vae)
    vae.eval()
    export_vae(args.out, vae, fmt)
    print(f"wrote {args.out}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("gen")
    a.add_argument("--model", default="default")
    a.add_argument("--n", type=int, default=8192)
    a.add_argument(
        "--first", type=int, default=0, help="the first scene's index (another file: other scenes)"
    )
    a.add_argument("--seed", type=int, default=21)
    a.add_argument("--batch", type=int, default=32)
    a.add_argument("--strengths", default="0.2,0.35,0.5,0.65,0.8")
    a.add_argument("--pairs", required=True)
    b = sub.add_parser("train")
    b.add_argument("--model", default="default")
    b.add_argument("--pairs", required=True, nargs="+", help="gen's files (their scenes from one --seed)")
    b.add_argument("--pair-seed", type=int, default=21, help="the scenes' seed given to gen --seed")
    b.add_argument("--init", default=None, help="a VAE file to start from (default: the model's VAE)")
    b.add_argument("--max-strength", type=float, default=1.0, help="train on the pairs up to this strength")
    b.add_argument("--steps", type=int, default=3000)
    b.add_argument("--batch", type=int, default=32)
    b.add_argument("--crop", type=int, default=32)
    b.add_argument("--lr", type=float, default=3e-4)
    b.add_argument("--warmup", type=int, default=20)
    b.add_argument("--ema", type=float, default=0.999)
    b.add_argument("--seed", type=int, default=22)
    b.add_argument("--out", required=True)
    args = p.parse_args()
    torch.manual_seed(0)
    gen(args) if args.cmd == "gen" else train(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
