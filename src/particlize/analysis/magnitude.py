"""``magnitude``: weight norms of what writes and what reads each particle (data-free)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..particles import ParticleMap
from ..record import particle_table


def magnitude(pm: ParticleMap, batches=None, **_) -> dict[str, Tensor]:
    """``writer_norm × reader_norm`` per particle (the writer norm alone where nothing reads it
    through weights, e.g. blocks)."""
    df = particle_table(pm)
    s = df.writer_norm.to_numpy() * np.where(np.isnan(df.reader_norm), 1.0, df.reader_norm.to_numpy())
    out: dict[str, Tensor] = {}
    for name, idx in df.groupby("group", sort=False).indices.items():
        out[name] = torch.as_tensor(s[idx])
    return out
