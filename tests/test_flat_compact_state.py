"""Compact state in flat buffers (``flat_buffers=True`` with ``state_dtype``,
``master_weights="remainder"`` and ``stochastic_rounding``): ``fp16_triton/flat_buffers.py``.

Oracle: the per-tensor optimizer (``flat_buffers=False``), which the other test files check
against float64 and torch.optim. Every kernel is elementwise, and a flat bucket with int8
moments starts each view at a multiple of the 256-element quantization block, so each param's
blocks, scales and codes are those it has per tensor: the two runs must agree bit for bit
(``assert_bitwise``: -0.0 != 0.0, NaN-safe) after every step, with writes into params between
steps, switches of the state's kind, state dicts crossing between the two, copies, and inside
``FP16Optimizer``. The one exception is stochastic rounding: a flat bucket draws its words from
its first param's seed counted over the whole buffer, another stream than per tensor, so it is
checked against itself (same seed, resumed) and statistically against torch.optim (the bound of
``test_stochastic_rounding.py``).

Model: 70 -> 90 -> 50 (weights of 6300 and 4500 elements, biases of 90 and 50): the weights
get int8 moments (>= 4096 elements), the biases keep fp32 ones, so an int8 group has two flat
buckets; 6300 is no multiple of 256, so the second weight's view is where alignment to blocks
shows.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from comparing import assert_bitwise
from comparing import one_thread as one_thread  # noqa: F401  (autouse: one CPU thread)
from test_stochastic_rounding import bernstein
from torch import nn

import fp16_triton
from fp16_triton import DynamicLossScaler, FP16Optimizer
from fp16_triton.kernels.quantize import BLOCK

BF16 = torch.bfloat16
BACKENDS = ("torch", "triton")
# The interpreter's Philox multiplies uint32s in numpy, which warns about the (intended) wrap.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

MODES = {
    "bf16-moments": dict(state_dtype=BF16),
    "remainder": dict(master_weights="remainder"),
    "int8": dict(state_dtype="int8"),
    "remainder-int8": dict(master_weights="remainder", state_dtype="int8"),
    "remainder-bf16-moments-amsgrad": dict(
        master_weights="remainder", state_dtype=BF16, amsgrad=True
    ),
}


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(70, 90), nn.Tanh(), nn.Linear(90, 50)).to(BF16)


def loss_of(model, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(4, 70, generator=g).to(BF16)
    return (model(x).float() - torch.randn(4, 50, generator=g)).square().mean()


def make_opt(model, flat: bool, backend: str, name: str = "AdamW", **kwargs):
    kwargs = {"lr": 1e-2, **kwargs}
    return getattr(fp16_triton, name)(
        model.parameters(), backend=backend, flat_buffers=flat, **kwargs
    )


def train(model, opt, steps: int, start: int = 0, between=None) -> list:
    """Steps ``start ..``; ``between(model, step)`` runs before each step's backward. Returns
    the params after every step."""
    trace = []
    for step in range(start, start + steps):
        if between is not None:
            between(model, step)
        opt.zero_grad()
        loss_of(model, step).backward()
        opt.step()
        trace.append([p.detach().clone() for p in model.parameters()])
    return trace


def flat_buckets(opt, group_index: int = 0):
    group = opt.param_groups[group_index]
    return [b.flat for b in opt._groups[id(group)].plans["flat"].buckets]


def state_of(opt, model) -> list[dict]:
    return [
        {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
        for p in model.parameters()
    ]


# ------------------------------------------------------------ 1. flat == per-tensor, bitwise
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_flat_compact_state_is_bitwise_the_per_tensor_run(backend, mode):
    """Params after every step, every state tensor and the state dict: bitwise the per-tensor
    optimizer's. The state lives in the flat buffers, in its own dtype, with zero padding."""
    runs = {}
    for flat in (True, False):
        model = make_model()
        opt = make_opt(model, flat, backend, **MODES[mode])
        trace = train(model, opt, 4)
        runs[flat] = (trace, state_of(opt, model), opt.state_dict()["state"])
        if flat:
            check_views_and_padding(opt, model)
    assert_bitwise(runs[True], runs[False], mode)
    start = list(make_model().parameters())
    assert all(not torch.equal(p, s) for p, s in zip(runs[True][0][-1], start)), "moved"


def check_views_and_padding(opt, model) -> None:
    """Each state tensor of each param is a view into its bucket's buffer of that state's
    dtype; int8 buckets start every view at a multiple of the block; padding is zero."""
    buckets = flat_buckets(opt)
    for flat in buckets:
        int8 = "exp_avg_scale" in flat.state
        for i, p in enumerate(flat.params):
            assert flat.offsets[i] % (BLOCK if int8 else 64) == 0
            for name, buffer in flat.state.items():
                view = opt.state[p][name]
                assert view.dtype == buffer.dtype
                assert view.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        used = torch.zeros(flat.numel, dtype=torch.bool)
        for offset, shape in zip(flat.offsets, flat.shapes):
            used[offset : offset + shape.numel()] = True
        for name, buffer in flat.state.items():
            if buffer.numel() == flat.numel:
                assert not buffer[~used].any(), f"padding of {name}"
    dtypes = {p.numel(): opt.state[p]["exp_avg"].dtype for p in model.parameters()}
    if opt.param_groups[0]["state_dtype"] == "int8":
        assert len(buckets) == 2
        assert dtypes == {6300: torch.int8, 90: torch.float32, 4500: torch.int8, 50: torch.float32}


@pytest.mark.parametrize("name", ["SGD", "Lion"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_momentum_optimizers_with_remainders_and_bf16_state_in_flat_buffers(backend, name):
    kwargs = dict(master_weights="remainder", state_dtype=BF16)
    if name == "SGD":
        kwargs.update(lr=0.05, momentum=0.9)
    else:
        kwargs.update(lr=1e-3)
    runs = {}
    for flat in (True, False):
        model = make_model()
        opt = make_opt(model, flat, backend, name, **kwargs)
        runs[flat] = (train(model, opt, 3), state_of(opt, model))
    assert_bitwise(runs[True], runs[False], name)


# --------------------------------------------------------- 2. writes and switches between steps
def write_between(opt=None):
    """In-place writes into two params at step 2 (a version counter sees them), the first of
    them written again at step 3 (its record remade after step 2, with nothing rebuilt in
    between), and the last param's data replaced at step 5 (no counter sees it, its address
    changes; the buckets are rebuilt or re-adopted). With ``opt``
    (fp32 masters), the written params' masters are then set to their values: what zeroing
    their remainders means."""

    def between(model, step: int) -> None:
        with torch.no_grad():
            if step == 2:
                model[0].bias.mul_(0.5)
                model[2].weight[0].fill_(0.25)
                written = [model[0].bias, model[2].weight]
            elif step == 3:
                model[0].bias.add_(0.125)
                written = [model[0].bias]
            elif step == 5:
                model[2].bias.data = torch.full_like(model[2].bias, 0.125)
                written = [model[2].bias]
            else:
                return
            for p in written if opt is not None else ():
                opt.state[p]["master_param"].copy_(p.float())

    return between


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "per_tensor"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_remainder_writes_between_steps_start_the_next_step_from_the_param(backend, flat):
    """The step starts from what a written param holds, and only the written params lose the
    bits of their masters. Oracle: fp32 masters (``True``, bitwise the same run as remainders
    when nothing is written) whose written params' masters are reset to the written values
    by hand; the per-tensor optimizer passes the same test."""
    runs = {}
    for masters in ("remainder", True):
        model = make_model()
        opt = make_opt(model, flat, backend, master_weights=masters)
        between = write_between(opt if masters is True else None)
        runs[masters] = train(model, opt, 7, between=between)
    assert_bitwise(runs["remainder"], runs[True])
    # Not vacuous: the unwritten params' masters hold bits their params do not.
    model = make_model()
    opt = make_opt(model, flat, backend, master_weights="remainder")
    train(model, opt, 2)
    assert opt.state[model[0].weight]["master_remainder"].any()


def switch_between(opt):
    """fp32 moments and masters, then int8 moments with remainders, then bf16 moments with fp32
    masters, then int8 again."""
    settings = {
        1: dict(state_dtype="int8", master_weights="remainder"),
        3: dict(state_dtype=BF16, master_weights=True),
        4: dict(state_dtype="int8"),
    }

    def between(model, step):
        for key, value in settings.get(step, {}).items():
            opt.param_groups[0][key] = value

    return between


@pytest.mark.parametrize("backend", BACKENDS)
def test_switching_the_kind_of_state_between_steps_is_as_per_tensor(backend):
    runs = {}
    for flat in (True, False):
        model = make_model()
        opt = make_opt(model, flat, backend)
        trace = train(model, opt, 6, between=switch_between(opt))
        runs[flat] = (trace, state_of(opt, model))
        if flat:
            check_views_and_padding(opt, model)
    assert_bitwise(runs[True], runs[False])


# ------------------------------------------------------------ 3. state dicts and copies
@pytest.mark.parametrize("source_flat", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_compact_state_dicts_cross_between_flat_and_per_tensor(backend, source_flat):
    """Two steps in one kind of optimizer, its state dict loaded into the other kind, two more
    steps: bitwise four steps in either kind."""
    mode = dict(master_weights="remainder", state_dtype="int8")
    model = make_model()
    straight = make_opt(model, True, backend, **mode)
    expected = train(model, straight, 4)[-1]
    model = make_model()
    first = make_opt(model, source_flat, backend, **mode)
    train(model, first, 2)
    saved = copy.deepcopy(first.state_dict())
    second = make_opt(model, not source_flat, backend, **mode)
    second.load_state_dict(saved)
    assert_bitwise(train(model, second, 2, start=2)[-1], expected)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_a_flat_compact_optimizer_continues_bitwise(how):
    model = make_model()
    opt = make_opt(model, True, "torch", master_weights="remainder", state_dtype="int8")
    train(model, opt, 2)
    both = {"model": model, "opt": opt}
    copied = copy.deepcopy(both) if how == "deepcopy" else pickle.loads(pickle.dumps(both))
    expected = train(model, opt, 2, start=2)
    assert_bitwise(train(copied["model"], copied["opt"], 2, start=2), expected)


# --------------------------------------------------------------------- 4. FP16Optimizer
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_optimizer_skips_a_flat_compact_step_bitwise(backend):
    """Dynamic loss scaling with an overflow at step 2 (skipped, nothing written): bitwise the
    per-tensor run, and the skipped step left params and state as they were."""
    runs = {}
    for flat in (True, False):
        model = make_model()
        inner = make_opt(model, flat, backend, master_weights="remainder", state_dtype="int8")
        opt = FP16Optimizer(inner, loss_scaler=DynamicLossScaler(init_scale=2.0**8))
        trace = []
        for step in range(5):
            opt.zero_grad()
            opt.backward(loss_of(model, step))
            if step == 2:
                model[0].weight.grad.view(-1)[5] = float("inf")
                before = (list(model.parameters()), state_of(inner, model))
                before = copy.deepcopy(before)
            opt.step()
            assert opt.overflow is (step == 2)
            if step == 2:
                assert_bitwise((list(model.parameters()), state_of(inner, model)), before)
            trace.append([p.detach().clone() for p in model.parameters()])
        runs[flat] = (trace, state_of(inner, model))
    assert_bitwise(runs[True], runs[False])


# --------------------------------------------------------------- 5. stochastic rounding
def sr_run(backend, steps=4, seed=7, opt=None, model=None, start=0):
    model = model if model is not None else make_model()
    if opt is None:
        opt = make_opt(model, True, backend, master_weights=False, state_dtype=BF16,
                       stochastic_rounding=True, seed=seed)  # fmt: skip
    trace = train(model, opt, steps, start=start)
    return model, opt, trace


@pytest.mark.parametrize("backend", BACKENDS)
def test_flat_stochastic_rounding_is_reproducible_and_resumes_bitwise(backend):
    _, opt, trace = sr_run(backend)
    _, opt2, trace2 = sr_run(backend)
    assert_bitwise(trace2, trace, "same seed")
    _, _, other = sr_run(backend, seed=8)
    assert any(not torch.equal(a, b) for a, b in zip(other[-1], trace[-1])), "another seed"
    model, half, _ = sr_run(backend, steps=2)
    saved = copy.deepcopy(half.state_dict())
    resumed = make_opt(model, True, backend, master_weights=False, state_dtype=BF16,
                       stochastic_rounding=True, seed=99)  # fmt: skip
    resumed.load_state_dict(saved)
    _, resumed, rest = sr_run(backend, steps=2, opt=resumed, model=model, start=2)
    assert_bitwise(rest[-1], trace[-1], "resumed")
    assert_bitwise(resumed.state_dict(), opt.state_dict(), "resumed state")


@pytest.mark.parametrize("backend", BACKENDS)
def test_flat_updates_far_below_half_an_ulp_survive_on_average(backend):
    """The test of test_stochastic_rounding.py (bf16 params at 1.5, grad 1, lr = ulp/64, 64
    steps, mean within Bernstein's bound of torch.optim.Adam on fp32) with the 4096 elements
    split over four params of one flat bucket, so the words are counted across the buffer."""
    n, parts, steps, lr = 4096, 4, 64, 2.0**-13
    exact = torch.nn.Parameter(torch.full((n,), 1.5))
    reference = torch.optim.Adam([exact], lr=lr)
    params = [torch.nn.Parameter(torch.full((n // parts,), 1.5, dtype=BF16)) for _ in range(parts)]
    opt = fp16_triton.Adam(params, lr=lr, master_weights=False, stochastic_rounding=True,
                           seed=3, backend=backend, flat_buffers=True)  # fmt: skip
    for _ in range(steps):
        exact.grad = torch.ones(n)
        reference.step()
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    ulp = 2.0**-7
    moved = (1.5 - torch.cat([p.detach() for p in params]).double().mean().item()) / ulp
    expected = (1.5 - exact.double().mean().item()) / ulp
    bound = steps * bernstein(n * steps, 1 / 64)
    assert abs(moved - expected) <= bound, (moved, expected, bound)
    # The four params drew different words (one seed, counted across the buffer).
    assert len({tuple(p.detach().view(torch.int16).tolist()) for p in params}) == parts


# ------------------------------------------------------------------- 6. odd params and state
class _Scaled(nn.Module):
    """A learnable 0-dim temperature registered first, so it is the first param of its flat
    bucket (whose states are 0-dim too: they must still get flat buffers)."""

    def __init__(self):
        super().__init__()
        self.temperature = nn.Parameter(torch.tensor(1.0, dtype=BF16))
        self.body = make_model()

    def forward(self, x):
        return self.body(x) * self.temperature


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("AdamW", dict(master_weights="remainder", state_dtype=BF16)),
        ("AdamW", dict(master_weights=False, stochastic_rounding=True, seed=1)),
        ("SGD", dict(lr=0.05, momentum=0.9, master_weights="remainder")),
        ("Lion", dict(lr=1e-3)),
    ],
)
def test_a_scalar_param_first_in_its_bucket(name, kwargs):
    """Flat equals per-tensor bitwise (stochastic rounding: the flat run against itself after
    a state-dict round trip, its stream being the bucket's)."""
    runs = {}
    for flat in (True, False):
        torch.manual_seed(0)
        model = _Scaled()
        opt = make_opt(model, flat, "torch", name, **kwargs)
        runs[flat] = train(model, opt, 3)
        assert not torch.equal(runs[flat][-1][0], torch.tensor(1.0, dtype=BF16)), "stepped"
    if not kwargs.get("stochastic_rounding"):
        assert_bitwise(runs[True], runs[False], name)


def test_a_state_entry_the_optimizer_does_not_know_is_left_alone():
    """As torch.optim: an extra entry in a param's state (here the first param's, with the
    param's shape, as the state checks ask) is kept, untouched, and the step is the
    per-tensor one."""
    runs = {}
    for flat in (True, False):
        model = make_model()
        opt = make_opt(model, flat, "torch", master_weights="remainder", state_dtype="int8")
        train(model, opt, 1)
        extra = torch.ones(90, 70)
        opt.state[model[0].weight]["note"] = extra
        runs[flat] = train(model, opt, 2, start=1)
        assert opt.state[model[0].weight]["note"] is extra
    assert_bitwise(runs[True], runs[False])


def test_adopt_refuses_mixed_dtypes_before_dropping_a_buffer():
    """``FlatBuffers.adopt`` checks every state before it changes anything: a bucket whose
    first state changed dtype (a new buffer) but whose second is mixed keeps its old buffers
    and views when the adoption is refused."""
    from fp16_triton.flat_buffers import FlatBuffers

    params = [torch.zeros(300), torch.zeros(70)]
    state = {p: {n: torch.full_like(p, 1.0) for n in ("exp_avg", "exp_avg_sq")} for p in params}
    flat = FlatBuffers(params)
    flat.adopt(state, ["exp_avg", "exp_avg_sq"])
    buffers = dict(flat.state)
    for p in params:
        state[p]["exp_avg"] = state[p]["exp_avg"].to(BF16)
    state[params[0]]["exp_avg_sq"] = state[params[0]]["exp_avg_sq"].to(BF16)  # the 2nd: fp32
    with pytest.raises(RuntimeError, match="a buffer has one dtype"):
        flat.adopt(state, ["exp_avg", "exp_avg_sq"])
    assert flat.state == buffers
    assert all(v.dtype == torch.float32 for v in flat.state.values())


@pytest.mark.parametrize("checkpoint", [False, True], ids=["", "state_dict-between"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_data_replaced_while_the_old_tensor_is_kept_is_seen_through_the_remainders(
    backend, checkpoint
):
    """``p.data = t`` for a middle param of a bucket while the old tensor is kept (a list for
    logging): the O(1) checks cannot see it (docs/flat-buffers.md), but with remainders the
    per-step pass over the params does, and the bucket re-adopts ``t``: bitwise the
    per-tensor run, which steps ``t`` with its remainder restarted. Also when ``state_dict()``
    (which settles the remainders) runs in between."""
    runs, kept = {}, []
    for flat in (True, False):
        model = make_model()
        opt = make_opt(model, flat, backend, master_weights="remainder")
        train(model, opt, 2)
        middle = model[0].bias  # params: weight, bias, weight, bias: one bucket of four
        kept.append(middle.data)
        middle.data = middle.data.clone().mul_(2)
        if checkpoint:
            opt.state_dict()
        runs[flat] = train(model, opt, 2, start=2)
        assert not torch.equal(middle.detach(), kept[-1] * 2), "the new tensor was stepped"
    assert_bitwise(runs[True], runs[False])
