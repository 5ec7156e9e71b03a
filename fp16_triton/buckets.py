"""Buckets: the params of one group that one kernel launch updates together, and the per-step
check that what a bucket was built from still holds.

A bucket is built (by ``FusedOptimizer``) after every param, grad and state tensor in it was
validated: supported dtype, dense memory, state of the param's shape and strides. A step reuses
it only while nothing it was built from has changed. Container writes (``optimizer.state``,
``param_groups``) are counted by ``tracked.py``; what tensors themselves do is compared here,
at every step, in passes over the bucket's tensors that the launches need anyway:

- every param's address and size: ``p.data = ...`` (``model.half()``, ``model.to()``,
  ``torch.cat``, a new layout) puts the param elsewhere or resizes it;
- every grad's strides: a grad laid out unlike its param (assigned by hand; autograd makes grads
  with their param's strides) must be read through a copy in the param's layout.

Any difference makes the optimizer rebuild the group's buckets, validating everything again
before anything is written. Not seen, in either storage mode: a param's ``.data`` replaced by
another view of the same memory with the same size (``p.data = p.data.view(...)`` or
``.t()``): the step stays right element by element (each element keeps its own state), but
``optimizer.state`` keeps the old shape.

With ``flat_buffers=True`` a bucket owns flat storage instead (``flat_buffers.py``), with its
own O(1) check.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch

from .flat_buffers import FlatBuffers
from .kernels.multi_tensor import TensorList

__all__ = ["Bucket", "like_param", "local"]


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return None
    return DTensor


DTensor = _dtensor_type()


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's local shard of a DTensor (sharing its storage), or ``t`` itself."""
    if DTensor is not None and isinstance(t, DTensor):
        return t._local_tensor
    return t


def shard_position(t: torch.Tensor) -> int:
    """This rank's position among the shards of a DTensor: its mesh coordinate over the mesh
    dimensions the tensor is sharded on (replicated ones hold the same values, so they count
    as one), as one number; 0 for a plain tensor."""
    if DTensor is None or not isinstance(t, DTensor):
        return 0
    coordinate = t.device_mesh.get_coordinate() or []
    position = 0
    for placement, index, size in zip(t.placements, coordinate, t.device_mesh.shape):
        if placement.is_shard():
            position = position * size + index
    return position


def like_param(state: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Wrap a local state tensor as a DTensor sharded like ``p`` (so distributed checkpoints
    see sharded state, as with torch's optimizers); plain params keep plain state."""
    if DTensor is None or not isinstance(p, DTensor) or state.dim() == 0:
        return state
    return DTensor.from_local(
        state, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
    )


_data_ptr = torch.Tensor.data_ptr
_numel = torch.Tensor.numel
_stride = torch.Tensor.stride
_is_contiguous = torch.Tensor.is_contiguous


@dataclass
class Bucket:
    """Params of one group that one launch updates together, with their state lists.

    ``params`` are the optimizer's params (keys of ``optimizer.state``); ``local_params`` and
    the ``state`` lists are what the kernels update: the same tensors, or for DTensor params
    (FSDP2) this rank's local shards. Build one with ``Bucket.per_tensor`` or, for flat
    buffers, directly with ``flat``.
    """

    params: list[torch.Tensor]
    local_params: TensorList
    state: dict[str, list[torch.Tensor] | None]
    backend: str
    grad_dtype: torch.dtype
    cache: Any = None  # kernels.multi_tensor.TableCache on the Triton backend
    indices: list[int] | None = None  # positions in the group's list of grads; None: all
    sharded: bool = False  # DTensor params: kernels see their local shards
    # This rank's shard among a sharded tensor's shards (0 unsharded), counting the random
    # words of stochastic rounding apart per shard; None when the params disagree.
    shard: int | None = 0
    flat: FlatBuffers | None = None  # flat_buffers=True: the bucket's storage
    # Per-tensor storage: what the bucket was built from, compared at every step.
    addresses: tuple[int, ...] = ()
    numels: tuple[int, ...] = ()
    # The grads' strides, or None when every param and grad is contiguous: then "every grad is
    # still contiguous" says the same, without making a tuple per grad at every step (10,000
    # tuples per step cost garbage-collection passes over every tensor the process holds).
    grad_strides: list[tuple[int, ...]] | None = None
    # Grads laid out unlike their param: position -> a buffer in the param's layout.
    relaid: dict[int, torch.Tensor] = field(default_factory=dict)
    kept_storages: list = field(default_factory=list)  # see FusedOptimizer._refresh_state_lists
    # Remainder masters: the ``masters.Fingerprints`` generation its params were noted at.
    noted: int | None = None

    @property
    def masters(self) -> list[torch.Tensor] | None:
        """The masters the kernels read: fp32 ``master_param`` tensors, int16
        ``master_remainder`` ones (bf16 params with ``master_weights="remainder"``:
        ``kernels/remainder.py``), or None."""
        return self.state.get("master_param") or self.state.get("master_remainder")

    @classmethod
    def per_tensor(cls, params, grads, backend, cache, indices) -> Bucket:
        """A bucket over ``params`` (validated) and their current (local) ``grads``."""
        local_params = TensorList(local(p) for p in params)
        sharded = any(lp is not p for lp, p in zip(local_params, params))
        grads = [local(g) for g in grads] if sharded else grads
        relaid = {
            i: torch.empty_like(p, dtype=g.dtype)
            for i, (p, g) in enumerate(zip(local_params, grads))
            if p.numel() > 1 and g.stride() != p.stride()
        }
        contiguous = all(map(_is_contiguous, local_params)) and all(map(_is_contiguous, grads))
        positions = {shard_position(p) for p in params} if sharded else {0}
        return cls(
            params, local_params, {}, backend, grads[0].dtype, cache, indices, sharded,
            shard=positions.pop() if len(positions) == 1 else None,
            addresses=tuple(map(_data_ptr, local_params)),
            numels=tuple(map(_numel, local_params)),
            grad_strides=None if contiguous else list(map(_stride, grads)),
            relaid=relaid,
        )  # fmt: skip

    def grads(self, active_grads: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
        """This step's grads as the kernels read them (out of the group's active grads), or
        None when the bucket no longer matches its params (rebuild it)."""
        if self.flat is not None:
            return self.flat.launch_grads
        grads = active_grads if self.indices is None else [active_grads[i] for i in self.indices]
        params = self.local_params
        if self.sharded:
            if not all(map(operator.is_, map(local, self.params), params)):
                return None  # FSDP2 re-sharded: new local tensors
            grads = [local(g) for g in grads]
        addresses = tuple(map(_data_ptr, params))
        if addresses != self.addresses or tuple(map(_numel, params)) != self.numels:
            return None
        if self.grad_strides is None:
            if not all(map(_is_contiguous, grads)):
                return None
        elif list(map(_stride, grads)) != self.grad_strides:
            return None
        params.addresses, params.numels = addresses, self.numels
        grads = TensorList(grads)
        for i, buffer in self.relaid.items():  # one copy per step (read and write the grad)
            grads[i] = buffer.copy_(grads[i])
        grads.addresses = tuple(map(_data_ptr, grads))
        grads.numels = self.numels
        return grads
