"""The base of the fused optimizers: grouping, fp32 masters, backends, state dicts, AMP contract.

``FusedOptimizer`` is a ``torch.optim.Optimizer``: ``param_groups``, ``add_param_group``,
``zero_grad``, ``state``, schedulers and ``torch.amp.GradScaler`` work as with torch's own. A
subclass names its state (``_state_names``), how to create it (``_init_state``) and how to
launch one step of a bucket (``_prepare_bucket``).

A *bucket* is the set of params of one param group that share (device, param dtype, grad
dtype, master or not): one kernel launch covers it, whatever the number of tensors. Buckets
are rebuilt only when the set of params with a grad changes. With ``flat_buffers=True`` a
bucket owns flat storage instead (``flat_buffers.py``) and a steady step reads no per-param
attribute at all.
"""

from __future__ import annotations

import itertools
import logging
import operator
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim import Optimizer

from .flat_buffers import FlatBuffers

logger = logging.getLogger(__name__)

__all__ = ["FusedOptimizer", "BACKEND_ENV"]

BACKEND_ENV = "FP16_TRITON_BACKEND"
"""Environment variable that overrides every optimizer's ``backend`` for a whole run."""

BACKENDS = ("auto", "triton", "torch")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOW_PRECISION = (torch.float16, torch.bfloat16)
_MAX_CACHED_ACTIVE_SETS = 8  # distinct "which params have grads" patterns kept per group
_FLAT = "flat"  # key of a group's plan with flat_buffers=True


@dataclass
class Bucket:
    """Params of one group that one launch updates together, with their state lists.

    ``params`` are the optimizer's params (keys of ``optimizer.state``); ``local_params`` and
    the ``state`` lists are what the kernels update: the same tensors, or for DTensor params
    (FSDP2) this rank's local shards.
    """

    params: list[torch.Tensor]
    local_params: list[torch.Tensor]
    state: dict[str, list[torch.Tensor] | None]
    backend: str
    grad_dtype: torch.dtype
    cache: Any = None  # kernels.multi_tensor.TableCache on the Triton backend
    indices: list[int] | None = None  # positions in the group's list of grads; None: all
    sharded: bool = False  # DTensor params: kernels see their local shards
    flat: FlatBuffers | None = None  # flat_buffers=True: the bucket's storage

    def grads(self, active_grads: list[torch.Tensor] | None) -> list[torch.Tensor]:
        """This bucket's grads, as the kernels read them, out of the group's active grads."""
        if self.flat is not None:
            return [self.flat.grad]
        grads = active_grads if self.indices is None else [active_grads[i] for i in self.indices]
        return [local(g) for g in grads] if self.sharded else grads

    def shards_current(self) -> bool:
        """False once a DTensor param's local shard is another tensor (FSDP2 re-sharded)."""
        return not self.sharded or all(map(operator.is_, map(local, self.params),
                                           self.local_params))  # fmt: skip


class _VersionedState(defaultdict):
    """``optimizer.state`` that counts assignments of a param's state, so cached buckets
    notice state replaced from outside (ZeroRedundancyOptimizer.load_state_dict writes
    ``optim.state[p] = ...`` itself) with an O(1) check per step."""

    def __init__(self, *args):
        super().__init__(dict, *args)
        self.version = 0

    def __setitem__(self, key, value):
        self.version += 1
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self.version += 1
        super().__delitem__(key)

    def clear(self):
        self.version += 1
        super().clear()

    # dict's C methods bypass __setitem__/__delitem__: count them too.
    def pop(self, *args):
        self.version += 1
        return super().pop(*args)

    def popitem(self):
        self.version += 1
        return super().popitem()

    def update(self, *args, **kwargs):
        self.version += 1
        super().update(*args, **kwargs)

    def __ior__(self, other):
        self.update(other)
        return self

    def setdefault(self, key, default=None):
        if key not in self:
            self.version += 1
        return super().setdefault(key, default)

    def __reduce__(self):  # deepcopy/pickle: rebuilt as the same class
        return (type(self), (), None, None, iter(self.items()))


@dataclass
class _GroupPlan:
    buckets: list[Bucket] = field(default_factory=list)
    state_version: int = -1  # optimizer.state's version when the buckets were built
    n_params: int = 0  # flat_buffers: len(group["params"]) when the buckets were built
    others: list[torch.Tensor] = field(default_factory=list)  # flat_buffers: not adopted


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return None
    return DTensor


_DTensor = _dtensor_type()


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's local shard of a DTensor (sharing its storage), or ``t`` itself."""
    if _DTensor is not None and isinstance(t, _DTensor):
        return t._local_tensor
    return t


def like_param(state: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Wrap a local state tensor as a DTensor sharded like ``p`` (so distributed checkpoints
    see sharded state, as with torch's optimizers); plain params keep plain state."""
    if _DTensor is None or not isinstance(p, _DTensor) or state.dim() == 0:
        return state
    return _DTensor.from_local(
        state, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
    )


def _interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(requested: str, device: torch.device) -> str:
    """The backend that serves params on ``device``: ``"triton"`` or ``"torch"``.

    ``FP16_TRITON_BACKEND`` overrides ``requested``. ``"auto"`` picks Triton on GPUs (CUDA or
    ROCm) and torch elsewhere. ``"triton"`` on CPU tensors runs only under Triton's
    interpreter (``TRITON_INTERPRET=1``, meant for tests); anywhere it cannot run is an error.
    """
    backend = os.environ.get(BACKEND_ENV, requested)
    if backend not in BACKENDS:
        source = BACKEND_ENV if BACKEND_ENV in os.environ else "backend"
        raise ValueError(f"{source} must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    if backend == "triton":
        if not _triton_available():
            raise RuntimeError(
                "backend='triton' needs the triton package (pip install triton, Linux); "
                "use backend='torch' or 'auto'"
            )
        if device.type != "cuda" and not (device.type == "cpu" and _interpreter_enabled()):
            raise RuntimeError(
                f"backend='triton' cannot serve params on {device}: the kernels need a GPU "
                "(or, for testing, CPU tensors with TRITON_INTERPRET=1 set before import). "
                "Use backend='torch' or 'auto'."
            )
    return backend


class FusedOptimizer(Optimizer):
    """Base class of ``Adam``, ``AdamW`` and ``SGD``: see the module docstring.

    Subclasses set ``_state_names`` (per-param fp32 state, in torch's names) and implement
    ``_init_state`` and ``_prepare_bucket``.
    """

    # torch.amp.GradScaler passes its scale and inf flag as device tensors (grad_scale,
    # found_inf attributes) instead of unscaling and syncing: the contract of torch's fused
    # optimizers.
    _step_supports_amp_scaling = True
    _state_names: tuple[str, ...] = ()

    def __init__(
        self,
        params: Iterable,
        defaults: dict[str, Any],
        *,
        master_weights: bool = True,
        backend: str = "auto",
        flat_buffers: bool = False,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.flat_buffers = bool(flat_buffers)
        self._warned_readopt = False  # flat buffers: the re-adoption warning is logged once
        self._plans: dict[int, dict[tuple, _GroupPlan]] = {}
        defaults = dict(defaults, master_weights=bool(master_weights))
        super().__init__(params, defaults)
        self.state = _VersionedState(self.state)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["backend"] = self.backend
        state["flat_buffers"] = self.flat_buffers
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("flat_buffers", False)
        self.__dict__.setdefault("_warned_readopt", False)
        self._plans = {}  # buckets hold tensors of the original: rebuilt on the next step
        if not isinstance(self.state, _VersionedState):
            self.state = _VersionedState(self.state)

    # ----------------------------------------------------------------- param groups and checks
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (as ``torch.optim.Optimizer.add_param_group``), after checking
        that every param is a floating tensor of a supported dtype, appears once, and can be
        served by the chosen backend."""
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        seen: set[int] = set()
        for p in params:
            if not isinstance(p, torch.Tensor):
                continue  # torch's own check gives the message
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
            resolve_backend(self.backend, p.device)  # raises if it cannot be served
            if self.flat_buffers and _DTensor is not None and isinstance(p, _DTensor):
                raise ValueError(
                    "flat_buffers=True cannot take DTensor (FSDP2) params: FSDP2 keeps its "
                    "own flat shards; use flat_buffers=False"
                )
        super().add_param_group(param_group)

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        """Validate a group's hyperparameters (torch's messages). Subclasses override."""

    # ----------------------------------------------------------------------------- state
    def _new_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        """fp32 state for ``p`` on its device: the subclass's tensors plus ``master_param``
        (sharded like ``p`` when it is a DTensor)."""
        shard = local(p)
        state = self._init_state(shard, group)
        if group["master_weights"] and p.dtype in LOW_PRECISION:
            master = shard.detach().float().clone(memory_format=torch.contiguous_format)
            state["master_param"] = master
        return {name: like_param(t, p) for name, t in state.items()}

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def init_state(self) -> None:
        """Create the state of every param that has none (as its first step would), without
        stepping. ``torch.distributed.checkpoint.state_dict.get_state_dict`` otherwise runs a
        zero-grad warm-up ``step()`` on an optimizer with empty state, which would consume a
        bias-correction step (a bug DeepSpeed users know)."""
        for group in self.param_groups:
            for p in group["params"]:
                self._ensure_state(p, group, local(p).device)

    @torch.no_grad()
    def refresh_master_weights(self) -> None:
        """Copy the params into their fp32 masters. Call it after loading model weights alone
        (``model.load_state_dict``) into a model whose optimizer has state: the next step
        would otherwise start from the old masters and overwrite the loaded weights."""
        for group in self.param_groups:
            for p in group["params"]:
                master = self.state.get(p, {}).get("master_param")
                if master is not None:
                    master.copy_(p)

    # ------------------------------------------------------------------------------ steps
    def _plan(self, group: dict[str, Any]) -> tuple[list[Bucket], list[torch.Tensor]]:
        """The buckets of ``group`` for this step (cached by which params have grads) and the
        group's grads (None with flat buffers: each bucket has its own). One pass reads every
        ``p.grad`` (a costly attribute at 10k params)."""
        if self.flat_buffers:
            return self._flat_plan(group), None
        params = group["params"]
        grads = [p.grad for p in params]
        # Not `None in grads` (it calls Tensor.__eq__) nor a generator (1.7x slower at 10k).
        if not all(map(operator.is_not, grads, itertools.repeat(None))):
            active = [p for p, g in zip(params, grads) if g is not None]
            grads = [g for g in grads if g is not None]
        else:
            active = params
        key = tuple(map(id, active))
        plans = self._plans.setdefault(id(group), {})
        plan = plans.get(key)
        if plan is not None and (
            plan.state_version != self.state.version
            or not all(b.shards_current() for b in plan.buckets)
        ):
            plan = None
        if plan is None:
            if len(plans) >= _MAX_CACHED_ACTIVE_SETS:
                plans.clear()
            plan = plans[key] = _GroupPlan(self._build_buckets(group, active))
        self._step_plans.append(plan)
        return plan.buckets, grads

    def _flat_plan(self, group: dict[str, Any]) -> list[Bucket]:
        """The group's flat buckets: O(1) when nothing was replaced since the last step (plus
        one ``requires_grad`` read per param of the group that was left out as frozen)."""
        plan = self._plans.get(id(group), {}).get(_FLAT)
        if plan is not None and any(p.requires_grad for p in plan.others):
            raise ValueError(
                "flat_buffers=True: a param that did not require grad when the optimizer adopted "
                "its group's params now does; the params of a flat buffer share one step count, "
                "so a param cannot join it mid-run. Leave the params you will unfreeze out of "
                "this optimizer's groups and add them as a group of their own when you unfreeze "
                "them (optimizer.add_param_group), or use flat_buffers=False"
            )
        if (
            plan is not None
            and plan.state_version == self.state.version
            and plan.n_params == len(group["params"])
        ):
            unsteady = {id(b) for b in plan.buckets if not b.flat.steady()}
            # O(n), now and then: only for buckets whose O(1) check disagreed.
            if all(b.flat.all_in_place() for b in plan.buckets if id(b) in unsteady):
                for bucket in plan.buckets:
                    bucket.flat.start_step(verified=id(bucket) in unsteady)
                self._step_plans.append(plan)
                return plan.buckets
        buckets = self._adopt_group(group, plan)
        for bucket in buckets:
            bucket.flat.start_step(verified=False)
        if id(group) in self._plans:
            self._step_plans.append(self._plans[id(group)][_FLAT])
        return buckets

    def _adopt_group(self, group: dict[str, Any], plan: _GroupPlan | None) -> list[Bucket]:
        """(Re)build the group's flat buckets and move every param's data, grad and state into
        them: at the first step, and after grads, data or state were replaced from outside (an
        O(n) pass). Everything is checked before anything moves."""
        adopted = [p for p in group["params"] if p.requires_grad]
        if plan is None and all(p.grad is None for p in adopted):
            return []  # no grad yet: like torch, a step before any backward changes nothing
        by_key: dict[tuple, list[torch.Tensor]] = {}
        for p in adopted:
            by_key.setdefault((p.device, p.dtype), []).append(p)
        old = {(b.flat.device, b.flat.dtype): b for b in plan.buckets} if plan else {}
        for p in adopted:  # before any state is created
            if p.grad is not None:
                self._check_grad(p)
        buckets = []
        for (device, dtype), params in by_key.items():
            bucket = old.get((device, dtype))
            if bucket is None or not bucket.flat.fits(params):
                flat = FlatBuffers(params)
                backend = resolve_backend(self.backend, device)
                cache = None
                if backend == "triton":
                    from .kernels.multi_tensor import TableCache

                    cache = TableCache()
                bucket = Bucket(params, [flat.param], {}, backend, dtype, cache, flat=flat)
            for p in params:
                self._ensure_state(p, group, device)
            bucket.flat.check_steps(self.state)
            buckets.append(bucket)
        foreign = sum(bucket.flat.foreign_views() for bucket in buckets)
        if foreign:
            logger.warning(
                "flat_buffers: %d tensors besides the params themselves reference the params' "
                "storage (views kept by a module, weights tied through a view such as .t(), a "
                "retained autograd graph, or another owner such as "
                "ZeroRedundancyOptimizer(parameters_as_bucket_view=True)); the params now move "
                "into the optimizer's flat buffer and those tensors will not see their updates. "
                "Tie weights by sharing the Parameter object, or use flat_buffers=False",
                foreign,
            )
        moved = 0
        for bucket in buckets:
            moved += self._refresh_state_lists(bucket)
        if plan is not None and moved:
            log = logger.debug if self._warned_readopt else logger.warning
            self._warned_readopt = True
            log(
                "flat_buffers: re-adopted %d params whose grad or data had been replaced since "
                "the last step, an O(n) pass (by model.zero_grad() or another zero_grad that "
                "sets grads to None, such as ZeroRedundancyOptimizer's; by "
                "DDP(gradient_as_bucket_view=True); by backward(create_graph=True)). If it "
                "happens at every step, use optimizer.zero_grad() and keep the grads in place, "
                "or flat_buffers=False",
                moved,
            )
        plan = _GroupPlan(buckets, self.state.version, len(group["params"]))
        plan.others = [p for p in group["params"] if not p.requires_grad]
        self._plans[id(group)] = {_FLAT: plan}
        return buckets

    def _refresh_state_lists(self, bucket: Bucket) -> int:
        """Point ``bucket.state`` at the current state tensors (after state was added or
        replaced); a flat bucket first adopts them. Returns the number of params whose data
        or grad a flat bucket had to move."""
        moved = 0
        names = list(self._state_names) + ["master_param"]
        if bucket.flat is not None:
            flat = bucket.flat
            moved = flat.adopt(self.state)
            bucket.state = {name: [flat.state[name]] if name in flat.state else None
                            for name in names}  # fmt: skip
            bucket.state["step"] = [flat.step] if flat.step is not None else None
        else:
            bucket.state = {name: self._state_list(bucket.params, name) for name in names}
        if bucket.cache is not None:
            bucket.cache.state_version += 1
        return moved

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim.Optimizer.zero_grad``. With ``flat_buffers=True`` the grads of adopted
        params are views that stay: each bucket's grad buffer is zeroed in place (one fill),
        whatever ``set_to_none`` says, as with DDP's ``gradient_as_bucket_view``."""
        if not self.flat_buffers:
            return super().zero_grad(set_to_none)
        for group in self.param_groups:
            plan = self._plans.get(id(group), {}).get(_FLAT)
            if plan is None:
                zero_grads(group["params"], set_to_none)
                continue
            for bucket in plan.buckets:
                bucket.flat.grad.zero_()
            if all(b.flat.ends_in_place() for b in plan.buckets):
                zero_grads(plan.others, set_to_none)
            else:  # grads replaced from outside: torch's semantics; the next step re-adopts
                zero_grads(group["params"], set_to_none)

    def _check_grad(self, p: torch.Tensor) -> None:
        """Raise unless ``p.grad`` is dense and has ``p``'s shape (before anything changes)."""
        if p.grad.is_sparse:
            raise RuntimeError(
                f"{type(self).__name__} does not support sparse gradients; use dense "
                "gradients (e.g. nn.Embedding(sparse=False)) or torch.optim.SparseAdam"
            )
        if p.grad.shape != p.shape:
            raise RuntimeError(
                f"a grad of shape {tuple(p.grad.shape)} for a param of shape "
                f"{tuple(p.shape)}: grads must have their param's shape"
            )

    def _build_buckets(self, group: dict[str, Any], active: list[torch.Tensor]) -> list[Bucket]:
        for p in active:
            self._check_grad(p)
        # One bucket per (device, dtypes, alignment): a param of odd size or address gets its
        # own launch rather than taking 128-bit loads away from the others.
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(active):
            shard = local(p)
            key = (shard.device, p.dtype, p.grad.dtype, _aligned(shard))
            groups.setdefault(key, []).append(i)
        buckets = []
        for (device, _, grad_dtype, _), indices in groups.items():
            params = [active[i] for i in indices]
            backend = resolve_backend(self.backend, device)
            for p in params:
                self._ensure_state(p, group, local(p).device)
            cache = None
            if backend == "triton":
                from .kernels.multi_tensor import TableCache

                cache = TableCache()
            local_params = [local(p) for p in params]
            sharded = any(lp is not p for lp, p in zip(local_params, params))
            whole = len(indices) == len(active)
            bucket = Bucket(params, local_params, {}, backend, grad_dtype, cache,
                            None if whole else indices, sharded)  # fmt: skip
            self._refresh_state_lists(bucket)
            buckets.append(bucket)
        return buckets

    def _ensure_state(self, p: torch.Tensor, group: dict[str, Any], device) -> None:
        """Create ``p``'s state if it has none, else bring it to fp32 on ``device``. Assigns
        ``optimizer.state[p]`` only when that changes something: every assignment advances the
        state's version and makes every group rebuild its buckets at the next step (reading a
        missing key of the defaultdict would assign it too, hence ``get``)."""
        state = self.state.get(p)
        if not state:
            new = self._new_state(p, group)
            if new or state is None:
                self.state[p] = new
        else:
            _normalize_state(state, device)

    def _state_list(self, params: list[torch.Tensor], name: str) -> list[torch.Tensor] | None:
        """The local tensors of state ``name`` of ``params`` (None if the first has none)."""
        if name not in self.state[params[0]]:
            return None
        return [local(self.state[p][name]) for p in params]

    def _gather(self) -> list[tuple[dict[str, Any], Bucket, list[torch.Tensor]]]:
        """This step's work: ``(group, bucket, grads)`` for every bucket with grads. The
        ``FP16Optimizer`` reuses it for its check pass, so one step reads each ``p.grad`` once
        and groups the grads once."""
        work = []
        self._step_plans: list[_GroupPlan] = []
        for group in self.param_groups:
            self._check_hyperparameters(group)
            buckets, group_grads = self._plan(group)
            for bucket in buckets:
                grads = bucket.grads(group_grads)
                # torch refuses a grad whose dtype differs from its param's, so one grad's
                # dtype speaks for the bucket; a change means the params were cast: regroup.
                if grads[0].dtype != bucket.grad_dtype:
                    self._plans.pop(id(group), None)
                    return self._gather()
                work.append((group, bucket, grads))
        # The plans used now are current, whatever state a later group's first step created
        # (params belong to one group each): without this, every group's first step would
        # make the groups before it rebuild at the next step.
        for plan in self._step_plans:
            plan.state_version = self.state.version
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
        for group, bucket, grads in work if work is not None else self._gather():
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
        self._fused_step(
            grad_scale=getattr(self, "grad_scale", None),
            found_inf=getattr(self, "found_inf", None),
        )
        return loss

    # ------------------------------------------------------------------------ state dicts
    def state_dict(self) -> dict[str, Any]:
        """torch's layout: ``{"state": {index: {...}}, "param_groups": [...]}``.

        State tensors are torch's (``step``, ``exp_avg``, ...) in fp32, plus ``master_param``
        for low-precision params with masters. ``step`` is a CPU fp32 tensor, as in
        ``torch.optim``'s default (non-fused) optimizers, so the dict loads into those.
        """
        sd = super().state_dict()
        # torch packs the live per-param dicts: copy each before replacing its step.
        sd["state"] = {index: dict(s) for index, s in sd["state"].items()}
        for s in sd["state"].values():
            if isinstance(s.get("step"), torch.Tensor):
                s["step"] = s["step"].detach().to("cpu", torch.float32, copy=True)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this optimizer or of its ``torch.optim`` counterpart.

        Everything is checked before anything changes: the number of groups and of params
        per group, and each state tensor's size. State is kept in fp32 on the param's device
        (torch would cast it to the param's dtype and lose the fp32 precision of fp16 runs).
        Mapping from torch: a low-precision param without ``master_param`` gets its master
        from the current param value; a missing ``step`` is derived by ``_import_state``.
        """
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
            merged.update({k: v for k, v in saved.items() if k not in ("params", "param_names")})
            self._check_hyperparameters(merged)
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
            group.update(merged)
        self.state.clear()
        self.state.update(new_state)
        self._plans.clear()

    def _import_state(self, p, group, saved: dict[str, Any], key) -> dict[str, torch.Tensor]:
        """Convert one param's saved state to ours (checked, fp32, on ``p``'s device)."""
        out: dict[str, Any] = {}
        for name, value in saved.items():
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(float(value))
            expected = () if name == "step" else tuple(p.shape)
            if name != "step" and value.numel() != p.numel():
                raise ValueError(
                    f"loaded state {name!r} of param {key!r} has shape {tuple(value.shape)}, "
                    f"the param has shape {expected}"
                )
            if name == "step" and value.numel() != 1:
                raise ValueError(f"loaded 'step' of param {key!r} must be a single number")
            value = value.detach().to(p.device, torch.float32).reshape(expected)
            out[name] = value.clone(memory_format=torch.contiguous_format)
        if group.get("master_weights", True) and p.dtype in LOW_PRECISION:
            out.setdefault("master_param", p.detach().float().clone())
        else:
            out.pop("master_param", None)
        return out

    def __repr__(self) -> str:
        text = super().__repr__()
        return text[:-1] + f"backend: {self.backend}\n)"


def _aligned(t: torch.Tensor) -> bool:
    """The kernels' alignment condition (``kernels.multi_tensor.is_aligned``), without
    importing the kernels (and so Triton) on the torch backend."""
    return t.data_ptr() % 16 == 0 and t.numel() % 8 == 0


def zero_grads(params: Iterable[torch.Tensor], set_to_none: bool) -> None:
    """``torch.optim.Optimizer.zero_grad``'s treatment of ``params``' grads."""
    for p in params:
        if p.grad is None:
            continue
        if set_to_none:
            p.grad = None
        else:
            if p.grad.grad_fn is not None:
                p.grad.detach_()
            else:
                p.grad.requires_grad_(False)
            p.grad.zero_()


def _normalize_state(state: dict[str, Any], device: torch.device) -> None:
    """State written from outside (ZeroRedundancyOptimizer keeps ``step`` on the CPU, torch's
    loaders cast to the param dtype) back to what the kernels read: fp32 on the param's
    device."""
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            if local(value).device != device or value.dtype != torch.float32:
                state[name] = value.to(device=device, dtype=torch.float32)


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
