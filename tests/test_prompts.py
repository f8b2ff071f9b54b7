"""A1111's prompt syntax (latentforge.prompts) and its use in the CLIP conditioning (conditioning.py).

Expected parses come from, as marked on each row:
  [doc]   the docstring examples of `parse_prompt_attention`, AUTOMATIC1111/stable-diffusion-webui
          modules/prompt_parser.py (the values are the ones printed there, float noise included)
  [wiki]  the A1111 wiki, "Features → Attention/emphasis" and "BREAK"
  [src]   worked by hand from the grammar of prompt_parser.py (escapes, `:weight)`, a `)`/`]` with nothing
          open is text, unclosed brackets apply to the rest, equal weights merge, BREAK splitting)
  [ours]  a deliberate difference where A1111's code crashes or mangles (see latentforge/prompts.py)
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from latentforge import conditioning, families, prompts, tokenizer
from latentforge.models.text import CLIPTextConfig, CLIPTextModel
from latentforge.models.unet import sdxl_refiner_vector, sdxl_vector
from latentforge.prompts import BREAK, ROUND, SQUARE, parse_attention

R2 = ROUND * ROUND  # ((x)): 1.2100000000000002, as A1111 multiplies

PARSES = [
    # [doc]
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
    # [wiki] Attention/emphasis
    ("a (word)", [("a ", 1.0), ("word", 1.1)]),
    ("a ((word))", [("a ", 1.0), ("word", R2)]),
    ("a [word]", [("a ", 1.0), ("word", SQUARE)]),
    ("a (word:1.5)", [("a ", 1.0), ("word", 1.5)]),
    ("a (word:0.25)", [("a ", 1.0), ("word", 0.25)]),
    ("a \\(word\\)", [("a (word)", 1.0)]),
    # [wiki] BREAK; [src] its splitting (whitespace around it is eaten, empty pieces kept)
    ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("BREAK", [("", 1.0), BREAK, ("", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), BREAK, ("", 1.0), BREAK, ("b", 1.0)]),
    ("a\nBREAK\nb", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("BREAKfast, break, Break", [("BREAKfast, break, Break", 1.0)]),  # only the whole upper-case word
    # [src] nesting multiplies, innermost first
    ("(a (nested:1.2) phrase:0.8)", [("a ", 0.8), ("nested", 1.2 * 0.8), (" phrase", 0.8)]),
    ("[[word]]", [("word", SQUARE * SQUARE)]),
    ("((a:1.5))", [("a", 1.5 * ROUND)]),  # the inner pair is (a:1.5), the outer one ×1.1
    ("(a)(b:1.1)", [("ab", 1.1)]),  # equal weights merge
    ("()", [("", 1.0)]),
    ("", [("", 1.0)]),
    # [src] weights of 0, negative, signed, bare decimals, spaces
    ("(word:0)", [("word", 0.0)]),
    ("(word:-1.5)", [("word", -1.5)]),
    ("(a:-1)", [("a", -1.0)]),  # weight -1 on a word is not a BREAK
    ("(word:+2)", [("word", 2.0)]),
    ("(word:.5)", [("word", 0.5)]),
    ("(word: 1.3 )", [("word", 1.3)]),
    # [src] numbers and colons in text stay text
    ("1girl, 2 cats, 4k", [("1girl, 2 cats, 4k", 1.0)]),
    ("(2 cats:1.2), 3 dogs", [("2 cats", 1.2), (", 3 dogs", 1.0)]),
    ("ratio 16:9", [("ratio 16:9", 1.0)]),
    ("time 10:30)", [("time 10:30)", 1.0)]),  # ':30)' with no '(' open is text
    ("(a:1.5", [("a:1.5", 1.1)]),  # no ')' after the number: the ':' is text, the '(' stays open
    ("[a:b:0.5]", [("a:b:0.5", SQUARE)]),  # prompt editing is not supported: plain [text]
    # [src] unbalanced
    ("stray) bracket]", [("stray) bracket]", 1.0)]),
    ("unclosed [square", [("unclosed ", 1.0), ("square", SQUARE)]),
    ("((a) b", [("a", R2), (" b", 1.1)]),
    ("(a [b) c]", [("a ", 1.1), ("b", 1.0), (" c", SQUARE)]),  # brackets close independently
    ("[a (b] c", [("a ", SQUARE), ("b", 1.0), (" c", 1.1)]),
    # [src] escapes; a lone backslash is dropped
    ("\\\\", [("\\", 1.0)]),
    ("a\\b", [("ab", 1.0)]),
    ("\\[not weighted\\]", [("[not weighted]", 1.0)]),
    ("(\\(in emphasis\\))", [("(in emphasis)", 1.1)]),
    ("end\\", [("end", 1.0)]),
    # [ours] a malformed weight is text, not a crash; BREAK stays a boundary inside brackets
    ("(word:1.2.3)", [("word:1.2.3", 1.1)]),
    ("(a BREAK b)", [("a", 1.1), BREAK, ("b", 1.1)]),
]


@pytest.mark.parametrize(("text", "expected"), PARSES, ids=[repr(t) for t, _ in PARSES])
def test_parse_table(text, expected):
    got = parse_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12, abs=1e-12)


def test_parse_table_size_and_docstring_floats_exact():
    assert len(PARSES) >= 30
    doc = dict(PARSES)["a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."]
    assert parse_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == doc  # bit for bit


@pytest.mark.parametrize("text", ["((((", "))))", "[(])", ":::", "(:)", "\\", "(" * 50 + "x", "BREAK" * 3])
def test_parse_never_crashes(text):
    out = parse_attention(text)
    assert out and all(isinstance(t, str) and isinstance(w, float) for t, w in out)


# -- chunks ------------------------------------------------------------------------------------------------


def enc_ids(text):
    return tokenizer.encode([text])[0]


def chunk_shapes(text, chunk_len, **kw):
    return [len(c.ids) for c in prompts.chunks(text, tokenizer.encode, chunk_len, **kw)]


def test_chunks_plain_and_weighted():
    (c,) = prompts.chunks("a red cat", tokenizer.encode, 75)
    assert list(c.ids) == enc_ids("a red cat") and c.weights == (1.0, 1.0, 1.0)
    (c,) = prompts.chunks("(cat:1.5) [dog]", tokenizer.encode, 75)
    assert list(c.ids) == enc_ids("cat dog") and c.weights == pytest.approx((1.5, SQUARE))
    assert prompts.chunks("", tokenizer.encode, 75) == [prompts.Chunk((), ())]


def test_chunks_break():
    assert chunk_shapes("a cat BREAK a dog", 75) == [2, 2]
    assert chunk_shapes("BREAK a", 75) == [0, 1]  # an empty first chunk
    assert chunk_shapes("a BREAK", 75) == [1]  # nothing after: no empty chunk
    assert chunk_shapes("a BREAK BREAK b", 75) == [1, 0, 1]
    assert chunk_shapes("a BREAK b", 75, emphasis=False) == [3]  # literal text


def test_chunks_long_never_cut():
    text = " ".join(["cat"] * 100)  # one token a word
    assert chunk_shapes(text, 75) == [75, 25]
    assert chunk_shapes(text, 46) == [46, 46, 8]  # the default model's 48 positions
    ids = [i for c in prompts.chunks(text, tokenizer.encode, 46) for i in c.ids]
    assert ids == enc_ids(text)


def test_chunks_comma_backtrack():
    # 70 words, a comma (token index 70), then 10 words: the 76th token would not fit, a comma is 5 back
    text = " ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10)
    assert chunk_shapes(text, 75) == [71, 10]  # the words after the comma move to the next chunk
    assert chunk_shapes(text, 75, comma_backtrack=0) == [75, 6]
    far = " ".join(["cat"] * 50) + ", " + " ".join(["dog"] * 30)  # the comma is 24 back: no move
    assert chunk_shapes(far, 75) == [75, 6]


def test_chunk_ids_layout():
    ch = prompts.chunks("(cat:2) dog", tokenizer.encode, 6)
    ids, w = prompts.chunk_ids(ch, 2, 8, tokenizer.BOS, tokenizer.EOS, 0)
    cat, dog = enc_ids("cat dog")
    assert ids.tolist() == [
        [tokenizer.BOS, cat, dog, tokenizer.EOS, 0, 0, 0, 0],
        [tokenizer.BOS, tokenizer.EOS] + [0] * 6,
    ]
    assert w.tolist() == [[1, 2, 1, 1, 1, 1, 1, 1], [1] * 8]


def test_bad_weighting_names_the_choices():
    with pytest.raises(ValueError, match="a1111.*comfy"):
        prompts.check_weighting("sum")
    with pytest.raises(ValueError, match="weighting must be one of"):
        families.encode("sd15", {"clip_l": tiny_clip()}, ["x"], 64, 64, weighting="A1111")


# -- encoders -------------------------------------------------------------------------------------------


def tiny_clip(layout="openai", positions=16, seed=0, projection=None):
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        layout=layout,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=positions,
        hidden_act="quick_gelu" if layout == "openai" else "gelu",
        projection_dim=projection if layout == "openai" else (projection or 24),
    )
    return CLIPTextModel(cfg).eval()


def old_encode(enc, texts, pad, layer, final_norm, pooled):
    """What conditioning.py computed before chunking: one tokenize() call, one forward."""
    ids = tokenizer.tokenize(texts, enc.config.max_position_embeddings, pad=pad)
    return enc(ids, layer=layer, final_norm=final_norm, pooled=pooled)


PLAIN = ["a red circle", "two blue squares, left of a star", ""]


@pytest.mark.parametrize("weighting", ["a1111", "comfy", "none"])
@torch.no_grad()
def test_no_syntax_is_bit_identical_to_before(weighting):
    l, h, g = tiny_clip(seed=1), tiny_clip("open_clip", seed=2), tiny_clip("open_clip", seed=3)
    kw = {"weighting": weighting}
    out = conditioning.sd15({"clip_l": l}, PLAIN, 64, 64, False, None, **kw)
    assert torch.equal(out["context"], old_encode(l, PLAIN, "eos", "last", True, False).hidden)
    out = conditioning.sd21({"clip_h": h}, PLAIN, 64, 64, False, None, **kw)
    assert torch.equal(out["context"], old_encode(h, PLAIN, "zero", "penultimate", True, False).hidden)

    lo = old_encode(l, PLAIN, "eos", "penultimate", False, True)
    go = old_encode(g, PLAIN, "zero", "penultimate", False, True)
    out = conditioning.sdxl_base({"clip_l": l, "clip_g": g}, PLAIN, 64, 48, False, None, **kw)
    assert torch.equal(out["context"], torch.cat([lo.hidden, go.hidden], -1))
    assert torch.equal(out["y"], sdxl_vector(go.projected, (48, 64), (0, 0), (48, 64)))
    out = conditioning.sdxl_refiner({"clip_g": g}, PLAIN, 64, 48, True, None, **kw)
    assert torch.equal(out["context"], go.hidden)
    assert torch.equal(out["y"], sdxl_refiner_vector(go.projected, (48, 64), (0, 0), 2.5))
    out = conditioning.sd3(
        {"clip_l": l, "clip_g": g}, PLAIN, 64, 64, False, SimpleNamespace(context_dim=80), **kw
    )
    lg = torch.nn.functional.pad(torch.cat([lo.hidden, go.hidden], -1), (0, 16))
    assert torch.equal(out["context"], torch.cat([lg, lg.new_zeros(3, 77, 80)], 1))
    assert torch.equal(out["y"], torch.cat([lo.pooled, go.projected], -1))
    out = conditioning.clip_text({"clip_l": l}, PLAIN, 64, 64, False, None, **kw)
    do = old_encode(l, PLAIN, "eos", "last", True, True)
    assert torch.equal(out["context"], do.hidden) and torch.equal(out["y"], do.pooled)


def a1111_formula(z, w):
    """sd_emphasis "Original", written out for one chunk z [L, D], w [L]."""
    zw = z * w[:, None]
    return zw * (z.mean() / zw.mean())


def comfy_formula(z, w, e):
    out = z.clone()
    for j in range(z.shape[0]):
        if w[j] != 1:
            out[j] = (z[j] - e[j]) * w[j] + e[j]
    return out


@torch.no_grad()
def test_weighting_formulas_on_a_tiny_clip():
    enc = tiny_clip(seed=4)
    text = "a (red:1.5) [circle] above (a blue:0) square, (star:-0.5)"
    ids = tokenizer.tokenize(["a red circle above a blue square, star"], 16)  # the same tokens
    assert [i for c in prompts.chunks(text, tokenizer.encode, 14) for i in c.ids] == ids[0, 1:10].tolist()
    w = torch.ones(16)
    w[2], w[3], w[5], w[6], w[9] = 1.5, SQUARE, 0.0, 0.0, -0.5
    z = enc(ids, layer="last", final_norm=True, pooled=False).hidden[0]
    e = old_encode(enc, [""], "eos", "last", True, False).hidden[0]

    got = conditioning.sd15({"clip_l": enc}, [text], 64, 64, False, None)["context"][0]
    torch.testing.assert_close(got, a1111_formula(z, w), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.mean(), z.mean(), rtol=1e-5, atol=1e-7)  # the mean is restored
    got = conditioning.sd15({"clip_l": enc}, [text], 64, 64, False, None, weighting="comfy")["context"][0]
    torch.testing.assert_close(got, comfy_formula(z, w, e), rtol=1e-5, atol=1e-6)
    assert torch.equal(got[0], z[0]) and torch.equal(got[4], z[4])  # weight-1 tokens untouched
    got = conditioning.sd15({"clip_l": enc}, [text], 64, 64, False, None, weighting="none")["context"][0]
    assert got.shape == (32, 32)  # the brackets and numbers are read as text: 2 chunks


@torch.no_grad()
def test_weighting_open_clip_penultimate_and_both_sdxl_towers():
    l, g = tiny_clip(seed=5), tiny_clip("open_clip", seed=6)
    text, plain = "a (cat:1.4) on [grass]", "a cat on grass"
    w = torch.ones(16)
    w[2], w[4] = 1.4, SQUARE
    for weighting in ("a1111", "comfy"):
        out = conditioning.sd21({"clip_h": g}, [text], 64, 64, False, None, weighting=weighting)["context"][0]
        z = old_encode(g, [plain], "zero", "penultimate", True, False).hidden[0]
        e = old_encode(g, [""], "zero", "penultimate", True, False).hidden[0]
        want = a1111_formula(z, w) if weighting == "a1111" else comfy_formula(z, w, e)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)

        out = conditioning.sdxl_base(
            {"clip_l": l, "clip_g": g}, [text], 64, 64, False, None, weighting=weighting
        )
        parts = []
        for enc, pad in ((l, "eos"), (g, "zero")):
            o = old_encode(enc, [plain], pad, "penultimate", False, True)
            e = old_encode(enc, [""], pad, "penultimate", False, False).hidden[0]
            z = o.hidden[0]
            parts.append(a1111_formula(z, w) if weighting == "a1111" else comfy_formula(z, w, e))
        torch.testing.assert_close(out["context"][0], torch.cat(parts, -1), rtol=1e-5, atol=1e-6)
        # the pooled output is not weighted (A1111 and ComfyUI take it from the encoder as is)
        pooled = old_encode(g, [plain], "zero", "penultimate", False, True).projected
        assert torch.equal(out["y"], sdxl_vector(pooled, (64, 64), (0, 0), (64, 64)))


LONG = " ".join(["cat"] * 20) + " BREAK " + " ".join(["dog"] * 5)  # 14 + 6 | 5 tokens at chunk_len 14


@torch.no_grad()
def test_long_prompt_chunks_concatenate_and_pool_from_the_first():
    enc = tiny_clip(seed=7)
    pieces = [" ".join(["cat"] * 14), " ".join(["cat"] * 6), " ".join(["dog"] * 5)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", tokenizer.PromptTruncatedWarning)  # nothing is cut any more
        out = conditioning.clip_text({"clip_l": enc}, [LONG], 64, 64, False, None)
    ref = old_encode(enc, pieces, "eos", "last", True, True)
    assert out["context"].shape == (1, 3 * 16, 32)
    assert torch.allclose(out["context"][0], ref.hidden.reshape(48, 32), atol=1e-6)
    assert torch.allclose(out["y"][0], ref.pooled[0], atol=1e-6)


@torch.no_grad()
def test_long_prompt_through_sd15_is_not_cut():
    """Replaces the old truncation warning test: 16 positions hold 14 tokens a chunk."""
    enc = tiny_clip(seed=8)
    text = "a red circle above a blue square and a green star left of a heart"
    with warnings.catch_warnings():
        warnings.simplefilter("error", tokenizer.PromptTruncatedWarning)
        out = conditioning.sd15({"clip_l": enc}, [text], 64, 64, False, None)
    n = len(enc_ids(text))
    assert n > 14 and out["context"].shape == (1, 16 * -(-n // 14), 32)


@torch.no_grad()
def test_batch_and_negative_padded_to_the_same_chunk_count():
    l, g = tiny_clip(seed=9), tiny_clip("open_clip", seed=10)
    empty_l = old_encode(l, [""], "eos", "last", True, False).hidden[0]
    # in one call: the short prompt gets empty chunks
    out = conditioning.sd15({"clip_l": l}, [LONG, "a cat"], 64, 64, False, None)["context"]
    assert out.shape == (2, 48, 32)
    assert torch.allclose(out[1, 16:32], empty_l, atol=1e-6) and torch.allclose(
        out[1, 32:], empty_l, atol=1e-6
    )
    assert torch.allclose(
        out[1, :16], old_encode(l, ["a cat"], "eos", "last", True, False).hidden[0], atol=1e-6
    )

    for fam, encs in (("sd15", {"clip_l": l}), ("sdxl-base", {"clip_l": l, "clip_g": g})):
        net = SimpleNamespace(context_dim=64)
        cond, uncond = families.encode_pair(fam, encs, [LONG], [""], 64, 64, net)
        assert cond["context"].shape[1] == uncond["context"].shape[1] == 48
        cond, uncond = families.encode_pair(fam, encs, ["a cat"], [LONG], 64, 64, net)  # and vice versa
        assert cond["context"].shape[1] == uncond["context"].shape[1] == 48
        assert families.chunk_count(fam, encs, [LONG, "x"]) == 3
    cond, uncond = families.encode_pair("sd15", {"clip_l": l}, [LONG], [""], 64, 64)
    for k in range(3):
        assert torch.allclose(uncond["context"][0, 16 * k : 16 * (k + 1)], empty_l, atol=1e-6)
    with conditioning.pad_chunks(2):
        assert conditioning.sd15({"clip_l": l}, ["x"], 8, 8, False, None)["context"].shape == (1, 32, 32)
    assert conditioning.sd15({"clip_l": l}, ["x"], 8, 8, False, None)["context"].shape == (1, 16, 32)


@torch.no_grad()
def test_sd3_long_prompt_keeps_t5_part_and_refiner_pools_first_chunk():
    l, g = tiny_clip(seed=11), tiny_clip("open_clip", seed=12)
    net = SimpleNamespace(context_dim=80)
    out = conditioning.sd3({"clip_l": l, "clip_g": g}, [LONG], 64, 64, False, net)
    assert out["context"].shape == (1, 48 + 77, 80)
    assert torch.equal(out["context"][:, 48:], torch.zeros(1, 77, 80))
    first = " ".join(["cat"] * 14)
    lo = old_encode(l, [first], "eos", "penultimate", False, True)
    go = old_encode(g, [first], "zero", "penultimate", False, True)
    torch.testing.assert_close(out["y"], torch.cat([lo.pooled, go.projected], -1), rtol=1e-5, atol=1e-6)
    ref = conditioning.sdxl_refiner({"clip_g": g}, [LONG], 64, 64, False, None)
    assert ref["context"].shape == (1, 48, 32)
    torch.testing.assert_close(ref["y"], sdxl_refiner_vector(go.projected, (64, 64), (0, 0), 6.0))


@torch.no_grad()
def test_families_encode_passes_weighting_through():
    enc = tiny_clip(seed=13)
    a = families.encode("sd15", {"clip_l": enc}, ["(cat:1.3)"], 64, 64, weighting="comfy")
    b = conditioning.sd15({"clip_l": enc}, ["(cat:1.3)"], 64, 64, False, None, weighting="comfy")
    c = families.encode("sd15", {"clip_l": enc}, ["(cat:1.3)"], 64, 64)
    assert torch.equal(a["context"], b["context"]) and not torch.equal(a["context"], c["context"])
    dit = families.encode("dit-xl-2-256", {}, ["207"], 256, 256, weighting="comfy")
    assert dit["y"].tolist() == [207] and families.chunk_count("dit-xl-2-256", {}, ["207"]) == 1


@torch.no_grad()
def test_sd15_context_mask_keeps_each_chunks_bos_tokens_and_eos():
    # A UNet with mask_text_padding gets context_mask [B, n·L]: in each chunk of L = 16 positions, BOS, the
    # chunk's tokens and its EOS (1 + tokens + 1 positions, counted here with the tokenizer), nothing after;
    # other UNets get no mask, and the context is the same either way.
    l = tiny_clip(seed=11)
    texts = [LONG, "a cat", ""]
    net = SimpleNamespace(mask_text_padding=True)
    out = conditioning.sd15({"clip_l": l}, texts, 64, 64, False, net)
    plain = conditioning.sd15({"clip_l": l}, texts, 64, 64, False, SimpleNamespace(mask_text_padding=False))
    assert "context_mask" not in plain and torch.equal(out["context"], plain["context"])
    per_chunk = {  # tokens in each of the three chunks: 20 "cat" as 14 + 6, then BREAK and 5 "dog"
        0: [14, 6, 5],
        1: [len(enc_ids("a cat")), 0, 0],
        2: [0, 0, 0],
    }
    expected = torch.zeros(3, 48, dtype=torch.bool)
    for b, counts in per_chunk.items():
        for k, c in enumerate(counts):
            expected[b, 16 * k : 16 * k + c + 2] = True
    assert out["context_mask"].dtype == torch.bool and torch.equal(out["context_mask"], expected)
    # the prompt and its negative batch together (CFG): both masks as long as both contexts
    cond, uncond = families.encode_pair("sd15", {"clip_l": l}, ["a cat"], [LONG], 64, 64, net)
    assert cond["context_mask"].shape == uncond["context_mask"].shape == (1, 48)
    assert torch.equal(cond["context_mask"][0], expected[1])
    assert torch.equal(uncond["context_mask"][0], expected[0])


@torch.no_grad()
def test_text_transformers_get_the_same_context_mask_as_sd15():
    # dit-text / mmdit-text with mask_text_padding: the same tower, the same mask as sd15's (and the same
    # context and pooled state as without it); without the flag no mask.
    l = tiny_clip(seed=11)
    texts = [LONG, "a cat", ""]
    masked = conditioning.clip_text(
        {"clip_l": l}, texts, 64, 64, False, SimpleNamespace(mask_text_padding=True)
    )
    plain = conditioning.clip_text(
        {"clip_l": l}, texts, 64, 64, False, SimpleNamespace(mask_text_padding=False)
    )
    sd15 = conditioning.sd15({"clip_l": l}, texts, 64, 64, False, SimpleNamespace(mask_text_padding=True))
    assert "context_mask" not in plain
    assert torch.equal(masked["context"], plain["context"]) and torch.equal(masked["y"], plain["y"])
    assert torch.equal(masked["context_mask"], sd15["context_mask"])


def test_mask_text_padding_is_refused_where_the_conditioning_cannot_make_it():
    l, g = tiny_clip(seed=12), tiny_clip("open_clip", seed=13)
    net = SimpleNamespace(mask_text_padding=True, context_dim=64)
    with pytest.raises(ValueError, match="mask_text_padding.*sdxl-base"):
        families.encode("sdxl-base", {"clip_l": l, "clip_g": g}, ["x"], 64, 64, False, net)
