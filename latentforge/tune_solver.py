"""A solver tuned to a model: iPNDM's schedule, evaluation shifts and step coefficients fitted by gradient.

tune_schedule.py fits the N σ values (and optionally one evaluation shift per step) with Nelder–Mead, since
the samplers take σ as numbers. This module fits more: for iPNDM (samplers/multistep.py)

    x_{i+1} = x_i + (σ_{i+1} − σ_i)·Σ_j b_{ij}·d_{i−j},   d_k = (x_k − D(x_k, σ_k·e^{δ_k}))/σ_k,

the interior σ's (tune_schedule's logits θ), the shifts δ_k (tune_schedule.ShiftedDenoiser: Li et al.'s
time-shift sampler, ICLR 2024, as LD3 fits them, Tong et al., ICLR 2025) and every step's coefficients
b_{ij} (order min(4, i + 1) at step i), which start at the fixed Adams–Bashforth ones. Fitting a multistep
solver's coefficients with its time steps against a many-step teacher is S4S (Frankel et al. 2025, arXiv
2502.17423, §3: learned coefficients and time steps of a linear multistep solver); here the objective is
tune_schedule's, the error of the final sample against the reference solution from the same start noise.

`ipndm_path` restates sample_ipndm (through ShiftedDenoiser) in differentiable torch so the whole solve has
gradients in (θ, δ, b) when the denoiser does (the mixture oracle's does; a network's too, at the cost of a
backward pass through every step). The fitted values then run in the real sampler: `sample_ipndm(...,
coefficients=b)` with the model wrapped in ShiftedDenoiser(δ) (the two agree to float64 rounding:
tests/test_tune_solver.py).

Optimiser: Adam on random batches of the start noises (cosine learning rate), with a robust loss
ρ·log(1 + e/ρ) of each sample's mean squared error e. At few steps the RMSE is dominated by the rare start
noises near a boundary between modes of the data that end in the other mode (tune_schedule's docstring;
squared error ~1 per coordinate each): their gradients push the fit to move those particular noises across
the boundary, which does not generalise. The robust loss caps their weight (gradient ρ/(ρ + e)), so the fit
reduces the error of the trajectories that stay in their mode, which measured on the mixture oracle also
lowers how many flip (10 calls, fitted on 32768 noises, scored on 16384 fresh ones: 20 flips and RMSE 0.029
against 125 and 0.090 with Karras' schedule; 0.008 on the noises that do not flip). Most of the gain is the
coefficients': the schedule and shifts alone reach 0.047 (benchmarks/tuned_schedule.py, with ablations).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from latentforge.samplers.multistep import _AB_FIXED
from latentforge.tune_schedule import (
    GAP_FLOOR,
    ShiftedDenoiser,
    TuneResult,
    fixed_ends,
    logits_from_schedule,
    schedule_error,
    stock_schedules,
)

SAMPLER = "ipndm"
MAX_ORDER = 4


def schedule(theta: torch.Tensor, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """tune_schedule.schedule_from_logits in differentiable torch (float64): N + 1 σ's ending σ_min, 0."""
    z = torch.cat([theta, theta.new_zeros(1)])
    w = GAP_FLOOR + (1 - len(z) * GAP_FLOOR) * torch.softmax(z, 0)
    frac = torch.cat([z.new_zeros(1), torch.cumsum(w, 0)])
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    inner = torch.exp(hi - frac[1:-1] * (hi - lo))
    ends = z.new_tensor([sigma_max]), z.new_tensor([sigma_min, 0.0])
    return torch.cat([ends[0], inner, ends[1]])


def fixed_coefficients(steps: int) -> list[list[float]]:
    """iPNDM's fixed b_j for each of the `steps` − 1 steps that move x (the last is the final denoise)."""
    return [list(_AB_FIXED[min(MAX_ORDER, i + 1)]) for i in range(steps - 1)]


def ipndm_path(
    model: Callable,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    shifts: torch.Tensor,
    coefficients: list[torch.Tensor],
    extra_args: dict | None = None,
) -> torch.Tensor:
    """sample_ipndm(ShiftedDenoiser(model, sigmas, shifts), noise·σ_0, sigmas, coefficients=…) with
    gradients: sigmas [N + 1] ending in 0, shifts [N], coefficients N − 1 tensors of the steps' orders."""
    x, ds = noise * sigmas[0], []
    n = len(sigmas) - 1
    shape = (-1, *([1] * (noise.ndim - 1)))
    for i in range(n):
        s = sigmas[i]
        denoised = model(x, (s * shifts[i].exp()).expand(x.shape[0]), **(extra_args or {}))
        if i == n - 1:
            return denoised
        ds = [(x - denoised) / s.reshape(()).expand(x.shape[0]).reshape(shape), *ds][:MAX_ORDER]
        b = coefficients[i]
        x = x + (sigmas[i + 1] - s) * sum(b[j] * d for j, d in enumerate(ds))
    raise ValueError(f"need at least one step, got sigmas {sigmas.tolist()}")


def tune_solver(
    model: Callable,
    steps: int,
    sigma_min: float,
    sigma_max: float,
    noise: torch.Tensor,
    reference: torch.Tensor,
    extra_args: dict | None = None,
    start: torch.Tensor | None = None,
    iters: int = 1500,
    batch: int = 4096,
    lr: float = 0.01,
    coefficient_lr: float = 0.003,
    robust: float = 0.003,
    shifts: bool = True,
    coefficients: bool = True,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> TuneResult:
    """iPNDM at `steps` steps (model calls) from σ_max to σ_min (then 0) with its schedule, and, as asked, the
    evaluation shifts and step coefficients, fitted to `reference` (the solution from `noise`·σ_max: the
    exact one or tune_schedule.reference_solution) by Adam (module docstring).

    model: a differentiable D(x, σ, **extra_args) -> x̂₀; noise, reference: [B, ...] (float64 advised);
    start: the starting schedule (default: the best stock one by RMSE, as tune_schedule.tune); iters Adam
    steps on random batches of `batch` noises (the whole set when extra_args are given: conditioning is not
    split); lr for the schedule logits and shifts, coefficient_lr for the coefficients, both cosine-decayed;
    robust: ρ of the loss ρ·log(1 + e/ρ) (0: the mean squared error). Returns the result with the lowest RMSE
    on all of `noise` among the checkpoints every iters/10 steps, and the start's.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 3:
        raise ValueError(f"steps must be an integer >= 3 (fewer leave no σ to tune), got {steps!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if reference.shape != noise.shape:
        raise ValueError(f"reference {tuple(reference.shape)} and noise {tuple(noise.shape)} differ in shape")
    for name, v in (("iters", iters), ("batch", batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if not (robust >= 0 and lr > 0 and coefficient_lr > 0):
        raise ValueError(f"need robust >= 0 and positive rates, got {robust}, {lr}, {coefficient_lr}")
    say = log or (lambda _: None)
    stock = {}
    starts = {"start": start} if start is not None else stock_schedules(steps, sigma_min, sigma_max)
    for name, s in starts.items():
        s = fixed_ends(torch.as_tensor(s, dtype=torch.float64), sigma_min, sigma_max)
        if s is None or len(s) != steps + 1:
            raise ValueError(f"start schedule {name!r} is not {steps + 1} values σ_max … σ_min, 0")
        stock[name] = (schedule_error(model, SAMPLER, s, noise, reference, extra_args), s)
    first = min(stock, key=lambda k: stock[k][0])
    f64 = dict(dtype=torch.float64)
    theta = torch.tensor(logits_from_schedule(stock[first][1]), **f64, requires_grad=True)
    delta = torch.zeros(steps, **f64, requires_grad=shifts)
    coef = [torch.tensor(b, **f64, requires_grad=coefficients) for b in fixed_coefficients(steps)]
    groups = [{"params": [theta] + ([delta] if shifts else []), "lr": lr}]
    if coefficients:
        groups.append({"params": coef, "lr": coefficient_lr})
    opt = torch.optim.Adam(groups)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    g = torch.Generator().manual_seed(seed)
    whole = bool(extra_args) or batch >= len(noise)

    def current() -> tuple[torch.Tensor, list[float], list[list[float]]]:
        sig = schedule(theta.detach(), sigma_min, sigma_max)
        return sig, delta.detach().tolist(), [c.detach().tolist() for c in coef]

    def error(sig, d, b) -> float:  # the real sampler's RMSE on all the noises
        m = ShiftedDenoiser(model, sig, d) if any(d) else model
        return schedule_error(m, SAMPLER, sig, noise, reference, extra_args, {"coefficients": b})

    best = (stock[first][0], *current())
    say(f"start: {first} (RMSE {best[0]:.4g})")
    for it in range(iters):
        idx = None if whole else torch.randint(0, len(noise), (batch,), generator=g)
        nz, ref = (noise, reference) if idx is None else (noise[idx], reference[idx])
        out = ipndm_path(model, nz, schedule(theta, sigma_min, sigma_max), delta, coef, extra_args)
        e = ((out.double() - ref.double()) ** 2).flatten(1).mean(1)
        loss = (robust * torch.log1p(e / robust) if robust > 0 else e).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
        if (it + 1) % max(1, iters // 10) == 0 or it + 1 == iters:
            sig, d, b = current()
            err = error(sig, d, b)
            say(f"step {it + 1}/{iters}: RMSE {err:.4g}")
            if err < best[0]:
                best = (err, sig, d, b)
    err, sig, d, b = best
    return TuneResult(
        SAMPLER, steps, sig.tolist(), err, {k: v[0] for k, v in stock.items()}, first, iters,
        options={"coefficients": b} if coefficients and b != fixed_coefficients(steps) else {},
        shifts=d if any(d) else [],
    )  # fmt: skip
