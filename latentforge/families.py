"""One `Family` entry per model family: everything that differs between SD1, SD2, SDXL, SD3, DiT, ... as data.

A family is what a single-file checkpoint is an instance of: which components it holds under which key prefix
(reference checkpoint-keys/README.md), the configs of its released networks, how its network becomes a
denoiser (model sampling), how its VAE latents are scaled (latent format), the size it was trained at, which
text encoders it has and how prompts become the network's conditioning (conditioning.py). Adding a family is
adding one entry to `FAMILIES`; no other module tests family names.

    family          net    text encoders     model sampling                     latent format      size
    sd15            unet   clip_l            DDPM eps, scaled_linear            0.18215            512
    sd21            unet   clip_h            DDPM v (the 768-v release)         0.18215            768
    sdxl-base       unet   clip_l, clip_g    DDPM eps                           0.13025            1024
    sdxl-refiner    unet   clip_g            DDPM eps                           0.13025            1024
    sd3-medium ...  mmdit  clip_l, clip_g    rectified flow, shift 3.0          1.5305, +0.0609    1024
                           (+ t5xxl, optional)
    dit-xl-2-*      dit    (class labels)    DDPM eps, linear 1e-4..0.02        0.18215            config
    dit-text        dit    clip_l            DDPM eps (files carry their own)   0.18215            config
    mmdit-text      mmdit  clip_l            rectified flow, shift 1 (files     0.18215            config
                                             carry their own)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from latentforge import conditioning
from latentforge import prompts as prompt_syntax
from latentforge.model_sampling import DiscreteFlow, DiscreteVP, ModelSampling
from latentforge.models.dit import PRESETS as DIT_PRESETS
from latentforge.models.mmdit import PRESETS as MMDIT_PRESETS
from latentforge.models.text import PRESETS as TEXT_PRESETS
from latentforge.models.text import CLIPTextConfig
from latentforge.models.unet import PRESETS as UNET_PRESETS
from latentforge.models.vae import LATENT_FORMATS, LatentFormat
from latentforge.models.vae import PRESETS as VAE_PRESETS

# Conditioning: (encoders, prompts, width, height, negative, net_config) -> the network's kwargs
Conditioning = Callable[[dict, list[str], int, int, bool, Any], dict]


@dataclass(frozen=True)
class Family:
    name: str
    net: str  # the denoising network's component name: "unet" | "mmdit" | "dit"
    prefixes: Mapping[str, str]  # component -> key prefix in the single file
    configs: Callable[[], dict[str, Any]]  # component -> config of the released networks a pipeline needs
    sampling: Callable[[str | None, float | None], ModelSampling]  # (prediction, shift) -> model sampling
    latent_format: LatentFormat  # denoiser latent = (VAE latent − shift)·scale (architectures.md §2.2)
    condition: Conditioning
    size: int | None = None  # the pixel size it was trained at; None: fixed by the network config (DiT)
    in_file: tuple[str, ...] | None = None  # components its released file holds, when not all of `configs`
    optional: frozenset[str] = frozenset()  # components that may be absent (SD3's T5-XXL: zeros without it)
    trainable: bool = False  # `latentforge train denoiser --family` accepts it
    class_labels: bool = False  # prompts are class indices and the unconditional branch is the null class
    # the prediction of its 9-channel inpainting release when it differs from the family's default (SD2's
    # 512-inpainting-ema is an ε model, v2-inpainting-inference.yaml, unlike the 768-v release)
    inpaint_prediction: str | None = None

    @property
    def text_encoders(self) -> tuple[str, ...]:
        return tuple(c for c in self.prefixes if c.startswith(("clip_", "t5")) and c not in self.optional)

    def file_configs(self) -> dict[str, Any]:
        """component -> config of the components its released single file holds."""
        configs = self.configs()
        return {k: v for k, v in configs.items() if self.in_file is None or k in self.in_file}


# -- model sampling ------------------------------------------------------------------------------------------


def _vp(default: str, **table) -> Callable[[str | None, float | None], ModelSampling]:
    def make(prediction: str | None, shift: float | None) -> ModelSampling:
        if shift is not None:
            raise ValueError("shift applies to the rectified-flow models (sd3, sd35), not to a DDPM model")
        return DiscreteVP(prediction=prediction or default, **table)

    return make


def _flow(default_shift: float) -> Callable[[str | None, float | None], ModelSampling]:
    def make(prediction: str | None, shift: float | None) -> ModelSampling:
        if prediction not in (None, "flow"):
            raise ValueError(
                f"a rectified-flow model predicts velocity; prediction={prediction!r} does not apply"
            )
        return DiscreteFlow(shift=default_shift if shift is None else float(shift))

    return make


# -- components --------------------------------------------------------------------------------------------

_LDM = {"unet": "model.diffusion_model.", "vae": "first_stage_model."}
_SD3 = {
    "mmdit": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "clip_l": "text_encoders.clip_l.",
    "clip_g": "text_encoders.clip_g.",
    "t5xxl": "text_encoders.t5xxl.",
}


def _unet(name: str, **text) -> Callable[[], dict[str, Any]]:
    def configs() -> dict[str, Any]:
        return {
            "unet": UNET_PRESETS[name],
            "vae": VAE_PRESETS["sd"],
            **{k: TEXT_PRESETS[v] for k, v in text.items()},
        }

    return configs


def _sd3(name: str) -> Callable[[], dict[str, Any]]:
    def configs() -> dict[str, Any]:
        # SD3's CLIP-L has a projection (CLIPTextModelWithProjection); its bigG is stored in the HF (OpenAI)
        # naming: `transformer.text_model.*` + `transformer.text_projection`
        clip_g = CLIPTextConfig(
            layout="openai", hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
            num_attention_heads=20, hidden_act="gelu", projection_dim=1280,
        )  # fmt: skip
        clip_l = dataclasses.replace(TEXT_PRESETS["clip-l"], projection_dim=768)
        return {"mmdit": MMDIT_PRESETS[name], "vae": VAE_PRESETS["sd3"], "clip_l": clip_l, "clip_g": clip_g}

    return configs


def _dit_text() -> dict[str, Any]:
    # no released model: a DiT-S/2-sized default (files carry their own configs)
    dit = dataclasses.replace(
        DIT_PRESETS["dit-xl-2-256"], hidden_size=384, depth=12, num_heads=6, class_dropout_prob=0.0,
        num_classes=0, learn_sigma=False, context_dim=768, pooled_dim=768,
    )  # fmt: skip
    return {"dit": dit, "vae": VAE_PRESETS["sd"], "clip_l": TEXT_PRESETS["clip-l"]}


def _mmdit_text() -> dict[str, Any]:
    # no released model: an SD3-style MMDiT of 12 blocks (hidden 768) reading one CLIP-L tower's tokens and
    # pooled vector, for 256² images (32² latents in 2×2 patches); files carry their own configs
    mmdit = dataclasses.replace(
        MMDIT_PRESETS["sd3-medium"], depth=12, in_channels=4, out_channels=4, adm_in_channels=768,
        context_dim=768, pos_embed_max_size=16, num_patches=256,
    )  # fmt: skip
    return {"mmdit": mmdit, "vae": VAE_PRESETS["sd"], "clip_l": TEXT_PRESETS["clip-l"]}


def _entries() -> dict[str, Family]:
    sd1, sd2, sdxl = LATENT_FORMATS["sd1"], LATENT_FORMATS["sd2"], LATENT_FORMATS["sdxl"]
    out = [
        Family(
            "sd15", net="unet", prefixes={**_LDM, "clip_l": "cond_stage_model."},
            configs=_unet("sd15", clip_l="clip-l"), sampling=_vp("eps"), latent_format=sd1,
            condition=conditioning.sd15, size=512, trainable=True,
        ),
        Family(
            "sd21", net="unet", prefixes={**_LDM, "clip_h": "cond_stage_model."},
            configs=_unet("sd21", clip_h="openclip-h"), sampling=_vp("v"), latent_format=sd2,
            condition=conditioning.sd21, size=768, trainable=True, inpaint_prediction="eps",
        ),
        Family(
            "sdxl-base", net="unet",
            prefixes={**_LDM, "clip_l": "conditioner.embedders.0.", "clip_g": "conditioner.embedders.1."},
            configs=_unet("sdxl-base", clip_l="clip-l", clip_g="openclip-bigg"), sampling=_vp("eps"),
            latent_format=sdxl, condition=conditioning.sdxl_base, size=1024, trainable=True,
        ),
        Family(
            "sdxl-refiner", net="unet", prefixes={**_LDM, "clip_g": "conditioner.embedders.0."},
            configs=_unet("sdxl-refiner", clip_g="openclip-bigg"), sampling=_vp("eps"), latent_format=sdxl,
            condition=conditioning.sdxl_refiner, size=1024,
        ),
    ]  # fmt: skip
    for name in ("sd3-medium", "sd35-medium", "sd35-large"):
        out.append(
            Family(
                name,
                net="mmdit",
                prefixes=_SD3,
                configs=_sd3(name),
                sampling=_flow(3.0),
                latent_format=LATENT_FORMATS["sd3"],
                condition=conditioning.sd3,
                size=1024,
                optional=frozenset({"t5xxl"}),
                trainable=True,
            )  # fmt: skip
        )
    for name in ("dit-xl-2-256", "dit-xl-2-512"):
        # DiT releases hold the bare network; DiT sample.py decodes with sd-vae-ft-ema/mse as
        # vae.decode(z / 0.18215). A VAE saved beside it (our files) sits under the LDM prefix.
        # Betas: linear 1e-4..0.02 (DiT diffusion/__init__.py).
        out.append(
            Family(
                name,
                net="dit",
                prefixes={"dit": "", "vae": "first_stage_model."},
                configs=lambda name=name: {"dit": DIT_PRESETS[name], "vae": VAE_PRESETS["sd"]},
                sampling=_vp("eps", beta_schedule="linear", linear_start=1e-4, linear_end=0.02),
                latent_format=LatentFormat(0.18215),
                condition=conditioning.dit,
                in_file=("dit",),
                class_labels=True,
            )  # fmt: skip
        )
    # our text-conditioned DiT (DiT + cross-attention, PixArt-α style) in the LDM single-file layout
    out.append(
        Family(
            "dit-text",
            net="dit",
            prefixes={
                "dit": "model.diffusion_model.",
                "vae": "first_stage_model.",
                "clip_l": "cond_stage_model.",
            },
            configs=_dit_text,
            sampling=_vp("eps"),
            latent_format=LatentFormat(0.18215),
            condition=conditioning.clip_text,
            trainable=True,
        )  # fmt: skip
    )
    # our text-conditioned MMDiT (SD3's joint attention with one CLIP tower) in the LDM single-file layout
    out.append(
        Family(
            "mmdit-text",
            net="mmdit",
            prefixes={
                "mmdit": "model.diffusion_model.",
                "vae": "first_stage_model.",
                "clip_l": "cond_stage_model.",
            },
            configs=_mmdit_text,
            sampling=_flow(1.0),
            latent_format=LatentFormat(0.18215),
            condition=conditioning.clip_text,
            trainable=True,
        )  # fmt: skip
    )
    return {f.name: f for f in out}


FAMILIES: dict[str, Family] = _entries()
PIXEL_FORMAT = LatentFormat(1.0)  # pixel-space models: the "latent" is the image in [-1, 1]


def get(name: str) -> Family:
    """The family named `name`, or an error listing the known ones."""
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def trainable() -> tuple[str, ...]:
    return tuple(n for n, f in FAMILIES.items() if f.trainable)


def encode(
    family: str,
    encoders: dict,
    prompts: list[str],
    width: int,
    height: int,
    negative: bool = False,
    net_config: Any = None,
    weighting: str = "a1111",
) -> dict:
    """The network's conditioning kwargs for `prompts` (one per image) under `family`.

    encoders: component name -> CLIPTextModel (clip_l, clip_h, clip_g). width, height: the image size in
    pixels (SDXL's size conditioning). negative: this is the unconditional branch (refiner aesthetic score,
    DiT null class). net_config: the denoising network's config (SD3's context width, DiT's class count);
    None takes the released model's. weighting: how A1111's emphasis syntax weighs the CLIP outputs,
    "a1111" | "comfy" | "none" (literal text) (latentforge.prompts). Long prompts are encoded in chunks
    (context [B, n·77, D]); the prompts of one call are padded to the same chunk count.
    """
    fam = get(family)
    prompts = _check_prompts(prompts)
    prompt_syntax.check_weighting(weighting)
    net_config = net_config if net_config is not None else fam.configs()[fam.net]
    if getattr(net_config, "mask_text_padding", False) and fam.condition not in (
        conditioning.sd15,
        conditioning.clip_text,
    ):
        raise ValueError(
            f"mask_text_padding is supported for a single CLIP tower only (sd15, dit-text, mmdit-text), not "
            f"{family!r} (set unet.mask_text_padding false)"
        )
    return fam.condition(encoders, prompts, width, height, negative, net_config, weighting=weighting)


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or any(not isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    return prompts


def chunk_count(family: str, encoders: dict, prompts: list[str], weighting: str = "a1111") -> int:
    """How many CLIP chunks the longest of `prompts` needs under `family` (1 for DiT's class labels)."""
    if get(family).class_labels:
        return 1
    return conditioning.chunk_count(encoders, _check_prompts(prompts), weighting)


def encode_pair(
    family: str,
    encoders: dict,
    prompts: list[str],
    negatives: list[str],
    width: int,
    height: int,
    net_config: Any = None,
    weighting: str = "a1111",
) -> tuple[dict, dict]:
    """(cond, uncond) for the prompts and the negative prompts, padded with empty chunks to the same
    chunk count so that classifier-free guidance can batch them (A1111 pads the shorter one with the
    empty prompt's chunks), and SD3's T5 tokens to the same length."""
    n = max(
        chunk_count(family, encoders, prompts, weighting), chunk_count(family, encoders, negatives, weighting)
    )
    both = [*_check_prompts(prompts), *_check_prompts(negatives)]
    with conditioning.pad_chunks(n), conditioning.same_t5_length(encoders, both, weighting):
        cond = encode(family, encoders, prompts, width, height, False, net_config, weighting)
        uncond = encode(family, encoders, negatives, width, height, True, net_config, weighting)
    return cond, uncond
