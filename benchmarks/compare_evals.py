"""Compare shapes-evaluator reports (`latentforge eval shapes --json R.json`) as MODEL_CARD.md does.

    python benchmarks/compare_evals.py A.json [B.json ...]            # each report, then all of them pooled
    python benchmarks/compare_evals.py --paired A.json B.json         # the same prompts and seeds, two models

Per report: all correct with its Wilson 95% interval, the 1 / 2 / 3-object cells, and how often the two
judges disagree. Pooled: the object-count cells over every report given (e.g. two validation sets of 900
prompts: ~600 prompts a cell). `--paired`: on reports of the same prompts and seeds (the same `--split`,
`--n`, `--seed`), the prompts only A gets right and only B, with the exact two-sided sign test on them
(McNemar's exact test), which is how the card says one model beats another on the same prompts.
Nothing here needs torch.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentforge.shapes.scoring import wilson  # noqa: E402


def load(path: str) -> dict:
    try:
        rep = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path}: not a readable evaluator report ({e})") from None
    if not isinstance(rep, dict) or not {"n", "all_correct", "by_objects", "failures"} <= rep.keys():
        raise SystemExit(
            f"{path}: not an evaluator report (it needs n, all_correct, by_objects and failures): give the "
            "file `eval shapes --json` writes"
        )
    return rep


def pct(k: int, n: int, ci: bool = True) -> str:
    if not n:
        return "–"
    lo, hi = wilson(k, n)
    return f"{100 * k / n:.1f}%" + (f" [{100 * lo:.1f}, {100 * hi:.1f}]" if ci else "") + f" (n = {n})"


def sign_test(a: int, b: int) -> float:
    """Exact two-sided binomial test of a against b discordant pairs at p = 1/2."""
    n, k = a + b, min(a, b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def summary(path: str, rep: dict) -> str:
    n = rep["n"]
    k = round(rep["all_correct"] * n)
    cells = " / ".join(pct(rep["by_objects"][c]["k"], rep["by_objects"][c]["n"], False)
                       for c in ("1", "2", "3") if c in rep["by_objects"])  # fmt: skip
    line = f"{path}: all correct {pct(k, n)}; 1 / 2 / 3 objects {cells}"
    second = rep.get("second_judge")
    if second:
        d = second["disagree"]
        off = d["analytic_only"] + d["cnn_only"]
        line += (f"; judges disagree {100 * off / n:.1f}% ({d['analytic_only']} only analytic, "
                 f"{d['cnn_only']} only CNN){'' if second['trustworthy'] else ', flagged'}")  # fmt: skip
    return line


def paired(a: dict, b: dict) -> tuple[int, int, float]:
    """(only A right, only B right, p) on the same prompts: each report lists its failed images by file."""
    if a["n"] != b["n"]:
        raise SystemExit(f"the reports scored {a['n']} and {b['n']} images: "
                         "--paired needs the same prompts and seeds")  # fmt: skip
    fa = {r["file"]: r["prompt"] for r in a["failures"]}
    fb = {r["file"]: r["prompt"] for r in b["failures"]}
    clash = [f for f in fa.keys() & fb.keys() if fa[f] != fb[f]]
    if clash:  # e.g. two prompt completions: the images still pair by file (prompt index and seed)
        print(f"note: {len(clash)} failed images hold different prompts in the two reports (e.g. {clash[0]})")
    only_a, only_b = len(fb.keys() - fa.keys()), len(fa.keys() - fb.keys())
    return only_a, only_b, sign_test(only_a, only_b)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("reports", nargs="+", help="eval shapes --json files")
    p.add_argument("--paired", action="store_true", help="two reports of the same prompts: the sign test")
    args = p.parse_args(argv)
    reps = [load(r) for r in args.reports]
    if args.paired:
        if len(reps) != 2:
            p.error(f"--paired takes two reports, got {len(reps)}")
        a, b, pv = paired(*reps)
        print(f"only {args.reports[0]} right: {a}; only {args.reports[1]} right: {b}; sign test p = {pv:.2g}")
        return 0
    for path, rep in zip(args.reports, reps, strict=True):
        print(summary(path, rep))
    if len(reps) > 1:
        cells = []
        for c in ("1", "2", "3"):
            k = sum(r["by_objects"].get(c, {}).get("k", 0) for r in reps)
            n = sum(r["by_objects"].get(c, {}).get("n", 0) for r in reps)
            cells.append(f"{c}: {pct(k, n)}")
        print("pooled by objects: " + "; ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
