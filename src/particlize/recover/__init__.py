"""Recovery: a pruned model fine-tuned in place by distillation from the original, one function per kind.

    from particlize.recover import RecoveryConfig, recover
    summary = recover(student, teacher, task, RecoveryConfig(epochs=1), tokenizer=tok, batch_size=32)

`recover` dispatches on the task's ``kind`` through `RECOVERERS` (text and image classifiers:
`classifier.recover_classifier`; video diffusion: `dit.recover_dit`; ratings: `recommender.recover_recommender`); `register` adds a kind. Tasks know
data and metrics only; what recovering a model of their kind means lives here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import ParticlizeError
from .classifier import recover_classifier, train_classifier
from .config import RECOVER_HIDDEN_WEIGHT, RECOVER_LR, RecoveryConfig, recovery_settings
from .dit import check_focus, distill_dit, recover_dit
from .recommender import recover_recommender, train_recommender

#: ``(student, teacher, task, cfg, *, tokenizer, batch_size, max_length, limit, seed, progress) -> summary``
Recoverer = Callable[..., dict[str, Any]]
RECOVERERS: dict[str, Recoverer] = {
    "text": recover_classifier, "image": recover_classifier, "video": recover_dit, "rating": recover_recommender,
}


def register(kind: str, recoverer: Recoverer) -> None:
    """Make `recover` use ``recoverer`` for tasks of ``kind``."""
    RECOVERERS[kind] = recoverer


def recover(student: nn.Module, teacher: nn.Module, task: Any, cfg: RecoveryConfig | None = None, *,
            tokenizer: Any = None, batch_size: int = 32, max_length: int | None = 64, limit: int | None = None,
            seed: int = 0, progress: Callable[[int, int, dict], None] | None = None) -> dict[str, Any]:
    """Recover ``student`` (pruned from ``teacher``) in place on ``task`` as ``cfg`` says; a summary of the run.

    ``batch_size``, ``max_length``, ``limit`` (first examples of train/val) and ``seed`` describe the data, as in
    the compress loop; ``progress(step, total, info)`` is called after every optimisation step. A non-finite
    loss raises `ParticlizeError` (the compress loop then keeps the model before it)."""
    try:
        fn = RECOVERERS[task.kind]
    except KeyError:
        raise ParticlizeError(f"no recovery for tasks of kind {task.kind!r}; register one with "
                              f"particlize.recover.register (known: {', '.join(RECOVERERS)})") from None
    return fn(student, teacher, task, cfg or RecoveryConfig(), tokenizer=tokenizer, batch_size=batch_size,
              max_length=max_length, limit=limit, seed=seed, progress=progress)


def check_applicable(cfg: RecoveryConfig, task: Any, model: nn.Module) -> None:
    """Refuse settings that cannot apply to ``task`` / ``model`` (a diffusion ``focus`` elsewhere) before any round runs."""
    check_focus(cfg.focus, task, model)


__all__ = [
    "RECOVERERS", "RECOVER_HIDDEN_WEIGHT", "RECOVER_LR", "Recoverer", "RecoveryConfig", "check_applicable",
    "distill_dit", "recover", "recover_classifier", "recover_dit", "recover_recommender", "recovery_settings", "register", "train_classifier",
    "train_recommender",
]
