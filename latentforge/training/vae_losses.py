"""What trains a KL autoencoder: reconstruction + KL + an optional patch-GAN, and the metrics that judge it.

The objective is LDM's `LPIPSWithDiscriminator` (Rombach et al. 2022, App. G; CompVis/latent-diffusion
`ldm/modules/losses/contperceptual.py`) without its LPIPS term, whose VGG weights cannot be downloaded here,
and without its learned output log-variance (a scalar that starts at 0, where it leaves the loss unchanged):

    L_AE = rec + gdl_weight·GDL + kl_weight·KL/(C·H·W) + [step ≥ disc_start]·disc_weight·λ·(−mean D(x̂))
    L_D  = [step ≥ disc_start]·d_loss(D(x), D(x̂))                                          (discriminator)

- rec is the per-pixel mean of |x − x̂| ("l1", LDM) or (x − x̂)² ("l2") over [B, C, H, W], each pixel's
  error optionally weighted by 1 + detail_weight·D(x), D the image's local detail (`detail_map`; default
  weight 0, LDM's plain mean): small shapes are a few percent of a picture's pixels, so a plain mean lets a
  decoder round them off for almost nothing;
- GDL is the gradient difference loss (Mathieu, Couprie and LeCun 2016, "Deep multi-scale video prediction
  beyond mean square error", Eq. 5, α = 1): an optional term (default weight 0, not in LDM) that charges a
  blurred edge, which rec alone prefers to a sharp edge in a slightly wrong place (`gradient_difference`);
- KL = KL(q(z|x) ‖ N(0, I)) summed over the latent's dims and averaged over the batch (LDM's `kl_loss`);
- λ is the adaptive weight of VQGAN (Esser et al. 2021, Eq. 7), see `adaptive_gan_weight`.

Scale. LDM sums the reconstruction over the pixels (`torch.sum(nll) / batch`). Here it is averaged, and the
KL is divided by the same C·H·W, so L_AE is exactly LDM's loss divided by C·H·W: `kl_weight` keeps the
meaning it has in LDM configs (1e-6 for the SD VAEs), while the loss stays O(1) whatever the image size
(readable logs, resolution-independent learning rate and clipping threshold). The GAN term needs no
rescaling: λ is a ratio of gradient norms, so it scales with the reconstruction term.

D is the 70×70 PatchGAN of pix2pix (`NLayerDiscriminator`). Images are in [−1, 1], [B, C, H, W].
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

RECONS = ("l1", "l2")
DISC_LOSSES = ("hinge", "vanilla")


# ---------------------------------------------------------------------------------------------------------
# Metrics


def _check_images(x: torch.Tensor, y: torch.Tensor, data_range: float, what: str, min_size: int = 1) -> None:
    if x.ndim != 4 or x.shape != y.shape:
        raise ValueError(
            f"{what} needs two image batches of the same shape [B, C, H, W], got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    if min(x.shape[-2:]) < min_size:
        raise ValueError(
            f"{what} needs images of at least {min_size}×{min_size} pixels, got {tuple(x.shape)}"
        )
    if not (isinstance(data_range, int | float) and math.isfinite(data_range) and data_range > 0):
        raise ValueError(
            f"data_range={data_range!r} must be a positive finite number (2.0 for [-1, 1] images)"
        )


def _float(t: torch.Tensor) -> torch.Tensor:
    # float64 stays float64; everything else (half, bfloat16, integers) is computed in float32
    return t.to(torch.promote_types(t.dtype, torch.float32))


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, 10·log10(data_range² / MSE), in dB: [B, C, H, W] ×2 -> [B].

    data_range is max − min of the pixel scale (2.0 for [−1, 1]). Identical images give +inf.
    """
    _check_images(x, y, data_range, "psnr")
    mse = (_float(x) - _float(y)).square().mean(dim=(1, 2, 3))  # [B]
    return 10.0 * torch.log10(data_range**2 / mse)


SSIM_WINDOW = 11  # Wang et al. 2004, §III-C: an 11×11 circular-symmetric Gaussian window ...
SSIM_SIGMA = 1.5  # ... with standard deviation 1.5 pixels, normalised to unit sum
SSIM_K1, SSIM_K2 = 0.01, 0.03  # Eq. 7 and Eq. 9: C1 = (K1·L)², C2 = (K2·L)²


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device) -> torch.Tensor:
    # [size], unit sum; the 2-D window is its outer product with itself (also unit sum)
    r = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Mean structural similarity per image (Wang et al. 2004, IEEE TIP, Eq. 13 and §III-C): [B, C, H, W] ×2
    -> [B]. At every pixel, with Gaussian-weighted local statistics (11×11 window, σ = 1.5) of each channel:

        SSIM = (2·μx·μy + C1)(2·σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2)),  C1 = (K1·L)², C2 = (K2·L)²

    with K1 = 0.01, K2 = 0.03, L = data_range, σx² = E_w[x²] − μx² and σxy = E_w[xy] − μx·μy (population,
    not sample, moments). The map covers only the positions where the window fits inside the image ('valid'
    filtering, no padding: (H − 10) × (W − 10)); it is averaged over those positions and over the channels.
    This equals scikit-image's `structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False)`, whose reflect-padded map it crops by 5 pixels on every side.
    Computed in float32 (float64 for float64 input).
    """
    _check_images(x, y, data_range, "ssim", min_size=SSIM_WINDOW)
    x, y = _float(x), _float(y)
    C = x.shape[1]
    g = _gaussian_window(SSIM_WINDOW, SSIM_SIGMA, x.dtype, x.device)  # [11]
    k_h = g.view(1, 1, -1, 1).expand(5 * C, 1, -1, 1)  # depthwise column filter
    k_w = g.view(1, 1, 1, -1).expand(5 * C, 1, 1, -1)  # depthwise row filter
    # The five local moments of every channel in one separable depthwise filtering:
    stats = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # [B, 5C, H, W]
    stats = F.conv2d(F.conv2d(stats, k_h, groups=5 * C), k_w, groups=5 * C)  # [B, 5C, H-10, W-10]
    mu_x, mu_y, e_xx, e_yy, e_xy = stats.chunk(5, dim=1)  # [B, C, H-10, W-10] each
    var_x = e_xx - mu_x.square()
    var_y = e_yy - mu_y.square()
    cov = e_xy - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2)
    return (num / den).mean(dim=(1, 2, 3))  # every channel has the same number of positions


# ---------------------------------------------------------------------------------------------------------
# Discriminator


class NLayerDiscriminator(nn.Module):
    """The PatchGAN of pix2pix (Isola et al. 2017, §3.2.2 and App. 6.1.2): a map of real/fake logits.

    With n_layers = 3 this is the 70×70 discriminator C64-C128-C256-C512: 4×4 convs, stride 2 for the
    first n_layers and 1 for the last two (the C512 and the 1-channel output conv), LeakyReLU(0.2), BatchNorm
    on every block but the first (those convs have no bias, BatchNorm supplies it); channels double per block
    and stop at 8·ndf. Each output logit sees a 70×70 input patch; a 256×256 image gives a 30×30 map.

    `main` is one nn.Sequential, so the state dict has the keys of the taming-transformers / LDM
    discriminator (`main.0.weight` ... `main.11.bias`).
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("ndf", ndf), ("n_layers", n_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.n_layers = n_layers
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c_in = ndf
        for i in range(1, n_layers + 1):
            c_out = ndf * min(2**i, 8)
            stride = 2 if i < n_layers else 1  # the last of these blocks is the first stride-1 conv
            layers += [
                nn.Conv2d(c_in, c_out, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.LeakyReLU(0.2),
            ]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, 1, 4, stride=1, padding=1))  # one logit per patch
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        # The initialisation of taming-transformers' discriminator (itself from DCGAN, Radford et al. 2016,
        # §4): every conv weight is drawn from a normal with mean 0 and standard deviation 0.02 (conv biases
        # keep PyTorch's default); every BatchNorm scale from a normal with mean 1 and standard deviation
        # 0.02, and its shift set to 0.
        # With `generator` every value is drawn from it (the conv biases from PyTorch's default U(±1/√fan_in)
        # too), so a run's initial discriminator does not depend on the global RNG.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02, generator=generator)
                if m.bias is not None and generator is not None:
                    fan_in = m.weight[0].numel()
                    bound = 1 / math.sqrt(fan_in)
                    nn.init.uniform_(m.bias, -bound, bound, generator=generator)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02, generator=generator)
                nn.init.zeros_(m.bias)

    def output_size(self, size: int) -> int:
        # k=4, p=1: a stride-2 conv maps s -> ⌊s/2⌋, a stride-1 conv maps s -> s − 1
        return size // 2**self.n_layers - 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, 1, H/2^n − 2, W/2^n − 2]
        if x.ndim != 4 or min(self.output_size(x.shape[-2]), self.output_size(x.shape[-1])) < 1:
            raise ValueError(
                f"the {self.n_layers}-layer PatchGAN needs images [B, C, H, W] with H, W >= "
                f"{3 * 2**self.n_layers}, got {tuple(x.shape)}"
            )
        return self.main(x)


# ---------------------------------------------------------------------------------------------------------
# GAN losses (taming-transformers `vqperceptual.py`, used unchanged by LDM)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss (Lim & Ye 2017; Miyato et al. 2018, Eq. 16), halved as in taming:
    ½·(mean relu(1 − D(x)) + mean relu(1 + D(x̂)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The original GAN discriminator loss on logits (Goodfellow et al. 2014, Eq. 1), halved as in taming:
    ½·(mean −log σ(D(x)) + mean −log(1 − σ(D(x̂)))) = ½·(mean softplus(−D(x)) + mean softplus(D(x̂)))."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's adversarial loss −mean D(x̂) (taming/LDM use it with both discriminator losses)."""
    return -logits_fake.mean()


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def adaptive_gan_weight(
    nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer_weight: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """VQGAN's adaptive weight (Esser et al. 2021, Eq. 7): λ = ‖∇_{G_L} L_rec‖ / (‖∇_{G_L} L_GAN‖ + 1e-4).

    G_L is the decoder's last layer (`decoder.conv_out.weight`), ‖·‖ the Frobenius norm. λ is clamped to
    [0, max_weight] and detached: it scales the GAN term so that its gradient at G_L is as large as the
    reconstruction's, and is not itself trained. Both losses must still have their graphs (retained here).
    Returns a 0-dim tensor.
    """
    (rec_grad,) = torch.autograd.grad(nll_loss, last_layer_weight, retain_graph=True)
    (gan_grad,) = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True)
    weight = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


# ---------------------------------------------------------------------------------------------------------
# The two losses of a VAE training step


@dataclass
class VAELossConfig:
    """Weights of the autoencoder objective. Defaults: LDM's kl-f8 autoencoder (`autoencoder_kl_32x32x4.yaml`:
    kl_weight 1e-6, disc_weight 0.5, disc_start 50001, hinge loss, 3 discriminator layers)."""

    recon: str = "l1"  # "l1" | "l2": per-pixel |x − x̂| or (x − x̂)²
    detail_weight: float = 0.0  # each pixel's error times 1 + detail_weight·detail_map(x) (0: off, LDM's)
    gdl_weight: float = 0.0  # the gradient difference loss's weight (0: off, LDM's objective)
    kl_weight: float = 1e-6  # relative to the per-image *sum* of the reconstruction error, as in LDM
    disc_weight: float = 0.5  # multiplies the adaptive weight λ
    disc_start: int = 50001  # first step at which the GAN terms are on (after a reconstruction-only warm-up)
    disc_loss: str = "hinge"  # "hinge" | "vanilla"
    disc_layers: int = 3  # PatchGAN depth (3: 70×70 patches)
    disc_channels: int = 64  # PatchGAN base width (ndf)

    def __post_init__(self):
        if self.recon not in RECONS:
            raise ValueError(f"recon={self.recon!r} is not supported; expected one of {RECONS}")
        if self.disc_loss not in DISC_LOSSES:
            raise ValueError(f"disc_loss={self.disc_loss!r} is not supported; expected one of {DISC_LOSSES}")
        for name in ("kl_weight", "disc_weight", "gdl_weight", "detail_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name, lo in (("disc_start", 0), ("disc_layers", 1), ("disc_channels", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")


def build_discriminator(
    cfg: VAELossConfig, in_channels: int = 3, generator: torch.Generator | None = None
) -> NLayerDiscriminator:
    """The patch-GAN of `cfg`; with `generator` its initial weights are drawn from that alone."""
    disc = NLayerDiscriminator(in_channels=in_channels, ndf=cfg.disc_channels, n_layers=cfg.disc_layers)
    if generator is not None:
        with torch.no_grad():
            disc.reset_parameters(generator)
    return disc


def gan_active(cfg: VAELossConfig, step: int, disc: nn.Module | None = None) -> bool:
    """Whether the GAN terms are on at `step` (LDM's `adopt_weight`: off while step < disc_start).
    The trainer steps the discriminator's optimizer only when this is true."""
    return disc is not None and cfg.disc_weight > 0 and step >= cfg.disc_start


def detail_map(x: torch.Tensor) -> torch.Tensor:
    """Local detail of images x [B, C, H, W]: D = Σ_c |x − box₃(x)|, [B, 1, H, W] in float32 at least, box₃
    the 3×3 mean with edges replicated. 0 on flat colour; at a sharp step of height h it is h/3 on both
    sides; on a one-pixel feature 8h/9, so it marks exactly what a blurring decoder loses."""
    if x.ndim != 4 or min(x.shape[-2:]) < 1:
        raise ValueError(f"detail_map takes [B, C, H, W] images; got {tuple(x.shape)}")
    x = _float(x)
    smooth = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return (x - smooth).abs().sum(1, keepdim=True)


def reconstruction_loss(cfg: VAELossConfig, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Per-pixel mean of |x − x̂| (l1) or (x − x̂)² (l2) over [B, C, H, W], in float32 at least; 0-dim. With
    cfg.detail_weight = w > 0 each pixel's error is multiplied by 1 + w·`detail_map`(x) before the mean."""
    err = _float(recon) - _float(x)
    err = err.abs() if cfg.recon == "l1" else err.square()
    if cfg.detail_weight > 0:
        return (err * (1 + cfg.detail_weight * detail_map(x))).mean()
    return err.mean()


def gradient_difference(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """The gradient difference loss with α = 1 (Mathieu et al. 2016, Eq. 5) as a per-pixel mean, 0-dim:

        GDL = mean_{B,C,H,W−1} | |x[..., j+1] − x[..., j]| − |x̂[..., j+1] − x̂[..., j]| |
            + mean_{B,C,H−1,W} | |x[..., i+1, :] − x[..., i, :]| − |x̂[..., i+1, :] − x̂[..., i, :]| |

    on [B, C, H, W] images (H, W ≥ 2), in float32 at least. It is 0 for x̂ = x + c (a constant offset keeps
    every edge), and a blurred edge pays for the height it lost at every pixel it spreads over."""
    if x.ndim != 4 or x.shape != recon.shape or min(x.shape[-2:]) < 2:
        raise ValueError(
            f"gradient_difference takes two [B, C, H, W] images of one shape with H, W >= 2; "
            f"got {tuple(x.shape)} and {tuple(recon.shape)}"
        )
    x, recon = _float(x), _float(recon)
    across = (x.diff(dim=-1).abs() - recon.diff(dim=-1).abs()).abs().mean()
    down = (x.diff(dim=-2).abs() - recon.diff(dim=-2).abs()).abs().mean()
    return across + down


def _unwrap(module: nn.Module) -> nn.Module:
    # DistributedDataParallel keeps the network in `.module`, torch.compile in `._orig_mod`
    while isinstance(getattr(module, "module", None), nn.Module) or hasattr(module, "_orig_mod"):
        module = module.module if isinstance(getattr(module, "module", None), nn.Module) else module._orig_mod
    return module


def _logs(**values: torch.Tensor) -> dict[str, float]:
    # 0-dim tensors on one device -> floats, in a single device-to-host transfer
    floats = torch.stack([v.detach().float() for v in values.values()]).tolist()
    return dict(zip(values, floats, strict=True))


def autoencoder_loss(
    cfg: VAELossConfig,
    vae: nn.Module,
    x: torch.Tensor,
    step: int,
    disc: nn.Module | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
    """The autoencoder's loss on images x [B, C, H, W] in [−1, 1] (see the module docstring for the formula).

    `vae` is an AutoencoderKL (or a DDP / torch.compile wrapper of one): it is called as
    `vae(x, sample_posterior=True, generator=generator)`, so z is a reparameterised sample of q(z|x) and
    gradients reach encoder and decoder. LPIPS is omitted (its weights cannot be downloaded here).

    From `step >= cfg.disc_start` on, and only when `disc` is given, the GAN generator term
    disc_weight·λ·(−mean disc(x̂)) is added, λ from `adaptive_gan_weight` at `decoder.conv_out.weight`
    (0 when gradients are disabled, e.g. under torch.no_grad for evaluation, as LDM does). The backward pass
    of this loss also writes gradients into the discriminator's parameters: zero them before the
    discriminator's own backward (and step only the VAE's optimizer with this loss).

    With `cfg.gdl_weight > 0` the term gdl_weight·`gradient_difference`(x, x̂) is added (λ still balances
    the GAN against rec alone, as LDM balances it against its nll).

    Returns (loss 0-dim, logs, x̂ [B, C, H, W]); x̂ goes to `discriminator_loss`. Logs: loss, rec, kl (summed
    over the latent, mean over the batch), g_loss, d_weight (disc_weight·λ), and gdl when it is on, all
    floats.
    """
    recon, posterior = vae(x, sample_posterior=True, generator=generator)
    rec = reconstruction_loss(cfg, x, recon)
    kl = _float(posterior.kl()).mean()  # [B] summed over the latent dims -> mean over the batch
    pixels = x[0].numel()  # C·H·W: turns LDM's per-image sum into a per-pixel mean (module docstring)
    loss = rec + (cfg.kl_weight / pixels) * kl
    terms = {}
    if cfg.gdl_weight > 0:
        terms["gdl"] = gdl = gradient_difference(x, recon)
        loss = loss + cfg.gdl_weight * gdl
    g_loss = d_weight = torch.zeros((), device=loss.device)
    if gan_active(cfg, step, disc):
        g_loss = generator_loss(_float(disc(recon)))
        if torch.is_grad_enabled() and rec.requires_grad and g_loss.requires_grad:
            last_layer = _unwrap(vae).decoder.conv_out.weight
            d_weight = cfg.disc_weight * adaptive_gan_weight(rec, g_loss, last_layer)
        loss = loss + d_weight * g_loss
    return loss, _logs(loss=loss, rec=rec, kl=kl, g_loss=g_loss, d_weight=d_weight, **terms), recon


def discriminator_loss(
    cfg: VAELossConfig, disc: nn.Module, x: torch.Tensor, recon: torch.Tensor, step: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """The discriminator's loss: cfg.disc_loss on disc(x) (real) and disc(x̂) (fake), both detached so only
    the discriminator learns from it, in two calls (real and fake batches get their own BatchNorm statistics,
    as in taming/LDM).

    Before cfg.disc_start (see `gan_active`) the discriminator is not run and the loss is a constant 0 that
    does not require gradients: skip its backward and optimizer step. Logs: d_loss, logits_real, logits_fake
    (mean logits).
    """
    if not gan_active(cfg, step, disc):
        zero = torch.zeros((), device=x.device)
        return zero, _logs(d_loss=zero, logits_real=zero, logits_fake=zero)
    logits_real = _float(disc(x.detach()))  # [B, 1, h, w]
    logits_fake = _float(disc(recon.detach()))
    loss = D_LOSSES[cfg.disc_loss](logits_real, logits_fake)
    return loss, _logs(d_loss=loss, logits_real=logits_real.mean(), logits_fake=logits_fake.mean())


# ---------------------------------------------------------------------------------------------------------
# Latent scale


def latent_scale_factor(latents: torch.Tensor | Iterable[torch.Tensor]) -> float:
    """1 / std of all latent values: the scale that gives the denoiser unit-variance latents.

    LDM's `scale_by_std` (Rombach et al. 2022, §4.3.2 and App. G; `ddpm.py` `on_train_batch_start`): the
    std of every value of the (unscaled) latents of the data, with Bessel's correction as `torch.std`.
    Which latents — posterior samples (LDM: one batch of samples) or means — is the caller's choice.
    Accepts one tensor or an iterable of batches (any shapes); sums run in float64.
    """
    batches = [latents] if isinstance(latents, torch.Tensor) else latents
    n, total, total_sq = 0, 0.0, 0.0
    shift = None  # subtract the first value so the sums do not cancel when the mean is large
    for z in batches:
        z = z.detach().to(torch.float64).flatten()
        if z.numel() == 0:
            continue
        if not torch.isfinite(z).all():
            raise ValueError("latent_scale_factor got non-finite latents (NaN or inf)")
        if shift is None:
            shift = z[0].item()
        z = z - shift
        n += z.numel()
        total += z.sum().item()
        total_sq += z.square().sum().item()
    if n < 2:
        raise ValueError(f"latent_scale_factor needs at least 2 latent values, got {n}")
    var = (total_sq - total * total / n) / (n - 1)
    if not var > 0:
        raise ValueError("latent_scale_factor got latents with zero spread (all values equal)")
    return 1.0 / math.sqrt(var)
