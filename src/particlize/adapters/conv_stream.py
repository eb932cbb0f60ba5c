"""Residual streams of a CNN as particle groups: the channels coupled across residual adds, pruned together.

A *stream* is the set of activations that share one channel axis because they are summed: in a ResNet
stage, the stem (or the downsampling shortcut), every block's last conv and the adds between them all
write channel ``i`` of the same residual stream. Removing channel ``i`` of one writer alone would break
the adds, so the conv adapter used to leave these convs alone (``AdapterResult.unplaced``). As one
group they can be removed together:

* *writers* — every ``groups=1`` Conv2d whose output enters the stream (its out-channels and bias) and
  every per-channel module on the way (BatchNorm2d, depthwise Conv2d, per-channel PReLU);
* *readers* — every ``groups=1`` Conv2d that reads the stream (in-channels) and a Linear reading it
  after pooling / flattening (its input features, ``width = H*W`` per channel when flattened);
* *gate* — `StreamGate`: the same gate values on the first input of every reader.

Why masked ≡ pruned holds: a stream channel never mixes with another channel between its writers and
its readers (only per-channel operations and adds of two stream tensors lie in between), so once no
reader sees it (zero gate at every reader) the model's output does not depend on it: exactly what
deleting it from every writer and reader computes. A stream that reaches anything else (a ``cat``, a
product of two tensors, the model's output, a module called twice with weights) is not a group.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn

from ..gates import GateSite, InputGate, Slice
from ._conv_trace import _ADD_METHODS, _ADDS, _ELEMENTWISE_MODULES, _POOL_MODULES, Walker, _fn_kind, _is_depthwise
from ._conv_trace import _reduce_dims, shape_of, tensor_slices


@dataclass(frozen=True)
class StreamGate(GateSite):
    """One gate shared by several readers: the first positional input of each of ``modules`` along ``dim``.

    Per-example gates and patches work as for `InputGate`; patch and capture point ``i`` is ``modules[i]``.
    """

    modules: tuple[str, ...]
    dim: int = 1

    def gate_dim(self) -> int:
        return self.dim

    def install(self, model, n, gate, patch, fired):
        handles = []
        for i, m in enumerate(self.modules):
            handles += InputGate(m, self.dim).install(model, n, gate, patch[i:i + 1] if patch else None, fired)
        return handles

    def capture(self, model, n, sink):
        handles = []
        for i, m in enumerate(self.modules):
            handles += InputGate(m, self.dim).capture(model, n, lambda _p, a, i=i: sink(i, a))
        return handles


@dataclass
class Stream:
    """What `find_stream` collected: the entry conv, writer convs, writer/reader slices, reader modules."""

    entry: str
    channels: int
    convs: list[str] = field(default_factory=list)
    writers: list[Slice] = field(default_factory=list)
    readers: list[Slice] = field(default_factory=list)
    reader_modules: list[str] = field(default_factory=list)
    depthwise: list[str] = field(default_factory=list)


class _Coupled(Exception):
    """The stream reaches something that mixes its channels: no group."""


def _is_add(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in _ADDS) or
            (node.op == "call_method" and node.target in _ADD_METHODS))


class StreamFinder:
    """Finds the residual stream a conv writes into by closing over adds (`find`)."""

    def __init__(self, gm: fx.GraphModule, modules: Mapping[str, nn.Module], calls: Mapping[str, int]):
        self.modules, self.calls = modules, calls
        self.walker = Walker(gm, modules, calls)
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}

    def find(self, start: fx.Node) -> Stream | None:
        """The stream that conv node ``start`` writes into, or None where its channels mix with others."""
        c = self.modules[start.target].out_channels
        self.c, self.seen, self.read = c, set(), set()
        self.writer_nodes: list[fx.Node] = []
        self.slices: list[Slice] = []
        self.reader_slices: list[tuple[fx.Node, Slice]] = []
        self.depthwise: list[str] = []
        todo = [start]
        try:
            while todo:
                node = todo.pop()
                if node in self.seen:
                    continue
                self.seen.add(node)
                todo += self._inputs(node)
                todo += self._users(node)
        except _Coupled:
            return None
        if not self.reader_slices or not any(_is_add(n) for n in self.seen) or c < 2:
            return None
        convs = sorted(self.writer_nodes, key=self.order.__getitem__)
        readers = sorted(self.reader_slices, key=lambda r: self.order[r[0]])
        writer_slices = [s for n in convs for s in tensor_slices(n.target, self.modules[n.target], ("weight", "bias"))]
        return Stream(convs[0].target, c, [n.target for n in convs], writer_slices + self.slices,
                      [s for _, s in readers], [n.target for n, _ in readers], self.depthwise)

    # ---- one node of the stream: where its channels come from, where they go ----------------------
    def _inputs(self, node: fx.Node) -> list[fx.Node]:
        """Classify ``node`` (its output carries the stream) and return the data inputs that carry it too."""
        shape = shape_of(node)
        if shape is None or len(shape) != 4 or shape[1] != self.c:
            if not (shape is not None and len(shape) == 2 and shape[1] % self.c == 0 and self._flat_ok(node)):
                raise _Coupled
        if node.op == "call_module":
            m = self.modules[node.target]
            if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
                raise _Coupled
            stateless = isinstance(m, _ELEMENTWISE_MODULES + _POOL_MODULES + (nn.Flatten,))
            if not stateless and self.calls.get(node.target, 0) != 1:
                raise _Coupled
            if isinstance(m, nn.Conv2d) and m.groups == 1:
                if m.out_channels != self.c:
                    raise _Coupled
                self.writer_nodes.append(node)
                return []
            if _is_depthwise(m, self.c):
                self.slices += tensor_slices(node.target, m, ("weight", "bias"))
                self.depthwise.append(node.target)
            elif isinstance(m, nn.BatchNorm2d) and m.num_features == self.c:
                self.slices += tensor_slices(node.target, m, ("weight", "bias", "running_mean", "running_var"))
            elif isinstance(m, nn.PReLU) and m.num_parameters in (1, self.c):
                if m.num_parameters == self.c:
                    self.slices += tensor_slices(node.target, m, ("weight",))
            elif not stateless:
                raise _Coupled
            return [node.args[0]]
        if _is_add(node):
            ins = [a for a in node.args[:2] if isinstance(a, fx.Node)]
            if len(node.args) != 2 or node.kwargs or len(ins) != 2 or shape_of(ins[0]) != shape_of(ins[1]):
                raise _Coupled
            return ins
        kind = _fn_kind(node)
        if kind is None or not node.args or not isinstance(node.args[0], fx.Node):
            raise _Coupled
        src = node.args[0]
        if not self.walker.only_input(node, src, scalar=kind == "scalar"):
            raise _Coupled
        if kind == "scalar":
            others = [a for a in (*node.args, *node.kwargs.values()) if a is not src]
            if not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in others):
                raise _Coupled
        if kind == "reduce":
            dims = _reduce_dims(node, 4)
            if not dims or min(dims) < 2:
                raise _Coupled
        return [src]

    def _flat_ok(self, node: fx.Node) -> bool:
        """A 2-D node of the stream: a flatten or spatial reduction of a ``[B, c, H, W]`` map (or after one)."""
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        a, b = (shape_of(src) if src is not None else None), shape_of(node)
        if a is None or b is None:
            return False
        if len(a) == 4:
            return a[1] == self.c and b[1] in (self.c, math.prod(a[1:]))
        return a == b  # an elementwise op after flattening

    def _users(self, node: fx.Node) -> list[fx.Node]:
        """Record the readers among ``node``'s users; return the users that carry the stream on."""
        on = []
        shape = shape_of(node)
        flat = None if shape is None or len(shape) == 4 else shape[1] // self.c
        for u in self.walker.data_users(node):
            if u.op == "output":
                raise _Coupled
            if u.op == "call_module":
                m = self.modules[u.target]
                reads = isinstance(m, (nn.Conv2d, nn.Linear)) and not (isinstance(m, nn.Conv2d) and m.groups != 1)
                if reads:
                    if u.args != (node,) or u.kwargs or self.calls.get(u.target, 0) != 1 or (u, node) in self.read:
                        raise _Coupled
                    if isinstance(m, nn.Conv2d) and flat is None and m.in_channels == self.c:
                        self.reader_slices.append((u, Slice(f"{u.target}.weight", 1)))
                    elif isinstance(m, nn.Linear) and flat is not None and m.in_features == self.c * flat:
                        self.reader_slices.append((u, Slice(f"{u.target}.weight", 1, flat)))
                    else:
                        raise _Coupled
                    self.read.add((u, node))
                    continue
            on.append(u)
        return on
