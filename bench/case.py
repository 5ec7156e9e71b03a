"""What a benchmarked case is, the params every case runs on, and the row it measures."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# A set-up builds params (grads set once) and an optimizer for the given tensor sizes and
# returns the step to time. It takes the device so the tests can run it on the CPU.
SetUp = Callable[[Sequence[int], torch.device], Callable[[], object]]


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
    setup: SetUp
    triton: bool = False
    fragile: bool = False


class Unavailable(Exception):
    """A case that cannot run here (not installed, failed to set up): becomes a row's note."""


def split_sizes(total: int, max_numel: int = 2**22, max_tensors: int = 32) -> list[int]:
    """Tensor sizes of a model with ``total`` params: tensors of up to 4M elements (a
    2048 x 2048 weight), at most ``max_tensors`` of them (so a compiled step compiles in
    seconds), as equal as possible."""
    n = min(max_tensors, max(1, math.ceil(total / max_numel)))
    base, extra = divmod(total, n)
    return [base + (1 if i < extra else 0) for i in range(n)]


def make_params(
    sizes: Sequence[int], dtype: torch.dtype, device: torch.device, seed: int = 0, shape=None
) -> list[torch.nn.Parameter]:
    """Parameters of the given sizes with their grads set once (randn: finite, so no step
    is skipped). Steps reuse the same grads: no allocation per iteration. ``shape(n)``, if
    given, shapes a param of ``n`` elements (an algorithm's ``param_shape``); else 1-D."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for n in sizes:
        size = shape(n) if shape is not None else (n,)
        p = torch.nn.Parameter(0.02 * torch.randn(size, generator=gen, device=device, dtype=dtype))
        p.grad = torch.randn(size, generator=gen, device=device, dtype=dtype)
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
