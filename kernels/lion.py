"""Fused mixed-precision Lion step: one launch per tensor group, fp32 math throughout.

Per element, with ``g`` the grad in fp32 and ``p`` the fp32 master (the param itself when the
param is fp32); Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms",
Algorithm 2) with decoupled weight decay, the loss-scale division and the clip coefficient
folded in as in ``adam``::

    g = g / grad_scale ; g = g * clip_coef ; g = -g if maximize
    c = beta1 * m + (1 - beta1) * g
    p = p * (1 - lr * weight_decay) - lr * sign(c)      # sign(0) = 0
    m = beta2 * m + (1 - beta2) * g
    param = round_to_nearest(p)             # with a master (bf16: ties away, remainder.py)

``sign(0) = 0`` as in the paper and in ``torch.sign``: an element whose interpolation is
exactly zero does not move (DeepSpeed's FusedLion moves it by ``+lr``). Lion has no bias
correction and no step count, except with ``sr_seeds`` (stochastic rounding of a bf16 momentum
and of params without masters, from Philox words as Adam's, ``kernels/stochastic.py``: word 0
the param, word 1 the momentum), whose words are counted by a step count kept for them. If
``found_inf`` is non-zero nothing is written.

A momentum kept in bf16 (``STATE_DTYPE``, the optimizer's ``state_dtype=torch.bfloat16``) is
widened to fp32 on load, used and updated in fp32 as above, and stored rounded to nearest-even.

Bytes per element: ``fp16_triton/lion.py``'s spec (``Algorithm.traffic``): fp16 param and
grad with an fp32 master and ``exp_avg``: read 2 + 2 + 4 + 4, write 2 + 4 + 4 = 22; with a bf16
``exp_avg``: read 2 + 2 + 4 + 2, write 2 + 4 + 2 = 18.
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

__all__ = ["lion_step", "prepare_lion_step"]


@triton.jit
def _lion_kernel(
    param_ptrs,  # int64 [T]: params, written (rounded from the master when there is one)
    grad_ptrs,  # int64 [T]: grads, read only
    master_ptrs,  # int64 [T]: fp32 master weights (read if HAS_MASTER)
    exp_avg_ptrs,  # int64 [T]: momenta (STATE_DTYPE)
    step_ptrs,  # int64 [T]: fp32 one-element counts of the random words (if STOCHASTIC)
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
    beta1,  # fp32: interpolation weight of the momentum in the update direction
    beta2,  # fp32: momentum decay
    one_minus_beta1,  # fp32: 1 - beta1, computed on the host
    one_minus_beta2,  # fp32: 1 - beta2, computed on the host
    weight_decay,  # fp32: decoupled weight decay
    sr_shard,  # fp32: this rank's shard of sharded params, counting random words (STOCHASTIC)
    PARAM_DTYPE: tl.constexpr,  # element type of the params
    GRAD_DTYPE: tl.constexpr,  # element type of the grads
    STATE_DTYPE: tl.constexpr,  # element type of the momenta: fp32, or bf16 (rounded on store)
    HAS_MASTER: tl.constexpr,  # 0: none (params updated in place), 1: fp32 masters, 2: remainders
    MAXIMIZE: tl.constexpr,  # ascend rather than descend
    HAS_GRAD_SCALE: tl.constexpr,  # divide grads by *grad_scale_ptr
    HAS_FOUND_INF: tl.constexpr,  # skip everything when *found_inf_ptr != 0
    HAS_CLIP: tl.constexpr,  # clip by the global norm in *norm_sq_ptr
    LR_ON_DEVICE: tl.constexpr,  # read the learning rate from *lr_ptr (no host sync)
    STOCHASTIC: tl.constexpr,  # round a bf16 momentum and master-less params stochastically
    ALIGNED: tl.constexpr,  # every address 16-byte aligned and every size a multiple of 8
    BLOCK: tl.constexpr,  # elements per vector operation
    CHUNK: tl.constexpr,  # elements per program, a multiple of BLOCK
):
    """One Lion update of one chunk of one tensor (see the module docstring)."""
    tensor, start, numel = program_chunk(
        chunk_map, n_programs, numels, found_inf_ptr, HAS_FOUND_INF, ALIGNED, CHUNK
    )
    param = tensor_ptr(param_ptrs, tensor, PARAM_DTYPE, ALIGNED)
    grad = tensor_ptr(grad_ptrs, tensor, GRAD_DTYPE, ALIGNED)
    master = tensor_ptr(master_ptrs, tensor, tl.float32, ALIGNED)
    exp_avg = tensor_ptr(exp_avg_ptrs, tensor, STATE_DTYPE, ALIGNED)
    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr)
    step = 0.0
    seed = 0
    if STOCHASTIC:
        step = tl.load(tl.load(step_ptrs + tensor).to(tl.pointer_type(tl.float32))) + 1.0
        seed = tl.load(tl.load(sr_seed_ptrs + tensor).to(tl.pointer_type(tl.int64)))
    decay = (1.0 - tl.cast(lr, tl.float64) * tl.cast(weight_decay, tl.float64)).to(tl.float32)
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
        m = widen(tl.load(exp_avg + offsets, mask=mask, other=0.0), STATE_DTYPE)
        c = beta1 * m + one_minus_beta1 * g
        direction = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))
        p = p * decay - lr * direction
        m = beta2 * m + one_minus_beta2 * g
        if STOCHASTIC:
            r_param, r_m, _, _ = random_words(seed, step, offsets, sr_shard)
            tl.store(exp_avg + offsets, stochastic_round(m, r_m, STATE_DTYPE), mask=mask)
        else:
            tl.store(exp_avg + offsets, round_to(m, STATE_DTYPE), mask=mask)
        if STOCHASTIC and not HAS_MASTER:
            tl.store(param + offsets, stochastic_round(p, r_param, PARAM_DTYPE), mask=mask)
        else:
            store_weight(param, master, offsets, mask, p, PARAM_DTYPE, HAS_MASTER)


COMPACT_STATE = ("exp_avgs",)
"""The state list a Lion step may keep in bf16 (``state_dtype``)."""


def lion_state(params, masters, exp_avgs, steps, sr_seeds) -> dict:
    """The state lists a Lion step reads, by name (None: not read), after the checks that
    depend on the options; the reference (``fp16_triton/lion.py``) checks the same lists."""
    stochastic = rounds_stochastically(sr_seeds, params, masters, exp_avgs)
    if stochastic and steps is None:
        raise ValueError("stochastic rounding (sr_seeds) needs steps: the words' counts")
    state = {"exp_avgs": exp_avgs, "masters": masters}
    state["steps"] = steps if stochastic else None
    state["sr_seeds"] = sr_seeds if stochastic else None
    return state


def prepare_lion_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    *,
    masters: Sequence[torch.Tensor] | None = None,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool = False,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    norm_sq: torch.Tensor | None = None,
    max_norm: float = 0.0,
    steps: Sequence[torch.Tensor] | None = None,
    sr_seeds: Sequence[torch.Tensor] | None = None,
    sr_shard: int = 0,
    cache: TableCache | None = None,
) -> Callable[[], None]:
    """Check the inputs and build the tables of a fused Lion step (in place, no host sync,
    every tensor of a group in one launch); return the launch. Arguments as in
    ``kernels.adam.prepare_adam_step``; ``exp_avgs`` are the momenta, fp32 or bf16 (widened on
    load, rounded to nearest-even on store). ``sr_seeds`` (int64 one-element seeds) with
    ``steps`` (fp32 one-element counts, advanced unless ``found_inf``): round a bf16 momentum
    and params without masters stochastically; ignored where nothing is low precision
    without a master; ``sr_shard`` as in ``adam_step``.

    Launches: one, whatever the number of tensors; two with stochastic rounding (its counts).
    """
    state = lion_state(params, masters, exp_avgs, steps, sr_seeds)
    stochastic = state["sr_seeds"] is not None
    return prepare_step(
        _lion_kernel, "lion", params, grads, masters, state,
        rows=("params", "grads", "masters", "exp_avgs", "steps", "sr_seeds"),
        hyperparameters=(float(beta1), float(beta2), 1.0 - float(beta1), 1.0 - float(beta2),
                         float(weight_decay), float(sr_shard)),
        flags=dict(STATE_DTYPE=TORCH_TO_TRITON.get(exp_avgs[0].dtype) if exp_avgs else None,
                   STOCHASTIC=stochastic),
        compact_state=COMPACT_STATE, count_steps=stochastic, lr=lr, maximize=maximize,
        grad_scale=grad_scale, found_inf=found_inf, norm_sq=norm_sq, max_norm=max_norm,
        cache=cache,
    )  # fmt: skip


def lion_step(*args, **kwargs) -> None:
    """One fused Lion step, in place, with no host sync: ``prepare_lion_step``'s arguments,
    checked and launched at once."""
    prepare_lion_step(*args, **kwargs)()


def compile_variants(compile) -> dict[str, dict]:
    """The variants ``tests/gpu_compile.py`` compiles for sm_90: fp16 and bf16 with masters,
    loss scale, skip and clipping, both alignments, fp32 and bf16 momenta; without masters
    with a bf16 momentum, rounded stochastically; fp32 plain."""
    common = dict(BLOCK=1024, CHUNK=4096)
    flags = dict(MAXIMIZE=False, HAS_GRAD_SCALE=True, HAS_FOUND_INF=True, HAS_CLIP=True)
    plain = dict(STOCHASTIC=False)
    results = {}
    for dtype_name, dtype in (("fp16", tl.float16), ("bf16", tl.bfloat16)):
        for aligned in (False, True):
            results[f"lion-{dtype_name}-master-aligned{aligned}"] = compile(
                _lion_kernel,
                dict(PARAM_DTYPE=dtype, GRAD_DTYPE=dtype, HAS_MASTER=True, LR_ON_DEVICE=True,
                     ALIGNED=aligned, STATE_DTYPE=tl.float32, **flags, **common, **plain),
            )  # fmt: skip
            results[f"lion-{dtype_name}-master-bf16-state-aligned{aligned}"] = compile(
                _lion_kernel,
                dict(PARAM_DTYPE=dtype, GRAD_DTYPE=dtype, HAS_MASTER=True, LR_ON_DEVICE=True,
                     ALIGNED=aligned, STATE_DTYPE=tl.bfloat16, **flags, **common, **plain),
            )  # fmt: skip
            results[f"lion-{dtype_name}-nomaster-bf16-state-stochastic-aligned{aligned}"] = compile(
                _lion_kernel,
                dict(PARAM_DTYPE=dtype, GRAD_DTYPE=dtype, HAS_MASTER=False, LR_ON_DEVICE=False,
                     ALIGNED=aligned, STATE_DTYPE=tl.bfloat16, **flags, **common,
                     STOCHASTIC=True),
            )  # fmt: skip
    results["lion-fp32-plain"] = compile(
        _lion_kernel,
        dict(PARAM_DTYPE=tl.float32, GRAD_DTYPE=tl.float32, STATE_DTYPE=tl.float32,
             HAS_MASTER=False, MAXIMIZE=True,
             HAS_GRAD_SCALE=False, HAS_FOUND_INF=False, HAS_CLIP=False, LR_ON_DEVICE=False,
             STOCHASTIC=False, ALIGNED=False, **common),
    )  # fmt: skip
    return results
