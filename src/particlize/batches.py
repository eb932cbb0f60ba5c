"""How particlize calls a model on a batch, and which positions of an activation count (padding does not)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ParticlizeError


def batch_inputs(batch: Any) -> Any:
    """The model inputs of a batch: an analysis ``Batch``'s ``inputs``, an ``(inputs, targets)`` pair's
    first item, or the batch itself."""
    if hasattr(batch, "inputs") and hasattr(batch, "targets"):
        return batch.inputs
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and not isinstance(batch[0], (int, float)):
        return batch[0]
    return batch


def token_weights(inputs: Any, a: Tensor) -> Tensor | None:
    """``[B, T]`` weights that leave padding out of activation statistics: the inputs' ``attention_mask``
    when the activation is laid out ``[B, T, features]`` like it; None (every position counts) otherwise."""
    m = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if isinstance(m, Tensor) and m.ndim == 2 and a.ndim == 3 and tuple(a.shape[:2]) == tuple(m.shape):
        return m.to(a.device, torch.float64)
    return None


def run_batch(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` the way particlize calls it everywhere: a tensor positionally, a dict as keyword
    arguments, and an ``(inputs, targets)`` pair or a ``Batch`` by its inputs."""
    batch = batch_inputs(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, Tensor):
        return model(batch)
    raise ParticlizeError(
        f"cannot call the model on a {type(batch).__name__}; pass a tensor, a dict of tensors, "
        "or (inputs, targets) pairs"
    )
