"""Everything a trainer needs to stop and resume exactly, stored without pickles.

`save_training_state` / `load_training_state`: one folder per step, ``dir/step-00001234/``, with

    model.safetensors      the model's state dict
    ema.safetensors        the EMA's state dict (model layout, float32; usable as a weights file; ema.py)
    optimizer.safetensors  every optimizer-state tensor as "state.{param_index}.{name}"; the param
                           groups' hyperparameters and the non-tensor state in the metadata (JSON)
    rng.safetensors        "torch.cpu" (uint8), "torch.cuda.{i}" (uint8); numpy's global bit-generator
                           state and python `random`'s state as JSON in the metadata
    state.json             step, data position, config, GradScaler state, EMA settings, versions

The folder is written under a temporary name and renamed into place (`os.replace` of the directory), so a
crash mid-write leaves the previous checkpoint as it was; then the `last` file (written atomically) names it
and folders beyond `keep_last` are removed. Nothing is pickled: tensors go through safetensors, everything
else through JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import re
import shutil
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from latentforge.checkpoints import read_state_dict, save_state_dict
from latentforge.files import atomic_path, temp_name

if TYPE_CHECKING:
    from latentforge.training.ema import EMA

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
# what an interrupted save or prune leaves under the state folder: a step folder being written, one moved
# aside to be replaced, one renamed to be deleted, and the `last` pointer's temporary file
_LEFTOVER = re.compile(r"^\.(step-\d{8,}\.(tmp|old|trash)|last\.tmp)-\d+$")


class CorruptState(ValueError):
    """A step folder whose files cannot be read back (truncated, missing, not JSON); the message names it."""


# --------------------------------------------------------------------------------------------------------
# flattening: optimizer, RNG


def _unshared(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied weights): clone every repeat."""
    seen: set[int] = set()
    out = {}
    for k, v in sd.items():
        v = v.detach().cpu()
        ptr = v.untyped_storage().data_ptr() if v.numel() else None
        if ptr in seen:
            v = v.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[k] = v
    return out


def optimizer_to_flat(
    optimizer: torch.optim.Optimizer, state_dict: Mapping | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, json): state[i][name] → "state.{i}.{name}" when a tensor, else json["state"][i][name];
    param-group hyperparameters to json["param_groups"] (tensor hyperparameters as "group.{g}.{name}").
    `state_dict`: write this (index-keyed) state instead of `optimizer.state_dict()` (e.g. gathered from
    FSDP shards)."""
    sd = optimizer.state_dict() if state_dict is None else state_dict
    tensors: dict[str, torch.Tensor] = {}
    plain_state: dict[str, dict[str, Any]] = {}
    for i, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{i}.{name}"] = v.detach().cpu()
            else:
                plain_state.setdefault(str(i), {})[name] = v
    groups = []
    for g, group in enumerate(sd["param_groups"]):
        out = {}
        for name, v in group.items():
            if isinstance(v, torch.Tensor):
                tensors[f"group.{g}.{name}"] = v.detach().cpu()
            else:
                out[name] = list(v) if isinstance(v, tuple) else v
        groups.append(out)
    meta = {"class": type(optimizer).__name__, "state": plain_state, "param_groups": groups}
    try:
        json.dumps(meta)
    except TypeError as e:
        raise TypeError(f"optimizer state holds a value that is neither a tensor nor JSON: {e}") from e
    return tensors, meta


def optimizer_from_flat(
    optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: Mapping
) -> None:
    if meta.get("class") != type(optimizer).__name__:
        raise ValueError(
            f"the checkpoint holds a {meta.get('class')} state, the optimizer is {type(optimizer).__name__}"
        )
    sd = flat_to_optimizer_state(tensors, meta, optimizer.state_dict()["param_groups"])
    optimizer.load_state_dict(sd)


def flat_to_optimizer_state(tensors: Mapping[str, torch.Tensor], meta: Mapping, current: list) -> dict:
    """The inverse of `optimizer_to_flat`: an index-keyed optimizer state dict (`current`: the live
    optimizer's param groups, for their count and tuple-valued hyperparameters)."""
    if len(current) != len(meta["param_groups"]):
        raise ValueError(
            f"the checkpoint's optimizer has {len(meta['param_groups'])} param groups, "
            f"this one {len(current)}"
        )
    groups = []
    for saved, cur in zip(meta["param_groups"], current, strict=True):
        group = {}
        for name, v in saved.items():
            group[name] = tuple(v) if isinstance(cur.get(name), tuple) and isinstance(v, list) else v
        groups.append(group)
    state: dict[int, dict[str, Any]] = {}
    for i, st in meta["state"].items():
        state.setdefault(int(i), {}).update(st)
    for key, v in tensors.items():
        kind, idx, name = key.split(".", 2)
        if kind == "state":
            state.setdefault(int(idx), {})[name] = v
        else:
            groups[int(idx)][name] = v
    # keep the optimizer's own ordering of per-parameter state (state dicts compare equal after resuming)
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of every global RNG: torch CPU, torch CUDA (each device), numpy, python."""
    tensors = {"torch.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch.cuda.{i}"] = s
    np_state = np.random.get_state(
        legacy=False
    )  # {"bit_generator", "state": {"key", "pos"}, "has_gauss", ...}
    np_state = {**np_state, "state": {**np_state["state"], "key": np_state["state"]["key"].tolist()}}
    version, internal, gauss_next = random.getstate()
    meta = {
        "numpy": json.dumps(np_state),
        "python": json.dumps({"version": version, "state": list(internal), "gauss_next": gauss_next}),
    }
    return tensors, meta


def set_rng_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> None:
    torch.set_rng_state(tensors["torch.cpu"])
    cuda = sorted((int(k.rsplit(".", 1)[1]), v) for k, v in tensors.items() if k.startswith("torch.cuda."))
    if cuda and torch.cuda.is_available():
        n = torch.cuda.device_count()
        for i, s in cuda[:n]:
            torch.cuda.set_rng_state(s, i)
    if "numpy" in meta:
        s = json.loads(meta["numpy"])
        s["state"]["key"] = np.asarray(s["state"]["key"], dtype=np.uint32)
        np.random.set_state(s)
    if "python" in meta:
        s = json.loads(meta["python"])
        random.setstate((s["version"], tuple(s["state"]), s["gauss_next"]))


# --------------------------------------------------------------------------------------------------------
# save / load


def _versions() -> dict[str, str]:
    try:
        from importlib.metadata import version

        lf = version("latentforge")
    except Exception:  # not installed (running from a checkout)
        lf = "unknown"
    return {
        "format": str(FORMAT_VERSION),
        "latentforge": lf,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def step_dirs(root: str) -> list[tuple[int, str]]:
    """(step, path) of the complete step folders under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, "state.json")):
            out.append((int(m.group(1)), path))
    return sorted(out)


def _write_synced(path: str, text: str) -> None:
    """`text` written atomically and flushed to the disk before the rename."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):  # not every filesystem / OS lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_training_state(
    dir: str,
    step: int,
    model: torch.nn.Module,
    ema: EMA | None,
    optimizer: torch.optim.Optimizer | None,
    scaler: Any = None,
    rng: bool = True,
    data_position: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    keep_last: int | None = 3,
    states: Mapping[str, Mapping] | None = None,
) -> str:
    """Write ``dir/step-{step:08d}/`` atomically, point ``dir/last`` at it, keep the newest `keep_last`
    step folders (None or 0: keep all). Returns the step folder's path. `states` may give "model", "ema"
    and "optimizer" state dicts to write instead of the objects' own (full ones gathered from FSDP shards;
    the objects then only supply settings and the optimizer's class)."""
    states = states or {}
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    os.makedirs(dir, exist_ok=True)
    name = f"step-{int(step):08d}"
    final = os.path.join(dir, name)
    tmp = temp_name(final)  # the step folder is written whole under this name, then renamed
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        state: dict[str, Any] = {
            "step": int(step),
            "data_position": dict(data_position or {}),
            "config": dict(config or {}),
            "versions": _versions(),
        }
        model_sd = states.get("model") or model.state_dict()
        save_state_dict(_unshared(model_sd), os.path.join(tmp, "model.safetensors"))
        if ema is not None:
            save_state_dict(
                _unshared(states.get("ema") or ema.state_dict()), os.path.join(tmp, "ema.safetensors")
            )
            state["ema"] = ema.settings()
        if optimizer is not None:
            tensors, meta = optimizer_to_flat(optimizer, states.get("optimizer"))
            save_state_dict(
                tensors,
                os.path.join(tmp, "optimizer.safetensors"),
                metadata={"latentforge.optimizer": json.dumps(meta)},
            )
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        if rng:
            tensors, meta = rng_state()
            save_state_dict(tensors, os.path.join(tmp, "rng.safetensors"), metadata=meta)
        try:
            text = json.dumps(state, indent=2, sort_keys=True)
        except TypeError as e:
            raise TypeError(f"data_position, config and scaler state must be JSON-serialisable: {e}") from e
        _write_synced(os.path.join(tmp, "state.json"), text)  # written last: marks the folder complete
        _fsync_dir(tmp)
        if os.path.exists(final):  # saving the same step again: move the old one aside first
            old = os.path.join(dir, f".{name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    _write_synced(os.path.join(dir, "last"), name + "\n")
    if keep_last:
        for _, path in step_dirs(dir)[:-keep_last]:
            if os.path.abspath(path) != os.path.abspath(final):
                _remove_step_dir(path)
    return final


def _remove_step_dir(path: str) -> None:
    """Crash-safe removal: renamed to a hidden trash name first (one atomic step: the folder is either a
    whole step folder or garbage `clean_leftovers` removes), then deleted."""
    folder, name = os.path.split(os.path.abspath(path))
    trash = os.path.join(folder, f".{name}.trash-{os.getpid()}")
    try:
        os.replace(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def clean_leftovers(dir: str) -> list[str]:
    """Remove what a killed process left under the state folder `dir`: temporary, moved-aside and trash
    step folders, the `last` pointer's temporary file, and step folders without their state.json (a
    half-written or half-deleted one). Only call it while no other process writes there (the run's lock).
    Returns the names removed."""
    if not os.path.isdir(dir):
        return []
    removed = []
    for name in sorted(os.listdir(dir)):
        path = os.path.join(dir, name)
        incomplete = os.path.isdir(path) and not os.path.isfile(os.path.join(path, "state.json"))
        stale = _LEFTOVER.match(name) or (_STEP_DIR.match(name) and incomplete)
        if not stale:
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(path)
        removed.append(name)
    return removed


def resolve_step_dir(path: str) -> str:
    """A step folder itself, or the folder the `last` file under `path` names (falling back to the newest
    complete step folder when `last` is missing or stale)."""
    if os.path.isfile(os.path.join(path, "state.json")):
        return path
    last = os.path.join(path, "last")
    if os.path.isfile(last):
        with open(last, encoding="utf-8") as f:
            cand = os.path.join(path, f.read().strip())
        if os.path.isfile(os.path.join(cand, "state.json")):
            return cand
    dirs = step_dirs(path)
    if not dirs:
        raise FileNotFoundError(f"no training state under {path!r} (no state.json, no step-* folder)")
    return dirs[-1][1]


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def config_differences(
    saved: Mapping[str, Any], expected: Mapping[str, Any], keys: Sequence[str] | None = None
) -> list[str]:
    """Fields (dotted paths) of `expected` whose value differs in `saved`; with `keys`, only fields under
    those top-level (or dotted) names are compared, e.g. keys=("model",)."""
    s, e = _flatten(saved), _flatten(expected)
    if keys is not None:
        e = {k: v for k, v in e.items() if any(k == p or k.startswith(p + ".") for p in keys)}
    missing = object()
    out = []
    for k in sorted(e):
        sv = s.get(k, missing)
        if sv is missing:
            out.append(f"{k}: not in the checkpoint, expected {e[k]!r}")
        elif sv != e[k]:
            out.append(f"{k}: checkpoint {sv!r}, expected {e[k]!r}")
    return out


def load_training_state(
    path: str,
    model: torch.nn.Module,
    ema: EMA | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: Any = None,
    rng: bool = True,
    expected_config: Mapping[str, Any] | None = None,
    config_keys: Sequence[str] | None = None,
    fallback: bool = False,
) -> dict[str, Any]:
    """Restore a `save_training_state` folder (or the latest under a root) into the given objects, and every
    RNG when `rng`. With `expected_config`, refuse (ValueError naming each differing field) when the saved
    config differs in those fields (only under `config_keys` when given: the fields that define the model).
    A step folder that cannot be read back raises `CorruptState` naming it and the file; with `fallback`
    (and `path` a root), the newest intact step folder is loaded instead, with a warning naming each broken
    newer one. Returns {"step", "data_position", "config", "path", "broken": [messages]}."""
    if not fallback or os.path.isfile(os.path.join(path, "state.json")):
        info = _load_step(resolve_step_dir(path), model, ema, optimizer, scaler, rng, expected_config,
                          config_keys)  # fmt: skip
        return {**info, "broken": []}
    candidates = [p for _, p in reversed(step_dirs(path))]
    if not candidates:
        raise FileNotFoundError(f"no training state under {path!r} (no state.json, no step-* folder)")
    broken: list[str] = []
    for i, step_dir in enumerate(candidates):
        try:
            info = _load_step(step_dir, model, ema, optimizer, scaler, rng, expected_config, config_keys)
        except CorruptState as e:
            broken.append(str(e))
            if i + 1 < len(candidates):
                warnings.warn(f"{e}; falling back to {candidates[i + 1]}", stacklevel=2)
            continue
        return {**info, "broken": broken}
    raise CorruptState(f"no intact training state under {path!r}: " + "; ".join(broken))


def _load_step(step_dir, model, ema, optimizer, scaler, rng, expected_config, config_keys) -> dict[str, Any]:
    try:
        with open(os.path.join(step_dir, "state.json"), encoding="utf-8") as f:
            state = json.load(f)
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("not an object with an integer step")
    except (OSError, ValueError) as e:
        raise CorruptState(f"training state {step_dir} is broken: state.json is unreadable ({e})") from None
    if expected_config is not None:
        diffs = config_differences(state.get("config", {}), expected_config, config_keys)
        if diffs:
            raise ValueError(
                f"{step_dir}: the checkpoint was trained with a different model config: " + "; ".join(diffs)
            )

    def need(name: str) -> str:
        p = os.path.join(step_dir, name)
        if not os.path.isfile(p):
            raise CorruptState(f"training state {step_dir} is broken: {name} is missing")
        return p

    def restore(name: str, apply) -> None:
        p = need(name)
        try:
            apply(p)
        except CorruptState:
            raise
        except Exception as e:  # a truncated or garbled file: safetensors, JSON, shape and key errors
            msg = " ".join(str(e).split())[:300]
            raise CorruptState(
                f"training state {step_dir} is broken: {name} is unreadable ({type(e).__name__}: {msg})"
            ) from None

    restore("model.safetensors", lambda p: model.load_state_dict(read_state_dict(p), strict=True))
    if ema is not None:
        restore("ema.safetensors", lambda p: ema.load_state_dict(read_state_dict(p), state.get("ema")))
    if optimizer is not None:

        def load_optimizer(p: str) -> None:
            meta = json.loads(_metadata(p)["latentforge.optimizer"])
            optimizer_from_flat(optimizer, read_state_dict(p), meta)

        restore("optimizer.safetensors", load_optimizer)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if rng:
        restore("rng.safetensors", lambda p: set_rng_state(read_state_dict(p), _metadata(p)))
    return {
        "step": state["step"],
        "data_position": state.get("data_position", {}),
        "config": state.get("config", {}),
        "path": step_dir,
    }


def _metadata(path: str) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}
