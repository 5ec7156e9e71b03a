"""Fused mixed-precision SGD step (momentum, dampening, nesterov, weight decay, maximize).

Per element, ``torch.optim.SGD``'s math in fp32, with the loss-scale division and the clip
coefficient folded in as in ``adam``::

    g = g / grad_scale ; g = g * clip_coef ; g = -g if maximize
    g = g + weight_decay * p
    if momentum != 0:
        buf = g on the tensor's first step, else momentum * buf + (1 - dampening) * g
        g = g + momentum * buf if nesterov else buf
    p = p - lr * g ;  param = round_to_nearest(p) with a master (bf16: ties away, remainder.py)

The "first step" is read from the tensor's device step count (0 before its first update), so
a skipped step cannot consume it. With ``momentum == 0`` there is no buffer and no step count.
With ``sr_seeds`` a bf16 buffer and a param without a master are rounded stochastically
instead, from Philox words counted by the step count, as Adam's (``kernels/stochastic.py``:
word 0 the param, word 1 the buffer); that needs the step count, hence momentum.

Bytes per element (fp16 param and grad, fp32 master and momentum buffer): reads grad 2 +
master 4 + param 2 (is it still the master's rounding? see ``kernels/adam.py``) + buf 4 = 12,
writes master 4 + buf 4 + param 2 = 10: **22 bytes**; without momentum 14. fp32 params (their
own master), with momentum: read g, p, buf, write p, buf = 20 bytes;
fp16 params without a master, with momentum: read g 2, p 2, buf 4, write p 2, buf 4 = 14.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl

from .common import (
    TORCH_TO_TRITON,
    block_offsets,
    load_grad_and_weight,
    prepare_step,
    program_chunk,
    round_to,
    store_weight,
    tensor_ptr,
    unscale_and_clip_factors,
    widen,
)
from .multi_tensor import TableCache, rounds_stochastically
from .stochastic import random_words, stochastic_round

__all__ = ["sgd_step", "prepare_sgd_step"]


@triton.jit
def _sgd_kernel(
    param_ptrs,  # int64 [T]: params, written (rounded from the master when there is one)
    grad_ptrs,  # int64 [T]: grads, read only
    master_ptrs,  # int64 [T]: fp32 master weights (read if HAS_MASTER)
    momentum_buffer_ptrs,  # int64 [T]: momentum buffers, STATE_DTYPE (if HAS_MOMENTUM)
    step_ptrs,  # int64 [T]: fp32 one-element step counts, 0 before the first step (if HAS_MOMENTUM)
    sr_seed_ptrs,  # int64 [T]: int64 one-element seeds of stochastic rounding (if STOCHASTIC)
    numels,  # int64 [T]: elements in each tensor
    chunk_map,  # int64 [2, P]: tensor index and first element of each program's chunk
    n_programs,  # P, the row stride of chunk_map
    grad_scale_ptr,  # fp32 scalar: grads are divided by it (if HAS_GRAD_SCALE)
    found_inf_ptr,  # fp32 scalar: non-zero means skip, write nothing (if HAS_FOUND_INF)
    norm_sq_ptr,  # fp32 scalar: squared global norm of the unscaled grads (if HAS_CLIP)
    lr_ptr,  # fp32 scalar: the learning rate, when it is a device tensor (if LR_ON_DEVICE)
    max_norm,  # fp32: clipping threshold (if HAS_CLIP)
    lr,  # fp32: learning rate (runtime), unless LR_ON_DEVICE
    momentum,  # fp32: momentum factor
    one_minus_dampening,  # fp32: 1 - dampening, computed on the host
    weight_decay,  # fp32: L2 weight decay
    sr_shard,  # fp32: this rank's shard of sharded params, counting random words (STOCHASTIC)
    PARAM_DTYPE: tl.constexpr,  # element type of the params
    GRAD_DTYPE: tl.constexpr,  # element type of the grads
    STATE_DTYPE: tl.constexpr,  # element type of the buffers: fp32, or bf16 (rounded on store)
    HAS_MASTER: tl.constexpr,  # 0: none (params updated in place), 1: fp32 masters, 2: remainders
    HAS_MOMENTUM: tl.constexpr,  # momentum != 0: keep a buffer
    NESTEROV: tl.constexpr,  # Nesterov momentum
    MAXIMIZE: tl.constexpr,  # ascend rather than descend
    HAS_GRAD_SCALE: tl.constexpr,  # divide grads by *grad_scale_ptr
    HAS_FOUND_INF: tl.constexpr,  # skip everything when *found_inf_ptr != 0
    HAS_CLIP: tl.constexpr,  # clip by the global norm in *norm_sq_ptr
    LR_ON_DEVICE: tl.constexpr,  # read the learning rate from *lr_ptr (no host sync)
    STOCHASTIC: tl.constexpr,  # round a bf16 buffer and master-less params stochastically
    ALIGNED: tl.constexpr,  # every address 16-byte aligned and every size a multiple of 8
    BLOCK: tl.constexpr,  # elements per vector operation
    CHUNK: tl.constexpr,  # elements per program, a multiple of BLOCK
):
    """One SGD update of one chunk of one tensor (see the module docstring).

    Bytes per element, fp16 param and grad with fp32 master and buffer: read 2 + 4 + 2 + 4,
    write 4 + 4 + 2 = 22 (14 without momentum; fp32 params 20; fp16 without master 14)."""
    tensor, start, numel = program_chunk(
        chunk_map, n_programs, numels, found_inf_ptr, HAS_FOUND_INF, ALIGNED, CHUNK
    )
    param = tensor_ptr(param_ptrs, tensor, PARAM_DTYPE, ALIGNED)
    grad = tensor_ptr(grad_ptrs, tensor, GRAD_DTYPE, ALIGNED)
    master = tensor_ptr(master_ptrs, tensor, tl.float32, ALIGNED)
    buf_ptr = tensor_ptr(momentum_buffer_ptrs, tensor, STATE_DTYPE, ALIGNED)
    first_step = False
    step = 0.0
    if HAS_MOMENTUM:
        step = tl.load(tl.load(step_ptrs + tensor).to(tl.pointer_type(tl.float32)))
        first_step = step == 0
    seed = 0
    if STOCHASTIC:
        seed = tl.load(tl.load(sr_seed_ptrs + tensor).to(tl.pointer_type(tl.int64)))
    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr)
    inv_scale, clip_coef = unscale_and_clip_factors(
        grad_scale_ptr, norm_sq_ptr, max_norm, HAS_GRAD_SCALE, HAS_CLIP
    )

    for i in tl.static_range(0, CHUNK, BLOCK):
        offsets = block_offsets(start, i, BLOCK, ALIGNED)
        mask = offsets < numel
        g, p = load_grad_and_weight(
            grad, param, master, offsets, mask, inv_scale, clip_coef, GRAD_DTYPE, PARAM_DTYPE,
            HAS_MASTER, HAS_GRAD_SCALE, HAS_CLIP, MAXIMIZE,
        )  # fmt: skip
        g = g + weight_decay * p
        if STOCHASTIC:
            r_param, r_buf, _, _ = random_words(seed, step + 1.0, offsets, sr_shard)
        if HAS_MOMENTUM:
            buf = widen(tl.load(buf_ptr + offsets, mask=mask, other=0.0), STATE_DTYPE)
            buf = tl.where(first_step, g, buf * momentum + one_minus_dampening * g)
            if STOCHASTIC:
                tl.store(buf_ptr + offsets, stochastic_round(buf, r_buf, STATE_DTYPE), mask=mask)
            else:
                tl.store(buf_ptr + offsets, round_to(buf, STATE_DTYPE), mask=mask)
            if NESTEROV:
                g = g + momentum * buf
            else:
                g = buf
        p = p - lr * g
        if STOCHASTIC and not HAS_MASTER:
            tl.store(param + offsets, stochastic_round(p, r_param, PARAM_DTYPE), mask=mask)
        else:
            store_weight(param, master, offsets, mask, p, PARAM_DTYPE, HAS_MASTER)


COMPACT_STATE = ("momentum_buffers",)
"""The state list an SGD step may keep in bf16 (``state_dtype``)."""


def sgd_state(params, masters, momentum, momentum_buffers, steps, sr_seeds) -> dict:
    """The state lists an SGD step reads, by name (None: not read), after the checks that
    depend on the options; the reference (``kernels/reference.py``) checks the same lists."""
    has_momentum = momentum != 0
    if has_momentum and (momentum_buffers is None or steps is None):
        raise ValueError("momentum != 0 needs momentum_buffers and steps")
    state = {"masters": masters}
    state["momentum_buffers"] = momentum_buffers if has_momentum else None
    state["steps"] = steps if has_momentum else None
    stochastic = rounds_stochastically(sr_seeds, params, masters, state["momentum_buffers"])
    if stochastic and not has_momentum:
        raise ValueError(
            "stochastic rounding in SGD needs momentum != 0: its random words are counted by "
            "the momentum step count"
        )
    state["sr_seeds"] = sr_seeds if stochastic else None
    return state


def prepare_sgd_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor] | None,
    steps: Sequence[torch.Tensor] | None,
    *,
    masters: Sequence[torch.Tensor] | None = None,
    lr: float | torch.Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool = False,
    maximize: bool = False,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    norm_sq: torch.Tensor | None = None,
    max_norm: float = 0.0,
    sr_seeds: Sequence[torch.Tensor] | None = None,
    sr_shard: int = 0,
    cache: TableCache | None = None,
) -> Callable[[], None]:
    """Check the inputs and build the tables of a fused SGD step; return its launch (see
    ``prepare_adam_step`` for why the two are split). ``sgd_step`` does both at once.

    One fused SGD step over every tensor of a group, in place, with no host sync.

    ``momentum_buffers`` (fp32, or bf16: widened on load, rounded to nearest-even on store)
    and ``steps`` (fp32 one-element counts, 0 before a tensor's
    first step, advanced unless ``found_inf``) are required when ``momentum != 0`` and ignored
    otherwise. ``sr_seeds``: int64 one-element seeds, one per param: round a bf16 buffer and
    params without masters stochastically (needs momentum: the words are counted by the step
    count); ignored where nothing is low precision without a master. ``sr_shard`` as in
    ``adam_step``. Other arguments as in
    ``adam_step``. Launches: one, plus one for the step counts when momentum is on.
    """
    has_momentum = momentum != 0
    state = sgd_state(params, masters, momentum, momentum_buffers, steps, sr_seeds)
    buffer_dtype = momentum_buffers[0].dtype if has_momentum and momentum_buffers else None
    stochastic = state["sr_seeds"] is not None
    return prepare_step(
        _sgd_kernel, "sgd", params, grads, masters, state,
        rows=("params", "grads", "masters", "momentum_buffers", "steps", "sr_seeds"),
        hyperparameters=(float(momentum), 1.0 - float(dampening), float(weight_decay),
                         float(sr_shard)),
        flags=dict(HAS_MOMENTUM=has_momentum, NESTEROV=bool(nesterov), STOCHASTIC=stochastic,
                   STATE_DTYPE=TORCH_TO_TRITON.get(buffer_dtype, tl.float32)),
        compact_state=COMPACT_STATE, count_steps=has_momentum, lr=lr, maximize=maximize,
        grad_scale=grad_scale, found_inf=found_inf, norm_sq=norm_sq, max_norm=max_norm,
        cache=cache,
    )  # fmt: skip


def sgd_step(*args, **kwargs) -> None:
    """One fused SGD step, in place, with no host sync: ``prepare_sgd_step``'s arguments,
    checked and launched at once."""
    prepare_sgd_step(*args, **kwargs)()


def compile_variants(compile) -> dict[str, dict]:
    """The variants ``tests/gpu_compile.py`` compiles for sm_90 (see ``adam.compile_variants``):
    fp16 with masters, momentum and Nesterov, both alignments, fp32 and bf16 buffers; bf16
    without masters with a bf16 buffer, rounded stochastically."""
    results = {}
    for aligned in (False, True):
        for state_name, state_dtype in (("", tl.float32), ("-bf16-state", tl.bfloat16)):
            results[f"sgd-fp16-momentum{state_name}-aligned{aligned}"] = compile(
                _sgd_kernel,
                dict(
                    PARAM_DTYPE=tl.float16, GRAD_DTYPE=tl.float16, STATE_DTYPE=state_dtype,
                    HAS_MASTER=True, HAS_MOMENTUM=True, NESTEROV=True, MAXIMIZE=False,
                    HAS_GRAD_SCALE=True, HAS_FOUND_INF=True, HAS_CLIP=True, LR_ON_DEVICE=True,
                    STOCHASTIC=False, ALIGNED=aligned, BLOCK=1024, CHUNK=4096,
                ),
            )  # fmt: skip
        # Stochastic rounding of a bf16 buffer and of bf16 params without masters.
        results[f"sgd-bf16-nomaster-bf16-state-stochastic-aligned{aligned}"] = compile(
            _sgd_kernel,
            dict(
                PARAM_DTYPE=tl.bfloat16, GRAD_DTYPE=tl.bfloat16, STATE_DTYPE=tl.bfloat16,
                HAS_MASTER=False, HAS_MOMENTUM=True, NESTEROV=False, MAXIMIZE=False,
                HAS_GRAD_SCALE=True, HAS_FOUND_INF=True, HAS_CLIP=False, LR_ON_DEVICE=False,
                STOCHASTIC=True, ALIGNED=aligned, BLOCK=1024, CHUNK=4096,
            ),
        )  # fmt: skip
        # bf16 params with int16 remainders of their masters (kernels/remainder.py).
        results[f"sgd-bf16-remainder-momentum-aligned{aligned}"] = compile(
            _sgd_kernel,
            dict(
                PARAM_DTYPE=tl.bfloat16, GRAD_DTYPE=tl.bfloat16, STATE_DTYPE=tl.float32,
                HAS_MASTER=2, HAS_MOMENTUM=True, NESTEROV=False, MAXIMIZE=False,
                HAS_GRAD_SCALE=True, HAS_FOUND_INF=True, HAS_CLIP=True, LR_ON_DEVICE=False,
                STOCHASTIC=False, ALIGNED=aligned, BLOCK=1024, CHUNK=4096,
            ),
        )  # fmt: skip
    return results
