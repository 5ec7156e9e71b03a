"""fp16_triton.Muon against ``torch.optim.Muon`` (the oracle, torch >= 2.9) and
``torch.optim.AdamW`` on both backends: fp32 params, fp16/bf16 params with fp32 masters, torch's
errors, loss scaling and clipping under ``FP16Optimizer``, state dicts, the engine's DeepSpeed
split and config, the tiny GPT trained in fp16 against an fp32 torch baseline, launch counts.

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
import torch.nn.functional as F
from comparing import assert_bitwise
from comparing import one_thread as one_thread  # noqa: F401  (autouse: one CPU thread)
from torch.utils._python_dispatch import TorchDispatchMode

import fp16_triton
from fp16_triton.kernels import muon as muon_kernels
from fp16_triton.train import GPTConfig, MarkovTask, TinyGPT

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
                assert_bitwise(p.detach(), opt.state[p]["master_param"].to(dtype), "rounded")
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


# ------------------------------------------------------------------------------------ engine
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 16)
        self.hidden = torch.nn.Sequential(
            torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16)
        )
        self.lm_head = torch.nn.Linear(16, 10)


def _split(engine):
    names = {id(p): n for n, p in engine.module.named_parameters()}
    return {
        (g["use_muon"], g["lr"]): sorted(names[id(p)] for p in g["params"])
        for g in engine.optimizer.param_groups
    }


MUON_CONFIG = {"type": "Muon", "params": {"lr": 0.1, "muon_lr": 0.02, "adam_lr": 0.003}}


def test_engine_splits_as_deepspeed_and_wraps_one_muon():
    torch.manual_seed(0)
    engine = fp16_triton.initialize(model=Net(), config={"optimizer": MUON_CONFIG})[0]
    assert isinstance(engine.optimizer, fp16_triton.FP16Optimizer)
    assert type(engine.optimizer.optimizer) is fp16_triton.Muon  # one optimizer, both halves
    assert _split(engine) == {
        (True, 0.02): ["hidden.0.weight", "hidden.2.weight"],
        (False, 0.003): ["embed.weight", "hidden.0.bias", "hidden.2.bias", "lm_head.bias",
                         "lm_head.weight"],
    }  # fmt: skip
    model = Net()
    model.hidden[2].weight.use_muon = False  # the user's tags win over the name rule
    model.lm_head.weight.use_muon = True
    rest = list(model.embed.parameters()) + list(model.lm_head.parameters())
    groups = [{"params": list(model.hidden.parameters()), "lr": 0.5}, {"params": rest}]
    engine = fp16_triton.initialize(
        model=model, model_parameters=groups, config={"optimizer": MUON_CONFIG}
    )[0]
    assert _split(engine) == {
        (True, 0.5): ["hidden.0.weight"],  # a group's own lr wins
        (False, 0.5): ["hidden.0.bias", "hidden.2.bias", "hidden.2.weight"],
        (True, 0.02): ["lm_head.weight"],
        (False, 0.003): ["embed.weight", "lm_head.bias"],
    }


@pytest.mark.parametrize(
    "key, value",
    [("ns_coefficients", [1.0, 2.0]), ("ns_coefficients", "abc"), ("adjust_lr_fn", "spectral"),
     ("muon_lr", -0.1), ("adam_lr", "fast")],
)  # fmt: skip
def test_bad_config_values_name_the_key(key, value):
    from fp16_triton.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=key):
        load_config({"optimizer": {"type": "Muon", "params": {key: value}}})


STEPS = 150
MUON = {"muon_lr": 0.02, "adam_lr": 3e-3, "weight_decay": 0.01}


def _config():
    return {
        "train_micro_batch_size_per_gpu": 16,
        "gradient_clipping": 1.0,
        "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 24,
                 "loss_scale_window": 50, "hysteresis": 2, "min_loss_scale": 1},
        "optimizer": {"type": "Muon", "params": MUON},
        "steps_per_print": 10**6,
    }  # fmt: skip


def _gpt():
    """The tiny GPT with its embeddings (named tokens/positions: the name rule would give them
    to Muon) tagged for AdamW, so that Muon gets the hidden 2-D weights only."""
    model = TinyGPT(GPTConfig())
    model.tokens.weight.use_muon = model.positions.weight.use_muon = False
    return model


def _batches(steps):
    task, data = MarkovTask(GPTConfig().vocab, 0), torch.Generator().manual_seed(1)
    return [task.batch(16, GPTConfig().seq_len, data) for _ in range(steps)]


def _loss(model, seq):
    logits = model(seq[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, GPTConfig().vocab), seq[:, 1:].reshape(-1))


def _engine(backend):
    return fp16_triton.initialize(model=_gpt(), config=_config(), backend=backend)[0]


def _engine_run(batches, engine=None, start=0, backend="auto"):
    if engine is None:
        torch.manual_seed(0)
        engine = _engine(backend)
    losses = []
    for seq in batches[start:]:
        loss = _loss(engine, seq)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return engine, losses


def _torch_fp32_muon_adamw(batches):
    """The baseline without this package: fp32 TinyGPT, torch.optim.Muon on the hidden 2-D
    weights, torch.optim.AdamW on the rest (the AdamW half's betas and eps as ours: Muon's
    defaults (0.9, 0.95) and 1e-7), ``clip_grad_norm_`` over all."""
    torch.manual_seed(0)
    model = _gpt()
    params = list(model.parameters())
    hidden = [p for p in params if p.ndim == 2 and getattr(p, "use_muon", True)]
    rest = [p for p in params if all(p is not h for h in hidden)]
    wd = MUON["weight_decay"]
    opts = [
        torch.optim.Muon(hidden, lr=MUON["muon_lr"], weight_decay=wd),
        torch.optim.AdamW(rest, lr=MUON["adam_lr"], betas=(0.9, 0.95), eps=1e-7, weight_decay=wd),
    ]  # fmt: skip
    losses = []
    for seq in batches:
        loss = _loss(model, seq)
        model.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for o in opts:
            o.step()
        losses.append(loss.item())
    return losses


def test_engine_trains_the_tiny_gpt_in_fp16_within_5_percent_of_fp32_torch():
    """Muon in fp16 with dynamic loss scaling (2**24 at first: the first steps overflow and are
    skipped) ends within 5% of the fp32 torch.optim.Muon + AdamW baseline's final loss (mean of
    the last 15 steps). Backend "auto": the torch reference on CPU (the interpreter would take
    minutes); the kernels are pinned to torch above and to the reference by the resume test."""
    batches = _batches(STEPS)
    engine, ours = _engine_run(batches)
    theirs = _torch_fp32_muon_adamw(batches)
    tail = lambda xs: sum(xs[-15:]) / 15  # noqa: E731
    assert tail(theirs) < 0.7 * theirs[0]  # the task is learned at all
    assert tail(ours) == pytest.approx(tail(theirs), rel=0.05), (tail(ours), tail(theirs))
    assert engine.skipped_steps >= 1  # scaling is exercised


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_resumes_bitwise(tmp_path, backend):
    """Saved after 4 steps (the first skipped while the scale comes down from 2**24), resumed
    in a fresh engine, 4 more steps: bit for bit the run that never stopped."""
    batches = _batches(8)
    straight, _ = _engine_run(batches, backend=backend)
    half, _ = _engine_run(batches[:4], backend=backend)
    half.save_checkpoint(tmp_path)
    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    resumed = _engine(backend)
    resumed.load_checkpoint(tmp_path)
    _engine_run(batches, resumed, start=4)
    assert resumed.global_steps == straight.global_steps == 8
    assert_bitwise(resumed.module.state_dict(), straight.module.state_dict(), "weights")
    assert_bitwise(
        resumed.optimizer.state_dict(), straight.optimizer.state_dict(), "optimizer state"
    )


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


def test_the_engine_sends_conv_filters_to_adamw():
    # DeepSpeed tags params of >= 2 dims and flattens conv filters; torch.optim.Muon refuses
    # them: here they go to AdamW instead of failing.
    model = torch.nn.Sequential(torch.nn.Conv1d(4, 4, 3), torch.nn.Flatten(), torch.nn.Linear(8, 2))
    engine, optimizer, *_ = fp16_triton.initialize(model=model, config={"optimizer": MUON_CONFIG})
    muon = [p for g in optimizer.optimizer.param_groups if g["use_muon"] for p in g["params"]]
    assert [tuple(p.shape) for p in muon] == [(2, 8)]
    engine.backward(engine(torch.randn(3, 4, 4)).square().mean())
    engine.step()
