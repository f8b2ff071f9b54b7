"""Curve plots with matplotlib (benchmark curves, loss curves) and PNG writing, every file atomically.

Figures are built on matplotlib's object API with an Agg canvas (`Figure` + `FigureCanvasAgg`), so
nothing touches pyplot's global state or needs a display.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from matplotlib import colormaps, ticker
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from latentforge.files import atomic_path

Series = Mapping[str, tuple[Sequence[float], Sequence[float]]]

DPI = 100
# Curve k gets colour k mod 10, line style ⌊k/10⌋ and marker k mod 7: the (colour, style) pair is unique
# for 40 curves, and the marker (7 is coprime to 10) separates neighbours of the same colour again.
COLORS = list(colormaps["tab10"].colors)
LINESTYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D", "v", "P", "X"]
MAX_MARKED_POINTS = 60  # longer series (loss curves) are drawn as plain lines


def curve_style(k: int) -> dict:
    return {
        "color": COLORS[k % len(COLORS)],
        "linestyle": LINESTYLES[(k // len(COLORS)) % len(LINESTYLES)],
        "marker": MARKERS[k % len(MARKERS)],
    }


def _points(xs, ys, logx: bool, logy: bool) -> tuple[list[float], list[float]]:
    """The finite points, and on a log axis only the positive ones."""
    keep = [
        (float(x), float(y))
        for x, y in zip(xs, ys, strict=True)
        if math.isfinite(x) and math.isfinite(y) and (x > 0 or not logx) and (y > 0 or not logy)
    ]
    return [p[0] for p in keep], [p[1] for p in keep]


def _spread_ticks(values: Sequence[float], min_gap: float) -> list[float]:
    """A subset of `values` at least `min_gap` apart in log10, round numbers first (multiples of 10, 5,
    2), so the labels neither overlap nor skip the round targets."""

    def roundness(v):
        n = round(v)
        whole = abs(v - n) < 1e-9
        return (not (whole and n % 10 == 0), not (whole and n % 5 == 0), not (whole and n % 2 == 0), v)

    chosen: list[float] = []
    for v in sorted(values, key=roundness):
        if all(abs(math.log10(v) - math.log10(c)) >= min_gap for c in chosen):
            chosen.append(v)
    return sorted(chosen)


def _measured_log_ticks(ax: Axes, xs: Sequence[float], max_distinct: int = 40) -> None:
    """Ticks of a log x axis at the measured x values: every one gets a tick mark, a spread-out subset
    (`_spread_ticks`, about 1/16 of the axis apart) gets a plain-number label."""
    values = sorted({x for x in xs if x > 0})
    if not 1 <= len(values) <= max_distinct:
        return
    lo, hi = ax.get_xlim()
    span = max(math.log10(hi / lo), 1e-9)
    ax.xaxis.set_major_locator(ticker.FixedLocator(_spread_ticks(values, span / 16)))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(ticker.FixedLocator(values))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())


def draw_curves(
    ax: Axes,
    series: Series,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    logx: bool = False,
    logy: bool = False,
) -> None:
    """Each series (name -> (xs, ys)) as a line in its own `curve_style`, with markers at the points
    unless the series is long; log axes drop non-positive values. A log x axis with few distinct x
    values (NFEs) gets its ticks at those values. With more than one series the legend goes outside
    the axes on the right, one column per 28 names."""
    all_x = []
    for k, (name, (xs, ys)) in enumerate(series.items()):
        px, py = _points(xs, ys, logx, logy)
        style = curve_style(k)
        if len(px) > MAX_MARKED_POINTS:
            style["marker"] = None
        ax.plot(px, py, label=name, linewidth=1.4, markersize=4.5, **style)
        all_x += px
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.grid(True, which="major", color="0.85", linewidth=0.8)
    ax.grid(True, which="minor", color="0.93", linewidth=0.5)
    ax.set_axisbelow(True)
    ax.set_title(title, fontsize="medium", loc="left")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx and all_x:
        _measured_log_ticks(ax, all_x)
    elif not logx and all_x and all(x == int(x) for x in all_x):  # steps: no ticks at 1.25, 1.5
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    if len(series) > 1:
        ax.legend(
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            ncols=-(-len(series) // 28),
            fontsize="small",
            frameon=False,
            borderaxespad=0.0,
        )


def figure(size: tuple[int, int] = (1400, 900), rows: int = 1, title: str = "") -> Figure:
    """A figure of `size` pixels with `rows` axes one above the other (constrained layout, which makes
    room for legends outside the axes), on an Agg canvas."""
    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    fig.subplots(rows, 1, squeeze=False)
    if title:
        fig.suptitle(title, fontsize="large")
    return fig


def save_figure(fig: Figure, path: str) -> None:
    """The figure as a PNG, written atomically (`files.atomic_path`)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)


def line_plot(
    series: Series,
    path: str | None = None,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    logx: bool = False,
    logy: bool = False,
    size: tuple[int, int] = (1400, 900),
) -> Figure:
    """One panel of curves (`draw_curves`) in a figure of `size` pixels; written to `path` as a PNG
    when given. Returns the figure."""
    fig = figure(size)
    draw_curves(fig.axes[0], series, title, xlabel, ylabel, logx, logy)
    if path is not None:
        save_figure(fig, path)
    return fig


def save_png(img, path: str) -> None:
    """A PIL image as a PNG, written atomically (`files.atomic_path`)."""
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
