"""Benchmark of the fp16_triton optimizer step against torch (and DeepSpeed when installed).

One command, ``python bench/run.py`` (``--quick`` for a short run, ``--sizes`` to override the
parameter counts, ``--out DIR``, default ``bench/results/``), writes ``results.md`` (also
printed), the same report as ``<YYYY-MM-DD>-<machine>.md`` (the results file to commit),
``results.csv`` and ``results.png`` to DIR. Step times are medians (host time per step is a
mean), and every ratio is computed from two timings of the same run.

On a GPU it measures (see bench/README.md for the full list):

* the large-model step of ours, ``FP16Optimizer(AdamW(backend="triton"), clip_grad=1.0)`` on
  fp16 params with fp32 master and moments, against torch's native AMP recipe, torch's fused
  AdamW on fp16 params, a ``torch.compile``d AdamW step, DeepSpeed's FP16_Optimizer with
  FusedAdam, and each other algorithm of ours (SGD with momentum) against torch's fused one;
  effective bandwidth by the bytes-per-param models, also as a fraction of a
  device-to-device copy;
* many small tensors (10,000 x 4,096) against one flat tensor of the same total: step time,
  launches per step and host time per step, with per-tensor storage and with
  ``flat_buffers=True``.

On a CPU-only machine it measures the pure-torch reference backend of ours against torch's
foreach optimizers, counts the Triton launches per step through the interpreter, and
measures the host (Python) time per step of the Triton path at 10,000 tensors with the kernel
launches stubbed out (the launches' own cost needs a GPU).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: import bench/ as the package it is, from the repository root, rather
    # than its modules as top-level ones.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import shlex  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from functools import partial  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench import cases, machine, profiling, report  # noqa: E402
from bench.case import Row, split_sizes  # noqa: E402
from bench.timing import CpuTimer, Timer, gpu_timer  # noqa: E402

GPU_SIZES = [10**6, 10**7, 10**8, 10**9]
GPU_SIZES_QUICK = [10**7, 10**8]
CPU_SIZES = [10**6, 10**8]
CPU_SIZES_QUICK = [10**6, 10**7]
SMALL_TENSORS = 10_000  # the many-small-tensors case on a GPU
SMALL_NUMEL = 4_096
HOST_NUMEL = 64  # elements per tensor of the CPU host-time case (the launches are stubbed)
INTERP_NUMEL = 64  # elements per tensor of the interpreter launch-count case


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    parser.add_argument(
        "--sizes",
        type=lambda s: [int(float(x)) for x in s.split(",")],
        help="comma-separated parameter counts (e.g. 1e6,1e8); default by device and --quick",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--skip", default="", help="comma-separated case keys to leave out (e.g. compiled)"
    )
    parser.add_argument("--rounds", type=int, help="CPU timings per case (median); 11, quick 5")
    parser.add_argument(
        "--interp-tensors",
        type=int,
        help=f"CPU: tensors of {INTERP_NUMEL} elements in the interpreter launch count "
        "(default 300, quick 64)",
    )
    parser.add_argument(
        "--host-tensors",
        type=int,
        help=f"CPU: tensors of {HOST_NUMEL} elements in the host-time case (default "
        f"{SMALL_TENSORS:,})",
    )
    parser.add_argument(
        "--copy-mb", type=int, help="copy buffer in MiB (default GPU 1024, CPU 256, quick 64)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="CPU: per-op breakdown of ours vs torch's steps"
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's); 1 is steadier on a machine other jobs load",
    )
    return parser.parse_args(argv)


def plan(
    args: argparse.Namespace, timer: Timer, device: torch.device
) -> list[tuple[str, Callable[[], Row | list[Row]]]]:
    """The run as a list of (label, task): each task returns its row(s), so the progress bar
    can name what runs. Options: sizes, --skip keys, repetitions (see ``parse_args``)."""
    skip = {k for k in args.skip.split(",") if k}
    copy_mb = args.copy_mb or (1024 if device.type == "cuda" else 64 if args.quick else 256)
    tasks = [("copy", partial(cases.run_copy, copy_mb * 2**20, timer, device))]
    if device.type == "cuda":
        for size in args.sizes or (GPU_SIZES_QUICK if args.quick else GPU_SIZES):
            for case in cases.GPU_CASES:
                if case.key not in skip:
                    task = partial(cases.run_case, case, split_sizes(size), timer, device)
                    tasks.append((f"{case.key} {size:.0e}", task))
        if "small" not in skip:
            task = partial(cases.run_small_tensors, SMALL_TENSORS, SMALL_NUMEL, timer, device)
            tasks.append(("small tensors", task))
        return tasks
    rounds = args.rounds or (5 if args.quick else 11)
    for size in args.sizes or (CPU_SIZES_QUICK if args.quick else CPU_SIZES):
        for pair in cases.CPU_PAIRS:
            if pair[0].key not in skip:
                task = partial(cases.run_cpu_pair, pair, size, timer, rounds, device)
                tasks.append((f"{pair[0].key} {size:.0e}", task))
    if "launches" not in skip:
        n_tensors = args.interp_tensors or (64 if args.quick else 300)
        task = partial(cases.run_interpreter_launches, n_tensors, INTERP_NUMEL)
        tasks.append(("launches", task))
    if "host" not in skip:
        n_tensors = args.host_tensors or SMALL_TENSORS
        tasks.append(("host time", partial(cases.run_host_overhead, n_tensors, HOST_NUMEL)))
    return tasks


def main(argv: Sequence[str] | None = None, timer: Timer | None = None) -> list[Row]:
    """Run the benchmark, print the report and write it (``results.md`` and the dated
    results file), ``results.csv`` and ``results.png`` to ``--out``. ``timer`` replaces the
    clock (tests). Returns the rows."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if timer is None:
        timer = gpu_timer if device.type == "cuda" else CpuTimer()
    env = machine.environment(device)
    if not env.gpu:
        print(report.GPU_NOTE)
    rows: list[Row] = []
    progress = tqdm(plan(args, timer, device), desc="bench", file=sys.stderr)
    for label, task in progress:
        progress.set_postfix_str(label)
        result = task()
        rows.extend(result if isinstance(result, list) else [result])
    progress.close()
    report.add_derived(rows)
    text = report.markdown(rows, env, shlex.join(["python", "bench/run.py", *argv]))
    if args.profile and not env.gpu:
        text += "\n## Profile: ops called by the step (torch.profiler, inclusive times)\n"
        for size in args.sizes or (CPU_SIZES_QUICK if args.quick else CPU_SIZES):
            for pair in cases.CPU_PAIRS:
                text += "\n" + profiling.profile_breakdown(pair, size)
    paths = report.write_outputs(text, rows, env, args.out)
    print(text)
    print(f"wrote {paths[0]}, {', '.join(p.name for p in paths[1:])}")
    return rows


if __name__ == "__main__":
    main()
