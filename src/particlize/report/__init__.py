"""Figures for people: sample grids of video models (the HTML report will build on these)."""

from .figures import video_gif, video_grid

__all__ = ["video_grid", "video_gif"]
