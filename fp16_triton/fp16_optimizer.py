"""``FP16Optimizer``: loss scaling, the non-finite skip and gradient clipping around an optimizer.

DeepSpeed's ``FP16_Optimizer`` semantics with every decision made on the device. One step:

1. one read-only pass over the scaled grads: the non-finite flag and the squared global norm
   of the *unscaled* grads (``kernels.nonfinite``), with the scale used in backward;
2. the fused optimizer step with the combined factor ``clip_coef / loss_scale``, where
   ``clip_coef = min(1, clip_grad / (norm + 1e-6))`` as in ``torch.nn.utils.clip_grad_norm_``;
   the kernels skip every write when the flag is set;
3. the loss-scale update with the same device flag, *after* the unscale (DeepSpeed PR 8588).

With an ``fp16_triton`` optimizer (the fused path) nothing syncs: ``overflow``,
``skipped_steps``, ``global_grad_norm`` and ``loss_scale`` are device values read (and synced)
only when you read them. Every skipped step is logged, as DeepSpeed logs it (the scale attempted
and the new one), from an asynchronous copy: at once on the CPU, a step or two late on CUDA.
Any other ``torch.optim.Optimizer`` works through a generic, slower path that keeps its own fp32
masters, unscales into their ``.grad`` and reads the overflow flag on the host once per step.

``copy.deepcopy`` and ``pickle`` keep the whole optimizer (wrapped optimizer, scaler, counters)
and, like torch's optimizers, copy the params it holds and drop its hooks.

Why one file of ~540 lines: it is one class, whose fused and generic steps, counters and state
dict share the same device flags and scaler; the scaler (``loss_scaler.py``), the check pass
(``kernels/nonfinite.py``) and the optimizers live elsewhere.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from .backend import kernels, resolve_backend
from .buckets import DTensor, local
from .flat_policy import zero_grads
from .kernels.multi_tensor import TableCache
from .loss_scaler import LossScaler, get_loss_scaler
from .optimizer import FusedOptimizer
from .param_state import LOW_PRECISION
from .skip_log import SkipLog

logger = logging.getLogger(__name__)

__all__ = ["FP16Optimizer"]

# What torch's Optimizer.__init__ gives an instance; copies start with them empty, as torch's do.
_HOOKS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)
# Not copied: hooks; an LR scheduler's wrapper of this instance's step (it calls the original);
# launch tables and the skip log's pinned buffers and events, which point at the original.
_NOT_COPIED = frozenset({*_HOOKS, "step", "_opt_called", "_caches", "_skip_log"})


class FP16Optimizer(Optimizer):
    """Mixed-precision wrapper: dynamic loss scaling, non-finite skip, gradient clipping.

    Args:
        optimizer: an ``fp16_triton`` optimizer (``Adam``, ``AdamW``, ``SGD``: the fused path)
            or any ``torch.optim.Optimizer`` over fp16/bf16/fp32 params (the generic path,
            slower: extra passes and one host sync per step).
        loss_scaler: a ``LossScaler`` / ``DynamicLossScaler``, a DeepSpeed-style ``fp16``
            config dict, or None: dynamic defaults when any param is fp16, no scaling for
            bf16/fp32 models.
        clip_grad: clip the global norm of the unscaled grads to this value (0: off).
        check_nonfinite: skip steps whose grads hold inf/nan (default True). With no scaling
            and no clipping, False removes the check pass altogether (bf16 runs that accept
            the risk).
        process_group: the group over which the grads are *sharded* (FSDP2, ZeRO-2-like
            setups): the packed [squared norm, non-finite count] is summed over it with one
            ``all_reduce`` per step, so every rank skips and clips alike. Default: the mesh
            group of FSDP2's DTensor params; none for plain params, whose grads DDP has
            already made identical on every rank (and on a single process no collective runs).

    ``param_groups`` and ``state`` are the wrapped optimizer's, so LR schedulers take this
    wrapper. Step and state-dict hooks (``register_step_pre_hook``, ...) are this wrapper's: they
    run around its ``step()``, which is the one users call; the fused path does not call the
    wrapped optimizer's ``step``, nor its hooks. ``overflow``, ``skipped_steps``,
    ``global_grad_norm`` and ``loss_scale`` sync the device when read.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        loss_scaler: LossScaler | dict | None = None,
        clip_grad: float = 0.0,
        check_nonfinite: bool = True,
        process_group=None,
    ):
        if not isinstance(optimizer, Optimizer) or isinstance(optimizer, FP16Optimizer):
            raise TypeError(
                "FP16Optimizer wraps a torch.optim.Optimizer (fp16_triton.Adam/AdamW/SGD for "
                f"the fused path); got {type(optimizer).__name__}"
            )
        if not (isinstance(clip_grad, (int, float)) and math.isfinite(clip_grad)) or clip_grad < 0:
            raise ValueError(f"clip_grad must be a finite number >= 0, got {clip_grad!r}")
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if not params:
            raise ValueError("the wrapped optimizer has no parameters")
        self.optimizer = optimizer
        self.fused = isinstance(optimizer, FusedOptimizer)
        self.clip_grad = float(clip_grad)
        self.check_nonfinite = bool(check_nonfinite)
        self.device = local(params[0]).device
        self.process_group = process_group if process_group is not None else _shard_group(params)
        if loss_scaler is None or isinstance(loss_scaler, dict):
            has_fp16 = any(p.dtype == torch.float16 for p in params)
            dtype = torch.float16 if has_fp16 else params[0].dtype
            loss_scaler = get_loss_scaler(loss_scaler, dtype=dtype)
        if not isinstance(loss_scaler, LossScaler):
            raise TypeError(
                f"loss_scaler must be a LossScaler, a config dict or None, got {loss_scaler!r}"
            )
        self.loss_scaler = loss_scaler.to(self.device)
        self._scaling = loss_scaler.dynamic or loss_scaler.loss_scale != 1.0  # one read, here
        self.defaults = optimizer.defaults
        self._init_hooks()
        # Device-side results of the last step (no sync to produce them).
        self._check = torch.zeros(2, dtype=torch.float32, device=self.device)
        self._skip = torch.zeros((), dtype=torch.float32, device=self.device)
        self._step_calls = 0  # step() calls that got past raise_if_error: the log's step numbers
        self._skip_log = SkipLog(self.device, loss_scaler.dynamic)
        self._caches: dict = {}
        self._backends: dict[torch.device, str] = {}  # per device, resolved at first use
        self._masters: list[tuple[torch.Tensor, torch.Tensor]] = []
        if not self.fused:
            self._make_masters()

    # ------------------------------------------------------------- torch.optim.Optimizer face
    def _init_hooks(self) -> None:
        """What torch's ``Optimizer.__init__`` gives an instance (it is not called: it would
        build param groups of its own): empty hook registries. ``step`` runs the step hooks
        itself (see ``step``)."""
        for name in _HOOKS:
            setattr(self, name, OrderedDict())

    def __getstate__(self) -> dict[str, Any]:
        """Everything but hooks, launch tables and the skip log's host buffers (see
        ``_NOT_COPIED``); skips not logged yet are logged first (waits for the device), so that
        the copy starts with nothing left to report."""
        if self.process_group is not None:
            raise TypeError(
                "an FP16Optimizer that reduces over a process group cannot be copied or "
                "pickled; save state_dict() (or use torch.distributed.checkpoint) and load it "
                "into an optimizer built in the new process"
            )
        self._skip_log.poll(wait=True)
        state = {k: v for k, v in self.__dict__.items() if k not in _NOT_COPIED}
        state["_skips_reported"] = self._skip_log.reported
        state["_skip_record"] = self._skip_log.record
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        reported = state.pop("_skips_reported")
        record = state.pop("_skip_record")
        self.__dict__.update(state)
        self._init_hooks()
        self._caches = {}
        self._skip_log = SkipLog(self.device, self.loss_scaler.dynamic, reported, self._step_calls)
        self._skip_log.record.copy_(record)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The wrapped optimizer's param groups (schedulers edit these)."""
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self):
        """The wrapped optimizer's state."""
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the model's grads (and the generic path's master grads), as the wrapped
        optimizer's ``zero_grad`` does (flat buffers are zeroed in place)."""
        self.optimizer.zero_grad(set_to_none)
        zero_grads((model_param for model_param, _ in self._masters), set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer (fused path only)."""
        if not self.fused:
            raise NotImplementedError("add_param_group needs an fp16_triton optimizer")
        self.optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        return (
            f"FP16Optimizer(clip_grad={self.clip_grad}, fused={self.fused}, "
            f"loss_scaler={self.loss_scaler!r},\n{self.optimizer!r})"
        )

    # --------------------------------------------------------------------------- training
    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * loss_scale``."""
        return self.loss_scaler.scale_loss(loss)

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        """Backpropagate ``loss * loss_scale``."""
        self.loss_scaler.backward(loss, retain_graph=retain_graph)

    @torch.compiler.disable  # eager under torch.compile, as the fused optimizers' step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Check, unscale, clip and step; then update the loss scale. Returns the closure's
        loss. Raises ``MinLossScaleError`` if the previous step overflowed at the minimum scale
        (nothing was applied since).

        Step hooks (global and this optimizer's) run around it, and the profiler sees it as
        ``Optimizer.step#FP16Optimizer.step``, as with torch's optimizers. torch wraps its
        optimizers' ``step`` for that (``profile_hook_step``), at a cost in host time at every
        step even with no hook and no profiler (``bench/results/``); here it costs nothing then.
        """
        if not (
            self._optimizer_step_pre_hooks
            or self._optimizer_step_post_hooks
            or _global_optimizer_pre_hooks
            or _global_optimizer_post_hooks
            or torch.autograd._profiler_enabled()
        ):
            return self._step(closure)
        args, kwargs = (self,), {"closure": closure}
        with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
            pre = itertools.chain(
                _global_optimizer_pre_hooks.values(), self._optimizer_step_pre_hooks.values()
            )
            for hook in pre:
                result = hook(self, args, kwargs)
                if result is not None:
                    if not (isinstance(result, tuple) and len(result) == 2):
                        raise RuntimeError(
                            f"{hook} must return None or a tuple of (new_args, new_kwargs), "
                            f"but got {result}."
                        )
                    args, kwargs = result
            out = self._step(*args[1:], **kwargs)
            post = itertools.chain(
                self._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()
            )
            for hook in post:
                hook(self, args, kwargs)
        return out

    step.hooked = True  # torch's Optimizer._patch_step_function must never wrap it again

    @torch.no_grad()
    def _step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._skip_log.poll()  # earlier steps' records that have landed (CUDA)
        self.loss_scaler.raise_if_error()
        scaler = self.loss_scaler
        scaling = self._scaling
        if self.fused:
            # The optimizer's buckets for this step: grads read and grouped once, for the
            # check pass and the step alike.
            work = self.optimizer._gather()
            grad_groups = [grads for _, _, grads in work]
        else:
            self._check_generic_dtypes()
            grads = [local(p.grad) for p, _ in self._masters if p.grad is not None]
            by_device: dict[torch.device, list[torch.Tensor]] = {}
            for g in grads:
                by_device.setdefault(g.device, []).append(g)
            grad_groups = list(by_device.values())
        self._step_calls += 1  # past what can refuse the step (a refused step is no step)
        if not grad_groups:
            return loss
        needs_check = self.check_nonfinite or scaling or self.clip_grad > 0
        found_inf = None
        if needs_check:
            self._check_grads(grad_groups)
            if self.process_group is not None:
                # One collective per step: the sum of the shards' squared norms is the global
                # one, and a non-zero summed count means some rank found inf/nan.
                torch.distributed.all_reduce(self._check, group=self.process_group)
            torch.add(self._check[1], scaler.pending_error, out=self._skip)
            found_inf = self._skip
        grad_scale = scaler.scale_tensor if scaling else None
        norm_sq = self._check[0] if self.clip_grad > 0 else None
        if self.fused:
            self.optimizer._fused_step(
                grad_scale=grad_scale,
                found_inf=found_inf,
                norm_sq=norm_sq,
                max_norm=self.clip_grad,
                work=work,
            )
        else:
            self._generic_step(grad_scale, found_inf, norm_sq)
        if needs_check:
            log = self._skip_log
            torch.ne(self._skip, 0, out=log.now)
            log.total.add_(log.now)
            scaler.update_scale(self._check[1], record=log.scales)
            log.after_update(self._step_calls)
        return loss

    def _check_grads(self, grad_groups: list[list[torch.Tensor]]) -> None:
        """Fill ``self._check`` with [squared unscaled norm, non-finite count] over all grads
        (``grad_groups``: lists of one dtype on one device, the optimizer's buckets)."""
        by_device: dict[torch.device, dict[int, list[torch.Tensor]]] = {}
        for i, grads in enumerate(grad_groups):
            by_device.setdefault(grads[0].device, {})[i] = grads
        results = []
        for device, groups in by_device.items():
            scale = self.loss_scaler.scale_tensor
            scale = scale if scale.device == device else scale.to(device, non_blocking=True)
            out = self._check if device == self.device else None
            backend = self._backends.get(device)
            if backend is None:
                requested = getattr(self.optimizer, "backend", "auto")
                backend = self._backends[device] = resolve_backend(requested, device)
            if backend == "triton":
                nonfinite = kernels("nonfinite")
                cache = self._caches.get(device)
                if cache is None:
                    cache = self._caches[device] = TableCache()
                if self.fused:  # buckets: one dtype each
                    result = nonfinite.check_and_norm_grouped(
                        groups, grad_scale=scale, out=out, cache=cache
                    )
                else:  # the generic path's one list, dtypes mixed
                    (grads,) = groups.values()
                    result = nonfinite.nonfinite_check_and_norm(
                        grads, grad_scale=scale, out=out, cache=cache
                    )
            else:
                flat = [g for grads in groups.values() for g in grads]
                result = kernels("reference").nonfinite_check_and_norm(
                    flat, grad_scale=scale, out=out
                )
            results.append(result)
        if len(results) > 1 or results[0] is not self._check:
            total = torch.stack([r.to(self.device, non_blocking=True) for r in results]).sum(0)
            self._check.copy_(total)

    # ------------------------------------------------------------------------ generic path
    def _make_masters(self) -> None:
        """Give the wrapped optimizer fp32 masters in place of low-precision params."""
        for group in self.optimizer.param_groups:
            for i, p in enumerate(group["params"]):
                if p.dtype in LOW_PRECISION:
                    master = p.detach().float().requires_grad_(p.requires_grad)
                    group["params"][i] = master
                    if p in self.optimizer.state:
                        self.optimizer.state[master] = self.optimizer.state.pop(p)
                else:
                    master = p
                self._masters.append((p, master))
        self._master_dtypes = [p.dtype for p, _ in self._masters]

    def _check_generic_dtypes(self) -> None:
        """Raise, before anything is written, if a param's dtype changed since the generic path
        made its masters (it cannot follow: the wrapped optimizer holds the masters it made)."""
        for i, ((p, _), dtype) in enumerate(zip(self._masters, self._master_dtypes)):
            if p.dtype != dtype:
                raise TypeError(
                    f"param {i} was {dtype} when FP16Optimizer made the fp32 masters of its "
                    f"{type(self.optimizer).__name__} and is {p.dtype} now; around a torch "
                    "optimizer the masters are made once: build a new FP16Optimizer after "
                    "changing dtypes, or wrap an fp16_triton optimizer, which follows them"
                )

    def _generic_step(self, grad_scale, found_inf, norm_sq) -> None:
        if found_inf is not None and found_inf.item() != 0:
            return  # one host sync per step: the price of the generic path
        factor = torch.ones((), device=self.device)
        if grad_scale is not None:
            factor = factor / grad_scale
        if norm_sq is not None:
            factor = factor * torch.clamp(self.clip_grad / (norm_sq.sqrt() + 1e-6), max=1.0)
        for model_param, master in self._masters:
            if master is not model_param:
                # A param written since the last step (p.clamp_(), model.load_state_dict) is
                # what torch.optim would step: its master takes it where it no longer rounds
                # to it, as in the fused kernels.
                m, p = local(master).detach(), local(model_param).detach()
                written = m.to(p.dtype).view(torch.int16) != p.view(torch.int16)
                m.copy_(torch.where(written, p.float(), m))
            if model_param.grad is None:
                master.grad = None
                continue
            grad = model_param.grad.float() * factor.to(model_param.grad.device)
            if master is model_param:
                model_param.grad.copy_(grad)
            else:
                master.grad = grad
        self.optimizer.step()
        with torch.no_grad():
            for model_param, master in self._masters:
                if master is not model_param:
                    model_param.copy_(master)

    # ---------------------------------------------------------------------- bookkeeping
    def log_skipped_steps(self) -> None:
        """Log the skipped steps not logged yet, waiting for the device (syncs). Steps log
        their skips without waiting; call this where the log must be complete, e.g. before a
        summary that counts them."""
        self._skip_log.poll(wait=True)

    @property
    def overflow(self) -> bool:
        """Whether the last step found inf/nan grads and was skipped (syncs)."""
        return bool(self._skip.item() != 0)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped so far (syncs)."""
        return int(self._skip_log.total.item())

    @property
    def global_grad_norm(self) -> float:
        """Global 2-norm of the last step's unscaled grads, before clipping (syncs)."""
        return math.sqrt(float(self._check[0].item()))

    @property
    def loss_scale(self) -> float:
        """The current loss scale (syncs)."""
        return self.loss_scaler.loss_scale

    @property
    def cur_scale(self) -> float:
        """DeepSpeed's name for ``loss_scale`` (syncs)."""
        return self.loss_scale

    # ------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state (fp32 masters included), the scaler and counters.
        State-dict hooks run as on torch's optimizers."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        sd = {
            "optimizer": self.optimizer.state_dict(),
            "loss_scaler": self.loss_scaler.state_dict(),
            "skipped_steps": self.skipped_steps,
            "step_calls": self._step_calls,
            "clip_grad": self.clip_grad,
        }
        if not self.fused:
            sd["fp32_masters"] = [m.detach().clone() for _, m in self._masters]
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, sd)
            sd = sd if result is None else result
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``state_dict()``; checks everything first and changes nothing on error.
        Load-state-dict hooks run as on torch's optimizers."""
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            state_dict = state_dict if result is None else result
        missing = {"optimizer", "loss_scaler"} - set(state_dict)
        if missing:
            raise ValueError(f"FP16Optimizer state dict lacks {sorted(missing)}")
        self._check_scaler_state(state_dict["loss_scaler"])
        counters = {k: state_dict.get(k, 0) for k in ("skipped_steps", "step_calls")}
        for name, value in counters.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        masters = state_dict.get("fp32_masters")
        if not self.fused:
            if masters is None or len(masters) != len(self._masters):
                raise ValueError("state dict has no fp32 masters matching this model")
            for (_, m), saved in zip(self._masters, masters):
                if saved.shape != m.shape:
                    raise ValueError(
                        f"fp32 master of shape {tuple(saved.shape)} for {tuple(m.shape)}"
                    )
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.loss_scaler.load_state_dict(state_dict["loss_scaler"])
        self._scaling = self.loss_scaler.dynamic or self.loss_scaler.loss_scale != 1.0
        self._set_counters(**counters)
        if not self.fused:
            with torch.no_grad():
                for (_, m), saved in zip(self._masters, masters):
                    m.copy_(saved)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _check_scaler_state(self, scaler_state: dict[str, Any]) -> None:
        """Raise ``ValueError`` unless ``scaler_state`` loads into this optimizer's scaler;
        changes nothing."""
        trial = copy.deepcopy(self.loss_scaler)
        trial.load_state_dict(scaler_state)

    def _set_counters(self, skipped_steps: int, step_calls: int) -> None:
        """Restore the counters of a checkpoint. Skips not logged yet are logged first (waits
        for the device): the log goes on from the restored count."""
        self._skip_log.poll(wait=True)
        self._skip_log.total.fill_(skipped_steps)
        self._step_calls = step_calls
        self._skip_log.reported, self._skip_log.last_step = skipped_steps, step_calls

    def refresh_fp32_params(self) -> None:
        """Copy the model's params into the fp32 masters (DeepSpeed's name). Rarely needed: a
        step starts from any param written since the last one (see ``FusedOptimizer.
        refresh_fp32_params``); kept for code written for DeepSpeed."""
        with torch.no_grad():
            if self.fused:
                self.optimizer.refresh_fp32_params()
            else:
                for model_param, master in self._masters:
                    if master is not model_param:
                        master.copy_(model_param)


def _shard_group(params: list[torch.Tensor]):
    """The process group of FSDP2-sharded (DTensor, all ``Shard``) params, else None."""
    dtensors = [p for p in params if DTensor is not None and isinstance(p, DTensor)]
    if not dtensors:
        return None
    mesh = dtensors[0].device_mesh
    for p in dtensors:
        if p.device_mesh != mesh or mesh.ndim != 1 or not all(pl.is_shard() for pl in p.placements):
            raise NotImplementedError(
                "FP16Optimizer handles DTensor params sharded (Shard placements) on one 1-D "
                f"device mesh, as fully_shard makes them; got {p.placements} on {p.device_mesh}"
            )
    if len(dtensors) != len(params):
        raise NotImplementedError("a mix of DTensor (sharded) and plain params is not handled")
    return mesh.get_group()
