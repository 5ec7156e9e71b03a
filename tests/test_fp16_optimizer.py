"""FP16Optimizer: loss scaling, the non-finite skip, clipping and checkpoints, on both backends.

The wrapped optimizer is ``fp16_triton.AdamW(..., backend=b)`` (the fused path) unless a test
says otherwise; the generic path wraps ``torch.optim.AdamW``. The Triton backend runs through
the interpreter on CPU (see conftest.py), so models are tiny.

Tolerances. Trajectories of fp32 masters against ``torch.optim.AdamW`` on fp32 copies use
torch's default fp32 tolerance (rtol=1.3e-6, atol=1e-5), as tests/test_optimizers.py does: the
loss scales are powers of two, so ``grad * (1 / scale)`` (kernel) and ``grad / scale``
(reference) are the same exact value, and what is left is the few-ulp difference of the Adam
update itself (fp64 bias corrections, one rounding per op). With clipping the kernel's
squared norm is a sum of per-program partials while torch's ``clip_grad_norm_`` takes the norm
of per-tensor norms: the clip coefficients differ by a few ulps, which Adam's normalised update
(m / sqrt(v)) all but cancels, so the same tolerance holds. Checks that must be exact (skipped
steps, state dict round trips, fp16 param == master rounded) compare bytes.
"""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch

import fp16_triton
from fp16_triton import DynamicLossScaler, FP16Optimizer, LossScaler, MinLossScaleError

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"] if DEVICE == "cpu" else ["triton"]
RTOL, ATOL = 1.3e-6, 1e-5
LOGGER = "fp16_triton.skip_log"  # where skipped steps are reported
IN, HIDDEN, OUT, BATCH = 6, 5, 3, 4


# ------------------------------------------------------------------------------- helpers
def make_model(dtype=torch.float16, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, OUT)
    )
    return model.to(DEVICE, dtype)


def batch(step, dtype):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, IN, generator=g).to(DEVICE, dtype)
    y = torch.randn(BATCH, OUT, generator=g).to(DEVICE)
    return x, y


def loss_of(model, step):
    x, y = batch(step, next(model.parameters()).dtype)
    return (model(x).float() - y).square().mean()


def wrap(model, backend, lr=1e-2, **kwargs):
    return FP16Optimizer(fp16_triton.AdamW(model.parameters(), lr=lr, backend=backend), **kwargs)


def inject(model, value, index=0):
    """Put ``value`` (inf or nan) into one element of the first weight's grad."""
    model[0].weight.grad.view(-1)[index] = value


def train_step(opt, model, step, bad=None):
    """zero_grad, scaled backward, optionally poison one grad, step. Returns the scale used."""
    opt.zero_grad()
    scale_used = opt.loss_scale
    opt.backward(loss_of(model, step))
    if bad is not None:
        inject(model, bad)
    opt.step()
    return scale_used


def masters(opt, model):
    """The fp32 masters: the fused optimizer's ``master_param`` state, or the params that the
    generic path put in the wrapped optimizer's groups."""
    if opt.fused:
        return [opt.state[p]["master_param"] for p in model.parameters()]
    return [m for g in opt.optimizer.param_groups for m in g["params"]]


def make_opt(model, backend, **kwargs):
    """FP16Optimizer over fp16_triton.AdamW(backend) or, for "generic", torch.optim.AdamW."""
    params = model.parameters()
    if backend == "generic":
        return FP16Optimizer(torch.optim.AdamW(params, lr=1e-2), **kwargs)
    return FP16Optimizer(fp16_triton.AdamW(params, lr=1e-2, backend=backend), **kwargs)


def frozen(opt, model):
    """Everything a skipped step must leave alone: params and the optimizer's state (masters,
    moments, step counts; the generic path's fp32 masters), deep-copied."""
    sd = opt.state_dict()
    return copy.deepcopy((model.state_dict(), sd["optimizer"]["state"], sd.get("fp32_masters")))


def unscaled_norm64(model, scale):
    """float64 global 2-norm of the model's grads divided by ``scale``."""
    return math.sqrt(
        sum((p.grad.double() / scale).square().sum().item() for p in model.parameters())
    )


def assert_bitwise_equal(a, b):
    """Equal bytes (NaN-safe, -0.0 != 0.0), recursively through dicts, lists and tuples."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
        assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_bitwise_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_bitwise_equal(x, y)
    else:
        assert a == b


def assert_close(actual, expected, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def assert_moments_close(actual, expected):
    """Adam moments: rtol 1e-5 with an absolute floor of 1e-6 times the largest magnitude in
    the tensor (about 8 ulps of its largest entry). The moments are running sums in which an
    entry can nearly cancel, so its own relative error is not bounded by the inputs'; a floor
    tied to the tensor's scale stays meaningful for exp_avg_sq (~1e-6 here), which a fixed
    atol of 1e-5 would not check at all. Measured: at most ~1.5e-7 of the largest entry."""
    floor = 1e-6 * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=floor)


def ds_scales(events, init_scale, scale_window, hysteresis, min_scale=1.0, factor=2.0):
    """DeepSpeed 0.19 ``DynamicLossScaler.update_scale`` in plain Python (see
    deepspeedai/DeepSpeed: ``deepspeed/runtime/fp16/loss_scaler.py``): the scale after each event
    (True = overflow)."""
    scale, hyst, it, last = init_scale, hysteresis, 0, -1
    out = []
    for overflow in events:
        if overflow:
            if hysteresis == 1 or hyst == 1:
                assert scale != min_scale, "would raise"
                scale = max(scale / factor, min_scale)
            else:
                hyst -= 1
            last = it
        else:
            stable = it - last - 1
            if stable > 0 and stable % scale_window == 0:
                hyst = hysteresis
                scale *= factor
        it += 1
        out.append(scale)
    return out


# ------------------------------------------------------------------ 1. overflow skips
@pytest.mark.parametrize("backend", BACKENDS)
def test_overflow_skips_bitwise_and_backs_off_with_hysteresis(backend):
    model = make_model()
    scaler = DynamicLossScaler(init_scale=2.0**10, scale_window=1000, hysteresis=2)
    opt = wrap(model, backend, loss_scaler=scaler)
    events = [None, float("inf"), float("nan"), None, float("-inf"), None]
    # Hysteresis 2: the first overflow only uses it up, the second halves the scale; it is not
    # refilled by one clean step (not consecutive), so the next overflow halves again.
    expected_scales = [1024.0, 1024.0, 512.0, 512.0, 256.0, 256.0]
    assert expected_scales == ds_scales([e is not None for e in events], 1024.0, 1000, 2)
    skipped = 0
    for step, bad in enumerate(events):
        before = frozen(opt, model)
        train_step(opt, model, step, bad)
        assert opt.overflow is (bad is not None)
        if bad is not None:
            skipped += 1
            assert_bitwise_equal(frozen(opt, model), before)
        else:
            assert not torch.equal(model[0].weight, before[0]["0.weight"])
        assert opt.skipped_steps == skipped
        assert opt.loss_scale == expected_scales[step]
        assert opt.cur_scale == expected_scales[step]
    steps_taken = len(events) - skipped
    for p in model.parameters():
        assert opt.state[p]["step"].item() == steps_taken


@pytest.mark.parametrize("backend", [*BACKENDS, "generic"])
def test_overflow_on_the_very_first_step_applies_nothing(backend):
    """A first step that overflows may create the (zero) state, as torch's fused optimizers do
    under GradScaler, but must not count a step, move a moment or change a param."""
    model = make_model()
    opt = make_opt(model, backend, loss_scaler=DynamicLossScaler(init_scale=2.0**10))
    before = copy.deepcopy(model.state_dict())
    train_step(opt, model, 0, bad=float("nan"))
    assert opt.overflow and opt.skipped_steps == 1
    assert_bitwise_equal(model.state_dict(), before)
    for state in opt.state.values():
        assert state["step"].item() == 0
        assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    for m, w in zip(masters(opt, model), before.values()):
        assert_bitwise_equal(m.detach(), w.float())


# ------------------------------------------------------- 2. unscale with the backward scale
@pytest.mark.parametrize("backend", BACKENDS)
def test_unscale_uses_the_scale_of_backward_not_the_grown_one(backend):
    """scale_window=1: the scale doubles after every clean step from the second on. Each step
    must divide by the scale used in backward (DeepSpeed PR 8588); dividing by the grown one
    would halve the grads fed to the moments, which exp_avg (linear in the grads) shows."""
    model = make_model()
    opt = wrap(model, backend, loss_scaler=DynamicLossScaler(init_scale=256.0, scale_window=1))
    ref_params = [p.detach().float().clone().requires_grad_() for p in model.parameters()]
    ref = torch.optim.AdamW(ref_params, lr=1e-2)
    used = []
    for step in range(5):
        opt.zero_grad()
        scale_used = opt.loss_scale
        opt.backward(loss_of(model, step))
        for p, q in zip(model.parameters(), ref_params):
            q.grad = p.grad.float() / scale_used
        opt.step()
        ref.step()
        used.append(scale_used)
    assert used == [256.0, 256.0, 512.0, 1024.0, 2048.0]
    assert opt.loss_scale == 4096.0
    for p, q in zip(model.parameters(), ref_params):
        assert_close(opt.state[p]["master_param"], q.detach())
        for key in ("exp_avg", "exp_avg_sq"):
            assert_moments_close(opt.state[p][key], ref.state[q][key])
        assert torch.equal(p.detach(), opt.state[p]["master_param"].half())


# ----------------------------------------------------------------------------- 3. clipping
@pytest.mark.parametrize("backend", BACKENDS)
def test_clipping_matches_clip_grad_norm_on_unscaled_grads(backend):
    clip = 0.05
    model = make_model()
    opt = wrap(model, backend, clip_grad=clip, loss_scaler=DynamicLossScaler(init_scale=2.0**10))
    ref_params = [p.detach().float().clone().requires_grad_() for p in model.parameters()]
    ref = torch.optim.AdamW(ref_params, lr=1e-2)
    for step in range(6):
        opt.zero_grad()
        scale = opt.loss_scale
        opt.backward(loss_of(model, step))
        for p, q in zip(model.parameters(), ref_params):
            q.grad = p.grad.float() / scale
        norm64 = unscaled_norm64(model, scale)
        torch.nn.utils.clip_grad_norm_(ref_params, clip)
        opt.step()
        ref.step()
        assert norm64 > clip  # clipping is active on every step
        # The reported norm is the unscaled, pre-clip norm: not multiplied by the loss scale.
        assert opt.global_grad_norm == pytest.approx(norm64, rel=1e-5)
        assert opt.global_grad_norm < norm64 * scale / 2
    for p, q in zip(model.parameters(), ref_params):
        assert_close(opt.state[p]["master_param"], q.detach())
        for key in ("exp_avg", "exp_avg_sq"):
            # The moments see the clip coefficient directly: few-ulp differences.
            assert_moments_close(opt.state[p][key], ref.state[q][key])


@pytest.mark.parametrize("backend", BACKENDS)
def test_global_grad_norm_is_unscaled_without_clipping(backend):
    model = make_model()
    opt = wrap(model, backend, loss_scaler=LossScaler(512.0))
    opt.backward(loss_of(model, 0))
    norm64 = unscaled_norm64(model, 512.0)
    opt.step()
    assert opt.global_grad_norm == pytest.approx(norm64, rel=1e-5)


# --------------------------------------------------------------------------------- 4. bf16
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_no_scaling_nan_skips_and_is_logged(backend, caplog):
    model = make_model(torch.bfloat16)
    opt = wrap(model, backend)
    assert opt.loss_scale == 1.0 and not opt.loss_scaler.dynamic
    train_step(opt, model, 0)
    before = frozen(opt, model)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        train_step(opt, model, 1, bad=float("nan"))
        assert opt.overflow and opt.skipped_steps == 1
        assert_bitwise_equal(frozen(opt, model), before)
        # Logged from a copy of the flag: at once on the CPU, a step or two late on CUDA (so
        # that nothing syncs).
        train_step(opt, model, 2)
    assert not opt.overflow and opt.skipped_steps == 1
    records = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(records) == 1
    assert "skipped 1 optimizer step" in records[0].getMessage()


def _count_check_calls(monkeypatch):
    import fp16_triton.kernels.nonfinite as triton_mod
    import fp16_triton.kernels.reference as reference_mod

    calls = []
    entry_points = [
        (triton_mod, "nonfinite_check_and_norm"),
        (triton_mod, "check_and_norm_grouped"),  # the fused path's pre-grouped variant
        (reference_mod, "nonfinite_check_and_norm"),
    ]
    for mod, name in entry_points:
        original = getattr(mod, name)

        def counting(*args, _original=original, **kwargs):
            calls.append(1)
            return _original(*args, **kwargs)

        monkeypatch.setattr(mod, name, counting)
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_check_nonfinite_false_runs_no_check_pass(backend, monkeypatch):
    calls = _count_check_calls(monkeypatch)
    model = make_model(torch.bfloat16)
    opt = wrap(model, backend, check_nonfinite=False)
    before = model[0].weight.detach().clone()
    for step in range(2):
        train_step(opt, model, step)
    assert calls == []
    assert not torch.equal(model[0].weight, before)  # the steps were applied
    # Control: the counter sees the pass when the check is on (one per step).
    model = make_model(torch.bfloat16)
    opt = wrap(model, backend)
    for step in range(2):
        train_step(opt, model, step)
    assert len(calls) == 2


# -------------------------------------------------------------------- 5. static-scale logs
@pytest.mark.parametrize("backend", BACKENDS)
def test_skips_are_logged_under_a_static_scale(backend, caplog):
    model = make_model()
    opt = wrap(model, backend, loss_scaler=LossScaler(128.0))
    train_step(opt, model, 0)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        before = frozen(opt, model)
        train_step(opt, model, 1, bad=float("inf"))
        assert opt.overflow and opt.skipped_steps == 1
        assert_bitwise_equal(frozen(opt, model), before)
        train_step(opt, model, 2)
    assert opt.loss_scale == 128.0 and not opt.overflow
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(messages) == 1
    assert "skipped 1 optimizer step" in messages[0] and "static" in messages[0]


# ------------------------------------------------------------------------ 6. min-scale error
@pytest.mark.parametrize("backend", BACKENDS)
def test_min_scale_error_raised_with_nothing_applied(backend):
    model = make_model()
    scaler = DynamicLossScaler(init_scale=1.0, min_scale=1.0, hysteresis=1)
    opt = wrap(model, backend, loss_scaler=scaler)
    train_step(opt, model, 0)
    before = frozen(opt, model)
    raised_at = None
    for step in range(1, 4):
        try:
            train_step(opt, model, step, bad=float("inf"))
        except MinLossScaleError as error:
            assert "Current loss scale already at minimum" in str(error)
            raised_at = step
            break
        assert_bitwise_equal(frozen(opt, model), before)
    # At the overflowing step (host path) or the next step() call (device flag, documented).
    assert raised_at in (1, 2)
    assert_bitwise_equal(frozen(opt, model), before)
    assert opt.loss_scale == 1.0
    # Raising clears the error: a clean step afterwards trains again.
    train_step(opt, model, 5)
    assert not opt.overflow
    assert not torch.equal(model[0].weight, before[0]["0.weight"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_min_scale_error_deferred_step_applies_nothing_even_for_clean_grads(backend):
    """The step() that surfaces a deferred error must not apply its (clean) grads."""
    model = make_model()
    scaler = DynamicLossScaler(init_scale=1.0, min_scale=1.0, hysteresis=1)
    opt = wrap(model, backend, loss_scaler=scaler)
    train_step(opt, model, 0)
    before = frozen(opt, model)
    try:
        train_step(opt, model, 1, bad=float("nan"))
    except MinLossScaleError:
        return  # raised at once: nothing deferred
    with pytest.raises(MinLossScaleError, match="Current loss scale already at minimum"):
        train_step(opt, model, 2)
    assert_bitwise_equal(frozen(opt, model), before)


# --------------------------------------------------------------------- 7. no warm-up step
@pytest.mark.parametrize("backend", [*BACKENDS, "generic"])
def test_construction_takes_no_warm_up_step(backend):
    model = make_model()
    before = copy.deepcopy(model.state_dict())
    if backend == "generic":
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    else:
        inner = fp16_triton.AdamW(model.parameters(), lr=1e-2, backend=backend)
    opt = FP16Optimizer(inner)
    assert len(opt.state) == 0 and len(inner.state) == 0
    assert_bitwise_equal(model.state_dict(), before)
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------- 8. scaler arguments
@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_scaler_from_deepspeed_config_dict(backend):
    model = make_model()
    config = {"loss_scale": 0, "initial_scale_power": 8, "loss_scale_window": 2, "hysteresis": 1}
    opt = wrap(model, backend, loss_scaler=config)
    scaler = opt.loss_scaler
    assert isinstance(scaler, DynamicLossScaler)
    assert (scaler.scale_window, scaler.hysteresis, opt.loss_scale) == (2, 1, 256.0)
    events = [False, False, False, True, False]
    scales = []
    for step, overflow in enumerate(events):
        train_step(opt, model, step, float("inf") if overflow else None)
        scales.append(opt.loss_scale)
    # Window 2: growth after the second clean iteration; hysteresis 1: halves at once.
    assert scales == [256.0, 256.0, 512.0, 256.0, 256.0]
    assert scales == ds_scales(events, 256.0, 2, 1)


@pytest.mark.parametrize(
    ("dtype", "dynamic", "scale"),
    [(torch.float16, True, 2.0**16), (torch.bfloat16, False, 1.0), (torch.float32, False, 1.0)],
)
def test_loss_scaler_none_defaults_by_dtype(dtype, dynamic, scale):
    opt = wrap(make_model(dtype), "torch", loss_scaler=None)
    assert opt.loss_scaler.dynamic is dynamic
    assert opt.loss_scale == scale


def test_config_dict_for_bf16_model_does_not_scale():
    opt = wrap(make_model(torch.bfloat16), "torch", loss_scaler={"initial_scale_power": 8})
    assert not opt.loss_scaler.dynamic and opt.loss_scale == 1.0


def test_bad_config_key_names_the_closest_key():
    with pytest.raises(ValueError, match="loss_scale_window"):
        wrap(make_model(), "torch", loss_scaler={"loss_scale_windw": 2})


def test_wrapping_a_non_optimizer_raises_type_error():
    model = make_model()
    with pytest.raises(TypeError, match=r"wraps a torch\.optim\.Optimizer.*got Sequential"):
        FP16Optimizer(model)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        FP16Optimizer(list(model.parameters()))
    with pytest.raises(TypeError, match="got FP16Optimizer"):
        FP16Optimizer(wrap(model, "torch"))
    with pytest.raises(TypeError, match="loss_scaler must be"):
        wrap(model, "torch", loss_scaler=128.0)


# --------------------------------------------------------------------------- 9. state dicts
OVERFLOWS = {1: float("inf"), 2: float("nan"), 7: float("inf")}


def _run(opt, model, steps):
    for step in steps:
        train_step(opt, model, step, OVERFLOWS.get(step))


@pytest.mark.parametrize("backend", [*BACKENDS, "generic"])
def test_state_dict_round_trip_continues_bitwise(backend):
    model = make_model()
    scaler = DynamicLossScaler(init_scale=2.0**10, scale_window=2, hysteresis=2)
    opt = make_opt(model, backend, loss_scaler=scaler)
    _run(opt, model, range(5))
    assert opt.skipped_steps == 2
    saved_model = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy(opt.state_dict())
    _run(opt, model, range(5, 9))

    fresh_model = make_model(seed=1)  # different weights until loaded
    fresh = make_opt(fresh_model, backend)  # default scaler (2**16, window 1000): overwritten
    fresh_model.load_state_dict(saved_model)
    fresh.load_state_dict(saved)
    assert fresh.skipped_steps == 2
    _run(fresh, fresh_model, range(5, 9))

    assert_bitwise_equal(fresh_model.state_dict(), model.state_dict())
    assert_bitwise_equal(masters(fresh, fresh_model), masters(opt, model))
    assert_bitwise_equal(fresh.state_dict()["optimizer"], opt.state_dict()["optimizer"])
    assert fresh.loss_scaler.state_dict() == opt.loss_scaler.state_dict()
    assert fresh.skipped_steps == opt.skipped_steps == 3


def _section(name, **changes):
    return lambda sd: sd[name].update(changes)


def _drop_a_param(sd):
    sd["optimizer"]["param_groups"][0]["params"].pop()


CORRUPT = {
    "negative-scale": _section("loss_scaler", cur_scale=-1.0),
    "hysteresis-above-max": _section("loss_scaler", cur_hysteresis=5),
    "unknown-key": _section("loss_scaler", scale_windw=3),
    "wrong-kind": _section("loss_scaler", dynamic=False),
    "no-scaler": lambda sd: sd.pop("loss_scaler"),
    # A valid scaler section with a bad optimizer section: the scaler must not be loaded.
    "optimizer-param-count": _drop_a_param,
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("corrupt", sorted(CORRUPT))
def test_corrupt_state_dict_raises_and_changes_nothing(backend, corrupt):
    model = make_model()
    opt = wrap(model, backend, loss_scaler=DynamicLossScaler(init_scale=2.0**10, scale_window=2))
    _run(opt, model, range(1, 3))  # one skipped step, one clean
    other_model = make_model(seed=3)
    other = wrap(other_model, backend, loss_scaler=DynamicLossScaler(init_scale=8.0))
    _run(other, other_model, [0])  # a different, valid state to load from
    sd = copy.deepcopy(other.state_dict())
    CORRUPT[corrupt](sd)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError):
        opt.load_state_dict(sd)
    assert_bitwise_equal(opt.state_dict(), before)


def test_corrupt_skipped_steps_raises_and_changes_nothing():
    """load_state_dict promises to check everything first and change nothing on error; a bad
    top-level ``skipped_steps`` must not leave the optimizer and scaler already loaded."""
    model = make_model()
    opt = wrap(model, "torch", loss_scaler=DynamicLossScaler(init_scale=2.0**10))
    _run(opt, model, range(1, 3))
    other_model = make_model(seed=3)
    other = wrap(other_model, "torch", loss_scaler=DynamicLossScaler(init_scale=8.0))
    _run(other, other_model, [0])
    sd = copy.deepcopy(other.state_dict())
    sd["skipped_steps"] = "three"
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError):
        opt.load_state_dict(sd)
    assert_bitwise_equal(opt.state_dict(), before)


# ------------------------------------------------------------------ 10. refresh masters
@pytest.mark.parametrize("backend", BACKENDS)
def test_refresh_fp32_params_after_loading_model_weights(backend):
    model = make_model()
    opt = wrap(model, backend, loss_scaler=LossScaler(64.0))
    _run(opt, model, [0, 3])  # masters and moments exist
    other = make_model(seed=5).state_dict()
    model.load_state_dict(other)
    opt.refresh_fp32_params()
    for p, w in zip(model.parameters(), other.values()):
        assert_bitwise_equal(opt.state[p]["master_param"], w.float())

    # The next step starts from the new weights: torch.optim.AdamW on fp32 copies of them,
    # with our moments and step counts, fed the same unscaled grads.
    ref_params = [w.float().clone().requires_grad_() for w in other.values()]
    ref = torch.optim.AdamW(ref_params, lr=1e-2)
    ref_state = ref.state_dict()
    for i, p in enumerate(model.parameters()):
        ref_state["state"][i] = {
            k: opt.state[p][k].clone() for k in ("step", "exp_avg", "exp_avg_sq")
        }
    ref.load_state_dict(ref_state)
    opt.zero_grad()
    opt.backward(loss_of(model, 4))
    for p, q in zip(model.parameters(), ref_params):
        q.grad = p.grad.float() / 64.0
    opt.step()
    ref.step()
    for p, q in zip(model.parameters(), ref_params):
        assert_close(opt.state[p]["master_param"], q.detach())
        assert torch.equal(p.detach(), opt.state[p]["master_param"].half())


def test_refresh_fp32_params_generic_path():
    model = make_model()
    opt = FP16Optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    _run(opt, model, [0, 3])
    other = make_model(seed=5).state_dict()
    model.load_state_dict(other)
    opt.refresh_fp32_params()
    group_params = opt.optimizer.param_groups[0]["params"]
    for m, w in zip(group_params, other.values()):
        assert_bitwise_equal(m.detach(), w.float())
    train_step(opt, model, 4)
    for p, m, w in zip(model.parameters(), group_params, other.values()):
        assert torch.equal(p.detach(), m.detach().half())
        # One Adam step moves each weight by about lr (1e-2) at most; the stale masters were
        # the other model's weights, O(0.1..1) away.
        assert (m.detach() - w.float()).abs().max() < 0.05


# --------------------------------------------------------------------- 11. generic path
def test_generic_path_trains_with_fp32_masters_and_skips():
    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = FP16Optimizer(inner, loss_scaler=DynamicLossScaler(init_scale=2.0**10, hysteresis=1))
    assert not opt.fused
    group_params = inner.param_groups[0]["params"]
    assert all(m.dtype == torch.float32 for m in group_params)
    for step in range(8):
        bad = OVERFLOWS.get(step)
        before = frozen(opt, model)
        scale = opt.loss_scale
        train_step(opt, model, step, bad)
        if bad is not None:
            assert opt.overflow
            assert_bitwise_equal(frozen(opt, model), before)
            assert opt.loss_scale == scale / 2
        else:
            assert not opt.overflow
        for p, m in zip(model.parameters(), group_params):
            assert p.dtype == torch.float16
            assert torch.equal(p.detach(), m.detach().half())  # exactly the master rounded
    assert opt.skipped_steps == 3
    assert all(inner.state[m]["step"].item() == 5 for m in group_params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_generic_path_matches_fused_path(backend):
    clip = 0.05
    runs = []
    for fused in (True, False):
        model = make_model()
        params = model.parameters()
        inner = (
            fp16_triton.AdamW(params, lr=1e-2, backend=backend)
            if fused
            else torch.optim.AdamW(params, lr=1e-2)
        )
        opt = FP16Optimizer(
            inner, loss_scaler=DynamicLossScaler(2.0**10, scale_window=2), clip_grad=clip
        )
        _run(opt, model, range(9))
        fp32 = masters(opt, model) if fused else inner.param_groups[0]["params"]
        runs.append((model, opt, [m.detach() for m in fp32]))
    (fused_model, fused_opt, fused_m), (gen_model, gen_opt, gen_m) = runs
    assert fused_opt.skipped_steps == gen_opt.skipped_steps == 3
    assert fused_opt.loss_scale == gen_opt.loss_scale
    for a, b in zip(fused_m, gen_m):
        assert_close(a, b)
    for a, b in zip(fused_model.parameters(), gen_model.parameters()):
        # Masters within a few fp32 ulps can round to adjacent fp16 values.
        assert_close(a, b, rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------------------ 12. schedulers
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_lr_scheduler_drives_the_wrapped_groups(backend, recwarn):
    """StepLR takes the wrapper, edits the wrapped optimizer's groups, and the steps use the
    new lr: bitwise equal to the run with the lr set by hand in the wrapped groups, and not
    equal to the run at a constant lr."""
    expected_lrs = [0.1, 0.05, 0.05, 0.025, 0.025]
    runs = {}
    for mode in ("scheduler", "by hand", "constant"):
        model = make_model()
        opt = wrap(model, backend, lr=0.1, loss_scaler=LossScaler(8.0))
        if mode == "scheduler":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        lrs = []
        for step in range(5):
            train_step(opt, model, step)
            if mode == "scheduler":
                sched.step()
            elif mode == "by hand":
                opt.optimizer.param_groups[0]["lr"] = expected_lrs[step]
            lrs.append(opt.optimizer.param_groups[0]["lr"])
        if mode != "constant":
            assert lrs == expected_lrs
            assert opt.param_groups is opt.optimizer.param_groups
        runs[mode] = model.state_dict()
    assert sched.get_last_lr() == [0.025]
    assert_bitwise_equal(runs["scheduler"], runs["by hand"])
    assert not torch.equal(runs["scheduler"]["0.weight"], runs["constant"]["0.weight"])
    # No "lr_scheduler.step() before optimizer.step()" warning: the wrapper's step is tracked.
    assert not [w for w in recwarn if "lr_scheduler" in str(w.message)]


# ----------------------------------------------------------------- 13. end-to-end training
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_mlp_reaches_fp32_loss(backend):
    """A small regression trained 40 steps in fp16 through FP16Optimizer (dynamic scaler from
    2**16 growing every 10 clean steps, clipping at 1.0) ends within 2% of the same model
    trained in fp32 with torch.optim.AdamW and clip_grad_norm_, from the same initial weights
    and data. Measured gap: about 1e-4 relative on both backends; fp16 rounding of weights and
    activations (2**-11 relative) is what the margin is for. No step overflows here, so both
    runs take the same 40 steps."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = torch.sin(x @ torch.randn(8, 1, generator=g))

    def build(dtype):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
        return m.to(DEVICE, dtype)

    def loss_fn(model):
        dtype = next(model.parameters()).dtype
        return (model(x.to(DEVICE, dtype)).float() - y.to(DEVICE)).square().mean()

    model16 = build(torch.float16)
    opt16 = FP16Optimizer(
        fp16_triton.AdamW(model16.parameters(), lr=1e-2, backend=backend),
        loss_scaler=DynamicLossScaler(scale_window=10),
        clip_grad=1.0,
    )
    model32 = build(torch.float32)
    opt32 = torch.optim.AdamW(model32.parameters(), lr=1e-2)
    initial = loss_fn(model32).item()
    for _ in range(40):
        opt16.zero_grad()
        opt16.backward(loss_fn(model16))
        opt16.step()
        opt32.zero_grad()
        loss_fn(model32).backward()
        torch.nn.utils.clip_grad_norm_(model32.parameters(), 1.0)
        opt32.step()
    with torch.no_grad():
        final16, final32 = loss_fn(model16).item(), loss_fn(model32).item()
    assert opt16.skipped_steps == 0
    assert opt16.loss_scale == 2.0**16 * 2**3  # grew at iterations 10, 20, 30
    assert final32 < 0.5 * initial  # the reference did learn
    assert final16 == pytest.approx(final32, rel=0.02)
