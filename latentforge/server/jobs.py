"""The server's job queue: one worker thread runs generation jobs in the order they came; every job can be
watched (step, total, live preview), cancelled while queued, and stopped at its next step while running.

A1111 serialises its API calls under one lock and has no queue; here the A1111 routes and latentforge's own
job routes share this queue, so a progress call is never stuck behind a running job. The worker calls
`run(job)`, which the server supplies (model loading and the pipeline call); `run` reports through
`job.tick`, `job.set_preview` and asks `job.should_stop` after every step (Pipeline's `stop`). A preview is
kept as the sampler's x̂₀ latent and made into a picture only when a client asks for it (`job.preview`), so
nobody watching costs the generation nothing.
"""

from __future__ import annotations

import collections
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

STATES = ("queued", "running", "done", "failed", "cancelled")


class QueueFull(Exception):
    """More than `max_queue` jobs wait; the client should retry later (HTTP 429 with Retry-After)."""


@dataclass(eq=False)
class Job:
    """One request: `kind` ("txt2img" | "img2img"), the model's name, the Pipeline arguments of one batch
    (`kwargs`) and the batch count; `request` is the client's request as given (echoed back)."""

    kind: str
    model: str
    kwargs: dict
    batch_count: int = 1
    request: dict = field(default_factory=dict)
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    state: str = "queued"
    step: int = 0  # steps done, over all batches
    steps: int = 0  # the job's total (known once it runs)
    planned_steps: int = 0  # the total Pipeline.job_steps gave when the job was made
    batch: int = 0  # the batch being sampled (A1111's job_no)
    error: str | None = None
    invalid: bool = False  # the error is the request's (a ValueError): HTTP 422, not 500
    images: list[Image.Image] = field(default_factory=list)
    result: Any = None  # what the server built from the images (the response body)
    request_model: Any = None  # the parsed request (the server's)
    preview_step: int = 0
    previews: int = 0  # previews made so far (steps restart in every pass; this does not)
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    interrupted: bool = False  # A1111's interrupt: end now, keep what was made
    skipped: bool = False  # A1111's skip: end the current batch, go on with the next
    cancelled: bool = False  # DELETE: end now, keep nothing
    version: int = 0  # bumped on every change (the event stream waits on it)
    done: threading.Event = field(default_factory=threading.Event)
    _callbacks: list = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # the newest preview: (count, x̂₀ [1, C, h, w], decode: latent -> images), and its picture once made
    _latent: tuple | None = None
    _picture: tuple[int, Image.Image] | None = None
    _picture_lock: threading.Lock = field(default_factory=threading.Lock)

    def add_done_callback(self, fn: Callable[[], None]) -> None:
        """fn() once the job has finished (at once if it has); called on the worker thread."""
        with self._lock:
            if not self.done.is_set():
                self._callbacks.append(fn)
                return
        fn()

    def _set_done(self) -> None:
        with self._lock:
            self.done.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn()

    def should_stop(self) -> bool:
        return self.cancelled or self.interrupted or self.skipped

    def tick(self, info: dict | None = None) -> None:
        self.step += 1
        self.version += 1

    def set_preview(self, step: int, latent, decode: Callable[[Any], list[Image.Image]]) -> None:
        """Keep x̂₀ after `step` (latent [1, C, h, w], not to be changed afterwards) for a preview that
        decode(latent)[0] makes when asked for (the worker thread only stores it)."""
        with self._lock:
            self._latent = (self.previews + 1, latent, decode)
            self.preview_step = step
            self.previews += 1
        self.version += 1

    @property
    def preview(self) -> Image.Image | None:
        """The newest preview picture, made now if it was not yet (blocking: call it off the event loop)."""
        with self._picture_lock:
            with self._lock:
                latent = self._latent
            if latent is None:
                return None
            count, z, decode = latent
            if self._picture is None or self._picture[0] != count:
                self._picture = (count, decode(z)[0])
            return self._picture[1]

    def clear_preview(self) -> None:
        with self._lock:
            self._latent = None
        with self._picture_lock:
            self._picture = None

    @property
    def progress(self) -> float:
        if self.state == "done":
            return 1.0
        return min(1.0, self.step / self.steps) if self.steps else 0.0

    def eta(self) -> float:
        """Seconds left, from the rate so far (0 before the first step)."""
        if self.state != "running" or not self.step or self.started is None:
            return 0.0
        return (time.time() - self.started) / self.step * max(0, self.steps - self.step)


class JobQueue:
    """Jobs in order on a worker thread. max_queue: jobs that may wait (not counting the running ones);
    keep: finished jobs remembered for GET (the oldest are forgotten first). `run(jobs)` makes the images of
    each job of a group; a group is one job, or, with batch_key and max_images > 0, the next job and the
    waiting ones with the same batch_key(job) (not None), up to max_images images in all: requests that
    differ only in prompt and seed are sampled as one batch."""

    def __init__(
        self,
        run: Callable[[list[Job]], list[list[Image.Image]]],
        max_queue: int = 32,
        keep: int = 64,
        batch_key: Callable[[Job], Any] | None = None,
        max_images: int = 0,
    ):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self._run = run
        self.max_queue = max_queue
        self.keep = keep
        self.batch_key, self.max_images = batch_key, max_images
        self._cv = threading.Condition()
        self._pending: collections.deque[Job] = collections.deque()
        self._jobs: dict[str, Job] = {}
        self.running: list[Job] = []
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name="latentforge-jobs", daemon=True)
        self._worker.start()

    @property
    def current(self) -> Job | None:
        running = self.running
        return running[0] if running else None

    # -- clients --------------------------------------------------------------------------------------

    def submit(self, job: Job) -> Job:
        with self._cv:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} jobs are waiting (the limit is {self.max_queue})")
            self._pending.append(job)
            self._jobs[job.id] = job
            self._forget_old()
            self._cv.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def jobs(self) -> list[Job]:
        with self._cv:
            return list(self._jobs.values())

    def position(self, job: Job) -> int | None:
        """0 for the running job, k for the k-th waiting one, None when finished."""
        with self._cv:
            if job in self.running:
                return 0
            try:
                return self._pending.index(job) + 1
            except ValueError:
                return None

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def cancel(self, job: Job) -> Job:
        """A queued job is dropped; a running one stops at its next step and keeps nothing."""
        with self._cv:
            if job.state == "queued":
                self._pending.remove(job)
                self._finish(job, "cancelled")
            elif job.state == "running":
                job.cancelled = True
                job.version += 1
        return job

    def interrupt(self) -> None:
        """A1111's interrupt: the running job ends at its next step with what it has."""
        for job in self.running:
            job.interrupted = True
            job.version += 1

    def skip(self) -> None:
        """A1111's skip: the running job's current batch ends at its next step; the next batch goes on."""
        for job in self.running:
            job.skipped = True
            job.version += 1

    def close(self, timeout: float = 30.0) -> None:
        """Cancel the waiting jobs, stop the running one at its next step, and wait for the worker."""
        with self._cv:
            self._closed = True
            while self._pending:
                self._finish(self._pending.popleft(), "cancelled")
            for job in self.running:
                job.cancelled = True
            self._cv.notify_all()
        self._worker.join(timeout)

    # -- the worker -----------------------------------------------------------------------------------

    def _take(self) -> list[Job]:
        """The next group (the queue's lock held)."""
        group = [self._pending.popleft()]
        key = self.batch_key(group[0]) if self.batch_key is not None and self.max_images > 0 else None
        if key is not None:
            images = group[0].kwargs["batch_size"]
            for job in list(self._pending):
                n = job.kwargs.get("batch_size", 1)
                if images + n <= self.max_images and self.batch_key(job) == key:
                    self._pending.remove(job)
                    group.append(job)
                    images += n
        return group

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                group = self.running = self._take()
                for job in group:
                    job.state, job.started = "running", time.time()
                for j in (*group, *self._pending):  # every waiting job moved up
                    j.version += 1
            states = ["done"] * len(group)
            try:
                for k, (job, images) in enumerate(zip(group, self._run(group), strict=True)):
                    job.images = images
                    if job.cancelled:
                        job.images, states[k] = [], "cancelled"
            except Exception as e:  # noqa: BLE001 - the job fails alone; the server keeps serving
                for k, job in enumerate(group):
                    job.error = f"{type(e).__name__}: {e}"
                    job.invalid = isinstance(e, (ValueError, TypeError))
                    states[k] = "cancelled" if job.cancelled else "failed"
            with self._cv:
                self.running = []
                for job, state in zip(group, states, strict=True):
                    self._finish(job, state)

    def _finish(self, job: Job, state: str) -> None:
        job.state, job.finished = state, time.time()
        job.clear_preview()
        job.version += 1
        job._set_done()

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.done.is_set()]
        for j in finished[: max(0, len(finished) - self.keep)]:
            del self._jobs[j.id]
