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


def test_ambiguous_shapes_are_counted_apart():
    # A flagged shape keeps its best-fit verdict in the existing keys and is counted apart in the new ones.
    det = Scene(
        (Obj("star", "red", "small", "top_left"), Obj("circle", "blue", "small", "bottom_right")), "white"
    )
    spec = parse("a red star and a blue circle")
    plain = score(det, spec)
    assert plain["decided"] and not any(o["shape_ambiguous"] for o in plain["objects"])
    flagged = score(det, spec, (False, True))
    assert flagged["correct"] == plain["correct"] is True  # unchanged meaning: the best fit is scored
    assert [o["shape_ambiguous"] for o in flagged["objects"]] == [False, True]
    assert not flagged["decided"]
    # the flag follows the assigned detected object, whatever the prompt's order
    swapped = score(det, parse("a blue circle and a red star"), (False, True))
    assert [o["shape_ambiguous"] for o in swapped["objects"]] == [True, False]
    # a missing object is not ambiguous; an unprompted ambiguous detection leaves the verdict decided
    one = score(det, parse("a red star"), (False, True))
    assert one["decided"] and [o["shape_ambiguous"] for o in one["objects"]] == [False]
    with pytest.raises(ValueError, match="ambiguity flags"):
        score(det, spec, (True,))


def test_report_counts_ambiguous_shapes_apart():
    from latentforge.shapes.report import Tally, format_report

    circle = Obj("circle", "blue", "small", "center")
    det = Scene((Obj("star", "red", "small", "top_left"), circle), "white")
    wrong = Scene((Obj("heart", "red", "small", "top_left"), circle), "white")
    spec = parse("a red star and a blue circle")
    tally = Tally()
    tally.add(spec, det, score(det, spec, (False, False)))  # decided, correct
    tally.add(spec, det, score(det, spec, (True, False)))  # right guess on an ambiguous shape: undecided
    tally.add(spec, wrong, score(wrong, spec, (True, False)))  # wrong guess on an ambiguous shape: undecided
    tally.add(spec, wrong, score(wrong, spec, (False, False)))  # decided, wrong
    r = tally.report([])
    assert r["all_correct"] == 0.5 and r["attributes"]["shape"]["k"] == 6  # best fits scored, as before
    assert (r["shape_ambiguous"]["k"], r["shape_ambiguous"]["n"]) == (2, 8)
    assert (r["shape_decided"]["k"], r["shape_decided"]["n"]) == (5, 6)  # ambiguous objects left out
    assert (r["decided"]["k"], r["decided"]["n"]) == (2, 4)
    assert (r["all_correct_decided"]["k"], r["all_correct_decided"]["n"]) == (1, 2)
    assert "all correct (decided)" in format_report({**r, "all_correct_ci95": [0.0, 1.0]})


def test_report_counts_backgrounds_flooded_by_an_objects_colour():
    # Of the prompts that leave the background unstated, an image counts when its background has the colour
    # of a prompted object that was not found in that colour (MODEL_CARD "Known failure modes").
    from latentforge.shapes.report import Tally, format_report

    star = Obj("star", "red", "large", "top_left")
    cases = [
        ("a purple heart and a red star", Scene((star,), "purple"), True),  # the heart's colour filled it
        ("a purple heart", Scene((Obj("heart", "pink", "small", "center"),), "purple"), True),  # wrong colour
        ("a purple heart and a red star", Scene((star,), "white"), False),  # missing, but not the background
        ("a purple heart", Scene((Obj("heart", "purple", "small", "center"),), "white"), False),  # right
        ("a purple heart on a green background", Scene((star,), "purple"), None),  # stated: not counted
    ]
    tally = Tally()
    for prompt, det, _ in cases:
        tally.add(parse(prompt), det, score(det, parse(prompt)))
    r = tally.report([])["background_took_object_colour"]
    flooded = [f for _, _, f in cases if f is not None]
    assert (r["k"], r["n"]) == (sum(flooded), len(flooded)) == (2, 4)
    assert "bg took object colour" in format_report({**tally.report([]), "all_correct_ci95": [0.0, 1.0]})
