"""``Lion``: the Lion optimizer (Chen et al. 2023) with fp32 master weights for fp16/bf16 params
and one fused Triton launch per param bucket, with DeepSpeed FusedLion's arguments and defaults.

The algorithm in one place: the class, its pure-torch reference step (the CPU fallback), its
functional form and its spec. The Triton kernel is ``kernels/lion.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .backend import backend_for, kernels
from .buckets import Bucket, local
from .compact_state import CONFIG_KINDS, CompactState, bucket_shard
from .masters import MASTER_STATES
from .optimizer import FusedOptimizer, check_lr, torch_compat_options
from .spec import Algorithm, elementwise_traffic, register, scratch_inputs

__all__ = ["Lion"]

_STATE = {
    "exp_avg": "always: the momentum (fp32, or the group's state_dtype)",
    "master_param": "fp16/bf16 params with master_weights=True",
    "master_remainder": 'bf16 params with master_weights="remainder" (int16)',
    "step": "stochastic_rounding (fp32, one element: counts the random words; kept once made)",
    "sr_seed": "stochastic_rounding (int64, one element: the seed of the param's rounding)",
}
"""Per-param state on the param's device, and when each exists."""


class Lion(CompactState, FusedOptimizer):
    """Lion: ``update = sign(beta1 * m + (1 - beta1) * g)``, ``p = p * (1 - lr * wd) - lr *
    update``, ``m = beta2 * m + (1 - beta2) * g`` (see ``kernels/lion.py``; ``sign(0) = 0``).

    Args:
        params, lr: as in ``fp16_triton.Adam`` (default lr 1e-3; Lion wants one 3-10x
            smaller than AdamW's, with a weight decay as many times larger).
        betas: ``(beta1, beta2)``, the update's interpolation weight and the momentum decay
            (default (0.9, 0.999), DeepSpeed FusedLion's).
        weight_decay: decoupled weight decay (default 0).
        maximize: maximize the objective (default False).
        foreach, differentiable, fused, master_weights, backend, flat_buffers: as in
            ``fp16_triton.Adam``.
        state_dtype: the momentum's dtype, ``torch.float32`` (default) or ``torch.bfloat16``
            (widened in the kernel, stored rounded to nearest-even), as Adam's
            (``fp16_triton/compact_state.py``).
        stochastic_rounding, seed: as Adam's: a bf16 momentum and params without masters are
            rounded stochastically. Lion has no step count of its own; a param then keeps one
            (``step``) to count its random words.

    State per param on the param's device: ``exp_avg`` (the momentum, in ``state_dtype``),
    ``master_param`` (fp32) for fp16/bf16 params, and with stochastic rounding ``sr_seed``
    (int64) and ``step`` (fp32; kept if stochastic rounding is switched off, so that switching
    it on again draws new words). No bias correction, so no step count otherwise.
    """

    _state_names = tuple(name for name in _STATE if name not in MASTER_STATES)
    _required_state = ("exp_avg",)
    _compact_state = ("exp_avg",)  # kept in state_dtype

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        master_weights: bool | str = True,
        backend: str = "auto",
        flat_buffers: bool = False,
        state_dtype: torch.dtype = torch.float32,
        stochastic_rounding: bool = False,
        seed: int | None = None,
    ):
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            weight_decay=weight_decay,
            maximize=maximize,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            seed=self._init_compact(seed, state_dtype),
            **torch_compat_options(foreach, None, differentiable, fused),
        )
        options = dict(master_weights=master_weights, backend=backend, flat_buffers=flat_buffers)
        super().__init__(params, defaults, **options)

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        self._check_compact(group)
        for index, beta in enumerate(group["betas"]):  # [0, 1), as torch's Adam and the config
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {index}: {beta}")
        if not 0.0 <= group["weight_decay"]:
            raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")

    def _state_kind(self, group: dict[str, Any]) -> tuple:
        # The momentum's dtype too: a switch converts it before the next step.
        return group["master_weights"], *self._compact_kind(group)

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        # The param's strides (channels_last too): the kernel pairs elements by memory position.
        dtype = group.get("state_dtype", torch.float32)
        return {"exp_avg": torch.zeros_like(p, dtype=dtype)}

    def _complete_state(self, p: torch.Tensor, group: dict[str, Any], state: dict) -> None:
        self._complete_seed(p, group, state)
        if group.get("stochastic_rounding", False) and state.get("step") is None:
            state["step"] = torch.zeros((), dtype=torch.float32, device=local(p).device)

    def _prepare_bucket(self, bucket: Bucket, grads, group, **scaling) -> Callable[[], None]:
        beta1, beta2 = map(float, group["betas"])
        if group.get("stochastic_rounding", False):
            scaling.update(steps=bucket.state["step"], sr_seeds=bucket.state["sr_seed"])
            scaling["sr_shard"] = bucket_shard(bucket)
        return ALGORITHM.launch(
            bucket.backend,
            bucket.local_params,
            grads,
            bucket.state["exp_avg"],
            masters=bucket.masters,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            weight_decay=float(group["weight_decay"]),
            maximize=group["maximize"],
            cache=bucket.cache,
            **scaling,
        )


# ------------------------------------------------------------------------------- reference
def lion_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    *,
    masters: Sequence[torch.Tensor] | None = None,
    lr: float,
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
    cache=None,
) -> None:
    """Reference of ``kernels.lion.lion_step`` (same arguments and semantics), in torch's
    foreach ops in the kernel's order: the CPU fallback and the tests' second oracle. With
    ``sr_seeds`` the kernel's random words, bit for bit, as Adam's reference."""
    reference, lion = kernels("reference"), kernels("lion")
    state = lion.lion_state(params, masters, exp_avgs, steps, sr_seeds)
    kernels("multi_tensor").check_reference_inputs(
        params, grads, masters, state, grad_scale, found_inf, norm_sq, lion.COMPACT_STATE
    )
    stochastic = state["sr_seeds"] is not None
    start = reference.step_inputs(
        params, grads, masters, grad_scale, found_inf, norm_sq, max_norm, maximize
    )
    if start is None:
        return
    weights, g = start
    words = [None] * len(params)
    if stochastic:
        words = kernels("stochastic").step_words_reference(sr_seeds, steps, params, sr_shard)
    lr, weight_decay, stored = float(lr), float(weight_decay), list(exp_avgs)
    exp_avgs = [m.float() for m in stored]  # bf16 momenta: fp32 copies, stored back rounded
    c = torch._foreach_mul(exp_avgs, beta1)
    torch._foreach_add_(c, torch._foreach_mul(g, 1.0 - beta1))
    if weight_decay != 0:
        torch._foreach_mul_(weights, 1.0 - lr * weight_decay)
    torch._foreach_add_(weights, torch._foreach_sign(c), alpha=-lr)
    torch._foreach_mul_(exp_avgs, beta2)
    torch._foreach_add_(exp_avgs, torch._foreach_mul(g, 1.0 - beta2))
    # bf16 momenta: rounded to nearest-even (copy_), or stochastically with word 1.
    reference.store_compact(stored, exp_avgs, [w and w[1] for w in words])
    if masters is None:
        reference.store_compact(list(params), weights, [w and w[0] for w in words])
    else:
        reference.write_back(params, weights, masters)
    if stochastic:
        torch._foreach_add_(list(steps), 1.0)


# ------------------------------------------------------------------------------ functional
def lion_(params, grads, exp_avgs, *, backend: str = "auto", **kwargs) -> None:
    """One Lion step over tensor lists, in place (``fp16_triton.functional.lion_``).

    ``exp_avgs`` are the fp32 momenta; the keywords are ``kernels.lion.prepare_lion_step``'s
    (``masters``, ``lr``, ``beta1``, ``beta2``, ``weight_decay``, ``maximize``, ``grad_scale``,
    ``found_inf``, ...), as in ``fp16_triton.adam.adam_``."""
    if len(params) == 0:
        return
    ALGORITHM.launch_lists(backend_for(backend, params), params, grads, exp_avgs, **kwargs)()


# ------------------------------------------------------------------------------------ spec
def _traffic(param_dtype, grad_dtype=None, master=True, state_dtype=torch.float32, **_):
    """Lion: ``exp_avg`` read and written once. fp16 params and grads with masters: read 2 + 2
    + 4 x 2, write 2 + 4 x 2 = 22 B/param (AdamW: 30); a bf16 momentum: 18."""
    size = torch.empty((), dtype=state_dtype).element_size()
    return elementwise_traffic(param_dtype, grad_dtype, master, 1, size)


def _example(sizes, device, param_dtype=torch.float16):
    """Scratch inputs of ``prepare_lion_step`` (``spec.scratch_inputs``); random momenta, so
    that the sign of the interpolation varies."""
    params, grads, (m,), _, masters = scratch_inputs(sizes, device, param_dtype, 1)
    m = [torch.randn_like(t) for t in m]
    kwargs = dict(masters=masters, lr=1e-6, beta1=0.9, beta2=0.99, weight_decay=0.01)
    return (params, grads, m), kwargs


ALGORITHM = register(
    Algorithm(
        name="lion",
        classes=(Lion,),
        kernel="lion",
        state=_STATE,
        traffic=_traffic,
        example=_example,
        reference=lion_step,
        config_kinds=CONFIG_KINDS,
        functional={"lion_": lion_},
    )
)
