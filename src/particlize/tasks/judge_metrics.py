"""Judges of generated videos that are not classifiers: a Fréchet distance between feature sets and a
motion check (does the digit's centroid move like a bounce?).

    fd = frechet_distance(feats_a, feats_b)                    # [N, d], [M, d] -> float (0 for equal sets)
    fit = bounce_fit(videos, span=16)                          # per video: residual (px), is_bounce
    motion_check(videos, span=16)                              # {"mean_residual_px", "bounce_share", ...}

Both work on any ``[B, 1, T, H, W]`` videos in [0, 1]; `particlize.tasks.digit_judges` runs them beside
its digit readers on real test videos and on samples.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ParticlizeError

__all__ = ["frechet_distance", "covariance", "centroids", "bounce_fit", "motion_check", "check_videos"]


def check_videos(videos: torch.Tensor, what: str = "videos") -> torch.Tensor:
    """``videos`` as float ``[B, 1, T, H, W]`` on the CPU, or a `ParticlizeError` saying what shape is expected."""
    if not isinstance(videos, torch.Tensor) or videos.ndim != 5 or videos.shape[1] != 1 or videos.shape[0] == 0:
        shape = tuple(videos.shape) if isinstance(videos, torch.Tensor) else type(videos).__name__
        raise ParticlizeError(f"{what} must be a non-empty tensor [B, 1, T, H, W] of grey videos in [0, 1], got "
                              f"{shape}; pass e.g. model.sample(labels) or MovingDigitsTask.split('test')[0]")
    return videos.detach().float().cpu()


# ---- Fréchet distance -----------------------------------------------------------------------------


def covariance(x: np.ndarray, shrink: bool = True) -> np.ndarray:
    """Covariance of the rows of ``x [N, d]``; with ``shrink`` the Ledoit-Wolf estimate.

    Ledoit-Wolf pulls the sample covariance toward a scaled identity by the amount that minimises the
    expected error (closed form, no tuning). With ~100 videos of 64 features the plain estimate is
    rank-deficient and noisy; shrinking keeps it well conditioned. Both sides of every comparison (samples
    vs real, real half vs real half) are estimated the same way, so their distances stay comparable."""
    if shrink:
        from sklearn.covariance import ledoit_wolf

        return ledoit_wolf(x)[0]
    return np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, shrink: bool = True) -> float:
    """Fréchet distance between Gaussians fitted to the rows of ``a [N, d]`` and ``b [M, d]`` (FID's formula):
    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)``.

    The trace of the matrix square root is taken from symmetric eigen-decompositions: it equals
    ``tr sqrtm(S_a S_b)`` (what FID code computes with ``scipy.linalg.sqrtm``) for covariance matrices, but
    stays real and exact where ``S_a S_b`` is near-singular. ``shrink`` as in `covariance`."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ParticlizeError(f"frechet_distance needs two feature sets [N, d] and [M, d] with the same d and at least "
                              f"2 rows each, got {a.shape} and {b.shape}")
    sa, sb = covariance(a, shrink), covariance(b, shrink)
    ra = _sqrt_psd(sa)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(ra @ sb @ ra), 0, None)).sum()
    d = float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * cross)
    return max(d, 0.0)


# ---- motion: centroid path vs a bounce -----------------------------------------------------------


def centroids(videos: torch.Tensor, floor: float = 0.2) -> np.ndarray:
    """Intensity-weighted centroid ``(y, x)`` of each frame: ``[B, 2, T]`` in pixels, NaN for a blank frame.

    Pixels count by how far they rise above ``floor`` (in [0, 1]), so faint background haze in a sample
    does not drag the centroid toward the middle of the frame."""
    v = check_videos(videos)[:, 0]  # [B, T, H, W]
    w = (v - floor).clamp(min=0)
    total = w.sum((-2, -1))  # [B, T]
    ys = torch.arange(v.shape[-2], dtype=torch.float32)
    xs = torch.arange(v.shape[-1], dtype=torch.float32)
    cy = (w.sum(-1) * ys).sum(-1) / total
    cx = (w.sum(-2) * xs).sum(-1) / total
    c = torch.stack([cy, cx], 1)
    c[torch.isinf(c) | (total[:, None].expand_as(c) == 0)] = float("nan")
    return c.double().numpy()


def _bounce_paths(span: int, frames: int, max_speed: int) -> np.ndarray:
    """Every integer bounce path ``[K, frames]`` in ``[0, span]``: start 0..span, speed ±1..±max_speed."""
    start = np.repeat(np.arange(span + 1), 2 * max_speed)
    vel = np.tile(np.array([s * d for s in range(1, max_speed + 1) for d in (-1, 1)]), span + 1)
    p = start[:, None] + vel[:, None] * np.arange(frames)
    m = np.mod(p, 2 * span) if span > 0 else np.zeros_like(p)
    return np.where(m <= span, m, 2 * span - m).astype(np.float64)


def bounce_fit(videos: torch.Tensor, span: int, max_speed: int = 2, offset: tuple[float, float] | None = None,
               tol: float = 1.0, floor: float = 0.2) -> dict[str, np.ndarray]:
    """Fit each video's centroid path (`centroids`) with the closest bounce, per axis independently.

    The moving-digits videos move a sprite with a constant integer velocity (1..``max_speed`` px per frame)
    that reflects inside ``[0, span]`` (``span = size - digit_size``); its centroid is that path plus a fixed
    offset within the sprite. For every start and velocity the offset is fitted by least squares, clipped to
    ``offset = (lo, hi)`` (default: the middle half of the sprite, ``size - span`` px wide, so the walls the
    path reflects off stay where the frame's borders put them), and the best path is kept. Returns per video
    ``residual`` (mean Euclidean distance in px between centroids and the fitted path; NaN where a frame is
    blank), ``is_bounce`` (``residual <= tol``) and the fitted ``velocity [B, 2]``."""
    c = centroids(videos, floor)  # [B, 2, T]
    B, _, T = c.shape
    size = videos.shape[-1]
    if not 0 < span < size:
        raise ParticlizeError(f"bounce_fit: span must be between 1 and the frame size - 1 ({size - 1}), got {span}; "
                              f"use size - digit_size (16 for the moving-digits defaults)")
    digit = size - span
    lo, hi = offset if offset is not None else (digit * 0.25, digit * 0.75)
    paths = _bounce_paths(span, T, max_speed)  # [K, T]
    diff = c[:, :, None, :] - paths[None, None]  # [B, 2, K, T]
    with np.errstate(invalid="ignore"):
        off = np.clip(diff.mean(-1, keepdims=True), lo, hi)
        r = diff - off
        sse = (r ** 2).sum(-1)  # [B, 2, K]
    best = np.nanargmin(np.where(np.isnan(sse), np.inf, sse), -1)  # [B, 2]
    res = np.take_along_axis(r, best[..., None, None], 2)[:, :, 0]  # [B, 2, T]
    residual = np.sqrt((res ** 2).sum(1)).mean(-1)  # [B]
    vel = paths[best, 1] - paths[best, 0]  # [B, 2]: the fitted path's first step
    return {"residual": residual, "is_bounce": np.nan_to_num(residual, nan=np.inf) <= tol, "velocity": vel}


def motion_check(videos: torch.Tensor, span: int, max_speed: int = 2, tol: float = 1.0) -> dict[str, float]:
    """Summary of `bounce_fit`: ``mean_residual_px`` (over videos without blank frames), ``median_residual_px``,
    ``bounce_share`` (videos whose path is a bounce within ``tol`` px; blank frames count as no bounce) and
    ``blank_videos`` (videos with at least one frame where nothing was drawn)."""
    fit = bounce_fit(videos, span, max_speed=max_speed, tol=tol)
    r = fit["residual"]
    ok = ~np.isnan(r)
    return {"mean_residual_px": float(r[ok].mean()) if ok.any() else float("nan"),
            "median_residual_px": float(np.median(r[ok])) if ok.any() else float("nan"),
            "bounce_share": float(fit["is_bounce"].mean()), "blank_videos": int((~ok).sum()), "tol_px": tol}
