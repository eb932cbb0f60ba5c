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

import copy
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import ParticlizeError
from .io import load, save, write_folder_atomically
from .models.sora import PRESETS, TEMPORAL, SoraConfig, SpacetimeDiT, inflate_time, sora
from .recover.dit import draw_batch, ema_step
from .tasks.moving_digits import eps_mse, moving_digits

Progress = Callable[[int, int, float], None]


def _machine() -> str:
    return f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads, torch {torch.__version__}".strip()


def _save_checkpoint(path: Path, model, ema, opt, step: int, losses: list[float], seconds: float) -> None:
    def fill(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(tmp / "ema.safetensors"))
        torch.save(opt.state_dict(), tmp / "optimizer.pt")  # our own file, only reloaded by us
        (tmp / "state.json").write_text(json.dumps({"step": step, "losses": losses, "seconds": seconds}))

    write_folder_atomically(path, fill, force=True)


# settings a model's weights carry across
SAME_WEIGHTS = ("shift", "temporal", "rope", "frame_corr", "frame_steps", "frame_lag", "guidance")
OVERRIDABLE = ("patch", "dim", "depth", "heads", *SAME_WEIGHTS)  # the CLIs' preset overrides


def _adapted(start: SpacetimeDiT, cfg: SoraConfig) -> SpacetimeDiT:
    """``start`` carried over to ``cfg`` when only the temporal patch (a divisor of ``start``'s: `inflate_time`)
    and `SAME_WEIGHTS` settings (noise shift, temporal attention's reach and positions, noise and steps per frame,
    the sampler's lag and guidance) differ; else ``start`` unchanged (a model with rotary positions is not
    inflated)."""
    if {**asdict(start.config), "patch": cfg.patch, **{k: getattr(cfg, k) for k in SAME_WEIGHTS}} != asdict(cfg):
        return start
    if start.config.patch != cfg.patch:
        if start.config.patch[1:] != cfg.patch[1:] or start.config.patch[0] % cfg.patch[0] or start.config.rope:
            return start
        start = inflate_time(start, cfg.patch[0])
    if start.config != cfg:  # same weights, another noise schedule or temporal attention
        moved = SpacetimeDiT(cfg)
        moved.load_state_dict(start.state_dict())
        start = moved
    return start


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
    stop_at: int | None = None,
    device: str = "cpu",
    progress: Progress | bool | None = None,
    force: bool = False,
    init: str | Path | None = None,
    **overrides: Any,
) -> Path:
    """Train a `SpacetimeDiT` preset on moving digits and save its EMA weights to ``out`` (returned).

    ``progress`` is a callback ``(step, steps, loss)``, ``True`` for a Rich progress bar, or None
    (quiet). ``max_seconds`` stops early (the run is saved as it is and says so in its metadata);
    ``stop_at`` stops after that step of the ``steps``-step schedule (a run cut short on purpose, while its
    learning rate is still high: unlike ``max_seconds``, the same on every machine).
    ``init`` continues from a trained model folder of the same configuration (its weights start both
    the model and its EMA; the schedule, optimizer and data stream start afresh), or of one that differs
    only by a coarser temporal patch, which is inflated first (`inflate_time`), and/or by `SAME_WEIGHTS`
    settings (noise shift, temporal attention's reach and rotary positions, the frames' noise correlation, steps
    per frame, sampling lag and guidance), which keep the weights as they are. A model trained with
    ``frame_steps`` > 0 learns to denoise frames at different steps (diffusion forcing), which its ``frame_lag``
    sampler then uses.
    ``min_snr_gamma`` weights each step's loss by ``min(snr, gamma) / snr`` (Min-SNR; None: plain MSE).
    ``overrides`` change preset fields (``dim=64``, ``frames=16`` ...).
    """
    if preset not in PRESETS:
        raise ParticlizeError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if stop_at is not None and not 1 <= stop_at <= steps:
        raise ParticlizeError(f"stop_at must be a step between 1 and steps ({steps}), got {stop_at}")
    out = Path(out)
    if out.exists() and (out / "particlize.json").exists() and not force:
        raise ParticlizeError(f"{out} already holds a trained model; pass force=True (CLI: --force) to replace it")
    torch.manual_seed(seed)
    try:
        model = sora(preset, **overrides).to(device)
    except ValueError as e:  # a setting the preset cannot take (a patch that does not tile the video ...)
        raise ParticlizeError(str(e)) from None
    if init is not None:
        start_from = load(init)
        if isinstance(start_from, type(model)) and start_from.config != model.config:
            start_from = _adapted(start_from, model.config)
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
        opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu"))  # moved to the params
        for _ in range(start):  # replay the data and noise streams to stay deterministic
            draw_batch(model, stream, gen, batch_size, "cpu")

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
        batch = draw_batch(model, stream, gen, batch_size, device) if start < steps else None
        for step in range(start, steps):
            x0, y, t, noise = batch
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
            ema_step(ema_params, params, ema, step)
            if step + 1 < steps:  # the next batch is made on the host while a GPU still runs this step (the
                batch = draw_batch(model, stream, gen, batch_size, device)  # same draws in the same order)
            losses.append(round(loss.item(), 5))
            if callable(progress) and progress is not True:
                progress(step + 1, steps, loss.item())
            if bar is not None:
                bar.update(bar_task, completed=step + 1, loss=sum(losses[-50:]) / len(losses[-50:]))
            if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                _save_checkpoint(ckpt, model, ema_model, opt, step + 1, losses, before + time.time() - t0)
            if (max_seconds is not None and time.time() - t0 > max_seconds) or step + 1 == stop_at:
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
    ap.add_argument("--stop-at", type=int, default=None, help="stop after this step of the --steps schedule")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--init", default=None, help="continue from this trained model folder")
    ap.add_argument("--patch", type=int, nargs=3, default=None, metavar=("PT", "PH", "PW"),
                    help="override the preset's spacetime patch")
    ap.add_argument("--dim", type=int, default=None, help="override the preset's width")
    ap.add_argument("--depth", type=int, default=None, help="override the preset's block count")
    ap.add_argument("--heads", type=int, default=None, help="override the preset's head count")
    ap.add_argument("--shift", type=float, default=None, help="override the preset's noise shift")
    ap.add_argument("--temporal", choices=TEMPORAL, default=None, help="override the temporal attention")
    ap.add_argument("--rope", action=argparse.BooleanOptionalAction, default=None,
                    help="rotary frame positions in the temporal attention")
    ap.add_argument("--frame-corr", type=float, default=None, help="override the noise's correlation across frames")
    ap.add_argument("--frame-steps", type=float, default=None,
                    help="share of training videos whose frames each get their own step (diffusion forcing)")
    ap.add_argument("--frame-lag", type=int, default=None,
                    help="the saved model samples each frame this many steps after the one before")
    ap.add_argument("--guidance", type=float, default=None, help="the saved model's default sampling guidance")
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--warmup", type=int, default=100)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()

    def log(step: int, steps: int, loss: float) -> None:  # plain lines when not on a terminal (nohup, CI)
        if step % 25 == 0 or step == steps:
            print(f"step {step}/{steps} loss {loss:.4f} {time.time() - t0:.0f}s", flush=True)

    progress = True if sys.stdout.isatty() else log
    overrides = {k: getattr(a, k) for k in OVERRIDABLE if getattr(a, k) is not None}
    try:
        out = train_sora(a.preset, a.steps, a.out, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                         min_snr_gamma=a.min_snr_gamma or None, init=a.init, ema=a.ema, warmup=a.warmup,
                         max_seconds=a.max_seconds, stop_at=a.stop_at, device=a.device, progress=progress,
                         force=a.force, **overrides)
    except ParticlizeError as e:  # one line and exit 2, as argparse reports a bad argument
        ap.error(str(e))
    print(json.dumps(json.loads((out / "particlize.json").read_text())["extra"], indent=1)[:2000])


if __name__ == "__main__":
    _main()
