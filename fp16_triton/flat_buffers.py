"""Optimizer-owned flat buffers (``flat_buffers=True``): one tensor each for the params, grads
and every state of a bucket, with each param's data, grad and state as views into them.

Why: the step is one launch whatever the number of tensors, but with per-param tensors the host
must still read every ``p.grad`` and ``data_ptr()`` each step to know what to launch on, a host
cost linear in the number of tensors (figures in ``bench/results/``). With flat buffers the steady
step touches a constant number of Python objects per bucket, and the kernels see one contiguous
range (no small-tensor tails).

The contract, as with DDP's ``gradient_as_bucket_view`` and DeepSpeed's flattened fp16
optimizer:

- At the first step the optimizer *adopts* each param of a bucket (the params of one group,
  device and dtype that require grad): ``p.data``, ``p.grad`` and ``optimizer.state[p][name]``
  become views into the bucket's buffers. Autograd then accumulates into the grad views in
  place, and ``optimizer.zero_grad()`` zeroes each grad buffer (one fill per bucket) instead of
  setting grads to None.
- Every adopted param is stepped at every step; a param that received no grad is stepped with a
  zero grad (DeepSpeed's ``FP16_Optimizer`` does the same), so Adam's moments keep moving it.
  Params that do not require grad at adoption are never adopted and never stepped. Which params
  require grad is read at adoption: a param frozen later is stepped like one that gets no grad
  (reading ``requires_grad`` of every param at every step would cost as much as reading its
  grad), and a left-out param that starts requiring grad is an error (the params of a buffer
  share one step count): add params you will unfreeze as a group of their own when you
  unfreeze them.
- Each step checks, in O(1), three signals against the last verified steps
  (``FlatBuffers.steady``): the first and the last param's addresses (data, grad and state
  views), how many tensors reference the param, grad and state buffers' storages, and how many
  in-place writes the grad views took. Whatever replaces a grad, a param's data or a state
  view's memory anywhere in the bucket changes one of them; the step then checks every param
  and re-adopts those out of place (an O(n) pass, logged), reading every source before writing
  any slot (params may have swapped slots). State assigned through ``optimizer.state`` is
  noticed by its write count. See ``steady`` for what is not noticed.
- Views of params made before adoption (``self.dec_w = self.mid.weight.t()``) keep the old
  storage: adoption counts them and warns.
- Compact state (``state_dtype``, ``master_weights="remainder"``, ``stochastic_rounding``) is
  kept flat too: each state buffer has the dtype of the state it holds (bf16 or int8 moments,
  int16 remainders), int8 moments' block scales are one buffer with one scale per 256-element
  block (a bucket with int8 moments starts every view at a multiple of 256, so each param's
  blocks are whole blocks of the buffer and its codes and scales are those a per-tensor
  optimizer keeps), and a per-param scalar (the stochastic-rounding ``sr_seed``) stays with
  each param: the launch draws the bucket's random words from its first param's seed and
  counts them over the whole buffer, a different (equally unbiased) stream from a per-tensor
  optimizer's, reproducible and resumed bitwise by a flat one. Remainder masters add one O(n)
  pass per step: each param's own version counter and address, read to see writes between
  steps (``masters.py``), which nothing in O(1) tells apart param by param.
- The params share storage: ``torch.save`` of one param (or one state tensor) writes its whole
  buffer; save state dicts whole. A param dropped from a rebuilt bucket keeps the old buffer
  alive through its views until it is re-adopted or freed.
- Another owner of the params' storage must not exist: ``ZeroRedundancyOptimizer(
  parameters_as_bucket_view=True)`` (or DDP's ``gradient_as_bucket_view=True``, which costs an
  O(n) re-adoption every step) do not mix with flat buffers.

This file holds the buffers (``FlatBuffers``); how the optimizer applies the contract to a
param group (which params it adopts, when a step stays steady, what it refuses or warns about,
``zero_grad``) is in ``flat_policy.py``.
"""

from __future__ import annotations

import torch

from .kernels.multi_tensor import QUANT_BLOCK, TensorList

__all__ = ["ALIGN_ELEMENTS", "FlatBuffers", "storage_use_count"]

ALIGN_ELEMENTS = 64
"""Every view starts at a multiple of 64 elements: 128 bytes in an fp16 buffer and 256 in an
fp32 one, so each param, grad and state view is as aligned as a fresh allocation needs to be for
vectorized (128-bit) and cuBLAS access, and the kernels' ALIGNED variant applies to the whole
buffer. Padding is zero in every buffer, and a zero param with a zero grad and zero state stays
zero under Adam, AdamW, SGD and Lion, so it never changes the norm or the non-finite check."""


# How many tensors reference a storage, O(1) (a private torch function: without it every step
# checks every param).
storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _padded(n: int, align: int = ALIGN_ELEMENTS) -> int:
    return -(-n // align) * align


class FlatBuffers:
    """The flat storage of one bucket: ``param`` and ``grad`` (the params' dtype), ``state``
    (one buffer per state name, in that state's dtype) and one shared ``step`` count.

    Args:
        params: the optimizer's params of the bucket: same device and dtype, not DTensors.
        key: what else the params have in common (the optimizer's bucket key, such as their
            moments' dtype), for ``regroup``.
        block_states: names of the states kept as one value per ``QUANT_BLOCK`` elements
            (int8 moments' scales); when given, every view starts at a multiple of
            ``QUANT_BLOCK``.
    """

    def __init__(
        self, params: list[torch.Tensor], key: object = None, block_states: tuple[str, ...] = ()
    ):
        self.params = params
        self.key = key
        self.block_states = block_states
        self.dtype = params[0].dtype
        self.device = params[0].device
        self.shapes = [p.shape for p in params]
        # Views keep each param's layout (channels_last too): a dense tensor of any strides
        # fills exactly its slot, and param, grad and state views pair up element by element.
        self.strides = [p.stride() for p in params]
        align = QUANT_BLOCK if block_states else ALIGN_ELEMENTS
        self.offsets = []
        total = 0
        for p in params:
            self.offsets.append(total)
            total += _padded(p.numel(), align)
        self.numel = total
        self.param = torch.zeros(total, dtype=self.dtype, device=self.device)
        self.grad = torch.zeros(total, dtype=self.dtype, device=self.device)
        # The one-tensor lists the kernels read, made once: their addresses never change.
        self.launch_params = TensorList([self.param])
        self.launch_grads = TensorList([self.grad])
        for lst in (self.launch_params, self.launch_grads):
            lst.addresses, lst.numels = (lst[0].data_ptr(),), (total,)
        self.state: dict[str, torch.Tensor] = {}
        self.state_views: dict[str, list[torch.Tensor]] = {}
        self._state_ptrs: dict[str, list[int]] = {}
        self.step: torch.Tensor | None = None
        self.scalars: dict[str, torch.Tensor] = {}  # per-param scalars: the first param's
        # No param or grad view is kept here (views are made when adopting): each one alive
        # holds a reference to its buffer's storage, and the per-step check counts them.
        size = self.param.element_size()
        self._param_ptrs = [self.param.data_ptr() + o * size for o in self.offsets]
        self._grad_ptrs = [self.grad.data_ptr() + o * size for o in self.offsets]
        self._ends = sorted({0, len(params) - 1})
        self._note_storages()
        self._references: tuple[int, ...] | None = None  # learned in a verified step
        self._version_seen: int | None = None  # grad._version when the last step began
        self._steady_writes: list[int] = []  # grad writes per cycle seen in verified steps

    def _view(self, flat: torch.Tensor, i: int, name: str | None = None) -> torch.Tensor:
        """Param ``i``'s slot of ``flat``, the buffer of state ``name`` (None: param, grad)."""
        if name in self.block_states:
            first = self.offsets[i] // QUANT_BLOCK
            return flat[first : first + -(-self.shapes[i].numel() // QUANT_BLOCK)]
        return flat.as_strided(self.shapes[i], self.strides[i], self.offsets[i])

    def _views(self, flat: torch.Tensor, name: str | None = None) -> list[torch.Tensor]:
        return [self._view(flat, i, name) for i in range(len(self.params))]

    def _new_state_buffer(self, name: str, dtype: torch.dtype) -> None:
        """A zero buffer for state ``name``, and its views."""
        numel = self.numel // QUANT_BLOCK if name in self.block_states else self.numel
        buffer = self.state[name] = torch.zeros(numel, dtype=dtype, device=self.device)
        self.state_views[name] = self._views(buffer, name)
        self._state_ptrs[name] = [view.data_ptr() for view in self.state_views[name]]
        self._note_storages()

    def _drop_state(self, name: str) -> None:
        del self.state[name], self.state_views[name], self._state_ptrs[name]
        self._note_storages()

    def _note_storages(self) -> None:
        """The storages whose reference counts ``steady`` compares: param, grad, states."""
        buffers = (self.param, self.grad, *self.state.values())
        self._storages = [t.untyped_storage()._cdata for t in buffers]

    def _in_place(self, i: int) -> bool:
        """Param ``i``'s data and grad are (still) its slots of the buffers."""
        p = self.params[i]
        g = p.grad
        return (
            g is not None
            and g.layout == torch.strided  # (a sparse grad has no data pointer: the check of
            and g.data_ptr() == self._grad_ptrs[i]  # a rebuild then refuses it clearly)
            and p.data_ptr() == self._param_ptrs[i]
        )

    def _state_in_place(self, i: int) -> bool:
        """Param ``i``'s state views still view their slots (a view's ``.data`` may have been
        replaced: the state buffers' reference counts tell the O(1) check)."""
        return all(self.state_views[n][i].data_ptr() == a[i] for n, a in self._state_ptrs.items())

    def fits(self, params: list[torch.Tensor]) -> bool:
        """Whether ``params`` are still this bucket's params, with its dtype, device, shapes
        and layouts (else the bucket must be rebuilt, e.g. after ``model.half()``,
        ``model.to()`` or ``p.data = p.data.contiguous(memory_format=torch.channels_last)``)."""
        return len(params) == len(self.params) and all(
            p is q
            and p.dtype == self.dtype
            and p.device == self.device
            and p.shape == shape
            and p.stride() == stride
            for p, q, shape, stride in zip(params, self.params, self.shapes, self.strides)
        )

    def grads_in_place(self) -> bool:
        """Whether every adopted param still has its grad view (for ``zero_grad``): O(1) when
        the storages' reference counts are those of the last verified step, else O(n)."""
        counts = self._reference_counts()
        if counts is None or counts != self._references:
            return self.all_in_place()
        return self.ends_in_place()

    def ends_in_place(self) -> bool:
        """O(1): the first and last params still have their views as data and grad."""
        return all(self._in_place(i) for i in self._ends)

    def all_in_place(self) -> bool:
        """O(n): every param still has its views as data, grad and state."""
        return all(self._in_place(i) and self._state_in_place(i) for i in range(len(self.params)))

    def _reference_counts(self) -> tuple[int, ...] | None:
        if storage_use_count is None:
            return None
        return tuple(storage_use_count(cdata) for cdata in self._storages)

    def steady(self) -> bool:
        """The per-step O(1) check, three signals that must all agree with the last verified
        steps (where a full check found every param in place):

        - the first and last params have their views as data and grad;
        - the param and grad storages are referenced by as many tensors: each param's data and
          each adopted grad is one such tensor (nothing else is kept here), so replacing a grad
          or a param's data (``submodule.zero_grad()``, ``p.grad = g``, ``p.data = w``,
          ``model.to(...)``) drops one, unless the old tensor is still held elsewhere;
        - the grad views took one of the numbers of in-place writes seen in a verified cycle
          (they share one version counter, advanced by autograd's accumulation, ``zero_grad``,
          DDP's copy, unscaling, clipping): a grad set to None or replaced before a backward
          makes autograd write into a fresh tensor instead, even when a list kept for logging
          still holds the old one. Up to 8 distinct counts are remembered, so loops that vary
          (accumulation, layer drop, occasional clipping) settle after a few verified steps.

        What none of them sees: a replacement whose missing reference and missing writes are
        both made up for in the same step (a new view held for good elsewhere, and more writes
        elsewhere). Without ``torch._C._storage_Use_Count`` every step checks every param.
        """
        counts = self._reference_counts()
        if counts is None or counts != self._references or self._version_seen is None:
            return False
        writes = self.grad._version - self._version_seen
        return writes in self._steady_writes and self.ends_in_place()

    def start_step(self, verified: bool) -> None:
        """Record the state of the buffers as this step begins; ``verified``: every param was
        just found in place, so the reference counts and the writes since the last step are
        steady ones."""
        version = self.grad._version
        if verified:
            self._references = self._reference_counts()
            if self._version_seen is not None:
                writes = version - self._version_seen
                if writes not in self._steady_writes:
                    self._steady_writes = [*self._steady_writes[-7:], writes]
        self._version_seen = version

    def leaving(self) -> list[torch.Tensor]:
        """The params about to move into this buffer (their data is not their slot)."""
        return [p for i, p in enumerate(self.params) if p.data_ptr() != self._param_ptrs[i]]

    @staticmethod
    def check_steps(params: list[torch.Tensor], state: dict) -> None:
        """Raise, before anything is written, if the params' step counts differ: a flat bucket
        has one (they differ only in state from a run without flat buffers in which some params
        had no grad at some step, or after one param's count was reset)."""
        steps = [state[p]["step"] for p in params if "step" in state.get(p, {})]
        steps = [s if isinstance(s, torch.Tensor) else torch.tensor(float(s)) for s in steps]
        if len(steps) > 1 and any(s is not steps[0] for s in steps):
            device = steps[0].device
            values = torch.stack([s.reshape(()).to(device, torch.float32) for s in steps])
            if not bool((values == values[0]).all()):  # one sync, at adoption only
                raise ValueError(
                    "flat_buffers=True: the params of one group have different step counts "
                    f"(from {int(values.min())} to {int(values.max())}), but a flat bucket has "
                    "one. This comes from state loaded from a run without flat buffers in which "
                    "some params had no grad at some step, or from one param's state deleted "
                    "or reset; use flat_buffers=False for such a run"
                )

    def adopt(self, state: dict, names: list[str], per_param: tuple[str, ...] = ()) -> int:
        """Move each param's data, grad and state (``state``: the optimizer's, already created
        for every param; ``names``: the states the kernels read, ``step`` apart: other
        entries stay as they are) into the buffers and make them views; states named in
        ``per_param`` (the stochastic-rounding seed) stay with each param, and the launch
        reads the first param's. Returns the number of params whose data or grad had to be
        moved (0 when everything was in place).

        Everything to move is read before anything is written: a param's new data may be
        another param's slot of this very buffer (``p.data, q.data = q.data, p.data``), which
        the first copy would otherwise overwrite before the second reads it."""
        moved = 0
        data, grads = {}, {}
        for i, p in enumerate(self.params):
            if p.data_ptr() != self._param_ptrs[i]:
                data[i] = _detached(p.detach(), self.param)
            g = p.grad
            if g is None or g.data_ptr() != self._grad_ptrs[i]:
                grads[i] = None if g is None else _detached(g, self.grad)
            moved += i in data or i in grads
        first = state[self.params[0]]
        names = [n for n in dict.fromkeys(("step", *names)) if torch.is_tensor(first.get(n))]
        scalars = {n: first[n] for n in names if n in per_param}
        buffered = [n for n in names if n != "step" and n not in scalars]
        # A state that changed dtype gets a new buffer, so all of it is incoming; the old
        # buffer is dropped only once every check has passed.
        retyped = [n for n in buffered if n in self.state and self.state[n].dtype != first[n].dtype]
        incoming: dict[str, dict[int, torch.Tensor]] = {}
        for name in buffered:
            dtype = first[name].dtype
            ptrs = None if name in retyped else self._state_ptrs.get(name)
            incoming[name] = {
                i: _detached(state[p][name], self.state[name]) if ptrs else state[p][name]
                for i, p in enumerate(self.params)
                if ptrs is None
                or state[p][name] is not self.state_views[name][i]
                or state[p][name].data_ptr() != ptrs[i]
            }
            mixed = [i for i, value in incoming[name].items() if value.dtype != dtype]
            if mixed:  # the optimizer makes a bucket's states alike before adopting them
                raise RuntimeError(
                    f"flat_buffers: state {name!r} is {dtype} for the first param of a bucket "
                    f"but {incoming[name][mixed[0]].dtype} for another; a buffer has one dtype"
                )
        self.scalars = scalars
        for name in retyped:
            self._drop_state(name)
        for i, value in data.items():
            view = self._view(self.param, i)
            view.copy_(value)
            self.params[i].data = view
        for i, value in grads.items():
            view = self._view(self.grad, i)
            if value is None:
                view.zero_()  # no grad: stepped with zeros (see the module docstring)
            else:
                view.copy_(value)
            self.params[i].grad = view
        self._references = None  # relearned at the next verified step
        if "step" in names:
            self._adopt_step(state)
        for name, values in incoming.items():
            if name not in self.state:
                self._new_state_buffer(name, state[self.params[0]][name].dtype)
            for i, value in values.items():
                view = self.state_views[name][i] = self._view(self.state[name], i, name)
                view.copy_(value)
                state[self.params[i]][name] = view
        for name in [n for n in self.state if n not in incoming]:
            self._drop_state(name)  # a state the params no longer have (int8 scales, a master)
        return moved

    def launch_state(self, names: list[str]) -> dict[str, list[torch.Tensor] | None]:
        """The one-tensor state lists the kernels read (None for a state this bucket lacks),
        the shared ``step`` and the first param's scalars (its seed)."""
        lists = {name: [self.state[name]] if name in self.state else None for name in names}
        lists.update({name: [value] for name, value in self.scalars.items() if name in names})
        lists["step"] = [self.step] if self.step is not None else None
        return lists

    def _adopt_step(self, state: dict) -> None:
        first = state[self.params[0]]["step"]
        if self.step is None:
            self.step = torch.zeros((), dtype=torch.float32, device=self.device)
        if first is not self.step:
            self.step.copy_(first.reshape(()))
        for p in self.params:
            state[p]["step"] = self.step


def _detached(t: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """``t`` as a source to copy into ``buffer``: a copy of it if it lies in ``buffer``'s own
    storage (another slot, about to be overwritten), else ``t`` itself."""
    if t.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr():
        return t.clone()
    return t
