"""``Muon``: ``torch.optim.Muon`` with fp32 master weights and momentum for fp16/bf16 params, the
elementwise parts fused in two Triton launches per param bucket, and DeepSpeed's AdamW half
for the params Muon does not take.

The algorithm in one place: the class, its pure-torch reference step (the CPU fallback), its
functional form, the engine's Muon/AdamW split and its spec. The Triton kernels and the batched
Newton–Schulz iterations are ``kernels/muon.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .adam import ALGORITHM as ADAM
from .backend import backend_for, kernels
from .buckets import Bucket
from .masters import MASTER_STATES
from .optimizer import FusedOptimizer
from .spec import Algorithm, Traffic, elementwise_traffic, register

__all__ = ["Muon", "muon_param_groups"]

_STATE = {
    "momentum_buffer": "groups with use_muon (the default): the momentum",
    "step": "groups with use_muon=False (AdamW)",
    "exp_avg": "groups with use_muon=False (AdamW)",
    "exp_avg_sq": "groups with use_muon=False (AdamW)",
    "master_param": "fp16/bf16 params with master_weights=True",
    "master_remainder": 'bf16 params with master_weights="remainder" (int16)',
}
"""Per-param state, fp32 on the param's device, and when each exists."""

_REQUIRED = {True: ("momentum_buffer",), False: ("step", "exp_avg", "exp_avg_sq")}
_ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


class Muon(FusedOptimizer):
    """Muon (``torch.optim.Muon``'s arguments, defaults, errors, math and state names):
    momentum, Nesterov's look-ahead, Newton–Schulz orthogonalization of the update (in bf16,
    as torch), decoupled weight decay, a learning rate adjusted to the matrix's shape.

    Args:
        params, lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps,
            adjust_lr_fn: as ``torch.optim.Muon`` (2-D params only in Muon groups).
        betas: the AdamW moments' coefficients of groups with ``use_muon=False`` (default
            (0.9, 0.95), DeepSpeed's and Keller Jordan's auxiliary Adam).
        master_weights, backend: as in ``fp16_triton.Adam``.
        flat_buffers: only False: flat buffers launch a bucket as one tensor, and the
            iterations need each matrix.

    A param group may carry ``use_muon`` (default True, as DeepSpeed's ``MuonWithAuxAdam``):
    groups with ``use_muon=False`` are stepped by AdamW (``torch.optim.AdamW``'s math with the
    group's ``lr``, ``betas``, ``eps`` and ``weight_decay``), so that one optimizer, and one
    ``FP16Optimizer`` check and skip decision, covers a whole model (the engine's ``"type":
    "Muon"`` builds such groups: ``muon_param_groups``).

    State per param, fp32 on the param's device: ``momentum_buffer`` (Muon groups; torch keeps
    it in the param's dtype), or ``step``, ``exp_avg``, ``exp_avg_sq`` (AdamW groups), and
    ``master_param`` for fp16/bf16 params.
    """

    _state_names = tuple(name for name in _STATE if name not in MASTER_STATES)

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = (3.4445, -4.775, 2.0315),
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        *,
        betas: tuple[float, float] = (0.9, 0.95),
        master_weights: bool | str = True,
        backend: str = "auto",
        flat_buffers: bool = False,
    ):
        if flat_buffers:
            raise ValueError(
                "Muon does not take flat_buffers=True: flat buffers launch a bucket as one "
                "tensor, and the Newton–Schulz iterations need each matrix; use "
                "flat_buffers=False"
            )
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=tuple(ns_coefficients),
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
            betas=tuple(betas),
            use_muon=True,
        )
        options = dict(master_weights=master_weights, backend=backend, flat_buffers=False)
        super().__init__(params, defaults, **options)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's, then torch.optim.Muon's check: the params of a Muon group are matrices."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["use_muon"]:
            try:
                kernels("muon").check_matrices(group["params"])
            except ValueError as error:
                self.param_groups.pop()
                raise ValueError(
                    f"{error} (put it in a group with use_muon=False to step it with AdamW, "
                    "or set param.use_muon = False before fp16_triton.initialize)"
                ) from None

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        # torch.optim.Muon's checks and messages, then AdamW's for the AdamW groups.
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not isinstance(lr, torch.Tensor) or lr.device.type == "cpu":  # a GPU lr: no sync
            if not 0.0 <= lr:
                raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not 0.0 <= group["momentum"]:
            raise ValueError(f"momentum should be >= 0 but is: {group['momentum']}")
        if not 0.0 <= group["weight_decay"]:
            raise ValueError(f"weight decay should be >= 0 but is: {group['weight_decay']}")
        if group["adjust_lr_fn"] not in _ADJUST_LR_FNS:
            raise ValueError(
                f"Adjust learning rate function {group['adjust_lr_fn']} is not supported"
            )
        if len(group["ns_coefficients"]) != 3:
            raise ValueError("Coefficients must be a tuple of exactly 3 values")
        if group["ns_steps"] >= 100:
            raise ValueError("Number of steps must be less than 100 for computational efficiency")
        for index, beta in enumerate(group["betas"]):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {index}: {beta}")
        if not 0.0 <= group["eps"]:
            raise ValueError(f"Invalid epsilon value: {group['eps']}")

    def _state_kind(self, group: dict[str, Any]) -> tuple:
        return group["master_weights"], bool(group["use_muon"])

    def _group_cache(self, group: dict[str, Any]):
        """The base's, plus torch.optim.Muon's rule whenever it checks a group's params again
        (a new group, new params, ``use_muon`` switched on): the params of a Muon group are
        matrices. Before any state is made."""
        before = self._groups.get(id(group))
        cache = super()._group_cache(group)
        if cache is not before and group["use_muon"]:
            try:
                kernels("muon").check_matrices(group["params"])
            except ValueError:
                del self._groups[id(group)]  # checked again at the next step
                raise
        return cache

    def _check_state(self, p, group, state=None) -> None:
        # Which state a param needs depends on its group's half (``_required_state`` is read
        # by the base check); state of the other half means the group's use_muon was switched.
        use_muon = bool(group["use_muon"])
        self._required_state = _REQUIRED[use_muon]
        current = self.state.get(p) if state is None else state
        if isinstance(current, dict) and any(
            current.get(n) is not None for n in _REQUIRED[not use_muon]
        ):
            half = "Muon" if not use_muon else "AdamW"
            raise ValueError(
                f"{self._describe(p)} has {half} state, but its group now has "
                f"use_muon={use_muon}; delete its state (del optimizer.state[p]) to restart it "
                "in the new half, or switch the group back"
            )
        super()._check_state(p, group, state)

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        # The param's strides: the kernels pair elements by memory position.
        zeros = lambda: torch.zeros_like(p, dtype=torch.float32)  # noqa: E731
        if group["use_muon"]:
            return {"momentum_buffer": zeros()}
        step = torch.zeros((), dtype=torch.float32, device=p.device)
        return {"step": step, "exp_avg": zeros(), "exp_avg_sq": zeros()}

    def _prepare_bucket(self, bucket: Bucket, grads, group, **scaling) -> Callable[[], None]:
        state, masters = bucket.state, bucket.masters
        if not group["use_muon"]:
            beta1, beta2 = map(float, group["betas"])
            return ADAM.launch(
                bucket.backend, bucket.local_params, grads, state["exp_avg"],
                state["exp_avg_sq"], state["step"], masters=masters, lr=group["lr"],
                beta1=beta1, beta2=beta2, eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]), decoupled_weight_decay=True,
                cache=bucket.cache, **scaling,
            )  # fmt: skip
        if bucket.sharded:
            raise ValueError(
                "Muon cannot step DTensor (FSDP2) params in a Muon group: a rank holds a shard "
                "of each matrix, and the Newton–Schulz iterations need whole matrices; put them "
                "in a group with use_muon=False, or use DDP"
            )
        # The iterations depend on each matrix's shape, which a same-memory re-view
        # (p.data = p.data.view(...)) changes without the buckets noticing (``buckets.py``):
        # compared at every step, before anything is written, as torch's lerp_ would refuse.
        for p, g, buf in zip(bucket.params, grads, state["momentum_buffer"]):
            if not p.shape == g.shape == buf.shape:
                raise ValueError(
                    f"{self._describe(p)} has a grad of shape {tuple(g.shape)} and a "
                    f"momentum_buffer of shape {tuple(buf.shape)} (torch.optim.Muon fails here "
                    "too); if the param was reshaped on purpose, delete its state (del "
                    "optimizer.state[p]) and its grad"
                )
        return ALGORITHM.launch(
            bucket.backend, bucket.local_params, grads, state["momentum_buffer"],
            masters=masters, cache=bucket.cache, **_muon_options(group), **scaling,
        )  # fmt: skip


def _muon_options(group: dict[str, Any]) -> dict[str, Any]:
    """A Muon group's settings as the launcher's keywords (floats now, so that nothing can fail
    once a launch began)."""
    return dict(
        lr=group["lr"],
        weight_decay=float(group["weight_decay"]),
        momentum=float(group["momentum"]),
        nesterov=bool(group["nesterov"]),
        ns_coefficients=tuple(float(c) for c in group["ns_coefficients"]),
        eps=float(group["eps"]),
        ns_steps=int(group["ns_steps"]),
        adjust_lr_fn=group["adjust_lr_fn"],
    )


# ------------------------------------------------------------------------------- reference
def muon_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    *,
    masters: Sequence[torch.Tensor] | None = None,
    lr: float,
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
    cache=None,
) -> None:
    """Reference of ``kernels.muon.muon_step`` (same arguments and semantics), one matrix at a
    time in torch.optim.Muon's ops: the CPU fallback and the tests' second oracle."""
    muon, reference = kernels("muon"), kernels("reference")
    muon.check_matrices(params)
    start = reference.step_inputs(
        params, grads, masters, grad_scale, found_inf, norm_sq, max_norm, False
    )
    if start is None:
        return
    weights, g = start
    lr = float(lr)
    for weight, grad, buf in zip(weights, g, momentum_buffers):
        buf.lerp_(grad, 1.0 - momentum)
        update = (grad.lerp(buf, momentum) if nesterov else buf).bfloat16()[None]
        muon.newton_schulz_(update, ns_coefficients, ns_steps, eps)
        weight.mul_(1.0 - lr * weight_decay)
        weight.add_(update[0], alpha=-lr * muon.lr_ratio(weight.shape, adjust_lr_fn))
    reference.write_back(params, weights, masters)


# ------------------------------------------------------------------------------ functional
def muon_(params, grads, momentum_buffers, *, backend: str = "auto", **kwargs) -> None:
    """One Muon step over lists of matrices, in place (``fp16_triton.functional.muon_``).

    ``momentum_buffers`` are fp32; the keywords are ``kernels.muon.prepare_muon_step``'s
    (``masters``, ``lr``, ``weight_decay``, ``momentum``, ``nesterov``, ``ns_coefficients``,
    ``eps``, ``ns_steps``, ``adjust_lr_fn``, ``grad_scale``, ``found_inf``, ...)."""
    if len(params) == 0:
        return
    ALGORITHM.launch(backend_for(backend, params), params, grads, momentum_buffers, **kwargs)()


# ------------------------------------------------------------------------- engine's split
def muon_param_groups(model: torch.nn.Module, params, options: dict[str, Any]) -> list[dict]:
    """DeepSpeed's Muon split of ``params`` (a list of params or of param groups) into Muon and
    AdamW groups for the engine's ``"type": "Muon"``.

    A param goes to Muon when its ``use_muon`` attribute says so, else (as DeepSpeed tags
    them) when it is a matrix whose name in ``model`` contains neither "embed" nor "lm_head"
    (DeepSpeed also tags params of more dims and flattens them; torch.optim.Muon refuses
    them: here they go to AdamW). ``options["muon_lr"]`` / ``options["adam_lr"]`` set the two
    halves' learning rate (over the config's shared ``lr``) unless a given group has its own
    ``lr``.
    """
    names = {id(p): name for name, p in model.named_parameters()}
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    lrs = {True: options.get("muon_lr"), False: options.get("adam_lr")}
    split = []
    for group in groups:
        members = group["params"]
        members = [members] if isinstance(members, torch.Tensor) else list(members)
        for use_muon in (True, False):
            chosen = [p for p in members if _uses_muon(p, names.get(id(p), "")) == use_muon]
            if not chosen:
                continue
            half = {**group, "params": chosen, "use_muon": use_muon}
            if "lr" not in group and lrs[use_muon] is not None:
                half["lr"] = lrs[use_muon]
            split.append(half)
    return split


def _uses_muon(p: torch.Tensor, name: str) -> bool:
    tagged = getattr(p, "use_muon", None)
    if tagged is not None:
        return bool(tagged)
    # DeepSpeed tags every param of >= 2 dims and flattens conv filters; torch.optim.Muon (and
    # this class) takes matrices only, so params of more dims go to AdamW rather than fail.
    return p.ndim == 2 and "embed" not in name and "lm_head" not in name


# ------------------------------------------------------------------------------------ spec
def _traffic(param_dtype, grad_dtype=None, master=True, **_) -> Traffic:
    """The two Triton passes (``kernels/muon.py``): the momentum pass reads the grad and the
    momentum and writes the momentum and the bf16 update (2 B); the weight pass reads the
    update and the param (and master) and writes them. fp16 params and grads with masters:
    read 2 + 4 + 2 + 2 + 4, written 4 + 2 + 2 + 4 = 26 B/param, plus the bf16 update kept
    (2 B). The Newton–Schulz matmuls are compute: not counted."""
    one_pass = elementwise_traffic(param_dtype, grad_dtype, master, 1)
    return Traffic(read=one_pass.read + 2, written=one_pass.written + 2, kept=one_pass.kept + 2)


def _example(sizes, device, param_dtype=torch.float16):
    """Scratch inputs of ``prepare_muon_step``: a matrix of ``n`` elements per size
    (``matrix_shape``), random momenta."""
    device = torch.device(device)
    shapes = [matrix_shape(n) for n in sizes]
    params = [torch.randn(s, device=device).to(param_dtype) for s in shapes]
    grads = [torch.randn(s, device=device).to(param_dtype) for s in shapes]
    bufs = [torch.randn(s, device=device) for s in shapes]
    masters = [p.float() for p in params] if param_dtype != torch.float32 else None
    kwargs = dict(
        masters=masters, lr=1e-6, weight_decay=0.1, momentum=0.95, nesterov=True,
        ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7, ns_steps=5,
    )  # fmt: skip
    return (params, grads, bufs), kwargs


def _check_coefficients(key: str, value) -> tuple[float, float, float]:
    from .config import ConfigError

    if (
        not isinstance(value, (list, tuple))
        or len(value) != 3
        or not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in value)
    ):
        raise ConfigError(f"config key '{key}' must be a list of three numbers, got {value!r}")
    return tuple(float(c) for c in value)


def matrix_shape(n: int) -> tuple[int, int]:
    """The squarest matrix of ``n`` elements, taller than wide: the benchmark's and the
    examples' Muon params."""
    cols = max((d for d in range(1, math.isqrt(n) + 1) if n % d == 0), default=1)
    return n // cols, cols


def _check_optional_lr(key: str, value) -> float | None:
    from .config import ConfigError

    if value is None:
        return None  # the config's shared lr
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value:
        raise ConfigError(f"config key '{key}' must be a number >= 0, got {value!r}")
    return float(value)


def _check_adjust_lr_fn(key: str, value) -> str | None:
    from .config import ConfigError

    if value not in _ADJUST_LR_FNS:
        raise ConfigError(
            f"config key '{key}' must be null, 'original' or 'match_rms_adamw', got {value!r}"
        )
    return value


ALGORITHM = register(
    Algorithm(
        name="muon",
        classes=(Muon,),
        kernel="muon",
        state=_STATE,
        traffic=_traffic,
        example=_example,
        reference=muon_step,
        config_options={
            "muon_lr": (_check_optional_lr, None),
            "adam_lr": (_check_optional_lr, None),
        },
        config_kinds={"ns_coefficients": _check_coefficients, "adjust_lr_fn": _check_adjust_lr_fn},
        functional={"muon_": muon_},
        param_shape=matrix_shape,
        param_groups=muon_param_groups,
    )
)
