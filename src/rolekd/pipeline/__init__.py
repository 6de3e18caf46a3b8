"""The two-stage role-wise pipeline: stage α (teacher schedule), stage β (student schedule), baselines."""

from ..stage_config import stage_config
from .run import QUICKSTART, StageRun, run_pipeline, stage_configs, stage_dir, stage_runs

__all__ = ["QUICKSTART", "StageRun", "run_pipeline", "stage_config", "stage_configs", "stage_dir", "stage_runs"]
