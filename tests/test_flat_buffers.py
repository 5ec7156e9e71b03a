"""flat_buffers=True: optimizer-owned flat param/grad/state buffers (fp16_triton/flat_buffers.py).

What is checked: a flat optimizer follows the per-tensor (flat_buffers=False) optimizer bit for
bit whenever the two are fed the same grads (every kernel is elementwise, so where a value sits
in memory cannot change it); the params, grads and states are views into 64-element-aligned
flat buffers with zero padding; autograd and ``optimizer.zero_grad()`` keep the views;
``model.zero_grad()`` and loaded state are noticed and re-adopted; params without a grad are
stepped with a zero grad, params frozen from the start are left alone (freezing or unfreezing
after adoption: refused, or stepped like a param without grad); state dicts move between flat,
per-tensor and torch.optim optimizers; a steady step reads a constant number of per-param
attributes; the engine's ``optimizer.params.flat_buffers`` key.

Tolerances. Everything is compared bytewise (``assert_bitwise``: -0.0 != 0.0, NaN-safe) except:

* with gradient clipping inside ``FP16Optimizer`` (the global norm is one norm of the flat
  buffer instead of a sum of per-tensor squared norms, so the clip coefficient may differ by an
  ulp or two) and
* a flat fp16_triton state dict continued by ``torch.optim.AdamW`` (torch's own arithmetic),

each explained at its assertion.

The Triton backend runs through the interpreter on CPU (conftest.py sets TRITON_INTERPRET=1),
so models are tiny: a 7 -> 33 -> 5 MLP (param sizes 231, 33, 165, 5: none a multiple of 64).
"""

from __future__ import annotations

import copy
import logging
import pickle
import sys

import pytest
import torch
from comparing import assert_bitwise
from exploring import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fp16_triton
from fp16_triton import DynamicLossScaler, FP16Optimizer
from fp16_triton.config import ConfigError, load_config
from fp16_triton.flat_buffers import ALIGN_ELEMENTS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"] if DEVICE == "cpu" else ["triton"]
IN, HIDDEN, OUT, BATCH = 7, 33, 5, 4
OPT_LOGGER = "fp16_triton.optimizer"
# torch's default fp32 tolerance, as in tests/test_optimizers.py (see its docstring): torch's
# AdamW and our kernels round once per operation with the same order of operations but compute
# the bias corrections differently (fp64 Python floats here), a few ulps per step.
RTOL32, ATOL32 = 1.3e-6, 1e-5

# (optimizer, hyperparameters) of the bitwise trajectory tests.
CASES = {
    "AdamW-wd": ("AdamW", {"lr": 1e-2, "weight_decay": 0.1}),
    "Adam-amsgrad-l2": ("Adam", {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.05}),
    "SGD-nesterov": ("SGD", {"lr": 5e-2, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    "SGD-plain": ("SGD", {"lr": 5e-2}),
}
# (param dtype, master_weights): fp32 params are their own master, so only one fp32 entry.
PRECISIONS = {
    "fp16-master": (torch.float16, True),
    "fp16-nomaster": (torch.float16, False),
    "bf16-master": (torch.bfloat16, True),
    "bf16-nomaster": (torch.bfloat16, False),
    "fp32": (torch.float32, True),
}


# ------------------------------------------------------------------------------- helpers
def make_model(dtype=torch.float32, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))
    return model.to(DEVICE, dtype)


def loss_of(model, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, IN, generator=g).to(DEVICE, next(model.parameters()).dtype)
    y = torch.randn(BATCH, OUT, generator=g).to(DEVICE)
    return (model(x).float() - y).square().mean()


def make_opt(name, params, flat, backend="torch", **kwargs):
    return getattr(fp16_triton, name)(params, backend=backend, flat_buffers=flat, **kwargs)


def train(model, opt, steps, start=0):
    """``opt.zero_grad()``, backward, ``opt.step()`` for steps ``start .. start + steps - 1``."""
    for step in range(start, start + steps):
        opt.zero_grad()
        loss_of(model, step).backward()
        opt.step()


def snapshot(params, opt):
    """Copies of the params and of each param's state tensors (in ``params`` order)."""
    params = list(params)
    return {
        "params": [p.detach().clone() for p in params],
        "state": [
            {k: v.detach().clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
            if p in opt.state
            else {}
            for p in params
        ],
    }


def flat_buckets(opt, group_index=0):
    """The flat storages of a group (private API; fine in tests)."""
    group = opt.param_groups[group_index]
    return [b.flat for b in opt._groups[id(group)].plans["flat"].buckets]


def offset_in(t: torch.Tensor, flat: torch.Tensor) -> int:
    """``t``'s element offset inside the 1-D ``flat``; fails unless ``t`` lies inside it."""
    assert t.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr(), "not a view"
    assert t.dtype == flat.dtype and t.is_contiguous()
    start = t.data_ptr() - flat.data_ptr()
    assert start % t.element_size() == 0
    offset = start // t.element_size()
    assert 0 <= offset and offset + t.numel() <= flat.numel(), "outside the flat buffer"
    return offset


def padding_mask(flat) -> torch.Tensor:
    """True on the elements of a bucket's buffers that belong to no param."""
    mask = torch.ones(flat.numel, dtype=torch.bool, device=flat.device)
    for offset, shape in zip(flat.offsets, flat.shapes):
        mask[offset : offset + shape.numel()] = False
    return mask


def assert_padding_zero(flat):
    mask = padding_mask(flat)
    buffers = {"param": flat.param, "grad": flat.grad, **flat.state}
    for name, buf in buffers.items():
        assert torch.equal(buf[mask], torch.zeros_like(buf[mask])), f"padding of {name}"


def readopt_records(caplog, level=logging.WARNING):
    return [
        r
        for r in caplog.records
        if r.name == OPT_LOGGER and r.levelno == level and "re-adopted" in r.getMessage()
    ]


# ------------------------------------------------------------ 1. flat == per-tensor, bitwise
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_flat_trajectory_is_bitwise_equal_to_per_tensor(backend, case, precision):
    """Every param gets a grad at every step and nothing clips: the flat optimizer's params and
    every state tensor are bitwise those of flat_buffers=False after several steps (the kernels
    are elementwise and the shared step count has the per-param counts' value)."""
    name, kwargs = CASES[case]
    dtype, master = PRECISIONS[precision]
    runs = {}
    for flat in (True, False):
        model = make_model(dtype)
        opt = make_opt(name, model.parameters(), flat, backend, master_weights=master, **kwargs)
        train(model, opt, 4)
        runs[flat] = snapshot(model.parameters(), opt)
        if flat:
            assert len(flat_buckets(opt)) == 1
            assert_padding_zero(flat_buckets(opt)[0])
    assert_bitwise(runs[True], runs[False], f"{case}/{precision}")
    # The comparison is not vacuous: the params moved.
    start = [p.detach() for p in make_model(dtype).parameters()]
    assert all(not torch.equal(p, s) for p, s in zip(runs[True]["params"], start))


@settings(max_examples=examples(12), deadline=None)
@given(
    sizes=st.lists(st.integers(1, 150), min_size=1, max_size=6),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
    seed=st.integers(0, 2**16),
)
def test_random_odd_sizes_bitwise_aligned_and_zero_padded(sizes, dtype, seed):
    """Any list of sizes: each view starts at a multiple of ALIGN_ELEMENTS, the padding stays
    zero in every buffer after steps, and the trajectory is bitwise the per-tensor one. Grads
    after the first step are written in place (p.grad.copy_), as the contract asks."""
    g = torch.Generator().manual_seed(seed)
    start = [torch.randn(n, generator=g).to(DEVICE, dtype) for n in sizes]
    grads = [[torch.randn(n, generator=g).to(DEVICE, dtype) for n in sizes] for _ in range(3)]
    runs = {}
    for flat in (True, False):
        params = [s.clone().requires_grad_() for s in start]
        opt = make_opt("AdamW", params, flat, lr=1e-2, weight_decay=0.1)
        for step_grads in grads:
            for p, gr in zip(params, step_grads):
                if p.grad is None:
                    p.grad = gr.clone()
                else:
                    p.grad.copy_(gr)
            opt.step()
        runs[flat] = snapshot(params, opt)
        if flat:
            (fb,) = flat_buckets(opt)
            for i, p in enumerate(params):
                assert offset_in(p.detach(), fb.param) == fb.offsets[i]
                assert fb.offsets[i] % ALIGN_ELEMENTS == 0
            assert fb.numel % ALIGN_ELEMENTS == 0
            assert_padding_zero(fb)
    assert_bitwise(runs[True], runs[False])


# ------------------------------------------------------------------ 2. inside FP16Optimizer
def _fp16_run(backend, flat, clip):
    model = make_model(torch.float16)
    inner = make_opt("AdamW", model.parameters(), flat, backend, lr=1e-2, weight_decay=0.01)
    opt = FP16Optimizer(inner, loss_scaler=DynamicLossScaler(init_scale=2.0**10), clip_grad=clip)
    norms = []
    for step in range(6):
        opt.zero_grad()
        opt.backward(loss_of(model, step))
        if step == 2:  # written into the flat grad view with flat buffers: the step is skipped
            model[0].weight.grad.view(-1)[3] = float("inf")
        opt.step()
        assert opt.overflow is (step == 2)
        norms.append(opt.global_grad_norm)
    assert opt.skipped_steps == 1
    return model, opt, norms


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_optimizer_dynamic_scaling_bitwise_without_clipping(backend):
    """Loss scaling, one skipped step (inf grad), no clipping: bitwise equal to per-tensor."""
    (fm, fo, _), (rm, ro, _) = _fp16_run(backend, True, 0.0), _fp16_run(backend, False, 0.0)
    assert fo.loss_scale == ro.loss_scale
    assert_bitwise(snapshot(fm.parameters(), fo), snapshot(rm.parameters(), ro))
    assert all(fo.state[p]["step"].item() == 5 for p in fm.parameters())  # 6 steps, 1 skipped


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_optimizer_with_clipping_matches_per_tensor(backend):
    """clip_grad small enough to clip every step. The global norm of the flat run is one norm
    of the (zero-padded) flat buffer, the per-tensor run's is summed over per-tensor norms: the
    norms, hence the clip coefficients, may differ by an ulp or two (measured on the torch
    backend: 5e-8 relative; Triton: equal). Adam's m / sqrt(v) cancels a common factor on the
    grads (up to eps), so the updates differ far below an ulp of the masters and a master may
    round to a neighbouring fp32 value: measured at most 3e-8 absolute (one ulp of the masters'
    ~0.3 magnitude) after 5 applied steps. Allowed: 1e-7 absolute (about 3 ulps there) plus
    1e-6 relative; moments: rtol 1e-5 with an absolute floor of 1e-6 of the tensor's largest
    entry, as tests/test_fp16_optimizer.py (they scale with the clip coefficient)."""
    fm, fo, fnorms = _fp16_run(backend, True, 0.05)
    rm, ro, rnorms = _fp16_run(backend, False, 0.05)
    assert all(n > 0.05 for n in rnorms)  # clipping was active at every step
    for a, e in zip(fnorms, rnorms):
        if e != float("inf"):
            assert a == pytest.approx(e, rel=1e-6)
    assert fo.loss_scale == ro.loss_scale
    for p, q in zip(fm.parameters(), rm.parameters()):
        fs, rs = fo.state[p], ro.state[q]
        torch.testing.assert_close(fs["master_param"], rs["master_param"], rtol=1e-6, atol=1e-7)
        assert torch.equal(p.detach(), fs["master_param"].half())  # each run: param = master
        for name in ("exp_avg", "exp_avg_sq"):
            floor = 1e-6 * rs[name].abs().max().item()
            torch.testing.assert_close(fs[name], rs[name], rtol=1e-5, atol=floor)
        assert_bitwise(fs["step"], rs["step"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_grad_scaler_drives_a_flat_optimizer_bitwise(backend):
    """torch.amp.GradScaler (the fused grad_scale/found_inf contract), with an inf on the very
    first step (adoption happens on a skipped step) and later: bitwise like per-tensor."""
    runs = {}
    for flat in (True, False):
        model = make_model(torch.float16)
        opt = make_opt("AdamW", model.parameters(), flat, backend, lr=1e-2)
        scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0**10, growth_interval=3)
        for step in range(6):
            opt.zero_grad()
            scaler.scale(loss_of(model, step)).backward()
            if step in (0, 3):
                model[2].weight.grad.view(-1)[step] = float("inf")
            scaler.step(opt)
            scaler.update()
        runs[flat] = (snapshot(model.parameters(), opt), scaler.get_scale())
    assert runs[True][0]["state"][0]["step"].item() == 4  # 6 steps, 2 skipped
    assert_bitwise(runs[True], runs[False])


# ------------------------------------------------------------------------------- 3. views
@pytest.mark.parametrize("backend", BACKENDS)
def test_params_grads_and_state_are_views_into_flat_buffers(backend):
    """After the first step: data, grad and every state tensor of each param are views at the
    bucket's 64-aligned offsets; autograd accumulates into the same grad objects; all params
    share one step tensor; optimizer.zero_grad() zeroes in place (set_to_none or not)."""
    model = make_model(torch.float16)
    opt = make_opt("AdamW", model.parameters(), True, backend, lr=1e-2)
    params = list(model.parameters())
    before = [p.data_ptr() for p in params]
    train(model, opt, 1)
    (fb,) = flat_buckets(opt)
    assert fb.dtype == torch.float16 and fb.params == params
    assert set(fb.state) == {"exp_avg", "exp_avg_sq", "master_param"}
    for i, p in enumerate(params):
        assert p.data_ptr() != before[i]  # moved into the buffer
        assert offset_in(p.detach(), fb.param) == fb.offsets[i]
        assert offset_in(p.grad, fb.grad) == fb.offsets[i]
        assert fb.offsets[i] % ALIGN_ELEMENTS == 0
        for name in ("exp_avg", "exp_avg_sq", "master_param"):
            assert offset_in(opt.state[p][name], fb.state[name]) == fb.offsets[i]
        assert opt.state[p]["step"] is fb.step
    assert fb.step.item() == 1.0
    assert_padding_zero(fb)

    # autograd accumulates into the views: same objects, and the values of a plain backward
    grads = [p.grad for p in params]
    opt.zero_grad()  # default set_to_none=True: zeroed in place, not None
    for p, g in zip(params, grads):
        assert p.grad is g and not g.any()
    assert not fb.grad.any()
    loss_of(model, 1).backward()
    ref = make_model(torch.float16)
    with torch.no_grad():
        for r, p in zip(ref.parameters(), params):
            r.copy_(p)
    expected = torch.autograd.grad(loss_of(ref, 1), list(ref.parameters()))
    for p, g, e in zip(params, grads, expected):
        assert p.grad is g
        assert_bitwise(g, e)
    opt.step()
    assert fb.step.item() == 2.0 and all(opt.state[p]["step"] is fb.step for p in params)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is g for p, g in zip(params, grads)) and not fb.grad.any()
    # the O(1) path was kept: same buckets, nothing re-adopted
    assert flat_buckets(opt)[0] is fb


# ---------------------------------------------------------- 4. model.zero_grad() re-adoption
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_zero_grad_readopts_logs_once_and_stays_bitwise(backend, caplog):
    """model.zero_grad() sets the grads to None; backward then makes fresh tensors. The next
    step notices (sentinel check), re-adopts, logs one warning (then debug), and the
    trajectory is bitwise the per-tensor one; steps with optimizer.zero_grad() in between do
    not re-adopt."""
    model = make_model(torch.float16)
    opt = make_opt("AdamW", model.parameters(), True, backend, lr=1e-2, weight_decay=0.1)
    ref_model = make_model(torch.float16)
    ref = make_opt("AdamW", ref_model.parameters(), False, backend, lr=1e-2, weight_decay=0.1)
    schedule = ["opt", "model", "model", "opt", "model"]
    with caplog.at_level(logging.DEBUG, logger=OPT_LOGGER):
        for step, how in enumerate(schedule):
            (opt if how == "opt" else model).zero_grad()
            loss_of(model, step).backward()
            opt.step()
            ref.zero_grad()
            loss_of(ref_model, step).backward()
            ref.step()
            (fb,) = flat_buckets(opt)
            for i, p in enumerate(model.parameters()):  # views again after the step
                assert offset_in(p.grad, fb.grad) == fb.offsets[i]
                assert offset_in(p.detach(), fb.param) == fb.offsets[i]
    assert len(readopt_records(caplog, logging.WARNING)) == 1
    assert len(readopt_records(caplog, logging.DEBUG)) == schedule.count("model") - 1
    assert_bitwise(snapshot(model.parameters(), opt), snapshot(ref_model.parameters(), ref))


def _three_params():
    g = torch.Generator().manual_seed(7)
    return [torch.randn(n, generator=g).to(DEVICE).requires_grad_() for n in (7, 33, 5)]


def _partial_loss(params, step, unused):
    g = torch.Generator().manual_seed(step)
    return sum(
        (p * torch.randn(p.shape, generator=g).to(DEVICE)).sum() + p.square().sum()
        for i, p in enumerate(params)
        if i != unused
    )


@pytest.mark.parametrize("unused", [0, 1, 2])  # first (sentinel), middle, last (sentinel)
@pytest.mark.parametrize("backend", BACKENDS)
def test_unused_param_after_model_zero_grad_gets_zero_not_stale_grad(backend, unused):
    """Step 0: every param has a grad (it stays in the flat grad buffer). Then the model's
    grads are set to None and param ``unused`` takes no part in the backward: at the step its
    flat grad slice must be zero, not step 0's. Reference: per-tensor run with that grad set
    explicitly to zeros."""
    flat_p, ref_p = _three_params(), _three_params()
    opt = make_opt("AdamW", flat_p, True, backend, lr=1e-2, weight_decay=0.1)
    ref = make_opt("AdamW", ref_p, False, backend, lr=1e-2, weight_decay=0.1)
    for step in range(3):
        for params, o in ((flat_p, opt), (ref_p, ref)):
            for p in params:  # what model.zero_grad() does
                p.grad = None
            _partial_loss(params, step, None if step == 0 else unused).backward()
            if o is ref and step > 0:
                params[unused].grad = torch.zeros_like(params[unused])
            o.step()
        if step > 0:  # the view, zero-filled at re-adoption
            assert not flat_p[unused].grad.any()
    assert_bitwise(snapshot(flat_p, opt), snapshot(ref_p, ref))


@pytest.mark.parametrize("layer", [0, 2])  # holds the first / the last param of the bucket
def test_submodule_zero_grad_is_noticed_by_either_sentinel(layer, caplog):
    """optimizer.zero_grad() (in place), then ``model[layer].zero_grad()`` (that layer's grads
    set to None: the first or the last param of the bucket), backward: the other layer's grads
    accumulate into the views, the layer's own are fresh tensors. The step notices through the
    first or the last sentinel, re-adopts, and stays bitwise like per-tensor."""
    model = make_model(torch.float16)
    opt = make_opt("AdamW", model.parameters(), True, lr=1e-2, weight_decay=0.1)
    ref_model = make_model(torch.float16)
    ref = make_opt("AdamW", ref_model.parameters(), False, lr=1e-2, weight_decay=0.1)
    with caplog.at_level(logging.WARNING, logger=OPT_LOGGER):
        for step in range(3):
            opt.zero_grad()
            if step > 0:
                model[layer].zero_grad()
            loss_of(model, step).backward()
            opt.step()
            ref.zero_grad()
            loss_of(ref_model, step).backward()
            ref.step()
    assert len(readopt_records(caplog)) == 1
    assert_bitwise(snapshot(model.parameters(), opt), snapshot(ref_model.parameters(), ref))


def _deep_model(dtype=torch.float16):
    torch.manual_seed(0)
    layers = [nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(HIDDEN, OUT)).to(DEVICE, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_middle_submodule_zero_grad_is_noticed_at_every_step(backend, caplog):
    """``model[2].zero_grad()`` (a middle layer: neither its weight nor its bias is the first or
    last param of the bucket) before every backward: autograd writes fresh grads for it instead
    of accumulating into the views, so the grad buffer takes fewer in-place writes than in the
    steady cycle; the step checks every param and re-adopts the layer at every step. Without
    that check the layer would silently never train (found in review)."""
    model, ref_model = _deep_model(), _deep_model()
    opt = make_opt("AdamW", model.parameters(), True, backend, lr=1e-2, weight_decay=0.1)
    ref = make_opt("AdamW", ref_model.parameters(), False, backend, lr=1e-2, weight_decay=0.1)
    with caplog.at_level(logging.WARNING, logger=OPT_LOGGER):
        for step in range(5):
            for m, o in ((model, opt), (ref_model, ref)):
                o.zero_grad()
                if step >= 2:  # after the steady cycle has been learned
                    m[2].zero_grad()
                loss_of(m, step).backward()
                o.step()
    assert len(readopt_records(caplog)) == 1  # logged once, then at debug level
    assert_bitwise(snapshot(model.parameters(), opt), snapshot(ref_model.parameters(), ref))


class _SkippableMLP(nn.Module):
    """Four linear layers whose use per step is set from outside (LayerDrop-like): an unused
    layer gets no grad, which flat buffers step as a zero grad."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        dims = [IN, HIDDEN, HIDDEN, HIDDEN, OUT]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))
        self.use = [True] * 4
        self.to(DEVICE, dtype)

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            if self.use[i] or i in (0, 3):  # the first and last always run (shapes)
                x = torch.tanh(layer(x)) if i < 3 else layer(x)
        return x


def _run_skippable(flat, backend, scenario, steps=7):
    model = _SkippableMLP()
    opt = make_opt("AdamW", model.parameters(), flat, backend, lr=1e-2, weight_decay=0.1)
    for step in range(steps):
        opt.zero_grad()
        scenario(model, step)
        loss_of(model, step).backward()
        if not flat:  # per-tensor gets the zeros that flat buffers step a grad-less param with
            for p in model.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        opt.step()
    return model, opt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["skip-then-zero-grad", "data-replaced"])
def test_replacements_that_keep_the_write_count_are_noticed(backend, case):
    """Found in review of an earlier check that counted in-place writes into the grad buffer:
    a layer skipped at one step (fewer writes, learned as steady) and a middle submodule's
    grads set to None at a later step (fewer writes again) went unnoticed for good; so did
    ``w.data = w.data.clone()`` on a middle param before a backward. Both drop a reference to
    a buffer's storage, which the check now counts."""

    def scenario(model, step):
        if case == "skip-then-zero-grad":
            model.use = [True, step != 2, True, True]
            if step == 3:
                model.layers[2].zero_grad()
        elif step == 3:
            w = model.layers[1].weight
            w.data = w.data.clone()

    flat_model, flat_opt = _run_skippable(True, backend, scenario)
    ref_model, ref_opt = _run_skippable(False, backend, scenario)
    assert_bitwise(
        snapshot(flat_model.parameters(), flat_opt), snapshot(ref_model.parameters(), ref_opt)
    )


class _Counts:
    """Calls of the O(n) paths of flat buffers: full checks and (re)adoptions."""

    def __init__(self, monkeypatch):
        from fp16_triton.flat_buffers import FlatBuffers
        from fp16_triton.optimizer import FusedOptimizer

        self.full_checks = self.adoptions = 0
        all_in_place, adopt_group = FlatBuffers.all_in_place, FusedOptimizer._adopt_group

        def counted_check(flat):
            self.full_checks += 1
            return all_in_place(flat)

        def counted_adopt(opt, *args):
            self.adoptions += 1
            return adopt_group(opt, *args)

        monkeypatch.setattr(FlatBuffers, "all_in_place", counted_check)
        monkeypatch.setattr(FusedOptimizer, "_adopt_group", counted_adopt)


@pytest.mark.parametrize(
    ("name", "kwargs", "dtype"),
    [
        ("AdamW", {"lr": 1e-2}, torch.float16),
        # No state at all (no momentum, fp32: no master): re-creating empty state used to bump
        # optimizer.state's version and re-adopt every group at every step (found in review).
        ("SGD", {"lr": 1e-2}, torch.float32),
    ],
)
def test_steady_steps_take_no_o_n_path(monkeypatch, name, kwargs, dtype):
    """Two param groups, plain loop: one adoption per group at the first step, one full check
    per bucket by the zero_grad after it and one at the second step (the storages' reference
    counts are learned at a verified step), then nothing O(n)."""
    counts = _Counts(monkeypatch)
    model = _deep_model(dtype)
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[2:].parameters())}]
    opt = make_opt(name, groups, True, **kwargs)
    train(model, opt, 2)
    assert counts.adoptions == 2 and counts.full_checks <= 4
    settled = counts.full_checks
    train(model, opt, 4, start=2)
    assert (counts.adoptions, counts.full_checks) == (2, settled)


@pytest.mark.parametrize("case", ["layer-drop", "varying-accumulation", "clip-sometimes"])
def test_loops_that_vary_legitimately_settle(monkeypatch, case):
    """Unused layers, a varying number of micro-batches and occasional clipping change how
    many writes the grads take per step (one of the O(1) signals), not which tensors hold them:
    each new count costs one full check, then the loop's few counts are known and steps stay
    O(1) (the patterns here repeat within 12 steps)."""
    counts = _Counts(monkeypatch)
    model = _SkippableMLP()
    opt = make_opt("AdamW", model.parameters(), True, lr=1e-2)
    for step in range(24):
        if step == 12:
            settled = counts.full_checks
        opt.zero_grad()
        if case == "layer-drop":
            model.use = [True, step % 3 != 1, step % 4 != 2, True]
        for micro in range(1 + (step % 2 if case == "varying-accumulation" else 0)):
            loss_of(model, 10 * step + micro).backward()
        if case == "clip-sometimes" and step % 3 == 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
    assert counts.adoptions == 1 and counts.full_checks <= 5
    assert counts.full_checks == settled  # none in the last 12 steps


def test_grad_replaced_while_a_list_still_holds_it_is_noticed():
    """Found in review: a list kept for logging holds every ``p.grad``, so
    ``model.layers[1].zero_grad()`` frees no reference; autograd's fresh grad for that layer
    means fewer writes into the buffer, which the step notices."""
    kept = []

    def scenario(model, step):
        if step == 1:
            kept.extend(p.grad for p in model.parameters() if p.grad is not None)
        if step == 3:
            model.layers[1].zero_grad()

    flat_model, flat_opt = _run_skippable(True, "torch", scenario)
    kept.clear()
    ref_model, ref_opt = _run_skippable(False, "torch", scenario)
    assert_bitwise(
        snapshot(flat_model.parameters(), flat_opt), snapshot(ref_model.parameters(), ref_opt)
    )


def test_steady_engine_steps_with_accumulation_take_no_o_n_path(monkeypatch):
    """The engine (FP16Optimizer, clipping, dynamic scaling, 2 micro-batches per step): after
    the first two optimizer steps, no full check and no re-adoption (the two full checks: the
    engine's zero_grad after the adopting step, and the step that learns the steady cycle)."""
    counts = _Counts(monkeypatch)
    model = _deep_model(torch.float32)
    config = {
        "fp16": {"enabled": True, "initial_scale_power": 8},
        "gradient_clipping": 1.0,
        "gradient_accumulation_steps": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "flat_buffers": True}},
    }
    engine, *_ = fp16_triton.initialize(model=model, config=config, backend="torch")
    for micro in range(12):
        loss = loss_of(engine.module, micro)
        engine.backward(loss)
        engine.step()
        if micro == 3:
            assert (counts.adoptions, counts.full_checks) == (1, 2)
    assert (counts.adoptions, counts.full_checks) == (1, 2)


@pytest.mark.parametrize(
    ("src", "dst"), [(torch.float32, torch.float16), (torch.float16, torch.bfloat16)]
)
def test_model_cast_after_adoption_rebuilds_the_bucket(src, dst):
    """model.to(dtype) after adoption replaces every param's data (and grad): the next step
    builds a bucket of the new dtype, and the run stays bitwise like per-tensor."""
    runs = {}
    for flat in (True, False):
        model = make_model(src)
        opt = make_opt("AdamW", model.parameters(), flat, lr=1e-2, weight_decay=0.1)
        train(model, opt, 2)
        model.to(dst)
        train(model, opt, 2, start=2)
        runs[flat] = snapshot(model.parameters(), opt)
        if flat:
            (fb,) = flat_buckets(opt)
            assert fb.dtype == dst
            for p, offset in zip(model.parameters(), fb.offsets):
                assert offset_in(p.detach(), fb.param) == offset
    assert_bitwise(runs[True], runs[False])


# -------------------------------------------------------------- 5. unused and frozen params
@pytest.mark.parametrize("backend", BACKENDS)
def test_param_without_grad_is_stepped_with_zero_grad_and_frozen_is_untouched(backend):
    """A param that requires grad but never gets one is stepped with a zero grad (AdamW: it
    only decays, p *= 1 - lr * wd); a requires_grad=False param is never adopted, changed or
    given state."""
    lr, wd, steps = 1e-2, 0.1, 3
    frozen = torch.randn(9, device=DEVICE)  # requires_grad=False
    frozen_copy, frozen_ptr = frozen.clone(), frozen.data_ptr()
    flat_p, ref_p = _three_params(), _three_params()
    opt = make_opt("AdamW", [*flat_p, frozen], True, backend, lr=lr, weight_decay=wd)
    ref = make_opt("AdamW", ref_p, False, backend, lr=lr, weight_decay=wd)
    start = flat_p[1].detach().clone()
    for step in range(steps):
        opt.zero_grad()
        _partial_loss(flat_p, step, unused=1).backward()
        assert flat_p[1].grad is None or not flat_p[1].grad.any()
        opt.step()
        ref.zero_grad()
        _partial_loss(ref_p, step, unused=1).backward()
        ref_p[1].grad = torch.zeros_like(ref_p[1])
        ref.step()
    assert_bitwise(snapshot(flat_p, opt), snapshot(ref_p, ref))
    # Pure decay, computed separately: 1 - lr * wd applied `steps` times, one fp32 rounding
    # per step, so 3 ulps of relative error at most (rtol 1e-6 is ~8 ulps).
    torch.testing.assert_close(
        flat_p[1].detach(), start * (1 - lr * wd) ** steps, rtol=1e-6, atol=0
    )
    assert opt.state[flat_p[1]]["step"].item() == steps
    assert frozen not in opt.state
    assert frozen.data_ptr() == frozen_ptr and frozen.grad is None
    assert_bitwise(frozen, frozen_copy)
    assert all(frozen is not p for fb in flat_buckets(opt) for p in fb.params)
    # zero_grad gives params it did not adopt torch's treatment
    frozen.grad = torch.ones_like(frozen)
    opt.zero_grad(set_to_none=False)
    assert frozen.grad is not None and not frozen.grad.any()
    opt.zero_grad()
    assert frozen.grad is None
    assert flat_p[0].grad is not None  # while the adopted grads stay (zeroed) views


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_replaced_from_outside_is_readopted(backend):
    """``optimizer.state[p] = {...}`` (what ZeroRedundancyOptimizer.load_state_dict does) for
    a param in the middle of the bucket: the next step moves the new tensors into the flat
    buffers and uses them, bitwise like the per-tensor optimizer given the same state."""
    runs = {}
    for flat in (True, False):
        model = make_model(torch.float16)
        opt = make_opt("AdamW", model.parameters(), flat, backend, lr=1e-2, weight_decay=0.1)
        train(model, opt, 2)
        p = model[0].bias
        opt.state[p] = {
            "step": torch.tensor(2.0),
            "exp_avg": torch.full(p.shape, 0.5, device=DEVICE),
            "exp_avg_sq": torch.full(p.shape, 0.25, device=DEVICE),
            "master_param": p.detach().float() + 1.0,
        }
        train(model, opt, 2, start=2)
        runs[flat] = snapshot(model.parameters(), opt)
        if flat:
            (fb,) = flat_buckets(opt)
            assert offset_in(opt.state[p]["exp_avg"], fb.state["exp_avg"]) == fb.offsets[1]
            assert opt.state[p]["step"] is fb.step
    assert_bitwise(runs[True], runs[False])


def test_param_unfrozen_after_adoption_is_refused_and_its_own_group_works():
    """Progressive unfreezing: layer 0 frozen for the first steps, then unfrozen. The params of
    a flat buffer share one step count, so a left-out param cannot join: the step refuses with
    an error that says what to do, before anything changes (never a silently untrained param).
    The advice works: the unfrozen layer in a param group of its own trains, bitwise like a
    per-tensor optimizer doing the same."""
    model = make_model(torch.float32)
    model[0].requires_grad_(False)
    opt = make_opt("AdamW", model.parameters(), True, lr=1e-2, weight_decay=0.1)
    train(model, opt, 2)
    model[0].requires_grad_(True)
    opt.zero_grad()
    loss_of(model, 2).backward()
    before = snapshot(model.parameters(), opt)
    with pytest.raises(ValueError, match="a group of their own when you unfreeze them"):
        opt.step()
    assert_bitwise(snapshot(model.parameters(), opt), before)

    def staged(flat):
        model = make_model(torch.float32)
        model[0].requires_grad_(False)
        opt = make_opt("AdamW", list(model[2].parameters()), flat, lr=1e-2, weight_decay=0.1)
        train(model, opt, 2)
        model[0].requires_grad_(True)
        opt.add_param_group({"params": list(model[0].parameters())})
        train(model, opt, 2, start=2)
        return model, opt

    flat_model, flat_opt = staged(True)
    ref_model, ref_opt = staged(False)
    assert flat_opt.state[flat_model[0].weight]["step"].item() == 2
    assert_bitwise(
        snapshot(flat_model.parameters(), flat_opt), snapshot(ref_model.parameters(), ref_opt)
    )


def test_param_frozen_after_adoption_is_stepped_like_one_without_grad():
    """Which params require grad is read at adoption (reading it for every param at every step
    would cost what flat buffers save): a param frozen later keeps its place and is stepped with
    a zero grad, as a param that gets no grad is (flat_buffers.py, documented). Checked bitwise
    against a per-tensor optimizer fed explicit zero grads for that layer."""

    def run(flat):
        model = make_model(torch.float32)
        opt = make_opt("AdamW", model.parameters(), flat, lr=1e-2, weight_decay=0.1)
        train(model, opt, 2)
        model[0].requires_grad_(False)
        for step in (2, 3):
            opt.zero_grad()
            loss_of(model, step).backward()
            if not flat:
                for p in model[0].parameters():
                    p.grad = torch.zeros_like(p)
            opt.step()
        return model, opt

    flat_model, flat_opt = run(True)
    ref_model, ref_opt = run(False)
    assert_bitwise(
        snapshot(flat_model.parameters(), flat_opt), snapshot(ref_model.parameters(), ref_opt)
    )


# ------------------------------------------------------------- 6. step before any backward
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_before_any_grad_changes_nothing(backend):
    """step() (and zero_grad()) before any backward: no state, no adoption, params unchanged;
    the run then proceeds bitwise like a per-tensor one."""
    model = make_model(torch.float16)
    opt = make_opt("AdamW", model.parameters(), True, backend, lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    ptrs = [p.data_ptr() for p in model.parameters()]
    opt.zero_grad()
    opt.step()
    opt.step()
    assert len(opt.state) == 0
    assert all(p.grad is None for p in model.parameters())
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert_bitwise([p.detach() for p in model.parameters()], before)
    fp16 = FP16Optimizer(opt)
    fp16.step()  # the wrapper too
    assert len(opt.state) == 0 and [p.data_ptr() for p in model.parameters()] == ptrs
    train(model, opt, 2)
    ref_model = make_model(torch.float16)
    ref = make_opt("AdamW", ref_model.parameters(), False, backend, lr=1e-2)
    train(ref_model, ref, 2)
    assert_bitwise(snapshot(model.parameters(), opt), snapshot(ref_model.parameters(), ref))


# ----------------------------------------------------------------------------- 7. state dicts
def _copy_weights(dst, src):
    with torch.no_grad():
        for d, s in zip(dst.parameters(), src.parameters()):
            d.copy_(s)  # in place: a flat model keeps its views


@pytest.mark.parametrize("backend", BACKENDS)
def test_flat_state_dict_continues_in_a_per_tensor_optimizer(backend):
    """A flat optimizer's state_dict (shared step expanded per param) loads into a per-tensor
    fp16_triton optimizer, and the two runs continue bitwise alike."""
    model = make_model(torch.float16)
    opt = make_opt("AdamW", model.parameters(), True, backend, lr=1e-2, weight_decay=0.1)
    train(model, opt, 3)
    sd = copy.deepcopy(opt.state_dict())
    assert all(
        s["step"].item() == 3 and s["step"].device.type == "cpu" for s in sd["state"].values()
    )
    assert len({id(s["step"]) for s in opt.state_dict()["state"].values()}) == 4  # not shared
    other = make_model(torch.float16, seed=1)
    _copy_weights(other, model)
    ref = make_opt("AdamW", other.parameters(), False, backend, lr=1e-2, weight_decay=0.1)
    ref.load_state_dict(sd)
    train(model, opt, 3, start=3)
    train(other, ref, 3, start=3)
    assert_bitwise(snapshot(model.parameters(), opt), snapshot(other.parameters(), ref))


def test_flat_state_dict_continues_in_torch_adamw():
    """fp32 model: a flat state dict continued by torch.optim.AdamW stays within torch's
    default fp32 tolerance of the flat run (see RTOL32: the two implementations differ by a
    few ulps per step, as tests/test_optimizers.py measures)."""
    model = make_model(torch.float32)
    opt = make_opt("AdamW", model.parameters(), True, lr=1e-2, weight_decay=0.1)
    train(model, opt, 3)
    sd = copy.deepcopy(opt.state_dict())  # deep: torch.optim keeps loaded tensors as they are
    other = make_model(torch.float32, seed=1)
    _copy_weights(other, model)
    ref = torch.optim.AdamW(other.parameters(), lr=1e-2, weight_decay=0.1)
    ref.load_state_dict(sd)
    assert ref.state[next(other.parameters())]["step"].item() == 3
    train(model, opt, 3, start=3)
    train(other, ref, 3, start=3)
    for p, q in zip(model.parameters(), other.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=RTOL32, atol=ATOL32)
        for name in ("exp_avg", "exp_avg_sq"):
            ours, theirs = opt.state[p][name], ref.state[q][name]
            torch.testing.assert_close(ours, theirs, rtol=RTOL32, atol=ATOL32)
        assert opt.state[p]["step"].item() == ref.state[q]["step"].item() == 6


@pytest.mark.parametrize("adopted", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_tensor_state_dict_loads_into_flat_optimizer(backend, adopted):
    """A per-tensor state dict loads into a flat optimizer (fresh, or one that has already
    adopted its params and stepped), which re-adopts the loaded state at its next step and
    continues bitwise like the per-tensor run."""
    model = make_model(torch.float16)
    ref = make_opt("Adam", model.parameters(), False, backend, lr=1e-2, amsgrad=True)
    train(model, ref, 3)
    flat_model = make_model(torch.float16, seed=1)
    opt = make_opt("Adam", flat_model.parameters(), True, backend, lr=1e-2, amsgrad=True)
    if adopted:
        train(flat_model, opt, 1, start=50)  # other data: state that the load must replace
        old = flat_buckets(opt)[0]
    _copy_weights(flat_model, model)
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))
    train(model, ref, 3, start=3)
    train(flat_model, opt, 3, start=3)
    assert_bitwise(snapshot(flat_model.parameters(), opt), snapshot(model.parameters(), ref))
    (fb,) = flat_buckets(opt)
    if adopted:
        assert fb is not old
    for i, p in enumerate(flat_model.parameters()):
        assert opt.state[p]["step"] is fb.step
        max_view = opt.state[p]["max_exp_avg_sq"]
        assert offset_in(max_view, fb.state["max_exp_avg_sq"]) == fb.offsets[i]


def _steps_differ_state_dict(backend, how):
    """A per-tensor AdamW state dict whose params have different step counts."""
    model = make_model(torch.float16)
    ref = make_opt("AdamW", model.parameters(), False, backend, lr=1e-2)
    train(model, ref, 2)
    if how == "no-grad":  # the natural way: a per-tensor run in which a param had no grad
        ref.zero_grad()
        loss_of(model, 2).backward()
        model[2].bias.grad = None
        ref.step()
        sd = copy.deepcopy(ref.state_dict())
        assert sd["state"][3]["step"].item() == 2 and sd["state"][0]["step"].item() == 3
    else:  # edited
        sd = copy.deepcopy(ref.state_dict())
        sd["state"][1]["step"] = torch.tensor(7.0)
    return model, sd


@pytest.mark.parametrize("how", ["no-grad", "edited"])
@pytest.mark.parametrize("adopted", [False, True])
def test_state_with_different_step_counts_raises_before_anything_moves(adopted, how):
    """One flat bucket has one step count: loading state whose counts differ (or that lacks
    a param's state while others have stepped) raises ValueError (pointing to
    flat_buffers=False) at load, not at every later step, and the params, their storage,
    grads and the optimizer's state are left as they were."""
    backend = "torch"
    model, sd = _steps_differ_state_dict(backend, how)
    flat_model = make_model(torch.float16, seed=1)
    opt = make_opt("AdamW", flat_model.parameters(), True, backend, lr=1e-2)
    if adopted:
        train(flat_model, opt, 1)
    _copy_weights(flat_model, model)
    opt.zero_grad()
    loss_of(flat_model, 5).backward()
    params = list(flat_model.parameters())
    before = snapshot(params, opt)
    grads = [(p.grad, p.grad.clone()) for p in params]
    ptrs = [p.data_ptr() for p in params]
    missing = copy.deepcopy(sd)
    del missing["state"][3]
    for bad in (sd, missing):
        with pytest.raises(ValueError, match="flat_buffers=False"):
            opt.load_state_dict(bad)
        assert [p.data_ptr() for p in params] == ptrs
        assert_bitwise(snapshot(params, opt), before)
        for p, (g, saved) in zip(params, grads):
            assert p.grad is g
            assert_bitwise(g, saved)


# ------------------------------------------------------------------- 8. O(1) host work
def _count_host_reads(monkeypatch, n_params, flat, backend, wrapper=None):
    """Python-level reads of Tensor.grad and calls of Tensor.data_ptr during one steady
    ``opt.step()`` and one ``opt.zero_grad()`` of ``n_params`` params (all with grads);
    ``wrapper="fp16"``: through FP16Optimizer with dynamic loss scaling and clipping."""
    g = torch.Generator().manual_seed(n_params)
    params = [
        torch.randn(3 + i % 5, generator=g).to(DEVICE).requires_grad_() for i in range(n_params)
    ]
    opt = make_opt("AdamW", params, flat, backend, lr=1e-2)
    if wrapper == "fp16":
        opt = FP16Optimizer(opt, loss_scaler=DynamicLossScaler(init_scale=4.0), clip_grad=1.0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(DEVICE)
    opt.step()
    opt.step()  # steady from here on
    counts = {"grad": 0, "data_ptr": 0, "triton_data_ptr": 0}
    base_grad = torch._C.TensorBase.grad  # the C getset descriptor torch.Tensor inherits
    base_data_ptr = torch._C.TensorBase.data_ptr

    def get_grad(self):
        counts["grad"] += 1
        return base_grad.__get__(self, type(self))

    def set_grad(self, value):
        base_grad.__set__(self, value)

    def del_grad(self):
        base_grad.__delete__(self)

    def data_ptr(self):
        # Triton's launcher reads each kernel argument's address: counted apart, it is Triton's
        # per-launch cost, not a per-param read of ours. Ours are the calls from this package
        # and this test; the rest come from Triton (its interpreter's modules, or, on a GPU,
        # its argument binder, generated code whose globals name no module).
        caller = sys._getframe(1).f_globals.get("__name__", "")
        ours = caller.split(".")[0] == "fp16_triton" or caller == __name__
        counts["data_ptr" if ours else "triton_data_ptr"] += 1
        return base_data_ptr(self)

    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "grad", property(get_grad, set_grad, del_grad))
        m.setattr(torch.Tensor, "data_ptr", data_ptr)
        # the counters see what Python code reads (self-check of the instrumentation)
        params[0].grad  # noqa: B018
        params[0].data_ptr()
        assert counts == {"grad": 1, "data_ptr": 1, "triton_data_ptr": 0}
        counts.update(grad=0, data_ptr=0)
        opt.step()
        step_counts = dict(counts)
        counts.update(grad=0, data_ptr=0, triton_data_ptr=0)
        opt.zero_grad()
        zero_counts = dict(counts)
    assert params[0].grad is not None or not flat  # the patch is undone: reads work again
    return step_counts, zero_counts


@pytest.mark.parametrize("wrapper", [None, "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_steady_step_host_work_is_independent_of_the_number_of_params(
    backend, wrapper, monkeypatch
):
    """A steady flat step reads p.grad and calls data_ptr() a constant, small number of times,
    the same for 8 and 64 params (measured: 2 grad reads and 8 data_ptr calls, the bucket's two
    sentinels: data, grad and AdamW's two state views of each; Triton's launcher reads its
    kernel arguments' addresses, 15 or 20 under the interpreter: counted apart, also constant).
    Likewise through FP16Optimizer (check pass, clipping) and for zero_grad() (the sentinel
    check: 2 and 8). The per-tensor optimizer reads
    every grad, which shows the counters would see O(n) work."""
    (small, small_zero) = _count_host_reads(monkeypatch, 8, True, backend, wrapper)
    (large, large_zero) = _count_host_reads(monkeypatch, 64, True, backend, wrapper)
    assert small == large and small_zero == large_zero
    assert small["grad"] <= 4 and small["data_ptr"] <= 12 and small["triton_data_ptr"] <= 64
    assert small_zero["grad"] <= 4 and small_zero["data_ptr"] <= 8
    (per_tensor, per_tensor_zero) = _count_host_reads(monkeypatch, 64, False, backend, wrapper)
    assert per_tensor["grad"] >= 64 and per_tensor_zero["grad"] >= 64


# ---------------------------------------------------- 9. dtypes, groups, add_param_group
def _mixed_params(seed=3):
    g = torch.Generator().manual_seed(seed)
    sizes = [(7, 3), (33,), (5,), (2, 9)]
    dtypes = [torch.float16, torch.float32, torch.float16, torch.float32]
    return [
        torch.randn(s, generator=g).to(DEVICE, d).requires_grad_() for s, d in zip(sizes, dtypes)
    ]


def _set_grads(params, step):
    g = torch.Generator().manual_seed(500 + step)
    for p in params:
        grad = torch.randn(p.shape, generator=g).to(DEVICE, p.dtype)
        if p.grad is None:
            p.grad = grad
        else:
            p.grad.copy_(grad)  # in place: the flat contract


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_groups_and_add_param_group(backend):
    """fp16 and fp32 params in one group make two flat buckets; a second group with its own lr
    gets its own buckets; a group added after adoption is adopted at the next step. All
    bitwise like the per-tensor optimizer doing the same."""
    runs = {}
    for flat in (True, False):
        params = _mixed_params()
        extra = [
            torch.randn(11, generator=torch.Generator().manual_seed(9))
            .to(DEVICE, torch.bfloat16)
            .requires_grad_()
        ]
        groups = [{"params": params[:3]}, {"params": params[3:], "lr": 3e-2}]
        opt = make_opt("AdamW", groups, flat, backend, lr=1e-2, weight_decay=0.1)
        for step in range(2):
            _set_grads(params, step)
            opt.step()
        if flat:
            buckets = flat_buckets(opt, 0)
            assert sorted(str(b.dtype) for b in buckets) == ["torch.float16", "torch.float32"]
            for bucket in buckets:
                assert all(p.dtype == bucket.dtype for p in bucket.params)
            assert len(flat_buckets(opt, 1)) == 1
        opt.add_param_group({"params": extra, "lr": 2e-2})
        for step in range(2, 4):
            _set_grads(params + extra, step)
            opt.step()
        if flat:
            (fb,) = flat_buckets(opt, 2)
            assert fb.dtype == torch.bfloat16 and offset_in(extra[0].detach(), fb.param) == 0
            assert opt.state[extra[0]]["step"].item() == 2
        runs[flat] = snapshot(params + extra, opt)
    assert_bitwise(runs[True], runs[False])


# ------------------------------------------------------ 10. switching amsgrad / momentum on
@pytest.mark.parametrize("backend", BACKENDS)
def test_amsgrad_switched_on_after_flat_steps(backend):
    """group["amsgrad"] = True after 2 steps: the max starts at exp_avg_sq, as per-tensor."""
    runs = {}
    for flat in (True, False):
        model = make_model(torch.float16)
        opt = make_opt("Adam", model.parameters(), flat, backend, lr=1e-2)
        train(model, opt, 2)
        opt.param_groups[0]["amsgrad"] = True
        train(model, opt, 3, start=2)
        runs[flat] = snapshot(model.parameters(), opt)
        if flat:
            (fb,) = flat_buckets(opt)
            for i, p in enumerate(model.parameters()):
                max_view = opt.state[p]["max_exp_avg_sq"]
                assert offset_in(max_view, fb.state["max_exp_avg_sq"]) == fb.offsets[i]
            assert_padding_zero(fb)
    assert "max_exp_avg_sq" in runs[True]["state"][0]
    assert_bitwise(runs[True], runs[False])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_momentum_switched_on_after_first_flat_step(backend):
    """SGD without momentum for one step, then momentum=0.9: the buffers start at the next
    step (as the first grad), bitwise as per-tensor."""
    runs = {}
    for flat in (True, False):
        model = make_model(torch.bfloat16)
        opt = make_opt("SGD", model.parameters(), flat, backend, lr=5e-2)
        train(model, opt, 1)
        opt.param_groups[0]["momentum"] = 0.9
        train(model, opt, 3, start=1)
        runs[flat] = snapshot(model.parameters(), opt)
        if flat:
            (fb,) = flat_buckets(opt)
            assert fb.step is not None and fb.step.item() == 3
            for p in model.parameters():
                assert opt.state[p]["step"] is fb.step
    assert_bitwise(runs[True], runs[False])


# ------------------------------------------------------------------------------ 11. engine
def _make_engine(flat, accumulation=1):
    config = {
        "fp16": {"enabled": True, "initial_scale_power": 10},
        "gradient_accumulation_steps": accumulation,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "flat_buffers": flat}},
    }
    model = make_model(torch.float32)
    engine, optimizer, _, _ = fp16_triton.initialize(model=model, config=config, backend="torch")
    return engine, optimizer


def _engine_train(engine, steps, start=0):
    for step in range(start, start + steps):
        for micro in range(engine.gradient_accumulation_steps()):
            engine.backward(loss_of(engine, 10 * step + micro))  # forward through the engine
            engine.step()


def _engine_run(flat, steps=4, accumulation=1):
    engine, optimizer = _make_engine(flat, accumulation)
    _engine_train(engine, steps)
    return engine, optimizer


def test_engine_config_flat_buffers_trains_bitwise_like_per_tensor():
    """optimizer.params.flat_buffers reaches the inner optimizer, which adopts the params, and
    the engine (fp16, dynamic scaling, zero_grad at each boundary) trains bitwise like
    flat_buffers=False."""
    engine, optimizer = _engine_run(True)
    ref_engine, ref_optimizer = _engine_run(False)
    assert optimizer.optimizer.flat_buffers is True
    assert ref_optimizer.optimizer.flat_buffers is False
    assert engine.config.optimizer.flat_buffers is True
    assert "flat_buffers" not in engine.config.optimizer.params  # lifted out of the kwargs
    (fb,) = flat_buckets(optimizer.optimizer)
    for i, p in enumerate(engine.module.parameters()):
        assert offset_in(p.detach(), fb.param) == fb.offsets[i]
        assert p.grad is not None and not p.grad.any()  # zeroed in place at the boundary
    assert optimizer.skipped_steps == ref_optimizer.skipped_steps
    assert_bitwise(
        snapshot(engine.module.parameters(), optimizer),
        snapshot(ref_engine.module.parameters(), ref_optimizer),
    )
    assert_bitwise(optimizer.state_dict(), ref_optimizer.state_dict())


def test_engine_accumulation_and_checkpoint_resume_with_flat_buffers(tmp_path):
    """Two micro-batches per step (grads accumulate in the views) match per-tensor bitwise; a
    checkpoint of the flat engine resumes bitwise in a flat engine and in a per-tensor one."""
    engine, optimizer = _make_engine(True, accumulation=2)
    ref_engine, ref_optimizer = _make_engine(False, accumulation=2)
    _engine_train(engine, 2)
    _engine_train(ref_engine, 2)
    assert_bitwise(optimizer.state_dict(), ref_optimizer.state_dict())
    engine.save_checkpoint(tmp_path)
    _engine_train(engine, 2, start=2)
    for flat in (True, False):
        resumed, resumed_optimizer = _make_engine(flat, accumulation=2)
        resumed.load_checkpoint(tmp_path)
        _engine_train(resumed, 2, start=2)
        assert_bitwise(
            snapshot(resumed.module.parameters(), resumed_optimizer),
            snapshot(engine.module.parameters(), optimizer),
            f"resumed flat={flat}",
        )
        assert resumed.global_steps == engine.global_steps == 4


@pytest.mark.parametrize("kind", ["AdamW", "SGD"])
def test_config_rejects_non_bool_flat_buffers(kind):
    """optimizer.params.flat_buffers must be a bool (the error names the key); true is lifted
    out of the torch kwargs into OptimizerConfig.flat_buffers; the default is false."""
    with pytest.raises(ConfigError, match="optimizer.params.flat_buffers"):
        load_config({"optimizer": {"type": kind, "params": {"flat_buffers": "yes"}}})
    cfg = load_config({"optimizer": {"type": kind, "params": {"flat_buffers": True}}})
    assert cfg.optimizer.flat_buffers is True and "flat_buffers" not in cfg.optimizer.params
    assert load_config({"optimizer": {"type": kind}}).optimizer.flat_buffers is False


def test_dtensor_params_are_refused_with_flat_buffers():
    """DTensor (FSDP2) params cannot be adopted: the constructor and add_param_group raise
    ValueError (pointing to flat_buffers=False) and add nothing; flat_buffers=False takes them.
    A one-rank gloo group in this process, torn down afterwards."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard, distribute_tensor

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = DeviceMesh("cpu", [0])
        p = nn.Parameter(distribute_tensor(torch.randn(8, 3), mesh, [Shard(0)]))
        with pytest.raises(ValueError, match="flat_buffers=False"):
            fp16_triton.AdamW([p], flat_buffers=True, backend="torch")
        opt = fp16_triton.AdamW([nn.Parameter(torch.randn(3))], flat_buffers=True, backend="torch")
        with pytest.raises(ValueError, match="flat_buffers=False"):
            opt.add_param_group({"params": [p]})
        assert len(opt.param_groups) == 1
        fp16_triton.AdamW([p], flat_buffers=False, backend="torch")
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------- 12. copies
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_flat_buffers(how):
    """A flat optimizer copied before its first step is still flat, and adopts its own
    params at its first step."""
    params = _three_params()
    opt = make_opt("SGD", params, True, lr=0.1, momentum=0.9)
    copied = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert copied.flat_buffers is True and opt.flat_buffers is True
    new_params = copied.param_groups[0]["params"]
    assert all(p is not q for p, q in zip(new_params, params))
    _set_grads(new_params, 0)
    copied.step()
    (fb,) = flat_buckets(copied)
    assert fb.params == new_params
    assert all(offset_in(p.detach(), fb.param) == o for p, o in zip(new_params, fb.offsets))
    assert len(opt.state) == 0  # the original is untouched


def test_deepcopy_of_model_and_adopted_optimizer_continues_alike():
    """deepcopy((model, opt)) after adoption: the copy re-adopts its own params and continues
    bitwise like the original."""
    model = make_model(torch.float16)
    opt = make_opt("AdamW", model.parameters(), True, lr=1e-2, weight_decay=0.1)
    train(model, opt, 2)
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.flat_buffers is True
    train(model, opt, 2, start=2)
    train(model2, opt2, 2, start=2)
    assert_bitwise(snapshot(model2.parameters(), opt2), snapshot(model.parameters(), opt))
    (fb2,) = flat_buckets(opt2)
    (fb,) = flat_buckets(opt)
    assert fb2.param.data_ptr() != fb.param.data_ptr()
    assert all(
        offset_in(p.detach(), fb2.param) == o for p, o in zip(model2.parameters(), fb2.offsets)
    )


def test_sparse_grad_is_refused_before_any_state_exists():
    """A sparse grad at adoption raises before any state is created or any param moves."""
    emb = nn.Embedding(10, 3, sparse=True).to(DEVICE)
    dense = nn.Linear(3, 2).to(DEVICE)
    opt = make_opt("AdamW", [*dense.parameters(), emb.weight], True, lr=1e-2)
    dense(emb(torch.tensor([1, 2], device=DEVICE))).sum().backward()
    ptr = emb.weight.data_ptr()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert len(opt.state) == 0 and emb.weight.data_ptr() == ptr


@pytest.mark.parametrize("where", ["first", "middle"])
def test_a_sparse_grad_after_adoption_is_refused_clearly(where):
    """A sparse grad set on an adopted param (first param of the bucket: seen by the O(1)
    check; a middle one: by the reference counts) gets the clear refusal, not a failure to
    read its data pointer, and nothing changes."""
    params = [nn.Parameter(torch.randn(n, 3, device=DEVICE)) for n in (10, 4, 6)]
    opt = make_opt("AdamW", params, True, lr=1e-2)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    before = snapshot(params, opt)
    target = params[0] if where == "first" else params[1]
    target.grad = torch.ones_like(target).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    assert_bitwise(snapshot(params, opt), before, "nothing changed")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-sync detection needs a CUDA GPU")
@pytest.mark.parametrize("wrapped", [False, True])
def test_cuda_flat_steps_make_no_host_sync(wrapped):
    """After adoption (whose step-count check may sync once), steady flat steps never sync:
    the O(1) check reads host integers only. Plain and under FP16Optimizer with clipping."""
    model = _deep_model().cuda()
    opt = fp16_triton.AdamW(model.parameters(), lr=1e-3, backend="triton", flat_buffers=True)
    if wrapped:
        opt = FP16Optimizer(opt, clip_grad=1.0)

    # Inputs made before the sync check: a host-to-device copy syncs by itself.
    batches = []
    for i in range(5):
        g = torch.Generator().manual_seed(100 + i)
        x, y = torch.randn(BATCH, IN, generator=g), torch.randn(BATCH, OUT, generator=g)
        batches.append((x.to("cuda", torch.float16), y.cuda()))

    def step(i):
        opt.zero_grad()
        x, y = batches[i]
        loss = (model(x).float() - y).square().mean()
        opt.backward(loss) if wrapped else loss.backward()
        opt.step()

    step(0)
    step(1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(2, 5):
            step(i)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_without_storage_reference_counts_every_step_checks_every_param(monkeypatch):
    """On a torch without ``torch._C._storage_Use_Count`` the O(1) check cannot trust anything:
    every step, and every zero_grad, checks every param (slower, still correct)."""
    import fp16_triton.flat_buffers

    monkeypatch.setattr(fp16_triton.flat_buffers, "storage_use_count", None)
    counts = _Counts(monkeypatch)

    def scenario(model, step):
        if step == 3:
            model.layers[2].zero_grad()

    flat_model, flat_opt = _run_skippable(True, "torch", scenario, steps=5)
    ref_model, ref_opt = _run_skippable(False, "torch", scenario, steps=5)
    assert counts.full_checks == 8  # every step after the adopting one, every zero_grad
    assert_bitwise(
        snapshot(flat_model.parameters(), flat_opt), snapshot(ref_model.parameters(), ref_opt)
    )


def test_views_of_params_kept_elsewhere_are_warned_about_at_adoption(caplog):
    """Found in review: a module that keeps a view of a param made before the first step
    (``self.dec_w = self.mid.weight.t()``) would silently keep the initial values once the
    param moves into the flat buffer. Adoption counts such references and says so; a plain
    model gets no warning."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.mid = nn.Linear(IN, IN), nn.Linear(IN, IN)
            self.dec_w = self.mid.weight.t()  # a cached view, not a Parameter

        def forward(self, x):
            return torch.tanh(self.mid(torch.tanh(self.enc(x)))) @ self.dec_w

    for model, expected in ((Tied(), 1), (nn.Sequential(nn.Linear(IN, IN)), 0)):
        opt = make_opt("AdamW", model.parameters(), True, lr=1e-2)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=OPT_LOGGER):
            model(torch.randn(BATCH, IN)).square().mean().backward()
            opt.step()
        warned = [r for r in caplog.records if "besides the params themselves" in r.message]
        assert len(warned) == expected
        if expected:
            assert warned[0].args == (1,)  # the one cached view


def foreign_view_records(caplog):
    return [r for r in caplog.records if "besides the params themselves" in r.getMessage()]


@pytest.mark.skipif(
    not hasattr(torch._C, "_storage_Use_Count"), reason="torch gives no storage use counts"
)
def test_the_moved_params_warning_names_real_views_only(caplog):
    """A tensor kept on a param's storage (a view a module holds) does not follow the param
    into the flat buffer: warned at adoption. Params left behind in an old buffer when one
    layer is cast (its bucket rebuilt) are no such tensors: no warning."""
    model = make_model(torch.bfloat16)
    kept = model[0].weight.detach().t()  # a view the optimizer cannot move
    opt = make_opt("AdamW", model.parameters(), True, lr=1e-3)
    with caplog.at_level(logging.WARNING, logger=OPT_LOGGER):
        train(model, opt, 2)
    assert len(foreign_view_records(caplog)) == 1
    del kept
    caplog.clear()
    model[2].half()  # the bf16 bucket now holds one layer: rebuilt while it is in the old one
    with caplog.at_level(logging.WARNING, logger=OPT_LOGGER):
        opt.zero_grad()
        x = torch.randn(BATCH, IN).to(torch.bfloat16)
        model[2](model[1](model[0](x)).half()).float().sum().backward()
        opt.step()
    assert foreign_view_records(caplog) == []
    assert any("re-adopted" in r.getMessage() for r in caplog.records)  # it was rebuilt


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_state_tensor_shared_by_two_params_is_refused_as_per_tensor(backend):
    """``state[q]["exp_avg"] = state[p]["exp_avg"]``: per-tensor storage refuses it (each
    param's state is its own); a flat bucket, which would copy it into two slots and so undo
    the sharing, refuses it alike, before anything changes. Its own shared ``step`` is fine."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(64).to(torch.bfloat16)) for _ in range(2)]
    opt = make_opt("AdamW", params, True, backend, lr=1e-3)

    def grads(step):
        for k, p in enumerate(params):
            p.grad = torch.full_like(p, 0.1 * (step + k + 1))

    for step in range(2):
        grads(step)
        opt.step()
    before = snapshot(params, opt)
    opt.state[params[1]]["exp_avg"] = opt.state[params[0]]["exp_avg"]
    grads(2)
    with pytest.raises(ValueError, match="one tensor for two params"):
        opt.step()
    after = snapshot(params, opt)
    after["state"][1]["exp_avg"] = before["state"][1]["exp_avg"]  # the user's own assignment
    assert_bitwise(after, before, "nothing changed")


@pytest.mark.parametrize("flat", [False, True], ids=["per-tensor", "flat"])
def test_a_state_tensor_shared_across_param_groups_is_refused(flat):
    """As within a group: per-tensor storage would update the one tensor once per param,
    flat buffers would copy it apart; both refuse, before anything changes."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(64)) for _ in range(2)]
    opt = fp16_triton.AdamW(
        [{"params": [params[0]]}, {"params": [params[1]], "lr": 1e-2}],
        lr=1e-3, backend="torch", flat_buffers=flat,
    )  # fmt: skip
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    before = snapshot(params, opt)
    for name in ("exp_avg", "step"):
        if flat and name == "step":
            continue  # a flat bucket's params share its step by design
        kept = opt.state[params[1]][name]
        opt.state[params[1]][name] = opt.state[params[0]][name]
        with pytest.raises(ValueError, match="one tensor for two params"):
            opt.step()
        opt.state[params[1]][name] = kept
        assert_bitwise(snapshot(params, opt), before, f"nothing changed ({name})")
