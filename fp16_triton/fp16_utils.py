"""``apex.fp16_utils`` (NVIDIA/apex: apex/fp16_utils/fp16util.py) on this package's kernels.

Apex's names, signatures and semantics, so that an Apex-era manual mixed-precision loop runs
unchanged after ``s/apex.fp16_utils/fp16_triton.fp16_utils/``::

    model = network_to_half(model)                       # or FP16Model(model)
    model_params, master_params = prep_param_lists(model)
    optimizer = torch.optim.SGD(master_params, lr=0.1)   # steps the fp32 masters
    (loss * scale).backward()
    model_grads_to_master_grads(model_params, master_params)
    for p in master_params:
        p.grad.mul_(1.0 / scale)
    optimizer.step()
    master_params_to_model_params(model_params, master_params)

The two copies of that loop are where the work is: ``model_grads_to_master_grads`` (fp16/bf16
grads upcast exactly into fp32) and ``master_params_to_model_params`` (fp32 masters rounded to
nearest-even into the params) run the multi-tensor cast-copy kernel (``kernels/cast_copy.py``,
one launch per dtype pair instead of one copy per tensor) on GPU tensors, and
``torch.Tensor.copy_`` elsewhere (``fp16_triton.backend``'s rule; ``FP16_TRITON_BACKEND``
overrides). Both give exactly Apex's values: the same roundings as ``copy_``.

Where this module differs from Apex:

* ``BN_convert_float`` / ``convert_network`` keep the layers Apex keeps in fp32 and no others:
  ``_BatchNorm`` subclasses (BatchNorm1d/2d/3d, SyncBatchNorm) with ``affine=True``.
  LayerNorm, GroupNorm and InstanceNorm are converted, as in Apex.
* ``prep_param_lists(flat_master=True)`` accepts params of mixed dtypes (Apex's flattening
  failed on them) and zero-fills the flat master's grad (Apex left it uninitialised);
  ``model_grads_to_master_grads(flat_master=True)`` makes that grad again if an optimizer's
  ``zero_grad()`` set it to None (torch's default since 2.0; Apex failed on it). A model grad
  that is None fails there, as in Apex, but with a ``ValueError`` naming the param.
* ``LossScaler`` is this package's static scaler; ``has_overflow`` returns False, as Apex's.
* ``DynamicLossScaler`` takes Apex's arguments and defaults (``init_scale=2**32``,
  ``scale_factor=2``, ``scale_window=1000``; no hysteresis, minimum scale 1, no error there)
  over this package's scaler, whose update rule is DeepSpeed's: a growth comes one iteration
  later than Apex's (after ``scale_window`` clean iterations *following* the last overflow
  or the start, where Apex counts the overflow's iteration as the first), and the scale is
  fp32 (a growth beyond fp32's range keeps the scale).
* ``FP16_Optimizer`` takes Apex's constructor arguments over ``fp16_triton.FP16Optimizer``:
  steps with inf/nan grads are skipped with a static scale too (Apex checked only with a
  dynamic one); around a torch optimizer the fp32 masters replace the fp16 params in its param
  groups, as in Apex (an ``fp16_triton`` optimizer keeps them in its state); there is no
  ``clip_master_grads`` (``FP16Optimizer``'s ``clip_grad`` clips inside the step),
  ``update_master_grads`` nor ``inspect_master_grad_data``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import loss_scaler as _loss_scaler
from .backend import kernels, resolve_backend
from .fp16_optimizer import FP16Optimizer
from .functional import clip_grad_norm_
from .kernels.multi_tensor import SUPPORTED_DTYPES

__all__ = [
    "BN_convert_float",
    "network_to_half",
    "convert_module",
    "convert_network",
    "FP16Model",
    "tofp16",
    "prep_param_lists",
    "model_grads_to_master_grads",
    "master_params_to_model_params",
    "to_python_float",
    "clip_grad_norm",
    "FP16_Optimizer",
    "LossScaler",
    "DynamicLossScaler",
]

clip_grad_norm = clip_grad_norm_
"""Apex's alias of ``torch.nn.utils.clip_grad_norm_``: here the fused one."""


class tofp16(nn.Module):  # Apex's name
    """A module whose forward returns ``input.half()``: the first layer of ``network_to_half``."""

    def forward(self, input):  # Apex's argument name
        return input.half()


def _keeps_fp32(module: nn.Module) -> bool:
    # Apex's rule: batch norm with learnable affine params stays fp32 (its running statistics
    # and the affine params are what fp16 would damage); other normalisations are converted.
    return isinstance(module, _BatchNorm) and module.affine is True


def BN_convert_float(module: nn.Module) -> nn.Module:  # Apex's name
    """Convert back to fp32, in place, every affine batch-norm layer of ``module``; returns it."""
    if _keeps_fp32(module):
        module.float()
    for child in module.children():
        BN_convert_float(child)
    return module


def network_to_half(network: nn.Module) -> nn.Sequential:
    """``Sequential(tofp16(), network)`` with ``network`` in fp16 except its affine batch norms."""
    return nn.Sequential(tofp16(), BN_convert_float(network.half()))


def convert_module(module: nn.Module, dtype: torch.dtype) -> None:
    """Convert ``module``'s own floating-point params, their grads and its buffers to ``dtype``,
    in place (the tensors keep their identity: optimizers and hooks holding them still do)."""
    for param in module.parameters(recurse=False):
        if param.is_floating_point():
            param.data = param.data.to(dtype=dtype)
            if param.grad is not None and param.grad.is_floating_point():
                param.grad = param.grad.to(dtype=dtype)
    for buf in module.buffers(recurse=False):
        if buf.is_floating_point():
            buf.data = buf.data.to(dtype=dtype)


def convert_network(network: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Convert every module of ``network`` to ``dtype`` except affine batch norms; returns it.
    RNNs re-flatten their weights (cuDNN needs them in one buffer of the new dtype)."""
    for module in network.modules():
        if _keeps_fp32(module):
            continue
        convert_module(module, dtype)
        if isinstance(module, nn.RNNBase):
            module.flatten_parameters()
    return network


class FP16Model(nn.Module):
    """``network`` converted by ``convert_network(network, torch.half)``; inputs are cast to
    fp16 on the way in (every positional input must be a tensor, as in Apex)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = convert_network(network, dtype=torch.half)

    def forward(self, *inputs):
        return self.network(*(t.half() for t in inputs))


def _cast_copy(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    """``dsts[k].copy_(srcs[k])``: one fused launch per dtype pair on the Triton backend for
    the pairs the kernel reads as flat ranges of one layout; ``copy_`` for the rest (the
    logical-order copies of a flat master and a channels_last param, e.g.)."""
    if not dsts:
        return
    if resolve_backend("auto", dsts[0].device) != "triton":
        kernels("reference").cast_copy_(dsts, srcs)
        return
    is_dense = kernels("multi_tensor").is_dense
    device = dsts[0].device
    fused_dsts, fused_srcs = [], []
    for d, s in zip(dsts, srcs):
        if (
            d.device == device == s.device
            and d.dtype in SUPPORTED_DTYPES
            and s.dtype in SUPPORTED_DTYPES
            and d.shape == s.shape
            and (d.stride() == s.stride() or d.numel() <= 1)
            and is_dense(d)
            and is_dense(s)
        ):
            fused_dsts.append(d)
            fused_srcs.append(s)
        else:
            d.copy_(s)
    kernels("cast_copy").cast_copy_(fused_dsts, fused_srcs)


def _flat_views(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Contiguous views of ``flat`` shaped as ``like``, in order (``_unflatten_dense_tensors``)."""
    return [v.view(t.shape) for v, t in zip(flat.split([t.numel() for t in like]), like)]


def prep_param_lists(model: nn.Module, flat_master: bool = False):
    """``(model_params, master_params)``: the params of ``model`` that require grad, and fp32
    copies of them, detached and requiring grad. With ``flat_master`` the masters are one
    ``nn.Parameter`` holding every param in order (a list of one), its grad zero-filled."""
    model_params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        if flat_master:
            if not model_params:
                raise ValueError("prep_param_lists(flat_master=True): no param requires grad")
            total = sum(p.numel() for p in model_params)
            flat = torch.empty(total, dtype=torch.float32, device=model_params[0].device)
            _cast_copy(_flat_views(flat, model_params), [p.detach() for p in model_params])
            master = nn.Parameter(flat, requires_grad=True)
            master.grad = torch.zeros_like(master)
            return model_params, [master]
        masters = [torch.empty_like(p, dtype=torch.float32) for p in model_params]
        _cast_copy(masters, [p.detach() for p in model_params])
    for m in masters:
        m.requires_grad_(True)
    return model_params, masters


def model_grads_to_master_grads(model_params, master_params, flat_master: bool = False) -> None:
    """Copy the model's grads into the masters' grads (fp32, exact). A model param without a
    grad leaves its master without one (``master.grad = None``), as in Apex."""
    with torch.no_grad():
        if flat_master:
            master = master_params[0]
            for i, p in enumerate(model_params):
                if p.grad is None:
                    raise ValueError(
                        f"model_params[{i}] (shape {tuple(p.shape)}) has no grad: "
                        "flat_master=True copies every grad into one buffer"
                    )
            if master.grad is None:
                master.grad = torch.empty_like(master)
            _cast_copy(_flat_views(master.grad, model_params), [p.grad for p in model_params])
            return
        dsts, srcs = [], []
        for model, master in zip(model_params, master_params):
            if model.grad is None:
                master.grad = None
                continue
            if master.grad is None:
                master.grad = torch.empty_like(master)
            dsts.append(master.grad)
            srcs.append(model.grad)
        _cast_copy(dsts, srcs)


def master_params_to_model_params(model_params, master_params, flat_master: bool = False) -> None:
    """Copy the fp32 masters into the model's params, rounding to nearest-even."""
    with torch.no_grad():
        if flat_master:
            srcs = _flat_views(master_params[0].detach(), model_params)
        else:
            srcs = [m.detach() for m in master_params]
        _cast_copy([p.data for p in model_params], srcs)


def to_python_float(t) -> float:
    """``t.item()``, or ``t[0]`` for objects without ``item``."""
    if hasattr(t, "item"):
        return t.item()
    return t[0]


class LossScaler(_loss_scaler.LossScaler):
    """This package's static loss scaler (``scale=1``) with Apex's ``has_overflow``."""

    def has_overflow(self, params) -> bool:
        """Always False: a static scale never looks at the grads (Apex's semantics)."""
        return False


class DynamicLossScaler(_loss_scaler.DynamicLossScaler):
    """Dynamic loss scaling with Apex's arguments and defaults; DeepSpeed's update rule (see
    the module docstring for the one-iteration difference in when the scale grows)."""

    def __init__(self, init_scale: float = 2.0**32, scale_factor: float = 2.0, scale_window=1000):
        super().__init__(
            init_scale=init_scale,
            scale_window=scale_window,
            min_scale=1.0,
            hysteresis=1,
            raise_error_at_min_scale=False,
            scale_factor=scale_factor,
        )

    def has_overflow(self, params) -> bool:
        """Whether any grad of ``params`` holds an inf or nan: one read pass, one host sync."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return False
        from .functional import nonfinite_check_and_norm

        return bool(nonfinite_check_and_norm(grads, compute_norm=False)[1].item() != 0)


class FP16_Optimizer(FP16Optimizer):  # Apex's name
    """``FP16Optimizer`` built from Apex's constructor arguments: a static scale
    (``static_loss_scale``) or, with ``dynamic_loss_scale``, an Apex-style
    ``DynamicLossScaler(**dynamic_loss_args)``. ``verbose`` is accepted and ignored (skipped
    steps are logged through ``logging``). See the module docstring for the differences."""

    def __init__(
        self,
        init_optimizer,
        static_loss_scale: float = 1.0,
        dynamic_loss_scale: bool = False,
        dynamic_loss_args: dict | None = None,
        verbose: bool = True,
    ):
        if dynamic_loss_scale:
            scaler = DynamicLossScaler(**(dynamic_loss_args or {}))
        else:
            scaler = LossScaler(static_loss_scale)
        super().__init__(init_optimizer, loss_scaler=scaler)

    def backward(self, loss, update_master_grads: bool = True, retain_graph: bool = False):
        """Backpropagate ``loss * loss_scale``; ``update_master_grads`` is accepted for Apex's
        signature (the step reads the grads itself)."""
        super().backward(loss, retain_graph=retain_graph)
