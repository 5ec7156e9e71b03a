"""``fp16_triton.fp16_utils`` against Apex's semantics (NVIDIA/apex: apex/fp16_utils), written
out here, and the cast-copy kernel bit for bit against ``torch.Tensor.to``.

Every helper runs on both backends: Triton (the interpreter, conftest.py) and the torch
reference, chosen with ``FP16_TRITON_BACKEND``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fp16_triton import fp16_utils as U
from fp16_triton import functional
from fp16_triton.backend import BACKEND_ENV
from fp16_triton.kernels import cast_copy, reference

FLOATS = (torch.float16, torch.bfloat16, torch.float32)
INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, request.param)
    return request.param


def assert_same_bits(a: torch.Tensor, b: torch.Tensor):
    """Bitwise equality, NaN matching any NaN: GPUs, numpy and torch each write their own NaN
    payload (and sign), which no consumer reads."""
    assert a.dtype == b.dtype and a.shape == b.shape
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    assert torch.equal(nan_a, nan_b)
    bits_a, bits_b = a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype])
    assert torch.equal(bits_a[~nan_a], bits_b[~nan_b])


# --------------------------------------------------------------------------------------------
# The cast-copy kernel
# --------------------------------------------------------------------------------------------


def every_16_bit_pattern(dtype):
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


def hard_fp32_values():
    """Every fp16 and bf16 value, the midpoints between neighbours (ties: to even), the points
    just either side of them, and special values: inf, nan, -0, beyond fp16's range (65520
    rounds to inf, 65519.996 to 65504), fp16 and fp32 subnormals, beyond bf16's range."""
    values = []
    for dtype in (torch.float16, torch.bfloat16):
        v = every_16_bit_pattern(dtype).double()
        v = v[torch.isfinite(v)].unique()
        mid = (v[1:] + v[:-1]) / 2  # exact in fp32: one more bit than the 16-bit formats
        values += [v, mid, torch.nextafter(mid.float(), torch.tensor(math.inf)).double()]
        values += [torch.nextafter(mid.float(), torch.tensor(-math.inf)).double()]
    special = [math.inf, -math.inf, math.nan, -0.0, 65520.0, 65519.996, 2.0**-25, 2.0**-26]
    special += [3 * 2.0**-26, 1e-40, -1e-45, 3.4e38, -3.39e38, torch.finfo(torch.float32).max]
    values.append(torch.tensor(special, dtype=torch.float64))
    return torch.cat(values).float()


@pytest.mark.parametrize("src_dtype", FLOATS)
@pytest.mark.parametrize("dst_dtype", FLOATS)
def test_cast_copy_bitwise_like_torch_to(src_dtype, dst_dtype):
    if src_dtype == torch.float32:
        source = hard_fp32_values()
    else:
        source = every_16_bit_pattern(src_dtype)  # exhaustive
    for fn in (cast_copy.cast_copy_, reference.cast_copy_):
        dst = torch.empty(source.shape, dtype=dst_dtype)
        fn([dst], [source])
        assert_same_bits(dst, source.to(dst_dtype))


def test_cast_copy_sizes_layouts_and_groups_in_one_call():
    """Sizes across block (1024) and chunk (4096) boundaries, an unaligned view, a
    channels_last pair and every dtype pair in one call: one launch per pair group."""
    gen = torch.Generator().manual_seed(0)
    srcs, dsts = [], []
    sizes = (0, 1, 7, 1023, 1024, 1025, 4097)
    for i, n in enumerate(sizes):
        src_dtype, dst_dtype = FLOATS[i % 3], FLOATS[(i + 1 + i // 3) % 3]
        srcs.append((torch.randn(n, generator=gen) * 100).to(src_dtype))
        dsts.append(torch.full((n,), 7.0, dtype=dst_dtype))
    base = torch.randn(1001, generator=gen)
    srcs.append(base[1:])  # 4-byte aligned only, 1000 elements: the unaligned variant
    dsts.append(torch.empty(1001, dtype=torch.float16)[1:])
    image = torch.randn(2, 3, 5, 5, generator=gen).to(memory_format=torch.channels_last)
    srcs.append(image.half())
    dsts.append(torch.empty_like(image))
    cast_copy.cast_copy_(dsts, srcs)
    for d, s in zip(dsts, srcs):
        assert_same_bits(d, s.to(d.dtype))


def test_cast_copy_checks_everything_before_writing():
    good_dst, good_src = torch.zeros(10), torch.ones(10, dtype=torch.float16)
    with pytest.raises(ValueError, match="elements"):
        cast_copy.cast_copy_(
            [good_dst, torch.zeros(3, dtype=torch.float16)], [good_src, torch.ones(4)]
        )
    assert torch.equal(good_dst, torch.zeros(10))  # the first group was not copied
    with pytest.raises(TypeError, match="float16, bfloat16 and float32"):
        cast_copy.cast_copy_([torch.zeros(3)], [torch.ones(3, dtype=torch.float64)])


# --------------------------------------------------------------------------------------------
# Model conversion (Apex: fp16util.py)
# --------------------------------------------------------------------------------------------


def zoo():
    return nn.Sequential(
        nn.Linear(4, 4),
        nn.BatchNorm1d(4),  # affine: stays fp32 in Apex
        nn.BatchNorm1d(4, affine=False),  # not affine: converted in Apex
        nn.LayerNorm(4),  # converted in Apex
        nn.GroupNorm(2, 4),
    )


def test_network_to_half_keeps_affine_batch_norm_fp32():
    net = zoo()
    weight = net[0].weight
    half = U.network_to_half(net)
    assert isinstance(half, nn.Sequential) and isinstance(half[0], U.tofp16)
    assert half[1] is net and net[0].weight is weight  # in place, identities kept
    assert net[0].weight.dtype == torch.float16
    assert {
        t.dtype for t in [*net[1].parameters(), *net[1].buffers()] if t.is_floating_point()
    } == {torch.float32}
    for i in (2, 3, 4):
        tensors = [*net[i].parameters(), *net[i].buffers()]
        assert all(t.dtype == torch.float16 for t in tensors if t.is_floating_point())
    assert half[0](torch.ones(2)).dtype == torch.float16


def test_convert_network_converts_params_grads_buffers_but_not_affine_batch_norm():
    net = zoo()
    net[0].weight.grad = torch.ones(4, 4)
    weight = net[0].weight
    assert U.convert_network(net, torch.bfloat16) is net
    assert net[0].weight is weight and weight.dtype == torch.bfloat16
    assert weight.grad.dtype == torch.bfloat16
    assert net[1].weight.dtype == torch.float32 and net[1].running_mean.dtype == torch.float32
    assert net[1].num_batches_tracked.dtype == torch.int64  # integers untouched
    assert net[2].running_var.dtype == torch.bfloat16 and net[3].weight.dtype == torch.bfloat16


def test_convert_network_reflattens_rnns(monkeypatch):
    calls = []
    lstm = nn.LSTM(3, 4)
    monkeypatch.setattr(nn.LSTM, "flatten_parameters", lambda self: calls.append(self))
    U.convert_network(nn.Sequential(lstm), torch.float16)
    assert calls == [lstm] and lstm.weight_ih_l0.dtype == torch.float16


def test_fp16_model_casts_inputs_and_network():
    model = U.FP16Model(nn.Linear(4, 3))
    assert model.network.weight.dtype == torch.float16
    assert model(torch.ones(2, 4)).dtype == torch.float16


def test_to_python_float_and_clip_grad_norm():
    assert U.to_python_float(torch.tensor(2.5)) == 2.5
    assert U.to_python_float([3.0, 4.0]) == 3.0
    assert U.clip_grad_norm is functional.clip_grad_norm_


# --------------------------------------------------------------------------------------------
# Master params (Apex: prep_param_lists, model_grads_to_master_grads, master_params_to_...)
# --------------------------------------------------------------------------------------------


def half_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).half()
    model[0].bias.requires_grad_(False)  # not a model param for Apex: requires no grad
    return model


@pytest.mark.parametrize("flat", [False, True])
def test_prep_param_lists_like_apex(backend, flat):
    model = half_model()
    model_params, masters = U.prep_param_lists(model, flat_master=flat)
    expected = [p for p in model.parameters() if p.requires_grad]
    assert len(model_params) == 3 and all(a is b for a, b in zip(model_params, expected))
    if flat:
        (master,) = masters
        assert isinstance(master, nn.Parameter) and master.requires_grad
        assert torch.equal(
            master.detach(), torch.cat([p.detach().float().reshape(-1) for p in expected])
        )
        assert torch.equal(master.grad, torch.zeros_like(master))
    else:
        for p, m in zip(expected, masters):
            assert m.dtype == torch.float32 and m.requires_grad and m.is_leaf and m.grad is None
            assert torch.equal(m.detach(), p.detach().float())  # exact upcast
            assert m.data_ptr() != p.data_ptr()


def test_model_grads_to_master_grads_like_apex(backend):
    model = half_model()
    model_params, masters = U.prep_param_lists(model)
    gen = torch.Generator().manual_seed(1)
    for p in model_params:
        p.grad = (torch.randn(p.shape, generator=gen) * 1000).half()
    model_params[1].grad = None
    masters[1].grad = torch.ones_like(masters[1])
    U.model_grads_to_master_grads(model_params, masters)
    assert masters[1].grad is None  # Apex: a model param without grad clears its master's
    kept = masters[0].grad
    for p, m in zip(model_params, masters):
        if p.grad is not None:
            assert_same_bits(m.grad, p.grad.float())
    model_params[0].grad.mul_(2)
    U.model_grads_to_master_grads(model_params, masters)
    assert masters[0].grad is kept  # Apex copies into an existing master grad
    assert_same_bits(kept, model_params[0].grad.float())


def test_model_grads_to_flat_master_grads(backend):
    model = half_model()
    model_params, masters = U.prep_param_lists(model, flat_master=True)
    for i, p in enumerate(model_params):
        p.grad = torch.full(p.shape, float(i) + 0.5, dtype=torch.float16)
    masters[0].grad = None  # an optimizer's zero_grad() (set_to_none): made again
    U.model_grads_to_master_grads(model_params, masters, flat_master=True)
    assert_same_bits(masters[0].grad, torch.cat([p.grad.float().reshape(-1) for p in model_params]))
    model_params[2].grad = None
    with pytest.raises(ValueError, match=r"model_params\[2\]"):
        U.model_grads_to_master_grads(model_params, masters, flat_master=True)


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_master_params_to_model_params_rounds_like_copy(backend, flat, dtype):
    model = half_model().to(dtype)
    model_params, masters = U.prep_param_lists(model, flat_master=flat)
    before = [p for p in model.parameters()]
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in masters:
            m.copy_(torch.randn(m.shape, generator=gen) * 3e4)  # fp16 range edge: inf too
    U.master_params_to_model_params(model_params, masters, flat_master=flat)
    assert all(a is b for a, b in zip(model.parameters(), before))
    flat_values = torch.cat([m.detach().reshape(-1) for m in masters])
    expected = flat_values.split([p.numel() for p in model_params])
    for p, e in zip(model_params, expected):
        assert_same_bits(p.detach(), e.reshape(p.shape).to(dtype))


def test_channels_last_params_copy_in_logical_order(backend):
    conv = nn.Conv2d(3, 4, 3).half().to(memory_format=torch.channels_last)
    model_params, masters = U.prep_param_lists(conv, flat_master=True)
    assert torch.equal(masters[0][: conv.weight.numel()].view(4, 3, 3, 3), conv.weight.float())
    conv.weight.grad = torch.randn(4, 3, 3, 3).half().to(memory_format=torch.channels_last)
    conv.bias.grad = torch.randn(4).half()
    U.model_grads_to_master_grads(model_params, masters, flat_master=True)
    assert torch.equal(
        masters[0].grad[: conv.weight.numel()].view(4, 3, 3, 3), conv.weight.grad.float()
    )


# --------------------------------------------------------------------------------------------
# The Apex-era loop, end to end, against the same loop written by hand in float32 masters
# --------------------------------------------------------------------------------------------


def batches(n=4):
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(6, 8, generator=gen), torch.randn(6, 4, generator=gen)) for _ in range(n)]


@pytest.mark.parametrize("flat", [False, True])
def test_apex_era_loop_equals_hand_written_fp32_master_loop(backend, flat):
    scale = 128.0
    ours = U.network_to_half(half_model())
    model_params, master_params = U.prep_param_lists(ours, flat_master=flat)
    optimizer = torch.optim.SGD(master_params, lr=0.05, momentum=0.9)

    hand = U.network_to_half(half_model())  # the same initial weights (seeded)
    hand_params = [p for p in hand.parameters() if p.requires_grad]
    hand_masters = [p.detach().clone().float().requires_grad_() for p in hand_params]
    hand_opt = torch.optim.SGD(hand_masters, lr=0.05, momentum=0.9)

    for x, y in batches():
        ours.zero_grad()
        loss = nn.functional.mse_loss(ours(x).float(), y)
        (loss * scale).backward()
        U.model_grads_to_master_grads(model_params, master_params, flat_master=flat)
        for p in master_params:
            p.grad.mul_(1.0 / scale)
        optimizer.step()
        U.master_params_to_model_params(model_params, master_params, flat_master=flat)

        hand.zero_grad()
        (nn.functional.mse_loss(hand(x).float(), y) * scale).backward()
        for p, m in zip(hand_params, hand_masters):
            m.grad = p.grad.float() * (1.0 / scale)
        hand_opt.step()
        with torch.no_grad():
            for p, m in zip(hand_params, hand_masters):
                p.copy_(m)
    # Bit for bit: the same fp32 math, the copies exact (upcast) or rounded as copy_ rounds.
    for p, q in zip(model_params, hand_params):
        assert torch.equal(p, q)
    flat_masters = torch.cat([m.detach().reshape(-1) for m in master_params])
    assert torch.equal(flat_masters, torch.cat([m.detach().reshape(-1) for m in hand_masters]))
    assert not torch.equal(hand_masters[0], hand_params[0].float())  # it trained in fp32


# --------------------------------------------------------------------------------------------
# Loss scalers and FP16_Optimizer with Apex's arguments
# --------------------------------------------------------------------------------------------


def apex_dynamic_scales(overflows, init_scale, factor, window):
    """Apex's DynamicLossScaler.update_scale rule, written out."""
    scale, cur_iter, last_overflow = init_scale, 0, -1
    scales = []
    for overflow in overflows:
        if overflow:
            scale = max(scale / factor, 1)
            last_overflow = cur_iter
        elif (cur_iter - last_overflow) % window == 0:
            scale *= factor
        cur_iter += 1
        scales.append(scale)
    return scales


def test_dynamic_loss_scaler_apex_arguments_and_rule():
    scaler = U.DynamicLossScaler()
    assert scaler.loss_scale == 2.0**32 and scaler.scale_window == 1000
    assert scaler.hysteresis == 1 and scaler.min_scale == 1.0
    overflows = [False] * 5 + [True] + [False] * 7 + [True] * 12
    scaler = U.DynamicLossScaler(init_scale=2.0**10, scale_factor=2.0, scale_window=3)
    ours = []
    for overflow in overflows:
        scaler.update_scale(overflow)
        ours.append(scaler.loss_scale)
    apex = apex_dynamic_scales(overflows, 2.0**10, 2.0, 3)
    # Overflows halve at once, down to 1 without raising, as Apex; growths come one iteration
    # later than Apex's (DeepSpeed's rule), documented in fp16_utils' docstring.
    assert ours[-1] == apex[-1] == 1.0
    growth_ours = [i for i in range(1, len(ours)) if ours[i] > ours[i - 1]]
    growth_apex = [i for i in range(1, len(apex)) if apex[i] > apex[i - 1]]
    assert growth_ours == [i + 1 for i in growth_apex]


def test_loss_scalers_has_overflow():
    p = nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([1.0, math.inf, 0.0])
    assert U.LossScaler(8.0).has_overflow([p]) is False  # Apex: a static scale never checks
    assert U.DynamicLossScaler().has_overflow([p]) is True
    p.grad = torch.ones(3)
    assert U.DynamicLossScaler().has_overflow([p]) is False


def test_fp16_optimizer_with_apex_arguments():
    from fp16_triton import FP16Optimizer

    model = nn.Linear(4, 2)
    opt = U.FP16_Optimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        dynamic_loss_scale=True,
        dynamic_loss_args={"init_scale": 2.0**8, "scale_window": 10},
    )
    assert isinstance(opt, FP16Optimizer) and isinstance(opt.loss_scaler, U.DynamicLossScaler)
    assert opt.loss_scale == 2.0**8
    static = U.FP16_Optimizer(torch.optim.SGD(model.parameters(), lr=0.1), static_loss_scale=4.0)
    assert static.loss_scale == 4.0 and not static.loss_scaler.dynamic
    twin = nn.Linear(4, 2)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(3, 4)
    opt.backward(model(x).square().sum(), update_master_grads=True)
    opt.step()
    grad = torch.autograd.grad(twin(x).square().sum(), twin.weight)[0]
    expected = twin.weight.detach() - 0.1 * grad
    # Scaling by 2^8 and back is exact; torch.optim.SGD rounds w - lr * g once or twice (its
    # add with alpha) where this rounds twice: 1 ulp of |w| <= 0.5 (6e-8) at most.
    torch.testing.assert_close(model.weight, expected, rtol=0, atol=6e-8)
