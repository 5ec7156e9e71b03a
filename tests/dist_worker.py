"""Worker of tests/test_distributed.py, run on 2 CPU processes (gloo) under torchrun.

``python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py OUT PHASE``: PHASE
"train" runs every scenario and writes results to OUT; PHASE "resume" loads the sharded
checkpoint written by "train" in fresh processes and continues. The single-process references
live here too (``single_*``), so both sides share one definition of model, data and config.
"""

from __future__ import annotations

import copy
import json
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import fp16_triton  # noqa: E402

STEPS, MORE_STEPS, INF_STEP, INF_RANK = 5, 3, 2, 1
SGD = {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9}}
BF16 = torch.bfloat16
COMPACT = dict(lr=1e-2, master_weights=False, state_dtype=BF16, stochastic_rounding=True, seed=0)
COMPACT["backend"] = "triton"


def make_model(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).to(dtype)


def global_batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)


def local_batch(step: int, rank: int, world: int):
    x, y = global_batch(step)
    return x.chunk(world)[rank], y.chunk(world)[rank]


def fp16_config(clip=0.5):
    return {
        "fp16": {
            "enabled": True,
            "initial_scale_power": 8,
            "loss_scale_window": 3,
            "hysteresis": 1,
        },
        "gradient_clipping": clip,
        "optimizer": SGD,
    }


def train_steps(engine, steps, batch_fn, inject=None):
    """Run ``steps`` engine steps; return per-step records (norm, scale, skipped)."""
    records = []
    for step in steps:
        x, y = batch_fn(step)
        loss = F.mse_loss(engine(x.to(engine.dtype)).float(), y)
        engine.backward(loss)
        if inject is not None:
            inject(step, engine)
        engine.step()
        records.append(
            {
                "norm": engine.optimizer.global_grad_norm,
                "scale": engine.loss_scale,
                "skipped": engine.skipped_steps,
                "loss": loss.item(),
            }
        )
    return records


def full_params(model):
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in model.named_parameters()
    }


def single_fp16(steps=STEPS + MORE_STEPS):
    """The single-process reference of the FSDP2 fp16 run: the whole batch, one process, the
    same inf at the same step."""
    model = make_model(torch.float16)
    engine, *_ = fp16_triton.initialize(model=model, config=fp16_config(), backend="triton")

    def inject(step, engine):
        if step == INF_STEP:
            next(engine.module.parameters()).grad.view(-1)[0] = float("inf")

    records = train_steps(engine, range(steps), global_batch, inject=inject)
    return full_params(model), records


def single_fp32_sgd(steps=STEPS):
    model = make_model()
    config = {"optimizer": SGD, "gradient_clipping": 0.5}
    engine, *_ = fp16_triton.initialize(model=model, config=config, backend="triton")
    train_steps(engine, range(steps), global_batch)
    return full_params(model)


def fsdp_model(dtype, mp_policy=None, model=None):
    from torch.distributed.fsdp import fully_shard

    model = make_model(dtype) if model is None else model
    kwargs = {"mp_policy": mp_policy} if mp_policy is not None else {}
    for layer in (model[0], model[2]):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def count_all_reduces(ddp) -> dict:
    """Count DDP's gradient all-reduces through a communication hook."""
    counter = {"count": 0}

    def hook(state, bucket):
        counter["count"] += 1
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        return allreduce_hook(None, bucket)

    ddp.register_comm_hook(None, hook)
    return counter


def single_fp32_sgd_accumulated(steps=STEPS):
    """One process, the same optimizer steps over global batches, two per step."""
    model = make_model()
    config = {"optimizer": SGD, "gradient_clipping": 0.5, "gradient_accumulation_steps": 2}
    engine, *_ = fp16_triton.initialize(model=model, config=config, backend="triton")
    train_steps(engine, range(2 * steps), global_batch)
    return full_params(model)


def inject_inf(step, engine):
    if step == INF_STEP and dist.get_rank() == INF_RANK:
        grad = next(engine.module.parameters()).grad
        grad._local_tensor.view(-1)[0] = float("inf")  # this rank's shard only


def train_bf16_wrapped(model, wrapper: str, batch, options: dict, steps=range(STEPS), opt=None):
    """``steps`` of a bf16 model under DDP, ZeRO-1 (``ZeroRedundancyOptimizer`` over our
    AdamW) or FSDP2 (``model`` already sharded) with AdamW(``options``) (or ``opt``, made by
    an earlier call with ``wrapper`` "fsdp"); returns our AdamW."""
    forward = nn.parallel.DistributedDataParallel(model) if wrapper != "fsdp" else model
    if opt is not None:
        inner = opt
    elif wrapper == "zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        opt = ZeroRedundancyOptimizer(
            model.parameters(), optimizer_class=fp16_triton.AdamW, **options
        )
        inner = opt.optim
    else:
        opt = inner = fp16_triton.AdamW(model.parameters(), **options)
    for step in steps:
        x, y = batch(step)
        F.mse_loss(forward(x.to(BF16)).float(), y).backward()
        opt.step()
        opt.zero_grad()
    return inner


def int8_model(wrapper: str) -> nn.Module:
    """A bf16 model whose first weight (512 x 16) gets int8 moments: whole under DDP, and under
    FSDP2 in 2 shards of 4,096 elements that start at a multiple of 256 (so each rank's blocks
    are blocks of the whole tensor); the other params keep fp32 moments."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 512), nn.Tanh(), nn.Linear(512, 4)).to(BF16)
    return fsdp_model(BF16, model=model) if wrapper == "fsdp" else model


def phase_train(out: str, rank: int, world: int):
    results = {}
    batch = lambda step: local_batch(step, rank, world)  # noqa: E731

    # DDP through the engine (fp32, SGD with momentum, clipping).
    model = make_model()
    config = {"optimizer": SGD, "gradient_clipping": 0.5}
    engine, *_ = fp16_triton.initialize(
        model=model, config=config, backend="triton", data_parallel="ddp"
    )
    train_steps(engine, range(STEPS), batch)
    torch.save(full_params(model), f"{out}/ddp_rank{rank}.pt")

    # DDP with gradient accumulation: grads stay local until the boundary (no_sync).
    model = make_model()
    config = {"optimizer": SGD, "gradient_clipping": 0.5, "gradient_accumulation_steps": 2}
    engine, *_ = fp16_triton.initialize(
        model=model, config=config, backend="triton", data_parallel="ddp"
    )
    reductions = count_all_reduces(engine._forward_module)
    train_steps(engine, range(2 * STEPS), batch)
    torch.save(full_params(model), f"{out}/ddp_accum_rank{rank}.pt")
    results["ddp_accum_reductions"] = reductions["count"]

    # The same with flat_buffers=True: DDP copies the reduced grads into our grad views, and
    # no_sync micro-batches accumulate into them.
    model = make_model()
    flat_sgd = {"type": "SGD", "params": {**SGD["params"], "flat_buffers": True}}
    config = {"optimizer": flat_sgd, "gradient_clipping": 0.5, "gradient_accumulation_steps": 2}
    engine, *_ = fp16_triton.initialize(
        model=model, config=config, backend="triton", data_parallel="ddp"
    )
    train_steps(engine, range(2 * STEPS), batch)
    assert engine.optimizer.optimizer.flat_buffers
    torch.save(full_params(model), f"{out}/ddp_flat_rank{rank}.pt")

    # FSDP2 with fp16 sharded params and our fp32 masters; an inf on one rank's shard.
    model = fsdp_model(torch.float16)
    engine, *_ = fp16_triton.initialize(model=model, config=fp16_config(), backend="triton")
    results["fsdp_fp16"] = train_steps(engine, range(STEPS), batch, inject=inject_inf)
    torch.save(full_params(model), f"{out}/fsdp_fp16_rank{rank}.pt")
    engine.save_checkpoint(f"{out}/ckpt", client_state={"note": "sharded"})
    results["fsdp_fp16_more"] = train_steps(engine, range(STEPS, STEPS + MORE_STEPS), batch)
    torch.save(full_params(model), f"{out}/fsdp_continued_rank{rank}.pt")

    # FSDP2's MixedPrecisionPolicy: fp32 sharded params, fp16 compute, our dynamic scaler.
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
    model = fsdp_model(torch.float32, policy)
    optimizer = fp16_triton.FP16Optimizer(
        fp16_triton.AdamW(model.parameters(), lr=1e-2, backend="triton"),
        loss_scaler=fp16_triton.DynamicLossScaler(init_scale=2.0**8),
    )
    losses = []
    for step in range(STEPS):
        x, y = batch(step)
        loss = F.mse_loss(model(x).float(), y)
        optimizer.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    results["fsdp_mp_losses"] = losses
    torch.save(full_params(model), f"{out}/fsdp_mp_rank{rank}.pt")

    # ZeRO-1 through torch's ZeroRedundancyOptimizer with our AdamW as the inner optimizer,
    # against plain DDP with our AdamW: the same kernel on the same values.
    from torch.distributed.optim import ZeroRedundancyOptimizer

    for name in ("zero", "plain"):
        model = make_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        if name == "zero":
            opt = ZeroRedundancyOptimizer(
                model.parameters(), optimizer_class=fp16_triton.AdamW, lr=1e-2, backend="triton"
            )
        else:
            opt = fp16_triton.AdamW(model.parameters(), lr=1e-2, backend="triton")
        for step in range(STEPS):
            x, y = batch(step)
            F.mse_loss(ddp(x), y).backward()
            opt.step()
            opt.zero_grad()
        torch.save(full_params(model), f"{out}/{name}_rank{rank}.pt")

    # Compact state (bf16 params, no masters, bf16 moments, stochastic rounding) under DDP,
    # ZeRO-1 and FSDP2: every rank must round the same way where it holds the same values.
    for wrapper in ("ddp", "zero", "fsdp"):
        model = fsdp_model(BF16) if wrapper == "fsdp" else make_model(BF16)
        inner = train_bf16_wrapped(model, wrapper, batch, COMPACT)
        kept = {
            key: str(value.dtype)
            for state in inner.state.values()
            for key, value in state.items()
            if isinstance(value, torch.Tensor)
        }
        results[f"{wrapper}_compact_state_dtypes"] = kept
        torch.save(full_params(model), f"{out}/{wrapper}_compact_rank{rank}.pt")

    # Remainder masters (issue 14) under DDP, ZeRO-1 and FSDP2: bitwise the run with fp32
    # masters, params and (this rank's part of) the state dict's fp32 masters.
    for wrapper in ("ddp", "zero", "fsdp"):
        for mode in (True, "remainder"):
            torch.manual_seed(0)
            model = fsdp_model(BF16) if wrapper == "fsdp" else make_model(BF16)
            options = dict(lr=1e-2, weight_decay=0.1, master_weights=mode)
            inner = train_bf16_wrapped(model, wrapper, batch, options)
            name = f"{wrapper}_{'remainder' if mode == 'remainder' else 'masters'}"
            masters = {
                f"master{index}": getattr(s["master_param"], "_local_tensor", s["master_param"])
                for index, s in inner.state_dict()["state"].items()
            }
            kept = sorted({key for s in inner.state.values() for key in s})
            results[f"{name}_state_names"] = kept
            torch.save({**full_params(model), **masters}, f"{out}/{name}_rank{rank}.pt")

    # int8 moments (with remainder masters) under DDP and ZeRO-1, on a model with a weight of
    # 5,120 elements (int8 from 4,096): the ranks must hold the same params.
    for wrapper in ("ddp", "zero"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 320), nn.Tanh(), nn.Linear(320, 4)).to(BF16)
        options = dict(lr=1e-2, master_weights="remainder", state_dtype="int8", backend="triton")
        inner = train_bf16_wrapped(model, wrapper, batch, options)
        results[f"{wrapper}_int8_state_dtypes"] = sorted(
            {str(t.dtype) for s in inner.state.values() for t in s.values()}
        )
        torch.save(full_params(model), f"{out}/{wrapper}_int8_rank{rank}.pt")

    # int8 moments under FSDP2, blocks inside each rank's shard: bitwise the DDP run (the same
    # blocks, see int8_model), and a resume through torch.distributed.checkpoint's state dicts
    # (int8 moments exported dequantized, quantized back on load) bitwise the straight run.
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    int8 = dict(lr=1e-2, master_weights="remainder", state_dtype="int8", backend="triton")
    for wrapper in ("ddp", "fsdp"):
        model = int8_model(wrapper)
        inner = train_bf16_wrapped(model, wrapper, batch, int8)
        torch.save(full_params(model), f"{out}/{wrapper}_int8_blocks_rank{rank}.pt")
    results["fsdp_int8_state"] = {
        key: [type(value).__name__, str(value.dtype)]
        for key, value in inner.state[model[0].weight].items()
    }
    results["fsdp_int8_saved_state"] = {
        key: [type(value).__name__, str(value.dtype)]
        for key, value in inner.state_dict()["state"][0].items()
    }
    half = STEPS // 2
    model = int8_model("fsdp")
    inner = train_bf16_wrapped(model, "fsdp", batch, int8, steps=range(half))
    saved = (get_model_state_dict(model), get_optimizer_state_dict(model, inner))
    saved = copy.deepcopy(saved)
    resumed = int8_model("fsdp")
    opt = fp16_triton.AdamW(resumed.parameters(), **int8)
    set_model_state_dict(resumed, saved[0])
    set_optimizer_state_dict(resumed, opt, saved[1])
    train_bf16_wrapped(resumed, "fsdp", batch, int8, steps=range(half, STEPS), opt=opt)
    torch.save(full_params(resumed), f"{out}/fsdp_int8_resumed_rank{rank}.pt")

    # Stochastic rounding per shard: a DTensor whose two shards (one per rank) hold the same
    # values and get the same grads at every step. Rounded with the same words on both shards
    # (the control: every shard counted as shard 0) the halves stay identical; with each
    # shard's own words they do not.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from fp16_triton import compact_state

    mesh = init_device_mesh("cpu", (world,))
    half = torch.randn(16, 8, generator=torch.Generator().manual_seed(5))
    for name in ("fsdp_sr_shards", "fsdp_sr_control"):
        full = torch.cat([half] * world).to(BF16)
        param = nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))
        patched = (fp16_triton.adam, fp16_triton.sgd, fp16_triton.lion)
        if name == "fsdp_sr_control":
            for module in patched:
                module.bucket_shard = lambda bucket: 0
        try:
            opt = fp16_triton.AdamW([param], **COMPACT)
            for step in range(STEPS):
                g = torch.randn(16, 8, generator=torch.Generator().manual_seed(50 + step))
                param.grad = distribute_tensor(torch.cat([g] * world).to(BF16), mesh, [Shard(0)])
                opt.step()
        finally:
            for module in patched:
                module.bucket_shard = compact_state.bucket_shard
        torch.save({"weight": param.full_tensor()}, f"{out}/{name}_rank{rank}.pt")

    with open(f"{out}/records_rank{rank}.json", "w") as f:
        json.dump(results, f)


def phase_resume(out: str, rank: int, world: int):
    model = fsdp_model(torch.float16)
    engine, *_ = fp16_triton.initialize(model=model, config=fp16_config(), backend="triton")
    _, client = engine.load_checkpoint(f"{out}/ckpt")
    assert client == {"note": "sharded"}, client
    records = train_steps(
        engine, range(STEPS, STEPS + MORE_STEPS), lambda s: local_batch(s, rank, world)
    )
    torch.save(full_params(model), f"{out}/fsdp_resumed_rank{rank}.pt")
    with open(f"{out}/resume_records_rank{rank}.json", "w") as f:
        json.dump({"global_steps": engine.global_steps, "records": records}, f)


def main():
    out, phase = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    {"train": phase_train, "resume": phase_resume}[phase](out, rank, world)
    # Both ranks done before either tears down gloo: a rank that exits while its peer still
    # has collectives in flight can abort the peer.
    dist.barrier()
    dist.destroy_process_group()
    # Every result is written and closed: leave without the interpreter's and torch's C++
    # teardown, where both ranks were seen to abort now and then ('terminate called without
    # an active exception': a runtime thread destroyed unjoined), after all work was done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
