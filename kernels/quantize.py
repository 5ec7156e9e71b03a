"""8-bit moments (``Adam/AdamW(state_dtype="int8")``): the codes and their block scales; the
optimizer's side is ``fp16_triton/int8_state.py``.

Each tensor is cut into blocks of ``BLOCK`` (256) consecutive elements (row-major order: only
contiguous tensors get int8 moments, so it is their memory order too); a block keeps one fp32
scale (over its finite values) and one 8-bit code per element. Infinities and NaN get codes of
their own, which no finite value uses (above 1.0), so they stay where they are as with fp32
moments and leave their block's other values alone:

- ``exp_avg`` (signed): scale ``s = max |m|`` over the block; code = ``m / s`` as a signed
  8-bit float: sign bit, 3 exponent bits, 4 mantissa bits, top value exactly 1.0 (so the block
  maximum is stored exactly), nearest-even, subnormals down to 2^-10, no infinities.
  Relative error at most 2^-5 (3.1%) down to 2^-6 of the block maximum, absolute at most
  2^-11 of it below.
- ``exp_avg_sq`` (non-negative): scale ``s = sqrt(max v)``; code = ``sqrt(v) / s`` as an
  unsigned 8-bit float: 4 exponent bits, 4 mantissa bits, top value 1.0, nearest-even,
  subnormals down to 2^-18. The update divides by ``sqrt(v)``, so ``sqrt(v)`` is what is kept
  to relative precision (at most 2^-5 of it down to 2^-14 of the block's largest, that is
  2^-28 of the largest ``v``), and a non-zero ``v`` is never stored as zero: below the
  smallest code it becomes the smallest code, an overestimate, so the update it divides
  shrinks instead of growing without bound.

Why these choices: 8-bit floats keep *relative* precision over a range of magnitudes, which a
linear int8 map (absolute error 2^-8 of the block maximum everywhere) does not: small
second moments would round to zero and their updates explode. Integer bit operations round
the same way on GPUs and in the interpreter (no logarithms or lookup tables). Blocks of 256
(torchao's 8-bit optimizers use 256 too) keep scales at 4 bytes per 256 elements (0.016 B per
element per moment) and fit inside every launch block, so one program computes a block's
scale without a second pass; fp32 scales because the block maximum is kept exactly.
``SMALL`` (4096): tensors below it keep fp32 moments (their scales and rounding would buy
little memory and cost accuracy where it is cheap to keep), as torchao's and bitsandbytes'
8-bit optimizers do for small tensors.

Each piece has a Triton device function and a torch reference (the oracle), bit for bit alike.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .multi_tensor import EXACT_ARITHMETIC, QUANT_BLOCK

__all__ = [
    "BLOCK",
    "SMALL",
    "quantize_signed_reference",
    "dequantize_signed_reference",
    "quantize_root_reference",
    "dequantize_root_reference",
]

BLOCK = QUANT_BLOCK
"""Elements per quantization block (one fp32 scale each): 256."""
BLOCK_IN_KERNELS = tl.constexpr(BLOCK)  # the same, as the kernels may read a global
SMALL = 4096
"""Tensors with fewer elements keep fp32 moments."""

# The two formats: (exponent bits, mantissa bits); the bias makes the top code's exponent 0,
# so that the largest finite code is 1.0 (codes above it are never produced).
_SIGNED = (3, 4)
_ROOT = (4, 4)


def _bias(exponent_bits: int) -> int:
    return 2**exponent_bits - 1


@triton.jit
def _to_minifloat(
    y, MANTISSA_BITS: tl.constexpr, REBASE: tl.constexpr, SUB_SCALE: tl.constexpr,
    MIN_NORMAL: tl.constexpr,
):  # fmt: skip
    """The code of fp32 ``y`` in [0, 1]: nearest-even, as an int32. ``REBASE`` is
    ``(127 - bias) << MANTISSA_BITS``, ``SUB_SCALE`` ``2^(bias - 1 + MANTISSA_BITS)``,
    ``MIN_NORMAL`` ``2^(1 - bias)`` (``_FORMATS``)."""
    SHIFT: tl.constexpr = 23 - MANTISSA_BITS
    bits = y.to(tl.int32, bitcast=True)
    # Normal codes: drop the low SHIFT bits of the fp32 pattern to nearest-even (a carry moves
    # into the exponent, as it should), then rebase the exponent.
    kept = (bits + ((1 << (SHIFT - 1)) - 1) + ((bits >> SHIFT) & 1)) >> SHIFT
    # Subnormal codes: y scaled to units of the smallest code, rounded to the nearest even
    # integer with the 2^23 trick (exact: the scaled value is below 2^MANTISSA_BITS).
    scaled = y * SUB_SCALE
    sub = ((scaled + 8388608.0) - 8388608.0).to(tl.int32)
    return tl.where(y >= MIN_NORMAL, kept - REBASE, sub)


@triton.jit
def _from_minifloat(
    code, MANTISSA_BITS: tl.constexpr, REBASE: tl.constexpr, SUB_UNIT: tl.constexpr
):
    """The fp32 value in [0, 1] of an int32 ``code`` (exact); ``SUB_UNIT`` is the smallest
    code's value, ``1 / SUB_SCALE``."""
    SHIFT: tl.constexpr = 23 - MANTISSA_BITS
    normal = ((code + REBASE) << SHIFT).to(tl.float32, bitcast=True)
    sub = code.to(tl.float32) * SUB_UNIT
    return tl.where(code >= (1 << MANTISSA_BITS), normal, sub)


@triton.jit
def quantize_signed(m, scale):
    """int8 code of ``m`` in a block of scale ``scale`` (``max |m|`` over its finite values;
    0 gives code 0); infinities and NaN get the codes no finite value uses (``_INF_CODE``)."""
    y = tl.where(scale > 0, tl.div_rn(tl.abs(m), tl.where(scale > 0, scale, 1.0)), 0.0)
    magnitude = _to_minifloat(tl.minimum(y, 1.0), 4, 1920, 1024.0, 0.015625)  # E3M4, bias 7
    magnitude = tl.where(tl.abs(m) == float("inf"), 0x7F, magnitude)
    magnitude = tl.where(m != m, 0x7E, magnitude)
    code = tl.where((m < 0) & (magnitude > 0), magnitude | 0x80, magnitude)  # no -0 code
    return code.to(tl.int8)


@triton.jit
def dequantize_signed(code, scale):
    c = code.to(tl.int32) & 0xFF
    magnitude = c & 0x7F
    y = _from_minifloat(magnitude, 4, 1920, 0.0009765625) * scale
    y = tl.where(magnitude == 0x7F, float("inf"), y)
    y = tl.where(magnitude == 0x7E, float("nan"), y)
    return tl.where(c >= 0x80, -y, y)


@triton.jit
def quantize_root(v, scale):
    """int8 code of ``sqrt(v)`` in a block of scale ``scale`` (``sqrt(max v)`` over its finite
    values); a non-zero ``v`` gets a non-zero code, an infinite or NaN one its own code."""
    root = tl.sqrt_rn(v)
    y = tl.where(scale > 0, tl.div_rn(root, tl.where(scale > 0, scale, 1.0)), 0.0)
    code = _to_minifloat(tl.minimum(y, 1.0), 4, 1792, 262144.0, 0.00006103515625)  # E4M4
    code = tl.where((v > 0) & (code == 0), 1, code)
    code = tl.where(v == float("inf"), 0xFF, code)
    code = tl.where(v != v, 0xFE, code)
    return code.to(tl.uint8).to(tl.int8, bitcast=True)


@triton.jit
def dequantize_root(code, scale):
    c = code.to(tl.int32) & 0xFF
    root = _from_minifloat(c, 4, 1792, 0.000003814697265625) * scale
    v = root * root
    v = tl.where(c == 0xFF, float("inf"), v)
    return tl.where(c == 0xFE, float("nan"), v)


@triton.jit
def store_quantized(
    exp_avg, exp_avg_sq, m_scale, v_scale, m, v, first, offsets, mask, numel,
    BLOCK: tl.constexpr, QUANT_BLOCK: tl.constexpr,
):  # fmt: skip
    """Store one launch block of fp32 moments ``m``, ``v`` (elements ``first`` onwards, a
    multiple of ``QUANT_BLOCK``) as codes and their blocks' scales. Elements past ``numel``
    are masked; they hold zeros, which do not raise a block's maximum."""
    N: tl.constexpr = BLOCK // QUANT_BLOCK
    finite_m = mask & (tl.abs(m) < float("inf"))  # NaN compares false: left out too
    finite_v = mask & (v < float("inf"))
    m_top = tl.max(tl.reshape(tl.where(finite_m, tl.abs(m), 0.0), (N, QUANT_BLOCK)), axis=1)
    v_top = tl.sqrt_rn(tl.max(tl.reshape(tl.where(finite_v, v, 0.0), (N, QUANT_BLOCK)), axis=1))
    m_each = tl.reshape(tl.broadcast_to(tl.expand_dims(m_top, 1), (N, QUANT_BLOCK)), (BLOCK,))
    v_each = tl.reshape(tl.broadcast_to(tl.expand_dims(v_top, 1), (N, QUANT_BLOCK)), (BLOCK,))
    tl.store(exp_avg + offsets, quantize_signed(m, m_each), mask=mask)
    tl.store(exp_avg_sq + offsets, quantize_root(v, v_each), mask=mask)
    blocks = first // QUANT_BLOCK + tl.arange(0, N)
    in_tensor = blocks * QUANT_BLOCK < numel
    tl.store(m_scale + blocks, m_top, mask=in_tensor)
    tl.store(v_scale + blocks, v_top, mask=in_tensor)


# ---------------------------------------------------------------------- torch references
def _to_minifloat_reference(y: torch.Tensor, fmt: tuple[int, int]) -> torch.Tensor:
    exponent_bits, mantissa_bits = fmt
    bias, shift = _bias(exponent_bits), 23 - mantissa_bits
    bits = y.contiguous().view(torch.int32)
    kept = (bits + ((1 << (shift - 1)) - 1) + ((bits >> shift) & 1)) >> shift
    normal = kept - ((127 - bias) << mantissa_bits)
    scaled = y * 2.0 ** (bias - 1 + mantissa_bits)
    sub = ((scaled + 8388608.0) - 8388608.0).to(torch.int32)
    return torch.where(y >= 2.0 ** (1 - bias), normal, sub)


def _from_minifloat_reference(code: torch.Tensor, fmt: tuple[int, int]) -> torch.Tensor:
    exponent_bits, mantissa_bits = fmt
    bias, shift = _bias(exponent_bits), 23 - mantissa_bits
    normal = ((code + ((127 - bias) << mantissa_bits)) << shift).to(torch.int32).view(torch.float32)
    sub = code.to(torch.float32) * 2.0 ** (1 - bias - mantissa_bits)
    return torch.where(code >= (1 << mantissa_bits), normal, sub)


def _safe_ratio(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    positive = scale > 0
    return torch.where(positive, x / torch.where(positive, scale, torch.ones_like(scale)), 0.0)


def quantize_signed_reference(m: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Reference of ``quantize_signed`` (``scale`` broadcast against ``m``)."""
    y = _safe_ratio(m.abs(), scale).float().clamp(max=1.0)
    magnitude = _to_minifloat_reference(y, _SIGNED)
    magnitude = torch.where(m.isinf(), 0x7F, magnitude)
    magnitude = torch.where(m.isnan(), 0x7E, magnitude)
    code = torch.where((m < 0) & (magnitude > 0), magnitude | 0x80, magnitude)
    return torch.where(code >= 0x80, code - 0x100, code).to(torch.int8)


def dequantize_signed_reference(code: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    c = code.to(torch.int32) & 0xFF
    magnitude = c & 0x7F
    y = _from_minifloat_reference(magnitude, _SIGNED) * scale
    y = torch.where(magnitude == 0x7F, float("inf"), y)
    y = torch.where(magnitude == 0x7E, float("nan"), y)
    return torch.where(c >= 0x80, -y, y)


def quantize_root_reference(v: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Reference of ``quantize_root``."""
    y = _safe_ratio(v.sqrt(), scale).float().clamp(max=1.0)
    code = _to_minifloat_reference(y, _ROOT)
    code = torch.where((v > 0) & (code == 0), 1, code)
    code = torch.where(v.isposinf(), 0xFF, code)
    code = torch.where(v.isnan(), 0xFE, code)
    return torch.where(code >= 0x80, code - 0x100, code).to(torch.int8)


def dequantize_root_reference(code: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    c = code.to(torch.int32) & 0xFF
    root = _from_minifloat_reference(c, _ROOT) * scale
    v = torch.where(c == 0xFF, float("inf"), root * root)
    return torch.where(c == 0xFE, float("nan"), v)


def block_scales_reference(x: torch.Tensor, root: bool = False) -> torch.Tensor:
    """fp32 scales of ``x``'s blocks of ``BLOCK`` elements in memory order: ``max |x|``, or
    ``sqrt(max x)`` with ``root`` (for ``exp_avg_sq``). The last block may be partial."""
    flat = x.detach().reshape(-1).float().abs()
    flat = torch.where(flat.isfinite(), flat, 0.0)  # infinities and NaN have their own codes
    pad = (-flat.numel()) % BLOCK
    blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, BLOCK)
    top = blocks.amax(dim=1)
    return top.sqrt() if root else top


@triton.jit
def _roundtrip_kernel(
    m_ptr, v_ptr, m_scale_ptr, v_scale_ptr, m_code_ptr, v_code_ptr, m_back_ptr, v_back_ptr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """One block's codes and their values back (the tests' and the sm_90 compile check's
    view of the device functions until a step kernel uses them)."""
    offsets = tl.arange(0, BLOCK)
    m, v = tl.load(m_ptr + offsets), tl.load(v_ptr + offsets)
    m_scale, v_scale = tl.load(m_scale_ptr), tl.load(v_scale_ptr)
    m_code, v_code = quantize_signed(m, m_scale), quantize_root(v, v_scale)
    tl.store(m_code_ptr + offsets, m_code)
    tl.store(v_code_ptr + offsets, v_code)
    tl.store(m_back_ptr + offsets, dequantize_signed(m_code, m_scale))
    tl.store(v_back_ptr + offsets, dequantize_root(v_code, v_scale))


def roundtrip(m: torch.Tensor, v: torch.Tensor, m_scale: torch.Tensor, v_scale: torch.Tensor):
    """``(m codes, v codes, m back, v back)`` of one block of ``BLOCK`` elements, by the
    device functions."""
    out = [torch.empty_like(m, dtype=torch.int8) for _ in range(2)]
    out += [torch.empty_like(m) for _ in range(2)]
    _roundtrip_kernel[(1,)](m, v, m_scale, v_scale, *out, BLOCK=BLOCK, **EXACT_ARITHMETIC)
    return out


def compile_variants(compile) -> dict[str, dict]:
    """The variants ``tests/gpu_compile.py`` compiles for sm_90: the round trip."""
    types = {"m_code_ptr": "*i8", "v_code_ptr": "*i8", "m_scale_ptr": "*fp32",
             "v_scale_ptr": "*fp32", "m_ptr": "*fp32", "v_ptr": "*fp32", "m_back_ptr": "*fp32",
             "v_back_ptr": "*fp32"}  # fmt: skip
    return {"quantize-roundtrip": compile(_roundtrip_kernel, dict(BLOCK=BLOCK), types)}


def dequantize_tensor(codes: torch.Tensor, scales: torch.Tensor, root: bool) -> torch.Tensor:
    """fp32 values of an int8 moment (``root``: ``exp_avg_sq``). Blocks follow the elements'
    logical (row-major) order, which is the kernels' memory order: only contiguous params
    get int8 moments, so a copy whose layout changed (``.contiguous()`` in a converter) is
    read the same."""
    flat = codes.reshape(-1)
    each = scales.repeat_interleave(BLOCK)[: flat.numel()]
    back = dequantize_root_reference if root else dequantize_signed_reference
    return back(flat, each).reshape(codes.shape)


def quantize_tensor_(
    codes: torch.Tensor, scales: torch.Tensor, values: torch.Tensor, root: bool
) -> None:
    """Store fp32 ``values`` into an int8 moment's ``codes`` and ``scales`` in place (new
    scales from the values' blocks, as ``store_quantized``)."""
    flat = values.float().reshape(-1)
    new = block_scales_reference(flat, root=root)
    each = new.repeat_interleave(BLOCK)[: flat.numel()]
    encode = quantize_root_reference if root else quantize_signed_reference
    codes.copy_(encode(flat, each).reshape(codes.shape))
    scales.copy_(new)


def scales_for(t: torch.Tensor) -> torch.Tensor:
    """Zero fp32 scales for an int8 moment like ``t`` (one per block)."""
    return torch.zeros(blocks_of(t), dtype=torch.float32, device=t.device)


def blocks_of(t: torch.Tensor) -> int:
    """Quantization blocks (scales) of a moment like ``t``: ``ceil(numel / BLOCK)``."""
    return -(-t.numel() // BLOCK)
