"""Does a model take its background from the prompt, or from the mean of the noise it starts from?

At the first σ of SD's 1000-step table (σ_max = 14.61) the noise on a channel's mean over h×w values has
standard deviation σ_max/√(hw): 0.23 over 64×64 pixels, 0.91 over a 16×16 latent. Where that is small
against the spread of the data's channel means, x_T still carries the image's mean colour while training,
and a network learns to read it there; at sampling x_T = σ·ε holds no image, and the network reads its
random mean instead of the prompt (Lin et al. 2024, §3.1, for the same leak at SD's resolution; Hoogeboom et
al. 2023, §3.1, and Chen 2023 for why it grows with the resolution).

The probe: for each prompt (each states its background) and seed, one noise draw ε with its per-channel
means removed, then those means set to `offset` standard deviations of a natural draw's (offset/√(hw)) for
each `--offsets` value; sampled from x_T = σ_max·ε with the evaluation's settings (20 euler steps, the normal
schedule, CFG 3, the prompt as written), decoded, and the background read as the median colour of the
image's outer 3-pixel ring (RGB in [-1, 1]). Reported per prompt: the stated colour, the background at each
offset, and the slope d(background)/d(offset) averaged over the channels and seeds. A model that follows
the text has slope ≈ 0 and the stated colour; a model that reads the noise has the slope of the posterior
mean of the image mean given its noisy copy (up to 0.23 per std in pixel space) and ignores the colour.
`terminal_background.py` reads the model's first x₀ prediction alone at fixed noises; this one samples
whole images with the noise's mean moved, so it sees the leak at every σ the sampler visits.

    .venv/bin/python benchmarks/noise_mean_probe.py MODEL [MODEL ...] [--seeds 2] [--offsets -2 0 2] \\
        [--json out/noise_mean.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentforge.files import write_json  # noqa: E402
from latentforge.pipeline import Pipeline  # noqa: E402
from latentforge.shapes.render import COLORS  # noqa: E402

PROMPTS = {
    "black": "a big red circle in the upper left corner on a black background",
    "white": "a small blue square at the center on a white background",
    "yellow": "a big green triangle in the lower right corner on a yellow background",
    "purple": "a small white heart at the center on a purple background",
}
STEPS, CFG, RING = 20, 3.0, 3


def ring_median(img: torch.Tensor) -> torch.Tensor:
    """[3, H, W] -> [3]: the median of the outer RING-pixel frame, per channel."""
    mask = torch.ones(img.shape[-2:], dtype=torch.bool)
    mask[RING:-RING, RING:-RING] = False
    return img[:, mask].median(dim=1).values


@torch.no_grad()
def sample_from(pipe: Pipeline, prompt: str, noise: torch.Tensor) -> torch.Tensor:
    """Euler (Karras et al. 2022, Alg. 1, no churn) from x_T = σ_max·noise [N, C, h, w], CFG on the prompt
    (encoded once for the batch); images [N, 3, H, W] in [-1, 1]."""
    h, w = pipe.default_size
    n = noise.shape[0]
    cond = pipe.encode_prompt([prompt] * n, w, h)
    uncond = pipe.encode_prompt([""] * n, w, h, negative=True)
    denoiser = pipe.denoiser()
    sigmas = pipe.schedule("euler", "normal", STEPS)
    x = noise * sigmas[0]
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        sig = s.reshape(1)
        d_u = denoiser(x, sig, **uncond)
        d = d_u + CFG * (denoiser(x, sig, **cond) - d_u)
        x = x + (x - d) / s * (s_next - s)
    img = pipe.decode(x) if pipe.vae is not None else x
    return img.float().clamp(-1, 1)


def probe(path: str, seeds: int, offsets: list[float]) -> dict:
    pipe = Pipeline.default() if path == "default" else Pipeline.from_single_file(path)
    h, w = pipe.default_size
    f = pipe.downscale if pipe.vae is not None else 1
    shape = (1, pipe.latent_channels if pipe.vae is not None else 3, h // f, w // f)
    hw = shape[2] * shape[3]
    sigma_max = float(pipe.schedule("euler", "normal", STEPS)[0])
    out = {"model": path, "sigma_max": sigma_max, "values_per_channel": hw,
           "mean_noise_std": sigma_max / hw**0.5, "prompts": {}}  # fmt: skip
    for name, prompt in PROMPTS.items():
        stated = torch.tensor(COLORS[name], dtype=torch.float32) / 127.5 - 1
        noise = []  # seed-major: [seeds · offsets, C, h, w]
        for seed in range(seeds):
            eps = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
            eps = eps - eps.mean(dim=(2, 3), keepdim=True)
            noise += [eps + off / hw**0.5 for off in offsets]
        images = sample_from(pipe, prompt, torch.cat(noise))
        b = torch.stack([ring_median(im) for im in images]).reshape(seeds, len(offsets), 3)
        o = torch.tensor(offsets)
        oc = o - o.mean()
        slope = ((b - b.mean(dim=1, keepdim=True)) * oc.reshape(1, -1, 1)).sum(1) / (oc**2).sum()
        err = (b - stated).abs().amax(dim=2)  # worst channel's distance from the stated colour
        out["prompts"][name] = {
            "prompt": prompt,
            "stated_rgb": stated.tolist(),
            "background_rgb": {f"{off:g}": b[:, k].mean(0).tolist() for k, off in enumerate(offsets)},
            "slope_per_std": float(slope.mean()),
            "max_channel_error": float(err.max()),
        }
        print(f"{path}: {name:6s} slope {float(slope.mean()):+.3f} per std of the noise mean; "
              f"worst channel off the stated colour by {float(err.max()):.2f}; background at offsets "
              + ", ".join(f"{off:+g}: {[round(v, 2) for v in b[:, k].mean(0).tolist()]}"
                          for k, off in enumerate(offsets)), flush=True)  # fmt: skip
    slopes = [p["slope_per_std"] for p in out["prompts"].values()]
    out["mean_slope_per_std"] = sum(slopes) / len(slopes)
    print(
        f"{path}: mean slope {out['mean_slope_per_std']:+.3f} per std (σ_max {sigma_max:.2f}, "
        f"the noise mean's std {out['mean_noise_std']:.3f} over {hw} values per channel)"
    )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="model files (or 'default')")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--offsets", type=float, nargs="+", default=[-2.0, 0.0, 2.0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.seeds < 1 or len(set(args.offsets)) < 2:
        p.error(
            f"--seeds must be >= 1 and --offsets needs two distinct values; got {args.seeds} {args.offsets}"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    res = [probe(m, args.seeds, args.offsets) for m in args.models]
    if args.json:
        write_json(
            args.json, {"steps": STEPS, "cfg": CFG, "ring": RING, "offsets": args.offsets, "runs": res}
        )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
