"""What every scorer shares: batches, metrics, the long result frame."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ParticlizeError
from ..particles import KINDS, ParticleMap

METRICS = ("loss", "accuracy", "logit_diff", "kl", "mse")
Progress = Callable[[int, int, str], None]  # (done, total, description)


def logits_of(out: Any) -> Tensor:
    """The logits of a model call: the tensor itself, ``.logits``, or the first element."""
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise ParticlizeError(f"cannot find logits in a model output of type {type(out).__name__}")


def device_of(model: torch.nn.Module) -> torch.device:
    """Where ``model`` runs: the device of its first parameter (or buffer); the CPU if it has none."""
    t = next(model.parameters(), None)
    if t is None:
        t = next(model.buffers(), None)
    return t.device if t is not None else torch.device("cpu")


def call(model: torch.nn.Module, inputs: Any) -> Tensor:
    """Logits of ``model`` on ``inputs`` (a tensor, or a dict passed as keyword arguments)."""
    return logits_of(model(**inputs) if isinstance(inputs, Mapping) else model(inputs))


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """``model``'s parameters set not to require gradients for the duration, then restored as they were.

    The gate-gradient scorers differentiate with respect to the gates only; a parameter that requires a gradient
    makes autograd keep each layer's input for a weight gradient nobody asks for (a fifth to a third of the
    activations saved for backward on MiniLM and Llama; benchmarks/results/gpu.md)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@dataclass
class Batch:
    inputs: Any
    targets: Tensor

    @property
    def size(self) -> int:
        return int(self.targets.shape[0])

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(map_tensors(self.inputs, lambda t: t.to(device)), self.targets.to(device))


def map_tensors(x: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``fn`` to every tensor in a (nested) tensor / `Batch` / dict / tuple / list / model output."""
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, Batch):
        return Batch(map_tensors(x.inputs, fn), fn(x.targets))
    if isinstance(x, Mapping):
        out = {k: map_tensors(v, fn) for k, v in x.items()}
        try:
            return type(x)(**out) if not isinstance(x, dict) or type(x) is not dict else out
        except TypeError:
            return out
    if isinstance(x, tuple):
        vals = [map_tensors(v, fn) for v in x]
        return type(x)(*vals) if hasattr(x, "_fields") else tuple(vals)
    if isinstance(x, list):
        return [map_tensors(v, fn) for v in x]
    return x


def as_batches(data: Iterable[Any], device: torch.device | str | None = None) -> list[Batch]:
    """Normalise ``(inputs, targets)`` pairs into `Batch` objects. Targets are class indices
    (``[batch]``, or ``[batch, tokens]``), or float tensors shaped like the output (regression, e.g. the
    noise a diffusion model predicts: ``metric="loss"`` is then the mean squared error)."""
    out = []
    for item in data:
        if isinstance(item, Batch):
            out.append(item.to(device) if device is not None else item)
            continue
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ParticlizeError("analysis data must be an iterable of (inputs, targets) pairs")
        inputs, targets = item
        targets = torch.as_tensor(targets)
        if targets.is_floating_point() and targets.ndim >= 2:
            b = Batch(inputs, targets)
        elif targets.ndim not in (1, 2):
            raise ParticlizeError(
                "targets must be class indices of shape [batch] (or [batch, tokens] for token outputs), or "
                f"float regression targets shaped like the output; got {targets.dtype} {tuple(targets.shape)}"
            )
        else:
            b = Batch(inputs, targets.long())
        out.append(b.to(device) if device is not None else b)
    if not out:
        raise ParticlizeError("no batches to analyse: the data is empty")
    return out


def per_example_metric(metric: str, logits: Tensor, targets: Tensor, ref: Tensor | None = None) -> Tensor:
    """The metric of each example: ``loss`` (cross-entropy; mean squared error for float targets
    shaped like the output), ``accuracy`` (0/1), ``logit_diff`` (target logit minus the largest other
    logit), ``kl`` (KL(original ‖ this), needs ``ref``), ``mse`` (mean squared error to float targets).

    Token outputs (``logits [B, T, V]`` with ``targets [B, T]``, e.g. a language model) are scored per
    token and averaged over each example's tokens whose target is not -100."""
    logits = logits.float()
    regression = targets.is_floating_point() and targets.shape == logits.shape
    if metric == "mse" or (metric == "loss" and regression):  # e.g. a diffusion model's noise prediction
        if not regression:
            raise ParticlizeError(
                f"metric='mse' needs float targets shaped like the model output {tuple(logits.shape)}, "
                f"got {targets.dtype} {tuple(targets.shape)}"
            )
        return (logits - targets.float()).pow(2).flatten(1).mean(1)
    if logits.ndim == 3:
        B, T, V = logits.shape
        tg = targets if targets.ndim == 2 else targets[:, None].expand(B, T)
        keep = (tg != -100).float()
        flat = per_example_metric(metric, logits.reshape(B * T, V), tg.reshape(-1).clamp_min(0),
                                  None if ref is None else ref.reshape(B * T, V)).view(B, T)
        return (flat * keep).sum(1) / keep.sum(1).clamp_min(1)
    if metric == "loss":
        return F.cross_entropy(logits, targets, reduction="none")
    if metric == "accuracy":
        return (logits.argmax(-1) == targets).float()
    if metric == "logit_diff":
        tgt = logits.gather(1, targets[:, None]).squeeze(1)
        other = logits.scatter(1, targets[:, None], float("-inf")).amax(1)
        return tgt - other
    if metric == "kl":
        if ref is None:
            raise ParticlizeError("metric='kl' needs the original model's logits")
        return F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref.float(), -1), log_target=True, reduction="none").sum(-1)
    raise ParticlizeError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ParticlizeError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")


def select_groups(pm: ParticleMap, groups: Sequence[str] | str | None) -> list[str]:
    """Group names to analyse: all, one kind (``"head"``), or explicit names."""
    if groups is None:
        return [g.name for g in pm.groups]
    if isinstance(groups, str):
        groups = [groups]
    out: list[str] = []
    for sel in groups:
        if sel in pm:
            out.append(sel)
        elif sel in KINDS:
            out += [g.name for g in pm.select(sel)]
        else:
            pm[sel]  # raises a PlanError naming similar groups
    return out


def frame(
    pm: ParticleMap,
    scores: Mapping[str, Tensor],
    method: str,
    by: str | None,
    targets: Tensor | None = None,
) -> pd.DataFrame:
    """Long result frame. ``scores[group]`` is ``[n]`` or, per example, ``[examples, n]``.

    ``by=None``: one row per particle (mean over examples); ``"example"``: one row per particle and
    example; ``"class"``: one row per particle and target class (mean over that class's examples).
    """
    rows = []
    for name, s in scores.items():
        s = s.detach().double().cpu()
        n = pm[name].size
        if by is None or s.ndim == 1:
            if by is not None:
                raise ParticlizeError(f"method {method!r} has no per-example scores for {name!r}; use by=None")
            v = s if s.ndim == 1 else s.mean(0)
            rows.append(pd.DataFrame({"group": name, "index": range(n), "score": v.numpy()}))
        elif by == "example":
            e, i = torch.meshgrid(torch.arange(s.shape[0]), torch.arange(n), indexing="ij")
            rows.append(pd.DataFrame({"group": name, "index": i.flatten().numpy(), "example": e.flatten().numpy(),
                                      "score": s.flatten().numpy()}))
        elif by == "class":
            if targets is None or targets.ndim != 1:
                raise ParticlizeError("by='class' needs one class index per example (targets of shape [batch])")
            for c in sorted(set(targets.tolist())):
                v = s[targets.cpu() == c].mean(0)
                rows.append(pd.DataFrame({"group": name, "index": range(n), "class": c, "score": v.numpy()}))
        else:
            raise ParticlizeError(f"unknown by={by!r}; use None, 'example' or 'class'")
    df = pd.concat(rows, ignore_index=True)
    df.insert(2, "method", method)
    return df
