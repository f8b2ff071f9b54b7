"""SD3 LoRA files (latentforge.lora on the MMDiT) against diffusers + PEFT.

Reference: our tiny random MMDiT -> diffusers' own single-file converter -> SD3Transformer2DModel
(tests/test_models_mmdit.py `tiny_pair`); a LoRA on every Linear/Conv2d of the diffusers model is written in
diffusers' layout (`transformer.<diffusers path>.lora_A/B`, what `save_lora_weights` writes) and loaded into
it with `StableDiffusion3Pipeline.load_lora_into_transformer` (PEFT layers). The same LoRA, rewritten in the
other layouts people have on disk (kohya's fused q/k/v on the SD3 module tree, OneTrainer's flat diffusers
names, ComfyUI's LoraSave), must give our pipeline the same output.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file
from test_models_mmdit import TINY_CONFIGS, inputs, run_ref, tiny_pair
from test_models_t5 import CLIP_G, CLIP_L, T5_TINY, TINY_SD3
from torch import nn

from latentforge import lora as L
from latentforge.lora_keys import mmdit_table
from latentforge.pipeline import Pipeline

RANK, ALPHA = 4, 2.0


@pytest.fixture(scope="module")
def pair():
    """A tiny SD3.5-medium-like pipeline (MMDiT-X: attn2 in blocks 0-1, RMS q/k norms, a pre-only last
    context block) holding the randomized MMDiT of tiny_pair, and diffusers' model of the same weights."""
    pytest.importorskip("peft")
    cfg = TINY_CONFIGS["mmditx"]
    model, ref = tiny_pair(cfg, torch.float32)
    pipe = Pipeline.from_preset(
        "sd35-medium",
        {"mmdit": cfg, "vae": TINY_SD3["vae"], "clip_l": CLIP_L, "clip_g": CLIP_G, "t5xxl": T5_TINY},
    )
    pipe.components["mmdit"] = model
    return pipe, ref, cfg


def diffusers_lora(ref: nn.Module, seed=0) -> dict[str, torch.Tensor]:
    """Random rank-4 A [r, in(, kh, kw)] and B [out, r(, 1, 1)] for every Linear/Conv2d of diffusers' model,
    named as diffusers saves them (without the `transformer.` prefix)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in ref.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            w = m.weight
            sd[f"{name}.lora_A.weight"] = torch.randn(RANK, *w.shape[1:], generator=g) / math.sqrt(
                w[0].numel()
            )
            up = torch.randn(w.shape[0], RANK, generator=g) * 0.3
            sd[f"{name}.lora_B.weight"] = up.reshape(*up.shape, *([1, 1] if w.ndim == 4 else []))
    return sd


def layers(sd):
    return {
        k.removesuffix(".lora_A.weight"): (sd[k], sd[k.replace("lora_A", "lora_B")])
        for k in sd
        if "lora_A" in k
    }


def write(path, sd, layout: str, net) -> None:
    """The diffusers-named LoRA `sd` in `layout`. kohya and ComfyUI name our (SD3 reference) modules: q, k, v
    become one fused layer of rank 3r (down = [A_q; A_k; A_v], up = diag(B_q, B_k, B_v), alpha 3α so that
    α/r is unchanged), and a (scale, shift) output of diffusers' AdaLayerNormContinuous has its halves
    exchanged."""
    if layout == "peft":
        config = {"transformer.r": RANK, "transformer.lora_alpha": ALPHA,
                  "transformer.target_modules": sorted(layers(sd))}  # fmt: skip
        meta = {"format": "pt", "lora_adapter_metadata": json.dumps(config)}
        save_file({f"transformer.{k}": v for k, v in sd.items()}, str(path), metadata=meta)
        return
    if layout == "onetrainer":  # flat diffusers names, kohya's tensor names
        out = {}
        for name, (a, b) in layers(sd).items():
            key = "lora_transformer_" + name.replace(".", "_")
            out |= {
                f"{key}.lora_down.weight": a,
                f"{key}.lora_up.weight": b,
                f"{key}.alpha": torch.tensor(ALPHA),
            }
        save_file(out, str(path))
        return
    table, fused = mmdit_table(net, "mmdit"), {}
    for name, (a, b) in layers(sd).items():
        t = table[name]
        if t.swap:
            b = torch.cat(b.chunk(2)[::-1])
        fused.setdefault(t.module, []).append((t.rows, a, b))
    out = {}
    for module, parts in fused.items():
        parts.sort(key=lambda p: p[0] or (0, 0))
        down = torch.cat([a for _, a, _ in parts])
        up = torch.block_diag(*[b.flatten(1) for _, _, b in parts]).reshape(
            -1, len(parts) * RANK, *parts[0][2].shape[2:]
        )
        key = "lora_unet_" + module.replace(".", "_") if layout == "kohya" else f"diffusion_model.{module}"
        out |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                f"{key}.alpha": torch.tensor(ALPHA * len(parts))}  # fmt: skip
    save_file(out, str(path))


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("layout", ["peft", "kohya", "onetrainer", "comfy"])
@pytest.mark.parametrize("mode", ["merge", "patch", "apply"])
@torch.no_grad()
def test_sd3_layouts_match_diffusers(pair, tmp_path, layout, mode):
    from diffusers import StableDiffusion3Pipeline
    from diffusers.utils import scale_lora_layers

    pipe, ref, cfg = pair
    sd = diffusers_lora(ref)
    peft_path, path = tmp_path / "peft.safetensors", tmp_path / f"{layout}.safetensors"
    write(peft_path, sd, "peft", None)
    write(path, sd, layout, pipe.net)
    x, t, y, context = inputs(cfg, (8, 8), torch.float32)
    base = pipe.net(x, t, y=y, context=context)

    import copy

    ref = copy.deepcopy(ref)
    state, meta = StableDiffusion3Pipeline.lora_state_dict(str(peft_path), return_lora_metadata=True)
    StableDiffusion3Pipeline.load_lora_into_transformer(
        state, transformer=ref, adapter_name="x", metadata=meta
    )
    scale_lora_layers(ref, 0.7)
    expected = run_ref(ref, x, t, y, context)
    lora = L.read_lora(path)
    assert len(lora.layers) == (len(layers(sd)) if layout in ("peft", "onetrainer") else len(lora.layers))
    with getattr(L, mode)(pipe, lora, unet_scale=0.7):
        ours = pipe.net(x, t, y=y, context=context)
    # float32 on both sides: the models alone agree to ~2e-6 relative (test_models_mmdit); the LoRA terms are
    # summed in another order (PEFT: per-layer B(A(x)); fused: one rank-3r product; merge: one rounded W + ΔW)
    assert rel(expected, base) > 1e-2  # the LoRA changes the output
    assert rel(ours, expected) <= 2e-5, rel(ours, expected)
    assert torch.equal(pipe.net(x, t, y=y, context=context), base)  # removed: the base model, bit for bit


def test_t5_lora_merges_by_hf_names(pair, tmp_path):
    """SD3's third text encoder (kohya `lora_te3_`, HF T5EncoderModel names): ΔW = (α/r)·B·A on that weight
    and nowhere else."""
    pipe, _, _ = pair
    t5 = pipe.components["t5xxl"]
    w = t5.transformer.encoder.block[1].layer[1].DenseReluDense.wi_0.weight
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(2, w.shape[1], generator=g), torch.randn(w.shape[0], 2, generator=g)
    key = "lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_0"
    save_file({f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b, f"{key}.alpha": torch.tensor(1.0)},
              str(tmp_path / "t5.safetensors"))  # fmt: skip
    before = {k: v.clone() for k, v in t5.state_dict().items()}
    with L.merge(pipe, L.read_lora(tmp_path / "t5.safetensors"), unet_scale=1.0, te_scale=0.5):
        after = t5.state_dict()
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert changed == ["transformer.encoder.block.1.layer.1.DenseReluDense.wi_0.weight"]
        expected = (before[changed[0]].double() + 0.5 * 0.5 * (b.double() @ a.double())).float()
        assert torch.equal(after[changed[0]], expected)  # one rounding of the float64 sum
    assert all(torch.equal(before[k], v) for k, v in t5.state_dict().items())


def test_sd15_lora_on_sd3_names_its_family(pair, tmp_path):
    pipe, _, _ = pair
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{key}.lora_down.weight": torch.zeros(4, 768), f"{key}.lora_up.weight": torch.zeros(320, 4)},
              str(tmp_path / "sd15.safetensors"))  # fmt: skip
    with pytest.raises(L.LoRAError, match=r"looks made for sd15.*\n.*1 layers name no weight here"):
        L.merge(pipe, L.read_lora(tmp_path / "sd15.safetensors"))


def test_sd3_lora_on_sd15_names_sd3(tmp_path):
    from test_lora import sd15

    key = "transformer.transformer_blocks.0.attn.to_q"
    save_file({f"{key}.lora_A.weight": torch.zeros(4, 1536), f"{key}.lora_B.weight": torch.zeros(1536, 4)},
              str(tmp_path / "sd3.safetensors"))  # fmt: skip
    with pytest.raises(L.LoRAError, match="looks made for sd3-medium"):
        L.patch(sd15(), L.read_lora(tmp_path / "sd3.safetensors"))


@pytest.mark.parametrize("layout", ["kohya", "comfy"])
def test_dit_lora_by_its_own_module_names(tmp_path, layout):
    """DiT LoRAs name the facebookresearch/DiT module tree (the checkpoint layout): merged ΔW = s·(α/r)·B·A
    on that weight only; patched, the same output as merged (float32 rounding of two summation orders)."""
    from test_pipeline import tiny

    pipe = tiny("dit-xl-2-256")
    net = pipe.net
    w = net.blocks[0].attn.qkv.weight
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(3, w.shape[1], generator=g), torch.randn(w.shape[0], 3, generator=g)
    key = "lora_unet_blocks_0_attn_qkv" if layout == "kohya" else "diffusion_model.blocks.0.attn.qkv"
    save_file({f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b, f"{key}.alpha": torch.tensor(6.0)},
              str(tmp_path / "dit.safetensors"))  # fmt: skip
    lora = L.read_lora(tmp_path / "dit.safetensors")
    x = torch.randn(2, 4, *(2 * [net.config.input_size]), generator=g)
    t, y = torch.tensor([10.0, 500.0]), torch.tensor([1, 3])
    before = w.detach().clone()
    with torch.no_grad():
        with L.patch(pipe, lora, unet_scale=0.8):
            patched = net(x, t, y=y)
        with L.merge(pipe, lora, unet_scale=0.8):
            expected = (before.double() + 0.8 * 2.0 * (b.double() @ a.double())).float()
            assert torch.equal(w, expected)
            merged = net(x, t, y=y)
    assert torch.equal(w, before)
    assert rel(patched, merged) <= 1e-5
