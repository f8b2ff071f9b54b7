"""Single-file checkpoints: read, detect the family, split into components, write back atomically.

The original single-file layouts (LDM/SGM `.ckpt`/`.safetensors`, SD3 reference, facebookresearch DiT)
keep every component under a prefix; a component's keys with the prefix stripped are exactly our
modules' state-dict keys (DESIGN.md, "Networks keep the original checkpoint layout").
Nothing is unpickled: `.safetensors` through safetensors, `.ckpt`/`.pt` only through
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

# component -> prefix in the single file, per family (reference checkpoint-keys/README.md)
PREFIXES: dict[str, dict[str, str]] = {
    "sd15": {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "clip_l": "cond_stage_model."},
    "sd21": {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "clip_h": "cond_stage_model."},
    "sdxl-base": {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "clip_l": "conditioner.embedders.0.",
        "clip_g": "conditioner.embedders.1.",
    },
    "sdxl-refiner": {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "clip_g": "conditioner.embedders.0.",
    },
    "sd3-medium": {
        "mmdit": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "clip_l": "text_encoders.clip_l.",
        "clip_g": "text_encoders.clip_g.",
        "t5xxl": "text_encoders.t5xxl.",
    },
    "dit-xl-2-256": {"dit": ""},
    "dit-xl-2-512": {"dit": ""},
}
PREFIXES["sd35-medium"] = PREFIXES["sd3-medium"]
PREFIXES["sd35-large"] = PREFIXES["sd3-medium"]

# Keys that are training state, not weights: LitEma copies (`model_ema.*`, dots stripped), the DDPM
# schedule buffers ldm stores at the top level, and the logvar of ldm's learned-variance option.
_STRAY = re.compile(
    r"^(model_ema\.|betas$|alphas_cumprod|alphas_cumprod_prev$|sqrt_|log_one_minus|posterior_|logvar$|"
    r"lvlb_weights$|model\.diffusion_model\.__)"
)

SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file, on the CPU, in their stored dtype."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    low = path.lower()
    if low.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    if low.endswith((".ckpt", ".pt", ".pth", ".bin")):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a pickle that needs code to load is refused, never executed
            raise ValueError(
                f"{path!r} cannot be loaded as plain tensors (weights_only=True refused it: {e}); "
                "convert it to .safetensors with the tool that made it"
            ) from e
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a state dict")
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    raise ValueError(f"unsupported checkpoint file {path!r}; expected one of {', '.join(SUFFIXES)}")


def save_state_dict(
    sd: Mapping[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None
) -> None:
    """Write a .safetensors file under a temporary name in the same folder, then rename it into place."""
    from safetensors.torch import save_file

    if not path.lower().endswith(".safetensors"):
        raise ValueError(f"checkpoints are written as .safetensors, got {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def strip_stray(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Drop EMA copies and schedule buffers; returns (weights, dropped keys)."""
    kept, dropped = {}, []
    for k, v in sd.items():
        (dropped.append(k) if _STRAY.match(k) else kept.__setitem__(k, v))
    return kept, dropped


@dataclass
class Detection:
    family: str  # a preset name: sd15, sd21, sdxl-base, sdxl-refiner, sd3-medium, sd35-medium, ...
    reason: str  # what in the file decided it, for the user

    def __str__(self) -> str:
        return f"{self.family} ({self.reason})"


def detect_family(shapes: Mapping[str, tuple[int, ...]]) -> Detection:
    """The family of a checkpoint from its keys and shapes (key -> shape; tensors' .shape work too)."""
    keys = shapes.keys()

    def shape(k):
        return tuple(shapes[k])

    if "x_embedder.proj.weight" in keys and "y_embedder.embedding_table.weight" in keys:
        n = shape("pos_embed")[1]
        fam = {256: "dit-xl-2-256", 1024: "dit-xl-2-512"}.get(n)
        if fam is None:
            raise ValueError(f"DiT checkpoint with {n} patches; known: 256 (256²) and 1024 (512²)")
        return Detection(fam, f"DiT keys, {n} position embeddings")
    mm = "model.diffusion_model."
    if f"{mm}joint_blocks.0.x_block.attn.qkv.weight" in keys:
        depth = sum(
            1
            for k in keys
            if re.fullmatch(rf"{re.escape(mm)}joint_blocks\.\d+\.x_block\.attn\.qkv\.weight", k)
        )
        qk = f"{mm}joint_blocks.0.x_block.attn.ln_q.weight" in keys
        attn2 = f"{mm}joint_blocks.0.x_block.attn2.qkv.weight" in keys
        if depth == 38 and qk:
            return Detection("sd35-large", "MMDiT, 38 blocks, QK RMSNorm")
        if depth == 24 and qk and attn2:
            return Detection("sd35-medium", "MMDiT-X, 24 blocks, QK RMSNorm, extra image self-attention")
        if depth == 24 and not qk:
            return Detection("sd3-medium", "MMDiT, 24 blocks, no QK norm")
        raise ValueError(f"unknown MMDiT variant: {depth} blocks, qk_norm={qk}, x-block attn2={attn2}")
    if f"{mm}label_emb.0.0.weight" in keys:
        adm = shape(f"{mm}label_emb.0.0.weight")[1]
        if adm == 2816:
            return Detection("sdxl-base", "SGM UNet with a 2816-wide label embedding")
        if adm == 2560:
            return Detection("sdxl-refiner", "SGM UNet with a 2560-wide label embedding")
        raise ValueError(
            f"SGM UNet with an unknown label-embedding width {adm} (SDXL base 2816, refiner 2560)"
        )
    k_attn = f"{mm}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    if k_attn in keys:
        ctx = shape(k_attn)[1]
        if ctx == 768:
            return Detection("sd15", "LDM UNet with 768-wide cross-attention (CLIP-L)")
        if ctx == 1024:
            return Detection("sd21", "LDM UNet with 1024-wide cross-attention (OpenCLIP ViT-H)")
        raise ValueError(f"LDM UNet with cross-attention width {ctx}; known: 768 (SD1), 1024 (SD2)")
    some = ", ".join(sorted(keys)[:5])
    raise ValueError(
        f"cannot tell the model family from these keys (first: {some}); expected an SD1/SD2/SDXL/SD3 "
        "single-file checkpoint or a DiT state dict"
    )


def split_components(sd: Mapping[str, torch.Tensor], family: str) -> dict[str, dict[str, torch.Tensor]]:
    """{component: state dict with its prefix stripped}; keys under no known prefix are returned under
    "unknown" so the caller can report them."""
    prefixes = PREFIXES[family]
    out: dict[str, dict[str, torch.Tensor]] = {c: {} for c in prefixes}
    out["unknown"] = {}
    order = sorted(prefixes.items(), key=lambda kv: -len(kv[1]))  # longest prefix first
    for k, v in sd.items():
        for comp, pre in order:
            if k.startswith(pre):
                out[comp][k[len(pre) :]] = v
                break
        else:
            out["unknown"][k] = v
    return out


def join_components(
    components: Mapping[str, Mapping[str, torch.Tensor]], family: str
) -> dict[str, torch.Tensor]:
    """The inverse of `split_components`: one state dict with the original prefixes."""
    prefixes = PREFIXES[family]
    out = {}
    for comp, sd in components.items():
        if comp not in prefixes:
            raise ValueError(
                f"component {comp!r} has no place in a {family} checkpoint; known: {list(prefixes)}"
            )
        out.update({prefixes[comp] + k: v for k, v in sd.items()})
    return out
