"""The scorer registry: every scorer, what it needs and what it gives, in one place.

Each scorer module registers a `ScorerSpec` when it is imported. `analyze`, `importance_for` (the
compress loop), the CLI help and `validate_scores` read the registry, so a new scorer is one module
with one `register` call and nothing else to edit.

A scorer is called as ``fn(pm, batches, *, groups, [progress], [metric], [mode], **options)``:
``metric`` and ``mode`` are passed only to scorers that declare them, ``progress`` only to those that
take it, and ``options`` are the scorer's own keyword arguments (e.g. ``max_rows`` for ``ablation``).
It returns ``{group: [n]}`` or, per example, ``{group: [examples, n]}``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import Tensor

from ..errors import ParticlizeError
from ..particles import KINDS
from ._common import METRICS

MODES = ("zero", "mean", "resample")
# what every scorer is called with (the rest of its keyword arguments are its own options)
_STANDARD = ("groups", "progress", "metric", "mode")

Scorer = Callable[..., Mapping[str, Tensor]]


@dataclass(frozen=True)
class ScorerSpec:
    """A scorer and its declared needs.

    ``data``: needs ``(inputs, targets)`` batches. ``metrics``: the metrics it can score (empty: it uses
    none, nor the targets); ``metric_note``: why others are not supported. ``modes``: the ablation modes
    it takes (empty: it ablates nothing). ``per_example``: it gives per-example scores (``by="example"``
    or ``"class"`` rows). ``kinds``: the particle kinds it scores. ``effect``: scores are effects on the
    metric (higher loss when removed: positive), so their sign depends on the metric; False: they are
    "higher = more important" already.
    """

    name: str
    summary: str
    fn: Scorer
    data: bool = True
    metrics: tuple[str, ...] = ()
    metric_note: str = ""
    modes: tuple[str, ...] = ()
    per_example: bool = False
    kinds: tuple[str, ...] = KINDS
    effect: bool = False
    options: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        params = inspect.signature(self.fn).parameters
        bad_metric = [m for m in self.metrics if m not in METRICS]
        bad_mode = [m for m in self.modes if m not in MODES]
        bad_kind = [k for k in self.kinds if k not in KINDS]
        if bad_metric or bad_mode or bad_kind or not self.kinds:
            raise ParticlizeError(f"scorer {self.name!r} declares unknown metrics {bad_metric}, modes {bad_mode} or "
                                  f"kinds {bad_kind or list(self.kinds)}; use {METRICS}, {MODES} and {KINDS}")
        for arg, declared in (("metric", bool(self.metrics)), ("mode", bool(self.modes)), ("groups", True)):
            if (arg in params) != declared:
                raise ParticlizeError(
                    f"scorer {self.name!r}: its function {'lacks' if declared else 'takes'} a {arg!r} argument but "
                    f"{'declares' if declared else 'does not declare'} one; make the function and the spec agree")
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            raise ParticlizeError(f"scorer {self.name!r} takes **kwargs; name its options so unknown ones are refused")
        own = tuple(n for n, p in params.items() if p.kind is p.KEYWORD_ONLY and n not in _STANDARD)
        object.__setattr__(self, "options", own)

    @property
    def takes_progress(self) -> bool:
        return "progress" in inspect.signature(self.fn).parameters


_REGISTRY: dict[str, ScorerSpec] = {}


def register(spec: ScorerSpec, *, replace: bool = False) -> ScorerSpec:
    """Add a scorer under ``spec.name`` (``replace=True`` to overwrite one); returns the spec."""
    if spec.name in _REGISTRY and not replace:
        raise ParticlizeError(f"a scorer named {spec.name!r} is registered already; pick another name or pass replace=True")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a scorer (e.g. one a test registered)."""
    get_scorer(name)
    del _REGISTRY[name]


def scorers() -> dict[str, ScorerSpec]:
    """Every registered scorer by name, in registration order."""
    return dict(_REGISTRY)


def get_scorer(name: str) -> ScorerSpec:
    """The spec of scorer ``name``; a `ParticlizeError` listing the names for an unknown one."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ParticlizeError(f"unknown method {name!r}; use one of {', '.join(_REGISTRY)}") from None


def check_needs(spec: ScorerSpec, metric: str, mode: str, by: str | None = None, has_data: bool = True,
                options: Mapping[str, object] | None = None) -> None:
    """Raise a one-line `ParticlizeError` where the options do not fit what ``spec`` declares. The
    defaults ``metric="loss"`` and ``mode="zero"`` count as not asked for by scorers that take none."""
    name = spec.name
    if mode not in MODES:
        raise ParticlizeError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if metric not in METRICS:
        raise ParticlizeError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    if not spec.metrics and metric != "loss":
        raise ParticlizeError(f"method {name!r} uses no metric (it scores without targets); drop metric={metric!r}")
    if spec.metrics and metric not in spec.metrics:
        note = f" ({spec.metric_note})" if spec.metric_note else ""
        raise ParticlizeError(f"method {name!r} supports metric {' or '.join(spec.metrics)}, not {metric!r}{note}")
    if not spec.modes and mode != "zero":
        raise ParticlizeError(f"method {name!r} ablates nothing, so it takes no mode; drop mode={mode!r}")
    if spec.modes and mode not in spec.modes:
        other = [s.name for s in _REGISTRY.values() if mode in s.modes]
        raise ParticlizeError(f"method {name!r} supports mode {' or '.join(spec.modes)}, not {mode!r}; "
                              f"for {mode!r} use method {' or '.join(map(repr, other))}")
    if by not in (None, "example", "class"):
        raise ParticlizeError(f"unknown by={by!r}; use None, 'example' or 'class'")
    if by is not None and not spec.per_example:
        raise ParticlizeError(f"method {name!r} has no per-example scores; use by=None (or a method such as "
                              f"{', '.join(s.name for s in _REGISTRY.values() if s.per_example)})")
    if spec.data and not has_data:
        raise ParticlizeError(f"method {name!r} needs data: pass (inputs, targets) batches")
    unknown = sorted(set(options or ()) - set(spec.options))
    if unknown:
        known = ", ".join(spec.options) or "none"
        raise ParticlizeError(f"method {name!r} has no option {', '.join(unknown)}; its options: {known}")


def help_text() -> str:
    """One ``name: summary`` entry per scorer, for the CLI."""
    return "; ".join(f"{s.name}: {s.summary}" for s in _REGISTRY.values())
