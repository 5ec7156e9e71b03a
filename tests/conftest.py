"""Test set-up: run the Triton kernels through the interpreter when no GPU is present.

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a kernel, so it must be set before
``fp16_triton.kernels`` is imported; conftest.py is imported before any test module.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests that build several processes or train a model must not fight over the two CI cores.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
