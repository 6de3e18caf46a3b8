import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "rolekd" / "data" / "cifar10_sample.npz"
SHARED = Path(__file__).resolve().parents[2] / "shared"


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject.toml): one test process per CPU this process may use (its affinity: a suite pinned
    with taskset runs in one), at most 4 (each may start its own Ray)."""
    from rolekd.config import available_cpus

    return max(1, min(4, available_cpus()))


# Two threads per test process; one each when pytest-xdist runs the suite in several processes (the README's
# command runs one per CPU: -n auto in pyproject.toml), so that they do not oversubscribe the cores.
SUITE_THREADS = 2 if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) <= 1 else 1
torch.set_num_threads(SUITE_THREADS)


def _decode(n: int) -> np.ndarray:
    from PIL import Image

    d = np.load(SAMPLE)
    jpeg, off = d["train_jpeg"], d["train_offsets"]
    return np.stack([np.asarray(Image.open(io.BytesIO(jpeg[off[i]:off[i + 1]].tobytes())).convert("RGB"))
                     for i in range(n)])


def register_noise_dataset(name: str, n_train: int, n_test: int, seed: int) -> str:
    """Register ``name``: random uint8 32x32 images with labels 0..9 in turn (no signal to learn), the first
    ``n_train`` for training; returns the name."""
    from rolekd.data import bundle_from_tensors, register_dataset

    def bundle():
        n = n_train + n_test
        images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
        labels = torch.arange(n) % 10
        return bundle_from_tensors(name, images[:n_train], labels[:n_train], images[n_train:], labels[n_train:])

    register_dataset(name, bundle)
    return name


@pytest.fixture(scope="session")
def cifar_images() -> np.ndarray:
    """512 real CIFAR-10 training images from the bundled sample, uint8 (N, 32, 32, 3)."""
    return _decode(512)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the checkout (fixtures, full CIFAR-10 JPEG copy); skips when absent."""
    if not SHARED.is_dir():
        pytest.skip("../shared is not beside this checkout")
    return SHARED


@pytest.fixture(scope="module")
def one_thread():
    """A module's tests run torch with one thread: the same numerics in this process and in Ray workers
    (which run one thread each). ``pytestmark = pytest.mark.usefixtures("one_thread")`` in the module."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def _ray_session():
    """Shuts down, at the end of the session, the Ray that ``local_ray`` started (or left)."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def local_ray(_ray_session):
    """One local Ray instance (2 CPUs, no dashboard) shared by every test that needs Ray (its start and its
    workers' imports cost seconds each time), started again only after a test that needed another Ray (the
    multi-node cluster's); skips where Ray is not installed. rolekd finds it initialised and neither starts nor
    stops it."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        # a new instance of this process's own, never another process's (a cluster a test started elsewhere)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
