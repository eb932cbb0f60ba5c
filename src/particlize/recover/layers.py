"""Layer-wise distillation: each student block's output pulled towards the teacher block it came from
(CoFi / TinyBERT), for classifiers and the DiT alike; blocks are matched through the pruning plans."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..analysis.ablation import _recording
from ..surgery import block_correspondence


@contextlib.contextmanager
def layer_distillation(teacher: nn.Module, student: nn.Module) -> Iterator[Callable[[Any], torch.Tensor] | None]:
    """While active, a function of the batch inputs giving the mean squared difference between each
    student block's output and its teacher block's, after a forward of both (None: no blocks match)."""
    pairs = block_correspondence(teacher, student)
    if not pairs:
        yield None
        return
    s_out: dict[str, torch.Tensor] = {}
    t_out: dict[str, torch.Tensor] = {}

    def loss(inputs: Any) -> torch.Tensor:
        mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
        return sum(_masked_mse(s_out[sp], t_out[tp], mask) for tp, sp in pairs) / len(pairs)

    # the student's outputs keep their graph (the loss trains through them): no detach
    with _recording(student, [sp for _, sp in pairs], s_out, keep=_first_output), \
            _recording(teacher, [tp for tp, _ in pairs], t_out, keep=_first_output):
        yield loss


def _first_output(args: tuple, out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared difference over the real (``mask`` = 1) positions of ``[B, T, D]`` states."""
    d = (a.float() - b.float()).pow(2)
    if mask is None or mask.shape != d.shape[:2]:
        return d.mean()
    m = mask.to(d.dtype).unsqueeze(-1)
    return (d * m).sum() / (m.sum() * d.shape[-1]).clamp_min(1.0)


__all__ = ["layer_distillation"]
