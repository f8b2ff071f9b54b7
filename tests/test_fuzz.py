"""A standing defence: random command lines and random files never give a traceback, a hang or a partial file.

The command line is run in-process (`latentforge.cli.main`); it may only exit 0, or 2 with an `error:` line
(its own, or argparse's). Nothing here trains or generates: training is replaced by a recorder, models are
garbage files that fail to load, and exports are a few tiny images. The file readers (safetensors headers,
PNG text chunks, caption files, TOML configs) get random bytes and mutated valid files.

Each property runs twice: a small budget in the default suite, a large one under `-m slow`.
"""

import contextlib
import io
import json
import os
import signal
import struct
import tempfile
import traceback

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from latentforge import checkpoint_io, cli
from latentforge.cli import main

FAST = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
TIME_LIMIT_S = 60  # one example: a hang is a failure
TMP = "@TMP@"  # stands for the example's own temporary folder

# What argv can hold: any text without NUL, and bytes that are not UTF-8 (Python's surrogate escapes).
TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=24
) | st.binary(max_size=24).map(lambda b: b.replace(b"\0", b"").decode("utf-8", "surrogateescape"))
NUMBER = (
    st.integers(-(2**70), 2**70).map(str)
    | st.floats().map(repr)
    | st.sampled_from(["0", "-1", "1", "1e309", "nan", "inf", "-inf", "0x10", "1_000", " 5", "", "3.5"])
    | TEXT
)
SMALL = st.integers(-3, 3).map(str) | st.sampled_from(["", "x", "nan", "1.5", "-0"])  # counts that stay cheap
PATH = st.sampled_from(
    [
        f"{TMP}/{n}"
        for n in (
            "file",
            "dir",
            "missing",
            "file/under",
            "empty",
            "garbage.safetensors",
            "garbage.ckpt",
            "empty.safetensors",
            "imgs",
        )
    ]  # fmt: skip
    + ["/proc/latentforge-fuzz", ""]
) | TEXT.map(lambda t: f"{TMP}/" + t.replace("..", "_").lstrip("/"))
MODELS = ("garbage.safetensors", "garbage.ckpt", "empty.safetensors", "dir", "missing.pt", "file")
MODEL = st.sampled_from([f"{TMP}/{n}" for n in MODELS])


def _flags(options: dict) -> st.SearchStrategy[list[str]]:
    """A random subset of `options` (flag -> value strategy), in random order, as argv."""
    pairs = st.lists(st.sampled_from(sorted(options)), max_size=len(options), unique=True).flatmap(
        lambda names: st.tuples(*[st.tuples(st.just(n), options[n]) for n in names])
    )
    return pairs.map(
        lambda ps: [x for flag, value in ps for x in ((flag,) if value is None else (flag, value))]
    )


GENERATION = {
    "--steps": NUMBER, "--sampler": st.sampled_from(["euler", "eulr", "dpmpp_2m"]) | TEXT,
    "--scheduler": st.sampled_from(["karras", "normal", "x"]) | TEXT, "--cfg": NUMBER, "--seed": NUMBER,
    "--width": NUMBER, "--height": NUMBER,
}  # fmt: skip
GENERATE = _flags(
    {
        **GENERATION,
        "--negative": TEXT,
        "--batch-size": NUMBER,
        "--out": PATH,
        "--vae": PATH | MODEL,
        "--prediction": st.sampled_from(["eps", "v", "x"]),
        "--dtype": st.sampled_from(["float32", "float16", "x"]),
        "--device": st.sampled_from(["cpu", "cuda", "cuda:7", "mps", "bogus", "cpu:0", ""]) | TEXT,
        "--quiet": st.none(),
    }  # fmt: skip
)
EVAL = _flags({**GENERATION, "--n": SMALL, "--size": NUMBER, "--json": PATH, "--out": PATH})
EXPORT = _flags({"--size": st.sampled_from(["32", "31", "513", "0"]) | NUMBER, "--seed": NUMBER,
                 "--split": st.sampled_from(["train", "heldout", "test"]) | TEXT})  # fmt: skip
FIELDS = ["lr", "resolution", "data", "max_steps", "batch_size", "net", "family", "unet.channel_mult",
          "unet.attention_resolutions", "unet.model_channels", "objective.prediction", "objective.shift",
          "sample_prompts", "ema_decay", "caption_dropout", "init_from", "text.hidden_size", "dit.depth",
          "vae", "precision", "buckets", "no_such_field", "unet"]  # fmt: skip
TRAIN = st.lists(
    st.tuples(
        st.sampled_from(FIELDS) | TEXT, NUMBER | PATH | st.sampled_from(["[1, 2]", "true", "{}", "none"])
    ),
    max_size=4,
).map(lambda kv: [x for k, v in kv for x in (f"--{k}", v)])


def _workdir(tmp: str) -> None:
    """The files the placeholders name."""
    with open(os.path.join(tmp, "file"), "w") as f:
        f.write("x")
    for d in ("dir", "empty", "imgs"):
        os.mkdir(os.path.join(tmp, d))
    with open(os.path.join(tmp, "garbage.safetensors"), "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with open(os.path.join(tmp, "garbage.ckpt"), "wb") as f:
        f.write(b"PK\x03\x04 this is no zip")
    open(os.path.join(tmp, "empty.safetensors"), "wb").close()
    img = np.zeros((32, 32, 3), np.uint8)
    img[8:24, 8:24] = (220, 30, 30)
    Image.fromarray(img).save(os.path.join(tmp, "imgs", "a.png"))
    with open(os.path.join(tmp, "imgs", "a.txt"), "w") as f:
        f.write("a red square")


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: int):
    def fire(signum, frame):
        raise _Timeout(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_cli(argv: list[str], tmp: str) -> tuple[int, str]:
    """(exit status, stderr) of `main(argv)` run in `tmp`; any other way out fails the test."""
    argv = [a.replace(TMP, tmp) for a in argv]
    err, out = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(tmp)  # relative paths land in the example's folder
    try:
        with _time_limit(TIME_LIMIT_S), contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                rc = main(argv)
            except SystemExit as e:  # argparse: --help (0) and its own usage errors (2)
                rc = e.code
    except _Timeout:
        pytest.fail(f"hang: {argv!r}")
    except Exception:
        pytest.fail(f"traceback for {argv!r}:\n{traceback.format_exc()}")
    finally:
        os.chdir(cwd)
    text = err.getvalue()
    assert rc in (0, 2), (argv, rc, text)
    if rc == 2:
        assert any(line.startswith("error: ") or ": error: " in line for line in text.splitlines()), (
            argv,
            text,
        )
    for root, _, files in os.walk(tmp):
        left = [f for f in files if ".tmp" in f]
        assert not left, (argv, root, left)  # a temporary file left behind: a partial write
    return rc, text


@contextlib.contextmanager
def _sandbox():
    """A fresh folder with the placeholder files; training replaced by a recorder."""
    seen = []

    def trainer(what):
        return lambda cfg, out, **kw: seen.append(cfg)

    real = cli._trainer
    cli._trainer = trainer
    try:
        with tempfile.TemporaryDirectory() as tmp:
            _workdir(tmp)
            yield tmp
    finally:
        cli._trainer = real


def _both(strategy, check):
    """The property `check` under `strategy` with the small budget, and with the large one marked slow."""
    fast = FAST(given(strategy)(check))
    slow = pytest.mark.slow(SLOW(given(strategy)(check)))
    return fast, slow


# -- the command line --------------------------------------------------------------------------------------


def _check_argv(argv):
    with _sandbox() as tmp:
        run_cli(argv, tmp)


COMMANDS = st.one_of(
    st.tuples(TEXT | st.just("a red circle"), MODEL, GENERATE).map(
        lambda t: ["generate", t[0], "--model", t[1], *t[2]]
    ),
    st.tuples(st.sampled_from(["--images", "--model"]), PATH | MODEL, EVAL).map(
        lambda t: ["eval", "shapes", t[0], t[1], *t[2]]
    ),
    st.tuples(PATH, SMALL, EXPORT).map(
        lambda t: ["shapes", "export", t[0], "--n", t[1], *t[2]]
    ),  # never 1000
    st.lists(TEXT, max_size=2).map(lambda rest: ["info", *rest]),
    st.tuples(
        st.sampled_from(["denoiser", "vae", "x"]),
        st.sampled_from([[], ["--preset", "shapes-tiny"], ["--preset", "shapes-vae"], ["--preset", "nope"]]),
        st.sampled_from([[], ["--data", "shapes"]]) | PATH.map(lambda p: ["--data", p]),
        TRAIN,
    ).map(lambda t: ["train", t[0], "--dry-run", *t[1], *t[2], *t[3]]),
    st.lists(TEXT, max_size=4),  # anything at all
)
test_cli_fuzz, test_cli_fuzz_slow = _both(COMMANDS, _check_argv)


# -- TOML configs through `train --config` ------------------------------------------------------------------

TOML_VALUE = st.recursive(
    st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.booleans()
    | st.text(max_size=12).map(lambda s: s.replace("\x00", "")),
    lambda inner: st.lists(inner, max_size=3),
    max_leaves=6,
)


def _toml_scalar(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return (
            "nan" if v != v else ("inf" if v == float("inf") else "-inf" if v == -float("inf") else repr(v))
        )
    if isinstance(v, int):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_scalar(x) for x in v) + "]"
    return json.dumps(v, ensure_ascii=False)  # JSON's string escapes are TOML's, near enough


def _toml(doc: dict) -> str:
    top = [f"{k} = {_toml_scalar(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    tables = [
        f"[{k}]\n" + "\n".join(f"{kk} = {_toml_scalar(vv)}" for kk, vv in v.items())
        for k, v in doc.items()
        if isinstance(v, dict)
    ]
    return "\n".join(top + tables) + "\n"


TOP = [
    "lr",
    "resolution",
    "max_steps",
    "data",
    "net",
    "sample_prompts",
    "ema_decay",
    "seed",
    "init_from",
    "bogus",
]
TABLES = {"unet": ["channel_mult", "model_channels", "attention_resolutions", "num_heads", "context_dim"],
          "objective": ["prediction", "shift", "sigma_sampling"], "dit": ["depth", "patch_size"],
          "text": ["hidden_size", "num_hidden_layers"], "vae": ["ch_mult"]}  # fmt: skip
TOML_DOC = st.dictionaries(st.sampled_from(TOP), TOML_VALUE, max_size=3) | st.dictionaries(
    st.sampled_from(sorted(TABLES)),
    st.dictionaries(
        st.sampled_from(sorted({f for fs in TABLES.values() for f in fs})), TOML_VALUE, max_size=3
    )
    | TOML_VALUE,
    max_size=2,
)
TOML_FILE = TOML_DOC.map(lambda d: _toml(d).encode("utf-8", "surrogatepass")) | st.binary(max_size=200)


def _check_toml(case):
    data, what, preset = case
    with _sandbox() as tmp:
        with open(os.path.join(tmp, "c.toml"), "wb") as f:
            f.write(data)
        preset_args = ["--preset", preset] if preset else []
        run_cli(["train", what, "--dry-run", *preset_args, "--config", f"{TMP}/c.toml"], tmp)


TOML_CASES = st.tuples(
    TOML_FILE, st.sampled_from(["denoiser", "vae"]), st.sampled_from(["", "shapes-tiny", "shapes-vae"])
)
test_toml_fuzz, test_toml_fuzz_slow = _both(TOML_CASES, _check_toml)


# -- caption files and PNG text chunks through `eval shapes --images` ---------------------------------------

CAPTION = st.sampled_from([b"a red square", b"a blue circle", b"three green hearts"]) | st.binary(max_size=60)
METADATA = st.lists(
    st.sampled_from(
        [b'{"file_name": "a.png", "text": "a red square"}', b"{", b"[]", b'{"file_name": 3}', b""]
    )
    | st.binary(max_size=40),
    max_size=3,
).map(lambda lines: b"\n".join(lines))
PNG_TEXT = st.lists(
    st.tuples(st.text(min_size=1, max_size=10), st.text(max_size=40), st.booleans()), max_size=3
)


def _check_folder(case):
    caption, metadata, chunks, mangle = case
    with _sandbox() as tmp:
        imgs = os.path.join(tmp, "imgs")
        with open(os.path.join(imgs, "a.txt"), "wb") as f:
            f.write(caption)
        if metadata is not None:
            with open(os.path.join(imgs, "metadata.jsonl"), "wb") as f:
                f.write(metadata)
        info = PngImagePlugin.PngInfo()
        for key, value, zipped in chunks:
            with contextlib.suppress(ValueError, UnicodeError):  # keys Pillow refuses to write
                info.add_text(key, value, zip=zipped)
        path = os.path.join(imgs, "a.png")
        with contextlib.suppress(ValueError, UnicodeError, OSError):
            Image.open(path).copy().save(path, pnginfo=info)
        if mangle is not None:  # overwrite a few bytes of the PNG
            at, data = mangle
            with open(path, "r+b") as f:
                size = os.path.getsize(path)
                f.seek(at % size)
                f.write(data)
        run_cli(
            ["eval", "shapes", "--images", f"{TMP}/imgs", "--size", "32", "--json", f"{TMP}/r/r.json"], tmp
        )


FOLDERS = st.tuples(
    CAPTION,
    st.none() | METADATA,
    PNG_TEXT,
    st.none() | st.tuples(st.integers(0, 10**6), st.binary(min_size=1, max_size=8)),
)
test_caption_fuzz, test_caption_fuzz_slow = _both(FOLDERS, _check_folder)


def _check_png_text(text):
    """The PNG `parameters` chunk `generate` writes holds any prompt text and reads back unchanged."""
    from latentforge.pipeline import save_png

    with tempfile.TemporaryDirectory() as tmp:
        path = save_png(Image.new("RGB", (8, 8)), tmp, text, 0)
        with Image.open(path) as im:
            assert im.text["parameters"] == text
        assert os.listdir(tmp) == [os.path.basename(path)]


PNG_PROMPTS = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)
test_png_text_fuzz, test_png_text_fuzz_slow = _both(PNG_PROMPTS, _check_png_text)


# -- safetensors headers ------------------------------------------------------------------------------------


def _valid_safetensors() -> bytes:
    from safetensors.torch import save

    tensors = {
        "a": torch.arange(6, dtype=torch.float16).reshape(2, 3),
        "b": torch.arange(4, dtype=torch.int64),
    }
    return save(tensors, metadata={"format": "pt", "k": "v"})


VALID = _valid_safetensors()
N_HEADER = struct.unpack("<Q", VALID[:8])[0]
HEADER = json.loads(VALID[8 : 8 + N_HEADER])

JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
ENTRY = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F16", "F32", "BF16", "I64", "U8", "BOOL", "F64", "X"]) | JSON_VALUE,
        "shape": st.lists(st.integers(-2, 2**40), max_size=4) | JSON_VALUE,
        "data_offsets": st.lists(st.integers(-2, 2**40), max_size=3) | JSON_VALUE,
    },
)


def _rebuild(header: dict, data: bytes, claimed: int | None = None) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob) if claimed is None else claimed) + blob + data


SAFETENSORS = st.one_of(
    st.binary(max_size=300),  # random bytes
    st.tuples(st.integers(0, len(VALID) - 1), st.binary(min_size=1, max_size=6)).map(  # flipped bytes
        lambda t: VALID[: t[0]] + t[1] + VALID[t[0] + len(t[1]) :]
    ),
    st.integers(0, len(VALID)).map(lambda n: VALID[:n]),  # truncated
    st.tuples(st.sampled_from(["a", "b", "__metadata__", "c"]), ENTRY | JSON_VALUE).map(  # a replaced entry
        lambda t: _rebuild({**HEADER, t[0]: t[1]}, VALID[8 + N_HEADER :])
    ),
    st.integers(0, 2**64 - 1).map(
        lambda n: _rebuild(HEADER, VALID[8 + N_HEADER :], claimed=n)
    ),  # header size
)


def _check_safetensors(case):
    data, suffix = case
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"m{suffix}")
        with open(path, "wb") as f:
            f.write(data)
        with _time_limit(TIME_LIMIT_S):
            for read in (
                lambda: checkpoint_io.read_state_dict(path),
                lambda: checkpoint_io.read_state_dict(path, dtype=torch.float32),
                lambda: checkpoint_io.read_metadata(path),
            ):
                try:
                    read()
                except ValueError:
                    pass  # the documented answer to a bad file


test_safetensors_fuzz, test_safetensors_fuzz_slow = _both(
    st.tuples(SAFETENSORS, st.sampled_from([".safetensors", ".ckpt"])), _check_safetensors
)
