"""The seed's question, measured: does diffusing in the VAE's latent space buy adherence per unit of compute?

Rombach et al. 2022 ("High-Resolution Image Synthesis with Latent Diffusion Models", §1, §3 and §4.1)
claim that a diffusion model trained on the latents of a perceptual-compression autoencoder reaches a given
quality with much less compute than one trained on pixels, and that with mild compression (f = 4 to 16) it
loses little quality for it. Here both sides share everything but the space:

- latent: preset `shapes64` (the default model's UNet and 3-layer CLIP text tower, MODEL_CARD.md) on the
  16×16×4 latents of the shipped VAE (f = 4, frozen; taken out of latentforge/data/shapes64.safetensors into
  `<work>/vae.safetensors`, since `--vae` wants a VAE file);
- pixel: preset `shapes64-pixel`, the same recipe on 64×64×3 pixels, its UNet two ×2 levels deeper so that
  attention runs on the same 8×8 and 4×4 token grids with the same widths.

Recipes (`--recipe`). `2h` (the default): the shipped model's own 2-hour recipe
(scripts/train_default_2h.sh, MODEL_CARD.md "Recipe") for both models: 60,000 exported scenes, 80% of the
captions labelled; the text padding masked out of the cross-attention; stage A, 300 steps at σ = 1 only (the
text is all there is to read), then stage B, ε on the 1000-step table with Min-SNR-5 weighting, from stage A's
export at a constant learning rate (step 1 below) where the script decays it; the evaluations use the layout
completion the recipe's model is made for. The latent model reads its latents from a cache that stage A
fills once; stage A (its whole process wall time, the cache's encoding included) and the encoding's FLOPs
are counted before stage B's first step in each curve (`tests/test_latent_vs_pixel.py` checks the flags
against the script's). `onfly`: the presets' own recipe on scenes rendered on the fly (the first run,
2026-12-04, `docs/latent_vs_pixel/`), as described below.

Method.
1. Each model is trained from scratch by `latentforge train denoiser --data shapes` (scenes rendered on the
   fly, the same `--seed`, so the same data and noise) for `--minutes` of the trainer's own step-loop wall
   time, at a constant learning rate after the preset's warm-up (`--lr_schedule constant`: a checkpoint at
   step N is then the export a run with `--max_steps N` would have written; the preset's cosine would
   depend on a step count nobody knows in advance). The trainer exports its EMA weights every
   `--checkpoint-every` steps (about every 40 s on an idle machine for both models); the benchmark keeps
   (hard-links into `<work>/<model>/checkpoints/`, the trainer keeps only its newest two) the first export
   at or past each multiple of `--minutes`/`--points` of training time, so each model gets `--points`
   evaluation points spread evenly over its budget however fast the machine is (`--eval-every K` instead:
   export and keep every K steps). When the budget is spent it stops the trainer (SIGINT; the trainer's
   writes are atomic and its next start cleans up) and keeps the newest export too. A stopped benchmark
   continues: the trainer resumes exactly from its newest state (`--resume`), and finished evaluations
   are read back. Neither the stop nor a restart's loading counts as training time.
2. Training cost at step N: wall time from metrics.jsonl (one record per step: within one trainer call
   the loop's time is (N − N₀)/it_s, calls chained at their start steps N₀) and FLOPs = N × the dry run's
   FLOPs per step (`train denoiser --dry-run`: torch's FLOP counter on one real batch, forward + backward,
   the latent model's VAE encode and both models' text tower included).
3. Every kept export is scored by `latentforge eval shapes --split validation` (`--n` prompts, 20 euler
   steps, normal schedule, CFG 3, seed 1,000,000: the model card's setting): all-correct rate with its
   Wilson 95% interval, per-attribute and by-object-count rates. The chance level of each evaluation is the
   same images scored against another image's prompt (a cyclic shift, as the trainer's own evaluation).
4. Equal adherence: for the highest level both curves reach (the smaller of their best rates), the FLOPs
   and wall time each model needed (linear interpolation between evaluation points, first crossing), and
   their ratio pixel / latent, next to the compression factor (64·64·3)/(16·16·4) = 12. A level not above
   chance (the upper end of the pooled chance rate's Wilson interval) is reported as not measured, and a
   crossing at the first evaluation point is only a bound. The same for the background and colour rates,
   which move early, so a short budget still gives a measured ratio. The FLOPs ratio is split into its two
   factors: FLOPs per step (pixel / latent) × steps needed (pixel / latent).
   Because an untrained network's images can sit a little above chance, each model's onset is reported
   too: its first evaluation from which every later one is above chance (the rate's and the chance rate's
   Wilson intervals apart), and the interval (or, for a model that never leaves chance, the bound) that
   this puts on the compute ratio pixel / latent to leave chance.
5. Sampling cost per image of both final models: 20 steps, CFG 3, prompt encoding and the latent model's
   VAE decode included, batch 1 and batch 16, the models alternating (`--repeats` rounds, median), and the
   FLOPs of one batch-1 image (torch's FLOP counter).

Outputs: `--json` (settings, dry runs, both curves, the equal-adherence ratios, sampling cost) and `--png`
(adherence against training FLOPs, log x, and against wall time, one line per model with 95% bars).
Training runs, evaluations and images stay under `--work` (about 1 GB: each trainer's two newest states).

    nice -n 10 .venv/bin/python benchmarks/latent_vs_pixel.py [--minutes 60] [--n 200] \
        [--work /tmp/latent-vs-pixel] [--json out/latent_vs_pixel.json] [--png out/latent_vs_pixel.png]

The 60-minute default runs 2 hours of training, then about 2 × 11 evaluations (the pixel model samples
about 4× more slowly) and the sampling timings; with `--recipe 2h` each model's minutes include its stage A
(about 6.5 min for the latent model, its cache's encoding included, and 14.5 for the pixel model).
`--minutes 1.5 --n 8 --points 2 --checkpoint-every 2 1 --repeats 1 --scenes 256 --stage-a-steps 4` is a
smoke test of the whole path (about 4 minutes). A finished run continues with a larger budget and the same
`--work` (the trainers resume, finished evaluations are read back); `--minutes 45 100` gives the pixel
model, say, 55 more minutes alone, to find where it leaves chance. `--pixel-shift`, `--pixel-objective` and
`--pixel-unet` change the pixel model's recipe alone, each setting in its own run folder (`pixel_settings`;
benchmarks/README.md, "Why the pixel model stays at chance").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentforge import plot  # noqa: E402
from latentforge.checkpoints import configs_to_json, load_checkpoint, save_state_dict  # noqa: E402
from latentforge.files import write_json  # noqa: E402
from latentforge.models.unet import UNetConfig  # noqa: E402
from latentforge.pipeline import DEFAULT_MODEL, Pipeline  # noqa: E402
from latentforge.shapes.evaluate import evaluate  # noqa: E402
from latentforge.shapes.scoring import wilson  # noqa: E402
from latentforge.training.metrics import read_metrics  # noqa: E402
from latentforge.training.objectives import ObjectiveConfig  # noqa: E402
from latentforge.training.state import step_dirs  # noqa: E402

MODELS = ("latent", "pixel")
PRESETS = {"latent": "shapes64", "pixel": "shapes64-pixel"}
COMPRESSION = (64 * 64 * 3) / (16 * 16 * 4)  # values per image, pixels / latents: 12
EVAL = ["--split", "validation", "--steps", "20", "--sampler", "euler", "--scheduler", "normal", "--cfg", "3"]
EVAL_SEED = 1_000_000
SAMPLE = {"steps": 20, "sampler": "euler", "scheduler": "normal", "cfg": 3.0}
PROMPT = "a big red circle in the upper left corner on a black background"
ATTRS = ("present", "shape", "color", "size", "position", "relation", "background")
EASY = ("background", "color")  # attributes that move early: a short budget still reaches a common level
EXPORT = re.compile(r"^step-(\d+)\.safetensors$")
RECIPES = ("2h", "onfly")
STAGE_A_STEPS = 300  # the 2-hour recipe's stage A: σ = 1 only (scripts/train_default_2h.sh)


def latentforge(*argv: str) -> list[str]:
    return [sys.executable, "-m", "latentforge", *argv]


def child_env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def extract_vae(work: str) -> str:
    """The shipped model's VAE as a VAE file (weights, config and measured latent scale), which is what
    `train denoiser --vae` reads; a single-file checkpoint given there is refused."""
    path = os.path.join(work, "vae.safetensors")
    if not os.path.exists(path):
        ckpt = load_checkpoint(DEFAULT_MODEL, torch.float32)
        vae = ckpt.components["vae"]
        meta = {
            "latentforge.configs": configs_to_json({"vae": vae.config}),
            "latentforge.latent_format": ckpt.metadata["latentforge.latent_format"],
        }
        save_state_dict(vae.state_dict(), path, metadata=meta)
    return path


def train_flags(
    preset: str, vae: str | None, seed: int, checkpoint_every: int, data: str = "shapes", extra=()
) -> list[str]:
    """`train denoiser` flags: `preset` on `data` (scenes rendered on the fly, or a folder) at a constant
    learning rate, exporting every `checkpoint_every` steps, then `extra`; `vae` None: pixel space."""
    flags = ["--preset", preset, "--data", data, "--seed", str(seed), "--max_steps", "1000000", *extra]
    flags += ["--lr_schedule", "constant", "--log_every", "1", "--sample_every", "0", "--quiet"]
    flags += ["--checkpoint_every", str(checkpoint_every)]
    return flags + vae_flag(vae)


def pixel_settings(pixel_shift: float = 1.0, objective=(), unet=()) -> tuple[tuple[str, str], ...]:
    """The pixel model's training settings beyond the recipe's, as (config path, value) pairs:
    `--pixel-shift` α (objective.shift=α), each `--pixel-objective FIELD=VALUE` (a field of `ObjectiveConfig`)
    and each `--pixel-unet FIELD=VALUE` (of `UNetConfig`), which replace the recipe's or the preset's value in
    both of its stages (a field the recipe does not set is added). α: the 1000-step table's σ times α
    (DiscreteVP.shift), so that the means of 4×4-pixel blocks (one latent's worth) keep the SNR the latent
    model's values have: α = 64/16 = 4 (Hoogeboom et al. 2023, §3.1). α = 1 is the recipe's table as it is,
    from which the pixel model learns to read its background off the noise: at SD's σ_max = 14.61 the noise
    on a channel's mean over 64×64 pixels has variance σ²/4096 = 0.052 (over a 16×16 latent: σ²/256 = 0.83,
    and 0.83 again for pixels at α = 4). `prediction=v zero_terminal_snr=true` removes that leak altogether
    (Lin et al. 2024, §3.1-3.2: x_T is pure noise, v at SNR 0 is −x₀). `attention_resolutions=[2,4,8,16]`
    gives the pixel UNet's 32² and 16² levels the text too (the preset's (8, 16) reach only its 8² and 4²)."""
    out = {"objective.shift": f"{pixel_shift:g}"} if pixel_shift != 1 else {}
    for table, cls, pairs in (("objective", ObjectiveConfig, objective), ("unet", UNetConfig, unet)):
        fields = {f.name for f in dataclasses.fields(cls)}
        for pair in pairs:
            key, eq, value = pair.partition("=")
            if not eq or key not in fields or not value:
                raise ValueError(
                    f"--pixel-{table} takes FIELD=VALUE with FIELD one of {', '.join(sorted(fields))}; "
                    f"got {pair!r}"
                )
            if f"{table}.{key}" in out:
                raise ValueError(f"--pixel-{table} sets {key!r} twice (or with --pixel-shift): {pair!r}")
            out[f"{table}.{key}"] = value
    return tuple(out.items())


def with_settings(flags: list[str], settings=()) -> list[str]:
    """`flags` with each (path, value) of `settings` as `--path value`, in place of the flag's own value
    where `flags` has it (the trainer takes a flag once)."""
    flags = list(flags)
    for key, value in settings:
        flag = f"--{key}"
        if flag in flags:
            flags[flags.index(flag) + 1] = value
        else:
            flags += [flag, value]
    return flags


def model_folder(work: str, model: str, pixel=()) -> str:
    """<work>/latent, <work>/pixel, or <work>/pixel-<field><value>-… for pixel settings beyond the recipe's
    (`pixel_settings`; objective fields by their name, e.g. pixel-shift4, UNet fields as unet.<name>, e.g.
    pixel-unet.attention_resolutions2-4-8-16), so a run never resumes one with other settings."""
    if model != "pixel":
        return os.path.join(work, model)
    parts = [k.removeprefix("objective.") + re.sub(r"[^A-Za-z0-9._]+", "-", v).strip("-") for k, v in pixel]
    return os.path.join(work, "-".join([model, *parts]))


def two_hour_flags(model: str, work: str, pixel=()) -> tuple[list[str], list[str]]:
    """The 2-hour recipe's flags beyond the preset (scripts/train_default_2h.sh, the shipped model's
    recipe), the same for both models: (stage A's, stage B's). ε on the 1000-step table, the padding tokens
    masked out of the cross-attention, lr 8e-4 after 50 warm-up steps; stage A at σ = 1 only, stage B with
    Min-SNR-5 weighting. The latent model reads its latents from a cache that stage A's start fills once
    (that encoding is in its cost: `stage_a`, `encode_flops`), in the training process (no loader worker:
    the script's choice since 2026-12-06; the recorded run predates it)."""
    common = ["--unet.mask_text_padding", "true", "--objective.prediction", "eps"]
    common += ["--objective.sigma_sampling", "uniform_discrete", "--lr", "8e-4", "--warmup_steps", "50"]
    if model == "latent":
        common += ["--cache_latents", "true", "--cache_dir", os.path.join(work, "cache")]
        common += ["--num_workers", "0"]
    stage_a = [*common, "--objective.terminal_fraction", "0.99"]
    stage_b = [*common, "--objective.weighting", "min_snr", "--objective.min_snr_gamma", "5"]
    if model != "pixel":
        return stage_a, stage_b
    return with_settings(stage_a, pixel), with_settings(stage_b, pixel)


def stage_a_flags(model: str, work: str, data: str, vae: str | None, pixel=()) -> list[str]:
    """Stage A's `train denoiser` flags but its length and output (`stage_a_argv`)."""
    a_flags = two_hour_flags(model, work, pixel)[0]
    return ["--preset", PRESETS[model], "--data", data, *a_flags, *vae_flag(vae)]


def stage_b_extra(model: str, work: str, stage_a_export: str, pixel=()) -> list[str]:
    """Stage B's flags beyond `train_flags`' (which set its constant learning rate and exports)."""
    return [*two_hour_flags(model, work, pixel)[1], "--init_from", stage_a_export]


def vae_flag(vae: str | None) -> list[str]:
    return ["--vae", vae] if vae else []


def export_data(work: str, scenes: int, threads: int) -> str:
    """The 2-hour recipe's training scenes (80% of the captions labelled), exported once into <work>/data."""
    path = os.path.join(work, "data")
    if not os.path.exists(os.path.join(path, "metadata.jsonl")):
        cmd = latentforge("shapes", "export", path, "--n", str(scenes), "--size", "64", "--seed", "21")
        cmd += ["--labelled_share", "0.8", "--background_share", "0.8"]
        subprocess.run(cmd, env=child_env(threads), check=True, stdout=subprocess.DEVNULL)
    return path


def stage_a_argv(flags: list[str], steps: int, run_dir: str) -> list[str]:
    """`train denoiser`'s arguments for stage A: `flags` (`stage_a_flags`) for `steps` steps, seed 0, one
    export at the end, into `run_dir`."""
    argv = [*flags, "--max_steps", str(steps), "--seed", "0", "--checkpoint_every", str(steps)]
    return argv + ["--sample_every", "0", "--quiet", "--out", run_dir, "--overwrite", "true"]


def stage_a(name: str, flags: list[str], folder: str, threads: int, steps: int = STAGE_A_STEPS) -> dict:
    """Run the 2-hour recipe's stage A (`train denoiser FLAGS`, `steps` steps at the preset's own
    learning-rate schedule, as the script runs it) to its end, once (one cut off starts again): its export
    and the process's whole wall time, which for the latent model includes encoding the latent cache."""
    path = os.path.join(folder, "stageA.json")
    if os.path.exists(path):
        return json.loads(Path(path).read_text())
    run_dir = os.path.join(folder, "stageA")
    os.makedirs(folder, exist_ok=True)
    cmd = latentforge("train", "denoiser", *stage_a_argv(flags, steps, run_dir))
    print(f"{name}: stage A, {steps} steps at σ = 1", flush=True)
    t0 = time.time()
    with open(os.path.join(folder, "stageA.log"), "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(threads)).returncode
    if rc:
        raise RuntimeError(f"{name}: stage A failed (exit {rc}); see {log.name}")
    res = {"steps": steps, "wall_s": time.time() - t0}
    res["export"] = os.path.join(run_dir, "checkpoints", "last.safetensors")
    write_json(path, res)
    return res


def encode_flops(scenes: int) -> float:
    """FLOPs of encoding `scenes` 64×64 images once with the shipped VAE (`extract_vae`'s; torch's counter,
    one image × scenes): the latent cache's cost."""
    from torch.utils.flop_counter import FlopCounterMode

    vae = load_checkpoint(DEFAULT_MODEL, torch.float32).components["vae"]
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        vae.encode(torch.zeros(1, 3, 64, 64))
    return fc.get_total_flops() * scenes


def dry_run(flags: list[str], folder: str, threads: int) -> dict:
    """Parameters, GFLOP per step and seconds per step from `train denoiser FLAGS --dry-run` (cached)."""
    path = os.path.join(folder, "dry_run.json")
    if os.path.exists(path):
        return json.loads(Path(path).read_text())
    os.makedirs(folder, exist_ok=True)
    cmd = latentforge("train", "denoiser", *flags, "--dry-run")
    out = subprocess.run(cmd, env=child_env(threads), capture_output=True, text=True, check=True).stdout
    counts = re.finditer(r"^(\w+)\s+([\d,]+) trainable\s+([\d,]+) frozen", out, re.M)
    res = {
        "command": " ".join(cmd[2:]),
        "parameters": {m[1]: {"trainable": number(m[2]), "frozen": number(m[3])} for m in counts},
        "gflop_per_step": float(re.search(r"FLOPs per step.*?: ([\d,.]+) GFLOP", out)[1].replace(",", "")),
        "seconds_per_step": float(re.search(r"time per step: ([\d.]+) s", out)[1]),
    }
    write_json(path, res)
    return res


def number(text: str) -> int:
    return int(text.replace(",", ""))


def loop_seconds(folder: str) -> dict[int, float]:
    """Step -> seconds of the trainer's step loop up to it, over all the calls the benchmark made: within a
    call that started at step N₀, (N − N₀) / it_s; each call continues from its start step's time. A
    record belongs to the last call launched before it was written that started before its step."""
    metrics = os.path.join(folder, "run", "metrics.jsonl")
    calls_file = os.path.join(folder, "calls.json")
    if not os.path.exists(metrics) or not os.path.exists(calls_file):
        return {}
    calls = json.loads(Path(calls_file).read_text())  # [start step, launch time], in launch order
    wall = {0: 0.0}
    for rec in sorted((r for r in read_metrics(metrics) if "it_s" in r), key=lambda r: r["step"]):
        s = rec["step"]
        s0 = next((c[0] for c in reversed(calls) if c[0] < s and c[1] <= rec["time"]), None)
        if s0 in wall:  # a start step without a record: that call's time is unknown
            wall[s] = wall[s0] + (s - s0) / rec["it_s"]
    return wall


def spent(folder: str) -> float:
    return max(loop_seconds(folder).values(), default=0.0)


def keep_exports(folder: str, every_s: float | None, newest: bool = False) -> None:
    """Hard-link the trainer's exports worth evaluating into <folder>/checkpoints/ (the trainer prunes its
    own to the newest two): all of them (`every_s` None), or the first at or past each multiple of `every_s`
    seconds of training; with `newest`, also the newest."""
    src, dst = os.path.join(folder, "run", "checkpoints"), os.path.join(folder, "checkpoints")
    wall = loop_seconds(folder)

    def slot(step: int) -> int | None:
        return None if every_s is None else int(wall[step] // every_s)

    taken = {slot(step) for step, _ in checkpoints(folder) if step in wall}
    exports = [(step, os.path.basename(path)) for step, path in checkpoints(folder, src)]
    os.makedirs(dst, exist_ok=True)
    for step, f in exports:
        if step not in wall or os.path.exists(os.path.join(dst, f)):
            continue
        if every_s is not None and slot(step) in taken and not (newest and step == exports[-1][0]):
            continue
        taken.add(slot(step))
        try:
            os.link(os.path.join(src, f), os.path.join(dst, f))
        except FileNotFoundError:
            pass  # pruned between the listing and the link
        except OSError:  # a file system without hard links
            shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))


def train(name: str, flags: list[str], minutes: float, args, folder: str, every_s: float | None) -> None:
    """Train (or continue) `name` (`train denoiser FLAGS`) until its step loop has run `minutes` (or
    until its first export, if that comes later), then stop the trainer; keep its exports as
    `keep_exports` says."""
    budget = minutes * 60
    run_dir = os.path.join(folder, "run")
    if spent(folder) >= budget and checkpoints(folder):
        keep_exports(folder, every_s, newest=True)  # in case the last call stopped before keeping it
        return
    states = step_dirs(os.path.join(run_dir, "state"))
    start = states[-1][0] if states else 0
    if start:
        cmd = latentforge("train", "denoiser", "--resume", run_dir)
    else:  # new, or stopped before its first checkpoint
        leftover = os.path.isdir(run_dir) and os.listdir(run_dir)
        cmd = latentforge("train", "denoiser", *flags, "--out", run_dir)
        cmd += ["--overwrite", "true"] if leftover else []
    calls_file = os.path.join(folder, "calls.json")
    calls = json.loads(Path(calls_file).read_text()) if start and os.path.exists(calls_file) else []
    write_json(calls_file, [c for c in calls if c[0] < start] + [[start, time.time()]])
    print(f"{name}: training from step {start} until {minutes:g} min of steps", flush=True)
    exports = os.path.join(run_dir, "checkpoints")
    with open(os.path.join(folder, "train.log"), "a") as log:
        # Ctrl-C's default action restored in the child: a shell starts background jobs with SIGINT ignored
        # (POSIX, without job control), which the trainer would inherit, and Python then installs no
        # KeyboardInterrupt handler, so `nohup benchmark &` could never stop its trainer
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env(args.threads),
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            while proc.poll() is None and (spent(folder) < budget or not checkpoints(folder, exports)):
                time.sleep(1.0)
                keep_exports(folder, every_s)
            if proc.poll() is not None:
                raise RuntimeError(f"{name}: the trainer stopped (exit {proc.returncode}); see {log.name}")
            proc.send_signal(signal.SIGINT)  # as Ctrl-C: its data-loader worker is shut down with it
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:  # killed below; its writes are atomic (a state or none)
                print(f"{name}: the trainer did not stop within 120 s of SIGINT; killed", flush=True)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    keep_exports(folder, every_s, newest=True)


def checkpoints(folder: str, d: str | None = None) -> list[tuple[int, str]]:
    """(step, path) of the kept exports (or of the exports in folder `d`), oldest first."""
    d = d or os.path.join(folder, "checkpoints")
    found = os.listdir(d) if os.path.isdir(d) else []
    return sorted((int(m[1]), os.path.join(d, f)) for f in found if (m := EXPORT.match(f)))


def score(ckpt: str, out: str, n: int, threads: int, eval_args=EVAL) -> dict:
    """`latentforge eval shapes` on `ckpt` (cached in out.json), and the chance level of its images."""
    report, images = out + ".json", out + "-images"
    if not os.path.exists(report):
        cmd = latentforge("eval", "shapes", "--model", ckpt, "--n", str(n), *eval_args)
        cmd += ["--seed", str(EVAL_SEED)]
        cmd += ["--json", report, "--out", images]
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out + ".log", "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(threads)).returncode
        if rc:
            raise RuntimeError(f"evaluating {ckpt} failed (exit {rc}); see {out}.log")
    rep = json.loads(Path(report).read_text())
    chance_file = out + ".chance.json"
    if not os.path.exists(chance_file):
        from PIL import Image

        meta = [json.loads(line) for line in Path(images, "metadata.jsonl").read_text().splitlines() if line]
        pics = [np.asarray(Image.open(os.path.join(images, m["file_name"])).convert("RGB")) for m in meta]
        prompts = [m["text"] for m in meta]
        ch = evaluate(pics, prompts[1:] + prompts[:1], reference=False)
        write_json(
            chance_file, {"all_correct": ch["all_correct"], "n": ch["n"], "attributes": ch["attributes"]}
        )
    chance = json.loads(Path(chance_file).read_text())
    return {
        "all_correct": rep["all_correct"],
        "ci95": rep["all_correct_ci95"],
        "n": rep["n"],
        "attributes": {a: rep["attributes"][a] for a in ATTRS if a in rep["attributes"]},
        "by_objects": rep["by_objects"],
        "chance": {
            "all_correct": chance["all_correct"],
            "n": chance["n"],
            "attributes": {a: chance["attributes"][a] for a in ATTRS if a in chance["attributes"]},
        },
    }


def curve(
    name: str, folder: str, gflop: float, n: int, threads: int, before: dict | None = None, eval_args=EVAL
) -> list[dict]:
    """Every kept export scored; its step, wall time and FLOPs counted from the start of training: `before`
    ({"step", "wall_s", "flops"}) is what came before this trainer's step 0 (the 2-hour recipe's stage A
    and the latent cache)."""
    b = before or {"step": 0, "wall_s": 0.0, "flops": 0.0}
    wall = loop_seconds(folder)
    points = []
    for step, ckpt in checkpoints(folder):
        if step not in wall:
            continue
        t0 = time.perf_counter()
        s = score(ckpt, os.path.join(folder, "evals", f"step-{step:08d}"), n, threads, eval_args)
        at = {"step": b["step"] + step, "wall_s": b["wall_s"] + wall[step]}
        points.append({**at, "flops": b["flops"] + step * gflop * 1e9, **s})
        lo, hi = s["ci95"]
        print(
            f"{name} step {at['step']:6d}: {at['wall_s'] / 60:6.1f} min, "
            f"{points[-1]['flops'] / 1e12:8.1f} TFLOP, "
            f"all correct {100 * s['all_correct']:5.1f}% [{100 * lo:.1f}, {100 * hi:.1f}], "
            f"background {rate_of(s, 'background'):.2f}, colour {rate_of(s, 'color'):.2f} "
            f"({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    return points


def rate_of(point: dict, metric: str, chance: bool = False) -> float:
    p = point["chance"] if chance else point
    if metric == "all_correct":
        return p["all_correct"]
    r = p["attributes"].get(metric, {}).get("rate")
    return float("nan") if r is None else r


def count_of(point: dict, metric: str, chance: bool = True) -> tuple[int, int]:
    """(k, n) of the chance rate of `metric` at one evaluation (`chance` False: of the rate itself)."""
    c = point["chance"] if chance else point
    if metric == "all_correct":
        return round(c["all_correct"] * c["n"]), c["n"]
    a = c["attributes"].get(metric, {})
    return a.get("k", 0), a.get("n", 0)


def crossing(xs: list[float], ys: list[float], level: float) -> tuple[float, bool] | None:
    """Where the curve first reaches `level` (linear interpolation between evaluation points), and whether
    that is measured (False: already at the first point, so it is only an upper bound); None: never."""
    for i, y in enumerate(ys):
        if y >= level:
            if i == 0:
                return xs[0], False
            x0, y0, x1 = xs[i - 1], ys[i - 1], xs[i]
            return x0 + (x1 - x0) * (level - y0) / (y - y0), True
    return None


def equal_adherence(
    curves: dict[str, list[dict]], metric: str, num: str = "pixel", den: str = "latent"
) -> dict:
    """The compute models `num` and `den` each needed to reach the highest `metric` level both reach, and
    the ratios num / den (key "ratio")."""
    pair = (num, den)
    ys = {m: [rate_of(p, metric) for p in curves[m]] for m in pair}
    ys = {m: [y if math.isfinite(y) else 0.0 for y in v] for m, v in ys.items()}
    k = sum(count_of(p, metric)[0] for m in pair for p in curves[m])
    n = sum(count_of(p, metric)[1] for m in pair for p in curves[m])
    chance = {"rate": k / n if n else None, "ci95": list(wilson(k, n))}
    res: dict = {"metric": metric, "pair": list(pair), "chance": chance}
    if not all(ys.values()):
        return {**res, "note": "a model has no evaluation point"}
    if n == 0:
        return {**res, "note": "the evaluator scored no prompt for it"}
    level = min(max(v) for v in ys.values())
    res["level"] = level
    if level <= chance["ci95"][1]:
        return {**res, "note": f"no common level above chance ({chance['ci95'][1]:.3f}): not measured"}
    for axis in ("flops", "wall_s", "step"):  # FLOPs ratio = FLOPs-per-step ratio × steps ratio
        cross = {m: crossing([p[axis] for p in curves[m]], ys[m], level) for m in pair}
        (px, p_measured), (lx, l_measured) = cross[num], cross[den]
        # a crossing at a model's first evaluation is an upper bound on what it needed
        kind = {(True, True): "=", (True, False): "≥", (False, True): "≤", (False, False): None}
        res[axis] = {
            **{m: {"value": x, "measured": ok} for m, (x, ok) in cross.items()},
            "ratio": px / lx,
            "ratio_is": kind[p_measured, l_measured]
            or "unknown: both reached the level at their first point",
        }
    return res


def above_chance(point: dict, metric: str) -> bool:
    """Whether `metric` at this evaluation is above its own chance level: the two Wilson 95% intervals do
    not overlap (conservative; an untrained network's images can sit a little above the shifted-prompt
    chance when the evaluator finds few objects, and this must not count as learning)."""
    k, n = count_of(point, metric, chance=False)
    kc, nc = count_of(point, metric)
    if n == 0 or nc == 0:
        return False
    return wilson(k, n)[0] > wilson(kc, nc)[1]


def onset(curves: dict[str, list[dict]], metric: str, num: str = "pixel", den: str = "latent") -> dict:
    """When each model's `metric` leaves chance for good: its first evaluation from which every later one
    is above chance (`above_chance`), so the onset lies in (previous evaluation, that one]. The compute
    ratio num / den to leave chance follows as an interval; a model that never leaves chance within its
    budget only gives a bound (its onset is past its last evaluation)."""
    res: dict = {"metric": metric, "pair": [num, den]}
    first = {}  # each model's onset evaluation (None: not yet)
    for m in (num, den):
        up = [above_chance(p, metric) for p in curves[m]]
        first[m] = next((i for i in range(len(up)) if all(up[i:])), None)
    for axis in ("flops", "wall_s", "step"):
        span: dict = {}
        for m in (num, den):
            pts, i = curves[m], first[m]
            if not pts:
                span[m] = None
            elif i is None:  # not yet: later than the last evaluation
                span[m] = {"after": pts[-1][axis], "by": None}
            else:
                span[m] = {"after": pts[i - 1][axis] if i else 0.0, "by": pts[i][axis]}
        a, b = span[num], span[den]
        if a is None or b is None:
            ratio = {"note": "a model has no evaluation point"}
        elif a["by"] is None and b["by"] is None:
            ratio = {"note": "neither left chance: not measured"}
        elif a["by"] is None:  # num's onset is past its last point, den's no later than b["by"]
            ratio = {"above": a["after"] / b["by"]}
        elif b["by"] is None:
            ratio = {"below": a["by"] / b["after"]}
        else:  # num's onset in (a.after, a.by], den's in (b.after, b.by]
            ratio = {"above": a["after"] / b["by"]}
            if b["after"]:  # den left chance at its first evaluation: no upper bound
                ratio["below"] = a["by"] / b["after"]
        res[axis] = {**span, "ratio": ratio}
    return res


def describe_onset(o: dict) -> str:
    """One line: where each model left chance and the ratio num / den it implies."""
    num, den = o["pair"]
    parts = [f"{o['metric']} leaves chance:"]
    for axis, unit, what in (("flops", 1e12, "TFLOP"), ("wall_s", 60.0, "min"), ("step", 1.0, "steps")):
        d = o[axis]
        need = []
        for m in (num, den):
            s = d[m]
            if s is None:
                need.append(f"{m} -")
            elif s["by"] is None:
                need.append(f"{m} not by {s['after'] / unit:.4g}")
            else:
                need.append(f"{m} in ({s['after'] / unit:.4g}, {s['by'] / unit:.4g}]")
        r = d["ratio"]
        bounds = [f"> {r['above']:.2f}"] if "above" in r else []
        bounds += [f"< {r['below']:.2f}"] if "below" in r else []
        ratio = " and ".join(bounds) or r["note"]
        parts.append(f"{what} {', '.join(need)} ({num}/{den} {ratio});")
    return " ".join(parts)


def sampling_cost(ckpts: dict[str, str], threads: int, repeats: int) -> dict:
    """Per model of `ckpts` (name -> file): seconds per image at batch 1 and 16 (models alternating, the
    order turned every round; median) and GFLOP per batch-1 image, prompt encoding and the VAE decode
    included."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(threads)
    pipes = {m: Pipeline.from_single_file(p) for m, p in ckpts.items()}
    names = list(ckpts)
    res: dict = {m: {"batch1_s": [], "batch16_per_image_s": []} for m in names}
    for m, pipe in pipes.items():
        pipe(PROMPT, **SAMPLE, seed=0, progress=False)  # warm-up
        with FlopCounterMode(display=False) as fc:
            pipe(PROMPT, **SAMPLE, seed=0, progress=False)
        res[m]["gflop_per_image"] = fc.get_total_flops() / 1e9
    for r in range(repeats):
        for m in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            pipes[m](PROMPT, **SAMPLE, seed=r, progress=False)
            t1 = time.perf_counter()
            pipes[m](PROMPT, **SAMPLE, seed=r, batch_size=16, progress=False)
            t2 = time.perf_counter()
            res[m]["batch1_s"].append(t1 - t0)
            res[m]["batch16_per_image_s"].append((t2 - t1) / 16)
    for m in names:
        res[m]["batch1_median_s"] = statistics.median(res[m]["batch1_s"])
        res[m]["batch16_per_image_median_s"] = statistics.median(res[m]["batch16_per_image_s"])
    return res


def cost_ratio(sampling: dict, num: str, den: str) -> dict:
    return {
        k: sampling[num][k] / sampling[den][k]
        for k in ("batch1_median_s", "batch16_per_image_median_s", "gflop_per_image")
    }


def save_plot(
    curves: dict[str, list[dict]],
    path: str,
    presets: dict[str, str] = PRESETS,
    title: str = "latent (f = 4) vs pixel-space UNet: adherence vs training cost",
) -> None:
    fig = plot.figure((1100, 1450), rows=3, title=title)
    panels = (("flops", 1e12, "training TFLOP", True), ("wall_s", 60.0, "training wall time (min)", False))
    for ax, (key, unit, label, logx) in zip(fig.axes[:2], panels, strict=True):
        for k, m in enumerate(curves):
            pts = curves[m]
            xs = [p[key] / unit for p in pts]
            ys = [100 * p["all_correct"] for p in pts]
            # (a rate of 0 has a lower Wilson bound of 0 up to rounding: clipped, matplotlib refuses < 0)
            lo = [max(0.0, 100 * (p["all_correct"] - p["ci95"][0])) for p in pts]
            hi = [max(0.0, 100 * (p["ci95"][1] - p["all_correct"])) for p in pts]
            style = plot.curve_style(k)
            ax.errorbar(xs, ys, yerr=[lo, hi], label=f"{m} ({presets[m]})", capsize=3, **style)
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("validation all correct (%), 95% interval")
        ax.grid(True, color="0.88")
        ax.legend(loc="upper left", fontsize="small")
    # the rate that moves first: colour, with each evaluation's own chance level (dotted)
    ax = fig.axes[2]
    for k, m in enumerate(curves):
        pts = [p for p in curves[m] if math.isfinite(rate_of(p, "color"))]
        xs = [p["flops"] / 1e12 for p in pts]
        style = plot.curve_style(k)
        ax.plot(xs, [rate_of(p, "color") for p in pts], label=f"{m}: colour correct", **style)
        chance = [rate_of(p, "color", chance=True) for p in pts]
        ax.plot(xs, chance, label=f"{m}: its chance level", **{**style, "linestyle": ":", "marker": None})
    ax.set_xscale("log")
    ax.set_xlabel("training TFLOP")
    ax.set_ylabel("colour rate (of objects asked for)")
    ax.grid(True, color="0.88")
    ax.legend(loc="upper left", fontsize="small")
    plot.save_figure(fig, path)


def describe(e: dict) -> str:
    """One line per metric: the level, what each model of the pair needed ("≤": reached at its first
    evaluation) and the ratios num / den ("≥"/"≤": bounds)."""
    if "flops" not in e:
        return f"{e['metric']}: {e['note']}"
    num, den = e["pair"]
    parts = [f"{e['metric']} {100 * e['level']:.1f}% (chance {100 * e['chance']['rate']:.1f}%):"]
    for axis, unit, what in (("flops", 1e12, "TFLOP"), ("wall_s", 60.0, "min"), ("step", 1.0, "steps")):
        d = e[axis]
        need = ", ".join(
            f"{m} {'' if d[m]['measured'] else '≤ '}{d[m]['value'] / unit:.4g}" for m in e["pair"]
        )
        ratio = "unknown" if len(d["ratio_is"]) > 1 else f"{d['ratio_is']} {d['ratio']:.2f}"
        parts.append(f"{what} {need} ({num}/{den} {ratio});")
    return " ".join(parts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--minutes",
        type=float,
        nargs="+",
        default=[60.0],
        metavar="MIN",
        help="training wall time per model: one value for both, or LATENT PIXEL (a model still at chance "
        "can be given longer to find its onset)",
    )
    p.add_argument(
        "--work", default="/tmp/latent-vs-pixel", help="run folders, evaluations (outside the repo)"
    )
    p.add_argument("--n", type=int, default=200, help="validation prompts per evaluation")
    p.add_argument(
        "--points",
        type=int,
        default=10,
        help="evaluation points per model, evenly spaced in training time (and the last checkpoint)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        nargs=2,
        default=(20, 5),
        metavar=("LATENT", "PIXEL"),
        help="steps between the trainers' exports, which the evaluation points are taken from",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="instead of --points: export and evaluate every K steps, both models",
    )
    p.add_argument(
        "--recipe",
        choices=RECIPES,
        default="2h",
        help="2h: the shipped model's 2-hour recipe (exported scenes, padding mask, stage A at σ = 1, then ε "
        "with Min-SNR-5 at a constant lr; the layout completion in the evaluations); onfly: the preset's own "
        "recipe on scenes rendered on the fly (the first run, 2026-12-04)",
    )
    p.add_argument("--scenes", type=int, default=60000, help="2h: training scenes exported (the recipe's)")
    p.add_argument("--stage-a-steps", type=int, default=STAGE_A_STEPS, help="2h: stage A's steps")
    p.add_argument(
        "--pixel-shift",
        type=float,
        default=1.0,
        help="the pixel model's noise table times this (DiscreteVP.shift; 4 = 64/16 keeps the SNR of "
        "4×4-pixel means at the latent's; its runs go to <work>/pixel-shift<α>); 1: the recipe's table",
    )
    p.add_argument(
        "--pixel-objective",
        nargs="+",
        default=[],
        metavar="FIELD=VALUE",
        help="the pixel model's objective fields in place of the recipe's, both stages (e.g. prediction=v "
        "zero_terminal_snr=true weighting=none; its runs go to <work>/pixel-predictionv-…)",
    )
    p.add_argument(
        "--pixel-unet",
        nargs="+",
        default=[],
        metavar="FIELD=VALUE",
        help="the pixel model's UNet fields in place of its preset's, both stages (e.g. "
        "attention_resolutions=[2,4,8,16]; its runs go to <work>/pixel-unet.attention_resolutions2-4-8-16)",
    )
    p.add_argument("--seed", type=int, default=0, help="training seed, both models (onfly)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads everywhere")
    p.add_argument("--repeats", type=int, default=5, help="rounds of the sampling-cost measurement")
    p.add_argument("--json", default=None)
    p.add_argument("--png", default=None)
    args = p.parse_args()
    os.makedirs(args.work, exist_ok=True)
    vae = extract_vae(args.work)
    if not (math.isfinite(args.pixel_shift) and args.pixel_shift > 0):
        p.error(f"--pixel-shift must be a finite number > 0 (1: the recipe's table), got {args.pixel_shift}")
    try:
        pixel = pixel_settings(args.pixel_shift, args.pixel_objective, args.pixel_unet)
    except ValueError as e:
        p.error(str(e))
    folders = {m: model_folder(args.work, m, pixel) for m in MODELS}
    vaes = {"latent": vae, "pixel": None}
    if len(args.minutes) not in (1, 2) or min(args.minutes) <= 0:
        p.error(
            f"--minutes takes one value (both models) or two (latent, pixel), each > 0; got {args.minutes}"
        )
    minutes = dict(zip(MODELS, args.minutes * 2 if len(args.minutes) == 1 else args.minutes, strict=True))
    # per model: train_flags' data, seed and extra flags (stage B's in the 2-hour recipe), what came
    # before its trainer (stage A, the latent cache), and the evaluation's flags
    setup: dict = {
        m: {
            "data": "shapes",
            "seed": args.seed,
            "extra": with_settings([], pixel if m == "pixel" else ()),
            "before": None,
        }
        for m in MODELS
    }
    eval_args = EVAL
    stages_a: dict = {}
    if args.recipe == "2h":
        data = export_data(args.work, args.scenes, args.threads)
        eval_args = [*EVAL, "--complete-prompt", "layout"]
        for m in MODELS:
            a_flags = stage_a_flags(m, args.work, data, vaes[m], pixel)
            stages_a[m] = stage_a(m, a_flags, folders[m], args.threads, args.stage_a_steps)
            b_extra = stage_b_extra(m, args.work, stages_a[m]["export"], pixel)
            setup[m] = {"data": data, "seed": 1, "extra": b_extra}
    dry = {
        m: dry_run(
            train_flags(PRESETS[m], vaes[m], setup[m]["seed"], 1, setup[m]["data"], setup[m]["extra"]),
            folders[m],
            args.threads,
        )
        for m in MODELS
    }
    if args.recipe == "2h":
        enc = encode_flops(args.scenes)
        for m in MODELS:
            a = stages_a[m]
            flops = a["steps"] * dry[m]["gflop_per_step"] * 1e9 + (enc if vaes[m] else 0.0)
            setup[m]["before"] = {"step": a["steps"], "wall_s": a["wall_s"], "flops": flops}
            cache = f" (the latent cache's encoding {enc / 1e12:.1f} of them)" if vaes[m] else ""
            print(f"{m}: stage A {a['steps']} steps, {a['wall_s'] / 60:.1f} min", end="")
            print(f", {flops / 1e12:.1f} TFLOP{cache}")
    for m in MODELS:
        d = dry[m]
        print(f"{m}: {d['parameters']}; {d['gflop_per_step']:.2f} GFLOP per step; "
              f"{d['seconds_per_step']:.2f} s per step in the dry run", flush=True)  # fmt: skip

    # the trainers' budget: each model's minutes less what came before (stage A)
    budget = {m: minutes[m] - (setup[m]["before"] or {"wall_s": 0.0})["wall_s"] / 60 for m in MODELS}
    if min(budget.values()) <= 0:
        p.error(f"--minutes {args.minutes} leaves no time after stage A ({budget})")
    every_s = {m: None if args.eval_every else budget[m] * 60 / args.points for m in MODELS}
    checkpoint_every = {}
    for m, default in zip(MODELS, args.checkpoint_every, strict=True):
        saved = os.path.join(folders[m], "run", "config.json")
        if os.path.exists(saved):  # a started run keeps its interval
            checkpoint_every[m] = json.loads(Path(saved).read_text())["checkpoint_every"]
        else:
            checkpoint_every[m] = args.eval_every or default
    for m in MODELS:
        u = setup[m]
        flags = train_flags(PRESETS[m], vaes[m], u["seed"], checkpoint_every[m], u["data"], u["extra"])
        train(m, flags, budget[m], args, folders[m], every_s[m])

    curves = {
        m: curve(m, folders[m], dry[m]["gflop_per_step"], args.n, args.threads, setup[m]["before"], eval_args)
        for m in MODELS
    }
    equal = {metric: equal_adherence(curves, metric) for metric in ("all_correct", *EASY)}
    print(f"compression factor (64·64·3)/(16·16·4) = {COMPRESSION:g}; FLOPs per step pixel/latent = "
          f"{dry['pixel']['gflop_per_step'] / dry['latent']['gflop_per_step']:.2f}")  # fmt: skip
    for e in equal.values():
        print("equal adherence, " + describe(e), flush=True)
    onsets = {metric: onset(curves, metric) for metric in ("all_correct", *EASY)}
    for o in onsets.values():
        print(describe_onset(o), flush=True)

    finals = {m: checkpoints(folders[m])[-1][1] for m in MODELS if curves[m]}
    sampling = sampling_cost(finals, args.threads, args.repeats) if len(finals) == 2 else None
    if sampling:
        sampling["ratio_pixel_over_latent"] = cost_ratio(sampling, "pixel", "latent")
        for m in MODELS:
            s = sampling[m]
            print(
                f"sampling {m}: {s['batch1_median_s']:.3f} s per image at batch 1, "
                f"{s['batch16_per_image_median_s']:.3f} s at batch 16, "
                f"{s['gflop_per_image']:.1f} GFLOP per image"
            )
    res = {
        "settings": {
            "minutes": minutes,
            "n": args.n,
            "points": None if args.eval_every else args.points,
            "eval_every": args.eval_every or None,
            "checkpoint_every": checkpoint_every,
            "seed": args.seed,
            "threads": args.threads,
            "recipe": args.recipe,
            "scenes": args.scenes if args.recipe == "2h" else None,
            "stage_a_steps": args.stage_a_steps if args.recipe == "2h" else None,
            "pixel_shift": args.pixel_shift,
            "pixel_settings": dict(pixel),
            "lr_schedule": "constant",
            "eval": " ".join([*eval_args, "--seed", str(EVAL_SEED)]),
            "sampling": SAMPLE,
            "work": args.work,
        },
        "compression_factor": COMPRESSION,
        "dry_run": dry,
        "before_trainer": {m: setup[m]["before"] for m in MODELS},
        "flops_per_step_ratio": dry["pixel"]["gflop_per_step"] / dry["latent"]["gflop_per_step"],
        "curves": curves,
        "equal_adherence": equal,
        "onset": onsets,
        "sampling": sampling,
    }
    if args.json:
        write_json(args.json, res)
        print(f"wrote {args.json}")
    if args.png and all(curves.values()):
        save_plot(curves, args.png)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
