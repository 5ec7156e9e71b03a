"""Stochastic rounding of fp32 values to bf16 and fp16, in Triton and in torch, from the same
random bits: Triton's Philox4x32-10 (``tl.philox``), re-implemented in torch integer ops so
that both backends draw bit-identical numbers.

The stream of one tensor is keyed by its own 64-bit seed (an int64 state tensor, ``sr_seed``)
and counted by ``(element index in memory order, step number, shard)``, ``shard`` being this
rank's shard of a sharded (FSDP2) tensor, 0 otherwise, so that the shards of one tensor,
which share its seed and local indices, draw different words. It depends neither on the
launch geometry (chunk sizes, programs) nor on which other tensors are stepped with it, and a
resumed run that restores the seeds and step counts draws the same numbers. One Philox call
gives four 32-bit words per element: word 0 rounds the param, words 1-3 the moments
(``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``), so no two values share bits.

Rounding (``lo < x < hi`` the two neighbours of ``x`` in the target format, ``P(hi) =
(x - lo) / (hi - lo)``):

- bf16 is fp32 with the low 16 bits dropped, and within a binade fp32 bit patterns are linear
  in the magnitude: adding 16 uniform bits to the pattern and truncating carries into the kept
  bits with probability exactly ``low bits / 2^16`` (fp32 subnormals included; a carry out of
  a binade lands on its upper power of two, the right neighbour).
- fp16 keeps 10 significand bits: the same trick drops 13 bits for normal fp16 values
  (``|x| >= 2^-14``) and ``-1 - e`` bits (``e`` the fp32 exponent, 14..23) in fp16's subnormal
  range, where the spacing stays ``2^-24``: exact there too. Below the smallest subnormal
  (``|x| < 2^-24``, neighbours 0 and ``2^-24``) ``x`` may carry more bits than a 32-bit word:
  it rounds up iff ``r < ceil(|x| / 2^-24 * 2^32)``, so ``P(up)`` is ``|x| / 2^-24``
  rounded up to a multiple of ``2^-32`` (a bias below ``2^-56`` in value).
- The sign is kept (rounding acts on the magnitude, so it is unbiased for negative values);
  NaN and infinities come out as nearest-even gives them. Overflow follows nearest-even: a
  value nearest-even rounds to infinity becomes infinity, any other stays finite (a carry past
  the largest finite value gives the largest finite value).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = [
    "philox_reference",
    "random_words",
    "step_words_reference",
    "stochastic_round",
    "stochastic_round_reference",
]

_M32 = 0xFFFFFFFF
# Triton's Philox4x32 constants (triton/language/random.py: philox_impl), the Random123 ones.
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_ROUNDS = 10  # Triton's default (N_ROUNDS_DEFAULT)
_FP16_MAX = 65504.0


@triton.jit
def random_words(seed, step, offsets, shard):
    """Four blocks of uint32 words for the elements at ``offsets`` (int64) of a tensor keyed by
    ``seed`` (int64 scalar), at step number ``step`` and shard ``shard`` (fp32 scalars, exact
    below 2^24)."""
    c0 = offsets.to(tl.uint32)
    c1 = (offsets >> 32).to(tl.uint32)
    zero = c0 * 0
    c2 = zero + step.to(tl.int32).to(tl.uint32)
    c3 = zero + tl.cast(shard, tl.int32).to(tl.uint32)
    return tl.philox(seed, c0, c1, c2, c3)


@triton.jit
def stochastic_round(x, r, DTYPE: tl.constexpr):
    """fp32 ``x`` rounded stochastically to ``DTYPE`` with the uint32 random words ``r`` (see
    the module docstring); fp32 is returned unchanged."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        nearest = bits + 0x7FFF + ((bits >> 16) & 1)
        nearest = tl.where(x != x, 0x7FC00000, nearest) >> 16
        up = (bits + (r >> 16)) >> 16
        sign = (bits >> 16) & 0x8000
        near_special = ((nearest & 0x7FFF) >= 0x7F80) | (x != x)
        up = tl.where((up & 0x7FFF) == 0x7F80, sign | 0x7F7F, up)
        out = tl.where(near_special, nearest, up)
        return out.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif DTYPE == tl.float16:
        bits = x.to(tl.uint32, bitcast=True)
        sign = bits & 0x80000000
        mag = bits & 0x7FFFFFFF
        exponent = (mag >> 23).to(tl.int32) - 127
        # Bits of the fp32 significand below fp16's grid: 13, or more in fp16's subnormals.
        drop = tl.minimum(tl.maximum(-1 - exponent, 13), 23).to(tl.uint32)
        kept = (mag + (r >> (32 - drop))) & ~((tl.full(drop.shape, 1, tl.uint32) << drop) - 1)
        value = kept.to(tl.float32, bitcast=True)
        # Below 2^-24: up iff r < |x| / 2^-24 * 2^32, an integer compare against the ceiling
        # (exact: |x| * 2^56 < 2^32 is an fp32 value, an integer from 2^24 on).
        small = tl.where(exponent < -24, mag.to(tl.float32, bitcast=True), 0.0)  # no overflow
        limit = tl.ceil(small * 72057594037927936.0).to(tl.uint32)
        tiny = tl.where(r < limit, 5.9604644775390625e-08, 0.0)
        value = tl.minimum(tl.where(exponent < -24, tiny, value), 65504.0)  # fp16 max
        value = (value.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)
        nearest = x.to(tl.float16)
        special = (nearest != nearest) | (tl.abs(nearest.to(tl.float32)) == float("inf"))
        return tl.where(special, nearest, value.to(tl.float16))
    else:
        return x


# ------------------------------------------------------------------------- torch reference
def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``a * b`` (``a`` a uint32 constant, ``b`` uint32 values held in
    int64), through 16-bit halves so that no int64 product overflows."""
    t1 = a * (b & 0xFFFF)
    mid = a * (b >> 16) + (t1 >> 16)
    return mid >> 16, ((mid & 0xFFFF) << 16) | (t1 & 0xFFFF)


def philox_reference(seed: int, c0, c1, c2, c3) -> list[torch.Tensor]:
    """Philox4x32-10 as Triton's ``tl.philox(seed, c0, c1, c2, c3)`` computes it: counters are
    int64 tensors holding uint32 values, the key the 64-bit ``seed`` (low word first)."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return [c0, c1, c2, c3]


def random_words_reference(
    seed: int, step: float, like: torch.Tensor, shard: int = 0
) -> list[torch.Tensor]:
    """``random_words`` for every element of the dense tensor ``like``: int64 tensors of its
    shape and strides holding uint32 words, element ``i`` of memory order drawn at offset
    ``i`` as the kernels draw it."""
    index = torch.empty_like(like, dtype=torch.int64)
    flat = index.as_strided((like.numel(),), (1,))
    flat.copy_(torch.arange(like.numel(), dtype=torch.int64, device=like.device))
    zero = torch.zeros_like(index)
    c2, c3 = zero + (int(step) & _M32), zero + (int(shard) & _M32)
    return philox_reference(seed, index & _M32, index >> 32, c2, c3)


def step_words_reference(sr_seeds, steps, params, shard: int = 0) -> list[list[torch.Tensor]]:
    """The words of each param's step (``random_words_reference`` at its count after the
    step, as the kernels draw them), one list per param."""
    return [
        random_words_reference(int(seed.item()), step.item() + 1.0, p, shard)
        for seed, step, p in zip(sr_seeds, steps, params)
    ]


def stochastic_round_reference(x: torch.Tensor, r: torch.Tensor, dtype: torch.dtype):
    """``stochastic_round`` in torch: fp32 ``x`` to ``dtype`` with the words ``r`` (int64)."""
    if dtype == torch.float32:
        return x
    bits = x.view(torch.int32).to(torch.int64) & _M32
    nan = torch.isnan(x)
    if dtype == torch.bfloat16:
        nearest = torch.where(nan, 0x7FC00000, bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        nearest = nearest & 0xFFFF
        up = ((bits + (r >> 16)) >> 16) & 0xFFFF
        sign = (bits >> 16) & 0x8000
        up = torch.where((up & 0x7FFF) == 0x7F80, sign | 0x7F7F, up)
        out = torch.where(((nearest & 0x7FFF) >= 0x7F80) | nan, nearest, up)
        return out.to(torch.int32).to(torch.int16).view(torch.bfloat16)
    if dtype != torch.float16:
        raise TypeError(f"stochastic rounding to {dtype} is not defined")
    sign = bits & 0x80000000
    mag = bits & 0x7FFFFFFF
    exponent = (mag >> 23) - 127
    drop = torch.clamp(-1 - exponent, 13, 23)
    kept = (mag + (r >> (32 - drop))) & ~((1 << drop) - 1)
    value = (kept & _M32).to(torch.int32).view(torch.float32)
    magnitude = mag.to(torch.int32).view(torch.float32)
    small = torch.where(exponent < -24, magnitude.double(), 0.0)
    tiny = torch.where(r < torch.ceil(small * 2.0**56).long(), 2.0**-24, 0.0)
    value = torch.where(exponent < -24, tiny.float(), value).clamp(max=_FP16_MAX)
    value = ((value.view(torch.int32).to(torch.int64) | sign) & _M32).to(torch.int32)
    value = value.view(torch.float32)
    nearest = x.to(torch.float16)
    return torch.where(torch.isfinite(nearest), value.to(torch.float16), nearest)
