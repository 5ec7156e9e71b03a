"""fp16_triton.Muon against ``torch.optim.Muon`` (the oracle, torch >= 2.9) and
``torch.optim.AdamW`` on both backends: fp32 params, fp16/bf16 params with fp32 masters, torch's
errors, loss scaling and clipping under ``FP16Optimizer``, state dicts, the AdamW groups, launch
counts, and what users do between steps. The engine's split, config and training are
``tests/test_muon_engine.py``'s.

Tolerances:
- Bitwise against torch.optim.Muon on the CPU: the elementwise parts are torch's ops with its
  roundings (its CPU lerp, mul_ and add_(alpha=) are fused multiply-adds; ``momentum - 1`` and
  the fp64 products of lr come from the host as torch computes them), and on the CPU the
  Newton–Schulz iterations are torch's own 2-D ops. On another CPU build (no FMA in torch's
  vectorized kernels) this would need ulps instead.
- The GPU's batched iterations (``baddbmm`` on ``[k, A, B]``) are checked against the one-matrix
  ones on the CPU within ``ns_tolerance``: CPU bf16 ``baddbmm`` and ``addmm`` may round a
  near-tie differently, and the iterations spread that flipped ulp over the matrix.
- A fp16/bf16 param with a master is exactly its master rounded to nearest-even.
"""

from __future__ import annotations

import copy
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from comparing import assert_bitwise, master_rounded
from comparing import one_thread as one_thread  # noqa: F401  (autouse: one CPU thread)
from torch.utils._python_dispatch import TorchDispatchMode

import fp16_triton
from fp16_triton.kernels import muon as muon_kernels

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a package at the repository root, not installed
    sys.path.insert(0, str(ROOT))
from bench.timing import count_triton_launches  # noqa: E402

if not hasattr(torch.optim, "Muon"):
    pytest.skip("torch.optim.Muon (the oracle) needs torch >= 2.9", allow_module_level=True)

BACKENDS = ("triton", "torch")
# Square, wide, tall (transposed inside the iterations), 1 x n, and sizes across a 1024-block.
SHAPES = ((8, 8), (6, 20), (40, 7), (1, 33), (33, 40), (70, 16))
CASES = [
    dict(lr=0.02),
    dict(lr=0.02, nesterov=False, adjust_lr_fn="original", weight_decay=0.0),
    dict(lr=0.01, adjust_lr_fn="match_rms_adamw", momentum=0.0, weight_decay=0.2),
    dict(lr=torch.tensor(0.02), momentum=0.5, nesterov=False),
    dict(lr=0.05, momentum=0.99, adjust_lr_fn="match_rms_adamw", ns_steps=3,
         ns_coefficients=(2.0, -1.5, 0.5), eps=1e-3),
    dict(lr=0.02, weight_decay=0.05, momentum=0.9),  # a near-tie CPU baddbmm rounds otherwise
]  # fmt: skip
COEFFICIENTS = (3.4445, -4.775, 2.0315)


def ns_tolerance(lr, shape, adjust_lr_fn, steps):
    """Where two matmul kernels round a near-tie differently, the flipped bf16 ulp spreads
    through the remaining iterations over the matrix. The iterations' outputs have singular
    values below 1.5, so no entry exceeds 1.5; a bound of 1/16 of that per entry and step (far
    above a few flipped ulps, far below a wrong update, whose entries are of order 1) times the
    step size ``lr * ratio``, summed over the steps."""
    a, b = shape
    if adjust_lr_fn == "match_rms_adamw":
        ratio = 0.2 * math.sqrt(max(a, b))
    else:
        ratio = math.sqrt(max(1, a / b))
    return steps * float(lr) * ratio * 1.5 / 16


def _twins(dtype, gen, shapes=SHAPES):
    weights = [torch.randn(s, generator=gen) for s in shapes]
    ours = [w.to(dtype).requires_grad_() for w in weights]
    theirs = [p.detach().float().requires_grad_() for p in ours]  # fp32 copies of the start
    return ours, theirs


def _run_both(backend, dtype, kwargs, steps=3, seed=0, shapes=SHAPES):
    """``steps`` steps of ours (``dtype`` params) and of torch.optim.Muon (fp32 copies) on the
    same grads (ours in ``dtype``, torch's the same values widened); checks after every step
    that a low-precision param is its master rounded."""
    gen = torch.Generator().manual_seed(seed)
    ours, theirs = _twins(dtype, gen, shapes)
    opt = fp16_triton.Muon(ours, backend=backend, **kwargs)
    ref = torch.optim.Muon(
        theirs, **{k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
    )
    for _ in range(steps):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            q.grad = p.grad.float()
        opt.step()
        ref.step()
        for p in ours:
            if dtype != torch.float32:
                assert_bitwise(
                    p.detach(), master_rounded(opt.state[p]["master_param"], dtype), "rounded"
                )
    return opt, ref, ours, theirs


# ------------------------------------------------------------------- against torch.optim.Muon
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_fp32_is_torch_muon_bitwise(backend, case):
    seed = 7 if case == len(CASES) - 1 else 0
    shapes = ((7, 40),) if case == len(CASES) - 1 else SHAPES
    opt, ref, ours, theirs = _run_both(
        backend, torch.float32, CASES[case], seed=seed, shapes=shapes
    )
    for i, (p, q) in enumerate(zip(ours, theirs)):
        assert_bitwise(p.detach(), q.detach(), f"param {i} {tuple(p.shape)}")
        assert_bitwise(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"], f"buf {i}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_masters_are_torch_muon_on_fp32_copies_bitwise(backend, dtype):
    # torch.optim.Muon on fp32 copies of the params, fed the same grads widened (exact): the
    # fp32 master is its param bit for bit; the param is the master rounded (checked after
    # every step in _run_both); the momentum is fp32. fp16/bf16 grads often put Nesterov's lerp
    # one fp32 ulp from a bf16 tie: this fails unless ``momentum - 1`` is rounded as torch's.
    opt, ref, ours, theirs = _run_both(backend, dtype, CASES[0], steps=4)
    for i, (p, q) in enumerate(zip(ours, theirs)):
        assert opt.state[p]["momentum_buffer"].dtype == torch.float32
        assert_bitwise(opt.state[p]["master_param"], q.detach(), f"master {i}")
        assert_bitwise(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"], f"buf {i}")


@pytest.mark.parametrize("shape", [(7, 40), (40, 7), (33, 40)])
def test_batched_iterations_track_the_one_matrix_ones(shape):
    """The GPU's path (``batched_newton_schulz_``, one ``[k, A, B]`` batch) against torch's
    2-D ops one matrix at a time, on the CPU, for the same bf16 inputs."""
    gen = torch.Generator().manual_seed(7)
    batch = torch.randn((5, *shape), generator=gen).bfloat16()
    singles = batch.clone()
    muon_kernels.batched_newton_schulz_(batch, COEFFICIENTS, 5, 1e-7)
    for matrix in singles:
        muon_kernels.matrix_newton_schulz_(matrix, COEFFICIENTS, 5, 1e-7)
    # ns_tolerance's per-entry bound (1/16 of the largest entry, 1.5) for one unit step.
    assert (batch.float() - singles.float()).abs().max().item() <= 1.5 / 16


# --------------------------------------------------------------------------------- errors
def _torch_error(make):
    with pytest.raises(ValueError) as error:
        make()
    return str(error.value)


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        ({}, (3,)), ({}, (2, 3, 4)), ({"lr": -1.0}, (2, 2)), ({"momentum": -0.5}, (2, 2)),
        ({"weight_decay": -0.1}, (2, 2)), ({"adjust_lr_fn": "spectral"}, (2, 2)),
        ({"ns_steps": 100}, (2, 2)), ({"ns_coefficients": (1.0, 2.0)}, (2, 2)),
    ],
)  # fmt: skip
def test_errors_are_torch_muons(kwargs, shape):
    def torch_muon_step():  # torch checks the iterations' settings at the first step
        p = torch.zeros(shape, requires_grad=True)
        opt = torch.optim.Muon([p], **kwargs)
        p.grad = torch.ones(shape)
        opt.step()

    message = _torch_error(torch_muon_step)
    with pytest.raises(ValueError, match=re.escape(message)):
        fp16_triton.Muon([torch.zeros(shape, requires_grad=True)], **kwargs)


def test_flat_buffers_are_refused():
    with pytest.raises(ValueError, match="flat_buffers"):
        fp16_triton.Muon([torch.zeros(4, 4, requires_grad=True)], flat_buffers=True)


# ------------------------------------------------------------------ scaling, clipping, skip
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_optimizer_skips_inf_and_unscales_and_clips(backend):
    gen = torch.Generator().manual_seed(3)
    ours, theirs = _twins(torch.float16, gen, SHAPES[:4])
    opt = fp16_triton.FP16Optimizer(
        fp16_triton.Muon(ours, lr=0.02, backend=backend),
        loss_scaler={"loss_scale": 0, "initial_scale_power": 10, "hysteresis": 1},
        clip_grad=1.0,
    )
    ref = torch.optim.Muon(theirs, lr=0.02)
    for step in range(3):
        scale = opt.loss_scale
        grads = [torch.randn(p.shape, generator=gen).half() for p in ours]  # norm > 1: clipped
        for p, g in zip(ours, grads):
            p.grad = (g.float() * scale).half()  # exact: scale is a power of 2
        if step == 1:
            ours[2].grad[0, 0] = math.inf
            kept = lambda: [dict(opt.optimizer.state[p], param=p.detach()) for p in ours]  # noqa: E731
            before = copy.deepcopy(kept())
            opt.step()
            assert opt.overflow and opt.loss_scale == scale / 2
            assert_bitwise(kept(), before, "params and state after a skipped step")
            continue
        opt.step()
        assert not opt.overflow
        for q, g in zip(theirs, grads):
            q.grad = g.float()
        torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        ref.step()
        for i, (p, q) in enumerate(zip(ours, theirs)):
            st = opt.optimizer.state[p]
            # The global norm is summed in another order than clip_grad_norm_'s: the clip
            # factors may differ in the last ulps, so the momentum is compared within 4 fp32
            # ulps of its size per step and the master within the iterations' tolerance.
            buf = ref.state[q]["momentum_buffer"]
            assert (st["momentum_buffer"] - buf).abs().max() <= 8 * 2**-23 * buf.abs().max()
            tol = ns_tolerance(0.02, p.shape, None, 2)
            assert (st["master_param"] - q.detach()).abs().max().item() <= tol, i
            assert_bitwise(p.detach(), st["master_param"].half(), f"param {i} rounded")


# ------------------------------------------------------------------------------ state dicts
@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_goes_to_torch_muon_and_back_and_deepcopy_steps_alike(backend):
    kwargs = dict(lr=0.02, weight_decay=0.05)
    opt, _, ours, _ = _run_both(backend, torch.float32, kwargs, steps=2)
    twin_opt = copy.deepcopy(opt)
    twin = [p for g in twin_opt.param_groups for p in g["params"]]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    ref = torch.optim.Muon(theirs, **kwargs)
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch's load keeps our tensors
    gen = torch.Generator().manual_seed(11)
    for _ in range(2):
        for p, q, t in zip(ours, theirs, twin):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad, t.grad = p.grad.clone(), p.grad.clone()
        for o in (opt, ref, twin_opt):
            o.step()
    for i, (p, q) in enumerate(zip(ours, theirs)):
        # The momentum bitwise; the params within the iterations' tolerance, as torch's
        # iterations are not ours (and, under the interpreter, the Nesterov lerp's ulp).
        assert_bitwise(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"], f"{i}")
        assert (p - q).abs().max().item() <= ns_tolerance(0.02, p.shape, None, 2), i
    assert_bitwise([p.detach() for p in ours], [t.detach() for t in twin], "the deepcopy")
    back_params = [q.detach().clone().requires_grad_() for q in theirs]
    back = fp16_triton.Muon(back_params, backend=backend, **kwargs)
    back.load_state_dict(copy.deepcopy(ref.state_dict()))
    for p, b in zip(theirs, back_params):
        assert_bitwise(back.state[b]["momentum_buffer"], ref.state[p]["momentum_buffer"], "back")


# ------------------------------------------------------------------------------ AdamW groups
@pytest.mark.parametrize("backend", BACKENDS)
def test_use_muon_false_groups_step_as_torch_adamw(backend):
    gen = torch.Generator().manual_seed(5)
    shapes = [(5,), (1100,), (6, 9)]  # 1-D params are allowed outside the Muon groups
    ours = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    matrix = torch.randn(8, 8, generator=gen).requires_grad_()
    adam = dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)
    opt = fp16_triton.Muon(
        [{"params": [matrix]}, {"params": ours, "use_muon": False, **adam}], lr=0.02,
        backend=backend,
    )  # fmt: skip
    ref = torch.optim.AdamW(theirs, **adam)
    for _ in range(3):
        matrix.grad = torch.randn(8, 8, generator=gen)
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        # torch's fp32 defaults (rtol 1.3e-6, atol 1e-5): the bias corrections' powers and
        # the square root round differently from torch's, a few ulps per step.
        torch.testing.assert_close(p.detach(), q.detach())
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"])
    assert set(opt.state[ours[0]]) >= {"step", "exp_avg", "exp_avg_sq"}
    assert "momentum_buffer" in opt.state[matrix]


# ------------------------------------------------------------------------ launches, functional
class _MatmulCount(TorchDispatchMode):
    OPS = ("mm", "addmm", "bmm", "baddbmm", "matmul")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ in self.OPS
        return func(*args, **(kwargs or {}))


def _triton_launches_per_step(n, dtype):
    params = [torch.randn(16, 24).to(dtype).requires_grad_() for _ in range(n)]
    opt = fp16_triton.Muon(params, lr=0.02, backend="triton")
    counts = []
    for _ in range(2):  # the second step reuses the cached tables and buffers
        for p in params:
            p.grad = torch.randn(16, 24).to(dtype)
        with count_triton_launches() as launches:
            opt.step()
        counts.append(launches["launches"])
    return counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_launches_per_step_do_not_grow_with_the_matrices(dtype):
    assert _triton_launches_per_step(1, dtype) == _triton_launches_per_step(8, dtype) == [2, 2]


def test_batched_iterations_take_the_matmuls_of_one_matrix():
    # The GPU's path: 3 matmuls per iteration whatever the number of same-shape matrices.
    counts = []
    for k in (1, 8):
        batch = torch.randn(k, 16, 24).bfloat16()
        with _MatmulCount() as matmuls:
            muon_kernels.batched_newton_schulz_(batch, COEFFICIENTS, 5, 1e-7)
        counts.append(matmuls.count)
    assert counts == [3 * 5, 3 * 5]


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_muon_is_the_class_step(backend):
    gen = torch.Generator().manual_seed(9)
    params = [torch.randn(s, generator=gen).half().requires_grad_() for s in SHAPES[:3]]
    twin = [p.detach().clone() for p in params]
    masters = [p.float() for p in twin]
    bufs = [torch.zeros(p.shape) for p in twin]
    kwargs = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=False, eps=1e-6)
    kwargs.update(ns_coefficients=(3.4, -4.7, 2.0), ns_steps=4, adjust_lr_fn="original")
    opt = fp16_triton.Muon(params, backend=backend, **kwargs)
    for _ in range(2):
        grads = [torch.randn(p.shape, generator=gen).half() for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        fp16_triton.functional.muon_(twin, grads, bufs, masters=masters, backend=backend, **kwargs)
    for p, t, m, b in zip(params, twin, masters, bufs):
        assert_bitwise(p.detach(), t, "param")
        assert_bitwise(opt.state[p]["master_param"], m, "master")
        assert_bitwise(opt.state[p]["momentum_buffer"], b, "momentum")


# ----------------------------------------------------------- what users do between steps
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_param_reviewed_in_place_is_refused_before_anything_is_written(backend):
    # Same memory, same size, another shape (p.data = p.data.view(...)): the buckets do not
    # see it, the iterations would; torch.optim.Muon fails in its lerp_. Both params unchanged.
    a, b = (torch.nn.Parameter(torch.randn(4, 6)) for _ in range(2))
    opt = fp16_triton.Muon([a, b], lr=0.1, backend=backend)
    a.grad, b.grad = torch.randn(4, 6), torch.randn(4, 6)
    opt.step()
    b.data = b.data.view(6, 4)
    b.grad = torch.randn(6, 4)

    def tensors():
        return (a, b, *(opt.state[p]["momentum_buffer"] for p in (a, b)))

    before = [t.detach().clone() for t in tensors()]
    with pytest.raises(ValueError, match="momentum_buffer of shape"):
        opt.step()
    for i, (x, y) in enumerate(zip(before, tensors())):
        assert_bitwise(x, y.detach(), f"tensor {i} written by a refused step")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_one_row_param_with_any_strides_steps_as_torch(backend):
    ours = torch.nn.Parameter(torch.randn(6, 1).t())  # (1, 6), strides (1, 1): dense
    theirs = torch.nn.Parameter(ours.detach().clone())
    opt = fp16_triton.Muon([ours], lr=0.1, backend=backend)
    ref = torch.optim.Muon([theirs], lr=0.1)
    ours.grad = torch.randn(1, 6).t().contiguous().t()
    theirs.grad = ours.grad.clone()
    opt.step()
    ref.step()
    assert_bitwise(ours.detach().contiguous(), theirs.detach().contiguous(), "param")


def test_switching_a_group_to_muon_is_refused_before_state_is_made():
    w, v = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))
    opt = fp16_triton.Muon([{"params": [w]}, {"params": [v], "use_muon": False}], backend="torch")
    opt.param_groups[1]["use_muon"] = True  # a vector cannot be orthogonalized
    w.grad, v.grad = torch.randn(4, 4), torch.randn(4)
    with pytest.raises(ValueError, match="Muon only supports 2D parameters"):
        opt.step()
    assert v not in opt.state and w not in opt.state
    opt.param_groups[1]["use_muon"] = False
    opt.step()  # and the group steps again once switched back
    opt.param_groups[1]["params"] = [torch.nn.Parameter(torch.randn(4, 4))]
    opt.param_groups[0]["use_muon"] = False  # w has Muon state: say so
    with pytest.raises(ValueError, match="has Muon state, but its group now has use_muon=False"):
        opt.step()
