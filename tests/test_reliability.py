"""Runs that cannot be silently corrupted (issue 15): the checkpoint is one unit (a kill at every step of
its write resumes to the bit-identical result), one process per run directory, loud divergence with
valid JSON metrics, a torn metrics line, checked datasets, a config checked before its run directory
is made, plain names, OS errors and an unreachable Ray cluster as one line, thread control."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import rolekd.files as files
from rolekd.cli import main
from rolekd.config import TrainConfig, load_config
from rolekd.data import DeviceLoader, bundle_from_tensors, register_dataset
from rolekd.experiment import search_from_config
from rolekd.files import read_checkpoint
from rolekd.models import register_model
from rolekd.search.ray_executor import RayExecutor
from rolekd.train import CrossEntropy, NonFiniteLoss, Trainer

SRC = str(Path(__file__).resolve().parents[1] / "src")
TESTS = str(Path(__file__).resolve().parent)
SAMPLE = Path(SRC) / "rolekd" / "data" / "cifar10_sample.npz"


# ------------------------------------------------------------------------------------ toy data and nets
class RelNet(nn.Module):
    """Small, with BatchNorm (buffers) and dropout (the CPU random stream must survive a resume)."""

    def __init__(self, num_classes=4):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x))).mean((2, 3))))


class RelBomb(RelNet):
    """Trains normally for ``after`` steps, then makes its logits NaN (``mode=loss``) or, with a finite
    loss, fills an unused buffer with inf (``mode=weights``): a divergence at a known epoch."""

    def __init__(self, num_classes=4, after=8, mode="loss"):
        super().__init__(num_classes)
        self.after, self.mode = int(after), mode
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("junk", torch.zeros(()))

    def forward(self, x):
        out = super().forward(x)
        if self.training:
            self.steps += 1
            if int(self.steps) > self.after:
                if self.mode == "loss":
                    out = out * float("nan")
                else:
                    self.junk.fill_(float("inf"))
        return out


THREADS_SEEN: list[int] = []


class RelThreads(RelNet):
    def forward(self, x):
        THREADS_SEEN.append(torch.get_num_threads())
        return super().forward(x)


class RelOOM(RelNet):
    """Runs out of (CUDA) memory at its ``after``-th training step, as torch raises it."""

    def __init__(self, num_classes=4, after=6):
        super().__init__(num_classes)
        self.after = int(after)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long), persistent=False)  # counts per process

    def forward(self, x):
        if self.training:
            self.steps += 1
            if int(self.steps) >= self.after:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total "
                                             "capacity of 79.19 GiB of which 3.06 MiB is free.")
        return super().forward(x)


register_model("rel_net")(RelNet)
register_model("rel_oom")(RelOOM)
register_model("rel_bomb")(RelBomb)
register_model("rel_threads")(RelThreads)
_g = torch.Generator().manual_seed(15)
_X = torch.randint(0, 256, (96, 3, 8, 8), dtype=torch.uint8, generator=_g)
_Y = torch.randint(0, 4, (96,), generator=_g)
register_dataset("rel-toy", lambda: bundle_from_tensors("rel-toy", _X[:64], _Y[:64], _X[64:], _Y[64:],
                                                        classes=["a", "b", "c", "d"]))
# 64 images, 10 labels: the "10 labels for 4,000 images"
register_dataset("rel-short-labels", lambda: bundle_from_tensors("rel-short-labels", _X[:64], _Y[:10], _X[64:],
                                                                 _Y[64:], classes=["a", "b", "c", "d"]))
register_dataset("rel-label-range", lambda: bundle_from_tensors("rel-label-range", _X[:64], _Y[:64] + 2, _X[64:],
                                                                _Y[64:], classes=["a", "b", "c", "d"]))

TOY = ["dataset=rel-toy", "model=rel_net", "train.progress=false", "train.batch_size=16", "train.eval_batch_size=32",
       "augment.cutout=0", "augment.pad=1", "train.device=cpu", "train.lr=0.05"]
EPOCHS = 3
STEPS = ["tmp_dir_created", "part_written:model.safetensors", "part_written:state.pt", "manifest_written",
         "old_moved_aside", "new_published", "old_removed"]
TIMING = {"train_time_s", "train_img_per_s"}


class Kill(BaseException):
    """Stands for SIGKILL: not an Exception, so no handler of the package catches it."""


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, match, status=2):
    assert code == status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rolekd: error:"), err
    assert "Traceback" not in err
    assert match in lines[0], lines[0]


def rows(run_dir):
    def no_nan(s):
        raise AssertionError(f"bare {s} in metrics.jsonl")

    return [json.loads(line, parse_constant=no_nan) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def assert_same_run(a: Path, b: Path):
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ra, rb = rows(a), rows(b)
    assert [r["epoch"] for r in rb] == list(range(EPOCHS))
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in ra] == \
           [{k: v for k, v in r.items() if k not in TIMING} for r in rb]
    result_a, result_b = (json.loads((d / "result.json").read_text()) for d in (a, b))
    assert result_a["test_acc"] == result_b["test_acc"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("rel") / "ref"
    assert main(["train", *TOY, f"epochs={EPOCHS}", f"out={out}"]) == 0
    return out


def killer(step: str, at_write: int, counts: dict):
    """A checkpoint hook that raises Kill at ``step`` of the ``at_write``-th checkpoint write."""
    def hook(name):
        counts[name] = counts.get(name, 0) + 1
        if name == step and counts["tmp_dir_created"] == at_write:
            raise Kill
    return hook


def counter(counts: dict):
    def hook(name):
        counts[name] = counts.get(name, 0) + 1
    return hook


# ------------------------------------------------------------------------------------ atomic checkpoints
KILLS = [(s, 2) for s in STEPS] + [(s, 1) for s in STEPS if s not in ("old_moved_aside", "old_removed")]


@pytest.mark.parametrize("step,write", KILLS, ids=[f"{s}@{w}" for s, w in KILLS])
def test_kill_at_every_step_of_the_checkpoint_write_resumes_bit_identically(reference, tmp_path, monkeypatch,
                                                                            capsys, step, write):
    out = tmp_path / "run"
    monkeypatch.setattr(files, "checkpoint_hook", killer(step, write, {}))
    with pytest.raises(Kill):
        main(["train", *TOY, f"epochs={EPOCHS}", f"out={out}"])
    # what the disk holds is the old checkpoint or the new one, never a mixture or nothing
    survivor = write if step in ("new_published", "old_removed") else write - 1
    manifest = read_checkpoint(out / "checkpoint")
    assert (manifest["epoch"] if manifest else 0) == survivor
    counts: dict = {}
    monkeypatch.setattr(files, "checkpoint_hook", counter(counts))
    code, _, err = run(capsys, "train", *TOY, f"epochs={EPOCHS}", f"out={out}")
    assert code == 0, err
    assert counts.get("new_published", 0) == EPOCHS - survivor  # resumed there, not restarted
    assert_same_run(reference, out)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".rolekd.lock"]  # no leftovers


def subprocess_main():  # run by the test below in a child process: a real process death mid-write
    step, write, *argv = sys.argv[1:]
    counts: dict = {}

    def hook(name):
        counts[name] = counts.get(name, 0) + 1
        if name == step and counts["tmp_dir_created"] == int(write):
            os._exit(137)

    files.checkpoint_hook = hook
    sys.exit(main(argv))


def test_process_death_between_the_renames_resumes_bit_identically(reference, tmp_path, capsys):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, TESTS, os.environ.get("PYTHONPATH", "")])}
    code = "import test_reliability as t; t.subprocess_main()"
    proc = subprocess.run([sys.executable, "-c", code, "old_moved_aside", "2", "train", *TOY, f"epochs={EPOCHS}",
                           f"out={out}"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 137, proc.stderr[-2000:]
    assert not (out / "checkpoint").exists()  # killed with the old checkpoint moved aside
    code, _, err = run(capsys, "train", *TOY, f"epochs={EPOCHS}", f"out={out}")
    assert code == 0, err
    assert_same_run(reference, out)


@pytest.fixture
def interrupted(tmp_path, monkeypatch):
    """A run killed just before writing its third checkpoint: checkpoint of epoch 2, three metrics rows."""
    out = tmp_path / "run"
    monkeypatch.setattr(files, "checkpoint_hook", killer("tmp_dir_created", 3, {}))
    with pytest.raises(Kill):
        main(["train", *TOY, f"epochs={EPOCHS}", f"out={out}"])
    monkeypatch.setattr(files, "checkpoint_hook", None)
    return out


@pytest.mark.parametrize("damage,match", [
    (lambda ck: (ck / "state.pt").unlink(), "missing its part state.pt"),
    (lambda ck: (ck / "model.safetensors").unlink(), "missing its part model.safetensors"),
    (lambda ck: (ck / "model.safetensors").write_bytes((ck / "model.safetensors").read_bytes()[:-100]), "truncated"),
    (lambda ck: (ck / "manifest.json").unlink(), "no manifest.json"),
    (lambda ck: [p.unlink() for p in ck.iterdir()], "empty"),
])
def test_a_checkpoint_missing_a_part_is_an_error_not_a_fresh_start(interrupted, capsys, damage, match):
    damage(interrupted / "checkpoint")
    before = snapshot(interrupted)
    code, _, err = run(capsys, "train", *TOY, f"epochs={EPOCHS}", f"out={interrupted}")
    one_line_error(code, err, match)
    assert snapshot(interrupted) == before


def test_a_torn_last_metrics_line_is_dropped_with_a_note(reference, interrupted, capsys):
    with open(interrupted / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "lr": 0.0')  # a write cut off mid-line
    code, _, err = run(capsys, "train", *TOY, f"epochs={EPOCHS}", f"out={interrupted}")
    assert code == 0, err
    assert "torn last line" in err
    assert_same_run(reference, interrupted)


def test_a_moved_run_directory_resumes(reference, interrupted, capsys):
    moved = interrupted.parent / "moved"
    interrupted.rename(moved)
    code, _, err = run(capsys, "train", *TOY, f"epochs={EPOCHS}", f"out={moved}")
    assert code == 0, err
    assert_same_run(reference, moved)


def test_a_corrupt_config_yaml_is_named(interrupted, capsys):
    (interrupted / "config.yaml").write_text("train: [unclosed\n")
    code, _, err = run(capsys, "train", *TOY, f"epochs={EPOCHS}", f"out={interrupted}")
    one_line_error(code, err, "config.yaml is unreadable")


# ------------------------------------------------------------------------------------ one process per run dir
def test_a_second_process_on_a_run_dir_is_refused(reference, tmp_path, capsys):
    locked = tmp_path / "locked"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from rolekd.files import RunLock; RunLock(sys.argv[1]).acquire(); "
                               "print('locked', flush=True); sys.stdin.read()", str(locked)],
        env={**os.environ, "PYTHONPATH": SRC}, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(locked)
        for argv in (["train", *TOY, "epochs=1"],
                     ["distill", *TOY, "epochs=1", "method=soft", f"teacher={reference}"],
                     ["search", *TOY, "data.train_size=32", "data.val_size=32", "search.population=2",
                      "search.epochs=1"],
                     ["run", *TOY]):
            code, _, err = run(capsys, *argv, f"out={locked}")
            one_line_error(code, err, f"in use by another rolekd process (pid {holder.pid})")
            assert snapshot(locked) == before, argv[0]
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    code, _, err = run(capsys, "train", *TOY, "epochs=1", f"out={locked}")  # the lock went with its process
    assert code == 0, err


# ------------------------------------------------------------------------------------ divergence
def test_a_diverging_run_stops_with_one_line_and_valid_json(tmp_path, capsys):
    out = tmp_path / "bomb"
    # 64 images / batch 16 = 4 steps an epoch; NaN logits from step 9 on: epochs 1-2 finite, epoch 3 diverges
    argv = ["train", *TOY, "model=rel_bomb", "model.kwargs={after: 8, mode: loss}", "epochs=5", f"out={out}"]
    code, _, err = run(capsys, *argv)
    one_line_error(code, err, "diverged", status=1)
    assert "epoch 3/5" in err and "non-finite training loss" in err
    got = rows(out)  # every line valid JSON: no bare NaN
    assert [r["epoch"] for r in got] == [0, 1, 2]
    assert all(r["train_loss"] is not None and "nonfinite" not in r for r in got[:2])
    assert got[2]["train_loss"] is None and got[2]["nonfinite"] is True
    assert read_checkpoint(out / "checkpoint")["epoch"] == 2  # the last finite epoch
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "diverged" and result["diverged_epoch"] == 3 and result["last_finite_epoch"] == 2
    assert not (out / "model.safetensors").exists()
    before = snapshot(out)
    code, _, err = run(capsys, *argv)  # rerun: reported again, nothing trained
    one_line_error(code, err, "diverged earlier", status=1)
    assert snapshot(out) == before


def test_non_finite_weights_with_a_finite_loss_also_stop_the_run(tmp_path, capsys):
    out = tmp_path / "bomb"
    code, _, err = run(capsys, "train", *TOY, "model=rel_bomb", "model.kwargs={after: 4, mode: weights}", "epochs=3",
                       f"out={out}")
    one_line_error(code, err, "non-finite weights", status=1)
    assert "epoch 2/3" in err
    assert [r["epoch"] for r in rows(out)] == [0, 1] and rows(out)[1]["train_loss"] is not None


def test_out_of_memory_is_one_line_saying_what_to_lower_and_the_run_resumes(tmp_path, capsys):
    out = tmp_path / "oom"
    code, _, err = run(capsys, "train", *TOY, "model=rel_oom", "model.kwargs.after=6", f"epochs={EPOCHS}",
                       f"out={out}")
    # 4 steps an epoch: the 6th step is in epoch 2, so epoch 1's checkpoint is kept
    one_line_error(code, err, "out of memory in run", status=1)
    assert "(Tried to allocate 20.00 MiB)" in err and "lower train.batch_size (now 16) or train.eval_batch_size " \
        "(now 32)" in err and "rerun the same command to resume" in err
    assert read_checkpoint(out / "checkpoint")["epoch"] == 1
    # the rerun resumes from epoch 1's checkpoint: epoch 2 (steps 1-4 of the new process) completes, and the model
    # runs out again at its 6th step, in epoch 3 (the same line again)
    code, _, err = run(capsys, "train", *TOY, "model=rel_oom", "model.kwargs.after=6", f"epochs={EPOCHS}",
                       f"out={out}")
    one_line_error(code, err, "out of memory in run", status=1)
    assert read_checkpoint(out / "checkpoint")["epoch"] == 2


def test_out_of_memory_in_a_search_member_stops_the_search_instead_of_replacing_the_member(tmp_path, capsys):
    out = tmp_path / "s"
    code, _, err = run(capsys, "search", *TOY, "model=rel_oom", "model.kwargs.after=3", "data.train_size=32",
                       "data.val_size=32", "search.population=2", "search.epochs=2", "search.perturb_interval=1",
                       f"out={out}")
    one_line_error(code, err, "out of memory in search", status=1)
    assert "lower train.batch_size (now 16)" in err
    events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()] if \
        (out / "events.jsonl").is_file() else []
    assert not [e for e in events if e["event"].startswith("member_")]  # not retried, not replaced


def test_out_of_memory_in_a_pipeline_of_several_workers_also_names_pipeline_workers(tmp_path, monkeypatch, capsys):
    import rolekd.pipeline.run as prun
    from rolekd.errors import out_of_memory

    def oom(tasks, executor, **kw):
        executor.close()
        raise out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB."),
                            "run X on cuda:0", ["train.batch_size (now 128)"])
    monkeypatch.setattr(prun, "run_graph", oom)
    base = [*TOY, "pipeline.teacher.model=rel_net", "pipeline.student.model=rel_net", "pipeline.student.method=soft",
            "data.train_size=32", "data.val_size=32", f"out={tmp_path / 'p'}"]
    code, _, err = run(capsys, "run", *base, "pipeline.workers=2")
    one_line_error(code, err, "lower train.batch_size (now 128) or pipeline.workers (now 2: the stages running at "
                              "once share the GPU); then rerun", status=1)
    code, _, err = run(capsys, "run", *base, "pipeline.workers=1", f"out={tmp_path / 'q'}")
    one_line_error(code, err, "lower train.batch_size (now 128); then rerun", status=1)


def test_a_linear_algebra_failure_mid_epoch_is_a_divergence(tmp_path):
    """An objective whose eigendecomposition meets NaN from epoch 2 on (as KD-SVD/MHGD do when the
    features blow up) stops the run as diverged; the checkpoint keeps epoch 1."""

    class NaNEigh(CrossEntropy):
        def train_step(self, model, images, labels, ctx):
            out = super().train_step(model, images, labels, ctx)
            if ctx.epoch >= 1:
                torch.linalg.eigh(torch.full((4, 4), float("nan")))
            return out

    b = bundle_from_tensors("rel-eigh", _X[:64], _Y[:64], _X[64:], _Y[64:], classes=["a", "b", "c", "d"])
    tl = DeviceLoader(b.train, 16, b.mean, b.std, seed=0)
    el = {"test": DeviceLoader(b.test, 32, b.mean, b.std, shuffle=False)}
    t = Trainer(RelNet(), tl, TrainConfig(epochs=3, progress=False), el, objective=NaNEigh(), run_dir=tmp_path)
    with pytest.raises(NonFiniteLoss, match="epoch 2/3"):
        t.fit()
    assert read_checkpoint(tmp_path / "checkpoint")["epoch"] == 1
    assert [r["epoch"] for r in rows(tmp_path)] == [0]


def test_a_teacher_full_of_nan_is_refused_before_the_run_dir(reference, tmp_path, capsys):
    bad = tmp_path / "nan_teacher.safetensors"
    save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
               for k, v in load_file(str(reference / "model.safetensors")).items()}, str(bad))
    code, _, err = run(capsys, "distill", *TOY, "method=soft", f"teacher={bad}", "epochs=1", f"out={tmp_path / 's'}")
    one_line_error(code, err, "non-finite")
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------ data
def _small_npz(path: Path, n_train: int, n_labels: int, label_shift: int = 0):
    d = np.load(SAMPLE)
    to, vo = d["train_offsets"], d["test_offsets"]
    np.savez(path, train_jpeg=d["train_jpeg"][:to[n_train]], train_offsets=to[:n_train + 1],
             train_labels=d["train_labels"][:n_labels] + label_shift,
             test_jpeg=d["test_jpeg"][:vo[20]], test_offsets=vo[:21], test_labels=d["test_labels"][:20])


@pytest.mark.parametrize("case,match", [
    ("npz_count", "40 images but 10 labels"),
    ("npz_range", "labels range over"),
    ("registered_count", "64 images but 10 labels"),
    ("registered_range", "4 classes"),
])
def test_bad_labels_are_one_line_before_any_run_dir(tmp_path, capsys, monkeypatch, case, match):
    monkeypatch.setenv("ROLEKD_CACHE", str(tmp_path / "cache"))
    if case.startswith("npz"):
        npz = tmp_path / "bad.npz"
        _small_npz(npz, 40, 10 if case == "npz_count" else 40, label_shift=0 if case == "npz_count" else 10)
        data = ["dataset=cifar10-jpeg", f"data.path={npz}"]
    else:
        data = ["dataset=rel-short-labels" if case == "registered_count" else "dataset=rel-label-range"]
    code, _, err = run(capsys, "train", *TOY, *data, "epochs=1", f"out={tmp_path / 'r'}")
    one_line_error(code, err, match)
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------ config before run dir
@pytest.mark.parametrize("bad,good", [
    (["model=resnet99"], []),
    (["augment.schedule=/nonexistent/schedule.json"], []),
    (["model.kwargs={depth: 3}"], []),
])
def test_a_typo_then_the_corrected_command_succeeds(tmp_path, capsys, bad, good):
    out = tmp_path / "r"
    code, _, err = run(capsys, "train", *TOY, "epochs=1", *bad, f"out={out}")
    assert code == 2 and "Traceback" not in err, err
    assert not out.exists()
    code, _, err = run(capsys, "train", *TOY, "epochs=1", *good, f"out={out}")
    assert code == 0, err


def test_a_distill_and_a_search_typo_leave_no_run_dir(reference, tmp_path, capsys):
    code, _, err = run(capsys, "distill", *TOY, "method=iikdd", f"teacher={reference}", "epochs=1",
                       f"out={tmp_path / 'd'}")
    one_line_error(code, err, "iikdd")
    code, _, err = run(capsys, "search", *TOY, "model=resnet99", "data.train_size=32", "data.val_size=32",
                       "search.population=2", "search.epochs=1", f"out={tmp_path / 's'}")
    one_line_error(code, err, "resnet99")
    code, _, err = run(capsys, "run", *TOY, "pipeline.student.method=nokd", f"out={tmp_path / 'p'}")
    one_line_error(code, err, "nokd")
    assert not any((tmp_path / d).exists() for d in "dsp")


@pytest.mark.parametrize("name", ["../x", "/tmp/abs", "a/../b", ".hidden", "a b", "a//b", "-x"])
def test_name_is_a_plain_name(tmp_path, capsys, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "train", *TOY, "epochs=1", f"name={name}")
    one_line_error(code, err, "plain name")
    assert list(tmp_path.iterdir()) == []


def test_a_boolean_is_not_a_number(capsys, tmp_path):
    code, _, err = run(capsys, "train", *TOY, "epochs=true", f"out={tmp_path / 'r'}")
    one_line_error(code, err, "train.epochs")
    code, _, err = run(capsys, "train", *TOY, "train.progress=1", f"out={tmp_path / 'r'}")
    one_line_error(code, err, "train.progress")


# ------------------------------------------------------------------------------------ OS errors, Ray
def test_a_file_size_limit_is_one_line_and_the_run_resumes(reference, tmp_path, capsys):
    out = tmp_path / "run"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # config.yaml, metrics and manifest fit under 4 KB; the checkpoint's state.pt does not
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        code, _, err = run(capsys, "train", *TOY, f"epochs={EPOCHS}", f"out={out}")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    one_line_error(code, err, str(Path("checkpoint") / "state.pt"), status=1)
    assert "ulimit -f" in err
    assert not (out / "checkpoint").exists()
    code, _, err = run(capsys, "train", *TOY, f"epochs={EPOCHS}", f"out={out}")
    assert code == 0, err
    assert_same_run(reference, out)


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


SEARCH = ["data.train_size=32", "data.val_size=32", "search.population=2", "search.epochs=1",
          "search.executor=ray"]


def test_a_ray_address_that_refuses_is_one_line_within_30s(tmp_path, capsys):
    t0 = time.monotonic()
    code, _, err = run(capsys, "search", *TOY, *SEARCH, f"search.ray_address=127.0.0.1:{_closed_port()}",
                       f"out={tmp_path / 's'}")
    assert time.monotonic() - t0 < 30
    one_line_error(code, err, "cannot reach the Ray cluster")
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_a_ray_address_that_never_answers_is_one_line_within_30s(tmp_path, capsys):
    pytest.importorskip("ray")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)  # accepts TCP connections (the probe passes) but never speaks Ray's protocol
    try:
        t0 = time.monotonic()
        code, _, err = run(capsys, "search", *TOY, *SEARCH, f"search.ray_address=127.0.0.1:{srv.getsockname()[1]}",
                           f"out={tmp_path / 's'}")
        assert time.monotonic() - t0 < 30 + 10  # the connection deadline, plus building the members' check
    finally:
        srv.close()
    # Ray logs its own lines (connecting, a SIGTERM-handler warning) before ours: ours is the last one
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("rolekd: error: cannot connect to the Ray cluster"), err


# ------------------------------------------------------------------------------------ threads
def test_threads_default_to_the_affinity_capped_by_omp(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert TrainConfig().num_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert TrainConfig().num_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    assert TrainConfig().num_threads() == 3
    assert TrainConfig(threads=5).num_threads() == 5


def test_the_cli_trains_with_train_threads_and_restores_them(tmp_path, capsys):
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    THREADS_SEEN.clear()
    code, _, err = run(capsys, "train", *TOY, "model=rel_threads", "epochs=1", f"train.threads={wanted}",
                       f"out={tmp_path / 'r'}")
    assert code == 0, err
    assert THREADS_SEEN and set(THREADS_SEEN) == {wanted}
    assert torch.get_num_threads() == before


def test_ray_actor_threads_and_local_ray_cpus(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # _init_ray extends it for its workers
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(7)), raising=False)  # not os.cpu_count()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = load_config(None, TOY + ["search.ray_num_cpus=4"])
    assert RayExecutor.from_config(cfg, None).threads == 1  # the user's OMP_NUM_THREADS caps the actors
    cfg = load_config(None, TOY + ["search.ray_num_cpus=4", "train.threads=3"])
    assert RayExecutor.from_config(cfg, None).threads == 3

    class FakeRay:
        kwargs: dict = {}

        @staticmethod
        def is_initialized():
            return False

        @classmethod
        def init(cls, **kw):
            cls.kwargs = kw

    ex = RayExecutor.from_config(cfg, None)
    ex.ray = FakeRay
    ex._init_ray()
    assert FakeRay.kwargs["num_cpus"] == 7  # the process's affinity, not os.cpu_count()
    # a Ray of its own, never a cluster that `ray start` left on this machine (search.ray_address is for that)
    assert FakeRay.kwargs["address"] == "local"


# ------------------------------------------------------------------------------------ search state
def test_a_search_state_missing_a_member_is_an_error(tmp_path, capsys):
    out = tmp_path / "s"
    argv = [*TOY, "data.train_size=32", "data.val_size=32", "search.population=2", "search.epochs=3",
            "search.perturb_interval=1", f"out={out}"]

    def stop(info):
        if info["round"] == 1:
            raise Kill

    with pytest.raises(Kill):
        search_from_config(load_config(None, argv), on_round=stop, verbose=False)
    latest = out / "search_state" / (out / "search_state" / "LATEST").read_text().strip()
    (latest / "member_1.pt").unlink()
    before = snapshot(out)
    code, _, err = run(capsys, "search", *argv)
    one_line_error(code, err, "missing member_1.pt")
    assert snapshot(out) == before
