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
