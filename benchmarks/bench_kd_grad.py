"""How strong each KD term is against the task gradient of a low-bit student (issue 12).

    python benchmarks/bench_kd_grad.py --model resnet18 --batches 2                 # (a) random-init teacher
    python benchmarks/bench_kd_grad.py --model resnet_tiny --teacher RUN/model.safetensors --batches 4   # (b)

For every KD method, on ``--batches`` batches of ``--batch`` real images of the bundled CIFAR-10 sample
(normalised as the trainer does, no augmentation), a ``--bits``-bit DoReFa student initialised from the
teacher's weights (as the pipeline does for a student of the teacher's architecture), and every quantized
conv weight ``W`` (the DoReFa layers; first conv and classifier are full precision):

* ``raw``      = ||λ·∇_W KD|| / ||∇_W task||: the KD gradient before any clipping (the objective built with
  clipping off minus the task gradient);
* ``applied``  = ||g_W − ∇_W task|| / ||∇_W task||, ``g_W`` the gradient the KD objective actually leaves on
  ``W`` with the method's own clipping setting (``build_kd_objective(method, teacher)`` defaults);
* ``binds``    = the share of (weight, batch) pairs where the objective clips (its ``clip_kd_grad``) and
  the clipped gradient (of λ·KD, or of KD with ``clip_lam=authors``) is longer than the bound
  ||∇task||·sigmoid(epoch), i.e. where the clip changes the update (decided from the rule, as the
  measured difference of two gradients is rounding noise when the KD term is ~1e-5 of the task's).

Each column is the median over all (quantized conv weight, batch) pairs. The step is taken at epoch
``--epoch`` of ``--epochs`` (the clip bound is ||∇task||·sigmoid(epoch), 0.993 at epoch 5), with λ =
``--lam`` for every method. For II-KD the raw ratio of each of its three terms is printed too. MHGD's
attention network is prepared for one pass over ``--prepare-batches`` batches of the same images.
For II-KD the median cosine between its whole KD gradient and its RKD term's gradient shows how much
the MHGD and KD-SVD terms turn it (1.000: II-KD is RKD alone).
The script uses only the public API and runs on any version of rolekd with ``build_kd_objective``.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from rolekd.data import load_dataset
from rolekd.distill import build_kd_objective
from rolekd.models import create
from rolekd.models.taps import FeatureTaps
from rolekd.quant import quantize_model
from rolekd.quant.dorefa import QConv2d
from rolekd.train.objective import StepContext


def quantized_weights(model):
    return [m.weight for m in model.modules() if isinstance(m, QConv2d)]


def task_grads(student, x, y):
    student.zero_grad(set_to_none=True)
    loss = F.cross_entropy(student(x), y)
    return [g.detach() for g in torch.autograd.grad(loss, quantized_weights(student))]


def objective_grads(student, obj, x, y, ctx):
    student.zero_grad(set_to_none=True)
    obj.train_step(student, x, y, ctx)
    out = [torch.zeros_like(w) if w.grad is None else w.grad.detach().clone() for w in quantized_weights(student)]
    student.zero_grad(set_to_none=True)
    return out


def term_grads(student, teacher, obj, x, y, lam):
    """II-KD: raw λ·gradient of each of its terms (rkd, mhgd, kdsvd) on the quantized weights."""
    d = obj.distiller
    with FeatureTaps(teacher) as tt, torch.no_grad():
        t = tt(x)
    with FeatureTaps(student) as ts:
        s = ts(x)
    t = type(t)(t.logits.float(), {k: v.float() for k, v in t.features.items()},
                None if t.embedding is None else t.embedding.float())
    pairs = d.mhgd.pairs(s, t)
    terms = {"rkd": d.rkd(s, t, y), "mhgd": d.mhgd.loss_from_pairs(pairs), "kdsvd": d.kdsvd.loss_from_pairs(pairs)}
    ws = quantized_weights(student)
    out = {}
    for name, loss in terms.items():
        gs = torch.autograd.grad(lam * loss, ws, retain_graph=True, allow_unused=True)
        out[name] = [torch.zeros_like(w) if g is None else g for w, g in zip(ws, gs)]
    return out


def ratios(num, den):
    return [float(a.norm() / b.norm().clamp_min(1e-30)) for a, b in zip(num, den)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet_tiny")
    ap.add_argument("--teacher", default=None, help="teacher weights (.safetensors); default: random init")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--prepare-batches", type=int, default=8)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--lam", type=float, default=0.4)
    ap.add_argument("--epoch", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--methods", nargs="*", default=["soft", "rkd", "kdsvd", "mhgd", "iikd"])
    ap.add_argument("--options", nargs="*", default=[],
                    help="extra objective options key=value (e.g. clip_lam=authors)")
    args = ap.parse_args()
    torch.manual_seed(0)
    bundle = load_dataset("cifar10-sample")
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(bundle.train), generator=g)
    mean = torch.tensor(bundle.mean).view(1, 3, 1, 1)
    std = torch.tensor(bundle.std).view(1, 3, 1, 1)

    def batch(i):
        idx = order[i * args.batch:(i + 1) * args.batch]
        return (bundle.train.images[idx].float() / 255 - mean) / std, bundle.train.labels[idx]

    data = [batch(i) for i in range(args.batches)]
    prep = [batch(args.batches + i)[0] for i in range(args.prepare_batches)]
    teacher = create(args.model, num_classes=bundle.num_classes)
    if args.teacher:
        from safetensors.torch import load_file

        teacher.load_state_dict(load_file(args.teacher))
    pristine = copy.deepcopy(teacher)
    teacher.eval().requires_grad_(False)
    extra = {}
    for kv in args.options:
        k, v = kv.split("=", 1)
        extra[k] = v
    ctx = StepContext(epoch=args.epoch, epochs=args.epochs, autocast=nullcontext)
    factor = 1 / (1 + math.exp(-args.epoch))
    print(f"{args.model} teacher ({'trained: ' + args.teacher if args.teacher else 'random init'}) -> "
          f"{args.bits}-bit {args.model} student from the teacher's weights; batch {args.batch} x {args.batches} "
          f"batches of the bundled sample; lam {args.lam}; epoch {args.epoch} "
          f"(clip bound = ||task grad|| x {factor:.4f}); options {extra or '-'}")
    print("| method | median raw ||λ∇KD||/||∇task|| | median applied | clip binds | wall s |")
    print("|---|---:|---:|---:|---:|")
    for m in args.methods:
        t0 = time.time()
        kw = {"lam": args.lam, "lam_decay": 1.0, **extra}
        if m in ("mhgd", "iikd"):
            kw["prepare_epochs"] = 1
        t_net = copy.deepcopy(pristine) if m == "dml" else teacher
        obj = build_kd_objective(m, t_net, **kw)
        kw_raw = dict(kw, clip=False)
        kw_raw.pop("clip_lam", None)
        t_raw = copy.deepcopy(pristine) if m == "dml" else teacher
        obj_raw = build_kd_objective(m, t_raw, **kw_raw)
        student = quantize_model(copy.deepcopy(pristine), args.bits, args.bits).train()
        obj.setup(student, torch.device("cpu"))
        obj_raw.setup(student, torch.device("cpu"))
        if obj.needs_prepare:
            obj.prepare(prep, epochs=1)
            obj_raw.distiller.load_state_dict(obj.distiller.state_dict())
        if m == "dml":
            opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)  # teacher copies: no step size
            obj.bind_optimizer(opt)
            obj_raw.bind_optimizer(opt)
        raw, applied, binds, per_term = [], [], [], {}
        for x, y in data:
            gt = task_grads(student, x, y)
            ga = objective_grads(student, obj, x, y, ctx)
            gr = objective_grads(student, obj_raw, x, y, ctx)
            r = ratios([a - b for a, b in zip(gr, gt)], gt)
            a = ratios([a - b for a, b in zip(ga, gt)], gt)
            raw += r
            applied += a
            if obj.clip_kd_grad:
                weight = 1.0 if getattr(obj, "clip_lam", "paper") == "paper" else 1.0 / args.lam
                binds += [ri * weight > factor for ri in r]
            else:
                binds += [False] * len(r)
            if m == "iikd":
                terms = term_grads(student, teacher, obj, x, y, args.lam)
                for name, gs in terms.items():
                    per_term.setdefault(name, []).extend(ratios(gs, gt))
                for a_, r_, k_ in zip(terms["rkd"], terms["mhgd"], terms["kdsvd"]):
                    total = a_ + r_ + k_
                    per_term.setdefault("cos", []).append(
                        float((total * a_).sum() / (total.norm() * a_.norm()).clamp_min(1e-30)))
        print(f"| {m} | {statistics.median(raw):.4g} | {statistics.median(applied):.4g} | "
              f"{sum(binds)}/{len(binds)} | {time.time() - t0:.0f} |", flush=True)
        for name, rs in per_term.items():
            if name == "cos":
                print(f"| iikd: cosine of its KD gradient with its RKD term's (median) | "
                      f"{statistics.median(rs):.3f} | | | |")
            else:
                print(f"| iikd: {name} term alone | {statistics.median(rs):.4g} | | | |")
        obj.close()
        obj_raw.close()


if __name__ == "__main__":
    main()
