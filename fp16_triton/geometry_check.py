"""The correctness check ``fp16-triton tune`` applies to a launch geometry before it times it.

A geometry that mis-masks (a block or chunk boundary handled wrongly, programs' chunks
overlapping, a compiler fault at one block size) would otherwise be timed, picked if fast, and
silently used for training. ``check_candidate`` runs the kernel under the candidate on scratch
tensors around the candidate's own block and chunk boundaries, between guard elements, and
compares with the default geometry and the pure-torch reference (see its docstring);
``tests/test_launch_geometries.py`` runs it for every candidate and shipped configuration.
"""

from __future__ import annotations

import torch

from .kernels import launch_config as lc
from .spec import tensors_of

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

    A configuration ``launch_config`` would not use (``usable``: powers of two, ``CHUNK`` a
    multiple of ``BLOCK``) is refused before anything runs: a program's last block would
    reach into the next program's chunk. The interpreter runs such programs one after the
    other (a doubled update, which the runs above see), but a GPU runs them at once, and two
    programs racing to write the same value can leave scratch tensors exactly right (seen on
    an H200 for SGD and Muon).
    """
    from .spec import algorithms

    if not lc.usable(config):
        return (
            f"{config} is not a usable launch configuration: BLOCK, CHUNK and num_warps must "
            "be powers of two, num_warps <= 32, BLOCK <= 65536 and CHUNK a multiple of BLOCK "
            "(else programs' chunks overlap)"
        )
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
