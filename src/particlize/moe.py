"""MoEfication: each FFN becomes a mixture of experts and each token runs only the experts it needs.

    import particlize as pz
    moe = pz.moefy(model, batches, experts=32, active=4)      # an ordinary nn.Module; pz.save / pz.load it

Following MoEfication (Zhang et al., 2022): (1) each FFN's neurons are clustered into ``experts`` equal groups
of co-activating neurons: scikit-learn's KMeans on the neurons' activation patterns over calibration tokens,
then a balanced assignment (every expert gets ``N / experts`` neurons; a few rounds of re-centring);
(2) the FFN is replaced by an `ExpertFFN` (the ``moefy`` plan step records the partition); (3) a small
router per layer is trained to predict each expert's activation norm from the layer input (MSE
regression), so that at inference each token runs the ``active`` experts predicted to matter most.
Optionally (``recover_epochs``, with a task) the model is then distilled from the original (experts and
everything else learn; the unweighted top-k gives the routers no gradient) and the routers are fitted
again on the recovered model's own layer inputs. `expert_usage` counts which experts the routers pick for the
tokens of each class (the report's "Expert usage" section).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from torch import Tensor, nn

from .adapters import decompose
from .batches import batch_inputs, run_batch, token_weights
from .errors import ParticlizeError
from .particles import ParticleMap
from .recover import RecoveryConfig, recover
from .surgery import ExpertFFN, moefy_model
from .surgery.moefy import ffn_layout

EXACT_ASSIGNMENT = 4096  # neurons per FFN up to which the balanced assignment is solved exactly (Hungarian)


# --------------------------------------------------------------------------------------------------
# Calibration: FFN inputs and hidden activations, padding left out


@torch.no_grad()
def _collect(model: nn.Module, paths: Sequence[str], batches: list[Any], max_tokens: int, seed: int,
             pm: ParticleMap | None = None, groups: Sequence[str] = ()) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``({path: FFN inputs [tokens, d]}, {group: hidden activations [tokens, N]})`` on up to ``max_tokens``
    tokens per FFN sampled evenly from each batch (the same tokens for the inputs and the activations)."""
    per_batch = max(1, math.ceil(max_tokens / max(1, len(batches))))
    gen = torch.Generator().manual_seed(seed)
    xs: dict[str, list[Tensor]] = {p: [] for p in paths}
    hs: dict[str, list[Tensor]] = {g: [] for g in groups}
    pick: list[Tensor | None] = [None]
    current: list[Any] = [None]

    def rows(a: Tensor) -> Tensor:
        flat = a.detach().reshape(-1, a.shape[-1]).float()
        if pick[0] is None:
            w = token_weights(current[0], a)
            valid = torch.arange(flat.shape[0]) if w is None else w.reshape(-1).nonzero().reshape(-1).cpu()
            pick[0] = valid[torch.randperm(len(valid), generator=gen)[:per_batch]].sort().values
        return flat[pick[0].to(flat.device)].cpu()

    handles = [model.get_submodule(p).register_forward_pre_hook(lambda m, a, p=p: xs[p].append(rows(a[0])))
               for p in paths]
    try:
        ctx = pm.capture(groups, lambda n, i, a: hs[n].append(rows(a))) if pm is not None else contextlib.nullcontext()
        with ctx:
            for b in batches:
                current[0], pick[0] = batch_inputs(b), None
                run_batch(model, current[0])
    finally:
        for h in handles:
            h.remove()
    if any(not v for v in xs.values()):
        raise ParticlizeError("the calibration data never reached the model's FFNs; pass batches the model runs on")
    return {p: torch.cat(v) for p, v in xs.items()}, {g: torch.cat(v) for g, v in hs.items()}


# --------------------------------------------------------------------------------------------------
# Clustering


def balanced_clusters(features: np.ndarray, experts: int, *, seed: int = 0, rounds: int = 5) -> list[list[int]]:
    """Partition the rows of ``features`` (one per neuron) into ``experts`` equal clusters: KMeans centres,
    then a balanced assignment (each centre takes ``N / experts`` rows, total squared distance minimal:
    the Hungarian algorithm up to `EXACT_ASSIGNMENT` rows, closest-pair-first greedy above), re-centred
    ``rounds`` times."""
    n = features.shape[0]
    if experts < 1 or n % experts:
        raise ParticlizeError(f"{n} neurons do not split into {experts} equal experts; choose a divisor of {n}")
    size = n // experts
    x = features.astype(np.float64)
    centres = KMeans(experts, n_init=4, random_state=seed).fit(x).cluster_centers_
    labels = np.zeros(n, dtype=np.int64)
    for _ in range(max(1, rounds)):
        cost = ((x[:, None, :] - centres[None, :, :]) ** 2).sum(-1)  # [N, E]
        new = _assign(cost, size)
        if np.array_equal(new, labels):
            break
        labels = new
        centres = np.stack([x[labels == e].mean(0) for e in range(experts)])
    return [sorted(np.flatnonzero(labels == e).tolist()) for e in range(experts)]


def _assign(cost: np.ndarray, size: int) -> np.ndarray:
    n, experts = cost.shape
    if n <= EXACT_ASSIGNMENT:
        rows, cols = linear_sum_assignment(np.repeat(cost, size, axis=1))
        out = np.empty(n, dtype=np.int64)
        out[rows] = cols // size
        return out
    out = np.full(n, -1, dtype=np.int64)
    room = np.full(experts, size)
    for flat in np.argsort(cost, axis=None, kind="stable"):
        i, e = divmod(int(flat), experts)
        if out[i] < 0 and room[e] > 0:
            out[i], room[e] = e, room[e] - 1
    return out


def _patterns(h: Tensor, tokens: int, seed: int) -> np.ndarray:
    """``[N, tokens]``: each neuron's activations over (up to) ``tokens`` calibration tokens, unit norm."""
    gen = torch.Generator().manual_seed(seed)
    h = h[torch.randperm(h.shape[0], generator=gen)[:tokens]]
    p = h.T.double()
    return (p / p.norm(dim=1, keepdim=True).clamp_min(1e-12)).numpy()


# --------------------------------------------------------------------------------------------------
# Routers


def train_router(ffn: ExpertFFN, x: Tensor, *, steps: int = 300, batch_size: int = 512, lr: float = 1e-2,
                 seed: int = 0) -> float:
    """Fit ``ffn.router`` in place to predict each expert's activation norm from the FFN inputs ``x``
    ``[tokens, d]`` (MSE on norms scaled by their mean); returns the final loss on all of ``x``."""
    params = list(ffn.router.parameters())
    dev = params[0].device
    x = x.to(dev, params[0].dtype)
    with torch.no_grad():
        y = ffn.expert_norms(x)
        y = y / y.mean().clamp_min(1e-12)
        ffn.router.out.bias.copy_(y.mean(0))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr)
    was = ffn.router.training
    ffn.router.train()
    try:
        for _ in range(steps):
            idx = torch.randint(0, x.shape[0], (min(batch_size, x.shape[0]),), generator=gen).to(dev)
            loss = torch.nn.functional.mse_loss(ffn.router(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        ffn.router.train(was)
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(ffn.router(x), y))


def fit_routers(model: nn.Module, data: Iterable[Any], *, steps: int = 300, max_tokens: int = 8192,
                seed: int = 0) -> dict[str, float]:
    """Train every `ExpertFFN` router of ``model`` on the inputs its FFN sees on ``data`` (the model's own
    layer inputs); ``{FFN path: final loss}``."""
    paths = [p for p, m in model.named_modules() if isinstance(m, ExpertFFN)]
    if not paths:
        raise ParticlizeError("the model has no mixture-of-experts FFN; make one with pz.moefy(model, data)")
    was = model.training
    model.eval()
    try:
        xs, _ = _collect(model, paths, list(data), max_tokens, seed)
    finally:
        model.train(was)
    return {p: train_router(model.get_submodule(p), xs[p], steps=steps, seed=seed + i) for i, p in enumerate(paths)}


# --------------------------------------------------------------------------------------------------
# Expert usage


def _labels(batch: Any) -> Tensor | None:
    """The class label of each example of a batch: its targets when they are one integer per example."""
    t = batch.targets if hasattr(batch, "targets") else batch[1] if isinstance(batch, (tuple, list)) and len(batch) == 2 else None
    ok = isinstance(t, Tensor) and t.ndim == 1 and not t.is_floating_point()
    return t if ok else None


@torch.no_grad()
def expert_usage(model: nn.Module, data: Iterable[Any], *, classes: Sequence[str] | None = None) -> pd.DataFrame:
    """How often the router of each mixture-of-experts FFN of ``model`` picks each expert, per class.

    ``data``: ``(inputs, targets)`` batches; with integer targets (one per example, a classifier's) the tokens
    are split by their example's class (named by ``classes``), otherwise every token counts as class ``"all"``.
    Padding (the inputs' ``attention_mask``) is left out. One row per (FFN, class, expert): ``ffn`` (module
    path), ``layer``, ``experts``, ``active``, ``class_label``, ``expert``, ``tokens`` (the class's tokens that
    reached the FFN), ``selected`` (of those, how many ran the expert) and ``share`` = selected / tokens (a
    row of shares sums to ``active``: each token runs that many experts)."""
    ffns = [(p, m) for p, m in model.named_modules() if isinstance(m, ExpertFFN)]
    if not ffns:
        raise ParticlizeError("the model has no mixture-of-experts FFN; make one with pz.moefy(model, data)")
    pm = decompose(model)
    layer = {p: pm[f"{p}.experts"].layer if f"{p}.experts" in pm else None for p, _ in ffns}
    counts: dict[tuple[str, Any], list[Tensor]] = {}  # (ffn, class) -> [tokens, selected per expert]
    current: list[Any] = [None, None]  # inputs, labels of the batch being run

    def hook(path: str, m: ExpertFFN, x: Tensor) -> None:
        sel = m.selection(m.router(x)).double()  # [..., E]
        w = token_weights(current[0], x)
        w = torch.ones(sel.shape[:-1], dtype=torch.float64, device=sel.device) if w is None else w
        labels = current[1]
        if labels is None or sel.ndim < 3 or sel.shape[0] != len(labels):
            groups = [("all", w, sel)]
        else:
            labels = labels.to(sel.device)
            groups = [(int(c), w[labels == c], sel[labels == c]) for c in labels.unique().tolist()]
        for c, wc, sc in groups:
            acc = counts.setdefault((path, c), [torch.zeros((), dtype=torch.float64), torch.zeros(m.num_experts, dtype=torch.float64)])
            acc[0] += wc.sum().cpu()
            acc[1] += (sc * wc.unsqueeze(-1)).reshape(-1, m.num_experts).sum(0).cpu()

    handles = [m.register_forward_pre_hook(lambda mod, a, p=p: hook(p, mod, a[0])) for p, m in ffns]
    was = model.training
    model.eval()
    try:
        for b in data:
            current[0], current[1] = batch_inputs(b), _labels(b)
            run_batch(model, current[0])
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    if not counts:
        raise ParticlizeError("the data never reached the model's mixture-of-experts FFNs; pass batches the model runs on")
    mods = dict(ffns)
    rows = []
    for (path, c), (tokens, selected) in sorted(counts.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        m = mods[path]
        name = c if c == "all" else (classes[c] if classes is not None and 0 <= c < len(classes) else str(c))
        for e in range(m.num_experts):
            rows.append({"ffn": path, "layer": layer[path], "experts": m.num_experts, "active": min(m.active, m.num_experts),
                         "class_label": name, "expert": e, "tokens": float(tokens), "selected": float(selected[e]),
                         "share": float(selected[e] / tokens) if tokens > 0 else 0.0})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# The user-facing function


def moefy(
    model: nn.Module,
    data: Iterable[Any],
    *,
    experts: int = 32,
    active: int = 4,
    groups: Sequence[str] | None = None,
    router_hidden: int = 64,
    router_steps: int = 300,
    max_tokens: int = 8192,
    pattern_tokens: int = 2048,
    seed: int = 0,
    task: Any = None,
    recover_epochs: float = 0,
    tokenizer: Any = None,
    batch_size: int = 32,
    max_length: int | None = 64,
    limit: int | None = None,
) -> nn.Module:
    """A copy of ``model`` whose FFNs are mixtures of ``experts`` experts, ``active`` of them run per token.

    ``data``: calibration batches (inputs, or ``(inputs, targets)`` pairs) for clustering and routers.
    ``groups``: the FFN neuron groups to convert (default: every FFN moefy supports). Each router is a 2-layer
    MLP of ``router_hidden`` ReLU units (0: a Linear; an expert's norm grows with ``|w·x|`` on either side,
    which a Linear cannot follow: on a random tiny BERT layer it picks the best of 4 experts 38% of the time,
    a 64-unit MLP 76%). With ``recover_epochs`` > 0 and a ``task`` (and its ``tokenizer``),
    the result is distilled from ``model`` on the task's training data, then its routers are fitted again.
    ``model`` is left unchanged; the result records a ``moefy`` step per FFN in its plan."""
    batches = list(data)
    if not batches:
        raise ParticlizeError("moefy needs calibration batches (data=...) to cluster neurons and train routers")
    if recover_epochs > 0 and task is None:
        raise ParticlizeError("recover_epochs needs task=... (the data to distil the experts from the original on)")
    pm = decompose(model)
    names = [g.name for g in pm.select("neuron")] if groups is None else list(groups)
    if groups is None:
        names = [n for n in names if _supported(pm, n)]
    if not names:
        raise ParticlizeError("the model has no FFN moefy supports (BERT-family, Llama/Qwen2 gated MLPs, DiT MLPs)")
    for n in names:
        ffn_layout(pm, pm[n])  # clear error for a group moefy cannot convert
        if pm[n].size % experts:
            raise ParticlizeError(f"{n!r} has {pm[n].size} neurons, which do not split into {experts} equal experts; "
                                  f"choose experts dividing {pm[n].size}")
    if not 1 <= active <= experts:
        raise ParticlizeError(f"active={active} must be between 1 and experts={experts}")
    was = model.training
    model.eval()
    try:
        layouts = {n: ffn_layout(pm, pm[n]).container for n in names}
        xs, hs = _collect(model, list(layouts.values()), batches, max_tokens, seed, pm=pm, groups=names)
        partition = {n: balanced_clusters(_patterns(hs[n], pattern_tokens, seed), experts, seed=seed) for n in names}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = moefy_model(pm, partition, active, router_hidden).model
        _check_equal(model, out, batches[0])
        for i, (n, path) in enumerate(layouts.items()):
            train_router(out.get_submodule(path), xs[path], steps=router_steps, seed=seed + i)
    finally:
        model.train(was)
    if recover_epochs > 0:
        recover(out, model, task, RecoveryConfig(epochs=recover_epochs), tokenizer=tokenizer, batch_size=batch_size,
                max_length=max_length, limit=limit, seed=seed)
        fit_routers(out, batches, steps=router_steps, max_tokens=max_tokens, seed=seed)
    return out.eval()


def _supported(pm: ParticleMap, name: str) -> bool:
    try:
        ffn_layout(pm, pm[name])
    except ParticlizeError:
        return False
    return True


@torch.no_grad()
def _check_equal(model: nn.Module, moe: nn.Module, batch: Any) -> None:
    """With every expert active the converted model must compute the original (else the FFN's forward is
    not the up → activation → down moefy rebuilds)."""
    ffns = [m for m in moe.modules() if isinstance(m, ExpertFFN)]
    saved = [f.active for f in ffns]
    for f in ffns:
        f.active = f.num_experts
    try:
        a, b = _main(run_batch(model, batch)), _main(run_batch(moe, batch))
    finally:
        for f, k in zip(ffns, saved):
            f.active = k
    if a is not None and b is not None and not torch.allclose(a, b, atol=1e-4, rtol=1e-4):
        raise ParticlizeError(f"with every expert active the converted model differs from the original by "
                              f"{float((a - b).abs().max()):.2e}; its FFNs compute something moefy does not rebuild "
                              "(please report the model class)")


def _main(out: Any) -> Tensor | None:
    for key in ("logits", "last_hidden_state"):
        if hasattr(out, key):
            return getattr(out, key)
    if isinstance(out, (tuple, list)):
        return out[0] if out and isinstance(out[0], Tensor) else None
    return out if isinstance(out, Tensor) else None


__all__ = ["EXACT_ASSIGNMENT", "balanced_clusters", "expert_usage", "fit_routers", "moefy", "train_router"]
