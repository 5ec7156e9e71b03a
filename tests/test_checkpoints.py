"""Checkpoints that cannot lie (issue 11): verified, all-or-nothing, exact to resume from any point.

Each row of the issue's table, as the engine must behave:

1. Damaged files (bytes flipped inside a stored tensor or anywhere in a file, truncated,
   extended, missing, replaced by a file of the same size, the manifest itself, ``latest``):
   ``load_checkpoint`` raises ``CheckpointError`` naming the file, before any byte of the
   states file is unpickled, and the engine is exactly as before (and trains on as if the load
   had never been tried).
2. A failure at any stage of applying a load (optimizer, its wrapped optimizer, loss scaler,
   module, ``refresh_fp32_params``, LR scheduler, before or after that stage changed
   anything; clearing the grads, before): ``CheckpointError`` and the engine, model and
   optimizer rolled back bitwise; an interrupt (Ctrl-C) is rolled back and stays itself.
3. A checkpoint of another LR scheduler class is refused naming both classes;
   ``load_lr_scheduler_states=False`` loads it.
4. RNG states in ``client_state`` round trip exactly; client state that could not be read back
   is refused at save, before anything is written.
5. A load into an engine half-way through an accumulation cycle resumes as a fresh engine does.
6. A save half-way through a cycle warns and resumes as the save at the previous boundary.
7. Leftovers of a save killed with SIGKILL (states file, manifest or ``latest`` half written)
   are removed by the next save; the previous checkpoint stays loadable.
8. Tag ``"latest"`` is refused at save, nothing written.

"Exactly as before" is ``everything()``: params, grads, the optimizer's state dict (fp32
masters, moments, step counts, param groups, loss scaler, skipped steps, step calls), the LR
scheduler's state, the lr, the engine's counters. Comparisons are bitwise (``assert_identical``
from test_engine.py), and every engine that must be unchanged is compared with a deep copy of
itself taken before the load, also after both trained on (so no hidden state, such as buffer
caches or the scaler's device tensors, differs either).

Engines are test_engine.py's tiny MLPs on the torch backend, fp16 with dynamic loss scaling,
gradient accumulation 2 and clipping (``RESUME_CONFIG``); resume tests also run with
``flat_buffers=True`` and with a ``torch.optim.AdamW`` inside ``FP16Optimizer`` (its generic
path, which keeps the fp32 masters itself).
"""

from __future__ import annotations

import collections
import copy
import hashlib
import io
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_engine import (
    ADAMW,
    LR,
    RESUME_BAD_STEPS,
    RESUME_CONFIG,
    TESTS_DIR,
    assert_identical,
    make_model,
    micro_loss,
    state_of,
    train_step,
)
from test_engine import one_thread as one_thread  # noqa: F401  (autouse: one CPU thread)

import fp16_triton
import fp16_triton.checkpoint as checkpoint_module
from fp16_triton import CheckpointError
from fp16_triton.checkpoint import CHECKPOINT_FILE, LATEST_FILE
from fp16_triton.checkpoint_files import MANIFEST_FILE, load_states

PATHS = ["fused", "flat", "torch"]  # FusedOptimizer, with flat buffers, torch.optim.AdamW
WARMUP_CONFIG = {
    **RESUME_CONFIG,
    "scheduler": {
        "type": "WarmupLR",
        "params": {"warmup_num_steps": 3, "warmup_max_lr": LR, "warmup_type": "linear"},
    },
}


# ------------------------------------------------------------------------------------ helpers
def build(path: str = "fused", seed: int = 0, config=None, **init_kwargs):
    """An engine on test_engine's MLP (seed ``seed``), its optimizer by ``path``."""
    config = copy.deepcopy(config or RESUME_CONFIG)
    if path == "flat":
        config["optimizer"] = {
            "type": "AdamW",
            "params": {**ADAMW["params"], "flat_buffers": True},
        }
    elif path == "torch":
        del config["optimizer"]
        init_kwargs["optimizer"] = lambda params: torch.optim.AdamW(
            params, lr=LR, weight_decay=0.01
        )
    else:
        assert path == "fused", path
    engine, _, _, _ = fp16_triton.initialize(
        model=make_model(seed), config=config, backend="torch", **init_kwargs
    )
    return engine


def half_step(engine, step: int, bad: bool = False) -> None:
    """The first micro-batch of optimizer step ``step`` (backward and ``engine.step()``), so
    that the engine is half-way through its accumulation cycle with grads in hand. ``bad``
    puts an inf in them: a load that kept them would skip its next step."""
    engine.backward(micro_loss(engine, step, 0))
    if bad:
        next(engine.module.parameters()).grad.view(-1)[0] = float("inf")
    engine.step()
    assert engine.micro_steps % engine.gradient_accumulation_steps() == 1


def trained(steps: int, seed: int = 0, path: str = "fused", config=None, half: bool = False):
    engine = build(path, seed, config)
    for step in range(steps):
        train_step(engine, step, RESUME_BAD_STEPS)
    if half:
        half_step(engine, steps)
    return engine


def go_on(engine, step: int, steps: int = 2) -> None:
    """Train optimizer steps ``step`` to ``step + steps - 1``; the first one may be in
    progress (its first micro-batch done by ``half_step``): only its other micro-batches run."""
    accumulation = engine.gradient_accumulation_steps()
    done = engine.micro_steps % accumulation
    if done:
        for micro in range(done, accumulation):
            engine.backward(micro_loss(engine, step, micro))
            engine.step()
        step, steps = step + 1, steps - 1
    for s in range(step, step + steps):
        train_step(engine, s, RESUME_BAD_STEPS)


def everything(engine) -> dict:
    """All an engine's state that a load may touch or a resume depends on (deep copy)."""
    state = state_of(engine)
    # A zero grad counts as none: flat buffers zero grads in place where others drop them
    # (documented), and the next backward accumulates into either alike.
    state["grads"] = [
        None if p.grad is None or not p.grad.any() else p.grad.detach().clone()
        for p in engine.module.parameters()
    ]
    state["loss_scaler"] = engine.optimizer.loss_scaler.state_dict()
    state["step_calls"] = engine.optimizer._step_calls
    state["inner_param_groups"] = copy.deepcopy(
        [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    )
    return state


def twin_of(engine):
    """A deep copy of ``engine``, grads included (``Parameter.__deepcopy__`` drops them)."""
    twin = copy.deepcopy(engine)
    for p, q in zip(engine.module.parameters(), twin.module.parameters()):
        q.grad = None if p.grad is None else p.grad.detach().clone()
    return twin


def assert_unchanged_and_trains_on(engine, twin, step: int) -> None:
    """``engine`` is bitwise its deep copy ``twin`` (taken before a failed load), and stays so
    while both train on from optimizer step ``step`` (finishing a cycle in progress)."""
    assert_identical(everything(engine), everything(twin), "after the failed load")
    go_on(engine, step)
    go_on(twin, step)
    assert_identical(everything(engine), everything(twin), "trained on after the failed load")


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root``, by relative path, with its bytes."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def leftovers(root: Path) -> list[Path]:
    return sorted(root.rglob(".*.tmp"))


def flip(path: Path, offset: int, n: int = 64) -> None:
    """XOR ``n`` bytes of ``path`` from ``offset`` with 0xFF (the size is kept)."""
    data = bytearray(path.read_bytes())
    assert 0 <= offset and offset + n <= len(data), (offset, n, len(data))
    for i in range(offset, offset + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def spy_load_states(monkeypatch):
    """Records every unpickling of a states file by a load (there must be none of a file that
    failed verification)."""
    calls = []

    def recording(file):
        calls.append(getattr(file, "name", file))
        return load_states(file)

    monkeypatch.setattr(checkpoint_module, "load_states", recording)
    return calls


@pytest.fixture
def rng_states_kept():
    """Global RNG states as before the test (the RNG tests draw from and set them)."""
    saved = np.random.get_state(), random.getstate(), torch.get_rng_state()
    yield
    np.random.set_state(saved[0])
    random.setstate(saved[1])
    torch.set_rng_state(saved[2])


# -------------------------------------------------------------- 1. damaged files are refused
STEP = 3  # the checkpoint of the damage tests: global_step3


def _saved(tmp_path: Path) -> Path:
    """tmp_path/global_step2 and tmp_path/global_step3 (latest); returns the latter."""
    engine = trained(2)
    engine.save_checkpoint(tmp_path)
    train_step(engine, 2, RESUME_BAD_STEPS)
    engine.save_checkpoint(tmp_path)
    assert (tmp_path / LATEST_FILE).read_text() == f"global_step{STEP}"
    return tmp_path / f"global_step{STEP}"


def _tensor_offset(path: Path) -> tuple[int, int]:
    """Where the bytes of a stored tensor lie in the states file: the exp_avg of fc1.weight
    (fp32, 16 x 8), found by its bytes, which occur once."""
    state = load_states(io.BytesIO(path.read_bytes()))
    tensor = state["optimizer"]["optimizer"]["state"][0]["exp_avg"]
    needle = tensor.contiguous().numpy().tobytes()
    data = path.read_bytes()
    start = data.find(needle)
    assert start >= 0 and data.rfind(needle) == start, "the tensor's bytes are not unique"
    return start, len(needle)


def _flip_in_tensor(d: Path) -> Path:
    path = d / CHECKPOINT_FILE
    start, size = _tensor_offset(path)
    flip(path, start + size // 2 - 32)
    return path


def _flip_in_middle(d: Path) -> Path:
    path = d / CHECKPOINT_FILE
    flip(path, path.stat().st_size // 2 - 32)
    return path


def _truncate_half(d: Path) -> Path:
    path = d / CHECKPOINT_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _truncate_last_byte(d: Path) -> Path:
    path = d / CHECKPOINT_FILE
    path.write_bytes(path.read_bytes()[:-1])
    return path


def _extend(d: Path) -> Path:
    path = d / CHECKPOINT_FILE
    path.write_bytes(path.read_bytes() + b"\0" * 64)
    return path


def _delete_states(d: Path) -> Path:
    path = d / CHECKPOINT_FILE
    path.unlink()
    return path


def _same_size_other_content(d: Path) -> Path:
    """The states file of the other checkpoint (global_step2) copied over this one's: same
    model, same layout, same size, other numbers (a wrong file copied in)."""
    path = d / CHECKPOINT_FILE
    other = (d.parent / "global_step2" / CHECKPOINT_FILE).read_bytes()
    assert len(other) == path.stat().st_size and other != path.read_bytes()
    path.write_bytes(other)
    return path


def _last_byte_changed(d: Path) -> Path:
    path = d / CHECKPOINT_FILE
    flip(path, path.stat().st_size - 1, 1)
    return path


def _flip_in_manifest(d: Path) -> Path:
    path = d / MANIFEST_FILE
    flip(path, path.stat().st_size // 2 - 32)
    return path


def _truncate_manifest(d: Path) -> Path:
    path = d / MANIFEST_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _delete_manifest(d: Path) -> Path:
    path = d / MANIFEST_FILE
    path.unlink()
    return path


def _manifest_digest_changed(d: Path) -> Path:
    """One hex digit of the states file's sha256 in the manifest changed (same size): the
    manifest and the file disagree; the message names the states file and the manifest."""
    path = d / MANIFEST_FILE
    text = path.read_text()
    digest = json.loads(text)["files"][CHECKPOINT_FILE]["sha256"]
    changed = digest[:10] + ("0" if digest[10] != "0" else "1") + digest[11:]
    path.write_text(text.replace(digest, changed))
    return d / MANIFEST_FILE  # its own checksum no longer matches


def _manifest_size_changed(d: Path) -> Path:
    path = d / MANIFEST_FILE
    text = path.read_text()
    size = json.loads(text)["files"][CHECKPOINT_FILE]["size"]
    assert text.count(f'"size": {size}') == 1
    path.write_text(text.replace(f'"size": {size}', f'"size": {size + 1}'))
    return d / MANIFEST_FILE  # its own checksum no longer matches


def _latest_names_missing_tag(d: Path) -> Path:
    """A bit of ``latest`` flipped to a tag that does not exist ('g' -> 'f')."""
    latest = d.parent / LATEST_FILE
    latest.write_bytes(bytes([latest.read_bytes()[0] ^ 0x01]) + latest.read_bytes()[1:])
    return d.parent / "flobal_step3"


DAMAGES = {
    "tensor-bytes-flipped": (_flip_in_tensor, "corrupt"),
    "middle-bytes-flipped": (_flip_in_middle, "corrupt"),
    "last-byte-changed": (_last_byte_changed, "corrupt"),
    "same-size-other-content": (_same_size_other_content, "corrupt"),
    "truncated-half": (_truncate_half, "truncated"),
    "truncated-one-byte": (_truncate_last_byte, "truncated"),
    "extended": (_extend, "bytes, the manifest says"),
    "states-missing": (_delete_states, "does not exist|missing"),
    "manifest-bytes-flipped": (_flip_in_manifest, "damaged"),
    "manifest-truncated": (_truncate_manifest, "damaged"),
    "manifest-missing": (_delete_manifest, "not a complete checkpoint"),
    "manifest-digest-changed": (_manifest_digest_changed, "checksum"),  # its own checksum
    "manifest-size-changed": (_manifest_size_changed, "checksum"),
    "latest-names-missing-tag": (_latest_names_missing_tag, "does not exist"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_checkpoint_is_refused_naming_the_file_and_changes_nothing(
    tmp_path, damage, spy_load_states
):
    """Row 1. The load follows ``latest`` to the damaged tag. Nothing of a file that fails
    verification is unpickled, and the engine (half-way through a cycle, grads in hand) is
    exactly as before."""
    directory = _saved(tmp_path)
    damage_fn, message = DAMAGES[damage]
    named = damage_fn(directory)

    engine = trained(2, seed=1, half=True)
    twin = twin_of(engine)
    with pytest.raises(CheckpointError, match=message) as info:
        engine.load_checkpoint(tmp_path)
    assert str(named) in str(info.value), str(info.value)
    assert spy_load_states == [], "a file that failed verification was unpickled"
    assert_unchanged_and_trains_on(engine, twin, 2)


def test_damage_inside_a_tensor_would_load_silently_without_the_manifest(tmp_path):
    """Why verification is needed (and that the tensor test above hits tensor bytes):
    ``torch.load`` reads the damaged file without error, with other numbers in that tensor."""
    directory = _saved(tmp_path)
    path = directory / CHECKPOINT_FILE
    before = load_states(io.BytesIO(path.read_bytes()))
    _flip_in_tensor(directory)
    after = load_states(io.BytesIO(path.read_bytes()))
    exp_avg = before["optimizer"]["optimizer"]["state"][0]["exp_avg"]
    damaged = after["optimizer"]["optimizer"]["state"][0]["exp_avg"]
    assert not torch.equal(exp_avg, damaged)
    assert_identical(after["module"], before["module"], "other tensors")


def test_latest_pointing_to_a_damaged_tag_names_that_tags_file(tmp_path):
    """``latest`` intact, its tag's states file damaged: the error names the tag's file; the
    other (intact) tag still loads by name."""
    directory = _saved(tmp_path)
    _flip_in_tensor(directory)
    engine = trained(2, seed=1)
    with pytest.raises(CheckpointError, match="global_step3") as info:
        engine.load_checkpoint(tmp_path)
    assert str(directory / CHECKPOINT_FILE) in str(info.value)
    engine.load_checkpoint(tmp_path, tag="global_step2")
    assert engine.global_steps == 2


@pytest.mark.parametrize("damage", ["bytes-flipped", "truncated-to-nothing"])
def test_damaged_latest_file_is_refused_with_checkpoint_error(tmp_path, damage):
    """``latest`` itself damaged (every byte flipped: not UTF-8; or emptied): a
    ``CheckpointError``, not an exception of another type from decoding it."""
    _saved(tmp_path)
    latest = tmp_path / LATEST_FILE
    if damage == "bytes-flipped":
        flip(latest, 0, latest.stat().st_size)
    else:
        latest.write_bytes(b"")
    engine = trained(2, seed=1, half=True)
    twin = twin_of(engine)
    with pytest.raises(CheckpointError):
        engine.load_checkpoint(tmp_path)
    assert_unchanged_and_trains_on(engine, twin, 2)


@pytest.mark.parametrize(
    "field, old",
    [
        ("config", '"gradient_clipping": 0.3'),  # 0.3 -> 0.2
        ("version", f'"version": "{fp16_triton.__version__}"'),
        ("format", '"format": 1'),  # 1 -> 0
    ],
)
def test_single_bit_flip_in_manifest_metadata_is_detected(tmp_path, field, old):
    """One bit flipped in the manifest's own fields (the last digit of the value: same size,
    still valid JSON): the manifest would then misreport the run's config, the version that
    wrote it or its format. Row 1: bytes flipped in any file of a checkpoint are refused."""
    directory = _saved(tmp_path)
    path = directory / MANIFEST_FILE
    text = path.read_text()
    assert text.count(old) == 1, old
    i = len(old) - (2 if old.endswith('"') else 1)  # the value's last character
    new = old[:i] + chr(ord(old[i]) ^ 1) + old[i + 1 :]
    path.write_text(text.replace(old, new))
    assert json.loads(path.read_text())[field] != json.loads(text)[field]

    engine = trained(2, seed=1)
    twin = twin_of(engine)
    with pytest.raises(CheckpointError, match=MANIFEST_FILE):
        engine.load_checkpoint(tmp_path)
    assert_unchanged_and_trains_on(engine, twin, 2)


def test_manifest_records_files_version_and_config(tmp_path):
    engine = trained(3)
    engine.save_checkpoint(tmp_path)
    directory = tmp_path / "global_step3"
    assert sorted(p.name for p in directory.iterdir()) == [CHECKPOINT_FILE, MANIFEST_FILE]
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    assert manifest["version"] == fp16_triton.__version__
    config = json.loads(json.dumps(engine.config.to_dict(), sort_keys=True, default=str))
    assert manifest["config"] == config
    assert manifest["config"]["gradient_accumulation_steps"] == 2
    assert manifest["config"]["fp16"]["enabled"] is True
    data = (directory / CHECKPOINT_FILE).read_bytes()
    assert manifest["hash"] == "sha256"
    assert manifest["files"] == {
        CHECKPOINT_FILE: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    }


def test_checkpoint_without_manifest_is_refused_with_a_clear_message(tmp_path, spy_load_states):
    engine = trained(3)
    engine.save_checkpoint(tmp_path)
    (tmp_path / "global_step3" / MANIFEST_FILE).unlink()
    fresh = build(seed=1)
    twin = twin_of(fresh)
    with pytest.raises(CheckpointError) as info:
        fresh.load_checkpoint(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "global_step3" / MANIFEST_FILE) in message
    assert "does not exist" in message and "not a complete checkpoint" in message
    assert spy_load_states == []
    assert_identical(everything(fresh), everything(twin))


# ---------------------------------------------------- 2. all or nothing: rollback at each stage
class Injected(RuntimeError):
    pass


def _inject(monkeypatch, engine, stage: str, when: str) -> list[int]:
    """Make ``stage`` fail during the next load: ``before`` it changes anything, ``after`` it
    did its work, on its first call only (the rollback calls it again); ``always`` on every
    call. Returns the list of calls made to it (one entry per call)."""
    calls: list[int] = []

    def wrap(original):
        def failing(*args, **kwargs):
            calls.append(1)
            first = len(calls) == 1
            if when == "before" and first or when == "always":
                raise Injected(f"injected failure in {stage}")
            result = original(*args, **kwargs)
            if when == "after" and first:
                raise Injected(f"injected failure in {stage}")
            return result

        return failing

    optimizer = engine.optimizer
    target, name = {
        "optimizer": (optimizer, "load_state_dict"),
        "inner-optimizer": (optimizer.optimizer, "load_state_dict"),
        "loss-scaler": (optimizer.loss_scaler, "load_state_dict"),
        "module": (engine.module, "load_state_dict"),
        "refresh": (optimizer, "refresh_fp32_params"),
        "scheduler": (engine.lr_scheduler, "load_state_dict"),
        "zero-grad": (optimizer, "zero_grad"),
    }[stage]
    # Patched on the class, for ``target`` alone: an instance attribute would show in a
    # scheduler's state_dict (all its attributes) and be deep-copied with the loss scaler
    # (the optimizer loads a copy of it first, to check the state).
    cls = type(target)
    original = getattr(cls, name)
    fail = wrap(original)

    def patched(self, *args, **kwargs):
        return (fail if self is target else original)(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, patched)
    return calls


STAGES = ["optimizer", "inner-optimizer", "loss-scaler", "module", "refresh", "scheduler"]
# The load's last act, clearing the grads, after the counters and the scheduler are set; only
# "before": a failure after the grads are gone is not rolled back (the grads are not kept).
CASES = [(stage, when) for stage in STAGES for when in ("before", "after")]
CASES.append(("zero-grad", "before"))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("stage, when", CASES)
def test_failure_at_any_load_stage_rolls_everything_back(tmp_path, monkeypatch, stage, when, path):
    """Row 2. The ``refresh`` stage runs in loads without optimizer states (the masters come
    from the loaded weights); the others in full loads. After the failure the engine is its
    deep copy from before the load, trains on like it, and a later load (nothing injected)
    gives what it gives a fresh engine."""
    source = trained(4, path=path)
    source.save_checkpoint(tmp_path)
    load_optimizer = stage != "refresh"

    engine = trained(2, seed=1, path=path, half=True)
    twin = twin_of(engine)
    with monkeypatch.context() as m:
        calls = _inject(m, engine, stage, when)
        with pytest.raises(CheckpointError, match="nothing changed") as info:
            engine.load_checkpoint(tmp_path, load_optimizer_states=load_optimizer)
    assert calls, f"{stage} was not reached by the load"
    assert isinstance(info.value.__cause__, Injected), repr(info.value.__cause__)
    assert f"injected failure in {stage}" in str(info.value)
    assert_identical(everything(engine), everything(twin), "after the failed load")
    go_on(engine, 2, steps=1)
    go_on(twin, 2, steps=1)
    assert_identical(everything(engine), everything(twin), "trained on after the failed load")

    # A load that works now gives what it gives a fresh engine: the failed one left nothing.
    engine.load_checkpoint(tmp_path, load_optimizer_states=load_optimizer)
    fresh = build(path, seed=2)
    fresh.load_checkpoint(tmp_path, load_optimizer_states=load_optimizer)
    if load_optimizer:  # the engine's own moments are kept otherwise: only weights compare
        assert_identical(everything(engine), everything(fresh), "loaded after the failure")
        go_on(engine, 4)
        go_on(fresh, 4)
        assert_identical(everything(engine), everything(fresh), "resumed after the failure")
    else:
        assert_identical(engine.module.state_dict(), source.module.state_dict(), "weights")


@pytest.mark.parametrize("path", PATHS)
def test_failure_in_refresh_every_time_still_rolls_back(tmp_path, monkeypatch, path):
    """The rollback does not call ``refresh_fp32_params``: a refresh that always fails is
    rolled back too (the masters it overwrote in place come back)."""
    trained(4, path=path).save_checkpoint(tmp_path)
    engine = trained(2, seed=1, path=path, half=True)
    twin = twin_of(engine)
    with monkeypatch.context() as m:
        _inject(m, engine, "refresh", "always")
        with pytest.raises(CheckpointError, match="nothing changed"):
            engine.load_checkpoint(tmp_path, load_optimizer_states=False)
    assert_unchanged_and_trains_on(engine, twin, 2)


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_interrupt_during_load_rolls_back_and_is_not_turned_into_checkpoint_error(
    tmp_path, monkeypatch, interrupt
):
    """Ctrl-C (or SystemExit) while a load applies: the engine is rolled back, and the
    interrupt goes on as itself. Turned into a ``CheckpointError`` (a ``RuntimeError``), it
    would be caught by the usual ``except CheckpointError: start from scratch``."""
    trained(4).save_checkpoint(tmp_path)
    engine = trained(2, seed=1, half=True)
    twin = twin_of(engine)
    real = engine.module.load_state_dict
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        result = real(*args, **kwargs)
        if len(calls) == 1:
            raise interrupt()
        return result

    monkeypatch.setattr(engine.module, "load_state_dict", interrupted)
    with pytest.raises(BaseException) as info:
        engine.load_checkpoint(tmp_path)
    monkeypatch.undo()
    assert_identical(everything(engine), everything(twin), "after the interrupted load")
    assert type(info.value) is interrupt, f"{interrupt.__name__} became {info.value!r}"


# ------------------------------------------------------------ 3. another LR scheduler class
def _lambda_lr(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def _sequential_lr(optimizer):
    first = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=0.5, total_iters=2)
    then = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [first, then], milestones=[2])


OTHER_SCHEDULERS = {
    "WarmupDecayLR": ({"config": RESUME_CONFIG}, "WarmupDecayLR"),
    "LambdaLR": ({"config": WARMUP_CONFIG, "lr_scheduler": _lambda_lr}, "LambdaLR"),
    "SequentialLR": ({"config": WARMUP_CONFIG, "lr_scheduler": _sequential_lr}, "SequentialLR"),
}


@pytest.mark.parametrize("other", list(OTHER_SCHEDULERS))
def test_checkpoint_of_another_scheduler_class_is_refused_naming_both(tmp_path, other):
    """Row 3. Saved with WarmupLR; the engine's scheduler is another class (from the config,
    or passed to initialize). ``load_lr_scheduler_states=False`` loads everything else and
    keeps the engine's scheduler as it was."""
    source = trained(3, config=WARMUP_CONFIG)
    assert type(source.lr_scheduler).__name__ == "WarmupLR"
    source.save_checkpoint(tmp_path)

    kwargs, name = OTHER_SCHEDULERS[other]
    kwargs = dict(kwargs)
    engine = build(seed=1, **kwargs)
    assert type(engine.lr_scheduler).__name__ == name
    for step in range(2):
        train_step(engine, step)
    half_step(engine, 2)
    twin = twin_of(engine)
    with pytest.raises(CheckpointError) as info:
        engine.load_checkpoint(tmp_path)
    message = str(info.value)
    assert "WarmupLR" in message and name in message, message
    assert "load_lr_scheduler_states=False" in message
    assert str(tmp_path / "global_step3" / CHECKPOINT_FILE) in message
    assert_identical(everything(engine), everything(twin), "after the refused load")

    scheduler_before = copy.deepcopy(engine.lr_scheduler.state_dict())
    engine.load_checkpoint(tmp_path, load_lr_scheduler_states=False)
    assert_identical(engine.lr_scheduler.state_dict(), scheduler_before, "scheduler kept")
    expected = everything(source)
    loaded = everything(engine)
    for key in ("module", "optimizer", "global_steps", "global_samples", "loss_scale"):
        assert_identical(loaded[key], expected[key], key)
    assert loaded["micro_steps"] == expected["micro_steps"]
    assert all(g is None for g in loaded["grads"])
    go_on(engine, 3)
    assert engine.global_steps == 5


def test_checkpoint_without_scheduler_into_engine_with_one_is_refused(tmp_path):
    config = {k: v for k, v in RESUME_CONFIG.items() if k != "scheduler"}
    source = trained(2, config=config)
    assert source.lr_scheduler is None
    source.save_checkpoint(tmp_path)
    engine = trained(2, seed=1, half=True)
    twin = twin_of(engine)
    with pytest.raises(CheckpointError, match="no LR scheduler state"):
        engine.load_checkpoint(tmp_path)
    assert_unchanged_and_trains_on(engine, twin, 2)
    engine.load_checkpoint(tmp_path, load_lr_scheduler_states=False)
    assert engine.global_steps == 2


# ------------------------------------------------------------------------- 4. client state
def test_rng_states_in_client_state_round_trip_exactly(tmp_path, rng_states_kept):
    """Row 4: Python's, numpy's (legacy and Generator: PCG64's 128-bit ints, MT19937's
    array), torch's global and Generator states come back equal, and restoring each one
    gives the same next draws as right after it was taken."""
    np.random.seed(123)
    random.seed(5)
    torch.manual_seed(7)
    pcg = np.random.default_rng(0)
    mt = np.random.Generator(np.random.MT19937(1))
    gen = torch.Generator().manual_seed(3)
    client = {
        "np_rng": np.random.get_state(),
        "py_rng": random.getstate(),
        "torch_rng": torch.get_rng_state(),
        "np_gen": pcg.bit_generator.state,
        "np_mt": mt.bit_generator.state,
        "np_legacy_dict": np.random.RandomState(2).get_state(legacy=False),
        "torch_gen": gen.get_state(),
        "epoch": 3,
    }

    def draws(np_gen, np_mt, torch_gen, legacy):
        return {
            "np": np.random.random(5),
            "np_normal": np.random.standard_normal(3),
            "py": [random.random() for _ in range(3)] + [random.gauss(0, 1)],
            "torch": torch.rand(5),
            "np_gen": np_gen.random(5),
            "np_mt": np_mt.integers(0, 2**62, 4),
            "torch_gen": torch.rand(5, generator=torch_gen),
            "legacy": legacy.random_sample(3),
        }

    expected = draws(pcg, mt, gen, np.random.RandomState(2))
    engine = trained(2)
    engine.save_checkpoint(tmp_path, client_state=client)
    draws(pcg, mt, gen, np.random.RandomState(9))  # move everything on

    fresh = build(seed=1)
    _, loaded = fresh.load_checkpoint(tmp_path)
    assert set(loaded) == set(client)
    np.random.set_state(loaded["np_rng"])
    random.setstate(loaded["py_rng"])
    torch.set_rng_state(loaded["torch_rng"])
    new_pcg = np.random.default_rng()
    new_pcg.bit_generator.state = loaded["np_gen"]
    new_mt = np.random.Generator(np.random.MT19937())
    new_mt.bit_generator.state = loaded["np_mt"]
    new_gen = torch.Generator()
    new_gen.set_state(loaded["torch_gen"])
    legacy = np.random.RandomState()
    legacy.set_state(loaded["np_legacy_dict"])
    got = draws(new_pcg, new_mt, new_gen, legacy)
    for key, value in expected.items():
        if isinstance(value, np.ndarray):
            assert value.dtype == got[key].dtype and np.array_equal(value, got[key]), key
        elif isinstance(value, torch.Tensor):
            assert torch.equal(value, got[key]), key
        else:
            assert value == got[key], key
    assert loaded["np_gen"] == client["np_gen"]  # 128-bit ints exact
    assert loaded["py_rng"] == client["py_rng"]
    assert loaded["epoch"] == 3


class Custom:
    pass


UNLOADABLE_VALUES = {
    "object": object(),
    "lambda": lambda: 1,
    "custom-instance": Custom(),
    "numpy-scalar": np.float64(1.5),
    "nested": {"inner": [1, Custom()]},
}


@pytest.mark.parametrize("kind", list(UNLOADABLE_VALUES))
def test_unloadable_client_state_is_refused_at_save_naming_key_and_type(tmp_path, kind):
    """Row 4: refused before anything is written: ``latest`` not moved, no directory for the
    new tag, no file changed."""
    engine = trained(2)
    engine.save_checkpoint(tmp_path)
    before = tree(tmp_path)
    train_step(engine, 2)
    value = UNLOADABLE_VALUES[kind]
    client = {"epoch": 3, "bad_key": value, "after": torch.ones(2)}
    with pytest.raises(ValueError) as info:
        engine.save_checkpoint(tmp_path, client_state=client)
    message = str(info.value)
    assert "'bad_key'" in message and type(value).__name__ in message, message
    assert not (tmp_path / "global_step3").exists()
    assert tree(tmp_path) == before
    assert (tmp_path / LATEST_FILE).read_text() == "global_step2"


class MyDict(dict):
    pass


UNLOADABLE_CONTAINERS = {
    "custom-key": lambda: {Custom(): 1},
    "defaultdict": lambda: collections.defaultdict(list, {"seen": [1, 2]}),
    "dict-subclass": lambda: MyDict(epoch=3),
}


@pytest.mark.parametrize("kind", list(UNLOADABLE_CONTAINERS))
def test_client_state_whose_keys_or_container_cannot_load_is_refused_at_save(tmp_path, kind):
    """Row 4, the client state itself rather than a value in it: a key that is no plain
    value, or a dict subclass that ``weights_only=True`` cannot build. Saved, it would move
    ``latest`` to a checkpoint that every load then refuses."""
    engine = trained(2)
    engine.save_checkpoint(tmp_path)
    before = tree(tmp_path)
    train_step(engine, 2)
    client = UNLOADABLE_CONTAINERS[kind]()
    try:
        with pytest.raises(ValueError, match="client_state"):
            engine.save_checkpoint(tmp_path, client_state=client)
    finally:
        if (tmp_path / "global_step3").exists():  # say what the save left
            fresh = build(seed=1)
            with pytest.raises(CheckpointError):
                fresh.load_checkpoint(tmp_path)
    assert tree(tmp_path) == before


# ------------------------------------------------------------------ 5. load into a used engine
@pytest.mark.parametrize("path", PATHS)
def test_load_half_way_through_accumulation_resumes_as_a_fresh_engine(tmp_path, path):
    """Row 5. The checkpoint: 4 optimizer steps (one skipped for overflow). The used engine:
    another init, 2 steps, then one micro-batch whose grads hold an inf. Loaded, it has no
    grads and sits at the checkpoint's boundary; then it trains exactly as a fresh engine that
    loaded the checkpoint, and as the source itself going on (step 5 overflows)."""
    source = trained(4, path=path)
    source.save_checkpoint(tmp_path)

    used = trained(2, seed=2, path=path)
    half_step(used, 2, bad=True)
    used.load_checkpoint(tmp_path)
    assert used.micro_steps == 8 and used.global_steps == 4
    assert all(p.grad is None for p in used.module.parameters())
    assert used.is_gradient_accumulation_boundary() is False  # a new cycle starts

    fresh = build(path, seed=1)
    fresh.load_checkpoint(tmp_path)
    assert_identical(everything(used), everything(fresh), "loaded")
    assert_identical(everything(used), everything(source), "loaded vs source")
    for engine in (used, fresh, source):
        go_on(engine, 4, steps=3)
    assert_identical(everything(used), everything(fresh), "resumed")
    assert_identical(everything(used), everything(source), "resumed vs source")
    assert used.skipped_steps == 2


# -------------------------------------------------------------- 6. save half-way through a cycle
@pytest.mark.parametrize("path", PATHS)
def test_save_half_way_through_accumulation_warns_and_resumes_as_at_the_boundary(
    tmp_path, caplog, path
):
    """Row 6. The save at the boundary does not warn; one a micro-batch later warns (logger
    fp16_triton.engine) and records the boundary. Both resume identically, and as the source
    engine, whose accumulation the save did not disturb, goes on."""
    source = trained(3, path=path)
    with caplog.at_level(logging.WARNING, logger="fp16_triton.engine"):
        source.save_checkpoint(tmp_path, tag="boundary")
    assert [r for r in caplog.records if r.name == "fp16_triton.engine"] == []

    half_step(source, 3)
    untouched = twin_of(source)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fp16_triton.engine"):
        source.save_checkpoint(tmp_path, tag="mid")
    warnings = [r for r in caplog.records if r.name == "fp16_triton.engine"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    text = warnings[0].getMessage()
    assert "between accumulation boundaries" in text and "micro step 6" in text, text
    assert_identical(everything(source), everything(untouched), "the save changed the engine")

    with open(tmp_path / "mid" / CHECKPOINT_FILE, "rb") as f:
        mid = load_states(f)
    with open(tmp_path / "boundary" / CHECKPOINT_FILE, "rb") as f:
        boundary = load_states(f)
    assert mid["micro_steps"] == boundary["micro_steps"] == 6
    for key in ("module", "optimizer", "lr_scheduler", "global_steps", "global_samples"):
        assert_identical(mid[key], boundary[key], key)

    at_boundary, at_mid = build(path, seed=1), build(path, seed=2)
    at_boundary.load_checkpoint(tmp_path, tag="boundary")
    at_mid.load_checkpoint(tmp_path, tag="mid")
    assert at_mid.micro_steps == 6
    assert_identical(everything(at_mid), everything(at_boundary), "loaded")
    for engine in (at_boundary, at_mid, source, untouched):
        go_on(engine, 3, steps=3)  # step 5 overflows
    assert_identical(everything(at_mid), everything(at_boundary), "resumed")
    assert_identical(everything(source), everything(untouched), "source trained on")
    assert_identical(everything(at_mid), everything(source), "resumed vs source")


# ----------------------------------------------------------------- 7. killed saves' leftovers
_KILLED_SAVE_SCRIPT = """
import io, sys, time
from pathlib import Path
import torch
sys.path.insert(0, {tests_dir!r})
import test_engine as t
import fp16_triton.checkpoint as checkpoint
import fp16_triton.checkpoint_files as checkpoint_files

torch.set_num_threads(1)
engine = t.make_engine(t.RESUME_CONFIG)
for step in range(2):
    t.train_step(engine, step, t.RESUME_BAD_STEPS)
engine.save_checkpoint({save_dir!r})  # complete: global_step2
t.train_step(engine, 2, t.RESUME_BAD_STEPS)
real_atomic_write = checkpoint_files.atomic_write


def stalling_atomic_write(path, write):
    if path.name != {target!r}:
        return real_atomic_write(path, write)

    def half_then_stall(f):
        buffer = io.BytesIO()
        write(buffer)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        Path({marker!r}).write_text("half written")
        time.sleep(600)  # SIGKILL comes here

    return real_atomic_write(path, half_then_stall)


checkpoint.atomic_write = checkpoint_files.atomic_write = stalling_atomic_write
engine.save_checkpoint({save_dir!r})  # global_step3, killed while writing the target
raise SystemExit("not killed")
"""


def _killed_save(tmp_path: Path, save_dir: Path, target: str) -> None:
    """A child process saves global_step2, trains a step, and is killed with SIGKILL while
    ``target`` of its global_step3 save is half written (deterministic: the parent waits for
    the child's sign that the half is on disk)."""
    marker = tmp_path / "half_written"
    script = tmp_path / "killed_save.py"
    script.write_text(
        _KILLED_SAVE_SCRIPT.format(
            tests_dir=str(TESTS_DIR), save_dir=str(save_dir), target=target, marker=str(marker)
        )
    )
    log = tmp_path / "child.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(script)], stdout=out, stderr=out, env=env)
        try:
            deadline = time.monotonic() + 240
            while not marker.exists():
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "the child did not reach the write"
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
@pytest.mark.parametrize("target", [CHECKPOINT_FILE, MANIFEST_FILE, LATEST_FILE])
def test_save_killed_mid_write_keeps_previous_and_next_save_removes_leftovers(tmp_path, target):
    """Row 7. Killed while writing the states file, the manifest or ``latest``: a half
    written ``.<name>.<random>.tmp`` is left, ``latest`` still names global_step2, which
    loads exactly; global_step3 loads only if its save got to ``latest`` (complete); the
    resumed run's next save (global_step3 again) removes every leftover."""
    save_dir = tmp_path / "ckpt"
    _killed_save(tmp_path, save_dir, target)

    where = save_dir if target == LATEST_FILE else save_dir / "global_step3"
    left = leftovers(save_dir)
    assert [p.parent for p in left] == [where], left
    assert left[0].name.startswith(f".{target}.") and left[0].stat().st_size > 0
    assert (save_dir / LATEST_FILE).read_text() == "global_step2"

    reference = trained(2)  # what the child saved (deterministic across processes)
    resumed = build(seed=1)
    resumed.load_checkpoint(save_dir)
    assert_identical(everything(resumed), everything(reference), "global_step2")

    probe = build(seed=2)
    if target == LATEST_FILE:  # complete but not yet the latest: loads by its tag
        probe.load_checkpoint(save_dir, tag="global_step3")
        assert probe.global_steps == 3
    else:
        twin = twin_of(probe)
        with pytest.raises(CheckpointError, match="does not exist"):
            probe.load_checkpoint(save_dir, tag="global_step3")
        assert_identical(everything(probe), everything(twin))

    train_step(resumed, 2, RESUME_BAD_STEPS)
    resumed.save_checkpoint(save_dir)  # global_step3
    assert leftovers(save_dir) == []
    assert sorted(p.name for p in (save_dir / "global_step3").iterdir()) == [
        CHECKPOINT_FILE,
        MANIFEST_FILE,
    ]
    again = build(seed=2)
    again.load_checkpoint(save_dir)
    assert_identical(everything(again), everything(resumed), "global_step3")


def test_leftovers_of_a_killed_save_under_another_tag_are_removed_by_the_next_save(tmp_path):
    """Row 7, the next save under another tag (a resumed run saves at other steps, or under
    names of its own): the half-written files of the killed save, named as ``atomic_write``
    names them, are removed too (they can be a whole checkpoint's size)."""
    engine = trained(2)
    engine.save_checkpoint(tmp_path)
    killed = tmp_path / "global_step3"
    killed.mkdir()
    (killed / f".{CHECKPOINT_FILE}.k3x_9a1z.tmp").write_bytes(b"\0" * 1000)
    (killed / f".{MANIFEST_FILE}.q0w8e7r6.tmp").write_bytes(b"{")
    (tmp_path / f".{LATEST_FILE}.m2n3b4v5.tmp").write_bytes(b"global")
    assert len(leftovers(tmp_path)) == 3
    train_step(engine, 2)
    train_step(engine, 3)
    engine.save_checkpoint(tmp_path)  # global_step4
    assert (tmp_path / LATEST_FILE).read_text() == "global_step4"
    assert leftovers(tmp_path) == []


def test_leftovers_in_the_tag_saved_are_removed_and_other_files_kept(tmp_path):
    """Only ``.*.tmp`` files go; a user's file beside the checkpoint stays."""
    engine = trained(2)
    directory = tmp_path / "global_step2"
    directory.mkdir(parents=True)
    (directory / f".{CHECKPOINT_FILE}.abcd1234.tmp").write_bytes(b"\0" * 100)
    (directory / "notes.txt").write_text("mine")
    (tmp_path / f".{LATEST_FILE}.abcd1234.tmp").write_bytes(b"glob")
    engine.save_checkpoint(tmp_path)
    assert leftovers(tmp_path) == []
    assert (directory / "notes.txt").read_text() == "mine"
    fresh = build(seed=1)
    fresh.load_checkpoint(tmp_path)
    assert_identical(everything(fresh), everything(engine))


# -------------------------------------------------------------------------- 8. tag "latest"
def test_tag_latest_is_refused_at_save_and_nothing_is_written(tmp_path):
    engine = trained(2)
    empty = tmp_path / "empty"
    with pytest.raises(ValueError, match="latest"):
        engine.save_checkpoint(empty, tag=LATEST_FILE)
    assert not empty.exists()

    used = tmp_path / "used"
    engine.save_checkpoint(used)
    before = tree(used)
    train_step(engine, 2)
    with pytest.raises(ValueError, match="latest"):
        engine.save_checkpoint(used, tag=LATEST_FILE)
    assert tree(used) == before
    assert (used / LATEST_FILE).is_file()
    fresh = build(seed=1)
    fresh.load_checkpoint(used)
    assert fresh.global_steps == 2


# --------------------------------------------------- 9. files beside the manifest are not read
def test_a_states_file_its_manifest_does_not_list_is_not_loaded(tmp_path):
    """A sharded save over a tag an unsharded run used leaves the old states file beside the
    new manifest (which lists the shards and the engine file): only the manifest says what the
    checkpoint is, so that stale file must not be loaded."""
    from fp16_triton.checkpoint_files import read_manifest, write_manifest

    engine = trained(2)
    engine.save_checkpoint(tmp_path, tag="t")
    manifest = read_manifest(tmp_path / "t")
    write_manifest(tmp_path / "t", {}, manifest["version"], manifest["config"])
    fresh = build(seed=1)
    before = everything(fresh)
    with pytest.raises(CheckpointError, match=f"does not list {CHECKPOINT_FILE}"):
        fresh.load_checkpoint(tmp_path, tag="t")
    assert_identical(everything(fresh), before)
