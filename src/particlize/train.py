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
from .io import META, save
from .models.recommender import RECOMMENDERS
from .models.recurrent import TextRNNClassifier
from .models.text import TextClassifier, _quiet_hf
from .models.vision import ResNet, SimpleCNN, resnet_small
from .recover.classifier import DEFAULT_LR, Progress, train_classifier
from .recover.recommender import TRAIN_LR, train_recommender
from .sources import TEXT_RNN_MODELS, load_model, load_tokenizer, minilm_path
from .tasks import RatingTask, Task, get_task

IMAGE_MODELS = ("simple-cnn", "resnet", "resnet-small")
RATING_MODELS = tuple(RECOMMENDERS)
# Training a recurrent text classifier from scratch: AdamW at this peak lr (not the 5e-5 of fine-tuning MiniLM).
RNN_LR = 2e-3


def build_classifier(model: str | nn.Module, task: Task, *, pooling: str = "mean",
                     trust_code: bool = False) -> tuple[nn.Module, Any]:
    """A fresh classifier for ``task`` and its tokenizer (None for images).

    Text: ``model`` is ``"minilm"`` or a Hugging Face encoder folder; the result is a `TextClassifier`
    (masked mean pooling + linear head) starting from the pretrained encoder. ``"lstm"`` / ``"gru"``: a
    randomly initialised 2-layer `TextRNNClassifier` (embedding 128, hidden 256) over MiniLM's WordPiece
    vocabulary, with MiniLM's tokenizer. Images: ``"simple-cnn"``, ``"resnet"``, ``"resnet-small"`` (particlize's
    reference CNNs; the last sized for 28×28 on a CPU) or an ``nn.Module`` with the right number of outputs. Any
    other MODEL (`particlize.sources.load_model`: a particlize folder, e.g. a compressed model, or
    ``file.py:factory``) is fine-tuned as it is, with its tokenizer if it has one.
    """
    if isinstance(model, nn.Module):
        return model, None
    if model not in (*IMAGE_MODELS, *TEXT_RNN_MODELS, "minilm") and ((Path(model) / META).is_file() or not (Path(model) / "config.json").is_file()):
        return load_model(model, trust_code=trust_code), load_tokenizer(model)
    if task.kind == "image":
        if model not in IMAGE_MODELS:
            raise ParticlizeError(f"image tasks train {', '.join(IMAGE_MODELS)} (or a module you pass); got {model!r}")
        cls = {"simple-cnn": SimpleCNN, "resnet": ResNet, "resnet-small": resnet_small}[model]
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
    device: str = "cpu",
    trust_code: bool = False,
) -> Path:
    """Train a classifier on a task and save it to ``out`` (the reference: MiniLM on VADER sentences).

    Builds it with `build_classifier`, trains (`train_classifier`), evaluates on the test split and
    saves with `particlize.save` — tokenizer included, metrics and training settings in ``extra``. Training runs
    on ``device``; ``trust_code`` lets a saved model's own factory code run.
    ``pz.load(out)`` then gives the classifier (text: ``model(input_ids=..., attention_mask=...)``) and
    ``AutoTokenizer.from_pretrained(out)`` its tokenizer. Returns the folder.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:  # fail before hours of training
        raise ParticlizeError(f"{out} already exists and is not empty; pass force=True (CLI: --force) to replace it")
    task = get_task(task_name, **(task_kwargs or {}))
    torch.manual_seed(seed)
    if isinstance(task, RatingTask):
        return _fine_tune_rating(task, out, model, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, limit=limit,
                                 progress=progress, force=force, task_kwargs=task_kwargs)
    net, tokenizer = build_classifier(model, task, pooling=pooling, trust_code=trust_code)
    net = net.to(device)
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


def _fine_tune_rating(task: RatingTask, out: Path, model: str | nn.Module, *, epochs: int, lr: float | None,
                      batch_size: int, seed: int, limit: int | None, progress: Progress | None, force: bool,
                      task_kwargs: dict[str, Any] | None) -> Path:
    """`fine_tune` for a rating task: a fresh recommender (``"neumf"`` or ``"mf"``, or a module you pass) trained
    on the ratings with `train_recommender` (the best validation RMSE kept), evaluated on the test split."""
    if isinstance(model, str):
        if model not in RECOMMENDERS:
            raise ParticlizeError(f"rating tasks train {', '.join(RATING_MODELS)} (or a module you pass); got {model!r}")
        net: nn.Module = RECOMMENDERS[model](task.num_users, task.num_items, mean=task.mean_rating)
    else:
        net = model
    lr = TRAIN_LR if lr is None else lr
    batch_size = max(batch_size, 256)  # rating pairs are tiny: the CLI's text default of 32 would crawl
    history = train_recommender(net, task, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, limit=limit,
                                progress=progress)
    test = task.evaluate(net, "test")
    best = history["epochs"][history["best_epoch"] - 1] if history["best_epoch"] else {}
    extra = {
        "task": task.name,
        "task_kwargs": {k: str(v) for k, v in (task_kwargs or {}).items()},
        "metrics": {"test": test, "val": best},
        "train": {"base": model if isinstance(model, str) else type(model).__name__, "epochs": epochs, "lr": lr,
                  "seed": seed, "batch_size": batch_size, "limit": limit, "seconds": history["seconds"],
                  "sizes": task.sizes(), "history": history["epochs"], "best_epoch": history["best_epoch"]},
    }
    return save(net, out, force=force, extra=extra)


__all__ = ["IMAGE_MODELS", "RATING_MODELS", "RNN_LR", "build_classifier", "fine_tune"]
