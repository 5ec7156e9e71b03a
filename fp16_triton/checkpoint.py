"""What an engine checkpoint holds, and how it is saved and loaded (``Engine.save_checkpoint`` /
``load_checkpoint``); the file-level guarantees are ``checkpoint_files.py``'s.

``save_dir/<tag>/`` holds ``fp16_triton_states.pt`` (model, optimizer with fp32 masters,
moments and step counts, loss scaler, LR scheduler with its class, the engine's counters,
``client_state``, the config) and ``manifest.json``, written last; FSDP2 runs write
``sharded/`` (``torch.distributed.checkpoint``) and ``engine_states.pt`` instead of the states
file. ``save_dir/latest`` names the newest tag and is rewritten after the manifest.

Load is all or nothing: every file is verified against the manifest, then everything is read
and checked (model keys and shapes, optimizer, scaler, scheduler class and keys, counters)
before anything is applied, and anything that fails while applying restores the engine, the
model and the optimizer as they were. A load also clears the grads and sets the micro-step
counter to the checkpoint's accumulation boundary, so resuming in a used engine is resuming in
a fresh one. A save between boundaries warns that the accumulated grads are not saved, and
records the last boundary.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from .checkpoint_files import (
    CheckpointError,
    FileRecord,
    atomic_write,
    check_client_state,
    hash_file,
    load_states,
    remove_leftovers,
    verify,
    write_manifest,
)

logger = logging.getLogger("fp16_triton.engine")

__all__ = ["CHECKPOINT_FILE", "ENGINE_FILE", "LATEST_FILE", "load", "save"]

CHECKPOINT_FILE = "fp16_triton_states.pt"
ENGINE_FILE = "engine_states.pt"  # sharded checkpoints: the engine's own state, beside the shards
SHARDS = "sharded"
LATEST_FILE = "latest"
_CHECKPOINT_FORMAT = 2  # 2: manifest, scheduler class, counters at an accumulation boundary


def _version() -> str:
    from . import __version__

    return __version__


def check_tag(tag: str) -> None:
    if not tag or "/" in tag or "\\" in tag or tag in (".", "..") or tag.startswith("."):
        raise ValueError(f"checkpoint tag must be a plain directory name, got {tag!r}")
    if tag == LATEST_FILE:
        raise ValueError(
            f"checkpoint tag {tag!r} is the name of the file that points at the newest tag; "
            "choose another tag"
        )


# --------------------------------------------------------------------------------- save
def save(engine, save_dir, tag: str | None, client_state) -> str:
    """``Engine.save_checkpoint``: see the module docstring. Returns the states file's path
    (the tag's directory for sharded runs)."""
    save_dir = Path(save_dir)
    tag = tag if tag is not None else f"global_step{engine.global_steps}"
    check_tag(tag)
    client_state = check_client_state(client_state)
    directory = save_dir / tag
    directory.mkdir(parents=True, exist_ok=True)
    if engine.rank == 0:  # this tag's and any other's (a killed save may have used another)
        tags = [p for p in save_dir.iterdir() if p.is_dir()]
        remove_leftovers(save_dir, *tags, *(p / SHARDS for p in tags))
    if engine.sharded:
        torch.distributed.barrier()  # leftovers gone before any rank writes
    state = _common_state(engine, client_state)
    if engine.sharded:
        files = _save_sharded(engine, directory, state)
        if engine.rank == 0:
            write_manifest(directory, files, _version(), engine.config.to_dict())
            atomic_write(save_dir / LATEST_FILE, lambda f: f.write(tag.encode()))
        torch.distributed.barrier()
        return str(directory)
    state["module"] = engine.module.state_dict()
    state["optimizer"] = engine.optimizer.state_dict()
    record = atomic_write(directory / CHECKPOINT_FILE, lambda f: torch.save(state, f))
    write_manifest(directory, {CHECKPOINT_FILE: record}, _version(), engine.config.to_dict())
    atomic_write(save_dir / LATEST_FILE, lambda f: f.write(tag.encode()))
    logger.info("saved checkpoint %s", directory)
    return str(directory / CHECKPOINT_FILE)


def _common_state(engine, client_state: dict) -> dict:
    """What every checkpoint holds beside the model and optimizer, at the last accumulation
    boundary (the grads accumulated since are not saved: see the warning)."""
    accumulation = engine.config.gradient_accumulation_steps
    pending = engine.micro_steps % accumulation
    if pending:
        logger.warning(
            "save_checkpoint between accumulation boundaries: the grads of the %d micro-batch"
            "(es) since the last optimizer step are not saved; the checkpoint holds the state at "
            "the last boundary (micro step %d), where a resume starts a new accumulation cycle. "
            "Save after engine.step() at a boundary (engine.is_gradient_accumulation_boundary() "
            "before the step) to lose nothing",
            pending,
            engine.micro_steps - pending,
        )
    scheduler = engine.lr_scheduler
    return {
        "format": _CHECKPOINT_FORMAT,
        "lr_scheduler": scheduler.state_dict() if scheduler is not None else None,
        "lr_scheduler_class": type(scheduler).__name__ if scheduler is not None else None,
        "global_steps": engine.global_steps,
        "micro_steps": engine.micro_steps - pending,
        "global_samples": engine.global_samples,
        "client_state": client_state,
        "config": engine.config.to_dict(),
    }


def _save_sharded(engine, directory: Path, state: dict) -> dict[str, FileRecord]:
    """The shards through ``torch.distributed.checkpoint``, the engine's file on rank 0; each
    rank hashes the shard files it wrote, rank 0 gathers the records (returned on rank 0)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    optimizer = engine.optimizer
    _init_state(optimizer.optimizer)
    model_sd, optim_sd = get_state_dict(engine.module, optimizer.optimizer)
    shards = directory / SHARDS
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(shards))
    state["loss_scaler"] = optimizer.loss_scaler.state_dict()  # syncs: every rank
    state["skipped_steps"] = optimizer.skipped_steps
    state["step_calls"] = optimizer._step_calls
    files: dict[str, FileRecord] = {}
    if engine.rank == 0:
        files[ENGINE_FILE] = atomic_write(directory / ENGINE_FILE, lambda f: torch.save(state, f))
    torch.distributed.barrier()  # every shard written
    own = {f"{SHARDS}/{p.name}": hash_file(p) for p in sorted(shards.glob(f"__{engine.rank}_*"))}
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, own)
    if engine.rank == 0:
        for records in gathered:
            files.update(records)
        for path in sorted(p for p in shards.iterdir() if p.is_file()):  # .metadata and any
            files.setdefault(f"{SHARDS}/{path.name}", hash_file(path))  # file of other names
    return files


# --------------------------------------------------------------------------------- load
def load(engine, load_dir, tag, load_optimizer: bool, load_scheduler: bool) -> tuple[str, dict]:
    """``Engine.load_checkpoint``: see the module docstring. Returns ``(path, client_state)``."""
    load_dir = Path(load_dir)
    if tag is None:
        tag = _latest_tag(load_dir)
    directory = load_dir / tag
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    if engine.sharded:
        return _load_sharded(engine, directory, load_optimizer, load_scheduler)
    path = directory / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    _verify_kind(directory, [CHECKPOINT_FILE], "a sharded run's")
    try:
        with open(path, "rb") as f:
            state = load_states(f)
    except Exception as e:  # verified, so a bug or another version's file: still say where
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {e}") from e
    _check_states(engine, state, path, load_scheduler)
    optimizer = engine.optimizer
    refresh = not load_optimizer or not _has_masters(state["optimizer"])
    with _restored_on_failure(engine, path, keep_masters=refresh and not load_optimizer):
        if load_optimizer:  # checks everything before it changes anything
            try:
                optimizer.load_state_dict(state["optimizer"])
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{path}: optimizer state does not fit: {e}") from e
        engine.module.load_state_dict(state["module"])
        if refresh:
            # No saved masters (weights only, or a run without fp16/bf16): the masters the
            # optimizer has must come from the weights just loaded.
            optimizer.refresh_fp32_params()
        _apply_common_state(engine, state, load_scheduler)
    logger.info("loaded checkpoint %s", path)
    return str(path), state["client_state"]


def _verify_kind(directory: Path, required: list[str], other: str) -> None:
    """Verify every file the manifest lists, and that it lists the files this engine reads: a
    tag saved over by the other kind of run keeps the first run's files beside the manifest of
    the second, and only the manifest says which are the checkpoint."""
    listed = verify(directory)["files"]
    missing = [name for name in required if name not in listed]
    if missing:
        raise CheckpointError(
            f"{directory}'s manifest does not list {missing[0]}: it is {other} checkpoint, or "
            "its manifest was rewritten; load it into an engine set up as the run that saved "
            "it (sharded or not)"
        )


def _latest_tag(load_dir: Path) -> str:
    """The tag ``load_dir/latest`` names (DeepSpeed's pointer file), checked."""
    latest = load_dir / LATEST_FILE
    if not latest.is_file():
        raise CheckpointError(
            f"no checkpoint to load: {latest} does not exist (pass tag=... or check the directory)"
        )
    try:
        tag = latest.read_bytes().decode().strip()
        check_tag(tag)
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError(
            f"{latest} is damaged (it should hold a checkpoint tag, the name of a directory "
            "beside it); pass tag=... to load a checkpoint by name"
        ) from None
    return tag


def _check_states(engine, state, path, load_scheduler: bool) -> None:
    required = {"format", "module", "optimizer", "lr_scheduler", "global_steps"}
    required |= {"micro_steps", "global_samples", "client_state"}
    if not isinstance(state, dict) or not required <= set(state):
        raise CheckpointError(f"{path} is not an fp16_triton checkpoint (keys missing)")
    if state["format"] not in (1, _CHECKPOINT_FORMAT):
        raise CheckpointError(f"{path} has checkpoint format {state['format']}")
    ours = engine.module.state_dict()
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
    _check_scheduler(engine, state, path, load_scheduler)
    for name in ("global_steps", "micro_steps", "global_samples"):
        value = state[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(f"{path}: {name} must be an int >= 0, got {value!r}")


def _check_scheduler(engine, state, path, load_scheduler: bool) -> None:
    """The saved scheduler state must be one this run's scheduler can take: the same class
    (when the checkpoint names it) and the same keys."""
    scheduler = engine.lr_scheduler
    if not load_scheduler or scheduler is None:
        return
    saved = state["lr_scheduler"]
    if saved is None:
        raise CheckpointError(f"{path} holds no LR scheduler state for this run's scheduler")
    saved_class = state.get("lr_scheduler_class")
    ours = type(scheduler).__name__
    if saved_class is not None and saved_class != ours:
        raise CheckpointError(
            f"{path} holds the state of a {saved_class} LR scheduler, this engine's is a "
            f"{ours}; build the engine with the same scheduler, or load with "
            "load_lr_scheduler_states=False"
        )
    public = lambda keys: {k for k in keys if not str(k).startswith("_")}  # noqa: E731
    if not isinstance(saved, dict) or public(saved) != public(scheduler.state_dict()):
        raise CheckpointError(
            f"{path}: the saved LR scheduler state does not fit this run's {ours} (keys "
            f"{sorted(saved)[:8] if isinstance(saved, dict) else saved!r}); load with "
            "load_lr_scheduler_states=False"
        )


class _restored_on_failure:
    """Puts the engine, its model and its optimizer back as they were if the block raises: the
    optimizer's state tensors are replaced by a load, never written, so references keep the
    old ones; the model's values, written in place, are copied first (one model's worth of
    memory while the load runs)."""

    def __init__(self, engine, path: Path, keep_masters: bool):
        self.engine = engine
        self.path = path
        optimizer = engine.optimizer
        self.optimizer_state = optimizer.state_dict()
        self.inner_groups = [dict(g) for g in optimizer.optimizer.param_groups]
        self.model = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
        scheduler = engine.lr_scheduler
        self.scheduler = copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None
        self.counters = (engine.global_steps, engine.micro_steps, engine.global_samples)
        self.masters = None
        if keep_masters:  # refresh_fp32_params will write the masters in place
            self.masters = copy.deepcopy(optimizer.state_dict())

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if kind is None:
            return False
        engine = self.engine
        engine.module.load_state_dict(self.model)
        engine.optimizer.load_state_dict(self.masters or self.optimizer_state)
        for group, saved in zip(engine.optimizer.optimizer.param_groups, self.inner_groups):
            group.update(saved)
        if self.scheduler is not None:
            engine.lr_scheduler.load_state_dict(self.scheduler)
        engine.global_steps, engine.micro_steps, engine.global_samples = self.counters
        if isinstance(error, Exception) and not isinstance(error, CheckpointError):
            message = f"loading {self.path} failed, nothing changed: {error}"
            raise CheckpointError(message) from error
        return False  # CheckpointError, and interrupts (Ctrl-C, SystemExit) as they are


def _apply_common_state(engine, state: dict, load_scheduler: bool) -> None:
    if load_scheduler and engine.lr_scheduler is not None and state["lr_scheduler"]:
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
    engine.global_steps = state["global_steps"]
    accumulation = engine.config.gradient_accumulation_steps
    engine.micro_steps = state["micro_steps"] - state["micro_steps"] % accumulation
    engine.global_samples = state["global_samples"]
    engine._skipped_before = engine.skipped_steps
    # Resume at the checkpoint's boundary: no grads of a half-done cycle leak into it.
    engine.optimizer.zero_grad(set_to_none=True)


def _load_sharded(engine, directory: Path, load_optimizer: bool, load_scheduler: bool):
    """Sharded load: every rank verifies the checkpoint's files and reads the engine's file,
    all checked before ``set_state_dict`` changes the model and optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    shards = directory / SHARDS
    if not (shards / ".metadata").is_file() or not (directory / ENGINE_FILE).is_file():
        raise CheckpointError(f"{directory} is not a complete sharded checkpoint")
    _verify_kind(directory, [ENGINE_FILE, f"{SHARDS}/.metadata"], "an unsharded run's")
    optimizer = engine.optimizer
    try:
        with open(directory / ENGINE_FILE, "rb") as f:
            extra = load_states(f)
        optimizer._check_scaler_state(extra["loss_scaler"])
    except Exception as e:
        raise CheckpointError(f"{directory / ENGINE_FILE} is truncated or corrupt: {e}") from e
    _check_scheduler(engine, extra, directory / ENGINE_FILE, load_scheduler)
    _init_state(optimizer.optimizer)
    model_sd, optim_sd = get_state_dict(engine.module, optimizer.optimizer)
    state = {"model": model_sd}
    if load_optimizer:
        state["optimizer"] = optim_sd
    dcp.load(state, checkpoint_id=str(shards))
    set_state_dict(
        engine.module,
        optimizer.optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state.get("optimizer", optim_sd),
    )
    if not load_optimizer:
        optimizer.refresh_fp32_params()
    optimizer.loss_scaler.load_state_dict(extra["loss_scaler"])
    optimizer._set_counters(
        int(extra["skipped_steps"]), int(extra.get("step_calls", extra["global_steps"]))
    )
    _apply_common_state(engine, extra, load_scheduler)
    return str(directory), extra["client_state"]


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
