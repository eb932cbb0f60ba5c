"""Recording particle attributes: cost, weight statistics and (optionally) activation statistics."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import Tensor

from .batches import run_batch
from .gates import ResidualGate, Slice

if TYPE_CHECKING:  # typing only: particles.py builds its table with this module
    from .particles import ParticleGroup, ParticleMap

COLUMNS = [
    "group", "kind", "layer", "index", "params", "flops", "flops_unit", "writer_norm", "reader_norm",
]


def _per_particle_sq(t: Tensor, s: Slice, n: int) -> Tensor:
    """Sum of squares of the elements each of the ``n`` particles owns in ``t`` along ``s``."""
    x = t.detach().float().movedim(s.dim % t.ndim, 0)
    x = x[s.indices(range(n)).to(x.device)].reshape(s.repeat, n, s.width, -1)
    return x.square().sum(dim=(0, 2, 3)).cpu()  # tables are built on the CPU, wherever the model is


def _slice_norms(pm: ParticleMap, g: ParticleGroup, slices: tuple[Slice, ...]) -> Tensor:
    if not slices:
        return torch.full((g.size,), math.nan)
    sq = sum(_per_particle_sq(pm._tensor(s.name), s, g.size) for s in slices)
    return sq.sqrt()


def unit_cost(pm: ParticleMap, g: ParticleGroup, seq_len: int) -> tuple[list[int], list[float]]:
    """Parameters and FLOPs saved by removing each particle of ``g`` alone (marginal cost)."""
    if g.kind == "block":
        params, flops = [], []
        for i, names in enumerate(g.owned):
            p = sum(pm._tensor(n).numel() for n in names if pm._is_param(n))
            f = sum(pm._tensor(n).numel() * pm.tensor_flops.get(n, 0.0) for n in names)
            if isinstance(g.gate, ResidualGate):
                scope = g.gate.modules[i] + "."
                f += sum(o.ctx_flops(seq_len) * o.size for o in pm.groups  # a coarse group's attention is its finer one's
                         if o.kind != "block" and o.contains is None and o.scope.startswith(scope))
            params.append(int(p))
            flops.append(float(f))
        return params, flops
    per_tensor: dict[str, dict[int, int]] = {}
    for s in (*g.writers, *g.readers):
        t = pm._tensor(s.name)
        per_tensor.setdefault(s.name, {})[s.dim % t.ndim] = s.width * s.repeat
    p, f = 0, 0.0
    for name, dims in per_tensor.items():
        shape = pm._tensor(name).shape
        gone = math.prod(shape) - math.prod(shape[d] - dims.get(d, 0) for d in range(len(shape)))
        if pm._is_param(name):
            p += gone
        f += gone * pm.tensor_flops.get(name, 0.0)
    f += g.ctx_flops(seq_len)
    return [int(p)] * g.size, [float(f)] * g.size


def particle_table(pm: ParticleMap, seq_len: int | None = None, data: Iterable[Any] | None = None) -> pd.DataFrame:
    """One row per particle: group, kind, layer, index, params, flops (per ``pm.flops_unit``, attention
    at ``seq_len`` tokens), writer/reader weight norms; with ``data``, also the mean |activation| and
    the activation standard deviation at the particle's gate."""
    seq_len = pm.seq_len if seq_len is None else seq_len
    frames = []
    for g in pm.groups:
        params, flops = unit_cost(pm, g, seq_len)
        if g.kind == "block":
            wn = torch.tensor([
                math.sqrt(float(sum(pm._tensor(n).detach().float().square().sum() for n in names)))
                if names else math.nan for names in g.owned
            ])
            rn = torch.full((g.size,), math.nan)
        else:
            wn, rn = _slice_norms(pm, g, g.writers), _slice_norms(pm, g, g.readers)
        frames.append(pd.DataFrame({
            "group": g.name, "kind": g.kind, "layer": g.layer if g.layer is not None else -1,
            "index": range(g.size), "params": params, "flops": flops, "flops_unit": pm.flops_unit,
            "writer_norm": wn.numpy(), "reader_norm": rn.numpy(),
        }))
    df = pd.concat(frames, ignore_index=True)[COLUMNS]
    if data is not None:
        df = df.merge(activation_stats(pm, data), on=["group", "index"], how="left")
    return df


@torch.no_grad()
def activation_stats(pm: ParticleMap, data: Iterable[Any]) -> pd.DataFrame:
    """Mean |a| and standard deviation of each particle's activation at its gate over ``data``.

    Groups whose activations cannot be observed (fused recurrent layers) are left out.
    """
    names = [g.name for g in pm.groups if g.gate.patchable]
    acc: dict[str, list] = {}

    def sink(name: str, i: int, a: Tensor) -> None:
        g = pm[name]
        if isinstance(g.gate, ResidualGate):  # a block's activation is its update; one particle per point
            x = a.detach().double().reshape(-1, 1)
            idx = slice(i, i + 1)
        else:
            dim = g.gate.gate_dim() % a.ndim
            x = a.detach().double().movedim(dim, -1).reshape(-1, g.size, a.shape[dim] // g.size)
            x = x.reshape(x.shape[0], g.size, -1).transpose(1, 2).reshape(-1, g.size)
            idx = slice(None)
        s = acc.setdefault(name, [torch.zeros(g.size, dtype=torch.float64, device=x.device) for _ in range(3)]
                           + [torch.zeros(g.size, device=x.device)])  # summed where the model runs
        s[0][idx] += x.abs().sum(0)
        s[1][idx] += x.sum(0)
        s[2][idx] += x.square().sum(0)
        s[3][idx] += x.shape[0]

    with pm.capture(names, sink):
        for batch in data:
            run_batch(pm.model, batch)
    rows = []
    for name, sums in acc.items():
        sa, s1, s2, cnt = (t.cpu() for t in sums)
        cnt = cnt.double().clamp_min(1)
        mean = s1 / cnt
        rows.append(pd.DataFrame({
            "group": name, "index": range(len(sa)), "act_mean_abs": (sa / cnt).numpy(),
            "act_std": (s2 / cnt - mean.square()).clamp_min(0).sqrt().numpy(),
        }))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["group", "index"])
