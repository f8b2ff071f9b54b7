"""Metadata that replays (issue 12): A1111's `parameters` text read as A1111 reads it, latentforge's exact
JSON chunk, `generate --from-image`, `info IMAGE`, and output names.

The A1111 texts below are A1111's own documented examples (ecosystem.md §2a: the docstring of
`parse_generation_parameters`, a v1.5.1 line quoted in diffusers#6295) and lines in the layout of A1111
1.9+ (`Schedule type`, `Hires ...`), with sampler labels and their default schedules from A1111's sampler
table (`sd_samplers_kdiffusion`)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from latentforge import infotext, outputs
from latentforge.cli import main
from latentforge.shapes import complete_layout

DOCSTRING = (
    "girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, by "
    "Alphonse Mucha and Charlie Bowater, ((fashion photography)), ((highly detailed)), (wrinkled fabric)\n"
    "Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, poorly "
    "drawn face, mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing\n"
    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"
)
V151 = (
    "a photo of an astronaut\n"
    "Steps: 25, Sampler: DPM++ 2M SDE Karras, CFG scale: 3, Seed: 42, Size: 1344x768, "
    "Model hash: 1fe6c7ec54, Model: Juggernaut_XL_6, Version: v1.5.1"
)


def test_a1111_docstring_example():
    f = infotext.parse(DOCSTRING)
    assert f["Prompt"].startswith("girl with an artist's beret") and f["Prompt"].endswith("(wrinkled fabric)")
    assert f["Negative prompt"].startswith("ugly, fat") and f["Negative prompt"].endswith("messy drawing")
    assert (f["Steps"], f["Sampler"], f["CFG scale"], f["Seed"]) == ("20", "Euler a", "7", "965400086")
    gen, ignored = infotext.generation(f)
    want = {"steps": 20, "sampler": "euler_ancestral", "scheduler": "normal", "cfg": 7.0, "seed": 965400086}
    assert {k: gen[k] for k in want} == want and (gen["width"], gen["height"]) == (512, 512)
    assert ignored == []


@pytest.mark.parametrize(
    "sampler, schedule, want",
    [
        ("DPM++ 2M SDE Karras", None, ("dpmpp_2m_sde", "karras")),  # before 1.9: the schedule in the label
        ("DPM++ 2M Karras", None, ("dpmpp_2m", "karras")),
        ("DPM++ 3M SDE Exponential", None, ("dpmpp_3m_sde", "exponential")),
        ("DPM++ 2M", "Karras", ("dpmpp_2m", "karras")),  # 1.9+: a separate Schedule type
        ("DPM++ 2M", None, ("dpmpp_2m", "karras")),  # missing = Automatic = the sampler's default
        ("DPM++ 2M", "Automatic", ("dpmpp_2m", "karras")),
        ("DPM++ 2M SDE", "Automatic", ("dpmpp_2m_sde", "exponential")),
        ("Euler a", "Automatic", ("euler_ancestral", "normal")),
        ("Euler", "SGM Uniform", ("euler", "sgm_uniform")),
        ("DPM2 a", None, ("dpm_2_ancestral", "karras")),
        ("UniPC", "Uniform", ("uni_pc", "normal")),
        ("DDIM", "Automatic", ("ddim", "ddim_uniform")),
        ("dpmpp_2m", "beta", ("dpmpp_2m", "beta")),  # latentforge's own names read back too
    ],
)
def test_sampler_labels_map_to_latentforge(sampler, schedule, want):
    assert infotext.sampler_and_schedule(sampler, schedule) == want


def test_v151_line_and_unknown_settings():
    gen, ignored = infotext.generation(infotext.parse(V151))
    assert (gen["sampler"], gen["scheduler"], gen["width"], gen["height"]) == (
        "dpmpp_2m_sde",
        "karras",
        1344,
        768,
    )
    assert ignored == []
    with pytest.raises(ValueError, match="sampler 'PLMS' is not one latentforge has"):
        infotext.generation(infotext.parse("p\nSteps: 20, Sampler: PLMS, CFG scale: 7, Seed: 1"))
    with pytest.raises(ValueError, match="Clip skip 2"):
        infotext.generation(infotext.parse("p\nSteps: 20, Sampler: Euler, Seed: 1, Clip skip: 2"))
    with pytest.raises(ValueError, match="'Size' is '512by512'; expected WIDTHxHEIGHT"):
        infotext.generation(infotext.parse("p\nSteps: 20, Sampler: Euler, Size: 512by512"))


def test_quoted_values_multiline_prompts_and_short_last_lines():
    text = infotext.build(
        "line one\nline two: with a colon",
        "bad\nworse",
        {"Steps": 4, "Lora hashes": "a: 1f, b: 2e", "Seed": 3, "Note": "x\ny"},
    )
    f = infotext.parse(text)
    assert f["Prompt"] == "line one\nline two: with a colon" and f["Negative prompt"] == "bad\nworse"
    assert f["Lora hashes"] == "a: 1f, b: 2e" and f["Note"] == "x\ny" and f["Seed"] == "3"
    # reported, never dropped silently; "Lora hashes" only identifies the files of the <lora:...> tags,
    # which replay the LoRAs themselves (a tag without --lora-dir is an error, not a silent no-op)
    assert infotext.generation(f)[1] == ["Note"]
    # a last line with fewer than 3 key: value pairs is prompt text (A1111)
    f = infotext.parse("a cat\nstyle: oil, mood: calm")
    assert f["Prompt"] == "a cat\nstyle: oil, mood: calm" and "style" not in f


def test_hires_and_variation_fields():
    text = (
        "p\nSteps: 20, Sampler: Euler, Schedule type: Karras, CFG scale: 7, Seed: 5, Size: 512x512, "
        "Variation seed: 77, Variation seed strength: 0.25, Seed resize from: 768x512, "
        "Denoising strength: 0.55, "
        "Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent (nearest), Hires sampler: DPM++ 2M"
    )
    gen, ignored = infotext.generation(infotext.parse(text))
    assert ignored == []
    want = {"subseed": 77, "subseed_strength": 0.25, "seed_resize_from": (768, 512), "hires_scale": 2.0,
            "hires_steps": 10, "hires_upscaler": "Latent (nearest)", "hires_sampler": "dpmpp_2m",
            "hires_denoise": 0.55}  # fmt: skip
    assert {k: gen[k] for k in want} == want and "strength" not in gen
    img2img = infotext.generation(infotext.parse("p\nSteps: 20, Sampler: Euler, Denoising strength: 0.4"))[0]
    assert img2img["strength"] == 0.4 and "hires_denoise" not in img2img


def _png_with(path, text: str | None):
    info = PngImagePlugin.PngInfo()
    if text is not None:
        info.add_text("parameters", text)
    Image.new("RGB", (64, 64), (10, 20, 30)).save(path, pnginfo=info)
    return str(path)


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_replay_our_png_is_pixel_identical_and_flags_win(tmp_path, capsys):
    out, again, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    flags = ["--steps", "3", "--batch-size", "2", "--subseed", "9", "--subseed-strength", "0.4", "--quiet"]
    assert main(["generate", "a small green star", "--out", str(out), *flags, "--seed", "20"]) == 0
    made = sorted(os.listdir(out))
    assert made == ["00000-20.png", "00001-21.png"]
    assert main(["generate", "--from-image", str(out / made[1]), "--out", str(again), "--quiet"]) == 0
    assert os.listdir(again) == ["00000-21.png"]
    assert np.array_equal(_pixels(out / made[1]), _pixels(again / "00000-21.png"))  # image 1 of its batch
    text = Image.open(again / "00000-21.png").text["parameters"]
    assert "Seed: 21," in text and "Variation seed: 10, Variation seed strength: 0.4" in text
    assert "RNG: CPU" in text  # latentforge draws on the CPU by default (A1111 writes nothing for GPU)
    assert (
        main(["generate", "--from-image", str(out / made[0]), "--steps", "2", "--out", str(other), "--quiet"])
        == 0
    )
    text = Image.open(other / "00000-20.png").text["parameters"]
    shipped = _shipped_defaults()  # made[0] used the model's sampler and CFG; the replay keeps them
    label, cfg = infotext.sampler_label(shipped["sampler"]), float(shipped["cfg"])
    # and its prompt as the model completed it from seed 20 (the default model's default: the layout)
    prompt = complete_layout("a small green star", np.random.default_rng(20))
    assert text.startswith(f"{prompt}\nSteps: 2, Sampler: {label}, Schedule type: Normal, CFG scale: {cfg}")


def test_replay_an_a1111_png(tmp_path, capsys):
    """A1111's text names the sampler by its label with the schedule in it; the replay is the same image as
    generating with latentforge's names directly."""
    src = _png_with(
        tmp_path / "a1111.png",
        "a big red circle\nNegative prompt: blue\nSteps: 3, Sampler: DPM++ 2M Karras, CFG scale: 5, Seed: 8, "
        "Size: 64x64, Model hash: 0123456789, Model: someone_else, Version: v1.6.0",
    )
    assert main(["generate", "--from-image", src, "--out", str(tmp_path / "r"), "--quiet"]) == 0
    assert "was made with model someone_else (hash 0123456789)" in capsys.readouterr().err
    direct = ["generate", "a big red circle", "--negative", "blue", "--steps", "3", "--sampler", "dpmpp_2m"]
    direct += ["--scheduler", "karras", "--cfg", "5", "--seed", "8", "--out", str(tmp_path / "d"), "--quiet"]
    assert main(direct) == 0
    assert np.array_equal(_pixels(tmp_path / "r" / "00000-8.png"), _pixels(tmp_path / "d" / "00000-8.png"))
    text = Image.open(tmp_path / "r" / "00000-8.png").text["parameters"]
    assert "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.0, Seed: 8" in text


def test_from_image_without_parameters_and_info(tmp_path, capsys):
    bare = _png_with(tmp_path / "bare.png", None)
    assert main(["generate", "--from-image", bare, "--out", str(tmp_path / "o")]) == 2
    assert "has no generation parameters" in capsys.readouterr().err
    assert main(["info", bare]) == 2
    src = _png_with(tmp_path / "v.png", V151)
    assert main(["info", src]) == 0
    out = capsys.readouterr().out
    assert '"sampler": "dpmpp_2m_sde"' in out and '"Model": "Juggernaut_XL_6"' in out


def test_output_names(tmp_path):
    im = Image.new("RGB", (8, 8))
    fields = {"prompt": 'a/b: "c"\nd', "steps": 3}
    p1 = outputs.save_png(im, str(tmp_path), "t", 7, "{seed}-{prompt:8}-{steps}", fields)
    p2 = outputs.save_png(im, str(tmp_path), "t", 7, "{seed}-{prompt:8}-{steps}", fields)
    assert os.path.basename(p1) == "7-a_b_ _c_-3.png" and os.path.basename(p2) == "7-a_b_ _c_-3-1.png"
    assert outputs.save_png(im, str(tmp_path), "t", 7).endswith("00000-7.png")  # the default: A1111's
    assert outputs.save_png(im, str(tmp_path), "t", 7).endswith("00001-7.png")
    for bad, msg in [("{foo}", "unknown field {foo}"), ("a/{seed}", "names a folder"), ("", "non-empty")]:
        with pytest.raises(ValueError, match=msg):
            outputs.check_name(bad)


def test_rng_source():
    """A1111 writes "RNG: CPU" for its CPU source and nothing for the GPU default; "NV" is not ours."""
    base = "p\nSteps: 20, Sampler: Euler, Seed: 1"
    assert infotext.generation(infotext.parse(base + ", RNG: CPU"))[0]["rng"] == "cpu"
    assert infotext.generation(infotext.parse(base))[0]["rng"] == "device"
    with pytest.raises(ValueError, match="RNG 'NV' is not one latentforge has"):
        infotext.generation(infotext.parse(base + ", RNG: NV"))


def test_token_merging_ratio_replays():
    """A1111 writes "Token merging ratio: r" (and "... hr" for the hires pass) when ToMe is on; ours has one
    ratio for both passes, so a differing hr ratio is reported as not replayed."""
    line = "p\nSteps: 20, Sampler: Euler, Seed: 1, Size: 512x512, Token merging ratio: 0.3"
    gen, ignored = infotext.generation(infotext.parse(line))
    assert gen["tome_ratio"] == 0.3 and ignored == []
    gen, ignored = infotext.generation(infotext.parse(line + ", Token merging ratio hr: 0.3"))
    assert gen["tome_ratio"] == 0.3 and ignored == []
    gen, ignored = infotext.generation(infotext.parse(line + ", Token merging ratio hr: 0.5"))
    assert gen["tome_ratio"] == 0.3 and ignored == ["Token merging ratio hr"]


def _shipped_defaults() -> dict:
    """The generation defaults the shipped model's file states (latentforge.defaults; MODEL_CARD.md)."""
    import json

    from latentforge.checkpoint_io import read_metadata
    from latentforge.pipeline import DEFAULT_MODEL

    return json.loads(read_metadata(DEFAULT_MODEL)["latentforge.defaults"])


def test_complete_prompt_field_replays_and_bad_values_are_named():
    text = "a red circle\nSteps: 3, Sampler: Euler, Seed: 1, Complete prompt: {}"
    gen, unused = infotext.generation(infotext.parse(text.format("none")))
    assert gen["complete_prompt"] == "none" and "Complete prompt" not in unused
    with pytest.raises(ValueError, match="Complete prompt 'maybe'; known: none, background, layout"):
        infotext.generation(infotext.parse(text.format("maybe")))
