"""The pipeline's stage graph: what each stage waits for (the paper's definitions, written out), and the
runner's rules (a stage starts only after what it needs finished; at most ``slots`` at once; the critical
path first; a failure stops new starts, lets the runs in flight finish and is raised as one line).

The runner is driven here by a scripted executor that finishes the submitted runs in an order the test
chooses; the real executors (worker processes, Ray) run the micro pipeline in tests/test_pipeline.py."""

import concurrent.futures as cf
import random

import pytest

from rolekd.config import load_config
from rolekd.errors import UserError
from rolekd.pipeline import stage_runs
from rolekd.pipeline.graph import Task, dependencies, plan, run_graph

CFG = ["pipeline.seeds=2", "pipeline.student.method=iikd", "pipeline.student.quant.w_bits=4",
       "pipeline.student.quant.a_bits=4"]

# what each stage reads (paper §3-§5): the stage-α teacher is trained with A_T; the student search distils
# from it; every KD stage distils from it; a stage with a learned schedule needs the search that makes it
NEEDS = {
    "alpha_search": set(),
    "teacher": {"alpha_search"},
    "vanilla_teacher": set(),
    "beta_search": {"teacher"},
    "student": {"teacher", "beta_search"},
    "vanilla_student": set(),
    "student_alpha": {"alpha_search"},
    "only_kd": {"teacher"},
    "student_teacher_schedule": {"teacher", "alpha_search"},
    # the random-schedule controls draw their schedule from the learned one
    "teacher_random_schedule": {"alpha_search"},
    "student_random_schedule": {"teacher", "beta_search"},
}
ALL = "pipeline.baselines=[" + ",".join(s for s in NEEDS if s not in ("alpha_search", "teacher", "beta_search",
                                                                       "student")) + "]"


def tasks(tmp_path, *extra):
    cfg = load_config(None, CFG + [f"out={tmp_path / 'run'}"] + list(extra))
    return [Task(r.dir, r.stage.kind, r.config) for r in stage_runs(cfg)]


def test_each_stage_waits_for_the_teacher_and_the_schedule_it_reads(tmp_path):
    ts = tasks(tmp_path, ALL)
    needs = dependencies(ts)
    assert set(needs) == set(NEEDS) | {f"{s}_seed1" for s in NEEDS if not s.endswith("_search")}
    for d, want in needs.items():
        # every seed distils from the first seed's teacher
        assert want == NEEDS[d.removesuffix("_seed1")], d


def test_a_given_teacher_schedule_leaves_the_teacher_waiting_for_nothing(tmp_path):
    sched = tmp_path / "a_t.json"
    sched.write_text('{"policies": [[0]]}')
    needs = dependencies(tasks(tmp_path, f"pipeline.teacher_schedule={sched}"))
    assert "alpha_search" not in needs
    assert needs["teacher"] == set() and needs["student_teacher_schedule"] == {"teacher"}


class Scripted:
    """An executor whose runs finish when the test says: ``pick(running)`` chooses which one finishes next;
    ``fail`` names runs that raise. It records, at each start, which runs had finished."""

    name = "scripted"

    def __init__(self, slots, pick, fail=()):
        self.slots, self.pick, self.fail = slots, pick, set(fail)
        self.running: dict[cf.Future, Task] = {}
        self.finished: list[str] = []
        self.starts: list[tuple[str, frozenset, int]] = []

    def submit(self, task):
        fut = cf.Future()
        self.starts.append((task.dir, frozenset(self.finished), len(self.running) + 1))
        self.running[fut] = task
        return fut

    def wait(self, futures, timeout=None):
        fut = self.pick(list(self.running))
        task = self.running.pop(fut)
        self.finished.append(task.dir)
        if task.dir in self.fail:
            fut.set_exception(UserError("planted failure"))
        else:
            fut.set_result({"dir": task.dir})
        return {fut}, set(futures) - {fut}

    def close(self, cancel=False):
        self.closed = cancel


@pytest.mark.parametrize("slots,seed", [(1, 0), (2, 0), (3, 1), (8, 2)])
def test_a_stage_starts_only_after_what_it_needs_finished(tmp_path, slots, seed):
    ts = tasks(tmp_path, ALL)
    needs = dependencies(ts)
    rng = random.Random(seed)
    ex = Scripted(slots, lambda running: rng.choice(running))  # runs finish in a random order
    results = run_graph(ts, ex)
    assert list(results) == [t.dir for t in ts]
    assert sorted(d for d, _, _ in ex.starts) == sorted(t.dir for t in ts)  # each started once
    for d, done, at_once in ex.starts:
        assert needs[d] <= done, f"{d} started before {needs[d] - done} finished"
        assert at_once <= slots


def test_the_critical_path_starts_first(tmp_path):
    ts = tasks(tmp_path)
    ex = Scripted(2, lambda running: running[0])  # first in, first out
    run_graph(ts, ex)
    order = [d for d, _, _ in ex.starts]
    # the α search (everything with A_T and every KD stage waits for it) first, then the teacher before any
    # other retraining, the β search as soon as the teacher exists
    assert order[0] == "alpha_search"
    assert order.index("teacher") < min(order.index(d) for d in ("teacher_seed1", "vanilla_teacher_seed1"))
    assert order.index("beta_search") < order.index("only_kd_seed1")


def _downstream(d: str) -> int:
    """How many runs wait for ``d``, directly or through others, from NEEDS (every seed of a retraining stage
    distils from the first seed's teacher, so the seed-1 runs wait like seed 0's and nothing waits for them)."""
    stage = d.removesuffix("_seed1")
    if d.endswith("_seed1"):
        return 0
    after = {s: {t for t, ns in NEEDS.items() if s in ns} for s in NEEDS}
    seen: set[str] = set()
    todo = [stage]
    while todo:
        for t in after[todo.pop()] - seen:
            seen.add(t)
            todo.append(t)
    return sum(1 if t.endswith("_search") else 2 for t in seen)  # each retraining stage runs 2 seeds


@pytest.mark.parametrize("order", ["table", "reversed", "shuffled"])
def test_every_start_is_a_ready_run_that_most_runs_wait_for(tmp_path, order):
    """Whatever order the runs are listed in, each start is, among the runs ready then, one with the most runs
    waiting for it (the critical path: the α search, the teacher, the β search before any baseline)."""
    ts = tasks(tmp_path, ALL)
    if order == "reversed":
        ts = ts[::-1]
    elif order == "shuffled":
        random.Random(4).shuffle(ts)
    ex = Scripted(2, lambda running: running[0])  # first in, first out
    run_graph(ts, ex)
    started: set[str] = set()
    for d, done, _ in ex.starts:
        ready = [t.dir for t in ts if t.dir not in started and NEEDS[t.dir.removesuffix("_seed1")] <= done]
        assert d in ready
        assert _downstream(d) == max(_downstream(r) for r in ready), (d, ready)
        started.add(d)
    order = [d for d, _, _ in ex.starts]
    assert order[0] == "alpha_search" and order.index("teacher") < order.index("beta_search") < order.index("only_kd")


def test_a_failure_stops_new_starts_and_is_one_line(tmp_path):
    ts = tasks(tmp_path)
    # teacher fails while vanilla_teacher is in flight: nothing that waits for the teacher starts, the run in
    # flight finishes, and the error names the stage
    ex = Scripted(2, lambda running: running[0], fail={"teacher"})
    with pytest.raises(UserError, match=r"^stage teacher: planted failure$"):
        run_graph(ts, ex)
    started = [d for d, _, _ in ex.starts]
    assert "beta_search" not in started and "student" not in started and "only_kd" not in started
    assert set(ex.finished) == set(started)  # everything in flight finished


def test_workers_default_to_one_per_cpu_with_one_thread_each(tmp_path, monkeypatch):
    import rolekd.pipeline.graph as graph

    monkeypatch.setattr(graph, "available_cpus", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cfg = load_config(None, CFG + ["train.device=cpu"])
    assert plan(cfg, 16)[:3] == ("local", 4, 1)
    assert plan(cfg, 3)[:3] == ("local", 3, 1)  # no more workers than runs; 4 // 3 = 1 thread each
    assert plan(load_config(None, CFG + ["train.device=cpu", "train.threads=2"]), 16)[:3] == ("local", 2, 2)
    assert plan(load_config(None, CFG + ["train.device=cpu", "pipeline.workers=1"]), 16)[:3] == ("inline", 1, 4)
    assert plan(load_config(None, CFG + ["train.device=cpu", "pipeline.executor=ray"]), 16)[:3] == ("ray", 4, 1)


class Timed:
    """An executor on a simulated clock: each run takes ``seconds(task)``; runs finish in time order."""

    def __init__(self, slots, seconds):
        self.slots, self.seconds, self.now = slots, seconds, 0.0
        self.running: dict[cf.Future, tuple[float, Task]] = {}
        self.starts: list[tuple[float, str]] = []

    def submit(self, task):
        fut = cf.Future()
        self.running[fut] = (self.now + self.seconds(task), task)
        self.starts.append((self.now, task.dir))
        return fut

    def wait(self, futures, timeout=None):
        fut = min(self.running, key=lambda f: self.running[f][0])
        self.now, _ = self.running.pop(fut)
        fut.set_result({})
        return {fut}, set(futures) - {fut}

    def close(self, cancel=False):
        pass


def _quickstart_seconds(task):
    """The quickstart's stage walls on 2 one-thread workers (benchmarks/RESULTS.md, issue 21, session 8)."""
    cfg = task.config
    if task.kind == "search":
        return 68.0 if cfg.kd.method else 32.0
    if cfg.kd.method:
        return 46.0
    return 19.0 if cfg.quant.w_bits < 32 else 15.5


def test_equally_urgent_stages_start_longest_first(tmp_path):
    from rolekd.pipeline.graph import work_estimate

    ts = {t.dir: t for t in tasks(tmp_path, "pipeline.baselines=[vanilla_teacher,vanilla_student,only_kd,"
                                            "student_teacher_schedule]")}
    # a 4-bit II-KD student (clipped: two backward passes) > a 4-bit student > the fp32 teacher, per epoch
    assert work_estimate(ts["only_kd_seed1"]) > work_estimate(ts["vanilla_student_seed1"]) \
        > work_estimate(ts["vanilla_teacher_seed1"])
    ex = Timed(2, _quickstart_seconds)
    run_graph(list(ts.values()), ex)
    order = [d for _, d in ex.starts]
    # the critical path still comes first; among the runs nothing waits for, the 4-bit baselines before the
    # fp32 ones, and the fp32 teacher of seed 1 (ready from the start, the least work) after every KD student,
    # so that short runs fill the last minutes
    assert order[0] == "alpha_search"
    assert max(order.index("vanilla_student"), order.index("vanilla_student_seed1")) < order.index("vanilla_teacher")
    kd = [d for d, t in ts.items() if t.kind == "train" and t.config.kd.method]
    assert len(kd) == 6 and max(order.index(d) for d in kd) < order.index("vanilla_teacher_seed1")
    # on the quickstart's stage times both workers stay busy to within 5 s of the end (starting runs in
    # table order left one worker idle for the last ~25 s)
    total = sum(_quickstart_seconds(t) for t in ts.values())
    assert ex.now <= total / 2 + 5, (ex.now, total / 2)


def test_on_last_runs_once_when_only_the_last_runs_are_in_flight_and_a_slot_is_free(tmp_path):
    ts = tasks(tmp_path)
    ex = Timed(2, _quickstart_seconds)
    calls = []
    run_graph(ts, ex, on_last=lambda: calls.append((ex.now, len(ex.starts), len(ex.running))))
    assert len(calls) == 1
    now, started, in_flight = calls[0]
    assert started == len(ts) and in_flight == 1  # everything started, one worker idle
    assert now < ex.now  # before the last run finished (the report's imports overlap it)
    one = Timed(1, _quickstart_seconds)  # one slot: never idle while runs are left
    seen = []
    run_graph(ts, one, on_last=lambda: seen.append(1))
    assert seen == []
