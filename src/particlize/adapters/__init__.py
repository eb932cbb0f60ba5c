"""Adapters turn a model family into particle groups. One file per family, one registry.

An adapter is an object with a ``name``, ``matches(model) -> bool`` and
``build(model, seq_len=..., example_inputs=...) -> AdapterResult``. `decompose` asks each registered
adapter in order and uses the first that matches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import nn

from ..errors import UnsupportedModelError
from ..particles import ParticleGroup, ParticleMap


@dataclass
class AdapterResult:
    """What an adapter found: groups, FLOPs per element of each matmul weight, and fix-ups."""

    groups: list[ParticleGroup]
    tensor_flops: dict[str, float]
    flops_unit: str
    recipe: Mapping[str, Any] | None = None
    after_prune: Callable[[nn.Module], None] | None = None
    unplaced: list[str] = field(default_factory=list)


class Adapter(Protocol):
    name: str

    def matches(self, model: nn.Module) -> bool: ...

    def build(self, model: nn.Module, *, seq_len: int, example_inputs: Any = None) -> AdapterResult: ...


_REGISTRY: list[Adapter] = []


def register(adapter: Adapter) -> Adapter:
    """Add an adapter to the registry (later registrations are tried first)."""
    _REGISTRY.insert(0, adapter)
    return adapter


def adapters() -> list[Adapter]:
    """The registered adapters, in the order `decompose` tries them."""
    _load_builtin()
    return list(_REGISTRY)


_LOADED = False


def _load_builtin() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from . import conv, dit, recurrent, transformers_hf  # noqa: F401  (registers on import)
    from . import diffusers_video  # noqa: F401  (last: tried first, before conv claims its patch-embedding Conv2d)


SUPPORTED = (
    "Hugging Face BERT-family encoders (incl. MiniLM), GPT-2, Llama/Qwen2/Mistral (GQA), ViT; "
    "CNNs of Conv2d+BatchNorm+activations (residual blocks too); multi-layer nn.LSTM/nn.GRU with a Linear on top; "
    "spacetime DiTs (particlize.models.sora) and diffusers' CogVideoX / Latte video transformers"
)


def _leaf_summary(model: nn.Module, limit: int = 6) -> str:
    leaves = [f"{n} ({type(m).__name__})" for n, m in model.named_modules() if n and not list(m.children())]
    more = f", … {len(leaves) - limit} more" if len(leaves) > limit else ""
    return ", ".join(leaves[:limit]) + more if leaves else f"(no submodules in {type(model).__name__})"


def decompose(
    model: nn.Module,
    *,
    recipe: Mapping[str, Any] | None = None,
    seq_len: int = 128,
    example_inputs: Any = None,
) -> ParticleMap:
    """The `ParticleMap` of ``model``: every supported particle group, with costs and gates.

    ``model`` is not changed. ``recipe`` says how to rebuild the architecture when saving (found
    automatically for Hugging Face models, models loaded by particlize and particlize's own models).
    ``seq_len`` is the sequence length at which attention FLOPs are counted in tables and costs;
    ``example_inputs`` (a tensor or dict) helps adapters that need shapes (convolutional models).
    """
    from ..plan import provenance

    for adapter in adapters():
        if not adapter.matches(model):
            continue
        res = adapter.build(model, seq_len=seq_len, example_inputs=example_inputs)
        if not res.groups:
            continue
        rec = recipe or provenance(model).get("recipe") or getattr(model, "particlize_recipe", None) or res.recipe
        return ParticleMap(
            model, res.groups, tensor_flops=res.tensor_flops, flops_unit=res.flops_unit, seq_len=seq_len,
            recipe=rec, adapter=adapter.name, after_prune=res.after_prune, unplaced=res.unplaced,
        )
    raise UnsupportedModelError(
        f"no adapter can place the modules of {type(model).__name__}: {_leaf_summary(model)}. "
        f"Supported: {SUPPORTED}"
    )


__all__ = ["Adapter", "AdapterResult", "SUPPORTED", "adapters", "decompose", "register"]
