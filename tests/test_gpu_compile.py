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
