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

This module assembles the whole config (:class:`EngineConfig`, batch arithmetic, ZeRO, reading
the file); each section's dataclass and parser are in ``config_sections.py``, the typed value
checks and :class:`ConfigError` in ``config_values.py``. Every public name is importable from here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch

from .config_sections import (
    _BATCH_KEYS,
    _TOP_LEVEL_KEYS,
    IGNORED_DEEPSPEED_KEYS,
    SUPPORTED_SCHEDULERS,
    BF16Config,
    FP16Config,
    OptimizerConfig,
    SchedulerConfig,
    _check_keys,
    _parse_bf16,
    _parse_optimizer,
    _parse_scheduler,
    _supported_optimizers,
    parse_fp16,
)
from .config_values import ConfigError, _as_float, _as_int, _as_section

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


def __getattr__(name: str):
    # SUPPORTED_OPTIMIZERS: the types of the registered algorithms (fp16_triton/spec.py),
    # matched case-insensitively; computed on first use, as the registry imports the classes.
    if name == "SUPPORTED_OPTIMIZERS":
        return _supported_optimizers()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_MULTI_GPU_HINT = (
    "ZeRO sharding is done via torch.distributed (FSDP2 for stage 3, ZeroRedundancyOptimizer "
    "for stage 1) around fp16_triton's engine, see docs/distributed.md"
)


# --------------------------------------------------------------------------------------------
# The whole config
# --------------------------------------------------------------------------------------------


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

    optimizer = _parse_optimizer(raw["optimizer"]) if "optimizer" in raw else None
    if optimizer is not None and optimizer.params.get("master_weights") == "remainder":
        if fp16.enabled:  # the engine casts the model first: refuse here, before anything
            raise ConfigError(
                "config key 'optimizer.params.master_weights' = \"remainder\" keeps the low "
                "16 bits of bf16 params' fp32 masters, and 'fp16' is enabled: use "
                f"\"master_weights\": true with fp16, or enable '{bf16_name}' instead of 'fp16'"
            )
    ignored = _check_ignored(raw)
    tb, mb, ga = _batch_sizes(raw, world_size)
    return EngineConfig(
        fp16=fp16,
        bf16=bf16,
        optimizer=optimizer,
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
