"""The tiny GPT (``fp16_triton.train``) trained through the engine, as the optimizers' end-to-end
tests run it: a DeepSpeed-style fp16 config with dynamic loss scaling, fixed Markov-chain
batches, the fp32 torch.optim.AdamW baseline, the 5% quality check and the bitwise resume check.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from comparing import assert_bitwise

from fp16_triton.train import GPTConfig, MarkovTask, TinyGPT

STEPS = 150


def fp16_config(optimizer: dict) -> dict:
    """Dynamic loss scaling from 2**24 (the first steps overflow and are skipped), clipping at
    1.0, micro-batches of 16."""
    return {
        "train_micro_batch_size_per_gpu": 16,
        "gradient_clipping": 1.0,
        "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 24,
                 "loss_scale_window": 50, "hysteresis": 2, "min_loss_scale": 1},
        "optimizer": optimizer,
        "steps_per_print": 10**6,
    }  # fmt: skip


def batches(steps: int) -> list[torch.Tensor]:
    task, data = MarkovTask(GPTConfig().vocab, 0), torch.Generator().manual_seed(1)
    return [task.batch(16, GPTConfig().seq_len, data) for _ in range(steps)]


def loss(model, seq: torch.Tensor) -> torch.Tensor:
    logits = model(seq[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, GPTConfig().vocab), seq[:, 1:].reshape(-1))


def engine_run(make_engine: Callable, data, engine=None, start: int = 0, backend: str = "auto"):
    """``(engine, losses)`` after stepping ``data[start:]``; a fresh engine (seed 0) unless one
    is given."""
    if engine is None:
        torch.manual_seed(0)
        engine = make_engine(backend)
    losses = []
    for seq in data[start:]:
        value = loss(engine, seq)
        engine.backward(value)
        engine.step()
        losses.append(value.item())
    return engine, losses


def torch_fp32_adamw(data) -> list[float]:
    """The baseline without this package: fp32 TinyGPT, ``torch.optim.AdamW`` (train.py's
    default lr and decay), ``clip_grad_norm_``."""
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    losses = []
    for seq in data:
        value = loss(model, seq)
        opt.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(value.item())
    return losses


def tail(losses: list[float]) -> float:
    """The final loss: the mean of the last 15 steps."""
    return sum(losses[-15:]) / 15


def assert_within_5_percent(engine, ours: list[float], theirs: list[float]) -> None:
    """Ours ends within 5% of the baseline's final loss, the baseline learned the task at all
    (a broken step stays near log(32) = 3.47), and loss scaling skipped at least one step."""
    assert tail(theirs) < 0.7 * theirs[0]
    assert tail(ours) == pytest.approx(tail(theirs), rel=0.05), (tail(ours), tail(theirs))
    assert engine.skipped_steps >= 1


def assert_resumes_bitwise(make_engine: Callable, tmp_path, backend: str) -> None:
    """Saved after 4 steps (the first skipped while the scale comes down from 2**24), resumed
    in a fresh engine, 4 more steps: bit for bit the run that never stopped."""
    data = batches(8)
    straight, _ = engine_run(make_engine, data, backend=backend)
    half, _ = engine_run(make_engine, data[:4], backend=backend)
    half.save_checkpoint(tmp_path)
    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    resumed = make_engine(backend)
    resumed.load_checkpoint(tmp_path)
    engine_run(make_engine, data, resumed, start=4)
    assert resumed.global_steps == straight.global_steps == 8
    assert_bitwise(resumed.module.state_dict(), straight.module.state_dict(), "weights")
    assert_bitwise(
        resumed.optimizer.state_dict(), straight.optimizer.state_dict(), "optimizer state"
    )
