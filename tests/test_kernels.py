"""Property tests of the Triton launchers in ``fp16_triton.kernels``.

Every launcher is checked against two oracles: ``kernels.reference`` (pure torch, fp32, the
kernels' order of operations) run on clones of the same inputs, and a float64 statement of the
math written here. Without a GPU the kernels run in Triton's interpreter (``conftest.py`` sets
``TRITON_INTERPRET=1``); each program instance then costs milliseconds, so tensors are small
(at most ``MAX_TOTAL`` elements per example) but their sizes hit every block/chunk boundary.

Tolerances. Values computed in fp32 are compared in ulps (units in the last place, fp32) of a
per-element *scale*: the sum of the magnitudes of the terms added along the value's
computation (e.g. ``|m_old| + |g| + |wd * p|`` for Adam's first moment), the quantity that
bounds a sum's rounding errors. An error bound in ulps of the *result* alone would be unsound:
``m + w * (g - m)`` or ``p - lr * u`` can cancel, and then one rounding of an operand (or a
fused multiply-add on one side and not on the other) is many ulps of the small result. Each
fp32 operation rounds once (error <= 0.5 ulp of its own result, itself <= the scale, and ulp
is monotone in |x|), so a chain of k operations is within about k/2 ulps of its scale.

Run unchanged on a GPU: tensors are created on ``DEVICE``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch
from comparing import master_rounded
from exploring import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fp16_triton.kernels import adam, multi_tensor, nonfinite, reference, sgd
from fp16_triton.kernels.launch_config import DEFAULT_CONFIG
from fp16_triton.kernels.multi_tensor import TableCache

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# The interpreter computes with numpy, which warns on the inf/nan arithmetic these tests feed
# the kernels on purpose (overflowing products, injected non-finite grads).
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

LOW_PRECISION = (torch.float16, torch.bfloat16)
GRAD_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Every kernel shares the same geometry today; the boundaries of all of them are exercised.
BLOCKS = [DEFAULT_CONFIG["BLOCK"]]
CHUNKS = [DEFAULT_CONFIG["CHUNK"]]
BOUNDARY_SIZES = sorted(
    {0, 1}
    | {b + d for b in BLOCKS for d in (-1, 0, 1)}
    | {c + d for c in CHUNKS for d in (-1, 0, 1)}
    | {2 * c + 1 for c in CHUNKS}
)
MAX_TOTAL = 40_000  # elements per example, all tensors together (interpreter cost)
MAX_TENSORS = 64

SETTINGS = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ----------------------------------------------------------------------------------------------
# Bit-level and ulp helpers
# ----------------------------------------------------------------------------------------------

_INT_VIEW = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}
# (explicit mantissa bits, smallest normal exponent) of each float format
_FORMAT = {torch.float32: (23, -126), torch.float16: (10, -14), torch.bfloat16: (7, -126)}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits (NaN-safe comparisons: NaN payloads and -0.0 included)."""
    return t.view(_INT_VIEW[t.dtype]) if t.dtype in _INT_VIEW else t


def assert_bitwise(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    if not torch.equal(bits(a), bits(b)):
        diff = (bits(a) != bits(b)).reshape(-1).nonzero()
        i = int(diff[0])
        raise AssertionError(
            f"{what}: {diff.numel()} of {a.numel()} elements differ bitwise; first at flat "
            f"index {i}: {a.reshape(-1)[i].item()!r} vs {b.reshape(-1)[i].item()!r}"
        )


def ulp(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """fp64 tensor of the ulp of ``dtype`` at |x|: 2**(floor(log2|x|) - mantissa_bits),
    with subnormals' (and zero's) fixed spacing below the smallest normal exponent."""
    mant, emin = _FORMAT[dtype]
    x = x.double()
    _, e = torch.frexp(x)  # x = f * 2**e with 0.5 <= |f| < 1, so floor(log2|x|) = e - 1
    e = torch.where(x == 0, torch.full_like(e, emin), (e - 1).clamp(min=emin))
    return torch.ldexp(torch.ones_like(x), e - mant)


def assert_within_ulps(actual, expected, scale, k: float, what: str) -> None:
    """|actual - expected| <= k ulp(fp32) of ``scale`` elementwise (fp64 comparison)."""
    actual = actual.double().reshape(-1)
    expected = expected.double().reshape(-1)
    scale = scale.double().reshape(-1)
    assert torch.isfinite(actual).all(), f"{what}: non-finite result"
    err = (actual - expected).abs()
    tol = k * ulp(scale)
    bad = ~(err <= tol)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {actual.numel()} elements off by more than {k} ulp of "
            f"their scale; first at flat index {i}: got {actual[i].item()!r}, expected "
            f"{expected[i].item()!r}, scale {scale[i].item()!r}, error "
            f"{(err[i] / ulp(scale[i : i + 1])[0]).item():.2f} ulp"
        )


def fp32(x: float) -> float:
    """The float32 value nearest ``x`` (what a one-element fp32 tensor holds)."""
    return float(torch.tensor(x, dtype=torch.float32))


def scalar(x: float, shape: tuple[int, ...] = ()) -> torch.Tensor:
    """A one-element fp32 device tensor: 0-d as GradScaler and the optimizers keep them, or
    shape (1,), which the launchers accept as well."""
    return torch.full(shape, x, dtype=torch.float32, device=DEVICE)


def clone_all(lists):
    return [None if lst is None else [t.clone() for t in lst] for lst in lists]


def assert_lists_bitwise(before, after, what: str) -> None:
    for name, b, a in zip(what.split(","), before, after):
        if b is None:
            continue
        for i, (x, y) in enumerate(zip(b, a)):
            assert_bitwise(y, x, f"{name}[{i}]")


# ----------------------------------------------------------------------------------------------
# Strategies: tensor-list specifications (hypothesis prints them; tensors are built from them)
# ----------------------------------------------------------------------------------------------

size_st = st.one_of(
    st.sampled_from(BOUNDARY_SIZES), st.integers(0, 20_000), st.integers(0, 64), st.just(0)
)
small_size_st = st.one_of(st.integers(0, 40), st.sampled_from(BOUNDARY_SIZES))


@st.composite
def sizes_st(draw, max_tensors: int = MAX_TENSORS) -> list[int]:
    """1..max_tensors sizes, most examples few tensors, some many small ones; each drawn
    from the block/chunk boundaries, small or random sizes, clamped to a total budget."""
    n = draw(st.one_of(st.integers(1, 3), st.integers(1, 6), st.integers(7, max_tensors)))
    each = small_size_st if n > 6 else size_st
    sizes, budget = [], MAX_TOTAL
    for _ in range(n):
        s = min(draw(each), budget)
        sizes.append(s)
        budget -= s
    return sizes


def shape_of(size: int) -> tuple[int, ...]:
    """Some tensors 2-D (contiguous): the kernels must read any contiguous shape as flat."""
    return (3, size // 3) if size % 3 == 0 and size > 0 else (size,)


NONFINITE = (math.inf, -math.inf, math.nan)

injections_st = st.lists(
    st.tuples(
        st.integers(0, MAX_TENSORS - 1),  # which non-empty tensor (modulo their count)
        st.sampled_from(["first", "last", "random"]),
        st.sampled_from(NONFINITE),
        st.integers(0, 2**31 - 1),  # random position (modulo the size)
    ),
    max_size=4,
)


def inject(tensors: Sequence[torch.Tensor], injections) -> bool:
    """Write the non-finite values of ``injections`` into ``tensors``; True if any landed."""
    nonempty = [t for t in tensors if t.numel() > 0]
    if not nonempty:
        return False
    for pick, where, value, pos in injections:
        t = nonempty[pick % len(nonempty)]
        n = t.numel()
        index = {"first": 0, "last": n - 1, "random": pos % n}[where]
        t.view(-1)[index] = value
    return bool(injections)


pow2_scale_st = st.integers(-24, 24).map(lambda k: 2.0**k)
other_scale_st = st.one_of(
    st.sampled_from([1.5, 3.0, 0.75, 0.1, 1 / 3, 1000.0, 65535.0, 1.0 + 2.0**-8]),
    st.floats(2.0**-24, 2.0**24).filter(lambda x: math.frexp(x)[0] != 0.5),
)
# Loss scales from 2**-24 to 2**24: powers of two (as GradScaler uses) and a few others.
scale_st = st.one_of(pow2_scale_st, pow2_scale_st, other_scale_st).map(fp32)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_values(gen, shape, dtype, lo_exp: int, hi_exp: int) -> torch.Tensor:
    """Normal mantissas times 2**e, e uniform in [lo_exp, hi_exp] per element, clamped to the
    dtype's finite range (so only injected values are non-finite), with some exact zeros."""
    n = math.prod(shape)
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    x = torch.ldexp(x, torch.randint(lo_exp, hi_exp + 1, (n,), generator=gen))
    x = torch.where(torch.rand(n, generator=gen) < 0.01, torch.zeros_like(x), x)
    fmax = torch.finfo(dtype).max
    return x.clamp(-fmax, fmax).to(dtype).reshape(shape).to(DEVICE)


@st.composite
def grad_list_st(draw):
    """Spec of a list of grads: sizes, dtypes (one for all, or mixed), a magnitude exponent per
    tensor, a seed, and non-finite injections."""
    sizes = draw(sizes_st())
    if draw(st.booleans()):
        dtypes = [draw(st.sampled_from(GRAD_DTYPES))] * len(sizes)
    else:
        dtypes = draw(
            st.lists(st.sampled_from(GRAD_DTYPES), min_size=len(sizes), max_size=len(sizes))
        )
    return {
        "sizes": sizes,
        "dtypes": dtypes,
        "exps": draw(st.lists(st.integers(-12, 12), min_size=len(sizes), max_size=len(sizes))),
        "seed": draw(st.integers(0, 2**32 - 1)),
        "injections": draw(st.one_of(st.just([]), injections_st)),
    }


# ----------------------------------------------------------------------------------------------
# nonfinite_check_and_norm
# ----------------------------------------------------------------------------------------------


@settings(max_examples=examples(30), **SETTINGS)
@given(
    spec=grad_list_st(),
    grad_scale=st.one_of(st.none(), scale_st),
    compute_norm=st.booleans(),
    use_out=st.booleans(),
    use_cache=st.booleans(),
    scalar_shape=st.sampled_from([(), (1,)]),
)
def test_nonfinite_check_and_norm(spec, grad_scale, compute_norm, use_out, use_cache, scalar_shape):
    gen = generator(spec["seed"])
    grads = [
        random_values(gen, shape_of(n), dt, e - 2, e + 2)
        for n, dt, e in zip(spec["sizes"], spec["dtypes"], spec["exps"])
    ]
    injected = inject(grads, spec["injections"])
    any_bad = any(bool((~torch.isfinite(g)).any()) for g in grads)
    assert any_bad == injected
    before = [g.clone() for g in grads]
    scale_t = None if grad_scale is None else scalar(grad_scale, scalar_shape)
    out = torch.full((2,), 123.0, device=DEVICE) if use_out else None
    cache = TableCache() if use_cache else None

    result = nonfinite.nonfinite_check_and_norm(
        grads, grad_scale=scale_t, compute_norm=compute_norm, out=out, cache=cache
    )

    assert result.dtype == torch.float32 and result.shape == (2,)
    if use_out:
        assert result.data_ptr() == out.data_ptr(), "out= must be written and returned"
    assert_lists_bitwise([before], [grads], "grads")  # read-only
    sum_sq, flag = result.tolist()
    # The flag counts chunks holding a non-finite element: non-zero exactly iff there is one.
    assert (flag != 0) == any_bad, f"flag {flag} but non-finite present: {any_bad}"
    assert flag >= 0 and flag == int(flag)
    ref = reference.nonfinite_check_and_norm(
        [g.clone() for g in grads], grad_scale=scale_t, compute_norm=compute_norm
    )
    assert (ref[1].item() != 0) == (flag != 0)

    if not compute_norm:
        assert sum_sq == 0.0
    elif any_bad:
        # inf**2 and nan propagate: a clip coefficient can never come from a partial norm.
        assert not math.isfinite(sum_sq)
    else:
        s = 1.0 if grad_scale is None else grad_scale
        exact = sum(float(((g.double() / s) ** 2).sum()) for g in grads)
        # fp32 accumulation of <= 40k positive terms (no cancellation): each square of
        # g * fp32(1/s) is within ~3 half-ulps of (g/s)**2; each lane adds <= CHUNK/BLOCK = 4
        # terms per program, the 1024 lanes are reduced as a tree (~10 levels), and <= ~75
        # program partials are summed by torch.sum: relative error <= (3 + 4 + 10 + 75)
        # * 2**-24 ~ 5.5e-6 < 1e-5 worst case (typical errors are ~1e-7).
        assert abs(sum_sq - exact) <= 1e-5 * exact, (sum_sq, exact)
        # The reference is held to the same bound, so the two agree within 2e-5.
        assert abs(sum_sq - ref[0].item()) <= 2e-5 * exact

    if use_cache:
        # A second call with the same tensors reuses the cached tables and is deterministic.
        tables = {k: c._tables for k, c in cache.scratch.items() if isinstance(c, TableCache)}
        again = nonfinite.nonfinite_check_and_norm(
            grads, grad_scale=scale_t, compute_norm=compute_norm, cache=cache
        )
        for k, c in cache.scratch.items():
            if isinstance(c, TableCache):
                assert c._tables is tables[k], "tables rebuilt for unchanged tensors"
        assert_bitwise(again, result.clone(), "second (cached) result")


def test_nonfinite_only_zero_size_and_empty_list():
    grads = [torch.empty(0, dtype=dt, device=DEVICE) for dt in GRAD_DTYPES]
    out = torch.full((2,), 7.0, device=DEVICE)
    result = nonfinite.nonfinite_check_and_norm(grads, out=out)
    assert result.data_ptr() == out.data_ptr() and result.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="at least one tensor"):
        nonfinite.nonfinite_check_and_norm([])


# ----------------------------------------------------------------------------------------------
# unscale_and_check_
# ----------------------------------------------------------------------------------------------

# Per-element exponent ranges wide enough to reach subnormal inputs and results, and products
# that overflow to inf, for each dtype.
WIDE_EXPS = {torch.float16: (-26, 17), torch.bfloat16: (-135, 127), torch.float32: (-140, 127)}


def expected_unscaled(g: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    """torch's fp32 product, rounded to the grad dtype to nearest-even by torch's own cast."""
    return (g.float() * inv_scale).to(g.dtype)


def check_unscaled(out: torch.Tensor, g_in: torch.Tensor, inv_scale: torch.Tensor, what: str):
    expected = expected_unscaled(g_in, inv_scale)
    finite = torch.isfinite(g_in)
    # Exact: one fp32 multiplication (correctly rounded on every backend) and one
    # round-to-nearest-even to the grad dtype; torch does the same, so every finite input
    # must give the same bits (ties included: this checks the kernel's explicit bf16 rounding,
    # which the interpreter would otherwise truncate).
    assert_bitwise(out[finite], expected[finite], what)
    # Non-finite inputs stay non-finite of the same kind (inv_scale > 0).
    assert torch.equal(torch.isnan(out[~finite]), torch.isnan(g_in[~finite])), what
    assert torch.equal(out[~finite & ~torch.isnan(g_in)], g_in[~finite & ~torch.isnan(g_in)]), what


@settings(max_examples=examples(30), **SETTINGS)
@given(
    spec=grad_list_st(),
    inv_scale=scale_st,
    found_before=st.sampled_from([0.0, 1.0]),
    use_cache=st.booleans(),
    scalar_shape=st.sampled_from([(), (1,)]),
)
def test_unscale_and_check(spec, inv_scale, found_before, use_cache, scalar_shape):
    gen = generator(spec["seed"])
    grads = [
        random_values(gen, shape_of(n), dt, *WIDE_EXPS[dt])
        for n, dt in zip(spec["sizes"], spec["dtypes"])
    ]
    inject(grads, spec["injections"])
    any_bad = any(bool((~torch.isfinite(g)).any()) for g in grads)
    before = [g.clone() for g in grads]
    found_inf = scalar(found_before, scalar_shape)
    inv = scalar(inv_scale, scalar_shape)

    nonfinite.unscale_and_check_(grads, found_inf, inv, cache=TableCache() if use_cache else None)

    for i, (out, g_in) in enumerate(zip(grads, before)):
        check_unscaled(out, g_in, inv, f"grads[{i}] ({g_in.dtype})")
    # Set to exactly 1.0 on a non-finite input, never cleared, untouched otherwise.
    assert found_inf.item() == (1.0 if any_bad or found_before == 1.0 else 0.0)
    assert inv.item() == inv_scale


def test_bf16_subnormal_inputs_are_read_exactly():
    """bf16 values below 2**-126 are subnormal; widening them to fp32 is exact (append 16 zero
    bits), so unscaling by 1.0 must return them unchanged and the norm must count them.

    Regression: Triton 3.9's interpreter implements ``.to(tl.float32)`` of bf16 with
    ``_convert_float``, which normalises a subnormal significand and then clamps the exponent
    to 0, so bf16 0x0012 (1.65e-39) read as fp32 0x00100000 (1.47e-39); the kernels now widen
    with bit operations (``rounding.widen``). The property tests draw bf16 subnormals too.
    """
    g = torch.arange(1, 128, dtype=torch.int16).view(torch.bfloat16)  # every positive subnormal
    g = torch.cat([g, -g]).to(DEVICE)
    g_in = g.clone()
    found_inf = scalar(0.0)
    nonfinite.unscale_and_check_([g], found_inf, scalar(1.0))
    assert found_inf.item() == 0.0
    check_unscaled(g, g_in, scalar(1.0), "bf16 subnormals x 1.0")
    # The sum of squares of values ~1e-39 underflows in fp32: read the norm of 2**100 * g.
    sum_sq = nonfinite.nonfinite_check_and_norm([g_in], grad_scale=scalar(2.0**-100))[0].item()
    exact = float(((g_in.double() * 2.0**100) ** 2).sum())
    assert abs(sum_sq - exact) <= 1e-5 * exact, (sum_sq, exact)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("inv_scale", [1.5, 3.0, 0.75, 1.0 + 2.0**-8, 0.1, 2.0**-20, 2.0**20])
def test_unscale_every_bit_pattern(dtype, inv_scale):
    """All 65536 fp16/bf16 bit patterns at once: every rounding case, ties to even included
    (x 1.5 or x 3 needs one or two more bits than the dtype has, so many products are exact
    ties), subnormal inputs and results, overflow, and the non-finite patterns (so found_inf
    is set)."""
    g = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).to(DEVICE)
    g_in = g.clone()
    found_inf = scalar(0.0)
    inv = scalar(inv_scale)
    nonfinite.unscale_and_check_([g], found_inf, inv)
    check_unscaled(g, g_in, inv, f"{dtype} x {inv_scale}")
    assert found_inf.item() == 1.0


def test_reference_accepts_zero_size_tensors():
    """kernels.reference is the CPU fallback: like the kernels, it must accept zero-size
    tensors in a list. Regression: torch._foreach_norm(inf) raised on an empty tensor."""
    grads = [torch.ones(3, device=DEVICE), torch.empty(0, device=DEVICE)]
    result = reference.nonfinite_check_and_norm(grads)
    assert result.tolist() == [3.0, 0.0]
    found_inf = scalar(0.0)
    reference.unscale_and_check_(grads, found_inf, scalar(0.5))
    assert grads[0].tolist() == [0.5] * 3 and found_inf.item() == 0.0


def test_reference_accepts_one_element_scalars():
    """The launchers take grad_scale / found_inf / inv_scale / norm_sq as one-element fp32
    tensors, 0-d or of shape (1,); the reference, "same signatures and semantics", must too.
    Regression: torch._foreach_mul with a tensor scalar accepts only 0-d tensors."""
    g = [torch.full((4,), 2.0, device=DEVICE)]
    found_inf = scalar(0.0, (1,))
    reference.unscale_and_check_(g, found_inf, scalar(0.5, (1,)))
    assert g[0].tolist() == [1.0] * 4
    norm = reference.nonfinite_check_and_norm(g, grad_scale=scalar(2.0, (1,)))
    assert norm.tolist() == [1.0, 0.0]


def test_unscale_empty_list_is_a_no_op():
    # Like torch._amp_foreach_non_finite_check_and_unscale_, an empty list does nothing.
    found_inf = scalar(0.0)
    nonfinite.unscale_and_check_([], found_inf, scalar(0.5))
    assert found_inf.item() == 0.0


# ----------------------------------------------------------------------------------------------
# Optimizer steps: shared strategy pieces
# ----------------------------------------------------------------------------------------------

# fp32 params update themselves; fp16/bf16 params with fp32 masters; fp16/bf16 params
# without masters (updated in fp32 math, rounded on store).
param_kind_st = st.sampled_from(
    [
        (torch.float32, False),
        (torch.float16, True),
        (torch.bfloat16, True),
        (torch.float16, False),
        (torch.bfloat16, False),
    ]
)


@st.composite
def step_case_st(draw):
    """Common parts of an optimizer-step example."""
    sizes = draw(sizes_st())
    param_dtype, has_master = draw(param_kind_st)
    clip = draw(st.one_of(st.none(), st.sampled_from([0.25, 0.9, 4.0])))
    return {
        "sizes": sizes,
        "param_dtype": param_dtype,
        "has_master": has_master,
        "grad_dtype": draw(st.sampled_from(GRAD_DTYPES)),
        "grad_exp": draw(st.integers(-8, 8)),  # magnitude of the stored (scaled) grads
        "param_exp": draw(st.integers(-4, 3)),
        "grad_scale": draw(st.one_of(st.none(), scale_st)),
        "clip": clip,  # max_norm as a multiple of the actual norm (None: no clipping)
        "found_inf_zero": draw(st.booleans()),  # pass found_inf = 0 (a step that is taken)
        "first_step": draw(st.integers(0, 1000)),
        "same_steps": draw(st.booleans()),  # one step count for all tensors, or one each
        "n_steps": draw(st.integers(1, 3)),
        "use_cache": draw(st.booleans()),
        "maximize": draw(st.booleans()),
        "weight_decay": draw(st.sampled_from([0.0, 0.0, 1e-2, 0.1, 0.5])),
        "scalar_shape": draw(st.sampled_from([(), (1,)])),  # of steps and grad_scale etc.
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def make_params(case, gen):
    """Params (and fp32 masters, with params = masters rounded, as an optimizer keeps them)."""
    params, masters = [], []
    for n in case["sizes"]:
        w = random_values(gen, shape_of(n), torch.float32, case["param_exp"] - 2, case["param_exp"])
        if case["has_master"]:
            masters.append(w)
            params.append(master_rounded(w, case["param_dtype"]))
        else:
            params.append(w.to(case["param_dtype"]))
    return params, (masters if case["has_master"] else None)


def make_steps(case, gen):
    n = len(case["sizes"])
    if case["same_steps"]:
        counts = [case["first_step"]] * n
    else:  # per-tensor counts, many of them 0 (a tensor's first step)
        counts = torch.randint(1, 1001, (n,), generator=gen)
        counts = torch.where(torch.rand(n, generator=gen) < 0.4, 0, counts).tolist()
        counts[0] = case["first_step"]
    return [torch.full(case["scalar_shape"], float(c), device=DEVICE) for c in counts]


def make_grads(case, gen):
    e = case["grad_exp"]
    return [random_values(gen, shape_of(n), case["grad_dtype"], e - 3, e) for n in case["sizes"]]


def grad_extras(case, grads):
    """grad_scale, found_inf, norm_sq and max_norm tensors/values for one step, and the clip
    coefficient as the float64 math states it (from the fp32 norm_sq actually passed)."""
    shape = case["scalar_shape"]
    scale_t = None if case["grad_scale"] is None else scalar(case["grad_scale"], shape)
    found_inf = scalar(0.0, shape) if case["found_inf_zero"] else None
    norm_sq, max_norm, clip_coef = None, 0.0, 1.0
    if case["clip"] is not None:
        norm_sq = nonfinite.nonfinite_check_and_norm(grads, grad_scale=scale_t)[:1]
        norm_sq = norm_sq.reshape(shape)
        norm = math.sqrt(norm_sq.item())
        max_norm = case["clip"] * norm if norm > 0 else 1.0
        clip_coef = min(1.0, max_norm / (norm + 1e-6))
    return scale_t, found_inf, norm_sq, max_norm, clip_coef


def unscaled_grad64(g, case, clip_coef):
    """The grad as the math states it, in float64: g / grad_scale * clip_coef, negated if
    maximizing."""
    g = g.double()
    if case["grad_scale"] is not None:
        g = g / case["grad_scale"]
    g = g * clip_coef
    return -g if case["maximize"] else g


def check_lowp(param, want, scale, k, what):
    """A low-precision param without a master is its fp32 result x rounded once to nearest:
    |round(x) - x| <= half an ulp of the dtype at x, and x is within k fp32 ulps of ``scale``
    of ``want`` (the math, or the reference's fp32 value before its own rounding, which adds
    another half ulp of the dtype): within k fp32 ulps of the scale plus one ulp of the dtype."""
    err = (param.double() - want.double()).abs().reshape(-1)
    mag = torch.maximum(param.double().abs(), want.double().abs()).reshape(-1)
    tol = ulp(mag, param.dtype) + k * ulp(scale.reshape(-1))
    # Past the dtype's largest finite value, rounding to nearest gives +-inf (e.g. an fp16
    # param pushed beyond 65504 by a huge unscaled grad): that is the correct rounded value.
    p64, w64 = param.double().reshape(-1), want.double().reshape(-1)
    overflow = torch.isinf(p64) & (torch.sign(p64) == torch.sign(w64))
    overflow &= w64.abs() >= torch.finfo(param.dtype).max
    bad = ~(err <= tol) & ~overflow
    if bad.any():
        i = int(bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} elements off; first at {i}: got {param.reshape(-1)[i]}, "
            f"expected {want.reshape(-1)[i]}, scale {scale.reshape(-1)[i]}"
        )


# ----------------------------------------------------------------------------------------------
# adam_step
# ----------------------------------------------------------------------------------------------

# Tolerances of the fp32 results, in ulps of each element's scale (module docstring), used
# both against the float64 math and against kernels.reference (same operations in the same
# order, but either side may fuse a multiply-add: torch's CPU kernels are built with FMA,
# Triton contracts on GPUs; and the reference divides max_norm as reciprocal-then-multiply).
# Counting roundings, each <= half an ulp of a magnitude <= the scale (ulp is monotone in
# |x|), plus relative errors of fp32 coefficients (each < 1 ulp: ulp(x) > 2**-24 * |x|):
# * the grad, g * fp32(1/s) * clip (+ fp32(wd) * p): its *relative* error is shared by all
#   elements and reaches ~7 * 2**-24: 1/s and g * (1/s) (2 roundings when s is not a power
#   of two), the clip coefficient (fp32 max_norm, sqrt, + 1e-6, /) and the product by it;
# * exp_avg, m + w * (g - m): 3 roundings, w = fp32(1 - beta1), and w times the grad's
#   error: 6 ulp (largest seen in 800 random examples: 2.7 vs the math, 3 vs the reference);
# * exp_avg_sq, beta2 * v + (1 - beta2) * g * g: squaring doubles the grad's relative error
#   (~14 * 2**-24), which is up to 7 ulp of a scale just above a power of two, on each side
#   (kernel, reference) of the comparison, plus 3 roundings: 16 ulp (seen: 7.8 / 9, with
#   beta2 ~ 0.56, a non-power-of-two loss scale and clipping);
# * the weight, p - (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps): m's error relative to the
#   update's scale, v's halved by sqrt, 6 roundings, and the bias corrections (fp64 from
#   fp32(1 - beta): relative error <= 2**-24, below one ulp, at any step): 8 ulp (seen: 4.0 /
#   4). A real defect (a wrong term, a stale operand, a lost rounding to fp16) is off by far
#   more: 2**13 ulp for one fp16 rounding, ~10**6 for a wrong beta.
ADAM_K = {"exp_avg": 6, "exp_avg_sq": 16, "max_exp_avg_sq": 16, "weight": 8}

adam_hp_st = st.fixed_dictionaries(
    {
        "lr": st.one_of(st.sampled_from([1e-3, 3e-4, 0.1]), st.floats(1e-5, 0.5)),
        "beta1": st.one_of(st.sampled_from([0.0, 0.5, 0.9, 0.95]), st.floats(0.0, 0.99)),
        "beta2": st.one_of(st.sampled_from([0.9, 0.99, 0.999, 0.9999]), st.floats(0.5, 0.9999)),
        "eps": st.sampled_from([1e-8, 1e-6, 1e-3]),
        "decoupled": st.booleans(),
        "amsgrad": st.booleans(),
    }
)


def adam_model(p, g, m, v, vmax, step, hp, case):
    """One Adam/AdamW step in float64 from fp32 state; returns new values and the scales of
    their computations (see the module docstring)."""
    lr, b1, b2, eps, wd = hp["lr"], hp["beta1"], hp["beta2"], hp["eps"], case["weight_decay"]
    p, m, v = p.double(), m.double(), v.double()
    p_old = p
    big = g.abs()  # the grad's scale: the magnitudes of its terms, summed
    if hp["decoupled"]:
        p = p * (1.0 - lr * wd)
    else:
        big = big + (wd * p).abs()
        g = g + wd * p
    m_new = b1 * m + (1.0 - b1) * g
    v_new = b2 * v + (1.0 - b2) * g * g
    m_scale = m.abs() + big  # m + w * (g - m): |g - m| <= |g| + |m|
    v_scale = b2 * v + (1.0 - b2) * big * big
    second = v_new
    vmax_new = None
    if hp["amsgrad"]:
        vmax_new = torch.maximum(vmax.double(), v_new)
        second = vmax_new
    t = step + 1.0
    bc1 = 1.0 - b1**t
    bc2 = 1.0 - b2**t
    denom = second.sqrt() / math.sqrt(bc2) + eps
    p_new = p - (lr / bc1) * m_new / denom
    # The update's error is relative to lr/bc1 * m_scale / denom (m's error is an ulp of
    # m_scale; denom's relative error propagates to at most that).
    p_scale = p_old.abs() + (lr / bc1) * m_scale / denom
    return {
        "p": p_new,
        "m": m_new,
        "v": v_new,
        "vmax": vmax_new,
        "p_scale": p_scale,
        "m_scale": m_scale,
        "v_scale": v_scale,
    }


def adam_state(case, hp, gen, params):
    exp_avgs, exp_avg_sqs, max_sqs = [], [], []
    steps = make_steps(case, gen)
    for p, s in zip(params, steps):
        if s.item() == 0:
            m = torch.zeros(p.shape, device=DEVICE)
            v = torch.zeros(p.shape, device=DEVICE)
        else:
            m = random_values(gen, p.shape, torch.float32, case["grad_exp"] - 4, case["grad_exp"])
            v = (m * m).abs() * 2.0 + 1e-30
        exp_avgs.append(m)
        exp_avg_sqs.append(v)
        max_sqs.append(v * 1.5 if s.item() else torch.zeros_like(v))
    return exp_avgs, exp_avg_sqs, (max_sqs if hp["amsgrad"] else None), steps


def run_adam(fn, params, grads, m, v, steps, masters, vmax, hp, case, extras, cache=None):
    scale_t, found_inf, norm_sq, max_norm, _ = extras
    fn(
        params,
        grads,
        m,
        v,
        steps,
        masters=masters,
        max_exp_avg_sqs=vmax,
        lr=hp["lr"],
        beta1=hp["beta1"],
        beta2=hp["beta2"],
        eps=hp["eps"],
        weight_decay=case["weight_decay"],
        decoupled_weight_decay=hp["decoupled"],
        amsgrad=hp["amsgrad"],
        maximize=case["maximize"],
        grad_scale=scale_t,
        found_inf=found_inf,
        norm_sq=norm_sq,
        max_norm=max_norm,
        cache=cache,
    )


@settings(max_examples=examples(25), **SETTINGS)
@given(case=step_case_st(), hp=adam_hp_st)
def test_adam_step(case, hp):
    gen = generator(case["seed"])
    params, masters = make_params(case, gen)
    exp_avgs, exp_avg_sqs, max_sqs, steps = adam_state(case, hp, gen, params)
    cache = TableCache() if case["use_cache"] else None
    for it in range(case["n_steps"]):
        if masters is None and not all(torch.isfinite(p).all() for p in params):
            # A low-precision param without a master overflowed to inf at the last step
            # (checked there by check_lowp): later steps have nothing meaningful to compare.
            break
        grads = make_grads(case, gen)
        extras = grad_extras(case, grads)
        state = [params, grads, exp_avgs, exp_avg_sqs, steps, masters, max_sqs]
        before = clone_all(state)

        run_adam(adam.adam_step, *state, hp, case, extras, cache)

        ref = clone_all(before)
        run_adam(reference.adam_step, *ref, hp, case, extras)
        assert_lists_bitwise([before[1]], [grads], "grads")  # read-only
        weights = masters if masters is not None else params
        ref_weights = ref[5] if masters is not None else ref[0]
        old_weights = before[5] if masters is not None else before[0]
        for i in range(len(params)):
            what = f"step {it} tensor {i} (size {params[i].numel()})"
            # Step counts advance by exactly one (fp32 integers are exact below 2**24).
            assert steps[i].item() == before[4][i].item() + 1.0, what
            g64 = unscaled_grad64(grads[i], case, extras[4])
            model = adam_model(
                old_weights[i],
                g64,
                before[2][i],
                before[3][i],
                None if max_sqs is None else before[6][i],
                before[4][i].item(),
                hp,
                case,
            )
            pairs = [
                ("exp_avg", exp_avgs[i], ref[2][i], model["m"], model["m_scale"]),
                ("exp_avg_sq", exp_avg_sqs[i], ref[3][i], model["v"], model["v_scale"]),
            ]
            if max_sqs is not None:
                pairs.append(
                    ("max_exp_avg_sq", max_sqs[i], ref[6][i], model["vmax"], model["v_scale"])
                )
            if weights[i].dtype == torch.float32:
                pairs.append(("weight", weights[i], ref_weights[i], model["p"], model["p_scale"]))
            for name, got, want_ref, want64, scale in pairs:
                k = ADAM_K[name]
                assert_within_ulps(got, want64, scale, k, f"{what} {name} vs fp64")
                assert_within_ulps(got, want_ref, scale, k, f"{what} {name} vs reference")
            if masters is not None:
                # Bitwise: the param is its master rounded (tests/comparing.py: master_rounded).
                assert_bitwise(
                    params[i], master_rounded(masters[i], params[i].dtype), f"{what} param"
                )
            elif params[i].dtype != torch.float32:
                scale = model["p_scale"]
                k = ADAM_K["weight"]
                check_lowp(params[i], model["p"], scale, k, f"{what} param vs fp64")
                check_lowp(params[i], ref[0][i], scale, k, f"{what} param vs reference")


# ----------------------------------------------------------------------------------------------
# sgd_step
# ----------------------------------------------------------------------------------------------

# Tolerances as for Adam (ulps of the scale; math and reference alike): the grad's relative
# error (~7 * 2**-24, see above), then the buffer's two products and sum (first step: the
# grad itself), Nesterov's product and sum, and the update's product and difference: 8 ulp
# for both (largest seen in 800 random examples: buffer 2.9 vs the math, 4 vs the reference;
# weight 3.9 / 5).
SGD_K = {"buffer": 8, "weight": 8}

sgd_hp_st = st.fixed_dictionaries(
    {
        "lr": st.one_of(st.sampled_from([0.01, 0.1, 1.0]), st.floats(1e-4, 1.0)),
        "momentum": st.sampled_from([0.0, 0.0, 0.5, 0.9, 0.99]),
        "dampening": st.sampled_from([0.0, 0.0, 0.1, 0.5]),
        "nesterov": st.booleans(),
        "pass_unused_state": st.booleans(),  # with momentum 0: buffers and steps given anyway
    }
)


def sgd_model(p, g, buf, step, hp, case):
    """One SGD step in float64 from fp32 state; new values and the scales of their
    computations."""
    lr, mu, d, wd = hp["lr"], hp["momentum"], hp["dampening"], case["weight_decay"]
    p = p.double()
    # Each scale is the sum of the magnitudes of the terms added along the way.
    big = g.abs() + (wd * p).abs()
    g = g + wd * p
    buf_new = buf_scale = None
    update, update_scale = g, big
    if mu != 0:
        if step == 0:  # the buffer starts as the grad, whatever it held
            buf_new, buf_scale = g, big
        else:
            buf_new = mu * buf.double() + (1.0 - d) * g
            buf_scale = mu * buf.double().abs() + (1.0 - d) * big
        if hp["nesterov"]:
            update = g + mu * buf_new
            update_scale = big + mu * buf_scale
        else:
            update, update_scale = buf_new, buf_scale
    p_new = p - lr * update
    p_scale = p.abs() + lr * update_scale
    return {"p": p_new, "buf": buf_new, "p_scale": p_scale, "buf_scale": buf_scale}


def sgd_state(case, hp, gen, params):
    steps = make_steps(case, gen)
    bufs = []
    for p, s in zip(params, steps):
        if s.item() == 0:
            # Never read on a first step: garbage (NaN, as from torch.empty) must not leak.
            bufs.append(torch.full(p.shape, math.nan, device=DEVICE))
        else:
            e = case["grad_exp"]
            bufs.append(random_values(gen, p.shape, torch.float32, e - 4, e))
    if hp["momentum"] == 0 and not hp["pass_unused_state"]:
        return None, None
    return bufs, steps


def run_sgd(fn, params, grads, bufs, steps, masters, hp, case, extras, cache=None):
    scale_t, found_inf, norm_sq, max_norm, _ = extras
    fn(
        params,
        grads,
        bufs,
        steps,
        masters=masters,
        lr=hp["lr"],
        momentum=hp["momentum"],
        dampening=hp["dampening"],
        weight_decay=case["weight_decay"],
        nesterov=hp["nesterov"],
        maximize=case["maximize"],
        grad_scale=scale_t,
        found_inf=found_inf,
        norm_sq=norm_sq,
        max_norm=max_norm,
        cache=cache,
    )


@settings(max_examples=examples(25), **SETTINGS)
@given(case=step_case_st(), hp=sgd_hp_st)
def test_sgd_step(case, hp):
    gen = generator(case["seed"])
    params, masters = make_params(case, gen)
    bufs, steps = sgd_state(case, hp, gen, params)
    cache = TableCache() if case["use_cache"] else None
    has_momentum = hp["momentum"] != 0
    for it in range(case["n_steps"]):
        if masters is None and not all(torch.isfinite(p).all() for p in params):
            # A low-precision param without a master overflowed to inf at the last step
            # (checked there by check_lowp): later steps have nothing meaningful to compare.
            break
        grads = make_grads(case, gen)
        extras = grad_extras(case, grads)
        state = [params, grads, bufs, steps, masters]
        before = clone_all(state)

        run_sgd(sgd.sgd_step, *state, hp, case, extras, cache)

        ref = clone_all(before)
        run_sgd(reference.sgd_step, *ref, hp, case, extras)
        assert_lists_bitwise([before[1]], [grads], "grads")  # read-only
        if not has_momentum:
            # No buffer and no step count without momentum: what was passed is untouched.
            assert_lists_bitwise(before[2:4], [bufs, steps], "momentum_buffers,steps")
        weights = masters if masters is not None else params
        ref_weights = ref[4] if masters is not None else ref[0]
        old_weights = before[4] if masters is not None else before[0]
        for i in range(len(params)):
            what = f"step {it} tensor {i} (size {params[i].numel()})"
            old_step = before[3][i].item() if has_momentum else None
            if has_momentum:
                assert steps[i].item() == old_step + 1.0, what
            g64 = unscaled_grad64(grads[i], case, extras[4])
            model = sgd_model(
                old_weights[i], g64, before[2][i] if has_momentum else None, old_step, hp, case
            )
            pairs = []
            if has_momentum:
                pairs.append(("buffer", bufs[i], ref[2][i], model["buf"], model["buf_scale"]))
            if weights[i].dtype == torch.float32:
                pairs.append(("weight", weights[i], ref_weights[i], model["p"], model["p_scale"]))
            for name, got, want_ref, want64, scale in pairs:
                k = SGD_K[name]
                assert_within_ulps(got, want64, scale, k, f"{what} {name} vs fp64")
                assert_within_ulps(got, want_ref, scale, k, f"{what} {name} vs reference")
            if masters is not None:
                assert_bitwise(
                    params[i], master_rounded(masters[i], params[i].dtype), f"{what} param"
                )
            elif params[i].dtype != torch.float32:
                scale = model["p_scale"]
                k = SGD_K["weight"]
                check_lowp(params[i], model["p"], scale, k, f"{what} param vs fp64")
                check_lowp(params[i], ref[0][i], scale, k, f"{what} param vs reference")


def test_sgd_first_step_takes_the_grad_and_a_skip_does_not_consume_it():
    g = torch.tensor([1.0, -2.0, 0.5, 3.0], device=DEVICE)
    p = torch.zeros(4, device=DEVICE)
    buf = torch.full((4,), math.nan, device=DEVICE)
    step = scalar(0.0)
    kw = dict(lr=1.0, momentum=0.9, dampening=0.5, weight_decay=0.0)
    sgd.sgd_step([p], [g], [buf], [step], found_inf=scalar(1.0), **kw)
    assert step.item() == 0.0 and p.tolist() == [0.0] * 4 and torch.isnan(buf).all()
    sgd.sgd_step([p], [g], [buf], [step], found_inf=scalar(0.0), **kw)
    # First step: the buffer is the grad itself (no dampening), exactly.
    assert step.item() == 1.0 and buf.tolist() == g.tolist() and p.tolist() == (-g).tolist()
    sgd.sgd_step([p], [g], [buf], [step], **kw)
    # Later: buf = 0.9 * buf + (1 - 0.5) * g = 1.4 g, within the 3 roundings (2 products, 1
    # sum, each half an ulp of a value <= 0.9|g| + 0.5|g|) plus fp32(0.9): 2 ulp.
    torch.testing.assert_close(buf, 1.4 * g, rtol=2 * 2.0**-23, atol=0)
    assert step.item() == 2.0


# ----------------------------------------------------------------------------------------------
# Skipped steps: found_inf != 0 changes no byte
# ----------------------------------------------------------------------------------------------


@settings(max_examples=examples(15), **SETTINGS)
@given(case=step_case_st(), hp=adam_hp_st, flag=st.sampled_from([1.0, 2.0]))
def test_adam_skip_changes_nothing(case, hp, flag):
    gen = generator(case["seed"])
    params, masters = make_params(case, gen)
    exp_avgs, exp_avg_sqs, max_sqs, steps = adam_state(case, hp, gen, params)
    grads = make_grads(case, gen)
    scale_t, _, norm_sq, max_norm, clip = grad_extras(case, grads)
    found_inf = scalar(flag, case["scalar_shape"])  # GradScaler sums per-device flags: 2.0
    state = [params, grads, exp_avgs, exp_avg_sqs, steps, masters, max_sqs]
    if exp_avgs and exp_avgs[0].numel():  # NaN state bits must survive too
        exp_avgs[0].view(-1)[0] = math.nan
    before = clone_all(state)
    extras = (scale_t, found_inf, norm_sq, max_norm, clip)
    run_adam(adam.adam_step, *state, hp, case, extras, TableCache() if case["use_cache"] else None)
    names = "params,grads,exp_avgs,exp_avg_sqs,steps,masters,max_exp_avg_sqs"
    assert_lists_bitwise(before, state, names)
    assert found_inf.item() == flag


@settings(max_examples=examples(15), **SETTINGS)
@given(case=step_case_st(), hp=sgd_hp_st, flag=st.sampled_from([1.0, 2.0]))
def test_sgd_skip_changes_nothing(case, hp, flag):
    gen = generator(case["seed"])
    params, masters = make_params(case, gen)
    bufs, steps = sgd_state(case, hp, gen, params)
    grads = make_grads(case, gen)
    scale_t, _, norm_sq, max_norm, clip = grad_extras(case, grads)
    found_inf = scalar(flag, case["scalar_shape"])
    state = [params, grads, bufs, steps, masters]
    before = clone_all(state)
    extras = (scale_t, found_inf, norm_sq, max_norm, clip)
    run_sgd(sgd.sgd_step, *state, hp, case, extras, TableCache() if case["use_cache"] else None)
    assert_lists_bitwise(before, state, "params,grads,momentum_buffers,steps,masters")
    assert found_inf.item() == flag


# ----------------------------------------------------------------------------------------------
# Edge cases: empty lists, zero-size tensors, invalid input (rejected before anything changes)
# ----------------------------------------------------------------------------------------------


def adam_inputs(sizes=(24, 24, 5), param_dtype=torch.float16, amsgrad=True, seed=0):
    """A valid Adam/AdamW input set (dict of lists) with fp32 masters for low precision."""
    gen = generator(seed)
    masters = [torch.randn(n, generator=gen).to(DEVICE) for n in sizes]
    low = param_dtype != torch.float32
    return {
        "params": [m.to(param_dtype) for m in masters] if low else masters,
        "grads": [torch.randn(n, generator=gen).to(DEVICE, torch.float16) for n in sizes],
        "exp_avgs": [torch.randn(n, generator=gen).to(DEVICE) for n in sizes],
        "exp_avg_sqs": [torch.rand(n, generator=gen).to(DEVICE) for n in sizes],
        "steps": [scalar(3.0) for _ in sizes],
        "masters": masters if low else None,
        "max_exp_avg_sqs": [torch.ones(n, device=DEVICE) for n in sizes] if amsgrad else None,
    }


ADAM_HP = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)


def call_adam(inputs, **kw):
    args = dict(ADAM_HP, decoupled_weight_decay=True, amsgrad=inputs["max_exp_avg_sqs"] is not None)
    args.update(kw)
    adam.adam_step(
        inputs["params"],
        inputs["grads"],
        inputs["exp_avgs"],
        inputs["exp_avg_sqs"],
        inputs["steps"],
        masters=inputs["masters"],
        max_exp_avg_sqs=inputs["max_exp_avg_sqs"],
        **args,
    )


def sgd_inputs(sizes=(24, 24, 5), param_dtype=torch.float16, seed=0):
    gen = generator(seed)
    masters = [torch.randn(n, generator=gen).to(DEVICE) for n in sizes]
    low = param_dtype != torch.float32
    return {
        "params": [m.to(param_dtype) for m in masters] if low else masters,
        "grads": [torch.randn(n, generator=gen).to(DEVICE, torch.bfloat16) for n in sizes],
        "momentum_buffers": [torch.randn(n, generator=gen).to(DEVICE) for n in sizes],
        "steps": [scalar(2.0) for _ in sizes],
        "masters": masters if low else None,
    }


SGD_HP = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-4)


def call_sgd(inputs, **kw):
    args = dict(SGD_HP)
    args.update(kw)
    sgd.sgd_step(
        inputs["params"],
        inputs["grads"],
        inputs["momentum_buffers"],
        inputs["steps"],
        masters=inputs["masters"],
        **args,
    )


def snapshot(inputs: dict) -> dict:
    return {k: None if v is None else [t.clone() for t in v] for k, v in inputs.items()}


def assert_unchanged(inputs: dict, before: dict) -> None:
    for name, lst in before.items():
        if lst is not None:
            for i, (b, a) in enumerate(zip(lst, inputs[name])):
                assert_bitwise(a, b, f"{name}[{i}] after a rejected call")


def transposed_like(t: torch.Tensor) -> torch.Tensor:
    """A dense, non-contiguous view with ``t``'s dtype and number of elements (24 = 4 x 6)."""
    assert t.numel() == 24
    return t.detach().clone().reshape(4, 6).t()


def strided_like(t: torch.Tensor) -> torch.Tensor:
    """A view with ``t``'s values that is not dense: every other element of a buffer."""
    buffer = torch.zeros(2 * t.numel(), dtype=t.dtype, device=t.device)
    buffer[::2] = t.detach().flatten()
    return buffer[::2]


def test_empty_lists_raise_clear_errors():
    with pytest.raises(ValueError, match="empty"):
        call_adam(dict.fromkeys(adam_inputs(), []) | {"masters": None, "max_exp_avg_sqs": None})
    with pytest.raises(ValueError, match="empty"):
        call_sgd(dict.fromkeys(sgd_inputs(), []) | {"masters": None})
    with pytest.raises(ValueError, match="at least one tensor"):
        nonfinite.nonfinite_check_and_norm([])


def test_zero_size_tensors_in_lists():
    for sizes in [(0, 5, 0), (0, 0)]:
        inputs = adam_inputs(sizes)
        ref = snapshot(inputs)
        call_adam(inputs)
        reference.adam_step(
            ref["params"],
            ref["grads"],
            ref["exp_avgs"],
            ref["exp_avg_sqs"],
            ref["steps"],
            masters=ref["masters"],
            max_exp_avg_sqs=ref["max_exp_avg_sqs"],
            decoupled_weight_decay=True,
            amsgrad=True,
            **ADAM_HP,
        )
        for name in ("masters", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
            for got, want in zip(inputs[name], ref[name]):
                # Accuracy is the property tests' business; here every operand is N(0, 1)
                # (|x| < 8), so a scale of 8 and test_adam_step's largest tolerance do.
                assert_within_ulps(got, want, torch.full_like(want, 8.0), 16, name)
        for p, m in zip(inputs["params"], inputs["masters"]):
            assert_bitwise(p, m.half(), "param vs master")
        assert [s.item() for s in inputs["steps"]] == [4.0] * len(sizes)

        inputs = sgd_inputs(sizes)
        before = snapshot(inputs)
        call_sgd(inputs)
        assert [s.item() for s in inputs["steps"]] == [3.0] * len(sizes)
        for i, n in enumerate(sizes):
            if n:
                assert not torch.equal(inputs["masters"][i], before["masters"][i])

    grads = [torch.empty(0, device=DEVICE), torch.ones(3, device=DEVICE, dtype=torch.float16)]
    assert nonfinite.nonfinite_check_and_norm(grads).tolist() == [3.0, 0.0]
    found_inf = scalar(0.0)
    nonfinite.unscale_and_check_(grads, found_inf, scalar(0.25))
    assert grads[1].tolist() == [0.25] * 3 and found_inf.item() == 0.0


ADAM_LISTS = ["params", "grads", "exp_avgs", "exp_avg_sqs", "masters", "max_exp_avg_sqs"]


@pytest.mark.parametrize("name", ADAM_LISTS)
@pytest.mark.parametrize(
    ("relayout", "message"), [(transposed_like, "share one layout"), (strided_like, "gaps")]
)
def test_adam_rejects_mismatched_or_gapped_layouts_and_changes_nothing(name, relayout, message):
    """One tensor laid out unlike the others of its position (a transpose among contiguous
    tensors: elements would pair up wrongly), or not one range of memory (a strided slice)."""
    inputs = adam_inputs()
    inputs[name][1] = relayout(inputs[name][1])
    before = snapshot(inputs)
    with pytest.raises(ValueError, match=message):
        call_adam(inputs)
    assert_unchanged(inputs, before)


@pytest.mark.parametrize("name", ["params", "grads", "momentum_buffers", "masters"])
@pytest.mark.parametrize(
    ("relayout", "message"), [(transposed_like, "share one layout"), (strided_like, "gaps")]
)
def test_sgd_rejects_mismatched_or_gapped_layouts_and_changes_nothing(name, relayout, message):
    inputs = sgd_inputs()
    inputs[name][1] = relayout(inputs[name][1])
    before = snapshot(inputs)
    with pytest.raises(ValueError, match=message):
        call_sgd(inputs)
    assert_unchanged(inputs, before)


@pytest.mark.parametrize("bad_index", [0, 1])
def test_check_and_unscale_reject_non_contiguous_and_change_nothing(bad_index):
    """Mixed dtypes: the launchers work dtype group by dtype group, so the bad tensor may sit
    in a later group than tensors that are fine; still nothing may be written."""
    grads = [
        torch.full((24,), 2.0, dtype=torch.float16, device=DEVICE),
        torch.full((24,), 4.0, dtype=torch.float32, device=DEVICE),
    ]
    grads[0][0] = math.inf  # so that found_inf would be set too
    grads[bad_index] = strided_like(grads[bad_index])
    before = [g.clone() for g in grads]
    with pytest.raises(ValueError, match="gaps"):
        nonfinite.nonfinite_check_and_norm(grads)
    found_inf = scalar(0.0)
    with pytest.raises(ValueError, match="gaps"):
        nonfinite.unscale_and_check_(grads, found_inf, scalar(0.5))
    for i, (g, b) in enumerate(zip(grads, before)):
        assert_bitwise(g, b, f"grads[{i}] after a rejected unscale")
    assert found_inf.item() == 0.0, "found_inf set by a rejected call"


def _wrong_adam_inputs():
    """(description, mutation of a valid input set, error type, message pattern)."""

    def replace(name, index, value):
        def mutate(inputs):
            inputs[name][index] = value(inputs[name][index])

        return mutate

    def replace_all(name, value):
        def mutate(inputs):
            inputs[name] = [value(t) for t in inputs[name]]

        return mutate

    return [
        (
            "exp_avg size",
            replace("exp_avgs", 1, lambda t: torch.zeros(23, device=DEVICE)),
            ValueError,
            "elements",
        ),
        (
            "master size",
            replace("masters", 2, lambda t: torch.zeros(6, device=DEVICE)),
            ValueError,
            "elements",
        ),
        ("grad size", replace("grads", 0, lambda t: t[:-1].clone()), ValueError, "elements"),
        (
            "steps of 2 elements",
            replace("steps", 1, lambda t: torch.zeros(2, device=DEVICE)),
            ValueError,
            "elements",
        ),
        ("grads list too short", lambda inputs: inputs["grads"].pop(), ValueError, "expected"),
        ("fp16 exp_avgs", replace_all("exp_avgs", lambda t: t.half()), TypeError, "float32"),
        (
            "fp64 exp_avg_sq[1]",
            replace("exp_avg_sqs", 1, lambda t: t.double()),
            ValueError,
            "float64",
        ),
        ("bf16 masters", replace_all("masters", lambda t: t.bfloat16()), TypeError, "float32"),
        (
            "fp16 max_exp_avg_sqs",
            replace_all("max_exp_avg_sqs", lambda t: t.half()),
            TypeError,
            "float32",
        ),
        ("int64 steps", replace_all("steps", lambda t: t.long()), TypeError, "float32"),
        ("int32 grads", replace_all("grads", lambda t: t.int()), TypeError, "float16"),
        ("grads of mixed dtypes", replace("grads", 1, lambda t: t.float()), ValueError, "float"),
    ]


@pytest.mark.parametrize(
    "mutate,error,pattern",
    [c[1:] for c in _wrong_adam_inputs()],
    ids=[c[0] for c in _wrong_adam_inputs()],
)
def test_adam_rejects_wrong_sizes_and_dtypes(mutate, error, pattern):
    inputs = adam_inputs()
    mutate(inputs)
    before = snapshot(inputs)
    with pytest.raises(error, match=pattern):
        call_adam(inputs)
    assert_unchanged(inputs, before)


def test_step_launchers_reject_inconsistent_options():
    inputs = adam_inputs(param_dtype=torch.float32)
    before = snapshot(inputs)
    with pytest.raises(ValueError, match="masters"):
        call_adam(inputs | {"masters": [t.clone() for t in inputs["params"]]})
    with pytest.raises(ValueError, match="max_exp_avg_sqs"):
        call_adam(inputs | {"max_exp_avg_sqs": None}, amsgrad=True)
    with pytest.raises(ValueError, match="found_inf"):
        call_adam(inputs, found_inf=torch.zeros((), dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="grad_scale"):
        call_adam(inputs, grad_scale=torch.ones(2, device=DEVICE))
    with pytest.raises(ValueError, match="norm_sq"):
        call_adam(inputs, norm_sq=torch.ones((), dtype=torch.float16, device=DEVICE), max_norm=1.0)
    assert_unchanged(inputs, before)

    inputs = sgd_inputs()
    before = snapshot(inputs)
    with pytest.raises(ValueError, match="momentum"):
        call_sgd(inputs | {"momentum_buffers": None})
    with pytest.raises(TypeError, match="float32"):
        call_sgd(inputs | {"momentum_buffers": [t.half() for t in inputs["momentum_buffers"]]})
    with pytest.raises(ValueError, match="elements"):
        call_sgd(inputs | {"params": inputs["params"][:2] + [inputs["params"][2][:4]]})
    assert_unchanged(inputs, before)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        nonfinite.nonfinite_check_and_norm([torch.ones(3, dtype=torch.float64, device=DEVICE)])


# ----------------------------------------------------------------------------------------------
# Launch counts: constant in the number of tensors
# ----------------------------------------------------------------------------------------------

KERNELS = {
    "adam": adam._adam_kernel,
    "increment_steps": adam._increment_steps_kernel,
    "sgd": sgd._sgd_kernel,
    "check": nonfinite._nonfinite_check_kernel,
    "unscale": nonfinite._unscale_kernel,
}


@pytest.fixture
def launches(monkeypatch):
    """Counts launches of every kernel and records their grids. ``kernel[grid](...)`` calls
    ``kernel.run(..., grid=grid, ...)`` on GPUs (JITFunction) and in the interpreter
    (InterpretedFunction) alike, so wrapping ``run`` on the instance sees every launch."""
    log: list[tuple[str, object]] = []
    for name, kernel in KERNELS.items():
        original = kernel.run

        def counting_run(*args, _name=name, _original=original, **kwargs):
            log.append((_name, kwargs.get("grid")))
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", counting_run)
    return log


def counts(log) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, _ in log:
        out[name] = out.get(name, 0) + 1
    return out


def test_launch_count_is_constant_in_the_number_of_tensors(launches):
    few, many = (5,), (3,) * 300
    per_call = {}
    for sizes in (few, many):
        calls = {}
        inputs = adam_inputs(sizes)
        launches.clear()
        call_adam(inputs)
        calls["adam"] = counts(launches)
        assert launches[0][1] == (len(sizes),), "one program per tensor, all in one launch"

        inputs = sgd_inputs(sizes)
        launches.clear()
        call_sgd(inputs)
        calls["sgd"] = counts(launches)
        launches.clear()
        call_sgd(inputs | {"momentum_buffers": None, "steps": None}, momentum=0.0)
        calls["sgd without momentum"] = counts(launches)

        # Mixed dtypes: one launch per dtype, whatever the number of tensors.
        grads = [g.to(GRAD_DTYPES[i % 3]) for i, g in enumerate(inputs["grads"])]
        launches.clear()
        nonfinite.nonfinite_check_and_norm(grads)
        calls["check"] = counts(launches)
        launches.clear()
        nonfinite.unscale_and_check_(grads, scalar(0.0), scalar(0.5))
        calls["unscale"] = counts(launches)
        per_call[len(sizes)] = calls

    assert per_call[1]["adam"] == {"adam": 1, "increment_steps": 1}
    assert per_call[1]["sgd"] == {"sgd": 1, "increment_steps": 1}
    assert per_call[1]["sgd without momentum"] == {"sgd": 1}
    assert per_call[1]["check"] == {"check": 1}
    assert per_call[300]["check"] == {"check": 3}  # three dtypes
    assert per_call[300]["unscale"] == {"unscale": 3}
    for call in ("adam", "sgd", "sgd without momentum"):
        assert per_call[300][call] == per_call[1][call], call


# ----------------------------------------------------------------------------------------------
# TableCache: tables reused while addresses hold, rebuilt (and correct) when one moves
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def builds(monkeypatch):
    log = []
    original = multi_tensor.LaunchTables.build

    def counting_build(*args, **kwargs):
        log.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(multi_tensor.LaunchTables, "build", staticmethod(counting_build))
    return log


def test_table_cache_adam(builds):
    cache = TableCache()
    inputs = adam_inputs()
    call_adam(inputs, cache=cache)
    tables = cache._tables
    assert len(builds) == 1 and tables is not None
    call_adam(inputs, cache=cache)
    assert cache._tables is tables and len(builds) == 1, "rebuilt for unchanged tensors"

    # A new grad tensor (a new address: the old one stays alive) must rebuild the tables,
    # and the step must read it: bitwise the same as an uncached call on clones.
    old_grad = inputs["grads"][1]
    inputs["grads"][1] = torch.randn(24, generator=generator(1)).to(DEVICE, torch.float16)
    assert inputs["grads"][1].data_ptr() != old_grad.data_ptr()
    twin = snapshot(inputs)
    call_adam(inputs, cache=cache)
    assert cache._tables is not tables and len(builds) == 2
    call_adam(twin)
    for name in ADAM_LISTS + ["steps"]:
        for i, (a, b) in enumerate(zip(inputs[name], twin[name])):
            assert_bitwise(a, b, f"cached {name}[{i}] vs uncached")

    # State lists are re-read when the owner bumps state_version (load_state_dict).
    tables = cache._tables
    inputs["exp_avgs"] = [t.clone() for t in inputs["exp_avgs"]]
    cache.state_version += 1
    twin = snapshot(inputs)
    call_adam(inputs, cache=cache)
    assert cache._tables is not tables
    call_adam(twin)
    for i, (a, b) in enumerate(zip(inputs["exp_avgs"], twin["exp_avgs"])):
        assert_bitwise(a, b, f"exp_avgs[{i}] after a state_version bump")


def test_table_cache_sgd_and_check(builds):
    cache = TableCache()
    inputs = sgd_inputs()
    call_sgd(inputs, cache=cache)
    tables = cache._tables
    call_sgd(inputs, cache=cache)
    assert cache._tables is tables and len(builds) == 1
    inputs["grads"][0] = inputs["grads"][0] * 2  # new address, new values
    twin = snapshot(inputs)
    call_sgd(inputs, cache=cache)
    assert cache._tables is not tables and len(builds) == 2
    call_sgd(twin)
    for name in ("params", "masters", "momentum_buffers", "steps"):
        for i, (a, b) in enumerate(zip(inputs[name], twin[name])):
            assert_bitwise(a, b, f"cached {name}[{i}] vs uncached")

    cache = TableCache()
    builds.clear()
    grads = [torch.ones(5, device=DEVICE), torch.ones(7, device=DEVICE, dtype=torch.bfloat16)]
    assert nonfinite.nonfinite_check_and_norm(grads, cache=cache).tolist() == [12.0, 0.0]
    sub = {k: c._tables for k, c in cache.scratch.items() if isinstance(c, TableCache)}
    assert len(sub) == 2 and len(builds) == 2  # one table per (dtype, alignment) group
    assert nonfinite.nonfinite_check_and_norm(grads, cache=cache).tolist() == [12.0, 0.0]
    assert len(builds) == 2
    old = grads[0]
    grads[0] = torch.full((5,), math.nan, device=DEVICE)
    assert nonfinite.nonfinite_check_and_norm(grads, cache=cache)[1].item() != 0
    assert len(builds) == 3 and old.numel() == 5
    f32, b16 = ("check", torch.float32, False), ("check", torch.bfloat16, False)  # odd sizes
    assert cache.scratch[f32]._tables is not sub[f32]
    assert cache.scratch[b16]._tables is sub[b16]
