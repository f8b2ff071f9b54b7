"""The pieces of the default model's VAE recipe (MODEL_CARD.md): random crops of the shapes scenes, a
narrow posterior at the start of a run, GroupNorm groups in the config."""

from __future__ import annotations

import pytest
import torch

from latentforge.models.vae import AutoencoderKL, AutoencoderKLConfig
from latentforge.shapes.data import sample, to_tensor
from latentforge.training.config import VAETrainConfig
from latentforge.training.feed import ShapesTrain
from latentforge.training.vae_trainer import narrow_posterior


def test_crops_are_windows_of_the_scene_drawn_from_seed_and_index():
    whole, crops = ShapesTrain(64, 3), ShapesTrain(64, 3, crop=32)
    tops = set()
    for i in range(6):
        full, win = whole[i]["image"], crops[i]["image"]
        assert win.shape == (3, 32, 32) and crops[i]["caption"] == whole[i]["caption"]
        # the window is a sub-array of the full render: find where
        hits = [
            (t, l) for t in range(33) for l in range(33) if torch.equal(full[:, t : t + 32, l : l + 32], win)
        ]
        assert hits
        tops.add(hits[0])
        assert torch.equal(win, ShapesTrain(64, 3, crop=32)[i]["image"])  # the same window every time
    assert len(tops) > 1  # positions vary with the index
    assert torch.equal(whole[0]["image"], to_tensor(sample(3, "train", 0, 64)[0]))


def test_crop_out_of_range_is_refused():
    with pytest.raises(ValueError, match="crop must be in"):
        ShapesTrain(64, 0, crop=65)


def test_narrow_posterior_sets_the_log_variance_half_of_the_moments():
    cfg = AutoencoderKLConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32, norm_groups=8)
    vae = AutoencoderKL(cfg)
    with torch.no_grad():
        vae.quant_conv.weight.zero_()  # the moments are then the bias alone
    narrow_posterior(vae, -6.0)
    with torch.no_grad():
        post = vae.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert torch.allclose(post.logvar, torch.full_like(post.logvar, -6.0))
    assert torch.allclose(post.std, torch.full_like(post.std, float(torch.exp(torch.tensor(-3.0)))))
    assert VAETrainConfig().logvar_init is None and VAETrainConfig().crop == 0
