"""The Plan: an ordered, serialisable list of structural steps ``{verb, group, args}``.

Everything particlize does to a model's structure is a step of its plan: ``prune`` (keep some particles of
a group), ``refit`` / ``merge`` / ``bias`` (let the kept particles' reader absorb what a prune is about to
cut), and the verbs later layers add. A model returned by surgery or `particlize.load` carries its
*provenance* — the recipe that rebuilds its base architecture and the plan applied since — and `save`
writes both, so `load` can rebuild the base, replay the plan verb by verb and load the weights.

Each step names its group as it is called in the model *before* that step; `prune` steps of one
operation list the non-block groups first and blocks last, so removing a block (which renumbers the
blocks after it) never renames a group a later step of the same operation refers to.

This module is part of the core: verbs are implemented in ``particlize.surgery`` and registered here
(`register_verb`), so the core can apply a plan without importing the layers above it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor, nn

from .errors import PlanError

if TYPE_CHECKING:  # typing only: particles.py imports this module
    from .particles import ParticleMap

FORMAT = 2  # of particlize.json; 1: the plan was a list of {group: kept indices} rounds
PROVENANCE = "_particlize"  # attribute carrying {"recipe": ..., "plan": Plan} on models particlize made


@dataclass(frozen=True)
class Step:
    """One structural change: ``verb`` applied to ``group`` with JSON-serialisable ``args``.

    ``payload`` holds tensors a weights-only verb computed from calibration data (a refit's least-squares
    solution); it is used when the step is first applied and is never saved or compared: when a saved plan
    is replayed, the values it produced come back with the weights.
    """

    verb: str
    group: str
    args: Mapping[str, Any] = field(default_factory=dict)
    payload: Mapping[str, Tensor] | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"verb": self.verb, "group": self.group, "args": _plain(self.args)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Step":
        if not isinstance(d, Mapping) or not isinstance(d.get("verb"), str) or not isinstance(d.get("group"), str):
            raise PlanError(f"a plan step must be {{'verb': str, 'group': str, 'args': {{...}}}}, got {d!r:.120}")
        return cls(d["verb"], d["group"], dict(d.get("args") or {}))


def _plain(x: Any) -> Any:
    """JSON-ready copy of step arguments (tuples → lists, tensors → lists)."""
    if isinstance(x, Tensor):
        return x.tolist()
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


@dataclass(frozen=True)
class Plan:
    """An ordered sequence of `Step`s. Immutable; ``+`` concatenates, slicing gives a `Plan`."""

    steps: tuple[Step, ...] = ()

    def __iter__(self) -> Iterator[Step]:
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i: int | slice) -> Any:
        return Plan(self.steps[i]) if isinstance(i, slice) else self.steps[i]

    def __add__(self, other: "Plan | Iterable[Step]") -> "Plan":
        return Plan(self.steps + tuple(other))

    def startswith(self, other: "Plan") -> bool:
        """Whether ``other`` is a prefix of this plan (a model descends from another)."""
        return self.steps[: len(other)] == other.steps

    def verbs(self) -> list[str]:
        return [s.verb for s in self.steps]

    def to_json(self) -> list[dict[str, Any]]:
        return [s.to_json() for s in self.steps]

    @classmethod
    def from_json(cls, data: Any, *, format: int = FORMAT) -> "Plan":
        """Read a plan as saved. Format 1 (a list of ``{group: kept}`` rounds) becomes prune steps."""
        if data is None:
            return cls()
        if not isinstance(data, list):
            raise PlanError(f"a saved plan is a list of steps, got {type(data).__name__}")
        if format == 1:
            steps: list[Step] = []
            for rnd in data:
                steps += prune_steps({k: list(v) for k, v in dict(rnd).items()}, blocks=_format1_blocks(rnd))
            return cls(tuple(steps))
        return cls(tuple(Step.from_json(d) for d in data))

    @classmethod
    def prune(cls, keep: Mapping[str, Sequence[int]], kinds: Mapping[str, str]) -> "Plan":
        """Prune steps keeping ``keep[group]`` particles; ``kinds`` (group → kind) puts blocks last."""
        return cls(tuple(prune_steps(keep, blocks={g for g in keep if kinds.get(g) == "block"})))


def _format1_blocks(rnd: Mapping[str, Any]) -> set[str]:
    # format 1 did not record kinds; every adapter names block groups "<container>.blocks"
    return {g for g in rnd if g.endswith(".blocks")}


def prune_steps(keep: Mapping[str, Sequence[int]], blocks: set[str]) -> list[Step]:
    """``prune`` steps for ``{group: kept indices}``: non-block groups first (in the given order), then blocks."""
    order = [g for g in keep if g not in blocks] + [g for g in keep if g in blocks]
    return [Step("prune", g, {"keep": sorted(int(i) for i in keep[g])}) for g in order]


# --------------------------------------------------------------------------------------------------
# Verbs: implemented by particlize.surgery, registered here


class Verb(Protocol):
    """What a verb implements, on a run of consecutive steps of that verb (`joins` decides how long a run
    is: one prune cuts several groups at once; other verbs take one step at a time).

    ``apply`` changes ``pm.model`` in place and returns it; with ``replay`` it only rebuilds the steps'
    structure on a freshly built model whose weights are loaded afterwards (a weights-only verb then changes
    nothing, or only shapes). ``carry`` returns the particle map of the changed model, derived from ``pm``
    (groups re-indexed) without decomposing again where it can."""

    name: str

    def joins(self, pm: "ParticleMap", run: Sequence[Step], step: Step) -> bool: ...

    def apply(self, pm: "ParticleMap", steps: Sequence[Step], *, replay: bool = False) -> nn.Module: ...

    def carry(self, pm: "ParticleMap", steps: Sequence[Step], model: nn.Module) -> "ParticleMap": ...


class Compensation(Verb, Protocol):
    """A weights-only verb that lets the kept particles' readers absorb what a prune will cut: ``steps``
    computes its steps from calibration ``data`` on the intact model, for the groups it can serve."""

    def steps(self, pm: "ParticleMap", keep: Mapping[str, Sequence[int]], data: Iterable[Any]) -> list[Step]: ...


_VERBS: dict[str, Verb] = {}


def register_verb(verb: Verb) -> Verb:
    """Make ``verb`` available to `run` and `particlize.load` under ``verb.name``."""
    _VERBS[verb.name] = verb
    return verb


def verbs() -> dict[str, Verb]:
    """The registered verbs by name."""
    return dict(_VERBS)


def get_verb(name: str, *, written_by: str | None = None) -> Verb:
    try:
        return _VERBS[name]
    except KeyError:
        who = f" (the plan was written by particlize {written_by})" if written_by else ""
        raise PlanError(
            f"unknown plan verb {name!r}{who}; this particlize knows {', '.join(sorted(_VERBS)) or 'none'}: "
            "upgrade particlize to load it"
        ) from None


def run(pm: "ParticleMap", plan: Plan | Iterable[Step], *, replay: bool = False,
        written_by: str | None = None) -> "ParticleMap":
    """Apply (or, with ``replay``, rebuild the structure of) the steps to ``pm.model`` in place, run by run,
    carrying the particle map along; returns the map of the final model (its ``.model``)."""
    steps = list(plan)

    def known(k: int) -> bool:
        if steps[k].group not in pm:
            raise PlanError(
                f"plan step {k + 1} ({steps[k].verb}) names a group the model does not have: {steps[k].group!r}"
            )
        return True

    i = 0
    while i < len(steps):
        verb = get_verb(steps[i].verb, written_by=written_by)
        known(i)
        batch = [steps[i]]
        while (i + len(batch) < len(steps) and steps[i + len(batch)].verb == verb.name
               and known(i + len(batch)) and verb.joins(pm, batch, steps[i + len(batch)])):
            batch.append(steps[i + len(batch)])
        model = verb.apply(pm, batch, replay=replay)
        pm = verb.carry(pm, batch, model)
        i += len(batch)
    return pm


def prune_model(pm: "ParticleMap", removed: Mapping[str, Sequence[int]], *,
                compensate: "str | Compensation | None" = None, data: Iterable[Any] | None = None) -> "ParticleMap":
    """The map of a deep copy of ``pm.model`` (its ``.model``) without the ``removed`` particles
    (``{group: indices}``), after an optional compensation computed on ``data``; the copy records the steps in
    its provenance. The map is carried from ``pm`` through the steps (decomposed again only where they require).

    Tensors about to be cut (or dropped with their block) are shared with the original instead of copied:
    verbs replace tensors and never write in place, so the original stays intact and is not copied twice."""
    keep = kept_indices(pm, removed)
    for name, idx in keep.items():
        pm[name].check_keep(idx)
        if pm[name].contains in keep:
            raise PlanError(f"{name!r} and {pm[name].contains!r} cut the same weights: remove key/value heads and "
                            "query heads of one layer in two prune calls (the second on the first's result)")
    steps: list[Step] = []
    if compensate not in (None, "none") and keep:
        comp = get_verb(compensate) if isinstance(compensate, str) else compensate
        if not hasattr(comp, "steps"):
            raise PlanError(f"{comp.name!r} is not a compensation verb; use one of {', '.join(compensations())}")
        if data is None:
            raise PlanError(f"compensate={comp.name!r} needs data=... (calibration batches the model runs on)")
        steps += comp.steps(pm, keep, data)
    steps += Plan.prune(keep, {n: pm[n].kind for n in keep}).steps
    memo: dict[int, Any] = {}
    for name, idx in keep.items():
        g = pm[name]
        if g.kind == "block":
            names = [t for i in set(range(g.size)) - set(idx) for t in g.owned[i]]
        else:
            names = [s.name for s in (*g.writers, *g.readers)]
        for t in names:
            memo[id(pm._tensor(t))] = pm._tensor(t)
    small = copy.deepcopy(pm.model, memo)
    out = run(pm.rebind(small), steps)
    set_provenance(small, pm.recipe, model_plan(pm.model) + [Step(s.verb, s.group, s.args) for s in steps])
    return out


def kept_indices(pm: "ParticleMap", removed: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """``{group: removed indices}`` → ``{group: kept indices}``, groups that lose nothing left out."""
    out = {}
    for name, r in removed.items():
        if r:
            gone = set(r)
            out[name] = [i for i in range(pm[name].size) if i not in gone]
    return out


def with_contained(pm: "ParticleMap", removed: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """``removed`` (``{group: indices}``) plus, for each group that ``contains`` a finer one, the finer particles
    inside its removed ones (key/value head ``i`` holds query heads ``i * c .. i * c + c - 1``)."""
    out = {n: list(r) for n, r in removed.items()}
    for name, gone in removed.items():
        if gone and (fine := pm[name].contains) in pm:
            c = pm[fine].size // pm[name].size
            out[fine] = sorted(set(out.get(fine, [])) | {i * c + j for i in gone for j in range(c)})
    return out


def compensations() -> list[str]:
    """Names of the registered compensation verbs (what ``compensate=`` accepts besides None)."""
    return sorted(n for n, v in _VERBS.items() if hasattr(v, "steps"))


# --------------------------------------------------------------------------------------------------
# Provenance


def provenance(model: nn.Module) -> dict[str, Any]:
    """``{"recipe": ..., "plan": Plan}`` recorded on a model by decompose/surgery/load (empty if none)."""
    prov = getattr(model, PROVENANCE, None) or {}
    plan = prov.get("plan")
    if plan is not None and not isinstance(plan, Plan):
        prov = {**prov, "plan": Plan.from_json(plan, format=1 if plan and "verb" not in plan[0] else FORMAT)}
    return prov


def model_plan(model: nn.Module) -> Plan:
    """The plan applied to ``model`` since its base architecture (empty for a model particlize never changed)."""
    return provenance(model).get("plan") or Plan()


def set_provenance(model: nn.Module, recipe: Mapping[str, Any] | None, plan: Plan) -> None:
    setattr(model, PROVENANCE, {"recipe": dict(recipe) if recipe is not None else None, "plan": plan})


__all__ = [
    "FORMAT", "PROVENANCE", "Compensation", "Plan", "Step", "Verb", "compensations", "get_verb", "model_plan",
    "kept_indices", "provenance", "prune_model", "prune_steps", "register_verb", "run", "set_provenance", "verbs",
    "with_contained",
]
