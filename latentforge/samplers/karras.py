"""Samplers that step in σ along the Karras ODE derivative d = (x − D)/σ, and their ancestral forms.

Karras et al. 2022 ("Elucidating the design space", EDM), Algorithm 2 for Euler/Heun with churn;
DDIM (Song et al. 2021) for the ancestral split; CFG++ (Chung et al. 2024) for the `_cfg_pp` forms.
"""

from __future__ import annotations

import torch

from latentforge.samplers.common import (
    denoise_with_uncond,
    get_ancestral_step,
    is_flow,
    make_noise_sampler,
    report,
    svec,
    to_d,
    trange,
)


def _churn(x, sigma, i, n, s_churn, s_tmin, s_tmax, s_noise, noise_sampler, sigma_next):
    """Karras Alg. 2 lines 4-6: raise σ to σ̂ = σ(1 + γ) by adding √(σ̂² − σ²) of fresh noise."""
    gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= float(sigma) <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        eps = noise_sampler(sigma, sigma_next) * s_noise
        x = x + eps * (sigma_hat**2 - sigma**2).sqrt()
    return x, sigma_hat


@torch.no_grad()
def sample_euler(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
    noise_sampler=None,
    seed=None,
):
    """Karras et al. 2022, Algorithm 2 with Euler steps: x ← x + (σ_{i+1} − σ̂)·d(x, σ̂)."""
    extra_args = extra_args or {}
    n = len(sigmas) - 1
    if s_churn > 0:
        noise_sampler = make_noise_sampler(x, sigmas, noise_sampler, seed)
    for i in trange(n, disable):
        x, sigma_hat = _churn(
            x, sigmas[i], i, n, s_churn, s_tmin, s_tmax, s_noise, noise_sampler, sigmas[i + 1]
        )
        denoised = model(x, svec(sigma_hat, x), **extra_args)
        d = to_d(x, sigma_hat, denoised)
        report(callback, x, i, sigmas[i], sigma_hat, denoised)
        x = x + d * (sigmas[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    eta=1.0,
    s_noise=1.0,
    noise_sampler=None,
    seed=None,
):
    """Euler to σ_down, then fresh noise σ_up (DDIM with η, Song et al. 2021 Eq. 12/16 in σ form).

    For flow models the split keeps the signal level α = 1 − σ (see common.get_ancestral_step).
    """
    extra_args = extra_args or {}
    flow = is_flow(model)
    noise_sampler = make_noise_sampler(x, sigmas, noise_sampler, seed)
    for i in trange(len(sigmas) - 1, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, svec(sigma, x), **extra_args)
        report(callback, x, i, sigma, sigma, denoised)
        sigma_down, sigma_up, scale = get_ancestral_step(sigma, sigma_next, eta, flow)
        if float(sigma_down) == 0:
            x = denoised
        else:
            x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        if float(sigma_next) > 0 and float(sigma_up) > 0:
            x = scale * x + noise_sampler(sigma, sigma_next) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_euler_ancestral_cfg_pp(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    eta=1.0,
    s_noise=1.0,
    noise_sampler=None,
    seed=None,
):
    """CFG++ (Chung et al. 2024, Algorithm 2 in σ form): denoise with the guided x̂₀ but re-noise along
    the unconditional direction: x ← D_cfg + σ_down·(x − D_uncond)/σ, then ancestral noise."""
    extra_args = extra_args or {}
    flow = is_flow(model)
    noise_sampler = make_noise_sampler(x, sigmas, noise_sampler, seed)
    for i in trange(len(sigmas) - 1, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised, uncond = denoise_with_uncond(model, x, sigma, extra_args)
        report(callback, x, i, sigma, sigma, denoised)
        sigma_down, sigma_up, scale = get_ancestral_step(sigma, sigma_next, eta, flow)
        if flow:  # x = (1−σ)x₀ + σε: keep the signal level of σ_down
            x = (1 - sigma_down) * denoised + sigma_down * (x - (1 - sigma) * uncond) / sigma
        else:
            x = denoised + sigma_down * to_d(x, sigma, uncond)
        if float(sigma_next) > 0 and float(sigma_up) > 0:
            x = scale * x + noise_sampler(sigma, sigma_next) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_euler_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """CFG++ Euler: the deterministic (η = 0) case of `sample_euler_ancestral_cfg_pp`."""
    return sample_euler_ancestral_cfg_pp(model, x, sigmas, extra_args, callback, disable, eta=0.0)


@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=0.0, **kw):
    """DDIM (Song et al. 2021, Eq. 12). In σ form η = 0 is exactly Euler; η > 0 is Euler ancestral."""
    if eta == 0:
        return sample_euler(model, x, sigmas, extra_args, callback, disable)
    return sample_euler_ancestral(model, x, sigmas, extra_args, callback, disable, eta=eta, **kw)


SAMPLERS = {
    "euler": sample_euler,
    "euler_cfg_pp": sample_euler_cfg_pp,
    "euler_ancestral": sample_euler_ancestral,
    "euler_ancestral_cfg_pp": sample_euler_ancestral_cfg_pp,
    "ddim": sample_ddim,
}
