"""LoRAs in generation: `<lora:name:w>` tags and `loras=` on a tiny random sd15 Pipeline (test_lora.sd15)
with a kohya-layout LoRA file in a LoRA folder; the CLI's --lora-dir/--lora; the server's /sdapi/v1/loras."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from test_lora import sd15, write_sd15_lora

from latentforge import lora as L
from latentforge.checkpoints import save_checkpoint
from latentforge.cli import main
from latentforge.infotext import build, parse
from latentforge.pipeline import Pipeline

GEN = {"steps": 3, "width": 16, "height": 16, "seed": 1, "progress": False}
PROMPT = "a red cube"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(pipeline with lora_dir set, the LoRA folder, the LoRA file, the base latents)."""
    root = tmp_path_factory.mktemp("lora_pipeline")
    lora_dir = root / "loras"
    lora_dir.mkdir()
    pipe = sd15()
    path = lora_dir / "style.safetensors"
    write_sd15_lora(pipe, path, "kohya")
    pipe.lora_dir = str(lora_dir)
    base = pipe.sample(PROMPT, **GEN)
    return pipe, lora_dir, path, base


def addnet_hash(path) -> str:
    """A1111's LoRA hash, computed here independently: SHA-256 of the bytes after the safetensors header."""
    data = open(path, "rb").read()
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n :]).hexdigest()


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_tag_equals_explicit_patch_and_merge(setup):
    pipe, _, path, base = setup
    tagged = pipe.sample(f"{PROMPT} <lora:style:0.5:0.8>", **GEN)  # A1111 order: te 0.5, unet 0.8
    assert rel(tagged, base) > 1e-2  # the LoRA changes the output
    net = L.read_lora(path)
    with L.apply(pipe, net, unet_scale=0.8, te_scale=0.5):  # what the tag does: the same arithmetic
        assert torch.equal(pipe.sample(PROMPT, **GEN), tagged)
    with L.merge(pipe, net, unet_scale=0.8, te_scale=0.5):
        merged = pipe.sample(PROMPT, **GEN)
    with L.patch(pipe, net, unet_scale=0.8, te_scale=0.5):
        patched = pipe.sample(PROMPT, **GEN)
    assert rel(patched, tagged) < 1e-4, rel(patched, tagged)
    # merge adds ΔW to W (rounded once to float32); the patch adds s·up(down(x)) to W·x: the two orders of
    # float32 arithmetic differ by ~1e-7 relative per layer, 5e-6 measured after 3 steps; the LoRA itself
    # moves the output by ~0.5
    assert rel(merged, tagged) < 1e-4, rel(merged, tagged)
    assert torch.equal(pipe.sample(PROMPT, loras=[(path, 0.8, 0.5)], **GEN), tagged)  # loras= from Python
    assert torch.equal(pipe.sample(PROMPT, loras=[(net, 0.8, 0.5)], **GEN), tagged)


def test_nothing_persists_after_the_call(setup):
    pipe, _, _, base = setup
    weights = {k: v.clone() for c in ("unet", "clip_l") for k, v in pipe.components[c].state_dict().items()}
    pipe.sample(f"<lora:style:1> {PROMPT}", **GEN)
    with pytest.raises(ValueError, match="steps"):  # a call that fails after the patch: removed too
        pipe.sample(f"<lora:style:1> {PROMPT}", **{**GEN, "steps": 0})
    assert torch.equal(pipe.sample(PROMPT, **GEN), base)
    for c in ("unet", "clip_l"):
        for k, v in pipe.components[c].state_dict().items():
            assert torch.equal(v, weights[k]), k
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in pipe.components["unet"].modules())


def test_weight_zero_equals_base(setup):
    pipe, _, _, base = setup
    assert torch.equal(pipe.sample(f"{PROMPT}<lora:style:0>", **GEN), base)
    # the tag is removed from the text: the same as writing the prompt without it
    assert torch.equal(pipe.sample(f"{PROMPT}<lora:style:0:0>", **GEN), base)


def test_missing_name_and_bad_batches(setup):
    pipe, lora_dir, _, _ = setup
    with pytest.raises(L.LoRAError, match=r"'nope'.*it has: 'style'"):
        pipe.sample(f"{PROMPT} <lora:nope:1>", **GEN)
    for k in range(7):  # a folder of many: the closest names come first
        shutil.copy(
            os.path.join(lora_dir, "style.safetensors"), os.path.join(lora_dir, f"other{k}.safetensors")
        )
    with pytest.raises(L.LoRAError, match=r"'styel'.*closest names: 'style' \(of 8 LoRAs\)"):
        pipe.sample(f"{PROMPT} <lora:styel:1>", **GEN)
    for k in range(7):
        os.remove(os.path.join(lora_dir, f"other{k}.safetensors"))
    with pytest.raises(L.LoRAError, match="letters, digits"):
        pipe.sample(f"{PROMPT} <lora:../style:1>", **GEN)
    with pytest.raises(L.LoRAError, match="same ones"):
        pipe.sample([f"{PROMPT} <lora:style:1>", PROMPT], **{**GEN, "batch_size": 2})
    with pytest.raises(L.LoRAError, match="negative_prompt"):
        pipe.sample(PROMPT, negative_prompt="<lora:style:1>", **GEN)
    bare = Pipeline(pipe.family, pipe.components)  # no lora_dir
    with pytest.raises(L.LoRAError, match="no LoRA folder"):
        bare.sample(f"{PROMPT} <lora:style:1>", **GEN)
    # the same tags in every prompt of a batch: fine
    pipe.job_steps(["a <lora:style:1>", "b <lora:style:1>"], batch_size=2, steps=2)


def test_lora_hashes(setup):
    pipe, _, path, _ = setup
    short = addnet_hash(path)[:12]
    assert pipe.lora_hashes(f"{PROMPT} <lora:style:0.7>") == f"style: {short}"
    assert pipe.lora_hashes(PROMPT) is None
    assert pipe.lora_hashes(PROMPT, loras=[(str(path), 1.0)]) == f"style: {short}"
    text = build(f"{PROMPT} <lora:style:1>", "", {"Steps": 3, "Seed": 1, "Lora hashes": f"style: {short}"})
    assert parse(text)["Lora hashes"] == f"style: {short}"  # quoted (it holds ':'), read back as A1111 does


@pytest.fixture(scope="module")
def model_file(setup, tmp_path_factory):
    pipe = setup[0]
    d = tmp_path_factory.mktemp("models")
    save_checkpoint(str(d / "tiny.safetensors"), "sd15", pipe.components, pipe.configs)
    return d / "tiny.safetensors"


def test_cli(setup, model_file, tmp_path, capsys):
    _, lora_dir, path, _ = setup
    common = ["--model", str(model_file), "--steps", "2", "--width", "16", "--height", "16", "--quiet"]
    assert main(["generate", f"{PROMPT} <lora:style:0.8>", "--lora-dir", str(lora_dir), "--out",
                 str(tmp_path / "a"), *common]) == 0  # fmt: skip
    assert main(["generate", PROMPT, "--lora", f"{path}:0.8", "--out", str(tmp_path / "b"), *common]) == 0
    assert main(["generate", PROMPT, "--out", str(tmp_path / "c"), *common]) == 0
    (a,), (b,), (c,) = (sorted((tmp_path / x).glob("*.png")) for x in "abc")
    fields = parse(Image.open(a).text["parameters"])
    assert fields["Lora hashes"] == f"style: {addnet_hash(path)[:12]}"
    assert fields["Prompt"] == f"{PROMPT} <lora:style:0.8>"  # A1111 keeps the tags in the infotext
    assert "Lora hashes" not in parse(Image.open(c).text["parameters"])
    pixels = [torch.from_numpy(np.array(Image.open(p))) for p in (a, b, c)]
    assert torch.equal(pixels[0], pixels[1]) and not torch.equal(pixels[0], pixels[2])
    capsys.readouterr()
    bad = [
        (["x <lora:nope:1>", "--lora-dir", str(lora_dir)], "'nope'"),
        (["x <lora:style:1>"], "--lora-dir"),
        (["x", "--lora", str(tmp_path / "missing.safetensors:0.5")], "missing.safetensors"),
        (["x <lora:style:a:b:c>", "--lora-dir", str(lora_dir)], "bad LoRA tag"),
    ]
    for argv, named in bad:
        assert main(["generate", *argv, "--out", str(tmp_path / "d"), *common]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and named in err, err


def test_server(setup, model_file, tmp_path):
    from fastapi.testclient import TestClient

    from latentforge.server import Settings
    from latentforge.server.app import Server, build_app
    from latentforge.server.jobs import Job

    _, lora_dir, path, _ = setup
    loras = tmp_path / "loras"
    loras.mkdir()
    shutil.copy(path, loras / "style.safetensors")
    settings = Settings(models_dir=str(model_file.parent), model="tiny", lora_dir=str(loras))
    with TestClient(build_app(settings)) as client:
        listed = client.get("/sdapi/v1/loras").json()
        assert listed == [{"name": "style", "alias": "style", "path": "style.safetensors", "metadata": {}}]
        shutil.copy(path, loras / "second.safetensors")
        assert len(client.get("/sdapi/v1/loras").json()) == 1
        assert client.post("/sdapi/v1/refresh-loras").status_code == 200
        assert [e["name"] for e in client.get("/sdapi/v1/loras").json()] == ["second", "style"]
        req = {"prompt": f"{PROMPT} <lora:style:1>", "steps": 2, "width": 16, "height": 16, "seed": 3}
        r = client.post("/sdapi/v1/txt2img", json=req)
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert parse(info["infotexts"][0])["Lora hashes"] == f"style: {addnet_hash(path)[:12]}"
        r = client.post("/sdapi/v1/txt2img", json=req | {"prompt": "x <lora:nope:1>"})
        assert (
            r.status_code == 422 and "'nope'" in r.text and r.json()["detail"][0]["loc"] == ["body", "prompt"]
        )
    key = Server.batch_key
    kw = {"steps": 2, "sampler": "euler", "scheduler": "normal", "cfg": 7, "width": 16, "height": 16}
    jobs = [
        Job("txt2img", "m", kw | {"prompt": p})
        for p in ("a <lora:s:1>", "b <lora:s:1>", "a <lora:s:0.5>", "a")
    ]
    keys = [key(j) for j in jobs]
    assert keys[0] == keys[1] and len({keys[0], keys[2], keys[3]}) == 3
