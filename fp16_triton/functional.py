"""The functional layer: the fused steps and gradient passes on tensor lists, no classes.

What ``torch.optim._functional`` (``adam``, ``sgd``) and optimi's ``adam()`` are to their
optimizers: each function takes the lists a step reads and writes, updates them in place, and
dispatches to the Triton launcher or to the pure-torch reference by the backend rule of
``fp16_triton.backend`` (``"auto"``: Triton for GPU tensors, torch elsewhere;
``FP16_TRITON_BACKEND`` overrides). Nothing on the Triton path syncs with the host, so the
functions can sit inside a training step or a CUDA graph. ``clip_grad_norm_`` is
``torch.nn.utils.clip_grad_norm_`` (signature and result) as one read pass plus the scaling.

Each optimizer algorithm's own functions (``adam_``, ``adamw_``, ``sgd_``, ...) live in its
host file beside its class and spec (``fp16_triton/adam.py``), and are exported here through
the registry (``Algorithm.functional``), so a new algorithm adds its functions without an edit
here. The classes call the same launches through ``Algorithm.launch``.
"""

from __future__ import annotations

import functools
import types
import warnings
from collections.abc import Callable, Iterable, Sequence

import torch

from .backend import backend_for, kernels, resolve_backend
from .kernels.multi_tensor import SUPPORTED_DTYPES

_OWN = ["nonfinite_check_and_norm", "unscale_", "clip_grad_norm_"]


def _algorithm_functions() -> dict[str, Callable]:
    from .spec import algorithms

    return {name: fn for a in algorithms().values() for name, fn in a.functional.items()}


def __getattr__(name: str):
    if name == "__all__":
        return [*_algorithm_functions(), *_OWN]
    functions = _algorithm_functions()
    if name in functions:
        return functions[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_algorithm_functions()})


def nonfinite_check_and_norm(
    grads: Sequence[torch.Tensor],
    *,
    grad_scale: torch.Tensor | None = None,
    compute_norm: bool = True,
    out: torch.Tensor | None = None,
    backend: str = "auto",
    cache=None,
) -> torch.Tensor:
    """fp32 ``[sum of squares of grads / grad_scale, non-finite flag]`` in one read pass over
    fp16/bf16/fp32 grads (mixed dtypes allowed); the flag is non-zero iff some grad holds an
    inf or nan. Nothing syncs on the Triton path. See ``kernels/nonfinite.py``."""
    name = "nonfinite" if backend_for(backend, grads) == "triton" else "reference"
    return kernels(name).nonfinite_check_and_norm(
        grads, grad_scale=grad_scale, compute_norm=compute_norm, out=out, cache=cache
    )


def unscale_(
    grads: Sequence[torch.Tensor],
    found_inf: torch.Tensor,
    inv_scale: torch.Tensor,
    *,
    backend: str = "auto",
    cache=None,
) -> None:
    """``torch._amp_foreach_non_finite_check_and_unscale_``: multiply ``grads`` in place by
    ``inv_scale`` and set ``found_inf`` (a one-element fp32 tensor, only ever set to 1.0) when
    any input holds an inf or nan; fp16, bf16 and fp32 grads alike, one launch per dtype."""
    name = "nonfinite" if backend_for(backend, grads) == "triton" else "reference"
    kernels(name).unscale_and_check_(grads, found_inf, inv_scale, cache=cache)


@torch.no_grad()
def clip_grad_norm_(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (pytorch/pytorch: torch/nn/utils/clip_grad.py), for
    the 2-norm in one fused read pass plus the in-place scaling.

    Same arguments and result: the total norm of the grads as a tensor on the first grad's
    device, of the dtype torch's stacking of per-grad norms gives (the grads' common dtype:
    fp16 for fp16 grads, fp32 for fp16 with bf16), and every grad multiplied by
    ``clamp(max_norm / (total_norm + 1e-6), max=1)`` computed as torch computes it. An inf norm
    zeroes finite grads and a nan norm makes every grad nan, as in torch;
    ``error_if_nonfinite=True`` raises torch's ``RuntimeError`` instead, before any grad is
    written, and is the one case that syncs with the host (to know whether to raise). No
    grads: a CPU ``tensor(0.)``, and a warning when ``parameters`` was an empty generator.

    Where the result differs from torch's: the sum of squares is accumulated in fp32 over all
    elements, while torch rounds each grad's norm to the grad's dtype first (and accumulates
    in fp64 on CPU). With fp16 or bf16 grads the two norms may therefore differ by up to about
    an ulp of the lowest-precision grad dtype, 2**-11 relative for fp16 and 2**-8 for bf16,
    even when the returned norm is fp32 (mixed dtypes); ours is the one nearer the exact norm.
    The clipped grads then differ by at most an ulp of their own dtype. A norm above sqrt(fp32
    max), about 1.8e19, is inf here (as on CUDA with torch).

    Delegated to torch unchanged (and said so here rather than approximated): ``norm_type``
    other than 2, the torch backend, grads on several devices, and grads the kernels do not
    read (sparse, strided with gaps, float64). ``foreach`` is accepted for compatibility; the
    fused path never launches per tensor.
    """
    is_generator = isinstance(parameters, types.GeneratorType)
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    else:
        parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    if len(grads) == 0:
        if is_generator and len(parameters) == 0:
            warnings.warn(
                "`parameters` is an empty generator, no gradient clipping will occur.",
                stacklevel=3,
            )
        return torch.tensor(0.0)
    if not _fusable(grads, norm_type, backend):
        return torch.nn.utils.clip_grad_norm_(
            parameters, max_norm, norm_type, error_if_nonfinite, foreach
        )
    sum_sq = kernels("nonfinite").nonfinite_check_and_norm(grads)[0]
    dtype = functools.reduce(torch.promote_types, {g.dtype for g in grads})
    total_norm = sum_sq.sqrt().to(dtype)
    if error_if_nonfinite and torch.logical_or(total_norm.isnan(), total_norm.isinf()):
        raise RuntimeError(
            f"The total norm of order {float(norm_type)} for gradients from "
            "`parameters` is non-finite, so it cannot be clipped. To disable "
            "this error and scale the gradients by the non-finite norm anyway, "
            "set `error_if_nonfinite=False`"
        )
    clip_coef = torch.clamp(float(max_norm) / (total_norm + 1e-6), max=1.0)
    # torch multiplies each grad by the coefficient in fp32 arithmetic and rounds once: the
    # unscale kernel's job exactly (its non-finite flag goes to a scratch scalar).
    found_inf = torch.zeros((), dtype=torch.float32, device=sum_sq.device)
    kernels("nonfinite").unscale_and_check_(grads, found_inf, clip_coef.float())
    return total_norm


def _fusable(grads: list[torch.Tensor], norm_type, backend: str) -> bool:
    """Whether the fused path serves these grads (else torch's own function does)."""
    if float(norm_type) != 2.0 or resolve_backend(backend, grads[0].device) != "triton":
        return False
    device = grads[0].device
    multi_tensor = kernels("multi_tensor")
    return all(
        g.device == device and g.dtype in SUPPORTED_DTYPES and not g.is_sparse
        and multi_tensor.is_dense(g)
        for g in grads
    )  # fmt: skip
