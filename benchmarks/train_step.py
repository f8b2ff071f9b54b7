"""Training steps per second of a small UNet and a small DiT against the same architectures built from
diffusers' model classes in a plain PyTorch loop, same run; then the data-wait fraction of the real trainer.

1. UNet: `latentforge.models.UNet` (SD-like: 64 channels × (1, 2, 2), 2 res blocks per level,
   linear-projection transformers at the two upper levels and the middle, heads of 32 channels, context
   64) against `diffusers.UNet2DConditionModel` with the same channels, block types (CrossAttnDownBlock2D
   ×2, DownBlock2D / UpBlock2D, CrossAttnUpBlock2D ×2), layers_per_block, heads, cross_attention_dim, 32
   norm groups and linear projections. Both hold the same weights (ours, seeded, converted by diffusers' own
   `convert_ldm_unet_checkpoint`); the parameter counts are asserted equal and the first losses compared.
2. DiT: `latentforge.models.DiT` (class-conditional original: 16×16×4 latents, patch 2, hidden 256, depth 6,
   4 heads, learn_sigma False, 8 classes + the null class) against `diffusers.DiTTransformer2DModel`
   (ada_norm_zero) with the same sizes. diffusers gives every block its own copy of the timestep/label
   embedder (`AdaLayerNormZero.emb`; its DiT conversion script copies the one original embedder into each
   block), so the blocks' embedders are tied to block 0's here: the parameter sets are then identical (the
   count is asserted) while diffusers still evaluates the embedder 7 times per forward (its real cost).
   Its `Timesteps(downscale_freq_shift=1)` is set to 0 (the original DiT frequencies; a scalar, no cost) and
   norm_eps to 1e-6 so that the first outputs can be compared.

Timed step, the same on both sides: ε-prediction MSE (DDPM, scaled-linear ᾱ, t ~ U{0..999}) on batch 16 of
4×16×16 latents (random "shapes latents": the step time does not depend on the values) with the same noise,
timesteps and conditioning, forward + backward + AdamW.step + zero_grad(set_to_none=True); no clipping, no
EMA on either side. Ours goes through the trainer's own path: `objectives.loss(ObjectiveConfig(), ms, net,
x0, cond, noise=, sigma=)` and `loop.build_optimizer` (AdamW as the trainer builds it); diffusers' side is the
plain loop of its training examples (`x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε`, `F.mse_loss(model(x_t, t, …).sample, ε)`).
After a warm-up the two sides alternate (ours, diffusers, ours, …), `--steps` optimiser steps per turn,
`--repeat` turns each; the table gives median (and best) steps/s and the ratio ours / diffusers (≥ 1: we are
at least as fast), and the process CPU time per step (`time.process_time`), which other processes on a
shared machine disturb less than the wall time.

3. Data wait: the real trainer, `train_denoiser(resolve("denoiser", "shapes-tiny", overrides={"max_steps":
   --trainer-steps, "eval_n": 0, …, "num_workers": N}))` for each N in `--workers`; `summary["data_wait"]`
   is the fraction of the step loop's wall time spent in `next(loader)` and `it_s` its steps per second
   (the final sample grid and checkpoint come after that timing).

    .venv/bin/python benchmarks/train_step.py [--threads 2] [--repeat 9] [--steps 2] [--profile]
        [--workers 0 1] [--trainer-steps 30] [--skip-trainer] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from latentforge.models import DiT, DiTConfig, UNet, UNetConfig
from latentforge.training.config import DenoiserTrainConfig, resolve
from latentforge.training.objectives import ObjectiveConfig, model_sampling_for
from latentforge.training.objectives import loss as objective_loss
from latentforge.training.optim import build_optimizer

LATENT = (4, 16, 16)  # shapes latents: the shapes-vae preset maps 64×64×3 images to 16×16×4
CONTEXT = (16, 64)  # [L, context_dim] of the UNet's text context
NUM_CLASSES = 8

UNET_CFG = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=64,
    num_res_blocks=2,
    channel_mult=(1, 2, 2),
    attention_resolutions=(1, 2),  # transformers at ds 1 and 2 (levels 0, 1) and in the middle block
    num_head_channels=32,
    transformer_depth=1,
    context_dim=CONTEXT[1],
    use_linear_in_transformer=True,
)

DIT_CFG = DiTConfig(
    input_size=16,
    patch_size=2,
    in_channels=4,
    hidden_size=256,
    depth=6,
    num_heads=4,
    mlp_ratio=4.0,
    class_dropout_prob=0.1,  # diffusers' CombinedTimestepLabelEmbeddings hard-codes 0.1 (null-class row)
    num_classes=NUM_CLASSES,
    learn_sigma=False,
)


# --------------------------------------------------------------------------------------------------------
# the two pairs of networks


def diffusers_unet_config(cfg: UNetConfig) -> dict:
    """`UNet2DConditionModel` kwargs of the same network (SD2-style: `attention_head_dim` is diffusers'
    historical name for the number of heads per block, here channels / num_head_channels)."""
    chans = [cfg.model_channels * m for m in cfg.channel_mult]
    attn = [2**i in cfg.attention_resolutions for i in range(len(chans))]
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]
    return dict(
        sample_size=LATENT[1],
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        block_out_channels=tuple(chans),
        layers_per_block=cfg.num_res_blocks,
        attention_head_dim=tuple(c // cfg.num_head_channels for c in chans),
        cross_attention_dim=cfg.context_dim,
        use_linear_projection=cfg.use_linear_in_transformer,
        transformer_layers_per_block=cfg.transformer_depth,
        norm_num_groups=32,
        flip_sin_to_cos=True,  # ldm's timestep_embedding is [cos | sin]
        freq_shift=0,
        upcast_attention=False,
    )


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded N(0, 1/fan_in) weights everywhere (also in the zero-initialised output and adaLN layers, so the
    first outputs are not trivially zero and no gradient starts as an exact zero) and norm scales near 1."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
            m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            m.weight.normal_(0, m.weight[0].numel() ** -0.5, generator=g)
            if m.bias is not None:
                m.bias.normal_(0, 0.02, generator=g)
        elif isinstance(m, nn.Embedding):
            m.weight.normal_(0, 0.02, generator=g)
    return model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() visits a tied tensor once


def build_unets() -> tuple[nn.Module, nn.Module]:
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    torch.manual_seed(0)
    ours = randomize(UNet(UNET_CFG))
    config = diffusers_unet_config(UNET_CFG)
    theirs = UNet2DConditionModel(**config)
    prefix = "model.diffusion_model."
    ckpt = {prefix + k: v.clone() for k, v in ours.state_dict().items()}
    theirs.load_state_dict(convert_ldm_unet_checkpoint(ckpt, config), strict=True)
    return ours, theirs


def build_dits() -> tuple[nn.Module, nn.Module]:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    ours = randomize(DiT(DIT_CFG))
    c = DIT_CFG
    theirs = DiTTransformer2DModel(
        num_attention_heads=c.num_heads,
        attention_head_dim=c.hidden_size // c.num_heads,
        in_channels=c.in_channels,
        out_channels=c.out_channels,
        num_layers=c.depth,
        sample_size=c.input_size,
        patch_size=c.patch_size,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=c.num_classes,
        norm_eps=1e-6,  # the original DiT's LayerNorm eps (diffusers' default 1e-5)
    )
    blocks = theirs.transformer_blocks
    shared = blocks[0].norm1.emb
    shared.time_proj.downscale_freq_shift = 0  # original DiT: exp(−ln(10⁴)·i/128), diffusers: i/127
    for b in blocks[1:]:
        b.norm1.emb = shared  # one embedder, as in the original (see the module docstring)
    load_dit_weights(ours, theirs)
    return ours, theirs


@torch.no_grad()
def load_dit_weights(ours: DiT, theirs: nn.Module) -> None:
    """Copy ours (original DiT layout) into diffusers' layout; every parameter on both sides exactly once."""
    sd = ours.state_dict()
    e = "transformer_blocks.0.norm1.emb."
    pairs = {
        "pos_embed.proj.weight": sd["x_embedder.proj.weight"],
        "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
        e + "timestep_embedder.linear_1.weight": sd["t_embedder.mlp.0.weight"],
        e + "timestep_embedder.linear_1.bias": sd["t_embedder.mlp.0.bias"],
        e + "timestep_embedder.linear_2.weight": sd["t_embedder.mlp.2.weight"],
        e + "timestep_embedder.linear_2.bias": sd["t_embedder.mlp.2.bias"],
        e + "class_embedder.embedding_table.weight": sd["y_embedder.embedding_table.weight"],
        "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
        "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": sd["final_layer.linear.weight"],
        "proj_out_2.bias": sd["final_layer.linear.bias"],
    }
    for i in range(ours.config.depth):
        o, t = f"blocks.{i}.", f"transformer_blocks.{i}."
        for w in ("weight", "bias"):
            q, k, v = sd[o + f"attn.qkv.{w}"].chunk(3, dim=0)  # rows [q | k | v]
            pairs |= {
                t + f"attn1.to_q.{w}": q,
                t + f"attn1.to_k.{w}": k,
                t + f"attn1.to_v.{w}": v,
                t + f"attn1.to_out.0.{w}": sd[o + f"attn.proj.{w}"],
                t + f"ff.net.0.proj.{w}": sd[o + f"mlp.fc1.{w}"],
                t + f"ff.net.2.{w}": sd[o + f"mlp.fc2.{w}"],
                t + f"norm1.linear.{w}": sd[o + f"adaLN_modulation.1.{w}"],
            }
    params = dict(theirs.named_parameters())  # tied embedders appear once, under block 0
    if set(params) != set(pairs):
        raise RuntimeError(f"DiT mapping mismatch: {sorted(set(params) ^ set(pairs))}")
    for name, value in pairs.items():
        params[name].copy_(value)
    if sum(v.numel() for v in pairs.values()) != n_params(ours):
        raise RuntimeError("DiT mapping does not use every parameter of ours exactly once")


# --------------------------------------------------------------------------------------------------------
# one optimiser step on each side


def make_batches(kind: str, batch: int, n: int, ms) -> list[dict]:
    """n batches of x₀, ε, t (and σ = σ_t, ᾱ_t) plus the conditioning, the same for both sides."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        t = torch.randint(0, 1000, (batch,), generator=g)
        b = {
            "x0": torch.randn(batch, *LATENT, generator=g),
            "noise": torch.randn(batch, *LATENT, generator=g),
            "t": t,
            "sigma": ms.sigmas[t],
            "alpha_bar": ms.alphas_cumprod[t],
        }
        if kind == "unet":
            b["context"] = torch.randn(batch, *CONTEXT, generator=g)
        else:
            b["y"] = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
        out.append(b)
    return out


def ours_loss(kind: str, net: nn.Module, b: dict, obj, ms) -> torch.Tensor:
    cond = {"context": b["context"]} if kind == "unet" else {"y": b["y"]}
    return objective_loss(obj, ms, net, b["x0"], cond, noise=b["noise"], sigma=b["sigma"])[0]


def theirs_loss(kind: str, net: nn.Module, b: dict) -> torch.Tensor:
    """diffusers' training-example loop: DDPM forward process, ε-prediction MSE."""
    a = b["alpha_bar"].view(-1, 1, 1, 1)
    x_t = a.sqrt() * b["x0"] + (1 - a).sqrt() * b["noise"]
    if kind == "unet":
        pred = net(x_t, b["t"], encoder_hidden_states=b["context"]).sample
    else:
        pred = net(x_t, timestep=b["t"], class_labels=b["y"]).sample
    return F.mse_loss(pred, b["noise"])


def stepper(loss_fn: Callable[[dict], torch.Tensor], opt: torch.optim.Optimizer, batches: list[dict]):
    state = {"i": 0}

    def step() -> None:
        b = batches[state["i"] % len(batches)]
        state["i"] += 1
        loss = loss_fn(b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_pair(kind: str, args) -> dict:
    ours, theirs = build_unets() if kind == "unet" else build_dits()
    po, pt = n_params(ours), n_params(theirs)
    print(f"{kind}: parameters ours {po:,}  diffusers {pt:,}")
    assert po == pt, f"{kind}: parameter counts differ: ours {po:,}, diffusers {pt:,}"
    obj = ObjectiveConfig()  # DDPM ε-prediction, t ~ U{0..999}, unweighted
    ms = model_sampling_for(obj)
    batches = make_batches(kind, args.batch, 4, ms)

    # the same weights and inputs give the same first loss (eval mode: no label dropout in the DiT)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        lo = ours_loss(kind, ours, batches[0], obj, ms).item()
        lt = theirs_loss(kind, theirs, batches[0]).item()
    rel = abs(lo - lt) / abs(lo)
    print(f"{kind}: first loss ours {lo:.6f}  diffusers {lt:.6f}  rel diff {rel:.1e}")
    # float32 sums over ~10⁵-10⁶ terms in a different order, and ours feeds t(σ) through the log-σ table
    # (t = 499.99997 for 500): agreement to 1e-4 relative is far tighter than any structural difference
    assert rel < 1e-4, f"{kind}: first losses differ by {rel:.1e} relative"
    ours.train(), theirs.train()

    opt_cfg = DenoiserTrainConfig()  # the trainer's AdamW defaults: lr 1e-4, betas (0.9, 0.999), wd 0.01
    opt_o = build_optimizer(opt_cfg, ours.parameters())
    opt_t = torch.optim.AdamW(
        theirs.parameters(),
        lr=opt_cfg.lr,
        betas=(opt_cfg.adam_beta1, opt_cfg.adam_beta2),
        eps=opt_cfg.adam_eps,
        weight_decay=opt_cfg.weight_decay,
    )
    step_o = stepper(lambda b: ours_loss(kind, ours, b, obj, ms), opt_o, batches)
    step_t = stepper(lambda b: theirs_loss(kind, theirs, b), opt_t, batches)
    for _ in range(args.warmup):
        step_o(), step_t()
    t_o, t_t, c_o, c_t = [], [], [], []
    for _ in range(args.repeat):  # alternate so that load from other processes hits both alike
        for fn, times, cpu in ((step_o, t_o, c_o), (step_t, t_t, c_t)):
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                fn()
            times.append((time.perf_counter() - t0) / args.steps)
            cpu.append((time.process_time() - c0) / args.steps)
    for what, a, b in (("ms/step", t_o, t_t), ("CPU ms/step", c_o, c_t)):
        print(f"{kind}: {what} ours {[round(v * 1e3) for v in a]}  diffusers {[round(v * 1e3) for v in b]}")
    if args.profile:
        profile(kind, step_o, step_t)
    return {
        "model": kind,
        "parameters": po,
        "first_loss_rel_diff": rel,
        "ours_s": t_o,
        "diffusers_s": t_t,
        "ours_cpu_s": c_o,
        "diffusers_cpu_s": c_t,
        "ours_steps_s": 1 / statistics.median(t_o),
        "diffusers_steps_s": 1 / statistics.median(t_t),
        "ratio_median": statistics.median(t_t) / statistics.median(t_o),
        "ratio_best": min(t_t) / min(t_o),
        "ratio_cpu_median": statistics.median(c_t) / statistics.median(c_o),
    }


def profile(kind: str, step_o, step_t, n: int = 3) -> None:
    """Self-CPU time per op over n steps of each side, and the ops whose totals differ most."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    totals = {}
    for name, fn in (("ours", step_o), ("diffusers", step_t)):
        with prof(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(n):
                fn()
        ka = p.key_averages()
        print(f"\n--- profile {kind}, {name}, {n} steps ---")
        print(ka.table(sort_by="self_cpu_time_total", row_limit=15))
        totals[name] = {e.key: (e.self_cpu_time_total / 1e3 / n, e.count // n) for e in ka}
    keys = set(totals["ours"]) | set(totals["diffusers"])
    rows = sorted(
        keys,
        key=lambda k: -abs(totals["ours"].get(k, (0, 0))[0] - totals["diffusers"].get(k, (0, 0))[0]),
    )
    print(f"\n--- {kind}: largest per-step differences of self CPU time (ms; calls) ---")
    print(f"{'op':48} {'ours ms':>9} {'calls':>6} {'diff ms':>9} {'calls':>6} {'ours−diff':>10}")
    for k in rows[:20]:
        (a, ca), (b, cb) = totals["ours"].get(k, (0, 0)), totals["diffusers"].get(k, (0, 0))
        print(f"{k[:48]:48} {a:9.2f} {ca:6d} {b:9.2f} {cb:6d} {a - b:10.2f}")


# --------------------------------------------------------------------------------------------------------
# the real trainer's data wait


def trainer_data_wait(steps: int, workers: int) -> dict:
    from latentforge.training.trainer import train_denoiser

    overrides = {
        "max_steps": steps,
        "eval_n": 0,
        "log_every": 10,
        "checkpoint_every": 1000,
        "num_workers": workers,
    }
    cfg = resolve("denoiser", "shapes-tiny", overrides=overrides)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = train_denoiser(cfg, os.path.join(tmp, "run"), progress=False)
        wall = time.perf_counter() - t0
    return {
        "num_workers": workers,
        "steps": summary["step"],
        "batch_size": cfg.batch_size,
        "data_wait": summary["data_wait"],
        "it_s": summary["it_s"],
        "wall_s": wall,
    }


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["unet", "dit"], choices=["unet", "dit"])
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per side first")
    ap.add_argument("--steps", type=int, default=2, help="optimiser steps per timed turn")
    ap.add_argument("--repeat", type=int, default=9, help="timed turns per side (alternating)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler tables of 3 steps per side")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="trainer num_workers to run")
    ap.add_argument("--trainer-steps", type=int, default=30)
    ap.add_argument("--skip-trainer", action="store_true")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    for name in ("threads", "batch", "steps", "repeat", "trainer_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU; load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")  # fmt: skip

    pairs = [bench_pair(kind, args) for kind in args.models]
    trainer = [] if args.skip_trainer else [trainer_data_wait(args.trainer_steps, w) for w in args.workers]

    load = os.getloadavg()[0]
    busy = load > (os.cpu_count() or 1)
    note = "above the core count: other processes share the CPU" if busy else "below the core count"
    print(f"\nbatch {args.batch} of {'×'.join(map(str, LATENT))} latents; {args.repeat} alternating turns of "
          f"{args.steps} steps per side; load average now {load:.2f} ({note})")  # fmt: skip
    head = (
        f"{'model':>6} {'params':>11} {'stat':>6} {'ours steps/s':>13} {'diffusers steps/s':>18} "
        f"{'ratio':>6} {'CPU s/step ours':>16} {'diffusers':>10} {'ratio':>6} {'loss rel diff':>14}"
    )
    print(head)
    print("-" * len(head))
    for r in pairs:
        med_o, med_t = statistics.median(r["ours_s"]), statistics.median(r["diffusers_s"])
        for stat, a, b, f in (
            ("median", med_o, med_t, statistics.median),
            ("best", min(r["ours_s"]), min(r["diffusers_s"]), min),
        ):
            co, ct = f(r["ours_cpu_s"]), f(r["diffusers_cpu_s"])
            print(
                f"{r['model']:>6} {r['parameters']:>11,} {stat:>6} {1 / a:13.2f} {1 / b:18.2f} "
                f"{b / a:6.2f} {co:16.3f} {ct:10.3f} {ct / co:6.2f} {r['first_loss_rel_diff']:14.1e}"
            )
    print("ratio = ours steps/s ÷ diffusers steps/s (≥ 1: at least as fast); step = forward + backward + "
          "AdamW.step + zero_grad")  # fmt: skip
    print("CPU s/step: process CPU time per step (all threads, OpenMP spin-waits included), less sensitive "
          "to other processes than wall time; its ratio = diffusers ÷ ours")  # fmt: skip
    if trainer:
        batch = trainer[0]["batch_size"]
        print(f"\ntrainer (preset shapes-tiny, {args.trainer_steps} steps, batch {batch}):")
        print(f"{'num_workers':>11} {'it/s':>7} {'data wait':>10} {'wall s':>7}")
        for r in trainer:
            print(f"{r['num_workers']:>11} {r['it_s']:7.2f} {100 * r['data_wait']:9.1f}% {r['wall_s']:7.1f}")
        default = DenoiserTrainConfig().num_workers
        print(f"data wait = time in next(loader) / step-loop time (target < 5%); default workers {default}")
    if args.json:
        write_json_atomic(args.json, {"threads": args.threads, "load_after": load, "pairs": pairs,
                                      "trainer": trainer})  # fmt: skip


if __name__ == "__main__":
    main()
