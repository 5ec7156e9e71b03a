"""Compile every kernel ahead of time for an NVIDIA Hopper GPU (sm_90), with no GPU present.

Run by tests/test_gpu_compile.py in a fresh process *without* TRITON_INTERPRET (the kernels
must be defined as compiled JIT functions). Prints one JSON object: for each variant, whether
it compiled and facts read off its PTX (128-bit loads, approximate divisions, fp64 use).
"""

from __future__ import annotations

import json
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fp16_triton.kernels import adam, cast_copy, loss_scale, nonfinite, sgd  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SCALAR_POINTERS = {
    "grad_scale_ptr", "found_inf_ptr", "norm_sq_ptr", "lr_ptr", "inv_scale_ptr", "partials",
}  # fmt: skip
INTS = {"n_programs", "partial_stride", "partial_offset", "n_tensors"}


def compile_variant(kernel, constexprs: dict, types: dict | None = None) -> dict:
    """Compile ``kernel`` with ``constexprs``; every other argument typed by ``types`` or by
    its name."""
    signature, consts = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if types and name in types:
            signature[name] = types[name]
        elif name in constexprs:
            signature[name] = "constexpr"
            consts[(index,)] = constexprs[name]
        elif name in SCALAR_POINTERS:
            signature[name] = "*fp32"
        elif name in INTS:
            signature[name] = "i32"
        elif name.endswith("_ptrs") or name in ("numels", "chunk_map"):
            signature[name] = "*i64"
        else:
            signature[name] = "fp32"
    try:
        source = ASTSource(fn=kernel, signature=signature, constexprs=consts)
        ptx = triton.compile(source, target=TARGET, options={"num_warps": 4}).asm["ptx"]
    except Exception as e:  # reported, not raised: the test names the failing variant
        return {"ok": False, "error": f"{type(e).__name__}: {str(e)[:2000]}"}
    return {
        "ok": True,
        "vector_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx)),
        "approx_div": "div.full.f32" in ptx or "div.approx.f32" in ptx,
    }


def main() -> None:
    common = {"BLOCK": 1024, "CHUNK": 4096}
    adam_flags = dict(
        DECOUPLED=True, MAXIMIZE=False, HAS_GRAD_SCALE=True, HAS_FOUND_INF=True, HAS_CLIP=True
    )
    results = {}
    for dtype_name, dtype in (("fp16", tl.float16), ("bf16", tl.bfloat16)):
        for aligned in (False, True):
            for lr_on_device in (False, True):
                name = f"adam-{dtype_name}-master-amsgrad-aligned{aligned}-lrdev{lr_on_device}"
                results[name] = compile_variant(
                    adam._adam_kernel,
                    dict(
                        PARAM_DTYPE=dtype, GRAD_DTYPE=dtype, HAS_MASTER=True, AMSGRAD=True,
                        LR_ON_DEVICE=lr_on_device, ALIGNED=aligned, **adam_flags, **common,
                    ),
                )  # fmt: skip
    results["adam-fp32-plain"] = compile_variant(
        adam._adam_kernel,
        dict(
            PARAM_DTYPE=tl.float32, GRAD_DTYPE=tl.float32, HAS_MASTER=False, AMSGRAD=False,
            DECOUPLED=False, MAXIMIZE=True, HAS_GRAD_SCALE=False, HAS_FOUND_INF=False,
            HAS_CLIP=False, LR_ON_DEVICE=False, ALIGNED=False, **common,
        ),
    )  # fmt: skip
    for aligned in (False, True):
        results[f"sgd-fp16-momentum-aligned{aligned}"] = compile_variant(
            sgd._sgd_kernel,
            dict(
                PARAM_DTYPE=tl.float16, GRAD_DTYPE=tl.float16, HAS_MASTER=True,
                HAS_MOMENTUM=True, NESTEROV=True, MAXIMIZE=False, HAS_GRAD_SCALE=True,
                HAS_FOUND_INF=True, HAS_CLIP=True, LR_ON_DEVICE=True, ALIGNED=aligned, **common,
            ),
        )  # fmt: skip
        results[f"check-fp16-aligned{aligned}"] = compile_variant(
            nonfinite._nonfinite_check_kernel,
            dict(GRAD_DTYPE=tl.float16, HAS_GRAD_SCALE=True, COMPUTE_NORM=True, ALIGNED=aligned,
                 **common),
        )  # fmt: skip
        results[f"unscale-bf16-aligned{aligned}"] = compile_variant(
            nonfinite._unscale_kernel, dict(GRAD_DTYPE=tl.bfloat16, ALIGNED=aligned, **common)
        )
    for src, dst in (("fp16", "fp32"), ("bf16", "fp32"), ("fp32", "fp16"), ("fp32", "bf16")):
        types = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}
        for aligned in (False, True):
            results[f"cast-copy-{src}-to-{dst}-aligned{aligned}"] = compile_variant(
                cast_copy._cast_copy_kernel,
                dict(SRC_DTYPE=types[src], DST_DTYPE=types[dst], ALIGNED=aligned, **common),
            )
    results["increment-steps"] = compile_variant(
        adam._increment_steps_kernel, dict(HAS_FOUND_INF=True, BLOCK=1024)
    )
    # Triton turns an int argument equal to 1 into a constant: the defaults (raise_at_min=1)
    # launch that variant, and hysteresis=1 or scale_window=1 others; compile both extremes.
    scale_types = {
        "overflow_ptr": "*fp32", "scale_ptr": "*fp32", "error_ptr": "*fp32",
        "cur_hysteresis_ptr": "*i64", "cur_iter_ptr": "*i64", "last_overflow_iter_ptr": "*i64",
        "scale_window": "i32", "hysteresis": "i32", "consecutive": "i32", "raise_at_min": "i32",
        "record_ptr": "*fp32",
    }  # fmt: skip
    ints = ("scale_window", "hysteresis", "consecutive", "raise_at_min")
    for name, ones in (("loss-scale-update", ()), ("loss-scale-update-ones", ints)):
        types = {k: v for k, v in scale_types.items() if k not in ones}
        results[name] = compile_variant(
            loss_scale._update_loss_scale_kernel, {k: 1 for k in ones}, types=types
        )
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
