"""What users do to a torch.optim optimizer between steps, done to ours (issue 10).

"The optimizer always acts on what the user sees: state, params, dtypes and memory layouts as
torch.optim treats them." For each change below our step either does what ``torch.optim`` does
(checked by running ``torch.optim`` side by side on fp32 copies of the params, fed the same
grads upcast to fp32), or refuses with a clear error (``ValueError``/``RuntimeError``/
``TypeError`` whose message says what is wrong) before anything is written: params, grads,
state and param groups are then exactly as before the call.

Both backends (``"torch"``: the pure-torch reference; ``"triton"``: the fused kernels, through
Triton's interpreter on CPU, see conftest.py) and both storage modes (``flat_buffers=False`` and
``True``) wherever the change applies to both.

Rows (the issue's numbering):
1. state tensors replaced, reset in place, whole per-param dicts replaced or deleted;
2. param groups edited: params list assigned or item-assigned, ``add_param_group``, ``pop``;
3. ``p.data`` given another shape after steps: refused, nothing changed (not broadcast);
4. ``model.float()`` / ``model.half()`` after steps: masters dropped / created from the
   param's current value;
5. tensor betas: work like torch's; invalid ones are refused before anything is written;
6. named params (``[("name", p), ...]``) get the same dtype and duplicate checks as unnamed;
7. ``load_state_dict`` of state of another shape (same numel): refused, optimizer unchanged;
8. memory layouts: channels_last (4-D, 5-D), transposed params, grads with other strides,
   non-dense params.

Tolerance (``assert_close``): rtol=1.3e-6, atol=1e-5, torch's default fp32 tolerance, which
PyTorch's own optimizer tests use between its fused and for-loop implementations and which
tests/test_optimizers.py uses for the same comparison over 20 steps: our kernels round once per
operation in torch's order, with bias corrections in fp64 (torch: Python floats, or fp32 for
tensor betas), so ours and torch's differ by a few ulps per step; the trajectories here are at
most 6 steps of unit-scale values. Every difference these tests look for (a reset moment
ignored, a param not stepped, an update rounded away, a decay applied twice) is at least
lr * 1e-1 = 1e-3, or 1e-4 for the lr=1e-4 test, ten times the tolerance. A low-precision param
must equal its fp32 master rounded exactly (``comparing.master_rounded``).
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from comparing import clone_value, master_rounded, same_state_value, same_value, snapshot
from torch import nn

import fp16_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]
FLAT = [pytest.param(False, id="per_tensor"), pytest.param(True, id="flat")]
RTOL, ATOL = 1.3e-6, 1e-5  # see the module docstring
LOW = (torch.float16, torch.bfloat16)
CLEAR_ERRORS = (ValueError, RuntimeError, TypeError)

# name: (ours, torch's, hyperparameters). SGD with dampening, so that a momentum buffer that
# exists (later steps: buf * momentum + (1 - dampening) * g) and one that does not (first step:
# buf = g) give different results even when the buffer is zero.
OPTIMIZERS = {
    "AdamW": (fp16_triton.AdamW, torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
    "SGD": (
        fp16_triton.SGD,
        torch.optim.SGD,
        {"lr": 0.01, "momentum": 0.9, "dampening": 0.5, "weight_decay": 0.1},
    ),
}
MOMENTS = {"AdamW": ("exp_avg", "exp_avg_sq"), "SGD": ("momentum_buffer",)}


# ------------------------------------------------------------------------------- helpers
def assert_close(actual, expected, msg=None):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=msg)


def param(shape, dtype=torch.float32, seed=0) -> nn.Parameter:
    g = torch.Generator().manual_seed(seed)
    return nn.Parameter(torch.randn(shape, generator=g).to(DEVICE, dtype))


def shadow(p: torch.Tensor) -> nn.Parameter:
    """An fp32 copy of ``p`` with its strides, for torch.optim."""
    return nn.Parameter(p.detach().float().clone(memory_format=torch.preserve_format))


def grad_like(p: torch.Tensor, seed: int, layout: str = "param") -> torch.Tensor:
    """A random grad of ``p``'s shape and dtype, with ``p``'s strides or contiguous."""
    g = torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, p.dtype)
    if layout == "param":
        return torch.empty_like(p, memory_format=torch.preserve_format).copy_(g)
    return g.contiguous()


class Pair:
    """Ours on ``params`` and torch.optim on fp32 shadows of them, stepped side by side.

    ``groups``: lists of indices into ``params`` (default: one group of all of them); params
    in no group are spares that later edits may bring in. ``names``: named params.
    """

    def __init__(self, name, params, backend, flat, groups=None, names=None, **overrides):
        ours_cls, ref_cls, defaults = OPTIMIZERS[name]
        self.name = name
        self.params = list(params)
        self.shadows = [shadow(p) for p in self.params]
        self.kwargs = {**defaults, **overrides}
        groups = groups if groups is not None else [list(range(len(self.params)))]

        def spec(tensors):
            return [
                {"params": [(names[i], tensors[i]) if names else tensors[i] for i in g]}
                for g in groups
            ]

        self.ours = ours_cls(
            spec(self.params), backend=backend, flat_buffers=flat, **clone_value(self.kwargs)
        )
        self.ref = ref_cls(spec(self.shadows), foreach=False, **clone_value(self.kwargs))
        self.seed = 0

    def items(self):
        return list(zip(self.params, self.shadows))

    def set_grads(self, layout="param", assign=False):
        """Fresh random grads for every param (spares too): ours in the param's dtype, torch's
        the same values in fp32. A grad that exists is overwritten in place, as a backward
        after ``zero_grad(set_to_none=False)`` accumulates into it (with flat buffers: the
        steady path, where nothing is re-adopted), unless ``assign``: ``p.grad = g``, with
        ``g`` laid out as ``layout`` says."""
        self.seed += 1
        for i, (p, q) in enumerate(self.items()):
            g = grad_like(p, 1000 * self.seed + i, layout)
            old = p.grad
            if not assign and old is not None and old.shape == g.shape and old.dtype == g.dtype:
                old.copy_(g)
            else:
                p.grad = g
            q.grad = p.grad.detach().float().clone()

    def resync(self, i):
        """Set torch's copy of param ``i`` to the param's current value: for changes after
        which the param itself is the truth (a cast, a master that must be made anew)."""
        with torch.no_grad():
            self.shadows[i].data = (
                self.params[i].detach().float().clone(memory_format=torch.preserve_format)
            )

    def step(self):
        self.ours.step()
        self.ref.step()

    def run(self, steps, layout="param", assign=False):
        for _ in range(steps):
            self.set_grads(layout, assign)
            self.step()
            self.check()

    def check(self):
        """Params (fp32 params, or the masters of low-precision ones) and state match torch's;
        a low-precision param is its master rounded to nearest-even; our state is fp32."""
        for i, (p, q) in enumerate(self.items()):
            state = self.ours.state.get(p, {})
            where = f"param {i} ({p.dtype}, shape {tuple(p.shape)})"
            if p.dtype in LOW and state:
                master = state.get("master_param")
                assert master is not None, f"{where}: no fp32 master"
                assert master.dtype == torch.float32
                assert_close(master, q.detach(), msg=f"{where}: master")
                assert torch.equal(p.detach(), master_rounded(master, p.dtype)), (
                    f"{where}: not master rounded"
                )
            else:
                assert "master_param" not in state, f"{where}: an fp32 param keeps a master"
                assert_close(p.detach().float(), q.detach(), msg=f"{where}: value")
            for key, value in self.ref.state.get(q, {}).items():
                if not isinstance(value, torch.Tensor):
                    continue
                assert key in state, f"{where}: torch has state {key!r}, ours has not"
                ours = state[key]
                assert ours.dtype == torch.float32, f"{where}: {key} is {ours.dtype}"
                if key == "step":  # ours: any one-element tensor
                    ours = ours.reshape(value.shape)
                assert_close(ours, value.float(), msg=f"{where}: state {key!r}")

    def check_state_dict(self):
        """``state_dict()`` shows the state torch's shows (the live values)."""
        ours, ref = self.ours.state_dict()["state"], self.ref.state_dict()["state"]
        assert set(ours) == set(ref)
        for index, saved in ref.items():
            for key, value in saved.items():
                if isinstance(value, torch.Tensor):
                    saved = ours[index][key].float().reshape(value.shape)  # (step: any shape)
                    assert_close(saved, value.float(), msg=f"{index}/{key}")


def assert_unchanged(before, after):
    for i, (a, b) in enumerate(zip(before["params"], after["params"])):
        assert same_value(a, b), f"param {i} changed"
    for i, (a, b) in enumerate(zip(before["grads"], after["grads"])):
        assert (a is None) == (b is None) and (a is None or same_value(a, b)), f"grad {i} changed"
    for i, (a, b) in enumerate(zip(before["state"], after["state"])):
        assert set(a) == set(b), f"state keys of param {i}: {sorted(a)} -> {sorted(b)}"
        for key in a:
            assert same_state_value(key, a[key], b[key]), f"state {key!r} of param {i} changed"
    assert len(before["groups"]) == len(after["groups"]), "param groups added or removed"
    for i, ((ids_a, hp_a), (ids_b, hp_b)) in enumerate(zip(before["groups"], after["groups"])):
        assert ids_a == ids_b, f"params of group {i} changed"
        assert set(hp_a) == set(hp_b), f"keys of group {i} changed"
        for key in hp_a:
            assert same_value(hp_a[key], hp_b[key]), f"group {i}'s {key!r} changed"


def mentions_shape(message: str, shape) -> bool:
    """``message`` names ``shape`` as (3, 4), [3, 4] or torch.Size([3, 4])."""
    inner = r",\s*".join(str(n) for n in shape)
    return re.search(rf"[\[(]{inner}[\])]", message) is not None


def assert_refused(call, opt, params, *words, types=CLEAR_ERRORS):
    """``call()`` raises one of ``types`` whose message contains ``words`` (case-insensitive,
    each a regex), and changes nothing. Returns the message."""
    before = snapshot(opt, params)
    with pytest.raises(types) as info:
        call()
    message = str(info.value)
    for word in words:
        assert re.search(word, message, re.IGNORECASE), f"{word!r} not in: {message}"
    assert_unchanged(before, snapshot(opt, params))
    return message


def two_params():
    """An fp32 matrix and an fp16 vector (masters and no masters in one group)."""
    return [param((3, 4), seed=1), param((5,), torch.float16, seed=2)]


# ------------------------------------------------------------- 1. state changed by the user
def reset_state(pair: Pair, how: str) -> None:
    """Do the same reset to ours and to torch's: moments zeroed, dicts replaced or deleted."""
    moments = MOMENTS[pair.name]
    for i, (p, q) in enumerate(pair.items()):
        if how == "del_state_one" and i != 0:
            continue
        if how == "assign_tensor":  # as in the issue: zeros_like(p), p's dtype
            for key in moments:
                pair.ours.state[p][key] = torch.zeros_like(p)
                pair.ref.state[q][key] = torch.zeros_like(q)
        elif how == "inplace_zero":
            for key in moments:
                pair.ours.state[p][key].zero_()
                pair.ref.state[q][key].zero_()
        elif how == "assign_dict":  # torch's own keys only: no master_param, and no step for SGD
            for state, t in ((pair.ours.state, p), (pair.ref.state, q)):
                new = {key: torch.zeros_like(t, dtype=torch.float32) for key in moments}
                if pair.name != "SGD":
                    new["step"] = pair.ref.state[q]["step"].clone()
                state[t] = new
            pair.resync(i)  # a low-precision param's master is made anew from its value
        elif how in ("del_state", "del_state_one"):
            del pair.ours.state[p]
            del pair.ref.state[q]
            pair.resync(i)
        else:
            raise AssertionError(how)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flat", FLAT)
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
@pytest.mark.parametrize("how", ["assign_tensor", "inplace_zero", "assign_dict", "del_state"])
def test_state_reset_by_the_user_is_what_later_steps_use(backend, flat, name, how):
    """Row 1: moments reset after some steps (a new tensor, in place, a whole new dict in
    torch's keys, the state deleted) are what the next steps start from, as in torch; and
    ``state_dict()`` shows the evolving values, not the reset ones frozen."""
    pair = Pair(name, two_params(), backend, flat)
    pair.run(3)
    reset_state(pair, how)
    pair.check_state_dict()
    for _ in range(3):
        pair.set_grads()
        pair.step()
        pair.check()
        pair.check_state_dict()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flat", FLAT)
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_one_params_state_deleted(backend, flat, name):
    """Row 1: ``del opt.state[p]`` for one param of a group: torch restarts that param (step 1,
    fresh moments). Ours does the same, or, with flat buffers (the params of a group share one
    step count, documented), refuses with a clear error and changes nothing."""
    pair = Pair(name, two_params(), backend, flat)
    pair.run(2)
    reset_state(pair, "del_state_one")
    pair.set_grads()
    if flat:
        try:
            before = snapshot(pair.ours, pair.params)
            pair.ours.step()
        except CLEAR_ERRORS as e:
            assert re.search("step", str(e), re.IGNORECASE), str(e)
            assert_unchanged(before, snapshot(pair.ours, pair.params))
            return
        pair.ref.step()
    else:
        pair.step()
    pair.check()
    pair.run(2)


# ------------------------------------------------------------------ 2. param groups edited
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flat", FLAT)
@pytest.mark.parametrize("how", ["assign_list", "assign_item"])
def test_group_params_replaced_steps_the_new_param_only(backend, flat, how):
    """Row 2: ``group["params"] = [b]`` or ``group["params"][0] = b`` after steps: the next
    steps update b (fresh state) and never the old a, even though a still has a grad and b has
    a's shape and dtype (a flat buffer built for a would fit b)."""
    a, b = param((3, 4), seed=1), param((3, 4), seed=2)
    pair = Pair("AdamW", [a, b], backend, flat, groups=[[0]])
    pair.run(2)
    for opt, new in ((pair.ours, b), (pair.ref, pair.shadows[1])):
        if how == "assign_list":
            opt.param_groups[0]["params"] = [new]
        else:
            opt.param_groups[0]["params"][0] = new
    a_before = a.detach().clone()
    pair.run(3)
    assert torch.equal(a.detach(), a_before), "the param taken out of the group was stepped"
    assert pair.ours.state[b]["step"].item() == 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flat", FLAT)
def test_add_param_group_then_pop_a_group(backend, flat):
    """Row 2: ``add_param_group`` after steps (own lr), then ``param_groups.pop(0)``: the
    popped params are no longer stepped, the others go on like torch's."""
    a, h, c = param((3, 4), seed=1), param((5,), torch.float16, seed=2), param((3, 4), seed=3)
    pair = Pair("AdamW", [a, h, c], backend, flat, groups=[[0, 1]])
    pair.run(2)
    pair.ours.add_param_group({"params": [c], "lr": 0.05})
    pair.ref.add_param_group({"params": [pair.shadows[2]], "lr": 0.05})
    pair.run(2)
    pair.ours.param_groups.pop(0)
    pair.ref.param_groups.pop(0)
    before = [a.detach().clone(), h.detach().clone()]
    pair.run(2)
    assert torch.equal(a.detach(), before[0]) and torch.equal(h.detach(), before[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flat", FLAT)
def test_group_popped_then_a_new_group_of_the_same_size(backend, flat):
    """Row 2: pop the only group, add a new one with another param of the same shape (the new
    group dict may reuse the popped one's id): the new param is stepped, the old one is not."""
    a, c = param((3, 4), seed=1), param((3, 4), seed=3)
    pair = Pair("AdamW", [a, c], backend, flat, groups=[[0]])
    pair.run(2)
    pair.ours.param_groups.pop()
    pair.ref.param_groups.pop()
    pair.ours.add_param_group({"params": [c]})
    pair.ref.add_param_group({"params": [pair.shadows[1]]})
    a_before = a.detach().clone()
    pair.run(2)
    assert torch.equal(a.detach(), a_before)
    assert pair.ours.state[c]["step"].item() == 2


# ----------------------------------------------------------- 3. a param given another shape
RESHAPES = {
    "grow_rows": ((3, 4), lambda w: torch.cat([w, torch.ones(2, 4, dtype=w.dtype)])),
    # (1, 4) state would broadcast into (3, 4): it must be refused all the same
    "grow_broadcastable": ((1, 4), lambda w: torch.cat([w, torch.ones(2, 4, dtype=w.dtype)])),
    "reshape_same_numel": ((3, 4), lambda w: w.reshape(4, 3).clone()),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flat", FLAT)
@pytest.mark.parametrize("change", list(RESHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_param_reshaped_after_steps_is_refused_and_nothing_changes(backend, flat, change, dtype):
    """Row 3: ``p.data = torch.cat([p.data, rows])`` (or another shape of the same numel) after
    steps, with a grad of the new shape: torch's step raises (its state has the old shape);
    ours raises a clear error naming both shapes, and changes nothing."""
    shape, reshape = RESHAPES[change]
    p, other = param(shape, dtype, seed=1), param((5,), seed=2)
    pair = Pair("AdamW", [p, other], backend, flat)
    pair.run(2)
    with torch.no_grad():
        p.data = reshape(p.data)
        pair.resync(0)
    pair.set_grads()
    with pytest.raises(RuntimeError):
        pair.ref.step()  # torch refuses too
    message = assert_refused(pair.ours.step, pair.ours, pair.params)
    assert mentions_shape(message, shape) and mentions_shape(message, p.shape), message


# -------------------------------------------------------------------- 4. the model is cast
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flat", FLAT)
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
@pytest.mark.parametrize("dtype", LOW)
def test_model_float_makes_each_param_its_own_master(backend, flat, name, dtype):
    """Row 4: ``model.float()`` after steps of a low-precision model: each param drops its
    master and is its own master; it trains like a torch.optim fp32 run from its current value
    with the same moments."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(DEVICE, dtype)
    pair = Pair(name, model.parameters(), backend, flat)
    pair.run(3)
    model.float()
    for i in range(len(pair.params)):
        pair.resync(i)
    pair.run(3)  # check(): no master_param for fp32 params, values and moments like torch
    sd = pair.ours.state_dict()["state"]
    assert all("master_param" not in s for s in sd.values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flat", FLAT)
@pytest.mark.parametrize("dtype", LOW)
def test_model_cast_to_low_precision_gets_a_master_from_its_value(backend, flat, dtype):
    """Row 4: ``model.half()`` (or bf16) after the first fp32 step: each param gets an fp32
    master from its current value, so updates of 1e-4 (under half an ulp of params in [1, 2))
    move the master instead of rounding away, and the param is the master rounded."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(DEVICE)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(1, 2)
    pair = Pair("AdamW", model.parameters(), backend, flat, lr=1e-4, weight_decay=0.0)
    pair.run(1)
    model.to(dtype)
    for i in range(len(pair.params)):
        pair.resync(i)
    cast = [p.detach().float().clone() for p in pair.params]
    pair.run(3)  # check(): master like torch's fp32 param, param == master rounded
    for p, start in zip(pair.params, cast):
        master = pair.ours.state[p]["master_param"]
        assert (master - start).abs().max() > 5e-5, "the updates rounded away"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flat", FLAT)
@pytest.mark.parametrize(("src", "dst"), [LOW, LOW[::-1]], ids=["fp16_to_bf16", "bf16_to_fp16"])
def test_cast_between_fp16_and_bf16_makes_the_master_from_the_current_value(
    backend, flat, src, dst
):
    """Row 4, one low precision to the other (``model.to(torch.bfloat16)`` of an fp16 model):
    as for any param that becomes fp16/bf16, the master is made from the param's current value
    (the value the user sees), not kept from before the cast."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(DEVICE, src)
    pair = Pair("AdamW", model.parameters(), backend, flat)
    pair.run(3)
    model.to(dst)
    for i in range(len(pair.params)):
        pair.resync(i)
    pair.run(2)


# ------------------------------------------------------------------------ 5. tensor betas
TENSOR_BETAS = (torch.tensor(0.9), torch.tensor(0.999))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flat", FLAT)
def test_tensor_betas_match_torch(backend, flat):
    """Row 5: betas given as one-element tensors work and match torch.optim's tensor betas."""
    pair = Pair("AdamW", two_params(), backend, flat, betas=TENSOR_BETAS)
    pair.run(4)


BAD_BETAS = {
    "beta1_above_one": (torch.tensor(1.5), torch.tensor(0.999)),
    "beta2_negative": (torch.tensor(0.9), torch.tensor(-0.5)),
    "two_elements": (torch.tensor([0.9, 0.8]), torch.tensor(0.999)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flat", FLAT)
@pytest.mark.parametrize("bad", list(BAD_BETAS))
def test_invalid_tensor_betas_are_refused_before_anything_is_written(backend, flat, bad):
    """Row 5: invalid tensor betas set between steps: the step raises a clear error and writes
    nothing; once fixed, one step is one step (weight decay applied once, as torch's)."""
    pair = Pair("AdamW", two_params(), backend, flat, betas=TENSOR_BETAS)
    pair.run(2)
    pair.set_grads()
    good = pair.ours.param_groups[0]["betas"]
    pair.ours.param_groups[0]["betas"] = clone_value(BAD_BETAS[bad])
    assert_refused(pair.ours.step, pair.ours, pair.params, "beta")
    pair.ours.param_groups[0]["betas"] = good
    pair.step()
    pair.check()


LATER_GROUP_INVALID = [
    ("AdamW", "betas", BAD_BETAS["beta1_above_one"], "beta"),
    ("AdamW", "lr", -0.01, "learning rate|lr"),
    ("SGD", "lr", -0.01, "learning rate|lr"),
    ("SGD", "momentum", -0.5, "momentum"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flat", FLAT)
@pytest.mark.parametrize(("name", "key", "value", "words"), LATER_GROUP_INVALID,
                         ids=[f"{n}-{k}" for n, k, _, _ in LATER_GROUP_INVALID])  # fmt: skip
def test_invalid_value_in_a_later_group_is_refused_before_any_group_is_touched(
    backend, flat, name, key, value, words
):
    """Row 5: a first step with a valid first group and an invalid second one is refused
    before the first group gets anything, state included (not even zeros: a state dict
    saved then would hold it); once fixed, the step is torch's."""
    params = [param((3, 4), seed=1), param((5,), torch.float16, seed=2)]
    pair = Pair(name, params, backend, flat, groups=[[0], [1]])
    pair.set_grads()
    good = pair.ours.param_groups[1][key]
    pair.ours.param_groups[1][key] = clone_value(value)
    assert_refused(pair.ours.step, pair.ours, pair.params, words)
    pair.ours.param_groups[1][key] = good
    pair.step()
    pair.check()


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("bad", list(BAD_BETAS))
def test_invalid_tensor_betas_are_refused_at_construction(name, bad):
    with pytest.raises(CLEAR_ERRORS, match="(?i)beta"):
        getattr(fp16_triton, name)([param((3,))], betas=clone_value(BAD_BETAS[bad]))


# ------------------------------------------------------------------------- 6. named params
@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD"])
def test_named_params_get_the_dtype_and_duplicate_checks(name):
    """Row 6: named params are checked like unnamed ones: only float16/bfloat16/float32 (a
    TypeError naming the dtype), each param once (ValueError); in the constructor and in
    ``add_param_group``."""
    cls = getattr(fp16_triton, name)
    c = nn.Parameter(torch.zeros(3, dtype=torch.complex64, device=DEVICE))
    d = nn.Parameter(torch.zeros(2, dtype=torch.float64, device=DEVICE))
    w = param((3,))
    with pytest.raises(TypeError, match="complex64"):
        cls([c, d], lr=0.01)  # unnamed: the reference behaviour
    with pytest.raises(TypeError, match="complex64"):
        cls([("c", c), ("d", d)], lr=0.01)
    with pytest.raises(TypeError, match="float64"):
        cls([("d", d)], lr=0.01)
    with pytest.raises(ValueError):
        cls([w, w], lr=0.01)
    with pytest.raises(ValueError):
        cls([("a", w), ("b", w)], lr=0.01)
    opt = cls([("w", w)], lr=0.01)
    with pytest.raises(TypeError, match="float64"):
        opt.add_param_group({"params": [("d", d)]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flat", FLAT)
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_named_params_train_like_unnamed(backend, flat, name):
    """Row 6: named fp32 and fp16 params train like torch.optim's named params, and the state
    dict carries the names."""
    pair = Pair(name, two_params(), backend, flat, names=["w", "h"])
    pair.run(3)
    assert pair.ours.state_dict()["param_groups"][0]["param_names"] == ["w", "h"]


# ------------------------------------------------------- 7. state dict of another shape
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flat", FLAT)
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_load_state_dict_of_another_shape_is_refused(backend, flat, name):
    """Row 7: a state dict whose param 2 has state of shape (3, 5) loaded into an optimizer
    whose param 2 has shape (5, 3) (same numel): a clear error naming the param's index and
    both shapes; the optimizer (state and param groups, other lr included) is unchanged and
    trains on."""
    src = Pair(name, [param((2,)), param((4,)), param((3, 5))], backend, flat, lr=0.05)
    src.run(2)
    saved = src.ours.state_dict()
    dst = Pair(name, [param((2,), seed=4), param((4,), seed=5), param((5, 3), seed=6)],
               backend, flat)  # fmt: skip
    dst.run(1)
    message = assert_refused(lambda: dst.ours.load_state_dict(saved), dst.ours, dst.params)
    assert re.search(r"\b2\b", message), f"the param's index is not named: {message}"
    assert mentions_shape(message, (3, 5)) and mentions_shape(message, (5, 3)), message
    dst.run(1)


# ---------------------------------------------------------------------- 8. memory layouts
def layout_param(layout: str, dtype) -> nn.Parameter:
    g = torch.Generator().manual_seed(7)
    if layout == "channels_last":
        t = torch.randn(2, 3, 2, 2, generator=g).to(memory_format=torch.channels_last)
    elif layout == "channels_last_3d":
        t = torch.randn(2, 3, 2, 2, 2, generator=g).to(memory_format=torch.channels_last_3d)
    elif layout in ("transposed", "transposed_data"):
        t = torch.randn(3, 5, generator=g)
        t = t.t() if layout == "transposed" else t
    else:
        raise AssertionError(layout)
    p = nn.Parameter(t.to(DEVICE, dtype))  # .to keeps the strides of a dense tensor
    if layout == "transposed_data":
        p.data = p.data.t()  # before the first step
    assert not p.is_contiguous()
    return p


LAYOUTS = ["channels_last", "channels_last_3d", "transposed", "transposed_data"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flat", FLAT)
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_memory_layouts_match_torch_and_state_follows_the_param(backend, flat, name, layout, dtype):
    """Row 8: params with channels_last (4-D and 5-D) or transposed strides train like
    torch's; the param keeps its strides (torch.optim updates in place), and the moments are
    created with them (``torch.zeros_like(p, memory_format=torch.preserve_format)``, as torch
    does; SGD's momentum_buffer too)."""
    p = layout_param(layout, dtype)
    strides = p.stride()
    pair = Pair(name, [p, param((5,), seed=2)], backend, flat)
    pair.run(3)
    assert p.stride() == strides, f"the param's strides changed: {strides} -> {p.stride()}"
    for key in MOMENTS[name]:
        assert pair.ours.state[p][key].stride() == p.stride(), key


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flat", FLAT)
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_grads_with_other_strides_than_their_param(backend, flat, name, layout):
    """Row 8: ``p.grad = g.contiguous()`` for a channels_last or transposed param: elements
    are matched by index, not by memory order."""
    p = layout_param(layout, torch.float32)
    pair = Pair(name, [p, param((5,), seed=2)], backend, flat)
    pair.run(3, layout="contiguous", assign=True)
    if not flat:  # (flat buffers make grads views of their own)
        assert pair.params[0].grad.is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flat", FLAT)
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_non_dense_param_works_or_is_refused_at_construction(backend, flat, name):
    """Row 8: a param that is a strided slice (``nn.Parameter(big[:, ::2])`` keeps the view's
    strides and storage) either trains like torch's, writing nothing outside its own elements,
    or is refused when the optimizer is built; never later, at some step."""
    big = torch.randn(3, 8, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    p = nn.Parameter(big[:, ::2])
    assert p.stride() == (8, 2)
    between = big[:, 1::2].clone()
    try:
        pair = Pair(name, [p, param((5,), seed=2)], backend, flat)
    except CLEAR_ERRORS as e:
        assert re.search("dense|contiguous|stride", str(e), re.IGNORECASE), str(e)
        return
    pair.run(3)
    assert torch.equal(big[:, 1::2], between), "elements between the param's were written"
    if not flat:  # flat buffers move params into the optimizer's storage (documented)
        assert torch.equal(big[:, ::2], p.detach()), "the param no longer views its storage"


# ----------------------------------------------------------- zero_grad after user changes
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flat", FLAT)
@pytest.mark.parametrize("set_to_none", [False, True])
@pytest.mark.parametrize("how", ["assign_grad", "cast_param"])
def test_zero_grad_zeroes_grads_replaced_since_the_last_step(backend, flat, set_to_none, how):
    """``optimizer.zero_grad()`` after the middle param's grad was replaced (``p.grad = g``) or
    the param cast with its grad (``model.half()``) since the last step: every grad is zeroed
    (or None, as torch's with ``set_to_none=True``; flat buffers zero in place, documented), or
    the next backward would accumulate onto the stale one."""
    params = [param((4,), seed=1), param((4,), seed=2), param((4,), seed=3)]
    pair = Pair("AdamW", params, backend, flat)
    pair.run(1)
    mid = params[1]
    if how == "assign_grad":
        mid.grad = torch.ones_like(mid)
    else:
        with torch.no_grad():
            mid.data = mid.data.half()
            mid.grad = mid.grad.half()
    pair.ours.zero_grad(set_to_none=set_to_none)
    for i, p in enumerate(params):
        if set_to_none and not flat:
            assert p.grad is None, f"grad {i} is not None"
        else:
            assert p.grad is not None and not p.grad.any(), f"grad {i} was not zeroed"


# ---------------------------------------------------------- copies keep all of the above
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flat", FLAT)
def test_deepcopy_after_user_changes_continues_like_torch(backend, flat):
    """A deepcopy of (params, optimizer) taken after a moment reset continues from the reset
    moments, like torch's continued original."""
    pair = Pair("AdamW", two_params(), backend, flat)
    pair.run(2)
    reset_state(pair, "assign_tensor")
    params, ours = copy.deepcopy((pair.params, pair.ours))
    old_params = pair.params
    old_values = [p.detach().clone() for p in old_params]
    pair.params, pair.ours = params, ours
    pair.run(2)
    for p, value in zip(old_params, old_values):  # the copy's steps leave the originals alone
        assert torch.equal(p.detach(), value)
