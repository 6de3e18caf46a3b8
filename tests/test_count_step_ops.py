"""benchmarks/count_step_ops.py classes as synchronising the operators that make a CUDA host wait."""

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _counter_module():
    spec = importlib.util.spec_from_file_location("count_step_ops", ROOT / "benchmarks" / "count_step_ops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_linalg_calls_that_check_their_errors_inside_count_as_synchronising():
    """torch.linalg.eigh/eigvalsh, eig and svdvals check their errors inside their kernel (no separate
    _linalg_check_errors reaches the counter; their docs: "synchronizes that device with the CPU" on CUDA), and
    cholesky_ex/solve_ex do when asked to; the unchecked factorizations and products do not."""
    c = _counter_module()
    a = torch.randn(3, 5, 5, dtype=torch.float64)
    a = a @ a.mT + torch.eye(5, dtype=torch.float64)
    calls = {
        "eigh": (lambda: torch.linalg.eigh(a), 1),
        "eigvalsh": (lambda: torch.linalg.eigvalsh(a), 1),
        "eigvals": (lambda: torch.linalg.eigvals(a), 1),
        "svdvals": (lambda: torch.linalg.svdvals(a), 1),
        "cholesky": (lambda: torch.linalg.cholesky(a), 1),
        "cholesky_ex checked": (lambda: torch.linalg.cholesky_ex(a, check_errors=True), 1),
        "cholesky_ex": (lambda: torch.linalg.cholesky_ex(a), 0),
        "solve_ex checked": (lambda: torch.linalg.solve_ex(a, a, check_errors=True), 1),
        "solve_ex": (lambda: torch.linalg.solve_ex(a, a), 0),
        "solve_triangular": (lambda: torch.linalg.solve_triangular(a, a, upper=True), 0),
        "item": (lambda: a.sum().item(), 1),
        "bmm": (lambda: torch.bmm(a, a), 0),
    }
    for name, (call, want) in calls.items():
        labels = c.Labels()
        counter = c.Counter(labels)
        with counter:
            call()
        assert sum(counter.syncs.values()) == want, (name, dict(counter.sync_ops))
