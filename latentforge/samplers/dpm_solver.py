"""DPM-Solver: noise-prediction exponential integrators of the probability-flow ODE in λ.

Written from Lu et al. 2022a, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling
in Around 10 Steps" (NeurIPS 2022): noise-prediction DPM-Solver-1/2/3 (§3.2, Algorithms 1-2), the
DPM-Solver-fast step schedule and adaptive step size DPM-Solver-12/23 (§3.3 and Appendix C).
The data-prediction DPM-Solver++ samplers are in dpmpp.py.

Conventions (see common.py): the model's coordinates are x = α(σ)·x₀ + σ·ε, λ = log(α/σ) the half
log-SNR, h = λ_t − λ_s > 0 for a step from σ_s to σ_t < σ_s, and D(x, σ) = x̂₀. α = 1 for VE models
(λ = −log σ) and α = 1 − σ for rectified flow. The exact propagator used throughout is

    noise prediction:  x_t = (α_t/α_s)·x_s − σ_t·∫_{λ_s}^{λ_t} e^{λ_t − λ} ε̂ dλ
                           = (α_t/α_s)·x_s − σ_t·(e^{h} − 1)·ε̂              (ε̂ constant)

with ε̂ = (x − α·D)/σ. All step coefficients are computed as Python floats (double precision) from the
schedule, so x keeps its own dtype (float32, float64 or bfloat16).
"""

from __future__ import annotations

import math

import torch

from latentforge.samplers.common import (
    LazyNoise,
    ScalarForm,
    call_model,
    first_sigma_for_log_snr,
    report,
    sigma_tensor,
    trange,
)


class _NoisePredSolver:
    """DPM-Solver-1/2/3 (Lu et al. 2022a, §3.2 and Algorithms 1-2) in the model's own α, σ, λ.

    `eps(x, σ)` evaluates ε̂ = (x − α·D)/σ; every method takes ε̂ at the step start (`e_s`).
    """

    def __init__(self, model, sigmas, extra_args, form: ScalarForm):
        self.model, self.sigmas, self.extra_args, self.f = model, sigmas, extra_args, form
        self.nfe = 0

    def eps(self, x, s: float, sigma_t: torch.Tensor | None = None):
        """(ε̂, D) at σ = s."""
        D = call_model(
            self.model, x, sigma_t if sigma_t is not None else sigma_tensor(s, self.sigmas), self.extra_args
        )
        self.nfe += 1
        return (x - self.f.alpha(s) * D) / s, D

    def _stage(self, x, e_s, s: float, lam_s: float, r: float, h: float):
        """u = (α_{s1}/α_s)x − σ_{s1}(e^{rh} − 1)ε̂_s at λ_{s1} = λ_s + r·h (the DPM-Solver-1 predictor)."""
        s1 = self.f.sigma(lam_s + r * h)
        u = (self.f.alpha(s1) / self.f.alpha(s)) * x - (s1 * math.expm1(r * h)) * e_s
        return u, s1

    def step1(self, x, e_s, s: float, t: float):
        """DPM-Solver-1 (§3.2, k = 1; DDIM): x_t = (α_t/α_s)x − σ_t(e^h − 1)ε̂_s."""
        h = self.f.lam(t) - self.f.lam(s)
        return (self.f.alpha(t) / self.f.alpha(s)) * x - (t * math.expm1(h)) * e_s

    def step2(self, x, e_s, s: float, t: float, r1: float = 0.5):
        """DPM-Solver-2 (Algorithm 1): predictor u₁ at λ_s + r₁h, then
        x_t = (α_t/α_s)x − σ_t(e^h − 1)ε̂_s − σ_t/(2r₁)·(e^h − 1)·(ε̂(u₁) − ε̂_s).
        Returns (x_t, (u₁ stage data for reuse by `step3`))."""
        lam_s = self.f.lam(s)
        h = self.f.lam(t) - lam_s
        u1, s1 = self._stage(x, e_s, s, lam_s, r1, h)
        e1, _ = self.eps(u1, s1)
        x_t = self.step1(x, e_s, s, t) - (t / (2 * r1) * math.expm1(h)) * (e1 - e_s)
        return x_t, e1

    def step3(self, x, e_s, s: float, t: float, r1: float = 1 / 3, r2: float = 2 / 3, e1=None):
        """DPM-Solver-3 (Algorithm 2):
        D₁ = ε̂(u₁) − ε̂_s,
        u₂ = (α_{s2}/α_s)x − σ_{s2}(e^{r₂h} − 1)ε̂_s − σ_{s2}(r₂/r₁)((e^{r₂h} − 1)/(r₂h) − 1)·D₁,
        D₂ = ε̂(u₂) − ε̂_s,
        x_t = (α_t/α_s)x − σ_t(e^h − 1)ε̂_s − (σ_t/r₂)((e^h − 1)/h − 1)·D₂.
        `e1` reuses ε̂(u₁) from a DPM-Solver-2 step with the same r₁ (DPM-Solver-23)."""
        f = self.f
        lam_s = f.lam(s)
        h = f.lam(t) - lam_s
        if e1 is None:
            u1, s1 = self._stage(x, e_s, s, lam_s, r1, h)
            e1, _ = self.eps(u1, s1)
        u2, s2 = self._stage(x, e_s, s, lam_s, r2, h)
        u2 = u2 - (s2 * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1)) * (e1 - e_s)
        e2, _ = self.eps(u2, s2)
        return self.step1(x, e_s, s, t) - (t / r2 * (math.expm1(h) / h - 1)) * (e2 - e_s)

    def step(self, x, e_s, s: float, t: float, order: int):
        if order == 1:
            return self.step1(x, e_s, s, t)
        if order == 2:
            return self.step2(x, e_s, s, t)[0]
        return self.step3(x, e_s, s, t)


def _fast_orders(nfe: int) -> list[int]:
    """DPM-Solver-fast (Lu et al. 2022a, §3.3): K = ⌊N/3⌋ + 1 steps; N mod 3 = 0: [3,…,3,2,1];
    N mod 3 = 1: [3,…,3,1]; N mod 3 = 2: [3,…,3,2]."""
    k = nfe // 3 + 1
    if nfe % 3 == 0:
        return [3] * (k - 2) + [2, 1]
    return [3] * (k - 1) + [nfe % 3]


def _fast_grid(f: ScalarForm, s_max: float, s_min: float, k: int) -> list[float]:
    """σ at k + 1 points uniform in λ from σ_max to σ_min (the step grid of DPM-Solver-fast, §3.3)."""
    lam0, lam1 = f.lam(s_max), f.lam(s_min)
    return [s_max] + [f.sigma(lam0 + (lam1 - lam0) * j / k) for j in range(1, k)] + [s_min]


def _fast_solve(model, x, sigmas, extra_args, callback, disable, f, s_max_t, s_min: float, nfe: int):
    """DPM-Solver-fast from σ_max to σ_min with `nfe` model calls (Lu et al. 2022a, §3.3)."""
    solver = _NoisePredSolver(model, sigmas, extra_args, f)
    orders = _fast_orders(nfe)
    grid = _fast_grid(f, float(s_max_t), s_min, len(orders))
    for i in trange(len(orders), disable):
        s, t = grid[i], grid[i + 1]
        s_t = s_max_t if i == 0 else sigma_tensor(s, sigmas)
        e_s, D = solver.eps(x, s, s_t)
        report(callback, x, i, s_t, s_t, D)
        x = solver.step(x, e_s, s, t, orders[i]) if t != s else x  # σ_max = σ_min: h = 0, x stays
    return x, len(orders)


@torch.no_grad()
def sample_dpm_fast(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver-fast as ComfyUI runs it (its `dpm_fast`): k-diffusion's DPM-Solver-fast (Lu et al.
    2022a, §3.3 with DPM-Solver-1/2/3 of §3.2, Algorithms 1-2), noise-prediction form, steps uniform
    in λ, called with σ_max = σ₀, σ_min = the last positive σ and an NFE budget N = len(sigmas) − 1
    counted on the schedule as given, final 0 included.

    So all N model calls go to the ODE from σ₀ to σ_min and the result is the state at σ_min: a
    schedule ending in 0 is not denoised at the end (the sample keeps noise of size σ_min), and
    sigmas = [σ₀, 0] makes one call and returns x unchanged (σ_min = σ_max). The VE form (α = 1,
    λ = −log σ) is used on the model's own σ for every model, flow included (k-diffusion's
    DPMSolver). `dpm_fast_exact` spends N − 1 calls on the ODE and the last on the final denoise,
    in the model's own noise form.
    """
    extra_args = extra_args or {}
    f = ScalarForm(model, ve=True)
    s_min = float(sigmas[-2] if float(sigmas[-1]) == 0 else sigmas[-1])
    x, _ = _fast_solve(model, x, sigmas, extra_args, callback, disable, f, sigmas[0], s_min, len(sigmas) - 1)
    return x


@torch.no_grad()
def sample_dpm_fast_exact(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver-fast (Lu et al. 2022a, §3.3 with DPM-Solver-1/2/3 of §3.2, Algorithms 1-2) that
    honours a schedule ending in 0, in the model's own noise form (α, λ of flow models).

    Uses only σ₀, the last positive σ (σ_min) and the step count N = len(sigmas) − 1: the ODE is solved
    from σ₀ to σ_min with the paper's order pattern for an NFE budget. If `sigmas` ends in 0 the budget
    is N − 1 ODE evaluations plus one final denoise x = D(x, σ_min) (the DPM-Solver "denoise_to_zero"
    option), so the model is called exactly N times either way; for sigmas = [σ₀, 0] that is D(x, σ₀).
    Without a final 0 it equals `dpm_fast` (for VE models).
    """
    extra_args = extra_args or {}
    f = ScalarForm(model)
    sigmas = first_sigma_for_log_snr(sigmas, f.flow, model)
    ends0 = float(sigmas[-1]) == 0
    s_min_t = sigmas[-2] if ends0 else sigmas[-1]
    nfe = len(sigmas) - 2 if ends0 else len(sigmas) - 1
    steps = 0
    if nfe > 0:
        x, steps = _fast_solve(
            model, x, sigmas, extra_args, callback, disable, f, sigmas[0], float(s_min_t), nfe
        )
    if ends0:
        D = call_model(model, x, s_min_t, extra_args)
        report(callback, x, steps, s_min_t, s_min_t, D)
        x = D
    return x


class _StepController:
    """PID step-size control (Söderlind 2003, "Digital filters in adaptive time-stepping";
    Söderlind & Wang 2006 for the limiter ρ(u) = 1 + atan(u − 1)):

        h ← h·ρ(ε_n^{β₁}·ε_{n−1}^{β₂}·ε_{n−2}^{β₃}),  ε = 1/E,
        β₁ = (k_P + k_I + k_D)/k,  β₂ = −(k_P + 2k_D)/k,  β₃ = k_D/k,

    accepting the step when ρ ≥ accept_safety. k_I = 1 alone is the paper's h ← h·E^{−1/k}
    (Lu et al. 2022a, Appendix C, after Jolicoeur-Martineau et al. 2021; there with a safety factor
    θ = 0.9, here accept_safety = 0.81 = θ²).
    """

    def __init__(self, h, pcoeff, icoeff, dcoeff, order, accept_safety, eps=1e-8):
        self.h = h
        self.b = ((pcoeff + icoeff + dcoeff) / order, -(pcoeff + 2 * dcoeff) / order, dcoeff / order)
        self.accept_safety, self.eps = accept_safety, eps
        self.inv = None  # [ε_n, ε_{n−1}, ε_{n−2}]

    def propose(self, err: float) -> bool:
        inv = 1 / (err + self.eps)
        if self.inv is None:
            self.inv = [inv, inv, inv]
        self.inv[0] = inv
        u = math.prod(e**b for e, b in zip(self.inv, self.b, strict=True))
        factor = 1 + math.atan(u - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.inv = [inv, self.inv[0], self.inv[1]]
        self.h *= factor
        return accept


_ADAPTIVE_MAX_ATTEMPTS = 100_000


def _dpm_adaptive(model, x, sigmas, extra_args, callback, disable, comfy, order, rtol, atol, h_init, pcoeff,
                  icoeff, dcoeff, accept_safety, eta, s_noise, noise_sampler, seed, return_info):  # fmt: skip
    if order not in (2, 3):
        raise ValueError(f"dpm_adaptive: order must be 2 or 3, got {order}")
    extra_args = extra_args or {}
    f = ScalarForm(model, ve=comfy)
    if not comfy:
        sigmas = first_sigma_for_log_snr(sigmas, f.flow, model)
    noise = LazyNoise(x, sigmas, noise_sampler, seed, brownian=False, cpu=True)
    pos = sigmas[sigmas > 0]
    s_min_t = pos[-1]
    s_max, s_min = float(sigmas[0]), float(s_min_t)
    lam_s, lam_end = f.lam(s_max), f.lam(s_min)
    solver = _NoisePredSolver(model, sigmas, extra_args, f)
    ctrl = _StepController(h_init, pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    info = {"nfe": 0, "n_accept": 0, "n_reject": 0, "steps": [s_max]}
    s, x_prev, e_s, D_s = s_max, x, None, None
    attempts = 0
    while lam_s < lam_end - 1e-5 if comfy else lam_s < lam_end:
        attempts += 1
        if attempts > _ADAPTIVE_MAX_ATTEMPTS:
            raise RuntimeError(
                f"dpm_adaptive: no convergence after {attempts - 1} attempts (h = {ctrl.h:.3g})"
            )
        if e_s is None:
            e_s, D_s = solver.eps(x, s, sigmas[0] if s == s_max else sigma_tensor(s, sigmas))
        lam_t = lam_s + ctrl.h
        if comfy:  # k-diffusion: t = min(t_end, s + h), the loop stops within 1e-5 of t_end
            lam_t = min(lam_t, lam_end)
            t = s_min if lam_t == lam_end else f.sigma(lam_t)
        elif lam_end - lam_t < 1e-5:  # snap the last step onto σ_min
            lam_t, t = lam_end, s_min
        else:
            t = f.sigma(lam_t)
        t_down, t_up, scale = f.ancestral(s, t, eta) if eta else (t, 0.0, 1.0)
        if comfy and t_down < s_min:  # k-diffusion clamps the step target to σ_min, noise to √(σ_t² − σ_min²)
            t_down, t_up = s_min, math.sqrt(max(t * t - s_min * s_min, 0.0))
        if order == 2:
            x_low = solver.step1(x, e_s, s, t_down)
            x_high, _ = solver.step2(x, e_s, s, t_down, r1=0.5)
        else:
            x_low, e1 = solver.step2(x, e_s, s, t_down, r1=1 / 3)
            x_high = solver.step3(x, e_s, s, t_down, e1=e1)
        wide = torch.promote_types(x.dtype, torch.float32)  # the error norm in x's dtype, at least float32
        delta = torch.maximum(x_low.abs(), x_prev.abs()).to(wide).mul(rtol).clamp_min(atol)
        scaled = (x_low - x_high).to(wide) / delta
        if comfy:  # k-diffusion: RMS over the whole batch
            err = scaled.square().mean().sqrt()
        else:  # the worst image's RMS: no image is judged by the others
            err = scaled.reshape(x.shape[0], -1).square().mean(1).sqrt().max()
        if ctrl.propose(float(err)):
            report(callback, x, info["n_accept"], sigma_tensor(s, sigmas), sigma_tensor(s, sigmas), D_s)
            x_prev, x = x_low, x_high
            if t_up > 0:
                x = scale * x + noise(sigma_tensor(s, sigmas), sigma_tensor(t, sigmas)) * (s_noise * t_up)
            s, lam_s, e_s = t, lam_t, None
            info["n_accept"] += 1
            info["steps"].append(t)
        else:
            info["n_reject"] += 1
    if float(sigmas[-1]) == 0 and not comfy:
        D = call_model(model, x, s_min_t, extra_args)
        solver.nfe += 1
        report(callback, x, info["n_accept"], s_min_t, s_min_t, D)
        x = D
    info["nfe"] = solver.nfe
    return (x, info) if return_info else x


@torch.no_grad()
def sample_dpm_adaptive(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    order=3,
    rtol=0.05,
    atol=0.0078,
    h_init=0.05,
    pcoeff=0.0,
    icoeff=1.0,
    dcoeff=0.0,
    accept_safety=0.81,
    eta=0.0,
    s_noise=1.0,
    noise_sampler=None,
    seed=None,
    return_info=False,
):
    """Adaptive step size DPM-Solver-12 / -23 as ComfyUI runs it (its `dpm_adaptive`: k-diffusion's
    DPM-Solver-adaptive between σ₀ and the last positive σ; see `sample_dpm_adaptive_exact` for the
    method and its options).

    Where it differs from `dpm_adaptive_exact`: the result is the state at σ_min (a schedule ending
    in 0 is not denoised at the end); the error norm is the RMS over the whole batch; the VE form
    (α = 1, λ = −log σ) is used on the model's own σ for every model; the loop ends once λ is within
    1e-5 of λ(σ_min); with eta > 0 a step whose σ_down falls below σ_min is clamped to σ_min.
    ε̂ at a step's start is reused across rejected attempts (k-diffusion recomputes it: the same
    numbers, fewer model calls).
    """
    return _dpm_adaptive(
        model, x, sigmas, extra_args, callback, disable, True, order, rtol, atol, h_init, pcoeff, icoeff,
        dcoeff, accept_safety, eta, s_noise, noise_sampler, seed, return_info,
    )  # fmt: skip


@torch.no_grad()
def sample_dpm_adaptive_exact(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    order=3,
    rtol=0.05,
    atol=0.0078,
    h_init=0.05,
    pcoeff=0.0,
    icoeff=1.0,
    dcoeff=0.0,
    accept_safety=0.81,
    eta=0.0,
    s_noise=1.0,
    noise_sampler=None,
    seed=None,
    return_info=False,
):
    """Adaptive step size DPM-Solver-12 (order=2) / DPM-Solver-23 (order=3) (Lu et al. 2022a, §3.3 and
    Appendix C; error control after Jolicoeur-Martineau et al. 2021, "Gotta go fast"), noise-prediction
    form, from σ₀ to the smallest positive σ in λ, in the model's own noise form (α, λ of flow models).

    Each attempt from λ_s to λ_t = λ_s + h computes a lower- and a higher-order solution sharing their
    model calls (DPM-Solver-1 / -2 with r₁ = ½, or DPM-Solver-2 / -3 with r₁ = ⅓, r₂ = ⅔),
    δ = max(atol, rtol·max(|x_low|, |x_prev|)), E = max over the batch of RMS((x_low − x_high)/δ),
    and the step size is set by `_StepController` (defaults k_I = 1: the paper's h·E^{−1/k}).
    ε̂ at the step start is reused across rejected attempts. An accepted step keeps x_high.
    eta > 0: each accepted step goes to σ_down and adds σ_up·s_noise of fresh noise (ancestral split of
    common.get_ancestral_step); the controller then uses exponent 1/1.5 (strong order of the SDE step).
    If `sigmas` ends in 0, finishes with x = D(x, σ_min). return_info=True returns (x, info) with
    info = {"nfe", "n_accept", "n_reject", "steps"} (steps: accepted σ's, then σ_min).
    """
    return _dpm_adaptive(
        model, x, sigmas, extra_args, callback, disable, False, order, rtol, atol, h_init, pcoeff, icoeff,
        dcoeff, accept_safety, eta, s_noise, noise_sampler, seed, return_info,
    )  # fmt: skip


SAMPLERS = {
    "dpm_fast": sample_dpm_fast,
    "dpm_adaptive": sample_dpm_adaptive,
}
# Our own variants, each more accurate than the ComfyUI name it departs from (see their docstrings).
EXACT_SAMPLERS = {
    "dpm_fast_exact": sample_dpm_fast_exact,
    "dpm_adaptive_exact": sample_dpm_adaptive_exact,
}
