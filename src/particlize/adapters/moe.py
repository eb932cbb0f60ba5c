"""Mixture-of-experts FFNs made by ``moefy``: each expert is a particle (kind ``expert``).

A model matches when one of its modules looks like `particlize.surgery.ExpertFFN` (recognised by structure:
``num_experts``, ``expert_size``, ``active``, a ``router`` whose last Linear is ``router.out``, and ``up`` /
``down`` Linears; the adapters' floor is below surgery's). The rest of the model is placed by the adapter
that places the dense model (heads, blocks): the FFN keeps its Linears' names, so that adapter still
recognises the layer; its neuron group of the FFN is replaced by an expert group.

Expert ``e`` owns neurons ``e*m .. (e+1)*m`` of the up (and gate) rows and down columns, and row ``e`` of the
router's last Linear. Its gate scales the expert's output on each token (``[..., E * d_out]``, zero where
the token did not route to it); a zero gate without a patch also takes the expert out of the routing, so
that ablating experts is exactly pruning them (the remaining experts compete for the top-k). FLOPs per
token: the experts' weights count ``2 * active / E`` per element, the router's ``2``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..errors import GateError
from ..gates import GateSite, apply_gate
from ..particles import ParticleGroup, Slice
from . import AdapterResult, adapters, register
from ._builders import bias

EXPERT_FLOPS = "experts' weights count 2 * active / experts FLOPs per element"


def is_expert_ffn(m: Any) -> bool:
    """Whether ``m`` is a mixture-of-experts FFN made by ``moefy`` (by structure)."""
    return (
        isinstance(m, nn.Module) and all(isinstance(getattr(m, a, None), int) for a in ("num_experts", "expert_size", "active"))
        and isinstance(getattr(getattr(m, "router", None), "out", None), nn.Linear)
        and callable(getattr(m, "add_expert_hook", None)) and isinstance(getattr(m, "roles", None), dict)
    )


class _Hook:
    def __init__(self, n: int, gate: Tensor, patch: Tensor | None, fired: Any):
        self.n, self.gate, self.patch, self.fired = n, gate, patch, fired

    def route(self, logits: Tensor) -> Tensor:
        self.fired()
        if self.patch is not None:
            return logits  # a patched expert keeps its place in the routing
        off = (self.gate == 0).to(logits.device)
        if off.ndim == 2:  # per example: [B, E] over logits [B, ..., E]
            if logits.ndim < 3 or logits.shape[0] != off.shape[0]:
                raise GateError(f"per-example expert gates of shape {tuple(off.shape)} need inputs [batch, ..., "
                                f"features] with batch {off.shape[0]}; got {tuple(logits.shape[:-1])}")
            off = off.reshape(off.shape[0], *[1] * (logits.ndim - 2), off.shape[1])
        return logits.masked_fill(off, float("-inf"))

    def output(self, y: Tensor) -> Tensor:
        return apply_gate(y, -1, self.n, self.gate, self.patch)


class ExpertGate(GateSite):
    """The gate of a mixture-of-experts FFN's experts (see the module docstring)."""

    def __init__(self, module: str):
        self.module = module

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ExpertGate) and other.module == self.module

    def __hash__(self) -> int:
        return hash(("ExpertGate", self.module))

    def __repr__(self) -> str:
        return f"ExpertGate({self.module!r})"

    def gate_dim(self) -> int:
        return -1

    def install(self, model, n, gate, patch, fired):
        return [model.get_submodule(self.module).add_expert_hook(_Hook(n, gate, patch[0] if patch else None, fired))]

    def capture(self, model, n, sink):
        class _Capture:
            def route(self, logits: Tensor) -> Tensor:
                return logits

            def output(self, y: Tensor) -> Tensor:
                sink(0, y)
                return y

        return [model.get_submodule(self.module).add_expert_hook(_Capture())]


def _expert_pruned(path: str) -> Any:
    def fix(model: nn.Module, keep: list[int]) -> None:
        m = model.get_submodule(path)
        m.num_experts = len(keep)
        m.active = min(m.active, len(keep))

    return fix


def expert_group(path: str, m: nn.Module, layer: int | None, scope: str = "") -> ParticleGroup:
    """The experts of the mixture-of-experts FFN ``m`` at ``path`` (group ``f"{path}.experts"``)."""
    w = m.expert_size
    projs = [m.roles[r] for r in ("gate", "up") if r in m.roles]
    writers: list[Slice] = []
    for name in projs:
        writers += [Slice(f"{path}.{name}.weight", 0, w), *bias(f"{path}.{name}", getattr(m, name), width=w)]
    writers += [Slice(f"{path}.router.out.weight", 0), *bias(f"{path}.router.out", m.router.out)]
    readers = (Slice(f"{path}.{m.roles['down']}.weight", 1, w),)
    routed = tuple(f"{path}.{role}.weight" for role in m.roles.values())  # the router runs for every expert
    return ParticleGroup(f"{path}.experts", "expert", m.num_experts, layer, ExpertGate(path), tuple(writers), readers,
                         scope=scope, active=m.active, routed=routed, on_prune=_expert_pruned(path))


class MoEAdapter:
    """Experts of ``moefy``'s FFNs, on top of the groups the dense model's adapter finds."""

    name = "moe"

    def matches(self, model: nn.Module) -> bool:
        return any(is_expert_ffn(m) for m in model.modules())

    def build(self, model: nn.Module, *, seq_len: int, example_inputs: Any = None) -> AdapterResult:
        ffns = [(p, m) for p, m in model.named_modules() if is_expert_ffn(m)]
        res = AdapterResult([], {}, "per token")
        for ad in adapters():
            if ad.name != self.name and ad.matches(model):
                res = ad.build(model, seq_len=seq_len, example_inputs=example_inputs)
                if res.groups:
                    break
        by_name = {g.name: g for g in res.groups}
        prefixes = tuple(f"{p}." for p, _ in ffns)
        groups = [g for g in res.groups if not (g.name.startswith(prefixes) and g.kind != "block")]
        flops = dict(res.tensor_flops)
        for path, m in ffns:
            old = by_name.get(f"{path}.neurons")
            scope = old.scope if old is not None else ""
            layer = old.layer if old is not None else None
            groups.append(expert_group(path, m, layer, scope))
            share = min(m.active, m.num_experts) / m.num_experts
            for role in m.roles.values():
                flops[f"{path}.{role}.weight"] = 2.0 * share
            for n, sub in m.router.named_modules():
                if isinstance(sub, nn.Linear):
                    flops[f"{path}.router.{n}.weight"] = 2.0
        return AdapterResult(groups, flops, res.flops_unit, recipe=res.recipe, after_prune=res.after_prune,
                             unplaced=res.unplaced)


register(MoEAdapter(), priority=60)  # a mixture-of-experts FFN anywhere: before the adapter of the dense model
