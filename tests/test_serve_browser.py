"""The web page of `latentforge serve` (latentforge/server/web/index.html), driven in a real browser.

A real server (uvicorn in a thread, on a free port) with the default model, and Debian's Chromium driven by
Playwright: generating with live previews, cancelling, reusing parameters from the gallery and from a
dropped PNG, img2img with a painted mask, the server's 422 messages, the page behind --api-key, and the
LoRA and embedding picker.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import urllib.error
import urllib.request

import pytest
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(
        f"the browser tests need Chromium at {CHROMIUM} (apt install chromium)", allow_module_level=True
    )
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the browser tests need playwright (pip install playwright)"
)
uvicorn = pytest.importorskip("uvicorn", reason="the browser tests need uvicorn")

from latentforge.server import Settings, running  # noqa: E402

PROMPT = "a big red circle in the upper left corner on a black background"
WAIT_MS = 60_000  # generous: the machine may be busy; the tests take seconds when it is idle


@contextlib.contextmanager
def _serve(**settings):
    """A server (uvicorn in a thread, on a free port) while the block runs; its base URL."""
    with running(Settings(port=0, **settings)) as (url, _):
        yield url


@pytest.fixture(scope="module")
def server():
    """The server's base URL ("http://127.0.0.1:PORT/")."""
    with _serve() as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    """A fresh page (its own context: an empty localStorage, so an empty gallery), loaded and ready."""
    with _page(browser, server) as pg:
        yield pg


@contextlib.contextmanager
def _page(browser, url: str, **context_args):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, **context_args)
    context.set_default_timeout(WAIT_MS)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(url)
    pg.wait_for_selector("body[data-ready]")
    assert pg.locator("#error").text_content() == ""
    yield pg
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)


def _png(data_url: str) -> Image.Image:
    assert data_url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(data_url.partition(",")[2])))


def _form(page) -> dict:
    ids = ("prompt", "negative", "steps", "cfg", "width", "height", "seed", "sampler", "scheduler")
    return {i: page.input_value(f"#{i}") for i in ids}


def _wait_job(page, old_job: str | None, state: str = "done") -> None:
    """Wait until a job other than old_job (body[data-job]: the page's latest) has reached state."""
    page.wait_for_function(
        "([old, state]) => document.body.dataset.job !== old && document.body.dataset.state === state",
        arg=[old_job, state],
    )


def _generate(page, state: str = "done") -> None:
    """Click Generate and wait for that job to end in state."""
    old = page.get_attribute("body", "data-job")
    page.click("#generate")
    _wait_job(page, old, state)


def test_generate_shows_live_previews_then_the_result_in_the_gallery(page):
    # record every change of the preview and the progress bar, with the job state at that moment
    page.evaluate("""() => {
        window.seen = [];
        const note = () => seen.push({state: document.body.dataset.state,
            src: (document.querySelector('#preview').getAttribute('src') || '').slice(0, 22),
            progress: document.querySelector('#progress').value});
        new MutationObserver(note).observe(document.querySelector('#preview'), {attributeFilter: ['src']});
        new MutationObserver(note).observe(document.querySelector('#progress'), {attributeFilter: ['value']});
    }""")
    page.fill("#prompt", PROMPT)
    page.fill("#steps", "50")  # long enough to be watched even on a fast machine
    _generate(page)
    seen = page.evaluate("seen")
    running = [s for s in seen if s["state"] == "running"]
    assert any(s["src"] == "data:image/png;base64," for s in running), seen  # a live preview while sampling
    assert any(0 < s["progress"] < 1 for s in running), seen  # the bar moved on the way
    assert page.evaluate("document.querySelector('#progress').value") == 1

    figures = page.locator("#gallery figure")
    assert figures.count() == 1
    seed = int(figures.first.get_attribute("data-seed"))
    params = figures.first.locator(".params").text_content()
    assert params.startswith(PROMPT + "\n")
    assert f"Seed: {seed}," in params and "Steps: 50," in params and "Size: 64x64" in params
    image = _png(figures.first.locator("img").get_attribute("src"))
    assert image.size == (64, 64) and image.info["parameters"] == params  # the PNG carries its infotext
    assert str(seed) in page.text_content("#status")
    # the final image is shown big, scaled without smoothing
    assert page.get_attribute("#preview", "src") == figures.first.locator("img").get_attribute("src")
    assert page.eval_on_selector("#preview", "e => getComputedStyle(e).imageRendering") == "pixelated"
    assert page.eval_on_selector("#preview", "e => e.getBoundingClientRect().width") >= 256

    # the gallery is kept in this browser
    page.reload()
    page.wait_for_selector("body[data-ready]")
    assert page.locator("#gallery figure").count() == 1
    assert page.locator("#gallery figure").first.get_attribute("data-seed") == str(seed)


def test_cancel_stops_a_long_job(page, server):
    page.fill("#prompt", PROMPT)
    page.fill("#steps", "150")
    page.fill("#batch", "8")
    page.click("#generate")
    page.wait_for_function("document.body.dataset.state === 'running' && /^step [1-9]/.test("
                           "document.querySelector('#status').textContent)")  # fmt: skip
    page.click("#cancel")
    page.wait_for_selector("body[data-state=cancelled]")
    assert page.text_content("#status") == "cancelled"
    assert page.locator("#gallery figure").count() == 0
    assert page.is_enabled("#generate") and page.is_disabled("#cancel")
    assert page.text_content("#error") == ""
    # the server agrees: the job is cancelled, long before its 150 steps
    with urllib.request.urlopen(server + "latentforge/v1/jobs") as r:
        job = json.load(r)[-1]
    assert job["state"] == "cancelled" and job["steps"] == 150 and job["step"] < 150


def test_reuse_parameters_from_a_gallery_result(page):
    page.fill("#prompt", PROMPT)
    page.fill("#negative", "blue")
    page.fill("#batch", "2")
    page.select_option("#sampler", "DPM++ 2M")
    page.select_option("#scheduler", "karras")
    page.fill("#steps", "12")
    page.fill("#cfg", "3.5")
    _generate(page)
    figures = page.locator("#gallery figure")
    assert figures.count() == 2
    first, second = (int(figures.nth(i).get_attribute("data-seed")) for i in range(2))
    assert second == first + 1  # image i of a batch: seed + i

    # change everything, then take the second image's parameters back
    page.fill("#prompt", "something else")
    page.fill("#negative", "")
    page.click("#dice")
    page.fill("#steps", "3")
    page.fill("#cfg", "9")
    page.select_option("#sampler", "Euler")
    page.select_option("#scheduler", "automatic")
    assert page.input_value("#seed") == "-1"
    figures.nth(1).locator("button.reuse").click()
    page.wait_for_function(f"document.querySelector('#seed').value === '{second}'")
    params = figures.nth(1).locator(".params").text_content()
    assert f"Seed: {second}," in params
    want = {"prompt": PROMPT, "negative": "blue", "steps": "12", "cfg": "3.5", "width": "64", "height": "64",
            "seed": str(second), "sampler": "DPM++ 2M", "scheduler": "karras"}  # fmt: skip
    assert _form(page) == want
    assert page.input_value("#completion") == "layout"  # as the image was made (the model's default)
    assert page.text_content("#error") == ""
    # generating again with them gives that image back (alone rather than second in a batch of 2: the batched
    # float arithmetic may round a few values one level differently)
    page.fill("#batch", "1")
    _generate(page)
    again = page.locator("#gallery figure").first
    assert again.get_attribute("data-seed") == str(second)
    want = _png(figures.nth(2).locator("img").get_attribute("src"))  # the old second image, now third
    got = _png(again.locator("img").get_attribute("src"))
    diff = [abs(a - b) for a, b in zip(got.tobytes(), want.tobytes(), strict=True)]
    assert max(diff) <= 2 and sum(d > 0 for d in diff) < len(diff) / 100


def test_prompt_completion_is_the_models_default_and_can_be_turned_off(page):
    """The default model completes the prompt's layout (Pipeline.image_prompts): the gallery shows the
    prompt each image was made from; "as written" sends complete_prompt "none", which the infotext keeps
    and "reuse" brings back."""
    page.fill("#prompt", "a big red circle")
    page.fill("#steps", "2")
    _generate(page)
    params = page.locator("#gallery figure").first.locator(".params").text_content()
    assert "a large red circle; background: " in params and "Complete prompt: layout" in params
    page.select_option("#completion", "none")
    _generate(page)
    first = page.locator("#gallery figure").first
    params = first.locator(".params").text_content()
    assert "background:" not in params and "Complete prompt: none" in params
    page.select_option("#completion", "")
    first.locator("button.reuse").click()
    page.wait_for_function("document.querySelector('#completion').value === 'none'")
    assert page.input_value("#prompt") == "a big red circle"
    assert page.text_content("#error") == ""


def test_a_dropped_or_chosen_png_gives_its_parameters(page, server, tmp_path):
    prompt = "a small blue square in the center on a white background"
    made = _post(server + "sdapi/v1/txt2img", {"prompt": prompt, "seed": 4242,
                                               "negative_prompt": "green", "steps": 5, "cfg_scale": 2.5,
                                               "sampler_name": "Euler a", "scheduler": "simple"})  # fmt: skip
    png = base64.b64decode(made["images"][0])
    want = {"prompt": prompt, "negative": "green", "steps": "5", "cfg": "2.5",
            "width": "64", "height": "64", "seed": "4242", "sampler": "Euler a",
            "scheduler": "simple"}  # fmt: skip
    path = tmp_path / "made.png"
    path.write_bytes(png)

    page.set_input_files("#png-file", str(path))  # what clicking the drop zone opens
    page.wait_for_function("document.querySelector('#seed').value === '4242'")
    assert _form(page) == want

    page.fill("#prompt", "")
    page.fill("#seed", "-1")
    page.fill("#steps", "")
    page.evaluate("""async ([b64]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], 'made.png', {type: 'image/png'}));
        const drop = new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true});
        document.querySelector('#dropzone').dispatchEvent(drop);
    }""", [made["images"][0]])  # fmt: skip
    page.wait_for_function("document.querySelector('#seed').value === '4242'")
    assert _form(page) == want

    # a PNG without parameters is reported, not silently ignored
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    (tmp_path / "plain.png").write_bytes(buf.getvalue())
    page.set_input_files("#png-file", str(tmp_path / "plain.png"))
    page.wait_for_function("document.querySelector('#error').textContent !== ''")
    assert "no generation parameters" in page.text_content("#error")


def test_inpaint_sends_the_painted_mask(page, server):
    made = _post(server + "sdapi/v1/txt2img", {"prompt": PROMPT, "seed": 7, "steps": 5})
    page.set_input_files("#init-file", {"name": "init.png", "mimeType": "image/png",
                                        "buffer": base64.b64decode(made["images"][0])})  # fmt: skip
    page.wait_for_selector("#paint:not([hidden])")
    assert page.text_content("#mode") == "(img2img: whole image)"
    # paint a stroke across the lower half of the image
    page.locator("#mask").scroll_into_view_if_needed()
    box = page.locator("#mask").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.75)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.8, box["y"] + box["height"] * 0.75, steps=8)
    page.mouse.up()
    assert page.text_content("#mode") == "(inpaint: masked area)"
    page.fill("#prompt", "a big blue square in the lower right corner on a black background")
    page.fill("#steps", "10")
    page.fill("#denoise", "0.9")
    with page.expect_request(lambda r: r.url.endswith("/latentforge/v1/jobs") and r.method == "POST") as sent:
        page.click("#generate")
    _wait_job(page, None)
    body = sent.value.post_data_json
    assert body["mode"] == "img2img" and body["denoising_strength"] == 0.9
    assert body["mask_blur"] == 4 and body["inpainting_fill"] == 1 and body["inpaint_full_res"] is False
    mask = _png(body["mask"]).convert("L")
    assert mask.size == (64, 64)
    assert mask.getpixel((32, 48)) == 255 and mask.getpixel((32, 8)) == 0  # painted below, not above
    assert (
        _png(body["init_images"][0]).tobytes() == _png("data:image/png;base64," + made["images"][0]).tobytes()
    )
    params = page.locator("#gallery figure .params").first.text_content()
    assert "Denoising strength: 0.9" in params and "Mask blur: 4" in params and "Steps: 10," in params

    page.click("#clear-mask")
    assert page.text_content("#mode") == "(img2img: whole image)"


def test_the_servers_422_messages_are_shown_on_the_fields(page):
    page.fill("#steps", "151")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#error').textContent !== ''")
    error = page.text_content("#error")
    assert re.search(r"^steps: .*--max-steps 150", error, re.M), error
    assert page.get_attribute("#steps", "class") == "invalid"
    assert page.locator("body[data-state=idle]").count() == 1 and page.is_enabled("#generate")
    page.fill("#steps", "")
    page.fill("#width", "63")
    page.click("#generate")
    page.wait_for_function("/multiple of/.test(document.querySelector('#error').textContent)")
    assert page.text_content("#error").startswith("width: ")
    assert page.get_attribute("#width", "class") == "invalid" and page.get_attribute("#steps", "class") in (
        "",
        None,
    )


def test_the_page_works_behind_an_api_key(browser):
    """With --api-key the browser asks for it (HTTP Basic, the key as password) once; the page's requests
    and its event stream then carry it."""
    with _serve(api_key="sesame") as url:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url)
        assert e.value.code == 401 and e.value.headers["WWW-Authenticate"].startswith("Basic")
        with _page(browser, url, http_credentials={"username": "me", "password": "sesame"}) as page:
            assert page.locator("#model option").count() >= 1  # the lists came through the key
            page.fill("#prompt", PROMPT)
            page.fill("#steps", "4")
            _generate(page)
            assert page.locator("#gallery figure").count() == 1
            assert "Steps: 4," in page.locator("#gallery figure .params").first.text_content()


@pytest.fixture(scope="module")
def networks_server(tmp_path_factory):
    """A server with --lora-dir (a random LoRA for the shipped model, "style") and --embeddings-dir (one
    embedding, "crimson"); (its base URL, the LoRA folder)."""
    from safetensors.torch import save_file
    from test_lora import write_sd15_lora

    from latentforge.pipeline import Pipeline

    root = tmp_path_factory.mktemp("networks")
    loras, embeddings = root / "loras", root / "embeddings"
    loras.mkdir()
    embeddings.mkdir()
    pipe = Pipeline.default()
    write_sd15_lora(pipe, loras / "style.safetensors", "kohya")
    table = pipe.components["clip_l"].transformer.text_model.embeddings.token_embedding.weight
    save_file({"emb_params": table[0].detach().float().clone()}, str(embeddings / "crimson.safetensors"))
    with _serve(lora_dir=str(loras), embeddings_dir=str(embeddings)) as url:
        yield url, loras


def test_the_extra_networks_picker_adds_lora_tags_and_embeddings(browser, networks_server):
    url, loras = networks_server
    with _page(browser, url) as page:
        page.wait_for_selector("#networks[data-loaded]")
        page.click("#networks summary", position={"x": 10, "y": 8})  # opens it (not on the refresh button)
        assert page.locator("#loras button").all_text_contents() == ["style"]
        assert page.locator("#embeddings button").all_text_contents() == ["crimson"]
        page.fill("#prompt", PROMPT)
        page.click("#loras button")
        assert page.input_value("#prompt") == f"{PROMPT} <lora:style:1>"  # A1111's default weight
        page.click("#embeddings button")
        assert page.input_value("#prompt") == f"{PROMPT} <lora:style:1> crimson"
        page.fill("#steps", "4")
        _generate(page)
        params = page.locator("#gallery figure .params").first.text_content()
        assert params.startswith(f"{PROMPT} <lora:style:1> crimson\n")
        assert re.search(r'Lora hashes: "style: [0-9a-f]{12}"', params), params

        # refresh reads the folder again
        (loras / "second.safetensors").write_bytes((loras / "style.safetensors").read_bytes())
        page.click("#refresh-networks")
        page.wait_for_function("document.querySelectorAll('#loras button').length === 2")
        assert page.locator("#loras button").all_text_contents() == ["second", "style"]
        assert page.get_attribute("#networks", "open") is not None  # the refresh button did not fold it

        # the server's names are shown and inserted as text, never as markup
        evil = "<img src=x onerror=window.pwned=1>"
        page.route("**/sdapi/v1/loras", lambda r: r.fulfill(json=[{"name": evil, "alias": evil, "path": "x",
                                                                        "metadata": {}}]))  # fmt: skip
        page.click("#refresh-networks")
        page.wait_for_function("document.querySelectorAll('#loras button').length === 1")
        assert page.locator("#loras button").all_text_contents() == [evil]
        assert page.locator("#networks img").count() == 0 and page.evaluate("window.pwned") is None
        page.fill("#prompt", "")
        page.click("#loras button")
        assert page.input_value("#prompt") == f"<lora:{evil}:1>"


def test_the_extra_networks_picker_says_how_to_get_some(page):
    page.wait_for_selector("#networks[data-loaded]")
    assert page.text_content("#loras") == "none (start the server with --lora-dir)"
    assert page.text_content("#embeddings") == "none (start the server with --embeddings-dir)"
