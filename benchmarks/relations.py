"""Does a model follow relation words ("left of", "above"), or only draw the two objects somewhere?

The evaluator's ``relation`` rate counts a relation as failed when either object is missing, so it mixes two
failures. This benchmark separates them with a control: validation prompts that state one relation between
two objects ("a red circle above a blue square"), and the same prompts with the relation word reversed
("... below ..."), generated with the same seeds. Among the images where both objects are found (shape and
colour right), it counts how often the stated relation holds and how often the reversed one does. A model
that ignored the word would make the two counts equal (up to objects in the same row or column, where
neither holds); one that follows it makes the first much larger.

    .venv/bin/python benchmarks/relations.py [--model default] [--n 160] [--steps 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from latentforge.pipeline import Pipeline
from latentforge.shapes.captions import RELATION_WORDS, parse
from latentforge.shapes.data import sample
from latentforge.shapes.detection import analyze
from latentforge.shapes.scoring import score, wilson

OPPOSITE = {"above": "below", "below": "above", "left_of": "right_of", "right_of": "left_of"}


def _reversals() -> dict[str, str]:
    """Each relation word of captions.RELATION_WORDS -> the opposite relation's word of the same rank (its
    first where it has fewer: "beneath" -> "above"), longest first so "to the left of" wins over "left of"."""
    out = {}
    for rel, words in RELATION_WORDS.items():
        other = RELATION_WORDS[OPPOSITE[rel]]
        for k, word in enumerate(words):
            out[word] = other[k] if k < len(other) else other[0]
    return dict(sorted(out.items(), key=lambda kv: -len(kv[0])))


REVERSE = _reversals()


def relation_prompts(n: int, seed: int = 1_000_000) -> tuple[list[str], list[str]]:
    """The first n validation captions of stream ``seed`` with two objects and one relation, and each with its
    relation word reversed (kept only where the reversed caption parses to the reversed relation)."""
    stated, reversed_ = [], []
    i = 0
    while len(stated) < n:
        _, text, _, spec = sample(seed, "validation", i)
        i += 1
        if len(spec.relations) != 1 or len(spec.objects) != 2:
            continue
        for word, other in REVERSE.items():
            if f" {word} " in text:
                flipped = text.replace(f" {word} ", f" {other} ", 1)
                spec2 = parse(flipped)
                if spec2 is not None and spec2.relations != spec.relations:
                    stated.append(text)
                    reversed_.append(flipped)
                break
    return stated, reversed_


def generate(pipe: Pipeline, prompts: list[str], steps: int, seed: int, batch: int = 16) -> list[np.ndarray]:
    out = []
    for k in range(0, len(prompts), batch):
        b = prompts[k : k + batch]
        seeds = [seed + k + j for j in range(len(b))]
        out += [np.asarray(im) for im in pipe(b, batch_size=len(b), seed=seeds, steps=steps)]
    return out


def count(images, prompts, others) -> dict:
    both = holds = holds_other = 0
    for img, p, q in zip(images, prompts, others, strict=True):
        d = analyze(img)
        s = score(d.scene, parse(p), d.shape_ambiguous)
        t = score(d.scene, parse(q), d.shape_ambiguous)
        if all(o["present"] and o["shape"] and o["color"] for o in s["objects"]):
            both += 1
            holds += s["relations"][0]
            holds_other += t["relations"][0]
    return {
        "n": len(prompts),
        "both_found": both,
        "relation_holds": holds,
        "reversed_relation_holds": holds_other,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="'default' or a single-file checkpoint")
    ap.add_argument("--n", type=int, default=160, help="prompts (each generated stated and reversed)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=7000, help="image k's seed is seed + k on both sides")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the counts here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = Pipeline.default() if args.model == "default" else Pipeline.from_single_file(args.model)
    stated, reversed_ = relation_prompts(args.n)
    rows = {
        "stated": count(generate(pipe, stated, args.steps, args.seed), stated, reversed_),
        "reversed": count(generate(pipe, reversed_, args.steps, args.seed), reversed_, stated),
    }
    both = sum(r["both_found"] for r in rows.values())
    n = sum(r["n"] for r in rows.values())
    for what, key in (
        ("the asked relation holds", "relation_holds"),
        ("the reverse holds", "reversed_relation_holds"),
    ):
        k = sum(r[key] for r in rows.values())
        lo, hi = wilson(k, both)
        print(
            f"{what:26s} {100 * k / both:6.2f}%  [{100 * lo:.2f}, {100 * hi:.2f}]"
            f"  of {both} images with both objects"
        )
    lo, hi = wilson(both, n)
    print(
        f"{'both objects found':26s} {100 * both / n:6.2f}%  [{100 * lo:.2f}, {100 * hi:.2f}]  of {n} images"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
