"""Muon's Newton–Schulz iterations batched per matrix shape
(``kernels.muon.batched_newton_schulz_`` on one ``[k, A, B]`` batch, what a GPU runs) against
one matrix at a time in torch.optim.Muon's 2-D ops (``matrix_newton_schulz_``, what the CPU
runs), on ``--count`` bf16 matrices of each ``--shapes`` entry.

    python -m bench.newton_schulz [--shapes 256x256,1024x256] [--count 16] [--device cuda]

Prints medians (ms per step of all the matrices) and the ratio. Batching saves launches (five
iterations: three matmuls, plus the norm and division, per batch instead of per matrix), which
matters on a GPU with many small matrices; on a CPU only the per-call overhead is saved.
"""

from __future__ import annotations

import argparse

import torch

from fp16_triton.kernels import muon

from .timing import CpuTimer, gpu_timer, interleaved, sync

COEFFICIENTS = (3.4445, -4.775, 2.0315)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="64x64,256x256,1024x256")
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    timer = gpu_timer if device.type == "cuda" else CpuTimer()
    print(f"{args.count} bf16 matrices per shape, {device}, median ms per step of them all")
    print("| shape | batched | one at a time | one at a time / batched |")
    print("| --- | --- | --- | --- |")
    for text in args.shapes.split(","):
        rows, cols = map(int, text.split("x"))
        batch = torch.randn(args.count, rows, cols, device=device).bfloat16()
        singles = [m.clone() for m in batch]

        def batched(batch=batch):
            muon.batched_newton_schulz_(batch, COEFFICIENTS, 5, 1e-7)

        def one_at_a_time(singles=singles):
            for m in singles:
                muon.matrix_newton_schulz_(m, COEFFICIENTS, 5, 1e-7)

        times = interleaved({"batched": batched, "single": one_at_a_time}, timer, args.rounds)
        sync(device)
        ratio = times["single"] / times["batched"]
        print(
            f"| {text} | {times['batched'] * 1e3:.2f} | {times['single'] * 1e3:.2f} | {ratio:.2f} |"
        )


if __name__ == "__main__":
    main()
