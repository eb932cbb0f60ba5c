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

from ..errors import ParticlizeError
from ..particles import ParticleMap
from . import _fitting, _map, analyze, importance
from ._common import Progress, as_batches, device_of, select_groups
from .ablation import _work_batches, ablation_effects
from .workshape import shape_for
from .registry import check_needs, get_scorer
from .taylor_norm import perturbation_sizes


PER_EXAMPLE_SCREENS = ("taylor", "taylor2", "taylor-norm")


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
    batches = as_batches(data, device_of(pm.model))
    cheap = analyze(pm, batches, method, *_fitting(get_scorer(method), metric, mode), groups=groups, table=False,
                    progress=progress)
    if exact is None:
        exact = analyze(pm, batches, "ablation", metric, mode, groups=groups, table=False, progress=progress)
    both = cheap.merge(exact[["group", "index", "score"]], on=["group", "index"], suffixes=("_cheap", "_exact"))
    kinds = {g.name: g.kind for g in pm.groups}
    both.insert(2, "kind", both.group.map(kinds))
    rows = []
    for kind, part in [*both.groupby("kind"), ("all", both)]:
        ci = importance(part.rename(columns={"score_cheap": "score"}), metric)
        ei = importance(part.rename(columns={"score_exact": "score"}).assign(method="ablation"), metric)
        kk = min(k, len(part))
        rows.append({
            "kind": kind, "particles": len(part), "method": method,
            "spearman": ci.corr(ei, method="spearman"), "kendall": ci.corr(ei, method="kendall"),
            "k": kk, "top_k_overlap": len(_topk(ci, kk) & _topk(ei, kk)) / kk if kk else float("nan"),
        })
    return Validation(pd.DataFrame(rows), both)


def _screen(pm: ParticleMap, batches: list, screen: str, metric: str, mode: str, names: list[str],
            progress: Progress | None) -> pd.DataFrame:
    """``group, index, screen_score`` and the error scales (`SCALES`) of each particle's estimate: ``width``,
    the mean per-example magnitude of the estimate (its magnitude for scorers without per-example
    estimates), and ``size``, the mean squared size of the perturbation (`perturbation_sizes`; NaN where
    unknown)."""
    spec = get_scorer(screen)
    if screen in PER_EXAMPLE_SCREENS:
        check_needs(spec, metric, mode)
        per = spec.fn(pm, batches, metric=metric, mode=mode, groups=names, progress=progress)
        sizes = perturbation_sizes(pm, batches, mode=mode, groups=names)
        per = {n: v.cpu() for n, v in per.items()}  # gate gradients stay where the model ran
        rows = [pd.DataFrame({"group": n, "index": range(v.shape[1]), "screen_score": v.mean(0).numpy(),
                              "width": v.abs().mean(0).numpy(),
                              "size": sizes[n].mean(0).numpy() if n in sizes else float("nan")})
                for n, v in per.items() if n in names]
        return pd.concat(rows, ignore_index=True)
    df = analyze(pm, batches, screen, *_fitting(spec, metric, mode), groups=names, table=False, progress=progress)
    return df.assign(screen_score=df["score"], width=df["score"].abs(), size=float("nan"))[
        ["group", "index", "screen_score", *SCALES]]


MIN_CALIBRATION = 10  # verified particles a group needs before its own error scale is trusted
SCALES = ("width", "size")  # what the error of a screen's estimate is measured in (`_screen`)


def _error_scale(seen: pd.DataFrame, open_: pd.DataFrame, confidence: float, scale: str = "width") -> pd.Series:
    """For each unverified particle, the ``confidence`` quantile of ``|exact − estimate| / scale`` over the
    verified particles of its group (the error of a first-order estimate depends on what follows the
    particle's layer), or over all verified particles while its group has fewer than `MIN_CALIBRATION`;
    infinite before anything is verified."""
    seen = seen[seen[scale] > 0]
    if seen.empty:
        return pd.Series(float("inf"), index=open_.index)
    ratio = (seen.exact - seen.est).abs() / seen[scale]
    by_group = ratio.groupby(seen.group)
    own = by_group.quantile(confidence)[by_group.size() >= MIN_CALIBRATION]
    return open_.group.map(own).fillna(float(ratio.quantile(confidence)))


def _optimistic(seen: pd.DataFrame, open_: pd.DataFrame, confidence: float) -> pd.Series:
    """Each unverified particle's optimistic value: its estimate plus the tightest of its error bars
    ``c × scale`` over `SCALES` (``c`` from `_error_scale`, one per scale). An error bar is infinite while
    nothing calibrates its ``c`` (also for a zero scale, where ``inf × 0`` would give NaN) or where the
    scale is unknown (NaN)."""
    inf = float("inf")
    bar = pd.Series(inf, index=open_.index)
    for col in SCALES:
        if col not in open_:
            continue
        c = _error_scale(seen, open_, confidence, col)
        this = (c * open_[col]).where((c != inf) & open_[col].notna(), inf)
        bar = bar.where(bar <= this, this)
    return open_.est + bar


def top_particles(
    model_or_pm: nn.Module | ParticleMap,
    data: Iterable[Any],
    k: int = 50,
    *,
    screen: str = "taylor-norm",
    shortlist: int | None = None,
    confidence: float = 0.99,
    exhaustive: Sequence[str] = ("head", "block"),
    metric: str = "loss",
    mode: str = "zero",
    groups: Sequence[str] | str | None = None,
    max_rows: int | None = None,
    progress: Progress | None = None,
) -> pd.DataFrame:
    """The ``k`` particles whose exact ablation matters most: screen all with ``screen``, ablate exactly
    every particle of the ``exhaustive`` kinds and a shortlist of the others, rank by the exact effect.
    Columns: ``group, index, kind, score`` (exact), ``screen_score``, ``rank``; ``attrs`` say how many
    particles were ablated exactly (``verified``) of how many (``particles``).

    The shortlist grows until no unverified particle can plausibly enter the top ``k`` (AtP*-style): each
    estimate gets an error bar, the smaller of ``c × scale`` for two scales — ``width``, the mean magnitude
    of its per-example estimates, and ``size``, the mean squared size of the perturbation (what a
    first-order remainder grows with) — each ``c`` the ``confidence`` quantile of ``|exact − estimate| /
    scale`` over the particles of its group verified so far (over all verified particles until the group
    has `MIN_CALIBRATION` of them); every particle whose optimistic value (estimate + error bar) reaches
    the k-th exact effect is ablated, ``k`` at a time, recalibrating after each batch. A fixed
    ``shortlist`` (an int) ablates just the top ``shortlist`` by the screen instead. The ``exhaustive``
    kinds (heads and blocks by default) are few and cheap to ablate exactly, and first-order screens are
    least reliable there (large, saturating effects), so they are never left to the screen; the many
    neurons or channels are."""
    pm = _map(model_or_pm)
    batches = as_batches(data, device_of(pm.model))
    names = select_groups(pm, groups)
    if not 0.0 < confidence <= 1.0:
        raise ParticlizeError(f"confidence is a quantile in (0, 1], got {confidence}")
    was_training = pm.model.training
    pm.model.eval()
    try:
        return _top_particles(pm, batches, k, names, screen, shortlist, confidence, exhaustive, metric, mode, max_rows,
                              progress)
    finally:
        pm.model.train(was_training)


def _top_particles(pm: ParticleMap, batches: list, k: int, names: list[str], screen: str, shortlist: int | None,
                   confidence: float, exhaustive: Sequence[str], metric: str, mode: str, max_rows: int | None,
                   progress: Progress | None) -> pd.DataFrame:
    kinds = {g.name: g.kind for g in pm.groups}
    cand = _screen(pm, batches, screen, metric, mode, names, progress)
    cand["kind"] = cand.group.map(kinds)
    sign = -1.0 if metric in ("accuracy", "logit_diff") else 1.0  # effects into importance (higher = matters more)
    cand["est"] = (sign if get_scorer(screen).effect else 1.0) * cand.screen_score
    cand["exact"] = float("nan")
    always = cand.kind.isin(list(exhaustive))
    rest = cand.loc[~always].sort_values("est", ascending=False)
    first = rest.index[: min(len(rest), shortlist if shortlist is not None else 2 * k)]
    todo = cand.index[always].append(first)
    # split padded batches by length once (as the device likes it), not in every round (only means over examples
    # are used here)
    split = shape_for(pm.model, batches).split if mode != "resample" else False
    work = [b for b, _ in _work_batches(pm.model, batches, metric, split)] if split else batches
    while len(todo):
        part = cand.loc[todo]
        only = {n: p["index"].tolist() for n, p in part.groupby("group")}
        eff = ablation_effects(pm, work, metric=metric, mode=mode, groups=list(only), max_rows=max_rows,
                               only=only, progress=progress, split=False)
        cand.loc[todo, "exact"] = [sign * float(eff[g][:, i].mean()) for g, i in zip(part.group, part["index"])]
        if shortlist is not None:
            break
        done = cand.exact.notna()
        tau = cand.exact[done].nlargest(min(k, int(done.sum()))).min() if done.sum() >= k else -float("inf")
        open_ = cand[~done & ~always]
        bound = _optimistic(cand[done & ~always], open_, confidence)
        todo = bound[bound >= tau].sort_values(ascending=False).index[:k]
    short = cand[cand.exact.notna()]
    top = short.loc[short.exact.nlargest(min(k, len(short))).index]
    top = top.assign(score=sign * top.exact)[["group", "index", "kind", "score", "screen_score"]].reset_index(drop=True)
    top["rank"] = range(1, len(top) + 1)
    top.attrs.update(verified=int(len(short)), particles=int(len(cand)), screen=screen)
    return top
