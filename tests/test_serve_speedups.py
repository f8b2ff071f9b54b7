"""`latentforge serve`: the per-call speed options (speedups.py) and the tuned schedule over HTTP.

A1111's own token merging setting (`override_settings.token_merging_ratio`, `_img2img`, `_hr`) and
latentforge's request fields (`cache_interval`, `cache_depth`, `cache_threshold`, `tome_ratio`,
`tome_max_downsample`) against the same generation in-process: exact, as in test_serve.py (the same Pipeline,
seeds and CPU; 8-bit PNGs round-trip losslessly). The shipped model has attention at downsampling 2 and 4
only (test_speedups.py), so token merging is asked for at tome_max_downsample 2: at the default 1 it
merges nothing there.
"""

from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest

uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

from latentforge.outputs import png_bytes  # noqa: E402
from latentforge.pipeline import Pipeline  # noqa: E402
from latentforge.server import Settings, running  # noqa: E402

PROMPT = "a big red circle in the upper left corner on a black background"
BASE = {"prompt": PROMPT, "seed": 5, "steps": 8, "cfg_scale": 4, "sampler_name": "Euler",
        "scheduler": "Normal"}  # fmt: skip
SAME = {"steps": 8, "cfg": 4, "seed": 5, "sampler": "euler", "scheduler": "normal", "progress": False}
TOME = {"tome_ratio": 0.5, "tome_max_downsample": 2}


@pytest.fixture(scope="module")
def server():
    with running(Settings(port=0)) as (url, app):  # the shipped model only: its tuned schedules beside it
        yield url.rstrip("/"), app


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.default()


def _post(server, body: dict, route: str = "txt2img") -> httpx.Response:
    return httpx.post(f"{server[0]}/sdapi/v1/{route}", json=body, timeout=60)


def _image(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _generate(server, body: dict, route: str = "txt2img") -> tuple[np.ndarray, dict, Image.Image]:
    r = _post(server, body, route)
    assert r.status_code == 200, r.text
    image = _image(r.json()["images"][0])
    return _pixels(image), json.loads(r.json()["info"]), image


def _error(r: httpx.Response) -> tuple[str, str]:
    assert r.status_code == 422, (r.status_code, r.text)
    err = r.json()["detail"][0]
    return err["loc"][-1], err["msg"]


def _job(server, body: dict) -> dict:
    url = server[0]
    r = httpx.post(f"{url}/latentforge/v1/jobs", json=body, timeout=60)
    assert r.status_code == 202, r.text
    deadline = time.time() + 60
    while (j := httpx.get(f"{url}/latentforge/v1/jobs/{r.json()['id']}").json())["state"] != "done":
        assert j["state"] in ("queued", "running") and time.time() < deadline, j
        time.sleep(0.05)
    return j


def test_speed_fields_give_the_in_process_image(server, pipe):
    """(a) tome_ratio and cache_interval: the image Pipeline gives with them, not the plain one; the same
    body through the job API gives it too."""
    plain = _pixels(pipe(PROMPT, **SAME)[0])
    for options in (TOME, {"cache_interval": 2}, {**TOME, "cache_interval": 3, "cache_depth": 1}):
        got, info, _ = _generate(server, BASE | options)
        want = _pixels(pipe(PROMPT, **SAME, **options)[0])
        assert np.array_equal(got, want), options
        assert not np.array_equal(got, plain), options
        assert ("Token merging ratio: 0.5" in info["infotexts"][0]) == ("tome_ratio" in options)
    job = _job(server, BASE | TOME | {"cache_interval": 2})
    want = _pixels(pipe(PROMPT, **SAME, **TOME, cache_interval=2)[0])
    assert np.array_equal(_pixels(_image(job["images"][0])), want)


def test_a1111_token_merging_setting_is_tome_ratio(server, pipe):
    """(b) override_settings.token_merging_ratio is tome_ratio, and the PNG's infotext says so under A1111's
    name (png-info reads it back); token_merging_ratio_img2img is img2img's, token_merging_ratio_hr the
    hires pass's ("Token merging ratio hr")."""
    via_field, _, _ = _generate(server, BASE | TOME)
    over = {"override_settings": {"token_merging_ratio": 0.5}, "tome_max_downsample": 2}
    via_setting, info, image = _generate(server, BASE | over)
    assert np.array_equal(via_setting, via_field)
    assert "Token merging ratio: 0.5," in image.info["parameters"]
    assert "Token merging ratio hr" not in image.info["parameters"]
    read = httpx.post(f"{server[0]}/sdapi/v1/png-info", json={"image": _post(server, BASE | over).json()[
        "images"][0]}).json()  # fmt: skip
    assert read["parameters"]["Token merging ratio"] == "0.5"
    assert _generate(server, BASE | over | {"tome_ratio": 0.5})[0].tobytes() == via_field.tobytes()

    init = pipe("a small blue square at the center on a white background", steps=4, seed=3, progress=False)[0]
    b64 = base64.b64encode(png_bytes(init, "")).decode()
    i2i = BASE | {"init_images": [b64], "denoising_strength": 0.6, "tome_max_downsample": 2}
    i2i_over = {"override_settings": {"token_merging_ratio_img2img": 0.5}}
    got, info, _ = _generate(server, i2i | i2i_over, "img2img")
    want = pipe(PROMPT, init_image=init, strength=0.6, **SAME, **TOME)[0]
    assert np.array_equal(got, _pixels(want)) and "Token merging ratio: 0.5" in info["infotexts"][0]
    plain_i2i, _, _ = _generate(server, i2i, "img2img")
    assert not np.array_equal(got, plain_i2i)
    # A1111's txt2img reads token_merging_ratio only; its img2img prefers token_merging_ratio when given
    txt_only = BASE | {"override_settings": {"token_merging_ratio_img2img": 0.5}, "tome_max_downsample": 2}
    assert "Token merging" not in _generate(server, txt_only)[1]["infotexts"][0]
    both = {"token_merging_ratio": 0.0, "token_merging_ratio_img2img": 0.5}
    assert np.array_equal(_generate(server, i2i | {"override_settings": both}, "img2img")[0], plain_i2i)

    hr = BASE | over | {"steps": 2, "enable_hr": True, "hr_scale": 2, "denoising_strength": 0.5}
    for hr_ratio in (0.5, 0):  # the same as the first pass's, or 0: the first pass's (A1111's `or`)
        hr_over = {"override_settings": {"token_merging_ratio": 0.5, "token_merging_ratio_hr": hr_ratio}}
        got, info, _ = _generate(server, hr | hr_over)
        want = pipe(PROMPT, **SAME | {"steps": 2}, **TOME, hires_scale=2, hires_denoise=0.5)[0]
        assert np.array_equal(got, _pixels(want))
        assert "Token merging ratio: 0.5, Token merging ratio hr: 0.5," in info["infotexts"][0]


def test_off_values_are_bit_identical_to_no_options(server):
    """(c) every option at its "off" value (and A1111's setting at 0): the plain image, no infotext field."""
    plain, _, _ = _generate(server, BASE)
    off = {"cache_interval": 1, "cache_depth": 3, "cache_threshold": 0, "tome_ratio": 0,
           "tome_max_downsample": 2,
           "override_settings": {"token_merging_ratio": 0, "token_merging_ratio_hr": 0}}  # fmt: skip
    got, info, _ = _generate(server, BASE | off)
    assert np.array_equal(got, plain)
    assert "Token merging" not in info["infotexts"][0]


def test_bad_values_are_a_422_naming_the_field(server):
    """(d) Speedups' checks, as the server's 422 on the field (the range in the message), on both APIs."""
    cases = [
        ({"cache_interval": 0}, "cache_interval", "[1, 1000]"),
        ({"cache_interval": 2, "cache_depth": 99}, "cache_depth", "[0, "),
        ({"cache_depth": -1}, "cache_depth", ">= 0"),
        ({"cache_threshold": 0.1}, "cache_threshold", "DiT/MMDiT"),  # a UNet: DeepCache's interval only
        ({"cache_interval": 2, "cache_threshold": 0.1}, "cache_threshold", "not both"),
        ({"tome_ratio": 0.99}, "tome_ratio", "[0, 0.95]"),
        ({"tome_ratio": -0.1}, "tome_ratio", "[0, 0.95]"),
        ({"tome_max_downsample": 3}, "tome_max_downsample", "(1, 2, 4, 8)"),
        ({"override_settings": {"token_merging_ratio": 1.5}}, "override_settings.token_merging_ratio",
         "token_merging_ratio must be a number in [0, 0.95]"),
        ({"override_settings": {"token_merging_ratio": "0.5"}}, "override_settings.token_merging_ratio",
         "[0, 0.95]"),
        ({"override_settings": {"token_merging_ratio_hr": True}}, "override_settings.token_merging_ratio_hr",
         "[0, 0.95]"),
        ({"tome_ratio": 0.3, "override_settings": {"token_merging_ratio": 0.5}},
         "override_settings.token_merging_ratio", "differs from tome_ratio 0.3"),
        ({"tome_ratio": 0.3, "override_settings": {"token_merging_ratio": 0}},
         "override_settings.token_merging_ratio", "differs from tome_ratio"),
        ({"override_settings": {"token_merging_ratio": 0.5, "token_merging_ratio_hr": 0.3},
          "enable_hr": True}, "override_settings.token_merging_ratio_hr", "not supported"),
        ({"tome_ratio": 0.5, "override_settings": {"token_merging_ratio_hr": 0.3}, "enable_hr": True},
         "override_settings.token_merging_ratio_hr", "first pass's token merging ratio (0.5)"),
        ({"override_settings": {"token_merging_ratio_hr": 0.3}, "enable_hr": True},
         "override_settings.token_merging_ratio_hr", "(0)"),
        ({"override_settings": {"CLIP_stop_at_last_layers": 2}}, "override_settings", "token_merging_ratio"),
    ]  # fmt: skip
    for extra, field, words in cases:
        for route in ("txt2img", "jobs"):
            body = {"prompt": PROMPT, "steps": 2} | extra
            if route == "jobs":
                r = httpx.post(f"{server[0]}/latentforge/v1/jobs", json=body, timeout=60)
            else:
                r = _post(server, body)
            got, msg = _error(r)
            assert (got, words in msg) == (field, True), (extra, route, got, msg)
    # a value of the wrong type: pydantic's 422 on the field
    assert _error(_post(server, {"prompt": PROMPT, "cache_interval": "often"}))[0] == "cache_interval"
    assert _error(_post(server, {"prompt": PROMPT, "tome_ratio": [0.5]}))[0] == "tome_ratio"
    # without hires, A1111's hires setting is not used (A1111 ignores it too)
    no_hires = BASE | {"steps": 2, "override_settings": {"token_merging_ratio_hr": 0.3}}
    assert _post(server, no_hires).status_code == 200


def test_tuned_schedule(server, pipe):
    """(e) scheduler "tuned": the schedule stored beside the model (the shipped one has Euler at 4 and 8
    steps), as in-process `scheduler="tuned"`; without one, a 422 naming the ones the model has."""
    body = BASE | {"scheduler": "tuned"}
    got, info, _ = _generate(server, body)
    want = pipe(PROMPT, **SAME | {"scheduler": "tuned"})[0]
    assert np.array_equal(got, _pixels(want))
    assert not np.array_equal(got, _generate(server, BASE)[0])
    assert "Schedule type: tuned," in info["infotexts"][0] and info["scheduler"] == "tuned"
    assert np.array_equal(_generate(server, body | {"scheduler": "Tuned", "sampler_name": "euler"})[0], got)
    field, msg = _error(_post(server, body | {"steps": 5}))
    assert field == "scheduler" and "'Euler' at 5 steps" in msg, msg
    assert "Euler at 4 steps, Euler at 8 steps" in msg and "/" not in msg.replace("latentforge tune", ""), msg
    field, msg = _error(_post(server, body | {"sampler_name": "DPM++ 2M"}))
    assert field == "scheduler" and "'DPM++ 2M' at 8 steps" in msg, msg
    # the hires pass samples with the tuned schedule too: its step count needs one
    hr = body | {"enable_hr": True, "hr_second_pass_steps": 5, "denoising_strength": 0.5}
    field, msg = _error(_post(server, hr))
    assert field == "scheduler" and "at 5 steps (the hires pass)" in msg, msg
    assert _post(server, hr | {"hr_second_pass_steps": 4}).status_code == 200


def test_jobs_with_other_speed_options_are_never_merged(server):
    """(4) --batch-jobs: the batch key holds the speed options; jobs that ask for the same ones still merge,
    and each gets the image it gives alone (within batched rounding, as test_serve.py's batch test)."""
    from latentforge.server import a1111
    from latentforge.server.app import Server

    srv = server[1].state.server

    def key(**extra):
        return Server.batch_key(srv.make_job("txt2img", a1111.Txt2Img(**BASE | extra)))

    plain = key()
    assert plain is not None and key(seed=9, prompt="another") == plain
    variants = [{"tome_ratio": 0.5}, TOME, {"cache_interval": 2}, {"cache_interval": 2, "cache_depth": 1},
                {"override_settings": {"token_merging_ratio": 0.5}}]  # fmt: skip
    keys = [key(**v) for v in variants]
    assert len({plain, *keys}) == 5  # tome_ratio 0.5 via the field or A1111's setting: the same job
    assert keys[0] == keys[4] and key(**TOME, seed=1) == keys[1]
    assert key(tome_ratio=0, cache_interval=1) == plain  # off: the plain job's key

    bodies = [BASE, BASE | TOME, BASE | {"seed": 6}, BASE | TOME | {"seed": 6}]
    with running(Settings(port=0, batch_jobs=8)) as (url, _):
        url = url.rstrip("/")
        blocker = httpx.post(f"{url}/latentforge/v1/jobs", json={"prompt": PROMPT, "steps": 150}).json()
        jobs = [httpx.post(f"{url}/latentforge/v1/jobs", json=b).json() for b in bodies]
        httpx.delete(f"{url}/latentforge/v1/jobs/{blocker['id']}")
        done = []
        for j in jobs:
            deadline = time.time() + 60
            while (r := httpx.get(f"{url}/latentforge/v1/jobs/{j['id']}").json())["state"] != "done":
                assert r["state"] in ("queued", "running") and time.time() < deadline, r
                time.sleep(0.05)
            done.append(r)
    assert [r["info"]["batched_with"] for r in done] == [1, 1, 1, 1]
    alone = [_generate(server, b)[0] for b in bodies]
    for r, want in zip(done, alone, strict=True):
        diff = np.abs(_pixels(_image(r["images"][0])) - want)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01
