"""`latentforge serve`: A1111's API driven by a client nobody here wrote (the PyPI `webuiapi` package),
against a real server on a real port; its images compared with the same generation in-process.

The comparison is exact: the server runs the same Pipeline with the same seeds on the same CPU, and a PNG
round trip of 8-bit images is lossless.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import time

import numpy as np
import pytest
from PIL import Image

webuiapi = pytest.importorskip("webuiapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from latentforge.pipeline import DEFAULT_MODEL, Pipeline  # noqa: E402
from latentforge.server import Settings, running  # noqa: E402

PROMPT = "a big red circle in the upper left corner on a black background"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    shutil.copy(DEFAULT_MODEL, models / "other.safetensors")  # a second model to switch to
    settings = Settings(port=0, models_dir=str(models), outputs=str(models / "out"))
    with running(settings) as (url, app):
        yield url.rstrip("/"), int(url.rstrip("/").rsplit(":", 1)[1]), app


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.default()


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_webuiapi_txt2img_equals_the_same_generation_in_process(server, pipe):
    url, port, _ = server
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler", steps=4)
    r = api.txt2img(
        prompt=PROMPT, negative_prompt="", seed=11, cfg_scale=4, width=64, height=64, batch_size=2
    )
    assert len(r.images) == 2 and r.images[0].size == (64, 64)
    assert r.info["all_seeds"] == [11, 12]
    assert r.info["sampler_name"] == "Euler" and r.info["steps"] == 4
    assert r.parameters["prompt"] == PROMPT  # the request echoed back
    text = r.images[1].info["parameters"]  # the PNG's A1111 chunk is the infotext
    assert text == r.info["infotexts"][1] and "Seed: 12," in text and "Size: 64x64" in text
    ours = pipe(PROMPT, steps=4, sampler="euler", scheduler="normal", cfg=4, seed=11, batch_size=2)
    for got, want in zip(r.images, ours, strict=True):
        assert np.array_equal(_pixels(got), _pixels(want))


def test_webuiapi_img2img_equals_the_same_generation_in_process(server, pipe):
    _, port, _ = server
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="DPM++ 2M", scheduler="Karras", steps=6)
    init = pipe("a small blue square at the center on a white background", steps=4, seed=3)[0]
    r = api.img2img(images=[init], prompt=PROMPT, denoising_strength=0.5, seed=7, cfg_scale=4, width=64,
                    height=64)  # fmt: skip
    assert "Denoising strength: 0.5" in r.info["infotexts"][0]
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in r.info["infotexts"][0]
    ours = pipe(PROMPT, init_image=init, strength=0.5, steps=6, sampler="dpmpp_2m", scheduler="karras",
                cfg=4, seed=7)  # fmt: skip
    assert np.array_equal(_pixels(r.image), _pixels(ours[0]))
    assert r.parameters["init_images"] is None  # A1111 does not echo the images


def test_webuiapi_inpainting_keeps_the_unmasked_pixels(server):
    _, port, _ = server
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler", steps=4)
    from PIL import Image, ImageDraw

    init = Image.new("RGB", (64, 64), (255, 255, 255))
    ImageDraw.Draw(init).rectangle([4, 4, 20, 20], fill=(0, 0, 255))
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle([32, 32, 63, 63], fill=255)
    r = api.img2img(images=[init], mask_image=mask, prompt=PROMPT, denoising_strength=1.0, seed=2,
                    width=64, height=64, mask_blur=0, inpaint_full_res=False)  # fmt: skip
    got = _pixels(r.image)
    # outside the mask the original pixels are pasted back (A1111's overlay), exactly
    assert np.array_equal(got[:28, :28], _pixels(init)[:28, :28])
    assert "Mask blur: 0" in r.info["infotexts"][0]


def test_webuiapi_progress_and_interrupt(server):
    _, port, app = server
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler", steps=150)
    box = {}
    t = threading.Thread(target=lambda: box.update(r=api.txt2img(prompt=PROMPT, seed=1, width=64, height=64,
                                                                 batch_size=8)))  # fmt: skip
    t.start()
    seen = None
    deadline = time.time() + 60
    while time.time() < deadline:
        p = api.get_progress()
        if p["state"]["sampling_step"] >= 2 and p["current_image"]:
            seen = p
            break
        time.sleep(0.05)
    assert seen is not None, "no progress with a preview was reported"
    assert 0 < seen["progress"] < 1 and seen["state"]["sampling_steps"] == 150
    assert seen["state"]["job_count"] == 1 and seen["eta_relative"] > 0
    from PIL import Image

    preview = Image.open(io.BytesIO(base64.b64decode(seen["current_image"])))
    assert preview.size == (64, 64)
    api.interrupt()
    t.join(60)
    r = box["r"]
    assert r.info["interrupted"] is True and len(r.images) == 8  # the partial batch, as A1111 returns it
    assert api.get_progress()["state"]["job_count"] == 0  # idle again


def test_webuiapi_options_switch_the_model(server):
    _, port, _ = server
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler", steps=2)
    names = api.util_get_model_names()
    assert any(n.startswith("other.safetensors [") for n in names)
    assert any(n.startswith("shapes64.safetensors [") for n in names)
    title = next(n for n in names if n.startswith("other.safetensors"))
    api.util_set_model(title, find_closest=False)
    assert api.util_get_current_model() == title
    r = api.txt2img(prompt=PROMPT, seed=1, width=64, height=64)
    assert r.info["sd_model_name"] == "other"
    api.util_set_model(next(n for n in names if n.startswith("shapes64")), find_closest=False)
    assert api.util_get_current_model().startswith("shapes64")


def test_png_info_reads_the_parameters_back(server, pipe):
    url, port, _ = server
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler a", steps=3)
    r = api.txt2img(prompt=PROMPT, negative_prompt="blurry", seed=42, width=64, height=64, cfg_scale=5)
    info = api.png_info(r.image)
    assert info.info == r.info["infotexts"][0]  # webuiapi hands back the `info` text as it is
    raw = httpx.post(f"{url}/sdapi/v1/png-info", json={"image": r.json["images"][0]}).json()
    p = raw["parameters"]
    assert (p["Prompt"], p["Negative prompt"], p["Seed"], p["Sampler"]) == (PROMPT, "blurry", "42", "Euler a")
    assert (p["Steps"], p["CFG scale"], p["Size"]) == ("3", "5.0", "64x64")


def test_sampler_and_schedule_names_a1111_and_comfyui(server):
    url = server[0]
    names = {s["name"] for s in httpx.get(f"{url}/sdapi/v1/samplers").json()}
    assert {"Euler a", "DPM++ 2M", "DPM++ 2M SDE", "UniPC", "ipndm", "er_sde"} <= names
    scheds = {s["name"]: s["label"] for s in httpx.get(f"{url}/sdapi/v1/schedulers").json()}
    assert scheds["automatic"] == "Automatic" and scheds["karras"] == "Karras"
    base = {"prompt": PROMPT, "steps": 2, "seed": 5, "width": 64, "height": 64}
    infos = []
    for sampler, sched in (("DPM++ 2M Karras", None), ("dpmpp_2m", "karras"), ("dpm++ 2m", "Karras")):
        r = httpx.post(f"{url}/sdapi/v1/txt2img", json=base | {"sampler_name": sampler, "scheduler": sched},
                       timeout=60)  # fmt: skip
        assert r.status_code == 200, r.text
        infos.append(json.loads(r.json()["info"]))
        images = r.json()["images"]
    assert all(i["sampler_name"] == "DPM++ 2M" and i["scheduler"] == "karras" for i in infos)
    assert images
    r = httpx.post(f"{url}/sdapi/v1/txt2img", json=base | {"scheduler": "nope"}, timeout=60)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "scheduler"]


def test_defaults_follow_the_model_where_a1111_follows_its_settings(server):
    url = server[0]
    r = httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": PROMPT, "seed": 1}, timeout=60)
    info = json.loads(r.json()["info"])
    # the shipped model's file states 64×64, 20 steps and its CFG (MODEL_CARD.md); A1111 has no model size
    from latentforge.checkpoint_io import read_metadata
    from latentforge.pipeline import DEFAULT_MODEL

    stated = json.loads(read_metadata(DEFAULT_MODEL)["latentforge.defaults"])
    assert (info["width"], info["height"], info["steps"]) == (64, 64, stated["steps"])
    assert info["cfg_scale"] == stated["cfg"] != 7.0  # the model's, not A1111's default 7


def test_prompt_completion_follows_the_model_and_the_infotext_says_what_each_image_used(server, pipe):
    """The default model completes the prompt's layout (its file's default; Pipeline.image_prompts): the
    response's all_prompts and each image's infotext carry the completed prompt, the pixels are the
    in-process generation's, and `complete_prompt: "none"` turns it off and says so in the infotext."""
    from latentforge.shapes import complete_layout

    url = server[0]
    base = {"prompt": "a big red circle", "seed": 21, "steps": 2, "batch_size": 2, "width": 64, "height": 64}
    r = httpx.post(f"{url}/sdapi/v1/txt2img", json=base, timeout=60)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    want = [complete_layout(base["prompt"], np.random.default_rng(21 + k)) for k in range(2)]
    assert info["all_prompts"] == want and all(w != base["prompt"] for w in want)
    assert [t.split("\n")[0] for t in info["infotexts"]] == want
    assert all("Complete prompt: layout" in t for t in info["infotexts"])
    images = [Image.open(io.BytesIO(base64.b64decode(b))) for b in r.json()["images"]]
    ours = pipe(want, steps=2, seed=21, batch_size=2, complete_prompt="none")
    assert all(np.array_equal(_pixels(a), _pixels(b)) for a, b in zip(images, ours, strict=True))
    r = httpx.post(f"{url}/sdapi/v1/txt2img", json=base | {"complete_prompt": "none"}, timeout=60)
    info = json.loads(r.json()["info"])
    assert info["all_prompts"] == [base["prompt"]] * 2
    assert all(t.startswith(base["prompt"] + "\n") and "Complete prompt: none" in t
               for t in info["infotexts"])  # fmt: skip
    r = httpx.post(f"{url}/sdapi/v1/txt2img", json=base | {"complete_prompt": "all"}, timeout=60)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "complete_prompt"]


def test_unsupported_a1111_features_are_refused_by_name(server):
    url = server[0]
    for field, value in (("restore_faces", True), ("tiling", True), ("styles", ["s"]), ("script_name", "x"),
                         ("override_settings", {"CLIP_stop_at_last_layers": 2})):  # fmt: skip
        r = httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x", field: value}, timeout=60)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", field], (field, r.text)


def test_save_images_writes_under_outputs_only(server, tmp_path):
    url, _, app = server
    out = app.state.server.settings.outputs
    r = httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": PROMPT, "seed": 9, "steps": 2,
                                                    "save_images": True}, timeout=60)  # fmt: skip
    assert r.status_code == 200
    import os

    files = os.listdir(out)
    assert any(f.endswith("-9.png") for f in files), files


def test_skip_ends_the_current_batch_and_goes_on_with_the_next(server):
    """A1111's skip: batch 1 of 2 ends at its next step (its x̂₀ is its image), batch 2 runs in full."""
    url, _, app = server
    body = {"prompt": PROMPT, "seed": 1, "steps": 150, "n_iter": 2, "width": 64, "height": 64}
    job = httpx.post(f"{url}/latentforge/v1/jobs", json=body, timeout=60).json()
    deadline = time.time() + 60
    while httpx.get(f"{url}/latentforge/v1/jobs/{job['id']}").json()["step"] < 3 and time.time() < deadline:
        time.sleep(0.02)
    httpx.post(f"{url}/sdapi/v1/skip")
    while (j := httpx.get(f"{url}/latentforge/v1/jobs/{job['id']}").json())["state"] in ("queued", "running"):
        assert time.time() < deadline + 120
        time.sleep(0.05)
    assert j["state"] == "done" and len(j["images"]) == 2
    assert 150 < j["step"] < 150 + 20  # batch 1 stopped a few steps in; batch 2 took all 150
    assert j["info"]["all_seeds"] == [1, 2]


def test_batch_jobs_samples_waiting_requests_together(pipe):
    """--batch-jobs 8: six text-to-image requests that wait behind a long job and differ only in prompt and
    seed are sampled as one batch of 6; each gets the image its request gives alone. Batched float
    arithmetic may round differently (measured: at most 1 level in 8 bits, on a few pixels), so the images
    are compared within 1/255 and almost all pixels exactly."""
    # the second prompt leaves its layout to the model's completion, each image's drawn from its own seed;
    # a seventh request asks for no completion, so it is sampled apart
    prompts = [PROMPT, "a small blue square"] * 3 + ["a small blue square"]
    extra = [{}] * 6 + [{"complete_prompt": "none"}]
    with running(Settings(port=0, batch_jobs=8)) as (url, app):
        url = url.rstrip("/")
        blocker = httpx.post(f"{url}/latentforge/v1/jobs", json={"prompt": PROMPT, "steps": 150}).json()
        jobs = [httpx.post(f"{url}/latentforge/v1/jobs", json={"prompt": p, "seed": 10 + i, "steps": 4,
                                                                "cfg_scale": 4, **e}).json()  # fmt: skip
                for i, (p, e) in enumerate(zip(prompts, extra, strict=True))]  # fmt: skip
        httpx.delete(f"{url}/latentforge/v1/jobs/{blocker['id']}")
        results = []
        for j in jobs:
            deadline = time.time() + 120
            while (r := httpx.get(f"{url}/latentforge/v1/jobs/{j['id']}").json())["state"] != "done":
                assert r["state"] in ("queued", "running") and time.time() < deadline, r
                time.sleep(0.05)
            results.append(r)
    assert [r["info"].get("batched_with", 0) for r in results] == [5] * 6 + [0]
    for i, (p, e, r) in enumerate(zip(prompts, extra, results, strict=True)):
        got = _pixels(Image.open(io.BytesIO(base64.b64decode(r["images"][0]))))
        alone = _pixels(pipe(p, seed=10 + i, steps=4, cfg=4, **e)[0])
        assert r["info"]["all_prompts"] == pipe.image_prompts(p, seed=10 + i, **e)
        diff = np.abs(got - alone)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (i, diff.max(), (diff > 0).mean())
        assert r["info"]["all_seeds"] == [10 + i] and f"Seed: {10 + i}," in r["info"]["infotexts"][0]


def test_cors_is_off_unless_an_origin_is_allowed_and_limits_are_listed():
    from fastapi.testclient import TestClient

    from latentforge.server import build_app

    pre = {"Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST"}
    with TestClient(build_app(Settings())) as c:
        r = c.options("/sdapi/v1/txt2img", headers=pre)
        assert "access-control-allow-origin" not in r.headers
        assert "access-control-allow-origin" not in c.get("/sdapi/v1/options", headers=pre).headers
        flags = c.get("/sdapi/v1/cmd-flags").json()
        assert (flags["max_queue"], flags["max_body"], flags["max_pixels"], flags["max_steps"]) == (
            32, 16 * 2**20, 2048 * 2048, 150)  # fmt: skip
        assert flags["api_key"] is False  # whether one is set, never the key
    with TestClient(build_app(Settings(cors_origin=["http://elsewhere.example"], api_key="k"))) as c:
        r = c.options("/sdapi/v1/txt2img", headers=pre)
        assert r.headers["access-control-allow-origin"] == "http://elsewhere.example"
        assert c.get("/sdapi/v1/cmd-flags", headers={"X-API-Key": "k"}).json()["api_key"] is True
