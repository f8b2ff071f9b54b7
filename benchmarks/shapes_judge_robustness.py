"""Shapes evaluator: is the judge trustworthy on images soft and noisy like a model's?

Fresh held-out renders (the same scenes for every condition, at each resolution) are degraded in the order a
generator's output meets them -- Gaussian blur (sigma px), additive Gaussian noise (std in levels of 255),
JPEG at a quality with 4:2:0 chroma subsampling (``shapes_degrade.soften``) -- and judged against their true
captions. Printed:

- the robustness table, per resolution: condition -> all-correct % (``score(...)["correct"]``, what
  ``evaluate`` reports as ``all_correct``: ambiguous shapes scored by their best fit) with its Wilson 95%
  interval, the exact-scene rate (every attribute of every object and the background, stated or not), the
  share of images decided (no prompted shape ambiguous), the all-correct rate among those (what
  ``evaluate`` reports as ``all_correct_decided``) and the share of objects whose shape is ambiguous;
- per resolution, the shape confusion tables of small and of large objects over all degraded conditions
  (true shape -> detected shape at the same cell; "miss": no object there, "amb": reported ambiguous, not
  counted as the best guess);
- the second judge (``cnn_judge.py``) on the same images: its all-correct rate, its exact-scene rate and
  the share of images where the two judges' verdicts agree;
- detect throughput on clean 64x64 renders (one process);
- with ``--failures DIR``: per resolution and condition, the images the judge decided and got wrong, each
  clean render beside its degraded copy, and what each got wrong first (whether the judge or the
  degradation is at fault is then for a person to see: docs/judge/).

    .venv/bin/python benchmarks/shapes_judge_robustness.py [--n 300] [--res 64 32] [--conditions ...] \
        [--failures DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# one process, one thread: the evaluator's matrices are small, and multithreaded BLAS only spins (badly so on
# a shared machine); set before numpy loads OpenBLAS
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from latentforge.shapes import SHAPES, SIZES, cnn_judge, render, sample_scene, satisfies  # noqa: E402
from latentforge.shapes.captions import describe  # noqa: E402
from latentforge.shapes.detection import analyze  # noqa: E402
from latentforge.shapes.scoring import score, wilson  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from shapes_degrade import soften  # noqa: E402  (test helpers, not the package)

# name -> (blur sigma px, noise std levels, JPEG quality or None)
CONDITIONS: dict[str, tuple[float, float, int | None]] = {
    "clean": (0.0, 0.0, None),
    "blur0.8": (0.8, 0.0, None),
    "blur1.2": (1.2, 0.0, None),
    "noise8": (0.0, 8.0, None),
    "jpeg45": (0.0, 0.0, 45),
    "jpeg40": (0.0, 0.0, 40),
    "blur0.8+jpeg45": (0.8, 0.0, 45),
    "blur1.2+noise8": (1.2, 8.0, None),
    "blur1.2+jpeg40": (1.2, 0.0, 40),
    "blur0.8+noise8+jpeg45": (0.8, 8.0, 45),
    "blur1.2+noise8+jpeg40": (1.2, 8.0, 40),
}


def _pct(k: int, n: int) -> str:
    if not n:
        return "     -"
    lo, hi = wilson(k, n)
    return f"{100 * k / n:6.2f} [{100 * lo:5.1f},{100 * hi:5.1f}]"


def run_condition(scenes, specs, res: int, cond: tuple[float, float, int | None], seed: int) -> dict:
    """One condition at one resolution: counts ``ok`` (all correct against the caption), ``exact`` (the
    whole scene), ``decided`` (images with no ambiguous prompted shape), ``ok_decided`` (all correct among
    those), ``objects``, ``ambiguous`` (objects whose shape is ambiguous), and ``confusion``: (size, true
    shape, detected shape | "amb" | "miss") -> count, objects matched by cell."""
    blur, noise, quality = cond
    rng = np.random.default_rng(seed)
    out = dict.fromkeys(("ok", "exact", "decided", "ok_decided", "objects", "ambiguous"), 0)
    conf: dict[tuple[str, str, str], int] = {}
    images = [soften(render(scene, res), rng, blur, noise, quality) for scene in scenes]
    seen = cnn_judge.judge(images) if cnn_judge.available() else [None] * len(images)
    out |= dict.fromkeys(("cnn_ok", "cnn_exact", "agree"), 0)
    out["judged"] = []  # (image, detection, score) of each scene: what `failures` reads
    for scene, spec, img, cnn in zip(scenes, specs, images, seen, strict=True):
        det = analyze(img)
        s = score(det.scene, spec, det.shape_ambiguous)
        out["judged"].append((img, det, s))
        if cnn is not None:  # the second judge (cnn_judge.py) on the same image
            ok2 = score(cnn, spec)["correct"]
            out["cnn_ok"] += ok2
            out["cnn_exact"] += satisfies(cnn, scene) and len(cnn.objects) == len(scene.objects)
            out["agree"] += ok2 == s["correct"]
        out["ok"] += s["correct"]
        out["exact"] += satisfies(det.scene, scene)
        out["decided"] += s["decided"]
        out["ok_decided"] += s["decided"] and s["correct"]
        found = dict(zip((o.position for o in det.scene.objects), det.scene.objects, strict=True))
        amb = dict(zip((o.position for o in det.scene.objects), det.shape_ambiguous, strict=True))
        for o in scene.objects:
            out["objects"] += 1
            got = found.get(o.position)
            label = "miss" if got is None else "amb" if amb[o.position] else got.shape
            out["ambiguous"] += label == "amb"
            conf[(o.size, o.shape, label)] = conf.get((o.size, o.shape, label), 0) + 1
    out["confusion"] = conf
    return out


def _brief(scene) -> str:
    """A scene (or a prompt's partial spec) in one line: size colour shape @position; background."""
    objs = [
        " ".join(x for x in (o.size, o.color, o.shape) if x) + f" @{o.position or '?'}" for o in scene.objects
    ]
    return "; ".join(objs) + f"; background {scene.background or '?'}"


def failures(scenes, specs, judged, path: str, limit: int = 24) -> dict:
    """The images the judge decided (no prompted shape ambiguous) and got wrong (`judged`: `run_condition`'s
    (image, detection, score) per scene): a PNG of up to `limit` of them, each as the clean render beside
    the degraded image, 6x nearest (`path`), and their prompts and verdicts beside it (`path` .txt). Returns
    how many such images there are by what each got wrong first (a prompted object not found, then its
    colour, shape, size, position, a relation, the background)."""
    from PIL import Image

    why: dict[str, int] = {}
    tiles, lines = [], []
    for scene, spec, (img, det, s) in zip(scenes, specs, judged, strict=True):
        if not s["decided"] or s["correct"]:
            continue
        attrs = ("present", "color", "shape", "size", "position")
        wrong = [a for a in attrs if any(o[a] is False for o in s["objects"])]
        wrong += ["relation"] if not all(s["relations"]) else []
        wrong += ["background"] if s["background"] is False else []
        first = (wrong or ["count"])[0]
        why[first] = why.get(first, 0) + 1
        if len(tiles) < limit:
            tiles.append(np.concatenate([render(scene, img.shape[0]), img], 1))
            lines.append(f"{len(tiles) - 1}: {first}: asked [{_brief(spec)}]; found [{_brief(det.scene)}]")
    if tiles:
        tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % 4)
        grid = np.concatenate([np.concatenate(tiles[k : k + 4], 1) for k in range(0, len(tiles), 4)], 0)
        Image.fromarray(grid).resize((grid.shape[1] * 6, grid.shape[0] * 6), Image.NEAREST).save(path)
        Path(path).with_suffix(".txt").write_text("\n".join(lines) + "\n")
    return why


def confusion_table(conf: dict, size: str) -> str:
    cols = (*SHAPES, "amb", "miss")
    lines = ["    " + "true/found".ljust(10) + "".join(f"{c[:5]:>6}" for c in cols) + "   acc%"]
    for s in SHAPES:
        row = [conf.get((size, s, c), 0) for c in cols]
        tot = sum(row)
        acc = f"{100 * row[SHAPES.index(s)] / tot:6.1f}" if tot else "     -"
        lines.append(f"    {s:<10}" + "".join(f"{v:>6}" if v else f"{'.':>6}" for v in row) + f" {acc}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--res", type=int, nargs="+", default=[64, 32])
    ap.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=list(CONDITIONS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-confusion", action="store_true")
    ap.add_argument("--speed", type=int, default=2000, help="images for the throughput line (0: skip)")
    ap.add_argument(
        "--failures",
        metavar="DIR",
        help="per resolution and condition, the decided images judged wrong: DIR/<res>-<condition>.png (the "
        "clean render beside the degraded image) and .txt (prompt and verdict), and counts of what each got "
        "wrong first",
    )
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    scenes = [sample_scene(rng, split="heldout") for _ in range(args.n)]
    specs = [describe(s, rng)[1] for s in scenes]

    if args.speed:
        srng = np.random.default_rng(args.seed + 1)
        imgs = [render(sample_scene(srng, split="heldout"), 64) for _ in range(args.speed)]
        analyze(imgs[0])  # warm the template caches
        t, c = time.perf_counter(), time.process_time()
        for im in imgs:
            analyze(im)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        rate = f"{args.speed / wall:.0f} images/s ({args.speed / cpu:.0f} per CPU second)"
        print(f"analyze, clean 64x64, one process: {rate}\n")

    n = len(scenes)
    totals = {r: {} for r in args.res}
    for r in args.res:
        print(f"{r}x{r}, {n} held-out scenes per condition (decided: no prompted shape ambiguous)")
        head = (
            f"  {'condition':<24}{'all-correct % [95% CI]':<24}{'exact %':>8}{'decided %':>11}"
            f"   {'all-correct|decided [95% CI]':<30}{'amb. objects %':>15}"
            f"   {'CNN all-correct [95% CI]':<24}{'CNN exact %':>12}{'agree %':>9}"
        )
        print(head)
        print("  " + "-" * (len(head) - 2))
        for name in args.conditions:
            seed = 1000 + list(CONDITIONS).index(name)
            c = run_condition(scenes, specs, r, CONDITIONS[name], seed)
            print(
                f"  {name:<24}{_pct(c['ok'], n):<24}{100 * c['exact'] / n:8.2f}{100 * c['decided'] / n:11.2f}"
                f"   {_pct(c['ok_decided'], c['decided']):<30}{100 * c['ambiguous'] / c['objects']:15.2f}"
                f"   {_pct(c['cnn_ok'], n):<24}{100 * c['cnn_exact'] / n:12.2f}{100 * c['agree'] / n:9.2f}",
                flush=True,
            )
            if args.failures:
                os.makedirs(args.failures, exist_ok=True)
                why = failures(scenes, specs, c.pop("judged"), os.path.join(args.failures, f"{r}-{name}.png"))
                print(f"    decided and wrong, by what went wrong first: {why or 'none'}", flush=True)
            if name != "clean":
                for k, v in c["confusion"].items():
                    totals[r][k] = totals[r].get(k, 0) + v
        print()
    if args.no_confusion:
        return
    degraded = [c for c in args.conditions if c != "clean"]
    for r in args.res:
        for size in SIZES:
            print(f"\nshape confusion, {size} objects, {r}x{r}, over {len(degraded)} degraded conditions:")
            print(confusion_table(totals[r], size))


if __name__ == "__main__":
    main()
