"""Gaussian-mixture data: an exact denoiser at every σ, a weight-free oracle for samplers.

For data p(x₀) = Σ_k w_k N(μ_k, diag(s_k²)), the noised density at VE level σ is
p_σ(x) = Σ_k w_k N(x; μ_k, diag(s_k² + σ²)), and Tweedie's formula (Efron 2011; Karras et al.
2022, Eq. 3: D = x + σ²∇log p_σ) gives
    D(x, σ) = Σ_k r_k(x) [μ_k + s_k²/(s_k² + σ²)·(x − μ_k)],   r_k = posterior responsibility.
For one Gaussian the probability-flow ODE dx/dσ = (x − D)/σ solves in closed form:
    x(σ) = μ + (x(σ_T) − μ)·√(s² + σ²)/√(s² + σ_T²).
The same oracle serves rectified-flow coordinates x = (1 − σ)·x₀ + σ·ε through
x/(1 − σ) = x₀ + σ/(1 − σ)·ε (a VE state at σ_VE = σ/(1 − σ)).
(The idea follows EDM2's `toy_example.py`; the code here is written from the formulas above.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GaussianMixture:
    means: torch.Tensor  # [K, D]
    stds: torch.Tensor  # [K, D]
    weights: torch.Tensor  # [K]

    @staticmethod
    def single(dim: int = 4, mean: float = 0.5, std: float = 0.3) -> GaussianMixture:
        return GaussianMixture(
            torch.full((1, dim), mean, dtype=torch.float64),
            torch.full((1, dim), std, dtype=torch.float64),
            torch.ones(1, dtype=torch.float64),
        )

    @staticmethod
    def random(k: int = 3, dim: int = 4, seed: int = 0, spread: float = 1.5) -> GaussianMixture:
        g = torch.Generator().manual_seed(seed)
        means = torch.randn(k, dim, generator=g, dtype=torch.float64) * spread
        stds = 0.15 + 0.35 * torch.rand(k, dim, generator=g, dtype=torch.float64)
        weights = 0.5 + torch.rand(k, generator=g, dtype=torch.float64)
        return GaussianMixture(means, stds, weights / weights.sum())

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def mean(self) -> torch.Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    def cov(self) -> torch.Tensor:
        """Σ_k w_k (diag(s_k²) + μ_k μ_kᵀ) − m mᵀ."""
        m = self.mean()
        second = sum(
            w * (torch.diag(s**2) + torch.outer(mu, mu))
            for w, mu, s in zip(self.weights, self.means, self.stds, strict=True)
        )
        return second - torch.outer(m, m)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k] * z

    def denoise_ve(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Exact E[x₀ | x₀ + σε = x]. x: [B, ...] with prod(...) = D; sigma: scalar or [B]."""
        shape, dtype = x.shape, x.dtype
        xf = x.reshape(shape[0], -1).to(torch.float64)  # [B, D]
        s2 = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1, 1) ** 2  # [B|1,1,1]
        mu, var = self.means.to(x.device)[None], (self.stds.to(x.device) ** 2)[None]  # [1, K, D]
        tot = var + s2  # [B, K, D]
        diff = xf[:, None, :] - mu  # [B, K, D]
        logp = -0.5 * ((diff**2) / tot + tot.log()).sum(-1) + self.weights.to(x.device).log()[None]  # [B, K]
        r = torch.softmax(logp, dim=1)  # [B, K]
        post = mu + var / tot * diff  # [B, K, D]
        return (r[..., None] * post).sum(1).reshape(shape).to(dtype)

    def denoiser(self, flow: bool = False, dtype: torch.dtype | None = None):
        """D(x, σ) in VE coordinates, or in flow coordinates when `flow` (x = (1−σ)x₀ + σε)."""

        def D(x, sigma, **_):
            s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
            if s.ndim:
                s = s.reshape(-1, *([1] * (x.ndim - 1)))
            xin = x.to(torch.float64)
            if flow:
                # at σ = 1 (pure noise) the limit σ_VE → ∞ gives the data mean; clamping σ a hair
                # below 1 reaches that limit to ~1e-9 in float64
                s = s.clamp(max=1 - 1e-9)
                out = self.denoise_ve(xin / (1 - s), (s / (1 - s)).reshape(-1))
            else:
                out = self.denoise_ve(xin, s.reshape(-1))
            return out.to(dtype or x.dtype)

        return D

    def ode_solution_ve(self, x_T: torch.Tensor, sigma_T: float, sigma: float) -> torch.Tensor:
        """Exact PF-ODE map from σ_T to σ; single-Gaussian data only."""
        if self.means.shape[0] != 1:
            raise ValueError("the closed-form ODE solution exists for a single Gaussian only")
        shape = x_T.shape
        mu, s = self.means[0], self.stds[0]
        xf = x_T.reshape(shape[0], -1).to(torch.float64)
        out = mu + (xf - mu) * ((s**2 + sigma**2) / (s**2 + sigma_T**2)).sqrt()
        return out.reshape(shape)

    def ode_reference(self, x_T: torch.Tensor, sigmas: torch.Tensor, substeps: int = 64) -> torch.Tensor:
        """High-accuracy PF-ODE solution through `sigmas` (to its last positive σ, then an exact
        final denoise if it ends in 0): classical RK4 in log σ with `substeps` per interval, float64.
        With dx/du = σ·d = x − D(x, σ) for u = log σ the error is O(h⁴)."""
        x = x_T.to(torch.float64)
        pos = sigmas[sigmas > 0].double()
        D = self.denoiser()

        def f(x, u):
            return x - D(x, torch.exp(u))

        for a, b in zip(pos[:-1], pos[1:], strict=True):
            ua, ub = a.log(), b.log()
            h = (ub - ua) / substeps
            u = ua
            for _ in range(substeps):
                k1 = f(x, u)
                k2 = f(x + h / 2 * k1, u + h / 2)
                k3 = f(x + h / 2 * k2, u + h / 2)
                k4 = f(x + h * k3, u + h)
                x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
                u = u + h
        if float(sigmas[-1]) == 0:
            x = D(x, pos[-1])
        return x
