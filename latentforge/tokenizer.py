"""The CLIP BPE tokenizer (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision", §2.4 / openai/CLIP `simple_tokenizer.py`), run by the `tokenizers` library.

Every Stable Diffusion text encoder that reads CLIP tokens (SD1 CLIP-L, SD2 OpenCLIP ViT-H, SDXL CLIP-L and
bigG, SD3 CLIP-L and bigG) uses this one vocabulary: OpenAI's `bpe_simple_vocab_16e6.txt.gz`, shipped in
`latentforge/data/` with its MIT notice. The file holds a header line and then BPE merges, one `a b` pair per
line; CLIP uses the first 49152 - 256 - 2 = 48,894 of them. The vocabulary is built from it as in CLIP:

    ids 0..255        the 256 bytes, each written as a printable unicode character (GPT-2's byte map)
    ids 256..511      the same 256 characters with the end-of-word suffix `</w>`
    ids 512..49405    one token per merge, in merge order (the concatenated pair)
    ids 49406, 49407  `<|startoftext|>` (BOS) and `<|endoftext|>` (EOS)

Text is normalized (NFC, runs of whitespace to one space, lowercase), split with CLIP's regex (contractions,
runs of letters, single digits, runs of other symbols), mapped to byte characters and merged by BPE with
`</w>` marking the end of each word. This is what `transformers.CLIPTokenizer` does, which is what diffusers,
A1111 and ComfyUI feed their SD models; OpenAI's reference additionally runs `ftfy.fix_text` and
`html.unescape`, which only changes mojibake and HTML entities such as `&amp;`.

`tokenize(texts)` returns the [B, 77] int64 ids the encoders take: BOS, at most 75 text tokens, EOS, padding.
A text with more tokens is cut, as in every SD pipeline, and a `PromptTruncatedWarning` names the token count,
the limit and the words dropped (once per distinct text and limit, for the first `MAX_CUT_WARNINGS` texts).
The padding differs by model family: HF CLIP / SD1 / SDXL CLIP-L / SD3 CLIP-L pad with EOS (49407), OpenCLIP
(SD2, SDXL/SD3 bigG) pads with 0 (`pad="zero"`). The encoders pool at argmax(ids), the first EOS, either way.
"""

from __future__ import annotations

import functools
import gzip
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

VOCAB_FILE = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # openai/CLIP simple_tokenizer.py: merges[1 : 49152 - 256 - 2 + 1]
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
BOS, EOS = 49406, 49407
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77
PAD_MODES = ("eos", "zero")
MAX_CUT_WARNINGS = 20  # distinct cut texts warned about per process; one more warning says the rest are not


class PromptTruncatedWarning(UserWarning):
    """A text had more tokens than the text encoder's context; the rest was cut."""


_cut_warned: set[tuple[str, int]] = set()

# CLIP's word split: English contractions, runs of letters, single digits, runs of anything else that is not
# whitespace. Whitespace itself is dropped.
CLIP_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') map to themselves; the other 68 bytes (controls,
    space, soft hyphen) map to chr(256 + n) in byte order. The order of this dict is the order of ids 0..255.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in mapping)
    for n, b in enumerate(extra):
        mapping[b] = chr(256 + n)
    return mapping


def load_vocab(path: str | Path = VOCAB_FILE) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Read the CLIP merges file and build (vocab: token -> id, merges in rank order)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is the "#version" header
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path} is not a CLIP BPE file: expected {NUM_MERGES} merge pairs after the header")
    byte_chars = list(bytes_to_unicode().values())
    tokens = (
        byte_chars + [c + "</w>" for c in byte_chars] + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
    )
    vocab = {token: i for i, token in enumerate(tokens)}
    assert len(vocab) == VOCAB_SIZE and vocab[BOS_TOKEN] == BOS and vocab[EOS_TOKEN] == EOS
    return vocab, merges


@functools.lru_cache(maxsize=1)
def clip_bpe() -> Tokenizer:
    """The CLIP tokenizer as a `tokenizers.Tokenizer` (built once, ~0.2 s). It emits no BOS/EOS itself."""
    vocab, merges = load_vocab()
    bpe = BPE(
        vocab=vocab,
        merges=merges,
        end_of_word_suffix="</w>",  # CLIP marks the last symbol of every word, not the first like GPT-2
        continuing_subword_prefix="",
        fuse_unk=False,
        unk_token=EOS_TOKEN,  # never produced: every byte and byte</w> is in the vocabulary
    )
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # invert=True: the regex matches are the words; what lies between them (whitespace) is removed.
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            # UTF-8 bytes -> the byte characters above; the words are already split, so no GPT-2 regex here.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    # A literal "<|startoftext|>" / "<|endoftext|>" in a prompt becomes the special id, as in CLIP and HF.
    tok.add_special_tokens([BOS_TOKEN, EOS_TOKEN])
    return tok


def encode(texts: str | Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without BOS/EOS and without truncation."""
    texts = _as_list(texts)
    return [e.ids for e in clip_bpe().encode_batch(texts, add_special_tokens=False)]


def tokenize(
    texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH, pad: str = "eos"
) -> torch.Tensor:
    """[B, context_length] int64: BOS, the first context_length - 2 tokens of each text, EOS, then padding.

    pad="eos" pads with 49407 (HF CLIPTokenizer; SD1, SDXL CLIP-L, SD3 CLIP-L); pad="zero" pads with 0
    (open_clip; SD2 ViT-H, SDXL and SD3 bigG). Longer texts are truncated, as every SD pipeline does, with a
    `PromptTruncatedWarning` (once per distinct text and limit).
    """
    if pad not in PAD_MODES:
        raise ValueError(f"pad must be one of {PAD_MODES}, got {pad!r}")
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
        raise ValueError(f"context_length must be an int >= 2 (room for BOS and EOS), got {context_length!r}")
    texts = _as_list(texts)
    ids = encode(texts)
    for text, tokens in zip(texts, ids, strict=True):
        if len(tokens) > context_length - 2:
            _warn_cut(text, tokens, context_length - 2)
    out = torch.full((len(ids), context_length), EOS if pad == "eos" else 0, dtype=torch.int64)
    for row, tokens in zip(out, ids, strict=True):
        tokens = [BOS, *tokens[: context_length - 2], EOS]
        row[: len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
    return out


def _warn_cut(text: str, tokens: list[int], limit: int) -> None:
    """Warn that `text` (`tokens` without BOS/EOS) was cut to `limit` tokens: once per (text, limit)."""
    key = (text, limit)
    if key in _cut_warned or len(_cut_warned) > MAX_CUT_WARNINGS:
        return
    _cut_warned.add(key)
    if len(_cut_warned) > MAX_CUT_WARNINGS:
        msg = f"more than {MAX_CUT_WARNINGS} prompts were cut at the text encoder's context; no more warnings"
    else:
        shown = text if len(text) <= 60 else text[:57] + "..."
        dropped = decode(tokens[limit:])
        dropped = dropped if len(dropped) <= 60 else dropped[:57] + "..."
        msg = (
            f"the prompt {shown!r} has {len(tokens)} tokens, more than the text encoder's limit of {limit} "
            f"({limit + 2} with BOS and EOS); the rest is ignored: {dropped!r}"
        )
    warnings.warn(msg, PromptTruncatedWarning, stacklevel=3)


def decode(ids: Sequence[int] | torch.Tensor) -> str:
    """Text of one id sequence, read up to its first EOS (so EOS- or zero-padding is ignored); BOS skipped."""
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    words, word = [], []
    for i in (int(i) for i in ids):
        if i == EOS:
            break
        if i == BOS:
            continue
        piece = clip_bpe().id_to_token(i)  # byte characters, `</w>` closes a word
        word.extend(byte_of[c] for c in piece.removesuffix("</w>"))
        if piece.endswith("</w>"):
            words.append(bytes(word).decode("utf-8", errors="replace"))
            word = []
    if word:
        words.append(bytes(word).decode("utf-8", errors="replace"))
    return " ".join(words)


def _as_list(texts: str | Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    texts = list(texts)
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must be a string or a sequence of strings, got an item {bad[0]!r}")
    return texts
