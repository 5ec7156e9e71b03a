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
from .buckets import Bucket
from .optimizer import FusedOptimizer, check_lr, torch_compat_options
from .spec import Algorithm, elementwise_traffic, register, scratch_inputs

__all__ = ["Lion"]

_STATE = {
    "exp_avg": "always: the momentum",
    "master_param": "fp16/bf16 params with master_weights",
}
"""Per-param state, fp32 on the param's device, and when each exists."""


class Lion(FusedOptimizer):
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

    State per param, fp32 on the param's device: ``exp_avg`` (the momentum) and
    ``master_param`` for fp16/bf16 params. No step count: Lion has no bias correction.
    """

    _state_names = tuple(name for name in _STATE if name != "master_param")
    _required_state = ("exp_avg",)

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
        master_weights: bool = True,
        backend: str = "auto",
        flat_buffers: bool = False,
    ):
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            weight_decay=weight_decay,
            maximize=maximize,
            **torch_compat_options(foreach, None, differentiable, fused),
        )
        options = dict(master_weights=master_weights, backend=backend, flat_buffers=flat_buffers)
        super().__init__(params, defaults, **options)

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        for index, beta in enumerate(group["betas"]):  # [0, 1), as torch's Adam and the config
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {index}: {beta}")
        if not 0.0 <= group["weight_decay"]:
            raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        # The param's strides (channels_last too): the kernel pairs elements by memory position.
        return {"exp_avg": torch.zeros_like(p, dtype=torch.float32)}

    def _prepare_bucket(self, bucket: Bucket, grads, group, **scaling) -> Callable[[], None]:
        beta1, beta2 = map(float, group["betas"])
        return ALGORITHM.launch(
            bucket.backend,
            bucket.local_params,
            grads,
            bucket.state["exp_avg"],
            masters=bucket.state["master_param"],
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
    cache=None,
) -> None:
    """Reference of ``kernels.lion.lion_step`` (same arguments and semantics), in torch's
    foreach ops in the kernel's order: the CPU fallback and the tests' second oracle."""
    reference = kernels("reference")
    start = reference.step_inputs(
        params, grads, masters, grad_scale, found_inf, norm_sq, max_norm, maximize
    )
    if start is None:
        return
    weights, g = start
    lr, weight_decay, exp_avgs = float(lr), float(weight_decay), list(exp_avgs)
    c = torch._foreach_mul(exp_avgs, beta1)
    torch._foreach_add_(c, torch._foreach_mul(g, 1.0 - beta1))
    if weight_decay != 0:
        torch._foreach_mul_(weights, 1.0 - lr * weight_decay)
    torch._foreach_add_(weights, torch._foreach_sign(c), alpha=-lr)
    torch._foreach_mul_(exp_avgs, beta2)
    torch._foreach_add_(exp_avgs, torch._foreach_mul(g, 1.0 - beta2))
    reference.write_back(params, weights)


# ------------------------------------------------------------------------------ functional
def lion_(params, grads, exp_avgs, *, backend: str = "auto", **kwargs) -> None:
    """One Lion step over tensor lists, in place (``fp16_triton.functional.lion_``).

    ``exp_avgs`` are the fp32 momenta; the keywords are ``kernels.lion.prepare_lion_step``'s
    (``masters``, ``lr``, ``beta1``, ``beta2``, ``weight_decay``, ``maximize``, ``grad_scale``,
    ``found_inf``, ...), as in ``fp16_triton.adam.adam_``."""
    if len(params) == 0:
        return
    ALGORITHM.launch(backend_for(backend, params), params, grads, exp_avgs, **kwargs)()


# ------------------------------------------------------------------------------------ spec
def _traffic(param_dtype, grad_dtype=None, master=True, **_):
    """Lion: ``exp_avg`` read and written once. fp16 params and grads with masters: read 2 + 2
    + 4 x 2, write 2 + 4 x 2 = 22 B/param (AdamW: 30)."""
    return elementwise_traffic(param_dtype, grad_dtype, master, 1)


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
        functional={"lion_": lion_},
    )
)
