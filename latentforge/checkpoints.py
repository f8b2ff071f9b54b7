"""Single-file checkpoints: detect the family, split into components, load them strictly, write back.

The original single-file layouts (LDM/SGM `.ckpt`/`.safetensors`, SD3 reference, facebookresearch DiT)
keep every component under a prefix (families.py); a component's keys with the prefix stripped are exactly
our modules' state-dict keys (DESIGN.md, "Networks keep the original checkpoint layout"). Reading and
writing the tensors themselves is checkpoint_io.py.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from latentforge import families
from latentforge.checkpoint_io import SUFFIXES, read_metadata, read_state_dict, save_state_dict
from latentforge.families import FAMILIES

__all__ = [
    "SUFFIXES", "Detection", "Loaded", "build_component", "component_file", "configs_from_json",
    "configs_to_json", "detect_family", "join_components", "load_checkpoint", "load_component",
    "load_vae_file", "read_metadata", "read_state_dict", "save_checkpoint", "save_state_dict",
    "split_components", "state_dict_layout", "strip_stray", "unet_inputs",
]  # fmt: skip

# Keys that are training state, not weights: LitEma copies (`model_ema.*`, dots stripped), the DDPM
# schedule buffers ldm stores at the top level, and the logvar of ldm's learned-variance option.
_STRAY = re.compile(
    r"^(model_ema\.|betas$|alphas_cumprod|alphas_cumprod_prev$|sqrt_|log_one_minus|posterior_|logvar$|"
    r"lvlb_weights$|model\.diffusion_model\.__)"
)


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
    prefixes = families.get(family).prefixes
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
    prefixes = families.get(family).prefixes
    out = {}
    for comp, sd in components.items():
        if comp not in prefixes:
            raise ValueError(
                f"component {comp!r} has no place in a {family} checkpoint; known: {list(prefixes)}"
            )
        out.update({prefixes[comp] + k: v for k, v in sd.items()})
    return out


# --------------------------------------------------------------------------------------------
# Components: which network each part of a family's checkpoint is.


def build_component(name: str, config) -> torch.nn.Module:
    """The network for component `name` (unet, mmdit, dit, vae, clip_l, clip_h, clip_g, t5xxl) with
    `config`."""
    from latentforge.models import DiT, MMDiT, UNet
    from latentforge.models.t5 import T5Encoder
    from latentforge.models.text import CLIPTextModel
    from latentforge.models.vae import AutoencoderKL

    if name == "unet":
        return UNet(config)
    if name == "mmdit":
        return MMDiT(config)
    if name == "dit":
        return DiT(config)
    if name == "vae":
        return AutoencoderKL(config)
    if name in ("clip_l", "clip_h", "clip_g"):
        return CLIPTextModel(config)
    if name == "t5xxl":
        return T5Encoder(config)
    raise ValueError(f"no network for component {name!r}")


def _config_class(name: str):
    from latentforge.models import AutoencoderKLConfig, CLIPTextConfig, DiTConfig, MMDiTConfig, UNetConfig
    from latentforge.models.t5 import T5Config

    classes = {"unet": UNetConfig, "mmdit": MMDiTConfig, "dit": DiTConfig, "vae": AutoencoderKLConfig}
    classes["t5xxl"] = T5Config
    return classes.get(name, CLIPTextConfig)


def state_dict_layout(preset: str) -> dict[str, tuple[int, ...]]:
    """key -> shape of the single-file checkpoint `preset` loads, with the original prefixes (on meta)."""
    out = {}
    fam = families.get(preset)
    for name, cfg in fam.file_configs().items():
        with torch.device("meta"):
            module = build_component(name, cfg)
        pre = fam.prefixes[name]
        out.update({pre + k: tuple(v.shape) for k, v in module.state_dict().items()})
    return out


def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def configs_to_json(configs: Mapping[str, Any]) -> str:
    return json.dumps({k: dataclasses.asdict(c) for k, c in configs.items()})


def configs_from_json(text: str) -> dict[str, Any]:
    raw = json.loads(text)
    out = {}
    for name, fields in raw.items():
        cls = _config_class(name)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(
                f"the {name} config in this file has an unknown field {unknown[0]!r} "
                f"(written by a newer latentforge?); {cls.__name__} has: {', '.join(sorted(known))}"
            )
        out[name] = cls(**{k: _tuples(v) for k, v in fields.items()})
    return out


def save_checkpoint(path: str, family: str, components: Mapping[str, torch.nn.Module], configs=None) -> None:
    """Write a single-file checkpoint in the original layout (prefixes of `family`), atomically.
    The configs go into the safetensors metadata, so a model of any size loads back as it was."""
    sd = join_components({n: m.state_dict() for n, m in components.items()}, family)
    meta = {"latentforge.family": family}
    if configs:
        meta["latentforge.configs"] = configs_to_json(configs)
    save_state_dict(sd, path, metadata=meta)


@dataclass
class Loaded:
    family: str
    detection: Detection
    components: dict[str, torch.nn.Module]
    configs: dict[str, Any]
    dropped: list[str]  # EMA copies and buffers that were not loaded
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)  # the file's safetensors metadata


def _not_loaded(key: str) -> bool:
    """Keys of a single file that `_load` drops rather than loads (EMA copies and schedule buffers, and the T5
    when it is not loaded from this file): read in their stored dtype and left unconverted, so they cost no
    memory beyond the file's mapping."""
    t5 = tuple(f.prefixes[c] for f in FAMILIES.values() for c in f.optional)
    return bool(_STRAY.match(key)) or key.startswith(t5)


def _stray(key: str) -> bool:
    return bool(_STRAY.match(key))


def load_component(name, cfg, sd, dtype, source) -> torch.nn.Module:
    with torch.device("meta"):
        module = build_component(name, cfg)
    expected = module.state_dict()
    if name == "t5xxl":  # the table tied to `shared` may come as (or also as) encoder.embed_tokens
        from latentforge.models.t5 import canonical_keys

        sd = canonical_keys(sd, "transformer.")
    if "transformer.text_model.embeddings.position_ids" in expected and (
        "transformer.text_model.embeddings.position_ids" not in sd
    ):  # newer exports drop this constant buffer
        sd = {
            **sd,
            "transformer.text_model.embeddings.position_ids": torch.arange(cfg.max_position_embeddings)[None],
        }
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source}: component {name!r} does not match its network: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(
                f"{source}: {name}.{k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}"
            )
    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    module.load_state_dict(sd, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def component_file(name: str, path: str) -> dict[str, torch.Tensor]:
    """A separately distributed component (a VAE, a text encoder) in any of its usual namings: inside a
    single-file prefix, bare (ComfyUI's `clip_l.safetensors`: `text_model.*`), or exactly our keys; or the
    component taken out of a whole single-file checkpoint (e.g. its VAE: `first_stage_model.*`)."""
    sd, _ = strip_stray(read_state_dict(path))
    prefixes = {f.prefixes[name] for f in FAMILIES.values() if name in f.prefixes}
    prefixes |= {"first_stage_model.", "vae."}
    ordered = [pre for pre in sorted(prefixes, key=len, reverse=True) if pre]
    for pre in ordered:
        if all(k.startswith(pre) for k in sd):
            sd = {k[len(pre) :]: v for k, v in sd.items()}
            break
    else:  # a whole checkpoint: the component's keys under its single-file prefix, the rest left out
        for pre in ordered:
            if any(k.startswith(pre) for k in sd):
                sd = {k[len(pre) :]: v for k, v in sd.items() if k.startswith(pre)}
                break
    if name == "t5xxl" and any(k.startswith(("shared.", "encoder.")) for k in sd):  # HF T5EncoderModel file
        sd = {"transformer." + k: v for k, v in sd.items()}
    if name.startswith("clip_"):
        if any(k.startswith("text_model.") for k in sd):  # HF CLIPTextModel(WithProjection) file
            sd = {"transformer." + k: v for k, v in sd.items()}
        elif any(k.startswith(("transformer.resblocks.", "token_embedding.")) for k in sd):  # bare open_clip
            sd = {"model." + k: v for k, v in sd.items()}
    return sd


def load_checkpoint(
    path: str,
    dtype: torch.dtype = torch.float32,
    vae: str | None = None,
    text_encoders: Mapping[str, str] | None = None,
    t5_tokenizer: str | None = None,
) -> Loaded:
    """Load a single-file checkpoint: detect its family, strip EMA copies and stray buffers, and load
    every component strictly in `dtype`. `vae` overrides the checkpoint's VAE with a separate file;
    `text_encoders` ({"clip_l": path, "t5xxl": path, ...}) overrides or supplies its text encoders.

    SD3's T5-XXL loads from the checkpoint (`text_encoders.t5xxl.transformer.*`) or from its own file (HF
    names, `t5xxl_fp16.safetensors`), with its tokenizer (t5_tokenizer.py): `t5_tokenizer` (a tokenizer.json
    or its folder), else one found beside the T5 file or the checkpoint. A T5 file given without a tokenizer
    found is an error; a T5 inside the checkpoint without one is dropped with a warning (the conditioning
    then has zeros in its place, as without a T5)."""
    from latentforge import t5_tokenizer as t5tok

    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    text_encoders = dict(text_encoders or {})
    t5_file = text_encoders.get("t5xxl")
    beside = [t5_file, path] if t5_file else [path]
    tok = t5tok.find(t5_tokenizer, beside)
    if t5_file is not None and tok is None:
        raise FileNotFoundError(f"{t5_file}: {t5tok.not_found(beside)}")
    if tok is not None and (t5_file or t5_tokenizer):  # asked for: read (and checked) before the weights
        tok = t5tok.T5Tokenizer.from_file(tok)
    in_file_t5 = tok is not None and t5_file is None  # converted while reading, like the other components
    raw = read_state_dict(path, dtype, keep_stored=_stray if in_file_t5 else _not_loaded)
    meta = read_metadata(path)
    try:
        return _load(path, raw, meta, dtype, vae, text_encoders, (tok, beside))
    except ValueError as e:
        if str(e).startswith(path):
            raise
        raise ValueError(f"{path}: {e}") from e


def _load(path, raw, meta, dtype, vae, text_encoders, t5) -> Loaded:
    sd, dropped = strip_stray(raw)
    if "latentforge.family" in meta:
        family = meta["latentforge.family"]
        if family not in FAMILIES:
            raise ValueError(f"{path}: metadata names an unknown family {family!r}")
        detection = Detection(family, "named in the file's latentforge metadata")
    else:
        detection = detect_family({k: tuple(v.shape) for k, v in sd.items()})
        family = detection.family
    parts = split_components(sd, family)
    if parts["unknown"]:
        some = sorted(parts["unknown"])[:5]
        raise ValueError(
            f"{path}: {len(parts['unknown'])} keys belong to no component of {family} (e.g. {some})"
        )
    fam = families.get(family)
    configs = fam.file_configs()
    if "latentforge.configs" in meta:
        configs.update(configs_from_json(meta["latentforge.configs"]))
    if vae is not None:
        parts["vae"] = component_file("vae", vae)
        vmeta = read_metadata(vae)  # a VAE trained here names its own config and latent scale
        own = configs_from_json(vmeta["latentforge.configs"]) if "latentforge.configs" in vmeta else {}
        configs["vae"] = own.get("vae") or configs.get("vae") or fam.configs()["vae"]
        meta = dict(meta)
        meta.pop("latentforge.latent_format", None)  # the main file's scale belonged to its own VAE
        if "latentforge.latent_format" in vmeta:
            meta["latentforge.latent_format"] = vmeta["latentforge.latent_format"]
    if parts.get("unet"):  # 9-channel inpainting UNets: the released architecture, a wider input conv
        configs["unet"], why = unet_inputs(configs["unet"], parts["unet"])
        detection = Detection(family, f"{detection.reason}; {why}") if why else detection
    sources = {}
    for name, file in text_encoders.items():
        known = [c for c in fam.prefixes if c.startswith(("clip_", "t5"))]
        if name not in known:
            raise ValueError(f"{family} has no text encoder {name!r}; its text encoders: {known}")
        parts[name], sources[name] = component_file(name, file), file
    if parts.get("t5xxl") and not _t5_part(parts["t5xxl"], configs, t5, "t5xxl" in text_encoders):
        dropped.extend(fam.prefixes["t5xxl"] + k for k in parts.pop("t5xxl"))
    components = {}
    for name, psd in parts.items():
        if name == "unknown" or not psd:
            continue
        if name not in configs:  # a VAE saved beside a DiT
            configs[name] = fam.configs()[name]
        source = sources.get(name, f"{path} ({detection})")
        components[name] = load_component(name, configs[name], psd, dtype, source)
    if "t5xxl" in components:
        from latentforge.t5_tokenizer import T5Tokenizer

        tok = t5[0]  # a path found beside the checkpoint, or the tokenizer asked for
        components["t5xxl"].tokenizer = tok if isinstance(tok, T5Tokenizer) else T5Tokenizer.from_file(tok)
    return Loaded(
        family, detection, components, {k: v for k, v in configs.items() if k in components}, dropped, meta
    )


def _t5_part(psd, configs, t5, separate: bool) -> bool:
    """Whether the T5 loads (not when no tokenizer was found: then it is dropped, with a warning); sets its
    config in `configs`: the file's own (a checkpoint written here) or read from the shapes."""
    from latentforge import t5_tokenizer as t5tok
    from latentforge.models.t5 import canonical_keys, config_from_state_dict

    tok, beside = t5
    if tok is None:
        warnings.warn(
            f"the checkpoint holds a T5-XXL, which is not loaded: {t5tok.not_found(beside)}", stacklevel=4
        )
        return False
    if separate or "t5xxl" not in configs:
        configs["t5xxl"] = config_from_state_dict(canonical_keys(psd, "transformer."))
    return True


def unet_inputs(config, sd: Mapping[str, torch.Tensor]) -> tuple[Any, str]:
    """(the UNet config with `in_channels` read from the weights, a note for the detection or ""): SD1.5-,
    SD2- and SDXL-inpainting have their family's UNet with 2C + 1 input channels (x, the mask, the masked
    image's latents; img2img.ConcatInputs). Other widths (instruct-pix2pix's 2C) are refused by name."""
    w = sd.get("input_blocks.0.0.weight")
    if w is None or w.ndim != 4 or w.shape[1] == config.in_channels:
        return config, ""
    n, c = int(w.shape[1]), config.out_channels
    if n != 2 * c + 1:
        raise ValueError(
            f"the UNet takes {n} input channels (input_blocks.0.0.weight {tuple(w.shape)}); supported: "
            f"{c} (ordinary checkpoints) and {2 * c + 1} (inpainting checkpoints)"
        )
    return dataclasses.replace(config, in_channels=n), f"{n}-channel UNet input: an inpainting model"


def load_vae_file(path: str):
    """A frozen float32 VAE from a file (ours from `train vae`, or any SD VAE in its usual namings) and its
    latent format: the file's measured scale when it has one, else SD's (0.18215; 1.5305/0.0609 for the
    16-channel SD3 VAE)."""
    from latentforge.models.vae import LATENT_FORMATS, LatentFormat

    meta = read_metadata(path)
    configs = configs_from_json(meta["latentforge.configs"]) if "latentforge.configs" in meta else {}
    sd = component_file("vae", path)
    if "vae" in configs:
        vcfg = configs["vae"]
    elif sd.get("encoder.conv_out.weight") is not None and sd["encoder.conv_out.weight"].shape[0] == 32:
        vcfg = families.get("sd3-medium").configs()["vae"]  # 2 x 16 moments
    else:
        vcfg = families.get("sd15").configs()["vae"]
    vae = load_component("vae", vcfg, sd, torch.float32, path)
    if "latentforge.latent_format" in meta:
        fmt = LatentFormat.from_json(meta["latentforge.latent_format"])
    else:
        fmt = LATENT_FORMATS["sd3"] if vae.latent_channels == 16 else LATENT_FORMATS["sd1"]
    return vae, fmt
