"""`init_weights(model, generator)`: every network's initial weights drawn again from an explicit generator,
with the distributions construction uses, and without touching the global RNG."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from latentforge.models import (
    AutoencoderKL,
    AutoencoderKLConfig,
    CLIPTextConfig,
    CLIPTextModel,
    DiT,
    DiTConfig,
    MMDiT,
    MMDiTConfig,
    UNet,
    UNetConfig,
)
from latentforge.models.init import init_weights

TINY = {
    "unet": lambda: UNet(
        UNetConfig(
            model_channels=32,
            channel_mult=(1, 2),
            attention_resolutions=(2,),
            num_heads=2,
            context_dim=16,
            num_classes="sequential",
            adm_in_channels=24,
        )
    ),
    "dit": lambda: DiT(DiTConfig(input_size=8, hidden_size=64, depth=2, num_heads=4, num_classes=10)),
    "dit-text": lambda: DiT(
        DiTConfig(input_size=8, hidden_size=64, depth=2, num_heads=4, context_dim=24, pooled_dim=16)
    ),
    "mmdit": lambda: MMDiT(
        MMDiTConfig(
            depth=2,
            in_channels=4,
            out_channels=4,
            adm_in_channels=32,
            context_dim=16,
            pos_embed_max_size=8,
            num_patches=64,
            qk_norm="rms",
            x_block_self_attn_layers=(0,),
        )
    ),
    "vae": lambda: AutoencoderKL(
        AutoencoderKLConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32, attn_resolutions=(16,))
    ),
    "clip-openai": lambda: CLIPTextModel(
        CLIPTextConfig(
            vocab_size=300,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            projection_dim=32,
        )
    ),
    "clip-open_clip": lambda: CLIPTextModel(
        CLIPTextConfig(
            layout="open_clip",
            vocab_size=300,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            hidden_act="gelu",
            projection_dim=32,
        )
    ),
}


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("name", sorted(TINY))
def test_equal_generators_give_equal_weights_and_leave_the_global_rng_alone(name):
    a, b, c = TINY[name](), TINY[name](), TINY[name]()
    with torch.no_grad():
        for m in (a, b, c):
            for p in m.parameters():
                p.fill_(float("nan"))  # whatever init_weights does not draw stays NaN
    state = torch.get_rng_state()
    init_weights(a, torch.Generator().manual_seed(7))
    init_weights(b, torch.Generator().manual_seed(7))
    init_weights(c, torch.Generator().manual_seed(8))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG neither drawn from nor reseeded
    pa, pb, pc = params(a), params(b), params(c)
    for k in pa:
        assert torch.isfinite(pa[k]).all(), k  # every parameter drawn
        assert torch.equal(pa[k], pb[k]), k
    # another seed changes every tensor that is drawn at all (the constant ones: norms, zero inits)
    drawn = [k for k in pa if pa[k].numel() > 1 and pa[k].std() > 0]
    assert drawn and all(not torch.equal(pa[k], pc[k]) for k in drawn)


@pytest.mark.parametrize("name", sorted(TINY))
def test_init_weights_draws_what_construction_draws(name):
    # Against a model as constructed (global RNG): the same constants exactly (ones and zeros of the norms,
    # zero-initialised output layers, adaLN-Zero, biases, logit_scale) and, for each drawn tensor, the
    # same scale: sample standard deviations within 15% (tensors of >= 256 values; the standard error of
    # a sample std is about 1/√(2n) <= 4.4% for a normal, less for a uniform, so 15% is > 3 standard errors
    # and a wrong init (e.g. torch's default instead of xavier or N(0, 0.02²)) is off by 2x or more).
    torch.manual_seed(0)
    built = params(TINY[name]())
    model = init_weights(TINY[name](), torch.Generator().manual_seed(1))
    redrawn = params(model)
    assert built.keys() == redrawn.keys()
    for k, want in built.items():
        got = redrawn[k]
        if want.numel() == 1 or want.std() == 0:
            assert torch.equal(got, want), k
        elif want.numel() >= 256:
            assert abs(got.std() / want.std() - 1) < 0.15, (k, got.std().item(), want.std().item())
            assert abs(got.mean() - want.mean()) < 0.15 * want.std(), k


def test_a_fresh_dit_still_outputs_zero_after_init_weights():
    # adaLN-Zero survives the re-initialisation (the last word is DiT's own initialize_weights).
    model = init_weights(TINY["dit"](), torch.Generator().manual_seed(3)).eval()
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.tensor([1, 10]))
    assert torch.equal(out, torch.zeros_like(out))


def test_a_module_with_its_own_parameters_needs_initialize_weights():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(3))

    with pytest.raises(TypeError, match="Scale has parameters but no initialize_weights"):
        init_weights(nn.Sequential(nn.Linear(3, 3), Scale()), torch.Generator().manual_seed(0))
