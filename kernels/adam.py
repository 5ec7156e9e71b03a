"""Fused mixed-precision Adam / AdamW step: one launch per tensor group, fp32 math throughout.

Per element, with ``g`` the grad in fp32 and ``p`` the fp32 master (the param itself when the
param is fp32); this is ``torch.optim.Adam`` (L2 decay) and ``torch.optim.AdamW`` (decoupled
decay), with the loss-scale division and the clip coefficient folded in::

    g = g / grad_scale                      # if a grad scale is given (loss scaling)
    g = g * min(1, max_norm / (sqrt(norm_sq) + 1e-6))   # if clipping: torch's clip_grad_norm_
    g = -g                                  # if maximize
    Adam:  g = g + weight_decay * p         AdamW: p = p * (1 - lr * weight_decay)
    m = lerp(m, g, 1 - beta1) ;  v = v * beta2 + (1 - beta2) * g * g
    amsgrad: v_max = max(v_max, v) and v_max replaces v below
    p = p - (lr / (1 - beta1**step)) * m / (sqrt(v) / sqrt(1 - beta2**step) + eps)
    param = round_to_nearest(p)             # when a low-precision param has a master: fp16 ties
                                            # to even, bf16 ties away from zero (remainder.py)

With a master, ``p`` starts from the param instead wherever the param's bits are not the
master's rounding: the param was written since the last step, and torch.optim would step what
it holds (``common.load_grad_and_weight``).

Bias corrections are computed per program in fp64 from the device step count (binary
exponentiation of ``1 - (1 - beta)``, a few fp64 roundings): no transcendental functions, so
GPUs and the interpreter agree, and ``1 - beta2**step`` keeps fp32 precision even at step 1
(``1 - beta`` reaches the kernel rounded to fp32: a relative error of at most 2^-24).
If ``found_inf`` is non-zero nothing at all is written and step counts do not advance.

Moments kept in bf16 (``STATE_DTYPE``, the optimizers' ``state_dtype=torch.bfloat16``) are
widened to fp32 on load, updated in fp32 as above, and stored rounded to nearest-even; this
step's update uses the fp32 values before that rounding (the rounding only decides what the
next step starts from). Masters stay fp32.

With ``STOCHASTIC`` (the optimizers' ``stochastic_rounding=True``) every low-precision value
written without an fp32 copy behind it, bf16 moments and fp16/bf16 params without a master, is
rounded stochastically instead (``kernels/stochastic.py``: Philox keyed by the tensor's
``sr_seed``, counted by element index and step number). A param with a master is its master's
rounding to nearest-even as before. Bytes: 8 per tensor more (its seed), none per element.

Bytes per element (fp16 param, fp16 grad, fp32 master/exp_avg/exp_avg_sq):
reads grad 2 + master 4 + param 2 (is it still the master's rounding?) + exp_avg 4 +
exp_avg_sq 4 = 16, writes master 4 + exp_avg 4 + exp_avg_sq 4 + param 2 = 14: **30 bytes**.
amsgrad adds 8 (read and write max_exp_avg_sq).
bf16 moments: read 2 + 4 + 2 + 2 + 2, write 4 + 2 + 2 + 2 = **22 bytes** (amsgrad adds 4).
fp32 params without master: read g 4 + p 4 + m 4 + v 4, write p 4 + m 4 + v 4 = 28 bytes.
fp16 params without a master: 22 bytes. A skipped step reads only the flag.
bf16 params with int16 remainders of their masters (``HAS_MASTER`` 2, ``remainder.py``): the
master costs 2 bytes each way instead of 4: 26 bytes with fp32 moments, 18 with bf16 ones.
int8 moments (``STATE_DTYPE`` int8, ``quantize.py``): 1 byte per moment each way plus a 4-byte
scale per 256 elements (1/64 B): with remainders read 2 + 2 + 2 + 2 x 1.016, write 2 + 2 +
2 x 1.016 = 14.06 bytes (16.06 with the check pass).
Step counts: 8 bytes per tensor, not per element.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl

from .common import (
    TORCH_TO_TRITON,
    _increment_steps_kernel,
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
from .quantize import BLOCK_IN_KERNELS, dequantize_root, dequantize_signed, store_quantized
from .stochastic import random_words, stochastic_round

__all__ = ["adam_step", "prepare_adam_step"]


@triton.jit
def bias_correction(one_minus_beta, step):
    """``1 - beta**step`` in fp64, by binary exponentiation of the integer step (about
    2·log2(step) fp64 multiplications, so far below fp32 resolution)."""
    base = 1.0 - tl.cast(one_minus_beta, tl.float64)
    power = base * 0.0 + 1.0
    n = step.to(tl.int32)
    while n > 0:
        if (n & 1) != 0:
            power = power * base
        base = base * base
        n = n >> 1
    return 1.0 - power


@triton.jit
def _adam_kernel(
    param_ptrs,  # int64 [T]: params, written (rounded from the master when there is one)
    grad_ptrs,  # int64 [T]: grads, read only
    master_ptrs,  # int64 [T]: fp32 masters, or int16 remainders of bf16 params (HAS_MASTER)
    exp_avg_ptrs,  # int64 [T]: first moments (STATE_DTYPE)
    exp_avg_sq_ptrs,  # int64 [T]: second moments (STATE_DTYPE)
    max_exp_avg_sq_ptrs,  # int64 [T]: running max of the second moments (if AMSGRAD)
    exp_avg_scale_ptrs,  # int64 [T]: fp32 scales of exp_avg's blocks (STATE_DTYPE int8)
    exp_avg_sq_scale_ptrs,  # int64 [T]: fp32 scales of exp_avg_sq's blocks (int8)
    step_ptrs,  # int64 [T]: fp32 one-element step counts (before this step), read only
    sr_seed_ptrs,  # int64 [T]: int64 one-element seeds of the rounding streams (if STOCHASTIC)
    numels,  # int64 [T]: elements in each tensor
    chunk_map,  # int64 [2, P]: tensor index and first element of each program's chunk
    n_programs,  # P, the row stride of chunk_map
    grad_scale_ptr,  # fp32 scalar: grads are divided by it (if HAS_GRAD_SCALE)
    found_inf_ptr,  # fp32 scalar: non-zero means skip, write nothing (if HAS_FOUND_INF)
    norm_sq_ptr,  # fp32 scalar: squared global norm of the unscaled grads (if HAS_CLIP)
    lr_ptr,  # fp32 scalar: the learning rate, when it is a device tensor (if LR_ON_DEVICE)
    max_norm,  # fp32: clipping threshold (if HAS_CLIP)
    lr,  # fp32: learning rate (runtime, so schedulers never recompile), unless LR_ON_DEVICE
    beta1,  # fp32: first-moment decay
    beta2,  # fp32: second-moment decay
    one_minus_beta1,  # fp32: 1 - beta1, computed in fp64 on the host, rounded to fp32
    one_minus_beta2,  # fp32: 1 - beta2, computed in fp64 on the host, rounded to fp32
    eps,  # fp32: added after the bias-corrected square root
    weight_decay,  # fp32: L2 (Adam) or decoupled (AdamW) weight decay
    sr_shard,  # fp32: this rank's shard of sharded params, counting random words (STOCHASTIC)
    PARAM_DTYPE: tl.constexpr,  # element type of the params
    GRAD_DTYPE: tl.constexpr,  # element type of the grads
    STATE_DTYPE: tl.constexpr,  # moments: fp32, bf16 (rounded on store), int8 (quantize.py)
    HAS_MASTER: tl.constexpr,  # 0: none (params updated in place), 1: fp32 masters, 2: remainders
    DECOUPLED: tl.constexpr,  # AdamW (decoupled weight decay) rather than Adam
    AMSGRAD: tl.constexpr,  # keep and use the running max of the second moments
    MAXIMIZE: tl.constexpr,  # ascend rather than descend
    HAS_GRAD_SCALE: tl.constexpr,  # divide grads by *grad_scale_ptr
    HAS_FOUND_INF: tl.constexpr,  # skip everything when *found_inf_ptr != 0
    HAS_CLIP: tl.constexpr,  # clip by the global norm in *norm_sq_ptr
    LR_ON_DEVICE: tl.constexpr,  # read the learning rate from *lr_ptr (no host sync)
    STOCHASTIC: tl.constexpr,  # round bf16 moments and master-less params stochastically
    ALIGNED: tl.constexpr,  # every address 16-byte aligned and every size a multiple of 8
    BLOCK: tl.constexpr,  # elements per vector operation
    CHUNK: tl.constexpr,  # elements per program, a multiple of BLOCK
):
    """One Adam/AdamW update of one chunk of one tensor (see the module docstring).

    Bytes per element, fp16 param and grad with fp32 master and moments: read 2 + 4 + 2 + 4 +
    4, write 4 + 4 + 4 + 2 = 30 (amsgrad +8; fp32 params 28; fp16 without master 22); with
    bf16 moments read 2 + 4 + 2 + 2 + 2, write 4 + 2 + 2 + 2 = 22 (amsgrad +4)."""
    tensor, start, numel = program_chunk(
        chunk_map, n_programs, numels, found_inf_ptr, HAS_FOUND_INF, ALIGNED, CHUNK
    )
    param = tensor_ptr(param_ptrs, tensor, PARAM_DTYPE, ALIGNED)
    grad = tensor_ptr(grad_ptrs, tensor, GRAD_DTYPE, ALIGNED)
    master = tensor_ptr(master_ptrs, tensor, tl.float32, ALIGNED)
    exp_avg = tensor_ptr(exp_avg_ptrs, tensor, STATE_DTYPE, ALIGNED)
    exp_avg_sq = tensor_ptr(exp_avg_sq_ptrs, tensor, STATE_DTYPE, ALIGNED)
    max_exp_avg_sq = tensor_ptr(max_exp_avg_sq_ptrs, tensor, STATE_DTYPE, ALIGNED)
    m_scale = tensor_ptr(exp_avg_scale_ptrs, tensor, tl.float32, False)
    v_scale = tensor_ptr(exp_avg_sq_scale_ptrs, tensor, tl.float32, False)

    # Per-program scalars, in fp64 where cancellation would cost precision.
    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr)
    step = tl.load(tl.load(step_ptrs + tensor).to(tl.pointer_type(tl.float32))) + 1.0
    seed = 0
    if STOCHASTIC:
        seed = tl.load(tl.load(sr_seed_ptrs + tensor).to(tl.pointer_type(tl.int64)))
    bc1 = bias_correction(one_minus_beta1, step)
    bc2 = bias_correction(one_minus_beta2, step)
    step_size = (tl.cast(lr, tl.float64) / bc1).to(tl.float32)
    bc2_sqrt = tl.sqrt(bc2).to(tl.float32)
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
        if STATE_DTYPE == tl.int8:
            block = offsets // BLOCK_IN_KERNELS
            m = dequantize_signed(
                tl.load(exp_avg + offsets, mask=mask, other=0),
                tl.load(m_scale + block, mask=mask, other=0.0),
            )
            v = dequantize_root(
                tl.load(exp_avg_sq + offsets, mask=mask, other=0),
                tl.load(v_scale + block, mask=mask, other=0.0),
            )
        else:
            m = widen(tl.load(exp_avg + offsets, mask=mask, other=0.0), STATE_DTYPE)
            v = widen(tl.load(exp_avg_sq + offsets, mask=mask, other=0.0), STATE_DTYPE)
        if DECOUPLED:
            p = p * decay
        else:
            g = g + weight_decay * p
        # torch's lerp: the branch keeps the result exact at weight 0 and 1.
        m = tl.where(
            one_minus_beta1 < 0.5,
            m + one_minus_beta1 * (g - m),
            g - (g - m) * (1.0 - one_minus_beta1),
        )
        v = v * beta2 + (one_minus_beta2 * g) * g
        if STOCHASTIC:
            # One Philox draw per element: a word for the param and for each moment.
            r_param, r_m, r_v, r_max = random_words(seed, step, offsets, sr_shard)
        if STATE_DTYPE == tl.int8:
            store_quantized(exp_avg, exp_avg_sq, m_scale, v_scale, m, v, start + i, offsets,
                            mask, numel, BLOCK, BLOCK_IN_KERNELS)  # fmt: skip
        elif STOCHASTIC:
            tl.store(exp_avg + offsets, stochastic_round(m, r_m, STATE_DTYPE), mask=mask)
            tl.store(exp_avg_sq + offsets, stochastic_round(v, r_v, STATE_DTYPE), mask=mask)
        else:
            tl.store(exp_avg + offsets, round_to(m, STATE_DTYPE), mask=mask)
            tl.store(exp_avg_sq + offsets, round_to(v, STATE_DTYPE), mask=mask)
        if AMSGRAD:
            v_max = widen(tl.load(max_exp_avg_sq + offsets, mask=mask, other=0.0), STATE_DTYPE)
            v = tl.maximum(v_max, v)
            if STOCHASTIC:
                v_store = stochastic_round(v, r_max, STATE_DTYPE)
            else:
                v_store = round_to(v, STATE_DTYPE)
            tl.store(max_exp_avg_sq + offsets, v_store, mask=mask)
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        p = p - step_size * tl.div_rn(m, denom)
        if STOCHASTIC and not HAS_MASTER:
            tl.store(param + offsets, stochastic_round(p, r_param, PARAM_DTYPE), mask=mask)
        else:
            store_weight(param, master, offsets, mask, p, PARAM_DTYPE, HAS_MASTER)


COMPACT_STATE = ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")
"""The state lists an Adam step may keep in bf16 or int8 (``state_dtype``)."""


def adam_state(
    params,
    masters,
    exp_avgs,
    exp_avg_sqs,
    steps,
    max_exp_avg_sqs,
    amsgrad,
    sr_seeds,
    exp_avg_scales,
    exp_avg_sq_scales,
) -> dict[str, Sequence[torch.Tensor] | None]:
    """The state lists an Adam step reads, by name (None: not read), after the checks that
    depend on the options; the reference (``kernels/reference.py``) checks the same lists."""
    if amsgrad and max_exp_avg_sqs is None:
        raise ValueError("amsgrad=True needs max_exp_avg_sqs")
    int8 = bool(exp_avgs) and exp_avgs[0].dtype == torch.int8
    if int8 and (exp_avg_scales is None or exp_avg_sq_scales is None or amsgrad):
        raise ValueError("int8 moments need exp_avg_scales and exp_avg_sq_scales, and no amsgrad")
    state = {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "steps": steps, "masters": masters}
    state["max_exp_avg_sqs"] = max_exp_avg_sqs if amsgrad else None
    state["exp_avg_scales"] = exp_avg_scales if int8 else None
    state["exp_avg_sq_scales"] = exp_avg_sq_scales if int8 else None
    stochastic = rounds_stochastically(sr_seeds, params, masters, exp_avgs)
    state["sr_seeds"] = sr_seeds if stochastic else None
    return state


def prepare_adam_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    *,
    masters: Sequence[torch.Tensor] | None = None,
    max_exp_avg_sqs: Sequence[torch.Tensor] | None = None,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool = False,
    maximize: bool = False,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    norm_sq: torch.Tensor | None = None,
    max_norm: float = 0.0,
    sr_seeds: Sequence[torch.Tensor] | None = None,
    sr_shard: int = 0,
    exp_avg_scales: Sequence[torch.Tensor] | None = None,
    exp_avg_sq_scales: Sequence[torch.Tensor] | None = None,
    cache: TableCache | None = None,
) -> Callable[[], None]:
    """Check the inputs and build the tables of a fused Adam/AdamW step (in place, no host
    sync, every tensor of a group in one launch); return the launch.

    Splitting the checks from the launch lets an optimizer check every group before it
    updates any, so bad input changes nothing. ``adam_step`` does both at once.

    Args:
        params: fp16/bf16 params (with ``masters``) or fp32 params (updated directly), all of
            one dtype on one device, dense (``multi_tensor.is_dense``: any layout, the k-th
            grad, master and moments sharing the k-th param's strides).
        grads: their grads (any of fp16/bf16/fp32, one dtype), read only.
        exp_avgs, exp_avg_sqs: moments, one per param: fp32, or bf16 (widened on load,
            rounded to nearest-even on store; all moment lists of one dtype).
        steps: fp32 one-element step counts (the count *before* this step), advanced by one
            after the update unless ``found_inf`` is non-zero.
        masters: fp32 master weights for low-precision params; None updates the params
            themselves (always so for fp32 params), still in fp32 math, rounding on store.
        max_exp_avg_sqs: running maxima (the moments' dtype), required with ``amsgrad``.
        lr, beta1, beta2, eps, weight_decay: hyperparameters (runtime values, never
            compile-time constants, so changing them never recompiles). ``lr`` may be a
            one-element tensor: on the params' device it is read by the kernel (no sync).
        decoupled_weight_decay: AdamW's decay (``p *= 1 - lr * wd``) rather than Adam's L2.
        amsgrad, maximize: as in ``torch.optim.Adam``.
        grad_scale: optional fp32 one-element device tensor; grads are divided by it.
        found_inf: optional fp32 one-element device tensor; non-zero skips the whole step.
        norm_sq, max_norm: optional squared global grad norm (of the unscaled grads) and
            threshold; grads are multiplied by ``min(1, max_norm / (norm + 1e-6))``.
        sr_seeds: int64 one-element seeds, one per param: round the bf16 moments and params
            without masters stochastically (``kernels/stochastic.py``); None (default) rounds
            them to nearest-even. Ignored where nothing is low precision without a master.
        sr_shard: this rank's shard of sharded (FSDP2) params, 0 otherwise: counts the random
            words apart per shard (``kernels/stochastic.py``).
        exp_avg_scales, exp_avg_sq_scales: with int8 moments (``kernels/quantize.py``), each
            tensor's fp32 block scales (``ceil(numel / 256)``), read and rewritten.
        cache: optional ``TableCache`` the caller keeps for this group.

    Launches: two (the step and the step-count increment), whatever the number of tensors.
    """
    state = adam_state(
        params, masters, exp_avgs, exp_avg_sqs, steps, max_exp_avg_sqs, amsgrad, sr_seeds,
        exp_avg_scales, exp_avg_sq_scales,
    )  # fmt: skip
    stochastic = state["sr_seeds"] is not None
    return prepare_step(
        _adam_kernel, "adam", params, grads, masters, state,
        rows=("params", "grads", "masters", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs",
              "exp_avg_scales", "exp_avg_sq_scales", "steps", "sr_seeds"),
        hyperparameters=(float(beta1), float(beta2), 1.0 - float(beta1), 1.0 - float(beta2),
                         float(eps), float(weight_decay), float(sr_shard)),
        flags=dict(DECOUPLED=bool(decoupled_weight_decay), AMSGRAD=bool(amsgrad),
                   STOCHASTIC=stochastic,
                   STATE_DTYPE=TORCH_TO_TRITON.get(exp_avgs[0].dtype) if exp_avgs else None),
        compact_state=COMPACT_STATE, count_steps=True, lr=lr, maximize=maximize,
        grad_scale=grad_scale, found_inf=found_inf, norm_sq=norm_sq, max_norm=max_norm,
        cache=cache,
    )  # fmt: skip


def adam_step(*args, **kwargs) -> None:
    """One fused Adam/AdamW step, in place, with no host sync: ``prepare_adam_step``'s
    arguments, checked and launched at once."""
    prepare_adam_step(*args, **kwargs)()


def compile_variants(compile) -> dict[str, dict]:
    """The variants ``tests/gpu_compile.py`` compiles for sm_90: ``compile(kernel, constexprs,
    types=None)`` for each. fp16/bf16 with masters and amsgrad, both alignments, lr on host or
    device, fp32 or bf16 moments; stochastic rounding of bf16 moments (with masters) and of
    fp16/bf16 params without masters; fp32 without masters; the step-count kernel."""
    common = {"BLOCK": 1024, "CHUNK": 4096}
    flags = dict(
        DECOUPLED=True, MAXIMIZE=False, HAS_GRAD_SCALE=True, HAS_FOUND_INF=True, HAS_CLIP=True
    )
    results = {}
    for dtype_name, dtype in (("fp16", tl.float16), ("bf16", tl.bfloat16)):
        for aligned in (False, True):
            for lr_on_device in (False, True):
                name = f"adam-{dtype_name}-master-amsgrad-aligned{aligned}-lrdev{lr_on_device}"
                results[name] = compile(
                    _adam_kernel,
                    dict(
                        PARAM_DTYPE=dtype, GRAD_DTYPE=dtype, HAS_MASTER=True, AMSGRAD=True,
                        LR_ON_DEVICE=lr_on_device, ALIGNED=aligned, STATE_DTYPE=tl.float32,
                        STOCHASTIC=False, **flags, **common,
                    ),
                )  # fmt: skip
            # bf16 moments (state_dtype=torch.bfloat16): 2-byte state loads and stores, rounded
            # to nearest-even, or stochastically (Philox words) with or without a master.
            for stochastic, master in ((False, True), (True, True), (True, False)):
                sr = f"sr{stochastic}-master{master}"
                name = f"adam-{dtype_name}-{sr}-amsgrad-bf16state-aligned{aligned}"
                results[name] = compile(
                    _adam_kernel,
                    dict(
                        PARAM_DTYPE=dtype, GRAD_DTYPE=dtype, HAS_MASTER=master, AMSGRAD=True,
                        LR_ON_DEVICE=False, ALIGNED=aligned, STATE_DTYPE=tl.bfloat16,
                        STOCHASTIC=stochastic, **flags, **common,
                    ),
                )  # fmt: skip
    # bf16 params with int16 remainders of their masters (HAS_MASTER=2: kernels/remainder.py).
    for aligned in (False, True):
        for state_name, state_dtype in (("", tl.float32), ("-bf16state", tl.bfloat16)):
            results[f"adam-bf16-remainder{state_name}-aligned{aligned}"] = compile(
                _adam_kernel,
                dict(
                    PARAM_DTYPE=tl.bfloat16, GRAD_DTYPE=tl.bfloat16, HAS_MASTER=2, AMSGRAD=False,
                    LR_ON_DEVICE=False, ALIGNED=aligned, STATE_DTYPE=state_dtype,
                    STOCHASTIC=False, **flags, **common,
                ),
            )  # fmt: skip
    # int8 moments (kernels/quantize.py): codes and block scales, with remainder masters.
    for aligned in (False, True):
        results[f"adam-bf16-remainder-int8state-aligned{aligned}"] = compile(
            _adam_kernel,
            dict(
                PARAM_DTYPE=tl.bfloat16, GRAD_DTYPE=tl.bfloat16, HAS_MASTER=2, AMSGRAD=False,
                LR_ON_DEVICE=True, ALIGNED=aligned, STATE_DTYPE=tl.int8, STOCHASTIC=False,
                **flags, **common,
            ),
        )  # fmt: skip
    results["adam-fp32-plain"] = compile(
        _adam_kernel,
        dict(
            PARAM_DTYPE=tl.float32, GRAD_DTYPE=tl.float32, HAS_MASTER=False, AMSGRAD=False,
            STATE_DTYPE=tl.float32, STOCHASTIC=False,
            DECOUPLED=False, MAXIMIZE=True, HAS_GRAD_SCALE=False, HAS_FOUND_INF=False,
            HAS_CLIP=False, LR_ON_DEVICE=False, ALIGNED=False, **common,
        ),
    )  # fmt: skip
    results["increment-steps"] = compile(
        _increment_steps_kernel, dict(HAS_FOUND_INF=True, BLOCK=1024)
    )
    return results
