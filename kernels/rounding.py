"""Device helpers shared by the kernels: rounding an fp32 value to the stored dtype."""

import triton
import triton.language as tl


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """Round fp32 ``x`` to ``DTYPE`` to nearest-even, the same on GPUs and in the interpreter.

    fp16 (and fp32) use the ordinary cast, which rounds to nearest-even everywhere. bf16 is
    rounded with integer bit operations because Triton's interpreter truncates fp32 -> bf16
    while GPUs round to nearest-even: add 0x7FFF plus the lowest kept bit, then drop the low 16
    bits. NaN keeps a quiet-NaN pattern (the addition could otherwise carry it into infinity).
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = tl.where(x != x, 0x7FC00000, rounded)
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def widen(x, DTYPE: tl.constexpr):
    """fp16/bf16/fp32 ``x`` (of type ``DTYPE``) as fp32, exactly, on GPUs and the interpreter.

    bf16 is widened with bit operations (16 zero bits appended): Triton's interpreter converts
    bf16 subnormals wrongly (normalises the significand, then clamps the exponent), while this
    is exact everywhere and costs one shift on a GPU.
    """
    if DTYPE == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)
