"""Where a shapes model loses what it was asked for: its denoising error per noise level, and whether it keeps
a small shape it is given (issue 10: the 2-hour recipe's missing 1-object points are small shapes).

Two measurements on model files written by `scripts/ship_default_model.py` (or "default"):

- `--sigma-loss`: on N validation scenes (renders encoded to the posterior mean, one random caption each,
  one fixed noise draw), the denoiser's mean squared error at a grid of noise levels σ, in ε units
  ‖(x − D(x; σ))/σ − ε‖² (what ε-prediction training minimises, Ho et al. 2020, Eq. 14) and in latent units
  ‖D(x; σ) − x₀‖² (Karras et al. 2022, Eq. 2); σ is the VE noise level, given to a flow model at
  σ/(1 + σ) with x/(1 + σ) (Esser et al. 2024, §3.1). A model trained with t ~ U{0..999} sees each σ below as
  often as the table's density says; where the ε error is large but flat across training, the draws
  there are spent on noise no network can predict.
- `--keep SHAPE SIZE`: N one-object validation scenes of that shape and size, each rendered, then (a) the
  VAE's round trip (encode to the mean, decode) and (b) img2img from the render at each `--strengths` value
  (A1111's strength: the last round(strength·steps) of the model's 20 default steps, from the σ printed),
  and (c) text to image from the scene's caption alone; each image read by the analytic judge, and the
  share of them read as exactly one object of SHAPE. (a) bounds (b): a strength where (b) falls below (a)
  is a noise level where the denoiser redraws the shape as something else.

- `--round-trip`: the VAE's own ceiling: N validation scenes (`shapes.data.sample(0, "validation", i)`)
  encoded to the posterior mean and decoded, each read by the analytic judge against its whole scene
  (every attribute stated), with the PSNR of the decode against the render. No denoiser runs: a generated
  image can be no better than this, whatever the denoiser does. With the CNN judge shipped, also its
  all-correct rate and how often the two judges disagree on the round trips and on the renders themselves:
  the disagreement a generator on this VAE cannot go below.

    .venv/bin/python benchmarks/denoiser_probe.py MODEL [MODEL ...] --sigma-loss [--n 512]
    .venv/bin/python benchmarks/denoiser_probe.py MODEL --keep star small [--n 150] \\
        [--strengths 0.05 0.1 0.3 0.6 0.9] [--json out/probe.json]
    .venv/bin/python benchmarks/denoiser_probe.py MODEL [MODEL ...] --round-trip [--n 900]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentforge.files import write_json  # noqa: E402
from latentforge.model_sampling import DiscreteFlow  # noqa: E402
from latentforge.pipeline import Pipeline  # noqa: E402
from latentforge.shapes.captions import caption  # noqa: E402
from latentforge.shapes.data import sample  # noqa: E402
from latentforge.shapes.detection import analyze  # noqa: E402
from latentforge.shapes.evaluate import evaluate  # noqa: E402
from latentforge.shapes.render import SHAPES, SIZES, render, sample_scene  # noqa: E402

SIGMAS = (0.05, 0.1, 0.2, 0.35, 0.6, 1.0, 1.7, 3.0, 5.0, 9.0, 14.6)
BATCH = 128


def as_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 [H, W, 3] renders -> [B, 3, H, W] float32 in [-1, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.no_grad()
def sigma_loss(pipe: Pipeline, n: int, seed: int = 5) -> dict:
    """{"sigma": [...], "eps_mse": [...], "x0_mse": [...]} over n validation scenes, fixed noise."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, split="validation") for _ in range(n)]
    prompts = [caption(s, rng) for s in scenes]
    z = pipe.encode(as_tensor([render(s, 64) for s in scenes]))  # [n, C, h, w] denoiser latents
    cond = pipe.encode_prompt(prompts, 64, 64)
    denoise = pipe.denoiser()
    flow = isinstance(pipe.model_sampling, DiscreteFlow)
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed))
    out = {"sigma": list(SIGMAS), "eps_mse": [], "x0_mse": []}
    for s in SIGMAS:
        e = x = 0.0
        for b in range(0, n, BATCH):
            z0, noise = z[b : b + BATCH], eps[b : b + BATCH]
            xs = z0 + s * noise  # x = x₀ + σε
            c = {k: v[b : b + BATCH] for k, v in cond.items()}
            if flow:  # the same point in flow's form: x/(1 + σ) = (1 − σ')x₀ + σ'ε, σ' = σ/(1 + σ)
                d = denoise(xs / (1 + s), torch.full((len(xs),), s / (1 + s)), **c)
            else:
                d = denoise(xs, torch.full((len(xs),), s), **c)
            e += (((xs - d) / s - noise) ** 2).mean(dim=(1, 2, 3)).sum().item()
            x += ((d - z0) ** 2).mean(dim=(1, 2, 3)).sum().item()
        out["eps_mse"].append(e / n)
        out["x0_mse"].append(x / n)
    return out


def _is(image, shape: str) -> bool:
    objs = analyze(np.asarray(image)).scene.objects
    return len(objs) == 1 and objs[0].shape == shape


@torch.no_grad()
def keep(pipe: Pipeline, shape: str, size: str, n: int, strengths: list[float], seed: int = 7) -> dict:
    """Shares of images read as one SHAPE: renders, the VAE round trip, img2img per strength, txt2img."""
    rng = np.random.default_rng(seed)
    scenes = []
    while len(scenes) < n:
        s = sample_scene(rng, n_objects=1, split="validation")
        if (s.objects[0].shape, s.objects[0].size) == (shape, size):
            scenes.append(s)
    prompts = [caption(s, rng) for s in scenes]
    renders = [render(s, 64) for s in scenes]
    out = {"shape": shape, "size": size, "n": n, "render": float(np.mean([_is(r, shape) for r in renders]))}
    x = as_tensor(renders)
    y = torch.cat([pipe.decode(pipe.encode(x[b : b + BATCH])) for b in range(0, n, BATCH)])
    trips = ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out["vae_round_trip"] = float(np.mean([_is(t, shape) for t in trips]))
    steps = pipe.defaults["steps"]
    sig = pipe.schedule(pipe.defaults["sampler"], pipe.defaults["scheduler"], steps)
    out["img2img"] = []
    for strength in [*strengths, None]:
        ok = 0
        for b in range(0, n, 25):
            kw = {"prompt": prompts[b : b + 25], "batch_size": len(prompts[b : b + 25]), "progress": False}
            kw["seed"] = list(range(b, b + kw["batch_size"]))
            if strength is not None:
                kw.update(init_image=[Image.fromarray(r) for r in renders[b : b + 25]], strength=strength)
            ok += sum(_is(im, shape) for im in pipe(**kw))
        if strength is None:
            out["txt2img"] = ok / n
        else:
            kept = round(strength * steps)
            out["img2img"].append(
                {"strength": strength, "from_sigma": float(sig[steps - kept]), "kept": ok / n}
            )
    return out


@torch.no_grad()
def round_trip(pipe: Pipeline, n: int) -> dict:
    """The analytic judge on n validation scenes' VAE round trips (posterior mean), and their PSNR."""
    drawn = [sample(0, "validation", i) for i in range(n)]  # (image, caption, scene, spec)
    renders, scenes = [d[0] for d in drawn], [d[2] for d in drawn]
    x = as_tensor(renders)
    y = torch.cat([pipe.decode(pipe.encode(x[b : b + BATCH])) for b in range(0, n, BATCH)]).clamp(-1, 1)
    trips = ((y + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    mse = ((trips.astype(np.float64) - np.stack(renders)) ** 2).mean(axis=(1, 2, 3))
    r = evaluate(list(trips), scenes, reference=False)
    second = r.get("second_judge")
    # the same scenes' renders: how often the two judges disagree with no VAE in between (their own error)
    plain = evaluate(renders, scenes, reference=False).get("second_judge")
    return {
        "n": n,
        "all_correct": r["all_correct"],
        "all_correct_ci95": r["all_correct_ci95"],
        "by_objects": {k: r["by_objects"][k]["rate"] for k in sorted(r["by_objects"], key=int)},
        "attributes": {k: v["rate"] for k, v in r["attributes"].items()},
        "psnr_db": float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10)))),
        # the CNN judge on the same round trips: how much of the judges' disagreement on a model's images
        # the VAE alone already causes (None when the CNN judge is not shipped)
        "cnn_all_correct": second["all_correct"]["rate"] if second else None,
        "judges_disagree": 1 - second["agreement"]["rate"] if second else None,
        "disagree": second["disagree"] if second else None,
        "renders_judges_disagree": 1 - plain["agreement"]["rate"] if plain else None,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="model files (or 'default')")
    p.add_argument("--sigma-loss", action="store_true")
    p.add_argument("--keep", nargs=2, metavar=("SHAPE", "SIZE"))
    p.add_argument("--round-trip", action="store_true")
    p.add_argument(
        "--n",
        type=int,
        default=None,
        help="scenes (default 512 for --sigma-loss, 150 for --keep, 900 for --round-trip)",
    )
    p.add_argument("--strengths", type=float, nargs="+", default=[0.05, 0.1, 0.3, 0.6, 0.9])
    p.add_argument("--json")
    a = p.parse_args()
    if not a.sigma_loss and not a.keep and not a.round_trip:
        p.error("give --sigma-loss, --keep SHAPE SIZE or --round-trip")
    if a.keep and (a.keep[0] not in SHAPES or a.keep[1] not in SIZES):
        p.error(f"--keep takes a shape ({', '.join(SHAPES)}) and a size ({', '.join(SIZES)}), got {a.keep}")
    if a.n is not None and a.n < 1:
        p.error(f"--n must be a positive whole number, got {a.n}")
    if any(not 0 < s <= 1 for s in a.strengths):
        p.error(f"--strengths must lie in (0, 1], got {a.strengths}")
    report = {}
    for m in a.models:
        pipe = Pipeline.from_single_file(m)
        r = report[m] = {}
        if a.sigma_loss:
            r["sigma_loss"] = sl = sigma_loss(pipe, a.n or 512)
            print(f"{m}\n  sigma  " + " ".join(f"{s:7g}" for s in sl["sigma"]))
            print("  eps    " + " ".join(f"{v:7.4f}" for v in sl["eps_mse"]))
            print("  x0     " + " ".join(f"{v:7.4f}" for v in sl["x0_mse"]), flush=True)
        if a.keep:
            r["keep"] = k = keep(pipe, *a.keep, a.n or 150, a.strengths)
            what = f"{k['n']} {k['size']} {k['shape']}s read as one {k['shape']}"
            print(
                f"{m}: {what}: render {k['render']:.1%}, "
                f"VAE round trip {k['vae_round_trip']:.1%}, text to image {k['txt2img']:.1%}"
            )
            for row in k["img2img"]:
                print(
                    f"  img2img strength {row['strength']:.2f} (from σ {row['from_sigma']:.3f}): "
                    f"{row['kept']:.1%}",
                    flush=True,
                )
        if a.round_trip:
            r["round_trip"] = t = round_trip(pipe, a.n or 900)
            objs = " / ".join(f"{100 * v:.1f}" for v in t["by_objects"].values())
            print(
                f"{m}: VAE round trip of {t['n']} validation scenes: all correct {t['all_correct']:.1%} "
                f"({objs}% by objects), shape {t['attributes']['shape']:.1%}, {t['psnr_db']:.2f} dB",
                flush=True,
            )
            if t["judges_disagree"] is not None:
                print(
                    f"  CNN judge {t['cnn_all_correct']:.1%} all correct; the judges disagree on "
                    f"{t['judges_disagree']:.1%} (only analytic {t['disagree']['analytic_only']}, "
                    f"only CNN {t['disagree']['cnn_only']}; on the renders themselves "
                    f"{t['renders_judges_disagree']:.1%})",
                    flush=True,
                )
    if a.json:
        write_json(a.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
