"""The command line's checks of user input, run before any expensive work.

Each check returns the value (possibly normalized) or raises a `ValueError` (or `FileNotFoundError`) whose
message names the flag, the value and what is accepted; `cli.main` prints it as one `error: …` line and
exits with status 2. Anything else that escapes a command is a bug and keeps its traceback.
"""

from __future__ import annotations

import math
import os
import tempfile

import tomllib

# What `cli.main` reports as a user error (one line, exit status 2) instead of a traceback.
USER_ERRORS = (
    ValueError,  # includes UnicodeError and json.JSONDecodeError
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    tomllib.TOMLDecodeError,
)

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
DEVICES = "cpu, cuda, cuda:N or mps"
# For --help only (the config checks the range: training.config.FOLDER_RES_MIN/MAX, equal in the tests).
TRAIN_RES_MIN, TRAIN_RES_MAX = 32, 4096


def message(e: BaseException) -> str:
    """One line for `error: …`: an OSError as 'strerror: path', anything else as its text."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        text = f"{e.strerror}: {e.filename!r}"
    elif isinstance(e, UnicodeDecodeError):
        text = f"not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split("\n")).strip()


def utf8(flag: str, text: str) -> str:
    """`text` if it encodes as UTF-8; argv bytes that are not UTF-8 arrive as lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raw = text[e.start].encode("utf-8", "surrogateescape")
        raise ValueError(
            f"{flag} is not valid UTF-8 text (byte 0x{raw[0]:02x} at character {e.start}); "
            "give the text in UTF-8"
        ) from None
    return text


def int_in(flag: str, value: int | None, lo: int, hi: int | None = None) -> int | None:
    if value is None:
        return None
    if value < lo or (hi is not None and value > hi):
        accepted = f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}"
        raise ValueError(f"{flag} {value} is out of range; expected {accepted}")
    return value


def float_in(flag: str, value: float | None, lo: float, hi: float) -> float | None:
    if value is None:
        return None
    if not math.isfinite(value) or not lo <= value <= hi:
        raise ValueError(f"{flag} {value!r} is out of range; expected a number in [{lo:g}, {hi:g}]")
    return value


def outpaint(flag: str, text: str, hi: int) -> tuple[int, int, int, int]:
    """Pixels added by --outpaint, "L,R,T,B" (left, right, top, bottom) or one number for every side."""
    parts = [p.strip() for p in text.split(",")]
    accepted = f"one whole number of pixels or four, left,right,top,bottom, each in [0, {hi}]"
    if len(parts) not in (1, 4) or not all(p.isascii() and p.isdigit() for p in parts):
        raise ValueError(f"{flag} {text!r} is not {accepted} (e.g. 64 or 64,64,0,0)")
    pad = tuple(int(p) for p in parts) * (4 if len(parts) == 1 else 1)
    if any(v > hi for v in pad):
        raise ValueError(f"{flag} {text!r} is out of range; expected {accepted}")
    if not any(pad):
        raise ValueError(f"{flag} {text!r} adds no pixel; give at least one side > 0")
    return pad  # type: ignore[return-value]


def _nearest_existing(path: str) -> str:
    """`path` or its nearest existing ancestor (absolute)."""
    p = os.path.abspath(path)
    while not os.path.lexists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def _creatable(what: str, path: str) -> None:
    """`path` (a folder) exists or can be created, and can be written in: its nearest existing ancestor is
    a folder where a temporary folder can be made (and is removed at once)."""
    longest = max(os.path.abspath(path).split(os.sep), key=len)
    if len(os.fsencode(longest)) > 255 or len(os.fsencode(os.path.abspath(path))) > 4000:
        raise ValueError(f"{what}: the name is too long (at most 255 bytes a part, 4000 in all)")
    base = _nearest_existing(path)
    if not os.path.isdir(base):
        raise ValueError(f"{what}: {base!r} is a file, so nothing can be created under it")
    try:
        tempfile.TemporaryDirectory(prefix=".latentforge-check-", dir=base).cleanup()
    except OSError as e:
        raise ValueError(f"{what}: cannot write in {base!r} ({e.strerror or e})") from None


def out_dir(flag: str, path: str) -> str:
    """A folder the command may create and write into: not a file, not under a file, writable. Nothing is
    created here."""
    if not path:
        raise ValueError(f"{flag} is empty; expected a directory")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a file; expected a directory (existing or to be created)")
    _creatable(f"{flag} {path!r}", path)
    return path


def out_file(flag: str, path: str) -> str:
    """A file the command may write: not a directory, its directory creatable and writable."""
    if not path:
        raise ValueError(f"{flag} is empty; expected a file name")
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a directory; expected a file name")
    _creatable(f"{flag} {path!r}", os.path.dirname(os.path.abspath(path)))
    return path


def in_file(flag: str, path: str, what: str) -> str:
    """An existing, readable regular file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path!r} does not exist; expected {what}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{flag} {path!r} is a directory, not a file; expected {what}")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{flag} {path!r} is not readable")
    return path


def checkpoint(flag: str, path: str) -> str:
    return in_file(flag, path, f"a checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)})")


def in_dir(flag: str, path: str, what: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path!r} does not exist; expected {what}")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{flag} {path!r} is a file, not a directory; expected {what}")
    return path


def device(flag: str, name: str | None) -> str | None:
    """A torch device this machine has: cpu, cuda[:N] (when CUDA is available) or mps."""
    if name is None:
        return None
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"{flag} {name!r} is not a device; expected {DEVICES}") from None
    if dev.type == "cpu":
        return name
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {name!r}: CUDA is not available on this machine; use {flag} cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"{flag} {name!r}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
        return name
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{flag} {name!r}: MPS is not available on this machine; use {flag} cpu")
        return name
    raise ValueError(f"{flag} {name!r} is not supported; expected {DEVICES}")


def read_toml(flag: str, path: str) -> dict:
    """The TOML file's tables, with errors that name the file (missing, a folder, not UTF-8, not TOML)."""
    in_file(flag, path, "a TOML file")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag} {path!r}: {message(e)}; a TOML file is UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{flag} {path!r} is not valid TOML: {e}") from None


def config_shapes(cls, fields: dict, source: str) -> None:
    """A list where the config declares a tuple, a table where it declares a sub-config: the checks the
    config's own coercion misses (`channel_mult = 2` would otherwise fail with a TypeError deep inside).
    `fields`: dotted keys ("unet.channel_mult") as the TOML's tables flatten to, or nested dicts."""
    import dataclasses
    import types
    import typing

    def base(tp):
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            return args[0] if len(args) == 1 else tp
        return tp

    def check(cls, key: str, value, where: str) -> None:
        hints = typing.get_type_hints(cls)
        top, _, rest = key.partition(".")
        if top not in hints:
            return  # unknown names: the config's own error lists the known ones
        tp = base(hints[top])
        name = f"{where}{top}"
        if dataclasses.is_dataclass(tp):
            if rest:
                check(tp, rest, value, f"{name}.")
            elif isinstance(value, dict):
                for k, v in value.items():
                    check(tp, str(k), v, f"{name}.")
            elif value is not None and not isinstance(value, (tp, str)):
                raise ValueError(f"{source}: {name} must be a table of {tp.__name__} fields, got {value!r}")
            return
        if typing.get_origin(tp) is tuple and not isinstance(value, (list, tuple, str)):
            raise ValueError(f"{source}: {name} must be a list (e.g. [1, 2]), got {value!r}")
        if tp in (int, float, bool, str) and isinstance(value, (list, dict)):
            raise ValueError(f"{source}: {name} must be a single {tp.__name__}, got {value!r}")

    for key, value in fields.items():
        check(cls, str(key), value, "")


def train_config(cfg) -> None:
    """What only the command line checks of a run's config: that its input paths exist. The config checks
    its own values when it is built (training/config.py: finite numbers, the resolution's range)."""
    if cfg.data != "shapes":
        in_dir("--data", cfg.data, "'shapes' or a folder of images with captions")
    for name in ("init_from", "vae", "text_encoder"):
        value = getattr(cfg, name, None)
        if isinstance(value, str):
            checkpoint(f"--{name.replace('_', '-')}", value)
