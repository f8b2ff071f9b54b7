"""The one training loop of both trainers (the denoiser's, trainer.py, and the VAE's, vae_trainer.py).

A trainer describes its run as a `Task`: the trained modules as one tree, its optimizer, a micro-step (forward
and backward of this rank's share of one global micro-batch, see feed.py), and what it exports and samples.
`run` does the rest, the same way for both:

    resume (state.py: model, EMA, optimizer, GradScaler, RNGs) · DDP or FSDP · Module.compile in place
    for step in start … max_steps − 1:
        lr ← lr_at(step)                                                             (optim.py)
        for a in 0 … grad_accum − 1:              micro-batch m = step·grad_accum + a (feed.py)
            without gradient sync unless a is the last (DDP no_sync / FSDP):
                task.micro_step → backward of loss / grad_accum (scaled by the GradScaler for fp16)
        loss ← mean over micro-batches and ranks; not finite: TrainingError naming the step
        unscale, clip to grad_clip, optimizer step, EMA update                       (ema.py)
        metrics.jsonl and the progress bar; at checkpoint steps the training state and the task's export of
        the EMA weights; at sample steps the task's samples (EMA weights)

Outputs under `out/`: config.json, metrics.jsonl, state/step-N/ (exact-resume state), checkpoints/step-N.
safetensors and checkpoints/last.safetensors (the task's export), samples/, loss.png.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from latentforge import files
from latentforge.training import dist, run_folder
from latentforge.training.config import to_dict
from latentforge.training.ema import EMA
from latentforge.training.feed import collate, data_loader
from latentforge.training.metrics import MetricsLog, progress_bar, save_loss_plot
from latentforge.training.optim import apply_lr
from latentforge.training.state import (
    CorruptState,
    load_training_state,
    save_training_state,
)


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. a non-finite loss); the message names the step and the last good
    checkpoint."""


@dataclasses.dataclass
class MicroBatch:
    """One micro-step as the loop hands it to `Task.micro_step`."""

    batch: dict  # this rank's rows of global micro-batch m (feed.collate)
    m: int  # the global micro-batch index: seeds its randomness (feed.micro_generator)
    step: int  # the optimiser step it belongs to (0-based)
    nets: dict[str, nn.Module]  # Task.units(), wrapped in DDP with several ranks: call these
    backward: Callable[[torch.Tensor], None]  # backward of loss / grad_accum (GradScaler-scaled for fp16)


class Task:
    """What a trainer supplies to `run`: `cfg` (the loop reads its optimisation and output fields), `world`,
    `model` (every trained module as one tree: what the training state stores and the EMA averages) and
    `dataset` (feed.py), and the methods below."""

    config_keys: tuple[str, ...] = ()  # config fields that define the model: resuming with others is refused
    plot_key = "loss"  # the metric loss.png shows
    progress_keys: tuple[str, ...] = ()  # metrics on the progress bar besides loss and lr

    def __init__(self, cfg, world: dist.World, model: nn.Module, dataset):
        self.cfg, self.world, self.model, self.dataset = cfg, world, model, dataset

    def optimizer(self) -> torch.optim.Optimizer:
        """An optimizer over `model`'s trainable parameters (called again under FSDP, over the shards)."""
        raise NotImplementedError

    def units(self) -> dict[str, nn.Module]:
        """The modules `micro_step` calls, by name; with several ranks each is wrapped in DDP."""
        return {"model": self.model}

    def components(self) -> dict[str, nn.Module]:
        """Every module of the run by name, trained or frozen (the dry run counts their parameters)."""
        return self.units()

    def clip_parameters(self) -> Iterable[nn.Parameter]:
        """The parameters whose gradient norm is clipped to grad_clip (and logged as grad_norm)."""
        return self.model.parameters()

    def compiled(self) -> list[nn.Module]:
        """The modules `compile = true` compiles in place (`Module.compile`: state-dict keys unchanged)."""
        return []

    def fsdp_net(self) -> nn.Module:
        """The network whose top-level blocks FSDP shards one by one (parallel = "fsdp")."""
        raise ValueError(f"{type(self).__name__} does not support parallel='fsdp'")

    def micro_step(self, mb: MicroBatch) -> dict[str, float | torch.Tensor]:
        """Forward and `mb.backward(loss)` of this rank's share of global micro-batch `mb.m`. Returns its
        metrics, "loss" among them; the loop averages them over the micro-batches, the loss also over the
        ranks, and logs them."""
        raise NotImplementedError

    def export(self, path: str, weights: Mapping[str, torch.Tensor]) -> None:
        """Rank 0 at a checkpoint: write the result file `path` with `weights` (the EMA, `model`'s keys)."""
        raise NotImplementedError

    def samples(self, path: str, weights: Mapping[str, torch.Tensor]) -> dict | None:
        """Rank 0 at a sample step: an image grid at `path` (samples/step-N.png) and evaluations, made with
        `weights` (the EMA); returns metrics to log, or None."""
        return None


def is_sharded(cfg, world: dist.World) -> bool:
    """Whether the run shards its model with FSDP (parallel = "fsdp" on several ranks) instead of DDP."""
    return getattr(cfg, "parallel", "ddp") == "fsdp" and world.distributed


def describe_batch(cfg, world: dist.World) -> str:
    G = cfg.batch_size * world.world_size
    return (
        f"effective batch {G * cfg.grad_accum} = {cfg.batch_size} per rank × {world.world_size} ranks × "
        f"{cfg.grad_accum} accumulation; device {world.device}"
    )


# --------------------------------------------------------------------------------------------------------
# the loop


def run(
    task: Task,
    out: str,
    resume: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    strict: bool = False,
) -> dict:
    """Train `task` into folder `out` (or continue it, with `resume`); returns a summary. `dry_run`: print
    the config, parameter counts, FLOPs and time per step, and write nothing. `stop_after`: return after
    this many steps of this call (tests; the run stays resumable). `strict`: a broken newest training state
    is an error instead of a fall-back to the newest intact one. The trainers call this inside `claim`
    (the folder's lock and checks)."""
    cfg, world = task.cfg, task.world
    optimizer = task.optimizer()
    if dry_run:
        return dry_run_report(task, optimizer) if world.main else {}
    existing = run_folder.existing_run(out, resume, world)
    ema = EMA(task.model, decay=cfg.ema_decay)
    scaler = torch.amp.GradScaler(world.device.type) if cfg.precision == "fp16" else None
    sharded = is_sharded(cfg, world)
    info = _resume(task, out, ema, None if sharded else optimizer, scaler, strict) if existing else None
    if info is not None and info["step"] > cfg.max_steps:
        raise ValueError(
            f"the run in {out!r} is at step {info['step']}, past max_steps={cfg.max_steps}; give "
            f"--max-steps {info['step']} or more to continue it (nothing was changed)"
        )
    nets, optimizer = _distribute(task, ema, optimizer, info, sharded)
    if world.main:
        files.write_json(os.path.join(out, "config.json"), to_dict(cfg))
    clock = _Clock(info["step"] if info else 0)
    log = MetricsLog(os.path.join(out, "metrics.jsonl"), clock.step, enabled=world.main)
    loader = iter(data_loader(cfg, task.dataset, clock.step * cfg.grad_accum, world))
    bar = progress_bar(clock.step, cfg.max_steps, enabled=progress and world.main)
    loss = None
    clock.start()
    while clock.step < cfg.max_steps and (stop_after is None or clock.ran < stop_after):
        lr = apply_lr(
            optimizer,
            clock.step,
            cfg.lr,
            warmup_steps=cfg.warmup_steps,
            total_steps=cfg.max_steps,
            schedule=cfg.lr_schedule,
            min_lr_ratio=cfg.min_lr_ratio,
        )
        metrics = _accumulate(task, nets, loader, clock, scaler, sharded)
        loss = _global_loss(task, metrics, clock.step, out, log)
        grad_norm = _optimizer_step(task, optimizer, scaler)
        ema.update(task.model)
        clock.tick()
        _report(task, log, bar, clock, {**metrics, "lr": lr, "loss": loss, "grad_norm": grad_norm})
        end = clock.step == cfg.max_steps
        if clock.step % cfg.checkpoint_every == 0 or end:
            _checkpoint(task, out, clock.step, ema, optimizer, scaler, sharded)
        if (cfg.sample_every and clock.step % cfg.sample_every == 0) or end:
            _samples(task, out, clock.step, ema, log, sharded)
    bar.close()
    if world.main and clock.step == cfg.max_steps:
        save_loss_plot(os.path.join(out, "metrics.jsonl"), os.path.join(out, "loss.png"), key=task.plot_key)
    return {"step": clock.step, "loss": loss, "out": out, "data_wait": clock.data_wait, "it_s": clock.it_s}


@dataclasses.dataclass
class _Clock:
    """Steps done, and the time spent in the step loop and waiting for data."""

    step: int
    ran: int = 0  # steps of this call
    waited: float = 0.0  # seconds in next(loader)
    elapsed: float = 0.0  # seconds of the step loop up to the last finished step
    t0: float = 0.0

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def tick(self) -> None:
        self.step += 1
        self.ran += 1
        self.elapsed = time.perf_counter() - self.t0

    @property
    def it_s(self) -> float:
        return self.ran / max(self.elapsed, 1e-9)

    @property
    def data_wait(self) -> float:
        return self.waited / max(self.elapsed, 1e-9)


def _resume(task: Task, out: str, ema: EMA, optimizer, scaler, strict: bool = False) -> dict:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            info = load_training_state(
                os.path.join(out, "state"),
                task.model,
                ema,
                optimizer,  # None under FSDP: loaded after sharding (_distribute)
                scaler,
                rng=True,
                expected_config=to_dict(task.cfg),
                config_keys=task.config_keys,
                fallback=not strict,
            )
        except CorruptState as e:
            hint = "; without --strict an older intact step is loaded instead" if strict else ""
            raise CorruptState(f"{e}{hint}") from None
    for w in caught:  # re-issued here: the CLI shows them as `warning: …` lines
        warnings.warn(str(w.message), type(w.message) if isinstance(w.message, Warning) else UserWarning,
                      stacklevel=2)  # fmt: skip
    if task.world.main:
        print(f"resumed from {info['path']} at step {info['step']}", flush=True)
    return info


def _distribute(task: Task, ema: EMA, optimizer, info: dict | None, sharded: bool):
    """FSDP (shard the model and the EMA, build the optimizer over the shards and load its state) or DDP
    replicas of the task's units; then compile in place. Returns (the nets micro-steps call, optimizer)."""
    world, model = task.world, task.model
    nets = task.units()
    if sharded:
        from latentforge.training import fsdp

        units = fsdp.shard(model, task.fsdp_net())
        if world.main:
            local = sum(p.to_local().numel() for p in model.parameters())
            total = sum(p.numel() for p in model.parameters())
            print(
                f"FSDP: {units} units sharded over {world.world_size} ranks; rank 0 holds {local:,} of "
                f"{total:,} parameters",
                flush=True,
            )
        fsdp.shard_ema(ema, model)
        optimizer = task.optimizer()
        if info is not None:
            fsdp.load_optimizer(model, optimizer, info["path"])
    elif world.distributed:
        ids = [world.device.index] if world.device.type == "cuda" else None
        nets = {name: DistributedDataParallel(m, device_ids=ids) for name, m in nets.items()}
    if task.cfg.compile:
        for m in task.compiled():
            m.compile()
    return nets, optimizer


def _accumulate(task: Task, nets, loader: Iterator, clock: _Clock, scaler, sharded: bool) -> dict:
    """The micro-steps of one optimiser step; their metrics averaged."""
    cfg, world = task.cfg, task.world
    backward = _backward(cfg.grad_accum, scaler)
    sums: dict = {}
    for a in range(cfg.grad_accum):
        t = time.perf_counter()
        batch = next(loader)
        clock.waited += time.perf_counter() - t
        sync = a == cfg.grad_accum - 1 or not world.distributed
        with _gradient_sync(task.model, nets, sync, sharded):
            out = task.micro_step(
                MicroBatch(batch, clock.step * cfg.grad_accum + a, clock.step, nets, backward)
            )
        for k, v in out.items():
            sums[k] = sums[k] + v if k in sums else v
    return {k: v / cfg.grad_accum for k, v in sums.items()}


def _backward(grad_accum: int, scaler) -> Callable[[torch.Tensor], None]:
    def backward(loss: torch.Tensor) -> None:
        scaled = loss / grad_accum
        (scaler.scale(scaled) if scaler is not None else scaled).backward()

    return backward


@contextlib.contextmanager
def _gradient_sync(model: nn.Module, nets: dict[str, nn.Module], sync: bool, sharded: bool):
    """Gradients all-reduced only on the last micro-batch of a step: DDP's no_sync, FSDP's switch."""
    if sharded:
        model.set_requires_gradient_sync(sync)
        yield
        return
    with contextlib.ExitStack() as stack:
        for net in nets.values() if not sync else ():
            if isinstance(net, DistributedDataParallel):
                stack.enter_context(net.no_sync())
        yield


def _global_loss(task: Task, metrics: dict, step: int, out: str, log: MetricsLog) -> float:
    """The step's loss averaged over the ranks; a non-finite one stops the run (TrainingError)."""
    loss = float(dist.mean(task.world, torch.as_tensor(metrics["loss"], dtype=torch.float64)))
    if not math.isfinite(loss):
        last = os.path.join(out, "checkpoints", "last.safetensors")
        good = last if os.path.exists(last) else "none (no checkpoint was written yet)"
        log.write({"step": step + 1, "error": f"non-finite loss {loss}"})
        raise TrainingError(
            f"the loss is {loss} at step {step + 1}; stopping. The last good checkpoint: {good}"
        )
    return loss


def _optimizer_step(task: Task, optimizer: torch.optim.Optimizer, scaler) -> torch.Tensor:
    """Unscale (fp16), clip, step, zero the gradients; returns the gradient norm before clipping."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = list(task.clip_parameters())
    if task.cfg.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, task.cfg.grad_clip)
    else:
        norm = _grad_norm(params)
    if hasattr(norm, "full_tensor"):  # FSDP: a DTensor
        norm = norm.full_tensor()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def _grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    norms = [p.grad.detach().norm() for p in params if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.zeros(())


def _report(task: Task, log: MetricsLog, bar, clock: _Clock, metrics: dict) -> None:
    cfg = task.cfg
    bar.update(1)
    shown = {k: f"{float(metrics[k]):.4f}" for k in ("loss", *task.progress_keys)}
    bar.set_postfix(**shown, lr=f"{metrics['lr']:.2e}")
    if clock.step % cfg.log_every == 0 or clock.step == cfg.max_steps:
        values = {k: float(v) for k, v in metrics.items()}
        log.write({"step": clock.step, **values, "it_s": clock.it_s, "data_wait": clock.data_wait})


def _checkpoint(task: Task, out: str, step: int, ema: EMA, optimizer, scaler, sharded: bool) -> None:
    """The exact-resume state (state.py) and the task's export of the EMA weights, as step-N.safetensors
    and last.safetensors (rank 0 writes; under FSDP every rank takes part in gathering the full state)."""
    cfg, world = task.cfg, task.world
    states = _full_states(task.model, ema, optimizer) if sharded else None
    if world.main:
        save_training_state(
            os.path.join(out, "state"),
            step,
            task.model,
            ema,
            optimizer,
            scaler,
            data_position={
                "micro_batch": step * cfg.grad_accum,
                "global_batch": cfg.batch_size * world.world_size,
            },
            config=to_dict(cfg),
            keep_last=cfg.keep_last,
            states=states,
        )
        folder = os.path.join(out, "checkpoints")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"step-{step:08d}.safetensors")
        task.export(path, states["ema"] if states else ema.state_dict())
        with files.atomic_path(os.path.join(folder, "last.safetensors")) as tmp:
            shutil.copyfile(path, tmp)
        _prune_exports(folder, cfg.keep_last, step)
    dist.barrier(world)


def _full_states(model: nn.Module, ema: EMA, optimizer) -> dict:
    from latentforge.training import fsdp

    return {
        "model": fsdp.full_model(model),
        "ema": fsdp.full_ema(ema),
        "optimizer": fsdp.full_optimizer(model, optimizer),
    }


_EXPORT = re.compile(r"^step-(\d{8,})\.safetensors$")


def _prune_exports(folder: str, keep: int, step: int) -> None:
    """Keep the newest `keep` exports up to `step` (the run's own numbers: a step-N file past the current
    step is not this run's progress and is neither counted nor removed)."""
    numbered = [(int(m.group(1)), f) for f in os.listdir(folder) if (m := _EXPORT.match(f))]
    own = sorted((n, f) for n, f in numbered if n <= step)
    for _, f in own[:-keep] if keep else []:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, f))


def _samples(task: Task, out: str, step: int, ema: EMA, log: MetricsLog, sharded: bool) -> None:
    if sharded:
        from latentforge.training import fsdp

        weights = fsdp.full_ema(ema)  # a collective: every rank takes part
    else:
        weights = ema.state_dict()
    if task.world.main:
        metrics = task.samples(os.path.join(out, "samples", f"step-{step:08d}.png"), weights)
        if metrics:
            log.write({"step": step, **metrics})
    dist.barrier(task.world)


# --------------------------------------------------------------------------------------------------------
# dry run


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    t = sum(p.numel() for p in module.parameters() if p.requires_grad)
    f = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    return t, f


def dry_run_report(task: Task, optimizer: torch.optim.Optimizer) -> dict:
    """Print the resolved config, parameter counts, FLOPs per optimiser step (counted with
    torch.utils.flop_counter on one real micro-batch, forward + backward, × grad_accum) and the measured
    time per step (the second of two micro-steps × grad_accum). Nothing is written."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg, world, dataset = task.cfg, task.world, task.dataset
    print(json.dumps(to_dict(cfg), indent=2))
    counts = {}
    for name, m in task.components().items():
        t, f = count_parameters(m)
        counts[name] = {"trainable": t, "frozen": f}
        print(f"{name:8s} {t:>14,d} trainable {f:>14,d} frozen")
    G = cfg.batch_size * world.world_size
    batch = collate([dataset[k] for k in dataset.global_batch(0, G)[world.rank :: world.world_size]])
    nets, backward = task.units(), _backward(cfg.grad_accum, None)
    with FlopCounterMode(display=False) as fc:
        task.micro_step(MicroBatch(batch, 0, 0, nets, backward))
    flops = fc.get_total_flops() * cfg.grad_accum
    t0 = time.perf_counter()
    task.micro_step(MicroBatch(batch, 1, 0, nets, backward))
    seconds = (time.perf_counter() - t0) * cfg.grad_accum
    optimizer.zero_grad(set_to_none=True)
    print(f"FLOPs per step (forward + backward, this rank): {flops / 1e9:,.2f} GFLOP")
    print(
        f"estimated time per step: {seconds:.3f} s; "
        f"{cfg.max_steps} steps ≈ {seconds * cfg.max_steps / 60:.1f} min"
    )
    return {"parameters": counts, "flops_per_step": flops, "seconds_per_step": seconds}
