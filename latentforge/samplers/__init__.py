"""Samplers: pure functions f(model, x, sigmas, extra_args=None, callback=None, disable=None, **options).

`model(x, σ[B], **extra_args)` returns the denoised x̂₀; `x` enters as noise·σ₀; `sigmas` decreases
(usually to 0). `SAMPLERS` holds every sampler; its entries validate the sigmas, check every model
output for NaN/inf (naming the step), and cast model outputs to x's dtype. The raw `sample_<name>`
functions live in the group modules.

Names: `SAMPLER_NAMES` are ComfyUI's 42 sampler names, and each computes what ComfyUI computes under
that name (its step counts, defaults, treatment of the last step, noise form of flow models and kind
of noise; the k-diffusion ones are tested against k-diffusion 0.1.1, the others against independent
re-derivations and closed-form answers, tests/test_samplers_comfy.py); UniPC too, whose ComfyUI
implementation steps to σ = 0.001 instead of denoising at the end (see `sample_uni_pc`).
Where we measured a more accurate formula it has a name of its own, `EXACT_SAMPLER_NAMES`
(`<comfy name>_exact`; `EXACT_VARIANT_OF` maps it to the ComfyUI name it departs from; each
docstring says how and by how much). `ALL_SAMPLER_NAMES` lists both.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from latentforge.samplers import dpm_solver, dpmpp, karras, multistep, stochastic
from latentforge.schedules import get_sigmas, unknown_name_error

SAMPLER_NAMES = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm",
    "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde",
    "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
]  # fmt: skip

_RAW_EXACT = {
    **karras.EXACT_SAMPLERS,
    **dpm_solver.EXACT_SAMPLERS,
    **dpmpp.EXACT_SAMPLERS,
    **multistep.EXACT_SAMPLERS,
    **stochastic.EXACT_SAMPLERS,
}
EXACT_SAMPLER_NAMES = list(_RAW_EXACT)
EXACT_VARIANT_OF = {name: name.removesuffix("_exact") for name in EXACT_SAMPLER_NAMES}
ALL_SAMPLER_NAMES = SAMPLER_NAMES + EXACT_SAMPLER_NAMES

# Samplers that add fresh noise at each step (ancestral, SDE, DDPM/LCM re-noising; at their default η or
# s_noise): the sample is not a function of the start noise alone.
STOCHASTIC_SAMPLER_NAMES = {
    "euler_ancestral", "euler_ancestral_cfg_pp", "dpm_2_ancestral", "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm",
    "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver",
    "sa_solver_pece",
}  # fmt: skip
STOCHASTIC_SAMPLER_NAMES |= {n for n, base in EXACT_VARIANT_OF.items() if base in STOCHASTIC_SAMPLER_NAMES}

# ComfyUI computes the schedule for steps+1 and drops the second-to-last σ for these (KSampler).
DISCARD_PENULTIMATE_SIGMA_SAMPLERS = {"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"}


def validate_sigmas(sigmas) -> torch.Tensor:
    sigmas = torch.as_tensor(sigmas)
    if not sigmas.is_floating_point():
        sigmas = sigmas.float()
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(
            f"sigmas must be a 1-D tensor of at least 2 values (steps >= 1), got shape {tuple(sigmas.shape)}"
        )
    if not torch.isfinite(sigmas).all():
        bad = int((~torch.isfinite(sigmas)).nonzero()[0])
        raise ValueError(f"sigmas[{bad}] = {float(sigmas[bad])} is not finite")
    if (sigmas < 0).any():
        bad = int((sigmas < 0).nonzero()[0])
        raise ValueError(f"sigmas[{bad}] = {float(sigmas[bad])} is negative; σ must be >= 0")
    step = sigmas[1:] >= sigmas[:-1]
    if step.any():
        i = int(step.nonzero()[0])
        raise ValueError(
            f"sigmas must be strictly decreasing: step {i} goes from σ={float(sigmas[i]):.6g} "
            f"to σ={float(sigmas[i + 1]):.6g}"
        )
    return sigmas


class _CheckedModel:
    """Forwards to the denoiser; raises on a non-finite output naming the step and σ.

    On the CPU each output is checked as it comes. On an accelerator reading a flag back to the host waits
    for the device, so the flags stay there (`deferred`) and `finish` reads them once, after the last
    step: the loop has no per-step host sync (a CUDA-graph-friendly loop; tests/test_device_path.py)."""

    def __init__(self, model, sigmas: torch.Tensor, name: str, deferred: bool = False):
        self.model, self.sigmas, self.name, self.deferred = model, sigmas, name, deferred
        self.model_sampling = getattr(model, "model_sampling", None)
        self.flags: list[tuple[torch.Tensor, torch.Tensor]] = []  # (all finite, σ) per call, deferred only
        if hasattr(model, "with_uncond"):
            self.with_uncond = self._with_uncond

    def _step_of(self, sigma) -> int:
        s = float(torch.as_tensor(sigma).reshape(-1)[0])
        pos = (self.sigmas >= s * (1 - 1e-6)).nonzero()
        return int(pos[-1]) if len(pos) else 0

    def _raise(self, sigma):
        s = float(torch.as_tensor(sigma).reshape(-1)[0])
        raise FloatingPointError(
            f"sampler {self.name!r}: the model returned non-finite values (NaN or inf) at step "
            f"{self._step_of(sigma)} of {len(self.sigmas) - 1} (σ={s:.6g})"
        )

    def _check(self, out, x, sigma):
        finite = torch.isfinite(out).all()
        if self.deferred:
            self.flags.append((finite, sigma))
        elif not finite:
            self._raise(sigma)
        return out.to(x.dtype)

    def finish(self) -> None:
        """The deferred checks, in call order: one host read for the whole run."""
        if self.flags and not bool(torch.stack([f for f, _ in self.flags]).all()):
            self._raise(next(s for f, s in self.flags if not f))

    def __call__(self, x, sigma, **kw):
        return self._check(self.model(x, sigma, **kw), x, sigma)

    def _with_uncond(self, x, sigma, **kw):
        d, u = self.model.with_uncond(x, sigma, **kw)
        return self._check(d, x, sigma), self._check(u, x, sigma)


# samplers whose own control flow reads the state (error-controlled step sizes): a NaN must stop them
# at once, so their model outputs are checked as they come on every device
ADAPTIVE = {"dpm_adaptive", "dpm_adaptive_exact"}


def _checked(name: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def run(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        # the schedule stays on the host: samplers read σ's as numbers for their coefficients and control
        # flow (free on the CPU, a sync per read on a GPU); svec() sends each step's σ to x's device
        sigmas = validate_sigmas(sigmas).cpu()
        checked = _CheckedModel(model, sigmas, name, deferred=x.device.type != "cpu" and name not in ADAPTIVE)
        out = fn(checked, x, sigmas, extra_args, callback, disable, **options)
        checked.finish()
        info = None
        if isinstance(out, tuple):  # dpm_adaptive(return_info=True) -> (x, info)
            out, info = out
        if not torch.isfinite(out).all():
            raise FloatingPointError(f"sampler {name!r} produced non-finite values from finite model outputs")
        out = out.to(x.dtype)  # a bfloat16 x may be carried in float32 inside; hand back its dtype
        return out if info is None else (out, info)

    return run


_RAW = {
    **karras.SAMPLERS,
    **dpm_solver.SAMPLERS,
    **dpmpp.SAMPLERS,
    **multistep.SAMPLERS,
    **stochastic.SAMPLERS,
    **_RAW_EXACT,
}
SAMPLERS: dict[str, Callable] = {name: _checked(name, _RAW[name]) for name in ALL_SAMPLER_NAMES}


def get_sampler(name: str) -> Callable:
    if name not in SAMPLERS:
        raise unknown_name_error("sampler", name, ALL_SAMPLER_NAMES)
    return SAMPLERS[name]


def sigmas_for(sampler: str, scheduler: str, model_sampling, steps: int) -> torch.Tensor:
    """The schedule a KSampler-style front end uses: for the samplers that discard the penultimate σ,
    compute steps+1 and drop it, so the sampler still takes `steps` steps."""
    get_sampler(sampler)
    if sampler in DISCARD_PENULTIMATE_SIGMA_SAMPLERS:
        sig = get_sigmas(model_sampling, scheduler, steps + 1)
        return torch.cat([sig[:-2], sig[-1:]])
    return get_sigmas(model_sampling, scheduler, steps)
