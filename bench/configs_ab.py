"""The launch configurations in effect (tuned or shipped) against the generic defaults, on the
README's recipe, in one process with the rounds interleaved: does tuning pay, at which sizes?

``python bench/configs_ab.py`` (GPU only) prints one line per size and moment dtype: the
median step time (ms, median of 3 rounds of ``triton.testing.do_bench`` medians) of
``FP16Optimizer(AdamW(backend="triton"), clip_grad=1.0)`` on fp16 params under the
configurations ``fp16-triton tune --show`` reports, and under ``DEFAULT_CONFIG`` for every
kernel. ``bench/gpu_check.sh`` runs it after tuning; the first H200 run's figures are in
``bench/results/2026-11-30-nvidia-h200.md``.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # bench/ as a package

import torch  # noqa: E402

from bench.case import split_sizes  # noqa: E402
from bench.ours import build_recipe  # noqa: E402
from fp16_triton.kernels import launch_config as lc  # noqa: E402

KERNELS = ("nonfinite_check", "adam")  # the recipe's tuned kernels (the step-count one is fixed)
SIZES = {"1e7 x3": split_sizes(10**7), "4.1e7 x1": [40_960_000], "1e8 x24": split_sizes(10**8)}
ROUNDS = 3


@contextlib.contextmanager
def forced(configs: dict[str, dict[str, int]]):
    with contextlib.ExitStack() as stack:
        for kernel, config in configs.items():
            stack.enter_context(lc.override(kernel, config))
        yield


def main() -> int:
    if not torch.cuda.is_available():
        print("configs_ab: needs a CUDA GPU (the configurations only matter there)")
        return 1
    import triton.testing

    device = torch.device("cuda")
    sets = {
        "in effect": {k: lc.launch_config(k, device) for k in KERNELS},
        "default": {k: dict(lc.DEFAULT_CONFIG) for k in KERNELS},
    }
    print(f"in effect: {lc.config_source(device)[1]}")
    for name, configs in sets.items():
        print(f"  {name}: {configs}")
    for label, sizes in SIZES.items():
        for state_dtype in (torch.float32, torch.bfloat16):
            optimizer = build_recipe(sizes, device, modes={"state_dtype": state_dtype})
            times = {name: [] for name in sets}
            for _ in range(ROUNDS):
                for name, configs in sets.items():
                    with forced(configs):
                        optimizer.step()  # tables for this geometry, outside the timing
                        torch.cuda.synchronize()
                        times[name].append(triton.testing.do_bench(optimizer.step, rep=60))
            row = "  ".join(f"{name} {sorted(t)[ROUNDS // 2]:.3f}" for name, t in times.items())
            print(f"{label}, {str(state_dtype)[6:]} moments: median ms  {row}", flush=True)
            del optimizer
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
