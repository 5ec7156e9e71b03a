"""Tests of the benchmark script bench/run.py: the CPU path end to end (outputs well formed,
launches per step constant in the number of tensors) and the GPU cases' set-ups and arithmetic
on the CPU, with an injected timer."""

from __future__ import annotations

import csv
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    # bench/ is a script directory, not a package: load run.py by path. Registered in
    # sys.modules before it runs, as dataclasses need to find their module.
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = module
    spec.loader.exec_module(module)
    return module


bench = _load_bench()
CPU = torch.device("cpu")
# Ours on CPU tensors runs the Triton kernels through the interpreter, which conftest.py (and
# bench/run.py) switch on only when there is no GPU.
needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="needs TRITON_INTERPRET=1"
)


def fake_timer(fn):
    """One call of ``fn`` (so the step really runs), and a fixed 2 ms."""
    fn()
    return 2e-3


# ------------------------------------------------------------------------ end to end
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of the script")
def test_quick_cpu_run_writes_three_well_formed_outputs(tmp_path, capsys):
    rows = bench.main(
        ["--quick", "--sizes", "1000", "--out", str(tmp_path), "--copy-mb", "8"]
        + ["--host-tensors", "40"]
    )
    printed = capsys.readouterr().out
    assert bench.GPU_NOTE in printed

    md = (tmp_path / "results.md").read_text()
    assert md in printed  # the table printed is the table written
    assert bench.GPU_NOTE in md
    assert "| key | case | params |" in md
    assert "ours / torch" in md  # the 10% target verdicts

    with (tmp_path / "results.csv").open() as f:
        records = list(csv.DictReader(f))
    assert set(bench.CSV_FIELDS) <= set(records[0])
    assert len(records) == len(rows)
    for rec in records:
        for column in ("device", "driver", "torch", "triton", "date", "case", "size"):
            assert rec[column], (column, rec)
        assert rec["driver"] == "n/a"
        assert rec["torch"] == torch.__version__
    timed = [r for r in records if r["section"] == "cpu"]
    assert {r["key"] for r in timed} == {"ours-adamw", "torch-adamw", "ours-sgd", "torch-sgd"}
    for rec in timed:
        assert float(rec["median_ms"]) > 0
        assert float(rec["bandwidth_GBps"]) > 0
        assert float(rec["frac_of_copy"]) > 0
        if rec["key"] == rec["vs"]:
            assert float(rec["ratio_to_ours"]) == 1.0
        else:
            assert float(rec["ratio_to_ours"]) > 0

    png = (tmp_path / "results.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.pyplot as plt

    assert plt.imread(tmp_path / "results.png").ndim == 3

    launches = [r for r in rows if r.section == "launches"]
    assert {r.key for r in launches} == {"ours", "ours-flatbuf", "ours-sgd"}
    for key in ("ours", "ours-flatbuf", "ours-sgd"):
        counts = {r.n_tensors: r.triton_launches for r in launches if r.key == key}
        assert len(counts) == 2 and len(set(counts.values())) == 1, counts
    host = [r for r in rows if r.section == "host"]
    assert [(r.key, r.n_tensors) for r in host] == [("ours-host", 40), ("ours-host-flatbuf", 40)]
    assert all(r.host_s > 0 and "stubbed" in r.note for r in host)
    assert "## Host time per step of the Triton path" in md


@needs_interpreter
@pytest.mark.parametrize("n_tensors", [3, 20])
def test_launches_per_step_do_not_depend_on_the_number_of_tensors(n_tensors):
    rows = bench.run_interpreter_launches(n_tensors, 64)
    by_key = {}
    for r in rows:
        by_key.setdefault(r.key, {})[r.n_tensors] = r.triton_launches
    # check + norm, AdamW, step counts, loss-scale update: 4 launches (as on a GPU: the count
    # takes the Triton path everywhere); SGD with momentum and step counts: 2.
    assert by_key == {
        "ours": {n_tensors: 4, 1: 4},
        "ours-flatbuf": {n_tensors: 4, 1: 4},
        "ours-sgd": {n_tensors: 2, 1: 2},
    }


def test_launch_counter_restores_the_kernels():
    kernels = bench._kernel_objects()
    assert kernels, "no Triton kernels found in fp16_triton.kernels"
    with bench.count_triton_launches() as counter:
        assert all("run" in vars(k) for k in kernels)
    assert counter["launches"] == 0
    assert not any("run" in vars(k) for k in kernels)


# ------------------------------------------------------------- GPU cases, on the CPU
@needs_interpreter
@pytest.mark.parametrize("key", ["ours", "amp", "fused-fp16", "ours-sgd", "torch-sgd"])
def test_gpu_case_set_ups_run_with_an_injected_timer(key):
    case = next(c for c in bench.GPU_CASES if c.key == key)
    row = bench.run_case(case, [100, 37], fake_timer, CPU)
    assert (row.key, row.size, row.n_tensors, row.time_s) == (key, 137, 2, 2e-3)
    assert row.note == ""
    assert (row.triton_launches is not None) == case.triton


def test_deepspeed_case_reports_when_not_installed():
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("DeepSpeed is installed")
    case = next(c for c in bench.GPU_CASES if c.key == "deepspeed")
    row = bench.run_case(case, [10], fake_timer, CPU)
    assert row.time_s is None
    assert row.note.startswith("DeepSpeed not installed")


@needs_interpreter
def test_small_tensors_case_on_cpu():
    rows = bench.run_small_tensors(6, 64, fake_timer, CPU, host_steps=2)
    keys = ["ours-many", "ours-flatbuf", "torch-many", "ours-flat", "torch-flat"]
    assert [r.key for r in rows] == keys
    assert all(r.section == "small" and r.host_s is not None for r in rows)
    ours = [r for r in rows if r.key.startswith("ours")]
    assert [r.n_tensors for r in ours] == [6, 6, 1]
    # On the CPU the loss-scale update takes its torch-op path: 3 Triton launches each.
    assert [r.triton_launches for r in ours] == [3, 3, 3]
    bench.add_derived(rows)
    assert rows[2].ratio == pytest.approx(1.0) and rows[2].vs == "ours-many"
    assert rows[1].vs == "ours-flat"  # flat buffers are compared with one flat tensor


def test_small_tensor_and_host_checks():
    rows = [
        bench.Row("small", "ours-many", "", 10, 10_000, time_s=1.3e-3, host_s=5e-3),
        bench.Row("small", "ours-flatbuf", "", 10, 10_000, time_s=1.1e-3, host_s=80e-6),
        bench.Row("small", "torch-many", "", 10, 10_000, time_s=1e-3, host_s=1e-3),
        bench.Row("small", "ours-flat", "", 10, 1, time_s=1e-3, host_s=50e-6),
        bench.Row("host", "ours-host-flatbuf", "", 10, 10_000, host_s=120e-6),
    ]
    lines = bench.small_tensor_checks(rows)
    assert lines == [
        "ours-many / ours-flat step time = 1.30 (target <= 1.2): NOT met",
        "ours-flatbuf / ours-flat step time = 1.10 (target <= 1.2): met",
        "ours-many: host time per step at 10,000 tensors = 5000 us (GPU; target < 100 us): NOT met",
        "ours-flatbuf: host time per step at 10,000 tensors = 80 us (GPU; target < 100 us): met",
        "ours-host-flatbuf: host time per step at 10,000 tensors = 120 us (launches stubbed, "
        "CPU; target < 100 us): NOT met",
    ]


def test_gpu_plan_lists_every_case_and_honours_skip():
    args = bench.parse_args(["--quick", "--skip", "compiled,small"])
    tasks = bench.plan(args, fake_timer, torch.device("cuda"))  # builds, runs nothing
    labels = [label for label, _ in tasks]
    expected = [f"{c.key} {s:.0e}" for s in bench.GPU_SIZES_QUICK for c in bench.GPU_CASES]
    expected = [label for label in expected if not label.startswith("compiled")]
    assert labels == ["copy"] + expected


# ------------------------------------------------------------------------ arithmetic
def test_ratio_bandwidth_and_fraction_of_copy():
    size, copy_bytes = 10**9, 2**30
    rows = [
        bench.Row("copy", "copy", "copy", copy_bytes, 1, time_s=0.5e-3, bytes_per_param=2),
        bench.Row("large", "ours", "ours", size, 32, time_s=10e-3, vs="ours", bytes_per_param=30),
        bench.Row("large", "amp", "amp", size, 32, time_s=16e-3, vs="ours", bytes_per_param=48),
        bench.Row("large", "ds", "ds", size, 32, time_s=None, vs="ours", note="not installed"),
        bench.Row("large", "amp", "amp", 10**6, 1, time_s=1e-3, vs="ours", bytes_per_param=48),
    ]
    bench.add_derived(rows)
    copy, ours, amp, ds, lonely = rows
    assert copy.bandwidth == pytest.approx(2 * copy_bytes / 0.5e-3)
    assert ours.ratio == 1.0
    assert ours.bandwidth == pytest.approx(30 * size / 10e-3)  # 3 TB/s
    assert ours.frac_of_copy == pytest.approx(ours.bandwidth / copy.bandwidth)
    assert amp.ratio == pytest.approx(1.6)
    assert amp.bandwidth == pytest.approx(48 * size / 16e-3)
    assert ds.ratio is None and ds.bandwidth is None
    assert lonely.ratio is None  # no "ours" at that size: no ratio across sizes


def test_cpu_verdicts_against_the_ten_percent_target():
    rows = [
        bench.Row("cpu", "ours-adamw", "", 100, 1, time_s=1.05, vs="ours-adamw"),
        bench.Row("cpu", "torch-adamw", "", 100, 1, time_s=1.0, vs="ours-adamw"),
        bench.Row("cpu", "ours-sgd", "", 100, 1, time_s=1.2, vs="ours-sgd"),
        bench.Row("cpu", "torch-sgd", "", 100, 1, time_s=1.0, vs="ours-sgd"),
    ]
    bench.add_derived(rows)
    adamw, sgd = bench.cpu_verdicts(rows)
    assert "ours / torch = 1.050" in adamw and adamw.endswith(": met")
    assert "ours / torch = 1.200" in sgd and sgd.endswith("NOT met")


def test_interleaved_takes_the_median_of_alternating_timings():
    calls = []
    fake_times = iter([5.0, 1.0, 3.0, 2.0, 4.0, 9.0])

    def timer(fn):
        fn()
        return next(fake_times)

    medians = bench.interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, timer, rounds=3
    )
    assert calls == ["a", "b", "a", "b", "a", "b", "a", "b"]  # warm-up once, then alternating
    assert medians == {"a": 4.0, "b": 2.0}


def test_cpu_timer_batches_fast_calls():
    calls = []
    seconds = bench.CpuTimer(min_time_s=0.01, max_calls=50)(lambda: calls.append(1))
    assert 1 < len(calls) <= 50
    assert 0 < seconds < 0.01


def test_split_sizes():
    assert bench.split_sizes(10**6) == [10**6]
    for total in (10**7, 10**8, 10**9, 12_345_679):
        sizes = bench.split_sizes(total)
        assert sum(sizes) == total
        assert len(sizes) <= 32 and max(sizes) - min(sizes) <= 1
    assert len(bench.split_sizes(10**8)) == 24
