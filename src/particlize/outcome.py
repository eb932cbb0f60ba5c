"""How a compress run ends: which round is returned, whether the target was met, and why, in one sentence.

The quality floor is judged on what the user gets. A round whose validation quality falls below the floor
after its own share of recovery does not stop the loop (the next rounds' recovery often lifts it again); once
the rounds and any final recovery are over, the last model is returned if it meets the floor, otherwise the
last round that met it (the dense model, round 0, if none did). Every candidate is judged as it was saved, after
all the recovery it ships with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .errors import ParticlizeError


@dataclass
class Target:
    """Where the loop stops: shares of the dense model's FLOPs / params or a measured latency to reach (all
    given ones must be met), and the quality floor the returned model must meet after its recovery."""

    flops: float | None = 0.5
    params: float | None = None
    latency_ms: float | None = None
    min_quality: float = 0.99  # relative to the dense model's quality, e.g. its accuracy; 0: no floor

    def check(self) -> None:
        """Raise `ParticlizeError` for a missing or out-of-range target (named as the compress option)."""
        if self.flops is None and self.params is None and self.latency_ms is None:
            raise ParticlizeError("give a target: target_flops, target_params (fractions) or target_latency_ms")
        for name, v in (("target_flops", self.flops), ("target_params", self.params)):
            if v is not None and not 0.0 < v < 1.0:
                raise ParticlizeError(f"{name} is the fraction of the dense model to keep: it must be in (0, 1), got {v}")
        if self.latency_ms is not None and self.latency_ms <= 0:
            raise ParticlizeError(f"target_latency_ms must be positive, got {self.latency_ms}")
        if not 0.0 <= self.min_quality <= 1.5:
            raise ParticlizeError(
                f"min_quality is relative to the dense model's quality, e.g. its accuracy (0.99; 0 for no floor), got {self.min_quality}"
            )



@dataclass(frozen=True)
class Outcome:
    """The end of a compress run: ``target_met`` by the returned model, the ``returned_round`` (its checkpoint;
    0 is the dense model), the ``last_round`` run, why the rounds ended (``stopped``), the ``floor`` (absolute
    validation quality), the rounds that ended ``below_floor``, and the whole story in ``reason``."""

    target_met: bool
    returned_round: int
    last_round: int
    stopped: str
    floor: float
    below_floor: tuple[int, ...]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """As saved in ``history.json`` under ``"outcome"``."""
        return {**asdict(self), "below_floor": list(self.below_floor)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Outcome:
        """The outcome a finished run saved (`to_dict`)."""
        return cls(**{**data, "below_floor": tuple(data["below_floor"])})


def target_met(target: Target, entry: dict[str, Any]) -> bool:
    """Whether a round's entry meets every given part of a `Target` (FLOPs, params, latency)."""
    ok = True
    if target.flops is not None:
        ok &= entry["flops_ratio"] <= target.flops + 1e-9
    if target.params is not None:
        ok &= entry["params_ratio"] <= target.params + 1e-9
    if target.latency_ms is not None:
        ok &= entry["latency_ms"] <= target.latency_ms
    return bool(ok)


def decide(target: Target, history: list[dict[str, Any]], stopped: str, quality_name: str) -> Outcome:
    """The `Outcome` of a run whose rounds ended for the reason ``stopped``: the last entry of ``history`` if
    its validation quality meets the floor (``target.min_quality`` × round 0's), else the last entry that does,
    else round 0. Pure: a resumed run decides the same from the same history."""
    floor = target.min_quality * history[0]["quality"]
    last = history[-1]
    below = tuple(e["round"] for e in history[1:] if e["quality"] < floor)
    meets = [e for e in history if e["quality"] >= floor]
    returned = last if last["quality"] >= floor else (meets[-1] if meets else history[0])
    met = target_met(target, returned)
    if returned is last:
        reason = stopped if met else f"{_not_met(target, returned)} because {stopped}"
    else:
        fell = (f"{_label(last)} ended below the quality floor after its recovery (val {quality_name} "
                f"{last['quality']:.4f} < {floor:.4f}); ")
        name = "round 0 (the dense model)" if returned["round"] == 0 else f"round {returned['round']}"
        fell += (f"returned {name}, the last that meets it" if returned["quality"] >= floor else
                 "no round met it, so the dense model (round 0) is returned")
        if met:
            reason = f"{stopped}, but {fell}"
        elif stopped.startswith("target met"):
            reason = f"{_not_met(target, returned)} because {fell}"
        else:
            reason = f"{_not_met(target, returned)} because {stopped}, and {fell}"
    return Outcome(met, returned["round"], last["round"], stopped, floor, below, reason)


def _label(entry: dict[str, Any]) -> str:
    k = entry.get("final_recovery")
    return f"round {entry['round']} ({f'final recovery chunk {k}, ' if k else ''}{entry['flops_ratio']:.1%} of the FLOPs)"


def _not_met(target: Target, entry: dict[str, Any]) -> str:
    parts = []
    if target.flops is not None or (target.params is None and target.latency_ms is None):
        parts.append(f"{entry['flops_ratio']:.1%} of the FLOPs" + (f" (target {target.flops:.1%})" if target.flops is not None else ""))
    if target.params is not None:
        parts.append(f"{entry['params_ratio']:.1%} of the params (target {target.params:.1%})")
    if target.latency_ms is not None:
        parts.append(f"{entry['latency_ms']:.1f} ms (target {target.latency_ms:g} ms)")
    return f"target NOT met: stopped at {', '.join(parts)}"


__all__ = ["Outcome", "decide", "target_met"]
