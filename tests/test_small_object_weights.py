"""`shapes.data.small_object_weights`: the loss weights a stated small object's latent pixels get, checked
against the renderer's own pictures (independent of the coverage masks the weights are made from)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentforge.shapes.captions import parse
from latentforge.shapes.data import sample, small_object_weights
from latentforge.shapes.render import COLORS, Obj, Scene, render


def _grow(cells: np.ndarray) -> np.ndarray:
    """Each cell and its 8 neighbours."""
    grown = np.zeros_like(cells)
    padded = np.pad(cells, 1)
    for dy in range(3):
        for dx in range(3):
            grown |= padded[dy : dy + cells.shape[0], dx : dx + cells.shape[1]]
    return grown


def _cells_of_object(o: Obj, size: int, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """From a render of the object alone, white on black: the latent cells [size/f, size/f] (grown by one)
    holding a pixel it touches (a coverage that moves the pixel by ≥ 0.5 of 225 levels: ≥ 1/450 shows), and
    those holding a pixel it covers whole (the white itself)."""
    solo = Scene((Obj(o.shape, "white", o.size, o.position),), "black", ())
    img = render(solo, size).min(axis=2).astype(int)  # [size, size]: black is 20, white 245
    n = size // factor

    def cells(mask):
        return _grow(mask.reshape(n, factor, n, factor).any(axis=(1, 3)))

    return cells(img != COLORS["black"][0]), cells(img == COLORS["white"][0])


@pytest.mark.parametrize("size,factor", [(64, 4), (32, 4), (64, 8)])
def test_weights_follow_the_rendered_small_objects(size, factor):
    w = 3.0
    seen = 0
    for i in range(120):
        _, text, scene, spec = sample(5, "train", i, size, labelled_share=0.8, background_share=0.8)
        got = small_object_weights([text], size, factor, w)
        assert got.shape == (1, 1, size // factor, size // factor) and got.dtype == torch.float32
        g = got[0, 0].numpy()
        touched = np.zeros(g.shape, dtype=bool)
        whole = np.zeros(g.shape, dtype=bool)
        for o in parse(text).objects:
            if o.size == "small" and o.position is not None:
                t, h = _cells_of_object(o, size, factor)
                touched |= t
                whole |= h
                seen += 1
        assert g.min() >= 1.0 and g.max() <= 1 + w
        assert (g[whole] >= 1 + w * (1 - 0.5 / 225)).all(), (i, text)  # covered whole: the full weight
        assert (g[~touched] < 1 + w * 0.5 / 225).all(), (i, text)  # untouched but for invisible slivers
        assert ((g > 1) == touched).mean() >= 0.98, (i, text)
    assert seen > 40  # the sample holds many stated small objects


def test_unstated_dropped_and_foreign_captions_weigh_one():
    texts = [
        "",  # caption dropout
        "a photo of a cat",  # outside the grammar
        "a big red circle in the upper left corner on a black background",  # not small
        "a red star",  # size and position unstated
        "a small red star",  # position unstated
    ]
    got = small_object_weights(texts, 64, 4, 5.0)
    assert torch.equal(got, torch.ones(len(texts), 1, 16, 16))
    one = small_object_weights(["a small red star at the top right on a black background"], 64, 4, 5.0)
    assert one.max() == 6.0 and 0 < (one == 6.0).float().mean() < 0.15
    assert torch.equal(
        small_object_weights(["a small red star at the top right"], 64, 4, 0.0), torch.ones(1, 1, 16, 16)
    )


@pytest.mark.parametrize(
    "kw,words",
    [
        ({"factor": 3}, "positive divisor"),
        ({"factor": 0}, "positive divisor"),
        ({"weight": -1.0}, "finite number >= 0"),
        ({"weight": float("nan")}, "finite number >= 0"),
        ({"weight": float("inf")}, "finite number >= 0"),
        ({"size": 16}, "image size"),
    ],
)
def test_bad_arguments_are_refused(kw, words):
    args = {"size": 64, "factor": 4, "weight": 1.0, **kw}
    with pytest.raises(ValueError, match=words):
        small_object_weights(["a small red star at the top right"], **args)
