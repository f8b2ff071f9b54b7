"""The denoiser and VAE trainers end to end on tiny models: outputs, exact resume (also after SIGKILL),
two DDP ranks == one process with twice the batch, NaN stop, config refusal, fine-tuning real layouts."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from latentforge.checkpoints import read_state_dict
from latentforge.cli import main as cli
from latentforge.pipeline import Pipeline
from latentforge.shapes.captions import parse
from latentforge.training.config import resolve
from latentforge.training.loop import TrainingError
from latentforge.training.metrics import read_metrics
from latentforge.training.trainer import train_denoiser
from latentforge.training.vae_trainer import train_vae

# A micro version of shapes-tiny: every code path of the real preset, seconds per run.
MICRO = {
    "unet.model_channels": 32,
    "unet.channel_mult": "[1, 2]",
    "unet.attention_resolutions": "[2]",
    "unet.context_dim": 32,
    "text.hidden_size": 32,
    "text.intermediate_size": 64,
    "text.num_hidden_layers": 1,
    "text.max_position_embeddings": 16,
    "text.vocab_size": 49408,
    "resolution": 32,
    "batch_size": 4,
    "num_workers": 0,
    "log_every": 1,
    "sample_steps": 2,
    "eval_n": 4,
    "warmup_steps": 0,
}


def micro(**over):
    return resolve("denoiser", "shapes-tiny", overrides={**MICRO, **over})


def _flags(d: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in d.items()]


def _state(folder: str) -> dict[str, torch.Tensor]:
    from latentforge.training.state import resolve_step_dir

    step = resolve_step_dir(os.path.join(folder, "state"))
    out = {}
    for name in ("model", "ema", "optimizer"):
        out.update(
            {f"{name}/{k}": v for k, v in read_state_dict(os.path.join(step, f"{name}.safetensors")).items()}
        )
    return out


def test_train_writes_outputs_and_generate_loads_them(tmp_path, capsys):
    out = str(tmp_path / "run")
    summary = train_denoiser(micro(max_steps=3, checkpoint_every=2), out, progress=False)
    assert summary["step"] == 3
    recs = read_metrics(os.path.join(out, "metrics.jsonl"))
    losses = [r for r in recs if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and 0 <= r["data_wait"] <= 1 for r in losses)
    evals = [r for r in recs if "eval_all_correct" in r]
    assert len(evals) == 1 and evals[0]["eval_n"] == 4 and 0 <= evals[0]["eval_all_correct"] <= 1
    assert set(evals[0]["eval_chance_attributes"]) == set(evals[0]["eval_attributes"])  # the chance level
    for f in ("config.json", "loss.png", "samples/step-00000003.png", "checkpoints/last.safetensors"):
        assert os.path.isfile(os.path.join(out, f)), f
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == [
        "last.safetensors",
        "step-00000002.safetensors",
        "step-00000003.safetensors",
    ]
    # the single file: SD1 layout, EMA weights, loadable with its objective (flow) and pixel space
    sd = read_state_dict(os.path.join(out, "checkpoints", "last.safetensors"))
    assert {k.split(".")[0] for k in sd} == {"model", "cond_stage_model"}
    ema = read_state_dict(os.path.join(out, "state", "step-00000003", "ema.safetensors"))
    torch.testing.assert_close(
        sd["model.diffusion_model.out.2.weight"], ema["parts.unet.out.2.weight"], rtol=0, atol=0
    )
    pipe = Pipeline.from_single_file(os.path.join(out, "checkpoints", "last.safetensors"))
    assert pipe.pixel_space and pipe.default_size == (32, 32)
    assert type(pipe.model_sampling).__name__ == "DiscreteFlow"
    (img,) = pipe("a red circle", steps=2, cfg=2.0, progress=False)
    assert img.size == (32, 32)
    capsys.readouterr()
    gen = str(tmp_path / "gen")
    rc = cli(
        [
            "generate",
            "a red circle",
            "--model",
            os.path.join(out, "checkpoints", "last.safetensors"),
            "--steps",
            "2",
            "--out",
            gen,
            "--quiet",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 1 and printed[0].endswith(".png") and os.path.isfile(printed[0])


def test_resume_is_exact(tmp_path):
    cfg = micro(max_steps=4, checkpoint_every=2, eval_n=0, grad_accum=2, lr_schedule="cosine", warmup_steps=1)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train_denoiser(cfg, a, progress=False)
    train_denoiser(cfg, b, progress=False, stop_after=2)
    with pytest.raises(ValueError, match="already holds a run"):
        train_denoiser(cfg, b, progress=False)
    train_denoiser(cfg, b, resume=True, progress=False)
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    la = [r["loss"] for r in read_metrics(os.path.join(a, "metrics.jsonl")) if "loss" in r]
    lb = [r["loss"] for r in read_metrics(os.path.join(b, "metrics.jsonl")) if "loss" in r]
    assert la == lb and len(la) == 4


def test_resume_refuses_another_model_config(tmp_path):
    out = str(tmp_path / "run")
    train_denoiser(micro(max_steps=1, eval_n=0), out, progress=False)
    with pytest.raises(ValueError, match=r"unet\.model_channels: checkpoint 32, expected 64") as e:
        train_denoiser(
            micro(max_steps=2, eval_n=0, **{"unet.model_channels": 64}), out, resume=True, progress=False
        )
    assert "different model config" in str(e.value)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # lr 1e30 turns the weights into inf after the first update: the second step's loss is not finite
    out = str(tmp_path / "run")
    with pytest.raises(
        TrainingError, match=r"at step 2; stopping\. The last good checkpoint: .*last\.safetensors"
    ):
        train_denoiser(
            micro(max_steps=5, checkpoint_every=1, eval_n=0, lr=1e30, grad_clip=0.0), out, progress=False
        )
    sd = read_state_dict(os.path.join(out, "checkpoints", "last.safetensors"))
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())
    assert read_metrics(os.path.join(out, "metrics.jsonl"))[-1]["error"].startswith("non-finite loss")


def _run_cli(args: list[str], env_extra: dict | None = None, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "latentforge", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    flags = [
        "train",
        "denoiser",
        "--preset",
        "shapes-tiny",
        "--quiet",
        *_flags({**MICRO, "eval_n": 0}),
        "--max-steps",
        "8",
        "--checkpoint-every",
        "2",
    ]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    p = _run_cli([*flags, "--out", b])
    deadline = time.time() + 240
    while time.time() < deadline and not os.path.isdir(os.path.join(b, "state", "step-00000004")):
        if p.poll() is not None:
            pytest.fail(f"the run ended before it could be killed: {p.stdout.read()}")
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)  # no handler runs: whatever was half-written stays half-written
    p.wait()
    assert p.returncode == -signal.SIGKILL
    r = _run_cli(["train", "denoiser", "--resume", b, "--quiet"])
    assert r.wait(300) == 0, r.stdout.read()
    q = _run_cli([*flags, "--out", a])
    assert q.wait(300) == 0, q.stdout.read()
    sa, sb = _state(a), _state(b)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    fa = read_state_dict(os.path.join(a, "checkpoints", "last.safetensors"))
    fb = read_state_dict(os.path.join(b, "checkpoints", "last.safetensors"))
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


def test_two_ddp_ranks_match_one_process_with_twice_the_batch(tmp_path):
    """torchrun, 2 CPU ranks (gloo) with batch 2 each vs one process with batch 4: the same global batches,
    noise and dropout (trainer.py, "Determinism"), so the same loss curve and weights up to float32
    summation order (the per-rank means are averaged instead of one mean over 4: relative 1e-6 per step)."""
    over = {**MICRO, "eval_n": 0, "max_steps": 4, "checkpoint_every": 4}
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    train_denoiser(micro(eval_n=0, max_steps=4, checkpoint_every=4), one, progress=False)
    over["batch_size"] = 2
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "latentforge",
        "train",
        "denoiser",
        "--preset",
        "shapes-tiny",
        "--quiet",
        "--out",
        two,
        *_flags(over),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "effective batch 4 = 2 per rank × 2 ranks × 1 accumulation" in r.stdout
    l1 = [x["loss"] for x in read_metrics(os.path.join(one, "metrics.jsonl")) if "loss" in x]
    l2 = [x["loss"] for x in read_metrics(os.path.join(two, "metrics.jsonl")) if "loss" in x]
    assert len(l1) == len(l2) == 4
    np.testing.assert_allclose(l2, l1, rtol=1e-4)
    # Weights: Adam divides each gradient element by its own RMS, so an element whose gradient is tiny and
    # dominated by rounding (here: the biases just before the zero-initialised output conv, whose gradients
    # cancel almost exactly) can take a visibly different step of up to ~lr per step, while everything else
    # agrees to float32 rounding. A wrong sample, noise or dropout assignment would instead move most
    # elements by ~lr. Measured: 99.85% of elements within 1e-6; max 3.2e-4 (bound 2·lr·steps = 8e-3).
    s1, s2 = _state(one), _state(two)
    diff = torch.cat([(s2[k] - s1[k]).abs().flatten() for k in s1 if k.startswith("model/")])
    assert (diff < 1e-6).float().mean() > 0.995, (diff < 1e-6).float().mean()
    assert diff.max() < 2 * 1e-3 * 4, diff.max()


def test_folder_data_skips_unreadable_images_and_counts_missing_captions(tmp_path, capsys):
    from latentforge.shapes import export

    data = export(tmp_path / "data", n=6, size=32, seed=3)
    (data / "metadata.jsonl").unlink()
    (data / "000001.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (data / "000002.txt").unlink()
    out = str(tmp_path / "run")
    train_denoiser(micro(data=str(data), max_steps=2, eval_n=0), out, progress=False)
    text = capsys.readouterr().out
    assert "5 images, 1 skipped (unreadable or too small), 1 without a caption" in text
    assert len([r for r in read_metrics(os.path.join(out, "metrics.jsonl")) if "loss" in r]) == 2


def test_dry_run_prints_parameters_flops_and_time(capsys):
    rc = cli(["train", "denoiser", "--preset", "shapes-tiny", "--dry-run", *_flags(MICRO)])
    assert rc == 0
    text = capsys.readouterr().out
    assert '"model_channels": 32' in text and "unet" in text and "clip_l" in text
    assert "GFLOP" in text and "estimated time per step" in text


def test_cli_flags_and_toml(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(
        'lr = 3e-4\nmax_steps = 7\n[objective]\nprediction = "flow"\nshift = 2.0\n'
        "[unet]\nmodel_channels = 64\n"
    )
    cfg = resolve("denoiser", "shapes-tiny", str(toml), {"max_steps": "9", "unet.num_res_blocks": "2"})
    assert (cfg.lr, cfg.max_steps, cfg.objective.shift) == (3e-4, 9, 2.0)
    assert (cfg.unet.model_channels, cfg.unet.num_res_blocks, cfg.unet.channel_mult) == (64, 2, (1, 2, 2))
    with pytest.raises(ValueError, match="unknown option 'lerning_rate'"):
        resolve("denoiser", "shapes-tiny", overrides={"lerning_rate": "1"})
    with pytest.raises(ValueError, match="max_steps must be an integer, got '1.5'"):
        resolve("denoiser", "shapes-tiny", overrides={"max_steps": "1.5"})
    with pytest.raises(ValueError, match="prediction='velocity' is not supported"):
        resolve("denoiser", "shapes-tiny", overrides={"objective.prediction": "velocity"})
    with pytest.raises(ValueError, match="unknown denoiser preset 'shapes-huge'"):
        resolve("denoiser", "shapes-huge")
    assert (
        cli(["train", "denoiser", "--preset", "shapes-tiny", "--out", str(tmp_path / "x"), "--lr", "-1"]) == 2
    )


@pytest.mark.parametrize("family", ["sd15", "sdxl-base", "sd3-medium"])
def test_fine_tune_a_checkpoint_saves_the_original_layout(tmp_path, family):
    sys.path.insert(0, os.path.dirname(__file__))
    from test_pipeline import SIZE, TINY  # tiny configs of every family

    from latentforge.checkpoints import save_checkpoint

    torch.manual_seed(0)
    pipe = Pipeline.from_preset(family, configs=TINY[family])
    src = str(tmp_path / "base.safetensors")
    save_checkpoint(
        src, family, pipe.components, configs=TINY[family]
    )  # the original layout (+ tiny configs)
    w, h = SIZE[family]
    net = "mmdit" if family.startswith("sd3") else "unet"
    out = str(tmp_path / "ft")
    preset_obj = {"sd3-medium": "sd3-medium"}.get(family, family)
    cfg = resolve(
        "denoiser",
        preset_obj,
        overrides={
            "init_from": src,
            "resolution": str(max(w, h)),
            "max_steps": "2",
            "eval_n": "0",
            "num_workers": "0",
            "sample_steps": "1",
            "data": "shapes",
            "batch_size": "2",
        },
    )
    train_denoiser(cfg, out, progress=False)
    before = read_state_dict(src)
    after = read_state_dict(os.path.join(out, "checkpoints", "last.safetensors"))
    assert after.keys() == before.keys()
    assert all(after[k].shape == before[k].shape for k in before)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    prefix = "model.diffusion_model."
    assert changed and all(k.startswith(prefix) for k in changed)  # only the denoiser trains
    loaded = Pipeline.from_single_file(os.path.join(out, "checkpoints", "last.safetensors"))
    assert loaded.family == family and net in loaded.components


def test_vae_training_then_latent_denoiser_on_it(tmp_path):
    vout = str(tmp_path / "vae")
    vcfg = resolve(
        "vae",
        "shapes-vae",
        overrides={
            "max_steps": "3",
            "batch_size": "2",
            "resolution": "32",
            "eval_n": "4",
            "num_workers": "0",
            "disc_start": "2",
            "vae.ch_mult": "[1, 2]",
        },
    )
    train_vae(vcfg, vout, progress=False)
    recs = read_metrics(os.path.join(vout, "metrics.jsonl"))
    assert any("d_loss" in r and r["d_loss"] > 0 for r in recs)  # the GAN switched on at step 2
    ev = [r for r in recs if "psnr" in r][-1]
    assert np.isfinite(ev["psnr"]) and -1 <= ev["ssim"] <= 1
    path = os.path.join(vout, "checkpoints", "last.safetensors")
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        fmt = json.loads(f.metadata()["latentforge.latent_format"])
        keys = set(f.keys())
    assert fmt["scale"] > 0 and "encoder.conv_in.weight" in keys and "decoder.conv_out.weight" in keys
    dout = str(tmp_path / "den")
    over = {
        **MICRO,
        "pixel_space": "false",
        "vae": path,
        "unet.in_channels": 4,
        "unet.out_channels": 4,
        "unet.attention_resolutions": "[]",
        "max_steps": 2,
        "eval_n": 2,
        "resolution": 32,
    }
    train_denoiser(resolve("denoiser", "shapes-tiny", overrides=over), dout, progress=False)
    pipe = Pipeline.from_single_file(os.path.join(dout, "checkpoints", "last.safetensors"))
    assert not pipe.pixel_space and abs(pipe.latent_format.scale_factor - fmt["scale"]) < 1e-12
    (img,) = pipe("a blue star", steps=2, cfg=1.0, progress=False, width=32, height=32)
    assert img.size == (32, 32)
    # the same VAE given as a separate file: its own config and scale travel with it
    pipe2 = Pipeline.from_single_file(os.path.join(dout, "checkpoints", "last.safetensors"), vae=path)
    assert abs(pipe2.latent_format.scale_factor - fmt["scale"]) < 1e-12
    assert pipe2.vae.config == pipe.vae.config


@pytest.mark.slow
def test_shapes_tiny_learns(tmp_path):
    """The README's smallest run, then `--resume` to 800 steps: the loss falls within the 200 steps, and at
    800 the evaluator scores the images better against their own prompts than against other images' prompts
    (chance: the same images scored against a cyclic shift of the prompts, as the trainer logs it). 256
    held-out prompts: ~600 prompted objects, so the standard error of a difference of two attribute rates is
    <= sqrt(2 * 0.25 / 600) ~= 0.03, and of the mean over five attributes less; the mean must beat chance by
    0.05. Measured on 2 cores: mean margin 0.04 at 200 steps, 0.065 at 600, 0.12 at 800 (colour 0.40
    against 0.16), about 10 minutes in all; 0.10 in a second run on one thread (20 minutes)."""
    out = str(tmp_path / "run")
    argv = ["train", "denoiser", "--data", "shapes", "--preset", "shapes-tiny", "--max-steps", "200"]
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # as the command runs outside the tests (conftest sets 1)
    try:
        assert cli([*argv, "--out", out, "--quiet", "--eval_n", "256"]) == 0
    finally:
        torch.set_num_threads(threads)
    recs = read_metrics(os.path.join(out, "metrics.jsonl"))
    losses = [r["loss"] for r in recs if "loss" in r]
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        assert cli(["train", "denoiser", "--resume", out, "--max-steps", "800", "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    ev = [r for r in read_metrics(os.path.join(out, "metrics.jsonl")) if "eval_attributes" in r][-1]
    assert ev["step"] == 800 and ev["eval_n"] == 256
    attrs = ("present", "shape", "color", "size", "position")
    margin = np.mean([ev["eval_attributes"][a] - ev["eval_chance_attributes"][a] for a in attrs])
    assert margin > 0.05, (ev["eval_attributes"], ev["eval_chance_attributes"])


def _tiny_vae_file(path: str) -> str:
    from latentforge.models import AutoencoderKL, AutoencoderKLConfig
    from latentforge.models.vae import LatentFormat
    from latentforge.training.vae_trainer import export_vae

    torch.manual_seed(1)
    vae = AutoencoderKL(AutoencoderKLConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32))
    export_vae(path, vae, fmt=LatentFormat(0.5))
    return path


def _tiny_clip_file(path: str) -> str:
    from latentforge.checkpoints import save_state_dict
    from latentforge.models import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(2)
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=16))  # fmt: skip
    save_state_dict(clip.state_dict(), path)
    return path


def test_cached_latents_and_text_equal_uncached_and_are_reused(tmp_path, capsys):
    from latentforge.shapes import export

    data = str(export(tmp_path / "data", n=8, size=32, seed=5))
    vae = _tiny_vae_file(str(tmp_path / "vae.safetensors"))
    clip = _tiny_clip_file(str(tmp_path / "clip.safetensors"))
    base = {**MICRO, "data": data, "pixel_space": "false", "vae": vae, "text_encoder": clip,
            "train_text_encoder": "false", "unet.in_channels": 4, "unet.out_channels": 4, "max_steps": 3,
            "eval_n": 0, "caption_dropout": 0.5, "cache_dir": str(tmp_path / "cache")}  # fmt: skip
    # a dry run writes nothing, the cache included (it used to encode every image before reporting)
    dry = resolve("denoiser", "shapes-tiny", overrides={**base, "cache_latents": "true"})
    cached = train_denoiser(dry, str(tmp_path / "dry"), dry_run=True, progress=False)
    assert "latents are not cached but encoded as they are read" in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "cache") and not os.path.exists(tmp_path / "dry")
    # and it counts the step a cached run takes: the uncached step less the batch's VAE encode (exactly,
    # with the text tower trained, so in both steps) and, with it frozen, less its encoding too (counted on
    # its own: up to 4 captions of the tower's 16 positions)
    from torch.utils.flop_counter import FlopCounterMode

    from latentforge import families
    from latentforge.training.trainer import build_models

    setup = build_models(dry, torch.device("cpu"))
    net = setup.model.parts["unet"].config
    with torch.no_grad(), FlopCounterMode(display=False) as vae_fc:
        setup.vae.encode(torch.zeros(dry.batch_size, 3, 32, 32))
    with torch.no_grad(), FlopCounterMode(display=False) as text_fc:
        families.encode(
            "sd15", setup.model.frozen, ["a b c d e f g h i j k l m n o p"] * 4, 32, 32, False, net, "none"
        )
    step = {}
    for trained in ("true", "false"):
        for cache in ("true", "false"):
            cfg = resolve(
                "denoiser",
                "shapes-tiny",
                overrides={**base, "cache_latents": cache, "train_text_encoder": trained},
            )
            step[trained, cache] = train_denoiser(cfg, str(tmp_path / "dry"), dry_run=True, progress=False)[
                "flops_per_step"
            ]
    capsys.readouterr()
    assert step["true", "false"] - step["true", "true"] == vae_fc.get_total_flops() > 0
    text = step["false", "false"] - step["false", "true"] - vae_fc.get_total_flops()
    assert 0 < text <= text_fc.get_total_flops(), (text, text_fc.get_total_flops())
    runs = {}
    for name, cached in (("plain", False), ("cached", True), ("reused", True)):
        cfg = resolve("denoiser", "shapes-tiny", overrides={**base, "cache_latents": str(cached)})
        out = str(tmp_path / name)
        train_denoiser(cfg, out, progress=False)
        runs[name] = [r["loss"] for r in read_metrics(os.path.join(out, "metrics.jsonl")) if "loss" in r]
        runs[name + "_log"] = capsys.readouterr().out
    assert "latents encoded" not in runs["plain_log"]
    assert "8 latents encoded, 0 reused" in runs["cached_log"]
    assert "0 latents encoded, 8 reused; 0 captions encoded" in runs["reused_log"]
    # same data, σ, ε and dropout; the cache holds the same float32 posterior moments (encoded in a batch
    # of 8 instead of 4: convolution rounding only) and the same frozen-encoder outputs
    np.testing.assert_allclose(runs["cached"], runs["plain"], rtol=1e-5)
    assert runs["reused"] == runs["cached"]
    # the frozen user CLIP is saved unchanged in the result
    sd = read_state_dict(os.path.join(tmp_path, "cached", "checkpoints", "last.safetensors"))
    clip_sd = read_state_dict(clip)
    assert all(torch.equal(sd["cond_stage_model." + k], v) for k, v in clip_sd.items())


@pytest.mark.parametrize(
    "objective",
    [
        {"objective.prediction": "eps", "objective.sigma_sampling": "uniform_discrete"},
        {
            "objective.prediction": "v",
            "objective.sigma_sampling": "uniform_discrete",
            "objective.weighting": "min_snr",
            "objective.zero_terminal_snr": "true",
        },
        {
            "objective.prediction": "edm",
            "objective.sigma_sampling": "lognormal",
            "objective.weighting": "edm",
        },
        {
            "objective.prediction": "eps",
            "objective.sigma_sampling": "uniform_discrete",
            "objective.shift": "4",
        },
    ],
)
def test_objectives_train_and_the_file_samples_with_them(tmp_path, objective):
    out = str(tmp_path / "run")
    train_denoiser(micro(max_steps=2, eval_n=0, **objective), out, progress=False)
    pipe = Pipeline.from_single_file(os.path.join(out, "checkpoints", "last.safetensors"))
    ms = pipe.model_sampling
    want = {"eps": "DiscreteVP", "v": "DiscreteVP", "edm": "EDM"}[objective["objective.prediction"]]
    assert type(ms).__name__ == want
    if objective["objective.prediction"] == "v":
        assert ms.prediction == "v" and float(ms.sigmas[-1]) > 1e3  # zero terminal SNR: σ_max huge
    shift = float(objective.get("objective.shift", 1))
    if objective["objective.prediction"] == "eps":  # the shifted table travels in the file: SD's σ_max × α
        assert ms.shift == shift and float(ms.sigma_max) == pytest.approx(14.6146 * shift, rel=1e-4)
        assert float(pipe.schedule("euler", "normal", 4)[0]) == pytest.approx(14.6146 * shift, rel=1e-4)
    (img,) = pipe("a green heart", steps=2, cfg=2.0, progress=False)
    assert img.size == (32, 32)


def test_gradient_checkpointing_and_bf16_autocast(tmp_path):
    """Checkpointing recomputes the same activations: identical losses. bf16 autocast: the loss agrees
    to bf16 precision (8 bits of mantissa: ~1e-2 relative over a few steps)."""
    runs = {}
    for name, over in (
        ("plain", {}),
        ("ckpt", {"grad_checkpointing": "true"}),
        ("bf16", {"precision": "bf16"}),
    ):
        out = str(tmp_path / name)
        train_denoiser(micro(max_steps=2, eval_n=0, **over), out, progress=False)
        runs[name] = [r["loss"] for r in read_metrics(os.path.join(out, "metrics.jsonl")) if "loss" in r]
    np.testing.assert_allclose(runs["ckpt"], runs["plain"], rtol=1e-6)
    np.testing.assert_allclose(runs["bf16"], runs["plain"], rtol=3e-2)


def spy_context_masks(monkeypatch, cls) -> list:
    """Record the context_mask (or None) of every `cls.forward` call."""
    seen, forward = [], cls.forward

    def spy(self, *args, context_mask=None, **kw):
        seen.append(context_mask)
        return forward(self, *args, context_mask=context_mask, **kw)

    monkeypatch.setattr(cls, "forward", spy)
    return seen


@pytest.mark.parametrize("mask", [False, True])
def test_text_dit_preset_trains_and_generates(tmp_path, monkeypatch, mask):
    # dit.mask_text_padding: the training and the exported file's sampling pass context_mask
    from latentforge.models.dit import DiT

    seen = spy_context_masks(monkeypatch, DiT)
    over = {"dit.hidden_size": 64, "dit.depth": 2, "dit.num_heads": 2, "dit.context_dim": 32,
            "dit.pooled_dim": 32, "dit.mask_text_padding": str(mask),
            "text.hidden_size": 32, "text.intermediate_size": 64, "text.num_hidden_layers": 1,
            "text.max_position_embeddings": 16, "batch_size": 4, "num_workers": 0, "max_steps": 2,
            "eval_n": 2, "sample_steps": 2}  # fmt: skip
    out = str(tmp_path / "run")
    train_denoiser(resolve("denoiser", "shapes-tiny-dit", overrides=over), out, progress=False)
    sd = read_state_dict(os.path.join(out, "checkpoints", "last.safetensors"))
    assert "model.diffusion_model.blocks.1.cross_attn.kv.weight" in sd
    pipe = Pipeline.from_single_file(os.path.join(out, "checkpoints", "last.safetensors"))
    assert pipe.family == "dit-text" and pipe.pixel_space
    assert pipe.components["dit"].config.mask_text_padding == mask
    seen.clear()
    (img,) = pipe("two red stars", steps=2, cfg=3.0, progress=False)
    assert img.size == (32, 32)
    assert len(seen) == 2 and all((m is not None) == mask for m in seen)
    if mask:  # the prompt's BOS, 3 tokens and EOS, then the empty negative's BOS and EOS
        assert seen[0].tolist() == [[True] * 5 + [False] * 11, [True] * 2 + [False] * 14]


@pytest.mark.parametrize("mask", [False, True])
def test_text_mmdit_preset_trains_and_generates(tmp_path, monkeypatch, mask):
    # shapes64-mmdit (benchmarks/architectures.py) made tiny: SD3's joint attention reading one CLIP tower;
    # mmdit.mask_text_padding: the training and the exported file's sampling pass context_mask
    from latentforge.checkpoints import configs_to_json, load_checkpoint, save_state_dict
    from latentforge.models.mmdit import MMDiT
    from latentforge.pipeline import DEFAULT_MODEL

    seen = spy_context_masks(monkeypatch, MMDiT)

    ckpt = load_checkpoint(DEFAULT_MODEL, torch.float32)  # the shipped VAE (f = 4) as a VAE file
    vae = str(tmp_path / "vae.safetensors")
    meta = {"latentforge.configs": configs_to_json({"vae": ckpt.configs["vae"]}),
            "latentforge.latent_format": ckpt.metadata["latentforge.latent_format"]}  # fmt: skip
    save_state_dict(ckpt.components["vae"].state_dict(), vae, metadata=meta)
    over = {"mmdit.depth": 1, "mmdit.context_dim": 32, "mmdit.adm_in_channels": 32,
            "text.hidden_size": 32, "text.intermediate_size": 64, "text.num_hidden_layers": 1,
            "text.max_position_embeddings": 16, "batch_size": 4, "num_workers": 0, "max_steps": 2,
            "eval_n": 2, "sample_steps": 2, "vae": vae, "mmdit.mask_text_padding": str(mask)}  # fmt: skip
    out = str(tmp_path / "run")
    train_denoiser(resolve("denoiser", "shapes64-mmdit", overrides=over), out, progress=False)
    assert seen and all((m is not None) == mask for m in seen)
    sd = read_state_dict(os.path.join(out, "checkpoints", "last.safetensors"))
    assert "model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight" in sd
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in sd
    pipe = Pipeline.from_single_file(os.path.join(out, "checkpoints", "last.safetensors"))
    assert pipe.family == "mmdit-text" and not pipe.pixel_space
    assert pipe.components["mmdit"].config.mask_text_padding == mask
    seen.clear()
    (img,) = pipe("two red stars", steps=2, cfg=3.0, progress=False)
    assert img.size == (64, 64)
    assert len(seen) == 2 and all((m is not None) == mask for m in seen)


def test_aspect_ratio_buckets_from_a_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "data"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k, (w, h) in enumerate([(64, 32)] * 4 + [(32, 64)] * 4):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{k}.png")
        (folder / f"{k}.txt").write_text("noise")
    over = {"data": str(folder), "buckets": "true", "bucket_step": 8, "resolution": 32, "batch_size": 2,
            "max_steps": 4, "eval_n": 0, "unet.attention_resolutions": "[]"}  # fmt: skip
    out = str(tmp_path / "run")
    train_denoiser(micro(**over), out, progress=False)
    assert len([r for r in read_metrics(os.path.join(out, "metrics.jsonl")) if "loss" in r]) == 4
    from latentforge.training.data import ImageFolder

    ds = ImageFolder(folder, 32, buckets=True, bucket_step=8)
    sizes = {ds.target_size(i) for i in range(len(ds))}
    assert len(sizes) == 2 and all(h * w <= 32 * 32 for h, w in sizes)  # landscape and portrait buckets


def test_vae_resume_is_exact(tmp_path):
    over = {"max_steps": "4", "batch_size": "2", "resolution": "32", "eval_n": "2", "num_workers": "0",
            "disc_start": "2", "vae.ch_mult": "[1, 2]", "checkpoint_every": "2"}  # fmt: skip
    cfg = resolve("vae", "shapes-vae", overrides=over)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train_vae(cfg, a, progress=False)
    train_vae(cfg, b, progress=False, stop_after=2)
    train_vae(cfg, b, progress=False, resume=True)
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fsdp_two_ranks_match_one_process_and_resume(tmp_path):
    """FSDP (sharded parameters, gradients, AdamW state and EMA) on 2 CPU ranks: same losses as one process
    with twice the batch; its full-state checkpoint resumes under FSDP and ends where the single process
    does (same tolerance argument as the DDP test)."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    train_denoiser(micro(eval_n=2, max_steps=4, checkpoint_every=2), one, progress=False)
    over = {**MICRO, "eval_n": 2, "checkpoint_every": 2, "batch_size": 2, "parallel": "fsdp"}
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
            "latentforge", "train", "denoiser", "--quiet"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = [*base, "--preset", "shapes-tiny", "--out", two, *_flags({**over, "max_steps": 2})]
    r = subprocess.run(first, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    held = re.search(
        r"FSDP: \d+ units sharded over 2 ranks; rank 0 holds ([\d,]+) of ([\d,]+) parameters", r.stdout
    )
    local, total = (int(g.replace(",", "")) for g in held.groups())
    assert 0.4 < local / total < 0.6  # each rank keeps about half of every parameter
    r = subprocess.run([*base, "--resume", two, "--max-steps", "4"], env=env, capture_output=True, text=True,
                       timeout=400)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    l1 = [x["loss"] for x in read_metrics(os.path.join(one, "metrics.jsonl")) if "loss" in x]
    l2 = [x["loss"] for x in read_metrics(os.path.join(two, "metrics.jsonl")) if "loss" in x]
    assert len(l1) == len(l2) == 4
    np.testing.assert_allclose(l2, l1, rtol=1e-4)
    s1, s2 = _state(one), _state(two)
    assert s1.keys() == s2.keys()
    for prefix in ("model/", "ema/"):
        diff = torch.cat([(s2[k] - s1[k]).abs().flatten() for k in s1 if k.startswith(prefix)])
        assert (diff < 1e-6).float().mean() > 0.995 and diff.max() < 2 * 1e-3 * 4, (prefix, diff.max())
    ev = [x for x in read_metrics(os.path.join(two, "metrics.jsonl")) if "eval_n" in x]
    assert ev and ev[-1]["eval_n"] == 2  # rank 0 sampled and scored from the gathered EMA
    Pipeline.from_single_file(os.path.join(two, "checkpoints", "last.safetensors"))


def test_torchrun_ranks_all_stop_when_rank_0_refuses_the_folder(tmp_path):
    """Rank 0 checks the run folder; when it refuses, every rank exits with its message at once, instead of
    the other ranks waiting at a barrier for 30 minutes.
    Here: a new run into a folder holding the user's own file."""
    (tmp_path / "notes.txt").write_text("mine")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "latentforge", "train", "denoiser", "--quiet", "--preset", "shapes-tiny",
           "--out", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert r.stderr.count("notes.txt") >= 2, r.stderr[-3000:]  # rank 0's message, and rank 1's copy of it
    assert "rank 0: " in r.stderr
    assert time.perf_counter() - t < 240  # well before the 30-minute collective timeout
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]  # nothing written


@pytest.mark.slow
def test_torch_compile_trains_like_eager(tmp_path):
    """`compile = true` (torch.compile of the trained module, inductor on CPU): the same losses as eager
    within float32 reassociation (rtol 1e-4 over 3 steps) and a loadable result."""
    eager = train_denoiser(micro(max_steps=3, eval_n=0), str(tmp_path / "eager"), progress=False)
    comp = train_denoiser(micro(max_steps=3, eval_n=0, compile=True), str(tmp_path / "comp"), progress=False)
    assert comp["step"] == eager["step"] == 3
    le = [r["loss"] for r in read_metrics(str(tmp_path / "eager" / "metrics.jsonl")) if "loss" in r]
    lc = [r["loss"] for r in read_metrics(str(tmp_path / "comp" / "metrics.jsonl")) if "loss" in r]
    np.testing.assert_allclose(lc, le, rtol=1e-4)
    Pipeline.from_single_file(str(tmp_path / "comp" / "checkpoints" / "last.safetensors"))


def test_mask_text_padding_is_trained_with_saved_and_sampled_with(tmp_path, monkeypatch):
    # unet.mask_text_padding: every UNet call of the training (text encoded in the step, or read from the
    # cache of a frozen tower) and of the exported file's sampling gets context_mask, True up to each
    # caption's EOS; a fine-tune of an unmasked file may switch it on (not in the state dict).
    from latentforge import tokenizer
    from latentforge.models.unet import UNet
    from latentforge.shapes import export

    seen = []
    forward = UNet.forward

    def spy(self, x, timesteps, context=None, y=None, control=None, context_mask=None):
        seen.append((self.config.mask_text_padding, context, context_mask))
        return forward(self, x, timesteps, context, y, control, context_mask)

    monkeypatch.setattr(UNet, "forward", spy)

    def check(expect_mask: bool):
        assert seen
        for flag, context, mask in seen:
            assert flag == expect_mask and (mask is not None) == expect_mask
            if expect_mask:  # BOS, the caption's tokens and EOS: at least 2 a row, fewer than all 16
                assert mask.dtype == torch.bool and mask.shape == context.shape[:2]
                assert bool((mask.sum(1) >= 2).all()) and not bool(mask.all())
                chunks = mask.unflatten(1, (-1, 16))  # each chunk of 16 positions: a prefix of it
                assert torch.equal(chunks, chunks.cummin(dim=2).values)
        seen.clear()

    plain = str(tmp_path / "plain")
    train_denoiser(micro(max_steps=2, eval_n=0, sample_every=0), plain, progress=False)
    check(False)
    masked = str(tmp_path / "masked")
    train_denoiser(
        micro(max_steps=2, eval_n=0, sample_every=0, **{"unet.mask_text_padding": "true"}),
        masked,
        progress=False,
    )
    check(True)
    pipe = Pipeline.from_single_file(os.path.join(masked, "checkpoints", "last.safetensors"))
    assert pipe.components["unet"].config.mask_text_padding
    pipe("a red circle", steps=2, cfg=2.0, progress=False)  # CFG: prompt and negative in one batch
    assert [m.shape[0] for _, _, m in seen] == [2, 2]
    n = len(tokenizer.encode(["a red circle"])[0])  # 3 tokens
    assert seen[0][2][0].sum() == n + 2 and seen[0][2][1].sum() == 2  # the prompt, then the empty negative
    check(True)
    # fine-tuning the unmasked file with the flag masks (the file it writes says so); without, it does not
    for flag in (True, False):
        over = {
            "init_from": os.path.join(plain, "checkpoints", "last.safetensors"),
            "unet.mask_text_padding": str(flag),
        }
        ft = str(tmp_path / f"ft-{flag}")
        train_denoiser(micro(max_steps=1, eval_n=0, sample_every=0, **over), ft, progress=False)
        check(flag)
        loaded = Pipeline.from_single_file(os.path.join(ft, "checkpoints", "last.safetensors"))
        assert loaded.components["unet"].config.mask_text_padding == flag
    # frozen text tower, latents and conditioning cached: the mask comes from the cache, as a bool
    data = str(export(tmp_path / "data", n=4, size=32, seed=5))
    vae = _tiny_vae_file(str(tmp_path / "vae.safetensors"))
    clip = _tiny_clip_file(str(tmp_path / "c.safetensors"))
    base = {**MICRO, "data": data, "pixel_space": "false", "vae": vae, "text_encoder": clip,
            "train_text_encoder": "false", "unet.in_channels": 4, "unet.out_channels": 4, "max_steps": 2,
            "eval_n": 0, "sample_every": 0, "unet.mask_text_padding": "true", "cache_latents": "true",
            "cache_dir": str(tmp_path / "cache")}  # fmt: skip
    train_denoiser(
        resolve("denoiser", "shapes-tiny", overrides=base), str(tmp_path / "cached"), progress=False
    )
    check(True)


@pytest.mark.parametrize(
    "v, mult, latent", [("f8", (1, 2, 2, 2), (16, 8, 8)), ("c8", (1, 2, 2), (8, 16, 16))]
)
def test_f8_and_c8_vaes_and_their_denoisers_train_and_generate(tmp_path, v, mult, latent):
    # the VAE comparison's pairs: shapes64-vae-f8 (64×64×3 -> 8×8×16) and shapes64-f8 on its latents;
    # shapes64-vae-c8 (-> 16×16×8) and shapes64-c8
    over = {"max_steps": "2", "batch_size": "2", "eval_n": "0", "num_workers": "0", "sample_every": "0",
            "vae.ch": "8", "checkpoint_every": "2"}  # fmt: skip
    vae_run = str(tmp_path / "vae")
    train_vae(resolve("vae", f"shapes64-vae-{v}", overrides=over), vae_run, progress=False)
    vae = os.path.join(vae_run, "checkpoints", "last.safetensors")
    over = {"unet.model_channels": 16, "unet.num_head_channels": 8, "unet.context_dim": 32,
            "text.hidden_size": 32, "text.intermediate_size": 64, "text.num_hidden_layers": 1,
            "text.max_position_embeddings": 16, "batch_size": 2, "num_workers": 0, "max_steps": 2,
            "eval_n": 0, "sample_steps": 2, "vae": vae}  # fmt: skip
    out = str(tmp_path / "run")
    train_denoiser(resolve("denoiser", f"shapes64-{v}", overrides=over), out, progress=False)
    pipe = Pipeline.from_single_file(os.path.join(out, "checkpoints", "last.safetensors"))
    assert pipe.components["vae"].config.ch_mult == mult
    assert pipe.components["unet"].config.in_channels == latent[0]
    sampled = pipe.sample(["two red stars"], steps=2, cfg=3.0, seed=0, progress=False)
    assert tuple(sampled.shape) == (1, *latent)
    (img,) = pipe("two red stars", steps=2, cfg=3.0, progress=False)
    assert img.size == (64, 64)


def test_small_object_weight_weighs_the_stated_small_objects(tmp_path, monkeypatch):
    """`small_object_weight`: its weights are made from the captions the network was given (dropped ones
    empty: weight 1), > 1 exactly where a caption states a small object's size and place, and the first
    step (the same weights, batch and draws as a plain run) has a higher loss than the plain run's."""
    from latentforge.shapes import data as shapes_data
    from latentforge.training import trainer as trainer_mod

    seen = []

    def spy(captions, size, factor, weight):
        out = shapes_data.small_object_weights(captions, size, factor, weight)
        seen.append((list(captions), size, factor, weight, out))
        return out

    monkeypatch.setattr(trainer_mod, "small_object_weights", spy)
    losses = {}
    for name, over in (("plain", {}), ("small", {"small_object_weight": "4"})):
        out = str(tmp_path / name)
        train_denoiser(micro(max_steps=3, eval_n=0, caption_dropout="0.25", **over), out, progress=False)
        losses[name] = [r["loss"] for r in read_metrics(os.path.join(out, "metrics.jsonl")) if "loss" in r]
    assert len(seen) == 3 and all(s[1:4] == (32, 1, 4.0) for s in seen)  # shapes-tiny: pixel space, 32²
    captions, _, _, _, w = seen[0]
    assert w.shape == (4, 1, 32, 32)
    for c, wi in zip(captions, w, strict=True):
        assert (wi.max() > 1) == any(
            o.size == "small" and o.position is not None for o in (parse(c).objects if parse(c) else ())
        ), c
    assert (w > 1).any() and (w == 1).all(dim=(1, 2, 3)).any()  # the first batch has captions of both kinds
    assert losses["small"][0] > losses["plain"][0]
    with pytest.raises(ValueError, match="small_object_weight must be >= 0"):
        micro(small_object_weight="-1")
    with pytest.raises(
        ValueError, match="square shapes scenes of 32..512 px; got resolution 32 with buckets"
    ):
        micro(small_object_weight="1", buckets="true")
    with pytest.raises(ValueError, match="square shapes scenes of 32..512 px; got resolution 1024"):
        resolve(
            "denoiser", "sd15", overrides={"small_object_weight": "1", "resolution": "1024", "data": "/x"}
        )
