"""Physical surgery: remove particles from a model, producing a genuinely smaller dense model.

Each slice of each group is cut with ``index_select`` on the original indices (so groups cutting the
same tensor along different dimensions compose), module shape attributes are refreshed, and the
adapter's ``on_prune`` hook fixes what only it knows (head counts, split sizes, configs). Blocks are
removed last, from their containers.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .errors import PlanError
from .particles import ParticleMap, ResidualGate, Remove

PROVENANCE = "_particlize"  # attribute carrying {"recipe": ..., "plan": [step, ...]} on pruned models


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    mpath, _, tname = name.rpartition(".")
    mod = model.get_submodule(mpath) if mpath else model
    if tname in mod._parameters:
        old = mod._parameters[tname]
        mod._parameters[tname] = nn.Parameter(value, requires_grad=old.requires_grad)
    elif tname in mod._buffers:
        mod._buffers[tname] = value
    else:
        raise PlanError(f"{name!r} is neither a parameter nor a buffer of the model")


def _refresh_shapes(mod: nn.Module) -> None:
    """Bring a torch built-in module's shape attributes in line with its (cut) weights."""
    if isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = mod.weight.shape
    elif isinstance(mod, nn.modules.conv._ConvNd):
        w = mod.weight.shape
        if mod.transposed:
            mod.in_channels, mod.out_channels = w[0], w[1] * mod.groups
        else:
            mod.out_channels, mod.in_channels = w[0], w[1] * mod.groups
    elif isinstance(mod, nn.modules.batchnorm._NormBase):
        n = (mod.running_mean if mod.running_mean is not None else mod.weight).shape[0]
        mod.num_features = n
    elif isinstance(mod, nn.LayerNorm) and mod.weight is not None:
        mod.normalized_shape = tuple(mod.weight.shape)
    elif isinstance(mod, nn.Embedding):
        mod.num_embeddings, mod.embedding_dim = mod.weight.shape


def apply_step(pm: ParticleMap, keep: Mapping[str, Sequence[int]]) -> None:
    """Cut ``pm.model`` in place so that each named group keeps only the listed particles."""
    model = pm.model
    keep = {name: sorted(int(i) for i in idx) for name, idx in keep.items()}
    for name, idx in keep.items():
        g = pm[name]
        if any(not 0 <= i < g.size for i in idx) or len(set(idx)) != len(idx):
            raise PlanError(f"plan for {name!r} has indices outside 0..{g.size - 1} or repeats")
        g.check_keep(idx)
    touched: set[str] = set()
    for name, idx in keep.items():
        g = pm[name]
        if g.kind == "block" or len(idx) == g.size:
            continue
        for s in (*g.writers, *g.readers):
            t = pm._tensor(s.name)
            sel = s.indices(idx).to(t.device)
            _set_tensor(model, s.name, t.detach().index_select(s.dim % t.ndim, sel).contiguous())
            touched.add(s.name.rpartition(".")[0])
    for path in touched:
        _refresh_shapes(model.get_submodule(path) if path else model)
    for name, idx in keep.items():
        g = pm[name]
        if g.kind != "block" and len(idx) != g.size and g.on_prune is not None:
            g.on_prune(model, idx)
    for name, idx in keep.items():
        g = pm[name]
        if g.kind == "block" and len(idx) != g.size:
            kept = set(idx)
            _remove_blocks(model, g.gate, [i for i in range(g.size) if i not in kept])
            if g.on_prune is not None:
                g.on_prune(model, idx)
    if pm.after_prune is not None:
        pm.after_prune(model)


def _remove_blocks(model: nn.Module, gate: Any, removed: list[int]) -> None:
    if not isinstance(gate, ResidualGate):
        raise PlanError("blocks can only be removed where the adapter gates them as residual blocks")
    by_parent: dict[str, list[str]] = {}
    for i in removed:
        parent, _, child = gate.modules[i].rpartition(".")
        by_parent.setdefault(parent, []).append(child)
    for parent, children in by_parent.items():
        container = model.get_submodule(parent) if parent else model
        if isinstance(container, (nn.ModuleList, nn.Sequential)):
            kept = [m for k, m in container._modules.items() if k not in children]
            container._modules.clear()
            for j, m in enumerate(kept):
                container._modules[str(j)] = m
        else:
            for child in children:
                setattr(container, child, nn.Identity())


def plan_step(pm: ParticleMap, remove: Remove) -> dict[str, list[int]]:
    """Turn ``{group: removed indices}`` into the plan step ``{group: kept indices}``."""
    step = {}
    for name, r in pm.removed_sets(remove).items():
        if r:
            gone = set(r)
            step[name] = [i for i in range(pm[name].size) if i not in gone]
    return step


def provenance(model: nn.Module) -> dict[str, Any]:
    """``{"recipe": ..., "plan": [...]}`` recorded on a model by decompose/prune/load (empty if none)."""
    return getattr(model, PROVENANCE, {}) or {}


def block_correspondence(teacher: nn.Module, student: nn.Module) -> list[tuple[str, str]]:
    """``[(teacher block path, student block path), ...]``: where each block of a pruned ``student``
    came from in ``teacher``, read from the plans (the student's plan must extend the teacher's).
    Blocks keep their width of the residual stream, so their outputs can be compared one to one (the
    layer-wise distillation of recovery); empty when the student does not descend from the teacher."""
    from .adapters import decompose

    t_plan, s_plan = provenance(teacher).get("plan", []), provenance(student).get("plan", [])
    if s_plan[: len(t_plan)] != t_plan:
        return []
    t_pm, s_pm = decompose(teacher), decompose(student)
    pairs = []
    for sg in s_pm.select("block"):
        if sg.name not in t_pm:
            continue
        tg = t_pm[sg.name]
        origin = list(range(tg.size))
        for step in s_plan[len(t_plan):]:
            if sg.name in step:
                origin = [origin[i] for i in step[sg.name]]
        if len(origin) == sg.size and isinstance(sg.gate, ResidualGate) and isinstance(tg.gate, ResidualGate):
            pairs += [(tg.gate.modules[o], sg.gate.modules[j]) for j, o in enumerate(origin)]
    return pairs


def pruned_copy(pm: ParticleMap, remove: Remove) -> nn.Module:
    """A deep copy of ``pm.model`` without the particles in ``remove``; records the plan step."""
    from .adapters import decompose

    step = plan_step(pm, remove)
    for name, idx in step.items():
        pm[name].check_keep(idx)
    # Tensors about to be cut (or dropped with their block) are shared with the original instead of
    # copied: surgery replaces them by new tensors and never writes in place, so the original stays intact
    # and a large model is not copied twice.
    memo: dict[int, Any] = {}
    for name, idx in step.items():
        g = pm[name]
        if g.kind == "block":
            for i in set(range(g.size)) - set(idx):
                for t in g.owned[i]:
                    memo[id(pm._tensor(t))] = pm._tensor(t)
        else:
            for s in (*g.writers, *g.readers):
                memo[id(pm._tensor(s.name))] = pm._tensor(s.name)
    small = copy.deepcopy(pm.model, memo)
    apply_step(decompose(small, recipe=pm.recipe, seq_len=pm.seq_len), step)
    prov = provenance(pm.model)
    setattr(small, PROVENANCE, {"recipe": pm.recipe, "plan": [*prov.get("plan", []), step]})
    return small
