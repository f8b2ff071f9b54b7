"""DiT (original layout): checkpoint keys, adaLN-Zero init, pos-embed closed form, diffusers parity."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

from latentforge.models.dit import PRESETS, DiT, DiTConfig, sincos_pos_embed_2d
from latentforge.models.embeddings import timestep_embedding

KEYS_DIR = Path(__file__).parent / "data" / "checkpoint_keys"

TINY = DiTConfig(
    input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10
)


def read_key_list(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """`key<TAB>(shape)` lines of a reference listing (copied from shared/reference/checkpoint-keys)."""
    out = []
    for line in (KEYS_DIR / name).read_text().splitlines():
        if line.strip():
            key, shape = line.split("\t")
            out.append((key, tuple(ast.literal_eval(shape))))
    return out


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (the zero adaLN-Zero init would hide most of the network), pos_embed kept."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
    return model


# ----------------------------------------------------------------------------------------------------
# Layout


def test_dit_xl2_256_state_dict_matches_released_checkpoint():
    with torch.device("meta"):
        model = DiT(PRESETS["dit-xl-2-256"])
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == read_key_list("dit_xl2_256.txt")  # same keys, shapes and order; 292 tensors


def test_dit_xl2_512_preset_differs_only_in_pos_embed():
    with torch.device("meta"):
        sd = DiT(PRESETS["dit-xl-2-512"]).state_dict()
    ref = dict(read_key_list("dit_xl2_256.txt"))
    assert sd.keys() == ref.keys()
    assert tuple(sd["pos_embed"].shape) == (1, 1024, 1152)  # 64² latent / 2² patches
    assert all(tuple(v.shape) == ref[k] for k, v in sd.items() if k != "pos_embed")


def test_parameter_count_matches_paper():
    # architectures.md §3: DiT-XL/2 has 674,834,720 trainable parameters (675,129,632 with pos_embed).
    with torch.device("meta"):
        model = DiT(PRESETS["dit-xl-2-256"])
    n = sum(p.numel() for p in model.parameters())
    assert n == 674_834_720
    assert n + model.pos_embed.numel() == 675_129_632


def test_meta_build_then_assign_load_roundtrip():
    # The loading path of the project: build on meta, load_state_dict(strict, assign) -- pos_embed included.
    src = randomize(DiT(TINY)).eval()
    with torch.device("meta"):
        model = DiT(TINY)
    model.load_state_dict(src.state_dict(), strict=True, assign=True)
    model.eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0]), torch.tensor([5, 10])
    assert torch.equal(model(x, t, y), src(x, t, y))


def test_learn_sigma_off_and_no_null_class():
    cfg = DiTConfig(**{**TINY.__dict__, "learn_sigma": False, "class_dropout_prob": 0.0})
    model = DiT(cfg)
    assert model.y_embedder.embedding_table.weight.shape == (10, 64)
    assert model.final_layer.linear.weight.shape == (2 * 2 * 4, 64)
    out = randomize(model).eval()(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 500.0]), torch.tensor([0, 9]))
    assert out.shape == (2, 4, 8, 8)


# ----------------------------------------------------------------------------------------------------
# Init and embeddings


def test_fresh_dit_outputs_exactly_zero():
    # adaLN-Zero (paper §3.2): modulations and the final linear start at zero.
    torch.manual_seed(0)
    model = DiT(TINY).eval()
    out = model(torch.randn(3, 4, 8, 8), torch.tensor([0, 10, 999]), torch.tensor([1, 2, 10]))
    assert out.shape == (3, 8, 8, 8)
    assert torch.equal(out, torch.zeros_like(out))
    for block in model.blocks:  # each block is the identity at init
        x = torch.randn(3, 16, 64)
        assert torch.equal(block(x, torch.randn(3, 64)), x)


def test_pos_embed_closed_form():
    # Token k = i·G + j; channels [0, D/4) sin(j·ω), [D/4, D/2) cos(j·ω), [D/2, 3D/4) sin(i·ω),
    # [3D/4, D) cos(i·ω), ω_m = 10000^(-m/(D/4)) -- the original's meshgrid(w, h) puts the column first.
    d, g = 32, 5
    expected = torch.empty(g * g, d, dtype=torch.float64)
    q = d // 4
    for i in range(g):
        for j in range(g):
            for m in range(q):
                w = 10000 ** (-m / q)
                expected[i * g + j, [m, q + m, 2 * q + m, 3 * q + m]] = torch.tensor(
                    [math.sin(j * w), math.cos(j * w), math.sin(i * w), math.cos(i * w)], dtype=torch.float64
                )
    torch.testing.assert_close(sincos_pos_embed_2d(d, g), expected, atol=1e-12, rtol=0)
    model = DiT(DiTConfig(**{**TINY.__dict__, "input_size": 10}))  # grid 5, D 64
    assert model.pos_embed.dtype == torch.float32
    torch.testing.assert_close(model.pos_embed[0].double(), sincos_pos_embed_2d(64, 5), atol=1e-7, rtol=0)


def test_timestep_embedding_is_cos_then_sin():
    t = torch.tensor([0.0, 3.0, 999.0])
    emb = timestep_embedding(t, 8)
    freqs = torch.tensor([10000 ** (-i / 4) for i in range(4)])
    torch.testing.assert_close(
        emb, torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], 1)
    )


def test_label_dropout_only_in_training():
    cfg = DiTConfig(**{**TINY.__dict__, "class_dropout_prob": 1.0})
    emb = DiT(cfg).y_embedder
    labels = torch.tensor([0, 3, 7])
    null = emb.embedding_table.weight[10].expand(3, -1)
    assert torch.equal(emb.train()(labels), null)
    assert torch.equal(emb.eval()(labels), emb.embedding_table.weight[labels])


# ----------------------------------------------------------------------------------------------------
# Numerics against diffusers' DiTTransformer2DModel


def original_to_diffusers(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """The original DiT -> diffusers key mapping (diffusers scripts/convert_dit_to_diffusers.py and the
    DiTTransformer2DModel layout). Diffusers gives every block its own copy of the timestep and label
    embedders (`norm1.emb`), uses the first block's copy for the final layer, and recomputes pos_embed
    (a non-persistent buffer there), so the original pos_embed is dropped."""
    out = {
        "pos_embed.proj.weight": sd["x_embedder.proj.weight"],
        "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
        "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
        "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": sd["final_layer.linear.weight"],
        "proj_out_2.bias": sd["final_layer.linear.bias"],
    }
    for n in range(depth):
        b, o = f"blocks.{n}.", f"transformer_blocks.{n}."
        emb = o + "norm1.emb."
        for w in ("weight", "bias"):
            out[emb + f"timestep_embedder.linear_1.{w}"] = sd[f"t_embedder.mlp.0.{w}"]
            out[emb + f"timestep_embedder.linear_2.{w}"] = sd[f"t_embedder.mlp.2.{w}"]
            out[o + f"norm1.linear.{w}"] = sd[b + f"adaLN_modulation.1.{w}"]
            q, k, v = sd[b + f"attn.qkv.{w}"].chunk(3, dim=0)
            out[o + f"attn1.to_q.{w}"], out[o + f"attn1.to_k.{w}"], out[o + f"attn1.to_v.{w}"] = q, k, v
            out[o + f"attn1.to_out.0.{w}"] = sd[b + f"attn.proj.{w}"]
            out[o + f"ff.net.0.proj.{w}"] = sd[b + f"mlp.fc1.{w}"]
            out[o + f"ff.net.2.{w}"] = sd[b + f"mlp.fc2.{w}"]
        out[emb + "class_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"]
    return out


def make_diffusers_peer(cfg: DiTConfig, sd: dict[str, torch.Tensor]):
    diffusers = pytest.importorskip("diffusers")
    peer = diffusers.DiTTransformer2DModel(
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        num_layers=cfg.depth,
        sample_size=cfg.input_size,
        patch_size=cfg.patch_size,
        num_embeds_ada_norm=cfg.num_classes,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        norm_eps=1e-6,  # DiT's LayerNorms use eps 1e-6 (diffusers' default is 1e-5)
    )
    peer.load_state_dict(original_to_diffusers(sd, cfg.depth), strict=True)
    return peer.eval()


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_matches_diffusers_dit(dtype, tol):
    model = randomize(DiT(TINY)).eval()
    peer = make_diffusers_peer(TINY, model.state_dict())
    # diffusers' DiT timestep sinusoid uses downscale_freq_shift=1 (frequencies 10000^(-i/(half-1))); the
    # original divides by half. Align the peer with the original before comparing.
    for block in peer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    model, peer = model.to(dtype), peer.to(dtype)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=g, dtype=dtype)
    t = torch.tensor([0, 421, 999])
    y = torch.tensor([0, 7, 10])  # 10 = the null class
    with torch.no_grad():
        ours = model(x, t, y)
        theirs = peer(x, timestep=t, class_labels=y).sample
    assert ours.shape == theirs.shape == (3, 8, 8, 8)  # learned-sigma channels on both sides
    # The outputs are O(10) with random 0.2-std weights; float32 agrees to a few ulps of that after 2 blocks,
    # float64 to rounding only (the timestep sinusoid is float32 on both sides, bit-identical).
    err = (ours - theirs).abs().max().item()
    assert err <= tol * max(1.0, theirs.abs().max().item()), err


def test_diffusers_default_timestep_shift_differs():
    # Documents why the parity test patches the peer: with its default shift the outputs disagree visibly.
    model = randomize(DiT(TINY)).eval()
    peer = make_diffusers_peer(TINY, model.state_dict())
    x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.tensor([3])
    with torch.no_grad():
        assert (model(x, t, y) - peer(x, timestep=t, class_labels=y).sample).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------
# Odd-but-valid shapes and the text variant


@pytest.mark.parametrize("input_size, patch_size", [(6, 2), (8, 4), (5, 1)])
def test_odd_shapes(input_size, patch_size):
    cfg = DiTConfig(**{**TINY.__dict__, "input_size": input_size, "patch_size": patch_size, "num_heads": 2})
    model = randomize(DiT(cfg)).eval()
    out = model(torch.randn(1, 4, input_size, input_size), torch.tensor(37.5), torch.tensor([4]))
    assert out.shape == (1, 8, input_size, input_size) and torch.isfinite(out).all()
    with pytest.raises(ValueError):
        model(torch.randn(1, 4, input_size + patch_size, input_size), torch.tensor([1.0]), torch.tensor([4]))


def test_batch_independence_and_dtype_follows_input():
    torch.manual_seed(0)  # the weights and inputs must not depend on which tests ran before
    model = randomize(DiT(TINY)).eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([5.0, 50.0, 500.0]), torch.tensor([1, 2, 3])
    full = model(x, t, y)
    one = model(x[1:2], t[1:2], y[1:2])
    # Batched and single GEMMs/SDPA block their float32 sums differently: each is ~1e-6·max|out| from the
    # float64 result (measured 1.9e-5 at max|out| = 18.5), so they may differ by that much; cross-talk
    # between batch entries would show at the scale of the output itself.
    scale = float(full.detach().abs().max())
    torch.testing.assert_close(full[1:2], one, atol=2e-6 * scale, rtol=1e-5)
    assert model(x.double(), t, y).dtype == torch.float64  # float32 weights, float64 caller


TEXT = DiTConfig(**{**TINY.__dict__, "context_dim": 24, "pooled_dim": 16})


def test_text_variant_layout():
    keys = DiT(TEXT).state_dict().keys()
    assert not any(k.startswith("y_embedder.embedding_table") for k in keys)
    for k in (
        "y_embedder.mlp.0.weight",
        "y_embedder.mlp.2.weight",
        "blocks.1.norm_cross.weight",
        "blocks.1.cross_attn.q.weight",
        "blocks.1.cross_attn.kv.weight",
        "blocks.1.cross_attn.proj.weight",
    ):
        assert k in keys
    assert DiT(TEXT).blocks[0].cross_attn.kv.weight.shape == (2 * 64, 24)
    # class-conditional layout has none of the text modules
    assert not any("cross" in k for k in DiT(TINY).state_dict())


def test_text_variant_forward_and_conditioning():
    torch.manual_seed(0)
    fresh = DiT(TEXT).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 900.0])
    ctx, pooled = torch.randn(2, 7, 24), torch.randn(2, 16)
    assert torch.equal(fresh(x, t, pooled, ctx), torch.zeros(2, 8, 8, 8))  # adaLN-Zero init holds here too

    model = randomize(fresh).eval()
    out = model(x, t, pooled, ctx)
    assert out.shape == (2, 8, 8, 8) and torch.isfinite(out).all()
    assert (model(x, t, pooled, torch.randn(2, 7, 24)) - out).abs().max() > 1e-3  # context matters
    assert (model(x, t, torch.randn(2, 16), ctx) - out).abs().max() > 1e-3  # pooled text matters
    assert model(x, t, pooled, torch.randn(2, 3, 24)).shape == out.shape  # any context length
    with pytest.raises(ValueError):
        model(x, t, pooled)

    no_pooled = randomize(DiT(DiTConfig(**{**TEXT.__dict__, "pooled_dim": 0}))).eval()
    assert not hasattr(no_pooled, "y_embedder")
    assert no_pooled(x, t, context=ctx).shape == (2, 8, 8, 8)


@torch.no_grad()
def test_text_context_mask_is_the_same_as_leaving_the_tokens_out():
    # mask_text_padding: the cross-attention's softmax runs over the kept context tokens only, so a row whose
    # last tokens are masked equals the same row called with those tokens cut off (whatever they held), and
    # a row that keeps all its tokens equals the unmasked call. float64: equal to rounding.
    model = randomize(DiT(TEXT)).double().eval()
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64), torch.tensor([10.0, 900.0])
    ctx = torch.randn(2, 7, 24, generator=g, dtype=torch.float64)
    pooled = torch.randn(2, 16, generator=g, dtype=torch.float64)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[0, 4:] = False
    out = model(x, t, pooled, ctx, context_mask=keep)
    cut = model(x[:1], t[:1], pooled[:1], ctx[:1, :4])
    full = model(x, t, pooled, ctx)
    scale = full.abs().max().item()
    assert (out[:1] - cut).abs().max().item() < 1e-12 * scale
    assert (out[1:] - full[1:]).abs().max().item() < 1e-12 * scale
    assert (out[:1] - full[:1]).abs().max().item() > 1e-3 * scale  # the mask does act
