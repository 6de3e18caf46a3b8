"""`rolekd run` end to end on a micro configuration: every stage, the report, kill and resume."""

import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from scipy import stats

from rolekd.augment import apply_policy
from rolekd.augment.schedule import Schedule
from rolekd.cli import main
from rolekd.config import load_config
from rolekd.models import create
from rolekd.pipeline import run_pipeline
from rolekd.stages import DEFAULT_BASELINES
from rolekd.stages import STAGES as TABLE

MICRO = """
name: micro
data: {name: cifar10-sample, train_size: 128, val_size: 128, max_train: 384, max_test: 200}
train: {epochs: 2, batch_size: 64, eval_batch_size: 200, progress: false}
augment: {cutout: 8}
search: {population: 2, epochs: 2, perturb_interval: 1}
kd: {prepare_epochs: 1}
pipeline:
  seeds: 2
  teacher: {model: resnet_tiny}
  student: {model: resnet_tiny, w_bits: 4, a_bits: 4, method: iikd,
            train: {optimizer: adam, lr: 0.001, weight_decay: 1.0e-5}}
"""
# the killed-and-rerun run's stages on two worker processes of one thread each (the default on 2 CPUs); the
# reference run has them one after another in this process, one thread each
WORKERS = ["pipeline.workers=2", "train.threads=1"]
INLINE = ["pipeline.workers=1", "train.threads=1"]
STAGES = tuple(s.name for s in TABLE if not s.baseline or s.name in DEFAULT_BASELINES)  # what MICRO runs
TRAINED = ("teacher", "vanilla_teacher", "student", "vanilla_student", "student_alpha", "only_kd",
           "student_teacher_schedule")


def accs(root, stage):
    """Test accuracies (%) of a stage's seed runs, read from their result.json files."""
    return [100 * json.loads((root / d / "result.json").read_text())["test_acc"] for d in (stage, f"{stage}_seed1")]


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """The reference: the micro pipeline's stages one after another in this process (one worker)."""
    d = tmp_path_factory.mktemp("pipe")
    cfg = d / "micro.yaml"
    cfg.write_text(MICRO)
    run_pipeline(cfg, [f"out={d / 'run'}"] + INLINE)
    return cfg, d / "run"


def test_every_stage_ran_and_report_holds_their_numbers(micro):
    _, root = micro
    for stage in STAGES:
        assert (root / stage / ("search.json" if stage.endswith("_search") else "result.json")).is_file(), stage
    report = (root / "report.md").read_text()
    for stage in TRAINED:  # every retraining stage ran with two seeds: mean ± sample std in the report
        a = accs(root, stage)
        cfg0 = yaml.safe_load((root / stage / "config.yaml").read_text())
        cfg1 = yaml.safe_load((root / f"{stage}_seed1" / "config.yaml").read_text())
        assert cfg1["train"]["seed"] == cfg0["train"]["seed"] + 1
        assert f"| {statistics.mean(a):.2f} ± {statistics.stdev(a):.2f} | 2 |" in report, stage
    for stage in ("alpha_search", "beta_search"):
        s = json.loads((root / stage / "search.json").read_text())
        assert f"{100 * s['best_val_acc']:.2f}" in report
    for fig in ("schedules.png", "rewards.png", "test_curves.png"):
        from PIL import Image

        with Image.open(root / "figures" / fig) as im:
            assert im.size[0] > 300 and im.size[1] > 200
        assert f"figures/{fig}" in report
    # the teacher was retrained with the searched schedule, the student from the teacher's weights
    tcfg = (root / "teacher" / "config.yaml").read_text()
    assert "alpha_search/schedule.json" in tcfg and "fit_epochs: true" in tcfg
    scfg = (root / "student" / "config.yaml").read_text()
    assert "beta_search/schedule.json" in scfg and re.search(r"teacher: .*/teacher\n", scfg)
    # each comparison the paper makes is a paired difference over the seeds, with its verdict
    for label, a, b in [("stage α vs vanilla teacher", "teacher", "vanilla_teacher"),
                        ("stage β vs only-KD", "student", "only_kd"),
                        ("student schedule vs teacher schedule", "student", "student_teacher_schedule"),
                        ("KD vs no KD", "only_kd", "vanilla_student")]:
        diffs = [round(x - y, 9) for x, y in zip(accs(root, a), accs(root, b))]
        line = next(x for x in report.splitlines() if x.startswith(f"| {label}"))
        mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
        assert f"| {mean:+.2f} ± {sd:.2f} | 2 |" in line, line
        if sd:  # the 95% confidence interval of the mean and the two-sided p-value of the paired t: with 1
            # degree of freedom Student's t is the Cauchy distribution, quantile tan(pi (q - 1/2)) (12.706)
            half = math.tan(0.475 * math.pi) * sd / math.sqrt(2)
            p = 1 - 2 * math.atan(abs(mean) / (sd / math.sqrt(2))) / math.pi
            assert f"| 2 | [{mean - half:+.2f}, {mean + half:+.2f}] | {p:.3g} |" in line, line
        else:
            assert "| 2 | — | — |" in line, line
        t = mean / (sd / math.sqrt(2)) if sd else (math.inf if mean else 0.0)
        if sd == 0 and mean == 0:
            assert "identical in every seed" in line
        elif sd == 0:
            assert "the same difference in all 2 seeds" in line and "t undefined" in line
        elif abs(t) > 12.706:  # Student's t, 1 degree of freedom, two-sided 95%
            assert "larger than the seed-to-seed noise" in line
        else:
            assert "within the seed-to-seed noise" in line


def _stage_config(root: Path, stage: str) -> dict:
    return yaml.safe_load((root / stage / "config.yaml").read_text())


def _same_path(value, expected: Path | None) -> bool:
    if expected is None or value is None:
        return value is None and expected is None
    return Path(value).resolve() == expected.resolve()


def test_every_stage_has_its_role_teacher_schedule_method_bits_split_and_init(micro):
    """README "The pipeline": what each stage is, read back from the config.yaml it ran with and its
    result.json."""
    cfg_file, root = micro
    top = load_config(cfg_file).pipeline
    teacher_role, student_role = top.teacher, top.student
    # the micro config makes the two roles distinguishable
    assert (teacher_role.quant.w_bits, teacher_role.quant.a_bits, teacher_role.method) == (32, 32, None)
    assert (student_role.quant.w_bits, student_role.quant.a_bits) == (4, 4) and student_role.method
    a_t, a_s = root / "alpha_search" / "schedule.json", root / "beta_search" / "schedule.json"
    teacher = root / "teacher"
    kd = student_role.method
    # stage: (role, KD teacher (None: no teacher, random init), schedule, KD method, data split, cutout)
    # the paper (§5.1, Table 2): baselines augment with crop + flip only; the low-bit vanilla and stage-α
    # students train from scratch; KD students start from the stage α teacher
    cut = load_config(cfg_file).augment.cutout
    assert cut > 0
    table = {
        "alpha_search": ("teacher", None, None, None, "reduced", cut),
        "teacher": ("teacher", None, a_t, None, "full", cut),
        "vanilla_teacher": ("teacher", None, None, None, "full", 0),
        "beta_search": ("student", teacher, None, kd, "reduced", cut),
        "student": ("student", teacher, a_s, kd, "full", cut),
        "vanilla_student": ("student", None, None, None, "full", 0),
        "student_alpha": ("student", None, a_t, None, "full", cut),
        "only_kd": ("student", teacher, None, kd, "full", 0),
        "student_teacher_schedule": ("student", teacher, a_t, kd, "full", cut),
    }
    assert set(table) == set(STAGES)
    for stage, (role_name, kd_teacher, schedule, method, split, cutout) in table.items():
        c = _stage_config(root, stage)
        role = teacher_role if role_name == "teacher" else student_role
        assert Path(c["out"]).resolve() == (root / stage).resolve(), stage
        assert c["model"]["name"] == role.model.name, stage
        assert (c["quant"]["w_bits"], c["quant"]["a_bits"]) == (role.quant.w_bits, role.quant.a_bits), stage
        assert _same_path(c["kd"]["teacher"], kd_teacher), (stage, c["kd"]["teacher"])
        assert c["kd"]["method"] == method, stage
        assert _same_path(c["augment"]["schedule"], schedule), (stage, c["augment"]["schedule"])
        if schedule is not None:  # the searched schedule is mapped onto the retraining's epochs
            assert c["augment"]["fit_epochs"] is True, stage
        assert c["data"]["split"] == split, stage
        assert c["augment"]["cutout"] == cutout, stage
        if kd_teacher is not None:  # every KD student starts from the stage α teacher's weights
            assert c["kd"]["init_from_teacher"] is True, stage
        if stage.endswith("_search"):
            assert c["search"]["role"] == role_name, stage
        else:
            r = json.loads((root / stage / "result.json").read_text())
            assert (r["w_bits"], r["a_bits"], r["kd"]) == (role.quant.w_bits, role.quant.a_bits, method), stage
            assert _same_path(r["schedule"], schedule), stage


def _rows(root: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (root / stage / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _fitted(schedule_file: Path, epochs: int) -> list[list[int]]:
    """The schedule mapped proportionally onto ``epochs`` (README: augment.fit_epochs): training epoch
    e uses the policy of epoch floor(e * len / epochs)."""
    pols = Schedule.load(schedule_file).policies
    return [pols[e * len(pols) // epochs] for e in range(epochs)]


def _changes_images(policy: list[int]) -> bool:
    images = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return not torch.equal(apply_policy(images, policy, generator=torch.Generator().manual_seed(1)), images)


def test_stages_that_differ_only_in_the_schedule_train_alike_until_it_augments(micro):
    """Stage β and the KD student with the teacher's schedule share model, seed, teacher, KD method and base
    augmentation (crop, flip, cutout) and differ only in the schedule: their epochs are identical while the
    two fitted schedules agree (a policy draws the same whatever stage runs it) and differ from the first
    epoch where they disagree and one of them changes images."""
    _, root = micro
    keys = ("train_loss", "train_acc", "test_loss", "test_acc")
    for k in ("", "_seed1"):
        a, b = _rows(root, f"student{k}"), _rows(root, f"student_teacher_schedule{k}")
        epochs = _stage_config(root, "student")["train"]["epochs"]
        assert len(a) == len(b) == epochs
        a_s = _fitted(root / "beta_search" / "schedule.json", epochs)
        a_t = _fitted(root / "alpha_search" / "schedule.json", epochs)
        first = next((e for e in range(epochs) if a_s[e] != a_t[e]), epochs)
        for e in range(first):
            assert [a[e][key] for key in keys] == [b[e][key] for key in keys], (k, e)
        if first < epochs and (_changes_images(a_s[first]) or _changes_images(a_t[first])):
            assert [a[first][key] for key in keys] != [b[first][key] for key in keys], (k, first)


def test_student_stages_start_from_the_stage_alpha_teacher(micro, tmp_path):
    """README: a student of the teacher's architecture starts from the teacher's weights. Every student
    stage (and the best stage β search member) ends nearer the teacher's final weights than the
    initialisation the same seed gives without them (which is the teacher's own starting point)."""
    _, root = micro
    # the seed's own initialisation: the vanilla teacher's config, one epoch at lr 1e-12
    assert main(["train", str(root / "vanilla_teacher" / "config.yaml"), f"out={tmp_path / 'init'}", "epochs=1",
                 "train.optimizer=adam", "train.lr=1e-12", "train.weight_decay=0"]) == 0
    init = load_file(str(tmp_path / "init" / "model.safetensors"))
    teacher = load_file(str(root / "teacher" / "model.safetensors"))
    model = _stage_config(root, "student")["model"]["name"]
    keys = [f"{n}.weight" for n, m in create(model, num_classes=10).named_modules()
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]

    def dist(a, b):
        return sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in keys) ** 0.5

    norm = dist(teacher, {k: torch.zeros_like(v) for k, v in teacher.items()})
    assert dist(teacher, init) > 1e-3 * norm  # the teacher moved away from its initialisation
    students = {s: root / s / "model.safetensors" for s in ("student", "only_kd", "student_teacher_schedule")}
    students["beta_search"] = root / "beta_search" / "best_model.safetensors"
    for stage, path in students.items():
        s = load_file(str(path))
        assert set(keys) <= set(s), stage  # quantized layers keep full-precision latent weights, same names
        to_teacher, to_init = dist(s, teacher) / norm, dist(s, init) / norm
        assert to_teacher < to_init, (stage, to_teacher, to_init)
        assert to_teacher < 0.5, (stage, to_teacher)


def test_report_rebuilds_from_the_run_dir(micro, capsys):
    from rolekd.cli import main

    _, root = micro
    (root / "report.md").unlink()
    assert main(["report", str(root)]) == 0
    assert (root / "report.md").is_file()
    assert main(["report", str(root / "teacher" / "checkpoint")]) == 2


def same_results(ref_root, root):
    """Every stage's accuracy and both schedules of two pipeline runs are equal."""
    for stage in STAGES:
        name = "search.json" if stage.endswith("_search") else "result.json"
        key = "best_val_acc" if stage.endswith("_search") else "test_acc"
        for d in (stage,) if stage.endswith("_search") else (stage, f"{stage}_seed1"):
            a = json.loads((ref_root / d / name).read_text())
            b = json.loads((root / d / name).read_text())
            assert a[key] == b[key], d
    for search in ("alpha_search", "beta_search"):
        assert Schedule.load(root / search / "schedule.json") == Schedule.load(ref_root / search / "schedule.json")


def _workers_of(pid):
    """The worker processes (multiprocessing spawn children) of process ``pid``."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and "spawn_main" in cmd:
            out.append(int(d.name))
    return out


def _alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture(scope="module")
def killed(micro, tmp_path_factory):
    """The micro pipeline as `rolekd run` on 2 worker processes, killed (SIGKILL) in the middle of the α search,
    rerun, one worker killed in the middle of the stage-β student's training, rerun to the end: what happened at
    each kill (for the test below) and the run directory."""
    cfg, _ = micro
    root = tmp_path_factory.mktemp("killed") / "run"
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = "1"
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "rolekd.cli", "run", str(cfg), f"out={root}"] + WORKERS
    seen = {}

    def start_and_wait_for(marker):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before the kill point"
        return proc

    proc = start_and_wait_for(root / "alpha_search" / "search_state")
    workers = _workers_of(proc.pid)
    seen["workers"] = len(workers)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while any(map(_alive, workers)) and time.time() < deadline:
        time.sleep(0.1)
    seen["outlived"] = sum(map(_alive, workers))

    proc = start_and_wait_for(root / "student" / "checkpoint" / "state.pt")
    os.kill(_workers_of(proc.pid)[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    seen["worker_killed"] = (proc.returncode, err, (root / "report.md").exists())
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    seen["rerun"] = (done.returncode, done.stderr)
    return root, seen


def test_kill_at_any_point_and_rerun_completes_with_the_same_results(micro, killed):
    """Killed (SIGKILL) in the middle of a search, its workers die with it; a worker killed in the middle of a
    KD training fails the run with one line (exit 1); the rerun resumes both and ends with the same results as
    the reference run (one worker in this process): the 2 worker processes and the one process, the kills and
    the resumes change no number."""
    _, ref_root = micro
    root, seen = killed
    assert seen["workers"], "no worker process found"
    assert seen["outlived"] == 0, "a worker outlived the killed run"
    rc, err, report = seen["worker_killed"]
    assert rc == 1, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("rolekd: error: ") and "died" in last and "rerun" in last, err[-2000:]
    assert not report
    assert seen["rerun"][0] == 0, seen["rerun"][1][-2000:]
    same_results(ref_root, root)


def _glibc() -> bool:
    import platform

    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _runtimes(root) -> dict[str, dict]:
    return {d: json.loads((root / d / "result.json").read_text())["runtime"]
            for stage in TRAINED for d in (stage, f"{stage}_seed1")}


def test_each_stage_trains_with_its_threads_layout_and_kept_memory_in_its_worker(killed):
    """What each worker process trained with, from the stage's result.json: the thread count the pipeline gave
    it (train.threads=1 on 2 workers), channels-last (train.channels_last=auto with one thread), and freed memory
    kept in the worker (rolekd.runtime, glibc)."""
    root, _ = killed
    for d, rt in _runtimes(root).items():
        assert rt == {"threads": 1, "channels_last": True, "freed_memory_kept": _glibc()}, d


def test_the_default_thread_split_reaches_every_stage(micro, tmp_path, monkeypatch):
    """Without train.threads, each stage's config gets the CPUs divided among the workers (4 CPUs: 2 workers x
    2 threads; by default one worker per CPU, 1 thread each) -- the tasks the pipeline hands its executor."""
    import rolekd.pipeline.graph as graph
    import rolekd.pipeline.run as prun

    cfg, _ = micro
    seen = {}

    class Stop(Exception):
        pass

    def capture(tasks, executor, **kw):
        executor.close()
        seen["threads"] = {t.dir: t.config.train.threads for t in tasks}
        raise Stop

    monkeypatch.setattr(graph, "available_cpus", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(prun, "run_graph", capture)
    for extra, want in ((["pipeline.workers=2"], 2), ([], 1)):
        with pytest.raises(Stop):
            run_pipeline(cfg, [f"out={tmp_path / f'run{want}'}"] + extra)
        assert len(seen["threads"]) > 10 and set(seen["threads"].values()) == {want}, (extra, seen)


def test_one_worker_trains_each_stage_in_this_process_on_its_threads(micro):
    """The reference run (one worker): every stage in this process, which the suite runs with conftest's torch
    threads, trained on the stage's one thread (set and restored per stage), channels-last (auto with one
    thread); its results equal the 2-worker run's (test_kill_at_any_point_and_rerun_completes_with_the_same_results)."""
    import torch

    _, root = micro
    for d, rt in _runtimes(root).items():
        assert rt["threads"] == 1 and rt["channels_last"] is True, d
    from conftest import SUITE_THREADS

    assert torch.get_num_threads() == SUITE_THREADS  # conftest's, restored after the run


def _start_cluster(where: Path, nodes: int = 2, without_rolekd: int = 0):
    """Ray's multi-node test harness on this machine: a head without CPUs and ``nodes`` worker nodes of one CPU
    each (separate raylets), started from ``where`` (as `ray start` on other machines, whose working directory
    is not the run's); the last ``without_rolekd`` of them cannot import rolekd (as a machine where it is not
    installed: a ``rolekd`` package that is not found comes first on their PYTHONPATH)."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()  # the session's local Ray (conftest's local_ray starts it again for the tests that need it)
    hide = where / "no_rolekd_here"
    (hide / "rolekd").mkdir(parents=True, exist_ok=True)
    (hide / "rolekd" / "__init__.py").write_text(
        'raise ModuleNotFoundError("No module named \'rolekd\'", name="rolekd")\n')
    old = os.getcwd()
    os.chdir(where)
    try:
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        for k in range(nodes):
            env = {"PYTHONPATH": str(hide)} if k >= nodes - without_rolekd else None
            c.add_node(num_cpus=1, env_vars=env)
        c.wait_for_nodes()
    finally:
        os.chdir(old)
    return c


def _stop_cluster(c) -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head and two one-CPU worker nodes (:func:`_start_cluster`), the second without rolekd, and the
    directory they started from."""
    elsewhere = tmp_path_factory.mktemp("cluster_started_here")
    c = _start_cluster(elsewhere, without_rolekd=1)
    yield c, elsewhere
    _stop_cluster(c)


def test_stages_on_the_nodes_of_a_cluster_write_under_out_and_give_one_workers_results(micro, cluster, tmp_path,
                                                                                        monkeypatch):
    """The micro pipeline as Ray tasks on a two-node cluster through search.ray_address, with out= relative to
    this directory (not the cluster's): every stage writes under the run's out, both worker nodes trained stages
    (the head has no CPUs), the node without rolekd too (the driver's rolekd is sent with the job), nothing
    lands where the cluster started, and the results are one worker's."""
    c, elsewhere = cluster
    cfg, ref_root = micro
    monkeypatch.chdir(tmp_path)
    run_pipeline(cfg, ["out=run", "pipeline.executor=ray", f"search.ray_address={c.address}", "train.threads=1",
                       "pipeline.workers=2"])
    root = tmp_path / "run"
    same_results(ref_root, root)
    ran_on = {r["ray_node"] for r in json.loads((root / "results.json").read_text()).values()}
    assert ran_on == {n.node_id for n in c.worker_nodes}
    assert not list(elsewhere.rglob("*.json"))
    for d, rt in _runtimes(root).items():  # each Ray task trained on its planned one thread
        assert rt["threads"] == 1 and rt["channels_last"] is True, d


def test_a_search_whose_members_live_on_different_nodes_gives_the_local_search(micro, cluster, tmp_path):
    """The micro pipeline's β search (the student's, with KD from the stage-α teacher on the shared storage) again
    with search.executor=ray on the two-node cluster: its two members need one CPU each and each node has one, so
    they live on different nodes (one of them without rolekd installed); the search gives the local search's
    rewards, exploits and schedule."""
    from rolekd.experiment import search_from_config

    c, _ = cluster
    _, ref_root = micro
    cfg = load_config(ref_root / "beta_search" / "config.yaml",
                      [f"out={tmp_path / 'beta'}", "search.executor=ray", f"search.ray_address={c.address}",
                       "search.ray_num_cpus=1"])
    assert cfg.search.population == 2 and len(c.worker_nodes) == 2  # of one CPU each (_start_cluster)
    search_from_config(cfg, verbose=False)
    a = json.loads((ref_root / "beta_search" / "search.json").read_text())
    b = json.loads((tmp_path / "beta" / "search.json").read_text())
    assert b["executor"] == "ray" and a["executor"] == "local"
    for key in ("final_val_acc", "best_val_acc", "best_test_acc", "exploits", "best_member"):
        assert a[key] == b[key], key
    assert Schedule.load(tmp_path / "beta" / "schedule.json") == \
        Schedule.load(ref_root / "beta_search" / "schedule.json")


def test_a_node_without_rolekd_stops_the_run_with_one_line_when_the_code_is_not_sent(micro, cluster, tmp_path,
                                                                                     capsys):
    """search.ray_ship_code=false (each node imports its own rolekd): the node where it is not installed fails
    its stage with one line naming the node and what to install, exit 2."""
    c, _ = cluster
    cfg, _ = micro
    rc = main(["run", str(cfg), f"out={tmp_path / 'run'}", "pipeline.executor=ray", f"search.ray_address={c.address}",
               "search.ray_ship_code=false", "pipeline.workers=2", "train.threads=1"])
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("rolekd:")]  # Ray's own lines aside
    assert rc == 2 and len(err) == 1, err
    assert re.search(r"node [\d.]+ cannot import rolekd \(no module named rolekd\): install rolekd \S+ on every "
                     r"node, or leave search.ray_ship_code=true", err[0]), err


def test_a_node_that_does_not_see_the_run_directory_stops_the_run_with_one_line(micro, cluster, tmp_path,
                                                                                monkeypatch, capsys):
    """As if the nodes had other storage mounted at the run's path (they read another file there than the one
    this driver wrote): the first stage fails on its node before training, one line naming the node and the
    path, exit 2, and no stage has results."""
    import rolekd.pipeline.graph as graph

    c, _ = cluster
    cfg, _ = micro
    real = graph.SharedRoot.write

    def other_storage(root):
        s = real(root)
        return graph.SharedRoot(s.cwd, s.probe, "the token another driver wrote")

    monkeypatch.setattr(graph.SharedRoot, "write", staticmethod(other_storage))
    root = tmp_path / "run"
    rc = main(["run", str(cfg), f"out={root}", "pipeline.executor=ray", f"search.ray_address={c.address}"])
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("rolekd:")]  # Ray's own lines aside
    assert rc == 2 and len(err) == 1, err
    assert re.search(r"stage \w+: node [\d.]+ \(id \w+\) cannot read \S+/run/\.rolekd-shared as the driver wrote it: "
                     r"the run directory must be on storage every node shares", err[0]), err
    assert not list(root.rglob("result.json")) and not list(root.rglob("search.json"))


def test_a_stage_whose_results_are_missing_is_an_error_not_an_empty_report(micro, tmp_path, capsys):
    """A finished stage (results.json) whose result.json is not under the run directory (written on a node that
    did not share it): `rolekd report` says so in one line, exit 2, and writes no report; the pipeline's own
    check after the last stage likewise (exit 1)."""
    from rolekd.errors import RunFailed
    from rolekd.pipeline.graph import Task
    from rolekd.pipeline.run import check_stage_results

    _, ref_root = micro
    root = tmp_path / "run"
    shutil.copytree(ref_root, root)
    (root / "report.md").unlink()
    (root / "student_seed1" / "result.json").unlink()
    assert main(["report", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stage student_seed1 finished (results.json) but" in err[0] and \
        "student_seed1/result.json is missing" in err[0], err
    assert not (root / "report.md").exists()
    cfg = load_config(root / "student_seed1" / "config.yaml")
    results = json.loads((root / "results.json").read_text())
    with pytest.raises(RunFailed, match="stage student_seed1 finished on Ray node abc but .* does not exist"):
        check_stage_results(root, [Task("student_seed1", "train", cfg)], {"student_seed1": {"ray_node": "abc"}})
    check_stage_results(root, [Task("student", "train", cfg)], results)  # present: no error


@pytest.mark.slow
def test_a_lost_nodes_stage_is_retried_on_another_node_and_the_run_completes_the_same(micro, tmp_path,
                                                                                   monkeypatch, capsys):
    """A worker node removed while it trains the β search (every CPU of its node gone with it) and a new node
    added: the search is retried on another node, resumes from its last checkpoint, the progress line says so,
    the new node gets work, and the results are an undisturbed run's. (Slow: its own cluster; run with -m slow.)"""
    import threading

    cfg, _ = micro
    longer = ["search.epochs=8", "train.threads=1"]  # a β search long enough to lose its node in the middle
    ref_root = tmp_path / "ref"
    run_pipeline(cfg, [f"out={ref_root}", "pipeline.workers=1", *longer])  # undisturbed, one worker
    c = _start_cluster(tmp_path)
    try:
        root = tmp_path / "run"
        errors = []

        def go():
            try:
                run_pipeline(cfg, [f"out={root}", "pipeline.executor=ray", f"search.ray_address={c.address}",
                                   "pipeline.workers=2", *longer])
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        t = threading.Thread(target=go)
        t.start()
        attempts = root / ".rolekd-attempts" / "beta_search.txt"
        state = root / "beta_search" / "search_state" / "LATEST"  # the search's first checkpoint (a round's end)
        deadline = time.time() + 300
        while not (attempts.is_file() and state.exists()) and time.time() < deadline and t.is_alive():
            time.sleep(0.05)
        assert attempts.is_file() and state.exists(), errors
        lost = attempts.read_text().split()[0]
        c.remove_node(next(n for n in c.worker_nodes if n.node_id == lost), allow_graceful=False)
        added = c.add_node(num_cpus=1)
        t.join(600)
        assert not t.is_alive() and not errors, errors
        out = capsys.readouterr().out
        assert re.search(r"beta_search was retried on node \w+ after its node \(" + lost[:12] + r"\) was lost", out)
        same_results(ref_root, root)
        results = json.loads((root / "results.json").read_text())
        assert results["beta_search"]["ray_node"] != lost and results["beta_search"]["ray_attempts"][0] == lost
        assert added.node_id in {r["ray_node"] for r in results.values()}
    finally:
        _stop_cluster(c)


def test_a_failing_stage_is_one_line_and_the_finished_stages_stay(micro, tmp_path, monkeypatch, capsys):
    """The stage-β student diverges (planted): one line, exit 1, and the stages finished before it keep their
    results (a rerun would skip them); nothing waits for a report."""
    import rolekd.pipeline.graph as graph
    from rolekd.train import NonFiniteLoss

    cfg, ref_root = micro
    root = tmp_path / "run"
    real = graph.train_from_config

    def train(config, **kw):
        if kw.get("log_name") == "student":
            raise NonFiniteLoss("planted divergence")
        return real(config, **kw)

    monkeypatch.setattr(graph, "train_from_config", train)
    rc = main(["run", str(cfg), f"out={root}", "pipeline.workers=1", "train.threads=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err == ["rolekd: error: stage student: planted divergence"]
    # the critical path ran first: the α search, the teacher and the β search finished, as in the reference
    assert json.loads((root / "teacher" / "result.json").read_text())["test_acc"] == \
        json.loads((ref_root / "teacher" / "result.json").read_text())["test_acc"]
    assert (root / "alpha_search" / "search.json").is_file() and (root / "beta_search" / "search.json").is_file()
    assert not (root / "student" / "result.json").exists() and not (root / "report.md").exists()


def test_paper_numbers_appear_only_for_a_matching_setting(micro, tmp_path, monkeypatch):
    from rolekd.report import report as rep

    _, root = micro
    stage_beta = {"dataset": "cifar10", "model": "resnet_tiny", "bits": 4, "row": "stage_beta", "method": "iikd",
                  "teacher": "resnet_tiny", "init": "teacher", "lam": 0.4}
    cells = [{"table": "T2", "where": "a", "acc": 12.34, "setting": stage_beta},
             {"table": "T2", "where": "b", "acc": 56.78, "setting": dict(stage_beta, bits=2)},
             {"table": "T1", "where": "c", "acc": 65.43, "setting": dict(stage_beta, lam=1.0)},
             {"table": "T2", "where": "d", "acc": 23.45, "setting": dict(stage_beta, row="only_kd")},
             {"table": "T2", "where": "e", "acc": 34.56, "setting": dict(stage_beta, row="vanilla", init="scratch")}]
    paper = tmp_path / "paper.yaml"

    def report(epochs):
        paper.write_text(yaml.safe_dump({"epochs": epochs, "cells": cells}))
        return rep.build_report(copy).read_text()

    monkeypatch.setattr(rep, "PAPER_FILE", paper)
    copy = tmp_path / "run"
    shutil.copytree(root, copy)
    assert "12.34" not in report(2)  # the bundled sample is not the official CIFAR-10: no paper number
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["data"]["name"] = "cifar10"
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    text = report(2)
    line = next(x for x in text.splitlines() if x.startswith("| stage β"))
    assert "12.34 (T2, a)" in line
    assert "23.45 (T2, d)" in next(x for x in text.splitlines() if x.startswith("| only KD"))
    assert "56.78" not in text and "65.43" not in text  # 2-bit cell; λ = 1 cell (this run: λ = 0.4)
    assert "34.56" not in text  # the paper's low-bit vanilla trains from scratch; ours starts from the teacher
    assert "12.34" not in report(200)  # the paper's 200-epoch recipe, this run 2 epochs


def test_the_bundled_paper_numbers_are_the_papers_tables(shared_dir):
    """report/paper.yaml holds every number of the paper's Tables 1-4 (../shared/paper/tables.yaml), each once,
    in the table it comes from."""
    tables = yaml.safe_load((shared_dir / "paper" / "tables.yaml").read_text())
    from rolekd.report.report import PAPER_FILE

    cells = yaml.safe_load(PAPER_FILE.read_text())["cells"]
    for key in ("table1", "table2", "table3", "table4"):
        want = sorted(v for row in tables[key]["rows"].values() for v in row)
        if key == "table4":
            want = sorted(want + list(tables[key]["teachers"].values()))
        got = sorted(c["acc"] for c in cells if c["table"] == f"Table {key[-1]}")
        assert got == want, key
    t1 = [c for c in cells if c["table"] == "Table 1"]
    assert {c["setting"]["lam"] for c in t1 if c["setting"]["method"] != "iikd"} == {1.0}  # baselines at λ = 1
    assert {c["setting"]["lam"] for c in t1 if c["setting"]["method"] == "iikd"} == {0.4}


def test_report_says_when_a_schedule_is_empty_and_when_stages_trained_identically(micro, tmp_path):
    from rolekd.report import build_report

    _, root = micro
    report = (root / "report.md").read_text()
    for search, label in (("alpha_search", "A_T"), ("beta_search", "A_S")):
        pols = Schedule.load(root / search / "schedule.json").policies
        active = sum(1 for p in pols if any(p[i] for i in range(0, 60, 2)))
        if active:
            assert f"{label} (teacher)" in report or f"{label} (student)" in report
            assert f"applies ops in {active} of its {len(pols)} epochs" in report
        else:
            assert f"The learned schedule {label}" in report and "is empty" in report
    # with an empty A_T, stage α trains exactly as the vanilla teacher: the report must say so, and only then
    pols = Schedule.load(root / "alpha_search" / "schedule.json").policies
    def trajectory(d):
        rows = [json.loads(x) for x in (root / d / "metrics.jsonl").read_text().splitlines()]
        return [(r["train_loss"], r["train_acc"], r["test_acc"]) for r in rows]

    same_t = all(trajectory(f"teacher{d}") == trajectory(f"vanilla_teacher{d}") for d in ("", "_seed1"))
    said = "stage α (teacher schedule A_T) and vanilla (base augmentation) trained identically" in report
    assert said == same_t
    if not any(any(p[i] for i in range(0, 60, 2)) for p in pols) and "cutout: 0" in MICRO:
        assert same_t  # an empty A_T and no Cutout: stage α is the vanilla teacher, epoch by epoch
    # (MICRO's stage α adds augment.cutout, which the vanilla teacher does not: they differ even with an empty A_T)
    # a copy whose A_T is empty and whose stage α run is the vanilla teacher's
    copy = tmp_path / "run"
    shutil.copytree(root, copy)
    Schedule([[0] * 60] * 2).save(copy / "alpha_search" / "schedule.json")
    for d in ("", "_seed1"):
        shutil.copy(copy / f"vanilla_teacher{d}" / "metrics.jsonl", copy / f"teacher{d}" / "metrics.jsonl")
        shutil.copy(copy / f"vanilla_teacher{d}" / "result.json", copy / f"teacher{d}" / "result.json")
    text = build_report(copy).read_text()
    assert "**The learned schedule A_T (teacher) is empty**" in text
    assert ("**stage α (teacher schedule A_T) and vanilla (base augmentation) trained identically** (the same "
            "losses and accuracies in every epoch, every seed)") in text
    line = next(x for x in text.splitlines() if x.startswith("| stage α vs vanilla teacher"))
    assert "| +0.00 ± 0.00 | 2 | — | — | identical in every seed |" in line
    # and a non-empty schedule is counted: ops in exactly the epochs that have a probability above 0
    pol = [0] * 60
    pol[0] = 3  # one op, probability 0.3, in the second epoch only
    Schedule([[0] * 60, pol]).save(copy / "alpha_search" / "schedule.json")
    assert "A_T (teacher) applies ops in 1 of its 2 epochs" in build_report(copy).read_text()


def test_a_difference_equal_in_every_seed_has_no_spread_and_no_paired_t():
    from rolekd.report.report import paired

    # accuracies as the report reads them (100 * test_acc on 1,000 images): 39.1 - 30.5 and 39.2 - 30.6 are
    # both 8.6 but differ in float arithmetic by ~1e-15, which once gave a paired t of 1e15
    a, b = [100 * 0.391, 100 * 0.392], [100 * 0.305, 100 * 0.306]
    assert len({x - y for x, y in zip(a, b)}) == 2  # the float noise this guards against is really there
    out = paired(a, b)
    assert out["std"] == 0 and abs(out["mean"] - 8.6) < 1e-9
    assert "the same difference in all 2 seeds" in out["verdict"] and "t undefined" in out["verdict"]
    # a real spread: t = mean / (sd / sqrt(n)), judged against Student's t with n - 1 degrees of freedom
    out = paired([40.0, 41.0, 43.0], [39.0, 39.0, 39.0])
    d = [1.0, 2.0, 4.0]
    t = statistics.mean(d) / (statistics.stdev(d) / math.sqrt(3))
    assert abs(out["t"] - t) < 1e-9 and "within the seed-to-seed noise" in out["verdict"]  # t = 2.65 < 4.30


def test_paired_difference_has_the_t_interval_and_p_value_of_n_minus_1_degrees_of_freedom():
    """12 paired values: the half-width is t_{0.975,11} * sd / sqrt(12) with t_{0.975,11} = 2.201 (not
    1.96), the p-value the paired t test's; |t| = 2.1 lies between 1.96 and 2.201, so the verdict is
    'within the noise' only with the right quantile."""
    assert abs(stats.t.ppf(0.975, 11) - 2.201) < 1e-3  # by hand, from a t table
    base = np.arange(12) - 5.5  # mean 0
    sd = base.std(ddof=1)
    diffs = base + 2.1 * sd / math.sqrt(12)  # paired t = 2.1
    b = [40.0 + i for i in range(12)]
    a = [x + y for x, y in zip(b, diffs)]
    from rolekd.report.report import paired

    out = paired(a, b)
    assert abs(out["t"] - 2.1) < 1e-6
    half = stats.t.ppf(0.975, 11) * sd / math.sqrt(12)
    assert abs((out["ci"][1] - out["ci"][0]) / 2 - half) < 1e-6
    assert abs((out["ci"][1] - out["ci"][0]) / 2 / (sd / math.sqrt(12)) - 2.201) < 1e-3
    assert abs((out["ci"][0] + out["ci"][1]) / 2 - diffs.mean()) < 1e-6
    assert abs(out["p"] - stats.ttest_rel(a, b).pvalue) < 1e-9 and 0.05 < out["p"] < 0.07
    assert "within the seed-to-seed noise" in out["verdict"] and "abs(t) > 2.20" in out["verdict"]
    # no spread: no interval and no p-value
    assert paired([41.0, 42.0], [40.0, 41.0])["ci"] is None and paired([41.0], [40.0])["p"] is None


def test_the_report_names_the_code_that_ran(micro):
    """``code.jsonl`` records the rolekd commit each time the run starts; the report's Versions section names it
    (from a git checkout: ``git rev-parse HEAD`` of the package's checkout; else the version, said so)."""
    import rolekd

    _, root = micro
    rows = [json.loads(x) for x in (root / "code.jsonl").read_text().splitlines()]
    checkout = Path(rolekd.__file__).resolve().parents[2]
    report = (root / "report.md").read_text()
    if (checkout / ".git").exists():
        sha = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        assert rows[0]["commit"] == sha.strip() and len(sha.strip()) == 40
        assert f"- code: git {sha.strip()}" in report
    else:
        assert rows[0]["commit"] is None and "(not a git checkout)" in report


@pytest.mark.slow
def test_a_lost_head_stops_the_run_with_one_line_and_a_rerun_resumes_to_the_same_results(micro, tmp_path):
    """The cluster's head killed while the α search runs: the run stops with one line that says to rerun (not
    Ray's own exit a minute later); the cluster started again, the same command resumes and ends with an
    undisturbed run's results. (Slow: two clusters; run with -m slow.)"""
    import threading

    from rolekd.errors import RunFailed

    cfg, ref_root = micro
    root = tmp_path / "run"
    argv = [f"out={root}", "pipeline.executor=ray", "pipeline.workers=2", "train.threads=1"]
    c = _start_cluster(tmp_path)
    errors = []
    try:
        def go():
            try:
                run_pipeline(cfg, argv + [f"search.ray_address={c.address}"])
            except BaseException as e:  # noqa: BLE001 - checked below
                errors.append(e)

        t = threading.Thread(target=go, daemon=True)
        t.start()
        state = root / "alpha_search" / "search_state" / "LATEST"  # the search's first checkpoint
        deadline = time.time() + 300
        while not state.exists() and time.time() < deadline and t.is_alive():
            time.sleep(0.05)
        assert state.exists(), errors
        lost = time.time()
        # killed, not removed (the harness refuses to remove the node this driver is connected to)
        c.head_node.kill_all_processes(check_alive=False, allow_graceful=False)
        t.join(120)
        assert not t.is_alive()
        assert time.time() - lost < 60  # before Ray's own driver gives up on its head
    finally:
        _stop_cluster(c)
    assert len(errors) == 1 and isinstance(errors[0], RunFailed), errors
    msg = str(errors[0])
    assert "\n" not in msg and re.match(r"lost the Ray cluster's head at search.ray_address=\S+ \(no answer for \d+ "
                                         r"s\).*rerun the same command, it resumes", msg), msg
    time.sleep(2)  # the old nodes' stage processes gone (they held their run directories' locks)
    c = _start_cluster(tmp_path / "again")
    try:
        run_pipeline(cfg, argv + [f"search.ray_address={c.address}"])
    finally:
        _stop_cluster(c)
    same_results(ref_root, root)
