"""LAMB (``fp16_triton/lamb.py``, ``kernels/lamb.py``) against a float64 model of DeepSpeed
FusedLamb's update written here, on both backends, fp32 params and fp16/bf16 params with fp32
masters; per-group clipping (``max_grad_norm``); the trust coefficients; launches per step; the
engine training the tiny GPT in fp16 against plain torch's fp32 AdamW; exact resume.

The float64 model (deepspeedai/DeepSpeed: csrc/lamb/fused_lamb_cuda_kernel.cu)::

    m = b1 m + (1 - b1) g ;  v = b2 v + (1 - b2) g g
    update = m / (sqrt(v) + eps) + wd p             (eps_inside_sqrt: m / sqrt(v + eps) + wd p)
    coeff = clamp(clamp(||p|| / ||update||, max=max_coeff), min=min_coeff), 1 if a norm is 0
    p = p - lr sqrt(1 - b2^t) / (1 - b1^t) coeff update       (lr alone without bias correction)

Tolerances, one step at a time (the model restarts from the kernel's fp32 state), with
``u = 2**-24`` the fp32 unit roundoff:
- ``m``, ``v``: each is two products and a sum (3 roundings, fewer with a fused multiply-add)
  of fp32-rounded constants (1 more) and of a grad that the unscale and clip factors (each a
  few roundings: 1/scale, sqrt, +1e-6, division) put within 6u of the model's: within 16u of
  ``|b m| + |(1 - b) g|`` (``|b v| + |(1 - b) g g|``).
- the weight, from the model's update of the kernel's new ``m`` and ``v``: an element of the
  update is 5 roundings (sqrt, +eps, division, decay product, sum): within 5u of ``U = |m /
  denom| + |wd p|``. A squared norm is a sum of n non-negative terms: within ``(n - 1) u`` of
  the exact sum in any order (Higham, "Accuracy and Stability of Numerical Algorithms", 4.2;
  the kernel's tree and torch's own order alike), its elements within 10u; the coefficient,
  a quotient of two square roots, is then within ``(n + 16) u`` of the model's, and the step
  size (lr rounded to fp32, fp64 bias corrections, one rounding) within 4u more. So the weight
  is within ``2u |p'| + (n + 24) u s U`` of the model (``s = step_size * coeff``: the subtraction
  and the product's roundings, then the scale's and the update's errors).
- the coefficient (``coeffs``): within ``(n + 16) u``, exactly the bound where it is clamped.
- a fp16/bf16 param with a master is exactly the master rounded to nearest-even.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import tiny_gpt
import torch
from comparing import assert_bitwise, master_rounded
from comparing import one_thread as one_thread  # noqa: F401  (autouse: one CPU thread)

import fp16_triton
from fp16_triton.lamb import ALGORITHM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not installed
from bench.timing import count_triton_launches  # noqa: E402
from fp16_triton.train import GPTConfig, TinyGPT  # noqa: E402

U = 2.0**-24
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SIZES = (1, 1100, 4097)  # across a 1024-element block and a 4096-element chunk
SCALES = (1e-4, 1.0, 100.0)  # weights: coeff clamped at min_coeff, free, clamped at max_coeff
HYPER = dict(lr=2e-3, beta1=0.9, beta2=0.99, max_coeff=10.0, min_coeff=0.01)
VARIANTS = {  # one of each option, and the loss scale and clipping folded in
    "plain": dict(eps=1e-8, weight_decay=0.01, bias_correction=True, eps_inside_sqrt=False),
    "scaled-clipped": dict(eps=1e-6, weight_decay=0.0, bias_correction=False,
                           eps_inside_sqrt=True),
}  # fmt: skip


def model_update(p, m, v, eps, weight_decay, eps_inside_sqrt, **_):
    denom = torch.sqrt(v + eps) if eps_inside_sqrt else torch.sqrt(v) + eps
    return m / denom + weight_decay * p, (m / denom).abs() + (weight_decay * p).abs()


def model_coeff(p, update, max_coeff, min_coeff, **_):
    w, u = p.norm().item(), update.norm().item()
    return 1.0 if w == 0 or u == 0 else max(min(w / u, max_coeff), min_coeff)


def model_step_size(t, lr, beta1, beta2, bias_correction, **_):
    return lr * math.sqrt(1 - beta2**t) / (1 - beta1**t) if bias_correction else lr


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_steps_match_the_float64_model(backend, dtype, variant):
    options = dict(HYPER, **VARIANTS[variant])
    b1, b2 = options["beta1"], options["beta2"]
    gen = torch.Generator().manual_seed(0)
    params = [(torch.randn(n, generator=gen) * s).to(dtype) for n, s in zip(SIZES, SCALES)]
    masters = [p.float() for p in params] if dtype != torch.float32 else None
    weights = masters or params
    m, v = [torch.zeros(n) for n in SIZES], [torch.zeros(n) for n in SIZES]
    steps = [torch.zeros(()) for _ in SIZES]
    coeffs = torch.zeros(len(SIZES))
    scaled = variant == "scaled-clipped"
    for step in range(4):
        grads = [torch.randn(n, generator=gen).to(dtype) for n in SIZES]
        if step == 2:  # zero norms: a zero weight (tensor 0), a zero update (tensor 1)
            weights[0].zero_(), params[0].zero_()
            if options["weight_decay"] == 0:
                grads[1].zero_(), m[1].zero_(), v[1].zero_()
        factor = 1.0 / (2.0 + 1e-6) if scaled else 1.0  # norm 2 > max_norm 1: clip 1/2
        g64 = [g.double() * factor for g in grads]
        scaling = {}
        if scaled:  # the grads are given x 1024, with the loss scale
            grads = [(g.float() * 1024).to(dtype) for g in grads]
            scaling = dict(grad_scale=torch.full((), 1024.0), norm_sq=torch.full((), 4.0))
            scaling.update(max_norm=1.0)
        before = [[t.double() for t in ts] for ts in (weights, m, v)]
        ALGORITHM.launch(
            backend, params, grads, m, v, steps, masters=masters, coeffs=coeffs, **options,
            **scaling,
        )()  # fmt: skip
        for i, n in enumerate(SIZES):
            p0, m0, v0 = (b[i] for b in before)
            g = g64[i]
            m_scale = (b1 * m0).abs() + ((1 - b1) * g).abs()
            assert ((m[i].double() - (b1 * m0 + (1 - b1) * g)).abs() <= 16 * U * m_scale).all()
            v_scale = (b2 * v0).abs() + ((1 - b2) * g * g).abs()
            assert ((v[i].double() - (b2 * v0 + (1 - b2) * g * g)).abs() <= 16 * U * v_scale).all()
            update, size = model_update(p0, m[i].double(), v[i].double(), **options)
            coeff = model_coeff(p0, update, **options)
            s = model_step_size(step + 1, **options) * coeff
            want = p0 - s * update
            tol = 2 * U * want.abs() + (n + 24) * U * s * size
            err = (weights[i].double() - want).abs()
            assert (err <= tol).all(), f"weight {i} step {step}: {(err / tol).max().item()}"
            clamped = coeff in (options["max_coeff"], options["min_coeff"], 1.0)
            got = coeffs[i].item()
            if clamped:  # the bound itself, as fp32
                assert got == torch.tensor(coeff, dtype=torch.float32).item()
            else:
                assert abs(got - coeff) <= (n + 16) * U * coeff
            if masters:
                rounded = master_rounded(masters[i], dtype)
                assert_bitwise(params[i], rounded, f"param {i} = rounded master")
        assert [t.item() for t in steps] == [step + 1.0] * len(SIZES)
        if step == 0:  # the three regimes are reached
            assert coeffs[0].item() == torch.tensor(0.01).item() and coeffs[2] == 10
            assert 0.01 < coeffs[1] < 10
        if step == 2:
            assert coeffs[0] == 1.0 and (coeffs[1] == 1.0) == (options["weight_decay"] == 0)


def _two_group_model(dtype=torch.float16):
    """Params whose buckets do not follow group order: odd sizes and aligned ones alternate."""
    torch.manual_seed(0)
    a, b, c = (torch.nn.Parameter(torch.randn(n).to(dtype)) for n in (3, 16, 5))
    d = torch.nn.Parameter(torch.randn(24).to(dtype))
    return [a, b, c], [d]


def _set_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_max_grad_norm_clips_each_group_by_its_own_norm_and_coeffs_follow_group_order(backend):
    """Group 0 (three params in two buckets: the norm is summed on the device) is clipped by
    its own norm to 0.5, group 1 is not clipped; FP16Optimizer's loss scale is divided out
    first. ``m = (1 - b1) g_clipped`` after one step: within 16u, as in the test above (the
    norm's own error is within the (n - 1) u of a sum of n terms, here under 8u)."""
    first, second = _two_group_model()
    lamb = fp16_triton.Lamb(
        [{"params": first, "max_grad_norm": 0.5}, {"params": second}], lr=1e-2, backend=backend
    )
    opt = fp16_triton.FP16Optimizer(lamb, loss_scaler=fp16_triton.LossScaler(1024.0))
    _set_grads(first + second, 1)
    grads = [p.grad.double() for p in first + second]
    for p in first + second:
        p.grad = (p.grad.float() * 1024).half()
    before = [p.double() for p in first + second]
    opt.step()
    norm = math.sqrt(sum((g**2).sum().item() for g in grads[:3]))
    clip = min(1.0, 0.5 / (norm + 1e-6))
    assert clip < 0.5  # the clipping acts
    for i, (p, g) in enumerate(zip(first + second, grads)):
        want = 0.1 * g * (clip if i < 3 else 1.0)
        got = lamb.state[p]["exp_avg"].double()
        assert ((got - want).abs() <= 16 * U * want.abs()).all(), i
    want = []
    for p, w in zip(first + second, before):
        state = lamb.state[p]
        update = state["exp_avg"].double() / (state["exp_avg_sq"].double().sqrt() + 1e-8)
        want.append(model_coeff(w, update, 10.0, 0.01))
    got = lamb.get_lamb_coeffs()
    assert got.dtype == torch.float32 and got.shape == (4,)
    for n, c, w in zip((3, 16, 5, 24), got.tolist(), want):
        assert abs(c - w) <= (n + 16) * U * w


def test_functional_lamb_is_the_class_step():
    from fp16_triton.functional import lamb_

    first, second = _two_group_model(torch.float32)
    params = first + second
    twin = [p.detach().clone() for p in params]
    opt = fp16_triton.Lamb(params, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    _set_grads(params, 6)
    opt.step()
    zeros = lambda: [torch.zeros_like(p) for p in twin]  # noqa: E731
    steps = [torch.zeros(()) for _ in twin]
    grads = [p.grad for p in params]
    lamb_(twin, grads, zeros(), zeros(), steps, lr=1e-2, beta1=0.8, beta2=0.95, eps=1e-8,
          weight_decay=0.1)  # fmt: skip
    for p, t in zip(params, twin):
        assert_bitwise(p.detach(), t, "class vs functional")


def test_max_grad_norm_with_fp16_optimizer_clipping_is_refused_before_anything_is_written():
    first, second = _two_group_model()
    lamb = fp16_triton.Lamb(first + second, max_grad_norm=1.0, backend="triton")
    opt = fp16_triton.FP16Optimizer(lamb, clip_grad=1.0)
    _set_grads(first + second, 2)
    before = [p.clone() for p in first + second]
    with pytest.raises(ValueError, match="use one of them"):
        opt.step()
    for p, b in zip(first + second, before):
        assert_bitwise(p.detach(), b, "a refused step")
    assert all(lamb.state[p]["step"] == 0 for p in first + second if p in lamb.state)


def test_flat_buffers_are_refused():
    with pytest.raises(ValueError, match="per-param norms"):
        fp16_triton.Lamb([torch.nn.Parameter(torch.zeros(4))], flat_buffers=True)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_skipped_step_empty_param_and_state_dict_round_trip(backend):
    first, second = _two_group_model()
    empty = torch.nn.Parameter(torch.zeros(0, dtype=torch.float16))
    params = first + second + [empty]
    make = lambda: fp16_triton.Lamb(params, lr=1e-2, weight_decay=0.01, backend=backend)  # noqa: E731
    opt = make()
    _set_grads(params, 3)
    opt.step()
    coeffs = opt.get_lamb_coeffs()
    assert coeffs[-1] == 1.0  # the empty param: both norms are 0
    state = opt.state[first[0]]
    assert set(state) == {"step", "exp_avg", "exp_avg_sq", "master_param"}
    assert opt.state[empty]["step"] == 1  # stepped, though it has no element
    opt.grad_scale, opt.found_inf = torch.ones(()), torch.ones(())  # GradScaler's skip
    before = [t.clone() for t in (*params, *state.values())]
    opt.step()
    for t, b in zip((*params, *state.values()), before):
        assert_bitwise(t.detach(), b, "after a skipped step")
    assert_bitwise(opt.get_lamb_coeffs(), coeffs, "coefficients after a skipped step")
    del opt.grad_scale, opt.found_inf  # as GradScaler does after its step
    again = make()
    again.load_state_dict(opt.state_dict())
    for p in params:
        assert_bitwise(again.state[p], opt.state[p], "loaded state")
    twin = [p.detach().clone() for p in params]
    _set_grads(params, 4)
    opt.step()
    stepped = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, t in zip(params, twin):
            p.copy_(t)
    again.step()  # the same grads, from the loaded state
    for p, s in zip(params, stepped):
        assert_bitwise(p.detach(), s, "a step from the loaded state")


def test_launches_per_step_do_not_depend_on_the_number_of_tensors():
    """Two launches (norms, update) for 1 tensor or 12; a group with max_grad_norm adds its
    read pass (one launch per dtype bucket)."""
    counts = {}
    for n_tensors, clip in ((1, 0.0), (12, 0.0), (1, 1.0), (12, 1.0)):
        params = [torch.nn.Parameter(torch.randn(96 // n_tensors).half()) for _ in range(n_tensors)]
        opt = fp16_triton.Lamb(params, max_grad_norm=clip, backend="triton")
        _set_grads(params, 5)
        with count_triton_launches() as counter:
            opt.step()
        counts[(n_tensors, clip)] = counter["launches"]
    assert counts == {(1, 0.0): 2, (12, 0.0): 2, (1, 1.0): 3, (12, 1.0): 3}


def test_the_config_takes_deepspeed_lamb_params_and_refuses_max_grad_norm():
    from fp16_triton.config import ConfigError, load_config

    given = {"lr": 1e-3, "bias_correction": False, "max_coeff": 5.0, "eps_inside_sqrt": True}
    cfg = load_config({"optimizer": {"type": "lamb", "params": given}})
    assert cfg.optimizer.type == "Lamb"
    assert cfg.optimizer.params == {
        "lr": 1e-3, "bias_correction": False, "betas": (0.9, 0.999), "eps": 1e-8,
        "eps_inside_sqrt": True, "weight_decay": 0.0, "max_grad_norm": 0.0, "max_coeff": 5.0,
        "min_coeff": 0.01, "master_weights": True,
    }  # fmt: skip
    with pytest.raises(ConfigError, match="gradient_clipping"):
        load_config({"optimizer": {"type": "Lamb", "params": {"max_grad_norm": 1.0}}})


# ----------------------------------------------------------------------- the engine, end to end
LAMB = {"lr": 3e-2, "weight_decay": 0.01}  # 10x AdamW's lr: the trust ratio sets the scale


def _engine(backend="auto"):
    config = tiny_gpt.fp16_config({"type": "Lamb", "params": LAMB})
    return fp16_triton.initialize(model=TinyGPT(GPTConfig()), config=config, backend=backend)[0]


def test_engine_trains_the_tiny_gpt_in_fp16_within_5_percent_of_fp32_adamw():
    """LAMB in fp16 with dynamic loss scaling ends within 5% of plain torch fp32 AdamW's final
    loss (figures: bench/results/2026-11-29-cpu.md). Backend "auto": the reference on CPU,
    where the interpreter would take minutes; the kernels are pinned to the float64 model above
    and to the reference by the resume test below."""
    data = tiny_gpt.batches(tiny_gpt.STEPS)
    engine, ours = tiny_gpt.engine_run(_engine, data)
    tiny_gpt.assert_within_5_percent(engine, ours, tiny_gpt.torch_fp32_adamw(data))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_engine_resumes_bitwise(tmp_path, backend):
    tiny_gpt.assert_resumes_bitwise(_engine, tmp_path, backend)
