"""fp16_triton.Muon through the engine: DeepSpeed's Muon/AdamW split and config keys, the tiny
GPT trained in fp16 with dynamic loss scaling against an fp32 torch baseline (torch.optim.Muon on
the hidden matrices + torch.optim.AdamW on the rest), and a bitwise resume. The optimizer's own
numerics are ``tests/test_muon.py``'s."""

from __future__ import annotations

import pytest
import tiny_gpt
import torch
from comparing import one_thread as one_thread  # noqa: F401  (autouse: one CPU thread)

import fp16_triton
from fp16_triton.train import GPTConfig, TinyGPT

if not hasattr(torch.optim, "Muon"):
    pytest.skip("torch.optim.Muon (the baseline) needs torch >= 2.9", allow_module_level=True)

BACKENDS = ("triton", "torch")


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 16)
        self.hidden = torch.nn.Sequential(
            torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16)
        )
        self.lm_head = torch.nn.Linear(16, 10)


def _split(engine):
    names = {id(p): n for n, p in engine.module.named_parameters()}
    return {
        (g["use_muon"], g["lr"]): sorted(names[id(p)] for p in g["params"])
        for g in engine.optimizer.param_groups
    }


MUON_CONFIG = {"type": "Muon", "params": {"lr": 0.1, "muon_lr": 0.02, "adam_lr": 0.003}}


def test_engine_splits_as_deepspeed_and_wraps_one_muon():
    torch.manual_seed(0)
    engine = fp16_triton.initialize(model=Net(), config={"optimizer": MUON_CONFIG})[0]
    assert isinstance(engine.optimizer, fp16_triton.FP16Optimizer)
    assert type(engine.optimizer.optimizer) is fp16_triton.Muon  # one optimizer, both halves
    assert _split(engine) == {
        (True, 0.02): ["hidden.0.weight", "hidden.2.weight"],
        (False, 0.003): ["embed.weight", "hidden.0.bias", "hidden.2.bias", "lm_head.bias",
                         "lm_head.weight"],
    }  # fmt: skip
    model = Net()
    model.hidden[2].weight.use_muon = False  # the user's tags win over the name rule
    model.lm_head.weight.use_muon = True
    rest = list(model.embed.parameters()) + list(model.lm_head.parameters())
    groups = [{"params": list(model.hidden.parameters()), "lr": 0.5}, {"params": rest}]
    engine = fp16_triton.initialize(
        model=model, model_parameters=groups, config={"optimizer": MUON_CONFIG}
    )[0]
    assert _split(engine) == {
        (True, 0.5): ["hidden.0.weight"],  # a group's own lr wins
        (False, 0.5): ["hidden.0.bias", "hidden.2.bias", "hidden.2.weight"],
        (True, 0.02): ["lm_head.weight"],
        (False, 0.003): ["embed.weight", "lm_head.bias"],
    }


@pytest.mark.parametrize(
    "key, value",
    [("ns_coefficients", [1.0, 2.0]), ("ns_coefficients", "abc"), ("adjust_lr_fn", "spectral"),
     ("muon_lr", -0.1), ("adam_lr", "fast")],
)  # fmt: skip
def test_bad_config_values_name_the_key(key, value):
    from fp16_triton.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=key):
        load_config({"optimizer": {"type": "Muon", "params": {key: value}}})


STEPS = 150
MUON = {"muon_lr": 0.02, "adam_lr": 3e-3, "weight_decay": 0.01}


def _gpt():
    """The tiny GPT with its embeddings (named tokens/positions: the name rule would give them
    to Muon) tagged for AdamW, so that Muon gets the hidden 2-D weights only."""
    model = TinyGPT(GPTConfig())
    model.tokens.weight.use_muon = model.positions.weight.use_muon = False
    return model


def _engine(backend):
    config = tiny_gpt.fp16_config({"type": "Muon", "params": MUON})
    return fp16_triton.initialize(model=_gpt(), config=config, backend=backend)[0]


def _torch_fp32_muon_adamw(data):
    """The baseline without this package: fp32 TinyGPT, torch.optim.Muon on the hidden 2-D
    weights, torch.optim.AdamW on the rest (the AdamW half's betas and eps as ours: Muon's
    defaults (0.9, 0.95) and 1e-7), ``clip_grad_norm_`` over all."""
    torch.manual_seed(0)
    model = _gpt()
    params = list(model.parameters())
    hidden = [p for p in params if p.ndim == 2 and getattr(p, "use_muon", True)]
    rest = [p for p in params if all(p is not h for h in hidden)]
    wd = MUON["weight_decay"]
    opts = [
        torch.optim.Muon(hidden, lr=MUON["muon_lr"], weight_decay=wd),
        torch.optim.AdamW(rest, lr=MUON["adam_lr"], betas=(0.9, 0.95), eps=1e-7, weight_decay=wd),
    ]  # fmt: skip
    losses = []
    for seq in data:
        loss = tiny_gpt.loss(model, seq)
        model.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for o in opts:
            o.step()
        losses.append(loss.item())
    return losses


def test_engine_trains_the_tiny_gpt_in_fp16_within_5_percent_of_fp32_torch():
    """Muon in fp16 with dynamic loss scaling ends within 5% of the fp32 torch.optim.Muon +
    AdamW baseline's final loss (figures: bench/results/2026-11-29-cpu.md). Backend "auto":
    the torch reference on CPU (the interpreter would take minutes); the kernels are pinned to
    torch in tests/test_muon.py and to the reference by the resume test."""
    data = tiny_gpt.batches(tiny_gpt.STEPS)
    engine, ours = tiny_gpt.engine_run(_engine, data)
    tiny_gpt.assert_within_5_percent(engine, ours, _torch_fp32_muon_adamw(data))


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_resumes_bitwise(tmp_path, backend):
    tiny_gpt.assert_resumes_bitwise(_engine, tmp_path, backend)


def test_the_engine_sends_conv_filters_to_adamw():
    # DeepSpeed tags params of >= 2 dims and flattens conv filters; torch.optim.Muon refuses
    # them: here they go to AdamW instead of failing.
    model = torch.nn.Sequential(torch.nn.Conv1d(4, 4, 3), torch.nn.Flatten(), torch.nn.Linear(8, 2))
    engine, optimizer, *_ = fp16_triton.initialize(model=model, config={"optimizer": MUON_CONFIG})
    muon = [p for g in optimizer.optimizer.param_groups if g["use_muon"] for p in g["params"]]
    assert [tuple(p.shape) for p in muon] == [(2, 8)]
    engine.backward(engine(torch.randn(3, 4, 4)).square().mean())
    engine.step()
