"""MMDiT (SD3 / SD3.5): checkpoint layout of the three released models, and numerics against diffusers'
`SD3Transformer2DModel` loaded through diffusers' own single-file converter."""

import ast
from pathlib import Path

import pytest
import torch

from latentforge.models.mmdit import PRESETS, MMDiT, MMDiTConfig, config_from_state_dict

KEYS_DIR = Path(__file__).parent / "data" / "checkpoint_keys"
PREFIX = "model.diffusion_model."
KEY_FILES = {
    "sd3-medium": "sd3_medium_mmdit.txt",
    "sd35-medium": "sd3.5_medium_mmditx.txt",
    "sd35-large": "sd3.5_large_mmdit.txt",
}


def read_key_list(name: str) -> dict[str, tuple[int, ...]]:
    keys = {}
    for line in (KEYS_DIR / name).read_text().splitlines():
        if line.strip():
            key, shape = line.split("\t")
            assert key.startswith(PREFIX)
            keys[key[len(PREFIX) :]] = tuple(ast.literal_eval(shape))
    return keys


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_state_dict_matches_checkpoint_keys(preset):
    with torch.device("meta"):
        model = MMDiT(PRESETS[preset])
    sd = model.state_dict()
    got = {k: tuple(v.shape) for k, v in sd.items()}
    expected = read_key_list(KEY_FILES[preset])
    assert sorted(got.keys() - expected.keys()) == []
    assert sorted(expected.keys() - got.keys()) == []
    assert got == expected
    assert config_from_state_dict(sd) == PRESETS[preset]


# ---- numerics against diffusers -------------------------------------------------------------------------

TINY = dict(patch_size=2, in_channels=16, out_channels=16, adm_in_channels=16, context_dim=32)
TINY_CONFIGS = {
    "plain": MMDiTConfig(depth=2, pos_embed_max_size=8, num_patches=64, **TINY),
    "rms": MMDiTConfig(depth=2, qk_norm="rms", pos_embed_max_size=8, num_patches=64, **TINY),
    "mmditx": MMDiTConfig(
        depth=3, qk_norm="rms", x_block_self_attn_layers=(0, 1), pos_embed_max_size=8, num_patches=64, **TINY
    ),
}


def tiny_pair(cfg: MMDiTConfig, dtype: torch.dtype):
    """A seeded random MMDiT and the diffusers model loaded from its state dict by the diffusers converter."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    torch.manual_seed(0)
    model = MMDiT(cfg)
    with torch.no_grad():  # randomize everything (the default init leaves pos_embed and norm weights trivial)
        for k, t in model.state_dict().items():
            if k.endswith(("ln_q.weight", "ln_k.weight")):
                t.copy_(1 + 0.3 * torch.randn_like(t))
            elif t.ndim >= 2 and k != "pos_embed":  # weights: unit-variance outputs for unit inputs
                t.copy_(torch.randn_like(t) / t[0].numel() ** 0.5)
            else:  # biases, pos_embed
                t.copy_(0.3 * torch.randn_like(t))
    model = model.to(dtype).eval()

    checkpoint = {PREFIX + k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_sd3_transformer_checkpoint_to_diffusers(checkpoint)
    assert checkpoint == {}, f"keys the converter did not consume: {sorted(checkpoint)}"
    ref = SD3Transformer2DModel(
        sample_size=2 * cfg.pos_embed_max_size,
        patch_size=cfg.patch_size,
        in_channels=cfg.in_channels,
        num_layers=cfg.depth,
        attention_head_dim=64,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.context_dim,
        caption_projection_dim=cfg.hidden_size,
        pooled_projection_dim=cfg.adm_in_channels,
        out_channels=cfg.out_channels,
        pos_embed_max_size=cfg.pos_embed_max_size,
        dual_attention_layers=cfg.x_block_self_attn_layers,
        qk_norm="rms_norm" if cfg.qk_norm == "rms" else None,
    )
    ref.load_state_dict(converted, strict=True)
    return model, ref.to(dtype).eval()


def inputs(cfg: MMDiTConfig, hw: tuple[int, int], dtype: torch.dtype, batch: int = 2, n_ctx: int = 7):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, *hw, generator=g, dtype=dtype)
    t = torch.tensor([999.0, 137.5])[:batch]  # both models take the timestep 1000·σ directly
    y = torch.randn(batch, cfg.adm_in_channels, generator=g, dtype=dtype)
    context = torch.randn(batch, n_ctx, cfg.context_dim, generator=g, dtype=dtype)
    return x, t, y, context


def run_ref(ref, x, t, y, context, **kw):
    return ref(hidden_states=x, encoder_hidden_states=context, pooled_projections=y, timestep=t, **kw).sample


@pytest.fixture
def diffusers_rms_in_input_dtype(monkeypatch):
    """diffusers' RMSNorm computes mean(x²) in float32 even for float64 inputs (~1e-7 relative error); the
    sd3.5 reference computes it in the input dtype. Patch that so the float64 comparisons are exact."""
    from diffusers.models.normalization import RMSNorm

    def forward(self, h):
        return torch.nn.functional.rms_norm(h, (h.shape[-1],), self.weight, self.eps)

    monkeypatch.setattr(RMSNorm, "forward", forward)


# float64: both sides compute the same math in a different order (fused vs split qkv, chunked modulation),
# so the difference is rounding only: <= 6e-15 observed at outputs of magnitude ~5, asserted at 1e-12.
@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("hw", [(8, 8), (6, 12), (16, 10)], ids=["square", "wide", "full-height"])
@torch.no_grad()
def test_matches_diffusers_float64(name, hw, diffusers_rms_in_input_dtype):
    cfg = TINY_CONFIGS[name]
    model, ref = tiny_pair(cfg, torch.float64)
    x, t, y, context = inputs(cfg, hw, torch.float64)
    out = model(x, t, y=y, context=context)
    assert out.shape == x.shape and out.dtype == torch.float64
    expected = run_ref(ref, x, t, y, context)
    assert (out - expected).abs().max().item() <= 1e-12


# float32, unpatched diffusers: float32 rounding through 3 blocks, <= 2.4e-6 observed at outputs of ~5.
@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@torch.no_grad()
def test_matches_diffusers_float32(name):
    cfg = TINY_CONFIGS[name]
    model, ref = tiny_pair(cfg, torch.float32)
    x, t, y, context = inputs(cfg, (6, 10), torch.float32)
    out = model(x, t, y=y, context=context)
    expected = run_ref(ref, x, t, y, context)
    assert (out - expected).abs().max().item() <= 1e-5


@torch.no_grad()
def test_skip_layers_matches_diffusers(diffusers_rms_in_input_dtype):
    cfg = TINY_CONFIGS["mmditx"]
    model, ref = tiny_pair(cfg, torch.float64)
    x, t, y, context = inputs(cfg, (8, 6), torch.float64)
    out = model(x, t, y=y, context=context, skip_layers=[1])
    expected = run_ref(ref, x, t, y, context, skip_layers=[1])
    assert (out - expected).abs().max().item() <= 1e-12
    assert (out - model(x, t, y=y, context=context)).abs().max().item() > 1e-3


@torch.no_grad()
def test_pos_embed_is_centre_cropped():
    cfg = TINY_CONFIGS["plain"]
    model = MMDiT(cfg)
    model.pos_embed.copy_(torch.arange(64.0)[None, :, None].expand(1, 64, cfg.hidden_size))
    crop = model.cropped_pos_embed(2, 4)[0, :, 0]  # rows 3..4, cols 2..5 of the 8x8 grid
    assert crop.tolist() == [26, 27, 28, 29, 34, 35, 36, 37]
    with pytest.raises(ValueError):
        model.cropped_pos_embed(9, 2)


@torch.no_grad()
def test_dtype_follows_weights_and_no_context():
    cfg = TINY_CONFIGS["rms"]
    model = MMDiT(cfg).to(torch.bfloat16)
    x, t, y, _ = inputs(cfg, (4, 6), torch.float32, batch=1)
    out = model(x, t, y=y)  # no context tokens: image-only attention
    assert out.shape == (1, 16, 4, 6) and out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@torch.no_grad()
def test_meta_build_loads_original_layout_with_assign():
    cfg = TINY_CONFIGS["mmditx"]
    model, _ = tiny_pair(cfg, torch.float32)
    sd = model.state_dict()
    with torch.device("meta"):
        loaded = MMDiT(config_from_state_dict(sd))
    loaded.load_state_dict(sd, strict=True, assign=True)
    x, t, y, context = inputs(cfg, (8, 4), torch.float32)
    assert torch.equal(loaded(x, t, y=y, context=context), model(x, t, y=y, context=context))


@torch.no_grad()
def test_a_fresh_mmdit_is_adaln_zero_with_a_sincos_position_table():
    # from-scratch init (DiT's, Peebles & Xie 2023 §3.2): every block's modulation and the final linear are
    # zero, so a fresh network outputs exactly zero whatever its inputs; the P×P position table is the fixed
    # 2-D sin-cos embedding (MAE's form: its first half encodes the column, the second the row)
    cfg = TINY_CONFIGS["rms"]
    model = MMDiT(cfg)
    x, t, y, context = inputs(cfg, (8, 8), torch.float32)
    assert torch.equal(model(x, t, y=y, context=context), torch.zeros_like(x))
    P, D = cfg.pos_embed_max_size, cfg.hidden_size
    table = model.pos_embed.view(P, P, D)
    omega = 1.0 / 10000 ** (torch.arange(D // 4, dtype=torch.float64) / (D / 4.0))
    pos = torch.arange(P, dtype=torch.float64)[:, None] * omega  # [P, D/4]
    want = torch.cat([pos.sin(), pos.cos()], dim=1)  # [P, D/2]: position p's embedding
    torch.testing.assert_close(table[3, :, : D // 2].double(), want, rtol=0, atol=1e-6)  # along a row: j
    torch.testing.assert_close(table[:, 5, D // 2 :].double(), want, rtol=0, atol=1e-6)  # down a column: i


@pytest.mark.parametrize("name", ["plain", "rms"])
@torch.no_grad()
def test_context_mask_is_the_same_as_leaving_the_tokens_out(name):
    # mask_text_padding: masked context tokens are never keys of the joint attention, so the image stream of
    # a row whose last context tokens are masked equals that row called with those tokens cut off (their own
    # stream runs on but is read by no one), and a row that keeps all its tokens equals the unmasked call.
    cfg = TINY_CONFIGS[name]
    model = MMDiT(cfg).double().eval()
    g = torch.Generator().manual_seed(5)
    for p in model.parameters():  # off the adaLN-Zero start, whose output is exactly zero
        p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
    x, t, y, context = inputs(cfg, (4, 6), torch.float64)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[0, 3:] = False
    out = model(x, t, y=y, context=context, context_mask=keep)
    cut = model(x[:1], t[:1], y=y[:1], context=context[:1, :3])
    full = model(x, t, y=y, context=context)
    scale = full.abs().max().item()
    assert (out[:1] - cut).abs().max().item() < 1e-12 * scale
    assert (out[1:] - full[1:]).abs().max().item() < 1e-12 * scale
    assert (out[:1] - full[:1]).abs().max().item() > 1e-3 * scale  # the mask does act
