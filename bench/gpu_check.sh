#!/usr/bin/env bash
# The checks a session with a GPU runs, in one call (see docs/performance.md): the kernel,
# optimizer and FP16Optimizer tests on the GPU, tuning, and the quick benchmark. Logs and
# results go to $OUT (the device tool's output folder) or ./gpu_check_out.
# Budget: under 10 minutes on an H200 (timeouts 270 + 80 + 230 s); each step has its own
# timeout so one hang cannot eat the rest. Run it with a device timeout of 600 s.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FP16_TRITON_CACHE_DIR="$OUT/cache"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$OUT/gpu.txt"
# Offline install: the machine has torch, triton, numpy, tqdm, matplotlib, pytest, hypothesis.
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
timeout 270 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py \
    tests/test_algorithms.py tests/test_lion.py tests/test_lamb.py tests/test_muon.py \
    tests/test_compact_state.py tests/test_stochastic_rounding.py \
    tests/test_functional.py tests/test_fp16_utils.py \
    tests/test_optimizers.py tests/test_fp16_optimizer.py tests/test_loss_scaler.py \
    tests/test_flat_buffers.py tests/test_stale_caches.py tests/test_compile.py \
    2>&1 | tee "$OUT/pytest.log" | tail -25
timeout 80 python3 -m fp16_triton tune --quick 2>&1 | tee "$OUT/tune.log" | tail -8
python3 -m fp16_triton tune --show | tee -a "$OUT/tune.log"
timeout 230 python3 bench/run.py --quick --skip deepspeed --out "$OUT/bench" 2>&1 \
    | grep -v "it/s" | tee "$OUT/bench.log" | tail -60
