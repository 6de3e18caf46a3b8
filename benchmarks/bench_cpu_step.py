"""The CPU training step of resnet_tiny (batch 128): fp32 plain, 4-bit plain (q4), 4-bit soft KD clipped (softclip) and
4-bit II-KD, by thread count, memory format and process count — what ``pipeline.workers`` and
``train.channels_last=auto`` choose between.

    python benchmarks/bench_cpu_step.py                       # 1 and 2 threads, NCHW and channels-last
    python benchmarks/bench_cpu_step.py --threads 1 --processes 2 --formats cl   # 2 processes at once
    python benchmarks/bench_cpu_step.py --bf16                # also bf16 autocast (changes numerics)
    python benchmarks/bench_cpu_step.py --threads 1 --formats cl --compile   # also torch.compile (warm-up printed)
    PYTHONPATH=OLD_CHECKOUT/src python benchmarks/bench_cpu_step.py ...      # an older commit's step

Like a rolekd training process, it keeps freed memory in the process (rolekd.runtime) where the code has it.

Each row is the median step of ``--rounds`` interleaved rounds (every round times one step of each row)
after warm-up; with ``--processes N`` N copies run at once and their img/s are added (the machine's
throughput, as N pipeline workers). The steps are the trainer's (``Objective.train_step`` + SGD step); the
II-KD teacher is a frozen resnet_tiny, KD gradient clipping on, MHGD's attention prepared on two batches.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import statistics
import time

import torch

from rolekd.config import KDConfig, TrainConfig
from rolekd.distill import build_kd_objective, distiller_class
from rolekd.models import create
from rolekd.quant import quantize_model
from rolekd.train import build_optimizer
from rolekd.train.objective import CrossEntropy, StepContext

B = 128


def make(kind: str, cl: bool, bf16: bool, compile_: bool = False):
    torch.manual_seed(0)
    x, y = torch.randn(B, 3, 32, 32), torch.randint(0, 10, (B,))
    teacher = create("resnet_tiny").eval().requires_grad_(False)
    if kind == "fp32":
        model, obj = create("resnet_tiny"), CrossEntropy()
    elif kind == "q4":  # the 4-bit student without KD
        model, obj = quantize_model(create("resnet_tiny"), 4, 4), CrossEntropy()
    elif kind == "softclip":  # the clipped KD step's frame with the cheapest KD term: II-KD's floor (see --help)
        model = quantize_model(create("resnet_tiny"), 4, 4)
        obj = build_kd_objective(distiller_class("soft").from_config(KDConfig(method="soft")), teacher, lam=0.4,
                                 probe=x[:2], clip_kd_grad=True)
    else:
        model = quantize_model(create("resnet_tiny"), 4, 4)
        # iikd_fold: the teacher's forward on its BatchNorm-folded copy (kd.fold_teacher_bn, the default of
        # rolekd's runs); iikd: the teacher as trained
        obj = build_kd_objective(distiller_class("iikd").from_config(KDConfig(method="iikd")), teacher, lam=0.4,
                                 probe=x[:2], **({"fold_teacher_bn": True} if kind == "iikd_fold" else {}))
        obj.prepare([x[:64], x[64:]])
    if cl:
        model, teacher = model.to(memory_format=torch.channels_last), teacher.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    obj.setup(model, torch.device("cpu"))
    opt = build_optimizer(list(model.parameters()) + list(obj.extra_parameters()),  # the trainer's optimizer
                          TrainConfig(lr=0.01, momentum=0.9, nesterov=False, weight_decay=0))
    obj.bind_optimizer(opt)
    obj.on_epoch_start(5, 10)
    ac = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    ctx = StepContext(epoch=5, epochs=10, autocast=ac)
    model.train()

    step_model = torch.compile(model) if compile_ else model

    def step():
        opt.zero_grad(set_to_none=True)
        obj.train_step(step_model, x, y, ctx)
        opt.step()
    return step


def measure(threads: int, kinds, formats, bf16s, rounds: int, compiles=(False,)) -> dict:
    torch.set_num_threads(threads)
    try:  # as a rolekd training process does (rolekd.runtime); older checkouts have no such module
        from rolekd.runtime import keep_freed_memory
        keep_freed_memory()
    except ImportError:
        pass
    rows = {(k, f, b, c): (make(k, f == "cl", b, c), []) for k in kinds for f in formats for b in bf16s
            for c in compiles}
    for (k, f, b, c), (step, _) in rows.items():
        t0 = time.perf_counter()
        for _ in range(3):
            step()
        if c:
            print(f"warm-up of {k} {f} compiled: {time.perf_counter() - t0:.1f} s", flush=True)
    for _ in range(rounds):
        for step, times in rows.values():
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return {f"{k} {f}{' bf16' if b else ''}{' compiled' if c else ''}": B / statistics.median(t)
            for (k, f, b, c), (_, t) in rows.items()}


def _child(args, q):
    q.put(measure(*args))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--kinds", nargs="+", default=["fp32", "iikd"],
                    choices=["fp32", "q4", "softclip", "iikd", "iikd_fold"],
                    help="softclip: a 4-bit student with soft-label KD and the KD gradient clipped - the teacher's "
                         "forward and the two backward passes of II-KD's step with a KD term that costs next to "
                         "nothing, the most an II-KD step could gain from cheaper KD terms")
    ap.add_argument("--formats", nargs="+", default=["nchw", "cl"], choices=["nchw", "cl"])
    ap.add_argument("--bf16", action="store_true", help="also time bf16 autocast")
    ap.add_argument("--compile", action="store_true", help="also time the model under torch.compile (Inductor)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    bf16s = [False, True] if a.bf16 else [False]
    out = {}
    for t in a.threads:
        args = (t, a.kinds, a.formats, bf16s, a.rounds, (False, True) if a.compile else (False,))
        if a.processes == 1:
            res = measure(*args)
        else:
            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            procs = [ctx.Process(target=_child, args=(args, q)) for _ in range(a.processes)]
            for p in procs:
                p.start()
            parts = [q.get() for _ in procs]
            for p in procs:
                p.join()
            res = {k: sum(r[k] for r in parts) for k in parts[0]}
        for k, v in res.items():
            name = f"{k}, {t} thread(s) x {a.processes} process(es)"
            out[name] = round(v, 1)
            print(f"{name:55s} {v:8.0f} img/s", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
