"""Multistep samplers: one model call per step, reusing the outputs of earlier steps.

- `ipndm`, `ipndm_v`, `ipndm_v_exact`: Adams–Bashforth on the Karras derivative d = (x − D)/σ in σ,
  with fixed-step (iPNDM, introduced in Zhang & Chen 2023 from PNDM, Liu et al. 2022), ComfyUI's
  variable-step or exact variable-step coefficients.
- `deis`: DEIS tAB (Zhang & Chen 2023, Eq. 14-15) on the Karras ODE in σ, polynomial extrapolation in
  the DEIS (VP) time t.
- `res_multistep*`: RES 2nd-order multistep (Zhang et al. 2023, arXiv 2308.02157), data prediction,
  optional ancestral noise (η = 1) and CFG++ renoising; ComfyUI's names take the VE form on the
  model's own σ, the `_exact` ones the model's own noise form (and a CFG++ form consistent with DDIM's).
- `uni_pc`, `uni_pc_bh2`: UniPC (Zhao et al. 2023, Alg. 1-3), data prediction, UniP-p predictor + UniC-p
  corrector, B(h) = hh (bh1) or e^{hh} − 1 (bh2) with hh = −h, as ComfyUI computes them (VE form on
  every model's own σ, a final σ = 0 replaced by 0.001); `uni_pc_exact`, `uni_pc_bh2_exact`: the same
  solver in the model's own coordinates, ending with the final denoise.

Conventions shared by all of them:
- One model call per step (NFE = steps). A step to σ = 0 is the final denoise x ← D(x, σ_i): it is the
  first-order (Euler/DDIM) step to 0, and it avoids extrapolating earlier outputs over the large last
  step σ_min → 0 (ComfyUI does the same for ipndm, ipndm_v, deis and res_multistep; for UniPC it
  steps to σ = 0.001 instead, an order-1 step without corrector, which is x ≈ D up to 1e-3: so do
  `uni_pc` and `uni_pc_bh2`).
- The `_exact` exponential integrators work in the model's own coordinates x = α·x₀ + σ·ε
  (common.alpha, common.half_log_snr): α = 1, λ = −log σ for VE/VP and plain callables; α = 1 − σ,
  λ = log((1 − σ)/σ) for rectified flow. The first σ = 1 of a flow schedule (λ = −∞) is moved to
  0.9999 (common.first_sigma_for_log_snr) for the model call and the coefficients, as ComfyUI does.
  ComfyUI's deis and res_multistep* use the VE form on every model's own σ, and so do these names.
- All coefficients are computed in float64 on the CPU as Python floats; tensors stay in x's dtype.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from latentforge.samplers.common import (
    alpha,
    denoise_with_uncond,
    first_sigma_for_log_snr,
    get_ancestral_step,
    half_log_snr,
    is_flow,
    lagrange_integrals,
    make_noise_sampler,
    phi,
    report,
    svec,
    to_d,
    trange,
)

# --- shared numerics ------------------------------------------------------------------------------


def _combine(coeffs, tensors):
    """Σ_j c_j·t_j with Python-float coefficients (keeps the tensors' dtype)."""
    out = coeffs[0] * tensors[0]
    for c, t in zip(coeffs[1:], tensors[1:], strict=True):
        out = out + c * t
    return out


def _check_order(max_order: int, hi: int) -> None:
    if not 1 <= int(max_order) <= hi:
        raise ValueError(f"max_order must be between 1 and {hi}, got {max_order}")


# --- iPNDM ------------------------------------------------------------------------------------------

# Adams–Bashforth coefficients for a uniform step (Hairer, Nørsett & Wanner I, §III.1), newest first.
_AB_FIXED = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


@torch.no_grad()
def sample_ipndm(
    model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4, coefficients=None
):
    """iPNDM: Adams–Bashforth in σ on d = (x − D)/σ with the fixed (uniform-step) coefficients.

    PNDM's pseudo linear multistep part (Liu et al. 2022: the 4th-order Adams–Bashforth formula)
    applied to the Karras ODE dx/dσ = d, with the "improved" lower-order warm start instead of
    Runge–Kutta pseudo-steps (iPNDM, Zhang & Chen 2023, the DEIS paper; zju-pi/diff-solvers):
        x_{i+1} = x_i + (σ_{i+1} − σ_i)·Σ_j b_j·d_{i−j},
    b = (1), (3/2, −1/2), (23/12, −16/12, 5/12), (55/24, −59/24, 37/24, −9/24) for orders 1..4,
    order = min(max_order, i + 1). The coefficients ignore the actual step ratios, so on a
    non-uniform schedule the method is formally 2nd order (`ipndm_v_exact` keeps full order).
    A step to σ = 0 is the final denoise x ← D.

    coefficients: the b_j of each step that moves x instead of the fixed ones, one list per step (newest
    first, as many as that step's order): a solver tuned to a model and schedule (tune_solver.py, after
    S4S, Frankel et al. 2025, arXiv 2502.17423: a multistep solver's coefficients fitted with its time
    steps). None: the fixed ones.
    """
    _check_order(max_order, 4)
    extra_args = extra_args or {}
    b = _step_coefficients(coefficients, sigmas, max_order)
    ds: list[torch.Tensor] = []  # d at σ_i, σ_{i−1}, … (newest first)
    for i in trange(len(sigmas) - 1, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, svec(sigma, x), **extra_args)
        report(callback, x, i, sigma, sigma, denoised)
        if float(sigma_next) == 0:
            x = denoised
            continue
        ds = [to_d(x, sigma, denoised), *ds][:max_order]
        dt = float(sigma_next) - float(sigma)
        x = x + dt * _combine(b[i], ds)
    return x


def _step_coefficients(coefficients, sigmas, max_order: int) -> list[tuple[float, ...]]:
    """iPNDM's b_j per step: the fixed ones (order min(max_order, i + 1) at step i), or `coefficients`
    checked to give exactly that many finite numbers for each step that moves x (σ_{i+1} > 0)."""
    moves = sum(1 for v in sigmas[1:].tolist() if v != 0)
    fixed = [_AB_FIXED[min(max_order, i + 1)] for i in range(moves)]
    if coefficients is None:
        return fixed
    rows = [tuple(float(c) for c in row) for row in coefficients]
    if [len(r) for r in rows] != [len(r) for r in fixed] or not all(
        math.isfinite(c) for r in rows for c in r
    ):
        raise ValueError(
            f"ipndm coefficients must be {moves} lists of {[len(r) for r in fixed]} finite numbers (one per "
            f"step that moves x, as many as its order) for this {len(sigmas) - 1}-step schedule, got "
            f"{[list(r) for r in rows]}"
        )
    return rows


def _ipndm_v_coeffs(h: list[float]) -> list[float]:
    """b_j of ComfyUI's `ipndm_v` step x_{i+1} = x_i + h₀·Σ_j b_j·d_{i−j}, newest first, for the step
    lengths h = [h₀, h₁, …] (h₀ = σ_{i+1} − σ_i, h_k = σ_{i−k+1} − σ_{i−k}); the order is len(h).

    The Newton form of variable-step Adams–Bashforth: AB2 plus multiples T₁, T₂ of a second and a
    third backward difference (q = h₁(h₁ + h₂)/(h₂(h₂ + h₃))):
        AB2:  b = (1 + h₀/(2h₁), −h₀/(2h₁))
        + T₁·(1, −(1 + h₁/h₂), h₁/h₂),   T₁ = (1 − h₀²/(3h₁(h₁ + h₂)))/2
        + T₂·(1, −(1 + h₁/h₂ + q), h₁/h₂ + q(1 + h₂/h₃), −q·h₁/h₂),
          T₂ = [(1 − h₀/(3(h₀ + h₁)))/2 + (1 − h₀/(2(h₀ + h₁)))·h₀/(6(h₀ + h₁ + h₂))]
               · h₀(h₀ + h₁)(h₀ + h₁ + h₂) / (h₁(h₁ + h₂)(h₁ + h₂ + h₃)).
    These are the values of zju-pi/diff-solvers' iPNDM-v, which ComfyUI's `ipndm_v` uses. They are not
    the Adams ones beyond order 2: the Adams T₁ is (1 − h₀/(3(h₀ + h₁)))·h₀(h₀ + h₁)/(2h₁(h₁ + h₂)) (equal
    to this one on a uniform grid only, both 5/12, giving AB3's 23/12, −16/12, 5/12); the third
    difference's last entry would be −q·h₂/h₃ (with −q·h₁/h₂ the b's sum to 1 only when h₁/h₂ = h₂/h₃),
    and the Adams T₂ on a uniform grid is 3/8 (AB4's 55, −59, 37, −9 over 24), this one 11/24
    (57, −65, 43, −11 over 24). `ipndm_v_exact` integrates the interpolant exactly.
    """
    k = len(h)
    if k == 1:
        return [1.0]
    h0, h1 = h[0], h[1]
    b = [1 + h0 / (2 * h1), -h0 / (2 * h1)]
    if k == 2:
        return b
    h2 = h[2]
    t1 = (1 - h0 * h0 / (3 * h1 * (h1 + h2))) / 2
    b = [b[0] + t1, b[1] - (1 + h1 / h2) * t1, t1 * h1 / h2]
    if k == 3:
        return b
    h3 = h[3]
    t2 = ((1 - h0 / (3 * (h0 + h1))) / 2 + (1 - h0 / (2 * (h0 + h1))) * h0 / (6 * (h0 + h1 + h2))) * (
        h0 * (h0 + h1) * (h0 + h1 + h2) / (h1 * (h1 + h2) * (h1 + h2 + h3))
    )
    q = h1 * (h1 + h2) / (h2 * (h2 + h3))
    return [
        b[0] + t2,
        b[1] - (1 + h1 / h2 + q) * t2,
        b[2] + (h1 / h2 + q * (1 + h2 / h3)) * t2,
        -t2 * q * h1 / h2,
    ]


@torch.no_grad()
def sample_ipndm_v(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4):
    """iPNDM-v as ComfyUI computes it (its `ipndm_v`): Adams–Bashforth-type multistep in σ on
    d = (x − D)/σ with step-ratio-dependent coefficients (`_ipndm_v_coeffs`; iPNDM, Zhang & Chen 2023,
    from PNDM, Liu et al. 2022), order = min(max_order, i + 1) (warm start 1, 2, 3, 4):
        x_{i+1} = x_i + (σ_{i+1} − σ_i)·Σ_j b_j·d_{i−j}.
    Exact Adams–Bashforth up to order 2 on any grid, AB3 on a uniform grid; its higher terms are not
    the Adams ones (see `_ipndm_v_coeffs`), so on Karras schedules it converges at order 2 only
    asymptotically (measured 1.8 over 160..1280 steps; below ~100 steps the error is erratic, its sign
    changes between 20 and 40 steps). `ipndm_v_exact` is the Adams method (order 4, measured 3.4).
    A step to σ = 0 is the final denoise x ← D.
    """
    _check_order(max_order, 4)
    extra_args = extra_args or {}
    ds: list[torch.Tensor] = []  # newest first
    sig = [float(v) for v in sigmas.double().cpu()]
    for i in trange(len(sigmas) - 1, disable):
        sigma = sigmas[i]
        denoised = model(x, svec(sigma, x), **extra_args)
        report(callback, x, i, sigma, sigma, denoised)
        if sig[i + 1] == 0:
            x = denoised
            continue
        ds = [to_d(x, sigma, denoised), *ds][:max_order]
        h = [sig[i + 1] - sig[i]] + [sig[i - k + 1] - sig[i - k] for k in range(1, len(ds))]
        x = x + h[0] * _combine(_ipndm_v_coeffs(h), ds)
    return x


@torch.no_grad()
def sample_ipndm_v_exact(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4):
    """Variable-step Adams–Bashforth in σ on d = (x − D)/σ, integrating the interpolant exactly.

    The derivative is replaced by its Lagrange interpolant through the last k = min(max_order, i + 1)
    nodes σ_i, σ_{i−1}, …, σ_{i−k+1} and integrated exactly (Adams' construction, Hairer, Nørsett &
    Wanner I, §III.1 / §III.5 for variable steps):
        x_{i+1} = x_i + Σ_j c_j·d_{i−j},
        c_j = ∫_{σ_i}^{σ_{i+1}} Π_{m≠j} (τ − σ_{i−m})/(σ_{i−j} − σ_{i−m}) dτ.
    Order max_order on any grid (measured 3.4 for AB4 over 10..80 Karras steps; ComfyUI's `ipndm_v`
    is of order 2). On a uniform grid this is exactly `ipndm`. A step to σ = 0 is the final
    denoise x ← D.
    """
    _check_order(max_order, 4)
    extra_args = extra_args or {}
    ds: list[torch.Tensor] = []  # newest first
    nodes: list[float] = []
    for i in trange(len(sigmas) - 1, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, svec(sigma, x), **extra_args)
        report(callback, x, i, sigma, sigma, denoised)
        if float(sigma_next) == 0:
            x = denoised
            continue
        ds = [to_d(x, sigma, denoised), *ds][:max_order]
        nodes = [float(sigma), *nodes][:max_order]
        c = lagrange_integrals(nodes, float(sigma), float(sigma_next))
        x = x + _combine(c, ds)
    return x


# --- DEIS -------------------------------------------------------------------------------------------

# DEIS time: the VP-SDE time t of Song et al. 2021 with σ(t)² = exp(β_d t²/2 + β_min t) − 1, fitted so
# that σ(ε_s) = 0.002 and σ(1) = 80 with ε_s = 1e-3 (EDM's range; the convention of zju-pi/diff-solvers
# and ComfyUI). Any smooth monotone time gives a valid tAB method; this one only fixes which.
_DEIS_SMIN, _DEIS_SMAX, _DEIS_EPS = 0.002, 80.0, 1e-3
_DEIS_BD = 2 * (math.log1p(_DEIS_SMIN**2) / _DEIS_EPS - math.log1p(_DEIS_SMAX**2)) / (_DEIS_EPS - 1)
_DEIS_BMIN = math.log1p(_DEIS_SMAX**2) - _DEIS_BD / 2


def _deis_t(rho: float) -> float:
    """Inverse of ρ(t) = √(exp(β_d t²/2 + β_min t) − 1)."""
    return (math.sqrt(_DEIS_BMIN**2 + 2 * _DEIS_BD * math.log1p(rho**2)) - _DEIS_BMIN) / _DEIS_BD


def _deis_drho_dt(tau: np.ndarray) -> np.ndarray:
    """dρ/dt = (β_d t + β_min)·e^{β_d t²/2 + β_min t} / (2ρ)."""
    e = 0.5 * _DEIS_BD * tau**2 + _DEIS_BMIN * tau
    return (_DEIS_BD * tau + _DEIS_BMIN) * np.exp(e) / (2 * np.sqrt(np.expm1(e)))


def _deis_coeffs(ts, rho_a: float, rho_b: float) -> list[float]:
    """C_j = ∫_{t(ρ_a)}^{t(ρ_b)} L_j(τ)·dρ/dτ dτ over the DEIS-time nodes `ts` (newest first)."""
    if len(ts) == 1:
        return [rho_b - rho_a]
    return lagrange_integrals(ts, _deis_t(rho_a), _deis_t(rho_b), weight=_deis_drho_dt)


@torch.no_grad()
def sample_deis(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=3):
    """DEIS tAB (Zhang & Chen 2023, "Fast sampling of diffusion models with exponential integrator",
    Eq. 14-15, tAB) as ComfyUI computes it (its `deis`, after zju-pi/diff-solvers): on the Karras ODE
    dx/dσ = d = (x − D)/σ in the model's own σ, for every model (a flow model's σ is used as is).

    For VE the exponential integrator in ρ = σ takes the linear part exactly, and d is extrapolated by
    the Lagrange polynomial in the DEIS time t (`_deis_t`) through the last k = min(max_order, i + 1)
    nodes:
        x_{i+1} = x_i + Σ_j C_j·d_{i−j},   C_j = ∫_{t_i}^{t_{i+1}} L_j(τ)·(dσ/dτ) dτ,
    written here as x_{i+1} = D_i + σ_{i+1}d_i + Σ_{j≥1} C_j(d_{i−j} − d_i) (Σ_j C_j = σ_{i+1} − σ_i).
    C_j by Gauss–Legendre quadrature (common.lagrange_integrals); ComfyUI sums 10,000 equispaced
    points in float32, whose bias and rounding are ~1e-5 of σ_{i+1} − σ_i. A step to σ = 0 is the
    final denoise x ← D (ComfyUI's order-1 step to 0). Order 3 (measured 2.9 over 20..160 Karras
    steps). On flow models this is also more accurate than the same method in y = x/α, ρ = σ/α
    (measured on a Gaussian, flow σ with the SNRs of 80 Karras steps: 2.6e-5 against 2.3e-4).
    """
    _check_order(max_order, 4)
    extra_args = extra_args or {}
    sig = [float(v) for v in sigmas.double().cpu()]
    ds: list[torch.Tensor] = []  # d at σ_i, σ_{i−1}, … (newest first)
    ts: list[float] = []
    for i in trange(len(sigmas) - 1, disable):
        sigma = sigmas[i]
        denoised = model(x, svec(sigma, x), **extra_args)
        report(callback, x, i, sigma, sigma, denoised)
        if sig[i + 1] == 0:
            x = denoised
            continue
        d = to_d(x, sigma, denoised)
        ds = [d, *ds][:max_order]
        ts = [_deis_t(sig[i]), *ts][:max_order]
        c = _deis_coeffs(ts, sig[i], sig[i + 1])
        x = denoised + sig[i + 1] * d
        if len(c) > 1:
            x = x + _combine(c[1:], [dj - d for dj in ds[1:]])
    return x


# --- RES multistep ----------------------------------------------------------------------------------


def _res_multistep(
    model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, seed, cfg_pp, comfy
):
    """RES multistep; `comfy`: VE form on the model's own σ and the unconditional outputs in the CFG++
    multistep combination (ComfyUI's res_multistep*); else the model's own α, λ and the guided ones."""
    extra_args = extra_args or {}
    flow = not comfy and is_flow(model)
    sigmas = first_sigma_for_log_snr(sigmas, flow, model)
    if eta:
        noise_sampler = make_noise_sampler(x, sigmas, noise_sampler, seed)
    old = None  # (h_{i−1}, D_{i−1}): the previous deterministic step's λ-length and model output
    for i in trange(len(sigmas) - 1, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if cfg_pp:
            denoised, uncond = denoise_with_uncond(model, x, sigma, extra_args)
        else:
            denoised = uncond = model(x, svec(sigma, x), **extra_args)
        report(callback, x, i, sigma, sigma, denoised)
        s64, sn64 = sigma.double().cpu(), sigma_next.double().cpu()
        sd64, s_up, scale = get_ancestral_step(s64, sn64, eta, flow)
        if float(sd64) == 0:
            x = denoised
        else:
            s, sd = float(s64), float(sd64)
            a, ad = float(alpha(s64, flow)), float(alpha(sd64, flow))
            h = float(half_log_snr(sd64, flow) - half_log_snr(s64, flow))
            p1, p2 = phi(1, -h), phi(2, -h)
            if old is None:  # exponential Euler (DDIM): b₁ = φ₁, b₂ = 0
                d_bar = denoised
            else:  # c₂ = −r, r = h_{i−1}/h: b₁ = φ₁ + φ₂/r, b₂ = −φ₂/r, so h(b₁D + b₂D_old) = hφ₁·d_bar
                r = old[0] / h
                base = uncond if comfy else denoised
                d_bar = base + (p2 / (p1 * r)) * (base - old[1])
            x = (sd / s) * x + (ad * h * p1) * d_bar
            if cfg_pp:  # renoise along the unconditional ε̂: + α_d·e^{−h}·(D_cfg − D_uncond)
                x = x + (sd * a / s) * (denoised - uncond)
            old = (h, uncond if comfy else denoised)
        if float(sigma_next) > 0 and float(s_up) > 0:
            x = float(scale) * x + noise_sampler(sigma, sigma_next) * (s_noise * float(s_up))
    return x


_RES_COMFY = """

    As ComfyUI computes it: the VE form (α = 1, λ = −log σ, the VE ancestral split of
    common.get_ancestral_step) on the model's own σ for every model. For VE/VP models that is the
    method above; on flow models the deterministic form is a valid but slightly less accurate
    integrator (measured on a Gaussian: 1.1-1.3× the error of `{exact}`), and the ancestral forms add
    noise without rescaling the signal, which inflates the variance of the samples (measured: 2× the
    covariance of a 2-D mixture at 100 steps). `{exact}` works in the model's own α, λ."""


def _res_doc(fn, exact: str):
    fn.__doc__ = fn.__doc__ + _RES_COMFY.format(exact=exact)
    return fn


@torch.no_grad()
def sample_res_multistep(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """RES 2nd-order multistep (Zhang et al. 2023, "Improved order analysis and design of exponential
    integrator for diffusion models", arXiv 2308.02157), data-prediction form.

    With h = λ_{i+1} − λ_i, the exact solution x_{i+1} = (σ_{i+1}/σ_i)x_i + σ_{i+1}∫e^λ D dλ is
    approximated with D interpolated linearly through (λ_{i−1}, D_{i−1}), (λ_i, D_i):
        x_{i+1} = (σ_{i+1}/σ_i)·x_i + α_{i+1}·h·(b₁D_i + b₂D_{i−1}),
    where the paper's order conditions b₁ + b₂ = φ₁(−h), b₂c₂ = φ₂(−h) with c₂ = −(λ_i − λ_{i−1})/h give
    b₂ = φ₂/c₂, b₁ = φ₁ − b₂. The first step is exponential Euler (DDIM); a step to σ = 0 is x ← D."""
    return _res_multistep(model, x, sigmas, extra_args, callback, disable, 0.0, 1.0, None, None, False, True)


@torch.no_grad()
def sample_res_multistep_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """`res_multistep` with CFG++ (Chung et al. 2024) as ComfyUI computes it: the first step is the
    CFG++ DDIM step x₁ = D_cfg + σ₁·ε̂_uncond; later steps take the RES step from x + (D_cfg − D_uncond)
    with the *unconditional* outputs (D_uncond,i and D_uncond,i−1) in the multistep combination:
    α_{i+1}·e^{−h}(D_cfg − D_uncond) + [RES step on D_uncond], i.e. the CFG++ DDIM step plus
    (1 − e^{−h})(D_uncond − D_cfg) plus RES's correction on the unconditional outputs. As the steps
    grow it tends to the same limit as `euler_cfg_pp`, more slowly than `res_multistep_cfg_pp_exact`
    (measured with guidance 3 on two Gaussians: 0.83 / 0.49 / 0.073 against 0.53 / 0.34 / 0.065 at
    10 / 20 / 80 Karras steps, max error against `euler_cfg_pp` at 4000 steps). Equals
    `res_multistep` without a separate unconditional prediction."""
    return _res_multistep(model, x, sigmas, extra_args, callback, disable, 0.0, 1.0, None, None, True, True)


@torch.no_grad()
def sample_res_multistep_ancestral(
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
    """`res_multistep` with ancestral noise: the RES step goes to σ_down (h = λ(σ_down) − λ_i), then
    fresh i.i.d. noise σ_up is added (DDIM η-split).

    History convention (as ComfyUI): D_{i−1} is placed h_{i−1} = λ(σ_down,i−1) − λ_{i−1} behind, i.e. the
    deterministic segments are chained as one ODE path. For η = 1 (VE) this reproduces, to leading
    order, the (1+η)h²/2·D′ correction of SDE-DPM-Solver++(2M) (Lu et al. 2022b, §5); placing it at
    the true λ_{i−1} would double that term (measured: covariance bias of a 2-D mixture 3-6× larger at
    30 steps). For η = 0 both conventions are `res_multistep`."""
    return _res_multistep(
        model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, seed, False, True
    )


@torch.no_grad()
def sample_res_multistep_ancestral_cfg_pp(
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
    """`res_multistep_ancestral` with ComfyUI's CFG++ form of `res_multistep_cfg_pp` (the unconditional
    outputs in the multistep combination)."""
    return _res_multistep(
        model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, seed, True, True
    )


for _fn, _exact in (
    (sample_res_multistep, "res_multistep_exact"),
    (sample_res_multistep_cfg_pp, "res_multistep_cfg_pp_exact"),
    (sample_res_multistep_ancestral, "res_multistep_ancestral_exact"),
    (sample_res_multistep_ancestral_cfg_pp, "res_multistep_ancestral_cfg_pp_exact"),
):
    _res_doc(_fn, _exact)


@torch.no_grad()
def sample_res_multistep_exact(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """`res_multistep` (RES 2nd-order multistep, Zhang et al. 2023, arXiv 2308.02157) in the model's own
    noise form: α = 1 − σ and λ = log((1 − σ)/σ) for flow models, whose first σ = 1 (λ = −∞) is moved
    to 0.9999. The same as `res_multistep` for VE/VP models; on flow models more accurate (measured on a
    Gaussian: 0.75-0.9× the error of `res_multistep`)."""
    return _res_multistep(model, x, sigmas, extra_args, callback, disable, 0.0, 1.0, None, None, False, False)


@torch.no_grad()
def sample_res_multistep_cfg_pp_exact(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """`res_multistep_exact` with CFG++ (Chung et al. 2024): the next state is α_{i+1}·D̄_cfg +
    σ_{i+1}·ε̂_uncond, i.e. the RES update with the guided D's plus α_{i+1}e^{−h}(D_cfg − D_uncond):
    each step is the CFG++ DDIM step (`euler_cfg_pp`) plus RES's correction on the guided outputs.
    Closer to the many-step limit of `euler_cfg_pp` than ComfyUI's `res_multistep_cfg_pp` (see
    there). Equals `res_multistep_exact` without a separate unconditional prediction."""
    return _res_multistep(model, x, sigmas, extra_args, callback, disable, 0.0, 1.0, None, None, True, False)


@torch.no_grad()
def sample_res_multistep_ancestral_exact(
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
    """`res_multistep_ancestral` in the model's own noise form: the RES step to σ_down, then fresh noise
    σ_up by common.get_ancestral_step (DDIM η-split for VE; for flow the signal-preserving split that
    rescales the state to α_{i+1} = 1 − σ_{i+1}, so the samples have the right distribution). The same
    history convention as `res_multistep_ancestral`; the same as it for VE/VP models."""
    return _res_multistep(
        model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, seed, False, False
    )


@torch.no_grad()
def sample_res_multistep_ancestral_cfg_pp_exact(
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
    """`res_multistep_ancestral_exact` with the CFG++ renoising of `res_multistep_cfg_pp_exact`."""
    return _res_multistep(
        model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, seed, True, False
    )


# --- UniPC --------------------------------------------------------------------------------------------


def _vander_solve(rs: list[float], rhs: list[float]) -> list[float]:
    """Solve Σ_m a_m r_m^{k−1} = rhs_k, k = 1..len(rs) (the matrix R_p of UniPC, Alg. 1-2)."""
    R = np.vander(np.asarray(rs, dtype=np.float64), increasing=True).T  # R[k, m] = r_m^k
    return [float(v) for v in np.linalg.solve(R, np.asarray(rhs, dtype=np.float64))]


def _uni_pc(model, x, sigmas, extra_args, callback, disable, variant, max_order, lower_order_final, comfy):
    """UniPC multistep, data prediction (Zhao et al. 2023, Alg. 1-3 and App. for the x₀ form).

    Per step s = σ_i → t = σ_{i+1}, h = λ_t − λ_s > 0, hh = −h, order p, B = hh (bh1) or e^{hh} − 1 (bh2):
      r_m = (λ_{i−m} − λ_i)/h,  D1_m = (m_{i−m} − m_i)/r_m  (m = 1..p−1),
      g_k = k!·hh·φ_{k+1}(hh)/B(h), k = 1..p  (so that B·Σ_m a_m r_m^{k−1}/k! matches hh·φ_{k+1}(hh)),
      base  = (σ_t/σ_s)x − α_t(e^{hh} − 1)m_i,
      UniP-p: x̃ = base − α_t·B·Σ_m a_m D1_m,  R_{p−1}a = g_{1..p−1}  (a = ½ for p = 2),
      UniC-p: x  = base − α_t·B·(Σ_m c_m D1_m + c_p(m_t − m_i)),  R_p c = g  (r_p = 1; c = ½ for p = 1),
    where m_t = D(x̃, σ_t) is also the model output that the next step uses (NFE = steps).

    comfy=True is ComfyUI's `uni_pc` (comfy/extra_samplers/uni_pc.py, `sample_unipc`): it converts every
    model's own σ to VP as if it were a VE σ (α = 1/√(1 + σ²), λ = −log σ; in VE coordinates this is
    α = 1, λ = −log σ, also on flow models, with no offset of a first σ = 1), replaces a final σ = 0 by
    0.001, takes the last step (order 1, no corrector) to 0.001 and returns that sample. comfy=False
    (`_exact`): the model's own coordinates and the final denoise x ← D(x, σ_min) to σ = 0.
    """
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    _check_order(max_order, 3)
    extra_args = extra_args or {}
    flow = False if comfy else is_flow(model)
    if comfy:
        if float(sigmas[-1]) == 0:
            sigmas = torch.cat([sigmas[:-1], sigmas.new_full((1,), COMFY_UNI_PC_LAST_SIGMA)])
    else:
        sigmas = first_sigma_for_log_snr(sigmas, flow, model)
    s64 = sigmas.double().cpu()
    lam64, a64 = half_log_snr(s64, flow), alpha(s64, flow)
    n = len(sigmas) - 1
    hist = [(float(lam64[0]), model(x, svec(sigmas[0], x), **extra_args))]  # (λ, m), newest last
    for i in trange(n, disable):
        report(callback, x, i, sigmas[i], sigmas[i], hist[-1][1])
        lam_s, m0 = hist[-1]
        if float(sigmas[i + 1]) == 0:  # final denoise (order 1 step to σ = 0)
            x = m0
            break
        p = min(max_order, len(hist), n - i if lower_order_final else max_order)
        lam_t, a_t = float(lam64[i + 1]), float(a64[i + 1])
        h = lam_t - lam_s
        hh = -h
        bh = hh if variant == "bh1" else math.expm1(hh)
        prev = hist[-p:-1][::-1]  # p − 1 earlier outputs, newest first
        rks = [(lam_k - lam_s) / h for lam_k, _ in prev]
        d1s = [(m_k - m0) / r for r, (_, m_k) in zip(rks, prev, strict=True)]
        g = [math.factorial(k) * hh * phi(k + 1, hh) / bh for k in range(1, p + 1)]
        base = float(s64[i + 1] / s64[i]) * x - (a_t * math.expm1(hh)) * m0
        # predictor UniP-p
        if p == 1:
            x_pred = base
        else:
            a_p = [0.5] if p == 2 else _vander_solve(rks, g[: p - 1])
            x_pred = base - (a_t * bh) * _combine(a_p, d1s)
        if i == n - 1:  # no corrector after the last step (no model call there)
            x = x_pred
            break
        m_t = model(x_pred, svec(sigmas[i + 1], x), **extra_args)
        # corrector UniC-p, reusing m_t
        c = [0.5] if p == 1 else _vander_solve([*rks, 1.0], g)
        x = base - (a_t * bh) * _combine(c, [*d1s, m_t - m0])
        hist = [*hist, (lam_t, m_t)][-max_order:]
    return x


COMFY_UNI_PC_LAST_SIGMA = 0.001  # ComfyUI's `sample_unipc`: a final σ = 0 becomes 0.001


@torch.no_grad()
def sample_uni_pc(
    model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=3, lower_order_final=True
):
    """UniPC-bh1, data prediction (Zhao et al. 2023, "UniPC: A unified predictor-corrector framework for
    fast sampling of diffusion models", Alg. 1-3; B(h) = hh with hh = −h in the data-prediction sign
    convention; see `_uni_pc` for the update), as ComfyUI computes it: the VE form on the model's own σ
    (flow models too) and a final σ = 0 replaced by 0.001, the last step (order 1, no corrector) landing
    there, so the result keeps a 0.001 noise level. `uni_pc_exact` uses the model's own coordinates and
    ends with the final denoise; on VE/VP models the two differ only in that last step.

    Order p_i = min(max_order, i + 1, n − i) (warm start; lower_order_final: lower order on the last
    steps as the paper recommends for few steps; ComfyUI's order = min(3, len(sigmas) − 2) never binds
    beyond that, except that ComfyUI's 1-step run returns its input: here it takes the one step).
    The corrector runs after every step except the last. NFE = steps.
    """
    return _uni_pc(model, x, sigmas, extra_args, callback, disable, "bh1", max_order, lower_order_final, True)


@torch.no_grad()
def sample_uni_pc_bh2(
    model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=3, lower_order_final=True
):
    """UniPC-bh2: B(h) = e^{hh} − 1 (hh = −h; Zhao et al. 2023, Alg. 1-3), otherwise as `uni_pc`
    (ComfyUI's form: VE coordinates on the model's own σ, a final σ = 0 replaced by 0.001)."""
    return _uni_pc(model, x, sigmas, extra_args, callback, disable, "bh2", max_order, lower_order_final, True)


@torch.no_grad()
def sample_uni_pc_exact(
    model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=3, lower_order_final=True
):
    """UniPC-bh1 in the model's own coordinates x = α·x₀ + σ·ε (α = 1 − σ, λ = log((1 − σ)/σ) on flow
    models, as diffusers' UniPCMultistepScheduler with flow sigmas; a first σ = 1 moved to 0.9999) and a
    step to σ = 0 taken as the final denoise x ← D (the order-1 step to 0), where `uni_pc` stops at
    0.001 and uses the VE form on every model."""
    return _uni_pc(
        model, x, sigmas, extra_args, callback, disable, "bh1", max_order, lower_order_final, False
    )


@torch.no_grad()
def sample_uni_pc_bh2_exact(
    model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=3, lower_order_final=True
):
    """UniPC-bh2 in the model's own coordinates, ending with the final denoise (see `uni_pc_exact`)."""
    return _uni_pc(
        model, x, sigmas, extra_args, callback, disable, "bh2", max_order, lower_order_final, False
    )


SAMPLERS = {
    "ipndm": sample_ipndm,
    "ipndm_v": sample_ipndm_v,
    "deis": sample_deis,
    "res_multistep": sample_res_multistep,
    "res_multistep_cfg_pp": sample_res_multistep_cfg_pp,
    "res_multistep_ancestral": sample_res_multistep_ancestral,
    "res_multistep_ancestral_cfg_pp": sample_res_multistep_ancestral_cfg_pp,
    "uni_pc": sample_uni_pc,
    "uni_pc_bh2": sample_uni_pc_bh2,
}
# Our own variants, more accurate than the ComfyUI name they depart from (see their docstrings).
EXACT_SAMPLERS = {
    "ipndm_v_exact": sample_ipndm_v_exact,
    "uni_pc_exact": sample_uni_pc_exact,
    "uni_pc_bh2_exact": sample_uni_pc_bh2_exact,
    "res_multistep_exact": sample_res_multistep_exact,
    "res_multistep_cfg_pp_exact": sample_res_multistep_cfg_pp_exact,
    "res_multistep_ancestral_exact": sample_res_multistep_ancestral_exact,
    "res_multistep_ancestral_cfg_pp_exact": sample_res_multistep_ancestral_cfg_pp_exact,
}
