"""A1111's prompt syntax: emphasis, BREAK, chunks of `max_position_embeddings - 2` tokens, and the two ways
the weights are applied to a CLIP encoder's output.

Written from the documented behaviour (not copied): the A1111 wiki "Features → Attention/emphasis" and
"BREAK", and the docstring of `parse_prompt_attention` in AUTOMATIC1111/stable-diffusion-webui
`modules/prompt_parser.py` (its examples are tests in tests/test_prompts.py); the chunking of
`modules/sd_hijack_clip.py` (`tokenize_line`, `empty_chunk`); the emphasis of `modules/sd_emphasis.py`
("Original"); ComfyUI's README ("(good code:1.2) … default emphasis for () is 1.1") and its documented
interpolation towards the empty prompt.

Syntax (weights multiply when nested; the innermost bracket is applied first):

    (text)        × 1.1            ((text)) × 1.21, ...
    [text]        ÷ 1.1
    (text:1.3)    × 1.3            any float: 0 and negative weights are allowed; spaces around it too
    \\( \\) \\[ \\] \\\\   the literal character; a backslash before anything else is dropped (A1111)
    BREAK         (upper case, a whole word) ends the current chunk: the parse holds ("BREAK", -1.0)

Unbalanced brackets parse as A1111 parses them: a `(` or `[` never closed applies its ×1.1 / ÷1.1 to
everything after it, a `)` or `]` with nothing open is a literal character, `(a:1.3` without its `)` is
the text "a:1.3" ×1.1. Runs of equal weight are merged. Two deliberate differences from A1111's code,
where it crashes or mangles: a weight that is not a number ("(a:1.2.3)") is text, not a ValueError; and
BREAK inside brackets stays a chunk boundary (A1111 multiplies its -1 marker into an ordinary word
"BREAK" with weight -1.1).

Chunks (A1111 `tokenize_line`): each parsed piece is tokenized on its own; tokens fill chunks of
`chunk_len` (75 for real CLIP's 77 positions, `max_position_embeddings - 2` in general); when a chunk is
full and a comma is among its last `comma_backtrack` (20, A1111's default `comma_padding_backtrack`)
tokens, the words after that comma move to the next chunk. BREAK closes the current chunk (an empty one
too: "a BREAK BREAK b" has three chunks). Every chunk is encoded on its own as BOS + tokens + EOS +
padding, and the chunks' hidden states are concatenated along the sequence.

Textual inversion words (latentforge/textual_inversion.py finds them: an embedding's file stem as a word, or
ComfyUI's `embedding:name`) take as many positions as the embedding has vectors, each with the word's weight,
and are never split across chunks: one that does not fit closes the chunk (A1111 `tokenize_line`). Their
positions hold the placeholder id 0 and are listed in `Chunk.fixes` (A1111 `PromptChunkFix`).

Weighting of one chunk's hidden state z [L, D] with per-token weights w [L] (BOS/EOS/padding weigh 1):
    "a1111": z' = z·w, then z' · mean(z) / mean(z')  (sd_emphasis "Original": the mean over the whole
             chunk is restored; here per prompt, A1111 takes it over the batch of prompts)
    "comfy": z'_j = (z_j − e_j)·w_j + e_j for the tokens with w_j ≠ 1, e = the empty prompt's hidden state
    "none":  no parsing at all: the text is literal (A1111's emphasis option "None"); still chunked
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

ROUND = 1.1  # (text)
SQUARE = 1 / 1.1  # [text]
BREAK = ("BREAK", -1.0)
COMMA_BACKTRACK = 20  # A1111 opts.comma_padding_backtrack default
WEIGHTINGS = ("a1111", "comfy", "none")

_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*")  # a whole upper-case word, with the spaces around it
_NUMBER = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)")  # after ':' -> the weight and the closing ')'
_SPECIAL = "\\()[]:"
_ESCAPABLE = "()[]\\"
PLACEHOLDER = 0  # the id at an embedding's positions (A1111 too); the encoder's input override replaces it


def check_weighting(weighting: str) -> str:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    return weighting


def is_break(piece: tuple[str, float]) -> bool:
    return piece[0] == "BREAK" and piece[1] == -1


def parse_attention(text: str) -> list[tuple[str, float]]:
    """The prompt as (text, weight) runs, A1111's `parse_prompt_attention` semantics (see the module doc).

    >>> parse_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    if not isinstance(text, str):
        raise TypeError(f"a prompt must be a string, got {type(text).__name__}")
    out: list[list] = []  # [text, weight, is_break]
    rounds: list[int] = []  # index in `out` where each open '(' starts
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in out[start:]:
            if not piece[2]:
                piece[1] *= factor

    def add_text(run: str) -> None:
        for k, part in enumerate(_BREAK_SPLIT.split(run)):
            if k:
                out.append([BREAK[0], BREAK[1], True])
            out.append([part, 1.0, False])

    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            nxt = text[i + 1] if i + 1 < n else ""
            if nxt and nxt in _ESCAPABLE:
                out.append([nxt, 1.0, False])
                i += 2
            else:  # a lone backslash: dropped, as A1111 does
                out.append(["", 1.0, False])
                i += 1
        elif c == "(":
            rounds.append(len(out))
            i += 1
        elif c == "[":
            squares.append(len(out))
            i += 1
        elif c == ":":
            m = _NUMBER.match(text, i + 1)
            if m and rounds:
                scale(rounds.pop(), float(m.group(1)))
            elif m:  # ":1.3)" with no '(' open: literal text
                add_text(text[i : m.end()])
            else:
                add_text(":")
            i = m.end() if m else i + 1
        elif c == ")" and rounds:
            scale(rounds.pop(), ROUND)
            i += 1
        elif c == "]" and squares:
            scale(squares.pop(), SQUARE)
            i += 1
        elif c in ")]":  # nothing open: literal
            add_text(c)
            i += 1
        else:
            j = i + 1
            while j < n and text[j] not in _SPECIAL:
                j += 1
            add_text(text[i:j])
            i = j
    for start in rounds:  # never closed: applies to the rest (A1111: round ones first, then square)
        scale(start, ROUND)
    for start in squares:
        scale(start, SQUARE)
    if not out:
        return [("", 1.0)]
    merged = [out[0]]
    for piece in out[1:]:
        last = merged[-1]
        if not piece[2] and not last[2] and piece[1] == last[1]:
            last[0] += piece[0]
        else:
            merged.append(piece)
    return [(t, float(w)) for t, w, _ in merged]


@dataclass(frozen=True)
class Chunk:
    """One chunk's text tokens (no BOS/EOS/padding, at most chunk_len) and their weights; `fixes`: the
    textual inversion embeddings in it as (offset of their first position in `ids`, name)."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]
    fixes: tuple[tuple[int, str], ...] = ()


# split_words(text) -> the text cut into plain strings and (embedding name, vector count) words
WordSplitter = Callable[[str], list[str | tuple[str, int]]]


def chunks(
    text: str,
    tokenizer_encode: Callable[[list[str]], list[list[int]]],
    chunk_len: int,
    *,
    emphasis: bool = True,
    comma_backtrack: int = COMMA_BACKTRACK,
    split_words: WordSplitter | None = None,
) -> list[Chunk]:
    """The prompt's chunks (at least one; the empty prompt is one empty chunk).

    tokenizer_encode: texts -> their token ids without BOS/EOS (`latentforge.tokenizer.encode`).
    chunk_len: text tokens per chunk, the encoder's max_position_embeddings - 2. emphasis=False reads
    the text literally (no brackets, no BREAK). comma_backtrack: 0 turns A1111's comma rule off.
    split_words: finds textual inversion words (`TextualInversions.split_words`); None: there are none.
    """
    if isinstance(chunk_len, bool) or not isinstance(chunk_len, int) or chunk_len < 1:
        raise ValueError(f"chunk_len must be an int >= 1, got {chunk_len!r}")
    pieces = parse_attention(text) if emphasis else [(text, 1.0)]
    comma = tokenizer_encode([","])[0]
    comma = comma[0] if len(comma) == 1 else None
    # every piece as plain strings and embedding words; all the strings are tokenized in one batch
    split = split_words or (lambda t: [t])
    words = [[] if emphasis and is_break(p) else split(p[0]) for p in pieces]
    plain = [x for ws in words for x in ws if isinstance(x, str)]
    encoded = iter(tokenizer_encode(plain) if plain else [])
    done: list[Chunk] = []
    ids: list[int] = []
    ws: list[float] = []
    fixes: list[tuple[int, str]] = []
    last_comma = -1

    def close() -> None:
        nonlocal ids, ws, fixes, last_comma
        done.append(Chunk(tuple(ids), tuple(ws), tuple(fixes)))
        ids, ws, fixes, last_comma = [], [], [], -1

    def place(tokens: list[int], weight: float, name: str | None) -> None:
        nonlocal ids, ws, fixes, last_comma
        if name is None and tokens[0] == comma:
            last_comma = len(ids)
        elif comma_backtrack and len(ids) == chunk_len and last_comma >= 0:
            if len(ids) - last_comma <= comma_backtrack:  # move what follows the comma on
                cut = last_comma + 1
                rest = ids[cut:], ws[cut:], [(o - cut, e) for o, e in fixes if o >= cut]
                ids, ws, fixes = ids[:cut], ws[:cut], [(o, e) for o, e in fixes if o < cut]
                close()
                ids, ws, fixes = rest
        if len(ids) + len(tokens) > chunk_len:  # full; an embedding is never split across chunks
            close()
        if name is not None:
            fixes.append((len(ids), name))
        ids.extend(tokens)
        ws.extend([weight] * len(tokens))

    for piece, piece_words in zip(pieces, words, strict=True):
        if emphasis and is_break(piece):
            close()
            continue
        for word in piece_words:
            if isinstance(word, str):
                for tok in next(encoded):
                    place([tok], piece[1], None)
                continue
            name, n = word
            if n > chunk_len:
                raise ValueError(
                    f"the embedding {name!r} has {n} vectors, more than the {chunk_len} tokens of a chunk"
                )
            place([PLACEHOLDER] * n, piece[1], name)
    if ids or not done:
        close()
    return done


def chunk_ids(
    prompt_chunks: Sequence[Chunk], n: int, context_length: int, bos: int, eos: int, pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [n, context_length] int64 and weights [n, context_length] float32: each chunk as BOS, its
    tokens, EOS, then `pad`; chunks past the prompt's own are empty (A1111 `empty_chunk`), weight 1."""
    if len(prompt_chunks) > n:
        raise ValueError(f"{len(prompt_chunks)} chunks do not fit in {n}")
    ids = torch.full((n, context_length), pad, dtype=torch.int64)
    weights = torch.ones(n, context_length, dtype=torch.float32)
    for k in range(n):
        c = prompt_chunks[k] if k < len(prompt_chunks) else Chunk((), ())
        if len(c.ids) > context_length - 2:
            raise ValueError(f"a chunk of {len(c.ids)} tokens does not fit in {context_length} positions")
        row = [bos, *c.ids, eos]
        ids[k, : len(row)] = torch.tensor(row, dtype=torch.int64)
        weights[k, 1 : 1 + len(c.weights)] = torch.tensor(c.weights, dtype=torch.float32)
    return ids, weights


def apply_weights(
    z: torch.Tensor, weights: torch.Tensor, weighting: str, z_empty: torch.Tensor | None = None
) -> torch.Tensor:
    """Weighted hidden states. z: [..., L, D] (one chunk per [..]); weights: [..., L]; z_empty: [L, D], the
    empty prompt's hidden state at the same layer (needed by "comfy"). Weights of 1 leave z unchanged."""
    check_weighting(weighting)
    if weighting == "none" or bool((weights == 1).all()):
        return z
    w = weights.to(device=z.device, dtype=torch.float32).unsqueeze(-1)  # [..., L, 1]
    zf = z.float()
    if weighting == "a1111":
        before = zf.mean(dim=(-2, -1), keepdim=True)
        zw = zf * w
        after = zw.mean(dim=(-2, -1), keepdim=True)
        # sd_emphasis "Original": restore the mean; a zero mean after weighting leaves it unscaled
        ratio = torch.where(after != 0, before / torch.where(after != 0, after, 1.0), 1.0)
        return (zw * ratio).to(z.dtype)
    if z_empty is None:
        raise ValueError('weighting="comfy" needs the empty prompt\'s hidden state z_empty')
    e = z_empty.to(device=z.device, dtype=torch.float32)
    out = torch.where(w != 1, (zf - e) * w + e, zf)
    return out.to(z.dtype)
