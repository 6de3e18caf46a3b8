"""What one training step dispatches: aten operators and synchronising operators, by component.

    python benchmarks/count_step_ops.py                                  # ResNet18, batch 8, CPU and CUDA paths
    python benchmarks/count_step_ops.py --model resnet_tiny --batch 128 --paths cpu
    python benchmarks/count_step_ops.py --kinds fp32 w4 iikd --out counts.json
    PYTHONPATH=OLD_CHECKOUT/src python benchmarks/count_step_ops.py ...  # an older commit's step

One warmed-up step of the trainer's objective (``train_step``) plus the optimizer's step (SGD, momentum), for a
full-precision student (``fp32``), a 4-bit DoReFa student (``w4``) and a 4-bit student with each KD method (KD
gradient clipped where the method clips, ``iikd_noclip`` with ``kd.clip=false``), counted on the CPU. Counting
runs no GPU: the CUDA path is the CPU step with the solver choices CUDA makes (``rolekd.distill.svd``'s
eigen-solver picks by device; the counts are of what is dispatched, not of its cost).

Each operator is counted once as it reaches the dispatcher (``TorchDispatchMode``, below autograd). Its component:
forward ops by the code that runs them (the student's network, its quantizers, the teacher, each KD term, the
clip, the optimizer); backward ops by the autograd node that runs them, which is labelled with the component whose
forward made it (a ``TorchFunctionMode`` above autograd records each output's ``grad_fn``). *Synchronising* ops are
the ones that make a CUDA host wait for the device: ``_local_scalar_dense`` (``.item()``, ``float(t)``,
``bool(t)``, ``.tolist()``), ``_linalg_check_errors`` (the linalg error checks), the linalg operators that check
their errors inside (``eigh``, ``eig``, ``svd``; the ``*_ex`` ones asked to) and ops whose output shape depends on
data (``nonzero``, ``masked_select``, ``unique``). *Kernels* are the operators that are not views, aliases
(``detach``), allocations or profiler markers: what would launch work on a GPU.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from rolekd.config import KDConfig, TrainConfig
from rolekd.distill import build_kd_objective, distiller_class
from rolekd.models import create
from rolekd.quant import quantize_model
from rolekd.train import build_optimizer
from rolekd.train.objective import CrossEntropy, StepContext

# operators that launch no kernel on a GPU: views and aliases (``OpOverload.is_view``), allocations, the profiler's
# markers; the rest is what the "kernels" column counts
NO_KERNEL = {"_unsafe_view", "_reshape_alias", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
             "lift_fresh", "_record_function_enter_new", "_record_function_exit"}
SYNC = {"_local_scalar_dense", "_linalg_check_errors", "nonzero", "masked_select", "unique", "_unique2",
        "unique_consecutive", "item"}
# operators that check their own errors inside their kernel (the check, a synchronisation on CUDA, reaches no
# dispatcher mode): torch.linalg.eigh/eigvalsh, eig/eigvals and svd/svdvals ("When inputs are on a CUDA device, this
# function synchronizes that device with the CPU", their docs), and the ``*_ex`` factorizations when called with
# ``check_errors=True``
CHECKS_INSIDE = {"_linalg_eigh", "linalg_eig", "_linalg_svd"}
CHECKS_IF_ASKED = {"linalg_cholesky_ex", "linalg_inv_ex", "linalg_lu_factor_ex", "linalg_ldl_factor_ex",
                   "_linalg_solve_ex", "linalg_solve_ex"}


def synchronises(name: str, kwargs: dict | None) -> bool:
    """Whether the operator ``name`` (called with ``kwargs``) makes a CUDA host wait for the device."""
    asked = name in CHECKS_IF_ASKED and bool((kwargs or {}).get("check_errors"))
    return name in SYNC or name in CHECKS_INSIDE or asked


class Labels:
    """The component label stack, and each autograd node's label."""

    def __init__(self):
        self.stack = ["student"]
        self.nodes: dict[int, str] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.stack.append(name)
        try:
            yield
        finally:
            self.stack.pop()

    @property
    def now(self) -> str:
        return self.stack[-1]


class NodeLabeller(TorchFunctionMode):
    """Above autograd: each output's grad_fn gets the component that made it."""

    def __init__(self, labels: Labels):
        super().__init__()
        self.labels = labels

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            fn = getattr(t, "grad_fn", None) if isinstance(t, torch.Tensor) else None
            if fn is not None and id(fn) not in self.labels.nodes:
                self.labels.nodes[id(fn)] = self.labels.now
        return out


class Counter(TorchDispatchMode):
    def __init__(self, labels: Labels):
        super().__init__()
        self.labels = labels
        self.ops = collections.Counter()
        self.kernels = collections.Counter()
        self.syncs = collections.Counter()
        self.sync_ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        node = torch._C._current_autograd_node()
        if node is not None:
            label = self.labels.nodes.get(id(node), "student") + " bwd"
        else:
            label = self.labels.now
        name = func.__name__.split(".")[0] if hasattr(func, "__name__") else str(func)
        self.ops[label] += 1
        if not getattr(func, "is_view", False) and name not in NO_KERNEL:
            self.kernels[label] += 1
        if synchronises(name, kwargs):
            self.syncs[label] += 1
            self.sync_ops[name] += 1
        return func(*args, **(kwargs or {}))


def patch(labels: Labels):
    """Label the components: wrap the quantizers, the teacher's forward, each distiller term, the clip."""
    import rolekd.distill.objective as objective
    import rolekd.quant.dorefa as dorefa
    from rolekd.distill import base

    undo = []

    def wrap(owner, attr, label):
        fn = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)

        def wrapped(*a, **k):
            with labels(label if isinstance(label, str) else label(a)):
                return fn(*a, **k)
        setattr(owner, attr, wrapped)
        undo.append((owner, attr, fn))

    for name in ("quantize_weight", "quantize_weights", "quantize_activation"):
        if hasattr(dorefa, name):
            wrap(dorefa, name, "quantizers")
    wrap(objective.KDObjective, "forward_teacher", "teacher")
    wrap(objective, "clip_sum", "clip")
    # each distiller's loss: "kd:<its name>"; II-KD's parts are distillers of their own
    for cls in _subclasses(base.Distiller):
        if "forward" in cls.__dict__:
            wrap(cls, "forward", lambda a: f"kd:{type(a[0]).__name__.lower()}")
    # rolekd's own autograd functions (the eigen-solve, the quantizers, ...): their outputs' nodes are made below the
    # function mode that labels the rest, so each is labelled here, as the code that applied it
    for cls in _subclasses(torch.autograd.Function):
        if cls.__module__.startswith("rolekd.") and "apply" not in cls.__dict__:
            def applied(*a, _apply=cls.apply, **k):
                out = _apply(*a, **k)
                for t in (out if isinstance(out, (tuple, list)) else (out,)):
                    node = t.grad_fn if isinstance(t, torch.Tensor) else None
                    if node is not None:
                        labels.nodes.setdefault(id(node), labels.now)
                return out
            cls.apply = staticmethod(applied)
            undo.append((cls, "apply", None))
    return undo


def _subclasses(cls):
    out = []
    for c in cls.__subclasses__():
        out.append(c)
        out.extend(_subclasses(c))
    return out


def make(kind: str, model_name: str, batch: int, cuda_path: bool):
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    teacher = create(model_name).eval().requires_grad_(False)
    if kind == "fp32":
        model, obj = create(model_name), CrossEntropy()
    elif kind == "w4":
        model, obj = quantize_model(create(model_name), 4, 4), CrossEntropy()
    else:
        method = kind.removesuffix("_noclip")
        model = quantize_model(create(model_name), 4, 4)
        kd = KDConfig(method=method, **({"clip": False} if kind.endswith("_noclip") else {}))
        cls = distiller_class(method)
        extra = {"clip_kd_grad": kd.clip} if kd.clip is not None else {}
        obj = build_kd_objective(cls.from_config(kd), teacher, lam=0.4, probe=x[:2], fold_teacher_bn=True, **extra)
        if hasattr(obj, "prepare"):
            obj.prepare([x[: batch // 2], x[batch // 2:]])
    obj.setup(model, torch.device("cpu"))
    # the trainer's optimizer (SGD, momentum 0.9; no weight decay or Nesterov, as the first counts)
    opt = build_optimizer(list(model.parameters()) + list(getattr(obj, "extra_parameters", lambda: [])()),
                          TrainConfig(lr=0.01, momentum=0.9, nesterov=False, weight_decay=0))
    if hasattr(obj, "bind_optimizer"):
        obj.bind_optimizer(opt)
    if hasattr(obj, "on_epoch_start"):
        obj.on_epoch_start(5, 10)
    ctx = StepContext(epoch=5, epochs=10, autocast=contextlib.nullcontext)
    model.train()

    def step(labels: Labels | None = None):
        opt.zero_grad(set_to_none=True)
        obj.train_step(model, x, y, ctx)
        with (labels("optimizer") if labels else contextlib.nullcontext()):
            opt.step()
    return step


@contextlib.contextmanager
def cuda_solvers(on: bool):
    """The eigen-solver choices a CUDA step makes (rolekd.distill.svd picks by device): its subspace problems solved
    together, for the count the first call converged in, without a convergence check (the step counted is the second,
    a step between two checks; every CHECK_EVERY-th step checks, as the first one did), and its full-spectrum
    problems of every size in one call."""
    if not on:
        yield
        return
    import rolekd.distill.svd as svd

    orig = svd._solver

    def as_cuda(g, p, solver, *grad):  # older commits also pass whether a gradient is needed
        class _G:  # the same matrix, reported as on a CUDA device
            shape = g.shape
            device = torch.device("cuda")
        return orig(_G, p, solver, *grad)
    if not hasattr(svd, "FIXED_ITERATION_DEVICES"):  # an older commit: every call checks (as it did on CUDA)
        svd.FIXED_ITERATION_DEVICES, svd._ITERATIONS = set(), {}
    fixed, known = svd.FIXED_ITERATION_DEVICES, dict(svd._ITERATIONS)
    flags = {name: getattr(svd, name, None) for name in ("GROUP_SUBSPACE_DEVICES", "PAD_EIGH_DEVICES")}
    svd._solver = as_cuda
    svd.FIXED_ITERATION_DEVICES = {"cpu"}  # CUDA's known iteration count, checked every CHECK_EVERY-th call only
    # its subspace problems solved together, and its full-spectrum problems of every size in one padded call
    svd.GROUP_SUBSPACE_DEVICES = svd.PAD_EIGH_DEVICES = {"cpu"}
    svd._ITERATIONS.clear()
    try:
        yield
    finally:
        svd._solver, svd.FIXED_ITERATION_DEVICES = orig, fixed
        for name, value in flags.items():  # an older commit lacks one: removed again
            if value is None:
                delattr(svd, name)
            else:
                setattr(svd, name, value)
        svd._ITERATIONS.clear()
        svd._ITERATIONS.update(known)


def count(kind: str, model: str, batch: int, path: str) -> dict:
    with cuda_solvers(path == "cuda"):
        step = make(kind, model, batch, path == "cuda")
        step()  # warm-up: lazy parts (folded teacher, taps, adapters, optimizer state) made here
        labels = Labels()
        undo = patch(labels)
        counter = Counter(labels)
        try:
            with NodeLabeller(labels), counter:
                step(labels)
        finally:
            for owner, attr, fn in reversed(undo):
                if fn is None:  # an inherited attribute shadowed
                    delattr(owner, attr)
                else:
                    setattr(owner, attr, fn)
    return {"ops": sum(counter.ops.values()), "syncs": sum(counter.syncs.values()),
            "kernels": sum(counter.kernels.values()),
            "by_component": dict(counter.ops.most_common()), "syncs_by_component": dict(counter.syncs),
            "sync_ops": dict(counter.sync_ops)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--kinds", nargs="+", default=["fp32", "w4", "soft", "rkd", "kdsvd", "mhgd", "iikd", "iikd_noclip"])
    ap.add_argument("--paths", nargs="+", default=["cpu", "cuda"], choices=["cpu", "cuda"])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    out = {}
    print(f"{a.model}, batch {a.batch}: operators (synchronising) and kernels (operators that are not views, "
          f"aliases or allocations) per step")
    print(f"{'step':14s} " + " ".join(f"{p + ' path: ops (syncs) kernels':>26s}" for p in a.paths))
    for kind in a.kinds:
        row = {p: count(kind, a.model, a.batch, p) for p in a.paths}
        out[kind] = row
        cells = (f"{r['ops']:>12d} ({r['syncs']:>3d}) {r['kernels']:>6d}" for r in row.values())
        print(f"{kind:14s} " + " ".join(cells), flush=True)
    for kind, row in out.items():
        for p, r in row.items():
            comp = ", ".join(f"{k} {v}" for k, v in r["by_component"].items())
            print(f"  {kind} {p}: {comp}; syncs {r['sync_ops']}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"model": a.model, "batch": a.batch, "counts": out}, f, indent=2)


if __name__ == "__main__":
    main()
