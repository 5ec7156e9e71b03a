"""The base of the fused optimizers: grouping, fp32 masters, backends, state dicts, AMP contract.

``FusedOptimizer`` is a ``torch.optim.Optimizer``: ``param_groups``, ``add_param_group``,
``zero_grad``, ``state``, schedulers and ``torch.amp.GradScaler`` work as with torch's own. A
subclass names its state (``_state_names``, ``_required_state``), how to create and complete it
(``_init_state``, ``_complete_state``: the rules are in ``param_state.py``), which group
settings shape it (``_state_kind``) and how to launch one step of a bucket
(``_prepare_bucket``).

Its parts: the per-step plan, which buckets a step launches on and when they are rebuilt
(``plans.py``); state dicts (``state_dicts.py``); per-param state rules (``param_state.py``);
the step itself, param groups and their checks (here).

Validation comes before any write: a step that cannot be done as torch.optim would raises,
naming the param and what to do, with params and state untouched. A param that becomes
fp16/bf16 gets an fp32 master from its current value; one that becomes fp32 drops its master.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from .backend import BACKENDS, resolve_backend
from .buckets import Bucket, DTensor, local
from .kernels.multi_tensor import is_dense
from .masters import (
    MASTER,
    REMAINDER,
    Fingerprints,
    check_master_weights,
    check_remainder_params,
)
from .param_state import SUPPORTED_DTYPES, ParamStateRules
from .plans import BucketPlans, GroupCache
from .state_dicts import StateDicts
from .tracked import OptimizerState, ParamList

__all__ = ["FusedOptimizer"]


class FusedOptimizer(BucketPlans, StateDicts, ParamStateRules, Optimizer):
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
        self._groups: dict[int, GroupCache] = {}
        # Each param's dtype when its state was last made whole: a cast between fp16 and bf16
        # remakes its master (weak references: the optimizer does not keep params alive).
        self._dtypes: dict[int, tuple[weakref.ref, torch.dtype]] = {}
        self._fingerprints = Fingerprints()  # remainder masters: writes between steps
        self._settled: set[int] = set()  # ids of params settled outside a step, for the next
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

    def _settle_remainders(self, stale: list[torch.Tensor] | None = None) -> None:
        """Zero the remainders of params written since the last step (``masters.py``), as the
        next step would: before anything reads the masters outside a step (``state_dict()``,
        a copy), so that it sees the masters the next step would start from. ``stale``: those
        params, when the caller (a step) has just found them (``Fingerprints.stale``). Params
        settled outside a step are remembered for the next one (``_settled``): a flat bucket
        must still re-adopt one whose data was replaced."""
        outside = stale is None
        for p in self._fingerprints.stale() if outside else stale:
            if outside:
                self._settled.add(id(p))
            state = self.state.get(p)
            rest = state.get(REMAINDER) if isinstance(state, dict) else None
            if not isinstance(rest, torch.Tensor):
                self._fingerprints.forget(p)  # no remainder any more
            elif p.dtype == torch.bfloat16:  # (cast since: the step converts or refuses)
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
        self._settled = set()
        self.state = optimizer_state  # also drops cached plans: they hold the original's tensors
        self._dtypes = {id(p): (weakref.ref(p), dtype) for p, dtype in dtypes.items()}
        # The original was settled (``__getstate__``): the copy's params hold its masters now,
        # and a write into them before the copy's first step must be seen.
        self._fingerprints.note(
            p for p, s in self.state.items() if isinstance(s, dict) and REMAINDER in s
        )

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
                self._ensure_state(p, group, stepping=False)

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
        self._note_stepped(work)

    def _note_stepped(self, work) -> None:
        """After a step's launches: note the params of ``work``'s buckets with remainders as
        they now are (``masters.py``), so that the next step sees what is written since. Every
        subclass's step ends with this."""
        fingerprints = self._fingerprints
        for _, bucket, _ in work:
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
