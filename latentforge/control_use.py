"""The ControlNets of one generation call: which files, which control images, how strongly and when; on
the UNet for one sampling pass and gone after it.

Per ControlNet (`Control`): its weight (strength: every residual is multiplied by it), the fraction of
the steps it acts on (A1111's "Guidance Start/End": step i of n is controlled when start <= i/n <= end,
sd-webui-controlnet `hook.py`), guess mode, and a preprocessor (control_images.py) that makes the map from
an ordinary picture. Several ControlNets add their residuals (ControlNet paper §3.5, "multiple conditions":
"directly add the outputs of the corresponding ControlNets to the Stable Diffusion model").

Guess mode (the paper's §4.1 "no prompt"/guess mode; lllyasviel/ControlNet `gradio_*2image.py`): the
ControlNet acts on the conditional half of classifier-free guidance only (`un_cond["c_concat"] = None`)
and residual i of N is scaled by 0.825^(N−1−i): ≈ 0.1 for the first skip, 1 for the middle block (the
released scripts' `[strength * 0.825 ** (12 - i) for i in range(13)]` for SD1's 13 residuals; diffusers'
`torch.logspace(-1, 0, 13)` is 10^(−1/12) = 0.8254 per step, the same ramp to 4 digits).

Steps are found by σ, not by counting calls: a call belongs to the schedule interval [σ_{i+1}, σ_i] that
holds its σ, seen through the network's timestep t(σ) (monotone in σ for every model sampling here), as
speedups.py counts them; so Heun's corrector at σ_{i+1} belongs to step i + 1 and a DPM-2 midpoint to its
step. Each sampling pass (img2img's shortened schedule, the hires fix's second pass) counts its own steps.

The UNet is patched by a replaced `forward` on the instance (deleted after, however the block ends) that
calls the class's forward with `control=` the summed residuals, or with nothing at all when no ControlNet
acts at this step (weight 0, or outside its window): those steps are bit-identical to a call without
ControlNets. The hint encoder's output E(c) depends neither on t nor on the prompt: it is computed once
per pass, not at every step (diffusers recomputes it per call).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from latentforge import control_images
from latentforge.models.controlnet import HINT_DOWNSCALE, ControlNet

GUESS_RATIO = 0.825  # the released scripts' per-block ratio of guess mode's residual ramp


def guess_scales(n: int) -> list[float]:
    """Guess mode's factor for each of n residuals: 0.825^(n−1−i), the middle block's (last) 1."""
    return [GUESS_RATIO ** float(n - 1 - i) for i in range(n)]


@dataclass
class Control:
    """One ControlNet in a call. model: a ControlNet or a file (either layout, checkpoints_controlnet.py).
    image: the control map or the picture to make it from (a PIL image, an image file's path, or a
    (1 | B, C, H, W) tensor in [0, 1]: the ControlNet's own range); another size than the output's is
    resized (with a warning; refused with strict_size). weight: strength, any finite number (0: off).
    start, end: the fraction of the steps it acts on, 0 <= start <= end <= 1. guess: guess mode.
    preprocess: "none" (the image is the map), "canny", "scribble" or "seg" (control_images.py)."""

    model: object
    image: object
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess: bool = False
    preprocess: str = "none"

    def check(self, k: int = 0) -> Control:
        what = f"controlnet[{k}]"
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"{what}: weight must be a finite number, got {w!r}")
        for name in ("start", "end"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ValueError(
                    f"{what}: {name} must be a number in [0, 1] (a fraction of the steps), got {v!r}"
                )
        if self.start > self.end:
            raise ValueError(f"{what}: start {self.start} is after end {self.end}")
        if not isinstance(self.guess, bool):
            raise ValueError(f"{what}: guess must be True or False, got {self.guess!r}")
        if self.preprocess not in control_images.PREPROCESSORS:
            known = ", ".join(control_images.PREPROCESSORS)
            raise ValueError(f"{what}: unknown preprocess {self.preprocess!r}; known: {known}")
        if not isinstance(self.model, (ControlNet, str, os.PathLike)):
            raise ValueError(
                f"{what}: model must be a ControlNet or a file path, got {type(self.model).__name__}"
            )
        if not isinstance(self.image, (Image.Image, torch.Tensor, str, os.PathLike)):
            raise ValueError(
                f"{what}: image must be a PIL image, an image file or a (B, C, H, W) tensor in [0, 1], "
                f"got {type(self.image).__name__}"
            )
        return self


def as_controls(value) -> list[Control]:
    """`controlnet=` as a list of checked Controls: None, a Control or a dict of its fields, or a list."""
    if value is None:
        return []
    items = [value] if isinstance(value, (Control, dict)) else value
    if not isinstance(items, Sequence) or isinstance(items, str):
        raise ValueError(
            f"controlnet must be a Control, a dict of its fields or a list of them, got {value!r}"
        )
    out = []
    for k, item in enumerate(items):
        if isinstance(item, dict):
            unknown = set(item) - {f.name for f in dataclasses.fields(Control)}
            if unknown or "model" not in item or "image" not in item:
                raise ValueError(
                    f"controlnet[{k}]: fields are model, image (both needed), weight, start, end, guess, "
                    f"preprocess; got {sorted(item)}"
                )
            item = Control(**item)
        if not isinstance(item, Control):
            raise ValueError(f"controlnet[{k}] must be a Control or a dict, got {type(item).__name__}")
        out.append(item.check(k))
    return out


# -- files ---------------------------------------------------------------------------------------------------


class ControlNets:
    """A pipeline's last ControlNet files read (by path, size, mtime and dtype): a batch count or a server
    reads a file once."""

    size = 2

    def __init__(self):
        self._cache: collections.OrderedDict[tuple, ControlNet] = collections.OrderedDict()

    def load(self, path: str, unet) -> ControlNet:
        from latentforge.checkpoints_controlnet import load_controlnet

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ControlNet file {path!r} does not exist")
        key = self._key(path, unet)
        if key not in self._cache:
            p = next(unet.parameters())
            self._cache[key] = load_controlnet(path, p.dtype, like=unet.config).to(p.device)
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    def cached(self, path: str, unet) -> ControlNet | None:
        """The ControlNet `load` would return without reading the file, or None (memory.py's estimate)."""
        try:
            return self._cache.get(self._key(os.fspath(path), unet))
        except OSError:
            return None

    @staticmethod
    def _key(path: str, unet) -> tuple:
        p, st = next(unet.parameters()), os.stat(path)
        return (path, st.st_size, st.st_mtime_ns, p.dtype, p.device)


def _describe(cfg) -> str:
    adm = f", label embedding {cfg.adm_in_channels}" if cfg.num_classes else ""
    return (
        f"widths {cfg.model_channels}×{tuple(cfg.channel_mult)}, {cfg.num_res_blocks} res blocks per level, "
        f"text width {cfg.context_dim}{adm}"
    )


def check_fits(net: ControlNet, unet, family: str, name: str) -> None:
    """A ControlNet must mirror the UNet's encoder: the same skips (widths, levels, blocks per level), text
    width and label embedding. The error names the ControlNet's family (from its widths) and the model's."""
    a, b = net.config, unet.config
    fields = (
        "model_channels",
        "channel_mult",
        "num_res_blocks",
        "context_dim",
        "num_classes",
        "adm_in_channels",
    )
    if all(getattr(a, f) == getattr(b, f) for f in fields):
        return
    from latentforge.checkpoints_controlnet import family as family_of

    own = getattr(net, "family", None) or family_of(net.state_dict())
    made_for = f"a {own} ControlNet" if own else "a ControlNet"
    raise ValueError(
        f"{name} is {made_for} ({_describe(a)}); this pipeline's model is {family} ({_describe(b)}): "
        "a ControlNet only works with the family (and UNet size) it was trained for"
    )


# -- control images ------------------------------------------------------------------------------------------


def hint_tensor(
    image,
    preprocess: str,
    size: tuple[int, int],
    hint_size: tuple[int, int],
    strict: bool,
    quiet: bool,
    what: str,
) -> torch.Tensor:
    """The control map (1 | B, C, H, W) in [0, 1] at `hint_size` (the latent's size × 8, what E(·) reads;
    the output `size` for the SD VAEs, which downscale by 8 too). A picture of another size than the output
    (or the hint) is resized with a warning naming both sizes, or refused when strict: first to the output
    size (bicubic), where the preprocessor runs, so its edges stay one pixel wide; a map given as it is is
    resized bilinearly, antialiased."""
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            image = im.convert("RGB")
    if isinstance(image, torch.Tensor):
        t = image.float()[None] if image.ndim == 3 else image.float()
        if t.ndim != 4:
            raise ValueError(
                f"{what}: a control tensor must be (B, C, H, W) in [0, 1], got {tuple(image.shape)}"
            )
        got = (t.shape[-1], t.shape[-2])
    else:
        got = image.size
    if got not in (size, hint_size):
        text = f"{what}: the control image is {got[0]}x{got[1]}, the output {size[0]}x{size[1]}"
        if strict:
            raise ValueError(f"{text}; resize it or drop strict_size (--strict-size)")
        if not quiet:
            warnings.warn(f"{text}: resizing it to {size[0]}x{size[1]}", stacklevel=5)
    if preprocess != "none":
        if isinstance(image, torch.Tensor):  # (B, C, H, W) in [0, 1] -> the first image as a picture
            arr = (t[0, :3].clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            image = Image.fromarray(arr if arr.shape[2] == 3 else np.repeat(arr, 3, axis=2), "RGB")
        image = image.convert("RGB")
        if image.size != size:
            image = image.resize(size, Image.BICUBIC)
        image = control_images.preprocess(image, preprocess)
    if isinstance(image, Image.Image):
        t = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)[None].float() / 255
    if (t.shape[-1], t.shape[-2]) != hint_size:
        t = F.interpolate(t, size=hint_size[::-1], mode="bilinear", antialias=True, align_corners=False)
    return t.clamp(0, 1)


# -- one sampling pass ---------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """The checked ControlNets of one pass with their control maps (1 | B, C, H, W) on the device."""

    nets: list[ControlNet]
    hints: list[torch.Tensor]
    controls: list[Control]
    batch: int

    @contextlib.contextmanager
    def applied(self, unet, model_sampling, sigmas: torch.Tensor) -> Iterator[None]:
        """`unet` adds the residuals while the block runs (see the module docstring)."""
        if "forward" in vars(unet):
            raise RuntimeError(
                "the UNet's forward is already replaced (a step cache?); ControlNet needs the UNet"
            )
        ts = [float(t) for t in model_sampling.timestep(sigmas[sigmas > 0].float().cpu()).reshape(-1)]
        n = len(sigmas) - 1  # steps in this pass
        tol = 1e-5 * max(abs(t) for t in ts) + 1e-12  # float32 timesteps against the schedule's own
        units = []  # (ControlNet, Control, E(c) (1 | B, mc, h, w), a factor per residual)
        for net, c, hint in zip(self.nets, self.controls, self.hints, strict=True):
            k = len(net.input_blocks) + 1
            ramp = [c.weight * s for s in (guess_scales(k) if c.guess else [1.0] * k)]
            units.append((net, c, net.embed_hint(hint.to(next(net.parameters()).device)), ramp))
        forward = type(unet).forward

        def step(timesteps) -> int:  # the interval [σ_{i+1}, σ_i] holding σ: points at or above it, minus 1
            v = float(torch.as_tensor(timesteps).reshape(-1)[0])
            return max(sum(1 for s in ts if s >= v - tol) - 1, 0)

        def controlled(x, timesteps, context=None, y=None, control=None, context_mask=None, **kw):
            i, rows = step(timesteps), x.shape[0]
            total = control  # residuals the caller passes itself are added to
            for net, c, g, ramp in units:
                if c.weight == 0 or not c.start <= i / n <= c.end:
                    continue
                # guess mode: the conditional rows only (CFGDenoiser batches [cond; uncond])
                r = self.batch if c.guess and rows == 2 * self.batch else rows
                t = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(rows)[:r]
                g = g if g.shape[0] == 1 else g.repeat(rows // g.shape[0], 1, 1, 1)[:r]
                ctx = None if context is None else context[:r]
                mask = None if context_mask is None else context_mask[:r]
                yr = None if y is None else y[:r]
                res = net(x[:r, : net.config.in_channels], None, t, ctx, yr, g, context_mask=mask)
                res = [v * s for v, s in zip(res, ramp, strict=True)]
                if r < rows:  # no control on the unconditional half
                    res = [torch.cat([v, v.new_zeros(rows - r, *v.shape[1:])]) for v in res]
                total = res if total is None else [a + b for a, b in zip(total, res, strict=True)]
            return forward(unet, x, timesteps, context, y, control=total, context_mask=context_mask, **kw)

        unet.forward = controlled
        try:
            yield
        finally:
            del unet.forward


def prepare_controls(
    pipe, controlnet, width: int, height: int, batch: int, strict: bool, quiet: bool
) -> Prepared | None:
    """The call's ControlNets loaded (files read once: pipe.controlnets), checked against the pipeline's
    UNet, and their control maps at width×height; None when there are none. Before any sampling work."""
    controls = as_controls(controlnet)
    if not controls:
        return None
    if pipe.spec.net != "unet":
        raise ValueError(
            f"ControlNet works with the UNet families (sd15, sd21, sdxl); {pipe.family} has a {pipe.spec.net}"
        )
    unet = pipe.net
    cache = getattr(pipe, "controlnets", None) or ControlNets()
    nets, hints = [], []
    for k, c in enumerate(controls):
        name = f"controlnet[{k}]" if isinstance(c.model, ControlNet) else f"ControlNet {os.fspath(c.model)!r}"
        net = c.model if isinstance(c.model, ControlNet) else cache.load(c.model, unet)
        check_fits(net, unet, pipe.family, name)
        where, there = next(net.parameters()).device, next(unet.parameters()).device
        if where != there:
            raise ValueError(f"{name} is on {where}, the UNet on {there}: move it there (ControlNet.to)")
        f = pipe.downscale
        hint_size = (width // f * HINT_DOWNSCALE, height // f * HINT_DOWNSCALE)
        hint = hint_tensor(
            c.image, c.preprocess, (width, height), hint_size, strict, quiet, f"controlnet[{k}]"
        )
        if hint.shape[0] not in (1, batch):
            raise ValueError(
                f"controlnet[{k}]: {hint.shape[0]} control images for a batch of {batch}; give 1 or {batch}"
            )
        if hint.shape[1] != net.config.hint_channels:
            raise ValueError(
                f"controlnet[{k}]: the control image has {hint.shape[1]} channels; this ControlNet reads "
                f"{net.config.hint_channels}"
            )
        nets.append(net)
        hints.append(hint)
    return Prepared(nets, hints, controls, batch)


def controls_applied(prepared: Prepared | None, unet, model_sampling, sigmas: torch.Tensor):
    """`prepared.applied(...)`, or nothing to do when the call has no ControlNet."""
    return contextlib.nullcontext() if prepared is None else prepared.applied(unet, model_sampling, sigmas)
