"""The recovery settings, defined once: `RecoveryConfig` (what `particlize.recover.recover`, the compress
loop and the CLI's recovery options all read) and the measured defaults per kind of task."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ParticlizeError

# Recovering a pruned classifier by distillation (compress): chosen by measurement on MiniLM, 3 seeds at 25% of
# the FLOPs (benchmarks/RESULTS.md, session 8): lr 1.5e-4 and the layer-wise term at weight 5 took test accuracy
# from 0.839 (5e-5, outputs only) to 0.856, and helped at 50% and 12.5% too. Images keep their training lr; video
# DiTs (`particlize.recover.dit.distill_dit`) keep the layer-wise term off: it cost sora-tiny 7 points of sample accuracy.
RECOVER_LR = {"text": 1.5e-4, "image": 1e-3, "video": 3e-4}
RECOVER_HIDDEN_WEIGHT = {"text": 5.0, "image": 0.0, "video": 0.0}


@dataclass
class RecoveryConfig:
    """How a pruned model is recovered by distillation from the original, per round and after the last one.

    ``epochs`` per round (fractional: part of a pass); ``final_epochs`` more after the last round, in chunks of
    ``epochs`` (warm restarts); ``lr`` / ``hidden_weight`` None take `RECOVER_LR` / `RECOVER_HIDDEN_WEIGHT` of
    the task's kind; ``kd_alpha`` and ``temperature`` weigh and soften the KL to the teacher's outputs;
    ``val_every`` (a fraction of an epoch) and ``patience`` drive early stopping on validation accuracy;
    ``focus=(lo, hi)`` spends half of each video-diffusion batch at those diffusion steps."""

    epochs: float = 1
    final_epochs: float = 0
    lr: float | None = None
    kd_alpha: float = 0.5
    temperature: float = 2.0
    hidden_weight: float | None = None  # layer-wise distillation weight (blocks' output MSE); None: the task's default
    val_every: float | None = None  # validate every this fraction of an epoch (early stopping part-way)
    patience: int = 1  # stop after this many validations without a better validation accuracy
    focus: tuple[int, int] | None = None  # video diffusion: half of each batch at diffusion steps lo..hi

    def check(self) -> None:
        """Raise `ParticlizeError` for a setting out of range (named as the compress option that sets it)."""
        if self.epochs < 0:
            raise ParticlizeError(f"recover_epochs must be 0 or more, got {self.epochs}")
        if self.final_epochs < 0:
            raise ParticlizeError(f"final_recover_epochs must be 0 or more, got {self.final_epochs}")
        if self.hidden_weight is not None and self.hidden_weight < 0:
            raise ParticlizeError(f"hidden_weight must be 0 or more, got {self.hidden_weight}")
        if self.val_every is not None and not 0.0 < self.val_every <= 1.0:
            raise ParticlizeError(f"val_every is a fraction of an epoch in (0, 1], got {self.val_every}")
        if self.patience < 1:
            raise ParticlizeError(f"patience counts validations: 1 or more, got {self.patience}")
        if self.focus is not None and not (len(self.focus) == 2 and 0 <= self.focus[0] <= self.focus[1]):
            raise ParticlizeError(f"recover_focus is a window of diffusion steps (lo, hi) with 0 <= lo <= hi, got {self.focus}")

    def settings_for(self, kind: str) -> tuple[float, float]:
        """``(lr, hidden_weight)`` for a task of kind ``kind``: set values as they are, unset ones from the tables."""
        return recovery_settings(kind, self.lr, self.hidden_weight)


def recovery_settings(kind: str, lr: float | None, hidden_weight: float | None) -> tuple[float, float]:
    """``(lr, hidden_weight)`` for recovering a model of task kind ``kind``: given values as they are,
    unset ones from `RECOVER_LR` / `RECOVER_HIDDEN_WEIGHT`."""
    return (RECOVER_LR[kind] if lr is None else lr,
            RECOVER_HIDDEN_WEIGHT[kind] if hidden_weight is None else hidden_weight)


__all__ = ["RECOVER_HIDDEN_WEIGHT", "RECOVER_LR", "RecoveryConfig", "recovery_settings"]
