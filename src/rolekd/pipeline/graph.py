"""The pipeline's stages as the dependency graph they are, run on one or more workers.

A stage needs the runs whose outputs its config reads: the stage-α teacher (``kd.teacher``) and the
search whose ``schedule.json`` it trains with (``augment.schedule``). Everything else is independent: once
the teacher exists, only-KD, KD + A_T, the vanilla baselines and every seed of every stage can run at once.
:func:`run_graph` starts each run as soon as what it needs has finished, on

* ``inline``: one run after another in this process (``pipeline.workers=1``), sharing one Session;
* ``local``: ``pipeline.workers`` worker processes on this machine (spawned; each keeps a Session of its
  own, runs torch with the stage's ``train.threads`` and, where several GPUs are visible, one GPU each;
  each dies with this process);
* ``ray``: each run a Ray task (``search.ray_address``, or a local Ray) with ``pipeline.ray_num_cpus`` /
  ``pipeline.ray_num_gpus``, on whichever node has them. A Ray stage runs in the driver's working directory
  (so the stage configs' paths mean on every node what they mean here), after checking that its node reads
  the file the driver wrote under the run root (:class:`SharedRoot`) and finds ``data.path``: the run root
  must be on storage every node shares, mounted at the same path (docs/CLUSTER.md). A stage whose node is
  lost is retried on another node (``RAY_STAGE_RETRIES`` times) and resumes from its last checkpoint; the
  progress line says so.

Each run is an ordinary resumable run in its own locked directory, so the workers change nothing in
what a run computes (given its threads): a rerun resumes whatever was interrupted. Among the runs that
are ready, those that more runs wait for start first (the critical path: search, teacher, search,
student), then those with the most work (:func:`work_estimate`: a long run started last would keep one
worker busy alone at the end). When a run fails, no new run starts, the runs in flight finish, and the
first failure is raised; an interrupt stops every worker.
"""

from __future__ import annotations

import concurrent.futures as cf
from concurrent.futures.process import BrokenProcessPool
import ctypes
import json
import multiprocessing as mp
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

from ..config import Config, available_cpus, derive
from ..distill import distiller_class
from ..errors import RunFailed, UserError
from ..experiment import Session, search_from_config, train_from_config
from ..runtime import keep_freed_memory, worker_environment
from ..search.ray_executor import answers, connect_ray, missing_rolekd, within
from ..train import NonFiniteLoss, resolve_device


@dataclass(frozen=True)
class Task:
    """One run of the pipeline: its directory name (under the pipeline's), kind and config."""

    dir: str
    kind: str  # "search" or "train"
    config: Config


def dependencies(tasks: Sequence[Task]) -> dict[str, set[str]]:
    """For each task, the tasks whose outputs its config reads: the run directory its ``kd.teacher``
    names, and the search whose ``schedule.json`` its ``augment.schedule`` names."""
    out_of = {Path(t.config.run_dir()).resolve(): t.dir for t in tasks}
    needs: dict[str, set[str]] = {}
    for t in tasks:
        refs = []
        if t.config.kd.teacher:
            refs.append(Path(t.config.kd.teacher).expanduser())
        if t.config.augment.schedule:
            refs.append(Path(t.config.augment.schedule).expanduser().parent)
        needs[t.dir] = {out_of[r.resolve()] for r in refs if r.resolve() in out_of} - {t.dir}
    return needs


def _waiting(needs: dict[str, set[str]]) -> dict[str, int]:
    """How many tasks wait (directly or through others) for each task."""
    after: dict[str, set[str]] = {d: set() for d in needs}
    for d, ns in needs.items():
        for n in ns:
            after[n].add(d)

    def down(d: str, seen: set[str]) -> set[str]:
        for a in after[d] - seen:
            seen.add(a)
            down(a, seen)
        return seen

    return {d: len(down(d, set())) for d in needs}


def work_estimate(task: Task) -> float:
    """A coarse estimate of a run's cost, to start the longest of equally urgent runs first (so that short
    runs fill the workers' last minutes instead of one long run keeping a worker busy alone at the end):
    for a training run, its epochs times a step's cost relative to a full-precision step (x1.3 for low-bit
    weights or activations; KD from a frozen teacher x1.5, x2.4 where the KD gradient is clipped (two
    backward passes), x2 more where the teacher trains too), measured on CPU (benchmarks/RESULTS.md,
    issue 21). A search counts as more than any training run (it holds up the stages that train with
    its schedule)."""
    cfg = task.config
    if task.kind == "search":
        return float("inf")
    step = 1.3 if min(cfg.quant.w_bits, cfg.quant.a_bits) < 32 else 1.0
    if cfg.kd.method:
        cls = distiller_class(cfg.kd.method)
        clipped = cls.clip_kd_grad if cfg.kd.clip is None else cfg.kd.clip
        step *= (2.4 if clipped else 1.5) * (2.0 if cls.trains_teacher else 1.0)
    return cfg.train.epochs * step


def order_ready(ready: Sequence[str], waiting: dict[str, int], position: dict[str, int],
                work: dict[str, float] | None = None) -> list[str]:
    """The ready tasks in the order they start: most tasks waiting for them (:func:`_waiting`) first, then
    the most work (:func:`work_estimate`), then table order."""
    work = work or {}
    return sorted(ready, key=lambda d: (-waiting[d], -work.get(d, 0.0), position[d]))


# ---------------------------------------------------------------------------------------- one run
def run_task(task: Task, session: Session | None = None) -> dict:
    """Run (or resume, or report) one task with torch on its ``train.threads`` (as every executor runs it);
    its ``result.json`` / ``search.json`` content."""
    import torch

    keep_freed_memory()
    old = torch.get_num_threads()
    torch.set_num_threads(task.config.train.num_threads())
    try:
        if task.kind == "search":
            return search_from_config(task.config, session=session)
        return train_from_config(task.config, log_name=task.dir, session=session)
    finally:
        torch.set_num_threads(old)


class _NoTTY:
    """A stream that says it is not a terminal: a worker's per-step progress bars would garble the shared
    terminal, so workers print their one line per epoch only."""

    def __init__(self, stream):
        self._stream = stream

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name):
        return getattr(self._stream, name)


_WORKER_SESSION: Session | None = None  # the Session of a worker process (one per process, for its runs)


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when the process that started it dies (a killed ``rolekd run``
    leaves no worker training on, holding a stage's lock)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker_init(gpus: Any) -> None:
    global _WORKER_SESSION
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the workers on Ctrl-C
    if gpus is not None:  # one GPU per worker, before torch initialises CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpus.get())
    sys.stderr = _NoTTY(sys.stderr)
    _WORKER_SESSION = Session()


def _worker_run(task: Task) -> dict:
    return run_task(task, _WORKER_SESSION)


# ---------------------------------------------------------------------------------------- executors
class InlineExecutor:
    """One task after another in this process, with one shared Session."""

    slots = 1

    def __init__(self, session: Session):
        self.session = session

    def submit(self, task: Task) -> cf.Future:
        fut: cf.Future = cf.Future()
        try:
            fut.set_result(run_task(task, self.session))
        except (UserError, NonFiniteLoss, OSError, RunFailed) as e:
            fut.set_exception(e)
        return fut

    def wait(self, futures, timeout=None):
        return set(futures), set()

    def close(self, cancel: bool = False) -> None:
        pass


class ProcessExecutor:
    """``workers`` spawned worker processes (see the module docstring)."""

    def __init__(self, workers: int, gpus: int = 0):
        ctx = mp.get_context("spawn")
        queue = None
        if gpus > 1:
            queue = ctx.Queue()
            for i in range(workers):
                queue.put(i % gpus)
        self.slots = workers
        # the workers start with glibc's huge-page tunable (rolekd.runtime); they are spawned as tasks are
        # submitted and take this process's environment then, so it holds until close()
        self._tunables = os.environ.get("GLIBC_TUNABLES")
        tuned = worker_environment().get("GLIBC_TUNABLES")
        if tuned is not None:
            os.environ["GLIBC_TUNABLES"] = tuned
        self.pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                           initargs=(queue,))

    def submit(self, task: Task) -> cf.Future:
        return self.pool.submit(_worker_run, task)

    def wait(self, futures, timeout=None):
        return cf.wait(futures, timeout=timeout, return_when=cf.FIRST_COMPLETED)

    def close(self, cancel: bool = False) -> None:
        if cancel:
            for p in list(getattr(self.pool, "_processes", {}).values()):
                p.kill()  # an interrupt: stop the runs in flight now (each resumes on rerun)
        self.pool.shutdown(wait=True, cancel_futures=cancel)
        if self._tunables is None:
            os.environ.pop("GLIBC_TUNABLES", None)
        else:
            os.environ["GLIBC_TUNABLES"] = self._tunables


RAY_STAGE_RETRIES = 3  # a Ray stage task lost with its node or worker process is retried this often
HEAD_CHECK_S = 5.0  # while Ray stages run, the cluster's head is checked this often (search.ray_address set) ...
HEAD_LOST_CHECKS = 3  # ... and the run stops after this many checks in a row without an answer


@dataclass(frozen=True)
class SharedRoot:
    """What a Ray stage checks on its node before it trains: the driver's working directory (where the stage
    configs' relative paths start) and a probe file the driver wrote under the pipeline's run root, holding a
    token fresh for each invocation."""

    cwd: str
    probe: str  # absolute path of the probe file
    token: str

    @classmethod
    def write(cls, root: Path) -> "SharedRoot":
        """Write the probe under ``root`` (and forget the attempts of an earlier invocation)."""
        root = Path(root).resolve()
        probe = root / ".rolekd-shared"
        token = uuid.uuid4().hex
        probe.write_text(token)
        attempts = root / ".rolekd-attempts"
        if attempts.is_dir():
            for f in attempts.iterdir():
                f.unlink()
        return cls(os.getcwd(), str(probe), token)

    def check(self, where: str) -> None:
        """One UserError line naming the node and the path when this node does not see the run root."""
        try:
            seen = Path(self.probe).read_text()
        except OSError:
            seen = None
        if seen != self.token:
            raise UserError(f"{where} cannot read {self.probe} as the driver wrote it: the run directory must be on "
                            f"storage every node shares, mounted at the same path (docs/CLUSTER.md)")
        if not os.path.isdir(self.cwd):
            raise UserError(f"{where} has no directory {self.cwd} (the driver's working directory, where the stages' "
                            f"paths start): mount the shared storage at the same path on every node, or give out= "
                            f"and data.path as absolute paths on it (docs/CLUSTER.md)")

    def attempt(self, name: str, node: str) -> list[str]:
        """Record that stage run ``name`` starts on ``node``; every node it started on in this invocation."""
        d = Path(self.probe).parent / ".rolekd-attempts"
        d.mkdir(exist_ok=True)
        f = d / f"{name}.txt"
        with open(f, "a") as fh:
            fh.write(node + "\n")
        return f.read_text().split()


def run_ray_stage(task: Task, shared: SharedRoot) -> dict:
    """A Ray stage task: check that this node sees the run root and the data, run the stage in the driver's
    working directory, and return its result with the node it ran on (``ray_node``) and every node this
    invocation started it on (``ray_attempts``: more than one after a lost node)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    where = f"node {ray.util.get_node_ip_address()} (id {node[:12]})"
    shared.check(where)
    data = task.config.data.path
    if data and not Path(shared.cwd, os.path.expanduser(data)).exists():
        raise UserError(f"{where}: data.path {data} not found on this node (relative to {shared.cwd}): put the "
                        f"dataset on storage every node shares, or use a dataset torchvision downloads "
                        f"(docs/CLUSTER.md)")
    attempts = shared.attempt(task.dir, node)
    old = os.getcwd()
    os.chdir(shared.cwd)
    try:
        result = run_task(task)
    finally:
        os.chdir(old)
    return {**result, "ray_node": node, "ray_attempts": attempts}


class RayStageExecutor:
    """Each task a Ray task (:func:`run_ray_stage`) on ``search.ray_address`` (or a local Ray started here).
    ``root``: the pipeline's run root, on storage every node shares."""

    def __init__(self, address: str | None, num_cpus: float, num_gpus: float, slots: int, root: Path | None = None,
                 ship_code: bool = True):
        self.ray, self.started = connect_ray(address, ship_code=ship_code)
        self.address = address
        self.head_lost = False
        self.remote = self.ray.remote(run_ray_stage).options(num_cpus=num_cpus, num_gpus=num_gpus,
                                                             max_retries=RAY_STAGE_RETRIES)
        self.shared = SharedRoot.write(root if root is not None else Path.cwd())
        self.slots = slots
        self.refs: dict[Any, cf.Future] = {}

    def submit(self, task: Task) -> cf.Future:
        fut: cf.Future = cf.Future()
        self.refs[self.remote.remote(task, self.shared)] = fut
        return fut

    def wait(self, futures, timeout=None):
        ray = self.ray
        pending = [r for r, f in self.refs.items() if not f.done()]
        if pending:
            done = self._wait_checking_head(pending, timeout)
            for r in done:
                fut = self.refs.pop(r)
                try:
                    fut.set_result(ray.get(r))
                except ray.exceptions.RayError as e:
                    cause = getattr(e, "cause", None) if isinstance(e, ray.exceptions.RayTaskError) else None
                    if (missing := missing_rolekd(e)) is not None:
                        fut.set_exception(missing)
                    elif isinstance(cause, BaseException):
                        fut.set_exception(cause)
                    elif isinstance(e, ray.exceptions.RayTaskError):
                        fut.set_exception(RunFailed(str(e).splitlines()[0]))
                    else:
                        fut.set_exception(RunFailed(f"Ray lost the task and its retries ({type(e).__name__}: "
                                                f"{str(e).splitlines()[0][:160] if str(e) else ''}); rerun the same "
                                                f"command to resume"))
        done = {f for f in futures if f.done()}
        return done, set(futures) - done

    def _wait_checking_head(self, pending, timeout):
        """Ray's wait for the first of ``pending``, checking every :data:`HEAD_CHECK_S` seconds that the
        cluster's head answers: without it Ray's driver would wait, then exit without a word. RunFailed after
        :data:`HEAD_LOST_CHECKS` checks in a row without an answer."""
        deadline = None if timeout is None else time.monotonic() + timeout
        misses = 0
        while True:
            step = HEAD_CHECK_S if deadline is None else max(0.0, min(HEAD_CHECK_S, deadline - time.monotonic()))
            done, _ = self.ray.wait(pending, num_returns=1, timeout=step)
            if done or (deadline is not None and time.monotonic() >= deadline) or not self.address:
                return done
            misses = 0 if answers(self.address) else misses + 1
            if misses >= HEAD_LOST_CHECKS:
                self.head_lost = True
                raise RunFailed(f"lost the Ray cluster's head at search.ray_address={self.address} (no answer for "
                                f"{HEAD_LOST_CHECKS * HEAD_CHECK_S:.0f} s); the stages in flight stop with it: start "
                                f"the cluster again and rerun the same command, it resumes every unfinished stage "
                                f"from its checkpoint")

    def close(self, cancel: bool = False) -> None:
        if self.head_lost:  # nothing to cancel; disconnect without waiting long for a head that is gone
            try:
                within(10.0, self.ray.shutdown)
            except TimeoutError:
                pass
            return
        if cancel:
            for r in self.refs:
                try:
                    self.ray.cancel(r, force=True)
                except Exception:
                    pass
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()


# ---------------------------------------------------------------------------------------- planning
class Plan(NamedTuple):
    """How a pipeline's runs are executed: the executor, how many run at once, each run's threads."""

    executor: str  # inline | local | ray
    workers: int
    threads: int | None  # train.threads of each run (None: unchanged)
    gpus: int  # visible CUDA devices (0 on CPU)


def plan(cfg: Config, n_tasks: int) -> Plan:
    """The execution plan of ``cfg.pipeline`` (see :class:`~rolekd.config.PipelineConfig`)."""
    p = cfg.pipeline
    device = resolve_device(cfg.train.device)
    gpus = 0
    if device.type == "cuda":
        import torch

        gpus = torch.cuda.device_count() if device.index is None else 1
    cpus = available_cpus()
    threads = cfg.train.threads
    if p.workers is not None:
        workers = p.workers
    elif gpus:
        workers = gpus
    else:
        workers = max(1, cpus // threads) if threads else cpus
    workers = max(1, min(workers, n_tasks))
    if threads is None and not gpus:
        threads = max(1, cpus // workers)
    if p.executor == "ray":
        return Plan("ray", workers, threads, gpus)
    return Plan("inline" if workers == 1 else "local", workers, threads, gpus)


def make_executor(cfg: Config, pl: Plan, session: Session, root: Path | None = None):
    if pl.executor == "inline":
        return InlineExecutor(session)
    if pl.executor == "local":
        return ProcessExecutor(pl.workers, pl.gpus)
    p = cfg.pipeline
    cpus = p.ray_num_cpus if p.ray_num_cpus is not None else float(pl.threads or 1)
    gpus = p.ray_num_gpus if p.ray_num_gpus is not None else (1.0 if pl.gpus else 0.0)
    return RayStageExecutor(cfg.search.ray_address, cpus, gpus, pl.workers, root if root is not None else cfg.run_dir(),
                            cfg.search.ray_ship_code)


# ---------------------------------------------------------------------------------------- the runner
def _say(msg: str) -> None:
    print(f"== rolekd run: {msg}", flush=True)


def run_graph(tasks: Sequence[Task], executor, on_done: Callable[[str, dict], None] | None = None,
              on_last: Callable[[], None] | None = None) -> dict[str, dict]:
    """Run every task once what it needs has finished, at most ``executor.slots`` at a time; returns
    {dir: result} in task order. ``on_done(dir, result)`` runs after each task (a UserError there counts as
    that task's failure); ``on_last()`` once, when the last tasks are in flight and a slot is free (this
    process would only wait: e.g. get ready for what follows the graph). The first failure is raised after
    the tasks in flight finish (those waiting for the failed one never start); KeyboardInterrupt stops
    everything."""
    needs = dependencies(tasks)
    waiting = _waiting(needs)
    position = {t.dir: i for i, t in enumerate(tasks)}
    work = {t.dir: work_estimate(t) for t in tasks}
    by_dir = {t.dir: t for t in tasks}
    results: dict[str, dict] = {}
    running: dict[cf.Future, str] = {}
    started: dict[str, float] = {}
    failures: list[tuple[str, BaseException]] = []
    total = len(tasks)
    try:
        while True:
            if not failures:
                ready = [t.dir for t in tasks if t.dir not in results and t.dir not in started
                         and needs[t.dir] <= set(results)]
                for d in order_ready(ready, waiting, position, work)[:max(0, executor.slots - len(running))]:
                    started[d] = time.time()
                    names = sorted(list(running.values()) + [d], key=position.get)
                    _say(f"start {d} -> {by_dir[d].config.out} ({len(results)}/{total} done; running: "
                         f"{', '.join(names)})")
                    running[executor.submit(by_dir[d])] = d
            if not running:
                break
            if (on_last is not None and not failures and len(running) < executor.slots
                    and len(results) + len(running) == total):
                on_last()
                on_last = None
            done, _ = executor.wait(list(running))
            for fut in done:
                d = running.pop(fut)
                err = fut.exception()
                if err is not None:
                    if isinstance(err, BrokenProcessPool):
                        err = RunFailed(f"a worker process died while stage {d} ran; rerun the same command to "
                                        f"resume")
                    failures.append((d, err))
                    _say(f"stage {d} failed after {time.time() - started[d]:.0f} s"
                         + (f"; waiting for {', '.join(running.values())}" if running else ""))
                    continue
                results[d] = fut.result()
                tries = results[d].get("ray_attempts") or []
                if len(tries) > 1:
                    lost = "its worker process" if tries[-2] == tries[-1] else f"its node ({tries[-2][:12]})"
                    _say(f"{d} was retried on node {tries[-1][:12]} after {lost} was lost; it resumed from its last "
                         f"checkpoint")
                _say(f"done {d} in {time.time() - started[d]:.0f} s ({len(results)}/{total} done)")
                if on_done is not None:
                    try:
                        on_done(d, results[d])
                    except UserError as e:  # a check of what the run produced: no new start, as a failure
                        failures.append((d, e))
    except BaseException:
        executor.close(cancel=True)
        raise
    executor.close()
    if failures:
        d, err = failures[0]
        if isinstance(err, UserError):
            raise UserError(f"stage {d}: {err}") from None
        if isinstance(err, NonFiniteLoss):
            raise NonFiniteLoss(f"stage {d}: {err}", row=err.row, epoch=err.epoch) from None
        if isinstance(err, (OSError, RunFailed)):
            raise err
        raise RunFailed(f"stage {d} failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") \
            from err
    return {t.dir: results[t.dir] for t in tasks}


def with_threads(task: Task, threads: int | None) -> Task:
    """``task`` with ``train.threads`` set (a volatile key: a stage run with other threads resumes)."""
    if threads is None or task.config.train.threads == threads:
        return task
    return Task(task.dir, task.kind, derive(task.config, f"pipeline stage {task.dir}", train={"threads": threads}))
