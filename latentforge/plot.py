"""A small line plot drawn with Pillow (no matplotlib): benchmark curves and loss curves."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0), (174, 199, 232),
]  # fmt: skip
DASHES = [None, (6, 3), (2, 3)]


def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    if log:
        return [10.0**e for e in range(math.floor(lo), math.ceil(hi) + 1)]
    span = hi - lo or 1.0
    step = 10 ** math.floor(math.log10(span / 5))
    for m in (1, 2, 5, 10):
        if span / (step * m) <= 6:
            step *= m
            break
    start = math.ceil(lo / step) * step
    return [start + k * step for k in range(int((hi - start) / step) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.0e}" if (abs(v) >= 1e4 or 0 < abs(v) < 1e-2) else f"{v:g}"


def save_png(img: Image.Image, path: str) -> None:
    """Write to a temporary name in the same folder, then rename: a crash never leaves half a file."""
    tmp = f"{path}.tmp-{os.getpid()}.png"
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def stack(images: Sequence[Image.Image]) -> Image.Image:
    """Images one above the other."""
    out = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)), "white")
    y = 0
    for im in images:
        out.paste(im, (0, y))
        y += im.height
    return out


def line_plot(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | None = None,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    logx: bool = False,
    logy: bool = False,
    size: tuple[int, int] = (1400, 900),
) -> Image.Image:
    """Draw each series (name -> (xs, ys)) as a polyline with markers and a legend; returns the image and,
    given a path, writes it as a PNG atomically."""
    W, H = size
    legend_w = 260 if len(series) > 1 else 0
    left, right, top, bottom = 80, 20 + legend_w, 40, 60
    font = ImageFont.load_default()
    img = Image.new("RGB", (W, H), "white")
    dr = ImageDraw.Draw(img)

    def tx(v, log):
        return math.log10(v) if log else v

    pts = [
        (tx(x, logx), tx(y, logy))
        for xs, ys in series.values()
        for x, y in zip(xs, ys, strict=True)
        if (x > 0 or not logx) and (y > 0 or not logy) and math.isfinite(x) and math.isfinite(y)
    ]
    if not pts:
        pts = [(0.0, 0.0), (1.0, 1.0)]
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pw, ph = W - left - right, H - top - bottom

    def px(x, y):
        return left + (x - x0) / (x1 - x0) * pw, top + (1 - (y - y0) / (y1 - y0)) * ph

    dr.rectangle([left, top, left + pw, top + ph], outline="black")
    for t in _ticks(x0, x1, logx):
        v = math.log10(t) if logx else t
        if x0 - 1e-9 <= v <= x1 + 1e-9:
            X, _ = px(v, y0)
            dr.line([X, top, X, top + ph], fill=(225, 225, 225))
            dr.text((X - 12, top + ph + 6), _fmt(t), fill="black", font=font)
    for t in _ticks(y0, y1, logy):
        v = math.log10(t) if logy else t
        if y0 - 1e-9 <= v <= y1 + 1e-9:
            _, Y = px(x0, v)
            dr.line([left, Y, left + pw, Y], fill=(225, 225, 225))
            dr.text((6, Y - 6), _fmt(t), fill="black", font=font)
    dr.text((left, 12), title, fill="black", font=font)
    dr.text((left + pw // 2 - 30, H - 24), xlabel, fill="black", font=font)
    dr.text((6, 12), ylabel, fill="black", font=font)

    for k, (name, (xs, ys)) in enumerate(series.items()):
        color = PALETTE[k % len(PALETTE)]
        dash = DASHES[(k // len(PALETTE)) % len(DASHES)]
        line = [
            px(tx(x, logx), tx(y, logy))
            for x, y in zip(xs, ys, strict=True)
            if (x > 0 or not logx) and (y > 0 or not logy) and math.isfinite(x) and math.isfinite(y)
        ]
        for a, b in zip(line[:-1], line[1:], strict=True):
            if dash is None:
                dr.line([a, b], fill=color, width=2)
            else:  # dashed: draw on-segments along the line
                L = math.dist(a, b)
                pos = 0.0
                while pos < L:
                    e = min(pos + dash[0], L)
                    p = (a[0] + (b[0] - a[0]) * pos / L, a[1] + (b[1] - a[1]) * pos / L)
                    q = (a[0] + (b[0] - a[0]) * e / L, a[1] + (b[1] - a[1]) * e / L)
                    dr.line([p, q], fill=color, width=2)
                    pos += dash[0] + dash[1]
        for X, Y in line:
            dr.ellipse([X - 2, Y - 2, X + 2, Y + 2], fill=color)
        if legend_w:
            ly = top + 4 + 14 * k
            lx = W - legend_w + 10
            dr.line([lx, ly + 6, lx + 24, ly + 6], fill=color, width=3 if dash is None else 1)
            dr.text((lx + 30, ly), name, fill="black", font=font)

    if path is not None:
        save_png(img, path)
    return img
