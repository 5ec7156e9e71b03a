"""The sections of a DeepSpeed-style config: their dataclasses, key tables and parsers.

One dataclass per section (:class:`FP16Config`, :class:`BF16Config`, :class:`OptimizerConfig`,
:class:`SchedulerConfig`) next to the parser that validates the section into it, with the key
tables of every level and :func:`_check_keys`, which suggests the closest valid key (or the level
a key belongs at). Split from ``config.py``, which assembles the whole config from these parsers
(:func:`fp16_triton.config.load_config`); a section's keys and bounds change here. Values are
checked by ``config_values.py``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .config_values import (
    ConfigError,
    _as_bool,
    _as_float,
    _as_int,
    _as_section,
    _check_value,
    _type_error,
)

#: DeepSpeed top-level keys that are accepted and ignored: they configure logging, debugging or
#: multi-process communication that a single-process engine does not have. ``zero_optimization``
#: is accepted only with stage 0 (sharding is done with torch.distributed instead).
IGNORED_DEEPSPEED_KEYS: tuple[str, ...] = (
    "wall_clock_breakdown",
    "zero_optimization",
    "prescale_gradients",
    "gradient_predivide_factor",
    "zero_allow_untested_optimizer",
    "communication_data_type",
    "dump_state",
)


def _supported_optimizers() -> tuple[str, ...]:
    from .spec import algorithms

    return tuple(n for a in algorithms().values() for n in a.type_names)


#: Scheduler types accepted in ``scheduler.type`` (exact names, as DeepSpeed looks them up).
SUPPORTED_SCHEDULERS: tuple[str, ...] = ("WarmupLR", "WarmupDecayLR")

# DeepSpeed schedulers we know but do not implement: named in the error so users see it is a
# deliberate gap, not a typo.
_UNSUPPORTED_DEEPSPEED_SCHEDULERS = ("LRRangeTest", "OneCycle", "WarmupCosineLR")


# --------------------------------------------------------------------------------------------
# Section dataclasses
# --------------------------------------------------------------------------------------------


@dataclass
class FP16Config:
    """The ``fp16`` section. ``loss_scale == 0`` selects dynamic loss scaling.

    Dynamic scaling starts at ``2 ** initial_scale_power``, halves on overflow once
    ``hysteresis`` overflows have been absorbed (never below ``min_loss_scale``) and doubles
    after ``loss_scale_window`` overflow-free steps, as DeepSpeed's ``DynamicLossScaler``.
    DeepSpeed types ``min_loss_scale`` as an int; any positive number is accepted here.
    """

    enabled: bool = False
    loss_scale: float = 0.0
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    consecutive_hysteresis: bool = False
    min_loss_scale: float = 1.0
    auto_cast: bool = False

    @property
    def dynamic_loss_scale(self) -> bool:
        """True when the loss scale is dynamic (``loss_scale == 0``)."""
        return self.loss_scale == 0.0

    @property
    def initial_loss_scale(self) -> float:
        """The first loss scale: ``2 ** initial_scale_power`` if dynamic, else ``loss_scale``."""
        if self.dynamic_loss_scale:
            return 2.0**self.initial_scale_power
        return self.loss_scale


@dataclass
class BF16Config:
    """The ``bf16`` section (also read from DeepSpeed's older name ``bfloat16``)."""

    enabled: bool = False


@dataclass
class OptimizerConfig:
    """The ``optimizer`` section, validated against the algorithm's spec (``fp16_triton/spec.py``).

    ``type`` is the canonical name of what the config asked for (a class name of a registered
    algorithm), and ``params`` holds keyword arguments of that class with the defaults filled
    in (the class signature's defaults, or DeepSpeed's where the spec says they differ).
    :attr:`effective_type` names the class that runs, and ``options`` the DeepSpeed-only keys the
    spec lifted out of ``params`` (e.g. Adam's ``adam_w_mode``, ``torch_adam``).

    **"Adam" means AdamW unless ``adam_w_mode`` is false.** This follows DeepSpeed, whose engine
    computes ``effective_adam_w_mode = type == "adamw" or params.get("adam_w_mode", True)``
    (``runtime/engine.py``, ``ADAM_W_MODE_DEFAULT = True`` in ``runtime/config.py``): a DeepSpeed
    config with ``"type": "Adam"`` and ``weight_decay > 0`` trains with decoupled weight decay.
    ``adam_w_mode: false`` with type AdamW has no effect (as in DeepSpeed) and warns.
    ``weight_decay`` defaults to 0.0 for AdamW too (DeepSpeed's FusedAdam default), not
    ``torch.optim.AdamW``'s 0.01. ``torch_adam`` (DeepSpeed: use torch's Adam instead of its
    fused kernel) is kept for the engine to read; it does not change the math.

    ``flat_buffers`` (ours, default false) is the optimizers' ``flat_buffers`` argument
    (optimizer-owned flat storage, see ``fp16_triton/flat_buffers.py``), lifted out of ``params``.
    """

    type: str
    params: dict[str, Any] = field(default_factory=dict)
    flat_buffers: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    effective_type: str = ""

    def __post_init__(self):
        self.effective_type = self.effective_type or self.type

    @property
    def adam_w_mode(self) -> bool | None:
        """Adam's effective ``adam_w_mode`` (None for other types)."""
        return self.options.get("adam_w_mode")

    @property
    def torch_adam(self) -> bool:
        return bool(self.options.get("torch_adam", False))


@dataclass
class SchedulerConfig:
    """The ``scheduler`` section: ``type`` in :data:`SUPPORTED_SCHEDULERS` and its ``params``
    (keyword arguments of the class in :mod:`fp16_triton.lr_schedules`, defaults filled in).
    Build it with :func:`fp16_triton.lr_schedules.build_scheduler`."""

    type: str
    params: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Key tables
# --------------------------------------------------------------------------------------------

_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
_TOP_LEVEL_KEYS = (
    "fp16",
    "bf16",
    "bfloat16",
    "optimizer",
    "scheduler",
    "gradient_clipping",
    "steps_per_print",
    *_BATCH_KEYS,
    *IGNORED_DEEPSPEED_KEYS,
)
_FP16_KEYS = tuple(f.name for f in dataclasses.fields(FP16Config))
_BF16_KEYS = tuple(f.name for f in dataclasses.fields(BF16Config))
_SECTION_KEYS = ("type", "params")

_REQUIRED = object()  # default marker for parameters without a default
_WARMUP_PARAMS: dict[str, tuple[str, Any]] = {
    "warmup_min_lr": ("lrs", 0.0),
    "warmup_max_lr": ("lrs_or_none", 0.001),
    "warmup_num_steps": ("pos_int", 1000),
    "warmup_type": ("warmup_type", "log"),
    "last_batch_iteration": ("iteration", -1),
}
_SCHEDULER_PARAMS: dict[str, dict[str, tuple[str, Any]]] = {
    "WarmupLR": _WARMUP_PARAMS,
    "WarmupDecayLR": {"total_num_steps": ("pos_int", _REQUIRED), **_WARMUP_PARAMS},
}


@functools.cache
def _leaf_index() -> dict[str, str]:
    """Leaf name -> dotted key, for keys that sit at one place only (used to say that a key
    was put at the wrong level, e.g. top-level 'loss_scale' -> 'fp16.loss_scale')."""
    places: dict[str, set[str]] = {}
    for key in _FP16_KEYS:
        places.setdefault(key, set()).add(f"fp16.{key}")
    for key in _BF16_KEYS:
        places.setdefault(key, set()).add(f"bf16.{key}")
    from .spec import algorithms

    for algorithm in algorithms().values():
        for key in algorithm.config_params():
            places.setdefault(key, set()).add(f"optimizer.params.{key}")
    for params in _SCHEDULER_PARAMS.values():
        for key in params:
            places.setdefault(key, set()).add(f"scheduler.params.{key}")
    for key in _TOP_LEVEL_KEYS:
        places.setdefault(key, set()).add(key)
    return {leaf: next(iter(where)) for leaf, where in places.items() if len(where) == 1}


# --------------------------------------------------------------------------------------------
# Key checking
# --------------------------------------------------------------------------------------------


def _dotted(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _suggest(key: str, valid: Iterable[str]) -> str | None:
    """The closest valid key, case-insensitively (so 'FP16' finds 'fp16')."""
    by_lower = {v.lower(): v for v in valid}
    match = difflib.get_close_matches(key.lower(), list(by_lower), n=1, cutoff=0.6)
    return by_lower[match[0]] if match else None


def _check_keys(section: Mapping[Any, Any], prefix: str, valid: Iterable[str]) -> None:
    """Raise on the first key of ``section`` not in ``valid``, suggesting the closest one."""
    valid = tuple(valid)
    for key in section:
        if not isinstance(key, str):
            where = f"under '{prefix}'" if prefix else "at the top level"
            raise ConfigError(f"config keys must be strings; got {key!r} {where}")
        if key in valid:
            continue
        full = _dotted(prefix, key)
        close = _suggest(key, valid)
        if close is not None:
            raise ConfigError(
                f"unknown config key '{full}'; did you mean '{_dotted(prefix, close)}'?"
            )
        elsewhere = _leaf_index().get(key)
        if elsewhere is not None and elsewhere != full:
            raise ConfigError(
                f"unknown config key '{full}'; did you mean '{elsewhere}'? "
                "(the key belongs at that level)"
            )
        where = f"under '{prefix}'" if prefix else "at the top level"
        raise ConfigError(
            f"unknown config key '{full}'; valid keys {where}: {', '.join(sorted(valid))}"
        )


# --------------------------------------------------------------------------------------------
# Section parsers
# --------------------------------------------------------------------------------------------


def parse_fp16(
    value: Any, extra_keys: Iterable[str] = (), in_use: bool | None = None
) -> FP16Config:
    """Validate a DeepSpeed ``fp16`` section: the one place its keys and bounds are checked
    (``load_config`` and ``loss_scaler.get_loss_scaler`` both call it). ``extra_keys`` are
    accepted besides DeepSpeed's and left to the caller. Keys and types are always checked;
    the loss-scale values only when the section is ``in_use`` (default: ``enabled``), so a bf16
    or fp32 run may carry a leftover fp16 section, as with DeepSpeed.

    The bounds are those of a float32 loss scale, the storage the scaler computes in:
    ``2 ** initial_scale_power`` must be a positive finite float32, so the power runs from -149
    (the smallest subnormal) to 127 (DeepSpeed takes any int, and a power outside that range
    would make the scale 0 or inf); ``loss_scale`` (when static) and ``min_loss_scale`` must be
    positive finite float32 values; a dynamic scale cannot start below its minimum.
    """
    section = _as_section("fp16", value)
    _check_keys(section, "fp16", (*_FP16_KEYS, *extra_keys))
    d = FP16Config()
    get = section.get
    cfg = FP16Config(
        enabled=_as_bool("fp16.enabled", get("enabled", d.enabled)),
        # DeepSpeed's own validator: a finite number >= 0, 0 meaning dynamic.
        loss_scale=_as_float("fp16.loss_scale", get("loss_scale", d.loss_scale), minimum=0.0),
        initial_scale_power=_as_int(
            "fp16.initial_scale_power",
            get("initial_scale_power", d.initial_scale_power),
            minimum=-149,
            maximum=127,
        ),
        loss_scale_window=_as_int(
            "fp16.loss_scale_window", get("loss_scale_window", d.loss_scale_window), minimum=1
        ),
        hysteresis=_as_int("fp16.hysteresis", get("hysteresis", d.hysteresis), minimum=1),
        consecutive_hysteresis=_as_bool(
            "fp16.consecutive_hysteresis",
            get("consecutive_hysteresis", d.consecutive_hysteresis),
        ),
        min_loss_scale=_as_float(
            "fp16.min_loss_scale", get("min_loss_scale", d.min_loss_scale), positive=True
        ),
        auto_cast=_as_bool("fp16.auto_cast", get("auto_cast", d.auto_cast)),
    )
    if not (cfg.enabled if in_use is None else in_use):
        return cfg
    stored = {}
    for key in ("loss_scale", "min_loss_scale"):
        number = getattr(cfg, key)
        stored[key] = float(torch.tensor(number, dtype=torch.float32))
        if number > 0 and not 0.0 < stored[key] < math.inf:
            raise ConfigError(
                f"config key 'fp16.{key}' = {number!r} is not a positive finite float32 "
                "(about 1.4e-45 to 3.4e38): the loss scale is stored in float32"
            )
    if cfg.dynamic_loss_scale and stored["min_loss_scale"] > cfg.initial_loss_scale:
        raise ConfigError(
            f"config key 'fp16.min_loss_scale' ({cfg.min_loss_scale:g}) must not be above "
            f"2**initial_scale_power ({cfg.initial_loss_scale:g})"
        )
    return cfg


def _parse_bf16(value: Any, name: str) -> BF16Config:
    section = _as_section(name, value)
    _check_keys(section, name, _BF16_KEYS)
    return BF16Config(enabled=_as_bool(f"{name}.enabled", section.get("enabled", False)))


def _section_type(section: Mapping[Any, Any], name: str) -> str:
    _check_keys(section, name, _SECTION_KEYS)
    if "type" not in section:
        raise ConfigError(f"config key '{name}.type' is required when '{name}' is given")
    kind = section["type"]
    if not isinstance(kind, str):
        raise _type_error(f"{name}.type", "a string", kind)
    return kind


def _section_params(section: Mapping[Any, Any], name: str) -> Mapping[Any, Any]:
    params = section.get("params")
    if params is None:  # DeepSpeed treats a missing params object as "all defaults"
        return {}
    return _as_section(f"{name}.params", params)


def _parse_optimizer(value: Any) -> OptimizerConfig:
    from .spec import algorithm_for_type, algorithms

    section = _as_section("optimizer", value)
    given = _section_type(section, "optimizer")
    # DeepSpeed lower-cases the names of its own optimizers (adam, adamw); torch optimizers are
    # looked up by exact name there. We accept any case and store the canonical spelling.
    algorithm = algorithm_for_type(given)
    if algorithm is None:
        supported = _supported_optimizers()
        close = _suggest(given, supported)
        hint = f"; did you mean '{close}'?" if close else ""
        raise ConfigError(
            f"unsupported optimizer type {given!r} at 'optimizer.type'; supported "
            f"(case-insensitive): {', '.join(supported)}{hint}"
        )
    canonical = next(n for n in algorithm.type_names if n.lower() == given.lower())
    params = _section_params(section, "optimizer")
    if "max_grad_norm" in params:
        # DeepSpeed raises on this too: clipping is an engine setting, not an optimizer one.
        raise ConfigError(
            "config key 'optimizer.params.max_grad_norm' is not supported; "
            "use the top-level 'gradient_clipping' instead (as DeepSpeed requires)"
        )
    spec = algorithm.config_params()
    for key in params:
        if isinstance(key, str) and key not in spec:
            owners = [
                name
                for other in algorithms().values()
                if other is not algorithm and key in other.config_params()
                for name in other.type_names[:1]
            ]
            if owners:
                owned = " and ".join(f"{owner}'s" for owner in owners)
                raise ConfigError(
                    f"config key 'optimizer.params.{key}' is not a parameter of {canonical} "
                    f"(it is one of {owned}); {canonical} takes: {', '.join(spec)}"
                )
    _check_keys(params, "optimizer.params", spec)
    values = {
        key: _check_value(f"optimizer.params.{key}", kind, params.get(key, default))
        for key, (kind, default) in spec.items()
    }
    flat_buffers = values.pop("flat_buffers")
    options = {key: values.pop(key) for key in algorithm.config_options}
    effective = canonical
    if algorithm.configure is not None:
        effective = algorithm.configure(canonical, values, options)
    return OptimizerConfig(
        type=canonical,
        params=values,
        flat_buffers=flat_buffers,
        options=options,
        effective_type=effective,
    )


def _parse_scheduler(value: Any) -> SchedulerConfig:
    section = _as_section("scheduler", value)
    given = _section_type(section, "scheduler")
    if given not in SUPPORTED_SCHEDULERS:
        supported = ", ".join(SUPPORTED_SCHEDULERS)
        if given in _UNSUPPORTED_DEEPSPEED_SCHEDULERS:
            raise ConfigError(
                f"scheduler type {given!r} (a DeepSpeed scheduler) is not supported by "
                f"fp16_triton; supported: {supported}"
            )
        close = _suggest(given, SUPPORTED_SCHEDULERS)
        hint = f"; did you mean '{close}'?" if close else ""
        raise ConfigError(
            f"unsupported scheduler type {given!r} at 'scheduler.type'; "
            f"supported: {supported}{hint}"
        )
    params = _section_params(section, "scheduler")
    spec = _SCHEDULER_PARAMS[given]
    _check_keys(params, "scheduler.params", spec)
    values: dict[str, Any] = {}
    for key, (kind, default) in spec.items():
        if key not in params and default is _REQUIRED:
            raise ConfigError(f"config key 'scheduler.params.{key}' is required for {given}")
        values[key] = _check_value(f"scheduler.params.{key}", kind, params.get(key, default))
    return SchedulerConfig(type=given, params=values)
