"""What state each param carries, checked and made whole: the rules every optimizer step and
state-dict load applies before anything is written (``ParamStateRules``, a base of
``FusedOptimizer``).

- Checked (``_check_state``), raising with the param named and nothing changed: the state is a
  dict, every tensor in it has the param's shape, ``step`` is one number, the names the
  optimizer needs (``_required_state``) are there, no tensor is shared by two params.
- Made whole (``_ensure_state``): created as the first step would; brought to the dtype the
  group keeps it in (``_state_dtype``: fp32, or bf16 moments with Adam's ``state_dtype``) on
  the param's device with the param's strides (users and torch's loaders assign tensors of any
  dtype and layout); completed when a setting needs more (amsgrad's maximum, SGD's buffer);
  masters following the param's dtype: an fp16/bf16 param gets an fp32 master from its current
  value (after a cast, also between fp16 and bf16), an fp32 param drops its master.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable
from typing import Any

import torch

from . import int8_state
from .buckets import like_param, local
from .kernels.multi_tensor import LOW_PRECISION, SUPPORTED_DTYPES
from .masters import (
    MASTER,
    MASTER_STATES,
    REMAINDER,
    convert_master,
    master_kind,
    new_master,
)

logger = logging.getLogger("fp16_triton.optimizer")  # one logger for the optimizers' notes

__all__ = [
    "LOW_PRECISION",
    "SEED_STATE",
    "SUPPORTED_DTYPES",
    "ParamStateRules",
    "check_unshared",
]

SEED_STATE = "sr_seed"
"""The one state entry that is not floating point: the int64 seed of a param's stochastic
rounding stream (Adam's ``stochastic_rounding``), one element, kept exactly as saved."""


class ParamStateRules:
    """The state rules of ``FusedOptimizer`` (see the module docstring). Subclasses name their
    state (``_state_names``, ``_required_state``) and implement ``_init_state`` and, where a
    setting adds state, ``_complete_state``; the optimizer provides ``state``,
    ``param_groups``, ``_dtypes`` and ``_logged``."""

    _state_names: tuple[str, ...] = ()
    _required_state: tuple[str, ...] = ()

    def _describe(self, p: torch.Tensor) -> str:
        """'param i of param group g (shape ...)' for messages (O(n): error paths only)."""
        for g, group in enumerate(self.param_groups):
            for i, q in enumerate(group["params"]):
                if q is p:
                    return f"param {i} of param group {g} (shape {tuple(p.shape)}, {p.dtype})"
        return f"a param of shape {tuple(p.shape)} ({p.dtype})"

    def _new_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        """New state for ``p`` on its device, with its strides (fp32 but for compact state):
        the subclass's tensors plus
        ``master_param`` (sharded like ``p`` when it is a DTensor; int8 moments' block scales
        stay this rank's own: ``int8_state.py``)."""
        state = {
            name: t if name in int8_state.SCALE_NAMES else like_param(t, p)
            for name, t in self._init_state(local(p), group).items()
        }
        kind = master_kind(group, p.dtype)
        if kind is not None:
            state[kind] = new_master(p, kind)
        return state

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _state_dtype(self, name: str, group: dict[str, Any], p=None) -> torch.dtype:
        """The dtype state ``name`` is kept in for ``group``'s params: fp32, unless a subclass
        keeps some state compact (Adam's bf16 moments). Every tensor written from outside or
        loaded is converted to it (fp32 to bf16 rounds to nearest-even, bf16 to fp32 is exact)."""
        return torch.float32

    def _complete_state(self, p: torch.Tensor, group: dict[str, Any], state: dict) -> None:
        """Add the state a setting switched on after the state was made needs (amsgrad's
        maximum, SGD's momentum buffer). Subclasses override."""

    def _check_state(self, p: torch.Tensor, group: dict[str, Any], state=None) -> None:
        """Raise, changing nothing, unless ``p``'s state (``optimizer.state[p]``, or
        ``state``) can be stepped: a dict whose tensors have ``p``'s shape, ``step`` a single
        number, and every name of ``_required_state`` present."""
        if state is None:
            state = self.state.get(p)
        if not state:
            return  # none yet (or emptied): created at this step, as torch does
        if not isinstance(state, dict):
            raise TypeError(
                f"optimizer.state of {self._describe(p)} is a {type(state).__name__}; "
                "it must be a dict of state tensors (or be deleted to start afresh)"
            )
        for name, value in state.items():
            if name == SEED_STATE:
                if (
                    not isinstance(value, torch.Tensor)
                    or value.numel() != 1
                    or (value.is_floating_point() or value.is_complex())
                ):
                    raise TypeError(
                        f"state {name!r} of {self._describe(p)} must be a one-element integer "
                        f"tensor (the seed of its stochastic rounding), got {value!r}"
                    )
                continue
            if name == "step":
                if isinstance(value, torch.Tensor) and value.numel() != 1:
                    raise ValueError(
                        f"state 'step' of {self._describe(p)} has {value.numel()} elements; "
                        "it must be a single number"
                    )
                continue
            if not isinstance(value, torch.Tensor):
                if value is not None and name in self._state_names + MASTER_STATES:
                    raise TypeError(
                        f"state {name!r} of {self._describe(p)} is a {type(value).__name__}; "
                        "it must be a tensor of the param's shape (or be deleted to start "
                        "afresh)"
                    )
                continue
            if int8_state.check(p, name, value, state, self._describe):
                continue  # a block-scale tensor, checked
            if name == REMAINDER:
                if value.dtype != torch.int16:
                    raise TypeError(
                        f"state {name!r} of {self._describe(p)} is {value.dtype}; it must be "
                        "int16 (the low bits of the fp32 master: kernels/remainder.py)"
                    )
            elif not value.is_floating_point() and not (
                name in int8_state.SCALES and value.dtype == torch.int8
            ):
                raise TypeError(
                    f"state {name!r} of {self._describe(p)} is {value.dtype}; optimizer state "
                    "must be floating point (it is kept in float32)"
                )
            if value.shape != p.shape:
                raise ValueError(
                    f"state {name!r} of {self._describe(p)} has shape {tuple(value.shape)}, "
                    f"the param has shape {tuple(p.shape)} (torch.optim fails here too). If "
                    "the param was resized on purpose, delete its state (del "
                    "optimizer.state[p]) to restart it, or resize the state tensors alike"
                )
        missing = [name for name in self._required_state if state.get(name) is None]
        if missing:
            raise ValueError(
                f"state of {self._describe(p)} lacks {missing} (torch.optim fails here too); "
                "set them, or delete the param's state (del optimizer.state[p]) to restart it"
            )

    def _ensure_state(self, p: torch.Tensor, group: dict[str, Any], stepping: bool = True) -> None:
        """Give ``p`` (checked by ``_check_state``) the state the group asks for: created if it
        has none, else completed, with masters added or dropped to follow ``p``'s dtype, in
        fp32 on ``p``'s device with ``p``'s strides. Assigns only what changes something: every
        write advances the state's version and makes the groups rebuild at the next step.
        ``stepping``: a step follows at once; else (``init_state``) an fp32 master that the
        group keeps as a remainder stays fp32 until a step converts it from the params as they
        are then, as after ``load_state_dict`` (a model loaded in between keeps it exact)."""
        state = self.state.get(p)
        if not state:
            new = self._new_state(p, group)
            if new or state is None:
                self.state[p] = new
        else:
            _normalize_state(p, state, lambda name: self._state_dtype(name, group, p))
            self._complete_state(p, group, state)
            self._follow_dtype(p, group, state, stepping)
        self._remember_dtypes([p])

    def _remember_dtypes(self, params: Iterable[torch.Tensor]) -> None:
        """Note the dtype each param's state was made for (see ``_follow_dtype``)."""
        for p in params:
            self._dtypes[id(p)] = (weakref.ref(p), p.dtype)

    def _follow_dtype(
        self, p: torch.Tensor, group: dict[str, Any], state: dict, stepping: bool = True
    ) -> None:
        """Give ``p`` the master its group's ``master_weights`` and its dtype ask for
        (``masters.py``): an fp16/bf16 param gets one from its current value (after
        ``model.half()``, a cast between fp16 and bf16, or state loaded without masters), or
        converted from the other kind; an fp32 param (or masters off) drops its master and is
        its own master from its current value."""
        kind = master_kind(group, p.dtype)
        seen = self._dtypes.get(id(p))
        if kind is not None and seen is not None and seen[0]() is p and seen[1] != p.dtype:
            for name in MASTER_STATES:  # cast from the other low precision: remade below
                state.pop(name, None)
        if kind != REMAINDER and state.get(REMAINDER) is not None:
            if self._fingerprints.stale([p]):  # written since: its value is the master
                local(state[REMAINDER]).zero_()
        if kind == REMAINDER and MASTER in state and not stepping:
            return  # converted by the next step (see ``_ensure_state``)
        done = convert_master(p, state, kind)
        if kind == REMAINDER and done is not None:  # made from the param as it is now: a
            self._fingerprints.forget(p)  # write from here on must be seen
            self._fingerprints.note([p])
        if done == "added":
            self._log_once(
                "master-added",
                "a %s param of shape %s had no master (its dtype changed after its state was "
                "made, or its state was loaded without masters): made one from its current "
                "value; logged once",
                p.dtype,
                tuple(p.shape),
            )
        elif done == "dropped":
            self._log_once(
                "master-dropped",
                "a %s param of shape %s had a master it no longer needs (its dtype changed, or "
                "master_weights was switched off): dropped it, the param is its own master "
                "from its current value; logged once",
                p.dtype,
                tuple(p.shape),
            )

    def _log_once(self, key: str, message: str, *args) -> None:
        if key not in self._logged:
            self._logged.add(key)
            logger.info(message, *args)

    def _import_state(self, p, group, saved: dict[str, Any], key) -> dict[str, torch.Tensor]:
        """Convert one param's saved state to ours (checked, in ``_state_dtype``, on ``p``'s
        device with ``p``'s strides, masters following ``p``'s dtype); raises naming the param
        index."""
        if not isinstance(saved, dict):
            raise TypeError(
                f"loaded state of param {key!r} must be a dict of its state tensors, got "
                f"{type(saved).__name__}"
            )
        out: dict[str, Any] = {}
        for name, value in saved.items():
            if value is None:
                continue
            if name == SEED_STATE:  # exact: a float would round a 64-bit seed
                seed = torch.as_tensor(value).detach()
                integer = not (
                    seed.is_floating_point() or seed.is_complex() or seed.dtype == torch.bool
                )
                if seed.numel() != 1 or not integer:
                    raise ValueError(
                        f"loaded {name!r} of param {key!r} must be one integer (the param's "
                        f"rounding seed), got {seed.numel()} elements of {seed.dtype}. "
                        "torch.optim's load_state_dict casts it to the param's dtype: delete "
                        "the sr_seed entries of such a state dict, and the optimizer remakes "
                        "them from its group's seed and each param's position"
                    )
                out[name] = seed.to(local(p).device, torch.int64, copy=True).reshape(())
                continue
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(float(value))
            if name == REMAINDER:  # exact: int16 bits, not a number
                if value.dtype != torch.int16:
                    raise TypeError(
                        f"loaded state {name!r} of param {key!r} is {value.dtype}, not int16"
                    )
                if value.shape != p.shape:
                    raise ValueError(
                        f"loaded state {name!r} of param {key!r} has shape "
                        f"{tuple(value.shape)}, the param has shape {tuple(p.shape)}"
                    )
                out[name] = value.detach().to(local(p).device, copy=True)
                continue
            if name == "step":
                if value.numel() != 1:
                    raise ValueError(f"loaded 'step' of param {key!r} must be a single number")
                out[name] = value.detach().to(local(p).device, torch.float32, copy=True).reshape(())
                continue
            if name in int8_state.SCALE_NAMES:  # block scales: checked with their codes
                if not value.is_floating_point() or not bool(
                    (torch.isfinite(value) & (value >= 0)).all()
                ):
                    raise ValueError(
                        f"loaded state {name!r} of param {key!r} must hold finite, non-negative "
                        f"float block scales (int8 moments: kernels/quantize.py), got "
                        f"{value.dtype} values outside that"
                    )
                out[name] = value.detach().to(local(p).device, torch.float32, copy=True)
                continue
            if value.shape != p.shape:
                raise ValueError(
                    f"loaded state {name!r} of param {key!r} has shape {tuple(value.shape)}, "
                    f"the param has shape {tuple(p.shape)} (were the params created or passed "
                    "in another order than when the state dict was saved?)"
                )
            if value.dtype == torch.int8 and int8_state.SCALES.get(name) not in saved:
                where = int8_state.SCALES.get(name)
                raise TypeError(
                    f"loaded state {name!r} of param {key!r} is int8 "
                    + (
                        f"without its block scales ({where!r}): int8 codes are only "
                        "readable with them"
                        if where
                        else f"but only {', '.join(int8_state.SCALES)} may be int8 (codes)"
                    )
                )
            known = name in (*self._state_names, *MASTER_STATES)  # (others: converted as torch)
            if known and value.dtype != torch.int8 and not value.is_floating_point():
                raise TypeError(
                    f"loaded state {name!r} of param {key!r} is {value.dtype}: optimizer state "
                    "must be floating point (or int8 moments with their block scales); a "
                    "state dict written by torch.optim or by this optimizer holds such tensors"
                )
            dtype = self._state_dtype(name, group, p)
            if value.dtype == torch.int8 or dtype == torch.int8:  # codes kept, floats quantized
                dtype = torch.int8 if value.dtype == torch.int8 else torch.float32
            out[name] = value.detach().to(local(p).device, dtype, copy=True)
        self._check_state(p, group, out)
        _normalize_state(p, out, lambda name: self._state_dtype(name, group, p))
        self._complete_state(p, group, out)
        kind = master_kind(group, p.dtype)
        if kind != REMAINDER:
            convert_master(p, out, kind)
        # else: converted at the next step (``_follow_dtype``), from the params as they are
        # then: a model loaded after the optimizer keeps the loaded masters exact.
        return out


def _normalize_state(p: torch.Tensor, state: dict[str, Any], dtype_of) -> None:
    """State written from outside (ZeroRedundancyOptimizer keeps ``step`` on the CPU, torch's
    loaders cast to the param dtype, users assign tensors of any layout) back to what the
    kernels read: ``dtype_of(name)`` (fp32 but for compact moments) on the param's device,
    ``step`` one fp32 element, every other tensor with the param's strides. Writes only the
    entries that change."""
    shard = local(p)
    int8_state.normalize(p, state, dtype_of)
    for name, value in list(state.items()):
        if name in int8_state.SCALE_NAMES:
            continue
        if name == SEED_STATE and isinstance(value, torch.Tensor):
            if value.device != shard.device or value.dtype != torch.int64 or value.dim():
                state[name] = value.detach().to(shard.device, torch.int64).reshape(())
            continue
        if name == "step":  # torch accepts numbers and integer tensors too
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(float(value))
            if (
                value is not state[name]
                or value.device != shard.device
                or value.dtype != torch.float32
                or value.dim()
            ):
                state[name] = value.detach().to(shard.device, torch.float32).reshape(())
            continue
        if not isinstance(value, torch.Tensor):
            continue
        if name == REMAINDER:  # int16 bits: moved and laid out like the param, never cast
            dtype = torch.int16
        elif not value.is_floating_point():
            continue
        else:
            dtype = dtype_of(name)
        lv = local(value)
        if lv is not value:  # a DTensor (FSDP2): sharded like the param
            if lv.device != shard.device or value.dtype != dtype:
                state[name] = value.to(device=shard.device, dtype=dtype)
        elif (
            value.device != shard.device
            or value.dtype != dtype
            or (value.numel() > 1 and value.stride() != shard.stride())
        ):
            state[name] = torch.empty_like(shard, dtype=dtype).copy_(value)


def check_unshared(state, params: list[torch.Tensor], shared: tuple[str, ...] = ()) -> None:
    """Raise unless no state tensor is shared by two params (``state[p]["step"] = z`` for
    several ``p``): each param's state is its own, and torch.optim would count such a step once
    per param (at rebuilds only: O(n)). ``shared``: states the params share by design (a flat
    bucket's one ``step``)."""
    seen: dict[int, int] = {}
    for i, p in enumerate(params):
        for name, value in state.get(p, {}).items():
            if isinstance(value, torch.Tensor) and name not in shared:
                j = seen.setdefault(id(value), i)
                if j != i:
                    raise ValueError(
                        f"state {name!r} is one tensor for two params (params {j} and {i}, "
                        "counted over all param groups); give each param its own (e.g. "
                        "torch.tensor(0.0) per param for 'step')"
                    )
