"""Token merging for Stable Diffusion (Bolya & Hoffman 2023, "Token Merging for Fast Stable Diffusion",
arXiv:2303.17604), on the self-attention of the LDM/SGM UNet's transformer blocks.

Before a block's self-attention (attn1), r = ⌊ratio·N⌋ of its N = h·w tokens are merged into others by
bipartite soft matching (Bolya et al. 2023, "Token Merging: Your ViT But Faster", §3, "Bipartite Soft
Matching"), the attention runs on N − r tokens, and its output is unmerged back to N (ToMe-SD §3.2,
Fig. 2: every merged token gets its group's output). With x the block's input [B, N, C]:

  1. destinations: one token per 2×2 cell of the h×w grid, at a random place in the cell (ToMe-SD §4.1,
     "random 2D stride"; drawn once per block call, shared by the batch, from a generator seeded per
     sampling pass), |dst| = ⌊h/2⌋·⌊w/2⌋; every other token (the odd last row or column included) is a
     source;
  2. similarity: cosine of x's rows, sources against destinations [B, N_src, N_dst]; each source's best
     destination and its score;
  3. the r sources with the highest scores are merged: each destination becomes the mean of itself and
     the sources that picked it; the other sources are kept. Merged sequence: [kept | dst], N − r tokens;
  4. unmerge: the kept sources and the destinations take their own rows of the output, a merged source
     its destination's.

The matching is computed once per block from its input x and applied to norm1(x) for attn1 (ToMe-SD's
default: self-attention only; cross-attention and the MLP are left unmerged here). It is applied in the
transformers whose downsampling factor is ≤ max_downsample (ToMe-SD: 1, the highest-resolution level,
where the tokens are most numerous). Everything is forward hooks, removed when `patch` exits.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

from latentforge.models.unet import Downsample, SpatialTransformer, UNet, Upsample


class Merge:
    """The matching of one block call: `merge` [B, N, C] -> [B, N − r, C], `unmerge` back to [B, N, C].

    metric [B, N, C]: the tokens compared (the block's input); (h, w): their grid, h·w = N; r: how many to
    merge (at most the number of sources); generator: draws the destination in each 2×2 cell."""

    def __init__(self, metric: torch.Tensor, h: int, w: int, r: int, generator: torch.Generator):
        b, n, _ = metric.shape
        if h * w != n:
            raise ValueError(f"a {h}x{w} grid has {h * w} tokens, got {n}")
        dev = metric.device
        hs, ws = h // 2, w // 2
        pick = torch.randint(4, (hs, ws), generator=generator).to(dev)  # place in the 2×2 cell
        rows = torch.arange(hs, device=dev)[:, None] * 2 + pick // 2
        cols = torch.arange(ws, device=dev)[None, :] * 2 + pick % 2
        self.dst = (rows * w + cols).reshape(-1)  # [N_dst], ascending
        is_dst = torch.zeros(n, dtype=torch.bool, device=dev)
        is_dst[self.dst] = True
        self.src = (~is_dst).nonzero().squeeze(1)  # [N_src]
        self.n = n
        r = min(r, self.src.numel())
        m = metric.float()
        m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        scores = m[:, self.src] @ m[:, self.dst].transpose(1, 2)  # cosine similarity [B, N_src, N_dst]
        best, target = scores.max(dim=-1)  # [B, N_src]
        order = best.argsort(dim=-1, descending=True, stable=True)
        self.merged = order[:, :r]  # sources merged away [B, r] (indices into src)
        self.kept = order[:, r:]  # sources kept [B, N_src − r]
        self.target = target.gather(1, self.merged)  # the destination of each merged source [B, r]

    @staticmethod
    def _rows(idx: torch.Tensor, c: int) -> torch.Tensor:
        return idx[..., None].expand(-1, -1, c)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> [kept sources | destinations] [B, N − r, C], each destination the mean of itself
        and the sources merged into it."""
        c = x.shape[-1]
        src, dst = x[:, self.src], x[:, self.dst]  # [B, N_src, C], [B, N_dst, C]
        kept = src.gather(1, self._rows(self.kept, c))
        moving = src.gather(1, self._rows(self.merged, c))
        dst = dst.scatter_reduce(1, self._rows(self.target, c), moving, reduce="mean", include_self=True)
        return torch.cat([kept, dst], dim=1)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """[B, N − r, C] (a function of `merge`'s output, row by row) -> [B, N, C]: every token takes its
        own row, a merged source its destination's."""
        b, _, c = y.shape
        k = self.kept.shape[1]
        kept, dst = y[:, :k], y[:, k:]
        src = y.new_empty(b, self.src.numel(), c)
        src.scatter_(1, self._rows(self.kept, c), kept)
        src.scatter_(1, self._rows(self.merged, c), dst.gather(1, self._rows(self.target, c)))
        out = y.new_empty(b, self.n, c)
        out[:, self.src] = src
        out[:, self.dst] = dst
        return out


def transformer_levels(unet: UNet) -> list[tuple[SpatialTransformer, int]]:
    """Every SpatialTransformer of `unet` with its downsampling factor (1 at the input's resolution)."""
    out, ds = [], 1
    for block in unet.input_blocks:
        for layer in block:
            if isinstance(layer, Downsample):
                ds *= 2
            elif isinstance(layer, SpatialTransformer):
                out.append((layer, ds))
    out += [(layer, ds) for layer in unet.middle_block if isinstance(layer, SpatialTransformer)]
    for block in unet.output_blocks:
        for layer in block:
            if isinstance(layer, SpatialTransformer):
                out.append((layer, ds))
            elif isinstance(layer, Upsample):
                ds //= 2
    return out


@contextlib.contextmanager
def patch(unet: UNet, ratio: float, max_downsample: int = 1, seed: int = 0) -> Iterator[int]:
    """ToMe on attn1 of the transformer blocks at downsampling ≤ max_downsample while the block runs;
    yields how many transformer blocks merge (0: none at those levels, with a warning)."""
    generator = torch.Generator().manual_seed(seed)
    hooks: list = []
    targets = [st for st, ds in transformer_levels(unet) if ds <= max_downsample]
    if not targets:
        have = sorted({ds for _, ds in transformer_levels(unet)})
        warnings.warn(
            f"tome_ratio {ratio:g}: this UNet has no transformer at downsampling ≤ {max_downsample} (it has "
            f"them at {have}); nothing is merged; raise tome_max_downsample",
            stacklevel=3,
        )
    try:
        for st in targets:
            grid: dict = {}

            def record(module, args, grid=grid):  # (B, C, H, W) entering the SpatialTransformer
                grid["hw"] = tuple(args[0].shape[-2:])

            hooks.append(st.register_forward_pre_hook(record))
            for block in st.transformer_blocks:
                state: dict = {}

                def match(module, args, grid=grid, state=state):  # args: (x [B, N, C], context)
                    x = args[0]
                    r = int(x.shape[1] * ratio)
                    state["m"] = Merge(x, *grid["hw"], r, generator) if r > 0 else None

                def merge(module, args, state=state):  # attn1's input norm1(x) [B, N, C]
                    m = state.get("m")
                    if m is not None:
                        return (m.merge(args[0]), *args[1:])

                def unmerge(module, args, out, state=state):
                    m = state.pop("m", None)
                    return out if m is None else m.unmerge(out)

                hooks.append(block.register_forward_pre_hook(match))
                hooks.append(block.attn1.register_forward_pre_hook(merge))
                hooks.append(block.attn1.register_forward_hook(unmerge))
        yield sum(len(st.transformer_blocks) for st in targets)
    finally:
        for h in hooks:
            h.remove()
