"""What verified checkpoints cost: ``Engine.save_checkpoint`` / ``load_checkpoint`` of a model of
``--params`` parameters in fp16 (fp32 masters and AdamW moments: 14 bytes per parameter on
disk), against the same file written and read without the manifest's hashing.

    python bench/checkpoint.py [--params 1e8] [--dir DIR] [--repeats 3]

Prints medians (seconds, and GB/s of checkpoint file) and the hash rate of this machine. The
hash is computed while the file is written (no read-back at save), and in one streamed read
before a load.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import fp16_triton
from fp16_triton import checkpoint_files


def build_engine(n_params: float) -> fp16_triton.Engine:
    width = 4096
    layers = max(1, round(n_params / (width * width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "fp16": {"enabled": True, "initial_scale_power": 8},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
    }
    engine, *_ = fp16_triton.initialize(model=model, config=config, backend="torch")
    loss = engine(torch.randn(1, width, dtype=engine.dtype)).float().square().mean()
    engine.backward(loss)
    engine.step()  # the optimizer's state exists
    return engine


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def plain_save(engine, path: Path) -> None:
    """The same states file, written and fsynced without hashing (what a save cost before)."""
    state = {"module": engine.module.state_dict(), "optimizer": engine.optimizer.state_dict()}
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=1e8)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: tmp)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    engine = build_engine(args.params)
    n = sum(p.numel() for p in engine.module.parameters())
    root = Path(args.dir or tempfile.mkdtemp(prefix="fp16_triton_ckpt_"))
    root.mkdir(parents=True, exist_ok=True)

    save = timed(lambda: engine.save_checkpoint(root, tag="bench"), args.repeats)
    path = root / "bench" / "fp16_triton_states.pt"
    size = path.stat().st_size
    load = timed(lambda: engine.load_checkpoint(root, tag="bench"), args.repeats)
    verify = timed(lambda: checkpoint_files.verify(root / "bench"), args.repeats)
    plain = root / "plain.pt"
    save_plain = timed(lambda: plain_save(engine, plain), args.repeats)
    load_plain = timed(
        lambda: torch.load(plain, map_location="cpu", weights_only=True), args.repeats
    )

    data = os.urandom(256 << 20)
    start = time.perf_counter()
    hashlib.new(checkpoint_files.HASH, data).hexdigest()
    rate = len(data) / (time.perf_counter() - start)

    gb = size / 1e9
    print(f"model: {n / 1e6:.0f}M params fp16, states file {gb:.2f} GB, {root}")
    print(f"{checkpoint_files.HASH}: {rate / 1e9:.2f} GB/s on this machine")
    print("| | verified (manifest) | plain torch.save/load | ratio |")
    print("| --- | --- | --- | --- |")
    for name, ours, plain_s in (("save", save, save_plain), ("load", load, load_plain)):
        speed = f"{ours:.2f} s ({gb / ours:.2f} GB/s)"
        print(f"| {name} | {speed} | {plain_s:.2f} s | {ours / plain_s:.2f} |")
    print(f"| of which verify | {verify:.2f} s ({gb / verify:.2f} GB/s) | | |")


if __name__ == "__main__":
    main()
