"""Diffusion transformers over spacetime patches (`particlize.models.sora.SpacetimeDiT` and look-alikes).

A model matches when it has a ``blocks`` ModuleList whose blocks hold ``attn_s`` and ``attn_t`` (attention
with separate ``q``/``k``/``v``/``proj`` Linears and a ``head_dim``), an ``mlp`` of ``fc1``/``fc2`` and an
``adaLN`` modulation. Per block it yields spatial-attention heads, temporal-attention heads and MLP
neurons, plus one group of blocks.

Coupling: adaLN-Zero modulates the residual stream (width ``dim``), never a head or a neuron, so heads
and neurons only own their q/k/v (fc1) rows and proj (fc2) columns. A block owns all its parameters,
its adaLN Linear included: the gate makes the block the identity (``out = in + g * (out - in)``),
exactly what deleting it from ``blocks`` does. FLOPs are per token of the DiT blocks (the adaLN
Linears run once per video, not per token, and count 0); attention scores add ``4 * head_dim`` per
token per context position (tokens of a frame for spatial heads, frames for temporal heads).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..particles import InputGate, ParticleGroup, ResidualGate
from . import AdapterResult, register
from ._builders import blocks, columns, heads, linear_flops, mlp_neurons, rows

FLOPS_UNIT = "per token (DiT blocks)"


def _is_attention(m: Any) -> bool:
    return all(isinstance(getattr(m, k, None), nn.Linear) for k in ("q", "k", "v", "proj")) and hasattr(m, "head_dim")


def _is_block(m: nn.Module) -> bool:
    mlp = getattr(m, "mlp", None)
    return (
        _is_attention(getattr(m, "attn_s", None)) and _is_attention(getattr(m, "attn_t", None))
        and isinstance(getattr(mlp, "fc1", None), nn.Linear) and isinstance(getattr(mlp, "fc2", None), nn.Linear)
        and hasattr(m, "adaLN")
    )


def _heads_pruned(path: str) -> Any:
    def fix(model: nn.Module, keep: list[int]) -> None:
        model.get_submodule(path).heads = len(keep)

    return fix


class DiTAdapter:
    """Spatial / temporal attention heads, MLP neurons and blocks of a spacetime diffusion transformer."""

    name = "dit"

    def matches(self, model: nn.Module) -> bool:
        blocks = getattr(model, "blocks", None)
        return isinstance(blocks, nn.ModuleList) and len(blocks) > 0 and all(_is_block(b) for b in blocks)

    def build(self, model: nn.Module, *, seq_len: int, example_inputs: Any = None) -> AdapterResult:
        groups: list[ParticleGroup] = []
        flops: dict[str, float] = {}
        paths = tuple(f"blocks.{i}" for i in range(len(model.blocks)))
        # attention context: spatial = the patches of one frame, temporal = the frames of one patch position
        # (from the model's config; without one, attention is counted at ``seq_len`` like any transformer)
        cfg = getattr(model, "config", None)
        ctx: dict[str, int | None] = {"attn_s": None, "attn_t": None}
        if all(hasattr(cfg, a) for a in ("patch", "size", "frames")):
            pt, ph, pw = cfg.patch
            ctx = {"attn_s": (cfg.size // ph) * (cfg.size // pw), "attn_t": cfg.frames // pt}
            if getattr(cfg, "temporal", "position") == "all":  # the second attention sees every token
                ctx["attn_t"] *= ctx["attn_s"]
        for i, (bp, block) in enumerate(zip(paths, model.blocks)):
            for an in ("attn_s", "attn_t"):
                attn = getattr(block, an)
                ap, d = f"{bp}.{an}", attn.head_dim
                qkv = [(f"{ap}.{k}", getattr(attn, k)) for k in ("q", "k", "v")]
                groups.append(heads(
                    ap, attn.q.out_features // d, d, i, InputGate(f"{ap}.proj"), rows(qkv, width=d),
                    (columns(f"{ap}.proj", d),), ctx_len=ctx[an], scope=f"{bp}.", on_prune=_heads_pruned(ap),
                ))
            mp = f"{bp}.mlp"
            groups.append(mlp_neurons(
                mp, block.mlp.fc1.out_features, i, InputGate(f"{mp}.fc2"), [(f"{mp}.fc1", block.mlp.fc1)], f"{mp}.fc2",
                scope=f"{bp}.",
            ))
            flops.update(linear_flops(block, bp, zero=lambda n: n.startswith("adaLN")))  # adaLN: once per video
        groups.append(blocks("blocks.", model, paths, ResidualGate(paths), on_prune=_blocks_pruned))
        return AdapterResult(groups, flops, FLOPS_UNIT, recipe=getattr(model, "particlize_recipe", None))


def _blocks_pruned(model: nn.Module, keep: list[int]) -> None:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "depth"):
        cfg.depth = len(keep)  # informational; the recipe rebuilds the base and replays the plan


register(DiTAdapter(), priority=40)  # an exact block structure: above the generic transformer matcher
