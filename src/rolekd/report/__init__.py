"""Reports: tables shaped like the paper's, schedule and reward figures, config and versions."""

from .report import build_report, collect

__all__ = ["build_report", "collect"]
