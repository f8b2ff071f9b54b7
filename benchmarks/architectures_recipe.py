"""UNet vs DiT vs MMDiT, and flow vs v vs ε, on the 2-hour recipe's terms (issue 10's "choose the
architecture by measurement").

benchmarks/architectures.py compares the three networks from scratch on the first recipe (no padding mask,
no σ = 1 phase), where none of them followed prompts within its budget. This one puts the DiT and the MMDiT
(presets `shapes64-dit`, `shapes64-mmdit`: the UNet's forward FLOPs within 5%) through the denoiser stages
of `scripts/train_default_2h.sh` exactly as the UNet went through them, on that run's own VAE, scenes and
cached latents, with the text padding masked out of their attention (`mask_text_padding`, as the UNet):

- stage A: 300 steps at the sampler's first noise level only (`objective.terminal_fraction 0.99`: σ = 1
  for flow, the table's last σ for ε and v), lr 8e-4, seed 0;
- stage B: from A, lr 8e-4 with cosine decay to 8e-5 over 9000 steps (`--span`), seed 1, stopped after
  `--steps` steps (the schedule still spans 9000, so the EMA export at step N is the 2-hour run's step N for
  each network; the UNet's are that run's kept checkpoints).

`unet-eps` and `unet-v` are the UNet itself with SD1's ε-prediction or SD2's v-prediction (the latter on
the zero-terminal-SNR table) in place of flow, t ~ U{0..999}, through the same stages: the objective
comparison. `unet-eps-top64` is `unet-eps` with twice the channels at the full latent resolution (the
convolutional width, where small shapes are drawn); in the training loop its step takes 0.75 s against
the UNet's 0.515 s (1.46×, measured over steps 60-410 of B), so stage B's 78 minutes give it ~6200 steps
(`--steps 6000 --span 6000`). `unet-eps-minsnr` is `unet-eps` with Min-SNR-5 weighting in stage B (its
stage A is `unet-eps`'s): the shipped recipe. `mmdit-eps-minsnr` is the MMDiT through that same recipe
(stage A `mmdit-eps`).

Each export is then scored by `latentforge eval shapes` at the 2-hour model's defaults (20 steps,
euler_ancestral, CFG 3, the layout completion) on the same validation prompts and seeds. Stopping and
re-running continues (each stage resumes).

    .venv/bin/python benchmarks/architectures_recipe.py --run2h /work/runs/t2h --work /work/runs/arch \\
        [--nets dit mmdit unet-eps unet-v unet-eps-top64 unet-eps-minsnr] [--steps 3000] [--span 9000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from latentforge.training.config import resolve  # noqa: E402
from latentforge.training.trainer import train_denoiser  # noqa: E402

# name: (preset, what differs from the preset beyond the recipe's common overrides)
NETS = {
    "dit": ("shapes64-dit", {"dit.mask_text_padding": "true"}),
    "mmdit": ("shapes64-mmdit", {"mmdit.mask_text_padding": "true"}),
    # the UNet with the other two objectives (issue 10: "objective (flow vs v vs eps)"): SD1's ε on the
    # scaled_linear table, and SD2's v with the zero-terminal-SNR table (Lin et al. 2024), so that stage A,
    # like flow's σ = 1, trains at SNR ≈ 0; t ~ U{0..999} as DDPM (Ho et al. 2020, Algorithm 1)
    "unet-eps": ("shapes64", {"unet.mask_text_padding": "true", "objective.prediction": "eps",
                              "objective.sigma_sampling": "uniform_discrete"}),
    "unet-v": ("shapes64", {"unet.mask_text_padding": "true", "objective.prediction": "v",
                            "objective.sigma_sampling": "uniform_discrete",
                            "objective.zero_terminal_snr": "true"}),
    # ε with twice the channels at the full latent resolution (widths 64 / 64 / 128 on 16² / 8² / 4² instead
    # of 32 / 64 / 128): the level where a small shape's outline is drawn; 1.46× the step time
    "unet-eps-top64": ("shapes64", {"unet.mask_text_padding": "true", "objective.prediction": "eps",
                                    "objective.sigma_sampling": "uniform_discrete",
                                    "unet.model_channels": "64", "unet.channel_mult": "[1, 1, 2]"}),
    # ε with Min-SNR-γ weighting, γ = 5 (Hang et al. 2023, Eq. 6): per-sample weight min(SNR, 5)/SNR, which
    # evens out the per-σ losses (the trained ε model's ε-MSE is ~0.12 at σ = 0.05 against ~0.003 above
    # σ = 1.7, so the few low-σ draws dominate the gradient); stage B only, from `unet-eps`'s stage A
    "unet-eps-minsnr": ("shapes64", {"unet.mask_text_padding": "true", "objective.prediction": "eps",
                                     "objective.sigma_sampling": "uniform_discrete",
                                     "objective.weighting": "min_snr", "objective.min_snr_gamma": "5"}),
    # the MMDiT with the shipped recipe's objective (ε, Min-SNR-5 in stage B): the architecture comparison at
    # the recipe's own terms, against the shipped UNet
    "mmdit-eps": ("shapes64-mmdit", {"mmdit.mask_text_padding": "true", "objective.prediction": "eps",
                                     "objective.sigma_sampling": "uniform_discrete"}),
    "mmdit-eps-minsnr": ("shapes64-mmdit", {"mmdit.mask_text_padding": "true", "objective.prediction": "eps",
                                            "objective.sigma_sampling": "uniform_discrete",
                                            "objective.weighting": "min_snr",
                                            "objective.min_snr_gamma": "5"}),
}  # fmt: skip
# variants that differ from another only in stage B share its stage A (Min-SNR's weight is 0 at SNR 0, where
# stage A trains: `terminal_fraction` refuses it)
STAGE_A_OF = {"unet-eps-minsnr": "unet-eps", "mmdit-eps-minsnr": "mmdit-eps"}


def started(out: str) -> bool:
    state = os.path.join(out, "state")
    return os.path.isdir(state) and bool(os.listdir(state))


def train(preset: str, out: str, over: dict, stop_at: int | None = None) -> None:
    """One stage into `out`, continued if it was cut off; with `stop_at`, the run ends at that step."""
    resume = started(out)  # a folder without saved state (cut off before its first save) starts again
    cfg = resolve("denoiser", preset, overrides=over if resume else {**over, "overwrite": "true"})
    done = 0
    if resume:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            steps = [json.loads(line).get("step", 0) for line in f if line.strip()]
        done = max(steps, default=0)
    if stop_at is not None and done >= stop_at:
        return
    stop = None if stop_at is None else stop_at - done
    train_denoiser(cfg, out, resume=resume, progress=False, stop_after=stop)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run2h", required=True, help="a finished scripts/train_default_2h.sh folder")
    p.add_argument("--work", required=True)
    p.add_argument("--nets", nargs="+", default=["dit", "mmdit"], choices=sorted(NETS))
    p.add_argument("--steps", type=int, default=3000, help="stage-B steps (a multiple of 500)")
    p.add_argument("--span", type=int, default=9000, help="stage B's schedule length (the recipe's: 9000)")
    a = p.parse_args()
    if a.steps <= 0 or a.steps % 500:
        p.error(f"--steps must be a positive multiple of 500 (the checkpoint interval), got {a.steps}")
    r = a.run2h
    for net in a.nets:
        preset, own = NETS[net]
        files = {
            "vae": os.path.join(r, "vae", "checkpoints", "last.safetensors"),
            "data": os.path.join(r, "data"),
            "cache_latents": "true",
            "cache_dir": os.path.join(r, "cache"),
        }
        shared = {**files, **own}
        a_net = STAGE_A_OF.get(net, net)
        stage_a = os.path.join(a.work, a_net, "A")  # done already when a_net ran before (it resumes as done)
        a_own = NETS[a_net][1]
        train(preset, stage_a, {**files, **a_own, "objective.terminal_fraction": "0.99", "lr": "8e-4",
                                      "warmup_steps": "50", "max_steps": "300", "checkpoint_every": "300",
                                      "seed": "0"})  # fmt: skip
        over = {**shared, "init_from": os.path.join(stage_a, "checkpoints", "last.safetensors"), "lr": "8e-4",
                "lr_schedule": "cosine", "min_lr_ratio": "0.1", "warmup_steps": "50",
                "max_steps": str(a.span),
                "checkpoint_every": "500", "keep_last": "100", "seed": "1"}  # fmt: skip
        train(preset, os.path.join(a.work, net, "B"), over, stop_at=a.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
