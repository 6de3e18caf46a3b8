"""Issue 32's bit-identity claims on a device: what the CPU tests check, on the card (``gpu_session.sh kd``).

    python benchmarks/check_device_numerics.py --device cuda --out numerics.json
    python benchmarks/check_device_numerics.py                # the same checks on the CPU

Each check passes or fails with its largest difference; the exit status is 1 when one fails.

* ``act_edges``: the DoReFa activation quantizer's gradient (``hardtanh_backward`` between the neighbours of 0 and
  1) is the clip's mask at -0, 0, 1, their neighbours, subnormals and infinities, in float32, bfloat16 and float16,
  on its own and with the ReLU fused in (``relu=True``: the mask of ``0 < x <= 1``, and the values and gradient of
  ReLU then quantizer) - to the bit;
* ``relu_block``: a quantized ResNet block (channels-last) with ``relu1`` -> ``act_mid`` in one node gives the
  outputs and every gradient of the two modules run apart - to the bit;
* ``mhgd_fold``: the frozen attention network's folded graphs equal the unfolded ones (linear, BatchNorm with
  running statistics, per-head product: ``FOLD_FROZEN_ATTENTION = False``): float64 within 1e-12, float32 within
  1e-5 (relative to the largest entry);
* ``iikd_fold_off``: a ResNet18 4-bit II-KD step (batch 8, KD gradient clipped) with the MHGD fold and without it:
  the gradients agree within 1e-4 of each tensor's norm (the fold rounds differently; its KL is small);
* ``subspace_group``, ``eigh_group``: float64 subspace problems, and full-spectrum problems, of several sizes solved in
  one zero-padded call (CUDA's way) give each one's vectors and gradients solved alone, to the solver's tolerance.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys

import torch
from torch import nn

from rolekd.quant import quantize_activation, quantize_model


def act_edges(device: torch.device) -> dict:
    worst = 0.0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        zero, one = torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype)
        tiny, inf = torch.nextafter(zero, one), torch.tensor(float("inf"), dtype=dtype)
        edges = torch.stack([zero, -zero, one, tiny, -tiny, torch.nextafter(one, zero),
                             torch.nextafter(one, one + one), torch.nextafter(zero, -one), inf, -inf,
                             *(torch.tensor(v, dtype=dtype) for v in (0.5, -3.0, 7.0))]).to(device)
        g = torch.arange(1, len(edges) + 1, dtype=dtype, device=device)
        for relu in (False, True):
            x = edges.clone().requires_grad_(True)
            out = quantize_activation(x, 4, relu=relu)
            (out * g).sum().backward()
            inside = (edges > 0) if relu else (edges >= 0)
            want = g * (inside & (edges <= 1)).to(dtype)
            worst = max(worst, float((x.grad - want).abs().max()))
            if relu:
                xr = edges.clone().requires_grad_(True)
                ref = quantize_activation(torch.relu(xr), 4)
                (ref * g).sum().backward()
                worst = max(worst, float((out - ref).detach().abs().max()), float((x.grad - xr.grad).abs().max()))
    return {"pass": worst == 0.0, "max_abs_diff": worst}


def relu_block(device: torch.device) -> dict:
    from rolekd.models.resnet import BasicBlock
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BasicBlock(8, 8), nn.Flatten(), nn.Linear(8 * 36, 2))
    block = quantize_model(net, 4, 4)[1].to(device)  # the first conv and the last linear stay full precision
    x = torch.rand(4, 8, 6, 6, device=device).contiguous(memory_format=torch.channels_last)
    block = block.to(memory_format=torch.channels_last)

    def run(fused: bool):
        b = copy.deepcopy(block).train()
        calls = []
        if not fused:  # a hook on the ReLU keeps the two modules apart
            b.relu1.register_forward_hook(lambda m, i, o: calls.append(1))
        with torch.no_grad():
            b.bn1.bias[:2] = -50.0  # whole channels at exactly 0 after the ReLU
        xi = x.clone().requires_grad_(True)
        out = b(xi)
        out.square().sum().backward()
        return out, [xi.grad] + [p.grad for p in b.parameters()], calls

    fused, g_fused, _ = run(True)
    apart, g_apart, calls = run(False)
    diffs = [float((fused - apart).detach().abs().max())]
    diffs += [float((a - b).abs().max()) for a, b in zip(g_fused, g_apart)]
    return {"pass": max(diffs) == 0.0 and calls == [1], "max_abs_diff": max(diffs)}


def mhgd_fold(device: torch.device) -> dict:
    """The folded graphs against the unfolded ones (linear, BatchNorm, per-head product: the definition, which
    tests/test_distill.py checks the fold against on the CPU) on ``device``."""
    import rolekd.distill.mhgd as mhgd
    out = {"pass": True}
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        torch.manual_seed(0)
        att = mhgd.GraphAttention(128, 64, heads=8)
        for bn in (att.key[1], att.query[1]):  # statistics away from BatchNorm's initial (identity) ones
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.01, 0.5)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.2, 0.2)
        att = att.to(device=device, dtype=dtype).eval().requires_grad_(False)
        v_cur = torch.randn(16, 128, device=device, dtype=dtype)
        v_prev = torch.randn(16, 64, device=device, dtype=dtype)
        folded = att.graph(v_cur, v_prev)
        mhgd.FOLD_FROZEN_ATTENTION = False
        try:
            ref = att.graph(v_cur, v_prev)
        finally:
            mhgd.FOLD_FROZEN_ATTENTION = True
        rel = float((folded - ref).abs().max() / ref.abs().max())
        out[str(dtype).removeprefix("torch.")] = rel
        out["pass"] = out["pass"] and rel <= tol
    return out


def iikd_fold_off(device: torch.device) -> dict:
    import rolekd.distill.mhgd as mhgd
    from rolekd.config import KDConfig
    from rolekd.distill import build_kd_objective, distiller_class
    from rolekd.models import create
    from rolekd.train.objective import StepContext

    def grads(fold: bool):
        mhgd.FOLD_FROZEN_ATTENTION = fold
        torch.manual_seed(0)
        x, y = torch.randn(8, 3, 32, 32, device=device), torch.randint(0, 10, (8,), device=device)
        teacher = create("resnet18").to(device).eval().requires_grad_(False)
        model = quantize_model(create("resnet18"), 4, 4).to(device).train()
        obj = build_kd_objective(distiller_class("iikd").from_config(KDConfig(method="iikd")), teacher, lam=0.4,
                                 probe=x[:2], fold_teacher_bn=True)
        obj.prepare([x[:4], x[4:]])
        obj.setup(model, device)
        obj.on_epoch_start(5, 10)
        obj.train_step(model, x, y, StepContext(epoch=5, epochs=10, autocast=contextlib.nullcontext))
        return [p.grad for p in model.parameters() if p.grad is not None]

    try:
        with_fold, without = grads(True), grads(False)
    finally:
        mhgd.FOLD_FROZEN_ATTENTION = True
    rel = max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(with_fold, without))
    return {"pass": rel <= 1e-4, "max_rel_norm_diff": rel}


def _padded_group(device: torch.device, flag: str, solver: str, shapes: list, ns: list) -> dict:
    """float64 singular vectors of matrices of several sizes solved in one zero-padded call (as CUDA runs a step's:
    ``flag`` names the devices that do) against each solved alone: the same vectors (|cos| within 1e-9 of 1) and
    gradients (within 1e-7 of each gradient's norm)."""
    import rolekd.distill.svd as svd
    g = torch.Generator().manual_seed(5)
    xs = [(torch.randn(*sh, generator=g, dtype=torch.float64) * torch.linspace(2, 0.05, sh[-1], dtype=torch.float64))
          .to(device).requires_grad_(True) for sh in shapes]
    a = [torch.randn(x.shape[0], x.shape[2], 1, dtype=torch.float64, generator=g).to(device) for x in xs]

    def solve(together: bool):
        old = getattr(svd, flag)
        setattr(svd, flag, {device.type} if together else set())
        try:
            found = svd.top_right_singular_many(xs, ns, eps=1e-9, solver=solver)
        finally:
            setattr(svd, flag, old)
        loss = sum(((v * ai).sum(1) ** 2).sum() + (v ** 4).sum() for (v, _), ai in zip(found, a))
        return [v.detach() for v, _ in found], torch.autograd.grad(loss, xs)

    (vs, gs), (vs_ref, gs_ref) = solve(True), solve(False)
    cos = max(float(((v * w).sum(1).abs() - 1).abs().max()) for v, w in zip(vs, vs_ref))
    rel = max(float((x - y).norm() / y.norm()) for x, y in zip(gs, gs_ref))
    return {"pass": cos <= 1e-9 and rel <= 1e-7, "max_cos_diff": cos, "max_rel_grad_diff": rel}


def subspace_group(device: torch.device) -> dict:
    return _padded_group(device, "GROUP_SUBSPACE_DEVICES", "subspace", [(3, 50, 36), (2, 60, 48), (3, 44, 70),
                                                                       (2, 20, 30)], [4, 2, 1, 1])


def eigh_group(device: torch.device) -> dict:
    return _padded_group(device, "PAD_EIGH_DEVICES", "eigh", [(3, 40, 12), (2, 9, 30), (2, 50, 20), (2, 6, 25)],
                         [4, 1, 3, 2])


CHECKS = {"act_edges": act_edges, "relu_block": relu_block, "mhgd_fold": mhgd_fold, "iikd_fold_off": iikd_fold_off,
          "subspace_group": subspace_group, "eigh_group": eigh_group}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--checks", nargs="+", default=list(CHECKS), choices=list(CHECKS))
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    device = torch.device(a.device)
    results = {}
    for name in a.checks:
        try:
            results[name] = CHECKS[name](device)
        except Exception as e:  # noqa: BLE001 - a failing check is a result, the others still run
            results[name] = {"pass": False, "error": f"{type(e).__name__}: {e}"}
        print(f"{name:14s} {'ok  ' if results[name]['pass'] else 'FAIL'} {results[name]}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": str(device), "torch": torch.__version__, "checks": results}, f, indent=2)
    return 0 if all(r["pass"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
