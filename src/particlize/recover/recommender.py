"""Training and recovering rating predictors (task kind ``"rating"``, `particlize.tasks.movielens.RatingTask`).

`train_recommender` minimises the squared error to the star ratings of the training split (Adam, with L2
on the embedding rows each batch looks up, as in classic matrix factorisation), validates RMSE every
epoch and keeps the best epoch's weights (early stopping). Given a ``teacher`` it distils too: the loss
is ``(1 - kd_alpha) * MSE(pred, rating) + kd_alpha * MSE(pred, teacher's pred)`` — regression has no
temperature. `recover_recommender` is that with a pruned student and its original as the teacher.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ParticlizeError
from ..tasks.base import model_device, to_device
from ..tasks.movielens import RatingTask
from .config import RecoveryConfig

Progress = Callable[[int, int, dict], None]
TRAIN_LR = 5e-3
RECOVER_LR = 1e-3
EMBEDDING_L2 = 0.05  # per looked-up embedding row and batch element; chosen on ML-100K validation RMSE
WEIGHT_DECAY = 1e-3  # Adam L2 on the other parameters (the MLP tower), idem


def _row_l2(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over embedding tables of the mean squared norm of the rows a batch looks up: tables whose name
    starts with ``user`` are looked up by ``users``, the others by ``items`` (the naming of
    `particlize.models.recommender`)."""
    total = torch.zeros(())
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding):
            ids = inputs["users"] if name.startswith("user") else inputs["items"]
            total = total + mod(ids).pow(2).sum(-1).mean()
    return total


def train_recommender(model: nn.Module, task: RatingTask, *, epochs: float = 20, lr: float = TRAIN_LR,
                      batch_size: int = 256, l2: float = EMBEDDING_L2, weight_decay: float = WEIGHT_DECAY, seed: int = 0,
                      limit: int | None = None,
                      teacher: nn.Module | None = None, kd_alpha: float = 0.5, patience: int = 3,
                      progress: Progress | None = None) -> dict[str, Any]:
    """Train ``model`` in place on ``task``'s training ratings (``epochs`` may be fractional); restore the
    weights of the epoch with the best validation RMSE. ``l2`` weighs the squared norm of the embedding rows each
    batch looks up, ``weight_decay`` (Adam's L2) the other parameters. Returns the history (per-epoch val RMSE,
    steps, seconds)."""
    if epochs <= 0:
        return {"epochs": [], "epochs_run": 0.0, "steps": 0, "best_epoch": 0, "seconds": 0.0}
    if not 0.0 <= kd_alpha <= 1.0:
        raise ParticlizeError(f"kd_alpha weighs distillation against the rating loss: in [0, 1], got {kd_alpha}")
    torch.manual_seed(seed)
    emb = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    rest = [p for p in model.parameters() if id(p) not in emb]
    opt = torch.optim.Adam([{"params": [p for p in model.parameters() if id(p) in emb]},
                            {"params": rest, "weight_decay": weight_decay}], lr=lr)
    alpha = kd_alpha if teacher is not None else 0.0
    if teacher is not None:
        teacher.eval()
    n_epochs = math.ceil(epochs)
    steps_total = 0
    per_epoch = math.ceil(min(task.sizes()["train"], limit or 10**12) / batch_size)
    total = math.ceil(epochs * per_epoch)
    best = (math.inf, 0, copy.deepcopy(model.state_dict()))
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    bad = 0
    device = model_device(model)
    for ep in range(n_epochs):
        model.train()
        for inputs, y in task.batches("train", batch_size=batch_size, limit=limit, shuffle=True, seed=seed * 1000 + ep):
            if steps_total >= total:
                break
            inputs, y = to_device(inputs, device), y.to(device)  # batches follow the model
            pred = model(**inputs)
            loss = F.mse_loss(pred, y)
            if alpha > 0:
                with torch.no_grad():
                    ref = teacher(**inputs)  # type: ignore[misc]
                loss = (1 - alpha) * loss + alpha * F.mse_loss(pred, ref)
            if l2 > 0:
                loss = loss + l2 * _row_l2(model, inputs)
            if not torch.isfinite(loss):
                raise ParticlizeError(f"the training loss became {float(loss)} at step {steps_total}; lower the lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps_total += 1
            if progress is not None:
                progress(steps_total, total, {"epoch": ep + 1, "loss": float(loss.detach())})
        val = task.evaluate(model, "val", limit=limit)
        history.append({"epoch": ep + 1, "val_rmse": val["rmse"], "val_hr@10": val["hr@10"]})
        if val["rmse"] < best[0]:
            best, bad = (val["rmse"], ep + 1, copy.deepcopy(model.state_dict())), 0
        else:
            bad += 1
            if bad >= patience:
                break
    model.load_state_dict(best[2])
    model.eval()
    return {"epochs": history, "epochs_run": round(min(steps_total / per_epoch, epochs), 4), "steps": steps_total,
            "best_epoch": best[1], "seconds": round(time.perf_counter() - t0, 2)}


def recover_recommender(student: nn.Module, teacher: nn.Module, task: RatingTask, cfg: RecoveryConfig, *,
                        tokenizer: Any = None, batch_size: int = 256, max_length: int | None = None,
                        limit: int | None = None, seed: int = 0, progress: Progress | None = None) -> dict[str, Any]:
    """Fine-tune a pruned rating model ``student`` in place for ``cfg.epochs``: squared error to the ratings
    and to ``teacher``'s predictions (weight ``cfg.kd_alpha``), lr ``cfg.lr`` (default 1e-3), best validation
    RMSE kept. Fits `particlize.recover.Recoverer`."""
    lr = RECOVER_LR if cfg.lr is None else cfg.lr
    hist = train_recommender(student, task, epochs=cfg.epochs, lr=lr, batch_size=max(batch_size, 256), seed=seed,
                             limit=limit, teacher=teacher, kd_alpha=cfg.kd_alpha, patience=cfg.patience,
                             progress=progress)
    return {"epochs": hist["epochs_run"], "steps": hist["steps"], "best_epoch": hist["best_epoch"],
            "validations": len(hist["epochs"]), "seconds": hist["seconds"]}


__all__ = ["RECOVER_LR", "TRAIN_LR", "recover_recommender", "train_recommender"]
