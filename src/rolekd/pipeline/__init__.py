"""The two-stage role-wise pipeline: stage α (teacher schedule), stage β (student schedule), baselines."""

from .run import QUICKSTART, run_pipeline, stage_configs

__all__ = ["QUICKSTART", "run_pipeline", "stage_configs"]
