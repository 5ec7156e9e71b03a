"""fp16_triton.Adam/AdamW/SGD against torch.optim, on both backends.

The Triton backend runs through the interpreter on CPU (see conftest.py) and on the GPU when
there is one. Tolerance for fp32 trajectories: rtol=1.3e-6, atol=1e-5, torch's default fp32
tolerance, which PyTorch's own optimizer tests use to compare its fused and for-loop
implementations; our kernel rounds once per operation like torch's, with fp64 bias
corrections, so differences are a few ulps per step (measured: at most ~5e-8 absolute after
20 steps on unit-scale weights).
"""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from comparing import master_rounded

import fp16_triton
from fp16_triton.backend import BACKEND_ENV, resolve_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"] if DEVICE == "cpu" else ["triton"]
RTOL, ATOL = 1.3e-6, 1e-5
# Shapes: a matrix larger than one program's chunk (4096 elements), a vector, a scalar-like
# tensor, so every trajectory crosses chunk and block boundaries.
SHAPES = [(70, 65), (33,), (1,)]
STEPS = 20

# The hyperparameter sets of PyTorch's own optimizer tests (optim_inputs_func_adam / _adamw /
# _sgd in torch/testing/_internal/common_optimizers.py), fused/capturable variants excluded.
ADAM_CASES = [
    {},
    {"lr": 0.01},
    {"weight_decay": 0.1},
    {"weight_decay": 0.1, "maximize": True},
    {"weight_decay": 0.1, "amsgrad": True},
    {"lr": torch.tensor(0.001)},
    {"lr": torch.tensor(0.001), "amsgrad": True, "weight_decay": 0.1},
    {"betas": (0.5, 0.99), "eps": 1e-6},
]
SGD_CASES = [
    {"lr": 0.01},
    {"lr": torch.tensor(0.001)},
    {"lr": 0.01, "momentum": 0.9},
    {"lr": 0.01, "momentum": 0.9, "dampening": 0.5},
    {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.1},
    {"lr": 0.01, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
    {"lr": 0.01, "maximize": True, "momentum": 0.9, "weight_decay": 0.1},
]
PAIRS = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW, "SGD": torch.optim.SGD}
CASES = [("Adam", c) for c in ADAM_CASES] + [("AdamW", c) for c in ADAM_CASES]
CASES += [("SGD", c) for c in SGD_CASES]


def make_params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(DEVICE, dtype).requires_grad_() for s in SHAPES]


def random_grads(params, step, dtype=None):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g).to(DEVICE, dtype or p.dtype) for p in params]


def clone_kwargs(kwargs):
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)


def step_side_by_side(steps, ours_p, ours, ref_p, ref):
    """Both optimizers through the same grads (``random_grads`` of each step in ``steps``),
    then ours compared with the reference, param by param."""
    for step in steps:
        for params, opt in ((ours_p, ours), (ref_p, ref)):
            for p, g in zip(params, random_grads(params, step)):
                p.grad = g
            opt.step()
    for a, b in zip(ours_p, ref_p):
        assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=lambda x: str(x))
def test_fp32_trajectory_matches_torch(backend, name, kwargs):
    ours_p, ref_p = make_params(), make_params()
    ours = getattr(fp16_triton, name)(ours_p, backend=backend, **clone_kwargs(kwargs))
    ref = PAIRS[name](ref_p, **clone_kwargs(kwargs))
    step_side_by_side(range(STEPS), ours_p, ours, ref_p, ref)
    for p, q in zip(ours_p, ref_p):
        for key, value in ref.state[q].items():
            if isinstance(value, torch.Tensor):
                assert_close(ours.state[p][key].to(value.device), value.float())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD"])
def test_low_precision_masters_follow_fp32_torch(backend, dtype, name):
    """The fp32 master follows torch.optim run on an fp32 copy fed the same (upcast) grads,
    and the fp16/bf16 param is exactly the master rounded to nearest-even."""
    kwargs = {"lr": 0.01, "weight_decay": 0.1}
    if name == "SGD":
        kwargs["momentum"] = 0.9
    low = make_params(dtype)
    fp32 = [p.detach().float().requires_grad_() for p in low]
    ours = getattr(fp16_triton, name)(low, backend=backend, **kwargs)
    ref = PAIRS[name](fp32, **kwargs)
    for step in range(STEPS):
        grads = random_grads(low, step)
        for p, q, g in zip(low, fp32, grads):
            p.grad, q.grad = g, g.float()
        ours.step()
        ref.step()
    for p, q in zip(low, fp32):
        master = ours.state[p]["master_param"]
        assert master.dtype == torch.float32
        assert_close(master, q.detach())
        assert torch.equal(p.detach(), master_rounded(master, dtype))  # exact: rounded copy


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_master_weights_updates_low_precision_params(backend):
    low = make_params(torch.float16)
    opt = fp16_triton.AdamW(low, lr=0.01, master_weights=False, backend=backend)
    before = [p.detach().clone() for p in low]
    for p, g in zip(low, random_grads(low, 0)):
        p.grad = g
    opt.step()
    assert all("master_param" not in opt.state[p] for p in low)
    assert all(opt.state[p]["exp_avg"].dtype == torch.float32 for p in low)
    assert any(not torch.equal(a, b) for a, b in zip(before, low))


@pytest.mark.parametrize("backend", BACKENDS)
def test_none_grads_are_skipped_and_do_not_advance_step(backend):
    ours_p, ref_p = make_params(), make_params()
    ours = fp16_triton.Adam(ours_p, lr=0.01, backend=backend)
    ref = torch.optim.Adam(ref_p, lr=0.01)
    for step in range(8):
        for params, opt in ((ours_p, ours), (ref_p, ref)):
            opt.zero_grad()
            for i, (p, g) in enumerate(zip(params, random_grads(params, step))):
                if (step + i) % 3 != 0:  # each param misses some steps
                    p.grad = g
            opt.step()
    for a, b in zip(ours_p, ref_p):
        assert_close(a, b)
        assert ours.state[a]["step"].item() == ref.state[b]["step"].item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_groups_and_add_param_group(backend):
    """Different hyperparameters per group, a group added mid-training, lr edited by hand."""

    def run(module, params):
        a, b, c = params
        extra = {"backend": backend} if module is fp16_triton else {}
        groups = [{"params": [a]}, {"params": [b], "lr": 0.05, "weight_decay": 0.0}]
        opt = module.AdamW(groups, lr=0.01, **extra)
        for step in range(12):
            if step == 5:
                opt.add_param_group({"params": [c], "lr": 0.02, "betas": (0.8, 0.9)})
            for group in opt.param_groups:
                group["lr"] *= 0.9
            for p, g in zip(params, random_grads(params, step)):
                p.grad = g
            opt.step()

    ours_p, ref_p = make_params(), make_params()
    run(fp16_triton, ours_p)
    run(torch.optim, ref_p)
    for a, b in zip(ours_p, ref_p):
        assert_close(a, b)


SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=40),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=7),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=1),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_lr_schedulers_work_unchanged(backend, scheduler, name):
    kwargs = {"lr": 0.01, "momentum": 0.9} if name == "SGD" else {"lr": 0.01}
    results = []
    for module, extra in ((fp16_triton, {"backend": backend}), (torch.optim, {})):
        params = make_params()
        opt = getattr(module, name)(params, **kwargs, **extra)
        sched = SCHEDULERS[scheduler](opt)
        lrs = []
        for step in range(12):
            for p, g in zip(params, random_grads(params, step)):
                p.grad = g
            opt.step()
            sched.step(1.0) if scheduler == "ReduceLROnPlateau" else sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        results.append((params, lrs))
    (ours_p, ours_lrs), (ref_p, ref_lrs) = results
    assert ours_lrs == ref_lrs
    for a, b in zip(ours_p, ref_p):
        assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_grad_scaler_skips_exactly_on_inf(backend, dtype):
    """torch.amp.GradScaler drives the optimizer through the fused contract: the step is
    skipped (state and params bitwise unchanged) exactly when a grad is non-finite."""
    if DEVICE == "cuda" and dtype == torch.bfloat16:
        # Seen with torch 2.11 on an H200: GradScaler's own inf check raises NotImplementedError
        # ("_amp_foreach_non_finite_check_and_unscale_cuda" not implemented for 'BFloat16')
        # before our step is called; bf16 training needs no loss scaling.
        pytest.skip("torch's CUDA GradScaler cannot check bf16 grads")
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 8).to(DEVICE, dtype)
    opt = fp16_triton.AdamW(model.parameters(), lr=0.01, backend=backend)
    scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0**10, growth_interval=3)
    inject = {2, 5, 6}
    for step in range(10):
        opt.zero_grad()
        x = torch.randn(4, 16, device=DEVICE, dtype=dtype)
        scaler.scale(model(x).float().square().mean()).backward()
        if step in inject:
            model.weight.grad.view(-1)[step] = float("inf") if step != 5 else float("nan")
        snapshot = copy.deepcopy((model.state_dict(), opt.state_dict()))
        scale_before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if step in inject:
            assert_bitwise_equal(snapshot[0], model.state_dict())
            assert_bitwise_equal(snapshot[1]["state"], opt.state_dict()["state"])
            assert scaler.get_scale() == scale_before * 0.5
        else:
            assert opt.state[model.weight]["step"].item() == step + 1 - len(
                [s for s in inject if s < step]
            )
    assert opt.state[model.weight]["step"].item() == 10 - len(inject)


def assert_bitwise_equal(a, b):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_bitwise_equal(a[k], b[k])
    else:
        assert a == b


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_found_inf_two_still_skips(backend):
    """GradScaler sums per-device flags, so found_inf can be 2.0: that must skip too."""
    params = make_params()
    opt = fp16_triton.SGD(params, lr=0.1, momentum=0.9, backend=backend)
    for p, g in zip(params, random_grads(params, 0)):
        p.grad = g
    before = [p.detach().clone() for p in params]
    opt.grad_scale = torch.ones((), device=DEVICE)
    opt.found_inf = torch.full((), 2.0, device=DEVICE)
    opt.step()
    del opt.grad_scale, opt.found_inf
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert all(opt.state[p]["step"].item() == 0 for p in params)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_state_dict_round_trip_continues_bitwise(backend, name):
    kwargs = {"lr": 0.01, "amsgrad": True} if name == "AdamW" else {"lr": 0.01, "momentum": 0.9}

    def train(opt, params, steps):
        for step in steps:
            for p, g in zip(params, random_grads(params, step)):
                p.grad = g
            opt.step()

    params = make_params(torch.float16)
    opt = getattr(fp16_triton, name)(params, backend=backend, **kwargs)
    train(opt, params, range(5))
    saved = copy.deepcopy(opt.state_dict())
    saved_params = [p.detach().clone() for p in params]
    train(opt, params, range(5, 10))

    params2 = [p.clone().requires_grad_() for p in saved_params]
    opt2 = getattr(fp16_triton, name)(params2, backend=backend, **kwargs)
    opt2.load_state_dict(saved)
    assert opt2.state[params2[0]]["exp_avg" if name == "AdamW" else "momentum_buffer"].dtype == (
        torch.float32
    )
    train(opt2, params2, range(5, 10))
    for a, b in zip(params, params2):
        assert_bitwise_equal(a.detach(), b.detach())
    for a, b in zip(params, params2):
        assert_bitwise_equal(opt.state[a], opt2.state[b])


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_state_dict_interop(backend):
    """torch.optim.AdamW's state dict loads into ours and ours into torch's; the mapping:
    same keys, ``step`` as a CPU fp32 tensor, ``master_param`` extra on our side."""
    ref_p, ours_p = make_params(), make_params()
    ref = torch.optim.AdamW(ref_p, lr=0.01)
    for p, g in zip(ref_p, random_grads(ref_p, 0)):
        p.grad = g
    ref.step()
    ours = fp16_triton.AdamW(ours_p, lr=0.01, backend=backend)
    with torch.no_grad():
        for a, b in zip(ours_p, ref_p):
            a.copy_(b)
    ours.load_state_dict(ref.state_dict())
    step_side_by_side(range(1, 6), ours_p, ours, ref_p, ref)
    back_p = [p.detach().clone().requires_grad_() for p in ours_p]
    back = torch.optim.AdamW(back_p, lr=0.01)
    back.load_state_dict(ours.state_dict())
    assert back.state[back_p[0]]["step"].item() == 6


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_state_dict_with_low_precision_params_gets_masters(backend):
    low = make_params(torch.float16)
    ref = torch.optim.Adam([p.detach().clone().requires_grad_() for p in low], lr=0.01)
    ours = fp16_triton.Adam(low, lr=0.01, backend=backend)
    ours.load_state_dict(ref.state_dict())  # empty state: nothing to map yet
    for p, g in zip(ref.param_groups[0]["params"], random_grads(low, 0)):
        p.grad = g
    ref.step()
    ours.load_state_dict(ref.state_dict())
    for p in low:
        assert ours.state[p]["master_param"].dtype == torch.float32
        assert torch.equal(ours.state[p]["master_param"], p.detach().float())
        assert ours.state[p]["exp_avg"].dtype == torch.float32


def stepped_adam() -> fp16_triton.Adam:
    """An Adam (torch backend) after one step: state to save and to corrupt."""
    params = make_params()
    opt = fp16_triton.Adam(params, lr=0.01, backend="torch")
    for p, g in zip(params, random_grads(params, 0)):
        p.grad = g
    opt.step()
    return opt


def test_bad_state_dicts_raise_and_change_nothing():
    opt = stepped_adam()
    good = copy.deepcopy(opt.state_dict())
    before = copy.deepcopy(opt.state_dict())
    wrong_count = copy.deepcopy(good)
    wrong_count["param_groups"][0]["params"] = wrong_count["param_groups"][0]["params"][:-1]
    wrong_shape = copy.deepcopy(good)
    wrong_shape["state"][0]["exp_avg"] = torch.zeros(3)
    wrong_groups = copy.deepcopy(good)
    wrong_groups["param_groups"].append(copy.deepcopy(good["param_groups"][0]))
    for bad, message in [
        (wrong_count, "group 0 has 2 params, this optimizer.s has 3"),
        (wrong_shape, "exp_avg"),
        (wrong_groups, "parameter groups"),
        ({"state": {}}, "param_groups"),
    ]:
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict(bad)
        assert_bitwise_equal(before["state"], opt.state_dict()["state"])


@pytest.mark.parametrize(
    "entry, value, error, message",
    [
        ("exp_avg", lambda t: t.to(torch.uint8), TypeError, "must be floating point"),
        ("exp_avg_sq", lambda t: t.to(torch.int64), TypeError, "must be floating point"),
        ("exp_avg", lambda t: t.bool(), TypeError, "must be floating point"),
        ("exp_avg", lambda t: t.to(torch.complex64), TypeError, "must be floating point"),
        ("exp_avg", lambda t: t.to(torch.int8), TypeError, "int8 without its block scales"),
        ("sr_seed", lambda t: torch.tensor([1, 2]), ValueError, "one integer"),
        (None, lambda t: 3, TypeError, "must be a dict"),
    ],
)
def test_loaded_state_of_another_kind_is_refused_before_anything_changes(
    entry, value, error, message
):
    """torch.optim casts whatever it loads; integer, bool or complex moments (a uint8 copy of
    int8 codes would load as values up to 255) are no state of ours, and are refused."""
    opt = stepped_adam()
    bad = copy.deepcopy(opt.state_dict())
    before = copy.deepcopy(opt.state_dict())
    if entry is None:
        bad["state"][0] = value(None)
    else:
        bad["state"][0][entry] = value(bad["state"][0]["exp_avg"])
    with pytest.raises(error, match=message):
        opt.load_state_dict(bad)
    assert_bitwise_equal(before["state"], opt.state_dict()["state"])


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("Adam", {"lr": -1.0}),
        ("Adam", {"eps": -1.0}),
        ("Adam", {"betas": (1.0, 0.999)}),
        ("Adam", {"betas": (0.9, -0.1)}),
        ("AdamW", {"weight_decay": -0.1}),
        ("Adam", {"lr": torch.tensor([0.1, 0.2])}),
        ("SGD", {"lr": -0.1}),
        ("SGD", {"lr": 0.1, "momentum": -0.5}),
        ("SGD", {"lr": 0.1, "weight_decay": -1.0}),
        ("SGD", {"lr": 0.1, "nesterov": True}),
        ("SGD", {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "nesterov": True}),
    ],
)
def test_invalid_hyperparameters_have_torch_messages(name, kwargs):
    with pytest.raises(ValueError) as theirs:
        PAIRS[name](make_params(), **kwargs)
    with pytest.raises(ValueError) as ours:
        getattr(fp16_triton, name)(make_params(), **kwargs)
    assert str(ours.value) == str(theirs.value)


def test_bad_params_are_rejected_before_anything_changes():
    p = make_params()
    with pytest.raises(ValueError, match="twice"):
        fp16_triton.Adam([p[0], p[1], p[0]])
    with pytest.raises(TypeError, match="float16, bfloat16 and float32"):
        fp16_triton.Adam([torch.zeros(3, dtype=torch.complex64, requires_grad=True)])
    with pytest.raises(TypeError, match="float16, bfloat16 and float32"):
        fp16_triton.SGD([torch.zeros(3, dtype=torch.int32)])
    with pytest.raises(ValueError, match="empty parameter list"):
        fp16_triton.AdamW([])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_grad_raises_before_any_update(backend):
    dense = torch.randn(4, 3, device=DEVICE, requires_grad=True)
    emb = torch.nn.Embedding(10, 3, sparse=True).to(DEVICE)
    opt = fp16_triton.Adam([dense, emb.weight], lr=0.1, backend=backend)
    dense.grad = torch.ones_like(dense)
    emb(torch.tensor([1, 2], device=DEVICE)).sum().backward()
    before = dense.detach().clone()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(before, dense.detach())


def test_backend_selection(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("torch", cpu) == "torch"
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert resolve_backend("triton", cpu) == "torch"  # the environment wins
    monkeypatch.setenv(BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match=BACKEND_ENV):
        resolve_backend("auto", cpu)
    monkeypatch.delenv(BACKEND_ENV)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="need a GPU"):
        resolve_backend("triton", cpu)
    with pytest.raises(ValueError, match="backend must be one of"):
        fp16_triton.Adam(make_params(), backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_closure_and_zero_grad(backend):
    params = make_params()
    opt = fp16_triton.SGD(params, lr=0.1, backend=backend)

    def closure():
        opt.zero_grad()
        loss = sum(p.square().sum() for p in params)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and math.isfinite(loss.item())
    opt.zero_grad()
    assert all(p.grad is None for p in params)


def test_hyperparameters_are_runtime_kernel_arguments():
    """lr and the other hyperparameters are runtime arguments (changing them every step never
    recompiles); only feature switches and dtypes are compile-time constants."""
    from fp16_triton.kernels import adam, sgd

    for kernel, runtime in [
        (adam._adam_kernel, ["lr", "beta1", "beta2", "eps", "weight_decay", "max_norm"]),
        (sgd._sgd_kernel, ["lr", "momentum", "one_minus_dampening", "weight_decay"]),
    ]:
        params = inspect.signature(kernel.fn).parameters
        constexprs = {n for n, p in params.items() if "constexpr" in str(p.annotation)}
        assert {"BLOCK", "CHUNK", "PARAM_DTYPE"} <= constexprs  # the check can see constexprs
        assert not constexprs & set(runtime)
        assert set(runtime) <= set(params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-sync detection needs a CUDA GPU")
@pytest.mark.parametrize("wrapped", [False, True])
def test_cuda_step_makes_no_host_sync(wrapped):
    """The fused path never syncs: steps after the first (which builds and uploads the tables)
    run under torch.cuda.set_sync_debug_mode("error"), plain and under FP16Optimizer."""
    model = torch.nn.Linear(64, 64).cuda().half()
    opt = fp16_triton.AdamW(model.parameters(), lr=1e-3, backend="triton")
    if wrapped:
        opt = fp16_triton.FP16Optimizer(opt, clip_grad=1.0)
    x = torch.randn(8, 64, device="cuda", dtype=torch.float16)

    def step():
        loss = model(x).float().square().mean()
        opt.backward(loss) if wrapped else loss.backward()
        opt.step()

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_implementation_switches_are_accepted(backend):
    """Code written for torch (``fused=True``, ``foreach=...``) runs unchanged; the switches
    are recorded in the groups like torch's, and ``differentiable=True`` is refused."""
    params = make_params()
    opt = fp16_triton.AdamW(params, lr=0.01, fused=True, foreach=False, capturable=True)
    assert opt.param_groups[0]["fused"] is True
    assert set(torch.optim.AdamW(make_params()).param_groups[0]) <= set(opt.param_groups[0])
    fp16_triton.SGD(make_params(), lr=0.1, momentum=0.9, fused=True, foreach=True)
    with pytest.raises(ValueError, match="differentiable"):
        fp16_triton.Adam(make_params(), differentiable=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adam_decoupled_weight_decay_is_adamw(backend):
    ours_p, ref_p = make_params(), make_params()
    ours = fp16_triton.Adam(ours_p, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True,
                            backend=backend)  # fmt: skip
    ref = torch.optim.AdamW(ref_p, lr=0.01, weight_decay=0.1)
    step_side_by_side(range(5), ours_p, ours, ref_p, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_replaced_from_outside_is_used(backend):
    """ZeroRedundancyOptimizer.load_state_dict writes ``optim.state[p]`` itself (with ``step``
    on the CPU): the next step must use the new state, not tensors cached from before."""
    params = make_params()
    opt = fp16_triton.AdamW(params, lr=0.01, backend=backend)
    for step in range(3):
        for p, g in zip(params, random_grads(params, step)):
            p.grad = g
        opt.step()
    replacement = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    for p in params:
        replacement[p]["step"] = torch.tensor(10.0)  # CPU, as ZeRO leaves it
        opt.state[p] = replacement[p]
    opt.step()
    for p in params:
        assert opt.state[p]["step"].item() == 11.0
        assert opt.state[p]["step"].device == p.device


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_uses_the_saved_hyperparameters(backend):
    """torch SGD(momentum=0.9) state loaded into ours built with momentum 0: the buffers are
    read as the saved groups say, and the next steps follow torch."""
    ref_p, ours_p = make_params(), make_params()
    ref = torch.optim.SGD(ref_p, lr=0.1, momentum=0.9)
    ours = fp16_triton.SGD(ours_p, lr=0.1, backend=backend)
    for p, g in zip(ref_p, random_grads(ref_p, 0)):
        p.grad = g
    ref.step()
    with torch.no_grad():
        for a, b in zip(ours_p, ref_p):
            a.copy_(b)
    ours.load_state_dict(ref.state_dict())
    assert ours.param_groups[0]["momentum"] == 0.9
    step_side_by_side(range(1, 4), ours_p, ours, ref_p, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_refresh_fp32_params_after_loading_weights_alone(backend):
    params = make_params(torch.float16)
    opt = fp16_triton.AdamW(params, lr=0.01, backend=backend)
    for p, g in zip(params, random_grads(params, 0)):
        p.grad = g
    opt.step()
    with torch.no_grad():
        for p in params:
            p.fill_(5.0)  # as model.load_state_dict would
    opt.refresh_fp32_params()
    for p in params:
        assert torch.equal(opt.state[p]["master_param"], p.detach().float())
    with torch.no_grad():
        for p in params:
            p.fill_(3.0)
    with pytest.warns(DeprecationWarning, match="refresh_fp32_params"):
        opt.refresh_master_weights()  # the old name: still refreshes, and warns
    for p in params:
        assert torch.equal(opt.state[p]["master_param"], p.detach().float())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flat", [False, True], ids=["per_tensor", "flat"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_param_written_since_the_last_step_is_where_the_next_step_starts(backend, flat, dtype):
    """Writes into low-precision params between steps (``p.clamp_()``, ``p.data.fill_()``,
    ``model.load_state_dict``), with no refresh call: the next step starts from what the
    params hold, as torch.optim would (before, the stale masters overwrote them). Oracle:
    torch.optim.AdamW on fp32 copies of the written values with our moments and step counts;
    the master within torch's fused-vs-foreach tolerance, the param exactly its rounding."""
    params = make_params(dtype)
    opt = fp16_triton.AdamW(params, lr=0.01, backend=backend, flat_buffers=flat)
    for p, g in zip(params, random_grads(params, 0)):
        p.grad = g
    opt.step()
    masters = [opt.state[p]["master_param"].clone() for p in params]
    with torch.no_grad():
        params[0].clamp_(-0.1, 0.1)  # in place, counted by autograd's version counter
        params[1].data.fill_(0.5)  # through .data: no version counter sees it
    # Element by element: where the param still is its master's rounding (inside the clamp
    # range, and all of params[2]) the master goes on, elsewhere the written value.
    expected_start = [
        torch.where(m.to(dtype) == p.detach(), m, p.detach().float())
        for p, m in zip(params, masters)
    ]
    assert torch.equal(expected_start[2], masters[2])
    assert not torch.equal(expected_start[0], masters[0])
    ref_params = [w.clone().requires_grad_() for w in expected_start]
    ref = torch.optim.AdamW(ref_params, lr=0.01)
    ref_state = ref.state_dict()
    for i, p in enumerate(params):
        ref_state["state"][i] = {
            k: opt.state[p][k].clone() for k in ("step", "exp_avg", "exp_avg_sq")
        }
    ref.load_state_dict(ref_state)
    grads = random_grads(params, 1)
    for p, q, g in zip(params, ref_params, grads):
        p.grad = g
        q.grad = g.float()
    opt.step()
    ref.step()
    for p, q in zip(params, ref_params):
        master = opt.state[p]["master_param"]
        assert_close(master, q.detach())
        assert torch.equal(p.detach(), master_rounded(master, dtype))


def test_init_state_creates_state_without_stepping():
    params = make_params(torch.float16)
    before = [p.detach().clone() for p in params]
    opt = fp16_triton.AdamW(params, lr=0.01, amsgrad=True, backend="torch")
    opt.init_state()
    for p, b in zip(params, before):
        assert opt.state[p]["step"].item() == 0
        assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq",
                                     "master_param"}  # fmt: skip
        assert torch.equal(p.detach(), b)


def test_odd_sized_params_get_their_own_unaligned_launch(monkeypatch):
    """A param whose size is not a multiple of 8 must not take the 128-bit (ALIGNED) loads
    away from the others: the optimizer buckets by alignment."""
    from fp16_triton.kernels import adam

    seen = []
    original = adam._adam_kernel.run

    def record(*args, **kwargs):
        seen.append(kwargs["ALIGNED"])
        return original(*args, **kwargs)

    monkeypatch.setattr(adam._adam_kernel, "run", record)
    params = [torch.randn(64, 8, device=DEVICE, requires_grad=True) for _ in range(3)]
    params.append(torch.randn(10, device=DEVICE, requires_grad=True))  # 10 % 8 != 0
    opt = fp16_triton.AdamW(params, lr=0.01, backend="triton")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert sorted(seen) == [False, True]


def test_versioned_state_counts_every_kind_of_replacement():
    """optimizer.state counts replacements through every dict method (dict's C methods skip
    __setitem__), and survives deepcopy as the same class."""
    params = make_params()
    opt = fp16_triton.SGD(params, lr=0.1, momentum=0.9, backend="torch")
    state = opt.state
    for change in (
        lambda: state.__setitem__(params[0], {}),
        lambda: state.update({params[1]: {}}),
        lambda: state.pop(params[1]),
        lambda: state.setdefault(params[2], {}),
        lambda: state.__delitem__(params[0]),
        lambda: state.__ior__({params[0]: {}}),
        lambda: state.clear(),
    ):
        before = state.version
        change()
        assert state.version > before
    copied = copy.deepcopy(opt)
    assert type(copied.state) is type(opt.state)
    assert copied.backend == opt.backend
    for p in copied.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    copied.step()  # a copy steps on its own params


def test_state_dtype_refusals():
    p = [torch.nn.Parameter(torch.zeros(4))]
    with pytest.raises(ValueError, match="int8' is built for Adam and AdamW's moments only"):
        fp16_triton.Lion(p, state_dtype="int8")
    with pytest.raises(ValueError, match="state_dtype"):
        fp16_triton.Adam(p, state_dtype=torch.float16)
