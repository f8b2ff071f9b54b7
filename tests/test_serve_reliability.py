"""`latentforge serve` under load and abuse, over real HTTP: a uvicorn server on a free port in a background
thread (or a `latentforge serve` process where a real process is needed: SIGTERM), real clients (httpx, one
thread each).

- 100 concurrent clients, valid txt2img requests mixed with malformed, mistyped, oversized and otherwise bad
  ones: every valid one gets 200 and the image the same request gives alone in-process, every bad one a 4xx
  naming the field, never a 5xx; the server process's memory stays near its baseline over a second burst;
- the queue bound (429 + Retry-After), a failing job (NaN) failing alone, cancel (queued and running), A1111's
  interrupt (the partial image), the API key on every route, models by name only, SIGTERM (exit 0 within a
  few seconds, no partial files in --outputs);
- odd JSON (NaN/Infinity, 1e999, deep nesting, lone surrogates) is a 4xx, not a 500, and leaves the server
  healthy.

The default model at 64×64 with 2-4 steps keeps each job ~0.05-0.1 s on an idle 2-core machine.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from latentforge.pipeline import Pipeline  # noqa: E402
from latentforge.server.app import Server, Settings, build_app  # noqa: E402

FINISHED = ("done", "failed", "cancelled")
TIMEOUT = httpx.Timeout(120.0, connect=30.0)


# -- a real server ------------------------------------------------------------------------------------


@dataclass
class Live:
    base: str
    app: object = None  # in-thread servers: the app and its Server
    srv: Server | None = None
    proc: subprocess.Popen | None = None  # `latentforge serve` processes
    log: Path | None = None

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=TIMEOUT, **kw)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log is not None else ""


@contextmanager
def live_server(**settings):
    """build_app(Settings(**settings)) served by uvicorn in a thread, on a socket bound here (no port race);
    stopped (should_exit: the lifespan's queue.close) at the end."""
    app = build_app(Settings(**settings))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield Live(f"http://127.0.0.1:{port}", app, app.state.server)
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_command() -> list[str]:
    exe = Path(sys.executable).with_name("latentforge")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "latentforge"]


@contextmanager
def serve_process(tmp: Path, *args: str):
    """`latentforge serve --port N *args` as a process (one torch thread, as this test process), its output in
    tmp/server.log; killed at the end if still running."""
    port, log = _free_port(), tmp / "server.log"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [*_serve_command(), "serve", "--port", str(port), *args],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
        )
    live = Live(f"http://127.0.0.1:{port}", proc=proc, log=log)
    try:
        with live.client() as c:

            def up():
                assert proc.poll() is None, f"the server exited at start:\n{live.log_text()[-3000:]}"
                try:
                    return c.get("/sdapi/v1/progress").status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(up, 90, "the server to start")
        yield live
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def live():
    # max_queue above the burst's size: the burst tests correctness under concurrency, not the bound
    # (test_queue_bound does, with max_queue=2)
    with live_server(max_queue=128) as s:
        yield s


@pytest.fixture(scope="module")
def small():
    with live_server(max_queue=2) as s:
        yield s


@pytest.fixture(scope="module")
def ref_pipe():
    return Pipeline.default()


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def job_state(c: httpx.Client, job_id: str) -> dict:
    r = c.get(f"/latentforge/v1/jobs/{job_id}")
    assert r.status_code == 200, r.text
    return r.json()


def wait_job(c: httpx.Client, job_id: str, timeout: float = 120) -> dict:
    return wait_until(
        lambda: (j := job_state(c, job_id))["state"] in FINISHED and j, timeout, f"job {job_id}"
    )


def wait_running(c: httpx.Client, job_id: str, min_step: int = 1, timeout: float = 60) -> dict:
    def ready():
        j = job_state(c, job_id)
        assert j["state"] in ("queued", "running"), j
        return j["state"] == "running" and j["step"] >= min_step and j

    return wait_until(ready, timeout, f"job {job_id} running")


def decode(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


def png_b64(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def rss_mb(pid: int) -> float | None:
    """A process's resident memory in MB, from /proc (Linux; None elsewhere)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def names_field(r: httpx.Response, field: str) -> bool:
    """The response names `field`: in a 422's detail loc (FastAPI's shape), else anywhere in the body."""
    try:
        detail = r.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, list) and any(field in [str(x) for x in d.get("loc", [])] for d in detail):
        return True
    return field in r.text


# -- the burst ----------------------------------------------------------------------------------------

PROMPTS = ("a red cube", "a blue ball left of a green cube", "a small yellow triangle", "two purple balls")
SAMPLERS = (("euler", "normal"), ("dpmpp_2m", "karras"), ("euler_ancestral", "normal"))
BIG = 20 * 2**20  # over max_body's default 16 MiB
BIG_BODY = b'{"prompt": "' + b"a" * BIG + b'"}'
NOT_AN_IMAGE = base64.b64encode(b"this is plain text, not a PNG or a JPEG" * 10).decode("ascii")


def valid_request(i: int) -> dict:
    sampler, scheduler = SAMPLERS[i % 3]
    return {
        "prompt": PROMPTS[i % len(PROMPTS)],
        "negative_prompt": "",
        "seed": 1000 + i,
        "steps": 2 + i % 3,
        "sampler_name": sampler,
        "scheduler": scheduler,
        "cfg_scale": (4.0, 5.5)[i % 2],
        "width": 64,
        "height": 64,
    }


def _chunks():
    for _ in range(BIG // 2**20):
        yield b"x" * 2**20


# (label, path, how the body is sent, the status expected, the field the response must name)
GOOD = {"steps": 2, "width": 64, "height": 64, "seed": 1}
BAD = [
    ("malformed JSON", "/sdapi/v1/txt2img", {"content": b'{"prompt": "x", steps: 4'}, 422, "body"),
    ("malformed JSON (jobs)", "/latentforge/v1/jobs", {"content": b'{"prompt": '}, 422, "body"),
    ("steps 'abc'", "/sdapi/v1/txt2img", {"json": GOOD | {"steps": "abc"}}, 422, "steps"),
    ("steps 'abc' (jobs)", "/latentforge/v1/jobs", {"json": GOOD | {"steps": "abc"}}, 422, "steps"),
    ("width 100000", "/sdapi/v1/txt2img", {"json": GOOD | {"width": 100000}}, 422, "width"),
    ("8192x8192", "/sdapi/v1/txt2img", {"json": GOOD | {"width": 8192, "height": 8192}}, 422, "width"),
    (
        "8192x8192 (jobs)",
        "/latentforge/v1/jobs",
        {"json": GOOD | {"width": 8192, "height": 8192}},
        422,
        "width",
    ),
    ("negative steps", "/sdapi/v1/txt2img", {"json": GOOD | {"steps": -3}}, 422, "steps"),
    ("steps over --max-steps", "/sdapi/v1/txt2img", {"json": GOOD | {"steps": 151}}, 422, "steps"),
    ("20 MB body", "/sdapi/v1/txt2img", {"content": BIG_BODY}, 413, "max-body"),
    ("20 MB chunked body", "/latentforge/v1/jobs", {"content": "chunks"}, 413, "max-body"),
    (
        "init image not an image",
        "/sdapi/v1/img2img",
        {"json": GOOD | {"init_images": [NOT_AN_IMAGE]}},
        422,
        "init_images[0]",
    ),
    (
        "init image not base64",
        "/sdapi/v1/img2img",
        {"json": GOOD | {"init_images": ["%%%%"]}},
        422,
        "init_images[0]",
    ),
    ("no init image", "/sdapi/v1/img2img", {"json": GOOD | {"init_images": []}}, 422, "init_images"),
    (
        "mask not an image",
        "/sdapi/v1/img2img",
        {"json": GOOD | {"init_images": [png_b64(Image.new("RGB", (64, 64)))], "mask": NOT_AN_IMAGE}},
        422,
        "mask",
    ),
    (
        "unknown sampler",
        "/sdapi/v1/txt2img",
        {"json": GOOD | {"sampler_name": "Euler z"}},
        422,
        "sampler_name",
    ),
    ("unknown scheduler", "/sdapi/v1/txt2img", {"json": GOOD | {"scheduler": "wobbly"}}, 422, "scheduler"),
    ("cfg_scale 'high'", "/sdapi/v1/txt2img", {"json": GOOD | {"cfg_scale": "high"}}, 422, "cfg_scale"),
    ("batch_size 0", "/sdapi/v1/txt2img", {"json": GOOD | {"batch_size": 0}}, 422, "batch_size"),
    ("width 63", "/sdapi/v1/txt2img", {"json": GOOD | {"width": 63}}, 422, "width"),
    ("prompt a number", "/sdapi/v1/txt2img", {"json": GOOD | {"prompt": 5}}, 422, "prompt"),
    ("a JSON array", "/sdapi/v1/txt2img", {"json": [1, 2, 3]}, 422, "body"),
    (
        "model as a path",
        "/sdapi/v1/txt2img",
        {"json": GOOD | {"override_settings": {"sd_model_checkpoint": "../x"}}},
        422,
        "sd_model_checkpoint",
    ),
    (
        "unknown hires upscaler",
        "/sdapi/v1/txt2img",
        {"json": GOOD | {"enable_hr": True, "hr_upscaler": "x"}},
        422,
        "hr_upscaler",
    ),
    ("mode 'video' (jobs)", "/latentforge/v1/jobs", {"json": GOOD | {"mode": "video"}}, 422, "mode"),
    ("png-info not an image", "/sdapi/v1/png-info", {"json": {"image": NOT_AN_IMAGE}}, 422, "image"),
]


def burst_cases(n_valid: int = 30, n: int = 100) -> list[tuple]:
    """n_valid valid txt2img requests and n - n_valid bad ones (BAD in turn, each two or three times),
    shuffled with a fixed seed."""
    cases = [("valid", "/sdapi/v1/txt2img", {"json": valid_request(i)}, 200, i) for i in range(n_valid)]
    cases += [BAD[k % len(BAD)] for k in range(n - n_valid)]
    random.Random(0).shuffle(cases)
    return cases


def send(c: httpx.Client, path: str, how: dict) -> httpx.Response:
    if how.get("content") == "chunks":  # no Content-Length: the server must count the bytes itself
        return c.post(path, content=_chunks(), headers={"content-type": "application/json"})
    if "content" in how:
        return c.post(path, content=how["content"], headers={"content-type": "application/json"})
    return c.post(path, json=how["json"])


def burst(live: Live, cases: list[tuple]) -> list:
    """Every case at once, each from its own client (own connection) on its own thread."""
    clients = [live.client() for _ in cases]
    start = threading.Barrier(len(cases))

    def one(k: int):
        start.wait()
        try:
            return send(clients[k], cases[k][1], cases[k][2])
        except httpx.HTTPError as e:  # a transport failure is a failure of the server too
            return e

    try:
        with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
            return list(pool.map(one, range(len(cases))))
    finally:
        for c in clients:
            c.close()


def check_burst(cases, results) -> dict[int, np.ndarray]:
    """Statuses and fields; the valid requests' images by request index."""
    images, problems = {}, []
    for (label, path, _, status, field), r in zip(cases, results, strict=True):
        if isinstance(r, Exception):
            problems.append(f"{label} ({path}): {type(r).__name__}: {r}")
        elif r.status_code >= 500:
            problems.append(f"{label} ({path}): {r.status_code} {r.text[:300]}")
        elif label == "valid":
            if r.status_code != 200:
                problems.append(f"valid request {field}: {r.status_code} {r.text[:300]}")
                continue
            body = r.json()
            assert len(body["images"]) == 1
            info = json.loads(body["info"])
            req = valid_request(field)
            assert (info["seed"], info["steps"], info["cfg_scale"]) == (
                req["seed"],
                req["steps"],
                req["cfg_scale"],
            )
            im = decode(body["images"][0])
            assert im.size == (64, 64) and im.mode == "RGB"
            assert f"Seed: {req['seed']}" in im.info["parameters"]
            images[field] = np.asarray(im)
        elif r.status_code != status or not names_field(r, field):
            problems.append(
                f"{label} ({path}): expected {status} naming {field!r}, got {r.status_code} {r.text[:300]}"
            )
    assert not problems, "\n".join(problems)
    return images


def test_burst_of_100_clients_valid_and_bad(tmp_path, ref_pipe):
    """Against a `latentforge serve` process, so that its memory is measured apart from the 100 clients'
    (in one process the clients' 20 MB bodies and threads dominate the resident size and its noise)."""
    cases = burst_cases()
    n_valid = sum(c[0] == "valid" for c in cases)
    with serve_process(tmp_path, "--max-queue", "128") as live:  # the bound is test_queue_bound's
        t0 = time.perf_counter()
        first = check_burst(cases, burst(live, cases))
        t_burst = time.perf_counter() - t0
        assert len(first) == n_valid
        with live.client() as c:
            assert c.get("/sdapi/v1/progress").json()["current_task"] is None
            assert all(j["state"] in FINISHED for j in c.get("/latentforge/v1/jobs").json())

        # memory: the baseline is the server's resident size after the first burst (the model loaded, the
        # allocator's pools, the thread pools and lazily built state warmed up); a second identical burst must
        # leave it within 50 MB of that. Leaking what a burst handles would exceed it (six 20 MB bodies, 30
        # jobs' tensors, previews and PNGs, 100 connections); measured growth is ~1-5 MB (allocator
        # fragmentation), so the allowance is generous against noise without hiding a per-burst leak
        base = rss_mb(live.proc.pid)
        second = check_burst(cases, burst(live, cases))
        time.sleep(0.5)  # the last responses' buffers released
        after = rss_mb(live.proc.pid)
        assert "Traceback" not in live.log_text(), live.log_text()[-3000:]
    for i in first:  # the same requests again: the same images
        assert np.array_equal(first[i], second[i]), f"request {i} changed between bursts"
    print(f"\nburst of {len(cases)} ({n_valid} valid): {t_burst:.1f} s; server RSS {base} -> {after} MB")
    if base is not None:
        assert after <= base + 50, f"the server's RSS grew from {base:.0f} MB to {after:.0f} MB over a burst"

    # each valid image equals the same request run alone, in-process (same weights, the same seeded CPU noise,
    # the same CPU kernels on one thread, batch 1 both ways): identical floats, so identical pixels; an exact
    # comparison also catches requests leaking into each other (shared state, batching, seeds)
    for i, got in first.items():
        req = valid_request(i)
        ref = ref_pipe(
            prompt=req["prompt"],
            negative_prompt="",
            seed=req["seed"],
            steps=req["steps"],
            sampler=req["sampler_name"],
            scheduler=req["scheduler"],
            cfg=req["cfg_scale"],
            width=64,
            height=64,
            progress=False,
        )[0]
        diff = np.abs(np.asarray(ref).astype(int) - got.astype(int))
        assert diff.max() == 0, f"request {i}: {int((diff > 0).sum())} pixels differ, by up to {diff.max()}"


# -- odd JSON -----------------------------------------------------------------------------------------

ODD = [
    ("cfg_scale NaN", "/sdapi/v1/txt2img", '{"cfg_scale": NaN, "steps": 2}', "cfg_scale"),
    ("seed 1e999", "/sdapi/v1/txt2img", '{"seed": 1e999, "steps": 2}', "seed"),
    (
        "subseed_strength NaN",
        "/sdapi/v1/txt2img",
        '{"subseed_strength": NaN, "steps": 2}',
        "subseed_strength",
    ),
    (
        "denoising_strength NaN",
        "/sdapi/v1/img2img",
        '{"init_images": ["x"], "denoising_strength": NaN}',
        "denoising_strength",
    ),
    ("eta NaN (echoed back)", "/sdapi/v1/txt2img", '{"eta": NaN, "steps": 2}', "eta"),
    (
        "alwayson_scripts NaN (echoed back)",
        "/sdapi/v1/txt2img",
        '{"alwayson_scripts": {"x": NaN}, "steps": 2}',
        "alwayson_scripts",
    ),
    ("eta Infinity (jobs)", "/latentforge/v1/jobs", '{"eta": Infinity, "steps": 2}', "eta"),
    ("deep nesting (txt2img)", "/sdapi/v1/txt2img", "[" * 100_000, "body"),
    ("deep nesting (jobs)", "/latentforge/v1/jobs", "[" * 100_000, "body"),
    ("deep nesting (options)", "/sdapi/v1/options", "[" * 100_000, "body"),
    (
        "live_previews_enable NaN",
        "/sdapi/v1/options",
        '{"live_previews_enable": NaN}',
        "live_previews_enable",
    ),
    (
        "lone surrogate key (echoed back)",
        "/sdapi/v1/txt2img",
        r'{"alwayson_scripts": {"\ud800": 1}, "steps": 2}',
        "alwayson_scripts",
    ),
    ("lone surrogate option", "/sdapi/v1/options", r'{"\ud800": 1}', "body"),
]


@pytest.fixture(scope="module")
def odd():
    """A server of its own: a case that gets through can leave state behind (an option set to NaN)."""
    with live_server() as s:
        yield s


@pytest.mark.parametrize("label,path,body,field", ODD, ids=[o[0] for o in ODD])
def test_odd_json_is_a_4xx_and_leaves_the_server_healthy(odd, label, path, body, field):
    """JSON's NaN/Infinity (and 1e999, which parses to inf), nesting deeper than the parser's recursion limit
    and lone surrogates are valid input to Python's json module; each must be refused with a 4xx (422 or 400),
    not crash the response (HTTP 500) or poison later responses (GET options)."""
    saved = dict(odd.srv.options)
    try:
        with odd.client() as c:
            options = c.get("/sdapi/v1/options").json()
            r = c.post(path, content=body.encode(), headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500, f"{label}: {r.status_code} {r.text[:300]}"
            if r.status_code == 422 and field != "body":
                assert names_field(r, field), r.text
        with odd.client() as c:  # a fresh connection: the server is fine and its options unchanged
            got = c.get("/sdapi/v1/options")
            assert got.status_code == 200 and got.json() == options, got.text[:300]
            assert c.get("/latentforge/v1/jobs").status_code == 200
    finally:
        odd.srv.options.clear()  # the next case starts from a healthy server whatever this one did
        odd.srv.options.update(saved)


# -- the queue ----------------------------------------------------------------------------------------


def long_job(c: httpx.Client, seed: int = 1, steps: int = 150, **extra) -> str:
    r = c.post(
        "/latentforge/v1/jobs",
        json={"prompt": "a red cube", "seed": seed, "steps": steps, "width": 64, "height": 64} | extra,
    )
    assert r.status_code == 202, r.text
    return r.json()["id"]


def test_queue_bound_gives_429_with_retry_after(small):
    with small.client() as c:
        running = long_job(c, n_iter=4)  # 600 steps: it runs all through the checks below
        wait_running(c, running)
        # five submissions at once behind the running job: max_queue=2 takes two, the rest get 429
        clients = [small.client() for _ in range(5)]
        start = threading.Barrier(5)

        def submit(k):
            start.wait()
            return clients[k].post("/latentforge/v1/jobs", json=GOOD | {"seed": 10 + k})

        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            results = list(pool.map(submit, range(5)))
        for cl in clients:
            cl.close()
        statuses = sorted(r.status_code for r in results)
        assert statuses == [202, 202, 429, 429, 429], [(r.status_code, r.text[:200]) for r in results]
        for r in results:
            if r.status_code == 429:
                assert int(r.headers["Retry-After"]) > 0, r.headers
        # the 4th in order (one running, two waiting) is refused on either API
        r = c.post("/sdapi/v1/txt2img", json=GOOD)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0, r.text
        assert small.srv.queue.waiting == 2
        # cancelled, the queue takes jobs again
        waiting = [r.json()["id"] for r in results if r.status_code == 202]
        for job_id in [*waiting, running]:
            assert c.delete(f"/latentforge/v1/jobs/{job_id}").status_code == 200
        for job_id in [*waiting, running]:
            assert wait_job(c, job_id)["state"] == "cancelled"
        assert c.post("/sdapi/v1/txt2img", json=GOOD).status_code == 200


def test_cancel_queued_and_running(small):
    with small.client() as c:
        running = long_job(c, seed=2)
        queued = long_job(c, seed=3, steps=4)
        j = wait_running(c, running, min_step=2)
        assert job_state(c, queued)["state"] == "queued"

        r = c.delete(f"/latentforge/v1/jobs/{queued}")  # queued: dropped, never runs
        assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text

        r = c.delete(f"/latentforge/v1/jobs/{running}")  # running: stops at its next step
        assert r.status_code == 200, r.text
        at_delete = r.json()["step"]
        j = wait_job(c, running)
        assert j["state"] == "cancelled" and "images" not in j, j
        assert (
            at_delete <= j["step"] <= at_delete + 3 and j["step"] < j["steps"] // 2 and j["steps"] == 150
        ), j

        q = job_state(c, queued)
        assert q["state"] == "cancelled" and q["started"] is None and q["step"] == 0 and "images" not in q, q
        time.sleep(0.3)  # the worker is free: a dropped job would have started by now
        q = job_state(c, queued)
        assert q["started"] is None and q["step"] == 0, q
        assert small.srv.queue.current is None
        assert c.post("/sdapi/v1/txt2img", json=GOOD).status_code == 200  # the queue goes on


def test_a_job_that_raises_fails_alone(live):
    """The denoiser returns NaN for one job (chosen by its prompt): that job fails with the Pipeline's NaN
    check's text, the jobs before and after it succeed."""
    srv = live.srv
    net = srv.models.pipeline(srv.options["sd_model_checkpoint"]).net
    forward = net.forward

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        job = srv.queue.current
        if job is not None and job.request.get("prompt") == "poison":
            return out.new_full(out.shape, float("nan"))
        return out

    net.forward = poisoned  # nn.Module.__call__ calls self.forward: the instance attribute wins
    try:
        with live.client() as c:
            before = long_job(c, seed=4, steps=3)
            bad = long_job(c, seed=5, steps=3, prompt="poison")
            after = long_job(c, seed=6, steps=3)
            assert wait_job(c, before)["state"] == "done"
            j = wait_job(c, bad)
            assert j["state"] == "failed", j
            assert "FloatingPointError" in j["error"] and "NaN" in j["error"], j["error"]
            j = wait_job(c, after)
            assert j["state"] == "done" and len(j["images"]) == 1, j.get("error")
            decode(j["images"][0])
            # on the A1111 route: A1111's answer to NaNs is a 500 with the error (not a black image)
            r = c.post("/sdapi/v1/txt2img", json=GOOD | {"prompt": "poison"})
            assert r.status_code == 500 and r.json()["error"] == "GenerationFailed", r.text
            assert "NaN" in r.json()["detail"]
            r = c.post("/sdapi/v1/txt2img", json=GOOD | {"prompt": "a red cube"})
            assert r.status_code == 200 and len(r.json()["images"]) == 1, r.text
    finally:
        del net.forward


def test_a1111_interrupt_returns_the_partial_image(live):
    with live.client() as c:
        result = {}

        def generate():
            with live.client() as c2:
                result["r"] = c2.post("/sdapi/v1/txt2img", json=GOOD | {"steps": 150, "seed": 7})

        thread = threading.Thread(target=generate)
        thread.start()

        def started():
            p = c.get("/sdapi/v1/progress").json()
            return p["current_task"] is not None and p["state"]["sampling_step"] >= 2 and p

        p = wait_until(started, 60, "the txt2img job to start")
        assert p["state"]["sampling_steps"] == 150
        assert c.post("/sdapi/v1/interrupt").status_code == 200
        thread.join(60)
        assert not thread.is_alive()
        r = result["r"]
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert info["interrupted"] is True and info["steps"] == 150
        im = decode(r.json()["images"][0])
        assert im.size == (64, 64)
        j = job_state(c, p["current_task"])
        assert j["state"] == "done" and j["step"] < 150 // 2, j


# -- API key, models ----------------------------------------------------------------------------------


def test_api_key_on_every_route():
    key = "s3cret-key"
    with live_server(api_key=key) as s, s.client() as c:
        routes = sorted(
            (method, re.sub(r"\{[^}]+\}", "nope", route.path))
            for route in s.app.routes
            for method in getattr(route, "methods", None) or ()
            if method not in ("HEAD", "OPTIONS")
        )
        paths = {p for _, p in routes}
        assert {"/", "/sdapi/v1/progress", "/latentforge/v1/jobs", "/sdapi/v1/txt2img"} <= paths
        for method, path in routes:
            r = c.request(method, path, json=GOOD if method == "POST" else None)
            assert r.status_code == 401, (method, path, r.status_code)
            assert "Basic" in r.headers.get("WWW-Authenticate", "")
        wrong = [
            {"headers": {"Authorization": "Bearer nope"}},
            {"headers": {"X-API-Key": "nope"}},
            {"auth": ("user", "nope")},
            {"auth": (key, "")},
            {"headers": {"Authorization": "Basic %%%"}},
            {"headers": {"Authorization": f"Bearer {key}x"}},
        ]
        for kw in wrong:
            assert c.get("/sdapi/v1/progress", **kw).status_code == 401, kw
        right = [
            {"headers": {"Authorization": f"Bearer {key}"}},
            {"headers": {"X-API-Key": key}},
            {"auth": ("anyone", key)},
            {"auth": ("", key)},
        ]
        for kw in right:
            for path in ("/", "/sdapi/v1/progress", "/latentforge/v1/jobs", "/sdapi/v1/options"):
                assert c.get(path, **kw).status_code == 200, (path, kw)
        r = c.post("/sdapi/v1/txt2img", json=GOOD, headers={"X-API-Key": key})
        assert r.status_code == 200 and len(r.json()["images"]) == 1


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/b", "..", "..\\x", "C:\\x", "no-such-model", ""])
def test_models_by_name_only(live, name):
    with live.client() as c:
        before = c.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
        r = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": name})
        assert r.status_code == 422 and names_field(r, "sd_model_checkpoint"), r.text
        r = c.post("/sdapi/v1/txt2img", json=GOOD | {"override_settings": {"sd_model_checkpoint": name}})
        assert r.status_code == 422 and names_field(r, "sd_model_checkpoint"), r.text
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == before
        r = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "default"})  # a name it has
        assert r.status_code == 200, r.text


# -- SIGTERM ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["jobs", "a1111"])
def test_sigterm_exits_cleanly_without_partial_files(tmp_path, api):
    """`latentforge serve` as a process, a long job saving its images (4 batches of 150 steps) running, either
    from the job API (answered at once) or from A1111's txt2img (the request waits on the job): SIGTERM stops
    the job at its next step, the process exits 0 within a few seconds, --outputs holds no temporary or
    partial file."""
    out, result = tmp_path / "outputs", {}
    req = GOOD | {"steps": 150, "n_iter": 4, "save_images": True}
    with serve_process(tmp_path, "--outputs", str(out)) as live:
        with live.client() as c:
            if api == "jobs":
                job_id = long_job(c, **req)
            else:

                def generate():
                    try:
                        with live.client() as c2:
                            result["r"] = c2.post("/sdapi/v1/txt2img", json=req)
                    except httpx.HTTPError as e:
                        result["r"] = e

                thread = threading.Thread(target=generate, daemon=True)
                thread.start()
                job_id = wait_until(lambda: c.get("/sdapi/v1/progress").json()["current_task"], 60, "the job")
            wait_running(c, job_id, min_step=2)
        t0 = time.monotonic()
        live.proc.send_signal(signal.SIGTERM)
        try:
            rc = live.proc.wait(30)
        except subprocess.TimeoutExpired:
            rc = None
        elapsed = time.monotonic() - t0
        text = live.log_text()
    print(f"\nSIGTERM ({api}): exit status {rc} after {elapsed:.2f} s")
    assert rc == 0 and elapsed < 10, f"exit status {rc} after {elapsed:.1f} s\n{text[-3000:]}"
    assert "Traceback" not in text, text[-3000:]
    if api == "a1111":
        thread.join(10)
        r = result.get("r")  # the waiting request was answered, not left hanging
        assert isinstance(r, httpx.Response) and r.status_code in (200, 409, 503), r
    names = sorted(os.listdir(out)) if out.exists() else []
    for name in names:  # complete PNGs only: no hidden temporary files, each one decodes whole
        assert re.fullmatch(r"\d{5}-\d+(-\d+)?\.png", name), names
        with Image.open(out / name) as im:
            im.load()
            assert im.size == (64, 64)
