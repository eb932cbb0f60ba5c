"""Compensation verbs: the kept particles' reader absorbs what a prune is about to cut.

Dropping a particle throws its contribution to the reader away; much of it can be kept without training.
Each verb here is computed on the intact model from calibration data, writes new reader weights (and bias)
*before* the prune step that cuts the particles, and records what it did in the plan:

- ``bias`` folds each removed particle's mean contribution into the reader's bias (exact in expectation:
  mean ablation made permanent, as FLAP does; a reader without a bias gets one);
- ``merge`` folds each removed particle into the one kept particle whose activations best predict it, with
  the least-squares map (a scale for a neuron, a ``head_dim`` square map for a head), chosen to minimise the
  reader's output error on the data: neuron merging (Kim et al., 2020) matched by activations as in ZipIt!;
- ``refit`` predicts the removed features from all kept ones by ridge least squares and folds that into the
  reader: the layer-wise reconstruction of FLAP / ZipLM-style structured pruning.

They apply where a group's only reader is a linear layer on the gated features (`linear_reader_weight`);
other groups are cut without compensation. The constant term of ``merge`` and ``refit`` is used only where
the reader has a bias. Replaying a saved plan rebuilds only structure (``bias`` may add a bias): the values
the verbs computed come back with the weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import PlanError
from ..particles import ParticleGroup, ParticleMap
from ..plan import Step, register_verb
from ._tensors import input_moments, linear_reader_weight, set_tensor


@dataclass(frozen=True)
class _Problem:
    """One group's compensation problem, in features-major form: ``Wf`` is the reader weight ``[F, out]``
    (``y = Wf^T x + b``), ``M`` the second moments of ``[x, 1]``; ``kept`` / ``gone`` are feature indices."""

    group: ParticleGroup
    keep: list[int]
    removed: list[int]
    kept: Tensor
    gone: Tensor
    M: Tensor
    Wf: Tensor
    b: Tensor | None

    @property
    def const(self) -> int:
        return self.M.shape[0] - 1


class _Compensation:
    name = ""
    adds_bias = False

    def joins(self, pm: ParticleMap, run: Sequence[Step], step: Step) -> bool:
        return False

    def steps(self, pm: ParticleMap, keep: Mapping[str, Sequence[int]], data: Iterable[Any]) -> list[Step]:
        """Steps for the groups of ``keep`` (``{group: kept indices}``) this verb can serve, computed from
        the intact ``pm.model`` on ``data``."""
        groups = [n for n, k in keep.items() if len(k) < pm[n].size and linear_reader_weight(pm, pm[n]) is not None]
        if not groups:
            return []
        moments = input_moments(pm, groups, data)
        out = []
        for name in groups:
            g = pm[name]
            wname, dim, bname = linear_reader_weight(pm, g)  # type: ignore[misc]
            r = g.readers[0]
            k = sorted(int(i) for i in keep[name])
            removed = sorted(set(range(g.size)) - set(k))
            W = pm._tensor(wname).detach()
            b = pm._tensor(bname).detach().double() if bname is not None else None
            if b is None and self.adds_bias:
                b = torch.zeros(W.shape[1 - dim], dtype=torch.float64, device=W.device)
            p = _Problem(g, k, removed, r.indices(k), r.indices(removed), moments[name].to(W.device),
                         W.movedim(dim, 0).double(), b)
            Wf, b_new, args = self.solve(p)
            payload = {"weight": Wf.to(W.dtype).movedim(0, dim).contiguous()}
            if b_new is not None:
                payload["bias"] = b_new.to(W.dtype)
            if self.adds_bias and bname is None:
                args = {**args, "adds_bias": True}
            out.append(Step(self.name, name, {"removed": removed, **args}, payload))
        return out

    def solve(self, p: _Problem) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
        raise NotImplementedError

    def apply(self, pm: ParticleMap, steps: Sequence[Step], *, replay: bool = False) -> nn.Module:
        for s in steps:
            spec = linear_reader_weight(pm, pm[s.group])
            if spec is None:
                raise PlanError(f"{self.name} step for {s.group!r}: its reader is not a linear layer on its features")
            wname, dim, bname = spec
            if s.args.get("adds_bias") and bname is None:
                mod = pm.model.get_submodule(wname.rpartition(".")[0])
                w = getattr(mod, "weight")
                mod.bias = nn.Parameter(torch.zeros(w.shape[1 - dim], dtype=w.dtype, device=w.device))
                bname = f"{wname.rpartition('.')[0]}.bias"
            if replay:
                continue
            if s.payload is None:
                raise PlanError(f"{self.name} step for {s.group!r} carries no computed weights: build it with "
                                f"pm.prune(..., compensate={self.name!r}, data=...), or load the saved model")
            set_tensor(pm.model, wname, s.payload["weight"])
            if "bias" in s.payload and bname is not None:
                set_tensor(pm.model, bname, s.payload["bias"])
        return pm.model

    def carry(self, pm: ParticleMap, steps: Sequence[Step], model: nn.Module) -> ParticleMap:
        return pm if model is pm.model else pm.rebind(model)


class Bias(_Compensation):
    """``b ← b + W_S E[x_S]``: each removed particle's mean contribution stays in the reader's bias."""

    name = "bias"
    adds_bias = True

    def solve(self, p: _Problem) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
        mean = p.M[p.gone, p.const]
        return p.Wf, p.b + mean @ p.Wf[p.gone], {}


class Merge(_Compensation):
    """Each removed particle folded into its best-matching kept particle: ``x_i ≈ A x_j (+ c)``,
    ``W_j ← W_j + W_i A``, ``b ← b + W_i c``; ``j`` minimises ``E‖W_i (x_i − A x_j − c)‖²`` on the data."""

    name = "merge"

    def __init__(self, damp: float = 1e-6):
        self.damp = damp

    def solve(self, p: _Problem) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
        r = p.group.readers[0]
        w = r.width
        Zk = torch.stack([r.indices([j]) for j in p.keep])  # [kept, w]: features of each candidate
        if p.b is not None:  # and the constant
            Zk = torch.cat([Zk, torch.full((len(p.keep), 1), p.const)], 1)
        Ig = torch.stack([r.indices([i]) for i in p.removed])  # [removed, w]
        nk, z, nr = Zk.shape[0], Zk.shape[1], Ig.shape[0]
        A = p.M[Zk[:, :, None], Zk[:, None, :]]  # [kept, z, z]
        ridge = self.damp * A.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-12)
        A = A + ridge[:, None, None] * torch.eye(z, dtype=A.dtype, device=A.device)
        B = p.M[Zk[:, :, None], Ig.reshape(1, 1, -1)]  # [kept, z, removed * w]
        R = torch.linalg.solve(A, B).reshape(nk, z, nr, w).transpose(1, 2)  # [kept, removed, z, w]: x_i ≈ Rᵀ z_j
        MZI = B.reshape(nk, z, nr, w).transpose(1, 2)
        MII = p.M[Ig[:, :, None], Ig[:, None, :]]  # [removed, w, w]
        RtMZI = R.transpose(-1, -2) @ MZI
        E = MII[None] - RtMZI - RtMZI.transpose(-1, -2) + R.transpose(-1, -2) @ A[:, None] @ R  # residual moments
        WI = p.Wf[Ig]  # [removed, w, out]
        err = torch.einsum("nwo,knwv,nvo->kn", WI, E, WI)  # reader output error of merging i into j
        best = err.argmin(0).cpu()  # [removed]; indexes the host-side feature lists below
        Rb = R[best, torch.arange(nr)]  # [removed, z, w]
        fold = Rb @ WI  # [removed, z, out]
        Wf = p.Wf.index_add(0, Zk[best][:, :w].reshape(-1).to(p.Wf.device), fold[:, :w].reshape(-1, fold.shape[-1]))
        b = p.b + fold[:, w].sum(0) if p.b is not None else None
        into = {str(i): int(p.keep[int(k)]) for i, k in zip(p.removed, best)}
        return Wf, b, {"into": into}


class Refit(_Compensation):
    """Ridge least squares of the removed features on all kept ones, ``x_S ≈ Rᵀ [x_K (, 1)]``, folded into
    the reader: ``W_K ← W_K + W_S Rᵀ`` (``damp`` × the mean of ``diag E[x_K x_Kᵀ]`` on the diagonal)."""

    name = "refit"

    def __init__(self, damp: float = 0.01):
        self.damp = damp

    def solve(self, p: _Problem) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
        const = torch.tensor([p.const]) if p.b is not None else torch.tensor([], dtype=torch.long)
        K = torch.cat([p.kept, const])
        A = p.M[K][:, K]
        A = A + self.damp * A.diagonal().mean().clamp_min(1e-12) * torch.eye(len(K), dtype=A.dtype, device=A.device)
        R = torch.linalg.solve(A, p.M[K][:, p.gone])  # [|K| (+1), |S|]
        Wf = p.Wf.clone()
        Wf[p.kept] += R[: len(p.kept)] @ p.Wf[p.gone]
        b = p.b + R[-1] @ p.Wf[p.gone] if p.b is not None else None
        return Wf, b, {"damp": self.damp}


BIAS = register_verb(Bias())
MERGE = register_verb(Merge())
REFIT = register_verb(Refit())
