"""One spec per optimizer algorithm, and the registry of them.

An algorithm is described once, by an :class:`Algorithm` in its host file (``adam.py``,
``sgd.py``), beside its torch.optim class. Everything else reads it:

- the engine's DeepSpeed config (``config.py``): the ``"type"`` names are the classes' names,
  the ``params`` and their defaults come from the classes' signatures (:meth:`config_params`),
  plus the DeepSpeed-only options the spec declares;
- the engine's registry (``engine.py``) and ``fp16-triton tune`` (``tune.py``), which times the
  spec's example inputs;
- the launch configurations (``kernels/launch_config.py``: a kernel with no entry gets the
  generic default), the sm_90 compile check (``tests/gpu_compile.py`` calls the kernel module's
  ``compile_variants``), the kernel tests' and launch-geometry tests' tables, and the
  benchmark, whose bytes-per-param figures are :meth:`Algorithm.traffic`.

The kernel module ``fp16_triton.kernels.<kernel>`` of an algorithm named ``<name>`` provides
``prepare_<name>_step(*args, cache=None, **kwargs) -> launch`` (everything checked before the
launch closure runs; keyword ``grad_scale``, ``found_inf``, ``norm_sq``/``max_norm`` as the
optimizers pass them), ``<name>_step`` (prepare and launch) and ``compile_variants(compile)``;
the spec's ``reference`` is the same step in pure torch.

Adding an algorithm: see ``docs/architecture.md``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from .backend import kernels

__all__ = [
    "Algorithm",
    "Traffic",
    "elementwise_traffic",
    "check_pass_bytes",
    "scratch_inputs",
    "tensors_of",
    "register",
    "algorithms",
    "algorithm_for_type",
]


# Constructor arguments that are not DeepSpeed config params: torch.optim's implementation
# switches (recorded for compatibility, no effect here), what the engine decides itself
# (``backend``) and torch spellings DeepSpeed names otherwise (``decoupled_weight_decay`` is
# DeepSpeed's ``adam_w_mode``). ``master_weights`` is ours (true by default; "remainder" for
# bf16 models): its check is shared by every algorithm (``_SHARED_CONFIG_KINDS``).
_NOT_CONFIG_PARAMS = frozenset(
    {"params", "foreach", "capturable", "differentiable", "fused", "backend",
     "decoupled_weight_decay"}
)  # fmt: skip


@dataclass(frozen=True)
class Traffic:
    """Bytes per parameter of one optimizer step: read and written by the step's kernels, and
    kept on the device between steps (param, grad, masters and state). The step is
    memory-bound, so ``read + written`` over the bandwidth is its floor."""

    read: float  # whole bytes but for block scales (int8 moments: 1/64 B per element)
    written: float
    kept: float

    @property
    def moved(self) -> float:
        return self.read + self.written


def elementwise_traffic(
    param_dtype: torch.dtype,
    grad_dtype: torch.dtype | None,
    master: bool | str,
    state_tensors: int,
    state_size: int = 4,
) -> Traffic:
    """The traffic of a step that reads the param, its grad, its master (fp16/bf16 params with
    masters: fp32, or with ``master="remainder"`` the int16 low half of a bf16 param's fp32
    master, ``kernels/remainder.py``) and ``state_tensors`` state tensors of ``state_size``
    bytes per element (4: fp32; 2: bf16 moments) once each, and writes all of them but the grad
    once. The param is read even with an fp32 master: where its bits are no longer the
    master's rounding (the user wrote it), the step starts from the param
    (``kernels/common.py``); with a remainder it is half of the master."""
    p = torch.empty((), dtype=param_dtype).element_size()
    g = torch.empty((), dtype=grad_dtype or param_dtype).element_size()
    master_size = 0
    if master and param_dtype != torch.float32:
        master_size = 2 if master == "remainder" else 4
    state = state_size * state_tensors + master_size
    return Traffic(read=p + g + state, written=p + state, kept=p + g + state)


def scratch_inputs(sizes, device, param_dtype: torch.dtype, state_tensors: int):
    """``(params, grads, states, steps, masters)`` for an ``Algorithm.example``: random params
    and grads of ``param_dtype``, ``state_tensors`` lists of zero fp32 state, zero one-element
    step counts, and fp32 masters for fp16/bf16 params (None for fp32)."""
    device = torch.device(device)
    params = [torch.randn(n, device=device).to(param_dtype) for n in sizes]
    grads = [torch.randn(n, device=device).to(param_dtype) for n in sizes]
    states = [[torch.zeros(n, device=device) for n in sizes] for _ in range(state_tensors)]
    steps = [torch.zeros((), device=device) for _ in sizes]
    masters = [p.float() for p in params] if param_dtype != torch.float32 else None
    return params, grads, states, steps, masters


def tensors_of(x) -> list[torch.Tensor]:
    """Every tensor in ``x`` (nested lists, tuples and dicts), in order: the tensors of an
    example's ``(args, kwargs)``."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for y in x for t in tensors_of(y)]
    if isinstance(x, dict):
        return [t for y in x.values() for t in tensors_of(y)]
    return []


def check_pass_bytes(grad_dtype: torch.dtype) -> int:
    """Bytes per parameter of FP16Optimizer's non-finite check and norm pass: one read of the
    grad (``kernels/nonfinite.py``). It runs before the step when loss scaling or clipping is on."""
    return torch.empty((), dtype=grad_dtype).element_size()


@dataclass(frozen=True)
class Algorithm:
    """An optimizer algorithm as the rest of the package sees it.

    Args:
        name: the kernel's name: launch configurations, tuned entries and the compile check
            are keyed by it; the kernel module provides ``prepare_<name>_step``.
        classes: the torch.optim drop-ins; their ``__name__`` are the config's ``"type"``
            names (matched case-insensitively, as DeepSpeed does for its own optimizers).
        kernel: the module under ``fp16_triton.kernels`` with the Triton kernel and launcher.
        reference: the pure-torch step, with the launcher's arguments: a function (a new
            algorithm keeps it in its host file, beside the class whose CPU fallback it is) or
            the name of a module under ``fp16_triton.kernels`` holding ``<name>_step`` (Adam's
            and SGD's live in ``kernels/reference.py`` with the check and unscale references).
        state: per-param state names, each with when it exists (all fp32, shaped as the param
            but ``step``, a one-element tensor).
        traffic: ``traffic(param_dtype, grad_dtype=None, master=True, **group_options)``, the
            bytes-per-param model of one step; the benchmark quotes it.
        example: ``example(sizes, device, param_dtype) -> (args, kwargs)`` for
            ``prepare_<name>_step``: scratch inputs for ``fp16-triton tune``, the launch-geometry
            checks and the benchmark (fp32 masters for fp16/bf16 params; a tiny lr, so that
            repeated trials barely move them).
        config_defaults: DeepSpeed defaults that differ from the classes' (e.g. FusedAdam's
            ``weight_decay`` 0 for AdamW).
        config_options: DeepSpeed-only keys ``{name: (kind, default)}``: accepted in ``params``,
            lifted out of them, and handed to ``configure``.
        configure: ``configure(type_name, params, options) -> class name``: the DeepSpeed quirks
            (which class runs, combinations to refuse with ``ConfigError``); the default runs
            the class named by the type.
        config_kinds: the config check of arguments whose default does not say it: a kind
            of ``config_values._check_value`` or a function ``check(dotted_key, value) -> value``
            that raises ``ConfigError`` (e.g. a tuple of coefficients, an optional string).
        config_exclude: constructor arguments the config does not take (e.g. a callable).
        functional: the algorithm's public functions on tensor lists (``{"adam_": adam_}``),
            exported by ``fp16_triton.functional``.
        param_shape: ``param_shape(n) -> shape``: the shape the benchmark gives a param of
            ``n`` elements (Muon's are matrices); None: 1-D.
        param_groups: ``param_groups(model, params, options) -> groups``: how the engine
            groups the params it hands to the class (e.g. Muon's split into Muon and AdamW
            halves by name and shape); None hands them over as they are.
    """

    name: str
    classes: tuple[type, ...]
    kernel: str
    state: Mapping[str, str]
    traffic: Callable[..., Traffic]
    example: Callable[..., tuple[tuple, dict]]
    reference: str | Callable[..., None] = "reference"
    config_defaults: Mapping[str, Any] = field(default_factory=dict)
    config_options: Mapping[str, tuple[str, Any]] = field(default_factory=dict)
    configure: Callable[[str, dict, dict], str] | None = None
    config_kinds: Mapping[str, str | Callable[[str, Any], Any]] = field(default_factory=dict)
    config_exclude: frozenset[str] = frozenset()
    functional: Mapping[str, Callable[..., None]] = field(default_factory=dict)
    param_shape: Callable[[int], tuple[int, ...]] | None = None
    param_groups: Callable[[Any, list, Mapping[str, Any]], list[dict]] | None = None

    # ------------------------------------------------------------------------- device side
    def kernel_module(self):
        return kernels(self.kernel)  # imported once (Triton with it), then a cache look-up

    def prepare(self, *args, cache=None, **kwargs) -> Callable[[], None]:
        """The Triton launcher: check everything, return the launch."""
        prepare = getattr(self.kernel_module(), f"prepare_{self.name}_step")
        return prepare(*args, cache=cache, **kwargs)

    def launch_lists(self, backend: str, *args, **kwargs) -> Callable[[], None]:
        """``launch`` for the functional forms, whose lists come from the caller: on the torch
        reference every list is first checked to hold one dtype on one device, as the Triton
        launchers check when they build their tables (an optimizer's buckets are so by
        construction, and skip this O(n) pass)."""
        if backend == "torch" and args and len(args[0]):
            kernels("multi_tensor").check_uniform_lists(args, kwargs)
        return self.launch(backend, *args, **kwargs)

    def launch(self, backend: str, *args, cache=None, **kwargs) -> Callable[[], None]:
        """One step's launch on ``backend`` (``"triton"`` or ``"torch"``, as resolved by the
        caller): what the classes and the functional forms run. On the Triton path every input
        is checked before this returns (so a class can check every group before it launches
        any); the torch reference checks when the launch runs."""
        if backend == "triton":
            return self.prepare(*args, cache=cache, **kwargs)
        return lambda: self.run_reference(*args, **kwargs)

    def run_reference(self, *args, **kwargs) -> None:
        reference = self.reference
        if isinstance(reference, str):
            reference = getattr(kernels(reference), f"{self.name}_step")
        reference(*args, **kwargs)

    # ------------------------------------------------------------------------- config side
    @property
    def type_names(self) -> tuple[str, ...]:
        return tuple(cls.__name__ for cls in self.classes)

    def optimizer_class(self, name: str) -> type:
        return {cls.__name__: cls for cls in self.classes}[name]

    def config_params(self) -> Mapping[str, tuple[str, Any]]:
        """``{param: (kind, default)}`` of the config's ``optimizer.params``: the keyword
        arguments of the classes' constructors (kinds from their defaults), then the
        DeepSpeed-only options."""
        params: dict[str, tuple[str, Any]] = {}
        for cls in self.classes:
            for arg in inspect.signature(cls.__init__).parameters.values():
                skip = _NOT_CONFIG_PARAMS | self.config_exclude
                if arg.name in skip or arg.name in params or arg.name == "self":
                    continue
                if arg.kind not in (arg.POSITIONAL_OR_KEYWORD, arg.KEYWORD_ONLY):
                    continue
                default = self.config_defaults.get(arg.name, arg.default)
                kind = (
                    self.config_kinds.get(arg.name)
                    or _SHARED_CONFIG_KINDS.get(arg.name)
                    or _kind_of(cls, arg.name, default)
                )
                params[arg.name] = (kind, default)
        params.update(self.config_options)
        return MappingProxyType(params)


def _check_config_master_weights(key: str, value) -> bool | str:
    from .config import ConfigError
    from .masters import check_master_weights

    if isinstance(value, bool) or value == "remainder":
        return check_master_weights(value)
    raise ConfigError(f"config key '{key}' must be true, false or \"remainder\", got {value!r}")


_SHARED_CONFIG_KINDS = {"master_weights": _check_config_master_weights}


def _kind_of(cls: type, name: str, default: Any) -> str:
    """The config checker's kind of a constructor argument, from its default."""
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int):
        return "pos_int" if default > 0 else "int"
    if isinstance(default, float):
        return "nonneg"
    if isinstance(default, tuple) and len(default) == 2 and name == "betas":
        return "betas"
    raise TypeError(
        f"{cls.__name__}({name}={default!r}): no config kind for this default; give the "
        "argument one in its Algorithm's config_kinds, or list it in config_exclude"
    )


_registry: dict[str, Algorithm] = {}


def register(algorithm: Algorithm) -> Algorithm:
    """Add ``algorithm`` to the registry (its host module calls this when imported)."""
    if algorithm.name in _registry and _registry[algorithm.name] is not algorithm:
        raise ValueError(f"an algorithm named {algorithm.name!r} is registered already")
    _registry[algorithm.name] = algorithm
    return algorithm


def algorithms() -> Mapping[str, Algorithm]:
    """Every registered algorithm by name. The registry is the list of imports of the host
    modules in ``fp16_triton/__init__.py``: one line per algorithm, which also exports its
    classes."""
    importlib.import_module(__package__)  # the package's imports register them
    return MappingProxyType(_registry)


def algorithm_for_type(type_name: str) -> Algorithm | None:
    """The algorithm whose classes include ``type_name`` (case-insensitive), or None."""
    for algorithm in algorithms().values():
        if type_name.lower() in (n.lower() for n in algorithm.type_names):
            return algorithm
    return None
