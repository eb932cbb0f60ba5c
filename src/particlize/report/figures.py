"""Figures of generated videos: a PNG grid (one row per video, one column per frame) and an animated GIF.

    from particlize.report import video_grid, video_gif
    videos = model.sample(range(10), steps=50, seed=0)          # [B, 1, T, H, W] in [0, 1]
    video_grid(videos, "samples.png", row_labels=[f"digit {i}" for i in range(10)])
    video_gif(videos, "samples.gif", ncols=5)

Both write atomically (a temporary file renamed into place) and refuse to overwrite without ``force``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import ParticlizeError


def _check(videos: torch.Tensor, path: str | os.PathLike[str], force: bool) -> tuple[np.ndarray, Path]:
    if not isinstance(videos, torch.Tensor) or videos.ndim != 5 or videos.shape[1] not in (1, 3):
        shape = tuple(videos.shape) if isinstance(videos, torch.Tensor) else type(videos).__name__
        raise ParticlizeError(f"videos must be a tensor [B, C, T, H, W] with 1 or 3 channels, got {shape}")
    path = Path(path)
    if path.exists() and not force:
        raise ParticlizeError(f"{path} already exists; pass force=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    v = videos.detach().float().clamp(0, 1).cpu().permute(0, 2, 3, 4, 1).numpy()  # [B, T, H, W, C]
    return v, path


def _replace(tmp: Path, path: Path) -> Path:
    os.replace(tmp, path)
    return path


def video_grid(
    videos: torch.Tensor,
    path: str | os.PathLike[str],
    *,
    row_labels: Sequence[str] | None = None,
    title: str | None = None,
    force: bool = False,
) -> Path:
    """A PNG with one row per video and one column per frame (``videos [B, C, T, H, W]`` in [0, 1])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v, path = _check(videos, path, force)
    B, T = v.shape[:2]
    fig, axes = plt.subplots(B, T, figsize=(0.75 * T + (0.9 if row_labels else 0.2), 0.75 * B + 0.5), squeeze=False)
    for b in range(B):
        for t in range(T):
            ax = axes[b, t]
            img = v[b, t, :, :, 0] if v.shape[-1] == 1 else v[b, t]
            ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if b == 0:
                ax.set_title(f"t={t}", fontsize=7)
        if row_labels:
            axes[b, 0].set_ylabel(row_labels[b], fontsize=7, rotation=0, ha="right", va="center")
    top = 1.0
    if title:
        fig.suptitle(title, fontsize=9)
        top -= 0.3 / fig.get_figheight()  # a line for the title above the frame numbers
    fig.tight_layout(pad=0.3, h_pad=0.2, w_pad=0.1, rect=(0, 0, 1, top))
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100, facecolor="white")
    plt.close(fig)
    return _replace(tmp, path)


def video_gif(
    videos: torch.Tensor,
    path: str | os.PathLike[str],
    *,
    ncols: int = 5,
    scale: int = 3,
    fps: float = 6.0,
    force: bool = False,
) -> Path:
    """An animated GIF tiling the videos ``ncols`` per row (pixels enlarged ``scale`` times, 1-pixel
    grey gaps), one GIF frame per video frame, looping."""
    from PIL import Image

    v, path = _check(videos, path, force)
    B, T, H, W, C = v.shape
    ncols = max(1, min(ncols, B))
    nrows = -(-B // ncols)
    gap = 1
    canvas = np.full((T, nrows * (H + gap) + gap, ncols * (W + gap) + gap, C), 0.35, dtype=np.float32)
    for b in range(B):
        r, c = divmod(b, ncols)
        y, x = gap + r * (H + gap), gap + c * (W + gap)
        canvas[:, y:y + H, x:x + W] = v[b]
    canvas = canvas.repeat(scale, axis=1).repeat(scale, axis=2)
    pixels = np.round(canvas * 255).astype(np.uint8)
    frames = [Image.fromarray(f[..., 0] if C == 1 else f) for f in pixels]
    tmp = path.with_name(f".{path.name}.tmp.gif")
    frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    return _replace(tmp, path)
