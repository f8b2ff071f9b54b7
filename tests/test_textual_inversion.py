"""Textual inversion: the three file layouts, the prompt words that name an embedding, and the key property
that an embedding holding a word's own token embeddings conditions exactly as that word does."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from latentforge import conditioning, prompts, tokenizer
from latentforge.models.text import CLIPTextConfig, CLIPTextModel
from latentforge.textual_inversion import (
    Embedding,
    EmbeddingError,
    TextualInversions,
    embedding_from_state_dict,
    load_embedding,
)

ONE_TOKEN = "red"  # [736]
TWO_TOKENS = "photorealistic"  # [1153, 16157]


def tiny_clip(layout="openai", width=32, seed=0):
    """A tiny CLIP text tower as tests/test_models_text.py builds them (77 positions: 75-token chunks)."""
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        layout=layout,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        hidden_act="quick_gelu" if layout == "openai" else "gelu",
        projection_dim=None if layout == "openai" else 24,
    )
    return CLIPTextModel(cfg).eval()


def token_rows(enc: CLIPTextModel, word: str) -> torch.Tensor:
    """The encoder's own token embeddings of `word` [n, D]."""
    table = enc.tower.text_model.embeddings if enc.config.layout == "openai" else enc.tower
    return table.token_embedding.weight[tokenizer.encode(word)[0]].detach().clone()


def single(name: str, vec: torch.Tensor) -> Embedding:
    return embedding_from_state_dict({"emb_params": vec}, name)


@pytest.fixture(scope="module")
def towers():
    # clip_l and clip_g of different widths, so that a tower given the other's vectors would fail loudly
    return {"clip_l": tiny_clip(width=32, seed=1), "clip_g": tiny_clip("open_clip", width=48, seed=2)}


# -- (a) an embedding equal to a word's token embeddings conditions exactly as the word ----------------------


@torch.no_grad()
def test_embedding_of_a_words_tokens_equals_the_word_sd1():
    enc = tiny_clip(seed=3)
    ti = TextualInversions(
        {
            "myred": single("myred", token_rows(enc, ONE_TOKEN)),
            "photo2": single("photo2", token_rows(enc, TWO_TOKENS)),
        }
    )
    cases = [
        ("a myred car", f"a {ONE_TOKEN} car"),
        ("a embedding:photo2, sharp", f"a {TWO_TOKENS}, sharp"),
        ("(myred:1.3) car, [photo2]", f"({ONE_TOKEN}:1.3) car, [{TWO_TOKENS}]"),  # weighted like the word
    ]
    for with_emb, plain in cases:
        ref = conditioning.sd15({"clip_l": enc}, [plain], 64, 64, False, None)["context"]
        with conditioning.use_embeddings(ti):
            got = conditioning.sd15({"clip_l": enc}, [with_emb], 64, 64, False, None)["context"]
        assert torch.equal(got, ref), with_emb
        # and without the embeddings the word is ordinary text, which conditions differently
        assert not torch.equal(
            conditioning.sd15({"clip_l": enc}, [with_emb], 64, 64, False, None)["context"], ref
        )


@torch.no_grad()
def test_sdxl_pair_equals_the_word_in_both_towers(towers):
    l, g = towers["clip_l"], towers["clip_g"]
    pair = {
        "p1": embedding_from_state_dict(
            {"clip_l": token_rows(l, ONE_TOKEN), "clip_g": token_rows(g, ONE_TOKEN)}, "p1"
        ),
        "p2": embedding_from_state_dict(
            {"clip_l": token_rows(l, TWO_TOKENS), "clip_g": token_rows(g, TWO_TOKENS)}, "p2"
        ),
    }
    ti = TextualInversions(pair)
    batch_emb = ["a p1 car", "embedding:p2 portrait, p1"]
    batch_word = [f"a {ONE_TOKEN} car", f"{TWO_TOKENS} portrait, {ONE_TOKEN}"]
    ref = conditioning.sdxl_base(towers, batch_word, 64, 64, False, None)
    with conditioning.use_embeddings(ti):
        got = conditioning.sdxl_base(towers, batch_emb, 64, 64, False, None)
    assert got["context"].shape == (2, 77, 32 + 48)
    assert torch.equal(got["context"], ref["context"])  # L ‖ G hidden states
    assert torch.equal(got["y"], ref["y"])  # G's pooled EOS state is found past the placeholders


# -- (b) the three layouts load ----------------------------------------------------------------------------


def test_layouts_load(tmp_path: Path):
    v2 = torch.randn(2, 32)
    save_file({"emb_params": v2}, tmp_path / "a1111style.safetensors")
    save_file({"string_to_param.*": v2.half()}, tmp_path / "flat.safetensors")
    save_file({"<cat-toy>": torch.randn(32)}, tmp_path / "learned_embeds.safetensors")
    save_file({"clip_l": torch.randn(3, 32), "clip_g": torch.randn(3, 48)}, tmp_path / "xlpair.safetensors")
    (tmp_path / "notes.txt").write_text("not an embedding")
    ti = TextualInversions.from_dir(tmp_path)
    assert ti.names == ["a1111style", "flat", "learned_embeds", "xlpair"] and not ti.refused
    a, flat, diff, pair = (ti.get(n) for n in ti.names)
    assert (a.layout, a.n_vectors) == ("a1111", 2) and torch.equal(a.for_encoder("clip_l", 32), v2)
    assert flat.layout == "a1111" and flat.vectors["*"].dtype == torch.float32
    assert torch.equal(flat.for_encoder("clip_h", 32), v2.half().float())
    assert (diff.layout, diff.token, diff.n_vectors) == ("diffusers", "<cat-toy>", 1)
    assert (pair.layout, pair.n_vectors) == ("pair", 3)
    assert pair.for_encoder("clip_g", 48).shape == (3, 48) and pair.for_encoder("clip_l", 32).shape == (3, 32)
    assert load_embedding(tmp_path / "xlpair.safetensors", name="other").name == "other"


def test_bad_files_are_refused(tmp_path: Path):
    with pytest.raises(EmbeddingError, match="has 2 tensors"):
        embedding_from_state_dict({"a": torch.zeros(4), "b": torch.zeros(4)}, "x")
    with pytest.raises(EmbeddingError, match="as many vectors"):
        embedding_from_state_dict({"clip_l": torch.zeros(2, 4), "clip_g": torch.zeros(3, 8)}, "x")
    with pytest.raises(EmbeddingError, match="exactly the keys clip_l and clip_g"):
        embedding_from_state_dict({"clip_l": torch.zeros(2, 4)}, "x")
    with pytest.raises(EmbeddingError, match="NaN"):
        embedding_from_state_dict({"emb_params": torch.tensor([[0.0, float("nan")]])}, "x")
    with pytest.raises(EmbeddingError, match="floating"):
        embedding_from_state_dict({"emb_params": torch.zeros(2, 3, 4)}, "x")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00")
    ti = TextualInversions.from_dir(tmp_path)
    assert "broken" in ti.refused
    with pytest.raises(EmbeddingError, match="broken.*cannot be used"):
        ti.split_words("a broken toy")


# -- (c) the words that name an embedding -------------------------------------------------------------------


def test_prompt_words():
    ti = TextualInversions(
        {"easyneg": single("easyneg", torch.zeros(2, 8)), "easy": single("easy", torch.zeros(8))}
    )
    for text in [
        "a easyneg b",
        "a embedding:easyneg b",
        "a embedding:easyneg.safetensors b",
        "a EasyNeg b",
        "a Embedding:EASYNEG.pt b",
    ]:
        assert ti.split_words(text) == ["a ", ("easyneg", 2), " b"], text
    assert ti.split_words("easyneg,easy") == [("easyneg", 2), ",", ("easy", 1)]
    assert ti.split_words("(easyneg)") == ["(", ("easyneg", 2), ")"]
    # a word that merely contains a name is text
    for text in ["myeasyneg", "easynegative", "easyneg-v2", "easyneg_2", "easy2", "uneasy", "x-easy"]:
        assert ti.split_words(text) == [text], text
    assert ti.split_words("") == []
    with pytest.raises(EmbeddingError, match="no embedding named 'nope'.*easy, easyneg"):
        ti.split_words("a embedding:nope, b")
    with pytest.raises(EmbeddingError, match="no embedding named 'easyneg2'"):
        ti.split_words("embedding:easyneg2")
    # the chunks carry the placeholders and where each embedding starts
    (c,) = prompts.chunks("a (easyneg:1.5) cat", tokenizer.encode, 75, split_words=ti.split_words)
    assert c.ids == (*tokenizer.encode("a")[0], 0, 0, *tokenizer.encode("cat")[0])
    assert c.weights == (1.0, 1.5, 1.5, 1.0) and c.fixes == ((1, "easyneg"),)
    # emphasis "none" reads brackets literally but still finds embeddings
    (c,) = prompts.chunks("easy BREAK", tokenizer.encode, 75, emphasis=False, split_words=ti.split_words)
    assert c.fixes == ((0, "easy"),)
    with pytest.raises(EmbeddingError, match="differ only in case"):
        TextualInversions({"A": single("A", torch.zeros(8)), "a": single("a", torch.zeros(8))})


def test_without_embeddings_nothing_changes():
    enc = tiny_clip(seed=4)
    text = ["embedding:x and red"]
    with conditioning.use_embeddings(None):
        a = conditioning.sd15({"clip_l": enc}, text, 64, 64, False, None)["context"]
    b = conditioning.sd15({"clip_l": enc}, text, 64, 64, False, None)["context"]
    assert torch.equal(a, b)
    with pytest.raises(TypeError, match="TextualInversions"):
        with conditioning.use_embeddings({"x": torch.zeros(1)}):
            pass


# -- (d) widths ------------------------------------------------------------------------------------------


def test_width_mismatch_is_refused(towers):
    sd1 = TextualInversions({"sd1emb": single("sd1emb", torch.zeros(1, 768))})
    with conditioning.use_embeddings(sd1), pytest.raises(EmbeddingError) as err:
        conditioning.sd15({"clip_l": towers["clip_l"]}, ["a sd1emb"], 64, 64, False, None)
    msg = str(err.value)
    assert "768 wide" in msg and "SD1.x" in msg and "'clip_l' is 32" in msg
    # a one-tower embedding that fits clip_l is refused by SDXL's clip_g, which needs its own vectors
    l_only = TextualInversions({"lemb": single("lemb", torch.zeros(1, 32))})
    with conditioning.use_embeddings(l_only), pytest.raises(EmbeddingError, match="32 wide.*'clip_g' is 48"):
        conditioning.sdxl_base(towers, ["lemb"], 64, 64, False, None)
    # a pair has nothing for SD2's clip_h
    pair = embedding_from_state_dict({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, "xl")
    with pytest.raises(EmbeddingError, match="pair.*clip_l 768, clip_g 1280.*no vectors for.*'clip_h'"):
        pair.for_encoder("clip_h", 1024)


# -- (e) pickles are refused unopened ----------------------------------------------------------------------


class _Tripwire:
    """Unpickling this touches a file: proof that a loader unpickled it."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_pickle_is_refused_without_unpickling(tmp_path: Path):
    marker = tmp_path / "unpickled"
    for suffix in (".pt", ".bin"):
        (tmp_path / f"evil{suffix}").write_bytes(pickle.dumps({"string_to_param": _Tripwire(str(marker))}))
        with pytest.raises(
            EmbeddingError, match=f"{suffix} embeddings are pickles.*convert it to .safetensors"
        ):
            load_embedding(tmp_path / f"evil{suffix}")
    ti = TextualInversions.from_dir(tmp_path)
    assert ti.names == [] and "evil" in ti.refused
    with pytest.raises(EmbeddingError, match="evil.*pickles"):
        ti.split_words("an embedding:evil")
    assert not marker.exists()


# -- (f) chunks: an n-vector embedding counts n tokens and is never split -----------------------------------


def test_multi_vector_embedding_counts_in_chunks():
    ti = TextualInversions({"tri": single("tri", torch.zeros(3, 32))})

    def shape(text):
        cs = prompts.chunks(text, tokenizer.encode, 75, split_words=ti.split_words)
        return [len(c.ids) for c in cs], [c.fixes for c in cs]

    assert shape("cat " * 72 + "tri") == ([75], [((72, "tri"),)])  # 72 + 3 = 75 fits
    assert shape("cat " * 73 + "tri") == ([73, 3], [(), ((0, "tri"),)])  # 76: it moves, whole, to chunk 2
    # A1111's comma rule moves what follows a late comma, the embedding with it
    assert shape("cat " * 70 + ", tri dog dog") == ([71, 5], [(), ((0, "tri"),)])
    enc = tiny_clip(seed=5)
    with conditioning.use_embeddings(ti):
        assert conditioning.chunk_count({"clip_l": enc}, ["cat " * 72 + "tri"]) == 1
        assert conditioning.chunk_count({"clip_l": enc}, ["cat " * 73 + "tri"]) == 2
        ctx = conditioning.sd15({"clip_l": enc}, ["cat " * 73 + "tri"], 64, 64, False, None)["context"]
    assert ctx.shape == (1, 2 * 77, 32)
    too_long = TextualInversions({"huge": single("huge", torch.zeros(76, 32))})
    with pytest.raises(ValueError, match="76 vectors, more than the 75 tokens"):
        prompts.chunks("huge", tokenizer.encode, 75, split_words=too_long.split_words)


# -- (g) against diffusers' loader on transformers' CLIPTextModel --------------------------------------------


def hf_clip_tokenizer(folder: Path):
    """transformers' CLIPTokenizer on our shipped vocabulary (tests/test_models_text.py: it tokenizes as
    ours), built from files so nothing is downloaded; a fresh one per test, as diffusers adds tokens to it."""
    transformers = pytest.importorskip("transformers")
    vocab, merges = tokenizer.load_vocab()
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8"
    )
    return transformers.CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)


@pytest.mark.parametrize("layout", ["diffusers", "a1111"])
@torch.no_grad()
def test_multi_vector_embedding_matches_diffusers(tmp_path: Path, layout):
    # The same 3-vector file through diffusers' TextualInversionLoaderMixin.load_textual_inversion (the
    # mixin of StableDiffusionPipeline; a bare subclass needs no pipeline components) into transformers'
    # CLIPTextModel holding our tower's weights: diffusers adds the tokens w, w_1, w_2 to the tokenizer and
    # their vectors as new rows of the resized token table, and maybe_convert_prompt rewrites "w" into
    # "w w_1 w_2" (what StableDiffusionPipeline.encode_prompt does). diffusers reads a one-key safetensors
    # file as {token: vectors}, so A1111's {"emb_params": ...} loads with the token passed (its A1111 branch
    # is for the string_to_param dict of .pt pickles). Tolerance: float32 on both sides over the same
    # arithmetic (a table lookup, then two layers of matmuls, softmax and LayerNorms), differing only in
    # summation order: a few ulp of the O(1) LayerNorm outputs (~1e-6); 1e-5 relative, as the other parity
    # tests.
    pytest.importorskip("diffusers")
    from diffusers.loaders import TextualInversionLoaderMixin
    from test_lora import hf_clip
    from test_models_text import random_model

    class Loader(TextualInversionLoaderMixin):  # what load_textual_inversion reads of a pipeline
        hf_device_map = None
        components = {}

    word = "lfglyph"  # not in CLIP's vocabulary (diffusers refuses a token that is)
    enc = random_model(tiny_clip(seed=6).config, torch.float32, seed=6)
    vectors = torch.randn(3, enc.config.hidden_size, generator=torch.Generator().manual_seed(7))
    path = tmp_path / "emb" / f"{word}.safetensors"  # our name for it: the file stem
    path.parent.mkdir()
    save_file({word if layout == "diffusers" else "emb_params": vectors}, str(path))

    hf, hf_tok = hf_clip(enc), hf_clip_tokenizer(tmp_path / "tokenizer")
    loader = Loader()
    loader.load_textual_inversion(
        str(path), token=None if layout == "diffusers" else word, tokenizer=hf_tok, text_encoder=hf
    )
    prompts = [f"a {word} car", f"{word}, red cube in {word} style"]
    expanded = loader.maybe_convert_prompt(prompts, hf_tok)
    ids = hf_tok(expanded, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ids = ids.input_ids
    new = [49408, 49409, 49410]  # w, w_1, w_2: after the 49408 tokens of CLIP's vocabulary
    (a,), (car,) = tokenizer.encode(["a", "car"])
    assert ids[0, :7].tolist() == [tokenizer.BOS, a, *new, car, tokenizer.EOS]
    assert ids[1, 1:4].tolist() == new and ids[1, 8:11].tolist() == new
    ref = hf(input_ids=ids).last_hidden_state

    ti = TextualInversions.from_dir(path.parent)
    assert ti.get(word).layout == layout and ti.get(word).n_vectors == 3
    with conditioning.use_embeddings(ti):
        ours = conditioning.sd15({"clip_l": enc}, prompts, 64, 64, False, None)["context"]
    plain = conditioning.sd15({"clip_l": enc}, prompts, 64, 64, False, None)["context"]
    scale = ref.abs().max()
    assert ((plain - ref).abs().max() / scale).item() > 1e-2  # the embedding matters
    err = ((ours - ref).abs().max() / scale).item()
    assert ours.shape == ref.shape == (2, 77, enc.config.hidden_size) and err <= 1e-5, err


def test_pipeline_and_server_use_the_embeddings_dir(tmp_path):
    """Through the Pipeline (`embeddings_dir`) and the server (`/sdapi/v1/embeddings`): an embedding holding
    the shipped model's own token vector of "red", named "crimson", gives the image of the word "red"."""
    import numpy as np
    from fastapi.testclient import TestClient

    from latentforge.pipeline import Pipeline
    from latentforge.server import Settings, build_app

    base = Pipeline.default()
    table = base.components["clip_l"].transformer.text_model.embeddings.token_embedding.weight
    (red,) = tokenizer.encode("red")
    save_file({"emb_params": table[red].detach().float().clone()}, str(tmp_path / "crimson.safetensors"))
    pipe = Pipeline.from_single_file("default", embeddings_dir=str(tmp_path))
    kw = {"steps": 2, "seed": 3}
    want = np.asarray(base("a big red circle at the center on a black background", **kw)[0])
    got = np.asarray(pipe("a big crimson circle at the center on a black background", **kw)[0])
    assert np.array_equal(got, want)
    plain = np.asarray(base("a big crimson circle at the center on a black background", **kw)[0])
    assert not np.array_equal(plain, want)  # without the embedding the word is something else
    with TestClient(build_app(Settings(embeddings_dir=str(tmp_path)))) as c:
        got = c.get("/sdapi/v1/embeddings").json()
    assert got["loaded"]["crimson"]["vectors"] == 1 and got["loaded"]["crimson"]["shape"] == table.shape[1]
