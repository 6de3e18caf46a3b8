"""PBA search behaviour seen from outside: the reward is the validation accuracy, exploits copy the
chosen member's whole training state, and a student-role search distils from its frozen teacher.

Everything runs through the public API (``search_from_config`` with an ``on_round`` hook, the files
of the run directory) on a synthetic dataset whose outcome is known by construction.
"""

import csv
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rolekd.augment.schedule import Schedule
from rolekd.config import load_config
from rolekd.data import DeviceLoader, Split, bundle_from_tensors, reduced_split, register_dataset
from rolekd.models import create, register_model
from rolekd.experiment import search_from_config, train_from_config

DATASET = "searchbeh-colours"  # unique to this module (the data cache is keyed by the name)
SIZE = 8  # 8x8 images keep the searches fast
TRAIN, VAL, TEST = 200, 300, 200
SPLIT_SEED = 0
# one well-separated colour per class: the class is the colour (plus a little noise)
COLOURS = np.array([[230, 25, 25], [25, 230, 25], [25, 25, 230], [230, 230, 25], [230, 25, 230],
                    [25, 230, 230], [240, 240, 240], [20, 20, 20], [150, 80, 0], [128, 128, 128]], np.uint8)


def _images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = COLOURS[labels][:, None, None, :].astype(np.int16) + rng.integers(-12, 13, (len(labels), SIZE, SIZE, 3))
    return np.clip(x, 0, 255).astype(np.uint8)


def _make_data():
    """Training set of TRAIN + VAL colour images whose reduced-split VALIDATION part carries random labels
    (drawn independently of the colours); the test set is labelled correctly."""
    rng = np.random.default_rng(1234)
    n = TRAIN + VAL
    colour = np.arange(n) % 10
    train_x, test_y = _images(colour, rng), np.arange(TEST) % 10
    test_x = _images(test_y, rng)
    # which training images the search validates on: reduced_split's rule applied to the indices
    _, val = reduced_split(Split(torch.zeros(n, 1, 1, 1, dtype=torch.uint8), torch.arange(n)), TRAIN, VAL, SPLIT_SEED)
    val_idx = val.labels.numpy()
    labels = colour.copy()
    labels[val_idx] = rng.integers(0, 10, VAL)
    return bundle_from_tensors(DATASET, train_x, labels, test_x, test_y), val_idx, colour


BUNDLE, VAL_IDX, COLOUR = _make_data()
register_dataset(DATASET, lambda: BUNDLE)

MODEL = "searchbeh_colournet"


@register_model(MODEL)
class ColourNet(nn.Module):
    """A fast colour classifier with BatchNorm buffers: 1x1 conv, BN, ReLU, global pool, linear."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


# constant learning rate (lr_step_frac=1): the searches are a few epochs long
BASE = [f"model.name={MODEL}", f"data.name={DATASET}", f"data.train_size={TRAIN}", f"data.val_size={VAL}",
        f"data.split_seed={SPLIT_SEED}", "train.batch_size=16", "train.eval_batch_size=500", "train.lr_step_frac=1",
        "augment.cutout=0", "train.progress=false", "train.device=cpu"]


def config(out, *extra):
    return load_config(None, BASE + [f"out={out}"] + list(extra))


def read_rows(run_dir):
    with open(run_dir / "rewards.csv") as f:
        return list(csv.DictReader(f))


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def teacher_search(tmp_path_factory):
    """A role=teacher search (3 members, 3 epochs, a perturbation after epochs 1 and 2) whose
    ``search_state/`` is copied by the round hook as soon as each round has saved it."""
    root = tmp_path_factory.mktemp("teacher_search")
    out, saved = root / "run", {}

    def hook(info):
        state = out / "search_state"
        latest = state / "LATEST"
        if latest.is_file():
            d = state / latest.read_text().strip()
            meta = json.loads((d / "controller.json").read_text())
            if meta["epoch"] == info["epoch"]:  # written by this round (the last round saves nothing)
                dst = root / f"round{info['round']}"
                shutil.copytree(d, dst)
                saved[info["epoch"]] = dst

    summary = search_from_config(config(out, "search.population=3", "search.epochs=3", "search.perturb_interval=1"),
                                 on_round=hook, verbose=False)
    return out, summary, saved


# ------------------------------------------------------------------------------------ the reward
def test_reward_is_validation_accuracy_not_test_accuracy(teacher_search):
    # The validation labels are random and independent of the images, so ANY classifier scores
    # Binomial(300, 0.1) / 300 on them: mean 0.10, sd sqrt(0.1 * 0.9 / 300) = 0.017; 0.25 is ~9 sd above.
    # The test set is labelled by colour, which the members learn within 3 epochs (0.9-1.0 in trial runs
    # with four search seeds), so a reward read from the test split would be ~0.9, ~38 sd above the
    # bound, and test accuracy > 0.6 is ~14 sd (sd <= 0.035 on 200 images) above chance (0.1).
    labels = BUNDLE.train.labels.numpy()
    train_idx = np.setdiff1d(np.arange(TRAIN + VAL), VAL_IDX)
    assert (labels[train_idx] == COLOUR[train_idx]).all()  # the construction: clean training part,
    assert (labels[VAL_IDX] == COLOUR[VAL_IDX]).mean() < 0.2  # random validation labels
    out, s, _ = teacher_search
    rows = read_rows(out)
    assert len(rows) == 3 * 3
    val = [float(r["val_acc"]) for r in rows]  # perturb_interval=1: every epoch is evaluated
    assert max(val) < 0.25, val
    assert s["best_val_acc"] < 0.25 and all(v < 0.25 for v in s["final_val_acc"].values()), s
    assert s["best_test_acc"] > 0.6, s["best_test_acc"]
    # the summary's reward is the best member's last validation accuracy in rewards.csv
    last = {int(r["member"]): float(r["val_acc"]) for r in rows if r["epoch"] == "3"}
    assert s["best_val_acc"] == last[s["best_member"]] == max(last.values())


# ------------------------------------------------------------------------------------ exploits
def val_loss_of(weights: dict) -> float:
    """Mean cross-entropy of the model with ``weights`` on the search's validation split, computed
    independently of the trainer (eval mode, normalised by the training-set statistics)."""
    _, val = reduced_split(BUNDLE.train, TRAIN, VAL, SPLIT_SEED)
    model = create(MODEL, num_classes=10)
    model.load_state_dict(weights)
    model.eval()
    loader = DeviceLoader(val, len(val), BUNDLE.mean, BUNDLE.std, shuffle=False)
    with torch.no_grad():
        total = sum(float(F.cross_entropy(model(x).float(), y, reduction="sum")) for x, y in loader)
    return total / len(val)


def states_equal(a, b) -> bool:
    """Exact equality of nested states (dicts, lists, tensors, numbers)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_exploit_copies_the_chosen_members_full_state(teacher_search):
    out, _, saved = teacher_search
    n = 3
    assert sorted(saved) == [1, 2]  # a saved state after each perturbation
    log = [json.loads(l) for l in (out / "pbt_global.txt").read_text().splitlines()]
    logged = {(int(r["epoch"]), int(r["member"])): float(r["val_loss"]) for r in read_rows(out)}
    for epoch, d in saved.items():
        states = {i: torch.load(d / f"member_{i}.pt", weights_only=True) for i in range(n)}
        assert all(st["epoch"] == epoch for st in states.values())
        lines = [g for g in log if g[2] == epoch]
        assert len(lines) == 1  # 3 members, quantile 0.25: the worst member copies the best
        source = {i: i for i in range(n)}  # whose end-of-round state each member should now hold
        for target, clone, _, _, _, _ in lines:
            t, c = int(target), int(clone)
            assert t != c
            source[t] = c
            m_t, m_c = states[t]["model"], states[c]["model"]
            assert any("running_mean" in k for k in m_t) and any("running_var" in k for k in m_t)
            assert states_equal(m_t, m_c), f"epoch {epoch}: member {t}'s weights/BN buffers are not member {c}'s"
            o_t, o_c = states[t]["optimizer"], states[c]["optimizer"]
            assert o_t["state"] and all("momentum_buffer" in v for v in o_t["state"].values())
            assert states_equal(o_t, o_c), f"epoch {epoch}: member {t}'s optimizer state is not member {c}'s"
            assert states_equal(states[t].get("objective", {}), states[c].get("objective", {}))
            # the random streams are not copied: the target keeps its own
            assert not torch.equal(states[t]["cpu_rng"], states[c]["cpu_rng"])
            assert not states_equal(states[t]["loader"], states[c]["loader"])
        for i in range(n):  # a member that was not a target keeps its own state, unlike every other member's
            if source[i] == i:
                for j in range(n):
                    if j != i and source[j] != i:
                        assert not states_equal(states[i]["model"], states[j]["model"]), (epoch, i, j)
        # independent fingerprint: each member's saved weights reproduce the validation loss logged in this
        # round by the member whose state it should hold (the clone for a target, itself otherwise) ...
        for i in range(n):
            got, want = val_loss_of(states[i]["model"]), logged[(epoch, source[i])]
            assert got == pytest.approx(want, rel=1e-6), (epoch, i, source[i], got, want)
        # ... and those logged losses tell the members apart (they differ by far more than the tolerance)
        losses = sorted(logged[(epoch, j)] for j in range(n))
        assert all(b - a > 1e-5 * a for a, b in zip(losses, losses[1:])), losses


# ------------------------------------------------------------------------------------ roles
def test_teacher_role_search_ignores_kd_settings(tmp_path, teacher_search):
    """role=teacher trains plainly: a KD method and a teacher (which would also initialise members of
    its architecture) change nothing, and no KD loss is logged."""
    teacher = teacher_search[0] / "best_model.safetensors"  # a trained net of the members' architecture
    small = ["search.population=2", "search.epochs=1"]
    plain = search_from_config(config(tmp_path / "plain", *small), verbose=False)
    with_kd = search_from_config(config(tmp_path / "kd", *small, "search.role=teacher", "kd.method=soft",
                                        f"kd.teacher={teacher}"), verbose=False)
    assert with_kd["role"] == "teacher"
    assert (tmp_path / "kd" / "rewards.csv").read_text() == (tmp_path / "plain" / "rewards.csv").read_text()
    assert with_kd["final_val_acc"] == plain["final_val_acc"]
    assert with_kd["best_test_acc"] == plain["best_test_acc"]
    assert all(r["train_kd_loss"] == "" for r in read_rows(tmp_path / "kd"))


# 4-bit resnet_tiny students on the first 32 images of the reduced split (all labelled by colour), one
# step per epoch; no KD gradient clipping (one backward pass: faster)
STUDENT = ["model.name=resnet_tiny", "data.train_size=32", "data.val_size=32", "train.batch_size=32",
           "search.role=student", "kd.method=soft", "kd.clip=false", "kd.init_from_teacher=false",
           "quant.w_bits=4", "quant.a_bits=4", "search.population=2", "search.epochs=2", "search.perturb_interval=1"]


@pytest.fixture(scope="module")
def resnet_teachers(tmp_path_factory):
    """Two resnet_tiny teachers: a run directory trained briefly, and an untrained net's weights file."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("teachers")
    trained = root / "trained"
    train_from_config(load_config(None, BASE + ["model.name=resnet_tiny", "data.split=reduced", "data.train_size=64",
                                                "data.val_size=32", "train.epochs=1", f"out={trained}"]))
    with torch.random.fork_rng():
        torch.manual_seed(4321)
        model = create("resnet_tiny", num_classes=10)
    untrained = root / "untrained.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(untrained))
    return trained, untrained


def test_student_role_search_distills_from_the_frozen_teacher(tmp_path, resnet_teachers):
    trained, untrained = resnet_teachers
    weights = trained / "model.safetensors"
    before = sha256(weights)
    runs = {}
    for name, t in (("a", trained), ("a_again", trained), ("b", untrained)):
        runs[name] = search_from_config(config(tmp_path / name, *STUDENT, f"kd.teacher={t}"), verbose=False)
    s = runs["a"]
    assert s["role"] == "student" and s["exploits"] == 1
    assert len(Schedule.load(tmp_path / "a" / "schedule.json")) == 2
    assert sha256(weights) == before  # the teacher's weights file is never written
    rows = {name: read_rows(tmp_path / name) for name in runs}
    assert len(rows["a"]) == 2 * 2
    for r in rows["a"] + rows["b"]:  # every member-epoch carries a real, positive KD loss
        assert r["train_kd_loss"] != "", r
        assert np.isfinite(float(r["train_kd_loss"])) and float(r["train_kd_loss"]) > 0, r
    # the same teacher and seeds give the same search (so the teacher, shared in memory by the two
    # searches, was neither trained nor had its BatchNorm statistics updated by the first one) ...
    assert (tmp_path / "a_again" / "rewards.csv").read_text() == (tmp_path / "a" / "rewards.csv").read_text()
    # ... and another teacher changes what the members learn from: the same members (seeds,
    # initialisation, data order, policy) before any exploit get other training and KD losses
    first = {name: {r["member"]: r for r in rows[name] if r["epoch"] == "1"} for name in ("a", "b")}
    assert sorted(first["a"]) == sorted(first["b"]) == ["0", "1"]
    for m in ("0", "1"):
        assert first["a"][m]["policy"] == first["b"][m]["policy"]
        assert first["a"][m]["train_loss"] != first["b"][m]["train_loss"]
        assert first["a"][m]["train_kd_loss"] != first["b"][m]["train_kd_loss"]
