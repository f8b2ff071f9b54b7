"""The run folder and the config hold up against misuse and crashes: resume only of runs, one run per folder
(an OS lock), no silent overwrite, broken training states, leftovers after SIGKILL, --resume with other
flags, tiny images, and the config's own checks (finite numbers, resolution, lists)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from latentforge.cli import main as cli
from latentforge.training import dist, loop, run_folder
from latentforge.training import state as st
from latentforge.training.config import (
    DenoiserTrainConfig,
    VAETrainConfig,
    _coerce,
    load_toml,
    resolve,
)
from latentforge.training.trainer import train_denoiser

MICRO = {
    "unet.model_channels": 32,
    "unet.channel_mult": "[1, 2]",
    "unet.attention_resolutions": "[2]",
    "unet.context_dim": 32,
    "text.hidden_size": 32,
    "text.intermediate_size": 64,
    "text.num_hidden_layers": 1,
    "text.max_position_embeddings": 16,
    "resolution": 32,
    "batch_size": 2,
    "num_workers": 0,
    "log_every": 1,
    "sample_steps": 1,
    "eval_n": 0,
    "warmup_steps": 0,
}


def micro(**over):
    return resolve("denoiser", "shapes-tiny", overrides={**MICRO, **over})


def _flags(d: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in d.items()]


# -- item 2 / 9: --resume of what is not a run; --resume with --out or a smaller --max-steps -------------


def test_resume_of_a_folder_that_is_not_a_run_names_what_is_missing(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(["train", "denoiser", "--preset", "shapes-tiny", "--resume", str(empty), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "no config.json, no state/" in err and "not a training run" in err
    with pytest.raises(ValueError, match="cannot resume .*it does not exist"):
        train_denoiser(micro(), str(tmp_path / "nothing-here"), resume=True, progress=False)
    assert not (tmp_path / "nothing-here").exists()  # nothing made


def test_resume_past_max_steps_is_refused_and_nothing_rewritten(tmp_path, capsys):
    out = str(tmp_path / "run")
    train_denoiser(micro(max_steps=3, checkpoint_every=3), out, progress=False)
    config = open(os.path.join(out, "config.json")).read()
    metrics = open(os.path.join(out, "metrics.jsonl")).read()
    capsys.readouterr()
    assert cli(["train", "denoiser", "--resume", out, "--max-steps", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "is at step 3, past max_steps=2" in err and "--max-steps 3 or more" in err
    assert open(os.path.join(out, "config.json")).read() == config
    assert open(os.path.join(out, "metrics.jsonl")).read() == metrics
    assert cli(["train", "denoiser", "--resume", out, "--out", str(tmp_path / "other")]) == 2
    assert "a resumed run stays in its own folder" in capsys.readouterr().err


# -- item 3: one run per folder ----------------------------------------------------------------------


def test_a_second_run_into_a_locked_folder_names_the_first_process(tmp_path, capsys):
    out = str(tmp_path / "run")
    argv = ["train", "denoiser", "--preset", "shapes-tiny", "--out", out, "--max-steps", "100000", "--quiet",
            *_flags(MICRO)]  # fmt: skip
    first = subprocess.Popen([sys.executable, "-m", "latentforge.cli", *argv], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)  # fmt: skip
    try:
        lock = os.path.join(out, ".lock")
        deadline = time.time() + 120
        while not (os.path.isfile(lock) and open(lock).read().strip() == str(first.pid)):
            assert first.poll() is None, first.stderr.read().decode()
            assert time.time() < deadline, "the first run never took the lock"
            time.sleep(0.2)
        assert cli(argv) == 2
        err = capsys.readouterr().err
        assert f"is in use by another run (process {first.pid})" in err, err
        with pytest.raises(ValueError, match=f"process {first.pid}"):
            train_denoiser(micro(), out, progress=False)
    finally:
        first.kill()
        first.wait()
    # killed: the OS dropped the lock; a new run is refused by the folder's contents (config.json written
    # before the kill) or starts, but is not refused by the lock
    try:
        train_denoiser(micro(max_steps=1), out, progress=False)
    except ValueError as e:
        assert "in use" not in str(e) and "is not empty" in str(e)


# -- item 4: no silent overwrite; pruning keys on the run's own steps ---------------------------------


def test_a_new_run_refuses_a_non_empty_folder_and_overwrite_moves_it_aside(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "checkpoints" / "step-00000999.safetensors").write_bytes(b"an earlier run's")
    with pytest.raises(ValueError, match="is not empty .*notes.txt.*--overwrite"):
        train_denoiser(micro(max_steps=2), str(out), progress=False)
    assert (out / "notes.txt").read_text() == "mine" and not (out / "config.json").exists()
    train_denoiser(
        micro(max_steps=2, checkpoint_every=1, keep_last=1, overwrite=True), str(out), progress=False
    )
    (old,) = [p for p in out.iterdir() if p.name.startswith(".old-")]
    assert (old / "notes.txt").read_text() == "mine"
    assert (old / "checkpoints" / "step-00000999.safetensors").is_file()
    assert sorted(os.listdir(out / "checkpoints")) == ["last.safetensors", "step-00000002.safetensors"]


def test_export_pruning_counts_only_the_runs_own_steps(tmp_path):
    for n in (1, 2, 3, 999):
        (tmp_path / f"step-{n:08d}.safetensors").write_bytes(b"")
    loop._prune_exports(str(tmp_path), 2, 3)
    assert sorted(os.listdir(tmp_path)) == [f"step-{n:08d}.safetensors" for n in (2, 3, 999)]


# -- item 7: a broken newest training state ----------------------------------------------------------


def _states(root: str, steps=(1, 2, 3)):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    for s in steps:
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        st.save_training_state(root, s, model, None, opt, keep_last=0, config={"s": s})
    return model, opt


@pytest.mark.parametrize("damage", ["truncated-optimizer", "missing-model", "bad-state-json"])
def test_a_broken_newest_state_falls_back_with_a_warning_or_refuses_when_strict(tmp_path, damage):
    root = str(tmp_path / "state")
    model, opt = _states(root)
    newest = os.path.join(root, "step-00000003")
    if damage == "truncated-optimizer":
        p = os.path.join(newest, "optimizer.safetensors")
        data = open(p, "rb").read()
        open(p, "wb").write(data[: len(data) // 2])
    elif damage == "missing-model":
        os.remove(os.path.join(newest, "model.safetensors"))
    else:
        open(os.path.join(newest, "state.json"), "w").write("{not json")
    with pytest.raises(st.CorruptState, match="step-00000003 is broken"):
        st.load_training_state(root, model, None, opt, fallback=False)
    with pytest.warns(UserWarning, match="step-00000003 is broken.*falling back to .*step-00000002"):
        info = st.load_training_state(root, model, None, opt, fallback=True)
    assert info["step"] == 2 and len(info["broken"]) == 1


def test_no_intact_state_is_one_error_not_a_traceback(tmp_path):
    root = str(tmp_path / "state")
    model, opt = _states(root, steps=(1,))
    os.remove(os.path.join(root, "step-00000001", "rng.safetensors"))
    with pytest.raises(st.CorruptState, match="no intact training state.*rng.safetensors is missing"):
        st.load_training_state(root, model, None, opt, fallback=True)


def test_resume_of_a_run_with_a_broken_newest_state(tmp_path, capsys):
    out = str(tmp_path / "run")
    train_denoiser(micro(max_steps=2, checkpoint_every=1, keep_last=0), out, progress=False)
    p = os.path.join(out, "state", "step-00000002", "optimizer.safetensors")
    open(p, "wb").write(open(p, "rb").read()[:100])
    capsys.readouterr()
    assert cli(["train", "denoiser", "--resume", out, "--strict", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "step-00000002 is broken: optimizer.safetensors is unreadable" in err and "--strict" in err
    assert cli(["train", "denoiser", "--resume", out, "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "warning: " in captured.err and "step-00000002 is broken" in captured.err
    assert "resumed from" in captured.out and "step-00000001 at step 1" in captured.out


# -- item 8: leftovers of a killed run; crash-safe pruning ---------------------------------------------


def test_leftovers_of_a_killed_run_are_removed_at_its_next_start(tmp_path):
    out = tmp_path / "run"
    root = out / "state"
    _states(str(root), steps=(1,))
    (out / "config.json").write_text("{}")
    (root / ".step-00000002.tmp-4242").mkdir()
    (root / ".step-00000002.tmp-4242" / "model.safetensors").write_bytes(b"half")
    (root / ".step-00000001.old-4242").mkdir()
    (root / ".step-00000000.trash-4242").mkdir()
    (root / ".last.tmp-4242").write_text("step-")
    (root / "step-00000000").mkdir()  # half-pruned: its state.json already deleted
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / ".last.safetensors.tmp-4242").write_bytes(b"half")
    (out / ".metrics.jsonl.tmp-4242").write_text("")
    with run_folder.claim(str(out), micro(), True, dist.World()):
        pass
    assert sorted(os.listdir(root)) == ["last", "step-00000001"]
    assert os.listdir(out / "checkpoints") == []
    assert sorted(os.listdir(out)) == [".lock", "checkpoints", "config.json", "state"]


def test_pruning_renames_to_a_trash_name_before_deleting(tmp_path, monkeypatch):
    seen = []
    real = st.shutil.rmtree

    def rmtree(path, *a, **k):
        seen.append(os.path.basename(path))
        return real(path, *a, **k)

    monkeypatch.setattr(st.shutil, "rmtree", rmtree)
    root = str(tmp_path / "state")
    model, opt = _states(root, steps=(1,))
    st.save_training_state(root, 2, model, None, opt, keep_last=1)
    assert any(n.startswith(".step-00000001.trash-") for n in seen), seen
    assert sorted(os.listdir(root)) == ["last", "step-00000002"]


# -- item 11: tiny images -------------------------------------------------------------------------------


def test_images_below_min_image_size_are_skipped_and_counted(tmp_path):
    from latentforge.training.data import ImageFolder

    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((64, 20, 3), np.uint8)).save(tmp_path / "b.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "c.png")
    cfg = DenoiserTrainConfig(data=str(tmp_path), resolution=32)
    assert cfg.min_image_size == 32
    folder = ImageFolder(tmp_path, 32, min_size=cfg.min_image_size)
    assert [os.path.basename(i.path) for i in folder.items] == ["c.png"]
    assert [(os.path.basename(p), why) for p, why in folder.skipped] == [
        ("a.png", "too small: 1x1, below min_image_size=32"),
        ("b.png", "too small: 20x64, below min_image_size=32"),
    ]


# -- the config checks itself ---------------------------------------------------------------------------


def test_the_config_checks_finite_numbers_and_resolution_when_built():
    with pytest.raises(ValueError, match="adam_eps=nan is not a finite number"):
        DenoiserTrainConfig(adam_eps=float("nan"))
    with pytest.raises(ValueError, match="objective.*not a finite number"):
        resolve("denoiser", "shapes-tiny", overrides={"objective.shift": "inf"})
    with pytest.raises(ValueError, match="kl_weight=inf"):
        VAETrainConfig(kl_weight=float("inf"))
    with pytest.raises(ValueError, match=r"resolution 1000 is out of range for the shapes data.*\[32, 512\]"):
        DenoiserTrainConfig(resolution=1000)
    with pytest.raises(
        ValueError, match=r"resolution 16 is out of range; expected an integer in \[32, 4096\]"
    ):
        VAETrainConfig(data="/some/folder", resolution=16)
    # a preset's resolution is checked with the data the flags give, not before
    assert resolve("denoiser", "sdxl-base", overrides={"data": "/some/folder"}).resolution == 1024
    from latentforge import cli_checks
    from latentforge.shapes.render import MAX_RES, MIN_RES
    from latentforge.training import config

    assert (config.SHAPES_RES_MIN, config.SHAPES_RES_MAX) == (MIN_RES, MAX_RES)
    assert (cli_checks.TRAIN_RES_MIN, cli_checks.TRAIN_RES_MAX) == (
        config.FOLDER_RES_MIN,
        config.FOLDER_RES_MAX,
    )


def test_list_fields_are_never_split_on_commas(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unet.channel_mult must be a list"):
        _coerce("unet.channel_mult", tuple[int, ...], 2)
    assert _coerce("sample_prompts", tuple[str, ...], "a red cube, on a blue floor") == (
        "a red cube, on a blue floor",
    )
    assert _coerce("sample_prompts", tuple[str, ...], '["a", "b, c"]') == ("a", "b, c")
    toml = tmp_path / "c.toml"
    toml.write_text('sample_prompts = "a red cube, on a blue floor"\n')
    with pytest.raises(ValueError, match="sample_prompts is a list field; give a TOML list"):
        resolve("denoiser", "shapes-tiny", toml=str(toml))
    toml.write_text('sample_prompts = ["a red cube, on a blue floor"]\n')
    assert resolve("denoiser", "shapes-tiny", toml=str(toml)).sample_prompts == (
        "a red cube, on a blue floor",
    )
    seen = {}
    from latentforge import cli as cli_mod

    monkeypatch.setattr(cli_mod, "_trainer", lambda what: lambda cfg, out, **kw: seen.update(cfg=cfg))
    argv = ["train", "denoiser", "--preset", "shapes-tiny", "--dry-run",
            "--sample-prompts", "a red cube, big", "--sample-prompts", "a blue ball"]  # fmt: skip
    assert cli(argv) == 0 and seen["cfg"].sample_prompts == ("a red cube, big", "a blue ball")
    assert cli(argv[:-2]) == 0 and seen["cfg"].sample_prompts == ("a red cube, big",)


def test_help_says_how_list_fields_take_values(capsys):
    with pytest.raises(SystemExit):
        cli(["train", "denoiser", "-h"])
    out = " ".join(capsys.readouterr().out.split())
    assert "repeated" in out and "JSON list" in out and "never split on commas" in out and "--strict" in out


def test_load_toml_names_the_file(tmp_path):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes("text = 'caf\xe9'\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.toml.* is not UTF-8 text .*0xe9"):
        load_toml(str(bad))
    with pytest.raises(IsADirectoryError, match=f"{tmp_path}.* is a directory"):
        load_toml(str(tmp_path))


# -- seeds and the shapes-tiny text tower ----------------------------------------------------------------


def test_vae_and_discriminator_init_from_the_seed_not_the_global_rng():
    from latentforge.training.vae_trainer import VAETask

    cfg = resolve("vae", "shapes-vae", overrides={"disc_weight": "0.5", "eval_n": "0", "num_workers": "0"})
    torch.manual_seed(1)
    a = VAETask(cfg, dist.World()).model.state_dict()
    torch.manual_seed(2)
    b = VAETask(cfg, dist.World()).model.state_dict()
    assert any(k.startswith("disc.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    cfg.seed = 1
    c = VAETask(cfg, dist.World()).model.state_dict()
    assert not torch.equal(a["disc.main.0.weight"], c["disc.main.0.weight"])


def test_shapes_tiny_text_tower_holds_the_longest_caption():
    from latentforge.training.presets import SHAPES_TINY

    assert SHAPES_TINY["text"].max_position_embeddings == 48  # shapes captions: up to 39 tokens + BOS/EOS


def test_run_kind_of_saved_configs():
    from latentforge.training.config import run_kind, to_dict

    assert run_kind(to_dict(DenoiserTrainConfig())) == "denoiser"
    assert run_kind(to_dict(VAETrainConfig())) == "vae"
    assert run_kind(json.loads("[]")) is None
