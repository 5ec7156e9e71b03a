"""Comparisons shared by the tests: hyperparameters and state compared by value, copies of
hyperparameters, snapshots of what a refused call must leave as it was (test_user_changes.py,
test_stateful.py), and the recursive bitwise comparison of weights and states."""

from __future__ import annotations

import pytest
import torch


def assert_bitwise(actual, expected, where: str = "value") -> None:
    """Equal dtype, shape and bytes (so -0.0 != 0.0 and NaN == NaN), recursively through
    dicts, lists and tuples; other values compared with ``==``."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), where
        assert actual.dtype == expected.dtype, f"{where}: {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{where}: {actual.shape} != {expected.shape}"
        a = actual.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        e = expected.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        if not torch.equal(a, e):
            diff = (actual.detach().double() - expected.detach().double()).abs().max().item()
            raise AssertionError(f"{where}: not bitwise equal (max abs diff {diff})")
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), (
            f"{where}: keys {sorted(actual, key=str)} != {sorted(expected, key=str)}"
        )
        for key in expected:
            assert_bitwise(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_bitwise(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


@pytest.fixture(autouse=True)
def one_thread():
    """One CPU thread for every test of a module that imports this fixture (it is autouse):
    reductions and timings do not depend on the machine's core count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def clone_value(v):
    if isinstance(v, torch.Tensor):
        return v.clone()
    if isinstance(v, (tuple, list)):
        return type(v)(clone_value(x) for x in v)
    return v


def same_value(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return a == b


def same_state_value(key, a, b) -> bool:
    """State compared by value: a call may bring a user's tensor to fp32 and its param's
    layout (or ``step`` to one element) without changing anything the user can see."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return same_value(a, b)
    if key != "step" and a.shape != b.shape:
        return False
    return a.numel() == b.numel() and torch.equal(a.double().reshape(-1), b.double().reshape(-1))


def snapshot(opt, params):
    """Everything a refused call must leave as it was (values, not tensor identities)."""

    def tensors(d):
        return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in d.items()}

    return {
        "params": [p.detach().clone() for p in params],
        "grads": [None if p.grad is None else p.grad.detach().clone() for p in params],
        "state": [tensors(opt.state.get(p, {})) for p in params],
        "groups": [
            (
                [id(p) for p in g["params"]],
                {k: clone_value(v) for k, v in g.items() if k != "params"},
            )
            for g in opt.param_groups
        ],
    }


def master_rounded(master: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The low-precision param the optimizers keep beside an fp32 master, from the definition:
    fp16 to nearest-even (torch's cast); bf16 to the nearer in float64 of the two bf16 numbers
    around the master (its bits cut to 16, and the next one away from zero), away from zero on
    a tie (``kernels/remainder.py`` says why). Non-finite masters: torch's cast."""
    if dtype != torch.bfloat16:
        return master.to(dtype)
    x = master.detach().float().cpu().contiguous()
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    low = (bits >> 16) & 0xFFFF
    as_bf16 = lambda b: torch.where(b >= 0x8000, b - 0x10000, b).to(torch.int16).view(dtype)  # noqa: E731
    lo, hi = as_bf16(low), as_bf16((low + 1) & 0xFFFF)  # hi: one step away from zero
    d_lo, d_hi = (lo.double() - x.double()).abs(), (hi.double() - x.double()).abs()
    out = torch.where(d_hi <= d_lo, hi, lo)
    out = torch.where(x.isfinite() & hi.isfinite(), out, x.to(dtype))
    big = x.isfinite() & ~hi.isfinite()  # the next bf16 away from zero is infinite
    out = torch.where(big & (d_hi <= d_lo), hi, out)
    return out.to(master.device)
