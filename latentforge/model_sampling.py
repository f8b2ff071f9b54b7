"""Model sampling: how a raw network becomes a denoiser D(x, σ) -> x̂₀, and which σ it knows.

Three families, each written from its paper:
- `DiscreteVP`: DDPM-style 1000-step variance-preserving models (SD1/2/XL), eps or v prediction.
  In VE form x = x₀ + σ·ε with σ² = (1 − ᾱ)/ᾱ (Karras et al. 2022, Table 1, "VP" column);
  the network sees the VP input x/√(1+σ²) and the discrete timestep t(σ).
- `EDM`: continuous VE with preconditioning c_skip, c_out, c_in, c_noise (Karras et al. 2022, Eq. 7, Table 1).
- `DiscreteFlow`: rectified flow x = (1 − σ)·x₀ + σ·ε, velocity v = ε − x₀, with the timestep shift
  σ' = s·σ/(1 + (s − 1)·σ) of SD3 (Esser et al. 2024, Eq. 23), timestep = 1000·σ.

Every class exposes the protocol the schedules need (`sigmas` ascending, `sigma_min`, `sigma_max`,
`timestep(σ)`, `sigma(t)`), the noise form samplers need (`is_flow`, `alpha(σ)`: x = α(σ)·x₀ + σ·ε),
`noise_scaling` for img2img, the preconditioning D = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, t(σ))
(Karras et al. 2022, Eq. 7) as `c_skip`, `c_out`, `c_in` (the trainer regresses F onto
(x₀ − c_skip·x)/c_out), `calculate_input` / `calculate_denoised` to wrap a network, and
`to_json` / `from_json` so a checkpoint's metadata names the model sampling it was trained with.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from latentforge.schedules import make_betas, rescale_zero_terminal_snr


def _append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    v = torch.as_tensor(v)
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


class _LogSigmaTable:
    """σ(t) and t(σ) by linear interpolation in log σ over a discrete table (k-diffusion)."""

    sigmas: torch.Tensor  # [T] ascending in t

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def _log_sigmas(self, device: torch.device) -> torch.Tensor:
        """log σ table [T] in float64 on `device`, copied there once (the model's σ's live on its device)."""
        tables = self.__dict__.setdefault("_log_sigma_tables", {})
        if device not in tables:
            tables[device] = self.sigmas.double().log().to(device)
        return tables[device]

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        log_sigmas = self._log_sigmas(sigma.device)
        log_sigma = sigma.clamp_min(1e-30).log()
        dists = log_sigma.reshape(-1, 1) - log_sigmas.reshape(1, -1)  # [N, T]
        low = (dists >= 0).cumsum(dim=1).argmax(dim=1).clamp(max=log_sigmas.shape[0] - 2)
        high = low + 1
        lo, hi = log_sigmas[low], log_sigmas[high]
        w = ((lo - log_sigma.reshape(-1)) / (lo - hi)).clamp(0, 1)
        t = (1 - w) * low + w * high
        return t.reshape(sigma.shape).to(torch.float32 if sigma.dtype != torch.float64 else torch.float64)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(timestep, dtype=torch.float64).clamp(0, self.sigmas.shape[0] - 1)
        low = t.floor().long()
        high = t.ceil().long()
        w = t - low
        log_sigmas = self.sigmas.double().log()
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp().to(self.sigmas.dtype)


@dataclass
class DiscreteVP(_LogSigmaTable):
    """SD1/2/XL: 1000 discrete steps, `scaled_linear` betas 0.00085..0.012, eps or v prediction.

    `shift` α multiplies every σ of the table (SNR divided by α²): the shifted schedule of Hoogeboom et al.
    2023 (§3.1: a d×-larger image keeps the SNR of its d×d-pixel averages if SNR falls by d²), the VP form
    of SD3's resolution shift (Esser et al. 2024, Eq. 23, which is SNR / α² too). A model trained with it
    must be sampled with it; SD's models are α = 1. The network still sees the table's t (t(α·σ_i) = i).
    """

    prediction: Literal["eps", "v"] = "eps"
    beta_schedule: str = "scaled_linear"
    linear_start: float = 0.00085
    linear_end: float = 0.012
    timesteps: int = 1000
    zero_terminal_snr: bool = False
    sigma_data: float = 1.0
    shift: float = 1.0
    sigmas: torch.Tensor = field(init=False, repr=False)
    alphas_cumprod: torch.Tensor = field(init=False, repr=False)

    is_flow = False

    def __post_init__(self):
        if self.prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {self.prediction!r}")
        if not (isinstance(self.shift, int | float) and math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"shift={self.shift!r} must be a finite number > 0 (1: the table as it is)")
        betas = make_betas(self.beta_schedule, self.timesteps, self.linear_start, self.linear_end)
        if self.zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        ac = torch.cumprod(1.0 - betas, dim=0)
        if self.zero_terminal_snr:
            # σ would be infinite at ᾱ = 0; keep it finite as ComfyUI and A1111 do (σ_max ≈ 1429).
            ac[-1] = 4.8973451890853435e-08
        sigmas = ((1 - ac) / ac).sqrt() * self.shift  # float64; α = 1 leaves the table exact
        if self.shift != 1:
            ac = 1 / (1 + sigmas**2)
        self.alphas_cumprod = ac.float()
        self.sigmas = sigmas.float()

    def alpha(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(torch.as_tensor(sigma))

    # eps: D = x − σ·ε̂ (c_skip 1, c_out −σ); v (Salimans & Ho 2022, Eq. 9 in VE form, σ_d = 1):
    # D = σ_d²/(σ² + σ_d²)·x − σσ_d/√(σ² + σ_d²)·v. c_in = 1/√(σ² + σ_d²) is the VP input x/√(1 + σ²).
    def c_skip(self, sigma: torch.Tensor) -> torch.Tensor:
        if self.prediction == "eps":
            return torch.ones_like(sigma)
        return self.sigma_data**2 / (sigma**2 + self.sigma_data**2)

    def c_out(self, sigma: torch.Tensor) -> torch.Tensor:
        if self.prediction == "eps":
            return -sigma
        return -sigma * self.sigma_data / (sigma**2 + self.sigma_data**2).sqrt()

    def c_in(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / (sigma**2 + self.sigma_data**2).sqrt()

    def calculate_input(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x * _append_dims(self.c_in(sigma), x.ndim)

    def calculate_denoised(self, sigma, model_output, x):
        s = _append_dims(sigma, x.ndim)
        return self.c_skip(s) * x + self.c_out(s) * model_output

    def noise_scaling(self, sigma, noise, latent, max_denoise: bool = False):
        s = _append_dims(sigma, noise.ndim)
        if max_denoise:  # unit-variance VP noise at the top of the schedule
            s = (s**2 + 1).sqrt()
        return latent + noise * s

    def inverse_noise_scaling(self, sigma, latent):
        return latent


@dataclass
class EDM:
    """Karras et al. 2022 preconditioning (Table 1, "ours"): D = c_skip·x + c_out·F(c_in·x, c_noise)."""

    sigma_data: float = 0.5
    sigma_min_: float = 0.002
    sigma_max_: float = 80.0
    prediction: Literal["x0", "v"] = "x0"

    is_flow = False

    @property
    def sigma_min(self) -> torch.Tensor:
        return torch.tensor(self.sigma_min_)

    @property
    def sigma_max(self) -> torch.Tensor:
        return torch.tensor(self.sigma_max_)

    @property
    def sigmas(self) -> torch.Tensor:
        # A 1000-entry table uniform in log σ, so table-based schedules (simple, beta) also work.
        return torch.linspace(math.log(self.sigma_min_), math.log(self.sigma_max_), 1000).exp()

    def timestep(self, sigma):  # c_noise = ¼·ln σ (Table 1)
        return torch.as_tensor(sigma).log() / 4

    def sigma(self, timestep):
        return (torch.as_tensor(timestep) * 4).exp()

    def alpha(self, sigma):
        return torch.ones_like(torch.as_tensor(sigma))

    # Table 1: c_skip = σ_d²/(σ² + σ_d²), c_out = σσ_d/√(σ² + σ_d²) (negated for v), c_in = 1/√(σ² + σ_d²)
    def c_skip(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.sigma_data**2 / (sigma**2 + self.sigma_data**2)

    def c_out(self, sigma: torch.Tensor) -> torch.Tensor:
        c = sigma * self.sigma_data / (sigma**2 + self.sigma_data**2).sqrt()
        return -c if self.prediction == "v" else c

    def c_in(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / (sigma**2 + self.sigma_data**2).sqrt()

    def calculate_input(self, sigma, x):
        return x * _append_dims(self.c_in(sigma), x.ndim)

    def calculate_denoised(self, sigma, model_output, x):
        s = _append_dims(sigma, x.ndim)
        return self.c_skip(s) * x + self.c_out(s) * model_output

    def noise_scaling(self, sigma, noise, latent, max_denoise: bool = False):
        return latent + noise * _append_dims(sigma, noise.ndim)

    def inverse_noise_scaling(self, sigma, latent):
        return latent


def time_snr_shift(shift: float, t: torch.Tensor) -> torch.Tensor:
    """SD3 timestep shift (Esser et al. 2024, Eq. 23): σ' = s·t / (1 + (s − 1)·t)."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


@dataclass
class DiscreteFlow(_LogSigmaTable):
    """Rectified flow (SD3/3.5): x = (1 − σ)·x₀ + σ·ε, the network predicts v = ε − x₀ at t = 1000·σ."""

    shift: float = 3.0
    multiplier: float = 1000.0
    timesteps: int = 1000
    sigmas: torch.Tensor = field(init=False, repr=False)

    is_flow = True

    def __post_init__(self):
        ts = torch.arange(1, self.timesteps + 1, dtype=torch.float64) / self.timesteps
        self.sigmas = time_snr_shift(self.shift, ts).float()

    def timestep(self, sigma):
        return torch.as_tensor(sigma) * self.multiplier

    def sigma(self, timestep):
        return time_snr_shift(self.shift, torch.as_tensor(timestep) / self.multiplier)

    def alpha(self, sigma):
        return 1 - torch.as_tensor(sigma)

    # x₀ = x − σ·v: c_skip 1, c_out −σ, and the network sees x itself (c_in 1)
    def c_skip(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(sigma)

    def c_out(self, sigma: torch.Tensor) -> torch.Tensor:
        return -sigma

    def c_in(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(sigma)

    def calculate_input(self, sigma, x):
        return x

    def calculate_denoised(self, sigma, model_output, x):
        s = _append_dims(sigma, x.ndim)
        return self.c_skip(s) * x + self.c_out(s) * model_output

    def noise_scaling(self, sigma, noise, latent, max_denoise: bool = False):
        s = _append_dims(sigma, noise.ndim)
        return s * noise + (1 - s) * latent

    def inverse_noise_scaling(self, sigma, latent):
        return latent / (1 - _append_dims(sigma, latent.ndim))


ModelSampling = DiscreteVP | EDM | DiscreteFlow
_CLASSES = {c.__name__: c for c in (DiscreteVP, EDM, DiscreteFlow)}


def to_json(ms: ModelSampling) -> str:
    """{"type": class name, **constructor fields}: what a checkpoint's metadata stores."""
    fields = {f.name: getattr(ms, f.name) for f in dataclasses.fields(ms) if f.init}
    return json.dumps({"type": type(ms).__name__, **fields}, sort_keys=True)


def from_json(text: str) -> ModelSampling:
    """The inverse of `to_json`; an unknown type or field is an error naming it."""
    raw = json.loads(text)
    if not isinstance(raw, dict) or raw.get("type") not in _CLASSES:
        got = raw.get("type") if isinstance(raw, dict) else raw
        raise ValueError(f"unknown model sampling {got!r}; known: {', '.join(_CLASSES)}")
    cls = _CLASSES[raw.pop("type")]
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(
            f"{cls.__name__} has no field {unknown[0]!r}; its fields: {', '.join(sorted(known))}"
        )
    return cls(**raw)


def for_prediction(
    prediction: str, zero_terminal_snr: bool = False, sigma_data: float = 0.5, shift: float = 1.0
) -> ModelSampling:
    """The model sampling a network trained with `prediction` needs: "eps"/"v" DDPM (SD's 1000 scaled-linear
    steps, σ times `shift`), "x0"/"edm" EDM with σ_d, "flow" rectified flow with the timestep shift."""
    if prediction in ("eps", "v"):
        return DiscreteVP(prediction=prediction, zero_terminal_snr=zero_terminal_snr, shift=shift)
    if prediction in ("x0", "edm"):
        return EDM(sigma_data=sigma_data)
    if prediction == "flow":
        return DiscreteFlow(shift=shift)
    raise ValueError(f"prediction must be one of 'eps', 'v', 'x0', 'edm', 'flow', got {prediction!r}")


class Denoiser(torch.nn.Module):
    """Wraps a raw network `net(x_in, timestep, **cond)` into D(x, σ, **cond) -> x̂₀.

    The c_* weights are computed in float32 (float64 if x is float64); the network runs in its own
    dtype and its output is cast back (the EDM2 `Precond` boundary).
    """

    def __init__(self, net: torch.nn.Module, model_sampling: ModelSampling, dtype: torch.dtype | None = None):
        super().__init__()
        self.net = net
        self.model_sampling = model_sampling
        self.dtype = dtype

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        xw = x.to(work)
        sigma = torch.as_tensor(sigma, device=x.device).to(work).expand(x.shape[0])
        ms = self.model_sampling
        x_in = ms.calculate_input(sigma, xw)
        t = ms.timestep(sigma).to(device=x.device, dtype=work)
        net_dtype = self.dtype or work
        out = self.net(x_in.to(net_dtype), t.to(net_dtype) if net_dtype.is_floating_point else t, **cond)
        return ms.calculate_denoised(sigma, out.to(work), xw).to(x.dtype)
