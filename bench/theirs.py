"""torch's and DeepSpeed's cases, with the traffic models of their pipelines.

The bytes-per-param figures here model other code than ours (ours are the spec's, in
``ours.py``), each derived beside it: bytes read plus bytes written per param by one step,
every tensor touched once per kernel.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

from .case import Case, Unavailable, make_params

# torch.optim.AdamW(fused=True) (or foreach, or compiled) on fp32 params: read p, g, m, v
# 4 x 4 = 16, write p, m, v 4 x 3 = 12.
BYTES_ADAMW_FP32 = 28
# torch's native AMP step on fp32 params: GradScaler.unscale_ reads and writes g (8),
# clip_grad_norm_ reads g for the norm (4) and reads and writes it to scale (8), then the
# fused AdamW on fp32 params (BYTES_ADAMW_FP32).
BYTES_TORCH_AMP = 8 + 4 + 8 + BYTES_ADAMW_FP32
# torch.optim.AdamW(fused=True) on fp16 params (fp16 moments, no master): read p, g, m, v
# 2 x 4 = 8, write p, m, v 2 x 3 = 6.
BYTES_ADAMW_FP16_NO_MASTER = 14
# torch.optim.SGD(momentum > 0, fused or foreach) on fp32 params: read p, g, buf 4 x 3 = 12,
# write p, buf 4 x 2 = 8.
BYTES_SGD_MOMENTUM_FP32 = 20
# torch.optim.Muon on fp32 params, per param, the elementwise ops only (its Newton–Schulz
# matmuls are compute, as in ours): buf.lerp_(g) reads buf, g and writes buf (12); Nesterov's
# g.lerp(buf) reads both and writes a new tensor (12); .bfloat16() reads it and writes 2 (6);
# param.mul_ reads and writes p (8); param.add_(update) reads p and the bf16 update and writes
# p (10).
BYTES_MUON_FP32 = 12 + 12 + 6 + 8 + 10
LR = 1e-4


def setup_torch_amp(sizes: Sequence[int], device: torch.device) -> Callable[[], object]:
    """torch's native AMP recipe on fp32 params: ``GradScaler.unscale_``,
    ``clip_grad_norm_(1.0)``, ``AdamW(fused=True)`` through ``scaler.step``, ``update``."""
    params = make_params(sizes, torch.float32, device)
    opt = torch.optim.AdamW(params, lr=LR, fused=True)
    # Scale 1 and no growth keep the fixed grads' values steady from one repetition to the
    # next (unscale_ works in place, and clipping brings the norm to 1 once, then leaves it);
    # the kernels do the same work whatever the scale's value.
    scaler = torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=2**30)
    # The scale tensor is created by the first scale(loss), part of forward/backward in a real
    # loop; one call here, outside the timed step.
    scaler.scale(torch.ones((), device=device))

    def step():
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()

    return step


def setup_torch_optimizer(
    cls: type | str, dtype: torch.dtype, shape=None, **options
) -> Callable[[Sequence[int], torch.device], Callable[[], object]]:
    """A set-up of ``cls(params, lr, **options)`` on params of ``dtype`` (torch's fused and
    foreach optimizers, timed as they are), shaped by ``shape`` (``make_params``). A name is
    looked up in ``torch.optim`` when the case runs (``Muon`` needs torch 2.9)."""

    def setup(sizes: Sequence[int], device: torch.device) -> Callable[[], object]:
        optimizer = getattr(torch.optim, cls, None) if isinstance(cls, str) else cls
        if optimizer is None:
            raise Unavailable(f"torch.optim.{cls} is not in torch {torch.__version__}")
        params = make_params(sizes, dtype, device, shape=shape)
        return optimizer(params, lr=LR, **options).step

    return setup


def setup_torch_compiled(sizes: Sequence[int], device: torch.device) -> Callable[[], object]:
    """A ``torch.compile``d AdamW step on fp32 params, as in PyTorch's compiled-optimizer
    recipe (``@torch.compile(fullgraph=False) def fn(): opt.step()``). Compiled here, by two
    calls, so compile time is not timed."""
    params = make_params(sizes, torch.float32, device)
    opt = torch.optim.AdamW(params, lr=LR)

    @torch.compile(fullgraph=False)
    def step():
        opt.step()

    step()
    step()
    return step


def _init_single_process_group(deepspeed) -> None:
    """DeepSpeed's FP16_Optimizer may all-reduce its overflow flag: give it a world of one."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517", "RANK": "0", "LOCAL_RANK": "0"}
    for name, value in {**env, "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(name, value)
    deepspeed.init_distributed(dist_backend="nccl", auto_mpi_discovery=False)


def setup_deepspeed(sizes: Sequence[int], device: torch.device) -> Callable[[], object]:
    """DeepSpeed's ``FP16_Optimizer`` (dynamic loss scale, clip 1.0) around its ``FusedAdam``
    (AdamW mode) on fp16 params. Its step flattens the fp16 grads into an fp32 buffer and sets
    ``p.grad = None``, so each call first re-attaches the same grad tensors (no allocation)."""
    try:
        import deepspeed
        from deepspeed.ops.adam import FusedAdam
        from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    except ImportError as error:
        raise Unavailable(f"DeepSpeed not installed ({error})") from error
    _init_single_process_group(deepspeed)
    params = make_params(sizes, torch.float16, device)
    grads = [p.grad for p in params]
    opt = FP16_Optimizer(
        FusedAdam(params, lr=LR, weight_decay=0.01, adam_w_mode=True),
        dynamic_loss_scale=True,
        clip_grad=1.0,
        verbose=False,
    )

    def step():
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()

    return step


# -------------------------------------------------------------------------------- cases
# Compared with the recipe ("ours", ours.py) on the large-model GPU rows.
VS_RECIPE = [
    Case(
        "amp",
        "torch AMP: fp32 params, unscale_ + clip_grad_norm_ + AdamW(fused)",
        "ours",
        BYTES_TORCH_AMP,
        16,
        setup_torch_amp,
    ),
    Case(
        "fused-fp16",
        "torch AdamW(fused) on fp16 params, no master, no clip",
        "ours",
        BYTES_ADAMW_FP16_NO_MASTER,
        8,
        setup_torch_optimizer(torch.optim.AdamW, torch.float16, fused=True),
    ),
    Case(
        "compiled",
        "torch.compile(AdamW.step), fp32 params, no clip",
        "ours",
        BYTES_ADAMW_FP32,
        16,
        setup_torch_compiled,
        fragile=True,
    ),
    Case(
        "deepspeed",
        "DeepSpeed FP16_Optimizer(clip 1.0) + FusedAdam, fp16 params",
        "ours",
        None,
        28,  # p 2 + flat copy 2 + g 2 + fp32 flat grad 4 + master 4 + m 4 + v 4 + slack
        setup_deepspeed,
        fragile=True,
    ),
]


def _torch_muon() -> Case:
    """torch.optim.Muon (one matrix at a time: its only implementation) on fp32 matrices shaped
    as ours are (the spec's ``param_shape``)."""
    from fp16_triton.spec import algorithms

    return Case(
        "torch-muon",
        "torch Muon (one matrix at a time), fp32 params",
        "ours-muon",
        BYTES_MUON_FP32,
        12,
        setup_torch_optimizer("Muon", torch.float32, shape=algorithms()["muon"].param_shape),
    )


# torch's counterparts of each algorithm's row of ours (ours.algorithm_case keys them
# ``ours-<class>``), by algorithm name: on a GPU the fused optimizers, on the CPU foreach.
GPU_COUNTERPARTS = {
    "muon": [_torch_muon()],
    "sgd": [
        Case(
            "torch-sgd",
            "torch SGD(momentum 0.9, fused), fp32 params",
            "ours-sgd",
            BYTES_SGD_MOMENTUM_FP32,
            12,
            setup_torch_optimizer(torch.optim.SGD, torch.float32, momentum=0.9, fused=True),
        )
    ],
}

CPU_COUNTERPARTS = {
    "muon": [_torch_muon()],
    "adam": [
        Case(
            "torch-adamw",
            "torch AdamW(foreach=True), fp32 params",
            "ours-adamw",
            BYTES_ADAMW_FP32,
            16,
            setup_torch_optimizer(torch.optim.AdamW, torch.float32, foreach=True),
        )
    ],
    "sgd": [
        Case(
            "torch-sgd",
            "torch SGD(momentum 0.9, foreach=True), fp32 params",
            "ours-sgd",
            BYTES_SGD_MOMENTUM_FP32,
            12,
            setup_torch_optimizer(torch.optim.SGD, torch.float32, momentum=0.9, foreach=True),
        )
    ],
}


def fused_adamw_fp32(key: str, shape: str, vs: str) -> Case:
    """torch's fused AdamW on fp32 params (the many-small-tensors comparison)."""
    return Case(
        key,
        f"torch AdamW(fused), fp32 params, {shape}",
        vs,
        BYTES_ADAMW_FP32,
        16,
        setup_torch_optimizer(torch.optim.AdamW, torch.float32, fused=True),
    )


# The report's lines on these models.
MODELS = [
    f"torch AMP {BYTES_TORCH_AMP}",
    f"AdamW fp32 {BYTES_ADAMW_FP32}",
    f"AdamW fp16 without master {BYTES_ADAMW_FP16_NO_MASTER}",
    f"SGD momentum fp32 {BYTES_SGD_MOMENTUM_FP32}",
]
