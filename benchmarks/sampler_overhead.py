"""Sampler overhead against diffusers' schedulers, in the same run.

Both sides sample an SD-sized latent [B, 4, 64, 64] for N steps with the same cheap analytic model
(a Gaussian denoiser, so the time is the sampling loop's own arithmetic, not a network), on the CPU
in float32. Prints ms per step for each and the ratio diffusers / latentforge (> 1: we are faster).

    .venv/bin/python benchmarks/sampler_overhead.py [--steps 30] [--batch 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from latentforge.model_sampling import DiscreteVP
from latentforge.samplers import SAMPLERS

MU, S = 0.1, 0.8  # the data: N(MU, S²) per element


def denoise(x, sigma):  # exact x̂₀ of Gaussian data in VE form
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return MU + S**2 / (S**2 + s**2) * (x - MU)


def eps_model(x_in, t, ms):  # the same model as diffusers sees it: ε̂ from the VP sample
    sigma = ms.sigma(torch.as_tensor(t, dtype=torch.float64)).float().reshape(1)
    x = x_in * (1 + sigma**2).sqrt()
    return (x - denoise(x, sigma)) / sigma


def run_diffusers(name, steps, x0, ms):
    import diffusers

    kw = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    cls, extra = {
        "euler": (diffusers.EulerDiscreteScheduler, {}),
        "euler_ancestral": (diffusers.EulerAncestralDiscreteScheduler, {}),
        "heun": (diffusers.HeunDiscreteScheduler, {}),
        "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
        "lms": (diffusers.LMSDiscreteScheduler, {}),
        "uni_pc_bh2": (diffusers.UniPCMultistepScheduler, {"solver_type": "bh2"}),
        "ddim": (diffusers.DDIMScheduler, {"clip_sample": False}),
    }[name]
    sch = cls(**kw, **extra)
    sch.set_timesteps(steps)
    x = x0 * sch.init_noise_sigma
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for t in sch.timesteps:
        x_in = sch.scale_model_input(x, t)
        eps = eps_model(x_in, t, ms)
        x = (
            sch.step(eps, t, x, generator=g).prev_sample
            if "generator" in sch.step.__code__.co_varnames
            else (sch.step(eps, t, x).prev_sample)
        )
    return time.perf_counter() - t0, len(sch.timesteps)


def run_ours(name, steps, x0, ms):
    from diffusers import EulerDiscreteScheduler

    ref = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ref.set_timesteps(steps)
    sigmas = ref.sigmas.float()  # the same linspace schedule

    calls = 0

    def model(x, sigma):
        nonlocal calls
        calls += 1
        return denoise(x, sigma)

    x = x0 * sigmas[0]
    kw = {"seed": 0} if name == "euler_ancestral" else {}
    t0 = time.perf_counter()
    SAMPLERS[name](model, x, sigmas, **kw)
    return time.perf_counter() - t0, calls


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(2)
    ms = DiscreteVP()
    x0 = torch.randn(a.batch, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    print(f"{'sampler':16s} {'ours ms/call':>13s} {'diffusers ms/call':>18s} {'ratio':>7s}")
    for name in ("euler", "euler_ancestral", "heun", "dpmpp_2m", "lms", "uni_pc_bh2", "ddim"):
        ours = min(run_ours(name, a.steps, x0, ms)[0] for _ in range(a.repeat))
        n_ours = run_ours(name, a.steps, x0, ms)[1]
        theirs, n_theirs = min(
            (run_diffusers(name, a.steps, x0, ms) for _ in range(a.repeat)), key=lambda r: r[0]
        )
        o, t = 1e3 * ours / n_ours, 1e3 * theirs / n_theirs
        print(f"{name:16s} {o:13.2f} {t:18.2f} {t / o:7.2f}")


if __name__ == "__main__":
    main()
