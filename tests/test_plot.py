"""plot.py: curve figures written atomically as PNG, log axes ticked at the measured x values."""

import os

from PIL import Image

from latentforge.plot import curve_style, draw_curves, figure, line_plot, save_png


def test_line_plot_writes_a_png_and_no_temporary(tmp_path):
    path = tmp_path / "loss.png"
    series = {"loss": (list(range(1, 301)), [1.0 / k for k in range(1, 301)])}
    line_plot(
        series, str(path), title="training loss", xlabel="step", ylabel="loss", logy=True, size=(900, 560)
    )
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (900, 560)
    assert os.listdir(tmp_path) == ["loss.png"]


def test_log_x_ticks_at_measured_values():
    fig = figure((1400, 700))
    ax = fig.axes[0]
    series = {
        f"s{k}": ([5, 9, 19, 49] if k % 2 else [5, 10, 20, 50], [1.0, 0.5, 0.2, 0.1]) for k in range(21)
    }
    draw_curves(ax, series, "t", "NFE", "err", logx=True, logy=True)
    labelled = {float(t) for t in ax.xaxis.get_majorticklocs()}
    assert {5.0, 10.0, 20.0, 50.0} <= labelled  # round targets labelled, their neighbours only ticked
    assert {9.0, 19.0, 49.0} <= {float(t) for t in ax.xaxis.get_minorticklocs()}
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert len(ax.get_legend().get_texts()) == 21


def test_curve_styles_distinct_for_40_curves():
    pairs = {(str(curve_style(k)["color"]), curve_style(k)["linestyle"]) for k in range(40)}
    assert len(pairs) == 40


def test_save_png_pil(tmp_path):
    save_png(Image.new("RGB", (4, 3), "white"), str(tmp_path / "a.png"))
    assert os.listdir(tmp_path) == ["a.png"]
