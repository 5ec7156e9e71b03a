"""The sections of the benchmark: which cases each runs (the registry) and how each is
measured. Ours come from ``ours.py`` (one set per algorithm of the spec), torch's and
DeepSpeed's from ``theirs.py``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

import fp16_triton
from fp16_triton.spec import algorithms

from . import ours, theirs
from .case import Case, Row, Unavailable, fits, split_sizes
from .timing import (
    Timer,
    device_ops,
    host_time,
    interleaved,
    release,
    stubbed_launches,
    triton_everywhere,
    triton_launches,
)

# dst.copy_(src) reads and writes each byte once; the copy row's "size" is in bytes.
BYTES_COPY = 2


# ------------------------------------------------------------------------------ registry
OURS_ADAMW = ours.OURS_ADAMW
SMALL_FLATBUF = ours.SMALL_FLATBUF


def _gpu_cases() -> list[Case]:
    """The recipe and the baselines it is compared with, the recipe with compact state, then
    each other algorithm of ours on the Triton path followed by torch's counterparts."""
    cases = [OURS_ADAMW, *theirs.VS_RECIPE, *ours.COMPACT]
    for name, case in ours.gpu_cases().items():
        cases += [case, *theirs.GPU_COUNTERPARTS.get(name, [])]
    return cases


GPU_CASES = _gpu_cases()
# Ours on the foreach reference, each with torch's foreach counterparts (timed together).
CPU_PAIRS = [
    (case, *theirs.CPU_COUNTERPARTS.get(name, [])) for name, case in ours.cpu_cases().items()
]
# The recipe on the foreach reference with each compact-state mode (timed together).
CPU_PAIRS.append((ours.CPU_RECIPE, *ours.CPU_COMPACT))
# Counted through the interpreter: the recipe, with flat buffers and compact state, and every
# other algorithm.
LAUNCH_CASES = [OURS_ADAMW, SMALL_FLATBUF, *ours.COMPACT, *ours.gpu_cases().values()]


# ------------------------------------------------------------------------------ measuring
def run_case(
    case: Case,
    sizes: Sequence[int],
    timer: Timer,
    device: torch.device,
    section: str = "large",
    host_steps: int = 0,
) -> Row:
    """Set up ``case`` for tensors of ``sizes`` and measure one step: median time, Triton
    launches (ours), GPU ops (profiler, on a GPU) and, with ``host_steps``, the mean host time
    per step over that many steps.
    A case that does not fit in free memory is skipped with a note."""
    total = sum(sizes)
    row = Row(section, case.key, case.label, total, len(sizes), vs=case.vs)
    row.bytes_per_param = case.bytes_per_param
    ok, why = fits(case.memory_per_param * total, device)
    if not ok:
        row.note = why
        return row
    try:
        step = case.setup(sizes, device)
        step()  # lazy state, launch tables, compilation: not part of a step
        row.time_s = timer(step)
        if case.triton:
            row.triton_launches = triton_launches(step)
        row.device_ops = device_ops(step, device)
        if host_steps:
            row.host_s = host_time(step, device, host_steps)
    except Unavailable as error:
        row.note = str(error)
    except Exception as error:
        if not case.fragile:
            raise
        row.time_s = None
        row.note = f"failed: {type(error).__name__}: {str(error)[:150]}"
    finally:
        step = None  # drop the params before the next case allocates
        release(device)
    return row


def run_copy(nbytes: int, timer: Timer, device: torch.device) -> Row:
    """``dst.copy_(src)`` of ``nbytes``: the bandwidth the steps are compared with."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    label = "device-to-device copy" if device.type == "cuda" else "host memory copy"
    row = Row("copy", "copy", f"{label} dst.copy_(src) (size = bytes)", nbytes, 1)
    row.bytes_per_param = BYTES_COPY
    dst.copy_(src)
    row.time_s = timer(lambda: dst.copy_(src))
    return row


def run_small_tensors(
    n_tensors: int, numel: int, timer: Timer, device: torch.device, host_steps: int = 100
) -> list[Row]:
    """Many small tensors against one flat tensor of the same total: ours (the recipe, with
    per-tensor storage and ``flat_buffers=True``) and torch's fused AdamW (fp32), each with
    its step time, launches and host time (mean over ``host_steps`` steps)."""
    rows = []
    for layout, sizes in (("many", [numel] * n_tensors), ("flat", [n_tensors * numel])):
        shape = f"{len(sizes):,} x {sizes[0]:,}"
        mine = ours.recipe_case(f"ours-{layout}", shape=shape)
        cases = [mine, theirs.fused_adamw_fp32(f"torch-{layout}", shape, mine.key)]
        if layout == "many":
            cases.insert(1, SMALL_FLATBUF)
        for case in cases:
            row = run_case(case, sizes, timer, device, section="small", host_steps=host_steps)
            rows.append(row)
    return rows


def _clean_check_pass(optimizer) -> None:
    """Zero the check pass's partial sums once: its stubbed kernel never writes them, so every
    step then reads "no inf/nan", as a real steady step does (left as they are, they would make
    every step a skipped one, with a log line each)."""
    for cache in optimizer._caches.values():
        for buffer in cache.scratch.values():
            if isinstance(buffer, torch.Tensor):
                buffer.zero_()


def run_host_overhead(n_tensors: int, numel: int, host_steps: int = 100) -> list[Row]:
    """CPU: host seconds per step of ours on the Triton path (interpreter), for ``n_tensors``
    tensors of ``numel``, per-tensor storage against ``flat_buffers=True``, with the kernel
    launches stubbed: the Python work of a step alone, which a GPU run adds to the launches'
    own cost. The last row keeps bf16 params with remainder masters in flat buffers: the
    remainders add one pass over the params' version counters (``masters.Fingerprints``)."""
    device = torch.device("cpu")
    name = ours.optimizer_of(algorithms()[ours.HEADLINE])[0].__name__
    remainders = dict(master_weights="remainder")
    rows = []
    for key, flat, modes in (
        ("ours-host", False, None),
        ("ours-host-flatbuf", True, None),
        ("ours-host-flatbuf-remainder", True, remainders),
    ):
        storage = "flat_buffers=True" if flat else "per-tensor storage"
        state = ", bf16 + remainders" if modes else ""
        label = f"ours: FP16Optimizer({name} triton, clip 1.0), {storage}{state}"
        row = Row("host", key, label, n_tensors * numel, n_tensors)
        scaler = fp16_triton.DynamicLossScaler(raise_error_at_min_scale=False)
        optimizer = ours.build_recipe([numel] * n_tensors, device, flat, modes, loss_scaler=scaler)
        step = optimizer.step
        with stubbed_launches(), triton_everywhere():
            step()  # state, buckets, tables (and flat adoption) are built here, once
            _clean_check_pass(optimizer)
            row.host_s = host_time(step, device, host_steps)
        row.note = "kernel launches stubbed: host work only"
        rows.append(row)
        step = None
        release(device)
    return rows


def run_cpu_pair(
    pair: Sequence[Case], size: int, timer: Timer, rounds: int, device: torch.device
) -> list[Row]:
    """Ours and torch's counterparts at ``size`` params on the CPU, timed in alternation (the
    CPU is shared and noisy: alternating gives them all the same conditions)."""
    sizes = split_sizes(size)
    steps = {case.key: case.setup(sizes, device) for case in pair}
    medians = interleaved(steps, timer, rounds)
    rows = []
    for case in pair:
        row = Row("cpu", case.key, case.label, size, len(sizes), vs=case.vs)
        row.bytes_per_param = case.bytes_per_param
        row.time_s = medians[case.key]
        rows.append(row)
    steps = None
    release(device)
    return rows


def run_interpreter_launches(n_tensors: int, numel: int) -> list[Row]:
    """Triton launches per step of ours, counted through the interpreter on the CPU for
    ``n_tensors`` tensors of ``numel`` and for one tensor of the same total (the counts must
    be equal). One step each, no timing: the interpreter says nothing about GPU speed.
    Everything that takes the Triton path on a GPU takes it here (the loss-scale update
    included), so the counts are a GPU's."""
    device = torch.device("cpu")
    rows = []
    with triton_everywhere():
        for case in LAUNCH_CASES:
            for sizes in ([numel] * n_tensors, [n_tensors * numel]):
                row = Row("launches", case.key, case.label, sum(sizes), len(sizes), vs=case.vs)
                # The first step allocates state and builds tables, launching exactly what
                # every later step launches; one step is enough (each costs seconds
                # interpreted).
                row.triton_launches = triton_launches(case.setup(sizes, device))
                row.note = "Triton interpreter: launches only"
                rows.append(row)
    return rows
