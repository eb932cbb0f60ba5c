"""The ``prune`` verb: cut particles out of a model, leaving a genuinely smaller dense model.

Each slice of each group is cut with ``index_select`` (groups cutting the same tensor along different
dimensions compose), module shape attributes are refreshed, and the adapter's ``on_prune`` hook fixes
what only it knows (head counts, split sizes, configs). Consecutive prune steps of one operation are
applied together, blocks last. Invariant (tested for every family): the model pruned of a set S computes
what the model with zero gates on S computes.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..adapters import decompose
from ..errors import PlanError, UnsupportedModelError
from ..gates import ResidualGate
from ..particles import ParticleMap
from ..plan import Step, register_verb
from ._tensors import refresh_shapes, set_tensor


class Prune:
    """``Step("prune", group, {"keep": [kept indices]})``."""

    name = "prune"

    def joins(self, pm: ParticleMap, run: Sequence[Step], step: Step) -> bool:
        # one operation: distinct groups; once a block is removed, only blocks (names stay valid)
        if step.group in {s.group for s in run}:
            return False
        return not any(pm[s.group].kind == "block" for s in run) or pm[step.group].kind == "block"

    def apply(self, pm: ParticleMap, steps: Sequence[Step], *, replay: bool = False) -> nn.Module:
        keep = {s.group: _kept(pm, s) for s in steps}
        model = pm.model
        for name, idx in keep.items():
            pm[name].check_keep(idx)
            if (fine := pm[name].contains) in keep and len(idx) < pm[name].size and len(keep[fine]) < pm[fine].size:
                raise PlanError(f"{name!r} and {fine!r} cut the same weights in one prune: cut key/value heads and "
                                "query heads of one layer in two prune calls (the second on the first's result)")
        if _no_layers_left(pm, keep):
            raise PlanError(f"removing every block ({', '.join(n for n in keep if pm[n].kind == 'block')}) would leave "
                            "a model with no layers; keep at least one block (or prune heads and neurons instead)")
        touched: set[str] = set()
        for name, idx in keep.items():
            g = pm[name]
            if g.kind == "block" or len(idx) == g.size:
                continue
            for s in (*g.writers, *g.readers):
                t = pm._tensor(s.name)
                sel = s.indices(idx).to(t.device)
                set_tensor(model, s.name, t.detach().index_select(s.dim % t.ndim, sel).contiguous())
                touched.add(s.name.rpartition(".")[0])
        for path in touched:
            refresh_shapes(model.get_submodule(path) if path else model)
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
        return model

    def carry(self, pm: ParticleMap, steps: Sequence[Step], model: nn.Module) -> ParticleMap:
        blocks = any(pm[s.group].kind == "block" and len(_kept(pm, s)) < pm[s.group].size for s in steps)
        # grouped-query heads cut to one per key/value head are plain multi-head attention: an adapter then
        # gives each query head its key and value rows too
        ungrouped = any(1 < pm[s.group].balanced == len(_kept(pm, s)) for s in steps)
        if blocks or ungrouped or not _names_survive(pm, model):
            # removing blocks renumbers what follows them; an adapter's fix-up may rebuild modules
            try:
                return decompose(model, recipe=pm.recipe, seq_len=pm.seq_len)
            except UnsupportedModelError:  # nothing left to place (every block removed): a map without groups
                out = pm.rebind(model)
                out.groups, out._by_name = [], {}
                return out
        out = pm.rebind(model)
        for s in steps:
            out = out.with_size(s.group, len(_kept(pm, s)))
        return out


def _kept(pm: ParticleMap, step: Step) -> list[int]:
    g = pm[step.group]
    idx = step.args.get("keep")
    if not isinstance(idx, (list, tuple)):
        raise PlanError(f"prune step for {step.group!r} needs args {{'keep': [indices]}}, got {dict(step.args)}")
    idx = sorted(int(i) for i in idx)
    if any(not 0 <= i < g.size for i in idx) or len(set(idx)) != len(idx):
        raise PlanError(f"plan for {step.group!r} has indices outside 0..{g.size - 1} or repeats")
    return idx


def _names_survive(pm: ParticleMap, model: nn.Module) -> bool:
    """Whether every tensor the map's groups name still exists in ``model`` (an adapter's ``after_prune``
    may have replaced modules, e.g. uneven recurrent layers become a stack of single-layer ones)."""
    have = {n for n, _ in model.named_parameters(remove_duplicate=False)} | {n for n, _ in model.named_buffers(remove_duplicate=False)}
    return all(s.name in have for g in pm.groups for s in (*g.writers, *g.readers))


def _no_layers_left(pm: ParticleMap, keep: dict[str, list[int]]) -> bool:
    """Whether removing the blocks ``keep`` leaves out would empty every layer stack (ModuleList / Sequential)
    that holds the map's blocks: a model with no layers at all."""
    removed = {g.gate.modules[i] for n, idx in keep.items() if (g := pm[n]).kind == "block"
               and isinstance(g.gate, ResidualGate) for i in set(range(g.size)) - set(idx)}
    if not removed:
        return False
    stacks = {m.rpartition(".")[0] for g in pm.groups if g.kind == "block" and isinstance(g.gate, ResidualGate)
              for m in g.gate.modules}
    left = 0
    for parent in stacks:
        container = pm.model.get_submodule(parent) if parent else pm.model
        if not isinstance(container, (nn.ModuleList, nn.Sequential)):
            return False
        left += sum((f"{parent}.{k}" if parent else k) not in removed for k in container._modules)
    return left == 0


def _remove_blocks(model: nn.Module, gate: object, removed: list[int]) -> None:
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


PRUNE = register_verb(Prune())
