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
Channels that reach a residual ``add`` are coupled with every other conv writing into the same sum.

*stream* (``streams=True``, the default) — the channels of one residual stream, written by several convs
and summed by the adds between them (a ResNet stage: the stem or downsampling shortcut and each block's
last conv + BN), as one group of kind ``channel`` named ``<first writer>.stream``
(`particlize.adapters.conv_stream`). ``ConvAdapter(streams=False)`` leaves them alone as before.
Channels that reach anything else — ``cat``, ``mul`` of two tensors, the output, a module called twice
— are never broken and no group is made for them (their producers are listed in
``AdapterResult.unplaced``).

*block* — children of an ``nn.Sequential`` / ``nn.ModuleList`` whose traced sub-graph adds the block's
own input to a branch output (an identity shortcut) and whose output has the input's shape (a ResNet
BasicBlock without downsample, a MobileNetV2 InvertedResidual with ``use_res_connect``). One group per
container, holding the qualifying children in order; `ResidualGate` makes a gated-off block the
identity, which is what removing it from its container does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import UnsupportedModelError
from ..particles import InputGate, ParticleGroup, ResidualGate
from . import AdapterResult, claimed_by, register
from ._builders import blocks
from .conv_stream import Stream, StreamFinder, StreamGate
from ._conv_trace import (
    Walker, conv_flops, is_identity_residual, module_nodes, positional, propagate, shape_of, tensor_slices,
)

DEFAULT_SIZES = (32, 28, 64, 224, 16)


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


def _depthwise_pruned(paths: tuple[str, ...]):
    def fix(model: nn.Module, keep: list[int]) -> None:
        for p in paths:
            m = model.get_submodule(p)
            m.groups = m.in_channels = m.out_channels = len(keep)

    return fix


def _stream_group(model: nn.Module, s: Stream, layer: int) -> ParticleGroup:
    return ParticleGroup(
        f"{s.entry}.stream", "channel", s.channels, layer, StreamGate(tuple(s.reader_modules), dim=1),
        tuple(s.writers), tuple(s.readers), on_prune=_depthwise_pruned(tuple(s.depthwise)) if s.depthwise else None,
    )


class ConvAdapter:
    """Conv output channels (through BN, activations, pooling, depthwise convs), residual streams (unless
    ``streams=False``) and residual blocks."""

    name = "conv"
    # Adapters whose models often hold a Conv2d that is no CNN (a ViT's patch embedding): a model one
    # of them matches is theirs, even when they are tried after this one or find no groups.
    yields_to: tuple[str, ...] = ("transformers",)

    def __init__(self, *, streams: bool = True) -> None:
        self.streams = streams

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

        flops = conv_flops(gm, modules)

        groups: list[ParticleGroup] = []
        unplaced: list[str] = []
        walker = Walker(gm, modules, calls)
        finder = StreamFinder(gm, modules, calls) if self.streams else None
        in_stream: set[str] = set()
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            m = modules[node.target]
            if not isinstance(m, nn.Conv2d) or m.groups != 1:
                continue
            shape = shape_of(node)
            chain = None
            placeable = calls[node.target] == 1 and shape is not None and len(shape) == 4
            if placeable:
                chain = walker.walk(node, m.out_channels)
            if chain is None:
                if node.target in in_stream:
                    continue
                stream = finder.find(node) if finder is not None and placeable else None
                if stream is None:
                    unplaced.append(node.target)
                else:  # the first writer of a stream in graph order: the stream's group goes here
                    in_stream.update(stream.convs)
                    groups.append(_stream_group(model, stream, len(groups)))
                continue
            path = node.target
            writers = tensor_slices(path, m, ("weight", "bias")) + chain.writers
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
            args = positional(gm, example_inputs)
            try:
                propagate(model, gm, args)
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
                propagate(model, gm, [x])
                return (s, s)
            except Exception as e:  # noqa: BLE001
                errors.append(f"{s}×{s}: {type(e).__name__}: {e}")
        raise UnsupportedModelError(
            f"cannot run {type(model).__name__} on a default input [1, {conv.in_channels}, H, W] for H = W in "
            f"{DEFAULT_SIZES} ({errors[0]}); pass example_inputs=... to decompose"
        )

    @staticmethod
    def _block_groups(model: nn.Module, gm: fx.GraphModule) -> list[ParticleGroup]:
        nodes = module_nodes(gm)
        containers = (nn.Sequential, nn.ModuleList)
        found: dict[str, list[str]] = {}
        for cpath, container in model.named_modules():
            if not isinstance(container, containers):
                continue
            prefix = f"{cpath}." if cpath else ""
            for k, child in container.named_children():
                p = f"{prefix}{k}"
                if not isinstance(child, containers) and p in nodes and is_identity_residual(p, nodes[p]):
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
            groups.append(blocks(prefix, model, paths, ResidualGate(tuple(paths), dim=1), buffers=True, scope=prefix))
        return groups


register(ConvAdapter(), priority=10)  # any model with a Conv2d: the most generic, tried last
