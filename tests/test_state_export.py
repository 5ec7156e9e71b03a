"""``fp16_triton.to_fp32_state_dict``: any storage mode's state dict as torch.optim's fp32
layout, loadable by ``torch.optim.AdamW`` over fp32 copies of the params."""

from __future__ import annotations

import pytest
import torch
from comparing import assert_bitwise
from comparing import one_thread as one_thread  # noqa: F401  (autouse: one CPU thread)

import fp16_triton


def _stepped(state_dtype, param_dtype=torch.bfloat16, steps=3):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n).to(param_dtype)) for n in (40, 7)]
    opt = fp16_triton.AdamW(params, lr=1e-2, state_dtype=state_dtype, backend="torch")
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape).to(param_dtype)
        opt.step()
    return params, opt


def test_bf16_moments_are_widened_exactly_and_the_input_is_untouched():
    _, opt = _stepped(torch.bfloat16)
    sd = opt.state_dict()
    before = {k: {n: t.clone() for n, t in s.items()} for k, s in sd["state"].items()}
    out = fp16_triton.to_fp32_state_dict(sd)
    for index, entry in out["state"].items():
        for name, value in entry.items():
            assert value.dtype == torch.float32, (index, name)
            # bf16 -> fp32 is exact: the exported value rounds back to the stored one bitwise.
            assert_bitwise(value.to(sd["state"][index][name].dtype), sd["state"][index][name], name)
            assert_bitwise(sd["state"][index][name], before[index][name], "input modified")
    assert sd["state"][0]["exp_avg"].dtype == torch.bfloat16
    assert [g["state_dtype"] for g in out["param_groups"]] == [torch.float32]


def test_torch_adamw_over_the_masters_continues_from_the_export():
    # The exported state drives torch.optim.AdamW over fp32 copies of the masters: its next
    # step is ours with fp32 moments from the same values (both start from the widened bf16
    # moments), within fp32 roundings of one step (AdamW's update, |u| <= lr, relative 2**-20).
    params, opt = _stepped(torch.bfloat16)
    masters = [torch.nn.Parameter(opt.state[p]["master_param"].clone()) for p in params]
    ref = torch.optim.AdamW(masters, lr=1e-2)
    ref.load_state_dict(fp16_triton.to_fp32_state_dict(opt.state_dict()))
    ours = fp16_triton.AdamW([torch.nn.Parameter(m.detach().clone()) for m in masters], lr=1e-2)
    ours.load_state_dict(fp16_triton.to_fp32_state_dict(opt.state_dict()))
    for m, q in zip(masters, ours.param_groups[0]["params"]):
        m.grad = torch.randn(m.shape)
        q.grad = m.grad.clone()
    ref.step()
    ours.step()
    for m, q in zip(masters, ours.param_groups[0]["params"]):
        torch.testing.assert_close(q.detach(), m.detach(), rtol=2**-20, atol=1e-2 * 2**-20)


def test_a_non_state_dict_is_refused():
    with pytest.raises(ValueError, match="takes an optimizer state dict"):
        fp16_triton.to_fp32_state_dict({"exp_avg": torch.zeros(2)})


def test_rounding_seeds_are_dropped_and_remade_alike_after_a_trip_through_torch():
    """torch.optim would load ``sr_seed`` (int64) cast to fp32, a rounded seed: the export
    drops it, and an optimizer of ours loading the state back remakes every seed from the
    saved group option ``seed`` and the param's position, the seeds it had."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n).to(torch.bfloat16)) for n in (40, 7)]
    opt = fp16_triton.AdamW(params, lr=1e-2, master_weights=False, state_dtype=torch.bfloat16,
                            stochastic_rounding=True, backend="torch")  # fmt: skip
    for p in params:
        p.grad = torch.randn(p.shape).to(torch.bfloat16)
    opt.step()
    exported = fp16_triton.to_fp32_state_dict(opt.state_dict())
    assert all("sr_seed" not in entry for entry in exported["state"].values())
    fp32 = [torch.nn.Parameter(p.detach().float()) for p in params]
    through_torch = torch.optim.AdamW(fp32, lr=1e-2)
    through_torch.load_state_dict(exported)
    torch.manual_seed(99)  # another process: another default seed, which must not matter
    again = fp16_triton.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params],
                              lr=1e-2, master_weights=False, state_dtype=torch.bfloat16,
                              stochastic_rounding=True, backend="torch")  # fmt: skip
    again.load_state_dict(through_torch.state_dict())
    again.init_state()
    for p, q in zip(params, again.param_groups[0]["params"]):
        assert_bitwise(again.state[q]["sr_seed"], opt.state[p]["sr_seed"], "seed remade")
    # A state dict that kept torch's fp32 copy of a seed is refused, naming the fix.
    bad = through_torch.state_dict()
    bad["state"][0]["sr_seed"] = torch.tensor(123.0)
    with pytest.raises(ValueError, match="delete the sr_seed entries"):
        again.load_state_dict(bad)
