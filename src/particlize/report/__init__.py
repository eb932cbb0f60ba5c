"""The HTML report (`write_report`: one self-contained page from a compress run, a sweep, a saved model with its
task, or an ``analyze`` CSV) and figures for people (sample grids of video models).

    from particlize.report import write_report
    write_report("out/run", task="vader-sentiment")            # -> out/run/report.html
"""

from .data import ReportData, gather
from .figures import video_gif, video_grid
from .render import render, write_report

__all__ = ["ReportData", "gather", "render", "video_grid", "video_gif", "write_report"]
