"""Comparisons shared by the tests of what users change between steps (test_user_changes.py,
test_stateful.py): hyperparameters and state compared by value, copies of hyperparameters, and
snapshots of what a refused call must leave as it was."""

from __future__ import annotations

import torch


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
