"""Tasks: data, pre/post-processing and metrics, one file per data source.

    from particlize.tasks import get_task
    task = get_task("vader-sentiment")                       # real movie-review sentences (cached download)
    task = get_task("text-csv", path="my.csv", text_column="text", label_column="label")
    task = get_task("fashion-mnist")                         # apt-get install -y dataset-fashion-mnist
    task = get_task("moving-digits")                         # seeded videos of bouncing sklearn digits
    task = get_task("movielens-100k")                        # 100k star ratings (cached download; kind "rating")
    texts, labels = task.split("train")
    for inputs, targets in task.batches("train", tokenizer=tok, batch_size=32): ...
    task.evaluate(model, "test", tokenizer=tok)              # {"accuracy", "loss", "n"}

Every task has ``name``, ``kind`` (``"text"`` or ``"image"``), ``num_classes``, ``classes`` (names) and
fixed, seeded train/val/test splits.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from ..errors import ParticlizeError
from .base import SPLITS, DataError, Task, cache_dir, stratified_split
from .fashion_mnist import load_fashion_mnist
from .movielens import RatingTask, load_movielens
from .moving_digits import moving_digits
from .text_csv import load_text_csv
from .vader import load_vader

TASKS: dict[str, Callable[..., Task]] = {
    "vader-sentiment": load_vader,
    "text-csv": load_text_csv,
    "fashion-mnist": load_fashion_mnist,
    "moving-digits": moving_digits,
    "movielens-100k": load_movielens,
}


def get_task(name: str, **kwargs: Any) -> Task:
    """Build the task registered as ``name`` (see `TASKS`); ``kwargs`` go to its loader."""
    try:
        factory = TASKS[name]
    except KeyError:
        raise ParticlizeError(f"unknown task {name!r}; available: {', '.join(TASKS)}") from None
    sig = inspect.signature(factory)
    try:
        sig.bind(**kwargs)
    except TypeError as e:
        params = sig.parameters.values()
        options = ", ".join(p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in params)
        raise ParticlizeError(f"task {name!r}: {e}; its options are: {options}") from None
    return factory(**kwargs)


__all__ = ["DataError", "RatingTask", "SPLITS", "TASKS", "Task", "cache_dir", "get_task", "stratified_split"]
