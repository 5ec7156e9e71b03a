"""fp16_triton's cases, built from the algorithms' spec (``fp16_triton/spec.py``): each
registered algorithm gets its rows, and every bytes-per-param figure of ours is the spec's
traffic model, so the benchmark cannot drift from the kernels' documented traffic."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch

import fp16_triton
from fp16_triton.spec import Algorithm, Traffic, algorithms, check_pass_bytes

from .case import Case, make_params

HEADLINE = "adam"
"""The algorithm of the README's recipe, ``FP16Optimizer(AdamW(backend="triton"),
clip_grad=1.0)`` on fp16 params with fp32 masters: the large-model row every GPU baseline is
compared with. Its per-algorithm GPU row is that recipe, not a plain fp32 one."""

RECIPE_DTYPE = torch.float16
LR = 1e-4

# Which of an algorithm's classes the benchmark runs, with which options (they are also the
# traffic model's group options). An algorithm not listed runs its first class with the
# class's defaults, so a new algorithm gets its rows without an edit here.
OPTIONS: dict[str, tuple[str, dict]] = {
    "adam": ("AdamW", {}),
    "sgd": ("SGD", {"momentum": 0.9}),  # torch's fused SGD is timed with the same momentum
}


def optimizer_of(algorithm: Algorithm) -> tuple[type, dict]:
    """The class the benchmark runs for ``algorithm`` and its options."""
    name, options = OPTIONS.get(algorithm.name, (algorithm.type_names[0], {}))
    return algorithm.optimizer_class(name), options


def traffic(algorithm: Algorithm, param_dtype: torch.dtype, **modes) -> Traffic:
    """The spec's bytes per param of one step of ``algorithm`` as the benchmark runs it
    (``modes``: the compact-state options of a variant, e.g. ``state_dtype``)."""
    return algorithm.traffic(param_dtype, **optimizer_of(algorithm)[1], **modes)


def _param_dtype(modes: dict) -> torch.dtype:
    """fp16 params, but bf16 for remainder masters (they hold bf16 params' masters only)."""
    return torch.bfloat16 if modes.get("master_weights") == "remainder" else RECIPE_DTYPE


def _traffic_modes(modes: dict) -> dict:
    """``modes`` as the spec's traffic model names them (``master``, not ``master_weights``)."""
    out = {k: v for k, v in modes.items() if k != "master_weights"}
    if "master_weights" in modes:
        out["master"] = modes["master_weights"]
    return out


def recipe_bytes(**modes) -> tuple[int, int, int]:
    """``(total, check, step)`` bytes per param of the recipe's step: FP16Optimizer's check
    and norm pass, then the headline algorithm's step on fp16 params with fp32 masters (bf16
    params with remainder masters)."""
    dtype = _param_dtype(modes)
    check = check_pass_bytes(dtype)
    step = traffic(algorithms()[HEADLINE], dtype, **_traffic_modes(modes)).moved
    return check + step, check, step


# ------------------------------------------------------------------------------ set-ups
def build_recipe(
    sizes: Sequence[int],
    device: torch.device,
    flat: bool = False,
    modes: dict | None = None,
    backend: str = "triton",
    **fp16_options,
) -> fp16_triton.FP16Optimizer:
    """The README's recipe: fp16 params with fp32 master and moments, the check + norm pass,
    the fused step with clipping at 1.0, dynamic loss scaling; ``flat``: the optimizer owns
    flat param, grad and state buffers, so a step reads no per-param attribute; ``modes``:
    compact-state options of the optimizer (``state_dtype``); ``backend="torch"``: the foreach
    reference, which the CPU section times. ``fp16_options`` go to FP16Optimizer (e.g. a loss
    scaler)."""
    cls, options = optimizer_of(algorithms()[HEADLINE])
    params = make_params(sizes, _param_dtype(modes or {}), device)
    optimizer = cls(params, lr=LR, backend=backend, flat_buffers=flat, **options, **(modes or {}))
    return fp16_triton.FP16Optimizer(optimizer, clip_grad=1.0, **fp16_options)


def setup_recipe(
    sizes: Sequence[int],
    device: torch.device,
    flat: bool = False,
    modes: dict | None = None,
    backend: str = "triton",
) -> Callable[[], object]:
    """The recipe's step (``build_recipe``)."""
    return build_recipe(sizes, device, flat, modes, backend).step


def setup_algorithm(
    algorithm: Algorithm, backend: str, sizes: Sequence[int], device: torch.device
) -> Callable[[], object]:
    """``algorithm``'s optimizer on fp32 params with ``backend``: the same math and bytes as
    torch's fp32 optimizers, so the kernel (or the foreach reference) is compared alone."""
    cls, options = optimizer_of(algorithm)
    params = make_params(sizes, torch.float32, device, shape=algorithm.param_shape)
    return cls(params, lr=LR, backend=backend, **options).step


# -------------------------------------------------------------------------------- cases
def recipe_case(
    key: str = "ours",
    shape: str = "",
    vs: str = "",
    flat: bool = False,
    modes: dict | None = None,
    backend: str = "triton",
) -> Case:
    """The recipe as a case (``shape`` names the tensor layout in the label; ``modes`` are
    compact-state options, e.g. ``{"state_dtype": torch.bfloat16}``; ``backend="torch"``: the
    foreach reference)."""
    modes = modes or {}
    total, _, _ = recipe_bytes(**modes)
    kept = traffic(algorithms()[HEADLINE], _param_dtype(modes), **_traffic_modes(modes)).kept
    cls, _ = optimizer_of(algorithms()[HEADLINE])
    way = "triton" if backend == "triton" else f"backend={backend!r}"
    if modes or backend != "triton":
        settings = "".join(f", {k}={v}" for k, v in modes.items())
        dtype = str(_param_dtype(modes)).removeprefix("torch.")
        label = f"ours: FP16Optimizer({cls.__name__} {way}, clip 1.0{settings}), {dtype} params"
    elif shape:
        label = f"ours: FP16Optimizer({cls.__name__} triton), {shape}"
    elif flat:
        label = f"ours: FP16Optimizer({cls.__name__} triton, clip 1.0, flat_buffers=True)"
    else:
        label = (
            f"ours: FP16Optimizer({cls.__name__} triton, clip 1.0), fp16 params + fp32 master/m/v"
        )
    setup = partial(setup_recipe, flat=flat, modes=modes, backend=backend)
    return Case(key, label, vs or key, total, kept, setup, triton=backend == "triton")


def algorithm_case(algorithm: Algorithm, backend: str) -> Case:
    """``algorithm`` on fp32 params, keyed ``ours-<class>`` (its torch counterparts divide by
    it)."""
    cls, options = optimizer_of(algorithm)
    model = traffic(algorithm, torch.float32)
    settings = [f"{name} {value}" for name, value in options.items()]
    settings.append("triton" if backend == "triton" else f"backend={backend!r}")
    key = f"ours-{cls.__name__.lower()}"
    label = f"ours: {cls.__name__}({', '.join(settings)}), fp32 params"
    setup = partial(setup_algorithm, algorithm, backend)
    return Case(key, label, key, model.moved, model.kept, setup, triton=backend == "triton")


OURS_ADAMW = recipe_case()
SMALL_FLATBUF = recipe_case("ours-flatbuf", vs="ours-flat", flat=True)
# The compact-state modes of issue 14, by key suffix.
COMPACT_MODES = {
    "bf16-moments": {"state_dtype": torch.bfloat16},
    "remainder": {"master_weights": "remainder"},
    "remainder-bf16-moments": {"master_weights": "remainder", "state_dtype": torch.bfloat16},
    "remainder-int8-moments": {"master_weights": "remainder", "state_dtype": "int8"},
}
# The recipe with compact state, each divided by the recipe.
COMPACT = [recipe_case(f"ours-{k}", vs="ours", modes=m) for k, m in COMPACT_MODES.items()]
# The same on the foreach reference (the CPU's path), each divided by the reference recipe.
CPU_RECIPE = recipe_case("ours-cpu-recipe", backend="torch")
CPU_COMPACT = [
    recipe_case(f"ours-cpu-{k}", vs=CPU_RECIPE.key, modes=m, backend="torch")
    for k, m in COMPACT_MODES.items()
]


def gpu_cases() -> dict[str, Case]:
    """Each algorithm but the headline's on the Triton path, by algorithm name (the
    headline's row is the recipe)."""
    return {n: algorithm_case(a, "triton") for n, a in algorithms().items() if n != HEADLINE}


def cpu_cases() -> dict[str, Case]:
    """Each algorithm on the foreach reference (``backend="torch"``), by algorithm name."""
    return {name: algorithm_case(a, "torch") for name, a in algorithms().items()}


def models() -> list[str]:
    """The report's lines on ours' bytes-per-param models, from the spec."""
    total, check, step = recipe_bytes()
    name = optimizer_of(algorithms()[HEADLINE])[0].__name__
    fp32 = [
        f"{optimizer_of(a)[0].__name__} {traffic(a, torch.float32).moved}"
        for a in algorithms().values()
    ]
    return [
        f"ours: {total} B/param (check + norm {check}, {name} {step}: fp16_triton/spec.py)",
        f"ours on fp32 params: {', '.join(fp32)}",
    ]
