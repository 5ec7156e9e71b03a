"""DeepSpeed's ``WarmupLR`` and ``WarmupDecayLR`` as torch ``LRScheduler`` classes.

The parameter names, defaults and formulas are DeepSpeed's (deepspeedai/DeepSpeed,
``deepspeed/runtime/lr_schedules.py``), so a DeepSpeed config's ``scheduler`` section gives the
same learning rate at every step here. Being ``LRScheduler`` subclasses, they also work with any
``torch.optim.Optimizer`` and have torch's ``state_dict``/``load_state_dict``/``get_last_lr``.

The formulas, with ``it`` DeepSpeed's ``last_batch_iteration`` and ``W = max(2,
warmup_num_steps)`` (DeepSpeed clamps the warm-up length to at least 2 so ``log(W) > 0``)::

    lr = warmup_min_lr + (warmup_max_lr - warmup_min_lr) * gamma(it)      (per param group)

    gamma(it), it < 0         : 0 (the lr is warmup_min_lr before the first step)
    gamma(it), 0 <= it < W    : log(it + 1) / log(W)     warmup_type 'log' (the default)
                                it / W                   warmup_type 'linear'
    WarmupLR,  it >= W        : 1
    WarmupDecayLR, it >= W    : max(0, (total_num_steps - it) / max(1, total_num_steps - W))

So ``WarmupDecayLR`` decays linearly back to ``warmup_min_lr`` (not to zero) at
``it == total_num_steps`` and stays there.

Step counting matches DeepSpeed exactly: DeepSpeed's scheduler starts at ``it = -1`` and each
``step()`` adds one, so after ``k`` calls of ``step()`` the lr is ``lr(k - 1)``. torch's
``LRScheduler`` performs one step inside its constructor, so here ``last_epoch`` runs one ahead:
``last_batch_iteration == last_epoch - 1``. The constructor argument ``last_batch_iteration`` has
DeepSpeed's meaning (resume after batch ``last_batch_iteration``).

Deliberate differences from DeepSpeed, all on invalid input: an unknown ``warmup_type`` raises
``ValueError`` (DeepSpeed logs a warning and uses 'log'); negative or non-finite learning rates
raise ``ValueError``.
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
from collections.abc import Sequence
from typing import Any, Union

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = [
    "WARMUP_TYPES",
    "SCHEDULERS",
    "WarmupLR",
    "WarmupDecayLR",
    "build_scheduler",
]

#: The warm-up curves DeepSpeed implements.
WARMUP_TYPES = ("log", "linear")

#: A learning rate argument: one number for every param group, one per group, or ``None``.
LrSpec = Union[float, Sequence[float], None]


def _check_int(name: str, value: Any, minimum: int) -> int:
    # bool is an int subclass in Python; True as a step count is always a mistake.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_lr(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def _per_group(optimizer: Optimizer, name: str, value: LrSpec) -> list[float]:
    """One learning rate per param group: a scalar is broadcast, a list/tuple must match."""
    groups = optimizer.param_groups
    if value is None:
        # Each group's own starting lr. DeepSpeed (recent master, WarmupLR only) takes the first
        # group's lr for every group; per group is the same for one group and keeps a
        # multi-group optimizer's ratios. "initial_lr" is the lr before any scheduler touched it.
        return [
            _check_lr(f"{name} (from param_groups[{i}])", float(g.get("initial_lr", g["lr"])))
            for i, g in enumerate(groups)
        ]
    if isinstance(value, (list, tuple)):
        if len(value) != len(groups):
            raise ValueError(
                f"{name} has {len(value)} values but the optimizer has {len(groups)} param "
                "groups; give one value per group or a single number"
            )
        return [_check_lr(f"{name}[{i}]", v) for i, v in enumerate(value)]
    return [_check_lr(name, value)] * len(groups)


class WarmupLR(LRScheduler):
    """Warm the lr of each param group up from ``warmup_min_lr`` to ``warmup_max_lr``, then hold.

    DeepSpeed's ``WarmupLR``: over ``W = max(2, warmup_num_steps)`` steps the lr follows
    ``min + (max - min) * log(it + 1) / log(W)`` (``warmup_type='log'``) or
    ``min + (max - min) * it / W`` (``'linear'``), where ``it`` is the 0-based
    ``last_batch_iteration``; from ``it == W`` on it is ``warmup_max_lr``. Before the first
    ``step()`` (``it == -1``) and at ``it == 0`` the lr is ``warmup_min_lr``.

    Args:
        optimizer: any ``torch.optim.Optimizer``; its param groups' ``lr`` is overwritten.
        warmup_min_lr: starting lr, a number or one number per param group. Default 0.
        warmup_max_lr: final lr, a number or one per param group. Default 0.001. ``None`` takes
            each group's own lr (recent DeepSpeed master uses the first group's lr for all).
        warmup_num_steps: warm-up length in steps, an integer >= 1 (1 behaves as 2, as in
            DeepSpeed). Default 1000.
        warmup_type: ``'log'`` (default) or ``'linear'``.
        last_batch_iteration: index of the last batch already trained, ``-1`` for a fresh start
            (DeepSpeed's meaning; torch's ``last_epoch`` is this plus one).

    Raises:
        ValueError: for a non-positive ``warmup_num_steps``, an unknown ``warmup_type``, a
            negative or non-finite lr, or a per-group list of the wrong length.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_min_lr: LrSpec = 0.0,
        warmup_max_lr: LrSpec = 0.001,
        warmup_num_steps: int = 1000,
        warmup_type: str = "log",
        last_batch_iteration: int = -1,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not a torch.optim.Optimizer")
        warmup_num_steps = _check_int("warmup_num_steps", warmup_num_steps, 1)
        if warmup_type not in WARMUP_TYPES:
            raise ValueError(f"warmup_type must be one of {WARMUP_TYPES}, got {warmup_type!r}")
        last_batch_iteration = _check_int("last_batch_iteration", last_batch_iteration, -1)
        if warmup_min_lr is None:
            raise ValueError("warmup_min_lr must be a number or a list of numbers, got None")

        self.min_lrs = _per_group(optimizer, "warmup_min_lr", warmup_min_lr)
        self.max_lrs = _per_group(optimizer, "warmup_max_lr", warmup_max_lr)
        self.delta_lrs = [hi - lo for hi, lo in zip(self.max_lrs, self.min_lrs)]
        # DeepSpeed clamps to 2 so that log(W) is never 0.
        self.warmup_num_steps = max(2, warmup_num_steps)
        self.warmup_type = warmup_type
        self.inverse_log_warm_up = 1.0 / math.log(self.warmup_num_steps)

        if last_batch_iteration != -1:
            # torch demands "initial_lr" when resuming; these schedules never read it (they are
            # closed-form in the step), so supply it rather than fail on a fresh optimizer.
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
        # torch's constructor steps once, so last_epoch ends at last_batch_iteration + 1.
        super().__init__(optimizer, last_epoch=last_batch_iteration)

    @property
    def last_batch_iteration(self) -> int:
        """DeepSpeed's step counter: -1 before the first ``step()``, then 0, 1, 2, ..."""
        return self.last_epoch - 1

    def _get_gamma(self, it: int) -> float:
        """The warm-up fraction in [0, 1] at DeepSpeed iteration ``it >= 0``."""
        if it < self.warmup_num_steps:
            if self.warmup_type == "log":
                return self.inverse_log_warm_up * math.log(it + 1)
            return it / self.warmup_num_steps
        return 1.0

    def get_lr(self) -> list[float]:  # type: ignore[override]
        """The lr of each param group at the current ``last_batch_iteration`` (closed form)."""
        it = self.last_batch_iteration
        if it < 0:
            return list(self.min_lrs)
        gamma = self._get_gamma(it)
        return [lo + delta * gamma for lo, delta in zip(self.min_lrs, self.delta_lrs)]

    def step(self, last_batch_iteration: int | None = None) -> None:  # type: ignore[override]
        """Advance one step, or jump to ``last_batch_iteration`` as DeepSpeed's ``step`` allows.

        The jump avoids torch's deprecated ``step(epoch)`` path: ``last_epoch`` is set one short
        and the ordinary step adds the one.
        """
        if last_batch_iteration is not None:
            it = _check_int("last_batch_iteration", last_batch_iteration, -1)
            self.last_epoch = it
        super().step()

    def state_dict(self) -> dict[str, Any]:
        """torch's state (every attribute but the optimizer) plus DeepSpeed's one key.

        ``last_batch_iteration`` is added so that a DeepSpeed scheduler can load this state.
        """
        state = super().state_dict()
        state["last_batch_iteration"] = self.last_batch_iteration
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict`, or DeepSpeed's ``{'last_batch_iteration': n}``.

        As in DeepSpeed and torch, the optimizer's lr is not changed until the next ``step()``.
        """
        state = dict(state_dict)
        it = state.pop("last_batch_iteration", None)
        if "last_epoch" in state:
            super().load_state_dict(state)
        elif it is not None:
            # A DeepSpeed checkpoint: only the counter is saved; our hyperparameters stay.
            self.last_epoch = _check_int("last_batch_iteration", it, -1) + 1
        else:
            raise ValueError(
                "scheduler state has neither 'last_epoch' (torch) nor 'last_batch_iteration' "
                f"(DeepSpeed); keys: {sorted(state_dict)}"
            )


class WarmupDecayLR(WarmupLR):
    """Warm up like :class:`WarmupLR`, then decay linearly back to ``warmup_min_lr``.

    DeepSpeed's ``WarmupDecayLR``: during warm-up (``it < W = max(2, warmup_num_steps)``) the lr is
    exactly :class:`WarmupLR`'s; from ``it == W`` on it is
    ``min + (max - min) * max(0, (total_num_steps - it) / max(1, total_num_steps - W))``, which is
    ``warmup_max_lr`` at ``it == W`` and reaches ``warmup_min_lr`` at ``it == total_num_steps``,
    staying there afterwards.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        total_num_steps: the step at which the lr is back at ``warmup_min_lr``; integer >= 1.
            Smaller than ``warmup_num_steps`` is allowed with a warning, as in DeepSpeed (the lr
            then drops straight to ``warmup_min_lr`` after warm-up).
        warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type, last_batch_iteration: as in
            :class:`WarmupLR`.

    Raises:
        ValueError: as :class:`WarmupLR`, and for a ``total_num_steps`` that is not an integer
            >= 1.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_num_steps: int,
        warmup_min_lr: LrSpec = 0.0,
        warmup_max_lr: LrSpec = 0.001,
        warmup_num_steps: int = 1000,
        warmup_type: str = "log",
        last_batch_iteration: int = -1,
    ) -> None:
        # Set before the base constructor: it already computes the first lr.
        self.total_num_steps = _check_int("total_num_steps", total_num_steps, 1)
        # DeepSpeed compares against the clamped warm-up length max(2, warmup_num_steps).
        if isinstance(warmup_num_steps, numbers.Integral) and self.total_num_steps < max(
            2, int(warmup_num_steps)
        ):
            warnings.warn(
                f"total_num_steps {total_num_steps} is less than warmup_num_steps "
                f"{warmup_num_steps}: the lr drops to warmup_min_lr right after warm-up",
                UserWarning,
                stacklevel=2,
            )
        super().__init__(
            optimizer,
            warmup_min_lr=warmup_min_lr,
            warmup_max_lr=warmup_max_lr,
            warmup_num_steps=warmup_num_steps,
            warmup_type=warmup_type,
            last_batch_iteration=last_batch_iteration,
        )

    def _get_gamma(self, it: int) -> float:
        """Warm-up fraction, then the linear decay factor ``(total - it) / (total - W)``."""
        if it < self.warmup_num_steps:
            return super()._get_gamma(it)
        span = max(1.0, float(self.total_num_steps - self.warmup_num_steps))
        return max(0.0, float(self.total_num_steps - it) / span)


#: Scheduler classes by the name used in a config's ``scheduler.type``.
SCHEDULERS: dict[str, type[WarmupLR]] = {
    "WarmupLR": WarmupLR,
    "WarmupDecayLR": WarmupDecayLR,
}


def build_scheduler(optimizer: Optimizer, scheduler_config: Any) -> WarmupLR | None:
    """Instantiate the scheduler a :class:`fp16_triton.config.SchedulerConfig` describes.

    Args:
        optimizer: the optimizer whose lr the scheduler drives.
        scheduler_config: an object with ``type`` (a key of :data:`SCHEDULERS`) and ``params``
            (keyword arguments of that class), normally ``load_config(...).scheduler``; ``None``
            returns ``None`` so callers can pass the config field unconditionally.

    Raises:
        ValueError: for an unknown type, unknown parameter names, or invalid values.
    """
    if scheduler_config is None:
        return None
    name = scheduler_config.type
    cls = SCHEDULERS.get(name)
    if cls is None:
        raise ValueError(f"unsupported scheduler type {name!r}; supported: {', '.join(SCHEDULERS)}")
    params = dict(scheduler_config.params or {})
    # Check names up front rather than catching TypeError from the call, which would also hide
    # genuine type errors raised inside the constructor.
    allowed = [p for p in inspect.signature(cls).parameters if p != "optimizer"]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown {name} parameter(s) {unknown}; valid parameters: {', '.join(allowed)}"
        )
    return cls(optimizer, **params)
