"""Figures: sample grids of videos (PNG) and animations (GIF)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import particlize as pz
from particlize.report import video_gif, video_grid


def _videos(B: int = 3, T: int = 4, H: int = 8, W: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand((B, 1, T, H, W), generator=g)


def test_gif_tiles_every_video_frame_by_frame(tmp_path):
    v = _videos()
    path = video_gif(v, tmp_path / "a.gif", ncols=2, scale=2)
    im = Image.open(path)
    assert im.n_frames == 4
    # 2 columns x 2 rows of 6x8 videos with 1-pixel gaps, enlarged twice
    assert im.size == ((2 * (6 + 1) + 1) * 2, (2 * (8 + 1) + 1) * 2)
    im.seek(2)
    frame = np.asarray(im.convert("L"), dtype=np.float32) / 255
    want = v[1, 0, 2].numpy().repeat(2, 0).repeat(2, 1)  # video 1 sits in row 0, column 1
    got = frame[2:2 + 16, (1 + 6 + 1) * 2:(1 + 6 + 1) * 2 + 12]
    assert np.abs(got - want).max() < 2 / 255 + 1e-6


def test_png_grid_and_refusals(tmp_path):
    path = video_grid(_videos(), tmp_path / "g.png", row_labels=["a", "b", "c"], title="t")
    assert Image.open(path).format == "PNG" and not list(tmp_path.glob(".*tmp*"))
    with pytest.raises(pz.ParticlizeError, match="already exists"):
        video_grid(_videos(), path)
    video_grid(_videos(), path, force=True)
    with pytest.raises(pz.ParticlizeError, match=r"\[B, C, T, H, W\]"):
        video_gif(torch.rand(2, 8, 8), tmp_path / "x.gif")
