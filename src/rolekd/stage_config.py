"""The config of each run of a pipeline: one stage of :data:`rolekd.stages.STAGES` (and one of its seeds) of a
pipeline config, as the pipeline runs it and the report describes it."""

from __future__ import annotations

from pathlib import Path

from .config import Config, derive
from .stages import TEACHER_STAGE, Stage, schedule_path, stage_dir


def stage_config(cfg: Config, st: Stage, root: Path, k: int = 0) -> Config:
    """The config of seed run ``k`` of pipeline stage ``st`` of ``cfg`` whose run directory is ``root``."""
    role = cfg.pipeline.teacher if st.role == "teacher" else cfg.pipeline.student
    train = dict(role.train)
    if k:
        train["seed"] = int(train.get("seed", cfg.train.seed)) + k
    changes: dict = {}
    if st.kind == "search":
        train.update(role.search_train)
        changes["search"] = {"role": st.role}
    else:
        changes["data"] = {"split": "full"}
    teacher = root / TEACHER_STAGE if (st.kd or st.init == "teacher") else None
    kd = {"method": role.method if st.kd else None, "teacher": str(teacher) if teacher is not None else None}
    if teacher is not None:
        kd["init_from_teacher"] = st.init == "teacher" and cfg.kd.init_from_teacher
    augment = {}
    if st.schedule is not None:
        # map the searched schedule proportionally onto the retraining's epochs (PBA's multiplier for
        # integer ratios, without its truncation for the others)
        augment = {"schedule": str(schedule_path(st.schedule, root, cfg.pipeline.teacher_schedule)),
                   "schedule_epochs": None, "multiplier": 1.0, "fit_epochs": True}
        if st.random_schedule:  # a control: a random schedule of its own per seed run, drawn from its seed
            augment["matched_random_seed"] = int(train.get("seed", cfg.train.seed))
    elif st.base_only:
        augment = {"cutout": 0}  # the paper's baselines: random crop and horizontal flip only
    d = stage_dir(st.name, k)
    return derive(cfg, f"pipeline stage {d}", name=f"{cfg.name}/{d}", out=str(root / d),
                  model=role.model, quant=role.quant, train=train, kd=kd, augment=augment, pipeline=None,
                  **changes)
