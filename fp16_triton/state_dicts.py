"""``FusedOptimizer``'s state dicts: torch's layout out, torch's or ours in, checked whole
before anything changes (the per-param rules of what loads: ``param_state.py``)."""

from __future__ import annotations

from typing import Any

import torch

from .flat_policy import adopted_params, check_adoption
from .masters import MASTER, REMAINDER, fp32_master

__all__ = ["StateDicts"]


class StateDicts:
    """Mixin of ``FusedOptimizer``: ``state_dict`` and ``load_state_dict``."""

    def state_dict(self) -> dict[str, Any]:
        """torch's layout: ``{"state": {index: {...}}, "param_groups": [...]}``.

        State tensors are torch's (``step``, ``exp_avg``, ...) as kept (fp32; Adam's moments
        in its ``state_dtype``), plus ``master_param`` for low-precision params with masters.
        ``step`` is a CPU fp32 tensor, as in ``torch.optim``'s default (non-fused) optimizers,
        so the dict loads into those (torch casts the moments to its params' dtype).
        """
        self._settle_remainders()
        sd = super().state_dict()
        # torch packs the live per-param dicts: copy each (as a plain dict) before replacing
        # its step; groups' params lists become plain lists too.
        sd["state"] = {index: dict(s) for index, s in sd["state"].items()}
        params = [p for group in self.param_groups for p in group["params"]]
        for index, s in sd["state"].items():
            if REMAINDER in s:  # saved as the fp32 master: the same checkpoint as True's
                master = fp32_master(params[index], s)
                del s[REMAINDER]
                if master is not None:
                    s[MASTER] = master
        for s in sd["state"].values():
            if isinstance(s.get("step"), torch.Tensor):
                s["step"] = s["step"].detach().to("cpu", torch.float32, copy=True)
        for group in sd["param_groups"]:
            group["params"] = list(group["params"])
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this optimizer or of its ``torch.optim`` counterpart.

        Everything is checked before anything changes: the number of groups and of params
        per group, and each state tensor's shape against its param's. State is kept in fp32
        (or the dtype a group option such as Adam's ``state_dtype`` names, which loading does
        not override: ``_kept_on_load``) on the param's device with the param's strides
        (torch would cast it to the param's dtype and lose the fp32 precision of fp16 runs).
        Mapping from torch: a low-precision param without ``master_param`` gets its master
        from the current param value; missing state a subclass can derive (SGD's ``step``) is
        derived. ``master_weights`` is this optimizer's, not the saved one: a saved fp32
        master loads into ``"remainder"`` (converted at the next step, from the params as they
        are then, so the model may be loaded before or after) and the other way round.
        """
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():  # as torch's
            result = pre_hook(self, state_dict)
            state_dict = state_dict if result is None else result
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError("a state dict needs the keys 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, this optimizer "
                f"has {len(self.param_groups)}"
            )
        for i, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    f"loaded state dict's parameter group {i} has {len(saved['params'])} "
                    f"params, this optimizer's has {len(group['params'])}"
                )
        # The groups as they will be after loading: the saved hyperparameters decide how the
        # saved state is read (momentum on or off, masters or not) and must be valid.
        merged_groups = []
        for group, saved in zip(self.param_groups, saved_groups):
            merged = dict(group)
            kept = ("params", "param_names", "master_weights", *self._kept_on_load)
            merged.update({k: v for k, v in saved.items() if k not in kept})
            self._check_hyperparameters(merged)
            self._check_masters(merged, group["params"])
            merged_groups.append(merged)
        id_to_param = {}
        id_to_group = {}
        for group, merged, saved in zip(self.param_groups, merged_groups, saved_groups):
            for p, saved_id in zip(group["params"], saved["params"]):
                id_to_param[saved_id] = p
                id_to_group[saved_id] = merged
        new_state: dict[torch.Tensor, dict[str, Any]] = {}
        for key, saved_state in state_dict["state"].items():
            if key not in id_to_param:
                raise ValueError(f"loaded state refers to param {key!r}, which no group has")
            p = id_to_param[key]
            new_state[p] = self._import_state(p, id_to_group[key], saved_state, key)
        if self.flat_buffers:  # a flat bucket's params share one step count: refused here,
            # not at every later step (a state dict of a run without flat buffers in which
            # some params missed steps)
            for group in self.param_groups:
                adopted = adopted_params(group["params"])
                check_adoption(adopted, group, self.param_groups, new_state, self._describe)
        # Everything checked: now change.
        for group, merged in zip(self.param_groups, merged_groups):
            group.update({k: v for k, v in merged.items() if k != "params"})
        self.state.clear()
        self.state.update(new_state)
        self._groups.clear()
        self._remember_dtypes(new_state)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)
