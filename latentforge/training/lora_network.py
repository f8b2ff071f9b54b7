"""The trained half of LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", §4.1):
low-rank layers on a frozen text-to-image model, named and stored as kohya-ss/sd-scripts names them.

A frozen weight W₀ [out, in] is adapted to W₀ + (α/r)·B·A (Hu et al., eq. (3) with the α/r scale of §4.1),
A = lora_down [r, in] drawn at random, B = lora_up [out, r] zero, so the model starts exactly as the base.
A is drawn as nn.Linear's default, kaiming_uniform(a = √5) — what the paper's reference code (loralib),
PEFT and kohya's networks/lora.py use (§4.1 says "random Gaussian"; both are zero-mean with a fan-in
scale). Only A and B train; α stays fixed, so the same Adam step moves ΔW by α/r of what it would at α = r.
A 3×3 conv (LoCon, kohya's conv_dim) takes a 3×3 down with the conv's stride and padding and a 1×1 up.

    forward (training):   y = base(x) + (α/r)·up(down(x))      a forward hook on each adapted module
    fused q/k/v rows:     W = W₀ + (α/r)·B·A on the q, k or v rows of OpenCLIP's in_proj_weight while the
                          attention module runs (SD2 / SDXL's bigG tower)

Which layers (`--modules`), as kohya's LoRANetwork chooses them (networks/lora.py, read for its rules):
"all-linear" is kohya's default — every Linear and 1×1 conv inside a transformer (SpatialTransformer =
diffusers' Transformer2DModel: proj_in/out, attention, feed-forward); "attn" only the attention projections
(to_q, to_k, to_v, to_out.0: the diffusers LoRA scripts' target set); "attn+ff" adds the feed-forward.
"+conv" adds kohya's conv_dim targets: every Linear and conv of the ResBlocks (incl. the 3×3 convs and the
time-embedding projection) and of the down/upsamplers. Text encoders: the attention projections ("attn")
or the attention and MLP layers (otherwise) of every CLIP layer whose output the conditioning uses.

Names in the file (kohya's): `lora_unet_<module path, "." -> "_">` in the diffusers module tree for SD1/SD2
(kohya trains those on a diffusers UNet) and in the SGM tree for SDXL (its sdxl_original_unet keeps the
checkpoint's names); `lora_te_` (one text encoder) or `lora_te1_` / `lora_te2_` (SDXL) + the transformers
CLIPTextModel path. Each layer stores `.lora_down.weight`, `.lora_up.weight` and `.alpha` (latentforge.lora
reads them back; lora_keys.py maps the names).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from latentforge import conditioning, families
from latentforge.lora_keys import Target, text_table, unet_diffusers_name
from latentforge.models.unet import Downsample, ResBlock, SpatialTransformer, Upsample

MODULE_SETS = ("attn", "attn+ff", "all-linear")
CONV = "+conv"
_ATTN = re.compile(r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
_FF = re.compile(r"transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)$")
_TEXT = re.compile(r"^text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")
_TEXT_ATTN = re.compile(r"\.self_attn\.")


def parse_modules(value: str) -> tuple[str, bool]:
    """ "all-linear+conv" -> ("all-linear", True); anything else outside the documented set is an error."""
    base, conv = (
        (value[: -len(CONV)], True) if isinstance(value, str) and value.endswith(CONV) else (value, False)
    )
    if base not in MODULE_SETS:
        shown = ", ".join(repr(m) for m in MODULE_SETS)
        raise ValueError(
            f"modules={value!r} is not supported; expected one of {shown}, each optionally followed by "
            f"'{CONV}' (e.g. 'all-linear+conv': the ResBlock and resampler convolutions too)"
        )
    return base, conv


@dataclass(frozen=True)
class Site:
    """Where one LoRA layer acts: its kohya name and the weight it adapts."""

    name: str  # the file's layer name: lora_unet_..., lora_te_..., lora_te1_..., lora_te2_...
    target: Target  # component, our module path, parameter, rows of a fused parameter


def unet_sites(unet: nn.Module, family: str, modules: str) -> list[Site]:
    """The UNet's adapted layers for `modules`, in module order."""
    kind, conv = parse_modules(modules)
    owners = {
        p: m
        for p, m in unet.named_modules()
        if isinstance(m, (SpatialTransformer, ResBlock, Downsample, Upsample))
    }
    sites = []
    for path, m in unet.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        owner = next((o for o in owners if path.startswith(o + ".")), None)
        if owner is None:  # time_embed, label_emb, conv_in, out: never adapted (as kohya)
            continue
        rel = path[len(owner) + 1 :]
        if isinstance(owners[owner], SpatialTransformer):
            pointwise = isinstance(m, nn.Linear) or m.kernel_size == (1, 1)
            take = bool(_ATTN.search(rel)) or (kind == "attn+ff" and bool(_FF.search(rel)))
            take = take or (kind == "all-linear" and pointwise)
        else:
            take = conv
        if take:
            # kohya: SD1/SD2 on the diffusers module tree, SDXL on the SGM (checkpoint) tree
            name = path if family.startswith("sdxl") else unet_diffusers_name(unet, path)
            sites.append(Site("lora_unet_" + name.replace(".", "_"), Target("unet", path)))
    return sites


def text_sites(encoders: Mapping[str, nn.Module], modules: str) -> list[Site]:
    """The text encoders' adapted layers (q/k/v/out projections; with "attn+ff"/"all-linear" also the
    MLP), named as transformers' CLIPTextModel names them; `encoders` in the family's order."""
    kind, _ = parse_modules(modules)
    sites = []
    for i, (comp, model) in enumerate(encoders.items()):
        prefix = "lora_te_" if len(encoders) == 1 else f"lora_te{i + 1}_"
        for name, target in text_table(model, comp).items():
            if _TEXT.match(name) and (kind != "attn" or _TEXT_ATTN.search(name)):
                sites.append(Site(prefix + name.replace(".", "_"), target))
    return sites


class LoRAModule(nn.Module):
    """One LoRA layer as kohya stores it: lora_down (A), lora_up (B) and the fixed alpha; `forward(x)` is
    (α/r)·up(down(x)), the term added to the adapted module's output."""

    def __init__(self, base: nn.Module, rows: int | None, rank: int, alpha: float):
        super().__init__()
        if isinstance(base, nn.Conv2d):
            if base.groups != 1 or base.dilation != (1, 1):
                raise ValueError(f"LoRA on a grouped or dilated convolution is not supported: {base}")
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                       bias=False)  # fmt: skip
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        elif isinstance(base, nn.Linear):
            self.lora_down = nn.Linear(base.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        else:  # a row block of a fused [3D, D] projection (OpenCLIP in_proj_weight)
            d = base.in_proj_weight.shape[1]
            self.lora_down = nn.Linear(d, rank, bias=False)
            self.lora_up = nn.Linear(rank, rows, bias=False)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.scale = float(alpha) / rank

    def reset(self, generator: torch.Generator | None = None) -> None:
        """A: nn.Linear's kaiming_uniform(a=√5); B: zeros (ΔW = 0 at the start)."""
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_up(self.lora_down(x)) * self.scale

    def delta(self) -> torch.Tensor:
        """(α/r)·B·A as [out, in] (Linear layers)."""
        return (self.lora_up.weight @ self.lora_down.weight) * self.scale


class LoRANetwork(nn.Module):
    """The LoRA layers of a run (a ModuleDict under kohya's names: this module's state dict is the file's,
    prefixed "layers.") applied to `base` by hooks. `base` (trainer.TextToImage, frozen) is held outside the
    module tree: the optimizer, the EMA, DDP and the training state see the LoRA layers only.
    `forward(x, t, prompts, size, cond)` is `base`'s with the layers in effect."""

    def __init__(self, base: nn.Module, sites: list[Site], rank: int, alpha: float, seed: int = 0):
        super().__init__()
        object.__setattr__(self, "base", base)  # not a submodule
        comps = components_of(base)
        self.sites = {s.name: s for s in sites}
        if len(self.sites) != len(sites):
            raise AssertionError("two LoRA sites share a name")
        self.layers = nn.ModuleDict()
        for s in sites:
            module = comps[s.target.component].get_submodule(s.target.module)
            rows = None if s.target.rows is None else s.target.rows[1] - s.target.rows[0]
            self.layers[s.name] = LoRAModule(module, rows, rank, alpha)
        g = torch.Generator().manual_seed(int(seed))
        for layer in self.layers.values():
            layer.reset(g)
        device = next(base.parameters()).device
        self.to(device)
        self.enabled = True  # False: the hooks pass the base's outputs through (sampling uses lora.patch)
        self._handles: list = []
        self._attach(comps)

    def _attach(self, comps: Mapping[str, nn.Module]) -> None:
        fused: dict[nn.Module, list[tuple[tuple[int, int], str]]] = {}
        for name, s in self.sites.items():
            module = comps[s.target.component].get_submodule(s.target.module)
            if s.target.rows is None:
                self._handles.append(module.register_forward_hook(self._adder(name)))
            else:
                fused.setdefault(module, []).append((s.target.rows, name))
        for module, terms in fused.items():
            self._handles.append(module.register_forward_pre_hook(self._swap_in(terms)))
            self._handles.append(module.register_forward_hook(_swap_out, always_call=True))

    def _adder(self, name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor):
            return out + self.layers[name](args[0]) if self.enabled else None

        return hook

    def _swap_in(self, terms: list[tuple[tuple[int, int], str]]):
        def hook(module: nn.Module, args: tuple) -> None:
            if not self.enabled:
                return
            w = module._parameters["in_proj_weight"]
            blocks, at = [], 0
            for (start, stop), name in sorted(terms):
                if start > at:
                    blocks.append(w.new_zeros(start - at, w.shape[1]))
                blocks.append(self.layers[name].delta().to(w.dtype))
                at = stop
            if at < w.shape[0]:
                blocks.append(w.new_zeros(w.shape[0] - at, w.shape[1]))
            module.__dict__["_lora_saved"] = w
            module._parameters["in_proj_weight"] = w.detach() + torch.cat(blocks)  # a plain tensor meanwhile

        return hook

    def detach(self) -> None:
        """Remove the hooks from the base model."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The base model alone while the block runs."""
        before, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = before

    def forward(self, x, t, prompts, size, cond=None):
        return self.base(x, t, prompts=prompts, size=size, cond=cond)


def _swap_out(module: nn.Module, args, out) -> None:
    saved = module.__dict__.pop("_lora_saved", None)
    if saved is not None:
        module._parameters["in_proj_weight"] = saved


def components_of(base: nn.Module) -> dict[str, nn.Module]:
    """A trainer.TextToImage's components by name: the network and every text encoder."""
    return {**base.frozen, **dict(base.parts.items())}


def used_text_sites(base: nn.Module, sites: list[Site], size: int) -> list[Site]:
    """The text-encoder sites whose output reaches the conditioning. SD2 and SDXL condition on the
    penultimate CLIP layer (and SDXL's CLIP-L pooled output is unused), so a LoRA layer after it would get
    no gradient: it would only ever hold its initial value, and DDP refuses parameters a step never uses.
    Found with one backward pass of the conditioning of "" through throwaway layers (B = 1, not 0, so that
    every used layer gets a gradient)."""
    if not sites:
        return []
    probe = LoRANetwork(base, sites, rank=1, alpha=1.0)
    try:
        for layer in probe.layers.values():
            nn.init.ones_(layer.lora_up.weight)
        net = base.parts[base.net_name]
        with torch.enable_grad(), conditioning.first_chunk_only():
            cond = families.encode(base.family, base.encoders(), [""], size, size, False, net.config,
                                   weighting="none")  # fmt: skip
            sum(v.float().sum() for v in cond.values()).backward()
    finally:
        probe.detach()
    return [s for s in sites if probe.layers[s.name].lora_up.weight.grad is not None]


# -- the file ----------------------------------------------------------------------------------------------


def kohya_state_dict(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRANetwork state dict (or its EMA) as the file's tensors: float32, "layers." dropped."""
    return {
        k.removeprefix("layers."): v.detach().to("cpu", torch.float32).contiguous()
        for k, v in weights.items()
    }


def kohya_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """`sshs_model_hash` and `sshs_legacy_hash` as sd-scripts computes them before saving (library/
    train_util.py `precalculate_safetensors_hashes`): the tensors serialised with the ss_* metadata only,
    then the SHA-256 of everything after the header (sd-webui-additional-networks' and A1111's "addnet" hash,
    lora_use.lora_hash: the data section, which the metadata does not change) and the legacy 8 hex digits of
    the SHA-256 of the 64 KiB at offset 1 MiB."""
    from safetensors.torch import save

    blob = save(dict(tensors), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    n = int.from_bytes(blob[:8], "little")
    return {
        "sshs_model_hash": hashlib.sha256(blob[8 + n :]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8],
    }
