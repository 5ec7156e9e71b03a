"""Lion (``fp16_triton/lion.py``, ``kernels/lion.py``) against a float64 model of the paper's
update written here, on both backends, fp32 params and fp16/bf16 params with fp32 masters; the
engine training the tiny GPT in fp16 against plain torch's fp32 AdamW; exact resume.

The float64 model (Chen et al. 2023, Algorithm 2, decoupled decay; ``sign(0) = 0``)::

    c = beta1 * m + (1 - beta1) * g ;  p = p * (1 - lr * wd) - lr * sign(c)
    m = beta2 * m + (1 - beta2) * g

Tolerances, one step at a time (the model restarts from the kernel's fp32 state each step):
- ``sign(c)``: the fp32 ``c`` is within 2 roundings of the exact one, so elements with
  ``|c| <= 4 ulp(max(|beta1 m|, |(1 - beta1) g|))`` may take either sign and are left out of the
  weight comparison (the rest must agree exactly on the sign);
- the fp32 weight: 2 roundings (the decay's product, the subtraction; a fused multiply-add
  makes one): within 2 ulp of ``max(|p|, lr)``;
- ``m``: 3 roundings (two products and the sum): within 3 ulp of ``max(|beta2 m|, |(1 - beta2)
  g|, |m|)``;
- a fp16/bf16 param with a master is exactly the master rounded to nearest-even.
"""

from __future__ import annotations

import math

import pytest
import tiny_gpt
import torch
from comparing import assert_bitwise, master_rounded
from comparing import one_thread as one_thread  # noqa: F401  (autouse: one CPU thread)

import fp16_triton
from fp16_triton.functional import lion_
from fp16_triton.lion import ALGORITHM
from fp16_triton.train import GPTConfig, TinyGPT

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SIZES = (1, 1100, 4097)  # across a 1024-element block and a 4096-element chunk


def ulp(x: torch.Tensor) -> torch.Tensor:
    """fp32 ulp of float64 magnitudes (the spacing at ``|x|``, at least the smallest normal's)."""
    x = x.abs().clamp_min(2.0**-126)
    return 2.0 ** (torch.floor(torch.log2(x)) - 23)


def model_step(p, m, g, lr, beta1, beta2, wd):
    c = beta1 * m + (1 - beta1) * g
    return p * (1 - lr * wd) - lr * torch.sign(c), beta2 * m + (1 - beta2) * g, c


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled-clipped"])
def test_steps_match_the_float64_model(backend, dtype, scaled):
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, generator=gen) for n in SIZES]
    params = [w.to(dtype) for w in weights]
    masters = [p.float() for p in params] if dtype != torch.float32 else None
    exp_avgs = [torch.zeros(n) for n in SIZES]
    lr, beta1, beta2, wd = 2e-3, 0.9, 0.99, 0.1
    for step in range(4):
        grads = [torch.randn(n, generator=gen).to(dtype) for n in SIZES]
        if step == 2:  # exact zeros: sign(0) = 0, the weight only decays
            grads[0].zero_()
            exp_avgs[0].zero_()
        scale = torch.full((), 1024.0) if scaled else None
        norm_sq = torch.full((), 4.0) if scaled else None  # norm 2 > max_norm 1: clip 1/2
        factor = 1.0 / (2.0 + 1e-6) if scaled else 1.0  # the grads are given x 1024
        before_w = [(m if masters else p).double() for m, p in zip(masters or params, params)]
        before_m = [m.double() for m in exp_avgs]
        g64 = [g.double() * factor for g in grads]
        scaling = dict(grad_scale=scale, norm_sq=norm_sq, max_norm=1.0) if scaled else {}
        given = [(g.float() * 1024).to(dtype) for g in grads] if scaled else grads
        ALGORITHM.launch(
            backend, params, given, exp_avgs, masters=masters, lr=lr, beta1=beta1, beta2=beta2,
            weight_decay=wd, **scaling,
        )()  # fmt: skip
        for i in range(len(SIZES)):
            w = (masters[i] if masters else params[i]).double()
            want_w, want_m, c = model_step(before_w[i], before_m[i], g64[i], lr, beta1, beta2, wd)
            sure = c.abs() > 4 * ulp(
                torch.maximum((beta1 * before_m[i]).abs(), (1 - beta1) * g64[i].abs())
            )
            err = (w - want_w).abs()[sure]
            assert (err <= 2 * ulp(torch.maximum(want_w.abs(), torch.tensor(lr))[sure])).all(), (
                f"weight {i} step {step}: max error {err.max().item()}"
            )
            m_scale = torch.maximum((beta2 * before_m[i]).abs(), ((1 - beta2) * g64[i]).abs())
            m_scale = torch.maximum(m_scale, want_m.abs())
            assert ((exp_avgs[i].double() - want_m).abs() <= 3 * ulp(m_scale)).all(), f"m {i}"
            if masters:
                rounded = master_rounded(masters[i], dtype)
                assert_bitwise(params[i], rounded, f"param {i} = rounded master")
        if step == 2:  # c == 0 exactly: the weight only decays (DeepSpeed's would move +lr)
            decayed = before_w[0] * (1 - lr * wd)
            w0 = (masters or params)[0].double()
            assert ((w0 - decayed).abs() <= ulp(decayed)).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_bf16_momentum_is_the_fp32_step_with_the_momentum_rounded(backend, dtype):
    """``state_dtype=torch.bfloat16``: each step is the fp32-momentum step from the widened
    bf16 momentum, its new momentum rounded to nearest-even. Checked against the same class with
    an fp32 momentum started from the bf16 values (the same step, an oracle apart from the
    float64 model above): weights bitwise, the stored momentum the fp32 one rounded, bitwise."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype)) for n in SIZES]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    kwargs = dict(lr=2e-3, betas=(0.9, 0.99), weight_decay=0.1, backend=backend)
    compact = fp16_triton.Lion(params, state_dtype=torch.bfloat16, **kwargs)
    plain = fp16_triton.Lion(twins, **kwargs)
    for _ in range(3):
        for p, t in zip(params, twins):
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            t.grad = p.grad.clone()
        compact.step()
        plain.step()
        for p, t in zip(params, twins):
            m = compact.state[p]["exp_avg"]
            assert m.dtype == torch.bfloat16
            assert_bitwise(m, plain.state[t]["exp_avg"].to(torch.bfloat16), "momentum rounded")
            assert_bitwise(p.detach(), t.detach(), "weight")
            plain.state[t]["exp_avg"].copy_(m)  # both continue from the stored momentum
    assert fp16_triton.Lion([torch.nn.Parameter(torch.zeros(3))]).defaults["state_dtype"] == (
        torch.float32
    )


def test_the_traffic_of_a_bf16_momentum_is_18_bytes():
    # fp16 param and grad, fp32 master, bf16 momentum: read 2 + 2 + 4 + 2, write 2 + 4 + 2.
    assert ALGORITHM.traffic(torch.float16, state_dtype=torch.bfloat16).moved == 18
    assert ALGORITHM.traffic(torch.float16, state_dtype=torch.bfloat16).kept == 10


def test_functional_lion_is_the_class_step():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    twin = [p.detach().clone() for p in model.parameters()]
    opt = fp16_triton.Lion(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    model(torch.randn(4, 8)).pow(2).mean().backward()
    opt.step()
    grads = [p.grad for p in model.parameters()]
    exp_avgs = [torch.zeros_like(p) for p in twin]
    lion_(twin, grads, exp_avgs, lr=1e-2, beta1=0.8, beta2=0.95, weight_decay=0.1)
    for p, t in zip(model.parameters(), twin):
        assert_bitwise(p.detach(), t, "class vs functional")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_skipped_step_and_class_state(backend):
    model = torch.nn.Linear(8, 4).half()
    opt = fp16_triton.FP16Optimizer(
        fp16_triton.Lion(model.parameters(), lr=1e-3, weight_decay=0.1, backend=backend),
        loss_scaler={"loss_scale": 0, "initial_scale_power": 8},
    )
    x = torch.randn(4, 8).half()
    opt.backward(model(x).float().pow(2).mean())
    opt.step()
    state = opt.optimizer.state[model.weight]
    assert set(state) == {"exp_avg", "master_param"}
    assert state["exp_avg"].dtype == torch.float32
    before = [t.clone() for t in (model.weight, state["exp_avg"], state["master_param"])]
    opt.zero_grad()
    opt.backward(model(x).float().pow(2).mean() * math.inf)
    opt.step()  # inf grads: nothing written, the scale drops
    assert opt.overflow
    for b, a in zip(before, (model.weight, state["exp_avg"], state["master_param"])):
        assert_bitwise(a, b, "after a skipped step")
    sd = opt.state_dict()
    again = fp16_triton.FP16Optimizer(
        fp16_triton.Lion(model.parameters(), lr=1e-3, weight_decay=0.1, backend=backend)
    )
    again.load_state_dict(sd)
    assert_bitwise(again.optimizer.state[model.weight]["exp_avg"], state["exp_avg"], "loaded")


def test_the_config_takes_deepspeed_lion_params():
    from fp16_triton.config import ConfigError, load_config

    cfg = load_config({"optimizer": {"type": "lion", "params": {"lr": 1e-4, "betas": [0.9, 0.99]}}})
    assert cfg.optimizer.type == "Lion"
    assert cfg.optimizer.params == {
        "lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0, "maximize": False,
        "state_dtype": torch.float32,  # ours: the momentum's storage (compact state)
        "stochastic_rounding": False,  # ours (compact state)
        "seed": None, "master_weights": True,
    }  # fmt: skip
    bf16 = load_config({"optimizer": {"type": "Lion", "params": {"state_dtype": "bf16"}}})
    assert bf16.optimizer.params["state_dtype"] == torch.bfloat16
    with pytest.raises(ConfigError, match="eps"):
        load_config({"optimizer": {"type": "Lion", "params": {"eps": 1e-8}}})


# ----------------------------------------------------------------------- the engine, end to end
LION = {"lr": 1e-3, "betas": [0.9, 0.99], "weight_decay": 0.1}  # AdamW's lr / 3, wd x 10


def _engine(backend):
    config = tiny_gpt.fp16_config({"type": "Lion", "params": LION})
    return fp16_triton.initialize(model=TinyGPT(GPTConfig()), config=config, backend=backend)[0]


def test_engine_trains_the_tiny_gpt_in_fp16_within_5_percent_of_fp32_adamw():
    """Lion in fp16 with dynamic loss scaling ends within 5% of plain torch fp32 AdamW's final
    loss (figures: bench/results/2026-11-29-cpu.md). Backend "auto": the kernels on a GPU, the
    reference on CPU, where the interpreter would take minutes; the kernel is pinned to the
    float64 model above and to the reference by the resume test below."""
    data = tiny_gpt.batches(tiny_gpt.STEPS)
    engine, ours = tiny_gpt.engine_run(_engine, data)
    tiny_gpt.assert_within_5_percent(engine, ours, tiny_gpt.torch_fp32_adamw(data))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_engine_resumes_bitwise(tmp_path, backend):
    tiny_gpt.assert_resumes_bitwise(_engine, tmp_path, backend)
