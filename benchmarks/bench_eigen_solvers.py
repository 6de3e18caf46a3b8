"""KD-SVD's and MHGD's eigen-solvers (``rolekd.distill.svd``) side by side: the full ``eigh`` (LAPACK, cuSOLVER) against
the subspace iteration, by Gram size; and the subspace iteration's iteration counts by block size.

    python benchmarks/bench_eigen_solvers.py                                  # CPU: both tables
    python benchmarks/bench_eigen_solvers.py --device cuda --rows 512         # on a GPU (gpu_session.sh kd)
    python benchmarks/bench_eigen_solvers.py --skip-timing --extras 8 16 24   # the iteration counts only
    python benchmarks/bench_eigen_solvers.py --device cuda --skip-timing --skip-iterations --groups 256  # padding

*Timing*: forward + backward of ``top_right_singular_many`` (what a KD step calls) on ``--rows`` matrices ``(HW, C)``
whose Gram matrix is ``C x C``, 4 vectors each with a gradient (a student's taps), solver ``eigh`` against
``subspace`` in its steady state (the known iteration count without a check, as CUDA runs it); median of
``--repeats`` rounds, the two alternating. On CUDA ``auto`` takes ``eigh`` up to 32 rows only: torch's batched
``eigh`` looped over the batch above that (``rolekd.distill.svd``); this row says whether that still holds on a card.

*Groups* (``--groups BATCH``): a ResNet18 step's problems as CUDA solves them now (the subspace ones of every size in
one zero-padded call, the small full-spectrum ones in another) against one call per Gram size; whether the padding's
extra arithmetic costs less than the launches and synchronisations it saves (a GPU question: on the CPU, where LAPACK
takes sizes up to 256, the padded path runs only the full-spectrum grouping).

*Iterations*: the subspace solver's iterations to its tolerance (float32 input: residual <= 1e-5 lambda_max) with a
block of ``p + extra`` vectors, ``p`` = 1 (a teacher's vector) and 4 (a student's candidates), on ResNet18's and
WRN-16-4's random-init taps (batch 32) and on synthetic spectra (steep: 1e0..1e-3, mild: 1e0..1e-1, flat: white
features), with the CPU time of one solve.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch

from rolekd.distill import svd


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timing(device: torch.device, rows: int, sizes: list[int], repeats: int) -> list[dict]:
    out = []
    for c in sizes:
        torch.manual_seed(c)
        x = (torch.randn(rows, max(2 * c, 64), c, device=device) * torch.logspace(0, -2, c, device=device))
        x.requires_grad_(True)

        def run(solver: str) -> float:
            _sync(device)
            t = time.perf_counter()
            (v, _), = svd.top_right_singular_many([x], [4], solver=solver)
            torch.autograd.grad((v ** 3).sum(), x)
            _sync(device)
            return time.perf_counter() - t

        fixed = svd.FIXED_ITERATION_DEVICES
        svd.FIXED_ITERATION_DEVICES = fixed | {device.type}  # the steady state: the known count, no check
        try:
            times = {"eigh": [], "subspace": []}
            for solver in times:  # warm-up (the subspace's first call records its iteration count)
                run(solver)
            for _ in range(repeats):
                for solver in times:
                    times[solver].append(run(solver))
        finally:
            svd.FIXED_ITERATION_DEVICES = fixed
        row = {"c": c, "rows": rows, **{f"{k}_ms": statistics.median(v) * 1e3 for k, v in times.items()}}
        row["eigh_over_subspace"] = row["eigh_ms"] / row["subspace_ms"]
        out.append(row)
        print(f"C {c:4d}, {rows} matrices: eigh {row['eigh_ms']:8.2f} ms, subspace {row['subspace_ms']:8.2f} ms "
              f"(eigh / subspace {row['eigh_over_subspace']:.2f})", flush=True)
    return out


RESNET18_TAPS = [(1024, 64), (256, 128), (64, 256), (16, 512)]  # (HW, C) of ResNet18's four taps on CIFAR


def groups(device: torch.device, batch: int, repeats: int) -> dict:
    """A ResNet18 II-KD step's singular-vector problems (teacher k = 1 without a gradient, student 4 with one, at each
    tap), forward + backward: as this device solves them now (``GROUP_SUBSPACE_DEVICES`` and ``PAD_EIGH_DEVICES``: the
    subspace problems of every size in one padded call, the small full-spectrum ones in another) against one call per
    Gram size (as before the padding); steady state, median of ``repeats``, alternating."""
    torch.manual_seed(0)
    teacher = [torch.randn(batch, hw, c, device=device).relu() for hw, c in RESNET18_TAPS]
    student = [torch.randn(batch, hw, c, device=device).relu().requires_grad_(True) for hw, c in RESNET18_TAPS]
    xs, ns = teacher + student, [1] * len(teacher) + [4] * len(student)
    by_size: dict[int, list[int]] = {}
    for i, x in enumerate(xs):
        by_size.setdefault(min(x.shape[-2:]), []).append(i)

    def run(padded: bool) -> float:
        _sync(device)
        t = time.perf_counter()
        if padded:
            found = svd.top_right_singular_many(xs, ns)
        else:
            found = [None] * len(xs)
            for idx in by_size.values():
                for i, f in zip(idx, svd.top_right_singular_many([xs[i] for i in idx], [ns[i] for i in idx])):
                    found[i] = f
        torch.autograd.grad(sum((v ** 3).sum() for v, _ in found[len(teacher):]), student)
        _sync(device)
        return time.perf_counter() - t

    saved = svd.FIXED_ITERATION_DEVICES, svd.GROUP_SUBSPACE_DEVICES, svd.PAD_EIGH_DEVICES
    svd.FIXED_ITERATION_DEVICES = saved[0] | {device.type}  # the steady state: the known count, no check
    svd.GROUP_SUBSPACE_DEVICES, svd.PAD_EIGH_DEVICES = saved[1] | {device.type}, saved[2] | {device.type}
    try:
        times = {"padded": [], "per_size": []}
        for how in times:  # warm-up (the iteration counts recorded)
            run(how == "padded")
        for _ in range(repeats):
            for how in times:
                times[how].append(run(how == "padded"))
    finally:
        svd.FIXED_ITERATION_DEVICES, svd.GROUP_SUBSPACE_DEVICES, svd.PAD_EIGH_DEVICES = saved
    row = {"batch": batch, **{f"{k}_ms": statistics.median(v) * 1e3 for k, v in times.items()}}
    row["padded_over_per_size"] = row["padded_ms"] / row["per_size_ms"]
    print(f"ResNet18's taps, batch {batch}: padded {row['padded_ms']:8.2f} ms, one call per size "
          f"{row['per_size_ms']:8.2f} ms (padded / per size {row['padded_over_per_size']:.2f})", flush=True)
    return row


def _matrices(batch: int) -> dict[str, torch.Tensor]:
    from rolekd.models import create
    from rolekd.models.taps import FeatureTaps

    mats = {}
    for model in ("resnet18", "wrn_16_4"):
        torch.manual_seed(0)
        net = create(model).eval()
        taps = FeatureTaps(net, features=True, embedding=False)
        with torch.no_grad():
            feats = taps(torch.randn(batch, 3, 32, 32)).features
        taps.remove()
        for name, f in feats.items():
            g, _ = svd._gram(svd.feature_matrix(f))
            if g.shape[-1] > 32:
                mats[f"{model} {name}"] = g
    torch.manual_seed(0)
    for r in (64, 128, 256):
        for kind, lo in (("steep", -3.0), ("mild", -1.0), ("flat", None)):
            x = torch.randn(batch, 2 * r, r)
            if lo is not None:
                x = x * torch.logspace(0, lo, r)
            mats[f"{kind} {r}"] = x.transpose(-1, -2) @ x
    return mats


def iterations(extras: list[int], batch: int) -> list[dict]:
    out = []
    fixed, extra0 = svd.FIXED_ITERATION_DEVICES, svd.SUBSPACE_EXTRA
    svd.FIXED_ITERATION_DEVICES = fixed | {"cpu"}  # records the checked iteration count per call
    try:
        for name, g in _matrices(batch).items():
            row = {"matrices": name, "shape": list(g.shape)}
            cells = []
            for extra, p in itertools.product(extras, (1, 4)):
                svd.SUBSPACE_EXTRA = extra
                svd._ITERATIONS.clear()
                t = time.perf_counter()
                svd.top_eigh(g, p, solver="subspace")
                t = time.perf_counter() - t
                (n, _), = svd._ITERATIONS.values()
                row[f"p{p}+{extra}"] = {"iterations": n, "cpu_ms": t * 1e3}
                cells.append(f"p{p}+{extra}: {n:2d} ({t * 1e3:4.0f} ms)")
            out.append(row)
            print(f"{name:18s} {str(tuple(g.shape)):16s} " + " | ".join(cells), flush=True)
    finally:
        svd.FIXED_ITERATION_DEVICES, svd.SUBSPACE_EXTRA = fixed, extra0
        svd._ITERATIONS.clear()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=64, help="matrices per timed call (a step's teacher + student rows)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[48, 64, 128, 256], help="Gram sizes (channels) to time")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--extras", type=int, nargs="+", default=[8, 16, 24], help="subspace block = p + extra")
    ap.add_argument("--batch", type=int, default=32, help="matrices per iteration-count problem")
    ap.add_argument("--groups", type=int, default=0, metavar="BATCH",
                    help="also time a ResNet18 step's problems padded together against one call per size, at BATCH")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--skip-iterations", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    result = {"device": str(device), "torch": torch.__version__,
              "card": torch.cuda.get_device_name() if device.type == "cuda" else None}
    if not a.skip_timing:
        result["timing"] = timing(device, a.rows, a.sizes, a.repeats)
    if a.groups:
        result["groups"] = groups(device, a.groups, a.repeats)
    if not a.skip_iterations:
        result["iterations"] = iterations(a.extras, a.batch)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
