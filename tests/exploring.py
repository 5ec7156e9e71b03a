"""How many examples the property tests run, and on which seed (see ``conftest.py``).

Under ``CI`` each property runs ``CI_SCALE`` times the examples it asks for locally (its
``examples(n)``), on a seed derived from the commit being tested; locally the counts are as
written and the seed is Hypothesis's own (random, with its example database). Both can be
overridden: ``FP16_TRITON_EXAMPLES_SCALE`` and ``FP16_TRITON_HYPOTHESIS_SEED``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

CI = bool(os.environ.get("CI"))
CI_SCALE = 1.5
"""CI's multiple of the local example counts, sized to the CI run's time budget. Raise it only
after timing the property-test files under ``CI=1``: examples drawn from a random seed cost
more, on average, than the few a derandomized profile used to replay."""
FALLBACK_SEED = 0
"""The seed under CI when the commit cannot be read (a source tree without git)."""


def scale() -> float:
    value = os.environ.get("FP16_TRITON_EXAMPLES_SCALE")
    return float(value) if value else (CI_SCALE if CI else 1.0)


def examples(n: int) -> int:
    """``n`` examples locally, ``scale() * n`` under CI (at least one)."""
    return max(1, round(n * scale()))


def commit_seed() -> tuple[int, str] | None:
    """(seed, where it came from) for this run, or None to leave Hypothesis its own seed.

    ``FP16_TRITON_HYPOTHESIS_SEED`` wins; under CI the seed is the first 8 hex digits of the
    commit (``git rev-parse HEAD``) as an integer, else ``FALLBACK_SEED``."""
    forced = os.environ.get("FP16_TRITON_HYPOTHESIS_SEED")
    if forced:
        return int(forced), "FP16_TRITON_HYPOTHESIS_SEED"
    if not CI:
        return None
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        return int(head[:8], 16), f"commit {head[:12]}"
    except (OSError, subprocess.SubprocessError, ValueError):
        return FALLBACK_SEED, "no git commit readable: the fixed fallback"
