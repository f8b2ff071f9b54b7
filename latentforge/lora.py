"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", §4.1) and LoCon files on every
family (UNet, SD3's MMDiT, DiT; their text encoders): read, place every layer on a weight of our networks,
then merge or patch on the fly.

A LoRA layer adapts a weight W [out, in(, kh, kw)] by ΔW = s · (α / r) · up @ down, with down (A) [r, in(, kh,
kw)], up (B) [out, r(, 1, 1)], r = down's rows, α the file's alpha (r when absent: scale 1, the diffusers/PEFT
convention), s the user's weight. LoCon (LyCORIS) adapts a 3×3 conv with a 3×3 down and a 1×1 up, which is the
same product with the kernel flattened into `in`. Key names: lora_keys.py.

    lora = read_lora("style.safetensors")          # safetensors only; nothing is unpickled
    handle = merge(pipe, lora, unet_scale=0.8, te_scale=0.8)   # W += ΔW in place ...
    handle.remove()                                # ... and back, bit for bit
    with patch(pipe, lora, 0.8, 0.5):              # or on the fly: base weights untouched, several at once
        pipe("a prompt")

DoRA layers in kohya/LyCORIS files (`dora_scale`, Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank
Adaptation", eq. 5): W' = W + s·(m ⊙ V/‖V‖ − W) with V = W + (α/r)·up @ down, m = dora_scale and ‖·‖ the
norm of V's input columns (m [1, in, 1, 1], LyCORIS's default) or output rows (m [out, 1, ...], its
`wd_on_out`). At s = 1 this is W' = m ⊙ V/‖V‖ as LyCORIS, A1111 and ComfyUI compute it; other weights s
interpolate between W and W' as A1111 (network.py finalize_updown) and ComfyUI do (LyCORIS interpolates
between V and W'). ComfyUI's `wd_on_out` takes the row norms of W rather than V; LyCORIS and we take V's.
Patched, a DoRA weight is recomputed per network call, like a LoCon 3×3 conv. A layer that cannot be
placed, has the wrong shape, or uses a variant not implemented here (PEFT's DoRA, LoHa, LoKr, Tucker
`lora_mid`) fails the whole load and is named: a LoRA is never silently half-applied (the complaint in
diffusers #10599, #9291; ComfyUI #3701).
"""

from __future__ import annotations

import math
import os
import re
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from latentforge import families
from latentforge.checkpoint_io import read_metadata, read_state_dict
from latentforge.lora_keys import (
    CONTEXT_WIDTH,
    LoRAError,
    Target,
    denoiser_table,
    kohya_table,
    own_table,
    peft_alphas,
    split_key,
    text_table,
)


@dataclass
class LoRALayer:
    down: torch.Tensor  # A: [r, in] or [r, in, kh, kw]
    up: torch.Tensor  # B: [out, r] or [out, r, 1, 1]
    alpha: float | None = None  # None: α = r
    dora_scale: torch.Tensor | None = None  # DoRA's magnitude m: [1, in(, 1, 1)] or [out, 1(, 1, 1)]

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def scale(self, weight: float) -> float:
        return weight * (self.rank if self.alpha is None else self.alpha) / self.rank

    def delta(self, weight: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """s · (α/r) · up @ down as [out, in·kh·kw], computed in `dtype`."""
        return (self.up.flatten(1).to(dtype) @ self.down.flatten(1).to(dtype)) * self.scale(weight)

    def apply_dora(self, w: torch.Tensor, delta: torch.Tensor, weight: float) -> torch.Tensor:
        """W + s·(m ⊙ V/‖V‖ − W), V = W + ΔW (ΔW at weight 1), for W [out, ...] in its own dtype."""
        v = w + delta.reshape(w.shape)
        m = self.dora_scale.to(w.device, w.dtype)
        if m.shape[0] == w.shape[0] and w.shape[0] != 1:  # one magnitude per output row (wd_on_out)
            norm = v.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.ndim - 1))
        else:  # one per input column (over the rows and the kernel)
            norm = v.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (w.ndim - 2))
        return w + weight * (m * v / (norm + torch.finfo(w.dtype).eps) - w)


@dataclass
class LoRA:
    name: str
    format: str  # "kohya" | "peft" | "diffusers-old" | "comfy"
    # (part "unet" (the denoiser) | "te1" | "te2" | "te3", layer name as in the file) -> layer
    layers: dict[tuple[str, str], LoRALayer]
    metadata: dict[str, str] = field(default_factory=dict)


# -- reading -----------------------------------------------------------------------------------------------


def read_lora(path: str, name: str | None = None) -> LoRA:
    """Read a LoRA `.safetensors` file (kohya/A1111, diffusers/PEFT or the older diffusers layout)."""
    if not str(path).lower().endswith(".safetensors"):
        raise LoRAError(f"{path!r}: LoRA files are read from .safetensors only (nothing is unpickled)")
    sd, meta = read_state_dict(str(path)), read_metadata(str(path))
    return lora_from_state_dict(sd, name or os.path.splitext(os.path.basename(path))[0], meta)


def lora_from_state_dict(sd: dict[str, torch.Tensor], name: str, metadata: dict | None = None) -> LoRA:
    metadata = dict(metadata or {})
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    formats, refused = set(), []
    for key, tensor in sd.items():
        split = split_key(key)
        if split is None:
            refused.append(key)
            continue
        fmt, part, layer, kind = split
        formats.add(fmt)
        parts.setdefault((part, layer), {})[kind] = tensor
    if refused:
        variants = {"dora_scale": "DoRA", "lora_magnitude_vector": "PEFT's DoRA", "hada_": "LoHa",
                    "lokr_": "LoKr", "lora_mid": "Tucker (lora_mid)", "lora_B.bias": "lora_bias"}  # fmt: skip
        found = sorted({v for k in refused for s, v in variants.items() if s in k})
        what = f" ({', '.join(found)} is not supported)" if found else ""
        raise LoRAError(f"LoRA {name}: {len(refused)} keys are not LoRA up/down/alpha tensors{what}: "
                        f"{_some(refused)}")  # fmt: skip
    if len(formats) > 1:
        raise LoRAError(f"LoRA {name}: mixes key layouts {sorted(formats)}")
    alphas = peft_alphas(metadata, name)
    layers, broken = {}, []
    for (part, layer), t in parts.items():
        if "down" not in t or "up" not in t:
            broken.append(f"{part}:{layer} (has only {sorted(t)})")
            continue
        alpha = float(t["alpha"]) if "alpha" in t else alphas(part, layer)
        layers[(part, layer)] = LoRALayer(t["down"], t["up"], alpha, t.get("dora"))
    if broken:
        raise LoRAError(f"LoRA {name}: layers without both up and down weights: {_some(broken)}")
    if not layers:
        raise LoRAError(f"LoRA {name}: no LoRA layers found")
    return LoRA(name, formats.pop(), layers, metadata)


def _some(names: list[str], n: int = 8) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


# -- prompt tags (A1111's extra-network syntax) -------------------------------------------------------------

_TAG = re.compile(r"<lora:([^<>]*)>")


def parse_tags(prompt: str) -> tuple[str, list[tuple[str, float, float]]]:
    """`<lora:name>`, `<lora:name:w>`, `<lora:name:te_w:unet_w>`, `<lora:name:unet=w:te=w>` -> the prompt
    without the tags and (name, unet weight, text-encoder weight) per tag. The positional order is A1111's
    (extensions-builtin/Lora/extra_networks_lora.py): text encoder first, the UNet weight defaulting to it."""
    found = []
    for m in _TAG.finditer(prompt):
        name, *params = (p.strip() for p in m[1].split(":"))
        named = dict(p.split("=", 1) for p in params if "=" in p)
        positional = [p for p in params if "=" not in p]
        if not name or len(positional) > 2 or set(named) - {"te", "unet"}:
            raise LoRAError(
                f"bad LoRA tag {m[0]!r}: expected <lora:name>, <lora:name:w> or <lora:name:te_w:unet_w>"
            )
        try:
            te = float(named.get("te", positional[0] if positional else 1.0))
            unet = float(named.get("unet", positional[1] if len(positional) > 1 else te))
        except ValueError:
            raise LoRAError(f"bad LoRA tag {m[0]!r}: weights must be numbers") from None
        if not (math.isfinite(te) and math.isfinite(unet)):
            raise LoRAError(f"bad LoRA tag {m[0]!r}: weights must be finite")
        found.append((name, unet, te))
    return _TAG.sub("", prompt), found


def find_lora(name: str, lora_dir: str) -> str:
    """The file `<lora_dir>/<name>.safetensors`; a name, never a path (no separators, no `..`)."""
    if not re.fullmatch(r"[\w .()\[\]+-]+", name) or name.strip(". ") != name.strip() or ".." in name:
        raise LoRAError(f"LoRA name {name!r}: letters, digits, spaces and ._-+()[] only, no path")
    path = os.path.join(lora_dir, name + ".safetensors")
    if not os.path.isfile(path):
        raise LoRAError(f"no LoRA named {name!r} in {lora_dir} (looked for {name}.safetensors)")
    return path


# -- placing -----------------------------------------------------------------------------------------------


def made_for(lora: LoRA) -> str | None:
    """The family whose networks a LoRA's keys and shapes fit, when they say so: SD3 block names and the
    MMDiT width; a second text encoder is SDXL's; the width of the cross-attention's key projection is the
    context width of one released UNet."""
    for (part, name), layer in lora.layers.items():
        if part == "unet" and re.match(r"(joint|transformer)_blocks[._]", name):
            if re.search(r"attn2[._]", name):
                return "sd35-medium"
            return {1536: "sd3-medium", 2432: "sd35-large"}.get(layer.down.shape[1], "sd3-medium")
    if any(part == "te2" for part, _ in lora.layers):
        return "sdxl-base"
    for (part, name), layer in lora.layers.items():
        if part == "unet" and re.search(r"attn2[._]to_k$", name):
            return CONTEXT_WIDTH.get(layer.down.shape[1])
    return None


def components_of(pipe) -> dict[str, str]:
    """A LoRA file's parts -> the pipeline's components: "unet" is the denoiser (Family.net), te1.. the text
    encoders in the family's order (SD3: CLIP-L, bigG, then T5-XXL when loaded)."""
    spec = families.get(pipe.family)
    encoders = [c for c in spec.prefixes if c.startswith(("clip_", "t5")) and c in pipe.components]
    return {"unet": spec.net, **{f"te{i + 1}": c for i, c in enumerate(encoders)}}


def place(pipe, lora: LoRA) -> list[tuple[Target, LoRALayer]]:
    """Each layer of `lora` with the weight of `pipe` it adapts; one layer that cannot be placed fails all."""
    components = components_of(pipe)
    origin = made_for(lora)
    hint = f" (it looks made for {origin})" if origin and origin != pipe.family else ""
    missing = sorted({part for part, _ in lora.layers} - set(components))
    if missing:
        raise LoRAError(f"LoRA {lora.name} has layers for text encoder(s) {missing}, which a {pipe.family} "
                        f"pipeline does not have{hint}")  # fmt: skip
    tables = {}
    for part, comp in components.items():
        module = pipe.components[comp]
        if part == "unet":
            table = denoiser_table(comp, module)
        elif comp.startswith("t5"):
            table = own_table(module, comp, strip="transformer.")
        else:
            table = text_table(module, comp)
        tables[part] = kohya_table(table) if lora.format == "kohya" else table
    placed, unplaced, wrong = [], [], []
    for (part, name), layer in lora.layers.items():
        target = tables[part].get(name)
        if target is None:
            unplaced.append(f"{part}:{name}")
            continue
        problem = _shape_problem(_weight(pipe, target), target, layer)
        if problem:
            wrong.append(f"{part}:{name} ({problem})")
        placed.append((target, layer))
    if unplaced or wrong:
        lines = [f"LoRA {lora.name} does not fit this {pipe.family} pipeline{hint}:"]
        if unplaced:
            lines.append(f"  {len(unplaced)} layers name no weight here: {_some(unplaced)}")
        if wrong:
            lines.append(f"  {len(wrong)} layers have the wrong shape: {_some(wrong)}")
        raise LoRAError("\n".join(lines))
    return placed


def _weight(pipe, target: Target) -> torch.Tensor:
    return getattr(pipe.components[target.component].get_submodule(target.module), target.param)


def _shape_problem(weight: torch.Tensor, target: Target, layer: LoRALayer) -> str | None:
    rows = weight.shape[0] if target.rows is None else target.rows[1] - target.rows[0]
    out, rank = layer.up.shape[0], layer.rank
    if layer.up.shape[1:] not in ((rank,), (rank, 1, 1)):
        return f"up {tuple(layer.up.shape)} is not [out, {rank}] or [out, {rank}, 1, 1]"
    if layer.down.ndim == 4 and tuple(layer.down.shape[2:]) != tuple(weight.shape[2:]):
        return f"down kernel {tuple(layer.down.shape[2:])} on a weight of shape {tuple(weight.shape)}"
    if layer.dora_scale is not None:
        m, n = tuple(layer.dora_scale.shape), weight.ndim - 2
        if target.rows is not None or m not in (
            (1, weight.shape[1], *[1] * n),
            (weight.shape[0], *[1] * (n + 1)),
        ):
            return (
                f"dora_scale {m} is neither [1, in, ...] nor [out, 1, ...] of a weight {tuple(weight.shape)}"
            )
    if target.swap and out % 2:
        return f"ΔW with {out} rows cannot be (scale, shift) halves"
    if out != rows or layer.down[0].numel() != weight[0].numel():
        return f"ΔW [{out}, {layer.down[0].numel()}] on a weight [{rows}, {weight[0].numel()}]"
    return None


def _scales(unet_scale: float, te_scale: float | None) -> dict[bool, float]:
    """{target is the denoiser: its scale}"""
    return {True: float(unet_scale), False: float(unet_scale if te_scale is None else te_scale)}


_DENOISERS = ("unet", "mmdit", "dit")


def _full_up(target: Target, up: torch.Tensor, rows: int) -> torch.Tensor:
    """up [out, r] as the [rows, r] matrix of the whole weight: its block at `target.rows` (zeros elsewhere)
    and, for diffusers' (scale, shift) order, its halves exchanged."""
    up = up.flatten(1)
    if target.swap:
        up = torch.cat(up.chunk(2)[::-1])
    if target.rows is None:
        return up
    full = up.new_zeros(rows, up.shape[1])
    full[slice(*target.rows)] = up
    return full


def _as_lora(lora) -> LoRA:
    return lora if isinstance(lora, LoRA) else read_lora(lora)


# -- merging -----------------------------------------------------------------------------------------------


@dataclass
class _Merged:  # one parameter with merged LoRAs: its original value and the active terms
    original: torch.Tensor  # on the CPU
    terms: dict[int, list[tuple[Target, LoRALayer, float]]]
    version: int = -1  # param._version after our last write: anything else wrote to it since


_MERGED: weakref.WeakKeyDictionary[nn.Module, dict[str, _Merged]] = weakref.WeakKeyDictionary()


class Handle:
    """What merge() and patch() return: `remove()` (or leaving a `with` block) undoes it."""

    def __init__(self, undo):
        self._undo = undo

    def remove(self) -> None:
        if self._undo is not None:
            undo, self._undo = self._undo, None
            undo()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def merge(pipe, lora, unet_scale: float = 1.0, te_scale: float | None = None) -> Handle:
    """Add ΔW to the weights in place (te_scale None: unet_scale). Each weight is rewritten as
    round(W₀ + Σ ΔW) with W₀ its value before any merge, the sum taken in float64 over every LoRA merged
    into it and rounded once; `remove()` in any order rewrites it from W₀ and the LoRAs still merged, so
    removing all of them restores W₀ bit for bit."""
    lora, scales = _as_lora(lora), _scales(unet_scale, te_scale)
    return _merge_placed(pipe, place(pipe, lora), scales)


def _merge_placed(pipe, placed: list[tuple[Target, LoRALayer]], scales: dict[bool, float]) -> Handle:
    key, touched = object(), []
    for target, _ in placed:  # refuse before changing anything
        module = pipe.components[target.component].get_submodule(target.module)
        _check_unchanged(module, target.param)
    for target, layer in placed:
        module = pipe.components[target.component].get_submodule(target.module)
        state = _MERGED.setdefault(module, {})
        if target.param not in state:
            w = getattr(module, target.param)
            state[target.param] = _Merged(w.detach().to("cpu", copy=True), {}, w._version)
        entry = state[target.param]
        entry.terms.setdefault(id(key), []).append((target, layer, scales[target.component in _DENOISERS]))
        touched.append((module, target.param))
    touched = list(dict.fromkeys(touched))
    for module, name in touched:
        _rewrite(module, name)

    def undo():  # (the closure keeps `key` alive, so id(key) stays unique while the handle lives)
        for module, name in touched:
            _MERGED[module][name].terms.pop(id(key), None)
            _rewrite(module, name)

    return Handle(undo)


def _check_unchanged(module: nn.Module, name: str) -> None:
    entry = _MERGED.get(module, {}).get(name)
    if entry is not None and getattr(module, name)._version != entry.version:
        raise LoRAError(
            f"{type(module).__name__}.{name} was changed since a LoRA was merged into it (new weights "
            f"loaded?); it cannot be restored exactly"
        )


@torch.no_grad()
def _rewrite(module: nn.Module, name: str) -> None:
    _check_unchanged(module, name)
    state = _MERGED[module]
    entry, w = state[name], getattr(module, name)
    new = entry.original.to(w.device, torch.float64)
    for terms in entry.terms.values():
        for target, layer, s in terms:  # ΔW = s·(α/r)·up @ down, placed in the rows of the fused weight
            up = _full_up(target, layer.up.to(torch.float64), new.shape[0])
            if layer.dora_scale is not None:  # (in the order merged: DoRA's norm depends on W)
                new = layer.apply_dora(
                    new, (up @ layer.down.flatten(1).to(torch.float64)) * layer.scale(1), s
                )
                continue
            delta = (up @ layer.down.flatten(1).to(torch.float64)) * layer.scale(s)
            new += delta.to(new.device).reshape(new.shape)
    w.copy_(new)
    entry.version = w._version
    if not entry.terms:
        del state[name]


# -- patching on the fly -----------------------------------------------------------------------------------


@dataclass
class _Patched:  # hooks on one module and the LoRA terms they add, per active patch
    hooks: list
    terms: dict[int, list] = field(default_factory=dict)


_PATCHED: weakref.WeakKeyDictionary[nn.Module, _Patched] = weakref.WeakKeyDictionary()


def patch(pipe, lora, unet_scale: float = 1.0, te_scale: float | None = None) -> Handle:
    """Add the LoRA's output on the fly, leaving the weights untouched; patches stack (several LoRAs, each
    with its own weights) and `remove()` in any order. Linear and 1×1-conv layers get a forward hook adding
    s·(α/r)·up(down(x)) (the low-rank path; never a dense ΔW). 3×3 convs (LoCon) and the fused OpenCLIP
    q/k/v rows are swapped for W + ΔW while their network runs (a pre-hook on the component, restored by a
    hook that runs even on errors): unet.py's inference path convolves small inputs by GEMM on
    `conv.weight` without calling the conv module, so a hook on the conv itself would not always run."""
    lora, scales = _as_lora(lora), _scales(unet_scale, te_scale)
    return _patch_placed(pipe, place(pipe, lora), scales)


def apply(pipe, lora, unet_scale: float = 1.0, te_scale: float | None = None) -> Handle:
    """What a generation uses: `patch` for the layers a forward hook adapts at low-rank cost (Linear, 1×1
    conv), `merge` for the denoiser's layers a patch would rebuild as W + ΔW at every step (LoCon 3×3
    convs, DoRA, fused row blocks). Text encoders run once per call: patched. benchmarks/lora.py, SD1.5
    UNet, rank 32, 2 cores: applied +4-7% per step (patched: +5% for a LoRA without LoCon, +37-122% with
    it), for a one-off 5.5 s merge and exact unmerge of the LoCon convs per generation (16 ms without)."""
    lora, scales = _as_lora(lora), _scales(unet_scale, te_scale)
    placed = place(pipe, lora)
    heavy = [(t, layer) for t, layer in placed if t.component in _DENOISERS and not _lowrank(pipe, t, layer)]
    light = [p for p in placed if p not in heavy]
    handles = [_merge_placed(pipe, heavy, scales)] if heavy else []
    try:
        handles.append(_patch_placed(pipe, light, scales))
    except BaseException:
        for h in handles:
            h.remove()
        raise

    def undo():
        for h in reversed(handles):
            h.remove()

    return Handle(undo)


def _lowrank(pipe, target: Target, layer: LoRALayer) -> bool:
    """Whether a patch adds this layer as s·up(down(x)) in a forward hook (else: W + ΔW swapped in)."""
    module = pipe.components[target.component].get_submodule(target.module)
    small = isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1))
    return layer.dora_scale is None and target.param == "weight" and small


def _patch_placed(pipe, placed: list[tuple[Target, LoRALayer]], scales: dict[bool, float]) -> Handle:
    key, hooked = object(), []
    for target, layer in placed:
        root = pipe.components[target.component]
        module = root.get_submodule(target.module)
        w = getattr(module, target.param)
        down, up = layer.down.to(w.device, w.dtype), layer.up.to(w.device, w.dtype)
        s = layer.scale(scales[target.component in _DENOISERS])
        lowrank = _lowrank(pipe, target, layer)
        if layer.dora_scale is not None:  # DoRA is not additive: W' is computed from W (and m) per call
            s = (layer, scales[target.component in _DENOISERS])
        if lowrank and isinstance(module, nn.Linear):  # (SD3's fused q/k/v: up padded to the whole qkv)
            term, host = (down.flatten(1), _full_up(target, up, w.shape[0]), s), module
        elif lowrank:  # 1×1 conv
            term, host = (down.reshape(*down.shape[:2], 1, 1), up.reshape(*up.shape[:2], 1, 1), s), module
        else:
            term, host = (target, down, up, s), root
        if host not in _PATCHED:
            _PATCHED[host] = _Patched(_hooks(host, lowrank))
        _PATCHED[host].terms.setdefault(id(key), []).append(term)
        hooked.append(host)

    def undo():
        for host in dict.fromkeys(hooked):
            state = _PATCHED[host]
            state.terms.pop(id(key), None)
            if not state.terms:
                for h in state.hooks:
                    h.remove()
                del _PATCHED[host]

    return Handle(undo)


def _hooks(host: nn.Module, lowrank: bool) -> list:
    if lowrank:
        return [host.register_forward_hook(_add_lowrank)]
    return [host.register_forward_pre_hook(_swap_in), host.register_forward_hook(_swap_out, always_call=True)]


def _add_lowrank(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    x = args[0]
    inplace = not torch.is_grad_enabled() and out.is_contiguous()
    for terms in _PATCHED[module].terms.values():
        for down, up, s in terms:
            if isinstance(module, nn.Linear):
                h = F.linear(x, down.to(x.dtype))  # [..., r]
                if inplace:  # out += s·h @ upᵀ as one GEMM accumulating into out: no [..., out] temporary
                    out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), up.to(x.dtype).T, alpha=s)
                    continue
                h = F.linear(h, up.to(x.dtype))
            else:  # a 1×1 conv: down [r, in, 1, 1] with the conv's stride, then up [out, r, 1, 1]
                h = F.conv2d(F.conv2d(x, down.to(x.dtype), stride=module.stride), up.to(x.dtype))
                if inplace:
                    out.add_(h, alpha=s)
                    continue
            out = out + s * h
    return out


_SAVED: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()


def _swap_in(root: nn.Module, args) -> None:
    """Before `root` runs: each patched parameter -> W + Σ ΔW (computed in float32, cast to W's dtype)."""
    weights: dict[tuple[nn.Module, str], torch.Tensor] = {}
    for terms in _PATCHED[root].terms.values():
        for target, down, up, s in terms:
            module = root.get_submodule(target.module)
            base = module._parameters[target.param]
            w = weights.setdefault((module, target.param), base.detach().to(torch.float32, copy=True))
            delta = _full_up(target, up.float(), w.shape[0]) @ down.flatten(1).float()
            if isinstance(s, tuple):  # DoRA: (layer, the user's weight)
                layer, weight = s
                weights[(module, target.param)] = w = layer.apply_dora(w, delta * layer.scale(1), weight)
                continue
            w += delta.reshape(w.shape) * s
    saved = []
    for (module, name), w in weights.items():
        base = module._parameters[name]
        saved.append((module, name, base))
        module._parameters[name] = w.to(base.dtype)  # a plain tensor for the duration of the forward
    _SAVED[root] = saved


def _swap_out(root: nn.Module, args, out) -> None:
    for module, name, base in _SAVED.pop(root, []):
        module._parameters[name] = base
