"""Device-side pieces shared by the kernels: dtypes, widening and rounding, a program's chunk,
typed pointers from the address tables, and the unscale/clip factors."""

import torch
import triton
import triton.language as tl

TORCH_TO_TRITON = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
}
LOW_PRECISION = (torch.float16, torch.bfloat16)


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


@triton.jit
def program_chunk(
    chunk_map, n_programs, numels, found_inf_ptr, HAS_FOUND_INF: tl.constexpr,
    ALIGNED: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    """This program's (tensor index, first element, element count). A skipped step (non-zero
    ``*found_inf_ptr``) gets a count of 0, which masks every load and store.

    With ``ALIGNED`` (checked on the host: every address 16-byte aligned, every size a
    multiple of 8) the compiler is told so, which lets it emit 128-bit loads: a pointer loaded
    from a table carries no alignment information of its own."""
    pid = tl.program_id(0)
    tensor = tl.load(chunk_map + pid)
    start = tl.load(chunk_map + n_programs + pid)
    numel = tl.load(numels + tensor)
    if HAS_FOUND_INF:
        numel = tl.where(tl.load(found_inf_ptr) == 0, numel, 0)
    if ALIGNED:
        start = tl.multiple_of(start, CHUNK)
        numel = tl.multiple_of(numel, 8)
    return tensor, start, numel


@triton.jit
def tensor_ptr(table, tensor, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The typed pointer to ``tensor``'s data, read from the address table ``table``."""
    ptr = tl.load(table + tensor).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def block_offsets(start, i, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """Element offsets of the block ``i`` elements into the chunk starting at ``start``."""
    offsets = start + i + tl.arange(0, BLOCK)
    if ALIGNED:
        offsets = tl.max_contiguous(tl.multiple_of(offsets, BLOCK), BLOCK)
    return offsets


@triton.jit
def unscale_and_clip_factors(
    grad_scale_ptr, norm_sq_ptr, max_norm, HAS_GRAD_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr
):
    """``(1 / grad_scale, min(1, max_norm / (norm + 1e-6)))``, applied to the grads as two
    multiplications so each rounding matches torch's unscale-then-clip. IEEE division (``/``
    compiles to an approximate division on NVIDIA GPUs)."""
    inv_scale = 1.0
    if HAS_GRAD_SCALE:
        inv_scale = tl.div_rn(1.0, tl.load(grad_scale_ptr))
    clip_coef = 1.0
    if HAS_CLIP:
        norm = tl.sqrt_rn(tl.load(norm_sq_ptr))
        clip_coef = tl.minimum(tl.div_rn(max_norm, norm + 1e-6), 1.0)
    return inv_scale, clip_coef


@triton.jit
def load_grad_and_weight(
    grad, param, master, offsets, mask, inv_scale, clip_coef,
    GRAD_DTYPE: tl.constexpr, PARAM_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr, MAXIMIZE: tl.constexpr,
):  # fmt: skip
    """A block's fp32 grad, unscaled, clipped and signed in torch's order, and its fp32
    weight: the step kernels' shared first half.

    The weight is the master, unless the param's bits are no longer the master's rounding:
    then the param was written since the last step (``p.clamp_()``, ``model.load_state_dict``,
    ``p.data = ...``), and, as torch.optim would, the step starts from what the param holds
    (its master is replaced by it). That check reads the param: 2 bytes per element. Without a
    master the weight is the widened param."""
    g = widen(tl.load(grad + offsets, mask=mask, other=0.0), GRAD_DTYPE)
    if HAS_MASTER:
        p = tl.load(master + offsets, mask=mask, other=0.0)
        q = tl.load(param + offsets, mask=mask, other=0.0)
        written = round_to(p, PARAM_DTYPE).to(tl.uint16, bitcast=True) != q.to(
            tl.uint16, bitcast=True
        )
        p = tl.where(written, widen(q, PARAM_DTYPE), p)
    else:
        p = widen(tl.load(param + offsets, mask=mask, other=0.0), PARAM_DTYPE)
    if HAS_GRAD_SCALE:
        g = g * inv_scale
    if HAS_CLIP:
        g = g * clip_coef
    if MAXIMIZE:
        g = -g
    return g, p
