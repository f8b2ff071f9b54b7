"""Model sampling: a network that predicts the true target must give back x₀ exactly, for every family."""

import pytest
import torch

from latentforge.model_sampling import EDM, Denoiser, DiscreteFlow, DiscreteVP


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.05, 1.3, 9.0], dtype=torch.float64)
    return x0, eps, sigma


class _Oracle(torch.nn.Module):
    """A 'network' that knows x₀ and ε and returns what a perfect model of the given kind returns."""

    def __init__(self, target):
        super().__init__()
        self.target = target
        self.seen = []

    def forward(self, x_in, t, **cond):
        self.seen.append((x_in, t, cond))
        return self.target


def test_discrete_vp_eps_and_v_are_exact():
    x0, eps, sigma = _data()
    s = sigma.reshape(-1, 1, 1, 1)
    x = x0 + s * eps  # VE form
    ms = DiscreteVP(prediction="eps")
    net = _Oracle(eps)
    out = Denoiser(net, ms)(x, sigma, context="c")
    assert torch.allclose(out, x0, atol=1e-12)
    x_in, t, cond = net.seen[0]
    # the network sees the VP sample √ᾱ·x₀ + √(1−ᾱ)·ε and the fractional timestep of σ
    abar = 1 / (1 + s**2)
    assert torch.allclose(x_in, abar.sqrt() * x0 + (1 - abar).sqrt() * eps, atol=1e-12)
    assert torch.allclose(ms.sigma(t), sigma.float(), rtol=1e-5) and cond == {"context": "c"}
    # v-prediction (Salimans & Ho 2022): v = √ᾱ·ε − √(1−ᾱ)·x₀
    v = abar.sqrt() * eps - (1 - abar).sqrt() * x0
    out_v = Denoiser(_Oracle(v), DiscreteVP(prediction="v"))(x, sigma)
    assert torch.allclose(out_v, x0, atol=1e-12)


def test_discrete_vp_table_matches_diffusers():
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    ms = DiscreteVP()
    # diffusers takes the cumulative product of 1000 factors in float32 (~1000·6e-8 relative drift);
    # ours is float64, so agreement is to ~1e-5 relative, and 1e-4 on σ near ᾱ → 1 where 1 − ᾱ cancels.
    assert torch.allclose(ms.alphas_cumprod, ref.float(), rtol=3e-5)
    assert torch.allclose(ms.sigmas, ((1 - ref) / ref).sqrt().float(), rtol=1e-4)


def test_timestep_roundtrip_and_interpolation():
    ms = DiscreteVP()
    t = torch.tensor([0.0, 10.5, 500.0, 999.0], dtype=torch.float64)
    assert torch.allclose(ms.timestep(ms.sigma(t)).double(), t, atol=1e-3)
    # integer timesteps read the table; halfway is the geometric mean (log-σ interpolation)
    assert float(ms.sigma(torch.tensor(500.0))) == pytest.approx(float(ms.sigmas[500]), rel=1e-6)
    mid = (ms.sigmas[10].double() * ms.sigmas[11].double()).sqrt()
    assert float(ms.sigma(torch.tensor(10.5))) == pytest.approx(float(mid), rel=1e-6)


def test_flow_is_exact_and_sd3_conventions():
    x0, eps, _ = _data(1)
    sigma = torch.tensor([0.1, 0.5, 0.97], dtype=torch.float64)
    s = sigma.reshape(-1, 1, 1, 1)
    x = (1 - s) * x0 + s * eps
    ms = DiscreteFlow(shift=3.0)
    net = _Oracle(eps - x0)  # rectified-flow velocity
    assert torch.allclose(Denoiser(net, ms)(x, sigma), x0, atol=1e-12)
    assert torch.allclose(net.seen[0][1], 1000 * sigma)  # timestep = 1000·σ
    assert torch.allclose(net.seen[0][0], x)  # no input scaling
    # shift 3: σ' = 3t/(1 + 2t)
    assert float(ms.sigma(torch.tensor(500.0))) == pytest.approx(1.5 / 2.0)
    assert float(ms.sigma_max) == pytest.approx(1.0) and float(ms.sigma_min) == pytest.approx(0.003 / 1.002)
    # img2img noising and its inverse
    noised = ms.noise_scaling(sigma, eps, x0)
    assert torch.allclose(noised, x)
    assert torch.allclose(ms.inverse_noise_scaling(sigma, (1 - s) * x0), x0)


def test_edm_preconditioning_is_exact():
    x0, eps, sigma = _data(2)
    s = sigma.reshape(-1, 1, 1, 1)
    x = x0 + s * eps
    ms = EDM(sigma_data=0.5)
    c_skip = 0.25 / (s**2 + 0.25)
    c_out = s * 0.5 / (s**2 + 0.25).sqrt()
    F = (x0 - c_skip * x) / c_out  # Karras et al. 2022, Eq. 8: the training target
    net = _Oracle(F)
    assert torch.allclose(Denoiser(net, ms)(x, sigma), x0, atol=1e-12)
    assert torch.allclose(net.seen[0][1], sigma.log() / 4)  # c_noise = ¼ ln σ
    assert torch.allclose(net.seen[0][0], x / (s**2 + 0.25).sqrt())  # c_in


def test_vp_noise_scaling():
    x0, eps, sigma = _data(3)
    ms = DiscreteVP()
    s = sigma.reshape(-1, 1, 1, 1)
    assert torch.allclose(ms.noise_scaling(sigma, eps, x0), x0 + s * eps)
    assert torch.allclose(ms.noise_scaling(sigma, eps, x0 * 0, max_denoise=True), eps * (1 + s**2).sqrt())


def test_denoiser_runs_network_in_its_dtype():
    class Net(torch.nn.Module):
        def forward(self, x, t):
            assert x.dtype == torch.bfloat16
            return torch.zeros_like(x)

    x = torch.randn(2, 4, 3, 3)
    out = Denoiser(Net(), DiscreteVP(), dtype=torch.bfloat16)(x, torch.tensor(2.0))
    assert out.dtype == torch.float32 and torch.equal(out, x)  # eps = 0 -> D = x


def test_bad_prediction():
    with pytest.raises(ValueError, match="'eps' or 'v'"):
        DiscreteVP(prediction="x0")


def test_flow_euler_is_euler_with_velocity():
    """SD3's flow-matching Euler x ← x + (σ_next − σ)·v (diffusers FlowMatchEulerDiscreteScheduler.step)
    is Karras Euler on D = x − σ·v, since d = (x − D)/σ = v."""
    from latentforge.samplers import SAMPLERS

    g = torch.Generator().manual_seed(5)
    W = torch.randn(4, 4, generator=g, dtype=torch.float64) * 0.3

    class VNet(torch.nn.Module):
        def forward(self, x, t):
            return x @ W + t[:, None] / 1000

    D = Denoiser(VNet(), DiscreteFlow(shift=3.0))
    sigmas = torch.tensor([1.0, 0.8, 0.5, 0.2, 0.0], dtype=torch.float64)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    manual = x.clone()
    for a, b in zip(sigmas[:-1], sigmas[1:], strict=True):
        manual = manual + (b - a) * VNet()(manual, torch.full((3,), 1000 * float(a), dtype=torch.float64))
    assert torch.allclose(SAMPLERS["euler"](D, x, sigmas), manual, atol=1e-12)


@pytest.mark.parametrize(
    "ms",
    [DiscreteVP(), DiscreteVP(prediction="v", zero_terminal_snr=True), EDM(sigma_data=0.7, prediction="v"),
     DiscreteFlow(shift=2.5), DiscreteVP(shift=4.0)],
    ids=["vp-eps", "vp-v-ztsnr", "edm-v", "flow", "vp-eps-shift4"],
)  # fmt: skip
def test_preconditioning_and_json_round_trip(ms):
    """D = c_skip·x + c_out·F(c_in·x): a network that outputs its own training target
    (x₀ − c_skip·x)/c_out makes D return x₀ exactly (Karras et al. 2022, Eq. 7-8), and
    to_json/from_json rebuild the same sampling."""
    from latentforge import model_sampling

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.05, 0.7, 0.95] if ms.is_flow else [0.05, 1.3, 9.0], dtype=torch.float64)
    s = sigma.reshape(-1, 1, 1, 1)
    x = ms.noise_scaling(sigma, torch.randn(x0.shape, generator=g, dtype=torch.float64), x0)
    target = (x0 - ms.c_skip(s) * x) / ms.c_out(s)
    torch.testing.assert_close(ms.calculate_denoised(sigma, target, x), x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(ms.calculate_input(sigma, x), ms.c_in(s) * x, rtol=0, atol=0)
    back = model_sampling.from_json(model_sampling.to_json(ms))
    assert type(back) is type(ms) and model_sampling.to_json(back) == model_sampling.to_json(ms)
    torch.testing.assert_close(back.sigmas, ms.sigmas)


@pytest.mark.parametrize("prediction,ztsnr", [("eps", False), ("v", True)])
def test_discrete_vp_shift_divides_the_snr_as_sd3s_flow_shift_does(prediction, ztsnr):
    """DiscreteVP(shift=α): every σ of the table times α, ᾱ = 1/(1 + σ²) (VE form, Karras et al. 2022,
    Table 1), and the SNR divided by α² at every t, as SD3's flow shift σ' = ασ/(1 + (α − 1)σ) divides the
    flow SNR ((1 − σ)/σ)² (Esser et al. 2024, Eq. 23): the ratio is checked against that independent
    formula. The network still sees the table's t: t(α·σ_i) = i."""
    base = DiscreteVP(prediction=prediction, zero_terminal_snr=ztsnr)
    shifted = DiscreteVP(prediction=prediction, zero_terminal_snr=ztsnr, shift=4.0)
    torch.testing.assert_close(shifted.sigmas, 4 * base.sigmas, rtol=1e-6, atol=0)
    ac = shifted.alphas_cumprod.double()
    torch.testing.assert_close(ac, 1 / (1 + shifted.sigmas.double() ** 2), rtol=1e-6, atol=0)
    snr_ratio = (ac / (1 - ac)) / (base.alphas_cumprod.double() / (1 - base.alphas_cumprod.double()))
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    flow = (1 - t) / t
    flow_shifted = (1 - 4 * t / (1 + 3 * t)) / (4 * t / (1 + 3 * t))
    flow_ratio = (flow_shifted / flow) ** 2  # 1/16 at every t
    # ᾱ is stored in float32: 1 − ᾱ near ᾱ = 1 − 8.5e-4 (t = 0) carries a relative error up to 6e-8 / 8.5e-4
    expected = torch.full_like(snr_ratio, float(flow_ratio.mean()))
    torch.testing.assert_close(snr_ratio, expected, rtol=1e-4, atol=0)
    torch.testing.assert_close(flow_ratio, torch.full_like(flow_ratio, 1 / 16), rtol=1e-12, atol=0)
    idx = torch.tensor([0, 1, 250, 999])
    t_back = shifted.timestep(shifted.sigmas[idx]).double()
    torch.testing.assert_close(t_back, idx.double(), rtol=0, atol=1e-3)
    assert float(shifted.sigma_max) == pytest.approx(4 * float(base.sigma_max), rel=1e-6)


def test_discrete_vp_shift_defaults_to_1_for_files_without_it_and_rejects_bad_values():
    """A checkpoint written before the field existed (no "shift" in its JSON) is SD's table; a shift that is
    not a finite positive number is refused with its value."""
    from latentforge import model_sampling

    old = model_sampling.from_json('{"type": "DiscreteVP", "prediction": "eps", "zero_terminal_snr": false}')
    assert old.shift == 1.0 and torch.equal(old.sigmas, DiscreteVP().sigmas)
    for bad in (0, -2.0, float("nan"), float("inf"), "4"):
        with pytest.raises(ValueError, match="shift="):
            DiscreteVP(shift=bad)
    assert model_sampling.for_prediction("eps", shift=3.0).shift == 3.0


def test_model_sampling_json_rejects_unknown_type_and_field():
    from latentforge import model_sampling

    with pytest.raises(ValueError, match="unknown model sampling 'VE'"):
        model_sampling.from_json('{"type": "VE"}')
    with pytest.raises(ValueError, match="DiscreteFlow has no field 'gamma'"):
        model_sampling.from_json('{"type": "DiscreteFlow", "gamma": 2}')
