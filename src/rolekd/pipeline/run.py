"""``rolekd run``: stage α and stage β end to end, with the paper's baselines, then the report.

One run directory holds every stage in a sub-directory; each stage is an ordinary ``rolekd search``
or ``rolekd train``/``distill`` run, so rerunning the same command skips finished stages and resumes
an interrupted one:

    alpha_search/             PBA search of the teacher's schedule A_T (reduced split)
    teacher/                  teacher retrained on the full training set with A_T
    vanilla_teacher/          baseline: teacher with base augmentation only
    beta_search/              PBA search of the student's schedule A_S, reward = KD student accuracy
    student/                  low-bit student, KD from teacher/, schedule A_S        (stage β)
    vanilla_student/          baseline: low-bit student from the teacher's weights, no KD
    only_kd/                  baseline: KD, base augmentation only (no learned schedule)
    student_teacher_schedule/ baseline: KD with the teacher's schedule A_T (the paper's Table 3)
    report.md, figures/
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import Config, RoleConfig, load_config, validate_config
from ..errors import UserError

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"

STAGES = ("alpha_search", "teacher", "vanilla_teacher", "beta_search", "student", "vanilla_student", "only_kd",
          "student_teacher_schedule")


def _role_config(cfg: Config, role: RoleConfig, stage: str, root: Path, *, search: bool = False,
                 kd: bool = False, schedule: Path | None = None, teacher: Path | None = None) -> Config:
    d = cfg.model_dump(mode="json")
    d["name"] = f"{cfg.name}/{stage}"
    d["out"] = str(root / stage)
    d["model"] = {"name": role.model, "kwargs": dict(role.model_kwargs)}
    d["quant"] = {"w_bits": role.w_bits, "a_bits": role.a_bits}
    d["train"].update(role.train)
    if search:
        d["train"].update(role.search_train)
        d["data"]["split"] = "reduced"
        d["search"]["role"] = "student" if teacher is not None else "teacher"
    else:
        d["data"]["split"] = "full"
    d["kd"]["method"] = role.method if kd else None
    d["kd"]["teacher"] = str(teacher) if teacher is not None else None
    if schedule is not None:
        d["augment"]["schedule"] = str(schedule)
        d["augment"]["schedule_epochs"] = None
        # map the searched schedule proportionally onto the retraining's epochs (PBA's multiplier for
        # integer ratios, without its truncation for the others)
        d["augment"]["multiplier"] = 1.0
        d["augment"]["fit_epochs"] = True
    d["pipeline"] = {}
    return validate_config(d, f"pipeline stage {stage}")


def stage_configs(cfg: Config, root: Path | None = None) -> dict[str, Config]:
    """The config of every stage the pipeline will run, in order."""
    root = Path(root or cfg.run_dir())
    p = cfg.pipeline
    if not p.student.method:
        raise UserError("pipeline.student.method is not set: choose soft, dml, rkd, kdsvd, mhgd or iikd")
    a_t = root / "alpha_search" / "schedule.json"
    a_s = root / "beta_search" / "schedule.json"
    teacher = root / "teacher"
    out = {
        "alpha_search": _role_config(cfg, p.teacher, "alpha_search", root, search=True),
        "teacher": _role_config(cfg, p.teacher, "teacher", root, schedule=a_t),
        "vanilla_teacher": _role_config(cfg, p.teacher, "vanilla_teacher", root),
        "beta_search": _role_config(cfg, p.student, "beta_search", root, search=True, kd=True, teacher=teacher),
        "student": _role_config(cfg, p.student, "student", root, kd=True, schedule=a_s, teacher=teacher),
        "vanilla_student": _role_config(cfg, p.student, "vanilla_student", root, teacher=teacher),
        "only_kd": _role_config(cfg, p.student, "only_kd", root, kd=True, teacher=teacher),
        "student_teacher_schedule": _role_config(cfg, p.student, "student_teacher_schedule", root, kd=True,
                                                 schedule=a_t, teacher=teacher),
    }
    return {k: v for k, v in out.items() if k not in {
        "vanilla_teacher", "vanilla_student", "only_kd", "student_teacher_schedule"} or k in p.baselines}


def run_pipeline(config: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """Run (or resume) every stage, then write ``report.md``. Returns {stage: result}."""
    from ..report import build_report
    from ..search.run import search_from_config
    from ..train.run import prepare_run_dir, train_from_config

    cfg = load_config(config if config is not None else QUICKSTART, overrides)
    root = prepare_run_dir(cfg)
    stages = stage_configs(cfg, root)
    results: dict[str, dict] = {}
    for i, (stage, scfg) in enumerate(stages.items(), 1):
        print(f"== rolekd run: stage {i}/{len(stages)}: {stage} -> {scfg.out}", flush=True)
        if stage.endswith("_search"):
            results[stage] = search_from_config(scfg)
        else:
            results[stage] = train_from_config(scfg, log_name=stage)
    (root / "results.json").write_text(json.dumps(results, indent=2, default=str))
    report = build_report(root)
    print(f"report: {report}")
    return results
