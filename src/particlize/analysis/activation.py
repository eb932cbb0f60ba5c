"""``activation``: statistics of each particle's activation at its gate, and FLAP's fluctuation.

Score = *fluctuation* (FLAP): per feature, the variance of the activation entering the reader times
the squared norm of the reader column that consumes it, summed over the particle's features — how much
the output moves when the particle is replaced by its mean. Blocks: the mean |update| of the block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..particles import ParticleMap, ResidualGate
from ._common import Batch, call
from .registry import ScorerSpec, register


def feature_moments(pm: ParticleMap, batches: Sequence[Batch], groups: Sequence[str]) -> dict[str, list[Tensor]]:
    """Per gate point: ``[count, sum |a|, sum a, sum a²]`` per feature (features along the gate dim)."""
    acc: dict[tuple[str, int], list] = {}

    def sink(name: str, i: int, a: Tensor) -> None:
        dim = pm[name].gate.gate_dim() % a.ndim
        x = a.detach().movedim(dim, -1).reshape(-1, a.shape[dim]).double()
        s = acc.setdefault((name, i), [0, 0.0, 0.0, 0.0])
        s[0] += x.shape[0]
        s[1] = s[1] + x.abs().sum(0)
        s[2] = s[2] + x.sum(0)
        s[3] = s[3] + x.square().sum(0)

    with torch.no_grad(), pm.capture(groups, sink):
        for b in batches:
            call(pm.model, b.inputs)
    out: dict[str, list[Tensor]] = {}
    for (name, i), v in sorted(acc.items()):
        out.setdefault(name, []).append(v)
    return out


def activation(pm: ParticleMap, batches: Sequence[Batch], *, groups: Sequence[str]) -> dict[str, Tensor]:
    """FLAP fluctuation ``[n]`` per particle of the ``groups`` that can be patched (blocks: mean |update|)."""
    groups = [n for n in groups if pm[n].gate.patchable]
    moments = feature_moments(pm, batches, groups)
    out: dict[str, Tensor] = {}
    for name in groups:
        g = pm[name]
        if isinstance(g.gate, ResidualGate):
            out[name] = torch.stack([(m[1] / m[0]).mean() for m in moments[name]])
            continue
        cnt, _, s1, s2 = moments[name][0]
        var = (s2 / cnt - (s1 / cnt).square()).clamp_min(0)  # [features]
        col = torch.zeros_like(var)
        for s in g.readers:
            w = pm._tensor(s.name).detach().double()
            col += w.movedim(s.dim % w.ndim, 0).reshape(w.shape[s.dim % w.ndim], -1).square().sum(1)
        out[name] = (var * col).reshape(g.size, -1).sum(1)
    return out


register(ScorerSpec("activation", "FLAP fluctuation: activation variance x reader column norm^2", activation))
