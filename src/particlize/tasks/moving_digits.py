"""Moving digits: deterministic videos of one or two handwritten digits bouncing inside small frames.

The digits are scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download), split by
digit image into train/val/test (seeded, stratified), upscaled (bilinear) and moved with a constant
integer velocity that reflects off the frame borders. Videos are ``uint8 [N, 1, T, size, size]``;
the label of a one-digit video is its digit, two-digit videos carry label ``10`` (no class: only the
unconditional branch of a classifier-free-guided model learns from them).

Metrics for video diffusion models (`particlize.models.sora`):

* `eps_mse` - held-out noise-prediction MSE at fixed steps and noise seeds (deterministic);
* `sample_accuracy` - how often a frame classifier recognises the requested digit in sampled videos;
* `temporal_consistency` - mean absolute frame-to-frame change (compare generated vs real videos).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..io import load
from ..models.sora_sampler import frame_noise
from ..models.vision import SimpleCNN
from .base import SPLITS, Task, model_device, stratified_split

TWO_DIGITS = 10  # label of a two-digit video
CLASSES = [str(i) for i in range(10)]


def digit_images(seed: int = 0, digit_size: int = 16) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's digits upscaled to ``digit_size`` (float32 in [0, 1]) per split: ``{split: (images, labels)}``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    img = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    img = F.interpolate(img, size=(digit_size, digit_size), mode="bilinear", align_corners=False)[:, 0]
    img = img.clamp(0, 1).numpy()
    labels = d.target.astype(np.int64)
    return {s: (img[idx], labels[idx]) for s, idx in zip(SPLITS, stratified_split(labels, seed=seed))}


def _bounce(start: np.ndarray, vel: np.ndarray, frames: int, span: int) -> np.ndarray:
    """Integer positions ``[..., frames]`` moving with ``vel`` and reflecting inside ``[0, span]``."""
    p = start[..., None] + vel[..., None] * np.arange(frames)
    m = np.mod(p, 2 * span) if span > 0 else np.zeros_like(p)
    return np.where(m <= span, m, 2 * span - m)


def render(
    images: np.ndarray,
    labels: np.ndarray,
    n: int,
    rng: np.random.Generator,
    *,
    frames: int = 8,
    size: int = 32,
    two_digit_fraction: float = 0.0,
    max_speed: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` videos (uint8 ``[n, 1, frames, size, size]``) and labels drawn from ``images`` with ``rng``."""
    ds = images.shape[-1]
    span = size - ds
    count = np.where(rng.random(n) < two_digit_fraction, 2, 1)
    pick = rng.integers(0, len(images), size=(n, 2))
    start = rng.integers(0, span + 1, size=(n, 2, 2))  # [video, digit, (y, x)]
    speed = rng.integers(1, max_speed + 1, size=(n, 2, 2)) * rng.choice([-1, 1], size=(n, 2, 2))
    pos = _bounce(start, speed, frames, span)  # [n, 2, 2, frames]
    video = np.zeros((n, frames, size, size), dtype=np.float32)
    for i in range(n):
        for j in range(count[i]):
            sprite = images[pick[i, j]]
            for t in range(frames):
                y, x = pos[i, j, 0, t], pos[i, j, 1, t]
                region = video[i, t, y:y + ds, x:x + ds]
                np.maximum(region, sprite, out=region)
    out_labels = np.where(count == 1, labels[pick[:, 0]], TWO_DIGITS)
    return (video * 255).round().astype(np.uint8)[:, None], out_labels.astype(np.int64)


class MovingDigitsTask(Task):
    """Moving-digit videos with fixed, seeded train/val/test splits (built from disjoint digit images).

    ``split(name)`` gives ``(videos float [N, 1, T, H, W] in [0, 1], labels LongTensor[N])``;
    `stream` draws an endless seeded sequence of fresh training batches in ``[-1, 1]`` (what diffusion
    training wants); `frames` gives labelled single frames for the frame classifier.
    ``distill_options`` are passed on to `particlize.recover.dit.distill_dit` by the recovery (e.g.
    ``{"guidance": None, "trajectory_fraction": 0.0}`` for plain noise-prediction distillation).
    """

    def __init__(
        self,
        seed: int = 0,
        n_train: int = 2000,
        n_eval: int = 200,
        frames: int = 8,
        size: int = 32,
        digit_size: int = 16,
        two_digit_fraction: float = 0.2,
    ) -> None:
        if frames < 2 or size < digit_size:
            raise ValueError(f"moving digits needs >= 2 frames of at least {digit_size}px, got {frames} x {size}")
        self.seed, self.frames, self.size, self.digit_size = seed, frames, size, digit_size
        self.two_digit_fraction = two_digit_fraction
        self.distill_options: dict[str, Any] = {}
        self.digits = digit_images(seed, digit_size)
        splits = {}
        for k, (s, n) in enumerate(zip(SPLITS, (n_train, n_eval, n_eval))):
            rng = np.random.default_rng([seed, k])
            v, y = render(*self.digits[s], n, rng, frames=frames, size=size, two_digit_fraction=two_digit_fraction)
            splits[s] = (torch.from_numpy(v), torch.from_numpy(y))
        super().__init__("moving-digits", "video", splits, CLASSES,
                         info={"source": "sklearn.datasets.load_digits", "frames": frames, "size": size})

    def split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(videos float [N, 1, T, H, W] in [0, 1], labels LongTensor[N])``; label 10 = two digits."""
        v, y = self._get(split)
        return v.float().div_(255.0), y.clone()

    def batches(self, split: str, *, batch_size: int = 32, limit: int | None = None, **_: Any):
        """The split as ``(videos in [0, 1], labels)`` batches, in order."""
        v, y = self.split(split)
        n = len(y) if limit is None else min(limit, len(y))
        return [(v[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n, batch_size)]

    # ---- what `particlize.compress` asks of a task: a video diffusion model's version -----------
    quality_name = "1/eps_mse"

    def quality(self, model: nn.Module, split: str = "val", tokenizer: Any = None, *, batch_size: int = 64,
                limit: int | None = None, **_: Any) -> dict[str, float | int]:
        """Held-out ε-MSE and ``quality = 1 / eps_mse`` (compress's ``min_quality=0.91`` allows an ε-MSE
        10% above the original's). On ``"test"`` also the class-conditional sample accuracy (shipped
        frame classifier, 4 videos per digit, 50 DDIM steps) and the temporal consistency of samples."""
        v, y = self.split(split)
        if limit is not None:
            v, y = v[:limit], y[:limit]
        m = eps_mse(model, v * 2 - 1, y, batch_size=batch_size)
        out: dict[str, float | int] = {"eps_mse": m, "quality": 1.0 / max(m, 1e-12), "n": len(y)}
        if split == "test" and hasattr(model, "sample"):
            out.update(sample_metrics(model, load_frame_classifier()))
            out["temporal_consistency_real"] = temporal_consistency(v[y < 10])
        return out

    def calibration(self, model: nn.Module, tokenizer: Any = None, *, batch_size: int = 32,
                    limit: int | None = 256, seed: int = 0, **_: Any) -> list:
        """Noised training videos at seeded random steps: ``({"x", "t", "y"}, noise)`` batches, so that
        ``metric="loss"`` is the denoiser's ε-MSE (``model`` gives the noise schedule)."""
        v, y = self.split("train")
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(y), generator=gen)[: (len(y) if limit is None else limit)]
        x0, y = v[idx] * 2 - 1, y[idx]
        t = torch.randint(0, model.diffusion.steps, (len(y),), generator=gen)
        noise = frame_noise(x0.shape, gen, getattr(getattr(model, "config", None), "frame_corr", 0.0))
        xt = model.diffusion.add_noise(x0, t, noise)
        return [({"x": xt[i:i + batch_size], "t": t[i:i + batch_size], "y": y[i:i + batch_size]}, noise[i:i + batch_size])
                for i in range(0, len(y), batch_size)]

    def latency_inputs(self, tokenizer: Any = None, batch: int = 32, seq: int = 64) -> dict[str, torch.Tensor]:
        """One classifier-free-guided sampling step for ``batch`` videos (``2 * batch`` rows)."""
        gen = torch.Generator().manual_seed(0)
        x = torch.randn((2 * batch, 1, self.frames, self.size, self.size), generator=gen)
        y = torch.cat([torch.arange(batch) % 10, torch.full((batch,), 10)])
        return {"x": x, "t": torch.full((2 * batch,), 500), "y": y}

    def stream(self, batch_size: int, seed: int = 0, two_digit_fraction: float | None = None):
        """Endless fresh training batches ``(videos in [-1, 1] float [B, 1, T, H, W], labels [B])``."""
        rng = np.random.default_rng([self.seed, seed, 99])
        frac = self.two_digit_fraction if two_digit_fraction is None else two_digit_fraction
        while True:
            v, y = render(*self.digits["train"], batch_size, rng, frames=self.frames, size=self.size,
                          two_digit_fraction=frac)
            yield torch.from_numpy(v).float().div_(127.5).sub_(1.0), torch.from_numpy(y)

    def frames_of(self, split: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` single one-digit frames ``[n, 1, H, W]`` in [0, 1] with their digit labels."""
        rng = np.random.default_rng([self.seed, seed, SPLITS.index(split), 7])
        v, y = render(*self.digits[split], n, rng, frames=1, size=self.size)
        return torch.from_numpy(v[:, :, 0]).float().div_(255.0), torch.from_numpy(y)

    def evaluate(self, model: nn.Module, split: str = "test", *args: Any, **kwargs: Any) -> dict[str, float]:
        """Held-out epsilon-MSE of a video diffusion model (see `eps_mse`)."""
        v, y = self.split(split)
        return {"eps_mse": eps_mse(model, v * 2 - 1, y), "n": len(y)}


def moving_digits(
    seed: int = 0,
    n_train: int = 2000,
    n_eval: int = 200,
    frames: int = 8,
    size: int = 32,
    digit_size: int = 16,
    two_digit_fraction: float = 0.2,
) -> MovingDigitsTask:
    """The ``moving-digits`` task (videos of bouncing scikit-learn digits; deterministic for a seed)."""
    return MovingDigitsTask(seed=seed, n_train=n_train, n_eval=n_eval, frames=frames, size=size,
                            digit_size=digit_size, two_digit_fraction=two_digit_fraction)


# --------------------------------------------------------------------------------------------------
# Metrics


@torch.no_grad()
def eps_mse(
    model: nn.Module,
    videos: torch.Tensor,
    labels: torch.Tensor,
    timesteps: Sequence[int] = (100, 500, 900),
    seed: int = 0,
    batch_size: int = 32,
) -> float:
    """Mean noise-prediction MSE of ``model`` on ``videos`` (in [-1, 1]) at fixed steps and noise seeds.

    Every (video, step) pair gets its own fixed noise, so the number is deterministic and comparable
    across models (original vs compressed).
    """
    device = model_device(model)
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    # the model's own noise prior (frames may share part of their noise); one [K*N, ...] draw = a [K, N, ...] draw
    noise = frame_noise((len(timesteps) * len(videos), *videos.shape[1:]), gen,
                        getattr(model.config, "frame_corr", 0.0)).reshape(len(timesteps), *videos.shape)
    total, count = 0.0, 0
    try:
        for k, t in enumerate(timesteps):
            for i in range(0, len(videos), batch_size):
                x0, y = videos[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)
                y = torch.where((y < 0) | (y > model.config.num_classes), model.config.num_classes, y)
                eps = noise[k, i:i + batch_size].to(device)
                tt = torch.full((len(x0),), int(t), dtype=torch.long, device=device)
                pred = model(model.diffusion.add_noise(x0, tt, eps), tt, y)
                total += F.mse_loss(pred, eps, reduction="sum").item()
                count += eps.numel()
    finally:
        model.train(was_training)
    return total / count


@torch.no_grad()
def classify_videos(classifier: nn.Module, videos: torch.Tensor) -> torch.Tensor:
    """Digit predicted for each video ``[B, 1, T, H, W]`` (in [0, 1]): frame log-probabilities summed."""
    classifier.eval()
    B, C, T, H, W = videos.shape
    frames = videos.transpose(1, 2).reshape(B * T, C, H, W).to(model_device(classifier))
    logp = F.log_softmax(classifier(frames), -1).reshape(B, T, -1).sum(1)
    return logp.argmax(-1).cpu()


@torch.no_grad()
def sample_metrics(
    model: nn.Module,
    classifier: nn.Module,
    n_per_class: int = 4,
    steps: int = 50,
    seed: int = 0,
    guidance: float | None = None,
) -> dict[str, float]:
    """Sample ``n_per_class`` videos per digit once (``guidance`` None: the model's own) and score them:
    ``sample_accuracy`` (how often the frame classifier reads the requested digit) and ``temporal_consistency``
    (see below)."""
    labels = torch.arange(10).repeat_interleave(n_per_class)
    videos = model.sample(labels, steps=steps, seed=seed, guidance=guidance).cpu()
    return {"sample_accuracy": (classify_videos(classifier, videos) == labels).float().mean().item(),
            "temporal_consistency": temporal_consistency(videos)}


def sample_accuracy(
    model: nn.Module,
    classifier: nn.Module,
    n_per_class: int = 4,
    steps: int = 50,
    seed: int = 0,
    guidance: float | None = None,
) -> float:
    """Fraction of sampled videos (``n_per_class`` per digit) that the frame classifier reads as the
    requested digit."""
    return sample_metrics(model, classifier, n_per_class, steps, seed, guidance)["sample_accuracy"]


def temporal_consistency(videos: torch.Tensor) -> float:
    """Mean absolute change between consecutive frames of ``videos [B, C, T, H, W]`` in [0, 1].

    Real moving digits change by a steady amount (the moving strokes); flickering samples change more,
    frozen ones less. Compare a model's samples with real videos.
    """
    return (videos[:, :, 1:] - videos[:, :, :-1]).abs().mean().item()


# --------------------------------------------------------------------------------------------------
# The frame classifier used by `sample_accuracy`


def fit_frames(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *, steps: int,
               batch_size: int, seed: int, max_lr: float = 3e-3) -> nn.Module:
    """Train a frame classifier: ``steps`` batches of ``batch_size`` frames drawn from ``x`` / ``y`` with a generator
    seeded by ``seed``, cross-entropy, ``opt`` under a one-cycle schedule peaking at ``max_lr``; ``model`` is returned
    in eval mode."""
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch_size,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def train_frame_classifier(task: MovingDigitsTask | None = None, steps: int = 600, batch_size: int = 64,
                           seed: int = 0) -> tuple[nn.Module, float]:
    """A small CNN (`SimpleCNN`) recognising the digit in one 32x32 frame; returns it and its test accuracy."""
    task = task or moving_digits(seed=seed, n_train=10, n_eval=10)
    torch.manual_seed(seed)
    model = SimpleCNN(num_classes=10, in_channels=1, widths=(32, 64, 64))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    x, y = task.frames_of("train", steps * batch_size // 4, seed=seed)
    fit_frames(model, opt, x, y, steps=steps, batch_size=batch_size, seed=seed)
    xt, yt = task.frames_of("test", 1000, seed=seed)
    with torch.no_grad():
        acc = (model(xt).argmax(-1) == yt).float().mean().item()
    return model, acc


def load_frame_classifier() -> nn.Module:
    """The shipped frame classifier (``particlize/models/weights/frame-classifier``)."""
    return load("frame-classifier")


__all__ = [
    "MovingDigitsTask", "moving_digits", "render", "digit_images", "eps_mse", "sample_accuracy", "sample_metrics",
    "classify_videos", "temporal_consistency", "fit_frames", "train_frame_classifier", "load_frame_classifier",
]
