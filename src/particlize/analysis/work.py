"""How much work scoring each particle is, and a split of that work across ranks that evens it out.

Exact ablation replays, for each particle, the forward from the particle's site to the output (the prefix
is cached; see `particlize.analysis.ablation`). A particle early in the network therefore costs about the
FLOPs of every layer after it, one in the last layer only the output head: in a 6-layer encoder the first
layer's neurons cost several times the last layer's. Dealing whole groups by particle count ignores that, and
one rank idles while the other finishes the early layers. `ablation_costs` estimates each particle's work
as the FLOPs per token of the suffix it replays; `split_work` deals the particles to ranks by it, greedy
longest-processing-time first (Graham's LPT: the largest remaining piece to the least-loaded rank) over
pieces of each group small enough that the last piece placed cannot leave much imbalance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..errors import ParticlizeError
from ..particles import ParticleMap, ResidualGate

PIECES_PER_RANK = 8  # granularity: a piece costs at most 1/8 of a rank's fair share (LPT's gap is at most one piece)


def _flops_per_particle(pm: ParticleMap, total: float) -> dict[str, float]:
    return {g.name: max(total - pm.cost({g.name: [0]}).flops, 0.0) for g in pm.groups if g.kind != "block"}


def ablation_costs(pm: ParticleMap, names: Sequence[str]) -> dict[str, list[float]]:
    """``{group: [estimated work of ablating each particle]}``, in FLOPs per token: what the forward suffix
    from the particle's site to the output costs. For a head or neuron: every head/neuron group after its
    own in the map (the rest of its layer and all later layers) plus the FLOPs that belong to no particle
    (the output head, norms); for a block: the same from its first group. One unit is added per particle
    for the work that does not scale with the suffix (its reader update, the metric)."""
    total = pm.cost().flops
    per = _flops_per_particle(pm, total)
    order = [g.name for g in pm.groups if g.kind != "block"]
    size = {g.name: g.size for g in pm.groups}
    flops = [per[n] * size[n] for n in order]
    tail = max(total - sum(flops), 0.0)
    after = [0.0] * (len(order) + 1)  # after[i]: FLOPs of the groups from position i on
    for i in range(len(order) - 1, -1, -1):
        after[i] = after[i + 1] + flops[i]
    pos = {n: i for i, n in enumerate(order)}
    out: dict[str, list[float]] = {}
    for name in names:
        g = pm[name]
        if g.kind != "block":
            out[name] = [1.0 + tail + after[pos[name] + 1]] * g.size
            continue
        starts = []
        for i in range(g.size):
            prefix = f"{g.gate.modules[i]}." if isinstance(g.gate, ResidualGate) else None
            first = next((k for k, n in enumerate(order) if prefix and n.startswith(prefix)), 0)
            starts.append(1.0 + tail + after[first])
        out[name] = starts
    return out


def split_work(costs: Mapping[str, Sequence[float]], world_size: int, by_particle: bool = True) -> list[dict[str, list[int]]]:
    """Each rank's share ``{group: [particle indices]}`` of the particles in ``costs`` (`ablation_costs`),
    balanced by cost with greedy longest-processing-time assignment. ``by_particle``: groups are cut into
    contiguous pieces of at most 1/`PIECES_PER_RANK` of a rank's fair share (a scorer that can score a subset
    of a group's particles); otherwise whole groups are dealt. Ties go to the lowest rank; deterministic."""
    if world_size < 1:
        raise ParticlizeError(f"world_size must be at least 1, got {world_size}")
    total = sum(sum(c) for c in costs.values())
    cap = total / (world_size * PIECES_PER_RANK) if by_particle else float("inf")
    pieces: list[tuple[float, int, str, list[int]]] = []  # (cost, order, group, particles)
    for name, cs in costs.items():
        start, acc = 0, 0.0
        for i, c in enumerate(cs):
            if i > start and acc + c > cap:
                pieces.append((acc, len(pieces), name, list(range(start, i))))
                start, acc = i, 0.0
            acc += c
        if cs:
            pieces.append((acc, len(pieces), name, list(range(start, len(cs)))))
    load = [0.0] * world_size
    shares: list[dict[str, list[int]]] = [{} for _ in range(world_size)]
    for cost, _, name, particles in sorted(pieces, key=lambda p: (-p[0], p[1])):
        k = min(range(world_size), key=lambda r: (load[r], r))
        shares[k].setdefault(name, []).extend(particles)
        load[k] += cost
    order = {n: i for i, n in enumerate(costs)}
    return [{n: sorted(s[n]) for n in sorted(s, key=order.__getitem__)} for s in shares]


def share_costs(costs: Mapping[str, Sequence[float]], shares: Sequence[Mapping[str, Sequence[int]]]) -> list[float]:
    """The estimated work of each rank's share."""
    return [sum(costs[n][i] for n, idx in s.items() for i in idx) for s in shares]


__all__ = ["PIECES_PER_RANK", "ablation_costs", "share_costs", "split_work"]
