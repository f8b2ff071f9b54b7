"""Checkpoint files: safe reading, atomic writing, stray keys, family detection from the real key lists."""

import os
import pathlib

import pytest
import torch

from latentforge.checkpoints import (
    configs_to_json,
    detect_family,
    join_components,
    read_state_dict,
    save_state_dict,
    split_components,
    strip_stray,
)

KEYS = pathlib.Path(__file__).parent / "data" / "checkpoint_keys"


def _load(name):
    out = {}
    for line in (KEYS / name).read_text().splitlines():
        key, shape = line.split("\t")
        out[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


FAMILIES = {
    "sd15": ["sd1_unet_ldm.txt", "sd_vae_ldm.txt", "sd1_clip_l_text_hf4x.txt"],
    "sd21": ["sd2_unet_ldm.txt", "sd_vae_ldm.txt", "sd2_openclip_vith_text.txt"],
    "sdxl-base": ["sdxl_base_unet_sgm.txt", "sd_vae_ldm.txt", "sdxl_openclip_bigg_text.txt"],
    "sdxl-refiner": ["sdxl_refiner_unet_sgm.txt", "sd_vae_ldm.txt"],
    "sd3-medium": ["sd3_medium_mmdit.txt"],
    "sd35-medium": ["sd3.5_medium_mmditx.txt"],
    "sd35-large": ["sd3.5_large_mmdit.txt"],
    "dit-xl-2-256": ["dit_xl2_256.txt"],
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_detect_family_from_real_key_lists(family):
    shapes = {}
    for f in FAMILIES[family]:
        shapes.update(_load(f))
    det = detect_family(shapes)
    assert det.family == family, str(det)


def test_split_and_join_roundtrip():
    shapes = {}
    for f in FAMILIES["sd15"]:
        shapes.update(_load(f))
    sd = {k: torch.zeros(1) for k in shapes}
    parts = split_components(sd, "sd15")
    assert not parts["unknown"]
    assert "time_embed.0.weight" in parts["unet"] and "encoder.conv_in.weight" in parts["vae"]
    assert "transformer.text_model.final_layer_norm.weight" in parts["clip_l"]
    assert join_components({k: v for k, v in parts.items() if k != "unknown"}, "sd15").keys() == sd.keys()


def test_strip_stray():
    sd = {"model.diffusion_model.x": 1, "model_ema.decay": 2, "model_ema.diffusion_modelinput": 3, "betas": 4,
          "alphas_cumprod": 5, "sqrt_alphas_cumprod": 6, "first_stage_model.y": 7}  # fmt: skip
    kept, dropped = strip_stray(sd)
    assert sorted(kept) == ["first_stage_model.y", "model.diffusion_model.x"] and len(dropped) == 5


def test_safetensors_roundtrip_is_atomic(tmp_path):
    path = str(tmp_path / "m.safetensors")
    sd = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    save_state_dict(sd, path, metadata={"family": "test"})
    back = read_state_dict(path)
    assert torch.equal(back["a"], sd["a"]) and torch.equal(back["b"], sd["b"])
    assert os.listdir(tmp_path) == ["m.safetensors"]  # no temporary left behind


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    import safetensors.torch

    path = str(tmp_path / "m.safetensors")
    save_state_dict({"a": torch.ones(2)}, path)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_state_dict({"a": torch.zeros(2)}, path)
    assert torch.equal(read_state_dict(path)["a"], torch.ones(2))
    assert os.listdir(tmp_path) == ["m.safetensors"]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_ckpt_only_plain_tensors(tmp_path):
    good = tmp_path / "g.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 3}, good)
    assert torch.equal(read_state_dict(str(good))["w"], torch.ones(2))
    bad = tmp_path / "b.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "x": _Evil()}, bad)
    with pytest.raises(ValueError, match="weights_only"):
        read_state_dict(str(bad))


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_state_dict(str(tmp_path / "nope.safetensors"))
    (tmp_path / "x.onnx").write_bytes(b"0")
    with pytest.raises(ValueError, match=".safetensors"):
        read_state_dict(str(tmp_path / "x.onnx"))
    with pytest.raises(ValueError, match="written as .safetensors"):
        save_state_dict({}, str(tmp_path / "y.ckpt"))


LAYOUT_LISTS = FAMILIES  # the key lists each preset's layout must contain


@pytest.mark.parametrize("preset", sorted(LAYOUT_LISTS))
def test_state_dict_layout_contains_the_real_keys(preset):
    from latentforge.checkpoints import state_dict_layout

    layout = state_dict_layout(preset)
    for f in LAYOUT_LISTS[preset]:
        ref = _load(f)
        missing = [k for k in ref if k not in layout]
        assert not missing, (f, missing[:5])
        wrong = [(k, ref[k], layout[k]) for k in ref if layout[k] != ref[k]]
        assert not wrong, (f, wrong[:5])
    # and the layout detects as itself
    assert detect_family(layout).family == preset


def test_dit_512_layout():
    from latentforge.checkpoints import state_dict_layout

    assert state_dict_layout("dit-xl-2-512")["pos_embed"] == (1, 1024, 1152)


def _tiny_sd15():
    from latentforge.checkpoints import build_component
    from latentforge.models import AutoencoderKLConfig, CLIPTextConfig, UNetConfig

    unet = UNetConfig(
        model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1,), num_heads=2,
        transformer_depth=1, context_dim=64,
    )  # fmt: skip
    vae = AutoencoderKLConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32)
    clip = CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    configs = {"unet": unet, "vae": vae, "clip_l": clip}
    torch.manual_seed(0)
    return configs, {n: build_component(n, c).eval() for n, c in configs.items()}


def test_save_and_load_roundtrip(tmp_path):
    from latentforge.checkpoints import load_checkpoint, save_checkpoint

    configs, comps = _tiny_sd15()
    path = str(tmp_path / "tiny.safetensors")
    save_checkpoint(path, "sd15", comps, configs)
    raw = read_state_dict(path)
    assert (
        "model.diffusion_model.time_embed.0.weight" in raw
        and "first_stage_model.encoder.conv_in.weight" in raw
    )
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in raw
    loaded = load_checkpoint(path)
    assert loaded.family == "sd15" and loaded.configs == configs
    for name, module in comps.items():
        a, b = module.state_dict(), loaded.components[name].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 77, 64)
    assert torch.equal(comps["unet"](x, t, ctx), loaded.components["unet"](x, t, ctx))
    half = load_checkpoint(path, dtype=torch.bfloat16)
    assert half.components["unet"].time_embed[0].weight.dtype == torch.bfloat16


def test_load_rejects_stray_and_mismatched_keys(tmp_path):
    from latentforge.checkpoints import load_checkpoint, save_checkpoint

    configs, comps = _tiny_sd15()
    path = str(tmp_path / "tiny.safetensors")
    save_checkpoint(path, "sd15", comps, configs)
    sd = read_state_dict(path)
    meta = {
        "latentforge.family": "sd15",
        "latentforge.configs": __import__("latentforge.checkpoints").checkpoints.configs_to_json(configs),
    }
    # EMA copies and schedule buffers are dropped, not fatal
    save_state_dict(
        {**sd, "model_ema.decay": torch.tensor(0.999), "alphas_cumprod": torch.ones(1000)}, path, meta
    )
    assert sorted(load_checkpoint(path).dropped) == ["alphas_cumprod", "model_ema.decay"]
    # a missing weight is an error naming the component and the key
    bad = {k: v for k, v in sd.items() if k != "model.diffusion_model.out.2.weight"}
    save_state_dict(bad, path, meta)
    with pytest.raises(ValueError, match=r"'unet' does not match.*out\.2\.weight"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="dtype must be"):
        load_checkpoint(path, dtype=torch.int8)


def test_not_a_checkpoint_and_truncated(tmp_path):
    from latentforge.checkpoints import load_checkpoint

    junk = tmp_path / "junk.safetensors"
    junk.write_text("this is a text file, not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.safetensors.*not a readable safetensors file"):
        load_checkpoint(str(junk))
    good = tmp_path / "g.safetensors"
    save_state_dict({"a": torch.randn(64, 64)}, str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"cut\.safetensors.*truncated"):
        load_checkpoint(str(cut))


def test_unknown_family_and_shape_mismatch(tmp_path):
    from latentforge.checkpoints import load_checkpoint, save_checkpoint

    odd = tmp_path / "odd.safetensors"
    save_state_dict({"encoder.weight": torch.zeros(2), "decoder.bias": torch.zeros(2)}, str(odd))
    with pytest.raises(ValueError, match=r"odd\.safetensors: cannot tell the model family.*decoder\.bias"):
        load_checkpoint(str(odd))
    configs, comps = _tiny_sd15()
    path = str(tmp_path / "tiny.safetensors")
    save_checkpoint(path, "sd15", comps, configs)
    sd = read_state_dict(path)
    sd["model.diffusion_model.out.2.weight"] = torch.zeros(4, 32, 3, 5)
    meta = {"latentforge.family": "sd15", "latentforge.configs": configs_to_json(configs)}
    save_state_dict(sd, path, meta)
    with pytest.raises(
        ValueError, match=r"tiny\.safetensors \(sd15 .*unet\.out\.2\.weight has shape \(4, 32, 3, 5\)"
    ):
        load_checkpoint(path)


def test_component_overrides_in_their_usual_namings(tmp_path):
    """A VAE file with the LDM prefix and a CLIP-L file in HF naming (`text_model.*`, as ComfyUI ships
    clip_l.safetensors) replace the checkpoint's own."""
    from latentforge.checkpoints import load_checkpoint, save_checkpoint

    configs, comps = _tiny_sd15()
    path = str(tmp_path / "tiny.safetensors")
    save_checkpoint(path, "sd15", comps, configs)
    torch.manual_seed(1)
    _, other = _tiny_sd15()
    for p in other["vae"].parameters():
        p.data.normal_()
    vae_file = str(tmp_path / "vae.safetensors")
    save_state_dict({"first_stage_model." + k: v for k, v in other["vae"].state_dict().items()}, vae_file)
    clip_file = str(tmp_path / "clip_l.safetensors")
    clip_sd = {k.removeprefix("transformer."): v + 1 for k, v in comps["clip_l"].state_dict().items()}
    save_state_dict(clip_sd, clip_file)
    loaded = load_checkpoint(path, vae=vae_file, text_encoders={"clip_l": clip_file})
    for k, v in other["vae"].state_dict().items():
        assert torch.equal(loaded.components["vae"].state_dict()[k], v)
    got = loaded.components["clip_l"].state_dict()
    assert torch.equal(
        got["transformer.text_model.final_layer_norm.weight"], clip_sd["text_model.final_layer_norm.weight"]
    )
    with pytest.raises(ValueError, match=r"sd15 has no text encoder 'clip_g'"):
        load_checkpoint(path, text_encoders={"clip_g": clip_file})


# ---------------------------------------------------------------------------------------------------------
# Converting while reading (a float16 file loaded in float32 without holding both copies)


def _mixed_state_dict():
    g = torch.Generator().manual_seed(0)
    return {
        "half": torch.randn(7, 5, generator=g).half(),
        "bf16": torch.randn(3, 4, 2, generator=g).bfloat16(),
        "f32": torch.randn(6, generator=g),
        "f64": torch.randn(2, 3, generator=g, dtype=torch.float64),
        "scalar": torch.tensor(0.25, dtype=torch.float16),
        "empty": torch.zeros(0, 3, dtype=torch.float16),
        "ids": torch.arange(9).reshape(1, 9),
        "mask": torch.tensor([True, False]),
        "model_ema.decay": torch.tensor(0.999, dtype=torch.float16),
    }


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_read_state_dict_converts_floating_tensors(tmp_path, suffix, dtype):
    sd = _mixed_state_dict()
    path = str(tmp_path / f"m{suffix}")
    if suffix == ".safetensors":
        save_state_dict(sd, path)
    else:
        torch.save({"state_dict": sd}, path)
    got = read_state_dict(path, dtype, keep_stored=lambda k: k.startswith("model_ema."))
    plain = read_state_dict(path)
    assert list(got) == list(plain) and set(got) == set(sd)  # every key, in the file's order
    for k, v in sd.items():
        if not v.is_floating_point() or k.startswith("model_ema."):
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k  # left as stored
        else:
            # the conversion is Tensor.to's: exact equality, rounding included
            assert got[k].dtype == dtype and got[k].shape == v.shape, k
            assert torch.equal(got[k], v.to(dtype)), k
    assert all(plain[k].dtype == v.dtype and torch.equal(plain[k], v) for k, v in sd.items())
    with pytest.raises(ValueError, match="floating dtype"):
        read_state_dict(path, torch.int32)


def test_load_checkpoint_float16_file_in_float32(tmp_path):
    from latentforge.checkpoints import load_checkpoint, save_checkpoint

    configs, comps = _tiny_sd15()
    half = {n: m.half() for n, m in comps.items()}
    path = str(tmp_path / "tiny.safetensors")
    save_checkpoint(path, "sd15", half, configs)
    sd = read_state_dict(path)
    meta = {"latentforge.family": "sd15", "latentforge.configs": configs_to_json(configs)}
    save_state_dict({**sd, "model_ema.decay": torch.tensor(0.999, dtype=torch.float16)}, path, meta)
    loaded = load_checkpoint(path, dtype=torch.float32)
    assert loaded.dropped == ["model_ema.decay"]
    for name, module in half.items():
        a, b = module.state_dict(), loaded.components[name].state_dict()
        assert a.keys() == b.keys()
        for k in a:
            want = a[k].float() if a[k].is_floating_point() else a[k]
            assert b[k].dtype == want.dtype and torch.equal(b[k], want), (name, k)


# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec, so the child would report at least the RSS
# of this pytest process; VmHWM belongs to the child's own address space.
PEAK_CHILD = """
import sys, torch
from latentforge.checkpoints import read_state_dict

def status(field):  # bytes
    line = next(s for s in open("/proc/self/status") if s.startswith(field + ":"))
    return int(line.split()[1]) * 1024

rss_before = status("VmRSS")
sd = read_state_dict(sys.argv[1], torch.float32)
print(status("VmHWM") - rss_before, sum(v.nbytes for v in sd.values()))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux /proc")
def test_float16_file_read_in_float32_does_not_hold_both_copies(tmp_path):
    """16 float16 tensors of 4 MiB (64 MiB stored, 128 MiB in float32). Holding the stored dict and the
    converted copy would peak at 192 MiB = 1.5x the float32 weights; converting one tensor at a time peaks
    at 128 MiB + one 4 MiB read buffer = 1.03x. The bound 1.2x leaves ~25 MiB for allocator slack and the
    interpreter, and is measured as (peak RSS after) - (RSS before), which can only overstate the peak."""
    import subprocess
    import sys

    path = str(tmp_path / "big.safetensors")
    sd = {f"w{i}": torch.full((2048, 1024), float(i), dtype=torch.float16) for i in range(16)}
    save_state_dict(sd, path)
    out = subprocess.run(
        [sys.executable, "-c", PEAK_CHILD, path], capture_output=True, text=True, check=True
    ).stdout
    extra, weights = (int(s) for s in out.split())
    assert weights == 16 * 2048 * 1024 * 4
    assert extra < 1.2 * weights, f"peak {extra / weights:.2f}x the float32 weights"
