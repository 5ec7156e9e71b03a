"""Every launch geometry the package can use gives the pure-torch reference's results.

The geometries are the tuner's ``CANDIDATES`` and every configuration in the shipped
``kernels/configs/*.json``, for every kernel (``tune.kernel_names()``: the device layer's and
every registered algorithm's); each is run through
``fp16_triton.geometry_check.check_candidate``, the check ``fp16-triton tune`` applies before
timing a candidate, on tensors sized around the geometry's own block and chunk boundaries,
separated by guard elements that must come back untouched.

Tolerances (see ``check_candidate``): a step kernel's outputs bitwise equal to the same kernel
under the default geometry (every element's arithmetic is the same in any geometry) and
within rtol 2**-9 of its pure-torch reference (an fp32 ulp from a fused multiply-add can move
an fp16 rounding by one fp16 ulp, 2**-10 relative); copies and unscaled grads bitwise equal
to the reference; the squared norm exactly equal to the float64 sum (every partial sum of the
check's inputs is exact in fp32, in any order), and within ``(tensors + 3) * 2**-24`` of it
relative for the reference, which rounds each tensor's norm, its square and their fp32 sum.

Without a GPU the kernels run in Triton's interpreter, which ignores ``num_warps``: candidates
that differ only by it are one computation there and are checked once (the test below that
lists the geometries says which); on a GPU every candidate is checked.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from fp16_triton import tune
from fp16_triton.kernels import cast_copy, nonfinite
from fp16_triton.kernels import launch_config as lc
from fp16_triton.spec import algorithms

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

# The interpreter computes with numpy, which warns on the inf/nan the check kernel is fed.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


def shipped_configs() -> list[dict[str, int]]:
    configs = []
    for path in sorted(lc.SHIPPED_DIR.glob("*.json")):
        configs += json.loads(path.read_text())["configs"].values()
    return configs


def geometry_key(config) -> tuple[int, ...]:
    key = (int(config["BLOCK"]), int(config["CHUNK"]))
    return key + ((int(config["num_warps"]),) if ON_GPU else ())


def geometries() -> list[dict[str, int]]:
    """Candidates and shipped configurations, one per distinct computation on this device."""
    unique = {}
    for config in [*lc.CANDIDATES, *shipped_configs(), lc.DEFAULT_CONFIG]:
        unique.setdefault(geometry_key(config), dict(config))
    return list(unique.values())


GEOMETRIES = geometries()
KERNELS = tune.kernel_names()
# Deliberately wrong: CHUNK is not a multiple of BLOCK, so a program's blocks would run past
# its chunk into the next program's, and those elements be updated (or counted) twice.
OVERLAPPING = [
    {"BLOCK": 512, "CHUNK": 768, "num_warps": 4},
    {"BLOCK": 1024, "CHUNK": 512, "num_warps": 4},
]


def test_every_candidate_and_shipped_config_is_checked():
    checked = {geometry_key(c) for c in GEOMETRIES}
    for config in [*lc.CANDIDATES, *shipped_configs()]:
        assert geometry_key(config) in checked
    assert len(lc.CANDIDATES) >= len(GEOMETRIES) >= 9  # 3 block sizes x 3 chunk multiples


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(
    "config", GEOMETRIES, ids=lambda c: f"B{c['BLOCK']}-C{c['CHUNK']}-w{c['num_warps']}"
)
def test_geometry_gives_the_reference_results(kernel, config):
    assert tune.check_candidate(kernel, config, DEVICE) is None


# Refused before anything runs: the runs could not be relied on to see the overlap (the
# cast copy is idempotent, and on a GPU two programs racing to write the same value can leave
# the result exactly right, as an H200 showed for SGD and Muon).
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("config", OVERLAPPING, ids=["chunk-not-multiple", "chunk-below-block"])
def test_overlapping_chunks_are_refused(kernel, config):
    problem = tune.check_candidate(kernel, config, DEVICE)
    assert problem is not None and "chunks overlap" in problem, problem


def _hide_last_element(kernel, monkeypatch):
    """Patch ``kernel``'s launcher so that the last element of its largest tensor is neither
    read nor written: the symptom of a mask one element short at a tensor's end."""

    def largest(tensors):
        return max(tensors, key=torch.Tensor.numel)

    if kernel == "nonfinite_check":
        real = nonfinite.nonfinite_check_and_norm

        def patched(grads, **kwargs):
            t = largest(grads)
            kept = t[-1].clone()
            t[-1] = 0.0
            try:
                return real(grads, **kwargs)
            finally:
                t[-1] = kept

        monkeypatch.setattr(nonfinite, "nonfinite_check_and_norm", patched)
        return
    if kernel in algorithms():  # the launcher the check calls: prepare_<name>_step
        module = algorithms()[kernel].kernel_module()
        name = f"prepare_{kernel}_step"
        real = getattr(module, name)

        def prepare(first, *args, **kwargs):
            launch = real(first, *args, **kwargs)
            t = largest(first)

            def patched_launch():
                kept = t.reshape(-1)[-1].clone()
                launch()
                t.reshape(-1)[-1] = kept

            return patched_launch

        monkeypatch.setattr(module, name, prepare)
        return
    module, name = {
        "unscale": (nonfinite, "unscale_and_check_"),
        "cast_copy": (cast_copy, "cast_copy_"),
    }[kernel]
    real = getattr(module, name)

    def patched(first, *args, **kwargs):
        t = largest(first)
        kept = t[-1].clone()
        real(first, *args, **kwargs)
        t[-1] = kept

    monkeypatch.setattr(module, name, patched)


@pytest.mark.parametrize("kernel", KERNELS)
def test_check_sees_one_missed_element(kernel, monkeypatch):
    """The check is not vacuous: one element short at a tensor's end is enough to refuse."""
    config = {"BLOCK": 512, "CHUNK": 1024, "num_warps": 4}
    assert tune.check_candidate(kernel, config, DEVICE) is None
    _hide_last_element(kernel, monkeypatch)
    assert tune.check_candidate(kernel, config, DEVICE) is not None


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(lc.CACHE_ENV, str(tmp_path / "cache"))
    lc.reload()
    yield
    lc.reload()


GOOD = [{"BLOCK": 512, "CHUNK": 512, "num_warps": 4}, {"BLOCK": 512, "CHUNK": 1024, "num_warps": 4}]
SIZES = (1500, 7)  # the tuner's own scratch sizes, kept small for the interpreter


@pytest.mark.usefixtures("private_cache")
def test_tune_refuses_an_unusable_candidate_and_never_times_it(caplog):
    timed = []

    def timer(fn):
        """Fake timings: the wrong geometry would be the fastest by far."""
        fn()
        config = lc.launch_config("adam", DEVICE)
        timed.append(config)
        return 0.1 if config == OVERLAPPING[0] else 1.0 + len(timed)

    candidates = [GOOD[0], OVERLAPPING[0], GOOD[1]]
    with caplog.at_level(logging.WARNING, logger="fp16_triton.tune"):
        results = tune.tune(DEVICE, ["adam"], SIZES, candidates, timer=timer, progress=False)
    assert timed == GOOD  # the refused candidate was never timed
    assert results["adam"]["config"] == GOOD[0]
    [(refused, why)] = results["adam"]["refused"]
    assert refused == OVERLAPPING[0] and "chunks overlap" in why
    assert "refusing adam config" in caplog.text


@pytest.mark.usefixtures("private_cache")
def test_tune_leaves_a_kernel_untuned_when_every_candidate_is_refused(caplog):
    def timer(fn):
        raise AssertionError("a refused candidate was timed")

    results = tune.tune(DEVICE, ["sgd"], SIZES, OVERLAPPING, timer=timer, progress=False)
    assert "sgd" not in results
    assert "every sgd candidate was refused" in caplog.text
    tune.save(results, DEVICE)
    assert lc.launch_config("sgd", DEVICE) == lc.DEFAULT_CONFIG
