"""Pure-torch references of every kernel: the CPU fallback and the tests' oracle.

Same signatures and semantics as the Triton launchers (``nonfinite_check_and_norm``,
``unscale_and_check_``, ``adam_step``, ``sgd_step``, ``update_loss_scale``, ``cast_copy_``),
written with ``torch._foreach_*`` ops in fp32, in the kernels' order of operations, so the two
agree to a few ulps (``cast_copy_``: bit for bit). Bias corrections are computed in Python
floats (fp64) from the step counts.

Differences that are allowed: these functions read flags and step counts with ``.item()``,
which syncs a GPU (the Triton path never does); they are meant for CPU tensors and for
checking the kernels. ``cache`` arguments are accepted and ignored.

The pieces every step's reference shares (``step_inputs``, ``prepared_grads``,
``fp32_weights``, ``write_back``, ``skipped``) are public: a new algorithm's reference, in its
host file, is built from them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import quantize
from .adam import COMPACT_STATE as ADAM_COMPACT_STATE
from .adam import adam_state
from .multi_tensor import check_reference_inputs
from .remainder import join_reference, round_master_reference, split_reference
from .sgd import COMPACT_STATE as SGD_COMPACT_STATE
from .sgd import sgd_state
from .stochastic import step_words_reference, stochastic_round_reference

__all__ = [
    "nonfinite_check_and_norm",
    "unscale_and_check_",
    "adam_step",
    "sgd_step",
    "update_loss_scale",
    "cast_copy_",
    "step_inputs",
    "prepared_grads",
    "fp32_weights",
    "write_back",
    "skipped",
]


def _any_nonfinite(grads: Sequence[torch.Tensor]) -> bool:
    # The max-abs norm is inf or nan exactly when some element is, and cannot overflow; it has
    # no value for an empty tensor, which holds nothing non-finite anyway.
    grads = [g for g in grads if g.numel() > 0]
    return bool(grads) and any(not math.isfinite(n) for n in torch._foreach_norm(grads, math.inf))


def nonfinite_check_and_norm(
    grads: Sequence[torch.Tensor],
    *,
    grad_scale: torch.Tensor | None = None,
    compute_norm: bool = True,
    out: torch.Tensor | None = None,
    cache=None,
) -> torch.Tensor:
    """Reference of ``kernels.nonfinite.nonfinite_check_and_norm``: returns fp32
    ``[sum of squares of grads / grad_scale, non-finite flag]`` (flag 1.0 or 0.0)."""
    if len(grads) == 0:
        raise ValueError("nonfinite_check_and_norm needs at least one tensor")
    device = grads[0].device
    flag = 1.0 if _any_nonfinite(grads) else 0.0
    sum_sq = 0.0
    if compute_norm:
        norms = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))
        if grad_scale is not None:
            norms = norms / grad_scale.float().reshape(())
        sum_sq = norms.square().sum()
    sum_sq = torch.as_tensor(sum_sq, dtype=torch.float32, device=device)
    result = torch.stack([sum_sq, torch.tensor(flag, device=device)])
    if out is not None:
        return out.copy_(result)
    return result


def unscale_and_check_(
    grads: Sequence[torch.Tensor], found_inf: torch.Tensor, inv_scale: torch.Tensor, *, cache=None
) -> None:
    """Reference of ``kernels.nonfinite.unscale_and_check_``."""
    if len(grads) == 0:
        return
    if _any_nonfinite(grads):
        found_inf.fill_(1.0)
    torch._foreach_mul_(list(grads), inv_scale.reshape(()))


def prepared_grads(grads, grad_scale, norm_sq, max_norm, maximize):
    """fp32 grads with the unscale, clip and sign applied, in the kernels' order.

    fp32 grads are used as they are when nothing applies; every op below is out of place, so
    the caller's grads are never written.
    """
    g = [x.float() for x in grads]
    if grad_scale is not None:
        g = torch._foreach_mul(g, 1.0 / grad_scale.float().reshape(()))
    if norm_sq is not None and max_norm > 0:
        clip_coef = torch.clamp(max_norm / (norm_sq.float().reshape(()).sqrt() + 1e-6), max=1.0)
        g = torch._foreach_mul(g, clip_coef)
    if maximize:
        g = torch._foreach_neg(g)
    return g


def fp32_weights(params, masters) -> list[torch.Tensor]:
    """The fp32 weights the update runs on: the masters, else the params (fp32 copies of
    low-precision params without a master, written back rounded by ``write_back``). A master
    whose rounding is no longer its param's bits (the param was written since the last step)
    takes the param's value there first, as the kernels do. int16 masters are remainders
    (``remainder.py``): the weights are the fp32 masters they hold with their params."""
    if masters is None:
        return [p.float() for p in params]
    masters = list(masters)
    if masters and masters[0].dtype == torch.int16:
        return [join_reference(p, r) for p, r in zip(params, masters)]
    for p, m in zip(params, masters):
        written = round_param(m, p.dtype).view(torch.int16) != p.view(torch.int16)
        m.copy_(torch.where(written, p.float(), m))
    return masters


def round_param(master: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The param of an fp32 master (``common.round_param``): bf16 ties away from zero, fp16 to
    nearest-even."""
    if dtype == torch.bfloat16:
        return round_master_reference(master)
    return master.to(dtype)


def write_back(params, weights, masters=None) -> None:
    """Write the updated fp32 ``weights`` into low-precision params: the rounding of their
    master (``round_param``) with ``masters`` (int16 ones get the new remainders too), to
    nearest-even without (fp32 params were updated in place)."""
    for i, (p, w) in enumerate(zip(params, weights)):
        if p.dtype == torch.float32:
            continue
        if masters is None:
            p.copy_(w)
        elif masters[i].dtype == torch.int16:
            param, rest = split_reference(w)
            p.copy_(param)
            masters[i].copy_(rest)
        else:
            p.copy_(round_param(w, p.dtype))


def skipped(found_inf: torch.Tensor | None) -> bool:
    return found_inf is not None and found_inf.item() != 0


def step_inputs(params, grads, masters, grad_scale, found_inf, norm_sq, max_norm, maximize):
    """What every step's reference starts from: ``(fp32 weights, prepared fp32 grads)``, or
    None when there is nothing to do (no params, or ``found_inf`` set: the step is skipped)."""
    if len(params) == 0 or skipped(found_inf):
        return None
    return fp32_weights(params, masters), prepared_grads(
        grads, grad_scale, norm_sq, max_norm, maximize
    )


def adam_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    *,
    masters: Sequence[torch.Tensor] | None = None,
    max_exp_avg_sqs: Sequence[torch.Tensor] | None = None,
    lr: float,
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
    cache=None,
) -> None:
    """Reference of ``kernels.adam.adam_step`` (same arguments and semantics). With
    ``sr_seeds`` the random words are the kernel's, bit for bit (``kernels/stochastic.py``), so
    the two backends round alike wherever their fp32 values agree."""
    state = adam_state(
        params, masters, exp_avgs, exp_avg_sqs, steps, max_exp_avg_sqs, amsgrad, sr_seeds,
        exp_avg_scales, exp_avg_sq_scales,
    )  # fmt: skip
    check_reference_inputs(
        params, grads, masters, state, grad_scale, found_inf, norm_sq, ADAM_COMPACT_STATE
    )
    start = step_inputs(params, grads, masters, grad_scale, found_inf, norm_sq, max_norm, maximize)
    if start is None:
        return
    weights, g = start
    words = [None] * len(params)
    if state["sr_seeds"] is not None:
        words = step_words_reference(sr_seeds, steps, params, sr_shard)
    lr, weight_decay = float(lr), float(weight_decay)
    # bf16 moments: updated as fp32 copies, stored back rounded to nearest-even below (copy_
    # rounds so; this step's update uses the fp32 values, as the kernel does).
    stored = [list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs) if amsgrad else []]
    int8 = state["exp_avg_scales"] is not None
    if int8:  # codes and block scales (kernels/quantize.py), requantized below
        scales = [list(exp_avg_scales), list(exp_avg_sq_scales)]
        exp_avgs, exp_avg_sqs = (
            [quantize.dequantize_tensor(c, s, root) for c, s in zip(stored[k], scales[k])]
            for k, root in ((0, False), (1, True))
        )
        maxima = []
    else:
        exp_avgs, exp_avg_sqs, maxima = ([t.float() for t in lst] for lst in stored)
    if weight_decay != 0:
        if decoupled_weight_decay:
            torch._foreach_mul_(weights, 1.0 - lr * weight_decay)
        else:
            g = torch._foreach_add(g, weights, alpha=weight_decay)
    torch._foreach_lerp_(exp_avgs, g, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, g, g, value=1.0 - beta2)
    second = exp_avg_sqs
    if amsgrad:
        torch._foreach_maximum_(maxima, exp_avg_sqs)
        second = maxima
    if int8:
        for k, (values, root) in enumerate(((exp_avgs, False), (exp_avg_sqs, True))):
            for c, s, x in zip(stored[k], scales[k], values):
                quantize.quantize_tensor_(c, s, x, root)
    else:
        for k, (lst, values) in enumerate(zip(stored, (exp_avgs, exp_avg_sqs, maxima))):
            store_compact(lst, values, [w and w[k + 1] for w in words])
    new_steps = [s.item() + 1.0 for s in steps]
    step_sizes = [-lr / (1.0 - beta1**s) for s in new_steps]
    bc2_sqrts = [math.sqrt(1.0 - beta2**s) for s in new_steps]
    denom = torch._foreach_sqrt(second)
    torch._foreach_div_(denom, bc2_sqrts)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(weights, exp_avgs, denom, step_sizes)
    if masters is None:
        store_compact(list(params), weights, [w and w[0] for w in words])
    else:
        write_back(params, weights, masters)
    torch._foreach_add_(list(steps), 1.0)


def store_compact(tensors: list[torch.Tensor], values: list[torch.Tensor], words=None) -> None:
    """Write fp32 ``values`` into bf16/fp16 ``tensors`` rounded to nearest-even (``copy_``),
    or stochastically with the random ``words`` of each (where not None); fp32 tensors were
    updated in place (``.float()`` returned them), nothing to do."""
    words = words or [None] * len(tensors)
    low = [(t, v) for t, v, w in zip(tensors, values, words) if t is not v and w is None]
    if low:
        torch._foreach_copy_([t for t, _ in low], [v for _, v in low])
    for t, v, w in zip(tensors, values, words):
        if t is not v and w is not None:
            t.copy_(stochastic_round_reference(v, w, t.dtype))


def sgd_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor] | None,
    steps: Sequence[torch.Tensor] | None,
    *,
    masters: Sequence[torch.Tensor] | None = None,
    lr: float,
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
    cache=None,
) -> None:
    """Reference of ``kernels.sgd.sgd_step`` (same arguments and semantics; with ``sr_seeds``
    the kernel's random words, bit for bit, as ``adam_step``'s)."""
    state = sgd_state(params, masters, momentum, momentum_buffers, steps, sr_seeds)
    check_reference_inputs(
        params, grads, masters, state, grad_scale, found_inf, norm_sq, SGD_COMPACT_STATE
    )
    stochastic = state["sr_seeds"] is not None
    start = step_inputs(params, grads, masters, grad_scale, found_inf, norm_sq, max_norm, maximize)
    if start is None:
        return
    weights, g = start
    words = [None] * len(params)
    if stochastic:
        words = step_words_reference(sr_seeds, steps, params, sr_shard)
    lr = float(lr)  # a tensor lr is read on the host: the reference may sync
    if weight_decay != 0:
        g = torch._foreach_add(g, weights, alpha=weight_decay)
    if momentum != 0:
        stored = list(momentum_buffers)
        bufs = [b.float() for b in stored]  # bf16 buffers: fp32 copies, stored back rounded
        first = [s.item() == 0 for s in steps]
        for buf, grad, is_first in zip(bufs, g, first):
            if is_first:
                buf.copy_(grad)
        later = [i for i, f in enumerate(first) if not f]
        if later:
            later_bufs = [bufs[i] for i in later]
            torch._foreach_mul_(later_bufs, momentum)
            torch._foreach_add_(later_bufs, [g[i] for i in later], alpha=1.0 - dampening)
        store_compact(stored, bufs, [w and w[1] for w in words])
        if nesterov:
            g = torch._foreach_add(g, bufs, alpha=momentum)
        else:
            g = bufs
        torch._foreach_add_(list(steps), 1.0)
    torch._foreach_add_(weights, g, alpha=-lr)
    if masters is None:
        store_compact(list(params), weights, [w and w[0] for w in words])
    else:
        write_back(params, weights, masters)


def update_loss_scale(
    overflow: torch.Tensor,
    scale: torch.Tensor,
    cur_hysteresis: torch.Tensor,
    cur_iter: torch.Tensor,
    last_overflow_iter: torch.Tensor,
    error: torch.Tensor,
    *,
    min_scale: float,
    scale_factor: float,
    scale_window: int,
    hysteresis: int,
    consecutive: bool,
    raise_at_min: bool,
    record: torch.Tensor | None = None,
) -> None:
    """Reference of ``kernels.loss_scale.update_loss_scale``, in torch ops that never sync
    (``torch.where`` instead of branches), so it also serves devices without Triton."""
    device = scale.device
    ov = overflow.detach().reshape(()).to(device=device, non_blocking=True) != 0
    # Constants as tensors (filled on the device: no copy, no sync): dividing by a tensor keeps
    # the division exact on CUDA, where a Python-scalar divisor becomes a multiplication by its
    # rounded reciprocal.
    min_t = torch.full((), min_scale, dtype=torch.float32, device=device)
    factor_t = torch.full((), scale_factor, dtype=torch.float32, device=device)
    hyst, it, last = cur_hysteresis, cur_iter, last_overflow_iter

    shift = (hyst == 1) | (hysteresis == 1)
    new_error = ov & shift & (scale == min_t) & raise_at_min
    scale_ov = torch.where(shift, torch.maximum(scale / factor_t, min_t), scale)
    hyst_ov = torch.where(shift, hyst, hyst - 1)

    stable = it - last - 1
    grow = (stable > 0) & (torch.remainder(stable, scale_window) == 0)
    grown = scale * factor_t
    scale_clean = torch.where(grow & torch.isfinite(grown), grown, scale)
    hyst_clean = torch.where(grow | consecutive, torch.full_like(hyst, hysteresis), hyst)

    # All inputs above were read before any write below.
    freeze = (error != 0) | new_error
    new_scale = torch.where(ov, scale_ov, scale_clean)
    new_hyst = torch.where(ov, hyst_ov, hyst_clean)
    new_last = torch.where(ov, it, last)
    before = [scale.clone(), hyst.float()] if record is not None else None
    scale.copy_(torch.where(freeze, scale, new_scale))
    cur_hysteresis.copy_(torch.where(freeze, hyst, new_hyst))
    last_overflow_iter.copy_(torch.where(freeze, last, new_last))
    cur_iter.copy_(torch.where(freeze, it, it + 1))
    error.copy_(freeze.to(torch.float32))
    if record is not None:
        torch.stack([*before, scale, cur_hysteresis.float()], out=record)


def cast_copy_(dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor], *, cache=None) -> None:
    """Reference of ``kernels.cast_copy.cast_copy_``: ``torch.Tensor.copy_``, whose
    fp32 -> fp16/bf16 conversion rounds to nearest-even."""
    if len(dsts) != len(srcs):
        raise ValueError(f"{len(srcs)} sources for {len(dsts)} destinations")
    for d, s in zip(dsts, srcs):
        d.copy_(s)
