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

# CI runs the property tests on a fixed sequence of examples, so that a run is reproducible
# and a landing never depends on luck; local runs keep exploring new examples (and report
# any failure with the seed to reproduce it).
try:
    from hypothesis import settings
except ImportError:  # hypothesis is in the test extra; conftest must not need it otherwise
    pass
else:
    settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI"):
        settings.load_profile("ci")
