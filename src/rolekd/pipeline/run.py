"""``rolekd run``: stage α and stage β end to end, with the paper's baselines, then the report.

One run directory holds every stage of :data:`rolekd.stages.STAGES` in a sub-directory; each stage is
an ordinary ``rolekd search`` or ``rolekd train``/``distill`` run, so rerunning the same command skips
finished stages and resumes an interrupted one:

    alpha_search/             PBA search of the teacher's schedule A_T (reduced split)
    teacher/                  teacher retrained on the full training set with A_T
    vanilla_teacher/          baseline: teacher with base augmentation only
    beta_search/              PBA search of the student's schedule A_S, reward = KD student accuracy
    student/                  low-bit student, KD from teacher/, schedule A_S        (stage β)
    vanilla_student/          baseline: low-bit student from the teacher's weights, no KD
    only_kd/                  baseline: KD, base augmentation only (no learned schedule)
    student_teacher_schedule/ baseline: KD with the teacher's schedule A_T (the paper's Table 3)
    report.md, figures/

All stages of one run share one :class:`~rolekd.experiment.Session` (the decoded data, the frozen
teacher and MHGD's prepared attention are made once).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import Config, derive, load_config
from ..errors import UserError
from ..experiment import Session, prepare_run_dir, search_from_config, train_from_config
from ..files import atomic_write
from ..report import build_report
from ..stages import STAGES, TEACHER_STAGE, Stage

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def stage_config(cfg: Config, st: Stage, root: Path) -> Config:
    """The config of pipeline stage ``st`` of the pipeline ``cfg`` whose run directory is ``root``."""
    role = cfg.pipeline.teacher if st.role == "teacher" else cfg.pipeline.student
    train = dict(role.train)
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
        augment = {"schedule": str(root / st.schedule / "schedule.json"), "schedule_epochs": None,
                   "multiplier": 1.0, "fit_epochs": True}
    return derive(cfg, f"pipeline stage {st.name}", name=f"{cfg.name}/{st.name}", out=str(root / st.name),
                  model=role.model, quant=role.quant, train=train, kd=kd, augment=augment, pipeline=None,
                  **changes)


def stage_configs(cfg: Config, root: Path | None = None) -> dict[str, Config]:
    """The config of every stage the pipeline will run, in order."""
    root = Path(root or cfg.run_dir())
    if not cfg.pipeline.student.method:
        raise UserError("pipeline.student.method is not set: choose soft, dml, rkd, kdsvd, mhgd or iikd")
    return {st.name: stage_config(cfg, st, root) for st in STAGES
            if not st.baseline or st.name in cfg.pipeline.baselines}


def run_pipeline(config: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """Run (or resume) every stage, then write ``report.md``. Returns {stage: result}."""
    cfg = load_config(config if config is not None else QUICKSTART, overrides)
    root = prepare_run_dir(cfg)
    stages = stage_configs(cfg, root)
    kinds = {st.name: st.kind for st in STAGES}
    results: dict[str, dict] = {}
    with Session() as session:
        for i, (name, scfg) in enumerate(stages.items(), 1):
            print(f"== rolekd run: stage {i}/{len(stages)}: {name} -> {scfg.out}", flush=True)
            if kinds[name] == "search":
                results[name] = search_from_config(scfg, session=session)
            else:
                results[name] = train_from_config(scfg, log_name=name, session=session)
    atomic_write(root / "results.json", json.dumps(results, indent=2, default=str))
    report = build_report(root)
    print(f"report: {report}")
    return results
