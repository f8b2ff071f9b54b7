"""Named training presets: plain dicts of config fields (training/config.py), applied before TOML and flags.

Denoisers: `shapes64` (the default model's latent UNet, MODEL_CARD.md), `shapes64-pixel` (the same recipe on
64×64 pixels, for benchmarks/latent_vs_pixel.py), `shapes64-dit` and `shapes64-mmdit` (the same recipe with a
DiT or an MMDiT of the UNet's FLOPs, for benchmarks/architectures.py), `shapes-tiny` (a 32×32 pixel-space
UNet in the SD1 layout with a 2-layer CLIP text tower trained jointly), `shapes-tiny-dit` (the same with a
text DiT), and fine-tuning presets `sd15`, `sdxl-base`, `sd3-medium` (with `init_from`). VAEs:
`shapes64-vae` (the default model's), `shapes64-vae-f8` (f=8, 16 channels; with the denoiser `shapes64-f8`),
`shapes64-vae-c8` (f=4, 8 channels; with `shapes64-c8`), `shapes-vae` (f=4, 4 channels, for 64×64 scenes)
and `sd`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from latentforge.models import AutoencoderKLConfig, CLIPTextConfig, DiTConfig, MMDiTConfig, UNetConfig
from latentforge.training.objectives import ObjectiveConfig

# A 32×32 pixel-space text-to-image UNet with a jointly trained 2-layer CLIP text tower, in the SD1 layout
# (model.diffusion_model. / cond_stage_model.): rectified flow with logit-normal t (Esser et al. 2024, §3.1).
SHAPES_TINY = dict(
    family="sd15",
    net="unet",
    pixel_space=True,
    resolution=32,
    unet=UNetConfig(
        in_channels=3,
        out_channels=3,
        model_channels=32,
        num_res_blocks=1,
        channel_mult=(1, 2, 2),
        attention_resolutions=(2, 4),
        num_head_channels=32,
        transformer_depth=1,
        context_dim=64,
        use_linear_in_transformer=True,
    ),  # fmt: skip
    text=CLIPTextConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=48,  # shapes captions reach 39 tokens, 41 with BOS/EOS
    ),  # fmt: skip
    objective=ObjectiveConfig(prediction="flow", sigma_sampling="logit_normal"),
    batch_size=32,
    max_steps=2000,
    lr=1e-3,
    warmup_steps=20,
    lr_schedule="constant",
    weight_decay=0.0,
    ema_decay=0.995,
    checkpoint_every=100,
    sample_every=0,
    sample_steps=20,
    sample_cfg=3.0,
    eval_n=64,
)

# The same data and text tower with a DiT (adaLN-Zero, cross-attention to the text; Peebles & Xie 2023,
# PixArt-α) on 32×32 pixels in 4×4 patches.
SHAPES_TINY_DIT = {
    **SHAPES_TINY,
    "family": "dit-text",
    "net": "dit",
    "unet": None,
    "dit": DiTConfig(
        input_size=32,
        patch_size=4,
        in_channels=3,
        hidden_size=192,
        depth=6,
        num_heads=6,
        mlp_ratio=4.0,
        class_dropout_prob=0.0,
        num_classes=0,
        learn_sigma=False,
        context_dim=64,
        pooled_dim=64,
    ),  # fmt: skip
}

# The default model's denoiser (MODEL_CARD.md): a latent UNet in the SD1 layout on the 16×16×4 latents of
# `shapes64-vae`, with a jointly trained 3-layer CLIP text tower, on scenes rendered on the fly (`--vae VAE`;
# an exported folder with `--cache_latents true` saves the VAE encoding, about a third of a step, after the
# first epoch). 8 GroupNorm groups: 32 groups on 32 channels is instance norm, which erases a channel's
# spatial mean, and the last norm before `out` then cannot carry a flat background's level.
SHAPES64 = dict(
    family="sd15",
    net="unet",
    pixel_space=False,
    resolution=64,
    unet=UNetConfig(
        in_channels=4,
        out_channels=4,
        model_channels=32,
        num_res_blocks=1,
        channel_mult=(1, 2, 4),
        attention_resolutions=(2, 4),
        num_head_channels=32,
        transformer_depth=1,
        context_dim=128,
        use_linear_in_transformer=True,
        norm_groups=8,
    ),  # fmt: skip
    text=CLIPTextConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=48,
    ),  # fmt: skip
    objective=ObjectiveConfig(prediction="flow", sigma_sampling="logit_normal"),
    batch_size=64,
    max_steps=1800,
    lr=8e-4,
    warmup_steps=50,
    lr_schedule="cosine",
    min_lr_ratio=0.1,
    weight_decay=0.0,
    ema_decay=0.998,
    caption_dropout=0.1,
    checkpoint_every=100,
    keep_last=2,
    sample_every=0,
    sample_steps=20,
    sample_cfg=4.0,
    eval_n=64,
)

# `shapes64` on 64×64×3 pixels instead of 16×16×4 latents (benchmarks/latent_vs_pixel.py: the seed's question,
# Rombach et al. 2022, §1 and §4.1). The same text tower, objective, batch, learning-rate schedule, EMA and
# caption dropout. The UNet has two more ×2 levels (f = 4 is two halvings), both 32 channels wide, in front
# of the latent UNet's three: 64² → 32² → 16² (32 ch) → 8² (64 ch) → 4² (128 ch). Attention runs at the
# downsampling factors 8 and 16 (and in the middle), i.e. on the same 8×8 and 4×4 token grids with the same
# widths as the latent UNet's (2, 4) on its 16×16 input, so the comparison is of spaces, not of attention
# cost. 8 GroupNorm groups as in `shapes64` (every width here, and every decoder concat, divides by 8).
SHAPES64_PIXEL = {
    **SHAPES64,
    "pixel_space": True,
    "unet": dataclasses.replace(
        SHAPES64["unet"],
        in_channels=3,
        out_channels=3,
        channel_mult=(1, 1, 1, 2, 4),
        attention_resolutions=(8, 16),
    ),
}

# `shapes64` with a transformer of the same forward FLOPs in place of the UNet (benchmarks/architectures.py:
# issue 10's "choose the architecture by measurement"), on the same 16×16×4 latents, text tower, objective,
# batch, schedule, EMA and caption dropout. 2×2 patches: 64 image tokens, as the UNet's 8×8 attention level.
# Forward FLOPs at batch 1 with 48 text tokens (torch's counter): UNet 272 M (4.2 M parameters), DiT 286 M
# (3.4 M), MMDiT 271 M (3.8 M).
# - DiT: the text reaches the image by cross-attention in every block and by the pooled EOS state added to the
#   timestep embedding (adaLN path; PixArt-α's cross-attention with DiT's adaLN-Zero; Peebles & Xie 2023).
# - MMDiT: the text tokens join the image tokens in one attention per block, each stream with its own
#   weights, and the pooled state enters through y_embedder (SD3, Esser et al. 2024, Fig. 2). SD3's
#   convention sets the width: hidden = 64·depth, so depth 3 is 192 wide with 3 heads of 64.
SHAPES64_DIT = {
    **SHAPES64,
    "family": "dit-text",
    "net": "dit",
    "unet": None,
    # SHAPES_TINY_DIT's network on the 16×16×4 latents, 3 heads of 64, the 128-wide text tower
    "dit": dataclasses.replace(
        SHAPES_TINY_DIT["dit"],
        input_size=16,
        patch_size=2,
        in_channels=4,
        hidden_size=192,
        depth=4,
        num_heads=3,
        context_dim=128,
        pooled_dim=128,
    ),  # fmt: skip
}
SHAPES64_MMDIT = {
    **SHAPES64,
    "family": "mmdit-text",
    "net": "mmdit",
    "unet": None,
    "mmdit": MMDiTConfig(
        depth=3,
        in_channels=4,
        out_channels=4,
        adm_in_channels=128,
        context_dim=128,
        pos_embed_max_size=8,
        num_patches=64,
    ),  # fmt: skip
}

# `shapes64` on the 8×8×16 latents of `shapes64-vae-f8` (the VAE-factor comparison: f = 8 against f = 4 at
# the same 12× compression). Twice the widths at half the resolution: 64/128/256 channels at 8²/4²/2², so
# every convolution and linear layer costs what the f = 4 UNet's does (4× the work per position on ¼ of
# the positions), and attention at the factors 1 and 2 runs on the same 8×8 and 4×4 token grids with the
# same widths (64, 128) as `shapes64`'s (2, 4).
SHAPES64_F8 = {
    **SHAPES64,
    "unet": dataclasses.replace(
        SHAPES64["unet"],
        in_channels=16,
        out_channels=16,
        model_channels=64,
        attention_resolutions=(1, 2),
    ),
}

# `shapes64` on the 16×16×8 latents of `shapes64-vae-c8` (the latent-channel comparison: f = 4 with 8
# channels against 4, 6× against 12× fewer values than the image). Only the first and last convolutions see
# the channels, so the network and its cost are `shapes64`'s but for them.
SHAPES64_C8 = {**SHAPES64, "unet": dataclasses.replace(SHAPES64["unet"], in_channels=8, out_channels=8)}

DENOISER_PRESETS: dict[str, dict[str, Any]] = {
    "shapes64": SHAPES64,
    "shapes64-f8": SHAPES64_F8,
    "shapes64-c8": SHAPES64_C8,
    "shapes64-pixel": SHAPES64_PIXEL,
    "shapes64-dit": SHAPES64_DIT,
    "shapes64-mmdit": SHAPES64_MMDIT,
    "shapes-tiny": SHAPES_TINY,
    "shapes-tiny-dit": SHAPES_TINY_DIT,
    # fine-tuning: the networks come from `init_from`; text encoders frozen, the checkpoint's VAE
    "sd15": dict(family="sd15", net="unet", train_text_encoder=False, resolution=512, lr=1e-5, batch_size=1),
    "sdxl-base": dict(
        family="sdxl-base", net="unet", train_text_encoder=False, resolution=1024, lr=1e-5, batch_size=1
    ),
    "sd3-medium": dict(
        family="sd3-medium",
        net="mmdit",
        train_text_encoder=False,
        resolution=1024,
        lr=1e-5,
        batch_size=1,
        objective=ObjectiveConfig(prediction="flow", sigma_sampling="logit_normal", shift=3.0),
    ),  # fmt: skip
}

VAE_PRESETS: dict[str, dict[str, Any]] = {
    # a small f=4 autoencoder for the shapes scenes: 64×64×3 -> 16×16×4 (12× fewer values)
    "shapes-vae": dict(
        vae=AutoencoderKLConfig(
            ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, embed_dim=4, resolution=64
        ),
        resolution=64,
        batch_size=16,
        lr=2e-4,
        kl_weight=1e-6,
        disc_start=2001,
        max_steps=2000,
        checkpoint_every=500,
    ),
    # the default model's VAE (MODEL_CARD.md, "Recipe": three stages, the later two with --init_from and the
    # flags written there): shapes-vae with 8 GroupNorm groups (4 channels per group, SD's ratio; 32 groups on
    # 32 channels is instance norm and cannot carry a flat background's colour). These values are the first
    # stage's (L1, whole 64² scenes).
    "shapes64-vae": dict(
        vae=AutoencoderKLConfig(
            ch=32,
            ch_mult=(1, 2, 2),
            num_res_blocks=1,
            z_channels=4,
            embed_dim=4,
            resolution=64,
            norm_groups=8,
        ),
        resolution=64,
        batch_size=16,
        lr=4e-4,
        warmup_steps=20,
        kl_weight=1e-6,
        disc_start=100_000,
        max_steps=1000,
        ema_decay=0.995,
        checkpoint_every=100,
        sample_every=250,
    ),
    "sd": dict(vae=AutoencoderKLConfig(), resolution=256, batch_size=2),
}
# `shapes64-vae` with one more ×2 level and 16 latent channels: 64×64×3 -> 8×8×16, the same 12× fewer values
# as its 16×16×4, in SD3's form (f = 8, c = 16; Esser et al. 2024, §5.2.1, Table 3: more latent channels
# reconstruct better at f = 8). For the VAE-factor comparison (`shapes64-f8`).
VAE_PRESETS["shapes64-vae-f8"] = {
    **VAE_PRESETS["shapes64-vae"],
    "vae": dataclasses.replace(
        VAE_PRESETS["shapes64-vae"]["vae"], ch_mult=(1, 2, 2, 2), z_channels=16, embed_dim=16
    ),
}
# `shapes64-vae` with 8 latent channels: 64×64×3 -> 16×16×8 (6× fewer values), issue 10's "4× with 4-8
# channels" (SD3 §5.2.1, Table 3: reconstruction improves with the channels, and so does the denoiser's task
# at large enough capacity). For the latent-channel comparison (`shapes64-c8`).
VAE_PRESETS["shapes64-vae-c8"] = {
    **VAE_PRESETS["shapes64-vae"],
    "vae": dataclasses.replace(VAE_PRESETS["shapes64-vae"]["vae"], z_channels=8, embed_dim=8),
}
