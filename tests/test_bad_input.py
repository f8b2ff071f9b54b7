"""Every user error the command line can meet: one `error: …` line naming the value and what is accepted,
exit status 2, no traceback, nothing written, and nothing trained or generated."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from latentforge import cli, tokenizer
from latentforge.cli import main

NOT_UTF8 = b"a \xff cat".decode("utf-8", "surrogateescape")  # how Python hands over argv bytes


@pytest.fixture
def paths(tmp_path):
    """Names for the table's placeholders: files and folders of each kind a case needs."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "m.safetensors").write_bytes(b"")  # exists: the checks run before anything reads it
    toml = {
        "missing": None,
        "dir": None,
        "notoml": "lr = = 3\n",
        "latin1": "text = 'caf\xe9'\n".encode("latin-1"),
        "shape": "[unet]\nchannel_mult = 2\n",
        "topshape": "channel_mult = 2\n",
        "lrinf": "lr = inf\n",
        "listlr": "lr = [1, 2]\n",
        "strlist": 'sample_prompts = "a red cube, on a blue floor"\n',
    }
    for name, body in toml.items():
        if isinstance(body, bytes):
            (tmp_path / f"{name}.toml").write_bytes(body)
        elif body is not None:
            (tmp_path / f"{name}.toml").write_text(body)
    (tmp_path / "dir.toml").mkdir()
    png = np.full((64, 64, 3), 200, np.uint8)

    def folder(name, captions=None, metadata=None):
        d = tmp_path / name
        d.mkdir()
        for k in range(2):
            Image.fromarray(png).save(d / f"00000{k}.png")
            if captions is not None:
                (d / f"00000{k}.txt").write_bytes(captions)
        if metadata is not None:
            (d / "metadata.jsonl").write_text(metadata)

    folder("nocaps")
    folder("badmeta", metadata='{"file_name": "000000.png", "text": "a red circle"}\n{"file_name": \n')
    folder("nontextmeta", metadata='{"file_name": "000000.png", "text": "a red circle"}\n[1, 2]\n')
    folder("latin1caps", captions="a red caf\xe9".encode("latin-1"))
    folder("foreign", captions=b"a photo of a dog")
    run = tmp_path / "denoiser-run"  # what a denoiser run at step 22 holds, as far as the checks look
    (run / "state" / "step-00000022").mkdir(parents=True)
    (run / "state" / "step-00000022" / "state.json").write_text('{"step": 22}')
    (run / "config.json").write_text(json.dumps({"family": "sd15", "net": "unet", "max_steps": 22}))
    names = ("file", "dir", "empty", "nocaps", "badmeta", "nontextmeta", "latin1caps", "foreign")
    return {k: str(tmp_path / k) for k in names} | {
        "tmp": str(tmp_path),
        "model": str(tmp_path / "m.safetensors"),
        "run": str(run),
    }


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
    def refuse(what):
        raise AssertionError("a bad input reached the trainer")

    monkeypatch.setattr(cli, "_trainer", refuse)


GEN = ["generate", "a cat", "--model", "{model}"]
TRAIN = ["train", "denoiser", "--preset", "shapes-tiny", "--dry-run"]
EVAL = ["eval", "shapes", "--images"]

# id, argv (placeholders from `paths`), words the message holds
CASES = [
    ("prompt-not-utf8", ["generate", NOT_UTF8, "--model", "{model}"],
     ["the prompt", "not valid UTF-8", "0xff"]),
    ("negative-not-utf8", [*GEN, "--negative", NOT_UTF8], ["--negative", "not valid UTF-8"]),
    ("out-under-file", [*GEN, "--out", "{file}/out"], ["--out", "'{file}' is a file", "nothing can be"]),
    ("out-is-file", [*GEN, "--out", "{file}"], ["--out", "is a file; expected a directory"]),
    ("out-in-proc", [*GEN, "--out", "/proc/latentforge-out"], ["--out", "cannot write in '/proc'"]),
    ("out-name-too-long", [*GEN, "--out", "{tmp}/" + "x" * 300], ["--out", "the name is too long"]),
    ("device-bogus", [*GEN, "--device", "bogus"], ["--device 'bogus'", "expected cpu, cuda, cuda:N or mps"]),
    ("device-cuda-none", [*GEN, "--device", "cuda"], ["--device 'cuda'", "CUDA is not available"]),
    ("offload-no-device", [*GEN, "--offload"], ["--offload moves the networks", "give --device cuda"]),
    ("offload-cpu", [*GEN, "--offload", "--device", "cpu"], ["--offload", "(got cpu)"]),
    ("serve-offload-cpu", ["serve", "--offload"], ["--offload moves the networks", "(got none)"]),
    ("model-is-dir", ["generate", "a cat", "--model", "{dir}"],
     ["--model", "is a directory", "expected a checkpoint file (.safetensors"]),
    ("model-missing", ["generate", "a cat", "--model", "{tmp}/no.ckpt"], ["--model", "does not exist"]),
    ("vae-is-dir", [*GEN, "--vae", "{dir}"], ["--vae", "is a directory"]),
    ("no-prompt", ["generate", "--model", "{model}"], ["give a prompt", "--decode LATENTS.safetensors"]),
    ("decode-missing", ["generate", "--model", "{model}", "--decode", "{tmp}/no.safetensors"],
     ["--decode", "does not exist", "latents saved by latentforge"]),
    ("decode-is-dir", ["generate", "--model", "{model}", "--decode", "{dir}"],
     ["--decode", "is a directory"]),
    ("steps-0", [*GEN, "--steps", "0"], ["--steps 0", "[1, 10000]"]),
    ("cfg-nan", [*GEN, "--cfg", "nan"], ["--cfg nan", "[0, 100]"]),
    ("width-negative", [*GEN, "--width", "-64"], ["--width -64", "[1, 16384]"]),
    ("batch-0", [*GEN, "--batch-size", "0"], ["--batch-size 0", "[1, 256]"]),
    ("seed-negative", [*GEN, "--seed", "-1"], ["--seed -1", "[0, "]),
    ("sampler-typo", [*GEN, "--sampler", "eulr"], ["eulr", "Did you mean 'euler'"]),
    ("scheduler-typo", [*GEN, "--scheduler", "karas"], ["karas", "karras"]),
    ("config-missing", [*TRAIN, "--config", "{tmp}/missing.toml"], ["--config", "does not exist", "TOML"]),
    ("config-is-dir", [*TRAIN, "--config", "{tmp}/dir.toml"], ["--config", "is a directory", "TOML"]),
    ("config-not-toml", [*TRAIN, "--config", "{tmp}/notoml.toml"], ["--config", "is not valid TOML"]),
    ("config-not-utf8", [*TRAIN, "--config", "{tmp}/latin1.toml"], ["--config", "not UTF-8", "0xe9"]),
    ("config-wrong-shape", [*TRAIN, "--config", "{tmp}/shape.toml"],
     ["unet.channel_mult must be a list", "got 2"]),
    ("config-unknown-field", [*TRAIN, "--config", "{tmp}/topshape.toml"], ["unknown", "channel_mult"]),
    ("config-list-for-number", [*TRAIN, "--config", "{tmp}/listlr.toml"], ["lr must be a single float"]),
    ("config-lr-inf", [*TRAIN, "--config", "{tmp}/lrinf.toml"], ["lr=inf", "not a finite number"]),
    ("data-missing", [*TRAIN, "--data", "{tmp}/nodata"],
     ["--data", "does not exist", "'shapes' or a folder of images"]),
    ("data-is-file", [*TRAIN, "--data", "{file}"], ["--data", "is a file, not a directory"]),
    ("lr-inf", [*TRAIN, "--lr", "inf"], ["lr=inf", "not a finite number"]),
    ("lr-nan", [*TRAIN, "--lr", "nan"], ["lr=nan is not a finite number"]),
    ("resolution-shapes", [*TRAIN, "--resolution", "100000"],
     ["resolution 100000", "shapes data", "[32, 512]"]),
    ("resolution-folder", [*TRAIN, "--data", "{dir}", "--resolution", "100000"],
     ["resolution 100000", "[32, 4096]"]),
    ("train-no-out", ["train", "denoiser", "--preset", "shapes-tiny"], ["give --out DIR"]),
    ("train-out-under-file", ["train", "denoiser", "--out", "{file}/run"], ["--out", "is a file"]),
    ("resume-missing", ["train", "denoiser", "--resume", "{tmp}/norun"], ["--resume", "does not exist"]),
    ("resume-not-a-run", ["train", "denoiser", "--resume", "{dir}"],
     ["--resume", "no config.json, no state/", "not a training run"]),
    ("resume-with-preset-not-a-run", ["train", "denoiser", "--preset", "shapes-tiny", "--resume", "{empty}"],
     ["--resume", "no config.json, no state/"]),
    ("resume-half-run", ["train", "denoiser", "--resume", "{nocaps}"], ["--resume", "no config.json"]),
    ("resume-with-other-out", ["train", "denoiser", "--resume", "{run}", "--out", "{tmp}/other"],
     ["--out", "a resumed run stays in its own folder"]),
    ("vae-resume-of-denoiser-run", ["train", "vae", "--resume", "{run}"],
     ["is a denoiser run, not a vae run", "train denoiser --resume"]),
    ("config-string-for-list", [*TRAIN, "--config", "{tmp}/strlist.toml"],
     ["sample_prompts is a list field", "TOML list"]),
    ("min-image-size-0", [*TRAIN, "--min-image-size", "0"], ["min_image_size must be an integer >= 1"]),
    ("resolution-folder-vae", ["train", "vae", "--dry-run", "--data", "{dir}", "--resolution", "8"],
     ["resolution 8 is out of range", "[32, 4096]"]),
    ("lr-list-of-numbers", [*TRAIN, "--lr", "1", "--lr", "2"], ["lr must be a single float"]),
    ("train-option-not-utf8", [*TRAIN, "--sample-prompts", NOT_UTF8], ["not valid UTF-8"]),
    ("eval-json-under-file", [*EVAL, "{nocaps}", "--json", "{file}/r.json"],
     ["--json '{file}/r.json'", "'{file}' is a file"]),
    ("eval-json-is-dir", [*EVAL, "{nocaps}", "--json", "{dir}"], ["--json", "is a directory; expected a"]),
    ("eval-empty-folder", [*EVAL, "{empty}"], ["{empty}", "no images to score", ".png"]),
    ("eval-no-captions", [*EVAL, "{nocaps}"], ["none of the 2 images has a caption", "metadata.jsonl"]),
    ("eval-completion-with-images", [*EVAL, "{nocaps}", "--complete-prompt", "layout"],
     ["--complete-prompt layout", "--model"]),
    ("eval-n-0", [*EVAL, "{nocaps}", "--n", "0"], ["--n 0", ">= 1"]),
    ("eval-n-negative", ["eval", "shapes", "--model", "{model}", "--n", "-5"], ["--n -5", ">= 1"]),
    ("eval-broken-metadata", [*EVAL, "{badmeta}"], ["metadata.jsonl: line 2 is not JSON"]),
    ("eval-metadata-not-object", [*EVAL, "{nontextmeta}"], ["metadata.jsonl: line 2 is not an object"]),
    ("eval-caption-not-utf8", [*EVAL, "{latin1caps}"], ["000000.txt: not UTF-8", "0xe9"]),
    ("eval-foreign-captions", [*EVAL, "{foreign}"], ["none of the 2 captions is a shapes prompt", "a dog"]),
    ("eval-images-missing", [*EVAL, "{tmp}/none"], ["--images", "does not exist"]),
    ("eval-images-is-file", [*EVAL, "{file}"], ["--images", "is a file, not a directory"]),
    ("eval-model-is-dir", ["eval", "shapes", "--model", "{dir}"], ["--model", "is a directory"]),
    ("eval-size", [*EVAL, "{nocaps}", "--size", "1000"], ["--size 1000", "[32, 512]"]),
    ("eval-garbage-model", ["eval", "shapes", "--model", "{model}", "--out", "{tmp}/gen"],
     ["is not a readable safetensors file"]),
    ("eval-neither", ["eval", "shapes"], ["exactly one of --images DIR or --model PATH"]),
    ("eval-out-under-file", ["eval", "shapes", "--model", "{model}", "--out", "{file}/g"],
     ["--out", "is a file"]),
    ("export-to-file", ["shapes", "export", "{file}", "--n", "1"], ["DIR '{file}' is a file", "directory"]),
    ("export-under-file", ["shapes", "export", "{file}/x", "--n", "1"], ["'{file}' is a file"]),
    ("export-n-0", ["shapes", "export", "{tmp}/x", "--n", "0"], ["--n 0", ">= 1"]),
    ("export-size", ["shapes", "export", "{tmp}/x", "--size", "1000"], ["--size 1000", "[32, 512]"]),
    ("export-relation-share", ["shapes", "export", "{tmp}/x", "--relation_share", "1.5"],
     ["--relation_share 1.5", "[0, 1]"]),
    ("export-background-share", ["shapes", "export", "{tmp}/x", "--background_share", "-1"],
     ["--background_share -1.0", "[0, 1]"]),
    ("export-labelled-share", ["shapes", "export", "{tmp}/x", "--labelled_share", "2"],
     ["--labelled_share 2.0", "[0, 1]"]),
    ("bench-out-is-file", ["bench", "samplers", "--out", "{file}"], ["--out", "is a file"]),
]  # fmt: skip


@pytest.mark.parametrize("argv,words", [pytest.param(a, w, id=i) for i, a, w in CASES])
def test_bad_input(argv, words, paths, capsys, monkeypatch):
    import torch

    if "/proc/latentforge-out" in argv and not (sys.platform == "linux" and os.path.isdir("/proc")):
        pytest.skip("needs Linux /proc")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fill = paths
    argv = [a.format(**fill) for a in argv]
    before = sorted(os.listdir(paths["tmp"]))
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w.format(**fill) in lines[0], (w, lines[0])
    assert sorted(os.listdir(paths["tmp"])) == before  # nothing created, not even an empty folder


def test_argparse_errors_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "a cat", "--model", "m", "--steps", "many"])
    assert e.value.code == 2
    assert "error: argument --steps: invalid int value: 'many'" in capsys.readouterr().err


def test_help_states_the_ranges(capsys):
    for argv, words in (
        (["generate", "-h"], ["1..10000", "0..100", "1..16384", "1..256", "cpu, cuda"]),
        (["shapes", "export", "-h"], ["32..512", ">= 1"]),
        (["eval", "shapes", "-h"], ["32..512", ">= 1"]),
        (["train", "denoiser", "-h"], ["32..512", "32..4096", "finite"]),
    ):
        with pytest.raises(SystemExit):
            main(argv)
        out = " ".join(capsys.readouterr().out.split())
        for w in words:
            assert w in out, (argv, w)


def test_a_valid_dry_run_reaches_the_trainer(monkeypatch, tmp_path):
    seen = {}

    def fake(what):
        return lambda cfg, out, **kw: seen.update(cfg=cfg, out=out, **kw)

    monkeypatch.setattr(cli, "_trainer", fake)
    (tmp_path / "c.toml").write_text("lr = 3e-4\n[unet]\nchannel_mult = [1, 2]\n")
    argv = ["train", "denoiser", "--preset", "shapes-tiny", "--config", str(tmp_path / "c.toml"), "--dry-run",
            "--max-steps", "5"]  # fmt: skip
    assert main(argv) == 0
    assert seen["dry_run"] and seen["cfg"].lr == 3e-4 and seen["cfg"].unet.channel_mult == (1, 2)
    assert seen["cfg"].max_steps == 5


def test_eval_folder_errors_in_the_library(tmp_path):
    from latentforge.shapes.evaluate import evaluate_folder

    with pytest.raises(ValueError, match="no images to score"):
        evaluate_folder(tmp_path)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png"}) + "\n")
    with pytest.raises(ValueError, match='line 1 is not an object with "file_name"'):
        evaluate_folder(tmp_path)


LONG = " ".join(["a big red circle"] * 30)  # 4 tokens a phrase: 120 tokens


def test_long_prompt_warns_once(monkeypatch):
    monkeypatch.setattr(tokenizer, "_cut_warned", set())
    with pytest.warns(tokenizer.PromptTruncatedWarning, match=r"has 120 tokens, .* limit of 75 \(77 with"):
        ids = tokenizer.tokenize([LONG, LONG])
    assert ids.shape == (2, 77)
    with pytest.warns(tokenizer.PromptTruncatedWarning) as record:
        tokenizer.tokenize(LONG)  # the same prompt again: no second warning
        tokenizer.tokenize(LONG + " again")  # another one: its own
        tokenizer.tokenize("a red circle")  # short: none
    assert len(record) == 1 and "121 tokens" in str(record[0].message)


# A long prompt through the conditioning is chunked, not cut: tests/test_prompts.py
# (test_long_prompt_through_sd15_is_not_cut).


def test_cli_shows_warnings_as_one_line(monkeypatch, tmp_path, capsys):
    """The CLI prints a cut prompt's warning as `warning: …` on stderr (a stand-in pipeline tokenizes)."""
    from latentforge import pipeline

    class FakePipe:
        defaults = dict(pipeline.GENERATION_DEFAULTS)
        default_size = (8, 8)
        device = torch.device("cpu")

        def __call__(self, prompt, **kw):
            tokenizer.tokenize(prompt)
            return [Image.new("RGB", (8, 8))]

        def image_prompts(self, prompt, **kw):
            return [prompt]

        def prompt_completion(self, requested):
            return None

    monkeypatch.setattr(tokenizer, "_cut_warned", set())
    monkeypatch.setattr(pipeline.Pipeline, "from_single_file", classmethod(lambda cls, *a, **k: FakePipe()))
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"x")
    assert main(["generate", LONG, "--model", str(model), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: the prompt") and "120 tokens" in err[0]
    assert len(list((tmp_path / "o").glob("*.png"))) == 1


@pytest.mark.parametrize("case", ["sampling", "decode"])
def test_generate_too_large_is_refused_before_work(monkeypatch, tmp_path, capsys, case):
    # A real (tiny) model and a size the memory available cannot hold: one error line naming the size and
    # the estimate, exit 2, the denoiser never called, nothing written.
    from latentforge import memory
    from tests.test_pipeline import _save, tiny

    pipe = tiny("sd15")
    path, _ = _save(pipe, "sd15", tmp_path)
    cfg = 7.0 if case == "sampling" else 1.0  # (without CFG, one row per image: sampling fits)
    est = pipe.estimate_memory(64, 48, cfg=cfg)
    avail = est.denoiser // 2 if case == "sampling" else min(est.decode, est.decode_tiled) - 1
    if case == "decode":
        assert avail >= est.denoiser
    monkeypatch.setattr(memory, "available_memory", lambda device: avail)
    from latentforge.models.unet import UNet

    monkeypatch.setattr(UNet, "forward", lambda *a, **k: pytest.fail("sampling started"))
    out = tmp_path / "out"
    assert (
        main(
            ["generate", "a cat", "--model", path, "--width", "64", "--height", "48", "--cfg", str(cfg)]
            + ["--out", str(out)]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: 64x48 needs about "), err
    assert "available; use a smaller size" in err[0]
    assert not out.exists() or not list(out.iterdir())
