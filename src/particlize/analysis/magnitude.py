"""``magnitude``: weight norms of what writes and what reads each particle (data-free)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..particles import ParticleMap
from ..record import particle_table
from ._common import Batch
from .registry import ScorerSpec, register


def magnitude(pm: ParticleMap, batches: Sequence[Batch] = (), *, groups: Sequence[str]) -> dict[str, Tensor]:
    """``writer_norm × reader_norm`` per particle of ``groups`` (the writer norm alone where nothing
    reads it through weights, e.g. blocks). ``batches`` are not used: the score needs no data."""
    df = particle_table(pm)
    s = df.writer_norm.to_numpy() * np.where(np.isnan(df.reader_norm), 1.0, df.reader_norm.to_numpy())
    wanted = set(groups)
    out: dict[str, Tensor] = {}
    for name, idx in df.groupby("group", sort=False).indices.items():
        if name in wanted:
            out[name] = torch.as_tensor(s[idx])
    return out


register(ScorerSpec("magnitude", "writer x reader weight norms (no data)", magnitude, data=False))
