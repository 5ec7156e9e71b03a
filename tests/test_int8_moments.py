"""``Adam/AdamW(state_dtype="int8")``: moments as 8-bit codes with fp32 block scales
(``kernels/quantize.py``, ``fp16_triton/int8_state.py``).

The step is checked against a model written here: from the stored codes, the kernel's fp32
update (``m + (1 - b1)(g - m)``, ``b2 v + ((1 - b2) g) g``: the same fp32 operations in the
same order, so the same values bit for bit), then the codes of those values under their
blocks' new maxima (``quantize``'s references, themselves checked against the formats'
definitions in ``tests/test_quantize.py``). The kernel's codes and scales must match exactly
(it rounds every operation, fusion off); the torch backend's lerp may differ by an fp32 ulp
(its CPU kernel), so its codes are compared with the kernel's: at most one code apart, in
under 1% of the elements. Weights, whose update has a dozen roundings, within 16 fp32 ulps.
"""

from __future__ import annotations

import copy

import pytest
import tiny_gpt
import torch
from comparing import assert_bitwise
from comparing import one_thread as one_thread  # noqa: F401  (autouse: one CPU thread)

import fp16_triton
from fp16_triton.kernels import quantize as q
from fp16_triton.train import GPTConfig, TinyGPT

BF16 = torch.bfloat16
LR, BETAS, EPS, WD = 1e-2, (0.9, 0.999), 1e-8, 0.1
# Across a quantization block and a launch chunk; exactly SMALL; a transposed layout (fp32
# moments: blocks follow row-major order, so only contiguous params get int8); small.
SHAPES = [(4096 + 300,), (4096,), (90, 70), (100,)]


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(BF16) for s in SHAPES]
    params[2] = params[2].t().contiguous().t()  # column-major: blocks follow memory
    return [torch.nn.Parameter(p) for p in params]


def grads_for(params, g):
    out = []
    for p in params:
        grad = torch.empty_like(p)
        grad.copy_(torch.randn(p.shape, generator=g))
        out.append(grad)
    return out


def model_moments(codes_m, scales_m, codes_v, scales_v, grad):
    """The kernel's fp32 moments from stored codes, then their new codes and scales."""
    m = q.dequantize_tensor(codes_m, scales_m, root=False)
    v = q.dequantize_tensor(codes_v, scales_v, root=True)
    g = grad.float()
    one_minus_b1 = torch.tensor(1 - BETAS[0], dtype=torch.float32)
    one_minus_b2 = torch.tensor(1 - BETAS[1], dtype=torch.float32)
    m = m + one_minus_b1 * (g - m)
    v = v * torch.tensor(BETAS[1], dtype=torch.float32) + (one_minus_b2 * g) * g
    out = []
    for values, root in ((m, False), (v, True)):
        codes = torch.empty_like(codes_m)
        scales = torch.empty_like(scales_m)
        q.quantize_tensor_(codes, scales, values, root)
        out += [codes, scales]
    return m, v, out


def test_codes_and_scales_are_the_models_bit_for_bit():
    params = make_params()
    opt = fp16_triton.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD,
                            state_dtype="int8", backend="triton")  # fmt: skip
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        grads = grads_for(params, g)
        before = {p: copy.deepcopy(dict(opt.state.get(p, {}))) for p in params}
        for p, grad in zip(params, grads):
            p.grad = grad
        opt.step()
        for i, (p, grad) in enumerate(zip(params, grads)):
            s = opt.state[p]
            if p.numel() < q.SMALL or not p.is_contiguous():
                assert s["exp_avg"].dtype == torch.float32 and "exp_avg_scale" not in s
                continue
            assert s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.int8
            assert s["exp_avg"].stride() == p.stride()
            b = before[p]
            if not b:  # the first step starts from zero codes and scales
                zeros = torch.zeros_like(p, dtype=torch.int8)
                b = dict(exp_avg=zeros, exp_avg_sq=zeros, exp_avg_scale=q.scales_for(p),
                         exp_avg_sq_scale=q.scales_for(p))  # fmt: skip
            _, _, want = model_moments(b["exp_avg"], b["exp_avg_scale"], b["exp_avg_sq"],
                                       b["exp_avg_sq_scale"], grad)  # fmt: skip
            got = [s["exp_avg"], s["exp_avg_scale"], s["exp_avg_sq"], s["exp_avg_sq_scale"]]
            assert_bitwise(got, want, f"param {i} at step {step}")


def test_the_torch_backend_codes_are_the_kernels_within_one_code():
    runs = []
    for backend in ("triton", "torch"):
        params = make_params()
        opt = fp16_triton.AdamW(params, lr=LR, weight_decay=WD, state_dtype="int8",
                                backend=backend)  # fmt: skip
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            for p, grad in zip(params, grads_for(params, g)):
                p.grad = grad
            opt.step()
        runs.append([opt.state[p] for p in params if "exp_avg_scale" in opt.state[p]])
    for ours, ref in zip(*runs):
        for name in ("exp_avg", "exp_avg_sq"):
            a, b = ours[name].to(torch.int32) & 0xFF, ref[name].to(torch.int32) & 0xFF
            apart = (a - b).abs()
            assert (apart <= 1).all() and (apart > 0).float().mean() < 0.01, name


def test_the_update_uses_the_fp32_moments_and_matches_the_model():
    """One step from stored codes: the weight moves as fp32 AdamW would with the dequantized
    moments updated in fp32 (this step's update uses them before requantization)."""
    params = make_params()
    opt = fp16_triton.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD,
                            state_dtype="int8", backend="triton")  # fmt: skip
    g = torch.Generator().manual_seed(2)
    for p, grad in zip(params, grads_for(params, g)):
        p.grad = grad
    opt.step()
    p = params[0]
    s = copy.deepcopy(dict(opt.state[p]))
    w0 = s["master_param"].double()
    grad = grads_for(params, g)[0]
    p.grad = grad
    opt.step()
    m, v, _ = model_moments(s["exp_avg"], s["exp_avg_scale"], s["exp_avg_sq"],
                            s["exp_avg_sq_scale"], grad)  # fmt: skip
    t = 2
    bc1, bc2 = 1 - BETAS[0] ** t, 1 - BETAS[1] ** t
    want = w0 * (1 - LR * WD) - LR / bc1 * m.double() / (v.double().sqrt() / bc2**0.5 + EPS)
    got = opt.state[p]["master_param"].double()
    ulp = torch.finfo(torch.float32).eps * w0.abs().clamp_min(1e-3)
    assert ((got - want).abs() <= 16 * ulp).all()


def test_bytes_kept_per_param_are_the_traffic_model_and_at_most_4_1():
    """bf16 params, remainder masters, int8 moments: the optimizer state takes 2 + 1 + 1 bytes
    per element plus 8 bytes of scales per 256 (4.03 B/param), measured from the storages."""
    p = torch.nn.Parameter(torch.randn(256 * 40).to(BF16))
    opt = fp16_triton.AdamW([p], master_weights="remainder", state_dtype="int8")
    opt.init_state()
    state_bytes = sum(
        t.untyped_storage().nbytes() for name, t in opt.state[p].items() if name != "step"
    )
    per_param = state_bytes / p.numel()
    from fp16_triton.spec import algorithms

    traffic = algorithms()["adam"].traffic(BF16, master="remainder", state_dtype="int8")
    assert per_param == traffic.kept - 2 - 2 == 4.03125 <= 4.1
    assert traffic.moved + 2 == 16.0625  # with the check pass: 2 + 2 + 4 + 4 + 4 + 1/16
    # Written: the param, its remainder, the codes and the scales, every byte of them.
    tensors = [p.detach()] + [t for name, t in opt.state[p].items() if name != "step"]
    p.grad = torch.randn_like(p)
    opt.step()
    before = [t.clone() for t in tensors]
    p.grad = torch.randn_like(p)
    opt.step()
    changed = [t for t, b in zip(tensors, before) if not torch.equal(t, b)]
    written = sum(t.untyped_storage().nbytes() for t in changed) / p.numel()
    assert written == traffic.written == 2 + 2 + 2 * (1 + 4 / 256)


def test_state_dicts_reload_bitwise_and_export_to_fp32():
    params = make_params()
    opt = fp16_triton.AdamW(params, lr=LR, state_dtype="int8", backend="triton")
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        for p, grad in zip(params, grads_for(params, g)):
            p.grad = grad
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    assert saved["state"][0]["exp_avg"].dtype == torch.int8
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    again = fp16_triton.AdamW(twin, lr=LR, state_dtype="int8", backend="triton")
    again.load_state_dict(saved)
    for _ in range(2):
        grads = grads_for(params, g)
        for ps, o in ((params, opt), (twin, again)):
            for p, grad in zip(ps, grads):
                p.grad = grad.clone()
            o.step()
    assert_bitwise(again.state_dict()["state"], opt.state_dict()["state"])
    exported = fp16_triton.to_fp32_state_dict(opt.state_dict())
    entry = exported["state"][0]
    assert set(entry) == {"step", "exp_avg", "exp_avg_sq", "master_param"}
    s = opt.state[params[0]]
    assert_bitwise(entry["exp_avg"], q.dequantize_tensor(s["exp_avg"], s["exp_avg_scale"], False))
    # torch.optim's fp32 layout loads back into int8 (quantized) and into fp32 moments.
    fp32 = fp16_triton.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=LR)
    fp32.load_state_dict(exported)
    int8 = fp16_triton.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=LR,
                             state_dtype="int8")  # fmt: skip
    int8.load_state_dict(exported)
    loaded = int8.state[int8.param_groups[0]["params"][0]]
    assert_bitwise(loaded["exp_avg"], s["exp_avg"])  # quantizing dequantized codes: the codes


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_loaded_block_scales_must_be_finite_and_non_negative(bad):
    """A scale multiplies its block's 256 codes: one NaN would make the whole block NaN at the
    next step. Refused at load, before anything changes."""
    params = make_params()
    opt = fp16_triton.AdamW(params, lr=LR, state_dtype="int8", backend="torch")
    for p, grad in zip(params, grads_for(params, torch.Generator().manual_seed(3))):
        p.grad = grad
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    before = copy.deepcopy(saved)
    saved["state"][0]["exp_avg_sq_scale"][0] = bad
    with pytest.raises(ValueError, match="finite, non-negative"):
        opt.load_state_dict(saved)
    assert_bitwise(opt.state_dict()["state"], before["state"])


def test_switching_state_dtype_between_steps_converts():
    params = make_params()
    opt = fp16_triton.AdamW(params, lr=LR, backend="torch")
    g = torch.Generator().manual_seed(4)
    for p, grad in zip(params, grads_for(params, g)):
        p.grad = grad
    opt.step()
    fp32_m = opt.state[params[0]]["exp_avg"].clone()
    opt.param_groups[0]["state_dtype"] = "int8"
    opt.step()
    s = opt.state[params[0]]
    assert s["exp_avg"].dtype == torch.int8 and "exp_avg_scale" in s
    opt.param_groups[0]["state_dtype"] = torch.float32
    opt.step()
    assert opt.state[params[0]]["exp_avg"].dtype == torch.float32
    assert "exp_avg_scale" not in opt.state[params[0]]
    assert not torch.equal(opt.state[params[0]]["exp_avg"], fp32_m)


def test_a_float_moment_assigned_into_an_int8_group_is_quantized():
    params = make_params()
    opt = fp16_triton.AdamW(params, lr=LR, state_dtype="int8", backend="torch")
    opt.init_state()
    p = params[0]
    values = torch.randn(p.shape)
    opt.state[p]["exp_avg"] = values
    for q_, grad in zip(params, grads_for(params, torch.Generator().manual_seed(5))):
        q_.grad = torch.zeros_like(grad)
    opt.step()
    s = opt.state[p]
    back = q.dequantize_tensor(s["exp_avg"], s["exp_avg_scale"], False).double()
    want = values.double() * 0.9  # quantized on assignment, decayed, quantized again: twice
    bound = 2 * (2.0**-5 * want.abs() + 2.0**-11 * want.abs().max()) + 1e-7 * want.abs()
    assert ((back - want).abs() <= bound).all()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: fp16_triton.AdamW(p, state_dtype="int8", amsgrad=True), "amsgrad"),
        (lambda p: fp16_triton.Lion(p, state_dtype="int8"), "Adam and AdamW"),
        (lambda p: fp16_triton.SGD(p, lr=0.1, momentum=0.9, state_dtype="int8"), "Adam"),
        (lambda p: fp16_triton.AdamW(p, state_dtype="int4"), "int8"),
    ],
)
def test_what_is_not_built_is_refused_clearly(make, match):
    with pytest.raises(ValueError, match=match):
        make([torch.nn.Parameter(torch.zeros(4096))])


def test_codes_without_scales_are_refused_before_anything_is_written():
    params = make_params()
    opt = fp16_triton.AdamW(params, lr=LR, state_dtype="int8", backend="torch")
    opt.init_state()
    del opt.state[params[0]]["exp_avg_scale"]
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="block scales"):
        opt.step()
    assert_bitwise([p.detach() for p in params], before)


def test_a_skipped_step_writes_no_code_or_scale():
    params = make_params()
    opt = fp16_triton.AdamW(params, lr=LR, state_dtype="int8", backend="triton")
    for p, grad in zip(params, grads_for(params, torch.Generator().manual_seed(6))):
        p.grad = grad
    opt.step()
    before = copy.deepcopy(opt.state_dict()["state"])
    opt.grad_scale = torch.ones(())
    opt.found_inf = torch.ones(())
    opt.step()
    assert_bitwise(opt.state_dict()["state"], before)


@pytest.mark.parametrize("masters", [True, "remainder"])
def test_tiny_gpt_in_bf16_with_int8_moments_is_within_5_percent_of_fp32_adamw(masters):
    """bf16 params with int8 moments (and fp32 or remainder masters) through the engine's
    ``bf16`` section against plain torch fp32 AdamW, same init, data, lr and clipping: final
    loss within 5% (figures: docs/compact-state.md). Reference backend (CPU)."""
    params = {"lr": 3e-3, "weight_decay": 0.01, "state_dtype": "int8", "master_weights": masters}
    config = {"train_micro_batch_size_per_gpu": 16, "gradient_clipping": 1.0,
              "bf16": {"enabled": True}, "steps_per_print": 10**6,
              "optimizer": {"type": "AdamW", "params": params}}  # fmt: skip

    def make_engine(backend):
        return fp16_triton.initialize(model=TinyGPT(GPTConfig()), config=config, backend=backend)[0]

    data = tiny_gpt.batches(tiny_gpt.STEPS)
    engine, ours = tiny_gpt.engine_run(make_engine, data)
    theirs = tiny_gpt.torch_fp32_adamw(data)
    kinds = {str(t.dtype) for s in engine.optimizer.optimizer.state.values() for t in s.values()}
    assert "torch.int8" in kinds
    import warnings

    warnings.warn(f"tiny GPT int8 ({masters}): {tiny_gpt.tail(ours):.4f} vs fp32 "
                  f"{tiny_gpt.tail(theirs):.4f}", stacklevel=1)  # fmt: skip
    assert tiny_gpt.tail(ours) == pytest.approx(tiny_gpt.tail(theirs), rel=0.05)


def test_infinite_and_nan_moments_keep_their_block_finite():
    """A finite grad so large that its v overflows: with fp32 moments that element's v is inf
    and its update 0, the others untouched; int8 codes keep inf (a code of its own) and scale
    the block by its finite values, so the other 4,607 params train on and stay finite."""
    runs = {}
    for dtype in (torch.float32, "int8"):
        p = torch.nn.Parameter(torch.randn(4608, generator=torch.Generator().manual_seed(0)))
        opt = fp16_triton.AdamW([p], lr=1e-3, state_dtype=dtype, backend="triton")
        g = torch.Generator().manual_seed(1)
        for step in range(4):
            p.grad = torch.randn(4608, generator=g)
            if step == 0:
                p.grad[5] = 1e21
            opt.step()
        runs[dtype] = p.detach().clone()
        assert torch.isfinite(p).all(), dtype
    assert runs["int8"][5] == runs[torch.float32][5]  # frozen alike after the overflow
    codes = q.quantize_signed_reference(
        torch.tensor([1.0, -float("inf"), float("nan")]), torch.tensor(1.0)
    )
    back = q.dequantize_signed_reference(codes, torch.tensor(1.0))
    assert back[0] == 1.0 and back[1] == -float("inf") and back[2].isnan()
    v = torch.tensor([4.0, float("inf"), float("nan"), 1e-30])
    back = q.dequantize_root_reference(q.quantize_root_reference(v, torch.tensor(2.0)), 2.0)
    assert back[0] == 4.0 and back[1] == float("inf") and back[2].isnan() and back[3] > 0


def test_codes_made_contiguous_by_a_converter_load_the_same():
    """Blocks follow row-major order and only contiguous params get int8 moments, so a
    state dict whose codes were re-laid (``.contiguous()``, a transpose back and forth) loads
    to the same values; a channels_last param keeps fp32 moments."""
    p = torch.nn.Parameter(torch.randn(64, 80))
    conv = torch.nn.Parameter(torch.randn(16, 8, 6, 6).to(memory_format=torch.channels_last))
    opt = fp16_triton.AdamW([p, conv], lr=LR, state_dtype="int8", backend="torch")
    for t in (p, conv):
        t.grad = torch.randn_like(t)
    opt.step()
    assert opt.state[conv]["exp_avg"].dtype == torch.float32
    sd = copy.deepcopy(opt.state_dict())
    codes = sd["state"][0]["exp_avg"]
    sd["state"][0]["exp_avg"] = codes.t().contiguous().t()  # same values, other strides
    twin = [torch.nn.Parameter(t.detach().clone()) for t in (p, conv)]
    again = fp16_triton.AdamW(twin, lr=LR, state_dtype="int8", backend="torch")
    again.load_state_dict(sd)
    assert_bitwise(again.state[twin[0]]["exp_avg"].contiguous(), opt.state[p]["exp_avg"])
