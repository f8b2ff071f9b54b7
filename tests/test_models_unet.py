"""LDM/SGM UNet: preset key layouts vs the real checkpoints, and numerics vs diffusers on tiny models.

Parity path: our state dict → `diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint` (with the
config from `create_unet_diffusers_config_from_ldm`, fed the same fields as the original YAML) →
`diffusers.UNet2DConditionModel.load_state_dict(strict=True)` → same inputs → outputs compared in float64.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from latentforge.models.unet import (
    PRESETS,
    UNet,
    UNetConfig,
    sdxl_refiner_vector,
    sdxl_vector,
    timestep_embedding,
)

KEYS = Path(__file__).parent / "data" / "checkpoint_keys"
PREFIX = "model.diffusion_model."

SD1_LIKE = UNetConfig(  # 1x1-conv projections, num_heads rule, 2 res blocks, attention at every level
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=2,
    attention_resolutions=(1, 2),
    num_heads=2,
    transformer_depth=1,
    context_dim=24,
)
SD2_LIKE = UNetConfig(  # linear projections, num_head_channels rule, depth 2, no attention at level 0
    model_channels=32,
    channel_mult=(1, 2, 2),
    num_res_blocks=1,
    attention_resolutions=(2, 4),
    num_head_channels=16,
    transformer_depth=2,
    context_dim=40,
    use_linear_in_transformer=True,
)
# 8 GroupNorm groups (diffusers: norm_num_groups=8), as the default model's UNet (presets.SHAPES64)
SD2_LIKE_G8 = dataclasses.replace(SD2_LIKE, norm_groups=8)
POOLED = 16
SDXL_LIKE = UNetConfig(  # per-level depth incl. 0 (unused level 0, as in SDXL), middle = last, label_emb
    model_channels=32,
    channel_mult=(1, 2, 2),
    num_res_blocks=1,
    attention_resolutions=(2, 4),
    num_head_channels=16,
    transformer_depth=(0, 1, 2),
    context_dim=48,
    use_linear_in_transformer=True,
    num_classes="sequential",
    adm_in_channels=POOLED + 6 * 256,
)


def read_keys(name: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in (KEYS / f"{name}.txt").read_text().splitlines():
        key, shape = line.split("\t")
        out[key.removeprefix(PREFIX)] = tuple(int(v) for v in re.findall(r"\d+", shape))
    return out


@pytest.mark.parametrize(
    "preset, keyfile, params",
    [
        ("sd15", "sd1_unet_ldm", 859_520_964),
        ("sd21", "sd2_unet_ldm", 865_910_724),
        ("sdxl-base", "sdxl_base_unet_sgm", 2_567_463_684),
        ("sdxl-refiner", "sdxl_refiner_unet_sgm", 2_259_526_660),
    ],
)
def test_preset_matches_checkpoint_layout(preset, keyfile, params):
    with torch.device("meta"):
        model = UNet(PRESETS[preset])
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ref = read_keys(keyfile)
    assert sorted(set(ref) - set(got)) == [] and sorted(set(got) - set(ref)) == []
    assert {k: s for k, s in got.items() if s != ref[k]} == {}
    assert list(got) == list(ref)  # same order as the upstream module tree
    assert sum(p.numel() for p in model.parameters()) == params  # architectures.md §6 (M)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Replace the zero-inits (out_layers.3, proj_out, out.2) by random weights so every path matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, (nn.Linear, nn.Conv2d)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(fan_in))
                if m.bias is not None:
                    m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    return model


def tiny(cfg: UNetConfig, dtype=torch.float64) -> UNet:
    torch.manual_seed(0)
    return randomize(UNet(cfg)).to(dtype).eval()


def to_diffusers(model: UNet, text_time: bool = False):
    """Convert with diffusers' own single-file code path, as for an original `.ckpt`."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        create_unet_diffusers_config_from_ldm,
    )

    params = dataclasses.asdict(model.config)
    for k in ("num_heads", "num_head_channels"):
        if params[k] == -1:
            del params[k]
    if params["num_classes"] is None:
        del params["num_classes"]
    original = {
        "model": {
            "params": {
                "unet_config": {"params": params},
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
            }
        }
    }
    ckpt = {PREFIX + k: v for k, v in model.state_dict().items()}
    config = create_unet_diffusers_config_from_ldm(original, ckpt, image_size=64)
    if text_time:  # what diffusers infers for the real SDXL context widths (2048 / 1280)
        config.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=256)
    config["norm_num_groups"] = model.config.norm_groups  # not read from the ldm config by diffusers
    ref = UNet2DConditionModel(**config)
    ref.load_state_dict(convert_ldm_unet_checkpoint(ckpt, config), strict=True)
    return ref.to(next(model.parameters()).dtype).eval()


def inputs(cfg: UNetConfig, b=2, h=8, w=8, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.in_channels, h, w, generator=g, dtype=dtype)
    context = torch.randn(b, 7, cfg.context_dim, generator=g, dtype=dtype)
    t = torch.tensor([17.25, 503.5, 999.0, 0.0][:b], dtype=torch.float64)  # fractional timesteps
    return x, t, context


@pytest.mark.parametrize(
    "cfg", [SD1_LIKE, SD2_LIKE, SD2_LIKE_G8], ids=["sd1-like", "sd2-like", "sd2-like-8-groups"]
)
@pytest.mark.parametrize("hw", [(8, 8), (9, 7)], ids=["8x8", "9x7"])
def test_matches_diffusers(cfg, hw):
    # float64 on both sides: differences are only summation order (~1e-13); the float32 timestep
    # sinusoid is computed identically by both (float32 args, then cast).
    model = tiny(cfg)
    ref = to_diffusers(model)
    x, t, context = inputs(cfg, h=hw[0], w=hw[1])
    with torch.no_grad():
        out = model(x, t, context)
        expected = ref(x, t, encoder_hidden_states=context).sample
    assert out.shape == x.shape
    assert (out - expected).abs().max().item() < 1e-10 * expected.abs().max().item()


def test_context_mask_matches_diffusers_encoder_attention_mask():
    # A key mask on the cross-attention (mask_text_padding) ↔ diffusers' encoder_attention_mask (1 keep,
    # 0 discard), per row: row 0 keeps its first 3 of 7 tokens, row 1 its first 6.
    cfg = dataclasses.replace(SD2_LIKE_G8, mask_text_padding=True)
    model = tiny(cfg)
    ref = to_diffusers(model)
    x, t, context = inputs(cfg, h=9, w=7)
    keep = torch.arange(7)[None, :] < torch.tensor([[3], [6]])  # (2, 7) bool
    with torch.no_grad():
        out = model(x, t, context, context_mask=keep)
        expected = ref(x, t, encoder_hidden_states=context, encoder_attention_mask=keep.double()).sample
        unmasked = model(x, t, context)
    assert (out - expected).abs().max().item() < 1e-10 * expected.abs().max().item()
    assert (out - unmasked).abs().max().item() > 1e-3 * expected.abs().max().item()  # the mask does act


def test_context_mask_is_the_same_as_leaving_the_tokens_out():
    # softmax over the kept keys only: a row's masked tokens cannot change its output, whatever they hold,
    # and a row that keeps all its tokens equals the unmasked call.
    model = tiny(SD1_LIKE)
    x, t, context = inputs(SD1_LIKE)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[0, 4:] = False
    other = context.clone()
    other[0, 4:] = torch.randn(3, SD1_LIKE.context_dim, dtype=context.dtype) * 10
    with torch.no_grad():
        a = model(x, t, context, context_mask=keep)
        b = model(x, t, other, context_mask=keep)
        short = model(x[:1], t[:1], context[:1, :4])
        full = model(x, t, context)
    assert (a - b).abs().max().item() < 1e-12
    assert (a[:1] - short).abs().max().item() < 1e-10 * short.abs().max().item()
    assert (a[1:] - full[1:]).abs().max().item() < 1e-10 * full.abs().max().item()


@pytest.mark.parametrize(
    "mask, why",
    [
        (torch.ones(2, 7), "bool"),  # float, not bool
        (torch.ones(2, 6, dtype=torch.bool), "bool"),  # the wrong length
        (torch.tensor([[True] * 7, [False] * 7]), "no token"),  # a row with nothing to attend to
    ],
)
def test_context_mask_refuses_what_has_no_meaning(mask, why):
    model = tiny(SD1_LIKE)
    x, t, context = inputs(SD1_LIKE)
    with pytest.raises(ValueError, match=why):
        model(x, t, context, context_mask=mask)


def test_matches_diffusers_float32_integer_timesteps():
    # float32: SDPA / conv accumulation order differs between the two models: ~1e-6 relative.
    model = tiny(SD1_LIKE, torch.float32)
    ref = to_diffusers(model)
    x, _, context = inputs(SD1_LIKE, dtype=torch.float32)
    t = torch.tensor([3, 981])
    with torch.no_grad():
        out, expected = model(x, t, context), ref(x, t, encoder_hidden_states=context).sample
    assert (out - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


def test_sdxl_like_label_emb_matches_diffusers_projection():
    # label_emb.0.{0,2} on an arbitrary y ↔ diffusers' class_embed_type="projection" (what its config
    # builder picks for a "sequential" UNet whose context width is not SDXL's).
    model = tiny(SDXL_LIKE)
    ref = to_diffusers(model)
    x, t, context = inputs(SDXL_LIKE, h=9, w=7)
    y = torch.randn(2, SDXL_LIKE.adm_in_channels, dtype=torch.float64)
    with torch.no_grad():
        out = model(x, t, context, y=y)
        expected = ref(x, t, encoder_hidden_states=context, class_labels=y).sample
    assert (out - expected).abs().max().item() < 1e-10 * expected.abs().max().item()


def test_sdxl_like_vector_matches_diffusers_text_time():
    # y = sdxl_vector(pooled, size, crop, target) ↔ diffusers' addition_embed_type="text_time" with
    # text_embeds=pooled and time_ids=(orig_h, orig_w, crop_top, crop_left, target_h, target_w).
    model = tiny(SDXL_LIKE)
    ref = to_diffusers(model, text_time=True)
    x, t, context = inputs(SDXL_LIKE)
    pooled = torch.randn(2, POOLED, dtype=torch.float64)
    y = sdxl_vector(pooled, (1024, 768), (12, 0), (896, 1152))
    time_ids = torch.tensor([[1024, 768, 12, 0, 896, 1152]] * 2, dtype=torch.float64)
    with torch.no_grad():
        out = model(x, t, context, y=y)
        cond = {"text_embeds": pooled, "time_ids": time_ids}
        expected = ref(x, t, encoder_hidden_states=context, added_cond_kwargs=cond).sample
    assert y.shape == (2, POOLED + 6 * 256)
    assert (out - expected).abs().max().item() < 1e-10 * expected.abs().max().item()


def test_sdxl_vectors_layout():
    from diffusers.models.embeddings import get_timestep_embedding

    pooled = torch.randn(3, 1280)
    y = sdxl_vector(pooled, (1024, 1024), (0, 0), (1024, 1024))
    assert y.shape == (3, 2816)  # sd_xl_base.yaml adm_in_channels
    ids = torch.tensor([1024.0, 1024, 0, 0, 1024, 1024])
    emb = get_timestep_embedding(ids, 256, flip_sin_to_cos=True, downscale_freq_shift=0).reshape(1, -1)
    torch.testing.assert_close(y, torch.cat([pooled, emb.expand(3, -1)], 1), rtol=0, atol=0)

    per_sample = torch.tensor([[512.0, 640], [1024, 768], [2048, 1536]])
    y = sdxl_refiner_vector(pooled, per_sample, (8, 16), torch.tensor(2.5))
    assert y.shape == (3, 2560)  # sd_xl_refiner.yaml adm_in_channels
    ids = torch.cat([per_sample, torch.tensor([[8.0, 16, 2.5]]).expand(3, -1)], 1)  # (3, 5)
    emb = get_timestep_embedding(ids.flatten(), 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(y, torch.cat([pooled, emb.reshape(3, -1)], 1), rtol=0, atol=0)


def test_timestep_embedding_cos_first():
    t = torch.tensor([0.0, 10.5])
    e = timestep_embedding(t, 8)
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    torch.testing.assert_close(e[:, :4], torch.cos(t[:, None] * freqs))
    torch.testing.assert_close(e[:, 4:], torch.sin(t[:, None] * freqs))


def test_meta_build_and_assign_load_scalar_timestep():
    model = tiny(SD2_LIKE, torch.float32)
    with torch.device("meta"):
        fresh = UNet(SD2_LIKE)
    fresh.load_state_dict(model.state_dict(), strict=True, assign=True)
    x, _, context = inputs(SD2_LIKE, dtype=torch.float32)
    with torch.no_grad():
        a = model(x, 250.0, context)  # a scalar timestep is broadcast over the batch
        b = fresh(x, torch.tensor([250.0, 250.0]), context)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bfloat16_weights_float32_io():
    model = tiny(SD1_LIKE, torch.float32)
    x, t, context = inputs(SD1_LIKE, dtype=torch.float32)
    with torch.no_grad():
        ref = model(x, t, context)
        out = model.to(torch.bfloat16)(x, t, context)
    assert out.dtype == torch.float32  # output in x's dtype; computed in the weights' dtype
    assert (out - ref).abs().max().item() < 0.1 * ref.abs().max().item()


def test_missing_y_is_an_error():
    model = tiny(SDXL_LIKE, torch.float32)
    x, t, context = inputs(SDXL_LIKE, dtype=torch.float32)
    with pytest.raises(ValueError, match="needs y"):
        model(x, t, context)


def test_norm_groups_change_no_key_and_must_divide_the_channels():
    a, b = UNet(SD2_LIKE), UNet(SD2_LIKE_G8)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert {m.num_groups for m in b.modules() if isinstance(m, nn.GroupNorm)} == {8}
    with pytest.raises(ValueError, match="divisible"):
        UNet(dataclasses.replace(SD2_LIKE, norm_groups=5))


def test_feed_forward_inference_path_reuses_scratch_and_matches_the_modules():
    # FeedForward's CPU inference path inside the workspace (two GEMMs into scratch memory, GELU and the
    # product in place) computes net(x): the same products and GELU, another split of the projection, so
    # float32 agrees to rounding (a few ulps of the output: 1e-6 relative) and float64 to 1e-13.
    from latentforge.models.unet import FeedForward
    from latentforge.models.winograd import workspace

    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-13)):
        g = torch.Generator().manual_seed(7)
        ff = FeedForward(24).to(dtype).eval()
        for p in ff.parameters():
            p.data = torch.randn(p.shape, generator=g, dtype=dtype) * 0.3
        x1 = torch.randn(2, 13, 24, generator=g, dtype=dtype)
        x2 = torch.randn(3, 5, 24, generator=g, dtype=dtype)
        with torch.no_grad():
            want1, want2 = ff.net(x1), ff.net(x2)
            assert torch.equal(ff(x1), want1)  # outside a workspace: the modules as they are
            with workspace():
                got1 = ff(x1)
                kept = got1.clone()
                got2 = ff(x2)  # the same scratch memory, reused
        assert torch.equal(got1, kept)  # the output is a fresh tensor, not a view of the scratch
        for got, want in ((got1, want1), (got2, want2)):
            assert got.shape == want.shape
            assert (got - want).abs().max() <= tol * want.abs().max()

    # A hook on one of its layers (as a LoRA's) sees what it expects: the modules' own path.
    seen = []
    ff.net[2].register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    with torch.no_grad(), workspace():
        ff(x1)
    assert len(seen) == 1 and torch.equal(seen[0], ff.net[1](ff.net[0](x1)))
