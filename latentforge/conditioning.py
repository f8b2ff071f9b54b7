"""From prompts to the conditioning dict each family's network takes, one small function per family.

Sources: architectures.md §1.5 (SD1/SD2/SDXL: ldm `FrozenCLIPEmbedder`, `FrozenOpenCLIPEmbedder`, sgm
`GeneralConditioner`), §4.2 (SD3: `sd3_infer.py` `get_cond`), §3 (DiT class labels).

    family        encoders          network kwargs
    sd15          clip_l            context [B, 77, 768]     last layer, final LN, EOS padding
                                    context_mask [B, 77]     only for a UNet with mask_text_padding
    sd21          clip_h            context [B, 77, 1024]    penultimate, final LN (ln_final), zero padding
    sdxl-base     clip_l, clip_g    context [B, 77, 2048]    L ‖ G, both penultimate without final LN
                                    y [B, 2816]              G projected pooled ‖ size/crop/size embeddings
    sdxl-refiner  clip_g            context [B, 77, 1280], y [B, 2560] (aesthetic score 6.0 / 2.5 negative)
    sd3, sd35     clip_l, clip_g    context [B, 77 + T, 4096]  (L ‖ G zero-padded to 4096) then T ≥ 77 T5
                  [, t5xxl]                                  tokens (77 zeros without a T5 encoder)
                                    y [B, 2048]              L pooled (unprojected) ‖ G projected pooled
    dit           (none)            y [B] long               class index; the null class = num_classes
    dit-text,     clip_l            context [B, L, D], y [B, D]  last layer + final LN, EOS pooled
    mmdit-text

Every function has the signature the `Family` entries (families.py) call:
`(encoders, prompts, width, height, negative, net) -> kwargs`, with `net` the denoising network's config.
The unconditional branch is the encoded empty prompt (`CompVis txt2img.py`, A1111, ComfyUI, sd3_infer), not
sgm's zeroed embeddings or diffusers' `force_zeros_for_empty_prompt`.

Prompts go through `latentforge.prompts` (A1111's emphasis syntax and BREAK): every CLIP tower encodes each
prompt in chunks of max_position_embeddings - 2 tokens, each chunk with its own BOS/EOS/padding, and
concatenates the chunks' hidden states along the sequence ([B, n·77, D] for n chunks; nothing is cut);
the pooled output is the first chunk's (A1111 `sd_hijack_clip`, ComfyUI `encode_token_weights`). The
prompts of one call are padded with empty chunks to the longest; `pad_chunks(n)` pads them to at least n
(so the prompt and the negative prompt batch together: `families.encode_pair`). `weighting` applies the
weights as A1111 ("a1111": scale, restore the mean) or ComfyUI ("comfy": from the empty prompt), or reads
the text literally ("none"). A prompt without syntax that fits one chunk gives exactly the tensors of a
plain `tokenize` + encoder call.

Textual inversion: within `use_embeddings(ti)` the words of a prompt that name one of `ti`'s embeddings
(latentforge/textual_inversion.py) take that embedding's n positions in the chunks (prompts.py), and its
vectors for this tower replace those positions' token embeddings at the encoder's input (models/text.py
`TokenOverride`; A1111 `EmbeddingsWithFixes`). Each tower takes its own vectors (an SDXL pair's clip_l and
clip_g); vectors of the wrong width are refused.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings

import torch
import torch.nn.functional as F

from latentforge import prompts as prompt_syntax
from latentforge import t5_tokenizer, tokenizer
from latentforge.models.text import CLIPTextModel, CLIPTextOutput, TokenOverride
from latentforge.models.unet import sdxl_refiner_vector, sdxl_vector
from latentforge.textual_inversion import TextualInversions

# sgm's refiner conditioner: aesthetic_score 6.0 for the prompt, 2.5 for the negative
# (generative-models `sampling.py` / A1111 `sdxl_refiner_low_aesthetic_score`).
REFINER_AESTHETIC_POSITIVE = 6.0
REFINER_AESTHETIC_NEGATIVE = 2.5
# Without a T5 encoder the T5 half of the SD3 context is zeros (diffusers' StableDiffusion3Pipeline does the
# same when text_encoder_3 is None, with 256 tokens); 77 keeps the usual 154-token context.
T5_ZERO_TOKENS = 77
SD3_CONTEXT_DIM = 4096  # T5-XXL d_model: the width of the SD3 context
_no_t5_warned = False  # the zeros-instead-of-T5 warning is given once per process


def _encoder(encoders: dict, name: str, family: str) -> CLIPTextModel:
    enc = encoders.get(name)
    if enc is None:
        raise ValueError(f"{family} needs the text encoder {name!r}; got {sorted(encoders)}")
    return enc


_MIN_CHUNKS: contextvars.ContextVar[int] = contextvars.ContextVar("latentforge_min_chunks", default=1)


@contextlib.contextmanager
def pad_chunks(n: int):
    """Within this block every CLIP encoding has at least `n` chunks (empty ones appended), so the prompt's
    and the negative prompt's contexts have the same length (A1111 pads the shorter with empty chunks)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the chunk count must be an int >= 1, got {n!r}")
    token = _MIN_CHUNKS.set(n)
    try:
        yield
    finally:
        _MIN_CHUNKS.reset(token)


_T5_LENGTH: contextvars.ContextVar[int] = contextvars.ContextVar("latentforge_t5_length", default=0)


def _t5_texts(prompts: list[str], weighting: str) -> list[str]:
    """What T5 reads of each prompt: its first 226 characters (SD3Tokenizer cuts the raw text), with A1111's
    emphasis syntax removed and BREAK dropped (a CLIP chunk marker); the weights do not apply to T5 (the
    reference's T5XXLModel encodes the tokens only). Runs are joined with a space: the reference tokenizes
    each weighted run's words on their own. weighting "none": the literal text."""
    texts = [t5_tokenizer.cut(p) for p in prompts]
    if prompt_syntax.check_weighting(weighting) == "none":
        return texts
    parsed = (prompt_syntax.parse_attention(t) for t in texts)
    return [" ".join(t for t, w in runs if not prompt_syntax.is_break((t, w))) for runs in parsed]


def t5_length(encoders: dict, prompts: list[str], weighting: str = "a1111") -> int:
    """The most T5 tokens (with EOS) any of `prompts` takes; 0 without a T5 encoder and its tokenizer."""
    t5 = encoders.get("t5xxl")
    tok = getattr(t5, "tokenizer", None)
    if tok is None:
        return 0
    return max((tok.length(t) for t in _t5_texts(prompts, weighting)), default=0)


@contextlib.contextmanager
def same_t5_length(encoders: dict, prompts: list[str], weighting: str = "a1111"):
    """Within this block every T5 encoding has at least as many tokens as the longest of `prompts` (padded
    with <pad>, which the reference pads with up to 77 too), so that the prompt's and the negative prompt's
    contexts have the same length for classifier-free guidance, like `pad_chunks` for the CLIP chunks."""
    token = _T5_LENGTH.set(max(_T5_LENGTH.get(), t5_length(encoders, prompts, weighting)))
    try:
        yield
    finally:
        _T5_LENGTH.reset(token)


def _t5_context(encoders: dict, prompts: list[str], weighting: str, like: torch.Tensor) -> torch.Tensor:
    """SD3's T5 part [B, T, context width] in `like`'s dtype and device: the T5 encoder's last hidden state
    after its final norm (T5XXLModel layer="last"), T = max(77, the longest prompt, `same_t5_length`); zeros
    [B, 77, width] without a T5 encoder, with a warning (once)."""
    global _no_t5_warned
    B, width = like.shape[0], like.shape[-1]
    t5 = encoders.get("t5xxl")
    if t5 is None:
        if not _no_t5_warned:
            _no_t5_warned = True
            warnings.warn(
                "no T5-XXL text encoder: the T5 part of the SD3 context is zeros, so prompts are followed "
                "less well; give one with t5=PATH (--t5 t5xxl_fp16.safetensors) and its tokenizer.json",
                stacklevel=4,
            )
        return like.new_zeros(B, T5_ZERO_TOKENS, width)
    if t5.tokenizer is None:
        raise ValueError(
            "the T5-XXL encoder has no tokenizer: set encoder.tokenizer = t5_tokenizer.T5Tokenizer.from_file("
            "'tokenizer.json') (checkpoints.load_checkpoint does it)"
        )
    if t5.config.d_model != width:
        raise ValueError(f"the T5 encoder is {t5.config.d_model} wide, the SD3 context {width}")
    length = max(t5_tokenizer.MIN_LENGTH, _T5_LENGTH.get())
    ids = t5.tokenizer(_t5_texts(prompts, weighting), min_length=length)  # [B, T]
    out = t5(ids.to(next(t5.parameters()).device))  # [B, T, width]
    return out.to(device=like.device, dtype=like.dtype)


_ONE_CHUNK: contextvars.ContextVar[bool] = contextvars.ContextVar("latentforge_one_chunk", default=False)


@contextlib.contextmanager
def first_chunk_only():
    """Within this block every prompt is encoded as its first chunk only (the rest is cut, with a
    PromptTruncatedWarning): what training does (kohya's default), so that every caption's context has the
    same length whatever the batch holds, and a rank's share of a batch encodes as it does in the whole."""
    token = _ONE_CHUNK.set(True)
    try:
        yield
    finally:
        _ONE_CHUNK.reset(token)


_EMBEDDINGS: contextvars.ContextVar[TextualInversions | None] = contextvars.ContextVar(
    "latentforge_embeddings", default=None
)


@contextlib.contextmanager
def use_embeddings(embeddings: TextualInversions | None):
    """Within this block prompts may name the textual inversion `embeddings` (None: none, the default)."""
    if embeddings is not None and not isinstance(embeddings, TextualInversions):
        raise TypeError(f"embeddings must be a TextualInversions or None, got {type(embeddings).__name__}")
    token = _EMBEDDINGS.set(embeddings)
    try:
        yield
    finally:
        _EMBEDDINGS.reset(token)


def _prompt_chunks(enc: CLIPTextModel, prompts: list[str], weighting: str) -> list[list[prompt_syntax.Chunk]]:
    chunk_len = enc.config.max_position_embeddings - 2  # 75 for CLIP's 77 positions
    emphasis = prompt_syntax.check_weighting(weighting) != "none"
    ti = _EMBEDDINGS.get()
    split = ti.split_words if ti is not None else None
    out = [
        prompt_syntax.chunks(p, tokenizer.encode, chunk_len, emphasis=emphasis, split_words=split)
        for p in prompts
    ]
    if _ONE_CHUNK.get():
        for p, c in zip(prompts, out, strict=True):
            if len(c) > 1:
                warnings.warn(
                    f"a caption of {len(c)} chunks is cut to its first {chunk_len} tokens: {p[:80]!r}",
                    tokenizer.PromptTruncatedWarning,
                    stacklevel=3,
                )
        out = [c[:1] for c in out]
    return out


def chunk_count(encoders: dict, prompts: list[str], weighting: str = "a1111") -> int:
    """The most chunks any of `prompts` needs in any of the CLIP `encoders` (1 without encoders)."""
    counts = [
        len(c)
        for enc in encoders.values()
        if isinstance(enc, CLIPTextModel)
        for c in _prompt_chunks(enc, prompts, weighting)
    ]
    return max(counts, default=1)


def _override(
    per_prompt: list[list[prompt_syntax.Chunk]], n: int, encoder: str, width: int
) -> TokenOverride | None:
    """The embeddings' vectors at their positions in the [B·n, L] ids (chunk k of prompt b is row b·n + k;
    a chunk's token i is at position 1 + i, after BOS), rows and positions in increasing order."""
    ti = _EMBEDDINGS.get()
    if ti is None or not any(c.fixes for chunks in per_prompt for c in chunks):
        return None
    rows, cols, vectors = [], [], []
    for b, chunks in enumerate(per_prompt):
        for k, chunk in enumerate(chunks[:n]):
            for offset, name in chunk.fixes:
                vec = ti.get(name).for_encoder(encoder, width)  # [m, D]
                rows += [b * n + k] * len(vec)
                cols += range(1 + offset, 1 + offset + len(vec))
                vectors.append(vec)
    long = torch.int64
    return TokenOverride(torch.tensor(rows, dtype=long), torch.tensor(cols, dtype=long), torch.cat(vectors))


def _encode(
    enc: CLIPTextModel,
    encoder: str,
    prompts: list[str],
    pad: str,
    layer: str,
    final_norm: bool,
    pooled: bool,
    weighting: str,
    n: int | None = None,
) -> tuple[CLIPTextOutput, torch.Tensor]:
    """Chunked, weighted encoding: hidden [B, n·L, D] (L = max_position_embeddings), pooled / projected
    from each prompt's first chunk, and the tokens that are not padding [B, n·L] bool (each chunk's BOS, its
    tokens and its EOS). encoder: the tower's name ("clip_l", "clip_g", "clip_h"), which picks an
    embedding's vectors. n: the chunk count (default: the most any prompt needs, at least the `pad_chunks`
    count)."""
    device = next(enc.parameters()).device
    L = enc.config.max_position_embeddings
    per_prompt = _prompt_chunks(enc, prompts, weighting)
    n = 1 if _ONE_CHUNK.get() else max(n or 1, _MIN_CHUNKS.get(), *(len(c) for c in per_prompt))
    pad_id = tokenizer.EOS if pad == "eos" else 0
    rows = [prompt_syntax.chunk_ids(c, n, L, tokenizer.BOS, tokenizer.EOS, pad_id) for c in per_prompt]
    ids = torch.cat([r[0] for r in rows]).to(device)  # [B·n, L], prompt-major
    weights = torch.cat([r[1] for r in rows])  # [B·n, L]
    override = _override(per_prompt, n, encoder, enc.config.hidden_size)
    out = enc(ids, layer=layer, final_norm=final_norm, pooled=pooled, override=override)
    hidden = out.hidden
    if weighting != "none" and not bool((weights == 1).all()):
        z_empty = None
        if weighting == "comfy":  # the empty prompt at the same layer (ComfyUI's gen_empty_tokens)
            empty = tokenizer.tokenize([""], L, pad=pad).to(device)
            z_empty = enc(empty, layer=layer, final_norm=final_norm, pooled=False).hidden[0]  # [L, D]
        hidden = prompt_syntax.apply_weights(hidden, weights, weighting, z_empty)
    B = len(prompts)
    hidden = hidden.reshape(B, n * L, hidden.shape[-1])
    eos = (ids == tokenizer.EOS).int().argmax(dim=-1)  # [B·n]: each chunk's first EOS
    keep = (torch.arange(L, device=ids.device) <= eos[:, None]).reshape(B, n * L)  # [B, n·L]
    if not pooled:
        return CLIPTextOutput(hidden, None, None), keep
    first = torch.arange(B, device=hidden.device) * n  # each prompt's first chunk
    projected = out.projected[first] if out.projected is not None else None
    return CLIPTextOutput(hidden, out.pooled[first], projected), keep


def _chunks_for(encoders: dict, names: tuple[str, ...], prompts: list[str], weighting: str) -> int:
    """One chunk count for towers that are concatenated on channels (SDXL, SD3: L ‖ G)."""
    return chunk_count({k: encoders[k] for k in names if k in encoders}, prompts, weighting)


def sd15(
    encoders: dict, prompts: list[str], width: int, height: int, negative: bool, net, weighting: str = "a1111"
) -> dict:
    """SD1: HF CLIPTextModel `last_hidden_state` (after final_layer_norm), EOS padding
    (ldm FrozenCLIPEmbedder). A UNet of this layout trained here with SDXL's `label_emb`
    (num_classes="sequential", adm_in_channels = the tower's width; scripts/grow_unet.py --pooled_text) also
    gets y = the first chunk's pooled EOS state [B, D] in its timestep embedding, as dit-text does; released
    SD1 files have no label_emb. A UNet with `mask_text_padding` also gets context_mask [B, n·77] bool, True
    on each chunk's BOS, tokens and EOS, so that its cross-attention leaves the padding out."""
    enc = _encoder(encoders, "clip_l", "sd15")
    pooled = getattr(net, "num_classes", None) == "sequential"
    if pooled and net.adm_in_channels != enc.config.hidden_size:
        raise ValueError(
            f"this UNet's label_emb takes y of width {net.adm_in_channels}, but the clip_l tower's pooled "
            f"output is {enc.config.hidden_size} wide"
        )
    out, keep = _encode(enc, "clip_l", prompts, "eos", "last", True, pooled, weighting)
    cond = {"context": out.hidden}  # [B, n·77, 768]
    if pooled:
        cond["y"] = out.pooled
    if getattr(net, "mask_text_padding", False):
        cond["context_mask"] = keep  # on the tower's device, as the context
    return cond


def sd21(
    encoders: dict, prompts: list[str], width: int, height: int, negative: bool, net, weighting: str = "a1111"
) -> dict:
    """SD2: OpenCLIP ViT-H, resblocks 0..22 then ln_final (FrozenOpenCLIPEmbedder layer="penultimate"),
    open_clip's zero padding."""
    enc = _encoder(encoders, "clip_h", "sd21")
    out, _ = _encode(enc, "clip_h", prompts, "zero", "penultimate", True, False, weighting)
    return {"context": out.hidden}  # [B, n·77, 1024]


def _bigg(
    encoders: dict, prompts: list[str], family: str, weighting: str, n: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """bigG penultimate without ln_final [B, n·77, 1280] and the projected pooled EOS state [B, 1280]
    (FrozenOpenCLIPEmbedder2 layer="penultimate", always_return_pooled=True, legacy=False)."""
    enc = _encoder(encoders, "clip_g", family)
    out, _ = _encode(enc, "clip_g", prompts, "zero", "penultimate", False, True, weighting, n)
    return out.hidden, out.projected


def _clip_l_penultimate(
    encoders: dict, prompts: list[str], family: str, weighting: str, n: int | None = None
):
    """CLIP-L hidden_states[11] (the penultimate, no final LN) [B, n·77, 768] and the final-LN pooled
    EOS state [B, 768], EOS padding (sgm FrozenCLIPEmbedder layer="hidden", layer_idx=11; SD3 ClipL)."""
    enc = _encoder(encoders, "clip_l", family)
    out, _ = _encode(enc, "clip_l", prompts, "eos", "penultimate", False, True, weighting, n)
    return out.hidden, out.pooled


def sdxl_base(
    encoders: dict, prompts: list[str], width: int, height: int, negative: bool, net, weighting: str = "a1111"
) -> dict:
    """SDXL base: context = L ‖ G on channels [B, n·77, 2048]; y = sdxl_vector(G pooled, (H, W), (0, 0),
    (H, W)) [B, 2816]: no crop, original size = target size, as A1111 and ComfyUI default to. Each tower
    weights its own output; both have the same chunk count."""
    n = _chunks_for(encoders, ("clip_l", "clip_g"), prompts, weighting)
    l_hidden, _ = _clip_l_penultimate(encoders, prompts, "sdxl-base", weighting, n)
    g_hidden, g_pooled = _bigg(encoders, prompts, "sdxl-base", weighting, n)
    context = torch.cat([l_hidden, g_hidden.to(l_hidden.dtype)], dim=-1)
    y = sdxl_vector(g_pooled, original_size=(height, width), crop_coords=(0, 0), target_size=(height, width))
    return {"context": context, "y": y}


def sdxl_refiner(
    encoders: dict, prompts: list[str], width: int, height: int, negative: bool, net, weighting: str = "a1111"
) -> dict:
    """SDXL refiner: bigG only, context [B, n·77, 1280]; y = sdxl_refiner_vector [B, 2560] with the
    aesthetic score 6.0 for the prompt and 2.5 for the negative."""
    g_hidden, g_pooled = _bigg(encoders, prompts, "sdxl-refiner", weighting)
    score = REFINER_AESTHETIC_NEGATIVE if negative else REFINER_AESTHETIC_POSITIVE
    y = sdxl_refiner_vector(
        g_pooled, original_size=(height, width), crop_coords=(0, 0), aesthetic_score=score
    )
    return {"context": g_hidden, "y": y}


def sd3(
    encoders: dict, prompts: list[str], width: int, height: int, negative: bool, net, weighting: str = "a1111"
) -> dict:
    """SD3/SD3.5 (`sd3_infer.py` get_cond): lg = L ‖ G penultimate (no final LN) [B, n·77, 2048], zero-padded
    on channels to context_dim (4096), then T5's T >= 77 tokens along the sequence (zeros [B, 77, 4096]
    without a T5 encoder) -> context [B, n·77 + T, 4096]; y = L pooled (unprojected: the reference's identity
    text_projection) ‖ G projected pooled -> [B, 2048]. The CLIPs are chunked and weighted; T5 reads the
    text without the emphasis syntax and unweighted (`_t5_texts`)."""
    family, context_dim = "sd3", net.context_dim
    n = _chunks_for(encoders, ("clip_l", "clip_g"), prompts, weighting)
    l_hidden, l_pooled = _clip_l_penultimate(encoders, prompts, family, weighting, n)
    g_hidden, g_pooled = _bigg(encoders, prompts, family, weighting, n)
    lg = torch.cat([l_hidden, g_hidden.to(l_hidden.dtype)], dim=-1)  # [B, n·77, 2048]
    if lg.shape[-1] > context_dim:
        raise ValueError(f"CLIP-L ‖ CLIP-G is {lg.shape[-1]} wide, more than the context width {context_dim}")
    lg = F.pad(lg, (0, context_dim - lg.shape[-1]))  # [B, n·77, 4096]
    t5 = _t5_context(encoders, prompts, weighting, lg)  # [B, T, 4096]
    context = torch.cat([lg, t5], dim=1)  # [B, n·77 + T, 4096]
    y = torch.cat([l_pooled, g_pooled.to(l_pooled.dtype)], dim=-1)  # [B, 768 + 1280]
    return {"context": context, "y": y}


def clip_text(
    encoders: dict, prompts: list[str], width: int, height: int, negative: bool, net, weighting: str = "a1111"
) -> dict:
    """Our text-conditioned transformers (dit-text, mmdit-text): context = CLIP last layer after the final LN
    [B, n·L, D] (as SD1), y = the first chunk's pooled EOS state [B, D]. The DiT cross-attends to the context
    and adds y to the timestep embedding (if pooled_dim > 0); the MMDiT puts the context tokens in its joint
    attention and adds y through its y_embedder (SD3's two paths, with one CLIP tower)."""
    enc = _encoder(encoders, "clip_l", "a text transformer (dit-text, mmdit-text)")
    out, keep = _encode(enc, "clip_l", prompts, "eos", "last", True, True, weighting)
    cond = {"context": out.hidden, "y": out.pooled}
    if getattr(net, "mask_text_padding", False):
        cond["context_mask"] = keep  # [B, n·L] bool, True on each chunk's BOS, tokens and EOS (as sd15's)
    return cond


def parse_class_label(prompt: str, num_classes: int) -> int:
    """A DiT prompt: an ImageNet class index, "207" or " 207 ", in [0, num_classes)."""
    text = str(prompt).strip()
    try:
        label = int(text)
    except ValueError:
        raise ValueError(
            f"a DiT model is class-conditional: the prompt must be a class index in [0, {num_classes - 1}] "
            f"(e.g. '207'), got {prompt!r}"
        ) from None
    if not 0 <= label < num_classes:
        raise ValueError(f"DiT class index {label} is out of range [0, {num_classes - 1}]")
    return label


def dit(
    encoders: dict, prompts: list[str], width: int, height: int, negative: bool, net, weighting: str = "a1111"
) -> dict:
    """DiT: y = class labels [B] (long); the unconditional branch is the null class `num_classes`
    (the extra row of LabelEmbedder's table, DiT models.py L67-94). `weighting` does not apply."""
    prompt_syntax.check_weighting(weighting)
    num_classes = net.num_classes
    labels = [num_classes if negative else parse_class_label(p, num_classes) for p in prompts]
    return {"y": torch.tensor(labels, dtype=torch.long)}
