"""The kernels compile for a real GPU (NVIDIA sm_90), checked on any machine.

The CPU tests run the kernels through Triton's interpreter, which accepts some code a GPU
compiler would not (and ignores compiler hints). This test compiles every kernel variant
ahead of time for Hopper with Triton's own compiler and ptxas, no GPU needed, and reads the
PTX: the ALIGNED variants must use 128-bit loads (the reason for their alignment hints), and
no fp32 division may be approximate (Triton's ``/`` is ``div.full.f32`` on NVIDIA; the kernels
use ``tl.div_rn`` to match torch's IEEE division), and no fp32 FMA may appear where a kernel
does not ask for one with ``tl.fma`` (``EXACT_ARITHMETIC`` turns the compiler's contraction off,
so GPUs round as the interpreter and the torch reference do).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "gpu_compile.py"


@pytest.fixture(scope="module")
def variants():
    pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # today's default, stated (silences a warning)
    result = subprocess.run(
        [sys.executable, str(WORKER)], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_every_variant_compiles_for_sm90(variants):
    failed = {name: v["error"] for name, v in variants.items() if not v["ok"]}
    assert not failed, failed
    assert len(variants) >= 16


def test_aligned_variants_use_128_bit_loads(variants):
    for name, v in variants.items():
        if "alignedTrue" in name:
            assert v["vector_loads"] > 0, name
        if "alignedFalse" in name:
            assert v["vector_loads"] == 0, name  # the hint is what makes the difference


def test_no_approximate_fp32_division(variants):
    assert not [name for name, v in variants.items() if v["approx_div"]]


def test_fp32_fmas_only_where_a_kernel_asks_for_one(variants):
    """Muon's kernels call ``tl.fma`` (torch's lerp and ``add_(alpha=)`` round once); no other
    kernel may contain an FMA, which the compiler would have contracted from ``a * b + c``."""
    assert any(v["fma"] for name, v in variants.items() if "muon" in name)
    assert not [name for name, v in variants.items() if v["fma"] and "muon" not in name]


def test_every_launch_passes_exact_arithmetic(monkeypatch):
    """Every kernel launch carries ``EXACT_ARITHMETIC`` (``enable_fp_fusion=False``). The
    interpreter ignores the option and the compile above sets it itself, so only this catches
    a launch that forgot it: one step of each algorithm (LAMB with its clipping pass), the
    recipe's check pass and loss-scale update, unscaling and the cast copy, with every kernel
    of ``kernels/`` recorded (in this process, through the interpreter)."""
    import importlib
    import pkgutil

    import torch
    from triton.runtime.interpreter import InterpretedFunction

    import fp16_triton
    import fp16_triton.kernels as package
    from fp16_triton.kernels import cast_copy, nonfinite, quantize

    launches = []
    kernels = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, value in vars(module).items():
            launched = name.endswith("_kernel")  # the others are @triton.jit helpers
            if launched and isinstance(value, InterpretedFunction):
                kernels[name] = value
    for name, kernel in kernels.items():
        # Per kernel (a patch of the class would miss a kernel another test patched before).
        def run(*args, _name=name, _run=kernel.run, **kwargs):
            launches.append((_name, kwargs.get("enable_fp_fusion")))
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", run)
    monkeypatch.setenv("FP16_TRITON_BACKEND", "triton")  # the loss-scale update's kernel too

    def grads(params):
        for p in params:
            p.grad = torch.ones_like(p)
        return params

    vector = lambda dtype: [torch.nn.Parameter(torch.randn(40).to(dtype))]  # noqa: E731
    scaler = fp16_triton.DynamicLossScaler(init_scale=4.0)
    inner = fp16_triton.AdamW(grads(vector(torch.float16)), backend="triton")
    fp16_triton.FP16Optimizer(inner, loss_scaler=scaler, clip_grad=1.0).step()
    fp16_triton.SGD(grads(vector(torch.float16)), momentum=0.9, backend="triton").step()
    fp16_triton.Lion(grads(vector(torch.float16)), backend="triton").step()
    fp16_triton.Lamb(grads(vector(torch.float32)), max_grad_norm=1.0, backend="triton").step()
    matrix = [torch.nn.Parameter(torch.randn(8, 6))]
    fp16_triton.Muon(grads(matrix), backend="triton").step()
    halves = [torch.randn(40).half()]
    nonfinite.unscale_and_check_(halves, torch.zeros(()), torch.tensor(0.5))
    cast_copy.cast_copy_([torch.empty(40)], halves)
    block = torch.rand(quantize.BLOCK)
    quantize.roundtrip(block, block, torch.ones(1), torch.ones(1))
    assert len(kernels) >= 12
    assert {name for name, _ in launches} == set(kernels), sorted(kernels)
    assert all(option is False for _, option in launches), launches
