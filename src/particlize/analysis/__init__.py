"""Behaviour analysis: what each particle does to the output.

One entry point, `analyze`, with one signature for every method (one module each):

| method       | what it computes                                                   | cost                    |
|--------------|--------------------------------------------------------------------|-------------------------|
| `magnitude`  | writer × reader weight norms                                       | no data                 |
| `activation` | FLAP fluctuation (activation variance × reader column norm²)       | one forward per batch   |
| `taylor`     | −∂metric/∂gate at gate 1 (attribution patching), per example       | one forward + backward  |
| `taylor2`    | taylor + ½ Gauss–Newton curvature of the loss along the gate        | + one backward per class|
| `taylor-norm`| taylor with the next LayerNorm/RMSNorm evaluated exactly            | + one forward + backward|
| `fisher`     | Σ over examples of (∂metric/∂gate)²                                 | one forward + backward  |
| `ablation`   | exact: metric with the particle ablated − intact metric            | fast exact engine       |
| `influence`  | blocks: 1 − cos(block input, block output) (ShortGPT)              | one forward per batch   |

Scores are signed like an ablation effect on the metric: for ``metric="loss"`` a positive score means
removing the particle raises the loss (it matters).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..errors import ParticlizeError
from ..particles import ParticleMap
from ._common import METRICS, Batch, Progress, as_batches, check_metric, frame, select_groups
from .ablation import ablation_effects
from .activation import activation
from .influence import influence
from .magnitude import magnitude
from .taylor import fisher, taylor, taylor2
from .taylor_norm import taylor_norm

METHODS: dict[str, Callable[..., Any]] = {
    "magnitude": magnitude, "activation": activation, "taylor": taylor, "taylor2": taylor2, "taylor-norm": taylor_norm,
    "fisher": fisher,
    "ablation": ablation_effects, "influence": influence,
}
MODES = ("zero", "mean", "resample")


def _map(model_or_pm: nn.Module | ParticleMap) -> ParticleMap:
    if isinstance(model_or_pm, ParticleMap):
        return model_or_pm
    from ..adapters import decompose

    return decompose(model_or_pm)


def check_options(method: str, metric: str, mode: str) -> None:
    """Raise a `ParticlizeError` naming the choices for an unknown method, metric or mode."""
    if method not in METHODS:
        raise ParticlizeError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if mode not in MODES:
        raise ParticlizeError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    check_metric(metric)


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
    progress: Progress | None = None,
) -> pd.DataFrame:
    """Score every particle of a model by what it does to the output.

    ``data`` is an iterable of ``(inputs, targets)`` batches: ``inputs`` a tensor (called as
    ``model(inputs)``) or a dict (``model(**inputs)``), the output a tensor or an object with
    ``.logits``, ``targets`` class indices. ``metric``: ``loss`` (mean cross-entropy), ``accuracy``,
    ``logit_diff`` or ``kl`` (to the intact model's outputs). ``mode``: how a particle is ablated
    (``zero``, ``mean`` over ``data``, ``resample`` from another example). ``by``: None (mean over
    examples), ``"example"`` or ``"class"`` (one row per particle and example / target class).
    ``groups``: names or a kind (``"head"``) to restrict to. Returns one row per particle (and
    example/class) with ``group, index, method, score`` joined onto ``pm.table()`` when ``table``.
    """
    check_options(method, metric, mode)
    pm = _map(model_or_pm)
    names = select_groups(pm, groups)
    batches: list[Batch] = [] if data is None and method == "magnitude" else as_batches(data or [])
    was_training = pm.model.training
    pm.model.eval()
    try:
        if method == "ablation":
            scores = ablation_effects(pm, batches, metric=metric, mode=mode, groups=names, max_rows=max_rows, progress=progress)
        elif method in ("taylor", "taylor2", "taylor-norm", "fisher"):
            scores = METHODS[method](pm, batches, metric=metric, mode=mode, groups=names, progress=progress)
        else:
            scores = METHODS[method](pm, batches, groups=names, progress=progress)
    finally:
        pm.model.train(was_training)
    scores = {n: s for n, s in scores.items() if n in names}
    targets = torch.cat([b.targets.cpu() for b in batches]) if batches else None
    df = frame(pm, scores, method, by, targets)
    if table:
        df = df.merge(pm.table(), on=["group", "index"], how="left")
    return df


def importance(df: pd.DataFrame, metric: str = "loss") -> pd.Series:
    """Scores turned into "how much the particle matters" (higher = more): the score itself for
    ``loss``/``kl`` (ablating raises them), its negative for ``accuracy``/``logit_diff``."""
    return -df["score"] if metric in ("accuracy", "logit_diff") else df["score"]


from .validate import top_particles, validate_scores  # noqa: E402  (uses analyze)

__all__ = ["METHODS", "METRICS", "MODES", "analyze", "importance", "top_particles", "validate_scores"]
