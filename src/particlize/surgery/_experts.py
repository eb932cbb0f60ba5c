"""The mixture-of-experts FFN that `moefy` puts in place of a dense FFN (MoEfication, Zhang et al., 2022).

An FFN of ``N`` hidden neurons is split into ``E`` experts of ``m = N / E`` neurons each: the rows of the up
(and gate) projection and the columns of the down projection are reordered so that expert ``e`` owns the
contiguous neurons ``e*m .. (e+1)*m``. A small router predicts from the FFN input which experts matter for a
token; the token runs only its top-``active`` experts, whose outputs are summed unweighted (every expert
active is the original FFN, up to the order of the sum).

The fast path (`ExpertFFN.grouped`) runs each expert on its own tokens only: the (token, expert) pairs are
sorted by expert id and either laid out in equal blocks of rows (every block in one batched matmul per
projection; `block_layout` sizes the blocks against a skewed router) or run one expert at a time over its
contiguous run of pairs; each token sums its ``k`` expert outputs. Both were measured against the previous
per-expert loop and the dense FFN in ``benchmarks/moefy_grouped.py``. The dense-masked path (`ExpertFFN.masked`) computes
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

from ..errors import ParticlizeError


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
        self._down_cache: tuple[Any, Tensor] | None = None  # see _down_experts

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

    def grouped(self, x: Tensor, how: str | None = None) -> Tensor:
        """The fast path: tokens grouped by expert, each expert's matmuls over its own tokens only.

        ``how``: ``"blocks"`` (all experts in one batched matmul per projection over equal blocks of tokens,
        see `block_layout`: few operations, but every (token, expert) pair's input and output materialised at
        once) or ``"segments"`` (one expert at a time over its contiguous run of sorted pairs, summed into the
        output in place: small working set, ``E`` small matmuls). None: segments on one thread, blocks on more
        (measured in ``benchmarks/moefy_grouped.py``: with 2 threads every operation is a parallel region whose
        threads must meet, and blocks run a fixed handful of them instead of ~5 per expert; on one thread the
        smaller working set of segments wins)."""
        lead, d = x.shape[:-1], x.shape[-1]
        xf = x.reshape(-1, d)
        k = min(self.active, self.num_experts)
        top = self.router(xf).topk(k, dim=-1).indices.reshape(-1)  # [T * k]: expert of pair p = (token p // k, slot)
        how = how or ("segments" if torch.get_num_threads() == 1 else "blocks")
        if how not in ("blocks", "segments"):
            raise ParticlizeError(f"grouped(how=...) must be 'blocks' or 'segments', got {how!r}")
        out = self._blocks_path(xf, top, k) if how == "blocks" else self._segments_path(xf, top, k)
        down = self.linear("down")
        if down.bias is not None:
            out = out + down.bias
        return out.reshape(*lead, out.shape[-1])

    def _blocks_path(self, xf: Tensor, top: Tensor, k: int) -> Tensor:
        T, d, E = xf.shape[0], xf.shape[1], self.num_experts
        order = top.argsort(stable=True)  # pairs grouped by expert
        pos, which, rows = block_layout(top[order], torch.bincount(top, minlength=E))
        blocks = E if which is None else len(which)
        src = torch.zeros(blocks * rows, dtype=torch.long, device=xf.device)  # padding rows read token 0 (dropped)
        src[pos] = order // k
        xb = xf.index_select(0, src).view(blocks, rows, d)
        y = torch.bmm(self._expert_hidden(xb, which), self._blocks(self._down_experts(), which))  # [blocks, rows, d_out]
        back = torch.empty_like(pos)
        back[order] = pos  # the block row of each pair, in pair order
        return y.view(-1, y.shape[-1]).index_select(0, back).view(T, k, y.shape[-1]).sum(1)

    def _segments_path(self, xf: Tensor, top: Tensor, k: int) -> Tensor:
        E, m = self.num_experts, self.expert_size
        order = top.argsort(stable=True)
        tokens = order // k  # token of each pair, grouped by expert
        counts = torch.bincount(top, minlength=E).tolist()
        w_down = self._down_experts()  # [E, m, d_out]
        projs = [(lin.weight.view(E, m, -1), None if lin.bias is None else lin.bias.view(E, m))
                 for lin in (self.linear("gate"), self.linear("up")) if lin is not None]
        out = xf.new_zeros(xf.shape[0], w_down.shape[-1])
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            idx = tokens[start:start + c]
            start += c
            xe = xf.index_select(0, idx)
            hs = [xe @ w[e].t() if b is None else torch.addmm(b[e], xe, w[e].t()) for w, b in projs]
            h = self.act(hs[0]) * hs[1] if len(hs) == 2 else self.act(hs[0])
            out = out.index_add(0, idx, h @ w_down[e]) if torch.is_grad_enabled() else out.index_add_(0, idx, h @ w_down[e])
        return out

    def _down_experts(self) -> Tensor:
        """``[E, m, d_out]``: each expert's columns of the down projection, transposed. Inference keeps a
        contiguous copy (refreshed when the weight changes: its version counter or storage); a strided view
        would be copied by every ``bmm`` and gathered element by element. With autograd on, the view."""
        w = self.linear("down").weight
        view = w.view(w.shape[0], self.num_experts, self.expert_size).permute(1, 2, 0)
        if torch.is_grad_enabled() and w.requires_grad:
            return view
        key = (w.data_ptr(), w._version, w.dtype, w.device, self.num_experts)
        cache = getattr(self, "_down_cache", None)
        if cache is None or cache[0] != key:
            cache = self._down_cache = (key, view.detach().contiguous())
        return cache[1]

    def _blocks(self, w: Tensor, which: Tensor | None) -> Tensor:
        """Per-expert weights ``w`` ``[E, ...]`` for each block: the view itself when block ``e`` is expert ``e``."""
        return w if which is None else w.index_select(0, which)

    def _expert_hidden(self, xb: Tensor, which: Tensor | None) -> Tensor:
        """``[blocks, rows, m]``: hidden activations of each block's expert on the block's tokens ``xb``."""
        E, m = self.num_experts, self.expert_size

        def proj(lin: nn.Linear) -> Tensor:
            w = self._blocks(lin.weight.view(E, m, -1), which).transpose(1, 2)  # [blocks, d_in, m]
            if lin.bias is None:
                return torch.bmm(xb, w)
            return torch.baddbmm(self._blocks(lin.bias.view(E, 1, m), which), xb, w)

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


BLOCK_COST = 32  # rows of padding that copying one expert's weights for an extra block is worth (measured)
MIN_ROWS = 16  # no block smaller than this: tiny matmuls cost more than the padding they save


def block_layout(experts: Tensor, counts: Tensor) -> tuple[Tensor, Tensor | None, int]:
    """Where each (token, expert) pair goes in the grouped path's ``[blocks, rows, d]`` layout.

    ``experts``: the expert of each pair, sorted; ``counts``: pairs per expert ``[E]``. Either one block per
    expert of ``rows`` = the busiest expert's count (the weights are views: nothing copied, but a skewed router
    pads the quiet experts to the busy one), or each expert's pairs cut into blocks of fewer rows (the mean per
    expert, halved up to twice) whose weights are gathered per block; of these the layout with the fewest
    padded rows, counting `BLOCK_COST` rows per gathered block, wins. Returns ``(row of each pair,
    expert of each block or None when block e is expert e, rows)``."""
    E, pairs = len(counts), len(experts)
    busiest = int(counts.max()) if pairs else 0
    best, best_cost = 0, E * busiest  # 0: one block per expert
    mean = -(-pairs // max(E, 1))
    for rows in {max(MIN_ROWS, -(-mean // 2 ** i)) for i in range(3)}:
        if rows < busiest:
            blocks = int(((counts + rows - 1) // rows).sum())
            cost = blocks * (rows + BLOCK_COST)
            if cost < best_cost:
                best, best_cost = rows, cost
    start = counts.cumsum(0) - counts  # first pair of each expert
    rank = torch.arange(pairs, device=experts.device) - start[experts]  # the pair's place among its expert's
    if best == 0:
        return experts * busiest + rank, None, busiest
    per = (counts + best - 1) // best  # blocks of each expert
    first = per.cumsum(0) - per
    which = torch.repeat_interleave(torch.arange(E, device=counts.device), per)
    return (first[experts] + rank // best) * best + rank % best, which, best


def find_activation(container: nn.Module) -> nn.Module | None:
    """The activation module of a dense FFN: its one child without parameters that is neither a Linear
    nor a dropout (``act``, ``act_fn``, ``intermediate_act_fn``); None when there is not exactly one."""
    found = [m for m in container.children()
             if not isinstance(m, (nn.Linear, nn.Dropout)) and not any(True for _ in m.parameters())]
    return found[0] if len(found) == 1 else None

