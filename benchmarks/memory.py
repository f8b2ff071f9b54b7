"""Peak memory (RSS) of one SD1.5-size txt2img, latentforge against diffusers, each side in a fresh process.

Both sides build SD1.5's networks with random weights (UNet 860 M, VAE 84 M, CLIP-L 123 M parameters; the
same configs: ours from `Pipeline.from_preset("sd15")`, diffusers' `UNet2DConditionModel`, `AutoencoderKL`
and transformers' `CLIPTextModel` with SD1.5's configs, in a `StableDiffusionPipeline` with an Euler
scheduler and a CLIP tokenizer written from our shipped vocabulary), cast them to the storage dtype, then
generate one image: `--size`² pixels, `--steps` Euler steps, CFG 7 (batch 2 in the UNet), VAE decode.
Reported per side: the resident set after building (VmRSS), the peak resident set during the generation
(VmRSS sampled every 5 ms by a thread), the process's lifetime peak (ru_maxrss, which includes building
in float32 before the cast), and the generation's wall time. Random weights give meaningless pictures; the
memory and the time are those of real weights.

    .venv/bin/python benchmarks/memory.py [--dtypes float32 bfloat16] [--size 512] [--steps 2]
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


def build_ours(dtype):
    from latentforge.pipeline import Pipeline

    pipe = Pipeline.from_preset("sd15", dtype=dtype)

    def generate(size: int, steps: int):
        return pipe(PROMPT, width=size, height=size, steps=steps, sampler="euler", cfg=7.0, seed=0)

    return generate


def build_diffusers(dtype):
    import torch
    import transformers
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from latentforge import tokenizer

    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=512,
    )  # fmt: skip
    text = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        )
    )  # fmt: skip
    vocab, merges = tokenizer.load_vocab()
    folder = tempfile.mkdtemp()
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    tok = transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    ).to(dtype)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)

    def generate(size: int, steps: int):
        g = torch.Generator().manual_seed(0)
        return pipe(
            PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=7.0, generator=g
        )

    return generate


def child(impl: str, dtype_name: str, size: int, steps: int) -> None:
    import torch

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    with torch.inference_mode():
        generate = (build_ours if impl == "latentforge" else build_diffusers)(dtype)
        built = rss()
        with PeakSampler() as peak:
            t0 = time.perf_counter()
            generate(size, steps)
            seconds = time.perf_counter() - t0
    lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"built": built, "peak": peak.peak, "lifetime": lifetime, "seconds": seconds}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--child", nargs=2, metavar=("IMPL", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child, args.size, args.steps)
        return
    gib = 2**30
    print(
        f"SD1.5-size txt2img, {args.size}², {args.steps} Euler steps, CFG 7; each side in a fresh process\n"
    )
    print(
        "| storage | side | RSS built GiB | peak during generation GiB | lifetime peak GiB | generation s |"
    )
    print("|---|---|---|---|---|---|")
    for dtype in args.dtypes:
        for impl in ("latentforge", "diffusers"):
            cmd = [sys.executable, __file__, "--child", impl, dtype, "--size", str(args.size),
                   "--steps", str(args.steps)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(f"| {dtype} | {impl} | failed: {out.stderr.strip().splitlines()[-1]} | | | |")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {dtype} | {impl} | {r['built'] / gib:.2f} | {r['peak'] / gib:.2f} | "
                  f"{r['lifetime'] / gib:.2f} | {r['seconds']:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
