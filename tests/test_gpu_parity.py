"""The Triton kernels of every algorithm and state mode against the pure-torch reference, on
the device the suite runs on: a GPU where there is one (the compiled kernels), else the CPU
(the kernels through Triton's interpreter).

The other kernel tests pin the reference to float64 models and to torch.optim on the CPU;
this file carries that to compiled kernels: same params, grads and hyperparameters,
``backend="triton"`` on the device against ``backend="torch"`` on the CPU (Muon: on the device,
so that both run the very same Newton-Schulz matmuls and only the Triton passes are compared),
through the ``grad_scale``/``found_inf`` protocol of torch's fused optimizers. Each of the
``STEPS`` steps starts both sides from the same values (after a step is compared, ours are
copied into the reference), so a rounding that fell differently is checked once, not
propagated into the next step's bound.

Tolerances, per element of each param and state tensor after one step (``ulp``: the stored
dtype's spacing at the larger magnitude of the element's value before and after the step;
``moved``: the largest change the reference made to any element of that tensor in the step):

* ``|ours - ref| <= 2 * ulp + REL * moved``. Both sides compute the same correctly rounded
  operations (``div_rn``/``sqrt_rn`` and ``EXACT_ARITHMETIC``, no contracted FMAs, in the
  kernels; IEEE ``/`` and ``sqrt`` in torch), except where one side rounds ``a * b + c`` once
  (torch's lerp, ``addcmul`` and ``add(alpha=)``, the kernels' explicit ``tl.fma``): each such
  operation differs by at most one fp32 ulp of its largest term, and an update chain has fewer
  than 16 of them. Its terms (scaled grads, decay, moments) are drawn alike for every element,
  so they are no larger than the tensor's largest change: the change agrees to ``REL = 2**-19``
  (16 fp32 ulps) of ``moved``, not of the element's own change, which cancellation (a grad
  meeting its weight decay) can make arbitrarily small. A stored value is rounded up to twice
  per step (weight decay, then the update), each of which may fall on the other side: two
  ``ulp``.
* LAMB adds the order of its norm sums (the kernel's block partials need not follow the
  reference's order). A sum of non-negative fp32 terms is exact to ``d * 2**-24`` relative,
  ``d`` the longest chain of additions a term goes through: in the kernel a tree over a block
  (``log2(BLOCK) <= 11``), the blocks of a chunk (``<= 8``), then its tensor's programs in
  turn (at most one per 512 elements); in the reference's pairwise sums 64 at most. A norm is
  a square root (half its sum's error) and a trust ratio a quotient of two norms, so the
  ratios agree to that chain length times ``2**-24``, plus ``REL`` for the update's own
  elements. The params and masters, whose update the ratio scales, get the ratios' measured
  difference added to ``REL``; the moments, which the ratio does not touch, do not.
* 16-bit tensors (params, bf16 state) also differ in under 1% of their elements: the fp32
  values agree to a few ulps, so a rounding decision (to nearest-even, or stochastic with the
  same Philox bits) flips only when it falls within those few fp32 ulps of the threshold;
  different random bits (a Philox that disagreed with the reference) would flip about half.
* A 16-bit param with an fp32 master is exactly its master rounded to nearest-even.
* A last step with ``found_inf`` set changes nothing, on either side, bit for bit.

``FP16_TRITON_PARITY_LOG=path`` appends each case's largest ``|ours - ref| / bound`` and
mismatch fraction as JSON lines (bench/gpu_check.sh keeps them with the GPU's results).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from comparing import assert_bitwise, master_rounded

import fp16_triton
from fp16_triton.kernels.remainder import join_reference

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
    "sgd-bf16-state-sr": (
        fp16_triton.SGD,
        dict(lr=0.05, momentum=0.9, state_dtype=torch.bfloat16, stochastic_rounding=True, seed=5),
    ),
    "lion": (fp16_triton.Lion, dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1)),
    "lion-bf16-state": (fp16_triton.Lion, dict(lr=1e-4, state_dtype=torch.bfloat16)),
    "lion-bf16-state-sr": (
        fp16_triton.Lion,
        dict(lr=1e-4, state_dtype=torch.bfloat16, stochastic_rounding=True, seed=9),
    ),
    "lamb": (fp16_triton.Lamb, dict(lr=1e-2, weight_decay=0.01)),
    "lamb-clip": (fp16_triton.Lamb, dict(lr=1e-2, weight_decay=0.01, max_grad_norm=1.0)),
    "muon": (fp16_triton.Muon, dict(lr=0.02, weight_decay=0.01)),
    # bf16 params only (fp16 ones are refused): masters compared joined, as fp32.
    "adamw-remainder": (
        fp16_triton.AdamW,
        dict(lr=1e-3, weight_decay=0.1, master_weights="remainder"),
    ),
    # int8 codes compared as codes: at most one apart, in at most 1% of the elements.
    "adamw-int8": (fp16_triton.AdamW, dict(lr=1e-3, weight_decay=0.1, state_dtype="int8")),
    # The leanest state in flat buffers (an int8 bucket aligned to blocks, an fp32 one).
    "adamw-remainder-int8-flat": (
        fp16_triton.AdamW,
        dict(lr=1e-3, master_weights="remainder", state_dtype="int8", flat_buffers=True),
    ),
}


def _params(case: str, dtype: torch.dtype, gen: torch.Generator) -> list[torch.Tensor]:
    shapes = MATRIX_SHAPES + VECTOR_SHAPES if case == "muon" else VECTOR_SHAPES
    if "int8" in case and not ON_GPU:
        shapes = shapes + [(4_352,)]  # int8 from 4,096 elements, a partial last block
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
            if "remainder" in case and dtype == torch.float16:
                continue
            yield pytest.param(case, dtype, True, id=f"{case}-{str(dtype)[6:]}")
    # Without masters: the params themselves are the fp32-computed values rounded (SR: at random).
    yield pytest.param("adamw-bf16-state-sr", torch.bfloat16, False, id="sr-bf16-no-master")
    yield pytest.param("adamw-bf16-state", torch.bfloat16, False, id="bf16-no-master")
    yield pytest.param("sgd-bf16-state-sr", torch.bfloat16, False, id="sgd-sr-bf16-no-master")
    yield pytest.param("lion-bf16-state-sr", torch.bfloat16, False, id="lion-sr-bf16-no-master")


def _log(record: dict) -> None:
    path = os.environ.get("FP16_TRITON_PARITY_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _check(name, ours, ref, before, rel, record):
    """Compare one tensor after a step from ``before``; keep the worst bound ratio and mismatch
    fraction in ``record``."""
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, name
    if ref.dtype == torch.int8:  # moment codes: a last-ulp difference can move one code
        apart = ((ours.int() & 0xFF) - (ref.int() & 0xFF)).abs()
        frac = (apart > 0).double().mean().item() if apart.numel() else 0.0
        record["worst_mismatch"] = max(record["worst_mismatch"], frac)
        assert (apart <= 1).all() and frac <= 0.01, f"{name}: codes {frac:.2%} apart"
        return
    if not ref.is_floating_point():
        assert torch.equal(ours, ref), f"{name}: {ours} != {ref}"
        return
    start = before.double()
    diff = (ours.double() - ref.double()).abs()
    larger = torch.maximum(ref.double().abs(), start.abs())
    moved = (ref.double() - start).abs().max() if ref.numel() else 0.0
    bound = 2 * _ulp(larger, ref.dtype) + rel * moved
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref)), f"{name}: non-finite"
    ratio = (diff / bound).max().item() if diff.numel() else 0.0
    record["worst_ratio"] = max(record["worst_ratio"], ratio)
    bad = diff > bound
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} of {bad.numel()} elements beyond the bound; worst "
        f"|ours - ref| = {diff.max().item():.3e} at bound ratio {ratio:.2f}"
    )
    if ref.dtype != torch.float32 and ref.numel():
        frac = (ours != ref).double().mean().item()
        record["worst_mismatch"] = max(record["worst_mismatch"], frac)
        assert frac <= 0.01, f"{name}: {frac:.2%} of elements differ (rounding flips)"


def _sides(case: str, dtype: torch.dtype, master_weights: bool):
    """Initial params and per-step grads, and ``{"ours"|"ref": (params, optimizer)}``."""
    cls, kwargs = CASES[case]
    gen = torch.Generator().manual_seed(7)
    init = _params(case, dtype, gen)
    if case == "lamb-clip":
        # k/64 for |k| <= 4: every square and partial sum of the clipping norm is exact in
        # fp32 (multiples of 2**-12 below 2**11 for under a million elements), so both sides
        # clip by the same factor whatever their summation order.
        draw = lambda shape: torch.randint(-4, 5, shape, generator=gen) / 64.0  # noqa: E731
    else:
        draw = lambda shape: torch.randn(shape, generator=gen)  # noqa: E731
    grads = [[draw(p.shape) * SCALE for p in init] for _ in range(STEPS)]
    if dtype != torch.float32 and "master_weights" not in kwargs:
        kwargs = dict(kwargs, master_weights=master_weights)
    ref_device = DEVICE if case == "muon" else torch.device("cpu")
    sides = {}
    for side, device, backend in (("ours", DEVICE, "triton"), ("ref", ref_device, "torch")):
        params = [p.clone().to(device) for p in init]
        opt = cls(_groups(case, params), backend=backend, **kwargs)
        opt.grad_scale = torch.full((), SCALE, device=device)
        opt.found_inf = torch.zeros((), device=device)
        sides[side] = (params, opt)
    return init, grads, sides


def _tensors(params, opt) -> dict[str, torch.Tensor]:
    """The params and every tensor of their state, by name (live tensors, not copies)."""
    found = {f"param{i}": p.detach() for i, p in enumerate(params)}
    for i, p in enumerate(params):
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor):
                found[f"param{i}.{key}"] = value
    return found


def _compared(params, opt) -> dict[str, torch.Tensor]:
    """What is compared after a step (CPU copies): ``_tensors``, but remainders joined with
    their params into the fp32 masters they hold (under ``master_param``)."""
    found = _cpu_copies(_tensors(params, opt))
    for i in range(len(params)):
        rest = found.pop(f"param{i}.master_remainder", None)
        if rest is not None:
            found[f"param{i}.master_param"] = join_reference(found[f"param{i}"], rest)
    return found


def _cpu_copies(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in tensors.items()}


@pytest.mark.parametrize("case, dtype, master_weights", list(_mode_cases()))
def test_kernels_match_the_reference(case, dtype, master_weights):
    init, grads, sides = _sides(case, dtype, master_weights)
    chain = 11 + 8 + -(-max(p.numel() for p in init) // 512) + 64  # additions (docstring)
    lamb_ratio = chain * 2.0**-24 + REL
    record = {"device": str(DEVICE), "case": case, "dtype": str(dtype), "masters": master_weights}
    record.update(worst_ratio=0.0, worst_mismatch=0.0)
    for step in range(STEPS):
        before = _compared(*sides["ref"])
        for params, _ in sides.values():
            for p, g in zip(params, grads[step]):
                p.grad = g.to(device=p.device, dtype=p.dtype, copy=True)  # one grad per side
        for _, opt in sides.values():
            opt.step()
        ours, ref = (_compared(*sides[side]) for side in ("ours", "ref"))
        scaled = REL  # params and masters: LAMB scales their update by the trust ratio
        if case.startswith("lamb"):
            coeffs, ref_coeffs = (sides[s][1].get_lamb_coeffs().cpu().double() for s in sides)
            coeff_rel = ((coeffs - ref_coeffs).abs() / ref_coeffs.abs()).max().item()
            record["lamb_coeff_rel"] = max(record.get("lamb_coeff_rel", 0.0), coeff_rel)
            assert coeff_rel <= lamb_ratio, f"trust ratios differ by {coeff_rel:.3e} relative"
            scaled = REL + coeff_rel
        assert set(ours) == set(ref), f"state keys {sorted(ours)} != {sorted(ref)}"
        for key in ref:
            start = before.get(key)
            if start is None:  # state the step created: masters from their params, else zeros
                param = before[key.split(".")[0]]
                start = param.float() if key.endswith(".master_param") else torch.zeros(())
            start = start.expand(ref[key].shape)
            rel = scaled if "." not in key or key.endswith(".master_param") else REL
            _check(f"step {step + 1} {key}", ours[key], ref[key], start, rel, record)
        params, opt = sides["ours"]
        for i, p in enumerate(params):
            master = opt.state[p].get("master_param")
            if master is not None:
                assert torch.equal(p.detach().cpu(), master_rounded(master.cpu(), p.dtype)), (
                    f"step {step + 1}: param{i} is not its master rounded"
                )
        # The next step starts both sides from ours (through .data: a resync, not a write
        # into the params that remainder masters would see and restart from).
        live_ref = _tensors(*sides["ref"])
        for key, value in _tensors(*sides["ours"]).items():
            live_ref[key].data.copy_(value)
    # An overflowing step: the kernels and the reference write nothing.
    for side, (params, opt) in sides.items():
        before = _cpu_copies(_tensors(params, opt))
        opt.found_inf.fill_(1.0)
        for p, g in zip(params, grads[0]):
            p.grad = g.to(device=p.device, dtype=p.dtype, copy=True)
        opt.step()
        after = _cpu_copies(_tensors(params, opt))
        assert_bitwise(after, before, f"{side}: a skipped step")
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
