"""Files written whole or not at all: every file latentforge writes goes through `atomic_path`.

A crash (or SIGKILL) while writing leaves at most a hidden `.<name>.tmp-<pid>` beside the target, never a
half-written target: the content is written under the temporary name in the same folder (so the rename
stays on one filesystem) and `os.replace`d into place, which POSIX makes atomic.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator


def temp_name(path: str) -> str:
    """The hidden temporary name beside `path` that `atomic_path` writes first."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside `path`; when the block ends without an exception, rename it to `path`.
    On an exception the temporary file is removed and `path` is left as it was. The parent folder is
    created if needed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str, obj, indent: int | None = 2) -> None:
    """JSON with sorted keys and a final newline, written atomically."""
    write_text(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")
