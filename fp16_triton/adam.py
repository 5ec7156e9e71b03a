"""``Adam`` and ``AdamW``: drop-in replacements for ``torch.optim.Adam`` / ``AdamW`` with fp32
master weights for fp16/bf16 params and one fused Triton launch per param bucket."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import int8_state
from .backend import backend_for
from .buckets import Bucket
from .compact_state import INT8_CONFIG_KINDS, CompactState, bucket_shard
from .kernels import quantize
from .masters import MASTER_STATES
from .optimizer import FusedOptimizer, check_lr, torch_compat_options
from .spec import Algorithm, elementwise_traffic, register, scratch_inputs

__all__ = ["Adam", "AdamW"]

_STATE = {
    "step": "always (one element; a skipped step does not advance it)",
    "exp_avg": "always",
    "exp_avg_sq": "always",
    "max_exp_avg_sq": "amsgrad",
    "master_param": "fp16/bf16 params with master_weights=True",
    "master_remainder": 'bf16 params with master_weights="remainder" (int16)',
    "sr_seed": "stochastic_rounding (int64, one element: the seed of the param's rounding)",
    "exp_avg_scale": 'state_dtype="int8" (fp32, one per 256 elements: kernels/quantize.py)',
    "exp_avg_sq_scale": 'state_dtype="int8" (likewise, for exp_avg_sq)',
}
"""Per-param state on the param's device, in torch's names, and when each exists: fp32, but
the moments (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) in the group's ``state_dtype``
and ``sr_seed`` (int64)."""


class Adam(CompactState, FusedOptimizer):
    """Adam (``torch.optim.Adam``'s arguments, defaults, math and state names).

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate, a float or a one-element tensor (default 1e-3).
        betas: coefficients of the running averages of the grad and its square: floats or
            one-element tensors (read on the host at every step: a GPU tensor costs a sync).
        eps: added to the denominator after the bias-corrected square root (default 1e-8).
        weight_decay: L2 penalty added to the grad (default 0).
        amsgrad: use the running maximum of the second moment (default False).
        maximize: maximize the objective (default False).
        decoupled_weight_decay: AdamW's decay (as torch.optim.Adam's argument of that name).
        foreach, capturable, fused: accepted for torch.optim compatibility and recorded in
            the param groups; the step is always one fused launch (Triton backend) or foreach
            ops (torch backend), and never syncs on the Triton backend.
        differentiable: only False (the fused step runs outside autograd).
        master_weights: keep an fp32 master copy of each fp16/bf16 param in
            ``state[p]["master_param"]`` and write the param back rounded to nearest (fp16:
            ties to even; bf16: ties away from zero, see docs/numerics.md) after every step
            (default True). ``"remainder"`` (bf16 params only): keep the same master in 2
            bytes, ``state[p]["master_remainder"]`` (int16, the master's low bits, which the
            param's bits complete: ``kernels/remainder.py``), bitwise the same run; state
            dicts hold the joined fp32 ``master_param`` either way. False: no master. fp32
            params are their own master.
        backend: ``"triton"`` (fused kernels), ``"torch"`` (the pure-torch reference) or
            ``"auto"`` (Triton for params on a GPU, torch otherwise). The environment
            variable ``FP16_TRITON_BACKEND`` overrides it.
        flat_buffers: keep each bucket's params, grads and state in flat buffers owned by the
            optimizer, the param tensors becoming views, so that a step reads no per-param
            attribute (host time independent of the number of tensors). Every param that
            requires grad is then stepped at every step, with a zero grad if it got none, and
            ``zero_grad()`` zeroes in place. See ``fp16_triton/flat_buffers.py`` (default False).
        state_dtype: the dtype the moments are kept in: ``torch.float32`` (default) or
            ``torch.bfloat16``, half the memory: the kernel widens them to fp32, updates them
            in fp32 as with fp32 moments and stores them rounded to nearest-even; masters stay
            fp32. A group option (``group["state_dtype"]``; changing it between steps converts
            the existing moments). Loading a state dict keeps the optimizer's own
            ``state_dtype`` and converts the loaded moments to it.
            ``"int8"``: 8-bit codes with an fp32 scale per 256 elements
            (``exp_avg_scale``, ``exp_avg_sq_scale`` states; ``kernels/quantize.py``), about
            a quarter of fp32's bytes; tensors under 4,096 elements or not contiguous keep
            fp32 moments; not with amsgrad (refused). FSDP2: blocks inside each rank's shard,
            saved dequantized (``fp16_triton/int8_state.py``).
        stochastic_rounding: round every low-precision value the step writes without an fp32
            copy behind it, bf16 moments and fp16/bf16 params with ``master_weights=False``,
            stochastically (unbiased: ``x`` between neighbours ``lo < hi`` becomes ``hi`` with
            probability ``(x - lo) / (hi - lo)``) instead of to nearest-even, so that updates
            below half an ulp survive on average. Params with masters stay the nearest
            rounding of their master (the master holds the small updates). Random bits from
            Philox on the device (no host sync), keyed by each param's ``sr_seed`` state and
            counted by its step and element index: reproducible for a seed, independent of
            the other params and of launch geometry, and bitwise on resume (the seeds are
            state). See ``kernels/stochastic.py``. A group option (default False). With
            ``flat_buffers`` a bucket draws from its first param's seed, counted over the
            whole buffer (``fp16_triton/flat_buffers.py``).
        seed: where the per-param seeds come from (default: ``torch.initial_seed()`` at
            construction): param ``i`` (its position over all groups) gets a 63-bit mix of
            ``seed`` and ``i``, the same whichever params get their state first. A group
            option, so ``state_dict()`` saves it and a resumed run seeds params that get
            their state later alike.

    State per param on the param's device: ``step`` (an fp32 one-element tensor that a skipped
    step does not advance), ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` (amsgrad) in
    ``state_dtype``, ``master_param`` (fp32, fp16/bf16 params with masters), ``sr_seed``
    (int64, with ``stochastic_rounding``).
    """

    _state_names = tuple(name for name in _STATE if name not in MASTER_STATES)
    _required_state = ("step", "exp_avg", "exp_avg_sq")
    _compact_state = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")  # kept in state_dtype
    _int8_moments = True

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        master_weights: bool | str = True,
        backend: str = "auto",
        flat_buffers: bool = False,
        state_dtype: torch.dtype | str = torch.float32,
        stochastic_rounding: bool = False,
        seed: int | None = None,
    ):
        # torch keeps one-element tensor betas as 0-dim tensors (torch.optim.optimizer._to_scalar).
        betas = tuple(b.squeeze() if isinstance(b, torch.Tensor) and b.dim() else b for b in betas)
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            decoupled_weight_decay=bool(decoupled_weight_decay),
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            seed=self._init_compact(seed, state_dtype),
            **torch_compat_options(foreach, capturable, differentiable, fused),
        )
        options = dict(master_weights=master_weights, backend=backend, flat_buffers=flat_buffers)
        super().__init__(params, defaults, **options)

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        self._check_compact(group)
        eps, (beta1, beta2), wd = group["eps"], group["betas"], group["weight_decay"]
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if isinstance(beta1, torch.Tensor) or isinstance(beta2, torch.Tensor):
            _check_tensor_betas(beta1, beta2)
        elif not 0.0 <= beta1 < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {beta1}")
        elif not 0.0 <= beta2 < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {beta2}")
        if not 0.0 <= wd:
            raise ValueError(f"Invalid weight_decay value: {wd}")

    def _state_kind(self, group: dict[str, Any]) -> tuple:
        # The compact options too: a switch converts the moments before the next step.
        return group["master_weights"], bool(group["amsgrad"]), *self._compact_kind(group)

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        # Moments with the param's strides (channels_last too), as torch's zeros_like: the
        # kernels pair param, grad and state elements by their position in memory.
        dtype = self._state_dtype("exp_avg", group, p)
        zeros = lambda: torch.zeros_like(p, dtype=dtype)  # noqa: E731
        state = {"step": torch.zeros((), dtype=torch.float32, device=p.device)}
        if dtype == torch.int8:
            state.update(int8_state.new_moments(p))
        else:
            state.update(exp_avg=zeros(), exp_avg_sq=zeros())
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = zeros()
        return state

    def _complete_state(self, p: torch.Tensor, group: dict[str, Any], state: dict) -> None:
        if group["amsgrad"] and state.get("max_exp_avg_sq") is None and "exp_avg_sq" in state:
            # amsgrad switched on after state was made (torch creates the maximum at the first
            # amsgrad step too): start from the current moment.
            state["max_exp_avg_sq"] = state["exp_avg_sq"].clone()
        self._complete_seed(p, group, state)

    def _prepare_bucket(self, bucket: Bucket, grads, group, **scaling) -> Callable[[], None]:
        # Floats now (a tensor beta included), so that nothing can fail once a launch began.
        beta1, beta2 = map(float, group["betas"])
        kwargs = dict(
            masters=bucket.masters,
            max_exp_avg_sqs=bucket.state["max_exp_avg_sq"],
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            decoupled_weight_decay=group["decoupled_weight_decay"],
            amsgrad=group["amsgrad"],
            maximize=group["maximize"],
            **scaling,
        )
        if group.get("stochastic_rounding", False):
            kwargs.update(sr_seeds=bucket.state["sr_seed"], sr_shard=bucket_shard(bucket))
        if bucket.state.get("exp_avg_scale") and bucket.state["exp_avg"][0].dtype == torch.int8:
            kwargs.update(
                exp_avg_scales=bucket.state["exp_avg_scale"],
                exp_avg_sq_scales=bucket.state["exp_avg_sq_scale"],
            )
        args = (
            bucket.local_params,
            grads,
            bucket.state["exp_avg"],
            bucket.state["exp_avg_sq"],
            bucket.state["step"],
        )
        return ALGORITHM.launch(bucket.backend, *args, cache=bucket.cache, **kwargs)


class AdamW(Adam):
    """AdamW: Adam with decoupled weight decay (``p *= 1 - lr * weight_decay``), default
    ``weight_decay=1e-2``; otherwise exactly ``Adam`` (see its arguments)."""

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        master_weights: bool | str = True,
        backend: str = "auto",
        flat_buffers: bool = False,
        state_dtype: torch.dtype | str = torch.float32,
        stochastic_rounding: bool = False,
        seed: int | None = None,
    ):
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            master_weights=master_weights,
            backend=backend,
            flat_buffers=flat_buffers,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            seed=seed,
        )


def _check_tensor_betas(*betas) -> None:
    """torch's checks of betas given as tensors (one element each, in [0, 1)); a GPU tensor's
    value is not compared (that would sync the device at every step)."""
    for index, beta in enumerate(betas):
        if isinstance(beta, torch.Tensor):
            if beta.numel() != 1:
                raise ValueError(f"Tensor betas[{index}] must be 1-element")
            if beta.device.type != "cpu":
                continue
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}: {beta}")


# ------------------------------------------------------------------------------ functional
def adam_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    *,
    max_exp_avg_sqs: Sequence[torch.Tensor] | None = None,
    masters: Sequence[torch.Tensor] | None = None,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    sr_seeds: Sequence[torch.Tensor] | None = None,
    exp_avg_scales: Sequence[torch.Tensor] | None = None,
    exp_avg_sq_scales: Sequence[torch.Tensor] | None = None,
    backend: str = "auto",
    cache=None,
) -> None:
    """One Adam step (AdamW's with ``decoupled_weight_decay``) over tensor lists, in place
    (``fp16_triton.functional.adam_``).

    ``torch.optim._functional.adam``'s hyperparameters, with two differences of form:
    ``max_exp_avg_sqs`` is a keyword (torch passes it positionally before ``state_steps``) and
    ``state_steps`` must be fp32 one-element tensors, the count *before* this step (torch's
    fused and capturable paths keep them so too); they advance by one unless ``found_inf``.

    ``masters``: fp32 master weights of fp16/bf16 params; the update runs on them and the params
    receive their rounding to nearest (bf16: ties away from zero, docs/numerics.md).
    ``grad_scale``: the grads are divided by it (the loss scale; the grads themselves are not
    written). ``found_inf``: a non-zero value skips
    the whole step, step counts included. Both are one-element fp32 tensors on the params'
    device, read by the kernel (no sync). ``sr_seeds``: int64 one-element seeds, one per
    param, for stochastic rounding of bf16 moments and of params without masters (the
    optimizers' ``stochastic_rounding``). ``masters`` may also be int16 remainders of bf16
    params (``master_weights="remainder"``: ``kernels/remainder.py``). int8 moments
    (``state_dtype="int8"``): ``exp_avgs`` and ``exp_avg_sqs`` are int8 codes and
    ``exp_avg_scales``, ``exp_avg_sq_scales`` their fp32 block scales, ``ceil(numel / 256)``
    per tensor (``kernels/quantize.py``; ``fp16_triton.int8_state.new_moments`` makes them).
    See ``kernels/adam.py`` for the exact math.
    """
    if len(params) == 0:
        return
    ALGORITHM.launch_lists(
        backend_for(backend, params), params, grads, exp_avgs, exp_avg_sqs, state_steps,
        masters=masters, max_exp_avg_sqs=max_exp_avg_sqs, lr=lr, beta1=beta1, beta2=beta2,
        eps=eps, weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
        amsgrad=amsgrad, maximize=maximize, grad_scale=grad_scale, found_inf=found_inf,
        sr_seeds=sr_seeds, exp_avg_scales=exp_avg_scales, exp_avg_sq_scales=exp_avg_sq_scales,
        cache=cache,
    )()  # fmt: skip


def adamw_(*args, **kwargs) -> None:
    """``adam_`` with decoupled weight decay (``p *= 1 - lr * weight_decay``), as
    ``torch.optim._functional.adamw``."""
    adam_(*args, decoupled_weight_decay=True, **kwargs)


# ------------------------------------------------------------------------------------ spec
def _traffic(
    param_dtype, grad_dtype=None, master=True, amsgrad=False, state_dtype=torch.float32, **_
):
    """Adam/AdamW: ``exp_avg``, ``exp_avg_sq`` (and amsgrad's maximum) read and written once.
    fp16 params and grads with masters: read 2 + 2 + 4 x 3, write 2 + 4 x 3 = 30 B/param;
    with bf16 moments read 2 + 2 + 4 + 2 + 2, write 2 + 4 + 2 + 2 = 22, kept 12. bf16 params
    with ``master="remainder"``: the master takes 2 bytes, not 4: 26 B/param moved with fp32
    moments, 18 with bf16 ones (kept 10). int8 moments (tensors of at least 4,096 elements,
    ``kernels/quantize.py``): a byte per element plus a 4-byte scale per 256, 1 + 1/64 each:
    with remainders read 2 + 2 + 2 + 2 x 1.016, write 2 + 2 + 2 x 1.016 = 14.06 B/param,
    16.06 with the check pass, kept 8.03 (4.03 of it optimizer state)."""
    if state_dtype == "int8":
        size = 1 + 4 / quantize.BLOCK  # 1.015625, exact in binary
    else:
        size = torch.empty((), dtype=state_dtype).element_size()
    return elementwise_traffic(param_dtype, grad_dtype, master, 3 if amsgrad else 2, size)


def _example(sizes, device, param_dtype=torch.float16):
    """Scratch inputs of ``prepare_adam_step`` (``spec.scratch_inputs``); lr 1e-6 so that
    repeated trials barely move them."""
    params, grads, (m, v), steps, masters = scratch_inputs(sizes, device, param_dtype, 2)
    kwargs = dict(masters=masters, lr=1e-6, beta1=0.9, beta2=0.999, eps=1e-8)
    kwargs.update(weight_decay=0.01, decoupled_weight_decay=True)
    return (params, grads, m, v, steps), kwargs


def _configure(type_name: str, params: dict, options: dict) -> str:
    """DeepSpeed's Adam: ``"Adam"`` is AdamW unless ``adam_w_mode`` is false
    (``effective_adam_w_mode = type == "adamw" or adam_w_mode``, deepspeedai/DeepSpeed:
    ``deepspeed/runtime/engine.py``); ``torch_adam`` is kept for the engine to read."""
    import warnings

    from .config import ConfigError

    if not options.pop("bias_correction"):
        raise ConfigError(
            "config key 'optimizer.params.bias_correction' = false is not supported; "
            "fp16_triton's Adam always applies bias correction (as torch.optim.Adam does)"
        )
    if type_name == "AdamW" and not options["adam_w_mode"]:
        warnings.warn(
            "optimizer.params.adam_w_mode = false has no effect with type 'AdamW' (DeepSpeed "
            "ignores it too); use type 'Adam' with adam_w_mode = false for L2-regularised Adam",
            UserWarning,
            stacklevel=4,
        )
    if params.get("state_dtype") == "int8" and params.get("amsgrad"):
        raise ConfigError(
            "config keys 'optimizer.params.state_dtype' = \"int8\" and "
            "'optimizer.params.amsgrad' = true do not go together: amsgrad's running maximum "
            'is not built for int8 moments; use "amsgrad": false, or "state_dtype": "bf16"'
        )
    options["adam_w_mode"] = type_name == "AdamW" or options["adam_w_mode"]
    return "AdamW" if options["adam_w_mode"] else "Adam"


ALGORITHM = register(
    Algorithm(
        name="adam",
        classes=(Adam, AdamW),
        kernel="adam",
        state=_STATE,
        traffic=_traffic,
        example=_example,
        # DeepSpeed's FusedAdam default for both types (torch.optim.AdamW's is 0.01).
        config_defaults={"weight_decay": 0.0},
        config_options={
            "bias_correction": ("bool", True),
            "adam_w_mode": ("bool", True),
            "torch_adam": ("bool", False),
        },
        configure=_configure,
        config_kinds=INT8_CONFIG_KINDS,
        functional={"adam_": adam_, "adamw_": adamw_},
    )
)
