"""Textual inversion embeddings (Gal et al. 2022, "An Image is Worth One Word: Personalizing Text-to-Image
Generation using Textual Inversion", §3): learned vectors that stand in for a word's token embeddings at the
input of a CLIP text encoder.

Files are read from `.safetensors` only; a `.pt`/`.bin` is refused by its name, before it is opened, so
nothing is unpickled (convert it to safetensors with the tool that made it). The layouts, as read by
AUTOMATIC1111 (`modules/textual_inversion/textual_inversion.py`, `create_embedding_from_data`) and diffusers
(`loaders/textual_inversion.py`, `_retrieve_tokens_and_embeddings`):

    A1111        {"emb_params": [n, D]} (its safetensors export); a flattened {"string_to_param.*": [n, D]}
                 (the `string_to_param` dict of its .pt files) is read too
    diffusers    {token: [D] or [n, D]} (`learned_embeds.safetensors`, one key, e.g. "<cat-toy>")
    SDXL pair    {"clip_l": [n, 768], "clip_g": [n, 1280]}: one row count, one set per tower (A1111, ComfyUI
                 and diffusers' SDXL examples read the two keys; SD3's CLIP-L/G towers take them too)

A vector is [D] for one position; [n, D] takes n positions. The width D must be the text encoder's: 768
(SD1.x CLIP-L, SDXL/SD3 clip_l), 1024 (SD2.x OpenCLIP ViT-H), 1280 (SDXL/SD3 clip_g). A mismatch is refused
when the embedding is used, naming both widths and the family the embedding fits (A1111 skips such files,
ComfyUI warns and ignores the word; here the prompt asked for it, so it is an error).

In a prompt an embedding is named by its file stem, as a whole word (A1111: "easynegative" in
`easynegative.safetensors`; matched without regard to case, since CLIP's tokenizer lower-cases), or as
ComfyUI's `embedding:name`, optionally with the file's extension (`embedding:easynegative.safetensors`).
A word that merely contains the name ("myeasynegative", "easynegative-v2") does not trigger it. The longest
name wins where names overlap (A1111 tries the longest token sequence first). An `embedding:name` that is not
loaded is an error naming what is.

    ti = TextualInversions.from_dir("models/embeddings")
    with conditioning.use_embeddings(ti):
        cond = families.encode(...)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from latentforge.checkpoint_io import read_state_dict

SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".pt", ".bin", ".ckpt", ".pth")  # refused without being opened
PAIR_TOWERS = ("clip_l", "clip_g")  # SDXL/SD3's two CLIP towers, the keys of a pair file
SINGLE = "*"  # the key of a one-tower embedding (A1111's string_to_param key)
A1111_KEY = "emb_params"
# What a vector width is: the text encoders of the released families.
FAMILY_OF_WIDTH = {
    768: "SD1.x (CLIP-L) or the clip_l tower of SDXL/SD3",
    1024: "SD2.x (OpenCLIP ViT-H)",
    1280: "the clip_g tower of SDXL/SD3",
}
COMFY_PREFIX = "embedding:"
_NOT_NAME = r"[\w-]"  # a name is a whole word: no letter, digit, '_' or '-' right before or after it
_COMFY_WORD = re.compile(rf"(?<!{_NOT_NAME}){COMFY_PREFIX}([^\s,()\[\]:]*)", re.IGNORECASE)


class EmbeddingError(ValueError):
    """An embedding file or an embedding word in a prompt that cannot be used, with the reason."""


@dataclass(frozen=True)
class Embedding:
    """One embedding: `vectors` maps a tower ("clip_l", "clip_g") or SINGLE ("*", any tower of its width) to
    float32 [n, D] on the CPU. `layout`: "a1111" | "diffusers" | "pair"; `token`: the diffusers key."""

    name: str
    vectors: dict[str, torch.Tensor]
    layout: str
    token: str | None = None

    @property
    def n_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    def describe(self) -> str:
        if SINGLE in self.vectors:
            width = self.vectors[SINGLE].shape[1]
            return f"{width} wide (it fits {FAMILY_OF_WIDTH.get(width, 'no released text encoder')})"
        widths = ", ".join(f"{k} {v.shape[1]}" for k, v in self.vectors.items())
        return f"a pair for SDXL/SD3's towers ({widths} wide)"

    def for_encoder(self, encoder: str, width: int) -> torch.Tensor:
        """The [n, width] vectors for the text encoder `encoder` ("clip_l", "clip_g", "clip_h") of `width`."""
        vec = self.vectors.get(SINGLE, self.vectors.get(encoder))
        if vec is None:
            raise EmbeddingError(
                f"the embedding {self.name!r} is {self.describe()}: it has no vectors for the text encoder "
                f"{encoder!r} ({width} wide)"
            )
        if vec.shape[1] != width:
            raise EmbeddingError(
                f"the embedding {self.name!r} is {self.describe()}; the text encoder {encoder!r} is {width} "
                f"wide ({FAMILY_OF_WIDTH.get(width, 'not a released family')}): its vectors do not fit"
            )
        return vec


def _as_vectors(t: torch.Tensor, what: str) -> torch.Tensor:
    """[D] or [n, D] floating and finite -> float32 [n, D]."""
    if not t.is_floating_point() or t.ndim not in (1, 2) or t.numel() == 0:
        raise EmbeddingError(f"{what} must be floating [D] or [n, D] vectors, got {t.dtype} {tuple(t.shape)}")
    t = t.float().reshape(-1, t.shape[-1])
    if not bool(torch.isfinite(t).all()):
        raise EmbeddingError(f"{what} holds NaN or infinite values")
    return t


def embedding_from_state_dict(sd: dict[str, torch.Tensor], name: str) -> Embedding:
    """Recognise one of the three layouts (module doc) in a file's tensors."""
    keys = sorted(sd)
    where = f"embedding {name!r}"
    if set(keys) & set(PAIR_TOWERS):
        if set(keys) != set(PAIR_TOWERS):
            raise EmbeddingError(f"{where}: an SDXL pair has exactly the keys clip_l and clip_g, got {keys}")
        vectors = {k: _as_vectors(sd[k], f"{where} {k}") for k in PAIR_TOWERS}
        rows = {k: v.shape[0] for k, v in vectors.items()}
        if len(set(rows.values())) != 1:
            raise EmbeddingError(f"{where}: clip_l and clip_g must have as many vectors, got {rows}")
        return Embedding(name, vectors, "pair")
    if len(keys) != 1:
        raise EmbeddingError(
            f"{where} has {len(keys)} tensors {keys[:6]}: a textual inversion file holds one (A1111 "
            f"{A1111_KEY!r} or string_to_param.*, diffusers {{token: vectors}}) "
            "or an SDXL clip_l + clip_g pair"
        )
    (key,) = keys
    vec = _as_vectors(sd[key], f"{where} {key!r}")
    if key == A1111_KEY or key.startswith("string_to_param."):
        return Embedding(name, {SINGLE: vec}, "a1111")
    return Embedding(name, {SINGLE: vec}, "diffusers", token=key)


def load_embedding(path: str | os.PathLike, name: str | None = None) -> Embedding:
    """Read one embedding file (`.safetensors` only); its name is the file stem unless given."""
    path = Path(path)
    name = name or path.stem
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise EmbeddingError(
            f"{str(path)!r}: {path.suffix} embeddings are pickles and are not loaded (nothing is unpickled); "
            f"convert it to {SUFFIX} ({{'{A1111_KEY}': vectors}} or the SDXL clip_l/clip_g pair)"
        )
    if path.suffix.lower() != SUFFIX:
        raise EmbeddingError(f"{str(path)!r}: embeddings are read from {SUFFIX} files only")
    return embedding_from_state_dict(read_state_dict(str(path)), name)


@dataclass
class TextualInversions:
    """The embeddings a prompt can name, by name; `refused` maps the names of files that could not be read
    (pickles, other layouts) to the reason, which is raised when a prompt uses one of them. The word pattern
    is built once: make a new TextualInversions rather than changing the dicts."""

    embeddings: dict[str, Embedding] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        lower: dict[str, str] = {}
        for name in [*self.embeddings, *self.refused]:
            if not name.strip() or name != name.strip():
                raise EmbeddingError(f"an embedding name must be a non-empty word, got {name!r}")
            other = lower.setdefault(name.lower(), name)
            if other != name:
                raise EmbeddingError(f"the embedding names {other!r} and {name!r} differ only in case")
        self._by_lower = lower
        names = sorted(lower, key=len, reverse=True)  # the longest name first
        alts = "|".join(re.escape(n) for n in names)
        ext = "|".join(re.escape(s) for s in (SUFFIX, *PICKLE_SUFFIXES))
        self._pattern = (
            re.compile(
                rf"(?<!{_NOT_NAME})(?:{COMFY_PREFIX}(?P<comfy>{alts})(?:{ext})?|(?P<bare>{alts}))(?!{_NOT_NAME})",
                re.IGNORECASE,
            )
            if names
            else None
        )

    @classmethod
    def from_dir(cls, embeddings_dir: str | os.PathLike) -> TextualInversions:
        """Every `*.safetensors` file directly in `embeddings_dir`, named by its stem. Pickles and files
        that are no embedding are listed in `refused` (a prompt that names one gets the reason)."""
        folder = Path(embeddings_dir)
        if not folder.is_dir():
            raise EmbeddingError(f"the embeddings directory {str(folder)!r} does not exist")
        found, refused = {}, {}
        for path in sorted(folder.iterdir()):
            suffix = path.suffix.lower()
            if not path.is_file() or suffix not in (SUFFIX, *PICKLE_SUFFIXES):
                continue
            try:
                found[path.stem] = load_embedding(path)
            except (EmbeddingError, ValueError) as e:
                refused.setdefault(path.stem, str(e))
        for name in found:
            refused.pop(name, None)  # a .safetensors beside a .pt of the same name: the safetensors is used
        return cls(found, refused)

    @property
    def names(self) -> list[str]:
        return sorted(self.embeddings)

    def get(self, name: str) -> Embedding:
        canonical = self._by_lower.get(name.lower())
        if canonical in self.refused:
            raise EmbeddingError(f"the embedding {canonical!r} cannot be used: {self.refused[canonical]}")
        if canonical is None:
            raise EmbeddingError(f"no embedding named {name!r}; loaded: {', '.join(self.names) or '(none)'}")
        return self.embeddings[canonical]

    def split_words(self, text: str) -> list[str | tuple[str, int]]:
        """`text` cut into plain strings and (name, vector count) for every embedding word in it (the
        `split_words` that `prompts.chunks` takes)."""
        out: list[str | tuple[str, int]] = []
        start = 0
        for m in self._pattern.finditer(text) if self._pattern else ():
            emb = self.get(m["comfy"] or m["bare"])
            if m.start() > start:
                out.append(text[start : m.start()])
            out.append((emb.name, emb.n_vectors))
            start = m.end()
        if start < len(text):
            out.append(text[start:])
        for part in out:
            unknown = _COMFY_WORD.search(part) if isinstance(part, str) else None
            if unknown:  # an embedding:name whose name is not loaded
                name = unknown[1]
                stem, ext = os.path.splitext(name)
                self.get(stem if ext.lower() in (SUFFIX, *PICKLE_SUFFIXES) else name)
                raise EmbeddingError(f"{unknown[0]!r} does not name an embedding; loaded: {self.names}")
        return out
