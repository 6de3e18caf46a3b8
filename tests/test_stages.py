"""What a training stage does, seen from outside: which epochs a schedule file augments, and that a
low-bit student starts from its teacher's weights. Everything runs through ``rolekd.cli.main``; the
model and the dataset are registered here, so the test sees every training batch the trainer feeds.
"""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import register_noise_dataset
from rolekd.augment.schedule import Schedule
from rolekd.augment.space import OPS, POLICY_LEN
from rolekd.cli import main
from rolekd.data import bundle_from_tensors, register_dataset
from rolekd.models import create, register_model

# ---------------------------------------------------------------------------------- fixtures

DATASET = "stages-const-colours"
MODEL = "stages_batch_recorder"
N_TRAIN, N_TEST, BATCH = 128, 32, 32
BATCHES_PER_EPOCH = -(-N_TRAIN // BATCH)
DARK_MAX = 60  # every training image is one constant colour with channels in [10, 60]; inverted: >= 195


def _constant_colour_bundle():
    rng = np.random.RandomState(7)
    n = N_TRAIN + N_TEST
    colours = rng.randint(10, DARK_MAX + 1, size=(n, 1, 1, 3)).astype(np.uint8)
    images = np.ascontiguousarray(np.broadcast_to(colours, (n, 32, 32, 3)))
    labels = np.arange(n) % 2
    return bundle_from_tensors(DATASET, images[:N_TRAIN], labels[:N_TRAIN], images[N_TRAIN:], labels[N_TRAIN:])


BUNDLE = _constant_colour_bundle()
register_dataset(DATASET, lambda: BUNDLE)

# per training-mode forward: (per-image, per-channel min, max) of the input batch in uint8 units
RECORDS: list[tuple[torch.Tensor, torch.Tensor]] = []


class _BatchRecorder(nn.Module):
    """Records the pixel range of every training-mode input batch (eval forwards are not recorded)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.fc = nn.Linear(3, num_classes)
        self.register_buffer("mean", torch.tensor(BUNDLE.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(BUNDLE.std).view(1, 3, 1, 1))

    def forward(self, x):
        if self.training:
            u = ((x.detach().float() * self.std + self.mean) * 255).round()  # undo the loader's normalisation
            RECORDS.append((u.amin(dim=(2, 3)), u.amax(dim=(2, 3))))
        return self.fc(x.mean(dim=(2, 3)))


register_model(MODEL)(_BatchRecorder)

INVERT = OPS.index("Invert")


def invert_policy(on: bool) -> list[int]:
    """All probabilities zero, or Invert at probability 10/10 in the first half only (inverting twice
    would undo it): then PBA's rule applies it to every image that draws at least one op (80%)."""
    p = [0] * POLICY_LEN
    if on:
        p[2 * INVERT] = 10
    return p


def run_with_schedule(tmp_path, name: str, schedule_epochs: int, op_epoch: int, train_epochs: int,
                      fit: bool) -> list[list[int]]:
    """Train the recorder with a schedule whose only non-zero epoch is ``op_epoch``; return, per training
    epoch, the number of inverted images in each of its batches."""
    sched = tmp_path / f"{name}.json"
    Schedule([invert_policy(e == op_epoch) for e in range(schedule_epochs)]).save(sched)
    RECORDS.clear()
    rc = main(["train", f"dataset={DATASET}", f"model={MODEL}", f"epochs={train_epochs}", f"batch_size={BATCH}",
               "augment.pad=0", "augment.flip=false", "augment.cutout=0", f"schedule={sched}",
               f"augment.fit_epochs={'true' if fit else 'false'}", "train.progress=false",
               "train.device=cpu", f"out={tmp_path / name}"])
    assert rc == 0
    assert len(RECORDS) == train_epochs * BATCHES_PER_EPOCH  # one training forward per batch
    per_epoch = []
    for e in range(train_epochs):
        counts = []
        for lo, hi in RECORDS[e * BATCHES_PER_EPOCH:(e + 1) * BATCHES_PER_EPOCH]:
            assert torch.equal(lo, hi), "base augmentation is off: every image must stay one constant colour"
            dark = (hi <= DARK_MAX).all(dim=1)
            inverted = (lo >= 255 - DARK_MAX).all(dim=1)
            assert bool((dark | inverted).all()), "an image is neither its colour nor its inverse"
            counts.append(int(inverted.sum()))
        per_epoch.append(counts)
    return per_epoch


def augmented_epochs(per_epoch: list[list[int]]) -> set[int]:
    """Epochs whose every batch holds inverted images; any other epoch must hold none at all."""
    out = set()
    for e, counts in enumerate(per_epoch):
        if all(c > 0 for c in counts):
            # 80% of the images draw an op: far more than half of each epoch is inverted
            assert sum(counts) > N_TRAIN // 2, (e, counts)
            out.add(e)
        else:
            assert all(c == 0 for c in counts), f"epoch {e} is partly augmented: {counts}"
    return out


# ---------------------------------------------------------------------------------- bug 4: the schedule's epochs

@pytest.mark.parametrize("op_epoch", [0, 2])
def test_schedule_policy_of_epoch_e_augments_exactly_training_epoch_e(tmp_path, op_epoch):
    per_epoch = run_with_schedule(tmp_path, f"e{op_epoch}", 3, op_epoch, 3, fit=False)
    assert augmented_epochs(per_epoch) == {op_epoch}


def test_fit_epochs_with_equal_lengths_maps_epoch_e_to_e(tmp_path):
    # what the pipeline does (augment.fit_epochs=true) with a search as long as the retraining
    assert augmented_epochs(run_with_schedule(tmp_path, "fit_same", 3, 1, 3, fit=True)) == {1}


@pytest.mark.parametrize("op_epoch", [0, 1])
def test_two_epoch_schedule_fitted_to_four_epochs(tmp_path, op_epoch):
    # Schedule.fit_to: training epoch t uses schedule epoch floor(t * 2 / 4)
    expected = {t for t in range(4) if t * 2 // 4 == op_epoch}
    assert expected == ({0, 1} if op_epoch == 0 else {2, 3})
    assert augmented_epochs(run_with_schedule(tmp_path, f"fit{op_epoch}", 2, op_epoch, 4, fit=True)) == expected


def test_schedule_shorter_than_training_without_fit_repeats_its_last_epoch(tmp_path):
    # Schedule.vector_at: epochs past the end use the last policy
    assert augmented_epochs(run_with_schedule(tmp_path, "nofit", 2, 1, 4, fit=False)) == {1, 2, 3}


# ---------------------------------------------------------------------------------- bug 6: teacher initialisation

NOISE = register_noise_dataset("stages-noise", 128, 64, seed=3)
COMMON = ["model=resnet_tiny", f"dataset={NOISE}", "batch_size=64", "train.eval_batch_size=64",
          "augment.cutout=0", "train.progress=false", "train.device=cpu"]


def conv_linear_keys() -> list[str]:
    """State-dict keys of resnet_tiny's conv and linear parameters (the layers DoReFa quantizes keep
    their full-precision latent weights under the same names)."""
    keys = []
    for name, m in create("resnet_tiny", num_classes=10).named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            keys.append(f"{name}.weight")
            if m.bias is not None:
                keys.append(f"{name}.bias")
    return keys


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("stages_teacher")
    assert main(["train", *COMMON, "epochs=2", f"out={d / 'teacher'}"]) == 0
    return d


def distill_tiny_lr(teacher_dir, out, *extra) -> dict[str, torch.Tensor]:
    """A 4-bit student distilled for one epoch at lr 1e-12: its weights are where it started."""
    assert main(["distill", *COMMON, f"teacher={teacher_dir / 'teacher'}", "method=soft", "w_bits=4", "a_bits=4",
                 "epochs=1", "train.optimizer=adam", "train.lr=1e-12", f"out={out}", *extra]) == 0
    return load_file(str(out / "model.safetensors"))


def test_low_bit_student_starts_from_the_teacher_weights(teacher_run):
    teacher = load_file(str(teacher_run / "teacher" / "model.safetensors"))
    keys = conv_linear_keys()
    assert len(keys) > 5 and set(keys) <= set(teacher)
    student = distill_tiny_lr(teacher_run, teacher_run / "student")
    # the quantized student keeps the latent weights under the teacher's names
    assert {k for k in student if k.endswith((".weight", ".bias"))} == \
        {k for k in teacher if k.endswith((".weight", ".bias"))}
    for k in keys:
        torch.testing.assert_close(student[k], teacher[k], rtol=1e-6, atol=1e-6 * float(teacher[k].abs().max()),
                                   msg=lambda m, k=k: f"{k}: {m}")


def test_student_without_init_from_teacher_does_not_start_from_it(teacher_run):
    teacher = load_file(str(teacher_run / "teacher" / "model.safetensors"))
    student = distill_tiny_lr(teacher_run, teacher_run / "student_noinit", "kd.init_from_teacher=false")
    keys = conv_linear_keys()
    diff = sum(float((student[k] - teacher[k]).pow(2).sum()) for k in keys) ** 0.5
    norm = sum(float(teacher[k].pow(2).sum()) for k in keys) ** 0.5
    assert diff > 1e-3 * norm
