"""Generation on every family with TINY random-weight networks: sizes, seeds, CFG cost, conditioning shapes
and semantics, save/load round trips and the `generate` command."""

import numpy as np
import pytest
import torch
from PIL import Image

from latentforge import families
from latentforge.checkpoints import build_component, save_checkpoint, save_state_dict
from latentforge.cli import main
from latentforge.model_sampling import DiscreteFlow, DiscreteVP
from latentforge.models import AutoencoderKLConfig, CLIPTextConfig, DiTConfig, MMDiTConfig, UNetConfig
from latentforge.pipeline import Pipeline, infotext
from latentforge.samplers import SAMPLER_NAMES
from latentforge.tokenizer import tokenize

# Text towers: CLIP-L (openai layout), ViT-H and bigG (open_clip layout); SD3 files store both in HF naming.
L = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
L_PROJ = CLIPTextConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32
)
H = CLIPTextConfig(
    layout="open_clip", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    hidden_act="gelu", projection_dim=32,
)  # fmt: skip
G = CLIPTextConfig(
    layout="open_clip", hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
    hidden_act="gelu", projection_dim=40,
)  # fmt: skip
G_HF = CLIPTextConfig(
    hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, hidden_act="gelu",
    projection_dim=40,
)  # fmt: skip
VAE = AutoencoderKLConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)  # downscale 2
VAE16 = AutoencoderKLConfig(
    ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=16, embed_dim=16, use_quant_conv=False
)


def unet(**kw):
    return UNetConfig(
        model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,), num_res_blocks=1,
        num_head_channels=16, **kw,
    )  # fmt: skip


MMDIT = dict(depth=2, adm_in_channels=32 + 40, context_dim=96, pos_embed_max_size=8, num_patches=64)
SDXL_Y = 40 + 3 * 512  # G projected pooled ‖ 3 × (2 numbers × 256)
REFINER_Y = 40 + 2 * 512 + 256
TINY = {
    "sd15": {"unet": unet(context_dim=32), "vae": VAE, "clip_l": L},
    "sd21": {"unet": unet(context_dim=32, use_linear_in_transformer=True), "vae": VAE, "clip_h": H},
    "sdxl-base": {
        "unet": unet(
            context_dim=32 + 48,
            use_linear_in_transformer=True,
            num_classes="sequential",
            adm_in_channels=SDXL_Y,
        ),
        "vae": VAE,
        "clip_l": L,
        "clip_g": G,
    },
    "sdxl-refiner": {
        "unet": unet(
            context_dim=48,
            use_linear_in_transformer=True,
            num_classes="sequential",
            adm_in_channels=REFINER_Y,
        ),
        "vae": VAE,
        "clip_g": G,
    },
    "sd3-medium": {"mmdit": MMDiTConfig(**MMDIT), "vae": VAE16, "clip_l": L_PROJ, "clip_g": G_HF},
    "sd35-medium": {
        "mmdit": MMDiTConfig(**MMDIT, qk_norm="rms", x_block_self_attn_layers=(0,)),
        "vae": VAE16,
        "clip_l": L_PROJ,
        "clip_g": G_HF,
    },
    "dit-xl-2-256": {
        "dit": DiTConfig(input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=10),
        "vae": VAE,
    },
}
FAMILIES = list(TINY)
SIZE = {f: (32, 24) for f in FAMILIES} | {
    "sd3-medium": (32, 16),
    "sd35-medium": (32, 16),
    "dit-xl-2-256": (16, 16),
}
PROMPT = {f: "a red cube on a blue floor" for f in FAMILIES} | {"dit-xl-2-256": "7"}
_CACHE = {}


def tiny(family: str) -> Pipeline:
    """A tiny random pipeline; the zero-initialised layers (UNet out conv, DiT adaLN-Zero, ...) are filled
    too, so the networks' outputs depend on their inputs and the conditioning."""
    if family not in _CACHE:
        torch.manual_seed(0)
        pipe = Pipeline.from_preset(family, TINY[family])
        with torch.no_grad():
            for m in pipe.components.values():
                for p in m.parameters():
                    if (p == 0).all():
                        p.normal_(0, 0.05)
        _CACHE[family] = pipe
    return _CACHE[family]


def run(pipe, family, **kw):
    w, h = SIZE[family]
    args = dict(steps=2, width=w, height=h, progress=False, cfg=4.0) | kw
    return pipe.sample(PROMPT[family], **args)


def pixels(images):
    return np.stack([np.asarray(im) for im in images]).astype(int)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_sizes_seeds_and_batches(family):
    pipe = tiny(family)
    w, h = SIZE[family]
    images = pipe(PROMPT[family], steps=2, width=w, height=h, batch_size=2, seed=5, cfg=4.0, progress=False)
    assert [im.size for im in images] == [(w, h)] * 2 and all(im.mode == "RGB" for im in images)
    again = pipe(PROMPT[family], steps=2, width=w, height=h, batch_size=2, seed=5, cfg=4.0, progress=False)
    assert (pixels(images) == pixels(again)).all()  # same seed, same images
    assert (pixels(images[:1]) != pixels(images[1:])).any()  # seeds 5 and 6 differ
    # Image k of a batch is the image of seed + k alone, up to float32 reassociation in batched matmuls
    # (observed up to ~1e-4 on latents that start at σ_max ≈ 14.6).
    batch = run(pipe, family, batch_size=2, seed=5)
    alone = run(pipe, family, batch_size=1, seed=6)
    torch.testing.assert_close(batch[1:], alone, atol=1e-3, rtol=1e-3)
    assert (
        run(pipe, family, seed=5) - run(pipe, family, seed=5, cfg=1.0)
    ).abs().max() > 0  # CFG does something


@pytest.mark.parametrize("family", ["sd15", "sd3-medium", "dit-xl-2-256"])
def test_stochastic_sampler_batch_independence(family):
    pipe = tiny(family)
    batch = run(pipe, family, batch_size=2, seed=3, sampler="euler_ancestral")
    alone = run(pipe, family, batch_size=1, seed=4, sampler="euler_ancestral")
    torch.testing.assert_close(batch[1:], alone, atol=1e-3, rtol=1e-3)


def test_every_sampler_runs_in_the_pipeline():
    # Stochastic samplers get the per-image seeds (seed=[...]); cfg_pp samplers use CFGDenoiser.with_uncond.
    pipe = tiny("dit-xl-2-256")
    for name in SAMPLER_NAMES:
        batch = run(pipe, "dit-xl-2-256", sampler=name, batch_size=2, seed=8)
        assert torch.isfinite(batch).all(), name
        if name == "dpm_adaptive":  # its step size follows an error norm over the whole batch (k-diffusion)
            continue
        alone = run(pipe, "dit-xl-2-256", sampler=name, seed=9)
        torch.testing.assert_close(batch[1:], alone, atol=1e-3, rtol=1e-3, msg=name)


@pytest.mark.parametrize("family", ["sd15", "sdxl-base", "sd35-medium", "dit-xl-2-256"])
def test_cfg_one_skips_the_unconditional_pass(family):
    pipe = tiny(family)
    batches = []
    hook = pipe.net.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    try:
        run(pipe, family, steps=3, cfg=1.0, batch_size=2)
        assert batches == [2, 2, 2]  # one call per step, conditional half only
        batches.clear()
        run(pipe, family, steps=3, cfg=5.0, batch_size=2)
        assert batches == [4, 4, 4]  # one call per step on [cond | uncond]
    finally:
        hook.remove()


def test_model_sampling_and_latent_format_per_family():
    assert tiny("sd15").model_sampling.prediction == "eps"
    assert tiny("sd21").model_sampling.prediction == "v"
    assert Pipeline("sd21", tiny("sd21").components, prediction="eps").model_sampling.prediction == "eps"
    assert isinstance(tiny("sd3-medium").model_sampling, DiscreteFlow)
    assert tiny("sd3-medium").model_sampling.shift == 3.0
    dit_ms = tiny("dit-xl-2-256").model_sampling
    assert isinstance(dit_ms, DiscreteVP) and dit_ms.beta_schedule == "linear"
    assert tiny("sdxl-base").latent_format.scale_factor == 0.13025
    assert tiny("sd3-medium").latent_format.shift_factor == 0.0609
    assert tiny("dit-xl-2-256").latent_format.scale_factor == 0.18215
    assert tiny("dit-xl-2-256").default_size == (16, 16)  # input_size · VAE downscale


def _enc(pipe, prompts, negative=False):
    w, h = 32, 24
    return pipe.encode_prompt(prompts, w, h, negative)


def test_conditioning_sd1_sd2():
    p = ["a cat", "a red cube"]
    sd15 = tiny("sd15")
    c = _enc(sd15, p)["context"]
    assert c.shape == (2, 77, 32)
    ref = sd15.components["clip_l"](tokenize(p, pad="eos"), layer="last", final_norm=True).hidden
    torch.testing.assert_close(c, ref, rtol=0, atol=0)
    sd21 = tiny("sd21")
    c = _enc(sd21, p)["context"]
    assert c.shape == (2, 77, 32)
    ref = sd21.components["clip_h"](tokenize(p, pad="zero"), layer="penultimate", final_norm=True).hidden
    torch.testing.assert_close(c, ref, rtol=0, atol=0)


def test_conditioning_sdxl():
    p = ["a cat"]
    pipe = tiny("sdxl-base")
    cond = pipe.encode_prompt(p, width=40, height=24)
    assert cond["context"].shape == (1, 77, 32 + 48) and cond["y"].shape == (1, SDXL_Y)
    lo = pipe.components["clip_l"](tokenize(p, pad="eos"), layer=-2, final_norm=False)
    go = pipe.components["clip_g"](tokenize(p, pad="zero"), layer="penultimate", final_norm=False)
    torch.testing.assert_close(cond["context"], torch.cat([lo.hidden, go.hidden], -1), rtol=0, atol=0)
    torch.testing.assert_close(cond["y"][:, :40], go.projected, rtol=0, atol=0)
    # size embeddings: (h, w), (top, left), (h, w); cos of 0 is 1 in the first half of each 256-d block
    assert cond["y"][0, 40 + 512 : 40 + 512 + 128].eq(1).all()  # crop top = 0
    ref = pipe.encode_prompt(p, width=24, height=40)["y"]
    assert not torch.equal(cond["y"][:, 40:], ref[:, 40:])  # (h, w) order matters

    ref_pipe = tiny("sdxl-refiner")
    pos, neg = ref_pipe.encode_prompt(p, 32, 24), ref_pipe.encode_prompt(p, 32, 24, negative=True)
    assert pos["context"].shape == (1, 77, 48) and pos["y"].shape == (1, REFINER_Y)
    torch.testing.assert_close(pos["y"][:, : 40 + 1024], neg["y"][:, : 40 + 1024], rtol=0, atol=0)
    from latentforge.models.unet import timestep_embedding

    torch.testing.assert_close(pos["y"][:, -256:], timestep_embedding(torch.tensor([6.0]), 256))
    torch.testing.assert_close(neg["y"][:, -256:], timestep_embedding(torch.tensor([2.5]), 256))


@pytest.mark.parametrize("family", ["sd3-medium", "sd35-medium"])
def test_conditioning_sd3(family):
    p = ["a cat", "a dog"]
    pipe = tiny(family)
    cond = _enc(pipe, p)
    assert cond["context"].shape == (2, 77 + 77, 96) and cond["y"].shape == (2, 32 + 40)
    lo = pipe.components["clip_l"](tokenize(p, pad="eos"), layer="penultimate", final_norm=False)
    go = pipe.components["clip_g"](tokenize(p, pad="zero"), layer="penultimate", final_norm=False)
    torch.testing.assert_close(cond["context"][:, :77, :80], torch.cat([lo.hidden, go.hidden], -1))
    assert cond["context"][:, :77, 80:].eq(0).all() and cond["context"][:, 77:].eq(0).all()
    # pooled: CLIP-L unprojected (the reference's identity projection), bigG projected
    torch.testing.assert_close(cond["y"], torch.cat([lo.pooled, go.projected], -1))


def test_conditioning_dit():
    pipe = tiny("dit-xl-2-256")
    assert _enc(pipe, ["7", " 3 "])["y"].tolist() == [7, 3]
    assert _enc(pipe, ["", ""], negative=True)["y"].tolist() == [10, 10]  # the null class
    with pytest.raises(ValueError, match=r"class index in \[0, 9\].*'a cat'"):
        _enc(pipe, ["a cat"])
    with pytest.raises(ValueError, match=r"out of range \[0, 9\]"):
        _enc(pipe, ["10"])
    with pytest.raises(ValueError, match="negative prompt"):
        run(pipe, "dit-xl-2-256", negative_prompt="3")
    with pytest.raises(ValueError, match="unknown family"):
        families.encode("sd4", {}, ["x"], 8, 8)


@pytest.mark.parametrize(
    ("family", "kw", "match"),
    [
        ("sd15", {"width": 31}, r"width must be a multiple of 2"),
        ("sd15", {"height": 0}, r"height must be an integer in \[2, "),
        ("sd3-medium", {"width": 18}, r"width must be a multiple of 4"),
        ("sd3-medium", {"width": 64}, r"width must be an integer in \[4, 32\]"),
        ("dit-xl-2-256", {"width": 32, "height": 32}, r"16x16 images only"),
        ("sd15", {"steps": 0}, r"steps must be an integer in \[1, "),
        ("sd15", {"cfg": -1.0}, r"cfg must be a number in \[0, 100\]"),
        ("sd15", {"seed": -3}, r"seed must be an integer"),
        ("sd15", {"batch_size": 0}, r"batch_size must be an integer in \[1, "),
        ("sd15", {"sampler": "eulr"}, r"euler"),
        ("sd15", {"scheduler": "karas"}, r"karras"),
        ("sd15", {"negative_prompt": ["a", "b"]}, r"2 entries for a batch of 1"),
    ],
)
def test_arguments_are_validated(family, kw, match):
    with pytest.raises(ValueError, match=match):
        run(tiny(family), family, **kw)


def test_missing_component_is_named():
    pipe = tiny("sd15")
    with pytest.raises(ValueError, match=r"needs components \['clip_l'\]"):
        Pipeline("sd15", {"unet": pipe.net, "vae": pipe.vae})


def _save(pipe, family, folder):
    path = str(folder / f"{family}.safetensors")
    nets = {k: m for k, m in pipe.components.items() if not (family.startswith("dit") and k == "vae")}
    save_checkpoint(path, family, nets, pipe.configs)
    if not family.startswith("dit"):
        return path, None
    vae = str(folder / "vae.safetensors")  # DiT files hold the DiT alone; the VAE comes as its own file
    save_state_dict({"first_stage_model." + k: v for k, v in pipe.vae.state_dict().items()}, vae)
    return path, vae


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_round_trip(family, tmp_path):
    pipe = tiny(family)
    path, vae = _save(pipe, family, tmp_path)
    loaded = Pipeline.from_single_file(path, vae=vae)
    assert loaded.family == family and set(loaded.components) == set(pipe.components)
    for name, module in pipe.components.items():
        ref = module.state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in loaded.components[name].state_dict().items())
    # Same weights; the sampled latents agree to float32 rounding (loaded tensors sit at other addresses, and
    # MKL's float32 GEMM may then block differently: observed <= 4e-6 on SD3, exact on the others).
    torch.testing.assert_close(run(loaded, family, seed=2), run(pipe, family, seed=2), rtol=0, atol=1e-4)


def test_cli_generate_writes_pngs_with_parameters(tmp_path, capsys):
    path, _ = _save(tiny("sd15"), "sd15", tmp_path)
    out = tmp_path / "out"
    argv = ["generate", "--model", path, "a red cube, on blue: floor", "--negative", "blurry", "--steps", "2",
            "--cfg", "5", "--seed", "41", "--width", "32", "--height", "24", "--batch-size", "2",
            "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    files = capsys.readouterr().out.split()
    assert [f.rsplit("/", 1)[1] for f in files] == ["00000-41.png", "00001-42.png"]
    assert sorted(p.name for p in out.iterdir()) == ["00000-41.png", "00001-42.png"]  # no temp files left
    im = Image.open(files[1])
    assert im.size == (32, 24)
    text = im.text["parameters"]
    lines = text.split("\n")
    assert lines[0] == "a red cube, on blue: floor" and lines[1] == "Negative prompt: blurry"
    # A1111 labels, so A1111 reads the sampler back (infotext.SAMPLERS)
    assert lines[2].startswith("Steps: 2, Sampler: Euler, Schedule type: Normal, CFG scale: 5.0, Seed: 42, ")
    assert (
        "Size: 32x24, Model hash: " in lines[2] and "Model: sd15, RNG: CPU, Version: latentforge" in lines[2]
    )
    expected = pixels(tiny("sd15")("a red cube, on blue: floor", negative_prompt="blurry", steps=2, cfg=5.0,
                                   seed=42, width=32, height=24, progress=False))  # fmt: skip
    assert np.abs(pixels([im.convert("RGB")]) - expected).max() <= 1
    assert main(argv[:-3] + ["--out", str(out), "--quiet"]) == 0  # numbering continues
    assert capsys.readouterr().out.split()[0].endswith("00002-41.png")

    assert main(["generate", "--model", str(tmp_path / "nope.safetensors"), "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "--model", path, "x", "--width", "31", "--quiet"]) == 2
    assert "width must be a multiple of 2" in capsys.readouterr().err


def test_infotext_quotes_like_a1111():
    text = infotext("p", "", {"Steps": 3, "Model": "a, b", "Skip": None, "Note": "x: y"})
    assert text == 'p\nSteps: 3, Model: "a, b", Note: "x: y"'


@pytest.mark.parametrize(
    ("family", "shapes"),
    [
        ("sd15", {"context": (2, 77, 768)}),
        ("sd21", {"context": (2, 77, 1024)}),
        ("sdxl-base", {"context": (2, 77, 2048), "y": (2, 2816)}),
        ("sdxl-refiner", {"context": (2, 77, 1280), "y": (2, 2560)}),
        ("sd3-medium", {"context": (2, 154, 4096), "y": (2, 2048)}),
    ],
)
def test_full_size_conditioning_shapes_on_meta(family, shapes):
    """The released text encoders (built on the meta device) give what the released networks take."""
    configs = families.get(family).configs()
    with torch.device("meta"):
        encoders = {k: build_component(k, c) for k, c in configs.items() if k.startswith("clip")}
    out = families.encode(family, encoders, ["a cat", "a dog"], 1024, 768)
    assert {k: tuple(v.shape) for k, v in out.items()} == shapes
    net = configs.get("unet") or configs["mmdit"]
    ctx = net.context_dim if isinstance(net.context_dim, int) else net.context_dim[0]
    assert (
        shapes["context"][-1] == ctx and shapes.get("y", (0, net.adm_in_channels))[1] == net.adm_in_channels
    )


def test_bad_size_names_the_nearest_valid_one():
    # the tiny VAEs downscale by 2 (a full SD VAE by 8); the tiny MMDiT adds patch 2
    with pytest.raises(ValueError, match="multiple of 2 for sd15, got 71; the nearest valid size is 72"):
        tiny("sd15").check_size(71, 64)
    with pytest.raises(
        ValueError, match="multiple of 4 for sd3-medium, got 21; the nearest valid size is 20"
    ):
        tiny("sd3-medium").check_size(32, 21)


@pytest.mark.parametrize("family", FAMILIES)
def test_hires_fix_variation_seeds_and_batch_count_on_every_family(family):
    """The job features run through the one sampling loop of every family: batch j of batch_count takes
    seeds seed + j·batch_size + k, subseed_strength 1 is the subseed's noise, and the hires fix returns the
    upscaled size (a DiT, with its one size, refuses it by name)."""
    pipe = tiny(family)
    w, h = SIZE[family]
    job = run(pipe, family, batch_size=1, batch_count=1, seed=7)
    torch.testing.assert_close(
        job, run(pipe, family, seed=3, subseed=7, subseed_strength=1.0), atol=1e-4, rtol=0
    )
    images = pipe(PROMPT[family], steps=2, width=w, height=h, batch_count=2, seed=6, cfg=4.0, progress=False)
    assert (pixels(images[1:]) == pixels(pipe(PROMPT[family], steps=2, width=w, height=h, seed=7, cfg=4.0,
                                                progress=False))).all()  # fmt: skip
    if family.startswith("dit"):
        with pytest.raises(ValueError, match="this DiT generates 16x16 images only"):
            run(pipe, family, hires_scale=2)
        return
    f = pipe.downscale
    if "mmdit" in pipe.components:  # the tiny MMDiT's position table ends at 32 pixels: grow the height
        up = run(pipe, family, hires_size=(w, 2 * h), hires_denoise=0.5)
        assert up.shape[-2:] == (2 * h // f, w // f)
        return
    up = run(pipe, family, hires_scale=2, hires_denoise=0.5)
    assert up.shape[-2:] == (2 * h // f, 2 * w // f)


def test_a_sampling_pass_keeps_one_working_buffer_across_its_steps():
    # The pass runs inside one workspace (models/winograd.py): the UNet's scratch users (its feed-forward's
    # GEGLU here; the Winograd convolutions in wide networks) get the same memory at every step instead of
    # fresh memory per network call, and it is freed when the pass ends.
    from latentforge.models import winograd

    pipe = tiny("sd15")
    seen = []

    def record(module, args, out):
        buffers = winograd._LOCAL.__dict__.get("buffers", {})
        seen.append((winograd.in_workspace(), [b.data_ptr() for b in buffers.values()]))

    handle = pipe.net.register_forward_hook(record)
    try:
        run(pipe, "sd15", steps=3)
    finally:
        handle.remove()
    assert len(seen) == 3 and all(inside for inside, _ in seen)
    assert seen[0][1] and all(ptrs == seen[0][1] for _, ptrs in seen)  # one buffer, reused by every step
    assert not winograd.in_workspace() and "buffers" not in winograd._LOCAL.__dict__
