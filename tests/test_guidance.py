"""Classifier-free guidance: one batched call, the CFG formula, rescale, interval, per-image scales, CFG++."""

import pytest
import torch

from latentforge.guidance import CFGDenoiser
from latentforge.samplers import SAMPLERS


class Recorder:
    """A conditional 'denoiser': D = x·a(c) + b(c) with c a per-row label; records its calls."""

    model_sampling = None

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, label):
        self.calls.append((x.shape[0], sigma.clone(), label.clone()))
        a = 0.5 + 0.1 * label.to(x.dtype)
        return x * a[:, None] + label.to(x.dtype)[:, None] * 0.3


def test_one_batched_call_and_formula():
    m = Recorder()
    cfg = CFGDenoiser(m, scale=7.0)
    x = torch.randn(3, 2, dtype=torch.float64)
    sigma = torch.full((3,), 2.0, dtype=torch.float64)
    c, u = torch.tensor([1, 2, 3]), torch.zeros(3, dtype=torch.long)
    out = cfg(x, sigma, cond={"label": c}, uncond={"label": u})
    assert len(m.calls) == 1 and m.calls[0][0] == 6  # cond and uncond in one batch
    d_c, d_u = Recorder()(x, sigma, c), Recorder()(x, sigma, u)
    assert torch.allclose(out, d_u + 7.0 * (d_c - d_u))  # Ho & Salimans 2022, Eq. 6


def test_scale_one_skips_uncond():
    m = Recorder()
    x = torch.randn(2, 2)
    out = CFGDenoiser(m, scale=1.0)(
        x, torch.ones(2), cond={"label": torch.tensor([1, 1])}, uncond={"label": torch.tensor([0, 0])}
    )
    assert len(m.calls) == 1 and m.calls[0][0] == 2
    assert torch.allclose(out, Recorder()(x, torch.ones(2), torch.tensor([1, 1])))


def test_interval_guides_only_inside():
    m = Recorder()
    cfg = CFGDenoiser(m, scale=5.0, interval=(0.5, 3.0))
    x = torch.randn(2, 2)
    kw = dict(cond={"label": torch.tensor([1, 2])}, uncond={"label": torch.tensor([0, 0])})
    cfg(x, torch.full((2,), 10.0), **kw)
    cfg(x, torch.full((2,), 1.0), **kw)
    cfg(x, torch.full((2,), 0.1), **kw)
    assert [c[0] for c in m.calls] == [2, 4, 2]


def test_per_image_scales_equal_separate_runs():
    x = torch.randn(2, 3, dtype=torch.float64)
    sigma = torch.full((2,), 1.5, dtype=torch.float64)
    c, u = torch.tensor([1, 2]), torch.tensor([0, 0])
    both = CFGDenoiser(Recorder(), scale=[2.0, 9.0])(x, sigma, cond={"label": c}, uncond={"label": u})
    for k, w in enumerate((2.0, 9.0)):
        one = CFGDenoiser(Recorder(), scale=w)(
            x[k : k + 1], sigma[:1], cond={"label": c[k : k + 1]}, uncond={"label": u[:1]}
        )
        assert torch.allclose(both[k : k + 1], one)


def test_rescale():
    # Lin et al. 2024, Eq. 15-16 in ε form: φ = 1 gives a guided ε with the conditional ε's std.
    m = Recorder()
    x = torch.randn(4, 64, dtype=torch.float64)
    sigma = torch.full((4,), 3.0, dtype=torch.float64)
    kw = dict(cond={"label": torch.tensor([1, 2, 3, 4])}, uncond={"label": torch.zeros(4, dtype=torch.long)})
    out = CFGDenoiser(m, scale=7.0, rescale=1.0)(x, sigma, **kw)
    d_c = Recorder()(x, sigma, kw["cond"]["label"])
    eps_out, eps_c = (x - out) / 3.0, (x - d_c) / 3.0
    assert torch.allclose(eps_out.std(dim=1), eps_c.std(dim=1))
    plain = CFGDenoiser(Recorder(), scale=7.0)(x, sigma, **kw)
    half = CFGDenoiser(Recorder(), scale=7.0, rescale=0.5)(x, sigma, **kw)
    assert torch.allclose(half, 0.5 * (out + plain))
    with pytest.raises(ValueError, match=r"rescale must be in \[0, 1\]"):
        CFGDenoiser(m, rescale=1.5)


def test_mismatched_cond_shapes():
    with pytest.raises(ValueError, match="same shape"):
        CFGDenoiser(Recorder(), scale=3.0)(
            torch.zeros(2, 2),
            torch.ones(2),
            cond={"label": torch.ones(2, 3)},
            uncond={"label": torch.ones(2, 4)},
        )


def test_cfg_pp_uses_uncond_direction():
    """CFG++ (Chung et al. 2024): one Euler step gives D_cfg + σ_next·(x − D_u)/σ."""
    x = torch.randn(2, 2, dtype=torch.float64) * 10
    s = torch.tensor([10.0, 4.0, 0.0], dtype=torch.float64)
    kw = {"cond": {"label": torch.tensor([1, 2])}, "uncond": {"label": torch.tensor([0, 0])}}
    cfg = CFGDenoiser(Recorder(), scale=3.0)
    first = []
    SAMPLERS["euler_cfg_pp"](cfg, x, s[:2], extra_args=kw, callback=first.append)
    sig = torch.full((2,), 10.0, dtype=torch.float64)
    d_u = Recorder()(x, sig, kw["uncond"]["label"])
    d_cfg = cfg(x, sig, **kw)
    expect = d_cfg + 4.0 * (x - d_u) / 10.0
    got = SAMPLERS["euler_cfg_pp"](cfg, x, s[:2], extra_args=kw)
    assert torch.allclose(got, expect)
    plain = SAMPLERS["euler"](cfg, x, s[:2], extra_args=kw)
    assert not torch.allclose(got, plain)
