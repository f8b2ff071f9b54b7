"""The training objective: how a batch of clean latents x₀ becomes a scalar loss.

One step of denoising score matching (Vincent 2011; Ho et al. 2020; Karras et al. 2022, Eq. 2):
draw a noise level σ and noise ε, form the noisy x, run the raw network F on the model sampling's
input c_in·x at the timestep t(σ), and regress F onto the target of its own parameterisation:

    prediction  noise form (model_sampling)       target of F                          c_out(σ)
    "eps"       x = x₀ + σε  (DiscreteVP, VE)      ε                                    −σ
    "v"         x = x₀ + σε  (DiscreteVP, VE)      v = α_t·ε − σ_t·x₀ (VP units)         −σσ_d/√(σ²+σ_d²)
    "x0"/"edm"  x = x₀ + σε  (EDM)                 (x₀ − c_skip·x)/c_out (Karras Eq. 8)  σσ_d/√(σ²+σ_d²)
    "flow"      x = (1−σ)x₀ + σε (DiscreteFlow)    ε − x₀                               −σ

(α_t = 1/√(1+σ²), σ_t = σ/√(1+σ²); Salimans & Ho 2022, §4 "v-parameterization"; with σ_d = 1
the v row is exactly the (x₀ − c_skip·x)/c_out of the k-diffusion / ComfyUI V_PREDICTION wrapper.)

Mapping to x₀ space. Each model sampling writes the denoiser as D = c_skip·x + c_out·F (for eps and
flow c_skip = 1, c_out = −σ), so the target-space error and the x₀-space error differ by c_out²:

    ‖F − target‖² = ‖D − x₀‖² / c_out(σ)².

The three `weighting` choices are x₀-space weights ω(σ), converted to the target space by c_out²:
per-sample weight w(σ) = ω(σ)·c_out(σ)²; "none" is w = 1 (plain target-space MSE, what DDPM's
L_simple, SD training scripts and SD3 rectified-flow training use).

- "min_snr": ω = min(SNR, γ) (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
  Strategy", Eq. 6 and §3.4), SNR = 1/σ_VE². In each target space this is
  eps: min(SNR, γ)/SNR, v: min(SNR, γ)/(SNR + 1) (σ_d = 1), x₀: min(SNR, γ) — see `min_snr_weight`.
- "edm": ω = λ(σ) = (σ² + σ_d²)/(σ·σ_d)² (Karras et al. 2022, Eq. 8 and Table 1), i.e. 1/c_out² of the
  EDM preconditioning, so with prediction "edm" the per-sample weight is exactly 1 and the effective
  training target (x₀ − c_skip·x)/c_out has unit variance.

For rectified flow the "VE-equivalent" noise level is σ_VE = σ/(1 − σ) (x/(1−σ) = x₀ + σ_VE·ε), so
SNR = ((1 − σ)/σ)² (Esser et al. 2024, §3.1) and the EDM λ is taken at σ_VE.

Noise-level distributions (`sigma_sampling`):
- "uniform_discrete": t ~ U{0, …, T−1}, σ = ms.sigmas[t] (DDPM, Ho et al. 2020, Algorithm 1).
- "lognormal": ln σ ~ N(P_mean, P_std²), P_mean = −1.2, P_std = 1.2 (Karras et al. 2022, Table 1,
  "Training" rows). For DiscreteVP the draw is clamped into the model's table [σ_min, σ_max] so that σ
  and the discrete timestep t(σ) the network sees agree.
- "logit_normal": t = sigmoid(u), u ~ N(m, s²), m = 0, s = 1 (Esser et al. 2024, §3.1, Eq. 19), then
  the resolution shift σ = α·t/(1 + (α − 1)·t) (Esser et al. 2024, §5.3.2, Eq. 23).
- "uniform": t ~ U(0, 1) (rectified flow, Liu et al. 2022), then the same shift.

`terminal_fraction` p: the first round(p·batch) draws of each batch are set to the noise level sampling
starts from: σ = 1 for flow, where x = ε carries no signal and the network must produce the
text-conditional mean (SNR 0; Lin et al. 2024 argue a model must be trained at the terminal SNR it is
sampled from, §3.1); the table's largest σ for DDPM eps and v (SNR ≈ 2·10⁻¹² with `zero_terminal_snr`,
0.0047 with SD's plain `scaled_linear` table). The other draws are as above (the generator's stream is
unchanged). Why it matters: logit-normal t puts 0.04% of its mass above
t = 0.966, yet below that a 16×16 latent's flat background is still readable from x's channel means, so a
model learns to read its global colour from the noise and extrapolates that to σ = 1, where the sampler
starts: it then draws a background the noise suggests, not the one the text states (MODEL_CARD.md, "Why
adherence came slowly").

All loss arithmetic is done in float32 (float64 when x₀ is float64) whatever dtype the network runs in;
tensors follow x₀'s device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from latentforge.model_sampling import (
    EDM,
    DiscreteFlow,
    DiscreteVP,
    ModelSampling,
    for_prediction,
    time_snr_shift,
)

PREDICTIONS = ("eps", "v", "x0", "edm", "flow")
SIGMA_SAMPLINGS = ("uniform_discrete", "lognormal", "logit_normal", "uniform")
WEIGHTINGS = ("none", "min_snr", "edm")
MIN_SNR_TARGETS = ("eps", "v", "x0")

# which noise-level distributions make sense for which noise form
_VE_SAMPLINGS = ("uniform_discrete", "lognormal")
_FLOW_SAMPLINGS = ("uniform_discrete", "logit_normal", "uniform")


def _bad(name: str, value: Any, options) -> ValueError:
    return ValueError(f"{name}={value!r} is not supported; expected one of {', '.join(map(repr, options))}")


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and value > 0):
        raise ValueError(f"{name}={value!r} must be a positive number")


@dataclass
class ObjectiveConfig:
    """What a training step optimises. Defaults: DDPM ε-prediction, t ~ U{0..999}, unweighted."""

    prediction: str = "eps"  # "eps" | "v" | "x0" (= "edm") | "flow"
    sigma_sampling: str = "uniform_discrete"  # "uniform_discrete" | "lognormal" | "logit_normal" | "uniform"
    weighting: str = "none"  # "none" | "min_snr" | "edm"
    min_snr_gamma: float = 5.0  # Hang et al. 2023 recommend γ = 5
    p_mean: float = -1.2  # Karras et al. 2022, Table 1
    p_std: float = 1.2
    logit_mean: float = 0.0  # Esser et al. 2024, §3.1 (m = 0, s = 1 was their best)
    logit_std: float = 1.0
    shift: float = 1.0  # resolution shift α, SNR / α²: flow (SD3 Eq. 23; 3.0 at 1024²) and DDPM (σ table × α)
    sigma_data: float = 0.5  # EDM preconditioning and λ(σ)
    zero_terminal_snr: bool = False  # DDPM only (Lin et al. 2024); pair it with prediction="v"
    terminal_fraction: float = 0.0  # this share of each batch at the sampler's first σ (module docstring)

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise _bad("prediction", self.prediction, PREDICTIONS)
        if self.sigma_sampling not in SIGMA_SAMPLINGS:
            raise _bad("sigma_sampling", self.sigma_sampling, SIGMA_SAMPLINGS)
        if self.weighting not in WEIGHTINGS:
            raise _bad("weighting", self.weighting, WEIGHTINGS)
        for name in ("min_snr_gamma", "p_std", "logit_std", "shift", "sigma_data"):
            _positive(name, getattr(self, name))
        allowed = _FLOW_SAMPLINGS if self.prediction == "flow" else _VE_SAMPLINGS
        if self.sigma_sampling not in allowed:
            raise ValueError(
                f"sigma_sampling={self.sigma_sampling!r} does not fit prediction={self.prediction!r}; "
                f"expected one of {', '.join(map(repr, allowed))}"
            )
        tf = self.terminal_fraction
        if not (isinstance(tf, int | float) and 0.0 <= tf < 1.0):
            raise ValueError(f"terminal_fraction={tf!r} must be a number in [0, 1)")
        if tf > 0 and (self.prediction not in ("flow", "eps", "v") or self.weighting == "min_snr"):
            raise ValueError(
                f"terminal_fraction={tf!r} needs prediction 'flow', 'eps' or 'v' and a weighting other than "
                f"'min_snr' (min(SNR, γ) is 0 at SNR 0); got prediction={self.prediction!r}, "
                f"weighting={self.weighting!r}"
            )
        if self.shift != 1 and self.kind == "edm":
            raise ValueError(
                f"shift={self.shift!r} applies to prediction 'eps', 'v' (the DDPM σ table times α) and "
                f"'flow' (Esser et al. 2024, Eq. 23); EDM's σ are drawn by p_mean / p_std instead"
            )
        if self.zero_terminal_snr and self.prediction not in ("eps", "v"):
            raise ValueError(
                f"zero_terminal_snr=True applies to the DDPM predictions 'eps' and 'v' only, "
                f"not prediction={self.prediction!r}"
            )

    @property
    def kind(self) -> str:
        """The canonical prediction: "x0" is an alias of "edm"."""
        return "edm" if self.prediction == "x0" else self.prediction


def model_sampling_for(cfg: ObjectiveConfig) -> ModelSampling:
    """The model sampling (noise form + network wrapper) that matches `cfg.prediction`."""
    return for_prediction(cfg.kind, cfg.zero_terminal_snr, cfg.sigma_data, cfg.shift)


def _check_pair(cfg: ObjectiveConfig, ms: ModelSampling) -> None:
    kind = cfg.kind
    ok = (
        (kind in ("eps", "v") and isinstance(ms, DiscreteVP) and ms.prediction == kind)
        or (kind == "edm" and isinstance(ms, EDM))
        or (kind == "flow" and isinstance(ms, DiscreteFlow))
    )
    if not ok:
        desc = type(ms).__name__ + (f"(prediction={ms.prediction!r})" if hasattr(ms, "prediction") else "")
        raise ValueError(
            f"model sampling {desc} does not match prediction={cfg.prediction!r}; "
            f"use model_sampling_for(cfg) to build the matching one"
        )
    if kind == "edm" and float(ms.sigma_data) != float(cfg.sigma_data):
        raise ValueError(f"EDM model sampling has sigma_data={ms.sigma_data}, config has {cfg.sigma_data}")


# ---------------------------------------------------------------------------------------------
# σ distributions


def _draw(fn, shape, generator, device, dtype=torch.float32):
    """Draw on the generator's device (so seeded runs agree across devices), then move."""
    gdev = generator.device if generator is not None else device
    return fn(shape, generator=generator, device=gdev, dtype=dtype).to(device)


def sample_sigmas(
    cfg: ObjectiveConfig,
    ms: ModelSampling,
    batch: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """σ of shape [batch] (float32) drawn from `cfg.sigma_sampling` (definitions in the module docstring),
    the first round(terminal_fraction·batch) of them then set to the sampler's first σ."""
    sigma = _draw_sigmas(cfg, ms, batch, generator, torch.device(device))
    terminal = int(cfg.terminal_fraction * batch + 0.5)
    if terminal:  # flow: σ = 1, x = ε; DDPM: the table's last σ (module docstring)
        sigma[:terminal] = 1.0 if isinstance(ms, DiscreteFlow) else float(ms.sigma_max)
    return sigma


def _draw_sigmas(cfg: ObjectiveConfig, ms: ModelSampling, batch: int, generator, device) -> torch.Tensor:
    kind = cfg.sigma_sampling
    if kind == "uniform_discrete":  # DDPM Algorithm 1: t ~ Uniform({1, …, T}), here 0-based
        table = ms.sigmas.to(torch.float32)
        gdev = generator.device if generator is not None else device
        t = torch.randint(0, table.shape[0], (batch,), generator=generator, device=gdev)
        return table[t.cpu()].to(device)
    if kind == "lognormal":  # Karras et al. 2022, Table 1: ln σ ~ N(P_mean, P_std²)
        if isinstance(ms, DiscreteFlow):
            raise ValueError("sigma_sampling='lognormal' draws VE σ ∈ (0, ∞); flow needs σ ∈ (0, 1)")
        n = _draw(torch.randn, (batch,), generator, device)
        sigma = (cfg.p_mean + cfg.p_std * n).exp()
        if isinstance(ms, DiscreteVP):  # keep σ inside the discrete table so t(σ) matches σ
            sigma = sigma.clamp(float(ms.sigma_min), float(ms.sigma_max))
        return sigma
    if kind in ("logit_normal", "uniform"):
        if not isinstance(ms, DiscreteFlow):
            raise ValueError(f"sigma_sampling={kind!r} draws flow σ ∈ (0, 1); it needs a DiscreteFlow model")
        if kind == "logit_normal":  # Esser et al. 2024, Eq. 19: t = sigmoid(u), u ~ N(m, s²)
            u = _draw(torch.randn, (batch,), generator, device)
            t = torch.sigmoid(cfg.logit_mean + cfg.logit_std * u)
        else:  # rectified flow: t ~ U(0, 1)
            t = _draw(torch.rand, (batch,), generator, device)
        return time_snr_shift(cfg.shift, t)  # Esser et al. 2024, Eq. 23
    raise _bad("sigma_sampling", kind, SIGMA_SAMPLINGS)


# ---------------------------------------------------------------------------------------------
# targets and weights


def snr(ms: ModelSampling, sigma: torch.Tensor) -> torch.Tensor:
    """SNR = α²/σ² of the noise form: 1/σ² (VE; = ᾱ/(1 − ᾱ) for DDPM), ((1 − σ)/σ)² (flow)."""
    if isinstance(ms, DiscreteFlow):
        return ((1 - sigma) / sigma) ** 2
    return 1 / sigma**2


def _c_skip_out(ms: ModelSampling, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """D = c_skip·x + c_out·F for the model sampling's parameterisation (see model_sampling.py)."""
    return ms.c_skip(sigma), ms.c_out(sigma)


def c_out_squared(ms: ModelSampling, sigma: torch.Tensor) -> torch.Tensor:
    """‖D − x₀‖² / ‖F − target‖²: the factor between x₀-space and target-space squared error."""
    return _c_skip_out(ms, sigma)[1] ** 2


def prediction_target(
    ms: ModelSampling, sigma: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """What the raw network should output, given the clean x₀, the noise ε and the noisy x."""
    s = sigma.reshape(-1, *([1] * (x0.ndim - 1)))
    if isinstance(ms, DiscreteFlow):  # velocity of x = (1 − σ)x₀ + σε (Esser et al. 2024, Eq. 2-3)
        return noise - x0
    if isinstance(ms, DiscreteVP) and ms.prediction == "eps":  # Ho et al. 2020, Eq. 14
        return noise
    # v (σ_d = 1: v = α_t·ε − σ_t·x₀, Salimans & Ho 2022) and EDM's F target (Karras et al. 2022, Eq. 8)
    c_skip, c_out = _c_skip_out(ms, s)
    return (x0 - c_skip * x) / c_out


def min_snr_weight(snr: torch.Tensor, gamma: float = 5.0, target: str = "eps") -> torch.Tensor:
    """Min-SNR-γ (Hang et al. 2023) as a weight on the MSE in the given target space.

    The x₀-space weight is min(SNR, γ); since ‖ε̂ − ε‖² = SNR·‖x̂₀ − x₀‖² and
    ‖v̂ − v‖² = (SNR + 1)·‖x̂₀ − x₀‖², the eps weight is min(SNR, γ)/SNR and the v weight
    min(SNR, γ)/(SNR + 1).
    """
    m = snr.clamp(max=gamma)
    if target == "eps":
        return m / snr
    if target == "v":
        return m / (snr + 1)
    if target == "x0":
        return m
    raise _bad("target", target, MIN_SNR_TARGETS)


def edm_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """λ(σ) = (σ² + σ_d²)/(σ·σ_d)² (Karras et al. 2022, Table 1), an x₀-space weight."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def loss_weight(cfg: ObjectiveConfig, ms: ModelSampling, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample weight on the target-space MSE: w = ω(σ)·c_out(σ)², ω the x₀-space weighting."""
    if cfg.weighting == "none":
        return torch.ones_like(sigma)
    c2 = c_out_squared(ms, sigma)
    if cfg.weighting == "min_snr":
        # min(SNR, γ)·c_out²: = min(SNR,γ)/SNR (eps), /(SNR+1) (v, σ_d = 1), ·c_out² → x₀-space min(SNR,γ)
        return snr(ms, sigma).clamp(max=cfg.min_snr_gamma) * c2
    if cfg.weighting == "edm":  # λ(σ)·c_out² (Karras Eq. 8); exactly 1 for prediction "edm"
        if isinstance(ms, DiscreteFlow):
            # λ(σ_VE)·σ² with λ(s) = 1/σ_d² + 1/s² and s = σ/(1 − σ): finite at σ = 1 (pure noise)
            return sigma**2 / cfg.sigma_data**2 + (1 - sigma) ** 2
        return edm_weight(sigma, cfg.sigma_data) * c2
    raise _bad("weighting", cfg.weighting, WEIGHTINGS)


# ---------------------------------------------------------------------------------------------
# the loss


def loss(
    cfg: ObjectiveConfig,
    ms: ModelSampling,
    net: torch.nn.Module,
    x0: torch.Tensor,
    cond: dict | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    sigma: torch.Tensor | float | None = None,
    net_dtype: torch.dtype | None = None,
    pixel_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training loss: mean_b w(σ_b)·mean_dims (F(c_in·x_b, t(σ_b)) − target_b)².

    `net(x_in, t, **cond)` is the raw network (as in `Denoiser`). `noise` and `sigma` override the
    draws (σ: scalar or [B]). `net_dtype` casts the network input (e.g. torch.bfloat16); timesteps stay
    float32 (999 does not survive bf16) and the output is cast back before the loss. `pixel_weight`
    (broadcastable to x0, e.g. [B, 1, h, w]) multiplies each element's squared error before the mean over
    dims (kohya's masked loss; `shapes.data.small_object_weights`).
    Returns the scalar loss and `info` with per-sample "sigma", "timestep", "loss_raw" (target-space MSE
    without the σ weight, with `pixel_weight` when given) and "weight" (all detached).
    """
    _check_pair(cfg, ms)
    if x0.ndim < 2:
        raise ValueError(f"x0 must be batched [B, ...], got shape {tuple(x0.shape)}")
    work = torch.float64 if x0.dtype == torch.float64 else torch.float32
    dev, b = x0.device, x0.shape[0]
    x0w = x0.to(work)
    if sigma is None:
        sigma = sample_sigmas(cfg, ms, b, generator, dev)
    sigma = torch.as_tensor(sigma, device=dev).to(work).reshape(-1).expand(b).contiguous()
    if noise is None:
        noise = _draw(torch.randn, x0.shape, generator, dev, work)
    elif noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
    noise = noise.to(device=dev, dtype=work)

    x = ms.noise_scaling(sigma, noise, x0w)  # VE: x₀ + σε; flow: (1 − σ)x₀ + σε
    x_in = ms.calculate_input(sigma, x)
    t = torch.as_tensor(ms.timestep(sigma), device=dev).to(work)
    out = net(x_in.to(net_dtype or work), t, **(cond or {})).to(work)
    if out.shape != x0.shape:
        raise ValueError(f"network output shape {tuple(out.shape)} != x0 shape {tuple(x0.shape)}")

    target = prediction_target(ms, sigma, noise, x0w, x)
    err = (out - target).pow(2)
    if pixel_weight is not None:
        try:
            err = err * pixel_weight.to(err)
        except RuntimeError:
            err = None
        if err is None or err.shape != out.shape:
            raise ValueError(
                f"pixel_weight shape {tuple(pixel_weight.shape)} does not broadcast to x0's {tuple(x0.shape)}"
            )
    raw = err.flatten(1).mean(1)  # [B]
    w = loss_weight(cfg, ms, sigma).to(work)
    total = (w * raw).mean()
    info = {"sigma": sigma.detach(), "timestep": t.detach(), "loss_raw": raw.detach(), "weight": w.detach()}
    return total, info
