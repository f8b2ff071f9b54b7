"""scripts/make_companions.sh builds the files that ship beside a default model (tuned schedules, the tiny
decoder, the few-step student, the evaluator's tables) as MODEL_CARD.md says. The real run takes over an
hour, so here every `$PY` call is recorded instead of run: what is checked is the script's plumbing, the
order (the pairs need the tuned 8-step schedule, the student its pairs), deterministic teacher sampling,
resumption markers and the refusal of a missing model."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "make_companions.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run(tmp_path: Path, model: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    log = tmp_path / "calls.txt"
    stub = tmp_path / "py.sh"
    stub.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\n')
    stub.chmod(0o755)
    env = {**os.environ, "PY": str(stub)}
    env.pop("INSTALL", None)
    done = subprocess.run(["bash", str(SCRIPT), str(model), str(tmp_path / "runs")], env=env,
                          capture_output=True, text=True)  # fmt: skip
    return done, log.read_text().splitlines() if log.exists() else []


def test_stages_in_order_beside_a_copy_of_the_model(tmp_path):
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"weights")
    done, calls = run(tmp_path, model)
    assert done.returncode == 0, done.stderr
    r = tmp_path / "runs"
    m = f"{r}/ship/shapes64.safetensors"
    assert (r / "ship" / "shapes64.safetensors").read_bytes() == b"weights"
    first = [os.path.basename(c.split()[2] if c.startswith("-m") else c.split()[0]) for c in calls]
    assert first == [
        "default_model.py", "tune-schedule", "tune-schedule", "train_tiny_decoder.py", "reflow-pairs",
        "train", "ship_fast_model.py",
    ]  # fmt: skip
    assert f"--json {r}/ship/shapes64.json" in calls.pop(0)
    assert all(f"--model {m}" in c for c in calls[:4]) and f"--init_from {m}" in calls[4]
    assert "--steps 8 --sampler euler --cfg 3" in calls[0] and "--steps 4" in calls[1]
    # the pairs: a deterministic sampler on the tuned schedule; the student trains on them, text tower frozen
    assert "--sampler euler --scheduler tuned --cfg 3" in calls[3] and f"--out {r}/pairs" in calls[3]
    assert f"--data {r}/pairs" in calls[4] and "--train_text_encoder false" in calls[4]
    assert "--caption_dropout 0" in calls[4] and "--unet.mask_text_padding true" in calls[4]
    assert f"--model {m}" in calls[5] and calls[5].endswith(f"--out {r}/ship/shapes64-fast.safetensors")
    assert len(list(r.glob("*.done"))) == 8
    # a second run skips every finished stage; a cut-off student resumes from its saved state
    (r / "student.done").unlink()
    (r / "student" / "state").mkdir(parents=True)
    (r / "student" / "state" / "last").write_text("")
    _, again = run(tmp_path, model)
    assert again[len(calls) + 1 :] == [calls[4].replace(f"--out {r}/student", f"--resume {r}/student")]


def test_a_missing_model_is_refused(tmp_path):
    done, calls = run(tmp_path, tmp_path / "nope.safetensors")
    assert done.returncode == 2 and "MODEL must be a model file" in done.stderr and not calls
