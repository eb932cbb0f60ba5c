"""Small, readable recurrent reference models.

* :class:`RNNClassifier` - a stacked LSTM/GRU over ``[B, T, input_size]`` with a
  linear head on the last time step.
* :class:`SpeakerEncoder` - the Resemblyzer (GE2E) speaker encoder: a 3-layer
  LSTM over 40-channel mel frames, a Linear + ReLU and an L2 normalisation.
  :func:`load_resemblyzer_encoder` loads its pretrained weights from the
  ``resemblyzer`` pip package.

Every model carries a JSON-able ``particlize_recipe`` that rebuilds it::

    module, name = recipe["target"].split(":")
    model = getattr(importlib.import_module(module), name)(**recipe["kwargs"])
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

__all__ = [
    "RNNClassifier",
    "SpeakerEncoder",
    "load_resemblyzer_encoder",
    "RESEMBLYZER_PACKAGE",
]

# The pip distribution that ships ``resemblyzer/pretrained.pt``.
RESEMBLYZER_PACKAGE = "resemblyzer"
_RESEMBLYZER_WEIGHTS_FILE = "pretrained.pt"


# ----------------------------------------------------------------------------
# helpers


def _jsonable(value: Any) -> Any:
    """Turn tuples into lists (recursively) so the value survives a JSON round trip."""
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _recipe(cls: type, **kwargs: Any) -> dict[str, Any]:
    """The ``particlize_recipe`` that rebuilds ``cls(**kwargs)``."""
    return {
        "kind": "callable",
        "target": f"{cls.__module__}:{cls.__qualname__}",
        "kwargs": _jsonable(kwargs),
    }


def _package_file(module: str, *parts: str) -> Path | None:
    """Path of a data file inside an installed top-level package, or None.

    Uses ``find_spec`` so the package is located without being imported (importing
    ``resemblyzer`` itself would pull in librosa, webrtcvad, ...).
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # e.g. already imported with no __spec__
        spec = None
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    if not roots and module in sys.modules:
        roots = list(getattr(sys.modules[module], "__path__", []))
    for root in roots:
        path = Path(root).joinpath(*parts)
        if path.is_file():
            return path
    return None


# ----------------------------------------------------------------------------
# RNNClassifier


class RNNClassifier(nn.Module):
    """Stacked LSTM or GRU (``batch_first``) with a Linear head on the last time step.

    Input ``[B, T, input_size]``; output logits ``[B, num_classes]``.
    ``dropout`` is the inter-layer dropout of ``nn.LSTM``/``nn.GRU`` (ignored
    when ``num_layers == 1``).
    """

    def __init__(
        self,
        input_size: int = 40,
        hidden_size: int = 64,
        num_layers: int = 3,
        num_classes: int = 10,
        cell: str = "lstm",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        rnn_cls: type[nn.LSTM] | type[nn.GRU]
        if cell == "lstm":
            rnn_cls = nn.LSTM
        elif cell == "gru":
            rnn_cls = nn.GRU
        else:
            raise ValueError(f"cell must be 'lstm' or 'gru', got {cell!r}")
        self.rnn = rnn_cls(
            input_size,
            hidden_size,
            num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.head = nn.Linear(hidden_size, num_classes)
        self.particlize_recipe = _recipe(
            RNNClassifier,
            input_size=input_size,
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_classes=num_classes,
            cell=cell,
            dropout=float(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


# ----------------------------------------------------------------------------
# SpeakerEncoder (Resemblyzer)


class SpeakerEncoder(nn.Module):
    """The Resemblyzer voice encoder network (no audio preprocessing).

    Input: mel spectrograms ``[B, T, 40]`` (Resemblyzer uses T = 160 frames,
    i.e. 1.6 s partial utterances). Output: L2-normalised, non-negative speaker
    embeddings ``[B, 256]``, taken from the last layer's final hidden state.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(40, 256, 3, batch_first=True)
        self.linear = nn.Linear(256, 256)
        self.relu = nn.ReLU()
        self.particlize_recipe = _recipe(SpeakerEncoder)

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.lstm(mels)
        # hidden[-1] is the last layer's h_T; indexing (not .shape) so it also
        # works if h_n is a per-layer tuple/list instead of one stacked tensor.
        embeds_raw = self.relu(self.linear(hidden[-1]))
        return embeds_raw / torch.norm(embeds_raw, dim=1, keepdim=True)


def load_resemblyzer_encoder() -> SpeakerEncoder:
    """Resemblyzer's pretrained :class:`SpeakerEncoder`, in eval mode.

    Reads ``resemblyzer/pretrained.pt`` from the installed ``resemblyzer`` pip
    package (without importing it). That file is a training checkpoint
    ``{"step", "model_state", "optimizer_state"}``; ``model_state`` also holds the
    GE2E loss scalars ``similarity_weight``/``similarity_bias``, which are dropped:
    only ``lstm.*`` and ``linear.*`` are loaded (strictly).
    """
    path = _package_file(RESEMBLYZER_PACKAGE, _RESEMBLYZER_WEIGHTS_FILE)
    if path is None:
        raise RuntimeError(
            "Resemblyzer pretrained weights not found; install them with "
            f"`pip install --no-deps {RESEMBLYZER_PACKAGE}`"
        )
    checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    state = checkpoint.get("model_state", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise RuntimeError(f"unexpected checkpoint format in {path}")
    state_dict = {k: v for k, v in state.items() if k.startswith(("lstm.", "linear."))}
    model = SpeakerEncoder()
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
