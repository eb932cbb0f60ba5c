"""Distributed analysis splits the particles by their estimated work (the forward suffix each ablation replays),
longest first to the least-loaded rank, and the gathered table stays the single-process one."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import particlize as pz
from conftest import hf_model
from particlize.analysis.work import PIECES_PER_RANK, ablation_costs, share_costs, split_work
from particlize.parallel import analyze, launch, work_shares


def _former(pm, names, world):
    """The former rule: whole groups dealt by particle count, largest first."""
    load, out = [0] * world, [[] for _ in range(world)]
    for n in sorted(names, key=lambda n: -pm[n].size):
        k = min(range(world), key=lambda r: (load[r], r))
        out[k].append(n)
        load[k] += pm[n].size
    return [{n: list(range(pm[n].size)) for n in s} for s in out]


def test_earlier_particles_cost_more_and_the_split_evens_the_estimated_work():
    model, _ = hf_model("bert")
    pm = pz.decompose(model)
    names = [g.name for g in pm.groups]
    costs = ablation_costs(pm, names)
    neurons = [costs[g.name][0] for g in pm.select("neuron")]
    heads = [costs[g.name][0] for g in pm.select("head")]
    assert neurons == sorted(neurons, reverse=True) and len(set(neurons)) == len(neurons)
    assert all(h > n for h, n in zip(heads, neurons))  # a layer's heads replay its FFN too
    blocks = costs[pm.select("block")[0].name]
    assert blocks == sorted(blocks, reverse=True) and blocks[0] > heads[0] - 1e-9
    for world in (2, 3):
        new = work_shares(pm, names, world)
        assert sorted((n, i) for s in new for n, idx in s.items() for i in idx) == \
            sorted((n, i) for n in names for i in range(pm[n].size))
        loads, old = share_costs(costs, new), share_costs(costs, _former(pm, names, world))
        assert max(loads) - min(loads) <= max(max(c) for c in costs.values()) * pm.groups[1].size / PIECES_PER_RANK
        assert max(loads) < max(old)  # the former split left one rank with more


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.floats(0.1, 100.0), min_size=1, max_size=30), min_size=1, max_size=8),
       st.integers(1, 5), st.booleans())
def test_split_work_covers_every_particle_once_and_lpt_bounds_the_gap(cost_lists, world, by_particle):
    costs = {f"g{k}": c for k, c in enumerate(cost_lists)}
    shares = split_work(costs, world, by_particle)
    got = sorted((n, i) for s in shares for n, idx in s.items() for i in idx)
    assert got == sorted((n, i) for n, c in costs.items() for i in range(len(c)))
    if not by_particle:  # whole groups
        assert all(len(idx) == len(costs[n]) for s in shares for n, idx in s.items())
    loads = share_costs(costs, shares)
    total = sum(map(sum, costs.values()))
    piece = max(total / (world * PIECES_PER_RANK) + max(map(max, costs.values())), 0) if by_particle \
        else max(map(sum, costs.values()))
    assert max(loads) - min(loads) <= piece + 1e-9  # LPT: the most loaded rank got its last piece when least loaded


def _three_ranks():
    model, batch = hf_model("bert")
    return analyze(model, [(batch, torch.tensor([0, 1, 2]))], "ablation", world_size=3)


def test_three_ranks_with_groups_cut_into_pieces_give_the_single_process_table():
    model, batch = hf_model("bert")
    want = pz.analyze(model, [(batch, torch.tensor([0, 1, 2]))], "ablation")
    shares = work_shares(pz.decompose(model), [g.name for g in pz.decompose(model).groups], 3)
    assert any(len(idx) < pz.decompose(model)[n].size for s in shares for n, idx in s.items())  # pieces
    for df in launch(_three_ranks, 3, start_method="fork", timeout=60):
        assert list(df.columns) == list(want.columns) and list(df.group) == list(want.group)
        assert list(df["index"]) == list(want["index"])
        torch.testing.assert_close(torch.tensor(df.score.to_numpy()), torch.tensor(want.score.to_numpy()),
                                   atol=1e-6, rtol=0)
