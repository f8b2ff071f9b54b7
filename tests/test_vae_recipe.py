"""The pieces of the default model's VAE recipe (MODEL_CARD.md): random crops of the shapes scenes, a
narrow posterior at the start of a run, GroupNorm groups in the config."""

from __future__ import annotations

import numpy as np
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


def _whole_objects(scene, top: int, left: int, crop: int) -> int:
    """How many of the scene's objects have their whole box (the renderer's own) inside the window."""
    from latentforge.shapes.render import coverage

    boxes = [coverage(o.shape, o.size, o.position, 64)[:4] for o in scene.objects]
    return sum(
        top <= r0 and r1 <= top + crop and left <= c0 and c1 <= left + crop for r0, r1, c0, c1 in boxes
    )


def _where(full: torch.Tensor, win: torch.Tensor) -> list[tuple[int, int]]:
    """Every (top, left) where `win` is a window of `full` (more than one where the scene repeats itself)."""
    c = win.shape[-1]
    n = full.shape[-1] - c + 1
    return [(t, l) for t in range(n) for l in range(n) if torch.equal(full[:, t : t + c, l : l + c], win)]


def test_focused_crops_hold_an_object_whole_and_focus_0_is_todays_windows():
    """--crop_focus 1: every window holds one of its scene's objects whole (both sizes fit a 32² window: a
    large box is 18 px); uniform windows do so far less often (a small object in a corner cell is whole in
    7 of the 33 offsets on each axis). --crop_focus 0 draws exactly today's windows."""
    today, zero, focused = (
        ShapesTrain(64, 5, crop=32),
        ShapesTrain(64, 5, 32, 0.0),
        ShapesTrain(64, 5, 32, 1.0),
    )
    n, held_uniform = 60, 0
    for i in range(n):
        full = to_tensor(sample(5, "train", i, 64)[0])
        scene = sample(5, "train", i, 64)[2]
        assert torch.equal(today[i]["image"], zero[i]["image"])
        win = focused[i]["image"]
        assert win.shape == (3, 32, 32) and torch.equal(win, ShapesTrain(64, 5, 32, 1.0)[i]["image"])
        assert any(_whole_objects(scene, t, l, 32) >= 1 for t, l in _where(full, win))
        held_uniform += all(_whole_objects(scene, t, l, 32) >= 1 for t, l in _where(full, today[i]["image"]))
    assert held_uniform < n / 2  # measured 0.15 whole objects a uniform window on 400 scenes


def test_focused_crops_larger_objects_than_the_window_are_cut_inside_their_box():
    """A window smaller than a large object's box lies inside the box (so it holds the object's edge or
    body, never only background beside it)."""
    from latentforge.shapes.render import Obj, Scene, coverage
    from latentforge.training.feed import object_window

    scene = Scene((Obj("square", "red", "large", "top_left"),), "black")
    r0, r1, c0, c1, _ = coverage("square", "large", "top_left", 64)
    rng = np.random.default_rng(0)
    for _ in range(50):
        top, left = object_window(scene, 64, 8, rng)
        assert r0 <= top and top + 8 <= r1 and c0 <= left and left + 8 <= c1


def test_the_config_field_reaches_the_stream():
    """`train vae --crop 32 --crop_focus 0.75` (the flag is the config field) feeds focused windows."""
    from latentforge.training.dist import World
    from latentforge.training.feed import dataset_for

    ds = dataset_for(VAETrainConfig(crop=32, crop_focus=0.75, seed=4), World())
    assert (ds.crop, ds.focus, ds.seed) == (32, 0.75, 4)
    assert VAETrainConfig().crop_focus == 0.0


@pytest.mark.parametrize(
    ("crop", "focus", "match"), [(32, 1.5, "crop_focus must be in"), (0, 0.5, "needs a crop below")]
)
def test_crop_focus_out_of_range_is_refused(crop, focus, match):
    with pytest.raises(ValueError, match=match):
        ShapesTrain(64, 0, crop, focus)


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


def test_decoder_only_training_keeps_the_encoder_and_the_latent_scale(tmp_path):
    """--train_part decoder (the decoder-only fine-tune of SD's ft-EMA / ft-MSE VAEs): after a run from a
    VAE file the encoder, quant_conv and the measured latent scale are bit-identical to the start, and the
    decoder has moved, so latents of a denoiser trained on the first VAE still mean the same thing."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from latentforge.training.config import resolve
    from latentforge.training.vae_trainer import train_vae

    over = {"max_steps": "3", "batch_size": "2", "resolution": "32", "eval_n": "4", "num_workers": "0",
            "vae.ch_mult": "[1, 2]", "lr": "1e-3"}  # fmt: skip
    first = str(tmp_path / "first")
    train_vae(resolve("vae", "shapes-vae", overrides=over), first, progress=False)
    start = f"{first}/checkpoints/last.safetensors"
    over = {**over, "init_from": start, "train_part": "decoder", "seed": "1"}
    second = str(tmp_path / "second")
    train_vae(resolve("vae", "shapes-vae", overrides=over), second, progress=False)
    end = f"{second}/checkpoints/last.safetensors"
    a, b = load_file(start), load_file(end)
    assert a.keys() == b.keys()
    frozen = [k for k in a if k.startswith(("encoder.", "quant_conv."))]
    moved = [k for k in a if k.startswith("decoder.") and not torch.equal(a[k], b[k])]
    assert frozen and all(torch.equal(a[k], b[k]) for k in frozen)
    assert len(moved) > len([k for k in a if k.startswith("decoder.")]) // 2
    with safe_open(start, "pt") as f, safe_open(end, "pt") as g:
        assert f.metadata()["latentforge.latent_format"] == g.metadata()["latentforge.latent_format"]


def test_gdl_weight_reaches_the_trainers_loss_and_its_log(tmp_path):
    """--gdl_weight (the gradient difference loss, vae_losses.gradient_difference) is trained with and logged
    at every step; 0, the default, leaves it out of the loss and the log."""
    import json

    from latentforge.training.config import resolve
    from latentforge.training.vae_trainer import train_vae

    over = {"max_steps": "2", "batch_size": "2", "resolution": "32", "eval_n": "4", "num_workers": "0",
            "vae.ch_mult": "[1, 2]", "log_every": "1", "gdl_weight": "0.5"}  # fmt: skip
    out = tmp_path / "gdl"
    train_vae(resolve("vae", "shapes-vae", overrides=over), str(out), progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    gdl = [r["gdl"] for r in rows if "gdl" in r]
    assert len(gdl) == 2 and all(0 < g < 10 for g in gdl), rows
    assert json.loads((out / "config.json").read_text())["gdl_weight"] == 0.5


def test_detail_weight_reaches_the_loss_config_from_the_command_line():
    """--detail_weight (vae_losses.detail_map) goes from the trainer's flags into the loss it trains with;
    0, the default, is LDM's plain per-pixel mean."""
    from latentforge.training.config import resolve
    from latentforge.training.vae_trainer import loss_config

    assert loss_config(resolve("vae", "shapes-vae", overrides={})).detail_weight == 0.0
    cfg = resolve("vae", "shapes-vae", overrides={"detail_weight": "5"})
    assert cfg.detail_weight == 5.0 and loss_config(cfg).detail_weight == 5.0
    with pytest.raises(ValueError, match="detail_weight"):
        resolve("vae", "shapes-vae", overrides={"detail_weight": "-1"})


def test_unknown_train_part_is_refused():
    with pytest.raises(ValueError, match="train_part"):
        VAETrainConfig(train_part="encoder")


def test_ship_script_swaps_in_a_vae_with_the_same_latents_only(tmp_path):
    """scripts/ship_default_model.py --vae: the shipped file's VAE exported and swapped back is the same
    state dict; a VAE whose latent format differs is refused (the denoiser's latents would mean another
    thing)."""
    import importlib.util
    import os

    from latentforge.checkpoint_io import read_metadata, read_state_dict
    from latentforge.checkpoints import load_vae_file
    from latentforge.models.vae import LatentFormat
    from latentforge.pipeline import DEFAULT_MODEL
    from latentforge.training.vae_trainer import export_vae

    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "ship_default_model.py")
    spec = importlib.util.spec_from_file_location("ship_default_model", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sd, meta = read_state_dict(DEFAULT_MODEL), dict(read_metadata(DEFAULT_MODEL))
    vae, fmt = load_vae_file(DEFAULT_MODEL)
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.5)
    same, other = str(tmp_path / "same.safetensors"), str(tmp_path / "other.safetensors")
    export_vae(same, vae, fmt)
    export_vae(other, vae, LatentFormat(fmt.scale_factor * 2))
    swapped = dict(sd)
    mod.swap_vae(swapped, meta, same, torch.float16)
    key = "first_stage_model.decoder.conv_out.bias"
    changed = [k for k in sd if not torch.equal(sd[k], swapped[k])]
    assert changed == [key] and swapped[key].dtype == torch.float16
    torch.testing.assert_close(swapped[key].float(), sd[key].float() + 0.5, atol=1e-3, rtol=0)
    with pytest.raises(SystemExit, match="latent format"):
        mod.swap_vae(dict(sd), meta, other, torch.float16)


def test_ship_script_averages_the_denoiser_and_text_tower_only(tmp_path):
    """scripts/ship_default_model.py --average (a uniform soup): the denoiser and text tower tensors become
    the float32 mean of the two files', the VAE stays the checkpoint's; other keys or shapes are refused."""
    import importlib.util
    import os

    from latentforge.checkpoint_io import read_state_dict, save_state_dict
    from latentforge.pipeline import DEFAULT_MODEL

    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "ship_default_model.py")
    spec = importlib.util.spec_from_file_location("ship_default_model", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sd = read_state_dict(DEFAULT_MODEL)
    g = torch.Generator().manual_seed(0)
    other = {
        k: v + torch.randn(v.shape, generator=g).to(v.dtype) if v.is_floating_point() else v
        for k, v in sd.items()
    }
    path = str(tmp_path / "other.safetensors")
    save_state_dict(other, path)
    mine = dict(sd)
    n = mod.average_with(mine, [path])
    soup = [
        k
        for k in sd
        if k.startswith(("model.diffusion_model.", "cond_stage_model.")) and sd[k].is_floating_point()
    ]
    assert n == len(soup) > 100
    for k in sd:
        want = (sd[k].float() + other[k].float()) / 2 if k in soup else sd[k]
        assert torch.equal(mine[k], want), k
    assert all(torch.equal(mine[k], sd[k]) for k in sd if k.startswith("first_stage_model."))
    del other[soup[0]]
    save_state_dict(other, path)
    with pytest.raises(SystemExit, match="keys or shapes"):
        mod.average_with(dict(sd), [path])
