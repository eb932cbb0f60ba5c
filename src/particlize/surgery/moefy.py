"""The ``moefy`` verb: a dense FFN becomes a mixture of experts whose tokens run only their top-k experts.

``Step("moefy", "<ffn>.neurons", {"experts": [[neuron indices], ...], "active": k, "router_hidden": h})``
replaces the FFN at ``<ffn>`` (the module holding its up / gate projections: ``intermediate`` of a BERT
layer, ``mlp`` of a Llama layer or a DiT block) by an `ExpertFFN` with those experts (equal sizes, a
partition of the neurons), ``k`` active per token and a router (a Linear, or a 2-layer MLP of ``h`` hidden
units). Where the down projection lives outside ``<ffn>`` (BERT's ``output.dense``) it moves into the
`ExpertFFN` (as ``down``) and an ``nn.Identity`` takes its place. Replaying the step builds the same
structure with the same shapes; the router weights, like every weight, come back from the safetensors.

`moefy_model` applies the steps to a copy of a model and records them in its plan; how experts are found
and routers trained is `particlize.moe`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import decompose
from ..adapters import moe as _moe_adapter  # noqa: F401  (registers the adapter that places experts)
from ..errors import PlanError, UnsupportedModelError
from ..particles import InputGate, ParticleGroup, ParticleMap
from ..plan import Step, model_plan, register_verb, run, set_provenance
from ._experts import ExpertFFN, find_activation

SUFFIX = ".neurons"


@dataclass(frozen=True)
class FFNLayout:
    """Where a dense FFN's parts live: the container path, its up (and gate) Linears' attribute names, the
    down Linear's path and whether it sits inside the container."""

    container: str
    up: str
    gate: str | None
    down: str
    down_inside: bool


def ffn_layout(pm: ParticleMap, g: ParticleGroup) -> FFNLayout:
    """The layout of the FFN whose neurons are ``g``, or `UnsupportedModelError` saying why it cannot be
    made a mixture of experts."""
    if g.kind != "neuron" or not g.name.endswith(SUFFIX) or not isinstance(g.gate, InputGate):
        raise UnsupportedModelError(f"{g.name!r} is not the neurons of a feed-forward layer; moefy FFN neuron groups")
    cpath = g.name[: -len(SUFFIX)]
    model = pm.model
    ups = [s.name.rpartition(".")[0] for s in g.writers if s.name.endswith(".weight")]
    ok = ups and all(isinstance(model.get_submodule(u), nn.Linear) and u.rpartition(".")[0] == cpath for u in ups)
    down = g.gate.module
    if not ok or len(ups) > 2 or not isinstance(model.get_submodule(down), nn.Linear):
        raise UnsupportedModelError(
            f"{g.name!r}: moefy needs Linear up (and gate) projections inside {cpath!r} and a Linear down "
            "projection (BERT, Llama/Qwen2, DiT FFNs); this FFN is built differently"
        )
    if find_activation(model.get_submodule(cpath)) is None:
        raise UnsupportedModelError(f"{cpath!r} has no single activation module; moefy cannot rebuild this FFN")
    names = [u.rpartition(".")[2] for u in ups]
    inside = down.rpartition(".")[0] == cpath
    return FFNLayout(cpath, names[-1], names[0] if len(names) == 2 else None, down, inside)


class Moefy:
    """``Step("moefy", group, {"experts": [[indices], ...], "active": k, "router_hidden": h})``."""

    name = "moefy"

    def joins(self, pm: ParticleMap, run: Sequence[Step], step: Step) -> bool:
        # one FFN per step; several FFNs change together (no step renames another's group)
        return step.group not in {s.group for s in run}

    def apply(self, pm: ParticleMap, steps: Sequence[Step], *, replay: bool = False) -> nn.Module:
        for s in steps:
            self._one(pm, s, replay)
        return pm.model

    def _one(self, pm: ParticleMap, step: Step, replay: bool) -> None:
        g = pm[step.group]
        lay = ffn_layout(pm, g)
        experts, active, hidden = _args(step, g.size)
        model = pm.model
        container = model.get_submodule(lay.container)
        up, down = getattr(container, lay.up), model.get_submodule(lay.down)
        gate = getattr(container, lay.gate) if lay.gate else None
        names = {"up": lay.up, "down": lay.down.rpartition(".")[2] if lay.down_inside else "down"}
        if gate is not None:
            names["gate"] = lay.gate
        if not lay.down_inside and hasattr(container, "down"):
            raise UnsupportedModelError(f"{lay.container!r} already has a 'down' attribute; moefy cannot move "
                                        f"{lay.down!r} into it")
        new = ExpertFFN(up.in_features, down.out_features, len(experts), len(experts[0]), active,
                        act=find_activation(container), names=names, gated=gate is not None,
                        up_bias=up.bias is not None, down_bias=down.bias is not None, router_hidden=hidden)
        new.to(device=up.weight.device, dtype=up.weight.dtype)
        if not replay:
            perm = torch.tensor([i for e in experts for i in e], device=up.weight.device)
            with torch.no_grad():
                for src, dst in ((up, new.linear("up")), (gate, new.linear("gate"))):
                    if src is not None and dst is not None:
                        dst.weight.copy_(src.weight[perm])
                        if src.bias is not None:
                            dst.bias.copy_(src.bias[perm])
                new_down = new.linear("down")
                new_down.weight.copy_(down.weight[:, perm])
                if down.bias is not None:
                    new_down.bias.copy_(down.bias)
        _set_module(model, lay.container, new)
        if not lay.down_inside:
            _set_module(model, lay.down, nn.Identity())

    def carry(self, pm: ParticleMap, steps: Sequence[Step], model: nn.Module) -> ParticleMap:
        return decompose(model, recipe=pm.recipe, seq_len=pm.seq_len)


def _args(step: Step, n: int) -> tuple[list[list[int]], int, int]:
    experts = step.args.get("experts")
    if not isinstance(experts, (list, tuple)) or not experts or not all(isinstance(e, (list, tuple)) for e in experts):
        raise PlanError(f"moefy step for {step.group!r} needs args {{'experts': [[neuron indices], ...], 'active': k}}")
    experts = [[int(i) for i in e] for e in experts]
    flat = sorted(i for e in experts for i in e)
    if flat != list(range(n)) or len({len(e) for e in experts}) != 1:
        raise PlanError(f"moefy step for {step.group!r}: the experts must be equal-sized and partition the {n} "
                        "neurons (each index 0..n-1 once)")
    active = int(step.args.get("active", len(experts)))
    if not 1 <= active <= len(experts):
        raise PlanError(f"moefy step for {step.group!r}: active={active} must be between 1 and {len(experts)} experts")
    hidden = int(step.args.get("router_hidden", 0))
    if hidden < 0:
        raise PlanError(f"moefy step for {step.group!r}: router_hidden must be >= 0, got {hidden}")
    return experts, active, hidden


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def moefy_steps(partition: Mapping[str, Sequence[Sequence[int]]], active: int, router_hidden: int = 0) -> list[Step]:
    """``moefy`` steps for ``{neuron group: [[neuron indices of expert 0], ...]}``."""
    return [Step("moefy", name, {"experts": [sorted(int(i) for i in e) for e in experts], "active": int(active),
                                 "router_hidden": int(router_hidden)}) for name, experts in partition.items()]


def moefy_model(pm: ParticleMap, partition: Mapping[str, Sequence[Sequence[int]]], active: int,
                router_hidden: int = 0) -> ParticleMap:
    """The map of a copy of ``pm.model`` whose FFNs ``partition`` names are mixtures of experts (routers
    freshly initialised: train them with `particlize.moe`); the copy records the steps in its plan."""
    steps = moefy_steps(partition, active, router_hidden)
    model = copy.deepcopy(pm.model)
    out = run(pm.rebind(model), steps)
    set_provenance(model, pm.recipe, model_plan(pm.model) + steps)
    return out


MOEFY = register_verb(Moefy())
