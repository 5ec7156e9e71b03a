"""Launch configurations (elements per program, block size, warps) for each kernel.

Kept in our own code rather than in ``triton.autotune``: autotuning with several configs fails
on a CPU-only host, and autotuning an in-place kernel on live data would apply the update once
per trial. Per-GPU tuned values replace these defaults once the tuning command exists.

Why these defaults: an optimizer step is memory-bound; 1024-element blocks with 4 warps give
each thread 8 contiguous elements (two 128-bit loads of fp32), and 4 blocks per program amortise
the per-program table loads while keeping enough programs in flight for small tensors. They are
starting points, not measurements.
"""

from __future__ import annotations

import torch

DEFAULT_CONFIGS: dict[str, dict[str, int]] = {
    "nonfinite_check": {"BLOCK": 1024, "CHUNK": 4096, "num_warps": 4},
    "unscale": {"BLOCK": 1024, "CHUNK": 4096, "num_warps": 4},
    "adam": {"BLOCK": 1024, "CHUNK": 4096, "num_warps": 4},
    "sgd": {"BLOCK": 1024, "CHUNK": 4096, "num_warps": 4},
}


def launch_config(kernel: str, device: torch.device) -> dict[str, int]:
    """The launch configuration of ``kernel`` on ``device`` (a copy: callers may modify it)."""
    return dict(DEFAULT_CONFIGS[kernel])
