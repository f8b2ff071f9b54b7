"""`latentforge serve --controlnet-dir`: ControlNet units as A1111 clients send them (the sd-webui-controlnet
extension's `alwayson_scripts.controlnet.args`), driven by the PyPI `webuiapi` client against a real server,
its images compared with the same generation in-process (exactly, as tests/test_serve.py: the same Pipeline,
seeds and CPU, and a lossless PNG round trip); the extension's model/module/version routes; the errors.
"""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

webuiapi = pytest.importorskip("webuiapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from test_models_unet import randomize  # noqa: E402

from latentforge.checkpoints_controlnet import save_controlnet  # noqa: E402
from latentforge.control_use import Control  # noqa: E402
from latentforge.models.controlnet import ControlNet  # noqa: E402
from latentforge.pipeline import Pipeline  # noqa: E402
from latentforge.server import Settings, controlnet_api, running  # noqa: E402

PROMPT = "a big red circle in the upper left corner on a black background"


def square(size=(64, 64), box=(16, 16, 48, 48)) -> Image.Image:
    im = Image.new("RGB", size, (20, 20, 20))
    im.paste((230, 230, 230), box)
    return im


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.default()


@pytest.fixture(scope="module")
def cn_dir(tmp_path_factory, pipe):
    d = tmp_path_factory.mktemp("controlnets")
    torch.manual_seed(0)
    save_controlnet(randomize(ControlNet.from_unet(pipe.net), 4), str(d / "tinycn.safetensors"))
    shutil.copy(d / "tinycn.safetensors", d / "tinycn_canny.safetensors")
    (d / "notes.txt").write_text("not a model")
    return d


@pytest.fixture(scope="module")
def server(cn_dir):
    with running(Settings(port=0, controlnet_dir=str(cn_dir))) as (url, app):
        yield url.rstrip("/"), int(url.rstrip("/").rsplit(":", 1)[1])


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# webuiapi adds the units to its `alwayson_scripts={}` default argument, which then stays in every later
# call of the process (other test files' img2img calls would send them): each call here passes its own dict.


def _api(port: int, steps: int = 4):
    return webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler", steps=steps)


def test_webuiapi_controlnet_unit_equals_the_same_generation_in_process(server, pipe, cn_dir):
    _, port = server
    path = str(cn_dir / "tinycn.safetensors")
    hint = square()
    unit = webuiapi.ControlNetUnit(image=hint, module="none", model="tinycn", weight=1.0)
    r = _api(port).txt2img(
        prompt=PROMPT, seed=5, cfg_scale=4, width=64, height=64, controlnet_units=[unit], alwayson_scripts={}
    )
    ours = pipe(PROMPT, steps=4, sampler="euler", scheduler="normal", cfg=4, seed=5,
                controlnet=[Control(path, hint)], progress=False)  # fmt: skip
    plain = pipe(PROMPT, steps=4, sampler="euler", scheduler="normal", cfg=4, seed=5, progress=False)
    assert np.array_equal(_pixels(r.image), _pixels(ours[0]))
    assert not np.array_equal(_pixels(r.image), _pixels(plain[0]))  # the unit did something
    field = ("Module: none, Model: tinycn, Weight: 1, Guidance Start: 0, Guidance End: 1, "
             "Control Mode: Balanced")  # fmt: skip
    assert f'ControlNet 0: "{field}"' in r.info["infotexts"][0]
    assert r.image.info["parameters"] == r.info["infotexts"][0]
    assert r.info["extra_generation_params"] == {"ControlNet 0": field}
    assert r.parameters["alwayson_scripts"]["ControlNet"]["args"][0]["image"] is None  # not echoed back


def test_listed_name_with_hash_canny_and_control_mode(server, pipe, cn_dir):
    """A model_list entry ("name [hash]") as the model, the canny preprocessor at its default thresholds,
    "ControlNet is more important" (guess mode here), a guidance window and a weight."""
    _, port = server
    api = _api(port)
    listed = api.controlnet_model_list()[1]
    assert listed.startswith("tinycn_canny [")
    picture = square(box=(10, 20, 50, 44))
    unit = webuiapi.ControlNetUnit(image=picture, module="canny", model=listed, weight=0.7, guidance_end=0.5,
                                   control_mode=2, threshold_a=100, threshold_b=200)  # fmt: skip
    r = api.txt2img(
        prompt=PROMPT, seed=9, cfg_scale=4, width=64, height=64, controlnet_units=[unit], alwayson_scripts={}
    )
    path = str(cn_dir / "tinycn_canny.safetensors")
    control = Control(path, picture, weight=0.7, end=0.5, guess=True, preprocess="canny")
    ours = pipe(PROMPT, steps=4, sampler="euler", scheduler="normal", cfg=4, seed=9, controlnet=[control],
                progress=False)  # fmt: skip
    assert np.array_equal(_pixels(r.image), _pixels(ours[0]))
    field = ("Module: canny, Model: tinycn_canny, Weight: 0.7, Guidance Start: 0, Guidance End: 0.5, "
             "Control Mode: ControlNet is more important")  # fmt: skip
    assert f'ControlNet 0: "{field}"' in r.info["infotexts"][0]


def test_disabled_unit_is_ignored(server, pipe):
    _, port = server
    off = webuiapi.ControlNetUnit(image=None, module="depth_midas", model="nope", enabled=False)
    r = _api(port).txt2img(
        prompt=PROMPT, seed=5, cfg_scale=4, width=64, height=64, controlnet_units=[off], alwayson_scripts={}
    )
    plain = pipe(PROMPT, steps=4, sampler="euler", scheduler="normal", cfg=4, seed=5, progress=False)
    assert np.array_equal(_pixels(r.image), _pixels(plain[0]))
    assert "ControlNet" not in r.info["infotexts"][0] and r.info["extra_generation_params"] == {}


def test_img2img_unit_without_image_uses_the_init_image(server, pipe, cn_dir):
    _, port = server
    init = square(box=(8, 8, 40, 40))
    unit = webuiapi.ControlNetUnit(image=None, module="invert (from white bg & black line)", model="tinycn")
    r = _api(port).img2img(images=[init], prompt=PROMPT, denoising_strength=0.6, seed=3, cfg_scale=4,
                           width=64, height=64, controlnet_units=[unit], alwayson_scripts={})  # fmt: skip
    control = Control(str(cn_dir / "tinycn.safetensors"), init, preprocess="scribble")
    ours = pipe(PROMPT, init_image=init, strength=0.6, steps=4, sampler="euler", scheduler="normal", cfg=4,
                seed=3, controlnet=[control], progress=False)  # fmt: skip
    assert np.array_equal(_pixels(r.image), _pixels(ours[0]))
    assert "Module: scribble, Model: tinycn" in r.info["infotexts"][0]


def test_model_module_and_version_routes(server, cn_dir):
    url, port = server
    api = _api(port)
    shas = {n: hashlib.sha256((cn_dir / f"{n}.safetensors").read_bytes()).hexdigest()[:8]
            for n in ("tinycn", "tinycn_canny")}  # fmt: skip
    assert api.controlnet_model_list() == [
        f"tinycn [{shas['tinycn']}]",
        f"tinycn_canny [{shas['tinycn_canny']}]",
    ]
    modules = httpx.get(f"{url}/controlnet/module_list").json()
    assert modules["module_list"] == list(controlnet_api.CONTROLNET_MODULES)
    for name, ours in (("none", "none"), ("canny", "canny"), ("scribble_pidinet", "scribble"),
                       ("scribble_hed", "scribble"), ("invert (from white bg & black line)", "scribble"),
                       ("seg_ofade20k", "seg")):  # fmt: skip
        assert modules["module_detail"][name]["preprocessor"] == ours
    assert api.controlnet_version() == 2
    assert api.get_scripts()["txt2img"] == ["controlnet"]


def _unit(**kw) -> dict:
    png = webuiapi.raw_b64_img(square())
    return {"image": png, "module": "none", "model": "tinycn", "weight": 1.0} | kw


@pytest.mark.parametrize(
    "unit, field, words",
    [
        (_unit(model="tinycm"), "model", ["'tinycm'", "closest", "tinycn"]),
        (_unit(model="control_v11p_sd15_depth [cafebabe]"), "model", ["control_v11p_sd15_depth", "tinycn"]),
        (_unit(model="../tinycn"), "model", ["'../tinycn'", "not given as paths"]),
        (_unit(model="None"), "model", ["needs a ControlNet model"]),
        (_unit(module="depth_midas"), "module", ["'depth_midas'", "accepted", "canny", "scribble_pidinet"]),
        (_unit(image=""), "image", ["needs an image"]),
        (_unit(guidance_start=0.8, guidance_end=0.2), "guidance_start", ["after guidance_end"]),
        (_unit(control_mode="Very important"), "control_mode", ["'Very important'", "2 (ControlNet is more"]),
        (_unit(resize_mode=7), "resize_mode", ["7 is not known", "1 (Crop and Resize)", "outer fit"]),
    ],
)
def test_bad_units_are_422_naming_the_value(server, unit, field, words):
    url, _ = server
    body = {"prompt": PROMPT, "steps": 2, "alwayson_scripts": {"controlnet": {"args": [unit]}}}
    r = httpx.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=60)
    assert r.status_code == 422, r.text
    (err,) = r.json()["detail"]
    assert err["loc"] == ["body", f"alwayson_scripts.controlnet.args[0].{field}"]
    for w in words:
        assert w in err["msg"], (w, err["msg"])


def test_hires_option_and_jobs_with_units_are_never_merged(server):
    from latentforge.server.app import Server
    from latentforge.server.jobs import Job

    url, _ = server
    body = {"prompt": PROMPT, "steps": 2, "enable_hr": True,
            "alwayson_scripts": {"controlnet": {"args": [_unit(hr_option="Low res only")]}}}  # fmt: skip
    r = httpx.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=60)
    assert r.status_code == 422 and "only Both" in r.json()["detail"][0]["msg"]
    kw = {"prompt": "a", "steps": 2, "sampler": "euler", "scheduler": "normal", "cfg": 7, "width": 64,
          "height": 64}  # fmt: skip
    assert Server.batch_key(Job("txt2img", "m", kw)) is not None
    assert Server.batch_key(Job("txt2img", "m", kw | {"controlnet": [object()]})) is None


def test_a_file_that_does_not_load_is_a_422_not_a_500(server, cn_dir):
    url, _ = server
    broken = cn_dir / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")  # the folder is read at every call
    try:
        body = {
            "prompt": PROMPT,
            "steps": 2,
            "alwayson_scripts": {"controlnet": {"args": [_unit(model="broken")]}},
        }
        r = httpx.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=60)
    finally:
        broken.unlink()
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "GenerationFailed" and "not a readable safetensors" in r.json()["detail"]


def test_resize_modes_fit_a_picture_of_another_aspect_ratio():
    tall = Image.new("RGB", (32, 64), (10, 10, 10))
    tall.paste((250, 250, 250), (0, 0, 32, 16))  # the top quarter white
    fill, pre = controlnet_api.control_map(tall, "none", (64, 64), "fill", controlnet_api.CANNY_THRESHOLDS)
    a = np.asarray(fill)
    assert pre == "none" and fill.size == (64, 64)
    assert (a[:, :16] == 10).all() and (a[:, 48:] == 10).all()  # padded with the border's median colour
    assert np.array_equal(a[:, 16:48], np.asarray(tall))
    crop, pre = controlnet_api.control_map(tall, "none", (64, 64), "crop", controlnet_api.CANNY_THRESHOLDS)
    assert pre == "none" and crop.size == (64, 64)
    assert np.asarray(crop)[2:-2].max() < 128  # the middle half, without the white top quarter
    just, pre = controlnet_api.control_map(tall, "canny", (64, 64), "just", controlnet_api.CANNY_THRESHOLDS)
    b = np.asarray(just)  # stretched across: the top quarter stays white, the rest dark
    assert pre == "canny" and just.size == (64, 64) and b[:14].min() > 200 and b[18:].max() < 60
