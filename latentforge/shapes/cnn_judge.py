"""The shapes evaluator's second judge: a small CNN trained on renders, independent of the analytic one.

The analytic judge (``detection.py``) segments an image and fits the renderer's own templates. This one
knows nothing of templates or segmentation: it was trained (``scripts/train_cnn_judge.py``) on renders of
random scenes of every split, degraded at random (sub-pixel shifts, blur, colour offsets, noise, JPEG 4:2:0),
to name what stands in each of the 3x3 grid cells. The two share only the scene grammar and ``scoring.py``;
a generator whose images fool one should not fool the other, so ``evaluate`` runs both and flags a report
whose judges disagree on more than ``MAX_DISAGREEMENT`` of the images.

Network (tensor shapes for a batch of N; ``widths`` (32, 64, 128), ``cell_width`` 192; ~0.5 M parameters):

    image uint8 [N, R, R, 3], R in 32..512 -> float [N, 3, 72, 72] in [-1, 1] (bilinear; antialiased when
        shrinking). At 72 px each grid cell is 24 x 24 pixels, and after three stride-2 stages exactly 3 x 3
        feature pixels, so a cell's features never straddle two cells.
    body:  3 x (conv3x3 stride 2, SiLU, conv3x3, SiLU)       -> h    [N, 128, 9, 9]
    cell:  conv3x3 stride 3 (one output per grid cell), SiLU -> c    [N, 192, 3, 3]
    heads: 1x1 convs on c: shape [N, 9, 3, 3] (empty + 8 shapes), color [N, 11, 3, 3], size [N, 2, 3, 3];
           linear on mean(h): background [N, 11]

No normalisation layers: colour is absolute (the palette), and GroupNorm would divide it out. Decoding: a
cell holds an object when its shape head's argmax is not "empty"; the object's colour is the colour head's
argmax over the colours other than the background's (an object never has the background's colour).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .render import COLOR_NAMES, POSITION_NAMES, SHAPES, SIZES, Obj, Scene, check_resolution

INPUT = 72  # pixels the network sees: 3 cells x 24
MAX_DISAGREEMENT = 0.03  # issue 10: judges disagreeing on more than 3% of images make a report untrustworthy
DEFAULT_PATH = Path(__file__).resolve().parents[1] / "data" / "shapes_judge.safetensors"


@dataclass(frozen=True)
class JudgeConfig:
    widths: tuple[int, ...] = (32, 64, 128)
    cell_width: int = 192

    def to_metadata(self) -> dict[str, str]:
        return {"widths": json.dumps(list(self.widths)), "cell_width": str(self.cell_width)}

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> JudgeConfig:
        return cls(tuple(int(w) for w in json.loads(meta["widths"])), int(meta["cell_width"]))


class CnnJudge(nn.Module):
    def __init__(self, cfg: JudgeConfig = JudgeConfig()):
        super().__init__()
        if 2 ** len(cfg.widths) * 9 != INPUT:
            raise ValueError(f"{len(cfg.widths)} stride-2 stages do not bring {INPUT} px to 9 x 9")
        self.cfg = cfg
        layers: list[nn.Module] = []
        c = 3
        for w in cfg.widths:
            layers += [
                nn.Conv2d(c, w, 3, stride=2, padding=1),
                nn.SiLU(),
                nn.Conv2d(w, w, 3, padding=1),
                nn.SiLU(),
            ]
            c = w
        self.body = nn.Sequential(*layers)
        self.cell = nn.Conv2d(c, cfg.cell_width, 3, stride=3)
        self.shape = nn.Conv2d(cfg.cell_width, 1 + len(SHAPES), 1)
        self.color = nn.Conv2d(cfg.cell_width, len(COLOR_NAMES), 1)
        self.size = nn.Conv2d(cfg.cell_width, len(SIZES), 1)
        self.background = nn.Linear(c, len(COLOR_NAMES))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: float [N, 3, 72, 72] in [-1, 1] (``prepare``) -> logits: shape/color/size [N, K, 3, 3] (cells
        row-major, as ``POSITION_NAMES``), background [N, 11]."""
        h = self.body(x)  # [N, C, 9, 9]
        c = F.silu(self.cell(h))  # [N, cell_width, 3, 3]
        return {
            "shape": self.shape(c),
            "color": self.color(c),
            "size": self.size(c),
            "background": self.background(h.mean((2, 3))),
        }


def prepare(images) -> torch.Tensor:
    """uint8 images [N, R, R, 3] (an array or a list of equal-size arrays) -> float32 [N, 3, 72, 72] in
    [-1, 1]."""
    # a copy: torch reads it, and a caller's array may be read-only
    arr = np.stack([np.asarray(im) for im in images]) if isinstance(images, list) else np.array(images)
    if arr.ndim != 4 or arr.shape[3] != 3 or arr.shape[1] != arr.shape[2] or arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 images [N, R, R, 3], got {arr.dtype} {tuple(arr.shape)}")
    check_resolution(arr.shape[1])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if x.shape[-1] != INPUT:
        x = F.interpolate(
            x, size=(INPUT, INPUT), mode="bilinear", align_corners=False, antialias=x.shape[-1] > INPUT
        )
    return x


def targets(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Training targets of complete scenes: shape [N, 3, 3] (0 empty, 1 + index in SHAPES), color and size
    [N, 3, 3] (-100 where empty: ignored by cross-entropy), background [N]."""
    n = len(scenes)
    shape = torch.zeros(n, 9, dtype=torch.long)
    color = torch.full((n, 9), -100, dtype=torch.long)
    size = torch.full((n, 9), -100, dtype=torch.long)
    bg = torch.empty(n, dtype=torch.long)
    for i, s in enumerate(scenes):
        bg[i] = COLOR_NAMES.index(s.background)
        for o in s.objects:
            k = POSITION_NAMES.index(o.position)
            shape[i, k] = 1 + SHAPES.index(o.shape)
            color[i, k] = COLOR_NAMES.index(o.color)
            size[i, k] = SIZES.index(o.size)
    return {
        "shape": shape.view(n, 3, 3),
        "color": color.view(n, 3, 3),
        "size": size.view(n, 3, 3),
        "background": bg,
    }


def loss(logits: dict[str, torch.Tensor], tgt: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the four cross-entropies (colour and size only where a cell holds an object)."""
    total = F.cross_entropy(logits["background"], tgt["background"])
    for k in ("shape", "color", "size"):
        total = total + F.cross_entropy(logits[k], tgt[k], ignore_index=-100)
    return total


def decode(logits: dict[str, torch.Tensor]) -> list[Scene]:
    """Complete scenes from the network's logits (see the module docstring)."""
    bg = logits["background"].argmax(1)  # [N]
    color = logits["color"].flatten(2).clone()  # [N, 11, 9]
    color[torch.arange(len(bg)), bg] = float("-inf")  # never the background's colour
    shape = logits["shape"].flatten(2).argmax(1).tolist()  # [N, 9]
    color = color.argmax(1).tolist()
    size = logits["size"].flatten(2).argmax(1).tolist()
    scenes = []
    for i, b in enumerate(bg.tolist()):
        objs = tuple(
            Obj(SHAPES[shape[i][k] - 1], COLOR_NAMES[color[i][k]], SIZES[size[i][k]], POSITION_NAMES[k])
            for k in range(9)
            if shape[i][k]
        )
        scenes.append(Scene(objs, COLOR_NAMES[b]))
    return scenes


def save(
    model: CnnJudge, path, dtype: torch.dtype = torch.float16, extra: dict[str, str] | None = None
) -> None:
    """Write the weights (cast to ``dtype``) and the config as safetensors, atomically."""
    from safetensors.torch import save_file

    from ..files import atomic_path

    sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    with atomic_path(Path(path)) as tmp:
        save_file(sd, str(tmp), metadata={**model.cfg.to_metadata(), **(extra or {})})


def load(path=None) -> CnnJudge:
    """The judge in ``path`` (default: the shipped ``latentforge/data/shapes_judge.safetensors``), strictly,
    in float32, in eval mode."""
    from safetensors import safe_open

    path = Path(path) if path is not None else DEFAULT_PATH
    if not path.is_file():
        raise FileNotFoundError(f"no CNN judge at {path} (scripts/train_cnn_judge.py makes one)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k).float() for k in f.keys()}
    try:
        cfg = JudgeConfig.from_metadata(meta)
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: not a CNN judge file (its metadata lacks {e})") from None
    model = CnnJudge(cfg)
    model.load_state_dict(sd, strict=True)
    return model.eval().requires_grad_(False)


@lru_cache(maxsize=1)
def _shipped() -> CnnJudge:
    return load()


def available() -> bool:
    return DEFAULT_PATH.is_file()


def judge(images, model: CnnJudge | None = None, batch: int = 256) -> list[Scene]:
    """The complete scene the CNN sees in each image (uint8 [R, R, 3]; sizes may differ)."""
    model = model if model is not None else _shipped()
    images = [np.asarray(im) for im in images]
    out: list[Scene | None] = [None] * len(images)
    by_size: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        by_size.setdefault(im.shape, []).append(i)
    with torch.inference_mode():
        for idx in by_size.values():
            for j in range(0, len(idx), batch):
                part = idx[j : j + batch]
                for i, sc in zip(part, decode(model(prepare([images[i] for i in part]))), strict=True):
                    out[i] = sc
    return out
