"""Allocation: targets and scores → which particles to remove.

A *scorer* gives every particle a non-negative importance (`Scorer`; the named ones are
`particlize.analysis`'s registered scorers); an *allocator* turns importances and a FLOPs goal into a removal plan ``{group:
[indices]}`` (`Allocator`; `allocate` is the default: `allocate_global` or `allocate_uniform` as the
`AllocationConfig` says). Both are arguments of `particlize.loop.compress`, so an experiment swaps one in
instead of patching the loop. Minimum widths (``min_width`` of each layer's original width), ``round_to``
and grouped-query balance are kept by every plan `allocate` makes.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import pandas as pd
import torch
from torch import nn

from .adapters import decompose
from .analysis import get_scorer, importance_for, interactions, redundancy_score, scorers
from .errors import ParticlizeError
from .measure import measure_latency
from .particles import ParticleGroup, ParticleMap
from .plan import compensations
from .surgery import block_correspondence

ALLOCATIONS = ("auto", "global", "uniform")
GRANULARITIES = {"heads": "head", "neurons": "neuron", "channels": "channel", "units": "unit", "blocks": "block",
                 "factors": "factor", "kv_heads": "kv_head"}


@dataclass
class AllocationConfig:
    """What may be removed and how it is chosen: particle kinds, scorer, allocation rule and its limits."""

    granularity: tuple[str, ...] = ("heads", "neurons")
    scorer: str = "fisher"  # chosen by measurement: benchmarks/scorer_oneshot.py, RESULTS.md
    allocation: str = "auto"  # auto: uniform when only conv channels are cut (by FLOPs), else global; measured:
    # on the Fashion-MNIST ResNet global allocation by single-channel scores empties the last stage (results/vision.md)
    cost: str = "flops"  # what global allocation prices particles by: "flops" or measured "latency"
    max_fraction: float = 1 / 3
    min_width: float = 0.1
    round_to: int | None = None  # kept widths in features (heads count head_dim each) are multiples of this;
    # None: what the device and dtype like (`default_round_to`, applied by `for_device`; none on a CPU)
    compensate: str = "none"  # how the kept particles' readers absorb a cut: none, bias, merge or refit (pm.prune)
    interactions: bool = False  # global greedy with the pairwise correction (needs `interaction_scorer`'s scores)

    def check(self) -> None:
        """Raise `ParticlizeError` for a setting out of range, naming what to use instead."""
        bad = [g for g in self.granularity if g not in GRANULARITIES and g != "all"]
        if bad:
            raise ParticlizeError(f"unknown granularity {bad}; use {', '.join(GRANULARITIES)} or all")
        if "kv_heads" in self.granularity and ("heads" in self.granularity or "all" in self.granularity):
            raise ParticlizeError("granularity kv_heads (whole key/value groups) and heads (query heads) cut the same "
                                  "weights: pick one of them")
        if not 0.0 <= self.min_width <= 1.0:
            raise ParticlizeError(f"min_width is the share of each layer's original width kept at least: in [0, 1], got {self.min_width}")
        if self.round_to is not None and self.round_to < 1:
            raise ParticlizeError(f"round_to must be a positive number of features, got {self.round_to}")
        if not 0.0 < self.max_fraction <= 1.0:
            raise ParticlizeError(f"max_fraction must be in (0, 1], got {self.max_fraction}")
        if self.scorer not in scorers():
            raise ParticlizeError(f"unknown scorer {self.scorer!r}; use one of {', '.join(scorers())}")
        if self.allocation not in ALLOCATIONS:
            raise ParticlizeError(f"allocation must be 'auto', 'global' or 'uniform', got {self.allocation!r}")
        if self.cost not in ("flops", "latency"):
            raise ParticlizeError(f"cost must be 'flops' or 'latency', got {self.cost!r}")
        if self.interactions and self.allocation == "uniform":
            raise ParticlizeError("interactions=True corrects the global ranking; use allocation='global'")
        if self.compensate not in ("none", *compensations()):
            raise ParticlizeError(f"compensate must be one of none, {', '.join(compensations())}; got {self.compensate!r}")

    def for_device(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> AllocationConfig:
        """This config as it runs on ``device`` in ``dtype``: ``round_to`` left unset becomes `default_round_to`'s
        (unchanged on a CPU); a ``round_to`` given is kept."""
        r = default_round_to(torch.device(device).type, dtype) if self.round_to is None else None
        return self if r is None else replace(self, round_to=r)

    @property
    def kinds(self) -> set[str]:
        """The particle kinds ``granularity`` names (``"all"``: every kind but key/value heads, which heads refine)."""
        if "all" in self.granularity:
            return set(GRANULARITIES.values()) - {"kv_head"}
        return {GRANULARITIES[g] for g in self.granularity}


#: Kept widths (in features) by device type and dtype when ``round_to`` is not given. A GPU's matmuls run in
#: tiles: an FFN 3,942 neurons wide ran a 1.1B Llama at 0.76× of dense on an H200, 3,904 (a multiple of 64) at
#: 1.24× (issue 29). fp32 (TF32 tensor cores) asks for multiples of 8, bf16 / fp16 for 64;
#: benchmarks/gpu_check.py measures 8 / 64 / 128. A CPU has no such preference: no rounding.
ROUND_TO: dict[tuple[str, torch.dtype], int] = {
    ("cuda", torch.float32): 8, ("cuda", torch.bfloat16): 64, ("cuda", torch.float16): 64,
}


def default_round_to(device_type: str, dtype: torch.dtype) -> int | None:
    """The ``round_to`` a model on a ``device_type`` device in ``dtype`` gets when none is given (`ROUND_TO`;
    None, no rounding, on a CPU and for pairs not in the table)."""
    return ROUND_TO.get((device_type, dtype))


#: ``(pm, calibration batches, kinds) -> {group name: importance per particle}`` (non-negative, low goes first)
Scorer = Callable[[ParticleMap, list, set[str]], dict[str, torch.Tensor]]


class Allocator(Protocol):
    """``(pm, importance, flops_to_remove, cfg, seq_len, prices, base_sizes) -> {group: indices to remove}``.

    ``importance`` is the scorer's output; ``prices`` (None: FLOPs) the measured milliseconds one particle of
    each kind saves (`latency_prices`); ``base_sizes`` each group's width in the original model (floors are
    shares of it). The plan must be physically valid for ``pm.prune``."""

    def __call__(self, pm: ParticleMap, importance: dict[str, torch.Tensor], flops_to_remove: float,
                 cfg: AllocationConfig, seq_len: int, prices: dict[str, float] | None = None,
                 base_sizes: dict[str, int] | None = None) -> dict[str, list[int]]: ...


# ---- scoring: the named scorers are particlize.analysis's registry ----------------------------------


def named_scorer(name: str) -> Scorer:
    """The `Scorer` registered as ``name`` in `particlize.analysis` (``|mean score|`` per particle:
    `particlize.analysis.importance_for`)."""
    get_scorer(name)

    def score(pm: ParticleMap, batches: list, kinds: set[str]) -> dict[str, torch.Tensor]:
        return importance_for(pm, batches, name, kinds)

    score.__name__ = score.__qualname__ = name
    return score


class PairImportance(dict):
    """A scorer's ``{group: importance}`` that also carries ``pairs``: the interaction frame of
    `particlize.analysis.interactions` (what `AllocationConfig(interactions=True)` corrects the ranking with)."""

    def __init__(self, importance: dict[str, torch.Tensor], pairs: pd.DataFrame):
        super().__init__(importance)
        self.pairs = pairs


def interaction_scorer(metric: str = "loss", method: str = "ablation", pairs: int | None = None,
                       max_rows: int | None = None) -> Scorer:
    """A `Scorer` for ``AllocationConfig(interactions=True)``: the exact single effects (``|mean|`` of
    ``ablation``, as `named_scorer("ablation")`) and the pairwise interactions among the scored kinds
    (``pairs``: all pairs, or those among the top ``pairs`` particles; ``method`` ``ablation`` or ``hessian``),
    both on ``metric`` so that they add up in the same units."""

    def score(pm: ParticleMap, batches: list, kinds: set[str]) -> dict[str, torch.Tensor]:
        imp = importance_for(pm, batches, "ablation", kinds, metric=metric)
        groups = [g.name for g in pm.groups if g.kind in kinds]
        return PairImportance(imp, interactions(pm, batches, groups, method, metric, pairs=pairs, max_rows=max_rows))

    score.__name__ = score.__qualname__ = f"interactions-{method}"
    return score


# ---- allocation -------------------------------------------------------------------------------------


def _keep_step(g: ParticleGroup, cfg: AllocationConfig) -> int:
    """The kept count of ``g`` must be a multiple of this: its grouped-query balance, and ``round_to`` applied
    to the *features* the particles span (a head is ``head_dim`` wide, so 32-dim heads meet any ``round_to``
    dividing 32 at every count; a neuron is one feature wide)."""
    if g.kind == "block":
        return 1
    if not cfg.round_to:
        return g.balanced
    slices = g.readers or g.writers
    w = slices[0].width if slices else 1
    return math.lcm(g.balanced, cfg.round_to // math.gcd(cfg.round_to, w))


def _keep_floor(g: ParticleGroup, cfg: AllocationConfig, base: int | None = None) -> int:
    """The fewest particles ``g`` may keep: ``min_width`` of its original width ``base`` (default: its
    width now), rounded up to a legal count (one block: none)."""
    if g.kind == "block":
        return 1
    return _legal_keep(max(1, math.ceil(cfg.min_width * (base or g.size))), g, cfg)


def original_sizes(teacher: nn.Module, current: nn.Module, pm: ParticleMap, teacher_pm: ParticleMap | None = None) -> dict[str, int]:
    """``{group of pm: its width in teacher}`` for a ``current`` model pruned from ``teacher`` (through the
    plans both carry: a layer that moved up when blocks before it were removed is matched to where it
    came from), so minimum widths stay shares of the original model over many rounds, not of the last one."""
    tpm = teacher_pm or decompose(teacher)
    moved = sorted(block_correspondence(teacher, current), key=lambda p: -len(p[1]))
    sizes = {}
    for g in pm.groups:
        name = g.name
        for t_path, s_path in moved:
            if name.startswith(s_path + "."):
                name = t_path + name[len(s_path):]
                break
        sizes[g.name] = tpm[name].size if name in tpm else g.size
    return sizes


def _legal_keep(n_keep: int, g: ParticleGroup, cfg: AllocationConfig) -> int:
    """Round a kept count up to what the hardware rounding and grouped-query balance allow."""
    if n_keep >= g.size:
        return g.size
    step = _keep_step(g, cfg)
    return min(g.size, math.ceil(n_keep / step) * step)


def allocate(
    pm: ParticleMap,
    importance: dict[str, torch.Tensor],
    flops_to_remove: float,
    cfg: AllocationConfig,
    seq_len: int,
    prices: dict[str, float] | None = None,
    base_sizes: dict[str, int] | None = None,
) -> dict[str, list[int]]:
    """The default `Allocator`: `allocate_global` or `allocate_uniform` as ``cfg.allocation`` says
    (``"auto"``: as `resolve_allocation` decides)."""
    mode = resolve_allocation(pm, importance, cfg, latency=prices is not None)
    return _allocate(pm, importance, flops_to_remove, cfg, seq_len, prices, base_sizes, mode)


def resolve_allocation(pm: ParticleMap, groups: Any, cfg: AllocationConfig, latency: bool = False) -> str:
    """``cfg.allocation``, with ``"auto"`` made concrete for the ``groups`` to be cut: ``"uniform"`` when every one
    of them is a conv channel group (no blocks), prices are FLOPs and no interactions are used; else ``"global"``.

    Why: channels that look free one at a time are not free together. On the Fashion-MNIST ResNet global
    allocation emptied the last stage (0.76 / 0.67 after recovery at 50% / 25% of the FLOPs, uniform 0.87 /
    0.83: benchmarks/results/vision.md); transformer heads and neurons measured better globally (RESULTS.md)."""
    if cfg.allocation != "auto":
        return cfg.allocation
    kinds = {pm[n].kind for n in groups}  # with blocks too: global (uniform allocation never removes a block)
    if kinds == {"channel"} and not latency and cfg.cost == "flops" and not cfg.interactions:
        return "uniform"
    return "global"


def allocate_global(
    pm: ParticleMap, importance: dict[str, torch.Tensor], flops_to_remove: float, cfg: AllocationConfig, seq_len: int,
    prices: dict[str, float] | None = None, base_sizes: dict[str, int] | None = None,
) -> dict[str, list[int]]:
    """An `Allocator`: the lowest importance per unit of price anywhere in the model first (see `_allocate`)."""
    return _allocate(pm, importance, flops_to_remove, cfg, seq_len, prices, base_sizes, "global")


def allocate_uniform(
    pm: ParticleMap, importance: dict[str, torch.Tensor], flops_to_remove: float, cfg: AllocationConfig, seq_len: int,
    prices: dict[str, float] | None = None, base_sizes: dict[str, int] | None = None,
) -> dict[str, list[int]]:
    """An `Allocator`: the same fraction of every layer's group, its least important particles (see `_allocate`)."""
    return _allocate(pm, importance, flops_to_remove, cfg, seq_len, prices, base_sizes, "uniform")


def _allocate(
    pm: ParticleMap, importance: dict[str, torch.Tensor], flops_to_remove: float, cfg: AllocationConfig, seq_len: int,
    prices: dict[str, float] | None, base_sizes: dict[str, int] | None, mode: str,
) -> dict[str, list[int]]:
    """Choose particles to remove until ``flops_to_remove`` is saved: ``global`` allocation takes the
    lowest importance per unit of price anywhere (price = the particle's FLOPs, or with ``prices`` the
    measured milliseconds one particle of its kind saves, `latency_prices`); ``uniform`` removes the
    same fraction of every layer's group, each time the least important particles of the group: the
    smallest fraction (searched to 2^-20) whose plan saves ``flops_to_remove``.

    Per group at most ``size - floor`` particles go (``min_width`` of the group's width in ``base_sizes``,
    the original model's, or else of its width now, rounded for
    ``round_to`` and grouped-query balance); kept counts are rounded up to legal widths afterwards,
    and when that rounding leaves the plan short of ``flops_to_remove`` (by `ParticleMap.cost`), the
    shortfall is asked for again, so one round still reaches its goal when the widths allow it.
    A removed block takes everything inside it along; a block that would overshoot the goal by more than
    1% of the prunable FLOPs waits until nothing smaller down the ranking can meet it (asked for 25%, a
    model is not cut to 19% because its cheapest particle was a sixth of it).
    """
    table = pm.table(seq_len=seq_len).set_index(["group", "index"])
    before = pm.cost(seq_len=seq_len).flops
    if mode == "uniform":  # the smallest per-layer fraction whose plan saves the goal (coupled groups save more
        lo, hi, best = 0.0, 1.0, None  # than the sum of their particles, so the fraction is searched, not divided)
        for _ in range(20):
            mid = (lo + hi) / 2
            plan = _allocate_once(pm, importance, 0.0, cfg, table, prices, base_sizes, mode, frac=mid)
            if before - pm.cost(plan, seq_len=seq_len).flops >= flops_to_remove * (1 - 1e-9):
                hi, best = mid, plan
            else:
                lo = mid
        return best if best is not None else _allocate_once(pm, importance, 0.0, cfg, table, prices, base_sizes, mode, frac=1.0)
    goal, remove = flops_to_remove, {}
    for _ in range(8):
        remove = _allocate_once(pm, importance, goal, cfg, table, prices, base_sizes, mode)
        short = flops_to_remove - (before - pm.cost(remove, seq_len=seq_len).flops)
        if short <= 1e-9 * before:
            break
        goal += short
    return remove


def _allocate_once(
    pm: ParticleMap, importance: dict[str, torch.Tensor], flops_to_remove: float, cfg: AllocationConfig, table: Any,
    prices: dict[str, float] | None = None, base_sizes: dict[str, int] | None = None, mode: str = "global",
    frac: float = 0.0,
) -> dict[str, list[int]]:
    costs = {name: table.loc[name].sort_index().flops.to_numpy() for name in importance}

    def price(name: str, i: int) -> float:
        return float(costs[name][i]) if prices is None else prices.get(pm[name].kind, 0.0)  # unpriced: last

    floors = {n: _keep_floor(pm[n], cfg, (base_sizes or {}).get(n)) for n in importance}

    def floor_of(g: ParticleGroup) -> int:
        return floors[g.name]

    counts: dict[str, int] = {}
    if cfg.interactions and not isinstance(importance, PairImportance):
        raise ParticlizeError("AllocationConfig(interactions=True) needs pairwise interactions with the scores: "
                              "score with particlize.allocate.interaction_scorer()")
    if mode == "uniform":  # ``frac`` of every (non-block) group, like per-layer pruning
        layered = [n for n in importance if pm[n].kind != "block"]
        for n in layered:
            g = pm[n]
            counts[n] = min(g.size - floor_of(g), round(frac * g.size))
    else:  # global: cheapest importance per FLOP first, anywhere in the model
        if cfg.interactions:  # ... each next particle priced with its interactions with those taken
            order = _interaction_order(pm, importance, price, floors)
            rank = {n: torch.full((pm[n].size,), float(len(order))) for n in importance}
            for k, (n, i) in enumerate(order):
                rank[n][i] = k
            importance = rank  # within a group, the particles go in the greedy's order
            cand = [(0.0, n, i) for n, i in order]
        else:
            cand = sorted((float(importance[n][i]) / max(price(n, i), 1e-12), n, i)
                          for n in importance for i in range(pm[n].size))
        owner = _block_owners(pm, importance)
        counted: dict[str, float] = {}  # FLOPs already counted as saved, per group
        dead: set[tuple[str, int]] = set()
        saved = 0.0
        # a block far past the goal waits: smaller particles further down the ranking may meet it closely
        tolerance = 0.01 * sum(float(costs[n].sum()) for n in importance if pm[n].kind != "block")
        waiting: list[tuple[str, int]] = []

        def gain_of(name: str, i: int) -> float | None:
            g = pm[name]
            if owner.get(name) in dead or g.size - counts.get(name, 0) - 1 < floor_of(g):
                return None
            gain = float(costs[name][i])
            if g.kind == "block":  # it takes what is inside along: count only what is not counted yet
                gain -= sum(v for n, v in counted.items() if owner.get(n) == (name, i))
            return gain

        def take(name: str, i: int, gain: float) -> None:
            nonlocal saved
            if pm[name].kind == "block":
                dead.add((name, i))
            counts[name] = counts.get(name, 0) + 1
            counted[name] = counted.get(name, 0.0) + gain
            saved += gain

        for _, name, i in cand:
            if saved >= flops_to_remove:
                break
            gain = gain_of(name, i)
            if gain is None:
                continue
            if pm[name].kind == "block" and saved + gain - flops_to_remove > tolerance:
                waiting.append((name, i))
                continue
            take(name, i, gain)
        for name, i in waiting:  # nothing smaller could meet the goal: the best-ranked blocks after all
            if saved >= flops_to_remove:
                break
            gain = gain_of(name, i)
            if gain is not None:
                take(name, i, gain)
    remove: dict[str, list[int]] = {}
    for name, count in counts.items():
        g = pm[name]
        keep_n = _legal_keep(g.size - count, g, cfg)
        n_remove = g.size - keep_n
        if n_remove <= 0:
            continue
        imp = importance[name]
        if g.balanced > 1 and g.kind != "block":  # the same number from every key/value group
            chunk, per = g.size // g.balanced, n_remove // g.balanced
            sel = []
            for c in range(g.balanced):
                order = torch.argsort(imp[c * chunk : (c + 1) * chunk])[:per]
                sel += [c * chunk + int(j) for j in order]
        else:
            sel = [int(j) for j in torch.argsort(imp)[:n_remove]]
        remove[name] = sorted(sel)
    owner = _block_owners(pm, remove)
    for name in [n for n in remove if n in owner and owner[n][1] in remove.get(owner[n][0], [])]:
        del remove[name]  # inside a removed block: goes with it
    return remove


def _interaction_order(pm: ParticleMap, importance: PairImportance, price: Callable[[str, int], float],
                       floors: dict[str, int]) -> list[tuple[str, int]]:
    """Greedy removal order with the pairwise correction: each step takes the particle whose importance
    plus its interactions with those already taken (`redundancy_score`: a particle redundant with a taken
    one now costs more, one that only worked with a taken one costs less), per unit of price, is lowest;
    a group stops at its floor. Interactions are kept on the particles that appear in pairs only."""
    cand = [(n, i) for n in importance for i in range(pm[n].size)]
    at = {p: k for k, p in enumerate(cand)}
    cost = torch.tensor([float(importance[n][i]) for n, i in cand], dtype=torch.float64)
    prices = torch.tensor([max(price(n, i), 1e-12) for n, i in cand], dtype=torch.float64)
    df = importance.pairs
    r = redundancy_score(df, df.attrs.get("metric", "loss")).to_numpy()
    ends = [[at.get((g, int(i)), -1) for g, i in zip(df[f"group_{s}"], df[f"index_{s}"])] for s in "ab"]
    ok = [k for k in range(len(r)) if ends[0][k] >= 0 and ends[1][k] >= 0]
    inv = sorted({ends[s][k] for s in (0, 1) for k in ok})  # particles with interactions
    row = {c: k for k, c in enumerate(inv)}
    R = torch.zeros(len(inv), len(inv), dtype=torch.float64)
    for k in ok:
        a, b = row[ends[0][k]], row[ends[1][k]]
        R[a, b] = R[b, a] = float(r[k])
    inv_t = torch.tensor(inv, dtype=torch.long)
    left = {n: pm[n].size - floors[n] for n in importance}
    open_ = torch.ones(len(cand), dtype=torch.bool)
    for k, (n, _) in enumerate(cand):
        open_[k] = left[n] > 0
    order: list[tuple[str, int]] = []
    while bool(open_.any()):
        k = int(torch.where(open_, cost / prices, torch.tensor(float("inf"), dtype=torch.float64)).argmin())
        n = cand[k][0]
        order.append(cand[k])
        open_[k] = False
        left[n] -= 1
        if left[n] <= 0:
            open_ &= torch.tensor([c[0] != n for c in cand])
        if k in row:
            cost[inv_t] += R[row[k]]
    return order


def _block_owners(pm: ParticleMap, groups: Any) -> dict[str, tuple[str, int]]:
    """``{group: (block group, block index)}`` for the groups that sit inside a block of ``groups``."""
    owners: dict[str, tuple[str, int]] = {}
    for bname in groups:
        b = pm[bname]
        if b.kind != "block":
            continue
        for i, path in enumerate(b.gate.modules):
            for g in pm.groups:
                if g.kind != "block" and (g.scope.startswith(path + ".") or g.name.startswith(path + ".")):
                    owners[g.name] = (bname, i)
    return owners


# ---- minimum widths and measured prices ---------------------------------------------------------


def _shrink_plan(pm: ParticleMap, cfg: AllocationConfig, kinds: set[str], fraction: float = 1.0) -> dict[str, list[int]]:
    """Remove ``fraction`` of what may go (down to the minimum widths) from every group of ``kinds``,
    the same number from every key/value group of a balanced one."""
    remove = {}
    for g in pm.groups:
        if g.kind not in kinds:
            continue
        floor = _keep_floor(g, cfg)
        if g.balanced == 1 or g.kind == "block":
            n = round(fraction * (g.size - floor))
            remove[g.name] = list(range(g.size - n, g.size))
        else:
            chunk = g.size // g.balanced
            n = round(fraction * (chunk - floor // g.balanced))
            remove[g.name] = [i for i in range(g.size) if i % chunk >= chunk - n]
    return {k: v for k, v in remove.items() if v}


def latency_prices(model: nn.Module, pm: ParticleMap, inputs: Any, cfg: AllocationConfig, kinds: set[str],
                   rounds: int = 3) -> dict[str, float]:
    """Measured milliseconds saved per removed particle, by kind: the model with half of what may go
    removed from every group of that kind against the intact model, timed in ``rounds`` interleaved
    pairs (median). What `allocate` prices particles by when ``cost="latency"``: on a real device a
    head or a block can save more time per FLOP than a neuron (fixed per-op costs, small matmuls)."""
    plans = {k: _shrink_plan(pm, cfg, {k}, 0.5) for k in sorted(kinds)}
    smaller = {k: (pm.prune(p), sum(len(v) for v in p.values())) for k, p in plans.items() if p}
    saved: dict[str, list[float]] = {k: [] for k in smaller}
    for _ in range(rounds):
        for k, (m, _n) in smaller.items():
            full = measure_latency(model, inputs, warmup=1, reps=3)
            saved[k].append(full - measure_latency(m, inputs, warmup=1, reps=3))
    return {k: max(statistics.median(saved[k]), 1e-9) / smaller[k][1] for k in smaller}


def smallest_shares(pm: ParticleMap, cfg: AllocationConfig) -> tuple[float, float]:
    """(FLOPs, params) the smallest model ``cfg`` allows keeps, as shares of ``pm``'s model: every group of
    the configured granularities at its minimum width (``min_width``, ``round_to``)."""
    dense, least = pm.cost(), pm.cost(_shrink_plan(pm, cfg, cfg.kinds))
    return least.flops / max(dense.flops, 1e-12), least.params / max(dense.params, 1e-12)


__all__ = [
    "ALLOCATIONS", "AllocationConfig", "Allocator", "GRANULARITIES", "PairImportance", "ROUND_TO", "Scorer", "allocate", "allocate_global",
    "allocate_uniform", "default_round_to", "interaction_scorer", "latency_prices", "named_scorer", "original_sizes",
    "resolve_allocation", "smallest_shares",
]
