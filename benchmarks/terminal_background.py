"""Does a shapes model's first prediction follow the background the prompt states?

A sampler's first model call is at its largest σ (1 for flow, 14.61 on SD's DDPM table), where x = σ·ε
carries (almost) no information about the image, so the x₀ the model predicts there can only come from the
text. This script asks for "a big red circle on a C background" (blue circle when C is red) for every
palette colour C, with `--n` noises each, takes the model's x₀ prediction at each `--sigma` (one call, no
sampling; default: the model's own largest σ, the first of the evaluation's 20-step euler schedule) from
x = ε (flow, whose sampler starts at σ = 1) or x = σ·ε (a DDPM table in its VE form, x = x₀ + σ·ε, the
image part left out), decodes it (a pixel model's as it is), names the median colour of the top and bottom
4-pixel rows with the evaluator's palette rule (`shapes.color.nearest_palette`) and reports the share that
equals C, at each `--cfg` (x₀ = u + w·(c − u)); chance is 1/11. The same noises serve every prompt, so it
also reports how often one noise gives one colour whatever the prompt says.

Why it exists (MODEL_CARD.md, "Why adherence came slowly"): a model can learn to read a flat background
from the channel means of x, which stay informative up to t ≈ 0.97 on a 16×16 latent, and extrapolate that
to σ = 1; it then draws a confident background that the noise suggests, whatever the text says, and its
sampled images' background rate stays below chance. This call-level reading costs seconds, where the
evaluator's takes minutes.

Also run on the latent-vs-pixel benchmark's pixel models (benchmarks/README.md, "Why the pixel model stays
at chance"), whose σ_max is 14.61 (58.46 shifted; 4518.76 for the zero-terminal-SNR table's 20-step normal
schedule).

    python benchmarks/terminal_background.py MODEL [MODEL ...] [--sigma 1 0.9] [--cfg 1 3] [--n 8]
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from latentforge.model_sampling import DiscreteFlow
from latentforge.pipeline import Pipeline
from latentforge.shapes.color import nearest_palette
from latentforge.shapes.render import COLOR_NAMES


@torch.no_grad()
def background_reading(pipe: Pipeline, sigmas, cfgs, n: int, seed: int = 0) -> dict:
    """{σ: {w: {"text": share of x₀ predictions whose background is the stated colour, "noise": share of
    (noise, pair of stated colours) whose predictions name the same colour, "colours": distinct colours
    predicted, "change": mean |image(C) − image(C')| over pairs of stated colours and noises, RGB in [0, 1],
    the border rows only}}} over the 11 palette colours × the same n noises. A model that reads the text
    scores text ≈ 1 and noise ≈ 0; one that reads the noise scores text ≈ 1/11 and noise ≈ 1 with several
    colours; one that ignores both draws one colour (noise 1, colours 1). "change" tells a text path that is
    there but too weak to move the colour (> 0) from none at all (0); two palette colours differ by 0.43 on
    average."""
    den = pipe.denoiser()
    w, h = pipe.default_size
    f, c = pipe.downscale, pipe.latent_channels
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(n, c, h // f, w // f, generator=g).to(pipe.device)  # the same noises for every prompt
    flow = isinstance(pipe.model_sampling, DiscreteFlow)
    uncond = pipe.encode_prompt([""] * n, w, h)
    k = len(COLOR_NAMES)
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]  # two stated colours, one noise
    out = {}
    for sigma in sigmas:
        s = torch.full((n,), float(sigma), device=pipe.device)
        x = eps if flow else eps * float(sigma)
        du = den(x, s, **uncond)
        named = {scale: [] for scale in cfgs}  # per scale: [colour][noise] -> predicted name
        border = {scale: [] for scale in cfgs}  # per scale: [colour] -> rows [n, 3, 8·W]
        for color in COLOR_NAMES:
            obj = "blue" if color == "red" else "red"
            dc = den(x, s, **pipe.encode_prompt([f"a big {obj} circle on a {color} background"] * n, w, h))
            for scale in cfgs:
                img = (pipe.decode(du + scale * (dc - du)).float() + 1).div(2).clamp(0, 1)  # [n, 3, H, W]
                rows = torch.cat([img[:, :, :4], img[:, :, -4:]], dim=2).flatten(2)  # [n, 3, 8·W]
                rgb = rows.median(dim=2).values.cpu().numpy() * 255
                named[scale].append([COLOR_NAMES[nearest_palette(v)] for v in rgb])
                border[scale].append(rows)
        out[sigma] = {}
        for scale, names in named.items():
            text = sum(row.count(col) for col, row in zip(COLOR_NAMES, names, strict=True))
            same = sum(names[i][m] == names[j][m] for i, j in pairs for m in range(n))
            out[sigma][scale] = {
                "text": text / (n * k),
                "noise": same / (n * len(pairs)),
                "colours": len({name for row in names for name in row}),
                "change": sum(float((border[scale][i] - border[scale][j]).abs().mean()) for i, j in pairs)
                / len(pairs),
            }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", help="model files, or 'default'")
    p.add_argument(
        "--sigma", type=float, nargs="+", default=None, help="σ of the call (default: the model's largest)"
    )
    p.add_argument("--cfg", type=float, nargs="+", default=[1.0, 3.0])
    p.add_argument("--n", type=int, default=8, help="noises per colour")
    p.add_argument("--json", help="write the rates here")
    args = p.parse_args()
    if args.n < 1 or any(not (math.isfinite(s) and s > 0) for s in args.sigma or []):
        p.error(f"--n must be >= 1 and every --sigma finite and > 0; got --n {args.n}, --sigma {args.sigma}")
    report = {}
    for m in args.models:
        pipe = Pipeline.default() if m == "default" else Pipeline.from_single_file(m)
        sigmas = args.sigma or [round(float(pipe.schedule("euler", "normal", 20)[0]), 4)]
        report[m] = background_reading(pipe, sigmas, args.cfg, args.n)
        for sigma, by_cfg in report[m].items():
            for w, r in by_cfg.items():
                print(
                    f"{m}  σ {sigma:g} CFG {w:g}: background as stated {r['text']:.3f} (chance 0.091), "
                    f"same colour for the same noise {r['noise']:.3f}, {r['colours']} colours drawn, "
                    f"border change between stated colours {r['change']:.4f}"
                )
    if args.json:  # JSON keys are strings: σ and CFG as written by str()
        rows = {
            m: {str(s): {str(w): x for w, x in v.items()} for s, v in r.items()} for m, r in report.items()
        }
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
