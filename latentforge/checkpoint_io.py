"""Checkpoint files as tensors: safe reading (nothing is unpickled) and atomic writing.

`.safetensors` through safetensors (format: huggingface/safetensors README), `.ckpt`/`.pt` only through
`torch.load(weights_only=True)`. Which component and family the tensors belong to is checkpoints.py's job.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Callable, Mapping, MutableMapping

import torch

from latentforge.files import atomic_path

SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def read_state_dict(
    path: str, dtype: torch.dtype | None = None, keep_stored: Callable[[str], bool] | None = None
) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file, on the CPU, in their stored dtype, or with every floating tensor
    converted to `dtype` while reading except those whose key `keep_stored(key)` accepts.

    Converting here, one tensor at a time, keeps the peak memory of a float16 file loaded in float32 at the
    float32 weights plus one stored tensor, instead of the whole stored dict plus the whole converted copy.
    `.safetensors`: tensors that need no conversion are mapped lazily by safetensors (a page is read when it
    is touched); converted ones are read with plain reads and never mapped. `.ckpt`/`.pt`: torch.load reads
    everything; each converted tensor replaces its source as it goes, so the source can be freed."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype or None, got {dtype}")
    keep = keep_stored or (lambda key: False)
    low = path.lower()
    if low.endswith(".safetensors"):
        return _read_safetensors(path, dtype, keep)
    if low.endswith((".ckpt", ".pt", ".pth", ".bin")):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a pickle that needs code to load is refused, never executed
            raise ValueError(
                f"{path!r} cannot be loaded as plain tensors (weights_only=True refused it: {e}); "
                "convert it to .safetensors with the tool that made it"
            ) from e
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a state dict")
        out = {}
        for k in list(obj):
            # popped (when the mapping allows it) so that a converted tensor's source can be freed now
            v = obj.pop(k) if isinstance(obj, MutableMapping) else obj[k]
            if isinstance(v, torch.Tensor):
                convert = dtype is not None and v.is_floating_point() and not keep(k)
                out[k] = v.to(dtype) if convert else v
            del v
        return out
    raise ValueError(f"unsupported checkpoint file {path!r}; expected one of {', '.join(SUFFIXES)}")


# Floating dtypes of the safetensors header (format: huggingface/safetensors README, "Format") that
# `_read_safetensors` reads and converts itself; every other dtype goes through safetensors.
_SAFETENSORS_FLOATS = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16
}  # fmt: skip


def _safetensors_header(path: str) -> tuple[dict[str, dict], int]:
    """({key: {"dtype", "shape", "data_offsets"}}, byte offset of the data section). A safetensors file is
    an 8-byte little-endian u64 N, an N-byte JSON header, then the data (offsets relative to its start).
    Called only after safetensors itself has opened, and so validated, the file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def _read_safetensors(
    path: str, dtype: torch.dtype | None, keep: Callable[[str], bool]
) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error type for bad headers and short files
        size = os.path.getsize(path)
        raise ValueError(
            f"{path!r} is not a readable safetensors file ({size} bytes; truncated or not a checkpoint): {e}"
        ) from e
    with handle as f:
        keys = list(f.keys())
        read_here: dict[str, torch.dtype] = {}  # key -> stored dtype, for the tensors converted here
        if dtype is not None and sys.byteorder == "little":  # the stored bytes are little-endian
            header, data_start = _safetensors_header(path)
            for k in keys:
                stored = _SAFETENSORS_FLOATS.get(header[k]["dtype"])
                if stored is not None and stored != dtype and not keep(k):
                    read_here[k] = stored
        out: dict[str, torch.Tensor] = {}
        for k in keys:
            if k not in read_here:  # mapped by safetensors; pages are read (and count in RSS) when touched
                t = f.get_tensor(k)
                convert = dtype is not None and t.is_floating_point() and not keep(k)
                out[k] = t.to(dtype) if convert else t  # converts only dtypes missing from the table above
    if read_here:
        converted = _read_converted(path, header, data_start, read_here, dtype)
        out = {k: out[k] if k in out else converted[k] for k in keys}  # the file's key order
    return out


def _read_converted(
    path: str, header: dict[str, dict], data_start: int, stored: dict[str, torch.dtype], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The tensors `stored` names, read in file order with plain reads into one reusable buffer and each
    converted into a new tensor of `dtype`: the peak memory is the converted tensors plus the largest stored
    one, and no page of the file stays mapped (converting from safetensors' mapping would keep every stored
    page resident until the last tensor of the file is freed)."""
    spans = {k: header[k]["data_offsets"] for k in stored}  # key -> [begin, end) in the data section
    scratch = bytearray(max(b - a for a, b in spans.values()))
    scratch_t = torch.frombuffer(scratch, dtype=torch.uint8) if scratch else torch.empty(0, dtype=torch.uint8)
    out = {}
    with open(path, "rb", buffering=0) as f:
        for k in sorted(stored, key=lambda k: spans[k][0]):
            a, b = spans[k]
            dst = torch.empty(header[k]["shape"], dtype=dtype)  # [*shape] in the target dtype
            f.seek(data_start + a)
            view = memoryview(scratch)[: b - a]
            while view:  # a read may return fewer bytes than asked
                got = f.readinto(view)
                if not got:
                    raise ValueError(f"{path!r} is truncated: tensor {k!r} ends past the end of the file")
                view = view[got:]
            if b > a:
                dst.copy_(scratch_t[: b - a].view(stored[k]).view(dst.shape))
            out[k] = dst
    return out


def save_state_dict(
    sd: Mapping[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None
) -> None:
    """Write a .safetensors file under a temporary name in the same folder, then rename it into place."""
    from safetensors.torch import save_file

    if not path.lower().endswith(".safetensors"):
        raise ValueError(f"checkpoints are written as .safetensors, got {path!r}")
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp, metadata=metadata)


def read_metadata(path: str) -> dict[str, str]:
    """The safetensors header's `__metadata__` (str -> str); {} for other formats."""
    if not path.lower().endswith(".safetensors"):
        return {}
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        handle = safe_open(path, framework="pt")
    except Exception as e:  # safetensors raises its own error type for bad headers and short files
        raise ValueError(f"{path!r} is not a readable safetensors file: {e}") from e
    with handle as f:
        return f.metadata() or {}
