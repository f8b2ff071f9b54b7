"""Reflow (training/reflow.py): the teacher's pairs, training a student on them, and the shipped student.

The pairs are checked against the pipeline itself (each latent is what `Pipeline.sample` gives for the
pair's prompt and seed; each noise is the pipeline's noise for that seed). The straightening itself is
checked where the answer is known in closed form: a two-Gaussian mixture in 2-D, whose exact flow velocity
(gmm.py) is the teacher.
"""

import json
import math
import subprocess
import sys

import pytest
import torch

from latentforge.gmm import GaussianMixture
from latentforge.noise import variation_noise
from latentforge.pipeline import DEFAULT_MODEL, Pipeline
from latentforge.training import reflow


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    pipe = Pipeline.default()
    out = tmp_path_factory.mktemp("pairs")
    index = reflow.make_pairs(pipe, out, n=6, steps=2, cfg=2.0, seed=3, shard=4, batch=4, teacher="default")
    return pipe, out, index


def test_pairs_are_the_teachers_samples_from_their_noise(pairs):
    pipe, out, index = pairs
    assert index["complete"] and index["shards"] == ["pairs-00000.safetensors", "pairs-00001.safetensors"]
    data = reflow.PairsTrain(out, G=2, seed=0)
    assert len(data) == 6
    prompts = reflow.shapes_prompts(6, 3)
    assert data.captions == prompts
    # the pairs were sampled 4 at a time, the reference one at a time: float32 sums that differ by the
    # batch's blocking, on a start noise of scale σ_max (14.6 for an ε teacher on SD's table, 1 for a flow)
    atol = 1e-5 * float(pipe.model_sampling.sigma_max)
    for i in (0, 5):  # one in each shard
        seed = 3 * 1_000_003 + i
        want = pipe.sample(prompts[i], steps=2, sampler="euler", cfg=2.0, seed=seed, progress=False)
        torch.testing.assert_close(data[i]["latent"], want[0].float(), rtol=1e-4, atol=atol)
        noise = variation_noise((1, *index["latent_shape"]), [seed], None, 0.0, None, "cpu")[0]
        assert torch.equal(data[i]["noise"], noise)


def test_an_eps_teacher_gives_pairs_from_the_same_unit_noise(tmp_path):
    # any deterministic sampler is a coupling: an ε-prediction teacher starts from noise·σ_max, and its pair
    # holds the unit noise and its sample (the student learns them as a rectified flow)
    from latentforge.model_sampling import DiscreteVP

    pipe = Pipeline.default()
    pipe.model_sampling = DiscreteVP(prediction="eps")
    index = reflow.make_pairs(pipe, tmp_path, n=2, steps=2, cfg=2.0, seed=5, shard=2, batch=2)
    data = reflow.PairsTrain(tmp_path, G=2, seed=0)
    seed = 5 * 1_000_003 + 1
    want = pipe.sample(
        reflow.shapes_prompts(2, 5)[1], steps=2, sampler="euler", cfg=2.0, seed=seed, progress=False
    )
    # batch of 2 against 1: the same float32 blocking error on a start noise of scale σ_max (14.6) as in the
    # test above (1.5e-5 seen on an AVX2 CPU, within 1e-5 on the AVX-512 ones); a wrong coupling errs by O(1)
    atol = 1e-5 * float(pipe.model_sampling.sigma_max)
    torch.testing.assert_close(data[1]["latent"], want[0].float(), rtol=1e-4, atol=atol)
    noise = variation_noise((1, *index["latent_shape"]), [seed], None, 0.0, None, "cpu")[0]
    assert torch.equal(data[1]["noise"], noise)
    # a stochastic sampler's sample is not a function of the pair's noise: refused, with the choices
    with pytest.raises(ValueError, match="deterministic sampler.*'euler_ancestral'"):
        reflow.make_pairs(pipe, tmp_path / "anc", n=2, steps=2, cfg=2.0, sampler="euler_ancestral")
    assert not (tmp_path / "anc").exists()
    from latentforge.samplers import ALL_SAMPLER_NAMES, STOCHASTIC_SAMPLER_NAMES

    assert STOCHASTIC_SAMPLER_NAMES <= set(ALL_SAMPLER_NAMES) and "ddpm_exact" in STOCHASTIC_SAMPLER_NAMES


def test_pairs_continue_or_cut_short_the_same_recipe_and_refuse_another(pairs):
    pipe, out, _ = pairs
    shard = out / "pairs-00001.safetensors"
    before = shard.stat().st_mtime_ns
    reflow.make_pairs(pipe, out, n=6, steps=2, cfg=2.0, seed=3, shard=4, batch=4, teacher="default")
    assert shard.stat().st_mtime_ns == before  # kept, not made again
    short = tmp_path_factory_copy(out)
    index = reflow.make_pairs(pipe, short, n=4, steps=2, cfg=2.0, seed=3, shard=4, batch=4, teacher="default")
    assert index["shards"] == ["pairs-00000.safetensors"] and len(reflow.PairsTrain(short, 2, 0)) == 4
    with pytest.raises(ValueError, match="another recipe"):
        reflow.make_pairs(pipe, out, n=6, steps=3, cfg=2.0, seed=3, shard=4, batch=4, teacher="default")


def tmp_path_factory_copy(folder):
    """A copy of a pairs folder (the tests share the module's pairs)."""
    import shutil
    import tempfile

    dst = tempfile.mkdtemp()
    shutil.copytree(folder, dst, dirs_exist_ok=True)
    return dst


def test_epochs_shuffle_every_pair_once(pairs):
    _, out, _ = pairs
    data = reflow.PairsTrain(out, G=2, seed=1)
    first = [i for m in range(3) for i in data.global_batch(m, 2)]
    assert sorted(first) == list(range(6))
    assert data.global_batch(0, 2) == reflow.PairsTrain(out, G=2, seed=1).global_batch(0, 2)


def test_an_unfinished_folder_is_refused(tmp_path):
    (tmp_path / reflow.INDEX).write_text(json.dumps({"recipe": {}, "shards": [], "complete": False}))
    with pytest.raises(ValueError, match="not all written"):
        reflow.PairsTrain(tmp_path, G=2, seed=0)


def test_training_on_pairs_runs_and_refuses_caption_dropout(pairs, tmp_path):
    from latentforge.training.config import DenoiserTrainConfig
    from latentforge.training.presets import DENOISER_PRESETS
    from latentforge.training.trainer import train_denoiser

    _, out, _ = pairs
    base = {**DENOISER_PRESETS["shapes64"], "init_from": DEFAULT_MODEL}
    base |= {"data": str(out), "batch_size": 2, "max_steps": 2, "checkpoint_every": 2, "warmup_steps": 1,
             "train_text_encoder": False, "seed": 0, "eval_n": 0}  # fmt: skip
    with pytest.raises(ValueError, match="caption_dropout must be 0"):
        train_denoiser(DenoiserTrainConfig(**{**base, "caption_dropout": 0.1}), str(tmp_path / "a"))
    train_denoiser(DenoiserTrainConfig(**{**base, "caption_dropout": 0.0}), str(tmp_path / "b"))
    assert (tmp_path / "b" / "checkpoints" / "last.safetensors").is_file()


def test_the_cli_writes_pairs(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "latentforge", "reflow-pairs", "--out", str(tmp_path / "p"), "--n", "2",
         "--steps", "1", "--batch", "2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "wrote 2 pairs in 1 shards" in r.stdout and "euler/" in r.stdout  # the model's is euler_ancestral
    bad = subprocess.run([sys.executable, "-m", "latentforge", "reflow-pairs", "--out", str(tmp_path / "q"),
                          "--n", "0"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "--n" in bad.stderr


MIXTURE = GaussianMixture(
    torch.tensor([[-2.0, 0.0], [2.0, 1.0]], dtype=torch.float64),
    torch.full((2, 2), 0.3, dtype=torch.float64),
    torch.tensor([0.5, 0.5], dtype=torch.float64),
)
_D = MIXTURE.denoiser(flow=True)


def _mixture_velocity(x, sigma):
    """The mixture's exact rectified-flow velocity v = (x − D(x, σ))/σ (gmm.py's closed-form denoiser)."""
    return (x - _D(x, sigma.reshape(-1))) / sigma


def _euler(v, x, n):
    sig = torch.linspace(1, 0, n + 1, dtype=torch.float64)
    for a, b in zip(sig[:-1], sig[1:], strict=True):
        x = x + (b - a) * v(x, a.expand(len(x), 1))
    return x


def test_reflow_straightens_the_exact_flow_of_a_mixture():
    # Teacher: the mixture's exact velocity, solved with 200 Euler steps. Its one-step answer from ε is
    # E[x₀] (the mean of the mixture), far from where ε's path ends. A student fitted to the straight lines
    # (ε, z) lands near z in one step: reflow's point (Liu et al. 2022, Theorem 3.3: straight couplings).
    torch.manual_seed(0)
    eps = torch.randn(4096, 2, dtype=torch.float64)
    z = _euler(_mixture_velocity, eps, 200)
    teacher_1 = _euler(_mixture_velocity, eps, 1)
    lin = torch.nn.Linear
    net = torch.nn.Sequential(
        lin(3, 128), torch.nn.SiLU(), lin(128, 128), torch.nn.SiLU(), lin(128, 2)
    ).double()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(1500):
        i = torch.randint(0, len(eps), (256,))
        sig = torch.rand(256, 1, dtype=torch.float64)
        x = (1 - sig) * z[i] + sig * eps[i]
        loss = (net(torch.cat([x, sig], 1)) - (eps[i] - z[i])).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        student_1 = _euler(lambda x, s: net(torch.cat([x, s], 1)), eps, 1)
    err_teacher = (teacher_1 - z).norm(dim=1).mean().item()
    err_student = (student_1 - z).norm(dim=1).mean().item()
    assert err_teacher > 1.5  # the two modes are 4.1 apart: one step lands between them
    assert err_student < 0.25 * err_teacher, (err_student, err_teacher)
    assert math.isfinite(err_student)


def test_a_denoiser_only_file_replaces_the_unet(tmp_path):
    # a student ships as its UNet alone (model.diffusion_model.*); Pipeline.load_denoiser puts it in place
    from latentforge.checkpoint_io import read_state_dict, save_state_dict

    sd = read_state_dict(DEFAULT_MODEL)
    unet = {k: v.clone() for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    key = "model.diffusion_model.out.2.bias"
    unet[key] = unet[key] + 0.25
    path = str(tmp_path / "student.safetensors")
    save_state_dict(unet, path, metadata={"latentforge.defaults": json.dumps({"steps": 4, "cfg": 1.0})})
    from latentforge.model_sampling import DiscreteFlow, DiscreteVP, to_json

    pipe = Pipeline.default()
    own = type(pipe.model_sampling)
    pipe.load_denoiser(path)  # in place
    assert pipe.defaults["steps"] == 4 and pipe.defaults["cfg"] == 1.0 and pipe.source == path
    assert type(pipe.model_sampling) is own  # the file states none: the model's stays
    # a student states its own model sampling (a rectified flow of an ε teacher, or the other way round)
    other = DiscreteFlow(shift=1.0) if own is DiscreteVP else DiscreteVP(prediction="eps")
    meta = {"latentforge.model_sampling": to_json(other)}
    save_state_dict(unet, path, metadata=meta)
    assert type(Pipeline.default().load_denoiser(path).model_sampling) is type(other) is not own
    assert torch.equal(pipe.net.state_dict()["out.2.bias"], unet[key].float())
    with pytest.raises(ValueError, match="not a denoiser-only file"):
        pipe.load_denoiser(DEFAULT_MODEL)
    del unet[key]
    save_state_dict(unet, path)
    with pytest.raises(ValueError, match="does not fit"):
        pipe.load_denoiser(path)
