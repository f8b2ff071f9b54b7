"""What every sampler shares: the Karras derivative, the noise form (VE or flow), ancestral steps,
the unconditional prediction for CFG++, default noise, progress.

Notation (k-diffusion): D(x, σ) is the denoiser (x̂₀); d = (x − D)/σ the probability-flow ODE
derivative dx/dσ (Karras et al. 2022, Eq. 3 with s = 1); λ = log(α/σ) the half log-SNR.

A sampler works in the model's own coordinates x = α(σ)·x₀ + σ·ε. For VE/VP models (and any
plain callable D) α = 1 and λ = −log σ; for rectified-flow models (model_sampling.is_flow)
α = 1 − σ and λ = log((1 − σ)/σ). The ODE dx/dσ = (x − D)/σ holds for both: for flow,
(x − x₀)/σ = ε − x₀ = v (Liu et al. 2022, Eq. 1), so Euler/Heun/LMS need no change; the
exponential integrators and ancestral steps use α and λ.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import trange as _trange

from latentforge.noise import NoiseSampler, default_noise_sampler


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """Karras ODE derivative d = (x − D)/σ, in x's dtype."""
    return ((x - denoised) / append_dims(sigma.to(x.device, non_blocking=True), x.ndim)).to(x.dtype)


def svec(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """σ as a [B] vector for the model call, keeping the schedule's dtype (never rounded to bf16)."""
    return sigma.to(x.device, non_blocking=True).expand(x.shape[0])


def trange(n: int, disable: bool | None = None):
    return _trange(n, disable=disable if disable is not None else True, leave=False)


def model_sampling_of(model):
    return getattr(model, "model_sampling", None)


def is_flow(model) -> bool:
    ms = model_sampling_of(model)
    return bool(getattr(ms, "is_flow", False))


# --- noise form -----------------------------------------------------------------------------


def alpha(sigma: torch.Tensor, flow: bool) -> torch.Tensor:
    return 1 - sigma if flow else torch.ones_like(sigma)


def half_log_snr(sigma: torch.Tensor, flow: bool) -> torch.Tensor:
    """λ = log(α/σ); −∞ at σ = 1 for flow, +∞ at σ = 0."""
    if flow:
        return torch.log1p(-sigma) - sigma.log()
    return -sigma.log()


def sigma_from_half_log_snr(lam: torch.Tensor, flow: bool) -> torch.Tensor:
    return torch.sigmoid(-lam) if flow else torch.exp(-lam)


def first_sigma_for_log_snr(sigmas: torch.Tensor, flow: bool, model=None) -> torch.Tensor:
    """σ = 1 has λ = −∞ for flow models; start a hair below it, as ComfyUI does (its
    offset_first_sigma_for_snr): at the model's σ of sampling fraction 10⁻⁴, σ(t = (1 − 10⁻⁴)·T), which
    is 0.9999 for shift 1 (and 0.99997 for SD3's shift 3); 0.9999 without a model_sampling."""
    if flow and float(sigmas[0]) >= 1.0:
        sigmas = sigmas.clone()
        ms = model_sampling_of(model)
        if ms is not None and hasattr(ms, "multiplier"):
            sigmas[0] = float(ms.sigma(torch.tensor((1 - 1e-4) * ms.multiplier, dtype=torch.float64)))
        else:
            sigmas[0] = 0.9999
    return sigmas


def get_ancestral_step(sigma, sigma_next, eta: float = 1.0, flow: bool = False):
    """Split a step σ → σ_next into a deterministic step to σ_down and fresh noise of size σ_up.

    Returns (σ_down, σ_up, scale): x_next = scale·x(σ_down) + σ_up·z.
    VE (DDIM, Song et al. 2021, Eq. 16 in σ form): σ_up = min(σ_next, η·√(σ_next²(σ² − σ_next²)/σ²)),
    σ_down = √(σ_next² − σ_up²), scale = 1.
    Flow: σ_down = σ_next·(1 + (σ_next/σ − 1)·η); the state at σ_down is rescaled to the signal level
    α_next = 1 − σ_next and topped up with noise to total σ_next:
    σ_up = √(σ_next² − (σ_down·α_next/α_down)²), scale = α_next/α_down.
    """
    if float(sigma_next) == 0 or not eta:
        return sigma_next, sigma_next * 0, torch.ones_like(sigma_next)
    if flow:
        sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
        a_next, a_down = 1 - sigma_next, 1 - sigma_down
        scale = a_next / a_down
        sigma_up = (sigma_next**2 - (sigma_down * scale) ** 2).clamp_min(0).sqrt()
        return sigma_down, sigma_up, scale
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).sqrt())
    sigma_down = (sigma_next**2 - sigma_up**2).sqrt()
    return sigma_down, sigma_up, torch.ones_like(sigma_next)


# --- model calls ------------------------------------------------------------------------------


def denoise_with_uncond(model, x, sigma, extra_args):
    """(guided D, unconditional D) for the CFG++ samplers (Chung et al. 2024).

    A guidance wrapper exposes `with_uncond`; for any other model both are the same prediction,
    so a `_cfg_pp` sampler equals its base sampler.
    """
    if hasattr(model, "with_uncond"):
        return model.with_uncond(x, svec(sigma, x), **extra_args)
    d = model(x, svec(sigma, x), **extra_args)
    return d, d


def make_noise_sampler(
    x: torch.Tensor,
    sigmas: torch.Tensor,
    noise_sampler: NoiseSampler | None,
    seed=None,
    brownian: bool = False,
    cpu: bool = True,
) -> NoiseSampler:
    """The caller's noise_sampler, else the default (`noise.default_noise_sampler`): seeded Gaussian noise,
    or with `brownian` increments of one batched Brownian tree with per-image seeds
    (`noise.SeededBrownianNoiseSampler`); `cpu` places that tree on the CPU or on x's device."""
    if noise_sampler is not None:
        return noise_sampler
    return default_noise_sampler(x, seed, sigmas=sigmas, brownian=brownian, cpu=cpu)


def report(callback, x, i, sigma, sigma_hat, denoised) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


# --- scalar kernels of the exponential integrators (Python floats, float64) -----------------


def one_minus_exp_neg(z: float) -> float:
    """1 − e^{−z} (= −expm1(−z), no cancellation for small z): the weight of a constant D over a step,
    ∫_0^h c·e^{−c(h−τ)} dτ = 1 − e^{−ch} (DPM-Solver++, Lu et al. 2022b, Eq. 9 with D constant)."""
    return -math.expm1(-z)


def phi(k: int, z: float) -> float:
    """φ_k(z) = ∫₀¹ e^{(1−θ)z} θ^{k−1}/(k−1)! dθ, so φ₀ = e^z and φ_{k+1}(z) = (φ_k(z) − 1/k!)/z: the
    φ-functions of exponential integrators (Hochbruck & Ostermann 2010, "Exponential integrators",
    Acta Numerica). A monomial against the exponential integrates to
    ∫_0^h e^{−c(h−τ)}·τ^{k−1}/(k−1)! dτ = h^k·φ_k(−ch) (τ = hθ).

    The recursion cancels for small |z|; there the Taylor series Σ_m z^m/(m+k)! is used (30 terms,
    truncation error < 0.5³⁰/30! for |z| < 0.5).
    """
    if abs(z) < 0.5:
        return sum(z**m / math.factorial(m + k) for m in range(30))
    p = math.exp(z)
    for j in range(k):
        p = (p - 1 / math.factorial(j)) / z
    return p


# 24-point Gauss–Legendre rule on [−1, 1]: exact for polynomials of degree ≤ 47.
_GL_X, _GL_W = np.polynomial.legendre.leggauss(24)


def gauss_legendre(a: float, b: float) -> tuple[np.ndarray, np.ndarray]:
    """Points τ and weights w of the 24-point Gauss–Legendre rule on [a, b]: ∫_a^b f ≈ Σ w·f(τ).

    Exact to rounding for polynomials of degree ≤ 47. For a polynomial of degree < 4 times
    e^{−c(λ_t − λ)} (SA-Solver) the error is below 1e-20 for c·h ≤ 10. DEIS's dρ/dt grows like t^{−½}
    towards t = 0, so a step that ends near σ = 0 is harder: relative error of the coefficients
    (measured, 3 nodes) ~3e-10 for a step to σ = 0.03, ~1e-5 for a step to σ = 0.002.
    """
    mid, half = 0.5 * (a + b), 0.5 * (b - a)
    return mid + half * _GL_X, half * _GL_W


def lagrange_integrals(nodes, a: float, b: float, weight=None) -> list[float]:
    """c_j = ∫_a^b ℓ_j(τ)·w(τ) dτ for the Lagrange basis ℓ_j(τ) = Π_{k≠j} (τ − τ_k)/(τ_j − τ_k) on
    `nodes` (w = `weight(τ)` on a numpy array, or 1), by `gauss_legendre`.

    With f replaced by its interpolating polynomial through (τ_j, f_j), ∫_a^b f·w dτ ≈ Σ_j c_j·f_j: the
    coefficients of every multistep rule here. Adams–Bashforth with variable steps in σ (lms, ipndm_v;
    w = 1; Hairer, Nørsett & Wanner I, §III.1 and §III.5), DEIS tAB (w = dρ/dt; Zhang & Chen 2023,
    Eq. 14) and the stochastic Adams rules of SA-Solver (w = c·e^{−c(λ_t − λ)}; Xue et al. 2023,
    Eqs. 15 and 18).
    """
    tau, w = gauss_legendre(a, b)
    if weight is not None:
        w = w * weight(tau)
    out = []
    for j, tj in enumerate(nodes):
        basis = np.ones_like(tau)
        for k, tk in enumerate(nodes):
            if k != j:
                basis = basis * (tau - tk) / (tj - tk)
        out.append(float(np.sum(w * basis)))
    return out


# --- scalar helpers (exponential integrators) -----------------------------------------------


class ScalarForm:
    """α(σ), λ(σ) and σ(λ) of the model's noise form, as Python floats (float64 math).

    `ve=True` takes the VE form (α = 1, λ = −log σ) on the model's own σ whatever the model: the
    k-diffusion samplers that ComfyUI runs unchanged on flow models (dpm_fast, dpm_adaptive) do that.
    """

    def __init__(self, model, ve: bool = False):
        self.flow = False if ve else is_flow(model)

    def lam(self, s: float) -> float:
        return float(half_log_snr(torch.tensor(s, dtype=torch.float64), self.flow))

    def sigma(self, lam: float) -> float:
        return float(sigma_from_half_log_snr(torch.tensor(lam, dtype=torch.float64), self.flow))

    def alpha(self, s: float) -> float:
        return 1.0 - s if self.flow else 1.0

    def ancestral(self, s: float, t: float, eta: float):
        """(σ_down, σ_up, scale) of common.get_ancestral_step, as floats."""
        d, u, c = get_ancestral_step(
            torch.tensor(s, dtype=torch.float64), torch.tensor(t, dtype=torch.float64), eta, self.flow
        )
        return float(d), float(u), float(c)


def sigma_tensor(v: float, sigmas: torch.Tensor) -> torch.Tensor:
    """An intermediate σ as a 0-d tensor in the schedule's dtype, for model and noise-sampler calls."""
    return torch.tensor(v, dtype=sigmas.dtype, device=sigmas.device)


def call_model(model, x, sigma: torch.Tensor, extra_args):
    """D(x, σ) with σ broadcast to a [B] vector (`svec`)."""
    return model(x, svec(sigma, x), **extra_args)


class LazyNoise:
    """Builds the noise sampler on first use: a Brownian tree needs two distinct positive σ, which a
    schedule like [σ_max, 0] (one step straight to the data) does not have — and it needs no noise."""

    def __init__(self, x, sigmas, noise_sampler, seed, brownian, cpu):
        self.args = (x, sigmas, noise_sampler, seed, brownian, cpu)
        self.ns = noise_sampler

    def __call__(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.ns is None:
            x, sigmas, ns, seed, brownian, cpu = self.args
            self.ns = make_noise_sampler(x, sigmas, ns, seed, brownian=brownian, cpu=cpu)
        return self.ns(s, t)
