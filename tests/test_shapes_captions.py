"""Shapes benchmark captions: the grammar's paraphrases and its exact parser."""

import re
from collections import Counter

import numpy as np
import pytest

from latentforge.shapes import (
    Obj,
    Scene,
    caption,
    complete_layout,
    describe,
    parse,
    relation_holds,
    sample_scene,
    satisfies,
)


def satisfies_obj(o, s):
    return (
        o.shape == s.shape
        and o.color == s.color
        and s.size in (None, o.size)
        and s.position in (None, o.position)
    )


def _pairs(n, split="train", seed=0):
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        scene = sample_scene(rng, split=split)
        text, spec = describe(scene, rng)
        yield scene, text, spec


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_parse_round_trip(split):
    n = 5000 if split == "train" else 1000
    for scene, text, spec in _pairs(n, split):
        got = parse(text)
        assert got == spec, (text, got, spec)
        assert satisfies(scene, got), (text, scene, got)
        for i, rel, j in got.relations:  # a stated relation is true of some pair of objects it could name
            a_ok = [o for o in scene.objects if satisfies_obj(o, got.objects[i])]
            b_ok = [o for o in scene.objects if satisfies_obj(o, got.objects[j])]
            assert any(relation_holds(a, rel, b) for a in a_ok for b in b_ok if a is not b)


def test_round_trip_hypothesis():
    hyp = pytest.importorskip("hypothesis")
    st = hyp.strategies

    @hyp.settings(max_examples=300, deadline=None)
    @hyp.given(
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
        st.sampled_from(["train", "validation", "heldout"]),
    )
    def check(scene_seed, caption_seed, split):
        scene = sample_scene(np.random.default_rng(scene_seed), split=split)
        text, spec = describe(scene, np.random.default_rng(caption_seed))
        assert parse(text) == spec and satisfies(scene, spec)

    check()


def test_caption_matches_describe_and_is_deterministic():
    scene = sample_scene(np.random.default_rng(0))
    assert caption(scene, np.random.default_rng(1)) == describe(scene, np.random.default_rng(1))[0]
    assert caption(scene, np.random.default_rng(1)) == caption(scene, np.random.default_rng(1))


def test_paraphrase_variety():
    texts, specs = [], []
    for _, text, spec in _pairs(3000, seed=1):
        texts.append(text.lower())
        specs.append(spec)
    joined = "\n".join(texts)
    for word in ["big", "large", "little", "tiny", "small", "disk", "plus sign", "rhombus", "grey", "gray",
                 "two", "background", "above", "below", "left of", "right of", "corner", ": ", "there is",
                 "an image of", "in the middle"]:  # fmt: skip
        assert word in joined, word
    assert re.search(r"\bthree\b|\b3\b", joined)
    assert len(set(texts)) > 2900
    # the optional parts are optional
    assert Counter(s.background is None for s in specs).most_common()[-1][1] > 500
    assert sum(bool(s.relations) for s in specs) > 200
    sizes = Counter(o.size is None for s in specs for o in s.objects)
    positions = Counter(o.position is None for s in specs for o in s.objects)
    assert min(sizes.values()) > 500 and min(positions.values()) > 500


@pytest.mark.parametrize(
    "text, spec",
    [
        ("a large red circle in the top left corner", Scene((Obj("circle", "red", "large", "top_left"),))),
        ("Top left: a big red circle.", Scene((Obj("circle", "red", "large", "top_left"),))),
        (
            "a red circle above a blue square",
            Scene((Obj("circle", "red"), Obj("square", "blue")), None, ((0, "above", 1),)),
        ),
        (
            "two green stars on a white background",
            Scene((Obj("star", "green"), Obj("star", "green")), "white"),
        ),
        (
            "there are 2 tiny grey disks and a plus sign in orange at the bottom.",
            Scene(
                (
                    Obj("circle", "gray", "small"),
                    Obj("circle", "gray", "small"),
                    Obj("cross", "orange", None, "bottom"),
                )
            ),
        ),
        (
            "a black background with a pink rhombus, a yellow heart to the right of a cyan little hexagon",
            None,  # three items need "and"
        ),
        (
            "A black background with a pink rhombus, a yellow heart, and a cyan little hexagon in the middle",
            Scene(
                (Obj("diamond", "pink"), Obj("heart", "yellow"), Obj("hexagon", "cyan", "small", "center")),
                "black",
            ),
        ),
        (
            "center: a white star; lower right: an orange big triangle; background: black",
            Scene(
                (Obj("star", "white", None, "center"), Obj("triangle", "orange", "large", "bottom_right")),
                "black",
            ),
        ),
        (
            "an image of a purple star in the middle left and a blue cross to the left of a red heart",
            Scene(
                (Obj("star", "purple", None, "left"), Obj("cross", "blue"), Obj("heart", "red")),
                None,
                ((1, "left_of", 2),),
            ),
        ),
    ],
)
def test_parse_examples(text, spec):
    assert parse(text) == spec


@pytest.mark.parametrize(
    "text",
    [
        "",
        ".",
        "hello world",
        "a red circle in the top left corner banana",
        "a circle",  # no colour
        "a red blob",
        "a magenta circle",
        "a red circle in the top left corner and",
        "a red circle, a blue square",
        "red circle",  # no article
        "a red circle on a red background",  # unsatisfiable: object colour = background
        "a red circle in the center and a blue star in the center",  # two objects in one cell
        "three red stars and a blue square",  # four objects
        "a red circle in the top left corner above a blue square",  # positioned relation: not in the grammar
        "top left: a red circle; top left: a blue square",
        "background: white",
        "a red circle!",
        "a red circle..",
        "a large small red circle",
        "a big red circle in the top left corner on a white background on a black background",
        "a red circle" * 200,
        None,
        42,
    ],
)
def test_parse_rejects(text):
    assert parse(text) is None


def test_complete_background_draws_what_the_data_draws():
    from latentforge.shapes import complete_background
    from latentforge.shapes.render import COLOR_NAMES

    # every caption form the grammar generates, background unstated: the completion parses back to the same
    # statement plus a background that no stated object has
    done = 0
    for _, text, spec in _pairs(1500, "validation", seed=3):
        out = complete_background(text, np.random.default_rng(0))
        if spec.background is not None:
            assert out == text
            continue
        got = parse(out)
        assert got == Scene(spec.objects, got.background, spec.relations), (text, out)
        assert got.background in COLOR_NAMES and got.background not in {o.color for o in spec.objects}
        done += 1
    assert done > 400  # ~40% of captions leave the background unstated (captions.describe)
    # uniform over the colours not named: 9 free colours for these two objects, 4000 draws (~444 each; the
    # bound is ±5 binomial standard deviations, 5·√(4000·(1/9)·(8/9)) ≈ 99)
    rng = np.random.default_rng(1)
    counts = Counter(
        parse(complete_background("a red star and a blue circle", rng)).background for _ in range(4000)
    )
    assert set(counts) == set(COLOR_NAMES) - {"red", "blue"}
    assert all(abs(c - 4000 / 9) < 99 for c in counts.values()), counts
    # text outside the grammar and a stated background come back as given
    stated = ("a red star on a white background", "top left: a red star; background: blue")
    for text in ("a photograph of a cat", *stated):
        assert complete_background(text, rng) == text


def test_complete_layout_states_everything_the_prompt_did_and_places_the_rest():
    from latentforge.shapes import complete_layout, complete_prompt

    # every caption form: the completion is a labelled caption stating every position and a background, and
    # every scene it describes satisfies the prompt (the same objects, the stated sizes and positions, the
    # relations through the cells)
    for _, text, spec in _pairs(1500, "validation", seed=4):
        out = complete_layout(text, np.random.default_rng(0))
        got = parse(out)
        if spec.background is not None and all(o.position is not None for o in spec.objects):
            assert out == text
            continue
        assert ":" in out and got.background is not None and not got.relations, (text, out)
        assert all(o.position is not None for o in got.objects)
        assert len({o.position for o in got.objects}) == len(got.objects)
        assert satisfies(got, spec), (text, out)  # got is complete but for unstated sizes
        assert spec.background in (None, got.background)
        assert got.background not in {o.color for o in spec.objects}
    for text in ("a photograph of a cat", "top left: a red star; background: blue"):
        assert complete_layout(text, np.random.default_rng(0)) == text
    assert complete_prompt("a red star", "none", np.random.default_rng(0)) == "a red star"
    with pytest.raises(ValueError, match="must be one of none, background, layout, got 'all'"):
        complete_prompt("a red star", "all", np.random.default_rng(0))


def test_complete_layout_draws_the_cells_as_the_data_does():
    """Given "A left of B", the data's cells are the scene prior's (distinct, uniform) weighted by the chance
    that the caption picked "left of" among the pair's true relations (describe). The layout completion's
    cells and the data generator's (2-object scenes captioned with a relation by describe, those stating
    left_of) are compared with that distribution over the 27 ordered cell pairs: total variation below
    0.04 for each (~12,000 draws each; the expected TV of an exact sampler is ~0.02)."""
    from latentforge.shapes import complete_layout
    from latentforge.shapes.render import POSITION_NAMES, POSITIONS, true_relations

    def weight(pa, pb):
        a, b = Obj("star", "red", None, pa), Obj("circle", "blue", None, pb)
        return 1 / len(true_relations(a, b)) if relation_holds(a, "left_of", b) else 0.0

    pairs = [(pa, pb) for pa in POSITION_NAMES for pb in POSITION_NAMES if pa != pb and weight(pa, pb)]
    assert len(pairs) == 27
    total = sum(weight(*p) for p in pairs)
    target = {p: weight(*p) / total for p in pairs}

    def tv(counts):
        n = sum(counts.values())
        return 0.5 * sum(abs(counts.get(p, 0) / n - q) for p, q in target.items())

    rng = np.random.default_rng(5)
    layout = Counter()
    for _ in range(12_000):
        a, b = parse(complete_layout("a red star left of a blue circle", rng)).objects
        layout[(a.position, b.position)] += 1
    data = Counter()
    while sum(data.values()) < 12_000:
        scene = sample_scene(rng, n_objects=2)
        if len({(o.shape, o.color) for o in scene.objects}) < 2:
            continue  # a repeated pair: which object the caption named first is not recoverable
        _, spec = describe(scene, rng, relation_share=1.0)
        ((i, rel, j),) = spec.relations
        if rel == "left_of":  # describe's objects i, j are the scene's in some order: match by attributes
            a = next(
                o
                for o in scene.objects
                if (o.shape, o.color) == (spec.objects[i].shape, spec.objects[i].color)
            )
            b = next(o for o in scene.objects if o is not a)
            data[(a.position, b.position)] += 1
    assert set(layout) <= set(target) and set(data) <= set(target)
    assert tv(layout) < 0.04 and tv(data) < 0.04, (tv(layout), tv(data))
    assert all(POSITIONS[a][1] < POSITIONS[b][1] for a, b in layout)


def test_relation_share_raises_the_share_of_relation_captions_and_they_still_parse():
    # A scene of 2+ objects gets a relation caption with probability s + (1 - s) q, where q is the styles'
    # own relation share (1 of 4 styles, or 1 of 6 when a count group exists): for s = 0.6 between 0.667
    # and 0.70. 400 such scenes: a binomial sd of 0.024, so [0.59, 0.78] is a 3-sd band around both ends.
    multi = rel = 0
    for i in range(1000):
        rng = np.random.default_rng([7, i])
        scene = sample_scene(rng, split="train")
        text, spec = describe(scene, rng, relation_share=0.6)
        assert parse(text) == spec and satisfies(scene, spec), text
        if len(scene.objects) >= 2:
            multi += 1
            rel += bool(spec.relations)
        else:
            assert not spec.relations
    assert multi >= 400
    assert 0.59 <= rel / multi <= 0.78, rel / multi
    # share 1: every multi-object scene states exactly one relation
    for i in range(200):
        rng = np.random.default_rng([8, i])
        scene = sample_scene(rng, split="train")
        _, spec = describe(scene, rng, relation_share=1.0)
        assert len(spec.relations) == (1 if len(scene.objects) >= 2 else 0)


def test_relation_share_zero_is_the_usual_stream_and_bad_shares_are_refused():
    for i in range(200):
        scene = sample_scene(np.random.default_rng([9, i]), split="train")
        assert describe(scene, np.random.default_rng(i)) == describe(scene, np.random.default_rng(i), 0.0)
    scene = sample_scene(np.random.default_rng(0), split="train")
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"relation_share must be in \[0, 1\], got"):
            describe(scene, np.random.default_rng(0), relation_share=bad)


def test_background_share_sets_how_often_the_background_is_stated():
    # 0 and 1 are exact; the default 0.6 draws the same captions as before (one uniform draw either way)
    for share, want in ((0.0, False), (1.0, True)):
        for i in range(300):
            rng = np.random.default_rng([10, i])
            scene = sample_scene(rng, split="train")
            text, spec = describe(scene, rng, background_share=share)
            assert parse(text) == spec and satisfies(scene, spec), text
            assert (spec.background is not None) == want, text
    for i in range(200):
        scene = sample_scene(np.random.default_rng([11, i]), split="train")
        assert describe(scene, np.random.default_rng(i)) == describe(
            scene, np.random.default_rng(i), 0.0, 0.6
        )
    scene = sample_scene(np.random.default_rng(0), split="train")
    with pytest.raises(ValueError, match=r"background_share must be in \[0, 1\], got 1.2"):
        describe(scene, np.random.default_rng(0), background_share=1.2)


def test_labelled_share_captions_in_the_form_the_layout_completion_writes():
    # 1: every caption is the labelled form (every object's position stated, no relation), which parses to
    # what it states; 0 is the usual stream draw for draw; a share outside [0, 1] is refused by name
    for i in range(300):
        rng = np.random.default_rng([12, i])
        scene = sample_scene(rng, split="train")
        text, spec = describe(scene, rng, labelled_share=1.0, background_share=1.0)
        assert parse(text) == spec and satisfies(scene, spec), text
        assert ":" in text and not spec.relations, text
        assert all(o.position is not None for o in spec.objects) and spec.background is not None, text
        # the layout completion of a labelled caption that states everything is itself
        assert complete_layout(text, np.random.default_rng(i)) == text
    for i in range(200):
        scene = sample_scene(np.random.default_rng([13, i]), split="train")
        assert describe(scene, np.random.default_rng(i)) == describe(
            scene, np.random.default_rng(i), 0.0, 0.6, 0.0
        )
    # a share in between: the labelled form on that share of scenes on top of the usual mix's own
    n = 2000
    labelled = 0
    for i in range(n):
        rng = np.random.default_rng([14, i])
        text, _ = describe(sample_scene(rng, split="train"), rng, labelled_share=0.5)
        labelled += ":" in text
    usual = 0
    for i in range(n):
        rng = np.random.default_rng([14, i])
        usual += ":" in describe(sample_scene(rng, split="train"), rng)[0]
    # 0.5 + 0.5 · usual share; binomial sd of a share at n = 2000 is ≤ 0.011, so 4 sd is 0.045
    assert abs(labelled / n - (0.5 + 0.5 * usual / n)) < 0.045
    scene = sample_scene(np.random.default_rng(0), split="train")
    with pytest.raises(ValueError, match=r"labelled_share must be in \[0, 1\], got -0.5"):
        describe(scene, np.random.default_rng(0), labelled_share=-0.5)
