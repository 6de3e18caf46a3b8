"""Cost of one training step: fp32 plain, low-bit plain, low-bit + each KD method (same run).

    python benchmarks/bench_kd.py                                   # CPU, resnet_tiny, batch 64
    python benchmarks/bench_kd.py --device cuda --model resnet18 --batch 128 --bits 4

Each row is the median step time over ``--steps`` steps after warm-up, and its ratio to the fp32
plain step measured in the same process. The steps are the trainer's own (``Objective.train_step``
+ optimizer step), with the teacher frozen as in ``rolekd distill``; MHGD's attention network is
prepared for one pass over a few batches first.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time

import torch

from rolekd.distill import build_kd_objective
from rolekd.models import create
from rolekd.quant import quantize_model
from rolekd.train.objective import CrossEntropy, StepContext


def time_steps(model, objective, x, y, device, amp, steps, warmup=3):
    objective.setup(model, device)
    opt = torch.optim.SGD(list(model.parameters()) + objective.extra_parameters(), lr=0.01, momentum=0.9)
    objective.bind_optimizer(opt)
    objective.on_epoch_start(5, 10)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()

    ctx = StepContext(epoch=5, epochs=10, autocast=autocast)
    model.train()
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        objective.train_step(model, x, y, ctx)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="resnet_tiny")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--methods", nargs="*", default=["soft", "dml", "rkd", "kdsvd", "mhgd", "iikd"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    amp = device.type == "cuda"
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    teacher = create(args.model, num_classes=10).to(device)
    if device.type == "cuda":
        teacher = teacher.to(memory_format=torch.channels_last)
    rows = []

    pristine = copy.deepcopy(teacher)  # objectives freeze `teacher`; students start from an unfrozen copy

    def student():
        return quantize_model(copy.deepcopy(pristine), args.bits, args.bits).to(device)

    base = time_steps(copy.deepcopy(pristine), CrossEntropy(), x, y, device, amp, args.steps)
    rows.append(("fp32 plain", base))
    rows.append((f"{args.bits}-bit plain", time_steps(student(), CrossEntropy(), x, y, device, amp, args.steps)))
    for m in args.methods:
        t = copy.deepcopy(pristine) if m == "dml" else teacher
        obj = build_kd_objective(m, t, prepare_epochs=1) if m in ("mhgd", "iikd") else build_kd_objective(m, t)
        if obj.needs_prepare:
            obj.prepare([torch.randn_like(x) for _ in range(2)], epochs=1)
        rows.append((f"{args.bits}-bit + {m}", time_steps(student(), obj, x, y, device, amp, args.steps)))
        obj.close()
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{args.model}, batch {args.batch}, {name}")
    print("| step | ms | ratio to fp32 plain |\n|---|---:|---:|")
    for label, t in rows:
        print(f"| {label} | {1000 * t:.1f} | {t / base:.2f}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "model": args.model, "batch": args.batch,
                       "rows": [{"step": l, "ms": 1000 * t, "ratio": t / base} for l, t in rows]}, f, indent=2)


if __name__ == "__main__":
    main()
