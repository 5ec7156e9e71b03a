"""Exact fp32 masters of bf16 params in 16 more bits: the param's bits and an int16 remainder.

A bf16 number is the high half of an fp32 number's bits. Splitting the fp32 master ``M`` (its
bits as an unsigned 32-bit integer) as::

    param     = (M + 0x8000) >> 16          # M rounded to the nearest bf16, ties away from zero
    remainder = M & 0xFFFF, as an int16     # negative exactly when the param was rounded up
    M         = ((param - (remainder < 0)) << 16) | (remainder & 0xFFFF)

keeps ``M`` exactly in 4 bytes per element, 2 of them the param the model uses anyway
(TransformerEngine's ``store_param_remainders``, Megatron's precision-aware optimizer): 2 bytes
of master state instead of 4.

Why ties away from zero and not to nearest-even: for an even param, nearest-even sends 65,537
fp32 numbers to it (both half-way points), one more than 16 bits can tell apart, so no 16-bit
remainder can be exact under it. Ties away from zero sends exactly 65,536 to every param. The
optimizers therefore round a bf16 param with an fp32 master (``master_weights=True``) the same
way, so that ``master_weights="remainder"`` is bitwise the same run. The two roundings differ
only when the master lies exactly half-way between two bf16 numbers (about one element update
in 65,536) and both are within half an ulp; fp16 params and params without masters keep
nearest-even.

NaN masters give a quiet-NaN param (the addition would otherwise carry some NaN patterns into
infinity or a sign flip); the pair still reads back as a NaN. A pair no split can produce (a
zero param with a negative remainder: the param was zeroed since the last step) reads back as
the param, so that it can never turn into a NaN.

Each piece has a Triton device function (used by ``common.load_weight`` / ``store_weight``)
and a torch reference (the CPU fallback and the tests' oracle), bit for bit the same.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["split_reference", "join_reference", "round_master_reference"]

_QUIET_NAN = 0x7FC0


@triton.jit
def round_master(x):
    """fp32 ``x`` rounded to bf16, ties away from zero (the param of a master: see above)."""
    bits = x.to(tl.uint32, bitcast=True)
    high = tl.where(x != x, 0x7FC00000, bits + 0x8000) >> 16
    return high.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def remainder_of(x):
    """The int16 remainder of fp32 ``x`` (its low 16 bits)."""
    return (x.to(tl.uint32, bitcast=True) & 0xFFFF).to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def join(param, remainder):
    """The fp32 master held by a bf16 ``param`` and its int16 ``remainder``."""
    high = param.to(tl.uint16, bitcast=True).to(tl.uint32)
    low = remainder.to(tl.uint16, bitcast=True).to(tl.uint32)
    zeroed = (high & 0x7FFF) == 0  # a zero param: a negative remainder is stale, dropped
    high = tl.where((remainder < 0) & ~zeroed, high - 1, high)
    low = tl.where((remainder < 0) & zeroed, 0, low)
    return ((high << 16) | low).to(tl.float32, bitcast=True)


def _bits(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x``'s bits as non-negative int64 (torch has no uint32 arithmetic)."""
    return x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def round_master_reference(x: torch.Tensor) -> torch.Tensor:
    """Reference of ``round_master``: fp32 ``x`` as bf16, ties away from zero."""
    high = torch.where(x.isnan(), torch.full_like(x, 0, dtype=torch.int64) + _QUIET_NAN,
                       (_bits(x) + 0x8000) >> 16)  # fmt: skip
    high = torch.where(high >= 0x8000, high - 0x10000, high)  # as int16
    return high.to(torch.int16).view(torch.bfloat16).reshape(x.shape)


def split_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``x`` as ``(bf16 param, int16 remainder)``."""
    low = _bits(x) & 0xFFFF
    low = torch.where(low >= 0x8000, low - 0x10000, low).to(torch.int16).reshape(x.shape)
    return round_master_reference(x), low


def join_reference(param: torch.Tensor, remainder: torch.Tensor) -> torch.Tensor:
    """Reference of ``join``: the fp32 master of a bf16 ``param`` and its int16 remainder."""
    high = param.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    low = remainder.contiguous().to(torch.int64) & 0xFFFF
    negative = remainder.contiguous() < 0
    zeroed = (high & 0x7FFF) == 0
    high = torch.where(negative & ~zeroed, high - 1, high)
    low = torch.where(negative & zeroed, 0, low)
    bits = (high << 16) | low
    bits = torch.where(bits >= 0x80000000, bits - 0x100000000, bits).to(torch.int32)
    return bits.view(torch.float32).reshape(param.shape)
