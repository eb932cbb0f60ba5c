"""``influence`` (ShortGPT's block influence): ``1 − cos(block input, block output)`` per token,
averaged — how much a block changes the residual stream. Blocks only; per example available."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ParticlizeError
from ..particles import ParticleMap, ResidualGate, _block_io
from ._common import Batch, call
from .registry import ScorerSpec, register


def influence(pm: ParticleMap, batches: Sequence[Batch], *, groups: Sequence[str]) -> dict[str, Tensor]:
    """``{block group: [examples, n]}``: 1 − cos(block input, block output), averaged over tokens."""
    blocks = [n for n in groups if isinstance(pm[n].gate, ResidualGate)]
    if not blocks:
        raise ParticlizeError("method='influence' scores blocks; select block groups (groups='block')")
    out: dict[str, list[Tensor]] = {n: [] for n in blocks}
    for b in batches:
        per = {n: [None] * pm[n].size for n in blocks}
        handles = []
        for n in blocks:
            for i, path in enumerate(pm[n].gate.modules):
                def hook(mod, args, kwargs, output, n=n, i=i):
                    inp, o = _block_io(args, kwargs, output)
                    cos = F.cosine_similarity(inp.double(), o.double(), dim=-1)  # [B, ...tokens]
                    per[n][i] = (1 - cos).reshape(cos.shape[0], -1).mean(1)

                handles.append(pm.model.get_submodule(path).register_forward_hook(hook, with_kwargs=True))
        try:
            with torch.no_grad():
                call(pm.model, b.inputs)
        finally:
            for h in handles:
                h.remove()
        for n in blocks:
            out[n].append(torch.stack(per[n], 1))
    return {n: torch.cat(v) for n, v in out.items()}


register(ScorerSpec("influence", "blocks: 1 - cos(block input, block output) (ShortGPT)", influence,
                    per_example=True, kinds=("block",)))
