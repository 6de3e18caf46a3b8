"""`rolekd run` end to end on a micro configuration: every stage, the report, kill and resume."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rolekd.augment import apply_policy
from rolekd.augment.schedule import Schedule
from rolekd.cli import main
from rolekd.config import load_config
from rolekd.models import create
from rolekd.pipeline import run_pipeline
from rolekd.stages import STAGE_NAMES as STAGES

MICRO = """
name: micro
data: {name: cifar10-sample, train_size: 128, val_size: 128, max_train: 384, max_test: 200}
train: {epochs: 2, batch_size: 64, eval_batch_size: 200, progress: false}
augment: {cutout: 0}
search: {population: 2, epochs: 2, perturb_interval: 1}
kd: {prepare_epochs: 1}
pipeline:
  teacher: {model: resnet_tiny}
  student: {model: resnet_tiny, w_bits: 4, a_bits: 4, method: iikd,
            train: {optimizer: adam, lr: 0.001, weight_decay: 1.0e-5}}
"""


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe")
    cfg = d / "micro.yaml"
    cfg.write_text(MICRO)
    run_pipeline(cfg, [f"out={d / 'run'}"])
    return cfg, d / "run"


def test_every_stage_ran_and_report_holds_their_numbers(micro):
    _, root = micro
    for stage in STAGES:
        assert (root / stage / ("search.json" if stage.endswith("_search") else "result.json")).is_file(), stage
    report = (root / "report.md").read_text()
    for stage in ("teacher", "vanilla_teacher", "student", "vanilla_student", "only_kd", "student_teacher_schedule"):
        acc = json.loads((root / stage / "result.json").read_text())["test_acc"]
        assert f"| {100 * acc:.2f} |" in report, stage
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
    # stage β's numbers are measured, with the verdict line computed from them
    beta = json.loads((root / "student" / "result.json").read_text())["test_acc"]
    only = json.loads((root / "only_kd" / "result.json").read_text())["test_acc"]
    assert f"Stage β vs only-KD: {100 * (beta - only):+.2f} points" in report


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
    # stage: (role, KD teacher (None: no teacher, random init), schedule, KD method, data split)
    table = {
        "alpha_search": ("teacher", None, None, None, "reduced"),
        "teacher": ("teacher", None, a_t, None, "full"),
        "vanilla_teacher": ("teacher", None, None, None, "full"),
        "beta_search": ("student", teacher, None, kd, "reduced"),
        "student": ("student", teacher, a_s, kd, "full"),
        "vanilla_student": ("student", teacher, None, None, "full"),
        "only_kd": ("student", teacher, None, kd, "full"),
        "student_teacher_schedule": ("student", teacher, a_t, kd, "full"),
    }
    assert set(table) == set(STAGES)
    for stage, (role_name, kd_teacher, schedule, method, split) in table.items():
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
        if role_name == "student":  # every low-bit student starts from the stage α teacher's weights
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
    """Pairs of stages with the same model, seed, teacher and KD method, one with a searched schedule:
    their epochs are identical up to the schedule's first epoch with a non-zero probability (a policy
    of zeros draws nothing) and differ from the first epoch whose policy changes images."""
    _, root = micro
    keys = ("train_loss", "train_acc", "test_loss", "test_acc")
    pairs = (("teacher", "vanilla_teacher", "alpha_search"), ("student_teacher_schedule", "only_kd", "alpha_search"),
             ("student", "only_kd", "beta_search"))
    for with_schedule, without, search in pairs:
        a, b = _rows(root, with_schedule), _rows(root, without)
        epochs = _stage_config(root, with_schedule)["train"]["epochs"]
        assert len(a) == len(b) == epochs
        policies = _fitted(root / search / "schedule.json", epochs)
        first = next((e for e, p in enumerate(policies) if any(p[0::2])), epochs)
        for e in range(first):
            assert [a[e][k] for k in keys] == [b[e][k] for k in keys], (with_schedule, without, e)
        if first < epochs and _changes_images(policies[first]):
            assert [a[first][k] for k in keys] != [b[first][k] for k in keys], (with_schedule, without, first)


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
    students = {s: root / s / "model.safetensors" for s in ("student", "vanilla_student", "only_kd",
                                                              "student_teacher_schedule")}
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


def test_kill_at_any_point_and_rerun_completes_with_the_same_results(micro, tmp_path):
    cfg, ref_root = micro
    root = tmp_path / "run"
    env = dict(os.environ)
    # the reference ran in this process with torch.get_num_threads() threads (tests/conftest.py); the
    # subprocess must use as many (its default follows the CPUs it may use, 1 under `taskset -c 1`), or
    # float reductions round differently and the accuracies of the two runs need not be equal
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(torch.get_num_threads())
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "rolekd.cli", "run", str(cfg), f"out={root}"]
    # kill it in the middle of a search, then in the middle of a KD training
    for marker in (root / "alpha_search" / "search_state", root / "student" / "checkpoint" / "state.pt"):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before the kill point"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (root / "report.md").exists()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for stage in STAGES:
        name = "search.json" if stage.endswith("_search") else "result.json"
        a = json.loads((ref_root / stage / name).read_text())
        b = json.loads((root / stage / name).read_text())
        key = "best_val_acc" if stage.endswith("_search") else "test_acc"
        assert a[key] == b[key], stage
    from rolekd.augment.schedule import Schedule

    for search in ("alpha_search", "beta_search"):
        assert Schedule.load(root / search / "schedule.json") == Schedule.load(ref_root / search / "schedule.json")


def test_paper_numbers_appear_only_for_a_matching_setting(micro, tmp_path, monkeypatch):
    import shutil

    import yaml

    from rolekd.report import report as rep

    _, root = micro
    paper = tmp_path / "paper.yaml"
    paper.write_text(yaml.safe_dump({"tables": {"table2": {"rows": [
        {"model": "resnet_tiny", "dataset": "cifar10", "bits": 4, "row": "stage_beta", "acc": 12.34},
        {"model": "resnet_tiny", "dataset": "cifar10", "bits": 2, "row": "only_kd", "acc": 56.78}]}}}))
    monkeypatch.setattr(rep, "PAPER_FILE", paper)
    copy = tmp_path / "run"
    shutil.copytree(root, copy)
    text = rep.build_report(copy).read_text()
    assert "12.34" not in text  # the bundled sample is not the official CIFAR-10: no paper number
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["data"]["name"] = "cifar10"
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    text = rep.build_report(copy).read_text()
    beta_line = next(line for line in text.splitlines() if line.startswith("| stage β"))
    assert "12.34 (table2)" in beta_line
    assert "56.78" not in text  # 2-bit number, 4-bit run
