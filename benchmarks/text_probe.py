"""Does the text tower's output say which object is on top? Linear probes on the default model's CLIP tower.

Prompts "a {colour A} {shape} {above|over|below|under|beneath} a {colour B} {shape}" (A ≠ B), and as the
target the colour of the upper object: A after "above", B after "below". The target is an interaction of
two words (a colour and the relation), so no linear function of the words themselves can read it: a
softmax-linear probe on one-hot (colour A, colour B, relation) scores near 50%, one of the two colours, which
this script measures as the baseline. A probe on the tower's token states scores higher only if the tower
has bound the colours to the relation. Controls: the first- and second-mentioned colours (read directly).

The probes: multinomial logistic regression (Adam, 500 steps, small L2) fitted on `--train` prompts, scored
on `--test` others, features standardised; on the mean of the 48 token states, and on the first 16 token
states side by side (position-specific weights; each prompt is 8 words).

    .venv/bin/python benchmarks/text_probe.py [--train 5000] [--test 1000] [--seed 0]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from latentforge.pipeline import Pipeline
from latentforge.shapes.captions import RELATION_WORDS
from latentforge.shapes.render import COLOR_NAMES, SHAPES

UP, DOWN = RELATION_WORDS["above"], RELATION_WORDS["below"]


def prompts(n: int, rng: np.random.Generator) -> tuple[list[str], dict[str, torch.Tensor], torch.Tensor]:
    """n prompts; targets first / second / upper colour index; the one-hot words [n, 2·colours + 2]."""
    colors = list(COLOR_NAMES)
    texts, first, second, upper, up_flags = [], [], [], [], []
    for _ in range(n):
        a, b = rng.choice(len(colors), 2, replace=False)
        up = bool(rng.random() < 0.5)
        word = rng.choice(UP if up else DOWN)
        texts.append(f"a {colors[a]} {rng.choice(SHAPES)} {word} a {colors[b]} {rng.choice(SHAPES)}")
        first.append(a), second.append(b), upper.append(a if up else b), up_flags.append(up)
    first_t, second_t, up_t = torch.tensor(first), torch.tensor(second), torch.tensor(up_flags)
    words = torch.cat(
        [F.one_hot(first_t, len(colors)), F.one_hot(second_t, len(colors)), up_t[:, None], ~up_t[:, None]], 1
    )
    targets = {"first colour": first_t, "second colour": second_t, "upper colour": torch.tensor(upper)}
    return texts, targets, words.float()


def probe(x: torch.Tensor, y: torch.Tensor, n_train: int, classes: int, steps: int = 500) -> float:
    """Held-out accuracy of a softmax-linear probe fitted on the first n_train rows."""
    x = (x - x[:n_train].mean(0)) / (x[:n_train].std(0) + 1e-6)
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(x[:n_train] @ w + b, y[:n_train]) + 1e-4 * w.pow(2).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return ((x[n_train:] @ w + b).argmax(1) == y[n_train:]).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=5000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    texts, targets, words = prompts(args.train + args.test, np.random.default_rng(args.seed))
    pipe = Pipeline.default()
    with torch.no_grad():
        ctx = torch.cat(
            [pipe.encode_prompt(texts[k : k + 500], 64, 64)["context"] for k in range(0, len(texts), 500)]
        )
    ctx = ctx.float()  # [n, 48, 128]
    features = {
        "words, one-hot (baseline)": words,
        "mean of the token states": ctx.mean(1),
        "first 16 token states": ctx[:, :16].flatten(1),
    }
    classes = len(COLOR_NAMES)
    print(f"held-out accuracy of linear probes, {args.train} train / {args.test} test prompts")
    for name, x in features.items():
        accs = {t: probe(x, y, args.train, classes) for t, y in targets.items()}
        print(f"  {name:28s} " + "  ".join(f"{t} {100 * a:5.1f}%" for t, a in accs.items()))


if __name__ == "__main__":
    main()
