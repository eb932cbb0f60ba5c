"""Recommenders over user / item embedding tables: latent factors and MLP neurons (NeuMF, biased MF).

Particles:

- ``gmf.factors`` (kind ``factor``): factor ``f`` is column ``f`` of the user table ``user_gmf`` and of
  the item table ``item_gmf`` — the two meet in the element-wise product — and is read by column ``f`` of
  ``gmf_out``. Gate: the input of ``gmf_out`` (per example, patchable). ``flops_ctx = 1``: the product's
  multiply per scored pair.
- ``mlp.factors`` (kind ``factor``): dimension ``j`` of ``user_mlp`` and ``item_mlp``, which the model
  interleaves (``[u_0, i_0, u_1, i_1, ...]``) so that it is the pair of features ``2j, 2j + 1`` read by
  columns ``2j, 2j + 1`` of the first MLP Linear. Gate: that Linear's input, particles of width 2.
- ``mlp.{k}.neurons`` (kind ``neuron``): the outputs of each MLP Linear (a row and its bias), read by the
  next Linear or ``mlp_out``. Gate: the reader's input.
- ``factors`` (kind ``factor``) of a biased matrix factorisation: column ``f`` of ``user_factors`` and
  ``item_factors``; the model sums their product (no reader weights), gated at the ``dot`` module
  (`FactorDot`) where the adapter installs the sum — only when the model has one.

The structure is recognised by attribute names (adapters sit below `particlize.models` and never import it):
``user_gmf``, ``item_gmf`` (``nn.Embedding``) and ``gmf_out`` (``nn.Linear``), optionally ``user_mlp``,
``item_mlp``, ``mlp`` (an ``nn.Sequential`` of Linear and activations) and ``mlp_out``; or ``user_factors``,
``item_factors`` and a ``dot`` module. Embedding lookups cost no FLOPs; Linears 2 per weight per scored pair.
Bias tables (``user_bias``, ``item_bias``) and the global mean are not particles.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..particles import InputGate, ParticleGroup, Slice
from . import AdapterResult, register
from ._builders import columns, mlp_neurons

FLOPS_UNIT = "per scored pair"


def _emb(model: nn.Module, name: str) -> nn.Embedding | None:
    m = getattr(model, name, None)
    return m if isinstance(m, nn.Embedding) else None


def _linear(model: nn.Module, name: str) -> nn.Linear | None:
    m = getattr(model, name, None)
    return m if isinstance(m, nn.Linear) else None


class RecommenderAdapter:
    """Latent factors of user/item embedding tables and the neurons of an MLP tower (see the module docstring)."""

    name = "recommender"

    def matches(self, model: nn.Module) -> bool:
        gmf = _emb(model, "user_gmf") and _emb(model, "item_gmf") and _linear(model, "gmf_out")
        mf = _emb(model, "user_factors") and _emb(model, "item_factors") and isinstance(getattr(model, "dot", None), nn.Module)
        return bool(gmf or mf)

    def build(self, model: nn.Module, *, seq_len: int, example_inputs: Any = None) -> AdapterResult:
        groups: list[ParticleGroup] = []
        flops: dict[str, float] = {}
        unplaced: list[str] = []
        if _emb(model, "user_factors") is not None and _emb(model, "item_factors") is not None:
            k = model.user_factors.embedding_dim
            if model.item_factors.embedding_dim == k:
                groups.append(ParticleGroup(
                    "factors", "factor", k, 0, InputGate("dot"),
                    writers=(Slice("user_factors.weight", 1), Slice("item_factors.weight", 1)), flops_ctx=2.0, ctx_len=1,
                ))
        ug, ig, out = _emb(model, "user_gmf"), _emb(model, "item_gmf"), _linear(model, "gmf_out")
        if ug is not None and ig is not None and out is not None:
            if ug.embedding_dim == ig.embedding_dim == out.in_features:
                groups.append(ParticleGroup(
                    "gmf.factors", "factor", ug.embedding_dim, 0, InputGate("gmf_out"),
                    writers=(Slice("user_gmf.weight", 1), Slice("item_gmf.weight", 1)),
                    readers=(columns("gmf_out"),), flops_ctx=1.0, ctx_len=1,
                ))
                flops["gmf_out.weight"] = 2.0
            else:
                unplaced.append("gmf.factors (user_gmf, item_gmf and gmf_out disagree on the number of factors)")
        groups += self._mlp(model, flops, unplaced)
        return AdapterResult(groups, flops, FLOPS_UNIT, recipe=getattr(model, "particlize_recipe", None),
                             unplaced=unplaced)

    @staticmethod
    def _mlp(model: nn.Module, flops: dict[str, float], unplaced: list[str]) -> list[ParticleGroup]:
        um, im, mlp, top = _emb(model, "user_mlp"), _emb(model, "item_mlp"), getattr(model, "mlp", None), _linear(model, "mlp_out")
        if um is None or im is None or not isinstance(mlp, nn.Sequential) or top is None:
            return []
        linears = [(f"mlp.{n}", m) for n, m in mlp.named_children() if isinstance(m, nn.Linear)]
        others = [m for m in mlp.children() if not isinstance(m, nn.Linear)]
        if not linears or any(len(list(m.parameters())) for m in others):
            unplaced.append("mlp (not a Sequential of Linear layers and parameter-free activations)")
            return []
        for path, _ in (*linears, ("mlp_out", top)):
            flops[f"{path}.weight"] = 2.0
        out: list[ParticleGroup] = []
        d = um.embedding_dim
        first_path, first = linears[0]
        if im.embedding_dim == d and first.in_features == 2 * d:
            out.append(ParticleGroup(
                "mlp.factors", "factor", d, 0, InputGate(first_path),
                writers=(Slice("user_mlp.weight", 1), Slice("item_mlp.weight", 1)),
                readers=(columns(first_path, width=2),),
            ))
        else:
            unplaced.append("mlp.factors (user_mlp / item_mlp widths do not match the first MLP Linear)")
        readers = [p for p, _ in linears[1:]] + ["mlp_out"]
        for k, ((path, lin), reader) in enumerate(zip(linears, readers), 1):
            out.append(mlp_neurons(path, lin.out_features, k, InputGate(reader), [(path, lin)], reader))
        return out


register(RecommenderAdapter(), priority=45)  # claims by attribute names; nothing else matches an embedding recommender

__all__ = ["FLOPS_UNIT", "RecommenderAdapter"]
