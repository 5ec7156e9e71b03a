"""Multi-tensor cast-copy: ``dst.copy_(src)`` for lists of tensors of different float dtypes.

The copies of mixed-precision bookkeeping: model grads into fp32 master grads (an exact
upcast) and fp32 masters back into fp16/bf16 params (round to nearest-even, bit for bit what
``torch.Tensor.to`` gives, inf beyond the format's range, NaN kept NaN). torch's
``_foreach_copy_`` does the same work with one launch per ~30-110 tensors; here every
(source dtype, destination dtype) pair is one launch over pointer tables (``multi_tensor``).

Bytes per element: read the source, write the destination (fp16 -> fp32: 2 + 4 = 6;
fp32 -> fp16/bf16: 4 + 2 = 6; fp32 -> fp32: 8).

The pure-torch reference (the CPU path and the tests' oracle) is
``kernels/reference.py: cast_copy_``: it imports no Triton.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .common import TORCH_TO_TRITON, block_offsets, program_chunk, round_to, tensor_ptr, widen
from .launch_config import launch_config
from .multi_tensor import TableCache, device_guard, is_aligned, sub_cache, tables_for

__all__ = ["cast_copy_", "prepare_cast_copy"]


@triton.jit
def _cast_copy_kernel(
    src_ptrs,  # int64 [T]: address of each source tensor, read only
    dst_ptrs,  # int64 [T]: address of each destination tensor, written
    numels,  # int64 [T]: elements in each tensor
    chunk_map,  # int64 [2, P]: tensor index and first element of each program's chunk
    n_programs,  # P, the row stride of chunk_map
    SRC_DTYPE: tl.constexpr,  # element type of the sources
    DST_DTYPE: tl.constexpr,  # element type of the destinations
    ALIGNED: tl.constexpr,  # every address 16-byte aligned and every size a multiple of 8
    BLOCK: tl.constexpr,  # elements per vector operation
    CHUNK: tl.constexpr,  # elements per program, a multiple of BLOCK
):
    """Bytes per element: read the source (2 or 4), write the destination (2 or 4).

    Every value passes through fp32, which holds fp16 and bf16 exactly, so a widening is
    exact and a narrowing rounds once (``round_to``: nearest-even on GPUs and in the
    interpreter alike)."""
    tensor, start, numel = program_chunk(
        chunk_map, n_programs, numels, numels, False, ALIGNED, CHUNK
    )
    src = tensor_ptr(src_ptrs, tensor, SRC_DTYPE, ALIGNED)
    dst = tensor_ptr(dst_ptrs, tensor, DST_DTYPE, ALIGNED)
    for i in tl.static_range(0, CHUNK, BLOCK):
        offsets = block_offsets(start, i, BLOCK, ALIGNED)
        mask = offsets < numel
        x = widen(tl.load(src + offsets, mask=mask, other=0.0), SRC_DTYPE)
        tl.store(dst + offsets, round_to(x, DST_DTYPE), mask=mask)


def _groups(dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor]) -> dict:
    """Pairs by (source dtype, destination dtype, aligned): one launch each."""
    if len(dsts) != len(srcs):
        raise ValueError(f"{len(srcs)} sources for {len(dsts)} destinations")
    groups: dict[tuple, tuple[list, list]] = {}
    for i, (d, s) in enumerate(zip(dsts, srcs)):
        if d.dtype not in TORCH_TO_TRITON or s.dtype not in TORCH_TO_TRITON:
            raise TypeError(
                f"pair {i}: cast_copy_ handles float16, bfloat16 and float32, got {s.dtype} -> "
                f"{d.dtype}"
            )
        key = (s.dtype, d.dtype, is_aligned(d) and is_aligned(s))
        group = groups.setdefault(key, ([], []))
        group[0].append(d)
        group[1].append(s)
    return groups


def prepare_cast_copy(
    dsts: Sequence[torch.Tensor],
    srcs: Sequence[torch.Tensor],
    *,
    cache: TableCache | None = None,
):
    """Check the pairs and build their tables; return the launch (nothing is written before
    every pair has passed its checks). ``cast_copy_`` does both at once.

    Each ``dsts[k]`` receives ``srcs[k]``: same number of elements, same strides (any dense
    layout: ``multi_tensor.is_dense``), fp16/bf16/fp32 in any combination, one device.
    """
    if len(dsts) == 0 and len(srcs) == 0:
        return lambda: None
    device = dsts[0].device
    config = launch_config("cast_copy", device)
    launches = []
    for (src_dtype, dst_dtype, aligned), (d, s) in _groups(dsts, srcs).items():
        sub = sub_cache(cache, ("cast_copy", src_dtype, dst_dtype, aligned))
        tables = tables_for(["dsts", "srcs"], [d, s], [], config["CHUNK"], sub)
        if d[0].device != device:  # within a group the table checks compare devices
            raise ValueError(f"cast_copy_ needs one device: {d[0].device} and {device}")
        if tables.n_programs > 0:
            launches.append((src_dtype, dst_dtype, tables))

    def launch():
        with device_guard(device):
            for src_dtype, dst_dtype, tables in launches:
                _cast_copy_kernel[(tables.n_programs,)](
                    tables.rows[1],
                    tables.rows[0],
                    *tables.chunk_args,
                    SRC_DTYPE=TORCH_TO_TRITON[src_dtype],
                    DST_DTYPE=TORCH_TO_TRITON[dst_dtype],
                    **tables.options(config),
                )

    return launch


def cast_copy_(
    dsts: Sequence[torch.Tensor],
    srcs: Sequence[torch.Tensor],
    *,
    cache: TableCache | None = None,
) -> None:
    """``dsts[k].copy_(srcs[k])`` for every k, one launch per dtype pair, no host sync
    (argument order of ``torch._foreach_copy_``)."""
    prepare_cast_copy(dsts, srcs, cache=cache)()


def compile_variants(compile) -> dict[str, dict]:
    """The variants ``tests/gpu_compile.py`` compiles for sm_90: the dtype pairs the masters
    use (grads up to fp32, masters down to fp16/bf16), both alignments."""
    types = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}
    results = {}
    for src, dst in (("fp16", "fp32"), ("bf16", "fp32"), ("fp32", "fp16"), ("fp32", "bf16")):
        for aligned in (False, True):
            results[f"cast-copy-{src}-to-{dst}-aligned{aligned}"] = compile(
                _cast_copy_kernel,
                dict(SRC_DTYPE=types[src], DST_DTYPE=types[dst], ALIGNED=aligned, BLOCK=1024,
                     CHUNK=4096),
            )  # fmt: skip
    return results
