"""The base of the fused optimizers: grouping, fp32 masters, backends, state dicts, AMP contract.

``FusedOptimizer`` is a ``torch.optim.Optimizer``: ``param_groups``, ``add_param_group``,
``zero_grad``, ``state``, schedulers and ``torch.amp.GradScaler`` work as with torch's own. A
subclass names its state (``_state_names``, ``_required_state``), how to create and complete it
(``_init_state``, ``_complete_state``: the rules are in ``param_state.py``), which group
settings shape it (``_state_kind``) and how to launch one step of a bucket
(``_prepare_bucket``).

The step acts on what the user sees. Steady steps reuse buckets (``buckets.py``) and, with
``flat_buffers=True``, flat storage (``flat_buffers.py``); both are rebuilt, after validating
every param, grad and state tensor again, whenever something they were built from changed:

- ``optimizer.state``, any param's state dict, a group's ``params`` list (``tracked.py``
  counts every write) or a group's state-shaping settings (masters, amsgrad, momentum): O(1);
- a param's data (dtype, shape, layout, device: ``model.half()``, ``p.data = ...``) or a grad
  laid out unlike its param: compared per tensor by the bucket, or in O(1) by flat buffers.

Validation comes before any write: a step that cannot be done as torch.optim would raises,
naming the param and what to do, with params and state untouched. A param that becomes
fp16/bf16 gets an fp32 master from its current value; one that becomes fp32 drops its master.
"""

from __future__ import annotations

import itertools
import operator
import warnings
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim import Optimizer

from .backend import BACKENDS, resolve_backend
from .buckets import Bucket, DTensor, local
from .flat_buffers import (
    FlatBuffers,
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
from .kernels.multi_tensor import TableCache, is_aligned, is_dense
from .masters import (
    MASTER,
    MASTER_STATES,
    REMAINDER,
    Fingerprints,
    check_master_weights,
    check_remainder_params,
    fp32_master,
)
from .param_state import SEED_STATE, SUPPORTED_DTYPES, ParamStateRules, check_unshared
from .tracked import OptimizerState, ParamList

__all__ = ["FusedOptimizer"]

_MAX_CACHED_ACTIVE_SETS = 8  # distinct "which params have grads" patterns kept per group
_FLAT = "flat"  # key of a group's plan with flat_buffers=True
_ALL = None  # key of a group's plan when every param has a grad


@dataclass
class _GroupPlan:
    buckets: list[Bucket] = field(default_factory=list)
    state_version: int = -1  # optimizer.state's version when the buckets were built
    others: list[torch.Tensor] = field(default_factory=list)  # flat_buffers: not adopted


@dataclass
class _GroupCache:
    """A group's plans, and what they were built from: the group dict, its ``params`` list
    (with its write count) and its state-shaping settings. All compared at every step, O(1)."""

    group: dict[str, Any]
    params: ParamList
    params_version: int
    kind: tuple
    plans: dict[Any, _GroupPlan] = field(default_factory=dict)

    def current(self, group: dict[str, Any], kind: tuple) -> bool:
        params = group["params"]
        return (
            self.group is group
            and params is self.params
            and params.version == self.params_version
            and kind == self.kind
        )


_Work = list[tuple[Bucket, list[torch.Tensor]]]  # a group's (bucket, grads) for one step


@dataclass
class _Rebuild:
    """A group whose buckets this step must (re)build: every group's is checked before any
    group's is built, so that a refused step writes nothing."""

    group: dict[str, Any]
    cache: _GroupCache
    key: Any = None  # per-tensor: which params have grads
    active: list[torch.Tensor] | None = None  # per-tensor: those params; flat: the adopted
    grads: list[torch.Tensor] | None = None  # per-tensor: their grads
    plan: _GroupPlan | None = None  # flat buffers: the stale plan, if any


class FusedOptimizer(ParamStateRules, Optimizer):
    """Base class of ``Adam``, ``AdamW`` and ``SGD``: see the module docstring.

    Subclasses set ``_state_names`` (per-param fp32 state, in torch's names) and
    ``_required_state`` (names a non-empty state must have), and implement ``_init_state``,
    ``_prepare_bucket`` and, where they apply, ``_complete_state`` and ``_state_kind``.
    """

    # torch.amp.GradScaler passes its scale and inf flag as device tensors (grad_scale,
    # found_inf attributes) instead of unscaling and syncing: the contract of torch's fused
    # optimizers.
    _step_supports_amp_scaling = True
    # Group options a loaded state dict does not override: how this optimizer stores its state
    # (Adam's ``state_dtype``; every optimizer's ``master_weights``, always kept), which the
    # loaded state is converted to.
    _kept_on_load: tuple[str, ...] = ()

    def __init__(
        self,
        params: Iterable,
        defaults: dict[str, Any],
        *,
        master_weights: bool | str = True,
        backend: str = "auto",
        flat_buffers: bool = False,
    ):
        self._check_hyperparameters(defaults)  # the subclass's checks, before anything is kept
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.flat_buffers = bool(flat_buffers)
        self._warned_readopt = False  # flat buffers: the re-adoption warning is logged once
        self._logged: set[str] = set()  # notes logged once per optimizer
        self._groups: dict[int, _GroupCache] = {}
        # Each param's dtype when its state was last made whole: a cast between fp16 and bf16
        # remakes its master (weak references: the optimizer does not keep params alive).
        self._dtypes: dict[int, tuple[weakref.ref, torch.dtype]] = {}
        self._fingerprints = Fingerprints()  # remainder masters: writes between steps
        # Checked against flat buffers and the params' dtypes by add_param_group.
        defaults = dict(defaults, master_weights=check_master_weights(master_weights))
        super().__init__(params, defaults)

    @property
    def state(self) -> OptimizerState:
        """``optimizer.state`` (see ``tracked.OptimizerState``)."""
        return self._state

    @state.setter
    def state(self, value) -> None:
        # Assigning a new mapping (torch's __init__ and __setstate__ do, and so may users, to
        # restart every param) keeps the write counting and drops every cached plan.
        self._state = value if isinstance(value, OptimizerState) else OptimizerState(value)
        self._groups = {}

    def _settle_remainders(self) -> None:
        """Zero the remainders of params written since the last step (``masters.py``), as the
        next step would: before anything reads the masters outside a step (``state_dict()``,
        a copy), so that it sees the masters the next step would start from."""
        for p in self._fingerprints.stale():
            state = self.state.get(p)
            rest = state.get(REMAINDER) if isinstance(state, dict) else None
            if not isinstance(rest, torch.Tensor):
                self._fingerprints.forget(p)  # no remainder any more
            elif p.dtype == torch.bfloat16:  # (cast since: its step refuses; left as it was)
                local(rest).zero_()
                self._fingerprints.forget(p)

    def __getstate__(self) -> dict[str, Any]:
        self._settle_remainders()
        state = super().__getstate__()
        state["backend"] = self.backend
        state["flat_buffers"] = self.flat_buffers
        # The dtype each param's state was made for, keyed by the param (copied with it).
        state["state_dtypes"] = {
            p: entry[1]
            for p in self.state
            if (entry := self._dtypes.get(id(p))) is not None and entry[0]() is p
        }
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        optimizer_state = state.pop("state", {})  # through the property, not into __dict__
        dtypes = state.pop("state_dtypes", {})
        super().__setstate__(state)
        self.__dict__.setdefault("flat_buffers", False)
        self._warned_readopt = False
        self._logged = set()
        self._fingerprints = Fingerprints()
        self.state = optimizer_state  # also drops cached plans: they hold the original's tensors
        self._dtypes = {id(p): (weakref.ref(p), dtype) for p, dtype in dtypes.items()}

    # ----------------------------------------------------------------- param groups and checks
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (as ``torch.optim.Optimizer.add_param_group``, named params
        included), after checking that every param is a dense floating tensor of a supported
        dtype, appears once, and can be served by the chosen backend."""
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        tensors = [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in params]
        self._check_params([p for p in tensors if isinstance(p, torch.Tensor)])
        sharded = DTensor is not None and any(isinstance(p, DTensor) for p in tensors)
        if self.flat_buffers and sharded:
            raise ValueError(
                "flat_buffers=True cannot take DTensor (FSDP2) params: FSDP2 keeps its "
                "own flat shards; use flat_buffers=False"
            )
        setting = param_group.get("master_weights", self.defaults.get("master_weights", True))
        self._check_masters({"master_weights": setting}, tensors)  # before the group is kept
        super().add_param_group(param_group)
        param_group["params"] = ParamList(param_group["params"])

    def _check_masters(self, group: dict[str, Any], params) -> None:
        """Raise unless the group's ``master_weights`` is a valid setting for its params."""
        check_master_weights(group["master_weights"])
        check_remainder_params(group, params)

    def _check_params(self, params: list[torch.Tensor]) -> None:
        """Raise unless every param can be stepped: once per group, a supported dtype, dense
        memory (the kernels read flat ranges), a device the backend serves."""
        seen: set[int] = set()
        for p in params:
            if id(p) in seen:
                raise ValueError(
                    "a parameter appears twice in one param group; pass each parameter once "
                    "(for tied weights, pass the shared tensor a single time)"
                )
            seen.add(id(p))
            if p.dtype not in SUPPORTED_DTYPES:
                raise TypeError(
                    f"{type(self).__name__} updates float16, bfloat16 and float32 params; got "
                    f"a {p.dtype} param of shape {tuple(p.shape)}"
                )
            if not is_dense(local(p)):
                raise ValueError(
                    f"a param of shape {tuple(p.shape)} with strides {p.stride()} has gaps or "
                    "overlaps in memory (a strided slice such as w[:, ::2]); the fused step "
                    "reads params as flat ranges of memory. Make it dense: "
                    "torch.nn.Parameter(w[:, ::2].contiguous()) (any dense layout works: "
                    "contiguous, channels_last, a transpose)"
                )
            resolve_backend(self.backend, local(p).device)  # raises if it cannot be served

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        """Validate a group's hyperparameters (torch's messages). Subclasses override."""

    def _bucket_key(self, p: torch.Tensor, group: dict[str, Any]) -> Any:
        """What else must be equal for params to share a launch (besides device, dtypes and
        alignment): nothing here; compact state's moment dtype (``compact_state.py``)."""
        return None

    def _block_states(self, key: Any) -> tuple[str, ...]:
        """The states that params of bucket key ``key`` keep one value per quantization block
        of (int8 moments' scales, ``compact_state.py``): none here."""
        return ()

    def _state_kind(self, group: dict[str, Any]) -> tuple:
        """The group settings that decide which state its params carry (changing one
        rebuilds the group's buckets and completes or trims the state)."""
        return (group["master_weights"],)

    def _group_cache(self, group: dict[str, Any]) -> _GroupCache:
        """The group's plans, reset (and its params checked again) whenever the group dict,
        its params list or a write to that list, or its state-shaping settings changed."""
        kind = self._state_kind(group)
        cache = self._groups.get(id(group))
        if (  # _GroupCache.current, inlined: it runs for every group at every step
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
        cache = self._groups[id(group)] = _GroupCache(group, params, params.version, kind)
        return cache

    @torch.no_grad()
    def init_state(self) -> None:
        """Create the state of every param that has none (as its first step would), without
        stepping. ``torch.distributed.checkpoint.state_dict.get_state_dict`` otherwise runs a
        zero-grad warm-up ``step()`` on an optimizer with empty state, which would consume a
        bias-correction step (a bug DeepSpeed users know)."""
        for group in self.param_groups:
            self._group_cache(group)
            for p in group["params"]:
                self._check_state(p, group)
        for group in self.param_groups:
            for p in group["params"]:
                self._ensure_state(p, group)

    @torch.no_grad()
    def refresh_fp32_params(self) -> None:
        """Copy the params into their fp32 masters (DeepSpeed's name for the call Apex and
        DeepSpeed make after loading model weights alone). A step already starts from any param
        whose bits are no longer its master's rounding (``kernels.common.load_grad_and_weight``);
        call it after writes that may leave the bits as they were (clamping to a bound the param
        already rounds to: see docs/changing-things-between-steps.md). It drops the masters'
        extra precision."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p, {})
                if state.get(MASTER) is not None:
                    state[MASTER].copy_(p)
                if state.get(REMAINDER) is not None:
                    state[REMAINDER].zero_()  # the master is then the param's value

    def refresh_master_weights(self) -> None:
        """Deprecated name of :meth:`refresh_fp32_params`."""
        warnings.warn(
            "refresh_master_weights() is deprecated; call refresh_fp32_params() (DeepSpeed's name)",
            DeprecationWarning,
            stacklevel=2,
        )
        self.refresh_fp32_params()

    # ------------------------------------------------------------------------------ steps
    def _plan(self, group: dict[str, Any]) -> _Work | _Rebuild:
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
        return _Rebuild(group, cache, key, list(active), grads)

    def _flat_plan(
        self, group: dict[str, Any]
    ) -> list[tuple[Bucket, list[torch.Tensor]]] | _Rebuild:
        """The group's flat buckets: O(1) when nothing was replaced since the last step (plus
        one ``requires_grad`` read per param of the group that was left out as frozen)."""
        cache = self._group_cache(group)
        plan = cache.plans.get(_FLAT)
        if plan is not None:
            check_left_out(plan.others)
        if plan is not None and plan.state_version == self._state.version:
            if steady_step([bucket.flat for bucket in plan.buckets]):
                self._step_plans.append(plan)
                return [(bucket, bucket.grads(None)) for bucket in plan.buckets]
        return _Rebuild(group, cache, plan=plan)

    def _check_rebuild(self, rebuild: _Rebuild) -> None:
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
            check_unshared(self.state, adopted)
            return
        check_adoption(adopted, group, self.param_groups, self.state, self._describe)

    def _rebuild(self, rebuild: _Rebuild) -> _Work:
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
        plan = cache.plans[rebuild.key] = _GroupPlan(self._build_buckets(group, active, grads))
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

    def _adopt_group(self, rebuild: _Rebuild) -> list[Bucket]:
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
        warn_foreign_views([bucket.flat for bucket in buckets])
        moved = sum(self._refresh_state_lists(bucket) for bucket in buckets)
        if plan is not None and moved:
            log_readopted(moved, self._warned_readopt)
            self._warned_readopt = True
        others = [p for p in group["params"] if not p.requires_grad]
        rebuild.cache.plans = {_FLAT: _GroupPlan(buckets, self.state.version, others)}
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
        bucket.noted = None  # remainders: its params are noted anew after this step
        return moved

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

    def _check_grad(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        """Raise unless ``grad`` (``p``'s) is dense and has ``p``'s shape (before anything
        changes). Its layout may differ from ``p``'s: the bucket then reads it through a copy."""
        if grad.is_sparse:
            raise RuntimeError(
                f"{type(self).__name__} does not support sparse gradients; use dense "
                "gradients (e.g. nn.Embedding(sparse=False)) or torch.optim.SparseAdam"
            )
        if grad.shape != p.shape:
            raise RuntimeError(
                f"a grad of shape {tuple(grad.shape)} for {self._describe(p)}: grads must "
                "have their param's shape (was the param resized after its grad was made? "
                "zero_grad(set_to_none=True) clears it)"
            )
        if grad.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"a {grad.dtype} grad for {self._describe(p)}: unsupported dtype")

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
        self._step_plans: list[_GroupPlan] = []
        for group in self.param_groups:  # all of them before any group's state is made
            self._check_hyperparameters(group)
        planned = [(group, self._plan(group)) for group in self.param_groups]
        for _, plan in planned:
            if isinstance(plan, _Rebuild):
                self._check_rebuild(plan)
        if self._fingerprints:  # once checked, and before flat buffers adopt replaced data
            self._settle_remainders()
        for group, plan in planned:
            for bucket, grads in self._rebuild(plan) if isinstance(plan, _Rebuild) else plan:
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

    def _fused_step(
        self,
        *,
        grad_scale: torch.Tensor | None = None,
        found_inf: torch.Tensor | None = None,
        norm_sq: torch.Tensor | None = None,
        max_norm: float = 0.0,
        work: list | None = None,
    ) -> None:
        """One step of every param with a grad. ``grad_scale``, ``found_inf`` and ``norm_sq``
        are optional device tensors (see ``kernels.adam.adam_step``); they are moved to each
        bucket's device without a sync. ``work`` is this step's ``_gather()``, if the caller
        made it. Every bucket is checked before any is updated."""
        launches: list[Callable[[], None]] = []
        work = work if work is not None else self._gather()
        for group, bucket, grads in work:
            device = bucket.local_params[0].device
            launches.append(
                self._prepare_bucket(
                    bucket,
                    grads,
                    group,
                    grad_scale=_on(grad_scale, device),
                    found_inf=_on(found_inf, device),
                    norm_sq=_on(norm_sq, device),
                    max_norm=max_norm,
                )
            )
        for launch in launches:
            launch()
        fingerprints = self._fingerprints
        for _, bucket, _ in work:  # each param as it now is: see masters.py
            if not bucket.state.get(REMAINDER):
                continue
            # A Triton launch writes through raw pointers, which leaves the params' addresses
            # and version counters as noted, unless the bucket was rebuilt or a record was
            # dropped since; the torch reference writes in place (counted): noted each step.
            if bucket.backend != "triton" or bucket.noted != fingerprints.generation:
                fingerprints.note(bucket.params)
                bucket.noted = fingerprints.generation

    def _prepare_bucket(self, bucket: Bucket, grads, group, **scaling) -> Callable[[], None]:
        raise NotImplementedError

    # torch.compile runs the step eagerly: it is already one fused launch per bucket, and
    # tracing its Python bookkeeping (guards on every param's identity) only recompiles.
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform a single optimization step; returns the closure's loss if one is given.

        Under ``torch.amp.GradScaler`` the scaler's ``grad_scale`` and ``found_inf`` device
        tensors are used directly: grads are unscaled inside the fused step, and the step is
        skipped (step counts included) when ``found_inf`` is non-zero. No host sync on the
        Triton backend.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            self._fused_step(
                grad_scale=getattr(self, "grad_scale", None),
                found_inf=getattr(self, "found_inf", None),
            )
        except BaseException:
            # GradScaler sets these for one step and deletes them after it; a refused step
            # skips its deletion, and a later plain step() would unscale by a stale scale.
            self.__dict__.pop("grad_scale", None)
            self.__dict__.pop("found_inf", None)
            raise
        return loss

    # ------------------------------------------------------------------------ state dicts
    def state_dict(self) -> dict[str, Any]:
        """torch's layout: ``{"state": {index: {...}}, "param_groups": [...]}``.

        State tensors are torch's (``step``, ``exp_avg``, ...) as kept (fp32; Adam's moments
        in its ``state_dtype``), plus ``master_param`` for low-precision params with masters.
        ``step`` is a CPU fp32 tensor, as in ``torch.optim``'s default (non-fused) optimizers,
        so the dict loads into those (torch casts the moments to its params' dtype).
        """
        self._settle_remainders()
        sd = super().state_dict()
        # torch packs the live per-param dicts: copy each (as a plain dict) before replacing
        # its step; groups' params lists become plain lists too.
        sd["state"] = {index: dict(s) for index, s in sd["state"].items()}
        params = [p for group in self.param_groups for p in group["params"]]
        for index, s in sd["state"].items():
            if REMAINDER in s:  # saved as the fp32 master: the same checkpoint as True's
                master = fp32_master(params[index], s)
                del s[REMAINDER]
                if master is not None:
                    s[MASTER] = master
        for s in sd["state"].values():
            if isinstance(s.get("step"), torch.Tensor):
                s["step"] = s["step"].detach().to("cpu", torch.float32, copy=True)
        for group in sd["param_groups"]:
            group["params"] = list(group["params"])
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this optimizer or of its ``torch.optim`` counterpart.

        Everything is checked before anything changes: the number of groups and of params
        per group, and each state tensor's shape against its param's. State is kept in fp32
        (or the dtype a group option such as Adam's ``state_dtype`` names, which loading does
        not override: ``_kept_on_load``) on the param's device with the param's strides
        (torch would cast it to the param's dtype and lose the fp32 precision of fp16 runs).
        Mapping from torch: a low-precision param without ``master_param`` gets its master
        from the current param value; missing state a subclass can derive (SGD's ``step``) is
        derived. ``master_weights`` is this optimizer's, not the saved one: a saved fp32
        master loads into ``"remainder"`` (converted at the next step, from the params as they
        are then, so the model may be loaded before or after) and the other way round.
        """
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():  # as torch's
            result = pre_hook(self, state_dict)
            state_dict = state_dict if result is None else result
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError("a state dict needs the keys 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, this optimizer "
                f"has {len(self.param_groups)}"
            )
        for i, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    f"loaded state dict's parameter group {i} has {len(saved['params'])} "
                    f"params, this optimizer's has {len(group['params'])}"
                )
        # The groups as they will be after loading: the saved hyperparameters decide how the
        # saved state is read (momentum on or off, masters or not) and must be valid.
        merged_groups = []
        for group, saved in zip(self.param_groups, saved_groups):
            merged = dict(group)
            kept = ("params", "param_names", "master_weights", *self._kept_on_load)
            merged.update({k: v for k, v in saved.items() if k not in kept})
            self._check_hyperparameters(merged)
            self._check_masters(merged, group["params"])
            merged_groups.append(merged)
        id_to_param = {}
        id_to_group = {}
        for group, merged, saved in zip(self.param_groups, merged_groups, saved_groups):
            for p, saved_id in zip(group["params"], saved["params"]):
                id_to_param[saved_id] = p
                id_to_group[saved_id] = merged
        new_state: dict[torch.Tensor, dict[str, Any]] = {}
        for key, saved_state in state_dict["state"].items():
            if key not in id_to_param:
                raise ValueError(f"loaded state refers to param {key!r}, which no group has")
            p = id_to_param[key]
            new_state[p] = self._import_state(p, id_to_group[key], saved_state, key)
        # Everything checked: now change.
        for group, merged in zip(self.param_groups, merged_groups):
            group.update({k: v for k, v in merged.items() if k != "params"})
        self.state.clear()
        self.state.update(new_state)
        self._groups.clear()
        self._remember_dtypes(new_state)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __repr__(self) -> str:
        text = super().__repr__()
        return text[:-1] + f"backend: {self.backend}\n)"


def _on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    if t is None or t.device == device:
        return t
    return t.to(device, non_blocking=True)


def check_lr(lr) -> None:
    """torch's learning-rate checks and messages. A tensor lr on a GPU is not compared (that
    would sync the device at every step): its value is the caller's."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr.device.type != "cpu":
            return
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")


def torch_compat_options(foreach, capturable, differentiable, fused) -> dict[str, Any]:
    """torch.optim's implementation switches, accepted so that code written for torch runs
    unchanged (and state dicts carry the same group keys); only ``differentiable`` changes
    what is possible, and it is not supported."""
    if differentiable:
        raise ValueError(
            "differentiable=True is not supported: the fused step runs outside autograd; "
            "use torch.optim for differentiable optimizer steps"
        )
    options = {"foreach": foreach, "differentiable": False, "fused": fused}
    if capturable is not None:
        options["capturable"] = bool(capturable)
    return options
