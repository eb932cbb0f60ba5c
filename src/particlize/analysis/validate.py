"""Cheap scores checked against the ground truth, and the exact top-k found fast.

`validate_scores` compares a cheap scorer with exact ablation (Spearman, Kendall, top-k overlap) per
particle kind. `top_particles` answers "which k particles matter most, exactly?": screen everything with
a cheap scorer, ablate a shortlist exactly (AtP*-style verification), rank by the exact effect.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from torch import nn

from ..particles import ParticleMap
from . import _map, analyze, importance
from ._common import Progress, as_batches, select_groups
from .ablation import ablation_effects


@dataclass
class Validation:
    """``summary``: one row per kind (and ``all``); ``scores``: cheap and exact side by side."""

    summary: pd.DataFrame
    scores: pd.DataFrame

    def __repr__(self) -> str:
        return f"Validation(\n{self.summary.to_string(index=False)}\n)"


def _topk(s: pd.Series, k: int) -> set:
    return set(s.nlargest(min(k, len(s))).index)


def validate_scores(
    model_or_pm: nn.Module | ParticleMap,
    data: Iterable[Any],
    method: str = "taylor",
    *,
    k: int = 50,
    metric: str = "loss",
    mode: str = "zero",
    groups: Sequence[str] | str | None = None,
    exact: pd.DataFrame | None = None,
    progress: Progress | None = None,
) -> Validation:
    """Agreement of ``method`` with exact ablation, per kind: Spearman and Kendall rank correlation
    of the scores, and the overlap of their top-k sets (by importance). Pass ``exact`` (a frame from
    ``analyze(..., method="ablation")`` with the same data, metric and mode) to reuse a sweep."""
    pm = _map(model_or_pm)
    batches = as_batches(data)
    cheap = analyze(pm, batches, method, metric, mode, groups=groups, table=False, progress=progress)
    if exact is None:
        exact = analyze(pm, batches, "ablation", metric, mode, groups=groups, table=False, progress=progress)
    both = cheap.merge(exact[["group", "index", "score"]], on=["group", "index"], suffixes=("_cheap", "_exact"))
    kinds = {g.name: g.kind for g in pm.groups}
    both.insert(2, "kind", both.group.map(kinds))
    rows = []
    for kind, part in [*both.groupby("kind"), ("all", both)]:
        ci = importance(part.rename(columns={"score_cheap": "score"}), metric)
        ei = importance(part.rename(columns={"score_exact": "score"}), metric)
        kk = min(k, len(part))
        rows.append({
            "kind": kind, "particles": len(part), "method": method,
            "spearman": ci.corr(ei, method="spearman"), "kendall": ci.corr(ei, method="kendall"),
            "k": kk, "top_k_overlap": len(_topk(ci, kk) & _topk(ei, kk)) / kk if kk else float("nan"),
        })
    return Validation(pd.DataFrame(rows), both)


def top_particles(
    model_or_pm: nn.Module | ParticleMap,
    data: Iterable[Any],
    k: int = 50,
    *,
    screen: str = "taylor",
    shortlist: int | None = None,
    exhaustive: Sequence[str] = ("head", "block"),
    metric: str = "loss",
    mode: str = "zero",
    groups: Sequence[str] | str | None = None,
    max_rows: int = 1024,
    progress: Progress | None = None,
) -> pd.DataFrame:
    """The ``k`` particles whose exact ablation matters most: screen all with ``screen``, ablate
    exactly the top ``shortlist`` (default ``4k``) of them plus every particle of the ``exhaustive``
    kinds, and rank by the exact effect. Columns: ``group, index, kind, score`` (exact),
    ``screen_score``, ``rank``.

    The ``exhaustive`` kinds (heads and blocks by default) are few and cheap to ablate exactly, and
    they are where first-order screens are least reliable (large, saturating effects), so they are
    never left to the screen; the many neurons or channels are."""
    pm = _map(model_or_pm)
    batches = as_batches(data)
    names = select_groups(pm, groups)
    cheap = analyze(pm, batches, screen, metric, mode, groups=names, table=False, progress=progress)
    kinds = cheap.group.map({g.name: g.kind for g in pm.groups})
    always = kinds.isin(list(exhaustive))
    rest = cheap[~always]
    n_short = min(len(rest), shortlist or 4 * k)
    short = pd.concat([cheap[always], rest.loc[importance(rest, metric).nlargest(n_short).index]])
    only = {n: part["index"].tolist() for n, part in short.groupby("group")}
    eff = ablation_effects(pm, batches, metric=metric, mode=mode, groups=list(only), max_rows=max_rows,
                           only=only, progress=progress)
    short = short.assign(screen_score=short["score"])
    short["score"] = [float(eff[g][:, i].mean()) for g, i in zip(short.group, short["index"])]
    short["kind"] = short.group.map({g.name: g.kind for g in pm.groups})
    top = short.loc[importance(short, metric).nlargest(min(k, len(short))).index]
    top = top[["group", "index", "kind", "score", "screen_score"]].reset_index(drop=True)
    top["rank"] = range(1, len(top) + 1)
    return top
