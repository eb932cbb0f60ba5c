"""A sentence classifier: a Hugging Face encoder, masked mean pooling, dropout, a linear head.

    model = TextClassifier.from_pretrained_encoder(minilm_path(), num_labels=2)   # MiniLM weights
    logits = model(input_ids=ids, attention_mask=mask)                           # [B, num_labels]

The model rebuilds itself from JSON (``particlize_recipe``: the encoder's config dict, ``num_labels``,
``pooling``), so `particlize.save` / `particlize.load` move it like any particlize model, and the
transformer adapter finds the encoder's heads and neurons inside it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..errors import ParticlizeError

POOLINGS = ("mean", "cls")
# config keys that describe where a config came from, not the architecture
_DROP_KEYS = ("_name_or_path", "transformers_version", "_attn_implementation_autoset")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ParticlizeError("TextClassifier needs transformers: pip install 'particlize[hf]'") from None
    return transformers


@contextlib.contextmanager
def _quiet_hf() -> Iterator[None]:
    """Silence transformers' weight-loading progress bars and info logs for the duration."""
    from transformers.utils import logging as hf_logging

    bars_off = hf_logging.is_progress_bar_enabled() is False
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if not bars_off:
            hf_logging.enable_progress_bar()


def _encoder_kwargs(encoder: nn.Module) -> dict[str, Any]:
    """The JSON config dict that rebuilds ``encoder``, with its attention implementation."""
    cfg = {k: v for k, v in encoder.config.to_dict().items() if k not in _DROP_KEYS}
    attn = getattr(encoder.config, "_attn_implementation", None)
    if attn:
        cfg["attn_implementation"] = attn
    return cfg


class TextClassifier(nn.Module):
    """Encoder → pooled sentence vector → dropout → ``classifier`` (``nn.Linear(hidden, num_labels)``).

    ``encoder_config`` is a Hugging Face config as a dict (``config.to_dict()``; ``model_type`` is
    required); an ``attn_implementation`` key (``"sdpa"``, ``"eager"``, ...) picks the attention kernel,
    transformers' default (sdpa) otherwise. ``pooling`` is ``"mean"`` (mean of the token states over the
    attention mask) or ``"cls"`` (the first token's state). The encoder's own pooler is dropped: it is
    unused here and would only carry dead weights.
    """

    def __init__(self, encoder_config: dict[str, Any], num_labels: int, pooling: str = "mean") -> None:
        super().__init__()
        T = _transformers()
        if pooling not in POOLINGS:
            raise ParticlizeError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if num_labels < 1:
            raise ParticlizeError(f"num_labels must be at least 1, got {num_labels}")
        cfg = {k: v for k, v in dict(encoder_config).items() if k not in _DROP_KEYS}
        attn = cfg.pop("attn_implementation", None) or cfg.pop("_attn_implementation", None)
        model_type = cfg.pop("model_type", None)
        if not model_type:
            raise ParticlizeError("encoder_config needs a 'model_type' (e.g. 'bert'); pass config.to_dict()")
        config = T.AutoConfig.for_model(model_type, **cfg)
        with _quiet_hf():
            self.encoder = T.AutoModel.from_config(config, **({"attn_implementation": attn} if attn else {}))
        if getattr(self.encoder, "pooler", None) is not None:
            self.encoder.pooler = None
        hidden = config.hidden_size
        p = getattr(config, "classifier_dropout", None)
        p = getattr(config, "hidden_dropout_prob", 0.1) if p is None else p
        self.pooling = pooling
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(hidden, num_labels)
        std = getattr(config, "initializer_range", 0.02)
        nn.init.normal_(self.classifier.weight, std=std)
        nn.init.zeros_(self.classifier.bias)
        self.num_labels = num_labels
        self.particlize_recipe = {
            "kind": "callable",
            "target": "particlize.models.text:TextClassifier",
            "kwargs": {"encoder_config": _encoder_kwargs(self.encoder), "num_labels": int(num_labels),
                       "pooling": pooling},
        }

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, num_labels]`` for token ids ``[B, T]`` (mask: 1 for real tokens, 0 for padding)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state  # [B, T, H]
        if self.pooling == "cls":
            pooled = h[:, 0]
        else:
            m = attention_mask.unsqueeze(-1).to(h.dtype)  # [B, T, 1]
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)  # [B, H]
        return self.classifier(self.dropout(pooled))

    @classmethod
    def from_pretrained_encoder(
        cls, path_or_module: str | os.PathLike[str] | nn.Module, num_labels: int, pooling: str = "mean"
    ) -> TextClassifier:
        """A classifier whose encoder starts from pretrained weights (a local HF folder or a loaded model).

        The head is newly initialised (seed torch first for a reproducible head). A model with a task head
        (``BertForSequenceClassification``) contributes only its base encoder.
        """
        T = _transformers()
        if isinstance(path_or_module, nn.Module):
            src = path_or_module
        else:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            try:
                with _quiet_hf():
                    src = T.AutoModel.from_pretrained(str(path_or_module))
            except (OSError, ValueError) as e:
                raise ParticlizeError(
                    f"cannot load a pretrained encoder from {path_or_module}: {str(e).splitlines()[0]}"
                ) from None
        src = getattr(src, "base_model", src)
        if not hasattr(src, "config"):
            raise ParticlizeError(f"{type(src).__name__} is not a Hugging Face model (no .config)")
        model = cls(_encoder_kwargs(src), num_labels, pooling)
        missing, unexpected = model.encoder.load_state_dict(src.state_dict(), strict=False)
        unexpected = [k for k in unexpected if not k.startswith("pooler.")]
        if missing or unexpected:
            raise ParticlizeError(
                f"pretrained encoder weights do not fit the rebuilt encoder (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]})"
            )
        return model


__all__ = ["POOLINGS", "TextClassifier"]
