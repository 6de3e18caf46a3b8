"""Datasets as uint8 tensors: CIFAR-10/100 (torchvision), a CIFAR-10 JPEG .npz copy, the bundled sample.

Every loader returns a :class:`DataBundle` whose splits hold ``images`` (uint8, N x 3 x H x W, CPU) and
``labels`` (int64). The training device loader (:mod:`rolekd.data.loader`) moves them to the device.
"""

from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import UserError
from ..files import atomic_write
from ..registry import Registry

SAMPLE_PATH = Path(__file__).with_name("cifar10_sample.npz")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, 3, H, W)
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: np.ndarray | torch.Tensor) -> "Split":
        index = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return Split(self.images[index], self.labels[index])


@dataclass
class DataBundle:
    name: str
    train: Split
    test: Split
    num_classes: int
    classes: tuple[str, ...]
    mean: tuple[float, float, float]  # per-channel, in [0, 1], over the full training set
    std: tuple[float, float, float]

    @property
    def fill(self) -> tuple[int, int, int]:
        """The mean colour as uint8 RGB: what PBA fills uncovered pixels with."""
        return tuple(int(round(255 * m)) for m in self.mean)  # type: ignore[return-value]


def _stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.double() / 255.0
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3), unbiased=False)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def check_arrays(name: str, train_x: np.ndarray, train_y, test_x: np.ndarray, test_y, num_classes: int) -> None:
    """One-line UserErrors for data that would train on the wrong thing or crash later: images must be
    uint8 (N, H, W, C) with C = 1 or 3 and the same H, W, C in both splits; each split needs exactly
    one integer label per image, every label in 0..num_classes-1; neither split may be empty."""
    if num_classes < 1:
        raise UserError(f"dataset {name}: it names no classes")
    shapes = []
    for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        x = np.asarray(x) if not isinstance(x, np.ndarray) else x
        y = np.asarray(y)
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise UserError(f"dataset {name}: {split} images must be uint8 (N, H, W, 3) arrays, got {x.dtype} "
                            f"{tuple(x.shape)}")
        if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.size == 0):
            raise UserError(f"dataset {name}: {split} labels must be a 1-D array of integers, got {y.dtype} "
                            f"{tuple(y.shape)}")
        if len(y) != len(x):
            raise UserError(f"dataset {name}: {split} has {len(x)} images but {len(y)} labels; they must be "
                            f"equal (one label per image)")
        if len(x) == 0:
            raise UserError(f"dataset {name}: its {split} split is empty")
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            raise UserError(f"dataset {name}: {split} labels range over {lo}..{hi} but the dataset has "
                            f"{num_classes} classes (labels 0..{num_classes - 1})")
        shapes.append(tuple(x.shape[1:]))
    if shapes[0] != shapes[1]:
        raise UserError(f"dataset {name}: train images are {shapes[0]} (H, W, C) but test images {shapes[1]}; "
                        f"they must match")


def _bundle(name, train_x: np.ndarray, train_y, test_x: np.ndarray, test_y, classes) -> DataBundle:
    """NHWC uint8 arrays -> DataBundle (NCHW tensors, dataset statistics from the training set); the
    arrays are checked first (:func:`check_arrays`)."""
    check_arrays(name, train_x, train_y, test_x, test_y, len(classes))
    tx = torch.from_numpy(np.ascontiguousarray(train_x.transpose(0, 3, 1, 2)))
    vx = torch.from_numpy(np.ascontiguousarray(test_x.transpose(0, 3, 1, 2)))
    mean, std = _stats(tx)
    return DataBundle(
        name=name,
        train=Split(tx, torch.as_tensor(np.asarray(train_y), dtype=torch.long)),
        test=Split(vx, torch.as_tensor(np.asarray(test_y), dtype=torch.long)),
        num_classes=len(classes), classes=tuple(str(c) for c in classes), mean=mean, std=std)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------- JPEG .npz
def _decode_one(blob: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))


def decode_jpegs(jpeg: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Concatenated JPEG files + offsets -> uint8 (N, H, W, 3). Decoded on a few threads."""
    blobs = [jpeg[offsets[i]:offsets[i + 1]].tobytes() for i in range(len(offsets) - 1)]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return np.stack(list(pool.map(_decode_one, blobs, chunksize=512)))


def _cache_dir() -> Path:
    return Path(os.environ.get("ROLEKD_CACHE", Path.home() / ".cache" / "rolekd"))


def load_jpeg_npz(path: str | Path, name: str = "cifar10-jpeg", cache: bool = True) -> DataBundle:
    """Read a CIFAR-style JPEG .npz (``{train,test}_jpeg``, ``_offsets``, ``_labels``, ``classes``).

    The decoded arrays are cached (keyed by the file's path, size and mtime) under ``$ROLEKD_CACHE``
    (default ``~/.cache/rolekd``), so the second load skips decoding.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"data file {p} not found: pass data.path=/path/to/cifar10_jpeg.npz "
                        "(or use data.name=cifar10-sample, the bundled sample)")
    st = p.stat()
    key = hashlib.sha1(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = _cache_dir() / f"{p.stem}-{key}.npz"
    if cache and cached.is_file():
        try:
            with np.load(cached) as d:
                return _bundle(name, d["train_x"], d["train_y"], d["test_x"], d["test_y"], list(d["classes"]))
        except Exception:  # a broken cache file is rebuilt below
            pass
    try:
        with np.load(p, allow_pickle=False) as d:
            arrays = {k: d[k] for k in d.files}
    except Exception as e:
        raise UserError(f"data file {p} is not a readable .npz ({type(e).__name__}: {e}); "
                        "see the data README for the expected format") from None
    need = ["train_jpeg", "train_offsets", "train_labels", "test_jpeg", "test_offsets", "test_labels"]
    missing = [k for k in need if k not in arrays]
    if missing:
        raise UserError(f"data file {p} lacks arrays {missing}: expected JPEG bytes, offsets and labels "
                        "per split (see the data README)")
    try:
        train_x = decode_jpegs(arrays["train_jpeg"], arrays["train_offsets"])
        test_x = decode_jpegs(arrays["test_jpeg"], arrays["test_offsets"])
    except Exception as e:
        raise UserError(f"data file {p}: could not decode its JPEG images ({type(e).__name__}: {e})") from None
    classes = list(arrays.get("classes", CIFAR10_CLASSES))
    if cache:
        try:
            atomic_write(cached, lambda tmp: np.savez(tmp, train_x=train_x, train_y=arrays["train_labels"],
                                                      test_x=test_x, test_y=arrays["test_labels"],
                                                      classes=np.array(classes)))
        except OSError:
            pass  # caching is an optimisation only
    return _bundle(name, train_x, arrays["train_labels"], test_x, arrays["test_labels"], classes)


# ------------------------------------------------------------------------------------- torchvision
def load_torchvision_cifar(name: str, data_dir: str | None = None, download: bool = True) -> DataBundle:
    import torchvision

    root = Path(data_dir).expanduser() if data_dir else _cache_dir() / "data"
    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
    pretty = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}[name]
    sets = []
    for train in (True, False):
        try:
            try:
                sets.append(cls(root=str(root), train=train, download=False))
            except RuntimeError:
                if not download:
                    raise
                sets.append(cls(root=str(root), train=train, download=True))
        except Exception as e:  # offline, partial download, bad archive
            raise UserError(
                f"{pretty} is not in {root} and could not be downloaded ({type(e).__name__}: {str(e)[:120]}); "
                f"put the official python-version archive's folder there or pass data.data_dir=DIR, "
                f"or use data.name=cifar10-jpeg data.path=FILE.npz or the bundled data.name=cifar10-sample") from None
    tr, te = sets
    return _bundle(name, np.asarray(tr.data), tr.targets, np.asarray(te.data), te.targets, tr.classes)


DATASETS: Registry[Callable[..., DataBundle]] = Registry(
    "dataset", replace=True, hint="(or register yours with rolekd.data.register_dataset)")
DATASETS.add("cifar10-sample", lambda path=None, data_dir=None, download=True:
             load_jpeg_npz(path or SAMPLE_PATH, name="cifar10-sample", cache=False))
DATASETS.add("cifar10-jpeg", lambda path=None, data_dir=None, download=True: _jpeg_copy(path))
DATASETS.add("cifar10", lambda path=None, data_dir=None, download=True:
             load_torchvision_cifar("cifar10", data_dir, download))
DATASETS.add("cifar100", lambda path=None, data_dir=None, download=True:
             load_torchvision_cifar("cifar100", data_dir, download))


def _jpeg_copy(path: str | None) -> DataBundle:
    if not path:
        raise UserError("data.name=cifar10-jpeg needs data.path=/path/to/cifar10_jpeg.npz")
    return load_jpeg_npz(path, name="cifar10-jpeg")


def register_dataset(name: str, factory: Callable[[], DataBundle]) -> None:
    """Make ``data.name=<name>`` load ``factory()`` (e.g. :func:`bundle_from_dataset` of your data)."""
    DATASETS.add(name, lambda path=None, data_dir=None, download=True: factory())


def bundle_from_tensors(name: str, train_images, train_labels, test_images, test_labels,
                        classes: Sequence[str] | None = None) -> DataBundle:
    """A DataBundle from uint8 images, (N, H, W, 3) numpy or (N, 3, H, W) tensors, and integer labels."""
    def nhwc(x):
        x = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if x.dtype != np.uint8 or x.ndim != 4:
            raise UserError(f"dataset {name}: images must be uint8 arrays of 4 dimensions, got {x.dtype} {x.shape}")
        return x.transpose(0, 2, 3, 1) if x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3) else x

    ty = np.asarray(train_labels)
    if ty.size and not np.issubdtype(ty.dtype, np.integer):
        raise UserError(f"dataset {name}: labels must be integers, got {ty.dtype}")
    classes = list(classes) if classes is not None else [str(i) for i in range(int(ty.max()) + 1 if ty.size else 0)]
    return _bundle(name, nhwc(train_images), ty, nhwc(test_images), np.asarray(test_labels), classes)


def bundle_from_dataset(name: str, train, test, classes: Sequence[str] | None = None) -> DataBundle:
    """A DataBundle from two ``torch.utils.data.Dataset`` of (PIL image or uint8 HWC array, label)."""
    def arrays(ds):
        xs, ys = zip(*[(np.asarray(img.convert("RGB") if hasattr(img, "convert") else img), int(y)) for img, y in ds])
        return np.stack(xs), np.asarray(ys)

    (tx, ty), (vx, vy) = arrays(train), arrays(test)
    return bundle_from_tensors(name, tx, ty, vx, vy, classes or getattr(train, "classes", None))


def load_dataset(name: str, path: str | None = None, data_dir: str | None = None,
                 download: bool = True) -> DataBundle:
    """The one entry point: ``cifar10-sample`` | ``cifar10-jpeg`` | ``cifar10`` | ``cifar100`` | a
    name given to :func:`register_dataset`."""
    return DATASETS.get(name)(path=path, data_dir=data_dir, download=download)


def dataset_names() -> list[str]:
    return DATASETS.names()


def reduced_split(train: Split, train_size: int = 4000, val_size: int = 46000,
                  seed: int = 0) -> tuple[Split, Split]:
    """PBA's search split: permute the training set with numpy seed ``seed`` (PBA: 0); the first
    ``train_size`` images train, the next ``val_size`` validate. The test set is untouched."""
    n = len(train)
    if train_size + val_size > n:
        raise UserError(f"reduced split of {train_size} train + {val_size} validation images needs "
                        f"{train_size + val_size}, but the training set has {n}: lower data.train_size/"
                        f"data.val_size")
    perm = np.arange(n)
    np.random.RandomState(seed).shuffle(perm)
    return train.subset(perm[:train_size]), train.subset(perm[train_size:train_size + val_size])
