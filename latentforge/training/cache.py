"""A latent / embedding cache for training: per-item tensors on disk.

`LatentCache` stores per-item tensors (VAE latents, text embeddings) in safetensors shards with a JSON index;
a key hashes the file's path, size and mtime, the transform parameters and the encoder's fingerprint, so a
changed image or encoder misses the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch

from latentforge import files


class LatentCache:
    """Per-item tensors (``{name: tensor}``) on disk, in safetensors shards of up to `shard_size` items
    plus ``index.json`` (key -> shard file, slot, tensor names).

    ``put`` buffers; a full buffer, ``flush()`` or leaving a ``with`` block writes a new shard (temporary
    name, then rename) and then the index (same), so a crash leaves the previous index and shards intact.
    ``get`` returns the tensors or None. Keys come from ``make_key`` (or ``ImageFolder.cache_key``).
    Up to `max_open` shards stay open (least recently used closed first): a training batch draws its items
    from random shards, and opening one (parsing its header) costs ~0.5 ms, 10× the read itself (measured:
    64 items from the 2-hour recipe's 235 shards, 32 ms with 8 open against 3.7 ms with all open). An open
    shard is a memory map only, no file descriptor.
    One writer per directory: give each rank its own directory, or let one rank fill the cache.
    """

    INDEX = "index.json"
    VERSION = 1

    def __init__(self, directory: str | os.PathLike, shard_size: int = 256, max_open: int = 1024):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shard_size = int(shard_size)
        self.max_open = int(max_open)
        self._pending: dict[str, dict[str, torch.Tensor]] = {}
        self._open: OrderedDict[str, object] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self._entries: dict[str, dict] = {}
        path = self.dir / self.INDEX
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if data.get("version") == self.VERSION:
                    items = data.get("items", {})
                    present = {n: (self.dir / n).is_file() for n in {e["shard"] for e in items.values()}}
                    self._entries = {k: e for k, e in items.items() if present[e["shard"]]}
            except (json.JSONDecodeError, OSError, KeyError, TypeError, AttributeError):
                self._entries = {}  # an unreadable index: start over (shards are rewritten as needed)

    @staticmethod
    def make_key(path: str | os.PathLike, params: Mapping | None = None, fingerprint: str = "") -> str:
        """sha256 over the file's absolute path, size and mtime (ns), the transform `params` (JSON) and the
        encoder `fingerprint` (e.g. model name + weights hash + dtype)."""
        st = os.stat(path)
        blob = json.dumps(
            [os.path.abspath(path), st.st_size, st.st_mtime_ns, params or {}, fingerprint],
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def __contains__(self, key: str) -> bool:
        return key in self._pending or key in self._entries

    def __len__(self) -> int:
        return len(self._entries) + sum(1 for k in self._pending if k not in self._entries)

    def keys(self) -> list[str]:
        return sorted(set(self._entries) | set(self._pending))

    def _shard(self, name: str):
        from safetensors import safe_open

        h = self._open.get(name)
        if h is None:
            h = safe_open(str(self.dir / name), framework="pt", device="cpu")
            self._open[name] = h
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(name)
        return h

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        if key in self._pending:
            self.hits += 1
            return dict(self._pending[key])
        e = self._entries.get(key)
        if e is None:
            self.misses += 1
            return None
        try:
            h = self._shard(e["shard"])
            out = {n: h.get_tensor(f"{e['slot']}/{n}") for n in e["names"]}
        except Exception:  # a shard removed or damaged behind our back: a miss, recomputed by the caller
            self._entries.pop(key, None)
            self.misses += 1
            return None
        self.hits += 1
        return out

    def put(self, key: str, tensors: Mapping[str, torch.Tensor]) -> None:
        if not tensors:
            raise ValueError("put needs at least one tensor")
        for n, t in tensors.items():
            if "/" in n or not isinstance(t, torch.Tensor):
                raise ValueError(f"tensor names must not contain '/', and values must be tensors: {n!r}")
        self._pending[key] = {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}
        if len(self._pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the buffered items as a new shard, then the index."""
        if not self._pending:
            return
        from latentforge.checkpoints import save_state_dict

        name = f"shard-{uuid.uuid4().hex[:16]}.safetensors"
        flat, entries = {}, {}
        for slot, (key, tensors) in enumerate(self._pending.items()):
            for n, t in tensors.items():
                flat[f"{slot}/{n}"] = t
            entries[key] = {"shard": name, "slot": slot, "names": sorted(tensors)}
        save_state_dict(flat, str(self.dir / name), metadata={"latentforge.cache": str(self.VERSION)})
        self._entries.update(entries)
        self._write_index()
        self._pending.clear()

    def _write_index(self) -> None:
        data = {"version": self.VERSION, "items": self._entries}
        files.write_text(str(self.dir / self.INDEX), json.dumps(data, sort_keys=True))

    def prune(self, keep: set[str] | None = None) -> int:
        """Drop entries not in `keep` (None: keep all entries), rewrite the index, and delete shards no
        entry refers to. Returns the number of shard files removed."""
        self.flush()
        if keep is not None:
            self._entries = {k: e for k, e in self._entries.items() if k in keep}
        self._write_index()
        used = {e["shard"] for e in self._entries.values()}
        removed = 0
        for p in self.dir.glob("shard-*.safetensors"):
            if p.name not in used:
                self._open.pop(p.name, None)
                p.unlink()
                removed += 1
        return removed

    def __enter__(self) -> LatentCache:
        return self

    def __exit__(self, *exc) -> None:
        self.flush()
