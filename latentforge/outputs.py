"""Output files: names from a pattern, never overwriting, written atomically, with metadata that replays.

A PNG carries A1111's `parameters` text (infotext.py) and latentforge's exact arguments as JSON in a
`latentforge` text chunk. Names come from a pattern such as "{counter:05}-{seed}" (the default: A1111's
"00012-1234.png") or "{seed}-{prompt:40}": `str.format` fields, where a number after a text field's colon
keeps that many characters (A1111's `[prompt_words]`/ComfyUI's `%prompt%` in one syntax). An existing file
is never replaced: the name gets "-1", "-2", ...
"""

from __future__ import annotations

import datetime
import io
import json
import os
import re
import string

from PIL import Image, PngImagePlugin

from latentforge.files import atomic_path
from latentforge.infotext import JSON_KEY

DEFAULT_NAME = "{counter:05}-{seed}"
FIELDS = (
    "counter", "seed", "subseed", "prompt", "negative", "steps", "sampler", "scheduler", "cfg", "width",
    "height", "model", "model_hash", "batch", "index", "date", "time",
)  # fmt: skip
MAX_NAME = 180  # characters of the name before ".png" (file systems allow 255 bytes)
_BAD = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]+')  # not in a file name on Windows, macOS or Linux


class _Formatter(string.Formatter):
    def format_field(self, value, spec):
        if isinstance(value, str) and spec.isdigit():  # "{prompt:40}": the first 40 characters
            return value[: int(spec)]
        return super().format_field(value, spec)


def check_name(pattern: str) -> str:
    """The pattern, checked: known fields only, valid format specs, no folder separators."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise ValueError(f"the file name pattern must be non-empty text, got {pattern!r}")
    if "/" in pattern or "\\" in pattern:
        raise ValueError(f"the file name pattern {pattern!r} names a folder; give the folder with --out")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None]
    except ValueError as e:
        raise ValueError(
            f"the file name pattern {pattern!r} is not valid ({e}); fields: {', '.join(FIELDS)}"
        ) from None
    unknown = [f for f in fields if f not in FIELDS]
    if unknown:
        raise ValueError(f"unknown field {{{unknown[0]}}} in {pattern!r}; fields: {', '.join(FIELDS)}")
    sample = {k: 0 for k in FIELDS} | {
        k: "x" for k in ("prompt", "negative", "sampler", "scheduler", "model")
    }
    try:
        _Formatter().format(pattern, **sample | {"model_hash": "0", "date": "d", "time": "t"})
    except (ValueError, TypeError) as e:
        raise ValueError(f"the file name pattern {pattern!r} has a bad format spec ({e})") from None
    return pattern


def file_name(pattern: str, fields: dict) -> str:
    """The pattern filled in and made safe: no separators or control characters, at most MAX_NAME."""
    now = datetime.datetime.now()
    values = {k: "" for k in FIELDS} | {"date": now.strftime("%Y-%m-%d"), "time": now.strftime("%H%M%S")}
    name = _Formatter().format(pattern, **values | {k: v for k, v in fields.items() if v is not None})
    name = _BAD.sub("_", name.replace("\n", " ")).strip().rstrip(".")
    return name[:MAX_NAME] or "image"


def png_info(parameters: str, exact: dict | None = None) -> PngImagePlugin.PngInfo:
    """The PNG text chunks: A1111's `parameters` and, given `exact`, latentforge's JSON."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    if exact is not None:
        info.add_text(JSON_KEY, json.dumps(exact, ensure_ascii=False, sort_keys=True))
    return info


def png_bytes(
    image: Image.Image, parameters: str, exact: dict | None = None, compress_level: int = 6
) -> bytes:
    """`image` as PNG file bytes with the text chunks of `png_info` (what the server sends). compress_level:
    zlib's 0-9 (6, Pillow's default; the server sends 1: half the encoding time, ~30% more bytes)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_info(parameters, exact), compress_level=compress_level)
    return buf.getvalue()


def save_png(
    image: Image.Image,
    folder: str,
    parameters: str,
    seed: int,
    name: str = DEFAULT_NAME,
    fields: dict | None = None,
    exact: dict | None = None,
) -> str:
    """Write `image` into `folder` under the name pattern, with a `parameters` text chunk (tEXt, or iTXt
    for non-Latin-1 text, as Pillow decides) and, given `exact`, a `latentforge` JSON chunk; written under
    a temporary name and renamed into place. {counter} is the next number after those in the folder."""
    os.makedirs(folder, exist_ok=True)
    fields = {"seed": seed, **(fields or {})}
    if "{counter" in name:
        numbers = [int(m.group(1)) for n in os.listdir(folder) if (m := re.match(r"(\d{5,})-", n))]
        fields["counter"] = max(numbers, default=-1) + 1
    info = png_info(parameters, exact)
    base = file_name(name, fields)
    path, k = os.path.join(folder, f"{base}.png"), 0
    while os.path.exists(path):  # never overwrite: a numbered suffix (or the next counter)
        k += 1
        if "{counter" in name:
            base = file_name(name, fields | {"counter": fields["counter"] + k})
            path = os.path.join(folder, f"{base}.png")
        else:
            path = os.path.join(folder, f"{base}-{k}.png")
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path
