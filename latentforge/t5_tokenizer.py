"""The T5 tokenizer of SD3's T5-XXL: the SentencePiece Unigram vocabulary of google/t5-v1_1-xxl (Kudo
2018, "Subword Regularization") read from a `tokenizer.json` the user has, run by the `tokenizers` library,
with the SD3 reference's token handling.

The vocabulary is not shipped (no package checked ships it, architectures.md §5). `find` looks for it:
    1. at the path given (`t5_tokenizer=`, `--t5-tokenizer`): a tokenizer.json, or a folder holding one;
    2. beside the weights (the T5 file, then the checkpoint): tokenizer.json, tokenizer_3/tokenizer.json
       (diffusers' SD3 folders: the T5 tokenizer is the third), t5_tokenizer/tokenizer.json;
and a missing one is an error that lists every place it looked.

`spiece.model`, the SentencePiece protobuf itself, is refused with an error that says why: `tokenizers`
reads one only through `SentencePieceUnigramTokenizer.from_spm`, which needs the `protobuf` package and
sentencepiece's generated `sentencepiece_model_pb2.py` importable from the working directory, and
transformers' converter needs `sentencepiece` and `protobuf`; neither is a dependency here. The
tokenizer.json of the same repository works (or one written once by
`transformers.T5TokenizerFast(vocab_file="spiece.model").save_pretrained(DIR)`).

Token handling (Stability-AI/sd3.5 other_impls.py: `SD3Tokenizer.tokenize_with_weights` gives T5
`text[:226]`, characters; `T5XXLTokenizer` is `SDTokenizer(pad_with_end=False, has_start_token=False,
pad_to_max_length=False, min_length=77)`): newlines become spaces, the text is split on spaces, each word
is tokenized on its own and loses the EOS the HF tokenizer appends; then no BOS, EOS = 1 at the end,
padded with <pad> = 0 to at least 77 tokens. The prompts of one call are padded to the longest. The
reference never cuts tokens; here a prompt has at most MAX_LENGTH = 256 tokens with its EOS (diffusers'
StableDiffusion3Pipeline max_sequence_length default), which 226 characters exceed only in unusual text
(characters NFKC expands, such as "…"); the rest is cut with a PromptTruncatedWarning, as is text past 226
characters.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer

from latentforge.tokenizer import PromptTruncatedWarning

MAX_CHARS = 226  # sd3.5 SD3Tokenizer: text[:226]
MIN_LENGTH = 77  # sd3.5 T5XXLTokenizer min_length
MAX_LENGTH = 256  # tokens with EOS (diffusers' max_sequence_length)
PAD, EOS = 0, 1
PAD_TOKEN, EOS_TOKEN = "<pad>", "</s>"
BESIDE = ("tokenizer.json", "tokenizer_3/tokenizer.json", "t5_tokenizer/tokenizer.json")
MAX_CUT_WARNINGS = 20

_cut_warned: set[tuple[str, str]] = set()


class T5Tokenizer:
    """A `tokenizers.Tokenizer` holding a T5 vocabulary (<pad> = 0, </s> = 1) and SD3's handling of it."""

    def __init__(self, tokenizer: Tokenizer, source: str = "<memory>"):
        for token, want in ((PAD_TOKEN, PAD), (EOS_TOKEN, EOS)):
            got = tokenizer.token_to_id(token)
            if got != want:
                raise ValueError(
                    f"{source} is not a T5 tokenizer: {token} has id {got}, T5 has {want} "
                    f"(vocabulary of {tokenizer.get_vocab_size()} tokens)"
                )
        self.tokenizer = tokenizer
        self.source = source
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def from_file(cls, path: str | Path) -> T5Tokenizer:
        """A tokenizer.json (or a folder holding one)."""
        p = Path(path)
        if p.is_dir():
            if not (p / "tokenizer.json").is_file():
                if (p / "spiece.model").is_file():
                    _refuse_spiece(p / "spiece.model")
                raise FileNotFoundError(f"the folder {str(p)!r} holds no tokenizer.json")
            p = p / "tokenizer.json"
        if p.name.endswith(".model"):
            _refuse_spiece(p)
        if not p.is_file():
            raise FileNotFoundError(f"T5 tokenizer {str(p)!r} does not exist")
        try:
            tok = Tokenizer.from_file(str(p))
        except Exception as e:  # tokenizers raises its own exception type for malformed JSON
            raise ValueError(f"{str(p)!r} is not a readable tokenizer.json: {e}") from e
        return cls(tok, str(p))

    def encode(self, text: str) -> list[int]:
        """The ids of `text` as the SD3 reference makes them: text[:226], word by word, no EOS or padding."""
        words = [w for w in cut(text).replace("\n", " ").split(" ") if w]
        if not words:
            return []
        return [i for e in self.tokenizer.encode_batch(words, add_special_tokens=False) for i in e.ids]

    def __call__(self, texts: str | Sequence[str], min_length: int = MIN_LENGTH) -> torch.Tensor:
        """[B, L] int64: each text's tokens (at most MAX_LENGTH − 1), EOS, then PAD up to L = the longest row,
        at least `min_length` (77)."""
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(min_length, bool) or not isinstance(min_length, int) or min_length < 1:
            raise ValueError(f"min_length must be an int >= 1, got {min_length!r}")
        rows = []
        for text in texts:
            ids = self.encode(text)
            if len(ids) > MAX_LENGTH - 1:
                _warn_cut(
                    text,
                    f"it has {len(ids)} T5 tokens, more than the {MAX_LENGTH - 1} (+ EOS) used; "
                    "the rest is ignored",
                )
                ids = ids[: MAX_LENGTH - 1]
            rows.append([*ids, EOS])
        out = torch.full((len(rows), max([min_length, *map(len, rows)])), PAD, dtype=torch.int64)
        for row, ids in zip(out, rows, strict=True):
            row[: len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return out

    def length(self, text: str) -> int:
        """The tokens `text` takes with its EOS, before padding (at most MAX_LENGTH)."""
        return min(len(self.encode(text)), MAX_LENGTH - 1) + 1


def cut(text: str) -> str:
    """text[:226], with a PromptTruncatedWarning when that drops something (SD3Tokenizer cuts the raw
    prompt)."""
    if not isinstance(text, str):
        raise TypeError(f"a prompt must be a string, got {type(text).__name__}")
    if len(text) > MAX_CHARS:
        _warn_cut(
            text, f"T5 reads the first {MAX_CHARS} characters; the rest is ignored: {text[MAX_CHARS:]!r}"
        )
    return text[:MAX_CHARS]


def _refuse_spiece(path: Path):
    raise ValueError(
        f"{str(path)!r} is a SentencePiece model (spiece.model). The `tokenizers` library reads one only "
        "through SentencePieceUnigramTokenizer.from_spm, which needs the `protobuf` package and "
        "sentencepiece's `sentencepiece_model_pb2.py`; transformers converts it with `sentencepiece` and "
        "`protobuf`. Give the tokenizer.json of the same repository instead (google/t5-v1_1-xxl, or "
        "tokenizer_3/ of an SD3 diffusers folder), or write one once with "
        "`transformers.T5TokenizerFast(vocab_file=PATH).save_pretrained(DIR)`"
    )


def _warn_cut(text: str, what: str) -> None:
    key = (text, what)
    if key in _cut_warned or len(_cut_warned) > MAX_CUT_WARNINGS:
        return
    _cut_warned.add(key)
    shown = text if len(text) <= 60 else text[:57] + "..."
    warnings.warn(f"the prompt {shown!r} is cut for T5-XXL: {what}", PromptTruncatedWarning, stacklevel=4)


def candidates(beside: Sequence[str | None]) -> list[Path]:
    """The places `find` looks at beside each of the weight files `beside`, in order."""
    out: list[Path] = []
    for f in beside:
        if f:
            folder = Path(f).parent
            out += [folder / name for name in BESIDE if folder / name not in out]
    return out


def find(path: str | None, beside: Sequence[str | None]) -> Path | None:
    """The tokenizer file: `path` when given (an error if it is missing), else the first of
    `candidates(beside)` that exists, else None."""
    if path is not None:
        p = Path(path)
        if p.is_dir():
            return p / "tokenizer.json" if (p / "tokenizer.json").is_file() else p
        if not p.is_file():
            raise FileNotFoundError(f"T5 tokenizer {str(p)!r} does not exist")
        return p
    return next((p for p in candidates(beside) if p.is_file()), None)


def not_found(beside: Sequence[str | None]) -> str:
    """The message for a T5 without a tokenizer: where it looked and what to do."""
    places = candidates(beside)
    looked = ", ".join(repr(str(p)) for p in places) or "(no weight file to look beside)"
    spm = [str(p.with_name("spiece.model")) for p in places if p.with_name("spiece.model").is_file()]
    why = (
        f" ({spm[0]!r} is there, but a spiece.model needs sentencepiece/protobuf: see t5_tokenizer.py)"
        if spm
        else ""
    )
    return (
        f"no T5 tokenizer found: looked at {looked}{why}. The T5-XXL vocabulary is not shipped: pass the "
        "tokenizer.json of google/t5-v1_1-xxl (or tokenizer_3/tokenizer.json of an SD3 diffusers folder) as "
        "t5_tokenizer=PATH (--t5-tokenizer PATH), or put it beside the T5 weights"
    )


def load(path: str | None, beside: Sequence[str | None]) -> T5Tokenizer:
    """The tokenizer `find` finds, or a FileNotFoundError that names every place it looked."""
    found = find(path, beside)
    if found is None:
        raise FileNotFoundError(not_found(beside))
    return T5Tokenizer.from_file(found)
