"""Exact ablation: the ground truth of what each particle does to the output, made fast.

The naive way costs one full forward per particle. We compute the same numbers with less work and no
approximation:

1. **Start at the gate.** One clean forward records the output of every module that finishes before
   a group's gated module is entered (embeddings, earlier blocks, and inside the block everything
   before the reader — the attention core for heads, the attention and up-projection for neurons).
   Ablation forwards then replace those modules by their recorded outputs: only the gated module and
   what follows it run.
2. **Update the reader, do not rerun it.** When the gated module is a plain ``nn.Linear`` reading the
   particles on its input features, removing particle ``i`` changes its output by
   ``(patch - x)[..., cols_i] @ W[:, cols_i].T`` — a rank-``width`` correction of the recorded clean
   output (1/n of the reader's matmul). The reader is replaced by ``clean + correction`` per row.
3. **Nor the layers after the next norm.** That correction reaches the first LayerNorm/RMSNorm after the
   reader unchanged (checked), and a norm maps a rank-``width`` change of its input to its clean output
   rescaled per token plus a known direction (`low_rank_scales`); so the plain ``nn.Linear`` layers that
   read the norm's output (Q/K/V after an FFN, the up projections after attention) get their recorded
   output updated the same way instead of a matmul. The update is compared with the real layers on the
   first chunk of each group and used only if they agree.
4. **Many particles per forward.** Each example is repeated once per particle of a chunk and each row
   gets its own gate mask (``[rows, n]``), so one forward ablates a whole chunk of particles.
5. **Little padding.** A batch of padded sequences (a dict with a right-padded 2-D ``attention_mask``) is
   split into sub-batches by real length with the padding cut off: one per length on a CPU, where padded
   positions are work thrown away; a few large buckets on a GPU, where every forward costs its kernel
   launches (`particlize.analysis.workshape`). The split is used only when it leaves each example's clean
   metric unchanged (checked per batch), so models whose output depends on padding keep whole batches.
6. **Batched over examples, chunked** (``max_rows``; by default sized for the device and its free memory).
   On a GPU nothing in the particle loop waits for the device: effects gather on it and move once.

Only modules called exactly once per forward are replaced, so shared or re-entrant modules are always
recomputed. Groups that cannot be gated per example (fused recurrent layers) fall back to one batched
forward per particle.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..particles import InputGate, ParticleMap, ResidualGate
from ._common import METRICS, Batch, Progress, call, device_of, map_tensors, per_example_metric
from ._norms import is_norm, low_rank_scales, next_norm, norm_params
from .registry import MODES, ScorerSpec, register
from .workshape import CPU_ROWS, GPU_DEFAULT_ROWS, shape_for
from .workshape import by_length as _by_length, work_batches as _work_batches  # noqa: F401  (their old home)

Job = tuple[str, str | None, list[int]]  # group, gated module path (None: cannot start there), particles


class ExecutionTrace:
    """Order in which a model's modules are entered and left during one forward, and which modules
    take a normalisation layer's output itself as their first argument (``fed_by_norm``)."""

    def __init__(self, model: nn.Module, batch: Batch):
        self.enter: dict[str, int] = {}
        self.exit: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.fed_by_norm: dict[str, str] = {}
        norm_outputs: dict[int, tuple[str, Tensor]] = {}
        clock = [0]
        handles = []

        def pre(path):
            def hook(mod, args):
                self.calls[path] = self.calls.get(path, 0) + 1
                self.enter.setdefault(path, clock[0])
                clock[0] += 1
                src = norm_outputs.get(id(args[0])) if args and isinstance(args[0], Tensor) else None
                if src is not None and src[1] is args[0]:
                    self.fed_by_norm.setdefault(path, src[0])

            return hook

        def post(path):
            def hook(mod, args, out):
                self.exit.setdefault(path, clock[0])
                clock[0] += 1
                if isinstance(out, Tensor) and is_norm(mod):
                    norm_outputs[id(out)] = (path, out)

            return hook

        try:
            for path, mod in model.named_modules():
                if path:
                    handles.append(mod.register_forward_pre_hook(pre(path)))
                    handles.append(mod.register_forward_hook(post(path)))
            with torch.no_grad():
                call(model, batch.inputs)
        finally:
            for h in handles:
                h.remove()
        self.model = model

    def frontier(self, target: str) -> list[str]:
        """Modules to replace by recorded outputs when ablating at ``target``: called once, finished
        before ``target`` is entered, not inside another such module, and without their own forward."""
        if target not in self.enter:
            return []
        t = self.enter[target]
        done = {p for p, e in self.exit.items() if e < t and self.calls.get(p) == 1}
        out = []
        for p in sorted(done, key=lambda p: self.enter[p]):
            parts = p.split(".")
            if any(".".join(parts[:i]) in done for i in range(1, len(parts))):
                continue
            if "forward" in vars(self.model.get_submodule(p)):
                continue
            out.append(p)
        return out


def _expand(x: Any, batch: int, k: int) -> Any:
    """Repeat every batch-first tensor ``k`` times per example (row ``b * k + j``)."""
    return map_tensors(x, lambda t: t.repeat_interleave(k, 0) if t.ndim and t.shape[0] == batch else t)


class _Later:
    """An output made when the replaced module is called, not before: the expanded recordings of the layers
    before a gate then live one at a time (each is dropped when the next layer returns its own), not all at once."""

    def __init__(self, make: Callable[[], Any]):
        self.make = make


@contextlib.contextmanager
def _replaced(model: nn.Module, outputs: Mapping[str, Any]) -> Iterator[None]:
    mods = []
    try:
        for path, out in outputs.items():
            mod = model.get_submodule(path)
            mod.forward = (lambda *a, _out=out, **kw: _out.make()) if isinstance(out, _Later) \
                else (lambda *a, _out=out, **kw: _out)  # type: ignore[method-assign]
            mods.append(mod)
        yield
    finally:
        for mod in mods:
            del mod.forward


def _output(args: tuple, out: Any) -> Any:
    return map_tensors(out, lambda t: t.detach())


def _input_and_output(args: tuple, out: Tensor) -> tuple[Tensor, Tensor]:
    return args[0].detach(), out.detach()


@contextlib.contextmanager
def _recording(
    model: nn.Module, paths: Sequence[str], store: dict[str, Any], keep: Callable[[tuple, Any], Any] = _output
) -> Iterator[None]:
    """Store ``keep(args, output)`` of each module in ``paths`` (its output by default) during forwards."""
    handles = []
    try:
        for p in paths:
            def hook(mod, args, out, p=p):
                store[p] = keep(args, out)

            handles.append(model.get_submodule(p).register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def _linear_reader(pm: ParticleMap, name: str, target: str | None, trace: "ExecutionTrace | None") -> nn.Linear | None:
    """The group's reader when the rank-``width`` update applies: an input gate on the last dimension
    of a plain ``nn.Linear`` (no parametrization, no hooks of its own) called once per forward."""
    g = pm[name]
    if trace is None or target is None or not isinstance(g.gate, InputGate) or g.gate.dim != -1:
        return None
    if trace.calls.get(target) != 1:
        return None
    mod = pm.model.get_submodule(target)
    if type(mod) is not nn.Linear or hasattr(mod, "parametrizations") or mod.in_features % g.size:
        return None
    if mod._forward_hooks or mod._forward_pre_hooks or "forward" in vars(mod):
        return None
    return mod


def _reader_rows(
    reader: nn.Linear, io: tuple[Tensor, Tensor], n: int, chunk: Sequence[int], patch: Tensor | None
) -> Tensor:
    """The reader's output for rows ``b * kc + j`` (example ``b``, particle ``chunk[j]`` patched)."""
    x, y = io  # [B, *, F], [B, *, O]
    w = x.shape[-1] // n
    idx = torch.as_tensor(chunk, device=x.device)
    xs = x.unflatten(-1, (n, w)).index_select(-2, idx)  # [B, *, kc, w]
    if patch is None:
        d = -xs
    elif patch.ndim == 1:  # per-feature patch (the mean)
        d = patch.to(x).view(n, w).index_select(0, idx) - xs
    else:  # activations of other examples (resample), shaped like x
        d = patch.to(x).unflatten(-1, (n, w)).index_select(-2, idx) - xs
    wc = reader.weight.unflatten(1, (n, w)).index_select(1, idx)  # [O, kc, w]
    rows = y.unsqueeze(-2) + torch.einsum("...kw,okw->...ko", d, wc)  # [B, *, kc, O]
    return rows.movedim(-2, 1).flatten(0, 1)


def _removal(a: Tensor, patch: Tensor | None) -> Tensor:
    """How ablation changes the activation entering the reader: the patch (0, or the per-feature mean) − ``a``."""
    return (torch.zeros_like(a) if patch is None else patch.to(a).expand_as(a)) - a


@dataclass
class _PastNorm:
    """The linear layers right after the first norm past a group's linear reader. Removing particle
    ``j`` adds ``C_j W_j`` to the norm's input (``W_j`` its ``w`` reader columns, ``C_j`` the change of its
    ``w`` features at the token), so each such layer's output is ``r (clean − c0) + s U_j C_j + c0`` with
    per-token scalars ``r, s`` (`low_rank_scales`), ``U_j = W γ W̄_j`` (``out × w``) and ``c0 = W β + b``:
    the layer's matmul (``out × d`` per token) becomes ``out × w``."""

    norm: str
    centred: bool
    eps: float
    W: Tensor  # [n, w, d] reader columns per particle
    layers: dict[str, tuple[Tensor, Tensor]]  # path -> (U [m, w, out] for the m particles wanted, c0 [out])
    row: Tensor  # [n]: each particle's row of U (-1 if not wanted)
    ok: bool | None = None  # None until checked against the real layers on the first chunk

    def rows(self, z: Tensor, a: Tensor, chunk: Sequence[int], patch: Tensor | None,
             clean: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
        """Each layer's output for rows ``b * kc + j`` (example ``b``, particle ``chunk[j]`` ablated);
        None unless the activations, the norm's input and the layers' outputs are all ``[B, T, *]``."""
        if a.ndim != 3 or z.shape[:-1] != a.shape[:-1] or any(clean[q].shape[:-1] != a.shape[:-1] for q in self.layers):
            return None
        n, w = self.W.shape[:2]
        idx = torch.as_tensor(chunk, device=a.device)
        sel = lambda t: t.unflatten(-1, (n, w)).index_select(-2, idx)  # noqa: E731  [B, T, kc, w]
        C = _removal(sel(a), None if patch is None else sel(patch.to(a).expand_as(a) if patch.ndim == 1 else patch.to(a)))
        r, s = low_rank_scales(self.centred, self.eps, z, C, self.W.index_select(0, idx))
        out = {}
        for path, (U, c0) in self.layers.items():
            y = clean[path]
            r_ = r.to(y).movedim(-1, 1).unsqueeze(-1)  # [B, kc, T, 1]
            upd = torch.einsum("btkw,kwo->bkto", (C * s.unsqueeze(-1)).to(y), U.index_select(0, self.row.to(idx.device)[idx]).to(y))
            out[path] = ((y - c0).unsqueeze(1) * r_ + upd + c0).flatten(0, 1)
        return out


def _past_norm(pm: ParticleMap, name: str, reader: nn.Linear, target: str, trace: ExecutionTrace,
               particles: Sequence[int]) -> _PastNorm | None:
    """The `_PastNorm` of a group read by ``reader`` (for the wanted ``particles``), if the first norm
    after it has a closed form and is read by plain ``nn.Linear`` layers called once per forward."""
    model = pm.model
    norm = next_norm(trace, target, model)
    spec = norm_params(model.get_submodule(norm)) if norm is not None else None
    if spec is None:
        return None
    centred, eps, gamma, beta = spec
    n = pm[name].size
    W = reader.weight.detach().T.unflatten(0, (n, -1))  # [n, w, d]
    if (gamma is not None and gamma.shape != W.shape[2:]) or 2 * W.shape[1] > W.shape[2]:
        return None  # (particles over half the norm's width: the update would cost about the layer)
    idx = torch.as_tensor(list(particles), dtype=torch.long, device=W.device)
    row = torch.full((n,), -1, dtype=torch.long)
    row[idx.cpu()] = torch.arange(len(idx))
    row = row.to(W.device)  # indexed per chunk on the device: no copy from the host in the particle loop
    Wc = W.index_select(0, idx)
    Wc = Wc - Wc.mean(-1, keepdim=True) if centred else Wc
    G = Wc * gamma.detach() if gamma is not None else Wc
    layers = {}
    for path, src in trace.fed_by_norm.items():
        mod = model.get_submodule(path)
        if src != norm or trace.calls.get(path) != 1 or type(mod) is not nn.Linear or hasattr(mod, "parametrizations"):
            continue
        if mod._forward_hooks or mod._forward_pre_hooks or "forward" in vars(mod):
            continue
        Wl = mod.weight.detach()
        c0 = (Wl @ beta.detach() if beta is not None else torch.zeros(Wl.shape[0], dtype=Wl.dtype, device=Wl.device))
        if mod.bias is not None:
            c0 = c0 + mod.bias.detach()
        layers[path] = (G @ Wl.T, c0)
    return _PastNorm(norm, centred, eps, W, layers, row) if layers else None


GPU_ROWS = GPU_DEFAULT_ROWS


def default_rows(model: nn.Module) -> int:
    """Rows per forward of the pair engine (`CPU_ROWS` on a CPU, `GPU_ROWS` on an accelerator); the single-particle
    engine sizes them per device and memory (`particlize.analysis.workshape`)."""
    p = next(model.parameters(), None)
    return CPU_ROWS if p is None or p.device.type == "cpu" else GPU_ROWS


def _agrees(update: Tensor, real: Tensor) -> bool:
    return update.shape == real.shape and bool(
        torch.allclose(update, real, rtol=1e-4, atol=1e-4 * float(real.abs().max()) + 1e-6))


def _jobs(pm: ParticleMap, groups: Sequence[str], only: Mapping[str, Sequence[int]] | None = None) -> list[Job]:
    jobs: list[Job] = []
    for name in groups:
        g = pm[name]
        wanted = sorted(set(only[name])) if only is not None else list(range(g.size))
        if not wanted:
            continue
        if isinstance(g.gate, InputGate):
            jobs.append((name, g.gate.module, wanted))
        elif isinstance(g.gate, ResidualGate):
            jobs += [(name, g.gate.modules[i], [i]) for i in wanted]
        else:
            jobs.append((name, None, wanted))
    return jobs


def _patches(pm: ParticleMap, groups: Sequence[str], batches: Sequence[Batch], mode: str) -> dict[str, list[Tensor]] | None:
    if mode == "zero":
        return None
    if mode == "mean":
        return pm.mean_activations(groups, [b.inputs for b in batches])
    return None  # resample: per batch, below


def ablation_effects(
    pm: ParticleMap,
    batches: Sequence[Batch],
    *,
    metric: str = "loss",
    mode: str = "zero",
    groups: Sequence[str],
    max_rows: int | None = None,
    fast: bool = True,
    seed: int = 0,
    only: Mapping[str, Sequence[int]] | None = None,
    progress: Progress | None = None,
    split: bool | int | None = None,
) -> dict[str, Tensor]:
    """``{group: [examples, n]}``: metric with each particle ablated minus the intact metric.

    ``max_rows`` bounds the rows (example × particle) of one ablation forward; by default the device's
    (`particlize.analysis.workshape.shape_for`: small chunks that stay in cache on a CPU, big ones sized to the
    free memory on a GPU).
    ``only`` restricts the work to some particles per group (the others' entries stay NaN).
    ``fast=False`` is the reference: one (batched) forward of the whole model per particle.
    ``mode="resample"`` patches in the activations of another example of the same batch (a fixed
    seeded permutation). ``split``: True cuts padded batches into one sub-batch per real length, an int ``k``
    into at most ``k`` length buckets, False keeps them whole; None (default) chooses by device (every length on
    a CPU, a few buckets on a GPU). The naive reference and ``mode="resample"`` (which patches from another
    example of the same batch) never split.
    """
    model = pm.model
    if split is None or max_rows is None:
        shape = shape_for(model, batches)
        split = shape.split if split is None else split
        max_rows = shape.rows if max_rows is None else max_rows
    total_n = sum(b.size for b in batches)
    fill = float("nan") if only is not None else 0.0
    dev = device_of(model)
    # gathered where the model runs (no host sync per particle on a GPU), moved to the CPU once at the end
    effects = {name: torch.full((total_n, pm[name].size), fill, dtype=torch.float64, device=dev) for name in groups}
    jobs = _jobs(pm, groups, only)
    mean_patch = _patches(pm, groups, batches, mode)
    work = _work_batches(model, batches, metric, split if fast and mode != "resample" else False)
    trace = ExecutionTrace(model, work[0][0]) if fast else None
    frontiers = {t: trace.frontier(t) for _, t, _ in jobs if t is not None} if trace else {}
    needed = sorted({p for f in frontiers.values() for p in f})
    readers = {t: r for name, t, _ in jobs if (r := _linear_reader(pm, name, t, trace)) is not None}
    # by group and reader: two groups may share a reader (query heads and key/value heads both feed o_proj)
    past = {(name, t): pn for name, t, ps in jobs if t in readers and (pn := _past_norm(pm, name, readers[t], t, trace, ps))}
    past_norms = sorted({pn.norm for pn in past.values()})
    past_layers = sorted({p for pn in past.values() for p in pn.layers})
    gen = torch.Generator().manual_seed(seed)
    steps = sum(_n_chunks(job, b.size, max_rows, fast, pm) for b, _ in work for job in jobs)
    done = 0
    on_dev = [torch.as_tensor(ps, dtype=torch.long, device=dev) for _, _, ps in jobs]  # each job's particles
    for batch, pos in work:
        B = batch.size
        pos = pos.to(dev)
        cache: dict[str, Any] = {}
        reader_io: dict[str, tuple[Tensor, Tensor]] = {}
        norm_in: dict[str, Tensor] = {}
        with torch.no_grad(), _recording(model, needed + past_layers, cache), \
                _recording(model, list(readers), reader_io, keep=_input_and_output), \
                _recording(model, past_norms, norm_in, keep=lambda args, out: args[0].detach()):
            clean = call(model, batch.inputs)
        base = per_example_metric(metric, clean, batch.targets, clean)
        patch_all = mean_patch
        if mode == "resample":
            perm = torch.randperm(B, generator=gen) if B > 1 else torch.zeros(1, dtype=torch.long)
            if B > 1 and bool((perm == torch.arange(B)).any()):
                perm = torch.roll(torch.arange(B), 1)
            acts = pm.record(groups, [batch.inputs])
            patch_all = {n: [a[perm.to(a.device)] for a in v] for n, v in acts.items()}
        for (name, target, particles), job_dev in zip(jobs, on_dev):
            group = pm[name]
            per_row = group.per_example
            k = max(1, max_rows // B) if (per_row and fast) else 1
            for c0 in range(0, len(particles), k):
                chunk = particles[c0 : c0 + k]
                kc = len(chunk)
                if per_row:
                    chunk_t = job_dev[c0 : c0 + k]
                    inputs = _expand(batch.inputs, B, kc)
                    stub: dict[str, Any] = {p: _Later(lambda c=cache[p], B=B, kc=kc: _expand(c, B, kc))
                                            for p in frontiers.get(target, [])} if fast else {}
                    check: list[str] = []
                    if target in readers:  # the reader's output is updated, not recomputed: no gate
                        p = patch_all[name][0] if patch_all and name in patch_all else None
                        stub[target] = _reader_rows(readers[target], reader_io[target], group.size, chunk_t, p)
                        values: dict[str, Tensor] = {}
                        patch = None
                        pn = past.get((name, target))
                        if pn is not None and pn.ok is not False:  # and the layers after the next norm too
                            past_rows = pn.rows(norm_in[pn.norm], reader_io[target][0], chunk_t, p, cache)
                            if past_rows is None:
                                pn.ok = False
                            elif pn.ok:
                                stub.update(past_rows)
                            else:
                                check = list(past_rows)
                    else:
                        gates = torch.ones(B * kc, group.size, device=clean.device)
                        gates[torch.arange(B * kc, device=clean.device), chunk_t.to(clean.device).repeat(B)] = 0.0
                        values = {name: gates}
                        patch = _rows_patch(patch_all, name, B, kc, mode)
                    real: dict[str, Tensor] = {}
                    with torch.no_grad(), _replaced(model, stub), pm.gates(values, patch), _recording(model, check, real):
                        logits = call(model, inputs)
                    if check:  # the first chunk ran in full: use the update from now on if it agrees
                        pn.ok = all(_agrees(past_rows[q], real[q]) for q in check)
                    m = per_example_metric(metric, logits, batch.targets.repeat_interleave(kc, 0),
                                           clean.repeat_interleave(kc, 0))
                    effects[name][pos[:, None], chunk_t] = (m.view(B, kc) - base[:, None]).double()
                else:
                    g = torch.ones(group.size, device=clean.device)
                    g[chunk] = 0.0
                    patch = {name: patch_all[name]} if patch_all and name in patch_all else None
                    with torch.no_grad(), pm.gates({name: g}, patch):
                        logits = call(model, batch.inputs)
                    m = per_example_metric(metric, logits, batch.targets, clean)
                    effects[name][pos, chunk[0]] = (m - base).double()
                done += 1
                if progress is not None:
                    progress(done, steps, name)
    return {name: e.cpu() for name, e in effects.items()}


def _n_chunks(job: Job, B: int, max_rows: int, fast: bool, pm: ParticleMap) -> int:
    name, _, particles = job
    k = max(1, max_rows // B) if (pm[name].per_example and fast) else 1
    return -(-len(particles) // k)


def _rows_patch(patch_all: Mapping[str, list[Tensor]] | None, name: str, B: int, kc: int, mode: str) -> dict[str, list[Tensor]] | None:
    if not patch_all or name not in patch_all:
        return None
    if mode == "resample":  # full activations, one per example: repeat them per row
        return {name: [p.repeat_interleave(kc, 0) for p in patch_all[name]]}
    return {name: patch_all[name]}


register(ScorerSpec("ablation", "the exact effect: metric with the particle ablated - intact metric", ablation_effects,
                    metrics=METRICS, modes=MODES, per_example=True, effect=True))
