"""ControlNet for the SD1.x, SD2.x and SDXL UNet, in the original checkpoint layout.

Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models": a trainable
copy of the UNet's encoder (time/label embeddings, input blocks, middle block) reads the noisy latent plus
an image-space condition c_i (edges, a scribble, a segmentation, ... in [0, 1]); its features reach the
locked UNet through "zero convolutions", 1×1 convs initialised to zero (§3.1, Eq. 2), one per skip
connection and one after the middle block (§3.2, Fig. 3). c_i enters through the hint encoder E(·) (§3.2:
"a tiny network of four convolution layers with 4×4 kernels and 2×2 strides ... channels 16, 32, 64, 128";
the released code uses 3×3 convs, three of them strided, and widths 16, 32, 96, 256), which maps the 8×
larger image to the latent's size and is added after the first conv.

Module paths are the keys under `control_model.` of the released files (lllyasviel/ControlNet
`cldm/cldm.py`, `ControlNet`): `time_embed.{0,2}`, `label_emb.0.{0,2}` (SDXL), `input_blocks.N.*` (as the
UNet's), `zero_convs.N.0`, `input_hint_block.{0,2,...,14}`, `middle_block.*`, `middle_block_out.0`.
The blocks are unet.py's, built by the same functions, so a ControlNet is exactly its UNet's encoder.
Loading files (both layouts) is checkpoints_controlnet.py; applying it during sampling is control_use.py.

Shapes: x (B, C, h, w) the UNet's input, hint (B, hint_channels, 8h, 8w) in [0, 1], timesteps (B,),
context (B, L, context_dim), y (B, adm_in_channels) → len(input_blocks) + 1 residuals, residual i shaped
as input block i's output (the last: the middle block's), for `UNet.forward(..., control=...)`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from latentforge.models.unet import (
    PRESETS as UNET_PRESETS,
)
from latentforge.models.unet import (
    TimestepEmbedSequential,
    UNet,
    UNetConfig,
    check_config,
    embed,
    make_embeddings,
    make_input_blocks,
    make_middle_block,
)

# The hint encoder's widths (cldm.py `input_hint_block`; diffusers' `conditioning_embedding_out_channels`).
HINT_WIDTHS = (16, 32, 96, 256)
HINT_DOWNSCALE = 8  # three stride-2 convs: the hint is 8× the latent's size, as the VAE's pixels are


@dataclass
class ControlNetConfig(UNetConfig):
    """The UNet fields of `control_stage_config` in cldm_v15.yaml / cldm_v21.yaml (the same names as the
    UNet's; `out_channels`, `num_res_blocks` of the decoder etc. describe the UNet it copies), plus
    `hint_channels`: the condition image's channels (3: RGB maps)."""

    hint_channels: int = 3


def for_unet(cfg: UNetConfig, hint_channels: int = 3) -> ControlNetConfig:
    """The ControlNet config of a UNet: its encoder's fields, `in_channels` the latent's (a 9-channel
    inpainting UNet is controlled by a ControlNet of its base model, which sees the latent only)."""
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(UNetConfig)}
    fields["in_channels"] = cfg.out_channels
    return ControlNetConfig(**fields, hint_channels=hint_channels)


# ControlNet 1.0/1.1 for SD1.5 (models/cldm_v15.yaml), SD2.1 (cldm_v21.yaml: thibaud/controlnet-sd21 and
# others) and the SDXL ControlNets (diffusers/controlnet-*-sdxl-1.0: the full-size encoder of SDXL base).
PRESETS: dict[str, ControlNetConfig] = {
    name: for_unet(UNET_PRESETS[name]) for name in ("sd15", "sd21", "sdxl-base")
}


def _zero_conv(ch: int) -> TimestepEmbedSequential:
    """`zero_convs.N` / `middle_block_out`: a 1×1 conv in a TimestepEmbedSequential (key `.0.`), zeroed
    by initialize_weights (Eq. 2: at the start of training the ControlNet adds exactly nothing)."""
    return TimestepEmbedSequential(nn.Conv2d(ch, ch, 1))


def _hint_block(hint_channels: int, model_channels: int) -> TimestepEmbedSequential:
    """E(·): conv-SiLU pairs 3→16→16→32(/2)→32→96(/2)→96→256(/2), then a zeroed conv to model_channels;
    keys input_hint_block.{0,2,...,14} (the SiLUs hold the odd indices)."""
    a, b, c, d = HINT_WIDTHS
    widths = [(hint_channels, a, 1), (a, a, 1), (a, b, 2), (b, b, 1), (b, c, 2), (c, c, 1), (c, d, 2)]
    layers: list[nn.Module] = []
    for cin, cout, stride in widths:
        layers += [nn.Conv2d(cin, cout, 3, padding=1, stride=stride), nn.SiLU()]
    layers.append(nn.Conv2d(d, model_channels, 3, padding=1))
    return TimestepEmbedSequential(*layers)


class ControlNet(nn.Module):
    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        check_config(cfg)
        self.config = cfg
        # registered in cldm.py's order: time_embed, label_emb, input_blocks, zero_convs, input_hint_block,
        # middle_block, middle_block_out
        self.time_embed, label_emb = make_embeddings(cfg)
        if label_emb is not None:  # SDXL: label_emb.0.{0,2}
            self.label_emb = label_emb
        self.input_blocks, chs = make_input_blocks(cfg)
        self.zero_convs = nn.ModuleList(_zero_conv(ch) for ch in chs)
        self.input_hint_block = _hint_block(cfg.hint_channels, cfg.model_channels)
        self.middle_block = make_middle_block(cfg)
        self.middle_block_out = _zero_conv(chs[-1])
        self.initialize_weights()

    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        # zero_module: the zero convs and E(·)'s last conv (cldm.py); the copied blocks zero their own
        for conv in [z[0] for z in self.zero_convs] + [self.middle_block_out[0], self.input_hint_block[-1]]:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    @classmethod
    def from_unet(cls, unet: UNet, hint_channels: int = 3) -> ControlNet:
        """A new ControlNet whose encoder is a copy of `unet`'s (the paper's §3.2 initialisation, cldm's
        `tool_add_control.py`) and whose zero convs are zero: it starts as a no-op on `unet`."""
        cfg = for_unet(unet.config, hint_channels)
        net = cls(cfg).to(next(unet.parameters()).dtype)
        own = net.state_dict()
        copied = {k: v for k, v in unet.state_dict().items() if k in own and own[k].shape == v.shape}
        if unet.config.in_channels != cfg.in_channels:  # an inpainting UNet: the latent's input channels
            w = unet.input_blocks[0][0].weight
            copied["input_blocks.0.0.weight"] = w[:, : cfg.in_channels]
        net.load_state_dict(copied, strict=False)
        return net.to(next(unet.parameters()).device)

    def embed_hint(self, hint: torch.Tensor) -> torch.Tensor:
        """E(c_i): (B, hint_channels, 8h, 8w) in [0, 1] → (B, model_channels, h, w). It does not depend on
        the timestep or the prompt, so a sampling pass computes it once (control_use.py)."""
        if hint.ndim != 4 or hint.shape[1] != self.config.hint_channels:
            raise ValueError(
                f"the control image must be (B, {self.config.hint_channels}, H, W), got {tuple(hint.shape)}"
            )
        dtype = self.time_embed[0].weight.dtype
        return self.input_hint_block(hint.to(dtype), None)

    def forward(
        self,
        x: torch.Tensor,
        hint: torch.Tensor | None,
        timesteps: torch.Tensor | float,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        guided_hint: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """The residuals for `UNet.forward(control=...)` (cldm.py `ControlNet.forward`), in the weights'
        dtype. guided_hint: `embed_hint(hint)` computed already (hint is then not read). context_mask: as
        `UNet.forward`'s (the UNet's `mask_text_padding`)."""
        emb, context, dtype = embed(self, x, timesteps, context, y, context_mask)
        if guided_hint is None:
            guided_hint = self.embed_hint(hint)
        h = self.input_blocks[0](x.to(dtype), emb, context, context_mask=context_mask)
        if guided_hint.shape[-2:] != h.shape[-2:]:
            hh, hw = guided_hint.shape[-2:]
            raise ValueError(
                f"the control image gives a {hw}x{hh} hint for a {h.shape[-1]}x{h.shape[-2]} latent: it "
                f"must be {HINT_DOWNSCALE}x the latent's size ({HINT_DOWNSCALE * h.shape[-1]}x"
                f"{HINT_DOWNSCALE * h.shape[-2]} pixels)"
            )
        h = h + guided_hint.to(dtype)  # (B, mc, h, w): the condition enters after the first conv
        outs = [self.zero_convs[0](h, emb)]
        for block, zero in zip(self.input_blocks[1:], self.zero_convs[1:], strict=True):
            h = block(h, emb, context, context_mask=context_mask)
            outs.append(zero(h, emb))
        h = self.middle_block(h, emb, context, context_mask=context_mask)
        outs.append(self.middle_block_out(h, emb))
        return outs
