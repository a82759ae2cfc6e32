"""Optimizer state keyed by parameter name, so a checkpoint resumes under any strategy.

    torch optimizer.state_dict()                    by-name (what trainer_state.pt holds)
    {"state": {0: {...}, 1: {...}},       to_named   {"format": NAMED_FORMAT,
     "param_groups": [{..., "params": [0, 1]}]} ──►   "state": {"<param name>": {...}},
                                          ◄──         "param_groups": [{..., "params": ["<name>", ...]}]}
                                          from_named

Names are the ShiraModel's ``named_parameters()`` names, the same under DDP, FSDP2 and
DeepSpeed; state tensors are whole (unsharded) CPU tensors. Each strategy converts its own
engine's state to and from this form (DTensor shards, ZeRO partitions), so a ZeRO-3 run
resumes as one process and the other way round with Adam's moments intact.
"""

from __future__ import annotations

from typing import Any

NAMED_FORMAT = "shira_dist.optimizer_by_name/1"


def is_named(state: dict) -> bool:
    return state.get("format") == NAMED_FORMAT


def to_named(state: dict, names: list[str]) -> dict:
    """torch's index-keyed ``optimizer.state_dict()`` -> by-name; ``names[i]`` is parameter i."""
    index_to_name: dict[int, str] = {}
    groups = []
    for group in state["param_groups"]:
        for index in group["params"]:
            if index >= len(names):
                raise ValueError(f"optimizer parameter index {index} has no name (got {len(names)} names)")
            index_to_name[index] = names[index]
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": [names[i] for i in group["params"]]})
    return {"format": NAMED_FORMAT, "param_groups": groups,
            "state": {index_to_name[i]: dict(s) for i, s in state["state"].items()}}


def from_named(named: dict, names: list[str], current_groups: list[dict[str, Any]]) -> dict:
    """By-name -> the index-keyed dict ``optimizer.load_state_dict`` takes.

    ``names``: this optimizer's parameters in order (``current_groups`` its param_groups,
    whose sizes must match the saved groups). Raises ValueError naming the first parameter
    the saved state lacks or has in excess (a different adapter or trainable set).
    """
    if not is_named(named):
        raise ValueError(f"optimizer state format {named.get('format')!r} is not {NAMED_FORMAT!r}")
    saved_names = [n for g in named["param_groups"] for n in g["params"]]
    missing = [n for n in names if n not in set(saved_names)]
    extra = [n for n in saved_names if n not in set(names)]
    if missing or extra:
        what = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which this run does not train"
        raise ValueError(f"the checkpoint's optimizer state {what} ({len(missing)} missing, {len(extra)} extra): "
                         "resume with the same adapter targets and modules_to_save")
    if len(named["param_groups"]) != len(current_groups):
        raise ValueError(f"the checkpoint's optimizer has {len(named['param_groups'])} parameter groups, "
                         f"this run's has {len(current_groups)}")
    index = {n: i for i, n in enumerate(names)}
    groups = [{**{k: v for k, v in saved.items() if k != "params"}, "params": [index[n] for n in cur_names]}
              for saved, cur_names in zip(named["param_groups"], _group_names(current_groups, names))]
    return {"state": {index[n]: s for n, s in named["state"].items()}, "param_groups": groups}


def _group_names(groups: list[dict[str, Any]], names: list[str]) -> list[list[str]]:
    out, start = [], 0
    for group in groups:
        out.append(names[start:start + len(group["params"])])
        start += len(group["params"])
    return out
