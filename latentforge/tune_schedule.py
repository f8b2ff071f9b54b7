"""Schedules tuned to the model: the N σ values a sampler visits, chosen to minimise its error.

Align Your Steps (Sabour, Fidler & Kreis 2024, arXiv 2404.14507) optimises a schedule per model and solver
by minimising a KL-divergence upper bound (KLUB, their Eq. 7) between the true and the discretised SDE, one
σ at a time (their Alg. 1), then subdivides it for more steps. Here the objective is the simpler one the
paper validates the KLUB against: the solver's error against a many-step solution from the same noise,

    L(σ) = RMSE( S(D, ε·σ_max, σ) − x_ref(ε) )   over a batch of start noises ε (and their conditioning),
    σ = (σ_max, σ_1, …, σ_{N−2}, σ_min, 0),    x_ref = the probability-flow ODE to σ_min, then D(x, σ_min),

S the sampler, D the denoiser D(x, σ, **cond) -> x̂₀. The ends are fixed (what every stock schedule does):
the N − 2 interior values are the parameters, through a softmax of increments in log σ,

    log σ_i = log σ_max − (log σ_max − log σ_min)·Σ_{k<i} softmax(θ)_k,   θ ∈ ℝ^{N−1}, θ_{N−2} = 0,

so any θ is a strictly decreasing schedule with the right ends (no constraint to handle), and a stock
schedule is the start θ = log(its gaps in log σ).

The optimiser is Nelder–Mead (the adaptive parameters of Gao & Han 2012) restarted from its own result with a
fresh simplex until a restart no longer helps. Chosen by measurement on the mixture oracle (bench.py, 8192
start noises, ipndm_v, N = 10): AYS's own scheme, coordinate descent with a golden-section search per σ_i
between its neighbours, stalls at RMSE 0.073 from 0.127 (Karras) after 4 sweeps (385 evaluations), because
neighbouring σ's are coupled (a multistep solver's coefficients depend on several step ratios; a point can
only move as far as its neighbours let it); Nelder–Mead moves them together and reaches 0.049 in 800
evaluations and 0.040 in 2000 with restarts (a single run's simplex collapses: each restart gains). Gradients
are not available here (samplers take σ as Python floats in their coefficients; tune_solver.py restates iPNDM
in differentiable torch to fit its schedule, shifts and coefficients by gradient), and finite differences
suffer from the objective's small-scale roughness (a few start noises near a boundary between modes of the
data switch mode as σ moves: steep steps in L), which the simplex steps over. Deterministic: no randomness
beyond the start noises the caller passes. Tune on many noises: those mode switches dominate the RMSE at few
steps and a schedule fit to a few hundred noises fits their particular ones (benchmarks/tuned_schedule.py has
the measurements: the mixture oracle, tuned against stock, and the default model).

`shifts=True` also tunes where the denoiser is queried: the solver still steps over σ, but at each of its N
positive σ_i the network is asked for D(x, σ_i·e^{δ_i}) (`ShiftedDenoiser`): the shifted time step of Li et
al.'s time-shift sampler (ICLR 2024, arXiv 2305.15583, §4: the state at step i is closer to the marginal of
a nearby noise level than its own), here one learned δ_i per step, fitted with the schedule against the
reference as LD3 fits its per-step parameters to a teacher (Tong et al., ICLR 2025, arXiv 2405.15506, Eq. 6).
The N extra parameters let the fit absorb part of each step's truncation error (on the mixture oracle at 10
calls: RMSE 0.037 -> 0.019 on the bench's noises; benchmarks/tuned_schedule.py). δ = 0 is the plain solver.
The shifts are saved with the schedule (`read_tuned`) and generation applies them (Pipeline: the guided
denoiser wrapped in `ShiftedDenoiser`, and the step clocks of DeepCache and ControlNet given the shifted σ's).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

import numpy as np
import torch

from latentforge.files import write_json
from latentforge.samplers import get_sampler, validate_sigmas
from latentforge.schedules import SCHEDULERS

TUNED = "tuned"  # the scheduler name that reads a tuned schedule file (Pipeline, `--scheduler tuned`)
FORMAT = "latentforge.tuned_schedule/1"
# stock schedules that depend only on (σ_min, σ_max): starting points and the baseline to beat
STOCK_STARTS = ("karras", "exponential", "kl_optimal")
GAP_FLOOR = 1e-6  # the smallest gap between neighbouring log σ's, as a fraction of log(σ_max/σ_min)


@dataclass
class TuneResult:
    """sigmas: N + 1 values, σ_max first, σ_min then 0 last; rmse: their error on the tuning noises; stock:
    each start schedule's error there, start: the best; evals: objective runs; rounds: error per restart."""

    sampler: str
    steps: int
    sigmas: list[float]
    rmse: float
    stock: dict[str, float]
    start: str
    evals: int
    rounds: list[float] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    shifts: list[float] = field(default_factory=list)  # δ_i per positive σ_i (ShiftedDenoiser); [] = none


# -- parametrisation ------------------------------------------------------------------------------------


def schedule_from_logits(theta: np.ndarray, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """σ (float64, N + 1 values ending σ_min, 0) from the N − 2 free logits θ (module docstring); each gap
    keeps at least GAP_FLOOR of the log-σ range, so even extreme logits leave σ's distinct in float32."""
    z = np.concatenate([np.asarray(theta, np.float64), [0.0]])
    w = np.exp(z - z.max())
    w = GAP_FLOOR + (1 - len(w) * GAP_FLOOR) * w / w.sum()
    frac = np.concatenate([[0.0], np.cumsum(w)])  # 0 … 1 over the N − 1 gaps
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    sig = torch.tensor(np.exp(hi - frac * (hi - lo)), dtype=torch.float64)
    sig[0], sig[-1] = sigma_max, sigma_min  # exact ends, not exp(log(·))
    return torch.cat([sig, sig.new_zeros(1)])


def logits_from_schedule(sigmas: torch.Tensor) -> np.ndarray:
    """The θ whose schedule is `sigmas` (strictly decreasing, ending σ_min, 0): log of the log-σ gaps."""
    logs = torch.as_tensor(sigmas, dtype=torch.float64)[:-1].log().numpy()
    w = -np.diff(logs) / (logs[0] - logs[-1])
    theta = np.log(np.maximum(w - GAP_FLOOR, 1e-300))
    return theta[:-1] - theta[-1]


def fixed_ends(sigmas: torch.Tensor, sigma_min: float, sigma_max: float) -> torch.Tensor | None:
    """`sigmas` (float64) with its ends set exactly to σ_max and σ_min, 0 if they are already there up to
    float32 rounding; None for a schedule that ends elsewhere (e.g. `simple`, whose last σ is a step above
    σ_min) or is out of order."""
    s = torch.as_tensor(sigmas, dtype=torch.float64).clone()
    if len(s) < 3 or float(s[-1]) != 0:
        return None
    if not (math.isclose(s[0], sigma_max, rel_tol=1e-4) and math.isclose(s[-2], sigma_min, rel_tol=1e-4)):
        return None
    s[0], s[-2] = sigma_max, sigma_min
    return s if bool((s[1:] < s[:-1]).all()) else None


def stock_schedules(steps: int, sigma_min: float, sigma_max: float, model_sampling=None) -> dict:
    """name -> N + 1 σ values with the fixed ends: the σ-range schedules (karras, exponential,
    kl_optimal) and, given the model's sampling, every other stock schedule that keeps the ends."""
    rng = SimpleNamespace(sigma_min=torch.tensor(sigma_min), sigma_max=torch.tensor(sigma_max))
    out = {name: SCHEDULERS[name](rng, steps).double() for name in STOCK_STARTS}
    if model_sampling is not None:
        for name, fn in SCHEDULERS.items():
            if name not in out:
                out[name] = fn(model_sampling, steps).double()
    fixed = {name: fixed_ends(s, sigma_min, sigma_max) for name, s in out.items() if len(s) == steps + 1}
    return {name: s for name, s in fixed.items() if s is not None}


# -- objective --------------------------------------------------------------------------------------------


class ShiftedDenoiser:
    """D'(x, σ) = D(x, σ·e^{δ(σ)}): the denoiser queried at a shifted noise level (module docstring).

    δ is piecewise linear in log σ through (log σ_i, δ_i) at the schedule's positive σ's and constant beyond
    its ends, so a solver that queries σ's between the schedule's (Heun's, a singlestep solver's midpoints)
    gets a shift too. sigmas: the N + 1 schedule values ending in 0; shifts: N values. σ: a scalar or [B]."""

    def __init__(self, model: Callable, sigmas: torch.Tensor, shifts):
        sig = torch.as_tensor(sigmas, dtype=torch.float64)[:-1]
        d = torch.as_tensor(np.asarray(shifts, np.float64))
        if d.shape != sig.shape or not bool(torch.isfinite(d).all()):
            raise ValueError(f"shifts must be {len(sig)} finite values (one per positive σ): {d.tolist()}")
        order = sig.log().argsort()  # increasing log σ for interpolation
        self.model, self.log_sigma, self.delta = model, sig.log()[order], d[order]

    def shift(self, sigma: torch.Tensor) -> torch.Tensor:  # δ(σ), float64, σ's shape
        ls = torch.as_tensor(sigma, dtype=torch.float64).log()
        x, y = self.log_sigma, self.delta
        if len(x) == 1:
            return y.expand_as(ls).clone()
        i = torch.searchsorted(x, ls.clamp(x[0], x[-1])).clamp(1, len(x) - 1)
        t = ((ls.clamp(x[0], x[-1]) - x[i - 1]) / (x[i] - x[i - 1])).clamp(0, 1)
        return y[i - 1] + t * (y[i] - y[i - 1])

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        s = torch.as_tensor(sigma)
        return self.model(x, sigma * self.shift(s).exp().to(s.device, s.dtype), **kwargs)


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).mean().sqrt())


def solve(
    model: Callable,
    sampler: str,
    sigmas: torch.Tensor,
    noise: torch.Tensor,
    extra_args: dict | None = None,
    options: dict | None = None,
) -> torch.Tensor:
    """The sampler's result from x = noise·σ_0 over `sigmas` (in noise's dtype and device)."""
    dtype = torch.float64 if noise.dtype == torch.float64 else torch.float32
    sig = sigmas.to(device=noise.device, dtype=dtype)
    fn = get_sampler(sampler)
    return fn(model, noise * sig[0], sig, extra_args=extra_args, disable=True, **(options or {}))


def reference_solution(
    model: Callable,
    noise: torch.Tensor,
    sigma_min: float,
    sigma_max: float,
    extra_args: dict | None = None,
    sampler: str = "heun",
    steps: int = 256,
) -> tuple[torch.Tensor, float]:
    """(x_ref, its estimated RMSE): `sampler` over `steps` steps uniform in log σ from σ_max to σ_min, then
    the final denoise at σ_min (Heun's last step to 0 is that), and the Richardson estimate of its error from
    the solve at steps/2: |x_M − x_{M/2}|/(2^p − 1), p = 2 (Heun's order; 256 steps: 511 + 255 calls)."""
    if steps < 2:
        raise ValueError(f"reference steps must be >= 2, got {steps}")

    def grid(n: int) -> torch.Tensor:
        logs = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64)
        sig = torch.cat([logs.exp(), torch.zeros(1, dtype=torch.float64)])
        sig[0], sig[-2] = sigma_max, sigma_min
        return sig

    fine = solve(model, sampler, grid(steps), noise, extra_args)
    coarse = solve(model, sampler, grid(steps // 2), noise, extra_args)
    return fine, rmse(fine, coarse) / 3


def schedule_error(
    model: Callable,
    sampler: str,
    sigmas: torch.Tensor,
    noise: torch.Tensor,
    reference: torch.Tensor,
    extra_args: dict | None = None,
    options: dict | None = None,
) -> float:
    """L(σ): the RMSE of the sampler's result against the reference (module docstring)."""
    return rmse(solve(model, sampler, sigmas, noise, extra_args, options), reference)


# -- optimisation -------------------------------------------------------------------------------------------


def _restarted_nelder_mead(objective, x0, best, step, budget, round_evals, tol, say, what) -> tuple:
    """Nelder–Mead (adaptive) from x0, restarted from its result with a fresh simplex of `step` (a scalar
    or one per coordinate) until a restart gains less than the fraction `tol` or `budget` evaluations are
    spent. best: objective(x0). Returns (x, best, [best after each round])."""
    from scipy import optimize

    x, rounds, used = np.asarray(x0, np.float64), [], 0
    while used < budget:
        n = len(x)
        room = min(round_evals, budget - used)
        if room < n + 2:
            break
        simplex = np.vstack([x, x + np.diag(np.broadcast_to(np.asarray(step, np.float64), (n,)))])
        opts = {"initial_simplex": simplex, "maxfev": room, "adaptive": True, "xatol": 1e-4, "fatol": 1e-9}
        res = optimize.minimize(objective, x, method="Nelder-Mead", options=opts)
        used += int(res.nfev)
        gain = best - float(res.fun)
        if res.fun < best:
            x, best = res.x, float(res.fun)
        rounds.append(best)
        say(f"{what} round {len(rounds)}: RMSE {best:.4g}")
        if gain <= tol * best:
            break
    return x, best, rounds


def tune(
    model: Callable,
    sampler: str,
    steps: int,
    sigma_min: float,
    sigma_max: float,
    noise: torch.Tensor,
    reference: torch.Tensor,
    extra_args: dict | None = None,
    options: dict | None = None,
    starts: dict[str, torch.Tensor] | None = None,
    max_evals: int = 1000,
    round_evals: int = 300,
    simplex_step: float = 0.5,
    tol: float = 1e-3,
    log: Callable[[str], None] | None = None,
    shifts: bool = False,
    shift_step: float = 0.05,
) -> TuneResult:
    """The schedule of `steps` steps from σ_max to σ_min (then 0) minimising `sampler`'s RMSE against
    `reference` (the exact or many-step solution from `noise`·σ_max: `reference_solution`).

    model: D(x, σ, **extra_args) -> x̂₀; noise: [B, ...] unit start noises; options: the sampler's
    keyword options (e.g. eta=0); starts: candidate starting schedules (default: `stock_schedules`), the
    best of which starts the search; max_evals: objective evaluations in all; round_evals: per Nelder–Mead
    run, restarted from its result with a fresh simplex of `simplex_step` (in logits: ±e^0.5 in a gap
    ratio) until a restart gains less than the fraction `tol` or the budget is spent. shifts: then fit the
    schedule and one evaluation shift δ_i per positive σ_i together (`ShiftedDenoiser`, module docstring),
    from the tuned schedule and δ = 0, with up to `max_evals` more evaluations (simplex ±`shift_step` in δ).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    get_sampler(sampler)
    if reference.shape != noise.shape:
        raise ValueError(f"reference {tuple(reference.shape)} and noise {tuple(noise.shape)} differ in shape")
    say = log or (lambda _: None)
    evals = 0

    def error(sig: torch.Tensor, delta=None) -> float:
        nonlocal evals
        evals += 1
        m = model if delta is None else ShiftedDenoiser(model, sig, delta)
        return schedule_error(m, sampler, sig, noise, reference, extra_args, options)

    # no free σ at ≤ 2 steps: [σ_max, 0] or [σ_max, σ_min, 0]
    fixed = torch.tensor([sigma_max, *([sigma_min] if steps == 2 else []), 0.0], dtype=torch.float64)
    if steps <= 2:
        e = error(fixed)
        stock, start, theta, best, rounds = {"fixed": e}, "fixed", np.zeros(0), e, [e]
    else:
        cands = dict(starts if starts is not None else stock_schedules(steps, sigma_min, sigma_max))
        stock = {}
        for name, s in cands.items():
            s = fixed_ends(validate_sigmas(s), sigma_min, sigma_max)
            if s is None or len(s) != steps + 1:
                raise ValueError(
                    f"start schedule {name!r} is not {steps + 1} values σ_max={sigma_max:g} … "
                    f"σ_min={sigma_min:g}, 0"
                )
            cands[name] = s
            stock[name] = error(s)
        start = min(stock, key=stock.get)
        theta, best = logits_from_schedule(cands[start]), stock[start]
        listed = ", ".join(f"{k} {v:.4g}" for k, v in stock.items())
        say(f"start: {start} (RMSE {best:.4g}); stock: {listed}")
        theta, best, rounds = _restarted_nelder_mead(
            lambda th: error(schedule_from_logits(th, sigma_min, sigma_max)),
            theta, best, simplex_step, max_evals - evals, round_evals, tol, say, "schedule",
        )  # fmt: skip
    k = len(theta)

    def schedule(p: np.ndarray) -> torch.Tensor:
        return fixed if k == 0 else schedule_from_logits(p[:k], sigma_min, sigma_max)

    delta = []
    if shifts:
        p0 = np.concatenate([theta, np.zeros(steps)])
        step = np.concatenate([np.full(k, simplex_step * 0.1), np.full(steps, shift_step)])
        p, best, more = _restarted_nelder_mead(
            lambda q: error(schedule(q), q[k:]), p0, best, step, max_evals, round_evals, tol, say, "joint"
        )
        theta, delta, rounds = p[:k], [float(v) for v in p[k:]], rounds + more
    sig = schedule(theta)
    return TuneResult(sampler, steps, sig.tolist(), best, stock, start, evals, rounds, options or {}, delta)


# -- a pipeline's own denoiser ------------------------------------------------------------------------------


@dataclass
class Problem:
    """What the objective runs on: the denoiser, the start noises, their conditioning, the σ range."""

    model: Callable
    noise: torch.Tensor
    extra_args: dict
    sigma_min: float
    sigma_max: float


@torch.no_grad()
def pipeline_problem(pipe, prompts: list[str], seed: int = 0, cfg: float | None = None, size=None) -> Problem:
    """`pipe`'s own guided denoiser (CFGDenoiser at `cfg`, default: the model's; empty negative prompt) on
    `prompts` at `size` (width, height; default: the model's), one start noise per prompt from `seed`, over
    the model's σ range."""
    from latentforge import families
    from latentforge.guidance import CFGDenoiser

    cfg = float(pipe.defaults["cfg"] if cfg is None else cfg)
    w, h = pipe.check_size(*(size or pipe.default_size))
    negatives = [""] * len(prompts)
    enc = pipe._text_encoders()  # cond and uncond padded to one chunk count, as Pipeline._sample does
    chunks = max(families.chunk_count(pipe.family, enc, p, "a1111") for p in (prompts, negatives))
    cond = pipe.encode_prompt(prompts, w, h, chunks=chunks)
    uncond = None if cfg == 1 else pipe.encode_prompt(negatives, w, h, True, chunks=chunks)
    f, g = pipe.downscale, torch.Generator().manual_seed(seed)
    noise = torch.randn(len(prompts), pipe.latent_channels, h // f, w // f, generator=g).to(pipe.device)
    ms = pipe.model_sampling
    model = CFGDenoiser(pipe.denoiser(), scale=cfg)
    return Problem(model, noise, {"cond": cond, "uncond": uncond}, float(ms.sigma_min), float(ms.sigma_max))


@torch.no_grad()
def tune_pipeline(
    pipe,
    prompts: list[str],
    sampler: str,
    steps: list[int],
    seed: int = 0,
    cfg: float | None = None,
    reference_steps: int = 256,
    max_evals: int = 300,
    size: tuple[int, int] | None = None,
    log: Callable[[str], None] | None = None,
    shifts: bool = False,
    coefficients: bool = False,
    iters: int = 200,
) -> tuple[list[TuneResult], dict]:
    """Tune `pipe`'s schedule for `sampler` at each step count in `steps` on `pipeline_problem(pipe,
    prompts, seed, cfg, size)`; the reference (`reference_solution`) is computed once for all step counts.
    shifts: also fit one evaluation shift per step (`tune(shifts=True)`; up to `max_evals` more runs each).
    coefficients: fit ipndm's schedule, shifts (if `shifts`) and step coefficients by gradient instead
    (tune_solver.py; `iters` Adam steps on all the prompts, each a forward and backward pass through every
    step). Returns the results and what the schedule files record about the run."""
    if coefficients and sampler != "ipndm":
        raise ValueError(f"solver coefficients are tuned for sampler 'ipndm' only, got {sampler!r}")
    say = log or (lambda _: None)
    p = pipeline_problem(pipe, prompts, seed, cfg, size)
    say(f"reference: heun, {reference_steps} steps on {len(prompts)} prompts (and {reference_steps // 2})")
    ref, ref_err = reference_solution(
        p.model, p.noise, p.sigma_min, p.sigma_max, p.extra_args, "heun", reference_steps
    )
    say(f"reference error ≈ {ref_err:.3g} RMSE")
    results = []
    for n in steps:
        starts = stock_schedules(n, p.sigma_min, p.sigma_max, pipe.model_sampling)
        rounds = max(50, max_evals // 3)
        if coefficients:
            results.append(_tune_pipeline_solver(pipe, p, n, ref, starts, iters, shifts, say))
            continue
        args = (p.model, sampler, n, p.sigma_min, p.sigma_max, p.noise, ref, p.extra_args)
        results.append(
            tune(*args, starts=starts, max_evals=max_evals, round_evals=rounds, log=say, shifts=shifts)
        )
    info = {
        "prompts": len(prompts),
        "seed": seed,
        "cfg": float(p.model.scale),
        "size": list(size or pipe.default_size),
        "reference": {"sampler": "heun", "steps": reference_steps, "rmse_estimate": ref_err},
    }
    return results, info


def _tune_pipeline_solver(
    pipe, p: Problem, steps: int, ref, starts, iters: int, shifts: bool, say
) -> TuneResult:
    """tune_solver on the pipeline's problem: gradients through the network's steps, its weights frozen.
    The start is the best stock schedule, scored as tune() does; the loss is the plain MSE (robust=0: a few
    prompts have no rare mode switches to discount) at a rate sized to a network's smoother error."""
    from latentforge.tune_solver import tune_solver

    if steps < 3:
        raise ValueError(f"solver coefficients need --steps >= 3 (fewer leave no σ to tune), got {steps}")
    scores = {k: schedule_error(p.model, "ipndm", s, p.noise, ref, p.extra_args) for k, s in starts.items()}
    first = min(scores, key=scores.get)
    frozen = [(q, q.requires_grad) for q in pipe.net.parameters()]
    try:
        for q, _ in frozen:
            q.requires_grad_(False)
        with torch.enable_grad():
            res = tune_solver(
                p.model, steps, p.sigma_min, p.sigma_max, p.noise, ref, p.extra_args, start=starts[first],
                iters=iters, lr=0.02, coefficient_lr=0.005, robust=0.0, shifts=shifts, log=say,
            )  # fmt: skip
    finally:
        for q, flag in frozen:
            q.requires_grad_(flag)
    res.stock, res.start = scores, first
    return res


# -- files: `<model>.schedule-<sampler>-<steps>.json` beside the model -------------------------------------


def schedule_path(model_path: str, sampler: str, steps: int) -> str:
    """Where the tuned schedule of `sampler` at `steps` steps for the model file `model_path` lives."""
    root, _ = os.path.splitext(model_path)
    return f"{root}.schedule-{sampler}-{steps}.json"


def save(path: str, result: TuneResult, **info) -> str:
    """Write `result` (plus `info`: the model, prompts, reference, …) as JSON, atomically."""
    write_json(path, {"format": FORMAT, **asdict(result), **info})
    return path


def tuned_files(model_path: str) -> list[str]:
    """The tuned schedule files beside `model_path`, by name."""
    folder = os.path.dirname(os.path.abspath(model_path))
    stem = os.path.basename(os.path.splitext(model_path)[0]) + ".schedule-"
    return sorted(f for f in os.listdir(folder) if f.startswith(stem) and f.endswith(".json"))


def load_tuned(model_path: str | None, sampler: str, steps: int) -> torch.Tensor:
    """The tuned σ schedule (float32, N + 1 values ending in 0) of `sampler` at `steps` steps for the model
    file `model_path`; a clear error naming the file and the command that makes it when it is missing."""
    return read_tuned(model_path, sampler, steps)[0]


def read_tuned(
    model_path: str | None, sampler: str, steps: int
) -> tuple[torch.Tensor, list[float], list | None]:
    """`load_tuned`'s schedule, the file's evaluation shifts δ_i (N finite values, one per positive σ_i,
    for `ShiftedDenoiser`; [] when it has none: `tune-schedule` without `--shifts`) and its solver
    coefficients (ipndm's `coefficients` option, tune_solver.py; None when it has none)."""
    if model_path is None:
        raise ValueError(
            "scheduler 'tuned' reads a schedule stored beside the model file; this pipeline was not loaded "
            "from a file (Pipeline.from_single_file)"
        )
    path = schedule_path(model_path, sampler, steps)
    if not os.path.isfile(path):
        have = tuned_files(model_path)
        from latentforge.pipeline import DEFAULT_MODEL

        model = "default" if os.path.abspath(model_path) == os.path.abspath(DEFAULT_MODEL) else model_path
        raise FileNotFoundError(
            f"no tuned schedule for sampler {sampler!r} at {steps} steps: {path} does not exist; make it "
            f"with `latentforge tune-schedule --model {model} --sampler {sampler} --steps {steps}`"
            + (f" (tuned schedules of this model: {', '.join(have)})" if have else "")
        )
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        sig = validate_sigmas(torch.tensor(data["sigmas"], dtype=torch.float32))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a tuned schedule file ({type(e).__name__}: {e})") from None
    if data.get("sampler") != sampler or data.get("steps") != steps or len(sig) != steps + 1 or sig[-1] != 0:
        raise ValueError(
            f"{path} holds a schedule for sampler {data.get('sampler')!r} at {data.get('steps')!r} steps "
            f"({len(sig) - 1} σ steps), not {sampler!r} at {steps}: re-run `latentforge tune-schedule`"
        )
    shifts = data.get("shifts") or []
    ok = isinstance(shifts, list) and all(type(v) in (int, float) for v in shifts)
    if not ok or (shifts and (len(shifts) != steps or not all(math.isfinite(v) for v in shifts))):
        raise ValueError(
            f"{path} holds evaluation shifts {shifts!r}: expected {steps} finite numbers (one per step) or "
            "none; re-run `latentforge tune-schedule`"
        )
    coefficients = (data.get("options") or {}).get("coefficients")
    if coefficients is not None:
        rows = coefficients if isinstance(coefficients, list) else [None]
        ok = all(
            isinstance(r, list) and all(type(v) in (int, float) and math.isfinite(v) for v in r) for r in rows
        )
        if sampler != "ipndm" or not ok or len(rows) != steps - 1:
            raise ValueError(
                f"{path} holds solver coefficients {coefficients!r}: expected ipndm's, {steps - 1} lists of "
                "finite numbers; re-run `latentforge tune-schedule`"
            )
    return sig, [float(v) for v in shifts] if any(shifts) else [], coefficients
