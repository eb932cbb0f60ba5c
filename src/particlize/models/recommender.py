"""Rating predictors over user and item embeddings: NeuMF and plain matrix factorisation with biases.

* `NeuMF` (He et al., 2017, "Neural Collaborative Filtering"), here predicting explicit star ratings:
  a GMF tower (the element-wise product of user and item factors, weighed by ``gmf_out``) beside an MLP
  tower (the user and item embeddings, interleaved, through Linear + ReLU layers into ``mlp_out``),
  plus a global mean and user / item biases.
* `MatrixFactorization`: ``mean + b_u + b_i + <p_u, q_i>`` (Koren et al., "SVD" in Surprise) — the baseline.

Both are called as ``model(users=LongTensor[B], items=LongTensor[B])`` and return ratings ``[B, 1]``.
The MLP tower's input interleaves the two embeddings, ``[u_0, i_0, u_1, i_1, ...]``, so that dimension ``j``
of the user and of the item table — one latent factor of the tower — is one contiguous pair of features
(`particlize.adapters.recommender` prunes factors as pairs). Every model carries a ``particlize_recipe``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._util import _recipe


def _embedding(n: int, dim: int, std: float) -> nn.Embedding:
    e = nn.Embedding(n, dim)
    nn.init.normal_(e.weight, std=std)
    return e


class NeuMF(nn.Module):
    """GMF + MLP towers over user / item embeddings, predicting a rating.

    ``factors``: GMF embedding width; ``mlp_factors``: MLP embedding width per table; ``layers``: hidden widths
    of the MLP tower (its input is ``2 * mlp_factors``); ``mean``: the global mean rating (a starting value,
    trained with the rest).
    """

    def __init__(self, num_users: int, num_items: int, factors: int = 32, mlp_factors: int = 32,
                 layers: Sequence[int] = (64, 32, 16), mean: float = 3.5) -> None:
        super().__init__()
        self.particlize_recipe = _recipe(type(self), num_users=num_users, num_items=num_items, factors=factors,
                                         mlp_factors=mlp_factors, layers=list(layers), mean=mean)
        self.user_gmf = _embedding(num_users, factors, 0.1)
        self.item_gmf = _embedding(num_items, factors, 0.1)
        self.gmf_out = nn.Linear(factors, 1, bias=False)
        self.user_mlp = _embedding(num_users, mlp_factors, 0.1)
        self.item_mlp = _embedding(num_items, mlp_factors, 0.1)
        mods: list[nn.Module] = []
        width = 2 * mlp_factors
        for h in layers:
            mods += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.mlp = nn.Sequential(*mods)
        self.mlp_out = nn.Linear(width, 1)
        self.user_bias = nn.Embedding(num_users, 1)
        self.item_bias = nn.Embedding(num_items, 1)
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)
        nn.init.zeros_(self.mlp_out.bias)
        self.mean = nn.Parameter(torch.tensor(float(mean)))

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        gmf = self.user_gmf(users) * self.item_gmf(items)  # [B, factors]
        pair = torch.stack([self.user_mlp(users), self.item_mlp(items)], -1).flatten(1)  # [B, 2 * mlp_factors]
        h = self.mlp(pair)  # [B, layers[-1]]
        bias = self.user_bias(users) + self.item_bias(items) + self.mean  # [B, 1]
        return self.gmf_out(gmf) + self.mlp_out(h) + bias


class FactorDot(nn.Module):
    """Sum over the last dimension (the dot product of user and item factors); a module so that its input,
    one product per factor, can be gated."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(-1, keepdim=True)


class MatrixFactorization(nn.Module):
    """``mean + b_u + b_i + <p_u, q_i>``: biased matrix factorisation with ``factors`` latent factors."""

    def __init__(self, num_users: int, num_items: int, factors: int = 64, mean: float = 3.5) -> None:
        super().__init__()
        self.particlize_recipe = _recipe(type(self), num_users=num_users, num_items=num_items, factors=factors,
                                         mean=mean)
        self.user_factors = _embedding(num_users, factors, 0.1)
        self.item_factors = _embedding(num_items, factors, 0.1)
        self.user_bias = nn.Embedding(num_users, 1)
        self.item_bias = nn.Embedding(num_items, 1)
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)
        self.mean = nn.Parameter(torch.tensor(float(mean)))
        self.dot = FactorDot()

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        dot = self.dot(self.user_factors(users) * self.item_factors(items))  # [B, 1]
        return dot + self.user_bias(users) + self.item_bias(items) + self.mean


RECOMMENDERS = {"neumf": NeuMF, "mf": MatrixFactorization}

__all__ = ["FactorDot", "MatrixFactorization", "NeuMF", "RECOMMENDERS"]
