"""Step caching (DeepCache, block-residual caching: FORA / TeaCache) and token merging (ToMe for SD):
off is bit-identical, on does fewer full passes and stays close, ToMe's merge/unmerge algebra, and the
model is left as it was.

Tolerances. "Off" and every full pass are compared with torch.equal: the patched forwards run the same
modules in the same order on the same tensors. "On" is compared with a baseline of the same cost: a
cached run of S steps with F full passes must end closer to the plain S-step result than a plain run
of F steps does (the claim of DeepCache §4 / FORA / TeaCache: caching beats cutting steps at equal
compute). ToMe: exact where merging loses nothing (2×2 cells of identical tokens, all sources merged),
and elsewhere a single x̂₀ stays within a bound measured on the shipped model (see the test).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from latentforge import tome
from latentforge.guidance import CFGDenoiser
from latentforge.model_sampling import Denoiser, DiscreteFlow, DiscreteVP
from latentforge.models.dit import DiT, DiTConfig
from latentforge.models.mmdit import MMDiT, MMDiTConfig
from latentforge.models.unet import CrossAttention, UNet, UNetConfig
from latentforge.samplers import get_sampler, sigmas_for
from latentforge.speedups import Speedups, StepClock, applied

SD1_LIKE = UNetConfig(  # 1×1-conv projections, attention at downsampling 1 and 2, 2 res blocks per level
    model_channels=32, channel_mult=(1, 2), num_res_blocks=2, attention_resolutions=(1, 2), num_heads=2,
    context_dim=24, norm_groups=8,
)  # fmt: skip
SDXL_LIKE = UNetConfig(  # linear projections, per-level depth with level 0 empty, label_emb
    model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(2, 4),
    num_head_channels=16, transformer_depth=(0, 1, 2), context_dim=24, use_linear_in_transformer=True,
    num_classes="sequential", adm_in_channels=20, norm_groups=8,
)  # fmt: skip
DIT = DiTConfig(
    input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4, num_classes=10,
    learn_sigma=False,
)  # fmt: skip
MMDIT = MMDiTConfig(
    depth=3, patch_size=2, in_channels=16, out_channels=16, adm_in_channels=16, context_dim=32,
    pos_embed_max_size=8, num_patches=64,
)  # fmt: skip


OFF = Speedups()


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere (the zero inits would make every block the identity), 1/√fan-in scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            scale = p[0].numel() ** -0.5 if p.ndim > 1 else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def _case(name: str):
    """(network, model sampling, latent shape, cond, uncond) of a tiny random model, batch 2."""
    g = torch.Generator().manual_seed(1)
    if name in ("sd1", "sdxl"):
        net = randomize(UNet(SD1_LIKE if name == "sd1" else SDXL_LIKE))

        def cond():
            c = {"context": torch.randn(2, 7, 24, generator=g)}
            return c | ({"y": torch.randn(2, 20, generator=g)} if name == "sdxl" else {})

        return net, DiscreteVP(), (2, 4, 16, 16), cond(), cond()
    if name == "dit":
        return (
            randomize(DiT(DIT)),
            DiscreteVP(),
            (2, 4, 16, 16),
            {"y": torch.tensor([1, 2])},
            {"y": torch.tensor([10, 10])},
        )
    net = randomize(MMDiT(MMDIT))

    def cond():
        return {"y": torch.randn(2, 16, generator=g), "context": torch.randn(2, 5, 32, generator=g)}

    return net, DiscreteFlow(shift=3.0), (2, 16, 16, 16), cond(), cond()


def _sample(case, steps: int, options: Speedups = OFF, sampler: str = "euler"):
    """A CFG (scale 3) sampling run of `steps` steps; (latents, Stats)."""
    net, ms, shape, cond, uncond = case
    sigmas = sigmas_for(sampler, "normal", ms, steps)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    model = CFGDenoiser(Denoiser(net, ms), scale=3.0)
    with torch.no_grad(), applied(net, options, ms.timestep(sigmas[sigmas > 0])) as stats:
        out = get_sampler(sampler)(
            model, x, sigmas, extra_args={"cond": cond, "uncond": uncond}, disable=True
        )
    return out, stats


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _deep_module(net: nn.Module) -> nn.Module:
    """A module that runs in full passes only: the UNet's middle block, the transformers' last block."""
    return {UNet: lambda: net.middle_block, DiT: lambda: net.blocks[-1], MMDiT: lambda: net.joint_blocks[-1]}[
        type(net)
    ]()


def _count(module: nn.Module):
    calls = []
    return calls, module.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))


def _snapshot(net: nn.Module) -> dict:
    """What must not change: every tensor, every module's attributes and hooks."""
    return {
        "state": {k: v.clone() for k, v in net.state_dict().items()},
        "attrs": {n: sorted(vars(m)) for n, m in net.named_modules()},
        "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in net.named_modules()},
    }


def _same(a: dict, b: dict) -> bool:
    return (
        a["state"].keys() == b["state"].keys()
        and all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
        and a["attrs"] == b["attrs"]
        and a["hooks"] == b["hooks"]
    )


CASES = ["sd1", "sdxl", "dit", "mmdit"]
ON = {  # one setting per network kind that caches
    "sd1": [Speedups(cache_interval=2), Speedups(cache_interval=3, cache_depth=3)],
    "sdxl": [Speedups(cache_interval=2), Speedups(cache_interval=3, cache_depth=2)],
    "dit": [Speedups(cache_interval=2), Speedups(cache_interval=3), Speedups(cache_threshold=0.4)],
    "mmdit": [Speedups(cache_interval=2), Speedups(cache_interval=3), Speedups(cache_threshold=0.4)],
}


@pytest.mark.parametrize("name", CASES)
def test_off_is_bit_identical(name):
    case = _case(name)
    plain, _ = _sample(case, 6)
    off = Speedups(cache_interval=1, cache_depth=0, cache_threshold=0.0, tome_ratio=0.0)
    out, stats = _sample(case, 6, off)
    assert torch.equal(out, plain)
    assert stats.calls == 0  # nothing was installed


@pytest.mark.parametrize("name", CASES)
def test_full_passes_are_bit_identical_to_the_model(name):
    """The patched forward's full pass is the model's own forward, bit for bit: the first step (always
    full) of a cached run equals the plain run's first step."""
    case = _case(name)
    for options in ON[name]:
        plain, _ = _sample(case, 1)
        out, stats = _sample(case, 1, options)
        assert torch.equal(out, plain) and stats.full == stats.calls == 1


def test_full_passes_stay_bit_identical_where_convolutions_take_winograd(monkeypatch):
    """DeepCache's own forward opens the Winograd workspace as UNet.forward does (models/winograd.py), so
    its full pass takes the same convolution path: here the tiny UNet's convolutions are made to qualify."""
    from latentforge.models import conv3x3 as conv3x3_module

    used = []
    real = conv3x3_module.winograd_conv3x3
    monkeypatch.setattr(conv3x3_module, "WINOGRAD_MIN_CHANNELS", 8)
    monkeypatch.setattr(conv3x3_module, "winograd_conv3x3", lambda *a: used.append(a[3]) or real(*a))
    case = _case("sd1")
    plain, _ = _sample(case, 1)
    assert used  # the plain forward took the Winograd path
    used.clear()
    out, stats = _sample(case, 1, ON["sd1"][0])
    assert used and torch.equal(out, plain) and stats.full == stats.calls == 1


@pytest.mark.parametrize("name", CASES)
def test_on_does_fewer_full_passes_and_beats_fewer_steps(name):
    case = _case(name)
    net, steps = case[0], 20
    plain, _ = _sample(case, steps)
    for options in ON[name]:
        calls, hook = _count(_deep_module(net))
        try:
            out, stats = _sample(case, steps, options)
        finally:
            hook.remove()
        assert stats.calls == steps and not torch.equal(out, plain) and torch.isfinite(out).all()
        assert len(calls) == stats.full + stats.partial < steps  # counted where the deep part runs
        if options.cache_interval > 1:
            assert stats.full == math.ceil(steps / options.cache_interval)
        cheap, _ = _sample(case, stats.full)  # the same number of full passes spent on fewer steps
        assert _rel(out, plain) < _rel(cheap, plain), options


@pytest.mark.parametrize("sampler", ["heun", "dpm_2"])
def test_steps_count_by_sigma_for_multi_eval_samplers(sampler):
    """Heun (corrector at σ_{i+1}) and DPM-2 (a midpoint) call the model twice per step: the cache counts
    schedule steps, so every N steps is still ⌈steps / N⌉ full passes out of 2·steps − 1 calls."""
    case = _case("sd1")
    _, stats = _sample(case, 10, Speedups(cache_interval=2), sampler)
    assert (stats.calls, stats.full) == (19, 5)


def test_step_clock():
    ts = [999.0, 800.0, 500.0, 100.0]  # t(σ_i) of a 4-step schedule, t rising with σ
    clock = StepClock(ts)
    assert [clock.step(torch.tensor(t)) for t in (999.0, 800.0, 650.0, 500.0, 100.0, 50.0)] == [
        0,
        1,
        1,
        2,
        3,
        3,
    ]
    clock = StepClock(None)  # no schedule: each new timestep is a step
    assert [clock.step(t) for t in (5.0, 5.0, 4.0, 3.0, 3.0)] == [0, 0, 1, 2, 2]


@pytest.mark.parametrize("name", CASES)
def test_model_unchanged_after_the_call(name):
    case = _case(name)
    net = case[0]
    before = _snapshot(net)
    options = ON[name][0]
    if name in ("sd1", "sdxl"):
        options = Speedups(cache_interval=2, tome_ratio=0.5, tome_max_downsample=4)
    _sample(case, 4, options)
    assert _same(_snapshot(net), before)
    with pytest.raises(RuntimeError, match="boom"), applied(net, options):  # however the pass ends
        raise RuntimeError("boom")
    assert _same(_snapshot(net), before)
    plain_again, _ = _sample(case, 3)
    first, _ = _sample(_case(name), 3)  # a fresh model: the patched one behaves as if never patched
    assert torch.equal(plain_again, first)


def test_options_are_checked():
    unet, dit = UNet(SD1_LIKE), DiT(DIT)
    bad = [
        (Speedups(cache_interval=0), None, "cache_interval"),
        (Speedups(cache_interval=2, cache_threshold=0.1), None, "not both"),
        (Speedups(cache_threshold=-1.0), None, "cache_threshold"),
        (Speedups(tome_ratio=0.99), None, "tome_ratio"),
        (Speedups(tome_max_downsample=3), None, "tome_max_downsample"),
        (Speedups(cache_interval=2, cache_depth=len(unet.input_blocks)), unet, "cache_depth"),
        (Speedups(cache_threshold=0.1), unet, "TeaCache"),
        (Speedups(tome_ratio=0.5), dit, "UNets"),
        (Speedups(cache_interval=2, cache_depth=1), dit, "cache_depth"),
    ]
    for options, net, match in bad:
        with pytest.raises(ValueError, match=match):
            options.check(net)


# ---- ToMe ----------------------------------------------------------------------------------------------


def _tokens(b: int, h: int, w: int, c: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, h * w, c, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("hw", [(8, 8), (7, 5)])
def test_merge_unmerge_algebra(hw):
    """Unmerging the merged tokens unchanged: kept sources and untouched destinations come back bit for
    bit, every merged group (a destination and the sources that picked it) gets the group's mean."""
    h, w = hw
    x = _tokens(2, h, w, 16)
    m = tome.Merge(x, h, w, r=int(0.5 * h * w), generator=torch.Generator().manual_seed(0))
    n_dst, n = (h // 2) * (w // 2), h * w
    r = min(int(0.5 * n), n - n_dst)
    assert m.merge(x).shape == (2, n - r, 16)
    y = m.unmerge(m.merge(x))
    for b in range(2):
        src_of = {int(m.src[i]): int(m.dst[t]) for i, t in zip(m.merged[b], m.target[b], strict=True)}
        for i in m.src[m.kept[b]].tolist():
            assert torch.equal(y[b, i], x[b, i])
        for d in m.dst.tolist():
            group = [d] + [s for s, t in src_of.items() if t == d]
            if len(group) == 1:
                assert torch.equal(y[b, d], x[b, d])
            mean = x[b, group].mean(0)
            for k in group:
                torch.testing.assert_close(y[b, k], mean, rtol=1e-6, atol=1e-6)  # float32 summation order


def test_merge_picks_one_destination_per_2x2_cell():
    h, w = 6, 8
    m = tome.Merge(_tokens(1, h, w, 4), h, w, 10, torch.Generator().manual_seed(3))
    cells = {(int(i) // w // 2, int(i) % w // 2) for i in m.dst}
    assert len(m.dst) == len(cells) == (h // 2) * (w // 2)
    assert sorted(m.src.tolist() + m.dst.tolist()) == list(range(h * w))


def test_merged_attention_is_exact_on_duplicated_tokens():
    """Self-attention over tokens that come in identical 2×2 cells, with every source merged (ratio 3/4):
    each distinct key keeps its share of the softmax (4 copies → 1 in every cell), so merging loses
    nothing and ToMe's output equals plain attention to float32 rounding."""
    torch.manual_seed(0)
    attn = CrossAttention(16, 16, heads=2, dim_head=8).eval()
    cells = torch.randn(2, 16, 3, 4)  # [B, C, h/2, w/2]
    x = cells.repeat_interleave(2, -2).repeat_interleave(2, -1).flatten(2).transpose(1, 2)  # [B, 48, 16]
    m = tome.Merge(x, 6, 8, r=36, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(m.unmerge(attn(m.merge(x))), attn(x), rtol=1e-5, atol=1e-5)


def test_tome_merges_tokens_in_the_chosen_levels_only():
    net = randomize(UNet(SD1_LIKE))
    levels = tome.transformer_levels(net)
    assert sorted({ds for _, ds in levels}) == [1, 2]
    x, ctx = torch.randn(1, 4, 16, 16), torch.randn(1, 7, 24)
    seen: dict = {}
    hooks = [
        st.transformer_blocks[0].attn1.to_q.register_forward_hook(
            lambda m, a, o, k=k: seen.setdefault(k, []).append(a[0].shape[1])
        )
        for k, (st, _) in enumerate(levels)
    ]
    try:
        with torch.no_grad():
            plain = net(x, 500.0, ctx)
            seen.clear()
            with tome.patch(net, 0.5, max_downsample=1) as n_blocks:
                merged = net(x, 500.0, ctx)
    finally:
        for h in hooks:
            h.remove()
    assert n_blocks == sum(1 for _, ds in levels if ds == 1)
    for k, (_, ds) in enumerate(levels):  # 16×16 = 256 tokens at ds 1, half merged; 8×8 at ds 2 untouched
        assert seen[k] == ([128] if ds == 1 else [64])
    assert not torch.equal(merged, plain)
    with pytest.warns(UserWarning, match="nothing is merged"), tome.patch(UNet(SDXL_LIKE), 0.5, 1):
        pass


# ---- through the Pipeline, on the shipped model ----------------------------------------------------------

PROMPTS = [
    "a big red circle in the upper left corner on a black background",
    "a green square left of a red triangle",
    "a small yellow star in the center on a blue background",
    "a blue diamond above an orange circle",
]


@pytest.fixture(scope="module")
def pipe():
    from latentforge.pipeline import Pipeline

    return Pipeline.default()


def _latents(pipe, **kw):
    # euler: the measured bounds below are a deterministic solver's (the default model's own default is
    # euler_ancestral, whose fresh noise at each step would be compared too)
    return pipe.sample(PROMPTS, batch_size=len(PROMPTS), seed=7, progress=False, **{"sampler": "euler", **kw})


def test_pipeline_off_is_bit_identical(pipe):
    import numpy as np

    plain = _latents(pipe)
    off = {"cache_interval": 1, "cache_depth": 3, "cache_threshold": 0.0, "tome_ratio": 0.0}
    assert torch.equal(_latents(pipe, **off), plain)
    a = pipe(PROMPTS[0], seed=3, progress=False)[0]
    b = pipe(PROMPTS[0], seed=3, progress=False, **off)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_pipeline_deepcache_on_the_default_model(pipe):
    """20 euler steps with CFG (one batched call per step): a full pass every 3 steps is 7 full passes,
    and the result is closer to the 20-step one than 7 plain steps are (measured: 0.124 vs 0.154)."""
    before = _snapshot(pipe.net)
    plain = _latents(pipe)
    calls, hook = _count(pipe.net.middle_block)
    try:
        cached = _latents(pipe, cache_interval=3)
    finally:
        hook.remove()
    assert len(calls) == 7 and all(b == 2 * len(PROMPTS) for b in calls)  # CFG's halves share a call
    assert not torch.equal(cached, plain)
    assert _rel(cached, plain) < _rel(_latents(pipe, steps=7), plain)
    assert _same(_snapshot(pipe.net), before)
    assert torch.equal(_latents(pipe), plain)  # nothing persists


def test_pipeline_tome_on_the_default_model(pipe):
    """The shipped UNet has attention at 8×8 (ds 2) and 4×4 (ds 4) only. One x̂₀ with half of the 64
    tokens merged at ds 2 differs from the plain one by 0.079 (σ = 1, float32, measured). The bound 0.1
    sits between that and what broken merging gives on the same input: attn1's output put back one
    token off (unmerge rolled by one place) 0.15, merged tokens' output zeroed 0.31, attn1 dropped at
    ds 2 altogether 0.46."""
    from latentforge.speedups import applied as speedups_applied

    cond = pipe.encode_prompt(PROMPTS, 64, 64)
    denoiser = pipe.denoiser()
    x = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    sigma = torch.ones(4)
    seen: list = []
    attn1 = pipe.net.input_blocks[3][1].transformer_blocks[0].attn1  # the first 8×8 transformer
    hook = attn1.to_q.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1]))
    try:
        with torch.no_grad():
            plain = denoiser(x, sigma, **cond)
            with speedups_applied(pipe.net, Speedups(tome_ratio=0.5, tome_max_downsample=2)):
                merged = denoiser(x, sigma, **cond)
    finally:
        hook.remove()
    assert seen == [64, 32]
    assert 0 < _rel(merged, plain) < 0.1


def test_pipeline_hires_fix_caches_each_pass(pipe):
    """The cache lives for one sampling pass: the hires fix's second pass (another size, 14 of 20 steps
    at denoise 0.7) starts a fresh one, so 7 + ⌈14 / 3⌉ = 12 full passes."""
    calls, hook = _count(pipe.net.middle_block)
    try:
        out = pipe.sample(PROMPTS[0], seed=1, progress=False, hires_scale=2, cache_interval=3, tome_ratio=0.3,
                          tome_max_downsample=2)  # fmt: skip
    finally:
        hook.remove()
    assert out.shape[-2:] == (32, 32) and torch.isfinite(out).all() and len(calls) == 12


@pytest.mark.filterwarnings("ignore:no T5-XXL")
@pytest.mark.parametrize("family", ["sd3-medium", "dit-xl-2-256"])
def test_pipeline_block_caching_on_transformer_families(family):
    from tests.test_pipeline import PROMPT, SIZE, tiny

    pipe = tiny(family)
    w, h = SIZE[family]

    def run(**kw):
        return pipe.sample(PROMPT[family], steps=12, width=w, height=h, cfg=4.0, progress=False, **kw)

    plain = run()
    assert torch.equal(run(cache_interval=1, cache_threshold=0.0), plain)
    last = pipe.net.joint_blocks[-1] if family == "sd3-medium" else pipe.net.blocks[-1]
    for kw, full in [({"cache_interval": 3}, 4), ({"cache_threshold": 5.0}, None)]:
        calls, hook = _count(last)
        try:
            out = run(**kw)
        finally:
            hook.remove()
        assert torch.isfinite(out).all() and not torch.equal(out, plain)
        assert len(calls) == full if full else 2 <= len(calls) < 12  # first and last steps always run


# ---- the CLI ---------------------------------------------------------------------------------------------


def test_cli_generate_flags(tmp_path, capsys):
    from latentforge.cli import main
    from latentforge.infotext import read_png

    out = tmp_path / "out"
    flags = ["--cache-interval", "3", "--tome-ratio", "0.3", "--tome-max-downsample", "2"]
    assert main(["generate", "a red circle", "--out", str(out), "--quiet", *flags]) == 0
    (png,) = out.glob("*.png")
    meta = read_png(str(png))
    assert "Token merging ratio: 0.3" in meta["parameters"]  # A1111's infotext field
    exact = meta["latentforge"]
    assert (exact["cache_interval"], exact["tome_ratio"], exact["tome_max_downsample"]) == (3, 0.3, 2)
    for bad, match in [
        (["--cache-interval", "0"], "--cache-interval"),
        (["--cache-interval", "2", "--cache-threshold", "0.1"], "not both"),
        (["--tome-ratio", "1.5"], "--tome-ratio"),
        (["--tome-max-downsample", "3"], "--tome-max-downsample"),
        (["--cache-interval", "2", "--cache-depth", "9"], "cache_depth"),
    ]:
        capsys.readouterr()
        assert main(["generate", "a red circle", "--out", str(out), "--quiet", *bad]) == 2
        assert match in capsys.readouterr().err
