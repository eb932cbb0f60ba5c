"""Reading a traced convolutional network: the torch.fx side of the conv adapter (`particlize.adapters.conv`).

`Walker` follows the channels a Conv2d produces through per-channel operations to their one consumer;
`is_identity_residual` recognises a block that adds its own input to a branch; `propagate` runs
ShapeProp on example inputs without touching the model's train/eval flags; `conv_flops` counts FLOPs
per weight element from the propagated shapes. What counts as a per-channel operation is listed below.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import UnsupportedModelError
from ..particles import Slice

# ---- what may lie between a producer conv and its consumer (per-channel operations) ------------

_ELEMENTWISE_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.LogSigmoid, nn.Threshold, nn.Hardshrink, nn.Softshrink, nn.Identity,
    nn.Dropout, nn.Dropout2d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)
_POOL_MODULES: tuple[type, ...] = (
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d,
)
_ELEMENTWISE_NAMES = (
    "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "celu", "gelu", "silu",
    "mish", "sigmoid", "sigmoid_", "tanh", "tanh_", "hardtanh", "hardtanh_", "hardswish", "hardsigmoid",
    "softplus", "softsign", "logsigmoid", "clamp", "clamp_", "clip", "clip_", "dropout", "dropout2d",
    "alpha_dropout", "feature_alpha_dropout", "contiguous",
)
_POOL_NAMES = ("max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d", "lp_pool2d")
_REDUCE_NAMES = ("mean", "sum", "amax", "amin")
_FLATTEN_NAMES = ("flatten", "view", "reshape")
_SCALAR_OPS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
    operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
}
_SCALAR_METHODS = {"add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_", "__add__", "__mul__"}
_ADDS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_", "__add__", "__iadd__"}


def _functions(names: Sequence[str]) -> set[Any]:
    out: set[Any] = set()
    for name in names:
        for ns in (F, torch, torch.Tensor):
            fn = getattr(ns, name, None)
            if fn is not None:
                out.add(fn)
    return out


_ELEMENTWISE_FNS = _functions(_ELEMENTWISE_NAMES)
_POOL_FNS = _functions(_POOL_NAMES)
_REDUCE_FNS = _functions(_REDUCE_NAMES)
_FLATTEN_FNS = _functions(_FLATTEN_NAMES)


def _fn_kind(node: fx.Node) -> str | None:
    """'elementwise' | 'pool' | 'reduce' | 'flatten' | 'scalar' for a call_function/call_method node."""
    t = node.target
    if node.op == "call_method":
        if t in _ELEMENTWISE_NAMES:
            return "elementwise"
        if t in _REDUCE_NAMES:
            return "reduce"
        if t in _FLATTEN_NAMES:
            return "flatten"
        if t in _SCALAR_METHODS:
            return "scalar"
        return None
    if node.op != "call_function":
        return None
    try:
        if t in _ELEMENTWISE_FNS:
            return "elementwise"
        if t in _POOL_FNS or getattr(t, "__name__", "") in ("_max_pool2d", "_adaptive_max_pool2d"):
            return "pool"
        if t in _REDUCE_FNS:
            return "reduce"
        if t in _FLATTEN_FNS:
            return "flatten"
        if t in _SCALAR_OPS:
            return "scalar"
    except TypeError:  # unhashable target
        return None
    return None


def _is_meta(node: fx.Node, memo: dict[fx.Node, bool]) -> bool:
    """Whether ``node`` only computes shape information (``x.size(0)``, ``x.shape[1]`` and arithmetic)."""
    if node in memo:
        return memo[node]
    res = False
    if node.op == "call_method" and node.target in ("size", "dim"):
        res = True
    elif node.op == "call_function" and node.target is getattr and len(node.args) > 1 and node.args[1] in ("shape", "ndim"):
        res = True
    elif node.op == "call_function" and node.all_input_nodes and node.target in (
        operator.getitem, operator.mul, operator.floordiv, operator.add, operator.sub, operator.neg
    ):
        res = all(_is_meta(n, memo) for n in node.all_input_nodes)
    memo[node] = res
    return res


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    """The output shape ShapeProp recorded for ``node`` (None where it recorded none)."""
    tm = node.meta.get("tensor_meta")
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def _is_depthwise(m: nn.Module, c: int) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels == c and c > 1


def tensor_slices(path: str, mod: nn.Module, names: Sequence[str]) -> list[Slice]:
    """Dim-0 slices (one entry per channel) of those tensors ``names`` of ``mod`` that exist."""
    prefix = f"{path}." if path else ""
    return [Slice(f"{prefix}{n}", 0) for n in names if getattr(mod, n, None) is not None]


def _reduce_dims(node: fx.Node, ndim: int) -> list[int] | None:
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dim is None:
        return None
    dims = [dim] if isinstance(dim, int) else list(dim) if isinstance(dim, (tuple, list)) else None
    if dims is None or not all(isinstance(d, int) for d in dims):
        return None
    return sorted(d % ndim for d in dims)


# ---- channel groups -------------------------------------------------------------------------------


@dataclass
class Chain:
    """Where a conv's channels go: what else they write on the way, and the one consumer that reads them."""

    writers: list[Slice] = field(default_factory=list)
    depthwise: list[str] = field(default_factory=list)
    consumer: str = ""
    reader: Slice | None = None


class Walker:
    """Follows a conv's output channels through the traced graph (`walk`); ``calls`` counts module calls."""

    def __init__(self, gm: fx.GraphModule, modules: Mapping[str, nn.Module], calls: Mapping[str, int]):
        self.modules, self.calls = modules, calls
        self.meta: dict[fx.Node, bool] = {}

    def data_users(self, node: fx.Node) -> list[fx.Node]:
        """``node``'s users that read its data (not only its shape, as ``x.size(0)`` does)."""
        return [u for u in node.users if not _is_meta(u, self.meta)]

    def only_input(self, u: fx.Node, cur: fx.Node, scalar: bool = False) -> bool:
        """``cur`` is ``u``'s one data input (its first argument unless ``scalar``); every other input
        node only carries shape information."""
        count = sum(a is cur for a in u.args) + sum(v is cur for v in u.kwargs.values())
        first = u.args[0] if u.args else u.kwargs.get("input", u.kwargs.get("self"))
        if count != 1 or (not scalar and first is not cur):
            return False
        return all(_is_meta(n, self.meta) for n in u.all_input_nodes if n is not cur)

    def walk(self, start: fx.Node, c: int) -> Chain | None:
        """Follow the ``c`` channels produced at ``start`` to their one consumer, or None if coupled."""
        chain = Chain()
        cur = start
        flat: int | None = None  # width of one channel after flattening, None while [B, C, H, W]
        for _ in range(10_000):
            users = self.data_users(cur)
            if len(users) != 1:
                return None
            u = users[0]
            shape = shape_of(u)
            if u.op == "call_module":
                m = self.modules[u.target]
                if u.args != (cur,) or u.kwargs:
                    return None
                # a module with weights on the way must be called once; a stateless one (a ReLU used
                # twice in a block) may be shared
                stateless = isinstance(m, _ELEMENTWISE_MODULES + _POOL_MODULES + (nn.Flatten,))
                if not stateless and self.calls.get(u.target, 0) != 1:
                    return None
                if flat is None:
                    if isinstance(m, nn.Conv2d) and m.groups == 1 and m.in_channels == c:
                        chain.consumer, chain.reader = u.target, Slice(f"{u.target}.weight", 1)
                        return chain
                    if _is_depthwise(m, c):
                        chain.writers += tensor_slices(u.target, m, ("weight", "bias"))
                        chain.depthwise.append(u.target)
                    elif isinstance(m, nn.BatchNorm2d) and m.num_features == c:
                        chain.writers += tensor_slices(u.target, m, ("weight", "bias", "running_mean", "running_var"))
                    elif isinstance(m, nn.PReLU) and m.num_parameters in (1, c):
                        if m.num_parameters == c and c > 1:
                            chain.writers += tensor_slices(u.target, m, ("weight",))
                    elif isinstance(m, nn.Flatten):
                        if not self._flattens(cur, u, c):
                            return None
                        flat = math.prod(shape_of(cur)[2:])  # type: ignore[index]
                    elif not isinstance(m, _ELEMENTWISE_MODULES + _POOL_MODULES):
                        return None
                    if flat is None and (shape is None or len(shape) != 4 or shape[1] != c):
                        return None
                else:
                    if isinstance(m, nn.Linear) and m.in_features == c * flat:
                        chain.consumer, chain.reader = u.target, Slice(f"{u.target}.weight", 1, flat)
                        return chain
                    if not isinstance(m, _ELEMENTWISE_MODULES) or isinstance(m, nn.PReLU):
                        return None
                    if shape is None or len(shape) != 2 or shape[1] != c * flat:
                        return None
                cur = u
                continue
            kind = _fn_kind(u)
            if kind is None or not self.only_input(u, cur, scalar=kind == "scalar"):
                return None
            if kind == "scalar":
                others = [a for a in (*u.args, *u.kwargs.values()) if a is not cur]
                if not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in others):
                    return None
            elif kind == "flatten":
                if flat is not None or not self._flattens(cur, u, c):
                    return None
                flat = math.prod(shape_of(cur)[2:])  # type: ignore[index]
                cur = u
                continue
            elif kind == "reduce":
                dims = _reduce_dims(u, 4)
                if flat is not None or dims is None or not dims or min(dims) < 2:
                    return None
                if shape is not None and len(shape) == 2:
                    if shape[1] != c:
                        return None
                    flat = 1
                    cur = u
                    continue
            elif kind == "pool" and flat is not None:
                return None
            if flat is None:
                if shape is None or len(shape) != 4 or shape[1] != c:
                    return None
            elif shape is None or len(shape) != 2 or shape[1] != c * flat:
                return None
            cur = u
        return None

    @staticmethod
    def _flattens(src: fx.Node, dst: fx.Node, c: int) -> bool:
        a, b = shape_of(src), shape_of(dst)
        return a is not None and b is not None and len(a) == 4 and a[1] == c and b == (a[0], math.prod(a[1:]))


# ---- blocks ---------------------------------------------------------------------------------------


def module_nodes(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """Module path -> the graph nodes traced inside it (from ``nn_module_stack``)."""
    out: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        for key, val in stack.items():
            path = val[0] if isinstance(val, tuple) and val and isinstance(val[0], str) else key
            out.setdefault(path, []).append(node)
    return out


def _innermost(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    key, val = list(stack.items())[-1]
    return val[0] if isinstance(val, tuple) and val and isinstance(val[0], str) else key


def is_identity_residual(path: str, nodes: list[fx.Node]) -> bool:
    """The nodes of block ``path``: one input ``x``, one output of ``x``'s shape, and ``x + branch``
    computed by the block's own forward (not by a nested block: a stage of residual blocks is no block)."""
    inside = set(nodes)
    inputs = {n for node in nodes for n in node.all_input_nodes if n not in inside and n.op != "get_attr"}
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    if len(inputs) != 1 or len(outputs) != 1:
        return False
    (x,), out = tuple(inputs), outputs[0]
    if shape_of(x) is None or shape_of(x) != shape_of(out):
        return False
    adds = [
        n for n in nodes
        if ((n.op == "call_function" and n.target in _ADDS) or (n.op == "call_method" and n.target in _ADD_METHODS))
        and x in n.args[:2] and sum(a is x for a in n.args[:2]) == 1 and _innermost(n) == path
    ]
    for add in adds:  # the sum must reach the block's output
        todo, seen = [add], set()
        while todo:
            n = todo.pop()
            if n is out:
                return True
            if n in seen:
                continue
            seen.add(n)
            todo += [u for u in n.users if u in inside]
    return False


# ---- running the traced graph ---------------------------------------------------------------------


def positional(gm: fx.GraphModule, inputs: Any) -> list[Any]:
    """``example_inputs`` as the traced graph's positional arguments (``run_batch`` conventions)."""
    if isinstance(inputs, (tuple, list)) and len(inputs) == 2 and not isinstance(inputs[0], (int, float)):
        inputs = inputs[0]
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    if isinstance(inputs, Mapping):
        args = []
        for node in gm.graph.nodes:
            if node.op != "placeholder":
                continue
            name = str(node.target).lstrip("*")
            if name in inputs:
                args.append(inputs[name])
            elif node.args:
                args.append(node.args[0])
            else:
                raise UnsupportedModelError(f"example_inputs has no {name!r} for the model's forward")
        return args
    if isinstance(inputs, (tuple, list)):
        return list(inputs)
    raise UnsupportedModelError(
        f"example_inputs must be a tensor, a dict of tensors or a tuple of tensors, not {type(inputs).__name__}"
    )


def propagate(model: nn.Module, gm: fx.GraphModule, args: list[Any]) -> None:
    """ShapeProp in eval mode without gradients, leaving the model's train/eval flags as they were."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        gm.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(*args)
    finally:
        for m, t in flags:
            m.training = t
        gm.training = model.training


def conv_flops(gm: fx.GraphModule, modules: Mapping[str, nn.Module]) -> dict[str, float]:
    """FLOPs per sample of each conv / Linear weight element, at the shapes ShapeProp recorded."""
    flops: dict[str, float] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = modules[node.target]
        out, inp = shape_of(node), shape_of(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if isinstance(m, nn.modules.conv._ConvNd) and out is not None:
            # 2 FLOPs per weight element per output position (per input position when transposed)
            spatial = inp if getattr(m, "transposed", False) else out
            key = f"{node.target}.weight"
            if spatial is not None:
                flops[key] = flops.get(key, 0.0) + 2.0 * math.prod(spatial[2:])
        elif isinstance(m, nn.Linear) and inp is not None:
            key = f"{node.target}.weight"
            flops[key] = flops.get(key, 0.0) + 2.0 * math.prod(inp[1:-1])
    return flops
