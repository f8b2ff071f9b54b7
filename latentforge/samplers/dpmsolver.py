"""DPM-Solver family: exponential integrators of the probability-flow ODE (and its SDE) in λ.

Written from
- Lu et al. 2022a, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling in Around
  10 Steps" (NeurIPS 2022): noise-prediction DPM-Solver-1/2/3 (§3.2, Algorithms 1-2), the
  DPM-Solver-fast step schedule and adaptive step size DPM-Solver-12/23 (§3.3 and Appendix C);
- Lu et al. 2022b, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models"
  (arXiv 2211.01095): data-prediction single-step DPM-Solver++(2S) (Algorithm 1), multistep
  DPM-Solver++(2M) (Algorithm 2) and SDE-DPM-Solver++ (§5 / Appendix, Eq. for x_t given x_s with
  weight 2e^{-2(λ_t - λ)});
- Chung et al. 2024 (CFG++) for the `_cfg_pp` forms.

Conventions (see common.py): the model's coordinates are x = α(σ)·x₀ + σ·ε, λ = log(α/σ) the half
log-SNR, h = λ_t − λ_s > 0 for a step from σ_s to σ_t < σ_s, and D(x, σ) = x̂₀. α = 1 for VE models
(λ = −log σ) and α = 1 − σ for rectified flow. The two exact propagators used throughout are

    data prediction:   x_t = (σ_t/σ_s)·x_s + α_t·∫_{λ_s}^{λ_t} e^{−(λ_t − λ)} D dλ
                           = (σ_t/σ_s)·x_s + α_t·(1 − e^{−h})·D            (D constant)
    noise prediction:  x_t = (α_t/α_s)·x_s − σ_t·∫_{λ_s}^{λ_t} e^{λ_t − λ} ε̂ dλ
                           = (α_t/α_s)·x_s − σ_t·(e^{h} − 1)·ε̂              (ε̂ constant)

with ε̂ = (x − α·D)/σ. All step coefficients are computed as Python floats (double precision) from the
schedule, so x keeps its own dtype (float32, float64 or bfloat16).
"""

from __future__ import annotations

import functools
import math

import torch

from latentforge.samplers.common import (
    denoise_with_uncond,
    first_sigma_for_log_snr,
    get_ancestral_step,
    half_log_snr,
    is_flow,
    make_noise_sampler,
    report,
    sigma_from_half_log_snr,
    svec,
    trange,
)

# --- scalar helpers ---------------------------------------------------------------------------


class _Form:
    """α(σ), λ(σ) and σ(λ) of the model's noise form, as Python floats (float64 math)."""

    def __init__(self, model):
        self.flow = is_flow(model)

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


def _e1(H: float) -> float:
    """1 − e^{−H}."""
    return -math.expm1(-H)


def _i1(h: float, c: float) -> float:
    """∫_0^h c·e^{−c(h−τ)}·τ dτ = h·(1 − (1 − e^{−H})/H), H = c·h (series for small H)."""
    H = c * h
    if abs(H) < 1e-3:
        return h * (H / 2 - H**2 / 6 + H**3 / 24)
    return h * (1 - _e1(H) / H)


def _i2_half(h: float, c: float) -> float:
    """½∫_0^h c·e^{−c(h−τ)}·τ² dτ = h²·(½ − 1/H + (1 − e^{−H})/H²), H = c·h (series for small H)."""
    H = c * h
    if abs(H) < 1e-3:
        return h * h * (H / 6 - H**2 / 24 + H**3 / 120)
    return h * h * (0.5 - 1 / H + _e1(H) / H**2)


def _sig(v: float, sigmas: torch.Tensor) -> torch.Tensor:
    """An intermediate σ as a 0-d tensor in the schedule's dtype, for model and noise-sampler calls."""
    return torch.tensor(v, dtype=sigmas.dtype, device=sigmas.device)


def _call(model, x, sigma: torch.Tensor, extra_args):
    return model(x, svec(sigma, x), **extra_args)


class _LazyNoise:
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


def _dpmpp_1(f: _Form, x, D, s: float, t: float):
    """First-order DPM-Solver++ (= DDIM; Lu et al. 2022b, §4 with k = 1):
    x_t = (σ_t/σ_s)x + α_t(1 − e^{−h})D, and x = D at σ_t = 0."""
    if t == 0:
        return D
    h = f.lam(t) - f.lam(s)
    return (t / s) * x + (f.alpha(t) * _e1(h)) * D


# --- DPM-Solver (noise prediction): fast and adaptive -------------------------------------------


class _NoisePredSolver:
    """DPM-Solver-1/2/3 (Lu et al. 2022a, §3.2 and Algorithms 1-2) in the model's own α, σ, λ.

    `eps(x, σ)` evaluates ε̂ = (x − α·D)/σ; every method takes ε̂ at the step start (`e_s`).
    """

    def __init__(self, model, sigmas, extra_args, form: _Form):
        self.model, self.sigmas, self.extra_args, self.f = model, sigmas, extra_args, form
        self.nfe = 0

    def eps(self, x, s: float, sigma_t: torch.Tensor | None = None):
        """(ε̂, D) at σ = s."""
        D = _call(self.model, x, sigma_t if sigma_t is not None else _sig(s, self.sigmas), self.extra_args)
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


@torch.no_grad()
def sample_dpm_fast(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver-fast (Lu et al. 2022a, §3.3 with DPM-Solver-1/2/3 of §3.2, Algorithms 1-2),
    noise-prediction form, steps uniform in λ.

    Uses only σ₀, the last positive σ (σ_min) and the step count N = len(sigmas) − 1: the ODE is solved
    from σ₀ to σ_min with the paper's order pattern for an NFE budget. If `sigmas` ends in 0 the budget
    is N − 1 ODE evaluations plus one final denoise x = D(x, σ_min) (the DPM-Solver "denoise_to_zero"
    option), so the model is called exactly N times either way; for sigmas = [σ₀, 0] that is D(x, σ₀).
    """
    extra_args = extra_args or {}
    f = _Form(model)
    sigmas = first_sigma_for_log_snr(sigmas, f.flow)
    n = len(sigmas) - 1
    ends0 = float(sigmas[-1]) == 0
    s_max = float(sigmas[0])
    s_min_t = sigmas[-2] if ends0 else sigmas[-1]
    s_min = float(s_min_t)
    nfe = n - 1 if ends0 else n
    solver = _NoisePredSolver(model, sigmas, extra_args, f)
    if nfe > 0:
        orders = _fast_orders(nfe)
        lam0, lam1 = f.lam(s_max), f.lam(s_min)
        lams = [lam0 + (lam1 - lam0) * k / len(orders) for k in range(len(orders) + 1)]
        grid = [s_max] + [f.sigma(v) for v in lams[1:-1]] + [s_min]
        for i in trange(len(orders), disable):
            s, t = grid[i], grid[i + 1]
            s_t = sigmas[0] if i == 0 else _sig(s, sigmas)
            e_s, D = solver.eps(x, s, s_t)
            report(callback, x, i, s_t, s_t, D)
            x = solver.step(x, e_s, s, t, orders[i])
    if ends0:
        D = _call(model, x, s_min_t, extra_args)
        report(callback, x, len(_fast_orders(nfe)) if nfe else 0, s_min_t, s_min_t, D)
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
    """Adaptive step size DPM-Solver-12 (order=2) / DPM-Solver-23 (order=3) (Lu et al. 2022a, §3.3 and
    Appendix C; error control after Jolicoeur-Martineau et al. 2021, "Gotta go fast"), noise-prediction
    form, from σ₀ to the smallest positive σ in λ.

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
    if order not in (2, 3):
        raise ValueError(f"dpm_adaptive: order must be 2 or 3, got {order}")
    extra_args = extra_args or {}
    f = _Form(model)
    sigmas = first_sigma_for_log_snr(sigmas, f.flow)
    noise = _LazyNoise(x, sigmas, noise_sampler, seed, brownian=False, cpu=True)
    pos = sigmas[sigmas > 0]
    s_min_t = pos[-1]
    s_max, s_min = float(sigmas[0]), float(s_min_t)
    lam_s, lam_end = f.lam(s_max), f.lam(s_min)
    solver = _NoisePredSolver(model, sigmas, extra_args, f)
    ctrl = _StepController(h_init, pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    info = {"nfe": 0, "n_accept": 0, "n_reject": 0, "steps": [s_max]}
    s, x_prev, e_s, D_s = s_max, x, None, None
    attempts = 0
    while lam_s < lam_end:
        attempts += 1
        if attempts > _ADAPTIVE_MAX_ATTEMPTS:
            raise RuntimeError(
                f"dpm_adaptive: no convergence after {attempts - 1} attempts (h = {ctrl.h:.3g})"
            )
        if e_s is None:
            e_s, D_s = solver.eps(x, s, sigmas[0] if s == s_max else _sig(s, sigmas))
        lam_t = lam_s + ctrl.h
        if lam_end - lam_t < 1e-5:  # snap the last step onto σ_min
            lam_t, t = lam_end, s_min
        else:
            t = f.sigma(lam_t)
        t_down, t_up, scale = f.ancestral(s, t, eta) if eta else (t, 0.0, 1.0)
        if order == 2:
            x_low = solver.step1(x, e_s, s, t_down)
            x_high, _ = solver.step2(x, e_s, s, t_down, r1=0.5)
        else:
            x_low, e1 = solver.step2(x, e_s, s, t_down, r1=1 / 3)
            x_high = solver.step3(x, e_s, s, t_down, e1=e1)
        delta = torch.maximum(x_low.abs(), x_prev.abs()).float().mul(rtol).clamp_min(atol)
        err = ((x_low - x_high).float() / delta).reshape(x.shape[0], -1).square().mean(1).sqrt().max()
        if ctrl.propose(float(err)):
            report(callback, x, info["n_accept"], _sig(s, sigmas), _sig(s, sigmas), D_s)
            x_prev, x = x_low, x_high
            if t_up > 0:
                x = scale * x + noise(_sig(s, sigmas), _sig(t, sigmas)) * (s_noise * t_up)
            s, lam_s, e_s = t, lam_t, None
            info["n_accept"] += 1
            info["steps"].append(t)
        else:
            info["n_reject"] += 1
    if float(sigmas[-1]) == 0:
        D = _call(model, x, s_min_t, extra_args)
        solver.nfe += 1
        report(callback, x, info["n_accept"], s_min_t, s_min_t, D)
        x = D
    info["nfe"] = solver.nfe
    return (x, info) if return_info else x


# --- DPM-Solver++ (data prediction) -----------------------------------------------------------


def _dpmpp_2s_ancestral(
    model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, seed, cfg_pp
):
    """Shared body of dpmpp_2s_ancestral and its CFG++ form (see their docstrings)."""
    extra_args = extra_args or {}
    f = _Form(model)
    sigmas = first_sigma_for_log_snr(sigmas, f.flow)
    noise = _LazyNoise(x, sigmas, noise_sampler, seed, brownian=False, cpu=True)
    for i in trange(len(sigmas) - 1, disable):
        s, t = float(sigmas[i]), float(sigmas[i + 1])
        if cfg_pp:
            D, U = denoise_with_uncond(model, x, sigmas[i], extra_args)
        else:
            D = U = _call(model, x, sigmas[i], extra_args)
        report(callback, x, i, sigmas[i], sigmas[i], D)
        t_down, t_up, scale = f.ancestral(s, t, eta)
        if t_down == 0:
            x = D
        else:
            # CFG++: carry x̃ = x + α_s(D − U), i.e. re-noise along the unconditional ε̂ (see 2m_cfg_pp).
            xc = x + f.alpha(s) * (D - U) if cfg_pp else x
            lam_s = f.lam(s)
            m = f.sigma(lam_s + 0.5 * (f.lam(t_down) - lam_s))  # midpoint in λ (r = ½)
            u = _dpmpp_1(f, xc, D, s, m)
            D2 = _call(model, u, _sig(m, sigmas), extra_args)
            x = _dpmpp_1(f, xc, D2, s, t_down)
        if t > 0 and t_up > 0:
            x = scale * x + noise(sigmas[i], sigmas[i + 1]) * (s_noise * t_up)
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
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
    """DPM-Solver++(2S) (Lu et al. 2022b, Algorithm 1 with r = ½) stepping to σ_down, then ancestral noise.

    With h = λ(σ_down) − λ(σ_i) and σ_m = σ(λ_i + h/2):
        u = (σ_m/σ_i)x + α_m(1 − e^{−h/2})D(x, σ_i),
        x ← (σ_down/σ_i)x + α_down(1 − e^{−h})D(u, σ_m),
    then x ← scale·x + σ_up·s_noise·z (DDIM split, flow-aware via common.get_ancestral_step).
    σ_down = 0 gives x = D. eta = 0 is the deterministic second-order DPM-Solver++(2S).
    """
    return _dpmpp_2s_ancestral(
        model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, seed, False
    )


@torch.no_grad()
def sample_dpmpp_2s_ancestral_cfg_pp(
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
    """CFG++ (Chung et al. 2024) form of DPM-Solver++(2S) ancestral (Lu et al. 2022b, Algorithm 1, r = ½).

    x̂₀ is the guided D, the noise direction the unconditional one: the carried state is
    x̃ = x + α_i(D − D_uncond) (so the first-order step is α_t·D + σ_t·ε̂_uncond); the midpoint model
    call uses the guided prediction. Equal to `dpmpp_2s_ancestral` when D = D_uncond.
    """
    return _dpmpp_2s_ancestral(
        model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, seed, True
    )


@torch.no_grad()
def sample_dpmpp_sde(
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
    r=0.5,
    brownian_cpu=True,
):
    """DPM-Solver++ SDE: DPM-Solver++(2S) (Lu et al. 2022b, Algorithm 1 with ratio r) whose two
    first-order sub-steps are each split into a deterministic step to σ_down plus σ_up of noise
    (DDIM split), with increments from one Brownian tree (2 NFE per step).

    λ_m = λ_i + r·h (h = λ_{i+1} − λ_i), σ_m = σ(λ_m):
        u = scale·[(σ'_m/σ_i)x + α'_m(1 − e^{−h'})D_i] + σ_up·s_noise·W(σ_i→σ_m)
        D̄ = (1 − 1/(2r))·D_i + 1/(2r)·D(u, σ_m)
        x ← scale·[(σ'/σ_i)x + α'(1 − e^{−h''})D̄] + σ_up·s_noise·W(σ_i→σ_{i+1})
    where σ'_m, σ' are the σ_down of the splits σ_i→σ_m and σ_i→σ_{i+1} (h', h'' their λ steps).
    The last step to σ = 0 is x = D_i. eta = 0 is DPM-Solver++(2S) itself.
    `brownian_cpu=False` (the `_gpu` name) builds the tree on x's device.
    """
    extra_args = extra_args or {}
    f = _Form(model)
    sigmas = first_sigma_for_log_snr(sigmas, f.flow)
    noise = _LazyNoise(x, sigmas, noise_sampler, seed, brownian=True, cpu=brownian_cpu)
    fac = 1 / (2 * r)
    for i in trange(len(sigmas) - 1, disable):
        s, t = float(sigmas[i]), float(sigmas[i + 1])
        D = _call(model, x, sigmas[i], extra_args)
        report(callback, x, i, sigmas[i], sigmas[i], D)
        if t == 0:
            x = D
            continue
        lam_s = f.lam(s)
        m = f.sigma(lam_s + r * (f.lam(t) - lam_s))
        m_t = _sig(m, sigmas)
        # stage 1: σ_i → σ_m
        m_down, m_up, m_scale = f.ancestral(s, m, eta)
        u = m_scale * _dpmpp_1(f, x, D, s, m_down)
        if m_up > 0:
            u = u + noise(sigmas[i], m_t) * (s_noise * m_up)
        D2 = _call(model, u, m_t, extra_args)
        # stage 2: σ_i → σ_{i+1} with the combined data prediction
        t_down, t_up, t_scale = f.ancestral(s, t, eta)
        x = t_scale * _dpmpp_1(f, x, (1 - fac) * D + fac * D2, s, t_down)
        if t_up > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * (s_noise * t_up)
    return x


def _dpmpp_2m(model, x, sigmas, extra_args, callback, disable, cfg_pp):
    extra_args = extra_args or {}
    f = _Form(model)
    sigmas = first_sigma_for_log_snr(sigmas, f.flow)
    D_prev, h_prev = None, None
    for i in trange(len(sigmas) - 1, disable):
        s, t = float(sigmas[i]), float(sigmas[i + 1])
        if cfg_pp:
            D, U = denoise_with_uncond(model, x, sigmas[i], extra_args)
        else:
            D = U = _call(model, x, sigmas[i], extra_args)
        report(callback, x, i, sigmas[i], sigmas[i], D)
        if t == 0:
            x = D
            continue
        h = f.lam(t) - f.lam(s)
        if D_prev is None:
            Dd = D
        else:  # Algorithm 2: r = h_{i−1}/h_i, D̄ = (1 + 1/(2r))·D_i − 1/(2r)·D_{i−1}
            c = h / (2 * h_prev)
            Dd = (1 + c) * D - c * D_prev
        xc = x + f.alpha(s) * (D - U) if cfg_pp else x
        x = (t / s) * xc + (f.alpha(t) * _e1(h)) * Dd
        D_prev, h_prev = D, h
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2), 1 NFE per step:
        x_{i+1} = (σ_{i+1}/σ_i)·x_i + α_{i+1}(1 − e^{−h_i})·D̄_i,
        D̄_i = (1 + 1/(2r_i))·D_i − 1/(2r_i)·D_{i−1},  r_i = h_{i−1}/h_i  (D̄_0 = D_0),
    and x = D_i on a final step to σ = 0. The first step is DDIM, i.e. Euler in σ."""
    return _dpmpp_2m(model, x, sigmas, extra_args, callback, disable, False)


@torch.no_grad()
def sample_dpmpp_2m_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """CFG++ (Chung et al. 2024) form of DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2).

    The first-order CFG++ step is x_{i+1} = α_{i+1}·D_i + σ_{i+1}·ε̂_uncond with
    ε̂_uncond = (x − α_i·D_uncond)/σ_i; in the exponential-integrator form that is the DPM-Solver++ step
    applied to x̃_i = x_i + α_i(D_i − D_uncond,i). The multistep correction uses the guided D's.
    Equal to `dpmpp_2m` when D = D_uncond; its first step equals `euler_cfg_pp`'s.
    """
    return _dpmpp_2m(model, x, sigmas, extra_args, callback, disable, True)


@torch.no_grad()
def sample_dpmpp_2m_sde(
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
    solver_type="midpoint",
    brownian_cpu=True,
):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022b, §5/Appendix: SDE-DPM-Solver++(2M)), generalised by eta.

    The variance-controlled reverse SDE integrates exactly to
        x_t = (σ_t/σ_s)e^{−ηh}·x_s + α_t∫_0^h c·e^{−c(h−τ)}·D(λ_s + τ)dτ + σ_t√(1 − e^{−2ηh})·z,  c = 1 + η
    (η = 1: the paper's SDE with weight 2e^{−2(λ_t−λ)}; η = 0: the ODE). With D constant this is
        x ← (σ_{i+1}/σ_i)e^{−ηh}·x + α_{i+1}(1 − e^{−ch})·D_i + σ_{i+1}√(1 − e^{−2ηh})·s_noise·W,
    and with a history D_{i−1} (r = h_{i−1}/h) a first-difference correction is added:
        midpoint (the paper's):  + α_{i+1}·½(1 − e^{−ch})·(D_i − D_{i−1})/r
        heun (exact integral of the linear interpolant): + α_{i+1}·(1 − (1 − e^{−ch})/(ch))·(D_i − D_{i−1})/r.
    W are normalised Brownian-tree increments; the last step to σ = 0 is x = D_i.
    eta = 0 with midpoint equals `dpmpp_2m`.
    """
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    return _multistep_sde(
        model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, seed, brownian_cpu,
        order=2, solver_type=solver_type,
    )  # fmt: skip


@torch.no_grad()
def sample_dpmpp_2m_sde_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
    """`dpmpp_2m_sde` with solver_type='heun' (exact integral of the linear interpolant of D in λ)."""
    options.setdefault("solver_type", "heun")
    return sample_dpmpp_2m_sde(model, x, sigmas, extra_args, callback, disable, **options)


@torch.no_grad()
def sample_dpmpp_3m_sde(
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
    brownian_cpu=True,
):
    """SDE-DPM-Solver++(3M): the third-order multistep extension of SDE-DPM-Solver++(2M)
    (Lu et al. 2022b, §4.2 multistep idea and §5 SDE form), generalised by eta.

    D(λ) is replaced by its quadratic interpolant p through (λ_{i−2}, λ_{i−1}, λ_i) and the SDE integral
    of `dpmpp_2m_sde` is taken exactly (c = 1 + η, H = c·h):
        x ← (σ_{i+1}/σ_i)e^{−ηh}x + α_{i+1}[(1 − e^{−H})D_i + I₁·p'(λ_i) + ½I₂·p'']
            + σ_{i+1}√(1 − e^{−2ηh})·s_noise·W,
        I₁ = h(1 − (1 − e^{−H})/H),   ½I₂ = h²(½ − 1/H + (1 − e^{−H})/H²),
    with divided differences p'(λ_i) = D[i,i−1] + D[i,i−1,i−2]·h_{i−1}, p'' = 2·D[i,i−1,i−2].
    The first steps use the linear (one history) and constant interpolants; the last step to 0 is x = D_i.
    """
    return _multistep_sde(
        model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, seed, brownian_cpu,
        order=3, solver_type="heun",
    )  # fmt: skip


def _multistep_sde(
    model,
    x,
    sigmas,
    extra_args,
    callback,
    disable,
    eta,
    s_noise,
    noise_sampler,
    seed,
    brownian_cpu,
    order,
    solver_type,
):
    extra_args = extra_args or {}
    f = _Form(model)
    sigmas = first_sigma_for_log_snr(sigmas, f.flow)
    noise = _LazyNoise(x, sigmas, noise_sampler, seed, brownian=True, cpu=brownian_cpu)
    c = 1.0 + eta
    hist: list[tuple[torch.Tensor, float]] = []  # (D_j, λ_j), newest last
    for i in trange(len(sigmas) - 1, disable):
        s, t = float(sigmas[i]), float(sigmas[i + 1])
        D = _call(model, x, sigmas[i], extra_args)
        report(callback, x, i, sigmas[i], sigmas[i], D)
        if t == 0:
            x = D
            continue
        lam_s, lam_t = f.lam(s), f.lam(t)
        h = lam_t - lam_s
        a_t = f.alpha(t)
        x = (t / s * math.exp(-eta * h)) * x + (a_t * _e1(c * h)) * D
        if hist:
            D1, l1 = hist[-1]
            d1 = (D - D1) / (lam_s - l1)  # D[i, i−1]
            if order == 3 and len(hist) >= 2:
                D2, l2 = hist[-2]
                d2 = (d1 - (D1 - D2) / (l1 - l2)) / (lam_s - l2)  # D[i, i−1, i−2]
                x = x + (a_t * _i1(h, c)) * (d1 + (lam_s - l1) * d2) + (a_t * 2 * _i2_half(h, c)) * d2
            elif solver_type == "midpoint":
                x = x + (a_t * 0.5 * _e1(c * h) * h) * d1
            else:
                x = x + (a_t * _i1(h, c)) * d1
        if eta:
            x = x + noise(sigmas[i], sigmas[i + 1]) * (t * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise)
        hist = (hist + [(D, lam_s)])[-2:]
    return x


def _on_device_tree(fn, name):
    """The `_gpu` name: the same sampler with its Brownian tree built on x's device (ComfyUI's naming)."""

    @functools.wraps(fn)
    def run(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        options.setdefault("brownian_cpu", False)
        return fn(model, x, sigmas, extra_args, callback, disable, **options)

    run.__name__ = run.__qualname__ = name
    run.__doc__ = (
        f"`{fn.__name__}` with the Brownian tree on x's device (brownian_cpu=False).\n\n{fn.__doc__}"
    )
    return run


sample_dpmpp_sde_gpu = _on_device_tree(sample_dpmpp_sde, "sample_dpmpp_sde_gpu")
sample_dpmpp_2m_sde_gpu = _on_device_tree(sample_dpmpp_2m_sde, "sample_dpmpp_2m_sde_gpu")
sample_dpmpp_2m_sde_heun_gpu = _on_device_tree(sample_dpmpp_2m_sde_heun, "sample_dpmpp_2m_sde_heun_gpu")
sample_dpmpp_3m_sde_gpu = _on_device_tree(sample_dpmpp_3m_sde, "sample_dpmpp_3m_sde_gpu")


SAMPLERS = {
    "dpm_fast": sample_dpm_fast,
    "dpm_adaptive": sample_dpm_adaptive,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_2s_ancestral_cfg_pp": sample_dpmpp_2s_ancestral_cfg_pp,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_sde_gpu": sample_dpmpp_sde_gpu,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_cfg_pp": sample_dpmpp_2m_cfg_pp,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_gpu": sample_dpmpp_2m_sde_gpu,
    "dpmpp_2m_sde_heun": sample_dpmpp_2m_sde_heun,
    "dpmpp_2m_sde_heun_gpu": sample_dpmpp_2m_sde_heun_gpu,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "dpmpp_3m_sde_gpu": sample_dpmpp_3m_sde_gpu,
}
