"""Which implementation serves params on a device: the Triton kernels or the pure-torch
reference (``backend="auto" | "triton" | "torch"``, overridden by ``FP16_TRITON_BACKEND``)."""

from __future__ import annotations

import functools
import importlib
import os

import torch

__all__ = ["BACKEND_ENV", "BACKENDS", "backend_for", "kernels", "resolve_backend"]

BACKEND_ENV = "FP16_TRITON_BACKEND"
"""Environment variable that overrides every optimizer's ``backend`` for a whole run."""

BACKENDS = ("auto", "triton", "torch")


def _interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(requested: str, device: torch.device) -> str:
    """The backend that serves params on ``device``: ``"triton"`` or ``"torch"``.

    ``FP16_TRITON_BACKEND`` overrides ``requested``. ``"auto"`` picks Triton on GPUs (CUDA or
    ROCm) and torch elsewhere. ``"triton"`` on CPU tensors runs only under Triton's
    interpreter (``TRITON_INTERPRET=1``, meant for tests); anywhere it cannot run is an error.
    """
    backend = os.environ.get(BACKEND_ENV, requested)
    if backend not in BACKENDS:
        source = BACKEND_ENV if BACKEND_ENV in os.environ else "backend"
        raise ValueError(f"{source} must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    if backend == "triton":
        if not _triton_available():
            raise RuntimeError(
                "backend='triton' needs the triton package (pip install triton, Linux); "
                "use backend='torch' or 'auto'"
            )
        if device.type != "cuda" and not (device.type == "cpu" and _interpreter_enabled()):
            raise RuntimeError(
                f"backend='triton' cannot serve params on {device}: the kernels need a GPU "
                "(or, for testing, CPU tensors with TRITON_INTERPRET=1 set before import). "
                "Use backend='torch' or 'auto'."
            )
    return backend


@functools.cache
def kernels(name: str):
    """The module ``fp16_triton.kernels.<name>``, imported at first use (so Triton is imported
    only where kernels launch); later calls cost one cache lookup, less than an ``import``
    statement in a step would cost each time."""
    return importlib.import_module(f"{__package__}.kernels.{name}")


def backend_for(backend: str, tensors) -> str:
    """The backend serving a tensor list (the first tensor's device decides; the launchers
    check that the others share it). An empty list is served by the reference, which does
    nothing."""
    if len(tensors) == 0:
        return "torch"
    return resolve_backend(backend, tensors[0].device)
