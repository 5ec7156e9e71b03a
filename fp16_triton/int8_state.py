"""int8 moments as optimizer state (``state_dtype="int8"``): codes with the param's layout plus
one fp32 scale per block of 256 elements of memory (``kernels/quantize.py``), and the
conversions to and from float moments.

State names: ``exp_avg`` and ``exp_avg_sq`` hold int8 codes, ``exp_avg_scale`` and
``exp_avg_sq_scale`` their blocks' scales (1-D, ``ceil(numel / 256)``). Params under
``quantize.SMALL`` elements keep fp32 moments and no scales. Every way a moment arrives
(created, assigned by the user, loaded from a state dict, a switch of ``state_dtype``) goes
through ``normalize``: float values are quantized, codes re-laid or dequantized, so that the
codes and scales always agree.

Sharded (FSDP2 DTensor) params: the blocks lie inside this rank's local shard, codes are a
DTensor sharded like the param and scales a plain tensor of this rank's blocks (they are no
shard of any global tensor). ``state_dict()`` therefore holds such moments dequantized, as fp32
DTensors sharded like the param (``sharded_export``): what distributed checkpoints can save and
reshard, and loading quantizes them back into the same codes and scales (quantizing a
dequantized block is exact: ``tests/test_quantize.py``), so a resume on as many ranks is bitwise
(on another number of ranks the blocks move: quantized anew).
"""

from __future__ import annotations

from typing import Any

import torch

from .buckets import like_param, local
from .kernels import quantize

__all__ = [
    "SCALES",
    "SCALE_NAMES",
    "normalize",
    "check",
    "new_moments",
    "to_float",
    "sharded_export",
]

SCALES = {"exp_avg": "exp_avg_scale", "exp_avg_sq": "exp_avg_sq_scale"}
"""Each int8 moment's scale state."""
SCALE_NAMES = tuple(SCALES.values())
_ROOT = {"exp_avg": False, "exp_avg_sq": True}  # exp_avg_sq keeps sqrt(v)


def blocks(p: torch.Tensor) -> int:
    return quantize.blocks_of(local(p))


def new_moments(p: torch.Tensor) -> dict[str, torch.Tensor]:
    """Zero int8 moments for ``p`` (codes 0 with scales 0 are 0)."""
    shard = local(p)
    state = {}
    for name, scale in SCALES.items():
        state[name] = like_param(torch.zeros_like(shard, dtype=torch.int8), p)
        state[scale] = quantize.scales_for(shard)
    return state


def to_float(codes: torch.Tensor, scales: torch.Tensor, name: str) -> torch.Tensor:
    """fp32 values of moment ``name`` from its codes and scales, laid out like the codes."""
    return quantize.dequantize_tensor(codes, scales, _ROOT[name])


def normalize(p: torch.Tensor, state: dict[str, Any], dtype_of) -> None:
    """Bring the moments that are or must become int8 to ``dtype_of(name)``: float values
    quantized into new codes and scales, codes not laid out like ``p`` re-laid, codes into a
    float moment dequantized; scales without int8 codes dropped. Writes only what changes."""
    shard = local(p)
    for name, scale_name in SCALES.items():
        value, target = state.get(name), dtype_of(name)
        if not isinstance(value, torch.Tensor):
            continue
        value = local(value)
        if value.dtype == torch.int8:
            scales = local(state[scale_name])
            if target == torch.int8:
                moved = value.device != shard.device or scales.device != shard.device
                relaid = value.numel() > 1 and value.stride() != shard.stride()
                if not (moved or relaid):
                    continue
                values = to_float(value, scales, name).to(shard.device)
            else:
                state[name] = like_param(
                    torch.empty_like(shard, dtype=target).copy_(to_float(value, scales, name)), p
                )
                del state[scale_name]
                continue
        elif target == torch.int8:
            values = value.float()
        else:
            if scale_name in state:
                del state[scale_name]
            continue
        codes = torch.zeros_like(shard, dtype=torch.int8)
        scales = quantize.scales_for(shard)
        quantize.quantize_tensor_(codes, scales, values, _ROOT[name])
        state[name], state[scale_name] = like_param(codes, p), scales


def sharded_export(p: torch.Tensor, state: dict[str, Any]) -> None:
    """In a state dict's entry for ``p`` (a copy): a sharded param's int8 moments as fp32
    DTensors sharded like it, their scales dropped (see the module docstring)."""
    if local(p) is p:
        return
    for name, scale_name in SCALES.items():
        value = state.get(name)
        if isinstance(value, torch.Tensor) and value.dtype == torch.int8:
            state[name] = like_param(to_float(local(value), state.pop(scale_name), name), p)


def check(p: torch.Tensor, name: str, value: torch.Tensor, state: dict, describe) -> bool:
    """Raise unless an int8 moment or a scale of ``p``'s state is well formed; True when
    ``name`` was one (the caller's float checks do not apply to it)."""
    if name in SCALE_NAMES:
        if value.dtype != torch.float32 or value.dim() != 1 or value.numel() != blocks(p):
            raise ValueError(
                f"state {name!r} of {describe(p)} must be a 1-D float32 tensor of {blocks(p)} "
                f"block scales (one per {quantize.BLOCK} elements), got {value.dtype} of "
                f"shape {tuple(value.shape)}"
            )
        return True
    if name in SCALES and value.dtype == torch.int8:
        if state.get(SCALES[name]) is None:
            raise ValueError(
                f"state {name!r} of {describe(p)} holds int8 codes without "
                f"{SCALES[name]!r}, their block scales; set both, or assign float values"
            )
        return False  # the shape check still applies
    return False
