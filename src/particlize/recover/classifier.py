"""Training a classifier, and recovering a pruned one by distillation from the original.

`train_classifier` is a plain, deterministic loop: AdamW, linear warmup then linear decay, gradient
clipping, one validation pass per epoch, and the weights of the best validation accuracy restored at
the end; with a ``teacher`` it distils (KL on the logits, optionally the blocks' outputs too). It prints
nothing; pass ``progress`` to watch it (the CLI drives a Rich bar with it). `recover_classifier` is what
`particlize.recover.recover` runs for text and image tasks.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ParticlizeError
from ..tasks import Task
from ..tasks.base import logits_of, model_device, to_device
from .config import RecoveryConfig
from .layers import layer_distillation

Progress = Callable[[int, int, dict[str, Any]], None]
DEFAULT_LR = {"text": 5e-5, "image": 1e-3}


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then linear decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def train_classifier(
    model: nn.Module,
    task: Task,
    *,
    tokenizer: Any = None,
    epochs: float = 2,
    lr: float | None = None,
    batch_size: int = 32,
    max_length: int | None = 64,
    seed: int = 0,
    progress: Progress | None = None,
    limit: int | None = None,
    weight_decay: float = 0.01,
    warmup: float = 0.1,
    max_grad_norm: float = 1.0,
    teacher: nn.Module | None = None,
    kd_alpha: float = 0.5,
    temperature: float = 2.0,
    hidden_weight: float = 0.0,
    patience: int | None = None,
    val_every: float | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``task``'s train split, validate each epoch, keep the best-val-accuracy weights.

    ``epochs`` may be fractional (``0.5``: half a shuffled pass, then validation). ``lr`` defaults to 5e-5
    for text and 1e-3 for images. ``limit`` caps the train and val splits (their
    first examples) for quick runs. Deterministic for a given ``seed`` (dropout, shuffling) on one device.
    ``progress(step, total, info)`` is called after every optimisation step (``info``: epoch, loss, lr)
    and after each validation (``info`` adds val_accuracy, val_loss). Returns the history::

        {"epochs": [{"epoch", "train_loss", "val_accuracy", "val_loss", "seconds"}, ...],
         "best_epoch", "best_val_accuracy", "steps", "lr", "seed", "seconds"}

    With a ``teacher`` (recovery after pruning) the loss is ``(1 - kd_alpha) * cross-entropy +
    kd_alpha * T² * KL(teacher ‖ student)`` at temperature ``T`` (Hinton et al.), plus ``hidden_weight`` times
    the mean squared difference between every block's output and that of the teacher's block it came
    from (layer-wise distillation as in CoFi / TinyBERT; padding excluded; blocks matched through the
    pruning plans by `particlize.surgery.block_correspondence`). ``patience`` stops after
    that many validations without a better validation accuracy. ``val_every`` (a fraction of an epoch,
    e.g. 0.1) validates that often as well as at each epoch's end, so early stopping can end a one-epoch
    recovery part-way; each validation is one entry of ``epochs`` (its ``epoch``: epochs trained so far).
    A non-finite loss raises `ParticlizeError` at once (the caller rolls back). The model is left in eval mode with the best epoch's weights.
    """
    if not epochs > 0:
        raise ParticlizeError(f"epochs must be positive, got {epochs}")
    if task.kind == "text" and tokenizer is None:
        raise ParticlizeError(f"task {task.name!r} is text: pass tokenizer=... to train on it")
    lr = DEFAULT_LR[task.kind] if lr is None else lr
    device = model_device(model)
    torch.manual_seed(seed)
    batches_per_epoch = math.ceil(min(task.sizes()["train"], math.inf if limit is None else limit) / batch_size)
    if batches_per_epoch == 0:
        raise ParticlizeError(f"task {task.name!r} has no training examples (limit={limit})")
    total = max(1, math.ceil(epochs * batches_per_epoch))  # a fractional epoch stops part-way (recovery rounds)
    warmup_steps = int(warmup * total)

    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)  # no weight decay on biases and norms
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total, warmup_steps))

    history: dict[str, Any] = {"epochs": [], "best_epoch": 0, "best_val_accuracy": -1.0, "steps": total,
                               "lr": lr, "seed": seed, "batch_size": batch_size, "max_length": max_length}
    best_state: dict[str, torch.Tensor] | None = None
    step, t0 = 0, time.perf_counter()
    layers = contextlib.nullcontext(None) if teacher is None or not hidden_weight else layer_distillation(teacher, model)
    if val_every is not None and not val_every > 0:
        raise ParticlizeError(f"val_every is a positive fraction of an epoch, got {val_every}")
    every = max(1, round(val_every * batches_per_epoch)) if val_every else None

    def validate(epoch: int, loss_sum: float, n_seen: int, te: float) -> bool:
        """Validate, keep the best weights; True when early stopping says stop."""
        nonlocal best_state
        val = task.evaluate(model, "val", tokenizer=tokenizer, batch_size=max(64, batch_size), limit=limit,
                            max_length=max_length)
        done = step / batches_per_epoch if every else epoch
        record = {"epoch": done, "train_loss": loss_sum / max(1, n_seen), "val_accuracy": val["accuracy"],
                  "val_loss": val["loss"], "seconds": time.perf_counter() - te}
        history["epochs"].append(record)
        if val["accuracy"] > history["best_val_accuracy"]:
            history["best_epoch"], history["best_val_accuracy"] = len(history["epochs"]), val["accuracy"]
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if progress is not None:
            progress(step, total, {"epoch": epoch, "loss": record["train_loss"], "val_accuracy": val["accuracy"],
                                   "val_loss": val["loss"]})
        model.train()
        return patience is not None and len(history["epochs"]) - history["best_epoch"] >= patience

    stop = False
    with layers as hidden_loss:
        for epoch in range(1, math.ceil(total / batches_per_epoch) + 1):
            te = time.perf_counter()
            model.train()
            loss_sum, n_seen, checked = 0.0, 0, -1
            for inputs, y in task.batches("train", tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                                          limit=limit, shuffle=True, seed=seed * 1000 + epoch):
                if step == total:  # the last epoch of a fractional count ends early
                    break
                inputs, y = to_device(inputs, device), y.to(device)
                loss = _loss(model, inputs, y, teacher, kd_alpha, temperature)
                if hidden_loss is not None:  # the forwards above filled the block outputs it compares
                    loss = loss + hidden_weight * hidden_loss(inputs)
                if not torch.isfinite(loss):
                    raise ParticlizeError(f"non-finite training loss ({loss.item()}) at epoch {epoch}, step {step + 1}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                opt.step()
                sched.step()
                step += 1
                loss_sum += loss.item() * len(y)
                n_seen += len(y)
                if progress is not None:
                    progress(step, total, {"epoch": epoch, "loss": loss.item(), "lr": sched.get_last_lr()[0]})
                if every and step % every == 0 and step < total:
                    checked = step
                    if validate(epoch, loss_sum, n_seen, te):
                        stop = True
                        break
            if stop or (checked != step and validate(epoch, loss_sum, n_seen, te)):
                break
    if best_state is not None and history["best_epoch"] != len(history["epochs"]):
        model.load_state_dict(best_state)
    history["seconds"] = time.perf_counter() - t0
    history["epochs_run"] = step / batches_per_epoch
    model.eval()
    return history


def _loss(model: nn.Module, inputs: Any, y: torch.Tensor, teacher: nn.Module | None, kd_alpha: float,
          temperature: float) -> torch.Tensor:
    """Cross-entropy, or with a teacher ``(1 - α) CE + α T² KL(teacher ‖ student)`` at temperature ``T``."""
    logits = logits_of(model, inputs).float()
    loss = F.cross_entropy(logits, y)
    if teacher is None:
        return loss
    with torch.no_grad():
        t_logits = logits_of(teacher, inputs).float()
    kd = F.kl_div(F.log_softmax(logits / temperature, -1), F.log_softmax(t_logits / temperature, -1),
                  log_target=True, reduction="batchmean") * temperature**2
    return (1 - kd_alpha) * loss + kd_alpha * kd


def recover_classifier(student: nn.Module, teacher: nn.Module, task: Task, cfg: RecoveryConfig, *,
                       tokenizer: Any = None, batch_size: int = 32, max_length: int | None = 64, limit: int | None = None,
                       seed: int = 0, progress: Progress | None = None) -> dict[str, Any]:
    """Fine-tune a pruned classifier ``student`` in place by distillation from ``teacher`` for ``cfg.epochs``
    (KL on the outputs plus the task loss, and with ``hidden_weight`` the blocks' outputs too), with early
    stopping on validation accuracy; a summary of the run. Unset ``lr`` / ``hidden_weight`` come from
    `RECOVER_LR` / `RECOVER_HIDDEN_WEIGHT` of the task's kind (text: 1.5e-4 and 5; images: 1e-3 and 0)."""
    lr, hidden_weight = cfg.settings_for(task.kind)
    hist = train_classifier(student, task, tokenizer=tokenizer, epochs=cfg.epochs, lr=lr, batch_size=batch_size,
                            max_length=max_length, seed=seed, limit=limit, teacher=teacher, kd_alpha=cfg.kd_alpha,
                            temperature=cfg.temperature, hidden_weight=hidden_weight, patience=cfg.patience,
                            val_every=cfg.val_every, progress=progress)
    # passes run (early stopping may end sooner), a fraction of one for a fractional budget
    return {"epochs": round(hist["epochs_run"], 4), "steps": hist["steps"], "best_epoch": hist["best_epoch"],
            "validations": len(hist["epochs"]), "seconds": hist["seconds"]}


__all__ = ["DEFAULT_LR", "recover_classifier", "train_classifier"]
