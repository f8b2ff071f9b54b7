"""conditioning.trim_padding: a network that masks the text padding gets its context cut after the batch's
last EOS (rounded up to 8 tokens) and computes the same thing. What makes it exact: CLIP's self-attention is
causal, so a position up to its EOS reads nothing after it (the kept prefix is the same computation), and a
masked key gets softmax weight exp(-inf) = 0 (tests/test_models_unet.py checks that masked tokens change
nothing). Compared here: the conditioning itself, and the trainer's forward and gradients through a tiny
UNet and a jointly trained tower, float64, against the untrimmed 16-position context."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from latentforge import conditioning, families
from latentforge.models.text import CLIPTextConfig, CLIPTextModel
from latentforge.models.unet import UNet, UNetConfig
from latentforge.training.trainer import TextToImage

POSITIONS = 24  # BOS + 22 tokens + EOS at most: "a cat" is cut to 8 positions, 9 tokens to 16
PROMPTS = ["a cat", "a small red square above a big blue circle", ""]


def tower(seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=POSITIONS, hidden_act="quick_gelu",
    )  # fmt: skip
    return CLIPTextModel(cfg).double()


def first_eos(prompts: list[str], enc: CLIPTextModel) -> list[int]:
    full = conditioning.sd15({"clip_l": enc}, prompts, 64, 64, False, SimpleNamespace(mask_text_padding=True))
    return (full["context_mask"].sum(dim=1) - 1).tolist()  # BOS .. EOS are kept: EOS at count - 1


@torch.no_grad()
def test_the_context_is_cut_after_the_batch_last_eos_and_is_the_same_prefix():
    enc = tower()
    net = SimpleNamespace(mask_text_padding=True)
    full = conditioning.sd15({"clip_l": enc}, PROMPTS, 64, 64, False, net)
    with conditioning.trim_padding():
        cut = conditioning.sd15({"clip_l": enc}, PROMPTS, 64, 64, False, net)
    eos = first_eos(PROMPTS, enc)
    T = -(-(max(eos) + 1) // 8) * 8
    assert max(eos) == 10 and T == 16 < POSITIONS  # 9 tokens between BOS and EOS
    assert cut["context"].shape == (3, T, 32) and cut["context_mask"].shape == (3, T)
    torch.testing.assert_close(cut["context"], full["context"][:, :T], rtol=0, atol=1e-12)
    assert torch.equal(cut["context_mask"], full["context_mask"][:, :T])
    assert not full["context_mask"][:, T:].any()  # only padding was left out
    # the text transformers' conditioning (context and pooled EOS state) alike
    full_t = conditioning.clip_text({"clip_l": enc}, PROMPTS, 64, 64, False, net)
    with conditioning.trim_padding():
        cut_t = conditioning.clip_text({"clip_l": enc}, PROMPTS, 64, 64, False, net)
    torch.testing.assert_close(cut_t["context"], full_t["context"][:, :T], rtol=0, atol=1e-12)
    torch.testing.assert_close(cut_t["y"], full_t["y"], rtol=0, atol=1e-12)
    # one short prompt alone: 8 positions
    with conditioning.trim_padding():
        short = conditioning.sd15({"clip_l": enc}, ["a cat"], 64, 64, False, net)
    assert short["context"].shape == (1, 8, 32)


@torch.no_grad()
def test_nothing_is_cut_without_the_mask_or_with_prompt_weights_or_outside_the_block():
    enc = tower()
    masked, plain = SimpleNamespace(mask_text_padding=True), SimpleNamespace(mask_text_padding=False)
    with conditioning.trim_padding():
        assert conditioning.sd15({"clip_l": enc}, ["a cat"], 64, 64, False, plain)["context"].shape[1] == 24
        # A1111's weighting restores the mean over all the chunk's positions: cutting would change it
        weighted = conditioning.sd15({"clip_l": enc}, ["a (cat:1.3)"], 64, 64, False, masked)
        assert weighted["context"].shape[1] == 24
    assert conditioning.sd15({"clip_l": enc}, ["a cat"], 64, 64, False, masked)["context"].shape[1] == 24


def test_the_trainer_forward_and_its_gradients_are_those_of_the_full_context():
    # TextToImage.forward (what each training step calls) cuts the context; a forward with the 24-position
    # conditioning given as `cond` does not. Same output, same gradients for the UNet and the tower.
    cfg = UNetConfig(
        model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2), num_heads=2,
        transformer_depth=1, context_dim=32, mask_text_padding=True,
    )  # fmt: skip
    torch.manual_seed(1)
    unet = UNet(cfg).double()
    for p in unet.parameters():  # zero-initialised output layers would hide the context's gradient
        torch.nn.init.normal_(p, std=0.05)
    model = TextToImage("sd15", "unet", {"unet": unet, "clip_l": tower()}, {})
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([10.0, 500.0, 900.0], dtype=torch.float64)

    def run(cut: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        cond = None
        if not cut:
            with conditioning.first_chunk_only():
                cond = families.encode("sd15", model.encoders(), PROMPTS, 64, 64, False, cfg, "none")
            assert cond["context"].shape[1] == POSITIONS
        out = model(x, t, PROMPTS, (64, 64), cond=cond)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    seen = []
    unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["context"].shape[1]), with_kwargs=True)
    out_full, grads_full = run(cut=False)
    out_cut, grads_cut = run(cut=True)
    assert seen == [POSITIONS, 16]  # the trainer's own encoding was cut
    torch.testing.assert_close(out_cut, out_full, rtol=0, atol=1e-10)
    assert grads_cut.keys() == grads_full.keys()
    assert any(n.startswith("parts.clip_l.") for n in grads_full)
    for n, g in grads_full.items():
        torch.testing.assert_close(grads_cut[n], g, rtol=1e-9, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}")
    # the cut context's positions past the longest caption got no gradient in the full run either
    pos = grads_full["parts.clip_l.transformer.text_model.embeddings.position_embedding.weight"]
    assert pos[16:].abs().max().item() == 0.0 and pos[:12].abs().max().item() > 0
