"""``fp16_triton.functional`` against torch: ``clip_grad_norm_`` with
``torch.nn.utils.clip_grad_norm_`` as the oracle, ``adam_``/``adamw_``/``sgd_`` with
``torch.optim._functional``, ``unscale_`` with ``torch._amp_foreach_non_finite_check_and_unscale_``.

The Triton path runs through the interpreter (conftest.py) with ``backend="triton"``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.optim import _functional as torch_F

from fp16_triton import functional as F
from fp16_triton.kernels import nonfinite

SIZES = (5000, 7, 1, 0)  # crosses a 4096-element chunk, a tiny tensor, a scalar, an empty one


def norm_rtol(result_dtype, grad_dtypes):
    """Relative tolerance of our norm against torch's.

    Our sum of squares is accumulated in fp32 over all elements and rounded to the result
    dtype once. torch rounds each grad's norm to that grad's dtype (half an ulp of it: 2^-11
    fp16, 2^-8 bf16), and the norm of those norms to the result dtype again. So the two differ
    by at most about one eps (ulp of 1) of the coarsest dtype involved. With only fp32 grads:
    a blocked fp32 sum of <= 5000 squares (4 sequential additions per lane, a 10-level tree, a
    few partials: ~16 roundings of 2^-24) against torch's fp64 CPU accumulation: 1e-6.
    """
    eps = max(torch.finfo(d).eps for d in (result_dtype, *grad_dtypes))
    return 1e-6 if eps < 1e-6 else eps


def make_params(dtypes, seed=0, scale=1.0, sizes=SIZES):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for i, n in enumerate(sizes * len(dtypes)):
        dtype = dtypes[i % len(dtypes)]
        p = torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype))
        p.grad = (torch.randn(n, generator=gen) * scale).to(dtype)
        params.append(p)
    return params


def clone_params(params):
    """Copies with copies of the grads (``copy.deepcopy`` of a Parameter drops its grad)."""
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


def grads_of(params):
    return [p.grad for p in params if p.grad is not None]


DTYPE_SETS = {
    "fp32": (torch.float32,),
    "fp16": (torch.float16,),
    "bf16": (torch.bfloat16,),
    "mixed": (torch.float16, torch.bfloat16, torch.float32),
}


@pytest.mark.parametrize("factor", [0.5, 2.0], ids=["clipped", "below"])
@pytest.mark.parametrize("dtypes", list(DTYPE_SETS.values()), ids=list(DTYPE_SETS))
def test_clip_grad_norm_matches_torch(dtypes, factor):
    ours = make_params(dtypes)
    theirs = clone_params(ours)
    true_norm = math.sqrt(sum(float(g.double().square().sum()) for g in grads_of(ours)))
    max_norm = factor * true_norm
    norm = F.clip_grad_norm_(ours, max_norm, backend="triton")
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    assert norm.dtype == expected.dtype and norm.device == expected.device
    assert norm.shape == expected.shape == ()
    rtol = norm_rtol(norm.dtype, dtypes)
    torch.testing.assert_close(norm, expected, rtol=rtol, atol=0)
    # Against float64: one rounding to the result dtype (half an eps) plus fp32 noise.
    exact = torch.tensor(true_norm, dtype=torch.float64)
    half_eps = torch.finfo(norm.dtype).eps / 2
    torch.testing.assert_close(norm.double(), exact, rtol=max(half_eps, 1e-6), atol=0)
    # The scaling given our norm is torch's, bit for bit: torch's own clipping with our norm.
    check = clone_params(theirs)
    for c, p in zip(check, make_params(dtypes)):
        c.grad.copy_(p.grad)
    torch.nn.utils.clip_grads_with_norm_(check, max_norm, norm)
    for p, c in zip(ours, check):
        assert torch.equal(p.grad, c.grad)
    # And close to torch's result: the coefficient differs as the norms do (above).
    for p, t in zip(ours, theirs):
        grad_rtol = 2 * rtol + torch.finfo(p.dtype).eps  # coefficient + 1 rounding
        torch.testing.assert_close(p.grad, t.grad, rtol=grad_rtol, atol=0)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_clip_grad_norm_nonfinite_like_torch(bad, dtype):
    ours = make_params((dtype,))
    ours[1].grad[3] = bad
    theirs = clone_params(ours)
    norm = F.clip_grad_norm_(ours, 1.0, backend="triton")
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    # Exact: an inf norm gives a 0 coefficient (finite grads -> +-0, the inf -> nan), a nan
    # norm a nan coefficient (every grad nan), whatever the rounding of finite values.
    torch.testing.assert_close(norm, expected, rtol=0, atol=0, equal_nan=True)
    for p, t in zip(ours, theirs):
        torch.testing.assert_close(p.grad, t.grad, rtol=0, atol=0, equal_nan=True)


def test_fp16_norm_beyond_fp16_range_is_inf_as_in_torch():
    ours = [torch.nn.Parameter(torch.zeros(4000, dtype=torch.float16))]
    ours[0].grad = torch.full((4000,), 2000.0, dtype=torch.float16)  # norm ~126,000 > 65504
    theirs = clone_params(ours)
    norm = F.clip_grad_norm_(ours, 1.0, backend="triton")
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert torch.isinf(norm) and torch.isinf(expected) and norm.dtype == torch.float16
    assert torch.equal(ours[0].grad, theirs[0].grad)  # all zeros


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_error_if_nonfinite_raises_torch_error_before_writing(bad):
    ours = make_params((torch.float16, torch.float32))
    ours[0].grad[0] = bad
    before = [p.grad.clone() for p in ours]
    theirs = clone_params(ours)
    with pytest.raises(RuntimeError) as expected:
        torch.nn.utils.clip_grad_norm_(theirs, 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError) as raised:
        F.clip_grad_norm_(ours, 1.0, error_if_nonfinite=True, backend="triton")
    assert str(raised.value) == str(expected.value)
    for p, b in zip(ours, before):
        torch.testing.assert_close(p.grad, b, rtol=0, atol=0, equal_nan=True)


def test_error_if_nonfinite_finite_norm_clips():
    ours = make_params((torch.float32,))
    theirs = clone_params(ours)
    norm = F.clip_grad_norm_(ours, 1.0, error_if_nonfinite=True, backend="triton")
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0, error_if_nonfinite=True)
    torch.testing.assert_close(norm, expected, rtol=norm_rtol(torch.float32, ()), atol=0)


def test_empty_inputs_like_torch():
    for empty in ([], [torch.nn.Parameter(torch.ones(3))]):  # no params; params without grads
        norm = F.clip_grad_norm_(empty, 1.0, backend="triton")
        expected = torch.nn.utils.clip_grad_norm_(empty, 1.0)
        assert torch.equal(norm, expected) and norm.dtype == expected.dtype
        assert norm.device == expected.device
    with pytest.warns(UserWarning, match="empty generator"):
        F.clip_grad_norm_((p for p in []), 1.0, backend="triton")


def test_single_tensor_argument():
    p = torch.nn.Parameter(torch.zeros(300))
    p.grad = torch.arange(300, dtype=torch.float32)
    (q,) = clone_params([p])
    norm = F.clip_grad_norm_(p, 10.0, backend="triton")
    expected = torch.nn.utils.clip_grad_norm_(q, 10.0)
    torch.testing.assert_close(norm, expected, rtol=norm_rtol(torch.float32, ()), atol=0)
    torch.testing.assert_close(p.grad, q.grad, rtol=3e-6, atol=0)  # coefficient's 2 ulps + 1


@pytest.mark.parametrize("norm_type", [1.0, math.inf, 3.0])
def test_other_norm_types_are_torch_exactly(norm_type):
    ours = make_params((torch.float32, torch.float16), sizes=(50, 3))  # torch: no inf norm of []
    theirs = clone_params(ours)
    norm = F.clip_grad_norm_(ours, 0.1, norm_type=norm_type, backend="triton")
    expected = torch.nn.utils.clip_grad_norm_(theirs, 0.1, norm_type=norm_type)
    assert torch.equal(norm, expected)  # delegated: the same function
    assert all(torch.equal(p.grad, t.grad) for p, t in zip(ours, theirs))


def test_torch_backend_is_torch_exactly():
    ours = make_params((torch.float16, torch.float32))
    theirs = clone_params(ours)
    norm = F.clip_grad_norm_(ours, 0.1, backend="torch")
    assert torch.equal(norm, torch.nn.utils.clip_grad_norm_(theirs, 0.1))
    assert all(torch.equal(p.grad, t.grad) for p, t in zip(ours, theirs))


def test_fused_path_is_one_read_launch_and_one_scale_launch_per_dtype(monkeypatch):
    launches = []
    for name in ("_nonfinite_check_kernel", "_unscale_kernel"):
        kernel = getattr(nonfinite, name)
        original = kernel.run

        def run(*args, _name=name, _original=original, **kwargs):
            launches.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", run)
    params = [torch.nn.Parameter(torch.zeros(5)) for _ in range(40)]
    for p in params:
        p.grad = torch.ones(5)
    F.clip_grad_norm_(params, 1.0, backend="triton")
    assert sorted(launches) == ["_nonfinite_check_kernel", "_unscale_kernel"]


def test_fused_path_does_not_sync(monkeypatch):
    """No ``.item()``, ``bool()`` or ``float()`` of a tensor: with error_if_nonfinite=False
    nothing waits for the device."""
    params = make_params((torch.float16, torch.float32))

    def refuse(*args, **kwargs):
        raise AssertionError("host sync")

    for name in ("item", "__bool__", "__float__", "tolist", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    F.clip_grad_norm_(params, 1.0, backend="triton")
    with pytest.raises(AssertionError, match="host sync"):  # the one case that must sync
        F.clip_grad_norm_(params, 1.0, error_if_nonfinite=True, backend="triton")


@settings(max_examples=15, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 2100), min_size=1, max_size=4),
    log_scale=st.integers(-8, 8),
    factor=st.floats(0.01, 4.0),
)
def test_clip_grad_norm_property(sizes, log_scale, factor):
    gen = torch.Generator().manual_seed(len(sizes) * 1000 + sum(sizes))
    ours = []
    for n in sizes:
        p = torch.nn.Parameter(torch.zeros(n))
        p.grad = torch.randn(n, generator=gen) * 2.0**log_scale
        ours.append(p)
    theirs = clone_params(ours)
    true_norm = math.sqrt(sum(float(p.grad.double().square().sum()) for p in ours))
    max_norm = factor * true_norm + 1e-30
    norm = F.clip_grad_norm_(ours, max_norm, backend="triton")
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    torch.testing.assert_close(norm, expected, rtol=norm_rtol(torch.float32, ()), atol=0)
    for p, t in zip(ours, theirs):  # coefficient (2 x norm tolerance) + one fp32 rounding
        torch.testing.assert_close(p.grad, t.grad, rtol=2 * 1e-6 + 2.0**-23, atol=0)


# --------------------------------------------------------------------------------------------
# Steps, unscale, check
# --------------------------------------------------------------------------------------------

# Adam/SGD against torch.optim._functional on fp32 params, 3 steps: the same fp32 operations
# in the same order, except the bias corrections (fp64 binary exponentiation in the kernel,
# Python's pow in torch) and where a multiply-add is grouped or fused differently: a few
# roundings per step, 3 steps: 2e-6 relative (~17 ulps). Those roundings happen at the scale
# of the operands, so where a result cancels toward 0 (a moment whose sign flips, a param near
# 0) its relative error grows: an absolute slack of 8 half-ulps (8 * 2^-24) of the operands'
# scale covers that (params: their largest value; moments and buffers: the largest grad after
# weight decay, squared for the second moment).
STEP_RTOL = 2e-6


def assert_step_close(ours, theirs, scale):
    for a, b in zip(ours, theirs):
        atol = 8 * 2.0**-24 * max(scale, float(b.abs().max()))
        torch.testing.assert_close(a, b, rtol=STEP_RTOL, atol=atol)


def grad_scale_of(params, grads, weight_decay):
    largest = lambda ts: max(float(t.abs().max()) for t in ts)  # noqa: E731
    return max(largest(g) for g in grads) + weight_decay * largest(params)


def step_lists(n_params=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=gen) for n in (300, 5, 1)[:n_params]]
    grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(3)]
    return params, grads


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_matches_torch_functional(backend, decoupled, amsgrad):
    params, grads = step_lists()
    ref = [p.clone() for p in params]
    initial = [p.clone() for p in params]

    def state():
        zeros = lambda: [torch.zeros_like(p) for p in params]  # noqa: E731
        return zeros(), zeros(), zeros(), [torch.zeros(()) for _ in params]

    m, v, vmax, steps = state()
    rm, rv, rvmax, rsteps = state()
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, amsgrad=amsgrad)
    fn = F.adamw_ if decoupled else F.adam_
    for g in grads:
        fn(params, g, m, v, steps, max_exp_avg_sqs=vmax, backend=backend, **hyper)
        torch_F.adam(
            ref, g, rm, rv, rvmax, rsteps, foreach=False,
            decoupled_weight_decay=decoupled, maximize=False, **hyper,
        )  # fmt: skip
    g_scale = grad_scale_of(initial + params, grads, 0.1)
    assert_step_close(params, ref, max(float(p.abs().max()) for p in initial))
    assert_step_close(m, rm, g_scale)
    assert_step_close(v, rv, g_scale**2)
    assert [float(s) for s in steps] == [float(s) for s in rsteps] == [3.0] * 3


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_torch_functional(backend, nesterov):
    params, grads = step_lists()
    ref = [p.clone() for p in params]
    initial = [p.clone() for p in params]
    bufs, rbufs = [None] * 3, [None] * 3
    hyper = dict(lr=0.1, momentum=0.9, dampening=0.0 if nesterov else 0.1, weight_decay=0.01)
    for g in grads:
        F.sgd_(params, g, bufs, nesterov=nesterov, backend=backend, **hyper)
        torch_F.sgd(ref, g, rbufs, foreach=False, nesterov=nesterov, maximize=False, **hyper)
    assert_step_close(params, ref, max(float(p.abs().max()) for p in initial))
    assert_step_close(bufs, rbufs, grad_scale_of(initial + params, grads, 0.01))


def test_sgd_without_momentum_leaves_buffers_none():
    params, grads = step_lists()
    ref = [p.clone() for p in params]
    bufs = [None] * 3
    F.sgd_(params, grads[0], bufs, lr=0.5, backend="triton")
    torch_F.sgd(
        ref, grads[0], [None] * 3, weight_decay=0.0, momentum=0.0, lr=0.5, dampening=0.0,
        nesterov=False, maximize=False,
    )  # fmt: skip
    assert bufs == [None] * 3
    for a, b in zip(params, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # p - lr * g: one rounding each way


def test_found_inf_skips_and_grad_scale_unscales():
    params, grads = step_lists()
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    steps = [torch.zeros(()) for _ in params]
    before = [t.clone() for t in params + m + v + steps]
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, backend="triton")
    F.adam_(params, grads[0], m, v, steps, found_inf=torch.ones(()), **hyper)
    assert all(torch.equal(a, b) for a, b in zip(params + m + v + steps, before))
    # Scaling by a power of two is exact, so unscaling in the kernel is bit for bit the plain step.
    scaled = [g * 1024.0 for g in grads[0]]
    twin = [p.clone() for p in params]
    m2, v2 = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    steps2 = [torch.zeros(()) for _ in params]
    F.adam_(params, scaled, m, v, steps, grad_scale=torch.full((), 1024.0), **hyper)
    F.adam_(twin, grads[0], m2, v2, steps2, **hyper)
    assert all(torch.equal(a, b) for a, b in zip(params + m + v, twin + m2 + v2))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_adamw_int8_moments_are_the_optimizers_step(backend):
    """int8 moments through the functional form (codes and block scales, made by
    ``int8_state.new_moments``): bitwise the class's step with ``state_dtype="int8"``."""
    from fp16_triton import AdamW, int8_state

    gen = torch.Generator().manual_seed(5)
    param = torch.randn(64, 80, generator=gen).to(torch.bfloat16)  # 5120 >= 4096: int8
    grads = [torch.randn(param.shape, generator=gen).to(torch.bfloat16) for _ in range(3)]
    hyper = dict(lr=1e-2, weight_decay=0.1)
    opt = AdamW([torch.nn.Parameter(param.clone())], state_dtype="int8", backend=backend, **hyper)
    ours, master = param.clone(), param.float()
    moments, step = int8_state.new_moments(param), torch.zeros(())
    for g in grads:
        opt.param_groups[0]["params"][0].grad = g.clone()
        opt.step()
        F.adamw_(
            [ours], [g], [moments["exp_avg"]], [moments["exp_avg_sq"]], [step],
            masters=[master], beta1=0.9, beta2=0.999, eps=1e-8, backend=backend,
            exp_avg_scales=[moments["exp_avg_scale"]],
            exp_avg_sq_scales=[moments["exp_avg_sq_scale"]], **hyper,
        )  # fmt: skip
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert state["exp_avg"].dtype == torch.int8
    for name in ("exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale"):
        assert torch.equal(moments[name], state[name]), name
    assert torch.equal(ours.view(torch.int16), opt.param_groups[0]["params"][0].view(torch.int16))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize(
    "what",
    ["exp_avgs of two dtypes", "an int64 step count", "an fp64 grad", "int8 momentum"],
)
def test_both_backends_refuse_bad_lists_before_writing(backend, what):
    """The reference checks what the launchers check (but layouts, which it does not need):
    a list of mixed dtypes or a state the kernels do not read, refused with nothing written."""
    params, grads = step_lists(2)
    grads = grads[0]
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    steps = [torch.zeros(()) for _ in params]
    if what == "exp_avgs of two dtypes":
        m[1] = m[1].to(torch.bfloat16)
    elif what == "an int64 step count":
        steps[1] = torch.tensor(0)
    elif what == "an fp64 grad":
        grads[1] = grads[1].double()
    before = [t.clone() for t in params + m + v]
    hyper = dict(lr=1e-2, weight_decay=0.1)
    with pytest.raises((TypeError, ValueError)):
        if what == "int8 momentum":
            buffers = [torch.zeros_like(p, dtype=torch.int8) for p in params]
            F.sgd_(params, grads, buffers, steps, momentum=0.9, backend=backend, **hyper)
        else:
            F.adamw_(params, grads, m, v, steps, beta1=0.9, beta2=0.99, eps=1e-8,
                     backend=backend, **hyper)  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(params + m + v, before))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_unscale_matches_torch_amp(backend):
    gen = torch.Generator().manual_seed(3)
    grads = [
        (torch.randn(n, generator=gen) * 1000).to(d)
        for n, d in ((5000, torch.float16), (7, torch.bfloat16), (33, torch.float32))
    ]
    theirs = [g.clone() for g in grads]
    found, expected_found = torch.zeros(1), torch.zeros(1)
    inv = torch.full((1,), 1.0 / 3.0)
    F.unscale_(grads, found, inv, backend=backend)
    torch._amp_foreach_non_finite_check_and_unscale_(theirs, expected_found, inv)
    assert all(torch.equal(a, b) for a, b in zip(grads, theirs))  # g * inv, one rounding
    assert torch.equal(found, expected_found) and found.item() == 0
    grads[2][0] = math.nan
    F.unscale_(grads, found, inv, backend=backend)
    assert found.item() == 1.0


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_nonfinite_check_and_norm_against_float64(backend):
    grads = make_params((torch.float16, torch.float32), scale=100.0)
    grads = grads_of(grads)
    scale = torch.full((), 64.0)
    out = F.nonfinite_check_and_norm(grads, grad_scale=scale, backend=backend)
    exact = sum(float((g.double() / 64.0).square().sum()) for g in grads)
    assert out.dtype == torch.float32 and out[1].item() == 0
    assert abs(out[0].item() - exact) <= 2e-6 * exact  # fp32 accumulation: see norm_rtol
    grads[0][0] = math.inf
    assert F.nonfinite_check_and_norm(grads, backend=backend)[1].item() != 0
