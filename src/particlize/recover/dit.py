"""Recovering a pruned video diffusion transformer (`particlize.models.sora.SpacetimeDiT`) by distillation.

`distill_dit` trains the student on fresh noised videos and on the states the teacher's guided sampler
visits, against the teacher's noise predictions (guidance-aware); `recover_dit` is what
`particlize.recover.recover` runs for video tasks, and `check_focus` refuses a ``focus`` window that cannot
apply before any round runs. `draw_batch` and `ema_step` are shared with training from scratch
(`particlize.train_sora`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from ..errors import ParticlizeError
from ..models.sora_sampler import frame_noise, guidance_of
from .config import RecoveryConfig
from .layers import layer_distillation


def draw_batch(model: Any, stream: Any, gen: torch.Generator, batch_size: int, device: Any) -> tuple:
    """The next training batch: clean videos, labels (dropped to the null label at the configured rate,
    and for two-digit videos), steps and noise, on ``device``. With ``config.frame_steps`` > 0 the steps are
    ``[B, T']``: that share of the videos draws a step per temporal token (diffusion forcing), the rest one
    step for all (drawn after the rest, so the other draws are those of a model without it)."""
    cfg = model.config
    x0, y = next(stream)
    t = torch.randint(0, model.diffusion.steps, (batch_size,), generator=gen)
    noise = frame_noise(x0.shape, gen, getattr(cfg, "frame_corr", 0.0))
    drop = torch.rand(batch_size, generator=gen) < cfg.class_dropout
    y = torch.where(drop | (y >= cfg.num_classes), model.null_label, y)
    share = getattr(cfg, "frame_steps", 0.0)
    if share:
        own = torch.rand(batch_size, generator=gen) < share
        t = torch.where(own[:, None], torch.randint(0, model.diffusion.steps, (batch_size, model.grid[0]), generator=gen),
                        t[:, None])
    return x0.to(device), y.to(device), t.to(device), noise.to(device)


def per_token_steps(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two batches of steps made stackable: ``[n]`` ones widened to ``[n, T']`` when the other is per token."""
    if a.ndim == b.ndim:
        return a, b
    return (a[:, None].expand(-1, b.shape[1]), b) if a.ndim == 1 else (a, b[:, None].expand(-1, a.shape[1]))


def ema_step(average: list[torch.Tensor], params: list[torch.Tensor], ema: float, step: int) -> None:
    """Move ``average`` towards ``params`` after optimizer step ``step``: decay ``ema``, warmed up as
    ``(1 + step) / (10 + step)`` so that the first steps are not averaged with the starting weights."""
    decay = min(ema, (1 + step) / (10 + step))
    with torch.no_grad():
        for a, p in zip(average, params):
            a.lerp_(p, 1 - decay)


def distill_dit(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    task: Any,
    *,
    steps: int,
    lr: float = 3e-4,
    batch_size: int = 16,
    seed: int = 0,
    alpha: float = 0.5,
    min_snr_gamma: float | None = 5.0,
    guidance: float | Literal["teacher"] | None = "teacher",
    trajectory_fraction: float = 0.5,
    trajectory_videos: int = 64,
    sampler_steps: int = 50,
    hidden_weight: float = 0.0,
    on_policy: int = 0,
    ema: float = 0.0,
    focus: tuple[int, int] | None = None,
    focus_share: float = 0.5,
    progress: Callable[[int, int, dict], None] | None = None,
) -> dict[str, Any]:
    """Recover a pruned `SpacetimeDiT` in place by distillation from the original ``teacher``.

    Each step's batch mixes fresh moving-digit videos noised at random steps (``task.stream``; labels
    dropped as in training) with, for ``trajectory_fraction`` of its rows, noisy videos the teacher's
    own guided DDIM sampler visits (``trajectory_videos`` videos of every class, ``sampler_steps``
    steps, drawn once): the states the compressed model will meet when it samples. The loss is
    ``alpha`` times the Min-SNR-weighted MSE to the teacher's noise prediction plus ``1 - alpha`` times
    the MSE to the true noise (fresh rows only).

    With ``guidance`` (default ``"teacher"``: the scale the teacher samples at, its ``config.guidance``), every
    labelled row is also run unconditionally and the teacher term covers the conditional and unconditional
    predictions and, divided by ``guidance``, the guided one ``eps_u + guidance * (eps_c - eps_u)``. Sampling
    depends on the conditional - unconditional difference, which plain noise-prediction distillation leaves loose,
    and guidance multiplies its error. ``guidance=None`` and ``trajectory_fraction=0`` give plain distillation.
    ``hidden_weight`` adds that times the mean squared difference between each kept block's output and
    that of the teacher block it came from, over every row (layer-wise distillation, as for classifiers:
    `particlize.recover.classifier.train_classifier`).
    ``on_policy`` > 0 adds, that many times over the run (from the first step on), the states the
    *student's* own guided sampler visits to the trajectory pool (the same number of videos, replacing
    the previous student draw): the teacher's targets on the states where the student's errors have
    taken it, not only those the teacher would visit (DAgger-style; off by default).
    ``ema`` > 0 keeps an exponential moving average of the student's weights (decay ``ema``, warmed
    up as in training) and leaves the student with it at the end, as `train_sora` ships EMA weights.
    ``focus=(lo, hi)`` spends ``focus_share`` of the fresh rows and of the trajectory rows of every batch on
    diffusion steps ``lo <= t <= hi`` (the rest stay spread over all steps): the noise levels where a
    compressed model's samples lose what the teacher's keep, as found by sampling with the teacher for
    some steps and the student for the others (``benchmarks/sora_handoff.py``; for ``sora-tiny``, the
    middle of the schedule, t ≈ 490–795, SNR 1 to 0.1, where the digit takes its shape).
    Raises `ParticlizeError` if the loss stops being finite (the compress loop then keeps the last good
    round).
    """
    if not 0.0 <= trajectory_fraction < 1.0:
        raise ValueError(f"trajectory_fraction must be in [0, 1), got {trajectory_fraction}")
    if on_policy < 0:
        raise ValueError(f"on_policy must be >= 0, got {on_policy}")
    if not 0.0 <= ema < 1.0:
        raise ValueError(f"ema is a decay in [0, 1) (0: off), got {ema}")
    if focus is not None and not (0 <= focus[0] <= focus[1] < teacher.diffusion.steps and 0.0 < focus_share <= 1.0):
        raise ValueError(f"focus must be steps (lo, hi) with 0 <= lo <= hi < {teacher.diffusion.steps} and focus_share "
                         f"in (0, 1], got {focus} and {focus_share}")
    if isinstance(guidance, str) and guidance != "teacher":
        raise ValueError(f"guidance is a scale (a number), 'teacher' (the teacher's own scale) or None (plain "
                         f"distillation), got {guidance!r}")
    if guidance == "teacher":
        guidance = guidance_of(teacher)
    device = next(student.parameters()).device
    teacher = teacher.eval()
    n_traj = round(batch_size * trajectory_fraction)
    n_fresh = batch_size - n_traj
    stream = task.stream(n_fresh, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    t0 = time.time()
    pool_labels = torch.arange(trajectory_videos) % teacher.config.num_classes

    def visited(model: torch.nn.Module, draw_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The noisy videos ``model``'s guided sampler visits, ``[sampler_steps, videos, C, T, H, W]``, and their steps."""
        states: list[tuple[torch.Tensor, int]] = []
        model.sample(pool_labels, steps=sampler_steps, seed=draw_seed, guidance=guidance or 1.0, trajectory=states)
        return torch.stack([x for x, _ in states]), torch.stack([torch.as_tensor(t) for _, t in states]).to(device)

    if n_traj:
        teacher_x, pool_t = visited(teacher, seed + 7)
        pool_x, pool_y = teacher_x, pool_labels.to(device)
    n_focus_fresh = round(n_fresh * focus_share) if focus else 0
    n_focus_traj = round(n_traj * focus_share) if focus else 0
    if n_focus_traj:
        inside = (pool_t >= focus[0]) & (pool_t <= focus[1])
        in_focus = (inside if inside.ndim == 1 else inside.any(1)).nonzero().squeeze(1)  # staggered: any frame
        if not len(in_focus):
            raise ValueError(f"no step of the {sampler_steps}-step sampler falls in focus {focus}; widen it")
    refresh = math.ceil(steps / on_policy) if on_policy and n_traj else 0
    both_labels = pool_labels.repeat(2).to(device)  # labels of the teacher's and the student's draws, side by side
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    losses: list[float] = []
    student.train()
    params = list(student.parameters())
    averaged = [p.detach().clone() for p in params] if ema else []
    layers = layer_distillation(teacher, student) if hidden_weight else contextlib.nullcontext(None)
    try:
        with layers as hidden_loss:
            for step in range(steps):
                if refresh and step % refresh == 0:  # same sampler, same steps: pool_t is unchanged
                    student_x, _ = visited(student, seed + 11 + step)
                    pool_x = torch.cat([teacher_x, student_x], dim=1)
                    pool_y = both_labels
                x0, y, t, noise = draw_batch(student, stream, gen, n_fresh, device)
                if n_focus_fresh:
                    drawn = torch.randint(focus[0], focus[1] + 1, (n_focus_fresh,), generator=gen).to(device)
                    t[:n_focus_fresh] = drawn if t.ndim == 1 else drawn[:, None]
                xt = student.diffusion.add_noise(x0, t, noise)
                if n_traj:
                    si = torch.randint(0, pool_x.shape[0], (n_traj,), generator=gen).to(device)
                    if n_focus_traj:
                        pick = torch.randint(0, len(in_focus), (n_focus_traj,), generator=gen).to(device)
                        si[:n_focus_traj] = in_focus[pick]
                    vi = torch.randint(0, pool_x.shape[1], (n_traj,), generator=gen).to(device)
                    t, traj_t = per_token_steps(t, pool_t[si])
                    xt, t, y = torch.cat([xt, pool_x[si, vi]]), torch.cat([t, traj_t]), torch.cat([y, pool_y[vi]])
                labelled = (y != student.null_label).nonzero().squeeze(1) if guidance else y[:0]
                n = len(y)
                x_in = torch.cat([xt, xt[labelled]])
                t_in = torch.cat([t, t[labelled]])
                y_in = torch.cat([y, torch.full_like(labelled, student.null_label)])
                with torch.no_grad():
                    target = teacher(x_in, t_in, y_in)
                pred = student(x_in, t_in, y_in)
                kd = student.weighted_mse(pred, target, t_in, min_snr_gamma)
                if len(labelled):
                    def guided(e: torch.Tensor) -> torch.Tensor:
                        return e[n:] + guidance * (e[labelled] - e[n:])

                    kd = kd + student.weighted_mse(guided(pred), guided(target), t[labelled], min_snr_gamma) / guidance
                loss = alpha * kd + (1 - alpha) * student.weighted_mse(pred[:n_fresh], noise, t[:n_fresh], min_snr_gamma)
                if hidden_loss is not None:  # the two forwards above recorded the blocks' outputs
                    loss = loss + hidden_weight * hidden_loss(None)
                if not torch.isfinite(loss):
                    raise ParticlizeError(f"the distillation loss became {loss.item()} at step {step}; lower the learning rate")
                for g in opt.param_groups:
                    g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
                opt.step()
                if averaged:
                    ema_step(averaged, params, ema, step)
                losses.append(loss.item())
                if progress is not None:
                    progress(step + 1, steps, {"loss": sum(losses[-20:]) / len(losses[-20:])})
        if averaged:
            with torch.no_grad():
                for p, a in zip(params, averaged):
                    p.copy_(a)
    finally:
        student.eval()
    return {"steps": steps, "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 5),
            "seconds": round(time.time() - t0, 1)}


def recover_dit(student: nn.Module, teacher: nn.Module, task: Any, cfg: RecoveryConfig, *, tokenizer: Any = None,
                batch_size: int = 32, max_length: int | None = 64, limit: int | None = None, seed: int = 0,
                progress: Callable[[int, int, dict], None] | None = None) -> dict[str, Any]:
    """Distil the pruned denoiser from the original: ``cfg.epochs`` passes' worth of training videos,
    guidance-aware and partly on the original's sampling trajectories (`distill_dit`, with the task's
    ``distill_options``); ``hidden_weight`` adds layer-wise distillation of the blocks' outputs and ``focus``
    spends half of every batch at those diffusion steps. Unset ``lr`` / ``hidden_weight`` come from
    `RECOVER_LR` / `RECOVER_HIDDEN_WEIGHT` (3e-4, 0). ``tokenizer``, ``max_length`` and ``limit`` do not apply."""
    lr, hidden_weight = cfg.settings_for(task.kind)
    steps = max(1, math.ceil(cfg.epochs * -(-task.sizes()["train"] // batch_size)))
    focus = tuple(cfg.focus) if cfg.focus is not None else None
    return distill_dit(student, teacher, task, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                       alpha=cfg.kd_alpha, progress=progress,
                       **{"hidden_weight": hidden_weight, "focus": focus, **getattr(task, "distill_options", {})})


def check_focus(focus: tuple[int, int] | None, task: Any, model: nn.Module) -> None:
    """Refuse a ``focus`` window for a task that is not video diffusion, or outside the model's diffusion steps."""
    if focus is None:
        return
    if task.kind != "video":
        raise ParticlizeError(f"recover_focus is a window of diffusion steps: it applies to video diffusion tasks, not {task.name}")
    steps = getattr(getattr(model, "diffusion", None), "steps", None)
    if steps is not None and focus[1] >= steps:
        raise ParticlizeError(f"recover_focus {tuple(focus)} must lie within the model's diffusion steps 0..{steps - 1}")


__all__ = ["check_focus", "distill_dit", "draw_batch", "ema_step", "recover_dit"]
