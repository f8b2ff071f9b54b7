"""img2img and inpainting for ordinary checkpoints (issue 12): strength picks the tail of the schedule,
strength 0 is the VAE round trip, strength 1 is text-to-image; the known region of an inpainting job comes
back as the encoded image (latents) and as the input itself (pixels, after the overlay); samplers; CLI."""

import numpy as np
import pytest
import torch
from PIL import Image

from latentforge import img2img
from latentforge.cli import main
from latentforge.model_sampling import DiscreteFlow, DiscreteVP
from latentforge.pipeline import to_pil
from latentforge.samplers import SAMPLER_NAMES, SAMPLERS, sigmas_for
from tests.test_pipeline import PROMPT, SIZE, _save, pixels, tiny

FAMILIES = ["sd15", "sd3-medium"]  # VP (eps) and rectified flow: the two noise_scaling forms


def picture(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def as_tensor(im: Image.Image) -> torch.Tensor:  # [1, 3, H, W] in [-1, 1]
    return torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float() / 127.5 - 1


def box_mask(w: int, h: int) -> Image.Image:
    """White (repaint) on the right half, black (keep) on the left."""
    m = np.zeros((h, w), dtype=np.uint8)
    m[:, w // 2 :] = 255
    return Image.fromarray(m, "L")


def go(pipe, family, sample=True, **kw):
    w, h = SIZE[family]
    args = dict(steps=4, width=w, height=h, progress=False, cfg=3.0, seed=11) | kw
    return (pipe.sample if sample else pipe)(PROMPT[family], **args)


# -- img2img -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_strength_zero_is_the_vae_round_trip(family):
    pipe = tiny(family)
    im = picture(*SIZE[family])
    z = pipe.encode(as_tensor(im))
    assert torch.equal(go(pipe, family, init_image=im, strength=0.0), z)
    images = go(pipe, family, sample=False, init_image=im, strength=0.0)
    assert (pixels(images) == pixels(to_pil(pipe.decode(z)))).all()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m_sde"])
def test_strength_one_equals_txt2img(family, sampler):
    pipe = tiny(family)
    im = picture(*SIZE[family], seed=1)
    kw = dict(sampler=sampler, batch_size=2)
    assert torch.equal(go(pipe, family, init_image=im, strength=1.0, **kw), go(pipe, family, **kw))
    again = go(pipe, family, sample=False, init_image=im, strength=1.0, **kw)
    assert (pixels(again) == pixels(go(pipe, family, sample=False, **kw))).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_strength_keeps_the_last_steps_and_noises_the_image(family):
    pipe = tiny(family)
    im = picture(*SIZE[family], seed=2)
    full = sigmas_for("euler", "normal", pipe.model_sampling, 10)
    seen = []
    go(pipe, family, steps=10, init_image=im, strength=0.35, callback=lambda d: seen.append(d))
    assert len(seen) == 4  # ⌈10 · 0.35⌉
    assert float(seen[0]["sigma"].reshape(-1)[0]) == pytest.approx(float(full[6]))
    # the start is the model sampling's own noising of the encoded image, with txt2img's seeded noise
    from latentforge.noise import randn_seeded

    z = pipe.encode(as_tensor(im))
    x0 = pipe.model_sampling.noise_scaling(full[6], randn_seeded(z.shape, [11]), z)
    torch.testing.assert_close(seen[0]["x"], x0)
    assert img2img.steps_kept(20, 0.15) == 3 and img2img.steps_kept(20, 0.01) == 1
    assert img2img.steps_kept(20, 1.0) == 20 and img2img.steps_kept(20, 0.0) == 0


def test_strength_and_size_checks():
    pipe = tiny("sd15")
    im = picture(*SIZE["sd15"])
    for bad in (-0.1, 1.5, "0.5", True, float("nan")):
        with pytest.raises(ValueError, match=r"strength must be a number in \[0, 1\].*" + repr(bad)[:3]):
            go(pipe, "sd15", init_image=im, strength=bad)
    with pytest.warns(UserWarning, match="init image is 40x30, the output 32x24"):
        out = go(pipe, "sd15", sample=False, init_image=picture(40, 30), strength=0.5)
    assert out[0].size == (32, 24)
    with pytest.raises(ValueError, match="40x30.*32x24.*strict"):
        go(pipe, "sd15", init_image=picture(40, 30), strength=0.5, strict_size=True)
    # without width/height the output takes the init image's size
    w, h = SIZE["sd15"]
    out = pipe(PROMPT["sd15"], steps=2, init_image=im, strength=0.5, progress=False)
    assert out[0].size == (w, h)


# -- inpainting --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_inpainting_keeps_the_known_region(family):
    pipe = tiny(family)
    w, h = SIZE[family]
    im, mask = picture(w, h, seed=3), box_mask(w, h)
    z = pipe.encode(as_tensor(im))
    f = pipe.downscale
    m = img2img.latent_mask(img2img.blur(img2img.to_mask(mask, 1, w, h), 2.0), h // f, w // f)  # [1,1,h,w]
    assert 0 < m.mean() < 1
    denoised = []
    kw = dict(init_image=im, mask=mask, mask_blur=2, strength=0.8)
    lat = go(pipe, family, callback=lambda d: denoised.append(d["denoised"]), **kw)
    keep, repaint = (m == 0).expand_as(z), (m == 1).expand_as(z)
    assert torch.equal(lat[keep], z[keep])  # σ = 0: the encoded init latent exactly
    assert (lat[repaint] - z[repaint]).abs().max() > 1e-2  # the masked region was repainted
    for d in denoised:  # at every step the prediction's known region is the image
        assert torch.equal(d[keep], z[keep])

    # pixels: the input itself outside the blurred mask (A1111's overlay), something else inside
    soft = img2img.blur(img2img.to_mask(mask, 1, w, h), 2.0)[0, 0].numpy()  # [H, W]
    out = pixels(go(pipe, family, sample=False, **kw))[0]
    src = np.asarray(im).astype(int)
    outside = soft == 0
    assert outside.sum() > 0 and (out[outside] == src[outside]).all()
    inside = soft > 0.99
    assert inside.sum() > 0 and (out[inside] != src[inside]).any()


def test_inpainting_all_black_mask_returns_the_input():
    pipe = tiny("sd15")
    w, h = SIZE["sd15"]
    im = picture(w, h, seed=4)
    black = Image.new("L", (w, h), 0)
    lat = go(pipe, "sd15", init_image=im, mask=black, strength=0.9)
    assert torch.equal(lat, pipe.encode(as_tensor(im)))
    out = go(pipe, "sd15", sample=False, init_image=im, mask=black, strength=0.9)
    assert (pixels(out)[0] == np.asarray(im)).all()


def test_masked_content_modes():
    pipe = tiny("sd15")
    w, h = SIZE["sd15"]
    im, mask = picture(w, h, seed=5), box_mask(w, h)
    z = pipe.encode(as_tensor(im))
    m = img2img.latent_mask(img2img.to_mask(mask, 1, w, h), *z.shape[-2:]).expand_as(z)
    got = {
        mode: go(pipe, "sd15", init_image=im, mask=mask, mask_blur=0, masked_content=mode, strength=0.6)
        for mode in img2img.MASKED_CONTENT
    }
    x = as_tensor(im)
    mk = img2img.to_mask(mask, 1, w, h)
    z_fill = pipe.encode(img2img.fill(x, mk))  # fill changes the pixels before encoding
    for mode, lat in got.items():
        ref = z_fill if mode == "fill" else z
        assert torch.equal(lat[m == 0], ref[m == 0]), mode
    assert (got["original"] - got["latent_noise"]).abs().max() > 1e-2
    assert (got["original"] - got["fill"]).abs().max() > 1e-2
    names = "masked_content must be one of original, latent_noise, fill; got 'blur'"
    with pytest.raises(ValueError, match=names):
        go(pipe, "sd15", init_image=im, mask=mask, masked_content="blur")
    # fill: the masked pixels take the unmasked region's mean colour
    filled = img2img.fill(x, mk)
    mean = x[..., : w // 2].mean(dim=(2, 3))  # [1, 3]
    torch.testing.assert_close(filled[..., w // 2 :], mean[..., None, None].expand(1, 3, h, w - w // 2))
    assert torch.equal(filled[..., : w // 2], x[..., : w // 2])


def test_mask_inputs_and_errors():
    pipe = tiny("sd15")
    w, h = SIZE["sd15"]
    im = picture(w, h, seed=6)
    with pytest.warns(UserWarning, match="mask is 64x48, the output 32x24"):
        go(pipe, "sd15", init_image=im, mask=box_mask(64, 48), strength=0.5)
    with pytest.raises(ValueError, match="mask is 64x48"):
        go(pipe, "sd15", init_image=im, mask=box_mask(64, 48), strict_size=True)
    with pytest.raises(ValueError, match="a mask needs an init_image"):
        go(pipe, "sd15", mask=box_mask(w, h))
    with pytest.raises(ValueError, match=r"mask_blur must be .* got -1"):
        go(pipe, "sd15", init_image=im, mask=box_mask(w, h), mask_blur=-1)
    alpha = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    alpha.paste((0, 0, 0, 255), (0, 0, w // 2, h))
    with pytest.raises(ValueError, match="alpha channel only"):
        go(pipe, "sd15", init_image=im, mask=alpha)
    # RGB and tensor masks mean the same as the grey one
    grey = img2img.to_mask(box_mask(w, h), 1, w, h)
    assert torch.equal(img2img.to_mask(box_mask(w, h).convert("RGB"), 1, w, h), grey)
    assert torch.equal(img2img.to_mask(grey[0, 0], 2, w, h), grey.expand(2, 1, h, w))


def test_blur():
    m = torch.zeros(1, 1, 40, 40)
    m[..., 15:25, 15:25] = 1
    assert torch.equal(img2img.blur(m, 0), m)
    b = img2img.blur(m, 4.0)  # kernel 2·⌊2.5·4 + 0.5⌋ + 1 = 21 taps
    assert b[..., 20, 20] < 1 and b[..., 20, 14] > 0 and b[..., 20, 5] > 0 and b[..., 20, 4] == 0
    torch.testing.assert_close(b.sum(), m.sum())  # a normalised kernel away from the edges


# -- every sampler -----------------------------------------------------------------------------------------


class Gaussian:
    """The exact denoiser of N(0, I) data: VP x = x₀ + σε gives x/(1 + σ²); flow x = (1 − σ)x₀ + σε gives
    (1 − σ)x/((1 − σ)² + σ²)."""

    def __init__(self, model_sampling):
        self.model_sampling = model_sampling

    def __call__(self, x, sigma, **kw):
        s = sigma.reshape(-1, 1, 1, 1).to(x)
        if self.model_sampling.is_flow:
            return (1 - s) * x / ((1 - s) ** 2 + s**2)
        return x / (1 + s**2)


@pytest.mark.parametrize("ms", [DiscreteVP(), DiscreteFlow(shift=3.0)], ids=["vp", "flow"])
def test_inpaint_denoiser_works_for_every_sampler(ms):
    # The sampler's own state (before `finish`) lands on the image in the known region for every sampler:
    # the wrapper alone keeps the known region on the image's noising path.
    torch.manual_seed(0)
    z, noise = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    m = torch.zeros(2, 1, 6, 6)
    m[..., 3:] = 1
    keep = (m == 0).expand_as(z)
    for name in SAMPLER_NAMES:
        sigmas = sigmas_for(name, "karras" if not ms.is_flow else "simple", ms, 8)
        model = img2img.InpaintDenoiser(Gaussian(ms), m, z, noise)
        x = ms.noise_scaling(sigmas[0], noise, z)
        out = SAMPLERS[name](model, x, sigmas, disable=True)
        # dpm_fast/dpm_adaptive stop at the last σ > 0 (k-diffusion), ComfyUI's UniPC at σ = 0.001: there
        # the known region is the image noised to that σ; `finish` then sets it to the image
        end = {"dpm_fast": sigmas[-2], "dpm_adaptive": sigmas[-2]}.get(name, 0.0)
        target = ms.noise_scaling(torch.as_tensor(end), noise, z)
        tol = 2e-2 if name.startswith("uni_pc") else 1e-3
        err = (out[keep] - target[keep]).abs().max()
        assert err < tol, (name, float(err))
        assert (out[~keep] - z[~keep]).abs().max() > 0.1, name


# -- the command line --------------------------------------------------------------------------------------


def test_cli_img2img_and_inpainting(tmp_path, capsys):
    pipe = tiny("sd15")
    path, _ = _save(pipe, "sd15", tmp_path)
    w, h = SIZE["sd15"]
    im = picture(w, h, seed=7)
    im.save(tmp_path / "init.png")
    box_mask(w, h).save(tmp_path / "mask.png")
    out = tmp_path / "out"
    base = ["generate", "x", "--model", path, "--steps", "2", "--quiet", "--out", str(out)]
    init = ["--init-image", str(tmp_path / "init.png")]
    assert main(base + init + ["--strength", "0.5"]) == 0
    png = capsys.readouterr().out.strip().splitlines()[-1]
    text = Image.open(png).text["parameters"]
    assert "Denoising strength: 0.5" in text and "Mask blur" not in text and f"Size: {w}x{h}" in text

    assert main(base + init + ["--mask", str(tmp_path / "mask.png"), "--mask-blur", "2"]) == 0
    png = capsys.readouterr().out.strip().splitlines()[-1]
    got = Image.open(png)
    assert "Denoising strength: 0.75" in got.text["parameters"] and "Mask blur: 2" in got.text["parameters"]
    soft = img2img.blur(img2img.to_mask(box_mask(w, h), 1, w, h), 2.0)[0, 0].numpy()
    assert (np.asarray(got.convert("RGB"))[soft == 0] == np.asarray(im)[soft == 0]).all()

    # bad input: one line naming the value and what is accepted, exit status 2
    (tmp_path / "notes.txt").write_text("not an image")
    cases = [
        (init[:1] + [str(tmp_path / "nope.png")], "nope.png' does not exist; expected an image file"),
        (init[:1] + [str(tmp_path / "notes.txt")], "notes.txt' is not a readable image"),
        (["--strength", "0.5"], "--strength needs --init-image"),
        (init + ["--strength", "1.5"], "--strength 1.5 is out of range"),
        (init + ["--mask-blur", "3"], "--mask-blur needs --mask"),
        (init + ["--mask", str(tmp_path / "notes.txt")], "--mask .*notes.txt' is not a readable image"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error: ") and __import__("re").search(message, err), (extra, err)
    with pytest.raises(SystemExit):  # argparse's choices: "invalid choice: 'blur' (choose from ...)"
        main(base + init + ["--masked-content", "blur", "--mask", str(tmp_path / "mask.png")])
    assert "choose from 'original', 'latent_noise', 'fill'" in capsys.readouterr().err
