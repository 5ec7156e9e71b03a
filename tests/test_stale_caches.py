"""What a review of the cached step found silently wrong, or refused too late, once each: every
case here steps as torch.optim does or is refused before anything is written.

Oracle: torch.optim on fp32 copies, stepped with the same grads. Tolerance: torch's own
fused-vs-foreach bound (rtol 1.3e-6, atol 1e-5) over a few steps; refusals are checked bitwise
(nothing may change)."""

from __future__ import annotations

import copy
from collections import defaultdict

import pytest
import torch

import fp16_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]
FLAT = [False, True]
RTOL, ATOL = 1.3e-6, 1e-5


def pair(n=2, size=8, seed=0, **kwargs):
    """``n`` params of ours, fp32 twins for torch.optim.Adam, and both optimizers."""
    g = torch.Generator().manual_seed(seed)
    ours = [torch.nn.Parameter(torch.randn(size, generator=g).to(DEVICE)) for _ in range(n)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    return ours, ref, torch.optim.Adam(ref, lr=0.1)


def set_grads(ours, ref, step):
    g = torch.Generator().manual_seed(100 + step)
    for p, r in zip(ours, ref):
        grad = torch.randn(p.shape, generator=g).to(DEVICE)
        if p.grad is not None:
            p.grad.copy_(grad)  # in place: flat buffers keep their grad views
        else:
            p.grad = grad.clone()
        r.grad = grad.clone()


def assert_matches(opt, ours, ref_opt, ref):
    for p, r in zip(ours, ref):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=RTOL, atol=ATOL)
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                opt.state[p][name], ref_opt.state[r][name], rtol=RTOL, atol=ATOL
            )


def snapshot(opt, params):
    return (
        [p.detach().clone() for p in params],
        {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params if p in opt.state},
    )


def assert_unchanged(opt, params, before):
    values, state = before
    for p, v in zip(params, values):
        assert torch.equal(p.detach(), v)
    assert {id(p) for p in params if opt.state.get(p)} == set(state)
    for p in params:
        for k, v in state.get(id(p), {}).items():
            assert torch.equal(opt.state[p][k], v), k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flat", FLAT)
@pytest.mark.parametrize("what", ["param data", "state dicts"])
def test_two_params_swapping_data_or_state(backend, flat, what):
    """Flat re-adoption used to copy slot by slot, so the second param read a slot the first
    copy had just overwritten: both ended with one param's values."""
    ours, ref, ref_opt = pair()
    opt = fp16_triton.Adam(ours, lr=0.1, backend=backend, flat_buffers=flat)
    for step in range(3):
        set_grads(ours, ref, step)
        if step == 1:
            if what == "param data":
                for a, b in (ours, ref):
                    a.data, b.data = b.data, a.data
            else:
                for o, (a, b) in ((opt, ours), (ref_opt, ref)):
                    o.state[a], o.state[b] = o.state[b], o.state[a]
        opt.step()
        ref_opt.step()
    assert_matches(opt, ours, ref_opt, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flat_state_view_whose_memory_is_replaced(backend):
    """``state[p]["exp_avg"].data = t`` on a flat state view: torch steps ``t``; the flat
    bucket notices (its state buffer loses a reference) and refills the slot from ``t``."""
    ours, ref, ref_opt = pair(n=3)
    opt = fp16_triton.Adam(ours, lr=0.1, backend=backend, flat_buffers=True)
    for step in range(3):
        set_grads(ours, ref, step)
        if step == 2:
            for o, p in ((opt, ours[1]), (ref_opt, ref[1])):
                o.state[p]["exp_avg"].data = torch.full((8,), 0.25, device=DEVICE)
        opt.step()
        ref_opt.step()
    assert_matches(opt, ours, ref_opt, ref)


def test_per_tensor_triton_state_memory_replaced_is_not_freed_under_the_tables():
    """Per-tensor storage on the Triton path does not notice ``.data =`` on a state tensor
    (documented), but must not write into freed memory: the old memory stays alive with the
    bucket. The process used to crash here when the old memory was freed."""
    ours, _, _ = pair(n=2, size=4096)
    opt = fp16_triton.Adam(ours, lr=0.1, backend="triton")
    for p in ours:
        p.grad = torch.ones_like(p)
    opt.step()
    for p in ours:
        opt.state[p]["exp_avg"].data = torch.zeros(4096, device=DEVICE)
        opt.state[p]["exp_avg_sq"].set_(torch.zeros(4096, device=DEVICE))
    import gc

    gc.collect()
    opt.step()  # the kernel updates the kept memory
    assert all(torch.isfinite(p).all() for p in ours)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flat_param_in_two_groups_is_refused_before_anything_is_written(backend):
    ours, _, _ = pair(n=2)
    opt = fp16_triton.Adam([ours[0]], lr=0.1, backend=backend, flat_buffers=True)
    opt.param_groups.append(dict(opt.param_groups[0], params=[ours[0], ours[1]]))
    for p in ours:
        p.grad = torch.ones_like(p)
    before = snapshot(opt, ours)
    with pytest.raises(ValueError, match="another param group"):
        opt.step()
    assert_unchanged(opt, ours, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_state_tensor_for_two_params_is_refused(backend):
    """``state[p]["step"] = z`` for several params: torch counts it once per param; ours
    refuses, naming the state, before anything is written."""
    ours, _, _ = pair(n=2)
    opt = fp16_triton.Adam(ours, lr=0.1, backend=backend)
    for p in ours:
        p.grad = torch.ones_like(p)
    opt.step()
    shared = torch.tensor(0.0)
    for p in ours:
        opt.state[p]["step"] = shared
    before = snapshot(opt, ours)
    with pytest.raises(ValueError, match="one tensor for two params"):
        opt.step()
    assert_unchanged(opt, ours, before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flat", FLAT)
def test_param_cast_to_float64_mid_run_is_refused_then_recovers(backend, flat):
    ours, ref, ref_opt = pair(n=2)
    opt = fp16_triton.Adam(ours, lr=0.1, backend=backend, flat_buffers=flat)
    set_grads(ours, ref, 0)
    opt.step()
    ref_opt.step()
    data = ours[1].data
    ours[1].data = data.double()
    if not flat:  # a float64 grad, as a backward would make (torch.optim would step it)
        ours[1].grad = torch.ones(8, dtype=torch.float64, device=DEVICE)
    before = snapshot(opt, [ours[0]])
    with pytest.raises(TypeError, match="float64"):
        opt.step()
    assert_unchanged(opt, [ours[0]], before)
    ours[1].data = data
    if not flat:
        ours[1].grad = None  # set_grads gives it a float32 one again
    set_grads(ours, ref, 1)
    opt.step()
    ref_opt.step()
    assert_matches(opt, ours, ref_opt, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flat_param_appended_to_an_adopted_group_is_refused_before_its_state_is_made(backend):
    ours, _, _ = pair(n=3)
    opt = fp16_triton.Adam(ours[:2], lr=0.1, backend=backend, flat_buffers=True)
    for p in ours:
        p.grad = torch.ones_like(p)
    opt.step()
    opt.param_groups[0]["params"].append(ours[2])
    before = snapshot(opt, ours)
    with pytest.raises(ValueError, match="add_param_group"):
        opt.step()
    assert_unchanged(opt, ours, before)
    assert not opt.state.get(ours[2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flat", FLAT)
def test_replacing_optimizer_state_restarts_it_as_torch_does(backend, flat):
    ours, ref, ref_opt = pair(n=2)
    opt = fp16_triton.Adam(ours, lr=0.1, backend=backend, flat_buffers=flat)
    for step in range(3):
        set_grads(ours, ref, step)
        if step == 2:
            opt.state = defaultdict(dict)
            ref_opt.state = defaultdict(dict)
        opt.step()
        ref_opt.step()
    assert_matches(opt, ours, ref_opt, ref)
    assert copy.deepcopy(opt).state.version >= 0  # still a counting state after a copy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("step", [torch.tensor(3, dtype=torch.int64), 3])
def test_integer_step_counts_are_read_as_torch_reads_them(backend, step):
    """torch.optim's Adam accepts an int64 ``step`` tensor; ours reads it (as fp32) and, for
    a plain Python number (which torch's own foreach path refuses), does the same."""
    ours, ref, ref_opt = pair(n=2)
    opt = fp16_triton.Adam(ours, lr=0.1, backend=backend)
    set_grads(ours, ref, 0)
    opt.step()
    ref_opt.step()
    opt.state[ours[1]]["step"] = step
    ref_opt.state[ref[1]]["step"] = torch.tensor(3.0)
    set_grads(ours, ref, 1)
    opt.step()
    ref_opt.step()
    assert_matches(opt, ours, ref_opt, ref)
    assert opt.state[ours[1]]["step"].dtype == torch.float32


def test_a_refused_fp16_optimizer_step_is_not_counted():
    """The skip log numbers steps by ``step()`` calls; one refused before anything was
    written is no step (its number would otherwise shift every later report)."""
    ours, _, _ = pair(n=2)
    fp16 = [torch.nn.Parameter(p.detach().half()) for p in ours]
    opt = fp16_triton.FP16Optimizer(fp16_triton.Adam(fp16, lr=0.1, backend="torch"))
    for p in fp16:
        p.grad = torch.ones_like(p)
    opt.step()
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="learning rate"):
        opt.step()
    opt.param_groups[0]["lr"] = 0.1
    opt.step()
    assert opt.state_dict()["step_calls"] == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_step_refused_under_grad_scaler_leaves_no_stale_scale(backend):
    """GradScaler sets ``grad_scale``/``found_inf`` on the optimizer for one step and deletes
    them after it; a refused step used to leave them, so a later plain step() unscaled by a
    stale scale."""
    ours, ref, _ = pair(n=2)
    ref_opt = torch.optim.SGD(ref, lr=0.1)
    opt = fp16_triton.SGD(ours, lr=0.1, backend=backend)
    scaler = torch.amp.GradScaler(DEVICE, init_scale=1024.0)
    scaler.scale(torch.ones((), device=DEVICE))  # as scaler.scale(loss).backward() would
    for p in ours:
        p.grad = torch.full_like(p, 1024.0)
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="learning rate"):
        scaler.step(opt)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    opt.param_groups[0]["lr"] = 0.1
    set_grads(ours, ref, 0)
    opt.step()
    ref_opt.step()
    for p, r in zip(ours, ref):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_state_dict_hooks_run_as_on_torch_optimizers(backend):
    ours, _, _ = pair(n=1)
    opt = fp16_triton.Adam(ours, lr=0.01, backend=backend)
    calls = []

    def pre(optimizer, state_dict):
        calls.append("pre")
        state_dict = copy.deepcopy(state_dict)
        state_dict["param_groups"][0]["lr"] = 0.123
        return state_dict

    opt.register_load_state_dict_pre_hook(pre)
    opt.register_load_state_dict_post_hook(lambda optimizer: calls.append("post"))
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre", "post"] and opt.param_groups[0]["lr"] == 0.123


def test_generic_path_refuses_a_param_cast_after_its_masters_were_made():
    """Around a torch optimizer, FP16Optimizer makes the fp32 masters once; a param cast later
    is refused before anything is written (it used to fail on a broadcast, after writing an
    earlier param's master)."""
    ours, _, _ = pair(n=2)
    fp16 = [torch.nn.Parameter(p.detach().half()) for p in ours]
    opt = fp16_triton.FP16Optimizer(torch.optim.AdamW(fp16, lr=0.1))
    for p in fp16:
        p.grad = torch.ones_like(p)
    opt.step()
    masters = [m.detach().clone() for _, m in opt._masters]
    fp16[1].data = fp16[1].data.float()
    fp16[1].grad = torch.ones_like(fp16[1])
    with pytest.raises(TypeError, match="param 1 was torch.float16"):
        opt.step()
    assert all(torch.equal(m, before) for (_, m), before in zip(opt._masters, masters))
    assert opt.state_dict()["step_calls"] == 1


def test_fp16_optimizer_state_and_param_groups_can_be_assigned_as_torchs():
    ours, _, _ = pair(n=1)
    opt = fp16_triton.FP16Optimizer(fp16_triton.AdamW(ours, lr=0.1, backend="torch"))
    ours[0].grad = torch.ones_like(ours[0])
    opt.step()
    opt.state = defaultdict(dict)
    assert not opt.optimizer.state
    groups = opt.param_groups
    opt.param_groups = list(groups)
    assert opt.optimizer.param_groups == groups
