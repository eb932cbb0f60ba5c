"""Tensor-level helpers shared by the surgery verbs: replace a weight, refresh module shapes, the second
moments of a group's reader input."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..batches import batch_inputs, run_batch, token_weights
from ..errors import ParticlizeError, PlanError
from ..particles import ParticleMap, linear_reader_weight  # noqa: F401  (re-exported)


def set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer ``name`` of ``model`` by a new tensor (never written in place, so a
    copy that shares the old tensor with the original model leaves the original intact)."""
    mpath, _, tname = name.rpartition(".")
    mod = model.get_submodule(mpath) if mpath else model
    if tname in mod._parameters:
        old = mod._parameters[tname]
        mod._parameters[tname] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else True)
    elif tname in mod._buffers:
        mod._buffers[tname] = value
    else:
        raise PlanError(f"{name!r} is neither a parameter nor a buffer of the model")


def refresh_shapes(mod: nn.Module) -> None:
    """Bring a torch built-in module's shape attributes in line with its (cut) weights."""
    if isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = mod.weight.shape
    elif isinstance(mod, nn.modules.conv._ConvNd):
        w = mod.weight.shape
        if mod.transposed:
            mod.in_channels, mod.out_channels = w[0], w[1] * mod.groups
        else:
            mod.out_channels, mod.in_channels = w[0], w[1] * mod.groups
    elif isinstance(mod, nn.modules.batchnorm._NormBase):
        n = (mod.running_mean if mod.running_mean is not None else mod.weight).shape[0]
        mod.num_features = n
    elif isinstance(mod, nn.LayerNorm) and mod.weight is not None:
        mod.normalized_shape = tuple(mod.weight.shape)
    elif isinstance(mod, nn.Embedding):
        mod.num_embeddings, mod.embedding_dim = mod.weight.shape


@torch.no_grad()
def input_moments(pm: ParticleMap, groups: Sequence[str], data: Any) -> dict[str, torch.Tensor]:
    """``{group: E[x̃ x̃ᵀ]}`` over ``data``: the second moments of each group's reader input ``x``
    (all particles' features) extended by a constant 1 (last row/column), padding excluded. Memory: one
    ``(features + 1)²`` float64 matrix per group (an FFN of 11,008 neurons: 0.97 GB)."""
    sums: dict[str, list] = {}
    current: list[Any] = [None]

    def sink(name: str, i: int, a: torch.Tensor) -> None:
        x = a.detach().double()
        w = token_weights(current[0], x)
        x = x.reshape(-1, x.shape[-1])
        x = torch.cat([x, torch.ones_like(x[:, :1])], 1)
        w = torch.ones_like(x[:, :1]) if w is None else w.reshape(-1, 1)
        acc = sums.setdefault(name, [0.0, 0.0])
        acc[0] = acc[0] + (x * w).T @ x
        acc[1] += float(w.sum())

    with pm.capture(groups, sink):
        for batch in data:
            current[0] = batch_inputs(batch)
            run_batch(pm.model, current[0])
    missing = [n for n in groups if n not in sums]
    if missing:
        raise ParticlizeError(f"the calibration data never reached the readers of {missing[:3]}; "
                              "pass batches the model runs on (the calibration inputs)")
    return {n: s / max(cnt, 1.0) for n, (s, cnt) in sums.items()}
