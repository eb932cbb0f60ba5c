"""The mixture-of-experts FFN that `moefy` puts in place of a dense FFN (MoEfication, Zhang et al., 2022).

An FFN of ``N`` hidden neurons is split into ``E`` experts of ``m = N / E`` neurons each: the rows of the up
(and gate) projection and the columns of the down projection are reordered so that expert ``e`` owns the
contiguous neurons ``e*m .. (e+1)*m``. A small router predicts from the FFN input which experts matter for a
token; the token runs only its top-``active`` experts, whose outputs are summed unweighted (every expert
active is the original FFN, up to the order of the sum).

The fast path groups tokens by expert without a Python loop over experts: the (token, expert) pairs are
sorted by expert id and laid out in ``[E, capacity, d]`` (capacity: the busiest expert's token count; the
slots an expert does not fill read token 0, and their results are dropped), every expert runs in one batched
matmul (``torch.bmm`` over views of the up / gate / down weights, nothing copied), and each token sums its
``k`` rows back. One gather in, one gather out, three batched matmuls; measured against the previous
per-expert loop (sort, ``index_select``, two small matmuls and ``index_add`` per expert) in
``benchmarks/moefy_grouped.py``. The dense-masked path (`ExpertFFN.masked`) computes
every expert for every token and zeroes the unselected ones: it is the reference the tests compare against,
and the path gates use (per-expert outputs are what an expert gate scales).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


class Router(nn.Module):
    """Scores each expert for a token from the FFN input: a Linear ``d -> E``, or with ``hidden`` > 0 a
    2-layer MLP ``d -> hidden -> E`` (ReLU). Its last Linear is ``out`` (one row per expert)."""

    def __init__(self, d_in: int, experts: int, hidden: int = 0):
        super().__init__()
        self.hidden = nn.Linear(d_in, hidden) if hidden > 0 else None
        self.out = nn.Linear(hidden if hidden > 0 else d_in, experts)

    def forward(self, x: Tensor) -> Tensor:
        if self.hidden is not None:
            x = F.relu(self.hidden(x))
        return self.out(x)


class ExpertFFN(nn.Module):
    """An FFN whose ``num_experts`` equal slices of neurons run only for the tokens that route to them.

    The Linears keep the names they had in the dense FFN (``names``: role ``up`` / ``gate`` / ``down`` →
    attribute name), so the model's state dict reads like the original's, with a ``router`` added. The
    gated form (``gate`` present) computes ``down(act(gate(x)) * up(x))``, the plain one ``down(act(up(x)))``.
    """

    def __init__(self, d_in: int, d_out: int, experts: int, expert_size: int, active: int, *, act: nn.Module,
                 names: dict[str, str], gated: bool = False, up_bias: bool = True, down_bias: bool = True,
                 router_hidden: int = 0):
        super().__init__()
        self.num_experts, self.expert_size, self.active = experts, expert_size, active
        self.roles = dict(names)
        n = experts * expert_size
        if gated:
            self.add_module(self.roles["gate"], nn.Linear(d_in, n, bias=up_bias))
        self.add_module(self.roles["up"], nn.Linear(d_in, n, bias=up_bias))
        self.add_module(self.roles["down"], nn.Linear(n, d_out, bias=down_bias))
        self.act = act
        self.gated = gated
        self.router = Router(d_in, experts, router_hidden)
        self._expert_hooks: OrderedDict[int, Any] = OrderedDict()

    # ---- the three projections ------------------------------------------------------------------
    def linear(self, role: str) -> nn.Linear | None:
        """The Linear playing ``role`` (``"up"``, ``"gate"``, ``"down"``); None for a missing gate."""
        return getattr(self, self.roles[role]) if role in self.roles else None

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, expert_size={self.expert_size}, active={self.active}"

    # ---- routing --------------------------------------------------------------------------------
    def hidden(self, x: Tensor, rows: slice | None = None) -> Tensor:
        """The hidden activations of neurons ``rows`` (all when None) for inputs ``x`` ``[..., d_in]``."""
        r = slice(None) if rows is None else rows

        def lin(m: nn.Linear) -> Tensor:
            return F.linear(x, m.weight[r], None if m.bias is None else m.bias[r])

        gate = self.linear("gate")
        return self.act(lin(gate)) * lin(self.linear("up")) if gate is not None else self.act(lin(self.linear("up")))

    def expert_norms(self, x: Tensor) -> Tensor:
        """``[..., E]``: the L2 norm of each expert's hidden activations on ``x`` (what the router predicts)."""
        h = self.hidden(x)
        return h.unflatten(-1, (self.num_experts, self.expert_size)).norm(dim=-1)

    def selection(self, logits: Tensor) -> Tensor:
        """``[..., E]`` booleans: the top-``active`` experts of each token (experts scored -inf never run)."""
        k = min(self.active, self.num_experts)
        sel = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(k, dim=-1).indices, True)
        return sel & (logits > float("-inf"))

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self._expert_hooks:
            return self.masked(x, hooks=list(self._expert_hooks.values()))
        if self.active >= self.num_experts:
            return self.linear("down")(self.hidden(x))
        return self.grouped(x)

    def grouped(self, x: Tensor) -> Tensor:
        """The fast path: tokens grouped by expert into ``[E, capacity, d]``, one batched matmul per projection
        for all experts, each token's ``k`` expert outputs gathered back and summed."""
        lead, d = x.shape[:-1], x.shape[-1]
        xf = x.reshape(-1, d)
        T, E, m = xf.shape[0], self.num_experts, self.expert_size
        k = min(self.active, E)
        down = self.linear("down")
        top = self.router(xf).topk(k, dim=-1).indices.reshape(-1)  # [T * k]: expert of pair p = (token p // k, slot)
        order = top.argsort(stable=True)  # pairs grouped by expert
        counts = torch.bincount(top, minlength=E)
        cap = int(counts.max()) if T else 0
        expert = top[order]
        pos = expert * cap + torch.arange(T * k, device=x.device) - (counts.cumsum(0) - counts)[expert]
        src = torch.zeros(E * cap, dtype=torch.long, device=x.device)  # padding slots read token 0 (dropped)
        src[pos] = order // k
        h = self._expert_hidden(xf.index_select(0, src).view(E, cap, d))  # [E, cap, m]
        w_down = down.weight.view(-1, E, m).permute(1, 2, 0)  # [E, m, d_out], a view
        y = torch.bmm(h, w_down).view(E * cap, -1)  # [E * cap, d_out]
        back = torch.empty_like(pos)
        back[order] = pos  # the padded row of each pair, in pair order
        out = y.index_select(0, back).view(T, k, -1).sum(1)
        if down.bias is not None:
            out = out + down.bias
        return out.reshape(*lead, out.shape[-1])

    def _expert_hidden(self, xe: Tensor) -> Tensor:
        """``[E, c, m]``: each expert's hidden activations on its own ``c`` tokens ``xe`` ``[E, c, d_in]``."""
        E, m = self.num_experts, self.expert_size

        def proj(lin: nn.Linear) -> Tensor:
            w = lin.weight.view(E, m, -1).transpose(1, 2)  # [E, d_in, m], a view
            return torch.bmm(xe, w) if lin.bias is None else torch.baddbmm(lin.bias.view(E, 1, m), xe, w)

        gate = self.linear("gate")
        return self.act(proj(gate)) * proj(self.linear("up")) if gate is not None else self.act(proj(self.linear("up")))

    def masked(self, x: Tensor, hooks: list[Any] | None = None) -> Tensor:
        """The dense-masked reference: every expert computed for every token, unselected ones zeroed.

        ``hooks`` (installed by expert gates) may exclude experts from routing (``route(logits)``) and
        change the per-expert outputs ``[..., E * d_out]`` (``output(y)``) before they are summed."""
        hooks = hooks or []
        logits = self.router(x)
        for h in hooks:
            logits = h.route(logits)
        sel = self.selection(logits)
        E, m = self.num_experts, self.expert_size
        w = self.linear("down").weight.unflatten(1, (E, m))  # [d_out, E, m]
        y = torch.einsum("...em,oem->...eo", self.hidden(x).unflatten(-1, (E, m)), w)  # [..., E, d_out]
        y = (y * sel.unsqueeze(-1).to(y.dtype)).flatten(-2)
        for h in hooks:
            y = h.output(y)
        out = y.unflatten(-1, (E, w.shape[0])).sum(-2)
        return out + self.linear("down").bias if self.linear("down").bias is not None else out

    def add_expert_hook(self, hook: Any) -> RemovableHandle:
        """Run the masked path with ``hook`` (``route(logits) -> logits``, ``output(y) -> y``) until the
        returned handle is removed."""
        handle = RemovableHandle(self._expert_hooks)
        self._expert_hooks[handle.id] = hook
        return handle


def find_activation(container: nn.Module) -> nn.Module | None:
    """The activation module of a dense FFN: its one child without parameters that is neither a Linear
    nor a dropout (``act``, ``act_fn``, ``intermediate_act_fn``); None when there is not exactly one."""
    found = [m for m in container.children()
             if not isinstance(m, (nn.Linear, nn.Dropout)) and not any(True for _ in m.parameters())]
    return found[0] if len(found) == 1 else None

