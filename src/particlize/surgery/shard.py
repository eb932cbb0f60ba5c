"""The ``shard`` verb: keep this rank's share of each group's particles; partial reader outputs are summed.

Heads and FFN neurons are independent particles whose contributions add up at their reader (``o_proj``,
``fc2``): ``y = b + Σ_i W[:, i] a_i``. Split a group's particles across ``world_size`` ranks, cut each rank's
writers (rows) and reader (columns) to its own particles — the `prune` machinery on a copy — and the sum
over ranks of the partial reader outputs (one all-reduce per reader, a forward hook) is the output of the
whole model. The reader's bias is kept on rank 0 only, so it is added once. Everything else (embeddings,
norms, blocks, groups that cannot be split) is replicated.

``Step("shard", group, {"world_size": N, "rank": r, "parts": [[particles of rank 0], ..., [of rank N-1]]})``:
the step records the whole layout, so a launch is reproducible, and which part this model holds.

Layout (`layout`): particles are split **by cost**. Within a group particles cost the same, so the ranks'
counts differ by at most one; which ranks take the remainder is chosen by the cost each rank holds so far,
so that uneven widths (a pruned model: 7 heads here, 5 there, widths that do not divide the world size)
still balance over the whole model. Grouped-query heads are split inside every key/value group alike (the
same number of query heads of each key/value head per rank), so the adapter's own fix-up keeps every query
head with its key/value head; the key/value projections are replicated (the particle map does not name them,
so cutting whole key/value groups per rank would need the adapter to expose those rows).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dfn  # collectives that autograd differentiates
from torch import nn

from ..errors import PlanError
from ..particles import ParticleGroup, ParticleMap, linear_reader_weight
from ..plan import Step, model_plan, register_verb, run, set_provenance
from ._tensors import set_tensor
from .prune import PRUNE

# attribute on a sharded model: world_size, rank, layout ({group: parts}), groups (as in the whole model),
# after_prune (the adapter's fix-up), process_group
SHARDED = "_particlize_shard"


class Shard:
    """``Step("shard", group, {"world_size": N, "rank": r, "parts": [[indices], ...]})``."""

    name = "shard"

    def joins(self, pm: ParticleMap, run: Sequence[Step], step: Step) -> bool:
        # one operation: every group of one layout at once (distinct groups, same world and rank)
        first = run[0].args
        return (step.group not in {s.group for s in run} and step.args.get("world_size") == first.get("world_size")
                and step.args.get("rank") == first.get("rank"))

    def apply(self, pm: ParticleMap, steps: Sequence[Step], *, replay: bool = False) -> nn.Module:
        world, rank = _world_rank(steps[0])
        model = PRUNE.apply(pm, _prune_steps(pm, steps), replay=replay)
        for s in steps:
            reader = pm[s.group].gate.module  # linear reader on the gated input (checked by _parts)
            mod = model.get_submodule(reader)
            bias = getattr(mod, "bias", None)
            if rank > 0 and isinstance(bias, torch.Tensor) and not replay:
                set_tensor(model, f"{reader}.bias", torch.zeros_like(bias.detach()))
            mod.register_forward_hook(_all_reduce_output)
        info = getattr(model, SHARDED, None) or {"world_size": world, "rank": rank, "layout": {}, "groups": {}}
        info["layout"].update({s.group: _parts(pm, s, check=False) for s in steps})
        info["groups"].update({s.group: pm[s.group] for s in steps})  # as in the whole model, to gather it back
        info["after_prune"] = pm.after_prune
        setattr(model, SHARDED, info)
        return model

    def carry(self, pm: ParticleMap, steps: Sequence[Step], model: nn.Module) -> ParticleMap:
        return PRUNE.carry(pm, _prune_steps(pm, steps, check=False), model)  # pm.model is cut already


def _all_reduce_output(mod: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
    """Sum a reader's partial output over the ranks (differentiable when autograd records)."""
    group = getattr(mod, "_particlize_process_group", None)
    if torch.is_grad_enabled() and out.requires_grad:
        return dfn.all_reduce(out, group=group or dist.group.WORLD)
    out = out.contiguous()
    dist.all_reduce(out, group=group)
    return out


def _world_rank(step: Step) -> tuple[int, int]:
    world, rank = step.args.get("world_size"), step.args.get("rank")
    if not isinstance(world, int) or not isinstance(rank, int) or not 0 <= rank < world:
        raise PlanError(f"shard step for {step.group!r} needs args world_size (int) and rank in 0..world_size-1; "
                        f"got {dict(step.args)}")
    return world, rank


def _parts(pm: ParticleMap, step: Step, check: bool = True) -> list[list[int]]:
    world, _ = _world_rank(step)
    g = pm[step.group]
    parts = step.args.get("parts")
    if not isinstance(parts, (list, tuple)) or len(parts) != world:
        raise PlanError(f"shard step for {step.group!r} needs args parts: one list of particles per rank ({world})")
    parts = [sorted(int(i) for i in p) for p in parts]
    if sorted(i for p in parts for i in p) != list(range(g.size)):
        raise PlanError(f"shard step for {step.group!r}: parts must cover particles 0..{g.size - 1} exactly once")
    if check and not shardable(pm, g):
        raise PlanError(f"{step.group!r} cannot be sharded (its reader is not a linear layer on its particles); "
                        "leave it out of the layout (it is replicated)")
    for p in parts:
        g.check_keep(p)
    return parts


def _prune_steps(pm: ParticleMap, steps: Sequence[Step], check: bool = True) -> list[Step]:
    return [Step("prune", s.group, {"keep": _parts(pm, s, check)[_world_rank(s)[1]]}) for s in steps]


def shardable(pm: ParticleMap, g: ParticleGroup) -> bool:
    """Whether ``g``'s partial reader outputs add up: not a block, and read by one linear layer on its gated
    input (``nn.Linear`` / GPT-2's ``Conv1D``), as heads and FFN neurons are."""
    return g.kind != "block" and linear_reader_weight(pm, g) is not None


def _modules(g: ParticleGroup) -> tuple[set[str], set[str]]:
    return ({s.name.rpartition(".")[0] for s in g.writers}, {s.name.rpartition(".")[0] for s in g.readers})


def _particle_flops(pm: ParticleMap, g: ParticleGroup) -> float:
    return max(pm.cost().flops - pm.cost({g.name: [0]}).flops, 1e-9)


def layout(pm: ParticleMap, world_size: int) -> dict[str, list[list[int]]]:
    """``{group: [particles of rank 0, ..., of rank N-1]}``: each shardable group split across the ranks by
    cost (see the module doc). Groups left out are replicated: blocks, groups whose reader is not linear on
    them, groups with fewer particles (per key/value group) than ranks, and groups whose modules another
    split group already cuts (a conv channel chain: its reader would be the next group's writer)."""
    if world_size < 1:
        raise PlanError(f"world_size must be at least 1, got {world_size}")
    load = [0.0] * world_size
    taken: set[str] = set()
    out: dict[str, list[list[int]]] = {}
    for g in pm.groups:
        chunk = g.size // max(g.balanced, 1)
        w, r = _modules(g)
        if world_size == 1 or not shardable(pm, g) or chunk < world_size or (w | r) & taken:
            continue
        taken |= w | r
        extra = set(sorted(range(world_size), key=lambda k: (load[k], k))[: chunk % world_size])
        counts = [chunk // world_size + (k in extra) for k in range(world_size)]
        cost = _particle_flops(pm, g)
        parts, start = [], 0
        for k, c in enumerate(counts):
            parts.append([kv * chunk + i for kv in range(max(g.balanced, 1)) for i in range(start, start + c)])
            load[k] += cost * len(parts[-1])
            start += c
        out[g.name] = parts
    return out


def shard_model(pm: ParticleMap, rank: int, world_size: int, parts: Mapping[str, Sequence[Sequence[int]]] | None = None,
                process_group: Any = None) -> ParticleMap:
    """The map of a copy of ``pm.model`` (its ``.model``) holding rank ``rank``'s share of ``parts`` (default
    `layout`); the copy records the shard steps in its provenance and sums partial reader outputs over
    ``process_group`` (default: the world). Tensors about to be cut are shared, not copied (as `prune` does)."""
    parts = layout(pm, world_size) if parts is None else parts
    steps = [Step("shard", n, {"world_size": world_size, "rank": rank, "parts": [list(p) for p in ps]})
             for n, ps in parts.items()]
    memo: dict[int, Any] = {}
    for n in parts:
        for s in (*pm[n].writers, *pm[n].readers):
            memo[id(pm._tensor(s.name))] = pm._tensor(s.name)
    model = copy.deepcopy(pm.model, memo)
    if steps:
        for n in parts:
            model.get_submodule(pm[n].gate.module)._particlize_process_group = process_group
        out = run(pm.rebind(model), steps)
    else:
        out = pm.rebind(model)
        setattr(model, SHARDED, {"world_size": world_size, "rank": rank, "layout": {}, "groups": {}, "after_prune": None})
    getattr(model, SHARDED)["process_group"] = process_group
    set_provenance(model, pm.recipe, model_plan(pm.model) + steps)
    return out


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is one rank's shard (made by `shard_model`), not a whole model."""
    return getattr(model, SHARDED, None) is not None


def full_slice(s: Any, size: int) -> Any:
    """A group's slice ``s`` as it lies in the unsharded tensor of a group of ``size`` particles."""
    return s if s.repeat == 1 else dataclasses.replace(s, stride=size * s.width)


SHARD = register_verb(Shard())
