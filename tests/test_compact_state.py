"""bf16 moments (``Adam/AdamW(state_dtype=torch.bfloat16)``) against a float64 AdamW model
written here whose stored moments are rounded to bf16; the kernel's rounding and widening;
state dicts, switches, the engine config and the tiny GPT's quality.

The model takes one step from the optimizer's own state (no compounding: bounds per step)::

    p = w (1 - lr wd);  m = m0 + (1 - b1)(g - m0);  v = b2 v0 + (1 - b2) g^2   (b2, 1 - b: fp32)
    p = p - lr / (1 - b1^t) m / (sqrt(v) / sqrt(1 - b2^t) + eps);  stored: bf16_rne(m), (v)

Tolerances (``u32``/``u16``: fp32/bf16 ulps): fp32 math puts m within 4 u32(max(|m0|, |g|)) and
v within 5 u32(v) (five roundings of positive terms), so the stored moments are the model's
bf16 values bit for bit except where the exact value lies that close to a rounding midpoint
(either neighbour there); the fp32 weight within 2 u32(|w|) (decay product, subtraction) + 16
u32 of the update (its dozen roundings) + m's error through ``step_size / denom``; a fp16/bf16
param is exactly its master rounded to nearest-even.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import tiny_gpt
import torch
from comparing import assert_bitwise, master_rounded
from comparing import one_thread as one_thread  # noqa: F401  (autouse: one CPU thread)
from exploring import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fp16_triton
from fp16_triton.functional import adamw_
from fp16_triton.train import GPTConfig, TinyGPT

BF16 = torch.bfloat16
LR, BETAS, EPS, WD = 1e-2, (0.9, 0.999), 1e-8, 0.1
SIZES = (3, 1100)  # one across a 1024-element block


def ulp(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The spacing of a float with ``bits`` significand bits at float64 magnitudes ``x``."""
    return 2.0 ** (torch.floor(torch.log2(x.abs().clamp_min(2.0**-126))) - (bits - 1))


def bf16_rne(x: torch.Tensor) -> torch.Tensor:
    """float64 to bf16 values, rounded to nearest-even in float64 (``torch.round`` rounds ties
    to even): no fp32 step in between, so no double rounding."""
    step = ulp(x, 8)
    return torch.round(x / step) * step


def model(w, m0, v0, g, step):
    w, m0, v0, g = (t.double() for t in (w, m0, v0, g))
    (b1, b2), t = BETAS, step + 1
    # The coefficients as the kernel gets them: beta and 1 - beta rounded to fp32. (With fp16
    # grads 0.1 g often is a bf16 tie exactly, which the coefficient's last bit decides.)
    f32 = lambda x: torch.tensor(x, dtype=torch.float32).item()  # noqa: E731
    p = w * (1 - LR * WD)
    m = m0 + f32(1 - b1) * (g - m0)
    v = f32(b2) * v0 + f32(1 - b2) * g * g
    update = LR / (1 - b1**t) * m / (v.sqrt() / math.sqrt(1 - b2**t) + EPS)
    m_err = 4 * ulp(torch.maximum(m0.abs(), g.abs()), 24)
    denom = v.sqrt() / math.sqrt(1 - b2**t) + EPS
    p_tol = 2 * ulp(w, 24) + 16 * ulp(update, 24) + LR / (1 - b1**t) * m_err / denom
    return p - update, p_tol, (m, m_err), (v, 5 * ulp(v, 24))


def assert_moment(ours, exact, err, what):
    """Bitwise the model's bf16 value, but where ``exact`` lies within ``err`` (our fp32 error)
    of a rounding midpoint: there, either neighbour."""
    expected, ours = bf16_rne(exact), ours.double()
    step = ulp(exact, 8)
    near_midpoint = ((exact / step).frac().abs() - 0.5).abs() * step <= err
    assert torch.equal(ours[~near_midpoint], expected[~near_midpoint]), what
    assert ((ours - expected).abs() <= step)[near_midpoint].all(), what


def grads_for(params, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]


def optimizer(dtype, backend, state_dtype=BF16, **kw):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype)) for n in SIZES]
    kw = dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, backend=backend, **kw)
    return fp16_triton.AdamW(params, state_dtype=state_dtype, **kw), params


def step(opt, params, seed):
    for p, g in zip(params, grads_for(params, seed)):
        p.grad = g
    opt.step()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16], ids=str)
def test_steps_match_the_float64_model_with_bf16_moments(backend, dtype):
    opt, params = optimizer(dtype, backend)
    for k in range(4):
        z = lambda p: torch.zeros_like(p, dtype=BF16)  # noqa: E731  (before the first step)
        get = lambda p, n, d: opt.state[p].get(n, d).clone()  # noqa: E731
        before = [(get(p, "master_param", p.float()), get(p, "exp_avg", z(p)),
                   get(p, "exp_avg_sq", z(p))) for p in params]  # fmt: skip
        step(opt, params, seed=k)
        for i, (p, (w0, m0, v0)) in enumerate(zip(params, before)):
            s = opt.state[p]
            expected, p_tol, (m, m_err), (v, v_err) = model(w0, m0, v0, p.grad.float(), k)
            assert s["exp_avg"].dtype == s["exp_avg_sq"].dtype == BF16
            assert_moment(s["exp_avg"], m, m_err, f"exp_avg of param {i} at step {k}")
            assert_moment(s["exp_avg_sq"], v, v_err, f"exp_avg_sq of param {i} at step {k}")
            w = s.get("master_param", p.detach())
            assert w.dtype == torch.float32
            assert ((w.double() - expected).abs() <= p_tol).all(), f"param {i} at step {k}"
            if dtype != torch.float32:
                assert_bitwise(
                    p.detach(), master_rounded(w, dtype), f"param {i}: its master, rounded"
                )


SCALED = st.builds(lambda f, e: f * 2.0**e, st.floats(1, 2, exclude_max=True), st.integers(-24, 23))


@settings(max_examples=examples(12), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=st.lists(st.tuples(SCALED, st.booleans()), min_size=1, max_size=40),
    already_bf16=st.booleans(),
)
def test_the_kernel_stores_moments_rounded_to_nearest_even_and_loads_them_exactly(
    values, already_bf16
):
    """Through the kernel: with ``beta1 = 0``, ``lr = 0`` it stores ``exp_avg = g`` (the lerp
    at weight 1 is exact) rounded, g any fp32 value in +-[2^-24, 2^24); with zero grads and
    moments it writes the amsgrad maximum back as loaded (widened, rounded). Oracles: torch's
    CPU fp32 -> bf16 cast (round to nearest-even), a float64 bound."""
    x = torch.tensor([v if positive else -v for v, positive in values], dtype=torch.float32)
    x = x.to(BF16).float() if already_bf16 else x
    kept = x.abs().to(BF16)  # bf16 values the maximum starts from
    params = [torch.zeros_like(x), torch.zeros_like(x)]
    grads, zeros = [x.clone(), torch.zeros_like(x)], lambda: [torch.zeros_like(x, dtype=BF16)] * 1
    exp_avgs, exp_avg_sqs = zeros() + zeros(), zeros() + zeros()
    maxima, steps = zeros() + [kept.clone()], [torch.zeros(()), torch.zeros(())]
    adamw_(
        params, grads, exp_avgs, exp_avg_sqs, steps, max_exp_avg_sqs=maxima, amsgrad=True,
        lr=0.0, beta1=0.0, beta2=0.999, eps=1e-8, weight_decay=0.0, backend="triton",
    )  # fmt: skip
    stored = exp_avgs[0]
    assert_bitwise(stored, x.to(BF16), "exp_avg: g rounded to nearest-even")
    rel = ((stored.double() - x.double()) / x.double()).abs()
    # Half a bf16 ulp: bf16 has 8 significand bits, so |x - rne(x)| <= 2^-8 |x| (the unit
    # roundoff; 2^-9 would be exceeded, e.g. by 1.33984375, 0.0029 away from its rounding).
    assert (rel <= 2.0**-8).all()
    if already_bf16:
        assert_bitwise(stored.float(), x, "bf16 values are stored exactly")
    assert_bitwise(maxima[1], kept, "the amsgrad maximum, loaded and stored back")


def test_bf16_subnormal_and_extreme_moments_load_and_store_exactly():
    """The interpreter converts bf16 subnormals wrongly (``kernels/common.py: widen``)."""
    kept, x = torch.tensor([2.0**-133, 2.0**-127, 3.0e38, 1.0], dtype=BF16), torch.zeros(4)
    maxima = [kept.clone()]
    adamw_([x.clone()], [x.clone()], [x.to(BF16)], [x.to(BF16)], [torch.zeros(())],
           max_exp_avg_sqs=maxima, amsgrad=True, lr=0.0, beta1=0.9, beta2=0.999, eps=1e-8,
           weight_decay=0.0, backend="triton")  # fmt: skip
    assert_bitwise(maxima[0], kept, "bf16 maxima")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_skipped_step_writes_nothing(backend):
    opt, params = optimizer(torch.float16, backend, amsgrad=True)
    step(opt, params, 0)
    state = copy.deepcopy(opt.state_dict())
    lists = {n: [opt.state[p][n] for p in params] for n in opt.state[params[0]]}
    adamw_(
        params, grads_for(params, 1), lists["exp_avg"], lists["exp_avg_sq"], lists["step"],
        max_exp_avg_sqs=lists["max_exp_avg_sq"], masters=lists["master_param"],
        amsgrad=True, lr=LR, beta1=0.9, beta2=0.999, eps=EPS, weight_decay=WD,
        found_inf=torch.ones(()), backend=backend,
    )  # fmt: skip
    assert_bitwise(opt.state_dict(), state, "state after a skipped step")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_state_dicts_round_trip_and_convert(backend):
    opt, params = optimizer(torch.float16, backend)
    step(opt, params, 0)
    sd = opt.state_dict()
    assert sd["state"][1]["exp_avg"].dtype == BF16  # compact, as kept
    assert sd["param_groups"][0]["state_dtype"] == BF16
    # Into a bf16-state optimizer: bitwise, and the next steps are the same.
    again, params2 = optimizer(torch.float16, backend)
    again.load_state_dict(copy.deepcopy(sd))
    assert_bitwise(again.state_dict(), sd, "reloaded")
    for p, q in zip(params2, params):  # the model's weights come back with it
        p.data.copy_(q.detach())
    step(opt, params, 1), step(again, params2, 1)
    assert_bitwise(again.state_dict(), opt.state_dict(), "stepped after reloading")
    # Into an fp32-state optimizer: widened exactly; it keeps its own state_dtype.
    wide, _ = optimizer(torch.float16, backend, state_dtype=torch.float32)
    wide.load_state_dict(copy.deepcopy(sd))
    assert wide.param_groups[0]["state_dtype"] == torch.float32
    for i, p in enumerate(wide.param_groups[0]["params"]):
        assert_bitwise(wide.state[p]["exp_avg_sq"], sd["state"][i]["exp_avg_sq"].float(), "wide")
    # A torch.optim (fp32) state dict into bf16 state: rounded to nearest-even (torch's cast).
    ref = torch.optim.AdamW([torch.nn.Parameter(p.detach().float()) for p in params], lr=LR)
    for p, g in zip(ref.param_groups[0]["params"], grads_for(params, 2)):
        p.grad = g.float()
    ref.step()
    opt.load_state_dict(ref.state_dict())
    for i, p in enumerate(params):
        assert_bitwise(opt.state[p]["exp_avg"], ref.state_dict()["state"][i]["exp_avg"].to(BF16))
    # torch.optim loads ours (casting the moments to its params' dtype, keeping the extra key),
    # and the dict survives torch.save / torch.load(weights_only=True).
    ref.load_state_dict(copy.deepcopy(sd))
    assert ref.state[ref.param_groups[0]["params"][1]]["exp_avg"].dtype == torch.float32
    torch.save(sd, buffer := io.BytesIO())
    assert_bitwise(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True), sd, "saved")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_switching_state_dtype_and_assigning_fp32_state_convert_it(backend):
    a, pa = optimizer(torch.float16, backend, state_dtype=torch.float32)
    step(a, pa, 0)
    b = copy.deepcopy(a)  # deepcopy: the same state, its own params
    pb = b.param_groups[0]["params"]
    a.param_groups[0]["state_dtype"] = BF16  # switched: converted before the next step
    for p in pb:  # by hand, what the switch must do
        for name in ("exp_avg", "exp_avg_sq"):
            b.state[p][name] = b.state[p][name].to(BF16)
    b.param_groups[0]["state_dtype"] = BF16
    step(a, pa, 1), step(b, pb, 1)
    assert a.state[pa[1]]["exp_avg"].dtype == BF16
    assert_bitwise(a.state_dict(), b.state_dict(), "switched vs converted by hand")
    c = copy.deepcopy(a)
    assert c.state[c.param_groups[0]["params"][1]]["exp_avg"].dtype == BF16  # deepcopy keeps it
    # An fp32 tensor assigned into a bf16 group: rounded (as the bf16 value assigned to b).
    value = torch.randn(SIZES[1])
    a.state[pa[1]]["exp_avg"], b.state[pb[1]]["exp_avg"] = value, value.to(BF16)
    step(a, pa, 2), step(b, pb, 2), step(c, c.param_groups[0]["params"], 2)
    assert_bitwise(a.state_dict(), b.state_dict(), "assigned fp32 vs bf16")
    a.param_groups[0]["state_dtype"] = torch.float32  # back: widened exactly
    before = a.state[pa[1]]["exp_avg"].float()
    a.init_state()  # makes the state whole as a step would, without stepping
    assert_bitwise(a.state[pa[1]]["exp_avg"], before, "widened back to fp32")


def test_the_engine_config_takes_state_dtype():
    config = {"optimizer": {"type": "AdamW", "params": {"state_dtype": "bf16"}}}
    engine, opt, *_ = fp16_triton.initialize(
        model=torch.nn.Linear(4, 3), config=dict(config, bf16={"enabled": True})
    )
    loss = engine(torch.randn(2, 4).to(BF16)).float().pow(2).mean()
    engine.backward(loss)
    engine.step()
    state = opt.optimizer.state[engine.module.weight]
    assert state["exp_avg"].dtype == BF16 and state["master_param"].dtype == torch.float32


def test_tiny_gpt_in_bf16_with_bf16_moments_is_within_5_percent_of_fp32_adamw():
    """bf16 params with fp32 masters and bf16 moments (engine, ``"bf16"`` section) against
    plain torch fp32 AdamW, same init, data, lr and clipping: final loss (mean of the last 15
    steps) within 5% (figures: docs/compact-state.md). Backend "auto": the reference on CPU
    (the interpreter would take minutes); the kernel is pinned to the float64 model above."""
    config = {"train_micro_batch_size_per_gpu": 16, "gradient_clipping": 1.0,
              "bf16": {"enabled": True}, "steps_per_print": 10**6,
              "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01,
                                                        "state_dtype": "bf16"}},
    }  # fmt: skip

    def make_engine(backend):
        return fp16_triton.initialize(model=TinyGPT(GPTConfig()), config=config, backend=backend)[0]

    data = tiny_gpt.batches(tiny_gpt.STEPS)
    _, ours = tiny_gpt.engine_run(make_engine, data)
    theirs = tiny_gpt.torch_fp32_adamw(data)  # lr 3e-3, weight decay 0.01, clipping at 1.0
    assert tiny_gpt.tail(theirs) < 0.7 * theirs[0]  # the task is learned at all
    assert tiny_gpt.tail(ours) == pytest.approx(tiny_gpt.tail(theirs), rel=0.05)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_with_a_bf16_buffer_is_the_fp32_step_with_the_buffer_rounded(backend, nesterov):
    """SGD's ``state_dtype=torch.bfloat16``: each step (the first, which copies the grad, and
    the later ones) is the fp32-buffer step from the widened buffer, its new buffer rounded to
    nearest-even: checked against the same class with an fp32 buffer restarted from the stored
    bf16 values at every step, weights and buffers bitwise."""
    gen = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen).half()) for n in (5, 1100)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    kwargs = dict(lr=1e-2, momentum=0.9, nesterov=nesterov, weight_decay=0.01, backend=backend)
    kwargs["dampening"] = 0.0 if nesterov else 0.1
    compact = fp16_triton.SGD(params, state_dtype=BF16, **kwargs)
    plain = fp16_triton.SGD(twins, **kwargs)
    for _ in range(3):
        for p, t in zip(params, twins):
            p.grad = torch.randn(p.shape, generator=gen).half()
            t.grad = p.grad.clone()
        compact.step()
        plain.step()
        for p, t in zip(params, twins):
            buf = compact.state[p]["momentum_buffer"]
            assert buf.dtype == BF16
            assert_bitwise(buf, plain.state[t]["momentum_buffer"].to(BF16), "buffer rounded")
            assert_bitwise(compact.state[p]["master_param"], plain.state[t]["master_param"], "w")
            plain.state[t]["momentum_buffer"].copy_(buf)  # both go on from the stored buffer
