"""Behaviour analysis: what each particle does to the output.

One entry point, `analyze`, with one signature for every scorer (one module each, registered with its
declared needs in `registry`; `scorers()` lists them):

| method          | what it computes                                                 | cost                    |
|-----------------|------------------------------------------------------------------|-------------------------|
| `magnitude`     | writer × reader weight norms                                     | no data                 |
| `activation`    | FLAP fluctuation (activation variance × reader column norm²)     | one forward per batch   |
| `taylor`        | −∂metric/∂gate at gate 1 (attribution patching), per example     | one forward + backward  |
| `taylor2`       | taylor + ½ Gauss–Newton curvature of the loss along the gate      | + one backward per class|
| `taylor-example`| mean over examples of \|taylor\| (effects of either sign add up)   | one forward + backward  |
| `taylor-norm`   | taylor with the next LayerNorm/RMSNorm evaluated exactly          | + one forward + backward|
| `fisher`        | Σ over examples of (∂metric/∂gate)²                               | one forward + backward  |
| `ablation`      | exact: metric with the particle ablated − intact metric          | fast exact engine       |
| `influence`     | blocks: 1 − cos(block input, block output) (ShortGPT)            | one forward per batch   |

Pairs: `interactions` gives ``I(i, j) = f(−i, −j) − f(−i) − f(−j) + f`` for pairs of particles, exact
(``ablation``) or from gate Hessian-vector products (``hessian``); `as_matrix`, `redundant_clusters`,
`synergistic_pairs` read it, `validate_interactions` checks the estimate against the exact values.

Scores of `taylor`, `taylor2`, `taylor-norm` and `ablation` are signed like an ablation effect on the
metric (``ScorerSpec.effect``): for ``metric="loss"`` a positive score means removing the particle raises
the loss (it matters). The others are "higher = more important" whatever the metric; `importance` turns
either into importance.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..errors import ParticlizeError
from ..adapters import decompose
from ..particles import ParticleMap
from . import ablation, activation, influence, magnitude, taylor, taylor_norm  # noqa: F401  (each registers its scorers)
from ._common import METRICS, Batch, as_batches, device_of, frame, select_groups
from ._progress import ProgressArg, progress_for
from .registry import MODES, ScorerSpec, check_needs, get_scorer, register, scorers
from .workshape import WorkShape, shape_for, work_shape


def _map(model_or_pm: nn.Module | ParticleMap) -> ParticleMap:
    if isinstance(model_or_pm, ParticleMap):
        return model_or_pm
    return decompose(model_or_pm)


def check_options(method: str, metric: str = "loss", mode: str = "zero", by: str | None = None) -> None:
    """Raise a one-line `ParticlizeError` for an unknown method, metric or mode, or options that do not fit
    what the method declares (checked before any model is loaded or run)."""
    check_needs(get_scorer(method), metric, mode, by)


def _fitting(spec: ScorerSpec, metric: str, mode: str) -> tuple[str, str]:
    """``metric`` and ``mode`` where ``spec`` takes them, else the defaults (which it ignores)."""
    return (metric if spec.metrics else "loss"), (mode if spec.modes else "zero")


def analyze(
    model_or_pm: nn.Module | ParticleMap,
    data: Iterable[Any] | None = None,
    method: str = "taylor",
    metric: str = "loss",
    mode: str = "zero",
    *,
    by: str | None = None,
    groups: Sequence[str] | str | None = None,
    max_rows: int | None = None,
    table: bool = True,
    progress: ProgressArg = None,
    **options: Any,
) -> pd.DataFrame:
    """Score every particle of a model by what it does to the output.

    ``data`` is an iterable of ``(inputs, targets)`` batches: ``inputs`` a tensor (called as
    ``model(inputs)``) or a dict (``model(**inputs)``), the output a tensor or an object with
    ``.logits``, ``targets`` class indices. ``method``: a registered scorer (`scorers`). ``metric``:
    ``loss`` (mean cross-entropy), ``accuracy``, ``logit_diff``, ``kl`` (to the intact model's outputs) or
    ``mse``. ``mode``: how a particle is ablated (``zero``, ``mean`` over ``data``, ``resample`` from
    another example). ``by``: None (mean over examples), ``"example"`` or ``"class"`` (one row per
    particle and example / target class). ``groups``: names or a kind (``"head"``) to restrict to (the
    method's own kinds only). ``max_rows`` and ``options``: the method's own options (e.g. ``seed``).
    Everything is checked against the method's declared needs before it runs; the defaults
    ``metric="loss"``, ``mode="zero"`` count as not asked for by methods that take no metric or mode.
    ``progress``: None (a bar on stderr when it is a terminal), True (a bar), False (silent) or a callable
    ``(done, total, description)`` for the methods that run long (the data-driven ones).
    Returns one row per particle (and example/class) with ``group, index, method, score`` joined onto
    ``pm.table()`` when ``table``.
    """
    spec = get_scorer(method)
    if max_rows is not None:
        options["max_rows"] = max_rows
    check_needs(spec, metric, mode, by, data is not None, options)
    pm = _map(model_or_pm)
    names = _scored_groups(pm, spec, select_groups(pm, groups))
    batches: list[Batch] = as_batches(data, device_of(pm.model)) if data is not None else []
    kw: dict[str, Any] = dict(options, groups=names)
    if spec.metrics:
        kw["metric"] = metric
    if spec.modes:
        kw["mode"] = mode
    was_training = pm.model.training
    pm.model.eval()
    try:
        with progress_for(progress if spec.takes_progress else False, method) as update:
            if spec.takes_progress:
                kw["progress"] = update
            scores = spec.fn(pm, batches, **kw)
    finally:
        pm.model.train(was_training)
    scores = {n: s for n, s in scores.items() if n in names}
    if not scores:
        raise ParticlizeError(f"method {method!r} scores none of the selected groups ({', '.join(names)}); "
                              "select other groups or use another method")
    targets = torch.cat([b.targets.cpu() for b in batches]) if batches and by == "class" else None  # (token targets
    # of batches of other lengths do not concatenate)
    df = frame(pm, scores, method, by, targets)
    if table:
        df = df.merge(pm.table(), on=["group", "index"], how="left")
    return df


def _scored_groups(pm: ParticleMap, spec: ScorerSpec, names: list[str]) -> list[str]:
    """``names`` of the kinds ``spec`` scores; an error if there were some and none is."""
    fit = [n for n in names if pm[n].kind in spec.kinds]
    if names and not fit:
        kinds = ", ".join(k + "s" for k in spec.kinds)
        raise ParticlizeError(f"method {spec.name!r} scores {kinds} only; select such groups (groups={spec.kinds[0]!r})")
    return fit


def importance(df: pd.DataFrame, metric: str = "loss") -> pd.Series:
    """Scores turned into "how much the particle matters" (higher = more). Effects on the metric (the
    frame's ``method`` declares ``effect``, or the frame names no method): the score itself for
    ``loss``/``kl``/``mse`` (ablating raises them), its negative for ``accuracy``/``logit_diff``. Scores that
    are importances already (``magnitude``, ``fisher``, ...): the score itself."""
    score = df["score"]
    if metric not in ("accuracy", "logit_diff"):
        return score
    if "method" not in df:
        return -score
    effect = df["method"].map(lambda m: get_scorer(m).effect).astype(bool)
    return score.where(~effect, -score)


def importance_for(
    pm: ParticleMap,
    batches: Iterable[Any] | None,
    scorer: str = "taylor",
    kinds: Collection[str] | None = None,
    *,
    metric: str = "loss",
    mode: str = "zero",
) -> dict[str, torch.Tensor]:
    """Non-negative importance ``{group: [n] float64}`` of every particle in the groups of ``kinds`` (all
    when None), for allocating what to prune: ``|mean score over the examples|`` of ``scorer`` (for
    ``taylor``, Molchanov et al.'s aggregated Taylor criterion; ``taylor-example``: the mean per-example
    |effect|; ``ablation``: the |exact mean effect|). ``batches`` may be None for scorers that need no data;
    ``metric`` and ``mode`` apply to the scorers that take them.
    A `ParticlizeError` if the scorer cannot score one of the groups (e.g. ``influence``: blocks only)."""
    spec = get_scorer(scorer)
    groups = [g.name for g in pm.groups if kinds is None or g.kind in kinds]
    other = sorted({pm[n].kind for n in groups} - set(spec.kinds))
    if other:
        plural = lambda kinds: ", ".join(k + "s" for k in kinds)  # noqa: E731
        raise ParticlizeError(f"scorer {scorer!r} scores {plural(spec.kinds)}, not {plural(other)}; "
                              "pick another scorer or granularity")
    df = analyze(pm, batches if spec.data else None, scorer, *_fitting(spec, metric, mode), groups=groups, table=False,
                 progress=False)
    per = df.set_index(["group", "index"]).score.abs()
    missing = [n for n in groups if n not in per.index.get_level_values(0)]
    if missing:
        raise ParticlizeError(f"scorer {scorer!r} cannot score {', '.join(missing)}; pick another scorer")
    return {name: torch.tensor(per.loc[name].sort_index().to_numpy()) for name in groups}


from .validate import top_particles, validate_scores  # noqa: E402  (uses analyze)
from .interactions import (as_matrix, interactions, interactions_table, redundancy_score,  # noqa: E402
                           redundant_clusters, synergistic_pairs, validate_interactions)

__all__ = ["METRICS", "MODES", "ScorerSpec", "WorkShape", "analyze", "as_matrix", "check_options", "get_scorer", "importance",
           "importance_for", "interactions", "interactions_table", "redundancy_score", "redundant_clusters", "register",
           "scorers", "shape_for", "synergistic_pairs", "top_particles", "validate_interactions", "validate_scores",
           "work_shape"]
