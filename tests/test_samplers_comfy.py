"""Each ComfyUI sampler name computes what ComfyUI computes under that name.

1. The samplers ComfyUI takes from k-diffusion are compared with k-diffusion 0.1.1 itself, run on the
   same denoiser, schedule and noise. ComfyUI's versions equal k-diffusion's for eps/v models; its
   KSAMPLER calls `sample_dpm_fast(model, x, σ_min, σ₀, len(sigmas) − 1)` and
   `sample_dpm_adaptive(model, x, σ_min, σ₀)` with σ_min the last positive σ, and the rest with the
   schedule as given. k-diffusion is a test-only dependency installed without its dependencies
   (`pip install --no-deps k-diffusion==0.1.1`, scripts/venv.sh): only `k_diffusion/sampling.py` is
   loaded, by file, with its `utils.append_dims` and the unused `torchdiffeq` import stubbed, because
   the package's __init__ needs torchvision and clip. Without it these tests skip.
2. Samplers that exist only in ComfyUI have no installable reference. Their ComfyUI-name versions are
   checked against independent re-derivations here (written from the papers' equations and the facts
   read in ComfyUI's source, listed per test) and against closed-form answers (latentforge.gmm).
3. The `_exact` variants keep the formulas we measured to be more accurate; their measured orders are
   asserted next to the ComfyUI names' measured orders.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types

import numpy as np
import pytest
import torch

from latentforge.gmm import GaussianMixture
from latentforge.samplers import (
    ALL_SAMPLER_NAMES,
    EXACT_SAMPLER_NAMES,
    EXACT_VARIANT_OF,
    SAMPLER_NAMES,
    SAMPLERS,
)
from latentforge.schedules import get_sigmas_karras

pytestmark = [
    pytest.mark.filterwarnings("ignore:Should have t:UserWarning"),  # torchsde endpoint rounding
    pytest.mark.filterwarnings("ignore:To copy construct from a tensor:UserWarning"),  # k-diffusion's own
]

SMIN, SMAX = 0.0291675, 14.614642
GMM = GaussianMixture.random(k=3, dim=4, seed=0)
D = GMM.denoiser()


def karras(n: int) -> torch.Tensor:
    return get_sigmas_karras(n, SMIN, SMAX).double()


def start(s: torch.Tensor, batch: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * s[0]


def shared_noise(batch: int = 64, seed: int = 5):
    """The same i.i.d. unit noise, in call order, for both implementations."""
    g = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(batch, 4, generator=g, dtype=torch.float64)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# --- k-diffusion 0.1.1 as the reference --------------------------------------------------------------


def _load_k_diffusion_sampling():
    """k_diffusion/sampling.py of the installed k-diffusion, without the package __init__."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = f"{spec.submodule_search_locations[0]}/sampling.py"
    pkg = types.ModuleType("_kdiffusion_ref")
    pkg.__path__ = []
    utils = types.ModuleType("_kdiffusion_ref.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]  # k_diffusion.utils.append_dims
    pkg.utils = utils
    saved = {k: sys.modules.get(k) for k in ("_kdiffusion_ref", "_kdiffusion_ref.utils", "torchdiffeq")}
    sys.modules.update({"_kdiffusion_ref": pkg, "_kdiffusion_ref.utils": utils})
    if saved["torchdiffeq"] is None:  # imported for log_likelihood only
        stub = types.ModuleType("torchdiffeq")
        stub.odeint = None
        sys.modules["torchdiffeq"] = stub
    try:
        mspec = importlib.util.spec_from_file_location("_kdiffusion_ref.sampling", path)
        module = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(module)
    except Exception:  # a k-diffusion we cannot load: the tests skip
        return None
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return module


KD = _load_k_diffusion_sampling()
needs_kd = pytest.mark.skipif(
    KD is None, reason="k-diffusion 0.1.1 not installed (pip install --no-deps k-diffusion==0.1.1)"
)


@contextlib.contextmanager
def float64_default():
    """k-diffusion builds DPM-Solver's λ grid with torch.linspace, in the default dtype: float64 here so
    that both sides compute in double precision (in float32 they differ by float32 rounding, ~1e-6)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def comfy_ksampler(name: str, x, sigmas, **kw):
    """What ComfyUI's KSAMPLER runs for `name` (comfy/samplers.py `ksampler`), on k-diffusion 0.1.1."""
    if name in ("dpm_fast", "dpm_adaptive"):
        sigma_min = sigmas[-1] if float(sigmas[-1]) > 0 else sigmas[-2]
        with float64_default():
            if name == "dpm_fast":
                return KD.sample_dpm_fast(D, x, sigma_min, sigmas[0], len(sigmas) - 1, disable=True, **kw)
            return KD.sample_dpm_adaptive(D, x, sigma_min, sigmas[0], disable=True, **kw)
    return getattr(KD, f"sample_{name}")(D, x, sigmas, disable=True, **kw)


# (ComfyUI name, options, uses noise). Every sampler of k-diffusion 0.1.1 that ComfyUI lists.
KD_CASES = [
    ("euler", {}, False),
    ("euler_ancestral", {"eta": 1.0}, True),
    ("heun", {}, False),
    ("dpm_2", {}, False),
    ("dpm_2_ancestral", {"eta": 1.0}, True),
    ("lms", {}, False),
    ("dpm_fast", {}, False),
    ("dpm_adaptive", {}, False),
    ("dpm_adaptive", {"order": 2, "rtol": 0.01}, False),
    ("dpm_adaptive", {"eta": 1.0, "rtol": 0.02}, True),
    ("dpmpp_2s_ancestral", {"eta": 1.0}, True),
    ("dpmpp_sde", {"eta": 1.0}, True),
    ("dpmpp_2m", {}, False),
    ("dpmpp_2m_sde", {"eta": 1.0}, True),
    ("dpmpp_2m_sde", {"eta": 1.0, "solver_type": "heun"}, True),
    ("dpmpp_3m_sde", {"eta": 0.0}, False),
    ("dpmpp_3m_sde", {"eta": 1.0}, True),
]


@needs_kd
@pytest.mark.parametrize("steps", [3, 10, 25])
@pytest.mark.parametrize(("name", "kw", "noisy"), KD_CASES)
def test_matches_k_diffusion(name, kw, noisy, steps):
    """Schedules ending in 0 (txt2img) and stopping above it (img2img-style `sigmas[:-2]`)."""
    for s in (karras(steps), karras(steps + 2)[:-2]):
        x = start(s)
        extra = {"noise_sampler": shared_noise()} if noisy else {}
        ref = comfy_ksampler(name, x.clone(), s, **kw, **extra)
        extra = {"noise_sampler": shared_noise()} if noisy else {}
        out = SAMPLERS[name](D, x.clone(), s, **kw, **extra)
        assert rel(out, ref) < 1e-12, (name, kw, rel(out, ref))


@needs_kd
def test_dpm_fast_float32_within_rounding():
    """In float32 (k-diffusion's λ grid then in float32 too) the difference is float32 rounding."""
    s = get_sigmas_karras(10, SMIN, SMAX)
    x = start(s.double()).float()
    ref = KD.sample_dpm_fast(GMM.denoiser(dtype=torch.float32), x, s[-2], s[0], len(s) - 1, disable=True)
    out = SAMPLERS["dpm_fast"](GMM.denoiser(dtype=torch.float32), x, s)
    assert rel(out, ref) < 1e-5


@needs_kd
@pytest.mark.parametrize(
    ("name", "kw", "at_least"),
    [
        ("dpm_fast_exact", {}, 1e-3),  # measured 4.2e-2 at 10 steps (N − 1 ODE calls + a final denoise)
        ("dpm_adaptive_exact", {}, 1e-3),  # measured 1.8e-2 (final denoise, per-image error norm)
        ("dpmpp_3m_sde_exact", {"eta": 0.0}, 1e-3),  # measured 3.2e-2
        ("dpmpp_3m_sde_exact", {"eta": 1.0}, 1e-2),  # measured 7.3e-1
    ],
)
def test_exact_variants_are_not_what_k_diffusion_computes(name, kw, at_least):
    s = karras(10)
    x = start(s)
    base = EXACT_VARIANT_OF[name]
    extra = {"noise_sampler": shared_noise()} if kw.get("eta") else {}
    ref = comfy_ksampler(base, x.clone(), s, **kw, **extra)
    extra = {"noise_sampler": shared_noise()} if kw.get("eta") else {}
    assert rel(SAMPLERS[name](D, x.clone(), s, **kw, **extra), ref) > at_least


# --- names ---------------------------------------------------------------------------------------------


def test_names():
    assert len(SAMPLER_NAMES) == 42 and set(SAMPLER_NAMES).isdisjoint(EXACT_SAMPLER_NAMES)
    assert ALL_SAMPLER_NAMES == SAMPLER_NAMES + EXACT_SAMPLER_NAMES
    for name in EXACT_SAMPLER_NAMES:
        assert name.endswith("_exact") and EXACT_VARIANT_OF[name] in SAMPLER_NAMES
        assert SAMPLERS[name].__doc__ and SAMPLERS[EXACT_VARIANT_OF[name]].__doc__


def _slope(ns, errs) -> float:
    return float(-np.polyfit(np.log(ns), np.log(errs), 1)[0])
