"""Classifier-free guidance around a denoiser (Ho & Salimans 2022, Eq. 6, in x̂₀ form).

    D_cfg = D_u + w·(D_c − D_u)

with the conditional and unconditional halves in one batched call, CFG rescale φ (Lin et al. 2024,
§3.4, Eq. 15-16: match the guided prediction's std to the conditional one, then blend by φ), an
optional guidance interval (Kynkäänniemi et al. 2024: guide only for σ in [lo, hi]) and per-image
scales. A scale of 1 (or σ outside the interval) skips the unconditional call.

The wrapper keeps the denoiser interface D(x, σ, **cond) and adds `with_uncond`, which the CFG++
samplers use to get the unconditional prediction as well.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from latentforge.samplers.common import append_dims


def _cat_cond(cond: dict, uncond: dict) -> dict:
    out = {}
    for k in cond:
        a, b = cond[k], uncond.get(k)
        if isinstance(a, torch.Tensor):
            if not isinstance(b, torch.Tensor) or a.shape[1:] != b.shape[1:]:
                raise ValueError(
                    f"cond[{k!r}] and uncond[{k!r}] must be tensors of the same shape after the batch "
                    f"dimension, got {tuple(a.shape)} and {None if b is None else tuple(b.shape)}"
                )
            out[k] = torch.cat([a, b])
        else:
            out[k] = a
    return out


class CFGDenoiser:
    """D_cfg(x, σ, cond=..., uncond=...) for a denoiser `model(x, σ, **cond)`.

    scale: a float or one value per image [B]. rescale: φ in [0, 1]. interval: (σ_lo, σ_hi) or None.
    """

    def __init__(
        self,
        model,
        scale: float | Sequence[float] | torch.Tensor = 7.0,
        rescale: float = 0.0,
        interval: tuple[float, float] | None = None,
    ):
        if not 0.0 <= float(rescale) <= 1.0:
            raise ValueError(f"CFG rescale must be in [0, 1], got {rescale}")
        if interval is not None and not (0 <= interval[0] <= interval[1]):
            raise ValueError(f"guidance interval must be (lo, hi) with 0 <= lo <= hi, got {interval}")
        self.model = model
        self.scale = torch.as_tensor(scale, dtype=torch.float64)
        self.rescale = float(rescale)
        self.interval = interval

    @property
    def model_sampling(self):
        return getattr(self.model, "model_sampling", None)

    def _active(self, sigma: torch.Tensor) -> bool:
        if self.scale.numel() == 1 and float(self.scale) == 1.0:
            return False
        if self.interval is not None:
            s = float(sigma.reshape(-1)[0])
            return self.interval[0] <= s <= self.interval[1]
        return True

    def with_uncond(self, x, sigma, cond: dict | None = None, uncond: dict | None = None):
        cond = cond or {}
        if not self._active(sigma) or uncond is None:
            d = self.model(x, sigma, **cond)
            return d, d
        b = x.shape[0]
        both = self.model(torch.cat([x, x]), torch.cat([sigma, sigma]), **_cat_cond(cond, uncond))
        d_c, d_u = both[:b], both[b:]
        w = append_dims(self.scale.to(device=x.device, dtype=d_c.dtype).expand(b), x.ndim)
        guided = d_u + w * (d_c - d_u)
        if self.rescale > 0:
            # Lin et al. 2024, Eq. 15-16, applied to the ε (equivalently x − D) the guidance produced.
            s = append_dims(sigma, x.ndim).to(d_c.dtype)
            eps_c, eps_g = (x - d_c) / s, (x - guided) / s
            dims = list(range(1, x.ndim))
            eps_r = eps_g * eps_c.std(dim=dims, keepdim=True) / eps_g.std(dim=dims, keepdim=True)
            eps = self.rescale * eps_r + (1 - self.rescale) * eps_g
            guided = x - s * eps
        return guided, d_u

    def __call__(self, x, sigma, cond: dict | None = None, uncond: dict | None = None):
        return self.with_uncond(x, sigma, cond, uncond)[0]
