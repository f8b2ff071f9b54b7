"""From prompts to the conditioning dict each family's network takes, one small function per family.

Sources: architectures.md §1.5 (SD1/SD2/SDXL: ldm `FrozenCLIPEmbedder`, `FrozenOpenCLIPEmbedder`, sgm
`GeneralConditioner`), §4.2 (SD3: `sd3_infer.py` `get_cond`), §3 (DiT class labels).

    family        encoders          network kwargs
    sd15          clip_l            context [B, 77, 768]     last layer, final LN, EOS padding
    sd21          clip_h            context [B, 77, 1024]    penultimate, final LN (ln_final), zero padding
    sdxl-base     clip_l, clip_g    context [B, 77, 2048]    L ‖ G, both penultimate without final LN
                                    y [B, 2816]              G projected pooled ‖ size/crop/size embeddings
    sdxl-refiner  clip_g            context [B, 77, 1280], y [B, 2560] (aesthetic score 6.0 / 2.5 negative)
    sd3, sd35     clip_l, clip_g    context [B, 77 + 77, 4096]  (L ‖ G zero-padded to 4096) then T5 tokens
                                    y [B, 2048]              L pooled (unprojected) ‖ G projected pooled
    dit           (none)            y [B] long               class index; the null class = num_classes
    dit-text      clip_l            context [B, L, D], y [B, D]  last layer + final LN, EOS pooled

Every function has the signature the `Family` entries (families.py) call:
`(encoders, prompts, width, height, negative, net) -> kwargs`, with `net` the denoising network's config.
The unconditional branch is the encoded empty prompt (`CompVis txt2img.py`, A1111, ComfyUI, sd3_infer), not
sgm's zeroed embeddings or diffusers' `force_zeros_for_empty_prompt`.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from latentforge.models.text import CLIPTextModel
from latentforge.models.unet import sdxl_refiner_vector, sdxl_vector
from latentforge.tokenizer import tokenize

# sgm's refiner conditioner: aesthetic_score 6.0 for the prompt, 2.5 for the negative
# (generative-models `sampling.py` / A1111 `sdxl_refiner_low_aesthetic_score`).
REFINER_AESTHETIC_POSITIVE = 6.0
REFINER_AESTHETIC_NEGATIVE = 2.5
# Without a T5 encoder the T5 half of the SD3 context is zeros (diffusers' StableDiffusion3Pipeline does the
# same when text_encoder_3 is None, with 256 tokens); 77 keeps the usual 154-token context.
T5_ZERO_TOKENS = 77
SD3_CONTEXT_DIM = 4096  # T5-XXL d_model: the width of the SD3 context


def _encoder(encoders: dict, name: str, family: str) -> CLIPTextModel:
    enc = encoders.get(name)
    if enc is None:
        raise ValueError(f"{family} needs the text encoder {name!r}; got {sorted(encoders)}")
    return enc


def _ids(enc: CLIPTextModel, prompts: list[str], pad: str) -> torch.Tensor:
    device = next(enc.parameters()).device
    return tokenize(prompts, enc.config.max_position_embeddings, pad=pad).to(device)


def sd15(encoders: dict, prompts: list[str], width: int, height: int, negative: bool, net) -> dict:
    """SD1: HF CLIPTextModel `last_hidden_state` (after final_layer_norm), EOS padding
    (ldm FrozenCLIPEmbedder)."""
    enc = _encoder(encoders, "clip_l", "sd15")
    out = enc(_ids(enc, prompts, "eos"), layer="last", final_norm=True, pooled=False)
    return {"context": out.hidden}  # [B, 77, 768]


def sd21(encoders: dict, prompts: list[str], width: int, height: int, negative: bool, net) -> dict:
    """SD2: OpenCLIP ViT-H, resblocks 0..22 then ln_final (FrozenOpenCLIPEmbedder layer="penultimate"),
    open_clip's zero padding."""
    enc = _encoder(encoders, "clip_h", "sd21")
    out = enc(_ids(enc, prompts, "zero"), layer="penultimate", final_norm=True, pooled=False)
    return {"context": out.hidden}  # [B, 77, 1024]


def _bigg(encoders: dict, prompts: list[str], family: str) -> tuple[torch.Tensor, torch.Tensor]:
    """bigG penultimate without ln_final [B, 77, 1280] and the projected pooled EOS state [B, 1280]
    (FrozenOpenCLIPEmbedder2 layer="penultimate", always_return_pooled=True, legacy=False)."""
    enc = _encoder(encoders, "clip_g", family)
    out = enc(_ids(enc, prompts, "zero"), layer="penultimate", final_norm=False, pooled=True)
    return out.hidden, out.projected


def _clip_l_penultimate(encoders: dict, prompts: list[str], family: str):
    """CLIP-L hidden_states[11] (the penultimate, no final LN) [B, 77, 768] and the final-LN pooled
    EOS state [B, 768], EOS padding (sgm FrozenCLIPEmbedder layer="hidden", layer_idx=11; SD3 ClipL)."""
    enc = _encoder(encoders, "clip_l", family)
    out = enc(_ids(enc, prompts, "eos"), layer="penultimate", final_norm=False, pooled=True)
    return out.hidden, out.pooled


def sdxl_base(encoders: dict, prompts: list[str], width: int, height: int, negative: bool, net) -> dict:
    """SDXL base: context = L ‖ G on channels [B, 77, 2048]; y = sdxl_vector(G pooled, (H, W), (0, 0), (H, W))
    [B, 2816]: no crop, original size = target size, as A1111 and ComfyUI default to."""
    l_hidden, _ = _clip_l_penultimate(encoders, prompts, "sdxl-base")
    g_hidden, g_pooled = _bigg(encoders, prompts, "sdxl-base")
    context = torch.cat([l_hidden, g_hidden.to(l_hidden.dtype)], dim=-1)
    y = sdxl_vector(g_pooled, original_size=(height, width), crop_coords=(0, 0), target_size=(height, width))
    return {"context": context, "y": y}


def sdxl_refiner(encoders: dict, prompts: list[str], width: int, height: int, negative: bool, net) -> dict:
    """SDXL refiner: bigG only, context [B, 77, 1280]; y = sdxl_refiner_vector [B, 2560] with the aesthetic
    score 6.0 for the prompt and 2.5 for the negative."""
    g_hidden, g_pooled = _bigg(encoders, prompts, "sdxl-refiner")
    score = REFINER_AESTHETIC_NEGATIVE if negative else REFINER_AESTHETIC_POSITIVE
    y = sdxl_refiner_vector(
        g_pooled, original_size=(height, width), crop_coords=(0, 0), aesthetic_score=score
    )
    return {"context": g_hidden, "y": y}


def sd3(encoders: dict, prompts: list[str], width: int, height: int, negative: bool, net) -> dict:
    """SD3/SD3.5 (`sd3_infer.py` get_cond): lg = L ‖ G penultimate (no final LN) [B, 77, 2048], zero-padded on
    channels to context_dim (4096), then T5's tokens along the sequence (zeros: no T5 encoder here)
    -> context [B, 154, 4096]; y = L pooled (unprojected: the reference's identity text_projection) ‖ G
    projected pooled -> [B, 2048]."""
    family, context_dim = "sd3", net.context_dim
    l_hidden, l_pooled = _clip_l_penultimate(encoders, prompts, family)
    g_hidden, g_pooled = _bigg(encoders, prompts, family)
    lg = torch.cat([l_hidden, g_hidden.to(l_hidden.dtype)], dim=-1)  # [B, 77, 2048]
    if lg.shape[-1] > context_dim:
        raise ValueError(f"CLIP-L ‖ CLIP-G is {lg.shape[-1]} wide, more than the context width {context_dim}")
    lg = F.pad(lg, (0, context_dim - lg.shape[-1]))  # [B, 77, 4096]
    if encoders.get("t5xxl") is not None:
        warnings.warn("the T5-XXL encoder is not supported yet; its tokens are zeros", stacklevel=3)
    t5 = lg.new_zeros(lg.shape[0], T5_ZERO_TOKENS, context_dim)  # [B, 77, 4096]
    context = torch.cat([lg, t5], dim=1)  # [B, 154, 4096]
    y = torch.cat([l_pooled, g_pooled.to(l_pooled.dtype)], dim=-1)  # [B, 768 + 1280]
    return {"context": context, "y": y}


def dit_text(encoders: dict, prompts: list[str], width: int, height: int, negative: bool, net) -> dict:
    """Our text-conditioned DiT: context = CLIP last layer after the final LN [B, L, D] (as SD1), y = the
    pooled EOS state [B, D] (the DiT adds it to the timestep embedding when its pooled_dim > 0)."""
    enc = _encoder(encoders, "clip_l", "dit-text")
    out = enc(_ids(enc, prompts, "eos"), layer="last", final_norm=True, pooled=True)
    return {"context": out.hidden, "y": out.pooled}


def parse_class_label(prompt: str, num_classes: int) -> int:
    """A DiT prompt: an ImageNet class index, "207" or " 207 ", in [0, num_classes)."""
    text = str(prompt).strip()
    try:
        label = int(text)
    except ValueError:
        raise ValueError(
            f"a DiT model is class-conditional: the prompt must be a class index in [0, {num_classes - 1}] "
            f"(e.g. '207'), got {prompt!r}"
        ) from None
    if not 0 <= label < num_classes:
        raise ValueError(f"DiT class index {label} is out of range [0, {num_classes - 1}]")
    return label


def dit(encoders: dict, prompts: list[str], width: int, height: int, negative: bool, net) -> dict:
    """DiT: y = class labels [B] (long); the unconditional branch is the null class `num_classes`
    (the extra row of LabelEmbedder's table, DiT models.py L67-94)."""
    num_classes = net.num_classes
    labels = [num_classes if negative else parse_class_label(p, num_classes) for p in prompts]
    return {"y": torch.tensor(labels, dtype=torch.long)}
