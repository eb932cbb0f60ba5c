"""Convolutional networks: output channels of Conv2d layers and identity-residual blocks.

The model is traced with ``torch.fx.symbolic_trace`` (torch.nn modules are leaves) and shapes are
propagated with ``torch.fx.passes.shape_prop.ShapeProp`` on ``example_inputs`` (a tensor, a tuple of
positional tensors, a dict by argument name, or an ``(inputs, targets)`` pair as in
`particlize.particles.run_batch`; run in eval mode without gradients, the model's train/eval flags and
BN statistics are left as they were). When no example inputs are given, a default batch
``[1, C, 32, 32]`` is used (``C`` = ``in_channels`` of the first Conv2d); if the model cannot run at
32×32 (a Linear reading a fixed flattened ``C×H×W`` map), a few other common sizes are tried
(``DEFAULT_SIZES``). FLOPs are per sample at the example's spatial size, as ``flops_unit`` says
(``tensor_flops``: 2·H_out·W_out per Conv weight element, 2·positions per Linear weight element);
pass ``example_inputs`` to count them at your resolution. Note that `ParticleMap.prune` and
`particlize.load` re-decompose without example inputs, so a model must also run at one default size.

Groups
------
*channel* — the output channels of a Conv2d ``P`` with ``groups=1`` whose output reaches exactly one
consumer, a Conv2d with ``groups=1`` or a Linear (after pooling and flattening), passing only through
per-channel operations: BatchNorm2d, elementwise activations (modules or functions), dropout, pooling,
spatial means, flattening, and depthwise Conv2d (``groups == in == out``) + BN + activation chains.
Writers are ``P``'s out-channels (+ bias) and every BN / depthwise conv / PReLU on the way; the reader
is the consumer's input dimension (``width = H*W`` for a Linear reading a flattened ``C×H×W`` map). The
gate is `InputGate(consumer, dim=1)`: zeroing a consumer's input channel is exactly removing it, so
elementwise functions with ``f(0) != 0`` on the way do not matter.
Channels that reach anything else — a residual ``add``, ``cat``, ``mul`` of two tensors, a second
consumer, the output — are coupled with other channels (across a residual stream, a concatenation) and
are left alone: they are never broken, and no group is made for them (their producers are listed in
``AdapterResult.unplaced``).

*block* — children of an ``nn.Sequential`` / ``nn.ModuleList`` whose traced sub-graph adds the block's
own input to a branch output (an identity shortcut) and whose output has the input's shape (a ResNet
BasicBlock without downsample, a MobileNetV2 InvertedResidual with ``use_res_connect``). One group per
container, holding the qualifying children in order; `ResidualGate` makes a gated-off block the
identity, which is what removing it from its container does.
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
from ..particles import InputGate, ParticleGroup, ResidualGate, Slice
from . import AdapterResult, claimed_by, register

DEFAULT_SIZES = (32, 28, 64, 224, 16)

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


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    tm = node.meta.get("tensor_meta")
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def _is_depthwise(m: nn.Module, c: int) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels == c and c > 1


def _tensor_slices(path: str, mod: nn.Module, names: Sequence[str]) -> list[Slice]:
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
class _Chain:
    writers: list[Slice] = field(default_factory=list)
    depthwise: list[str] = field(default_factory=list)
    consumer: str = ""
    reader: Slice | None = None


class _Walker:
    def __init__(self, gm: fx.GraphModule, modules: Mapping[str, nn.Module], calls: Mapping[str, int]):
        self.modules, self.calls = modules, calls
        self.meta: dict[fx.Node, bool] = {}

    def _users(self, node: fx.Node) -> list[fx.Node]:
        return [u for u in node.users if not _is_meta(u, self.meta)]

    def _only_input(self, u: fx.Node, cur: fx.Node, scalar: bool = False) -> bool:
        """``cur`` is ``u``'s one data input (its first argument unless ``scalar``); every other input
        node only carries shape information."""
        count = sum(a is cur for a in u.args) + sum(v is cur for v in u.kwargs.values())
        first = u.args[0] if u.args else u.kwargs.get("input", u.kwargs.get("self"))
        if count != 1 or (not scalar and first is not cur):
            return False
        return all(_is_meta(n, self.meta) for n in u.all_input_nodes if n is not cur)

    def walk(self, start: fx.Node, c: int) -> _Chain | None:
        """Follow the ``c`` channels produced at ``start`` to their one consumer, or None if coupled."""
        chain = _Chain()
        cur = start
        flat: int | None = None  # width of one channel after flattening, None while [B, C, H, W]
        for _ in range(10_000):
            users = self._users(cur)
            if len(users) != 1:
                return None
            u = users[0]
            shape = _shape(u)
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
                        chain.writers += _tensor_slices(u.target, m, ("weight", "bias"))
                        chain.depthwise.append(u.target)
                    elif isinstance(m, nn.BatchNorm2d) and m.num_features == c:
                        chain.writers += _tensor_slices(u.target, m, ("weight", "bias", "running_mean", "running_var"))
                    elif isinstance(m, nn.PReLU) and m.num_parameters in (1, c):
                        if m.num_parameters == c and c > 1:
                            chain.writers += _tensor_slices(u.target, m, ("weight",))
                    elif isinstance(m, nn.Flatten):
                        if not self._flattens(cur, u, c):
                            return None
                        flat = math.prod(_shape(cur)[2:])  # type: ignore[index]
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
            if kind is None or not self._only_input(u, cur, scalar=kind == "scalar"):
                return None
            if kind == "scalar":
                others = [a for a in (*u.args, *u.kwargs.values()) if a is not cur]
                if not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in others):
                    return None
            elif kind == "flatten":
                if flat is not None or not self._flattens(cur, u, c):
                    return None
                flat = math.prod(_shape(cur)[2:])  # type: ignore[index]
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
        a, b = _shape(src), _shape(dst)
        return a is not None and b is not None and len(a) == 4 and a[1] == c and b == (a[0], math.prod(a[1:]))


# ---- blocks ---------------------------------------------------------------------------------------


def _module_nodes(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
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


def _is_identity_residual(path: str, nodes: list[fx.Node]) -> bool:
    """The nodes of block ``path``: one input ``x``, one output of ``x``'s shape, and ``x + branch``
    computed by the block's own forward (not by a nested block: a stage of residual blocks is no block)."""
    inside = set(nodes)
    inputs = {n for node in nodes for n in node.all_input_nodes if n not in inside and n.op != "get_attr"}
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    if len(inputs) != 1 or len(outputs) != 1:
        return False
    (x,), out = tuple(inputs), outputs[0]
    if _shape(x) is None or _shape(x) != _shape(out):
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


def _scope(model: nn.Module, path: str) -> str:
    """The outermost block enclosing ``path``: a non-container module held by a Sequential/ModuleList."""
    parts = path.split(".")
    mods = [model]
    for p in parts[:-1]:
        mods.append(getattr(mods[-1], p))
    containers = (nn.Sequential, nn.ModuleList)
    for i in range(1, len(parts)):
        if isinstance(mods[i - 1], containers) and not isinstance(mods[i], containers):
            return ".".join(parts[:i]) + "."
    return ""


# ---- the adapter ----------------------------------------------------------------------------------


def _first_conv(model: nn.Module) -> nn.Conv2d | None:
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def _positional(gm: fx.GraphModule, inputs: Any) -> list[Any]:
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


def _propagate(model: nn.Module, gm: fx.GraphModule, args: list[Any]) -> None:
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


def _depthwise_pruned(paths: tuple[str, ...]):
    def fix(model: nn.Module, keep: list[int]) -> None:
        for p in paths:
            m = model.get_submodule(p)
            m.groups = m.in_channels = m.out_channels = len(keep)

    return fix


class ConvAdapter:
    """Conv output channels (through BN, activations, pooling, depthwise convs) and residual blocks."""

    name = "conv"
    # Adapters whose models often hold a Conv2d that is no CNN (a ViT's patch embedding): a model one
    # of them matches is theirs, even when they are tried after this one or find no groups.
    yields_to: tuple[str, ...] = ("transformers",)

    def matches(self, model: nn.Module) -> bool:
        return _first_conv(model) is not None and claimed_by(model, self.yields_to) is None

    def build(self, model: nn.Module, *, seq_len: int, example_inputs: Any = None) -> AdapterResult:
        try:
            gm = fx.symbolic_trace(model)
        except Exception as e:  # noqa: BLE001 - any tracing failure means we cannot place the model
            raise UnsupportedModelError(
                f"the conv adapter traces models with torch.fx.symbolic_trace, which failed on "
                f"{type(model).__name__}: {type(e).__name__}: {e}. Make forward free of data-dependent "
                "control flow, or decompose a traceable sub-module"
            ) from None
        size = self._shapes(model, gm, example_inputs)
        modules = dict(gm.named_modules())
        calls: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1

        flops: dict[str, float] = {}
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            m = modules[node.target]
            out, inp = _shape(node), _shape(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
            if isinstance(m, nn.modules.conv._ConvNd) and out is not None:
                # 2 FLOPs per weight element per output position (per input position when transposed)
                spatial = inp if getattr(m, "transposed", False) else out
                key = f"{node.target}.weight"
                if spatial is not None:
                    flops[key] = flops.get(key, 0.0) + 2.0 * math.prod(spatial[2:])
            elif isinstance(m, nn.Linear) and inp is not None:
                key = f"{node.target}.weight"
                flops[key] = flops.get(key, 0.0) + 2.0 * math.prod(inp[1:-1])

        groups: list[ParticleGroup] = []
        unplaced: list[str] = []
        walker = _Walker(gm, modules, calls)
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            m = modules[node.target]
            if not isinstance(m, nn.Conv2d) or m.groups != 1:
                continue
            shape = _shape(node)
            chain = None
            if calls[node.target] == 1 and shape is not None and len(shape) == 4:
                chain = walker.walk(node, m.out_channels)
            if chain is None:
                unplaced.append(node.target)
                continue
            path = node.target
            writers = _tensor_slices(path, m, ("weight", "bias")) + chain.writers
            groups.append(ParticleGroup(
                f"{path}.channels", "channel", m.out_channels, len(groups), InputGate(chain.consumer, dim=1),
                tuple(writers), (chain.reader,), scope=_scope(model, path),
                on_prune=_depthwise_pruned(tuple(chain.depthwise)) if chain.depthwise else None,
            ))

        groups += self._block_groups(model, gm)
        return AdapterResult(groups, flops, f"per sample at {size[0]}×{size[1]}", recipe=None, unplaced=unplaced)

    # ---- helpers -----------------------------------------------------------------------------
    @staticmethod
    def _shapes(model: nn.Module, gm: fx.GraphModule, example_inputs: Any) -> tuple[int, int]:
        """Run ShapeProp; return the example's spatial size (H, W)."""
        if example_inputs is not None:
            args = _positional(gm, example_inputs)
            try:
                _propagate(model, gm, args)
            except Exception as e:  # noqa: BLE001
                raise UnsupportedModelError(
                    f"running {type(model).__name__} on example_inputs failed: {type(e).__name__}: {e}"
                ) from None
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if first is None or first.ndim < 2:
                return (1, 1)
            return (first.shape[-2], first.shape[-1]) if first.ndim >= 3 else (1, first.shape[-1])
        conv = _first_conv(model)
        assert conv is not None
        errors = []
        for s in DEFAULT_SIZES:
            x = torch.zeros(1, conv.in_channels, s, s, dtype=conv.weight.dtype, device=conv.weight.device)
            try:
                _propagate(model, gm, [x])
                return (s, s)
            except Exception as e:  # noqa: BLE001
                errors.append(f"{s}×{s}: {type(e).__name__}: {e}")
        raise UnsupportedModelError(
            f"cannot run {type(model).__name__} on a default input [1, {conv.in_channels}, H, W] for H = W in "
            f"{DEFAULT_SIZES} ({errors[0]}); pass example_inputs=... to decompose"
        )

    @staticmethod
    def _block_groups(model: nn.Module, gm: fx.GraphModule) -> list[ParticleGroup]:
        nodes = _module_nodes(gm)
        containers = (nn.Sequential, nn.ModuleList)
        found: dict[str, list[str]] = {}
        for cpath, container in model.named_modules():
            if not isinstance(container, containers):
                continue
            prefix = f"{cpath}." if cpath else ""
            for k, child in container.named_children():
                p = f"{prefix}{k}"
                if not isinstance(child, containers) and p in nodes and _is_identity_residual(p, nodes[p]):
                    found.setdefault(prefix, []).append(p)
        # a qualifying block nested in another one: keep the inner blocks only, so that no removal
        # step ever holds two blocks of which one contains the other
        every = [p for ps in found.values() for p in ps]
        outer = {p for p in every if any(q.startswith(p + ".") for q in every)}
        groups = []
        for prefix, paths in found.items():
            paths = [p for p in paths if p not in outer]
            if not paths:
                continue
            owned = []
            for p in paths:
                block = model.get_submodule(p)
                names = [f"{p}.{n}" for n, _ in block.named_parameters()]
                names += [f"{p}.{n}" for n, _ in block.named_buffers()]
                owned.append(tuple(names))
            groups.append(ParticleGroup(
                f"{prefix}blocks", "block", len(paths), None, ResidualGate(tuple(paths), dim=1), owned=tuple(owned),
                scope=prefix,
            ))
        return groups


register(ConvAdapter(), priority=10)  # any model with a Conv2d: the most generic, tried last
