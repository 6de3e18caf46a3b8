import json

import pytest
import torch
from torch import nn

from rolekd.config import TrainConfig
from rolekd.data import DeviceLoader, load_dataset
from rolekd.train import Trainer, lr_at
from rolekd.files import load_state


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.2)  # exercises the CPU RNG across resume
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(self.drop(x.mean((2, 3))))


def random_flip(images, gen):  # exercises the loader generator across resume
    flip = torch.rand(images.shape[0], generator=gen, device=images.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)


@pytest.fixture(scope="module")
def bundle():
    b = load_dataset("cifar10-sample")
    b.train = b.train.subset(torch.arange(256))
    b.test = b.test.subset(torch.arange(128))
    return b


def make(bundle, run_dir=None, epochs=3):
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=epochs, batch_size=32, lr=0.05, progress=False)
    tl = DeviceLoader(bundle.train, 32, bundle.mean, bundle.std, augment=random_flip, seed=0)
    el = {"test": DeviceLoader(bundle.test, 64, bundle.mean, bundle.std, shuffle=False)}
    return Trainer(Tiny(), tl, cfg, el, run_dir=run_dir)


def test_lr_schedule_steps_every_30_percent():
    cfg = TrainConfig()
    got = [lr_at(cfg, e, 200) for e in (0, 59, 60, 119, 120, 180, 199)]
    want = [0.1, 0.1, 0.01, 0.01, 0.001, 1e-4, 1e-4]
    assert got == pytest.approx(want)


def test_resume_equals_uninterrupted(bundle, tmp_path):
    full = make(bundle, tmp_path / "a")
    full.fit()

    class Kill(Exception):
        pass

    def kill_after_two(trainer, row):
        if trainer.epoch == 2:
            raise Kill

    part = make(bundle, tmp_path / "b")
    with pytest.raises(Kill):
        part.fit(on_epoch_end=kill_after_two)
    # a fresh process-like restart: new trainer, new model, same run dir
    torch.manual_seed(123)  # whatever the global RNG is now, resume restores it
    resumed = make(bundle, tmp_path / "b")
    resumed.fit()
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    rows_a = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows_b] == [0, 1, 2]
    assert [r["test_acc"] for r in rows_a] == [r["test_acc"] for r in rows_b]
    assert (tmp_path / "b" / "metrics.csv").read_text().count("\n") == 4
    assert (tmp_path / "b" / "checkpoint" / "model.safetensors").is_file()
    assert load_state(tmp_path / "b" / "checkpoint" / "state.pt")["epoch"] == 3


def test_training_learns_and_evaluate_matches_manual(bundle):
    t = make(bundle, epochs=4)
    hist = t.fit()
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    # evaluate() against a plain loop
    t.model.eval()
    with torch.no_grad():
        x = (bundle.test.images.float() / 255 - torch.tensor(bundle.mean).view(1, 3, 1, 1)) / \
            torch.tensor(bundle.std).view(1, 3, 1, 1)
        acc = (t.model(x).argmax(1) == bundle.test.labels).float().mean().item()
    assert t.evaluate(t.eval_loaders["test"])["acc"] == pytest.approx(acc, abs=1e-6)


def test_policy_hook_sets_policy_each_epoch(bundle):
    seen = []

    class Aug:
        def __init__(self):
            self.policy = None

        def set_policy(self, p):
            self.policy = p
            seen.append(p)

        def __call__(self, images, gen):
            return images

    t = make(bundle, epochs=3)
    t.train_loader.augment = Aug()
    t.policy_for_epoch = lambda e: [e] * 60
    t.fit()
    assert [p[0] for p in seen] == [0, 1, 2]


def test_unsafe_state_file_is_refused(tmp_path):
    import pickle

    from rolekd.errors import UserError

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    p = tmp_path / "state.pt"
    p.write_bytes(pickle.dumps({"epoch": Evil()}))
    with pytest.raises(UserError, match="cannot be read safely"):
        load_state(p)


def test_compile_without_a_cpp_compiler_is_one_line_and_trains_eagerly(bundle, monkeypatch, capsys):
    """``train.compile`` on a CPU without a C++ compiler (Inductor needs one): one line on stderr, and the run
    trains eagerly to exactly the losses of a run without ``compile``."""
    import torch._inductor.config as inductor_config
    from torch._inductor import cpp_builder

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("rolekd-no-such-c++",))
    cpp_builder.cpp_compiler_search.cache_clear()
    try:
        torch.manual_seed(0)
        cfg = TrainConfig(epochs=1, batch_size=32, lr=0.05, progress=False, compile=True)
        tl = DeviceLoader(bundle.train, 32, bundle.mean, bundle.std, augment=random_flip, seed=0)
        t = Trainer(Tiny(), tl, cfg, {})
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no C++ compiler" in err[0] and "eagerly" in err[0]
        assert t.step_model is t.model
        compiled = t.fit()
    finally:
        cpp_builder.cpp_compiler_search.cache_clear()
    eager = make(bundle, epochs=1)
    eager.eval_loaders = {}
    assert compiled[0]["train_loss"] == eager.fit()[0]["train_loss"]


def test_channels_last_trains_as_the_default_layout_within_rounding():
    """``train.channels_last=on`` on CPU (what ``auto`` picks for one-thread runs): the model and the batches are
    channels-last, and two epochs' losses and accuracies equal the default layout's within float rounding
    (the fused-vs-local tolerance, 1e-4 relative, with a small learning rate as there so that rounding
    differences are not amplified); only the summation order differs."""
    from rolekd.config import load_config
    from rolekd.experiment import Session, build_trainer

    rows = {}
    with Session() as session:
        for cl in ("on", "off"):
            cfg = load_config(None, ["model=resnet_tiny", "data.max_train=512", "data.max_test=256", "epochs=2",
                                     "train.batch_size=64", "train.lr=0.001", "train.progress=false",
                                     "train.device=cpu", "augment.cutout=0", f"train.channels_last={cl}"])
            t = build_trainer(cfg, session)
            conv = t.model.layer1[0].conv1.weight
            x, _ = next(iter(t.train_loader))
            assert conv.is_contiguous(memory_format=torch.channels_last) == (cl == "on")
            assert x.is_contiguous(memory_format=torch.channels_last) == (cl == "on")
            rows[cl] = t.run_epochs(2)
    for a, b in zip(rows["on"], rows["off"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["test_acc"] == pytest.approx(b["test_acc"], abs=1 / 256 + 1e-9)
