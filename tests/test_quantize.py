"""The 8-bit moment codes (``kernels/quantize.py``): against every code's value computed here
from the formats' definitions in float64, error bounds over random blocks across 2^-24..2^24
(hypothesis), and the Triton device functions bit for bit against the torch references.

Bounds (derived, not fitted): a code is the nearest of a 4-mantissa-bit format, so its value is
within half a code step of ``y = |m| / s``: 2^-5 of ``y`` for normal codes (the step is 2^-4
of the binade's bottom), 2^-11 (signed) or 2^-19 (root) absolute for subnormal ones; ``y``
itself carries one fp32 rounding (2^-24 relative) and the product with ``s`` another.
"""

from __future__ import annotations

import pytest
import torch
from exploring import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from fp16_triton.kernels import quantize as q


def code_values(signed: bool) -> torch.Tensor:
    """Every code's value in float64, from the definition: E3M4 bias 7 (signed magnitudes,
    128 codes) or E4M4 bias 15 (roots, 256 codes), subnormals at exponent 0; the top two
    codes (above 1.0, never a finite value's) stand for NaN and infinity."""
    mantissa, bias, count = (4, 7, 128) if signed else (4, 15, 256)
    values = []
    for c in range(count):
        e, f = c >> mantissa, c & (2**mantissa - 1)
        if e == 0:
            values.append(f / 2**mantissa * 2.0 ** (1 - bias))
        else:
            values.append((1 + f / 2**mantissa) * 2.0 ** (e - bias))
    values[-2:] = [float("nan"), float("inf")]
    return torch.tensor(values, dtype=torch.float64)


def nearest_code(y: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The code whose value is nearest to each ``y`` (float64 distances), ties to the even
    code; codes above 1.0 never chosen (``y <= 1``)."""
    usable = values[values <= 1.0]
    d = (y.double()[:, None] - usable[None, :]).abs()
    best = d.min(dim=1, keepdim=True).values
    ties = d == best
    index = torch.arange(len(usable))
    even = ties & (index % 2 == 0)[None, :]
    return torch.where(even.any(dim=1), even.int().argmax(dim=1), ties.int().argmax(dim=1))


def random_block(seed: int, n: int = q.BLOCK, signed: bool = True) -> torch.Tensor:
    """Values whose magnitudes span 2^-24..2^24 (log-uniform), zeros and equal pairs."""
    g = torch.Generator().manual_seed(seed)
    magnitude = torch.exp2(torch.rand(n, generator=g) * 48 - 24)
    if signed:
        magnitude = magnitude * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    magnitude[:3] = 0.0
    return magnitude.float()


@settings(max_examples=examples(40), deadline=None)
@given(seed=st.integers(0, 2**31), spread=st.integers(0, 40))
def test_signed_codes_are_the_nearest_and_within_the_bound(seed, spread):
    m = random_block(seed)
    m = m / m.abs().max() * 2.0 ** (spread - 20)  # blocks of any overall magnitude
    s = m.abs().max()
    code = q.quantize_signed_reference(m, s)
    y = (m.abs() / s).float()
    want = nearest_code(y, code_values(signed=True))
    got = code.to(torch.int32) & 0x7F
    assert torch.equal(got, want), "not the nearest code"
    back = q.dequantize_signed_reference(code, s)
    assert ((back == 0) | (torch.sign(back) == torch.sign(m))).all(), "a sign flipped"
    err = (back.double() - m.double()).abs()
    bound = (2.0**-5 + 2.0**-22) * m.double().abs() + 2.0**-11 * s.double()
    assert (err <= bound).all()
    top = m.abs().argmax()
    assert back[top] == m[top], "the block maximum is kept exactly"


@settings(max_examples=examples(40), deadline=None)
@given(seed=st.integers(0, 2**31), spread=st.integers(0, 40))
def test_root_codes_keep_sqrt_v_and_never_lose_a_nonzero_v(seed, spread):
    v = random_block(seed, signed=False).square() * 2.0 ** (spread - 20)
    v[5] = v.max() * 2.0**-60  # far below the smallest code: must not become 0
    s = v.max().sqrt()
    code = q.quantize_root_reference(v, s)
    y = (v.sqrt() / s).float()
    nearest = nearest_code(y, code_values(signed=False))
    raised = (v > 0) & (nearest == 0)  # below half the smallest code
    want = torch.where(raised, 1, nearest)
    assert torch.equal(code.to(torch.int32) & 0xFF, want)
    back = q.dequantize_root_reference(code, s)
    assert ((back > 0) == (v > 0)).all(), "a non-zero v became zero (or the reverse)"
    err = (back.double().sqrt() - v.double().sqrt()).abs()
    below = raised  # raised to the smallest code: an overestimate
    bound = (2.0**-5 + 2.0**-21) * v.double().sqrt() + 2.0**-19 * s.double()
    assert (err[~below] <= bound[~below]).all()
    assert (back[below].double() >= v[below].double()).all()


def test_all_zero_blocks_and_every_code_value():
    zeros = torch.zeros(8)
    assert not q.quantize_signed_reference(zeros, zeros.abs().max()).any()
    assert not q.quantize_root_reference(zeros, zeros.max()).any()
    for signed, count in ((True, 128), (False, 256)):
        values = code_values(signed)
        codes = torch.arange(count, dtype=torch.int32)
        codes = torch.where(codes >= 128, codes - 256, codes).to(torch.int8)
        if signed:
            back = q.dequantize_signed_reference(codes, torch.tensor(1.0))
        else:
            back = q.dequantize_root_reference(codes, torch.tensor(1.0)).double().sqrt()
        torch.testing.assert_close(back.double(), values, rtol=0, atol=0, equal_nan=True)


def test_block_scales_cover_partial_blocks():
    x = torch.arange(1, 2 * q.BLOCK + 11, dtype=torch.float32)
    scales = q.block_scales_reference(x)
    assert scales.tolist() == [q.BLOCK, 2 * q.BLOCK, 2 * q.BLOCK + 10]
    assert torch.equal(q.block_scales_reference(x, root=True), scales.sqrt())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_device_functions_are_the_references_bit_for_bit(seed):
    m = random_block(seed)
    v = random_block(seed + 100, signed=False).square()
    v[7] = v.max() * 2.0**-70
    sm, sv = q.block_scales_reference(m), q.block_scales_reference(v, root=True)
    m[10:13] = torch.tensor([float("inf"), -float("inf"), float("nan")])
    v[10:12] = torch.tensor([float("inf"), float("nan")])
    out = q.roundtrip(m, v, sm, sv)
    assert torch.equal(out[0], q.quantize_signed_reference(m, sm))
    assert torch.equal(out[1], q.quantize_root_reference(v, sv))
    same = dict(rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(out[2], q.dequantize_signed_reference(out[0], sm), **same)
    torch.testing.assert_close(out[3], q.dequantize_root_reference(out[1], sv), **same)


@settings(max_examples=examples(40), deadline=None)
@given(
    seed=st.integers(0, 2**31),
    spread=st.integers(0, 40),
    specials=st.lists(st.sampled_from([float("inf"), float("-inf"), float("nan")]), max_size=3),
)
def test_quantizing_dequantized_moments_gives_back_the_same_codes_and_scales(
    seed, spread, specials
):
    """What makes a resume from a sharded (FSDP2) checkpoint bitwise: such a checkpoint holds
    int8 moments dequantized (``int8_state.sharded_export``) and loading quantizes them again.
    Three blocks and a partial one, magnitudes 2^-24..2^24 times 2^(spread - 20), one block
    all zero, infinities and NaN in the first block; exact equality (no tolerance: codes and
    scales must come back bit for bit)."""
    n = 3 * q.BLOCK + 77
    m = torch.cat([random_block(seed + i) for i in range(4)])[:n] * 2.0 ** (spread - 20)
    m[q.BLOCK : 2 * q.BLOCK] = 0.0
    for i, special in enumerate(specials):
        m[10 + i] = special
    v = m.square()
    v[11] = v[q.BLOCK * 2 + 7] * 2.0**-60 if torch.isfinite(v[11]) else v[11]  # raised code
    for values, root in ((m, False), (v.abs(), True)):
        codes = torch.zeros(n, dtype=torch.int8)
        scales = q.scales_for(codes)
        q.quantize_tensor_(codes, scales, values, root)
        back = q.dequantize_tensor(codes, scales, root)
        codes2, scales2 = torch.zeros_like(codes), q.scales_for(codes)
        q.quantize_tensor_(codes2, scales2, back, root)
        assert torch.equal(codes2, codes), f"codes (root={root})"
        assert torch.equal(scales2.view(torch.int32), scales.view(torch.int32)), "scales"
