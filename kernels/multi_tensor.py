"""Multi-tensor launch tables: one kernel launch covers every tensor of a group.

Design choice: **pointer tables**. Each launch receives, per tensor list (params, grads, fp32
masters, moments, step counts), an int64 table of data addresses, plus a *chunk map* that gives
every program instance the tensor it works on and the first element of its chunk. A program
loads its tensor's address from the table and casts it to a typed pointer.

Why pointer tables by default: gradients are allocated by autograd (a new tensor after every
``zero_grad(set_to_none=True)``), so they live in a buffer we own only if users let the
optimizer own them; with tables, params, grads and state keep torch's per-parameter layout
(``optimizer.state[p]["exp_avg"]`` is a real tensor), and the launch count is constant in the
number of tensors. torch's own ``multi_tensor_apply`` passes addresses in kernel arguments
(4 KB), so it needs one launch per ~30-110 tensors; a table in device memory has no such limit.

Tables are rebuilt only when an address or a size changes. The caching allocator usually hands
autograd the same addresses step after step, so the steady state costs Python passes over
``data_ptr()``/``numel()`` of the lists that can move, and no upload: host time linear in the
number of tensors. Optimizers with ``flat_buffers=True`` (``fp16_triton/flat_buffers.py``) own
their grads instead: their tables hold one tensor per bucket, and the step's host time does not
grow with the number of tensors. Figures for both: ``bench/results/``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "COMPACT_STATE_DTYPES",
    "LOW_PRECISION",
    "SUPPORTED_DTYPES",
    "LaunchTables",
    "TableCache",
    "TensorList",
    "check_scalar",
    "check_step_inputs",
    "check_tensor_lists",
    "device_guard",
    "is_aligned",
    "is_dense",
    "learning_rate",
    "tables_for",
]


def check_tensor_lists(names: Sequence[str], lists: Sequence[Sequence[torch.Tensor] | None]):
    """Raise a clear error unless ``lists`` can be read by one table kernel.

    Within a list every tensor has the same dtype; across lists, the k-th tensors have the same
    number of elements and the same strides (one element in a ``steps`` list: per-tensor step
    counts), and all tensors are on one device and dense (any order of dimensions, e.g.
    channels_last: ``is_dense``). Launchers run this only when their tables are rebuilt, so
    steady steps pay nothing for it.
    """
    ref = lists[0]
    if len(ref) == 0:
        raise ValueError(f"{names[0]} is empty: nothing to launch")
    device = ref[0].device
    for name, tensors in zip(names, lists):
        if tensors is None:
            continue
        if len(tensors) != len(ref):
            raise ValueError(f"{name}: expected {len(ref)} tensors, got {len(tensors)}")
        dtype = tensors[0].dtype
        for i, (t, like) in enumerate(zip(tensors, ref)):
            if t.device != device:
                raise ValueError(f"{name}[{i}] is on {t.device}, expected {device}")
            if t.dtype != dtype:
                raise ValueError(f"{name}[{i}] is {t.dtype} while {name}[0] is {dtype}")
            expected = 1 if name in ONE_ELEMENT_ROWS else like.numel()
            if name in BLOCK_ROWS:
                expected = -(-like.numel() // QUANT_BLOCK)
            if t.numel() != expected:
                raise ValueError(
                    f"{name}[{i}] has {t.numel()} elements, expected {expected} "
                    f"(shape {tuple(t.shape)} vs {tuple(like.shape)})"
                )
            if t.is_sparse:
                raise ValueError(f"{name}[{i}] is sparse; the fused kernels need dense tensors")
            if not is_dense(t):
                raise ValueError(
                    f"{name}[{i}] has gaps or overlaps in memory (shape {tuple(t.shape)}, "
                    f"strides {t.stride()}); the fused kernels read tensors as flat ranges: "
                    "call .contiguous() on it, or use backend='torch'"
                )
            flat_row = name in ONE_ELEMENT_ROWS or name in BLOCK_ROWS
            if not flat_row and t.numel() > 1 and t.stride() != like.stride():
                raise ValueError(
                    f"{name}[{i}] has strides {t.stride()} while {names[0]}[{i}] has "
                    f"{like.stride()}; the fused kernels pair elements by their position in "
                    "memory, so every list's k-th tensor must share one layout"
                )


def check_scalar(name: str, t: torch.Tensor | None, device: torch.device) -> None:
    """Raise unless ``t`` (a loss scale, flag or squared norm) is None or a one-element fp32
    tensor on ``device``: the kernels read it through a pointer."""
    if t is None:
        return
    if t.numel() != 1 or t.dtype != torch.float32 or t.device != device:
        raise ValueError(
            f"{name} must be a one-element float32 tensor on {device}, "
            f"got {t.dtype} with {t.numel()} elements on {t.device}"
        )


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""The dtypes of params and grads that the optimizers and the kernels accept."""
LOW_PRECISION = (torch.float16, torch.bfloat16)
"""The dtypes whose params get an fp32 master."""


ONE_ELEMENT_ROWS = ("steps", "sr_seeds")
"""Table rows of one-element tensors per param (step counts, int64 rounding seeds)."""
BLOCK_ROWS = ("exp_avg_scales", "exp_avg_sq_scales")
"""Table rows of one fp32 scale per quantization block of the param (int8 moments:
``kernels/quantize.py``): ``ceil(numel / quantize.BLOCK)`` elements, contiguous."""
QUANT_BLOCK = 256  # kernels/quantize.py: BLOCK (kept here too: quantize imports this module)


def rounds_stochastically(sr_seeds, params, masters, state) -> bool:
    """Whether a step given ``sr_seeds`` has anything to round stochastically: a bf16 state
    list (``state``, None where there is none) or low-precision params without masters."""
    if sr_seeds is None:
        return False
    compact = bool(state) and state[0].dtype != torch.float32
    return compact or (masters is None and bool(params) and params[0].dtype != torch.float32)


def master_mode(masters) -> int:
    """The kernels' ``HAS_MASTER`` flag for a masters list: 0 none, 1 fp32 masters, 2 int16
    remainders of bf16 params (``kernels/remainder.py``)."""
    if masters is None:
        return 0
    return 2 if len(masters) and masters[0].dtype == torch.int16 else 1


COMPACT_STATE_DTYPES = (torch.float32, torch.bfloat16, torch.int8)
"""The dtypes a kernel that takes a ``STATE_DTYPE`` flag reads its compact state lists in."""


def check_step_inputs(
    params, grads, masters, state_lists, grad_scale, found_inf, norm_sq, compact_state=()
):
    """O(1) checks of the dtype combination shared by the step launchers (the per-tensor checks
    run when tables are rebuilt). The lists named in ``compact_state`` may be bf16 instead of
    fp32, all of one dtype (the kernel reads them through one ``STATE_DTYPE``)."""
    if len(params) == 0 or len(grads) == 0:
        raise ValueError("a fused step needs at least one param with a grad; got an empty list")
    param_dtype, grad_dtype = params[0].dtype, grads[0].dtype
    if param_dtype not in SUPPORTED_DTYPES or grad_dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"params and grads must be float16, bfloat16 or float32, got {param_dtype} params "
            f"with {grad_dtype} grads"
        )
    if masters is not None and param_dtype not in LOW_PRECISION:
        raise ValueError(
            f"masters must be None for {param_dtype} params: they are their own master"
        )
    if masters is not None and len(masters):
        if masters[0].dtype == torch.int16 and param_dtype != torch.bfloat16:
            raise TypeError(
                f"int16 masters (remainders) hold only bf16 params' masters, got {param_dtype} "
                "params; give fp16 params fp32 masters"
            )
        if masters[0].dtype not in (torch.float32, torch.int16):
            raise TypeError(
                f"masters must be float32 (or int16 remainders of bf16 params), got "
                f"{masters[0].dtype}"
            )
    compact_dtypes = {}
    for name, lst in state_lists.items():
        if lst is None or not len(lst):
            continue
        if name == "masters":  # checked above
            continue
        if name in BLOCK_ROWS:
            if lst[0].dtype != torch.float32:
                raise TypeError(f"{name} must be float32, got {lst[0].dtype}")
            continue
        if name == "sr_seeds":
            if lst[0].dtype != torch.int64:
                raise TypeError(f"sr_seeds must be int64, got {lst[0].dtype}")
            continue
        if name in compact_state:
            if lst[0].dtype not in COMPACT_STATE_DTYPES:
                raise TypeError(f"{name} must be float32, bfloat16 or int8, got {lst[0].dtype}")
            compact_dtypes[name] = lst[0].dtype
        elif lst[0].dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {lst[0].dtype}")
    if len(set(compact_dtypes.values())) > 1:
        raise TypeError(f"{', '.join(compact_dtypes)} must share one dtype, got {compact_dtypes}")
    if torch.int8 in compact_dtypes.values() and not any(state_lists.get(r) for r in BLOCK_ROWS):
        raise TypeError(
            f"{', '.join(compact_dtypes)}: int8 state needs its block scales "
            f"({', '.join(BLOCK_ROWS)}), which only Adam's and AdamW's int8 moments have; keep "
            "this state in float32 or bfloat16"
        )
    device = params[0].device
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf), ("norm_sq", norm_sq)):
        check_scalar(name, t, device)


def check_reference_inputs(
    params, grads, masters, state_lists, grad_scale, found_inf, norm_sq, compact_state=()
) -> None:
    """The torch reference's O(1) checks before it writes anything: ``check_step_inputs``
    (the launchers' own). Lists of mixed dtypes or devices are the functional forms' to check
    (``check_uniform_lists``): an optimizer's buckets are uniform by construction."""
    if len(params):
        check_step_inputs(
            params, grads, masters, state_lists, grad_scale, found_inf, norm_sq, compact_state
        )


def check_uniform_lists(args, kwargs) -> None:
    """Raise unless every tensor list among ``args`` (params first) and ``kwargs`` holds one
    dtype on the params' device: what the launchers check when they build their tables, for
    the torch reference's callers that pass lists of their own (O(n))."""
    device = args[0][0].device
    positional = ["params", "grads"] + [f"positional list {k}" for k in range(2, len(args))]
    named = list(zip(positional, args)) + list(kwargs.items())
    for name, tensors in named:
        if not isinstance(tensors, (list, tuple)):
            continue
        tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
        for i, t in enumerate(tensors):
            if t.dtype != tensors[0].dtype or t.device != device:
                raise ValueError(
                    f"{name}[{i}] is {t.dtype} on {t.device} while its first tensor is "
                    f"{tensors[0].dtype} and the first param is on {device}"
                )


def is_dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill one range of memory, starting at ``data_ptr()``, without
    gaps or overlaps, in any order of dimensions (contiguous, channels_last, a transpose).

    The kernels read every tensor as such a flat range, so tensors with the same strides pair
    up element by element whatever their layout; a strided slice (``w[:, ::2]``) does not.
    """
    if t.numel() == 0:
        return True
    expected = 1
    for stride, size in sorted((s, n) for n, s in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def is_aligned(t: torch.Tensor) -> bool:
    """Whether ``t`` qualifies for the kernels' ALIGNED variant: 16-byte aligned data and a
    size divisible by 8 (so masks are uniform over 128-bit vectors of fp16 and fp32)."""
    return t.data_ptr() % 16 == 0 and t.numel() % 8 == 0


def device_guard(device: torch.device):
    """Make ``device`` current for a launch: Triton launches on the current CUDA device and
    stream, whatever device the tensors are on."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def learning_rate(lr, device: torch.device) -> tuple[float, torch.Tensor | None]:
    """``(value, tensor)`` for a kernel: a one-element fp32 tensor on ``device`` is passed as a
    pointer (read by the kernel: no sync, capturable); anything else as a float (a tensor lr
    elsewhere is read on the host)."""
    if isinstance(lr, torch.Tensor):
        if lr.device == device and lr.dtype == torch.float32 and lr.numel() == 1:
            return 0.0, lr
        return float(lr.item()), None
    return float(lr), None


class TensorList(list):
    """A list of tensors whose owner has read their addresses and sizes this step.

    Reading ``data_ptr()`` or ``numel()`` of every tensor is a host cost linear in the number
    of tensors (``bench/results/``); an optimizer reads them once per step to check its
    buckets, and the launches of that step (the check pass, the step) reuse them. The owner
    vouches that ``addresses`` and ``numels``, when set, are those of the tensors now.
    """

    addresses: tuple[int, ...] | None = None
    numels: tuple[int, ...] | None = None


def _addresses(tensors: Sequence[torch.Tensor]) -> tuple[int, ...]:
    known = getattr(tensors, "addresses", None)
    if known is not None:
        return known
    return tuple(map(torch.Tensor.data_ptr, tensors))  # map: no per-item attribute lookup


def _numels(tensors: Sequence[torch.Tensor]) -> tuple[int, ...]:
    known = getattr(tensors, "numels", None)
    if known is not None:
        return known
    return tuple(map(torch.Tensor.numel, tensors))


# Every launch compiles without implicit FMA contraction (ptxas ``--fmad=false``): a GPU then
# rounds each ``a * b + c`` twice, as Triton's interpreter and torch's elementwise ops do, so
# a kernel's result does not depend on which variant (alignment, block size, flat or per-tensor
# tables) the compiler happened to fuse differently. Where a single rounding is the semantics
# (torch's lerp, Muon's update), the kernels call ``tl.fma`` explicitly. The step is memory-
# bound: the few extra instructions cost no time.
EXACT_ARITHMETIC = {"enable_fp_fusion": False}


@dataclass
class LaunchTables:
    """Device tables for one launch: address rows, sizes and the chunk map.

    ``addresses[k]`` (also ``rows[k]``, the same row as a view made once, so launches do not
    index the table every step) is the int64 address table of the k-th tensor list;
    ``numels[t]`` is the
    size of tensor t; ``chunk_map[0, pid]`` is the tensor handled by program ``pid`` and
    ``chunk_map[1, pid]`` the first element of its chunk. ``n_programs`` is the grid size.
    ``aligned``: every address is 16-byte aligned and every size a multiple of 8, so the
    kernels may promise the compiler 128-bit accesses.
    """

    addresses: torch.Tensor
    numels: torch.Tensor
    chunk_map: torch.Tensor
    n_programs: int
    aligned: bool
    rows: tuple[torch.Tensor, ...] = field(init=False)

    def __post_init__(self):
        self.rows = tuple(self.addresses.unbind(0))

    @property
    def chunk_args(self) -> tuple:
        """``(numels, chunk_map, n_programs)``: what every table kernel takes after its rows."""
        return (self.numels, self.chunk_map, self.n_programs)

    def options(self, config: dict[str, int]) -> dict:
        """The alignment flag, block sizes, warps and ``EXACT_ARITHMETIC`` of a launch over these
        tables."""
        return dict(
            ALIGNED=self.aligned,
            BLOCK=config["BLOCK"],
            CHUNK=config["CHUNK"],
            num_warps=config["num_warps"],
            **EXACT_ARITHMETIC,
        )

    @staticmethod
    def build(
        names: Sequence[str], lists: Sequence[Sequence[torch.Tensor] | None], chunk: int
    ) -> LaunchTables:
        """Validate ``lists`` (see ``check_tensor_lists``) and build their tables, ``chunk``
        elements per program. A ``None`` list gets a row of null addresses."""
        check_tensor_lists(names, lists)
        device = lists[0][0].device
        n_tensors = len(lists[0])
        rows = [
            [t.data_ptr() for t in lst] if lst is not None else [0] * n_tensors for lst in lists
        ]
        addresses = torch.tensor(rows, dtype=torch.int64).reshape(len(lists), n_tensors)
        numels = torch.tensor([t.numel() for t in lists[0]], dtype=torch.int64)
        chunks_per_tensor = (numels + chunk - 1) // chunk
        tensor_of_program = torch.repeat_interleave(torch.arange(n_tensors), chunks_per_tensor)
        first_program = torch.cumsum(chunks_per_tensor, 0) - chunks_per_tensor
        n_programs = int(tensor_of_program.numel())
        start = (torch.arange(n_programs) - first_program[tensor_of_program]) * chunk
        chunk_map = torch.stack([tensor_of_program, start])
        aligned = all(
            is_aligned(t)
            for name, lst in zip(names, lists)
            if lst is not None and name not in ONE_ELEMENT_ROWS and name not in BLOCK_ROWS
            for t in lst
        )
        if device.type != "cpu":
            # One host-to-device copy per rebuild; pinned memory keeps it asynchronous, and a
            # fresh pinned buffer per rebuild means no pending copy can see its source change.
            addresses = addresses.pin_memory().to(device, non_blocking=True)
            numels = numels.pin_memory().to(device, non_blocking=True)
            chunk_map = chunk_map.pin_memory().to(device, non_blocking=True)
        return LaunchTables(addresses, numels, chunk_map, n_programs, aligned)


@dataclass
class TableCache:
    """What a launcher keeps between calls for one tensor group, so steady steps upload nothing.

    Owners (the optimizers) keep one per group. ``state_version`` is bumped by the owner
    whenever it replaces a state tensor (load_state_dict, add_param_group); lists the launcher
    is told are *state* are then re-read only on a version change, while params and grads are
    compared address by address on every call.
    """

    state_version: int = 0
    _key: tuple | None = None
    _state_key: tuple | None = None
    _tables: LaunchTables | None = None
    scratch: dict = field(default_factory=dict)

    def get(
        self,
        names: Sequence[str],
        moving: Sequence[Sequence[torch.Tensor] | None],
        state: Sequence[Sequence[torch.Tensor] | None],
        chunk: int,
    ) -> LaunchTables:
        """Tables for ``moving + state`` lists, rebuilt only when something changed."""
        key = (chunk, tuple(_addresses(lst) if lst is not None else None for lst in moving))
        key += (_numels(moving[0]),)
        if self._state_key is None or self._state_key[0] != self.state_version:
            state_addresses = tuple(_addresses(lst) if lst is not None else None for lst in state)
            self._state_key = (self.state_version, state_addresses)
        key += self._state_key
        if key != self._key or self._tables is None:
            self._tables = LaunchTables.build(names, list(moving) + list(state), chunk)
            self._key = key
        return self._tables


def sub_cache(cache: TableCache | None, key) -> TableCache | None:
    """The cache a launcher keeps under ``key`` inside its caller's ``cache`` (one per dtype
    group of a multi-launch call), or None when the caller keeps none."""
    if cache is None:
        return None
    return cache.scratch.setdefault(key, TableCache())


def tables_for(
    names: Sequence[str],
    moving: Sequence[Sequence[torch.Tensor] | None],
    state: Sequence[Sequence[torch.Tensor] | None],
    chunk: int,
    cache: TableCache | None,
) -> LaunchTables:
    """Tables from ``cache`` when the caller keeps one, else built (and checked) for this call.

    ``moving`` lists (params, grads) are compared address by address on every call; ``state``
    lists only when ``cache.state_version`` changes.
    """
    if cache is None:
        return LaunchTables.build(names, list(moving) + list(state), chunk)
    return cache.get(names, moving, state, chunk)
