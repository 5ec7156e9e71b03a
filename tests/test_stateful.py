"""Interleavings of what users do between steps, on ours and on torch.optim side by side (issue 10).

A hypothesis ``RuleBasedStateMachine`` holds our optimizer on a few small params (one 4-D, whose
memory layout changes) and ``torch.optim``'s counterpart on fp32 "shadow" copies of them, and
applies the same user actions to both: steps with fresh random grads (in place or assigned,
some params left without a grad), ``zero_grad``, state tensors replaced or reset or deleted,
param groups edited (a param moved, a group's params replaced, groups added and popped),
params cast to another dtype or memory layout, hyperparameters changed (tensor lr and betas
included) or made invalid, state dict round trips (into the same optimizer and into a fresh
one), deepcopies (continued with the copy and its params). After every action the two agree,
or ours refused with a clear error (ValueError/RuntimeError/TypeError) and changed nothing.

One TestCase per (optimizer, backend, flat_buffers): AdamW, Adam with amsgrad and SGD with
momentum; the "torch" (pure-torch reference) and "triton" (fused kernels, through the
interpreter on CPU) backends; per-tensor and flat storage.

What "agree" means:

- torch.optim runs on fp32 shadows fed ours' grads upcast to fp32. An fp32 param of ours must
  match its shadow; a low-precision one's ``state[p]["master_param"]`` (fp32) must, and the
  param must equal the master rounded to its dtype exactly (``comparing.master_rounded``: fp16
  to nearest-even, bf16 to nearest with ties away from zero). The state (moments, ``step``)
  must match torch's, and is fp32 after every step (``step`` a one-element tensor).
- Tolerance, per step: rtol=1.3e-6, atol=1e-5 (``assert_close``), torch's default fp32
  tolerance, which PyTorch's optimizer tests use between its fused and for-loop
  implementations, as tests/test_optimizers.py does over 20 steps: ours and torch's round once
  per operation in the same order but compute the bias corrections differently (fp64 here),
  a few ulps per step on unit-scale values. After each comparison the shadows and torch's
  state are set to ours' exact values, so errors never accumulate and the tolerance is for
  one step; every wrong behaviour looked for (a replaced tensor ignored, a param not stepped
  or stepped twice, a master not made anew) changes values by about lr = 5e-3 or more.
- A cast (fp32 <-> fp16 <-> bf16) keeps the moments; a param that becomes fp16/bf16 (from
  fp32, and from bf16/fp16 too) gets an fp32 master from its current value, one that becomes
  fp32 drops its master: the shadow is set to the param's new value (``cast_param``, the one
  place that models it). Until the param's next step its master is not compared.
- flat_buffers=True departs from torch as documented (fp16_triton/flat_buffers.py, README
  "Many small tensors"), and only so: once a group has a grad, every param of it is stepped at
  every step, with a zero grad if it has none (the shadow gets a zero grad), ``zero_grad()``
  zeroes in place (the shadow's None grad becomes a zero one), and the params of a group share
  one step count: a step may refuse (clearly, changing nothing) when the step counts of a
  group's params differ or a param was cast since the last step; nothing else.

Run time: 20 runs of at most 40 rules per TestCase (a run averages 4-8 optimizer steps), sized
so that the file stays a small part of the suite's CI budget (the Triton TestCases dominate:
their steps run through the interpreter); under CI the runs are
``exploring.examples(20)`` on the commit's seed (conftest.py). FP16_TRITON_STATEFUL_EXAMPLES and
FP16_TRITON_STATEFUL_STEPS explore more; FP16_TRITON_STATEFUL_SHRINK=1 shrinks a failing run
to a minimal one (it replays the run hundreds of times: minutes with Triton steps), otherwise
the failing run is reported as found.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass

import torch
from comparing import clone_value, master_rounded, same_state_value, same_value, snapshot
from exploring import examples
from hypothesis import HealthCheck, Phase, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from torch import nn

import fp16_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]
RTOL, ATOL = 1.3e-6, 1e-5  # per step; see the module docstring
LOW = (torch.float16, torch.bfloat16)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CLEAR_ERRORS = (ValueError, RuntimeError, TypeError)

EXAMPLES = int(os.environ.get("FP16_TRITON_STATEFUL_EXAMPLES", examples(20)))
STEPS = int(os.environ.get("FP16_TRITON_STATEFUL_STEPS", "40"))
SHRINK = os.environ.get("FP16_TRITON_STATEFUL_SHRINK", "0") != "0"  # see the module docstring
SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    # not Phase.explain: it traces every line run, minutes here
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target]
    + ([Phase.shrink] if SHRINK else []),
    deadline=None,  # Triton steps run through the interpreter: slow, and unevenly so
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Slot 0 is 4-D (its layout changes: contiguous <-> channels_last); slot 3 starts in no group.
SHAPES = [(2, 3, 2, 2), (5,), (3, 4), (2, 4)]
FOUR_D = 0


@dataclass
class Spec:
    ours: type
    ref: type
    kwargs: dict
    moments: tuple[str, ...]  # torch's per-param state tensors besides step
    torch_keys: frozenset  # the keys of torch's per-param state
    hyper: dict  # values the hyperparameter rule sets
    invalid: list  # (key, value, words of the expected message)


_ADAM_HYPER = {
    "lr": [0.005, 0.02, torch.tensor(0.01)],
    "betas": [(0.9, 0.999), (0.8, 0.99), (torch.tensor(0.85), torch.tensor(0.995))],
    "weight_decay": [0.0, 0.1],
}
_ADAM_INVALID = [
    ("betas", (1.5, 0.999), "beta"),
    ("betas", (torch.tensor(0.9), torch.tensor(-0.5)), "beta"),
    ("lr", -0.01, "learning rate|lr"),
    ("weight_decay", -0.1, "weight.decay"),
    ("eps", -1.0, "eps"),
]
SPECS = {
    "AdamW": Spec(
        fp16_triton.AdamW,
        torch.optim.AdamW,
        {"lr": 0.01, "weight_decay": 0.1},
        ("exp_avg", "exp_avg_sq"),
        frozenset({"step", "exp_avg", "exp_avg_sq"}),
        _ADAM_HYPER,
        _ADAM_INVALID,
    ),
    "AdamAmsgrad": Spec(
        fp16_triton.Adam,
        torch.optim.Adam,
        {"lr": 0.01, "amsgrad": True, "weight_decay": 0.05},
        ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
        frozenset({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}),
        _ADAM_HYPER,
        _ADAM_INVALID,
    ),
    "SGD": Spec(
        fp16_triton.SGD,
        torch.optim.SGD,
        {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01},
        ("momentum_buffer",),
        frozenset({"momentum_buffer"}),
        {
            "lr": [0.02, 0.1, torch.tensor(0.05)],
            "momentum": [0.5, 0.9],
            "weight_decay": [0.0, 0.01],
        },
        [
            ("lr", -0.01, "learning rate|lr"),
            ("momentum", -0.5, "momentum"),
            ("weight_decay", -0.1, "weight.decay"),
        ],
    ),
}


# ------------------------------------------------------------------------------- helpers
def assert_close(actual, expected, msg):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=msg)


def fp32_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().clone(memory_format=torch.preserve_format)


def index_of(tensors, t) -> int:
    """Position of ``t`` in ``tensors`` by identity (``list.index`` would compare values)."""
    return next(i for i, x in enumerate(tensors) if x is t)


def assert_unchanged(before, after, flat=False):
    """``flat``: a None grad may have become a zero one (flat buffers' grads never go back to
    None, documented); nothing else may differ."""
    for i, (a, b) in enumerate(zip(before["params"], after["params"])):
        assert same_value(a, b), f"a refused call changed param {i}"
    for i, (a, b) in enumerate(zip(before["grads"], after["grads"])):
        if a is None and b is not None and flat:
            assert not b.any(), f"a refused call gave param {i} a non-zero grad"
            continue
        assert (a is None) == (b is None) and (a is None or same_value(a, b)), f"grad {i} changed"
    for i, (a, b) in enumerate(zip(before["state"], after["state"])):
        assert set(a) == set(b), f"state keys of param {i} changed: {sorted(a)} -> {sorted(b)}"
        for key in a:
            assert same_state_value(key, a[key], b[key]), f"a refused call changed {key!r} of {i}"
    assert len(before["groups"]) == len(after["groups"])
    for (ids_a, hp_a), (ids_b, hp_b) in zip(before["groups"], after["groups"]):
        assert ids_a == ids_b and set(hp_a) == set(hp_b)
        assert all(same_value(hp_a[k], hp_b[k]) for k in hp_a), "a refused call changed a group"


@dataclass
class Slot:
    """One param of ours and its fp32 shadow for torch.optim."""

    p: nn.Parameter
    q: nn.Parameter
    cast: str | None = None  # since its last step: None, "low_to_low" or "other"
    # The dtype ours last made the param's state for (at its last step or a state-dict load):
    # a cast away from it remakes the master from the param's value; back to it, the master
    # goes on wherever it still rounds to the param (the kernels' rule for written params).
    seen_dtype: torch.dtype | None = None


# --------------------------------------------------------------------------- the machine
class UserChangesMachine(RuleBasedStateMachine):
    """See the module docstring. Subclasses set ``name``, ``backend`` and ``flat``."""

    name = "AdamW"
    backend = "torch"
    flat = False

    # ---------------------------------------------------------------- building and views
    @property
    def spec(self) -> Spec:
        return SPECS[self.name]

    def make_ours(self, groups):
        return self.spec.ours(
            groups, backend=self.backend, flat_buffers=self.flat, **clone_value(self.spec.kwargs)
        )

    @initialize(
        dtypes=st.lists(st.sampled_from(DTYPES), min_size=len(SHAPES), max_size=len(SHAPES)),
        channels_last=st.booleans(),
        split=st.booleans(),
        seed=st.integers(0, 2**16),
    )
    def build(self, dtypes, channels_last, split, seed):
        note(f"{self.name}, backend={self.backend}, flat_buffers={self.flat}")
        gen = torch.Generator().manual_seed(seed)
        self.slots = []
        for shape, dtype in zip(SHAPES, dtypes):
            t = torch.randn(shape, generator=gen)
            if len(shape) == 4 and channels_last:
                t = t.contiguous(memory_format=torch.channels_last)
            p = nn.Parameter(t.to(DEVICE, dtype))
            self.slots.append(Slot(p, nn.Parameter(fp32_copy(p))))
        groups = [[0, 1], [2]] if split else [[0, 1, 2]]
        self.ours = self.make_ours([{"params": [self.slots[i].p for i in g]} for g in groups])
        self.ref = self.spec.ref(
            [{"params": [self.slots[i].q for i in g]} for g in groups],
            foreach=False,
            **clone_value(self.spec.kwargs),
        )
        self.seed = seed
        self.orphans: list[tuple[torch.Tensor, torch.Tensor]] = []

    def groups(self) -> list[list[int]]:
        """The slots of each of ours' param groups (torch's groups hold their shadows)."""
        ours = [[index_of([s.p for s in self.slots], p) for p in g["params"]]
                for g in self.ours.param_groups]  # fmt: skip
        ref = [[index_of([s.q for s in self.slots], q) for q in g["params"]]
               for g in self.ref.param_groups]  # fmt: skip
        assert ours == ref, f"param groups differ: ours {ours}, torch's {ref}"
        return ours

    def grouped(self) -> list[int]:
        return [i for g in self.groups() for i in g]

    def spares(self) -> list[int]:
        grouped = set(self.grouped())
        return [i for i in range(len(self.slots)) if i not in grouped]

    def both_groups(self, k):
        return self.ours.param_groups[k], self.ref.param_groups[k]

    def both_states(self, i):
        return (self.ours.state, self.slots[i].p), (self.ref.state, self.slots[i].q)

    def snapshot(self):
        return snapshot(self.ours, [s.p for s in self.slots])

    def refusal_allowed(self) -> bool:
        """flat_buffers' documented refusals: a group's params with different step counts (a
        param without state counts 0), or a param cast since its last step."""
        if not self.flat:
            return False
        for group in self.groups():
            steps = set()
            for i in group:
                step = self.ours.state.get(self.slots[i].p, {}).get("step")
                steps.add(0.0 if step is None else float(step.reshape(-1)[0]))
            if len(steps) > 1:
                return True
        return any(self.slots[i].cast for i in self.grouped())

    def flat_load_refused(self) -> bool:
        """flat_buffers' refusal of a state dict it could not step (checked at load, as at the
        step): a group's params that have a step count hold different ones, or some have one
        and some none."""
        if not self.flat:
            return False
        for group in self.groups():
            steps = [self.ours.state.get(self.slots[i].p, {}).get("step") for i in group]
            counted = {float(step.reshape(-1)[0]) for step in steps if step is not None}
            if len(counted) > 1 or (counted and None in steps):
                return True
        return False

    def load_refused(self, optimizer, state_dict) -> bool:
        """Load ``state_dict`` into ``optimizer`` (ours); where flat buffers refuse it, check
        that the refusal is the documented one and changed nothing, and say so."""
        if not self.flat_load_refused():
            optimizer.load_state_dict(state_dict)
            return False
        before = snapshot(optimizer, [s.p for s in self.slots])
        try:
            optimizer.load_state_dict(state_dict)
        except ValueError as e:
            assert "flat_buffers=True" in str(e), e
            note(f"refused load (flat_buffers): {e}")
        else:
            raise AssertionError("flat buffers loaded step counts they cannot step")
        assert_unchanged(before, snapshot(optimizer, [s.p for s in self.slots]))
        return True

    def resync_shadow(self, i):
        """The shadow takes the param's current value (the param is the truth now)."""
        s = self.slots[i]
        with torch.no_grad():
            s.q.data = fp32_copy(s.p)

    def set_grads(self, data, in_place: bool):
        """Fresh grads for the grouped params (some None), ours in the param's dtype, the
        shadows' the same values in fp32; ``in_place``: written into an existing grad, as a
        backward after ``zero_grad(set_to_none=False)``."""
        groups = self.groups()
        none = {}
        for group in groups:
            mask = data.draw(st.lists(st.sampled_from([False, False, False, True]),
                                      min_size=len(group), max_size=len(group)))  # fmt: skip
            if self.flat and all(mask):
                mask[0] = False  # flat: a group with a grad steps all of its params
            none.update(zip(group, mask))
        contiguous = data.draw(st.booleans(), label="contiguous grad for the 4-D param")
        self.seed += 1
        gen = torch.Generator().manual_seed(self.seed)
        for i in sorted(none):
            s = self.slots[i]
            g = torch.randn(s.p.shape, generator=gen).to(DEVICE, s.p.dtype)
            if not contiguous:
                g = torch.empty_like(s.p, memory_format=torch.preserve_format).copy_(g)
            if none[i]:
                s.p.grad = None
            elif in_place and s.p.grad is not None and s.p.grad.dtype == g.dtype:
                s.p.grad.copy_(g)
            else:
                s.p.grad = g
            s.q.grad = None if s.p.grad is None else fp32_copy(s.p.grad)

    # -------------------------------------------------------------------------- steps
    def _step(self, data, in_place):
        self.set_grads(data, in_place)
        if self.flat:  # every param of a group with a grad is stepped, a zero grad if none
            for i in self.grouped():
                s = self.slots[i]
                if s.q.grad is None:
                    s.q.grad = torch.zeros_like(s.q)
        allowed = self.refusal_allowed()
        before = self.snapshot()
        strides = [s.p.stride() for s in self.slots]
        fresh = [i for i in self.grouped() if not self.ref.state.get(self.slots[i].q)]
        try:
            self.ours.step()
        except CLEAR_ERRORS as e:
            if not allowed:
                raise
            note(f"refused (flat_buffers): {e}")
            assert_unchanged(before, self.snapshot(), flat=True)
            for s in self.slots:  # nothing was stepped: torch's grads are ours again
                s.q.grad = None if s.p.grad is None else fp32_copy(s.p.grad)
            return
        self.ref.step()
        for i in self.grouped():
            s = self.slots[i]
            if s.q.grad is not None:
                s.cast = None
                s.seen_dtype = s.p.dtype
                for key, value in self.ours.state[s.p].items():
                    if isinstance(value, torch.Tensor):
                        assert value.dtype == torch.float32, f"state {key!r} of {i}: {value.dtype}"
                assert self.ours.state[s.p].get("step", torch.zeros(1)).numel() == 1
        for i, (s, stride) in enumerate(zip(self.slots, strides)):
            assert s.p.stride() == stride, f"the step changed param {i}'s strides"
        for i in fresh:  # state created now has its param's strides, as torch's
            s = self.slots[i]
            for key in self.spec.moments if s.q.grad is not None else ():
                value = self.ours.state[s.p].get(key)  # missing: reported by the invariant
                assert value is None or value.stride() == s.p.stride(), f"{key} of param {i}"
        for old, value in self.orphans:  # a deepcopy's steps leave the originals alone
            assert torch.equal(old.detach(), value), "stepping a deepcopy changed the original"
        self.orphans = []

    @rule(data=st.data())
    def step_with_assigned_grads(self, data):
        self._step(data, in_place=False)

    @rule(data=st.data())
    def step_with_accumulated_grads(self, data):
        self._step(data, in_place=True)

    @rule(set_to_none=st.booleans())
    def zero_grad(self, set_to_none):
        self.ours.zero_grad(set_to_none)
        self.ref.zero_grad(set_to_none)
        for i in self.grouped():
            s = self.slots[i]
            if s.p.grad is None:
                assert s.q.grad is None, f"param {i}'s grad is None, torch's is not"
                continue
            assert not s.p.grad.any(), f"param {i}'s grad was not zeroed"
            if s.q.grad is None:
                assert self.flat, f"param {i}'s grad was zeroed where torch's is None"
                s.q.grad = torch.zeros_like(s.q)  # documented: zeroed in place

    # ------------------------------------------------------------------------ state
    @rule(data=st.data())
    def replace_state(self, data):
        have = [i for i in range(len(self.slots)) if self.ref.state.get(self.slots[i].q)]
        if not have:
            return
        i = data.draw(st.sampled_from(have), label="slot")
        how = data.draw(st.sampled_from(["zeros_like", "clone", "inplace_zero", "inplace_scale",
                                         "whole_dict", "delete", "delete_group"]))  # fmt: skip
        key = data.draw(st.sampled_from(self.spec.moments), label="key")
        s = self.slots[i]
        if how == "zeros_like":  # as in the issue: zeros_like(p), in p's dtype and layout
            self.ours.state[s.p][key] = torch.zeros_like(s.p)
            self.ref.state[s.q][key] = torch.zeros_like(s.q)
        elif how == "clone":  # same values, a new tensor: later steps must update it
            self.ours.state[s.p][key] = self.ours.state[s.p][key].clone()
        elif how in ("inplace_zero", "inplace_scale"):
            for state, t in self.both_states(i):
                state[t][key].mul_(0.0 if how == "inplace_zero" else 0.5)
        elif how == "whole_dict":
            for state, t in self.both_states(i):
                state[t] = {
                    k: (torch.zeros_like(v) if k == key else clone_value(v))
                    for k, v in state[t].items()
                }
        else:
            slots = [i]
            if how == "delete_group":
                slots = next((g for g in self.groups() if i in g), [i])
            for j in slots:
                for state, t in self.both_states(j):
                    state.pop(t, None)
                self.resync_shadow(j)  # a lost master is made anew from the param

    # -------------------------------------------------------------------- param groups
    @rule(data=st.data())
    def move_param(self, data):
        groups = self.groups()
        sources = [k for k, g in enumerate(groups) if len(g) > 1]
        if len(groups) < 2 or not sources:
            return
        src = data.draw(st.sampled_from(sources), label="from group")
        dst = data.draw(st.sampled_from([k for k in range(len(groups)) if k != src]), label="to")
        pos = data.draw(st.integers(0, len(groups[src]) - 1), label="position")
        for opt in (self.ours, self.ref):
            t = opt.param_groups[src]["params"].pop(pos)
            opt.param_groups[dst]["params"].append(t)

    @rule(data=st.data())
    def replace_group_param(self, data):
        """``group["params"] = [...]`` (a new list) or ``group["params"][k] = spare``."""
        spares = self.spares()
        if not spares:
            return
        groups = self.groups()
        k = data.draw(st.integers(0, len(groups) - 1), label="group")
        pos = data.draw(st.integers(0, len(groups[k]) - 1), label="position")
        j = data.draw(st.sampled_from(spares), label="spare")
        new_list = data.draw(st.booleans(), label="assign a new list")
        for group, t in ((self.ours.param_groups[k], self.slots[j].p),
                         (self.ref.param_groups[k], self.slots[j].q)):  # fmt: skip
            if new_list:
                params = list(group["params"])
                params[pos] = t
                group["params"] = params
            else:
                group["params"][pos] = t

    @rule(data=st.data())
    def add_param_group(self, data):
        spares = self.spares()
        if not spares:
            return
        chosen = data.draw(st.lists(st.sampled_from(spares), min_size=1, unique=True))
        lr = data.draw(st.sampled_from([None, 0.03]), label="group lr")
        extra = {} if lr is None else {"lr": lr}
        self.ours.add_param_group({"params": [self.slots[j].p for j in chosen], **extra})
        self.ref.add_param_group({"params": [self.slots[j].q for j in chosen], **extra})

    @rule(data=st.data())
    def pop_param_group(self, data):
        groups = self.groups()
        if len(groups) < 2:
            return
        k = data.draw(st.integers(0, len(groups) - 1), label="group")
        forget = data.draw(st.booleans(), label="delete the popped params' state")
        self.ours.param_groups.pop(k)
        self.ref.param_groups.pop(k)
        if forget:
            for j in groups[k]:
                for state, t in self.both_states(j):
                    state.pop(t, None)
                self.resync_shadow(j)

    # ---------------------------------------------------------------- dtypes and layouts
    @rule(data=st.data())
    def cast_param(self, data):
        """``p.data = p.data.to(dtype)`` and the grad with it, as ``model.to(dtype)`` does."""
        i = data.draw(st.integers(0, len(self.slots) - 1), label="slot")
        s = self.slots[i]
        dtype = data.draw(st.sampled_from([d for d in DTYPES if d != s.p.dtype]), label="dtype")
        low_to_low = s.p.dtype in LOW and dtype in LOW
        master = self.ours.state.get(s.p, {}).get("master_param")
        with torch.no_grad():
            s.p.data = s.p.data.to(dtype)
            if s.p.grad is not None:
                s.p.grad = s.p.grad.to(dtype)
        if master is not None and dtype == s.seen_dtype:
            with torch.no_grad():
                written = master_rounded(master, dtype) != s.p.detach()
                s.q.data = torch.where(written, fp32_copy(s.p), master)
        else:
            self.resync_shadow(i)
        s.q.grad = None if s.p.grad is None else fp32_copy(s.p.grad)
        if s.cast != "low_to_low":
            s.cast = "low_to_low" if low_to_low else "other"

    @rule(channels_last=st.booleans())
    def change_layout(self, channels_last):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        for t in (self.slots[FOUR_D].p, self.slots[FOUR_D].q):
            t.data = t.data.contiguous(memory_format=fmt)

    # ---------------------------------------------------------------- hyperparameters
    @rule(data=st.data())
    def set_hyperparameter(self, data):
        k = data.draw(st.integers(0, len(self.ours.param_groups) - 1), label="group")
        key = data.draw(st.sampled_from(sorted(self.spec.hyper)), label="key")
        value = data.draw(st.sampled_from(self.spec.hyper[key]), label="value")
        for group in self.both_groups(k):
            group[key] = clone_value(value)

    @precondition(lambda self: not self.refusal_allowed())
    @rule(data=st.data())
    def step_with_an_invalid_hyperparameter(self, data):
        """Refused, naming what is wrong, before anything is written; then fixed."""
        self.set_grads(data, in_place=data.draw(st.booleans()))
        k = data.draw(st.integers(0, len(self.ours.param_groups) - 1), label="group")
        key, value, words = data.draw(st.sampled_from(self.spec.invalid), label="invalid")
        group = self.ours.param_groups[k]
        good = group[key]
        group[key] = clone_value(value)
        before = self.snapshot()
        try:
            self.ours.step()
        except CLEAR_ERRORS as e:
            assert re.search(words, str(e), re.IGNORECASE), f"unclear: {e}"
        else:
            raise AssertionError(f"a step with {key}={value!r} was not refused")
        finally:
            group[key] = good
        before["groups"][k][1][key] = good  # the only change: the fix above
        assert_unchanged(before, self.snapshot(), flat=self.flat)
        for s in self.slots:  # flat: a None grad that became a zero one
            if s.p.grad is not None and s.q.grad is None:
                s.q.grad = fp32_copy(s.p.grad)

    # ------------------------------------------------------------ state dicts and copies
    def state_dict_loadable(self) -> bool:
        """torch's state_dict() raises for state of params in no group, and a low-to-low cast
        before any step leaves a master that no state dict can tell is stale."""
        spares = [self.slots[i] for i in self.spares()]
        return not any(s.q in self.ref.state or s.p in self.ours.state for s in spares) and not any(
            s.cast == "low_to_low" for s in self.slots
        )

    def check_state_dicts_agree(self, ours, ref):
        assert set(ours["state"]) == set(ref["state"])
        for index, saved in ref["state"].items():
            for key, value in saved.items():
                if isinstance(value, torch.Tensor):
                    assert_close(ours["state"][index][key].float(), value.float(), f"{index}/{key}")

    @precondition(lambda self: self.state_dict_loadable())
    @rule()
    def load_own_state_dict(self):
        ours, ref = self.ours.state_dict(), self.ref.state_dict()
        self.check_state_dicts_agree(ours, ref)
        if self.load_refused(self.ours, ours):
            return
        self.ref.load_state_dict(ref)
        self.note_loaded()

    def note_loaded(self):
        """After a load, ours' state is made for the params' current dtypes; a loaded master of
        a param cast since its last step goes on wherever it still rounds to the param."""
        for s in self.slots:
            if s.p not in self.ours.state:
                continue
            s.seen_dtype = s.p.dtype
            master = self.ours.state[s.p].get("master_param")
            if s.cast and master is not None:
                with torch.no_grad():
                    written = master_rounded(master, s.p.dtype) != s.p.detach()
                    s.q.data = torch.where(written, fp32_copy(s.p), master)

    @precondition(lambda self: self.state_dict_loadable())
    @rule()
    def load_state_dict_into_a_fresh_optimizer(self):
        saved = self.ours.state_dict()
        self.check_state_dicts_agree(saved, self.ref.state_dict())
        groups = [
            {**{k: clone_value(v) for k, v in g.items() if k != "params"}, "params": g["params"]}
            for g in self.ours.param_groups
        ]
        fresh = self.make_ours(groups)
        if self.load_refused(fresh, saved):
            return
        self.ours = fresh
        self.note_loaded()

    @rule()
    def deepcopy_and_continue_with_the_copy(self):
        params = [s.p for s in self.slots]
        new_params, self.ours = copy.deepcopy((params, self.ours))
        self.orphans = [(p, p.detach().clone()) for p in params]
        for s, p in zip(self.slots, new_params):
            s.p = p
            # nn.Parameter.__deepcopy__ leaves the grad behind: the shadow's grad follows
            s.q.grad = None if p.grad is None else fp32_copy(p.grad)

    # ------------------------------------------------------------------------- checks
    @invariant()
    def ours_agrees_with_torch(self):
        """Params and state agree (see the module docstring); then the shadows and torch's
        state take ours' exact values, so that the tolerance is for one step."""
        if not hasattr(self, "slots"):
            return
        for k, g in enumerate(self.ours.param_groups):
            for key in self.spec.hyper:
                assert same_value(g[key], self.ref.param_groups[k][key]), f"group {k}: {key}"
        for i, s in enumerate(self.slots):
            where = f"param {i} ({s.p.dtype}, {tuple(s.p.shape)}, cast: {s.cast})"
            state = self.ours.state.get(s.p, {})
            ref_state = self.ref.state.get(s.q, {})
            master = state.get("master_param")
            if s.cast:  # until its next step, the param is its shadow's rounding
                assert torch.equal(s.p.detach(), s.q.detach().to(s.p.dtype)), f"{where}: value"
            elif s.p.dtype in LOW and master is not None:
                assert master.dtype == torch.float32, f"{where}: master is {master.dtype}"
                assert_close(master, s.q.detach(), f"{where}: master")
                assert torch.equal(s.p.detach(), master_rounded(master, s.p.dtype)), (
                    f"{where}: not rounded"
                )
            else:
                assert s.p.dtype in LOW or master is None, f"{where}: an fp32 param has a master"
                assert_close(s.p.detach().float(), s.q.detach(), f"{where}: value")
            ref_keys = {k for k, v in ref_state.items() if isinstance(v, torch.Tensor)}
            ours_keys = {k for k in state if k in self.spec.torch_keys}
            assert ours_keys == ref_keys, f"{where}: state {sorted(ours_keys)}, torch's {ref_keys}"
            if s.p.dtype in LOW and not s.cast and ref_keys:
                assert master is not None, f"{where}: stepped, but no master"
            for key in ref_keys:
                ours_value = state[key].float()
                if key == "step":  # ours: any one-element tensor
                    ours_value = ours_value.reshape(ref_state[key].shape)
                assert_close(ours_value, ref_state[key].float(), f"{where}: {key}")
            # resync: one step's tolerance at a time
            with torch.no_grad():
                for key in ref_keys:
                    ref_state[key].copy_(state[key].reshape(ref_state[key].shape))
                if not s.cast:
                    use_master = s.p.dtype in LOW and master is not None
                    s.q.copy_(master if use_master else s.p.detach())


def _test_case(name: str, backend: str, flat: bool):
    attrs = {"name": name, "backend": backend, "flat": flat}
    storage = "Flat" if flat else "PerTensor"
    machine = type(f"{name}{backend.title()}{storage}Machine", (UserChangesMachine,), attrs)
    case = machine.TestCase
    case.settings = SETTINGS
    return f"Test{name}{backend.title()}{storage}", case


for _name in SPECS:
    for _backend in BACKENDS:
        for _flat in (False, True):
            _case_name, _case = _test_case(_name, _backend, _flat)
            globals()[_case_name] = _case
del _case  # pytest would collect it a second time under this name
