"""Reports: tables shaped like the paper's, schedule and reward figures, config and versions."""

from .report import build_report, collect, warm_up_report

__all__ = ["build_report", "collect", "warm_up_report"]
