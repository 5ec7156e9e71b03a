"""Optimizer-owned flat buffers (``flat_buffers=True``): one tensor each for the params, grads
and every state of a bucket, with each param's data, grad and state as views into them.

Why: the step is one launch whatever the number of tensors, but with per-param tensors the host
must still read every ``p.grad`` and ``data_ptr()`` each step to know what to launch on (about
0.1 us per attribute read on the 2-core dev machine: 7-15 ms per step at 10,000 tensors). With
flat buffers the steady step touches a constant number of Python objects per bucket, and the
kernels see one contiguous range (no small-tensor tails).

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
  share one step count): give params you will unfreeze a param group of their own.
- Each step checks, in O(1), the first and the last param of each bucket (grad identity, data
  address) and how many in-place writes the grad views took since the last step
  (``FlatBuffers.steady``). Grads set to None or replaced before a backward (``model.zero_grad()``,
  ``submodule.zero_grad()``), ``model.to()``/``.half()`` and loaded state are noticed; the step
  then checks every param, and re-adopts those out of place (an O(n) pass, logged). Not noticed:
  a new tensor assigned to the ``.grad`` or ``.data`` of a param other than the first and last
  *after* the backward (or ``model.to(memory_format=...)`` that moves only such params): write
  into them in place instead (``p.grad.copy_(g)``, ``p.data.copy_(w)``).
- The params share storage: ``torch.save`` of one param (or one state tensor) writes its whole
  buffer; save state dicts whole. A param dropped from a rebuilt bucket keeps the old buffer
  alive through its views until it is re-adopted or freed.
- Another owner of the params' storage must not exist: ``ZeroRedundancyOptimizer(
  parameters_as_bucket_view=True)`` (or DDP's ``gradient_as_bucket_view=True``, which costs an
  O(n) re-adoption every step) do not mix with flat buffers.
"""

from __future__ import annotations

import torch

__all__ = ["ALIGN_ELEMENTS", "FlatBuffers", "check_grad"]

ALIGN_ELEMENTS = 64
"""Every view starts at a multiple of 64 elements: 128 bytes in an fp16 buffer and 256 in an
fp32 one, so each param, grad and state view is as aligned as a fresh allocation needs to be for
vectorized (128-bit) and cuBLAS access, and the kernels' ALIGNED variant applies to the whole
buffer. Padding is zero in every buffer, and a zero param with a zero grad and zero state stays
zero under Adam, AdamW and SGD, so it never changes the norm or the non-finite check."""


def check_grad(p: torch.Tensor) -> None:
    """Raise unless ``p.grad`` is None or a dense tensor of ``p``'s shape."""
    g = p.grad
    if g is not None and (g.is_sparse or g.shape != p.shape):
        if g.is_sparse:
            raise RuntimeError(
                f"flat_buffers=True does not support sparse gradients (a param of shape "
                f"{tuple(p.shape)} has one); use dense gradients (e.g. "
                "nn.Embedding(sparse=False)) or torch.optim.SparseAdam for that param"
            )
        raise RuntimeError(
            f"a grad of shape {tuple(g.shape)} for a param of shape {tuple(p.shape)}: grads "
            "must have their param's shape"
        )


def _padded(n: int) -> int:
    return -(-n // ALIGN_ELEMENTS) * ALIGN_ELEMENTS


class FlatBuffers:
    """The flat storage of one bucket: ``param`` and ``grad`` (the params' dtype), ``state``
    (fp32, one buffer per state name) and one shared ``step`` count.

    Args:
        params: the optimizer's params of the bucket: same device and dtype, not DTensors.
    """

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        self.dtype = params[0].dtype
        self.device = params[0].device
        self.shapes = [p.shape for p in params]
        self.offsets = []
        total = 0
        for p in params:
            self.offsets.append(total)
            total += _padded(p.numel())
        self.numel = total
        self.param = torch.zeros(total, dtype=self.dtype, device=self.device)
        self.grad = torch.zeros(total, dtype=self.dtype, device=self.device)
        self.param_views = self._views(self.param)
        self.grad_views = self._views(self.grad)
        self.state: dict[str, torch.Tensor] = {}
        self.state_views: dict[str, list[torch.Tensor]] = {}
        self.step: torch.Tensor | None = None
        # The O(1) check of every step looks at these two params (one when the bucket has one)
        # and at the grad buffer's version counter (see steady()).
        ends = sorted({0, len(params) - 1})
        self._sentinels = [(params[i], self.param_views[i], self.grad_views[i]) for i in ends]
        self._version_seen: int | None = None  # grad._version when the last step began
        self._steady_writes: int | None = None  # in-place grad writes per verified cycle

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [
            flat[o : o + shape.numel()].view(shape) for o, shape in zip(self.offsets, self.shapes)
        ]

    def fits(self, params: list[torch.Tensor]) -> bool:
        """Whether ``params`` are still this bucket's params, with its dtype, device and shapes
        (else the bucket must be rebuilt, e.g. after ``model.half()`` or ``model.to()``)."""
        return len(params) == len(self.params) and all(
            p is q and p.dtype == self.dtype and p.device == self.device and p.shape == s
            for p, q, s in zip(params, self.params, self.shapes)
        )

    def ends_in_place(self) -> bool:
        """O(1): the first and last params still hold their views as data and grad."""
        return all(p.grad is g and p.data_ptr() == v.data_ptr() for p, v, g in self._sentinels)

    def all_in_place(self) -> bool:
        """O(n): every param still holds its views as data and grad."""
        return all(
            p.grad is g and p.data_ptr() == v.data_ptr()
            for p, v, g in zip(self.params, self.param_views, self.grad_views)
        )

    def steady(self) -> bool:
        """The per-step O(1) check: the end params hold their views, and the grad views took
        as many in-place writes since the last step as in the last verified cycle.

        Why the count: the views share one version counter, which every in-place write into
        any of them advances (autograd's accumulation, ``zero_grad``, DDP's copy, unscaling,
        clipping). A grad set to None or replaced between two steps (``submodule.zero_grad()``)
        makes autograd write a fresh tensor instead, so the count drops, and the step verifies
        every param. A new tensor assigned to one middle param's ``.grad`` *after* its backward
        leaves the count unchanged and is not noticed (write into the grad in place instead).
        """
        if self._version_seen is None or self._steady_writes is None:
            return False
        writes = self.grad._version - self._version_seen
        return writes == self._steady_writes and self.ends_in_place()

    def start_step(self, verified: bool) -> None:
        """Record the grad buffer's version as this step begins; ``verified``: every param was
        just found in place, so the writes since the last step are the steady pattern."""
        version = self.grad._version
        if verified and self._version_seen is not None:
            self._steady_writes = version - self._version_seen
        self._version_seen = version

    def check_steps(self, state: dict) -> None:
        """Raise, before anything moves, if the params' step counts differ: a flat bucket has
        one (they differ only in state from a run without flat buffers in which some params
        had no grad at some step)."""
        steps = [state[p]["step"] for p in self.params if "step" in state[p]]
        if len(steps) > 1 and any(s is not steps[0] for s in steps):
            values = torch.stack([s.reshape(()).to(self.device) for s in steps])
            if not bool((values == values[0]).all()):  # one sync, at adoption only
                raise ValueError(
                    "flat_buffers=True: the params of one group have different step counts "
                    f"(from {int(values.min())} to {int(values.max())}), but a flat bucket has "
                    "one. This comes from state loaded from a run without flat buffers in which "
                    "some params had no grad at some step, or from one param's state deleted "
                    "or reset; use flat_buffers=False for such a run"
                )

    def adopt(self, state: dict) -> int:
        """Move each param's data, grad and state (``state``: the optimizer's, already created
        for every param) into the buffers and make them views. Returns the number of params
        whose data or grad had to be moved (0 when everything was in place)."""
        moved = 0
        for p, view, grad_view in zip(self.params, self.param_views, self.grad_views):
            changed = False
            if p.data_ptr() != view.data_ptr():
                view.copy_(p.detach())
                p.data = view
                changed = True
            g = p.grad
            if g is not grad_view:
                if g is None:
                    grad_view.zero_()  # no grad: stepped with zeros (see the module docstring)
                else:
                    grad_view.copy_(g)
                p.grad = grad_view
                changed = True
            moved += changed
        first = state[self.params[0]]
        for name in [n for n, t in first.items() if isinstance(t, torch.Tensor)]:
            if name == "step":
                self._adopt_step(state)
                continue
            if name not in self.state:
                self.state[name] = torch.zeros(self.numel, dtype=torch.float32, device=self.device)
                self.state_views[name] = self._views(self.state[name])
            for p, view in zip(self.params, self.state_views[name]):
                if state[p].get(name) is not view:
                    view.copy_(state[p][name])
                    state[p][name] = view
        return moved

    def _adopt_step(self, state: dict) -> None:
        first = state[self.params[0]]["step"]
        if self.step is None:
            self.step = torch.zeros((), dtype=torch.float32, device=self.device)
        if first is not self.step:
            self.step.copy_(first.reshape(()))
        for p in self.params:
            state[p]["step"] = self.step
