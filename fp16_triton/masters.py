"""The master an fp16/bf16 param carries (``master_weights``), and the conversions between kinds.

- ``master_weights=True``: state ``master_param``, the fp32 master (4 bytes per element).
- ``master_weights="remainder"`` (bf16 params only): state ``master_remainder``, the int16 low
  bits of the fp32 master, which the param's own bits complete (``kernels/remainder.py``): the
  same master in 2 bytes per element, and bitwise the same run as ``True``.
- ``False``, and every fp32 param: none (the param is its own master).

A param's master follows its group's setting and its dtype, converted exactly where possible
(a switch between steps, a state dict saved with the other kind, a cast of the param):

- fp32 master -> remainder: exact where the param still is its master's rounding; elsewhere the
  param was written since the master was, and, as a step would, the param's value wins there;
- remainder -> fp32 master: what the param and its remainder hold;
- none -> either: the param's current value.

Writes into a param between steps: a step with fp32 masters sees them by comparing bits
(``kernels/common.py: load_weight``); a remainder cannot (every pair of bits is some master).
So the optimizer notes each remainder-holding param's storage and version counter after every
step (``Fingerprints``) and, when either changed, zeroes the param's remainder before the next
step: the master becomes the value the param holds, which is what torch.optim would step. (A
Triton launch writes through raw pointers and leaves both as they were: its buckets' params
are noted again only after a rebuild, which notes them itself, or a dropped record.)
Writes that advance no version counter (through ``p.data``) are not seen: call
``refresh_fp32_params()`` after them (docs/changing-things-between-steps.md).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch

from .buckets import like_param, local
from .kernels.multi_tensor import LOW_PRECISION
from .kernels.remainder import join_reference, split_reference

__all__ = [
    "MASTER",
    "REMAINDER",
    "MASTER_STATES",
    "check_master_weights",
    "check_remainder_params",
    "master_kind",
    "new_master",
    "convert_master",
    "fp32_master",
    "Fingerprints",
]

MASTER = "master_param"
REMAINDER = "master_remainder"
MASTER_STATES = (MASTER, REMAINDER)


def check_master_weights(value: Any) -> bool | str:
    """``master_weights`` as kept in a param group: True, False or ``"remainder"``."""
    if isinstance(value, str):
        if value != "remainder":
            raise ValueError(f"master_weights must be True, False or 'remainder', got {value!r}")
        return value
    if not isinstance(value, (bool, int)):
        raise TypeError(f"master_weights must be True, False or 'remainder', got {value!r}")
    return bool(value)


def check_remainder_params(group: dict[str, Any], params: Iterable[torch.Tensor]) -> None:
    """Raise, before anything is written, if a group with remainders holds an fp16 param: an
    fp16 number is not the high half of an fp32 number, so no 16-bit remainder completes it."""
    if group.get("master_weights") != "remainder":
        return
    for p in params:
        if p.dtype == torch.float16:
            raise ValueError(
                "master_weights='remainder' keeps the masters of bf16 params only (a bf16 "
                f"number is the high half of an fp32 one); got a float16 param of shape "
                f"{tuple(p.shape)}. Use master_weights=True for fp16 params (or put them in a "
                "param group of their own with master_weights=True)"
            )


def master_kind(group: dict[str, Any], dtype: torch.dtype) -> str | None:
    """The state name of the master a ``dtype`` param of ``group`` carries, or None."""
    setting = group["master_weights"]
    if not setting or dtype not in LOW_PRECISION:
        return None
    return REMAINDER if setting == "remainder" else MASTER


def new_master(p: torch.Tensor, kind: str) -> torch.Tensor:
    """The master of kind ``kind`` holding ``p``'s current value (``p``'s strides, sharded like
    it when it is a DTensor)."""
    shard = local(p).detach()
    if kind == MASTER:
        return like_param(shard.float().clone(), p)
    return like_param(torch.zeros_like(shard, dtype=torch.int16), p)


def convert_master(p: torch.Tensor, state: dict[str, Any], kind: str | None) -> str | None:
    """Give ``p``'s state the master of kind ``kind`` (None: no master), converting the one it
    has (see the module docstring). Returns what was done, for a log line, or None."""
    if kind is None:
        dropped = [name for name in MASTER_STATES if name in state]
        for name in dropped:
            del state[name]
        return "dropped" if dropped else None
    other = REMAINDER if kind == MASTER else MASTER
    if kind in state:
        if other in state:
            del state[other]
        return None
    shard = local(p).detach()
    if other not in state:
        state[kind] = new_master(p, kind)
        return "added"
    held = local(state[other]).detach()
    if kind == MASTER:
        master = torch.empty_like(shard, dtype=torch.float32).copy_(join_reference(shard, held))
    else:
        param, rest = split_reference(held)
        kept = param.view(torch.int16) == shard.contiguous().view(torch.int16)
        master = torch.empty_like(shard, dtype=torch.int16).copy_(
            torch.where(kept, rest, torch.zeros_like(rest))
        )
    del state[other]
    state[kind] = like_param(master, p)
    return "converted"


def fp32_master(p: torch.Tensor, state: dict[str, Any]) -> torch.Tensor | None:
    """``p``'s fp32 master as a new tensor (a remainder joined with ``p``), or None: what state
    dicts hold, whichever kind the optimizer keeps. A remainder whose param was cast from bf16
    since completes nothing: the master is then what the next step starts from, the value
    of an fp16 param (its master is remade from it) and none for an fp32 one."""
    if MASTER in state:
        return state[MASTER]
    if REMAINDER not in state or p.dtype == torch.float32:
        return None
    shard = local(p).detach()
    if p.dtype != torch.bfloat16:
        return like_param(shard.float(), p)
    master = torch.empty_like(shard, dtype=torch.float32)
    master.copy_(join_reference(shard, local(state[REMAINDER]).detach()))
    return like_param(master, p)


class Fingerprints:
    """Each remainder-holding param's (storage address, version counter) when last noted
    (see the module docstring): ``stale`` names the params written since, ``note`` records.
    A record holds weak references to the param and to the local tensor it was taken from (a
    DTensor's shard: a new one counts as written), so it keeps neither alive. A DTensor has
    two counters: an in-place op on the DTensor (``p.mul_()``, ``model.load_state_dict``)
    advances its own, one on its shard (a kernel's reference, ``p.to_local().mul_()``) the
    shard's; both are compared."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[weakref.ref, weakref.ref | None, int, int, int]] = {}
        self.generation = 0  # advanced whenever a record is dropped

    def __bool__(self) -> bool:
        """Whether any param is noted (only then can one be stale)."""
        return bool(self._seen)

    def stale(self, params: Iterable[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The noted params (of ``params``, default all) written since ``note``: one pass
        of a few attribute reads per param."""
        if params is None:
            records = self._seen.values()
        else:
            records = [r for p in params if (r := self._seen.get(id(p))) is not None]
        out, freed = [], False
        for ref, shard_ref, address, version, outer in records:
            p = ref()
            if p is None:  # freed (its id may be another tensor's now): dropped below
                freed = True
                continue
            shard = p if shard_ref is None else shard_ref()
            if (
                shard is None
                or shard._version != version
                or shard.data_ptr() != address
                or (shard_ref is not None and (p._version != outer or local(p) is not shard))
            ):
                out.append(p)
        if freed:
            self._seen = {key: r for key, r in self._seen.items() if r[0]() is not None}
        return out

    def note(self, params: Iterable[torch.Tensor]) -> None:
        """Record the optimizer's ``params`` as they are now."""
        for p in params:
            shard = local(p)
            shard_ref = None if shard is p else weakref.ref(shard)
            record = (weakref.ref(p), shard_ref, shard.data_ptr(), shard._version, p._version)
            self._seen[id(p)] = record

    def forget(self, p: torch.Tensor) -> None:
        """Drop ``p``'s record: its remainder was just made from its current value."""
        self._seen.pop(id(p), None)
        self.generation += 1
