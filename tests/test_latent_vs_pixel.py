"""benchmarks/latent_vs_pixel.py's reading of two adherence curves: where each model leaves chance for
good, and the bounds that puts on the compute ratio. Synthetic curves whose answers follow by hand."""

import importlib.util
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from latentforge.shapes.scoring import wilson

_spec = importlib.util.spec_from_file_location(
    "latent_vs_pixel", Path(__file__).parent.parent / "benchmarks" / "latent_vs_pixel.py"
)
lvp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lvp)


def point(step: int, flops: float, k: int, kc: int, n: int = 400) -> dict:
    """An evaluation whose colour rate is k/n against a chance rate of kc/n."""
    attr = lambda k: {"color": {"k": k, "n": n, "rate": k / n}}  # noqa: E731
    return {
        "step": step, "flops": flops, "wall_s": 10.0 * step, "n": 200, "all_correct": 0.0,
        "attributes": attr(k), "chance": {"all_correct": 0.0, "n": 200, "attributes": attr(kc)},
    }  # fmt: skip


def test_intervals_apart_is_the_criterion():
    # 100/400 against 80/400: 0.25 [0.21, 0.29] and 0.20 [0.165, 0.24] overlap; 140/400 does not
    assert wilson(100, 400)[0] < wilson(80, 400)[1] < wilson(140, 400)[0]
    assert not lvp.above_chance(point(1, 1.0, 100, 80), "color")
    assert lvp.above_chance(point(1, 1.0, 140, 80), "color")
    assert not lvp.above_chance(point(1, 1.0, 140, 80), "background")  # never scored: not above


def test_one_model_never_leaves_chance_gives_a_lower_bound():
    curves = {
        # an untrained network's blip above chance at its first point is not an onset
        "pixel": [point(5, 1.0, 150, 80), point(50, 10.0, 90, 80), point(100, 20.0, 85, 80)],
        "latent": [point(10, 1.0, 82, 80), point(100, 4.0, 90, 80), point(200, 8.0, 150, 80),
                   point(300, 12.0, 200, 80)],
    }  # fmt: skip
    o = lvp.onset(curves, "color")
    assert o["flops"]["pixel"] == {"after": 20.0, "by": None}
    assert o["flops"]["latent"] == {"after": 4.0, "by": 8.0}
    # pixel needs more than 20, latent at most 8: ratio > 2.5, and nothing bounds it above
    assert o["flops"]["ratio"] == {"above": 2.5}
    assert o["step"]["ratio"] == {"above": 0.5}
    assert "> 2.50" in lvp.describe_onset(o)


def test_both_leave_chance_gives_an_interval():
    curves = {
        "pixel": [point(1, 10.0, 80, 80), point(2, 30.0, 150, 80), point(3, 60.0, 200, 80)],
        "latent": [point(1, 2.0, 80, 80), point(2, 5.0, 150, 80)],
    }
    r = lvp.onset(curves, "color")["flops"]["ratio"]
    # pixel's onset in (10, 30], latent's in (2, 5]: the ratio lies in (10/5, 30/2)
    assert math.isclose(r["above"], 2.0) and math.isclose(r["below"], 15.0)
    # a model above chance from its first point leaves no upper bound on the ratio
    curves["latent"] = [point(1, 2.0, 150, 80)]
    assert lvp.onset(curves, "color")["flops"]["ratio"] == {"above": 5.0}
    # neither leaving chance is said plainly
    flat = {m: [point(1, 1.0, 80, 80)] for m in ("pixel", "latent")}
    assert "not measured" in lvp.onset(flat, "color")["flops"]["ratio"]["note"]


def flag_dict(argv: list[str]) -> dict[str, str | None]:
    """`--key value` pairs of a `train denoiser` command line (None for a switch without a value)."""
    out, k = {}, 0
    while k < len(argv):
        if argv[k].startswith("--"):
            has_value = k + 1 < len(argv) and not argv[k + 1].startswith("--")
            out[argv[k][2:]] = argv[k + 1] if has_value else None
            k += 2 if has_value else 1
        else:
            k += 1
    return out


def script_stages(tmp_path) -> tuple[dict, dict]:
    """Stage A's and stage B's flags as scripts/train_default_2h.sh (no switches: the shipped recipe)
    calls `train denoiser`, every `$PY` call recorded instead of run."""
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    log, stub = tmp_path / "calls.txt", tmp_path / "py.sh"
    stub.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\n')
    stub.chmod(0o755)
    script = Path(__file__).resolve().parent.parent / "scripts" / "train_default_2h.sh"
    env = {**os.environ, "PY": str(stub)}
    subprocess.run(["bash", str(script), str(tmp_path / "runs")], env=env, check=True, capture_output=True)
    calls = [c.split() for c in log.read_text().splitlines() if "train denoiser" in c]
    assert len(calls) == 2
    return flag_dict(calls[0]), flag_dict(calls[1])


PATHS = {"data", "vae", "cache_dir", "init_from", "out"}  # where things are: the benchmark's own folders
QUIET = {"log_every", "sample_every", "quiet", "overwrite"}  # what the trainer prints and writes beside


@pytest.mark.parametrize("model", ["latent", "pixel"])
def test_the_2h_recipe_is_the_scripts(tmp_path, model):
    # the benchmark's --recipe 2h trains both models with the shipped recipe's flags: every flag of the
    # script's two `train denoiser` calls with the same value, but for the pixel model's preset (and no VAE
    # or latent cache), and for stage B's learning-rate schedule and length, which the benchmark replaces
    # by a constant rate for as long as the budget lasts (a checkpoint at step N then is the run of N steps)
    script_a, script_b = script_stages(tmp_path)
    work = str(tmp_path / "work")
    vae = None if model == "pixel" else "v.safetensors"
    bench_a = flag_dict(lvp.stage_a_argv(lvp.stage_a_flags(model, work, "d", vae), 300, "run"))
    extra = lvp.stage_b_extra(model, work, "a.safetensors")
    bench_b = flag_dict(lvp.train_flags(lvp.PRESETS[model], vae, 1, 50, "d", extra))
    latent_only = {"vae", "cache_latents", "cache_dir", "num_workers"}  # the pixel model's PNGs: a worker
    for script, bench, replaced in (
        (script_a, bench_a, set()),
        # (stage B's --out is given where `train` launches it)
        (script_b, bench_b, {"lr_schedule", "min_lr_ratio", "max_steps", "checkpoint_every", "out"}),
    ):
        expected = {k for k in script if model == "latent" or k not in latent_only}
        assert set(bench) - QUIET == expected - (replaced - set(bench))
        for k in expected - PATHS - replaced - {"preset"}:
            assert bench[k] == script[k], k
        assert bench["preset"] == lvp.PRESETS[model]
    assert bench_b["lr_schedule"] == "constant"
    assert script_a["max_steps"] == bench_a["max_steps"] == str(lvp.STAGE_A_STEPS)


def test_pixel_shift_adds_only_the_shift_to_the_pixel_models_stages_and_keeps_its_runs_apart(tmp_path):
    # --pixel-shift α: both of the pixel model's stages get exactly one flag more, --objective.shift α
    # (DiscreteVP.shift), the latent model's flags are untouched, and the shifted runs live in their own
    # folder so that a resumed unshifted run is never continued with another table (or the reverse)
    work = str(tmp_path / "work")
    shifted = lvp.pixel_settings(4.0)
    for model, vae in (("latent", "v.safetensors"), ("pixel", None)):
        plain_a = flag_dict(lvp.stage_a_flags(model, work, "d", vae))
        plain_b = flag_dict(lvp.stage_b_extra(model, work, "a.safetensors"))
        shifted_a = flag_dict(lvp.stage_a_flags(model, work, "d", vae, shifted))
        shifted_b = flag_dict(lvp.stage_b_extra(model, work, "a.safetensors", shifted))
        extra = {"objective.shift": "4"} if model == "pixel" else {}
        assert shifted_a == {**plain_a, **extra} and shifted_b == {**plain_b, **extra}
    assert lvp.model_folder(work, "pixel", lvp.pixel_settings(1.0)) == os.path.join(work, "pixel")
    assert lvp.model_folder(work, "pixel", shifted) == os.path.join(work, "pixel-shift4")
    assert lvp.model_folder(work, "latent", shifted) == os.path.join(work, "latent")


def test_pixel_objective_replaces_the_recipes_fields_in_both_pixel_stages_only(tmp_path):
    # --pixel-objective prediction=v zero_terminal_snr=true weighting=none: the pixel model's stage B loses
    # the recipe's Min-SNR weighting (replaced, not given twice: the trainer takes a flag once), both stages
    # predict v on the zero-terminal-SNR table, stage A keeps its terminal fraction; the latent model's
    # flags are untouched; the run gets its own folder, and every --objective.* flag the trainer reads is
    # a field of ObjectiveConfig, so a typo fails before anything trains
    work = str(tmp_path / "work")
    pixel = lvp.pixel_settings(1.0, ["prediction=v", "zero_terminal_snr=true", "weighting=none"])
    change = {
        "objective.prediction": "v",
        "objective.zero_terminal_snr": "true",
        "objective.weighting": "none",
    }
    for model, vae in (("latent", "v.safetensors"), ("pixel", None)):
        plain_a = flag_dict(lvp.stage_a_flags(model, work, "d", vae))
        plain_b = flag_dict(lvp.stage_b_extra(model, work, "a.safetensors"))
        new_a = lvp.stage_a_flags(model, work, "d", vae, pixel)
        new_b = lvp.stage_b_extra(model, work, "a.safetensors", pixel)
        for flags in (new_a, new_b):
            names = [f for f in flags if f.startswith("--")]
            assert len(names) == len(set(names))
        if model == "latent":
            assert flag_dict(new_a) == plain_a and flag_dict(new_b) == plain_b
            continue
        assert (
            plain_b["objective.weighting"] == "min_snr" and plain_a["objective.terminal_fraction"] == "0.99"
        )
        assert flag_dict(new_a) == {**plain_a, **change}
        assert flag_dict(new_b) == {**plain_b, **change}
    assert lvp.model_folder(work, "pixel", pixel) == os.path.join(
        work, "pixel-predictionv-zero_terminal_snrtrue-weightingnone"
    )
    both = lvp.pixel_settings(4.0, ["prediction=v"])
    assert lvp.model_folder(work, "pixel", both) == os.path.join(work, "pixel-shift4-predictionv")
    for bad in (
        ["predction=v"],
        ["prediction"],
        ["prediction="],
        ["shift=2"],
        ["weighting=none", "weighting=edm"],
    ):
        with pytest.raises(ValueError, match="--pixel-objective"):
            lvp.pixel_settings(4.0, bad)


def test_pixel_unet_replaces_the_presets_fields_and_the_trainer_builds_that_unet(tmp_path):
    # --pixel-unet attention_resolutions=[2,4,8,16]: one flag more in both of the pixel model's stages, none
    # in the latent model's, its own folder; the trainer's own config parser turns the flag into the UNet
    # with transformers at those downsampling factors (a JSON list, as any tuple field on the command line)
    from latentforge.cli import parse_overrides
    from latentforge.training.config import build
    from latentforge.training.presets import DENOISER_PRESETS

    work = str(tmp_path / "work")
    pixel = lvp.pixel_settings(1.0, (), ["attention_resolutions=[2,4,8,16]"])
    for model, vae in (("latent", "v.safetensors"), ("pixel", None)):
        plain_a = flag_dict(lvp.stage_a_flags(model, work, "d", vae))
        new_a = flag_dict(lvp.stage_a_flags(model, work, "d", vae, pixel))
        new_b = flag_dict(lvp.stage_b_extra(model, work, "a.safetensors", pixel))
        extra = {"unet.attention_resolutions": "[2,4,8,16]"} if model == "pixel" else {}
        assert new_a == {**plain_a, **extra}
        assert new_b == {**flag_dict(lvp.stage_b_extra(model, work, "a.safetensors")), **extra}
    flags = parse_overrides(lvp.with_settings([], pixel))
    preset_unet = DENOISER_PRESETS["shapes64-pixel"]["unet"]
    unet = build(type(preset_unet), {"attention_resolutions": flags["unet.attention_resolutions"]})
    assert unet.attention_resolutions == (2, 4, 8, 16) and preset_unet.attention_resolutions == (8, 16)
    assert lvp.model_folder(work, "pixel", pixel) == os.path.join(
        work, "pixel-unet.attention_resolutions2-4-8-16"
    )
    with pytest.raises(ValueError, match="--pixel-unet"):
        lvp.pixel_settings(1.0, (), ["attention_resolution=[2]"])
