"""Batches, seeds and the hires fix (issue 12, "Higher resolution" and "Batches, seeds, reproducibility").

References: A1111's `create_random_tensors` semantics for variation seeds and "resize seed from" (a slerp,
Shoemake 1985, and a centred paste), its batch-count seeds (image i of the job: seed + i), and its
hires fix (upscale, then img2img at the target size)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from latentforge import hires, img2img
from latentforge.noise import randn_seeded, slerp, variation_noise
from latentforge.pipeline import Pipeline
from latentforge.shapes import parse


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return Pipeline.default()


def _angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The angle between a and b along H of [B, C, H, W], per (image, channel, column)."""
    cos = (F.normalize(a.double(), dim=-2) * F.normalize(b.double(), dim=-2)).sum(-2)
    return torch.acos(cos.clamp(-1, 1))


def test_variation_noise_ends_are_the_two_seeds_and_slerp_splits_the_angle():
    shape = (2, 4, 16, 12)
    a, b = randn_seeded(shape, [5, 6]), randn_seeded(shape, [70, 71])
    assert torch.equal(variation_noise(shape, [5, 6], [70, 71], 0.0), a)  # strength 0: the seed's noise
    torch.testing.assert_close(variation_noise(shape, [5, 6], [70, 71], 1.0), b, rtol=0, atol=1e-5)
    # Shoemake's slerp of unit vectors moves along the great circle at constant speed: the result is a unit
    # vector at angle t·ω from a and (1 − t)·ω from b (here per (image, channel, column), along H)
    an, bn = F.normalize(a, dim=-2), F.normalize(b, dim=-2)
    omega = _angle(an, bn)
    for t in (0.1, 0.3, 0.75):
        v = slerp(t, an, bn)
        torch.testing.assert_close(v.norm(dim=-2), torch.ones_like(omega, dtype=v.dtype), rtol=0, atol=1e-5)
        torch.testing.assert_close(_angle(an, v), t * omega, rtol=0, atol=1e-5)
        torch.testing.assert_close(_angle(v, bn), (1 - t) * omega, rtol=0, atol=1e-5)
    # the variation noise is that slerp (on the raw draws, as A1111 applies it)
    torch.testing.assert_close(variation_noise(shape, [5, 6], [70, 71], 0.3), slerp(0.3, a, b))
    # near-parallel inputs fall back to the straight line (no division by sin ω ≈ 0)
    torch.testing.assert_close(slerp(0.5, a, a), a)


def test_resize_seed_from_pastes_the_smaller_draw_centred():
    big = variation_noise((1, 4, 12, 12), [9], resize_from=(8, 8))
    small, fresh = randn_seeded((1, 4, 8, 8), [9]), randn_seeded((1, 4, 12, 12), [9])
    assert torch.equal(big[:, :, 2:10, 2:10], small)
    outside = torch.ones(12, 12, dtype=torch.bool)
    outside[2:10, 2:10] = False
    assert torch.equal(big[..., outside], fresh[..., outside])
    # a larger draw is cropped centred; an odd excess loses one more column, as A1111's arithmetic does:
    # dx = (8 - 11) // 2 = -2, so 11 + 2·(-2) = 7 columns [2, 9) land at [0, 7) and column 7 stays fresh
    cut = variation_noise((1, 4, 8, 8), [9], resize_from=(11, 8))
    src, fresh8 = randn_seeded((1, 4, 11, 8), [9]), randn_seeded((1, 4, 8, 8), [9])
    assert torch.equal(cut[:, :, 0:7, :], src[:, :, 2:9, :])
    assert torch.equal(cut[:, :, 7, :], fresh8[:, :, 7, :])


def test_batch_count_continues_the_seeds(pipe):
    kw = {"steps": 3, "progress": False}
    job = pipe("a red circle", seed=10, batch_size=2, batch_count=2, **kw)
    assert len(job) == 4
    second = pipe("a red circle", seed=12, batch_size=2, **kw)  # batch 1 of the job: seeds 12, 13
    for got, want in zip(job[2:], second, strict=True):
        assert np.array_equal(np.asarray(got), np.asarray(want))
    assert not np.array_equal(np.asarray(job[0]), np.asarray(job[2]))


def test_variation_seed_in_the_pipeline(pipe):
    # a deterministic sampler: the variation seed sets the initial noise only, so with an ancestral sampler
    # (the default model's default) the later steps' noise still comes from the seed, as in A1111; and the
    # prompt as written (the default model's prompt completion draws from the seed, not the subseed)
    kw = {"steps": 3, "sampler": "euler", "progress": False, "complete_prompt": "none"}
    plain = pipe.sample("a red circle", seed=3, **kw)
    same = pipe.sample("a red circle", seed=3, subseed=40, subseed_strength=0.0, **kw)
    other = pipe.sample("a red circle", seed=40, **kw)
    full = pipe.sample("a red circle", seed=3, subseed=40, subseed_strength=1.0, **kw)
    assert torch.equal(plain, same)
    torch.testing.assert_close(full, other, rtol=0, atol=1e-4)  # slerp(1) = the subseed's noise to 1e-6
    with pytest.raises(ValueError, match="subseed_strength 0.5 needs a subseed"):
        pipe.sample("a red circle", subseed_strength=0.5, **kw)
    with pytest.raises(ValueError, match=r"subseed_strength must be a number in \[0, 1\], got 2"):
        pipe.sample("a red circle", subseed=1, subseed_strength=2, **kw)


@pytest.mark.parametrize("upscaler", ["Latent (nearest)", "Latent", "Lanczos"])
def test_hires_fix_at_denoise_zero_is_the_upscaled_first_pass(pipe, upscaler):
    kw = {"steps": 4, "seed": 2, "progress": False}
    first = pipe.sample("a blue square", **kw)  # [1, 4, 16, 16]
    got = pipe.sample("a blue square", hires_scale=1.5, hires_denoise=0.0, hires_upscaler=upscaler, **kw)
    assert got.shape == (1, 4, 24, 24)
    torch.testing.assert_close(got, hires.upscale(pipe, first, upscaler, 96, 96), rtol=0, atol=0)
    if upscaler == "Latent (nearest)":  # nearest by 1.5: latent pixel (i, j) <- (⌊i/1.5⌋, ⌊j/1.5⌋)
        idx = (torch.arange(24) / 1.5).floor().long()
        assert torch.equal(got[0], first[0][:, idx][:, :, idx])


def test_hires_fix_second_pass_is_img2img_at_the_target_size(pipe):
    calls = []
    kw = {"steps": 4, "seed": 5, "progress": False}
    images = pipe(
        "a blue square", hires_scale=2, hires_denoise=0.5, hires_steps=6, callback=calls.append, **kw
    )
    assert images[0].size == (128, 128)
    assert len(calls) == 4 + img2img.steps_kept(6, 0.5)  # the first pass, then ⌈6·0.5⌉ = 3 steps
    # the same second pass by hand: img2img from the upscaled latents, seeds' noise at the target size, and
    # both passes given the prompt the default model completed (its layout drawn from the seed)
    (prompt,) = pipe.image_prompts("a blue square", **kw)
    assert prompt.endswith("a blue square; background: " + parse(prompt).background)
    first = pipe.sample("a blue square", **kw)
    up = hires.upscale(pipe, first, "Latent", 128, 128)
    second = {"init_latent": up, "strength": 0.5, "width": 128, "height": 128}
    by_hand = pipe.sample(prompt, **(kw | second | {"steps": 6}))
    want = pipe.sample("a blue square", hires_scale=2, hires_denoise=0.5, hires_steps=6, **kw)
    assert torch.equal(by_hand, want)
    assert not torch.equal(want, up)


def test_hires_fix_errors(pipe):
    kw = {"steps": 2, "progress": False}
    with pytest.raises(ValueError, match="unknown hires upscaler 'ESRGAN_4x'; known: Latent, "):
        pipe("x", hires_scale=2, hires_upscaler="ESRGAN_4x", **kw)
    with pytest.raises(ValueError, match=r"hires_scale must be a number in \[1, 8\], got 9"):
        pipe("x", hires_scale=9, **kw)
    with pytest.raises(ValueError, match="hires_denoise need hires_scale > 1 or hires_size"):
        pipe("x", hires_denoise=0.3, **kw)
    with pytest.raises(ValueError, match="the hires fix is a text-to-image option"):
        pipe("x", init_image=torch.zeros(1, 3, 64, 64), hires_scale=2, **kw)
    with pytest.warns(UserWarning, match="the hires size 81x74 is floored to 80x72 \\(multiples of 4\\)"):
        assert pipe.sample("x", hires_size=(81, 74), **kw).shape[-2:] == (18, 20)


def test_one_progress_bar_over_the_whole_job(pipe, capsys):
    pipe("a red circle", steps=3, batch_count=2, hires_scale=1.5, hires_denoise=0.5, seed=1, progress=True)
    err = capsys.readouterr().err
    total = 2 * (3 + math.ceil(3 * 0.5))
    assert f"{total}/{total}" in err and "step/s" in err or "s/step" in err
    assert err.count("generating") >= 1 and f" 3/{3}" not in err  # no per-pass bars of the samplers
