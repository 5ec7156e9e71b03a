"""Fused mixed-precision Muon step: two Triton launches per tensor group around the
Newton–Schulz iterations, which run as torch matmuls batched per matrix shape.

Per element, with ``g`` the grad in fp32 and ``p`` the fp32 master (the param itself when the
param is fp32); this is ``torch.optim.Muon`` (torch/optim/_muon.py of torch 2.9+) with the
loss-scale division and the clip coefficient folded in::

    pass 1 (momentum):  g = g / grad_scale ; g = g * clip_coef
                        buf = lerp(buf, g, 1 - momentum)
                        u = lerp(g, buf, momentum) if nesterov else buf
                        update = bf16(u)                     # torch's NS starts with .bfloat16()
    Newton–Schulz:      update = NS_(a,b,c),k(update; eps)   # per matrix, in bf16, as torch
    pass 2 (weights):   p = p * (1 - lr * weight_decay)
                        p = p - lr * ratio * update          # ratio: torch's _adjust_lr
                        param = round_to_nearest(p)          # a low-precision param's master

``lerp`` is torch's (the branch on the weight keeps it exact at 0 and 1). The update buffers
(bf16, one per matrix, laid out as one ``[k, A, B]`` tensor per shape so that the iterations
run batched) are kept in the launch cache between steps. If ``found_inf`` is non-zero the two
passes write nothing; the iterations still run (on the last step's buffers: deciding to skip
them would read the flag on the host).

Bytes per element (fp16 param and grad, fp32 master and momentum), the Triton passes only:
pass 1 reads grad 2 + buf 4, writes buf 4 + update 2; pass 2 reads master 4 + param 2 +
update 2, writes master 4 + param 2: **26 bytes**, plus the iterations' matmul traffic
(``fp16_triton/muon.py``'s spec). Kept: param 2 + grad 2 + master 4 + buf 4 + update 2 = 14.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl

from .common import (
    TORCH_TO_TRITON,
    block_offsets,
    load_grad_and_weight,
    program_chunk,
    round_to,
    store_weight,
    tensor_ptr,
    unscale_and_clip_factors,
    widen,
)
from .launch_config import launch_config
from .multi_tensor import (
    TableCache,
    check_step_inputs,
    device_guard,
    learning_rate,
    master_mode,
    sub_cache,
    tables_for,
)

__all__ = [
    "muon_step",
    "prepare_muon_step",
    "newton_schulz_",
    "batched_newton_schulz_",
    "matrix_newton_schulz_",
    "lr_ratio",
]


@triton.jit
def _muon_momentum_kernel(
    grad_ptrs,  # int64 [T]: grads, read only
    buf_ptrs,  # int64 [T]: fp32 momentum buffers
    update_ptrs,  # int64 [T]: bf16 update buffers, written
    numels,  # int64 [T]: elements in each tensor
    chunk_map,  # int64 [2, P]: tensor index and first element of each program's chunk
    n_programs,  # P, the row stride of chunk_map
    grad_scale_ptr,  # fp32 scalar: grads are divided by it (if HAS_GRAD_SCALE)
    found_inf_ptr,  # fp32 scalar: non-zero means skip, write nothing (if HAS_FOUND_INF)
    norm_sq_ptr,  # fp32 scalar: squared global norm of the unscaled grads (if HAS_CLIP)
    max_norm,  # fp32: clipping threshold (if HAS_CLIP)
    momentum,  # fp32: the momentum (Nesterov's lerp weight)
    one_minus_momentum,  # fp32: 1 - momentum (the buffer's lerp weight), from the host
    minus_momentum,  # fp32: (1 - momentum) - 1 as torch's lerp computes it, from the host
    momentum_minus_one,  # fp32: momentum - 1 as torch's lerp computes it, from the host
    GRAD_DTYPE: tl.constexpr,  # element type of the grads
    NESTEROV: tl.constexpr,  # Nesterov's look-ahead
    HAS_GRAD_SCALE: tl.constexpr,  # divide grads by *grad_scale_ptr
    HAS_FOUND_INF: tl.constexpr,  # skip everything when *found_inf_ptr != 0
    HAS_CLIP: tl.constexpr,  # clip by the global norm in *norm_sq_ptr
    ALIGNED: tl.constexpr,  # every address 16-byte aligned and every size a multiple of 8
    BLOCK: tl.constexpr,  # elements per vector operation
    CHUNK: tl.constexpr,  # elements per program, a multiple of BLOCK
):
    """Momentum and Nesterov update of one chunk, written as the bf16 input of the
    Newton–Schulz iterations (see the module docstring)."""
    tensor, start, numel = program_chunk(
        chunk_map, n_programs, numels, found_inf_ptr, HAS_FOUND_INF, ALIGNED, CHUNK
    )
    grad = tensor_ptr(grad_ptrs, tensor, GRAD_DTYPE, ALIGNED)
    buf = tensor_ptr(buf_ptrs, tensor, tl.float32, ALIGNED)
    update = tensor_ptr(update_ptrs, tensor, tl.bfloat16, ALIGNED)
    inv_scale, clip_coef = unscale_and_clip_factors(
        grad_scale_ptr, norm_sq_ptr, max_norm, HAS_GRAD_SCALE, HAS_CLIP
    )
    for i in tl.static_range(0, CHUNK, BLOCK):
        offsets = block_offsets(start, i, BLOCK, ALIGNED)
        mask = offsets < numel
        g = widen(tl.load(grad + offsets, mask=mask, other=0.0), GRAD_DTYPE)
        if HAS_GRAD_SCALE:  # two multiplications, as load_grad_and_weight (torch's order)
            g = g * inv_scale
        if HAS_CLIP:
            g = g * clip_coef
        b = tl.load(buf + offsets, mask=mask, other=0.0)
        b = _lerp(b, g, one_minus_momentum, minus_momentum)
        tl.store(buf + offsets, b, mask=mask)
        u = b
        if NESTEROV:
            u = _lerp(g, b, momentum, momentum_minus_one)
        tl.store(update + offsets, round_to(u, tl.bfloat16), mask=mask)


@triton.jit
def _lerp(start, end, weight, weight_minus_one):
    """torch's ``lerp`` as its CPU (vectorized) and CUDA kernels compute it, one fused
    multiply-add: ``start + weight * (end - start)`` for a weight under 0.5, else
    ``end + (weight - 1) * (end - start)`` (exact at weights 0 and 1). ``weight - 1`` comes
    from the host, computed in fp32 as torch's kernels do (the interpreter would compute it in
    fp64). The same roundings as torch matter here: the result is rounded to bf16 for the
    iterations, which spread a flipped rounding over the whole matrix."""
    diff = end - start
    return tl.where(weight < 0.5, tl.fma(weight, diff, start), tl.fma(weight_minus_one, diff, end))


@triton.jit
def _muon_weight_kernel(
    param_ptrs,  # int64 [T]: params, written (rounded from the master when there is one)
    master_ptrs,  # int64 [T]: fp32 master weights (if HAS_MASTER)
    update_ptrs,  # int64 [T]: bf16 orthogonalized updates, read only
    lr_ratios,  # fp64 [T]: each tensor's learning-rate factor (torch's _adjust_lr)
    numels,  # int64 [T]: elements in each tensor
    chunk_map,  # int64 [2, P]: tensor index and first element of each program's chunk
    n_programs,  # P, the row stride of chunk_map
    found_inf_ptr,  # fp32 scalar: non-zero means skip, write nothing (if HAS_FOUND_INF)
    lr_ptr,  # fp32 scalar: the learning rate, when it is a device tensor (if LR_ON_DEVICE)
    lr,  # fp32: learning rate (runtime), unless LR_ON_DEVICE
    lr_low,  # fp32: what lr lost in its rounding to fp32 (lr + lr_low is the host's fp64 lr)
    weight_decay,  # fp32: decoupled weight decay
    PARAM_DTYPE: tl.constexpr,  # element type of the params
    HAS_MASTER: tl.constexpr,  # 0: none, 1: fp32 masters, 2: int16 remainders (bf16 params)
    HAS_FOUND_INF: tl.constexpr,  # skip everything when *found_inf_ptr != 0
    LR_ON_DEVICE: tl.constexpr,  # read the learning rate from *lr_ptr (no host sync)
    ALIGNED: tl.constexpr,  # every address 16-byte aligned and every size a multiple of 8
    BLOCK: tl.constexpr,  # elements per vector operation
    CHUNK: tl.constexpr,  # elements per program, a multiple of BLOCK
):
    """Decay and orthogonalized update of one chunk of one matrix (see the module docstring)."""
    tensor, start, numel = program_chunk(
        chunk_map, n_programs, numels, found_inf_ptr, HAS_FOUND_INF, ALIGNED, CHUNK
    )
    param = tensor_ptr(param_ptrs, tensor, PARAM_DTYPE, ALIGNED)
    master = tensor_ptr(master_ptrs, tensor, tl.float32, ALIGNED)
    update = tensor_ptr(update_ptrs, tensor, tl.bfloat16, ALIGNED)
    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr)
    lr64 = tl.cast(lr, tl.float64) + tl.cast(lr_low, tl.float64)
    # torch computes both factors in Python floats (fp64), then rounds them to fp32.
    decay = (1.0 - lr64 * tl.cast(weight_decay, tl.float64)).to(tl.float32)
    step_size = (lr64 * tl.load(lr_ratios + tensor)).to(tl.float32)
    for i in tl.static_range(0, CHUNK, BLOCK):
        offsets = block_offsets(start, i, BLOCK, ALIGNED)
        mask = offsets < numel
        u, p = load_grad_and_weight(
            update, param, master, offsets, mask, 1.0, 1.0, tl.bfloat16, PARAM_DTYPE,
            HAS_MASTER, False, False, False,
        )  # fmt: skip
        # torch's mul_, then add_(update, alpha=-step_size): one fused multiply-add on its
        # CPU (vectorized) and CUDA kernels.
        p = tl.fma(u, -step_size, p * decay)
        store_weight(param, master, offsets, mask, p, PARAM_DTYPE, HAS_MASTER)


# --------------------------------------------------------------------------- Newton–Schulz
def lr_ratio(shape: Sequence[int], adjust_lr_fn: str | None) -> float:
    """torch.optim.Muon's learning-rate factor of a matrix of ``shape`` (``_adjust_lr``):
    ``sqrt(max(1, A / B))`` ("original", the default) or ``0.2 * sqrt(max(A, B))``
    ("match_rms_adamw", Moonshot's, to reuse AdamW's learning rate)."""
    a, b = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, a / b))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(a, b))
    return 1.0


def newton_schulz_(
    x: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float
) -> None:
    """Orthogonalize each matrix of the bf16 batch ``x`` (``[k, A, B]``) in place, as
    torch.optim.Muon's ``_zeropower_via_newtonschulz`` does one matrix: scaled by its Frobenius
    norm (at least ``eps``), transposed so that the Gram matrix is the smaller one, then
    ``steps`` quintic iterations ``X = a X + (b G + c G G) X`` with ``G = X X^T``.

    On a GPU the batch runs as one (``baddbmm``): ``k`` matrices take the launches of one.
    Elsewhere each matrix runs torch's own 2-D ops, bit for bit torch's: CPU bf16 ``baddbmm``
    does not round as ``addmm`` does (one bf16 rounding apart now and then, which the
    iterations spread over the matrix), and batching on a CPU saves little but for tiny
    matrices (``python -m bench.newton_schulz``)."""
    if x.device.type == "cuda":
        batched_newton_schulz_(x, coefficients, steps, eps)
    else:
        for matrix in x:
            matrix_newton_schulz_(matrix, coefficients, steps, eps)


def matrix_newton_schulz_(matrix: torch.Tensor, coefficients, steps: int, eps: float) -> None:
    """torch.optim.Muon's iterations on one bf16 matrix, its ops in its order, in place."""
    a, b, c = coefficients
    y = matrix if matrix.shape[0] <= matrix.shape[1] else matrix.T
    wide = y
    y.div_(y.norm().clamp(min=eps))
    for _ in range(steps):
        gram = y @ y.T
        gram_update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        y = torch.addmm(y, gram_update, y, beta=a)
    wide.copy_(y)


def batched_newton_schulz_(x: torch.Tensor, coefficients, steps: int, eps: float) -> None:
    """The iterations on every matrix of ``x`` at once (one launch per op for the batch)."""
    a, b, c = coefficients
    wide = x if x.shape[-2] <= x.shape[-1] else x.mT
    # On a contiguous copy of the wide orientation: the same matmuls whatever the params'
    # layout (a transposed param's buffer is laid out as the param).
    y = wide.contiguous()
    y.div_(y.norm(dim=(-2, -1), keepdim=True).clamp(min=eps))
    for _ in range(steps):
        gram = y @ y.mT
        gram_update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        y = torch.baddbmm(y, gram_update, y, beta=a)
    wide.copy_(y)


def _kept(cache: TableCache | None, kind: str, key: tuple, make: Callable[[], object]):
    """``make()``, kept in ``cache`` under ``(kind, key)`` until ``key`` changes (the previous
    entry of ``kind`` is dropped), so that steady steps reuse it."""
    if cache is None:
        return make()
    if (kind, key) not in cache.scratch:
        cache.scratch = {k: v for k, v in cache.scratch.items() if k[0] != kind}
        cache.scratch[(kind, key)] = make()
    return cache.scratch[(kind, key)]


def _state_cache(cache: TableCache | None, name: str) -> TableCache | None:
    """The tables cache of one pass: its state lists are re-read whenever the owner's are
    (``TableCache.state_version``)."""
    sub = sub_cache(cache, (name,))
    if sub is not None:
        sub.state_version = cache.state_version
    return sub


def _update_buffers(layouts: tuple, device: torch.device):
    """``(per-matrix views, per-layout batches)`` of bf16 update buffers for matrices of
    ``layouts`` (``(shape, strides)``): one ``[k, A, B]`` batch per distinct layout, so that
    the iterations can run batched, each view with its param's strides (the kernels pair
    elements by memory position)."""
    by_layout: dict[tuple, list[int]] = {}
    for i, layout in enumerate(layouts):
        by_layout.setdefault(layout, []).append(i)
    views: list[torch.Tensor] = [None] * len(layouts)  # type: ignore[list-item]
    batches = []
    for ((rows, cols), (row_stride, col_stride)), indices in by_layout.items():
        size = rows * cols
        flat = torch.zeros(len(indices) * size, dtype=torch.bfloat16, device=device)
        batch = flat.as_strided((len(indices), rows, cols), (size, row_stride, col_stride))
        batches.append(batch)
        for j, i in enumerate(indices):
            views[i] = batch[j]
    return views, batches


def _lr_ratios(shapes: tuple, adjust_lr_fn: str | None, device: torch.device) -> torch.Tensor:
    ratios = [lr_ratio(shape, adjust_lr_fn) for shape in shapes]
    return torch.tensor(ratios, dtype=torch.float64).to(device, non_blocking=True)


def check_matrices(params: Sequence[torch.Tensor]) -> None:
    """torch.optim.Muon's rule: every param a 2-D matrix (its Newton–Schulz needs one)."""
    for p in params:
        if p.ndim != 2:
            raise ValueError(
                f"Muon only supports 2D parameters whereas we found a parameter with size: "
                f"{p.size()}"
            )


# ------------------------------------------------------------------------------ launcher
def prepare_muon_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    *,
    masters: Sequence[torch.Tensor] | None = None,
    lr: float | torch.Tensor,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    ns_coefficients: tuple[float, float, float],
    eps: float,
    ns_steps: int,
    adjust_lr_fn: str | None = None,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    norm_sq: torch.Tensor | None = None,
    max_norm: float = 0.0,
    cache: TableCache | None = None,
) -> Callable[[], None]:
    """Check the inputs and build the tables of a fused Muon step over 2-D params (in place,
    no host sync); return the launch. ``momentum_buffers`` are fp32; other arguments as
    ``torch.optim.Muon``'s and ``kernels.adam.prepare_adam_step``'s.

    Launches: the momentum pass, then per distinct matrix shape the iterations' torch ops
    (a norm, a division and three matmuls per iteration, batched over the matrices of that
    shape), then the weight pass: constant in the number of matrices of each shape.
    """
    check_matrices(params)
    state = {"momentum_buffers": momentum_buffers, "masters": masters}
    check_step_inputs(params, grads, masters, state, grad_scale, found_inf, norm_sq)
    if ns_steps >= 100:  # torch's limits, checked before anything is written
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if len(ns_coefficients) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")
    device = params[0].device
    config = launch_config("muon", device)
    shapes = tuple(tuple(p.shape) for p in params)
    layouts = tuple((s, p.stride()) for s, p in zip(shapes, params))
    updates, batches = _kept(
        cache, "muon-updates", (layouts, device), lambda: _update_buffers(layouts, device)
    )
    ratios = _kept(
        cache, "muon-ratios", (shapes, adjust_lr_fn, device),
        lambda: _lr_ratios(shapes, adjust_lr_fn, device),
    )  # fmt: skip
    # The update buffers are compared address by address, as params and grads: a new layout
    # replaces them, and the tables must follow.
    first = tables_for(
        ["grads", "updates", "momentum_buffers"], [grads, updates], [momentum_buffers],
        config["CHUNK"], _state_cache(cache, "momentum"),
    )  # fmt: skip
    second = tables_for(
        ["params", "updates", "masters"], [params, updates], [masters],
        config["CHUNK"], _state_cache(cache, "weights"),
    )  # fmt: skip
    grad_row, update_row, buf_row = first.rows
    param_row, update_row_2, master_row = second.rows
    has_clip = norm_sq is not None and max_norm > 0
    lr_value, lr_tensor = learning_rate(lr, device)
    lr_high = _fp32(lr_value)
    momentum_32, one_minus_momentum_32 = _fp32(momentum), _fp32(1.0 - float(momentum))
    scalar = first.numels
    flags = dict(HAS_FOUND_INF=found_inf is not None)
    momentum_args = (
        grad_row, buf_row, update_row, *first.chunk_args,
        grad_scale if grad_scale is not None else scalar,
        found_inf if found_inf is not None else scalar,
        norm_sq if has_clip else scalar,
        float(max_norm), momentum_32, one_minus_momentum_32,
        _fp32(one_minus_momentum_32 - 1.0), _fp32(momentum_32 - 1.0),
    )  # fmt: skip
    momentum_kwargs = dict(
        GRAD_DTYPE=TORCH_TO_TRITON[grads[0].dtype], NESTEROV=bool(nesterov),
        HAS_GRAD_SCALE=grad_scale is not None, HAS_CLIP=has_clip, **flags,
        **first.options(config),
    )  # fmt: skip
    weight_args = (
        param_row, master_row, update_row_2, ratios, *second.chunk_args,
        found_inf if found_inf is not None else scalar,
        lr_tensor if lr_tensor is not None else scalar,
        lr_high, lr_value - lr_high, float(weight_decay),
    )  # fmt: skip
    weight_kwargs = dict(
        PARAM_DTYPE=TORCH_TO_TRITON[params[0].dtype], HAS_MASTER=master_mode(masters),
        LR_ON_DEVICE=lr_tensor is not None, **flags, **second.options(config),
    )  # fmt: skip
    coefficients = tuple(float(c) for c in ns_coefficients)

    def launch():
        with device_guard(device):
            _muon_momentum_kernel[(first.n_programs,)](*momentum_args, **momentum_kwargs)
            for batch in batches:
                newton_schulz_(batch, coefficients, int(ns_steps), float(eps))
            _muon_weight_kernel[(second.n_programs,)](*weight_args, **weight_kwargs)

    return launch


def _fp32(x: float) -> float:
    """``x`` rounded to fp32 (to nearest even), as a Python float."""
    return struct.unpack("f", struct.pack("f", float(x)))[0]


def muon_step(*args, **kwargs) -> None:
    """One fused Muon step, in place, with no host sync: ``prepare_muon_step``'s arguments,
    checked and launched at once."""
    prepare_muon_step(*args, **kwargs)()


def compile_variants(compile) -> dict[str, dict]:
    """The variants ``tests/gpu_compile.py`` compiles for sm_90: both passes for fp16 and bf16
    with masters, loss scale, skip and clipping, both alignments; fp32 plain."""
    common = dict(BLOCK=1024, CHUNK=4096)
    types = {"update_ptrs": "*i64", "lr_ratios": "*fp64"}
    results = {}
    for dtype_name, dtype in (("fp16", tl.float16), ("bf16", tl.bfloat16), ("fp32", tl.float32)):
        low = dtype_name != "fp32"
        for aligned in (False, True) if low else (False,):
            name = f"muon-{dtype_name}-aligned{aligned}"
            results[f"{name}-momentum"] = compile(
                _muon_momentum_kernel,
                dict(GRAD_DTYPE=dtype, NESTEROV=low, HAS_GRAD_SCALE=low, HAS_FOUND_INF=low,
                     HAS_CLIP=low, ALIGNED=aligned, **common),
                types,
            )  # fmt: skip
            results[f"{name}-weights"] = compile(
                _muon_weight_kernel,
                dict(PARAM_DTYPE=dtype, HAS_MASTER=low, HAS_FOUND_INF=low, LR_ON_DEVICE=low,
                     ALIGNED=aligned, **common),
                types,
            )  # fmt: skip
    results["muon-bf16-remainder-weights"] = compile(  # int16 remainders (kernels/remainder.py)
        _muon_weight_kernel,
        dict(PARAM_DTYPE=tl.bfloat16, HAS_MASTER=2, HAS_FOUND_INF=True, LR_ON_DEVICE=True,
             ALIGNED=True, **common),
        types,
    )  # fmt: skip
    return results
