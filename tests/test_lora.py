"""LoRA files (latentforge.lora) on tiny random SD1 / SDXL-like pipelines, against diffusers + PEFT.

Reference path: our UNet -> diffusers' own single-file converter (tests/test_models_unet.py `to_diffusers`),
our CLIP-L -> transformers CLIPTextModel; the same LoRA file is loaded into those with diffusers'
`StableDiffusionPipeline.lora_state_dict` + `load_lora_into_unet` / `load_lora_into_text_encoder` (PEFT
layers) and the outputs are compared on the same inputs.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import save_file
from test_models_text import hf_model, openai_to_hf, openclip_to_hf, random_model
from test_models_unet import POOLED, SD1_LIKE, SD2_LIKE, SDXL_LIKE, inputs, randomize, to_diffusers
from torch import nn

from latentforge import lora as L
from latentforge import tokenizer as tok
from latentforge.lora_keys import text_table, unet_diffusers_name
from latentforge.models import AutoencoderKLConfig, CLIPTextConfig
from latentforge.models.unet import UNet, sdxl_vector
from latentforge.pipeline import Pipeline

VAE = AutoencoderKLConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)
CLIP_L = CLIPTextConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2)
CLIP_G = CLIPTextConfig(
    layout="open_clip", hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
    hidden_act="gelu", projection_dim=POOLED,
)  # fmt: skip
CLIP_H = CLIPTextConfig(  # SD2's OpenCLIP ViT-H layout: fused q/k/v in_proj_weight, gelu, ln_final
    layout="open_clip", hidden_size=40, intermediate_size=80, num_hidden_layers=2, num_attention_heads=2,
    hidden_act="gelu", projection_dim=POOLED,
)  # fmt: skip
SD21_UNET = dataclasses.replace(SD2_LIKE, context_dim=CLIP_H.hidden_size)  # linear proj_in/out, head dim 16
RANK = 4


def sd15() -> Pipeline:
    """sd15 with SD1_LIKE's UNet (1×1-conv proj_in/out, attention at both levels, context 24)."""
    torch.manual_seed(0)
    pipe = Pipeline.from_preset("sd15", {"unet": SD1_LIKE, "vae": VAE, "clip_l": CLIP_L})
    randomize(pipe.components["unet"])
    pipe.components["clip_l"] = random_model(CLIP_L, torch.float32)
    return pipe


def sd21() -> Pipeline:
    """sd21 with SD2_LIKE's UNet (linear proj_in/out, num_head_channels, depth 2) and a tiny clip_h."""
    torch.manual_seed(0)
    pipe = Pipeline.from_preset("sd21", {"unet": SD21_UNET, "vae": VAE, "clip_h": CLIP_H})
    randomize(pipe.components["unet"])
    pipe.components["clip_h"] = random_model(CLIP_H, torch.float32, seed=1)
    return pipe


def sdxl() -> Pipeline:
    torch.manual_seed(0)
    cfgs = {"unet": SDXL_LIKE, "vae": VAE, "clip_l": CLIP_L, "clip_g": CLIP_G}
    pipe = Pipeline.from_preset("sdxl-base", cfgs)
    randomize(pipe.components["unet"])
    pipe.components["clip_l"] = random_model(CLIP_L, torch.float32, seed=1)
    pipe.components["clip_g"] = random_model(CLIP_G, torch.float32, seed=2)
    return pipe


def kohya_targets(unet) -> list[str]:
    """The modules kohya's LoRA network adapts with conv_dim set (networks/lora.py): every Linear/Conv2d
    inside a Transformer2DModel, ResnetBlock2D, Downsample2D or Upsample2D (not conv_in/out, the MLPs)."""
    return [
        p
        for p, m in unet.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
        and not p.startswith(("time_embed", "label_emb", "input_blocks.0.", "out."))
    ]


def layer_tensors(g, w: torch.Tensor, rank=RANK) -> tuple[torch.Tensor, torch.Tensor]:
    """Random down [r, in(, kh, kw)] and up [out, r(, 1, 1)] for weight w: LoCon for 3×3 kernels."""
    down = torch.randn(rank, *w.shape[1:], generator=g) / math.sqrt(w[0].numel())
    up = torch.randn(w.shape[0], rank, *([1, 1] if w.ndim == 4 else []), generator=g) * 0.3
    return down, up


def write_sd15_lora(pipe, path, layout: str, seed=0, alpha=2.0, te="clip_l") -> dict[str, torch.Tensor]:
    """A random LoRA on every kohya target of the UNet and every layer of the text encoder `te` (CLIP-L, or
    SD2's clip_h: its q/k/v are rows of the fused in_proj_weight), in `layout` (kohya | peft)."""
    g = torch.Generator().manual_seed(seed)
    unet, clip = pipe.components["unet"], pipe.components[te]
    sd, meta, modules = {}, {}, {"unet": [], "te": []}
    names = [
        (unet_diffusers_name(unet, p), "unet", unet.get_submodule(p).weight) for p in kohya_targets(unet)
    ]
    for name, t in text_table(clip, te).items():
        if name.startswith("text_model."):
            w = getattr(clip.get_submodule(t.module), t.param)
            names.append((name, "te", w if t.rows is None else w[slice(*t.rows)]))
    for name, part, w in names:
        down, up = layer_tensors(g, w)
        modules[part].append(name.removeprefix("text_model."))  # PEFT matches them as suffixes
        if layout == "kohya":
            key = f"lora_{part}_" + name.replace(".", "_")
            sd |= {
                f"{key}.lora_down.weight": down,
                f"{key}.lora_up.weight": up,
                f"{key}.alpha": torch.tensor(alpha),
            }
        else:
            key = ("unet." if part == "unet" else "text_encoder.") + name
            sd |= {f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up}
    if layout == "peft":  # what diffusers >= 0.34 save_lora_weights writes: each part's LoraConfig
        config = {}
        for part, prefix in (("unet", "unet"), ("te", "text_encoder")):
            cfg = {"r": RANK, "lora_alpha": alpha, "target_modules": modules[part]}
            config |= {f"{prefix}.{k}": v for k, v in cfg.items()}
        meta = {"format": "pt", "lora_adapter_metadata": json.dumps(config)}
    save_file(sd, str(path), metadata=meta)
    return sd


# -- references: diffusers + PEFT --------------------------------------------------------------------------


def hf_clip(model):
    transformers = pytest.importorskip("transformers")
    cfg = model.config
    hf = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
            hidden_act=cfg.hidden_act, eos_token_id=tok.EOS, bos_token_id=tok.BOS, pad_token_id=tok.EOS,
        )
    ).eval()  # fmt: skip
    keys = set(hf.state_dict())
    state = {
        k if k in keys else k.removeprefix("text_model."): v
        for k, v in openai_to_hf(model.state_dict()).items()
    }
    hf.load_state_dict(state, strict=True)
    return hf


def diffusers_with_lora(pipe, path, unet_scale=1.0, te_scale=1.0, te_name="clip_l"):
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import scale_lora_layers

    unet, clip = to_diffusers(pipe.components["unet"]), pipe.components[te_name]
    if clip.config.layout == "openai":
        te = hf_clip(clip)
    else:  # OpenCLIP (SD2's ViT-H): diffusers' single-file converter splits in_proj into q/k/v
        te = hf_model(clip.config, openclip_to_hf(clip.state_dict()), torch.float32)
    sd, alphas, meta = StableDiffusionPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    StableDiffusionPipeline.load_lora_into_unet(sd, alphas, unet=unet, adapter_name="x", metadata=meta)
    StableDiffusionPipeline.load_lora_into_text_encoder(
        sd, alphas, text_encoder=te, prefix="text_encoder", adapter_name="x", metadata=meta
    )
    scale_lora_layers(unet, unet_scale)
    scale_lora_layers(te, te_scale)
    return unet, te


def outputs(pipe, unet_ref=None, te_ref=None, te_name="clip_l"):
    x, t, context = inputs(pipe.components["unet"].config, h=8, w=8, dtype=torch.float32)
    ids = tok.tokenize(["a photo of a cat", "red cube"])
    with torch.no_grad():
        ours = pipe.components["unet"](x, t, context), pipe.components[te_name](ids).hidden
        if unet_ref is None:
            return ours
        ref = unet_ref(x, t, encoder_hidden_states=context).sample, te_ref(input_ids=ids).last_hidden_state
    return ours, ref


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("layout", ["kohya", "peft"])
@pytest.mark.parametrize("mode", ["merge", "patch", "apply"])
def test_sd15_matches_diffusers(tmp_path, layout, mode):
    # float32 both sides; the UNets alone differ by ~1e-6 relative (test_models_unet), the LoRA adds a
    # low-rank term computed in another order (PEFT: base(x) + s·B(A(x)); merge: one rounded W + ΔW).
    pipe, path = sd15(), tmp_path / f"{layout}.safetensors"
    write_sd15_lora(pipe, path, layout)
    base = outputs(pipe)
    unet_ref, te_ref = diffusers_with_lora(pipe, path, 0.8, 0.5)
    handle = getattr(L, mode)(pipe, L.read_lora(path), unet_scale=0.8, te_scale=0.5)
    (u, te), (u_ref, te_ref_out) = outputs(pipe, unet_ref, te_ref)
    assert rel(u_ref, base[0]) > 1e-2 and rel(te_ref_out, base[1]) > 1e-2  # the LoRA changes both
    assert rel(u, u_ref) <= 1e-5, rel(u, u_ref)
    assert rel(te, te_ref_out) <= 1e-5, rel(te, te_ref_out)
    handle.remove()
    after = outputs(pipe)
    assert torch.equal(after[0], base[0]) and torch.equal(after[1], base[1])


@pytest.mark.parametrize("mode", ["merge", "patch"])
def test_sd21_kohya_openclip_h_matches_diffusers(tmp_path, mode):
    # SD2: kohya names the UNet layers in diffusers' layout and the OpenCLIP ViT-H tower as transformers'
    # CLIPTextModel (`lora_te_text_model_encoder_layers_0_self_attn_q_proj`), whose q/k/v are row blocks of
    # our fused in_proj_weight. Reference: diffusers' converted UNet and the HF tower from diffusers'
    # open_clip converter, with the same file loaded by diffusers + PEFT. float32 both sides, same bound
    # and reasons as test_sd15_matches_diffusers.
    pipe, path = sd21(), tmp_path / "sd21.safetensors"
    sd = write_sd15_lora(pipe, path, "kohya", alpha=3.0, te="clip_h")
    assert "lora_te_text_model_encoder_layers_1_self_attn_k_proj.lora_down.weight" in sd
    base = outputs(pipe, te_name="clip_h")
    unet_ref, te_ref = diffusers_with_lora(pipe, path, 0.8, 0.5, te_name="clip_h")
    handle = getattr(L, mode)(pipe, L.read_lora(path), unet_scale=0.8, te_scale=0.5)
    (u, te), (u_ref, te_ref_out) = outputs(pipe, unet_ref, te_ref, te_name="clip_h")
    assert rel(u_ref, base[0]) > 1e-2 and rel(te_ref_out, base[1]) > 1e-2  # the LoRA changes both
    assert rel(u, u_ref) <= 1e-5, rel(u, u_ref)
    assert rel(te, te_ref_out) <= 1e-5, rel(te, te_ref_out)
    handle.remove()
    after = outputs(pipe, te_name="clip_h")
    assert torch.equal(after[0], base[0]) and torch.equal(after[1], base[1])


# -- SDXL: kohya's SGM-named UNet keys, lora_te1 (CLIP-L) and lora_te2 (bigG, fused q/k/v) ------------------


def write_sdxl_kohya(pipe, path, seed=0, alpha=3.0) -> dict[str, torch.Tensor]:
    """kohya's SDXL layout: UNet names are the SGM module paths (sdxl_original_unet.py keeps the checkpoint
    layout), text encoders are named as transformers' CLIPTextModel."""
    g = torch.Generator().manual_seed(seed)
    unet = pipe.components["unet"]
    names = [("unet_" + p, unet.get_submodule(p).weight) for p in kohya_targets(unet)]
    for part, comp in (("te1_", "clip_l"), ("te2_", "clip_g")):
        model = pipe.components[comp]
        for name, t in text_table(model, comp).items():
            if name.startswith("text_model."):
                w = getattr(model.get_submodule(t.module), t.param)
                names.append((part + name, w if t.rows is None else w[slice(*t.rows)]))
    sd = {}
    for name, w in names:
        down, up = layer_tensors(g, w)
        key = "lora_" + name.replace(".", "_")
        sd |= {
            f"{key}.lora_down.weight": down,
            f"{key}.lora_up.weight": up,
            f"{key}.alpha": torch.tensor(alpha),
        }
    save_file(sd, str(path))
    return sd


def sdxl_outputs(pipe, refs=None):
    x, t, context = inputs(SDXL_LIKE, dtype=torch.float32)
    pooled = torch.randn(2, POOLED, generator=torch.Generator().manual_seed(3))
    y = sdxl_vector(pooled, (64, 64), (0, 0), (64, 64))
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
    ids = tok.tokenize(["a photo of a cat", "red cube"])
    with torch.no_grad():
        c = pipe.components
        ours = (c["unet"](x, t, context, y=y), c["clip_l"](ids).hidden, c["clip_g"](ids).hidden)
        if refs is None:
            return ours
        unet, te1, te2 = refs
        cond = {"text_embeds": pooled, "time_ids": time_ids}
        ref = (
            unet(x, t, encoder_hidden_states=context, added_cond_kwargs=cond).sample,
            te1(input_ids=ids).last_hidden_state,
            te2(input_ids=ids).last_hidden_state,
        )
    return ours, ref


@pytest.mark.parametrize("mode", ["merge", "patch", "apply"])
def test_sdxl_kohya_sgm_names_match_diffusers(tmp_path, mode):
    pytest.importorskip("peft")
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import scale_lora_layers

    pipe, path = sdxl(), tmp_path / "sdxl.safetensors"
    write_sdxl_kohya(pipe, path)
    base = sdxl_outputs(pipe)
    unet = to_diffusers(pipe.components["unet"], text_time=True)
    te1 = hf_clip(pipe.components["clip_l"])
    te2 = hf_model(CLIP_G, openclip_to_hf(pipe.components["clip_g"].state_dict()), torch.float32)
    sd, alphas = StableDiffusionXLPipeline.lora_state_dict(str(path), unet_config=unet.config)
    StableDiffusionXLPipeline.load_lora_into_unet(sd, alphas, unet=unet, adapter_name="x")
    for prefix, te in (("text_encoder", te1), ("text_encoder_2", te2)):
        StableDiffusionXLPipeline.load_lora_into_text_encoder(sd, alphas, te, prefix=prefix, adapter_name="x")
    for m, s in ((unet, 0.7), (te1, 0.4), (te2, 0.4)):
        scale_lora_layers(m, s)
    handle = getattr(L, mode)(pipe, L.read_lora(path), unet_scale=0.7, te_scale=0.4)
    ours, ref = sdxl_outputs(pipe, (unet, te1, te2))
    for o, r, b in zip(ours, ref, base, strict=True):
        assert rel(r, b) > 1e-2  # the LoRA changes every output
        assert rel(o, r) <= 1e-5, rel(o, r)
    handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(sdxl_outputs(pipe), base, strict=True))


# -- merge arithmetic, exact restore, refusals ------------------------------------------------------------


def test_merge_is_correctly_rounded_and_unmerge_is_bit_exact(tmp_path):
    # Each merged float32 weight is round(W + Σ s·(α/r)·B·A) with the sum in float64: within half an ulp of
    # the float64 value (2⁻²⁴ relative; float64's own error ~1e-16 is far below). Two LoRAs, removed in the
    # order they were merged (not LIFO), must leave every tensor of every component bit-identical.
    pipe = sdxl()
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    sd_a, sd_b = write_sdxl_kohya(pipe, a, seed=1, alpha=3.0), write_sdxl_kohya(pipe, b, seed=2, alpha=1.0)
    before = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in pipe.components.items()}
    ha = L.merge(pipe, L.read_lora(a), unet_scale=0.7, te_scale=0.4)
    hb = L.merge(pipe, L.read_lora(b), unet_scale=-1.3, te_scale=2.0)

    def expected(name, w0, rows=slice(None)):
        out = w0.double().clone()
        for sd, s_unet, s_te, alpha in ((sd_a, 0.7, 0.4, 3.0), (sd_b, -1.3, 2.0, 1.0)):
            up, down = sd[f"{name}.lora_up.weight"].double(), sd[f"{name}.lora_down.weight"].double()
            s = (s_unet if name.startswith("lora_unet") else s_te) * alpha / RANK
            out[rows] += s * torch.einsum("or,ri->oi", up.flatten(1), down.flatten(1)).reshape(
                out[rows].shape
            )
        return out

    checks = [  # a 3×3 LoCon conv, a 1×1 conv, an attention Linear, CLIP-L fc1, bigG's fused v rows
        ("unet", "input_blocks.1.0.in_layers.2.weight", "lora_unet_input_blocks_1_0_in_layers_2", None),
        ("unet", "input_blocks.3.0.skip_connection.weight",
         "lora_unet_input_blocks_3_0_skip_connection", None),
        ("unet", "middle_block.1.transformer_blocks.1.attn2.to_k.weight",
         "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_k", None),
        ("clip_l", "transformer.text_model.encoder.layers.1.mlp.fc1.weight",
         "lora_te1_text_model_encoder_layers_1_mlp_fc1", None),
        ("clip_g", "model.transformer.resblocks.0.attn.in_proj_weight",
         "lora_te2_text_model_encoder_layers_0_self_attn_v_proj", slice(96, 144)),
    ]  # fmt: skip
    for comp, key, name, rows in checks:
        w = pipe.components[comp].state_dict()[key]
        rows = rows or slice(None)
        ref = expected(name, before[comp][key], rows)[rows]
        assert w.dtype == torch.float32
        err = (w[rows].double() - ref).abs()
        assert (err <= ref.abs() * 2.0**-24 + 1e-45).all(), (key, err.max().item())
        if comp == "clip_g":  # only the v rows of in_proj get the v LoRA (q and k have their own)
            assert (w[:96].double() - expected(name, before[comp][key], rows)[:96]).abs().max() > 1e-3
    ha.remove()
    hb.remove()
    for c, m in pipe.components.items():
        for k, v in m.state_dict().items():
            assert torch.equal(v, before[c][k]), (c, k)
            assert v.dtype == before[c][k].dtype


def test_weights_changed_after_merge_refuse_to_unmerge(tmp_path):
    pipe, path = sd15(), tmp_path / "a.safetensors"
    write_sd15_lora(pipe, path, "kohya")
    handle = L.merge(pipe, L.read_lora(path))
    with torch.no_grad():
        pipe.components["unet"].input_blocks[1][1].proj_in.weight.mul_(1.0)  # "loaded new weights"
    with pytest.raises(L.LoRAError, match="changed since a LoRA was merged"):
        handle.remove()


def test_patches_stack_and_remove_in_any_order(tmp_path):
    pipe, a, b = sd15(), tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_sd15_lora(pipe, a, "kohya", seed=1)
    write_sd15_lora(pipe, b, "peft", seed=2)
    base = outputs(pipe)
    state = {k: v.clone() for k, v in pipe.components["unet"].state_dict().items()}
    pa = L.patch(pipe, L.read_lora(a), 0.6, 1.0)
    pb = L.patch(pipe, L.read_lora(b), -0.4, 0.3)
    assert all(torch.equal(v, state[k]) for k, v in pipe.components["unet"].state_dict().items())
    both = outputs(pipe)
    pa.remove()
    pb.remove()
    with L.merge(pipe, L.read_lora(a), 0.6, 1.0), L.merge(pipe, L.read_lora(b), -0.4, 0.3):
        merged = outputs(pipe)
    for o, m, b0 in zip(both, merged, base, strict=True):
        assert rel(m, b0) > 1e-2 and rel(o, m) <= 1e-5
    pb2 = L.patch(pipe, L.read_lora(b), -0.4, 0.3)
    pa2 = L.patch(pipe, L.read_lora(a), 0.6, 1.0)
    pb2.remove()
    only_a = outputs(pipe)
    pa2.remove()
    with L.patch(pipe, L.read_lora(a), 0.6, 1.0):
        assert all(torch.equal(x, y) for x, y in zip(outputs(pipe), only_a, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(outputs(pipe), base, strict=True))


def test_unplaceable_key_fails_naming_it(tmp_path):
    pipe, path = sd15(), tmp_path / "a.safetensors"
    sd = write_sd15_lora(pipe, path, "kohya")
    sd["lora_unet_down_blocks_0_attentions_0_transformer_blocks_7_attn1_to_q.lora_down.weight"] = torch.ones(
        4, 32
    )
    sd["lora_unet_down_blocks_0_attentions_0_transformer_blocks_7_attn1_to_q.lora_up.weight"] = torch.ones(
        32, 4
    )
    save_file(sd, str(path))
    before = {k: v.clone() for k, v in pipe.components["unet"].state_dict().items()}
    for apply in (L.merge, L.patch):
        with pytest.raises(L.LoRAError, match="transformer_blocks_7_attn1_to_q"):
            apply(pipe, L.read_lora(path))
    assert all(torch.equal(v, before[k]) for k, v in pipe.components["unet"].state_dict().items())
    # a layer of the right name but the wrong shape
    sd = write_sd15_lora(pipe, path, "peft")
    sd["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"] = torch.ones(4, 7, 1, 1)
    save_file(sd, str(path))
    with pytest.raises(L.LoRAError, match=r"wrong shape.*down_blocks\.0\.attentions\.0\.proj_in"):
        L.merge(pipe, L.read_lora(path))


def test_sdxl_lora_on_sd15_is_refused_naming_sdxl(tmp_path):
    path = tmp_path / "xl.safetensors"
    write_sdxl_kohya(sdxl(), path)
    with pytest.raises(L.LoRAError, match="sdxl-base"):
        L.merge(sd15(), L.read_lora(path))
    # UNet-only, in diffusers names that exist in SD1 too: its shapes (2048-wide context) give it away
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    sd = {f"{key}.lora_A.weight": torch.ones(4, 2048), f"{key}.lora_B.weight": torch.ones(32, 4)}
    save_file(sd, str(path))
    with pytest.raises(L.LoRAError, match="made for sdxl-base"):
        L.patch(sd15(), L.read_lora(path))


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"unet.x.lora_magnitude_vector": torch.ones(4)}, "PEFT's DoRA"),
        ({"lora_unet_x.hada_w1_a": torch.ones(2, 2)}, "LoHa"),
        ({"lora_unet_x.lora_mid.weight": torch.ones(2, 2, 3, 3)}, "Tucker"),
        ({"model.diffusion_model.out.2.weight": torch.ones(2)}, "out.2.weight"),
    ],
)
def test_unsupported_variants_are_named(tmp_path, extra, message):
    path = tmp_path / "v.safetensors"
    sd = write_sd15_lora(sd15(), path, "kohya") | extra
    save_file(sd, str(path))
    with pytest.raises(L.LoRAError, match=message):
        L.read_lora(path)


def test_only_safetensors(tmp_path):
    path = tmp_path / "x.ckpt"
    path.write_bytes(b"\x80\x04")
    with pytest.raises(L.LoRAError, match="safetensors only"):
        L.read_lora(path)


def test_older_diffusers_layout(tmp_path):
    # the attention-processor era (diffusers < 0.24): ...attn1.processor.to_q_lora.down.weight and
    # text_encoder ...self_attn.to_q_lora.down.weight / mlp.fc1.lora_linear_layer.down.weight (no alphas)
    pipe, peft, old = sd15(), tmp_path / "p.safetensors", tmp_path / "o.safetensors"
    sd = write_sd15_lora(pipe, peft, "peft", alpha=RANK)
    renamed = {}
    for k, v in sd.items():
        module, ab = k.rsplit(".lora_", 1)
        kind = "down" if ab.startswith("A") else "up"
        head, _, leaf = module.rpartition(".")
        if module.startswith("unet.") and leaf in ("to_q", "to_k", "to_v"):
            renamed[f"{head}.processor.{leaf}_lora.{kind}.weight"] = v
        elif module.endswith("to_out.0"):
            renamed[f"{module.removesuffix('.to_out.0')}.processor.to_out_lora.{kind}.weight"] = v
        elif leaf in ("q_proj", "k_proj", "v_proj", "out_proj"):
            renamed[f"{head}.to_{leaf[0] if leaf != 'out_proj' else 'out'}_lora.{kind}.weight"] = v
        else:
            renamed[f"{module}.lora_linear_layer.{kind}.weight"] = v
    save_file(renamed, str(old))
    assert L.read_lora(old).format == "diffusers-old"
    with L.patch(pipe, L.read_lora(peft)):
        new_out = outputs(pipe)
    with L.patch(pipe, L.read_lora(old)):
        old_out = outputs(pipe)
    assert all(torch.equal(a, b) for a, b in zip(new_out, old_out, strict=True))


def test_unet_names_match_diffusers_modules():
    # every Linear/Conv2d of ours has a diffusers name, and that module holds the same weight after
    # diffusers' own single-file conversion (so the name table is the converter's mapping, not a guess)
    for cfg, text_time in ((SD1_LIKE, False), (SDXL_LIKE, True)):
        unet = randomize(UNet(cfg))
        ref = dict(to_diffusers(unet, text_time=text_time).named_modules())
        ours = {p: m for p, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
        names = {unet_diffusers_name(unet, p): m for p, m in ours.items()}
        assert set(names) == {n for n, m in ref.items() if isinstance(m, (nn.Linear, nn.Conv2d))}
        assert all(torch.equal(ref[n].weight, m.weight) for n, m in names.items())


def test_prompt_tags(tmp_path):
    text, tags = L.parse_tags("a cat <lora:ink:0.8>, <lora:toon v2:0.3:1.2> <lora:x> <lora:y:unet=0.5:te=0>")
    assert text == "a cat ,   "
    assert tags == [("ink", 0.8, 0.8), ("toon v2", 1.2, 0.3), ("x", 1.0, 1.0), ("y", 0.5, 0.0)]
    for bad in ("<lora::1>", "<lora:a:b>", "<lora:a:1:2:3>", "<lora:a:nan>", "<lora:a:dyn=3>"):
        with pytest.raises(L.LoRAError, match="bad LoRA tag"):
            L.parse_tags(bad)
    (tmp_path / "ink.safetensors").write_bytes(b"")
    assert L.find_lora("ink", str(tmp_path)) == str(tmp_path / "ink.safetensors")
    for bad in ("../ink", "/etc/passwd", "a/b", "..", "x\\y"):
        with pytest.raises(L.LoRAError, match="no path"):
            L.find_lora(bad, str(tmp_path))
    with pytest.raises(L.LoRAError, match="no LoRA named 'missing'"):
        L.find_lora("missing", str(tmp_path))


# -- DoRA (kohya / LyCORIS `dora_scale`) ---------------------------------------------------------------------


def dora_reference(w, down, up, alpha, m, s) -> torch.Tensor:
    """Liu et al. 2024 eq. 5 at weight 1, W' = m ⊙ V/‖V‖_c with V = W + (α/r)·B·A, interpolated from W by s
    (A1111's finalize_updown); ‖·‖ over every axis but the one m varies along. float64, from the paper."""
    w, v = (
        w.double(),
        w.double()
        + (alpha / down.shape[0]) * (up.double().flatten(1) @ down.double().flatten(1)).reshape(w.shape),
    )
    axis = 0 if m.shape[0] == w.shape[0] else 1
    dims = tuple(d for d in range(w.ndim) if d != axis)
    norm = v.pow(2).sum(dim=dims, keepdim=True).sqrt()
    return w + s * (m.double() * v / norm - w)


@pytest.mark.parametrize("mode", ["merge", "patch"])
def test_dora_layers(tmp_path, mode):
    """kohya DoRA files on a Linear (m per input column), a 1×1 conv (m per output row, LyCORIS wd_on_out)
    and a 3×3 conv (LoCon): merged weights equal the formula (one float32 rounding of a float64 result,
    so within 2 ulps); patched outputs equal merged ones (float32 orders of summation: 1e-5)."""
    pipe = sd15()
    unet = pipe.components["unet"]
    g = torch.Generator().manual_seed(11)
    targets = {  # our path -> whether m is per output row
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q": False,
        "input_blocks.1.1.proj_in": True,
        "input_blocks.1.0.in_layers.2": False,
    }
    sd, expected, s = {}, {}, 0.6
    for path, on_out in targets.items():
        w = unet.get_submodule(path).weight
        down, up = layer_tensors(g, w)
        m_shape = (w.shape[0], *[1] * (w.ndim - 1)) if on_out else (1, w.shape[1], *[1] * (w.ndim - 2))
        base_norm = (
            w.detach()
            .double()
            .pow(2)
            .sum(dim=tuple(d for d in range(w.ndim) if d != (0 if on_out else 1)), keepdim=True)
            .sqrt()
        )
        m = (base_norm * (1 + 0.2 * torch.rand(m_shape, generator=g, dtype=torch.float64))).float()
        key = "lora_unet_" + unet_diffusers_name(unet, path).replace(".", "_")
        sd |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
               f"{key}.alpha": torch.tensor(2.0), f"{key}.dora_scale": m}  # fmt: skip
        expected[path] = dora_reference(w.detach(), down, up, 2.0, m, s)
    save_file(sd, str(tmp_path / "dora.safetensors"))
    lora = L.read_lora(tmp_path / "dora.safetensors")
    assert all(layer.dora_scale is not None for layer in lora.layers.values())
    base = outputs(pipe)[0]
    with L.merge(pipe, lora, unet_scale=s):
        merged = outputs(pipe)[0]
        for path, ref in expected.items():
            w = unet.get_submodule(path).weight
            assert (
                (w.double() - ref).abs() <= 2 * torch.finfo(torch.float32).eps * ref.abs() + 1e-30
            ).all(), path
    assert rel(merged, base) > 1e-3
    if mode == "patch":
        with L.patch(pipe, lora, unet_scale=s):
            patched = outputs(pipe)[0]
        assert rel(patched, merged) <= 1e-5, rel(patched, merged)
    assert torch.equal(outputs(pipe)[0], base)


def test_dora_scale_of_the_wrong_shape_is_named(tmp_path):
    pipe = sd15()
    key = "lora_unet_" + unet_diffusers_name(pipe.components["unet"], "input_blocks.1.1.proj_in").replace(
        ".", "_"
    )
    w = pipe.components["unet"].get_submodule("input_blocks.1.1.proj_in").weight
    down, up = layer_tensors(torch.Generator().manual_seed(0), w)
    sd = {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.dora_scale": torch.ones(3, 5)}
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(L.LoRAError, match=r"dora_scale \(3, 5\) is neither"):
        L.merge(pipe, L.read_lora(tmp_path / "bad.safetensors"))


def test_apply_merges_only_what_a_patch_would_rebuild_every_step(tmp_path):
    """lora.apply (what a generation uses): the UNet's 3×3 convs (LoCon) are merged while it is active, its
    Linear/1×1 layers and the text encoder are patched (weights untouched); the output equals merge's
    (float32 summation orders: 1e-5) and everything is bit-identical after removal."""
    pipe, path = sd15(), tmp_path / "locon.safetensors"
    write_sd15_lora(pipe, path, "kohya")
    lora = L.read_lora(path)
    unet = pipe.components["unet"]
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    base = outputs(pipe)
    with L.merge(pipe, lora, 0.8, 0.5):
        merged = outputs(pipe)
    with L.apply(pipe, lora, 0.8, 0.5):
        applied = outputs(pipe)
        changed = {k for k, v in unet.state_dict().items() if not torch.equal(v, before[k])}
        convs = {
            f"{p}.weight"
            for p, m in unet.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)
        }
        targets = {f"{p}.weight" for p in kohya_targets(unet)}
        assert changed == convs & targets and changed  # the LoCon convs, and nothing else
    assert rel(applied[0], merged[0]) <= 1e-5 and rel(applied[1], merged[1]) <= 1e-5
    assert rel(applied[0], base[0]) > 1e-2
    after = outputs(pipe)
    assert torch.equal(after[0], base[0]) and torch.equal(after[1], base[1])
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
