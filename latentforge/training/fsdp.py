"""Fully sharded data parallel for models that do not fit one device (Zhao et al. 2023, "PyTorch FSDP"),
with torch's per-parameter sharding (`fully_shard`, FSDP2): each top-level block of the denoiser and then the
whole trained module are sharded over the ranks; parameters, gradients, AdamW moments and the EMA live as
DTensor shards, gathered only for a block's forward/backward.

Training state stays the same files as single-process runs (state.py): at a checkpoint every rank takes part
in gathering the full model, optimizer and EMA state, and rank 0 writes it. Resuming loads the full state into
the unsharded model before it is sharded (and the optimizer's afterwards), so an FSDP run resumes from, and
into, any world size.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from latentforge.training.ema import EMA
from latentforge.training.optim import top_level_blocks
from latentforge.training.state import _metadata, flat_to_optimizer_state

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard(model: nn.Module, net: nn.Module) -> int:
    """fully_shard every top-level block of `net`, then `model` (the rest: embeddings, text encoders).
    Returns the number of sharded units."""
    blocks = top_level_blocks(net)
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return len(blocks) + 1


def shard_ema(ema: EMA, model: nn.Module) -> None:
    """Give each EMA tensor the sharding of the model tensor it averages (all ranks hold the same full
    values before, e.g. just loaded from a checkpoint)."""
    for k, like in model.state_dict().items():
        if isinstance(like, DTensor) and not isinstance(ema.shadow[k], DTensor):
            full = ema.shadow[k].to(like.device)
            ema.shadow[k] = distribute_tensor(full, like.device_mesh, like.placements)


def full_ema(ema: EMA) -> dict[str, torch.Tensor]:
    """The whole EMA (a collective: every rank calls it), on the CPU."""
    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in ema.shadow.items()
    }


def full_model(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model state (collective); rank 0 receives it, the others an empty dict."""
    return get_model_state_dict(model, options=FULL)


def _param_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def full_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's whole state (collective), index-keyed like `optimizer.state_dict()` (rank 0)."""
    osd = get_optimizer_state_dict(model, optimizer, options=FULL)
    if not osd:
        return {}
    index = {n: i for i, n in enumerate(_param_names(model))}
    state = {index[k]: v for k, v in osd["state"].items()}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, step_dir: str) -> None:
    """Load `step_dir/optimizer.safetensors` (index-keyed, full) into the sharded optimizer."""
    from latentforge.checkpoints import read_state_dict

    path = os.path.join(step_dir, "optimizer.safetensors")
    meta = json.loads(_metadata(path)["latentforge.optimizer"])
    if meta.get("class") != type(optimizer).__name__:
        raise ValueError(
            f"{path} holds a {meta.get('class')} state, the optimizer is {type(optimizer).__name__}"
        )
    sd = flat_to_optimizer_state(read_state_dict(path), meta, optimizer.state_dict()["param_groups"])
    names = _param_names(model)
    osd = {
        "state": {names[i]: v for i, v in sd["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True))
