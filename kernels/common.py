"""Pieces shared by the step kernels and their launchers: dtypes, widening and rounding, a
program's chunk, typed pointers from the address tables, the unscale/clip factors, the weight
store, the step-count increment, and the launchers' shared body (``prepare_step``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import triton
import triton.language as tl

from .launch_config import launch_config
from .multi_tensor import (
    EXACT_ARITHMETIC,
    QUANT_BLOCK,
    check_step_inputs,
    device_guard,
    learning_rate,
    master_mode,
    tables_for,
)
from .remainder import join, remainder_of, round_master

TORCH_TO_TRITON = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.int8: tl.int8,  # int8 moments (kernels/quantize.py)
}


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
def round_param(p, PARAM_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr):
    """The param of fp32 weight ``p``: a bf16 param with a master is its master rounded ties
    away from zero (``remainder.py`` says why), every other to nearest-even."""
    if HAS_MASTER and PARAM_DTYPE == tl.bfloat16:
        return round_master(p)
    else:
        return round_to(p, PARAM_DTYPE)


@triton.jit
def load_weight(param, master, offsets, mask, PARAM_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr):
    """A block's fp32 weight. ``HAS_MASTER`` 1 (fp32 masters): the master, unless the param's
    bits are no longer the master's rounding (see ``load_grad_and_weight``). 2 (int16
    remainders of bf16 params, ``remainder.py``): the master the param and its remainder hold.
    0: the widened param."""
    if HAS_MASTER == 2:
        q = tl.load(param + offsets, mask=mask, other=0.0)
        r = tl.load(master.to(tl.pointer_type(tl.int16)) + offsets, mask=mask, other=0)
        return join(q, r)
    elif HAS_MASTER:
        p = tl.load(master + offsets, mask=mask, other=0.0)
        q = tl.load(param + offsets, mask=mask, other=0.0)
        written = round_param(p, PARAM_DTYPE, HAS_MASTER).to(tl.uint16, bitcast=True) != q.to(
            tl.uint16, bitcast=True
        )
        return tl.where(written, widen(q, PARAM_DTYPE), p)
    else:
        return widen(tl.load(param + offsets, mask=mask, other=0.0), PARAM_DTYPE)


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
    p = load_weight(param, master, offsets, mask, PARAM_DTYPE, HAS_MASTER)
    if HAS_GRAD_SCALE:
        g = g * inv_scale
    if HAS_CLIP:
        g = g * clip_coef
    if MAXIMIZE:
        g = -g
    return g, p


@triton.jit
def store_weight(
    param, master, offsets, mask, p, PARAM_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr
):
    """The step kernels' last write: the fp32 weight into the master (fp32, or the int16
    remainder), if there is one, and rounded into the param (``round_param``)."""
    if HAS_MASTER == 2:
        tl.store(master.to(tl.pointer_type(tl.int16)) + offsets, remainder_of(p), mask=mask)
    elif HAS_MASTER:
        tl.store(master + offsets, p, mask=mask)
    tl.store(param + offsets, round_param(p, PARAM_DTYPE, HAS_MASTER), mask=mask)


@triton.jit
def _increment_steps_kernel(
    step_ptrs,  # int64 [T]: fp32 one-element step counts
    n_tensors,  # T
    found_inf_ptr,  # fp32 scalar: non-zero means the step was skipped (if HAS_FOUND_INF)
    HAS_FOUND_INF: tl.constexpr,  # read the skip flag
    BLOCK: tl.constexpr,  # tensors per program
):
    """Bytes: 8 per tensor (read and write its fp32 step). A separate launch because the step
    kernel's programs of one tensor all read its count: none of them may write it."""
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    limit = n_tensors
    if HAS_FOUND_INF:
        # A skipped step advances nothing. (A limit rather than `mask & flag`: the interpreter
        # cannot combine a block mask with a scalar boolean.)
        limit = tl.where(tl.load(found_inf_ptr) == 0, n_tensors, 0)
    mask = index < limit
    steps = tl.load(step_ptrs + index, mask=mask, other=0).to(tl.pointer_type(tl.float32))
    tl.store(steps, tl.load(steps, mask=mask) + 1.0, mask=mask)


def increment_steps(
    step_ptrs: torch.Tensor, n_tensors: int, found_inf: torch.Tensor | None
) -> None:
    """Add one to each step count in the address table ``step_ptrs`` unless ``found_inf``."""
    block = 1024
    _increment_steps_kernel[(triton.cdiv(n_tensors, block),)](
        step_ptrs,
        n_tensors,
        found_inf if found_inf is not None else step_ptrs,
        HAS_FOUND_INF=found_inf is not None,
        BLOCK=block,
        **EXACT_ARITHMETIC,
    )


def prepare_step(
    kernel,
    name: str,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    masters: Sequence[torch.Tensor] | None,
    state: Mapping[str, Sequence[torch.Tensor] | None],
    *,
    rows: Sequence[str],
    hyperparameters: Sequence[float],
    flags: Mapping[str, bool],
    count_steps: bool,
    lr,
    maximize: bool,
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
    norm_sq: torch.Tensor | None,
    max_norm: float,
    cache,
    compact_state: Sequence[str] = (),
) -> Callable[[], None]:
    """The step launchers' shared body: check the inputs, build (or reuse) the tables of
    params, grads and ``state``, and return the launch of ``kernel`` (then of the step-count
    increment of ``state["steps"]`` if ``count_steps``), configured as ``name`` in
    ``launch_config``.

    Every step kernel takes the same arguments, but for its own: first the address rows, named
    by ``rows`` ("params", "grads" or a key of ``state``); then the sizes, the chunk map, the
    optional scalars, the clipping threshold and the learning rate; then ``hyperparameters``;
    and the shared flags (dtypes, optional inputs, alignment, block sizes) with its own
    ``flags``. Absent optional pointers are filled with any tensor: the kernels never read them.
    ``compact_state``: the keys of ``state`` the kernel may read in bf16 (one dtype for all of
    them, passed by the caller as a ``STATE_DTYPE`` flag); every other state list is fp32.
    """
    check_step_inputs(params, grads, masters, state, grad_scale, found_inf, norm_sq, compact_state)
    device = params[0].device
    config = launch_config(name, device)
    if flags.get("STATE_DTYPE") == tl.int8 and config["BLOCK"] % QUANT_BLOCK:
        raise ValueError(
            f"int8 moments need launch blocks of a multiple of {QUANT_BLOCK} elements (one "
            f"program computes a quantization block's scale); the {name!r} configuration in "
            f"effect has BLOCK={config['BLOCK']}: retune, or remove the tuned configuration"
        )
    names = ["params", "grads", *state]
    tables = tables_for(names, [params, grads], list(state.values()), config["CHUNK"], cache)
    by_name = dict(zip(names, tables.rows))
    has_clip = norm_sq is not None and max_norm > 0
    scalar = tables.numels
    lr_value, lr_tensor = learning_rate(lr, device)
    args = (
        *(by_name[row] for row in rows),
        *tables.chunk_args,
        grad_scale if grad_scale is not None else scalar,
        found_inf if found_inf is not None else scalar,
        norm_sq if has_clip else scalar,
        lr_tensor if lr_tensor is not None else scalar,
        float(max_norm),
        lr_value,
        *hyperparameters,
    )
    kwargs = dict(
        PARAM_DTYPE=TORCH_TO_TRITON[params[0].dtype],
        GRAD_DTYPE=TORCH_TO_TRITON[grads[0].dtype],
        HAS_MASTER=master_mode(masters),
        MAXIMIZE=bool(maximize),
        HAS_GRAD_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None,
        HAS_CLIP=has_clip,
        LR_ON_DEVICE=lr_tensor is not None,
        **tables.options(config),
        **flags,
    )
    n_tensors = len(params)

    def launch():
        with device_guard(device):
            if tables.n_programs > 0:
                kernel[(tables.n_programs,)](*args, **kwargs)
            if count_steps:
                increment_steps(by_name["steps"], n_tensors, found_inf)

    return launch
