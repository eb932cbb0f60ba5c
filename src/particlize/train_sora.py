"""Train the reference spacetime DiT (`particlize.models.sora`) on the moving-digits task.

    from particlize.train_sora import train_sora
    folder = train_sora("tiny", steps=2000, out="runs/sora-tiny")    # a pz.save folder of the EMA weights

Epsilon-prediction training with AdamW, linear warm-up then cosine decay, gradient clipping, label
dropout for classifier-free guidance and an exponential moving average (EMA) of the weights, which is
what gets saved. Checkpoints (``out/checkpoint``: EMA + raw weights as safetensors) are written every
``checkpoint_every`` steps; a run restarted with the same arguments resumes from there. The finished
``out`` is a `particlize.save` folder (``pz.load(out)``) whose metadata says how it was trained.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import ParticlizeError
from .io import save, write_folder_atomically
from .models.sora import GUIDANCE, PRESETS, sora
from .tasks.moving_digits import eps_mse, moving_digits

Progress = Callable[[int, int, float], None]


def _machine() -> str:
    return f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads, torch {torch.__version__}".strip()


def _draw(model: Any, stream: Any, gen: torch.Generator, batch_size: int, device: Any) -> tuple:
    """The next training batch: clean videos, labels (dropped to the null label at the configured rate,
    and for two-digit videos), steps and noise, on ``device``."""
    cfg = model.config
    x0, y = next(stream)
    t = torch.randint(0, model.diffusion.steps, (batch_size,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    drop = torch.rand(batch_size, generator=gen) < cfg.class_dropout
    y = torch.where(drop | (y >= cfg.num_classes), model.null_label, y)
    return x0.to(device), y.to(device), t.to(device), noise.to(device)


def _ema_step(average: list[torch.Tensor], params: list[torch.Tensor], ema: float, step: int) -> None:
    """Move ``average`` towards ``params`` after optimizer step ``step``: decay ``ema``, warmed up as
    ``(1 + step) / (10 + step)`` so that the first steps are not averaged with the starting weights."""
    decay = min(ema, (1 + step) / (10 + step))
    with torch.no_grad():
        for a, p in zip(average, params):
            a.lerp_(p, 1 - decay)


def _save_checkpoint(path: Path, model, ema, opt, step: int, losses: list[float], seconds: float) -> None:
    def fill(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(tmp / "ema.safetensors"))
        torch.save(opt.state_dict(), tmp / "optimizer.pt")  # our own file, only reloaded by us
        (tmp / "state.json").write_text(json.dumps({"step": step, "losses": losses, "seconds": seconds}))

    write_folder_atomically(path, fill, force=True)


def train_sora(
    preset: str = "tiny",
    steps: int = 2000,
    out: str | Path = "runs/sora-tiny",
    *,
    batch_size: int = 16,
    lr: float = 6e-4,
    warmup: int = 100,
    ema: float = 0.999,
    min_snr_gamma: float | None = 5.0,
    seed: int = 0,
    two_digit_fraction: float = 0.0,
    checkpoint_every: int = 250,
    max_seconds: float | None = None,
    device: str = "cpu",
    progress: Progress | bool | None = None,
    force: bool = False,
    init: str | Path | None = None,
    **overrides: Any,
) -> Path:
    """Train a `SpacetimeDiT` preset on moving digits and save its EMA weights to ``out`` (returned).

    ``progress`` is a callback ``(step, steps, loss)``, ``True`` for a Rich progress bar, or None
    (quiet). ``max_seconds`` stops early (the run is saved as it is and says so in its metadata).
    ``init`` continues from a trained model folder of the same configuration (its weights start both
    the model and its EMA; the schedule, optimizer and data stream start afresh).
    ``min_snr_gamma`` weights each step's loss by ``min(snr, gamma) / snr`` (Min-SNR; None: plain MSE).
    ``overrides`` change preset fields (``dim=64``, ``frames=16`` ...).
    """
    if preset not in PRESETS:
        raise ParticlizeError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    out = Path(out)
    if out.exists() and (out / "particlize.json").exists() and not force:
        raise ParticlizeError(f"{out} already holds a trained model; pass force=True (CLI: --force) to replace it")
    torch.manual_seed(seed)
    model = sora(preset, **overrides).to(device)
    if init is not None:
        from .io import load

        start_from = load(init)
        if not isinstance(start_from, type(model)) or start_from.config != model.config:
            raise ParticlizeError(f"{init} is not a {preset!r} SpacetimeDiT with these settings; it cannot start this run")
        model.load_state_dict(start_from.state_dict())
    cfg = model.config
    ema_model = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    task = moving_digits(seed=seed, n_train=8, n_eval=64, frames=cfg.frames, size=cfg.size)
    stream = task.stream(batch_size, seed=seed, two_digit_fraction=two_digit_fraction)
    gen = torch.Generator().manual_seed(seed + 1)
    ckpt = out / "checkpoint"
    start, losses, before = 0, [], 0.0  # before: seconds trained by earlier (resumed) runs
    if (ckpt / "state.json").is_file():  # resume
        state = json.loads((ckpt / "state.json").read_text())
        start, losses, before = state["step"], state["losses"], state.get("seconds", 0.0)
        model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
        ema_model.load_state_dict(load_file(str(ckpt / "ema.safetensors")))
        opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        for _ in range(start):  # replay the data and noise streams to stay deterministic
            next(stream)
            torch.randint(0, 1000, (batch_size,), generator=gen)
            torch.randn((batch_size, cfg.in_channels, cfg.frames, cfg.size, cfg.size), generator=gen)
            torch.rand(batch_size, generator=gen)

    bar = None
    if progress is True:
        from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

        bar = RichProgress(TextColumn("train-sora"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                           TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn())
        bar_task = bar.add_task("train", total=steps, completed=start, loss=float("nan"))
        bar.start()
    t0 = time.time()
    stopped_early = False
    params, ema_params = list(model.parameters()), list(ema_model.parameters())
    model.train()
    try:
        for step in range(start, steps):
            # the noise draws in _draw must match the replay order above
            x0, y, t, noise = _draw(model, stream, gen, batch_size, device)
            frac = min(1.0, (step + 1) / max(warmup, 1))
            cos = 0.5 * (1 + math.cos(math.pi * step / max(steps, 1)))
            for g in opt.param_groups:
                g["lr"] = lr * frac * (0.1 + 0.9 * cos)
            pred = model(model.diffusion.add_noise(x0, t, noise), t, y)
            loss = model.weighted_mse(pred, noise, t, min_snr_gamma)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            _ema_step(ema_params, params, ema, step)
            losses.append(round(loss.item(), 5))
            if callable(progress) and progress is not True:
                progress(step + 1, steps, loss.item())
            if bar is not None:
                bar.update(bar_task, completed=step + 1, loss=sum(losses[-50:]) / len(losses[-50:]))
            if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                _save_checkpoint(ckpt, model, ema_model, opt, step + 1, losses, before + time.time() - t0)
            if max_seconds is not None and time.time() - t0 > max_seconds:
                stopped_early = step + 1 < steps
                break
    finally:
        if bar is not None:
            bar.stop()
    seconds = before + time.time() - t0
    videos, labels = task.split("test")
    held_out = eps_mse(ema_model, videos * 2 - 1, labels)
    done = len(losses)
    extra = {
        "trained_by": "particlize.train_sora.train_sora",
        "command": " ".join(sys.argv) if sys.argv and sys.argv[0] else "",
        "call": {"preset": preset, "steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup,
                 "ema": ema, "min_snr_gamma": min_snr_gamma, "seed": seed, "init": str(init) if init else None,
                 "two_digit_fraction": two_digit_fraction, "overrides": overrides},
        "steps_done": done,
        "stopped_early": stopped_early,
        "resumed_from_step": start,
        "seconds": round(seconds, 1),
        "machine": _machine(),
        "final_loss": round(sum(losses[-100:]) / max(len(losses[-100:]), 1), 5),
        "eps_mse_test": round(held_out, 5),
        "loss_every_50": [round(sum(losses[i:i + 50]) / len(losses[i:i + 50]), 5) for i in range(0, done, 50)],
    }
    # the finished run folder is a plain pz.save folder (the resume checkpoint is no longer needed)
    return save(ema_model.cpu(), out, force=True, extra=extra)


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
    guidance: float | None = GUIDANCE,
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

    With ``guidance`` (default: the sampler's), every labelled row is also run unconditionally and the
    teacher term covers the conditional and unconditional predictions and, divided by ``guidance``, the
    guided one ``eps_u + guidance * (eps_c - eps_u)``. Sampling depends on the conditional -
    unconditional difference, which plain noise-prediction distillation leaves loose, and guidance
    multiplies its error. ``guidance=None`` and ``trajectory_fraction=0`` give plain distillation.
    ``hidden_weight`` adds that times the mean squared difference between each kept block's output and
    that of the teacher block it came from, over every row (layer-wise distillation, as for classifiers:
    `particlize.train.train_classifier`).
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
        return torch.stack([x for x, _ in states]), torch.tensor([t for _, t in states], device=device)

    if n_traj:
        teacher_x, pool_t = visited(teacher, seed + 7)
        pool_x, pool_y = teacher_x, pool_labels.to(device)
    n_focus_fresh = round(n_fresh * focus_share) if focus else 0
    n_focus_traj = round(n_traj * focus_share) if focus else 0
    if n_focus_traj:
        in_focus = ((pool_t >= focus[0]) & (pool_t <= focus[1])).nonzero().squeeze(1)
        if not len(in_focus):
            raise ValueError(f"no step of the {sampler_steps}-step sampler falls in focus {focus}; widen it")
    refresh = math.ceil(steps / on_policy) if on_policy and n_traj else 0
    both_labels = pool_labels.repeat(2).to(device)  # labels of the teacher's and the student's draws, side by side
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    losses: list[float] = []
    student.train()
    params = list(student.parameters())
    averaged = [p.detach().clone() for p in params] if ema else []
    from .train import _layer_distillation

    layers = _layer_distillation(teacher, student) if hidden_weight else contextlib.nullcontext(None)
    try:
        with layers as hidden_loss:
            for step in range(steps):
                if refresh and step % refresh == 0:  # same sampler, same steps: pool_t is unchanged
                    student_x, _ = visited(student, seed + 11 + step)
                    pool_x = torch.cat([teacher_x, student_x], dim=1)
                    pool_y = both_labels
                x0, y, t, noise = _draw(student, stream, gen, n_fresh, device)
                if n_focus_fresh:
                    t[:n_focus_fresh] = torch.randint(focus[0], focus[1] + 1, (n_focus_fresh,), generator=gen).to(device)
                xt = student.diffusion.add_noise(x0, t, noise)
                if n_traj:
                    si = torch.randint(0, pool_x.shape[0], (n_traj,), generator=gen).to(device)
                    if n_focus_traj:
                        pick = torch.randint(0, len(in_focus), (n_focus_traj,), generator=gen).to(device)
                        si[:n_focus_traj] = in_focus[pick]
                    vi = torch.randint(0, pool_x.shape[1], (n_traj,), generator=gen).to(device)
                    xt, t, y = torch.cat([xt, pool_x[si, vi]]), torch.cat([t, pool_t[si]]), torch.cat([y, pool_y[vi]])
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
                    _ema_step(averaged, params, ema, step)
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


def _main(argv: list[str] | None = None) -> None:
    """``python -m particlize.train_sora --preset tiny --steps N --out DIR [--threads K]`` (the CLI's
    ``particlize train-sora`` does the same)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m particlize.train_sora")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--out", default="runs/sora-tiny")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-snr-gamma", type=float, default=5.0, help="0 turns the weighting off")
    ap.add_argument("--max-seconds", type=float, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--init", default=None, help="continue from this trained model folder")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()

    def log(step: int, steps: int, loss: float) -> None:  # plain lines when not on a terminal (nohup, CI)
        if step % 25 == 0 or step == steps:
            print(f"step {step}/{steps} loss {loss:.4f} {time.time() - t0:.0f}s", flush=True)

    progress = True if sys.stdout.isatty() else log
    out = train_sora(a.preset, a.steps, a.out, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                     min_snr_gamma=a.min_snr_gamma or None, init=a.init,
                     max_seconds=a.max_seconds, device=a.device, progress=progress, force=a.force)
    print(json.dumps(json.loads((out / "particlize.json").read_text())["extra"], indent=1)[:2000])


if __name__ == "__main__":
    _main()
