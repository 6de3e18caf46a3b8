"""Where one CPU training step's time goes, by aten op: each op of bench_cpu_step's step timed as it is
dispatched (a ``TorchDispatchMode``), summed over a few steps, per op and per (op, input shapes).

    python benchmarks/profile_step_ops.py                 # the 4-bit II-KD step, folded teacher, 1 thread, CL
    python benchmarks/profile_step_ops.py fp32 --steps 5

Timing each op on its own leaves out the Python between ops, so the ops' sum is a little below the step.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench_cpu_step import make
from rolekd.runtime import keep_freed_memory


class OpTimer(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ms = collections.defaultdict(float)
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        key = (str(func).removeprefix("aten.").removesuffix(".default"),
               tuple(tuple(a.shape) for a in args[:2] if isinstance(a, torch.Tensor)))
        self.ms[key] += (time.perf_counter() - t0) * 1e3
        self.calls[key] += 1
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", nargs="?", default="iikd_fold", choices=["fp32", "iikd", "iikd_fold"])
    ap.add_argument("--nchw", action="store_true", help="NCHW instead of channels-last")
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(1)
    keep_freed_memory()
    step = make(a.kind, not a.nchw, False)
    for _ in range(3):
        step()
    timer = OpTimer()
    t0 = time.perf_counter()
    with timer:
        for _ in range(a.steps):
            step()
    n = a.steps
    print(f"step {(time.perf_counter() - t0) * 1e3 / n:.1f} ms, ops {sum(timer.ms.values()) / n:.1f} ms")
    by_op = collections.defaultdict(float)
    for (op, _), ms in timer.ms.items():
        by_op[op] += ms / n
    for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1])[:15]:
        print(f"{ms:8.2f} ms  {op}")
    print()
    for (op, shapes), ms in sorted(timer.ms.items(), key=lambda kv: -kv[1])[:30]:
        print(f"{ms / n:8.2f} ms {timer.calls[op, shapes] // n:3d}x {op:32s} {shapes}")


if __name__ == "__main__":
    main()
