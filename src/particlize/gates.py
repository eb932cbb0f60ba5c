"""Where particles live and where their gates sit: weight slices and gate sites.

A `Slice` names the indices a group's particles own in one tensor; a `GateSite` installs the hooks that
apply a group's multiplicative gate ``p + g * (a - p)`` at its reader's input (`InputGate`), on a
block's residual update (`ResidualGate`) or through its readers' weights (`WeightMaskGate`). Part of the
core: no model-family code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .errors import GateError

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
