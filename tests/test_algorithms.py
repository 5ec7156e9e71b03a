"""What every registered algorithm must satisfy, read off its spec (``fp16_triton/spec.py``).

A new optimizer gets these tests by registering: its launcher accepts the spec's example
inputs on both backends, a skipped step (``found_inf`` set) writes nothing, dense transposed
lists step bitwise as contiguous ones, the bytes-per-param model matches the tensors the step
really keeps and writes, and the engine's config builds every class with the spec's defaults.
The numerics of each algorithm are tested against float64 models in its own tests
(``tests/test_kernels.py`` for Adam and SGD).
"""

from __future__ import annotations

import copy

import pytest
import torch

import fp16_triton
from fp16_triton.kernels.multi_tensor import TableCache
from fp16_triton.spec import Algorithm, algorithms, elementwise_traffic, tensors_of

ALGORITHMS = sorted(algorithms())
LOW_AND_FP32 = (torch.float16, torch.bfloat16, torch.float32)
SIZES = [24, 1100, 3]  # a transposable 4 x 6 tensor, one across a 1024-element block, a tiny one


def example(name, dtype, seed=0):
    torch.manual_seed(seed)
    args, kwargs = algorithms()[name].example(SIZES, "cpu", dtype)
    return args, dict(kwargs, lr=1e-2)  # a visible step


def run(name, backend, args, kwargs):
    algorithm = algorithms()[name]
    if backend == "triton":
        algorithm.prepare(*args, **kwargs)()
    else:
        algorithm.run_reference(*args, **kwargs)


def assert_bitwise(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(bits(a), bits(b)), what


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", LOW_AND_FP32)
@pytest.mark.parametrize("name", ALGORITHMS)
def test_a_skipped_step_writes_nothing(name, dtype, backend):
    args, kwargs = example(name, dtype)
    before = [t.clone() for t in tensors_of((args, kwargs))]
    kwargs["found_inf"] = torch.ones(())
    run(name, backend, args, kwargs)
    for i, (t, b) in enumerate(zip(tensors_of((args, kwargs)), before)):
        assert_bitwise(t, b, f"{name} tensor {i} written by a skipped step")


@pytest.mark.parametrize("name", ALGORITHMS)
def test_transposed_lists_step_bitwise_as_contiguous_ones(name):
    """The kernels read dense tensors of any layout as flat ranges: when the k-th tensors of
    every list share a layout, each element meets its own grad and state, so the step is the
    contiguous step bit for bit."""
    plain_args, kwargs = example(name, torch.float16)
    relaid_args, relaid_kwargs = copy.deepcopy((plain_args, kwargs))

    def relay(x):  # a flat tensor as a transposed 4 x 6, a matrix as column-major
        if isinstance(x, torch.Tensor) and x.numel() == 24 and x.dim() == 2:
            return x.detach().mT.contiguous().mT
        if isinstance(x, torch.Tensor) and x.numel() == 24:
            return x.detach().clone().reshape(4, 6).t()
        if isinstance(x, list):
            return [relay(t) for t in x]
        return x

    relaid_args = tuple(relay(a) for a in relaid_args)
    relaid_kwargs = {k: relay(v) for k, v in relaid_kwargs.items()}
    run(name, "triton", plain_args, kwargs)
    run(name, "triton", relaid_args, relaid_kwargs)
    for i, (a, b) in enumerate(zip(tensors_of(plain_args), tensors_of(relaid_args))):
        expected = a.reshape(4, 6).t() if a.numel() == 24 and a.dim() == 1 else a
        assert_bitwise(b, expected, f"{name} tensor {i} of the transposed step")


@pytest.mark.parametrize("dtype", LOW_AND_FP32)
@pytest.mark.parametrize("name", ALGORITHMS)
def test_bytes_model_matches_the_tensors_kept_and_written(name, dtype):
    """``traffic().kept`` is the bytes per param of every param-sized tensor of the example
    (param, grad, master, state) and of those the launcher keeps in its cache between steps
    (Muon's update buffers); ``written`` those a step changes; ``read`` at least what is kept
    (every such tensor is read). The example runs the algorithm's default options."""
    args, kwargs = example(name, dtype)
    numel = sum(SIZES)
    per_param = [t for t in tensors_of((args, kwargs)) if t.dim() > 0]
    before = [t.clone() for t in per_param]
    cache = TableCache()
    algorithms()[name].prepare(*args, cache=cache, **kwargs)()
    # Per-param scratch: lists of one tensor per param, shaped as the params (LAMB's per-tensor
    # norms and coefficients are not: they do not grow with the elements).
    shapes = [p.shape for p in args[0]]
    kept_lists = [v for value in cache.scratch.values() for v in _items(value)]
    scratch = [t for v in kept_lists if _per_param(v, shapes) for t in v]
    kept = sum(t.numel() * t.element_size() for t in per_param + scratch) / numel
    written = sum(
        t.numel() * t.element_size() for t, b in zip(per_param, before) if not torch.equal(t, b)
    ) + sum(t.numel() * t.element_size() for t in scratch)  # made by the step: written
    traffic = algorithms()[name].traffic(dtype, momentum=kwargs.get("momentum", 0.0))
    assert traffic.kept == kept
    assert traffic.written == written / numel
    assert traffic.read >= traffic.kept


def test_bytes_model_of_bf16_moments_matches_the_tensors_kept_and_written():
    """Adam with ``state_dtype=torch.bfloat16``: the moments take 2 bytes (fp16 params with
    masters: read 2 + 2 + 4 + 2 + 2, write 2 + 4 + 2 + 2 = 22, kept 12)."""
    args, kwargs = example("adam", torch.float16)
    args = (*args[:2], *([t.to(torch.bfloat16) for t in lst] for lst in args[2:4]), *args[4:])
    numel = sum(SIZES)
    per_param = [t for t in tensors_of((args, kwargs)) if t.dim() > 0]
    before = [t.clone() for t in per_param]
    algorithms()["adam"].prepare(*args, **kwargs)()
    kept = sum(t.numel() * t.element_size() for t in per_param) / numel
    changed = [t for t, b in zip(per_param, before) if not torch.equal(t, b)]
    written = sum(t.numel() * t.element_size() for t in changed) / numel
    traffic = algorithms()["adam"].traffic(torch.float16, state_dtype=torch.bfloat16)
    assert (traffic.kept, traffic.written, traffic.moved) == (kept, written, 22) == (12, 10, 22)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_bytes_of_adam_state_per_param_are_the_traffic_models(amsgrad):
    """Measured from the state tensors' storages (fp16 params with fp32 masters): the model's
    ``kept`` less the param and its grad (2 + 2 bytes)."""
    sizes = (3, 1100)
    for state_dtype in (torch.float32, torch.bfloat16):
        params = [torch.nn.Parameter(torch.randn(n).half()) for n in sizes]
        opt = fp16_triton.AdamW(params, amsgrad=amsgrad, state_dtype=state_dtype, backend="torch")
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        storages = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for p in params
            for name, t in opt.state[p].items()
            if name != "step"  # one number per tensor, not per element
        }
        per_param = sum(storages.values()) / sum(sizes)
        kept = (
            algorithms()["adam"]
            .traffic(torch.float16, amsgrad=amsgrad, state_dtype=state_dtype)
            .kept
        )
        assert per_param == kept - 2 - 2
    assert kept - 4 == (4 + 2 * (3 if amsgrad else 2))  # bf16: 8 B (10 with amsgrad), not 12


def _items(value) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def _per_param(value, shapes) -> bool:
    return isinstance(value, list) and [getattr(t, "shape", None) for t in value] == shapes


def test_elementwise_traffic_of_adamw_fp16_is_the_documented_30_bytes():
    # read p 2, g 2, master 4, m 4, v 4; write p 2, master 4, m 4, v 4.
    assert elementwise_traffic(torch.float16, None, True, 2).moved == 30
    assert elementwise_traffic(torch.float32, None, True, 2).moved == 28  # no master for fp32


@pytest.mark.parametrize("name", ALGORITHMS)
def test_the_engine_builds_every_type_with_the_config_defaults(name):
    for type_name in algorithms()[name].type_names:
        model = torch.nn.Linear(4, 3)
        config = {"optimizer": {"type": type_name.lower()}, "fp16": {"enabled": True}}
        engine, optimizer, *_ = fp16_triton.initialize(model=model, config=config)
        assert type(optimizer.optimizer).__name__ == engine.config.optimizer.effective_type
        loss = engine(torch.randn(2, 4).half()).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        assert engine.global_steps == 1


def test_a_spec_states_the_config_check_of_what_defaults_cannot_say():
    """torch.optim.Muon's signature: a tuple of coefficients (one negative) and an optional
    callable have no kind their default implies; the spec names the check or leaves the
    argument out, and everything else is read off the signature (an int default: an int)."""

    class Muon:
        def __init__(
            self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
            ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7, ns_steps=5, adjust_lr_fn=None,
        ):  # fmt: skip
            pass

    def coefficients(key, value):
        return tuple(float(v) for v in value)

    base = dict(name="muon", classes=(Muon,), kernel="muon", state={}, traffic=None, example=None)
    with pytest.raises(TypeError, match="config_kinds"):
        Algorithm(**base).config_params()
    spec = Algorithm(
        **base, config_kinds={"ns_coefficients": coefficients}, config_exclude={"adjust_lr_fn"}
    )
    params = spec.config_params()
    assert params["ns_coefficients"] == (coefficients, (3.4445, -4.775, 2.0315))
    assert params["ns_steps"] == ("pos_int", 5) and params["nesterov"] == ("bool", True)
    assert "adjust_lr_fn" not in params


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_bytes_of_remainder_masters_are_the_traffic_model(state_dtype):
    """bf16 params with ``master_weights="remainder"``: the master's state is an int16 tensor
    (2 B/param) whose bytes, with the moments', are the model's ``kept`` less the param and its
    grad; a step writes exactly the model's ``written`` bytes per param (param, remainder,
    moments). Tensors of a thousand elements, so that every one of them changes (a bf16
    moment of a few elements may round back to its old value)."""
    torch.manual_seed(0)
    sizes = (1000, 1100)
    params = [torch.nn.Parameter(torch.randn(n).to(torch.bfloat16)) for n in sizes]
    opt = fp16_triton.AdamW(params, master_weights="remainder", state_dtype=state_dtype)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    tensors = [t for p in params for name, t in opt.state[p].items() if name != "step"]
    before = [t.clone() for t in tensors] + [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    per_param = sum(t.untyped_storage().nbytes() for t in tensors) / sum(sizes)
    after = tensors + [p.detach() for p in params]
    changed = [t for t, b in zip(after, before) if not torch.equal(t, b)]
    written = sum(t.numel() * t.element_size() for t in changed) / sum(sizes)
    traffic = algorithms()["adam"].traffic(
        torch.bfloat16, master="remainder", state_dtype=state_dtype
    )
    assert per_param == traffic.kept - 2 - 2
    assert written == traffic.written
    moments = 2 * (4 if state_dtype == torch.float32 else 2)
    assert traffic.moved == 2 + 2 + 2 + moments + 2 + 2 + moments  # 26 or 18 B/param
