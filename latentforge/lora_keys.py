"""Which weight of our networks a LoRA layer name means: name tables for the UNet and the CLIP text towers.

LoRA files name the layer they adapt after the module tree of the trainer's network, not after the
checkpoint (read in kohya-ss/sd-scripts networks/lora.py and library/sdxl_original_unet.py, and in
diffusers loaders/lora_conversion_utils.py):

- kohya / A1111: `lora_unet_<path>`, `lora_te_<path>` (SD1/SD2), `lora_te1_<path>` / `lora_te2_<path>` (SDXL),
  where <path> is the module path with "." replaced by "_". kohya trains SD1/SD2 on a diffusers-layout UNet
  (`down_blocks_0_attentions_0_...`) and SDXL on its own UNet in the SGM layout (`input_blocks_4_1_...`);
  other trainers write SDXL files in diffusers names too, so both spellings are accepted for every family.
  The text encoders are transformers' CLIPTextModel (`text_model_encoder_layers_0_self_attn_q_proj`), also
  for OpenCLIP towers (SD2's ViT-H, SDXL's bigG), whose q/k/v are one fused `in_proj_weight` here.
- diffusers / PEFT: `unet.<diffusers path>`, `text_encoder.<HF path>`, `text_encoder_2.<HF path>` (dots kept).
- SD3 (MMDiT; the layouts ComfyUI's comfy/lora.py model_lora_keys_unet accepts): kohya's `lora_unet_<path>` on
  the original SD3 module tree (sd-scripts networks/lora_sd3.py: fused `attn_qkv`), `lora_te1_/lora_te2_/
  lora_te3_` for CLIP-L, bigG and T5-XXL; diffusers/PEFT `transformer.<diffusers path>` (also under
  `base_model.model.`), OneTrainer's `lora_transformer_<flat diffusers path>` and SimpleTuner's
  `lycoris_<flat diffusers path>`. diffusers splits the fused q/k/v and stores the final (and the last
  context block's) adaLN modulation as (scale, shift) where SD3 has (shift, scale).
- ComfyUI's own LoRA files (its LoraSave node): `diffusion_model.<our path>.lora_up.weight` for any network.
- DiT and T5: the module paths of the original layouts, dotted or flattened.

Our modules keep the original checkpoint layout (models/unet.py, models/text.py), so each table maps those
names to a `Target`: our module path, the parameter, and for the fused OpenCLIP q/k/v the rows it occupies.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from torch import nn

from latentforge.models.text import CLIPTextModel
from latentforge.models.unet import ResBlock, SpatialTransformer, Upsample


class LoRAError(ValueError):
    pass


@dataclass(frozen=True)
class Target:
    """One adapted weight: `component`'s module at `module`, its parameter `param`, rows [start, stop)."""

    component: str  # pipeline component: "unet", "clip_l", "clip_h", "clip_g"
    module: str  # our module path (the checkpoint key without ".weight")
    param: str = "weight"
    rows: tuple[int, int] | None = None  # a row block of a fused parameter (OpenCLIP in_proj: q | k | v)
    swap: bool = False  # the layer's output halves are (scale, shift) and ours (shift, scale): diffusers' SD3


# ResBlock inner modules: LDM names -> diffusers ResnetBlock2D names (the others are GroupNorm/SiLU/Dropout).
_RESNET = {"in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.3": "conv2"}
_TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",  # SDXL's vector-conditioning MLP
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.2": "conv_out",
}


def unet_diffusers_name(unet: nn.Module, path: str) -> str:
    """The diffusers UNet2DConditionModel path of our (LDM/SGM) module `path`, e.g. input_blocks.4.1.proj_in
    -> down_blocks.1.attentions.0.proj_in. Blocks: input_blocks.k (k >= 1) is level i = (k-1) // (n+1),
    item j = (k-1) % (n+1) of down block i, j = n being its downsampler; output_blocks.k is item k % (n+1)
    of up block k // (n+1); middle_block.{0,1,2} = mid_block.{resnets.0, attentions.0, resnets.1}
    (n = num_res_blocks, as in diffusers' own convert_ldm_unet_checkpoint)."""
    if path in _TOP:
        return _TOP[path]
    parts = path.split(".")
    head, n = parts[0], unet.config.num_res_blocks + 1
    if head == "middle_block":  # middle_block.l.rest
        layer, rest = int(parts[1]), parts[2:]
        block = ("mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1")[layer]
        module = unet.middle_block[layer]
    elif head in ("input_blocks", "output_blocks"):  # <head>.k.l.rest
        k, layer, rest = int(parts[1]), int(parts[2]), parts[3:]
    else:
        raise KeyError(path)
    if head == "input_blocks":
        i, j = divmod(k - 1, n)
        module = unet.input_blocks[k][layer]
        if j == n - 1:  # Downsample: op -> conv
            return f"down_blocks.{i}.downsamplers.0.conv"
        kind = "resnets" if isinstance(module, ResBlock) else "attentions"
        block = f"down_blocks.{i}.{kind}.{j}"
    elif head == "output_blocks":
        u, j = divmod(k, n)
        module = unet.output_blocks[k][layer]
        if isinstance(module, Upsample):
            return f"up_blocks.{u}.upsamplers.0.conv"
        kind = "resnets" if isinstance(module, ResBlock) else "attentions"
        block = f"up_blocks.{u}.{kind}.{j}"
    rest = ".".join(rest)
    if isinstance(module, ResBlock):
        rest = _RESNET.get(rest, "conv_shortcut" if rest == "skip_connection" else rest)
    elif not isinstance(module, SpatialTransformer):
        raise KeyError(path)
    return f"{block}.{rest}"


def unet_table(unet: nn.Module, component: str = "unet") -> dict[str, Target]:
    """Every Linear/Conv2d weight of the UNet under both its SGM name and its diffusers name."""
    table = {}
    for path, m in unet.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            target = Target(component, path)
            table[path] = target
            table[unet_diffusers_name(unet, path)] = target
    return table


def text_table(model: CLIPTextModel, component: str) -> dict[str, Target]:
    """Every Linear weight of a CLIP text tower under its transformers (HF CLIPTextModel) name, with and
    without the `text_model.` level (transformers >= 5.6 drops it); OpenCLIP q/k/v as rows of in_proj."""
    table = {}
    if model.config.layout == "openai":
        for path, m in model.named_modules():
            if isinstance(m, nn.Linear):
                table[path.removeprefix("transformer.")] = Target(component, path)
    else:
        d = model.config.hidden_size
        for i in range(model.config.num_hidden_layers):
            ours, hf = f"model.transformer.resblocks.{i}", f"text_model.encoder.layers.{i}"
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                table[f"{hf}.self_attn.{name}"] = Target(
                    component, f"{ours}.attn", "in_proj_weight", (j * d, (j + 1) * d)
                )
            table[f"{hf}.self_attn.out_proj"] = Target(component, f"{ours}.attn.out_proj")
            table[f"{hf}.mlp.fc1"] = Target(component, f"{ours}.mlp.c_fc")
            table[f"{hf}.mlp.fc2"] = Target(component, f"{ours}.mlp.c_proj")
    for name in list(table):
        if name.startswith("text_model."):
            table[name.removeprefix("text_model.")] = table[name]
    return table


def own_table(net: nn.Module, component: str, strip: str = "") -> dict[str, Target]:
    """Every Linear/Conv2d weight under its own module path (DiT, T5: the checkpoint layout is the trainers'
    layout), `strip` removed from the front (our T5 keeps HF's T5EncoderModel under `transformer.`)."""
    return {
        path.removeprefix(strip): Target(component, path)
        for path, m in net.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    }


_MMDIT_TOP = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "context_embedder": "context_embedder",
    "final_layer.linear": "proj_out",
}


def mmdit_table(net: nn.Module, component: str) -> dict[str, Target]:
    """SD3's MMDiT under its own (SD3 reference) names and under diffusers' SD3Transformer2DModel names, the
    correspondence of diffusers' convert_sd3_transformer_checkpoint_to_diffusers: q, k, v are row blocks of
    the fused `qkv`; AdaLayerNormContinuous (norm_out, the last block's norm1_context) orders its output
    (scale, shift), the reference's adaLN (shift, scale)."""
    table = own_table(net, component)
    d = net.config.hidden_size
    for ours, theirs in _MMDIT_TOP.items():
        table[theirs] = table[ours]
    table["norm_out.linear"] = Target(component, "final_layer.adaLN_modulation.1", swap=True)
    for i, block in enumerate(net.joint_blocks):
        j, b = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        sides = [("x_block", "attn", ("to_q", "to_k", "to_v"), "to_out.0", "ff", "norm1")]
        sides.append(("context_block", "attn", ("add_q_proj", "add_k_proj", "add_v_proj"), "to_add_out",
                      "ff_context", "norm1_context"))  # fmt: skip
        if block.x_block.x_block_self_attn:
            sides.append(("x_block", "attn2", ("to_q", "to_k", "to_v"), "to_out.0", None, None))
        for side, attn, qkv, out, ff, norm in sides:
            mine = f"{j}.{side}"
            for k, name in enumerate(qkv):
                table[f"{b}.{attn}.{name}"] = Target(
                    component, f"{mine}.{attn}.qkv", rows=(k * d, (k + 1) * d)
                )
            if f"{mine}.{attn}.proj" in table:  # (the last context block is pre-only: no proj, no MLP)
                table[f"{b}.{attn}.{out}"] = table[f"{mine}.{attn}.proj"]
            if ff and f"{mine}.mlp.fc1" in table:
                table[f"{b}.{ff}.net.0.proj"] = table[f"{mine}.mlp.fc1"]
                table[f"{b}.{ff}.net.2"] = table[f"{mine}.mlp.fc2"]
            if norm:
                pre_only = getattr(block, side).pre_only
                table[f"{b}.{norm}.linear"] = Target(component, f"{mine}.adaLN_modulation.1", swap=pre_only)
    return table


def denoiser_table(net_name: str, net: nn.Module) -> dict[str, Target]:
    """The name table of a family's denoising network (`Family.net`: "unet" | "mmdit" | "dit")."""
    if net_name == "unet":
        return unet_table(net)
    if net_name == "mmdit":
        return mmdit_table(net, net_name)
    return own_table(net, net_name)


def kohya_table(table: dict[str, Target]) -> dict[str, Target]:
    """The same table under kohya's flattened names ("." -> "_"); two targets on one name is a bug here."""
    out: dict[str, Target] = {}
    for name, target in table.items():
        flat = name.replace(".", "_")
        if out.setdefault(flat, target) != target:
            raise AssertionError(f"kohya name {flat} is ambiguous: {out[flat]} and {target}")
    return out


# Parts of a LoRA file (kohya prefix / diffusers prefix) -> "unet" (the denoiser, whatever its kind) | "te1" |
# "te2" | "te3" (SD3's T5-XXL)
KOHYA_PARTS = {
    "lora_unet_": "unet", "lora_te1_": "te1", "lora_te2_": "te2", "lora_te3_": "te3", "lora_te_": "te1",
    "lora_transformer_": "unet", "lycoris_": "unet",  # SD3: OneTrainer, SimpleTuner (flat diffusers names)
}  # fmt: skip
PEFT_PARTS = {
    "unet.": "unet", "transformer.": "unet", "base_model.model.": "unet",
    "text_encoder.": "te1", "text_encoder_2.": "te2", "text_encoder_3.": "te3",
}  # fmt: skip
KOHYA_KINDS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha", "dora_scale": "dora"}
# The older diffusers attention-processor names (`attn1.processor.to_q_lora.down.weight`,
# `self_attn.to_q_lora.down.weight`) -> module names
OLD_PROCESSOR = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
OLD_TEXT = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}

# The cross-attention context width (attn2.to_k's input) of each released UNet: the family a LoRA was made for
CONTEXT_WIDTH = {768: "sd15", 1024: "sd21", 2048: "sdxl-base", 1280: "sdxl-refiner"}


def split_key(key: str) -> tuple[str, str, str, str] | None:
    """key -> (format, part, layer name, kind "down" | "up" | "alpha"); None: not a plain LoRA tensor."""
    for prefix, part in KOHYA_PARTS.items():
        if key.startswith(prefix):
            name, _, suffix = key[len(prefix) :].partition(".")
            kind = KOHYA_KINDS.get(suffix)
            return ("kohya", part, name, kind) if kind else None
    if key.startswith("diffusion_model."):  # ComfyUI's LoraSave: our module path, kohya's tensor names
        for suffix, kind in KOHYA_KINDS.items():
            if key.endswith("." + suffix):
                return "comfy", "unet", key[len("diffusion_model.") : -len(suffix) - 1], kind
        return None
    part = "unet"  # the oldest diffusers files (unet.load_attn_procs) have no prefix
    for prefix, p in sorted(PEFT_PARTS.items(), key=lambda kv: -len(kv[0])):
        if key.startswith(prefix):
            key, part = key[len(prefix) :], p
            break
    for suffix, kind in ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".alpha", "alpha")):
        if key.endswith(suffix):
            return "peft", part, key.removesuffix(suffix), kind
    m = re.fullmatch(r"(.+?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight", key)
    if m:  # attention-processor era: attn1.processor.to_q_lora.down.weight, self_attn.to_q_lora.down.weight
        names = OLD_TEXT if part != "unet" else OLD_PROCESSOR
        return "diffusers-old", part, f"{m[1]}.{names[m[2]]}", m[3]
    m = re.fullmatch(r"(.+)\.(?:lora_linear_layer|lora)\.(down|up)\.weight", key)
    if m:  # LoRACompatibleLinear/Conv: proj_in.lora.down.weight, mlp.fc1.lora_linear_layer.down.weight
        return "diffusers-old", part, m[1], m[2]
    return None


def peft_alphas(metadata: dict, name: str):
    """diffusers >= 0.34 stores each part's PEFT LoraConfig as JSON under `lora_adapter_metadata`
    ({"unet.lora_alpha": 8, "unet.alpha_pattern": {...}, ...}); PEFT matches a pattern p against a module
    name n as re.match(rf"(.*\\.)?({p})$", n) (peft tuners_utils get_pattern_key)."""
    config = json.loads(metadata.get("lora_adapter_metadata", "null")) or {}
    prefixes = {}  # part -> the prefix its config is stored under (SD3's: "transformer.")
    for prefix, part in PEFT_PARTS.items():
        if part not in prefixes or any(k.startswith(prefix) for k in config):
            prefixes[part] = prefix
    for key in ("use_dora", "use_rslora"):
        if any(config.get(p + key) for p in prefixes.values()):
            raise LoRAError(f"LoRA {name}: {key} LoRAs are not supported")

    def alpha(part: str, layer: str) -> float | None:
        p = prefixes[part]
        for pattern, a in (config.get(p + "alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", layer):
                return float(a)
        return None if config.get(p + "lora_alpha") is None else float(config[p + "lora_alpha"])

    return alpha
