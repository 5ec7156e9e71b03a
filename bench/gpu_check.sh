#!/usr/bin/env bash
# The checks a session with a GPU runs, in one call (see docs/performance.md): the kernels of
# every algorithm against the reference (tests/test_gpu_parity.py), the test files that put
# their tensors on the GPU, tuning, and the quick benchmark. Everything comes back as
# $OUT/gpu_check.tgz plus $OUT/summary.txt ($OUT: the device tool's output folder, else
# ./gpu_check_out). Each step has its own timeout, so one hang cannot eat the rest; together
# they end within 510 s of an H200 (the first run, 2026-11-30, took 220-310 s). Run it with a
# device timeout of 540 s.
# (The other test files build CPU tensors and need the interpreter: they run in CI.)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
LOG="$OUT/logs"
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 FP16_TRITON_CACHE_DIR="$LOG/cache"
export FP16_TRITON_PARITY_LOG="$LOG/parity.jsonl"
SUMMARY="$OUT/summary.txt"
step() { echo "== $1 ($(date -u +%H:%M:%S))" | tee -a "$SUMMARY"; }
step gpu
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$SUMMARY"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$SUMMARY"
# Offline install: the machine has torch, triton, numpy, tqdm, matplotlib, pytest, hypothesis,
# pytest-xdist and pytest-timeout.
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
PYTEST="python3 -m pytest -q -p no:cacheprovider -o addopts= -rfE"
python3 -c "import xdist, pytest_timeout" 2>/dev/null && PYTEST="$PYTEST --timeout 100 -n 8"
step parity
timeout 110 $PYTEST tests/test_gpu_parity.py > "$LOG/parity.log" 2>&1
tail -15 "$LOG/parity.log" | tee -a "$SUMMARY"
step "gpu tests"
timeout 100 $PYTEST --maxfail 60 tests/test_kernels.py tests/test_optimizers.py \
    tests/test_fp16_optimizer.py tests/test_fp16_optimizer_lifecycle.py \
    tests/test_flat_buffers.py tests/test_compile.py tests/test_launch_geometries.py \
    tests/test_loss_scaler.py > "$LOG/pytest.log" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$LOG/pytest.log" | tail -45 | tee -a "$SUMMARY"
step tune
timeout 140 python3 -m fp16_triton tune --quick > "$LOG/tune.log" 2>&1
python3 -m fp16_triton tune --show 2>&1 | tee -a "$LOG/tune.log" | tail -12 >> "$SUMMARY"
step "configs: in effect vs defaults"
timeout 40 python3 bench/configs_ab.py 2>&1 | tee "$LOG/configs_ab.log" | tail -8 >> "$SUMMARY"
step "bench elementwise"
timeout 60 python3 bench/run.py --quick --sizes 1e8 --out "$LOG/bench_a" \
    --skip deepspeed,compiled,ours-muon,torch-muon,small 2>&1 | grep -v "it/s" \
    > "$LOG/bench_a.log"
grep "^|" "$LOG/bench_a.log" | head -40 >> "$SUMMARY"
step "bench muon, compiled, small tensors"
timeout 60 python3 bench/run.py --quick --sizes 1e7 --out "$LOG/bench_b" \
    --skip deepspeed,amp,fused-fp16,ours-bf16-moments,ours-lamb,ours-lion,ours-sgd,torch-sgd \
    2>&1 | grep -v "it/s" > "$LOG/bench_b.log"
grep "^|" "$LOG/bench_b.log" | head -40 >> "$SUMMARY"
step done
tar czf "$OUT/gpu_check.tgz" -C "$OUT" logs && rm -rf "$LOG"
