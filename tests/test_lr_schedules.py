"""WarmupLR / WarmupDecayLR against a hand statement of DeepSpeed's formulas.

Reference (deepspeedai/DeepSpeed, deepspeed/runtime/lr_schedules.py), with ``it`` DeepSpeed's
``last_batch_iteration`` (-1 before the first step()) and ``W = max(2, warmup_num_steps)``:
``lr = min + (max - min) * gamma``; ``gamma = 0`` for ``it < 0``; during warm-up
``log(it + 1) / log(W)`` ('log') or ``it / W`` ('linear'); afterwards 1 (WarmupLR) or
``max(0, (total - it) / max(1, total - W))`` (WarmupDecayLR).
"""

import inspect
import io
import math
import warnings

import pytest
import torch

from fp16_triton.config import SchedulerConfig, load_config
from fp16_triton.lr_schedules import SCHEDULERS, WarmupDecayLR, WarmupLR, build_scheduler


def reference_lr(it, lo, hi, warmup, kind, total=None):
    """DeepSpeed's lr at iteration ``it``, written out independently of the module."""
    w = max(2, warmup)
    if it < 0:
        gamma = 0.0
    elif it < w:
        gamma = math.log(it + 1) / math.log(w) if kind == "log" else it / w
    elif total is None:
        gamma = 1.0
    else:
        gamma = max(0.0, (total - it) / max(1.0, total - w))
    return lo + (hi - lo) * gamma


def make_optimizer(lr=0.5, groups=1, cls=torch.optim.SGD, **kwargs):
    params = [{"params": [torch.nn.Parameter(torch.zeros(3))]} for _ in range(groups)]
    return cls(params, lr=lr, **kwargs)


def run(scheduler, optimizer, steps):
    """(last_batch_iteration, lr of group 0) after each of ``steps`` optimizer+scheduler steps."""
    out = []
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        out.append((scheduler.last_batch_iteration, scheduler.get_last_lr()[0]))
    return out


@pytest.mark.parametrize("kind", ["log", "linear"])
def test_warmup_lr_matches_deepspeed_formula(kind):
    opt = make_optimizer()
    sched = WarmupLR(
        opt, warmup_min_lr=0.01, warmup_max_lr=0.2, warmup_num_steps=8, warmup_type=kind
    )
    # Construction leaves DeepSpeed's it == -1: the lr is warmup_min_lr.
    assert sched.last_batch_iteration == -1
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    history = run(sched, opt, 14)
    for k, (it, lr) in enumerate(history, start=1):
        assert it == k - 1  # after k calls of step(), DeepSpeed's counter is k - 1
        assert lr == pytest.approx(reference_lr(it, 0.01, 0.2, 8, kind), rel=1e-12, abs=1e-15)
    assert opt.param_groups[0]["lr"] == history[-1][1] == pytest.approx(0.2)


@pytest.mark.parametrize("kind", ["log", "linear"])
def test_warmup_decay_lr_matches_deepspeed_formula(kind):
    opt = make_optimizer()
    sched = WarmupDecayLR(
        opt,
        total_num_steps=20,
        warmup_min_lr=0.05,
        warmup_max_lr=0.5,
        warmup_num_steps=6,
        warmup_type=kind,
    )
    for it, lr in run(sched, opt, 26):
        expected = reference_lr(it, 0.05, 0.5, 6, kind, total=20)
        assert lr == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_hand_computed_values():
    # min 0.1, max 1.0, W = 4, total 10. log warm-up: it=1 -> log 2 / log 4 = 1/2; it=3 -> 1.
    # Decay: it=5 -> (10 - 5) / (10 - 4) = 5/6; it=10 -> 0, so the lr is back at min.
    opt = make_optimizer()
    sched = WarmupDecayLR(opt, 10, warmup_min_lr=0.1, warmup_max_lr=1.0, warmup_num_steps=4)
    lrs = dict(run(sched, opt, 12))
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[1] == pytest.approx(0.1 + 0.9 * 0.5)
    assert lrs[2] == pytest.approx(0.1 + 0.9 * math.log(3) / math.log(4))
    assert lrs[3] == pytest.approx(1.0)
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[5] == pytest.approx(0.1 + 0.9 * 5 / 6)
    assert lrs[10] == pytest.approx(0.1)
    assert lrs[11] == pytest.approx(0.1)

    opt = make_optimizer()
    sched = WarmupLR(
        opt, warmup_min_lr=0.0, warmup_max_lr=1.0, warmup_num_steps=4, warmup_type="linear"
    )
    lrs = dict(run(sched, opt, 6))
    assert [lrs[i] for i in range(6)] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0])


def test_defaults_are_deepspeeds():
    opt = make_optimizer()
    sched = WarmupLR(opt)
    assert sched.min_lrs == [0.0]
    assert sched.max_lrs == [0.001]
    assert sched.warmup_num_steps == 1000
    assert sched.warmup_type == "log"
    decay = WarmupDecayLR(make_optimizer(), total_num_steps=5000)
    assert (decay.max_lrs, decay.warmup_num_steps) == ([0.001], 1000)


def test_warmup_num_steps_one_behaves_as_two():
    opt = make_optimizer()
    sched = WarmupLR(opt, warmup_min_lr=0.0, warmup_max_lr=1.0, warmup_num_steps=1)
    assert sched.warmup_num_steps == 2
    assert [lr for _, lr in run(sched, opt, 3)] == pytest.approx([0.0, 1.0, 1.0])


def test_per_group_lists_and_none_max():
    opt = make_optimizer(groups=2)
    sched = WarmupLR(opt, warmup_min_lr=[0.0, 0.1], warmup_max_lr=(1.0, 2.0), warmup_num_steps=2)
    run(sched, opt, 3)
    assert sched.get_last_lr() == pytest.approx([1.0, 2.0])

    # None: each group warms up to its own starting lr.
    opt = torch.optim.SGD(
        [
            {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.3},
            {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.6},
        ],
        lr=0.1,
    )
    sched = WarmupLR(opt, warmup_max_lr=None, warmup_num_steps=2)
    run(sched, opt, 3)
    assert sched.get_last_lr() == pytest.approx([0.3, 0.6])

    with pytest.raises(ValueError, match="2 param groups"):
        WarmupLR(make_optimizer(groups=2), warmup_max_lr=[1.0, 2.0, 3.0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"warmup_num_steps": 0}, "warmup_num_steps"),
        ({"warmup_num_steps": -3}, "warmup_num_steps"),
        ({"warmup_num_steps": 2.5}, "warmup_num_steps"),
        ({"warmup_num_steps": True}, "warmup_num_steps"),
        ({"warmup_type": "cosine"}, "warmup_type"),
        ({"warmup_min_lr": -0.1}, "warmup_min_lr"),
        ({"warmup_max_lr": float("nan")}, "warmup_max_lr"),
        ({"warmup_max_lr": "0.1"}, "warmup_max_lr"),
        ({"warmup_min_lr": None}, "warmup_min_lr"),
        ({"last_batch_iteration": -2}, "last_batch_iteration"),
    ],
)
def test_invalid_params_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WarmupLR(make_optimizer(), **kwargs)


def test_invalid_total_num_steps_and_warning():
    for bad in (0, -1, 1.5, None):
        with pytest.raises(ValueError, match="total_num_steps"):
            WarmupDecayLR(make_optimizer(), total_num_steps=bad)
    with pytest.warns(UserWarning, match="less than warmup_num_steps"):
        WarmupDecayLR(make_optimizer(), total_num_steps=5, warmup_num_steps=10)
    with pytest.raises(TypeError, match="Optimizer"):
        WarmupLR(object())


def test_state_dict_round_trip():
    kwargs = dict(total_num_steps=30, warmup_min_lr=0.01, warmup_max_lr=0.3, warmup_num_steps=7)
    opt = make_optimizer()
    sched = WarmupDecayLR(opt, **kwargs)
    run(sched, opt, 9)
    buffer = io.BytesIO()
    torch.save(sched.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["last_batch_iteration"] == 8  # DeepSpeed's key, so DeepSpeed can read it too

    # A scheduler built with other hyperparameters takes the saved ones.
    opt2 = make_optimizer()
    sched2 = WarmupDecayLR(opt2, total_num_steps=99, warmup_max_lr=5.0, warmup_num_steps=3)
    sched2.load_state_dict(state)
    assert sched2.last_batch_iteration == 8
    assert run(sched2, opt2, 25) == run(sched, opt, 25)


def test_load_deepspeed_state_dict_and_resume():
    opt = make_optimizer()
    sched = WarmupLR(opt, warmup_min_lr=0.0, warmup_max_lr=1.0, warmup_num_steps=10)
    sched.load_state_dict({"last_batch_iteration": 4})  # what DeepSpeed saves
    assert sched.last_batch_iteration == 4
    ((it, lr),) = run(sched, opt, 1)
    assert it == 5 and lr == pytest.approx(reference_lr(5, 0.0, 1.0, 10, "log"))

    with pytest.raises(ValueError, match="last_epoch"):
        sched.load_state_dict({"foo": 1})

    # Resuming through the constructor (DeepSpeed's meaning of last_batch_iteration) on a fresh
    # optimizer that has no "initial_lr" yet.
    opt = make_optimizer()
    sched = WarmupLR(
        opt, warmup_min_lr=0.0, warmup_max_lr=1.0, warmup_num_steps=10, last_batch_iteration=5
    )
    assert sched.last_batch_iteration == 5
    assert opt.param_groups[0]["lr"] == pytest.approx(reference_lr(5, 0.0, 1.0, 10, "log"))
    assert run(sched, opt, 1)[0][0] == 6


def test_step_with_explicit_iteration():
    opt = make_optimizer()
    sched = WarmupLR(opt, warmup_min_lr=0.0, warmup_max_lr=1.0, warmup_num_steps=10)
    opt.step()
    sched.step(7)
    assert sched.last_batch_iteration == 7
    assert sched.get_last_lr()[0] == pytest.approx(reference_lr(7, 0.0, 1.0, 10, "log"))
    sched.step()
    assert sched.last_batch_iteration == 8


def test_drives_torch_adamw_without_warnings():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1.0, weight_decay=0.01)
    sched = WarmupDecayLR(
        opt, total_num_steps=12, warmup_max_lr=0.1, warmup_num_steps=4, warmup_type="linear"
    )
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's "step() before optimizer.step()" warning
        for _ in range(14):
            seen.append(opt.param_groups[0]["lr"])
            loss = model(torch.randn(8, 4)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    # The lr used at optimizer step k is DeepSpeed's lr at it = k - 2 (k = 1 uses it = -1).
    expected = [reference_lr(k - 2, 0.0, 0.1, 4, "linear", total=12) for k in range(1, 15)]
    assert seen == pytest.approx(expected)
    assert sched.get_last_lr() == [opt.param_groups[0]["lr"]]


def test_tensor_lr_stays_a_tensor():
    opt = make_optimizer(lr=torch.tensor(0.5), cls=torch.optim.AdamW, foreach=False)
    sched = WarmupLR(opt, warmup_min_lr=0.0, warmup_max_lr=1.0, warmup_num_steps=2)
    run(sched, opt, 3)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(1.0)


def test_build_scheduler_from_config():
    cfg = load_config(
        {
            "scheduler": {
                "type": "WarmupDecayLR",
                "params": {"total_num_steps": 50, "warmup_max_lr": 0.2, "warmup_num_steps": 5},
            }
        }
    )
    opt = make_optimizer()
    sched = build_scheduler(opt, cfg.scheduler)
    assert isinstance(sched, WarmupDecayLR)
    assert (sched.total_num_steps, sched.max_lrs, sched.warmup_num_steps) == (50, [0.2], 5)
    assert build_scheduler(opt, None) is None
    with pytest.raises(ValueError, match="supported: WarmupLR, WarmupDecayLR"):
        build_scheduler(opt, SchedulerConfig(type="OneCycle"))
    with pytest.raises(ValueError, match="warmup_typ"):
        build_scheduler(opt, SchedulerConfig(type="WarmupLR", params={"warmup_typ": "log"}))


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_config_defaults_match_class_signature(name):
    # The config fills in exactly the constructor's parameters, with its defaults.
    params = {
        p.name: p.default
        for p in inspect.signature(SCHEDULERS[name]).parameters.values()
        if p.name != "optimizer"
    }
    given = {"total_num_steps": 100} if "total_num_steps" in params else {}
    cfg = load_config({"scheduler": {"type": name, "params": given}})
    assert set(cfg.scheduler.params) == set(params)
    for key, default in params.items():
        if default is not inspect.Parameter.empty:
            assert cfg.scheduler.params[key] == default, key
