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
    teacher_random_schedule/  control: teacher with a random schedule matched to A_T (when listed)
    student_random_schedule/  control: KD + a random schedule matched to A_S (when listed)
    report.md, figures/

With ``pipeline.seeds=N`` every retraining stage runs N times, with seeds ``train.seed + k``; run ``k``
of stage ``S`` is ``S/`` for ``k = 0`` and ``S_seed<k>/`` otherwise. The searches run once, and every
student distils from the first seed's stage-α teacher (``teacher/``, the paper's fixed pre-trained
teacher), so stages pair up seed by seed.

Stages run as the dependency graph they are (:mod:`rolekd.pipeline.graph`): each starts once the teacher
and the schedule it needs exist, ``pipeline.workers`` at a time (default: one per CPU on CPU, each with
one thread; one per GPU on CUDA), in worker processes or as Ray tasks (``pipeline.executor=ray``). With
one worker the stages run one after another in this process and share one
:class:`~rolekd.experiment.Session` (the decoded data, the frozen teacher and MHGD's prepared attention
are made once); each worker process keeps its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, derive, load_config
from ..errors import OutOfMemory, RunFailed, UserError
from ..experiment import Session, check_config, check_run_dir, load_schedule, prepare_run_dir
from ..files import RunLock, atomic_write
from ..provenance import record_code
from ..report import build_report, warm_up_report
from ..stage_config import stage_config
from ..stages import STAGES, Stage, schedule_path, stage_dir
from .graph import Task, make_executor, plan, run_graph, with_threads

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


@dataclass(frozen=True)
class StageRun:
    stage: Stage
    dir: str  # the run directory under the pipeline's: stage_dir(stage.name, seed index)
    config: Config


def stage_runs(cfg: Config, root: Path | None = None) -> list[StageRun]:
    """Every run the pipeline makes, in order: each stage (seed 0 first), then the other seeds of the
    retraining stages."""
    root = Path(root or cfg.run_dir())
    if not cfg.pipeline.student.method:
        raise UserError("pipeline.student.method is not set: choose soft, dml, rkd, kdsvd, mhgd or iikd")
    stages = [st for st in STAGES if not st.baseline or st.name in cfg.pipeline.baselines]
    if cfg.pipeline.teacher_schedule:
        given = schedule_path("alpha_search", root, cfg.pipeline.teacher_schedule)
        if not given.is_file():
            raise UserError(f"pipeline.teacher_schedule: {given} not found: give a schedule file or a finished "
                            f"search run directory (with schedule.json)")
        stages = [st for st in stages if st.name != "alpha_search"]
    runs = [StageRun(st, stage_dir(st.name), stage_config(cfg, st, root)) for st in stages]
    for k in range(1, cfg.pipeline.seeds):
        runs += [StageRun(st, stage_dir(st.name, k), stage_config(cfg, st, root, k))
                 for st in stages if st.kind == "train"]
    check_random_controls(runs)
    return runs


def check_random_controls(runs: list[StageRun]) -> None:
    """Draw the random schedule of each random-schedule control whose learned schedule exists already
    (given, or written by a finished search): a schedule that cannot be read is one UserError line, before the
    control starts."""
    for r in runs:
        if r.stage.random_schedule and Path(r.config.augment.schedule).is_file():
            try:
                load_schedule(r.config)
            except UserError as e:
                raise UserError(f"pipeline stage {r.dir}: {e}") from None


def stretch_warnings(runs: list[StageRun]) -> list[str]:
    """One line per search whose schedule is stretched onto more retraining epochs than it searched (PBA
    searches as many epochs as it retrains; the first evidence study's 4x stretch learned nothing)."""
    out = []
    for r in runs:
        if r.stage.kind != "search":
            continue
        users = [u for u in runs if u.stage.schedule == r.stage.name and u.stage.kind == "train"]
        epochs = max((u.config.train.epochs for u in users), default=0)
        searched = r.config.search.epochs
        if epochs > searched:
            out.append(f"{r.dir} searches {searched} epochs and its schedule is stretched x{epochs / searched:.3g} "
                       f"onto {epochs} retraining epochs; PBA searches as many epochs as it retrains "
                       f"(search.epochs={epochs}; benchmarks/evidence/SEARCH.md)")
    return out


def stage_result_file(root: Path, d: str, kind: str) -> Path:
    """Where stage run ``d`` of a pipeline rooted at ``root`` keeps its results."""
    return Path(root) / d / ("search.json" if kind == "search" else "result.json")


def check_stage_results(root: Path, tasks, results: dict) -> None:
    """Every stage that finished has its results under the run root, where the report reads them: else one
    RunFailed line (a stage that ran on a node that wrote elsewhere, e.g. under its own working directory)."""
    for t in tasks:
        f = stage_result_file(root, t.dir, t.kind)
        if t.dir in results and not f.is_file():
            node = results[t.dir].get("ray_node")
            raise RunFailed(f"stage {t.dir} finished{f' on Ray node {node[:12]}' if node else ''} but {f} does not "
                            f"exist: its results were written elsewhere; the run directory must be on storage "
                            f"every node shares, mounted at the same path (docs/CLUSTER.md)")


def stage_configs(cfg: Config, root: Path | None = None) -> dict[str, Config]:
    """The config of every run the pipeline makes, by run directory name, in order."""
    return {r.dir: r.config for r in stage_runs(cfg, root)}


def pipeline_config(config: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """The pipeline's config: the YAML file ``config`` (default: the quickstart) with ``overrides``."""
    return load_config(config if config is not None else QUICKSTART, overrides)


def run_pipeline(config: Config | str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """Run (or resume) every stage, then write ``report.md``. Returns {stage: result}.

    ``config``: a :class:`~rolekd.config.Config`, or a YAML file (default: the quickstart) with
    ``overrides``. The roles' networks and KD methods and the run directory are checked before anything
    is written; the run directory is locked for this process while the pipeline runs (a second process
    gets a UserError)."""
    if isinstance(config, Config):
        if overrides:
            raise ValueError("run_pipeline: overrides apply to a config file, not to a Config")
        cfg = config
    else:
        cfg = pipeline_config(config, overrides)
    for role in (cfg.pipeline.teacher, cfg.pipeline.student):  # networks and KD method, before any directory
        check_config(derive(cfg, "pipeline", model=role.model, quant=role.quant, pipeline=None,
                            kd={"method": role.method, "teacher": None}), files=False, search=True)
    check_run_dir(cfg, cfg.run_dir())  # read-only: nothing is written into a foreign or another run's directory
    with RunLock(cfg.run_dir()):
        runs = stage_runs(cfg, cfg.run_dir())  # its checks of given schedules, before config.yaml is written
        root = prepare_run_dir(cfg)
        record_code(root)
        pl = plan(cfg, len(runs))
        tasks = [with_threads(Task(r.dir, r.stage.kind, r.config), pl.threads) for r in runs]
        where = {"inline": "one after another in this process", "local": f"{pl.workers} worker processes",
                 "ray": f"Ray tasks, at most {pl.workers} at once"}[pl.executor]
        threads = f", {pl.threads} thread(s) each" if pl.threads else ""
        print(f"== rolekd run: {len(tasks)} stage runs, {where}{threads}", flush=True)
        searches = {r.dir for r in runs if r.stage.kind == "search"}
        for line in stretch_warnings(runs):
            print(f"== rolekd run: warning: {line}", flush=True)

        def after(d: str, result: dict) -> None:
            if d in searches:
                check_random_controls(runs)  # as soon as a learned schedule exists, before its control starts
        with Session() as session:
            try:
                results = run_graph(tasks, make_executor(cfg, pl, session, root), on_done=after,
                                    on_last=warm_up_report)
            except OutOfMemory as e:
                if pl.workers > max(1, pl.gpus):  # several stages shared a device
                    shared = "the GPU" if pl.gpus <= 1 else f"{pl.gpus} GPUs"
                    raise OutOfMemory(str(e).replace("; then rerun", f" or pipeline.workers (now {pl.workers}: the "
                                                     f"stages running at once share {shared}); then rerun")) from None
                raise
        check_stage_results(root, tasks, results)
        atomic_write(root / "results.json", json.dumps(results, indent=2, default=str))
        report = build_report(root)
    print(f"report: {report}")
    return results
