"""The rest of issue 12's inpainting: 9-channel inpainting checkpoints (detected from their shapes,
conditioned as diffusers' StableDiffusionInpaintPipeline, not blended), outpainting, "inpaint only the masked
area", the command line."""

import dataclasses
import re

import numpy as np
import pytest
import torch
from PIL import Image

from latentforge import canvas, families, img2img
from latentforge.checkpoints import detect_family, save_checkpoint, unet_inputs
from latentforge.cli import main
from latentforge.models.unet import UNet
from latentforge.pipeline import Pipeline
from tests.test_img2img import as_tensor, box_mask, picture
from tests.test_pipeline import PROMPT, SIZE, TINY, _save, pixels, tiny

W, H = SIZE["sd15"]  # 32x24 pixels, 16x12 latents (the tiny VAE downscales by 2)
_NINE = {}


def nine(family: str = "sd15") -> Pipeline:
    """A tiny random pipeline whose UNet takes 9 channels (x, mask, masked-image latents). num_heads rather
    than num_head_channels: the form diffusers' single-file config reader takes for an SD1 UNet."""
    if family not in _NINE:
        from tests.test_models_unet import randomize

        cfg = dict(TINY[family])
        cfg["unet"] = dataclasses.replace(cfg["unet"], in_channels=9, num_heads=2, num_head_channels=-1)
        torch.manual_seed(0)
        pipe = Pipeline.from_preset(family, cfg)
        randomize(pipe.net, seed=3)
        _NINE[family] = pipe
    return _NINE[family]


def small_mask(w: int = W, h: int = H) -> Image.Image:
    m = np.zeros((h, w), dtype=np.uint8)
    m[4:20, 10:27] = 255
    return Image.fromarray(m, "L")


# -- 9-channel checkpoints: detection ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, keyfile",
    [("sd15", "sd1_unet_ldm"), ("sd21", "sd2_unet_ldm"), ("sdxl-base", "sdxl_base_unet_sgm")],
)
def test_inpainting_layouts_are_read_from_the_shapes(family, keyfile):
    # SD1.5-, SD2- and SDXL-inpainting are their family's released UNet with a 9-channel input conv: the
    # real key list with that one shape changed is detected as the family, and the UNet built from the
    # inferred config reproduces every key and shape of it exactly.
    from tests.test_models_unet import PREFIX, read_keys

    ref = read_keys(keyfile)
    ref["input_blocks.0.0.weight"] = (320, 9, 3, 3)
    sd = {k: torch.empty(s, device="meta") for k, s in ref.items()}
    assert detect_family({PREFIX + k: s for k, s in ref.items()}).family == family
    cfg, why = unet_inputs(families.get(family).configs()["unet"], sd)
    assert cfg.in_channels == 9 and "inpainting" in why
    with torch.device("meta"):
        got = {k: tuple(v.shape) for k, v in UNet(cfg).state_dict().items()}
    assert got == ref
    ordinary = {**sd, "input_blocks.0.0.weight": torch.empty(320, 4, 3, 3, device="meta")}
    assert unet_inputs(families.get(family).configs()["unet"], ordinary)[0].in_channels == 4
    eight = {**sd, "input_blocks.0.0.weight": torch.empty(320, 8, 3, 3, device="meta")}
    with pytest.raises(ValueError, match=r"takes 8 input channels .*supported: 4 .* and 9 \(inpainting"):
        unet_inputs(families.get(family).configs()["unet"], eight)


def test_single_file_inpainting_model_loads_and_is_recognised(tmp_path):
    # The file's own config says 4 input channels (as a base model's would); the weights decide.
    pipe = nine()
    path = str(tmp_path / "inpaint.safetensors")
    four = dataclasses.replace(pipe.configs["unet"], in_channels=4)
    save_checkpoint(path, "sd15", pipe.components, {**pipe.configs, "unet": four})
    loaded = Pipeline.from_single_file(path)
    assert loaded.inpaint_model and loaded.default_strength == 1.0
    assert "9-channel UNet input: an inpainting model" in str(loaded.detection)
    assert not tiny("sd15").inpaint_model and tiny("sd15").default_strength == 0.75
    # SD2-inpainting is an ε model (v2-inpainting-inference.yaml), the SD2 family's default is v
    cfg = dict(TINY["sd21"])
    cfg["unet"] = dataclasses.replace(cfg["unet"], in_channels=9)
    assert Pipeline.from_preset("sd21", cfg).model_sampling.prediction == "eps"
    assert Pipeline.from_preset("sd21", TINY["sd21"]).model_sampling.prediction == "v"
    assert Pipeline.from_preset("sd21", cfg, prediction="v").model_sampling.prediction == "v"


# -- 9-channel checkpoints: against diffusers ---------------------------------------------------------------


def _diffusers_inpaint(pipe, scheduler, **kw):
    """diffusers' StableDiffusionInpaintPipeline on the same UNet and VAE weights (converted by diffusers'
    single-file converters), our text encoder's embeddings, output_type="latent"."""
    from diffusers import StableDiffusionInpaintPipeline

    from tests.test_models_unet import to_diffusers
    from tests.test_models_vae import diffusers_twin

    d = StableDiffusionInpaintPipeline(
        vae=diffusers_twin(pipe.vae, ""), text_encoder=None, tokenizer=None, unet=to_diffusers(pipe.net),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    d.set_progress_bar_config(disable=True)
    return d(**kw, output_type="latent").images


@pytest.mark.parametrize(
    "scheduler, steps, strength",
    [("euler", 4, 1.0), ("ddim", 10, 0.6)],
    ids=["euler-strength-1", "ddim-strength-0.6"],
)
def test_nine_channel_model_matches_diffusers(scheduler, steps, strength, monkeypatch):
    """Same weights, same seeds (one CPU generator per image, as diffusers draws with a list of
    generators), CFG 3, a batch of 2, on both of diffusers' starts: pure noise (strength 1, Euler on the
    `linspace` timesteps 999, 666, 333, 0, which our `normal` schedule visits) and the image noised to the
    7th of 10 DDIM timesteps (`leading` + steps_offset 1 = our `ddim_uniform`; the deterministic DDIM step is
    Euler's for an ε model). diffusers draws a sample of the VAE posterior for the image latents; A1111,
    ComfyUI and latentforge take its mean, so diffusers is made to take the mean (`argmax`) too.

    Tolerance: relative to the latents' size, 1e-5. Both sides run float32 and differ in the order of
    operations inside the UNet and in their σ tables (float32 there, float64 here): measured 2.0e-6 (Euler,
    |latents| up to 66) and 1.6e-6 (DDIM). The inverted mask, the smallest mistake a conditioning bug makes,
    moves them by 0.3 of their size."""
    pytest.importorskip("diffusers")
    import diffusers
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as sdi

    from tests.diffusers_ref import SD1

    retrieve = sdi.retrieve_latents
    monkeypatch.setattr(sdi, "retrieve_latents", lambda out, generator=None, sample_mode="sample": retrieve(
        out, generator, "argmax"))  # fmt: skip
    pipe = nine()
    if scheduler == "euler":
        sched, ours = diffusers.EulerDiscreteScheduler(**SD1, steps_offset=1), "normal"
    else:
        sched = diffusers.DDIMScheduler(
            **SD1, clip_sample=False, set_alpha_to_one=True, steps_offset=1, timestep_spacing="leading"
        )
        ours = "ddim_uniform"
    im, mask, seeds = picture(W, H, seed=3), small_mask(), [5, 6]
    cond = pipe.encode_prompt([PROMPT["sd15"]] * 2, W, H)["context"]
    uncond = pipe.encode_prompt([""] * 2, W, H, negative=True)["context"]
    ref = _diffusers_inpaint(
        pipe, sched, prompt_embeds=cond, negative_prompt_embeds=uncond, image=im, mask_image=mask, height=H,
        width=W, strength=strength, num_inference_steps=steps, guidance_scale=3.0,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
    )  # fmt: skip
    kw = dict(steps=steps, sampler="euler", scheduler=ours, cfg=3.0, seed=seeds[0], batch_size=2,
              init_image=im, mask_blur=0, strength=strength, progress=False)  # fmt: skip
    got = pipe.sample(PROMPT["sd15"], mask=mask, **kw)
    scale = float(ref.abs().max())
    err = float((got - ref).abs().max()) / scale
    assert err < 1e-5, err
    inverted = pipe.sample(PROMPT["sd15"], mask=Image.fromarray(255 - np.asarray(mask)), **kw)
    assert float((inverted - ref).abs().max()) / scale > 0.05


def test_nine_channel_conditioning_is_built_as_diffusers_builds_it():
    # the pieces directly: mask binarised at 0.5 and brought to the latent grid by nearest neighbour, the
    # masked image zero where repainted, encoded as any init image
    pipe = nine()
    im = as_tensor(picture(W, H, seed=1))
    soft = torch.zeros(1, 1, H, W)
    soft[..., 6:14, 8:20] = 0.7
    soft[..., 6:14, 20:24] = 0.3  # below 0.5: kept
    c = img2img.inpaint_conditioning(pipe, im, soft)
    assert c.shape == (1, 5, H // 2, W // 2)
    binary = (soft >= 0.5).float()
    torch.testing.assert_close(c[:, :1], binary[..., ::2, ::2], rtol=0, atol=0)
    torch.testing.assert_close(c[:, 1:], pipe.encode(im * (1 - binary)), rtol=0, atol=0)
    # the network sees 9 channels, the samplers 4; the conditioning follows CFG's doubled batch
    seen = []
    net = img2img.ConcatInputs(lambda x, t, **kw: seen.append(x) or x[:, :4], c)
    out = net(torch.randn(2, 4, H // 2, W // 2), torch.zeros(2))
    assert out.shape == (2, 4, H // 2, W // 2) and seen[0].shape == (2, 9, H // 2, W // 2)
    assert torch.equal(seen[0][1, 4:], c[0])


def test_ordinary_model_blends_and_inpainting_model_does_not():
    im, mask = picture(W, H, seed=4), box_mask(W, H)
    z = None
    for pipe, blended in ((tiny("sd15"), True), (nine(), False)):
        z = pipe.encode(as_tensor(im))
        m = img2img.latent_mask(img2img.to_mask(mask, 1, W, H), H // 2, W // 2)
        keep = (m == 0).expand_as(z)
        steps: list[torch.Tensor] = []
        kw = dict(steps=8, cfg=3.0, seed=2, init_image=im, mask=mask, mask_blur=0, progress=False)
        lat = pipe.sample(PROMPT["sd15"], callback=lambda d, seen=steps: seen.append(d["denoised"]), **kw)
        # default strength: 0.75 (6 of 8 steps) for an ordinary model, 1 for an inpainting model
        assert len(steps) == (6 if blended else 8)
        if blended:  # the known region is the encoded image at every step and at the end
            assert torch.equal(lat[keep], z[keep]) and all(torch.equal(d[keep], z[keep]) for d in steps)
        else:  # the network's own prediction there
            assert (lat[keep] - z[keep]).abs().max() > 1e-2
        # pixels: the original outside the mask either way (A1111's overlay)
        out = pixels(pipe(PROMPT["sd15"], **kw))[0]
        outside = np.asarray(mask) == 0
        assert (out[outside] == np.asarray(im)[outside]).all()


def test_nine_channel_text_to_image_is_an_all_white_mask():
    # no mask: everything is repainted and the masked image is all 0 (A1111's txt2img conditioning), so it
    # equals inpainting with an all-white mask from pure noise, exactly
    pipe = nine()
    kw = dict(steps=3, cfg=3.0, seed=9, width=W, height=H, progress=False)
    white = Image.new("L", (W, H), 255)
    t2i = pipe.sample(PROMPT["sd15"], **kw)
    assert torch.equal(t2i, pipe.sample(PROMPT["sd15"], init_image=picture(W, H), mask=white, **kw))


# -- outpainting -------------------------------------------------------------------------------------------


def test_outpaint_grows_the_canvas_and_repaints_the_border():
    pipe = tiny("sd15")
    im = picture(W, H, seed=5)
    kw = dict(steps=3, cfg=3.0, seed=1, init_image=im, outpaint=(4, 6, 2, 0), mask_blur=0, progress=False)
    out = pipe(PROMPT["sd15"], strength=0.9, **kw)[0]
    assert out.size == (W + 10, H + 2)
    got = np.asarray(out).astype(int)
    assert (got[2:, 4 : 4 + W] == np.asarray(im)).all()  # the picture itself, untouched (no blur)
    edge = np.repeat(np.asarray(im)[:, :1], 4, axis=1)  # what the left border started from
    assert (got[2:, :4] != edge).any()  # the border was repainted
    assert pipe.sample(PROMPT["sd15"], **kw).shape == (1, 4, (H + 2) // 2, (W + 10) // 2)
    # a user mask is kept inside the canvas beside the new border
    canvas_im, m = img2img.outpaint(im, box_mask(W, H), 3, 2, 1)
    assert canvas_im.shape == (1, 3, H + 6, W + 6) and m[0, 0, 3, 3] == 0 and m[0, 0, 3, -5] == 1
    assert (m[..., :3, :] == 1).all() and (m[..., :, :3] == 1).all()


def test_outpaint_canvas_fill_modes_and_rounding():
    x = as_tensor(picture(W, H, seed=6))
    c, m = canvas.pad_canvas(x, None, (3, 0, 0, 2))
    assert torch.equal(c[..., :H, 3:], x) and (m[..., :H, 3:] == 0).all() and m.sum() == m.numel() - W * H
    assert torch.equal(c[..., :H, :3], x[..., :, :1].expand(1, 3, H, 3))  # "original": the edge, extended
    assert torch.equal(c[..., H:, 3:], x[..., -1:, :].expand(1, 3, 2, W))
    filled = img2img.fill(c, m)  # "fill": the border takes the picture's mean colour
    torch.testing.assert_close(filled[..., 0, 0], x.mean(dim=(2, 3)))
    # sizes off the model's step: the padding grows (right/bottom first), with a warning naming both numbers
    with pytest.warns(
        UserWarning, match=r"right padding rounded up from 5 to 6 pixels .* width, 40, .* of 2"
    ):
        assert canvas.round_padding((31, 24), (3, 5, 0, 0), 2) == (3, 6, 0, 0)
    with pytest.warns(UserWarning, match="left padding rounded up from 3 to 8"):
        assert canvas.round_padding((32, 24), (3, 0, 0, 0), 8) == (8, 0, 0, 0)
    assert canvas.round_padding((32, 24), (8, 8, 0, 16), 8) == (8, 8, 0, 16)
    pipe = tiny("sd15")
    with pytest.warns(UserWarning, match="left padding rounded up from 3 to 4"):
        out = pipe(PROMPT["sd15"], steps=2, init_image=picture(W, H), outpaint=(3, 0, 0, 0), progress=False)
    assert out[0].size == (W + 4, H)


def test_outpaint_errors():
    pipe = tiny("sd15")
    im = picture(W, H)
    for bad, msg in [
        (-1, r"outpaint must be a whole number of pixels in \[0, 16384\], got -1"),
        ((1, 2, 3), r"one number of pixels or four \(left, right, top, bottom\), got \(1, 2, 3\)"),
        (1.5, "got 1.5"),
        (True, "got True"),
        ((0, 0, 0, 0), r"adds no pixel"),
        ((0, 0, -2, 0), "outpaint top must be .* got -2"),
    ]:
        with pytest.raises(ValueError, match=msg):
            pipe.sample(PROMPT["sd15"], steps=2, init_image=im, outpaint=bad, progress=False)
    with pytest.raises(ValueError, match="outpaint needs an init_image"):
        pipe.sample(PROMPT["sd15"], steps=2, outpaint=8, progress=False)


# -- inpaint only the masked area --------------------------------------------------------------------------


def test_crop_region_as_a1111():
    # modules/masking.py's own examples: the top-right quarter of 512x512 is (256, 0, 512, 256); a mask in a
    # 128x32 region worked at 512x512 grows to 128x128
    m = torch.zeros(1, 1, 512, 512)
    m[..., :256, 256:] = 1
    assert canvas.crop_region(m, 0) == (256, 0, 512, 256)
    assert canvas.crop_region(m, 16) == (240, 0, 512, 272)  # padded, clipped to the picture
    assert canvas.expand_crop_region((100, 200, 228, 232), 512, 512, 512, 512) == (100, 152, 228, 280)
    assert canvas.expand_crop_region((0, 0, 128, 32), 512, 512, 512, 512) == (0, 0, 128, 128)  # shifted in
    assert canvas.expand_crop_region((0, 480, 128, 512), 512, 512, 512, 512) == (0, 384, 128, 512)
    assert canvas.expand_crop_region((10, 0, 20, 40), 64, 16, 60, 40) == (0, 0, 60, 40)  # too wide: clipped
    assert canvas.crop_region(torch.zeros(1, 1, 8, 6), 2) == (0, 0, 6, 8)  # nothing masked: everything
    with pytest.raises(ValueError, match=r"inpaint_full_res_padding must be .* got -1"):
        canvas.check_padding(-1)


def test_inpaint_full_res_works_on_the_crop_and_pastes_it_back():
    pipe = tiny("sd15")
    w, h = 64, 48
    im = picture(w, h, seed=7)
    m = np.zeros((h, w), dtype=np.uint8)
    m[10:18, 40:52] = 255
    mask = Image.fromarray(m, "L")
    shapes = []
    kw = dict(steps=3, cfg=3.0, seed=3, init_image=im, mask=mask, mask_blur=1, inpaint_full_res=True,
              inpaint_full_res_padding=4, width=16, height=16, progress=False)  # fmt: skip
    out = pipe(PROMPT["sd15"], callback=lambda d: shapes.append(tuple(d["x"].shape)), **kw)[0]
    assert out.size == (w, h) and shapes == [(1, 4, 8, 8)] * 3  # sampled at the 16x16 working size
    soft = img2img.blur(img2img.to_mask(mask, 1, w, h), 1.0)
    # the box: the blurred mask reaches 3 px (kernel radius ⌊2.5 + 0.5⌋) past x 40..52, y 10..18, plus 4 px
    # of padding is (33, 3, 59, 25), 26x22, then grown to the square working size: 26x26
    assert canvas.full_res_region(soft, 4, 16, 16) == (33, 1, 59, 27)
    got, src, s = np.asarray(out).astype(int), np.asarray(im).astype(int), soft[0, 0].numpy()
    assert (got[s == 0] == src[s == 0]).all()  # outside the blurred mask: the picture
    assert (got[s > 0.99] != src[s > 0.99]).any()  # inside: repainted


def test_inpaint_full_res_on_the_whole_picture_is_plain_inpainting():
    # when the padded box is the whole picture and the working size its size, the crop, the scaling and
    # the paste are identities: the same pixels as plain inpainting, exactly
    pipe = tiny("sd15")
    im, mask = picture(W, H, seed=8), box_mask(W, H)
    kw = dict(
        steps=3, cfg=3.0, seed=4, init_image=im, mask=mask, mask_blur=2, width=W, height=H, progress=False
    )
    plain = pixels(pipe(PROMPT["sd15"], **kw))
    full = pixels(pipe(PROMPT["sd15"], inpaint_full_res=True, inpaint_full_res_padding=W, **kw))
    assert (plain == full).all()
    with pytest.raises(ValueError, match="inpaint_full_res .* needs an init_image and a mask"):
        pipe.sample(PROMPT["sd15"], steps=2, init_image=im, inpaint_full_res=True, progress=False)


# -- the command line --------------------------------------------------------------------------------------


def test_cli_outpaint_and_inpaint_full_res(tmp_path, capsys):
    path, _ = _save(tiny("sd15"), "sd15", tmp_path)
    im = picture(W, H, seed=9)
    im.save(tmp_path / "init.png")
    box_mask(W, H).save(tmp_path / "mask.png")
    base = ["generate", "x", "--model", path, "--steps", "2", "--quiet", "--out", str(tmp_path / "out")]
    init = ["--init-image", str(tmp_path / "init.png")]
    mask = ["--mask", str(tmp_path / "mask.png")]

    assert main(base + init + ["--outpaint", "4,6,2,0", "--mask-blur", "0"]) == 0
    got = Image.open(capsys.readouterr().out.strip().splitlines()[-1])
    text = got.text["parameters"]
    assert got.size == (W + 10, H + 2) and 'Outpaint: "4,6,2,0"' in text and "Mask blur: 0" in text
    assert (np.asarray(got.convert("RGB"))[2:, 4 : 4 + W] == np.asarray(im)).all()
    assert main(base + init + ["--outpaint", "2"]) == 0
    assert Image.open(capsys.readouterr().out.strip().splitlines()[-1]).size == (W + 4, H + 4)

    full = ["--inpaint-full-res", "--inpaint-full-res-padding", "8", "--width", "16", "--height", "16"]
    assert main(base + init + mask + full) == 0
    got = Image.open(capsys.readouterr().out.strip().splitlines()[-1])
    text = got.text["parameters"]
    assert got.size == (W, H) and "Inpaint area: Only masked, Masked area padding: 8" in text
    assert "Size: 16x16" in text  # A1111: the size sampled at
    assert main(base + init + mask) == 0
    text = Image.open(capsys.readouterr().out.strip().splitlines()[-1]).text["parameters"]
    assert "Inpaint area" not in text and "Masked area padding" not in text

    cases = [
        (["--outpaint", "4"], "--outpaint needs --init-image"),
        (init + ["--outpaint", "1,2"], r"--outpaint '1,2' is not one whole number of pixels or four"),
        (init + ["--outpaint=-3"], r"--outpaint '-3' is not one whole number"),
        (init + ["--outpaint", "0"], "--outpaint '0' adds no pixel"),
        (init + ["--outpaint", "99999"], r"out of range; expected .* \[0, 16384\]"),
        (init + ["--inpaint-full-res"], "--inpaint-full-res needs --mask"),
        (init + mask + ["--inpaint-full-res-padding", "8"], "needs --inpaint-full-res"),
        (init + mask + ["--inpaint-full-res", "--inpaint-full-res-padding", "-1"], "-1 is out of range"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error: ") and re.search(message, err), (extra, err)


def test_cli_inpainting_model_defaults_to_strength_one(tmp_path, capsys):
    pipe = nine()
    path = str(tmp_path / "inpaint.safetensors")
    save_checkpoint(path, "sd15", pipe.components, pipe.configs)
    picture(W, H).save(tmp_path / "init.png")
    small_mask().save(tmp_path / "mask.png")
    args = ["generate", "x", "--model", path, "--steps", "2", "--quiet", "--out", str(tmp_path / "out")]
    args += ["--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png")]
    assert main(args) == 0
    text = Image.open(capsys.readouterr().out.strip().splitlines()[-1]).text["parameters"]
    assert "Denoising strength: 1.0" in text
