"""ControlNet files: the original layout (with or without `control_model.`) and diffusers', read safely,
their config read from the weights, loaded strictly into models/controlnet.py's ControlNet.

Layouts:
- original (lllyasviel/ControlNet `cldm.py`; `control_sd15_*.pth`, `control_v11*_sd15_*.pth`, the
  `control_*-fp16.safetensors` extracts): `control_model.` + our module paths. A full ControlLDM file
  (`control_sd15_canny.pth`, SD1.5 included) holds other components too: only `control_model.*` is read.
  Some files (thibaud/controlnet-sd21 and others) store the same keys with no prefix.
- diffusers (`ControlNetModel`, `diffusion_pytorch_model.safetensors`): `time_embedding.linear_{1,2}`,
  `add_embedding.linear_{1,2}` (SDXL), `conv_in`, `controlnet_cond_embedding.{conv_in,blocks.K,conv_out}`,
  `down_blocks.B.{resnets,attentions}.J`, `down_blocks.B.downsamplers.0.conv`, `mid_block.*`,
  `controlnet_down_blocks.N`, `controlnet_mid_block`: renamed key by key (`from_diffusers`), the tensors
  are the same.
Reading goes through checkpoint_io (safetensors, or torch.load(weights_only=True): nothing is unpickled).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping

import torch

from latentforge.checkpoint_io import read_metadata, read_state_dict, save_state_dict
from latentforge.models.controlnet import ControlNet, ControlNetConfig
from latentforge.models.unet import UNetConfig

PREFIX = "control_model."

# diffusers' ResNet block names -> ldm ResBlock names (resnet.py `ResnetBlock2D` / openaimodel `ResBlock`)
_RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
    "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}  # fmt: skip
_LINEAR_1_2 = {"linear_1": "0", "linear_2": "2"}


def layout(sd: Mapping[str, torch.Tensor]) -> str:
    """The layout, "original" or "diffusers"; an error for anything else (T2I-Adapter, Control-LoRA, UNet)."""
    keys = sd.keys()
    if "lora_controlnet" in keys or any(k.endswith((".up", ".down")) for k in keys):
        raise ValueError("this is a Control-LoRA (low-rank ControlNet weights), not a full ControlNet")
    if any(k.startswith(PREFIX + "input_hint_block.") or k.startswith("input_hint_block.") for k in keys):
        return "original"
    if any(k.startswith("controlnet_cond_embedding.") for k in keys):
        return "diffusers"
    some = ", ".join(sorted(keys)[:4])
    raise ValueError(
        "not a ControlNet: no `input_hint_block` (original layout) or `controlnet_cond_embedding` "
        f"(diffusers) keys (first keys: {some})"
    )


def from_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ControlNetModel state dict with its keys renamed to the original layout."""
    resnets = {int(m[1]) for k in sd if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))}
    per_level = len(resnets) + 1  # num_res_blocks res blocks, then the downsample (input_blocks indices)
    hint_blocks = {int(m[1]) for k in sd if (m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.", k))}
    out, unknown = {}, []
    for k, v in sd.items():
        new = _rename(k, per_level, len(hint_blocks))
        if new is None:
            unknown.append(k)
        else:
            out[new] = v
    if unknown:
        raise ValueError(
            f"{len(unknown)} diffusers ControlNet keys have no original name (e.g. {unknown[:3]})"
        )
    return out


def _rename(k: str, per_level: int, hint_blocks: int) -> str | None:
    head, _, rest = k.partition(".")
    if head in ("time_embedding", "add_embedding", "class_embedding"):
        layer, _, p = rest.partition(".")
        pre = "time_embed." if head == "time_embedding" else "label_emb.0."
        return pre + _LINEAR_1_2[layer] + "." + p if layer in _LINEAR_1_2 else None
    if head == "conv_in":
        return "input_blocks.0.0." + rest
    if head == "controlnet_cond_embedding":
        part, _, p = rest.partition(".")
        if part == "conv_in":
            return "input_hint_block.0." + p
        if part == "conv_out":
            return f"input_hint_block.{2 * hint_blocks + 2}." + p
        j, _, p = p.partition(".")
        return f"input_hint_block.{2 * int(j) + 2}." + p if part == "blocks" else None
    if head == "controlnet_down_blocks":
        n, _, p = rest.partition(".")
        return f"zero_convs.{n}.0." + p
    if head == "controlnet_mid_block":
        return "middle_block_out.0." + rest
    if head == "down_blocks":
        m = re.match(r"(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.*)", rest)
        if m is None:
            return None
        level, kind, j, p = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "downsamplers":
            return f"input_blocks.{(level + 1) * per_level}.0.op." + p.removeprefix("conv.")
        block = f"input_blocks.{1 + level * per_level + j}"
        return f"{block}.1.{p}" if kind == "attentions" else f"{block}.0.{_resnet(p)}"
    if head == "mid_block":
        m = re.match(r"(resnets|attentions)\.(\d+)\.(.*)", rest)
        if m is None:
            return None
        if m[1] == "attentions":
            return "middle_block.1." + m[3]
        return f"middle_block.{2 * int(m[2])}.{_resnet(m[3])}"
    return None


def _resnet(p: str) -> str:
    name, _, param = p.partition(".")
    return f"{_RESNET.get(name, name)}.{param}"


def original_state_dict(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """(the ControlNet's weights under our module paths, the file's layout: "original" or "diffusers")."""
    kind = layout(sd)
    if kind == "diffusers":
        return from_diffusers(sd), kind
    if any(k.startswith(PREFIX) for k in sd):  # a full ControlLDM file keeps its UNet, VAE, CLIP beside
        return {k[len(PREFIX) :]: v for k, v in sd.items() if k.startswith(PREFIX)}, kind
    return dict(sd), kind


# --------------------------------------------------------------------------------------------
# The config, read from the weights (the released files carry none; ours carry theirs in the metadata)


def family(sd: Mapping[str, torch.Tensor]) -> str | None:
    """The model family a ControlNet (original keys) was trained for, from its text and label widths:
    sd15 (CLIP-L, 768), sd21 (OpenCLIP ViT-H, 1024), sdxl-base (label embedding 2816); None otherwise."""
    if "label_emb.0.0.weight" in sd:
        return {2816: "sdxl-base", 2560: "sdxl-refiner"}.get(sd["label_emb.0.0.weight"].shape[1])
    k = next((k for k in sd if k.endswith("attn2.to_k.weight")), None)
    return None if k is None else {768: "sd15", 1024: "sd21"}.get(sd[k].shape[1])


def infer_config(sd: Mapping[str, torch.Tensor], like: UNetConfig | None = None) -> ControlNetConfig:
    """The ControlNetConfig whose module has exactly these (original) keys and shapes. What the weights do
    not hold (heads per transformer, GroupNorm groups) comes from `like` (the UNet it will control), else
    from the family: 8 heads for SD1 (768-wide text), 64 channels per head otherwise, 32 groups."""
    shape = {k: tuple(v.shape) for k, v in sd.items()}
    if "input_blocks.0.0.weight" not in shape or "input_hint_block.0.weight" not in shape:
        raise ValueError("the ControlNet has no input_blocks.0.0 (conv_in) or input_hint_block.0 weights")
    mc, cin = shape["input_blocks.0.0.weight"][:2]
    n = 1 + max(int(m[1]) for k in shape if (m := re.match(r"input_blocks\.(\d+)\.", k)))
    downs = [i for i in range(n) if f"input_blocks.{i}.0.op.weight" in shape]
    levels = len(downs) + 1
    nrb, extra = divmod(n - 1 - len(downs), levels)
    if extra or nrb < 1:
        raise ValueError(f"the ControlNet's {n} input blocks ({len(downs)} downsamples) fit no UNet layout")
    mult, attn, depth = [], [], []
    for level in range(levels):
        first = 1 + level * (nrb + 1)
        mult.append(shape[f"input_blocks.{first}.0.out_layers.3.weight"][0] // mc)
        pattern = rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\."
        blocks = {int(m[1]) for k in shape if (m := re.match(pattern, k))}
        if blocks:
            attn.append(2**level)
        depth.append(len(blocks))
    mid = {int(m[1]) for k in shape if (m := re.match(r"middle_block\.1\.transformer_blocks\.(\d+)\.", k))}
    to_k = next((k for k in shape if k.endswith("attn2.to_k.weight")), None)
    proj = next((k for k in shape if k.endswith(".proj_in.weight")), None)
    context = None if to_k is None else shape[to_k][1]
    adm = shape["label_emb.0.0.weight"][1] if "label_emb.0.0.weight" in shape else None
    if like is not None:
        heads = {"num_heads": like.num_heads, "num_head_channels": like.num_head_channels}
        groups = like.norm_groups
    else:
        heads = {"num_heads": 8} if context == 768 else {"num_head_channels": 64}
        groups = 32
    return ControlNetConfig(
        in_channels=cin, out_channels=cin, model_channels=mc, num_res_blocks=nrb, channel_mult=tuple(mult),
        attention_resolutions=tuple(attn), transformer_depth=tuple(depth), transformer_depth_middle=len(mid),
        context_dim=context, use_linear_in_transformer=proj is not None and len(shape[proj]) == 2,
        num_classes=None if adm is None else "sequential", adm_in_channels=adm, norm_groups=groups,
        hint_channels=shape["input_hint_block.0.weight"][1], **heads,
    )  # fmt: skip


def config_from_json(text: str) -> ControlNetConfig:
    fields = json.loads(text)
    known = {f.name for f in dataclasses.fields(ControlNetConfig)}
    if set(fields) - known:
        raise ValueError(f"unknown ControlNet config fields {sorted(set(fields) - known)}")
    return ControlNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


# --------------------------------------------------------------------------------------------


def load_controlnet(
    path: str, dtype: torch.dtype = torch.float32, like: UNetConfig | None = None
) -> ControlNet:
    """A frozen ControlNet from a file of either layout, in `dtype`. like: the UNet it will control (for
    what the weights do not say: heads, GroupNorm groups; the pipeline checks the fit itself)."""
    try:
        raw = read_state_dict(path, dtype)
        meta = read_metadata(path)
    except (ValueError, OSError) as e:
        raise ValueError(f"ControlNet {path!r}: {e}") from e
    try:
        sd, kind = original_state_dict(raw)
        if "latentforge.controlnet" in meta:  # a file written here: its own config
            cfg = config_from_json(meta["latentforge.controlnet"])
        else:
            cfg = infer_config(sd, like)
        with torch.device("meta"):
            net = ControlNet(cfg)
        expected = net.state_dict()
        missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"the weights do not match a ControlNet: {len(missing)} missing keys (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
            )
        for k, v in sd.items():
            if tuple(v.shape) != tuple(expected[k].shape):
                raise ValueError(f"{k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    except ValueError as e:
        raise ValueError(f"ControlNet {path!r}: {e}") from e
    net.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    net.family = family(sd)  # for the pipeline's error messages
    net.layout = kind
    return net.eval().requires_grad_(False)


def save_controlnet(net: ControlNet, path: str) -> None:
    """The original layout (`control_model.` + our keys) as .safetensors, atomically, its config in the
    metadata (so a ControlNet of any size loads back as it was)."""
    sd = {PREFIX + k: v for k, v in net.state_dict().items()}
    meta = {"latentforge.controlnet": json.dumps(dataclasses.asdict(net.config))}
    save_state_dict(sd, path, metadata=meta)
