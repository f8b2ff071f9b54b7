"""scripts/train_default_2h.sh composes its stages as MODEL_CARD.md says (the real run takes 2 hours, so
here every `$PY` call is recorded instead of run: what is checked is the script's own plumbing, the
switches, stage folders, resumption markers and refusals)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train_default_2h.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    log = tmp_path / "calls.txt"
    stub = tmp_path / "py.sh"
    stub.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\n')
    stub.chmod(0o755)
    full = {**os.environ, "PY": str(stub), **env}
    cmd = ["bash", str(SCRIPT), str(tmp_path / "runs")]
    done = subprocess.run(cmd, env=full, capture_output=True, text=True)
    calls = log.read_text().splitlines() if log.exists() else []
    return done, calls


def test_defaults_are_the_shipped_recipe(tmp_path):
    # no switches: ε with Min-SNR-5 in stage B and the 5000-step decoder stage (MODEL_CARD.md, "Recipe")
    done, calls = run(tmp_path)
    assert done.returncode == 0, done.stderr
    (tmp_path / "explicit").mkdir()
    _, explicit = run(tmp_path / "explicit", OBJ="eps-minsnr", VAEDEC_STEPS="5000")
    r, e = str(tmp_path / "runs"), str(tmp_path / "explicit" / "runs")
    assert [c.replace(r, e) for c in calls] == explicit
    assert calls[-1].endswith(f"--out {r}/shapes64-2h-eps-minsnr-dec5000.safetensors")


def test_flow_and_the_3000_step_decoder(tmp_path):
    done, calls = run(tmp_path, OBJ="flow", VAEDEC_STEPS="3000")
    assert done.returncode == 0, done.stderr
    r = tmp_path / "runs"
    assert sorted(p.name for p in r.glob("*.done")) == [
        "data.done", "ship.done", "unetA.done", "unetB.done", "vae.done", "vaedec.done"
    ]  # fmt: skip
    assert len(calls) == 6
    assert not any("--objective.prediction" in c for c in calls)  # flow: the preset's own objective
    assert "--max_steps 3000" in calls[4] and "--train_part decoder" in calls[4]
    assert f"{r}/unetB/checkpoints/last.safetensors" in calls[5]
    assert f"--vae {r}/vaedec/checkpoints/last.safetensors" in calls[5]
    assert calls[5].endswith(f"--out {r}/shapes64-2h.safetensors")
    # a second run skips every finished stage
    _, again = run(tmp_path, OBJ="flow", VAEDEC_STEPS="3000")
    assert again == calls


def test_eps_and_a_longer_decoder_stage(tmp_path):
    done, calls = run(tmp_path, OBJ="eps", VAEDEC_STEPS="5000")
    assert done.returncode == 0, done.stderr
    r = tmp_path / "runs"
    eps = "--objective.prediction eps --objective.sigma_sampling uniform_discrete"
    stage_a, stage_b = calls[2], calls[3]
    assert eps in stage_a and "--objective.terminal_fraction 0.99" in stage_a
    assert eps in stage_b and f"--init_from {r}/unet-epsA/checkpoints/last.safetensors" in stage_b
    assert f"--out {r}/vaedec5000" in calls[4] and "--max_steps 5000" in calls[4]
    assert f"{r}/unet-epsB/checkpoints/last.safetensors" in calls[5]
    assert f"--vae {r}/vaedec5000/checkpoints/last.safetensors" in calls[5]
    assert calls[5].endswith(f"--out {r}/shapes64-2h-eps-dec5000.safetensors")
    assert (r / "ship-eps-dec5000.done").exists() and (r / "vaedec5000.done").exists()


def test_eps_minsnr_weights_stage_b_only_and_shares_eps_stage_a(tmp_path):
    done, calls = run(tmp_path, OBJ="eps-minsnr", VAEDEC_STEPS="5000")
    assert done.returncode == 0, done.stderr
    r = tmp_path / "runs"
    minsnr = "--objective.weighting min_snr --objective.min_snr_gamma 5"
    stage_a, stage_b = calls[2], calls[3]
    assert minsnr not in stage_a and f"--out {r}/unet-epsA" in stage_a  # ε's stage A, refused with Min-SNR
    assert minsnr in stage_b and "--objective.prediction eps" in stage_b
    assert f"--init_from {r}/unet-epsA/checkpoints/last.safetensors" in stage_b
    assert f"--out {r}/unet-eps-minsnrB" in stage_b
    assert f"{r}/unet-eps-minsnrB/checkpoints/last.safetensors" in calls[5]
    assert calls[5].endswith(f"--out {r}/shapes64-2h-eps-minsnr-dec5000.safetensors")
    assert sorted(p.name for p in r.glob("*.done")) == [
        "data.done", "ship-eps-minsnr-dec5000.done", "unet-eps-minsnrB.done", "unet-epsA.done", "vae.done",
        "vaedec5000.done",
    ]  # fmt: skip
    # an ε run's finished stage A in the same folder is reused, not trained again
    (r / "unet-eps-minsnrB.done").unlink()
    _, again = run(tmp_path, OBJ="eps-minsnr", VAEDEC_STEPS="5000")
    assert len(again) == len(calls) + 1 and minsnr in again[-1]


def test_a_detail_weighted_decoder_stage_and_a_shorter_stage_b_get_their_own_folders(tmp_path):
    done, calls = run(tmp_path, VAEDEC_STEPS="12000", VAEDEC_DETAIL="5", B_STEPS="6000")
    assert done.returncode == 0, done.stderr
    r = tmp_path / "runs"
    stage_b, dec, ship = calls[3], calls[4], calls[5]
    assert "--max_steps 6000" in stage_b and f"--out {r}/unet-eps-minsnrB6000" in stage_b
    assert f"--init_from {r}/unet-epsA/checkpoints/last.safetensors" in stage_b  # ε's stage A, shared
    assert "--detail_weight 5" in dec and "--max_steps 12000" in dec
    assert f"--out {r}/vaedec12000-detail5" in dec
    assert f"{r}/unet-eps-minsnrB6000/checkpoints/last.safetensors" in ship
    assert f"--vae {r}/vaedec12000-detail5/checkpoints/last.safetensors" in ship
    assert ship.endswith(f"--out {r}/shapes64-2h-eps-minsnr-b6000-dec12000-detail5.safetensors")
    # the shipped recipe's commands carry no detail weight and stage B's 9000 steps
    (tmp_path / "plain").mkdir()
    _, plain = run(tmp_path / "plain")
    assert not any("--detail_weight" in c for c in plain) and "--max_steps 9000" in plain[3]


def test_small_object_weight_gets_its_own_stage_b_and_file(tmp_path):
    done, calls = run(tmp_path, SMALLW="4")
    assert done.returncode == 0, done.stderr
    r = tmp_path / "runs"
    stage_a, stage_b, ship = calls[2], calls[3], calls[5]
    assert "--small_object_weight" not in stage_a
    assert "--small_object_weight 4" in stage_b and "--objective.weighting min_snr" in stage_b
    assert f"--out {r}/unet-eps-minsnrB-small4" in stage_b
    assert f"--init_from {r}/unet-epsA/checkpoints/last.safetensors" in stage_b  # stage A shared
    assert f"{r}/unet-eps-minsnrB-small4/checkpoints/last.safetensors" in ship
    assert ship.endswith(f"--out {r}/shapes64-2h-eps-minsnr-small4-dec5000.safetensors")
    (tmp_path / "plain").mkdir()
    _, plain = run(tmp_path / "plain", SMALLW="0")
    assert not any("--small_object_weight" in c for c in plain)


@pytest.mark.parametrize(("p", "flag"), [("75", "0.75"), ("5", "0.05"), ("100", "1.00")])
def test_focused_decoder_windows_get_their_own_folder(tmp_path, p, flag):
    done, calls = run(tmp_path, VAEDEC_FOCUS=p)
    assert done.returncode == 0, done.stderr
    r = tmp_path / "runs"
    dec, ship = calls[4], calls[5]
    assert f"--crop_focus {flag} " in dec and "--detail_weight" not in dec and "--crop 32" in dec
    assert dec.endswith(f"--out {r}/vaedec5000-focus{p}")
    assert f"--vae {r}/vaedec5000-focus{p}/checkpoints/last.safetensors" in ship
    assert ship.endswith(f"--out {r}/shapes64-2h-eps-minsnr-dec5000-focus{p}.safetensors")
    assert not any("--crop_focus" in c for c in calls[:4])  # the VAE's first stage keeps uniform windows
    (tmp_path / "both").mkdir()
    _, both = run(tmp_path / "both", VAEDEC_FOCUS=p, VAEDEC_DETAIL="5")
    assert f"--detail_weight 5 --crop_focus {flag} " in both[4] and both[4].endswith(f"-detail5-focus{p}")


def test_a_whole_scene_decoder_stage_gets_its_own_folder(tmp_path):
    done, calls = run(tmp_path, VAEDEC_WHOLE="1")
    assert done.returncode == 0, done.stderr
    r = tmp_path / "runs"
    dec, ship = calls[4], calls[5]
    assert "--crop 0 --batch_size 8 " in dec and "--crop 32" not in dec and "--crop_focus" not in dec
    assert dec.endswith(f"--out {r}/vaedec5000-whole")
    assert ship.endswith(f"--out {r}/shapes64-2h-eps-minsnr-dec5000-whole.safetensors")
    assert "--crop 32 --batch_size 32 " in calls[0]  # the VAE's first stage keeps its windows
    (tmp_path / "plain").mkdir()
    _, plain = run(tmp_path / "plain")
    assert "--crop 32 --batch_size 32 " in plain[4]  # the shipped recipe's decoder stage


def test_a_whole_scene_first_vae_stage_runs_every_later_stage_in_its_own_folders(tmp_path):
    done, calls = run(tmp_path, VAE1_WHOLE="1", VAEDEC_WHOLE="1")
    assert done.returncode == 0, done.stderr
    r = tmp_path / "runs"
    vae, data, stage_a, stage_b, dec, ship = calls
    assert "--crop 0 --batch_size 8 " in vae and "--crop 32" not in vae and f"--out {r}/vae-vw" in vae
    assert "--preset shapes64-vae " in vae and "--max_steps 3000" in vae  # the same preset, steps and seed
    assert f"{r}/data" in data  # the same scenes
    for stage in (stage_a, stage_b):
        assert f"--vae {r}/vae-vw/checkpoints/last.safetensors" in stage
        assert f"--cache_dir {r}/cache-vw" in stage
        assert "--preset shapes64 " in stage
    assert f"--out {r}/unet-vw-epsA" in stage_a and f"--out {r}/unet-vw-eps-minsnrB" in stage_b
    assert f"--init_from {r}/vae-vw/checkpoints/last.safetensors" in dec and "--crop 0 --batch_size 8 " in dec
    assert dec.endswith(f"--out {r}/vaedec5000-whole-vw")
    assert ship.endswith(f"--out {r}/shapes64-2h-vw-eps-minsnr-dec5000-whole.safetensors")
    # the shipped recipe's first VAE stage keeps its windows, in the folders it always had
    (tmp_path / "plain").mkdir()
    _, plain = run(tmp_path / "plain")
    assert "--crop 32 --batch_size 32 " in plain[0] and plain[0].endswith(f"--out {tmp_path}/plain/runs/vae")


@pytest.mark.parametrize("v", ["f8", "c8"])
def test_vae_f8_and_c8_run_every_stage_on_their_own_vae_cache_and_folders(tmp_path, v):
    done, calls = run(tmp_path, VAE=v)
    assert done.returncode == 0, done.stderr
    r = tmp_path / "runs"
    vae, data, stage_a, stage_b, dec, ship = calls
    assert f"--preset shapes64-vae-{v}" in vae and f"--out {r}/vae-{v}" in vae
    assert "--n 60000" in data and f"{r}/data" in data  # the same scenes as f = 4's
    for stage in (stage_a, stage_b):
        assert f"--preset shapes64-{v}" in stage and "--preset shapes64 " not in stage
        assert f"--vae {r}/vae-{v}/checkpoints/last.safetensors" in stage
        assert f"--cache_dir {r}/cache-{v}" in stage
    assert f"--out {r}/unet-{v}-epsA" in stage_a
    assert f"--init_from {r}/unet-{v}-epsA/checkpoints/last.safetensors" in stage_b
    assert "--objective.weighting min_snr" in stage_b and f"--out {r}/unet-{v}-eps-minsnrB" in stage_b
    assert f"--preset shapes64-vae-{v}" in dec
    assert f"--init_from {r}/vae-{v}/checkpoints/last.safetensors" in dec
    assert f"--out {r}/vaedec5000-{v}" in dec
    assert f"{r}/unet-{v}-eps-minsnrB/checkpoints/last.safetensors" in ship
    assert f"--vae {r}/vaedec5000-{v}/checkpoints/last.safetensors" in ship
    assert ship.endswith(f"--out {r}/shapes64-2h-{v}-eps-minsnr-dec5000.safetensors")
    # the f = 4 recipe in the same folder shares only the scenes
    _, log = run(tmp_path)
    f4 = log[len(calls) :]  # the same call log, appended to
    assert len(f4) == 5 and not any("--n 60000" in c for c in f4)
    assert not set(f4) & set(calls)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"OBJ": "v"}, "OBJ must be flow, eps or eps-minsnr, got 'v'"),
        ({"VAEDEC_STEPS": "5k"}, "VAEDEC_STEPS must be a positive whole number, got '5k'"),
        ({"VAEDEC_STEPS": "0"}, "VAEDEC_STEPS must be a positive whole number, got '0'"),
        ({"VAEDEC_DETAIL": "0.5"}, "VAEDEC_DETAIL must be a whole number >= 0, got '0.5'"),
        ({"VAEDEC_FOCUS": "0.75"}, "VAEDEC_FOCUS must be a whole percentage 0..100, got '0.75'"),
        ({"VAEDEC_FOCUS": "101"}, "VAEDEC_FOCUS must be a whole percentage 0..100, got '101'"),
        ({"VAEDEC_FOCUS": "075"}, "VAEDEC_FOCUS must be a whole percentage 0..100, got '075'"),
        ({"VAEDEC_WHOLE": "yes"}, "VAEDEC_WHOLE must be 0 or 1, got 'yes'"),
        ({"VAE1_WHOLE": "2"}, "VAE1_WHOLE must be 0 or 1, got '2'"),
        ({"VAEDEC_WHOLE": "1", "VAEDEC_FOCUS": "75"}, "VAEDEC_WHOLE=1 has none (whole scenes)"),
        ({"SMALLW": "0.5"}, "SMALLW must be a whole number >= 0, got '0.5'"),
        ({"SMALLW": "04"}, "SMALLW must be a whole number >= 0, got '04'"),
        ({"B_STEPS": "0"}, "B_STEPS must be a positive whole number, got '0'"),
        ({"B_STEPS": "-6000"}, "B_STEPS must be a positive whole number, got '-6000'"),
        ({"NET": "mmdit"}, "NET must be unet or dit, got 'mmdit'"),
        ({"VAE": "f16"}, "VAE must be f4, f8 or c8, got 'f16'"),
        ({"VAE": "f8", "NET": "dit"}, "VAE=f8 has a UNet preset only (shapes64-f8); got NET=dit"),
        ({"VAE": "c8", "NET": "dit"}, "VAE=c8 has a UNet preset only (shapes64-c8); got NET=dit"),
    ],
)
def test_bad_switches_are_refused_before_anything_runs(tmp_path, env, message):
    done, calls = run(tmp_path, **env)
    assert done.returncode == 2
    assert message in done.stderr
    assert calls == [] and not (tmp_path / "runs").exists()
