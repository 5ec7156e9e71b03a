"""Containers that count their writes: ``optimizer.state``, each param's state dict, and each
param group's ``params`` list.

Why: a step keeps cached buckets, launch tables and (with ``flat_buffers=True``) flat storage
built from what these containers held. Users change them between steps as torch.optim lets them
(``optimizer.state[p]["exp_avg"] = zeros``, ``del optimizer.state[p]``,
``group["params"][0] = q``, ``optimizer.load_state_dict``). Each write advances a version, so
a step notices any of them with one integer comparison and rebuilds what depends on them,
instead of reading every entry again (a host cost linear in the number of params).

Every mutating method is counted, the C-level ones (``update``, ``pop``, ``setdefault``, ...)
included, since ``dict``'s and ``list``'s C methods do not go through ``__setitem__``. What is
not counted: writes into a plain dict *after* assigning it (``d = {}; optimizer.state[p] = d;
d["exp_avg"] = t``): the assignment stores a counting copy of ``d``, so write through
``optimizer.state[p]`` afterwards (as every torch.optim code path does).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

__all__ = ["OptimizerState", "ParamList", "ParamState"]


class ParamState(dict):
    """One param's state (``optimizer.state[p]``): every write advances ``owner.version``."""

    def __init__(self, owner: OptimizerState | None = None, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.owner = owner

    def _changed(self) -> None:
        if self.owner is not None:
            self.owner.version += 1

    def __setitem__(self, key, value):
        self._changed()
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self._changed()
        super().__delitem__(key)

    def clear(self):
        self._changed()
        super().clear()

    def pop(self, *args):
        self._changed()
        return super().pop(*args)

    def popitem(self):
        self._changed()
        return super().popitem()

    def update(self, *args, **kwargs):
        self._changed()
        super().update(*args, **kwargs)

    def __ior__(self, other):
        self.update(other)
        return self

    def setdefault(self, key, default=None):
        if key not in self:
            self._changed()
        return super().setdefault(key, default)

    def __reduce__(self):  # copy/pickle: a dict's items, relinked when stored in a state
        return (type(self), (), None, None, iter(self.items()))


class OptimizerState(defaultdict):
    """``optimizer.state``: a ``defaultdict(dict)`` whose per-param dicts are ``ParamState``s
    counting into ``version``, as does every assignment or removal of a param's state."""

    def __init__(self, *args):
        super().__init__(dict)
        self.version = 0
        if args:
            self.update(*args)

    def _own(self, value):
        """``value`` as a ParamState of this owner (a copy of any other mapping)."""
        if isinstance(value, ParamState) and value.owner is self:
            return value
        if isinstance(value, dict):
            return ParamState(self, value)
        return value  # not a dict: torch.optim allows it; the optimizer will refuse it

    def __missing__(self, key):
        value = self[key] = ParamState(self)
        return value

    def __setitem__(self, key, value):
        self.version += 1
        super().__setitem__(key, self._own(value))

    def __delitem__(self, key):
        self.version += 1
        super().__delitem__(key)

    def clear(self):
        self.version += 1
        super().clear()

    def pop(self, *args):
        self.version += 1
        return super().pop(*args)

    def popitem(self):
        self.version += 1
        return super().popitem()

    def update(self, *args, **kwargs):
        self.version += 1
        for key, value in dict(*args, **kwargs).items():
            super().__setitem__(key, self._own(value))

    def __ior__(self, other):
        self.update(other)
        return self

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = {} if default is None else default
        return self[key]

    def __reduce__(self):  # copy/pickle: rebuilt as the same class, per-param dicts relinked
        return (type(self), (), None, None, iter(self.items()))


class ParamList(list):
    """A param group's ``params``: every change advances ``version``."""

    version = 0

    def _changed(self) -> None:
        self.version += 1

    def __setitem__(self, index, value):
        self._changed()
        super().__setitem__(index, value)

    def __delitem__(self, index):
        self._changed()
        super().__delitem__(index)

    def __iadd__(self, other):
        self._changed()
        return super().__iadd__(other)

    def __imul__(self, n):
        self._changed()
        return super().__imul__(n)


def _counting(name: str):
    method = getattr(list, name)

    def counted(self, *args: Any, **kwargs: Any):
        self._changed()
        return method(self, *args, **kwargs)

    counted.__name__ = name
    return counted


for _name in ("append", "extend", "insert", "pop", "remove", "clear", "sort", "reverse"):
    setattr(ParamList, _name, _counting(_name))
