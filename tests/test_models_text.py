"""CLIP text encoders and the CLIP tokenizer against transformers / diffusers and the reference key lists."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import regex
import torch

from latentforge import tokenizer as tok
from latentforge.models.text import PRESETS, CLIPTextConfig, CLIPTextModel

KEYS_DIR = Path(__file__).parent / "data" / "checkpoint_keys"

# ----------------------------------------------------------------------------------------------------------
# Presets reproduce the checkpoint key lists exactly.


def read_key_list(name: str, prefix: str) -> dict[str, tuple[int, ...]]:
    keys = {}
    for line in (KEYS_DIR / name).read_text().splitlines():
        key, shape = line.split("\t")
        assert key.startswith(prefix), key
        keys[key.removeprefix(prefix)] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return keys


@pytest.mark.parametrize(
    "preset, file, prefix",
    [
        ("clip-l", "sd1_clip_l_text_hf4x.txt", "cond_stage_model."),
        ("openclip-h", "sd2_openclip_vith_text.txt", "cond_stage_model."),
        ("openclip-bigg", "sdxl_openclip_bigg_text.txt", "conditioner.embedders.1."),
    ],
)
def test_preset_keys_match_checkpoint(preset, file, prefix):
    expected = read_key_list(file, prefix)
    with torch.device("meta"):
        model = CLIPTextModel(PRESETS[preset])
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    # Loading the checkpoint layout is strict and needs no renaming (meta tensors stand in for the weights).
    with torch.device("meta"):
        fresh = CLIPTextModel(PRESETS[preset])
    fresh.load_state_dict(model.state_dict(), strict=True, assign=True)


def test_preset_parameter_counts():
    # architectures.md §4.2: CLIP-L text 123,060,480 (measured); bigG 32(12w^2 + 13w) + 49485w + w^2 + 2w + 1.
    w = 1280
    expected = {
        "clip-l": 123_060_480,
        "openclip-bigg": 32 * (12 * w * w + 13 * w) + 49_485 * w + w * w + 2 * w + 1,
    }
    for name, count in expected.items():
        with torch.device("meta"):
            model = CLIPTextModel(PRESETS[name])
        assert sum(p.numel() for p in model.parameters()) == count


# ----------------------------------------------------------------------------------------------------------
# Tokenizer against transformers.CLIPTokenizer built from the same vocabulary file.

TRICKY = [
    "a photo of a cat",
    "",
    "   ",
    "A  Photo\tOF\na CAT!!!",
    "masterpiece, best quality, (ultra-detailed:1.2), [cat|dog], {a,b}",
    "don't stop, we'll see; they've it's I'M you're she'd",
    "3.14159 1,000,000 2024-01-31 #42 $9.99 50% 1st 22nd",
    "café naïve résumé Zürich São Paulo jalapeño",
    "cafe\u0301 (combining accent) vs caf\u00e9",
    "日本語のテキスト 中文 한국어 Ελληνικά русский текст العربية",
    "emoji 🐱🐶🎨 ❤️ 👍🏽 ☃",
    "tabs\tand\nnewlines\r\nand\u00a0nbsp\u2003em-space",
    "&amp; <b>html</b> \\backslash\\ `code` ~tilde~ ^caret^ @at",
    "a<|endoftext|>b <|startoftext|>",
    "photorealistic " * 60,  # 120 tokens: truncated to 75
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "x" * 300,
]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    vocab, merges = tok.load_vocab()
    d = tmp_path_factory.mktemp("clip_vocab")
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (d / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8"
    )
    return transformers.CLIPTokenizer.from_pretrained(str(d), model_max_length=77)


def test_vocabulary_layout():
    vocab, merges = tok.load_vocab()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["".join(merges[0])] == 512


def test_known_ids():
    # architectures.md §5, measured with open_clip's tokenizer on this file.
    ids = tok.tokenize("a photo of a cat", pad="zero")
    assert ids.shape == (1, 77) and ids.dtype == torch.int64
    assert ids[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 0]
    assert (ids[0, 7:] == 0).all()
    assert (tok.tokenize("a photo of a cat")[0, 7:] == 49407).all()


def test_tokenize_matches_transformers(hf_tokenizer):
    ours = tok.tokenize(TRICKY)
    ref = hf_tokenizer(TRICKY, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(ours, ref["input_ids"].to(torch.int64))
    # Untruncated token streams agree too.
    ref_raw = hf_tokenizer(TRICKY, add_special_tokens=False)["input_ids"]
    assert tok.encode(TRICKY) == ref_raw
    # Zero padding (open_clip) differs only after the closing EOS.
    zero = tok.tokenize(TRICKY, pad="zero")
    closing_eos = torch.tensor([min(len(t), 75) + 1 for t in ref_raw])
    after = torch.arange(77) > closing_eos[:, None]
    assert torch.equal(zero[~after], ours[~after]) and (zero[after] == 0).all()


def test_truncation_and_shapes():
    ids = tok.tokenize(["photorealistic " * 60, ""], context_length=77)
    assert ids[0, 0] == tok.BOS and ids[0, 76] == tok.EOS and (ids[0, 1:76] != tok.EOS).all()
    assert ids[1, :2].tolist() == [tok.BOS, tok.EOS]
    short = tok.tokenize("a photo of a cat", context_length=5)
    assert short.tolist() == [[49406, 320, 1125, 539, 49407]]
    assert tok.decode(tok.tokenize("Hello, World! café 42")[0]) == "hello , world ! café 4 2"
    with pytest.raises(ValueError, match="pad"):
        tok.tokenize("x", pad="left")
    with pytest.raises(ValueError, match="context_length"):
        tok.tokenize("x", context_length=1)
    with pytest.raises(TypeError):
        tok.tokenize(["x", 3])


def reference_bpe_tokens(text: str, vocab: dict[str, int], merges: list[tuple[str, str]]) -> list[int]:
    """An independent oracle: the BPE of the CLIP paper's tokenizer, written out in plain Python
    (HF-style normalization: no ftfy/html unescape, which the TRICKY strings below do not exercise)."""
    import unicodedata

    ranks = {m: i for i, m in enumerate(merges)}
    byte_char = tok.bytes_to_unicode()
    text = " ".join(unicodedata.normalize("NFC", text).split()).lower()
    ids = []
    for word in regex.findall(tok.CLIP_SPLIT_PATTERN, text):
        symbols = [byte_char[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        while len(symbols) > 1:
            pairs = [
                (ranks.get((a, b), len(ranks)), i)
                for i, (a, b) in enumerate(zip(symbols[:-1], symbols[1:], strict=True))
            ]
            rank, _ = min(pairs)
            if rank == len(ranks):
                break
            a, b = merges[rank]
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids += [vocab[s] for s in symbols]
    return ids


def test_encode_matches_plain_python_bpe():
    vocab, merges = tok.load_vocab()
    texts = [t for t in TRICKY if "<|" not in t]
    assert tok.encode(texts) == [reference_bpe_tokens(t, vocab, merges) for t in texts]


# ----------------------------------------------------------------------------------------------------------
# Numerics against transformers' CLIPTextModel(WithProjection) on a tiny random model.

PROMPTS = ["a photo of a cat", "", "masterpiece, best quality, 8k, a castle on a hill at dusk, 日本"]


def tiny_config(layout: str, **kw) -> CLIPTextConfig:
    act = "quick_gelu" if layout == "openai" else "gelu"
    return CLIPTextConfig(
        layout=layout,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        hidden_act=act,
        projection_dim=48,
        **kw,
    )


def random_model(cfg: CLIPTextConfig, dtype: torch.dtype, seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    model = CLIPTextModel(cfg).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Non-trivial LayerNorm gains (1 +- 0.3) and biases; weight scales keep activations O(1).
            if p.ndim <= 1:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


def hf_model(cfg: CLIPTextConfig, state: dict[str, torch.Tensor], dtype: torch.dtype, attn: str = "eager"):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        hidden_act=cfg.hidden_act,
        layer_norm_eps=cfg.layer_norm_eps,
        projection_dim=cfg.projection_dim,
        bos_token_id=tok.BOS,
        eos_token_id=tok.EOS,
        pad_token_id=tok.EOS,
    )
    hf_cfg._attn_implementation = attn
    model = transformers.CLIPTextModelWithProjection(hf_cfg).to(dtype).eval()
    model.load_state_dict(state, strict=True)
    return model


def openai_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # HF naming = the OpenAI layout under `transformer.`; transformers >= 4.31 no longer stores position_ids.
    return {k.removeprefix("transformer."): v for k, v in sd.items() if not k.endswith("position_ids")}


def openclip_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # diffusers' own single-file converter (splits in_proj into q/k/v, transposes text_projection).
    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

    class _Stub:  # the converter reads only text_model.config.hidden_size, and only without text_projection
        config = None

    return single_file_utils.convert_open_clip_checkpoint(_Stub(), sd, prefix="model.")


def compare(model: CLIPTextModel, hf, ids: torch.Tensor) -> dict[str, float]:
    n = model.config.num_hidden_layers
    with torch.no_grad():
        ref = hf(input_ids=ids, output_hidden_states=True)
        ref_pooled = hf.text_model(input_ids=ids).pooler_output
        out = model(ids)
        penult = model(ids, layer="penultimate", final_norm=False)
        diffs = {
            "last": (out.hidden - ref.last_hidden_state).abs().max().item(),
            "penultimate": (penult.hidden - ref.hidden_states[-2]).abs().max().item(),
            # SD2: the penultimate layer through the final LayerNorm.
            "penultimate_normed": (
                model(ids, layer="penultimate").hidden - hf.text_model.final_layer_norm(ref.hidden_states[-2])
            )
            .abs()
            .max()
            .item(),
            "pooled": (out.pooled - ref_pooled).abs().max().item(),
            "projected": (out.projected - ref.text_embeds).abs().max().item(),
        }
        for k in range(-(n + 1), n + 1):
            h = model(ids, layer=k, final_norm=False, pooled=False).hidden
            diffs[f"layer{k}"] = (h - ref.hidden_states[k]).abs().max().item()
    return diffs


@pytest.mark.parametrize("layout", ["openai", "open_clip"])
@pytest.mark.parametrize(
    "dtype, attn, atol",
    [(torch.float64, "sdpa", 1e-12), (torch.float64, "eager", 2e-6), (torch.float32, "eager", 1e-5)],
)
def test_matches_transformers(layout, dtype, attn, atol):
    # float64 with HF's SDPA path: the same math, only summation order differs (~1e-15). HF's eager path takes
    # the softmax in float32 even for float64 inputs, so float64-eager agrees to float32 rounding (~5e-7).
    # float32: outputs are O(1) after LayerNorm; three 64-wide layers of matmuls and a float32 softmax give
    # a few ulp (~1e-6) of summation-order difference, 1e-5 leaves margin.
    cfg = tiny_config(layout)
    model = random_model(cfg, dtype)
    convert = openai_to_hf if layout == "openai" else openclip_to_hf
    hf = hf_model(cfg, convert(model.state_dict()), dtype, attn)
    pad = "eos" if layout == "openai" else "zero"
    for ids in (tok.tokenize(PROMPTS, pad=pad), tok.tokenize(PROMPTS, context_length=9, pad=pad)):
        diffs = compare(model, hf, ids)
        print(layout, dtype, attn, tuple(ids.shape), f"max abs diff {max(diffs.values()):.2e}")
        assert max(diffs.values()) <= atol, diffs


def test_clip_l_without_projection_matches_transformers_text_model():
    transformers = pytest.importorskip("transformers")
    cfg = dataclasses.replace(tiny_config("openai"), projection_dim=None)
    model = random_model(cfg, torch.float64)
    assert "transformer.text_projection.weight" not in model.state_dict()
    hf = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=cfg.vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
            num_attention_heads=4, eos_token_id=tok.EOS, bos_token_id=tok.BOS, pad_token_id=tok.EOS,
        )
    ).double().eval()  # fmt: skip
    # transformers 4.x keeps `text_model.`; >= 5.6 flattens it away (architectures.md §5).
    hf_keys = set(hf.state_dict())
    state = {}
    for k, v in openai_to_hf(model.state_dict()).items():
        state[k if k in hf_keys else k.removeprefix("text_model.")] = v
    hf.load_state_dict(state, strict=True)
    ids = tok.tokenize(PROMPTS)
    with torch.no_grad():
        ref = hf(input_ids=ids)
        out = model(ids)
    assert out.projected is None
    assert torch.allclose(out.hidden, ref.last_hidden_state, atol=1e-12, rtol=0)
    assert torch.allclose(out.pooled, ref.pooler_output, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# Behaviour.


def test_layer_selection_and_validation():
    cfg = tiny_config("open_clip")
    model = random_model(cfg, torch.float32)
    ids = tok.tokenize(PROMPTS, pad="zero")
    full = model(ids, layer="penultimate", final_norm=False)
    short = model(ids, layer=-2, final_norm=False, pooled=False)  # stops after layer N-1
    assert short.pooled is None and torch.equal(full.hidden, short.hidden)
    assert torch.equal(model(ids, layer=3).hidden, model(ids).hidden)
    assert torch.equal(model(ids, layer=0, final_norm=False).hidden, model.model.embed(ids))
    # Pooling reads the first EOS, so EOS padding and zero padding pool the same state.
    eos_padded = model(tok.tokenize(PROMPTS, pad="eos"))
    assert torch.allclose(eos_padded.pooled, full.pooled, atol=1e-6)
    for bad in ("first", 4, -5, True, 1.0):
        with pytest.raises(ValueError, match="layer"):
            model(ids, layer=bad)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 78, dtype=torch.int64))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 7))
    with pytest.raises(ValueError, match="layout"):
        CLIPTextConfig(layout="hf")
    with pytest.raises(ValueError, match="projection_dim"):
        CLIPTextConfig(layout="open_clip")


def test_dtype_follows_weights():
    model = random_model(tiny_config("openai"), torch.bfloat16)
    out = model(tok.tokenize(PROMPTS))
    assert out.hidden.dtype == out.pooled.dtype == out.projected.dtype == torch.bfloat16
    assert out.hidden.shape == (3, 77, 64) and out.pooled.shape == (3, 64) and out.projected.shape == (3, 48)
