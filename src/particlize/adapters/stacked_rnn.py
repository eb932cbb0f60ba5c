"""`StackedRNN`, a multi-layer LSTM / GRU / RNN with one hidden size per layer, and how the recurrent
adapter swaps it in after surgery.

``nn.LSTM`` has a single ``hidden_size``; when the layers of a pruned module end with different widths,
`sync_rnns` replaces it with a `StackedRNN` (one single-layer module per layer, parameter names
``layers.{l}.weight_ih_l0`` etc.), and resizes modules whose layers keep equal widths in place. The
adapter itself is `particlize.adapters.recurrent`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from ..errors import UnsupportedModelError

# Gate blocks per hidden unit, by ``RNNBase.mode``.
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
_CELLS: dict[str, tuple[type[nn.RNNBase], dict[str, Any]]] = {
    "LSTM": (nn.LSTM, {}),
    "GRU": (nn.GRU, {}),
    "RNN_TANH": (nn.RNN, {"nonlinearity": "tanh"}),
    "RNN_RELU": (nn.RNN, {"nonlinearity": "relu"}),
}


# --------------------------------------------------------------------------------------------------
# StackedRNN: a multi-layer LSTM/GRU/RNN with one hidden size per layer


class StackedRNN(nn.Module):
    """A multi-layer ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` whose layers may have different hidden sizes.

    It holds one single-layer module per layer (``self.layers[l]``, parameters ``layers.{l}.weight_ih_l0``,
    ``layers.{l}.weight_hh_l0``, ``layers.{l}.bias_ih_l0``, ``layers.{l}.bias_hh_l0``) and is called like
    the module it replaces: ``input`` of shape ``[B, T, in]`` (``batch_first``), ``[T, B, in]``, unbatched
    ``[T, in]`` or a ``PackedSequence``, with an optional initial state; inter-layer dropout (training
    only, not after the last layer) as in ``nn.LSTM``.

    Returns ``(output, h_n)`` (GRU/RNN) or ``(output, (h_n, c_n))`` (LSTM). ``output`` is the last layer's
    output, exactly as from ``nn.LSTM``. ``h_n`` and ``c_n`` are **tuples with one tensor per layer**, of
    shape ``[B, H_l]`` (``[H_l]`` unbatched): ``h_n[-1]`` (the last layer's final state), ``h_n[l]`` and
    ``len(h_n)`` keep working, while whole-tensor use of the stacked ``[L, B, H]`` state (``h_n.shape``,
    ``h_n.permute``) does not, since the layers differ in width. The initial state ``hx`` takes the same
    form (a sequence of per-layer tensors, or for LSTM a pair of them); a stacked ``[L, B, H]`` tensor is
    accepted too, when all layers have the same width.
    """

    # What code written for nn.LSTM usually reads besides the sizes.
    bidirectional = False
    proj_size = 0

    def __init__(
        self,
        mode: str,
        input_size: int,
        hidden_sizes: Sequence[int],
        *,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if mode not in _CELLS:
            raise ValueError(f"mode must be one of {sorted(_CELLS)}, got {mode!r}")
        if not hidden_sizes:
            raise ValueError("StackedRNN needs at least one layer")
        cls, extra = _CELLS[mode]
        self.mode = mode
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        sizes = [int(h) for h in hidden_sizes]
        ins = [int(input_size), *sizes[:-1]]
        self.layers = nn.ModuleList(
            cls(i, h, 1, bias=bias, batch_first=batch_first, device=device, dtype=dtype, **extra)
            for i, h in zip(ins, sizes)
        )
        self._sync()

    @property
    def hidden_size(self) -> int:
        """The width of ``output`` (the last layer's hidden size)."""
        return self.hidden_sizes[-1]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @classmethod
    def from_rnn(cls, rnn: nn.RNNBase) -> "StackedRNN":
        """A `StackedRNN` computing what ``rnn`` computes, sharing its parameters.

        The per-layer sizes are read from the weights, so this also works on a module whose weights were
        cut to different widths per layer (what surgery leaves behind).
        """
        check_rnn(rnn, "")
        w = rnn.weight_ih_l0
        sizes = [getattr(rnn, f"weight_hh_l{l}").shape[1] for l in range(rnn.num_layers)]
        new = cls(
            rnn.mode, w.shape[1], sizes, bias=rnn.bias, batch_first=rnn.batch_first, dropout=rnn.dropout,
            device=w.device, dtype=w.dtype,
        )
        kinds = ("weight_ih", "weight_hh", "bias_ih", "bias_hh") if rnn.bias else ("weight_ih", "weight_hh")
        for l, layer in enumerate(new.layers):
            for kind in kinds:
                setattr(layer, f"{kind}_l0", rnn._parameters[f"{kind}_l{l}"])
        new._sync()
        return new.train(rnn.training)

    def _sync(self) -> None:
        """Bring every layer's shape attributes in line with its (possibly cut) weights."""
        for layer in self.layers:
            layer.hidden_size = layer.weight_hh_l0.shape[1]
            layer.input_size = layer.weight_ih_l0.shape[1]
            layer._init_flat_weights()
        self.input_size = self.layers[0].input_size
        self.hidden_sizes = tuple(layer.hidden_size for layer in self.layers)

    def _layer_state(self, hx: Any, l: int) -> Any:
        if hx is None:
            return None
        if self.mode == "LSTM":
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise ValueError("an LSTM's initial state must be a pair (h_0, c_0)")
            return (self._pick(hx[0], l), self._pick(hx[1], l))
        return self._pick(hx, l)

    def _pick(self, h: Any, l: int) -> Tensor:
        if len(h) != len(self.layers):
            raise ValueError(f"initial state has {len(h)} layers, this StackedRNN has {len(self.layers)}")
        return h[l].unsqueeze(0)  # [1, B, H_l] (or [1, H_l] unbatched), as a one-layer module expects

    def forward(self, input: Tensor | PackedSequence, hx: Any = None) -> tuple[Any, Any]:
        x = input
        hs: list[Tensor] = []
        cs: list[Tensor] = []
        for l, layer in enumerate(self.layers):
            if l > 0 and self.dropout > 0 and self.training:
                x = _dropout(x, self.dropout)
            x, state = layer(x, self._layer_state(hx, l))
            if self.mode == "LSTM":
                hs.append(state[0][0])
                cs.append(state[1][0])
            else:
                hs.append(state[0])
        if self.mode == "LSTM":
            return x, (tuple(hs), tuple(cs))
        return x, tuple(hs)

    def extra_repr(self) -> str:
        s = f"{self.mode}, {self.input_size}, hidden_sizes={list(self.hidden_sizes)}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        return s


def _dropout(x: Tensor | PackedSequence, p: float) -> Tensor | PackedSequence:
    if isinstance(x, PackedSequence):
        return PackedSequence(F.dropout(x.data, p, True), x.batch_sizes, x.sorted_indices, x.unsorted_indices)
    return F.dropout(x, p, True)


def check_rnn(mod: nn.RNNBase, path: str) -> None:
    """Raise `UnsupportedModelError` for recurrent modules whose units cannot be cut (bidirectional, projected)."""
    where = f" at {path!r}" if path else ""
    if mod.mode not in GATES:
        raise UnsupportedModelError(f"recurrent module{where} has unknown mode {mod.mode!r}")
    if mod.bidirectional:
        raise UnsupportedModelError(
            f"bidirectional {type(mod).__name__}{where} is not supported: the recurrent adapter prunes the "
            "hidden units of unidirectional LSTM/GRU/RNN layers only"
        )
    if mod.proj_size:
        raise UnsupportedModelError(
            f"{type(mod).__name__}{where} has proj_size={mod.proj_size}: LSTMs with projections are not supported"
        )


def rnn_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Recurrent modules of ``model`` (the layers inside a StackedRNN are not listed on their own)."""
    found: list[tuple[str, nn.Module]] = []
    inside: list[str] = []
    for path, mod in model.named_modules():
        if any(path.startswith(p + ".") for p in inside):
            continue
        if isinstance(mod, StackedRNN):
            found.append((path, mod))
            inside.append(path)
        elif isinstance(mod, nn.RNNBase):
            found.append((path, mod))
    return found


# --------------------------------------------------------------------------------------------------
# After surgery: bring module attributes in line with the cut weights


def _replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent in model.modules():
        for name, child in parent._modules.items():
            if child is old:
                parent._modules[name] = new


def sync_rnns(model: nn.Module) -> None:
    """After cutting weights: resize recurrent modules, or turn uneven ones into `StackedRNN`."""
    for path, mod in rnn_modules(model):
        if isinstance(mod, StackedRNN):
            mod._sync()
            continue
        sizes = [getattr(mod, f"weight_hh_l{l}").shape[1] for l in range(mod.num_layers)]
        if len(set(sizes)) == 1:
            mod.hidden_size = sizes[0]
            mod.input_size = mod.weight_ih_l0.shape[1]
            mod._init_flat_weights()
        else:
            if mod is model:
                raise UnsupportedModelError("a bare recurrent module cannot be replaced in place; wrap it in a module")
            _replace_module(model, mod, StackedRNN.from_rnn(mod))


__all__ = ["GATES", "StackedRNN", "check_rnn", "rnn_modules", "sync_rnns"]
