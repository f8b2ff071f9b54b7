"""`latentforge bench samplers`: every sampler on a Gaussian-mixture oracle over the SD1 σ range.

Deterministic samplers are scored by the RMS error against the probability-flow ODE solution
(RK4 in log σ on a fine grid; its own error is ~1e-9, far below any sampler's). Stochastic samplers
are scored by the sliced Wasserstein-1 distance between their samples and fresh samples of the
mixture (`sliced_w1`; `sw_floor` is the same distance between two independent mixture samples of that
size, the noise floor) and by the Fréchet distance between the samples' mean/covariance and the
mixture's exact ones (`frechet`, with its own floor). NFE is counted as model calls.

Every sampler also gets a measured convergence order (`order`): the slope of −log(max error) against
log(steps) over Karras schedules of ORDER_STEPS steps ending in 0, on a single Gaussian whose exact
answer is closed form (the probability-flow ODE to the last positive σ, then the exact denoise; for
LMS the ODE to 0 and for ComfyUI's dpm_fast the ODE to the last positive σ, which is what they
compute, see FINAL), run in its deterministic form (eta = 0; ER-SDE with φ(v) = v, i.e. no noise).
Samplers without one (lcm) or without a step count (dpm_adaptive*) have none. It covers ComfyUI's
names and our `_exact` variants alike, so the two can be compared (see latentforge.samplers).
"""

from __future__ import annotations

import inspect
import json
import os
import time

import torch
from tqdm.auto import tqdm

from latentforge.files import atomic_path
from latentforge.gmm import GaussianMixture
from latentforge.noise import BrownianTreeNoiseSampler
from latentforge.plot import draw_curves, figure, save_figure
from latentforge.samplers import ALL_SAMPLER_NAMES, SAMPLERS
from latentforge.schedules import get_sigmas_karras
from latentforge.stats import frechet_distance

SIGMA_MIN, SIGMA_MAX = 0.0291675, 14.614642  # SD1's σ table ends (reference samplers.md §1b)
NFE_TARGETS = (5, 10, 20, 50)

# Samplers with no randomness at their default options.
DETERMINISTIC = {
    "euler", "euler_cfg_pp", "heun", "heunpp2", "dpm_2", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2m",
    "dpmpp_2m_cfg_pp", "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp",
    "gradient_estimation", "gradient_estimation_cfg_pp", "ddim", "uni_pc", "uni_pc_bh2", "dpm_fast_exact",
    "dpm_adaptive_exact", "dpmpp_2m_exact", "ipndm_v_exact", "res_multistep_exact",
    "res_multistep_cfg_pp_exact", "uni_pc_exact", "uni_pc_bh2_exact",
}  # fmt: skip
ADAPTIVE = ("dpm_adaptive", "dpm_adaptive_exact")
ORDER_STEPS = (20, 40, 80, 160)


class _Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, sigma, **kw):
        self.calls += 1
        return self.fn(x, sigma, **kw)


def sliced_w1(a: torch.Tensor, b: torch.Tensor, n_proj: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-1 (Rabin et al. 2011): mean over random directions of the 1-D W1 between
    sorted projections. a, b: [N, D] with the same N."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], n_proj, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, _ = (a.double() @ dirs).sort(dim=0)
    pb, _ = (b.double() @ dirs).sort(dim=0)
    return float((pa - pb).abs().mean())


def frechet(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> float:
    """Fréchet distance (`stats.frechet_distance`) between N(mean(x), cov(x)) of samples x [N, D] and
    N(mean, cov)."""
    x = x.double().cpu()
    return frechet_distance(x.mean(0), torch.cov(x.T), mean, cov)


# dpm_adaptive picks its own steps: its NFE is set through the tolerance (rtol, with atol = rtol/6.4 as in
# its defaults 0.05 / 0.0078); the bench takes the loosest tolerance whose NFE reaches the target.
ADAPTIVE_RTOLS = (0.5, 0.3, 0.2, 0.1, 0.05, 0.03, 0.02, 0.01, 0.005, 0.002, 0.001, 5e-4, 2e-4, 1e-4)


def _run(name, D, x, sigmas, seed, rtol=None):
    fn = SAMPLERS[name]
    model = _Counter(D)
    kwargs = {} if rtol is None else {"rtol": rtol, "atol": rtol / 6.4}
    raw = inspect.signature(inspect.unwrap(fn)).parameters
    if name not in DETERMINISTIC and (
        "noise_sampler" in raw or any(p.kind == p.VAR_KEYWORD for p in raw.values())
    ):
        kwargs["noise_sampler"] = BrownianTreeNoiseSampler(
            x, SIGMA_MIN * 0.5, SIGMA_MAX, [seed], per_image=False, tol=1e-4
        )
    out = fn(model, x, sigmas, disable=True, **kwargs)
    return out, model.calls


def _adaptive_rtol_for_nfe(name, D, target, x, sigmas):
    """The loosest rtol whose NFE is at least `target` (dpm_adaptive's NFE depends on the data)."""
    for rtol in ADAPTIVE_RTOLS:
        if _run(name, D, x[:256], sigmas, 0, rtol)[1] >= target:
            return rtol
    return ADAPTIVE_RTOLS[-1]


def _steps_for_nfe(name, D, target, dim):
    """The largest step count whose NFE does not exceed `target` (probed on one point)."""
    x = torch.zeros(1, dim, dtype=torch.float64)
    best = 1
    for steps in range(1, target + 1):
        sig = get_sigmas_karras(steps, SIGMA_MIN, SIGMA_MAX).double()
        _, nfe = _run(name, D, x + sig[0], sig, 0)
        if nfe <= target:
            best = steps
        else:
            break
    return best


# What each sampler's result converges to on a schedule ending in 0, when that is not "the ODE to the
# last positive σ, then the exact denoise": LMS integrates the last interval too (→ the ODE at σ = 0);
# ComfyUI's dpm_fast stops at the last positive σ.
FINAL = {"lms": "ode_to_0", "dpm_fast": "at_sigma_min"}


def _ode_form(name):
    """Options that make `name` deterministic (its ODE limit), or None if it has no such form."""
    if name == "lcm" or name in ADAPTIVE:
        return None
    if name in DETERMINISTIC:
        return {}
    if name.startswith("er_sde"):  # ER-SDE: φ(v) = v gives zero noise
        return {"noise_scaler": lambda v: v}
    return {"eta": 0.0}


def measured_order(name, steps=ORDER_STEPS, n_points: int = 256) -> dict | None:
    """The convergence order of `name` in its deterministic form on a single Gaussian (exact answer)."""
    import numpy as np

    kw = _ode_form(name)
    if kw is None:
        return None
    g = GaussianMixture.single(4)
    noise = torch.randn(n_points, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    final = FINAL.get(name, "denoise")
    errs = []
    for n in steps:
        sig = get_sigmas_karras(n, SIGMA_MIN, SIGMA_MAX).double()
        x = noise * sig[0]
        if final == "ode_to_0":
            exact = g.ode_solution_ve(x, float(sig[0]), 0.0)
        else:
            exact = g.ode_solution_ve(x, float(sig[0]), float(sig[-2]))
            if final == "denoise":
                exact = g.denoise_ve(exact, sig[-2])
        out = SAMPLERS[name](g.denoiser(), x, sig, disable=True, **kw)
        errs.append(float((out - exact).abs().max()))
    slope = -np.polyfit(np.log(steps), np.log(np.maximum(errs, 1e-300)), 1)[0]
    form = ", ".join("noise_scaler=identity" if k == "noise_scaler" else f"{k}={v}" for k, v in kw.items())
    return {"value": round(float(slope), 2), "steps": list(steps), "max_error": errs, "form": form,
            "reference": final}  # fmt: skip


def bench_samplers(out_dir: str, n_det: int = 1024, n_stoch: int = 4096, names=None, quiet=False) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    gmm = GaussianMixture.random(k=4, dim=8, seed=0)
    D = gmm.denoiser()
    names = list(names or ALL_SAMPLER_NAMES)
    g = torch.Generator().manual_seed(1234)
    noise_det = torch.randn(n_det, gmm.dim, generator=g, dtype=torch.float64)
    noise_sto = torch.randn(n_stoch, gmm.dim, generator=g, dtype=torch.float64)
    fine = get_sigmas_karras(160, SIGMA_MIN, SIGMA_MAX).double()
    reference = gmm.ode_reference(noise_det * SIGMA_MAX, fine, substeps=8)
    data = gmm.sample(n_stoch, generator=g)
    fresh = gmm.sample(n_stoch, generator=g)
    floor = sliced_w1(fresh, data)
    fd_floor = frechet(fresh, gmm.mean(), gmm.cov())

    results = {}
    t_start = time.perf_counter()
    bar = tqdm(total=len(names) * len(NFE_TARGETS), desc="samplers", disable=quiet)
    for name in names:
        rows = []
        for target in NFE_TARGETS:
            rtol = None
            if name in ADAPTIVE:  # a schedule only gives its ends; the tolerance sets the NFE
                steps, sig = 0, get_sigmas_karras(2, SIGMA_MIN, SIGMA_MAX).double()
                rtol = _adaptive_rtol_for_nfe(name, D, target, noise_det * sig[0], sig)
            else:
                steps = _steps_for_nfe(name, D, target, gmm.dim)
                sig = get_sigmas_karras(steps, SIGMA_MIN, SIGMA_MAX).double()
            t0 = time.perf_counter()
            if name in DETERMINISTIC:
                out, nfe = _run(name, D, noise_det * sig[0], sig, 0, rtol)
                err = float(((out - reference) ** 2).mean().sqrt())
                rows.append({"nfe_target": target, "steps": steps, "nfe": nfe, "rmse": err})
                if rtol is not None:
                    rows[-1]["rtol"] = rtol
            else:
                out, nfe = _run(name, D, noise_sto * sig[0], sig, 0)
                row = {"nfe_target": target, "steps": steps, "nfe": nfe, "sliced_w1": sliced_w1(out, data)}
                row["frechet"] = frechet(out, gmm.mean(), gmm.cov())
                rows.append(row)
            rows[-1]["seconds"] = round(time.perf_counter() - t0, 4)
            bar.update(1)
        results[name] = {
            "kind": "deterministic" if name in DETERMINISTIC else "stochastic",
            "runs": rows,
            "order": measured_order(name),
        }
    bar.close()

    report = {
        "oracle": {"mixture_components": 4, "dim": gmm.dim, "sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX},
        "schedule": "karras (rho=7)",
        "n_deterministic": n_det,
        "n_stochastic": n_stoch,
        "sw_floor": floor,
        "frechet_floor": fd_floor,
        "seconds": round(time.perf_counter() - t_start, 2),
        "samplers": results,
    }
    with atomic_path(os.path.join(out_dir, "samplers.json")) as tmp, open(tmp, "w") as f:
        json.dump(report, f, indent=1)

    save_plot(report, os.path.join(out_dir, "samplers.png"))
    return report


def save_plot(report: dict, path: str) -> None:
    """samplers.png: error against NFE, one panel per kind (ODE: RMSE, SDE: sliced W1 with its floor)."""
    panels = []
    for kind, key, title, ylabel in (
        ("deterministic", "rmse", "ODE samplers: RMSE against the exact probability-flow solution", "RMSE"),
        ("stochastic", "sliced_w1", "SDE samplers: sliced W1 to samples of the mixture", "sliced W1"),
    ):
        series = {
            name: ([row["nfe"] for row in r["runs"]], [row[key] for row in r["runs"]])
            for name, r in report["samplers"].items()
            if r["kind"] == kind
        }
        if series:
            panels.append((kind, series, title, ylabel))
    if not panels:
        return
    fig = figure(
        (1400, 60 + 620 * len(panels)),
        rows=len(panels),
        title="latentforge: samplers on a 4-component Gaussian mixture (8-D), SD1 σ range, Karras schedule",
    )
    for ax, (kind, series, title, ylabel) in zip(fig.axes, panels, strict=True):
        draw_curves(ax, series, title, "NFE (model calls)", ylabel, logx=True, logy=True)
        if kind == "stochastic":
            floor = report["sw_floor"]
            ax.axhline(floor, color="0.3", linewidth=1.0, linestyle=(0, (1, 2)))
            ax.annotate(
                f"noise floor {floor:.3g} (two independent mixture samples)",
                (0.01, floor),
                xycoords=("axes fraction", "data"),
                xytext=(0, 3),
                textcoords="offset points",
                fontsize="small",
                color="0.3",
            )
    save_figure(fig, path)


def format_table(report: dict) -> str:
    head = f"{'sampler':36s} {'kind':5s} " + " ".join(f"{'NFE~' + str(t):>16s}" for t in NFE_TARGETS)
    head += f" {'order':>6s}"
    lines = [head, "-" * len(head)]
    for name, r in report["samplers"].items():
        cells = []
        for row in r["runs"]:
            v = row.get("rmse", row.get("sliced_w1"))
            cells.append(f"{v:10.3e} ({row['nfe']:>3d})")
        kind = "ODE" if r["kind"] == "deterministic" else "SDE"
        order = r.get("order")
        o = "-" if order is None else f"{order['value']:.2f}"
        lines.append(f"{name:36s} {kind:5s} " + " ".join(f"{c:>16s}" for c in cells) + f" {o:>6s}")
    steps = "..".join(str(n) for n in (ORDER_STEPS[0], ORDER_STEPS[-1]))
    lines.append(
        f"ODE: RMSE against the exact probability-flow solution; SDE: sliced W1 to mixture samples "
        f"(noise floor {report['sw_floor']:.3e}; Fréchet distances to the exact moments are in the JSON). "
        f"(n) = measured NFE. order: measured convergence order of the deterministic form (eta = 0) over "
        f"{steps} Karras steps on a single Gaussian, against the exact ODE solution then denoise "
        f"(lms: the ODE to 0; dpm_fast: the ODE to the last positive σ, what they compute). "
        f"{report['seconds']:.1f} s."
    )
    return "\n".join(lines)
