"""``Lamb``: LAMB (You et al. 2019) with DeepSpeed FusedLamb's arguments and defaults, fp32
master weights for fp16/bf16 params and two fused Triton launches per param bucket.

The algorithm in one place: the class, its pure-torch reference step (the CPU fallback), its
functional form and its spec. The Triton kernels are ``kernels/lamb.py``; the user guide is
``docs/lamb.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .backend import backend_for, kernels
from .buckets import Bucket
from .kernels.multi_tensor import TableCache
from .masters import MASTER_STATES
from .optimizer import FusedOptimizer, check_lr
from .spec import Algorithm, elementwise_traffic, register, scratch_inputs

__all__ = ["Lamb"]

_STATE = {
    "step": "always (one element; a skipped step does not advance it)",
    "exp_avg": "always",
    "exp_avg_sq": "always",
    "master_param": "fp16/bf16 params with master_weights=True",
    "master_remainder": 'bf16 params with master_weights="remainder" (int16)',
}
"""Per-param state, all fp32 on the param's device, and when each exists."""


def _on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return t if t is None or t.device == device else t.to(device, non_blocking=True)


class Lamb(FusedOptimizer):
    """LAMB as DeepSpeed's FusedLamb computes it: Adam's moments, ``update = m / (sqrt(v) +
    eps) + weight_decay * p``, scaled per param by the trust coefficient ``||p|| / ||update||``
    clamped to ``[min_coeff, max_coeff]`` (see ``kernels/lamb.py`` and ``docs/lamb.md``).

    Args:
        params, lr, betas, eps: as in ``fp16_triton.Adam`` (defaults 1e-3, (0.9, 0.999), 1e-8).
        bias_correction: multiply the step by ``sqrt(1 - beta2**t) / (1 - beta1**t)``
            (default True).
        eps_inside_sqrt: ``sqrt(v + eps)`` instead of ``sqrt(v) + eps`` (default False).
        weight_decay: added to the update, before the trust ratio (default 0).
        max_grad_norm: when > 0, each param group's grads are clipped by that group's own
            global norm (of the unscaled grads) to this value before the moments: DeepSpeed's
            meaning, with the norm computed here on the device. Not together with
            FP16Optimizer's or the engine's clipping (default 0).
        max_coeff, min_coeff: the clamp of the trust coefficient (defaults 10 and 0.01).
        master_weights, backend: as in ``fp16_triton.Adam``.
        flat_buffers: must be False: a flat bucket is launched as one tensor, and LAMB needs
            each param's own norms.

    State per param, fp32 on the param's device: ``step``, ``exp_avg``, ``exp_avg_sq`` and
    ``master_param`` for fp16/bf16 params. ``get_lamb_coeffs()`` returns the last step's trust
    coefficients.
    """

    _state_names = tuple(name for name in _STATE if name not in MASTER_STATES)
    _required_state = ("step", "exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        eps_inside_sqrt: bool = False,
        weight_decay: float = 0.0,
        max_grad_norm: float = 0.0,
        max_coeff: float = 10.0,
        min_coeff: float = 0.01,
        *,
        master_weights: bool | str = True,
        backend: str = "auto",
        flat_buffers: bool = False,
    ):
        if flat_buffers:
            raise ValueError(
                "Lamb cannot use flat_buffers=True: a flat bucket is launched as one tensor, "
                "so the per-param norms of LAMB's trust ratio cannot be taken; use "
                "flat_buffers=False (the default)"
            )
        defaults = dict(
            lr=lr,
            bias_correction=bool(bias_correction),
            betas=tuple(betas),
            eps=eps,
            eps_inside_sqrt=bool(eps_inside_sqrt),
            weight_decay=weight_decay,
            max_grad_norm=max_grad_norm,
            max_coeff=max_coeff,
            min_coeff=min_coeff,
        )
        options = dict(master_weights=master_weights, backend=backend, flat_buffers=False)
        super().__init__(params, defaults, **options)
        self._coeffs: dict[int, tuple[Bucket, torch.Tensor]] = {}  # per bucket, reused
        self._stepped: list[tuple[list[torch.Tensor], torch.Tensor]] = []
        self._norm_caches: dict[tuple, TableCache] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._coeffs, self._stepped, self._norm_caches = {}, [], {}

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        for index, beta in enumerate(group["betas"]):  # [0, 1), as torch's Adam and the config
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {index}: {beta}")
        for name in ("eps", "weight_decay", "max_grad_norm", "min_coeff"):
            if not 0.0 <= group[name]:
                raise ValueError(f"Invalid {name} value: {group[name]}")
        if not group["min_coeff"] <= group["max_coeff"]:
            raise ValueError(
                f"Invalid max_coeff value: {group['max_coeff']} (below min_coeff "
                f"{group['min_coeff']}; DeepSpeed would use min_coeff for every param)"
            )

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        # The param's strides (channels_last too): the kernels pair elements by memory position.
        return {
            "step": torch.zeros((), dtype=torch.float32, device=p.device),
            "exp_avg": torch.zeros_like(p, dtype=torch.float32),
            "exp_avg_sq": torch.zeros_like(p, dtype=torch.float32),
        }

    def _fused_step(
        self, *, grad_scale=None, found_inf=None, norm_sq=None, max_norm=0.0, work=None
    ) -> None:
        """``FusedOptimizer._fused_step`` with LAMB's own clipping: each group with
        ``max_grad_norm > 0`` gets the squared norm of its grads from one fused read pass (its
        buckets' sums added on the device), in place of a caller's ``norm_sq``."""
        clipping = [g for g in self.param_groups if g["max_grad_norm"] > 0]
        if clipping and norm_sq is not None and max_norm > 0:
            raise ValueError(
                "Lamb's max_grad_norm and FP16Optimizer's (or the engine's) gradient "
                "clipping were both asked for; use one of them: set max_grad_norm=0 or "
                "clip_grad=0 (gradient_clipping: 0 in the config)"
            )
        work = work if work is not None else self._gather()
        group_norms = self._group_norms(work, grad_scale) if clipping else {}
        launches, coeffs, stepped = [], {}, []
        for group, bucket, grads in work:
            device = bucket.local_params[0].device
            scaling = dict(grad_scale=_on(grad_scale, device), found_inf=_on(found_inf, device))
            if id(group) in group_norms:
                scaling.update(norm_sq=group_norms[id(group)][device])
                scaling.update(max_norm=float(group["max_grad_norm"]))
            else:
                scaling.update(norm_sq=_on(norm_sq, device), max_norm=max_norm)
            kept = self._coeffs.get(id(bucket))
            if kept is None or kept[0] is not bucket:
                # NaN until a step that is not skipped writes them.
                kept = (bucket, torch.full((len(grads),), math.nan, device=device))
            coeffs[id(bucket)] = kept
            stepped.append((bucket.params, kept[1]))
            launches.append(self._prepare_bucket(bucket, grads, group, coeffs=kept[1], **scaling))
        self._coeffs, self._stepped = coeffs, stepped
        for launch in launches:
            launch()
        self._note_stepped(work)

    def _group_norms(self, work, grad_scale) -> dict[int, dict[torch.device, torch.Tensor]]:
        """``{id(group): {device: squared norm of the group's unscaled grads}}`` for the groups
        with ``max_grad_norm > 0``: one read pass per (device, dtype) bucket through the
        non-finite check's kernel, per-device results summed on each device, no host sync."""
        lists: dict[int, dict[tuple, dict[int, list[torch.Tensor]]]] = {}
        for i, (group, bucket, grads) in enumerate(work):
            if group["max_grad_norm"] > 0:
                key = (grads[0].device, bucket.backend)
                lists.setdefault(id(group), {}).setdefault(key, {})[i] = grads
        caches, result = {}, {}
        for group_id, by_device in lists.items():
            sums = []
            for (device, backend), grads in by_device.items():
                scale = _on(grad_scale, device)
                if backend == "triton":
                    cache = self._norm_caches.get((group_id, device)) or TableCache()
                    caches[(group_id, device)] = cache
                    out = cache.scratch.get("lamb_norm")
                    if out is None:
                        out = cache.scratch["lamb_norm"] = torch.empty(2, device=device)
                    total = kernels("nonfinite").check_and_norm_grouped(
                        grads, grad_scale=scale, out=out, cache=cache
                    )
                else:
                    flat = [g for lst in grads.values() for g in lst]
                    total = kernels("reference").nonfinite_check_and_norm(flat, grad_scale=scale)
                sums.append(total[:1])
            devices = {device for device, _ in by_device}
            result[group_id] = {
                d: sums[0] if len(sums) == 1 else sum(_on(s, d) for s in sums) for d in devices
            }
        self._norm_caches = caches
        return result

    def _prepare_bucket(
        self, bucket: Bucket, grads, group, coeffs=None, **scaling
    ) -> Callable[[], None]:
        if bucket.sharded:
            raise ValueError(
                "Lamb cannot step DTensor (FSDP2) params: a rank holds a shard of each param, "
                "and LAMB's trust ratio needs the norms of whole params"
            )
        beta1, beta2 = map(float, group["betas"])
        return ALGORITHM.launch(
            bucket.backend,
            bucket.local_params,
            grads,
            bucket.state["exp_avg"],
            bucket.state["exp_avg_sq"],
            bucket.state["step"],
            masters=bucket.masters,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            bias_correction=group["bias_correction"],
            eps_inside_sqrt=group["eps_inside_sqrt"],
            max_coeff=float(group["max_coeff"]),
            min_coeff=float(group["min_coeff"]),
            cache=bucket.cache,
            coeffs=coeffs,
            **scaling,
        )

    def get_lamb_coeffs(self) -> torch.Tensor:
        """The last step's trust coefficients, one per param that stepped, in param-group
        order, as one fp32 tensor on the first param's device (DeepSpeed returns a list of
        floats; ``.tolist()`` gives it). Reading it on the host syncs. A skipped step leaves
        the coefficients of the step before it; NaN where no step has computed one yet."""
        if not self._stepped:
            return torch.empty(0)
        position = {}
        for k, (params, _) in enumerate(self._stepped):
            for i, p in enumerate(params):
                position[id(p)] = (k, i)
        offsets = [0]
        for _, coeffs in self._stepped:
            offsets.append(offsets[-1] + coeffs.numel())
        order = [
            offsets[k] + i
            for group in self.param_groups
            for p in group["params"]
            if (found := position.get(id(p))) is not None
            for k, i in [found]
        ]
        device = self._stepped[0][1].device
        every = torch.cat([_on(coeffs, device) for _, coeffs in self._stepped])
        return every.index_select(0, torch.tensor(order, device=device))


# ------------------------------------------------------------------------------- reference
def lamb_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    *,
    masters: Sequence[torch.Tensor] | None = None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool = True,
    eps_inside_sqrt: bool = False,
    max_coeff: float = 10.0,
    min_coeff: float = 0.01,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    norm_sq: torch.Tensor | None = None,
    max_norm: float = 0.0,
    cache=None,
    coeffs: torch.Tensor | None = None,
) -> None:
    """Reference of ``kernels.lamb.lamb_step`` (same arguments and semantics), in torch's
    foreach ops in the kernels' order: the CPU fallback and the tests' second oracle. The
    norms are ``torch._foreach_norm``'s (another summation order than the kernel's)."""
    reference = kernels("reference")
    start = reference.step_inputs(
        params, grads, masters, grad_scale, found_inf, norm_sq, max_norm, False
    )
    if start is None:
        return
    weights, g = start
    exp_avgs, exp_avg_sqs, steps = list(exp_avgs), list(exp_avg_sqs), list(steps)
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, torch._foreach_mul(g, 1.0 - beta1))
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_add_(exp_avg_sqs, torch._foreach_mul(torch._foreach_mul(g, 1.0 - beta2), g))
    if eps_inside_sqrt:
        denom = torch._foreach_sqrt(torch._foreach_add(exp_avg_sqs, eps))
    else:
        denom = torch._foreach_add(torch._foreach_sqrt(exp_avg_sqs), eps)
    update = torch._foreach_div(exp_avgs, denom)
    torch._foreach_add_(update, torch._foreach_mul(weights, float(weight_decay)))
    w_norm = torch.stack(torch._foreach_norm(weights))
    u_norm = torch.stack(torch._foreach_norm(update))
    ratio = (w_norm / u_norm).clamp(max=max_coeff).clamp(min=min_coeff)
    coeff = torch.where((w_norm != 0) & (u_norm != 0), ratio, torch.ones_like(ratio))
    torch._foreach_add_(steps, 1.0)
    lr = float(lr)  # a tensor lr is read on the host: the reference may sync
    scales = []
    for step, c in zip(steps, coeff.tolist()):
        step_size = lr
        if bias_correction:
            t = step.item()
            step_size = lr * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
        # fp32 as in the kernel: step_size rounded, then the product rounded.
        scales.append(float(torch.tensor(step_size, dtype=torch.float32) * c))
    torch._foreach_sub_(weights, torch._foreach_mul(update, scales))
    reference.write_back(params, weights, masters)
    if coeffs is not None:
        coeffs.copy_(coeff)


# ------------------------------------------------------------------------------ functional
def lamb_(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, backend="auto", **kwargs):
    """One LAMB step over tensor lists, in place (``fp16_triton.functional.lamb_``).

    ``exp_avgs``, ``exp_avg_sqs`` are the fp32 moments, ``state_steps`` the fp32 one-element
    counts before this step; the keywords are ``kernels.lamb.prepare_lamb_step``'s
    (``masters``, ``lr``, ``beta1``, ``beta2``, ``eps``, ``weight_decay``, ``bias_correction``,
    ``eps_inside_sqrt``, ``max_coeff``, ``min_coeff``, ``grad_scale``, ``found_inf``,
    ``coeffs``, ...)."""
    if len(params) == 0:
        return
    ALGORITHM.launch(
        backend_for(backend, params), params, grads, exp_avgs, exp_avg_sqs, state_steps, **kwargs
    )()


# ------------------------------------------------------------------------------------ spec
def _traffic(param_dtype, grad_dtype=None, master=True, **_):
    """LAMB, two passes: the first reads the grad, the weight (param and master) and both
    moments and writes the moments; the second reads the weight and the moments again and
    writes the weight. fp16 params and grads with masters: read (2 + 2 + 4 x 3) + (2 + 4 x 3)
    = 30, write 4 x 2 + (4 + 2) = 14: 44 B/param (AdamW: 30). fp32 params: 28 + 12 = 40."""
    one_pass = elementwise_traffic(param_dtype, grad_dtype, master, 2)
    grad = torch.empty((), dtype=grad_dtype or param_dtype).element_size()
    return type(one_pass)(
        read=one_pass.read + one_pass.read - grad, written=one_pass.written, kept=one_pass.kept
    )


def _example(sizes, device, param_dtype=torch.float16):
    """Scratch inputs of ``prepare_lamb_step`` (``spec.scratch_inputs``), chosen so that every
    partial sum of the norms is exact in fp32: params ``k / 64`` (``|k| <= 4``), grads ``±2**j``,
    betas (0.5, 0.75) and no decay make every update ``±1`` at the first step. Any launch
    geometry then gives the same norms, and the geometry check can ask for the default
    geometry's bits."""
    params, grads, (m, v), steps, masters = scratch_inputs(sizes, device, param_dtype, 2)
    device = torch.device(device)
    for p, g in zip(params, grads):
        p.copy_(torch.randint(-4, 5, p.shape, device=device) / 64.0)
        sign = torch.randint(0, 2, g.shape, device=device) * 2 - 1
        g.copy_(sign * torch.exp2(torch.randint(-3, 2, g.shape, device=device).float()))
    masters = [p.float() for p in params] if masters is not None else None
    kwargs = dict(masters=masters, lr=1e-6, beta1=0.5, beta2=0.75, eps=2.0**-60)
    kwargs.update(weight_decay=0.0, bias_correction=True)
    return (params, grads, m, v, steps), kwargs


ALGORITHM = register(
    Algorithm(
        name="lamb",
        classes=(Lamb,),
        kernel="lamb",
        state=_STATE,
        traffic=_traffic,
        example=_example,
        reference=lamb_step,
        functional={"lamb_": lamb_},
    )
)
