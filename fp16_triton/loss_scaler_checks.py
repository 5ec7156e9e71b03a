"""Input checks for the loss scalers: constructor arguments, overflow flags and state dicts.

Every message names the argument or key, so a bad config is fixed in one go, and a state dict
is checked completely before anything is loaded. Split from ``loss_scaler.py`` so that the rules
for what a scaler accepts change here, apart from the scalers and their update rule.
"""

from __future__ import annotations

import difflib
import math
import numbers
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

_FP32_MAX = float(torch.finfo(torch.float32).max)


# --------------------------------------------------------------------------------------------
# Argument checking.
# --------------------------------------------------------------------------------------------


def _f32(x: float) -> float:
    """Round a Python float to the nearest float32 value (inf if out of range)."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        # struct refuses values that round to +-inf; the tensor would hold inf.
        return math.copysign(math.inf, x)


def _is_real(value: Any) -> bool:
    # bool is an int subclass: True as a scale or window is almost certainly a mistake.
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def _check_scale(name: str, value: Any) -> float:
    """A positive, finite value that stays positive and finite in float32; returned rounded."""
    if not _is_real(value) or not math.isfinite(float(value)) or float(value) <= 0.0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    rounded = _f32(float(value))
    # The scale lives in a float32 tensor: 1e39 would become inf and 1e-46 zero.
    if not math.isfinite(rounded) or rounded <= 0.0:
        raise ValueError(
            f"{name}={value!r} is not representable as a positive finite float32 "
            f"(range about 1.4e-45 to {_FP32_MAX:.4g})"
        )
    return rounded


def _check_flag(overflow: Any) -> None:
    """Reject overflow flags of the wrong kind before anything is changed."""
    if isinstance(overflow, torch.Tensor):
        if overflow.numel() != 1:  # metadata only: no sync
            raise ValueError(
                f"overflow tensor must have exactly one element, got shape {tuple(overflow.shape)}"
            )
        return
    if overflow is None or not isinstance(overflow, (bool, np.bool_, numbers.Real)):
        raise TypeError(
            f"overflow must be a bool or a one-element tensor, got {type(overflow).__name__}"
        )


# --------------------------------------------------------------------------------------------
# state_dict validation (shared by both scalers).
# --------------------------------------------------------------------------------------------

_DYNAMIC_REQUIRED = (
    "cur_scale",
    "cur_iter",
    "last_overflow_iter",
    "cur_hysteresis",
    "scale_window",
    "min_scale",
    "hysteresis",
    "consecutive_hysteresis",
    "scale_factor",
)
_DYNAMIC_OPTIONAL = ("dynamic", "init_scale", "raise_error_at_min_scale")
# DeepSpeed's attribute names that differ from ours.
_STATE_ALIASES = {"delayed_shift": "hysteresis"}


def _unknown_key_error(key: str, valid: list[str], what: str) -> ValueError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(sorted(valid))}"
    return ValueError(f"unknown {what} key {key!r}: {hint}")


def _validate_state_dict(state_dict: Mapping[str, Any], *, dynamic: bool) -> dict[str, Any]:
    """Check a state dict completely and return normalised values; raise ValueError if wrong."""
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    kind = "DynamicLossScaler" if dynamic else "LossScaler"
    if "dynamic" in state_dict and state_dict["dynamic"] is not dynamic:
        raise ValueError(
            f"state_dict has dynamic={state_dict['dynamic']!r} but this is a {kind}: "
            "load it into a scaler of the kind that saved it"
        )
    if not dynamic:
        valid = ["dynamic", "cur_scale"]
        for key in state_dict:
            if key not in valid:
                raise _unknown_key_error(key, valid, f"{kind} state_dict")
        if "cur_scale" not in state_dict:
            raise ValueError(f"{kind} state_dict is missing the key 'cur_scale'")
        return {"cur_scale": _check_scale("state_dict['cur_scale']", state_dict["cur_scale"])}

    sd: dict[str, Any] = {}
    valid = list(_DYNAMIC_REQUIRED + _DYNAMIC_OPTIONAL + tuple(_STATE_ALIASES))
    for key, value in state_dict.items():
        if key not in valid:
            raise _unknown_key_error(key, valid, f"{kind} state_dict")
        name = _STATE_ALIASES.get(key, key)
        if name in sd:
            raise ValueError(f"state_dict gives {name!r} twice (as {key!r} and its alias)")
        sd[name] = value
    missing = [k for k in _DYNAMIC_REQUIRED if k not in sd]
    if missing:
        raise ValueError(f"{kind} state_dict is missing the keys {missing}")

    def n(key: str) -> str:
        return f"state_dict[{key!r}]"

    out: dict[str, Any] = {
        "cur_scale": _check_scale(n("cur_scale"), sd["cur_scale"]),
        "cur_iter": _check_int(n("cur_iter"), sd["cur_iter"], 0),
        "last_overflow_iter": _check_int(n("last_overflow_iter"), sd["last_overflow_iter"], -1),
        "scale_window": _check_int(n("scale_window"), sd["scale_window"], 1),
        "min_scale": _check_scale(n("min_scale"), sd["min_scale"]),
        "hysteresis": _check_int(n("hysteresis"), sd["hysteresis"], 1),
        "cur_hysteresis": _check_int(n("cur_hysteresis"), sd["cur_hysteresis"], 1),
        "consecutive_hysteresis": _check_bool(
            n("consecutive_hysteresis"), sd["consecutive_hysteresis"]
        ),
        "scale_factor": _check_scale(n("scale_factor"), sd["scale_factor"]),
    }
    if "init_scale" in sd:
        out["init_scale"] = _check_scale(n("init_scale"), sd["init_scale"])
    if "raise_error_at_min_scale" in sd:
        out["raise_error_at_min_scale"] = _check_bool(
            n("raise_error_at_min_scale"), sd["raise_error_at_min_scale"]
        )
    # Cross-field consistency: these hold for every state the update rule can reach.
    if out["scale_factor"] <= 1.0:
        raise ValueError(f"{n('scale_factor')} must be greater than 1, got {out['scale_factor']}")
    if out["cur_hysteresis"] > out["hysteresis"]:
        raise ValueError(
            f"{n('cur_hysteresis')}={out['cur_hysteresis']} exceeds "
            f"{n('hysteresis')}={out['hysteresis']}"
        )
    if out["last_overflow_iter"] >= out["cur_iter"]:
        raise ValueError(
            f"{n('last_overflow_iter')}={out['last_overflow_iter']} must be below "
            f"{n('cur_iter')}={out['cur_iter']}"
        )
    if out["cur_scale"] < out["min_scale"]:
        raise ValueError(
            f"{n('cur_scale')}={out['cur_scale']:g} is below {n('min_scale')}={out['min_scale']:g}"
        )
    return out
