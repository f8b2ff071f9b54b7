"""Stochastic exponential solvers of the diffusion SDE family: ER-SDE, SEEDS and SA-Solver.

All three integrate, in data-prediction form, a reverse SDE whose marginals equal the PF-ODE's.
Work in VE-normalised coordinates y = x/α, v = σ/α = e^{−λ} (λ = log(α/σ), the half log-SNR;
α = 1 for VE/VP models, α = 1 − σ for rectified flow, common.half_log_snr). The SDE family used by
SEEDS and SA-Solver, with stochasticity η ≥ 0 (η = τ² in SA-Solver, η = 1 is the full reverse SDE),
    dy = (1 + η)(y − D)/v · dv + √(2ηv) dW_v,
has the exact variation-of-constants solution over a step λ_s → λ_t (h = λ_t − λ_s, c = 1 + η)
    y_t = e^{−ch}·y_s + c∫_{λ_s}^{λ_t} e^{−c(λ_t−λ)} D(λ) dλ + v_t √(1 − e^{−2ηh})·z,
which in the model's own coordinates x = α·y reads
    x_t = (σ_t/σ_s)·e^{−ηh}·x_s + α_t·c∫ e^{−c(λ_t−λ)} D dλ + σ_t √(1 − e^{−2ηh})·z.
η = 0 is the PF-ODE (DPM-Solver++ form, Lu et al. 2022b, Eq. 9).

Flow models: the first σ = 1 has λ = −∞, so it is moved to 0.9999 (common.first_sigma_for_log_snr)
and used so for the model call too. Every sampler returns x = D on a final step to σ = 0.

Noise: ComfyUI's names draw i.i.d. noise per call, as ComfyUI does (seeded per image,
common.make_noise_sampler); the `_exact` variants (er_sde_exact, sa_solver_exact,
sa_solver_pece_exact) take increments of a seeded Brownian tree in σ (trees on the CPU). Where one
step needs several Gaussians (SEEDS stages) they are drawn for disjoint σ sub-intervals, in order.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from latentforge.samplers.common import (
    LazyNoise,
    first_sigma_for_log_snr,
    gauss_legendre,
    half_log_snr,
    is_flow,
    lagrange_integrals,
    model_sampling_of,
    one_minus_exp_neg,
    phi,
    report,
    sigma_from_half_log_snr,
    svec,
    trange,
)


class _Schedule:
    """Per-step scalars (Python floats, float64) in the model's noise form."""

    def __init__(self, model, sigmas: torch.Tensor):
        self.flow = is_flow(model)
        self.sigmas = first_sigma_for_log_snr(sigmas, self.flow, model)  # the σ the model sees
        s = self.sigmas.detach().to("cpu", torch.float64)
        self.sig = [float(v) for v in s]
        self.lam = [
            float(v) if float(si) > 0 else math.inf
            for v, si in zip(half_log_snr(s, self.flow), s, strict=True)
        ]

    def alpha(self, i_or_sigma) -> float:
        s = self.sig[i_or_sigma] if isinstance(i_or_sigma, int) else float(i_or_sigma)
        return 1.0 - s if self.flow else 1.0

    def v(self, i: int) -> float:
        """VE noise level σ/α = e^{−λ}."""
        return self.sig[i] / self.alpha(i)

    def sigma_at(self, lam: float) -> float:
        return float(sigma_from_half_log_snr(torch.tensor(lam, dtype=torch.float64), self.flow))


def _psi(z: float) -> float:
    """ψ(z) = 1 − (1 − e^{−z})/z = z·φ₂(−z), the weight of a linear D: c∫_0^H e^{−c(H−u)}·u du = H·ψ(cH)."""
    return z * phi(2, -z)


# ----------------------------------------------------------------------------------------------
# ER-SDE-Solver (Cui et al. 2023)
# ----------------------------------------------------------------------------------------------


def er_sde_noise_scaler(v: torch.Tensor) -> torch.Tensor:
    """φ(v) = v·(e^{v^0.3} + 10): the noise scale function Cui et al. 2023 recommend ("ER SDE 5" of
    arXiv 2309.06169, the one their experiments use). v: a float64 tensor of VE noise levels."""
    return v * ((v**0.3).exp() + 10.0)


def _phi_np(scaler, v):
    """A tensor-valued noise scaler evaluated on floats / numpy arrays (float64)."""
    out = scaler(torch.as_tensor(v, dtype=torch.float64))
    return out.numpy() if out.ndim else float(out)


def _er_integrals(scaler, vt: float, vs: float) -> tuple[float, float]:
    """(∫_{v_t}^{v_s} dv/φ(v), ∫_{v_t}^{v_s} (v − v_s)/φ(v) dv), taken in u = log v (dv/φ = (v/φ) du,
    smooth: 1/(e^{v^0.3} + 10) for the default φ) with the fixed Gauss–Legendre rule."""
    u, w = gauss_legendre(math.log(vt), math.log(vs))
    v = np.exp(u)
    w = w * v / _phi_np(scaler, v)
    return float(np.sum(w)), float(np.sum(w * (v - vs)))


def _er_integrals_riemann(scaler, vt: float, vs: float, n: int = 200) -> tuple[float, float]:
    """The same two integrals as ComfyUI takes them: a left Riemann sum of n points in v,
    Σ_k f(v_t + k·δ)·δ for k = 0..n−1, δ = (v_s − v_t)/n (error O(δ), ~0.5 % on early steps)."""
    step = (vs - vt) / n
    v = vt + np.arange(n, dtype=np.float64) * step
    w = step / _phi_np(scaler, v)
    return float(np.sum(w)), float(np.sum(w * (v - vs)))


def _er_sde(model, x, sigmas, extra_args, callback, disable, s_noise, noise_sampler, seed, noise_scaler,
            max_stage, exact):  # fmt: skip
    if not 1 <= max_stage <= 3:
        raise ValueError(f"max_stage must be 1, 2 or 3, got {max_stage}")
    extra_args = extra_args or {}
    scaler = noise_scaler or er_sde_noise_scaler  # the paper's φ
    sch = _Schedule(model, sigmas)
    noise_sampler = LazyNoise(x, sch.sigmas, noise_sampler, seed, brownian=exact, cpu=True)
    integrals = _er_integrals if exact else _er_integrals_riemann
    hist_v, hist_d, d1_prev = [], [], None  # history of v and D; previous first divided difference
    for i in trange(len(sigmas) - 1, disable):
        sigma = sch.sigmas[i]
        denoised = model(x, svec(sigma, x), **extra_args)
        report(callback, x, i, sigma, sigma, denoised)
        if sch.sig[i + 1] == 0:
            x = denoised
            break
        vs, vt = sch.v(i), sch.v(i + 1)
        a_s, a_t = sch.alpha(i), sch.alpha(i + 1)
        phi_s, phi_t = _phi_np(scaler, vs), _phi_np(scaler, vt)
        r = phi_t / phi_s
        data = denoised * (1 - r)
        stage = min(max_stage, len(hist_v) + 1)
        if stage >= 2:
            d1 = (denoised - hist_d[-1]) / (vs - hist_v[-1])  # D[v_s, v_{s−1}]
            i0, i1 = integrals(scaler, vt, vs)
            c1 = (vt - vs) + phi_t * i0
            deriv1 = d1
            if stage >= 3:
                dd = (d1 - d1_prev) / (vs - hist_v[-2])  # D[v_s, v_{s−1}, v_{s−2}]
                c2 = 0.5 * (vt - vs) ** 2 + phi_t * i1
                if exact:  # D'(v_s) of the quadratic interpolant
                    deriv1 = d1 + dd * (vs - hist_v[-1])
                data = data + dd * (2 * c2)  # c₂·D'' with D'' ≈ 2·dd
            data = data + deriv1 * c1
            d1_prev = d1
        x = x * (a_t / a_s * r) + data * a_t
        var = vt**2 - (r * vs) ** 2
        if s_noise > 0 and var > 0:
            x = x + noise_sampler(sigma, sch.sigmas[i + 1]) * (a_t * math.sqrt(var) * s_noise)
        hist_v, hist_d = (hist_v + [vs])[-2:], (hist_d + [denoised])[-2:]
    return x


@torch.no_grad()
def sample_er_sde(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    s_noise=1.0,
    noise_sampler=None,
    seed=None,
    noise_scaler=None,
    max_stage=3,
):
    """ER-SDE-Solver-3 (Cui et al. 2023, "Elucidating the solution space of extended reverse-time SDE
    for diffusion models", arXiv 2309.06169) as ComfyUI computes it (its `er_sde`, after the paper's
    code): the paper's exact solution of the VE extended reverse-time SDE in data prediction, with D
    expanded in a Taylor series in v = σ/α truncated after `max_stage` terms (ER-SDE-Solver-1/2/3;
    multistep, 1 NFE per step, stage = min(max_stage, i + 1)).

    With the noise scale function φ (default `er_sde_noise_scaler`) and r = φ(v_t)/φ(v_s):
        y_t = r·y_s + (1 − r)·D_s + c₁·D'_s + c₂·D''_s + √(v_t² − r²v_s²)·z,   y = x/α, v = σ/α,
        c₁ = (v_t − v_s) + φ_t∫_{v_t}^{v_s} dv/φ(v),
        c₂ = (v_t − v_s)²/2 + φ_t∫_{v_t}^{v_s} (v − v_s)/φ(v) dv
    (integration by parts of φ_t∫ φ'/φ²·(v − v_s)^k/k! dv), with the paper's choices: the integrals by
    a left Riemann sum of 200 points in v (`_er_integrals_riemann`), D' by the backward difference
    D[v_s, v_{s−1}], D'' by 2·D[v_s, v_{s−1}, v_{s−2}]. Noise: i.i.d. per step (z). φ(v) = v gives zero
    noise, i.e. a PF-ODE solver (with max_stage=1 it is DDIM/Euler). Flow: the same in y = x/α, then
    x_t = α_t·y_t (the paper's VP form, with its λ = σ/α), from σ = 0.9999 if the schedule starts at 1.
    As an ODE solver (φ(v) = v) it converges at order 2 over 10..80 Karras steps (measured 2.3) and
    then slower, towards order 1 (1.3 over 160..1280): the Riemann sum's relative error in c₁ does not
    shrink with the step. `er_sde_exact` takes D' of the quadratic interpolant and the integrals
    exactly (measured 4.7 over 10..80).
    """
    return _er_sde(
        model, x, sigmas, extra_args, callback, disable, s_noise, noise_sampler, seed, noise_scaler,
        max_stage, exact=False,
    )  # fmt: skip


@torch.no_grad()
def sample_er_sde_exact(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    s_noise=1.0,
    noise_sampler=None,
    seed=None,
    noise_scaler=None,
    max_stage=3,
):
    """ER-SDE-Solver-3 (Cui et al. 2023, arXiv 2309.06169) with the Taylor terms taken to their order:
    the step of `er_sde` with
        D' ≈ D[v_s, v_{s−1}] + (v_s − v_{s−1})·D[v_s, v_{s−1}, v_{s−2}]   (the derivative at v_s of the
             quadratic interpolant; the paper's backward difference is one order less accurate),
        D'' ≈ 2·D[v_s, v_{s−1}, v_{s−2}],
    and c₁, c₂'s integrals taken in log v with the fixed Gauss–Legendre rule (`_er_integrals`; smooth
    there: 1/(e^{v^0.3} + 10) for the default φ) instead of a 200-point Riemann sum. Noise: a
    Brownian tree (the same increments whatever the step count). As an ODE solver (φ(v) = v) of order
    3 or more (measured 4.7 over 10..80 Karras steps, 4.2 over 40..320; `er_sde`: 2.3, then → 1).
    """
    return _er_sde(
        model, x, sigmas, extra_args, callback, disable, s_noise, noise_sampler, seed, noise_scaler,
        max_stage, exact=True,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# SEEDS (Gonzalez et al. 2023)
# ----------------------------------------------------------------------------------------------


class _Point:
    """The point λ_s + r·h of step i: σ (float and tensor), α, and the linear factor (σ/σ_s)e^{−ηrh}."""

    def __init__(self, sch: _Schedule, i: int, r: float, eta: float):
        h = sch.lam[i + 1] - sch.lam[i]
        if r == 1.0:
            self.sig, self.sig_t = sch.sig[i + 1], sch.sigmas[i + 1]
        else:
            self.sig = sch.sigma_at(sch.lam[i] + r * h)
            self.sig_t = torch.tensor(self.sig, dtype=sch.sigmas.dtype, device=sch.sigmas.device)
        self.r = r
        self.alpha = 1.0 - self.sig if sch.flow else 1.0
        self.lin = self.sig / sch.sig[i] * math.exp(-eta * r * h)


class _StageNoise:
    """The step's noise, split exactly over the stage points (SEEDS' "modified Gaussian increments").

    With ν the noise at a point divided by its σ: ν(r') = e^{−η(r'−r)h}·ν(r) + √(1 − e^{−2η(r'−r)h})·z,
    z drawn for the σ sub-interval (r, r'). Each point then carries exactly the SDE's noise
    σ_r²(1 − e^{−2ηrh}), and later points are correctly correlated with earlier ones.
    """

    def __init__(self, sch, i, eta, s_noise, noise_sampler):
        self.h = sch.lam[i + 1] - sch.lam[i]
        self.eta, self.s_noise, self.noise_sampler = eta, s_noise, noise_sampler
        self.on = eta > 0 and s_noise > 0
        self.nu, self.r, self.sig_t = None, 0.0, sch.sigmas[i]

    def at(self, p: _Point) -> torch.Tensor | float:
        if not self.on:
            return 0.0
        dr = p.r - self.r
        z = self.noise_sampler(self.sig_t, p.sig_t) * math.sqrt(one_minus_exp_neg(2 * self.eta * dr * self.h))
        self.nu = z if self.nu is None else self.nu * math.exp(-self.eta * dr * self.h) + z
        self.r, self.sig_t = p.r, p.sig_t
        return self.nu * (p.sig * self.s_noise)


def _check_eta(eta):
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")


@torch.no_grad()
def sample_seeds_2(
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
    solver_type="phi_1",
):
    """SEEDS-2 (Gonzalez et al. 2023, "SEEDS: Exponential SDE solvers for fast high-quality sampling
    from diffusion models", arXiv 2305.14267; the two-stage SEEDS in data-prediction / half log-SNR
    form): one intermediate stage at λ_s + r·h, 2 NFE per step. With c = 1 + η:

        u  = (σ_u/σ_s)e^{−ηrh}·x + α_u(1 − e^{−crh})·D_s + σ_u√(1 − e^{−2ηrh})·z₁
        x' = (σ_t/σ_s)e^{−ηh}·x + α_t·D̃ + σ_t[e^{−η(1−r)h}√(1 − e^{−2ηrh})·z₁ + √(1 − e^{−2η(1−r)h})·z₂]

    D̃ = (1 − e^{−ch})·[(1 − 1/(2r))D_s + D_u/(2r)] for solver_type "phi_1" (default), or
    D̃ = (1 − e^{−ch})·D_s + ψ(ch)/r·(D_u − D_s), ψ(z) = 1 − (1 − e^{−z})/z, for "phi_2" (the exact
    integral of the linear interpolant of D in λ). η = 0 with "phi_1" is DPM-Solver++(2S)
    (Lu et al. 2022b, Algorithm 1), a 2nd-order ODE solver.
    """
    _check_eta(eta)
    if solver_type not in ("phi_1", "phi_2"):
        raise ValueError(f"solver_type must be 'phi_1' or 'phi_2', got {solver_type!r}")
    if not 0 < r < 1:
        raise ValueError(f"r must be in (0, 1), got {r}")
    extra_args = extra_args or {}
    sch = _Schedule(model, sigmas)
    noise_sampler = LazyNoise(x, sch.sigmas, noise_sampler, seed, brownian=False, cpu=True)
    c = 1.0 + eta
    for i in trange(len(sigmas) - 1, disable):
        sigma = sch.sigmas[i]
        d_s = model(x, svec(sigma, x), **extra_args)
        report(callback, x, i, sigma, sigma, d_s)
        if sch.sig[i + 1] == 0:
            x = d_s
            break
        h = sch.lam[i + 1] - sch.lam[i]
        noise = _StageNoise(sch, i, eta, s_noise, noise_sampler)
        pu, pt = _Point(sch, i, r, eta), _Point(sch, i, 1.0, eta)
        u = x * pu.lin + d_s * (pu.alpha * one_minus_exp_neg(c * r * h)) + noise.at(pu)
        d_u = model(u, svec(pu.sig_t, u), **extra_args)
        if solver_type == "phi_1":
            data = (d_s * (1 - 1 / (2 * r)) + d_u * (1 / (2 * r))) * one_minus_exp_neg(c * h)
        else:
            data = d_s * one_minus_exp_neg(c * h) + (d_u - d_s) * (_psi(c * h) / r)
        x = x * pt.lin + data * pt.alpha + noise.at(pt)
    return x


@torch.no_grad()
def sample_seeds_3(
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
    r_1=1.0 / 3.0,
    r_2=2.0 / 3.0,
):
    """SEEDS-3 (Gonzalez et al. 2023, arXiv 2305.14267; the three-stage SEEDS in data prediction):
    stages at λ_s + r₁h and λ_s + r₂h, 3 NFE per step, the noise split exactly over the stages
    (`_StageNoise`; n_k has variance σ_k²(1 − e^{−2ηr_k h})). With c = 1 + η:

        u₁ = (σ₁/σ_s)e^{−ηr₁h}·x + α₁(1 − e^{−cr₁h})·D_s + n₁
        u₂ = (σ₂/σ_s)e^{−ηr₂h}·x + α₂[(1 − e^{−cr₂h})·D_s + (r₂/r₁)ψ(cr₂h)·(D₁ − D_s)] + n₂
        x' = (σ_t/σ_s)e^{−ηh}·x + α_t[(1 − e^{−ch})·D_s + ψ(ch)/r₂·(D₂ − D_s)] + n_t

    η = 0 is DPM-Solver-3 (Lu et al. 2022a, Algorithm 5, r₁ = 1/3, r₂ = 2/3) in the data-prediction
    form of DPM-Solver++ (Lu et al. 2022b), a 3rd-order ODE solver.
    """
    _check_eta(eta)
    if not 0 < r_1 < r_2 < 1:
        raise ValueError(f"need 0 < r_1 < r_2 < 1, got r_1={r_1}, r_2={r_2}")
    extra_args = extra_args or {}
    sch = _Schedule(model, sigmas)
    noise_sampler = LazyNoise(x, sch.sigmas, noise_sampler, seed, brownian=False, cpu=True)
    c = 1.0 + eta
    for i in trange(len(sigmas) - 1, disable):
        sigma = sch.sigmas[i]
        d_s = model(x, svec(sigma, x), **extra_args)
        report(callback, x, i, sigma, sigma, d_s)
        if sch.sig[i + 1] == 0:
            x = d_s
            break
        h = sch.lam[i + 1] - sch.lam[i]
        noise = _StageNoise(sch, i, eta, s_noise, noise_sampler)
        p1, p2, pt = _Point(sch, i, r_1, eta), _Point(sch, i, r_2, eta), _Point(sch, i, 1.0, eta)
        u1 = x * p1.lin + d_s * (p1.alpha * one_minus_exp_neg(c * r_1 * h)) + noise.at(p1)
        d_1 = model(u1, svec(p1.sig_t, u1), **extra_args)
        data = d_s * one_minus_exp_neg(c * r_2 * h) + (d_1 - d_s) * (r_2 / r_1 * _psi(c * r_2 * h))
        u2 = x * p2.lin + data * p2.alpha + noise.at(p2)
        d_2 = model(u2, svec(p2.sig_t, u2), **extra_args)
        data = d_s * one_minus_exp_neg(c * h) + (d_2 - d_s) * (_psi(c * h) / r_2)
        x = x * pt.lin + data * pt.alpha + noise.at(pt)
    return x


# ----------------------------------------------------------------------------------------------
# SA-Solver (Xue et al. 2023)
# ----------------------------------------------------------------------------------------------


def _percent_to_sigma(ms, p: float) -> float:
    """σ at sampling fraction p (0 = start, 1 = end) of the model's timestep range, as ComfyUI's
    `percent_to_sigma`: table index (1 − p)·(T − 1) in log σ; flow: σ(t = (1 − p)·multiplier)."""
    if getattr(ms, "is_flow", False):
        return float(ms.sigma(torch.tensor((1.0 - p) * ms.multiplier, dtype=torch.float64)))
    logs = ms.sigmas.double().log()
    pos = (1.0 - p) * (logs.shape[0] - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, logs.shape[0] - 1)
    w = pos - lo
    return float(((1 - w) * logs[lo] + w * logs[hi]).exp())


@functools.lru_cache(maxsize=8)
def _sd1_percent_to_sigma(p: float) -> float:
    from latentforge.model_sampling import DiscreteVP

    return _percent_to_sigma(DiscreteVP(), p)


def sa_solver_tau_interval(
    model, start_percent: float = 0.2, end_percent: float = 0.8
) -> tuple[float, float]:
    """(σ_hi, σ_lo): τ = η for σ_lo ≤ σ ≤ σ_hi. Without a model_sampling (a plain VE callable) the
    SD1.x table is used: about (5.09, 0.571)."""
    ms = model_sampling_of(model)
    if ms is None or not hasattr(ms, "sigmas"):
        return _sd1_percent_to_sigma(start_percent), _sd1_percent_to_sigma(end_percent)
    return _percent_to_sigma(ms, start_percent), _percent_to_sigma(ms, end_percent)


def _sa_solver(
    model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, seed, tau_func,
    sde_start_percent, sde_end_percent, predictor_order, corrector_order, use_pece, exact,
):  # fmt: skip
    """SA-Solver; `exact`: no lowering of the orders at the end, Brownian-tree noise (see the names)."""
    _check_eta(eta)
    if predictor_order < 1 or corrector_order < 0:
        raise ValueError("predictor_order must be >= 1 and corrector_order >= 0")
    extra_args = extra_args or {}
    sch = _Schedule(model, sigmas)
    noise_sampler = LazyNoise(x, sch.sigmas, noise_sampler, seed, brownian=exact, cpu=True)
    if tau_func is None:
        if eta == 0:
            tau_func = lambda s: 0.0  # noqa: E731
        else:
            hi, lo = sa_solver_tau_interval(model, sde_start_percent, sde_end_percent)
            tau_func = lambda s: eta if lo <= s <= hi else 0.0  # noqa: E731
    n = len(sigmas) - 1
    # lower the orders over the last steps of a schedule ending in 0 (ComfyUI): predictor ≤ n − 1 − i,
    # corrector ≤ n − i
    lower = not exact and sch.sig[-1] == 0
    hist_d: list[torch.Tensor] = []  # D at λ_i, λ_{i−1}, ... (most recent last)
    x_c = x  # corrected state at σ_i
    x_p = x  # predicted state at σ_i (the one the model sees)
    step = None  # (eta, noise) of the last predictor step, reused by its corrector
    for i in trange(n, disable):
        sigma = sch.sigmas[i]
        denoised = model(x_p, svec(sigma, x_p), **extra_args)
        report(callback, x_p, i, sigma, sigma, denoised)
        last = sch.sig[i + 1] == 0
        # --- correct the step i−1 → i with D_i at the predicted point (Adams–Moulton) ---
        if i > 0 and corrector_order > 0 and not (last and not use_pece):
            k = min(corrector_order, len(hist_d) + 1, n - i if lower else n)
            nodes = [sch.lam[i - j] for j in range(k)]  # λ_i, λ_{i−1}, ...
            ds = [denoised] + hist_d[::-1][: k - 1]
            eta_s, noise = step
            x_c = _adams_update(x_c, sch, i - 1, nodes, ds, eta_s, noise)
            if use_pece:
                denoised = model(x_c, svec(sigma, x_c), **extra_args)
        else:
            x_c = x_p
        hist_d = (hist_d + [denoised])[-max(predictor_order, corrector_order, 1) :]
        if last:
            return denoised
        # --- predict i → i+1 (Adams–Bashforth) ---
        tau = float(tau_func(sch.sig[i + 1]))
        eta_s = tau * tau
        k = min(predictor_order, len(hist_d), n - 1 - i if lower else n)
        nodes = [sch.lam[i - j] for j in range(k)]
        ds = hist_d[::-1][:k]
        noise = None
        if eta_s > 0 and s_noise > 0:
            h = sch.lam[i + 1] - sch.lam[i]
            noise = noise_sampler(sigma, sch.sigmas[i + 1]) * (
                sch.sig[i + 1] * math.sqrt(one_minus_exp_neg(2 * eta_s * h)) * s_noise
            )
        step = (eta_s, noise)
        x_p = _adams_update(x_c, sch, i, nodes, ds, eta_s, noise)
    return x_p


def _adams_update(x, sch, i, nodes, ds, eta, noise):
    """x_{i+1} = (σ_{i+1}/σ_i)e^{−ηh}·x_i + α_{i+1}Σ_j b_j D_j (+ noise): Eq. 15/18 of Xue et al."""
    lam_s, lam_t = sch.lam[i], sch.lam[i + 1]
    h = lam_t - lam_s
    c = 1.0 + eta
    b = lagrange_integrals(nodes, lam_s, lam_t, weight=lambda lam: c * np.exp(-c * (lam_t - lam)))
    out = x * (sch.sig[i + 1] / sch.sig[i] * math.exp(-eta * h))
    a_t = sch.alpha(i + 1)
    for bj, dj in zip(b, ds, strict=True):
        out = out + dj * (a_t * bj)
    if noise is not None:
        out = out + noise
    return out


@torch.no_grad()
def sample_sa_solver(
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
    tau_func=None,
    sde_start_percent=0.2,
    sde_end_percent=0.8,
    predictor_order=3,
    corrector_order=4,
):
    """SA-Solver (Xue et al. 2023, "SA-Solver: Stochastic Adams solver for fast sampling of diffusion
    models", NeurIPS 2023, arXiv 2309.05019), Algorithm 1 in data-prediction form: a stochastic
    Adams–Bashforth predictor (Eq. 15, order `predictor_order`) and Adams–Moulton corrector
    (Eq. 18, order `corrector_order`) for the SDE with stochasticity τ(σ):

        x_{i+1} = (σ_{i+1}/σ_i)e^{−τ²h}·x_i + α_{i+1}·Σ_j b_j·D_j + σ_{i+1}√(1 − e^{−2τ²h})·ξ_i,
        b_j = (1 + τ²)∫_{λ_i}^{λ_{i+1}} e^{−(1+τ²)(λ_{i+1} − λ)}·ℓ_j(λ) dλ   (common.lagrange_integrals),

    ℓ_j the Lagrange basis on λ_i, λ_{i−1}, … (predictor) or λ_{i+1}, λ_i, … (corrector, using D at
    the predicted x_{i+1}); predictor and corrector share the noise ξ_i. PEC (this function): the D
    kept for later steps is the one at the predicted point, 1 NFE per step. `use_pece=True`
    (`sa_solver_pece`) re-evaluates D after each correction (2 NFE per step from step 2).

    τ(σ) (constant over a step, taken at σ_{i+1}): `tau_func(σ)` if given, else τ = eta for σ in
    [σ(sde_end_percent), σ(sde_start_percent)] and 0 outside. The default 20 %–80 % window is
    ComfyUI's SamplerSASolver default, an adaptation in σ of the official code's interval in t
    (SD1.x: σ ∈ [0.571, 5.09]; flow, shift 1: σ ∈ [0.2, 0.8]). eta = 0 (τ ≡ 0) is a deterministic
    multistep ODE solver of order min(predictor_order + 1, corrector_order); with
    corrector_order=0 only the predictor runs (predictor_order=1 is then DDIM).
    Orders are lowered at the start while the history is short.

    As ComfyUI computes it (its `sa_solver`): on a schedule ending in 0 the orders are also lowered over
    the last steps (predictor ≤ n − 1 − i, corrector ≤ n − i of n steps), so the step to σ_min is a
    first-order prediction left uncorrected; noise: i.i.d. per step. That makes the ODE limit
    second order (measured 2.1 over 40..320 Karras steps; `sa_solver_exact`: 4.1) — more accurate
    than `sa_solver_exact` at 10 and 20 steps (3.2e-2 against 6.6e-2 at 10 on a Gaussian), less
    from 40 on.
    """
    return _sa_solver(
        model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, seed, tau_func,
        sde_start_percent, sde_end_percent, predictor_order, corrector_order, False, False,
    )  # fmt: skip


@torch.no_grad()
def sample_sa_solver_pece(
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
    tau_func=None,
    sde_start_percent=0.2,
    sde_end_percent=0.8,
    predictor_order=3,
    corrector_order=4,
):
    """SA-Solver in PECE mode (Xue et al. 2023, Algorithm 1 with a re-evaluation after the corrector) as
    ComfyUI computes it (its `sa_solver_pece`): see `sample_sa_solver`. ODE limit: measured order 1.8
    over 40..320 Karras steps (`sa_solver_pece_exact`: 3.9); more accurate than `sa_solver_pece_exact`
    at 10 steps, less from 20 on."""
    return _sa_solver(
        model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, seed, tau_func,
        sde_start_percent, sde_end_percent, predictor_order, corrector_order, True, False,
    )  # fmt: skip


@torch.no_grad()
def sample_sa_solver_exact(
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
    tau_func=None,
    sde_start_percent=0.2,
    sde_end_percent=0.8,
    predictor_order=3,
    corrector_order=4,
):
    """SA-Solver (Xue et al. 2023, Algorithm 1; see `sample_sa_solver`) at its full orders to the end:
    the orders are lowered only at the start, while the history is short, and the noise comes from a
    Brownian tree. Order min(predictor_order + 1, corrector_order) as an ODE solver (measured 4.1 over
    10..80 Karras steps for the defaults; ComfyUI's `sa_solver`: 2.1)."""
    return _sa_solver(
        model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, seed, tau_func,
        sde_start_percent, sde_end_percent, predictor_order, corrector_order, False, True,
    )  # fmt: skip


@torch.no_grad()
def sample_sa_solver_pece_exact(
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
    tau_func=None,
    sde_start_percent=0.2,
    sde_end_percent=0.8,
    predictor_order=3,
    corrector_order=4,
):
    """`sa_solver_exact` in PECE mode (a re-evaluation after each correction; 2 NFE per step from step 2).
    ODE limit: measured order 4.1 over 10..80 Karras steps (ComfyUI's `sa_solver_pece`: 1.8)."""
    return _sa_solver(
        model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, seed, tau_func,
        sde_start_percent, sde_end_percent, predictor_order, corrector_order, True, True,
    )  # fmt: skip


EXACT_SAMPLERS = {
    "er_sde_exact": sample_er_sde_exact,
    "sa_solver_exact": sample_sa_solver_exact,
    "sa_solver_pece_exact": sample_sa_solver_pece_exact,
}
SAMPLERS = {
    "er_sde": sample_er_sde,
    "seeds_2": sample_seeds_2,
    "seeds_3": sample_seeds_3,
    "sa_solver": sample_sa_solver,
    "sa_solver_pece": sample_sa_solver_pece,
}
