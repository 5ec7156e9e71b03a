"""Dynamic loss-scale update in one launch (DeepSpeed's rule, see ``DynamicLossScaler``).

Why a kernel for five scalars: written as torch ops, the device-side update is ~35 tiny kernels
(one per ``where``, comparison and copy), each with its own launch cost in host time, paid at
every step (figures in ``bench/results/``). One program reads the state, decides and writes it
back.

Bytes per update: 5 scalars read and written, 4 recorded (~76 bytes): launch-bound, not
memory-bound.

The rule, per update (``ov``: the overflow flag is non-zero)::

    shift      = hysteresis == 1 or cur_hysteresis == 1
    new_error  = raise_at_min and ov and shift and scale == min_scale
    overflow:  scale = max(scale / factor, min_scale) if shift, hyst -= 1 unless shift,
               last_overflow_iter = cur_iter
    clean:     stable = cur_iter - last_overflow_iter - 1
               grow = stable > 0 and stable % scale_window == 0
               scale *= factor if grow and the product is finite
               hyst = hysteresis if consecutive or grow
    cur_iter += 1;  everything is left unchanged when the error flag is (or becomes) set

``reference.update_loss_scale`` is the same rule in torch ops (the CPU path and the oracle).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .multi_tensor import EXACT_ARITHMETIC, device_guard

__all__ = ["update_loss_scale"]

_FLT_MAX = tl.constexpr(3.4028234663852886e38)  # the largest finite fp32


@triton.jit
def _update_loss_scale_kernel(
    overflow_ptr,  # fp32 scalar: non-zero means this iteration overflowed; read only
    scale_ptr,  # fp32 scalar: the loss scale, updated
    cur_hysteresis_ptr,  # int64 scalar: overflows left before the scale drops, updated
    cur_iter_ptr,  # int64 scalar: iterations so far, updated
    last_overflow_iter_ptr,  # int64 scalar: iteration of the last overflow (-1: none), updated
    error_ptr,  # fp32 scalar: 1.0 once an overflow hit the minimum scale (freezes the state)
    min_scale,  # fp32: lower bound of the scale
    scale_factor,  # fp32: growth and back-off factor, > 1
    scale_window,  # int: clean iterations between growths, >= 1
    hysteresis,  # int: the configured hysteresis (DeepSpeed's delayed_shift), >= 1
    consecutive,  # int (0/1): refill hysteresis on every clean iteration
    raise_at_min,  # int (0/1): an overflow at the minimum scale sets the error flag
    record_ptr,  # fp32 [4]: written: scale and hysteresis before, then after (for the skip log)
):
    ov = tl.load(overflow_ptr) != 0
    scale = tl.load(scale_ptr)
    hyst = tl.load(cur_hysteresis_ptr)
    it = tl.load(cur_iter_ptr)
    last = tl.load(last_overflow_iter_ptr)
    error = tl.load(error_ptr)

    shift = (hyst == 1) | (hysteresis == 1)
    new_error = ov & shift & (scale == min_scale) & (raise_at_min != 0)
    # IEEE division: the host path divides exactly, and so must the device.
    scale_ov = tl.where(shift, tl.maximum(tl.div_rn(scale, scale_factor), min_scale), scale)
    hyst_ov = tl.where(shift, hyst, hyst - 1)

    stable = it - last - 1
    grow = (stable > 0) & ((stable % scale_window) == 0)
    grown = scale * scale_factor
    scale_clean = tl.where(grow & (grown <= _FLT_MAX), grown, scale)
    hyst_clean = tl.where((consecutive != 0) | grow, hyst * 0 + hysteresis, hyst)

    freeze = (error != 0) | new_error
    new_scale = tl.where(ov, scale_ov, scale_clean)
    new_hyst = tl.where(ov, hyst_ov, hyst_clean)
    new_last = tl.where(ov, it, last)
    final_scale = tl.where(freeze, scale, new_scale)
    final_hyst = tl.where(freeze, hyst, new_hyst)
    tl.store(scale_ptr, final_scale)
    tl.store(cur_hysteresis_ptr, final_hyst)
    tl.store(record_ptr, scale)
    tl.store(record_ptr + 1, hyst.to(tl.float32))
    tl.store(record_ptr + 2, final_scale)
    tl.store(record_ptr + 3, final_hyst.to(tl.float32))
    tl.store(last_overflow_iter_ptr, tl.where(freeze, last, new_last))
    tl.store(cur_iter_ptr, tl.where(freeze, it, it + 1))
    tl.store(error_ptr, freeze.to(tl.float32))


def update_loss_scale(
    overflow: torch.Tensor,
    scale: torch.Tensor,
    cur_hysteresis: torch.Tensor,
    cur_iter: torch.Tensor,
    last_overflow_iter: torch.Tensor,
    error: torch.Tensor,
    *,
    min_scale: float,
    scale_factor: float,
    scale_window: int,
    hysteresis: int,
    consecutive: bool,
    raise_at_min: bool,
    record: torch.Tensor | None = None,
) -> None:
    """Advance the scaler state (one-element tensors on one device: ``scale`` and ``error``
    fp32, the counters int64) by one iteration, in place and without a host sync.
    ``overflow`` is any one-element tensor on that device; non-zero means overflow.
    ``record``, a 4-element fp32 tensor on that device, receives the scale and hysteresis
    before and after the update (what a skip log reports), at no extra launch."""
    device = scale.device
    for name, t, dtype in (
        ("scale", scale, torch.float32),
        ("error", error, torch.float32),
        ("cur_hysteresis", cur_hysteresis, torch.int64),
        ("cur_iter", cur_iter, torch.int64),
        ("last_overflow_iter", last_overflow_iter, torch.int64),
    ):
        if t.numel() != 1 or t.dtype != dtype or t.device != device:
            raise ValueError(
                f"{name} must be a one-element {dtype} tensor on {device}, "
                f"got {t.dtype} with {t.numel()} elements on {t.device}"
            )
    if overflow.numel() != 1 or overflow.device != device:
        raise ValueError(f"overflow must be a one-element tensor on {device}")
    if overflow.dtype != torch.float32:
        # Compare before casting: a float64 flag of 1e-50 is an overflow, and would be 0.0 in
        # fp32. One small op, no sync; fp32 flags (ours, GradScaler's) skip it.
        overflow = (overflow != 0).to(torch.float32)
    if record is None:
        record = torch.empty(4, dtype=torch.float32, device=device)
    elif record.numel() != 4 or record.dtype != torch.float32 or record.device != device:
        raise ValueError(f"record must be a 4-element float32 tensor on {device}")
    with device_guard(device):
        _update_loss_scale_kernel[(1,)](
            overflow,
            scale,
            cur_hysteresis,
            cur_iter,
            last_overflow_iter,
            error,
            float(min_scale),
            float(scale_factor),
            int(scale_window),
            int(hysteresis),
            int(bool(consecutive)),
            int(bool(raise_at_min)),
            record,
            **EXACT_ARITHMETIC,
        )


def compile_variants(compile) -> dict[str, dict]:
    """The variants ``tests/gpu_compile.py`` compiles for sm_90. Triton turns an int argument
    equal to 1 into a constant: the defaults (raise_at_min=1) launch that variant, and
    hysteresis=1 or scale_window=1 others; compile both extremes."""
    scale_types = {
        "overflow_ptr": "*fp32", "scale_ptr": "*fp32", "error_ptr": "*fp32",
        "cur_hysteresis_ptr": "*i64", "cur_iter_ptr": "*i64", "last_overflow_iter_ptr": "*i64",
        "scale_window": "i32", "hysteresis": "i32", "consecutive": "i32", "raise_at_min": "i32",
        "record_ptr": "*fp32",
    }  # fmt: skip
    ints = ("scale_window", "hysteresis", "consecutive", "raise_at_min")
    results = {}
    for name, ones in (("loss-scale-update", ()), ("loss-scale-update-ones", ints)):
        types = {k: v for k, v in scale_types.items() if k not in ones}
        results[name] = compile(_update_loss_scale_kernel, {k: 1 for k in ones}, types=types)
    return results
