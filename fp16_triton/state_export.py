"""Export an optimizer state dict of any storage mode to torch.optim's fp32 layout.

Our compact modes keep state in other dtypes than torch.optim does (Adam's bf16 moments,
``state_dtype=torch.bfloat16``). A checkpoint meant for code that knows nothing of them (a
``torch.optim.AdamW`` over fp32 copies of the params, an analysis script) needs every state
tensor as fp32: ``to_fp32_state_dict`` makes that copy. Our own optimizers load either form.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from .int8_state import SCALE_NAMES, SCALES, to_float
from .param_state import SEED_STATE

__all__ = ["to_fp32_state_dict"]


def to_fp32_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``state_dict`` (``optimizer.state_dict()`` of any fp16_triton optimizer, or
    torch's) with every floating-point state tensor in fp32: bf16 moments widened, exactly;
    int8 moments dequantized (the values the next step would read) and their block scales
    dropped.

    ``master_param`` (the fp32 master of an fp16/bf16 param) is kept: it is the weight a fp32
    optimizer would step. Step counts stay as they are (fp32 already). ``sr_seed`` is dropped:
    torch.optim's loading would cast it to the param's dtype, and our optimizers remake it from
    the group option ``seed`` and the param's position. Group options are copied unchanged;
    torch.optim keeps options it does not know (such as ``state_dtype``) without using them.
    The input is not modified.
    """
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
        raise ValueError(
            "to_fp32_state_dict takes an optimizer state dict (optimizer.state_dict()), with the "
            "keys 'state' and 'param_groups'"
        )
    state = {index: _entry(entry) for index, entry in state_dict["state"].items()}
    groups = copy.deepcopy(state_dict["param_groups"])
    for group in groups:
        if "state_dtype" in group:
            group["state_dtype"] = torch.float32  # what the exported state now is
    return {"state": state, "param_groups": groups}


def _entry(entry: dict[str, Any]) -> dict[str, Any]:
    """One param's state in fp32: int8 moments dequantized with their block scales (which
    are dropped), every other floating tensor widened."""
    out = {}
    for name, value in entry.items():
        if name in SCALE_NAMES or name == SEED_STATE:
            continue
        scale = SCALES.get(name)
        if isinstance(value, torch.Tensor) and value.dtype == torch.int8 and scale in entry:
            out[name] = to_float(value.detach(), entry[scale].detach(), name)
        else:
            out[name] = _fp32(value)
    return out


def _fp32(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().to(torch.float32, copy=True)
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return copy.deepcopy(value)
