"""Launch configurations (elements per program, block size, warps) of each kernel, per GPU.

Kept in our own code rather than in ``triton.autotune``: autotuning with several configs fails
on a CPU-only host, autotuning an in-place kernel on live data would apply the update once per
trial, and a first training step must never pause to autotune. Instead:

1. ``fp16-triton tune`` times the ``CANDIDATES`` on scratch tensors and writes the winners to
   a per-user cache file keyed by GPU name, compute capability, Triton version and
   ``KERNELS_VERSION``;
2. configs shipped in ``kernels/configs/*.json`` cover common GPUs by name;
3. ``DEFAULT_CONFIG`` is the generic fallback (and what the interpreter uses on CPU).

``launch_config`` reads them once per device, in that order of preference.

Why the defaults: an optimizer step is memory-bound; 1024-element blocks with 4 warps give each
thread 8 contiguous elements (two 128-bit loads of fp32), and 4 blocks per program amortise the
per-program table loads while keeping enough programs in flight for small tensors. They are
reasoned starting points, not measurements. ``configs/hopper.json`` holds what tuning measured
on an H200; the other shipped files still hold these defaults.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

KERNELS_VERSION = 1
"""Bumped whenever a kernel changes in a way that invalidates tuned configurations."""

KERNELS = ("nonfinite_check", "unscale", "cast_copy")
"""The device layer's own kernels. Each optimizer's step kernel is named by its algorithm's
spec (``fp16_triton/spec.py``); ``fp16_triton.tune.kernel_names()`` lists them all."""

DEFAULT_CONFIG: dict[str, int] = {"BLOCK": 1024, "CHUNK": 4096, "num_warps": 4}
"""Every kernel's configuration where neither a tuned nor a shipped entry names it."""

CANDIDATES: list[dict[str, int]] = [
    {"BLOCK": block, "CHUNK": block * per_program, "num_warps": warps}
    for block in (512, 1024, 2048)
    for per_program in (1, 4, 8)
    for warps in (4, 8)
    if block // (32 * warps) >= 2  # at least 2 elements per thread: keeps 64-bit loads possible
]
"""What ``fp16-triton tune`` tries for every kernel."""

CACHE_ENV = "FP16_TRITON_CACHE_DIR"
SHIPPED_DIR = Path(__file__).parent / "configs"
_overrides: dict[str, dict[str, int]] = {}


def cache_file() -> Path:
    """The per-user file of tuned configurations (``$FP16_TRITON_CACHE_DIR`` or
    ``~/.cache/fp16_triton``)/``tuned.json``."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fp16_triton"
    return Path(root) / "tuned.json"


def device_key(device: torch.device) -> str:
    """What a tuned entry is valid for: GPU name, compute capability, Triton version and the
    kernels' version (so a changed kernel or compiler invalidates old entries)."""
    import triton

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name, capability = props.name, f"{props.major}.{props.minor}"
    else:
        name, capability = device.type, "none"
    return f"{name}|sm{capability}|triton{triton.__version__}|kernels{KERNELS_VERSION}"


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


@functools.cache
def _resolved(device: torch.device) -> tuple[dict[str, dict[str, int]], str]:
    """(configs of the kernels that tuned or shipped entries name, where they came from) for
    ``device``; read once. Kernels not named get ``DEFAULT_CONFIG``."""
    configs: dict[str, dict[str, int]] = {}
    source = "generic defaults (kernels/launch_config.py)"
    name = _device_name(device)
    for path in sorted(SHIPPED_DIR.glob("*.json")):
        entry = json.loads(path.read_text())
        if any(pattern.lower() in name.lower() for pattern in entry.get("match", [])):
            _merge(configs, entry["configs"], str(path))
            source = f"shipped {path.name} ({entry.get('note', '')})".strip()
            break
    tuned_file = cache_file()
    if tuned_file.is_file():
        try:
            tuned = json.loads(tuned_file.read_text()).get(device_key(device))
        except (OSError, json.JSONDecodeError) as e:
            logger.warning("ignoring unreadable tuning cache %s: %s", tuned_file, e)
            tuned = None
        if tuned:
            _merge(configs, tuned["configs"], str(tuned_file))
            source = f"tuned {tuned_file} ({tuned.get('date', 'undated')})"
    return configs, source


def usable(config) -> bool:
    """A usable configuration: powers of two, CHUNK a multiple of BLOCK (else programs'
    chunks would overlap and update elements twice)."""
    try:
        block, chunk, warps = int(config["BLOCK"]), int(config["CHUNK"]), int(config["num_warps"])
    except (KeyError, TypeError, ValueError):
        return False
    power_of_two = all(x > 0 and x & (x - 1) == 0 for x in (block, chunk, warps))
    return power_of_two and chunk % block == 0 and warps <= 32 and block <= 65536


def _merge(configs: dict, entries: dict, origin: str) -> None:
    """Take the valid entries of ``entries`` into ``configs``; warn about the others."""
    for kernel, config in entries.items():
        if usable(config):
            configs[kernel] = {k: int(config[k]) for k in ("BLOCK", "CHUNK", "num_warps")}
        else:
            logger.warning(
                "ignoring invalid launch config for %s in %s: %r", kernel, origin, config
            )


def launch_config(kernel: str, device: torch.device) -> dict[str, int]:
    """The launch configuration of ``kernel`` on ``device`` (a copy: callers may modify it)."""
    if kernel in _overrides:
        return dict(_overrides[kernel])  # the tuner's trials: CANDIDATES are all valid
    return dict(_resolved(torch.device(device))[0].get(kernel, DEFAULT_CONFIG))


def config_source(device: torch.device) -> tuple[dict[str, dict[str, int]], str]:
    """The configurations that tuned or shipped entries give on ``device`` (other kernels run
    with ``DEFAULT_CONFIG``) and where they came from."""
    configs, source = _resolved(torch.device(device))
    return {k: dict(v) for k, v in configs.items()}, source


def reload() -> None:
    """Forget what was read, so the next launch reads the cache and shipped files again."""
    _resolved.cache_clear()


@contextlib.contextmanager
def override(kernel: str, config: dict[str, int]):
    """Force ``kernel``'s configuration inside the block (used by the tuner's trials)."""
    previous = _overrides.get(kernel)
    _overrides[kernel] = dict(config)
    try:
        yield
    finally:
        if previous is None:
            _overrides.pop(kernel, None)
        else:
            _overrides[kernel] = previous
