"""SD3's T5-XXL encoder (latentforge/models/t5.py), its tokenizer (latentforge/t5_tokenizer.py), loading it
and the SD3 conditioning with it, against transformers' `T5EncoderModel` and T5 tokenizer as the reference."""

import random
import warnings

import pytest
import torch
import transformers
from tokenizers import SentencePieceUnigramTokenizer, processors

from latentforge import conditioning, families, t5_tokenizer
from latentforge.checkpoints import load_checkpoint, save_checkpoint, save_state_dict
from latentforge.cli import main as cli_main
from latentforge.models import AutoencoderKLConfig, CLIPTextConfig, MMDiTConfig, UNetConfig
from latentforge.models.t5 import (
    PRESETS,
    T5Config,
    T5Encoder,
    canonical_keys,
    config_from_state_dict,
    relative_position_bucket,
)
from latentforge.pipeline import Pipeline
from latentforge.t5_tokenizer import T5Tokenizer
from latentforge.tokenizer import PromptTruncatedWarning

FP16_EPS = 2.0**-11  # float16's unit roundoff


def hf_config(c: T5Config) -> transformers.T5Config:
    return transformers.T5Config(
        vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_kv, d_ff=c.d_ff, num_layers=c.num_layers,
        num_heads=c.num_heads, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        relative_attention_num_buckets=c.relative_attention_num_buckets,
        relative_attention_max_distance=c.relative_attention_max_distance,
    )  # fmt: skip


def reference(c: T5Config, seed: int = 0, state: dict | None = None) -> transformers.T5EncoderModel:
    torch.manual_seed(seed)
    hf = transformers.T5EncoderModel(hf_config(c)).eval()
    if state is not None:
        hf.load_state_dict(state)
    return hf


def ours(c: T5Config, state: dict, dtype=torch.float32) -> T5Encoder:
    """Loaded from transformers' state_dict() names (the released file's), the tied alias included."""
    m = T5Encoder(c)
    m.transformer.load_state_dict(canonical_keys(state), strict=True)
    return m.to(dtype).eval()


def ids_for(c: T5Config, length: int = 150, seed: int = 1) -> torch.Tensor:
    # 150 > max_distance 128: the far buckets are used too
    return torch.randint(0, c.vocab_size, (2, length), generator=torch.Generator().manual_seed(seed))


# -- the network --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("buckets", "max_distance"), [(32, 128), (8, 20), (64, 256)])
def test_relative_position_bucket_matches_transformers(buckets, max_distance):
    rel = torch.arange(-400, 401)[None, :] - torch.arange(0, 5)[:, None]  # offsets −404 … 400
    ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        rel, bidirectional=True, num_buckets=buckets, max_distance=max_distance
    )
    got = relative_position_bucket(rel, buckets, max_distance)
    assert torch.equal(got, ref) and got.dtype == torch.int64
    assert got.min() == 0 and got.max() == buckets - 1


@torch.no_grad()
def test_float32_matches_transformers():
    c = PRESETS["tiny"]
    hf = reference(c)
    ids = ids_for(c)
    ref = hf(input_ids=ids).last_hidden_state
    out = ours(c, hf.state_dict())(ids)
    assert out.dtype == torch.float32 and out.shape == (2, 150, c.d_model)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@torch.no_grad()
def test_half_storage_is_as_close_as_transformers_own_half(dtype):
    """Both sides hold the same weights rounded to `dtype`, so only the arithmetic differs. Every matmul
    input is rounded to `dtype` (relative error u = 2⁻¹¹ for float16, 2⁻⁸ for bfloat16) and the error grows
    over the 3 layers' ~8 rounded products: 8u of the output's scale bounds it (measured: ~1.5u for both);
    and it must be no worse than transformers' own run in `dtype` (measured ~2.5–3.5u), which keeps the
    residual stream in `dtype`."""
    c = PRESETS["tiny"]
    u = {torch.float16: FP16_EPS, torch.bfloat16: 2.0**-8}[dtype]
    state = {k: v.to(dtype).float() for k, v in reference(c, seed=2).state_dict().items()}
    ref = reference(c, state=state)
    ids = ids_for(c)
    r = ref(input_ids=ids).last_hidden_state
    out = ours(c, state, dtype)(ids)
    assert out.dtype == dtype
    err = (out.float() - r).abs().max()
    half = reference(c, state=state).to(dtype)
    err_hf = (half(input_ids=ids).last_hidden_state.float() - r).abs().max()
    assert err <= 8 * u * r.abs().max()
    assert err <= err_hf


@torch.no_grad()
def test_float16_feed_forward_does_not_overflow():
    """Feed-forward weights scaled so that the float32 residual stream passes float16's 65504 (T5 v1.1's
    known fp16 overflow): transformers in float16 gives NaN; here the residual stream and the gated product
    are float32, and the output stays within the float16 tolerance above."""
    c = PRESETS["tiny"]
    state = {k: v.half().float() for k, v in reference(c).state_dict().items()}
    for k in state:
        if "DenseReluDense.wi" in k:
            state[k] = (state[k] * 300).half().float()
    ref = reference(c, state=state)
    ids = ids_for(c, 40)
    r = ref(input_ids=ids, output_hidden_states=True)
    assert max(h.abs().max() for h in r.hidden_states) > torch.finfo(torch.float16).max
    assert not torch.isfinite(reference(c, state=state).half()(input_ids=ids).last_hidden_state).all()
    out = ours(c, state, torch.float16)(ids).float()
    assert torch.isfinite(out).all()
    r = r.last_hidden_state
    assert (out - r).abs().max() <= 8 * FP16_EPS * r.abs().max()


def test_t5xxl_preset_has_the_released_keys_and_shapes():
    with torch.device("meta"):
        m = T5Encoder(PRESETS["t5xxl"])
        hf = transformers.T5EncoderModel(transformers.T5Config.from_dict(_T5_V1_1_XXL))
    ref = {"transformer." + k: tuple(v.shape) for k, v in canonical_keys(hf.state_dict()).items()}
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert got == ref
    assert got["transformer.shared.weight"] == (32128, 4096)
    assert got["transformer.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] == (32, 64)
    assert "transformer.encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" not in got
    assert sum(v.numel() for v in m.parameters()) == 4_762_310_656  # architectures.md: "about 4.762B"
    assert config_from_state_dict(m.state_dict()) == PRESETS["t5xxl"]


# google/t5-v1_1-xxl config.json (the fields that shape the encoder)
_T5_V1_1_XXL = dict(
    d_ff=10240, d_kv=64, d_model=4096, num_heads=64, num_layers=24, vocab_size=32128,
    feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, tie_word_embeddings=False,
)  # fmt: skip


def test_config_is_read_from_the_weights_and_checked():
    c = T5Config(vocab_size=300, d_model=24, d_kv=5, d_ff=40, num_layers=2, num_heads=3)
    sd = {"transformer." + k: v for k, v in T5Encoder(c).transformer.state_dict().items()}
    assert config_from_state_dict(sd) == c
    alias = {k.replace("shared.", "encoder.embed_tokens."): v for k, v in sd.items()}
    assert config_from_state_dict(canonical_keys(alias, "transformer.")) == c
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        T5Config(num_heads=0)
    with pytest.raises(ValueError, match="token ids must be in"):
        T5Encoder(c)(torch.tensor([[300]]))


# -- the tokenizer ------------------------------------------------------------------------------------------

_WORDS = (
    "a photo of an astronaut riding horse on the moon red green blue yellow cat dog circle square triangle "
    "small large big tiny left right above below next to with without painting oil sketch watercolor night "
    "day forest city street river mountain portrait of woman man child old young smiling standing sitting"
).split()


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    """A Unigram vocabulary trained here with `tokenizers` (the T5 layout: <pad> 0, </s> 1, <unk> 2; an EOS
    post-processor, as google/t5-v1_1-xxl's tokenizer.json has), saved as tokenizer.json."""
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(_WORDS) for _ in range(12)) for _ in range(400)]
    corpus += ["Hello, world! 123 4567 photo-realistic, 8k, (masterpiece), ünïcödé."]
    spm = SentencePieceUnigramTokenizer()
    spm.train_from_iterator(
        corpus,
        vocab_size=300,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        show_progress=False,
    )
    tok = spm._tokenizer
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    path = tmp_path_factory.mktemp("t5tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def sd3_reference_ids(hf, text: str, min_length: int = 77) -> list[int]:
    """Stability-AI/sd3.5 other_impls.py: SD3Tokenizer gives T5 text[:226]; SDTokenizer(has_start_token=False,
    pad_with_end=False, min_length=77) tokenizes each space-separated word and drops its EOS, appends EOS,
    pads with 0."""
    words = [w for w in text[:226].replace("\n", " ").split(" ") if w]
    ids = [t for w in words for t in hf(w)["input_ids"][:-1]]
    ids.append(1)
    return ids + [0] * (min_length - len(ids))


PROMPTS = [
    "a photo of an astronaut riding a horse on the moon",
    "a  red\ncircle,   left of a blue square",
    "",
    "Hello, world! 8k (masterpiece) ünïcödé zebra",  # zebra: letters the vocabulary spells piece by piece
]


def test_tokenizer_matches_transformers(tokenizer_json):
    hf = transformers.T5Tokenizer(tokenizer_file=str(tokenizer_json))  # T5TokenizerFast in transformers 4
    tok = T5Tokenizer.from_file(tokenizer_json)
    ids = tok(PROMPTS)
    assert ids.shape == (4, 77) and ids.dtype == torch.int64
    for row, text in zip(ids.tolist(), PROMPTS, strict=True):
        assert row == sd3_reference_ids(hf, text)
        # the same as the whole text through the HF tokenizer: EOS appended, padded to 77
        assert row == hf(text, padding="max_length", max_length=77)["input_ids"]
    assert ids[2].tolist() == [1] + [0] * 76  # the empty prompt: EOS only
    assert T5Tokenizer.from_file(tokenizer_json.parent)(PROMPTS[0]).tolist() == ids[:1].tolist()  # a folder


def test_tokenizer_lengths_and_cuts(tokenizer_json):
    hf = transformers.T5Tokenizer(tokenizer_file=str(tokenizer_json))
    tok = T5Tokenizer.from_file(tokenizer_json)
    long = " ".join(["cat"] * 60)  # 240 characters: cut at 226, 57 words and a partial one
    with pytest.warns(PromptTruncatedWarning, match="first 226 characters"):
        ids = tok([long, "a cat"])
    n = len(sd3_reference_ids(hf, long, 0))
    assert n > 77 and ids.shape == (2, n)  # padded to the longest, not cut at 77
    assert ids[0].tolist() == sd3_reference_ids(hf, long, 0)
    assert ids[1].tolist() == sd3_reference_ids(hf, "a cat", n)
    assert tok(["a cat"], min_length=90).shape == (1, 90)
    assert tok.length(long) == n and tok.length("") == 1
    ellipses = "…" * 200  # NFKC makes each "...": 3 tokens a character, more than 256 in all
    with pytest.warns(PromptTruncatedWarning, match="more than the 255"):
        ids = tok(ellipses)
    assert ids.shape == (1, 256) and ids[0, -1] == 1 and (ids[0, :-1] != 0).all()


def test_tokenizer_errors(tokenizer_json, tmp_path):
    with pytest.raises(ValueError, match=r"not a T5 tokenizer: </s> has id"):
        bad = SentencePieceUnigramTokenizer()
        bad.train_from_iterator(["a b c"], vocab_size=20, special_tokens=["<pad>", "<unk>", "</s>"])
        T5Tokenizer(bad._tokenizer)
    (tmp_path / "spiece.model").write_bytes(b"\x0a\x00")
    with pytest.raises(ValueError, match=r"spiece\.model.*`protobuf`.*sentencepiece.*tokenizer\.json"):
        T5Tokenizer.from_file(tmp_path / "spiece.model")
    with pytest.raises(ValueError, match="sentencepiece"):
        T5Tokenizer.from_file(tmp_path)  # a folder with a spiece.model only
    ckpt = tmp_path / "sd3.safetensors"
    with pytest.raises(FileNotFoundError) as e:
        t5_tokenizer.load(None, [str(tmp_path / "t5" / "t5xxl.safetensors"), str(ckpt)])
    msg = str(e.value)
    for place in ("t5/tokenizer.json", "t5/tokenizer_3/tokenizer.json", f"{tmp_path}/tokenizer.json"):
        assert place in msg
    assert "spiece.model" in msg and "--t5-tokenizer" in msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        t5_tokenizer.load(str(tmp_path / "nope.json"), [])
    found = t5_tokenizer.load(None, [str(tokenizer_json.parent / "any.safetensors")])
    assert found.source == str(tokenizer_json)


# -- loading and the SD3 conditioning ------------------------------------------------------------------------

CLIP_L = CLIPTextConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32
)
CLIP_G = CLIPTextConfig(
    hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, hidden_act="gelu",
    projection_dim=40,
)  # fmt: skip
TINY_SD3 = {
    "mmdit": MMDiTConfig(depth=2, adm_in_channels=72, context_dim=96, pos_embed_max_size=8, num_patches=64),
    "vae": AutoencoderKLConfig(
        ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=16, embed_dim=16, use_quant_conv=False
    ),
    "clip_l": CLIP_L,
    "clip_g": CLIP_G,
}
# d_model = the tiny MMDiT's context width
T5_TINY = T5Config(vocab_size=320, d_model=96, d_kv=8, d_ff=64, num_layers=2, num_heads=4)


@pytest.fixture(scope="module")
def sd3(tokenizer_json):
    torch.manual_seed(0)
    pipe = Pipeline.from_preset("sd3-medium", {**TINY_SD3, "t5xxl": T5_TINY})
    with torch.no_grad():  # zero-initialised layers filled, so outputs depend on the conditioning
        for p in pipe.net.parameters():
            if (p == 0).all():
                p.normal_(0, 0.05)
    pipe.components["t5xxl"].tokenizer = T5Tokenizer.from_file(tokenizer_json)
    return pipe


@torch.no_grad()
def test_sd3_conditioning_with_t5(sd3):
    t5 = sd3.components["t5xxl"]
    cond = sd3.encode_prompt(["a red cat", "(a dog:1.3) BREAK on the moon"], 32, 32)
    assert cond["context"].shape == (2, 2 * 77 + 77, 96)  # BREAK: two CLIP chunks, then 77 T5 tokens
    ref = t5(t5.tokenizer(["a red cat", "a dog on the moon"]))  # T5 reads the text without the syntax
    torch.testing.assert_close(cond["context"][:, 2 * 77 :], ref, rtol=0, atol=0)
    no_t5 = {k: v for k, v in sd3._text_encoders().items() if k != "t5xxl"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the zeros-for-T5 warning, tested below
        lg = families.encode("sd3-medium", no_t5, ["a red cat"], 32, 32, net_config=sd3.net.config)["context"]
    torch.testing.assert_close(cond["context"][:1, :77], lg[:, :77], rtol=0, atol=0)  # CLIP as before
    literal = sd3.encode_prompt(["(a dog:1.3)"], 32, 32, weighting="none")["context"][:, 77:]
    torch.testing.assert_close(literal, t5(t5.tokenizer(["(a dog:1.3)"])), rtol=0, atol=0)


@torch.no_grad()
def test_sd3_long_t5_prompt_and_its_negative_have_one_length(sd3):
    enc = sd3._text_encoders()
    long = " ".join(["zebra"] * 30)  # each spelled in several pieces: more than 77 T5 tokens
    n = enc["t5xxl"].tokenizer.length(long)
    assert n > 77
    cond, uncond = families.encode_pair("sd3-medium", enc, [long], [""], 32, 32, sd3.net.config)
    assert cond["context"].shape == uncond["context"].shape == (1, 77 + n, 96)
    empty = families.encode("sd3-medium", enc, [""], 32, 32, net_config=sd3.net.config)["context"]
    assert empty.shape == (1, 77 + 77, 96)
    images = sd3.sample(long, steps=1, width=32, height=32, cfg=3.0, progress=False)  # CFG batches both
    assert len(images) == 1


@torch.no_grad()
def test_sd3_without_t5_gives_zeros_and_warns_once(sd3, monkeypatch):
    monkeypatch.setattr(conditioning, "_no_t5_warned", False)
    enc = {k: v for k, v in sd3._text_encoders().items() if k != "t5xxl"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            ctx = families.encode("sd3-medium", enc, ["a cat", "a dog"], 32, 32, net_config=sd3.net.config)
    assert [str(w.message) for w in caught if "T5" in str(w.message)] == [
        "no T5-XXL text encoder: the T5 part of the SD3 context is zeros, so prompts are followed less well; "
        "give one with t5=PATH (--t5 t5xxl_fp16.safetensors) and its tokenizer.json"
    ]
    assert ctx["context"].shape == (2, 154, 96) and ctx["context"][:, 77:].eq(0).all()
    t5 = T5Encoder(T5_TINY)
    with pytest.raises(ValueError, match="has no tokenizer"):
        families.encode("sd3-medium", {**enc, "t5xxl": t5}, ["a"], 32, 32, net_config=sd3.net.config)


def test_checkpoint_with_t5_inside(sd3, tokenizer_json, tmp_path):
    path = str(tmp_path / "sd3.safetensors")
    save_checkpoint(path, "sd3-medium", sd3.components, sd3.configs)
    with pytest.warns(UserWarning, match=r"holds a T5-XXL, which is not loaded: no T5 tokenizer found"):
        bare = load_checkpoint(path)
    assert "t5xxl" not in bare.components and "text_encoders.t5xxl.transformer.shared.weight" in bare.dropped
    loaded = load_checkpoint(path, t5_tokenizer=str(tokenizer_json))
    t5 = loaded.components["t5xxl"]
    assert loaded.configs["t5xxl"] == T5_TINY and t5.tokenizer.source == str(tokenizer_json)
    for k, v in sd3.components["t5xxl"].state_dict().items():
        assert torch.equal(t5.state_dict()[k], v), k
    (tmp_path / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())  # beside the checkpoint
    half = load_checkpoint(path, dtype=torch.float16)
    assert half.components["t5xxl"].transformer.shared.weight.dtype == torch.float16
    assert half.components["t5xxl"].tokenizer is not None


def test_separate_t5_file_in_transformers_names(sd3, tokenizer_json, tmp_path, capsys):
    main = str(tmp_path / "sd3.safetensors")
    nets = {k: v for k, v in sd3.components.items() if k != "t5xxl"}
    save_checkpoint(main, "sd3-medium", nets, {k: v.config for k, v in nets.items()})
    hf = reference(T5_TINY, seed=5)
    folder = tmp_path / "te"
    folder.mkdir()
    t5_file = str(folder / "t5xxl_fp16.safetensors")
    state = {k: v.half() for k, v in hf.state_dict().items()}
    state["encoder.embed_tokens.weight"] = state["encoder.embed_tokens.weight"].clone()  # stored twice
    save_state_dict(state, t5_file)
    with pytest.raises(FileNotFoundError, match=r"t5xxl_fp16\.safetensors: no T5 tokenizer found: looked at"):
        load_checkpoint(main, text_encoders={"t5xxl": t5_file})
    (folder / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    pipe = Pipeline.from_single_file(main, t5=t5_file)
    t5 = pipe.components["t5xxl"]
    assert pipe.configs["t5xxl"] == T5_TINY
    ids = ids_for(T5_TINY, 20)
    with torch.no_grad():
        ref = reference(T5_TINY, state={k: v.float() for k, v in state.items()})(input_ids=ids)
        torch.testing.assert_close(t5(ids), ref.last_hidden_state, rtol=0, atol=1e-5)
    out = str(tmp_path / "out")
    argv = ["generate", "a cat", "--model", main, "--t5", t5_file, "--steps", "1", "--quiet"]
    assert cli_main([*argv, "--width", "32", "--height", "32", "--out", out]) == 0
    assert cli_main([*argv, "--t5-tokenizer", str(tmp_path / "no.json")]) == 2
    assert "--t5-tokenizer" in capsys.readouterr().err
    # strict: a missing and an unexpected key are named
    del state["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    state["encoder.block.1.layer.1.DenseReluDense.wx.weight"] = torch.zeros(1)
    save_state_dict(state, t5_file)
    with pytest.raises(ValueError) as e:
        load_checkpoint(main, text_encoders={"t5xxl": t5_file})
    msg = str(e.value)
    assert "t5xxl_fp16.safetensors: component 't5xxl' does not match its network" in msg
    assert "transformer.encoder.block.1.layer.1.DenseReluDense.wo.weight" in msg
    assert "transformer.encoder.block.1.layer.1.DenseReluDense.wx.weight" in msg
    with pytest.raises(ValueError, match=r"sd15 has no text encoder 't5xxl'"):
        sd15 = str(tmp_path / "sd15.safetensors")
        save_checkpoint(sd15, "sd15", Pipeline.from_preset("sd15", _TINY_SD15).components, _TINY_SD15)
        load_checkpoint(sd15, text_encoders={"t5xxl": t5_file})


_TINY_SD15 = {
    "unet": UNetConfig(
        model_channels=32, channel_mult=(1,), attention_resolutions=(), num_res_blocks=1,
        num_head_channels=16, context_dim=32,
    ),
    "vae": AutoencoderKLConfig(ch=32, ch_mult=(1,), num_res_blocks=1),
    "clip_l": CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    ),
}  # fmt: skip
