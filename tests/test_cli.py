"""The command line: a real training run, and bad input = one line on stderr, exit 2, nothing lost."""

import json
import math

import pytest
import torch
from torch import nn

from rolekd.cli import main
from rolekd.errors import UserError
from rolekd.data import bundle_from_tensors, register_dataset
from rolekd.models import register_model

TINY = ["model=resnet_tiny", "train.progress=false", "data.max_train=512", "data.max_test=200",
        "train.batch_size=64", "train.eval_batch_size=200"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "teacher"
    assert main(["train", *TINY, "epochs=2", f"out={out}"]) == 0
    return out


def test_train_writes_a_complete_run_and_reruns_as_finished(teacher_run, capsys):
    for f in ("config.yaml", "metrics.jsonl", "metrics.csv", "model.safetensors", "result.json",
              "checkpoint/state.pt", "checkpoint/model.safetensors"):
        assert (teacher_run / f).is_file(), f
    rows = [json.loads(x) for x in (teacher_run / "metrics.jsonl").read_text().splitlines()]
    result = json.loads((teacher_run / "result.json").read_text())
    assert [r["epoch"] for r in rows] == [0, 1]
    assert result["test_acc"] == rows[-1]["test_acc"]
    before = (teacher_run / "metrics.jsonl").read_text()
    code, out, _ = run(capsys, "train", *TINY, "epochs=2", f"out={teacher_run}")
    assert code == 0 and "already finished" in out
    assert (teacher_run / "metrics.jsonl").read_text() == before


def metric_rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_kd_row(row, lam):
    """A KD epoch's metrics: finite, λ as configured, and the logged loss is the objective task + λ·KD
    (every metric is a per-image average of per-batch values, so the identity holds for the averages)."""
    keys = ("train_loss", "train_task_loss", "train_kd_loss", "train_lam")
    assert all(math.isfinite(row[k]) for k in keys) and not row.get("nonfinite"), row
    assert row["train_lam"] == pytest.approx(lam, rel=1e-6)
    task, kd = row["train_task_loss"], row["train_kd_loss"]
    assert task > 0 and kd > 0, row
    assert row["train_loss"] == pytest.approx(task + lam * kd, rel=1e-5), row


def one_line_error(code, err, match):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rolekd: error:"), err
    assert "Traceback" not in err
    assert match in lines[0], lines[0]


@pytest.mark.parametrize("args,match", [
    (["train", "train.lrr=1"], "unknown key train.lrr"),
    (["train", "model=resnet_huge"], "resnet_huge"),
    (["train", "augment.schedule=/nonexistent/s.json"], "s.json"),
    (["train", "data.name=cifar10-jpeg"], "data.path"),
    (["distill", "method=iikd"], "teacher"),
    (["distill", "teacher=/nonexistent/run"], "method"),
])
def test_bad_input_is_one_line_exit_2(capsys, tmp_path, args, match):
    code, _, err = run(capsys, args[0], *TINY, *args[1:], f"out={tmp_path / 'r'}")
    one_line_error(code, err, match)


def test_missing_config_file(capsys):
    code, _, err = run(capsys, "train", "/nonexistent/config.yaml", *TINY)
    one_line_error(code, err, "not found")


def test_corrupt_schedule_and_foreign_checkpoint(capsys, tmp_path, teacher_run):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "rolekd-schedule", "version": 1, "policies": [[1, 2]]}')
    code, _, err = run(capsys, "train", *TINY, f"augment.schedule={bad}", f"out={tmp_path / 'a'}")
    one_line_error(code, err, "bad.json")
    # a teacher checkpoint that does not fit the teacher model
    code, _, err = run(capsys, "distill", *TINY, "method=soft", f"teacher={teacher_run}", "kd.teacher_model=wrn_10_1",
                       "model=wrn_10_1", f"out={tmp_path / 'b'}")
    one_line_error(code, err, "does not fit")
    code, _, err = run(capsys, "distill", *TINY, "method=nope", f"teacher={teacher_run}", f"out={tmp_path / 'c'}")
    one_line_error(code, err, "unknown KD method")
    garbage = tmp_path / "t.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    code, _, err = run(capsys, "distill", *TINY, "method=soft", f"teacher={garbage}", f"out={tmp_path / 'd'}")
    one_line_error(code, err, "not a readable safetensors")


def test_other_config_in_existing_run_dir_is_refused_and_kept(capsys, teacher_run):
    before = {p: p.read_bytes() for p in teacher_run.rglob("*") if p.is_file()}
    code, _, err = run(capsys, "train", *TINY, "epochs=3", f"out={teacher_run}")
    one_line_error(code, err, "different config")
    assert {p: p.read_bytes() for p in teacher_run.rglob("*") if p.is_file()} == before


def test_a_run_made_before_a_config_key_existed_still_resumes(tmp_path):
    """A run directory whose config.yaml lacks a key added to rolekd since (it had the key's default) is the
    same run; the same file with another value of that key, or with a key rolekd no longer has, is not."""
    import yaml

    from rolekd.config import load_config
    from rolekd.experiment import check_run_dir, prepare_run_dir

    cfg = load_config(None, TINY + [f"out={tmp_path / 'r'}"])
    prepare_run_dir(cfg)
    f = tmp_path / "r" / "config.yaml"
    data = yaml.safe_load(f.read_text())
    del data["data"]["full_train_size"], data["augment"]["matched_random_seed"]
    f.write_text(yaml.safe_dump(data))
    assert check_run_dir(cfg, tmp_path / "r")
    with pytest.raises(UserError, match="full_train_size"):
        check_run_dir(load_config(None, TINY + ["data.full_train_size=100"]), tmp_path / "r")
    data["data"]["retired_key"] = 1
    f.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError, match="retired_key"):
        check_run_dir(cfg, tmp_path / "r")


def test_distill_low_bit_student_from_teacher(capsys, tmp_path, teacher_run):
    out = tmp_path / "s"
    code, _, err = run(capsys, "distill", *TINY, "method=soft", f"teacher={teacher_run}", "w_bits=4", "a_bits=4",
                       "epochs=1", "train.optimizer=adam", "train.lr=0.001", f"out={out}")
    assert code == 0, err
    rows = metric_rows(out)
    assert len(rows) == 1
    assert_kd_row(rows[0], 0.4)
    res = json.loads((out / "result.json").read_text())
    assert (res["w_bits"], res["a_bits"], res["kd"]) == (4, 4, "soft")


@pytest.mark.parametrize("method", ["dml", "rkd", "kdsvd", "mhgd", "iikd"])
def test_every_kd_method_runs_through_distill(capsys, tmp_path, teacher_run, method):
    out = tmp_path / method
    teacher_bytes = (teacher_run / "model.safetensors").read_bytes()
    code, _, err = run(capsys, "distill", *TINY, "data.max_train=128", f"method={method}", f"teacher={teacher_run}",
                       "w_bits=2", "a_bits=2", "epochs=1", f"out={out}")
    assert code == 0, err
    row, = metric_rows(out)
    assert_kd_row(row, 0.4)
    if method == "iikd":  # II-KD is RKD + MHGD + KD-SVD under one λ, each term logged
        terms = [row[f"train_kd_{t}"] for t in ("rkd", "mhgd", "kdsvd")]
        assert all(t > 0 for t in terms) and sum(terms) == pytest.approx(row["train_kd_loss"], rel=1e-5)
    # DML trains its own copy of the teacher; no method writes to the teacher's checkpoint
    assert (teacher_run / "model.safetensors").read_bytes() == teacher_bytes


def test_search_cli_needs_a_teacher_for_the_student_role(capsys, tmp_path):
    code, _, err = run(capsys, "search", *TINY, "role=student", "method=soft", f"out={tmp_path / 's'}")
    one_line_error(code, err, "teacher")


# ----------------------------------------------------------------------------- KD against a known outcome
class PlainNet(nn.Module):
    """No BatchNorm, no dropout: its train-mode forward (the student's) equals its eval-mode forward
    (the frozen teacher's), so a student holding the teacher's weights computes the teacher's function."""

    kd_taps = {"s1": "stage1", "s2": "stage2"}
    kd_embedding = "fc"

    def __init__(self, num_classes=4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(self.stage2(self.stage1(self.stem(x))).mean((2, 3)))


register_model("cli_plain_net")(PlainNet)
_g = torch.Generator().manual_seed(0)
_X = torch.randint(0, 256, (96, 3, 12, 12), dtype=torch.uint8, generator=_g)
_Y = torch.randint(0, 4, (96,), generator=_g)
register_dataset("cli-kd-toy", lambda: bundle_from_tensors("cli-kd-toy", _X[:64], _Y[:64], _X[64:], _Y[64:]))
PLAIN = ["dataset=cli-kd-toy", "model=cli_plain_net", "train.progress=false", "train.batch_size=32",
         "train.eval_batch_size=32"]


@pytest.fixture(scope="module")
def plain_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "teacher"
    assert main(["train", *PLAIN, "epochs=2", f"out={out}"]) == 0
    return out


@pytest.mark.parametrize("method", ["soft", "dml", "rkd", "kdsvd", "mhgd", "iikd"])
def test_kd_loss_vanishes_exactly_when_the_student_is_its_teacher(capsys, tmp_path, plain_teacher, method):
    """A full-precision student initialised from its teacher, with a learning rate (1e-30) too small to move
    any weight, computes the teacher's logits, features and embedding on every batch: every KD loss is 0.
    A student of its own (random) weights is not the teacher: the same run logs a positive KD loss.
    This catches a teacher fed other images or other weights than the student, and a method that ignores
    the teacher."""
    common = [*PLAIN, f"method={method}", f"teacher={plain_teacher}", "epochs=1", "train.lr=1e-30",
              "kd.prepare_epochs=1"]
    code, _, err = run(capsys, "distill", *common, f"out={tmp_path / 'same'}")
    assert code == 0, err
    code, _, err = run(capsys, "distill", *common, "kd.init_from_teacher=false", f"out={tmp_path / 'other'}")
    assert code == 0, err
    (same,), (other,) = metric_rows(tmp_path / "same"), metric_rows(tmp_path / "other")
    assert_kd_row(other, 0.4)
    assert same["train_kd_loss"] <= 1e-6 * other["train_kd_loss"], (same["train_kd_loss"], other["train_kd_loss"])
    assert same["train_loss"] == pytest.approx(same["train_task_loss"], rel=1e-6)
