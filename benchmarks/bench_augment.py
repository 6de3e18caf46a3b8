"""Throughput of the batched PBA augmentation (policy + base) against a per-image PIL pipeline.

Usage::

    PYTHONPATH=src python benchmarks/bench_augment.py                  # CPU, 1 thread, ~30 s
    PYTHONPATH=src python benchmarks/bench_augment.py --device cuda --batch 4096 --train-step
    PYTHONPATH=src python benchmarks/bench_augment.py --out bench_augment.json

Both sides do the same work on real CIFAR-10 images (the bundled sample) with the same policy: PBA's
rule per image (0/1/2 ops from a shuffled walk over the 30 slots), the fired ops, then pad 4 + random
crop, horizontal flip, 16x16 cutout, all with the CIFAR-10 mean colour as fill. The PIL side is
PBA-style (one image at a time: Pillow ops, then numpy pad/crop/flip/cutout) and always runs on one
CPU core; the torch side runs ``rolekd.augment.BatchAugment`` on whole batches, on CPU with
``torch.set_num_threads(--threads)`` (default 1, for a per-core comparison) or on the GPU.

The policy is the last ``new_policy`` of ``shared/fixtures/pba/rcifar10_16_wrn.txt`` (a late-epoch
PBA schedule) when that file exists, else a fixed random policy. Rates are medians over repeats.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from rolekd.augment import CIFAR10_FILL, BatchAugment, policy_tuples

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "src" / "rolekd" / "data" / "cifar10_sample.npz"
SCHEDULE = ROOT.parent / "shared" / "fixtures" / "pba" / "rcifar10_16_wrn.txt"


def load_images(n: int) -> np.ndarray:
    """``n`` CIFAR-10 training images (uint8 N x 32 x 32 x 3) from the bundled JPEG sample, cycled."""
    data = np.load(SAMPLE)
    jpeg, offsets = data["train_jpeg"], data["train_offsets"]
    count = len(offsets) - 1
    decoded = [np.asarray(Image.open(io.BytesIO(jpeg[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB"))
               for i in range(min(n, count))]
    return np.stack([decoded[i % len(decoded)] for i in range(n)])


def load_policy(path: Path = SCHEDULE) -> tuple[list[int], str]:
    """The last line's ``new_policy`` of a PBA schedule file, or a fixed random policy."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if lines:
            return [int(v) for v in ast.literal_eval(lines[-1])[5]], f"{path.name} (last new_policy)"
    rng = random.Random(0)
    return [rng.randint(0, 10) if i % 2 == 0 else rng.randint(0, 9) for i in range(60)], "random (seed 0)"


# --------------------------------------------------------------------------- PIL reference


def _pil_op(img: Image.Image, name: str, level: int) -> Image.Image:
    """One PBA op on an RGB PIL image (PBA's parameters, random sign, mean-colour fill)."""
    if name == "Rotate":
        degrees = int(level * 30 / 10)
        return img.rotate(-degrees if random.random() > 0.5 else degrees, fillcolor=CIFAR10_FILL)
    if name in ("TranslateX", "TranslateY", "ShearX", "ShearY"):
        v: float = int(level * 10 / 10) if name.startswith("Translate") else float(level) * 0.3 / 10
        if random.random() > 0.5:
            v = -v
        data = {"TranslateX": (1, 0, v, 0, 1, 0), "TranslateY": (1, 0, 0, 0, 1, v),
                "ShearX": (1, v, 0, 0, 1, 0), "ShearY": (1, 0, 0, v, 1, 0)}[name]
        return img.transform(img.size, Image.AFFINE, data, resample=Image.NEAREST, fillcolor=CIFAR10_FILL)
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Invert":
        return ImageOps.invert(img)
    if name == "Posterize":
        return ImageOps.posterize(img, 4 - int(level * 4 / 10))
    if name == "Solarize":
        return ImageOps.solarize(img, 256 - int(level * 256 / 10))
    if name == "Cutout":
        size = int(level * 20 / 10)
        if size <= 0:
            return img
        arr = np.array(img)
        cy, cx = np.random.randint(0, 32), np.random.randint(0, 32)
        arr[max(0, cy - size // 2):min(32, cy + size // 2), max(0, cx - size // 2):min(32, cx + size // 2)] = CIFAR10_FILL
        return Image.fromarray(arr)
    enhancer = getattr(ImageEnhance, name)
    return enhancer(img).enhance(float(level) * 1.8 / 10 + 0.1)


def pil_pipeline(images: np.ndarray, tuples: list[tuple[str, float, int]]) -> np.ndarray:
    """PBA's per-image loop: policy with PIL, then pad/crop, flip and cutout in numpy."""
    out = np.empty_like(images)
    fill = np.asarray(CIFAR10_FILL, dtype=np.uint8)
    for i, img in enumerate(images):
        count = np.random.choice([0, 1, 2], p=[0.2, 0.3, 0.5])
        if count:
            pil = Image.fromarray(img)
            walk = list(tuples)
            random.shuffle(walk)
            for name, probability, level in walk:
                if random.random() < probability:
                    pil = _pil_op(pil, name, level)
                    count -= 1
                    if count == 0:
                        break
            img = np.asarray(pil)
        padded = np.empty((40, 40, 3), dtype=np.uint8)
        padded[:] = fill
        padded[4:36, 4:36] = img
        top, left = np.random.randint(0, 8), np.random.randint(0, 8)
        img = padded[top:top + 32, left:left + 32]
        if np.random.rand() > 0.5:
            img = img[:, ::-1]
        img = img.copy()
        cy, cx = np.random.randint(0, 32), np.random.randint(0, 32)
        img[max(0, cy - 8):cy + 8, max(0, cx - 8):cx + 8] = fill
        out[i] = img
    return out


# --------------------------------------------------------------------------- timing


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _median_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None] | None = None) -> float:
    """Median seconds per call: CPU time of this process on CPU (``sync`` None), else wall time.

    Both CPU sides run single-threaded, so process CPU time is their cost per core, and it is not
    inflated when other jobs share the machine; GPU timings use wall time between synchronisations.
    """
    clock = time.process_time if sync is None else time.perf_counter
    times = []
    for _ in range(repeats):
        if sync is not None:
            sync()
        start = clock()
        fn()
        if sync is not None:
            sync()
        times.append(clock() - start)
    return statistics.median(times)


def bench_pil(images: np.ndarray, tuples: list[tuple[str, float, int]], repeats: int) -> float:
    random.seed(0)
    np.random.seed(0)
    pil_pipeline(images[:64], tuples)  # warm up
    return len(images) / _median_seconds(lambda: pil_pipeline(images, tuples), repeats)


def bench_torch(images: np.ndarray, policy: list[int], device: torch.device, batch: int, repeats: int) -> float:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    reps = -(-batch // len(x))
    x = x.repeat(reps, 1, 1, 1)[:batch].contiguous().to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    augment = BatchAugment(policy)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    if device.type == "cpu" and torch.get_num_threads() > 1:
        sync = lambda: None  # noqa: E731 - several threads: wall time
    for _ in range(3):  # warm up (index tables, allocator)
        augment(x, generator)
    return batch / _median_seconds(lambda: augment(x, generator), repeats, sync)


def bench_train_step(device: torch.device, batch: int = 512, repeats: int = 10) -> float | None:
    """Seconds per SGD step of ``rolekd.models.create("resnet18", num_classes=10)``; None if absent."""
    try:
        from rolekd.models import create  # type: ignore[attr-defined]
        model = create("resnet18", num_classes=10).to(device)
    except Exception as exc:  # the models package is optional here; report, do not fail
        print(f"train step: rolekd.models.create('resnet18') unavailable ({type(exc).__name__}: {exc})")
        return None
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        step()
    return _median_seconds(step, repeats, sync)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="torch device for the batched side (cpu, cuda)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 1024 on CPU, 4096 on GPU)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: per core)")
    parser.add_argument("--pil-images", type=int, default=1500, help="images per PIL repeat")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5 PIL / 25 torch)")
    parser.add_argument("--policy-file", type=Path, default=SCHEDULE, help="PBA schedule; its last new_policy is used")
    parser.add_argument("--train-step", action="store_true", help="also time a ResNet18 step at batch 512")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON to this file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    batch = args.batch or (4096 if device.type == "cuda" else 1024)
    policy, policy_source = load_policy(args.policy_file)
    tuples = policy_tuples(policy)
    images = load_images(max(args.pil_images, min(batch, 4000)))

    torch_rate = bench_torch(images, policy, device, batch, args.repeats or 25)
    pil_rate = bench_pil(images[:args.pil_images], tuples, args.repeats or 5)
    result: dict = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": args.threads,
        "batch": batch,
        "policy": policy,
        "policy_source": policy_source,
        "torch_img_per_s": torch_rate,
        "pil_img_per_s_one_core": pil_rate,
        "ratio": torch_rate / pil_rate,
    }
    print(f"policy: {policy_source}")
    print("| device | threads | batch | batched torch img/s | PIL img/s (1 core) | ratio |")
    print("|---|---|---|---|---|---|")
    print(f"| {device} | {args.threads if device.type == 'cpu' else '-'} | {batch} | {torch_rate:,.0f} "
          f"| {pil_rate:,.0f} | {torch_rate / pil_rate:.1f}x |")
    if args.train_step and device.type != "cuda":
        print("train step: only timed with --device cuda (a ResNet18 step at batch 512 takes minutes on one core)")
    elif args.train_step:
        step = bench_train_step(device)
        result["train_step_s_resnet18_b512"] = step
        if step is None:
            print("train step: skipped (rolekd.models.create is not available)")
        else:
            aug_s = 512 / (torch_rate if batch == 512 else bench_torch(images, policy, device, 512, args.repeats or 25))
            result["augment_s_b512"] = aug_s
            print(f"ResNet18 train step, batch 512: {step * 1e3:.1f} ms; augmenting a batch of 512 "
                  f"(measured): {aug_s * 1e3:.2f} ms ({100 * aug_s / step:.1f}% of a step)")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
