"""The accelerator path, checked without an accelerator: everything on torch's `meta` device.

A meta tensor has a shape, a dtype and a device but no data. Two things a GPU run must never do fail loudly
on it, at the line that does them:
- reading a device value back to the host (`float(t)`, `t.item()`, `if t.all():`), which on CUDA waits for
  every queued kernel: a host sync per step stalls the GPU and breaks CUDA-graph capture;
- mixing a device tensor with a host tensor that is not a 0-dim scalar ("Tensor on device cpu is not on
  the expected device meta"), which on CUDA is the same error: the job would not run at all.
So a job that runs every step on meta runs on CUDA without a per-step sync. The only host reads allowed
are after the last step: the samplers' deferred NaN check (`_CheckedModel.finish`), then the images.
"""

from __future__ import annotations

import copy
import inspect
import traceback

import pytest
import torch
from PIL import Image

from latentforge.guidance import CFGDenoiser
from latentforge.model_sampling import Denoiser, DiscreteFlow, DiscreteVP
from latentforge.offload import Offload
from latentforge.samplers import _RAW, ADAPTIVE, ALL_SAMPLER_NAMES, _CheckedModel, sigmas_for
from tests.test_pipeline import PROMPT, SIZE, TINY, tiny


class _Net(torch.nn.Module):
    """A network with one weight, so it lives on a device, whose output depends on x and t."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, t, **cond):
        return x * self.w * 0.5 + t.reshape(-1, 1, 1, 1) * 1e-3


# dpm_adaptive's step sizes come from the error it measures on the state: a read per step, by design
STEPPED = [n for n in ALL_SAMPLER_NAMES if n not in ADAPTIVE]


@pytest.mark.parametrize("flow", [False, True], ids=["vp", "flow"])
@pytest.mark.parametrize("name", STEPPED)
def test_sampler_loops_read_nothing_back_from_the_device(name, flow):
    ms = DiscreteFlow(shift=3.0) if flow else DiscreteVP()
    model = CFGDenoiser(Denoiser(_Net().to("meta"), ms), 4.0)
    sigmas = sigmas_for(name, "simple" if flow else "karras", ms, 5)  # on the host, as the Pipeline passes
    x = torch.zeros(2, 4, 8, 8, device="meta")
    opts = {"seed": [1, 2]} if "seed" in inspect.signature(_RAW[name]).parameters else {}
    checked = _CheckedModel(model, sigmas, name, deferred=True)
    out = _RAW[name](checked, x * sigmas[0], sigmas, {"cond": {}, "uncond": {}}, None, True, **opts)
    assert out.device.type == "meta" and out.shape == x.shape
    assert len(checked.flags) >= 5  # every model call left its finite flag on the device


def _first_host_read(run) -> list[str]:
    """Run a job on meta; the latentforge frames ("file:function") where it first read a value back."""
    with pytest.raises(RuntimeError, match="meta tensors") as info:
        run()
    frames = traceback.extract_tb(info.value.__traceback__)
    return [f"{f.filename.rsplit('/', 1)[-1]}:{f.name}" for f in frames if "latentforge" in f.filename]


JOBS = ["txt2img", "img2img", "inpaint"]


@pytest.mark.parametrize("job", JOBS)
@pytest.mark.parametrize("family", list(TINY))
def test_a_whole_job_reads_back_only_after_its_last_step(family, job):
    """Text encoding, noise, img2img's VAE encode and masks, CFG, every step: no host read and no stray
    host tensor until the samplers' one deferred NaN check."""
    if job == "inpaint" and family.startswith("dit"):
        pytest.skip("a class-conditional DiT has no inpainting checkpoint")
    pipe = copy.deepcopy(tiny(family)).to("meta")
    w, h = SIZE[family]
    kw = {}
    if job != "txt2img":
        kw = {"init_image": Image.new("RGB", (w, h), (200, 30, 30)), "strength": 0.6}
    if job == "inpaint":
        kw["mask"] = Image.new("L", (w, h), 255)
    frames = _first_host_read(
        lambda: pipe.sample(PROMPT[family], steps=3, width=w, height=h, cfg=4.0, progress=False, **kw)
    )
    assert frames[-1] == "__init__.py:finish", frames


def test_the_default_model_runs_on_meta_until_its_nan_check():
    from latentforge import Pipeline

    pipe = Pipeline.default().to("meta")
    frames = _first_host_read(lambda: pipe.sample("a red circle", steps=4, sampler="dpmpp_2m", progress=0))
    assert frames[-1] == "__init__.py:finish", frames


def test_deferred_nan_check_still_names_the_first_bad_step():
    """Off the CPU the finite flags are read once, after the loop; the error is the one the CPU gives."""
    ms = DiscreteVP()
    sigmas = sigmas_for("euler", "karras", ms, 6)
    calls = []

    def model(x, sigma, **kw):
        calls.append(float(sigma.reshape(-1)[0]))
        return x * (float("nan") if len(calls) >= 3 else 0.5)

    errors = []
    for deferred in (False, True):
        calls.clear()
        checked = _CheckedModel(model, sigmas, "euler", deferred=deferred)
        with pytest.raises(FloatingPointError, match="at step 2 of 6") as info:
            _RAW["euler"](checked, torch.ones(1, 4, 4, 4) * sigmas[0], sigmas, {}, None, True)
            checked.finish()
        errors.append((str(info.value), len(calls)))
    assert errors[0][0] == errors[1][0]
    assert errors[0][1] == 3 and errors[1][1] == 6  # the CPU stops at once; the deferred check after the loop


class _MetaOffload(Offload):
    """Offload to the meta device. Coming home from meta has no data to copy, so the weights come back
    uninitialised (`to_empty`): this checks where each component is when it runs, not the copies (those
    are `test_offload_on_cuda_gives_the_same_images`)."""

    def __init__(self, components):
        self.log = []
        super().__init__("meta", components)

    def move(self, module, device):
        on_meta = next(module.parameters()).device.type == "meta"
        module.to_empty(device=device) if on_meta else module.to(device)

    def use(self, *names):
        super().use(*names)  # then: which components are on the device
        self.log.append(tuple(n for n, m in self.components.items() if next(m.parameters()).is_meta))


@pytest.mark.parametrize("family", ["sd15", "sdxl-base", "sd3-medium", "dit-xl-2-256"])
def test_offload_moves_each_component_to_the_device_before_it_runs_and_one_at_a_time(family):
    pipe = copy.deepcopy(tiny(family))
    pipe.offload = _MetaOffload(pipe.components)
    assert pipe.device.type == "meta"
    assert not any(next(m.parameters()).is_meta for m in pipe.components.values())  # all at home to start
    w, h = SIZE[family]
    init = Image.new("RGB", (w, h), (200, 30, 30))
    frames = _first_host_read(
        lambda: pipe.sample(PROMPT[family], init_image=init, steps=3, width=w, height=h, progress=False)
    )
    assert frames[-1] == "__init__.py:finish", frames  # every network ran on meta, with its inputs there
    encoders = tuple(n for n in pipe.components if n.startswith(("clip", "t5")))
    seen = [r for r in dict.fromkeys(pipe.offload.log) if r]  # each use in order (prompt and negative: one)
    # img2img: the text encoders, then the VAE encodes the init image, then the denoiser, each alone
    assert seen == [r for r in [encoders, ("vae",), (pipe.spec.net,)] if r], seen


def test_offload_refuses_the_cpu_and_to_while_on():
    pipe = copy.deepcopy(tiny("sd15"))
    with pytest.raises(ValueError, match="from host memory to an accelerator, got 'cpu'"):
        pipe.enable_offload("cpu")
    pipe.offload = _MetaOffload(pipe.components)
    with pytest.raises(ValueError, match="offload to meta is on"):
        pipe.to("cpu")


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@cuda
def test_offload_on_cuda_gives_the_same_images():
    pipe = copy.deepcopy(tiny("sd15")).to("cuda")
    w, h = SIZE["sd15"]
    args = dict(steps=4, width=w, height=h, cfg=4.0, seed=3, progress=False)
    plain = pipe.sample(PROMPT["sd15"], **args)
    pipe = copy.deepcopy(tiny("sd15")).enable_offload("cuda")
    moved = pipe.sample(PROMPT["sd15"], **args)
    torch.testing.assert_close(moved, plain, rtol=0, atol=0)
    assert pipe.offload.resident == ("unet",)
    assert next(pipe.vae.parameters()).device.type == "cpu"


@cuda
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "dpmpp_2m_sde", "uni_pc"])
def test_cuda_images_match_the_cpu(sampler):
    """Same seed, same image on either device (noise drawn on the CPU); fp32 kernels differ in rounding."""
    w, h = SIZE["sd15"]
    args = dict(steps=6, width=w, height=h, cfg=4.0, seed=3, sampler=sampler, progress=False)
    cpu = tiny("sd15").sample(PROMPT["sd15"], **args)
    gpu = copy.deepcopy(tiny("sd15")).to("cuda").sample(PROMPT["sd15"], **args)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-3)


def _tiny_images(pipe, seed=3):
    w, h = SIZE["sd15"]
    return pipe.sample(PROMPT["sd15"], steps=3, width=w, height=h, cfg=4.0, seed=seed, progress=False)


def test_channels_last_gives_the_same_images():
    """NHWC weights change the convolutions' summation order only: 1e-5 of the latents' range."""
    ref = _tiny_images(tiny("sd15"))
    pipe = copy.deepcopy(tiny("sd15")).optimize(channels_last=True)
    assert pipe.net.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    out = _tiny_images(pipe)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    with pytest.raises(ValueError, match="compile mode 'fastest' is not known"):
        pipe.optimize(compile="fastest")


@pytest.mark.slow
def test_compiled_denoiser_gives_the_same_images():
    """torch.compile (inductor, CPU here: ~5 min on 2 cores) fuses and reorders float32 arithmetic."""
    ref = _tiny_images(tiny("sd15"))
    pipe = copy.deepcopy(tiny("sd15")).optimize(compile=True)
    out = _tiny_images(pipe)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    assert set(pipe.net.state_dict()) == set(tiny("sd15").net.state_dict())  # keys as in the file


def test_offload_estimate_counts_the_weights_each_phase_moves_in():
    plain = copy.deepcopy(tiny("sd15")).to("meta").estimate_memory(64, 64, 2)  # all there, the same device
    pipe = copy.deepcopy(tiny("sd15"))
    pipe.offload = _MetaOffload(pipe.components)
    moved = pipe.estimate_memory(64, 64, 2)

    def size(m):
        return sum(p.numel() * 4 for p in m.parameters())  # float32

    assert moved.denoiser - plain.denoiser == size(pipe.net)
    assert moved.decode - plain.decode == moved.decode_tiled - plain.decode_tiled == size(pipe.vae)


def test_device_flags_reach_the_pipeline_from_the_cli_and_the_server(tmp_path):
    import numpy as np

    from latentforge.cli import main
    from latentforge.server.app import Models, Settings

    outs = []
    for extra in ([], ["--channels-last"]):
        out = tmp_path / str(len(outs))
        args = ["generate", "a big red circle in the center on a white background", "--steps", "3"]
        assert main([*args, "--seed", "2", "--quiet", "--out", str(out), *extra]) == 0
        outs.append(np.asarray(Image.open(next(out.glob("*.png")))).astype(int))
    assert np.abs(outs[0] - outs[1]).max() <= 1  # the same image, up to rounding of one level
    models = Models(None, placement=Settings(channels_last=True))
    pipe = models.pipeline(models.entries[0]["title"])
    assert pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
