"""Resuming exactly: EMA, learning-rate schedules, pickle-free training-state checkpoints."""

from __future__ import annotations

import json
import math
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from latentforge.training import state as st
from latentforge.training.ema import EMA
from latentforge.training.optim import apply_lr, lr_at
from latentforge.training.state import config_differences, load_training_state, save_training_state

BASE_LR, WARMUP, K = 1e-2, 3, 7
DATA = torch.randn(20, 4, generator=torch.Generator().manual_seed(1234))
CONFIG = {"model": {"width": 16, "depth": 2}, "train": {"lr": BASE_LR, "batch": 4}}


class Tiny(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.norm = nn.BatchNorm1d(width)  # running statistics: buffers the EMA copies
        self.drop = nn.Dropout(0.2)  # draws from torch's RNG during training
        self.out = nn.Linear(width, 4)

    def forward(self, x):
        return self.out(self.drop(torch.relu(self.norm(self.inp(x)))))


def build(seed: int):
    torch.manual_seed(seed)
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=BASE_LR, betas=(0.9, 0.99), weight_decay=0.01)
    return model, opt, EMA(model, decay=0.99)


def train(model, opt, ema, pos: dict, start: int, end: int, total: int) -> dict:
    """`end - start` steps; the batch order is a per-epoch shuffle by python's `random`, the inputs get
    torch and numpy noise, so every global RNG and the data position matter."""
    model.train()
    for step in range(start, end):
        apply_lr(
            opt, step, BASE_LR, warmup_steps=WARMUP, total_steps=total, schedule="cosine", min_lr_ratio=0.1
        )
        if pos["index"] >= len(pos["order"]):
            pos["epoch"] += 1
            pos["order"], pos["index"] = random.sample(range(len(DATA)), len(DATA)), 0
        idx = pos["order"][pos["index"] : pos["index"] + 4]
        pos["index"] += 4
        x = (
            DATA[idx]
            + 0.1 * torch.randn(4, 4)
            + torch.from_numpy(np.random.randn(4, 4)).float() * random.random()
        )
        loss = (model(x) - x.flip(-1)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model, step)
    return pos


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def draws() -> tuple:
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random())


def fresh_position() -> dict:
    return {"epoch": -1, "order": [], "index": 0}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def assert_same_optimizer(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        assert sa["state"][i].keys() == sb["state"][i].keys()
        for name, v in sa["state"][i].items():
            w = sb["state"][i][name]
            assert torch.equal(v, w) and v.dtype == w.dtype, (i, name)


# ----------------------------------------------------------------------------------------------------------
# the core requirement: K steps + save + fresh objects + load + K steps == 2K steps


def test_resume_is_bit_identical(tmp_path):
    total = 2 * K
    seed_all(0)
    model_a, opt_a, ema_a = build(0)
    train(model_a, opt_a, ema_a, fresh_position(), 0, total, total)
    draws_a = draws()

    seed_all(0)
    model_b, opt_b, ema_b = build(0)
    pos = train(model_b, opt_b, ema_b, fresh_position(), 0, K, total)
    save_training_state(tmp_path, K, model_b, ema_b, opt_b, data_position=pos, config=CONFIG, keep_last=2)
    del model_b, opt_b, ema_b

    seed_all(999)  # every RNG somewhere else, and different initial weights: the load must restore it all
    model_c, opt_c, ema_c = build(999)
    info = load_training_state(tmp_path, model_c, ema_c, opt_c, expected_config=CONFIG)
    assert info["step"] == K and info["config"] == CONFIG
    train(model_c, opt_c, ema_c, info["data_position"], info["step"], total, total)
    draws_c = draws()

    assert_same_state(model_a.state_dict(), model_c.state_dict())
    assert_same_state(ema_a.state_dict(), ema_c.state_dict())
    assert ema_a.num_updates == ema_c.num_updates == total
    assert_same_optimizer(opt_a, opt_c)
    assert draws_c == draws_a  # the global RNG streams go on identically too

    # negative control: the same resume without restoring the RNGs does not reproduce run A
    seed_all(999)
    model_d, opt_d, ema_d = build(999)
    info = load_training_state(tmp_path, model_d, ema_d, opt_d, rng=False)
    train(model_d, opt_d, ema_d, info["data_position"], info["step"], total, total)
    assert not torch.equal(model_a.inp.weight, model_d.inp.weight)


def test_files_are_plain_safetensors_and_json(tmp_path):
    from safetensors import safe_open

    seed_all(0)
    model, opt, ema = build(0)
    train(model, opt, ema, fresh_position(), 0, 2, 10)
    path = save_training_state(tmp_path, 2, model, ema, opt, data_position={"i": 8}, config=CONFIG)
    assert sorted(os.listdir(path)) == [
        "ema.safetensors",
        "model.safetensors",
        "optimizer.safetensors",
        "rng.safetensors",
        "state.json",
    ]
    with safe_open(os.path.join(path, "optimizer.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()["latentforge.optimizer"])
    assert {"state.0.exp_avg", "state.0.exp_avg_sq", "state.0.step"} <= keys
    assert meta["class"] == "AdamW" and meta["param_groups"][0]["betas"] == [0.9, 0.99]
    with safe_open(os.path.join(path, "rng.safetensors"), framework="pt") as f:
        assert f.get_tensor("torch.cpu").dtype == torch.uint8
        assert json.loads(f.metadata()["numpy"])["bit_generator"] == "MT19937"
        assert len(json.loads(f.metadata()["python"])["state"]) == 625
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    assert state["step"] == 2 and state["data_position"] == {"i": 8} and "torch" in state["versions"]
    # the EMA file is a weights file in the model's layout
    assert_same_state(
        {k: v.float() for k, v in model.state_dict().items() if v.is_floating_point()},
        {
            k: v
            for k, v in st.read_state_dict(os.path.join(path, "model.safetensors")).items()
            if v.is_floating_point()
        },
    )
    assert set(st.read_state_dict(os.path.join(path, "ema.safetensors"))) == set(model.state_dict())


def test_non_tensor_optimizer_state_and_groups_roundtrip():
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([{"params": [p], "lr": 0.1, "lr_scale": 0.5}], lr=0.1, momentum=0.9)
    p.grad = torch.full((3,), 0.5)
    opt.step()
    opt.state[p]["count"] = 7  # a python number in the state goes to JSON
    tensors, meta = st.optimizer_to_flat(opt)
    assert set(tensors) == {"state.0.momentum_buffer"} and meta["state"] == {"0": {"count": 7}}
    q = nn.Parameter(torch.ones(3))
    opt2 = torch.optim.SGD([{"params": [q], "lr": 0.3, "lr_scale": 1.0}], lr=0.3, momentum=0.9)
    st.optimizer_from_flat(opt2, tensors, json.loads(json.dumps(meta)))
    assert opt2.state[q]["count"] == 7 and torch.equal(
        opt2.state[q]["momentum_buffer"], opt.state[p]["momentum_buffer"]
    )
    assert opt2.param_groups[0]["lr"] == 0.1 and opt2.param_groups[0]["lr_scale"] == 0.5
    with pytest.raises(ValueError, match="AdamW"):
        st.optimizer_from_flat(torch.optim.AdamW([q]), tensors, meta)


def test_rng_roundtrip():
    seed_all(5)
    tensors, meta = st.rng_state()
    a = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)], np.random.randn())
    seed_all(6)
    st.set_rng_state(tensors, meta)
    b = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)], np.random.randn())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2] and a[3] == b[3]


# ----------------------------------------------------------------------------------------------------------
# folders: keep_last, the `last` pointer, atomicity


def _save(root, step, keep_last=2, **kw):
    model, opt, ema = build(step)
    return save_training_state(
        root, step, model, ema, opt, data_position={"s": step}, keep_last=keep_last, **kw
    )


def test_keep_last_and_last_pointer(tmp_path):
    for s in (10, 20, 30, 40):
        path = _save(tmp_path, s)
        assert open(tmp_path / "last").read().strip() == os.path.basename(path)
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("step-")) == [
        "step-00000030",
        "step-00000040",
    ]
    assert [n for n in os.listdir(tmp_path) if ".tmp" in n or ".old" in n] == []
    model, opt, ema = build(0)
    assert load_training_state(tmp_path, model, ema, opt)["step"] == 40
    assert_same_state(model.state_dict(), build(40)[0].state_dict())
    # a step folder can be named directly; saving the same step again replaces it
    assert load_training_state(tmp_path / "step-00000030", model)["step"] == 30
    _save(tmp_path, 40)
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("step-")) == [
        "step-00000030",
        "step-00000040",
    ]
    # a stale `last` falls back to the newest complete folder; keep_last=0 keeps everything
    (tmp_path / "last").write_text("step-00000099\n")
    assert load_training_state(tmp_path, model, rng=False)["step"] == 40
    for s in (50, 60, 70):
        _save(tmp_path, s, keep_last=0)
    assert len([p for p in os.listdir(tmp_path) if p.startswith("step-")]) == 5


def test_failed_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    before = {
        n: open(tmp_path / "step-00000001" / n, "rb").read() for n in os.listdir(tmp_path / "step-00000001")
    }
    real = st.save_state_dict

    def failing(sd, path, metadata=None):
        if path.endswith("optimizer.safetensors"):
            raise OSError("disk full")
        return real(sd, path, metadata)

    monkeypatch.setattr(st, "save_state_dict", failing)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 2, keep_last=1)
    assert sorted(os.listdir(tmp_path)) == ["last", "step-00000001"]  # no half folder, nothing pruned
    assert open(tmp_path / "last").read().strip() == "step-00000001"
    after = {
        n: open(tmp_path / "step-00000001" / n, "rb").read() for n in os.listdir(tmp_path / "step-00000001")
    }
    assert after == before
    model, opt, ema = build(0)
    assert load_training_state(tmp_path, model, ema, opt)["step"] == 1
    monkeypatch.setattr(st, "save_state_dict", real)
    _save(tmp_path, 2, keep_last=1)
    assert sorted(os.listdir(tmp_path)) == ["last", "step-00000002"]


def test_config_mismatch_is_refused(tmp_path):
    _save(tmp_path, 3, config=CONFIG)
    model, opt, ema = build(0)
    other = {"model": {"width": 32, "depth": 2, "heads": 4}, "train": {"lr": 1.0, "batch": 4}}
    with pytest.raises(ValueError) as e:
        load_training_state(tmp_path, model, ema, opt, expected_config=other, config_keys=("model",))
    msg = str(e.value)
    assert "model.width: checkpoint 16, expected 32" in msg and "model.heads: not in the checkpoint" in msg
    assert "train.lr" not in msg  # only the fields that define the model
    # a training hyperparameter may change on resume
    load_training_state(
        tmp_path, model, ema, opt, expected_config={**CONFIG, "train": {"lr": 1.0}}, config_keys=["model"]
    )
    assert config_differences(CONFIG, CONFIG) == []
    assert config_differences({"a": (1, 2)}, {"a": [1, 2]}) == []  # JSON turns tuples into lists


def test_scaler_and_tied_weights(tmp_path):
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    model[1].weight = model[0].weight  # tied: safetensors refuses shared storage unless it is cloned
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    save_training_state(tmp_path, 0, model, None, None, scaler=scaler, rng=False)
    other = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    scaler2 = torch.amp.GradScaler("cpu", init_scale=8.0)
    load_training_state(tmp_path, other, scaler=scaler2, rng=False)
    assert scaler2.state_dict() == scaler.state_dict()
    assert torch.equal(other[0].weight, model[0].weight) and torch.equal(other[1].weight, model[0].weight)


# ----------------------------------------------------------------------------------------------------------
# EMA


def test_ema_warmup_formula_and_swapped():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    expected = model.weight.detach().clone()
    for step in range(30):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        d = ema.update(model, step)
        assert d == min(0.9, (1 + step) / (10 + step))
        expected = expected + (1 - d) * (model.weight.detach() - expected)
    torch.testing.assert_close(ema.shadow["weight"], expected, rtol=0, atol=1e-6)
    assert EMA(model, decay=0.9, warmup=False).update(model, 0) == 0.9

    train_w = model.weight.detach().clone()
    with ema.swapped(model) as m:
        assert m is model and torch.equal(model.weight, ema.shadow["weight"])
    assert torch.equal(model.weight, train_w)
    with pytest.raises(RuntimeError), ema.swapped(model):
        raise RuntimeError("sampling failed")
    assert torch.equal(model.weight, train_w)  # restored even when the body raises

    ema.copy_to(model)
    assert torch.equal(model.weight, ema.shadow["weight"])


def test_bf16_model_keeps_float32_ema():
    torch.manual_seed(0)
    model = nn.Linear(8, 8).to(torch.bfloat16)
    ema = EMA(model, decay=0.999, warmup=False)
    assert all(v.dtype == torch.float32 for v in ema.state_dict().values())
    ref = model.weight.detach().float().clone()
    for step in range(5):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight) * 0.01)
        ema.update(model, step)
        ref = torch.lerp(ref, model.weight.detach().float(), 1 - 0.999)
    assert torch.equal(ema.shadow["weight"], ref)
    # 0.001 of a 0.01 step is far below bf16's resolution around 1: float32 keeps the drift, bf16 would not
    assert not torch.equal(ema.shadow["weight"], ema.shadow["weight"].bfloat16().float())
    before = model.weight.detach().clone()
    with ema.swapped(model):
        assert model.weight.dtype == torch.bfloat16
        assert torch.equal(model.weight, ema.shadow["weight"].bfloat16())
    assert torch.equal(model.weight, before)


# ----------------------------------------------------------------------------------------------------------
# learning rate


def test_lr_at_values():
    kw = {"base_lr": 1.0, "warmup_steps": 10, "total_steps": 110}
    assert lr_at(0, **kw) == 0.0 and lr_at(5, **kw) == 0.5
    for schedule in ("constant", "cosine", "linear"):
        assert lr_at(10, schedule=schedule, **kw) == 1.0  # warm-up end
    assert lr_at(60, schedule="constant", **kw) == 1.0
    assert lr_at(60, schedule="cosine", **kw) == pytest.approx(0.5)  # cosine midpoint
    assert lr_at(35, schedule="cosine", **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(60, schedule="linear", **kw) == pytest.approx(0.5)
    assert lr_at(110, schedule="cosine", **kw) == pytest.approx(0.0, abs=1e-12)  # end
    assert lr_at(500, schedule="linear", **kw) == 0.0
    assert lr_at(110, schedule="cosine", min_lr_ratio=0.1, **kw) == pytest.approx(0.1)
    assert lr_at(60, schedule="cosine", min_lr_ratio=0.1, **kw) == pytest.approx(0.55)
    assert lr_at(3, 2.0, schedule="cosine", total_steps=4) == pytest.approx(
        2.0 * 0.5 * (1 + math.cos(0.75 * math.pi))
    )
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, 1.0, schedule="step")
    with pytest.raises(ValueError, match="total_steps"):
        lr_at(20, 1.0, warmup_steps=10, total_steps=10, schedule="cosine")

    opt = torch.optim.SGD(
        [
            {"params": [nn.Parameter(torch.ones(1))]},
            {"params": [nn.Parameter(torch.ones(1))], "lr_scale": 0.1},
        ],
        lr=1.0,
    )
    assert apply_lr(opt, 60, 2.0, warmup_steps=10, total_steps=110, schedule="linear") == pytest.approx(1.0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1.0, 0.1])
