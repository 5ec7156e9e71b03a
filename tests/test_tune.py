"""``fp16-triton tune`` and the per-GPU launch configurations, on CPU with an injected timer.

The trials run the real kernels through the interpreter on tiny scratch tensors; only the
timing is injected, so the selection, caching and look-up logic is what is tested here. The
GPU timings themselves need a GPU.
"""

from __future__ import annotations

import json

import pytest
import torch

from fp16_triton import __main__ as cli
from fp16_triton import tune
from fp16_triton.kernels import launch_config as lc

CPU = torch.device("cpu")
SIZES = (5000, 7, 0)  # crosses a chunk boundary, a tiny tensor and an empty one
CANDIDATES = [
    {"BLOCK": 512, "CHUNK": 512, "num_warps": 4},
    {"BLOCK": 256, "CHUNK": 1024, "num_warps": 4},
    {"BLOCK": 1024, "CHUNK": 2048, "num_warps": 4},
]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(lc.CACHE_ENV, str(tmp_path / "cache"))
    lc.reload()
    yield
    lc.reload()


def fake_timer(fastest_chunk):
    """Times by the configuration in force: the candidate with CHUNK == fastest_chunk wins."""

    def timer(fn):
        fn()  # the trial really launches
        return 1.0 if lc.launch_config("adam", CPU)["CHUNK"] == fastest_chunk else 2.0

    return timer


def test_tune_picks_the_fastest_candidate_and_launch_config_uses_it():
    results = tune.tune(CPU, ["adam"], SIZES, CANDIDATES, timer=fake_timer(1024), progress=False)
    assert results["adam"]["config"] == CANDIDATES[1]
    assert len(results["adam"]["trials"]) == len(CANDIDATES)
    path = tune.save(results, CPU)
    entries = json.loads(open(path).read())
    assert list(entries) == [lc.device_key(CPU)]
    assert lc.launch_config("adam", CPU) == CANDIDATES[1]
    assert lc.launch_config("sgd", CPU) == lc.DEFAULT_CONFIG  # untuned: default
    configs, source = lc.config_source(CPU)
    assert "tuned" in source and configs["adam"] == CANDIDATES[1]


def test_every_kernel_runs_under_every_candidate():
    calls = []

    def timer(fn):
        fn()
        calls.append(1)
        return 1.0

    kernels = tune.kernel_names()
    assert {"nonfinite_check", "unscale", "adam", "sgd"} <= set(kernels)
    results = tune.tune(CPU, kernels, SIZES, CANDIDATES, timer=timer, progress=False)
    assert set(results) == set(kernels)
    assert len(calls) == len(kernels) * len(CANDIDATES)


def test_entries_are_keyed_by_kernel_version(monkeypatch):
    results = tune.tune(CPU, ["adam"], SIZES, CANDIDATES, timer=fake_timer(512), progress=False)
    tune.save(results, CPU)
    assert lc.launch_config("adam", CPU) == CANDIDATES[0]
    monkeypatch.setattr(lc, "KERNELS_VERSION", lc.KERNELS_VERSION + 1)
    lc.reload()
    assert lc.launch_config("adam", CPU) == lc.DEFAULT_CONFIG  # stale entry ignored


def test_shipped_configs_match_gpu_names(monkeypatch):
    for path in lc.SHIPPED_DIR.glob("*.json"):
        entry = json.loads(path.read_text())
        assert set(entry["configs"]) <= set(tune.kernel_names())  # the others: the default
        assert entry["match"]
    monkeypatch.setattr(lc, "_device_name", lambda device: "NVIDIA H200")
    lc.reload()
    _, source = lc.config_source(CPU)
    assert "hopper.json" in source
    monkeypatch.setattr(lc, "_device_name", lambda device: "NVIDIA A100-SXM4-80GB")
    lc.reload()
    assert "ampere.json" in lc.config_source(CPU)[1]


def test_unreadable_cache_is_ignored_with_a_warning(caplog):
    lc.cache_file().parent.mkdir(parents=True)
    lc.cache_file().write_text("{not json")
    lc.reload()
    assert lc.launch_config("adam", CPU) == lc.DEFAULT_CONFIG
    assert "unreadable tuning cache" in caplog.text


def test_cli_without_gpu_says_so_and_fails(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the no-GPU message cannot be shown here")
    assert cli.main(["tune"]) == 1
    assert "needs a GPU" in capsys.readouterr().err
    assert cli.main(["tune", "--show"]) == 0
    out = capsys.readouterr().out
    assert "source: generic defaults" in out and "adam" in out


def test_invalid_configs_are_ignored_with_a_warning(caplog):
    """A CHUNK that is not a multiple of BLOCK would make programs' chunks overlap (elements
    updated twice): such entries fall back to the defaults."""
    for config in lc.CANDIDATES:
        assert lc.usable(config)
    bad = {"BLOCK": 512, "CHUNK": 768, "num_warps": 4}
    assert not lc.usable(bad)
    lc.cache_file().parent.mkdir(parents=True)
    entry = {"date": "today", "configs": {"adam": bad, "sgd": CANDIDATES[0]}}
    lc.cache_file().write_text(json.dumps({lc.device_key(CPU): entry}))
    lc.reload()
    assert lc.launch_config("adam", CPU) == lc.DEFAULT_CONFIG
    assert lc.launch_config("sgd", CPU) == CANDIDATES[0]
    assert "ignoring invalid launch config for adam" in caplog.text
