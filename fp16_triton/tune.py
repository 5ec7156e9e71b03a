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

from .kernels import launch_config as lc
from .spec import tensors_of

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


# --------------------------------------------------------------------------- correctness check
_SCALE = 4.0  # the loss scale of the grad checks (a power of two: unscaling is exact)
_GUARD = 8  # elements before each tensor: a multiple of 8 keeps aligned tensors aligned
_GUARD_VALUE = (12345.0,)  # finite: a stray step or unscale changes it
_GUARD_BAD = (float("nan"), float("inf"))  # the read-only check kernel flags an over-read


def _check_sizes(config: dict[str, int]) -> tuple[list[int], list[int]]:
    """(aligned sizes, odd sizes) for a geometry: each set straddles its block and chunk
    boundaries (one short of and one past each: a last block partly masked, a tail program)
    and holds small tensors (a program each); the first in multiples of 8, for the ALIGNED
    variant. Few tensors: in Triton's interpreter a program costs milliseconds per block."""
    block, chunk = int(config["BLOCK"]), int(config["CHUNK"])
    aligned = {8, block - 8, block + 8, chunk - 8, chunk + 8}
    odd = {1, block - 1, block + 1, chunk - 1, chunk + 1}
    return sorted(n for n in aligned if n > 0) + [16], sorted(odd) + [3, 5]


def _carve(sizes, dtype, device, values: torch.Tensor, guard=_GUARD_VALUE):
    """(flat buffer, views of ``sizes`` in it, ``_GUARD`` guard elements before and after
    each): the views hold ``values`` at their positions, the guards cycle through ``guard``."""
    total = sum(sizes) + _GUARD * (len(sizes) + 1)
    flat = torch.tensor(guard).repeat(total // len(guard) + 1)[:total].to(device, dtype)
    views, offset = [], _GUARD
    for n in sizes:
        views.append(flat[offset : offset + n])
        views[-1].copy_(values[offset : offset + n])
        offset += n + _GUARD
    return flat, views


def _differs(name: str, got: torch.Tensor, want: torch.Tensor) -> str | None:
    """None if ``got`` and ``want`` are equal bit for bit (NaNs with any payload equal)."""
    ints = {2: torch.int16, 4: torch.int32}[got.element_size()]
    differ = (got.view(ints) != want.view(ints)) & ~(torch.isnan(got) & torch.isnan(want))
    if not differ.any():
        return None
    i = int(differ.nonzero()[0])
    return (
        f"{name}: {int(differ.sum())} of {got.numel()} elements (guards included) differ "
        f"from the reference, first at {i}: {got[i].item()!r} vs {want[i].item()!r}"
    )


def _guarded_example(algorithm, sizes, device):
    """``(args, kwargs, buffers)``: the algorithm's example inputs (``Algorithm.example``, fp16
    params, a fixed seed) with every per-element tensor list moved into views of one buffer,
    ``_GUARD`` guard elements before and after each tensor, and lr 2**-4 (a visible step)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sum(sizes))
        args, kwargs = algorithm.example(sizes, "cpu", torch.float16)
    buffers = []

    def place(x):
        if isinstance(x, torch.Tensor):
            return x.to(device)
        if not (isinstance(x, list) and x and all(isinstance(t, torch.Tensor) for t in x)):
            return x
        if x[0].dim() == 0:  # step counts
            return [t.to(device) for t in x]
        total = sum(t.numel() for t in x) + _GUARD * (len(x) + 1)
        flat = torch.full((total,), _GUARD_VALUE[0], dtype=x[0].dtype, device=device)
        views, offset = [], _GUARD
        for t in x:
            views.append(flat[offset : offset + t.numel()].view(t.shape))
            views[-1].copy_(t)
            offset += t.numel() + _GUARD
        buffers.append(flat)
        return views

    args = tuple(place(a) for a in args)
    kwargs = {k: place(v) for k, v in kwargs.items()}
    kwargs["lr"] = 2.0**-4
    return args, kwargs, buffers


def _check_algorithm(algorithm, config, device) -> str | None:
    """A step kernel under ``config`` against the same kernel under ``DEFAULT_CONFIG`` (bit
    for bit, guards included: every element's arithmetic is the same whatever the geometry,
    so any difference is an element missed, updated twice or misplaced) and against the
    algorithm's pure-torch reference (within ``rtol`` 2**-9: kernel and reference may differ
    by an fp32 ulp where the kernel fuses a multiply-add, which can move a rounding to fp16 by
    one fp16 ulp, 2**-10 relative; a missed or doubled step moves a value by lr x O(1))."""
    for sizes in _check_sizes(config):
        runs = []
        for geometry in (config, lc.DEFAULT_CONFIG, None):
            args, kwargs, buffers = _guarded_example(algorithm, sizes, device)
            if geometry is None:
                algorithm.run_reference(*args, **kwargs)
            else:
                with lc.override(algorithm.name, geometry):
                    algorithm.prepare(*args, **kwargs)()
            scalars = [t for t in tensors_of((args, kwargs)) if t.dim() == 0]
            runs.append([t.detach().cpu() for t in buffers + scalars])
        candidate, default, reference = runs
        for index, (got, want) in enumerate(zip(candidate, default)):
            problem = _differs(f"{algorithm.name} list {index}", got, want)
            if problem:
                return problem.replace("the reference", "the default geometry")
        for index, (got, want) in enumerate(zip(candidate, reference)):
            close = torch.isclose(got.float(), want.float(), rtol=2.0**-9, atol=2.0**-20)
            if not close.all():
                at = int((~close).nonzero()[0])
                return (
                    f"{algorithm.name} list {index}: {int((~close).sum())} elements differ "
                    f"from the reference beyond rtol 2**-9, first at {at}: "
                    f"{got[at].item()!r} vs {want[at].item()!r}"
                )
    return None


def _check_cast_copy(config, device) -> str | None:
    """The cast-copy kernel under ``config`` against ``Tensor.copy_`` (the reference), bit for
    bit, guards included: up-casts are exact and down-casts round to nearest-even on both."""
    from .kernels import cast_copy, reference

    pairs = ((torch.float16, torch.float32), (torch.float32, torch.float16))
    pairs += ((torch.float32, torch.bfloat16),)
    for sizes in _check_sizes(config):
        total = sum(sizes) + _GUARD * (len(sizes) + 1)
        gen = torch.Generator().manual_seed(total)
        values = torch.randn(total, generator=gen)
        for src_dtype, dst_dtype in pairs:
            _, srcs = _carve(sizes, src_dtype, device, values)
            outs = []
            for module in (cast_copy, reference):
                flat, dsts = _carve(sizes, dst_dtype, device, torch.zeros(total))
                module.cast_copy_(dsts, srcs)
                outs.append(flat.cpu())
            problem = _differs(f"{src_dtype} -> {dst_dtype} copies", *outs)
            if problem:
                return problem
    return None


def _grad_groups(config, device, guard, bad_positions=()):
    """fp16 aligned and odd, bf16 odd and fp32 aligned grads (one launch per dtype and
    alignment): (flat buffers, grads). Values k/64 for integers |k| <= 4 keep every square and
    partial sum of squares exact in fp32 (multiples of 2**-16 below 2**8 while the grads hold
    under a million elements); ``bad_positions`` (index into each tensor, from its
    end when negative) hold inf and nan alternately."""
    aligned, odd = _check_sizes(config)
    groups = [(torch.float16, aligned), (torch.float16, odd)]
    groups += [(torch.bfloat16, odd), (torch.float32, aligned)]
    flats, grads = [], []
    for dtype, sizes in groups:
        total = sum(sizes) + _GUARD * (len(sizes) + 1)
        gen = torch.Generator().manual_seed(total)
        flat, views = _carve(
            sizes, dtype, device, torch.randint(-4, 5, (total,), generator=gen) / 64.0, guard
        )
        for j, (view, pos) in enumerate((v, p) for v in views for p in bad_positions):
            if -view.numel() <= pos < view.numel():
                view[pos] = _GUARD_BAD[j % 2]
        flats.append(flat)
        grads += views
    return flats, grads


def _check_grads(kernel: str, config, device) -> str | None:
    from .kernels import nonfinite, reference

    scale = torch.full((), _SCALE, device=device)
    if kernel == "unscale":
        for bad in ((), (-1,)):  # clean, then an inf or nan at every tensor's last element
            runs = []
            for module in (nonfinite, reference):
                flats, grads = _grad_groups(config, device, _GUARD_VALUE, bad)
                found = torch.zeros((), device=device)
                module.unscale_and_check_(grads, found, 1.0 / scale)
                runs.append((flats, found))
            (ours, found), (theirs, ref_found) = runs
            for flat, want in zip(ours, theirs):
                problem = _differs(f"unscaled {flat.dtype} grads", flat.cpu(), want.cpu())
                if problem:
                    return problem
            if found.item() != ref_found.item():
                return f"found_inf {found.item()} where the reference has {ref_found.item()}"
        return None
    chunk = int(config["CHUNK"])
    # Clean grads (over-reads of the nan/inf guards would raise the flag), then non-finite
    # values at tails and at the first element of a tensor's second chunk.
    for bad in ((), (-1, chunk)):
        _, grads = _grad_groups(config, device, _GUARD_BAD, bad)
        got = nonfinite.nonfinite_check_and_norm(grads, grad_scale=scale).cpu().double()
        want = reference.nonfinite_check_and_norm(grads, grad_scale=scale).cpu().double()
        holding = sum(  # (tensor, chunk) pairs holding a non-finite value: one flag each
            len({int(i) // chunk for i in (~torch.isfinite(g.float())).nonzero()}) for g in grads
        )
        if got[1] != holding or (want[1] != 0) != (holding != 0):
            return (
                f"non-finite count {got[1].item()} where {holding} chunks hold one "
                f"(reference flag {want[1].item()})"
            )
        if bad:
            continue
        exact = sum(((g.cpu().double() / _SCALE) ** 2).sum() for g in grads).item()
        # The reference rounds each tensor's norm (sqrt) and its square, and sums the squares
        # in fp32: within (len(grads) + 3) * 2**-24 of the exact sum of non-negative terms.
        slack = (len(grads) + 3) * 2.0**-24 * exact
        if got[0].item() != exact or abs(got[0].item() - want[0].item()) > slack:
            return (
                f"squared norm {got[0].item()!r}: the exact sum is {exact!r}, the reference "
                f"{want[0].item()!r} (allowed {slack:.3g} from it)"
            )
    return None


def check_candidate(kernel: str, config: dict, device) -> str | None:
    """None if ``kernel`` under launch configuration ``config`` gives the pure-torch
    reference's results (``kernels/reference.py``) on scratch tensors; else what differs.

    Why: a geometry that mis-masks (a block or chunk boundary handled wrongly, programs'
    chunks overlapping, a compiler fault at one block size) would otherwise be timed, picked
    if fast, and silently used for training. Inputs straddle the candidate's own block and
    chunk boundaries, include small tensors (a program each), run both kernel variants (all tensors
    aligned, and not), and sit between guard elements that must come back untouched (nan and
    inf for the read-only check kernel, so an over-read raises its flag). A registered
    algorithm's step (its spec's example inputs) must equal the same kernel under the default
    geometry bit for bit and its reference within a few roundings (``_check_algorithm``);
    copies and unscaled grads must equal the reference bit for bit; the squared norm must be
    the exact sum (every partial sum is exact here) and within the reference's own roundings
    of it; the non-finite count must be the number of (tensor, chunk) pairs holding an inf or
    nan. A launch that raises is refused too.
    """
    from .spec import algorithms

    device = torch.device(device)
    try:
        if kernel in algorithms():
            return _check_algorithm(algorithms()[kernel], config, device)
        with lc.override(kernel, config):
            if kernel == "cast_copy":
                return _check_cast_copy(config, device)
            return _check_grads(kernel, config, device)
    except Exception as e:  # a candidate that cannot even launch is refused, not fatal
        return f"launch failed: {type(e).__name__}: {e}"


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
