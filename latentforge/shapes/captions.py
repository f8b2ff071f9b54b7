"""Captions for shapes scenes: a small grammar with paraphrases, and its exact parser.

Semantics. A caption always mentions every object of the scene, always with its shape and colour; an
object's size and position, the background, and spatial relations are each optional. What a caption states
is a *partial* ``Scene`` (see ``render.py``): unstated sizes/positions/background are ``None`` and stated
relations are recorded as ``(i, rel, j)`` ("object i is rel object j", indices in caption order).
``describe(scene, rng)`` returns ``(text, stated)``; ``parse(text) == stated`` exactly, and
``satisfies(scene, stated)`` holds. ``parse`` returns None for any text outside the grammar, and also for
the (never generated) text it could read two ways: it never guesses.

Forms (lower case here; generated captions may start with a capital and end with a period):

- lists: ``[there is | an image of | ...] ITEM[, ITEM][,] and ITEM [on a white background]``, or
  ``a white background with ITEM ...``, where ITEM is
  ``a large red circle [in the top left corner]`` (also ``a red large circle``, ``a big circle in red``,
  size optional), a count ``two [little] green stars`` (objects sharing shape and colour, no positions),
  or a relation ``a red circle above a blue square`` (above / over / below / under / beneath /
  (to the) left of / (to the) right of; the two objects carry no position);
- labelled: ``top left: a big red circle; center: a blue square[; background: white]``.

Synonyms are unambiguous: large = big; small = little = tiny; circle = disk; cross = plus sign;
diamond = rhombus; gray = grey; several phrasings for each position.
"""

from __future__ import annotations

import re

import numpy as np

from .render import COLOR_NAMES, POSITION_NAMES, Obj, Scene, relation_holds, true_relations

# ----------------------------------------------------------------------------------------------------------
# Lexicon: canonical value -> surface phrases (the first is the plain one)

SIZE_WORDS: dict[str, tuple[str, ...]] = {"large": ("large", "big"), "small": ("small", "little", "tiny")}
COLOR_WORDS: dict[str, tuple[str, ...]] = {c: (c,) for c in COLOR_NAMES} | {"gray": ("gray", "grey")}
SHAPE_WORDS: dict[str, tuple[tuple[str, str], ...]] = {  # (singular, plural)
    "circle": (("circle", "circles"), ("disk", "disks")),
    "square": (("square", "squares"),),
    "triangle": (("triangle", "triangles"),),
    "star": (("star", "stars"),),
    "cross": (("cross", "crosses"), ("plus sign", "plus signs")),
    "heart": (("heart", "hearts"),),
    "hexagon": (("hexagon", "hexagons"),),
    "diamond": (("diamond", "diamonds"), ("rhombus", "rhombuses")),
}
COUNT_WORDS: dict[int, tuple[str, ...]] = {2: ("two", "2"), 3: ("three", "3")}
RELATION_WORDS: dict[str, tuple[str, ...]] = {
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
    "left_of": ("to the left of", "left of"),
    "right_of": ("to the right of", "right of"),
}


def _position_words() -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]:
    """(phrases after an object, labels before a colon) for each position."""
    vert = {"top": ("top", "upper"), "bottom": ("bottom", "lower")}
    phrases, labels = {}, {}
    for v in ("top", "bottom"):
        for h in ("left", "right"):
            lab = tuple(f"{vv} {h}" for vv in vert[v])
            labels[f"{v}_{h}"] = lab
            phrases[f"{v}_{h}"] = (
                tuple(f"in the {x} corner" for x in lab)
                + tuple(f"in the {x}" for x in lab)
                + (f"at the {v} {h}",)
            )
        labels[v] = (v, f"{v} center", f"{v} middle")
        phrases[v] = (f"at the {v}", f"at the {v} center", f"in the {v} middle")
    for h in ("left", "right"):
        labels[h] = (h, f"center {h}", f"middle {h}")
        phrases[h] = (f"on the {h}", f"on the {h} side", f"at the {h}", f"in the middle {h}")
    labels["center"] = ("center", "centre", "middle")
    phrases["center"] = ("in the center", "in the centre", "in the middle", "at the center")
    return phrases, labels


POSITION_PHRASES, POSITION_LABELS = _position_words()
assert set(POSITION_PHRASES) == set(POSITION_NAMES)

LEADS: tuple[str, ...] = ("", "there is", "there are", "an image of", "a picture of", "a drawing of")
BG_SUFFIXES: tuple[str, ...] = (
    "on {a} {c} background",
    "against {a} {c} background",
    "with {a} {c} background",
)

# ----------------------------------------------------------------------------------------------------------
# Generation


def _choice(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _with_article(rng, phrase: str) -> str:
    art = "one" if rng.random() < 0.1 else _article(phrase)
    return f"{art} {phrase}"


def _np(rng, o: Obj, state_size: bool) -> tuple[str, Obj]:
    """A singular noun phrase for ``o``, and what it states."""
    shape = _choice(rng, SHAPE_WORDS[o.shape])[0]
    color = _choice(rng, COLOR_WORDS[o.color])
    if not state_size:
        form = _choice(rng, ("{c} {s}", "{s} in {c}")) if rng.random() < 0.2 else "{c} {s}"
        return _with_article(rng, form.format(c=color, s=shape)), Obj(o.shape, o.color)
    size = _choice(rng, SIZE_WORDS[o.size])
    form = _choice(rng, ("{z} {c} {s}", "{z} {c} {s}", "{c} {z} {s}", "{z} {s} in {c}"))
    return _with_article(rng, form.format(z=size, c=color, s=shape)), Obj(o.shape, o.color, o.size)


def check_shares(relation_share: float, background_share: float, labelled_share: float = 0.0) -> None:
    """describe's caption knobs are probabilities; anything else is refused with its name."""
    shares = {
        "relation_share": relation_share,
        "background_share": background_share,
        "labelled_share": labelled_share,
    }
    for name, v in shares.items():
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {v}")


def describe(
    scene: Scene,
    rng: np.random.Generator,
    relation_share: float = 0.0,
    background_share: float = 0.6,
    labelled_share: float = 0.0,
) -> tuple[str, Scene]:
    """A random caption of complete ``scene`` and the partial ``Scene`` it states (``parse(text)``).

    ``relation_share`` > 0: a scene of two or more objects is captioned with a relation with this
    probability (otherwise by the styles' own mix, in which a relation is 1 of 4 to 6 styles), for data
    that teaches relations more often; 0 (the default) draws exactly as before. ``background_share``: the
    probability that the caption states the background (0.6, the default, draws exactly as before).
    ``labelled_share`` > 0: the caption is in the labelled form (every object's position stated) with this
    probability, else drawn as above; it is the form ``complete_layout`` gives the network, so data with a
    high share trains what a model run with the layout completion sees. 0 (the default) draws as before."""
    check_shares(relation_share, background_share, labelled_share)
    scene.validate(complete=True)
    objs = list(scene.objects)
    n = len(objs)
    groups: dict[tuple[str, str], list[Obj]] = {}
    for o in objs:
        groups.setdefault((o.shape, o.color), []).append(o)
    styles = ["list", "list", "labelled"]
    if n >= 2:
        styles.append("relation")
    if any(len(g) >= 2 for g in groups.values()):
        styles += ["count", "count"]
    if labelled_share > 0 and rng.random() < labelled_share:
        style = "labelled"
    elif relation_share > 0 and n >= 2 and rng.random() < relation_share:
        style = "relation"  # with no count group every object is a single, so the relation has its two
    else:
        style = _choice(rng, styles)

    stated: list[Obj] = []
    relations: list[tuple[int, str, int]] = []
    bg = scene.background if rng.random() < background_share else None

    if style == "labelled":
        parts = []
        for k in rng.permutation(n):
            o = objs[k]
            text, s = _np(rng, o, state_size=rng.random() < 0.8)
            stated.append(Obj(s.shape, s.color, s.size, o.position))
            parts.append(f"{_choice(rng, POSITION_LABELS[o.position])}: {text}")
        if bg is not None:
            parts.append(f"background: {_choice(rng, COLOR_WORDS[bg])}")
        text = "; ".join(parts)
    else:
        # items: ("np", obj) | ("group", [objs]) | ("rel", a, rel, b)
        items: list[tuple] = []
        singles = []
        for g in groups.values():
            if style == "count" and len(g) >= 2:
                items.append(("group", g))
            else:
                singles.extend(g)
        if style == "relation" and len(singles) >= 2:
            i, j = rng.permutation(len(singles))[:2]
            a, b = singles[i], singles[j]
            items.append(("rel", a, _choice(rng, true_relations(a, b)), b))
            singles = [o for o in singles if o is not a and o is not b]
        items += [("np", o) for o in singles]
        items = [items[k] for k in rng.permutation(len(items))]

        texts = []
        for it in items:
            if it[0] == "np":
                o = it[1]
                t, s = _np(rng, o, state_size=rng.random() < 0.7)
                pos = o.position if rng.random() < 0.75 else None
                if pos is not None:
                    t += " " + _choice(rng, POSITION_PHRASES[pos])
                stated.append(Obj(s.shape, s.color, s.size, pos))
            elif it[0] == "group":
                g = it[1]
                same_size = all(o.size == g[0].size for o in g)
                size = g[0].size if same_size and rng.random() < 0.7 else None
                words = [_choice(rng, COUNT_WORDS[len(g)])]
                if size is not None:
                    words.append(_choice(rng, SIZE_WORDS[size]))
                words += [_choice(rng, COLOR_WORDS[g[0].color]), _choice(rng, SHAPE_WORDS[g[0].shape])[1]]
                t = " ".join(words)
                stated += [Obj(g[0].shape, g[0].color, size)] * len(g)
            else:
                _, a, rel, b = it
                ta, sa = _np(rng, a, state_size=rng.random() < 0.5)
                tb, sb = _np(rng, b, state_size=rng.random() < 0.5)
                t = f"{ta} {_choice(rng, RELATION_WORDS[rel])} {tb}"
                relations.append((len(stated), rel, len(stated) + 1))
                stated += [sa, sb]
            texts.append(t)
        if len(texts) == 1:
            body = texts[0]
        else:
            sep = ", and " if len(texts) > 2 and rng.random() < 0.3 else " and "
            body = ", ".join(texts[:-1]) + sep + texts[-1]

        if bg is not None and rng.random() < 0.25:
            c = _choice(rng, COLOR_WORDS[bg])
            text = f"{_article(c)} {c} background with {body}"
        else:
            lead = _choice(rng, LEADS)
            if lead.startswith("there"):
                lead = "there are" if items[0][0] == "group" else "there is"
            text = f"{lead} {body}" if lead else body
            if bg is not None:
                c = _choice(rng, COLOR_WORDS[bg])
                text += " " + _choice(rng, BG_SUFFIXES).format(a=_article(c), c=c)

    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.5:
        text += "."
    spec = Scene(tuple(stated), bg, tuple(relations))
    return text, spec


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A random caption of complete ``scene`` (see ``describe``)."""
    return describe(scene, rng)[0]


# ----------------------------------------------------------------------------------------------------------
# Parsing: a backtracking recursive-descent parser over tokens; each rule yields every (value, next index).

_TOKEN = re.compile(r"[a-z]+|[0-9]+|[,;:.]")
_VALID = re.compile(r"[a-z0-9,;:.\s]*")


def _table(d: dict) -> list[tuple[tuple[str, ...], object]]:
    rows = [(tuple(p.split()), v) for v, phrases in d.items() for p in phrases]
    return sorted(rows, key=lambda r: -len(r[0]))


_SIZES = _table(SIZE_WORDS)
_COLORS = _table(COLOR_WORDS)
_SHAPES_SG = _table({s: tuple(w[0] for w in ws) for s, ws in SHAPE_WORDS.items()})
_SHAPES_PL = _table({s: tuple(w[1] for w in ws) for s, ws in SHAPE_WORDS.items()})
_COUNTS = _table(COUNT_WORDS)
_RELS = _table(RELATION_WORDS)
_POS = _table(POSITION_PHRASES)
_LABELS = _table(POSITION_LABELS)
_LEADS = _table({lead: (lead,) for lead in LEADS if lead})
_ARTICLES = (("a",), ("an",), ("one",))


class _P:
    def __init__(self, toks: list[str]):
        self.t = toks

    def lit(self, i, *words):
        n = len(words)
        if tuple(self.t[i : i + n]) == words:
            yield None, i + n

    def lex(self, i, table):
        for phrase, v in table:
            if tuple(self.t[i : i + len(phrase)]) == phrase:
                yield v, i + len(phrase)

    def article(self, i):
        for a in _ARTICLES:
            yield from self.lit(i, *a)

    def np(self, i):
        """ARTICLE ([SIZE] COLOR | COLOR SIZE) SHAPE | ARTICLE [SIZE] SHAPE in COLOR -> Obj (no position)."""
        for _, i1 in self.article(i):
            # [SIZE] COLOR SHAPE
            for z, i2 in [(None, i1), *self.lex(i1, _SIZES)]:
                for c, i3 in self.lex(i2, _COLORS):
                    for s, i4 in self.lex(i3, _SHAPES_SG):
                        yield Obj(s, c, z), i4
                # [SIZE] SHAPE in COLOR
                for s, i3 in self.lex(i2, _SHAPES_SG):
                    for _, i4 in self.lit(i3, "in"):
                        for c, i5 in self.lex(i4, _COLORS):
                            yield Obj(s, c, z), i5
            # COLOR SIZE SHAPE
            for c, i2 in self.lex(i1, _COLORS):
                for z, i3 in self.lex(i2, _SIZES):
                    for s, i4 in self.lex(i3, _SHAPES_SG):
                        yield Obj(s, c, z), i4

    def item(self, i):
        """-> (list of Obj, list of relations with local indices)."""
        for o, j in self.np(i):
            yield ([o], []), j
            for p, k in self.lex(j, _POS):
                yield ([Obj(o.shape, o.color, o.size, p)], []), k
            for r, k in self.lex(j, _RELS):
                for o2, m in self.np(k):
                    yield ([o, o2], [(0, r, 1)]), m
        for n, j in self.lex(i, _COUNTS):
            for z, k in [(None, j), *self.lex(j, _SIZES)]:
                for c, m in self.lex(k, _COLORS):
                    for s, q in self.lex(m, _SHAPES_PL):
                        yield ([Obj(s, c, z)] * n, []), q

    def body(self, i):
        """ITEM | ITEM and ITEM | ITEM , ITEM [,] and ITEM -> (objects, relations)."""

        def join(parts):
            objs, rels = [], []
            for o, r in parts:
                rels += [(a + len(objs), rel, b + len(objs)) for a, rel, b in r]
                objs += o
            return objs, rels

        for a, j in self.item(i):
            yield join([a]), j
            for _, k in self.lit(j, "and"):
                for b, m in self.item(k):
                    yield join([a, b]), m
            for _, k in self.lit(j, ","):
                for b, m in self.item(k):
                    for _, q in [*self.lit(m, "and"), *self.lit(m, ",", "and")]:
                        for c, r in self.item(q):
                            yield join([a, b, c]), r

    def bg_suffix(self, i):
        for prep in ("on", "against", "with"):
            for _, j in self.lit(i, prep):
                for _, k in self.article(j):
                    for c, m in self.lex(k, _COLORS):
                        for _, q in self.lit(m, "background"):
                            yield c, q

    def listed(self, i):
        # a COLOR background with BODY
        for _, j in self.article(i):
            for c, k in self.lex(j, _COLORS):
                for _, m in self.lit(k, "background", "with"):
                    for (objs, rels), q in self.body(m):
                        yield (objs, rels, c), q
        # [LEAD] BODY [BG_SUFFIX]
        for _, j in [(None, i), *self.lex(i, _LEADS)]:
            for (objs, rels), k in self.body(j):
                yield (objs, rels, None), k
                for c, m in self.bg_suffix(k):
                    yield (objs, rels, c), m

    def labelled(self, i):
        """LABEL : NP (; LABEL : NP)* [; background : COLOR]"""
        for p, j in self.lex(i, _LABELS):
            for _, k in self.lit(j, ":"):
                for o, m in self.np(k):
                    first = Obj(o.shape, o.color, o.size, p)
                    yield ([first], [], None), m
                    for _, q in self.lit(m, ";"):
                        for (objs, _r, bg), r in self.labelled(q):
                            yield ([first, *objs], [], bg), r
        for _, j in self.lit(i, "background", ":"):
            for c, k in self.lex(j, _COLORS):
                yield ([], [], c), k

    def caption(self):
        n = len(self.t)
        end = n - 1 if n and self.t[-1] == "." else n
        for v, j in [*self.listed(0), *self.labelled(0)]:
            if j == end and v[0]:
                yield v


def parse(prompt: str) -> Scene | None:
    """The partial ``Scene`` a caption of this grammar states; None for text outside the grammar (or, never
    for generated captions, text that reads two ways) and for statements no scene can satisfy."""
    if not isinstance(prompt, str) or len(prompt) > 1000:
        return None
    text = prompt.lower()
    if not _VALID.fullmatch(text):
        return None
    toks = _TOKEN.findall(text)
    results = set()
    for objs, rels, bg in _P(toks).caption():
        results.add(Scene(tuple(objs), bg, tuple(rels)))
        if len(results) > 1:
            return None
    if len(results) != 1:
        return None
    spec = results.pop()
    try:
        spec.validate(complete=False)
    except ValueError:
        return None
    return spec


def complete_background(prompt: str, rng: np.random.Generator) -> str:
    """``prompt`` with the background it leaves unstated drawn as the data draws it, or ``prompt`` unchanged.

    The renderer (``render.sample_scene``) never gives the background an object's colour, so for a caption
    stating colours C and no background, the background is uniform over the colours not in C: that is
    p(b | caption) exactly, and p(x | caption) = Σ_b p(b | caption)·p(x | caption, b). Sampling b here and
    the image given both is exact ancestral sampling of that sum, with the model left to do only the second
    factor (caption upsampling in the sense of Betker et al. 2023, "Improving Image Generation with Better
    Captions", §3.5, with the completion known in closed form). The default model chooses the background
    itself about as if it ignored the exclusion (MODEL_CARD "Known failure modes"), which hides an object in
    a background of its own colour. Text outside the grammar, a stated background, and a completion that
    would not parse back to the same statement plus the background return ``prompt`` as given.
    """
    spec = parse(prompt)
    if spec is None or spec.background is not None:
        return prompt
    named = {o.color for o in spec.objects}
    free = [c for c in COLOR_NAMES if c not in named]
    bg = free[int(rng.integers(len(free)))]
    base = prompt.rstrip().rstrip(".").rstrip()
    want = Scene(spec.objects, bg, spec.relations)
    # the labelled form's own ending, else the lists' (only the form the prompt is in parses)
    for text in (f"{base}; background: {bg}", f"{base} on {_article(bg)} {bg} background"):
        if parse(text) == want:
            return text
    return prompt


def complete_layout(prompt: str, rng: np.random.Generator, tries: int = 10_000) -> str:
    """``prompt`` with every unstated position and the background drawn as the data draws them, written in the
    labelled form ("top left: a red circle; bottom: a blue square; background: green"), or ``prompt``
    unchanged.

    The scene prior (``render.sample_scene``) puts the objects in distinct cells uniformly; a caption states
    a relation chosen uniformly among the pair's true ones (``describe``), so given the caption, the cells
    of the unplaced objects are uniform over the assignments that make every stated relation hold, weighted
    by 1 / (number of true relations of each related pair): drawn here by rejection, exactly. The
    background is drawn as ``complete_background`` draws it. A relation follows from the cells, so the
    completed caption states everything the prompt did (the same shapes, colours and sizes; the stated
    positions; the relations, through the cells) and the network is left to draw objects where it is told,
    which it does in more than 99% of cases (MODEL_CARD "Evaluator tables"), instead of binding relation
    words to objects. This is layout planning before generation (Lian et al. 2023, "LLM-grounded
    Diffusion", §3: a layout drawn from the prompt, then an image given the layout), with the layout's
    distribution known in closed form. Text outside the grammar, a prompt already stating every position
    and the background, and a completion that would not parse back to the drawn scene return ``prompt``.
    """
    spec = parse(prompt)
    if spec is None:
        return prompt
    objs = spec.objects
    if spec.background is not None and all(o.position is not None for o in objs):
        return prompt
    free = [p for p in POSITION_NAMES if p not in {o.position for o in objs}]
    todo = [k for k, o in enumerate(objs) if o.position is None]
    for _ in range(tries):
        cells = iter(rng.permutation(len(free))[: len(todo)])
        placed = [
            o if o.position is not None else Obj(o.shape, o.color, o.size, free[next(cells)]) for o in objs
        ]
        if not all(relation_holds(placed[i], r, placed[j]) for i, r, j in spec.relations):
            continue
        accept = 1.0
        for i, _, j in spec.relations:  # the caption's relation was one of the pair's true ones
            accept /= len(true_relations(placed[i], placed[j]))
        if rng.random() < accept:
            break
    else:  # pragma: no cover (every parsed prompt has a satisfying layout: parse validates it)
        return prompt
    named = {o.color for o in objs}
    bg = spec.background
    if bg is None:
        free_colors = [c for c in COLOR_NAMES if c not in named]
        bg = free_colors[int(rng.integers(len(free_colors)))]
    parts = []
    for o in placed:
        words = ([SIZE_WORDS[o.size][0]] if o.size is not None else []) + [
            o.color,
            SHAPE_WORDS[o.shape][0][0],
        ]
        parts.append(f"{POSITION_LABELS[o.position][0]}: {_article(words[0])} {' '.join(words)}")
    text = "; ".join(parts) + f"; background: {bg}"
    return text if parse(text) == Scene(tuple(placed), bg) else prompt


# what `complete_prompt` can do to a prompt, weakest first ("none": nothing)
PROMPT_COMPLETIONS = ("none", "background", "layout")


def complete_prompt(prompt: str, mode: str, rng: np.random.Generator) -> str:
    """``prompt`` completed as ``mode`` says: "none" (as given), "background" (``complete_background``) or
    "layout" (``complete_layout``: every position and the background)."""
    if mode == "none":
        return prompt
    if mode == "background":
        return complete_background(prompt, rng)
    if mode == "layout":
        return complete_layout(prompt, rng)
    raise ValueError(f"prompt completion must be one of {', '.join(PROMPT_COMPLETIONS)}, got {mode!r}")


def complete_prompts(prompts: list[str], mode: str, seeds: list[int]) -> list[str]:
    """Prompt k completed from its own seed k (``np.random.default_rng(seeds[k])``), so that an image's
    completion does not depend on the batch it is made in: what Pipeline, ``eval shapes`` and
    ``tune-schedule`` all draw."""
    if len(prompts) != len(seeds):
        raise ValueError(f"give one seed per prompt: {len(prompts)} prompts, {len(seeds)} seeds")
    return [complete_prompt(p, mode, np.random.default_rng(s)) for p, s in zip(prompts, seeds, strict=True)]
