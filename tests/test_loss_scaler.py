"""Tests for fp16_triton.loss_scaler against an independent model of DeepSpeed's update rule."""

from __future__ import annotations

import io
import logging
import os
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from exploring import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fp16_triton.backend import BACKEND_ENV
from fp16_triton.loss_scaler import (
    DynamicLossScaler,
    LossScaler,
    MinLossScaleError,
    get_loss_scaler,
)

# --------------------------------------------------------------------------------------------
# Reference model: DeepSpeed 0.19 DynamicLossScaler.update_scale, written from its description,
# with the scale in float32 (numpy) as the implementation stores it, plus the one documented
# difference: a growth that would overflow float32 keeps the scale.
# --------------------------------------------------------------------------------------------


class ModelRaised(Exception):
    pass


class Model:
    def __init__(
        self, init_scale, scale_window, min_scale, hysteresis, consecutive, raise_at_min, factor
    ):
        self.scale = np.float32(init_scale)
        self.min_scale = np.float32(min_scale)
        self.factor = np.float32(factor)
        self.window = scale_window
        self.delayed_shift = hysteresis
        self.hyst = hysteresis
        self.consecutive = consecutive
        self.raise_at_min = raise_at_min
        self.it = 0
        self.last = -1

    def state(self):
        return (float(self.scale), self.hyst, self.it, self.last)

    def update(self, overflow):
        if overflow:
            if self.delayed_shift == 1 or self.hyst == 1:
                if self.scale == self.min_scale and self.raise_at_min:
                    raise ModelRaised
                self.scale = max(np.float32(self.scale / self.factor), self.min_scale)
            else:
                self.hyst -= 1
            self.last = self.it
        else:
            if self.consecutive:
                self.hyst = self.delayed_shift
            stable = self.it - self.last - 1
            if stable > 0 and stable % self.window == 0:
                if not self.consecutive:
                    self.hyst = self.delayed_shift
                with np.errstate(over="ignore"):
                    grown = np.float32(self.scale * self.factor)
                if np.isfinite(grown):
                    self.scale = grown
        self.it += 1


def scaler_state(scaler):
    sd = scaler.state_dict()
    return (sd["cur_scale"], sd["cur_hysteresis"], sd["cur_iter"], sd["last_overflow_iter"])


def make_pair(cfg):
    scaler = DynamicLossScaler(
        init_scale=cfg["init_scale"],
        scale_window=cfg["scale_window"],
        min_scale=cfg["min_scale"],
        hysteresis=cfg["hysteresis"],
        consecutive_hysteresis=cfg["consecutive"],
        raise_error_at_min_scale=cfg["raise_at_min"],
        scale_factor=cfg["factor"],
    )
    model = Model(
        cfg["init_scale"],
        cfg["scale_window"],
        cfg["min_scale"],
        cfg["hysteresis"],
        cfg["consecutive"],
        cfg["raise_at_min"],
        cfg["factor"],
    )
    return scaler, model


@st.composite
def configs(draw):
    # 2**126 reaches the float32 growth cap within a few windows; 0.3, 3.0 and 1.1 exercise
    # float32 rounding of the division.
    init_scale = draw(st.sampled_from([2.0**16, 1.0, 8.0, 100.0, 3.0, 2.0**126]))
    # Mostly a minimum a few back-offs below the start, so overflow storms reach it.
    min_scale = draw(
        st.one_of(
            st.integers(0, 3).map(lambda k: init_scale / 2**k),
            st.sampled_from([1.0, 0.3, 1e-3]).filter(lambda m: m <= init_scale),
        )
    )
    return {
        "init_scale": init_scale,
        "scale_window": draw(st.integers(1, 10)),
        "min_scale": min_scale,
        "hysteresis": draw(st.integers(1, 4)),
        "consecutive": draw(st.booleans()),
        "raise_at_min": draw(st.booleans()),
        "factor": draw(st.sampled_from([2.0, 2.0, 3.0, 1.5, 4.0, 1.1])),
    }


# Each element: (overflow?, how the flag is passed on the tensor path). Sequences are drawn as
# runs of clean steps followed by bursts of overflows: few draws for up to ~200 steps, so that
# long clean stretches (growth, the float32 cap) and overflow storms (the minimum) both occur.
FLAG_KINDS = ["float", "two", "bool", "vec", "int"]


@st.composite
def sequences(draw):
    runs = draw(
        st.lists(
            st.tuples(st.integers(0, 25), st.integers(0, 4), st.integers(0, len(FLAG_KINDS) - 1)),
            max_size=25,
        )
    )
    seq = []
    for clean, overflows, kind in runs:
        for n, overflow in enumerate([False] * clean + [True] * overflows):
            seq.append((overflow, FLAG_KINDS[(kind + n) % len(FLAG_KINDS)]))
    return seq[:200]


def flag_tensor(overflow, kind):
    if kind == "float":
        return torch.tensor(1.0 if overflow else 0.0)
    if kind == "two":  # torch's GradScaler sums per-device flags: 2.0 is an overflow too
        return torch.tensor(2.0 if overflow else 0.0)
    if kind == "bool":
        return torch.tensor(overflow)
    if kind == "vec":
        return torch.tensor([1.0 if overflow else 0.0])
    return torch.tensor([[int(overflow)]], dtype=torch.int32)


PROPERTY = settings(
    max_examples=examples(100), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@PROPERTY
@given(cfg=configs(), seq=sequences())
def test_host_path_matches_model(cfg, seq):
    scaler, model = make_pair(cfg)
    for overflow, _ in seq:
        try:
            model.update(overflow)
            raised = False
        except ModelRaised:
            raised = True
        if raised:
            before = scaler_state(scaler)
            with pytest.raises(MinLossScaleError, match="Current loss scale already at minimum"):
                scaler.update_scale(overflow)
            assert scaler_state(scaler) == before  # raised before changing anything
        else:
            scaler.update_scale(overflow)
        assert scaler_state(scaler) == model.state()
        assert scaler.loss_scale == model.state()[0]


@PROPERTY
@given(cfg=configs(), seq=sequences())
def test_tensor_path_matches_model(cfg, seq):
    check_tensor_path(cfg, seq)


@contextmanager
def triton_backend():
    """Route the tensor path to the Triton kernel (interpreted on the CPU), as on a GPU."""
    old = os.environ.get(BACKEND_ENV)
    os.environ[BACKEND_ENV] = "triton"
    try:
        yield
    finally:
        if old is None:
            del os.environ[BACKEND_ENV]
        else:
            os.environ[BACKEND_ENV] = old


# Fewer examples: each update is one interpreted launch (~1 ms).
@settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs(), seq=sequences())
def test_tensor_path_on_the_triton_kernel_matches_model(cfg, seq):
    # The one-launch kernel (kernels/loss_scale.py) must follow the model exactly too: the
    # scale is compared as a float32 value, the counters as integers.
    with triton_backend():
        check_tensor_path(cfg, seq)


def test_tensor_path_is_one_triton_launch(monkeypatch):
    from fp16_triton.kernels import loss_scale, reference

    def forbidden(*args, **kwargs):
        raise AssertionError("the torch-op reference ran instead of the kernel")

    monkeypatch.setattr(reference, "update_loss_scale", forbidden)
    launches = []
    kernel = loss_scale._update_loss_scale_kernel
    original = kernel.run
    monkeypatch.setattr(kernel, "run", lambda *a, **k: launches.append(1) or original(*a, **k))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: through the interpreter
    scaler = DynamicLossScaler(init_scale=8.0, hysteresis=1)
    scaler.to(device)
    with triton_backend():
        scaler.update_scale(torch.tensor(1.0, device=device))
        scaler.update_scale(torch.tensor(True, device=device))  # a bool flag: cast, launched
    assert len(launches) == 2
    assert scaler.loss_scale == 2.0 and scaler.cur_iter == 2


def check_tensor_path(cfg, seq):
    scaler, model = make_pair(cfg)
    for overflow, kind in seq:
        try:
            model.update(overflow)
            raised = False
        except ModelRaised:
            raised = True
        scaler.update_scale(flag_tensor(overflow, kind))
        # The error is only flagged on the device; the state is left as the model leaves it.
        assert scaler_state(scaler) == model.state()
        assert scaler.pending_error.item() == (1.0 if raised else 0.0)
        if raised:
            with pytest.raises(MinLossScaleError, match="Current loss scale already at minimum"):
                scaler.raise_if_error()
            assert scaler.pending_error.item() == 0.0  # consumed by raising
        else:
            scaler.raise_if_error()
        assert scaler_state(scaler) == model.state()


@PROPERTY
@given(cfg=configs(), seq=sequences(), cut=st.integers(0, 200))
def test_state_dict_round_trip_continues_sequence(cfg, seq, cut):
    cfg = {**cfg, "raise_at_min": False}  # keep the sequence going to the end
    cut = min(cut, len(seq))
    original, _ = make_pair(cfg)
    for overflow, _ in seq[:cut]:
        original.update_scale(overflow)
    buf = io.BytesIO()
    torch.save(original.state_dict(), buf)  # plain Python numbers: weights_only loading works
    buf.seek(0)
    resumed = DynamicLossScaler()  # different hyperparameters: all come from the state dict
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.state_dict() == original.state_dict()
    for overflow, kind in seq[cut:]:
        original.update_scale(overflow)
        resumed.update_scale(flag_tensor(overflow, kind))
        assert scaler_state(resumed) == scaler_state(original)


# --------------------------------------------------------------------------------------------
# Hand-written sequences.
# --------------------------------------------------------------------------------------------


@pytest.fixture(params=["torch-ops", "triton-kernel"])
def device_update(request, monkeypatch):
    """Run the tensor-path updates of a test through the torch-op reference (the CPU path) and
    through the one-launch Triton kernel (the GPU path, interpreted here)."""
    if request.param == "triton-kernel":
        monkeypatch.setenv(BACKEND_ENV, "triton")
    return request.param


@pytest.mark.parametrize("path", ["host", "tensor"])
def test_default_hysteresis_first_overflow_keeps_second_halves(path, device_update):
    scaler = DynamicLossScaler()
    flag = (lambda o: o) if path == "host" else (lambda o: torch.tensor(float(o)))
    assert scaler.loss_scale == 65536.0 and scaler.cur_hysteresis == 2
    scaler.update_scale(flag(True))
    assert scaler.loss_scale == 65536.0 and scaler.cur_hysteresis == 1
    scaler.update_scale(flag(True))
    assert scaler.loss_scale == 32768.0 and scaler.cur_hysteresis == 1
    # Hysteresis is only refilled by a growth (not consecutive): the next overflow halves.
    scaler.update_scale(flag(True))
    assert scaler.loss_scale == 16384.0
    assert scaler.cur_iter == 3 and scaler.last_overflow_iter == 2


@pytest.mark.parametrize("path", ["host", "tensor"])
def test_update_records_scale_and_hysteresis_before_and_after(path, device_update):
    """``record`` (what FP16Optimizer logs for a skipped step) gets the scale and hysteresis
    before and after each update, as read from the scaler itself around the update; the
    static scaler records its scale twice and no hysteresis."""
    scaler = DynamicLossScaler(
        init_scale=1024.0, hysteresis=2, scale_window=2, min_scale=256.0,
        raise_error_at_min_scale=False,
    )  # fmt: skip
    flag = (lambda o: o) if path == "host" else (lambda o: torch.tensor(float(o)))
    record = torch.full((4,), -1.0)
    # overflow (hysteresis 2 -> 1), overflow (halves), clean, clean (grows), overflows to the
    # minimum: every branch of the rule.
    for overflow in (True, True, False, False, True, True, True):
        before = [scaler.loss_scale, float(scaler.cur_hysteresis)]
        scaler.update_scale(flag(overflow), record=record)
        after = [scaler.loss_scale, float(scaler.cur_hysteresis)]
        assert record.tolist() == before + after
    static = LossScaler(8.0)
    static.update_scale(flag(True), record=record)
    assert record.tolist() == [8.0, 0.0, 8.0, 0.0]


@pytest.mark.parametrize("path", ["host", "tensor"])
def test_growth_after_scale_window_clean_iterations(path, device_update):
    scaler = DynamicLossScaler(init_scale=8.0, scale_window=3, hysteresis=1)
    flag = (lambda o: o) if path == "host" else (lambda o: torch.tensor(o))
    scales = []
    for _ in range(10):
        scaler.update_scale(flag(False))
        scales.append(scaler.loss_scale)
    # stable = cur_iter - last_overflow_iter - 1 with last_overflow_iter = -1: grows at
    # cur_iter 3, 6, 9.
    assert scales == [8, 8, 8, 16, 16, 16, 32, 32, 32, 64]
    scaler.update_scale(flag(True))  # iteration 10
    assert scaler.loss_scale == 32
    scales = []
    for _ in range(4):
        scaler.update_scale(flag(False))
        scales.append(scaler.loss_scale)
    # stable at iterations 11..14 is 0, 1, 2, 3: growth on the fourth clean step.
    assert scales == [32, 32, 32, 64]


def test_consecutive_hysteresis_refills_on_clean_steps():
    scaler = DynamicLossScaler(init_scale=1024.0, hysteresis=2, consecutive_hysteresis=True)
    for overflow in [True, False, True, False, True, False]:
        scaler.update_scale(overflow)
        assert scaler.loss_scale == 1024.0
    scaler.update_scale(True)
    scaler.update_scale(True)
    assert scaler.loss_scale == 512.0


def test_non_consecutive_hysteresis_is_used_up_by_separate_overflows():
    scaler = DynamicLossScaler(init_scale=1024.0, hysteresis=2)
    scaler.update_scale(True)
    scaler.update_scale(False)
    scaler.update_scale(True)
    assert scaler.loss_scale == 512.0


def test_no_raise_at_min_scale_stays_at_minimum(device_update):
    scaler = DynamicLossScaler(
        init_scale=4.0, min_scale=2.0, hysteresis=1, raise_error_at_min_scale=False
    )
    for _ in range(5):
        scaler.update_scale(True)
        scaler.update_scale(torch.tensor(True))
    assert scaler.loss_scale == 2.0
    assert scaler.pending_error.item() == 0.0


def test_non_power_of_two_factor_uses_float32_arithmetic(device_update):
    scaler = DynamicLossScaler(init_scale=100.0, min_scale=0.3, hysteresis=1, scale_factor=3.0)
    scaler.update_scale(True)
    assert scaler.loss_scale == float(np.float32(100.0) / np.float32(3.0))
    # The device paths divide exactly too (IEEE division, not a multiplication by 1/3).
    scaler.update_scale(torch.tensor(1.0))
    assert scaler.loss_scale == float(np.float32(100.0) / np.float32(3.0) / np.float32(3.0))
    assert scaler.min_scale == float(np.float32(0.3))  # hyperparameters are float32-rounded


def test_growth_stops_at_float32_maximum(device_update):
    scaler = DynamicLossScaler(init_scale=2.0**127, scale_window=1, hysteresis=1)
    for flag in [False, False, torch.tensor(0.0), torch.tensor(0.0)]:
        scaler.update_scale(flag)
    assert scaler.loss_scale == 2.0**127
    scaler.update_scale(True)
    assert scaler.loss_scale == 2.0**126


def test_tensor_path_error_is_deferred_and_freezes_state(device_update):
    scaler = DynamicLossScaler(init_scale=2.0, min_scale=1.0, hysteresis=1)
    scaler.update_scale(torch.tensor(1.0))
    assert scaler.loss_scale == 1.0
    frozen = scaler.state_dict()
    scaler.update_scale(torch.tensor(1.0))  # overflow at the minimum: flagged, not applied
    assert scaler.error_flag.item() == 1.0
    assert scaler.pending_error is scaler.error_flag
    # The consumer has not called raise_if_error yet: further updates apply nothing.
    scaler.update_scale(torch.tensor(0.0))
    scaler.update_scale(torch.tensor(0.0))
    assert scaler.state_dict() == frozen
    with pytest.raises(MinLossScaleError, match="iteration 1") as info:
        scaler.raise_if_error(blocking=False)
    message = str(info.value)
    assert "Current loss scale already at minimum" in message
    assert "bf16" in message and "min_loss_scale" in message
    assert "raise_error_at_min_scale=False" in message
    scaler.raise_if_error()  # cleared: nothing more to raise
    scaler.update_scale(torch.tensor(0.0))
    assert scaler.cur_iter == 2


def test_host_update_surfaces_pending_tensor_error():
    scaler = DynamicLossScaler(init_scale=1.0, min_scale=1.0, hysteresis=1)
    scaler.update_scale(torch.tensor(True))
    with pytest.raises(MinLossScaleError):
        scaler.update_scale(False)
    assert scaler.cur_iter == 0


def test_host_path_logs_scale_changes(caplog):
    scaler = DynamicLossScaler(init_scale=4.0, hysteresis=1, scale_window=1)
    with caplog.at_level(logging.INFO, logger="fp16_triton.loss_scaler"):
        scaler.update_scale(True)
        scaler.update_scale(False)
        scaler.update_scale(False)
    text = caplog.text
    assert "loss scale 4 -> 2" in text and "loss scale 2 -> 4" in text


def test_bad_overflow_flags():
    scaler = DynamicLossScaler()
    with pytest.raises(ValueError, match="one element"):
        scaler.update_scale(torch.zeros(2))
    with pytest.raises(TypeError):
        scaler.update_scale(None)
    with pytest.raises(TypeError):
        LossScaler().update_scale("yes")
    assert scaler.cur_iter == 0


# --------------------------------------------------------------------------------------------
# Static scaler, scaling, device handling.
# --------------------------------------------------------------------------------------------


def test_static_scaler():
    scaler = LossScaler(128.0)
    assert not scaler.dynamic and scaler.loss_scale == 128.0 and scaler.cur_scale == 128.0
    scaler.update_scale(True)
    scaler.update_scale(torch.tensor(2.0))
    scaler.raise_if_error()
    assert scaler.loss_scale == 128.0 and scaler.pending_error.item() == 0.0
    other = LossScaler()
    other.load_state_dict(scaler.state_dict())
    assert other.loss_scale == 128.0
    assert LossScaler().loss_scale == 1.0
    assert DynamicLossScaler().dynamic


def test_scale_loss_and_backward():
    scaler = DynamicLossScaler(init_scale=2.0**16)
    assert scaler.to("cpu") is scaler and scaler.device == torch.device("cpu")
    assert scaler.scale_tensor.dtype == torch.float32 and scaler.scale_tensor.dim() == 0
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    scaler.backward((w * 3.0).sum())
    assert torch.equal(w.grad, torch.full((2,), 3.0 * 2**16))
    # A 0-dim fp16 loss is promoted to fp32 by the fp32 scale tensor: 4 * 2**16 would overflow
    # fp16 (max 65504).
    scaled = scaler.scale_loss(torch.tensor(4.0, dtype=torch.float16))
    assert scaled.dtype == torch.float32 and scaled.item() == 4.0 * 2**16
    assert scaler.scale_loss(torch.tensor(1.5)).dtype == torch.float32


# --------------------------------------------------------------------------------------------
# Argument validation.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"init_scale": 0.0}, "init_scale"),
        ({"init_scale": -1.0}, "init_scale"),
        ({"init_scale": float("inf")}, "init_scale"),
        ({"init_scale": float("nan")}, "init_scale"),
        ({"init_scale": 1e39}, "init_scale"),  # inf in float32
        ({"scale_window": 0}, "scale_window"),
        ({"scale_window": 2.5}, "scale_window"),
        ({"scale_window": True}, "scale_window"),
        ({"hysteresis": 0}, "hysteresis"),
        ({"hysteresis": 1.0}, "hysteresis"),
        ({"min_scale": 0.0}, "min_scale"),
        ({"min_scale": -2.0}, "min_scale"),
        ({"min_scale": 2.0**17}, "min_scale"),  # above init_scale
        ({"scale_factor": 1.0}, "scale_factor"),
        ({"scale_factor": 0.5}, "scale_factor"),
        ({"scale_factor": 1.0 + 1e-9}, "scale_factor"),  # 1.0 in float32
        ({"consecutive_hysteresis": 1}, "consecutive_hysteresis"),
        ({"raise_error_at_min_scale": "no"}, "raise_error_at_min_scale"),
    ],
)
def test_invalid_dynamic_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DynamicLossScaler(**kwargs)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf"), True, "1"])
def test_invalid_static_scale(scale):
    with pytest.raises(ValueError, match="scale"):
        LossScaler(scale)


# --------------------------------------------------------------------------------------------
# get_loss_scaler.
# --------------------------------------------------------------------------------------------


def test_get_loss_scaler_defaults_are_deepspeeds():
    scaler = get_loss_scaler()
    assert isinstance(scaler, DynamicLossScaler)
    assert scaler.loss_scale == 2.0**16 and scaler.scale_window == 1000
    assert scaler.hysteresis == 2 and scaler.min_scale == 1.0
    assert not scaler.consecutive_hysteresis and scaler.raise_error_at_min_scale
    assert scaler.scale_factor == 2.0


def test_get_loss_scaler_dynamic_config():
    config = {
        "enabled": True,
        "auto_cast": False,
        "loss_scale": 0,
        "initial_scale_power": 8,
        "loss_scale_window": 10,
        "hysteresis": 3,
        "consecutive_hysteresis": True,
        "min_loss_scale": 0.5,
    }
    scaler = get_loss_scaler(config, torch.float16)
    assert isinstance(scaler, DynamicLossScaler)
    assert scaler.loss_scale == 256.0 and scaler.scale_window == 10 and scaler.hysteresis == 3
    assert scaler.consecutive_hysteresis and scaler.min_scale == 0.5
    assert not get_loss_scaler({"raise_error_at_min_scale": False}).raise_error_at_min_scale


def test_get_loss_scaler_static_and_unscaled():
    static = get_loss_scaler({"loss_scale": 128})
    assert type(static) is LossScaler and static.loss_scale == 128.0 and not static.dynamic
    for dtype in (torch.bfloat16, torch.float32):
        scaler = get_loss_scaler({"loss_scale": 0}, dtype)
        assert type(scaler) is LossScaler and scaler.loss_scale == 1.0 and not scaler.dynamic


@pytest.mark.parametrize(
    "key, closest",
    [
        ("loss_scale_windw", "loss_scale_window"),
        ("hysterisis", "hysteresis"),
        ("min_scale", "min_loss_scale"),
        ("initial_scale_pow", "initial_scale_power"),
    ],
)
def test_get_loss_scaler_misspelled_key(key, closest):
    with pytest.raises(ValueError, match=f"{key}.*{closest}"):
        get_loss_scaler({key: 1})
    with pytest.raises(ValueError, match=closest):  # checked for bf16 too
        get_loss_scaler({key: 1}, torch.bfloat16)


@pytest.mark.parametrize(
    "config, name",
    [
        ({"loss_scale": -1}, "loss_scale"),
        ({"loss_scale_window": 0}, "loss_scale_window"),
        ({"hysteresis": 0}, "hysteresis"),
        ({"initial_scale_power": 200}, "initial_scale_power"),
        ({"initial_scale_power": 16.5}, "initial_scale_power"),
        ({"min_loss_scale": 0}, "min_loss_scale"),
        ({"min_loss_scale": 2**20}, "min_loss_scale"),
        ({"consecutive_hysteresis": "yes"}, "consecutive_hysteresis"),
        ({"fp16": {"enabled": True}}, "config\\['fp16'\\]"),
    ],
)
def test_get_loss_scaler_bad_values(config, name):
    with pytest.raises(ValueError, match=name):
        get_loss_scaler(config)


def test_get_loss_scaler_bad_dtype():
    with pytest.raises(ValueError, match="dtype"):
        get_loss_scaler(None, torch.int8)


# --------------------------------------------------------------------------------------------
# load_state_dict.
# --------------------------------------------------------------------------------------------


def test_load_state_dict_accepts_deepspeed_delayed_shift():
    source = DynamicLossScaler(init_scale=64.0, hysteresis=3, scale_window=7)
    source.update_scale(True)
    sd = source.state_dict()
    sd["delayed_shift"] = sd.pop("hysteresis")
    del sd["init_scale"], sd["raise_error_at_min_scale"], sd["dynamic"]  # optional keys
    target = DynamicLossScaler()
    target.load_state_dict(sd)
    assert target.hysteresis == 3 and target.cur_hysteresis == 2 and target.scale_window == 7
    assert target.delayed_shift == 3


def _good_sd():
    scaler = DynamicLossScaler(init_scale=64.0)
    scaler.update_scale(True)
    scaler.update_scale(False)
    return scaler.state_dict()


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda sd: sd.pop("cur_iter"), "missing.*cur_iter"),
        (lambda sd: sd.update(cur_iter=1.5), "cur_iter"),
        (lambda sd: sd.update(cur_iter=True), "cur_iter"),
        (lambda sd: sd.update(cur_scale=float("nan")), "cur_scale"),
        (lambda sd: sd.update(cur_scale="64"), "cur_scale"),
        (lambda sd: sd.update(scale_windw=5), "scale_windw.*scale_window"),
        (lambda sd: sd.update(cur_hysteresis=9), "cur_hysteresis"),
        (lambda sd: sd.update(last_overflow_iter=5), "last_overflow_iter"),
        (lambda sd: sd.update(scale_factor=1.0), "scale_factor"),
        (lambda sd: sd.update(dynamic=False), "dynamic"),
        (lambda sd: sd.update(delayed_shift=2), "twice"),
        (lambda sd: sd.update(consecutive_hysteresis=0), "consecutive_hysteresis"),
    ],
)
def test_load_bad_state_dict_raises_and_leaves_state(change, match):
    scaler = DynamicLossScaler(init_scale=8.0, scale_window=3, hysteresis=1)
    scaler.update_scale(True)
    before = scaler.state_dict()
    sd = _good_sd()
    change(sd)
    with pytest.raises(ValueError, match=match):
        scaler.load_state_dict(sd)
    assert scaler.state_dict() == before


def test_load_static_state_into_dynamic_and_back_raises():
    with pytest.raises(ValueError, match="dynamic"):
        DynamicLossScaler().load_state_dict(LossScaler(4.0).state_dict())
    with pytest.raises(ValueError, match="dynamic"):
        LossScaler().load_state_dict(DynamicLossScaler().state_dict())
    with pytest.raises(ValueError, match="mapping"):
        LossScaler().load_state_dict([("cur_scale", 1.0)])


# --------------------------------------------------------------------------------------------
# CUDA only.
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (sync debug mode)")
def test_cuda_tensor_path_makes_no_host_sync():
    scaler = DynamicLossScaler(init_scale=4.0, min_scale=1.0, hysteresis=1, scale_window=2)
    scaler.to("cuda")
    # 4 -> 4 -> 2 -> 1 -> 1 -> overflow at the minimum (iteration 4): flagged, then frozen.
    flags = [torch.tensor(v, device="cuda") for v in (0.0, 2.0, 1.0, 0.0, 1.0)]
    flags.append(torch.tensor(False, device="cuda"))
    loss = torch.tensor(3.0, device="cuda")
    raised = 0
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for flag in flags:
            scaler.scale_loss(loss)
            skip = flag + scaler.pending_error  # what the optimizer wrapper does
            scaler.update_scale(flag)
            del skip
        assert scaler.scale_tensor.device.type == "cuda"
        try:
            scaler.raise_if_error(blocking=False)  # may or may not see the copy yet
        except MinLossScaleError as e:
            assert "iteration 4" in str(e)  # read from the pinned copy, without a sync
            raised += 1  # raising is allowed here, syncing is not
    finally:
        torch.cuda.set_sync_debug_mode(0)
    if not raised:
        with pytest.raises(MinLossScaleError, match="iteration 4"):
            scaler.raise_if_error(blocking=True)
    assert scaler.loss_scale == 1.0 and scaler.cur_iter == 4


def test_tiny_float64_flag_counts_as_overflow(device_update):
    # Non-zero is overflow whatever the flag's dtype: a float64 1e-50 would be 0.0 in fp32, so
    # the kernel path compares before casting (found in review).
    scaler = DynamicLossScaler(init_scale=8.0, hysteresis=1)
    scaler.update_scale(torch.tensor(1e-50, dtype=torch.float64))
    assert scaler.loss_scale == 4.0 and scaler.last_overflow_iter == 0


def test_a_triton_backend_that_cannot_run_falls_back_to_torch_ops(monkeypatch):
    # FP16_TRITON_BACKEND=triton on a CPU without the interpreter: the optimizers refuse, but
    # the scaler (which has no backend of its own) updates through its torch-op reference.
    import fp16_triton.backend

    monkeypatch.setenv(BACKEND_ENV, "triton")
    monkeypatch.setattr(fp16_triton.backend, "_interpreter_enabled", lambda: False)
    scaler = DynamicLossScaler(init_scale=8.0, hysteresis=1)
    scaler.update_scale(torch.tensor(1.0))
    assert scaler.loss_scale == 4.0
