"""Which buckets a step launches on, and when they must be rebuilt: ``FusedOptimizer``'s plans.

The step acts on what the user sees. Steady steps reuse buckets (``buckets.py``) and, with
``flat_buffers=True``, flat storage (``flat_buffers.py``); both are rebuilt, after validating
every param, grad and state tensor again, whenever something they were built from changed:

- ``optimizer.state``, any param's state dict, a group's ``params`` list (``tracked.py``
  counts every write) or a group's state-shaping settings (masters, amsgrad, momentum): O(1);
- a param's data (dtype, shape, layout, device: ``model.half()``, ``p.data = ...``) or a grad
  laid out unlike its param: compared per tensor by the bucket, or in O(1) by flat buffers.

Every group's plan is checked before any group's is rebuilt, so that a refused step writes
nothing (``_gather``).
"""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass, field
from typing import Any

import torch

from .backend import resolve_backend
from .buckets import Bucket, local
from .flat_buffers import FlatBuffers
from .flat_policy import (
    adopted_params,
    check_adoption,
    check_left_out,
    log_readopted,
    regroup,
    steady_step,
    warn_foreign_views,
    zero_flat_grads,
    zero_grads,
)
from .kernels.multi_tensor import TableCache, is_aligned
from .masters import MASTER_STATES, REMAINDER
from .param_state import SEED_STATE, check_unshared
from .tracked import ParamList

__all__ = ["BucketPlans", "GroupCache"]

_MAX_CACHED_ACTIVE_SETS = 8  # distinct "which params have grads" patterns kept per group
_FLAT = "flat"  # key of a group's plan with flat_buffers=True
_ALL = None  # key of a group's plan when every param has a grad


@dataclass
class GroupPlan:
    """A group's buckets for one set of params with grads (per tensor), or its flat buckets,
    reused while ``optimizer.state`` has not been written since they were built."""

    buckets: list[Bucket] = field(default_factory=list)
    state_version: int = -1  # optimizer.state's version when the buckets were built
    others: list[torch.Tensor] = field(default_factory=list)  # flat_buffers: not adopted


@dataclass
class GroupCache:
    """A group's plans, and what they were built from: the group dict, its ``params`` list
    (with its write count) and its state-shaping settings. All compared at every step, O(1)."""

    group: dict[str, Any]
    params: ParamList
    params_version: int
    kind: tuple
    plans: dict[Any, GroupPlan] = field(default_factory=dict)

    def current(self, group: dict[str, Any], kind: tuple) -> bool:
        params = group["params"]
        return (
            self.group is group
            and params is self.params
            and params.version == self.params_version
            and kind == self.kind
        )


Work = list[tuple[Bucket, list[torch.Tensor]]]  # a group's (bucket, grads) for one step


@dataclass
class Rebuild:
    """A group whose buckets this step must (re)build: every group's is checked before any
    group's is built, so that a refused step writes nothing."""

    group: dict[str, Any]
    cache: GroupCache
    key: Any = None  # per-tensor: which params have grads
    active: list[torch.Tensor] | None = None  # per-tensor: those params; flat: the adopted
    grads: list[torch.Tensor] | None = None  # per-tensor: their grads
    plan: GroupPlan | None = None  # flat buffers: the stale plan, if any


class BucketPlans:
    """Mixin of ``FusedOptimizer``: the per-step plan of its groups (see the module
    docstring), the buckets' state lists and ``zero_grad``."""

    def _group_cache(self, group: dict[str, Any]) -> GroupCache:
        """The group's plans, reset (and its params checked again) whenever the group dict,
        its params list or a write to that list, or its state-shaping settings changed."""
        kind = self._state_kind(group)
        cache = self._groups.get(id(group))
        if (  # GroupCache.current, inlined: it runs for every group at every step
            cache is not None
            and cache.group is group
            and group["params"] is cache.params
            and cache.params.version == cache.params_version
            and kind == cache.kind
        ):
            return cache
        params = group["params"]
        self._check_params(list(params))
        if not isinstance(params, ParamList):
            params = group["params"] = ParamList(params)
        cache = self._groups[id(group)] = GroupCache(group, params, params.version, kind)
        return cache

    def _plan(self, group: dict[str, Any]) -> Work | Rebuild:
        """This step's ``(bucket, grads)`` pairs of ``group`` while its cached buckets still hold
        (see the module docstring), else what must be rebuilt. One pass reads every ``p.grad``
        (a costly attribute at 10k params)."""
        if self.flat_buffers:
            return self._flat_plan(group)
        cache = self._group_cache(group)
        params = group["params"]
        grads = [p.grad for p in params]
        # Not `None in grads` (it calls Tensor.__eq__) nor a generator (slower at 10k params).
        if all(map(operator.is_not, grads, itertools.repeat(None))):
            key, active = _ALL, params
        else:
            active = [p for p, g in zip(params, grads) if g is not None]
            grads = [g for g in grads if g is not None]
            key = tuple(map(id, active))
        plan = cache.plans.get(key)
        if plan is not None and plan.state_version == self._state.version:
            work = [(bucket, bucket.grads(grads)) for bucket in plan.buckets]
            if all(g is not None for _, g in work):
                self._step_plans.append(plan)
                return work
        return Rebuild(group, cache, key, list(active), grads)

    def _flat_plan(
        self, group: dict[str, Any]
    ) -> list[tuple[Bucket, list[torch.Tensor]]] | Rebuild:
        """The group's flat buckets: O(1) when nothing was replaced since the last step (plus
        one ``requires_grad`` read per param of the group that was left out as frozen)."""
        cache = self._group_cache(group)
        plan = cache.plans.get(_FLAT)
        if plan is not None:
            check_left_out(plan.others)
        if plan is not None and plan.state_version == self._state.version:
            flats = [bucket.flat for bucket in plan.buckets]
            if not self._left_slots(flats) and steady_step(flats):
                self._step_plans.append(plan)
                return [(bucket, bucket.grads(None)) for bucket in plan.buckets]
        return Rebuild(group, cache, plan=plan)

    def _left_slots(self, flats: list[FlatBuffers]) -> bool:
        """Whether a param with a remainder that was written since the last step left its slot:
        ``p.data = t`` while the old tensor is kept elsewhere, which the O(1) checks cannot see
        but the remainders' pass does (O(n) for the buffers holding such a param only)."""
        written = self._written  # set by ``_gather`` for this step
        return bool(written) and any(
            not flat.all_in_place() for flat in flats if any(id(p) in written for p in flat.params)
        )

    def _check_rebuild(self, rebuild: Rebuild) -> None:
        """Raise, before anything is written, unless the group's buckets can be rebuilt: every
        param, grad and state tensor checked (with flat buffers, every param that requires
        grad, and the group's one step count)."""
        group = rebuild.group
        self._check_masters(group, group["params"])
        if self.flat_buffers:
            adopted = adopted_params(group["params"])
            rebuild.active = adopted
            if rebuild.plan is None and all(p.grad is None for p in adopted):
                return  # no grad yet: nothing to adopt
            grads = [p.grad for p in adopted]
        else:
            adopted, grads = rebuild.active, rebuild.grads
        self._check_params(adopted)
        for p, g in zip(adopted, grads):
            if g is not None:
                self._check_grad(p, g)
            self._check_state(p, group)
        if not self.flat_buffers:
            return
        check_adoption(adopted, group, self.param_groups, self.state, self._describe)

    def _rebuild(self, rebuild: Rebuild) -> Work:
        """Rebuild a group's buckets (checked by ``_check_rebuild``): complete the state, and
        group the params into buckets or adopt them into flat buffers."""
        if self.flat_buffers:
            buckets = self._adopt_group(rebuild)
            for bucket in buckets:
                bucket.flat.start_step(verified=False)
            if _FLAT in rebuild.cache.plans:
                self._step_plans.append(rebuild.cache.plans[_FLAT])
            return [(bucket, bucket.grads(None)) for bucket in buckets]
        cache, group, active, grads = rebuild.cache, rebuild.group, rebuild.active, rebuild.grads
        if len(cache.plans) >= _MAX_CACHED_ACTIVE_SETS:
            cache.plans.clear()
        plan = cache.plans[rebuild.key] = GroupPlan(self._build_buckets(group, active, grads))
        self._step_plans.append(plan)
        return [(bucket, bucket.grads(grads)) for bucket in plan.buckets]

    def _build_buckets(
        self, group: dict[str, Any], active: list[torch.Tensor], grads: list[torch.Tensor]
    ) -> list[Bucket]:
        """Complete the state of the (checked) active params and group them into buckets."""
        # One bucket per (device, dtypes, alignment): a param of odd size or address gets its
        # own launch rather than taking 128-bit loads away from the others.
        by_key: dict[tuple, list[int]] = {}
        for i, (p, g) in enumerate(zip(active, grads)):
            shard = local(p)
            key = (shard.device, p.dtype, g.dtype, is_aligned(shard), self._bucket_key(p, group))
            by_key.setdefault(key, []).append(i)
        buckets = []
        for (device, *_), indices in by_key.items():
            params = [active[i] for i in indices]
            backend = resolve_backend(self.backend, device)
            for p in params:
                self._ensure_state(p, group)
            cache = TableCache() if backend == "triton" else None
            whole = len(indices) == len(active)
            bucket = Bucket.per_tensor(
                params, [grads[i] for i in indices], backend, cache, None if whole else indices
            )
            self._refresh_state_lists(bucket)
            buckets.append(bucket)
        return buckets

    def _adopt_group(self, rebuild: Rebuild) -> list[Bucket]:
        """(Re)build the group's flat buckets and move every (checked) param's data, grad and
        state into them: at the first step, and after grads, data or state were replaced from
        outside (an O(n) pass)."""
        group, plan, adopted = rebuild.group, rebuild.plan, rebuild.active
        if plan is None and all(p.grad is None for p in adopted):
            return []  # no grad yet: like torch, a step before any backward changes nothing
        buckets = []
        key_of = lambda p: self._bucket_key(p, group)  # noqa: E731
        for bucket, key, params in regroup(adopted, plan.buckets if plan else [], key_of):
            if bucket is None:
                flat = FlatBuffers(params, key, self._block_states(key))
                backend = resolve_backend(self.backend, flat.device)
                cache = TableCache() if backend == "triton" else None
                bucket = Bucket(
                    params, flat.launch_params, {}, backend, flat.dtype, cache, flat=flat
                )
            for p in params:
                self._ensure_state(p, group)
            buckets.append(bucket)
        kept = {id(b) for b in buckets}
        replaced = [b.flat for b in plan.buckets if id(b) not in kept] if plan else []
        warn_foreign_views([bucket.flat for bucket in buckets], replaced)
        moved = sum(self._refresh_state_lists(bucket) for bucket in buckets)
        if plan is not None and moved:
            log_readopted(moved, self._warned_readopt)
            self._warned_readopt = True
        others = [p for p in group["params"] if not p.requires_grad]
        rebuild.cache.plans = {_FLAT: GroupPlan(buckets, self.state.version, others)}
        return buckets

    def _refresh_state_lists(self, bucket: Bucket) -> int:
        """Point ``bucket.state`` at the current state tensors (after state was added or
        replaced); a flat bucket first adopts them. Returns the number of params whose data
        or grad a flat bucket had to move."""
        moved = 0
        names = list(self._state_names) + list(MASTER_STATES)
        if bucket.flat is not None:
            moved = bucket.flat.adopt(self.state, names, per_param=(SEED_STATE,))
            bucket.state = bucket.flat.launch_state(names)
        else:
            bucket.state = {name: self._state_list(bucket.params, name) for name in names}
            if bucket.cache is not None:
                # The launch tables hold the state's addresses; a state tensor whose memory is
                # replaced (state[p]["exp_avg"].data = t, .set_()) must not free it under them.
                bucket.kept_storages = [
                    t.untyped_storage() for lst in bucket.state.values() if lst for t in lst
                ]
        if bucket.cache is not None:
            bucket.cache.state_version += 1
        # Remainders: settled before any rebuild (``_gather``), so the params as they now are
        # (moved into flat buffers, maybe) are the ones to compare with, even if this step
        # stops before its end; noted again after the launches.
        bucket.noted = None
        if bucket.state.get(REMAINDER):
            self._fingerprints.note(bucket.params)
        return moved

    @torch.compiler.disable  # eager under torch.compile, as torch.optim's zero_grad
    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim.Optimizer.zero_grad``. With ``flat_buffers=True`` the grads of adopted
        params are views that stay: each bucket's grad buffer is zeroed in place (one fill),
        whatever ``set_to_none`` says, as with DDP's ``gradient_as_bucket_view``."""
        if not self.flat_buffers:
            return super().zero_grad(set_to_none)
        for group in self.param_groups:
            cache = self._groups.get(id(group))
            plan = None
            if cache is not None and cache.current(group, self._state_kind(group)):
                plan = cache.plans.get(_FLAT)
            if plan is None:  # not adopted (yet, or any more): torch's semantics
                zero_grads(group["params"], set_to_none)
            else:
                flats = [bucket.flat for bucket in plan.buckets]
                zero_flat_grads(flats, group["params"], plan.others, set_to_none)

    def _state_list(self, params: list[torch.Tensor], name: str) -> list[torch.Tensor] | None:
        """The local tensors of state ``name`` of ``params`` (None if the first has none)."""
        if name not in self.state[params[0]]:
            return None
        return [local(self.state[p][name]) for p in params]

    def _gather(self) -> list[tuple[dict[str, Any], Bucket, list[torch.Tensor]]]:
        """This step's work: ``(group, bucket, grads)`` for every bucket with grads, every
        bucket checked (and rebuilt if stale) before any is launched. The ``FP16Optimizer``
        reuses it for its check pass, so one step reads each ``p.grad`` once and groups the
        grads once."""
        work = []
        self._step_plans: list[GroupPlan] = []
        for group in self.param_groups:  # all of them before any group's state is made
            self._check_hyperparameters(group)
        # Params with remainders written since the last step: one pass, read by the flat
        # plans (a param whose data was replaced is re-adopted) and settled once checked.
        stale = self._fingerprints.stale() if self._fingerprints else []
        self._written = {id(p) for p in stale} | self._settled  # (settled by state_dict())
        planned = [(group, self._plan(group)) for group in self.param_groups]
        rebuilds = [plan for _, plan in planned if isinstance(plan, Rebuild)]
        for plan in rebuilds:
            self._check_rebuild(plan)
        if rebuilds:  # no state tensor shared by two params, in any groups (a flat bucket's
            # params share its one step count by design)
            every = [p for group in self.param_groups for p in group["params"]]
            check_unshared(self.state, every, shared=("step",) if self.flat_buffers else ())
        self._settled = set()
        if stale:  # once checked, and before flat buffers adopt replaced data
            self._settle_remainders(stale)
        for group, plan in planned:
            for bucket, grads in self._rebuild(plan) if isinstance(plan, Rebuild) else plan:
                # torch refuses a grad whose dtype differs from its param's, so one grad's
                # dtype speaks for the bucket; a change means the params were cast: regroup.
                if grads[0].dtype != bucket.grad_dtype:
                    self._groups.pop(id(group), None)
                    return self._gather()
                work.append((group, bucket, grads))
        # The plans used now are current, whatever state a later group's first step created
        # (params belong to one group each): without this, every group's first step would
        # make the groups before it rebuild at the next step.
        for plan in self._step_plans:
            plan.state_version = self._state.version
        if len(self._groups) > len(self.param_groups):  # groups removed or replaced
            current = {id(group) for group in self.param_groups}
            self._groups = {k: c for k, c in self._groups.items() if k in current}
        return work
