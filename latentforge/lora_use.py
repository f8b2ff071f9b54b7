"""The LoRAs of one generation call: A1111's `<lora:name:w>` tags taken out of prompts, their files found in
a folder by name, read once (cached by size and mtime), applied for the call and removed after it
(lora.apply: patched, the denoiser's LoCon/DoRA layers merged and restored bit for bit), and A1111's
"Lora hashes" infotext field.
"""

from __future__ import annotations

import collections
import contextlib
import difflib
import hashlib
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from latentforge import lora


@dataclass(frozen=True)
class LoRAUse:
    """One LoRA applied to a call: `name` as the tag (or the file's stem, or LoRA.name) gives it, `source` a
    file path or a lora.LoRA, and its UNet and text-encoder weights."""

    name: str
    source: object  # str (a .safetensors path) | lora.LoRA
    unet: float
    te: float


_LORA_CACHE_SIZE = 4  # LoRA files kept read per pipeline (by path, size and mtime): the last ones used
_HASHES: dict[tuple, str] = {}  # (path, size, mtime_ns) -> A1111's LoRA hash
_HASHES_LOCK = threading.Lock()


def _stamp(path: str) -> tuple:
    st = os.stat(path)
    return path, st.st_size, st.st_mtime_ns


def lora_hash(path: str) -> str:
    """A1111's hash of a LoRA file (extensions-builtin/Lora/network.py `NetworkOnDisk`): the file's
    `sshs_model_hash` metadata when it has one (kohya's sd-scripts write it), else the "addnet" hash
    (modules/hashes.py `addnet_hash_safetensors`): the SHA-256 of the file after its safetensors header,
    so editing the metadata does not change it. The infotext's "Lora hashes" holds its first 12 hex digits
    (`shorthash`); cached by path, size and mtime."""
    from latentforge.checkpoint_io import read_metadata

    key = _stamp(path)
    with _HASHES_LOCK:
        if key in _HASHES:
            return _HASHES[key]
    stored = read_metadata(path).get("sshs_model_hash", "").strip()
    if stored:
        value = stored
    else:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            f.seek(8 + n)
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        value = h.hexdigest()
    with _HASHES_LOCK:
        _HASHES[key] = value
    return value


def find_lora(name: str, lora_dir: str) -> str:
    """`lora_dir/name.safetensors` (lora.find_lora: names only), or an error naming `name` and the LoRAs the
    folder has."""
    try:
        return lora.find_lora(name, lora_dir)
    except lora.LoRAError as e:
        try:
            have = sorted(
                n[: -len(".safetensors")] for n in os.listdir(lora_dir) if n.endswith(".safetensors")
            )
        except OSError as err:
            raise lora.LoRAError(f"{e}; the LoRA folder cannot be read: {err}") from None
        if not have:
            raise lora.LoRAError(f"{e}; it has no .safetensors files") from None
        close = difflib.get_close_matches(name, have, n=5, cutoff=0.5) or have[:5]  # the closest names first
        more = f" (of {len(have)} LoRAs)" if len(have) > len(close) else ""
        kind = "closest names" if close != have[:5] else "it has"
        raise lora.LoRAError(f"{e}; {kind}: {', '.join(repr(n) for n in close)}{more}") from None


def _tag_text(tags: list[tuple[str, float, float]]) -> str:
    return "[" + ", ".join(f"<lora:{n}:{te:g}:{u:g}>" for n, u, te in tags) + "]" if tags else "none"


def _lora_weight(what: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)


class LoRAs:
    """A pipeline's LoRA state: the folder tags are looked up in, and the last LoRA files read."""

    def __init__(self, lora_dir: str | None = None):
        self.lora_dir = lora_dir
        self._cache: collections.OrderedDict[str, tuple[tuple, lora.LoRA]] = collections.OrderedDict()

    def uses(self, pipe, prompt, loras=None, negative_prompt="") -> tuple[str | list[str], list[LoRAUse]]:
        """(the prompt(s) without `<lora:...>` tags, the LoRAs a call with these arguments applies): the
        tags' files found in `lora_dir` (names only), then the `loras` given. Nothing is read but the folder.
        A batch of different prompts must name the same LoRAs with the same weights (A1111 takes the first
        prompt's and ignores the others'; here a mismatch is refused). Tags belong in the prompt: one in
        the negative prompt is refused, not encoded as text."""
        negs = [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
        for neg in negs if isinstance(negs, Sequence) else []:  # not text: _sample refuses it
            if isinstance(neg, str) and lora._TAG.search(neg):
                raise lora.LoRAError(
                    "negative_prompt: LoRA tags (<lora:...>) are read from the prompt only, as in A1111; "
                    f"found {lora._TAG.search(neg)[0]!r}"
                )
        uses: list[LoRAUse] = []
        if isinstance(prompt, str):
            prompt, tags = lora.parse_tags(prompt)
        elif isinstance(prompt, Sequence) and prompt and all(isinstance(p, str) for p in prompt):
            parsed = [lora.parse_tags(p) for p in prompt]
            tags = parsed[0][1]
            for k, (_, t) in enumerate(parsed):
                if sorted(t) != sorted(tags):
                    raise lora.LoRAError(
                        f"prompt {k} of the batch names LoRAs {_tag_text(t)}, prompt 0 {_tag_text(tags)}: "
                        "the LoRAs of one batch apply to every image, so every prompt must name the same ones"
                    )
            prompt = [p for p, _ in parsed]
        else:  # not text: _sample refuses it
            tags = []
        if tags and self.lora_dir is None:
            raise lora.LoRAError(
                f"the prompt names LoRA {tags[0][0]!r} but no LoRA folder is set (Pipeline(lora_dir=...), "
                "--lora-dir)"
            )
        for name, unet_w, te_w in tags:
            uses.append(LoRAUse(name, self._find_lora(name), unet_w, te_w))
        if loras is not None and (isinstance(loras, (str, lora.LoRA)) or not isinstance(loras, Sequence)):
            raise ValueError(f"loras must be a list of (path or LoRA, unet_weight, te_weight), got {loras!r}")
        for k, item in enumerate(loras or []):
            item = item if isinstance(item, (tuple, list)) else (item,)
            if not 1 <= len(item) <= 3:
                raise ValueError(f"loras[{k}] must be (path or LoRA, unet_weight, te_weight), got {item!r}")
            source = item[0]
            unet_w = _lora_weight(f"loras[{k}] unet weight", item[1] if len(item) > 1 else 1.0)
            te_w = _lora_weight(f"loras[{k}] te weight", item[2] if len(item) > 2 else unet_w)
            if isinstance(source, lora.LoRA):
                name = source.name
            elif isinstance(source, (str, os.PathLike)):
                source = os.fspath(source)
                if not source.lower().endswith(".safetensors") or not os.path.isfile(source):
                    raise lora.LoRAError(f"loras[{k}]: {source!r} is not a LoRA .safetensors file")
                name = os.path.splitext(os.path.basename(source))[0]
            else:
                raise ValueError(
                    f"loras[{k}] must name a .safetensors file or be a lora.LoRA, got {source!r}"
                )
            uses.append(LoRAUse(name, source, unet_w, te_w))
        return prompt, uses

    def _find_lora(self, name: str) -> str:
        return find_lora(name, self.lora_dir)

    def _read_lora(self, path: str) -> lora.LoRA:
        """The LoRA in `path`, read once while the file's size and mtime stay the same (the last few kept)."""
        stamp = _stamp(path)
        hit = self._cache.get(path)
        if hit is not None and hit[0] == stamp:
            self._cache.move_to_end(path)
            return hit[1]
        value = lora.read_lora(path)
        self._cache[path] = (stamp, value)
        self._cache.move_to_end(path)
        while len(self._cache) > _LORA_CACHE_SIZE:
            self._cache.popitem(last=False)
        return value

    @contextlib.contextmanager
    def applied(self, pipe, uses: list[LoRAUse]):
        """The LoRAs applied (lora.apply: patched, and the denoiser's LoCon/DoRA layers merged; the original
        weights restored bit for bit) while the block runs, removed after it however it ends. A part with
        weight 0 is not applied at all."""
        with contextlib.ExitStack() as stack:
            for use in uses:
                if use.unet == 0 and use.te == 0:
                    continue
                net = use.source if isinstance(use.source, lora.LoRA) else self._read_lora(use.source)
                drop = {"unet"} if use.unet == 0 else ({"te1", "te2", "te3"} if use.te == 0 else set())
                if drop:
                    layers = {k: v for k, v in net.layers.items() if k[0] not in drop}
                    net = lora.LoRA(net.name, net.format, layers, net.metadata)
                stack.enter_context(lora.apply(pipe, net, use.unet, use.te))
            yield

    def hashes(self, pipe, prompt, loras=None) -> str | None:
        """A1111's infotext field "Lora hashes" for a call with this prompt and `loras`: "name: hash, ..."
        (hash: `lora_hash`'s first 12 hex digits; A1111 drops ':' and ',' from names), None when no LoRA
        file is used (a lora.LoRA given as an object has no file, so no hash)."""
        _, uses = self.uses(pipe, prompt, loras)
        out: dict[str, str] = {}
        for use in uses:
            if isinstance(use.source, str):
                out[use.name.translate(str.maketrans("", "", ":,"))] = lora_hash(use.source)[:12]
        return ", ".join(f"{k}: {v}" for k, v in out.items()) or None
