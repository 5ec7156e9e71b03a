"""torch.compile of a training step that calls our ``step()``: the step runs eagerly (it is
already one fused launch per bucket), so dynamo neither traces it nor recompiles on the params'
identities, and the compiled loop trains exactly as the eager one."""

from __future__ import annotations

import pytest
import torch

import fp16_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
torch._dynamo.config.recompile_limit = 8  # dynamo's default, pinned: the limit the issue names


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(6)]).to(DEVICE)


def make_optimizer(model, backend, wrapped, flat):
    opt = fp16_triton.AdamW(model.parameters(), lr=1e-2, backend=backend, flat_buffers=flat)
    return fp16_triton.FP16Optimizer(opt) if wrapped else opt


def train(model, opt, steps, compiled):
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)).to(DEVICE)

    def train_step():
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    step = torch.compile(train_step, backend="eager") if compiled else train_step
    for _ in range(steps):
        step()


@pytest.mark.parametrize(
    ("backend", "wrapped", "flat"),
    [("torch", False, False), ("torch", True, False), ("triton", False, True)],
)
def test_compiled_training_step_never_recompiles_and_matches_eager(backend, wrapped, flat):
    """20 compiled steps (the issue's case): one graph for the model, no recompile (before,
    dynamo traced the step and guarded on every param's identity, hitting the recompile limit),
    and params bitwise equal to the eager loop's (backend="eager" keeps the model's math as it
    is, so any difference would be the optimizer's)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled_model, eager_model = make_model(0), make_model(0)
    train(compiled_model, make_optimizer(compiled_model, backend, wrapped, flat), 20, True)
    events = [reason for kind in counters.values() for reason in kind]
    assert not [e for e in events if "recompile" in str(e).lower()], events
    # The model's graph (and at most one around the backward): the step adds none (before:
    # 12 graphs, a graph per resume point of the step's bookkeeping).
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    train(eager_model, make_optimizer(eager_model, backend, wrapped, flat), 20, False)
    for a, b in zip(compiled_model.parameters(), eager_model.parameters()):
        assert torch.equal(a, b)
