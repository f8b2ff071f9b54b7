"""`latentforge serve`: A1111's `/sdapi/v1` HTTP API, latentforge's job API and the web page, in one process.

Every generation, from either API, goes through one JobQueue (jobs.py): a job id at once from
`POST /latentforge/v1/jobs`, its state from `GET .../jobs/{id}`, step progress and previews as server-sent
events from `GET .../jobs/{id}/events`, `DELETE` to cancel; the A1111 routes wait for their job's end.
Models are taken only by name, from `--models-dir` (top-level `.safetensors` files) or the shipped model;
LoRAs likewise, by the `<lora:name:w>` tags of prompts, from `--lora-dir` (`GET /sdapi/v1/loras` lists them);
ControlNets by the model names of sd-webui-controlnet units (`alwayson_scripts.controlnet.args`), from
`--controlnet-dir` (`GET /controlnet/model_list`, `module_list`, `version`: the extension's routes);
outputs are written only under `--outputs`, with generated names. Limits: `--max-queue` (HTTP 429 with
Retry-After beyond it), `--max-body` (413), `--max-pixels` and `--max-steps` (422 naming the field).
`--api-key` is required on every route when set (Bearer, X-API-Key, or HTTP Basic with the key as password,
which browsers and webuiapi's set_auth send), compared in constant time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import difflib
import hashlib
import hmac
import io
import json
import os
import re
import secrets
import signal
import threading
import time
from dataclasses import asdict, dataclass, replace

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from PIL import Image

import latentforge
from latentforge import hires, outputs, previews
from latentforge.lora import LoRAError
from latentforge.pipeline import DEFAULT_MODEL
from latentforge.server import a1111, controlnet_api
from latentforge.server.jobs import Job, JobQueue, QueueFull

WEB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 7860
    models_dir: str | None = None
    outputs: str | None = None
    api_key: str | None = None
    cors_origin: list[str] | None = None
    max_queue: int = 32
    max_body: int = 16 * 2**20  # bytes of one request body
    max_pixels: int = 2048 * 2048  # width × height × batch_size of one job
    max_steps: int = 150
    max_batch_count: int = 100  # A1111's n_iter of one job
    batch_jobs: int = 0  # > 0: waiting jobs that differ only in prompt and seed run as one batch of up to N
    keep_jobs: int = 64  # finished jobs remembered for GET
    model: str | None = None  # the model loaded first (default: the shipped one)
    lora_dir: str | None = None  # where <lora:name:w> tags in prompts find name.safetensors
    embeddings_dir: str | None = None  # textual inversions prompts name (file stem or embedding:name)
    controlnet_dir: str | None = None  # ControlNet units' models: name.safetensors there, named by stem
    # where and how the networks run (Pipeline.place; the flags of `generate`)
    dtype: str = "float32"
    device: str | None = None
    offload: bool = False
    channels_last: bool = False
    compile: str | None = None  # a torch.compile mode, None: off


# -- models -------------------------------------------------------------------------------------------


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_defaults(path: str) -> dict:
    """The generation settings a file of ours states in its metadata (steps, sampler, scheduler, cfg, width,
    height), read from the safetensors header alone; {} for other files (latentforge's extra key in the
    sd-models entries: a client can fill its form with them)."""
    from safetensors import safe_open

    try:
        with safe_open(path, "np") as f:
            meta = f.metadata() or {}
        out = json.loads(meta.get("latentforge.defaults", "{}"))
        if "latentforge.resolution" in meta:
            out["width"] = out["height"] = int(meta["latentforge.resolution"])
        return out if isinstance(out, dict) else {}
    except Exception:  # noqa: BLE001 - an unreadable header: no defaults
        return {}


class Models:
    """The models a client may name: the shipped one and the top-level `.safetensors` files of models_dir,
    listed under A1111's titles ("name.safetensors [hash]"); one pipeline kept loaded."""

    def __init__(
        self,
        models_dir: str | None,
        lora_dir: str | None = None,
        embeddings_dir: str | None = None,
        placement: Settings | None = None,
    ):
        for flag, folder in (("--models-dir", models_dir), ("--embeddings-dir", embeddings_dir)):
            if folder is not None and not os.path.isdir(folder):
                raise ValueError(f"{flag} {folder!r} is not a folder")
        self.models_dir, self.lora_dir, self.embeddings_dir = models_dir, lora_dir, embeddings_dir
        self.placement = placement or Settings()  # dtype, device, offload, channels_last, compile
        self._hashes: dict[tuple, str] = {}
        self._lock = threading.Lock()
        self._loaded: tuple[str, object] | None = None
        self.entries: list[dict] = []
        self.refresh()

    def refresh(self) -> None:
        files = [DEFAULT_MODEL]
        if self.models_dir is not None:
            names = sorted(n for n in os.listdir(self.models_dir) if n.endswith(".safetensors"))
            files += [os.path.join(self.models_dir, n) for n in names]
        entries = []
        for path in files:
            st = os.stat(path)
            key = (path, st.st_size, st.st_mtime_ns)
            if key not in self._hashes:
                self._hashes[key] = _sha256(path)
            sha = self._hashes[key]
            name = os.path.basename(path)
            entries.append({"title": f"{name} [{sha[:10]}]", "model_name": os.path.splitext(name)[0],
                            "hash": sha[:10], "sha256": sha, "filename": path, "config": None,
                            "defaults": _file_defaults(path)})  # fmt: skip
        self.entries = entries

    @property
    def default_title(self) -> str:
        return self.entries[0]["title"]

    def find(self, name: str, field: str = "sd_model_checkpoint") -> dict:
        """The entry for a title, file name or model name ("default": the shipped model); names with a path
        in them are refused."""
        if not isinstance(name, str) or not name.strip():
            raise a1111.RequestError(field, f"a model name is needed, got {name!r}")
        if "/" in name or "\\" in name or ".." in name or os.path.isabs(name):
            raise a1111.RequestError(field, f"{name!r}: models are named, not given as paths")
        if name == "default":
            return self.entries[0]
        for e in self.entries:
            if name in (e["title"], e["model_name"], os.path.basename(e["filename"])):
                return e
        titles = [e["title"] for e in self.entries]
        raise a1111.RequestError(field, f"no model {name!r}; the server has {titles} (refresh-checkpoints "
                                        "after adding files)")  # fmt: skip

    def pipeline(self, title: str):
        """The loaded pipeline of this model (loading it, and dropping the one before, if needed)."""
        import torch

        from latentforge.pipeline import Pipeline

        with self._lock:
            if self._loaded is None or self._loaded[0] != title:
                entry = self.find(title)
                self._loaded = None  # the old model is freed before the new one is read
                pl = self.placement
                pipe = Pipeline.from_single_file(
                    entry["filename"],
                    dtype=getattr(torch, pl.dtype),
                    lora_dir=self.lora_dir,
                    embeddings_dir=self.embeddings_dir,
                ).place(pl.device, pl.offload, pl.channels_last, pl.compile or False)
                self._loaded = (title, pipe)
            return self._loaded[1]


class Loras:
    """The LoRAs prompts may name: the top-level `.safetensors` files of lora_dir, listed in A1111's shape
    (`GET /sdapi/v1/loras`: name, alias, path, metadata) with the file name as path (never the server's
    folder). The pipeline finds tagged files on disk at every call; this list is what clients are shown,
    read again by `POST /sdapi/v1/refresh-loras`."""

    def __init__(self, lora_dir: str | None):
        if lora_dir is not None and not os.path.isdir(lora_dir):
            raise ValueError(f"--lora-dir {lora_dir!r} is not a folder")
        self.lora_dir = lora_dir
        self.entries: list[dict] = []
        self.refresh()

    def refresh(self) -> None:
        from latentforge.checkpoint_io import read_metadata
        from latentforge.lora import LoRAError, find_lora

        entries = []
        names = [] if self.lora_dir is None else sorted(os.listdir(self.lora_dir))
        for file in names:
            if not file.endswith(".safetensors"):
                continue
            name = file[: -len(".safetensors")]
            try:
                path = find_lora(name, self.lora_dir)  # a name a tag can use
                meta = read_metadata(path)
            except (LoRAError, ValueError, OSError):
                continue
            parsed = {}
            for k, v in meta.items():  # A1111 (read_metadata_from_safetensors): JSON objects parsed
                parsed[k] = v
                if isinstance(v, str) and v.startswith("{"):
                    with contextlib.suppress(ValueError, RecursionError):
                        parsed[k] = json.loads(v)
            alias = meta.get("ss_output_name") or name
            entries.append({"name": name, "alias": alias, "path": file, "metadata": parsed})
        self.entries = entries


class ControlNetFiles:
    """The ControlNets units may name: the top-level `.safetensors` files of controlnet_dir, named by file
    stem, listed as the extension lists them ("name [hash]": the first 8 hex digits of the file's sha256,
    computed once per size and mtime). The folder is read at every call: a file added is usable at once.
    Names, never paths: separators, `..` and other characters than find_lora's are refused."""

    NAME = re.compile(r"[\w .()\[\]+-]+")  # lora.find_lora's names

    def __init__(self, folder: str | None):
        if folder is not None and not os.path.isdir(folder):
            raise ValueError(f"--controlnet-dir {folder!r} is not a folder")
        self.folder = folder
        self._hashes: dict[tuple, str] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        if self.folder is None:
            return []
        files = sorted(n for n in os.listdir(self.folder) if n.endswith(".safetensors"))
        names = [n[: -len(".safetensors")] for n in files if os.path.isfile(os.path.join(self.folder, n))]
        return [n for n in names if self._valid(n)]

    @classmethod
    def _valid(cls, name: str) -> bool:
        return bool(cls.NAME.fullmatch(name)) and name.strip(". ") == name.strip() and ".." not in name

    def model_list(self) -> list[str]:
        out = []
        for name in self.names():
            path = os.path.join(self.folder, name + ".safetensors")
            try:
                st = os.stat(path)
                key = (path, st.st_size, st.st_mtime_ns)
                with self._lock:
                    sha = self._hashes.get(key)
                if sha is None:
                    sha = _sha256(path)
                    with self._lock:
                        self._hashes[key] = sha
            except OSError:  # gone since listed
                continue
            out.append(f"{name} [{sha[:8]}]")
        return out

    def find(self, name: str, field: str) -> str:
        """The file of a model name: "name", "name [hash]" (the hash is the list's; it is not checked),
        "name.safetensors"; any case when only one file matches."""
        if self.folder is None:
            raise a1111.RequestError(field, "this server was started without --controlnet-dir: it has no "
                                            "ControlNet models")  # fmt: skip
        given = name
        name = re.sub(r"\s*\[[0-9a-fA-F]{6,64}\]$", "", name.strip()).strip()  # A1111's " [hash]"
        if name.endswith(".safetensors"):
            name = name[: -len(".safetensors")]
        if "/" in name or "\\" in name or ".." in name or os.path.isabs(name) or not self._valid(name):
            raise a1111.RequestError(field, f"{given!r}: ControlNet models are named (letters, digits, "
                                            "spaces and ._-+()[]), not given as paths")  # fmt: skip
        names = self.names()
        if name not in names:
            same = [n for n in names if n.lower() == name.lower()]
            if len(same) != 1:
                close = difflib.get_close_matches(name, names, n=5, cutoff=0.4)
                has = f"closest: {close}" if close else f"the server has {names[:20]}" if names else (
                    "--controlnet-dir has no .safetensors files")  # fmt: skip
                raise a1111.RequestError(field, f"no ControlNet model {given!r}; {has} (GET "
                                                "/controlnet/model_list lists them)")  # fmt: skip
            name = same[0]
        return os.path.join(self.folder, name + ".safetensors")


def lora_key(prompt) -> tuple | None:
    """The LoRA tags of a prompt as a sortable key (batch_key); None when they do not parse."""
    from latentforge.lora import LoRAError, parse_tags

    try:
        return tuple(sorted(parse_tags(prompt)[1]))
    except (LoRAError, TypeError):
        return None


# -- middleware ---------------------------------------------------------------------------------------


class Guard:
    """ASGI middleware: the API key on every route, and request bodies over max_body refused with 413
    before the app sees them (the body is read here, up to the limit, and handed on)."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    def _authorised(self, headers: dict[bytes, bytes]) -> bool:
        key = self.api_key.encode()
        given = headers.get(b"x-api-key")
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        elif auth[:6].lower() == b"basic ":
            try:
                given = base64.b64decode(auth[6:].strip()).partition(b":")[2]
            except ValueError:
                given = None
        return given is not None and hmac.compare_digest(given, key)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["method"] != "OPTIONS" and not self._authorised(headers):
            r = JSONResponse({"detail": "an API key is required (Authorization: Bearer KEY, X-API-Key, "
                                        "or HTTP Basic with the key as password)"}, 401,
                             headers={"WWW-Authenticate": 'Basic realm="latentforge"'})  # fmt: skip
            return await r(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await self._too_large(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                return await self._too_large(scope, receive, send)
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        return await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        r = JSONResponse({"detail": f"the request body is over the server's --max-body {self.max_body} "
                                    "bytes"}, 413)  # fmt: skip
        await r(scope, receive, send)


# -- the app ------------------------------------------------------------------------------------------


def _error(e: a1111.RequestError, status: int = 422) -> JSONResponse:
    return JSONResponse({"detail": [{"loc": ["body", e.field], "msg": e.message, "type": "value_error"}]},
                        status)  # fmt: skip


class Server:
    """The state behind the routes: settings, models, options, the queue."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.models = Models(settings.models_dir, settings.lora_dir, settings.embeddings_dir, settings)
        self.loras = Loras(settings.lora_dir)
        self.controlnets = ControlNetFiles(settings.controlnet_dir)
        first = self.models.find(settings.model, "--model") if settings.model else self.models.entries[0]
        self.options = {"sd_model_checkpoint": first["title"], "sd_checkpoint_hash": first["sha256"],
                        "live_previews_enable": True, "show_progress_every_n_steps": 1,
                        "samples_format": "png", "outdir_samples": settings.outputs or ""}  # fmt: skip
        self.queue = JobQueue(self._run, settings.max_queue, settings.keep_jobs, self.batch_key,
                              settings.batch_jobs)  # fmt: skip

    # the worker thread
    def _run(self, jobs: list[Job]) -> list[list[Image.Image]]:
        if len(jobs) > 1:
            return self._run_merged(jobs)
        job = jobs[0]
        pipe = self.models.pipeline(job.model)
        if job.kind == "load":
            return [[]]
        kw, b = job.kwargs, job.kwargs["batch_size"]
        job.steps = job.planned_steps
        callback = previews.chain(job.tick, self._preview_hook(pipe, [job], [0]))
        images: list[Image.Image] = []
        for j in range(job.batch_count):  # A1111's n_iter: batch j takes seeds seed + j·batch_size + k
            if job.cancelled or job.interrupted:
                break
            job.skipped, job.batch = False, j
            kj = kw | {"seed": kw["seed"] + j * b}
            if "subseed" in kw:
                kj["subseed"] = kw["subseed"] + j * b
            images += pipe(**kj, progress=False, callback=callback, stop=job.should_stop)
        if not job.cancelled:
            job.result = self._result(job, images)
        return [images]

    def _preview_hook(self, pipe, jobs: list[Job], starts: list[int]):
        """The sampler callback that hands each job its image's x̂₀ every `show_progress_every_n_steps`
        steps (None with live previews off); the linear preview's picture is made only when a client asks
        for it (Job.preview), so previews cost the generation a copy of the latent."""
        every = self.options["show_progress_every_n_steps"] if self.options["live_previews_enable"] else 0
        if every <= 0:
            return None
        previewer = previews.Previewer("linear", every).prepare(pipe)

        def decode(z):
            return previewer(pipe, z)

        def hook(d: dict) -> None:
            step = d["i"] + 1
            if step % every == 0:
                z = d["denoised"].detach().clone()
                for j, a in zip(jobs, starts, strict=True):
                    j.set_preview(step, z[a : a + 1], decode)

        return hook

    @staticmethod
    def batch_key(job: Job):
        """Jobs with equal keys can be sampled as one batch (`--batch-jobs`): one-batch text-to-image jobs
        that differ only in prompt, negative prompt, seed and batch size, whose prompts name the same LoRAs
        with the same weights (a batch has one set of LoRAs) and that ask for the same speed options (one
        sampling pass has one: a1111.SPEEDUPS) and the same prompt completion. None: never merged."""
        kw = job.kwargs
        if job.kind != "txt2img" or job.batch_count != 1 or any(k in kw for k in a1111.NOT_MERGED):
            return None
        loras = lora_key(kw["prompt"])
        if loras is None:
            return None
        settings = [kw[k] for k in ("steps", "sampler", "scheduler", "cfg", "width", "height")]
        settings += [kw.get(k) for k in a1111.SPEEDUPS]  # None: off (left out of kw)
        settings.append(kw.get("complete_prompt"))  # one sampling call completes all prompts alike
        return (job.model, *settings, loras)

    def _run_merged(self, jobs: list[Job]) -> list[list[Image.Image]]:
        """One batch for several jobs: per-image prompts and seeds, so each image is the one its job gives
        alone (up to float rounding in batched arithmetic); it stops when every job asks to."""
        pipe = self.models.pipeline(jobs[0].model)
        sizes = [j.kwargs["batch_size"] for j in jobs]
        prompts, negatives, seeds = [], [], []
        for j, b in zip(jobs, sizes, strict=True):
            prompts += [j.kwargs["prompt"]] * b
            negatives += [j.kwargs["negative_prompt"]] * b
            seeds += [j.kwargs["seed"] + k for k in range(b)]
        kw = jobs[0].kwargs | {"prompt": prompts, "negative_prompt": negatives, "seed": seeds,
                               "batch_size": len(seeds)}  # fmt: skip
        steps = pipe.job_steps(**kw)
        starts = [sum(sizes[:i]) for i in range(len(jobs))]
        for j in jobs:
            j.steps = steps

        def tick(info: dict) -> None:
            for j in jobs:
                j.tick(info)

        stop = lambda: all(j.should_stop() for j in jobs)  # noqa: E731
        callback = previews.chain(tick, self._preview_hook(pipe, jobs, starts))
        images = pipe(**kw, progress=False, callback=callback, stop=stop)
        out = []
        for j, a, b in zip(jobs, starts, sizes, strict=True):
            mine = images[a : a + b]
            if not j.cancelled:
                j.result = self._result(j, mine)
                j.result["info"]["batched_with"] = len(jobs) - 1
            out.append(mine)
        return out

    def _result(self, job: Job, images: list[Image.Image]) -> dict:
        entry = self.models.find(job.model)
        name, short = entry["model_name"], entry["hash"]
        try:
            lora_hashes = self.models.pipeline(job.model).lora_hashes(job.kwargs["prompt"])
        except (ValueError, OSError):  # a file gone since the job ran: no hashes rather than no images
            lora_hashes = None
        extra = getattr(job, "controlnet_fields", None)  # make_job's
        prompts = self._image_prompts(job, len(images))
        completion = self.models.pipeline(job.model).prompt_completion(job.kwargs.get("complete_prompt"))
        texts = a1111.infotexts(job.kwargs, len(images), name, short, lora_hashes, extra, prompts, completion)
        saved = []
        if job.request.get("save_images") and self.settings.outputs:
            for i, im in enumerate(images):
                seed = job.kwargs["seed"] + i
                saved.append(outputs.save_png(im, self.settings.outputs, texts[i], seed))
        encoded = [a1111.encode_png(outputs.png_bytes(im, t, compress_level=1))
                   for im, t in zip(images, texts, strict=True)]  # fmt: skip
        req = job.request_model
        info = a1111.info(req, job.kwargs, len(images), texts, name, short, job.interrupted, extra, prompts)
        return {"images": encoded if req.send_images else [], "info": info, "saved": len(saved)}

    def _image_prompts(self, job: Job, n: int) -> list[str]:
        """The prompt each of the job's first n images was made from (Pipeline.image_prompts: the request's,
        or completed), batch by batch as `_run` samples them."""
        kw, b = job.kwargs, job.kwargs["batch_size"]
        pipe, out = self.models.pipeline(job.model), []
        for j in range(-(-n // b)):
            kj = kw | {"seed": kw["seed"] + j * b}
            out += pipe.image_prompts(**kj)
        return out[:n]

    # requests -> jobs
    def make_job(self, kind: str, req: a1111.Txt2Img) -> Job:
        """Check the request against the model it names and the limits (422 naming the field)."""
        s = self.settings
        if req.save_images and not s.outputs:
            raise a1111.RequestError("save_images", "the server was started without --outputs")
        over = a1111.overrides(req)
        title = self.options["sd_model_checkpoint"]
        if "sd_model_checkpoint" in over:  # the other keys: A1111's token merging settings (speedup_args)
            title = self.models.find(over["sd_model_checkpoint"])["title"] or title
        pipe = self.models.pipeline(title)
        seed, subseed = secrets.randbelow(2**32), secrets.randbelow(2**32)
        kw, count = a1111.pipeline_args(req, pipe, seed, subseed, s.max_pixels, s.max_steps,
                                        s.max_batch_count)  # fmt: skip
        controls, control_fields = controlnet_api.controlnet_args(
            req, kw, self.controlnets.find, s.max_pixels
        )
        if controls:
            kw["controlnet"] = controls
            if kw.get("cache_interval", 1) > 1:  # the pipeline's refusal, before queueing (_sample)
                raise a1111.RequestError("cache_interval", "cache_interval (DeepCache) skips the UNet blocks "
                                         "a ControlNet adds to: use one or the other")  # fmt: skip
        try:
            steps = pipe.job_steps(**kw, batch_count=count)  # the pipeline's own checks, before queueing
        except LoRAError as e:  # a bad tag, a LoRA name the folder does not have
            raise a1111.RequestError("negative_prompt" if "negative_prompt" in str(e) else "prompt",
                                     str(e)) from None  # fmt: skip
        except (ValueError, TypeError) as e:
            raise a1111.RequestError("request", str(e)) from None
        echo = controlnet_api.echo_without_control_images(req.model_dump())
        if kind == "img2img":
            echo |= {"init_images": None, "mask": None}  # A1111 does not echo the images back
        job = Job(kind, title, kw, count, echo)
        job.request_model, job.planned_steps = req, steps
        job.controlnet_fields = control_fields  # the infotext's "ControlNet k" (_result)
        return job

    def job_json(self, job: Job, images: bool = True) -> dict:
        out = {"id": job.id, "kind": job.kind, "model": job.model, "state": job.state,
               "position": self.queue.position(job), "step": job.step, "steps": job.steps,
               "batch": job.batch, "batch_count": job.batch_count, "progress": job.progress,
               "seed": job.kwargs.get("seed"),
               "eta": job.eta(), "error": job.error, "created": job.created, "started": job.started,
               "finished": job.finished}  # fmt: skip
        if job.result is not None:
            out["info"] = job.result["info"]
            if images:
                out["images"] = job.result["images"]
        return out


async def wait(job: Job) -> None:
    loop = asyncio.get_running_loop()
    ev = asyncio.Event()
    job.add_done_callback(lambda: loop.call_soon_threadsafe(ev.set))
    await ev.wait()


def _preview_png(job: Job) -> str | None:
    image = job.preview
    return None if image is None else _png(image)


def _png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # a transient preview: fast rather than small
    return base64.b64encode(buf.getvalue()).decode("ascii")


def build_app(settings: Settings) -> FastAPI:
    from contextlib import asynccontextmanager

    srv = Server(settings)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(srv.queue.close)  # SIGTERM: queued jobs cancelled, the running one stopped

    app = FastAPI(title="latentforge", version=latentforge.__version__, lifespan=lifespan)
    app.state.server = srv

    @app.exception_handler(a1111.RequestError)
    async def request_error(request: Request, e: a1111.RequestError):
        return _error(e)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        # FastAPI's 422 less its `input` echo: a NaN or a lone surrogate there cannot be written as JSON
        # (the 422 would become a 500)
        errors = [{"loc": list(err["loc"]), "msg": err["msg"], "type": err["type"]} for err in e.errors()]
        return JSONResponse({"detail": errors}, 422)

    async def submit(kind: str, req: a1111.Txt2Img) -> Job:
        job = await run_in_threadpool(srv.make_job, kind, req)
        try:
            return srv.queue.submit(job)
        except QueueFull as e:
            raise HTTPException(429, str(e), headers={"Retry-After": "5"}) from None

    async def a1111_response(kind: str, req: a1111.Txt2Img):
        job = await submit(kind, req)
        await wait(job)
        if job.state == "failed":
            return JSONResponse(
                {"error": "GenerationFailed", "detail": job.error}, 422 if job.invalid else 500
            )
        if job.state == "cancelled":
            return JSONResponse({"error": "Cancelled", "detail": "the job was cancelled"}, 409)
        r = job.result
        return {"images": r["images"], "parameters": job.request, "info": a1111.dumps(r["info"])}

    # -- A1111 ----------------------------------------------------------------------------------------

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(req: a1111.Txt2Img):
        return await a1111_response("txt2img", req)

    @app.post("/sdapi/v1/img2img")
    async def img2img(req: a1111.Img2Img):
        return await a1111_response("img2img", req)

    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False):
        job = srv.queue.current
        idle = {
            "skipped": False,
            "interrupted": False,
            "stopping_generation": False,
            "job": "",
            "job_count": 0,
            "job_timestamp": "0",
            "job_no": 0,
            "sampling_step": 0,
            "sampling_steps": 0,
        }
        if job is None:
            return {"progress": 0.0, "eta_relative": 0.0, "state": idle, "current_image": None,
                    "textinfo": None, "current_task": None}  # fmt: skip
        state = idle | {"skipped": job.skipped, "interrupted": job.interrupted,
                        "job": f"Batch {job.batch + 1} out of {job.batch_count}",
                        "job_count": job.batch_count, "job_no": job.batch, "sampling_step": job.step,
                        "sampling_steps": job.steps}  # fmt: skip
        image = None if skip_current_image else await run_in_threadpool(_preview_png, job)
        return {"progress": job.progress, "eta_relative": job.eta(), "state": state, "current_image": image,
                "textinfo": f"step {job.step} of {job.steps}", "current_task": job.id}  # fmt: skip

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        srv.queue.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    async def skip():
        srv.queue.skip()
        return {}

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return a1111.samplers()

    @app.get("/sdapi/v1/schedulers")
    async def schedulers():
        return a1111.schedulers()

    @app.get("/sdapi/v1/upscalers")
    async def upscalers():
        return [{"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
                for n, v in hires.UPSCALERS.items() if v[0] == "image"]  # fmt: skip

    @app.get("/sdapi/v1/latent-upscale-modes")
    async def latent_modes():
        return [{"name": n} for n, v in hires.UPSCALERS.items() if v[0] == "latent"]

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return srv.models.entries

    @app.get("/sdapi/v1/sd-vae")
    async def sd_vae():
        return []

    @app.get("/sdapi/v1/scripts")
    async def scripts():
        # A1111 lists its always-on scripts too, by lowercased title: the extension shows as "controlnet"
        names = ["controlnet"] if settings.controlnet_dir else []
        return {"txt2img": names, "img2img": list(names)}

    @app.post("/sdapi/v1/refresh-checkpoints")
    async def refresh():
        await run_in_threadpool(srv.models.refresh)
        return {}

    @app.get("/sdapi/v1/loras")
    async def loras():
        return srv.loras.entries

    @app.get("/sdapi/v1/embeddings")
    async def embeddings():
        """A1111's shape: {loaded: {name: {step, sd_checkpoint, sd_checkpoint_name, shape, vectors}},
        skipped: {name: {reason}}}."""
        pipe = await run_in_threadpool(srv.models.pipeline, srv.options["sd_model_checkpoint"])
        ti = pipe.embeddings
        if ti is None:
            return {"loaded": {}, "skipped": {}}
        loaded = {}
        for name, e in ti.embeddings.items():
            width = max(v.shape[-1] for v in e.vectors.values())
            loaded[name] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": width,
                            "vectors": e.n_vectors}  # fmt: skip
        return {"loaded": loaded, "skipped": {name: {"reason": why} for name, why in ti.refused.items()}}

    # -- sd-webui-controlnet's routes ------------------------------------------------------------------

    @app.get("/controlnet/version")
    async def controlnet_version():
        return {"version": controlnet_api.CONTROLNET_API_VERSION}

    @app.get("/controlnet/model_list")
    async def controlnet_model_list(update: bool = True):
        # update: the extension's rescan flag; the folder is read at every call here
        return {"model_list": await run_in_threadpool(srv.controlnets.model_list)}

    @app.get("/controlnet/module_list")
    async def controlnet_module_list(alias_names: bool = False):
        # every name units may send (the extension's names and aliases, ours), and which of ours it runs
        # (controlnet_api.CONTROLNET_MODULES); no sliders: ours take no parameters but canny's thresholds
        modules = controlnet_api.CONTROLNET_MODULES
        names = list(modules)
        detail = {n: {"model_free": False, "sliders": [], "preprocessor": modules[n]} for n in names}
        return {"module_list": names, "module_detail": detail}

    @app.post("/sdapi/v1/refresh-loras")
    async def refresh_loras():
        await run_in_threadpool(srv.loras.refresh)
        return {}

    @app.get("/sdapi/v1/options")
    async def get_options():
        return srv.options

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request):
        try:
            body = await request.json()
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
            raise a1111.RequestError("body", "not valid JSON") from None
        if not isinstance(body, dict):
            raise a1111.RequestError("body", "expected a JSON object of option: value")
        a1111.check_json(list(body), "body")  # the keys first: an unknown one is named in the answer
        for k, v in body.items():
            a1111.check_json(v, k)
        unknown = sorted(set(body) - set(srv.options) - {"sd_checkpoint_hash"})
        if unknown:
            raise a1111.RequestError(
                unknown[0], f"not an option this server has; options: {list(srv.options)}"
            )
        new = dict(body)
        if "show_progress_every_n_steps" in new:
            n = new["show_progress_every_n_steps"]
            if isinstance(n, bool) or not isinstance(n, int) or n < -1:
                raise a1111.RequestError("show_progress_every_n_steps", f"an integer >= -1, got {n!r}")
        live = new.get("live_previews_enable", False)
        if not isinstance(live, bool):
            raise a1111.RequestError("live_previews_enable", f"true or false, got {live!r}")
        for k in ("samples_format", "outdir_samples", "sd_checkpoint_hash"):
            if k in new and new[k] != srv.options.get(k):
                raise a1111.RequestError(k, "set by the server's command line; cannot be changed")
        if "sd_model_checkpoint" in new:
            entry = srv.models.find(new["sd_model_checkpoint"])
            job = Job("load", entry["title"], {})
            try:
                srv.queue.submit(job)
            except QueueFull as e:
                raise HTTPException(429, str(e), headers={"Retry-After": "5"}) from None
            await wait(job)  # loaded in turn, after the jobs queued before
            if job.state != "done":
                return JSONResponse({"error": "LoadFailed", "detail": job.error}, 500)
            new |= {"sd_model_checkpoint": entry["title"], "sd_checkpoint_hash": entry["sha256"]}
        srv.options.update(new)
        return None

    @app.get("/sdapi/v1/cmd-flags")
    async def cmd_flags():
        out = asdict(settings) | {"api_key": settings.api_key is not None}
        return out | {"models": [e["title"] for e in srv.models.entries]}

    @app.post("/sdapi/v1/png-info")
    async def png_info(req: a1111.PngInfoRequest):
        def read() -> str | None:
            im = a1111.decode_image(req.image, "image", settings.max_pixels)
            return im.info.get("parameters")

        return a1111.png_info(await run_in_threadpool(read))

    # -- latentforge's job API ------------------------------------------------------------------------

    @app.post("/latentforge/v1/jobs", status_code=202)
    async def new_job(request: Request):
        try:
            body = await request.json()
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
            raise a1111.RequestError("body", "not valid JSON") from None
        if not isinstance(body, dict):
            raise a1111.RequestError("body", "expected a JSON object")
        kind = body.pop("mode", "img2img" if body.get("init_images") else "txt2img")
        if kind not in ("txt2img", "img2img"):
            raise a1111.RequestError("mode", f"txt2img or img2img, got {kind!r}")
        model = a1111.Img2Img if kind == "img2img" else a1111.Txt2Img
        from pydantic import ValidationError

        try:
            req = model.model_validate(body)
        except ValidationError as e:
            errors = [
                {"loc": ["body", *err["loc"]], "msg": err["msg"], "type": err["type"]} for err in e.errors()
            ]
            return JSONResponse({"detail": errors}, 422)
        job = await submit(kind, req)
        return srv.job_json(job)

    def find_job(job_id: str) -> Job:
        job = srv.queue.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r} (finished jobs are kept for the last "
                                     f"{settings.keep_jobs})")  # fmt: skip
        return job

    @app.get("/latentforge/v1/jobs")
    async def list_jobs():
        return [srv.job_json(j, images=False) for j in srv.queue.jobs()]

    @app.get("/latentforge/v1/jobs/{job_id}")
    async def get_job(job_id: str):
        return srv.job_json(find_job(job_id))

    @app.delete("/latentforge/v1/jobs/{job_id}")
    async def cancel_job(job_id: str):
        job = srv.queue.cancel(find_job(job_id))
        return srv.job_json(job, images=False)

    @app.get("/latentforge/v1/jobs/{job_id}/events")
    async def job_events(job_id: str):
        job = find_job(job_id)

        async def events():
            seen, shown = -1, 0
            while True:
                if job.version != seen:
                    seen = job.version
                    if job.done.is_set():
                        yield f"event: {job.state}\ndata: {json.dumps(srv.job_json(job))}\n\n"
                        return
                    yield f"event: progress\ndata: {json.dumps(srv.job_json(job, images=False))}\n\n"
                    step, count = job.preview_step, job.previews
                    if count and count != shown:
                        shown = count
                        image = await run_in_threadpool(_preview_png, job)
                        if image is not None:
                            yield f"event: preview\ndata: {json.dumps({'step': step, 'image': image})}\n\n"
                await asyncio.sleep(0.05)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})  # fmt: skip

    # -- the page -------------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(os.path.join(WEB, "index.html"), media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(status_code=204)

    if settings.cors_origin:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origin, allow_methods=["*"],
                           allow_headers=["*"])  # fmt: skip
    app.add_middleware(Guard, api_key=settings.api_key, max_body=settings.max_body)
    return app


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(settings: Settings, start_timeout: float = 60.0):
    """The server on a background thread while the block runs (scripts, notebooks, tests); yields its base
    URL ("http://HOST:PORT/") and app. Port 0: a free one. It is stopped (jobs cancelled) at the end."""
    import uvicorn

    if settings.port == 0:
        settings = replace(settings, port=_free_port(settings.host))
    app = build_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning",
                            timeout_graceful_shutdown=5)  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="latentforge-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server did not start on {settings.host}:{settings.port}")
        time.sleep(0.02)
    try:
        yield f"http://{settings.host}:{settings.port}/", app
    finally:
        app.state.server.queue.close(timeout=5)
        server.should_exit = True
        thread.join(15)


def serve(settings: Settings) -> None:
    """Run the server until SIGINT/SIGTERM (uvicorn); the running job stops at its next step on shutdown."""
    import uvicorn
    from uvicorn.server import HANDLED_SIGNALS

    if settings.host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        print(f"warning: serving on {settings.host} without --api-key: anyone who can reach it can use it")
    app = build_app(settings)
    queue = app.state.server.queue

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # stop the jobs at once (on a thread: the signal may arrive while the queue's lock is held), so
            # open event streams and waiting A1111 calls end with the jobs' final state before uvicorn waits
            # for them
            threading.Thread(target=queue.close, daemon=True).start()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn's, less the re-raise of the signal after the shutdown (uvicorn >= 0.29), which ends the
            # process "killed by SIGTERM" (exit status -15, 143 in a shell) after a clean shutdown: exit 0
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                            timeout_graceful_shutdown=30)  # fmt: skip
    Server(config).run()
