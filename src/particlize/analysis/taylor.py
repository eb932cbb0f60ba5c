"""First-order scores from gate gradients: ``taylor`` (attribution patching) and ``fisher``.

With a gate ``g`` on every particle, ``m(g = 0) - m(g = 1) ≈ -dm/dg`` at ``g = 1``: one backward gives
the estimated ablation effect of every particle at once (for ``mode="mean"``/``"resample"`` the gate
interpolates towards the patch, so the same gradient estimates those ablations). ``fisher`` sums the
squared per-example gate gradients (a second-order importance, always ≥ 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import ParticlizeError
from ..particles import ParticleMap
from ._common import Batch, Progress, call, per_example_metric


def gate_gradients(
    pm: ParticleMap,
    batches: Sequence[Batch],
    *,
    metric: str = "loss",
    mode: str = "zero",
    groups: Sequence[str],
    progress: Progress | None = None,
) -> dict[str, Tensor]:
    """``{group: [examples, n]}`` per-example gradients ``dm_b/dg`` at ``g = 1`` (one forward and one
    backward per batch; groups gated through weights get one pass per example)."""
    if metric in ("accuracy",):
        raise ParticlizeError("gate gradients need a differentiable metric: use 'loss' or 'logit_diff'")
    if metric == "kl":
        raise ParticlizeError("KL to the original has zero gradient at the original model; use metric='loss' or method='ablation'")
    model = pm.model
    patch = pm.mean_activations(groups, [b.inputs for b in batches]) if mode == "mean" else None
    if mode == "resample":
        raise ParticlizeError("method='taylor' supports mode 'zero' and 'mean'; use method='ablation' for 'resample'")
    per_row = [n for n in groups if pm[n].per_example]
    shared = [n for n in groups if not pm[n].per_example]
    out = {n: [] for n in groups}
    total = len(batches) + sum(b.size for b in batches) * bool(shared)
    done = 0
    for batch in batches:
        B = batch.size
        if per_row:
            gates = {n: torch.ones(B, pm[n].size, requires_grad=True) for n in per_row}
            with pm.gates(gates, {n: patch[n] for n in per_row} if patch else None):
                logits = call(model, batch.inputs)
                loss = per_example_metric(metric, logits, batch.targets).sum()
            # gradients for the gates only: no parameter .grad is computed or left behind
            for n, g in zip(gates, torch.autograd.grad(loss, list(gates.values()))):
                out[n].append(g.detach().double())
        done += 1
        if progress:
            progress(done, total, "gate gradients")
        for b in range(B) if shared else ():
            one = Batch(_row(batch.inputs, b, B), batch.targets[b : b + 1])
            gates = {n: torch.ones(pm[n].size, requires_grad=True) for n in shared}
            with pm.gates(gates):
                loss = per_example_metric(metric, call(model, one.inputs), one.targets).sum()
            for n, g in zip(gates, torch.autograd.grad(loss, list(gates.values()))):
                out[n].append(g.detach().double()[None])
            done += 1
            if progress:
                progress(done, total, "gate gradients (recurrent)")
    return {n: torch.cat(v) for n, v in out.items()}


def _row(inputs, b: int, B: int):
    from ._common import map_tensors

    return map_tensors(inputs, lambda t: t[b : b + 1] if t.ndim and t.shape[0] == B else t)


def taylor(pm: ParticleMap, batches: Sequence[Batch], **kw) -> dict[str, Tensor]:
    """Estimated ablation effect ``-dm/dg`` per example and particle."""
    return {n: -g for n, g in gate_gradients(pm, batches, **kw).items()}


def fisher(pm: ParticleMap, batches: Sequence[Batch], **kw) -> dict[str, Tensor]:
    """Sum over examples of the squared per-example gate gradient (returned as ``[n]``)."""
    return {n: g.square().sum(0) for n, g in gate_gradients(pm, batches, **kw).items()}
