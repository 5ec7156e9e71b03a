"""``SGD``: a drop-in replacement for ``torch.optim.SGD`` with fp32 master weights for fp16/bf16
params and one fused Triton launch per param bucket."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .backend import backend_for
from .buckets import Bucket, like_param, local
from .compact_state import CONFIG_KINDS, CompactState, bucket_shard
from .masters import MASTER_STATES
from .optimizer import FusedOptimizer, check_lr, torch_compat_options
from .spec import Algorithm, elementwise_traffic, register, scratch_inputs

__all__ = ["SGD"]

_STATE = {
    "step": "momentum != 0 (one element; torch's SGD has none, see the class docstring)",
    "momentum_buffer": "momentum != 0 (fp32, or the group's state_dtype)",
    "master_param": "fp16/bf16 params with master_weights=True",
    "master_remainder": 'bf16 params with master_weights="remainder" (int16)',
    "sr_seed": "stochastic_rounding (int64, one element: the seed of the param's rounding)",
}
"""Per-param state on the param's device, and when each exists."""


class SGD(CompactState, FusedOptimizer):
    """SGD with momentum (``torch.optim.SGD``'s arguments, defaults, math and state names).

    Args:
        params, lr: as in ``fp16_triton.Adam`` (default lr 1e-3).
        momentum: momentum factor (default 0).
        dampening: dampening for momentum (default 0).
        weight_decay: L2 penalty added to the grad (default 0).
        nesterov: Nesterov momentum (default False).
        maximize: maximize the objective (default False).
        foreach, differentiable, fused, master_weights, backend, flat_buffers: as in
            ``fp16_triton.Adam``.
        state_dtype: the momentum buffer's dtype, ``torch.float32`` (default) or
            ``torch.bfloat16`` (widened in the kernel, stored rounded to nearest-even), as
            Adam's (``fp16_triton/compact_state.py``).
        stochastic_rounding, seed: as Adam's: a bf16 buffer and params without masters are
            rounded stochastically. Needs ``momentum != 0`` (the random words are counted by
            the momentum's step count); ``ValueError`` otherwise.

    State per param, fp32 on the param's device, when ``momentum != 0``: ``momentum_buffer``
    (it starts as the first grad, as in torch) and ``step``, a one-element count that tells the
    kernel which step is a param's first (torch's SGD has no ``step``; loading a torch state
    dict derives it from whether a buffer exists). Plus ``master_param`` for fp16/bf16 params
    and ``sr_seed`` (int64) with ``stochastic_rounding``.
    """

    _state_names = tuple(name for name in _STATE if name not in MASTER_STATES)
    _compact_state = ("momentum_buffer",)  # kept in state_dtype

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
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
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
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
        if group["momentum"] < 0.0:
            raise ValueError(f"Invalid momentum value: {group['momentum']}")
        if group["weight_decay"] < 0.0:
            raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if group.get("stochastic_rounding", False) and group["momentum"] == 0:
            raise ValueError(
                "SGD(stochastic_rounding=True) needs momentum != 0: the random words are counted "
                "by the momentum's step count; set a momentum or stochastic_rounding=False"
            )

    def _state_kind(self, group: dict[str, Any]) -> tuple:
        return group["master_weights"], group["momentum"] != 0, *self._compact_kind(group)

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        if group["momentum"] == 0:
            return {}
        return {
            "step": torch.zeros((), dtype=torch.float32, device=p.device),
            # The param's strides (channels_last too), as torch's clone of the first grad.
            "momentum_buffer": torch.zeros_like(p, dtype=group.get("state_dtype", torch.float32)),
        }

    def _complete_state(self, p: torch.Tensor, group: dict[str, Any], state: dict) -> None:
        self._complete_seed(p, group, state)
        if group["momentum"] == 0:
            return
        if state.get("momentum_buffer") is None:
            # torch saves None before a param's first momentum step, and momentum may be
            # switched on after state was made: the buffer starts at the next step.
            for name, value in self._init_state(local(p), group).items():
                state[name] = like_param(value, p)
        elif "step" not in state:  # torch's SGD keeps no step: a buffer means one was taken
            state["step"] = torch.ones((), dtype=torch.float32, device=local(p).device)

    def _prepare_bucket(self, bucket: Bucket, grads, group, **scaling) -> Callable[[], None]:
        kwargs = dict(
            masters=bucket.masters,
            lr=group["lr"],
            momentum=float(group["momentum"]),
            dampening=float(group["dampening"]),
            weight_decay=float(group["weight_decay"]),
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            **scaling,
        )
        if group.get("stochastic_rounding", False):
            kwargs.update(sr_seeds=bucket.state["sr_seed"], sr_shard=bucket_shard(bucket))
        args = (bucket.local_params, grads, bucket.state["momentum_buffer"], bucket.state["step"])
        return ALGORITHM.launch(bucket.backend, *args, cache=bucket.cache, **kwargs)


# ------------------------------------------------------------------------------ functional
def sgd_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffer_list: list[torch.Tensor | None],
    state_steps: Sequence[torch.Tensor] | None = None,
    *,
    masters: Sequence[torch.Tensor] | None = None,
    lr: float | torch.Tensor,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    sr_seeds: Sequence[torch.Tensor] | None = None,
    backend: str = "auto",
    cache=None,
) -> None:
    """One SGD step over tensor lists, in place (``torch.optim._functional.sgd``'s math;
    ``fp16_triton.functional.sgd_``).

    ``momentum_buffer_list`` may hold ``None`` where a param has no buffer yet, as torch's:
    with momentum, such entries are replaced in the list by new fp32 buffers (which the step
    initialises to the grad, torch's first-step rule). ``state_steps``: optional fp32
    one-element counts, 0 before a param's first step, advanced unless ``found_inf``; without
    them a param's first step is the one where its buffer was ``None`` (torch's rule; one
    small tensor per param per call). ``sr_seeds``: int64 one-element seeds, one per param,
    for stochastic rounding (needs momentum). Other arguments as in ``fp16_triton.adam.adam_``.
    """
    if len(params) == 0:
        return
    buffers = None
    if momentum != 0:
        if state_steps is None:
            state_steps = [
                torch.full((), float(b is not None), dtype=torch.float32, device=p.device)
                for p, b in zip(params, momentum_buffer_list)
            ]
        for i, (p, b) in enumerate(zip(params, momentum_buffer_list)):
            if b is None:
                momentum_buffer_list[i] = torch.zeros_like(p, dtype=torch.float32)
        buffers = momentum_buffer_list
    ALGORITHM.launch_lists(
        backend_for(backend, params), params, grads, buffers, state_steps, masters=masters,
        lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
        nesterov=nesterov, maximize=maximize, grad_scale=grad_scale, found_inf=found_inf,
        sr_seeds=sr_seeds, cache=cache,
    )()  # fmt: skip


# ------------------------------------------------------------------------------------ spec
def _traffic(
    param_dtype, grad_dtype=None, master=True, momentum=0.0, state_dtype=torch.float32, **_
):
    """SGD: the momentum buffer read and written once when ``momentum != 0``. fp16 params and
    grads with masters and momentum: read 2 + 2 + 4 x 2, write 2 + 4 x 2 = 22 B/param."""
    size = torch.empty((), dtype=state_dtype).element_size()
    return elementwise_traffic(param_dtype, grad_dtype, master, 1 if momentum else 0, size)


def _example(sizes, device, param_dtype=torch.float16):
    """Scratch inputs of ``prepare_sgd_step`` with momentum 0.9 (see ``adam._example``)."""
    params, grads, (bufs,), steps, masters = scratch_inputs(sizes, device, param_dtype, 1)
    kwargs = dict(masters=masters, lr=1e-6, momentum=0.9, dampening=0.0, weight_decay=0.0)
    return (params, grads, bufs, steps), kwargs


def _configure(type_name: str, params: dict, options: dict) -> str:
    if params["nesterov"] and (params["momentum"] <= 0.0 or params["dampening"] != 0.0):
        from .config import ConfigError

        # torch.optim.SGD rejects this combination too.
        raise ConfigError(
            "config key 'optimizer.params.nesterov' requires momentum > 0 and dampening 0"
        )
    return type_name


ALGORITHM = register(
    Algorithm(
        name="sgd",
        classes=(SGD,),
        kernel="sgd",
        state=_STATE,
        traffic=_traffic,
        example=_example,
        configure=_configure,
        config_kinds=CONFIG_KINDS,
        functional={"sgd_": sgd_},
    )
)
