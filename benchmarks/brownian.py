"""The Brownian-tree samplers' own cost: our per-image-seeded batched tree against k-diffusion's one tree.

Each run samples an SD-sized latent [B, 4, 64, 64] in float32 on the CPU with a free analytic denoiser
(the exact x̂₀ of Gaussian data, so the time is the sampler and its noise, not a network) over a Karras
schedule on SD's σ range:

- ours: latentforge's sampler with its default noise (`SeededBrownianNoiseSampler`: image k seeded
  seed + k, one batched counter-based tree);
- k-diffusion: k-diffusion 0.1.1's own sampler with its `BrownianTreeNoiseSampler(x, σ_min, σ_max,
  seed=0)`, one torchsde tree over the whole batch (image k's noise then depends on the batch);
- old: latentforge's sampler with the torchsde tree per image (`BrownianTreeNoiseSampler`, the previous
  default), once, for context.

ours and k-diffusion alternate (the order swaps every repeat) so both see the same machine load. Times are
CPU seconds of this process (time.process_time: a neighbour's load does not count against either side)
and wall seconds; the ratio ours/k-diffusion is taken per pair and printed as median [min–max].
k-diffusion is loaded from its sampling.py alone (its package __init__ needs torchvision and clip), as in
tests/test_samplers_comfy.py.

    nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/brownian.py [--steps 25] [--repeat 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
import types
import warnings
from functools import partial

import torch

from latentforge.noise import BrownianTreeNoiseSampler
from latentforge.samplers import SAMPLERS
from latentforge.schedules import get_sigmas_karras

SIGMA_MIN, SIGMA_MAX = 0.0291675, 14.614642  # SD1's σ table ends
MU, S = 0.1, 0.8  # the data: N(MU, S²) per element


def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:  # exact x̂₀ of Gaussian data, VE form
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return MU + S**2 / (S**2 + s**2) * (x - MU)


def load_k_diffusion():
    """k_diffusion/sampling.py of the installed k-diffusion 0.1.1, with `utils.append_dims` and the unused
    torchdiffeq import stubbed."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("k-diffusion is not installed: pip install --no-deps k-diffusion==0.1.1")
    pkg, utils, tde = (types.ModuleType(n) for n in ("_kd", "_kd.utils", "torchdiffeq"))
    pkg.__path__ = []
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    tde.odeint = None
    pkg.utils = utils
    sys.modules.update({"_kd": pkg, "_kd.utils": utils})
    sys.modules.setdefault("torchdiffeq", tde)
    mspec = importlib.util.spec_from_file_location(
        "_kd.sampling", f"{spec.submodule_search_locations[0]}/sampling.py"
    )
    module = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(module)
    return module


def timed(fn) -> tuple[float, float, torch.Tensor]:
    """(CPU seconds, wall seconds, result) of fn()."""
    c, w = time.process_time(), time.perf_counter()
    out = fn()
    return time.process_time() - c, time.perf_counter() - w, out


def spread(v: list[float]) -> str:
    return f"{statistics.median(v):6.2f} [{min(v):.2f}–{max(v):.2f}]"


def run_ours(name: str, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    return SAMPLERS[name](denoise, x, sigmas, seed=0)  # image k: seed k, the default noise


def run_kd(K, name: str, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    ns = K.BrownianTreeNoiseSampler(x, SIGMA_MIN, SIGMA_MAX, seed=0)  # one tree over the batch
    return getattr(K, f"sample_{name}")(denoise, x, sigmas, noise_sampler=ns, disable=True)


def run_old(name: str, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    ns = BrownianTreeNoiseSampler(x, SIGMA_MIN, SIGMA_MAX, list(range(x.shape[0])))  # a tree per image
    return SAMPLERS[name](denoise, x, sigmas, noise_sampler=ns)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--batches", type=int, nargs="+", default=[8, 64])
    p.add_argument("--samplers", nargs="+", default=["dpmpp_2m_sde", "dpmpp_sde"])
    p.add_argument("--old", type=int, default=1, help="runs of the old per-image torchsde path (0: none)")
    a = p.parse_args()
    warnings.filterwarnings("ignore", message="Should have t")  # torchsde's endpoint rounding
    K = load_k_diffusion()
    sigmas = get_sigmas_karras(a.steps, SIGMA_MIN, SIGMA_MAX)
    threads = torch.get_num_threads()
    print(f"{a.steps} Karras steps on σ ∈ [{SIGMA_MIN}, {SIGMA_MAX}], float32, {threads} thread(s)")
    print("CPU ms per sampling run, median [min–max]; ratio: ours / k-diffusion per alternating pair")
    for batch in a.batches:
        x = torch.randn(batch, 4, 64, 64, generator=torch.Generator().manual_seed(0)) * sigmas[0]
        for name in a.samplers:
            runs = {"ours": partial(run_ours, name, x, sigmas), "kd": partial(run_kd, K, name, x, sigmas)}
            times = {"ours": [], "kd": []}
            for r in range(a.repeat):
                for side in ("ours", "kd") if r % 2 == 0 else ("kd", "ours"):
                    cpu, wall, out = timed(runs[side])
                    assert torch.isfinite(out).all()
                    times[side].append((cpu, wall))
            pairs = list(zip(times["ours"], times["kd"], strict=True))
            ms = {side: [1e3 * c for c, _ in v] for side, v in times.items()}
            cpu_ratio, wall_ratio = ([o[i] / k[i] for o, k in pairs] for i in (0, 1))
            line = (
                f"B={batch:3d} {name:13s} ours {spread(ms['ours'])}  k-diffusion {spread(ms['kd'])}  "
                f"ratio cpu {spread(cpu_ratio)}  wall {spread(wall_ratio)}"
            )
            if a.old:
                old = min(1e3 * timed(partial(run_old, name, x, sigmas))[0] for _ in range(a.old))
                kd = statistics.median(ms["kd"])
                line += f"  old per-image torchsde {old:.0f} ({old / kd:.1f}× k-diffusion)"
            print(line, flush=True)


if __name__ == "__main__":
    main()
