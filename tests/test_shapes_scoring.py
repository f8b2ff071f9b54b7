"""Shapes evaluator, scoring: a detected scene against a prompt's partial spec, and Wilson intervals."""

import math

import pytest

from latentforge.shapes import Obj, Scene, parse
from latentforge.shapes.scoring import score, wilson


def test_score_semantics():
    det = Scene(
        (Obj("star", "red", "large", "top_left"), Obj("circle", "blue", "small", "bottom_right")), "white"
    )
    ok = score(det, parse("a red star above a blue circle on a white background"))
    assert ok["correct"] and ok["count"] and ok["extra"] == 0 and ok["relations"] == [True]
    assert ok["background"] is True and all(o["shape"] and o["color"] for o in ok["objects"])
    bad = score(det, parse("a red star below a blue circle"))
    assert not bad["correct"] and bad["relations"] == [False] and bad["background"] is None
    one = score(det, parse("a small red star"))
    assert not one["correct"] and one["extra"] == 1 and not one["count"]
    assert one["objects"][0]["shape"] and one["objects"][0]["size"] is False
    assert one["objects"][0]["position"] is None
    three = score(det, parse("three red stars"))
    assert not three["correct"] and [o["present"] for o in three["objects"]] == [True, False, False]
    assert three["extra"] == 1  # the blue circle is not a red star gone wrong


def test_wilson_interval():
    lo, hi = wilson(81, 263)  # Wilson (1927) / Newcombe (1998) worked example: 0.2553 to 0.3662
    assert lo == pytest.approx(0.2553, abs=1e-4) and hi == pytest.approx(0.3662, abs=1e-4)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == pytest.approx(1.0)
    assert wilson(0, 0) == (0.0, 1.0)
    k, n, z = 37, 50, 1.959963984540054
    p = k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert wilson(k, n) == pytest.approx((c - h, c + h))
