"""AutoencoderKL in the LDM layout: checkpoint keys, parity with diffusers, latent formats, tiling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from latentforge.models.vae import (
    LATENT_FORMATS,
    PRESETS,
    AutoencoderKL,
    AutoencoderKLConfig,
    DiagonalGaussian,
    LatentFormat,
    _run_tiled,
)

KEYS = Path(__file__).parent / "data" / "checkpoint_keys"


def read_keys(name: str, prefix: str = "first_stage_model.") -> dict[str, tuple[int, ...]]:
    out = {}
    for line in (KEYS / name).read_text().splitlines():
        key, shape = line.split("\t")
        out[key.removeprefix(prefix)] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


def meta_model(name: str) -> AutoencoderKL:
    with torch.device("meta"):
        return AutoencoderKL(PRESETS[name])


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def tiny(z: int = 4, quant: bool = True, dtype=torch.float32, seed: int = 0, **kw) -> AutoencoderKL:
    cfg = AutoencoderKLConfig(
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        z_channels=z,
        embed_dim=z,
        resolution=32,
        use_quant_conv=quant,
        **kw,
    )
    torch.manual_seed(seed)
    model = AutoencoderKL(cfg).to(dtype).eval()
    with torch.no_grad():  # the default GroupNorm init is (1, 0): randomize it so a mix-up of norms shows
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    return model


# ---------------------------------------------------------------------------------------------------------
# Checkpoint layout


def test_sd_preset_keys_and_shapes_match_the_ldm_checkpoint():
    ref = read_keys("sd_vae_ldm.txt")
    assert len(ref) == 248
    assert shapes(meta_model("sd")) == ref


def test_parameter_counts_match_the_originals():
    # architectures.md §2.1 / §2.1 SD3, measured on the upstream classes.
    for name, enc, dec, total in [
        ("sd", 34_163_592, 49_490_179, 83_653_863),
        ("sd3", 34_274_208, 49_545_475, 34_274_208 + 49_545_475),
    ]:
        m = meta_model(name)
        assert sum(p.numel() for p in m.encoder.parameters()) == enc
        assert sum(p.numel() for p in m.decoder.parameters()) == dec
        assert sum(p.numel() for p in m.parameters()) == total


def test_sd3_preset_is_the_sd_layout_with_16_channels_and_no_quant_convs():
    ref = read_keys("sd_vae_ldm.txt")
    expected = {k: v for k, v in ref.items() if not k.startswith(("quant_conv.", "post_quant_conv."))}
    expected["encoder.conv_out.weight"] = (32, 512, 3, 3)
    expected["encoder.conv_out.bias"] = (32,)
    expected["decoder.conv_in.weight"] = (512, 16, 3, 3)
    assert shapes(meta_model("sd3")) == expected


def test_meta_model_loads_a_state_dict_with_assign():
    src = tiny()
    with torch.device("meta"):
        m = AutoencoderKL(src.cfg)
    m.load_state_dict(src.state_dict(), strict=True, assign=True)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(m.eval().decode(m.encode(x).mean), src.decode(src.encode(x).mean))


def test_attn_resolutions_add_attention_blocks_per_level():
    m = tiny(attn_resolutions=(16,))  # resolution 32: encoder level 1 and decoder up.1 run at 16
    keys = m.state_dict().keys()
    assert "encoder.down.1.attn.0.q.weight" in keys and "encoder.down.0.attn.0.q.weight" not in keys
    assert {"decoder.up.1.attn.0.proj_out.weight", "decoder.up.1.attn.1.proj_out.weight"} <= keys
    assert "decoder.up.0.attn.0.q.weight" not in keys
    with torch.no_grad():
        assert m.decode(m.encode(torch.zeros(1, 3, 12, 20)).mode()).shape == (1, 3, 12, 20)


# ---------------------------------------------------------------------------------------------------------
# Numerics against diffusers.AutoencoderKL, weights converted by diffusers' own single-file converter.


def diffusers_twin(model: AutoencoderKL, prefix: str):
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg = model.cfg
    n = len(cfg.ch_mult)
    dcfg = dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_ch,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=[cfg.ch * m for m in cfg.ch_mult],
        layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.z_channels,
        norm_num_groups=32,
        sample_size=cfg.resolution,
        use_quant_conv=cfg.use_quant_conv,
        use_post_quant_conv=cfg.use_quant_conv,
    )
    # The converter strips "first_stage_model." (or "vae.") when present, else takes the keys as they are.
    ckpt = {prefix + k: v for k, v in model.state_dict().items()}
    theirs = DiffusersAutoencoderKL(**dcfg).to(next(model.parameters()).dtype).eval()
    theirs.load_state_dict(convert_ldm_vae_checkpoint(ckpt, dcfg), strict=True)
    return theirs


# float64: both sides compute the same ops (GroupNorm, 3×3 convs, SDPA vs diffusers' attention), so the
# difference is pure rounding: measured ≤ 6e-15. float32: measured ≤ 2.8e-6 on outputs of magnitude up to
# ~1.9 (a few ulps accumulated through ~15 layers); 1e-5 leaves headroom for other BLAS/SDPA kernels.
@pytest.mark.parametrize(
    "dtype, tol, quant, z, prefix",
    [
        (torch.float64, 1e-12, True, 4, "first_stage_model."),
        (torch.float64, 1e-12, False, 16, ""),
        (torch.float32, 1e-5, True, 4, ""),
    ],
)
def test_matches_diffusers(dtype, tol, quant, z, prefix):
    ours = tiny(z=z, quant=quant, dtype=dtype)
    theirs = diffusers_twin(ours, prefix)
    torch.manual_seed(1)
    # odd sizes: 23×37 exercises the asymmetric downsample padding (floor(23/2) = 11)
    for x in [torch.rand(2, 3, 24, 40, dtype=dtype) * 2 - 1, torch.rand(1, 3, 23, 37, dtype=dtype) * 2 - 1]:
        with torch.no_grad():
            p, q = ours.encode(x), theirs.encode(x).latent_dist
        assert p.mean.shape == q.mean.shape == (x.shape[0], z, x.shape[2] // 2, x.shape[3] // 2)
        assert (p.mean - q.mean).abs().max() <= tol
        assert (p.logvar - q.logvar).abs().max() <= tol
        assert (p.std - q.std).abs().max() <= tol
    for z_in in [torch.randn(2, z, 12, 20, dtype=dtype), torch.randn(1, z, 7, 11, dtype=dtype)]:
        with torch.no_grad():
            a, b = ours.decode(z_in), theirs.decode(z_in).sample
        assert a.shape == (z_in.shape[0], 3, 2 * z_in.shape[2], 2 * z_in.shape[3])
        assert (a - b).abs().max() <= tol


def test_diagonal_gaussian():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    torch.manual_seed(0)
    moments = torch.randn(3, 8, 5, 6, dtype=torch.float64) * 3
    moments[:, 4:, 0, 0] = 50.0  # logvar clamped to 20
    ours, theirs = DiagonalGaussian(moments), DiagonalGaussianDistribution(moments)
    assert ours.logvar.max() == 20.0
    for name in ["mean", "logvar", "std", "var"]:
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=1e-12, atol=0)
    torch.testing.assert_close(ours.kl(), theirs.kl(), rtol=1e-12, atol=0)
    assert torch.equal(ours.mode(), ours.mean)
    g = torch.Generator().manual_seed(5)
    s = ours.sample(generator=g)
    g.manual_seed(5)
    assert torch.equal(s, ours.sample(generator=g))
    eps = torch.randn(s.shape, generator=torch.Generator().manual_seed(5), dtype=s.dtype)
    torch.testing.assert_close(s, ours.mean + ours.std * eps, rtol=0, atol=0)


def test_latent_formats():
    assert LATENT_FORMATS["sd1"] == LATENT_FORMATS["sd2"] == LatentFormat(0.18215, 0.0)
    assert LATENT_FORMATS["sdxl"].scale_factor == 0.13025
    sd3 = LATENT_FORMATS["sd3"]
    assert (sd3.scale_factor, sd3.shift_factor) == (1.5305, 0.0609)
    z = torch.randn(2, 16, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(sd3.process_in(z), (z - 0.0609) * 1.5305)
    torch.testing.assert_close(sd3.process_out(sd3.process_in(z)), z)


# ---------------------------------------------------------------------------------------------------------
# Tiling


def test_tiling_machinery_is_exact_for_a_pointwise_function():
    # For a function without spatial context every tile computes the same values as the whole input, so
    # the normalized blend must reproduce it exactly (up to rounding): checks crops, placement and weights.
    conv = nn.Conv2d(4, 3, 1).double()

    def fn(t):  # [B, 4, h, w] -> [B, 3, 4h, 4w]
        return conv(nn.functional.interpolate(t, scale_factor=4.0, mode="nearest"))

    z = torch.randn(2, 4, 23, 41, dtype=torch.float64)
    with torch.no_grad():
        ref = fn(z)
        for tile, overlap in [(8, 2), (8, 4), (10, 3), (16, 0), (64, 8)]:
            out = _run_tiled(fn, z, tile, overlap, unit_in=1, unit_out=4)
            assert (out - ref).abs().max() < 1e-12, (tile, overlap)


def test_tiles_covering_the_image_equal_untiled():
    m = tiny()
    z = torch.randn(1, 4, 12, 20)
    x = torch.rand(1, 3, 24, 40) * 2 - 1
    with torch.no_grad():
        assert torch.equal(m.decode_tiled(z, tile=20, overlap=4), m.decode(z))
        assert torch.equal(m.encode_tiled(x, tile=40, overlap=8).mean, m.encode(x).mean)


def test_tiled_is_close_to_untiled():
    # Tiles see neither the global GroupNorm statistics nor the global mid attention, so tiling is an
    # approximation even before blending. With this random tiny model (measured, seed 0): decoder 24×40
    # latent, tile 16 / overlap 8: max |err| 0.45 = 14% of the output range 3.2, mean |err| 0.057 (1.7%);
    # encoder 48×80 image, tile 32 / overlap 16: max |err| 0.135 of a range 1.7, mean |err| 0.026.
    m = tiny()
    torch.manual_seed(0)
    z = torch.randn(1, 4, 24, 40)
    x = torch.rand(1, 3, 48, 80) * 2 - 1
    with torch.no_grad():
        ref = m.decode(z)
        err = (m.decode_tiled(z, tile=16, overlap=8) - ref).abs()
        span = ref.max() - ref.min()
        assert err.mean() < 0.04 * span and err.max() < 0.25 * span
        p, q = m.encode(x), m.encode_tiled(x, tile=32, overlap=16)
        err = (q.mean - p.mean).abs()
        span = p.mean.max() - p.mean.min()
        assert err.mean() < 0.04 * span and err.max() < 0.25 * span


def largest_activation(module: nn.Module, run) -> int:
    # The largest tensor any submodule of `module` produces while `run()` executes, in elements.
    biggest = [0]

    def hook(_m, _inp, out):
        biggest[0] = max(biggest[0], out.numel())

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return biggest[0]


def test_tiled_activation_memory_does_not_grow_with_area():
    # Untiled, the largest activation grows with the area; tiled, it is that of one tile whatever the area.
    m = tiny()
    small, large = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 32, 48)  # 6x the area

    def peak(fn, inputs):
        return [largest_activation(m, lambda t=t: fn(t)) for t in inputs]

    assert peak(m.decode, (small, large)) == [64 * 32 * 32, 6 * 64 * 32 * 32]  # up.1.upsample output
    # an 8×8 latent tile: up.1.upsample gives 64 ch × 16×16; the result [1, 3, 64, 96] is no module output
    assert peak(lambda z: m.decode_tiled(z, tile=8, overlap=2), (small, large)) == [64 * 16 * 16] * 2
    # a 16×16 image tile: encoder conv_in gives 32 ch × 16×16
    images = (torch.rand(1, 3, 32, 32), torch.rand(1, 3, 64, 96))
    assert peak(lambda x: m.encode_tiled(x, tile=16, overlap=4), images) == [32 * 16 * 16] * 2


def test_tiling_rejects_misaligned_sizes():
    m = tiny()
    with pytest.raises(ValueError):
        m.encode_tiled(torch.zeros(1, 3, 23, 32), tile=16, overlap=4)
    with pytest.raises(ValueError):
        m.encode_tiled(torch.zeros(1, 3, 32, 32), tile=15, overlap=4)
    with pytest.raises(ValueError):
        m.decode_tiled(torch.zeros(1, 4, 16, 16), tile=8, overlap=8)
