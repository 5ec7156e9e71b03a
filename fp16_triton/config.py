"""DeepSpeed-style engine configuration: load, validate and hold a ``ds_config``-like dict.

:func:`load_config` takes a dict, a path to a JSON file, or ``None`` and returns an
:class:`EngineConfig` whose values are validated and filled with DeepSpeed's defaults
(deepspeedai/DeepSpeed: ``deepspeed/runtime/constants.py``, ``runtime/precision_config.py``,
``runtime/config.py``, ``runtime/engine.py``; docs: deepspeed.ai/docs/config-json). Every problem
raises :class:`ConfigError` naming the full dotted key, e.g.::

    unknown config key 'fp16.loss_scale_windw'; did you mean 'fp16.loss_scale_window'?

Accepted keys (DeepSpeed's names and defaults):

- ``fp16``: ``enabled`` (false), ``loss_scale`` (0 = dynamic), ``initial_scale_power`` (16),
  ``loss_scale_window`` (1000), ``hysteresis`` (2), ``consecutive_hysteresis`` (false),
  ``min_loss_scale`` (1), ``auto_cast`` (false).
- ``bf16`` (alias ``bfloat16``, DeepSpeed's older name): ``enabled`` (false).
- ``gradient_clipping`` (0.0 = off), ``steps_per_print`` (10), ``gradient_accumulation_steps``,
  ``train_batch_size``, ``train_micro_batch_size_per_gpu`` (see :func:`load_config` for the
  batch arithmetic).
- ``optimizer``: ``type``, a registered algorithm's class name (Adam, AdamW, SGD, Lion, Lamb,
  Muon: see ``fp16_triton/spec.py``), and ``params``, its constructor's arguments. **DeepSpeed's
  "Adam" is AdamW by default**; see :class:`OptimizerConfig`.
- ``scheduler``: ``type`` WarmupLR or WarmupDecayLR and ``params`` (see
  :mod:`fp16_triton.lr_schedules`).
- The DeepSpeed keys in :data:`IGNORED_DEEPSPEED_KEYS` are accepted and ignored.

Where we differ from DeepSpeed, we are stricter: unknown keys are errors (DeepSpeed ignores most
of them), ``bool`` is never accepted as a number, and a config with only
``gradient_accumulation_steps`` or no batch keys at all is valid (DeepSpeed requires a batch
size, but this engine does not own the data loader).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import numbers
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch

__all__ = [
    "ConfigError",
    "FP16Config",
    "BF16Config",
    "parse_fp16",
    "OptimizerConfig",
    "SchedulerConfig",
    "EngineConfig",
    "load_config",
    "IGNORED_DEEPSPEED_KEYS",
    "SUPPORTED_OPTIMIZERS",  # noqa: F822 (module __getattr__)
    "SUPPORTED_SCHEDULERS",
]

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


def __getattr__(name: str):
    # SUPPORTED_OPTIMIZERS: the types of the registered algorithms (fp16_triton/spec.py),
    # matched case-insensitively; computed on first use, as the registry imports the classes.
    if name == "SUPPORTED_OPTIMIZERS":
        return _supported_optimizers()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _supported_optimizers() -> tuple[str, ...]:
    from .spec import algorithms

    return tuple(n for a in algorithms().values() for n in a.type_names)


#: Scheduler types accepted in ``scheduler.type`` (exact names, as DeepSpeed looks them up).
SUPPORTED_SCHEDULERS: tuple[str, ...] = ("WarmupLR", "WarmupDecayLR")

# DeepSpeed schedulers we know but do not implement: named in the error so users see it is a
# deliberate gap, not a typo.
_UNSUPPORTED_DEEPSPEED_SCHEDULERS = ("LRRangeTest", "OneCycle", "WarmupCosineLR")

_MULTI_GPU_HINT = (
    "ZeRO sharding is done via torch.distributed (FSDP2 for stage 3, ZeroRedundancyOptimizer "
    "for stage 1) around fp16_triton's engine, see docs/distributed.md"
)


class ConfigError(ValueError):
    """An invalid engine configuration: unknown key, wrong type or value, unreadable file."""


# --------------------------------------------------------------------------------------------
# Result dataclasses
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


@dataclass
class EngineConfig:
    """A validated engine configuration; build it with :func:`load_config`.

    ``train_batch_size`` and ``train_micro_batch_size_per_gpu`` are ``None`` when the config
    gives no batch size. ``ignored_keys`` lists the :data:`IGNORED_DEEPSPEED_KEYS` that were
    present (not part of equality, since they have no effect).
    """

    fp16: FP16Config = field(default_factory=FP16Config)
    bf16: BF16Config = field(default_factory=BF16Config)
    optimizer: OptimizerConfig | None = None
    scheduler: SchedulerConfig | None = None
    gradient_clipping: float = 0.0
    gradient_accumulation_steps: int = 1
    train_batch_size: int | None = None
    train_micro_batch_size_per_gpu: int | None = None
    steps_per_print: int = 10
    world_size: int = 1
    ignored_keys: tuple[str, ...] = field(default=(), compare=False)

    @property
    def dtype(self) -> torch.dtype:
        """The training dtype: float16 if fp16 is enabled, bfloat16 if bf16, else float32."""
        if self.fp16.enabled:
            return torch.float16
        if self.bf16.enabled:
            return torch.bfloat16
        return torch.float32

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable DeepSpeed-style dict that :func:`load_config` maps back to an
        equal config (given the same ``world_size``). Ignored keys are not included."""
        out: dict[str, Any] = {
            "fp16": dataclasses.asdict(self.fp16),
            "bf16": dataclasses.asdict(self.bf16),
            "gradient_clipping": self.gradient_clipping,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "steps_per_print": self.steps_per_print,
        }
        if self.train_batch_size is not None:
            out["train_batch_size"] = self.train_batch_size
        if self.train_micro_batch_size_per_gpu is not None:
            out["train_micro_batch_size_per_gpu"] = self.train_micro_batch_size_per_gpu
        if self.optimizer is not None:
            params = {k: _jsonable(v) for k, v in self.optimizer.params.items()}
            params.update(self.optimizer.options)
            if self.optimizer.flat_buffers:
                params["flat_buffers"] = True
            out["optimizer"] = {"type": self.optimizer.type, "params": params}
        if self.scheduler is not None:
            out["scheduler"] = {"type": self.scheduler.type, "params": dict(self.scheduler.params)}
        return out


def _jsonable(value: Any) -> Any:
    """A checked optimizer param as the JSON config writes it: tuples as lists, dtypes (Adam's
    ``state_dtype``) by name, which the config reads back."""
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return value


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
# Checking helpers
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


# --------------------------------------------------------------------------------------------
# Sections
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


def _check_ignored(raw: Mapping[str, Any]) -> tuple[str, ...]:
    present = tuple(key for key in IGNORED_DEEPSPEED_KEYS if key in raw)
    if "zero_optimization" in raw:
        zero = raw["zero_optimization"]
        if isinstance(zero, bool):
            # DeepSpeed's deprecated boolean form: true means stage 1.
            if zero:
                raise ConfigError(
                    "config key 'zero_optimization' = true (DeepSpeed's old form of stage 1) is "
                    f"not supported: {_MULTI_GPU_HINT}"
                )
        else:
            zero = _as_section("zero_optimization", zero)
            # Other zero_optimization keys are ignored with the section.
            stage = _as_int("zero_optimization.stage", zero.get("stage", 0), minimum=0, maximum=3)
            if stage != 0:
                raise ConfigError(
                    f"config key 'zero_optimization.stage' = {stage} is not supported (only 0): "
                    f"{_MULTI_GPU_HINT}"
                )
    return present


def _batch_sizes(raw: Mapping[str, Any], world_size: int) -> tuple[int | None, int | None, int]:
    """(train_batch_size, micro_batch_per_gpu, grad_accum) following DeepSpeed's arithmetic
    ``train_batch_size == micro * grad_accum * world_size``, deriving a missing value.

    DeepSpeed derives with floor division and then asserts equality; we check divisibility
    first so the error shows the arithmetic that failed. ``null`` counts as absent, as there.
    """
    tb, mb, ga = (
        None if raw.get(key) is None else _as_int(key, raw[key], minimum=1) for key in _BATCH_KEYS
    )
    ws = world_size
    if tb is not None and mb is not None and ga is not None:
        if tb != mb * ga * ws:
            raise ConfigError(
                "inconsistent batch sizes: train_batch_size must equal "
                "train_micro_batch_size_per_gpu * gradient_accumulation_steps * world_size, "
                f"but {tb} != {mb} * {ga} * {ws} = {mb * ga * ws}"
            )
    elif tb is not None and mb is not None:
        if tb % (mb * ws):
            raise ConfigError(
                f"cannot derive gradient_accumulation_steps: train_batch_size {tb} is not "
                "divisible by train_micro_batch_size_per_gpu * world_size = "
                f"{mb} * {ws} = {mb * ws}"
            )
        ga = tb // (mb * ws)
    elif tb is not None and ga is not None:
        if tb % (ga * ws):
            raise ConfigError(
                f"cannot derive train_micro_batch_size_per_gpu: train_batch_size {tb} is not "
                f"divisible by gradient_accumulation_steps * world_size = {ga} * {ws} = {ga * ws}"
            )
        mb = tb // (ga * ws)
    elif mb is not None and ga is not None:
        tb = mb * ga * ws
    elif tb is not None:
        # DeepSpeed: only train_batch_size -> no accumulation, split over the ranks.
        ga = 1
        if tb % ws:
            raise ConfigError(
                f"cannot derive train_micro_batch_size_per_gpu: train_batch_size {tb} is not "
                f"divisible by world_size {ws}"
            )
        mb = tb // ws
    elif mb is not None:
        ga = 1
        tb = mb * ws
    elif ga is None:
        ga = 1
    return tb, mb, ga


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


class _DuplicateKeyError(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # DeepSpeed rejects duplicate keys too (dict_raise_error_on_duplicate_keys); json would
    # silently keep the last one.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(key)
        out[key] = value
    return out


def _read_json(path: Path) -> Any:
    if not path.exists():
        raise ConfigError(f"config file '{path}' does not exist")
    if not path.is_file():
        raise ConfigError(f"config path '{path}' is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file '{path}': {exc}") from exc
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"config file '{path}' is not valid JSON: {exc.msg} at line {exc.lineno}, "
            f"column {exc.colno}"
        ) from exc
    except _DuplicateKeyError as exc:
        raise ConfigError(f"config file '{path}' has the key '{exc.args[0]}' twice") from exc


#: What :func:`load_config` accepts: a mapping, a path to a JSON file, or ``None``.
ConfigSource = Union[Mapping[str, Any], str, "os.PathLike[str]", None]


def load_config(config: ConfigSource = None, world_size: int = 1) -> EngineConfig:
    """Load and validate a DeepSpeed-style config.

    Args:
        config: a dict (not modified), a path (``str`` or ``os.PathLike``) to a JSON file, or
            ``None`` for all defaults.
        world_size: the number of data-parallel processes, used only in the batch arithmetic
            ``train_batch_size == train_micro_batch_size_per_gpu * gradient_accumulation_steps
            * world_size``. Given two of the three batch keys the third is derived (it must
            divide exactly); given all three they must agree; given only ``train_batch_size``
            or only the micro batch, ``gradient_accumulation_steps`` is 1 (as in DeepSpeed).
            With no batch keys the batch sizes stay ``None`` and accumulation is 1.

    Returns:
        The validated :class:`EngineConfig`.

    Raises:
        ConfigError: an unknown or misspelled key (with the closest valid key), a value of the
            wrong type or out of range, fp16 and bf16 both enabled, inconsistent batch sizes,
            an unsupported optimizer or scheduler, ZeRO stage > 0, or a file that is missing or
            not valid JSON (with line and column).
        TypeError: ``config`` is none of the accepted kinds.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world_size must be an int >= 1, got {world_size!r}")
    if config is None:
        raw: Any = {}
    elif isinstance(config, Mapping):
        raw = config
    elif isinstance(config, (str, os.PathLike)):
        if isinstance(config, str) and config.lstrip().startswith("{"):
            raise ConfigError(
                "config looks like a JSON string; pass json.loads(text) or a file path"
            )
        raw = _read_json(Path(config))
        if not isinstance(raw, dict):
            raise ConfigError(
                f"config file '{config}' must hold a JSON object, got {type(raw).__name__}"
            )
    else:
        raise TypeError(
            f"config must be a dict, a path to a JSON file, or None; got {type(config).__name__}"
        )

    _check_keys(raw, "", _TOP_LEVEL_KEYS)
    if "bf16" in raw and "bfloat16" in raw:
        raise ConfigError("give only one of 'bf16' and its older alias 'bfloat16'")
    bf16_name = "bfloat16" if "bfloat16" in raw else "bf16"

    fp16 = parse_fp16(raw.get("fp16", {}))
    bf16 = _parse_bf16(raw.get(bf16_name, {}), bf16_name)
    if fp16.enabled and bf16.enabled:
        # DeepSpeed asserts the same: 'bfloat16 and fp16 modes cannot be simultaneously enabled'.
        raise ConfigError(f"fp16.enabled and {bf16_name}.enabled cannot both be true")

    ignored = _check_ignored(raw)
    tb, mb, ga = _batch_sizes(raw, world_size)
    return EngineConfig(
        fp16=fp16,
        bf16=bf16,
        optimizer=_parse_optimizer(raw["optimizer"]) if "optimizer" in raw else None,
        scheduler=_parse_scheduler(raw["scheduler"]) if "scheduler" in raw else None,
        gradient_clipping=_as_float(
            "gradient_clipping", raw.get("gradient_clipping", 0.0), minimum=0.0
        ),
        gradient_accumulation_steps=ga,
        train_batch_size=tb,
        train_micro_batch_size_per_gpu=mb,
        steps_per_print=_as_int("steps_per_print", raw.get("steps_per_print", 10), minimum=1),
        world_size=world_size,
        ignored_keys=ignored,
    )
