"""Tests of the benchmark package bench/ (``python bench/run.py``): the CPU path end to end
(outputs well formed, launches per step constant in the number of tensors), the GPU cases'
set-ups and arithmetic on the CPU with an injected timer, and the bytes-per-param models."""

from __future__ import annotations

import csv
import dataclasses
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a package at the repository root, not installed
    sys.path.insert(0, str(ROOT))

from bench import cases, machine, ours, report, run, theirs, timing  # noqa: E402
from bench.case import Row, split_sizes  # noqa: E402
from fp16_triton.spec import algorithms, check_pass_bytes  # noqa: E402

CPU = torch.device("cpu")
# Ours on CPU tensors runs the Triton kernels through the interpreter, which conftest.py (and
# the bench package) switch on only when there is no GPU.
needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="needs TRITON_INTERPRET=1"
)


def fake_timer(fn):
    """One call of ``fn`` (so the step really runs), and a fixed 2 ms."""
    fn()
    return 2e-3


# ------------------------------------------------------------------------ end to end
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of the script")
def test_configs_ab_says_it_needs_a_gpu():
    """``bench/configs_ab.py`` (tuned vs default launch configurations) only means something on
    a GPU: elsewhere it says so and exits non-zero, importing everything it needs first."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "bench" / "configs_ab.py"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "needs a CUDA GPU" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of the script")
def test_quick_cpu_run_writes_three_well_formed_outputs(tmp_path, capsys):
    rows = run.main(
        ["--quick", "--sizes", "1000", "--out", str(tmp_path), "--copy-mb", "8"]
        + ["--host-tensors", "40"]
    )
    printed = capsys.readouterr().out
    assert report.GPU_NOTE in printed

    md = (tmp_path / "results.md").read_text()
    assert md in printed  # the table printed is the table written
    assert report.GPU_NOTE in md
    assert "| key | case | params |" in md
    assert "ours / torch" in md  # the 10% target verdicts
    # The dated results file (the one to commit) is the report, naming machine and command.
    (dated,) = tmp_path.glob("20??-??-??-cpu-*.md")
    assert dated.read_text() == md
    assert "command: `python bench/run.py --quick --sizes 1000 --out " in md
    assert "- commit " in md and f"torch {torch.__version__}" in md

    with (tmp_path / "results.csv").open() as f:
        records = list(csv.DictReader(f))
    assert set(report.CSV_FIELDS) <= set(records[0])
    assert len(records) == len(rows)
    for rec in records:
        for column in ("device", "driver", "torch", "triton", "date", "case", "size"):
            assert rec[column], (column, rec)
        assert rec["driver"] == "n/a"
        assert rec["torch"] == torch.__version__
    timed = [r for r in records if r["section"] == "cpu"]
    keys = {r["key"] for r in timed}  # ours for every algorithm, torch's where it has one
    compact = {"ours-cpu-recipe", *(f"ours-cpu-{k}" for k in ours.COMPACT_MODES)}
    assert compact <= keys  # and the recipe in each compact-state mode
    assert len({k for k in keys - compact if k.startswith("ours-")}) == len(algorithms())
    assert {"ours-adamw", "torch-adamw", "ours-sgd", "torch-sgd"} <= keys
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
    # AdamW thrice (flat buffers, bf16 moments), every other algorithm once.
    launch_keys = {r.key for r in launches}
    assert {"ours", "ours-flatbuf", "ours-bf16-moments", "ours-sgd"} <= launch_keys
    assert len(launch_keys) == len(algorithms()) + 1 + len(ours.COMPACT)
    for key in launch_keys:
        counts = {r.n_tensors: r.triton_launches for r in launches if r.key == key}
        assert len(counts) == 2 and len(set(counts.values())) == 1, counts
    host = [r for r in rows if r.section == "host"]
    assert [(r.key, r.n_tensors) for r in host] == [
        ("ours-host", 40),
        ("ours-host-flatbuf", 40),
        ("ours-host-flatbuf-remainder", 40),
    ]
    assert all(r.host_s > 0 and "stubbed" in r.note for r in host)
    assert "## Host time per step of the Triton path" in md


@needs_interpreter
@pytest.mark.parametrize("n_tensors", [3, 20])
def test_launches_per_step_do_not_depend_on_the_number_of_tensors(n_tensors):
    rows = cases.run_interpreter_launches(n_tensors, 64)
    by_key = {}
    for r in rows:
        by_key.setdefault(r.key, {})[r.n_tensors] = r.triton_launches
    # check + norm, AdamW, step counts, loss-scale update: 4 launches (as on a GPU: the count
    # takes the Triton path everywhere); SGD with momentum and step counts: 2.
    assert {k: by_key[k] for k in ("ours", "ours-flatbuf", "ours-sgd")} == {
        "ours": {n_tensors: 4, 1: 4},
        "ours-flatbuf": {n_tensors: 4, 1: 4},
        "ours-sgd": {n_tensors: 2, 1: 2},
    }
    for counts in by_key.values():  # every other algorithm: as many launches for 1 tensor as N
        assert len(set(counts.values())) == 1, counts


def test_launch_counter_restores_the_kernels():
    kernels = timing.kernel_objects()
    assert kernels, "no Triton kernels found in fp16_triton.kernels"
    with timing.count_triton_launches() as counter:
        assert all("run" in vars(k) for k in kernels)
    assert counter["launches"] == 0
    assert not any("run" in vars(k) for k in kernels)


# ------------------------------------------------------------- GPU cases, on the CPU
@needs_interpreter
@pytest.mark.parametrize("key", ["ours", "amp", "fused-fp16", "ours-sgd", "torch-sgd"])
def test_gpu_case_set_ups_run_with_an_injected_timer(key):
    case = next(c for c in cases.GPU_CASES if c.key == key)
    row = cases.run_case(case, [100, 37], fake_timer, CPU)
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
    case = next(c for c in cases.GPU_CASES if c.key == "deepspeed")
    row = cases.run_case(case, [10], fake_timer, CPU)
    assert row.time_s is None
    assert row.note.startswith("DeepSpeed not installed")


@needs_interpreter
def test_small_tensors_case_on_cpu():
    rows = cases.run_small_tensors(6, 64, fake_timer, CPU, host_steps=2)
    keys = ["ours-many", "ours-flatbuf", "torch-many", "ours-flat", "torch-flat"]
    assert [r.key for r in rows] == keys
    assert all(r.section == "small" and r.host_s is not None for r in rows)
    ours = [r for r in rows if r.key.startswith("ours")]
    assert [r.n_tensors for r in ours] == [6, 6, 1]
    # On the CPU the loss-scale update takes its torch-op path: 3 Triton launches each.
    assert [r.triton_launches for r in ours] == [3, 3, 3]
    report.add_derived(rows)
    assert rows[2].ratio == pytest.approx(1.0) and rows[2].vs == "ours-many"
    assert rows[1].vs == "ours-flat"  # flat buffers are compared with one flat tensor


def test_small_tensor_and_host_checks():
    rows = [
        Row("small", "ours-many", "", 10, 10_000, time_s=1.3e-3, host_s=5e-3),
        Row("small", "ours-flatbuf", "", 10, 10_000, time_s=1.1e-3, host_s=80e-6),
        Row("small", "torch-many", "", 10, 10_000, time_s=1e-3, host_s=1e-3),
        Row("small", "ours-flat", "", 10, 1, time_s=1e-3, host_s=50e-6),
        Row("host", "ours-host-flatbuf", "", 10, 10_000, host_s=120e-6),
    ]
    lines = report.small_tensor_checks(rows)
    assert lines == [
        "ours-many / ours-flat step time = 1.30 (target <= 1.2): NOT met",
        "ours-flatbuf / ours-flat step time = 1.10 (target <= 1.2): met",
        "ours-many: host time per step at 10,000 tensors = 5000 us (GPU; target < 100 us): NOT met",
        "ours-flatbuf: host time per step at 10,000 tensors = 80 us (GPU; target < 100 us): met",
        "ours-host-flatbuf: host time per step at 10,000 tensors = 120 us (launches stubbed, "
        "CPU; target < 100 us): NOT met",
    ]


def test_gpu_plan_lists_every_case_and_honours_skip():
    args = run.parse_args(["--quick", "--skip", "compiled,small"])
    tasks = run.plan(args, fake_timer, torch.device("cuda"))  # builds, runs nothing
    labels = [label for label, _ in tasks]
    expected = [f"{c.key} {s:.0e}" for s in run.GPU_SIZES_QUICK for c in cases.GPU_CASES]
    expected = [label for label in expected if not label.startswith("compiled")]
    assert labels == ["copy"] + expected


# ------------------------------------------------------------------------ arithmetic
def test_ratio_bandwidth_and_fraction_of_copy():
    size, copy_bytes = 10**9, 2**30
    rows = [
        Row("copy", "copy", "copy", copy_bytes, 1, time_s=0.5e-3, bytes_per_param=2),
        Row("large", "ours", "ours", size, 32, time_s=10e-3, vs="ours", bytes_per_param=30),
        Row("large", "amp", "amp", size, 32, time_s=16e-3, vs="ours", bytes_per_param=48),
        Row("large", "ds", "ds", size, 32, time_s=None, vs="ours", note="not installed"),
        Row("large", "amp", "amp", 10**6, 1, time_s=1e-3, vs="ours", bytes_per_param=48),
    ]
    report.add_derived(rows)
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
        Row("cpu", "ours-adamw", "", 100, 1, time_s=1.05, vs="ours-adamw"),
        Row("cpu", "torch-adamw", "", 100, 1, time_s=1.0, vs="ours-adamw"),
        Row("cpu", "ours-sgd", "", 100, 1, time_s=1.2, vs="ours-sgd"),
        Row("cpu", "torch-sgd", "", 100, 1, time_s=1.0, vs="ours-sgd"),
    ]
    report.add_derived(rows)
    adamw, sgd = report.cpu_verdicts(rows)
    assert "ours / torch = 1.050" in adamw and adamw.endswith(": met")
    assert "ours / torch = 1.200" in sgd and sgd.endswith("NOT met")


def test_interleaved_takes_the_median_of_alternating_timings():
    calls = []
    fake_times = iter([5.0, 1.0, 3.0, 2.0, 4.0, 9.0])

    def timer(fn):
        fn()
        return next(fake_times)

    medians = timing.interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, timer, rounds=3
    )
    assert calls == ["a", "b", "a", "b", "a", "b", "a", "b"]  # warm-up once, then alternating
    assert medians == {"a": 4.0, "b": 2.0}


def test_cpu_timer_batches_fast_calls():
    calls = []
    seconds = timing.CpuTimer(min_time_s=0.01, max_calls=50)(lambda: calls.append(1))
    assert 1 < len(calls) <= 50
    assert 0 < seconds < 0.01


def test_split_sizes():
    assert split_sizes(10**6) == [10**6]
    for total in (10**7, 10**8, 10**9, 12_345_679):
        sizes = split_sizes(total)
        assert sum(sizes) == total
        assert len(sizes) <= 32 and max(sizes) - min(sizes) <= 1
    assert len(split_sizes(10**8)) == 24


# ------------------------------------------------------------------- bytes-per-param models
def test_ours_bytes_are_the_spec_traffic_and_match_a_hand_count():
    # Hand count of the recipe (fp16 p and g, fp32 master, m, v): the check pass reads g (2);
    # the step reads p, g (2 + 2) and master, m, v (4 x 3), writes p (2) and master, m, v (12).
    assert cases.OURS_ADAMW.bytes_per_param == 2 + (2 + 2 + 12) + (2 + 12) == 32
    adam = algorithms()["adam"]
    spec = adam.traffic(torch.float16).moved + check_pass_bytes(torch.float16)
    assert cases.OURS_ADAMW.bytes_per_param == spec
    assert cases.OURS_ADAMW.memory_per_param == adam.traffic(torch.float16).kept == 16
    by_key = {c.key: c for c in cases.GPU_CASES}
    sgd = algorithms()["sgd"].traffic(torch.float32, momentum=0.9)
    assert by_key["ours-sgd"].bytes_per_param == sgd.moved


def test_torch_models_agree_with_the_spec_where_the_math_is_the_same():
    # theirs.py counts torch's fp32 AdamW and SGD-with-momentum kernels by hand; the spec
    # counts ours. Same tensors touched once each: the figures must agree.
    assert theirs.BYTES_ADAMW_FP32 == algorithms()["adam"].traffic(torch.float32).moved
    sgd = algorithms()["sgd"].traffic(torch.float32, momentum=0.9)
    assert theirs.BYTES_SGD_MOMENTUM_FP32 == sgd.moved
    assert theirs.BYTES_TORCH_AMP == 48


def test_every_algorithm_gets_rows_and_every_ratio_has_its_row():
    *algorithm_pairs, compact_pair = cases.CPU_PAIRS
    assert [pair[0].key for pair in algorithm_pairs] == [
        f"ours-{ours.optimizer_of(a)[0].__name__.lower()}" for a in algorithms().values()
    ]
    compact_keys = [f"ours-cpu-{k}" for k in ours.COMPACT_MODES]
    assert [c.key for c in compact_pair] == ["ours-cpu-recipe", *compact_keys]
    for pair in cases.CPU_PAIRS:
        assert {c.vs for c in pair} == {pair[0].key}
    gpu_keys = [c.key for c in cases.GPU_CASES]
    assert gpu_keys[:5] == ["ours", "amp", "fused-fp16", "compiled", "deepspeed"]
    assert {"ours-sgd", "torch-sgd"} <= set(gpu_keys)
    compact = len(ours.COMPACT)  # the recipe with compact state
    assert len([k for k in gpu_keys if k.startswith("ours")]) == len(algorithms()) + compact
    assert all(c.vs in gpu_keys for c in cases.GPU_CASES)
    launch_keys = [c.key for c in cases.LAUNCH_CASES]
    assert launch_keys[:2] == ["ours", "ours-flatbuf"] and "ours-sgd" in launch_keys
    assert len(launch_keys) == len(algorithms()) + 1 + compact


def test_an_algorithm_the_bench_does_not_list_runs_its_first_class_with_defaults():
    new = dataclasses.replace(algorithms()["sgd"], name="unlisted")
    case = ours.algorithm_case(new, "torch")
    assert (case.key, case.label) == ("ours-sgd", "ours: SGD(backend='torch'), fp32 params")
    # No momentum: read p, g (4 + 4), write p (4).
    assert case.bytes_per_param == 12 and case.memory_per_param == 8


# ------------------------------------------------------------------------- results file
def test_results_file_is_named_by_date_and_machine():
    env = machine.Environment(
        "NVIDIA H200", "550.1", "2.5", "3.1", "2026-11-29T20:00:00+00:00", True
    )
    assert report.results_name(env) == "2026-11-29-nvidia-h200.md"
    cpu = dataclasses.replace(
        env, device="Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz (2 cores)", gpu=False
    )
    assert report.results_name(cpu) == "2026-11-29-cpu-intel-xeon-platinum-8375c-2-cores.md"
    md = report.markdown([], dataclasses.replace(env, commit="abc123"), "python bench/run.py")
    assert "- commit abc123; command: `python bench/run.py`" in md
    assert "- device: NVIDIA H200; driver: 550.1" in md


def test_commit_outside_a_checkout_is_unknown(tmp_path):
    assert machine.git_commit(tmp_path) == "unknown"
    if (ROOT / ".git").exists():  # a checkout (a worktree's .git is a file)
        assert machine.git_commit() != "unknown"
