"""Grow a trained UNet checkpoint without changing what it computes: transformers at more levels, deeper,
or a pooled-text path.

    python scripts/grow_unet.py latentforge/data/shapes64.safetensors [--attention_resolutions 1,2,4] \
        [--transformer_depth 2] [--pooled_text] --out grown.safetensors [--seed 0]

A function-preserving growth (Net2Net, Chen, Goodfellow & Shlens 2016, §2): the new levels' transformer
blocks (SpatialTransformer: GN → proj_in → self-attention, cross-attention to the text, GEGLU → proj_out,
added to the input) are drawn as a fresh model draws them (`init_weights` from `--seed`), and their
`proj_out` is zero as SD's zero_module makes it, so every new block adds exactly zero at the start: the
grown network's output equals the old one's (checked here on random inputs before the file is written).
Training then starts from the old model's function with the new blocks' gradients open.

`--transformer_depth N` appends blocks inside every transformer (`transformer_blocks.1`, …; the middle one
too). Such a block adds three residual branches (x += attn1, attn2, ff), so its three output layers
(`attn1.to_out.0`, `attn2.to_out.0`, `ff.net.2`) start at zero instead, which again makes it add nothing.

`--pooled_text` gives the UNet SDXL's `label_emb` (Linear → SiLU → Linear, added to the timestep embedding
that every ResBlock's scale/shift reads; Podell et al. 2023, §2.1) fed by the text tower's pooled EOS state
(conditioning.sd15): a global path for what the whole image shares, such as the background's colour,
beside the cross-attention's per-position one. Its last Linear starts at zero, so again the output is
unchanged.

In the SD1 layout the new blocks fill the empty `.1` slot of the level's input and output blocks
(`input_blocks.1.1`, `output_blocks.4.1`, … for level 0); no existing key moves. Every old tensor is copied
(as float32), the configs in the metadata are rewritten, the rest of the metadata is kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from latentforge import families  # noqa: E402
from latentforge.checkpoint_io import read_metadata, read_state_dict, save_state_dict  # noqa: E402
from latentforge.checkpoints import (  # noqa: E402
    build_component,
    configs_from_json,
    configs_to_json,
    load_checkpoint,
)
from latentforge.models.init import init_weights  # noqa: E402
from latentforge.models.unet import SpatialTransformer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a single-file checkpoint with its configs in the metadata")
    p.add_argument(
        "--attention_resolutions", default=None, help="downsampling factors, e.g. 1,2,4 (default: as is)"
    )
    p.add_argument(
        "--transformer_depth", type=int, default=None, help="blocks per transformer (default: as is)"
    )
    p.add_argument(
        "--pooled_text", action="store_true", help="add label_emb fed by the text tower's pooled output"
    )
    p.add_argument("--out", required=True, help="the grown .safetensors file")
    p.add_argument("--seed", type=int, default=0, help="draws the new blocks' weights")
    args = p.parse_args(argv)
    meta = dict(read_metadata(args.checkpoint))
    if "latentforge.configs" not in meta or "latentforge.family" not in meta:
        raise SystemExit(f"{args.checkpoint}: no configs in its metadata (only files trained here grow)")
    family, configs = meta["latentforge.family"], configs_from_json(meta["latentforge.configs"])
    if "unet" not in configs:
        raise SystemExit(f"{args.checkpoint}: holds no UNet (has {sorted(configs)})")
    old_cfg = configs["unet"]
    try:
        res = tuple(sorted({int(x) for x in (args.attention_resolutions or "").split(",") if x.strip()}))
    except ValueError:
        got = args.attention_resolutions
        raise SystemExit(f"--attention_resolutions: integers and commas, got {got!r}") from None
    res = res or tuple(old_cfg.attention_resolutions)
    levels = tuple(2**i for i in range(len(old_cfg.channel_mult)))
    if not set(old_cfg.attention_resolutions) <= set(res) or not set(res) <= set(levels):
        raise SystemExit(
            f"--attention_resolutions {res}: must keep the old ones {tuple(old_cfg.attention_resolutions)} "
            f"and name this UNet's levels {levels}"
        )
    depth = old_cfg.transformer_depth if args.transformer_depth is None else args.transformer_depth
    if not isinstance(old_cfg.transformer_depth, int) or old_cfg.transformer_depth_middle is not None:
        if args.transformer_depth is not None:
            raise SystemExit(
                "--transformer_depth: this UNet's depth is set per level; only a single depth grows"
            )
    elif depth < old_cfg.transformer_depth:
        raise SystemExit(f"--transformer_depth {depth}: at least the old depth {old_cfg.transformer_depth}")
    new_cfg = dataclasses.replace(old_cfg, attention_resolutions=res, transformer_depth=depth)
    if args.pooled_text:
        if old_cfg.num_classes is not None:
            raise SystemExit(f"--pooled_text: this UNet already has label_emb ({old_cfg.num_classes!r})")
        if "clip_l" not in configs or configs["clip_l"].hidden_size != old_cfg.context_dim:
            raise SystemExit("--pooled_text: needs a clip_l tower as wide as the UNet's context_dim")
        new_cfg = dataclasses.replace(new_cfg, num_classes="sequential", adm_in_channels=old_cfg.context_dim)
    prefix = families.get(family).prefixes["unet"]
    grown = init_weights(build_component("unet", new_cfg), torch.Generator().manual_seed(args.seed))
    if depth != old_cfg.transformer_depth:  # appended blocks: their three residual branches' outputs at zero
        for m in grown.modules():
            if isinstance(m, SpatialTransformer):
                for block in m.transformer_blocks[old_cfg.transformer_depth :]:
                    for layer in (block.attn1.to_out[0], block.attn2.to_out[0], block.ff.net[2]):
                        nn.init.zeros_(layer.weight)
                        nn.init.zeros_(layer.bias)
    if args.pooled_text:  # label_emb adds zero to the timestep embedding at the start
        nn.init.zeros_(grown.label_emb[0][2].weight)
        nn.init.zeros_(grown.label_emb[0][2].bias)
    new_sd = grown.state_dict()
    sd = {k: v.float() if v.is_floating_point() else v for k, v in read_state_dict(args.checkpoint).items()}
    old_unet = {k[len(prefix) :] for k in sd if k.startswith(prefix)}
    moved = sorted(k for k in old_unet if k not in new_sd or new_sd[k].shape != sd[prefix + k].shape)
    if moved:
        raise SystemExit(f"growing would move or reshape old keys, e.g. {moved[:3]}")
    added = sorted(set(new_sd) - old_unet)
    sd.update({prefix + k: new_sd[k].clone() for k in added})
    configs["unet"] = new_cfg
    meta["latentforge.configs"] = configs_to_json(configs)
    save_state_dict(sd, args.out, metadata=meta)

    # the grown network computes the old one's function: same output on random latents, times and text
    old, new = load_checkpoint(args.checkpoint), load_checkpoint(args.out)
    g = torch.Generator().manual_seed(1)
    c = old_cfg
    x = torch.randn(4, c.in_channels, 16, 16, generator=g)
    t = torch.rand(4, generator=g) * 1000
    ctx = torch.randn(4, 48, c.context_dim, generator=g)
    y = {"y": torch.randn(4, c.context_dim, generator=g)} if args.pooled_text else {}
    with torch.no_grad():
        a = old.components["unet"].float()(x, t, context=ctx)
        b = new.components["unet"](x, t, context=ctx, **y)
    err = (a - b).abs().max().item()
    n_new = sum(new_sd[k].numel() for k in added)
    print(
        f"wrote {args.out}: attention at {res} (was {tuple(c.attention_resolutions)}), depth {depth} "
        f"(was {c.transformer_depth}), pooled text {args.pooled_text}, {len(added)} new "
        f"tensors, {n_new / 1e6:.3f} M new parameters; max |old - grown| output {err:.2e}"
    )
    if err > 1e-5:
        os.remove(args.out)
        raise SystemExit(f"the grown network's output differs from the old one's by {err:.2e}; file removed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
