"""Memory: the job's estimate from the shapes, refusing before any work, switching to tiled decoding, and
saving the latents when decoding fails after sampling (so the sampling is not lost)."""

import math
import os

import numpy as np
import pytest
import torch

from latentforge import memory
from latentforge.cli import main
from latentforge.memory import NotEnoughMemory
from latentforge.pipeline import DecodeFailed, Pipeline
from tests.test_pipeline import SIZE, _save, pixels, tiny

ARGS = dict(steps=2, cfg=4.0, progress=False, seed=3)


def count_calls(monkeypatch, pipe):
    calls = []
    net = pipe.net
    original = net.forward
    monkeypatch.setattr(net, "forward", lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    return calls


def avail(monkeypatch, n):
    monkeypatch.setattr(memory, "available_memory", lambda device: n)


def test_estimate_unet_by_formula():
    pipe = tiny("sd15")  # unet(): model_channels 32, channel_mult (1, 2), 1 res block; VAE ch 32, (1, 2)
    est = pipe.estimate_memory(64, 48, batch_size=3, cfg=4.0)
    h, w = 24, 32
    B, s = 6, 4
    skips = 2 * 32 * h * w + 2 * 64 * (h // 2) * (w // 2)
    scratch = 8 * 64 * (h // 2) * (w // 2)  # the feed-forwards' scratch (CPU): attention at ds 2 only
    work = max(16 * 32 * h * w, 16 * 64 * (h // 2) * (w // 2)) + scratch
    assert est.latent == (h, w) and est.denoiser_what == "the UNet"
    assert est.denoiser == s * B * (skips + work)
    # decoder: level 0 at 64x48 with max(32, 64) channels (the upsample from level 1), level 1 at 32x24
    images = 4 * 3 * 3 * 64 * 48
    assert est.decode == 4 * 5 * 64 * 64 * 48 + 2 * images
    assert est.decode_tiled == est.decode + images  # one tile: the whole 24x32 latent
    big = pipe.estimate_memory(512, 512, cfg=1)  # 256x256 latents: tiles of 64x64
    assert big.decode_tiled == 4 * 5 * 64 * 128 * 128 + 3 * 4 * 3 * 512 * 512 < big.decode


def test_estimate_sd15_at_2048_is_the_attention_free_activation_bound(monkeypatch):
    # Real SD1.5 shapes on the meta device: nothing is allocated.
    from latentforge.models.unet import PRESETS

    cfg = PRESETS["sd15"]
    with torch.device("meta"):
        pipe = Pipeline.from_preset("sd15", {"unet": cfg})
    # meta weights: estimate as for the CPU
    monkeypatch.setattr(Pipeline, "device", property(lambda self: torch.device("cpu")))
    est = pipe.estimate_memory(2048, 2048, cfg=7.0)
    h = w = 256
    skips = sum(3 * 320 * m * (h // 2**i) * (w // 2**i) for i, m in enumerate(cfg.channel_mult))
    # the working set and the feed-forwards' scratch (CPU) at the 320-channel level, 65536 tokens
    assert est.denoiser == 4 * 2 * (skips + 16 * 320 * h * w + 8 * 320 * h * w)
    assert 4.5e9 < est.denoiser < 5.5e9  # 4.9 GB: that level dominates
    # The SD VAE: level 0 at 2048² with 256 channels (up.1's upsample), 5 tensors: ~21 GB untiled.
    assert est.decode == 4 * 5 * 256 * 2048 * 2048 + 2 * 4 * 3 * 2048 * 2048
    assert est.decode_tiled < 1.5e9


def test_unfused_attention_adds_the_scores(monkeypatch):
    pipe = tiny("sd15")
    fused = pipe.estimate_memory(64, 48, cfg=1)
    monkeypatch.setattr(memory, "_fused_attention", lambda device: False)
    plain = pipe.estimate_memory(64, 48, cfg=1)
    # attention at ds=2 only (attention_resolutions=(2,)): 12x16 tokens, 64 channels / 16 = 4 heads
    n = 12 * 16
    # the working set is now level 1's (tokens + scores) instead of level 0's (768 tokens, 32 channels)
    assert plain.denoiser - fused.denoiser == 4 * ((16 * 64 * n + 2 * 4 * n * n) - 16 * 32 * 4 * n)
    assert plain.decode - fused.decode == 4 * 2 * (24 * 32) ** 2


@pytest.mark.parametrize("family", ["sd15", "sd3-medium", "dit-xl-2-256"])
def test_refused_before_any_work(monkeypatch, family):
    pipe = tiny(family)
    calls = count_calls(monkeypatch, pipe)
    avail(monkeypatch, 1000)
    w, h = SIZE[family]
    with pytest.raises(NotEnoughMemory) as e:
        pipe(PROMPT_OF(family), width=w, height=h, **ARGS)
    assert calls == []
    msg = str(e.value)
    assert f"{w}x{h} needs about" in msg and "available; use a smaller size" in msg
    assert pipe.estimate_memory(w, h, cfg=4.0).denoiser_what in msg


def PROMPT_OF(family):
    from tests.test_pipeline import PROMPT

    return PROMPT[family]


def test_refused_when_even_tiles_do_not_fit(monkeypatch):
    pipe = tiny("sd15")
    est = pipe.estimate_memory(32, 24, cfg=1.0)  # (without CFG: one row per image, so sampling fits)
    calls = count_calls(monkeypatch, pipe)
    n = min(est.decode, est.decode_tiled) - 1
    assert n >= est.denoiser  # sampling would fit, decoding would not
    avail(monkeypatch, n)
    with pytest.raises(NotEnoughMemory, match="to decode even in tiles"):
        pipe("a cat", width=32, height=24, **(ARGS | dict(cfg=1.0)))
    assert calls == []


def test_tiled_decode_when_untiled_does_not_fit(monkeypatch):
    pipe = tiny("sd15")
    W, H = 160, 136  # 80x68 latents: more than one 64-latent tile
    args = ARGS | dict(cfg=1.0, width=W, height=H)
    est = pipe.estimate_memory(W, H, cfg=1.0)
    assert est.denoiser < est.decode_tiled < est.decode
    used = []
    vae = pipe.vae
    for name in ("decode", "decode_tiled"):
        original = getattr(vae, name)
        monkeypatch.setattr(vae, name, lambda z, _o=original, _n=name, **k: (used.append(_n), _o(z, **k))[1])
    avail(monkeypatch, (est.decode_tiled + est.decode) // 2)
    assert pipe.check_memory(W, H, cfg=1.0) is True
    with pytest.warns(UserWarning, match=f"decoding {W}x{H} in tiles: the whole-image decode needs about"):
        tiled = pixels(pipe("a cat", **args))  # and it says so
    assert used == ["decode_tiled"]
    avail(monkeypatch, None)  # unknown: no check, untiled
    used.clear()
    plain = pixels(pipe("a cat", **args))
    assert used == ["decode"]
    assert tiled.shape == plain.shape == (1, H, W, 3)
    assert np.abs(tiled - plain).mean() < 40  # the same image, up to the tile seams (random weights)


@pytest.mark.parametrize(
    "error", [MemoryError(), RuntimeError("CPU: out of memory trying to allocate 17 GB")]
)
def test_decode_failure_saves_the_latents(monkeypatch, tmp_path, error):
    pipe = tiny("sd15")
    w, h = SIZE["sd15"]
    expected = pixels(pipe("a cat", width=w, height=h, batch_size=2, **ARGS))

    def fail(z, **k):
        raise error

    path = str(tmp_path / "out" / "lat.safetensors")
    with monkeypatch.context() as m:
        m.setattr(pipe.vae, "decode", fail)
        with pytest.raises(DecodeFailed) as e:
            pipe("a cat", width=w, height=h, batch_size=2, latents_path=path, **ARGS)
    assert e.value.path == path and path in str(e.value) and "--decode" in str(e.value)
    assert os.listdir(tmp_path / "out") == ["lat.safetensors"]  # written whole: no temporary file left
    assert np.array_equal(pixels(pipe.decode_file(path)), expected)


def test_decode_failure_default_path_is_in_the_temp_folder(monkeypatch, tmp_path):
    pipe = tiny("sd15")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.setattr(pipe.vae, "decode", lambda z, **k: (_ for _ in ()).throw(MemoryError()))
    with pytest.raises(DecodeFailed) as e:
        pipe("a cat", width=32, height=24, **ARGS)
    assert os.path.dirname(e.value.path) == str(tmp_path) and os.path.isfile(e.value.path)


def test_decode_file_rejects_other_files(tmp_path):
    from latentforge.checkpoint_io import save_state_dict

    pipe = tiny("sd15")
    path = str(tmp_path / "x.safetensors")
    save_state_dict({"latents": torch.zeros(1, 16, 4, 4)}, path)
    with pytest.raises(ValueError, match="not latents"):
        pipe.decode_file(path)


def test_cli_saves_latents_and_decodes_them_again(monkeypatch, tmp_path, capsys):
    from latentforge.models.vae import AutoencoderKL

    path, _ = _save(tiny("sd15"), "sd15", tmp_path)
    out = tmp_path / "out"
    argv = ["generate", "--model", path, "a cat", "--steps", "2", "--seed", "5", "--width", "32",
            "--height", "24", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    good = capsys.readouterr().out.split()
    original = AutoencoderKL.decode
    monkeypatch.setattr(AutoencoderKL, "decode", lambda self, z: (_ for _ in ()).throw(MemoryError()))
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: decoding the 32x24 images failed") and err.count("\n") == 1
    (latents,) = [p for p in out.iterdir() if p.suffix == ".safetensors"]
    assert str(latents) in err
    monkeypatch.setattr(AutoencoderKL, "decode", original)
    assert main(["generate", "--decode", str(latents), "--model", path, "--out", str(out), "--quiet"]) == 0
    (again,) = capsys.readouterr().out.split()
    from PIL import Image

    a, b = Image.open(good[0]), Image.open(again)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and a.text["parameters"] == b.text["parameters"]
    assert again.endswith("-5.png")


def test_available_memory_readers(monkeypatch):
    n = memory.available_memory(torch.device("cpu"))
    if os.path.exists("/proc/meminfo"):
        assert isinstance(n, int) and n > 0
    assert memory.available_memory(torch.device("meta")) is None
    assert math.isfinite(memory.MemoryEstimate(1, "the UNet", 2, 3, (1, 1)).decode)


# -- ControlNets -----------------------------------------------------------------------------------------
# tiny("sd15") at 32x24, a batch of 2 with CFG: 12x16 latents (n0 = 192; level 1: 6x8 = 48), B = 4 rows,
# float32; the control map is 8x the latent: 96x128 pixels.
CN_B, CN_ROWS, N0, N1, HINT_PX = 2, 4, 12 * 16, 6 * 8, 96 * 128


def _control_terms() -> dict[str, int]:
    """memory._controlnets's terms for that job, counted by hand (model_channels 32, channel_mult (1, 2),
    1 res block, fused attention)."""
    skips = 2 * 32 * N0 + 2 * 64 * N1
    residuals = skips + 64 * N1  # one per skip connection, and the middle block's
    # the UNet's largest working set (level 0), and so the ControlNet's, and the feed-forwards' scratch
    # (CPU: attention at level 1 only)
    work = 16 * 32 * N0 + 8 * 64 * N1
    return {
        "call": 4 * CN_ROWS * (2 * residuals + max(work + 32 * N0, residuals)),
        "held": 4 * CN_B * 3 * HINT_PX + 4 * CN_B * 32 * N0,  # a control map (float32), E(c)
        "encode": 4 * CN_B * (memory.HINT_CONV_TENSORS * 16 + 3) * HINT_PX,  # E(·)'s full-size convs
        "unet": 4 * CN_ROWS * (skips + work),
    }


@pytest.fixture
def control_pipe(monkeypatch):
    from latentforge.control_use import ControlNets
    from latentforge.models.controlnet import ControlNet

    pipe = tiny("sd15")
    monkeypatch.setattr(pipe, "controlnets", ControlNets())  # this test's files only
    torch.manual_seed(7)
    nets = [ControlNet.from_unet(pipe.net).eval().requires_grad_(False) for _ in range(2)]
    return pipe, nets, torch.rand(CN_B, 3, 96, 128)


def test_estimate_counts_controlnets(control_pipe, tmp_path, monkeypatch):
    from latentforge.checkpoints_controlnet import PREFIX, save_controlnet
    from latentforge.control_use import Control

    pipe, (cn, cn2), hint = control_pipe
    terms = _control_terms()
    plain = pipe.estimate_memory(32, 24, CN_B, cfg=4.0)
    assert plain.denoiser == terms["unet"] and plain.control == 0
    # a ControlNet object is loaded already: its activations, residuals and control map, not its weights
    one = pipe.estimate_memory(32, 24, CN_B, 4.0, Control(cn, hint))
    assert one.denoiser == terms["held"] + max(terms["encode"], terms["call"])
    assert one.denoiser_what == "the UNet and its ControlNet" and one.control == one.denoiser - plain.denoiser
    assert (one.decode, one.decode_tiled, one.control_weights) == (plain.decode, plain.decode_tiled, 0)
    # two: their maps and E(c) each, one set of residuals (summed); the call is the same
    two = pipe.estimate_memory(32, 24, CN_B, 4.0, [Control(cn, hint), Control(cn2, hint, guess=True)])
    assert two.denoiser - one.denoiser == terms["held"] and "2 ControlNets" in two.denoiser_what
    # (a) a file not loaded yet adds its weights, in the UNet's dtype: at least the parameter bytes
    params = sum(p.numel() * p.element_size() for p in cn.parameters())
    path = str(tmp_path / "cn.safetensors")
    save_controlnet(cn, path)
    file = pipe.estimate_memory(32, 24, CN_B, 4.0, Control(path, hint))
    assert file.denoiser - plain.denoiser >= params
    assert file.control_weights == params and file.denoiser == one.denoiser + params
    assert file.decode == plain.decode + params  # still loaded while decoding
    named_twice = pipe.estimate_memory(32, 24, CN_B, 4.0, [Control(path, hint), Control(path, hint)])
    assert named_twice.control_weights == params  # read once
    pipe.controlnets.load(path, pipe.net)  # read by an earlier call: held already
    assert pipe.estimate_memory(32, 24, CN_B, 4.0, Control(path, hint)) == one
    # torch.load files: at least the file (read whole), at most its size/2 elements at 4 bytes each
    pth = str(tmp_path / "cn.pth")
    torch.save({PREFIX + k: v.half() for k, v in cn.state_dict().items()}, pth)
    est = pipe.estimate_memory(32, 24, CN_B, 4.0, Control(pth, hint))
    assert est.control_weights == 2 * os.path.getsize(pth) >= params
    # the pipeline passes its ControlNets: refused before any work, the file not read
    other = str(tmp_path / "other.safetensors")
    save_controlnet(cn2, other)
    calls = count_calls(monkeypatch, pipe)
    avail(monkeypatch, file.denoiser - 1)  # enough for one loaded ControlNet, not for a file to load
    with pytest.raises(NotEnoughMemory) as e:
        pipe("a cat", width=32, height=24, batch_size=CN_B, controlnet=Control(other, hint), **ARGS)
    assert calls == [] and len(pipe.controlnets._cache) == 1
    msg = str(e.value)
    assert "for the UNet and its ControlNet's activations at 16x12 latents" in msg
    assert f"{memory._gb(params)} of it ControlNet weights to load" in msg and "or fewer ControlNets" in msg


def _peak_bytes(fn) -> int:
    """The most bytes torch's CPU allocator held at once while `fn` ran, above what it held before: the
    profiler's memory events (one per allocation and free, with its size) summed in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    held = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        held += e.nbytes()
        peak = max(peak, held)
    return peak


def test_controlnet_estimate_bounds_the_measured_peak(control_pipe):
    """(b) On the CPU, the peak torch allocates for a denoiser call with ControlNets (their hint encoding
    at the pass's start included) stays under the estimate, and the call alone under its own term."""
    from latentforge.control_use import Control, prepare_controls

    pipe, nets, hint = control_pipe
    terms = _control_terms()
    x, ctx = torch.randn(CN_ROWS, 4, 12, 16), torch.randn(CN_ROWS, 77, 32)
    sigmas = torch.tensor([14.6, 3.0, 0.0])
    t = pipe.model_sampling.timestep(sigmas[:1]).expand(CN_ROWS)
    with torch.no_grad():
        plain = _peak_bytes(lambda: pipe.net(x, t, ctx))
        assert plain <= terms["unet"]  # the UNet's own bound
        for k in (1, 2):
            controls = [Control(net, hint, weight=0.5, guess=i == 1) for i, net in enumerate(nets[:k])]
            est = pipe.estimate_memory(32, 24, CN_B, 4.0, controls)
            prep = prepare_controls(pipe, controls, 32, 24, CN_B, False, True)
            applied = prep.applied(pipe.net, pipe.model_sampling, sigmas)

            def encode_and_call(applied=applied):  # E(c) for each net, then a call
                with applied:
                    pipe.net(x, t, ctx)

            assert _peak_bytes(encode_and_call) <= est.denoiser
            with prep.applied(pipe.net, pipe.model_sampling, sigmas):
                call = _peak_bytes(lambda: pipe.net(x, t, ctx))
            assert plain < call <= terms["call"]  # the ControlNets' residuals add to the UNet's own
