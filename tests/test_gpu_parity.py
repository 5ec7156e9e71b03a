"""The Triton kernels of every algorithm and state mode against the pure-torch reference, on
the device the suite runs on: a GPU where there is one (the compiled kernels), else the CPU
(the kernels through Triton's interpreter).

The other kernel tests pin the reference to float64 models and to torch.optim on the CPU;
this file carries that to compiled kernels: same params, grads and hyperparameters, three
steps of ``backend="triton"`` on the device against ``backend="torch"`` on the CPU (Muon: on
the device, so that both run the very same Newton-Schulz matmuls and only the Triton passes
are compared), through the ``grad_scale``/``found_inf`` protocol of torch's fused optimizers.

Tolerances (per element, after ``n`` steps; ``ulp`` of the stored dtype at the reference's
value; ``moved`` the sum over the steps of the reference's per-step change of that tensor):

* ``|ours - ref| <= n * ulp + REL * moved``. Both sides compute the same correctly rounded
  operations (``div_rn``/``sqrt_rn`` in the kernels, IEEE ``/`` and ``sqrt`` in torch), but a
  GPU compiler contracts ``a * b + c`` into one FMA where torch rounds twice: at most one fp32
  ulp per contracted operation, and an update chain has fewer than 16 of them, so the update
  (hence the tensor's change) agrees to ``REL = 2**-19`` relative (16 fp32 ulps); each step's
  own final rounding to the stored dtype may then fall on either side: one ``ulp`` per step.
  LAMB adds the reordering of its norm sums (the kernel's block partials need not match the
  reference's order): recursive fp32 summation of ``N`` non-negative terms is exact to
  ``N * 2**-24`` relative, so its trust ratio, and its update, to ``2 * N * 2**-24`` more.
* 16-bit tensors (params, bf16 moments) also differ in under 1% of their elements: the fp32
  values agree to a few ulps, so a rounding decision (to nearest-even, or stochastic with the
  same Philox bits) flips only when it falls within those few fp32 ulps of the threshold;
  different random bits (a Philox that disagreed with the reference) would flip about half.
* A 16-bit param with an fp32 master is exactly its master rounded to nearest-even.

``FP16_TRITON_PARITY_LOG=path`` appends each case's largest ``|ours - ref| / bound`` and
mismatch fraction as JSON lines (bench/gpu_check.sh keeps them with the GPU's results).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import fp16_triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
STEPS = 3
REL = 2.0**-19
SCALE = 1024.0  # the loss scale the grads carry; a power of two, so unscaling is exact
# Bigger on a GPU: many programs per tensor, and LAMB's per-tensor last-arrival reductions
# with many programs arriving at once. The interpreter costs ~0.5 ms per program.
VECTOR_SHAPES = [(33,), (70_001,), (300, 1_000), (1,)] if ON_GPU else [(33,), (1_030,), (16, 70)]
MATRIX_SHAPES = [(512, 1_024), (1_024, 512), (256, 256)] if ON_GPU else [(48, 80), (80, 48)]


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at ``|x|`` (float64; subnormal spacing at zero)."""
    info = torch.finfo(dtype)
    mag = x.double().abs().clamp_min(info.smallest_normal)
    return torch.exp2(torch.floor(torch.log2(mag)) - (info.bits - 1 - _exponent_bits(dtype)))


def _exponent_bits(dtype: torch.dtype) -> int:
    return {torch.float16: 5, torch.bfloat16: 8, torch.float32: 8}[dtype]


def _round_even(master: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return master.cpu().to(dtype)  # torch's CPU casts round to nearest-even


CASES = {
    "adam": (fp16_triton.Adam, dict(lr=1e-3, weight_decay=0.01)),
    "adamw-amsgrad": (fp16_triton.AdamW, dict(lr=1e-3, weight_decay=0.1, amsgrad=True)),
    "adamw-bf16-state": (fp16_triton.AdamW, dict(lr=1e-3, state_dtype=torch.bfloat16)),
    "adamw-bf16-state-sr": (
        fp16_triton.AdamW,
        dict(lr=1e-3, state_dtype=torch.bfloat16, stochastic_rounding=True, seed=1234),
    ),
    "sgd-nesterov": (
        fp16_triton.SGD,
        dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4),
    ),
    "sgd-bf16-state": (
        fp16_triton.SGD,
        dict(lr=0.05, momentum=0.9, state_dtype=torch.bfloat16),
    ),
    "lion": (fp16_triton.Lion, dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1)),
    "lion-bf16-state": (fp16_triton.Lion, dict(lr=1e-4, state_dtype=torch.bfloat16)),
    "lamb": (fp16_triton.Lamb, dict(lr=1e-2, weight_decay=0.01)),
    "lamb-clip": (fp16_triton.Lamb, dict(lr=1e-2, weight_decay=0.01, max_grad_norm=1.0)),
    "muon": (fp16_triton.Muon, dict(lr=0.02, weight_decay=0.01)),
}


def _params(case: str, dtype: torch.dtype, gen: torch.Generator) -> list[torch.Tensor]:
    shapes = MATRIX_SHAPES + VECTOR_SHAPES if case == "muon" else VECTOR_SHAPES
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes]


def _groups(case: str, params: list[torch.Tensor]):
    if case != "muon":
        return params
    return [
        {"params": [p for p in params if p.dim() == 2]},
        {"params": [p for p in params if p.dim() != 2], "use_muon": False},
    ]


def _mode_cases():
    for case in CASES:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            yield pytest.param(case, dtype, True, id=f"{case}-{str(dtype)[6:]}")
    # Without masters: the params themselves are the fp32-computed values rounded (SR: at random).
    yield pytest.param("adamw-bf16-state-sr", torch.bfloat16, False, id="sr-bf16-no-master")
    yield pytest.param("adamw-bf16-state", torch.bfloat16, False, id="bf16-no-master")


def _log(record: dict) -> None:
    path = os.environ.get("FP16_TRITON_PARITY_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _check(name, ours, ref, moved, rel, record):
    """Compare one tensor; update ``record`` with the worst bound ratio seen."""
    ours = ours.detach().cpu()
    ref = ref.detach().cpu()
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, name
    if not ref.is_floating_point():
        assert torch.equal(ours, ref), f"{name}: {ours} != {ref}"
        return
    diff = (ours.double() - ref.double()).abs()
    bound = STEPS * _ulp(ref, ref.dtype) + rel * moved
    ratio = (diff / bound).max().item() if diff.numel() else 0.0
    record["worst_ratio"] = max(record.get("worst_ratio", 0.0), ratio)
    assert torch.isfinite(ours).all() == torch.isfinite(ref).all(), f"{name}: non-finite"
    bad = diff > bound
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} of {bad.numel()} elements beyond the bound; worst "
        f"|ours - ref| = {diff.max().item():.3e} at bound ratio {ratio:.2f}"
    )
    if ref.dtype != torch.float32 and ref.numel():
        frac = (ours != ref).double().mean().item()
        record[f"mismatch_{name}"] = frac
        assert frac <= 0.01, f"{name}: {frac:.2%} of elements differ (rounding flips)"


def _run(case: str, dtype: torch.dtype, master_weights: bool):
    cls, kwargs = CASES[case]
    gen = torch.Generator().manual_seed(7)
    init = _params(case, dtype, gen)
    grads = [[torch.randn(p.shape, generator=gen) * SCALE for p in init] for _ in range(STEPS)]
    ref_device = DEVICE if case == "muon" else torch.device("cpu")
    sides = {}
    for side, device, backend in (("ours", DEVICE, "triton"), ("ref", ref_device, "torch")):
        params = [p.clone().to(device) for p in init]
        opt = cls(
            _groups(case, params),
            backend=backend,
            **(kwargs if dtype == torch.float32 else dict(kwargs, master_weights=master_weights)),
        )
        opt.grad_scale = torch.full((), SCALE, device=device)
        opt.found_inf = torch.zeros((), device=device)
        sides[side] = (params, opt)
    return init, grads, sides


def _snapshot(params, opt):
    snap = {f"param{i}": p.detach().clone().cpu() for i, p in enumerate(params)}
    for i, p in enumerate(params):
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor):
                snap[f"param{i}.{key}"] = value.detach().clone().cpu()
    return snap


@pytest.mark.parametrize("case, dtype, master_weights", list(_mode_cases()))
def test_kernels_match_the_reference(case, dtype, master_weights):
    init, grads, sides = _run(case, dtype, master_weights)
    rel = REL
    if case.startswith("lamb"):
        rel += 2 * max(p.numel() for p in init) * 2.0**-24
    moved: dict[str, torch.Tensor] = {}
    before = _snapshot(*sides["ref"])
    for step in range(STEPS):
        for params, _ in sides.values():
            for p, g in zip(params, grads[step]):
                p.grad = g.to(device=p.device, dtype=p.dtype)
        for _, opt in sides.values():
            opt.step()
        after = _snapshot(*sides["ref"])
        for key, value in after.items():
            start = before[key].double() if key in before else 0.0
            moved[key] = moved.get(key, 0.0) + (value.double() - start).abs()
        before = after
    ours = _snapshot(*sides["ours"])
    ref = before
    assert set(ours) == set(ref), f"state keys {sorted(ours)} != {sorted(ref)}"
    record = {"device": str(DEVICE), "case": case, "dtype": str(dtype), "masters": master_weights}
    for key in ref:
        _check(key, ours[key], ref[key], moved[key], rel, record)
    params, opt = sides["ours"]
    for i, p in enumerate(params):
        master = opt.state[p].get("master_param")
        if master is not None:
            assert torch.equal(p.detach().cpu(), _round_even(master, p.dtype)), (
                f"param{i} is not its master rounded to nearest-even"
            )
    if case.startswith("lamb"):
        coeffs = sides["ours"][1].get_lamb_coeffs().cpu().double()
        ref_coeffs = sides["ref"][1].get_lamb_coeffs().cpu().double()
        coeff_rel = ((coeffs - ref_coeffs).abs() / ref_coeffs.abs()).max().item()
        record["lamb_coeff_rel"] = coeff_rel
        assert coeff_rel <= rel, f"trust coefficients differ by {coeff_rel:.3e} relative"
    _log(record)


@pytest.mark.parametrize("case", ["lamb", "lamb-clip"])
def test_lamb_steps_are_deterministic(case):
    """LAMB's norms are reduced by whichever program of a tensor arrives last (an int32 atomic
    counter): a missing fence would show as a run that differs from the others."""
    cls, kwargs = CASES[case]
    gen = torch.Generator().manual_seed(3)
    shapes = VECTOR_SHAPES * 3  # several tensors reduced in the same launch
    init = [torch.randn(s, generator=gen).half() for s in shapes]
    grads = [torch.randn(s, generator=gen).half() for s in shapes]
    results = []
    for _ in range(8 if ON_GPU else 2):
        params = [p.clone().to(DEVICE) for p in init]
        opt = cls(params, backend="triton", **kwargs)
        for _ in range(2):
            for p, g in zip(params, grads):
                p.grad = g.to(DEVICE)
            opt.step()
        results.append(([p.detach().cpu() for p in params], opt.get_lamb_coeffs().cpu()))
    for params, coeffs in results[1:]:
        assert torch.equal(coeffs, results[0][1])
        for a, b in zip(params, results[0][0]):
            assert torch.equal(a, b)
