"""Group builders shared by the adapters: attention heads, MLP neurons, residual blocks, biases, FLOPs.

Every family names its weights differently, but the coupling is the same: a head owns ``head_dim``
rows of each projection that writes it (and of their biases) and ``head_dim`` input columns of the
projection that reads it; a neuron owns one row of each up (and gate) projection and one column of the
down projection; a block owns every tensor under its path. Adapters find the modules; these functions
turn them into `ParticleGroup`s, so the ownership rules are written once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import nn

from ..particles import GateSite, ParticleGroup, Slice


def bias(path: str, mod: nn.Module, dim: int = 0, **kw: int) -> list[Slice]:
    """The slice of ``mod``'s bias at ``path`` (as ``Slice(..., dim, **kw)``), or none when it has no bias."""
    return [Slice(f"{path}.bias", dim, **kw)] if getattr(mod, "bias", None) is not None else []


def rows(projections: Iterable[tuple[str, nn.Module]], **kw: int) -> list[Slice]:
    """Output rows of each ``(path, module)`` projection and of its bias: what writes a head or a neuron.

    ``kw`` (``width``, ``repeat``, ``stride``) says how many rows one particle owns and where.
    """
    out: list[Slice] = []
    for path, mod in projections:
        out += [Slice(f"{path}.weight", 0, **kw), *bias(path, mod, **kw)]
    return out


def columns(path: str, width: int = 1) -> Slice:
    """The input columns of the Linear at ``path`` that read a particle (``width`` per particle)."""
    return Slice(f"{path}.weight", 1, width)


def heads(
    path: str, n: int, head_dim: int, layer: int | None, gate: GateSite,
    writers: Sequence[Slice], readers: Sequence[Slice], **kw: Any,
) -> ParticleGroup:
    """The ``n`` attention heads at ``path`` (group ``f"{path}.heads"``), scoring ``4 * head_dim`` FLOPs
    per token per context position. ``kw`` goes to `ParticleGroup` (``scope``, ``on_prune``, ...)."""
    return ParticleGroup(
        f"{path}.heads", "head", n, layer, gate, tuple(writers), tuple(readers), flops_ctx=4.0 * head_dim, **kw,
    )


def kv_heads(
    path: str, n_kv: int, n_q: int, head_dim: int, layer: int | None, gate: GateSite,
    q: tuple[str, nn.Module], kv: Sequence[tuple[str, nn.Module]], reader: str, **kw: Any,
) -> ParticleGroup:
    """The ``n_kv`` key/value heads of grouped-query attention at ``path`` (group ``f"{path}.kv_heads"``), each
    with its ``n_q / n_kv`` query heads: their ``q`` rows, one head of ``kv`` (key and value) rows, and their
    columns of ``reader``. It ``contains`` the query heads' group ``f"{path}.heads"``, which counts the
    attention FLOPs; per particle they are the ``n_q / n_kv`` query heads' ``4 * head_dim`` each."""
    c = n_q // n_kv
    return ParticleGroup(
        f"{path}.kv_heads", "kv_head", n_kv, layer, gate, (*rows([q], width=c * head_dim), *rows(kv, width=head_dim)),
        (columns(reader, c * head_dim),), flops_ctx=4.0 * head_dim * c, contains=f"{path}.heads", **kw,
    )


def neurons(
    path: str, n: int, layer: int | None, gate: GateSite, writers: Sequence[Slice], readers: Sequence[Slice],
    **kw: Any,
) -> ParticleGroup:
    """The ``n`` hidden neurons of the feed-forward at ``path`` (group ``f"{path}.neurons"``)."""
    return ParticleGroup(f"{path}.neurons", "neuron", n, layer, gate, tuple(writers), tuple(readers), **kw)


def mlp_neurons(
    path: str, n: int, layer: int | None, gate: GateSite, ups: Sequence[tuple[str, nn.Module]], down: str,
    **kw: Any,
) -> ParticleGroup:
    """Neurons of a plain or gated MLP: neuron ``i`` owns row ``i`` of every ``ups`` Linear (fc1, or
    gate_proj and up_proj) and its bias, and column ``i`` of the ``down`` Linear."""
    return neurons(path, n, layer, gate, rows(ups), (columns(down),), **kw)


def owned(model: nn.Module, path: str, *, buffers: bool = False) -> tuple[str, ...]:
    """The dotted names of every parameter (and, with ``buffers``, buffer) under ``path``."""
    mod = model.get_submodule(path)
    names = [f"{path}.{n}" for n, _ in mod.named_parameters()]
    if buffers:
        names += [f"{path}.{n}" for n, _ in mod.named_buffers()]
    return tuple(names)


def blocks(
    prefix: str, model: nn.Module, paths: Sequence[str], gate: GateSite, *, buffers: bool = False, **kw: Any,
) -> ParticleGroup:
    """The residual blocks at ``paths`` (group ``f"{prefix}blocks"``): each owns every tensor under its
    path, and ``gate`` makes a gated-off block the identity, which is what removing it does."""
    return ParticleGroup(
        f"{prefix}blocks", "block", len(paths), None, gate,
        owned=tuple(owned(model, p, buffers=buffers) for p in paths), **kw,
    )


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear)


def _never(name: str) -> bool:
    return False


def linear_flops(
    block: nn.Module, path: str, *, zero: Callable[[str], bool] = _never,
    is_matmul: Callable[[nn.Module], bool] = _is_linear,
) -> dict[str, float]:
    """2 FLOPs per token per weight element of each matmul module in ``block`` (at ``path``); 0 for the
    ones ``zero(name)`` picks (adaLN Linears that run once per video, cross-attention on the caption)."""
    return {
        f"{path}.{n}.weight": 0.0 if zero(n) else 2.0 for n, m in block.named_modules() if is_matmul(m)
    }


def set_present(obj: Any, **attrs: Any) -> None:
    """Set those of ``attrs`` that ``obj`` already has (model classes differ in what they record)."""
    for k, v in attrs.items():
        if hasattr(obj, k):
            setattr(obj, k, v)
