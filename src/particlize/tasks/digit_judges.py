"""Independent judges of moving-digit videos: readers the video generator was never tuned with.

    judges = fit_judges(task)                                  # seconds on a CPU, deterministic
    real, y_real = task.split("test")
    report = compare_to_real(judges, samples, labels, real, y_real)
    report["readers"]["crop-svc"]["video_accuracy"]            # {"real", "samples", "ratio"}
    report["frechet"]["frame"]                                 # {"samples", "real_halves", "ratio"}

The generator (`MovingDigitsTask.stream`, its ``train`` split, the shipped frame classifier) only ever sees
the ``train`` digit images. The judges learn from the ``val`` images alone, rendered with augmentation
(random size 12-20 px, blur, brightness, random place in the frame), and "real" is the ``test`` split:
images neither the generator nor the judges saw. Two readers of different kinds, both unlike the project's
`SimpleCNN` frame classifier:

* ``crop-svc`` - scikit-learn's RBF SVC on the digit cropped around its bounding box and pooled to 8x8
  like scikit-learn's own digits (so it reads shape, not place);
* ``lenet`` - a LeNet-style network (5x5 convolutions, tanh, average pooling, two hidden Linears) on the
  whole 32x32 frame.

Each reads per frame and per video (log-probabilities summed over frames). The Fréchet distances use the
``lenet`` penultimate layer (32 features) as the fixed feature network: per frame (FID-style), and per
video (FVD-style: the time-mean of the frame features next to the time-mean of their absolute frame-to-frame
changes, 64 features, so appearance and motion both count). The motion check is `judge_metrics.motion_check`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ParticlizeError
from .judge_metrics import check_videos, frechet_distance, motion_check
from .moving_digits import TWO_DIGITS, MovingDigitsTask, fit_frames, moving_digits

__all__ = ["LeNet", "Judges", "judge_frames", "crop_digits", "fit_judges", "judge_videos", "compare_to_real",
           "video_features", "READERS"]

READERS = ("crop-svc", "lenet")


# ---- the judges' own training frames ---------------------------------------------------------------


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur of each frame ``x [N, 1, H, W]`` with its own ``sigma [N]`` (0 = unchanged)."""
    r = torch.arange(-2, 3, dtype=torch.float32)
    k = torch.exp(-r[None] ** 2 / (2 * sigma[:, None].clamp(min=1e-3) ** 2))  # [N, 5]
    k = k / k.sum(-1, keepdim=True)
    k2 = (k[:, :, None] * k[:, None, :])[:, None]  # [N, 1, 5, 5]
    return F.conv2d(x.transpose(0, 1), k2, padding=2, groups=len(x)).transpose(0, 1)


def judge_frames(images: np.ndarray, labels: np.ndarray, n: int, seed: int = 0, size: int = 32,
                 scale: tuple[int, int] = (12, 20), max_blur: float = 1.0,
                 brightness: tuple[float, float] = (0.7, 1.0), rotate: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` augmented single-digit frames ``[n, 1, size, size]`` (in [0, 1], quantised to 8 bits like the
    videos) and their labels, drawn from ``images [M, h, w]`` with a seeded generator: each digit is turned
    (up to ``rotate`` degrees) and sheared a little, resized to a random ``scale`` (px), blurred (sigma up to
    ``max_blur``), dimmed by ``brightness`` and put at a random place."""
    rng = np.random.default_rng([seed, 33])
    pick = rng.integers(0, len(images), n)
    sizes = rng.integers(scale[0], scale[1] + 1, n)
    frames = torch.zeros(n, 1, size, size)
    src = torch.from_numpy(np.asarray(images, dtype=np.float32))[pick][:, None]
    angle = torch.from_numpy(rng.uniform(-rotate, rotate, n).astype(np.float32)) * np.pi / 180
    shear = torch.from_numpy(rng.uniform(-0.15, 0.15, n).astype(np.float32))
    theta = torch.zeros(n, 2, 3)  # a small rotation and shear of every sprite about its centre
    theta[:, 0, 0], theta[:, 0, 1] = angle.cos(), -angle.sin() + shear
    theta[:, 1, 0], theta[:, 1, 1] = angle.sin(), angle.cos()
    src = F.grid_sample(src, F.affine_grid(theta, tuple(src.shape), align_corners=False), align_corners=False)
    for s in np.unique(sizes):
        idx = np.flatnonzero(sizes == s)
        sprites = F.interpolate(src[idx], size=(int(s), int(s)), mode="bilinear", align_corners=False)
        ys = rng.integers(0, size - s + 1, len(idx))
        xs = rng.integers(0, size - s + 1, len(idx))
        for j, i in enumerate(idx):
            frames[i, :, ys[j]:ys[j] + s, xs[j]:xs[j] + s] = sprites[j]
    sigma = torch.from_numpy(rng.uniform(0, max_blur, n).astype(np.float32))
    frames = torch.where(sigma[:, None, None, None] > 0.3, _blur(frames, sigma), frames)
    frames = frames * torch.from_numpy(rng.uniform(*brightness, n).astype(np.float32))[:, None, None, None]
    return (frames.clamp(0, 1) * 255).round() / 255, torch.from_numpy(np.asarray(labels)[pick]).long()


# ---- reader 1: an SVC on the digit cropped to 8x8 ---------------------------------------------------


def crop_digits(frames: torch.Tensor, floor: float = 0.25) -> np.ndarray:
    """The digit in each frame ``[N, 1, H, W]`` cropped to a square around its bounding box (pixels above
    ``floor`` of the frame's brightest), resampled to 32x32 and summed over 4x4 blocks: ``[N, 64]`` in
    [0, 16], the form of scikit-learn's 8x8 digits. A blank frame gives zeros."""
    x = frames.float()
    N, _, H, W = x.shape
    peak = x.flatten(1).amax(1).clamp(min=1e-6)
    on = (x[:, 0] > floor * peak[:, None, None]) & (x[:, 0] > 0.05)  # [N, H, W]
    rows, cols = on.any(2), on.any(1)
    ar_h, ar_w = torch.arange(H), torch.arange(W)
    big = torch.tensor(10 ** 6)
    top = torch.where(rows, ar_h, big).amin(1)
    bottom = torch.where(rows, ar_h, -big).amax(1)
    left = torch.where(cols, ar_w, big).amin(1)
    right = torch.where(cols, ar_w, -big).amax(1)
    blank = ~rows.any(1)
    top, bottom, left, right = (torch.where(blank, 0, v).float() for v in (top, bottom, left, right))
    cy, cx = (top + bottom) / 2, (left + right) / 2
    half = torch.maximum(bottom - top, right - left) / 2 + 1.0  # px, one pixel of margin
    # affine grid: output [-1, 1] -> input pixels [c - half, c + half] in normalised coordinates
    theta = torch.zeros(N, 2, 3)
    theta[:, 0, 0] = half * 2 / W
    theta[:, 1, 1] = half * 2 / H
    theta[:, 0, 2] = (cx + 0.5) * 2 / W - 1
    theta[:, 1, 2] = (cy + 0.5) * 2 / H - 1
    grid = F.affine_grid(theta, (N, 1, 32, 32), align_corners=False)
    crop = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    crop = crop / peak[:, None, None, None]
    out = F.avg_pool2d(crop, 4).flatten(1) * 16
    out[blank] = 0
    return out.numpy().astype(np.float64)


# ---- reader 2 (and the feature network): LeNet on the whole frame -----------------------------------


class LeNet(nn.Module):
    """LeNet-style reader: ``[Conv5x5 (no padding) - ReLU - MaxPool2] x 2``, flatten (where the strokes are
    stays in the features: no global pooling, no batch norm, unlike `SimpleCNN`), Linear-ReLU 800→64→32,
    Linear 32→10. Input ``[B, 1, 32, 32]`` in [0, 1]; `features` is the 32-wide penultimate layer (the
    Fréchet features). (Tanh and average pooling, LeNet's own, learned the placed digits too slowly here.)"""

    def __init__(self, num_classes: int = 10, feature_dim: int = 32, widths: tuple[int, int] = (16, 32)) -> None:
        super().__init__()
        c1, c2 = widths
        self.conv = nn.Sequential(nn.Conv2d(1, c1, 5), nn.ReLU(), nn.MaxPool2d(2),  # [B, c1, 14, 14]
                                  nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2))  # [B, c2, 5, 5]
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(c2 * 25, 64), nn.ReLU(), nn.Linear(64, feature_dim),
                                    nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden(self.conv(x * 2 - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _train_lenet(x: torch.Tensor, y: torch.Tensor, steps: int, seed: int, batch_size: int = 128) -> LeNet:
    torch.manual_seed(seed)
    net = LeNet()
    return fit_frames(net, torch.optim.Adam(net.parameters(), lr=3e-3), x, y, steps=steps, batch_size=batch_size,
                      seed=seed)


# ---- the judges together -------------------------------------------------------------------------------


@dataclass
class Judges:
    """Trained judges (see the module docstring): ``svc`` reads 8x8 crops, ``lenet`` whole frames and gives
    the Fréchet features; ``size``/``span``/``max_speed`` describe the videos they judge (for the motion check);
    ``info`` says what they were trained on."""

    svc: Any
    lenet: LeNet
    size: int
    span: int
    max_speed: int
    info: dict[str, Any]

    def _frames(self, videos: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        v = check_videos(videos)
        if v.shape[-2:] != (self.size, self.size):
            raise ParticlizeError(f"these judges read {self.size}x{self.size} frames, got {tuple(v.shape[-2:])}; "
                                  f"fit judges for this frame size with fit_judges(task)")
        B, _, T, H, W = v.shape
        return v.transpose(1, 2).reshape(B * T, 1, H, W), B, T

    @torch.no_grad()
    def read(self, videos: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per reader, log-probabilities of the ten digits for every frame: ``{name: [B, T, 10]}``."""
        f, B, T = self._frames(videos)
        svc = torch.from_numpy(self.svc.predict_proba(crop_digits(f))).float().clamp(min=1e-6).log()
        lenet = torch.cat([F.log_softmax(self.lenet(c), -1) for c in f.split(1024)])
        return {"crop-svc": svc.reshape(B, T, -1), "lenet": lenet.reshape(B, T, -1)}

    @torch.no_grad()
    def features(self, videos: torch.Tensor) -> torch.Tensor:
        """The Fréchet feature network's (``lenet`` penultimate) features of every frame: ``[B, T, 32]``."""
        f, B, T = self._frames(videos)
        return torch.cat([self.lenet.features(c) for c in f.split(1024)]).reshape(B, T, -1)


def fit_judges(task: MovingDigitsTask | None = None, *, per_image: int = 40, steps: int = 600, seed: int = 0,
               split: str = "val") -> Judges:
    """Train the judges on ``per_image`` augmented frames (`judge_frames`) of each ``split`` digit image of
    ``task`` (default: the moving-digits task's seed 0 and shapes). Never the ``train`` images: the generator
    learns from those. ``steps`` LeNet steps of 128 frames; the SVC (RBF, C=10, probabilities by a sigmoid
    calibrated on 5 folds) is fitted on the same frames' crops. Deterministic for a ``seed``; about a minute
    on two busy CPU cores."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.svm import SVC

    if split == "train":
        raise ParticlizeError("judges must not learn from the 'train' digit images the generator learns from; "
                              "use split='val'")
    task = task or moving_digits(seed=0, n_train=1, n_eval=1)
    if task.size != 32:
        raise ParticlizeError(f"the judges read 32x32 frames (LeNet's input), the task renders {task.size}x{task.size}; "
                              f"use moving_digits(size=32)")
    images, labels = task.digits[split]
    x, y = judge_frames(images, labels, per_image * len(images), seed=seed, size=task.size,
                        scale=(task.digit_size * 3 // 4, task.digit_size * 5 // 4))
    svc = CalibratedClassifierCV(SVC(C=10.0, gamma="scale"), ensemble=False).fit(crop_digits(x), y.numpy())
    lenet = _train_lenet(x, y, steps, seed)
    info = {"split": split, "images": len(images), "frames": len(y), "seed": seed, "lenet_steps": steps,
            "digit_seed": task.seed}
    return Judges(svc, lenet, task.size, task.size - task.digit_size, 2, info)


# ---- judging ---------------------------------------------------------------------------------------------


def _check_labels(videos: torch.Tensor, labels: torch.Tensor | Any) -> torch.Tensor:
    y = torch.as_tensor(labels, dtype=torch.long).reshape(-1).cpu()
    if len(y) != len(videos):
        raise ParticlizeError(f"got {len(videos)} videos but {len(y)} labels; give one digit label per video "
                              f"({TWO_DIGITS} for a two-digit video)")
    return y


def judge_videos(judges: Judges, videos: torch.Tensor, labels: torch.Tensor | Any) -> dict[str, Any]:
    """Every judge on ``videos [B, 1, T, H, W]`` (in [0, 1]) requested or labelled as ``labels [B]``.

    Per reader ``frame_accuracy`` (frames read as the label) and ``video_accuracy`` (log-probabilities summed
    over the frames) and ``motion`` (`judge_metrics.motion_check`: the centroid of two digits does not
    bounce), on the single-digit videos only (label 10 = two digits has no digit to read)."""
    v = check_videos(videos)
    y = _check_labels(v, labels)
    one = y < TWO_DIGITS
    out: dict[str, Any] = {"n_videos": len(y), "n_digit_videos": int(one.sum()), "readers": {}}
    if one.any():
        for name, logp in judges.read(v[one]).items():
            yy = y[one]
            out["readers"][name] = {"frame_accuracy": (logp.argmax(-1) == yy[:, None]).float().mean().item(),
                                    "video_accuracy": (logp.sum(1).argmax(-1) == yy).float().mean().item()}
        out["motion"] = motion_check(v[one], judges.span, judges.max_speed)
    return out


def video_features(frame_features: torch.Tensor) -> torch.Tensor:
    """FVD-style per-video features from per-frame ones ``[B, T, d]``: ``[B, 2d]`` = the frames' mean next to
    the mean absolute change between consecutive frames (what is drawn, and how it moves)."""
    f = frame_features
    return torch.cat([f.mean(1), (f[:, 1:] - f[:, :-1]).abs().mean(1)], -1)


def _halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    p = np.random.default_rng([seed, 2]).permutation(n)
    return np.sort(p[: n // 2]), np.sort(p[n // 2: 2 * (n // 2)])


def compare_to_real(judges: Judges, samples: torch.Tensor, labels: torch.Tensor | Any, real: torch.Tensor,
                    real_labels: torch.Tensor | Any, seed: int = 0, shrink: bool = True) -> dict[str, Any]:
    """`judge_videos` on ``samples`` and on ``real`` side by side, with ratios samples / real, and Fréchet
    distances of the samples to real videos against the distance between two halves of the real videos.

    Only real single-digit videos take part. They are split into seeded halves A and B; the samples and A
    are cut to the same size ``n`` (seeded random subsets), and ``frechet[kind]`` gives ``samples`` = FD(samples,
    B) and ``real_halves`` = FD(A, B), so both distances have the same reference set and sample sizes and
    their ``ratio`` is fair. ``kind`` is ``frame`` (every frame's features, FID-style) or ``video``
    (`video_features`, FVD-style)."""
    s, r = check_videos(samples, "samples"), check_videos(real, "real videos")
    ys, yr = _check_labels(s, labels), _check_labels(r, real_labels)
    if s.shape[1:] != r.shape[1:]:
        raise ParticlizeError(f"samples {tuple(s.shape[1:])} and real videos {tuple(r.shape[1:])} differ in shape; "
                              f"compare videos of the same frames and size")
    if (ys >= TWO_DIGITS).any() or (ys < 0).any():
        raise ParticlizeError("samples must be labelled with the digit 0-9 each was asked to show (class-conditional "
                              "samples); drop unconditional or two-digit samples before comparing")
    r, yr = r[yr < TWO_DIGITS], yr[yr < TWO_DIGITS]
    if len(r) < 8:
        raise ParticlizeError(f"need at least 8 real single-digit videos to compare with, got {len(r)}")
    js, jr = judge_videos(judges, s, ys), judge_videos(judges, r, yr)
    out: dict[str, Any] = {"samples": js, "real": jr, "readers": {}, "motion": {}, "frechet": {}}
    for name in js["readers"]:
        out["readers"][name] = {k: {"samples": js["readers"][name][k], "real": jr["readers"][name][k],
                                    "ratio": js["readers"][name][k] / max(jr["readers"][name][k], 1e-12)}
                                for k in ("frame_accuracy", "video_accuracy")}
    for k in ("mean_residual_px", "bounce_share"):
        out["motion"][k] = {"samples": js["motion"][k], "real": jr["motion"][k]}
    a, b = _halves(len(r), seed)
    n = min(len(a), len(s))
    a = a[np.random.default_rng([seed, 3]).permutation(len(a))[:n]]
    pick = np.sort(np.random.default_rng([seed, 4]).permutation(len(s))[:n])
    fs, fr = judges.features(s[pick]), judges.features(r)
    for kind, (fa, fb, fx) in {
        "frame": (fr[a].flatten(0, 1), fr[b].flatten(0, 1), fs.flatten(0, 1)),
        "video": (video_features(fr[a]), video_features(fr[b]), video_features(fs)),
    }.items():
        d_s, d_r = frechet_distance(fx, fb, shrink), frechet_distance(fa, fb, shrink)
        out["frechet"][kind] = {"samples": d_s, "real_halves": d_r, "ratio": d_s / max(d_r, 1e-12),
                                "n_videos": int(n), "n_reference": int(len(b))}
    return out
