"""VAE training parts: PSNR/SSIM against scikit-image, the PatchGAN's shapes and receptive field, GAN
losses on known logits, the adaptive weight against gradients worked out by hand, the autoencoder and
discriminator losses against their formulas, and a few optimizer steps that lower the reconstruction error."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from latentforge.models.vae import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian
from latentforge.training.vae_losses import (
    NLayerDiscriminator,
    VAELossConfig,
    adaptive_gan_weight,
    autoencoder_loss,
    build_discriminator,
    detail_map,
    discriminator_loss,
    gan_active,
    generator_loss,
    gradient_difference,
    hinge_d_loss,
    latent_scale_factor,
    psnr,
    reconstruction_loss,
    ssim,
    vanilla_d_loss,
)

# GroupNorm(32, ·) in every block needs channel counts divisible by 32, so ch=32 is the smallest width.
TINY_VAE = AutoencoderKLConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32)  # f = 2


def _images(shape, seed, dtype=torch.float32):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2 - 1


def _pairs(dtype):
    # (x, y) pairs with very different SSIMs: unrelated images, a mildly noisy copy, a blurred-ish copy
    x = _images((3, 3, 32, 32), 0, dtype)
    noise = _images((3, 3, 32, 32), 1, dtype)
    yield x, _images((3, 3, 32, 32), 2, dtype)
    yield x, (x + 0.2 * noise).clamp(-1, 1)
    yield x, 0.5 * (x + x.roll(1, dims=-1))
    xs = _images((2, 3, 24, 40), 3, dtype)  # non-square
    yield xs, (0.8 * xs + 0.1).clamp(-1, 1)


# ---------------------------------------------------------------------------------------------------------
# metrics


def test_psnr_of_a_known_offset():
    x = _images((2, 3, 8, 8), 0)
    y = x + 0.1  # MSE = 0.01 exactly per image (up to float32 rounding of x + 0.1)
    expected = 10 * math.log10(2.0**2 / 0.01)  # 26.0206 dB
    torch.testing.assert_close(psnr(x, y), torch.full((2,), expected), atol=1e-4, rtol=0)
    assert torch.isinf(psnr(x, x)).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_psnr_and_ssim_match_scikit_image(dtype):
    metrics = pytest.importorskip("skimage.metrics")
    # float64 input runs the same arithmetic as scikit-image (float64) up to summation order: 1e-10 (seen:
    # 1e-16). float32: SSIM's local variances E[x²] − μ² lose ~1e-7 (float32 eps on values <= 1) and are
    # divided by C2 = 0.0036, so one map entry can move by up to ~3e-5, but these rounding errors are not
    # systematic and the mean over >= 14·30·3 entries averages them: 2e-6 (seen: 9e-8). PSNR: the MSE is
    # summed in float32 (relative error ~1e-6 over 3072 terms): 10/ln 10·1e-6 ≈ 4e-6 dB; 2e-5 (seen 1.4e-6).
    atol_ssim, atol_psnr = (1e-10, 1e-10) if dtype == torch.float64 else (2e-6, 2e-5)
    for x, y in _pairs(dtype):
        ours_ssim, ours_psnr = ssim(x, y), psnr(x, y)
        assert ours_ssim.dtype == dtype and ours_ssim.shape == (x.shape[0],)
        for i in range(x.shape[0]):
            a = x[i].permute(1, 2, 0).double().numpy()  # HWC
            b = y[i].permute(1, 2, 0).double().numpy()
            ref_ssim = metrics.structural_similarity(
                a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=2.0,
                channel_axis=-1,
            )  # fmt: skip
            ref_psnr = metrics.peak_signal_noise_ratio(a, b, data_range=2.0)
            assert abs(ours_ssim[i].item() - ref_ssim) < atol_ssim, (i, ours_ssim[i].item(), ref_ssim)
            assert abs(ours_psnr[i].item() - ref_psnr) < atol_psnr, (i, ours_psnr[i].item(), ref_psnr)


def test_ssim_single_channel_unit_range_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    x = _images((2, 1, 20, 17), 5, torch.float64) * 0.5 + 0.5  # [0, 1]
    y = (x + 0.05 * _images((2, 1, 20, 17), 6, torch.float64)).clamp(0, 1)
    ours = ssim(x, y, data_range=1.0)
    for i in range(2):
        ref = metrics.structural_similarity(
            x[i, 0].numpy(), y[i, 0].numpy(), gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
            data_range=1.0,
        )  # fmt: skip
        assert abs(ours[i].item() - ref) < 1e-10  # float64 on both sides


def test_ssim_exact_cases():
    x = _images((2, 3, 16, 16), 7)
    torch.testing.assert_close(ssim(x, x), torch.ones(2))  # identical images: every map entry is 1
    # constant images a and b: μ = a, b and all variances 0, so SSIM = (2ab + C1)/(a² + b² + C1)
    a, b, c1 = 0.5, -0.25, (0.01 * 2.0) ** 2
    got = ssim(torch.full((1, 3, 12, 12), a), torch.full((1, 3, 12, 12), b))
    torch.testing.assert_close(got, torch.tensor([(2 * a * b + c1) / (a * a + b * b + c1)]))


def test_metrics_reject_bad_input():
    x = torch.zeros(1, 3, 16, 16)
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, torch.zeros(1, 3, 16, 15))
    with pytest.raises(ValueError, match="same shape"):
        ssim(x[0], x[0])
    with pytest.raises(ValueError, match="at least 11"):
        ssim(torch.zeros(1, 3, 10, 16), torch.zeros(1, 3, 10, 16))
    with pytest.raises(ValueError, match="data_range"):
        psnr(x, x, data_range=0.0)


# ---------------------------------------------------------------------------------------------------------
# discriminator


@pytest.mark.parametrize(
    "size, n_layers, out",
    [(256, 3, 30), (64, 3, 6), (64, 1, 30), (64, 2, 14), (24, 3, 1)],  # 256/3 -> 30×30: pix2pix's 70×70 D
)
def test_patchgan_output_shape(size, n_layers, out):
    disc = NLayerDiscriminator(in_channels=3, ndf=8, n_layers=n_layers)
    with torch.no_grad():
        logits = disc(torch.zeros(2, 3, size, size))
    assert logits.shape == (2, 1, out, out)
    assert disc.output_size(size) == out


def test_patchgan_receptive_field_is_70():
    # Isola et al. 2017, §3.2.2: with n_layers=3 each logit sees a 70×70 patch. In eval mode BatchNorm is
    # a fixed affine map and LeakyReLU has no zero slope, so the input gradient of one central logit is
    # nonzero exactly on its receptive field (random weights make exact cancellation impossible in practice).
    disc = NLayerDiscriminator(in_channels=1, ndf=4, n_layers=3).eval()
    x = torch.randn(1, 1, 160, 160, requires_grad=True)
    logits = disc(x)  # [1, 1, 18, 18]
    logits[0, 0, 9, 9].backward()
    support = x.grad[0, 0] != 0
    rows = support.any(dim=1).nonzero().flatten()
    cols = support.any(dim=0).nonzero().flatten()
    assert (rows.max() - rows.min() + 1).item() == 70
    assert (cols.max() - cols.min() + 1).item() == 70


def test_patchgan_layout_parameters_and_init():
    torch.manual_seed(0)
    disc = build_discriminator(VAELossConfig())  # C64-C128-C256-C512, 3 input channels
    sd = disc.state_dict()
    convs = [0, 2, 5, 8, 11]
    assert [i for i, m in enumerate(disc.main) if isinstance(m, nn.Conv2d)] == convs
    assert [i for i, m in enumerate(disc.main) if isinstance(m, nn.BatchNorm2d)] == [3, 6, 9]
    assert [disc.main[i].out_channels for i in convs] == [64, 128, 256, 512, 1]
    assert [disc.main[i].stride for i in convs] == [(2, 2), (2, 2), (2, 2), (1, 1), (1, 1)]
    assert "main.0.bias" in sd and "main.11.bias" in sd
    assert all(f"main.{i}.bias" not in sd for i in (2, 5, 8))  # BatchNorm supplies the shift
    assert all(disc.main[i].negative_slope == 0.2 for i in (1, 4, 7, 10))
    # 4·4·(3·64 + 64·128 + 128·256 + 256·512 + 512·1) weights + 64 + 1 conv biases + 2·(128 + 256 + 512) BN
    n_params = 16 * (3 * 64 + 64 * 128 + 128 * 256 + 256 * 512 + 512) + 65 + 2 * (128 + 256 + 512)
    assert sum(p.numel() for p in disc.parameters()) == n_params == 2_765_633
    # init: the 2.1M weights of main.8 give a std estimate within ~0.05% (1/√(2n)); 1% is a loose bound.
    w = disc.main[8].weight
    assert abs(w.mean().item()) < 1e-4 and abs(w.std().item() - 0.02) < 2e-4
    bn = disc.main[9]  # 512 draws: std of the mean is 0.02/√512 ≈ 9e-4, so 5e-3 is > 5 sigma
    assert abs(bn.weight.mean().item() - 1.0) < 5e-3 and abs(bn.weight.std().item() - 0.02) < 5e-3
    assert torch.equal(bn.bias, torch.zeros(512))


def test_patchgan_rejects_bad_input():
    with pytest.raises(ValueError, match="n_layers"):
        NLayerDiscriminator(n_layers=0)
    with pytest.raises(ValueError, match="H, W >= 24"):
        NLayerDiscriminator(ndf=8)(torch.zeros(1, 3, 16, 16))


# ---------------------------------------------------------------------------------------------------------
# GAN losses and the adaptive weight


def test_gan_losses_on_known_logits():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.5])
    # relu(1 − real) = [0, 0.5, 2] (mean 5/6); relu(1 + fake) = [0, 1, 2.5] (mean 7/6); ½(5/6 + 7/6) = 1
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(1.0))
    torch.testing.assert_close(generator_loss(fake), torch.tensor(1.0 / 6.0))  # −(−2 + 0 + 1.5)/3
    # vanilla: −log σ(log 3) = log(4/3), −log(1 − σ(log 3)) = log 4
    l3 = torch.tensor([math.log(3.0)])
    torch.testing.assert_close(vanilla_d_loss(l3, l3), torch.tensor(0.5 * (math.log(4 / 3) + math.log(4))))
    torch.testing.assert_close(vanilla_d_loss(torch.zeros(4), torch.zeros(4)), torch.tensor(math.log(2.0)))
    # confident and right: both losses vanish (softplus does not overflow at ±100)
    assert vanilla_d_loss(torch.tensor([100.0]), torch.tensor([-100.0])).item() < 1e-30
    assert hinge_d_loss(torch.tensor([1.0]), torch.tensor([-1.0])).item() == 0.0


def test_adaptive_weight_is_the_ratio_of_gradient_norms():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 4, generator=g, requires_grad=True)
    a, b = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    nll = (w * a).sum()  # ∂/∂w = a
    gan = (w.square() * b).sum()  # ∂/∂w = 2·w·b
    lam = adaptive_gan_weight(nll, gan, w)
    expected = a.norm() / ((2 * w * b).detach().norm() + 1e-4)
    torch.testing.assert_close(lam, expected)
    assert not lam.requires_grad
    (nll + gan).backward()  # the graphs were retained
    # a GAN loss whose gradient at w vanishes: λ = ‖a‖/1e-4 ≈ 3e4, clamped to 1e4
    flat = (w * 0.0).sum()
    assert adaptive_gan_weight((w * a).sum(), flat, w).item() == 1e4


# ---------------------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize(
    "field, value",
    [
        ("recon", "l3"),
        ("disc_loss", "wasserstein"),
        ("kl_weight", -1e-6),
        ("kl_weight", float("nan")),
        ("disc_weight", float("inf")),
        ("disc_start", -1),
        ("disc_start", 1.5),
        ("disc_layers", 0),
        ("disc_channels", True),
        ("gdl_weight", -0.5),
        ("gdl_weight", float("nan")),
        ("detail_weight", -1.0),
        ("detail_weight", float("inf")),
    ],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        VAELossConfig(**{field: value})


def test_gan_active_switch():
    cfg = VAELossConfig(disc_start=10)
    disc = nn.Identity()
    assert not gan_active(cfg, 9, disc) and gan_active(cfg, 10, disc)
    assert not gan_active(cfg, 10, None)
    assert not gan_active(VAELossConfig(disc_start=10, disc_weight=0.0), 10, disc)


# ---------------------------------------------------------------------------------------------------------
# autoencoder and discriminator losses


class _KnownPosterior(nn.Module):
    """A stand-in VAE: x̂ = s·x, and q(z|x) = N(1, 4) on a [B, 2, 3, 3] latent."""

    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.tensor(0.5))

    def forward(self, x, sample_posterior=True, generator=None):
        moments = torch.cat(
            [torch.ones(x.shape[0], 2, 3, 3), torch.full((x.shape[0], 2, 3, 3), math.log(4.0))], 1
        )
        return self.s * x, DiagonalGaussian(moments)


@pytest.mark.parametrize("recon", ["l1", "l2"])
def test_loss_of_a_known_gaussian(recon):
    x = _images((2, 3, 8, 8), 0)
    cfg = VAELossConfig(recon=recon, kl_weight=0.3)
    loss, logs, x_hat = autoencoder_loss(cfg, _KnownPosterior(), x, step=0)
    # KL(N(1, 4) ‖ N(0, 1)) per dim = ½(μ² + σ² − 1 − ln σ²) = ½(1 + 4 − 1 − ln 4) = 2 − ln 2; 18 dims
    kl = 18 * (2 - math.log(2.0))
    err = (0.5 * x - x).double()
    rec = err.abs().mean().item() if recon == "l1" else err.square().mean().item()
    assert logs["kl"] == pytest.approx(kl, rel=1e-6)  # float32 sums of 18 terms
    assert logs["rec"] == pytest.approx(rec, rel=1e-6)
    assert loss.item() == pytest.approx(rec + 0.3 * kl / (3 * 8 * 8), rel=1e-6)
    assert logs["g_loss"] == 0.0 and logs["d_weight"] == 0.0
    torch.testing.assert_close(reconstruction_loss(cfg, x, x_hat), torch.tensor(rec, dtype=torch.float32))


def _tiny(seed=0):
    torch.manual_seed(seed)
    return AutoencoderKL(TINY_VAE)


def test_autoencoder_loss_matches_its_formula_and_reaches_every_parameter():
    vae = _tiny()
    x = _images((2, 3, 16, 16), 1)
    cfg = VAELossConfig(kl_weight=0.5)
    loss, logs, x_hat = autoencoder_loss(cfg, vae, x, step=0, generator=torch.Generator().manual_seed(3))
    # the same computation written out: z = μ + σ·ε with the same draw, KL from torch.distributions
    with torch.no_grad():
        q = vae.encode(x)
        eps = torch.randn(q.mean.shape, generator=torch.Generator().manual_seed(3))
        ref_recon = vae.decode(q.mean + q.std * eps)
        normal = torch.distributions.Normal
        kl = torch.distributions.kl_divergence(normal(q.mean, q.std), normal(0.0, 1.0)).sum((1, 2, 3)).mean()
        rec = (x - ref_recon).abs().mean()
    torch.testing.assert_close(x_hat.detach(), ref_recon)
    # float32 throughout; the two KL formulas differ in rounding only (~1e-7 relative)
    assert logs["kl"] == pytest.approx(kl.item(), rel=1e-5)
    assert loss.item() == pytest.approx((rec + 0.5 * kl / (3 * 16 * 16)).item(), rel=1e-5)
    loss.backward()
    for name, p in vae.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0
    assert vae.decoder.conv_out.weight.grad.abs().sum() > 0


class _Wrapped(nn.Module):  # the shape of DistributedDataParallel: the network lives in `.module`
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_gan_term_is_off_before_disc_start_and_on_after():
    vae = _tiny()
    torch.manual_seed(1)
    disc = NLayerDiscriminator(ndf=8, n_layers=2)
    x = _images((2, 3, 16, 16), 2)
    cfg = VAELossConfig(disc_start=5, disc_weight=0.5)

    def run(step, d, model=vae):
        vae.zero_grad()
        disc.zero_grad()
        return autoencoder_loss(cfg, model, x, step, d, generator=torch.Generator().manual_seed(0))

    plain, _, _ = run(4, None)
    before, logs, _ = run(4, disc)
    assert before.item() == plain.item()
    assert logs["g_loss"] == 0.0 and logs["d_weight"] == 0.0
    before.backward()
    assert all(p.grad is None for p in disc.parameters())  # the discriminator was not even run

    after, logs, x_hat = run(5, disc, model=_Wrapped(vae))  # also: the last layer found through `.module`
    assert logs["g_loss"] != 0.0 and logs["d_weight"] > 0.0
    # the GAN term by hand: −mean D(x̂) and 0.5·λ with λ from the two gradients at decoder.conv_out.weight
    logits = disc(x_hat)
    g_loss = -logits.mean()
    rec = (x - x_hat).abs().mean()
    last = vae.decoder.conv_out.weight
    lam = torch.autograd.grad(rec, last, retain_graph=True)[0].norm() / (
        torch.autograd.grad(g_loss, last, retain_graph=True)[0].norm() + 1e-4
    )
    assert logs["g_loss"] == pytest.approx(g_loss.item(), rel=1e-5)
    assert logs["d_weight"] == pytest.approx(0.5 * lam.item(), rel=1e-4)  # ratio of float32 norms
    assert after.item() == pytest.approx(plain.item() + 0.5 * lam.item() * g_loss.item(), rel=1e-4, abs=1e-6)
    after.backward()
    assert vae.decoder.conv_out.weight.grad.abs().sum() > 0

    with torch.no_grad():  # evaluation: no gradients, so λ is 0 (as LDM does) instead of an error
        _, logs, _ = run(5, disc)
    assert logs["d_weight"] == 0.0 and logs["g_loss"] != 0.0


def test_discriminator_loss():
    torch.manual_seed(0)
    disc = NLayerDiscriminator(ndf=8, n_layers=2)
    x = _images((2, 3, 16, 16), 4)
    recon = _images((2, 3, 16, 16), 5).requires_grad_(True)
    cfg = VAELossConfig(disc_start=5, disc_loss="hinge")
    stats = disc.main[3].running_mean.clone()

    loss, logs = discriminator_loss(cfg, disc, x, recon, step=4)
    assert loss.item() == 0.0 and not loss.requires_grad and logs["d_loss"] == 0.0
    assert torch.equal(disc.main[3].running_mean, stats)  # not run: BatchNorm statistics untouched

    loss, logs = discriminator_loss(cfg, disc, x, recon, step=5)
    expected = hinge_d_loss(disc(x), disc(recon))  # train-mode BN: same outputs on a second call
    torch.testing.assert_close(loss, expected)
    assert logs["logits_real"] == pytest.approx(disc(x).mean().item(), rel=1e-6)
    loss.backward()
    assert recon.grad is None  # x̂ is detached: only the discriminator learns from this loss
    assert all(p.grad is not None for p in disc.parameters())

    vanilla, _ = discriminator_loss(VAELossConfig(disc_start=5, disc_loss="vanilla"), disc, x, recon, 5)
    torch.testing.assert_close(vanilla, vanilla_d_loss(disc(x), disc(recon)))


def test_a_few_adamw_steps_lower_the_reconstruction_error():
    vae = _tiny(seed=2)
    x = _images((4, 3, 16, 16), 6)
    cfg = VAELossConfig()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    recs = []
    for step in range(25):
        loss, logs, _ = autoencoder_loss(cfg, vae, x, step, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        recs.append(logs["rec"])
    assert math.isfinite(recs[-1])
    assert recs[-1] < 0.6 * recs[0], recs


# ---------------------------------------------------------------------------------------------------------
# the gradient difference loss (Mathieu et al. 2016, Eq. 5, α = 1)


def test_gradient_difference_of_a_hand_worked_edge():
    # one row [0, 0, 1, 1] against [0, ½, ½, 1], repeated on 2 rows: across, |x| steps are 0, 1, 0 and
    # |x̂| steps ½, 0, ½, so the term is mean(½, 1, ½) = 2/3; down, both images are constant: 0
    x = torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(1, 1, 2, 4)
    blurred = torch.tensor([0.0, 0.5, 0.5, 1.0]).expand(1, 1, 2, 4)
    assert gradient_difference(x, blurred).item() == pytest.approx(2 / 3, rel=1e-6)
    # the transposed images: the same loss from the other direction
    t = gradient_difference(x.transpose(-1, -2), blurred.transpose(-1, -2))
    assert t.item() == pytest.approx(2 / 3, rel=1e-6)


def test_gradient_difference_prefers_a_sharp_edge_that_l2_cannot_tell_from_a_blurred_one():
    # an edge blurred over a box of 3 pixels, and the same edge kept sharp but offset by the constant
    # that gives exactly the blur's mean squared error: l2 scores them equal, GDL only charges the blur
    x = torch.zeros(2, 3, 8, 8)
    x[..., 4:] = 1.0
    blurred = x.clone()
    blurred[..., 3], blurred[..., 4] = 1 / 3, 2 / 3
    mse = (blurred - x).square().mean()
    offset = x + mse.sqrt()  # (x̂ − x)² = mse at every pixel
    torch.testing.assert_close((offset - x).square().mean(), mse)
    assert gradient_difference(x, offset).item() == pytest.approx(0.0, abs=1e-7)
    # across: steps of x are 1 at one place; the blur's are ⅓, ⅓, ⅓ over three: |0−⅓|·2 + |1−⅓| = 4/3 over 7
    assert gradient_difference(x, blurred).item() == pytest.approx(4 / 3 / 7, rel=1e-6)
    assert gradient_difference(x, x).item() == 0.0


def test_gradient_difference_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(1, 3, 1, 8\)"):
        gradient_difference(torch.zeros(1, 3, 1, 8), torch.zeros(1, 3, 1, 8))
    with pytest.raises(ValueError, match="one shape"):
        gradient_difference(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 4))


def test_the_gdl_term_enters_the_loss_with_its_weight_and_is_logged():
    x = _images((2, 3, 8, 8), 0)
    plain_loss, plain, x_hat = autoencoder_loss(VAELossConfig(kl_weight=0.3), _KnownPosterior(), x, step=0)
    assert "gdl" not in plain  # off by default: LDM's objective
    loss, logs, _ = autoencoder_loss(VAELossConfig(kl_weight=0.3, gdl_weight=2.0), _KnownPosterior(), x, 0)
    gdl = gradient_difference(x, x_hat).item()
    assert gdl > 0 and logs["gdl"] == pytest.approx(gdl, rel=1e-6)
    assert loss.item() == pytest.approx(plain_loss.item() + 2.0 * gdl, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------
# detail-weighted reconstruction


def test_detail_map_of_a_hand_worked_step_and_dot():
    # a step [0, 0, 1, 1] (rows replicated, so the 3×3 box is a 3-wide mean of [0, 0, 0, 1, 1, 1] with the
    # ends replicated): means 0, ⅓, ⅔, 1, so D = 0, ⅓, ⅓, 0, summed over the 2 equal channels
    x = torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(1, 2, 3, 4)
    expected = 2 * torch.tensor([0.0, 1 / 3, 1 / 3, 0.0]).expand(1, 1, 3, 4)
    torch.testing.assert_close(detail_map(x), expected)
    # a one-pixel dot of height h in a flat 5×5 field: 8h/9 on it, h/9 on its 8 neighbours, 0 beyond
    dot = torch.zeros(1, 1, 5, 5)
    dot[..., 2, 2] = 0.9
    d = detail_map(dot)[0, 0]
    assert d[2, 2].item() == pytest.approx(0.8, rel=1e-6)
    assert torch.allclose(d[1:4, 1:4].sum() - d[2, 2], torch.tensor(8 * 0.1))
    assert d[0].abs().max() == 0 and d[:, 0].abs().max() == 0
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        detail_map(torch.zeros(3, 4))


@pytest.mark.parametrize("recon", ["l1", "l2"])
def test_detail_weight_multiplies_each_pixels_error_by_one_plus_w_times_the_detail(recon):
    # the step above against all zeros: errors 0, 0, 1, 1 (l1 and l2 alike), weights 1 + 3·(0, ⅔, ⅔, 0) for
    # w = 3 (two channels): (0 + 0 + 3 + 1) / 4 = 1 per channel, against the plain mean ½
    x = torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(1, 2, 3, 4)
    zero = torch.zeros_like(x)
    assert reconstruction_loss(VAELossConfig(recon=recon), x, zero).item() == pytest.approx(0.5)
    weighted = reconstruction_loss(VAELossConfig(recon=recon, detail_weight=3.0), x, zero)
    assert weighted.item() == pytest.approx(1.0, rel=1e-6)
    # on a flat image the weight is 1 everywhere: the same loss as the plain mean
    flat, noisy = torch.full((1, 3, 6, 6), 0.3), _images((1, 3, 6, 6), 1)
    plain = reconstruction_loss(VAELossConfig(recon=recon), flat, noisy)
    weighted = reconstruction_loss(VAELossConfig(recon=recon, detail_weight=7.0), flat, noisy)
    torch.testing.assert_close(weighted, plain)


def test_detail_weight_reaches_the_autoencoder_loss():
    x = _images((2, 3, 8, 8), 0)
    cfg = VAELossConfig(kl_weight=0.0, detail_weight=2.0)
    loss, logs, x_hat = autoencoder_loss(cfg, _KnownPosterior(), x, 0)
    err = (x_hat.detach() - x).abs()
    expected = (err * (1 + 2.0 * detail_map(x))).mean()
    assert logs["rec"] == pytest.approx(expected.item(), rel=1e-6)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------
# latent scale


def test_latent_scale_factor():
    z = 3.0 * torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0)) + 0.7
    ref = 1.0 / np.std(z.double().numpy(), ddof=1)  # Bessel-corrected, as torch.std in LDM's scale_by_std
    assert latent_scale_factor(z) == pytest.approx(ref, rel=1e-12)
    assert latent_scale_factor(z.split([1, 3])) == pytest.approx(ref, rel=1e-12)  # batch by batch
    assert latent_scale_factor(iter([z[:2], z[2:]])) == pytest.approx(ref, rel=1e-12)
    # A large mean does not destroy the streamed variance (shifted sums). Without the shift, Σz² ≈ 1e18 per
    # value in float64 carries absolute errors of ~1e2, swamping the variance 9; with it, 1e-9 holds easily.
    far = z.double() + 1e9
    assert latent_scale_factor(far.split(2)) == pytest.approx(1.0 / np.std(far.numpy(), ddof=1), rel=1e-9)


@pytest.mark.parametrize(
    "latents, match",
    [
        (torch.ones(1), "at least 2"),
        (torch.full((3, 4), 2.0), "zero spread"),
        (torch.tensor([0.0, float("nan")]), "non-finite"),
        ([], "at least 2"),
    ],
)
def test_latent_scale_factor_rejects_bad_input(latents, match):
    with pytest.raises(ValueError, match=match):
        latent_scale_factor(latents)
