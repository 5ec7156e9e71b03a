"""FP16Optimizer and Engine over their lifetime: copies (deepcopy, pickle), torch.optim hooks,
and the log of skipped steps.

A copy is compared bitwise with an uncopied twin that runs the same steps: the copy runs the
same kernels on the same values, so any difference is state that the copy lost or shares with
the original, never rounding. The Triton backend runs through the interpreter on CPU
(conftest.py), so models are tiny.
"""

from __future__ import annotations

import copy
import logging
import math
import pickle
import re

import pytest
import torch
import torch.nn.functional as F
from comparing import assert_bitwise as assert_identical
from torch import nn

import fp16_triton
from fp16_triton import DynamicLossScaler, FP16Optimizer, LossScaler, MinLossScaleError

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"] if DEVICE == "cpu" else ["triton"]
LOGGER = "fp16_triton.skip_log"
ENGINE_LOGGER = "fp16_triton.engine"
# Steps whose first grad element is poisoned: a lone overflow, then two in a row (the second
# halves the scale after the first used up the hysteresis).
BAD = {1: math.inf, 4: math.nan, 5: -math.inf}
# (wrapped optimizer, backend): every fused optimizer on every backend, flat buffers, and
# torch.optim.AdamW through the generic path.
CASES = [
    *((kind, backend) for kind in ("adamw", "sgd", "adamw-flat") for backend in BACKENDS),
    ("generic", None),
]


# ------------------------------------------------------------------------------- helpers
def make_model(seed=0, dtype=torch.float16):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    return model.to(DEVICE, dtype)


def make_opt(model, kind="adamw", backend="torch", **kwargs):
    params = model.parameters()
    if kind == "generic":
        inner = torch.optim.AdamW(params, lr=1e-2)
    elif kind == "sgd":
        inner = fp16_triton.SGD(params, lr=1e-2, momentum=0.9, backend=backend)
    else:
        flat = kind == "adamw-flat"
        inner = fp16_triton.AdamW(params, lr=1e-2, backend=backend, flat_buffers=flat)
    kwargs.setdefault("loss_scaler", DynamicLossScaler(2.0**10, scale_window=2, hysteresis=2))
    return FP16Optimizer(inner, clip_grad=0.5, **kwargs)


def train_step(model, opt, step, bad=BAD):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(4, 6, generator=g).to(DEVICE, next(model.parameters()).dtype)
    y = torch.randn(4, 3, generator=g).to(DEVICE)
    opt.zero_grad()
    opt.backward(F.mse_loss(model(x).float(), y))
    if step in bad:
        model[0].weight.grad.view(-1)[0] = bad[step]
    opt.step()


def model_params(opt):
    """The model params an FP16Optimizer steps (the generic path's groups hold its masters)."""
    if opt.fused:
        return [p for g in opt.param_groups for p in g["params"]]
    return [p for p, _ in opt._masters]


def snapshot(model, opt):
    """Everything a continued run depends on: weights, wrapped state and masters, the scaler,
    the counters."""
    return copy.deepcopy((model.state_dict(), opt.state_dict()))


def clone(obj, how):
    return copy.deepcopy(obj) if how == "deepcopy" else pickle.loads(pickle.dumps(obj))


def skip_messages(caplog):
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOGGER and r.levelno == logging.WARNING and "OVERFLOW!" in r.getMessage()
    ]


def skip_counts(messages):
    return [int(re.search(r"skipped (\d+) optimizer step", m).group(1)) for m in messages]


# ------------------------------------------------------------------------ 1. copies
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize(("kind", "backend"), CASES)
def test_copy_continues_exactly_like_an_uncopied_twin(kind, backend, how):
    """Copied after a skipped step, original and copy then train on, interleaved, through two
    more overflows (the second one halves the scale): both end bitwise where a twin that was
    never copied ends. Shared state (masters, moments, counters, scaler, launch tables) would
    make one of them step twice or see the other's skips."""
    model = make_model()
    opt = make_opt(model, kind, backend)
    twin_model = make_model()
    twin = make_opt(twin_model, kind, backend)
    for step in range(3):
        train_step(model, opt, step)
        train_step(twin_model, twin, step)

    copy_model, copy_opt = clone((model, opt), how)
    assert_identical(snapshot(copy_model, copy_opt), snapshot(twin_model, twin))
    # The copy steps the copied model: the memo maps the optimizer's params to its params.
    assert [id(p) for p in model_params(copy_opt)] == [id(p) for p in copy_model.parameters()]
    assert not {id(p) for p in model_params(copy_opt)} & {id(p) for p in model.parameters()}

    for step in range(3, 7):
        train_step(model, opt, step)
        train_step(copy_model, copy_opt, step)
        train_step(twin_model, twin, step)
    expected = snapshot(twin_model, twin)
    assert expected[1]["skipped_steps"] == 3 and twin.loss_scale < 2.0**10
    assert_identical(snapshot(model, opt), expected, "original")
    assert_identical(snapshot(copy_model, copy_opt), expected, "copy")


@pytest.mark.parametrize("kind", ["adamw", "sgd", "adamw-flat", "generic"])
def test_deepcopy_alone_copies_the_params_as_torch_does(kind):
    """``copy.deepcopy(torch_optimizer)`` copies the params it holds (the memo starts empty);
    so does FP16Optimizer's. The copy is independent both ways: stepping the original leaves
    the copy as it was, and the copy steps its own params without touching the model."""
    reference = torch.optim.AdamW(make_model().parameters())
    first = reference.param_groups[0]["params"][0]
    assert copy.deepcopy(reference).param_groups[0]["params"][0] is not first

    model = make_model()
    opt = make_opt(model, kind)
    for step in range(2):
        train_step(model, opt, step)
    copied = copy.deepcopy(opt)
    for p, q in zip(model.parameters(), model_params(copied)):
        assert q is not p and torch.equal(q, p)
    copied_state = copy.deepcopy(copied.state_dict())

    train_step(model, opt, 2)
    assert_identical(copied.state_dict(), copied_state)

    before = snapshot(model, opt)
    for q in model_params(copied):
        q.grad = torch.full_like(q, 0.5)
    copied.step()
    assert not copied.overflow
    assert_identical(snapshot(model, opt), before)
    assert not torch.equal(model_params(copied)[0], model.state_dict()["0.weight"])


def test_a_copy_never_breaks_other_instances():
    """torch's ``Optimizer.__setstate__`` (and ``__init__``) wrap the *class's* step with
    ``profile_hook_step``, which reads the step-hook registries of whatever instance steps (the
    old failure: after one deepcopy, every other FP16Optimizer lacked
    ``_optimizer_step_pre_hooks``). FP16Optimizer.step runs the hooks itself and is marked as
    wrapped, so torch never wraps it; copies made either way, the original and a fresh
    instance all step."""
    model = make_model()
    opt = make_opt(model)
    step = FP16Optimizer.step
    train_step(model, opt, 0)
    copies = [copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))]
    opt._patch_step_function()  # what torch's Optimizer.__setstate__ would do
    assert FP16Optimizer.step is step
    fresh_model = make_model(seed=1)
    fresh = make_opt(fresh_model)
    for o in (opt, *copies):
        for p in model_params(o):
            p.grad = torch.full_like(p, 0.25)
        o.step()
        assert not o.overflow
    train_step(fresh_model, fresh, 0)
    assert opt.skipped_steps == fresh.skipped_steps == 0


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_drops_the_schedulers_step_wrapper(how):
    """An LR scheduler wraps ``optimizer.step`` on the instance with a function that steps the
    *original* (through a weak reference): copied along, the copy's step() would step the
    original model, and pickling would fail on the local function. torch's optimizers drop
    it; so does FP16Optimizer, and the copied scheduler drives the copied optimizer."""
    model = make_model()
    opt = make_opt(model, loss_scaler=LossScaler(8.0))
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    assert "step" in vars(opt)
    train_step(model, opt, 0, bad={})
    scheduler.step()
    copy_model, copy_opt, copy_scheduler = clone((model, opt, scheduler), how)
    assert "step" not in vars(copy_opt)

    before = snapshot(model, opt)
    train_step(copy_model, copy_opt, 1, bad={})
    copy_scheduler.step()
    assert_identical(snapshot(model, opt), before)
    assert not torch.equal(copy_model[0].weight, model[0].weight)
    assert copy_opt.param_groups[0]["lr"] == 2.5e-3 and opt.param_groups[0]["lr"] == 5e-3


def test_a_process_group_optimizer_refuses_to_be_copied():
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = make_model()
        opt = make_opt(model, process_group=dist.group.WORLD)
        train_step(model, opt, 0)
        for how in ("deepcopy", "pickle"):
            with pytest.raises(TypeError, match=r"process group.*state_dict\(\)"):
                clone(opt, how)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------ 2. hooks
def test_step_hooks_run_around_the_wrapper_step_and_are_not_copied():
    """Hooks registered on the FP16Optimizer (the optimizer users call step() on) see the
    params before and after the whole step; like torch's, copies start without them and a
    removed hook no longer runs."""
    model = make_model()
    opt = make_opt(model)
    calls = []

    def pre(o, args, kwargs):
        calls.append(("pre", o, model[0].weight.detach().clone()))

    def post(o, args, kwargs):
        calls.append(("post", o, model[0].weight.detach().clone()))

    handles = [opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)]
    before = model[0].weight.detach().clone()
    train_step(model, opt, 0)
    assert [(name, o) for name, o, _ in calls] == [("pre", opt), ("post", opt)]
    assert torch.equal(calls[0][2], before) and not torch.equal(calls[1][2], before)

    copy_model, copy_opt = copy.deepcopy((model, opt))
    train_step(copy_model, copy_opt, 2)
    assert len(calls) == 2
    for handle in handles:
        handle.remove()
    train_step(model, opt, 2)
    assert len(calls) == 2


def test_state_dict_hooks_run_as_on_torch_optimizers():
    """FP16Optimizer overrides state_dict/load_state_dict, so it must run torch's state-dict
    hooks itself; a post hook's returned dict replaces the state dict, as in torch."""
    model = make_model()
    opt = make_opt(model)
    train_step(model, opt, 0)
    events = []

    def add_tag(o, sd):
        events.append("state_dict")
        return {**sd, "tag": "mine"}

    def strip_tag(o, sd):
        assert sd.pop("tag") == "mine"
        return sd

    opt.register_state_dict_pre_hook(lambda o: events.append("pre"))
    opt.register_state_dict_post_hook(add_tag)
    opt.register_load_state_dict_pre_hook(strip_tag)
    opt.register_load_state_dict_post_hook(lambda o: events.append("loaded"))
    sd = opt.state_dict()
    assert sd["tag"] == "mine" and events == ["pre", "state_dict"]
    opt.load_state_dict(sd)  # the tag would be an unknown key without the pre hook
    assert "tag" in sd and events[-1] == "loaded"


# ---------------------------------------------------------------- 3. skipped-step log
# DeepSpeed's DynamicLossScaler (hysteresis 2, window 1000) over five overflows in a row from
# 2**10: the first uses up the hysteresis and keeps the scale, each later one halves it
# (hysteresis is refilled only by growth, not by a clean step).
EXPECTED_SKIPS = [
    (2, 1, "Attempted loss scale: 1024, but hysteresis is 2. Reducing hysteresis to 1"),
    (3, 2, "Attempted loss scale: 1024, reducing to 512"),
    (4, 3, "Attempted loss scale: 512, reducing to 256"),
    (5, 4, "Attempted loss scale: 256, reducing to 128"),
    (6, 5, "Attempted loss scale: 128, reducing to 64"),
]


def _five_overflows_then_two_clean(model, opt, after_each=None):
    for step in range(8):  # step() calls 1..8: clean, five overflows, two clean
        train_step(model, opt, step, bad={s: math.inf for s in range(1, 6)})
        if after_each is not None:
            after_each(step)


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU: each skip is logged by the step() itself")
@pytest.mark.parametrize("backend", [*BACKENDS, "generic"])
def test_every_skipped_step_is_logged_at_once_on_cpu(backend, caplog):
    model = make_model()
    kind = "generic" if backend == "generic" else "adamw"
    scaler = DynamicLossScaler(init_scale=2.0**10, scale_window=1000, hysteresis=2)
    opt = make_opt(model, kind, backend, loss_scaler=scaler)
    logged_by_step = []
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _five_overflows_then_two_clean(
            model, opt, lambda step: logged_by_step.append(sum(skip_counts(skip_messages(caplog))))
        )
    messages = skip_messages(caplog)
    assert logged_by_step == [0, 1, 2, 3, 4, 5, 5, 5]  # each at its own step
    assert sum(skip_counts(messages)) == opt.skipped_steps == 5
    expected = [
        f"OVERFLOW! skipped 1 optimizer step: step {step} ({total} skipped in total). {scales}"
        for step, total, scales in EXPECTED_SKIPS
    ]
    assert messages == expected
    assert opt.loss_scale == 64.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_every_skipped_step_is_logged_from_the_device_without_a_sync(caplog):
    """CUDA: records land in pinned memory asynchronously and are logged by a later step().
    With the device stalled, the host can run more steps ahead than the ring has slots, so
    some details may be dropped, but the counts add up once the device has caught up."""
    model = make_model()
    # Twenty overflows in a row reach the minimum scale: skip there rather than raise.
    scaler = DynamicLossScaler(2.0**10, raise_error_at_min_scale=False)
    opt = make_opt(model, "adamw", "triton", loss_scaler=scaler)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _five_overflows_then_two_clean(model, opt)
        torch.cuda.synchronize()
        train_step(model, opt, 8)  # its poll reads every record: all have landed
        assert sum(skip_counts(skip_messages(caplog))) == 5
        assert skip_messages(caplog) == [
            f"OVERFLOW! skipped 1 optimizer step: step {s} ({t} skipped in total). {m}"
            for s, t, m in EXPECTED_SKIPS
        ]
        caplog.clear()
        opt.loss_scaler.load_state_dict({**opt.loss_scaler.state_dict(), "cur_scale": 2.0**10})
        torch.cuda._sleep(2_000_000_000)  # about a second of device time
        for step in range(20):
            train_step(model, opt, step, bad={step: math.inf})
        torch.cuda.synchronize()
        train_step(model, opt, 100, bad={})
    assert sum(skip_counts(skip_messages(caplog))) == 20
    assert opt.skipped_steps == 25


def test_unread_records_are_reported_together_so_counts_add_up():
    """Records that were overwritten before they could be read (a host far ahead of a CUDA
    device) leave a gap in the running total: the next record read reports it in one line."""
    from fp16_triton.skip_log import SkipLog

    log = SkipLog(torch.device("cpu"), dynamic=True)
    records = {  # step: [total, skipped now, attempted, hysteresis, new scale, hysteresis after]
        3: [1, 1, 1024, 1, 512, 1],
        9: [5, 1, 64, 1, 32, 1],  # steps 4..8 not read: three of them skipped
        10: [5, 0, 32, 1, 32, 1],
    }
    with pytest.MonkeyPatch.context() as mp:
        lines = []
        mp.setattr("fp16_triton.skip_log.logger.warning", lambda msg, *a: lines.append(msg % a))
        for step, record in records.items():
            log._report(step, [float(v) for v in record])
    assert lines == [
        "OVERFLOW! skipped 1 optimizer step: step 3 (1 skipped in total). Attempted loss scale: "
        "1024, reducing to 512",
        "OVERFLOW! skipped 3 optimizer step(s) after step 3 and before step 9 (4 skipped in "
        "total); their loss scales were not read in time",
        "OVERFLOW! skipped 1 optimizer step: step 9 (5 skipped in total). Attempted loss scale: "
        "64, reducing to 32",
    ]
    assert sum(skip_counts(lines)) == 5


@pytest.mark.parametrize("raise_at_min", [False, True])
def test_skips_at_the_minimum_scale_say_so_before_any_error(raise_at_min, caplog):
    model = make_model()
    scaler = DynamicLossScaler(
        init_scale=1.0, min_scale=1.0, hysteresis=1, raise_error_at_min_scale=raise_at_min
    )
    opt = make_opt(model, loss_scaler=scaler)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        train_step(model, opt, 0, bad={0: math.inf})
        if raise_at_min:
            with pytest.raises(MinLossScaleError):
                train_step(model, opt, 1, bad={})
        else:
            train_step(model, opt, 1, bad={1: math.nan})
        opt.log_skipped_steps()  # on a GPU a skip is logged once its record lands
    expected = ["OVERFLOW! skipped 1 optimizer step: step 1 (1 skipped in total). "]
    if not raise_at_min:
        expected.append("OVERFLOW! skipped 1 optimizer step: step 2 (2 skipped in total). ")
    expected = [e + "Attempted loss scale: 1, already at the minimum" for e in expected]
    assert skip_messages(caplog) == expected


def test_log_goes_on_from_a_loaded_state_dict(caplog):
    """step numbers and totals in the log continue from a checkpoint, not from zero."""
    model = make_model()
    opt = make_opt(model, loss_scaler=LossScaler(16.0))
    for step in range(3):
        train_step(model, opt, step)
    saved = copy.deepcopy(opt.state_dict())
    assert (saved["step_calls"], saved["skipped_steps"]) == (3, 1)
    fresh_model = make_model()
    fresh = make_opt(fresh_model, loss_scaler=LossScaler(16.0))
    fresh_model.load_state_dict(model.state_dict())
    fresh.load_state_dict(saved)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        train_step(fresh_model, fresh, 4)
        fresh.log_skipped_steps()  # on a GPU a skip is logged once its record lands
    assert skip_messages(caplog) == [
        "OVERFLOW! skipped 1 optimizer step: step 4 (2 skipped in total). Loss scale: 16 (static)"
    ]


# ------------------------------------------------------------------------ 4. engine
ENGINE_CONFIG = {
    "fp16": {"enabled": True, "initial_scale_power": 10, "loss_scale_window": 2},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 4, "warmup_max_lr": 1e-2}},
    "gradient_clipping": 0.5,
    "steps_per_print": 1,
}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def make_engine(seed=0, backend="torch", **kwargs):
    torch.manual_seed(seed)
    config = copy.deepcopy(ENGINE_CONFIG)
    model = MLP().to(DEVICE)
    engine, *_ = fp16_triton.initialize(model=model, config=config, backend=backend, **kwargs)
    return engine


def engine_step(engine, step, bad=BAD):
    g = torch.Generator().manual_seed(300 + step)
    x, y = torch.randn(4, 6, generator=g).to(DEVICE), torch.randn(4, 3, generator=g).to(DEVICE)
    engine.backward(F.mse_loss(engine(x.to(engine.dtype)).float(), y))
    if step in bad:
        engine.module.fc1.weight.grad.view(-1)[0] = bad[step]
    engine.step()


def engine_snapshot(engine):
    return copy.deepcopy(
        {
            "module": engine.module.state_dict(),
            "optimizer": engine.optimizer.state_dict(),
            "lr_scheduler": engine.lr_scheduler.state_dict(),
            "lr": engine.get_lr(),
            "counters": (engine.global_steps, engine.micro_steps, engine.global_samples),
        }
    )


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_copy_continues_exactly_like_an_uncopied_twin(backend, how):
    engine, twin = make_engine(backend=backend), make_engine(backend=backend)
    for step in range(3):
        engine_step(engine, step)
        engine_step(twin, step)
    copied = clone(engine, how)
    assert_identical(engine_snapshot(copied), engine_snapshot(twin))
    params = [id(p) for p in copied.module.parameters()]
    assert [id(p) for p in model_params(copied.optimizer)] == params
    assert copied.lr_scheduler.optimizer is copied.optimizer
    for step in range(3, 7):
        engine_step(engine, step)
        engine_step(copied, step)
        engine_step(twin, step)
    expected = engine_snapshot(twin)
    assert expected["optimizer"]["skipped_steps"] == 3
    assert_identical(engine_snapshot(engine), expected, "original")
    assert_identical(engine_snapshot(copied), expected, "copy")


def test_data_parallel_engine_refuses_to_be_copied_and_says_what_to_do():
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        engine = make_engine(data_parallel="ddp")
        for how in ("deepcopy", "pickle"):
            with pytest.raises(TypeError, match="save_checkpoint"):
                clone(engine, how)
    finally:
        dist.destroy_process_group()


def test_engine_report_counts_only_skips_already_logged(caplog):
    """The engine's periodic line (steps_per_print=1 here) counts skipped steps; every step it
    counts has been logged by the optimizer before that line, and the increments add up."""
    engine = make_engine()
    # One at_level: it sets the capturing handler's level too (INFO lets both loggers through).
    with caplog.at_level(logging.INFO, logger=ENGINE_LOGGER):
        for step in range(8):
            engine_step(engine, step, bad={s: math.inf for s in range(1, 6)})
    logged, increments = 0, []
    for record in caplog.records:
        message = record.getMessage()
        if record.name == LOGGER and "OVERFLOW!" in message:
            logged += skip_counts([message])[0]
        elif record.name == ENGINE_LOGGER and message.startswith("step="):
            total, plus = map(int, re.search(r"skipped=(\d+) \(\+(\d+)\)", message).groups())
            assert total == logged
            increments.append(plus)
    assert increments == [0, 1, 1, 1, 1, 1, 0, 0]
    assert logged == engine.skipped_steps == 5
