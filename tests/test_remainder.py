"""``master_weights="remainder"``: bf16 params whose fp32 masters are the params' bits plus an
int16 remainder (``kernels/remainder.py``, ``fp16_triton/masters.py``).

The encoding is checked against an oracle written from the definition (``comparing.py:
master_rounded``: the nearest bf16 by float64 distance, ties away from zero) over random fp32
bit patterns, the kernels' device functions bit for bit against the torch reference, and the
optimizers' runs against
``master_weights=True`` bit for bit: same params at every step, same state dicts. Nothing here
has a tolerance: every comparison is exact.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from comparing import assert_bitwise, master_rounded
from comparing import one_thread as one_thread  # noqa: F401  (autouse: one CPU thread)
from exploring import examples
from hypothesis import given, settings
from hypothesis import strategies as st

import fp16_triton
from fp16_triton.kernels import remainder
from fp16_triton.train import GPTConfig, MarkovTask, TinyGPT

BF16 = torch.bfloat16


def random_floats(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2**31), 2**31, (n,), generator=g, dtype=torch.int64)
    return bits.to(torch.int32).view(torch.float32)


@settings(max_examples=examples(30), deadline=None)
@given(seed=st.integers(0, 2**31))
def test_split_and_join_are_exact_and_the_param_is_the_nearest(seed):
    x = random_floats(4096, seed)
    # Exact ties and their neighbours, where the two roundings differ.
    tie = torch.tensor([1.0 + 2**-8, -(1.0 + 2**-8), 1.0 + 3 * 2**-8, 2.0**-130 + 2**-134])
    x = torch.cat([x, tie, tie.nextafter(torch.zeros(())), tie.nextafter(tie * 2)])
    param, rest = remainder.split_reference(x)
    assert param.dtype == BF16 and rest.dtype == torch.int16
    finite = x.isfinite() & (x.abs() < 3.3e38)  # beyond, the nearest bf16 is infinity
    assert_bitwise(param[finite], master_rounded(x[finite], BF16), "param")
    back = remainder.join_reference(param, rest)
    nan = x.isnan()
    assert_bitwise(back[~nan], x[~nan], "master")
    assert back[nan].isnan().all() and param[nan].isnan().all()


def test_ties_go_away_from_zero_where_nearest_even_goes_down():
    x = torch.tensor([1.0 + 2**-8, -(1.0 + 2**-8)])  # half-way between 1 and 1 + 2^-7
    assert_bitwise(
        remainder.round_master_reference(x), torch.tensor([1 + 2**-7, -1 - 2**-7], dtype=BF16)
    )
    assert_bitwise(x.to(BF16), torch.tensor([1.0, -1.0], dtype=BF16))  # nearest-even: down


def test_a_zeroed_param_reads_back_as_zero_never_nan():
    x = torch.tensor([1.0 + 2**-8 + 2**-20, -(3.0 + 2**-7 + 2**-20)])  # both rounded up
    _, rest = remainder.split_reference(x)
    assert (rest < 0).all()
    zeros = torch.tensor([0.0, -0.0], dtype=BF16)
    assert_bitwise(remainder.join_reference(zeros, rest), torch.tensor([0.0, -0.0]))


@triton.jit
def _device_functions(x_ptr, param_ptr, rest_ptr, joined_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    param = remainder.round_master(x)
    rest = remainder.remainder_of(x)
    tl.store(param_ptr + offsets, param, mask=mask)
    tl.store(rest_ptr + offsets, rest, mask=mask)
    tl.store(joined_ptr + offsets, remainder.join(param, rest), mask=mask)


@pytest.mark.parametrize("seed", [0, 1])
def test_device_functions_are_the_reference_bit_for_bit(seed):
    x = random_floats(3000, seed)
    x[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0 + 2**-8])
    param = torch.empty(x.shape, dtype=BF16)
    rest = torch.empty(x.shape, dtype=torch.int16)
    joined = torch.empty_like(x)
    _device_functions[(triton.cdiv(x.numel(), 1024),)](
        x, param, rest, joined, x.numel(), BLOCK=1024
    )
    ref_param, ref_rest = remainder.split_reference(x)
    assert_bitwise(param, ref_param, "param")
    assert_bitwise(rest, ref_rest, "remainder")
    assert_bitwise(joined, remainder.join_reference(ref_param, ref_rest), "joined")
    # A stale negative remainder under a zero param: both read back the zero.
    zeros = torch.zeros(8, dtype=BF16)
    stale = torch.full((8,), -5, dtype=torch.int16)
    out = torch.empty(8)
    _join_only[(1,)](zeros, stale, out, 8, BLOCK=8)
    assert_bitwise(out, remainder.join_reference(zeros, stale))
    assert_bitwise(out, torch.zeros(8))


@triton.jit
def _join_only(param_ptr, rest_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n
    param = tl.load(param_ptr + offsets, mask=mask, other=0.0)
    rest = tl.load(rest_ptr + offsets, mask=mask, other=0)
    tl.store(out_ptr + offsets, remainder.join(param, rest), mask=mask)


# --------------------------------------------------------------------------- optimizer runs
def _model_and_batches(kind: str):
    """The tiny GPT (100k params; the torch backend) or, for the Triton interpreter (about a
    second per tiny-GPT step), a two-layer MLP; a loss function of the model and a batch."""
    torch.manual_seed(0)
    data = torch.Generator().manual_seed(1)
    if kind == "gpt":
        model, task = TinyGPT(GPTConfig()).to(BF16), MarkovTask(GPTConfig().vocab, 0)

        def loss():
            seq = task.batch(8, GPTConfig().seq_len, data)
            logits = model(seq[:, :-1]).float()
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seq[:, 1:].reshape(-1))

    else:
        model = torch.nn.Sequential(
            torch.nn.Linear(16, 48), torch.nn.Tanh(), torch.nn.Linear(48, 4)
        ).to(BF16)

        def loss():
            x = torch.randn(8, 16, generator=data).to(BF16)
            return model(x).float().sin().sum()

    return model, loss


def _run(master_weights, backend, kind, steps, on_step):
    """``steps`` bf16 steps of fp16_triton.AdamW under FP16Optimizer (clipping at 1), calling
    ``on_step(model, optimizer)`` after each; returns the model and the optimizer."""
    model, loss = _model_and_batches(kind)
    opt = fp16_triton.AdamW(
        model.parameters(), lr=3e-3, weight_decay=0.01, master_weights=master_weights,
        backend=backend,
    )  # fmt: skip
    wrapped = fp16_triton.FP16Optimizer(opt, clip_grad=1.0)
    for _ in range(steps):
        wrapped.zero_grad()
        wrapped.backward(loss())
        wrapped.step()
        on_step(model, opt)
    return model, opt


@pytest.mark.parametrize("backend, kind", [("torch", "gpt"), ("triton", "mlp")])
def test_a_200_step_bf16_run_is_bitwise_the_run_with_fp32_masters(backend, kind):
    """Same params after every step and the same state dict at the end. The tiny GPT's run
    meets exact ties (masters half-way between two bf16 numbers), where nearest-even params
    would differ: counted from the fp32 masters, and required there (the MLP's 1,000 params
    rarely meet one; ``test_exact_ties_...`` puts them in front of the kernel)."""
    steps, ties = 200, []
    with_masters, with_remainders = [], []

    def record(into):
        def on_step(model, opt):
            into.append([p.detach().clone() for p in model.parameters()])
            if into is with_masters:
                ties.append(sum(_ties(s["master_param"]) for s in opt.state.values()))

        return on_step

    _, opt_a = _run(True, backend, kind, steps, record(with_masters))
    model_b, opt_b = _run("remainder", backend, kind, steps, record(with_remainders))
    if kind == "gpt":
        assert sum(ties) > 0, "no exact tie met: the run cannot tell the roundings apart"
    for step, (a, b) in enumerate(zip(with_masters, with_remainders)):
        assert_bitwise(b, a, f"params after step {step + 1}")
    sd_a, sd_b = opt_a.state_dict(), opt_b.state_dict()
    assert_bitwise(sd_b["state"], sd_a["state"], "state dict")
    for p in model_b.parameters():
        assert set(opt_b.state[p]) == {"step", "exp_avg", "exp_avg_sq", "master_remainder"}
        assert opt_b.state[p]["master_remainder"].dtype == torch.int16


def _ties(master: torch.Tensor) -> int:
    return int(((master.view(torch.int32) & 0xFFFF) == 0x8000).sum())


def test_exact_ties_are_met_and_rounded_away_from_zero_with_fp32_masters():
    """A master written exactly half-way (lr 0 keeps it there): the param is rounded away
    from zero in both modes, so the two stay bitwise equal where nearest-even would not."""
    master = torch.tensor([1.0 + 2**-8, -(1.0 + 2**-8), 1.0 + 3 * 2**-8, 0.5])
    results = []
    for mode in (True, "remainder"):
        p = torch.nn.Parameter(remainder.round_master_reference(master))  # its rounding
        opt = fp16_triton.AdamW(
            [p], lr=0.0, weight_decay=0.0, master_weights=mode, backend="triton"
        )
        opt.init_state()
        sd = opt.state_dict()
        sd["state"][0]["master_param"] = master.clone()
        opt.load_state_dict(sd)
        p.grad = torch.ones_like(p)
        opt.step()
        results.append((p.detach().clone(), opt.state_dict()["state"][0]["master_param"]))
        assert _ties(results[-1][1]) == 3
    assert_bitwise(results[1], results[0])
    assert_bitwise(results[0][0], remainder.round_master_reference(master))
    assert not torch.equal(results[0][0].view(torch.int16), master.to(BF16).view(torch.int16))


_VECTORS, _MATRICES = ((5,), (1100,)), ((24, 40), (40, 24))


@pytest.mark.parametrize(
    "make, shapes",
    [
        (lambda ps, **kw: fp16_triton.SGD(ps, lr=0.05, momentum=0.9, **kw), _VECTORS),
        (lambda ps, **kw: fp16_triton.Lion(ps, lr=1e-3, weight_decay=0.1, **kw), _VECTORS),
        (lambda ps, **kw: fp16_triton.Adam(ps, lr=1e-2, amsgrad=True, **kw), _VECTORS),
        (lambda ps, **kw: fp16_triton.Lamb(ps, lr=1e-2, weight_decay=0.01, **kw), _VECTORS),
        (lambda ps, **kw: fp16_triton.Muon(ps, lr=0.02, weight_decay=0.01, **kw), _MATRICES),
    ],
    ids=["sgd-momentum", "lion", "adam-amsgrad", "lamb", "muon"],
)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_other_algorithms_are_bitwise_the_run_with_fp32_masters(make, shapes, backend):
    """Each algorithm's kernel reads and writes remainders (2 bytes) as remainders: a guard
    of zeros after each remainder, in the same storage, stays zero (a kernel reading them as
    fp32 masters would write past their end)."""
    runs = []
    for mode in (True, "remainder"):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s).to(BF16)) for s in shapes]
        opt = make(params, master_weights=mode, backend=backend)
        opt.init_state()
        guards = []
        for p in params:
            if mode == "remainder":  # the remainder as the front of a larger zeroed buffer
                storage = torch.zeros(2 * p.numel(), dtype=torch.int16)
                opt.state[p]["master_remainder"] = storage[: p.numel()].view(p.shape)
                guards.append(storage[p.numel() :])
        g = torch.Generator().manual_seed(3)
        trace = []
        for _ in range(20):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(BF16)
            opt.step()
            trace.append([p.detach().clone() for p in params])
        assert all(not guard.any() for guard in guards), "written past a remainder's end"
        runs.append((trace, opt.state_dict()["state"]))
    assert_bitwise(runs[1], runs[0])


_ALGORITHMS = {
    "sgd-momentum": (lambda ps, **kw: fp16_triton.SGD(ps, lr=0.05, momentum=0.9, **kw), _VECTORS),
    "lion": (lambda ps, **kw: fp16_triton.Lion(ps, lr=1e-3, weight_decay=0.1, **kw), _VECTORS),
    "adamw": (lambda ps, **kw: fp16_triton.AdamW(ps, lr=1e-2, **kw), _VECTORS),
    "lamb": (lambda ps, **kw: fp16_triton.Lamb(ps, lr=1e-2, weight_decay=0.01, **kw), _VECTORS),
    "muon": (lambda ps, **kw: fp16_triton.Muon(ps, lr=0.02, weight_decay=0.01, **kw), _MATRICES),
}


def _written_run(make, shapes, backend, mode, copy_at=None, **options):
    """6 steps; before step 2 the first param is halved in place and before step 4 it is
    written again (with fp32 masters, its master is then set to its value by hand: what
    zeroing a remainder means). ``copy_at``: the optimizer and params are deep-copied just
    before that step's write, and the copy goes on."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s).to(BF16)) for s in shapes]
    opt = make(params, master_weights=mode, backend=backend, **options)
    g = torch.Generator().manual_seed(3)
    for step in range(6):
        if step == copy_at:
            params, opt = copy.deepcopy((params, opt))
        if step in (2, 4):
            with torch.no_grad():
                params[0].mul_(0.5) if step == 2 else params[0].add_(0.125)
            if mode is True:
                opt.state[params[0]]["master_param"].copy_(params[0].detach().float())
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(BF16)
        opt.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("algorithm", list(_ALGORITHMS))
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_every_algorithm_starts_a_written_param_from_its_value(algorithm, backend):
    """Writes into a param between steps, for every algorithm with remainders (each has its
    own step; LAMB's once skipped the noting of params): bitwise the run with fp32 masters
    whose written param's master is set to its value."""
    make, shapes = _ALGORITHMS[algorithm]
    assert_bitwise(
        _written_run(make, shapes, backend, "remainder"),
        _written_run(make, shapes, backend, True),
        algorithm,
    )


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("copy_at", [2, 4])
def test_a_copy_sees_writes_made_before_its_first_step(copy_at, flat):
    """A deep copy (of params and optimizer together) written into before it steps: the copy
    starts the written param from its value, as the original would (flat buffers too)."""
    make, shapes = _ALGORITHMS["adamw"]
    options = dict(copy_at=copy_at, flat_buffers=flat)
    assert_bitwise(
        _written_run(make, shapes, "torch", "remainder", **options),
        _written_run(make, shapes, "torch", True, **options),
    )


def test_fp16_params_are_refused_with_a_clear_error():
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float16))
    with pytest.raises(ValueError, match="bf16 params only.*master_weights=True"):
        fp16_triton.AdamW([p], master_weights="remainder")
    with pytest.raises(ValueError, match="True, False or 'remainder'"):
        fp16_triton.AdamW([p], master_weights="half")


def test_a_refused_param_group_is_not_added():
    opt = fp16_triton.AdamW(
        [torch.nn.Parameter(torch.zeros(3, dtype=BF16))], master_weights="remainder"
    )
    with pytest.raises(ValueError, match="bf16 params only"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))]})
    assert len(opt.param_groups) == 1


def test_a_param_cast_to_fp16_later_is_refused_before_anything_is_written():
    p = torch.nn.Parameter(torch.randn(8).to(BF16))
    opt = fp16_triton.AdamW([p], master_weights="remainder")
    p.grad = torch.randn(8).to(BF16)
    opt.step()
    p.data = p.data.half()
    p.grad = torch.randn(8).half()
    before = (p.detach().clone(), copy.deepcopy(dict(opt.state[p])))
    with pytest.raises(ValueError, match="bf16 params only"):
        opt.step()
    assert_bitwise((p.detach(), dict(opt.state[p])), before)


def test_a_state_dict_after_a_cast_to_fp16_holds_the_params_values_as_masters():
    """A remainder completes a bf16 param only: after ``model.half()`` the state dict holds
    what the next step starts from (an fp16 param's master is remade from its value), not
    fp16 bits read as the top half of an fp32 number; the remainders are left as they were."""
    p = torch.nn.Parameter(torch.randn(300).to(BF16))
    opt = fp16_triton.AdamW([p], lr=1e-2, master_weights="remainder")
    for _ in range(2):
        p.grad = torch.randn(300).to(BF16)
        opt.step()
    rest = opt.state[p]["master_remainder"].clone()
    assert rest.any()
    p.data = p.data.half()
    saved = opt.state_dict()["state"][0]
    assert "master_remainder" not in saved
    assert_bitwise(saved["master_param"], p.detach().float())
    assert_bitwise(opt.state[p]["master_remainder"], rest)


def _adamw_pair(n=300, seed=0):
    """Two optimizers over equal bf16 params, fp32 masters and remainders, stepped 5 times."""
    out = []
    for mode in (True, "remainder"):
        torch.manual_seed(seed)
        p = torch.nn.Parameter(torch.randn(n).to(BF16))
        opt = fp16_triton.AdamW(
            [p], lr=1e-2, weight_decay=0.1, master_weights=mode, backend="triton"
        )
        g = torch.Generator().manual_seed(seed + 1)
        for _ in range(5):
            p.grad = torch.randn(n, generator=g).to(BF16)
            opt.step()
        out.append((p, opt))
    return out


def _step_both(pairs, seed=7):
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(pairs[0][0].shape, generator=g).to(BF16) for _ in range(3)]
    for p, opt in pairs:
        for grad in grads:
            p.grad = grad.clone()
            opt.step()
    assert_bitwise(pairs[1][0].detach(), pairs[0][0].detach(), "params")
    assert_bitwise(pairs[1][1].state_dict()["state"], pairs[0][1].state_dict()["state"], "state")


def test_state_dicts_cross_between_modes_and_resume_bitwise():
    (pa, opt_a), (pb, opt_b) = _adamw_pair()
    saved = torch.load(_saved(opt_b.state_dict()), weights_only=True)
    assert "master_remainder" not in saved["state"][0]
    assert saved["state"][0]["master_param"].dtype == torch.float32
    # Into a fresh remainder optimizer, the optimizer loaded before the model (the params are
    # written after the load): the next steps are bitwise those of the fp32-master run.
    p2 = torch.nn.Parameter(torch.zeros_like(pb))
    opt2 = fp16_triton.AdamW(
        [p2], lr=1e-2, weight_decay=0.1, master_weights="remainder", backend="triton"
    )
    opt2.load_state_dict(saved)
    with torch.no_grad():
        p2.copy_(pb)
    _step_both([(pa, opt_a), (p2, opt2)])


def test_an_fp32_torch_state_dict_loads_into_remainder_mode():
    torch.manual_seed(0)
    w = torch.randn(50)
    ref = torch.nn.Parameter(w.clone())
    torch_opt = torch.optim.AdamW([ref], lr=1e-2)
    ref.grad = torch.randn(50)
    torch_opt.step()
    p = torch.nn.Parameter(ref.detach().to(BF16))
    opt = fp16_triton.AdamW([p], lr=1e-2, master_weights="remainder")
    opt.load_state_dict(torch_opt.state_dict())
    for name in ("exp_avg", "exp_avg_sq"):
        assert_bitwise(opt.state[p][name], torch_opt.state[ref][name], name)
    p.grad = torch.zeros(50, dtype=BF16)
    opt.step()  # the master is made from the param (as with master_weights=True)
    assert opt.state[p]["master_remainder"].dtype == torch.int16
    assert opt.state[p]["step"].item() == 2


def _saved(sd) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("saved_mode", [True, "remainder"])
def test_loading_keeps_the_optimizers_own_master_weights(saved_mode):
    """As ``state_dtype``: how this optimizer stores its masters is its own setting; a saved
    state dict of either kind is converted to it."""
    (pa, opt_a), (pb, opt_b) = _adamw_pair()
    source = opt_a if saved_mode is True else opt_b
    for mode in (True, "remainder"):
        p = torch.nn.Parameter(pb.detach().clone())
        opt = fp16_triton.AdamW(
            [p], lr=1e-2, weight_decay=0.1, master_weights=mode, backend="triton"
        )
        opt.load_state_dict(source.state_dict())
        assert opt.param_groups[0]["master_weights"] == mode
        (pa, opt_a), _ = _adamw_pair()
        _step_both([(pa, opt_a), (p, opt)])


def test_state_dicts_and_copies_taken_after_a_write_hold_the_written_values():
    """A param written after a step: ``state_dict()`` and a deepcopy see the master the next
    step would start from (the written value), as with fp32 masters (whose kernel sees the
    write when it steps)."""
    pairs = _adamw_pair()
    for p, _ in pairs:
        with torch.no_grad():
            p.mul_(3)
    resumed = []
    for p, opt in pairs:
        q = torch.nn.Parameter(p.detach().clone())
        fresh = fp16_triton.AdamW([q], lr=1e-2, weight_decay=0.1, backend="triton")
        fresh.load_state_dict(opt.state_dict())
        resumed.append((q, fresh))
    _step_both(resumed)
    _step_both([pairs[0], copy.deepcopy(pairs[1])])


def test_switching_modes_between_steps_is_exact():
    (pa, opt_a), (pb, opt_b) = _adamw_pair()
    opt_b.param_groups[0]["master_weights"] = True
    _step_both([(pa, opt_a), (pb, opt_b)], seed=8)
    assert "master_param" in opt_b.state[pb] and "master_remainder" not in opt_b.state[pb]
    opt_b.param_groups[0]["master_weights"] = "remainder"
    _step_both([(pa, opt_a), (pb, opt_b)], seed=9)
    assert "master_remainder" in opt_b.state[pb]


def test_deepcopy_and_pickle_keep_the_remainders():
    (pa, opt_a), (pb, opt_b) = _adamw_pair()
    copied = copy.deepcopy((pb, opt_b))
    _step_both([(pa, opt_a), copied])


@pytest.mark.parametrize("write", ["fill", "zero", "copy"])
def test_a_param_written_between_steps_is_stepped_from_what_it_holds(write):
    """torch.optim steps from what the param holds. With fp32 masters the kernel sees that
    every element's bits changed; with remainders the optimizer sees the param's version
    counter move. Writes that change every element: both modes are bitwise equal."""
    pairs = _adamw_pair()
    source = torch.randn(300).to(BF16)
    for p, _ in pairs:
        with torch.no_grad():
            if write == "fill":
                p.fill_(0.3)
            elif write == "zero":
                p.zero_()
            else:
                p.copy_(source)
    _step_both(pairs)


def test_refresh_fp32_params_after_a_write_through_data():
    """``p.data`` writes advance no version counter: ``refresh_fp32_params`` is the way (as
    with DeepSpeed), and then the master is what the param holds."""
    (pa, opt_a), (pb, opt_b) = _adamw_pair()
    pa.data.fill_(0.25)
    pb.data.fill_(0.25)
    opt_a.refresh_fp32_params()  # with fp32 masters too: bits equal before are not seen
    opt_b.refresh_fp32_params()
    _step_both([(pa, opt_a), (pb, opt_b)])


def test_remainders_take_two_bytes_per_element():
    p = torch.nn.Parameter(torch.randn(1000).to(BF16))
    q = torch.nn.Parameter(torch.randn(1000).to(BF16))
    a = fp16_triton.AdamW([p], master_weights="remainder", state_dtype=torch.bfloat16)
    b = fp16_triton.AdamW([q], master_weights=True, state_dtype=torch.bfloat16)
    a.init_state()
    b.init_state()

    def kept(opt, param):
        return (
            sum(t.untyped_storage().nbytes() for t in opt.state[param].values() if t.numel() > 1)
            / param.numel()
        )

    assert kept(a, p) == 6 and kept(b, q) == 8


def test_the_write_check_keeps_no_param_alive():
    """The optimizer notes params by weak reference: a param dropped from it is freed (once
    the next step has rebuilt the plans that held it)."""
    import gc
    import weakref

    kept = torch.nn.Parameter(torch.randn(300).to(BF16))
    dropped = torch.nn.Parameter(torch.randn(300).to(BF16))
    opt = fp16_triton.AdamW([kept, dropped], lr=1e-2, master_weights="remainder")
    kept.grad, dropped.grad = torch.randn(300).to(BF16), torch.randn(300).to(BF16)
    opt.step()
    gone = weakref.ref(dropped)
    del opt.state[dropped]
    opt.param_groups[0]["params"] = [kept]
    del dropped
    opt.step()
    gc.collect()
    assert gone() is None
    assert len(opt._fingerprints.stale()) == 0  # the freed param's record is dropped


def _init_state_run(mode, switch: bool, rollback: bool):
    """AdamW over two bf16 params; ``switch``: fp32 masters for 2 steps, then the group
    switched to ``mode`` and ``init_state()`` (else ``mode`` throughout); then a write into
    the first param, steps; ``rollback``: at step 3 the optimizer and the params are loaded
    back from step 1 with ``init_state()`` in between (optimizer, init_state, model: the
    model loaded last)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64).to(BF16)) for _ in range(2)]
    opt = fp16_triton.AdamW(params, lr=1e-2, master_weights=True if switch else mode)
    g = torch.Generator().manual_seed(3)
    saved = None
    for step in range(5):
        if step == 1 and rollback:
            saved = copy.deepcopy((opt.state_dict(), [p.detach().clone() for p in params]))
        if step == 2 and switch:
            opt.param_groups[0]["master_weights"] = mode
            opt.init_state()
            with torch.no_grad():
                params[0].mul_(0.5)
            if mode is True:
                opt.state[params[0]]["master_param"].copy_(params[0].detach().float())
        if step == 3 and rollback:
            opt.load_state_dict(saved[0])
            opt.init_state()
            with torch.no_grad():
                for p, value in zip(params, saved[1]):
                    p.copy_(value)
        for p in params:
            p.grad = torch.randn(64, generator=g).to(BF16)
        opt.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("case", ["switch-init-write", "load-init-model"])
def test_init_state_between_steps_is_as_a_step_would_leave_it(case):
    """``init_state()`` outside a step: a master converted to a remainder there still sees a
    later write, and a loaded fp32 master stays fp32 until a step (so a model loaded after
    ``init_state`` keeps the loaded masters exact): bitwise the fp32-master run."""
    switch, rollback = case == "switch-init-write", case == "load-init-model"
    assert_bitwise(
        _init_state_run("remainder", switch, rollback), _init_state_run(True, switch, rollback)
    )


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_write_into_an_fsdp2_param_is_seen(backend):
    """FSDP2 (one process, gloo): an in-place write into a DTensor param advances the DTensor's
    version counter, not its shard's; the write is seen, and steps through FSDP2's forward and
    backward without writes (which advance neither) zero nothing. Oracle: fp32 masters, the
    written param's master reset by hand."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        runs = {}
        for mode in ("remainder", True):
            torch.manual_seed(0)
            model = torch.nn.Linear(16, 8).to(BF16)
            fully_shard(model)
            opt = fp16_triton.AdamW(model.parameters(), lr=1e-2, master_weights=mode,
                                    backend=backend)  # fmt: skip
            g = torch.Generator().manual_seed(1)
            for step in range(5):
                if step == 3:
                    with torch.no_grad():
                        model.weight.mul_(0.5)
                    if mode is True:
                        opt.state[model.weight]["master_param"].copy_(model.weight.float())
                x = torch.randn(4, 16, generator=g).to(BF16)
                model(x).float().square().mean().backward()
                opt.step()
                opt.zero_grad()
            runs[mode] = [p.to_local().detach().clone() for p in model.parameters()]
        assert_bitwise(runs["remainder"], runs[True])
    finally:
        dist.destroy_process_group()
