"""Training objective: exact targets give zero loss, the exact posterior mean minimises the loss on
Gaussian-mixture data, σ distributions match their definitions, weights match their closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from latentforge.gmm import GaussianMixture
from latentforge.model_sampling import EDM, DiscreteFlow, DiscreteVP
from latentforge.training.objectives import (
    ObjectiveConfig,
    c_out_squared,
    edm_weight,
    loss,
    loss_weight,
    min_snr_weight,
    model_sampling_for,
    prediction_target,
    sample_sigmas,
    snr,
)

KINDS = {  # prediction -> a σ distribution that fits it
    "eps": "uniform_discrete",
    "v": "uniform_discrete",
    "edm": "lognormal",
    "flow": "logit_normal",
}


def _cfg(pred, **kw):
    kw.setdefault("sigma_sampling", KINDS["edm" if pred == "x0" else pred])
    return ObjectiveConfig(prediction=pred, **kw)


def _ref_target(pred, sigma, noise, x0, sigma_data=0.5):
    """The targets written out independently from the papers."""
    s = sigma.reshape(-1, *([1] * (x0.ndim - 1)))
    if pred == "eps":
        return noise
    if pred == "v":  # Salimans & Ho 2022: v = α_t ε − σ_t x₀ in VP units
        alpha, sig_vp = 1 / (1 + s**2).sqrt(), s / (1 + s**2).sqrt()
        return alpha * noise - sig_vp * x0
    if pred in ("edm", "x0"):  # Karras et al. 2022, Eq. 8
        sd = sigma_data
        c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt()
        return (x0 - c_skip * (x0 + s * noise)) / c_out
    return noise - x0  # flow


# ---------------------------------------------------------------------------------------------
# (1) a network that outputs the exact target has zero loss


@pytest.mark.parametrize("pred", ["eps", "v", "x0", "edm", "flow"])
@pytest.mark.parametrize("weighting", ["none", "min_snr", "edm"])
def test_exact_target_gives_zero_loss(pred, weighting):
    cfg = _cfg(pred, weighting=weighting)
    ms = model_sampling_for(cfg)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 4, 3, 3, generator=g)
    noise = torch.randn(8, 4, 3, 3, generator=g)
    sigma = sample_sigmas(cfg, ms, 8, g)
    target = _ref_target(pred, sigma, noise, x0, cfg.sigma_data)

    seen = {}

    def net(x_in, t, **cond):
        seen["t"], seen["cond"] = t, cond
        return target

    val, info = loss(cfg, ms, net, x0, {"tag": 1}, noise=noise, sigma=sigma)
    assert val.dtype == torch.float32 and val.ndim == 0
    assert float(val) < 1e-10
    assert info["loss_raw"].max() < 1e-10
    assert torch.equal(info["sigma"], sigma)
    assert seen["cond"] == {"tag": 1}
    torch.testing.assert_close(seen["t"], torch.as_tensor(ms.timestep(sigma)).float())


@pytest.mark.parametrize(
    "ms",
    [
        DiscreteVP(prediction="eps"),
        DiscreteVP(prediction="v"),
        DiscreteVP(prediction="v", zero_terminal_snr=True),
        EDM(sigma_data=0.5),
        EDM(sigma_data=1.0, prediction="v"),
        DiscreteFlow(shift=3.0),
    ],
    ids=["eps", "v", "v-ztsnr", "edm", "edm-v", "flow"],
)
def test_target_maps_back_to_x0_through_model_sampling(ms):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(6, 5, dtype=torch.float64, generator=g)
    noise = torch.randn(6, 5, dtype=torch.float64, generator=g)
    idx = torch.tensor([0, 10, 200, 500, 900, 999])
    sigma = ms.sigmas.double()[idx]
    x = ms.noise_scaling(sigma, noise, x0)
    target = prediction_target(ms, sigma, noise, x0, x)
    torch.testing.assert_close(ms.calculate_denoised(sigma, target, x), x0, rtol=1e-9, atol=1e-9)
    # and the x0-space error is c_out² times the target-space error
    f = target + torch.randn(6, 5, dtype=torch.float64, generator=g)
    d = ms.calculate_denoised(sigma, f, x)
    lhs = (d - x0).pow(2).sum(1)
    rhs = c_out_squared(ms, sigma) * (f - target).pow(2).sum(1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# (2) on Gaussian-mixture data the exact posterior mean reaches the irreducible loss


def _posterior_var(gmm: GaussianMixture, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Mean over dims of Var[x₀ | x₀ + σε = x] (VE coordinates), per sample."""
    xf = x.reshape(x.shape[0], -1).double()
    s2 = sigma.double().reshape(-1, 1, 1) ** 2
    mu, var = gmm.means[None], gmm.stds[None] ** 2
    tot = var + s2
    diff = xf[:, None, :] - mu
    logp = -0.5 * ((diff**2) / tot + tot.log()).sum(-1) + gmm.weights.log()[None]
    r = torch.softmax(logp, dim=1)[..., None]
    post_mean = mu + var / tot * diff
    post_var = var * s2 / tot
    second = (r * (post_var + post_mean**2)).sum(1)
    mean = (r * post_mean).sum(1)
    return (second - mean**2).mean(1)


def _net_from_denoiser(ms, gmm, scale=1.0):
    """The raw network whose denoiser is scale·D_exact: F from D by inverting D = a + b·F."""
    d_exact = gmm.denoiser(flow=isinstance(ms, DiscreteFlow))

    def net(x_in, t, sigma):
        x = x_in / ms.calculate_input(sigma, torch.ones_like(x_in))
        d = scale * d_exact(x, sigma)
        a = ms.calculate_denoised(sigma, torch.zeros_like(x), x)
        b = ms.calculate_denoised(sigma, torch.ones_like(x), x) - a
        return (d - a) / b

    return net


FIXED_SIGMAS = {
    "eps": [0.05, 0.5, 3.0],
    "v": [0.05, 0.5, 3.0],
    "edm": [0.05, 0.5, 3.0],
    "flow": [0.1, 0.5, 0.9],
}


@pytest.mark.parametrize("pred", ["eps", "v", "edm", "flow"])
@pytest.mark.parametrize("sigma_mode", ["fixed", "sampled"])
def test_exact_denoiser_minimises_loss_on_gmm(pred, sigma_mode):
    gmm = GaussianMixture.random(k=3, dim=4, seed=0)
    cfg = _cfg(pred, shift=3.0 if pred == "flow" else 1.0)
    ms = model_sampling_for(cfg)
    n = 6000
    g = torch.Generator().manual_seed(2)
    sig_list = FIXED_SIGMAS[pred] if sigma_mode == "fixed" else [None]
    for s in sig_list:
        x0 = gmm.sample(n, g).reshape(n, 1, 2, 2)
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        sigma = (
            sample_sigmas(cfg, ms, n, g).double() if s is None else torch.full((n,), s, dtype=torch.float64)
        )
        l_exact, info = loss(
            cfg, ms, _net_from_denoiser(ms, gmm), x0, {"sigma": sigma}, noise=noise, sigma=sigma
        )
        l_pert, info_p = loss(
            cfg, ms, _net_from_denoiser(ms, gmm, 0.9), x0, {"sigma": sigma}, noise=noise, sigma=sigma
        )
        assert l_exact.dtype == torch.float64

        # irreducible part: E[Var(x₀|x)]/c_out², evaluated at the same noisy x (VE coordinates)
        x = ms.noise_scaling(sigma, noise, x0)
        c2 = c_out_squared(ms, sigma)
        if isinstance(ms, DiscreteFlow):
            x_ve, s_ve = x / (1 - sigma).reshape(-1, 1, 1, 1), sigma / (1 - sigma)
        else:
            x_ve, s_ve = x, sigma
        irreducible = _posterior_var(gmm, x_ve, s_ve) / c2
        diff = info["loss_raw"] - irreducible  # zero conditional mean per sample
        se = diff.std() / math.sqrt(n)
        assert abs(float(diff.mean())) < 4 * float(se) + 1e-12, (s, float(diff.mean()), float(se))
        torch.testing.assert_close(l_exact, info["loss_raw"].mean())

        # 0.9·D costs 0.01·‖D‖²/c_out² more in expectation (the cross term has zero mean)
        d = gmm.denoiser(flow=isinstance(ms, DiscreteFlow))(x, sigma)
        excess = 0.01 * d.pow(2).flatten(1).mean(1) / c2
        gap = info_p["loss_raw"] - info["loss_raw"] - excess
        assert abs(float(gap.mean())) < 4 * float(gap.std() / math.sqrt(n)) + 1e-12
        assert float(l_pert) > float(l_exact)


# ---------------------------------------------------------------------------------------------
# (3) σ distributions


def test_lognormal_moments():
    n = 200_000
    for p_mean, p_std in [(-1.2, 1.2), (0.3, 0.7)]:
        cfg = ObjectiveConfig(prediction="edm", sigma_sampling="lognormal", p_mean=p_mean, p_std=p_std)
        ls = sample_sigmas(cfg, model_sampling_for(cfg), n, torch.Generator().manual_seed(3)).double().log()
        assert abs(float(ls.mean()) - p_mean) < 4 * p_std / math.sqrt(n)
        assert abs(float(ls.std()) - p_std) < 4 * p_std / math.sqrt(2 * n)


def test_lognormal_clamped_to_ddpm_table():
    cfg = ObjectiveConfig(prediction="eps", sigma_sampling="lognormal", p_mean=0.0, p_std=3.0)
    ms = model_sampling_for(cfg)
    s = sample_sigmas(cfg, ms, 10_000, torch.Generator().manual_seed(4))
    assert float(s.min()) == pytest.approx(float(ms.sigma_min))
    assert float(s.max()) == pytest.approx(float(ms.sigma_max))


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_logit_normal_with_shift(shift):
    n = 100_000
    cfg = ObjectiveConfig(prediction="flow", sigma_sampling="logit_normal", shift=shift)
    s = sample_sigmas(cfg, model_sampling_for(cfg), n, torch.Generator().manual_seed(5)).double()
    assert 0 < float(s.min()) and float(s.max()) < 1
    expected_median = shift * 0.5 / (1 + (shift - 1) * 0.5)
    assert abs(float(s.median()) - expected_median) < 0.005
    # undo the shift (t = σ/(α − (α − 1)σ)) and the sigmoid: back to N(m, s²)
    t = s / (shift - (shift - 1) * s)
    u = torch.logit(t)
    assert abs(float(u.mean()) - cfg.logit_mean) < 4 / math.sqrt(n)
    assert abs(float(u.std()) - cfg.logit_std) < 4 / math.sqrt(2 * n)


@pytest.mark.parametrize("sampling", ["logit_normal", "uniform"])
def test_terminal_fraction_puts_its_share_at_snr_zero_and_leaves_the_rest(sampling):
    base = ObjectiveConfig(prediction="flow", sigma_sampling=sampling, shift=3.0)
    cfg = ObjectiveConfig(prediction="flow", sigma_sampling=sampling, shift=3.0, terminal_fraction=0.1)
    ms = model_sampling_for(cfg)
    s0 = sample_sigmas(base, ms, 64, torch.Generator().manual_seed(7))
    s1 = sample_sigmas(cfg, ms, 64, torch.Generator().manual_seed(7))
    assert (s1[:6] == 1.0).all()  # round(0.1 · 64) = 6 draws at σ = 1
    torch.testing.assert_close(s1[6:], s0[6:], rtol=0, atol=0)  # the others: the same stream
    assert float(s0.max()) < 1


def test_terminal_fraction_applies_to_flow_on_the_discrete_table_too():
    cfg = ObjectiveConfig(prediction="flow", sigma_sampling="uniform_discrete", terminal_fraction=0.25)
    s = sample_sigmas(cfg, model_sampling_for(cfg), 8, torch.Generator().manual_seed(3))
    assert (s[:2] == 1.0).all() and float(s[2:].max()) < 1


@pytest.mark.parametrize(
    "prediction, ztsnr, sampling",
    [("eps", False, "uniform_discrete"), ("v", True, "uniform_discrete"), ("v", True, "lognormal")],
)
def test_ddpm_terminal_fraction_draws_the_tables_last_sigma(prediction, ztsnr, sampling):
    """DDPM eps/v: the terminal share sits at the largest σ of the 1000-step table, where sampling starts
    (≈ 14.61 for SD's scaled_linear betas, ≈ 1429 with the zero-terminal-SNR rescale and its finite
    clamp, ᾱ_T = 4.897e-8: √((1 − ᾱ)/ᾱ))."""
    kw = dict(prediction=prediction, sigma_sampling=sampling, zero_terminal_snr=ztsnr)
    base, cfg = ObjectiveConfig(**kw), ObjectiveConfig(**kw, terminal_fraction=0.1)
    ms = model_sampling_for(cfg)
    s0 = sample_sigmas(base, ms, 64, torch.Generator().manual_seed(7))
    s1 = sample_sigmas(cfg, ms, 64, torch.Generator().manual_seed(7))
    expected = math.sqrt((1 - 4.8973451890853435e-08) / 4.8973451890853435e-08) if ztsnr else 14.6146
    assert torch.allclose(s1[:6], torch.full((6,), expected), rtol=1e-4)
    torch.testing.assert_close(s1[6:], s0[6:], rtol=0, atol=0)
    assert float(s0.max()) <= expected * (1 + 1e-4)


def test_ddpm_shift_draws_the_same_steps_at_alpha_times_their_sigma():
    """`shift` α with DDPM: t ~ U{0..999} draws the same steps as without it (the generator's stream is
    unchanged) at α times their σ, the terminal share at α·14.6146, and Min-SNR weighs by the shifted SNR;
    EDM has no table to shift and refuses it."""
    base = ObjectiveConfig(prediction="eps", terminal_fraction=0.1)
    cfg = ObjectiveConfig(prediction="eps", terminal_fraction=0.1, shift=4.0)
    ms0, ms = model_sampling_for(base), model_sampling_for(cfg)
    s0 = sample_sigmas(base, ms0, 64, torch.Generator().manual_seed(7))
    s1 = sample_sigmas(cfg, ms, 64, torch.Generator().manual_seed(7))
    torch.testing.assert_close(s1, 4 * s0, rtol=1e-6, atol=0)
    assert torch.allclose(s1[:6], torch.full((6,), 4 * 14.6146), rtol=1e-4)
    torch.testing.assert_close(snr(ms, s1), snr(ms0, s0) / 16, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="shift=2.0 applies to prediction"):
        ObjectiveConfig(prediction="edm", sigma_sampling="lognormal", shift=2.0)


def test_at_zero_terminal_snr_the_v_loss_is_minimised_by_the_data_mean():
    """v-prediction with the zero-terminal-SNR table: at its last σ (SNR 2·10⁻¹²) the best denoiser is
    E[x₀] to within σ⁻¹ ≈ 7·10⁻⁴, so the network whose D is the mixture's mean has target-space loss
    tr(Cov)/D / c_out², c_out² = σ²/(σ² + 1) (σ_d = 1), from the mixture's parameters alone."""
    gmm = GaussianMixture.random(k=3, dim=4, seed=0)
    cfg = ObjectiveConfig(prediction="v", zero_terminal_snr=True, terminal_fraction=0.5)
    ms = model_sampling_for(cfg)
    n = 40_000
    g = torch.Generator().manual_seed(8)
    x0 = gmm.sample(n, g).reshape(n, 1, 2, 2)
    sigma = sample_sigmas(cfg, ms, n, g).double()
    at_end = sigma == sigma.max()  # the terminal half, and the table's t = 999 drawn among the others
    assert bool(at_end[: n // 2].all()) and int(at_end.sum()) < n // 2 + 4 * n // 1000
    mean = gmm.mean().reshape(1, 1, 2, 2)

    def best(x_in, t, sigma):  # F = (E[x₀] − c_skip·x)/c_out, so D = c_skip·x + c_out·F = E[x₀]
        s = sigma.reshape(-1, 1, 1, 1)
        x = x_in / ms.c_in(s)
        return (mean - ms.c_skip(s) * x) / ms.c_out(s)

    _, info = loss(cfg, ms, best, x0, {"sigma": sigma}, sigma=sigma, generator=g)
    raw = info["loss_raw"][at_end]
    s_end = float(sigma.max())
    expected = float(torch.diagonal(gmm.cov()).mean()) * (s_end**2 + 1) / s_end**2
    assert abs(float(raw.mean()) - expected) < 4 * float(raw.std()) / math.sqrt(raw.numel())


def test_at_snr_zero_the_flow_loss_is_minimised_by_the_data_mean():
    """At σ = 1, x = ε: the best velocity is x − E[x₀], and its loss is the data's total variance per value
    (trace of the mixture's covariance / D), from the mixture's parameters alone."""
    gmm = GaussianMixture.random(k=3, dim=4, seed=0)
    cfg = ObjectiveConfig(prediction="flow", sigma_sampling="logit_normal", terminal_fraction=0.5)
    ms = model_sampling_for(cfg)
    n = 40_000
    g = torch.Generator().manual_seed(8)
    x0 = gmm.sample(n, g).reshape(n, 1, 2, 2)
    sigma = sample_sigmas(cfg, ms, n, g).double()
    at_one = sigma == 1.0
    assert int(at_one.sum()) == n // 2
    mean = gmm.mean().reshape(1, 1, 2, 2)

    def best(x_in, t, sigma):  # v = ε − x₀ with ε = x at σ = 1; elsewhere anything finite
        return x_in - mean

    _, info = loss(cfg, ms, best, x0, {"sigma": sigma}, sigma=sigma, generator=g)
    raw = info["loss_raw"][at_one]
    expected = float(torch.diagonal(gmm.cov()).mean())
    assert abs(float(raw.mean()) - expected) < 4 * float(raw.std()) / math.sqrt(raw.numel())


@pytest.mark.parametrize(
    "kw",
    [
        dict(terminal_fraction=1.0),
        dict(terminal_fraction=-0.1),
        dict(terminal_fraction=0.1, weighting="min_snr"),
        dict(terminal_fraction=0.1, prediction="edm", sigma_sampling="lognormal"),
    ],
)
def test_terminal_fraction_refuses_what_it_cannot_do(kw):
    kw = {"prediction": "flow", "sigma_sampling": "logit_normal", **kw}
    with pytest.raises(ValueError, match="terminal_fraction"):
        ObjectiveConfig(**kw)


def test_uniform_flow():
    n = 100_000
    cfg = ObjectiveConfig(prediction="flow", sigma_sampling="uniform")
    s = sample_sigmas(cfg, model_sampling_for(cfg), n, torch.Generator().manual_seed(6)).double()
    assert abs(float(s.mean()) - 0.5) < 4 * math.sqrt(1 / 12 / n)
    assert abs(float(s.var()) - 1 / 12) < 0.002
    cfg3 = ObjectiveConfig(prediction="flow", sigma_sampling="uniform", shift=3.0)
    s3 = sample_sigmas(cfg3, model_sampling_for(cfg3), n, torch.Generator().manual_seed(6)).double()
    assert abs(float(s3.median()) - 0.75) < 0.01


@pytest.mark.parametrize("pred", ["eps", "v", "flow"])
def test_uniform_discrete_hits_table_entries(pred):
    cfg = ObjectiveConfig(prediction=pred, sigma_sampling="uniform_discrete", zero_terminal_snr=pred == "v")
    ms = model_sampling_for(cfg)
    s = sample_sigmas(cfg, ms, 20_000, torch.Generator().manual_seed(7))
    assert torch.isin(s, ms.sigmas.float()).all()
    assert len(torch.unique(s)) >= 990  # 1000 entries, 20 draws each on average
    if pred != "flow":
        t = ms.timestep(s)
        torch.testing.assert_close(t, t.round(), atol=1e-3, rtol=0)


def test_sampling_is_seeded():
    cfg = ObjectiveConfig(prediction="edm", sigma_sampling="lognormal")
    ms = model_sampling_for(cfg)
    a = sample_sigmas(cfg, ms, 16, torch.Generator().manual_seed(8))
    b = sample_sigmas(cfg, ms, 16, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    x0 = torch.randn(4, 3)
    net = lambda x, t: x
    l1, _ = loss(cfg, ms, net, x0, generator=torch.Generator().manual_seed(9))
    l2, _ = loss(cfg, ms, net, x0, generator=torch.Generator().manual_seed(9))
    assert torch.equal(l1, l2)


# ---------------------------------------------------------------------------------------------
# (4) weights


SIG = torch.tensor([0.1, 0.5, 1.0, 5.0], dtype=torch.float64)


def test_min_snr_closed_forms():
    s = 1 / SIG**2  # SNR = 100, 4, 1, 0.04
    torch.testing.assert_close(min_snr_weight(s, 5.0, "eps"), torch.tensor([0.05, 1.0, 1.0, 1.0]).double())
    torch.testing.assert_close(
        min_snr_weight(s, 5.0, "v"), torch.tensor([5 / 101, 4 / 5, 1 / 2, 0.04 / 1.04]).double()
    )
    torch.testing.assert_close(min_snr_weight(s, 5.0, "x0"), torch.tensor([5.0, 4.0, 1.0, 0.04]).double())
    # the loss uses the same weights for DDPM eps and v (σ_d = 1)
    for pred in ("eps", "v"):
        cfg = ObjectiveConfig(prediction=pred, weighting="min_snr")
        ms = model_sampling_for(cfg)
        torch.testing.assert_close(loss_weight(cfg, ms, SIG), min_snr_weight(s, 5.0, pred))
    # EDM (x0/edm): the F-space weight is min(SNR, γ)·c_out², i.e. min(SNR, γ) on ‖D − x₀‖²
    cfg = ObjectiveConfig(prediction="x0", sigma_sampling="lognormal", weighting="min_snr", min_snr_gamma=2.0)
    ms = model_sampling_for(cfg)
    torch.testing.assert_close(
        loss_weight(cfg, ms, SIG) / c_out_squared(ms, SIG), min_snr_weight(s, 2.0, "x0")
    )
    # flow: SNR = ((1 − σ)/σ)², weight on ‖F − v‖² is min(SNR, γ)·σ²
    cfg = ObjectiveConfig(prediction="flow", sigma_sampling="uniform", weighting="min_snr")
    fs = torch.tensor([0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    torch.testing.assert_close(snr(model_sampling_for(cfg), fs), ((1 - fs) / fs) ** 2)
    expected = torch.tensor([5 * 0.01, 1 * 0.25, (1 / 81) * 0.81, 0.0]).double()
    torch.testing.assert_close(loss_weight(cfg, model_sampling_for(cfg), fs), expected)


def test_edm_weight_closed_form():
    # λ(σ) = (σ² + σ_d²)/(σσ_d)²: σ_d = 0.5 → (0.26/0.0025, 0.5/0.0625, 1.25/0.25, 25.25/6.25)
    torch.testing.assert_close(edm_weight(SIG, 0.5), torch.tensor([104.0, 8.0, 5.0, 4.04]).double())
    cfg = ObjectiveConfig(prediction="edm", sigma_sampling="lognormal", weighting="edm")
    ms = model_sampling_for(cfg)
    torch.testing.assert_close(loss_weight(cfg, ms, SIG), torch.ones_like(SIG))  # λ·c_out² = 1
    # same λ applied to an ε-prediction model: λ·σ² = (σ² + σ_d²)/σ_d²
    cfg = ObjectiveConfig(prediction="eps", weighting="edm")
    torch.testing.assert_close(loss_weight(cfg, model_sampling_for(cfg), SIG), (SIG**2 + 0.25) / 0.25)
    # flow: finite at σ = 1 (pure noise), λ(σ_VE)·σ² = σ²/σ_d² + (1 − σ)²
    cfg = ObjectiveConfig(prediction="flow", sigma_sampling="uniform_discrete", weighting="edm")
    fs = torch.tensor([0.25, 1.0], dtype=torch.float64)
    torch.testing.assert_close(
        loss_weight(cfg, model_sampling_for(cfg), fs), torch.tensor([0.8125, 4.0]).double()
    )


@pytest.mark.parametrize("pred", ["eps", "v", "edm", "flow"])
@pytest.mark.parametrize("weighting", ["min_snr", "edm"])
def test_weighted_loss_equals_x0_space_form(pred, weighting):
    """loss = mean_b ω(σ_b)·mean‖D − x₀‖², the documented x₀-space mapping."""
    cfg = _cfg(pred, weighting=weighting, shift=3.0 if pred == "flow" else 1.0)
    ms = model_sampling_for(cfg)
    g = torch.Generator().manual_seed(10)
    x0 = torch.randn(64, 2, 3, dtype=torch.float64, generator=g)
    noise = torch.randn(64, 2, 3, dtype=torch.float64, generator=g)
    sigma = sample_sigmas(cfg, ms, 64, g).double()
    f = torch.randn(64, 2, 3, dtype=torch.float64, generator=g)
    val, info = loss(cfg, ms, lambda x, t: f, x0, noise=noise, sigma=sigma)
    x = ms.noise_scaling(sigma, noise, x0)
    d = ms.calculate_denoised(sigma, f, x)
    ve = sigma / (1 - sigma) if pred == "flow" else sigma
    omega = snr(ms, sigma).clamp(max=5.0) if weighting == "min_snr" else edm_weight(ve, cfg.sigma_data)
    torch.testing.assert_close(val, (omega * (d - x0).pow(2).flatten(1).mean(1)).mean())
    torch.testing.assert_close(info["weight"], loss_weight(cfg, ms, sigma))


# ---------------------------------------------------------------------------------------------
# (5) gradients and dtypes


class _TinyNet(torch.nn.Module):
    def __init__(self, ch=3):
        super().__init__()
        self.conv = torch.nn.Conv2d(ch, ch, 3, padding=1)
        self.temb = torch.nn.Linear(1, ch)

    def forward(self, x, t, context=None):
        emb = self.temb((t.reshape(-1, 1) / 1000).to(self.temb.weight.dtype))
        h = self.conv(x) + emb[:, :, None, None].to(x.dtype)
        return h if context is None else h + context.to(h.dtype)


@pytest.mark.parametrize("pred", ["eps", "v", "edm", "flow"])
def test_gradients_flow(pred):
    cfg = _cfg(pred, weighting="min_snr")
    net = _TinyNet()
    x0 = torch.randn(4, 3, 8, 8)
    val, _ = loss(
        cfg,
        model_sampling_for(cfg),
        net,
        x0,
        {"context": torch.zeros(4, 3, 1, 1)},
        generator=torch.Generator().manual_seed(11),
    )
    val.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_bf16_net_loss_in_float32():
    cfg = ObjectiveConfig(prediction="v", weighting="min_snr")
    net = _TinyNet().to(torch.bfloat16)
    seen = {}

    def wrapped(x, t):
        seen["x"], seen["t"] = x.dtype, t.dtype
        return net(x, t)

    x0 = torch.randn(4, 3, 8, 8)
    val, info = loss(
        cfg,
        model_sampling_for(cfg),
        wrapped,
        x0,
        generator=torch.Generator().manual_seed(12),
        net_dtype=torch.bfloat16,
    )
    assert seen == {"x": torch.bfloat16, "t": torch.float32}
    assert val.dtype == torch.float32 and info["loss_raw"].dtype == torch.float32
    val.backward()
    assert net.conv.weight.grad is not None and net.conv.weight.grad.dtype == torch.bfloat16


def test_scalar_sigma_broadcasts():
    cfg = ObjectiveConfig(prediction="eps")
    x0 = torch.randn(3, 2)
    _, info = loss(cfg, model_sampling_for(cfg), lambda x, t: x, x0, sigma=1.0)
    assert info["sigma"].shape == (3,) and torch.all(info["sigma"] == 1.0)


# ---------------------------------------------------------------------------------------------
# (6) configuration errors


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"prediction": "x_0"}, ["'x_0'", "'eps'", "'flow'"]),
        ({"sigma_sampling": "normal"}, ["'normal'", "'lognormal'", "'logit_normal'"]),
        ({"weighting": "snr"}, ["'snr'", "'min_snr'"]),
        ({"min_snr_gamma": 0.0}, ["min_snr_gamma=0.0"]),
        ({"prediction": "flow", "sigma_sampling": "lognormal"}, ["'lognormal'", "'flow'", "'logit_normal'"]),
        ({"prediction": "eps", "sigma_sampling": "logit_normal"}, ["'logit_normal'", "'uniform_discrete'"]),
        (
            {"prediction": "flow", "sigma_sampling": "uniform", "zero_terminal_snr": True},
            ["zero_terminal_snr"],
        ),
        ({"prediction": "edm", "sigma_sampling": "lognormal", "sigma_data": -1}, ["sigma_data=-1"]),
    ],
)
def test_bad_config_raises(kw, words):
    with pytest.raises(ValueError) as e:
        ObjectiveConfig(**kw)
    for w in words:
        assert w in str(e.value)


def test_mismatched_model_sampling_and_shapes_raise():
    x0 = torch.randn(2, 3)
    with pytest.raises(ValueError, match="DiscreteFlow.*prediction='eps'"):
        loss(ObjectiveConfig(prediction="eps"), DiscreteFlow(), lambda x, t: x, x0)
    with pytest.raises(ValueError, match="prediction='eps'.*prediction='v'"):
        loss(ObjectiveConfig(prediction="v"), DiscreteVP(prediction="eps"), lambda x, t: x, x0)
    with pytest.raises(ValueError, match="sigma_data"):
        loss(
            ObjectiveConfig(prediction="edm", sigma_sampling="lognormal"),
            EDM(sigma_data=1.0),
            lambda x, t: x,
            x0,
        )
    cfg = ObjectiveConfig()
    with pytest.raises(ValueError, match="noise shape"):
        loss(cfg, model_sampling_for(cfg), lambda x, t: x, x0, noise=torch.randn(2, 4))
    with pytest.raises(ValueError, match="output shape"):
        loss(cfg, model_sampling_for(cfg), lambda x, t: x[:, :1], x0)
    with pytest.raises(ValueError, match="'x1'.*'eps'"):
        min_snr_weight(torch.ones(1), 5.0, "x1")


# ---------------------------------------------------------------------------------------------
# per-element loss weights (`pixel_weight`: kohya's masked loss; shapes.data.small_object_weights)


def _shifted_net(ms, gmm, delta):
    """The raw network whose denoiser is D_exact + delta."""
    d_exact = gmm.denoiser(flow=False)

    def net(x_in, t, sigma):
        x = x_in / ms.calculate_input(sigma, torch.ones_like(x_in))
        a = ms.calculate_denoised(sigma, torch.zeros_like(x), x)
        b = ms.calculate_denoised(sigma, torch.ones_like(x), x) - a
        return (d_exact(x, sigma) + delta - a) / b

    return net


def test_pixel_weight_of_the_conditioning_keeps_the_posterior_mean_as_minimiser():
    """A weight map that is the same for every sample of a condition (as the small-object map is a function
    of the caption) leaves E[x₀ | x] the minimiser: shifting the denoiser by δ costs exactly
    δ²·mean(w)/c_out² in expectation. A map that depends on x₀ itself does not: it tilts the optimum towards
    the heavily weighted samples, and a shifted denoiser then beats the exact one."""
    gmm = GaussianMixture.random(k=3, dim=4, seed=0)
    cfg = _cfg("eps")
    ms = model_sampling_for(cfg)
    n, s, delta = 20000, 0.8, 0.05
    g = torch.Generator().manual_seed(5)
    x0 = gmm.sample(n, g).reshape(n, 1, 2, 2)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    sigma = torch.full((n,), s, dtype=torch.float64)
    c2 = float(c_out_squared(ms, sigma[:1]))

    def raw(net, pw):
        return loss(cfg, ms, net, x0, {"sigma": sigma}, noise=noise, sigma=sigma, pixel_weight=pw)[1][
            "loss_raw"
        ]

    same = torch.tensor([1.0, 1.0, 5.0, 5.0], dtype=torch.float64).reshape(1, 1, 2, 2)
    for d in (delta, -delta):
        gap = raw(_shifted_net(ms, gmm, d), same) - raw(_shifted_net(ms, gmm, 0.0), same)
        expected = d * d * float(same.mean()) / c2
        se = float(gap.std()) / math.sqrt(n)
        assert abs(float(gap.mean()) - expected) < 4 * se, (d, float(gap.mean()), expected, se)

    tilted = 1.0 + 4.0 * (x0 > 0).double()  # depends on the sample, not on a condition
    gap = raw(_shifted_net(ms, gmm, delta), tilted) - raw(_shifted_net(ms, gmm, 0.0), tilted)
    se = float(gap.std()) / math.sqrt(n)
    assert float(gap.mean()) < -4 * se, (float(gap.mean()), se)  # shifted towards x₀ > 0: better than exact


def test_pixel_weight_of_ones_is_the_plain_loss_and_a_bad_shape_is_refused():
    cfg = _cfg("eps")
    ms = model_sampling_for(cfg)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=g)

    def net(x, t):
        return 0.3 * x

    plain, _ = loss(cfg, ms, net, x0, generator=torch.Generator().manual_seed(1))
    ones, _ = loss(
        cfg, ms, net, x0, generator=torch.Generator().manual_seed(1), pixel_weight=torch.ones(3, 1, 8, 8)
    )
    assert torch.equal(plain, ones)
    twice, _ = loss(
        cfg,
        ms,
        net,
        x0,
        generator=torch.Generator().manual_seed(1),
        pixel_weight=torch.full((3, 1, 8, 8), 2.0),
    )
    torch.testing.assert_close(twice, 2 * plain)
    for bad in (torch.ones(3, 1, 4, 4), torch.ones(3, 2, 8, 8, 1)):
        with pytest.raises(ValueError, match="pixel_weight shape"):
            loss(cfg, ms, net, x0, generator=torch.Generator().manual_seed(1), pixel_weight=bad)
