"""Degraded inputs for the shapes evaluator's tests and benchmarks: images degraded like generated images
(``degrade``) and prompts with one stated attribute changed (``perturb``).

Not part of the package: only tests/ and benchmarks/ use them (benchmarks put tests/ on ``sys.path``).
"""

from __future__ import annotations

import io

import numpy as np
from scipy import ndimage

from latentforge.shapes.render import COLOR_NAMES, POSITION_NAMES, SHAPES, Obj, Scene

DEGRADATIONS = ("blur", "noise", "jpeg", "jpeg420", "color", "shift", "affine")


def soften(
    img: np.ndarray,
    rng: np.random.Generator,
    blur: float = 0.0,
    noise: float = 0.0,
    quality: int | None = None,
) -> np.ndarray:
    """``img`` (uint8 HxWx3) made soft and noisy like a generated image, in the order a generator's output
    meets them: Gaussian blur of sigma ``blur`` pixels (edges replicated), additive Gaussian noise of std
    ``noise`` levels (of 255; rounded and clipped to uint8), then a JPEG round trip at ``quality`` with 4:2:0
    chroma subsampling (``subsampling=2`` explicitly; None: no JPEG). Each step is skipped at 0 / None."""
    from PIL import Image

    x = img.astype(np.float32)
    if blur > 0:
        x = ndimage.gaussian_filter(x, sigma=(blur, blur, 0), mode="nearest")
    if noise > 0:
        x = x + rng.normal(0, noise, x.shape)
    out = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    if quality is not None:
        buf = io.BytesIO()
        Image.fromarray(out).save(buf, format="JPEG", quality=quality, subsampling=2)
        buf.seek(0)
        out = np.asarray(Image.open(buf).convert("RGB"))
    return out


def degrade(img: np.ndarray, kind: str, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """``img`` (uint8 HxWx3) degraded like a generated image; ``strength`` 1 = the benchmark's maximum:
    blur: Gaussian sigma 1 px; noise: additive Gaussian, std 0.05 of full range; jpeg: quality 50,
    full-resolution chroma (4:4:4); jpeg420: quality 50 with chroma subsampled 2x (the libjpeg default;
    at 64 px it erases the shape of small objects that differ from the background mostly in chroma);
    color: per-channel offsets uniform in +-15; shift: integer offsets in +-2 px; affine: scale 1 +- 3%,
    rotation +-3 degrees, sub-pixel shift +-1 px (bilinear); "all": affine, shift, blur, color, noise, jpeg
    in turn."""
    from PIL import Image

    x = img.astype(np.float32)
    if kind == "all":
        for k in ("affine", "shift", "blur", "color", "noise", "jpeg"):
            img = degrade(img, k, rng, strength)
        return img
    if kind == "blur":
        x = ndimage.gaussian_filter(x, sigma=(strength, strength, 0), mode="nearest")
    elif kind == "noise":
        x = x + rng.normal(0, 0.05 * 255 * strength, x.shape)
    elif kind in ("jpeg", "jpeg420"):
        q = int(round(100 - 50 * strength))
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=q, subsampling=0 if kind == "jpeg" else 2)
        buf.seek(0)
        return np.asarray(Image.open(buf).convert("RGB"))
    elif kind == "color":
        x = x + rng.uniform(-15, 15, 3) * strength
    elif kind == "shift":
        m = max(1, int(round(2 * strength)))
        dy, dx = rng.integers(-m, m + 1, 2)
        x = ndimage.shift(x, (dy, dx, 0), order=0, mode="nearest")
    elif kind == "affine":
        s = 1 + rng.uniform(-0.03, 0.03) * strength
        a = np.deg2rad(rng.uniform(-3, 3) * strength)
        t = rng.uniform(-1, 1, 2) * strength
        m = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) / s
        c = (np.array(img.shape[:2]) - 1) / 2
        off = c - m @ (c + t)
        x = np.stack(
            [ndimage.affine_transform(x[..., k], m, off, order=1, mode="nearest") for k in range(3)], -1
        )
    else:
        raise ValueError(f"unknown degradation {kind!r}; expected one of {', '.join(DEGRADATIONS)}, all")
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def perturb(spec: Scene, rng: np.random.Generator) -> Scene | None:
    """``spec`` with one stated attribute changed (shape, colour, size, position, background or a relation
    flipped), or None if nothing can be changed. The result no longer describes scenes the original did
    only if it contradicts them -- ``satisfies`` decides; tests check that it does."""
    opts = []
    for k, o in enumerate(spec.objects):
        opts += [("shape", k), ("color", k)]
        if o.size is not None:
            opts.append(("size", k))
        if o.position is not None:
            opts.append(("position", k))
    if spec.background is not None:
        opts.append(("background", None))
    opts += [("relation", k) for k in range(len(spec.relations))]
    kind, k = opts[rng.integers(len(opts))]
    objs = list(spec.objects)
    flip = {"above": "below", "below": "above", "left_of": "right_of", "right_of": "left_of"}
    if kind == "relation":
        rels = list(spec.relations)
        i, r, j = rels[k]
        rels[k] = (i, flip[r], j)
        return Scene(tuple(objs), spec.background, tuple(rels))
    if kind == "background":
        used = {o.color for o in objs} | {spec.background}
        return Scene(tuple(objs), str(rng.choice([c for c in COLOR_NAMES if c not in used])), spec.relations)
    o = objs[k]
    if kind == "shape":
        objs = [Obj(str(rng.choice([s for s in SHAPES if s != o.shape])), o.color, o.size, o.position)
                if x == o else x for x in objs]  # fmt: skip
    elif kind == "color":
        bad = {o.color, spec.background}
        new = str(rng.choice([c for c in COLOR_NAMES if c not in bad]))
        objs = [Obj(x.shape, new, x.size, x.position) if x == o else x for x in objs]
    elif kind == "size":
        new = "small" if o.size == "large" else "large"
        objs[k] = Obj(o.shape, o.color, new, o.position)
    else:
        taken = {x.position for x in objs}
        new = str(rng.choice([p for p in POSITION_NAMES if p not in taken]))
        objs[k] = Obj(o.shape, o.color, o.size, new)
    return Scene(tuple(objs), spec.background, spec.relations)
