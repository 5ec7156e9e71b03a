"""Clocks and counters: step timers, host time per step, Triton launch counting and stubbing,
GPU op counts from the profiler."""

from __future__ import annotations

import gc
import importlib
import os
import pkgutil
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from tqdm import tqdm

import fp16_triton

# A timer takes a step function and returns seconds per call: do_bench's median on a GPU, one
# batch's mean on the CPU (``interleaved`` takes the median of several). Injected so the tests
# can run every case with a fake clock; the real ones are ``gpu_timer`` and ``CpuTimer``.
Timer = Callable[[Callable[[], object]], float]


def gpu_timer(fn: Callable[[], object]) -> float:
    """Median seconds per call with ``triton.testing.do_bench`` (warm-up and rep in ms; it
    runs ``fn`` before timing, so lazy state and compilation are excluded)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3


class CpuTimer:
    """Seconds per call of ``fn`` on the CPU, from ``time.perf_counter``.

    A fast ``fn`` is called repeatedly until ``min_time_s`` has passed and the mean per call
    is returned, so that a timing is never a single sub-millisecond sample; callers take the
    median over several such timings (``interleaved``).
    """

    def __init__(self, min_time_s: float = 0.1, max_calls: int = 1000):
        self.min_time_s = min_time_s
        self.max_calls = max_calls

    def __call__(self, fn: Callable[[], object]) -> float:
        calls = 0
        start = time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= self.min_time_s or calls >= self.max_calls:
                return elapsed / calls


def interleaved(
    fns: dict[str, Callable[[], object]], timer: Timer, rounds: int
) -> dict[str, float]:
    """Median over ``rounds`` of ``timer(fn)`` for each fn, alternating between them each
    round so that a slow spell of a shared machine hits every case alike. Each fn is called
    once first (lazy state allocation is not part of a step)."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(timer(fn))
    return {name: statistics.median(times) for name, times in samples.items()}


def host_time(
    step: Callable[[], object], device: torch.device, n: int = 100, warmup: int = 10
) -> float:
    """Mean host seconds per ``step()`` over ``n`` steps after ``warmup`` untimed ones:
    perf_counter around each call, no synchronize inside the loop (only before and after), so
    it is the CPU cost of issuing a step. The warm-up matters: the first steps after set-up
    take several times longer, as caches and Python's adaptive interpreter warm up."""
    for _ in range(warmup):
        step()
    sync(device)
    total = 0.0
    for _ in range(n):
        start = time.perf_counter()
        step()
        total += time.perf_counter() - start
    sync(device)
    return total / n


def sync(device: torch.device) -> None:
    """Wait for the GPU (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Free what a finished case held before the next one allocates (a compiled step's
    graph keeps references to its size's tensors, hence the dynamo reset)."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------ launch counting
def kernel_objects() -> list:
    """The Triton kernels of every module of ``fp16_triton.kernels`` (JITFunction, or
    InterpretedFunction under the interpreter), each once: a new kernel module is counted
    without naming it here."""
    from triton.runtime.jit import KernelInterface

    import fp16_triton.kernels as package

    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, KernelInterface):
                found[id(obj)] = obj
    return list(found.values())


@contextmanager
def _patched_launches(make_run: Callable) -> Iterator[None]:
    """Inside the block each of our Triton kernels' ``run`` is ``make_run(original run)``.

    ``kernel[grid](...)`` calls ``kernel.run(..., grid=grid, warmup=False)``, looking ``run``
    up on the instance at call time (triton 3.x, JIT and interpreter alike), so an instance
    attribute catches every launch; deleting it restores the class's method. Helper
    ``@triton.jit`` functions called inside kernels never go through ``run``.
    """
    kernels = kernel_objects()
    for kernel in kernels:
        kernel.run = make_run(kernel.run)
    try:
        yield
    finally:
        for kernel in kernels:
            del kernel.run


@contextmanager
def count_triton_launches() -> Iterator[dict[str, int]]:
    """Count the Triton kernel launches of fp16_triton.kernels inside the block."""
    counter = {"launches": 0}

    def wrap(original):
        """``original`` (a bound ``run``), counting each real launch."""

        def run(*args, **kwargs):
            if not kwargs.get("warmup", False):
                counter["launches"] += 1
            return original(*args, **kwargs)

        return run

    with _patched_launches(wrap):
        yield counter


@contextmanager
def stubbed_launches() -> Iterator[None]:
    """Inside the block our Triton kernels are not run (their ``run`` returns at once), so
    that a step's time is the host work that prepares the launches."""
    with _patched_launches(lambda original: lambda *args, **kwargs: None):
        yield


def triton_launches(step: Callable[[], object]) -> int:
    """Triton launches made by one call of ``step``."""
    with count_triton_launches() as counter:
        step()
    return counter["launches"]


@contextmanager
def triton_everywhere() -> Iterator[None]:
    """Inside the block everything of ours takes the Triton path, as on a GPU (on the CPU the
    loss-scale update would otherwise take its torch-op reference)."""
    old = os.environ.get(fp16_triton.BACKEND_ENV)
    os.environ[fp16_triton.BACKEND_ENV] = "triton"
    try:
        yield
    finally:
        if old is None:
            del os.environ[fp16_triton.BACKEND_ENV]
        else:
            os.environ[fp16_triton.BACKEND_ENV] = old


def device_ops(step: Callable[[], object], device: torch.device) -> int | None:
    """GPU operations (kernels, copies, memsets: every launch, torch's own included) of one
    ``step`` as seen by torch.profiler; None on a CPU or if the profiler fails."""
    if device.type != "cuda":
        return None
    try:
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize(device)
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception as error:  # a profiler problem must not lose the run's other figures
        tqdm.write(f"profiler failed ({type(error).__name__}: {error}); device ops not counted")
        return None
