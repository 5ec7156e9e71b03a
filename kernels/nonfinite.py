"""Non-finite detection, global gradient norm, and in-place unscale of scaled gradients.

Two kernels over pointer tables (see ``multi_tensor``), one launch per grad dtype:

* ``nonfinite_check_and_norm``: read-only. Finds inf/-inf/nan in the grads and, optionally,
  the sum of squares of the *unscaled* grads (``grad / grad_scale``) for clipping. Each program
  writes one partial sum and one flag; a single ``torch.sum`` over the partials gives both
  results (deterministic, unlike atomics, so a resumed run clips bit for bit the same).
* ``unscale_and_check_``: in place, ``torch._amp_foreach_non_finite_check_and_unscale_``'s job
  (grads *= inv_scale, found_inf = 1 on any non-finite input) for fp16, bf16 and fp32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl

from .common import (
    TORCH_TO_TRITON,
    block_offsets,
    program_chunk,
    round_to,
    tensor_ptr,
    unscale_and_clip_factors,
    widen,
)
from .launch_config import launch_config
from .multi_tensor import TableCache, check_scalar, device_guard, is_aligned, sub_cache, tables_for

__all__ = ["nonfinite_check_and_norm", "check_and_norm_grouped", "unscale_and_check_"]


@triton.jit
def load_and_flag(grad, offsets, mask, bad, GRAD_DTYPE: tl.constexpr):
    """A block of grads in fp32, with ``bad`` raised to 1.0 where one is NaN or infinite."""
    g = widen(tl.load(grad + offsets, mask=mask, other=0.0), GRAD_DTYPE)
    return g, tl.maximum(bad, tl.where((g != g) | (tl.abs(g) == float("inf")), 1.0, 0.0))


@triton.jit
def _nonfinite_check_kernel(
    grad_ptrs,  # int64 [T]: address of each grad tensor
    numels,  # int64 [T]: elements in each tensor
    chunk_map,  # int64 [2, P]: tensor index and first element of each program's chunk
    n_programs,  # P, the row stride of chunk_map
    grad_scale_ptr,  # fp32 scalar: the norm is of grad / grad_scale (read if HAS_GRAD_SCALE)
    partials,  # fp32 [2, partial_stride]: row 0 sum of squares, row 1 non-finite flag
    partial_stride,  # columns of partials (programs of every launch that shares it)
    partial_offset,  # first column of this launch in partials
    GRAD_DTYPE: tl.constexpr,  # element type of the grads
    HAS_GRAD_SCALE: tl.constexpr,  # divide by *grad_scale before squaring
    COMPUTE_NORM: tl.constexpr,  # accumulate the sum of squares (else only the flag)
    ALIGNED: tl.constexpr,  # every address 16-byte aligned and every size a multiple of 8
    BLOCK: tl.constexpr,  # elements per vector operation
    CHUNK: tl.constexpr,  # elements per program, a multiple of BLOCK
):
    """Bytes per element: reads the grad once (2 for fp16/bf16, 4 for fp32), writes nothing
    per element (8 bytes per program of partials)."""
    pid = tl.program_id(0)
    tensor, start, numel = program_chunk(
        chunk_map, n_programs, numels, partials, False, ALIGNED, CHUNK
    )
    grad = tensor_ptr(grad_ptrs, tensor, GRAD_DTYPE, ALIGNED)
    inv_scale, _ = unscale_and_clip_factors(grad_scale_ptr, partials, 0.0, HAS_GRAD_SCALE, False)
    sum_sq = tl.zeros([BLOCK], dtype=tl.float32)
    bad = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(0, CHUNK, BLOCK):
        offsets = block_offsets(start, i, BLOCK, ALIGNED)
        mask = offsets < numel
        g, bad = load_and_flag(grad, offsets, mask, bad, GRAD_DTYPE)
        if COMPUTE_NORM:
            g = g * inv_scale
            sum_sq += g * g
    tl.store(partials + partial_offset + pid, tl.sum(sum_sq, axis=0))
    tl.store(partials + partial_stride + partial_offset + pid, tl.max(bad, axis=0))


@triton.jit
def _unscale_kernel(
    grad_ptrs,  # int64 [T]: address of each grad tensor (updated in place)
    numels,  # int64 [T]: elements in each tensor
    chunk_map,  # int64 [2, P]: tensor index and first element of each program's chunk
    n_programs,  # P, the row stride of chunk_map
    inv_scale_ptr,  # fp32 scalar: grads are multiplied by it
    found_inf_ptr,  # fp32 scalar: set to 1.0 when any input element is non-finite
    GRAD_DTYPE: tl.constexpr,  # element type of the grads
    ALIGNED: tl.constexpr,  # every address 16-byte aligned and every size a multiple of 8
    BLOCK: tl.constexpr,  # elements per vector operation
    CHUNK: tl.constexpr,  # elements per program, a multiple of BLOCK
):
    """Bytes per element: reads and writes the grad (4 for fp16/bf16, 8 for fp32)."""
    tensor, start, numel = program_chunk(
        chunk_map, n_programs, numels, found_inf_ptr, False, ALIGNED, CHUNK
    )
    grad = tensor_ptr(grad_ptrs, tensor, GRAD_DTYPE, ALIGNED)
    inv_scale = tl.load(inv_scale_ptr)
    bad = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(0, CHUNK, BLOCK):
        offsets = block_offsets(start, i, BLOCK, ALIGNED)
        mask = offsets < numel
        g, bad = load_and_flag(grad, offsets, mask, bad, GRAD_DTYPE)
        tl.store(grad + offsets, round_to(g * inv_scale, GRAD_DTYPE), mask=mask)
    if tl.max(bad, axis=0) > 0:
        # Every writer stores the same value, so concurrent stores need no atomics.
        tl.store(found_inf_ptr, 1.0)


def _group_by_dtype(tensors: Sequence[torch.Tensor]) -> dict[tuple, list[torch.Tensor]]:
    """Tensors by (dtype, aligned): one launch each, and a tensor of odd size or address does
    not take the 128-bit loads away from the others."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise ValueError(f"grads must all be on one device: {t.device} and {device}")
        if t.dtype not in TORCH_TO_TRITON:
            raise TypeError(
                f"grads must be float16, bfloat16 or float32, got {t.dtype}; "
                "the kernels do not handle other dtypes"
            )
        groups.setdefault((t.dtype, is_aligned(t)), []).append(t)
    return groups


def nonfinite_check_and_norm(
    grads: Sequence[torch.Tensor],
    *,
    grad_scale: torch.Tensor | None = None,
    compute_norm: bool = True,
    out: torch.Tensor | None = None,
    cache: TableCache | None = None,
) -> torch.Tensor:
    """Find non-finite grads and the squared global norm of ``grads / grad_scale``, read-only.

    Args:
        grads: dense fp16/bf16/fp32 tensors (any layout: ``multi_tensor.is_dense``) on one
            device (dtypes may be mixed).
        grad_scale: optional one-element fp32 device tensor (the loss scale); the norm is of the
            unscaled grads, so a large scale cannot overflow the sum of squares.
        compute_norm: accumulate the sum of squares; when False ``result[0]`` is 0.
        out: optional fp32 tensor of 2 elements to write into (no allocation).
        cache: optional ``TableCache`` kept by the caller to reuse tables between calls.

    Returns:
        fp32 tensor ``[sum of squares, non-finite count]`` on the grads' device. The count is
        the number of programs (CHUNK-element chunks) holding an inf or nan: non-zero iff any
        element is non-finite
        (the same convention as ``GradScaler``'s summed ``found_inf``). Nothing is synced.
    """
    if len(grads) == 0:
        raise ValueError("nonfinite_check_and_norm needs at least one tensor")
    return check_and_norm_grouped(
        _group_by_dtype(grads),
        grad_scale=grad_scale,
        compute_norm=compute_norm,
        out=out,
        cache=cache,
    )


def check_and_norm_grouped(
    groups: dict[Any, Sequence[torch.Tensor]],
    *,
    grad_scale: torch.Tensor | None = None,
    compute_norm: bool = True,
    out: torch.Tensor | None = None,
    cache: TableCache | None = None,
) -> torch.Tensor:
    """``nonfinite_check_and_norm`` over grads already grouped by the caller: each value of
    ``groups`` is a list of one dtype on one device (an optimizer's buckets), launched as one
    kernel; keys name the groups' table caches. Saves a per-step pass over every grad."""
    # Lists stay the caller's objects: a TensorList carries addresses read once this step.
    groups = {key: tensors for key, tensors in groups.items() if len(tensors)}
    if not groups:
        raise ValueError("nonfinite_check_and_norm needs at least one tensor")
    device = next(iter(groups.values()))[0].device
    for tensors in groups.values():
        if tensors[0].device != device:
            raise ValueError(f"grads must all be on one device: {tensors[0].device} and {device}")
    if grad_scale is not None:
        check_scalar("grad_scale", grad_scale, device)
    if out is None:
        out = torch.empty(2, dtype=torch.float32, device=device)
    config = launch_config("nonfinite_check", device)
    launches = []
    total = 0
    for key, tensors in groups.items():
        cache_ = sub_cache(cache, ("check", *key) if isinstance(key, tuple) else ("check", key))
        tables = tables_for(["grads"], [tensors], [], config["CHUNK"], cache_)
        launches.append((tensors[0].dtype, tables, total))
        total += tables.n_programs
    if total == 0:  # only zero-size tensors
        return out.zero_()
    partials = _scratch(cache, "check_partials", (2, total), device)
    with device_guard(device):
        for dtype, tables, offset in launches:
            if tables.n_programs == 0:
                continue
            _nonfinite_check_kernel[(tables.n_programs,)](
                tables.rows[0],
                *tables.chunk_args,
                grad_scale if grad_scale is not None else partials,
                partials,
                total,
                offset,
                GRAD_DTYPE=TORCH_TO_TRITON[dtype],
                HAS_GRAD_SCALE=grad_scale is not None,
                COMPUTE_NORM=compute_norm,
                **tables.options(config),
            )
    torch.sum(partials, dim=1, out=out)
    return out


def unscale_and_check_(
    grads: Sequence[torch.Tensor],
    found_inf: torch.Tensor,
    inv_scale: torch.Tensor,
    *,
    cache: TableCache | None = None,
) -> None:
    """Multiply ``grads`` in place by ``inv_scale`` and set ``found_inf`` to 1.0 on any non-finite.

    The job of ``torch._amp_foreach_non_finite_check_and_unscale_`` (same argument order), for
    fp16, bf16 and fp32 grads alike. The check is on the input values; ``found_inf`` is only
    ever set, never cleared (zero it first). Low-precision grads are rounded to nearest-even.
    """
    if len(grads) == 0:
        return
    device = grads[0].device
    check_scalar("found_inf", found_inf, device)
    check_scalar("inv_scale", inv_scale, device)
    config = launch_config("unscale", device)
    # Tables (and their checks) for every dtype group before any launch: a bad tensor in a
    # later group must not leave an earlier group unscaled.
    launches = []
    for (dtype, aligned), tensors in _group_by_dtype(grads).items():
        cache_ = sub_cache(cache, ("unscale", dtype, aligned))
        launches.append((dtype, tables_for(["grads"], [tensors], [], config["CHUNK"], cache_)))
    with device_guard(device):
        for dtype, tables in launches:
            if tables.n_programs == 0:
                continue
            _unscale_kernel[(tables.n_programs,)](
                tables.rows[0],
                *tables.chunk_args,
                inv_scale,
                found_inf,
                GRAD_DTYPE=TORCH_TO_TRITON[dtype],
                **tables.options(config),
            )


def _scratch(cache: TableCache | None, name: str, shape, device) -> torch.Tensor:
    """A workspace tensor, kept in ``cache`` so steady steps allocate nothing."""
    if cache is None:
        return torch.empty(shape, dtype=torch.float32, device=device)
    buf = cache.scratch.get(name)
    if buf is None or tuple(buf.shape) != tuple(shape) or buf.device != device:
        buf = torch.empty(shape, dtype=torch.float32, device=device)
        cache.scratch[name] = buf
    return buf


def compile_variants(compile) -> dict[str, dict]:
    """The variants ``tests/gpu_compile.py`` compiles for sm_90 (see ``adam.compile_variants``)."""
    common = {"BLOCK": 1024, "CHUNK": 4096}
    results = {}
    for aligned in (False, True):
        results[f"check-fp16-aligned{aligned}"] = compile(
            _nonfinite_check_kernel,
            dict(GRAD_DTYPE=tl.float16, HAS_GRAD_SCALE=True, COMPUTE_NORM=True, ALIGNED=aligned,
                 **common),
        )  # fmt: skip
        results[f"unscale-bf16-aligned{aligned}"] = compile(
            _unscale_kernel, dict(GRAD_DTYPE=tl.bfloat16, ALIGNED=aligned, **common)
        )
    return results
