"""The optimizer-step benchmark (``python bench/run.py``; see bench/README.md).

- ``case``: what a benchmarked configuration is, and the params it runs on;
- ``ours``: fp16_triton's cases, one set per algorithm of ``fp16_triton/spec.py``, whose
  bytes-per-param figures are the spec's;
- ``theirs``: torch's and DeepSpeed's cases, with the traffic models of their pipelines;
- ``cases``: the registry of cases per section and how each section is measured;
- ``timing``: clocks, Triton launch counting and stubbing, profiler op counts;
- ``machine``: what a run was measured on;
- ``report``: derived figures, verdicts, the markdown, CSV and PNG outputs;
- ``profiling``: the CPU per-op breakdown (``--profile``);
- ``run``: the command line.
"""

from __future__ import annotations

import os

import torch

# TRITON_INTERPRET is read when @triton.jit decorates a kernel, so it must be set before
# fp16_triton.kernels is imported (lazily, by the optimizers and the launch counter): without
# a GPU the launch counts can only be taken through the interpreter. Every module of the
# package is imported after this one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
