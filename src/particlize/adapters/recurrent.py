"""Recurrent networks: the hidden units of each layer of a multi-layer ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``.

One group per layer ``l`` of each recurrent module at path ``P``: ``f"{P}.l{l}.units"`` (kind ``unit``,
``layer = l``, ``size = H_l``). Unit ``i`` *writes* row ``i`` of every gate block of ``weight_ih_l{l}``,
``weight_hh_l{l}`` and their biases (LSTM: 4 blocks ``i, f, g, o``; GRU: 3 blocks ``r, z, n``; RNN: 1) and
is *read* by column ``i`` of ``weight_hh_l{l}`` (the recurrence), of ``weight_ih_l{l+1}`` (the next layer)
and, for the last layer, of the Linear(s) on top.

Gates. The hidden state lives inside the fused recurrent kernel and cannot be hooked per time step, so
every group is gated through its readers' weights (`WeightMaskGate`): shared gates of shape ``[n]`` and
``mode="zero"`` only; per-example gates, ``mode="mean"`` / ``"resample"`` and activation recording raise
`GateError`. Zero-masking the columns that read unit ``i`` is exactly removing it: no other unit, no other
layer and no head then depends on it (for a GRU, ``h_t = (1 - z) * n + z * h_{t-1}`` is per unit, so the
unit's own state only flows out through those columns).

The Linear on top. The last layer's units are only offered when a Linear reading them is confirmed by a
``torch.fx`` trace of the model (recurrent modules kept as leaves): the Linear's input must come from the
recurrent output ``out`` or from the last layer's final state (``h_n[-1]``, ``c_n[-1]``) only through
``getitem`` / indexing that leaves the feature dimension whole, ``select`` / ``squeeze`` / ``contiguous``
on other dimensions, ``nn.Dropout`` or ``nn.Identity``; the Linear needs ``in_features == H`` and must
not be called on anything else. When the trace fails or anything else consumes those features (a
mean-pool, another recurrent module, the model's return value), the last layer is left out (with a
warning): pruning it would change a width the adapter cannot follow. The trace assumes batched inputs
(``out`` is 3-D). States of lower layers (``h_n[k]``, ``k < L-1``) read by the model, or an initial state
passed to the recurrent module, leave the affected layers out; when the model cannot be traced at all the
lower layers are assumed not to be read from outside (the usual ``out, _ = rnn(x)`` / ``h_n[-1]`` code).

Uneven widths. ``nn.LSTM`` has a single ``hidden_size``; when the layers of a pruned module end with
different widths, `StackedRNN` (one single-layer module per layer) replaces it. Its parameter names are
``layers.{l}.weight_ih_l0`` etc., so a saved plan replays deterministically, and it is decomposed again for
a further round of pruning (group names stay ``f"{P}.l{l}.units"``). Layers that keep equal widths keep
the original ``nn.LSTM`` / ``nn.GRU`` with updated sizes.

FLOPs are ``2`` per weight element of ``weight_ih`` / ``weight_hh`` and of the confirmed Linear(s) on top,
*per time step*; a head on ``out[:, -1]`` or ``h_n[-1]`` really runs once per sequence, so its share is an
upper bound (and an unconfirmed head is not counted). Bidirectional modules and ``proj_size > 0`` are
rejected with `UnsupportedModelError`, and so is a bare recurrent module passed as the whole model (wrap
it: its output width is the model's output).
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch.fx
from torch import nn

from ..errors import UnsupportedModelError
from ..particles import ParticleGroup, Slice, WeightMaskGate
from . import AdapterResult, register
from .stacked_rnn import GATES, StackedRNN, check_rnn, rnn_modules, sync_rnns

FLOPS_UNIT = "per time step"


# --------------------------------------------------------------------------------------------------
# What the adapter sees in a recurrent module


@dataclass
class _Rnn:
    """A recurrent module as the adapter sees it: per-layer parameter names and widths."""

    path: str
    mode: str
    sizes: list[int]
    bias: bool
    stacked: bool

    @classmethod
    def of(cls, path: str, mod: nn.Module) -> "_Rnn":
        if isinstance(mod, StackedRNN):
            return cls(path, mod.mode, [layer.weight_hh_l0.shape[1] for layer in mod.layers], mod.bias, True)
        check_rnn(mod, path)
        sizes = [getattr(mod, f"weight_hh_l{l}").shape[1] for l in range(mod.num_layers)]
        return cls(path, mod.mode, sizes, mod.bias, False)

    @property
    def gates(self) -> int:
        return GATES[self.mode]

    def param(self, kind: str, l: int) -> str:
        """Dotted name of ``weight_ih`` / ``weight_hh`` / ``bias_ih`` / ``bias_hh`` of layer ``l``."""
        return f"{self.path}.layers.{l}.{kind}_l0" if self.stacked else f"{self.path}.{kind}_l{l}"

    def weights(self) -> list[str]:
        return [self.param(k, l) for l in range(len(self.sizes)) for k in ("weight_ih", "weight_hh")]


# --------------------------------------------------------------------------------------------------
# Who reads a recurrent module's outputs (torch.fx, recurrent modules as leaves)


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.RNNBase, StackedRNN)) or super().is_leaf_module(m, qualname)


@dataclass
class _Uses:
    """For one recurrent module: the Linear(s) reading its last layer, and layers read elsewhere."""

    readers: set[str] = field(default_factory=set)
    reader_nodes: set[torch.fx.Node] = field(default_factory=set)
    unsafe: dict[int, str] = field(default_factory=dict)  # layer -> why it cannot be pruned
    called: bool = False


def _int_index(user: torch.fx.Node, node: torch.fx.Node) -> int | None:
    if user.op == "call_function" and user.target is operator.getitem and user.args[0] is node:
        k = user.args[1]
        if isinstance(k, int) and not isinstance(k, bool):
            return k
    return None


def _index_ndim(idx: Any, ndim: int) -> int | None:
    """The ndim after ``x[idx]`` for an ``ndim``-dim ``x`` whose last dim is kept whole, else None."""
    items = idx if isinstance(idx, tuple) else (idx,)
    for it in items:
        plain_int = isinstance(it, int) and not isinstance(it, bool)
        if not (it is None or it is Ellipsis or isinstance(it, slice) or plain_int):
            return None  # tensor / dynamic indices: not followed
    full = slice(None)
    if any(it is Ellipsis for it in items):
        after = [it for it in items[[it is Ellipsis for it in items].index(True) + 1:] if it is not None]
        if after and not (isinstance(after[-1], slice) and after[-1] == full):
            return None
    else:
        used = [it for it in items if it is not None]
        if len(used) >= ndim and not (isinstance(used[-1], slice) and used[-1] == full):
            return None
    return ndim - sum(isinstance(it, int) for it in items) + sum(it is None for it in items)


def _feature_ndim(user: torch.fx.Node, node: torch.fx.Node, ndim: int, modules: dict[str, nn.Module]) -> int | None:
    """The ndim of ``user``'s result if it passes the features of ``node`` on whole (last dim), else None."""
    if user.op == "call_function" and user.target is operator.getitem and user.args[0] is node:
        return _index_ndim(user.args[1], ndim)
    if user.op == "call_method" and user.args and user.args[0] is node:
        args = [*user.args[1:], *user.kwargs.values()]
        if user.target == "contiguous":
            return ndim
        if user.target in ("select", "squeeze") and len(args) >= 1 and isinstance(args[0], int):
            return ndim - 1 if args[0] % ndim != ndim - 1 else None
        return None
    if user.op == "call_module" and isinstance(modules.get(user.target), (nn.Dropout, nn.Identity)):
        return ndim
    return None


def _analyse(call: torch.fx.Node, rnn: _Rnn, modules: dict[str, nn.Module], uses: _Uses) -> None:
    """Follow the outputs of one call of the recurrent module through the graph."""
    num, top = len(rnn.sizes), len(rnn.sizes) - 1
    uses.called = True

    def fail(layers: Any, why: str) -> None:
        for l in layers:
            uses.unsafe.setdefault(l, why)

    if any(a is not None for a in (*call.args[1:], *call.kwargs.values())):
        fail(range(num), "the module is called with an initial state, whose width pruning would change")
    lstm = rnn.mode == "LSTM"
    work: list[tuple[torch.fx.Node, str, int]] = [(call, "result", 0)]
    while work:
        node, kind, ndim = work.pop()
        for user in node.users:
            k = _int_index(user, node)
            if kind == "result":  # (output, state)
                if k == 0:
                    work.append((user, "feat", 3))
                elif k in (1, -1):
                    work.append((user, "state" if lstm else "layers", 0))
                else:
                    fail(range(num), f"its whole result is used by `{user.format_node()}`")
            elif kind == "state":  # LSTM (h_n, c_n)
                if k in (0, 1, -1, -2):
                    work.append((user, "layers", 0))
                else:
                    fail(range(num), f"its final state is used by `{user.format_node()}`")
            elif kind == "layers":  # h_n: stacked [L, B, H] or a per-layer tuple
                if k is None:
                    fail(range(num), f"the stacked final state of all layers is used by `{user.format_node()}`")
                elif k % num == top:
                    work.append((user, "feat", 2))
                elif user.users:
                    fail([k % num], f"the final state of layer {k % num} is read by the model")
            else:  # "feat": a tensor whose last dimension is the last layer's units
                mod = modules.get(user.target) if user.op == "call_module" else None
                if isinstance(mod, nn.Linear) and user.args[0] is node and mod.in_features == rnn.sizes[top]:
                    uses.readers.add(str(user.target))
                    uses.reader_nodes.add(user)
                    continue
                nd = _feature_ndim(user, node, ndim, modules)
                if nd is None:
                    fail([top], f"its last layer's features reach `{user.format_node()}`, "
                                "not a Linear reading them whole")
                else:
                    work.append((user, "feat", nd))


def _trace_uses(model: nn.Module, rnns: list[_Rnn]) -> tuple[dict[str, _Uses] | None, str]:
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure means "not confirmable"
        return None, f"the model could not be traced with torch.fx ({type(e).__name__}: {str(e)[:200]})"
    modules = dict(model.named_modules())
    out = {r.path: _Uses() for r in rnns}
    by_path = {r.path: r for r in rnns}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in by_path:
            _analyse(node, by_path[node.target], modules, out[node.target])
    for r in rnns:
        uses = out[r.path]
        for lin in uses.readers:  # a reader Linear must not also be applied to something else
            calls = [n for n in graph.nodes if n.op == "call_module" and n.target == lin]
            if any(n not in uses.reader_nodes for n in calls):
                uses.unsafe.setdefault(len(r.sizes) - 1, f"the Linear {lin!r} is also applied to other inputs")
    return out, ""


# --------------------------------------------------------------------------------------------------
# The adapter


class RecurrentAdapter:
    """Hidden units of each layer of ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (and `StackedRNN`) modules."""

    name = "recurrent"

    def matches(self, model: nn.Module) -> bool:
        return bool(rnn_modules(model))

    def build(self, model: nn.Module, *, seq_len: int, example_inputs: Any = None) -> AdapterResult:
        found = rnn_modules(model)
        for path, _ in found:
            if not path:
                raise UnsupportedModelError(
                    f"{type(model).__name__} is a bare recurrent module: its output width is the model's "
                    "output, so its units cannot be removed in place; wrap it in a module with a Linear head"
                )
        rnns = [_Rnn.of(path, mod) for path, mod in found]
        uses, why = _trace_uses(model, rnns)
        groups: list[ParticleGroup] = []
        flops: dict[str, float] = {}
        unplaced: list[str] = []
        for r in rnns:
            num = len(r.sizes)
            for name in r.weights():
                flops[name] = 2.0
            u = uses.get(r.path) if uses is not None else None
            if uses is not None and not u.called:
                unplaced.append(f"{r.path} (never called in the traced forward)")
                continue
            unsafe = dict(u.unsafe) if u is not None else {num - 1: why}
            readers = sorted(u.readers) if u is not None else []
            if not readers:
                unsafe.setdefault(num - 1, "no Linear reading the last layer's features was found")
            for lin in readers:
                flops[f"{lin}.weight"] = 2.0
            for l, h in enumerate(r.sizes):
                name = f"{r.path}.l{l}.units"
                if l in unsafe:
                    unplaced.append(f"{name} ({unsafe[l]})")
                    continue
                groups.append(self._group(r, l, h, readers))
        for msg in unplaced:
            warnings.warn(f"recurrent adapter: left out {msg}", stacklevel=3)
        return AdapterResult(groups, flops, FLOPS_UNIT, recipe=None, after_prune=sync_rnns, unplaced=unplaced)

    @staticmethod
    def _group(r: _Rnn, l: int, h: int, top_readers: list[str]) -> ParticleGroup:
        g = r.gates
        kinds = ("weight_ih", "weight_hh", "bias_ih", "bias_hh") if r.bias else ("weight_ih", "weight_hh")
        writers = tuple(Slice(r.param(k, l), 0, 1, g, h) for k in kinds)
        if l + 1 < len(r.sizes):
            nxt: tuple[Slice, ...] = (Slice(r.param("weight_ih", l + 1), 1),)
        else:
            nxt = tuple(Slice(f"{lin}.weight", 1) for lin in top_readers)
        readers = (Slice(r.param("weight_hh", l), 1), *nxt)
        return ParticleGroup(
            f"{r.path}.l{l}.units", "unit", h, l, WeightMaskGate(readers), writers, readers, scope=f"{r.path}.",
        )


register(RecurrentAdapter(), priority=20)  # any recurrent module: above conv, which a CRNN also matches

__all__ = ["RecurrentAdapter", "StackedRNN"]
