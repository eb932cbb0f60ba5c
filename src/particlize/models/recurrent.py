"""Small, readable recurrent reference models.

* :class:`RNNClassifier` - a stacked LSTM/GRU over ``[B, T, input_size]`` with a
  linear head on the last time step.
* :class:`TextRNNClassifier` - a sentence classifier: token embedding, a stacked
  LSTM/GRU over the real tokens (packed by the attention mask), a Linear head on
  the last layer's final state. Its vocabulary is a Hugging Face tokenizer's
  (the reference uses MiniLM's WordPiece vocabulary, 30,522 tokens).
* :class:`SpeakerEncoder` - the Resemblyzer (GE2E) speaker encoder: a 3-layer
  LSTM over 40-channel mel frames, a Linear + ReLU and an L2 normalisation.
  :func:`load_resemblyzer_encoder` loads its pretrained weights from the
  ``resemblyzer`` pip package.

Every model carries a JSON-able ``particlize_recipe`` that rebuilds it::

    module, name = recipe["target"].split(":")
    model = getattr(importlib.import_module(module), name)(**recipe["kwargs"])
"""

from __future__ import annotations


import torch
import torch.fx
import torch.nn as nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from ._util import _package_file, _recipe

__all__ = [
    "RNNClassifier",
    "SpeakerEncoder",
    "TextRNNClassifier",
    "load_resemblyzer_encoder",
    "RESEMBLYZER_PACKAGE",
]

# The pip distribution that ships ``resemblyzer/pretrained.pt``.
RESEMBLYZER_PACKAGE = "resemblyzer"
_RESEMBLYZER_WEIGHTS_FILE = "pretrained.pt"


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
# TextRNNClassifier


def _pack(x: torch.Tensor, attention_mask: torch.Tensor) -> PackedSequence:
    """``x [B, T, E]`` packed to each sequence's real length (the mask's row sums, at least 1)."""
    lengths = attention_mask.sum(1).clamp(min=1).to("cpu", torch.int64)
    return pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)


# A leaf of torch.fx traces: the recurrent adapter follows the module's outputs to the head, and packing
# (data-dependent lengths) cannot be traced through.
torch.fx.wrap("_pack")


class TextRNNClassifier(nn.Module):
    """Token ids → embedding → stacked LSTM/GRU over the real tokens → last layer's final state → Linear.

    ``forward(input_ids [B, T], attention_mask [B, T] = None)`` gives logits ``[B, num_classes]``. The
    sequences are packed by the attention mask (any padding side), so a sentence gets the same logits
    whatever it is batched with. ``dropout`` applies to the embeddings, between the recurrent layers and
    before the head (training only). The recurrent adapter finds ``rnn``'s hidden units (one group per
    layer, the head reading the last) and cuts them to uneven widths (`StackedRNN`).
    """

    def __init__(
        self,
        vocab_size: int = 30522,
        embed_dim: int = 128,
        hidden_size: int = 256,
        num_layers: int = 2,
        num_classes: int = 2,
        cell: str = "lstm",
        dropout: float = 0.3,
        pad_id: int = 0,
    ) -> None:
        super().__init__()
        if cell not in ("lstm", "gru"):
            raise ValueError(f"cell must be 'lstm' or 'gru', got {cell!r}")
        rnn_cls = nn.LSTM if cell == "lstm" else nn.GRU
        self.cell = cell
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.embed_dropout = nn.Dropout(dropout)
        self.rnn = rnn_cls(embed_dim, hidden_size, num_layers, batch_first=True,
                           dropout=dropout if num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, num_classes)
        self.particlize_recipe = _recipe(
            TextRNNClassifier, vocab_size=vocab_size, embed_dim=embed_dim, hidden_size=hidden_size,
            num_layers=num_layers, num_classes=num_classes, cell=cell, dropout=float(dropout), pad_id=pad_id,
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        x = self.embed_dropout(self.embed(input_ids))  # [B, T, E]
        state = self.rnn(_pack(x, attention_mask))[1]
        h_n = state[0] if self.cell == "lstm" else state  # [L, B, H] (a per-layer tuple once cut unevenly)
        return self.head(self.dropout(h_n[-1]))  # the last layer's state after each sequence's last real token


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
