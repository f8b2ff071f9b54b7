"""Peak memory (RSS) of one txt2img at SD1.5, SDXL-base or SD3-medium size, latentforge against diffusers,
each side in a fresh process.

Both sides build the family's networks with random weights and the same configs, cast them to the storage
dtype, then run the same job: one image of `--size`² pixels, `--steps` Euler steps, CFG 7 (batch 2 in the
denoiser), an untiled VAE decode. `--family`:

    family       denoiser                 VAE              text encoders                 default job
    sd15         UNet 860 M               84 M, 4 ch       CLIP-L 123 M                  512², 2 steps
    sdxl-base    UNet 2.57 B              84 M, 4 ch       CLIP-L 123 M + bigG 695 M     1024², 1 step
    sd3-medium   MMDiT 2.03 B (+57 M      84 M, 16 ch,     CLIP-L 124 M + bigG 695 M,    1024², 1 step
                 pos_embed buffer)        no quant convs   no T5-XXL

Ours: `Pipeline.from_preset(family)`, which builds and casts one component at a time. Its sd3-medium preset
holds no T5-XXL (an optional component: the 4.7 B-parameter encoder, 19 GB in float32, would not fit twice
in the 24 GB this was run on); the conditioning then puts 77 zero tokens in T5's place, as SD3's reference
does. The image is decoded with `decode(tiled=False)`, which never falls back to tiles.
diffusers: `StableDiffusionPipeline`, `StableDiffusionXLPipeline` or `StableDiffusion3Pipeline` holding
diffusers' `UNet2DConditionModel` / `SD3Transformer2DModel` (their configs derived from our presets by
diffusers' own single-file converters, through benchmarks/unet_forward.py and mmdit_forward.py, and the
models then built from those configs with diffusers' init), `AutoencoderKL` and transformers'
`CLIPTextModel` / `CLIPTextModelWithProjection` with the published configs written below, an Euler
scheduler (`FlowMatchEulerDiscreteScheduler`, shift 3, for SD3) and a CLIP tokenizer written from our
shipped vocabulary (used for both CLIP encoders). Everything is built in float32, then the pipeline is cast.
SD3 runs with `text_encoder_3=None` and `max_sequence_length=77` (diffusers' zeros for the missing T5 would
otherwise be 256 tokens long); SDXL with `force_zeros_for_empty_prompt=False`, so that diffusers encodes
the empty negative prompt as we do instead of using zeros.

Reported per side: the resident set after building (VmRSS), the peak resident set during the generation
(VmRSS sampled every 5 ms by a thread), the process's lifetime peak (ru_maxrss, which includes building in
float32 before the cast), the generation's wall time, and the parameter count of every component (the two
sides must agree; ours holds one more in SDXL's bigG, OpenCLIP's `logit_scale` scalar that SDXL files carry).
Random weights give meaningless pictures; the memory and the time are those of real weights.

    .venv/bin/python benchmarks/memory.py [--family sd15|sdxl-base|sd3-medium] [--dtypes float32 bfloat16]
        [--size PIXELS] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

PROMPT = "a photograph of an astronaut riding a horse"

# family -> (default size in pixels, default Euler steps, the name the report uses)
FAMILIES = {
    "sd15": (512, 2, "SD1.5"),
    "sdxl-base": (1024, 1, "SDXL-base"),
    "sd3-medium": (1024, 1, "SD3-medium"),
}

# diffusers' component names -> ours, to compare the parameter counts
OUR_NAMES = {
    "unet": "unet",
    "transformer": "mmdit",
    "vae": "vae",
    "text_encoder": "clip_l",
    "text_encoder_2": "clip_g",
}

# transformers' CLIP text configs: OpenAI CLIP-L and OpenCLIP bigG (SDXL's and SD3's second encoder)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu")  # fmt: skip
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 hidden_act="gelu", projection_dim=1280)  # fmt: skip

# the helpers that derive diffusers' denoiser configs from ours live beside this file
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def rss() -> int:
    """The current resident set in bytes (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class PeakSampler:
    def __init__(self, every: float = 0.005):
        self.every, self.peak, self._stop = every, rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def sizes(module) -> list[int]:
    """[parameter count, buffer element count] of a module."""
    return [sum(p.numel() for p in module.parameters()), sum(b.numel() for b in module.buffers())]


def build_ours(family: str, dtype):
    from latentforge.pipeline import Pipeline, to_pil

    pipe = Pipeline.from_preset(family, dtype=dtype)

    def generate(size: int, steps: int):
        latents = pipe.sample(
            PROMPT, width=size, height=size, steps=steps, sampler="euler", cfg=7.0, seed=0, progress=False
        )
        return to_pil(pipe.decode(latents, tiled=False))  # untiled, as diffusers decodes

    return generate, {name: sizes(m) for name, m in pipe.components.items()}


def clip_tokenizer():
    """transformers' CLIPTokenizer written from our shipped CLIP vocabulary (no download)."""
    import transformers

    from latentforge import tokenizer

    vocab, merges = tokenizer.load_vocab()
    folder = tempfile.mkdtemp()
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def clip_text(cls, **config):
    """A transformers CLIP text model (`cls`) with CLIP's 49408-token vocabulary and 77 positions."""
    import transformers

    return cls(transformers.CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **config))


def diffusers_vae(**config):
    """diffusers' AutoencoderKL in SD's layout (f = 8, 128-256-512-512 channels, 2 ResNets per level)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, **config,
    )  # fmt: skip


def diffusers_unet(preset: str):
    """diffusers' UNet2DConditionModel with the config its single-file converter derives from our preset
    (unet_forward.to_diffusers on a meta-device model), built on the CPU with diffusers' own init."""
    import torch
    from diffusers import UNet2DConditionModel
    from unet_forward import to_diffusers

    from latentforge.models.unet import PRESETS, UNet

    with torch.device("meta"):
        ours = UNet(PRESETS[preset])
    return UNet2DConditionModel.from_config(to_diffusers(ours).config)


def diffusers_mmdit(preset: str):
    """diffusers' SD3Transformer2DModel with the config mmdit_forward.to_diffusers derives from our preset
    (on the meta device), built on the CPU with diffusers' own init."""
    import torch
    from diffusers import SD3Transformer2DModel
    from mmdit_forward import to_diffusers

    from latentforge.models.mmdit import PRESETS, MMDiT

    with torch.device("meta"):
        ours = MMDiT(PRESETS[preset])
    return SD3Transformer2DModel.from_config(to_diffusers(ours).config)


def build_diffusers(family: str, dtype):
    import diffusers
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tok = clip_tokenizer()
    sd_betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")  # SD1.5's and SDXL's
    extra = {}  # arguments of the generation call
    if family == "sd15":
        pipe = diffusers.StableDiffusionPipeline(
            vae=diffusers_vae(latent_channels=4, sample_size=512),
            text_encoder=clip_text(CLIPTextModel, **CLIP_L), tokenizer=tok,
            unet=diffusers_unet("sd15"), scheduler=diffusers.EulerDiscreteScheduler(**sd_betas),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
    elif family == "sdxl-base":
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=diffusers_vae(latent_channels=4, sample_size=1024, scaling_factor=0.13025),
            text_encoder=clip_text(CLIPTextModel, **CLIP_L), tokenizer=tok,
            text_encoder_2=clip_text(CLIPTextModelWithProjection, **CLIP_BIGG), tokenizer_2=tok,
            unet=diffusers_unet("sdxl-base"), scheduler=diffusers.EulerDiscreteScheduler(**sd_betas),
            force_zeros_for_empty_prompt=False, add_watermarker=False,
        )  # fmt: skip
    else:
        vae = diffusers_vae(
            latent_channels=16, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
            use_quant_conv=False, use_post_quant_conv=False,
        )  # fmt: skip
        pipe = diffusers.StableDiffusion3Pipeline(
            vae=vae,
            text_encoder=clip_text(CLIPTextModelWithProjection, **CLIP_L, projection_dim=768), tokenizer=tok,
            text_encoder_2=clip_text(CLIPTextModelWithProjection, **CLIP_BIGG), tokenizer_2=tok,
            text_encoder_3=None, tokenizer_3=None,  # no T5-XXL, as ours
            transformer=diffusers_mmdit(family),
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        )  # fmt: skip
        extra = {"max_sequence_length": 77}  # the missing T5's zeros: 77 tokens, as ours
    pipe = pipe.to(dtype)
    pipe.set_progress_bar_config(disable=True)
    modules = {k: m for k, m in pipe.components.items() if isinstance(m, torch.nn.Module)}

    def generate(size: int, steps: int):
        g = torch.Generator().manual_seed(0)
        return pipe(
            PROMPT,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=7.0,
            generator=g,
            **extra,
        )

    return generate, {OUR_NAMES[name]: sizes(m) for name, m in modules.items()}


def child(impl: str, family: str, dtype_name: str, size: int, steps: int) -> None:
    import torch

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    with torch.inference_mode():
        generate, counts = (build_ours if impl == "latentforge" else build_diffusers)(family, dtype)
        built = rss()
        with PeakSampler() as peak:
            t0 = time.perf_counter()
            generate(size, steps)
            seconds = time.perf_counter() - t0
    lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"built": built, "peak": peak.peak, "lifetime": lifetime, "seconds": seconds, "sizes": counts}
    print(json.dumps(result))


def print_sizes(sizes: dict[str, dict[str, list[int]]]) -> None:
    """The parameter (and buffer) counts per component and side, and whether the two sides agree."""
    ours, theirs = sizes.get("latentforge", {}), sizes.get("diffusers", {})
    print("\n| component | latentforge params | diffusers params | difference | buffers (ours / diffusers) |")
    print("|---|---|---|---|---|")
    for name in sorted(set(ours) | set(theirs)):
        a, b = ours.get(name, [0, 0]), theirs.get(name, [0, 0])
        print(f"| {name} | {a[0]:,} | {b[0]:,} | {a[0] - b[0]:+,} | {a[1]:,} / {b[1]:,} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=list(FAMILIES), default="sd15")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--size", type=int, help="pixels per side (default: 512 for sd15, else 1024)")
    ap.add_argument("--steps", type=int, help="Euler steps (default: 2 for sd15, else 1)")
    ap.add_argument("--child", nargs=2, metavar=("IMPL", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    default_size, default_steps, label = FAMILIES[args.family]
    size = args.size or default_size
    steps = args.steps or default_steps
    if args.child:
        child(args.child[0], args.family, args.child[1], size, steps)
        return
    gib = 2**30
    print(f"{label}-size txt2img, {size}², Euler steps: {steps}, CFG 7; each side in a fresh process\n")
    print(
        "| storage | side | RSS built GiB | peak during generation GiB | lifetime peak GiB | generation s |"
    )
    print("|---|---|---|---|---|---|", flush=True)
    sizes = {}  # side -> component -> [parameters, buffer elements], from the last run that succeeded
    for dtype in args.dtypes:
        for impl in ("latentforge", "diffusers"):
            # one side at a time: the two never hold memory at once
            cmd = [sys.executable, __file__, "--child", impl, dtype, "--family", args.family,
                   "--size", str(size), "--steps", str(steps)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                error = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
                print(f"| {dtype} | {impl} | failed: {error} | | | |", flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            sizes[impl] = r["sizes"]
            print(f"| {dtype} | {impl} | {r['built'] / gib:.2f} | {r['peak'] / gib:.2f} | "
                  f"{r['lifetime'] / gib:.2f} | {r['seconds']:.1f} |", flush=True)  # fmt: skip
    print_sizes(sizes)


if __name__ == "__main__":
    main()
