"""Typed parsing of JSON config values, and :class:`ConfigError`, the error every check raises.

A JSON value becomes a bool, int, float or section only through these checks (``bool`` is never
a number, numpy scalars are, ``"auto"`` gets a hint), and an optimizer or scheduler parameter
through its kind (:func:`_check_value`). Split from ``config.py`` so that what counts as a valid
value changes here, apart from which keys a config has (``config_sections.py``) and how a whole
config is assembled (``config.py``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any


class ConfigError(ValueError):
    """An invalid engine configuration: unknown key, wrong type or value, unreadable file."""


def _type_error(key: str, expected: str, value: Any) -> ConfigError:
    message = f"config key '{key}' expects {expected}, got {value!r} ({type(value).__name__})"
    if value == "auto":
        # HF Trainer writes "auto" into DeepSpeed configs and fills it in itself.
        message += "; 'auto' is a Hugging Face Trainer placeholder: put the actual value here"
    return ConfigError(message)


def _is_bool(value: Any) -> bool:
    """Python and numpy bools (``numpy.bool_`` is not a subclass of ``bool``)."""
    return isinstance(value, bool) or type(value).__name__ in ("bool_", "bool")


def _as_bool(key: str, value: Any) -> bool:
    if not _is_bool(value):
        raise _type_error(key, "a bool (true/false)", value)
    return bool(value)


def _as_int(key: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    # bool is a subclass of int in Python; `true` for a step count is a mistake, not 1.
    # numpy integers are integers (numbers.Integral), as they were for get_loss_scaler.
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        raise _type_error(key, "an int", value)
    value = int(value)
    if minimum is not None and value < minimum:
        raise ConfigError(f"config key '{key}' must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"config key '{key}' must be <= {maximum}, got {value}")
    return value


def _as_float(key: str, value: Any, minimum: float | None = None, positive: bool = False) -> float:
    # ints are fine for floats (JSON writes 1 for 1.0), numpy numbers too; bools are not.
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise _type_error(key, "a number", value)
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"config key '{key}' must be finite, got {value}")
    if positive and value <= 0.0:
        raise ConfigError(f"config key '{key}' must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"config key '{key}' must be >= {minimum}, got {value}")
    return value


def _as_section(key: str, value: Any) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise _type_error(key, "an object (dict)", value)
    return value


def _check_value(key: str, kind, value: Any) -> Any:
    """Validate one optimizer/scheduler parameter by its kind."""
    if kind == "bool":
        return _as_bool(key, value)
    if kind == "nonneg":
        return _as_float(key, value, minimum=0.0)
    if callable(kind):  # an algorithm's own check (Algorithm.config_kinds)
        return kind(key, value)
    if kind == "pos_int":
        return _as_int(key, value, minimum=1)
    if kind == "int":
        return _as_int(key, value)
    if kind == "iteration":
        return _as_int(key, value, minimum=-1)
    if kind == "betas":
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise _type_error(key, "a list of two numbers [beta1, beta2]", value)
        betas = tuple(_as_float(f"{key}[{i}]", b, minimum=0.0) for i, b in enumerate(value))
        for i, beta in enumerate(betas):
            if beta >= 1.0:
                raise ConfigError(f"config key '{key}[{i}]' must be in [0, 1), got {beta}")
        return betas
    if kind in ("lrs", "lrs_or_none"):
        if value is None and kind == "lrs_or_none":
            return None  # the scheduler then uses each param group's own lr
        if isinstance(value, (list, tuple)):
            if not value:
                raise ConfigError(f"config key '{key}' must not be an empty list")
            return [_as_float(f"{key}[{i}]", v, minimum=0.0) for i, v in enumerate(value)]
        return _as_float(key, value, minimum=0.0)
    if kind == "warmup_type":
        if value not in ("log", "linear"):
            raise ConfigError(f"config key '{key}' must be 'log' or 'linear', got {value!r}")
        return value
    raise AssertionError(f"unknown parameter kind {kind!r}")  # pragma: no cover
