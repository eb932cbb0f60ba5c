"""Adapters turn a model family into particle groups. One file per family, one registry, by name.

An adapter is an object with a ``name``, ``matches(model) -> bool`` and
``build(model, seq_len=..., example_inputs=...) -> AdapterResult``. Each is registered under its name
with a declared priority; `decompose` tries them from the highest priority down (ties by name) and
uses the first that matches and finds groups, or exactly the one named by ``adapter=``. Import order
never matters. The built-in order, most specific first:

=================  ========  ==========================================================================
name               priority  claims
=================  ========  ==========================================================================
diffusers-video    50        diffusers' CogVideoX / Latte classes (by class)
recommender        45        embedding recommenders by attribute names (``user_gmf``/``gmf_out``, ``user_factors``/``dot``)
dit                40        a ``blocks`` list of spacetime DiT blocks (``attn_s``, ``attn_t``, ``mlp``)
transformers       30        stacks of Hugging Face style transformer layers, anywhere in the model
recurrent          20        any ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (or `StackedRNN`)
conv               10        any model with a Conv2d, unless an adapter it yields to (transformers) matches it
=================  ========  ==========================================================================

Shared group builders (attention heads, MLP neurons, blocks, biases) live in `particlize.adapters._builders`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import nn

from ..errors import ParticlizeError, UnsupportedModelError
from ..particles import ParticleGroup, ParticleMap
from ..plan import provenance


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
    """What `register` accepts: a name, a cheap structural test and a builder of groups."""

    name: str

    def matches(self, model: nn.Module) -> bool: ...

    def build(self, model: nn.Module, *, seq_len: int, example_inputs: Any = None) -> AdapterResult: ...


# name -> (priority, adapter); the order tried is derived from priorities, never from insertion order
_REGISTRY: dict[str, tuple[int, Adapter]] = {}

# The modules of the built-in adapters; each registers its adapter (with its priority) on import.


def register(adapter: Adapter, *, priority: int = 0) -> Adapter:
    """Register ``adapter`` under ``adapter.name``; higher ``priority`` is tried first (ties by name).

    Registering a name again replaces the earlier adapter (a reloaded module re-registers itself).
    Built-in priorities are 10 (conv) to 50 (diffusers-video); pick yours relative to them.
    """
    name = getattr(adapter, "name", None)
    if not isinstance(name, str) or not name:
        raise ParticlizeError(f"{type(adapter).__name__} has no name; give the adapter a `name` string attribute")
    if not all(callable(getattr(adapter, a, None)) for a in ("matches", "build")):
        raise ParticlizeError(f"adapter {name!r} needs `matches(model)` and `build(model, *, seq_len, example_inputs)`")
    _REGISTRY[name] = (int(priority), adapter)
    return adapter


def unregister(name: str) -> Adapter:
    """Remove the adapter registered as ``name`` and return it (e.g. to undo a test's registration)."""
    if name not in _REGISTRY:
        raise _unknown(name)
    return _REGISTRY.pop(name)[1]


def adapters() -> list[Adapter]:
    """The registered adapters, in the order `decompose` tries them (highest priority first, ties by name)."""
    order = sorted(_REGISTRY.items(), key=lambda kv: (-kv[1][0], kv[0]))
    return [adapter for _, (_, adapter) in order]


def get_adapter(name: str) -> Adapter:
    """The adapter registered as ``name``; `UnsupportedModelError` listing the names if there is none."""
    if name not in _REGISTRY:
        raise _unknown(name)
    return _REGISTRY[name][1]


def claimed_by(model: nn.Module, names: Iterable[str]) -> str | None:
    """The first of the adapters ``names`` (registered ones only) that matches ``model``, or None.

    A generic adapter yields to the ones it names here instead of importing them: the conv adapter
    leaves a ViT (whose patch embedding is a Conv2d) to the ``transformers`` adapter.
    """
    return next((n for n in names if n in _REGISTRY and _REGISTRY[n][1].matches(model)), None)


def _unknown(name: str) -> UnsupportedModelError:
    names = ", ".join(a.name for a in adapters())
    return UnsupportedModelError(f"no adapter is registered as {name!r}; registered adapters: {names}")


SUPPORTED = (
    "Hugging Face BERT-family encoders (incl. MiniLM), GPT-2, Llama/Qwen2/Mistral (GQA), ViT; "
    "CNNs of Conv2d+BatchNorm+activations (residual blocks too); multi-layer nn.LSTM/nn.GRU with a Linear on top; "
    "spacetime DiTs (particlize.models.sora) and diffusers' CogVideoX / Latte video transformers; "
    "embedding recommenders (particlize.models.recommender: NeuMF, biased MF)"
)


def _leaf_summary(model: nn.Module, limit: int = 6) -> str:
    leaves = [f"{n} ({type(m).__name__})" for n, m in model.named_modules() if n and not list(m.children())]
    more = f", … {len(leaves) - limit} more" if len(leaves) > limit else ""
    return ", ".join(leaves[:limit]) + more if leaves else f"(no submodules in {type(model).__name__})"


def _forced(model: nn.Module, name: str) -> Adapter:
    """The adapter ``name``, checked to match ``model`` (else an error naming the adapters that do)."""
    adapter = get_adapter(name)
    if adapter.matches(model):
        return adapter
    others = [a.name for a in adapters() if a.name != name and a.matches(model)]
    hint = f"adapters that match it: {', '.join(others)}" if others else f"no adapter matches it. Supported: {SUPPORTED}"
    raise UnsupportedModelError(
        f"adapter {name!r} does not match {type(model).__name__}; {hint} (or leave adapter= unset to pick one)"
    )


def decompose(
    model: nn.Module,
    *,
    adapter: str | None = None,
    recipe: Mapping[str, Any] | None = None,
    seq_len: int = 128,
    example_inputs: Any = None,
) -> ParticleMap:
    """The `ParticleMap` of ``model``: every supported particle group, with costs and gates.

    ``model`` is not changed. ``adapter`` names the adapter to use (see `adapters`); without it the
    first registered adapter that matches and finds groups is used. ``recipe`` says how to rebuild the
    architecture when saving (found automatically for Hugging Face models, models loaded by particlize
    and particlize's own models). ``seq_len`` is the sequence length at which attention FLOPs are
    counted in tables and costs; ``example_inputs`` (a tensor or dict) helps adapters that need shapes
    (convolutional models).
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"decompose takes a torch.nn.Module, got {type(model).__name__}; "
                                    "pass the model itself (for a saved one: particlize.load(folder))")
    candidates = [_forced(model, adapter)] if adapter is not None else adapters()
    for ad in candidates:
        if adapter is None and not ad.matches(model):
            continue
        res = ad.build(model, seq_len=seq_len, example_inputs=example_inputs)
        if not res.groups:
            continue
        rec = recipe or provenance(model).get("recipe") or getattr(model, "particlize_recipe", None) or res.recipe
        return ParticleMap(
            model, res.groups, tensor_flops=res.tensor_flops, flops_unit=res.flops_unit, seq_len=seq_len,
            recipe=rec, adapter=ad.name, after_prune=res.after_prune, unplaced=res.unplaced,
        )
    if adapter is not None:
        raise UnsupportedModelError(
            f"adapter {adapter!r} matches {type(model).__name__} but places none of its modules: "
            f"{_leaf_summary(model)}; leave adapter= unset to let another adapter try"
        )
    raise UnsupportedModelError(
        f"no adapter can place the modules of {type(model).__name__}: {_leaf_summary(model)}. "
        f"Supported: {SUPPORTED}"
    )


# the built-in adapters register themselves (each with its priority: the order of these imports is irrelevant)
from . import conv, diffusers_video, dit, recommender, recurrent, transformers_hf  # noqa: E402,F401

__all__ = [
    "Adapter", "AdapterResult", "SUPPORTED", "adapters", "claimed_by", "decompose", "get_adapter", "register",
    "unregister",
]
