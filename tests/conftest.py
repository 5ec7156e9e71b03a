"""Test set-up: run the Triton kernels through the interpreter when no GPU is present, and
choose what the property tests explore.

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a kernel, so it must be set before
``fp16_triton.kernels`` is imported; conftest.py is imported before any test module.

Property tests under ``CI`` (``tests/exploring.py``): each CI run is a fresh clone, so a
Hypothesis example database would always start empty there, and a derandomized profile replays
the same few examples per property on every commit forever. CI therefore seeds Hypothesis with
the commit being tested: every commit explores new examples, a rerun of one commit replays the
very same ones, and the seed is printed (in the header with ``-v``, and in the summary) so a
failure can be replayed anywhere with the line's ``FP16_TRITON_HYPOTHESIS_SEED`` and
``FP16_TRITON_EXAMPLES_SCALE`` (``print_blob`` also prints each failing example's blob). A forced
seed makes Hypothesis skip its database, which a fresh clone lacks anyway. CI also runs
``exploring.CI_SCALE`` times the examples each property asks for: one CI run of the whole
suite has a fixed time budget, while developers rerun single files often and want them quick.
Local runs keep Hypothesis's random seed and its database (``.hypothesis/``, ignored by git),
so they keep exploring and replay their own past failures first.
"""

import os

import pytest
import torch
from exploring import commit_seed, scale

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests that build several processes or train a model must not fight over the two CI cores.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

try:
    from hypothesis import settings
except ImportError:  # hypothesis is in the test extra; conftest must not need it otherwise
    pass
else:
    settings.register_profile("ci", print_blob=True)
    if os.environ.get("CI"):
        settings.load_profile("ci")

_SEED = commit_seed()


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Before Hypothesis's own pytest_configure, which reads the option; a seed given on the
    # command line wins.
    if _SEED is not None and getattr(config.option, "hypothesis_seed", "absent") is None:
        config.option.hypothesis_seed = str(_SEED[0])


def _seed_line(config) -> str | None:
    seed = getattr(config.option, "hypothesis_seed", None)
    if seed is None:
        return None
    origin = _SEED[1] if _SEED is not None and str(_SEED[0]) == str(seed) else "command line"
    return (
        f"hypothesis seed {seed} ({origin}), examples x{scale():g}; replay with "
        f"FP16_TRITON_HYPOTHESIS_SEED={seed} FP16_TRITON_EXAMPLES_SCALE={scale():g}"
    )


def pytest_report_header(config):
    return _seed_line(config)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    line = _seed_line(config)
    if line is not None:
        terminalreporter.write_line(line)
