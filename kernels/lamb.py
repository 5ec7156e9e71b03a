"""Fused mixed-precision LAMB step: two launches per tensor group, fp32 math throughout.

Per tensor, with ``g`` the grad in fp32 and ``p`` the fp32 master (the param itself when the
param is fp32); DeepSpeed FusedLamb's LAMB (You et al. 2019, "Large Batch Optimization for Deep
Learning"; deepspeedai/DeepSpeed: csrc/lamb/fused_lamb_cuda_kernel.cu), with the loss-scale
division and the clip coefficient folded in as in ``adam``::

    g = g / grad_scale ; g = g * min(1, max_norm / (sqrt(norm_sq) + 1e-6))
    m = beta1 * m + (1 - beta1) * g ;  v = beta2 * v + (1 - beta2) * g * g
    update = m / (sqrt(v) + eps) + weight_decay * p      # eps_inside_sqrt: m / sqrt(v + eps)
    coeff = clamp(||p|| / ||update||, max=max_coeff), then clamp(min=min_coeff); 1 if a norm is 0
    step_size = lr * sqrt(1 - beta2**t) / (1 - beta1**t)  (lr without bias correction)
    p = p - (step_size * coeff) * update
    param = round_to_nearest(p)             # with a master (bf16: ties away, remainder.py)

The trust ratio needs two norms over the whole tensor before any element may move, so a step is
two launches, whatever the number of tensors:

1. ``_lamb_norms_kernel``: each program updates and stores ``m`` and ``v`` of its chunk, and
   writes its partial sums of ``p**2`` and ``update**2``. The program that arrives last for its
   tensor (an int32 arrival counter per tensor, ``tl.atomic_add``) sums that tensor's partials
   in a fixed order into the tensor's two squared norms, resets the counter for the next step
   and advances the step count. No float atomics: their order would change from run to run,
   and a resumed run must give the same bits as one that never stopped.
2. ``_lamb_update_kernel``: each program reloads ``p``, ``m`` and ``v``, recomputes the update
   (launch 1's operations on launch 1's inputs: its bits, unless a GPU compiler contracts a
   multiply-add in one kernel and not the other), reads its tensor's
   norms and step count and writes the master and the param; the tensor's first program
   records the coefficient (``get_lamb_coeffs``).

Recomputing the update costs the bytes of storing it and reading it back, without a
param-sized scratch. Zero-size tensors have no program: their step counts advance through
``common.increment_steps`` (one more launch, only when the group holds one).

Bytes per element (fp16 param and grad, fp32 master/exp_avg/exp_avg_sq): launch 1 reads g 2 +
param 2 + master 4 + m 4 + v 4 = 16, writes m 4 + v 4 = 8; launch 2 reads param 2 + master 4 + m
4 + v 4 = 14, writes master 4 + param 2 = 6: **44 bytes** (Adam's single pass: 30). fp32 params:
40. Per program, 8 bytes of partial sums; per tensor, a few words (counter, norms, coefficient,
step count). A skipped step (``found_inf`` non-zero) writes nothing of the caller's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl

from .adam import bias_correction as one_minus_power
from .common import (
    TORCH_TO_TRITON,
    _increment_steps_kernel,
    block_offsets,
    increment_steps,
    load_grad_and_weight,
    load_weight,
    program_chunk,
    store_weight,
    tensor_ptr,
    unscale_and_clip_factors,
)
from .launch_config import launch_config
from .multi_tensor import (
    TableCache,
    check_step_inputs,
    device_guard,
    learning_rate,
    master_mode,
    tables_for,
)

__all__ = ["lamb_step", "prepare_lamb_step"]


@triton.jit
def _update(m, v, p, eps, weight_decay, EPS_INSIDE_SQRT: tl.constexpr):
    """The Adam-like direction plus the decay, in IEEE arithmetic (both launches call this, so
    the update whose norm launch 1 takes is the one launch 2 applies)."""
    if EPS_INSIDE_SQRT:
        denom = tl.sqrt_rn(v + eps)
    else:
        denom = tl.sqrt_rn(v) + eps
    return tl.div_rn(m, denom) + weight_decay * p


@triton.jit
def _lamb_norms_kernel(
    param_ptrs,  # int64 [T]: params, read only here
    grad_ptrs,  # int64 [T]: grads, read only
    master_ptrs,  # int64 [T]: fp32 master weights (read if HAS_MASTER)
    exp_avg_ptrs,  # int64 [T]: fp32 first moments, written
    exp_avg_sq_ptrs,  # int64 [T]: fp32 second moments, written
    step_ptrs,  # int64 [T]: fp32 one-element step counts, advanced by the last program
    numels,  # int64 [T]: elements in each tensor
    chunk_map,  # int64 [2, P]: tensor index and first element of each program's chunk
    n_programs,  # P, the row stride of chunk_map and partials
    grad_scale_ptr,  # fp32 scalar: grads are divided by it (if HAS_GRAD_SCALE)
    found_inf_ptr,  # fp32 scalar: non-zero means skip, write nothing (if HAS_FOUND_INF)
    norm_sq_ptr,  # fp32 scalar: squared global norm of the unscaled grads (if HAS_CLIP)
    partials,  # fp32 [2, P]: each program's sums of p**2 and update**2
    counters,  # int32 [T]: programs arrived per tensor; 0 between steps
    norms,  # fp32 [2, T]: squared norms of the weights and updates, per tensor
    n_tensors,  # T, the row stride of norms
    max_norm,  # fp32: clipping threshold (if HAS_CLIP)
    beta1,  # fp32: first-moment decay
    beta2,  # fp32: second-moment decay
    one_minus_beta1,  # fp32: 1 - beta1, computed on the host
    one_minus_beta2,  # fp32: 1 - beta2, computed on the host
    eps,  # fp32: added to the denominator
    weight_decay,  # fp32: added to the update as weight_decay * p
    PARAM_DTYPE: tl.constexpr,  # element type of the params
    GRAD_DTYPE: tl.constexpr,  # element type of the grads
    HAS_MASTER: tl.constexpr,  # 0: none, 1: fp32 masters, 2: int16 remainders (bf16 params)
    EPS_INSIDE_SQRT: tl.constexpr,  # sqrt(v + eps) rather than sqrt(v) + eps
    HAS_GRAD_SCALE: tl.constexpr,  # divide grads by *grad_scale_ptr
    HAS_FOUND_INF: tl.constexpr,  # skip everything when *found_inf_ptr != 0
    HAS_CLIP: tl.constexpr,  # clip by the global norm in *norm_sq_ptr
    ALIGNED: tl.constexpr,  # every address 16-byte aligned and every size a multiple of 8
    BLOCK: tl.constexpr,  # elements per vector operation (and partials summed per vector)
    CHUNK: tl.constexpr,  # elements per program, a multiple of BLOCK
):
    """Launch 1: the moments, and each tensor's squared norms (see the module docstring)."""
    pid = tl.program_id(0)
    tensor, start, numel = program_chunk(
        chunk_map, n_programs, numels, found_inf_ptr, HAS_FOUND_INF, ALIGNED, CHUNK
    )
    live = numel > 0  # a program exists only for a non-empty tensor: 0 means skipped
    param = tensor_ptr(param_ptrs, tensor, PARAM_DTYPE, ALIGNED)
    grad = tensor_ptr(grad_ptrs, tensor, GRAD_DTYPE, ALIGNED)
    master = tensor_ptr(master_ptrs, tensor, tl.float32, ALIGNED)
    exp_avg = tensor_ptr(exp_avg_ptrs, tensor, tl.float32, ALIGNED)
    exp_avg_sq = tensor_ptr(exp_avg_sq_ptrs, tensor, tl.float32, ALIGNED)
    inv_scale, clip_coef = unscale_and_clip_factors(
        grad_scale_ptr, norm_sq_ptr, max_norm, HAS_GRAD_SCALE, HAS_CLIP
    )

    w_sq = tl.zeros([BLOCK], dtype=tl.float32)
    u_sq = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(0, CHUNK, BLOCK):
        offsets = block_offsets(start, i, BLOCK, ALIGNED)
        mask = offsets < numel
        g, p = load_grad_and_weight(
            grad, param, master, offsets, mask, inv_scale, clip_coef, GRAD_DTYPE, PARAM_DTYPE,
            HAS_MASTER, HAS_GRAD_SCALE, HAS_CLIP, False,
        )  # fmt: skip
        m = tl.load(exp_avg + offsets, mask=mask, other=0.0)
        v = tl.load(exp_avg_sq + offsets, mask=mask, other=0.0)
        m = beta1 * m + one_minus_beta1 * g
        v = beta2 * v + (one_minus_beta2 * g) * g
        tl.store(exp_avg + offsets, m, mask=mask)
        tl.store(exp_avg_sq + offsets, v, mask=mask)
        u = tl.where(mask, _update(m, v, p, eps, weight_decay, EPS_INSIDE_SQRT), 0.0)
        w_sq += p * p
        u_sq += u * u
    tl.store(partials + pid, tl.sum(w_sq, axis=0))
    tl.store(partials + n_programs + pid, tl.sum(u_sq, axis=0))

    # Every thread's partial is stored before the (release) arrival; the last program's
    # (acquire) arrival then sees every partial of its tensor. Loads bypass L1 (.cg).
    tl.debug_barrier()
    arrived = tl.atomic_add(counters + tensor, 1)
    n_chunks = tl.cdiv(tl.load(numels + tensor), CHUNK)
    if arrived == n_chunks - 1:
        first = pid - start // CHUNK  # a tensor's chunks are consecutive programs
        w_acc = tl.zeros([BLOCK], dtype=tl.float32)
        u_acc = tl.zeros([BLOCK], dtype=tl.float32)
        for k in range(0, n_chunks, BLOCK):
            index = k + tl.arange(0, BLOCK)
            valid = index < n_chunks
            w_acc += tl.load(partials + first + index, mask=valid, other=0.0, cache_modifier=".cg")
            u_acc += tl.load(
                partials + n_programs + first + index, mask=valid, other=0.0, cache_modifier=".cg"
            )
        tl.store(norms + tensor, tl.sum(w_acc, axis=0))
        tl.store(norms + n_tensors + tensor, tl.sum(u_acc, axis=0))
        tl.store(counters + tensor, 0)
        if live:
            step = tl.load(step_ptrs + tensor).to(tl.pointer_type(tl.float32))
            tl.store(step, tl.load(step) + 1.0)


@triton.jit
def _lamb_update_kernel(
    param_ptrs,  # int64 [T]: params, written (rounded from the master when there is one)
    master_ptrs,  # int64 [T]: fp32 master weights (if HAS_MASTER), written
    exp_avg_ptrs,  # int64 [T]: fp32 first moments (this step's), read only
    exp_avg_sq_ptrs,  # int64 [T]: fp32 second moments (this step's), read only
    step_ptrs,  # int64 [T]: fp32 step counts, already advanced by launch 1
    numels,  # int64 [T]: elements in each tensor
    chunk_map,  # int64 [2, P]: tensor index and first element of each program's chunk
    n_programs,  # P, the row stride of chunk_map
    found_inf_ptr,  # fp32 scalar: non-zero means skip, write nothing (if HAS_FOUND_INF)
    lr_ptr,  # fp32 scalar: the learning rate, when it is a device tensor (if LR_ON_DEVICE)
    norms,  # fp32 [2, T]: launch 1's squared norms
    coeffs,  # fp32 [T]: each tensor's trust coefficient, written by its first program
    n_tensors,  # T, the row stride of norms
    lr,  # fp32: learning rate (runtime), unless LR_ON_DEVICE
    one_minus_beta1,  # fp32: 1 - beta1, computed on the host
    one_minus_beta2,  # fp32: 1 - beta2, computed on the host
    eps,  # fp32: added to the denominator
    weight_decay,  # fp32: added to the update as weight_decay * p
    max_coeff,  # fp32: upper clamp of the trust coefficient (applied first, as DeepSpeed)
    min_coeff,  # fp32: lower clamp of the trust coefficient
    PARAM_DTYPE: tl.constexpr,  # element type of the params
    HAS_MASTER: tl.constexpr,  # 0: none, 1: fp32 masters, 2: int16 remainders (bf16 params)
    EPS_INSIDE_SQRT: tl.constexpr,  # sqrt(v + eps) rather than sqrt(v) + eps
    BIAS_CORRECTION: tl.constexpr,  # step_size = lr * sqrt(1 - beta2**t) / (1 - beta1**t)
    HAS_FOUND_INF: tl.constexpr,  # skip everything when *found_inf_ptr != 0
    LR_ON_DEVICE: tl.constexpr,  # read the learning rate from *lr_ptr (no host sync)
    ALIGNED: tl.constexpr,  # every address 16-byte aligned and every size a multiple of 8
    BLOCK: tl.constexpr,  # elements per vector operation
    CHUNK: tl.constexpr,  # elements per program, a multiple of BLOCK
):
    """Launch 2: the trust coefficient and the weight update (see the module docstring)."""
    tensor, start, numel = program_chunk(
        chunk_map, n_programs, numels, found_inf_ptr, HAS_FOUND_INF, ALIGNED, CHUNK
    )
    param = tensor_ptr(param_ptrs, tensor, PARAM_DTYPE, ALIGNED)
    master = tensor_ptr(master_ptrs, tensor, tl.float32, ALIGNED)
    exp_avg = tensor_ptr(exp_avg_ptrs, tensor, tl.float32, ALIGNED)
    exp_avg_sq = tensor_ptr(exp_avg_sq_ptrs, tensor, tl.float32, ALIGNED)
    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr)
    step_size = lr
    if BIAS_CORRECTION:
        step = tl.load(tl.load(step_ptrs + tensor).to(tl.pointer_type(tl.float32)))
        step = tl.maximum(step, 1.0)  # 0 only in a skipped step, which writes nothing
        bc1 = one_minus_power(one_minus_beta1, step)
        bc2 = one_minus_power(one_minus_beta2, step)
        step_size = (tl.cast(lr, tl.float64) * tl.sqrt(bc2) / bc1).to(tl.float32)
    w_norm = tl.sqrt_rn(tl.load(norms + tensor))
    u_norm = tl.sqrt_rn(tl.load(norms + n_tensors + tensor))
    ratio = tl.div_rn(w_norm, tl.where(u_norm != 0.0, u_norm, 1.0))  # 0/0: not taken below
    ratio = tl.maximum(tl.minimum(ratio, max_coeff), min_coeff)
    coeff = tl.where((w_norm != 0.0) & (u_norm != 0.0), ratio, 1.0)
    scale = step_size * coeff
    if (start == 0) & (numel > 0):
        tl.store(coeffs + tensor, coeff)

    for i in tl.static_range(0, CHUNK, BLOCK):
        offsets = block_offsets(start, i, BLOCK, ALIGNED)
        mask = offsets < numel
        p = load_weight(param, master, offsets, mask, PARAM_DTYPE, HAS_MASTER)
        m = tl.load(exp_avg + offsets, mask=mask, other=0.0)
        v = tl.load(exp_avg_sq + offsets, mask=mask, other=0.0)
        p = p - scale * _update(m, v, p, eps, weight_decay, EPS_INSIDE_SQRT)
        store_weight(param, master, offsets, mask, p, PARAM_DTYPE, HAS_MASTER)


def _scratch(cache: TableCache | None, tables, params, steps, device) -> tuple:
    """``(partials, counters, norms, coeffs, empty)`` for ``tables``: kept in ``cache`` while
    its tables stand (made once per rebuild: the kernel leaves every counter at 0 after each
    launch, skipped steps included), else made for this call. ``empty``: None, or the
    positions and step-count address table of the tensors without elements."""
    if cache is not None:
        kept = cache.scratch.get("lamb")
        if kept is not None and kept[0] is tables:
            return kept[1:]
    n_tensors, f32 = len(steps), torch.float32
    empty = [i for i, p in enumerate(params) if p.numel() == 0]  # at rebuilds only
    if empty:
        addresses = torch.tensor([steps[i].data_ptr() for i in empty], dtype=torch.int64)
        empty = (torch.tensor(empty, device=device), addresses.to(device))
    scratch = (
        torch.empty((2, max(tables.n_programs, 1)), dtype=f32, device=device),
        torch.zeros(n_tensors, dtype=torch.int32, device=device),
        torch.empty((2, n_tensors), dtype=f32, device=device),
        torch.full((n_tensors,), float("nan"), dtype=f32, device=device),
        empty or None,
    )
    if cache is not None:
        cache.scratch["lamb"] = (tables, *scratch)
    return scratch


def prepare_lamb_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    *,
    masters: Sequence[torch.Tensor] | None = None,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool = True,
    eps_inside_sqrt: bool = False,
    max_coeff: float = 10.0,
    min_coeff: float = 0.01,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    norm_sq: torch.Tensor | None = None,
    max_norm: float = 0.0,
    cache: TableCache | None = None,
    coeffs: torch.Tensor | None = None,
) -> Callable[[], None]:
    """Check the inputs and build the tables of a fused LAMB step (in place, no host sync);
    return the launch. Arguments as in ``kernels.adam.prepare_adam_step``, plus DeepSpeed
    FusedLamb's ``bias_correction``, ``eps_inside_sqrt``, ``max_coeff`` and ``min_coeff``;
    ``weight_decay`` is added to the update (``update + wd * p``), before the trust ratio.

    ``coeffs``: optional fp32 tensor of ``len(params)`` elements on the params' device that
    receives each tensor's trust coefficient (unwritten by a skipped step).

    Launches: two (norms, update), whatever the number of tensors; a third (step counts) only
    when some tensor has no element.
    """
    state = {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "steps": steps, "masters": masters}
    check_step_inputs(params, grads, masters, state, grad_scale, found_inf, norm_sq)
    device = params[0].device
    if coeffs is not None and not (
        (coeffs.dtype, coeffs.numel(), coeffs.device) == (torch.float32, len(params), device)
        and coeffs.is_contiguous()
    ):
        raise ValueError(
            f"coeffs must be a contiguous float32 tensor of {len(params)} elements on {device}"
        )
    config = launch_config("lamb", device)
    names = ["params", "grads", *state]
    tables = tables_for(names, [params, grads], list(state.values()), config["CHUNK"], cache)
    rows = dict(zip(names, tables.rows))
    partials, counters, norms, own_coeffs, empty = _scratch(cache, tables, params, steps, device)
    coeffs = own_coeffs if coeffs is None else coeffs
    n_tensors = len(params)
    lr_value, lr_tensor = learning_rate(lr, device)
    has_clip = norm_sq is not None and max_norm > 0
    scalar = tables.numels
    options = tables.options(config)
    common = dict(PARAM_DTYPE=TORCH_TO_TRITON[params[0].dtype], HAS_MASTER=master_mode(masters))
    common.update(EPS_INSIDE_SQRT=bool(eps_inside_sqrt), HAS_FOUND_INF=found_inf is not None)
    one_minus = (1.0 - float(beta1), 1.0 - float(beta2))
    norms_args = (
        rows["params"], rows["grads"], rows["masters"], rows["exp_avgs"], rows["exp_avg_sqs"],
        rows["steps"], *tables.chunk_args,
        grad_scale if grad_scale is not None else scalar,
        found_inf if found_inf is not None else scalar,
        norm_sq if has_clip else scalar,
        partials, counters, norms, n_tensors, float(max_norm),
        float(beta1), float(beta2), *one_minus, float(eps), float(weight_decay),
    )  # fmt: skip
    norms_flags = dict(GRAD_DTYPE=TORCH_TO_TRITON[grads[0].dtype], HAS_CLIP=has_clip, **common)
    norms_flags.update(HAS_GRAD_SCALE=grad_scale is not None, **options)
    update_args = (
        rows["params"], rows["masters"], rows["exp_avgs"], rows["exp_avg_sqs"], rows["steps"],
        *tables.chunk_args,
        found_inf if found_inf is not None else scalar,
        lr_tensor if lr_tensor is not None else scalar,
        norms, coeffs, n_tensors, lr_value, *one_minus, float(eps), float(weight_decay),
        float(max_coeff), float(min_coeff),
    )  # fmt: skip
    update_flags = dict(BIAS_CORRECTION=bool(bias_correction), **common, **options)
    update_flags.update(LR_ON_DEVICE=lr_tensor is not None)

    def launch():
        with device_guard(device):
            if tables.n_programs > 0:
                _lamb_norms_kernel[(tables.n_programs,)](*norms_args, **norms_flags)
                _lamb_update_kernel[(tables.n_programs,)](*update_args, **update_flags)
            if empty is not None:  # no program: steps advance apart, the coefficient is 1
                increment_steps(empty[1], empty[1].numel(), found_inf)
                coeffs.index_fill_(0, empty[0], 1.0)

    return launch


def lamb_step(*args, **kwargs) -> None:
    """One fused LAMB step, in place, with no host sync: ``prepare_lamb_step``'s arguments,
    checked and launched at once."""
    prepare_lamb_step(*args, **kwargs)()


def compile_variants(compile) -> dict[str, dict]:
    """The variants ``tests/gpu_compile.py`` compiles for sm_90: both kernels for fp16 and bf16
    with masters, loss scale, skip and clipping, both alignments; fp32 plain."""
    common = dict(BLOCK=1024, CHUNK=4096)
    types = {"counters": "*i32", "norms": "*fp32", "coeffs": "*fp32", "n_tensors": "i32"}
    results = {}
    variants = [(name, dtype, True, aligned) for name, dtype in (("fp16", tl.float16),
                ("bf16", tl.bfloat16)) for aligned in (False, True)]  # fmt: skip
    variants.append(("fp32", tl.float32, False, False))
    variants.append(("bf16", tl.bfloat16, 2, True))  # int16 remainders (kernels/remainder.py)
    for dtype_name, dtype, master, aligned in variants:
        kind = {2: "remainder", True: "master", False: "plain"}[master]
        suffix = f"{dtype_name}-{kind}-aligned{aligned}"
        flags = dict(PARAM_DTYPE=dtype, HAS_MASTER=master, HAS_FOUND_INF=master, ALIGNED=aligned)
        results[f"lamb-norms-{suffix}"] = compile(
            _lamb_norms_kernel,
            dict(GRAD_DTYPE=dtype, EPS_INSIDE_SQRT=not master, HAS_GRAD_SCALE=master,
                 HAS_CLIP=master, **flags, **common),
            types,
        )  # fmt: skip
        results[f"lamb-update-{suffix}"] = compile(
            _lamb_update_kernel,
            dict(EPS_INSIDE_SQRT=master, BIAS_CORRECTION=master, LR_ON_DEVICE=master, **flags,
                 **common),
            types,
        )  # fmt: skip
    results["lamb-increment-steps"] = compile(
        _increment_steps_kernel, dict(HAS_FOUND_INF=True, BLOCK=1024)
    )
    return results
