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
still balance over the whole model.

Grouped-query attention (``n_kv`` key/value heads, each shared by ``c`` query heads). The unit dealt to a
rank is chosen per layer, by this rule (no warning: the layout says which was taken):

1. ``world_size`` divides ``n_kv``: **whole key/value groups** — each rank takes ``n_kv / world_size`` key/value
   heads with all their query heads, so the key and value projections are split too (no replicated k/v
   compute or memory) and every rank does the same work;
2. otherwise, if ``c >= world_size``: the query heads of *every* key/value group are split across the ranks
   (the same share of each group per rank, counts differing by one), the k/v projections replicated — what
   Megatron does when there are fewer key/value heads than ranks;
3. otherwise, if ``n_kv >= world_size``: whole key/value groups, counts differing by one (the remainder to the
   ranks holding the least cost so far);
4. otherwise the layer's attention is replicated.

A part that is a union of whole key/value groups is cut as such (`kv_slices` names the key/value rows: the
linear layers beside the query projection with one head-width block per key/value head); any other part
must hold the same number of query heads of each key/value group, and the adapter's fix-up applies.
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

from ..adapters import decompose
from ..errors import PlanError
from ..gates import Slice
from ..particles import ParticleGroup, ParticleMap, linear_reader_weight
from ..plan import Step, model_plan, register_verb, run, set_provenance
from ._tensors import refresh_shapes, set_tensor
from .prune import PRUNE

# attribute on a sharded model: world_size, rank, layout ({group: parts}), groups (as in the whole model),
# kv ({group: (key/value slices, key/value heads of each rank)} for whole-group attention), after_prune (the
# adapter's fix-up), process_group
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
        parts = {s.group: _parts(pm, s) for s in steps}
        kv = {n: (kv_slices(pm, pm[n]), heads) for n, p in parts.items() if (heads := kv_heads(pm[n], p)) is not None}
        for n, (slices, heads) in kv.items():  # whole key/value groups: cut here (the prune fix-up assumes shares)
            _cut_whole_groups(pm, pm[n], slices, parts[n][rank], heads[rank])
        model = PRUNE.apply(pm, [Step("prune", s.group, {"keep": parts[s.group][rank]}) for s in steps
                                 if s.group not in kv], replay=replay)
        for s in steps:
            reader = pm[s.group].gate.module  # linear reader on the gated input (checked by _parts)
            mod = model.get_submodule(reader)
            bias = getattr(mod, "bias", None)
            if rank > 0 and isinstance(bias, torch.Tensor) and not replay:
                set_tensor(model, f"{reader}.bias", torch.zeros_like(bias.detach()))
            mod.register_forward_hook(_all_reduce_output)
        info = getattr(model, SHARDED, None) or {"world_size": world, "rank": rank, "layout": {}, "groups": {}, "kv": {}}
        info["layout"].update(parts)
        info["groups"].update({s.group: pm[s.group] for s in steps})  # as in the whole model, to gather it back
        info["kv"].update(kv)
        info["after_prune"] = pm.after_prune
        setattr(model, SHARDED, info)
        return model

    def carry(self, pm: ParticleMap, steps: Sequence[Step], model: nn.Module) -> ParticleMap:
        # pm.model is cut already; whole key/value groups change the key/value head count: read the map anew
        if any(pm[s.group].name in getattr(model, SHARDED, {}).get("kv", {}) for s in steps):
            return decompose(model, recipe=pm.recipe, seq_len=pm.seq_len)
        return PRUNE.carry(pm, [Step("prune", s.group, {"keep": _parts(pm, s, check=False)[_world_rank(s)[1]]})
                                for s in steps], model)


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
    if kv_heads(g, parts) is None:
        for p in parts:
            g.check_keep(p)
    elif check and not kv_slices(pm, g):
        raise PlanError(f"{step.group!r}: no key/value projections found beside the query projection, so whole "
                        "key/value groups cannot be cut; give each rank the same number of query heads of every group")
    return parts


def kv_heads(g: ParticleGroup, parts: Sequence[Sequence[int]]) -> list[list[int]] | None:
    """The key/value heads of each rank when every part of grouped-query head group ``g`` is a non-empty union
    of whole key/value groups (all ``size / balanced`` query heads of each); None otherwise."""
    if g.kind != "head" or g.balanced <= 1:
        return None
    chunk = g.size // g.balanced
    kv = [sorted({i // chunk for i in p}) for p in parts]
    whole = all(p and len(p) == len(k) * chunk for p, k in zip(parts, kv))
    return kv if whole else None


def kv_slices(pm: ParticleMap, g: ParticleGroup) -> tuple[Slice, ...]:
    """The key and value rows of grouped-query head group ``g`` (one head-width block per key/value head): the
    weights and biases of the two linear layers beside its query projection with ``balanced`` such blocks
    (``k_proj``, ``v_proj``); empty when ``g`` is not grouped-query or they are not found."""
    q = [s for s in g.writers if s.name.endswith(".weight") and s.dim % 2 == 0 and s.repeat == 1]
    if g.kind != "head" or g.balanced <= 1 or len(q) != 1:
        return ()
    qmod, width = q[0].name.rpartition(".")[0], q[0].width
    parent = qmod.rpartition(".")[0]
    out: list[Slice] = []
    for child, m in pm.model.get_submodule(parent).named_children():
        path = f"{parent}.{child}" if parent else child
        if path not in (qmod, g.gate.module) and isinstance(m, nn.Linear) and m.out_features == g.balanced * width:
            out.append(Slice(f"{path}.weight", 0, width))
            if isinstance(m.bias, torch.Tensor):
                out.append(Slice(f"{path}.bias", 0, width))
    return tuple(out) if sum(s.name.endswith(".weight") for s in out) == 2 else ()


def set_head_counts(model: nn.Module, g: ParticleGroup, heads: int, kv: int) -> None:
    """Set the query and key/value head counts on the attention module of grouped-query group ``g``
    (those of ``num_heads``, ``num_attention_heads``, ``num_key_value_heads`` it records); its
    ``num_key_value_groups`` (query heads per key/value head) is unchanged by whole-group cuts."""
    q = next(s for s in g.writers if s.name.endswith(".weight"))
    attn = model.get_submodule(q.name.rpartition(".")[0].rpartition(".")[0])
    for k, v in {"num_heads": heads, "num_attention_heads": heads, "num_key_value_heads": kv}.items():
        if hasattr(attn, k):
            setattr(attn, k, v)


def _cut_whole_groups(pm: ParticleMap, g: ParticleGroup, kv: Sequence[Slice], keep: list[int], heads: list[int]) -> None:
    touched = set()
    for s, idx in [*((s, keep) for s in (*g.writers, *g.readers)), *((s, heads) for s in kv)]:
        t = pm._tensor(s.name)
        set_tensor(pm.model, s.name, t.detach().index_select(s.dim % t.ndim, s.indices(idx).to(t.device)).contiguous())
        touched.add(s.name.rpartition(".")[0])
    for path in touched:
        refresh_shapes(pm.model.get_submodule(path))
    set_head_counts(pm.model, g, len(keep), len(heads))


def shardable(pm: ParticleMap, g: ParticleGroup) -> bool:
    """Whether ``g``'s partial reader outputs add up: not a block, and read by one linear layer on its gated
    input (``nn.Linear`` / GPT-2's ``Conv1D``), as heads and FFN neurons are."""
    return g.kind != "block" and linear_reader_weight(pm, g) is not None


def _modules(g: ParticleGroup) -> tuple[set[str], set[str]]:
    return ({s.name.rpartition(".")[0] for s in g.writers}, {s.name.rpartition(".")[0] for s in g.readers})


def _particle_flops(pm: ParticleMap, g: ParticleGroup) -> float:
    return max(pm.cost().flops - pm.cost({g.name: [0]}).flops, 1e-9)


def _units(pm: ParticleMap, g: ParticleGroup, world: int) -> tuple[int, Any] | None:
    """How group ``g`` is dealt: ``(units, particles)``, ``particles(start, count)`` being the particles of
    units ``start .. start + count - 1``; None when it is replicated (the GQA rule in the module doc)."""
    n_kv = max(g.balanced, 1)
    chunk = g.size // n_kv
    whole = (n_kv, lambda a, c: list(range(a * chunk, (a + c) * chunk)))
    split = (chunk, lambda a, c: [kv * chunk + i for kv in range(n_kv) for i in range(a, a + c)])
    if n_kv == 1:
        return split if chunk >= world else None
    can_whole = bool(kv_slices(pm, g)) and n_kv >= world
    if can_whole and n_kv % world == 0:
        return whole
    if chunk >= world:
        return split
    return whole if can_whole else None


def layout(pm: ParticleMap, world_size: int) -> dict[str, list[list[int]]]:
    """``{group: [particles of rank 0, ..., of rank N-1]}``: each shardable group split across the ranks by
    cost (see the module doc, also for grouped-query attention). Groups left out are replicated: blocks,
    groups whose reader is not linear on them, groups with fewer particles (or key/value groups) than ranks,
    and groups whose modules another split group already cuts (a conv channel chain: its reader would be
    the next group's writer)."""
    if world_size < 1:
        raise PlanError(f"world_size must be at least 1, got {world_size}")
    load = [0.0] * world_size
    taken: set[str] = set()
    out: dict[str, list[list[int]]] = {}
    for g in pm.groups:
        w, r = _modules(g)
        deal = None if world_size == 1 or not shardable(pm, g) or (w | r) & taken else _units(pm, g, world_size)
        if deal is None:
            continue
        units, particles = deal
        taken |= w | r
        extra = set(sorted(range(world_size), key=lambda k: (load[k], k))[: units % world_size])
        cost = _particle_flops(pm, g)
        parts, start = [], 0
        for k in range(world_size):
            c = units // world_size + (k in extra)
            parts.append(sorted(particles(start, c)))
            load[k] += cost * len(parts[-1])
            start += c
        out[g.name] = parts
    return out


def shard_model(pm: ParticleMap, rank: int, world_size: int, parts: Mapping[str, Sequence[Sequence[int]]] | None = None,
                process_group: Any = None, share: Sequence[str] = ()) -> ParticleMap:
    """The map of a copy of ``pm.model`` (its ``.model``) holding rank ``rank``'s share of ``parts`` (default
    `layout`); the copy records the shard steps in its provenance and sums partial reader outputs over
    ``process_group`` (default: the world). Tensors about to be cut are shared, not copied (as `prune` does),
    and so are those of the groups named in ``share`` (which the caller distributes otherwise)."""
    parts = layout(pm, world_size) if parts is None else parts
    steps = [Step("shard", n, {"world_size": world_size, "rank": rank, "parts": [list(p) for p in ps]})
             for n, ps in parts.items()]
    memo: dict[int, Any] = {}
    for n in (*parts, *share):
        for s in (*pm[n].writers, *pm[n].readers, *kv_slices(pm, pm[n])):
            memo[id(pm._tensor(s.name))] = pm._tensor(s.name)
    model = copy.deepcopy(pm.model, memo)
    if steps:
        for n in parts:
            model.get_submodule(pm[n].gate.module)._particlize_process_group = process_group
        out = run(pm.rebind(model), steps)
    else:
        out = pm.rebind(model)
        setattr(model, SHARDED, {"world_size": world_size, "rank": rank, "layout": {}, "groups": {}, "kv": {},
                                 "after_prune": None})
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
