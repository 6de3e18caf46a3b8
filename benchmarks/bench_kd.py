"""Cost of one training step: fp32 plain, low-bit plain, low-bit + each KD method (same run).

    python benchmarks/bench_kd.py                                   # CPU, resnet_tiny, batch 64
    python benchmarks/bench_kd.py --model resnet18 --batch 32 --steps 10 --unclipped iikd
    python benchmarks/bench_kd.py --device cuda --model resnet18 --batch 128 --bits 4 --unclipped iikd
    python benchmarks/bench_kd.py --src OLD_CHECKOUT/src ...        # an older commit's rolekd (side by side)

Each row is the median step time over ``--steps`` rounds after warm-up, and its ratio to the fp32
plain step measured in the same process. The rows are interleaved: every round times one step of each
row in turn, so a change of machine load (shared VMs) affects all rows alike. The steps are the trainer's own (``Objective.train_step``
+ optimizer step), with the teacher frozen as in ``rolekd distill``; MHGD's attention network is
prepared for one pass over a few batches first.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time

import torch

if "--src" in sys.argv[:-1]:  # that checkout's rolekd ahead of the installed one (parsed again by argparse below)
    sys.path.insert(0, sys.argv[sys.argv.index("--src") + 1])

from rolekd.config import TrainConfig  # noqa: E402
from rolekd.distill import build_kd_objective  # noqa: E402
from rolekd.models import create  # noqa: E402
from rolekd.quant import quantize_model  # noqa: E402
from rolekd.train import build_optimizer  # noqa: E402
from rolekd.train.objective import CrossEntropy, StepContext  # noqa: E402


class Runner:
    """One row: a model, its objective and optimizer, ready to time single steps."""

    def __init__(self, model, objective, x, y, device, amp):
        self.model, self.objective, self.x, self.y, self.device = model, objective, x, y, device
        objective.setup(model, device)
        self.opt = build_optimizer(list(model.parameters()) + objective.extra_parameters(),  # the trainer's
                                   TrainConfig(lr=0.01, momentum=0.9, nesterov=False, weight_decay=0))
        objective.bind_optimizer(self.opt)
        objective.on_epoch_start(5, 10)

        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()

        self.ctx = StepContext(epoch=5, epochs=10, autocast=autocast)
        model.train()
        self.times = []

    def step(self, record=True):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        self.objective.train_step(self.model, self.x, self.y, self.ctx)
        self.opt.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        if record:
            self.times.append(time.perf_counter() - t0)


def time_rows(runners, steps, warmup=3):
    """Median step time of each runner, timing one step of each in turn per round."""
    for r in runners:
        for _ in range(warmup):
            r.step(record=False)
    for _ in range(steps):
        for r in runners:
            r.step()
    return [statistics.median(r.times) for r in runners]


def spread(times):
    """(first quartile, third quartile) of a row's step times."""
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return q[0], q[2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="resnet_tiny")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--methods", nargs="*", default=["soft", "dml", "rkd", "kdsvd", "mhgd", "iikd"])
    ap.add_argument("--unclipped", nargs="*", default=[],
                    help="methods to time a second time with KD gradient clipping off (one backward pass); the "
                         "main rows clip as each method declares (kdsvd, mhgd, iikd)")
    ap.add_argument("--src", default=None, help="a checkout's src directory whose rolekd to time (e.g. an older "
                                                    "commit's, for a side-by-side run on the same machine)")
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

    pristine = copy.deepcopy(teacher)  # objectives freeze `teacher`; students start from an unfrozen copy

    def student():
        return quantize_model(copy.deepcopy(pristine), args.bits, args.bits).to(device)

    labels = ["fp32 plain", f"{args.bits}-bit plain"]
    runners = [Runner(copy.deepcopy(pristine), CrossEntropy(), x, y, device, amp),
               Runner(student(), CrossEntropy(), x, y, device, amp)]
    for m, clip in [(m, None) for m in args.methods] + [(m, False) for m in args.unclipped]:
        t = copy.deepcopy(pristine) if m == "dml" else teacher
        kwargs = {"prepare_epochs": 1} if m in ("mhgd", "iikd") else {}
        obj = build_kd_objective(m, t, clip=clip, **kwargs)  # None: clipping as the method declares
        if obj.needs_prepare:
            obj.prepare([torch.randn_like(x) for _ in range(2)], epochs=1)
        labels.append(f"{args.bits}-bit + {m}" + (" (clipped)" if obj.clip_kd_grad else " (not clipped)"))
        runners.append(Runner(student(), obj, x, y, device, amp))
    times = time_rows(runners, args.steps)
    for r in runners:
        r.objective.close()
    base = times[0]
    rows = list(zip(labels, times))
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{args.model}, batch {args.batch}, {name}")
    print("| step | ms (median) | ms (quartiles) | ratio to fp32 plain |\n|---|---:|---:|---:|")
    for (label, t), r in zip(rows, runners):
        lo, hi = spread(r.times)
        print(f"| {label} | {1000 * t:.1f} | {1000 * lo:.1f}-{1000 * hi:.1f} | {t / base:.2f}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "model": args.model, "batch": args.batch,
                       "rows": [{"step": l, "ms": 1000 * t, "ratio": t / base} for l, t in rows]}, f, indent=2)


if __name__ == "__main__":
    main()
