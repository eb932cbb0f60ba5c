"""``particlize train`` (a classifier on a task) and ``particlize train-sora`` (the Sora-style video DiT)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from ..errors import ParticlizeError
from ..train import fine_tune
from ..train_sora import train_sora
from ._common import BATCH_SIZE, DATA, DEVICE, LABEL_COLUMN, LIMIT, MAX_LENGTH, SEED, TASK, TEXT_COLUMN, TRUST_CODE, \
    check_device, console, progress_bar, quiet_transformers, refuse_existing


def train_command(
    model: str = typer.Argument(..., metavar="MODEL", help="what to train: 'minilm' or a Hugging Face encoder folder "
                                "(text; a classifier head is added), 'lstm' or 'gru' (text, trained from scratch over MiniLM's "
                                "vocabulary), 'simple-cnn', 'resnet' or 'resnet-small' (images), or any other "
                                "MODEL as it is (a particlize folder, e.g. a compressed model to fine-tune; file.py:factory); "
                                "'neumf' or 'mf' (rating tasks: movielens-100k)"),
    task: str = TASK,
    out: Path = typer.Option(..., "--out", help="folder to save the trained classifier to (a valid MODEL afterwards)"),
    epochs: int = typer.Option(2, "--epochs", min=1, help="passes over the training split"),
    lr: Optional[float] = typer.Option(None, "--lr", help="default 5e-5 (MiniLM) / 2e-3 (lstm, gru) / 1e-3 (images)"),
    batch_size: int = BATCH_SIZE,
    max_length: int = MAX_LENGTH,
    seed: int = SEED,
    limit: Optional[int] = LIMIT,
    data: Optional[Path] = DATA,
    text_column: str = TEXT_COLUMN,
    label_column: str = LABEL_COLUMN,
    device: str = DEVICE,
    force: bool = typer.Option(False, "--force", help="replace an existing --out folder"),
    trust_code: bool = TRUST_CODE,
) -> None:
    """Fine-tune a classifier on a task and save it (tokenizer included) with particlize's format."""
    if task == "text-csv" and data is None:
        raise ParticlizeError("--task text-csv needs --data FILE.csv (with --text-column/--label-column)")
    refuse_existing(out, force)
    check_device(device)
    quiet_transformers()
    kwargs = {"path": data, "text_column": text_column, "label_column": label_column} if task == "text-csv" else None
    with progress_bar("training") as bar:
        def progress(step: int, total: int, info: dict) -> None:
            what = f"epoch {info.get('epoch')} loss {info.get('loss', float('nan')):.3f}"
            if "val_accuracy" in info:
                what += f" val acc {info['val_accuracy']:.3f}"
            bar(step, total, what)

        folder = fine_tune(task, out, model=model, epochs=epochs, lr=lr, batch_size=batch_size,
                           max_length=max_length, seed=seed, limit=limit, progress=progress, force=force,
                           task_kwargs=kwargs, device=device, trust_code=trust_code)
    test = json.loads((folder / "particlize.json").read_text())["extra"]["metrics"]["test"]
    if "accuracy" in test:
        shown = f"test accuracy {test['accuracy']:.4f} (loss {test['loss']:.4f}, {test['n']} examples)"
    else:  # rating tasks
        shown = f"test RMSE {test['rmse']:.4f}, HR@10 {test['hr@10']:.4f}, NDCG@10 {test['ndcg@10']:.4f} ({test['n']} ratings)"
    console().print(f"{shown}; saved to [bold]{escape(str(folder))}[/bold]")


def train_sora_command(
    preset: str = typer.Option("tiny", "--preset", help="tiny (CPU), base (8 frames, a token per frame: GPU minutes) "
                               "or small (16 frames, GPU)"),
    steps: int = typer.Option(2000, "--steps", min=1, help="optimizer steps"),
    out: Path = typer.Option(..., "--out", help="folder to save the EMA weights to (a valid MODEL afterwards)"),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="videos per training batch"),
    lr: float = typer.Option(6e-4, "--lr", help="AdamW learning rate"),
    seed: int = SEED,
    min_snr_gamma: float = typer.Option(5.0, "--min-snr-gamma", min=0.0, help="Min-SNR loss weighting (0 turns it off)"),
    max_seconds: Optional[float] = typer.Option(None, "--max-seconds", help="stop early and save after this long"),
    stop_at: Optional[int] = typer.Option(None, "--stop-at", min=1, help="stop and save after this step of the "
                                          "--steps schedule (learning rate not yet decayed)"),
    device: str = DEVICE,
    force: bool = typer.Option(False, "--force", help="replace an existing --out"),
    init: Optional[Path] = typer.Option(None, "--init", help="continue from this trained model folder (same "
                                        "settings, or a coarser temporal patch, which is inflated)"),
    patch: Optional[tuple[int, int, int]] = typer.Option(None, "--patch", metavar="PT PH PW",
                                                         help="override the preset's spacetime patch"),
    dim: Optional[int] = typer.Option(None, "--dim", min=1, help="override the preset's width"),
    depth: Optional[int] = typer.Option(None, "--depth", min=1, help="override the preset's block count"),
    heads: Optional[int] = typer.Option(None, "--heads", min=1, help="override the preset's head count"),
    shift: Optional[float] = typer.Option(None, "--shift", help="override the preset's noise shift (SNR / shift²)"),
    temporal: Optional[str] = typer.Option(None, "--temporal", help="the second attention: 'position' (across frames "
                                           "at one position) or 'all' (every token of the video)"),
    rope: Optional[bool] = typer.Option(None, "--rope/--no-rope", help="rotary frame positions in the temporal "
                                        "attention (relative time in every block)"),
    frame_corr: Optional[float] = typer.Option(None, "--frame-corr", help="correlation of the noise across frames "
                                               "(0: independent; PYoCo's mixed prior)"),
    frame_steps: Optional[float] = typer.Option(None, "--frame-steps", help="share of training videos whose frames "
                                                "each get their own noise step (diffusion forcing)"),
    frame_lag: Optional[int] = typer.Option(None, "--frame-lag", min=0, help="the saved model samples each frame "
                                            "this many DDIM steps after the one before (needs --frame-steps)"),
    guidance: Optional[float] = typer.Option(None, "--guidance", min=1.0, help="the saved model's default "
                                             "classifier-free guidance when sampling"),
) -> None:
    """Train the Sora-style spacetime diffusion transformer on moving digits."""
    check_device(device)
    given = dict(patch=patch, dim=dim, depth=depth, heads=heads, shift=shift, temporal=temporal, rope=rope,
                 frame_corr=frame_corr, frame_steps=frame_steps, frame_lag=frame_lag, guidance=guidance)
    overrides = {k: v for k, v in given.items() if v is not None}
    folder = train_sora(preset, steps, out, batch_size=batch_size, lr=lr, seed=seed, max_seconds=max_seconds,
                        stop_at=stop_at, min_snr_gamma=min_snr_gamma or None, device=device, progress=True,
                        force=force, init=init, **overrides)
    console().print(f"saved to [bold]{escape(str(folder))}[/bold]; sample with pz.load({str(folder)!r}).sample(labels)")
