"""models/upsample.py: conv(nearest ×2 of x) computed on x itself, against the two-step form it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from latentforge.models.unet import Upsample as UNetUpsample
from latentforge.models.upsample import upsample_conv, use_phases
from latentforge.models.vae import Upsample as VAEUpsample


def two_step(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# float64: the two forms differ only by the rounding of the summed kernel taps (≤ 3 terms) and the
# summation order: measured ~1e-15 on outputs of magnitude ~2; 1e-12 is far below any indexing error (a
# wrong phase or window gives differences of order 1).
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(2, 8, 5, 7), (1, 3, 1, 1), (1, 4, 2, 9)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_matches_nearest_upsample_then_conv(bias, shape, memory_format):
    torch.manual_seed(0)
    conv = nn.Conv2d(shape[1], 6, 3, padding=1, bias=bias).double()
    x = torch.randn(*shape, dtype=torch.float64).contiguous(memory_format=memory_format)
    got, ref = upsample_conv(conv, x), two_step(conv, x)
    assert got.shape == ref.shape == (shape[0], 6, 2 * shape[2], 2 * shape[3])
    assert (got - ref).abs().max() <= 1e-12
    if memory_format == torch.channels_last and shape[1] > 1 and shape[2] * shape[3] > 1:
        assert got.is_contiguous(memory_format=torch.channels_last)


def test_gradients_match():
    # training goes through it too: d/dx and d/dW equal the two-step form's (float64, same bound)
    torch.manual_seed(1)
    conv = nn.Conv2d(5, 4, 3, padding=1).double()
    x = torch.randn(2, 5, 6, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 4, 12, 8, dtype=torch.float64)
    grads = []
    for fn in (upsample_conv, two_step):
        conv.zero_grad()
        x.grad = None
        (fn(conv, x) * g).sum().backward()
        grads.append((x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone()))
    for a, b in zip(*grads, strict=True):
        assert (a - b).abs().max() <= 1e-12


def test_float32_within_rounding():
    # float32: a few ulps of the output range (measured 5e-7 relative at 512 channels)
    torch.manual_seed(2)
    conv = nn.Conv2d(64, 64, 3, padding=1)
    x = torch.randn(1, 64, 16, 16)
    got, ref = upsample_conv(conv, x), two_step(conv, x)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_unet_and_vae_upsample_modules():
    torch.manual_seed(3)
    for up in (UNetUpsample(8), VAEUpsample(8)):
        up = up.double()
        x = torch.randn(2, 8, 23, 23, dtype=torch.float64)  # 1058 input pixels: the phase path
        assert use_phases(up.conv, x) and (up(x) - two_step(up.conv, x)).abs().max() <= 1e-12
        small = torch.randn(1, 8, 9, 9, dtype=torch.float64)  # below PHASE_MIN_PIXELS: the two-step form
        assert not use_phases(up.conv, small)
        assert torch.equal(up(small), up.conv(F.interpolate(small, scale_factor=2.0, mode="nearest")))
    # the UNet's `size` that is not 2× (latents not divisible by 2^levels) keeps the two-step form
    up = UNetUpsample(8).double()
    x = torch.randn(1, 8, 9, 9, dtype=torch.float64)
    ref = up.conv(F.interpolate(x, size=(17, 19), mode="nearest"))
    assert torch.equal(up(x, size=(17, 19)), ref)


def test_wide_maps_take_the_two_step_form_where_its_convolution_is_winograd():
    # From PHASE_MAX_WINOGRAD_CHANNELS channels the two-step form with a Winograd F(4,3) convolution does
    # fewer multiply-adds than the phase kernels (models/upsample.py), so inside a workspace (where conv3x3
    # takes that path) the modules take it; outside one, or with fewer channels, the phases stay.
    from latentforge.models.upsample import PHASE_MAX_WINOGRAD_CHANNELS
    from latentforge.models.winograd import workspace

    wide = nn.Conv2d(PHASE_MAX_WINOGRAD_CHANNELS, PHASE_MAX_WINOGRAD_CHANNELS, 3, padding=1)
    narrow = nn.Conv2d(256, 256, 3, padding=1)
    x_wide, x_narrow = torch.randn(1, wide.in_channels, 32, 32), torch.randn(1, 256, 32, 32)
    assert use_phases(wide, x_wide) and use_phases(narrow, x_narrow)
    with torch.no_grad(), workspace():
        assert not use_phases(wide, x_wide) and use_phases(narrow, x_narrow)
        assert use_phases(wide.double(), x_wide.double())  # float64 never takes the Winograd path
        up = UNetUpsample(wide.in_channels).float()
        got = up(x_wide)
    ref = two_step(up.conv.double(), x_wide.double())
    # F(4,3) in float32: ~5e-6 of the range (tests/test_winograd.py)
    assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
