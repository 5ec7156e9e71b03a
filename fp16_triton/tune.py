"""``fp16-triton tune``: time each kernel's launch configurations on this GPU, keep the best.

Trials run on scratch tensors made here (never on a model's live data: the step kernels update
in place), over a representative mix of one large tensor and many small ones, with
``triton.testing.do_bench`` medians. The winners go to the per-user cache file of
``kernels.launch_config`` under a key of GPU name, compute capability, Triton version and the
kernels' version, and are read once per process at the first launch: training never autotunes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Sequence

import torch
from tqdm import tqdm

from .geometry_check import check_candidate
from .kernels import launch_config as lc

logger = logging.getLogger(__name__)

Timer = Callable[[Callable[[], None]], float]
"""Runs a function repeatedly and returns its median time in ms."""

# One large tensor (64M elements: ~2 GB of Adam traffic, so kernel time dominates host time)
# and a thousand small ones (the per-program table loads matter there).
DEFAULT_SIZES = (1 << 26,) + (4096,) * 1000
QUICK_SIZES = (1 << 24,) + (4096,) * 200


def do_bench_median(fn: Callable[[], None]) -> float:
    """Median time of ``fn`` in ms by ``triton.testing.do_bench`` (warm-up 25 ms, 100 ms)."""
    import triton.testing

    result = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5])
    return float(result[0] if isinstance(result, (list, tuple)) else result)


def kernel_names() -> tuple[str, ...]:
    """Every kernel with a launch configuration: the device layer's own, then each registered
    algorithm's step kernel (``fp16_triton/spec.py``)."""
    from .spec import algorithms

    return (*lc.KERNELS, *algorithms())


def _workloads(device: torch.device, sizes: Sequence[int]) -> dict[str, Callable]:
    """For each kernel, a function that builds scratch inputs (fp16 params and grads, fp32
    masters and state) and returns ``prepare(cache) -> launch``. For the step kernels the
    launch is the bare kernel launch (host preparation done in ``prepare``), on the inputs of
    the algorithm's spec (``Algorithm.example``); the check and unscale launchers include
    their table look-up, which is small beside the 64M-element tensor's traffic."""
    from .kernels.nonfinite import nonfinite_check_and_norm, unscale_and_check_
    from .spec import algorithms

    def tensors(dtype):
        return [torch.randn(n, device=device).to(dtype) for n in sizes]

    def scalar(value):
        return torch.full((), value, device=device, dtype=torch.float32)

    def check():
        grads, scale = tensors(torch.float16), scalar(1024.0)
        return lambda cache: lambda: nonfinite_check_and_norm(grads, grad_scale=scale, cache=cache)

    def unscale():
        grads, found, inv = tensors(torch.float16), scalar(0.0), scalar(1.0)
        return lambda cache: lambda: unscale_and_check_(grads, found, inv, cache=cache)

    def step(algorithm):
        def build():
            args, kwargs = algorithm.example(sizes, device, torch.float16)
            return lambda cache: algorithm.prepare(*args, cache=cache, **kwargs)

        return build

    def cast_copy():  # model grads into fp32 master grads
        from .kernels.cast_copy import prepare_cast_copy

        grads = tensors(torch.float16)
        master_grads = [torch.zeros(n, device=device) for n in sizes]
        return lambda cache: prepare_cast_copy(master_grads, grads, cache=cache)

    workloads = {"nonfinite_check": check, "unscale": unscale, "cast_copy": cast_copy}
    workloads.update({name: step(a) for name, a in algorithms().items()})
    return workloads


def tune(
    device: torch.device | str = "cuda",
    kernels: Sequence[str] | None = None,
    sizes: Sequence[int] = DEFAULT_SIZES,
    candidates: Sequence[dict[str, int]] = tuple(lc.CANDIDATES),
    timer: Timer | None = None,
    progress: bool = True,
) -> dict[str, dict]:
    """Check, then time, every candidate configuration of every kernel; return
    ``{kernel: {"config": best, "ms": its median, "trials": [(config, ms), ...],
    "refused": [(config, why), ...]}}``. A candidate whose results differ from the pure-torch
    reference (``check_candidate``) is never timed, so it can never be picked; a kernel whose
    every candidate is refused is left out (it keeps the shipped or default configuration)."""
    from .kernels.multi_tensor import TableCache

    device = torch.device(device)
    kernels = kernel_names() if kernels is None else kernels
    timer = timer or do_bench_median
    workloads = _workloads(device, sizes)
    results = {}
    bar = tqdm(total=len(kernels) * len(candidates), desc="tune", disable=not progress)
    for kernel in kernels:
        prepare = workloads[kernel]()
        trials, refused = [], []
        for config in candidates:
            problem = check_candidate(kernel, config, device)
            if problem is not None:
                logger.warning("refusing %s config %r: %s", kernel, dict(config), problem)
                refused.append((dict(config), problem))
                bar.update()
                continue
            with lc.override(kernel, config):
                launch = prepare(TableCache())  # tables built here, outside the timing
                launch()
                trials.append((dict(config), timer(launch)))
            bar.update()
        if not trials:  # nothing usable: keep whatever launch_config resolves to now
            logger.error("every %s candidate was refused; %s is left untuned", kernel, kernel)
            continue
        best, best_ms = min(trials, key=lambda t: t[1])
        results[kernel] = {"config": best, "ms": best_ms, "trials": trials, "refused": refused}
    bar.close()
    return results


def save(results: dict[str, dict], device: torch.device | str = "cuda") -> str:
    """Merge ``results`` into the cache file under this device's key (atomic write); return
    the file's path. The next process (or ``launch_config.reload()``) uses them."""
    device = torch.device(device)
    path = lc.cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = {}
    if path.is_file():
        try:
            entries = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            entries = {}  # an unreadable cache is replaced, not merged
    entries[lc.device_key(device)] = {
        "date": datetime.date.today().isoformat(),
        "configs": {k: r["config"] for k, r in results.items()},
        "ms": {k: r["ms"] for k, r in results.items()},
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(entries, f, indent=2)
    os.replace(tmp, path)
    lc.reload()
    return str(path)


def show(device: torch.device | str) -> str:
    """The configuration in effect on ``device`` and where it came from, as text."""
    device = torch.device(device)
    _, source = lc.config_source(device)
    lines = [f"device: {device} ({lc.device_key(device)})", f"source: {source}"]
    lines += [f"  {kernel}: {lc.launch_config(kernel, device)}" for kernel in kernel_names()]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fp16-triton tune``."""
    parser.add_argument("--show", action="store_true", help="print the configuration in effect")
    parser.add_argument("--quick", action="store_true", help="smaller trial tensors")
    names = kernel_names()
    parser.add_argument("--kernels", nargs="+", choices=names, default=list(names))


def main(args: argparse.Namespace) -> int:
    """Run ``fp16-triton tune``."""
    has_gpu = torch.cuda.is_available()
    if args.show:
        print(show("cuda" if has_gpu else "cpu"))
        return 0
    if not has_gpu:
        print(
            "fp16-triton tune needs a GPU, and torch.cuda.is_available() is False on this "
            "machine: nothing was tuned. (On CPU the kernels run only through Triton's "
            "interpreter, with the generic defaults; `fp16-triton tune --show` prints them.)",
            file=sys.stderr,
        )
        return 1
    results = tune("cuda", args.kernels, QUICK_SIZES if args.quick else DEFAULT_SIZES)
    path = save(results, "cuda")
    for kernel, r in results.items():
        print(f"{kernel}: {r['config']} {r['ms']:.3f} ms")
    print(f"saved to {path}")
    return 0
