"""A training run's folder: made ready before anything is built in it, and never shared by two runs.

`claim(out, cfg, resume, world)` holds an exclusive OS lock on `<out>/.lock` for the run's lifetime (a
second run into the folder is refused naming the first's pid), refuses to resume what is not a run, refuses a
new run into a non-empty folder it did not create (`overwrite` moves the old contents aside), and removes
what a killed run left (temporary files, half-written or half-pruned step folders).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time

from latentforge.training import dist
from latentforge.training.state import clean_leftovers, step_dirs

_TEMP = re.compile(r"^\..+\.tmp-\d+$")  # files.temp_name: what a killed write leaves beside its target


class _Lock:
    """An exclusive `fcntl.flock` on `<out>/.lock`, held for the run's lifetime (the OS drops it when the
    process ends, also by SIGKILL); the holder's pid is written into the file for the other's message."""

    def __init__(self, out: str):
        self.path = os.path.join(out, ".lock")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid = os.read(self.fd, 64).decode("ascii", "replace").strip() or "unknown"
            finally:
                os.close(self.fd)
            raise ValueError(
                f"{out!r} is in use by another run (process {pid}); wait for it to end or choose "
                "another --out"
            ) from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)


@contextlib.contextmanager
def claim(out: str, cfg, resume: bool, world: dist.World, dry_run: bool = False):
    """The run folder made ready before anything is built in it (rank 0 only; the others wait): create it,
    lock it (a second run into it is refused naming the first's pid), refuse to resume what is not a run,
    refuse a new run into a non-empty folder it did not create (`cfg.overwrite`: its contents are moved
    aside into `<out>/.old-<time>/`), and remove what a killed run left (temporary files, half-written or
    half-pruned step folders). The lock is held until the block ends. A dry run touches nothing."""
    if dry_run:
        yield
        return
    lock = None

    def prepare() -> None:  # rank 0; an error in it is raised on every rank (dist.main_first)
        nonlocal lock
        if resume:
            missing = missing_for_resume(out)
            if missing:
                raise ValueError(f"cannot resume {out!r}: {missing}")
        os.makedirs(out, exist_ok=True)
        had_lock = os.path.exists(os.path.join(out, ".lock"))
        lock = _Lock(out)
        try:
            if not resume:
                _check_new(out, getattr(cfg, "overwrite", False))
            _clean(out)
        except BaseException:  # refused: the folder is left as it was, without our lock file
            lock.release()
            lock = None
            if not had_lock:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(out, ".lock"))
            raise

    try:
        dist.main_first(world, prepare)
        yield
    finally:
        if lock is not None:
            lock.release()


def _check_new(out: str, overwrite: bool) -> None:
    existing = step_dirs(os.path.join(out, "state"))
    if existing:
        raise ValueError(
            f"{out!r} already holds a run (step {existing[-1][0]}); pass --resume {out} to continue it "
            "or choose another --out"
        )
    entries = sorted(e for e in os.listdir(out) if e != ".lock" and not e.startswith(".old-"))
    if not entries:
        return
    if not overwrite:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise ValueError(
            f"--out {out!r} is not empty ({shown}) and holds no run to resume; pass --overwrite to move its "
            "contents aside into .old-<time>/ there, or choose another --out"
        )
    stamp = os.path.join(out, ".old-" + time.strftime("%Y%m%d-%H%M%S"))
    aside, n = stamp, 1
    while os.path.exists(aside):
        aside, n = f"{stamp}-{n}", n + 1
    os.makedirs(aside)
    for e in entries:
        os.replace(os.path.join(out, e), os.path.join(aside, e))
    print(f"moved the earlier contents of {out} aside into {aside}", flush=True)


def _clean(out: str) -> None:
    """What a killed run left: temporary files beside the outputs and leftovers under state/."""
    removed = [f"state/{n}" for n in clean_leftovers(os.path.join(out, "state"))]
    for sub in ("", "checkpoints", "samples"):
        folder = os.path.join(out, sub)
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if _TEMP.match(name) and not os.path.isdir(path):
                with contextlib.suppress(OSError):
                    os.remove(path)
                    removed.append(os.path.join(sub, name))
    if removed:
        print(f"removed what an interrupted run left in {out}: {', '.join(sorted(removed))}", flush=True)


def existing_run(out: str, resume: bool, world: dist.World) -> bool:
    """Create `out`; refuse to start a new run where one is. Returns whether there is one to resume."""
    if world.main:
        os.makedirs(out, exist_ok=True)
    dist.barrier(world)
    existing = step_dirs(os.path.join(out, "state"))
    if existing and not resume:
        raise ValueError(
            f"{out!r} already holds a run (step {existing[-1][0]}); pass --resume {out} to continue it "
            "or choose another --out"
        )
    if resume and not existing:
        raise ValueError(f"cannot resume {out!r}: {missing_for_resume(out)}")
    return bool(existing)


def missing_for_resume(out: str) -> str | None:
    """What `out` lacks to be resumed (a sentence), or None when it holds a run with a training state."""
    if not os.path.exists(out):
        return "it does not exist"
    if not os.path.isdir(out):
        return "it is a file, not a training run's folder"
    if step_dirs(os.path.join(out, "state")):
        return None
    lacks = [n for n in ("config.json", "state/") if not os.path.exists(os.path.join(out, n.rstrip("/")))]
    if os.path.isdir(os.path.join(out, "state")):
        lacks.append("a complete state/step-* folder (with state.json)")
    what = "no " + ", no ".join(lacks)
    if os.path.isfile(os.path.join(out, "config.json")):
        return f"{what}: it is a run that stopped before its first checkpoint; start it anew with --overwrite"
    return f"{what}: it is not a training run's folder"
