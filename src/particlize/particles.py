"""The core: particle groups, their gates, and the particle map of a model.

A *particle* is one working unit of a network (an attention head, an FFN neuron, a conv channel, a
recurrent hidden unit, a whole block). Particles of one kind at one site form a `ParticleGroup`; all
groups of a model form its `ParticleMap`. This module knows nothing of model families: adapters
(``particlize.adapters``) describe where each group's weights live and where its gate sits.

The gate is the one mechanism behind ablation, attribution and surgery. With a patch value ``p`` a gate
``g`` turns the activation ``a`` entering a group's reader into ``p + g * (a - p)``: ``g = 1`` is the
intact model, ``g = 0`` with ``p = 0`` is the model with the particle removed, ``dL/dg`` at 1 is its
first-order attribution. The invariant tested for every adapter: zero gates on a set S give exactly the
outputs of the physically pruned model without S.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import plan as _plan
from .batches import batch_inputs, run_batch, token_weights
from .errors import GateError, ParticlizeError, PlanError
from .gates import (  # noqa: F401  (re-exported: the gate sites are part of the core's public surface)
    GateSite, InputGate, ResidualGate, Slice, WeightMaskGate, _block_io, _resolve, apply_gate,
)
from .record import particle_table

# factor: one latent dimension of embedding tables that meet (a recommender's user and item factors);
# kv_head: a key/value head of grouped-query attention with all its query heads
Kind = Literal["head", "neuron", "channel", "unit", "block", "expert", "factor", "kv_head"]
KINDS: tuple[str, ...] = ("head", "neuron", "channel", "unit", "block", "expert", "factor", "kv_head")
Remove = Mapping[str, "Sequence[int] | Tensor"]


# --------------------------------------------------------------------------------------------------
# Groups


@dataclass(eq=False)
class ParticleGroup:
    """Homogeneous particles at one site of a model.

    ``writers`` produce the particles, ``readers`` consume them; ``owned`` lists, for block groups,
    the whole tensors each block owns. ``flops_ctx`` is extra FLOPs per token per context position
    (attention scores and mixing), added to the FLOPs of the group's weights at a given sequence length;
    ``ctx_len`` fixes that context length where the architecture does, whatever the sequence length
    (a video DiT's spatial attention sees one frame's patches, its temporal attention one patch's frames).
    ``balanced`` > 1 means the particles come in that many equal chunks which must keep equal counts
    (query heads sharing a key/value head under grouped-query attention). ``active`` marks a conditional
    group (mixture-of-experts): each token runs only ``active`` of its kept particles, so the FLOPs of the
    tensors named in ``routed`` scale with ``min(active, kept) / kept`` of their kept size, not with it.
    ``contains`` names a finer group whose particles each particle here is made of (``fine.size / size``
    consecutive ones: a key/value head's query heads); costs count the shared tensors and attention through
    it, a cut of either resizes the other, and one prune cuts only one of the two (`plan.with_contained`).
    """

    name: str
    kind: Kind
    size: int
    layer: int | None
    gate: GateSite
    writers: tuple[Slice, ...] = ()
    readers: tuple[Slice, ...] = ()
    owned: tuple[tuple[str, ...], ...] = ()
    flops_ctx: float = 0.0
    ctx_len: int | None = None
    balanced: int = 1
    scope: str = ""
    active: int | None = None
    routed: tuple[str, ...] = ()
    contains: str | None = None
    on_prune: Callable[[nn.Module, list[int]], None] | None = field(default=None, repr=False)

    def ctx_flops(self, seq_len: int) -> float:
        """Attention FLOPs per token of one particle at sequence length ``seq_len`` (or its fixed context)."""
        return self.flops_ctx * (seq_len if self.ctx_len is None else self.ctx_len)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ParticlizeError(f"unknown particle kind {self.kind!r}; expected one of {KINDS}")
        if self.size < 1:
            raise ParticlizeError(f"group {self.name!r} has no particles")

    @property
    def per_example(self) -> bool:
        """Whether gates of shape ``[batch, n]`` (a different ablation per example) are supported."""
        return self.gate.per_example

    def check_keep(self, keep: Sequence[int]) -> None:
        """Raise `PlanError` unless ``keep`` is a valid set of kept particles for physical removal."""
        if self.kind != "block" and len(keep) == 0:
            raise PlanError(
                f"removing all {self.size} particles of {self.name!r} would leave an empty layer; "
                "keep at least one, or remove the whole block instead"
            )
        if self.balanced > 1:
            chunk = self.size // self.balanced
            counts = {sum(1 for i in keep if i // chunk == c) for c in range(self.balanced)}
            if len(counts) != 1:
                raise PlanError(
                    f"{self.name!r}: grouped-query attention needs the same number of query heads kept "
                    f"for each of its {self.balanced} key/value heads (chunks of {chunk}); "
                    f"the plan keeps {sorted(counts)}. Remove heads evenly across key/value groups"
                )


def linear_reader_weight(pm: ParticleMap, g: ParticleGroup) -> tuple[str, int, str | None] | None:
    """``(weight name, feature dim, bias name or None)`` when ``g``'s only reader is a 2-D weight of the
    module its input gate sits on (``nn.Linear``: features on dim 1; GPT-2's ``Conv1D``: dim 0) and the
    gate splits that module's last input dimension; None otherwise (the group is cut without compensation (`particlize.surgery.compensate`))."""
    if g.kind == "block" or not isinstance(g.gate, InputGate) or g.gate.dim != -1 or len(g.readers) != 1:
        return None
    r = g.readers[0]
    mpath, _, tname = r.name.rpartition(".")
    if mpath != g.gate.module or tname != "weight" or r.repeat != 1:
        return None
    mod = pm.model.get_submodule(mpath)
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor) or w.ndim != 2:
        return None
    dim = r.dim % 2
    if not (isinstance(mod, nn.Linear) and dim == 1) and not (type(mod).__name__ == "Conv1D" and dim == 0):
        return None
    if w.shape[dim] != g.size * r.width:
        return None
    bias = getattr(mod, "bias", None)
    return r.name, dim, (f"{mpath}.bias" if isinstance(bias, torch.Tensor) else None)


def _indices(group: ParticleGroup, sel: Sequence[int] | Tensor) -> list[int]:
    if isinstance(sel, Tensor) and sel.dtype == torch.bool:
        if sel.shape != (group.size,):
            raise PlanError(f"{group.name!r}: a boolean selection must have shape [{group.size}]")
        sel = sel.nonzero().reshape(-1)
    out = sorted({int(i) for i in (sel.tolist() if isinstance(sel, Tensor) else sel)})
    bad = [i for i in out if not 0 <= i < group.size]
    if bad:
        raise PlanError(
            f"{group.name!r} has {group.size} particles (indices 0..{group.size - 1}); got {bad[:5]}"
        )
    return out


@dataclass(frozen=True)
class Cost:
    """Parameters and FLOPs (per the map's FLOPs unit, attention at ``seq_len``)."""

    params: int
    flops: float


# --------------------------------------------------------------------------------------------------
# The map



class ParticleMap:
    """All particle groups of a model, with gates, costs and removal. Build it with `decompose`.

    The map holds a reference to ``model`` (hooks are installed on it inside ``gates``/``ablate``
    contexts and removed on exit); ``prune`` returns a new, smaller model and leaves ``model`` alone.
    """

    def __init__(
        self,
        model: nn.Module,
        groups: Sequence[ParticleGroup],
        *,
        tensor_flops: Mapping[str, float],
        flops_unit: str,
        seq_len: int = 128,
        recipe: Mapping[str, Any] | None = None,
        adapter: str = "",
        after_prune: Callable[[nn.Module], None] | None = None,
        unplaced: Sequence[str] = (),
    ):
        self.model = model
        self.groups: list[ParticleGroup] = list(groups)
        self._by_name = {g.name: g for g in self.groups}
        if len(self._by_name) != len(self.groups):
            raise ParticlizeError("adapter produced two groups with the same name")
        self.tensor_flops = dict(tensor_flops)
        self.flops_unit = flops_unit
        self.seq_len = seq_len
        self.recipe = dict(recipe) if recipe is not None else None
        self.adapter = adapter
        self.after_prune = after_prune
        self.unplaced = list(unplaced)  # modules the adapter saw but left alone (e.g. residual-coupled convs)

    # ---- lookup -------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> ParticleGroup:
        try:
            return self._by_name[name]
        except KeyError:
            close = [n for n in self._by_name if name.split(".")[-1] in n][:3]
            hint = f" (similar: {', '.join(close)})" if close else ""
            raise PlanError(f"no particle group named {name!r}{hint}; see pm.groups or `particlize inspect`") from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[ParticleGroup]:
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __repr__(self) -> str:
        kinds = {k: sum(g.size for g in self.groups if g.kind == k) for k in KINDS}
        shown = ", ".join(f"{v} {k}s" for k, v in kinds.items() if v)
        return f"ParticleMap({type(self.model).__name__}: {len(self.groups)} groups, {shown})"

    def select(self, kind: str | None = None) -> list[ParticleGroup]:
        """Groups of one kind (all groups when ``kind`` is None)."""
        return [g for g in self.groups if kind is None or g.kind == kind]

    # ---- costs ---------------------------------------------------------------------------------
    def _tensor(self, name: str) -> Tensor:
        mpath, _, tname = name.rpartition(".")
        return getattr(_resolve(self.model, mpath), tname)

    def _is_param(self, name: str) -> bool:
        mpath, _, tname = name.rpartition(".")
        mod = _resolve(self.model, mpath)
        return tname in mod._parameters or parametrize.is_parametrized(mod, tname)

    def removed_sets(self, remove: Remove) -> dict[str, list[int]]:
        """Normalise a removal mapping: known group names, sorted in-range indices."""
        return {name: _indices(self[name], sel) for name, sel in remove.items()}

    def cost(self, remove: Remove | None = None, seq_len: int | None = None) -> Cost:
        """Exact parameters and FLOPs of the model after removing ``remove`` (the whole model if None).

        Tensors sliced by several groups along different dimensions (a conv between two pruned
        channel groups, an LSTM's recurrent weight) are counted once with every kept extent.
        """
        seq_len = self.seq_len if seq_len is None else seq_len
        removed = _plan.with_contained(self, self.removed_sets(remove or {}))
        dead_blocks: set[str] = set()
        dead_scopes: set[str] = set()
        for g in self.groups:
            if g.kind == "block":
                for i in removed.get(g.name, []):
                    dead_blocks.update(g.owned[i])
                    if isinstance(g.gate, ResidualGate):
                        dead_scopes.add(g.gate.modules[i] + ".")
        kept: dict[str, dict[int, int]] = {}  # tensor -> dim -> removed count
        routing: dict[str, float] = {}  # tensor -> FLOPs factor of a conditional group after the removal
        ctx_total = 0.0  # attention FLOPs per token of the kept particles
        for g in self.groups:
            if g.kind == "block":
                continue
            gone = removed.get(g.name, [])
            fine = {s.name for f in self.groups if f.name == g.contains for s in (*f.writers, *f.readers)}
            alive = not any(g.scope.startswith(s) or g.name.startswith(s) for s in dead_scopes)
            # a coarse group's attention and shared tensors are its finer group's, counted there
            ctx_total += g.ctx_flops(seq_len) * (g.size - len(gone) if alive and g.contains is None else 0)
            if g.active is not None and len(gone) < g.size:
                now, was = min(g.active, g.size - len(gone)) / (g.size - len(gone)), min(g.active, g.size) / g.size
                routing.update((name, now / was) for name in g.routed)
            for s in (s for s in (*g.writers, *g.readers) if s.name not in fine):
                t = self._tensor(s.name)
                dim = s.dim % t.ndim
                kept.setdefault(s.name, {})[dim] = len(gone) * s.width * s.repeat
        names = set(self.tensor_flops) | set(kept)
        params, flops = 0, ctx_total
        for name, p in self.model.named_parameters():
            names.add(name)
        for name in names:
            if name in dead_blocks:
                continue
            t = self._tensor(name)
            numel = math.prod(t.shape[d] - kept.get(name, {}).get(d, 0) for d in range(t.ndim))
            if self._is_param(name):
                params += numel
            flops += numel * self.tensor_flops.get(name, 0.0) * routing.get(name, 1.0)
        return Cost(params, flops)

    # ---- gates ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def gates(
        self, values: Mapping[str, Tensor], patch: Mapping[str, list[Tensor]] | None = None
    ) -> Iterator[nn.Module]:
        """Run ``self.model`` with gate values ``{group: [n] or [batch, n]}`` (and optional patches).

        Every installed gate must fire during each forward of the model, or `GateError` is raised;
        all hooks are removed on exit, also after an exception.
        """
        patch = patch or {}
        handles: list[Any] = []
        fired: dict[str, bool] = {}
        try:
            for name, g in values.items():
                group = self[name]
                g = torch.as_tensor(g)
                if g.shape[-1] != group.size or g.ndim not in (1, 2):
                    raise GateError(f"gates for {name!r} must have shape [{group.size}] or [batch, {group.size}]")
                fired[name] = False

                def mark(name=name):
                    fired[name] = True

                handles += group.gate.install(self.model, group.size, g, patch.get(name), mark)

            def reset(mod, args):
                for k in fired:
                    fired[k] = False

            def check(mod, args, output):
                missing = [k for k, v in fired.items() if not v]
                if missing:
                    raise GateError(
                        f"gate(s) did not fire during the forward: {', '.join(missing[:3])}; the model took "
                        "a path its adapter does not describe (please report it with the model's class)"
                    )

            handles.append(self.model.register_forward_pre_hook(reset))
            handles.append(self.model.register_forward_hook(check))
            yield self.model
        finally:
            for h in reversed(handles):
                h.remove()

    def gate_values(self, remove: Remove) -> dict[str, Tensor]:
        """Gate values that ablate ``remove``: lists of indices, or tensors of shape [n] / [batch, n]
        whose non-zero entries mark the particles to ablate (per example for [batch, n])."""
        out = {}
        for name, sel in remove.items():
            group = self[name]
            if isinstance(sel, Tensor) and sel.ndim == 2:
                if sel.shape[1] != group.size:
                    raise PlanError(f"{name!r}: a per-example mask must have shape [batch, {group.size}]")
                out[name] = 1.0 - (sel != 0).float()
            else:
                g = torch.ones(group.size)
                g[_indices(group, sel)] = 0.0
                out[name] = g
        return out

    @contextlib.contextmanager
    def ablate(
        self,
        remove: Remove,
        mode: Literal["zero", "mean", "resample"] = "zero",
        data: Any = None,
    ) -> Iterator[nn.Module]:
        """Run ``self.model`` with the particles in ``remove`` ablated.

        ``mode="zero"`` sets their activations to 0 (equal to removing them); ``"mean"`` replaces them
        with their mean over ``data`` (an iterable of batches); ``"resample"`` with their activations on
        ``data`` (one batch shaped like the batch you will run).
        """
        values = self.gate_values(remove)
        patch = None
        if mode == "mean":
            if data is None:
                raise ParticlizeError("mode='mean' needs data=... (batches to average activations over)")
            patch = self.mean_activations(list(values), data)
        elif mode == "resample":
            if data is None:
                raise ParticlizeError("mode='resample' needs data=... (a batch whose activations are patched in)")
            patch = self.record(list(values), [data])
        elif mode != "zero":
            raise ParticlizeError(f"unknown ablation mode {mode!r}; use 'zero', 'mean' or 'resample'")
        with self.gates(values, patch) as model:
            yield model

    # ---- activations ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def capture(self, groups: Iterable[str], sink: Callable[[str, int, Tensor], None]) -> Iterator[nn.Module]:
        """Call ``sink(group, point, activation)`` for each activation at the groups' gates."""
        handles: list[Any] = []
        try:
            for name in groups:
                group = self[name]
                handles += group.gate.capture(self.model, group.size, lambda i, a, name=name: sink(name, i, a))
            yield self.model
        finally:
            for h in reversed(handles):
                h.remove()

    @torch.no_grad()
    def record(self, groups: Iterable[str], data: Iterable[Any]) -> dict[str, list[Tensor]]:
        """Activations at the groups' gates for each batch of ``data`` (concatenated over batches)."""
        store: dict[str, dict[int, list[Tensor]]] = {}
        with self.capture(groups, lambda n, i, a: store.setdefault(n, {}).setdefault(i, []).append(a.detach())):
            for batch in data:
                run_batch(self.model, batch)
        return {n: [torch.cat(v[i]) for i in sorted(v)] for n, v in store.items()}

    @torch.no_grad()
    def mean_activations(self, groups: Iterable[str], data: Iterable[Any]) -> dict[str, list[Tensor]]:
        """Per-feature mean activation at each group's gate over ``data`` (the patch for mode='mean'),
        padded positions left out (`token_weights`)."""
        groups = list(groups)
        sums: dict[tuple[str, int], list] = {}
        current: list[Any] = [None]

        def sink(name: str, i: int, a: Tensor) -> None:
            x = a.detach().movedim(self[name].gate.gate_dim() % a.ndim, -1).double()
            w = token_weights(current[0], x)
            flat = x.reshape(-1, x.shape[-1])
            w = torch.ones_like(flat[:, :1]) if w is None else w.reshape(-1, 1)
            acc = sums.setdefault((name, i), [0.0, 0.0])
            acc[0] = acc[0] + (flat * w).sum(0)
            acc[1] += float(w.sum())

        with self.capture(groups, sink):
            for batch in data:
                current[0] = batch_inputs(batch)
                run_batch(self.model, current[0])
        out: dict[str, list[Tensor]] = {}
        for (name, i), (s, cnt) in sorted(sums.items()):
            out.setdefault(name, []).append((s / max(cnt, 1.0)).float())
        return out

    # ---- tables and surgery --------------------------------------------------------------------
    def table(self, seq_len: int | None = None, data: Iterable[Any] | None = None) -> "Any":
        """One row per particle (a pandas DataFrame): see `particlize.record.particle_table`."""
        if any(p.is_meta for p in self.model.parameters()):
            raise ParticlizeError("the model's weights are on the meta device (shapes, no values), so they have no "
                                  "norms: load real weights first (model.to_empty(device='cpu'), then load_state_dict)")
        return particle_table(self, seq_len=seq_len, data=data)

    def prune(
        self,
        remove: Remove,
        *,
        compensate: str | None = None,
        data: Iterable[Any] | None = None,
        reweight: Iterable[Any] | None = None,
    ) -> nn.Module:
        """A new, physically smaller dense model without the particles in ``remove``; ``self.model`` is
        left as it is. The new model records the plan steps it took (``particlize.plan.model_plan``).

        ``compensate`` lets the kept particles' reader absorb what is cut, from calibration batches
        ``data`` (inputs, or ``(inputs, targets)`` pairs): ``"bias"`` folds each removed particle's mean
        contribution into the reader's bias, ``"merge"`` folds each removed particle into the kept particle
        whose activations best predict it (least-squares scale), ``"refit"`` refits the kept reader weights
        by least squares on all kept particles (`particlize.surgery.refit`). Groups whose reader is not a
        linear layer on the gated features are cut without compensation. ``reweight=data`` is
        ``compensate="refit", data=data``."""
        if reweight is not None:
            if compensate not in (None, "refit") or data is not None:
                raise ParticlizeError("reweight=data means compensate='refit', data=data; pass only one of them")
            compensate, data = "refit", reweight
        return self.pruned(remove, compensate=compensate, data=data).model

    def pruned(self, remove: Remove, *, compensate: str | None = None, data: Iterable[Any] | None = None) -> "ParticleMap":
        """`prune`, returning the particle map of the new model (``.model``): carried over from this map, with
        the cut groups re-indexed, so the new model need not be decomposed again."""
        return _plan.prune_model(self, self.removed_sets(remove), compensate=compensate, data=data)

    # ---- carrying the map onto a changed model -------------------------------------------------
    def rebind(self, model: nn.Module) -> "ParticleMap":
        """This map's groups on ``model``, a structurally identical copy of ``self.model``."""
        return ParticleMap(
            model, self.groups, tensor_flops=self.tensor_flops, flops_unit=self.flops_unit, seq_len=self.seq_len,
            recipe=self.recipe, adapter=self.adapter, after_prune=self.after_prune, unplaced=self.unplaced,
        )

    def with_size(self, name: str, size: int, model: nn.Module | None = None) -> "ParticleMap":
        """The map after group ``name`` was cut to ``size`` particles (on ``model``, default ``self.model``):
        the group's size and the strides of its interleaved slices follow; nothing else changes."""
        g = self[name]

        def cut(s: Slice) -> Slice:
            if s.repeat == 1:
                return s
            if s.stride != g.size * s.width:
                raise PlanError(f"{name!r}: slice {s.name} interleaves particles with stride {s.stride}, "
                                f"not {g.size} x {s.width}; decompose the cut model instead")
            return dataclasses.replace(s, stride=size * s.width)

        gate = g.gate
        if isinstance(gate, WeightMaskGate):
            gate = dataclasses.replace(gate, readers=tuple(cut(s) for s in gate.readers))
        new = dataclasses.replace(
            g, size=size, gate=gate, writers=tuple(cut(s) for s in g.writers), readers=tuple(cut(s) for s in g.readers)
        )
        swap = {name: new}  # a contained (finer) group shrinks with a coarse one; a coarse one's particles thin out
        for f in (f for f in self.groups if f.name == g.contains):
            swap[f.name] = dataclasses.replace(f, size=f.size // g.size * size, balanced=size if f.balanced > 1 else 1)
        for x in (x for x in self.groups if x.contains == name):
            shared = {s.name for s in (*g.writers, *g.readers)}
            w = lambda s: dataclasses.replace(s, width=s.width * size // g.size) if s.name in shared else s  # noqa: E731
            swap[x.name] = dataclasses.replace(x, writers=tuple(map(w, x.writers)), readers=tuple(map(w, x.readers)),
                                               flops_ctx=x.flops_ctx * size / g.size)
        out = self.rebind(self.model if model is None else model)
        out.groups = [swap.get(x.name, x) for x in self.groups]
        out._by_name = {x.name: x for x in out.groups}
        return out
