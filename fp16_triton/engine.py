"""``fp16_triton.initialize`` and ``Engine``: a DeepSpeed-style training engine for one process.

``engine, optimizer, _, lr_scheduler = fp16_triton.initialize(model=model, config=ds_config)``
takes DeepSpeed's config format (``fp16``, ``bf16``, ``gradient_clipping``,
``gradient_accumulation_steps``, ``optimizer``, ``scheduler``, ...), casts the model to
fp16/bf16, keeps fp32 masters in the optimizer, and drives an ``FP16Optimizer``:
``engine(batch)`` runs forward, ``engine.backward(loss)`` scales it (and divides by the
accumulation steps), ``engine.step()`` steps at accumulation boundaries.

Checkpoints (``save_checkpoint`` / ``load_checkpoint``) hold the model, the optimizer (fp32
masters, moments, step counts), the loss scaler, the LR scheduler, the engine's counters and
the caller's ``client_state`` in one file per tag, written atomically (temporary file, fsync,
rename), with the ``latest`` pointer rewritten last: an interrupted save never damages the
checkpoint before it.

An engine copies and pickles (``copy.deepcopy``, ``pickle``) as its module and optimizer do,
into an independent engine, unless it runs data-parallel (DDP or FSDP2): a process group cannot
be copied, so that raises ``TypeError``; use checkpoints there.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adam import Adam, AdamW
from .config import ConfigSource, EngineConfig, load_config
from .fp16_optimizer import FP16Optimizer
from .lr_schedules import build_scheduler
from .sgd import SGD

logger = logging.getLogger(__name__)

__all__ = ["Engine", "initialize", "CheckpointError"]

CHECKPOINT_FILE = "fp16_triton_states.pt"
ENGINE_FILE = "engine_states.pt"  # sharded checkpoints: the engine's own state, beside the shards
LATEST_FILE = "latest"
_CHECKPOINT_FORMAT = 1
_OPTIMIZERS = {"Adam": Adam, "AdamW": AdamW, "SGD": SGD}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or does not fit the model."""


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
        cls = _OPTIMIZERS[spec.effective_type]
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
        """Write ``save_dir/<tag>/fp16_triton_states.pt`` atomically, then ``save_dir/latest``.

        ``tag`` defaults to ``global_step<N>``. ``client_state`` must hold tensors, numbers,
        strings and containers of them (the file is read back with ``weights_only=True``).
        Returns the checkpoint file's path.
        """
        tag = tag if tag is not None else f"global_step{self.global_steps}"
        _check_tag(tag)
        if self.sharded:
            return self._save_sharded(Path(save_dir), tag, client_state)
        state = self._common_state(client_state)
        state["module"] = self.module.state_dict()
        state["optimizer"] = self.optimizer.state_dict()
        directory = Path(save_dir) / tag
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CHECKPOINT_FILE
        _atomic_write(path, lambda f: torch.save(state, f))
        _atomic_write(Path(save_dir) / LATEST_FILE, lambda f: f.write(tag.encode()))
        logger.info("saved checkpoint %s", path)
        return str(path)

    def load_checkpoint(
        self,
        load_dir: str | os.PathLike,
        tag: str | None = None,
        load_optimizer_states: bool = True,
        load_lr_scheduler_states: bool = True,
    ) -> tuple[str, dict]:
        """Load a checkpoint written by ``save_checkpoint``; returns ``(path, client_state)``.

        ``tag`` defaults to the one in ``load_dir/latest``. A missing, truncated or corrupt
        checkpoint, or one that does not fit this model, raises ``CheckpointError`` and
        changes nothing: everything is read and checked before anything is loaded.
        """
        load_dir = Path(load_dir)
        if self.sharded:
            return self._load_sharded(
                load_dir, tag, load_optimizer_states, load_lr_scheduler_states
            )
        if tag is None:
            latest = load_dir / LATEST_FILE
            if not latest.is_file():
                raise CheckpointError(
                    f"no checkpoint to load: {latest} does not exist (pass tag=... or check "
                    "the directory)"
                )
            tag = latest.read_text().strip()
        path = load_dir / tag / CHECKPOINT_FILE
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated or corrupt files fail in the unpickler or zip reader
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {e}") from e
        self._check_checkpoint(state, path, load_lr_scheduler_states)
        # The optimizer first: its loader checks everything before it changes anything, and
        # the model's keys and shapes are checked above, so no load below can fail half-way.
        if load_optimizer_states:
            try:
                self.optimizer.load_state_dict(state["optimizer"])
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{path}: optimizer state does not fit: {e}") from e
        self.module.load_state_dict(state["module"])
        if not load_optimizer_states or not _has_masters(state["optimizer"]):
            # No saved masters (weights only, or a run without fp16/bf16): the masters the
            # optimizer made must come from the weights just loaded.
            self.optimizer.refresh_fp32_params()
        self._load_common_state(state, load_lr_scheduler_states)
        logger.info("loaded checkpoint %s", path)
        return str(path), state["client_state"]

    # Sharded (FSDP2) checkpoints: torch.distributed.checkpoint writes the model and optimizer
    # shards of every rank under <tag>/sharded; rank 0 writes the engine's own small state
    # (scaler, scheduler, counters, client state) atomically, and `latest` after a barrier.
    def _common_state(self, client_state) -> dict:
        """What every checkpoint holds beside the model and optimizer."""
        return {
            "format": _CHECKPOINT_FORMAT,
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler else None,
            "global_steps": self.global_steps,
            "micro_steps": self.micro_steps,
            "global_samples": self.global_samples,
            "client_state": client_state or {},
            "config": self.config.to_dict(),
        }

    def _load_common_state(self, state: dict, load_scheduler: bool) -> None:
        if load_scheduler and self.lr_scheduler is not None and state["lr_scheduler"]:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.global_steps = state["global_steps"]
        self.micro_steps = state["micro_steps"]
        self.global_samples = state["global_samples"]
        self._skipped_before = self.skipped_steps

    def _save_sharded(self, save_dir: Path, tag: str, client_state) -> str:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        _init_state(self.optimizer.optimizer)
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer.optimizer)
        directory = save_dir / tag
        directory.mkdir(parents=True, exist_ok=True)
        dcp.save(
            {"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(directory / "sharded")
        )
        engine_state = self._common_state(client_state)
        engine_state["loss_scaler"] = self.optimizer.loss_scaler.state_dict()  # syncs: all ranks
        engine_state["skipped_steps"] = self.optimizer.skipped_steps
        engine_state["step_calls"] = self.optimizer._step_calls
        if self.rank == 0:
            _atomic_write(directory / ENGINE_FILE, lambda f: torch.save(engine_state, f))
        torch.distributed.barrier()
        if self.rank == 0:
            _atomic_write(save_dir / LATEST_FILE, lambda f: f.write(tag.encode()))
        torch.distributed.barrier()
        return str(directory)

    def _load_sharded(self, load_dir: Path, tag, load_optimizer, load_scheduler):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        if tag is None:
            latest = load_dir / LATEST_FILE
            if not latest.is_file():
                raise CheckpointError(f"no checkpoint to load: {latest} does not exist")
            tag = latest.read_text().strip()
        directory = load_dir / tag
        shards = directory / "sharded"
        if not (shards / ".metadata").is_file() or not (directory / ENGINE_FILE).is_file():
            raise CheckpointError(f"{directory} is not a complete sharded checkpoint")
        try:
            extra = torch.load(directory / ENGINE_FILE, map_location="cpu", weights_only=True)
            self.optimizer._check_scaler_state(extra["loss_scaler"])
        except Exception as e:
            raise CheckpointError(f"{directory / ENGINE_FILE} is truncated or corrupt: {e}") from e
        _init_state(self.optimizer.optimizer)
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer.optimizer)
        state = {"model": model_sd}
        if load_optimizer:
            state["optimizer"] = optim_sd
        dcp.load(state, checkpoint_id=str(shards))
        set_state_dict(
            self.module,
            self.optimizer.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state.get("optimizer", optim_sd),
        )
        if not load_optimizer:
            self.optimizer.refresh_fp32_params()
        self.optimizer.loss_scaler.load_state_dict(extra["loss_scaler"])
        self.optimizer._set_counters(
            int(extra["skipped_steps"]), int(extra.get("step_calls", extra["global_steps"]))
        )
        self._load_common_state(extra, load_scheduler)
        return str(directory), extra["client_state"]

    def _check_checkpoint(self, state, path, load_scheduler) -> None:
        required = {"format", "module", "optimizer", "lr_scheduler", "global_steps"}
        required |= {"micro_steps", "global_samples", "client_state"}
        if not isinstance(state, dict) or not required <= set(state):
            raise CheckpointError(f"{path} is not an fp16_triton checkpoint (keys missing)")
        if state["format"] != _CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path} has checkpoint format {state['format']}")
        ours = self.module.state_dict()
        theirs = state["module"]
        if set(ours) != set(theirs):
            missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
            raise CheckpointError(
                f"{path} does not fit this model: missing {missing[:5]}, unexpected {extra[:5]}"
            )
        for name, tensor in ours.items():
            if tuple(theirs[name].shape) != tuple(tensor.shape):
                raise CheckpointError(
                    f"{path}: {name} has shape {tuple(theirs[name].shape)}, the model "
                    f"{tuple(tensor.shape)}"
                )
        if load_scheduler and self.lr_scheduler is not None and state["lr_scheduler"] is None:
            raise CheckpointError(f"{path} holds no LR scheduler state for this run's scheduler")


def _init_state(optimizer) -> None:
    """Create the optimizer's state without stepping, before ``get_state_dict``, which would
    otherwise run a warm-up ``step()`` on an optimizer with empty state."""
    if hasattr(optimizer, "init_state"):
        optimizer.init_state()


def _has_masters(optimizer_state: dict) -> bool:
    """Whether a saved FP16Optimizer state holds fp32 masters (fused or generic path)."""
    if optimizer_state.get("fp32_masters"):
        return True
    inner = optimizer_state.get("optimizer", {}).get("state", {})
    return any("master_param" in s for s in inner.values())


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


def _check_tag(tag: str) -> None:
    if not tag or "/" in tag or "\\" in tag or tag in (".", ".."):
        raise ValueError(f"checkpoint tag must be a plain directory name, got {tag!r}")


def _atomic_write(path: Path, write: Callable) -> None:
    """Write ``path`` through a temporary file in the same directory, fsync, then rename: the
    old file stays intact until the new one is complete."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
