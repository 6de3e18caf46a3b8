import time

import numpy as np
import pytest
import torch

from rolekd.data import DeviceLoader, Split, load_dataset, load_jpeg_npz, reduced_split
from rolekd.errors import UserError


def test_sample_is_real_balanced_cifar(cifar_images):
    b = load_dataset("cifar10-sample")
    assert b.train.images.dtype == torch.uint8 and b.train.images.shape[1:] == (3, 32, 32)
    assert torch.bincount(b.train.labels).tolist() == [400] * 10
    assert torch.bincount(b.test.labels).tolist() == [100] * 10
    # decoded pixels equal an independent PIL decode (conftest), NHWC vs NCHW
    assert np.array_equal(b.train.images[:16].permute(0, 2, 3, 1).numpy(), cifar_images[:16])
    # statistics close to CIFAR-10's published channel means (data README: 0.4913, 0.4821, 0.4465)
    assert np.allclose(b.mean, (0.4913, 0.4821, 0.4465), atol=0.01)


def test_reduced_split_matches_pba_permutation():
    n = 500
    train = Split(torch.zeros(n, 3, 2, 2, dtype=torch.uint8), torch.arange(n))
    tr, va = reduced_split(train, 40, 300, seed=0)
    np.random.seed(0)  # PBA: np.random.seed(0); np.random.shuffle(perm)
    perm = np.arange(n)
    np.random.shuffle(perm)
    assert tr.labels.tolist() == perm[:40].tolist()
    assert va.labels.tolist() == perm[40:340].tolist()
    assert len(set(tr.labels.tolist()) & set(va.labels.tolist())) == 0
    tr2, _ = reduced_split(train, 40, 300, seed=0)
    assert torch.equal(tr.labels, tr2.labels)
    tr3, _ = reduced_split(train, 40, 300, seed=1)
    assert not torch.equal(tr.labels, tr3.labels)
    with pytest.raises(UserError, match="train_size"):
        reduced_split(train, 400, 300)


def test_full_train_size_trains_on_the_reduced_splits_training_images():
    """``data.full_train_size=N`` (split=full): the first N images of PBA's permutation (numpy seed 0), i.e. the
    very images a search with ``train_size=N`` trains on; the test set unchanged."""
    from rolekd.config import load_config
    from rolekd.experiment import build_data, data_splits, Session

    with Session() as session:
        cfg = load_config(None, ["data.full_train_size=300"])
        bundle = build_data(cfg, session)
        train, evals = data_splits(cfg, bundle)
        np.random.seed(0)
        perm = np.arange(len(bundle.train))
        np.random.shuffle(perm)
        assert torch.equal(train.labels, bundle.train.labels[perm[:300]])
        assert torch.equal(train.images, bundle.train.images[perm[:300]])
        search, split = data_splits(load_config(None, ["data.split=reduced", "data.train_size=300",
                                                       "data.val_size=500"]), bundle)
        assert torch.equal(search.images, train.images)
        # a search validates on exactly data.val_size images: the next 500 of the permutation
        assert torch.equal(split["val"].images, bundle.train.images[perm[300:800]])
        assert list(evals) == ["test"] and len(evals["test"]) == len(bundle.test)
        whole, _ = data_splits(load_config(None, []), bundle)
        assert len(whole) == len(bundle.train) == 4000


def test_full_cifar10_reduced_split_sizes(shared_dir, tmp_path, monkeypatch):
    """The full JPEG copy's sizes and PBA's 4,000 / 46,000 split, read from its arrays (no decoding); decoding and
    its cache on a small file cut from it (the first 600 / 100 images: the decoding is the same code for any
    number of images, and decoding all 60,000 took ~18 s of the suite)."""
    full = shared_dir / "data" / "cifar10_jpeg.npz"
    with np.load(full) as d:
        arrays = {k: d[k] for k in d.files}
    n_train, n_test = len(arrays["train_offsets"]) - 1, len(arrays["test_offsets"]) - 1
    assert (n_train, n_test) == (50000, 10000) == (len(arrays["train_labels"]), len(arrays["test_labels"]))
    labels = torch.as_tensor(arrays["train_labels"].astype(np.int64))
    tr, va = reduced_split(Split(torch.zeros(n_train, 1, 1, 1, dtype=torch.uint8), labels), 4000, 46000, 0)
    assert len(tr) == 4000 and len(va) == 46000
    assert torch.bincount(tr.labels, minlength=10).min() > 300  # a permutation of balanced classes
    small = tmp_path / "small.npz"
    cut = {}
    for split, n in (("train", 600), ("test", 100)):
        off = arrays[f"{split}_offsets"][:n + 1]
        cut.update({f"{split}_jpeg": arrays[f"{split}_jpeg"][:off[-1]], f"{split}_offsets": off,
                    f"{split}_labels": arrays[f"{split}_labels"][:n]})
    np.savez(small, **cut, **({"classes": arrays["classes"]} if "classes" in arrays else {}))
    monkeypatch.setenv("ROLEKD_CACHE", str(tmp_path / "cache"))
    t0 = time.perf_counter()
    b = load_jpeg_npz(small)
    first = time.perf_counter() - t0
    assert len(b.train) == 600 and len(b.test) == 100 and b.train.images.shape[1:] == (3, 32, 32)
    assert b.train.labels.tolist() == arrays["train_labels"][:600].tolist()
    assert list((tmp_path / "cache").glob("*.npz")), "decoded arrays are cached"
    t0 = time.perf_counter()
    b2 = load_jpeg_npz(small)
    assert torch.equal(b2.train.images, b.train.images) and torch.equal(b2.test.images, b.test.images)
    assert time.perf_counter() - t0 < first  # the cache skips decoding


def test_bad_data_paths(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_jpeg_npz(tmp_path / "nope.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    with pytest.raises(UserError, match="not a readable"):
        load_jpeg_npz(bad)
    np.savez(tmp_path / "partial.npz", train_jpeg=np.zeros(3, np.uint8))
    with pytest.raises(UserError, match="lacks arrays"):
        load_jpeg_npz(tmp_path / "partial.npz")
    with pytest.raises(UserError, match="data.path"):
        load_dataset("cifar10-jpeg")


def test_offline_torchvision_cifar_is_one_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets.utils as u

    def no_network(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(u, "urlretrieve", no_network, raising=False)
    monkeypatch.setattr(u, "_urlretrieve", no_network, raising=False)
    monkeypatch.setattr(u, "download_url", no_network)
    monkeypatch.setattr(u, "download_and_extract_archive", no_network)
    import torchvision.datasets.cifar as c

    monkeypatch.setattr(c, "download_and_extract_archive", no_network)
    with pytest.raises(UserError, match="CIFAR-100 is not in"):
        load_dataset("cifar100", data_dir=str(tmp_path))


def test_loader_normalises_like_torchvision():
    from torchvision.transforms import functional as TF
    from PIL import Image

    b = load_dataset("cifar10-sample")
    loader = DeviceLoader(b.test, 64, b.mean, b.std, shuffle=False)
    x, y = next(iter(loader))
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32
    for i in (0, 5, 63):
        img = Image.fromarray(b.test.images[i].permute(1, 2, 0).numpy())
        ref = TF.normalize(TF.to_tensor(img), b.mean, b.std)
        assert torch.allclose(x[i], ref, atol=1e-5)
    assert torch.equal(y, b.test.labels[:64])
    assert len(loader) == -(-1000 // 64)
    assert sum(len(yy) for _, yy in loader) == 1000


def test_loader_shuffles_reproducibly_and_calls_batch_augment():
    n = 100
    split = Split(torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).clone(), torch.arange(n))
    calls = []

    def aug(images, gen):
        calls.append(images.shape[0])
        assert images.dtype == torch.uint8
        return 255 - images

    a = DeviceLoader(split, 32, (0, 0, 0), (1 / 255,) * 3, seed=3, augment=aug)
    labels = torch.cat([y for _, y in a])
    assert sorted(labels.tolist()) == list(range(n)) and labels.tolist() != list(range(n))
    assert calls == [32, 32, 32, 4]
    # the image stays paired with its label through shuffle + augment
    xs, ys = zip(*a)
    assert torch.equal(torch.cat(xs)[:, 0, 0, 0], (255 - torch.cat(ys)).float())
    b = DeviceLoader(split, 32, (0, 0, 0), (1 / 255,) * 3, seed=3)
    c = DeviceLoader(split, 32, (0, 0, 0), (1 / 255,) * 3, seed=3)
    first_b = torch.cat([y for _, y in b])
    state = b.state_dict()
    second_b = torch.cat([y for _, y in b])
    torch.cat([y for _, y in c])
    c.load_state_dict(state)
    assert torch.equal(torch.cat([y for _, y in c]), second_b)
    assert not torch.equal(first_b, second_b)


def test_user_dataset_and_model_through_config(tmp_path):
    """A user's own tensors and model plug into the config-driven trainer by name, and it learns from them."""
    from safetensors.torch import load_file
    from torch import nn

    from rolekd.config import load_config
    from rolekd.data import bundle_from_tensors, register_dataset
    from rolekd.models import register_model
    from rolekd.experiment import train_from_config

    g = torch.Generator().manual_seed(0)
    # 96 train / 64 test images, each class half of each split; class 1 is bright (values 156..255),
    # class 0 dark (0..99): the mean colour the model sees separates them by a wide margin
    y = torch.cat([torch.arange(96) % 2, torch.arange(64) % 2])
    y = torch.cat([y[:96][torch.randperm(96, generator=g)], y[96:][torch.randperm(64, generator=g)]])
    x = torch.randint(0, 100, (160, 3, 8, 8), dtype=torch.uint8, generator=g)
    x += (156 * y).to(torch.uint8).view(-1, 1, 1, 1)
    register_dataset("toy-bright", lambda: bundle_from_tensors("toy-bright", x[:96], y[:96], x[96:], y[96:]))

    @register_model("toy_linear")
    class ToyLinear(nn.Module):
        kd_taps = {}
        kd_embedding = "fc"

        def __init__(self, num_classes=2):
            super().__init__()
            self.fc = nn.Linear(3, num_classes)

        def forward(self, images):
            return self.fc(images.mean((2, 3)))

    cfg = load_config(None, ["dataset=toy-bright", "model=toy_linear", "epochs=3", "train.batch_size=16",
                             "train.progress=false", "augment.pad=0", "augment.cutout=0", f"out={tmp_path / 'r'}"])
    res = train_from_config(cfg)
    assert res["dataset"] == "toy-bright" and res["model"] == "toy_linear"
    # The 64 test images are 32 per class, so a model that ignores the images (or learned from labels
    # detached from them) scores 0.5 if constant, and P(>= 58 of 64) = 2**-64 * sum C(64, k), k >= 58,
    # ~ 5e-12 if it guesses independently of them. The classes are linearly separable in its input.
    assert res["test_acc"] >= 0.9, res
    weights = load_file(str(tmp_path / "r" / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in weights.items()} == {"fc.weight": (2, 3), "fc.bias": (2,)}
    b = bundle_from_tensors("t", x[:64], y[:64], x[64:], y[64:])
    assert b.train.images.shape == (64, 3, 8, 8) and torch.equal(b.train.images, x[:64])
