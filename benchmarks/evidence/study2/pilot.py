"""Study 2's pilot (issue 31): which search settings learn a useful schedule at the first study's scale?

    python benchmarks/evidence/study2/pilot.py --data-path ../shared/data/cifar10_jpeg.npz \
        --pba-schedule ../shared/fixtures/pba/rcifar10_16_wrn.txt --out runs/pilot2 --arms ARM [ARM ...]

Every arm is a set of overrides of the first study's config (``configs/evidence.yaml``: resnet_tiny, the
first 1,000 images of PBA's reduced CIFAR-10 permutation, 120 epochs, crop + flip, no Cutout, all 10,000 test
images). A *search arm* runs that pipeline's search of its role (teacher: ``alpha_search``; student:
``beta_search`` with II-KD from a teacher arm's retrained teacher) with the arm's search settings, then
retrains the role with the found schedule (``teacher`` / ``student``) and with a random schedule matched to it
(``teacher_random_schedule`` / ``student_random_schedule``), 3 seeds each. The *fixed arms* retrain with crop +
flip only (``vanilla_teacher`` / ``only_kd``), with PBA's published schedule, and with the first study's
committed A_T. Every run is exactly the pipeline stage it names (``rolekd.pipeline.stage_configs``), run as
ordinary ``rolekd`` runs on ``--workers`` worker processes with one thread each; rerunning the command skips
finished runs and resumes the others. Retraining seeds 10, 11, 12 (the first study used 0-4, the issue's lead
5-7); seeds pair runs across arms.

The table (``<out>/pilot_<role>.md``, ``.json``): each arm's test accuracy (mean ± std over the seeds), its
schedule's active epochs and slots, and the paired differences (95% t interval, paired-t p) against crop +
flip, PBA's schedule and its own matched random schedule.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from rolekd.augment.schedule import Schedule
from rolekd.config import derive
from rolekd.pipeline.run import pipeline_config, stage_configs
from rolekd.pipeline.graph import ProcessExecutor, Task, run_graph

ROOT = Path(__file__).resolve().parents[3]
EVIDENCE = ROOT / "configs" / "evidence.yaml"
SEEDS = 3
FIRST_SEED = 10

LEAD = ["search.epochs=120", "data.val_size=10000"]  # the lead: no stretch, 10,000 validation images
TEACHER_ARMS: dict[str, list[str]] = {
    # search arms (the role's search + learned and matched-random retraining)
    "study": ["search.epochs=30", "data.val_size=2000"],  # the first study's search settings (reference)
    "lead": LEAD,
    "lead_seed1": LEAD + ["search.seed=1"],
    "window3": LEAD + ["search.reward_window=3"],
    "random_init": LEAD + ["search.init=random"],
    "window3_random_init": LEAD + ["search.reward_window=3", "search.init=random"],
    "burn_in": LEAD + ["search.burn_in=12"],
    "pop16": LEAD + ["search.population=16"],
}
STUDENT_ARMS: dict[str, list[str]] = {
    "lead": LEAD,
    "window3": LEAD + ["search.reward_window=3"],
    "window3_random_init": LEAD + ["search.reward_window=3", "search.init=random"],
}
FIXED = ("crop+flip", "pba", "study_A_T")  # retraining only: crop + flip, PBA's published schedule, the study's A_T


def base_overrides(a) -> list[str]:
    return [f"data.name={a.dataset}", f"data.path={Path(a.data_path).resolve()}", f"pipeline.seeds={SEEDS}",
            f"train.seed={FIRST_SEED}", "train.device=cpu", "train.progress=false",
            "pipeline.baselines=[vanilla_teacher,only_kd,teacher_random_schedule,student_random_schedule]"]


def arm_runs(a, role: str, arm: str, out: Path, teacher_arm: str | None) -> dict[str, Task]:
    """The runs of one arm, by directory under ``out``."""
    over = base_overrides(a)
    root = out / role / arm
    if arm in FIXED:
        sched = {"crop+flip": None, "pba": out / "pba_schedule.json", "study_A_T": a.study_at}[arm]
        # a given schedule in place of A_T (teacher) or A_S (student; crop+flip = only KD)
        over = over + ([f"pipeline.teacher_schedule={sched}"] if sched else [])
    else:
        over = over + (TEACHER_ARMS if role == "teacher" else STUDENT_ARMS)[arm]
    cfg = pipeline_config(EVIDENCE, over + list(a.set) + [f"out={root}"])
    configs = stage_configs(cfg, root)
    tasks: dict[str, Task] = {}
    if role == "teacher":
        want = {"crop+flip": "vanilla_teacher"}.get(arm, "teacher")
        keep = [want] + ([] if arm in FIXED else ["alpha_search", "teacher_random_schedule"])
    else:
        # the frozen teacher: the teacher arm's first-seed retrained teacher, linked as this root's teacher/
        tdir = out / "teacher" / teacher_arm / "teacher"
        link = root / "teacher"
        root.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(tdir.resolve(), target_is_directory=True)
        want = "only_kd" if arm == "crop+flip" else "student"
        keep = [want] + ([] if arm in FIXED else ["beta_search", "student_random_schedule"])
        if arm in ("pba", "study_A_T"):
            # a student with a given schedule: the KD + A_T stage, with the given schedule as A_T
            want, keep = "student_teacher_schedule", ["student_teacher_schedule"]
    for d, c in configs.items():
        stage = d.split("_seed")[0]
        if stage in keep:
            c = derive(c, f"pilot {arm}/{d}", train={"threads": 1})
            tasks[f"{role}/{arm}/{d}"] = Task(f"{role}/{arm}/{d}", "search" if stage.endswith("search") else "train", c)
    return tasks


def active(schedule: Schedule) -> tuple[int, float]:
    """(epochs with at least one active slot, mean active slots over those epochs)."""
    counts = [sum(1 for i in range(0, len(p), 2) if p[i] > 0) for p in schedule.policies]
    on = [c for c in counts if c]
    return len(on), (statistics.mean(on) if on else 0.0)


def paired(a: list[float], b: list[float]) -> str:
    from scipy import stats

    d = [x - y for x, y in zip(a, b)]
    m = statistics.mean(d)
    if len(d) < 2 or statistics.stdev(d) == 0:
        return f"{m:+.2f}"
    h = stats.t.ppf(0.975, len(d) - 1) * statistics.stdev(d) / len(d) ** 0.5
    p = stats.ttest_rel(a, b).pvalue
    return f"{m:+.2f} [{m - h:+.2f}, {m + h:+.2f}] p={p:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-path", required=True)
    ap.add_argument("--dataset", default="cifar10-jpeg")
    ap.add_argument("--pba-schedule", required=True, help="PBA's published schedule (rcifar10_16_wrn.txt)")
    ap.add_argument("--study-at", default=str(ROOT / "benchmarks/evidence/run/alpha_search/schedule.json"))
    ap.add_argument("--role", choices=["teacher", "student"], default="teacher")
    ap.add_argument("--teacher-arm", default="lead", help="student role: the teacher arm whose teacher distils")
    ap.add_argument("--arms", nargs="+", required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="runs/pilot2")
    ap.add_argument("--set", nargs="*", default=[], help="overrides added to every arm (a smoke test: epochs=2 ...)")
    a = ap.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    Schedule.load(a.pba_schedule, epochs=200).save(out / "pba_schedule.json")
    arms = list(dict.fromkeys(a.arms))
    known = set(FIXED) | set(TEACHER_ARMS if a.role == "teacher" else STUDENT_ARMS)
    bad = [x for x in arms if x not in known]
    if bad:
        raise SystemExit(f"unknown arm(s) {bad}; choose from {sorted(known)}")
    tasks: dict[str, Task] = {}
    for arm in arms:
        tasks.update(arm_runs(a, a.role, arm, out, a.teacher_arm))
    t0 = time.time()
    print(f"pilot ({a.role}): {len(tasks)} runs of arms {arms} on {a.workers} workers", flush=True)
    results = run_graph(list(tasks.values()), ProcessExecutor(a.workers))
    wall = time.time() - t0
    summarise(a, out, arms, tasks, results, wall)


def summarise(a, out: Path, arms: list[str], tasks: dict[str, Task], results: dict, wall: float) -> None:
    role = a.role
    acc: dict[str, list[float]] = {}
    rnd: dict[str, list[float]] = {}
    searches: dict[str, dict] = {}
    for d, t in tasks.items():
        _, arm, run = d.split("/")
        stage = run.split("_seed")[0]
        r = results[d]
        if t.kind == "search":
            sched = Schedule.load(Path(t.config.out) / "schedule.json")
            n_on, slots = active(sched)
            searches[arm] = {"best_val_acc": r["best_val_acc"], "exploits": r["exploits"],
                             "wall_s": r["wall_time_s"], "active_epochs": n_on, "epochs": len(sched),
                             "mean_active_slots": round(slots, 1)}
        elif stage.endswith("random_schedule"):
            rnd.setdefault(arm, []).append(100 * r["test_acc"])
        else:
            acc.setdefault(arm, []).append(100 * r["test_acc"])
    base = acc.get("crop+flip")
    pba = acc.get("pba")
    what = "teacher (fp32)" if role == "teacher" else "4-bit student with II-KD"
    lines = [f"Pilot, {role} role: {what}, resnet_tiny, first 1,000 images of PBA's reduced CIFAR-10, 120 epochs, "
             f"all 10,000 test images; seeds {FIRST_SEED}-{FIRST_SEED + SEEDS - 1} paired across arms; wall "
             f"{wall:.0f} s on {a.workers} workers (this invocation).", "",
             "| arm | search: active epochs / slots, exploits, best val, wall | test acc (%) | − crop+flip | − PBA | "
             "− its matched random | matched random (%) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    ms = lambda v: f"{statistics.mean(v):.2f} ± {statistics.stdev(v) if len(v) > 1 else 0:.2f}"  # noqa: E731
    for arm in arms:
        if arm not in acc:
            continue
        s = searches.get(arm)
        desc = "—" if s is None else (f"{s['active_epochs']}/{s['epochs']} epochs, {s['mean_active_slots']} slots, "
                                      f"{s['exploits']} exploits, {100 * s['best_val_acc']:.2f}%, {s['wall_s'] / 60:.0f} min")
        v = acc[arm]
        lines.append(f"| {arm} | {desc} | {ms(v)} | {paired(v, base) if base and arm != 'crop+flip' else '—'} | "
                     f"{paired(v, pba) if pba and arm != 'pba' else '—'} | "
                     f"{paired(v, rnd[arm]) if arm in rnd else '—'} | {ms(rnd[arm]) if arm in rnd else '—'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    (out / f"pilot_{role}.md").write_text(text)
    (out / f"pilot_{role}.json").write_text(json.dumps(
        {"wall_s": wall, "arms": arms, "searches": searches, "test_acc": acc, "random_test_acc": rnd,
         "runs": {d: results[d] for d in tasks}}, indent=2, default=str))


if __name__ == "__main__":
    main()
