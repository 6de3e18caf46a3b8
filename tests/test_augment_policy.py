"""PBA policies per image (apply_policy, fired_slots), base augmentation and BatchAugment."""

from __future__ import annotations

import ast
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from rolekd.augment import (
    CIFAR10_FILL,
    OPS,
    BatchAugment,
    apply_op,
    apply_policy,
    base_augment,
    fired_slots,
    slot_ops,
)
from rolekd.augment.ops import fill_tensor
from rolekd.augment.policy import _apply_drawn, _draw

PBA_CIFAR10_MEAN = (0.49139968, 0.48215841, 0.44653091)
MEAN_FILL = np.asarray([round(255 * m) for m in PBA_CIFAR10_MEAN], dtype=np.uint8)


def policy_with(**slots: tuple[int, int]) -> list[int]:
    """A policy with the given ``Op=(prob, level)`` (suffix ``_2`` for the second half), rest 0."""
    v = [0] * 60
    for key, (prob, level) in slots.items():
        name, half = (key[:-2], 1) if key.endswith("_2") else (key, 0)
        k = half * 15 + OPS.index(name)
        v[2 * k], v[2 * k + 1] = prob, level
    return v


def chi_square(observed: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * observed.sum()
    return float(((observed - expected) ** 2 / expected).sum())


@pytest.fixture(scope="module")
def batch(cifar_images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(cifar_images[:256]).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def realistic_policy() -> list[int]:
    """A late-epoch PBA policy from ../shared/fixtures when present, else a fixed random one."""
    path = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "pba" / "rcifar10_16_wrn.txt"
    if path.is_file():
        return [int(v) for v in ast.literal_eval(path.read_text().strip().splitlines()[-1])[5]]
    rng = random.Random(0)
    return [rng.randint(1, 10) if i % 2 == 0 else rng.randint(0, 9) for i in range(60)]


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("bad, match", [
    ([0] * 59, "60"),
    ([0] * 61, "60"),
    ([11, 0] + [0] * 58, "probability"),
    ([-1, 0] + [0] * 58, "probability"),
    ([5, 10] + [0] * 58, "magnitude"),
    ([0.5, 1] + [0] * 58, "integers"),
])
def test_invalid_policy_raises(bad: list, match: str, batch: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=match):
        apply_policy(batch[:4], bad)
    with pytest.raises(ValueError, match=match):
        fired_slots(bad, 4)
    with pytest.raises(ValueError, match=match):
        BatchAugment(bad)


def test_zero_policy_is_a_no_op(batch: torch.Tensor) -> None:
    zero = [0, 5] * 30
    assert apply_policy(batch, zero) is batch
    assert (fired_slots(zero, 100) == -1).all()


def test_slot_ops_order() -> None:
    v = list(range(11)) * 5 + [0] * 5
    v = [x % 10 if i % 2 else x for i, x in enumerate(v)]
    slots = slot_ops(v)
    assert [name for name, _, _ in slots] == list(OPS) * 2
    assert [(p, lv) for _, p, lv in slots] == [(v[2 * k], v[2 * k + 1]) for k in range(30)]


# --------------------------------------------------------------------------- PBA's rule, statistically


def test_op_count_distribution_with_certain_ops() -> None:
    slots = fired_slots([10, 4] * 30, 20000, torch.Generator().manual_seed(0))
    counts = np.bincount((slots >= 0).sum(1).numpy(), minlength=3)
    assert chi_square(counts, np.array([0.2, 0.3, 0.5])) < 13.8  # df 2, p = 0.001
    assert ((slots[:, 1] >= 0) <= (slots[:, 0] >= 0)).all()  # a second op only after a first
    assert (slots[:, 0] != slots[:, 1])[slots[:, 1] >= 0].all()  # two different slots


def test_walk_order_is_uniform() -> None:
    slots = fired_slots([10, 4] * 30, 30000, torch.Generator().manual_seed(1)).numpy()
    for stage in (0, 1):
        picked = slots[:, stage][slots[:, stage] >= 0]
        assert chi_square(np.bincount(picked, minlength=30), np.full(30, 1 / 30)) < 59.7  # df 29, p = 0.001


def test_op_count_distribution_with_uncertain_ops() -> None:
    # two slots firing with probability .5: count 1 -> 1 op unless both miss; count 2 -> as many as fire
    policy = policy_with(Invert=(5, 0), Solarize_2=(5, 3))
    slots = fired_slots(policy, 20000, torch.Generator().manual_seed(2))
    counts = np.bincount((slots >= 0).sum(1).numpy(), minlength=3)
    p2 = 0.5 * 0.25
    p1 = 0.3 * 0.75 + 0.5 * 0.5
    assert chi_square(counts, np.array([1 - p1 - p2, p1, p2])) < 13.8
    assert set(np.unique(slots.numpy())) == {-1, OPS.index("Invert"), 15 + OPS.index("Solarize")}


def test_single_slot_probability() -> None:
    policy = policy_with(ShearY_2=(3, 9))
    slots = fired_slots(policy, 20000, torch.Generator().manual_seed(3))
    fired = (slots[:, 0] == 15 + OPS.index("ShearY")).float().mean().item()
    assert abs(fired - 0.8 * 0.3) < 0.015
    assert (slots[:, 1] == -1).all()


def test_ops_fire_in_walk_order(batch: torch.Tensor) -> None:
    """Invert and Posterize(1 bit) do not commute: both orders occur, each for ~1/4 of the images."""
    x = batch.repeat(8, 1, 1, 1)
    out = apply_policy(x, policy_with(Invert=(10, 0), Posterize=(10, 9)), torch.Generator().manual_seed(4))
    v, o = x.numpy(), out.numpy()
    inv = 255 - v
    outcomes = {  # checked in this order (earlier ones are never ambiguous with later ones here)
        "invert then posterize": inv & 0x80,
        "posterize then invert": 255 - (v & 0x80),
        "invert": inv,
        "posterize": v & 0x80,
        "none": v,
    }
    matched = np.full(len(v), "", dtype=object)
    for label, expected in outcomes.items():
        same = (o == expected).reshape(len(v), -1).all(axis=1) & (matched == "")
        matched[same] = label
    assert (matched != "").all()
    freq = np.array([(matched == label).mean() for label in outcomes])
    assert np.allclose(freq, [0.25, 0.25, 0.15, 0.15, 0.2], atol=0.04), dict(zip(outcomes, freq))


def test_per_image_independence(batch: torch.Tensor) -> None:
    x = batch[:1].repeat(512, 1, 1, 1)
    policy = policy_with(Rotate=(10, 9), TranslateX_2=(10, 5), Cutout=(10, 5))
    out = apply_policy(x, policy, torch.Generator().manual_seed(5))
    distinct = len({bytes(img.numpy()) for img in out})
    assert distinct > 100  # signs, op choices and cutout centres differ between images


def test_reproducible_with_seed(batch: torch.Tensor, realistic_policy: list[int]) -> None:
    a = apply_policy(batch, realistic_policy, torch.Generator().manual_seed(6))
    b = apply_policy(batch, realistic_policy, torch.Generator().manual_seed(6))
    c = apply_policy(batch, realistic_policy, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_batched_policy_equals_per_image_ops(batch: torch.Tensor, realistic_policy: list[int]) -> None:
    """The grouped application equals applying each image's fired ops one by one with apply_op."""
    x = batch[:96]
    draw = _draw(realistic_policy, x, torch.Generator().manual_seed(8))
    fill = fill_tensor(None, "cpu")
    grouped = _apply_drawn(x, realistic_policy, draw, fill, masked=False)
    masked = _apply_drawn(x, realistic_policy, draw, fill, masked=True)
    slots = slot_ops(realistic_policy)
    expected = []
    for i in range(len(x)):
        img = x[i:i + 1]
        for stage in (0, 1):
            k = int(draw.slots[i, stage])
            if k >= 0:
                name, _, level = slots[k]
                img = apply_op(img, name, level, signs=draw.signs[i:i + 1, stage],
                               centres=draw.centres[i:i + 1, stage])
        expected.append(img)
    assert torch.equal(grouped, torch.cat(expected))
    assert torch.equal(masked, grouped)
    assert (draw.slots[:, 1] >= 0).sum() > 20  # the check covered images with two ops


def test_policy_fill_colour(batch: torch.Tensor) -> None:
    fill = (3, 250, 7)
    out = apply_policy(batch, policy_with(TranslateY=(10, 9)), torch.Generator().manual_seed(9), fill=fill)
    changed = (out != batch).flatten(1).any(1)
    assert 0.6 < changed.float().mean() < 0.95  # ~80% get the op
    o = out[changed].permute(0, 2, 3, 1).numpy()
    top = (o[:, :9] == np.asarray(fill, dtype=np.uint8)).all(axis=(1, 2, 3))
    bottom = (o[:, -9:] == np.asarray(fill, dtype=np.uint8)).all(axis=(1, 2, 3))
    assert (top ^ bottom).all()  # 9 uncovered rows, at the top or the bottom


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_policy_matches_cpu(batch: torch.Tensor, realistic_policy: list[int]) -> None:
    draw = _draw(realistic_policy, batch, torch.Generator().manual_seed(10))
    cpu = _apply_drawn(batch, realistic_policy, draw, fill_tensor(None, "cpu"))
    on_gpu = type(draw)(*(t.cuda() for t in (draw.slots, draw.signs, draw.centres)))
    gpu = _apply_drawn(batch.cuda(), realistic_policy, on_gpu, fill_tensor(None, "cuda"))
    assert torch.equal(cpu, gpu.cpu())
    g = torch.Generator(device="cuda").manual_seed(0)
    out = BatchAugment(realistic_policy)(batch.cuda(), g)
    assert out.is_cuda and out.shape == batch.shape and out.dtype == torch.uint8


# --------------------------------------------------------------------------- base augmentation


def padded(img: np.ndarray, pad: int, fill: np.ndarray) -> np.ndarray:
    out = np.empty((img.shape[0] + 2 * pad, img.shape[1] + 2 * pad, 3), dtype=np.uint8)
    out[:] = fill
    out[pad:pad + img.shape[0], pad:pad + img.shape[1]] = img
    return out


def test_crop_is_a_window_of_the_padded_image(batch: torch.Tensor) -> None:
    out = base_augment(batch, torch.Generator().manual_seed(11), pad=4, flip=True, cutout=0)
    src, dst = batch.permute(0, 2, 3, 1).numpy(), out.permute(0, 2, 3, 1).numpy()
    tops, lefts, flipped = [], [], []
    for img, res in zip(src, dst):
        p = padded(img, 4, MEAN_FILL)
        found = [(t, l, f) for f in (False, True) for t in range(9) for l in range(9)
                 if (res == (p[t:t + 32, l:l + 32][:, ::-1] if f else p[t:t + 32, l:l + 32])).all()]
        assert found, "output is not a (mirrored) 32x32 window of the mean-padded input"
        t, l, f = found[0]
        tops.append(t)
        lefts.append(l)
        if len({fl for _, _, fl in found}) == 1:
            flipped.append(f)
    assert set(tops) == set(lefts) == set(range(8))  # PBA: offsets randint(0, 2 * pad)
    assert 0.4 < np.mean(flipped) < 0.6


def test_flip_only(batch: torch.Tensor) -> None:
    out = base_augment(batch, torch.Generator().manual_seed(12), pad=0, flip=True, cutout=0)
    same = (out == batch).flatten(1).all(1)
    mirrored = (out == batch.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all()
    assert 0.4 < mirrored.float().mean() < 0.6


def test_base_cutout_square(batch: torch.Tensor) -> None:
    fill = (2, 253, 4)
    src = batch.permute(0, 2, 3, 1).numpy()
    assert not (src == np.asarray(fill, dtype=np.uint8)).all(axis=-1).any()
    out = base_augment(batch.repeat(4, 1, 1, 1), torch.Generator().manual_seed(13), pad=0, flip=False,
                       cutout=16, fill=fill).permute(0, 2, 3, 1).numpy()
    lengths = [min(32, c + 8) - max(0, c - 8) for c in range(32)]  # PBA: centre uniform, clipped
    heights, widths = [], []
    for before, after in zip(np.tile(src, (4, 1, 1, 1)), out):
        filled = (after == np.asarray(fill, dtype=np.uint8)).all(axis=-1)
        rows, cols = np.nonzero(filled.any(axis=1))[0], np.nonzero(filled.any(axis=0))[0]
        h, w = rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0]
        assert filled.sum() == h * w and h in lengths and w in lengths
        assert (after[~filled] == before[~filled]).all()
        heights.append(h)
        widths.append(w)
    assert max(heights) == max(widths) == 16
    assert abs(np.mean(heights) - np.mean(lengths)) < 0.6 and abs(np.mean(widths) - np.mean(lengths)) < 0.6


def test_base_off_is_identity(batch: torch.Tensor) -> None:
    out = base_augment(batch, torch.Generator().manual_seed(14), pad=0, flip=False, cutout=0)
    assert torch.equal(out, batch) and out is not batch


@pytest.mark.parametrize("kwargs", [{"pad": -1}, {"cutout": -2}, {"fill": (1, 2)}, {"fill": (0, 0, 256)}])
def test_base_bad_arguments(kwargs: dict, batch: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        base_augment(batch[:2], **kwargs)


def test_batch_augment(batch: torch.Tensor, realistic_policy: list[int]) -> None:
    augment = BatchAugment()
    plain = augment(batch, torch.Generator().manual_seed(15))
    assert torch.equal(plain, base_augment(batch, torch.Generator().manual_seed(15)))
    augment.set_policy(realistic_policy)
    assert augment.policy == realistic_policy
    g1, g2 = torch.Generator().manual_seed(16), torch.Generator().manual_seed(16)
    a = augment(batch, g1)
    expected = base_augment(apply_policy(batch, realistic_policy, g2), g2)
    assert torch.equal(a, expected)
    assert a.dtype == torch.uint8 and a.shape == batch.shape
    augment.set_policy(None)
    assert torch.equal(augment(batch, torch.Generator().manual_seed(15)), plain)
    with pytest.raises(ValueError):
        augment.set_policy([1, 2, 3])
    assert "BatchAugment(" in repr(augment)
    assert tuple(CIFAR10_FILL) == tuple(MEAN_FILL)


@pytest.mark.parametrize("kwargs", [{}, {"pad": 0, "flip": False}, {"pad": 0, "flip": False, "cutout": 0},
                                    {"flip": False}])
def test_batch_augment_results_are_independent(batch: torch.Tensor, realistic_policy: list[int],
                                               kwargs: dict) -> None:
    """Scratch buffers are reused between calls, results never are; the input is never modified."""
    augment = BatchAugment(realistic_policy, **kwargs)
    before = batch.clone()
    first = augment(batch, torch.Generator().manual_seed(17))
    kept = first.clone()
    second = augment(batch, torch.Generator().manual_seed(18))
    assert torch.equal(first, kept) and not torch.equal(first, second)
    assert torch.equal(batch, before)
    again = pickle.loads(pickle.dumps(augment))(batch, torch.Generator().manual_seed(17))
    assert torch.equal(again, first)
