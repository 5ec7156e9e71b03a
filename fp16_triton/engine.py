"""``fp16_triton.initialize`` and ``Engine``: a DeepSpeed-style training engine for one process.

``engine, optimizer, _, lr_scheduler = fp16_triton.initialize(model=model, config=ds_config)``
takes DeepSpeed's config format (``fp16``, ``bf16``, ``gradient_clipping``,
``gradient_accumulation_steps``, ``optimizer``, ``scheduler``, ...), casts the model to
fp16/bf16, keeps fp32 masters in the optimizer, and drives an ``FP16Optimizer``:
``engine(batch)`` runs forward, ``engine.backward(loss)`` scales it (and divides by the
accumulation steps), ``engine.step()`` steps at accumulation boundaries.

Checkpoints (``save_checkpoint`` / ``load_checkpoint``, ``checkpoint.py``) hold the model, the
optimizer (fp32 masters, moments, step counts), the loss scaler, the LR scheduler, the engine's
counters and the caller's ``client_state``, with a manifest of sizes and hashes written last
and verified before a load reads anything; loads are all or nothing.

An engine copies and pickles (``copy.deepcopy``, ``pickle``) as its module and optimizer do,
into an independent engine, unless it runs data-parallel (DDP or FSDP2): a process group cannot
be copied, so that raises ``TypeError``; use checkpoints there.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from . import checkpoint
from .checkpoint_files import CheckpointError
from .config import ConfigSource, EngineConfig, load_config
from .fp16_optimizer import FP16Optimizer
from .lr_schedules import build_scheduler
from .spec import algorithm_for_type

logger = logging.getLogger(__name__)

__all__ = ["Engine", "initialize", "CheckpointError"]  # CheckpointError: checkpoint_files.py


def initialize(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | Callable | None = None,
    model_parameters: Iterable | None = None,
    lr_scheduler: Any = None,
    config: ConfigSource = None,
    *,
    backend: str = "auto",
    data_parallel: str | None = None,
    process_group=None,
) -> tuple[Engine, FP16Optimizer, None, Any]:
    """Build an ``Engine`` the way ``deepspeed.initialize`` does.

    Args:
        model: the model (cast in place to fp16/bf16 when the config enables one).
        optimizer: None (built from the config's ``optimizer`` section), a
            ``torch.optim.Optimizer`` over the model's params (``fp16_triton`` ones take the
            fused path), or a callable taking the params and returning one.
        model_parameters: the params (or param groups) to optimize; default
            ``model.parameters()``.
        lr_scheduler: None (built from the config's ``scheduler`` section, if any), a
            scheduler, or a callable taking the optimizer and returning one.
        config: DeepSpeed-style dict or path to a JSON file.
        backend: the ``backend`` of optimizers built from the config.
        data_parallel: ``"ddp"`` wraps the model in ``DistributedDataParallel`` (launch under
            ``torchrun``; torch.distributed must be initialised). Models sharded with FSDP2's
            ``fully_shard`` before this call need nothing: the engine sees their DTensor
            params, reduces the overflow flag and norm over their mesh, and checkpoints with
            ``torch.distributed.checkpoint``.
        process_group: the data-parallel group (default: the default group when
            torch.distributed is initialised); it sets the world size for the batch keys.

    Returns:
        ``(engine, engine.optimizer, None, engine.lr_scheduler)`` — the third item stands for
        DeepSpeed's training dataloader, which this engine does not build.
    """
    engine = Engine(
        model,
        optimizer=optimizer,
        model_parameters=model_parameters,
        lr_scheduler=lr_scheduler,
        config=config,
        backend=backend,
        data_parallel=data_parallel,
        process_group=process_group,
    )
    return engine, engine.optimizer, None, engine.lr_scheduler


class Engine(nn.Module):
    """Drives forward, backward, step, clipping, accumulation and checkpoints; see the module
    docstring. ``engine.module`` is the wrapped model, as in DeepSpeed."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | Callable | None = None,
        model_parameters: Iterable | None = None,
        lr_scheduler: Any = None,
        config: ConfigSource | EngineConfig = None,
        backend: str = "auto",
        data_parallel: str | None = None,
        process_group=None,
    ):
        super().__init__()
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.world_size = torch.distributed.get_world_size(process_group) if distributed else 1
        self.rank = torch.distributed.get_rank() if distributed else 0
        if isinstance(config, EngineConfig):
            self.config = config
        else:
            self.config = load_config(config, world_size=self.world_size)
        cfg = self.config
        self.module = model
        if data_parallel not in (None, "ddp"):
            raise ValueError(f"data_parallel must be None or 'ddp', got {data_parallel!r}")
        if data_parallel == "ddp" and not distributed:
            raise RuntimeError(
                "data_parallel='ddp' needs torch.distributed initialised (launch with torchrun "
                "and call torch.distributed.init_process_group first)"
            )
        self.dtype = cfg.dtype
        if self.dtype != torch.float32:
            model.to(self.dtype)
        self._forward_module = model
        if data_parallel == "ddp":
            # Gradients are all-reduced by DDP in backward, so every rank steps on identical
            # grads and makes the same skip and clip decision without another collective.
            self._forward_module = nn.parallel.DistributedDataParallel(
                model, process_group=process_group
            )
        self.sharded = any(_is_dtensor(p) for p in model.parameters())
        params = list(model_parameters) if model_parameters is not None else None
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        inner = self._build_optimizer(optimizer, params, backend)
        scaler_config = None
        if cfg.fp16.enabled:
            f = cfg.fp16
            scaler_config = {
                "loss_scale": f.loss_scale,
                "initial_scale_power": f.initial_scale_power,
                "loss_scale_window": f.loss_scale_window,
                "hysteresis": f.hysteresis,
                "consecutive_hysteresis": f.consecutive_hysteresis,
                "min_loss_scale": f.min_loss_scale,
            }
        from .loss_scaler import get_loss_scaler

        self.optimizer = FP16Optimizer(
            inner,
            loss_scaler=get_loss_scaler(scaler_config, dtype=self.dtype),
            clip_grad=cfg.gradient_clipping,
            process_group=process_group if self.sharded else None,
        )
        if lr_scheduler is None:
            lr_scheduler = build_scheduler(self.optimizer, cfg.scheduler)
        elif callable(lr_scheduler) and not hasattr(lr_scheduler, "step"):
            lr_scheduler = lr_scheduler(self.optimizer)
        self.lr_scheduler = lr_scheduler
        self.global_steps = 0
        self.micro_steps = 0
        self.global_samples = 0
        self._skipped_before = 0  # skipped steps at the last report, for the log line

    def _build_optimizer(self, optimizer, params, backend) -> torch.optim.Optimizer:
        if isinstance(optimizer, torch.optim.Optimizer):
            return optimizer
        if optimizer is not None:
            if not callable(optimizer):
                raise TypeError(
                    "optimizer must be None, a torch.optim.Optimizer or a callable taking the "
                    f"model parameters; got {type(optimizer).__name__}"
                )
            return optimizer(params)
        spec = self.config.optimizer
        if spec is None:
            raise ValueError(
                "no optimizer: pass one to initialize(optimizer=...) or add an 'optimizer' "
                'section to the config, e.g. {"type": "AdamW", "params": {"lr": 1e-3}}'
            )
        algorithm = algorithm_for_type(spec.type)
        if algorithm.param_groups is not None:
            params = algorithm.param_groups(self.module, params, spec.options)
        cls = algorithm.optimizer_class(spec.effective_type)
        return cls(params, backend=backend, flat_buffers=spec.flat_buffers, **spec.params)

    # ------------------------------------------------------------------------- training
    def forward(self, *inputs, **kwargs):
        """Run the model; with ``fp16.auto_cast`` floating inputs are cast to the model's
        low-precision dtype first."""
        if self.config.fp16.enabled and self.config.fp16.auto_cast:
            inputs = tuple(_cast(x, self.dtype) for x in inputs)
            kwargs = {k: _cast(v, self.dtype) for k, v in kwargs.items()}
        if isinstance(self._forward_module, nn.parallel.DistributedDataParallel):
            # DDP's no_sync(), spelled so that it spans engine(x) ... engine.backward(loss):
            # micro-batches before the accumulation boundary keep their grads local, and the
            # boundary's backward all-reduces the accumulated sum once.
            self._forward_module.require_backward_grad_sync = (
                self.is_gradient_accumulation_boundary()
            )
        return self._forward_module(*inputs, **kwargs)

    def is_gradient_accumulation_boundary(self) -> bool:
        """Whether the next ``step()`` call updates the weights."""
        return (self.micro_steps + 1) % self.config.gradient_accumulation_steps == 0

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> torch.Tensor:
        """Backpropagate ``loss * loss_scale / gradient_accumulation_steps``; returns ``loss``."""
        accumulation = self.config.gradient_accumulation_steps
        scaled = loss / accumulation if accumulation > 1 else loss
        self.optimizer.backward(scaled, retain_graph=retain_graph)
        return loss

    def step(self) -> None:
        """At an accumulation boundary: optimizer step (skipped on inf/nan grads), zero the
        grads, step the LR scheduler unless the step was skipped. Otherwise only count.

        With an LR scheduler this reads the overflow flag (one device sync per optimizer step,
        as DeepSpeed does): whether to advance the schedule is a host decision.
        """
        if self.is_gradient_accumulation_boundary():
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.lr_scheduler is not None and not self.optimizer.overflow:
                self.lr_scheduler.step()
            self.global_steps += 1
            self.global_samples += self.train_batch_size() or 0
            if self.global_steps % self.config.steps_per_print == 0:
                self._report()
        self.micro_steps += 1

    def _report(self) -> None:
        if not logger.isEnabledFor(logging.INFO):
            return
        # The count below syncs anyway: first log the skips the optimizer has not logged yet,
        # so that each step counted here has been reported before this line.
        self.optimizer.log_skipped_steps()
        skipped = self.skipped_steps
        logger.info(
            "step=%d lr=%s loss_scale=%g skipped=%d (+%d)",
            self.global_steps,
            [f"{lr:.3g}" for lr in self.get_lr()],
            self.loss_scale,
            skipped,
            skipped - self._skipped_before,
        )
        self._skipped_before = skipped

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the model's grads."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def get_lr(self) -> list[float]:
        """The learning rate of each param group."""
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    @property
    def loss_scale(self) -> float:
        """The current loss scale (syncs)."""
        return self.optimizer.loss_scale

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for inf/nan grads (syncs)."""
        return self.optimizer.skipped_steps

    def train_batch_size(self) -> int | None:
        """``train_batch_size`` from the config (derived when two batch keys are given)."""
        return self.config.train_batch_size

    def train_micro_batch_size_per_gpu(self) -> int | None:
        """``train_micro_batch_size_per_gpu`` from the config."""
        return self.config.train_micro_batch_size_per_gpu

    def gradient_accumulation_steps(self) -> int:
        """``gradient_accumulation_steps`` from the config."""
        return self.config.gradient_accumulation_steps

    # ------------------------------------------------------------------------ copies
    def __getstate__(self) -> dict[str, Any]:
        """The whole engine, as ``nn.Module`` pickles it, unless it runs data-parallel."""
        if self.sharded or self._forward_module is not self.module:
            raise TypeError(
                "a data-parallel Engine (DDP or FSDP2) cannot be copied or pickled: its process "
                "group belongs to this process. Use save_checkpoint() and load_checkpoint() "
                "into an engine built in the other process, or copy engine.module alone"
            )
        return super().__getstate__()

    # ------------------------------------------------------------------------ checkpoints
    def save_checkpoint(
        self, save_dir: str | os.PathLike, tag: str | None = None, client_state: dict | None = None
    ) -> str:
        """Write ``save_dir/<tag>/`` (the states file, then its manifest, atomically), then
        ``save_dir/latest``; see ``fp16_triton/checkpoint.py``.

        ``tag`` defaults to ``global_step<N>``. ``client_state`` is read back with
        ``weights_only=True``: tensors, numbers, strings, containers of them and RNG states;
        anything else is refused here, before anything is written. Returns the states file's
        path.
        """
        return checkpoint.save(self, save_dir, tag, client_state)

    def load_checkpoint(
        self,
        load_dir: str | os.PathLike,
        tag: str | None = None,
        load_optimizer_states: bool = True,
        load_lr_scheduler_states: bool = True,
    ) -> tuple[str, dict]:
        """Load a checkpoint written by ``save_checkpoint``; returns ``(path, client_state)``.

        ``tag`` defaults to the one in ``load_dir/latest``. Every file is verified against the
        checkpoint's manifest, and everything is read and checked, before anything is applied;
        a missing, damaged or unfitting checkpoint raises ``CheckpointError`` and changes
        nothing. Grads are cleared and the micro-step counter set to the checkpoint's
        accumulation boundary, so resuming in a used engine is resuming in a fresh one.
        """
        return checkpoint.load(self, load_dir, tag, load_optimizer_states, load_lr_scheduler_states)


def _is_dtensor(t: torch.Tensor) -> bool:
    from .buckets import DTensor

    return DTensor is not None and isinstance(t, DTensor)


def _cast(x, dtype):
    """Floating tensors to ``dtype``, through lists, tuples and dicts (as DeepSpeed's
    auto_cast); everything else as it is."""
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, (list, tuple)):
        return type(x)(_cast(v, dtype) for v in x)
    if isinstance(x, dict):
        return type(x)((k, _cast(v, dtype)) for k, v in x.items())
    return x
