"""The main job, ``fp16-triton train``: a tiny GPT trained through the engine on a synthetic
Markov-chain task, with a printed summary, ``summary.json`` and a ``train.png`` plot.

Learning criterion: the task's best achievable loss is the chain's entropy rate (reported as
``best_possible_loss``); a fresh model starts at about ``log(vocab)`` (uniform guessing). After
60 default steps the run must close at least 60% of the gap between its first loss and the
entropy rate (measured: 81%, 3.475 -> 1.615 against 1.190), which no run that fails to train
(no updates, all steps skipped, a wrong unscale) comes near.

Every test uses one CPU thread: on the two shared CI cores two intra-op threads on matrices
this small are slower than one (measured 10x under load).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
from comparing import one_thread as one_thread  # noqa: F401  (autouse: one CPU thread)

from fp16_triton.__main__ import main
from fp16_triton.config import ConfigError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SUMMARY_KEYS = {
    "steps",
    "dtype",
    "device",
    "final_loss",
    "initial_loss",
    "best_possible_loss",
    "uniform_loss",
    "skipped_steps",
    "final_loss_scale",
    "seconds",
}
SUMMARY_LINE = re.compile(
    r"(\d+) steps in [\d.]+s \((\w+), (\w+)\): loss ([\d.]+) -> ([\d.]+) "
    r"\(best possible ([\d.]+), uniform ([\d.]+)\); skipped steps (\d+), final loss scale (\S+)"
)


def read_outputs(out, steps: int) -> dict:
    """Check the run's files; return summary.json."""
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS
    assert summary["steps"] == steps
    assert all(
        math.isfinite(summary[k])
        for k in ("final_loss", "initial_loss", "best_possible_loss", "final_loss_scale")
    )
    png = (out / "train.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 1000
    return summary


def test_train_default_config_learns(tmp_path, capsys):
    out = tmp_path / "run"  # created by the job
    assert main(["train", "--steps", "60", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    match = SUMMARY_LINE.search(printed)
    assert match, printed
    summary = read_outputs(out, 60)
    assert f"plot: {out / 'train.png'}" in printed

    steps, dtype, device, first, final, best, uniform, skipped, scale = match.groups()
    assert int(steps) == 60 and dtype == "float16" == summary["dtype"]
    assert device == summary["device"]
    assert float(first) == pytest.approx(summary["initial_loss"], abs=5e-4)
    assert float(final) == pytest.approx(summary["final_loss"], abs=5e-4)
    assert float(best) == pytest.approx(summary["best_possible_loss"], abs=5e-4)
    assert float(uniform) == pytest.approx(math.log(32), abs=5e-4)
    assert int(skipped) == summary["skipped_steps"] < 60
    assert float(scale) == summary["final_loss_scale"] >= 1.0

    initial, final, best = (
        summary["initial_loss"],
        summary["final_loss"],
        summary["best_possible_loss"],
    )
    assert initial == pytest.approx(summary["uniform_loss"], abs=0.1)  # starts at chance
    assert best < final  # nothing beats the entropy rate (the tail is a mean over 6 batches)
    assert final <= best + 0.4 * (initial - best), summary  # >= 60% of the gap closed


def test_train_with_bf16_config_file(tmp_path, capsys):
    config = {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3}},
        "scheduler": {
            "type": "WarmupLR",
            "params": {"warmup_num_steps": 5, "warmup_max_lr": 3e-3, "warmup_type": "linear"},
        },
    }
    path = tmp_path / "bf16.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "run"
    assert main(["train", "--steps", "20", "--config", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = read_outputs(out, 20)
    assert summary["dtype"] == "bfloat16"
    assert "(bfloat16, " in printed
    assert summary["final_loss_scale"] == 1.0  # bf16 is not loss-scaled
    assert summary["skipped_steps"] == 0
    assert summary["final_loss"] < summary["initial_loss"] - 0.1


@pytest.mark.parametrize("problem", ["misspelled-key", "invalid-json", "missing-file"])
def test_train_with_bad_config_file_raises_clear_error(tmp_path, problem):
    path = tmp_path / "bad.json"
    if problem == "misspelled-key":
        path.write_text(json.dumps({"fp16": {"enabled": True, "loss_scale_windw": 10}}))
        expected = ["'fp16.loss_scale_windw'", "did you mean 'fp16.loss_scale_window'"]
    elif problem == "invalid-json":
        path.write_text('{"fp16": {"enabled": true,}}')
        expected = [str(path), "not valid JSON", "line 1"]
    else:
        expected = [str(path), "does not exist"]
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as info:
        main(["train", "--steps", "5", "--config", str(path), "--out", str(out)])
    for text in expected:
        assert text in str(info.value)
    assert not (out / "summary.json").exists()


def _run_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fp16_triton", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=cwd,
    )


def test_module_entry_point(tmp_path):
    out = tmp_path / "cli"
    proc = _run_cli("train", "--steps", "20", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert SUMMARY_LINE.search(proc.stdout), proc.stdout
    summary = read_outputs(out, 20)
    assert summary["final_loss"] < summary["initial_loss"]

    # A bad config file: a non-zero exit and the reason on stderr, naming the key.
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"gradient_clip": 1.0}))
    proc = _run_cli("train", "--config", str(bad), "--out", str(tmp_path / "bad"), cwd=tmp_path)
    assert proc.returncode != 0
    assert "did you mean 'gradient_clipping'" in proc.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    ("steps", "words"), [("0", "at least 1"), ("-3", "at least 1"), ("x", "a whole number")]
)
def test_train_refuses_a_step_count_it_cannot_run(tmp_path, capsys, steps, words):
    """``--steps 0`` used to fail deep inside with a traceback about the scheduler's
    total_num_steps; the argument parser now says what is wrong, and nothing is written."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main(["train", "--steps", steps, "--out", str(out)])
    assert info.value.code == 2
    assert f"argument --steps: must be {words}" in capsys.readouterr().err
    assert not out.exists()
