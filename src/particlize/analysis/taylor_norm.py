"""``taylor-norm``: attribution patching with the next normalisation layer evaluated exactly.

First-order gate scores (``taylor``) linearise the whole model after the gate. Their worst misses on a
real transformer are particles whose removal is a *large* perturbation of the residual stream — an FFN
neuron with a huge activation on a few tokens, say — where the LayerNorm that follows saturates: the
linearisation says the change is big, the norm squashes it (or the reverse). AtP* fixes the attention
softmax for the same reason; this fixes the norm.

For a particle read by a linear layer (an attention head through ``o_proj``, an FFN neuron through
``fc2``) ablation changes the reader's output by ``δ_j = (p − a_j) W_jᵀ`` per token (``p`` the patch: 0
or the mean). That change reaches the first normalisation layer ``N`` after the reader unchanged (dropout
is off, residual adds are identity), so with ``z`` the norm's clean input and ``g`` the metric's gradient
at its output, the estimate is

    taylor_j + Σ_t [ g · (N(z + δ_j) − N(z)) − (J_N(z)ᵀ g) · δ_j ]

— the first-order term with its linearised path through the norm replaced by the exact one. In a post-LN
model (BERT) that is exactly "exact through the norm, linear after"; in a pre-LN model (GPT-2, Llama) the
skip path around the norm stays linear. The path is checked once per group (one ablated forward): a group
whose reader output reaches the norm through anything but an identity (adaLN gates, scaling) keeps the
plain first-order score. Cost: one extra forward + backward, and ``N`` evaluated once per particle and token.

`top_particles` bounds the error of an estimate with two scales: ``width``, the mean over examples of the
estimate's magnitude per example (large when per-example effects cancel in the mean), and the size of the
perturbation itself, ``Σ_t ‖δ_j‖²`` per example (`perturbation_sizes`): what a first-order remainder grows with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..particles import ParticleMap, linear_reader_weight, token_weights
from ._common import Batch, Progress, call, frozen, map_tensors, per_example_metric
from ._norms import next_norm, norm_params, rank1_scales
from .ablation import ExecutionTrace, _recording, _removal
from .registry import ScorerSpec, register
from .taylor import GRADIENT_METRICS, GRADIENT_NOTE, check_gradient_metric, gate_gradients

_CHUNK_ELEMENTS = 1 << 24  # floats of one [B, T, chunk, d] perturbed-norm evaluation


def _reader_weight(pm: ParticleMap, name: str) -> tuple[str, Tensor] | None:
    """``(reader module path, weight as [features, outputs])`` for a linear reader of gated features."""
    g = pm[name]
    spec = linear_reader_weight(pm, g) if g.per_example else None
    if spec is None:
        return None
    wname, dim, _ = spec
    return g.gate.module, pm._tensor(wname).detach().movedim(dim, 0)


def _deltas(a: Tensor, W: Tensor, n: int, chunk: Sequence[int], patch: Tensor | None) -> Tensor:
    """``[B, T, c, d]``: the change of the reader's output when each particle of ``chunk`` is ablated."""
    w = a.shape[-1] // n
    idx = torch.as_tensor(chunk, device=a.device)
    da = _removal(a, patch).unflatten(-1, (n, w)).index_select(-2, idx)  # [B, T, c, w]
    return torch.einsum("btcw,cwd->btcd", da, W.to(a).unflatten(0, (n, w)).index_select(0, idx))


@torch.no_grad()
def perturbation_sizes(pm: ParticleMap, batches: Sequence[Batch], *, mode: str = "zero",
                       groups: Sequence[str]) -> dict[str, Tensor]:
    """``{group: [examples, n]}``: ``Σ_t ‖δ_j‖²``, the squared size of the change of the reader's output
    when particle ``j`` is ablated, summed over an example's tokens (padding left out): the scale of the
    second-order remainder a first-order estimate leaves out. Groups with a linear reader only (attention
    heads, FFN neurons, ...); modes ``zero`` and ``mean``."""
    if mode not in ("zero", "mean"):
        return {}
    sites = {n: rw for n in groups if (rw := _reader_weight(pm, n)) is not None}
    if not sites:
        return {}
    patches = pm.mean_activations(list(sites), [b.inputs for b in batches]) if mode == "mean" else {}
    grams = {}
    for name, (_, W) in sites.items():
        n = pm[name].size
        Wn = W.double().unflatten(0, (n, W.shape[0] // n))  # [n, w, d]
        grams[name] = Wn @ Wn.transpose(1, 2)  # [n, w, w]
    out: dict[str, list[Tensor]] = {n: [] for n in sites}
    readers = list(dict.fromkeys(r for r, _ in sites.values()))
    for batch in batches:
        seen: dict[str, Tensor] = {}
        with _recording(pm.model, readers, seen, keep=lambda args, o: args[0].detach()):
            call(pm.model, batch.inputs)
        B = batch.size
        for name, (reader, _) in sites.items():
            a = seen[reader]
            if a.shape[0] != B:  # not laid out per example
                out.pop(name, None)
                continue
            n = pm[name].size
            C = _removal(a, patches[name][0] if name in patches else None)
            C = C.reshape(B, -1, n, C.shape[-1] // n)  # [B, T, n, w]
            w = token_weights(batch.inputs, a)
            G = grams[name].to(C.device)
            per = max(1, _CHUNK_ELEMENTS // max(1, C[:, :, :1].numel()))  # particles at a time, in float64
            size = torch.empty(B, n, dtype=torch.float64)
            for c0 in range(0, n, per):
                Cc = C[:, :, c0:c0 + per].double()
                per_token = torch.einsum("btnw,nwv,btnv->btn", Cc, G[c0:c0 + per], Cc)
                if w is not None:
                    per_token = per_token * w.reshape(B, -1, 1)
                size[:, c0:c0 + per] = per_token.sum(1).cpu()
            if name in out:
                out[name].append(size)
    return {n: torch.cat(v) for n, v in out.items() if v}


def _path_is_identity(pm: ParticleMap, name: str, norm: str, batch: Batch, a: Tensor, W: Tensor,
                      patch: Tensor | None) -> bool:
    """Does ablating one particle change the norm's input by exactly the reader's output change? Checked
    on the particle and example with the largest perturbation (where a non-identity path shows most), by
    two forwards of that example alone."""
    n = pm[name].size
    w = a.shape[-1] // n
    B = a.shape[0]
    size = _removal(a, patch).unflatten(-1, (n, w)).pow(2).sum(-1).sum(1) * W.unflatten(0, (n, w)).pow(2).sum((1, 2)).to(a)
    b, j = divmod(int(size.argmax()), n)
    one = map_tensors(batch.inputs, lambda t: t[b:b + 1] if t.ndim and t.shape[0] == B else t)
    seen: list[Tensor] = []
    h = pm.model.get_submodule(norm).register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    gate = torch.ones(n)
    gate[j] = 0.0
    try:
        with torch.no_grad():
            call(pm.model, one)
            with pm.gates({name: gate}, {name: [patch]} if patch is not None else None):
                call(pm.model, one)
    finally:
        h.remove()
    if len(seen) != 2:
        return False
    change = (seen[1].double() - seen[0].double()).reshape(1, -1, seen[0].shape[-1])
    want = _deltas(a[b:b + 1], W, n, [j], patch)[:, :, 0].double()
    return change.shape == want.shape and bool((change - want).abs().max() <= 1e-4 * want.abs().max() + 1e-6)


@torch.no_grad()
def _rank1_norm_change(N: nn.Module, z: Tensor, C: Tensor, W: Tensor, g: Tensor, v: Tensor) -> Tensor:
    """``[M, n]``: ``g · (N(z + C_j w_j) − N(z)) − C_j v · w_j`` for every token ``M`` and particle ``j``
    whose ablation adds ``C_j`` times the vector ``w_j`` (row ``j`` of ``W``) to the norm's input; three
    matmuls instead of ``n`` evaluations of the norm (`rank1_scales`)."""
    centred, eps, weight, _ = norm_params(N)
    r, c = rank1_scales(centred, eps, z, C, W)
    z, W = z.double(), W.double()
    gw = g.double() * weight.double() if weight is not None else g.double()
    if centred:
        z, Wc = z - z.mean(-1, keepdim=True), W - W.mean(-1, keepdim=True)
    else:
        Wc = W
    inv = (z.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
    exact = (gw * z).sum(-1, keepdim=True) * inv * (r - 1) + c * (gw @ Wc.T)
    return exact - C.double() * (v.double() @ W.T)


def _closed_form_agrees(N: nn.Module, a: Tensor, z: Tensor, W: Tensor, g: Tensor, v: Tensor, patch: Tensor | None) -> bool:
    """The closed form against the module itself, on the particle with the largest activation."""
    if norm_params(N) is None:
        return False
    C = _removal(a, patch)
    j = int(C.abs().amax((0, 1)).argmax())
    closed = _rank1_norm_change(N, z.flatten(0, 1), C[..., j:j + 1].flatten(0, 1), W[j:j + 1], g.flatten(0, 1), v.flatten(0, 1))
    with torch.no_grad():
        d = C[..., j:j + 1] * W[j].to(a)  # [B, T, d]
        want = ((N(z + d) - N(z)) * g).sum(-1) - (d * v).sum(-1)
    return bool(torch.allclose(closed.view_as(want), want.double(), rtol=1e-3, atol=1e-6 + 1e-3 * float(want.abs().max())))


def taylor_norm(pm: ParticleMap, batches: Sequence[Batch], *, metric: str = "loss", mode: str = "zero",
                groups: Sequence[str], progress: Progress | None = None) -> dict[str, Tensor]:
    """Per-example estimates ``[examples, n]`` of each particle's ablation effect (see the module doc).
    One forward and backward per batch gives both the gate gradients (``taylor``) and the gradients at
    the norms' outputs; groups gated through weights (recurrent) get their gate gradients separately."""
    check_gradient_metric(metric, mode)
    model = pm.model
    trace = ExecutionTrace(model, batches[0])
    sites = {}
    for name in groups:
        rw = _reader_weight(pm, name)
        norm = next_norm(trace, rw[0], model) if rw is not None else None
        if rw is not None and norm is not None:
            sites[name] = (rw[0], rw[1], norm)
    if not sites:
        return {n: -g for n, g in gate_gradients(pm, batches, metric=metric, mode=mode, groups=groups, progress=progress).items()}
    per_row = [n for n in groups if pm[n].per_example]
    shared = [n for n in groups if not pm[n].per_example]
    est = {n: -g for n, g in gate_gradients(pm, batches, metric=metric, mode=mode, groups=shared).items()} if shared else {}
    parts: dict[str, list[Tensor]] = {n: [] for n in per_row}
    patches = pm.mean_activations(per_row, [b.inputs for b in batches]) if mode == "mean" else {}
    checked: dict[str, bool] = {}
    closed: dict[str, bool] = {}
    readers = list(dict.fromkeys(s[0] for s in sites.values()))
    norms = list(dict.fromkeys(s[2] for s in sites.values()))
    with frozen(model):  # gradients for the gates and norm outputs only
        for i, batch in enumerate(batches):
            B = batch.size
            inputs: dict[str, Tensor] = {}
            norm_io: dict[str, tuple[Tensor, Tensor]] = {}  # the norm's clean input and its output (in the graph)
            gates = {n: torch.ones(B, pm[n].size, requires_grad=True) for n in per_row}
            with pm.gates(gates, {n: patches[n] for n in per_row} if patches else None), \
                    _recording(model, readers, inputs, keep=lambda args, out: args[0].detach()), \
                    _recording(model, norms, norm_io, keep=lambda args, out: (args[0].detach(), out)), torch.enable_grad():
                out = call(model, batch.inputs)
                grads = torch.autograd.grad(per_example_metric(metric, out, batch.targets).sum(),
                                            [*gates.values(), *(norm_io[nm][1] for nm in norms)], allow_unused=True)
            for n, g in zip(per_row, grads):
                parts[n].append(-(g.double() if g is not None else torch.zeros(B, pm[n].size, dtype=torch.float64)))
            if progress is not None:
                progress(i + 1, len(batches), "taylor-norm")
            grads = grads[len(per_row):]
            gy = dict(zip(norms, grads))
            for name, (reader, W, norm) in sites.items():
                a, z, g = inputs[reader], norm_io[norm][0], gy[norm]
                if g is None or a.shape[0] != B or z.shape[0] != B or a.shape[:-1] != z.shape[:-1]:
                    continue  # the metric does not depend on the norm, or activations are not laid out per example
                a, z, g = a.reshape(B, -1, a.shape[-1]), z.reshape(B, -1, z.shape[-1]), g.detach().reshape(B, -1, z.shape[-1])
                patch = patches[name][0] if name in patches else None
                est_b = parts[name][-1]
                if name not in checked:
                    checked[name] = _path_is_identity(pm, name, norm, batch, a, W, patch)
                if not checked[name]:
                    continue
                N = model.get_submodule(norm)
                with torch.enable_grad():
                    zz = z.detach().requires_grad_(True)
                    (v,) = torch.autograd.grad(N(zz), zz, g)
                n = pm[name].size
                if name not in closed:
                    closed[name] = W.shape[0] == n and _closed_form_agrees(N, a, z, W, g, v, patch)
                if closed[name]:  # width-1 particles: rank-1 changes, the norm's change in closed form
                    C = _removal(a, patch)  # [B, T, n]
                    corr = _rank1_norm_change(N, z.flatten(0, 1), C.flatten(0, 1), W, g.flatten(0, 1), v.flatten(0, 1))
                    est_b += corr.view(B, -1, n).sum(1).cpu()
                    continue
                per = max(1, _CHUNK_ELEMENTS // max(1, z.numel()))
                corr = torch.zeros(B, n, dtype=torch.float64)
                with torch.no_grad():
                    Nz = N(z)
                    for c0 in range(0, n, per):
                        chunk = list(range(c0, min(n, c0 + per)))
                        d = _deltas(a, W, n, chunk, patch)  # [B, T, c, d]
                        exact = ((N(z.unsqueeze(2) + d) - Nz.unsqueeze(2)) * g.unsqueeze(2)).sum(-1)
                        linear = (d * v.unsqueeze(2)).sum(-1)
                        corr[:, c0:c0 + len(chunk)] = (exact - linear).double().sum(1).cpu()
                est_b += corr
    return {n: est[n] if n in est else torch.cat(parts[n]) for n in groups}


register(ScorerSpec("taylor-norm", "taylor with the next LayerNorm/RMSNorm evaluated exactly", taylor_norm,
                    metrics=GRADIENT_METRICS, metric_note=GRADIENT_NOTE, modes=("zero", "mean"), per_example=True,
                    effect=True))
