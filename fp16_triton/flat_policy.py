"""The policy of a group's flat buckets, for ``FusedOptimizer`` (``plans.py``): which params a
group adopts, when a step may stay steady, what adoption refuses or warns about, and
``zero_grad`` for adopted params. The buffers themselves and their contract are in
``flat_buffers.py``; this file changes when the optimizer's use of them does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from . import flat_buffers
from .flat_buffers import FlatBuffers

logger = logging.getLogger("fp16_triton.optimizer")  # the optimizers' one logger


def adopted_params(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The params a group's flat buckets take: those that require grad now."""
    return [p for p in params if p.requires_grad]


def check_left_out(others: list[torch.Tensor]) -> None:
    """Raise if a param left out at adoption (it did not require grad) now requires grad."""
    if any(p.requires_grad for p in others):
        raise ValueError(
            "flat_buffers=True: a param that did not require grad when the optimizer adopted "
            "its group's params now does; the params of a flat buffer share one step count, "
            "so a param cannot join it mid-run. Leave the params you will unfreeze out of "
            "this optimizer's groups and add them as a group of their own when you unfreeze "
            "them (optimizer.add_param_group), or use flat_buffers=False"
        )


def steady_step(flats: list[FlatBuffers]) -> bool:
    """Begin a step on ``flats`` if every param is still in place, and say so (else the group
    is re-adopted): O(1) per buffer, O(n) only for buffers whose O(1) check disagreed."""
    unsteady = [not flat.steady() for flat in flats]
    if all(flat.all_in_place() for flat, u in zip(flats, unsteady) if u):
        for flat, u in zip(flats, unsteady):
            flat.start_step(verified=u)
        return True
    return False


def check_adoption(adopted, group, param_groups, state, describe) -> None:
    """Raise, before anything is written, unless ``adopted`` (``group``'s params that require
    grad) can share flat buckets: in no other group, and with one step count."""
    elsewhere = {id(q) for g in param_groups if g is not group for q in g["params"]}
    if any(id(p) in elsewhere for p in adopted):
        raise ValueError(
            "flat_buffers=True: a param of this group is in another param group too; a "
            "param lives in one flat buffer, so it can be in one group only (torch.optim "
            "would step it once per group)"
        )
    FlatBuffers.check_steps(adopted, state)
    counted = ["step" in (state.get(p) or {}) for p in adopted]
    if any(counted) and not all(counted):
        newcomer = adopted[counted.index(False)]
        raise ValueError(
            f"flat_buffers=True: {describe(newcomer)} has no step count while other "
            "params of its group have taken steps (it was added to the group's params "
            "list, its state was deleted, or a loaded state dict had none for it); the "
            "params of a flat buffer share one step count. Add new params as a group of "
            "their own (optimizer.add_param_group), or use flat_buffers=False"
        )


def regroup(
    adopted: list[torch.Tensor], old_buckets: list, key_of
) -> list[tuple[object, object, list]]:
    """The adopted params by device, dtype and ``key_of(p)`` (the optimizer's bucket key: one
    flat bucket each), as ``(old bucket, key, params)``: the old bucket (anything with a
    ``flat``) where its buffers still fit the params, else None."""
    by_key: dict[tuple, list[torch.Tensor]] = {}
    for p in adopted:
        by_key.setdefault((p.device, p.dtype, key_of(p)), []).append(p)
    old = {(b.flat.device, b.flat.dtype, b.flat.key): b for b in old_buckets}
    out = []
    for (device, dtype, key), params in by_key.items():
        bucket = old.get((device, dtype, key))
        fits = bucket is not None and bucket.flat.fits(params)
        out.append((bucket if fits else None, key, params))
    return out


def foreign_views(flats: list[FlatBuffers], old: list[FlatBuffers] = ()) -> int:
    """How many tensors other than the params themselves reference the storages that params
    are about to leave for ``flats`` (views kept by a module, weights tied through ``.t()``, a
    retained autograd graph, another owner of the storage): they will not see the params'
    updates. Known owners are not counted: the leaving params of every new bucket, and the
    buffers ``old`` of the buckets being replaced (a param may leave one of them while others
    are still in it). 0 when unknown (no ``torch._C._storage_Use_Count``)."""
    use_count = flat_buffers.storage_use_count  # (read here: tests replace it)
    if use_count is None:
        return 0
    leaving: dict[int, list] = {}
    for p in (p for flat in flats for p in flat.leaving()):
        storage = p.untyped_storage()  # kept below: it holds one reference itself
        leaving.setdefault(storage._cdata, [storage, 0])[1] += 1
    for flat in old:
        owner = leaving.get(flat.param.untyped_storage()._cdata)
        if owner is not None:
            owner[1] += 1
    return sum(use_count(cdata) - 1 - owners for cdata, (_, owners) in leaving.items())


def warn_foreign_views(flats: list[FlatBuffers], old: list[FlatBuffers] = ()) -> None:
    """Warn when tensors other than the params reference the storage params leave."""
    foreign = foreign_views(flats, old)
    if foreign:
        logger.warning(
            "flat_buffers: %d tensors besides the params themselves reference the params' "
            "storage (views kept by a module, weights tied through a view such as .t(), a "
            "retained autograd graph, or another owner such as "
            "ZeroRedundancyOptimizer(parameters_as_bucket_view=True)); the params now move "
            "into the optimizer's flat buffer and those tensors will not see their updates. "
            "Tie weights by sharing the Parameter object, or use flat_buffers=False",
            foreign,
        )


def log_readopted(moved: int, warned_before: bool) -> None:
    """Say that ``moved`` params were re-adopted: a warning the first time, then debug."""
    log = logger.debug if warned_before else logger.warning
    log(
        "flat_buffers: re-adopted %d params whose grad or data had been replaced since "
        "the last step, an O(n) pass (by model.zero_grad() or another zero_grad that "
        "sets grads to None, such as ZeroRedundancyOptimizer's; by "
        "DDP(gradient_as_bucket_view=True); by backward(create_graph=True)). If it "
        "happens at every step, use optimizer.zero_grad() and keep the grads in place, "
        "or flat_buffers=False",
        moved,
    )


def zero_flat_grads(flats, params, others, set_to_none: bool) -> None:
    """``zero_grad`` of a group with flat buckets: each grad buffer zeroed in place (one fill),
    and grads that were replaced from outside zeroed in place too (the next step re-adopts);
    the params left out (``others``) keep torch's semantics."""
    for flat in flats:
        flat.grad.zero_()
    if not all(flat.grads_in_place() for flat in flats):
        zero_grads(adopted_params(params), set_to_none=False)
    zero_grads(others, set_to_none)


def zero_grads(params: Iterable[torch.Tensor], set_to_none: bool) -> None:
    """``torch.optim.Optimizer.zero_grad``'s treatment of ``params``' grads."""
    for p in params:
        if p.grad is None:
            continue
        if set_to_none:
            p.grad = None
        else:
            if p.grad.grad_fn is not None:
                p.grad.detach_()
            else:
                p.grad.requires_grad_(False)
            p.grad.zero_()
