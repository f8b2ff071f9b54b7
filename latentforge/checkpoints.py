"""Single-file checkpoints: read, detect the family, split into components, write back atomically.

The original single-file layouts (LDM/SGM `.ckpt`/`.safetensors`, SD3 reference, facebookresearch DiT)
keep every component under a prefix; a component's keys with the prefix stripped are exactly our
modules' state-dict keys (DESIGN.md, "Networks keep the original checkpoint layout").
Nothing is unpickled: `.safetensors` through safetensors, `.ckpt`/`.pt` only through
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
import sys
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

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
    # DiT releases hold the bare network; a VAE saved beside it (our files) sits under the LDM prefix
    "dit-xl-2-256": {"dit": "", "vae": "first_stage_model."},
    "dit-xl-2-512": {"dit": "", "vae": "first_stage_model."},
    # our text-conditioned DiT (DiT + cross-attention, PixArt-α style) in the LDM single-file layout
    "dit-text": {"dit": "model.diffusion_model.", "vae": "first_stage_model.", "clip_l": "cond_stage_model."},
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


def read_state_dict(
    path: str, dtype: torch.dtype | None = None, keep_stored: Callable[[str], bool] | None = None
) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file, on the CPU, in their stored dtype, or with every floating tensor
    converted to `dtype` while reading except those whose key `keep_stored(key)` accepts.

    Converting here, one tensor at a time, keeps the peak memory of a float16 file loaded in float32 at the
    float32 weights plus one stored tensor, instead of the whole stored dict plus the whole converted copy.
    `.safetensors`: tensors that need no conversion are mapped lazily by safetensors (a page is read when it
    is touched); converted ones are read with plain reads and never mapped. `.ckpt`/`.pt`: torch.load reads
    everything; each converted tensor replaces its source as it goes, so the source can be freed."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype or None, got {dtype}")
    keep = keep_stored or (lambda key: False)
    low = path.lower()
    if low.endswith(".safetensors"):
        return _read_safetensors(path, dtype, keep)
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
        out = {}
        for k in list(obj):
            # popped (when the mapping allows it) so that a converted tensor's source can be freed now
            v = obj.pop(k) if isinstance(obj, MutableMapping) else obj[k]
            if isinstance(v, torch.Tensor):
                convert = dtype is not None and v.is_floating_point() and not keep(k)
                out[k] = v.to(dtype) if convert else v
            del v
        return out
    raise ValueError(f"unsupported checkpoint file {path!r}; expected one of {', '.join(SUFFIXES)}")


# Floating dtypes of the safetensors header (format: huggingface/safetensors README, "Format") that
# `_read_safetensors` reads and converts itself; every other dtype goes through safetensors.
_SAFETENSORS_FLOATS = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16
}  # fmt: skip


def _safetensors_header(path: str) -> tuple[dict[str, dict], int]:
    """({key: {"dtype", "shape", "data_offsets"}}, byte offset of the data section). A safetensors file is
    an 8-byte little-endian u64 N, an N-byte JSON header, then the data (offsets relative to its start).
    Called only after safetensors itself has opened, and so validated, the file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def _read_safetensors(
    path: str, dtype: torch.dtype | None, keep: Callable[[str], bool]
) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error type for bad headers and short files
        size = os.path.getsize(path)
        raise ValueError(
            f"{path!r} is not a readable safetensors file ({size} bytes; truncated or not a checkpoint): {e}"
        ) from e
    with handle as f:
        keys = list(f.keys())
        read_here: dict[str, torch.dtype] = {}  # key -> stored dtype, for the tensors converted here
        if dtype is not None and sys.byteorder == "little":  # the stored bytes are little-endian
            header, data_start = _safetensors_header(path)
            for k in keys:
                stored = _SAFETENSORS_FLOATS.get(header[k]["dtype"])
                if stored is not None and stored != dtype and not keep(k):
                    read_here[k] = stored
        out: dict[str, torch.Tensor] = {}
        for k in keys:
            if k not in read_here:  # mapped by safetensors; pages are read (and count in RSS) when touched
                t = f.get_tensor(k)
                convert = dtype is not None and t.is_floating_point() and not keep(k)
                out[k] = t.to(dtype) if convert else t  # converts only dtypes missing from the table above
    if read_here:
        converted = _read_converted(path, header, data_start, read_here, dtype)
        out = {k: out[k] if k in out else converted[k] for k in keys}  # the file's key order
    return out


def _read_converted(
    path: str, header: dict[str, dict], data_start: int, stored: dict[str, torch.dtype], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The tensors `stored` names, read in file order with plain reads into one reusable buffer and each
    converted into a new tensor of `dtype`: the peak memory is the converted tensors plus the largest stored
    one, and no page of the file stays mapped (converting from safetensors' mapping would keep every stored
    page resident until the last tensor of the file is freed)."""
    spans = {k: header[k]["data_offsets"] for k in stored}  # key -> [begin, end) in the data section
    scratch = bytearray(max(b - a for a, b in spans.values()))
    scratch_t = torch.frombuffer(scratch, dtype=torch.uint8) if scratch else torch.empty(0, dtype=torch.uint8)
    out = {}
    with open(path, "rb", buffering=0) as f:
        for k in sorted(stored, key=lambda k: spans[k][0]):
            a, b = spans[k]
            dst = torch.empty(header[k]["shape"], dtype=dtype)  # [*shape] in the target dtype
            f.seek(data_start + a)
            view = memoryview(scratch)[: b - a]
            while view:  # a read may return fewer bytes than asked
                got = f.readinto(view)
                if not got:
                    raise ValueError(f"{path!r} is truncated: tensor {k!r} ends past the end of the file")
                view = view[got:]
            if b > a:
                dst.copy_(scratch_t[: b - a].view(stored[k]).view(dst.shape))
            out[k] = dst
    return out


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


# --------------------------------------------------------------------------------------------
# Components: which network (and which preset) each part of a family's checkpoint is.


def _sd3_clip_l():
    from latentforge.models.text import PRESETS

    return dataclasses.replace(PRESETS["clip-l"], projection_dim=768)  # CLIPTextModelWithProjection


def _sd3_clip_g():
    from latentforge.models.text import CLIPTextConfig

    # SD3 stores bigG in the HF (OpenAI) naming: `transformer.text_model.*` + `transformer.text_projection`
    return CLIPTextConfig(
        layout="openai", hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
        num_attention_heads=20, hidden_act="gelu", projection_dim=1280,
    )  # fmt: skip


def preset_configs(family: str) -> dict[str, Any]:
    """{component: config} of the full-size networks of a family's single-file checkpoint."""
    from latentforge.models import DIT_PRESETS, MMDIT_PRESETS, TEXT_PRESETS, UNET_PRESETS, VAE_PRESETS

    if family in ("sd15", "sd21", "sdxl-base", "sdxl-refiner"):
        text = {
            "sd15": {"clip_l": TEXT_PRESETS["clip-l"]},
            "sd21": {"clip_h": TEXT_PRESETS["openclip-h"]},
            "sdxl-base": {"clip_l": TEXT_PRESETS["clip-l"], "clip_g": TEXT_PRESETS["openclip-bigg"]},
            "sdxl-refiner": {"clip_g": TEXT_PRESETS["openclip-bigg"]},
        }[family]
        return {"unet": UNET_PRESETS[family], "vae": VAE_PRESETS["sd"], **text}
    if family in ("sd3-medium", "sd35-medium", "sd35-large"):
        return {
            "mmdit": MMDIT_PRESETS[family],
            "vae": VAE_PRESETS["sd3"],
            "clip_l": _sd3_clip_l(),
            "clip_g": _sd3_clip_g(),
        }
    if family in ("dit-xl-2-256", "dit-xl-2-512"):
        return {"dit": DIT_PRESETS[family]}
    if family == "dit-text":  # no released model: a DiT-S/2-sized default (files carry their own configs)
        dit = dataclasses.replace(
            DIT_PRESETS["dit-xl-2-256"], hidden_size=384, depth=12, num_heads=6, class_dropout_prob=0.0,
            num_classes=0, learn_sigma=False, context_dim=768, pooled_dim=768,
        )  # fmt: skip
        return {"dit": dit, "vae": VAE_PRESETS["sd"], "clip_l": TEXT_PRESETS["clip-l"]}
    raise ValueError(f"unknown preset {family!r}; known: {', '.join(PREFIXES)}")


def build_component(name: str, config) -> torch.nn.Module:
    """The network for component `name` (unet, mmdit, dit, vae, clip_l, clip_h, clip_g) with `config`."""
    from latentforge.models import DiT, MMDiT, UNet
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
    raise ValueError(f"no network for component {name!r} (T5-XXL is not supported yet)")


def _config_class(name: str):
    from latentforge.models import AutoencoderKLConfig, CLIPTextConfig, DiTConfig, MMDiTConfig, UNetConfig

    classes = {"unet": UNetConfig, "mmdit": MMDiTConfig, "dit": DiTConfig, "vae": AutoencoderKLConfig}
    return classes.get(name, CLIPTextConfig)


def state_dict_layout(preset: str) -> dict[str, tuple[int, ...]]:
    """key -> shape of the single-file checkpoint `preset` loads, with the original prefixes (on meta)."""
    out = {}
    for name, cfg in preset_configs(preset).items():
        with torch.device("meta"):
            module = build_component(name, cfg)
        pre = PREFIXES[preset][name]
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
        out[name] = cls(**{k: _tuples(v) for k, v in fields.items() if k in known})
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


def _read_metadata(path: str) -> dict[str, str]:
    if not path.lower().endswith(".safetensors"):
        return {}
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}


def _not_loaded(key: str) -> bool:
    """Keys of a single file that `_load` drops rather than loads (EMA copies and schedule buffers, T5):
    read in their stored dtype and left unconverted, so they cost no memory beyond the file's mapping."""
    t5 = tuple(p["t5xxl"] for p in PREFIXES.values() if "t5xxl" in p)
    return bool(_STRAY.match(key)) or key.startswith(t5)


def _load_component(name, cfg, sd, dtype, source) -> torch.nn.Module:
    with torch.device("meta"):
        module = build_component(name, cfg)
    expected = module.state_dict()
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


def _component_file(name: str, path: str) -> dict[str, torch.Tensor]:
    """A separately distributed component (a VAE, a text encoder) in any of its usual namings: inside a
    single-file prefix, bare (ComfyUI's `clip_l.safetensors`: `text_model.*`), or exactly our keys."""
    sd, _ = strip_stray(read_state_dict(path))
    prefixes = {p[name] for p in PREFIXES.values() if name in p} | {"first_stage_model.", "vae."}
    for pre in sorted(prefixes, key=len, reverse=True):
        if pre and all(k.startswith(pre) for k in sd):
            sd = {k[len(pre) :]: v for k, v in sd.items()}
            break
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
) -> Loaded:
    """Load a single-file checkpoint: detect its family, strip EMA copies and stray buffers, and load
    every component strictly in `dtype`. `vae` overrides the checkpoint's VAE with a separate file;
    `text_encoders` ({"clip_l": path, ...}) overrides or supplies its text encoders."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    raw = read_state_dict(path, dtype, keep_stored=_not_loaded)  # converted while reading
    meta = _read_metadata(path)
    try:
        return _load(path, raw, meta, dtype, vae, dict(text_encoders or {}))
    except ValueError as e:
        if str(e).startswith(path):
            raise
        raise ValueError(f"{path}: {e}") from e


def _load(path, raw, meta, dtype, vae, text_encoders) -> Loaded:
    sd, dropped = strip_stray(raw)
    if "latentforge.family" in meta:
        family = meta["latentforge.family"]
        if family not in PREFIXES:
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
    configs = preset_configs(family)
    if "latentforge.configs" in meta:
        configs.update(configs_from_json(meta["latentforge.configs"]))
    if vae is not None:
        parts["vae"] = _component_file("vae", vae)
        vmeta = _read_metadata(vae)  # a VAE trained here names its own config and latent scale
        own = configs_from_json(vmeta["latentforge.configs"]) if "latentforge.configs" in vmeta else {}
        configs["vae"] = own.get("vae") or configs.get("vae") or preset_configs("sd15")["vae"]
        meta = dict(meta)
        meta.pop("latentforge.latent_format", None)  # the main file's scale belonged to its own VAE
        if "latentforge.latent_format" in vmeta:
            meta["latentforge.latent_format"] = vmeta["latentforge.latent_format"]
    for name, file in text_encoders.items():
        if name not in configs or not name.startswith("clip_"):
            known = [c for c in configs if c.startswith("clip_")]
            raise ValueError(f"{family} has no text encoder {name!r}; its text encoders: {known}")
        parts[name] = _component_file(name, file)
    components = {}
    for name, psd in parts.items():
        if name == "unknown" or not psd:
            continue
        if name == "t5xxl":
            dropped.extend("text_encoders.t5xxl." + k for k in psd)  # T5 is not supported yet: zeros instead
            continue
        if name not in configs:
            configs[name] = preset_configs("sd15")["vae"] if name == "vae" else None
        components[name] = _load_component(name, configs[name], psd, dtype, f"{path} ({detection})")
    return Loaded(
        family, detection, components, {k: v for k, v in configs.items() if k in components}, dropped, meta
    )
