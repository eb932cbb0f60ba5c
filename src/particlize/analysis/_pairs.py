"""Exact joint ablation of particle pairs on the batched engine of `ablation`.

A pair ``(i, j)`` is a two-hot gate row. The naive way runs the whole model once per pair; this engine
gives the same numbers with less work:

1. **Start at the earlier gate.** As in `ablation`, the outputs of the modules that finish before the
   earlier particle's gated module (its *frontier*) are recorded once on the clean model and replayed.
2. **Share the prefix of the first particle.** For pairs whose particles sit at different gated modules
   (``i`` at ``t_i`` entered before ``t_j``), the model with ``i`` ablated is run once per ``i`` (a chunk of
   ``i`` per forward, one per row) only until the frontier of every later ``t_j`` is recorded — the forward
   stops there. Every pair ``(i, j)`` then runs only from ``t_j`` on, with those recordings replayed and
   ``j`` gated: the work per pair is the suffix after the *later* particle.
3. **Many pairs per forward**, one pair per row (``max_rows`` rows per forward), and padded batches split
   by length as in `ablation` (`_work_batches`).

Pairs at the same gated module (two heads of one layer) run from that module with both gates. The
sharing in (2) is used only when the earlier gated module lies inside a module of the later one's
frontier (so the recordings carry the first ablation); otherwise, and for groups that cannot be gated
per example, the pair runs from the earlier frontier with both gates, or by one forward per pair.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import ParticlizeError
from ..particles import InputGate, ParticleMap
from ._common import Batch, Progress, call, device_of, map_tensors, per_example_metric
from .ablation import ExecutionTrace, _expand, _recording, _replaced, _work_batches, default_rows
from .workshape import shape_for

Particle = tuple[str, int]
Pair = tuple[Particle, Particle]


class _Stop(Exception):
    """Raised by a recording hook once everything a prefix run had to record is recorded."""


def _target(pm: ParticleMap, name: str) -> str | None:
    g = pm[name]
    return g.gate.module if isinstance(g.gate, InputGate) and g.per_example else None


def _inside(path: str, mods: Sequence[str]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in mods)


def _gates(pm: ParticleMap, rows: Sequence[Sequence[Particle]], B: int, device: torch.device) -> dict[str, Tensor]:
    """Per-row gates ``{group: [B * len(rows), n]}`` zero at each row's particles (row ``b * k + j``:
    example ``b``, ``rows[j]``)."""
    k = len(rows)
    out: dict[str, Tensor] = {}
    for j, parts in enumerate(rows):
        for name, i in parts:
            if name not in out:
                out[name] = torch.ones(B, k, pm[name].size, device=device)
            out[name][:, j, i] = 0.0
    return {n: g.flatten(0, 1) for n, g in out.items()}


def _take(x: Any, B: int, k: int, pos: Tensor) -> Any:
    """Rows ``b * k + a`` of recorded outputs, for ``a`` in ``pos``: rows ``b * len(pos) + p``."""
    return map_tensors(x, lambda t: t.unflatten(0, (B, k)).index_select(1, pos.to(t.device)).flatten(0, 1)
                       if t.ndim and t.shape[0] == B * k else t)


def pair_effects(
    pm: ParticleMap,
    batches: Sequence[Batch],
    pairs: Sequence[Pair],
    *,
    metric: str = "loss",
    mode: str = "zero",
    max_rows: int | None = None,
    fast: bool = True,
    progress: Progress | None = None,
) -> Tensor:
    """``[examples, len(pairs)]`` float64: the metric with both particles of each pair ablated minus the
    intact metric. ``fast=False`` is the reference: one forward of the whole model per pair and batch."""
    if mode not in ("zero", "mean"):
        raise ParticlizeError(f"pairwise ablation supports mode 'zero' and 'mean', got {mode!r}")
    model = pm.model
    max_rows = max_rows or default_rows(model)
    names = sorted({p[0] for pair in pairs for p in pair})
    patch_all = pm.mean_activations(names, [b.inputs for b in batches]) if mode == "mean" else None
    total = sum(b.size for b in batches)
    # filled where the model runs (no host copy per chunk on a GPU), moved to the CPU once at the end
    out = torch.full((total, len(pairs)), float("nan"), dtype=torch.float64, device=device_of(model))
    work = _work_batches(model, batches, metric, shape_for(model, batches).split if fast else False)
    trace = ExecutionTrace(model, work[0][0]) if fast else None

    def target(name: str) -> str | None:
        t = _target(pm, name) if trace is not None else None
        return t if t is not None and t in trace.enter and trace.calls.get(t) == 1 else None

    joint: dict[str, list[int]] = defaultdict(list)  # earlier target -> pairs run with both gates from there
    firsts: dict[str, list[Particle]] = defaultdict(list)  # first target -> its first particles
    later: dict[tuple[str, Particle], list[tuple[int, Particle]]] = defaultdict(list)
    slow: list[int] = []
    frontiers: dict[str, list[str]] = {}
    for k, (a, b) in enumerate(pairs):
        ta, tb = target(a[0]), target(b[0])
        if ta is None or tb is None:
            slow.append(k)
            continue
        if trace.enter[ta] > trace.enter[tb]:
            (a, ta), (b, tb) = (b, tb), (a, ta)
        for t in (ta, tb):
            if t not in frontiers:
                frontiers[t] = trace.frontier(t)
        if ta == tb or not _inside(ta, frontiers[tb]):
            joint[ta].append(k)
            continue
        if (ta, a) not in later:
            firsts[ta].append(a)
        later[(ta, a)].append((k, b))
    needed = sorted({p for f in frontiers.values() for p in f})
    chunk_of = lambda B: max(1, max_rows // B)  # noqa: E731
    steps = 0
    for batch, _ in work:
        kk = chunk_of(batch.size)
        steps += sum(-(-len(v) // kk) for v in joint.values())
        for ta, fs in firsts.items():
            for c0 in range(0, len(fs), kk):
                steps += 1
                by_t: dict[str, int] = defaultdict(int)
                for a in fs[c0:c0 + kk]:
                    for _, b in later[(ta, a)]:
                        by_t[target(b[0])] += 1
                steps += sum(-(-v // kk) for v in by_t.values())
        steps += len(slow)
    done = 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, steps, what)

    def patch_for(gates: dict[str, Tensor]) -> dict[str, list[Tensor]] | None:
        return {n: patch_all[n] for n in gates} if patch_all else None

    for batch, pos in work:
        B = batch.size
        kk = chunk_of(B)
        cache: dict[str, Any] = {}
        with torch.no_grad(), _recording(model, needed, cache):
            clean = call(model, batch.inputs)
        base = per_example_metric(metric, clean, batch.targets, clean)

        def run(stub: dict[str, Any], gates: dict[str, Tensor], k: int) -> Tensor:
            with torch.no_grad(), _replaced(model, stub), pm.gates(gates, patch_for(gates)):
                logits = call(model, _expand(batch.inputs, B, k))
            m = per_example_metric(metric, logits, batch.targets.repeat_interleave(k, 0), clean.repeat_interleave(k, 0))
            return (m.view(B, k) - base[:, None]).double()

        for ta, ks in joint.items():  # both gates, from the earlier frontier
            for c0 in range(0, len(ks), kk):
                chunk = ks[c0:c0 + kk]
                stub = {p: _expand(cache[p], B, len(chunk)) for p in frontiers[ta]}
                gates = _gates(pm, [pairs[k] for k in chunk], B, clean.device)
                out[pos[:, None], torch.tensor(chunk)] = run(stub, gates, len(chunk))
                tick("pairs")
        for ta, fs in firsts.items():  # shared prefix of each first particle, then the later one's suffix
            for c0 in range(0, len(fs), kk):
                chunk = fs[c0:c0 + kk]
                ki = len(chunk)
                todo: dict[str, list[tuple[int, int, Particle]]] = defaultdict(list)  # later target -> (pair, a pos, b)
                for ai, a in enumerate(chunk):
                    for k, b in later[(ta, a)]:
                        todo[target(b[0])].append((k, ai, b))
                rec_paths = sorted({p for t in todo for p in frontiers[t]}, key=lambda p: trace.exit[p])
                rec: dict[str, Any] = {}
                stop_at = rec_paths[-1]

                def stop(mod, args, o):
                    raise _Stop

                stub = {p: _expand(cache[p], B, ki) for p in frontiers[ta]}
                gates = _gates(pm, [[a] for a in chunk], B, clean.device)
                handle = None
                try:
                    with torch.no_grad(), _replaced(model, stub), pm.gates(gates, patch_for(gates)), \
                            _recording(model, rec_paths, rec):
                        handle = model.get_submodule(stop_at).register_forward_hook(stop)
                        call(model, _expand(batch.inputs, B, ki))
                except _Stop:
                    pass
                finally:
                    if handle is not None:
                        handle.remove()
                tick("pairs (prefix)")
                for tb, items in todo.items():
                    for d0 in range(0, len(items), kk):
                        part = items[d0:d0 + kk]
                        apos = torch.tensor([ai for _, ai, _ in part])
                        stub = {p: _take(rec[p], B, ki, apos) for p in frontiers[tb]}
                        gates = _gates(pm, [[b] for _, _, b in part], B, clean.device)
                        out[pos[:, None], torch.tensor([k for k, _, _ in part])] = run(stub, gates, len(part))
                        tick("pairs")
        for k in slow:
            (na, ia), (nb, ib) = pairs[k]
            values = pm.gate_values({na: [ia]} if na != nb else {na: [ia, ib]})
            if na != nb:
                values.update(pm.gate_values({nb: [ib]}))
            patch = {n: patch_all[n] for n in values} if patch_all else None
            with torch.no_grad(), pm.gates(values, patch):
                logits = call(model, batch.inputs)
            out[pos, k] = (per_example_metric(metric, logits, batch.targets, clean) - base).double()
            tick("pairs (one forward each)")
    return out.cpu()
