"""Normalisation layers seen from a particle: where the first one after a reader is, and its closed form
under a rank-1 change of its input (shared by ``taylor-norm`` and the exact ablation engine)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .ablation import ExecutionTrace


def is_norm(mod: nn.Module) -> bool:
    """LayerNorm / RMSNorm modules (torch's, or any class named ``*LayerNorm`` / ``*RMSNorm``)."""
    name = type(mod).__name__
    return isinstance(mod, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))) or name.endswith(("LayerNorm", "RMSNorm"))


def next_norm(trace: "ExecutionTrace", reader: str, model: nn.Module) -> str | None:
    """The first normalisation module entered after ``reader`` returns (called once per forward)."""
    if trace.calls.get(reader) != 1:
        return None
    after = [(e, p) for p, e in trace.enter.items() if e > trace.exit[reader] and trace.calls.get(p) == 1
             and is_norm(model.get_submodule(p))]
    return min(after)[1] if after else None


def norm_params(N: nn.Module) -> tuple[bool, float, Tensor | None, Tensor | None] | None:
    """``(centred, eps, weight, bias)`` of a norm over the last dimension whose change under a rank-1
    perturbation has a closed form: ``nn.LayerNorm`` (centred) and RMS norms with ``weight`` and
    ``variance_epsilon`` / ``eps``."""
    if isinstance(N, nn.LayerNorm):
        return (True, float(N.eps), N.weight, N.bias) if len(N.normalized_shape) == 1 else None
    eps = getattr(N, "variance_epsilon", getattr(N, "eps", None))
    if type(N).__name__.endswith("RMSNorm") and isinstance(eps, float) and isinstance(getattr(N, "weight", None), Tensor):
        return False, eps, N.weight, None
    return None


def low_rank_scales(centred: bool, eps: float, z: Tensor, C: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
    """For a norm input ``z [..., d]`` changed to ``z + C_j W_j`` (``C [..., n, w]`` per token and
    particle, ``W [n, w, d]`` the ``w`` directions of particle ``j``): ``(r, s)``, both ``[..., n]``, with

        N(z + C_j W_j) = r (N(z) − β) + s γ ⊙ (C_j W̄_j) + β

    (``W̄`` centred when the norm is): the new inverse scale ``s`` and its ratio ``r`` to the clean one.
    Float64, from per-token statistics and the ``w × w`` Gram matrix of each particle: no norm is run."""
    z, C, W = z.double(), C.double(), W.double()
    d = z.shape[-1]
    if centred:
        z = z - z.mean(-1, keepdim=True)
        W = W - W.mean(-1, keepdim=True)
    s2 = z.pow(2).mean(-1, keepdim=True)  # variance (or mean square) of each token
    zW = torch.einsum("...d,nwd->...nw", z, W) / d
    gram = torch.einsum("nwd,nvd->nwv", W, W) / d
    quad = torch.einsum("...nw,nwv,...nv->...n", C, gram, C)
    s2_new = (s2 + 2 * (C * zW).sum(-1) + quad).clamp_min(0)
    inv, inv_new = (s2 + eps).rsqrt(), (s2_new + eps).rsqrt()
    return inv_new / inv, inv_new


def rank1_scales(centred: bool, eps: float, z: Tensor, C: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
    """`low_rank_scales` for width-1 particles (``C [..., n]``, ``W [n, d]``): ``(r, C s)``."""
    r, s = low_rank_scales(centred, eps, z, C.unsqueeze(-1), W.unsqueeze(1))
    return r, C.double() * s
