"""Training throughput: rolekd's device-resident loader vs a torchvision DataLoader + PIL pipeline.

Both feed the same model the same augmentation (pad-4 random crop, horizontal flip, normalise) and
train it with the same optimizer; img/s is measured side by side in one run.

    python benchmarks/bench_loader.py                      # CPU, resnet_tiny
    python benchmarks/bench_loader.py --device cuda --gpu-models resnet18 wrn_40_2 --batches 128 512
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F


def train_steps(model, opt, batches, device, amp, steps, warmup=3):
    it = iter(batches)
    t0 = None
    n = 0
    for i in range(steps + warmup):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(batches)
            x, y = next(it)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            n += y.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def device_loader_rate(model_name, bundle, device, batch, steps, amp=False, channels_last=False, compile_=False):
    from rolekd.augment import BatchAugment
    from rolekd.data import DeviceLoader
    from rolekd.models import create

    torch.manual_seed(0)
    model = create(model_name, num_classes=bundle.num_classes).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if compile_ else model
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    aug = BatchAugment(policy=None, pad=4, flip=True, cutout=0, fill=bundle.fill)
    loader = DeviceLoader(bundle.train, batch, bundle.mean, bundle.std, device, augment=aug, drop_last=True,
                          channels_last=channels_last)
    return train_steps(step_model, opt, loader, device, amp, steps)


def torchvision_rate(model_name, bundle, device, batch, steps, workers):
    import torchvision.transforms as T
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset

    from rolekd.models import create

    class PILSet(Dataset):
        def __init__(self, split, tf):
            self.images = split.images.permute(0, 2, 3, 1).numpy()
            self.labels = split.labels.numpy()
            self.tf = tf

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return self.tf(Image.fromarray(self.images[i])), int(self.labels[i])

    tf = T.Compose([T.RandomCrop(32, padding=4, fill=bundle.fill), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(bundle.mean, bundle.std)])
    dl = DataLoader(PILSet(bundle.train, tf), batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                    persistent_workers=workers > 0, pin_memory=device.type == "cuda")
    torch.manual_seed(0)
    model = create(model_name, num_classes=bundle.num_classes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return train_steps(model, opt, dl, device, False, steps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="resnet_tiny")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers for the torchvision pipeline")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--data-path", default=None, help="cifar10_jpeg.npz (default: the bundled sample)")
    ap.add_argument("--gpu-models", nargs="*", default=[])
    ap.add_argument("--batches", nargs="*", type=int, default=[128, 512])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from rolekd.data import load_dataset

    bundle = load_dataset("cifar10-jpeg", args.data_path) if args.data_path else load_dataset("cifar10-sample")
    device = torch.device(args.device)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "threads": torch.get_num_threads(), "rows": []}
    dev = device_loader_rate(args.model, bundle, device, args.batch, args.steps)
    tv = torchvision_rate(args.model, bundle, device, args.batch, args.steps, args.workers)
    results["rows"].append({"model": args.model, "batch": args.batch, "device_loader_img_s": round(dev, 1),
                            "torchvision_pil_img_s": round(tv, 1), "ratio": round(dev / tv, 2)})
    print(f"| {args.model} | {args.batch} | {dev:.0f} | {tv:.0f} (workers={args.workers}) | {dev / tv:.2f}x |")
    for name in args.gpu_models:
        for b in args.batches:
            for comp in ([False, True] if args.compile else [False]):
                r = device_loader_rate(name, bundle, device, b, args.steps, amp=True, channels_last=True,
                                       compile_=comp)
                results["rows"].append({"model": name, "batch": b, "bf16": True, "channels_last": True,
                                        "compile": comp, "device_loader_img_s": round(r, 1)})
                print(f"| {name} | {b} | bf16+channels_last{' +compile' if comp else ''} | {r:.0f} img/s |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
