"""Scores from gate gradients: ``taylor`` (attribution patching), ``taylor2`` and ``fisher``.

With a gate ``g`` on every particle, ``m(g = 0) - m(g = 1) ≈ -dm/dg`` at ``g = 1``: one backward gives
the estimated ablation effect of every particle at once (for ``mode="mean"``/``"resample"`` the gate
interpolates towards the patch, so the same gradient estimates those ablations). ``fisher`` sums the
squared per-example gate gradients (a second-order importance, always ≥ 0).

``taylor2`` adds the second-order term of the same expansion, ``L(0) − L(1) ≈ −L'(1) + ½ L''(1)``, with
``L''`` taken as the Gauss–Newton curvature of the cross-entropy along each gate, ``Σ_c p_c (d log p_c /
dg)²`` (equal to the model's Fisher information in the gate; Optimal Brain Damage in gate space). It
corrects particles whose effect is second order in their own gate (saturating outputs, large activations);
it costs a backward per class (or per sampled label for large vocabularies) instead of one. What neither
expansion sees is how the change propagates nonlinearly through later layers: on the MiniLM classifier
both rank the exact top-50 alike (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..errors import ParticlizeError
from ..particles import ParticleMap
from ._common import Batch, Progress, call, device_of, frozen, map_tensors, per_example_metric
from .registry import ScorerSpec, register


Objectives = Callable[[Tensor, Tensor], list[Tensor]]  # (outputs, targets) -> scalars, each a sum over examples
GATE_DTYPE = torch.float32  # gates and their gradients, whatever the model's dtype


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
    return _gate_gradients(pm, batches, lambda out, y: [per_example_metric(metric, out, y).sum()], metric=metric,
                           mode=mode, groups=groups, progress=progress)[0]


def check_gradient_metric(metric: str, mode: str) -> None:
    """Gate gradients need a differentiable metric with a non-zero gradient, and a patch that a gate can
    interpolate towards."""
    if metric in ("accuracy",):
        raise ParticlizeError("gate gradients need a differentiable metric: use 'loss' or 'logit_diff'")
    if metric == "kl":
        raise ParticlizeError("KL to the original has zero gradient at the original model; use metric='loss' or method='ablation'")
    if mode == "resample":
        raise ParticlizeError("method='taylor' supports mode 'zero' and 'mean'; use method='ablation' for 'resample'")


def _gate_gradients(
    pm: ParticleMap,
    batches: Sequence[Batch],
    objectives: Objectives,
    *,
    metric: str,
    mode: str,
    groups: Sequence[str],
    progress: Progress | None = None,
) -> list[dict[str, Tensor]]:
    """Per-example gate gradients of each of ``objectives`` (sums over the batch of per-example terms,
    so the gradient of row ``b``'s gate is example ``b``'s own): one forward and one backward each.

    In a bf16 / fp16 model the gates are fp32 leaves on the model's device. The gate multiplies the activation
    in the model's dtype, so each example's gradient is reduced over its tokens and features with the kernels'
    fp32 accumulator and rounded once to the model's precision on its way to the leaf; the per-example gradients
    are then kept in float64, so sums over examples (``fisher``) add no further rounding."""
    check_gradient_metric(metric, mode)
    model = pm.model
    dev = device_of(model)
    patch = pm.mean_activations(groups, [b.inputs for b in batches]) if mode == "mean" else None
    per_row = [n for n in groups if pm[n].per_example]
    shared = [n for n in groups if not pm[n].per_example]
    out: list[dict[str, list[Tensor]]] = []
    total = len(batches) + sum(b.size for b in batches) * bool(shared)
    done = 0

    def backward(gates: dict[str, Tensor], outputs: Tensor, targets: Tensor, unsqueeze: bool) -> None:
        objs = objectives(outputs, targets)
        while len(out) < len(objs):
            out.append({n: [] for n in groups})
        for k, obj in enumerate(objs):
            # gradients for the gates only: no parameter .grad is computed or left behind
            grads = torch.autograd.grad(obj, list(gates.values()), retain_graph=k + 1 < len(objs))
            for n, g in zip(gates, grads):
                out[k][n].append(g.detach().double()[None] if unsqueeze else g.detach().double())

    with frozen(model):  # gradients for the gates only: no layer input is kept for a weight gradient
        for batch in batches:
            B = batch.size
            if per_row:
                gates = {n: torch.ones(B, pm[n].size, dtype=GATE_DTYPE, device=dev, requires_grad=True) for n in per_row}
                with pm.gates(gates, {n: patch[n] for n in per_row} if patch else None):
                    backward(gates, call(model, batch.inputs), batch.targets, False)
            done += 1
            if progress:
                progress(done, total, "gate gradients")
            for b in range(B) if shared else ():
                one = Batch(_row(batch.inputs, b, B), batch.targets[b : b + 1])
                gates = {n: torch.ones(pm[n].size, dtype=GATE_DTYPE, device=dev, requires_grad=True) for n in shared}
                with pm.gates(gates):
                    backward(gates, call(model, one.inputs), one.targets, True)
                done += 1
                if progress:
                    progress(done, total, "gate gradients (recurrent)")
    return [{n: torch.cat(v) for n, v in o.items()} for o in out]


def _row(inputs, b: int, B: int):
    return map_tensors(inputs, lambda t: t[b : b + 1] if t.ndim and t.shape[0] == B else t)


def taylor(pm: ParticleMap, batches: Sequence[Batch], *, metric: str = "loss", mode: str = "zero",
           groups: Sequence[str], progress: Progress | None = None) -> dict[str, Tensor]:
    """Estimated ablation effect ``-dm/dg`` per example and particle."""
    grads = gate_gradients(pm, batches, metric=metric, mode=mode, groups=groups, progress=progress)
    return {n: -g for n, g in grads.items()}


def taylor_example(pm: ParticleMap, batches: Sequence[Batch], *, metric: str = "loss", mode: str = "zero",
                   groups: Sequence[str], progress: Progress | None = None) -> dict[str, Tensor]:
    """``|dm/dg|`` per example and particle: averaged over examples, the mean per-example |effect|, an
    importance that effects of opposite sign on different examples do not cancel."""
    grads = gate_gradients(pm, batches, metric=metric, mode=mode, groups=groups, progress=progress)
    return {n: g.abs() for n, g in grads.items()}


def _curvature_objectives(samples: int, seed: int, exact_up_to: int = 32) -> Objectives:
    """Objectives whose squared per-example gate gradients sum to the Gauss–Newton curvature of the
    cross-entropy: ``√p_c · log p_c`` for every class (exact; up to ``exact_up_to`` classes), else
    ``samples`` labels drawn from the model's own distribution (an unbiased Monte Carlo estimate,
    per token for token outputs, scaled by their count)."""
    gens: dict[torch.device, torch.Generator] = {}  # one per device the outputs come from (CUDA sampling needs its own)

    def objectives(outputs: Tensor, targets: Tensor) -> list[Tensor]:
        if targets.is_floating_point():
            raise ParticlizeError("method='taylor2' needs class targets (its curvature is that of the cross-entropy); "
                                  "use 'taylor' or 'fisher' for regression targets")
        logp = torch.log_softmax(outputs.float(), -1)
        if logp.ndim == 2 and logp.shape[-1] <= exact_up_to:
            w = logp.detach().exp().sqrt()
            return [(w[:, c] * logp[:, c]).sum() for c in range(logp.shape[-1])]
        flat = logp.reshape(logp.shape[0], -1, logp.shape[-1])  # [B, T, V]
        keep = torch.ones(flat.shape[:2], device=flat.device)
        gen = gens.setdefault(flat.device, torch.Generator(device=flat.device).manual_seed(seed))
        if targets.ndim == 2 and logp.ndim == 3:
            keep = (targets != -100).float()
        scale = keep.sum(1).clamp_min(1).rsqrt()  # L = mean over the example's tokens
        objs = []
        for _ in range(samples):
            y = torch.multinomial(flat.detach().exp().reshape(-1, flat.shape[-1]), 1, generator=gen).view(flat.shape[:2])
            lp = flat.gather(-1, y[..., None]).squeeze(-1)
            objs.append(((lp * keep).sum(1) * scale / samples**0.5).sum())
        return objs

    return objectives


def taylor2(pm: ParticleMap, batches: Sequence[Batch], *, metric: str = "loss", mode: str = "zero",
            groups: Sequence[str], progress: Progress | None = None, samples: int = 8, seed: int = 0,
            exact_classes: int = 32) -> dict[str, Tensor]:
    """Second-order estimate of the ablation effect per example and particle: ``−dL/dg + ½ GN``, the
    curvature exact for up to ``exact_classes`` classes, else from ``samples`` sampled labels."""
    if metric != "loss":
        raise ParticlizeError(f"method='taylor2' estimates the cross-entropy ('loss'), not {metric!r}")
    curv = _curvature_objectives(samples, seed, exact_classes)
    grads = _gate_gradients(pm, batches, lambda out, y: [per_example_metric("loss", out, y).sum(), *curv(out, y)],
                            metric=metric, mode=mode, groups=groups, progress=progress)
    first, rest = grads[0], grads[1:]
    return {n: -first[n] + 0.5 * sum(r[n].square() for r in rest) for n in first}


def fisher(pm: ParticleMap, batches: Sequence[Batch], *, metric: str = "loss", mode: str = "zero",
           groups: Sequence[str], progress: Progress | None = None) -> dict[str, Tensor]:
    """Sum over examples of the squared per-example gate gradient (returned as ``[n]``)."""
    grads = gate_gradients(pm, batches, metric=metric, mode=mode, groups=groups, progress=progress)
    return {n: g.square().sum(0) for n, g in grads.items()}


GRADIENT_METRICS = ("loss", "logit_diff", "mse")
GRADIENT_NOTE = ("gate gradients need a differentiable metric with a non-zero gradient at the intact model; "
                 "for accuracy or kl use method='ablation'")
_GRADIENT = dict(metrics=GRADIENT_METRICS, metric_note=GRADIENT_NOTE, modes=("zero", "mean"))
register(ScorerSpec("taylor", "-dmetric/dgate at gate 1 (attribution patching), per example", taylor,
                    per_example=True, effect=True, **_GRADIENT))
register(ScorerSpec("taylor2", "taylor + 1/2 Gauss-Newton curvature of the loss along the gate", taylor2,
                    metrics=("loss",), metric_note="it estimates the cross-entropy", modes=("zero", "mean"),
                    per_example=True, effect=True))
register(ScorerSpec("taylor-example", "mean over examples of |taylor| (effects of either sign add up)", taylor_example,
                    per_example=True, **_GRADIENT))
register(ScorerSpec("fisher", "sum over examples of (dmetric/dgate)^2", fisher, **_GRADIENT))
