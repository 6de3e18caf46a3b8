"""The fused executor's kernels side by side: one training step (forward, cross-entropy, backward) and one
evaluation pass of N members, as

* ``sequential`` -- each member's own network, one after another (the local executor's step);
* ``vmap`` -- ``torch.func.vmap`` of ``functional_call`` over the stacked weights (``search.fused_kernel=vmap``);
* ``grouped`` -- HFTA-style grouped convolutions, members side by side along the channels
  (``search.fused_kernel=grouped``);
* ``grouped+cl`` -- grouped on channels-last activations (``--channels-last``, which also runs ``sequential`` on
  channels-last networks and images, as the trainer does on CUDA);
* ``vmap+compile`` / ``grouped+compile`` -- the same, ``torch.compile``-d (``--compile``).

Rounds interleave the kernels (each round times every kernel once, in a rotating order) and the table gives
the median per round, images per second and the ratio to ``sequential``; the optimizer step is left out
(it is the same per-member SGD in every executor).

    python benchmarks/bench_fused_step.py                                   # CPU: 8 resnet_tiny, batch 64
    python benchmarks/bench_fused_step.py --device cuda --model wrn_40_2 --members 16 --batch 128 --compile
    python benchmarks/bench_fused_step.py --device cuda --model resnet18 --bits 4 --members 16 --batch 128
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rolekd.models import TappedNet, create  # noqa: E402
from rolekd.quant import quantize_model  # noqa: E402
from rolekd.search.fused import StackedWeights  # noqa: E402
from rolekd.search.grouped import GroupedNet  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(a):
    torch.manual_seed(0)
    nets = [create(a.model, num_classes=10) for _ in range(a.members)]
    if a.bits != 32:
        nets = [quantize_model(m, a.bits, a.bits) for m in nets]
    nets = [m.to(a.device).train() for m in nets]
    template = copy.deepcopy(nets[0])
    stack = StackedWeights(nets, prefix="net.")
    # the members' own networks (sequential) as the trainer lays them out on CUDA; their conv weights become
    # copies of the stacked rows, which only the timing reads
    if a.channels_last:
        for m in nets:
            for q in m.parameters():
                if q.dim() == 4:
                    q.data = q.data.contiguous(memory_format=torch.channels_last)
    tapped = TappedNet(template)
    grouped = GroupedNet(template, a.members)
    grouped_cl = GroupedNet(template, a.members, channels_last=True)

    def fwd_vmap(p, b, x):
        return vmap(lambda p, b, x: functional_call(tapped, (p, b), (x,))["logits"], randomness="different")(p, b, x)

    def eval_vmap(p, b, x):
        return vmap(lambda p, b, x: functional_call(tapped, (p, b), (x,), {"tapped": False})["logits"],
                    in_dims=(0, 0, None), randomness="different")(p, b, x)

    fwd = {"vmap": fwd_vmap, "grouped": lambda p, b, x: grouped.run(p, b, x)["logits"]}
    evl = {"vmap": eval_vmap, "grouped": grouped.run_shared}
    if a.channels_last:
        fwd["grouped+cl"], evl["grouped+cl"] = lambda p, b, x: grouped_cl.run(p, b, x)["logits"], grouped_cl.run_shared
    if a.compile:
        for k in ("vmap", "grouped"):
            fwd[k + "+compile"], evl[k + "+compile"] = torch.compile(fwd[k]), torch.compile(evl[k])
    return nets, stack, tapped, (grouped, grouped_cl), fwd, evl


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="resnet_tiny")
    p.add_argument("--bits", type=int, default=32, help="DoReFa weight and activation bits (32: full precision)")
    p.add_argument("--members", type=int, default=8)
    p.add_argument("--batch", type=int, default=64, help="training images per member per step")
    p.add_argument("--eval-batch", type=int, default=500, help="validation images per pass (shared by the members)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=3, help="steps per kernel per round")
    p.add_argument("--compile", action="store_true", help="also time the torch.compile-d fused kernels")
    p.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (CUDA)")
    p.add_argument("--channels-last", action="store_true",
                   help="sequential on channels-last networks and images, and the grouped+cl kernel")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    nets, stack, tapped, grouped, fwd, evl = build(a)
    n, dev = a.members, a.device
    x = torch.randn(n, a.batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (n, a.batch), device=dev)
    xe = torch.randn(a.eval_batch, 3, 32, 32, device=dev)
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    xs = [x[j].contiguous(memory_format=fmt) for j in range(n)]  # each member's own batch (sequential)
    xe_seq = xe.contiguous(memory_format=fmt)
    amp = torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=a.bf16)

    def train_seq():
        for j, net in enumerate(nets):
            with amp:
                loss = F.cross_entropy(net(xs[j]).float(), y[j])
            torch.autograd.grad(loss, [q for q in net.parameters() if q.requires_grad])

    def train_fused(kernel):
        def run():
            params, buffers, leaves = stack.rows(0, n)
            with amp:
                logits = fwd[kernel](params, buffers, x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view(n, -1).mean(1).sum()
            torch.autograd.grad(loss, leaves)
        return run

    @torch.no_grad()
    def eval_seq():
        for net in nets:
            net.eval()
            with amp:
                net(xe_seq)
            net.train()

    def eval_fused(kernel):
        @torch.no_grad()
        def run():
            params, buffers, _ = stack.rows(0, n)
            params = {k: v.detach() for k, v in params.items()}
            for m in (tapped, *grouped):
                m.eval()
            with amp:
                evl[kernel](params, buffers, xe)
            for m in (tapped, *grouped):
                m.train()
        return run

    kernels = ["sequential"] + list(fwd)
    cases = {("train", "sequential"): train_seq, ("eval", "sequential"): eval_seq}
    for k in fwd:
        cases[("train", k)], cases[("eval", k)] = train_fused(k), eval_fused(k)
    for fn in cases.values():  # warm-up (and compilation)
        fn()
        fn()
    sync(dev)
    times: dict = {c: [] for c in cases}
    order = list(cases)
    for r in range(a.rounds):
        for c in order[r % len(order):] + order[:r % len(order)]:
            sync(dev)
            t0 = time.perf_counter()
            for _ in range(a.steps):
                cases[c]()
            sync(dev)
            times[c].append((time.perf_counter() - t0) / a.steps)
    res = {"config": vars(a), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "device_name": torch.cuda.get_device_name() if dev.startswith("cuda") else platform.processor() or "cpu",
           "results": {}}
    lines = ["| kernel | train step ms | train img/s | × sequential | eval pass ms | eval img/s | × sequential |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    med = {c: statistics.median(t) for c, t in times.items()}
    for k in kernels:
        tr, ev = med[("train", k)], med[("eval", k)]
        row = {"train_step_ms": round(1e3 * tr, 2), "train_img_per_s": round(n * a.batch / tr, 1),
               "train_vs_sequential": round(med[("train", "sequential")] / tr, 3),
               "eval_pass_ms": round(1e3 * ev, 2), "eval_img_per_s": round(n * a.eval_batch / ev, 1),
               "eval_vs_sequential": round(med[("eval", "sequential")] / ev, 3)}
        res["results"][k] = row
        lines.append(f"| {k} | {row['train_step_ms']:,} | {row['train_img_per_s']:,} | {row['train_vs_sequential']:.2f}× "
                     f"| {row['eval_pass_ms']:,} | {row['eval_img_per_s']:,} | {row['eval_vs_sequential']:.2f}× |")
    print(json.dumps(res, indent=2))
    print("\n".join(lines))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
