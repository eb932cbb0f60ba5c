"""Training a classifier from scratch on a task, and the reference recipes: MiniLM fine-tuned on VADER sentences,
and a 2-layer LSTM trained from scratch on them (``model="lstm"``, MiniLM's WordPiece vocabulary).

`fine_tune` builds a classifier (`build_classifier`), trains it with `particlize.recover.classifier.train_classifier`
(the same loop that recovers a pruned one), evaluates it on the test split and saves it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ParticlizeError
from .io import save
from .models.recurrent import TextRNNClassifier
from .models.text import TextClassifier, _quiet_hf
from .models.vision import ResNet, SimpleCNN
from .recover.classifier import DEFAULT_LR, Progress, train_classifier
from .sources import TEXT_RNN_MODELS, load_tokenizer, minilm_path
from .tasks import Task, get_task

IMAGE_MODELS = ("simple-cnn", "resnet")
# Training a recurrent text classifier from scratch: AdamW at this peak lr (not the 5e-5 of fine-tuning MiniLM).
RNN_LR = 2e-3


def build_classifier(model: str | nn.Module, task: Task, *, pooling: str = "mean") -> tuple[nn.Module, Any]:
    """A fresh classifier for ``task`` and its tokenizer (None for images).

    Text: ``model`` is ``"minilm"`` or a Hugging Face encoder folder; the result is a `TextClassifier`
    (masked mean pooling + linear head) starting from the pretrained encoder. ``"lstm"`` / ``"gru"``: a
    randomly initialised 2-layer `TextRNNClassifier` (embedding 128, hidden 256) over MiniLM's WordPiece
    vocabulary, with MiniLM's tokenizer. Images: ``"simple-cnn"``,
    ``"resnet"`` (particlize's reference CNNs) or an ``nn.Module`` with the right number of outputs.
    """
    if isinstance(model, nn.Module):
        return model, None
    if task.kind == "image":
        if model not in IMAGE_MODELS:
            raise ParticlizeError(f"image tasks train {', '.join(IMAGE_MODELS)} (or a module you pass); got {model!r}")
        cls = SimpleCNN if model == "simple-cnn" else ResNet
        return cls(num_classes=task.num_classes, in_channels=1), None
    if model in TEXT_RNN_MODELS and not Path(model).exists():
        with _quiet_hf():
            tokenizer = load_tokenizer(model)
        net = TextRNNClassifier(vocab_size=len(tokenizer), num_classes=task.num_classes, cell=model,
                                pad_id=tokenizer.pad_token_id or 0)
        return net, tokenizer
    path = minilm_path() if model == "minilm" else Path(model)
    if not (path / "config.json").is_file():
        raise ParticlizeError(f"{model!r} is not 'minilm' or a Hugging Face encoder folder (no config.json)")
    with _quiet_hf():
        tokenizer = load_tokenizer(str(path))
    if tokenizer is None:
        raise ParticlizeError(f"{path} has no tokenizer files; a text classifier needs the encoder's tokenizer")
    return TextClassifier.from_pretrained_encoder(path, task.num_classes, pooling=pooling), tokenizer


def fine_tune(
    task_name: str = "vader-sentiment",
    out: str | os.PathLike[str] = "out/minilm-vader",
    *,
    model: str | nn.Module = "minilm",
    epochs: int = 2,
    lr: float | None = None,
    batch_size: int = 32,
    max_length: int = 64,
    seed: int = 0,
    limit: int | None = None,
    pooling: str = "mean",
    progress: Progress | None = None,
    force: bool = False,
    task_kwargs: dict[str, Any] | None = None,
) -> Path:
    """Train a classifier on a task and save it to ``out`` (the reference: MiniLM on VADER sentences).

    Builds it with `build_classifier`, trains (`train_classifier`), evaluates on the test split and
    saves with `particlize.save` — tokenizer included, metrics and training settings in ``extra``.
    ``pz.load(out)`` then gives the classifier (text: ``model(input_ids=..., attention_mask=...)``) and
    ``AutoTokenizer.from_pretrained(out)`` its tokenizer. Returns the folder.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:  # fail before hours of training
        raise ParticlizeError(f"{out} already exists and is not empty; pass force=True (CLI: --force) to replace it")
    task = get_task(task_name, **(task_kwargs or {}))
    torch.manual_seed(seed)
    net, tokenizer = build_classifier(model, task, pooling=pooling)
    if lr is None:
        lr = RNN_LR if isinstance(net, TextRNNClassifier) else DEFAULT_LR[task.kind]
    t0 = time.perf_counter()
    history = train_classifier(net, task, tokenizer=tokenizer, epochs=epochs, lr=lr, batch_size=batch_size,
                               max_length=max_length, seed=seed, progress=progress, limit=limit)
    seconds = time.perf_counter() - t0
    test = task.evaluate(net, "test", tokenizer=tokenizer, max_length=max_length)
    best = history["epochs"][history["best_epoch"] - 1]
    extra = {
        "task": task.name,
        "task_kwargs": {k: str(v) for k, v in (task_kwargs or {}).items()},
        "classes": task.classes,
        "metrics": {"test": test, "val": {"accuracy": best["val_accuracy"], "loss": best["val_loss"]}},
        "train": {"base": model if isinstance(model, str) else type(model).__name__, "epochs": epochs, "lr": lr,
                  "seed": seed, "batch_size": batch_size, "max_length": max_length, "limit": limit,
                  "pooling": pooling, "seconds": round(seconds, 1), "sizes": task.sizes(),
                  "history": history["epochs"], "best_epoch": history["best_epoch"]},
    }
    return save(net, out, tokenizer=tokenizer, force=force, extra=extra)


__all__ = ["IMAGE_MODELS", "RNN_LR", "build_classifier", "fine_tune"]
