"""Compact optimizer state: the storage options an optimizer offers by mixing in
``CompactState`` (Adam and AdamW today).

- ``state_dtype``: the states named by ``_compact_state`` (Adam's moments) kept in bf16, half
  the bytes; the kernels widen them on load and round them on store (``kernels/common.py``).
- ``stochastic_rounding`` with a ``seed``: low-precision values written without an fp32 copy
  behind them are rounded stochastically (``kernels/stochastic.py``), with one int64
  ``sr_seed`` state per param drawn from the optimizer's seed and the param's position.

Both are group options; changing one between steps converts the state before the next step
(they are part of the optimizer's ``_state_kind``). Figures per mode: docs/compact-state.md.
"""

from __future__ import annotations

from typing import Any

import torch

from . import int8_state
from .buckets import local
from .kernels import quantize
from .param_state import SEED_STATE

__all__ = ["CompactState", "STATE_DTYPES", "CONFIG_KINDS", "param_seed", "bucket_shard"]

STATE_DTYPES = (torch.float32, torch.bfloat16)
"""The dtypes ``state_dtype`` may name (besides ``"int8"``, for Adam and AdamW)."""


class CompactState:
    """Mixin of a ``FusedOptimizer`` subclass (before it in the bases) that offers
    ``state_dtype``, ``stochastic_rounding`` and ``seed``. The subclass names the states kept
    in ``state_dtype`` (``_compact_state``), calls ``_init_compact`` in its ``__init__`` and
    ``_check_compact`` in ``_check_hyperparameters``, adds ``_compact_kind`` to its
    ``_state_kind`` and ``_complete_seed`` to its ``_complete_state`` (which the mixin's
    ``_new_state`` runs on a new param's state too)."""

    _compact_state: tuple[str, ...] = ()
    _int8_moments = False  # whether state_dtype="int8" is built (Adam, AdamW)
    # A loaded state dict does not override how this optimizer stores its state; the loaded
    # state is converted to it (FusedOptimizer.load_state_dict).
    _kept_on_load = ("state_dtype",)

    def _init_compact(self, seed: int | None, state_dtype) -> int:
        """Check the options (before anything is kept); return the seeds' source, the group
        option ``seed`` (``torch.initial_seed()`` for None): in the groups, it is saved by
        ``state_dict()``, so a resumed run seeds the params that get state later alike."""
        _check_state_dtype(state_dtype, self._int8_moments)
        _check_seed(seed, none_ok=True)
        self._sr_index: dict[int, int] = {}
        return torch.initial_seed() if seed is None else int(seed)

    def _check_compact(self, group: dict[str, Any]) -> None:
        state_dtype = group.get("state_dtype", torch.float32)
        _check_state_dtype(state_dtype, self._int8_moments)
        rounding = group.get("stochastic_rounding", False)
        if not isinstance(rounding, bool):
            raise TypeError(f"stochastic_rounding must be True or False, got {rounding!r}")
        _check_seed(group.get("seed", 0), what="a param group's seed")
        if state_dtype == "int8" and group.get("amsgrad"):
            raise ValueError(
                "state_dtype='int8' keeps exp_avg and exp_avg_sq in 8 bits; amsgrad's running "
                "maximum is not built for it: use amsgrad=False, or state_dtype=torch.bfloat16"
            )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``FusedOptimizer.add_param_group``; ``seed=None`` is ``torch.initial_seed()``, as
        in the constructor."""
        if isinstance(param_group, dict) and "seed" in param_group:
            _check_seed(param_group["seed"], none_ok=True)
            if param_group["seed"] is None:
                param_group = dict(param_group, seed=torch.initial_seed())
        super().add_param_group(param_group)

    def _compact_kind(self, group: dict[str, Any]) -> tuple:
        """The group settings that shape the state (a switch converts it)."""
        state_dtype = group.get("state_dtype", torch.float32)
        return state_dtype, bool(group.get("stochastic_rounding", False))

    def _state_dtype(self, name: str, group: dict[str, Any], p=None) -> torch.dtype:
        if name in self._compact_state:
            dtype = group.get("state_dtype", torch.float32)
            if dtype == "int8":  # small and non-row-major tensors keep fp32 (quantize.py)
                shard = local(p) if p is not None else None
                int8 = shard is not None and shard.numel() >= quantize.SMALL
                int8 = int8 and shard.is_contiguous() and name in int8_state.SCALES
                return torch.int8 if int8 else torch.float32
            return dtype
        return torch.float32

    def _bucket_key(self, p: torch.Tensor, group: dict[str, Any]) -> Any:
        """Params whose moments differ in dtype (int8 groups keep small tensors' in fp32)
        launch apart: a kernel reads one moment dtype."""
        return self._state_dtype(self._compact_state[0], group, p) if self._compact_state else None

    def _block_states(self, key: Any) -> tuple[str, ...]:
        """A bucket of int8 moments keeps their block scales (``flat_buffers.py``)."""
        return int8_state.SCALE_NAMES if key == torch.int8 else ()

    def state_dict(self) -> dict[str, Any]:
        """As ``FusedOptimizer.state_dict``; a sharded (FSDP2) param's int8 moments are
        dequantized into fp32 DTensors sharded like it (``int8_state.py``: their block scales
        are no shard of a global tensor)."""
        sd = super().state_dict()
        if self._int8_moments:
            params = [p for group in self.param_groups for p in group["params"]]
            for index, entry in sd["state"].items():
                int8_state.sharded_export(params[index], entry)
        return sd

    def _new_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        state = super()._new_state(p, group)
        self._complete_state(p, group, state)  # the seed (and what it needs), made for p itself
        return state

    def _complete_seed(self, p: torch.Tensor, group: dict[str, Any], state: dict) -> None:
        """Give ``p`` its seed when its group rounds stochastically, drop it otherwise: a
        group's params all have one or none, and a seed is a function of the optimizer's seed
        and the param's position, so switching back on remakes the same one."""
        if not group.get("stochastic_rounding", False):
            state.pop(SEED_STATE, None)
        elif state.get(SEED_STATE) is None:
            seed = param_seed(group.get("seed", 0), self._param_index(p))
            state[SEED_STATE] = torch.tensor(seed, dtype=torch.int64, device=local(p).device)

    def _param_index(self, p: torch.Tensor) -> int:
        """``p``'s position over all param groups (a dict rebuilt when a param is new to it)."""
        index = self.__dict__.setdefault("_sr_index", {}).get(id(p))
        if index is None:
            params = [q for group in self.param_groups for q in group["params"]]
            self._sr_index = {id(q): i for i, q in enumerate(params)}
            index = self._sr_index[id(p)]
        return index

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        base = state.pop("sr_seed_base", 0)  # pickles from before the seed was a group option
        self._sr_index = {}
        super().__setstate__(state)
        for group in [*self.param_groups, self.defaults]:  # (defaults: groups added later)
            group.setdefault("seed", base)


def bucket_shard(bucket) -> int:
    """The shard number a bucket's stochastic rounding counts its words by: its params' shard
    position (``buckets.shard_position``), so that the shards of one FSDP2 tensor, which share
    its seed and their local element indices, draw different words. Params of one bucket at
    different positions (different meshes or placements) cannot share one number: refused,
    before anything is written."""
    if bucket.shard is None:
        raise ValueError(
            "stochastic_rounding: the sharded params of one param group sit at different "
            "shard positions (different device meshes or placements); put them in separate "
            "param groups, or turn stochastic rounding off"
        )
    return bucket.shard


def _check_seed(seed, none_ok: bool = False, what: str = "seed") -> None:
    """``seed`` is an int (not a bool), or None where ``none_ok``: ``torch.initial_seed()``,
    resolved only where the optimizer is built or a group added."""
    if not (isinstance(seed, int) and not isinstance(seed, bool)) and not (
        none_ok and seed is None
    ):
        raise TypeError(f"{what} must be an int{' or None' if none_ok else ''}, got {seed!r}")


def param_seed(seed: int, index: int) -> int:
    """A 63-bit seed for param ``index`` from an optimizer's ``seed``: SplitMix64's finaliser
    (Steele, Lea, Flood 2014) of ``seed + (index + 1) * golden``, so that neighbouring indices
    and seeds give unrelated Philox keys. A function of the two, not a generator's next draw,
    so that it does not depend on the order in which params get their state."""
    m64 = (1 << 64) - 1
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & m64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m64
    return (z ^ (z >> 31)) >> 1


def _check_state_dtype(state_dtype, int8: bool = False) -> None:
    if isinstance(state_dtype, str) and state_dtype == "int8":
        if not int8:
            raise ValueError(
                "state_dtype='int8' is built for Adam and AdamW's moments only; use "
                "torch.float32 or torch.bfloat16"
            )
        return
    if state_dtype not in STATE_DTYPES:
        raise ValueError(
            f"state_dtype must be torch.float32, torch.bfloat16"
            f"{' or ' + repr('int8') if int8 else ''}, got {state_dtype!r}"
        )


# ------------------------------------------------------------------------------- config
_CONFIG_STATE_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def _check_config_state_dtype(key: str, value, int8: bool = False) -> torch.dtype | str:
    """The config's ``state_dtype``: a string (JSON has no dtypes), or the class default;
    ``"int8"`` where the algorithm has int8 moments (Adam, AdamW)."""
    from .config import ConfigError

    if isinstance(value, torch.dtype) and value in STATE_DTYPES:
        return value
    if int8 and isinstance(value, str) and value.lower() == "int8":
        return "int8"
    if isinstance(value, str) and value.lower() in _CONFIG_STATE_DTYPES:
        return _CONFIG_STATE_DTYPES[value.lower()]
    names = sorted(_CONFIG_STATE_DTYPES) + (["int8"] if int8 else [])
    raise ConfigError(f"config key '{key}' must be one of {names}, got {value!r}")


def _check_config_seed(key: str, value):
    """The config's ``seed``: an integer, or null for ``torch.initial_seed()``."""
    from .config import ConfigError

    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise ConfigError(f"config key '{key}' must be an integer or null, got {value!r}")


CONFIG_KINDS = {"state_dtype": _check_config_state_dtype, "seed": _check_config_seed}
"""The config checks of the compact options (``Algorithm.config_kinds``)."""
INT8_CONFIG_KINDS = dict(
    CONFIG_KINDS, state_dtype=lambda key, value: _check_config_state_dtype(key, value, int8=True)
)
"""The same, for algorithms with int8 moments (Adam, AdamW)."""
