"""The shipped default model (latentforge/data/shapes64.safetensors, MODEL_CARD.md): it loads strictly, in
the original layouts, and generates from every entry point without a --model; the slow test reproduces the
model card's 1-object validation cell."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from latentforge.cli import main
from latentforge.pipeline import DEFAULT_MODEL, FAST_MODEL, Pipeline
from latentforge.shapes.render import POSITIONS


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.default()


def test_the_file_ships_in_the_original_layouts_within_40_mb():
    assert os.path.getsize(DEFAULT_MODEL) <= 40 * 2**20
    with safe_open(DEFAULT_MODEL, "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    prefixes = {k.split(".")[0] for k in keys}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}  # SD1 single-file layout
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "first_stage_model.decoder.conv_out.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    assert json.loads(meta["latentforge.defaults"])["steps"] == 20


def test_loads_strictly_and_generates_64px_images(pipe):
    assert pipe.family == "sd15" and set(pipe.components) == {"unet", "vae", "clip_l"}
    assert pipe.default_size == (64, 64) and not pipe.pixel_space
    assert all(p.dtype == torch.float32 for p in pipe.net.parameters())  # loaded as float32 by default
    images = pipe(["a big red circle in the center", "a small blue star"], batch_size=2, steps=4)
    assert [im.size for im in images] == [(64, 64)] * 2
    a = np.asarray(images[0]).astype(float)
    assert a.std() > 5  # not a flat image: a shape on a background
    # image k depends on seed + k only, not on the batch
    (alone,) = pipe("a small blue star", seed=1, steps=4)
    assert np.abs(np.asarray(alone).astype(int) - np.asarray(images[1]).astype(int)).max() <= 1


def test_generate_without_model_uses_the_default(tmp_path):
    out = tmp_path / "out"
    assert (
        main(["generate", "a small yellow star in the center", "--steps", "3", "--out", str(out), "--quiet"])
        == 0
    )
    (png,) = out.glob("*.png")
    im = Image.open(png)
    assert im.size == (64, 64)
    text = im.info["parameters"]
    assert "Model: shapes64" in text and "Steps: 3" in text and "CFG scale" in text


def test_generate_completes_the_prompt_and_saves_the_prompt_it_used(tmp_path):
    from latentforge.shapes import complete_prompt, parse

    prompt = "a big red circle left of a blue star"
    flags = ["--steps", "2", "--seed", "7", "--quiet"]  # the default model completes the layout by default
    assert main(["generate", prompt, *flags, "--batch-size", "2", "--out", str(tmp_path / "a")]) == 0
    pngs = sorted((tmp_path / "a").glob("*.png"))
    texts = [Image.open(p).info["parameters"] for p in pngs]
    saved = [t.split("\n")[0] for t in texts]
    # image k's saved prompt is the completion drawn from its seed 7 + k: every position and the background
    assert saved == [complete_prompt(prompt, "layout", np.random.default_rng(7 + k)) for k in range(2)]
    for t in saved:
        big, star = parse(t).objects
        assert parse(t).background not in (None, "red", "blue") and big.size == "large" and star.size is None
        assert POSITIONS[big.position][1] < POSITIONS[star.position][1]  # left of: a smaller column
    assert all("Complete prompt: layout" in t for t in texts)
    # replaying the saved prompt with completion off makes the same image (the batch of one's numerics)
    off = ["--complete-prompt", "none"]
    assert main(["generate", saved[0], *flags, *off, "--out", str(tmp_path / "b")]) == 0
    (again,) = (tmp_path / "b").glob("*.png")
    assert main(["generate", prompt, *flags, "--out", str(tmp_path / "c")]) == 0
    (first,) = (tmp_path / "c").glob("*.png")
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    # background only; a stated background then, or text outside the grammar, is given as written
    for text in ("a big red circle on a blue background", "a cat on a sofa"):
        out = tmp_path / str(len(text))
        assert main(["generate", text, *flags, "--complete-background", "--out", str(out)]) == 0
        (png,) = out.glob("*.png")
        assert Image.open(png).info["parameters"].split("\n")[0] == text
    # off: the prompt as written, and the image says so, so that --from-image replays it off too
    assert main(["generate", prompt, *flags, *off, "--out", str(tmp_path / "off")]) == 0
    (png,) = (tmp_path / "off").glob("*.png")
    text = Image.open(png).info["parameters"]
    assert text.split("\n")[0] == prompt and "Complete prompt: none" in text
    assert main(["generate", "--from-image", str(png), "--quiet", "--out", str(tmp_path / "re")]) == 0
    (re,) = (tmp_path / "re").glob("*.png")
    assert Image.open(re).info["parameters"].split("\n")[0] == prompt
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(re)))


def test_the_default_model_completes_text_to_image_prompts_only(pipe):
    """Pipeline: the default model's file asks for the layout completion; each image's is drawn from its own
    seed (image_prompts says which), so the batch does not matter; "none", an init image, or text outside
    the grammar leave the prompt as given."""
    from latentforge.shapes import complete_layout

    assert pipe.defaults["complete_prompt"] == "layout"
    prompt = "a small blue star and a big red circle"
    used = pipe.image_prompts(prompt, seed=40, batch_size=2, batch_count=2)
    assert used == [complete_layout(prompt, np.random.default_rng(40 + k)) for k in range(4)]
    assert pipe.image_prompts([prompt, "a cat"], seed=[9, 3], batch_size=2)[1] == "a cat"
    done = pipe(prompt, seed=40, batch_size=2, steps=2)
    given = pipe(used[:2], seed=40, batch_size=2, steps=2, complete_prompt="none")
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(done, given, strict=True))
    assert pipe.image_prompts(prompt, seed=40, complete_prompt="none") == [prompt]
    assert pipe.image_prompts(prompt, seed=40, init_image=done[0]) == [prompt]
    with pytest.raises(ValueError, match="complete_prompt must be one of none, background, layout .* 'yes'"):
        pipe(prompt, complete_prompt="yes")


def test_a_prompt_outside_the_grammar_still_generates_and_eval_counts_it_unparsed(tmp_path, pipe):
    from latentforge.shapes.evaluate import evaluate_folder

    (im,) = pipe("a photograph of a cat on a sofa", steps=3)
    assert im.size == (64, 64)
    folder = tmp_path / "imgs"
    folder.mkdir()
    im.save(folder / "0.png")
    (folder / "0.txt").write_text("a photograph of a cat on a sofa")
    (ok,) = pipe("a big red circle in the center", steps=3)
    ok.save(folder / "1.png")
    (folder / "1.txt").write_text("a big red circle in the center")
    report = evaluate_folder(str(folder))
    assert report["unparsed"]["count"] == 1 and report["n"] == 1  # scored: the shapes prompt only


def test_eval_and_demo_take_the_default_model(tmp_path, capsys):
    from latentforge.shapes import caption, complete_layout, sample_scene

    report = tmp_path / "e.json"
    args = ["eval", "shapes", "--model", "default", "--n", "3", "--steps", "2", "--seed", "5"]
    assert main([*args, "--out", str(tmp_path / "e"), "--json", str(report)]) == 0
    assert len(list((tmp_path / "e").glob("*.png"))) == 3
    # the report says which prompts the model was given: the model's completion, image k's from seed + k
    rng = np.random.default_rng(5)
    prompts = [caption(sample_scene(rng, split="heldout"), rng) for _ in range(3)]
    done = sum(complete_layout(p, np.random.default_rng(5 + k)) != p for k, p in enumerate(prompts))
    assert json.loads(report.read_text())["prompt_completion"] == {"mode": "layout", "completed": done}
    lines = [json.loads(x) for x in (tmp_path / "e" / "metadata.jsonl").read_text().splitlines()]
    assert [x["text"] for x in lines] == prompts and sum("sampled_with" in x for x in lines) == done
    assert main(["demo", "--n", "0", "--out", str(tmp_path / "d")]) == 0
    grid = Image.open(tmp_path / "d" / "grid.png")
    assert grid.size == (4 * 64 * 2, 3 * 64 * 2)
    assert "grid.png" in capsys.readouterr().out


def test_defaults_come_from_the_file_and_unknown_ones_are_refused(pipe):
    meta_defaults = json.loads(safe_open(DEFAULT_MODEL, "pt").metadata()["latentforge.defaults"])
    assert pipe.defaults == meta_defaults
    with pytest.raises(ValueError, match="unknown settings"):
        Pipeline(pipe.family, pipe.components, defaults={"guidance": 3})


@pytest.mark.slow
def test_reproduces_the_model_cards_one_object_validation_cell(tmp_path):
    """MODEL_CARD.md: the 1-object validation cell at 20 steps, on a fresh sample of 300 prompts (about 100
    with one object). The card's interval is a Wilson 95% interval on its own sample; the fresh rate lands
    within 0.1 of it unless the model changed (a 100-prompt binomial sd is at most 0.05)."""
    from latentforge.shapes.evaluate import evaluate_folder

    card = json.loads(open(os.path.join(os.path.dirname(DEFAULT_MODEL), "shapes64.json")).read())
    lo, hi = card["validation"]["20"]["by_objects"]["1"]["ci95"]
    out = tmp_path / "v"
    args = ["eval", "shapes", "--model", "default", "--split", "validation", "--n", "300", "--seed", "12345"]
    assert main([*args, "--out", str(out)]) == 0
    report = evaluate_folder(str(out))
    one = report["by_objects"]["1"]
    assert one["n"] >= 60
    assert lo - 0.1 <= one["rate"] <= hi + 0.1


FAST_DEFAULTS = {"steps": 4, "sampler": "euler", "scheduler": "sgm_uniform", "cfg": 1.0}


def test_the_few_step_student_ships_as_a_denoiser_only_file_and_all_weights_fit_40_mb():
    data = os.path.dirname(DEFAULT_MODEL)
    total = sum(
        os.path.getsize(os.path.join(data, f)) for f in os.listdir(data) if f.endswith(".safetensors")
    )
    assert total <= 40 * 2**20
    with safe_open(FAST_MODEL, "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        assert {f.get_slice(k).get_dtype() for k in keys} == {"F16"}
    assert keys and all(k.startswith("model.diffusion_model.") for k in keys)
    assert json.loads(meta["latentforge.defaults"]) == FAST_DEFAULTS


def test_default_fast_is_the_default_model_with_the_students_denoiser(pipe):
    fast = Pipeline.default(fast=True)
    # the student's file states its sampling; the prompt completion stays the default file's
    assert fast.defaults == {**FAST_DEFAULTS, "complete_prompt": "layout"} and fast.source == FAST_MODEL
    with safe_open(FAST_MODEL, "pt") as f:  # its UNet is the student's (float16 weights, loaded as float32)
        w = f.get_tensor("model.diffusion_model.out.2.weight").float()
    assert torch.equal(fast.net.out[2].weight, w) and not torch.equal(pipe.net.out[2].weight, w)
    assert all(torch.equal(a, b) for a, b in zip(fast.vae.parameters(), pipe.vae.parameters(), strict=True))
    images = fast(["a big red circle in the center"], seed=3)  # its own defaults: 4 steps, CFG 1
    assert images[0].size == (64, 64) and np.asarray(images[0]).astype(float).std() > 5


def test_generate_takes_default_fast(tmp_path):
    out = tmp_path / "out"
    assert (
        main(["generate", "a small yellow star", "--model", "default-fast", "--out", str(out), "--quiet"])
        == 0
    )
    (png,) = out.glob("*.png")
    text = Image.open(png).info["parameters"]
    assert "Model: shapes64-fast" in text and "Steps: 4" in text and "Schedule type: SGM Uniform" in text


@pytest.mark.slow
def test_reproduces_the_model_cards_few_step_cell(tmp_path):
    """MODEL_CARD.md "Few steps": default-fast's all-correct rate at its own 4 steps on a fresh sample of 300
    validation prompts lands within 0.1 of the interval the card states (data/shapes64-fast.json, 900
    prompts; a 300-prompt binomial sd is at most 0.03). The stock model at 4 steps (55%) would mostly pass
    too; the point is that the shipped student keeps what the card says."""
    from latentforge.shapes.evaluate import evaluate_folder

    card = json.loads(open(os.path.join(os.path.dirname(DEFAULT_MODEL), "shapes64-fast.json")).read())
    lo, hi = card["all_correct_ci95"]
    out = tmp_path / "v"
    args = [
        "eval",
        "shapes",
        "--model",
        "default-fast",
        "--split",
        "validation",
        "--n",
        "300",
        "--seed",
        "12345",
    ]
    assert main([*args, "--out", str(out)]) == 0
    report = evaluate_folder(str(out))
    assert lo - 0.1 <= report["all_correct"] <= hi + 0.1


def test_the_shipped_file_serves_as_a_vae_file(pipe):
    # `train denoiser --vae FILE` / `generate --vae FILE` take a whole single-file checkpoint too: its VAE
    # (first_stage_model.*) and the file's measured latent scale, the rest left out
    from latentforge.checkpoints import load_vae_file

    vae, fmt = load_vae_file(DEFAULT_MODEL)
    assert fmt == pipe.latent_format
    mine = pipe.vae.state_dict()
    assert all(torch.equal(v, mine[k]) for k, v in vae.state_dict().items()) and len(mine) == len(
        vae.state_dict()
    )
