"""Benchmark of the fp16_triton optimizer step against torch (and DeepSpeed when installed).

One command, ``python bench/run.py`` (``--quick`` for a short run, ``--sizes`` to override the
parameter counts, ``--out DIR``, default ``bench/results/``), writes ``results.md`` (also
printed), ``results.csv`` and ``results.png`` to DIR. Step times are medians (host time per
step is a mean), and every ratio is computed from two timings of the same run.

On a GPU it measures (see bench/README.md for the full list):

* the large-model step of ours, ``FP16Optimizer(AdamW(backend="triton"), clip_grad=1.0)`` on
  fp16 params with fp32 master and moments, against torch's native AMP recipe, torch's fused
  AdamW on fp16 params, a ``torch.compile``d AdamW step, DeepSpeed's FP16_Optimizer with
  FusedAdam, and SGD with momentum against torch's fused SGD; effective bandwidth by the
  documented bytes-per-param models, also as a fraction of a device-to-device copy;
* many small tensors (10,000 x 4,096) against one flat tensor of the same total: step time,
  launches per step and host time per step, with per-tensor storage and with
  ``flat_buffers=True``.

On a CPU-only machine it measures the pure-torch reference backend of ours against torch's
foreach AdamW and SGD, counts the Triton launches per step through the interpreter, and
measures the host (Python) time per step of the Triton path at 10,000 tensors with the kernel
launches stubbed out (the launches' own cost needs a GPU).
"""

from __future__ import annotations

import os

import torch

# TRITON_INTERPRET is read when @triton.jit decorates a kernel, so it must be set before
# fp16_triton.kernels is imported (below, and lazily by the optimizers): without a GPU the
# launch counts can only be taken through the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import csv  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

from tqdm import tqdm  # noqa: E402

import fp16_triton  # noqa: E402

# A timer takes a step function and returns seconds per call: do_bench's median on a GPU, one
# batch's mean on the CPU (``interleaved`` takes the median of several). Injected so the tests
# can run every case with a fake clock; the real ones are ``gpu_timer`` and ``CpuTimer``.
Timer = Callable[[Callable[[], object]], float]

GPU_SIZES = [10**6, 10**7, 10**8, 10**9]
GPU_SIZES_QUICK = [10**7, 10**8]
CPU_SIZES = [10**6, 10**8]
CPU_SIZES_QUICK = [10**6, 10**7]
CPU_TARGET = 1.10  # the issue's target: ours no more than 10% slower than torch's foreach

# Bytes moved per parameter by one step: the models documented in the kernels' docstrings and
# in README.md. Effective bandwidth = bytes/param x params / median time.
BYTES_OURS_ADAMW_FP16 = 32  # check + norm pass 2 (nonfinite.py) + AdamW step 30 (adam.py)
BYTES_TORCH_AMP = 48  # unscale 8 + clip norm 4 + clip scale 8 + fused AdamW fp32 28
BYTES_ADAMW_FP16_NO_MASTER = 14  # fp16 p, g, m, v: read 8, write p, m, v 6
BYTES_ADAMW_FP32 = 28  # read g, p, m, v 16, write p, m, v 12 (adam.py, fp32 params)
BYTES_SGD_MOMENTUM_FP32 = 20  # read g, p, buf 12, write p, buf 8 (sgd.py, fp32 params)
BYTES_COPY = 2  # dst.copy_(src): read and write each byte; "size" of the copy row is bytes

GPU_NOTE = "GPU figures need a GPU: none measured in this run"

SMALL_TENSORS = 10_000  # the many-small-tensors case on a GPU
SMALL_NUMEL = 4_096
SMALL_TARGET = 1.2  # the issue's target: many small tensors at most 1.2x one flat tensor
HOST_TARGET_S = 100e-6  # the issue's target: host time per step at 10,000 tensors
HOST_NUMEL = 64  # elements per tensor of the CPU host-time case (the launches are stubbed)
INTERP_NUMEL = 64  # elements per tensor of the interpreter launch-count case


@dataclass
class Row:
    """One measured (or skipped) case at one size.

    ``key`` names the case briefly; ``vs`` is the key of the row, at the same size, that
    ``ratio`` divides by (``ratio = time / time of vs``: above 1, ``vs`` is faster).
    """

    section: str
    key: str
    case: str
    size: int
    n_tensors: int
    time_s: float | None = None
    vs: str = ""
    bytes_per_param: float | None = None
    triton_launches: int | None = None
    device_ops: int | None = None
    host_s: float | None = None
    note: str = ""
    ratio: float | None = None
    bandwidth: float | None = None  # bytes/s, from bytes_per_param
    frac_of_copy: float | None = None


@dataclass
class Environment:
    """What the numbers were measured on."""

    device: str
    driver: str
    torch: str
    triton: str
    date: str
    gpu: bool
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------- timing
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
    take several times longer (measured on the dev machine: 350 us, then ~70 us after ~20
    steps, for the flat-buffer step), as caches and Python's adaptive interpreter warm up."""
    for _ in range(warmup):
        step()
    _sync(device)
    total = 0.0
    for _ in range(n):
        start = time.perf_counter()
        step()
        total += time.perf_counter() - start
    _sync(device)
    return total / n


def _sync(device: torch.device) -> None:
    """Wait for the GPU (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------ launch counting
def _kernel_objects() -> list:
    """The Triton kernels of ``fp16_triton.kernels`` (JITFunction, or InterpretedFunction
    under the interpreter), each once."""
    from triton.runtime.jit import KernelInterface

    from fp16_triton.kernels import adam, loss_scale, nonfinite, sgd

    found = {}
    for module in (adam, sgd, nonfinite, loss_scale):
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
    kernels = _kernel_objects()
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


# ------------------------------------------------------------------------------ set-ups
def split_sizes(total: int, max_numel: int = 2**22, max_tensors: int = 32) -> list[int]:
    """Tensor sizes of a model with ``total`` params: tensors of up to 4M elements (a
    2048 x 2048 weight), at most ``max_tensors`` of them (so a compiled step compiles in
    seconds), as equal as possible."""
    n = min(max_tensors, max(1, math.ceil(total / max_numel)))
    base, extra = divmod(total, n)
    return [base + (1 if i < extra else 0) for i in range(n)]


def make_params(
    sizes: Sequence[int], dtype: torch.dtype, device: torch.device, seed: int = 0
) -> list[torch.nn.Parameter]:
    """Parameters of the given sizes with their grads set once (randn: finite, so no step
    is skipped). Steps reuse the same grads: no allocation per iteration."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for n in sizes:
        p = torch.nn.Parameter(0.02 * torch.randn(n, generator=gen, device=device, dtype=dtype))
        p.grad = torch.randn(n, generator=gen, device=device, dtype=dtype)
        params.append(p)
    return params


def fits(nbytes: int, device: torch.device) -> tuple[bool, str]:
    """Whether ``nbytes`` (plus a quarter for temporaries and 1 GiB of slack) fit in the
    free memory of ``device``; CPU cases are sized by the caller."""
    if device.type != "cuda":
        return True, ""
    free, _ = torch.cuda.mem_get_info(device)
    need = int(nbytes * 1.25) + 2**30
    return need <= free, f"skipped: needs {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free"


def _release(device: torch.device) -> None:
    """Free what a finished case held before the next one allocates (a compiled step's
    graph keeps references to its size's tensors, hence the dynamo reset)."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------ step set-ups
# Each set-up builds params (grads set once) and an optimizer for the given tensor sizes and
# returns the step to time. They take the device so the tests can run them on the CPU.
def setup_ours_adamw(sizes: Sequence[int], device: torch.device) -> Callable[[], object]:
    """Ours, the README's recipe: fp16 params with fp32 master and moments, the check + norm
    pass, the fused AdamW step with clipping at 1.0, dynamic loss scaling."""
    params = make_params(sizes, torch.float16, device)
    adamw = fp16_triton.AdamW(params, lr=1e-4, backend="triton")
    return fp16_triton.FP16Optimizer(adamw, clip_grad=1.0).step


def setup_ours_adamw_flat(sizes: Sequence[int], device: torch.device) -> Callable[[], object]:
    """``setup_ours_adamw`` with ``flat_buffers=True``: the optimizer owns flat param, grad and
    state buffers, so a step reads no per-param attribute."""
    params = make_params(sizes, torch.float16, device)
    adamw = fp16_triton.AdamW(params, lr=1e-4, backend="triton", flat_buffers=True)
    return fp16_triton.FP16Optimizer(adamw, clip_grad=1.0).step


def setup_torch_amp(sizes: Sequence[int], device: torch.device) -> Callable[[], object]:
    """torch's native AMP recipe on fp32 params: ``GradScaler.unscale_``,
    ``clip_grad_norm_(1.0)``, ``AdamW(fused=True)`` through ``scaler.step``, ``update``."""
    params = make_params(sizes, torch.float32, device)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    # Scale 1 and no growth keep the fixed grads' values steady from one repetition to the
    # next (unscale_ works in place, and clipping brings the norm to 1 once, then leaves it);
    # the kernels do the same work whatever the scale's value.
    scaler = torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=2**30)
    # The scale tensor is created by the first scale(loss), part of forward/backward in a real
    # loop; one call here, outside the timed step.
    scaler.scale(torch.ones((), device=device))

    def step():
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()

    return step


def setup_torch_fused_fp16(sizes: Sequence[int], device: torch.device) -> Callable[[], object]:
    """torch's ``AdamW(fused=True)`` directly on fp16 params: fp16 moments, no master, no
    check and no clipping (less work than ours, and less precision)."""
    params = make_params(sizes, torch.float16, device)
    return torch.optim.AdamW(params, lr=1e-4, fused=True).step


def setup_torch_fused_fp32(sizes: Sequence[int], device: torch.device) -> Callable[[], object]:
    """torch's ``AdamW(fused=True)`` on fp32 params (the many-small-tensors comparison)."""
    params = make_params(sizes, torch.float32, device)
    return torch.optim.AdamW(params, lr=1e-4, fused=True).step


def setup_torch_compiled(sizes: Sequence[int], device: torch.device) -> Callable[[], object]:
    """A ``torch.compile``d AdamW step on fp32 params, as in PyTorch's compiled-optimizer
    recipe (``@torch.compile(fullgraph=False) def fn(): opt.step()``). Compiled here, by two
    calls, so compile time is not timed."""
    params = make_params(sizes, torch.float32, device)
    opt = torch.optim.AdamW(params, lr=1e-4)

    @torch.compile(fullgraph=False)
    def step():
        opt.step()

    step()
    step()
    return step


class Unavailable(Exception):
    """A case that cannot run here (not installed, failed to set up): becomes a row's note."""


def _init_single_process_group(deepspeed) -> None:
    """DeepSpeed's FP16_Optimizer may all-reduce its overflow flag: give it a world of one."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517", "RANK": "0", "LOCAL_RANK": "0"}
    for name, value in {**env, "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(name, value)
    deepspeed.init_distributed(dist_backend="nccl", auto_mpi_discovery=False)


def setup_deepspeed(sizes: Sequence[int], device: torch.device) -> Callable[[], object]:
    """DeepSpeed's ``FP16_Optimizer`` (dynamic loss scale, clip 1.0) around its ``FusedAdam``
    (AdamW mode) on fp16 params. Its step flattens the fp16 grads into an fp32 buffer and sets
    ``p.grad = None``, so each call first re-attaches the same grad tensors (no allocation)."""
    try:
        import deepspeed
        from deepspeed.ops.adam import FusedAdam
        from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    except ImportError as error:
        raise Unavailable(f"DeepSpeed not installed ({error})") from error
    _init_single_process_group(deepspeed)
    params = make_params(sizes, torch.float16, device)
    grads = [p.grad for p in params]
    opt = FP16_Optimizer(
        FusedAdam(params, lr=1e-4, weight_decay=0.01, adam_w_mode=True),
        dynamic_loss_scale=True,
        clip_grad=1.0,
        verbose=False,
    )

    def step():
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()

    return step


def setup_ours_sgd(sizes: Sequence[int], device: torch.device) -> Callable[[], object]:
    """Ours: ``SGD(momentum=0.9, backend="triton")`` on fp32 params (same math and bytes as
    torch's fused SGD: the kernel against the kernel)."""
    params = make_params(sizes, torch.float32, device)
    return fp16_triton.SGD(params, lr=1e-4, momentum=0.9, backend="triton").step


def setup_torch_sgd(sizes: Sequence[int], device: torch.device) -> Callable[[], object]:
    """torch's ``SGD(momentum=0.9, fused=True)`` on fp32 params."""
    params = make_params(sizes, torch.float32, device)
    return torch.optim.SGD(params, lr=1e-4, momentum=0.9, fused=True).step


def setup_ours_ref_adamw(sizes: Sequence[int], device: torch.device) -> Callable[[], object]:
    """Ours on the CPU: ``AdamW(backend="torch")`` (the foreach reference) on fp32 params."""
    params = make_params(sizes, torch.float32, device)
    return fp16_triton.AdamW(params, lr=1e-4, backend="torch").step


def setup_torch_foreach_adamw(sizes: Sequence[int], device: torch.device) -> Callable[[], object]:
    """torch's ``AdamW(foreach=True)`` on fp32 params."""
    params = make_params(sizes, torch.float32, device)
    return torch.optim.AdamW(params, lr=1e-4, foreach=True).step


def setup_ours_ref_sgd(sizes: Sequence[int], device: torch.device) -> Callable[[], object]:
    """Ours on the CPU: ``SGD(momentum=0.9, backend="torch")`` on fp32 params."""
    params = make_params(sizes, torch.float32, device)
    return fp16_triton.SGD(params, lr=1e-4, momentum=0.9, backend="torch").step


def setup_torch_foreach_sgd(sizes: Sequence[int], device: torch.device) -> Callable[[], object]:
    """torch's ``SGD(momentum=0.9, foreach=True)`` on fp32 params."""
    params = make_params(sizes, torch.float32, device)
    return torch.optim.SGD(params, lr=1e-4, momentum=0.9, foreach=True).step


# ---------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """A benchmarked configuration.

    ``vs`` is the key of the case its ratio divides by; ``bytes_per_param`` the traffic model
    (None: not modelled); ``memory_per_param`` what it holds (params, grads, state), for the
    free-memory check; ``triton`` whether to count our Triton launches; ``fragile`` turns
    any error into a note (third-party set-ups whose versions vary), not a crash.
    """

    key: str
    label: str
    vs: str
    bytes_per_param: float | None
    memory_per_param: int
    setup: Callable[[Sequence[int], torch.device], Callable[[], object]]
    triton: bool = False
    fragile: bool = False


OURS_ADAMW = Case(
    "ours",
    "ours: FP16Optimizer(AdamW triton, clip 1.0), fp16 params + fp32 master/m/v",
    "ours",
    BYTES_OURS_ADAMW_FP16,
    16,  # p 2 + g 2 + master 4 + m 4 + v 4
    setup_ours_adamw,
    triton=True,
)
OURS_SGD = Case(
    "ours-sgd",
    "ours: SGD(momentum 0.9, triton), fp32 params",
    "ours-sgd",
    BYTES_SGD_MOMENTUM_FP32,
    12,
    setup_ours_sgd,
    triton=True,
)
GPU_CASES = [
    OURS_ADAMW,
    Case(
        "amp",
        "torch AMP: fp32 params, unscale_ + clip_grad_norm_ + AdamW(fused)",
        "ours",
        BYTES_TORCH_AMP,
        16,
        setup_torch_amp,
    ),
    Case(
        "fused-fp16",
        "torch AdamW(fused) on fp16 params, no master, no clip",
        "ours",
        BYTES_ADAMW_FP16_NO_MASTER,
        8,
        setup_torch_fused_fp16,
    ),
    Case(
        "compiled",
        "torch.compile(AdamW.step), fp32 params, no clip",
        "ours",
        BYTES_ADAMW_FP32,
        16,
        setup_torch_compiled,
        fragile=True,
    ),
    Case(
        "deepspeed",
        "DeepSpeed FP16_Optimizer(clip 1.0) + FusedAdam, fp16 params",
        "ours",
        None,
        28,  # p 2 + flat copy 2 + g 2 + fp32 flat grad 4 + master 4 + m 4 + v 4 + slack
        setup_deepspeed,
        fragile=True,
    ),
    OURS_SGD,
    Case(
        "torch-sgd",
        "torch SGD(momentum 0.9, fused), fp32 params",
        "ours-sgd",
        BYTES_SGD_MOMENTUM_FP32,
        12,
        setup_torch_sgd,
    ),
]
CPU_PAIRS = [
    (
        Case(
            "ours-adamw",
            "ours: AdamW(backend='torch'), fp32 params",
            "ours-adamw",
            BYTES_ADAMW_FP32,
            16,
            setup_ours_ref_adamw,
        ),
        Case(
            "torch-adamw",
            "torch AdamW(foreach=True), fp32 params",
            "ours-adamw",
            BYTES_ADAMW_FP32,
            16,
            setup_torch_foreach_adamw,
        ),
    ),
    (
        Case(
            "ours-sgd",
            "ours: SGD(momentum 0.9, backend='torch'), fp32 params",
            "ours-sgd",
            BYTES_SGD_MOMENTUM_FP32,
            12,
            setup_ours_ref_sgd,
        ),
        Case(
            "torch-sgd",
            "torch SGD(momentum 0.9, foreach=True), fp32 params",
            "ours-sgd",
            BYTES_SGD_MOMENTUM_FP32,
            12,
            setup_torch_foreach_sgd,
        ),
    ),
]


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
        _release(device)
    return row


def run_copy(nbytes: int, timer: Timer, device: torch.device) -> Row:
    """``dst.copy_(src)`` of ``nbytes``: the bandwidth the steps are compared with (bytes moved
    = 2 x nbytes; the row's size is in bytes)."""
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
    """Many small tensors against one flat tensor of the same total: ours (FP16Optimizer
    AdamW, per-tensor storage and ``flat_buffers=True``) and torch's fused AdamW (fp32), each
    with its step time, launches and host time (mean over ``host_steps`` steps)."""
    rows = []
    for layout, sizes in (("many", [numel] * n_tensors), ("flat", [n_tensors * numel])):
        shape = f"{len(sizes):,} x {sizes[0]:,}"
        ours = Case(
            f"ours-{layout}",
            f"ours: FP16Optimizer(AdamW triton), {shape}",
            f"ours-{layout}",
            BYTES_OURS_ADAMW_FP16,
            16,
            setup_ours_adamw,
            triton=True,
        )
        theirs = Case(
            f"torch-{layout}",
            f"torch AdamW(fused), fp32 params, {shape}",
            f"ours-{layout}",
            BYTES_ADAMW_FP32,
            16,
            setup_torch_fused_fp32,
        )
        cases = [ours, theirs]
        if layout == "many":
            cases.insert(1, SMALL_FLATBUF)
        for case in cases:
            row = run_case(case, sizes, timer, device, section="small", host_steps=host_steps)
            rows.append(row)
    return rows


SMALL_FLATBUF = Case(
    "ours-flatbuf",
    "ours: FP16Optimizer(AdamW triton, clip 1.0, flat_buffers=True)",
    "ours-flat",
    BYTES_OURS_ADAMW_FP16,
    16,
    setup_ours_adamw_flat,
    triton=True,
)


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
    own cost."""
    device = torch.device("cpu")
    rows = []
    for key, flat in (("ours-host", False), ("ours-host-flatbuf", True)):
        storage = "flat_buffers=True" if flat else "per-tensor storage"
        label = f"ours: FP16Optimizer(AdamW triton, clip 1.0), {storage}"
        row = Row("host", key, label, n_tensors * numel, n_tensors)
        params = make_params([numel] * n_tensors, torch.float16, device)
        adamw = fp16_triton.AdamW(params, lr=1e-4, backend="triton", flat_buffers=flat)
        scaler = fp16_triton.DynamicLossScaler(raise_error_at_min_scale=False)
        optimizer = fp16_triton.FP16Optimizer(adamw, loss_scaler=scaler, clip_grad=1.0)
        step = optimizer.step
        with stubbed_launches(), triton_everywhere():
            step()  # state, buckets, tables (and flat adoption) are built here, once
            _clean_check_pass(optimizer)
            row.host_s = host_time(step, device, host_steps)
        row.note = "kernel launches stubbed: host work only"
        rows.append(row)
        step = None
        _release(device)
    return rows


def run_cpu_pair(
    pair: tuple[Case, Case], size: int, timer: Timer, rounds: int, device: torch.device
) -> list[Row]:
    """Ours and torch's counterpart at ``size`` params on the CPU, timed in alternation (the
    CPU is shared and noisy: alternating gives both the same conditions)."""
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
    _release(device)
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
        for case in (OURS_ADAMW, SMALL_FLATBUF, OURS_SGD):
            for sizes in ([numel] * n_tensors, [n_tensors * numel]):
                row = Row("launches", case.key, case.label, sum(sizes), len(sizes), vs=case.vs)
                # The first step allocates state and builds tables, launching exactly what
                # every later step launches; one step is enough (each costs seconds
                # interpreted).
                row.triton_launches = triton_launches(case.setup(sizes, device))
                row.note = "Triton interpreter: launches only"
                rows.append(row)
    return rows


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


# ------------------------------------------------------------------ derived figures
def add_derived(rows: list[Row]) -> None:
    """Fill ratio (time / time of ``vs`` at the same size), effective bandwidth (bytes/param
    x size / time) and its fraction of the copy bandwidth, all from this run's rows."""
    times = {(r.key, r.size): r.time_s for r in rows if r.time_s}
    for r in rows:
        base = times.get((r.vs, r.size))
        if r.time_s and base:
            r.ratio = r.time_s / base
        if r.time_s and r.bytes_per_param:
            r.bandwidth = r.bytes_per_param * r.size / r.time_s
    copy = next((r.bandwidth for r in rows if r.key == "copy" and r.bandwidth), None)
    for r in rows:
        if r.bandwidth and copy and r.key != "copy":
            r.frac_of_copy = r.bandwidth / copy


def cpu_verdicts(rows: list[Row]) -> list[str]:
    """One line per CPU comparison: ours / torch against the issue's 10% target."""
    lines = []
    for r in rows:
        if r.section == "cpu" and r.key.startswith("torch-") and r.ratio:
            slowdown = 1.0 / r.ratio  # r.ratio = torch / ours
            verdict = "met" if slowdown <= CPU_TARGET else "NOT met"
            name = r.key.removeprefix("torch-")
            lines.append(
                f"{name}, {r.size:,} params: ours / torch = {slowdown:.3f} "
                f"(target <= {CPU_TARGET:.2f}): {verdict}"
            )
    return lines


def small_tensor_checks(rows: list[Row]) -> list[str]:
    """Many small tensors against one flat tensor (GPU) and host time per step (GPU, or CPU
    with launches stubbed), against the issue's targets."""
    lines = []
    times = {r.key: r.time_s for r in rows if r.section == "small" and r.time_s}
    for key in ("ours-many", "ours-flatbuf"):
        if key in times and "ours-flat" in times:
            ratio = times[key] / times["ours-flat"]
            verdict = "met" if ratio <= SMALL_TARGET else "NOT met"
            lines.append(
                f"{key} / ours-flat step time = {ratio:.2f} (target <= {SMALL_TARGET}): {verdict}"
            )
    for r in rows:
        if r.section in ("small", "host") and r.host_s and r.n_tensors >= 10_000:
            if r.key.startswith("torch"):
                continue
            verdict = "met" if r.host_s < HOST_TARGET_S else "NOT met"
            where = "launches stubbed, CPU" if r.section == "host" else "GPU"
            lines.append(
                f"{r.key}: host time per step at {r.n_tensors:,} tensors = "
                f"{r.host_s * 1e6:.0f} us ({where}; target < {HOST_TARGET_S * 1e6:.0f} us): "
                f"{verdict}"
            )
    return lines


def launch_checks(rows: list[Row]) -> list[str]:
    """Whether ours launches the same number of kernels per step whatever the tensor count."""
    lines = []
    for section in ("launches", "small"):
        by_key: dict[str, set[int]] = {}
        for r in rows:
            if r.section == section and r.triton_launches is not None:
                family = "ours" if section == "small" else r.key
                by_key.setdefault(family, set()).add(r.triton_launches)
        for key, counts in by_key.items():
            state = "constant" if len(counts) == 1 else "NOT constant"
            lines.append(f"{key}: Triton launches per step {sorted(counts)}: {state}")
    return lines


# --------------------------------------------------------------------------- outputs
def environment(device: torch.device) -> Environment:
    """Device name, driver, library versions and the date (UTC) of this run."""
    import triton

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        driver = _nvidia_driver() or "n/a"
    else:
        name = _cpu_name()
        driver = "n/a"
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    extra = {"cpu_threads": torch.get_num_threads(), "python": platform.python_version()}
    return Environment(
        name, driver, torch.__version__, triton.__version__, date, device.type == "cuda", extra
    )


def _nvidia_driver() -> str | None:
    """The NVIDIA driver version from nvidia-smi, or None where it cannot be read."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, IndexError, subprocess.SubprocessError):
        return None


def _cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo where there is one) and its core count."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                return f"{name} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


SECTION_TITLES = {
    "large": "Large model: one optimizer step",
    "cpu": "CPU: reference backend (backend='torch') against torch's foreach optimizers",
    "small": "Many small tensors against one flat tensor",
    "launches": "Launches per step (Triton interpreter on the CPU)",
    "host": "Host time per step of the Triton path (CPU, kernel launches stubbed)",
    "copy": "Copy bandwidth (the yardstick of 'of copy')",
}
COLUMNS = [  # (header, Row -> text); empty columns are dropped per section
    ("key", lambda r: r.key),
    ("case", lambda r: r.case),
    ("params", lambda r: f"{r.size:,}"),
    ("tensors", lambda r: f"{r.n_tensors:,}"),
    ("median ms", lambda r: _num(r.time_s, 1e3)),
    ("ratio", lambda r: _num(r.ratio, 1, ".3f")),
    ("vs", lambda r: r.vs if r.ratio is not None and r.vs != r.key else ""),
    ("B/param (model)", lambda r: _num(r.bytes_per_param, 1, "g")),
    ("GB/s (eff.)", lambda r: _num(r.bandwidth, 1e-9, ".1f")),
    ("of copy", lambda r: f"{r.frac_of_copy:.0%}" if r.frac_of_copy else ""),
    ("Triton launches", lambda r: _num(r.triton_launches, 1, "d")),
    ("GPU ops (profiler)", lambda r: _num(r.device_ops, 1, "d")),
    ("host ms", lambda r: _num(r.host_s, 1e3)),
    ("note", lambda r: r.note),
]


def _num(value, scale: float, spec: str = ".4g") -> str:
    """``value * scale`` formatted with ``spec``; empty for a missing value."""
    return "" if value is None else format(value * scale, spec)


def markdown(rows: list[Row], env: Environment) -> str:
    """The report: environment, models, one table per section, verdicts."""
    lines = [
        "# fp16_triton optimizer-step benchmark",
        "",
        f"- device: {env.device}; driver: {env.driver}",
        f"- torch {env.torch}, triton {env.triton}, python {env.extra.get('python')}, "
        f"{env.extra.get('cpu_threads')} CPU threads; {env.date}",
        "- medians; ratio = median time / median time of the `vs` row at the same size "
        "(above 1: the `vs` case is faster), both from this run",
        f"- effective bandwidth = B/param (model) x params / time; ours: {BYTES_OURS_ADAMW_FP16}"
        " B/param (check + norm 2, AdamW 28: kernels' docstrings); torch AMP "
        f"{BYTES_TORCH_AMP}; AdamW fp32 {BYTES_ADAMW_FP32}; AdamW fp16 without master "
        f"{BYTES_ADAMW_FP16_NO_MASTER}; SGD momentum fp32 {BYTES_SGD_MOMENTUM_FP32}",
    ]
    if not env.gpu:
        lines += ["", f"**{GPU_NOTE}.**"]
    for section, title in SECTION_TITLES.items():
        selected = [r for r in rows if r.section == section]
        if not selected:
            continue
        columns = [(h, f) for h, f in COLUMNS if any(f(r) for r in selected)]
        lines += ["", f"## {title}", ""]
        lines.append("| " + " | ".join(h for h, _ in columns) + " |")
        lines.append("|" + "|".join(" --- " for _ in columns) + "|")
        for r in selected:
            lines.append("| " + " | ".join(f(r) for _, f in columns) + " |")
    checks = cpu_verdicts(rows) + launch_checks(rows) + small_tensor_checks(rows)
    if checks:
        lines += ["", "## Checks", ""] + [f"- {line}" for line in checks]
    return "\n".join(lines) + "\n"


CSV_FIELDS = [
    "device", "driver", "torch", "triton", "date", "section", "key", "case", "size",
    "n_tensors", "median_ms", "ratio_to_ours", "vs", "bytes_per_param", "bandwidth_GBps",
    "frac_of_copy", "triton_launches", "gpu_ops", "host_ms", "note",
]  # fmt: skip


def write_csv(rows: list[Row], env: Environment, path: Path) -> None:
    """One line per row, with the environment on every line (files from several machines
    can be concatenated)."""

    def opt(value, scale=1.0):
        """A scaled number, or an empty cell."""
        return "" if value is None else value * scale

    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow(
                {
                    "device": env.device,
                    "driver": env.driver,
                    "torch": env.torch,
                    "triton": env.triton,
                    "date": env.date,
                    "section": r.section,
                    "key": r.key,
                    "case": r.case,
                    "size": r.size,
                    "n_tensors": r.n_tensors,
                    "median_ms": opt(r.time_s, 1e3),
                    "ratio_to_ours": opt(r.ratio),
                    "vs": r.vs,
                    "bytes_per_param": opt(r.bytes_per_param),
                    "bandwidth_GBps": opt(r.bandwidth, 1e-9),
                    "frac_of_copy": opt(r.frac_of_copy),
                    "triton_launches": opt(r.triton_launches),
                    "gpu_ops": opt(r.device_ops),
                    "host_ms": opt(r.host_s, 1e3),
                    "note": r.note,
                }
            )


def plot(rows: list[Row], env: Environment, path: Path) -> None:
    """Median step time and ratio against size for the size sweeps (log scales)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swept = [r for r in rows if r.section in ("large", "cpu") and r.time_s]
    fig, (ax_time, ax_ratio) = plt.subplots(1, 2, figsize=(13, 5))
    for key in dict.fromkeys(r.key for r in swept):
        mine = sorted((r for r in swept if r.key == key), key=lambda r: r.size)
        ax_time.plot([r.size for r in mine], [r.time_s * 1e3 for r in mine], "o-", label=key)
        ratios = [r for r in mine if r.ratio is not None and r.vs != r.key]
        if ratios:
            label = f"{key} / {ratios[0].vs}"
            ax_ratio.plot([r.size for r in ratios], [r.ratio for r in ratios], "o-", label=label)
    ax_time.set(xscale="log", yscale="log", xlabel="params", ylabel="median ms per step")
    ax_ratio.set(xscale="log", xlabel="params", ylabel="time / time of vs (above 1: vs faster)")
    ax_ratio.axhline(1.0, color="grey", lw=0.8)
    for ax in (ax_time, ax_ratio):
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no timings", ha="center", va="center", transform=ax.transAxes)
        ax.grid(True, which="both", alpha=0.3)
    title = f"{env.device} | torch {env.torch} | triton {env.triton} | {env.date}"
    if not env.gpu:
        title += f"\n{GPU_NOTE}"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------------- profiling
def profile_breakdown(pair: tuple[Case, Case], size: int, steps: int = 3) -> str:
    """Where a CPU step's time goes: per top-level torch op, ms per step for each case of
    ``pair`` (inclusive time of the ops called directly by the step; "python and other" is
    the rest of the step's wall time)."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device("cpu")
    sizes = split_sizes(size)
    per_case: dict[str, dict[str, float]] = {}
    for case in pair:
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
        _release(device)
    a, b = (case.key for case in pair)
    names = sorted(
        set(per_case[a]) | set(per_case[b]),
        key=lambda n: -max(per_case[a].get(n, 0.0), per_case[b].get(n, 0.0)),
    )
    lines = [f"| op ({size:,} params) | {a} ms/step | {b} ms/step |", "| --- | --- | --- |"]
    for name in names:
        va, vb = per_case[a].get(name), per_case[b].get(name)
        lines.append(f"| {name} | {_num(va, 1, '.2f')} | {_num(vb, 1, '.2f')} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ main
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
    tasks = [("copy", partial(run_copy, copy_mb * 2**20, timer, device))]
    if device.type == "cuda":
        for size in args.sizes or (GPU_SIZES_QUICK if args.quick else GPU_SIZES):
            for case in GPU_CASES:
                if case.key not in skip:
                    task = partial(run_case, case, split_sizes(size), timer, device)
                    tasks.append((f"{case.key} {size:.0e}", task))
        if "small" not in skip:
            task = partial(run_small_tensors, SMALL_TENSORS, SMALL_NUMEL, timer, device)
            tasks.append(("small tensors", task))
        return tasks
    rounds = args.rounds or (5 if args.quick else 11)
    for size in args.sizes or (CPU_SIZES_QUICK if args.quick else CPU_SIZES):
        for pair in CPU_PAIRS:
            if pair[0].key not in skip:
                task = partial(run_cpu_pair, pair, size, timer, rounds, device)
                tasks.append((f"{pair[0].key} {size:.0e}", task))
    if "launches" not in skip:
        n_tensors = args.interp_tensors or (64 if args.quick else 300)
        tasks.append(("launches", partial(run_interpreter_launches, n_tensors, INTERP_NUMEL)))
    if "host" not in skip:
        n_tensors = args.host_tensors or SMALL_TENSORS
        tasks.append(("host time", partial(run_host_overhead, n_tensors, HOST_NUMEL)))
    return tasks


def main(argv: Sequence[str] | None = None, timer: Timer | None = None) -> list[Row]:
    """Run the benchmark, print the table and write results.md, results.csv, results.png to
    ``--out``. ``timer`` replaces the clock (tests). Returns the rows."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if timer is None:
        timer = gpu_timer if device.type == "cuda" else CpuTimer()
    env = environment(device)
    if not env.gpu:
        print(GPU_NOTE)
    rows: list[Row] = []
    progress = tqdm(plan(args, timer, device), desc="bench", file=sys.stderr)
    for label, task in progress:
        progress.set_postfix_str(label)
        result = task()
        rows.extend(result if isinstance(result, list) else [result])
    progress.close()
    add_derived(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    report = markdown(rows, env)
    if args.profile and not env.gpu:
        report += "\n## Profile: ops called by the step (torch.profiler, inclusive times)\n"
        for size in args.sizes or (CPU_SIZES_QUICK if args.quick else CPU_SIZES):
            for pair in CPU_PAIRS:
                report += "\n" + profile_breakdown(pair, size)
    (args.out / "results.md").write_text(report)
    write_csv(rows, env, args.out / "results.csv")
    plot(rows, env, args.out / "results.png")
    print(report)
    print(f"wrote {args.out / 'results.md'}, results.csv, results.png")
    return rows


if __name__ == "__main__":
    main()
