"""Where the two judges disagree on a model's images: each such image, both readings, and a grid to look at.

Issue 10 flags an evaluation whose analytic and CNN judges disagree on more than 3% of the images. This
lists the images behind that figure so a person can say which judge is right, or that neither can be (a
shape no one could name). Input: a folder written by `latentforge eval shapes --model M --out FOLDER`
(images and metadata.jsonl).

    .venv/bin/python benchmarks/judge_disagreements.py FOLDER --png out/disagreements.png \\
        [--json out/disagreements.json]

Prints one block per disagreement: the prompt, what each judge read (background | colour size shape
@position per object) and which objects the analytic judge flags as ambiguous; the grid shows the images at
3× with their index and which judge calls them right.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentforge.files import write_json  # noqa: E402
from latentforge.shapes import cnn_judge  # noqa: E402
from latentforge.shapes.captions import parse  # noqa: E402
from latentforge.shapes.detection import analyze  # noqa: E402
from latentforge.shapes.scoring import score  # noqa: E402

TILE, PAD, LABEL = 192, 4, 14  # pixels: image at 3x (64 px), gap, caption strip


def reading(scene: dict) -> str:
    objs = "; ".join(f"{o['color']} {o['size']} {o['shape']} @{o['position']}" for o in scene["objects"])
    return f"{scene['background']} | {objs}"


def disagreements(folder: Path) -> tuple[list[dict], int]:
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
    images = [np.asarray(Image.open(folder / r["file_name"]).convert("RGB")) for r in rows]
    cnn = cnn_judge.judge(images)
    out, n = [], 0
    for r, img, seen in zip(rows, images, cnn, strict=True):
        spec = parse(r["text"])
        if spec is None:
            continue
        n += 1
        d = analyze(img)
        analytic = score(d.scene, spec, d.shape_ambiguous)["correct"]
        if analytic != score(seen, spec)["correct"]:
            right = "analytic" if analytic else "cnn"
            out.append({"file": r["file_name"], "prompt": r["text"], "right": right, "_image": img,
                        "analytic": reading(d.scene.to_dict()), "cnn": reading(seen.to_dict()),
                        "ambiguous": [bool(a) for a in d.shape_ambiguous]})  # fmt: skip
    return out, n


def grid(recs: list[dict], cols: int = 6) -> Image.Image:
    rows = max(1, (len(recs) + cols - 1) // cols)
    g = Image.new("RGB", (cols * (TILE + PAD), rows * (TILE + LABEL + PAD)), "white")
    for i, r in enumerate(recs):
        x, y = (i % cols) * (TILE + PAD), (i // cols) * (TILE + LABEL + PAD)
        g.paste(Image.fromarray(r["_image"]).resize((TILE, TILE), Image.NEAREST), (x, y + LABEL))
        ImageDraw.Draw(g).text((x + 2, y + 1), f"[{i}] {r['right']} says right", fill="black")
    return g


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", type=Path, help="an `eval shapes --out` folder (images + metadata.jsonl)")
    p.add_argument("--png", required=True, help="the grid of disagreeing images")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not (args.folder / "metadata.jsonl").is_file():
        raise SystemExit(f"{args.folder}: no metadata.jsonl (write the folder with `eval shapes --out`)")
    recs, n = disagreements(args.folder)
    for i, r in enumerate(recs):
        print(f"[{i}] {r['file']}: {r['right']} says right, ambiguous {r['ambiguous']}\n"
              f"  prompt:   {r['prompt']}\n  analytic: {r['analytic']}\n  cnn:      {r['cnn']}")  # fmt: skip
    flagged = sum(any(r["ambiguous"]) for r in recs)
    alone = {j: sum(r["right"] == j for r in recs) for j in ("analytic", "cnn")}
    print(f"{len(recs)} of {n} images ({100 * len(recs) / max(n, 1):.1f}%): analytic alone right "
          f"{alone['analytic']}, cnn alone {alone['cnn']}; {flagged} with a shape the analytic judge "
          "flags ambiguous")  # fmt: skip
    Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    grid(recs).save(args.png)
    if args.json:
        listed = [{k: v for k, v in r.items() if k != "_image"} for r in recs]
        write_json(args.json, {"n": n, "disagreements": listed})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
