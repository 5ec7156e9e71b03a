"""Loss scaling for fp16 training: a static scaler and DeepSpeed's dynamic scaler.

:class:`DynamicLossScaler` reproduces the update rule of DeepSpeed 0.19's ``DynamicLossScaler``
(``deepspeed/runtime/fp16/loss_scaler.py``), including hysteresis, so that a run moved from
DeepSpeed sees the same sequence of loss scales. Unlike DeepSpeed it keeps its state in 0-dim
tensors on the gradients' device, and :meth:`DynamicLossScaler.update_scale` accepts the overflow
flag as a device tensor: the update then runs as one Triton kernel on a GPU
(``kernels/loss_scale.py``; its torch-op reference elsewhere) with no host synchronisation,
which keeps the optimizer step asynchronous and CUDA-graph capturable.

Typical use by an optimizer wrapper::

    scaler = get_loss_scaler(ds_config["fp16"])   # state on the CPU
    scaler.to(grads_device)                       # once
    ...
    scaler.raise_if_error()                       # start of step(): surface a pending error
    skip = found_inf + scaler.pending_error       # device tensors, no sync
    # unscale with scaler.scale_tensor, step unless skip != 0, *then* update the scale:
    scaler.update_scale(found_inf)

Unscale *before* :meth:`~DynamicLossScaler.update_scale`: the update changes ``scale_tensor`` in
place, and dividing by the updated scale after a growth step would unscale by twice the scale
used in backward (DeepSpeed PR 8588).

Why one file of ~700 lines: the dynamic rule has a host path and a device path that must agree
step for step, so they live side by side, with the state and state dict they share; what a
scaler accepts (arguments, flags, state dicts) is checked in ``loss_scaler_checks.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Union

import torch

from .backend import resolve_backend
from .config_sections import parse_fp16
from .loss_scaler_checks import (
    _check_bool,
    _check_flag,
    _check_int,
    _check_scale,
    _validate_state_dict,
)

__all__ = ["LossScaler", "DynamicLossScaler", "MinLossScaleError", "get_loss_scaler"]

logger = logging.getLogger(__name__)

DeviceLike = Union[str, int, torch.device]


class MinLossScaleError(RuntimeError):
    """The gradients overflowed while the dynamic loss scale was already at its minimum.

    Raised by :meth:`DynamicLossScaler.update_scale` (host-bool path) or by
    :meth:`DynamicLossScaler.raise_if_error` (tensor path) when ``raise_error_at_min_scale`` is
    true. The message starts with DeepSpeed's wording, "Current loss scale already at minimum",
    so that searches for the DeepSpeed error find it.
    """


def _min_scale_message(min_scale: float, iteration: int) -> str:
    return (
        f"Current loss scale already at minimum (min_scale={min_scale:g}) and the gradients "
        f"overflowed again at iteration {iteration}: cannot decrease the scale. Try bf16 instead "
        "of fp16, a lower learning rate, gradient clipping, or a higher min_scale (fp16 config "
        "'min_loss_scale'), or pass raise_error_at_min_scale=False to keep training at the "
        "minimum scale (overflowing steps are then skipped)."
    )


# --------------------------------------------------------------------------------------------
# Static scaler (also the base class and the "no scaling" scaler).
# --------------------------------------------------------------------------------------------


class LossScaler:
    """A static loss scale; with ``scale=1.0`` it is the "no scaling" scaler (bf16, fp32).

    The scale is kept in a 0-dim float32 tensor (:attr:`scale_tensor`) created on the CPU;
    :meth:`to` moves it to the gradients' device so that :meth:`scale_loss` and the unscale
    in the optimizer never copy it from the host. :meth:`update_scale` accepts the same
    arguments as the dynamic scaler and changes nothing, so a consumer can treat both alike.

    Args:
        scale: the loss scale, a positive number finite in float32 (stored rounded to
            float32). ``ValueError`` names the argument otherwise.
    """

    def __init__(self, scale: float = 1.0) -> None:
        scale = _check_scale("scale", scale)
        self._scale = torch.tensor(scale, dtype=torch.float32)
        # 1.0 = a minimum-scale error is pending (tensor path of the dynamic scaler). The static
        # scaler never sets it, but owns it so a consumer can add `pending_error` unconditionally.
        self._error_flag = torch.zeros((), dtype=torch.float32)
        self._reset_host_mirror()

    # ---- device handling -------------------------------------------------------------------

    def _tensors(self) -> dict[str, torch.Tensor]:
        """Attribute names of all state tensors, for :meth:`to`."""
        return {"_scale": self._scale, "_error_flag": self._error_flag}

    def _reset_host_mirror(self) -> None:
        # On CUDA the error flag (and the iteration count, for the error's message) is copied
        # into pinned host memory after each tensor-path update, and an event tells
        # raise_if_error(blocking=False) when that copy has landed: reading it, and raising
        # with the iteration in the message, then costs no device sync. Allocated here (in
        # to()) rather than lazily in update_scale, because pinning memory may synchronise.
        self._host_error: torch.Tensor | None = None
        self._host_iter: torch.Tensor | None = None
        self._error_event: torch.cuda.Event | None = None
        self._host_copy_captured = False
        self._device_update = None  # the update function for this device, chosen at first use
        if self._error_flag.device.type == "cuda":
            self._host_error = torch.zeros((), dtype=torch.float32, pin_memory=True)
            self._host_iter = torch.zeros((), dtype=torch.int64, pin_memory=True)
            self._error_event = torch.cuda.Event()
        self._event_recorded = False

    _HOST_MIRROR = (
        "_host_error",
        "_host_iter",
        "_error_event",
        "_host_copy_captured",
        "_device_update",
        "_event_recorded",
    )

    def __getstate__(self) -> dict:
        # copy/pickle: the host mirror (a pinned buffer and a CUDA event, which cannot be
        # copied) is left out and rebuilt for the copy's device.
        return {k: v for k, v in self.__dict__.items() if k not in self._HOST_MIRROR}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_host_mirror()

    def to(self, device: DeviceLike) -> LossScaler:
        """Move all state tensors to ``device`` (a one-off copy) and return ``self``.

        Call it once, with the gradients' device, before the first step: the tensor-path
        update and :meth:`scale_loss` then never touch host memory.
        """
        device = torch.device(device)
        for name, tensor in self._tensors().items():
            setattr(self, name, tensor.to(device))
        self._reset_host_mirror()
        return self

    @property
    def device(self) -> torch.device:
        """The device that holds the state tensors."""
        return self._scale.device

    # ---- reading the scale -----------------------------------------------------------------

    @property
    def dynamic(self) -> bool:
        """``False`` for the static scaler, ``True`` for :class:`DynamicLossScaler`."""
        return False

    @property
    def scale_tensor(self) -> torch.Tensor:
        """The current scale as a 0-dim float32 tensor on :attr:`device` (no sync).

        This is the live state tensor, updated in place by ``update_scale``; clone it to keep a
        snapshot. Do not write to it.
        """
        return self._scale

    @property
    def loss_scale(self) -> float:
        """The current scale as a Python float. Reading it synchronises with the device."""
        return float(self._scale.item())

    @property
    def cur_scale(self) -> float:
        """Alias of :attr:`loss_scale` (DeepSpeed's attribute name). Synchronises."""
        return self.loss_scale

    @property
    def error_flag(self) -> torch.Tensor:
        """0-dim float32 device tensor: 1.0 while a minimum-scale error is pending, else 0.0."""
        return self._error_flag

    @property
    def pending_error(self) -> torch.Tensor:
        """Same tensor as :attr:`error_flag`, to be added to the consumer's skip flag.

        While it is non-zero the consumer must apply no update, so that nothing changes
        between the overflow at the minimum scale and the step that raises.
        """
        return self._error_flag

    # ---- scaling ---------------------------------------------------------------------------

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Return ``loss * scale`` without calling backward.

        The multiplication is done as ``torch.amp.GradScaler`` does it: by the float32 scale
        tensor, moved to the loss's device without blocking. A 0-dim fp16 loss is thereby
        promoted to float32 (so a large scale cannot overflow it); an fp32 loss, the usual case
        after a reduction, stays fp32.
        """
        return loss * self._scale.to(device=loss.device, non_blocking=True)

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        """Backpropagate the scaled loss: ``scale_loss(loss).backward(retain_graph=...)``."""
        self.scale_loss(loss).backward(retain_graph=retain_graph)

    # ---- updates ---------------------------------------------------------------------------

    def update_scale(
        self, overflow: bool | torch.Tensor, record: torch.Tensor | None = None
    ) -> None:
        """Accept an overflow flag (bool or one-element tensor) and keep the scale unchanged.
        ``record`` (see ``DynamicLossScaler.update_scale``) gets the scale twice, hysteresis 0."""
        _check_flag(overflow)
        if record is not None:
            record[0::2].copy_(self._scale)
            record[1::2].zero_()

    def raise_if_error(self, blocking: bool = False) -> None:
        """Raise a pending :class:`MinLossScaleError`; the static scaler never has one."""

    # ---- checkpointing ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state: ``{"dynamic": False, "cur_scale": float}``. Synchronises."""
        return {"dynamic": False, "cur_scale": self.loss_scale}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; ``ValueError``, state untouched, if it is wrong."""
        values = _validate_state_dict(state_dict, dynamic=False)
        self._scale.fill_(values["cur_scale"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.loss_scale:g}, device={self.device})"


# --------------------------------------------------------------------------------------------
# Dynamic scaler.
# --------------------------------------------------------------------------------------------


class DynamicLossScaler(LossScaler):
    """Dynamic loss scaling with DeepSpeed 0.19's update rule, runnable on the device.

    **Update rule** (``update_scale(overflow)``, per iteration; ``delayed_shift`` is DeepSpeed's
    name for ``hysteresis``). State starts at ``cur_scale = init_scale``, ``cur_iter = 0``,
    ``last_overflow_iter = -1``, ``cur_hysteresis = hysteresis``.

    * overflow:

      - if ``hysteresis == 1`` or ``cur_hysteresis == 1``: if ``cur_scale == min_scale`` and
        ``raise_error_at_min_scale``, raise :class:`MinLossScaleError` (see below); otherwise
        ``cur_scale = max(cur_scale / scale_factor, min_scale)``;
      - else ``cur_hysteresis -= 1`` (the scale is kept);
      - then ``last_overflow_iter = cur_iter``.

    * no overflow:

      - if ``consecutive_hysteresis``: ``cur_hysteresis = hysteresis`` (refill on every clean
        step, so only *consecutive* overflows use it up);
      - ``stable = cur_iter - last_overflow_iter - 1``; if ``stable > 0`` and
        ``stable % scale_window == 0``: refill ``cur_hysteresis = hysteresis`` (when not
        consecutive) and ``cur_scale *= scale_factor``.

    * always ``cur_iter += 1`` (skipped at the raising iteration, whose state is left as it was).

    So with the defaults (hysteresis 2) the first overflow only uses up hysteresis and the
    second halves the scale; the scale doubles after each run of ``scale_window`` clean
    iterations, counted from the last overflow.

    **Arithmetic.** The scale is float32, as is every value it is combined with (``min_scale``,
    ``scale_factor``, ``init_scale`` are rounded to float32 at construction and reported rounded).
    Both paths run one rule, the Triton kernel or its torch reference, with identical float32
    results; with ``scale_factor=2`` this is exactly DeepSpeed's float64 sequence. One deliberate
    difference from DeepSpeed, forced by float32 storage: a growth whose result would be infinite
    (above ~3.4e38) keeps the scale (hysteresis is still refilled), as ``torch.amp.GradScaler``
    does; DeepSpeed's float64 scale would grow, overflow the fp32 loss, and come back down, while an
    infinite float32 scale could never come back (inf / 2 is inf). The counters are int64 tensors:
    exact for any run length, whereas float32 counters would stop counting exactly after 2**24
    (16.7M) iterations and silently break the ``stable % scale_window`` test.

    **Two update paths.**

    * ``update_scale(True/False)`` (Python bool, e.g. after ``found_inf.item()``): the tensor
      path's update, then one read of its result (one sync on CUDA): it logs every scale or
      hysteresis change at INFO and raises :class:`MinLossScaleError` at once, the state left
      as it was before the update.
    * ``update_scale(flag_tensor)`` (any one-element float/bool/int tensor; overflow means
      ``flag != 0``, so torch's summed ``found_inf`` of 2.0 counts): one Triton launch on a GPU
      (``kernels/loss_scale.py``), torch ops (``torch.where``) elsewhere; no ``.item()`` and no
      Python branching on values, hence no host sync and safe inside CUDA graph capture. The
      flag should live on :attr:`device` (a CPU flag is copied over). Nothing is logged:
      knowing what changed would need a sync. At the minimum scale it sets
      :attr:`error_flag` to 1.0 and leaves the whole state unchanged (as the host path does
      before raising); while the flag stays set, further updates change nothing.
      :meth:`raise_if_error` raises the error, which the consumer calls at the start of its
      next ``step()``; it adds :attr:`pending_error` to its skip flag meanwhile. **The error at
      the minimum may therefore surface at the next ``step()`` call (or later, when not
      blocking on CUDA) rather than the one that overflowed; nothing is applied in between.**

    Args:
        init_scale: initial scale (default 2**16), positive and finite in float32.
        scale_window: clean iterations between growths (default 1000), integer >= 1.
        min_scale: lower bound of the scale (default 1.0), positive, at most ``init_scale``.
        hysteresis: overflows tolerated before the scale drops (default 2), integer >= 1;
            DeepSpeed's ``delayed_shift``.
        consecutive_hysteresis: refill hysteresis on every clean iteration (default False).
        raise_error_at_min_scale: raise when an overflow hits the minimum scale (default True);
            if False the scale stays at ``min_scale`` and the overflowing steps are skipped.
        scale_factor: growth and back-off factor (default 2.0), greater than 1.

    ``ValueError`` names the offending argument.
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        scale_window: int = 1000,
        min_scale: float = 1.0,
        hysteresis: int = 2,
        consecutive_hysteresis: bool = False,
        raise_error_at_min_scale: bool = True,
        scale_factor: float = 2.0,
    ) -> None:
        init_scale = _check_scale("init_scale", init_scale)
        self._scale_window = _check_int("scale_window", scale_window, 1)
        min_scale = _check_scale("min_scale", min_scale)
        if min_scale > init_scale:
            raise ValueError(
                f"min_scale ({min_scale:g}) must not be above init_scale ({init_scale:g})"
            )
        self._hysteresis = _check_int("hysteresis", hysteresis, 1)
        self._consecutive = _check_bool("consecutive_hysteresis", consecutive_hysteresis)
        self._raise_at_min = _check_bool("raise_error_at_min_scale", raise_error_at_min_scale)
        scale_factor = _check_scale("scale_factor", scale_factor)
        if scale_factor <= 1.0:
            # Checked after rounding: 1 + 1e-9 is 1.0 in float32 and would never change the scale.
            raise ValueError(f"scale_factor must be greater than 1, got {scale_factor!r}")
        self._init_scale = init_scale
        self._min_scale = min_scale
        self._scale_factor = scale_factor

        super().__init__(init_scale)  # the scale and error-flag tensors, on the CPU
        self._cur_iter = torch.zeros((), dtype=torch.int64)
        self._last_overflow_iter = torch.full((), -1, dtype=torch.int64)
        self._cur_hysteresis = torch.full((), self._hysteresis, dtype=torch.int64)

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {
            "_scale": self._scale,
            "_cur_iter": self._cur_iter,
            "_last_overflow_iter": self._last_overflow_iter,
            "_cur_hysteresis": self._cur_hysteresis,
            "_error_flag": self._error_flag,
        }

    # ---- hyperparameters (read-only: they are fixed at construction or by load_state_dict) --

    @property
    def dynamic(self) -> bool:
        """Always ``True``."""
        return True

    @property
    def init_scale(self) -> float:
        """The initial scale (float32-rounded)."""
        return self._init_scale

    @property
    def scale_window(self) -> int:
        """Clean iterations between growths."""
        return self._scale_window

    @property
    def min_scale(self) -> float:
        """Lower bound of the scale (float32-rounded)."""
        return self._min_scale

    @property
    def hysteresis(self) -> int:
        """Overflows tolerated before the scale drops."""
        return self._hysteresis

    @property
    def delayed_shift(self) -> int:
        """DeepSpeed's name for :attr:`hysteresis`."""
        return self._hysteresis

    @property
    def consecutive_hysteresis(self) -> bool:
        """Whether hysteresis is refilled on every clean iteration."""
        return self._consecutive

    @property
    def raise_error_at_min_scale(self) -> bool:
        """Whether an overflow at the minimum scale raises :class:`MinLossScaleError`."""
        return self._raise_at_min

    @property
    def scale_factor(self) -> float:
        """Growth and back-off factor (float32-rounded)."""
        return self._scale_factor

    # ---- counters as Python ints (each read synchronises) ----------------------------------

    @property
    def cur_iter(self) -> int:
        """Number of applied updates. Synchronises."""
        return int(self._cur_iter.item())

    @property
    def cur_hysteresis(self) -> int:
        """Remaining hysteresis. Synchronises."""
        return int(self._cur_hysteresis.item())

    @property
    def last_overflow_iter(self) -> int:
        """Iteration of the last overflow, -1 before the first. Synchronises."""
        return int(self._last_overflow_iter.item())

    # ---- update ----------------------------------------------------------------------------

    def update_scale(
        self, overflow: bool | torch.Tensor, record: torch.Tensor | None = None
    ) -> None:
        """Advance the scale state by one iteration; see the class docstring for the rule.

        Args:
            overflow: a Python bool (host path: may raise :class:`MinLossScaleError` here) or a
                one-element tensor, overflow meaning ``!= 0`` (device path: no host sync; a
                minimum-scale error is raised later by :meth:`raise_if_error`).
            record: optional 4-element fp32 tensor on the scaler's device that receives the
                scale and hysteresis before and after the update (what ``FP16Optimizer`` logs
                for a skipped step), written by the update itself: no extra launch.
        """
        _check_flag(overflow)
        if isinstance(overflow, torch.Tensor):
            self._update_on_device(overflow, record)
        else:
            self._update_on_host(bool(overflow), record)

    def _read_state(self, *extra: torch.Tensor) -> tuple:
        """``(scale, hysteresis, iteration, last overflow, error flag)`` and the values of
        ``extra``, read in one stacked copy: one sync on CUDA. int64 -> float64 is exact below
        2**53 iterations."""
        state = (
            self._scale,
            self._cur_hysteresis,
            self._cur_iter,
            self._last_overflow_iter,
            self._error_flag,
        )
        values = torch.cat([t.double().reshape(-1) for t in (*state, *extra)]).tolist()
        scale, hyst, it, last, err = values[:5]
        return (scale, int(hyst), int(it), int(last), err, *values[5:])

    def _update_on_host(self, overflow: bool, record: torch.Tensor | None) -> None:
        """The bool path: the device update (the one rule: ``kernels/loss_scale.py`` or its
        reference), then one read of what it did, to raise now and to log the change."""
        if record is None:
            record = torch.empty(4, dtype=torch.float32, device=self.device)
        self._update_on_device(torch.tensor(float(overflow)), record)
        _, _, it, last, err, scale, hyst, new_scale, new_hyst = self._read_state(record)
        if err != 0.0:
            # Either this overflow hit the minimum or a tensor-path update already had (nothing
            # has been applied since): the update left the state as it was; surface it now.
            self._clear_error()
            raise MinLossScaleError(_min_scale_message(self._min_scale, int(it)))
        it -= 1  # the iteration just counted
        stable = it - last - 1
        if overflow and new_hyst == hyst:
            logger.info(
                "Gradient overflow at iteration %d: skipping step, loss scale %g -> %g",
                it,
                scale,
                new_scale,
            )
        elif overflow:
            logger.info(
                "Gradient overflow at iteration %d: skipping step, loss scale kept at %g, "
                "hysteresis %d -> %d",
                it,
                scale,
                hyst,
                new_hyst,
            )
        elif new_scale != scale:
            logger.info(
                "No overflow for %d iterations: loss scale %g -> %g", stable, scale, new_scale
            )
        elif stable > 0 and stable % self._scale_window == 0:
            logger.info("Loss scale %g kept: growing it would overflow float32", scale)

    def _update_on_device(self, overflow: torch.Tensor, record: torch.Tensor | None) -> None:
        device = self._scale.device
        if overflow.device != device and overflow.device.type != "cpu":
            # Copying a device flag to another device (or to the host) would synchronise.
            raise ValueError(
                f"overflow flag is on {overflow.device} but the scaler state is on {device}: "
                "call scaler.to(flag.device) once before the first update"
            )
        flag = overflow.detach().reshape(()).to(device=device, non_blocking=True)
        if self._device_update is None:
            # One Triton launch on a GPU (kernels/loss_scale.py); ~35 torch ops elsewhere, and
            # wherever the Triton path cannot run (the scaler has no backend of its own to
            # refuse: FP16_TRITON_BACKEND=triton on a plain CPU falls back, it does not fail).
            try:
                triton_path = resolve_backend("auto", device) == "triton"
            except RuntimeError:
                triton_path = False
            if triton_path:
                from .kernels.loss_scale import update_loss_scale
            else:
                from .kernels.reference import update_loss_scale
            self._device_update = update_loss_scale
        self._device_update(
            flag,
            self._scale,
            self._cur_hysteresis,
            self._cur_iter,
            self._last_overflow_iter,
            self._error_flag,
            min_scale=self._min_scale,
            scale_factor=self._scale_factor,
            scale_window=self._scale_window,
            hysteresis=self._hysteresis,
            consecutive=self._consecutive,
            raise_at_min=self._raise_at_min,
            record=record,
        )

        if self._host_error is not None:
            # Asynchronous copy into pinned memory; raise_if_error reads it once the event says
            # the copy has landed, so checking costs no sync.
            self._host_error.copy_(self._error_flag, non_blocking=True)
            self._host_iter.copy_(self._cur_iter, non_blocking=True)
            if torch.cuda.is_current_stream_capturing():
                # An event recorded during capture cannot be queried from outside the graph;
                # the captured copy still refreshes the buffer on every replay.
                self._host_copy_captured = True
            else:
                self._error_event.record()
                self._event_recorded = True

    def _clear_error(self) -> None:
        self._error_flag.zero_()
        if self._host_error is not None:
            self._host_error.zero_()

    def raise_if_error(self, blocking: bool = False) -> None:
        """Raise :class:`MinLossScaleError` if a tensor-path update hit the minimum scale.

        Call it at the start of every ``step()``. On the CPU it reads :attr:`error_flag`
        directly. On CUDA, with ``blocking=False``, it reads the pinned host copy made after the
        last update, and only if that copy has completed (otherwise it returns and a later call
        raises; the consumer keeps skipping through :attr:`pending_error` until then); with
        ``blocking=True`` it waits for the device. For updates replayed from a CUDA graph the
        host copy is read without an event and may lag one replay behind. Raising clears the
        flag, so a caller that catches the error can continue from the unchanged state.
        """
        if self._host_error is None or blocking:
            pending = float(self._error_flag.item())  # CPU: free; CUDA + blocking: one sync
            iteration = self._cur_iter
        elif (self._event_recorded and self._error_event.query()) or self._host_copy_captured:
            pending = float(self._host_error.item())  # pinned host memory: no device sync
            iteration = self._host_iter  # copied with the flag
        else:
            return
        if pending != 0.0:
            self._clear_error()
            raise MinLossScaleError(_min_scale_message(self._min_scale, int(iteration.item())))

    # ---- checkpointing ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Every counter and hyperparameter as plain Python numbers. Synchronises.

        Loading it into any :class:`DynamicLossScaler` (with :meth:`load_state_dict`) continues
        the identical scale sequence. A pending minimum-scale error is not saved.
        """
        scale, hyst, it, last, _ = self._read_state()
        return {
            "dynamic": True,
            "cur_scale": scale,
            "cur_iter": it,
            "last_overflow_iter": last,
            "cur_hysteresis": hyst,
            "init_scale": self._init_scale,
            "scale_window": self._scale_window,
            "min_scale": self._min_scale,
            "hysteresis": self._hysteresis,
            "consecutive_hysteresis": self._consecutive,
            "raise_error_at_min_scale": self._raise_at_min,
            "scale_factor": self._scale_factor,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (DeepSpeed's ``delayed_shift`` key is accepted too).

        All keys, types and ranges are checked first; on any problem ``ValueError`` is raised
        and the scaler is left untouched. The state stays on this scaler's device.
        """
        v = _validate_state_dict(state_dict, dynamic=True)
        self._scale_window = v["scale_window"]
        self._min_scale = v["min_scale"]
        self._hysteresis = v["hysteresis"]
        self._consecutive = v["consecutive_hysteresis"]
        self._raise_at_min = v.get("raise_error_at_min_scale", self._raise_at_min)
        self._scale_factor = v["scale_factor"]
        self._init_scale = v.get("init_scale", self._init_scale)
        self._scale.fill_(v["cur_scale"])
        self._cur_iter.fill_(v["cur_iter"])
        self._last_overflow_iter.fill_(v["last_overflow_iter"])
        self._cur_hysteresis.fill_(v["cur_hysteresis"])
        self._clear_error()

    def __repr__(self) -> str:
        return (
            f"DynamicLossScaler(scale={self.loss_scale:g}, scale_window={self._scale_window}, "
            f"min_scale={self._min_scale:g}, hysteresis={self._hysteresis}, "
            f"consecutive_hysteresis={self._consecutive}, scale_factor={self._scale_factor:g}, "
            f"device={self.device})"
        )


# --------------------------------------------------------------------------------------------
# Construction from a DeepSpeed-style fp16 config.
# --------------------------------------------------------------------------------------------

# Our extension of DeepSpeed's fp16 section (DeepSpeed sets it in code, not in the config).
_EXTENSION_KEYS = ("raise_error_at_min_scale",)


def get_loss_scaler(
    config: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float16
) -> LossScaler:
    """Build a loss scaler from a DeepSpeed-style ``fp16`` config section.

    Args:
        config: the ``fp16`` section (not the whole DeepSpeed config), or ``None`` for the
            defaults. Keys, with DeepSpeed's defaults: ``loss_scale`` (0 = dynamic, > 0 = that
            static scale), ``initial_scale_power`` (16: init_scale = 2**16),
            ``loss_scale_window`` (1000), ``hysteresis`` (2), ``consecutive_hysteresis``
            (False), ``min_loss_scale`` (1); ``raise_error_at_min_scale`` (True) is an
            extension; ``enabled`` and ``auto_cast`` are checked and ignored. Keys and bounds
            are those of ``config_sections.parse_fp16``, the one fp16 validator: a bad or
            unknown key raises its ``ConfigError`` (a ``ValueError``) naming the key.
        dtype: the low-precision dtype of the parameters. Only ``torch.float16`` is scaled;
            bf16 and fp32 (any other floating dtype) get ``LossScaler(1.0)``, which scales by 1.

    Returns:
        :class:`DynamicLossScaler`, :class:`LossScaler` (static), on the CPU; call ``.to()``.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a mapping (the fp16 section), got {type(config)!r}")
    for key in ("fp16", "bf16"):
        if key in config:
            raise ValueError(
                f"config has a {key!r} key: pass the fp16 section, config['fp16'], "
                "not the whole DeepSpeed config"
            )
    # Every key validated (config_sections.parse_fp16, the one fp16 validator), even for bf16
    # where the values are unused: a typo should fail on any run.
    cfg = parse_fp16(config, extra_keys=_EXTENSION_KEYS, in_use=dtype == torch.float16)
    raise_at_min = _check_bool(
        "fp16.raise_error_at_min_scale", config.get("raise_error_at_min_scale", True)
    )
    if dtype != torch.float16:
        return LossScaler(1.0)
    if not cfg.dynamic_loss_scale:
        return LossScaler(cfg.loss_scale)
    return DynamicLossScaler(
        init_scale=cfg.initial_loss_scale,
        scale_window=cfg.loss_scale_window,
        min_scale=cfg.min_loss_scale,
        hysteresis=cfg.hysteresis,
        consecutive_hysteresis=cfg.consecutive_hysteresis,
        raise_error_at_min_scale=raise_at_min,
    )
