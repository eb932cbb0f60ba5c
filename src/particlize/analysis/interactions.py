"""Pairwise interactions: how much two particles' joint removal departs from the sum of their own.

    I(i, j) = f(without i, j) − f(without i) − f(without j) + f(intact)

with ``f`` the mean ``metric`` over the data and "without" an ablation (``mode``). Two methods:

- ``ablation`` — exact, on the pair engine (`_pairs.pair_effects`: two-hot gate rows, many pairs per
  forward, the earlier particle's prefix shared by all its later partners) and the single-particle
  engine (`ablation.ablation_effects`) for ``f(without i)``.
- ``hessian`` — the second-order estimate: expanding ``f`` around the gates ``g = 1``, the ablation of
  ``i`` and ``j`` is the step ``−e_i − e_j`` and ``I(i, j) ≈ ∂²f/∂g_i∂g_j`` (exact when ``f`` is quadratic in
  the gates). Hessian rows come from Hessian-vector products (``torch.func``: forward-over-reverse,
  ``vmap`` over a block of rows): one pass per block of rows and batch.

**Sign.** ``I`` is an effect on the metric. For a metric where higher is worse (``loss``, ``kl``, ``mse``),
``I > 0`` means **redundancy**: each particle covers for the other, so removing both costs more than the
two removals apart (each alone looks unimportant); ``I < 0`` means **synergy**: the pair only works
together, so once one is gone removing the other costs little. For ``accuracy`` and ``logit_diff`` (higher
is better) both signs flip. `redundancy_score` puts either on the "positive = redundant" scale.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..adapters import decompose
from ..errors import ParticlizeError
from ..particles import ParticleMap
from ._common import Batch, Progress, as_batches, call, device_of, frozen, per_example_metric, select_groups
from ._pairs import Pair, Particle, pair_effects
from .ablation import ablation_effects
from .registry import MODES
from .validate import Validation

METHODS = ("ablation", "hessian")
COLUMNS = ["group_a", "index_a", "group_b", "index_b", "interaction"]
_WORSE_IS_HIGHER = ("loss", "kl", "mse")
HVP_ROWS = 64  # examples x Hessian rows per HVP pass (memory: measured ~25 MB per MiniLM sentence x row)


def _check(method: str, metric: str, mode: str) -> None:
    if method not in METHODS:
        raise ParticlizeError(f"unknown interaction method {method!r}; use 'ablation' (exact) or 'hessian' (estimate)")
    if mode not in ("zero", "mean"):
        raise ParticlizeError(f"interactions support mode 'zero' and 'mean', got {mode!r}" if mode in MODES
                              else f"unknown ablation mode {mode!r}; use 'zero' or 'mean'")
    if method == "hessian" and metric == "accuracy":
        raise ParticlizeError("method='hessian' needs a differentiable metric: use 'loss', 'logit_diff', 'kl' or 'mse', "
                              "or method='ablation'")


def gate_hessian(
    pm: ParticleMap,
    batches: Sequence[Batch],
    particles: Sequence[Particle],
    *,
    metric: str = "loss",
    mode: str = "zero",
    block: int | None = None,
    progress: Progress | None = None,
) -> Tensor:
    """``[P, P]`` float64 Hessian of the mean ``metric`` over the examples w.r.t. the gates of ``particles``
    at ``g = 1`` (the other gates stay 1): rows from Hessian-vector products, ``block`` rows per pass
    (default: `HVP_ROWS` examples × rows per pass; forward-over-reverse keeps every row's activations,
    about 25 MB per MiniLM sentence and row, measured)."""
    model = pm.model
    names = sorted({n for n, _ in particles})
    index = {n: torch.tensor([i for m, i in particles if m == n]) for n in names}
    where = {n: torch.tensor([k for k, (m, _) in enumerate(particles) if m == n]) for n in names}
    patch = pm.mean_activations(names, [b.inputs for b in batches]) if mode == "mean" else None
    P = len(particles)
    H = torch.zeros(P, P, dtype=torch.float64)
    eye = torch.eye(P)
    steps, done = sum(-(-P // (block or max(1, HVP_ROWS // b.size))) for b in batches), 0
    total = sum(b.size for b in batches)
    for batch in batches:
        with torch.no_grad():
            ref = call(model, batch.inputs)

        def f(g: Tensor, batch: Batch = batch, ref: Tensor = ref) -> Tensor:
            gates = {n: torch.ones(pm[n].size).index_put((index[n],), g[where[n]]) for n in names}
            with pm.gates(gates, patch):
                out = call(model, batch.inputs)
            return per_example_metric(metric, out, batch.targets, ref).sum()

        rows = block or max(1, HVP_ROWS // batch.size)
        g0 = torch.ones(P)
        hvp = lambda v, f=f: torch.func.jvp(torch.func.grad(f), (g0,), (v,))[1]  # noqa: E731  (forward over reverse)
        # the fused attention kernels have no forward-mode or second derivative: use the math one here.
        # no_grad: torch.func's transforms still differentiate w.r.t. the gates, but no autograd graph over
        # the model's parameters is recorded (it kept every pass's activations alive: 20 GB on MiniLM)
        with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
            for r0 in range(0, P, rows):
                H[r0:r0 + rows] += _rows(hvp, eye[r0:r0 + rows])
            done += 1
            if progress is not None:
                progress(done, steps, "gate Hessian")
    H = H.detach() / total
    return (H + H.T) / 2  # exact up to rounding; symmetrised so (i, j) and (j, i) agree bit for bit


def _rows(hvp: Any, V: Tensor) -> Tensor:
    """``hvp`` of each row of ``V`` (vmapped; one by one where an op has no batching rule)."""
    try:
        return torch.func.vmap(hvp)(V).detach().double()
    except (RuntimeError, NotImplementedError):
        return torch.stack([hvp(v).detach() for v in V]).double()


def _particles(pm: ParticleMap, names: Sequence[str]) -> list[Particle]:
    return [(n, i) for n in names for i in range(pm[n].size)]


def _all_pairs(parts: Sequence[Particle]) -> list[Pair]:
    return list(itertools.combinations(parts, 2))


def _pairs_arg(pm: ParticleMap, names: list[str], pairs: Any) -> list[Pair] | int:
    """``pairs`` as a list of pairs, or the ``k`` of a top-k selection."""
    if pairs is None or pairs == "all":
        return _all_pairs(_particles(pm, names))
    if isinstance(pairs, bool) or (isinstance(pairs, int) and pairs < 2):
        raise ParticlizeError(f"pairs=k needs k >= 2 particles to pair up, got {pairs!r}")
    if isinstance(pairs, int):
        return pairs
    if isinstance(pairs, str):
        raise ParticlizeError(f"pairs must be None or 'all', a number k (pairs among the top k), or a list of pairs; got {pairs!r}")
    out = []
    for p in pairs:
        try:
            (na, ia), (nb, ib) = p
        except (TypeError, ValueError):
            raise ParticlizeError(f"each pair must be ((group, index), (group, index)); got {p!r}") from None
        for n, i in ((na, ia), (nb, ib)):
            if not 0 <= int(i) < pm[n].size:
                raise ParticlizeError(f"particle {i} of {n!r} does not exist (the group has {pm[n].size})")
        if (na, int(ia)) == (nb, int(ib)):
            raise ParticlizeError(f"a pair needs two different particles; got {p!r} twice")
        out.append(((na, int(ia)), (nb, int(ib))))
    return out


def interactions(
    model_or_pm: nn.Module | ParticleMap,
    data: Iterable[Any],
    groups: Sequence[str] | str | None = "head",
    method: str = "ablation",
    metric: str = "loss",
    mode: str = "zero",
    pairs: Any = None,
    *,
    max_rows: int | None = None,
    block: int | None = None,
    progress: Progress | None = None,
) -> pd.DataFrame:
    """Pairwise interaction ``I(i, j)`` of the particles in ``groups`` (names or a kind; default every head).

    ``pairs``: None or ``"all"`` (every unordered pair), ``k`` (every pair among the ``k`` particles with
    the largest \\|single effect\\|: exact for ``ablation``, \\|∂f/∂g\\| for ``hessian``), or an explicit list of
    ``((group, index), (group, index))``. ``method``: ``ablation`` (exact) or ``hessian`` (estimate, see the
    module docstring). Returns one row per unordered pair: ``group_a, index_a, group_b, index_b,
    interaction`` plus ``method``, and for ``ablation`` the ``joint`` effect (both removed) and the single
    effects ``effect_a``, ``effect_b`` (all effects are metric with the removal − intact metric, the mean over
    the examples). See the module docstring for the sign: under ``loss``, ``I > 0`` is redundancy.
    """
    _check(method, metric, mode)
    pm = model_or_pm if isinstance(model_or_pm, ParticleMap) else decompose(model_or_pm)
    names = select_groups(pm, groups)
    if not names:
        raise ParticlizeError("no particle groups selected; pass groups= a kind ('head', 'neuron', ...) or group names")
    batches = as_batches(data, device_of(pm.model))
    want = _pairs_arg(pm, names, pairs)
    was_training = pm.model.training
    pm.model.eval()
    try:
        if method == "ablation":
            df = _exact(pm, batches, names, want, metric, mode, max_rows, progress)
        else:
            df = _estimate(pm, batches, names, want, metric, mode, block, progress)
    finally:
        pm.model.train(was_training)
    df.attrs["metric"] = metric
    return df


def _exact(pm, batches, names, want, metric, mode, max_rows, progress) -> pd.DataFrame:
    if isinstance(want, int):
        single = ablation_effects(pm, batches, metric=metric, mode=mode, groups=names, max_rows=max_rows)
        parts = _top(single, want)
        want = _all_pairs(parts)
    else:
        only: dict[str, set[int]] = {}
        for pair in want:
            for n, i in pair:
                only.setdefault(n, set()).add(i)
        single = ablation_effects(pm, batches, metric=metric, mode=mode, groups=sorted(only), max_rows=max_rows,
                                  only={n: sorted(v) for n, v in only.items()})
    joint = pair_effects(pm, batches, want, metric=metric, mode=mode, max_rows=max_rows, progress=progress).mean(0)
    mean = {n: s.detach().mean(0) for n, s in single.items()}
    ea = torch.tensor([float(mean[n][i]) for (n, i), _ in want], dtype=torch.float64)
    eb = torch.tensor([float(mean[n][i]) for _, (n, i) in want], dtype=torch.float64)
    df = _frame(want, (joint - ea - eb).numpy(), "ablation")
    return df.assign(joint=joint.numpy(), effect_a=ea.numpy(), effect_b=eb.numpy())


def _top(single: dict[str, Tensor], k: int) -> list[Particle]:
    flat = [(abs(float(v)), n, i) for n, s in single.items() for i, v in enumerate(s.mean(0) if s.ndim == 2 else s)]
    flat.sort(key=lambda t: -t[0])
    return sorted((n, i) for _, n, i in flat[:k])


def _estimate(pm, batches, names, want, metric, mode, block, progress) -> pd.DataFrame:
    if isinstance(want, int):
        grads = _gate_grads(pm, batches, _particles(pm, names), metric, mode)
        want = _all_pairs(_top(grads, want))
    parts = sorted({p for pair in want for p in pair})
    H = gate_hessian(pm, batches, parts, metric=metric, mode=mode, block=block, progress=progress)
    at = {p: k for k, p in enumerate(parts)}
    vals = [float(H[at[a], at[b]]) for a, b in want]
    return _frame(want, vals, "hessian")


def _gate_grads(pm, batches, parts, metric, mode) -> dict[str, Tensor]:
    """``{group: [n]}`` mean ∂f/∂g at ``g = 1`` (for the top-k screen of the ``hessian`` method)."""
    names = sorted({n for n, _ in parts})
    patch = pm.mean_activations(names, [b.inputs for b in batches]) if mode == "mean" else None
    gates = {n: torch.ones(pm[n].size, requires_grad=True) for n in names}
    total = sum(b.size for b in batches)
    grads = {n: torch.zeros(pm[n].size, dtype=torch.float64) for n in names}
    for b in batches:
        with torch.no_grad():
            ref = call(pm.model, b.inputs)
        with pm.gates(gates, patch), frozen(pm.model):  # gradients for the gates only (no parameter's)
            out = call(pm.model, b.inputs)
        got = torch.autograd.grad(per_example_metric(metric, out, b.targets, ref).sum() / total, list(gates.values()))
        for n, g in zip(gates, got):
            grads[n] += g.double()
    return grads


def _frame(pairs: Sequence[Pair], values: Any, method: str) -> pd.DataFrame:
    return pd.DataFrame({
        "group_a": [a[0] for a, _ in pairs], "index_a": [a[1] for a, _ in pairs],
        "group_b": [b[0] for _, b in pairs], "index_b": [b[1] for _, b in pairs],
        "interaction": values, "method": method,
    })


# ---- reading the result ------------------------------------------------------------------------


def as_matrix(df: pd.DataFrame, group_a: str, group_b: str | None = None, value: str = "interaction") -> pd.DataFrame:
    """The dense ``[size_a, size_b]`` matrix of ``value`` between the particles of two groups (one group:
    its symmetric matrix), indexed by particle; pairs not in ``df`` and the diagonal are NaN."""
    group_b = group_b or group_a
    sizes = {}
    for g, col in ((group_a, "a"), (group_b, "b")):
        idx = pd.concat([df.loc[df.group_a == g, "index_a"], df.loc[df.group_b == g, "index_b"]])
        if idx.empty:
            raise ParticlizeError(f"no pair in the frame involves {g!r}; pass a group of its group_a/group_b columns")
        sizes[col] = int(idx.max()) + 1
    m = np.full((sizes["a"], sizes["b"]), np.nan)
    for a, b, ia, ib in (("group_a", "group_b", "index_a", "index_b"), ("group_b", "group_a", "index_b", "index_a")):
        part = df[(df[a] == group_a) & (df[b] == group_b)]
        m[part[ia].to_numpy(), part[ib].to_numpy()] = part[value].to_numpy()
    return pd.DataFrame(m, index=pd.RangeIndex(sizes["a"], name=group_a), columns=pd.RangeIndex(sizes["b"], name=group_b))


def redundancy_score(df: pd.DataFrame, metric: str = "loss") -> pd.Series:
    """The interaction on the "positive = redundant, negative = synergistic" scale: ``I`` for metrics where
    higher is worse (``loss``, ``kl``, ``mse``), ``−I`` for ``accuracy`` and ``logit_diff``."""
    if metric not in (*_WORSE_IS_HIGHER, "accuracy", "logit_diff"):
        raise ParticlizeError(f"unknown metric {metric!r}; use the metric the interactions were measured with")
    return df["interaction"] if metric in _WORSE_IS_HIGHER else -df["interaction"]


def redundant_clusters(df: pd.DataFrame, metric: str = "loss", threshold: float | None = None) -> pd.DataFrame:
    """Groups of particles that cover for each other: the connected components of the graph whose edges are
    the pairs with `redundancy_score` above ``threshold`` (default: the 95th percentile of \\|score\\| over all
    pairs, and above 0). One row per particle: ``cluster`` (0 = the cluster with the largest total score),
    ``group``, ``index``, ``size`` (particles in the cluster) and ``strength`` (sum of its edges' scores)."""
    r = redundancy_score(df, metric)
    if threshold is None:
        threshold = max(float(r.abs().quantile(0.95)), 0.0)
    edges = df[r > threshold]
    parent: dict[Particle, Particle] = {}

    def root(p: Particle) -> Particle:
        while parent.setdefault(p, p) != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    for a, b in zip(zip(edges.group_a, edges.index_a), zip(edges.group_b, edges.index_b)):
        parent[root(a)] = root(b)
    members: dict[Particle, list[Particle]] = {}
    for p in list(parent):
        members.setdefault(root(p), []).append(p)
    strength = {c: 0.0 for c in members}
    for (a, s) in zip(zip(edges.group_a, edges.index_a), r[r > threshold]):
        strength[root(a)] += float(s)
    order = sorted(members, key=lambda c: -strength[c])
    rows = [{"cluster": k, "group": g, "index": i, "size": len(members[c]), "strength": strength[c]}
            for k, c in enumerate(order) for g, i in sorted(members[c])]
    return pd.DataFrame(rows, columns=["cluster", "group", "index", "size", "strength"])


def synergistic_pairs(df: pd.DataFrame, metric: str = "loss", k: int = 10) -> pd.DataFrame:
    """The ``k`` pairs that most "only work together": the most negative `redundancy_score` (removing one
    already costs what removing both does), as rows of ``df`` with a ``redundancy`` column."""
    return df.assign(redundancy=redundancy_score(df, metric)).nsmallest(k, "redundancy")


def validate_interactions(
    model_or_pm: nn.Module | ParticleMap,
    data: Iterable[Any],
    groups: Sequence[str] | str | None = "head",
    *,
    k: int = 50,
    metric: str = "loss",
    mode: str = "zero",
    exact: pd.DataFrame | None = None,
    estimate: pd.DataFrame | None = None,
) -> Validation:
    """Agreement of the ``hessian`` estimate with exact ablation on the same pairs (in the style of
    `validate_scores`): Spearman and Kendall correlation of the interactions, and the overlap of the
    top-k pairs by \\|interaction\\|. Pass ``exact`` / ``estimate`` frames to reuse earlier runs."""
    pm = model_or_pm if isinstance(model_or_pm, ParticleMap) else decompose(model_or_pm)
    batches = as_batches(data, device_of(pm.model))
    if exact is None:
        exact = interactions(pm, batches, groups, "ablation", metric, mode)
    if estimate is None:
        want = list(zip(zip(exact.group_a, exact.index_a), zip(exact.group_b, exact.index_b)))
        estimate = interactions(pm, batches, groups, "hessian", metric, mode, pairs=want)
    keys = ["group_a", "index_a", "group_b", "index_b"]
    both = estimate[keys + ["interaction"]].merge(exact[keys + ["interaction"]], on=keys, suffixes=("_cheap", "_exact"))
    if both.empty:
        raise ParticlizeError("the estimate and the exact frame share no pair; compute both on the same pairs")
    c, e = both.interaction_cheap, both.interaction_exact
    kk = min(k, len(both))
    top = lambda s: set(s.abs().nlargest(kk).index)  # noqa: E731
    summary = pd.DataFrame([{
        "pairs": len(both), "method": "hessian", "spearman": c.corr(e, method="spearman"),
        "kendall": c.corr(e, method="kendall"), "k": kk, "top_k_overlap": len(top(c) & top(e)) / kk,
        "sign_agreement": float(((c > 0) == (e > 0)).mean()),
    }])
    return Validation(summary, both)


def interactions_table(
    model_or_pm: nn.Module | ParticleMap,
    batches: Iterable[Any],
    groups: Sequence[str] | str | None = "head",
    method: str = "ablation",
    metric: str = "loss",
    progress: Progress | None = None,
    *,
    mode: str = "zero",
    pairs: Any = None,
) -> pd.DataFrame:
    """What ``particlize analyze --interactions`` writes: `interactions` with each particle's layer and kind
    joined on (``layer_a``, ``kind_a``, ``layer_b``, ``kind_b``) and the ``metric``, sorted by \\|interaction\\|,
    largest first (``particlize report`` draws such a CSV)."""
    pm = model_or_pm if isinstance(model_or_pm, ParticleMap) else decompose(model_or_pm)
    df = interactions(pm, batches, groups, method, metric, mode, pairs, progress=progress)
    for s in ("a", "b"):
        df[f"layer_{s}"] = df[f"group_{s}"].map(lambda n: pm[n].layer)
        df[f"kind_{s}"] = df[f"group_{s}"].map(lambda n: pm[n].kind)
    df["metric"] = metric
    return df.reindex(df.interaction.abs().sort_values(ascending=False).index).reset_index(drop=True)
