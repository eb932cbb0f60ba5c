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
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .errors import GateError, ParticlizeError, PlanError

Kind = Literal["head", "neuron", "channel", "unit", "block"]
KINDS: tuple[str, ...] = ("head", "neuron", "channel", "unit", "block")
Remove = Mapping[str, "Sequence[int] | Tensor"]


# --------------------------------------------------------------------------------------------------
# Where particles live in the weights


@dataclass(frozen=True)
class Slice:
    """The indices a group's particles own along one dimension of one parameter or buffer.

    Particle ``i`` owns the indices ``r * stride + i * width + j`` for ``r < repeat`` and ``j < width``
    along ``dim`` of the tensor called ``name`` (its dotted path in the model). Heads are ``width =
    head_dim``; LSTM units are ``width = 1, repeat = 4, stride = hidden`` (one row in each gate block);
    GPT-2's fused ``c_attn`` is ``repeat = 3, stride = embed``.
    """

    name: str
    dim: int
    width: int = 1
    repeat: int = 1
    stride: int = 0

    def indices(self, particles: Sequence[int] | Tensor) -> Tensor:
        """Tensor indices along ``dim`` owned by ``particles``, in order."""
        p = torch.as_tensor(particles, dtype=torch.long).reshape(-1)
        j = torch.arange(self.width)
        r = torch.arange(self.repeat) * self.stride
        # [repeat, particles, width] so that kept indices stay sorted when particles are sorted
        return (r[:, None, None] + p[None, :, None] * self.width + j[None, None, :]).reshape(-1)


# --------------------------------------------------------------------------------------------------
# Gates: where a group's multiplicative gate sits


def _resolve(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


class GateSite:
    """Where a group's gate is applied. Subclasses install hooks for one forward context.

    ``install`` returns hook handles; it calls ``fired()`` whenever one of its hooks runs so that the map
    can check every gate fired during a forward.
    """

    per_example: bool = True
    patchable: bool = True

    def install(
        self, model: nn.Module, n: int, gate: Tensor, patch: list[Tensor] | None, fired: Callable[[], None]
    ) -> list[Any]:
        raise NotImplementedError

    def capture(self, model: nn.Module, n: int, sink: Callable[[int, Tensor], None]) -> list[Any]:
        """Install hooks that pass each activation at the gate (``a``) to ``sink(point, a)``."""
        raise NotImplementedError

    def gate_dim(self) -> int:
        """The activation dimension that carries the particles (for summary statistics)."""
        raise NotImplementedError


def _broadcast(g: Tensor, ndim: int, dim: int, batch: int) -> Tensor:
    """Shape gate values ``[n]`` or ``[B, n]`` to broadcast over an activation unflattened at ``dim``."""
    shape = [1] * (ndim + 1)
    shape[dim] = g.shape[-1]
    if g.ndim == 2:
        if dim == 0 or g.shape[0] != batch:
            raise GateError(
                f"per-example gates of shape {tuple(g.shape)} need an activation with batch {g.shape[0]} "
                f"first; got batch {batch}. Pass gates of shape [n] or match the batch size."
            )
        shape[0] = g.shape[0]
    return g.reshape(shape)


def apply_gate(a: Tensor, dim: int, n: int, g: Tensor, p: Tensor | None) -> Tensor:
    """``p + g * (a - p)`` with ``a`` split into ``n`` particles along ``dim``; ``p = None`` means 0.

    ``g`` is ``[n]`` (shared) or ``[B, n]`` (per example); ``p`` is ``[a.shape[dim]]`` (a per-feature
    patch such as the mean) or a tensor shaped like ``a`` (activations from another input).
    """
    dim = dim % a.ndim
    size = a.shape[dim]
    if size % n:
        raise GateError(f"activation of width {size} at the gate does not split into {n} particles")
    a2 = a.unflatten(dim, (n, size // n))
    gg = _broadcast(g.to(device=a.device, dtype=a.dtype), a.ndim, dim, a.shape[0])
    if p is None:
        out = a2 * gg
    else:
        if p.ndim == 1:
            pshape = [1] * (a.ndim + 1)
            pshape[dim], pshape[dim + 1] = n, size // n
            p2 = p.to(device=a.device, dtype=a.dtype).reshape(pshape)
        else:
            p2 = p.to(device=a.device, dtype=a.dtype).unflatten(dim, (n, size // n))
        out = p2 + gg * (a2 - p2)
    return out.flatten(dim, dim + 1)


@dataclass(frozen=True)
class InputGate(GateSite):
    """Gate the first positional input of ``module`` along ``dim`` (e.g. ``o_proj``'s input, ``fc2``'s
    input, the next conv's input channels). Supports per-example gates and patches."""

    module: str
    dim: int = -1

    def gate_dim(self) -> int:
        return self.dim

    def install(self, model, n, gate, patch, fired):
        p = patch[0] if patch else None

        def hook(mod, args):
            if not args or not isinstance(args[0], Tensor):
                raise GateError(f"gate at {self.module!r} expected a tensor as first positional input")
            fired()
            return (apply_gate(args[0], self.dim, n, gate, p), *args[1:])

        return [_resolve(model, self.module).register_forward_pre_hook(hook)]

    def capture(self, model, n, sink):
        def hook(mod, args):
            sink(0, args[0])

        return [_resolve(model, self.module).register_forward_pre_hook(hook)]


def _block_io(args: tuple, kwargs: dict, output: Any) -> tuple[Tensor, Tensor]:
    inp = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
    out = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(inp, Tensor) or not isinstance(out, Tensor) or inp.shape != out.shape:
        raise GateError("a block gate needs a block whose input and output tensors have the same shape")
    return inp, out


def _replace_output(output: Any, new: Tensor) -> Any:
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    return new


@dataclass(frozen=True)
class ResidualGate(GateSite):
    """One gate per block: ``out' = in + p + g * ((out - in) - p)``. With ``g = 0`` and ``p = 0`` the
    block is the identity, exactly what removing it from its container does. The block's *activation*
    is its update ``out - in``; ``dim`` is its feature dimension (-1 for tokens, 1 for conv maps), along
    which a mean patch is taken."""

    modules: tuple[str, ...]
    dim: int = -1

    def gate_dim(self) -> int:
        return self.dim

    def install(self, model, n, gate, patch, fired):
        handles = []
        for i, path in enumerate(self.modules):

            def hook(mod, args, kwargs, output, i=i):
                fired()
                inp, out = _block_io(args, kwargs, output)
                g = gate[..., i : i + 1]
                p = patch[i] if patch else None
                return _replace_output(output, inp + apply_gate(out - inp, self.dim, 1, g, p))

            handles.append(_resolve(model, path).register_forward_hook(hook, with_kwargs=True))
        return handles

    def capture(self, model, n, sink):
        handles = []
        for i, path in enumerate(self.modules):

            def hook(mod, args, kwargs, output, i=i):
                inp, out = _block_io(args, kwargs, output)
                sink(i, out - inp)

            handles.append(_resolve(model, path).register_forward_hook(hook, with_kwargs=True))
        return handles


class _ColumnMask(nn.Module):
    """A parametrization multiplying one dimension of a weight by a mask built from the gate values."""

    def __init__(self, dim: int, index: Tensor, owner: Tensor, gate: Tensor, fired: Callable[[], None]):
        super().__init__()
        self.dim, self.index, self.owner, self.gate, self.fired = dim, index, owner, gate, fired

    def forward(self, w: Tensor) -> Tensor:
        self.fired()
        mask = torch.ones(w.shape[self.dim], dtype=w.dtype, device=w.device)
        mask = mask.index_put((self.index.to(w.device),), self.gate.to(device=w.device, dtype=w.dtype)[self.owner.to(w.device)])
        shape = [1] * w.ndim
        shape[self.dim] = -1
        return w * mask.reshape(shape)


@dataclass(frozen=True)
class WeightMaskGate(GateSite):
    """Gate a group through its readers' weights (``W[:, i] *= g_i``) for sites that cannot be hooked
    in the middle, such as the hidden state inside a fused ``nn.LSTM``. Shared gates and zero patches
    only: reading a masked weight is exactly reading a zeroed activation."""

    readers: tuple[Slice, ...]
    per_example: bool = False
    patchable: bool = False

    def gate_dim(self) -> int:
        return -1

    def install(self, model, n, gate, patch, fired):
        if gate.ndim != 1:
            raise GateError(
                "this group is gated through its readers' weights (a fused recurrent layer): "
                "only shared gates of shape [n] are supported, not per-example gates"
            )
        if patch:
            raise GateError(
                "this group is gated through its readers' weights (a fused recurrent layer): "
                "only mode='zero' is supported"
            )
        done: list[tuple[nn.Module, str]] = []
        try:
            for s in self.readers:
                mpath, _, pname = s.name.rpartition(".")
                mod = _resolve(model, mpath)
                index = s.indices(range(n))
                owner = torch.arange(n).repeat_interleave(s.width).repeat(s.repeat)
                dim = s.dim % getattr(mod, pname).ndim
                parametrize.register_parametrization(mod, pname, _ColumnMask(dim, index, owner, gate, fired))
                done.append((mod, pname))
        except Exception:
            _RemoveParametrizations(done).remove()
            raise
        return [_RemoveParametrizations(done)]

    def capture(self, model, n, sink):
        raise GateError(
            "activations inside a fused recurrent layer cannot be recorded; "
            "use mode='zero' for these groups"
        )


class _RemoveParametrizations:
    def __init__(self, done: list[tuple[nn.Module, str]]):
        self.done = done

    def remove(self) -> None:
        for mod, pname in reversed(self.done):
            if parametrize.is_parametrized(mod, pname):
                parametrize.remove_parametrizations(mod, pname, leave_parametrized=False)
        self.done = []


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
    (query heads sharing a key/value head under grouped-query attention).
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


def batch_inputs(batch: Any) -> Any:
    """The model inputs of a batch: an analysis ``Batch``'s ``inputs``, an ``(inputs, targets)`` pair's
    first item, or the batch itself."""
    if hasattr(batch, "inputs") and hasattr(batch, "targets"):
        return batch.inputs
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and not isinstance(batch[0], (int, float)):
        return batch[0]
    return batch


def token_weights(inputs: Any, a: Tensor) -> Tensor | None:
    """``[B, T]`` weights that leave padding out of activation statistics: the inputs' ``attention_mask``
    when the activation is laid out ``[B, T, features]`` like it; None (every position counts) otherwise."""
    m = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if isinstance(m, Tensor) and m.ndim == 2 and a.ndim == 3 and tuple(a.shape[:2]) == tuple(m.shape):
        return m.to(a.device, torch.float64)
    return None


def run_batch(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` the way particlize calls it everywhere: a tensor positionally, a dict as keyword
    arguments, and an ``(inputs, targets)`` pair or a ``Batch`` by its inputs."""
    batch = batch_inputs(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, Tensor):
        return model(batch)
    raise ParticlizeError(
        f"cannot call the model on a {type(batch).__name__}; pass a tensor, a dict of tensors, "
        "or (inputs, targets) pairs"
    )


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
        removed = self.removed_sets(remove or {})
        dead_blocks: set[str] = set()
        dead_scopes: set[str] = set()
        for g in self.groups:
            if g.kind == "block":
                for i in removed.get(g.name, []):
                    dead_blocks.update(g.owned[i])
                    if isinstance(g.gate, ResidualGate):
                        dead_scopes.add(g.gate.modules[i] + ".")
        kept: dict[str, dict[int, int]] = {}  # tensor -> dim -> removed count
        ctx_total = 0.0  # attention FLOPs per token of the kept particles
        for g in self.groups:
            if g.kind == "block":
                continue
            gone = removed.get(g.name, [])
            alive = not any(g.scope.startswith(s) or g.name.startswith(s) for s in dead_scopes)
            ctx_total += g.ctx_flops(seq_len) * (g.size - len(gone) if alive else 0)
            for s in (*g.writers, *g.readers):
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
            flops += numel * self.tensor_flops.get(name, 0.0)
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
        from .record import particle_table

        return particle_table(self, seq_len=seq_len, data=data)

    def prune(self, remove: Remove, *, reweight: Iterable[Any] | None = None) -> nn.Module:
        """A new, physically smaller dense model without the particles in ``remove``.

        ``reweight``: calibration batches (inputs, or ``(inputs, targets)`` pairs). The kept particles'
        reader weights are then refit by least squares so that each cut linear reader reproduces its
        intact output on them as closely as it can (see `particlize.surgery.refit_readers`); groups whose
        reader is not a linear layer on the gated features are cut without a refit."""
        from .surgery import pruned_copy

        return pruned_copy(self, remove, reweight=reweight)
