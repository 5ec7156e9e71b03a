"""Where a CPU step's time goes (``--profile``): torch.profiler's per-op times of ours against
torch's counterparts."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from .case import Case, split_sizes
from .report import num
from .timing import release


def profile_breakdown(group: Sequence[Case], size: int, steps: int = 3) -> str:
    """Per top-level torch op, ms per step for each case of ``group`` (inclusive time of the
    ops called directly by the step; "python and other" is the rest of the step's wall
    time), as a markdown table."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device("cpu")
    sizes = split_sizes(size)
    per_case: dict[str, dict[str, float]] = {}
    for case in group:
        step = case.setup(sizes, device)
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                step()
            wall_ms = (time.perf_counter() - start) * 1e3 / steps
        ops: dict[str, float] = {}
        for event in prof.events():
            # The ops the step calls directly: children of torch's "Optimizer.step#..."
            # range (or top level, for a step outside one), each with its inclusive time.
            parent = event.cpu_parent
            if event.name.startswith("Optimizer.step"):
                continue
            if parent is None or (parent.name.startswith("Optimizer.step")):
                ops[event.name] = ops.get(event.name, 0.0) + event.cpu_time_total / 1e3 / steps
        ops["python and other"] = wall_ms - sum(ops.values())
        ops["step (wall)"] = wall_ms
        per_case[case.key] = ops
        step = None
        release(device)
    keys = list(per_case)
    names = sorted(
        set().union(*per_case.values()),
        key=lambda n: -max(per_case[k].get(n, 0.0) for k in keys),
    )
    lines = [
        f"| op ({size:,} params) | " + " | ".join(f"{k} ms/step" for k in keys) + " |",
        "|" + "|".join(" --- " for _ in range(len(keys) + 1)) + "|",
    ]
    for name in names:
        cells = [num(per_case[k].get(name), 1, ".2f") for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
