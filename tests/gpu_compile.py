"""Compile every kernel ahead of time for an NVIDIA Hopper GPU (sm_90), with no GPU present.

Run by tests/test_gpu_compile.py in a fresh process *without* TRITON_INTERPRET (the kernels
must be defined as compiled JIT functions). Prints one JSON object: for each variant, whether
it compiled and facts read off its PTX (128-bit loads, approximate divisions, fp32 FMAs,
fp64 use), compiled with the options every launch passes (``EXACT_ARITHMETIC``).
"""

from __future__ import annotations

import json
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fp16_triton.kernels import cast_copy, loss_scale, nonfinite, quantize  # noqa: E402
from fp16_triton.kernels.multi_tensor import EXACT_ARITHMETIC  # noqa: E402

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
        options = {"num_warps": 4, **EXACT_ARITHMETIC}
        ptx = triton.compile(source, target=TARGET, options=options).asm["ptx"]
    except Exception as e:  # reported, not raised: the test names the failing variant
        return {"ok": False, "error": f"{type(e).__name__}: {str(e)[:2000]}"}
    return {
        "ok": True,
        "vector_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx)),
        "approx_div": "div.full.f32" in ptx or "div.approx.f32" in ptx,
        "fma": len(re.findall(r"\bfma\.rn(?:\.ftz)?\.f32", ptx)),
    }


def main() -> None:
    from fp16_triton.spec import algorithms

    results = {}
    modules = [nonfinite, loss_scale, cast_copy, quantize] + [
        a.kernel_module() for a in algorithms().values()
    ]
    for module in modules:
        results.update(module.compile_variants(compile_variant))
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
