"""KD losses and the KD objective, checked against independent numpy/torch reference computations."""

import contextlib
import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import register_noise_dataset
from rolekd.distill import (
    KDObjective,
    build_kd_objective,
    create_distiller,
    feature_matrix,
    kdsvd_loss,
    list_distillers,
    rkd_loss,
    soft_label_loss,
    top_right_singular,
)
from rolekd.cli import main
from rolekd.config import load_config
from rolekd.errors import UserError
from rolekd.experiment import Session, build_trainer
from rolekd.files import load_state
from rolekd.models import create
from rolekd.models.taps import FeatureTaps, Outputs
from rolekd.train.objective import StepContext

CPU = torch.device("cpu")


class TinyNet(nn.Module):
    """Three taps: 8x8x4 (tall HW x C), 4x4x8 (tall), 2x2x16 (wide: HW < C)."""

    kd_taps = {"s1": "stage1", "s2": "stage2", "s3": "stage3"}
    kd_embedding = "fc"

    def __init__(self, num_classes=5, w=4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, w, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.stage1 = nn.Sequential(nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(w, 2 * w, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU())
        self.stage3 = nn.Sequential(nn.Conv2d(2 * w, 4 * w, 3, 2, 1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU())
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.fc(x.mean((2, 3)))


def ctx(epoch=0, epochs=10):
    return StepContext(epoch=epoch, epochs=epochs, autocast=contextlib.nullcontext)


def assert_close_to_scale(actual, expected, *terms, rel=1e-5):
    """``actual == expected`` up to float rounding that is relative to the magnitude of the summed terms.

    A float32 gradient (or update) element is a sum of many products; its rounding error scales with the
    norm of the tensors summed (``terms``, default ``expected``), not with the element itself, which
    can cancel to ~0. So the bound is ``rel`` (~100x float32's epsilon) times that norm, for every element.
    """
    scale = sum(float(t.norm()) for t in (terms or (expected,)))
    err = float((actual - expected).abs().max())
    assert err <= rel * scale, f"max |difference| {err:.3g} > {rel:g} x {scale:.3g} (norm of the terms)"


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(12, 3, 8, 8, generator=g), torch.randint(0, 5, (12,), generator=g)


# ----------------------------------------------------------------------------- registry
def test_registry_names_aliases_and_errors():
    assert set(list_distillers()) >= {"soft", "dml", "rkd", "kdsvd", "mhgd", "iikd"}
    assert create_distiller("KD-SVD").name == "kdsvd"
    assert create_distiller("soft", T=2.0).T == 2.0
    with pytest.raises(UserError, match="unknown KD method"):
        create_distiller("fitnet")
    with pytest.raises(UserError):
        create_distiller("soft", temperature=3)
    flags = {n: create_distiller(n) for n in ["soft", "dml", "rkd", "kdsvd", "mhgd", "iikd"]}
    assert flags["dml"].trains_teacher and not flags["soft"].trains_teacher
    assert flags["rkd"].needs_embedding and not flags["rkd"].needs_features
    assert flags["kdsvd"].needs_features and flags["mhgd"].needs_prepare
    assert flags["iikd"].needs_features and not flags["iikd"].needs_embedding  # its RKD term reads the logits
    assert create_distiller("rkd", on="logits").needs_embedding is False
    with pytest.raises(UserError, match="on="):
        create_distiller("rkd", on="features")


# ----------------------------------------------------------------------------- soft
def test_soft_gradient_reaches_only_student_and_zero_when_equal():
    s = torch.randn(4, 5, requires_grad=True)
    t = torch.randn(4, 5, requires_grad=True)
    soft_label_loss(s, t).backward()
    assert t.grad is None and s.grad.abs().sum() > 0
    assert float(soft_label_loss(t, t).detach()) == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------- rkd
def test_rkd_gradient_only_student_zero_when_equal_and_finite_on_duplicates():
    s = torch.randn(6, 8, requires_grad=True)
    t = torch.randn(6, 8, requires_grad=True)
    d = create_distiller("rkd")
    d(Outputs(None, embedding=s), Outputs(None, embedding=t), None).backward()
    assert t.grad is None and s.grad.abs().sum() > 0
    assert float(rkd_loss(t, t).detach()) == pytest.approx(0.0, abs=1e-6)
    dup = torch.randn(6, 8)
    dup[3] = dup[1]
    dup.requires_grad_(True)
    rkd_loss(dup, torch.randn(6, 8)).backward()
    assert torch.isfinite(dup.grad).all()


# ----------------------------------------------------------------------------- svd helpers
@pytest.mark.parametrize("solver", ["eigh", "subspace"])
@pytest.mark.parametrize("shape", [(3, 12, 5), (3, 4, 9), (2, 6, 6), (2, 50, 36), (2, 34, 60)])
def test_top_right_singular_gradient_matches_torch_svd(shape, solver):
    """Both solvers (full spectrum + eigenbasis backward; subspace iteration + complex solve) give
    torch.linalg.svd's vectors, values and gradients (the smallest Gram matrices always use eigh)."""
    torch.manual_seed(2)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    a = torch.randn(shape[0], shape[2], 1, dtype=torch.float64)

    def sign_free(v):  # invariant to each vector's sign
        return ((v * a).sum(1) ** 2).sum() + (v ** 4).sum()

    v, s = top_right_singular(x, 2, eps=1e-9, solver=solver)
    g, = torch.autograd.grad(sign_free(v), x)
    _, s_ref, vh = torch.linalg.svd(x, full_matrices=False)
    v_ref = vh.transpose(-1, -2)[..., :2]
    g_ref, = torch.autograd.grad(sign_free(v_ref), x)
    torch.testing.assert_close((v * v_ref).sum(1).abs().detach(), torch.ones(shape[0], 2, dtype=torch.float64))
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s, s_ref[:, :2].detach())


@pytest.mark.parametrize("solver", ["eigh", "subspace"])
def test_singular_vectors_solved_together_are_each_solved_alone(solver, monkeypatch):
    """top_right_singular_many: matrices solved in one batched call (teacher rows without a gradient beside student
    rows with one, different n, X^T X and X X^T; for the subspace iteration also of different sizes, the smaller
    zero-padded, one of them wholly inside the shared block) give each matrix's own vectors, values and gradients:
    bit for bit with the full spectrum (solved per matrix), to the solver's tolerance with the shared subspace
    block; the rows without a gradient get none and cost no backward solve."""
    from rolekd.distill import svd
    from rolekd.distill.svd import top_right_singular_many
    monkeypatch.setattr(svd, "GROUP_SUBSPACE_DEVICES", {"cpu"})  # as on CUDA: subspace problems together too
    calls, top_eigh = [], svd.top_eigh
    monkeypatch.setattr(svd, "top_eigh", lambda g, *a, **k: calls.append(g.shape) or top_eigh(g, *a, **k))
    torch.manual_seed(5)
    shapes = [(3, 50, 36), (2, 36, 80), (3, 50, 36), (2, 40, 36), (2, 36, 90), (2, 60, 48), (3, 44, 70), (2, 20, 30)]
    ns = [1, 4, 4, 2, 3, 2, 1, 1]
    grads = [False, False, True, True, True, True, False, True]
    xs = [torch.randn(*sh, dtype=torch.float64) * torch.linspace(2, 0.05, sh[-1], dtype=torch.float64)
          for sh in shapes]
    xs = [x.requires_grad_(g) for x, g in zip(xs, grads)]
    a = [torch.randn(x.shape[0], x.shape[2], 1, dtype=torch.float64) for x in xs]

    def sign_free(found):  # invariant to each vector's sign; the rows with a gradient
        return sum(((v * a[i]).sum(1) ** 2).sum() + (v ** 4).sum() for i, (v, _) in enumerate(found) if grads[i])

    together = top_right_singular_many(xs, ns, eps=1e-9, solver=solver)
    alone = [top_right_singular(x, n, eps=1e-9, solver=solver) for x, n in zip(xs, ns)]
    trained = [x for x, g in zip(xs, grads) if g]
    g_together = torch.autograd.grad(sign_free(together), trained)
    g_alone = torch.autograd.grad(sign_free(alone), trained)
    for (v, s), (v_ref, s_ref), x, n in zip(together, alone, xs, ns):
        assert v.shape == v_ref.shape == (x.shape[0], x.shape[2], n) and s.grad_fn is None
        assert (v.grad_fn is not None) == x.requires_grad
        if solver == "eigh":
            assert torch.equal(v, v_ref) and torch.equal(s, s_ref)
        else:  # the same vectors up to sign, to the subspace iteration's tolerance
            torch.testing.assert_close((v * v_ref).sum(1).abs().detach(), torch.ones(x.shape[0], n,
                                                                                     dtype=torch.float64))
            torch.testing.assert_close(s, s_ref, rtol=1e-9, atol=0)
    for g, g_ref in zip(g_together, g_alone):
        torch.testing.assert_close(g, g_ref, rtol=1e-7, atol=1e-9)
    if solver == "subspace":  # all sizes in one iteration (one Rayleigh-Ritz eigh: one synchronisation on CUDA)
        assert calls[0] == (sum(x.shape[0] for x in xs), 48, 48)


def test_full_spectrum_problems_of_several_sizes_in_one_padded_eigh_are_each_solved_alone(monkeypatch):
    """As on CUDA (PAD_EIGH_DEVICES): full-spectrum problems of several sizes (<= 32 rows; X^T X and X X^T, teacher
    rows without a gradient, one with a channel that is all zero - an exact zero eigenvalue tied with the padding's)
    in one eigh call, the smaller zero-padded: each one's vectors, values and gradients as solved alone, to float64
    rounding."""
    from rolekd.distill import svd
    from rolekd.distill.svd import top_right_singular_many
    calls, full_eigh = [], svd.full_eigh
    monkeypatch.setattr(svd, "full_eigh", lambda g: calls.append(g.shape) or full_eigh(g))
    torch.manual_seed(7)
    shapes = [(3, 40, 12), (2, 9, 30), (3, 40, 12), (2, 50, 20), (2, 6, 25), (3, 40, 12)]
    ns = [1, 1, 4, 3, 2, 4]
    grads = [False, False, True, True, True, True]
    xs = [torch.randn(*sh, dtype=torch.float64) * torch.linspace(2, 0.05, sh[-1], dtype=torch.float64)
          for sh in shapes]
    xs[5][..., 7] = 0  # a dead channel: G has an exact zero eigenvalue
    xs = [x.requires_grad_(g) for x, g in zip(xs, grads)]
    a = [torch.randn(x.shape[0], x.shape[2], 1, dtype=torch.float64) for x in xs]

    def loss(found):  # invariant to each vector's sign; the rows with a gradient; values too
        return sum(((v * a[i]).sum(1) ** 2).sum() + (v ** 4).sum() for i, (v, _) in enumerate(found) if grads[i])

    monkeypatch.setattr(svd, "PAD_EIGH_DEVICES", {"cpu"})
    together = top_right_singular_many(xs, ns, eps=1e-6)
    assert calls == [(sum(x.shape[0] for x in xs), 20, 20)]  # one call, padded to the largest (20 x 20)
    monkeypatch.setattr(svd, "PAD_EIGH_DEVICES", set())
    alone = [top_right_singular_many([x], [n], eps=1e-6)[0] for x, n in zip(xs, ns)]
    trained = [x for x, g in zip(xs, grads) if g]
    g_together = torch.autograd.grad(loss(together), trained)
    g_alone = torch.autograd.grad(loss(alone), trained)
    for (v, s), (v_ref, s_ref), x, n in zip(together, alone, xs, ns):
        assert v.shape == v_ref.shape == (x.shape[0], x.shape[2], n) and (v.grad_fn is not None) == x.requires_grad
        torch.testing.assert_close((v * v_ref).sum(1).abs().detach(), torch.ones(x.shape[0], n, dtype=torch.float64))
        torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(g_together, g_alone):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-11)
    # above 32 rows (an explicit eigh: on CUDA a loop over the matrices) each size keeps its own call, unpadded
    monkeypatch.setattr(svd, "PAD_EIGH_DEVICES", {"cpu"})
    calls.clear()
    top_right_singular_many([torch.randn(2, 50, 40), torch.randn(2, 9, 30), torch.randn(2, 50, 36)], [2, 2, 2],
                            solver="eigh")
    assert sorted(calls) == [(2, 9, 9), (2, 36, 36), (2, 40, 40)]


def test_on_the_cpu_the_teachers_vectors_come_from_lapack_in_the_students_call(monkeypatch):
    """On the CPU a teacher's Gram matrix (no gradient) of 33-256 rows is solved by LAPACK's eigh in the student's
    call of its size, not by the subspace iteration (hundreds of operators, a host-side check each call): its
    vector is torch.linalg.eigh's top eigenvector of that Gram matrix, to the bit."""
    from rolekd.distill import svd
    from rolekd.distill.svd import canonical_sign, feature_matrix, singular_pairs

    def no_subspace(*a, **k):
        raise AssertionError("the subspace iteration ran on the CPU")
    monkeypatch.setattr(svd, "top_eigh", no_subspace)
    torch.manual_seed(2)
    teacher = {"a": torch.randn(3, 64, 8, 8).relu()}  # a 64 x 64 Gram matrix: the subspace solver's size on CUDA
    student = {"a": torch.randn(3, 64, 8, 8, requires_grad=True)}
    pair, = singular_pairs(student, teacher, k=1, candidates=4)
    x = feature_matrix(teacher["a"])
    _, u = torch.linalg.eigh(x.transpose(-1, -2) @ x)
    assert torch.equal(pair.teacher, canonical_sign(u[..., -1:]))
    assert pair.student.grad_fn is not None


def test_kd_losses_from_singular_vectors_solved_together_equal_the_per_tap_solves_in_float64():
    """singular_pairs solves all taps' problems together; the KD-SVD loss and its gradient on every student map must
    be what the per-tap solves (the code before, written out here) give: float64, where rounding would not hide a
    difference (float32 steps differ by ~1e-7: autograd adds a map's gradients in another order)."""
    from rolekd.distill import svd
    from rolekd.distill.kdsvd import kdsvd_loss_from_pairs
    g = torch.Generator().manual_seed(11)
    shapes = {"a": (6, 8, 16, 16), "b": (6, 16, 8, 8), "c": (6, 48, 4, 4), "d": (6, 64, 2, 2)}
    teacher = {k: torch.randn(*sh, generator=g, dtype=torch.float64) for k, sh in shapes.items()}
    student = {k: (t + 0.3 * torch.randn(t.shape, generator=g, dtype=torch.float64)).requires_grad_(True)
               for k, t in teacher.items()}

    def per_tap(student, teacher, k=1, candidates=4, eps=1e-4):
        pairs = []
        for name in teacher:
            with torch.no_grad():
                v_t, s_t = top_right_singular(feature_matrix(teacher[name]), k, eps)
                v_t = svd.canonical_sign(v_t)
                sigma = s_t / (s_t.norm(dim=-1, keepdim=True) + 1e-12)
            v_s, _ = top_right_singular(feature_matrix(student[name]), candidates, eps)
            pairs.append(svd.SingularPair(name, svd.align_rsv(v_s, v_t), v_t, sigma))
        return pairs

    losses, grads = [], []
    for pairs in (svd.singular_pairs(student, teacher, 1, 4), per_tap(student, teacher)):
        loss = kdsvd_loss_from_pairs(pairs)
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, list(student.values())))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-13, atol=0)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-14)


def test_orthonormalisation_is_shifted_cholesky_qr_twice():
    """The subspace iteration's orthonormalisation (the shift added to the diagonal in place, one bmm a product,
    the factor as U^T U) against shifted Cholesky-QR written out with an identity matrix, as it was: the same
    numbers to float64 rounding (not bit for bit: the shift's and the factor's rounding differ); orthonormal."""
    from rolekd.distill import svd
    z = torch.randn(5, 40, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    z = z * torch.logspace(0, -6, 12, dtype=torch.float64)  # ill-conditioned columns
    ref, eye = z, torch.eye(12, dtype=torch.float64)
    for _ in range(2):
        m = ref.transpose(-1, -2) @ ref
        shift = 1e-13 * m.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-300) / 12
        chol, _ = torch.linalg.cholesky_ex(m + shift[..., None, None] * eye)
        ref = torch.linalg.solve_triangular(chol.transpose(-1, -2), ref, upper=True, left=False)
    q = svd._orthonormalize(z)
    torch.testing.assert_close(q, ref, rtol=0, atol=1e-14)
    torch.testing.assert_close(q.transpose(-1, -2) @ q, eye.expand(5, 12, 12), rtol=0, atol=1e-10)
    one = svd._orthonormalize(z, passes=1)  # the iteration's pass: the same span (projector), not yet orthonormal
    torch.testing.assert_close(one @ torch.linalg.pinv(one), q @ q.transpose(-1, -2), rtol=0, atol=1e-8)
    # a ready shift (the iteration's, made once a call) in the product's baddbmm: the per-pass one's numbers when
    # it is the same matrix (its trace's), and the Rayleigh-Ritz step's constant 1e-13 I on a step's output
    first = z.transpose(-1, -2) @ z
    given = 1e-13 * first.diagonal(dim1=-2, dim2=-1).sum(-1) / 12
    step = svd._orthonormalize(z, passes=1, shift=given[:, None, None] * eye)
    torch.testing.assert_close(step, one, rtol=0, atol=1e-14)
    rr = svd._orthonormalize(step, shift=svd._identity(12, torch.float64, torch.device("cpu"), 1e-13))
    torch.testing.assert_close(rr, svd._orthonormalize(step), rtol=0, atol=1e-13)  # the shift ~ the per-pass one
    torch.testing.assert_close(rr.transpose(-1, -2) @ rr, eye.expand(5, 12, 12), rtol=0, atol=1e-12)
    torch.testing.assert_close(rr @ rr.transpose(-1, -2), q @ q.transpose(-1, -2), rtol=0, atol=1e-8)


def _spd_with_clusters(b, r, seed):
    """(b, r, r) symmetric PSD matrices whose top eigenvalues come in near-equal pairs (gaps ~1e-6 of the largest)
    and separated ones, with random eigenvectors, float64; and their eigenvectors and values."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(b, r, r, generator=g, dtype=torch.float64))
    lam = torch.sort(torch.rand(b, r, generator=g, dtype=torch.float64), descending=True).values
    lam[:, 1] = lam[:, 0] * (1 - 1e-6)  # a near-tie at the top
    lam[:, 2] = lam[:, 0] * 0.5
    return (q * lam.unsqueeze(-2)) @ q.transpose(-1, -2), q, lam


@pytest.mark.parametrize("eps", [1e-4, 1e-9])
def test_the_real_solve_of_the_subspace_backward_is_the_complex_solve_in_float64(eps):
    """``Re[(l_i I - G + i tau I)^-1] b`` by the real block system (the backward since issue 32) against the
    spectral formula ``sum_j v_j d_ij / (d_ij^2 + tau^2) (v_j . b)`` (``d_ij = l_i - l_j``, from the eigenpairs
    the matrices were built from), as accurate as the complex128 LU solve it replaced, with near-ties inside and
    outside tau."""
    from rolekd.distill.svd import _complex_solve, _regularised_solve

    for r, p in ((20, 3), (60, 4)):
        gm, q, lam = _spd_with_clusters(3, r, seed=r)
        tau = eps * lam[:, :1]
        rhs = torch.randn(3, p, r, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        vt = q[..., :p].transpose(-1, -2)  # (B, p, r): v_i as rows

        def off_v(w):  # as the backward: no component along v_i (before and after the solve)
            return w - vt * (vt * w).sum(-1, keepdim=True)
        rhs = off_v(rhs)
        d = lam[:, :p].unsqueeze(-1) - lam.unsqueeze(-2)  # (B, p, r): l_i - l_j
        f = d / (d * d + (tau * tau).unsqueeze(-1))
        exact = ((f * (rhs @ q)).unsqueeze(-2) * q.unsqueeze(-3)).sum(-1)  # sum_j f_ij (b_i . v_j) v_j
        old = off_v(_complex_solve(gm, lam[:, :p], tau, rhs))
        new = off_v(_regularised_solve(gm, lam[:, :p], tau, rhs))
        scale = float(exact.abs().max())
        assert scale > 10 * float(rhs.abs().max())  # the near-tie is in there
        err_old = float((old - exact).abs().max()) / scale
        err_new = float((new - exact).abs().max()) / scale
        # float64 rounding times the condition number (1 / eps) bounds both
        assert err_new <= max(4 * err_old, 1e-12), (err_new, err_old)
        assert err_new <= 1e-15 / eps * 100, (err_new, eps)


def test_the_block_system_made_from_its_common_part_is_the_four_blocks_put_together():
    """_regularised_solve makes each system as ``[[-G, -tau I], [tau I, -G]] + l_i I`` (the common part once): the
    same matrix and solution, to the bit in float64, as the blocks ``a_i = l_i I - G`` and ``tau I`` concatenated
    (the construction before, written out here)."""
    from rolekd.distill.svd import _regularised_solve

    def four_blocks(g, lam, tau, rhs):
        r = g.shape[-1]
        eye = torch.eye(r, dtype=g.dtype)
        a = lam[..., None, None] * eye - g.unsqueeze(-3)
        t = (tau[..., None, None] * eye).expand_as(a)
        block = torch.cat([torch.cat([a, -t], -1), torch.cat([t, a], -1)], -2)
        b = torch.cat([rhs, torch.zeros_like(rhs)], -1).unsqueeze(-1)
        return torch.linalg.solve_ex(block, b, check_errors=False)[0][..., :r, 0]

    for r, p in ((16, 4), (20, 3), (64, 4)):
        gm, _, lam = _spd_with_clusters(3, r, seed=r)
        for eps in (1e-4, 1e-9):
            tau = eps * lam[:, :1] + 1e-30
            rhs = torch.randn(3, p, r, dtype=torch.float64, generator=torch.Generator().manual_seed(r))
            assert torch.equal(_regularised_solve(gm, lam[:, :p], tau, rhs), four_blocks(gm, lam[:, :p], tau, rhs))


def test_fixed_iteration_subspace_runs_the_known_count_and_a_failed_check_raises_it(monkeypatch):
    """The CUDA policy (forced on the CPU here): the first call of a shape checks convergence and records its
    iterations, later calls run that count without a check, every CHECK_EVERY-th call checks again and raises the
    count when the input needs more; results equal the checked solver's within its tolerance."""
    import rolekd.distill.svd as svd

    monkeypatch.setattr(svd, "FIXED_ITERATION_DEVICES", {"cpu"})
    monkeypatch.setattr(svd, "CHECK_EVERY", 3)
    monkeypatch.setattr(svd, "_ITERATIONS", {})
    r, p = 48, 2
    # an easy matrix (well separated top eigenvalues) first, then hard ones (top gap 2%: slow convergence)
    g = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(2, r, r, generator=g, dtype=torch.float64))

    def with_top(top):
        lam = torch.linspace(0.3, 0.01, r, dtype=torch.float64).expand(2, r).clone()
        lam[:, :len(top)] = torch.tensor(top, dtype=torch.float64)
        return (q * lam.unsqueeze(-2)) @ q.transpose(-1, -2)

    # a block of q = p + SUBSPACE_EXTRA vectors converges at (l_{q+1} / l_2)^2 per iteration: 0.6 (easy), 0.9 (hard)
    q_block = p + svd.SUBSPACE_EXTRA
    easy = with_top([1.0, 0.5])
    hard = with_top([1.0, 0.95] + torch.linspace(0.94, 0.855, q_block).tolist())

    def residual(gm, lam, v):
        return float((torch.linalg.vector_norm(gm @ v - v * lam.unsqueeze(-2), dim=-2) / lam[:, :1]).max())

    lam, v = svd.top_eigh(easy, p, solver="subspace")
    (key, (n_easy, calls)), = svd._ITERATIONS.items()
    assert calls == 0 and residual(easy, lam, v) <= 1e-10
    # calls 1, 2: the known count, no check -- a hard matrix is then not converged as tightly
    lam, v = svd.top_eigh(hard, p, solver="subspace")
    loose = residual(hard, lam, v)
    assert svd._ITERATIONS[key] == (n_easy, 1)
    svd.top_eigh(hard, p, solver="subspace")
    # call 3 (the 3rd since the first): checked -> iterates to convergence and raises the count
    lam, v = svd.top_eigh(hard, p, solver="subspace")
    n_hard = svd._ITERATIONS[key][0]
    assert n_hard > n_easy and residual(hard, lam, v) <= 1e-10 < loose
    # from then on the raised count: the hard matrix converges without a check
    lam, v = svd.top_eigh(hard, p, solver="subspace")
    assert svd._ITERATIONS[key][0] == n_hard and residual(hard, lam, v) <= 1e-10
    # the checked solver (the CPU policy) gives the same pairs
    monkeypatch.setattr(svd, "FIXED_ITERATION_DEVICES", set())
    lam_ref, v_ref = svd.top_eigh(hard, p, solver="subspace")
    torch.testing.assert_close(lam, lam_ref, rtol=1e-9, atol=0)
    torch.testing.assert_close((v * v_ref).sum(-2).abs(), torch.ones(2, p, dtype=torch.float64), rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------- kd-svd
def random_feats(rng, n=4, dims=((4, 6, 6), (8, 3, 3), (12, 2, 2))):
    return [np.abs(rng.normal(size=(n,) + d)) + rng.uniform(0, 0.3, size=(n,) + d) for d in dims]


def test_kdsvd_gradient_matches_finite_differences_and_reaches_only_student():
    rng = np.random.default_rng(4)
    fs = [torch.from_numpy(v).requires_grad_(True) for v in random_feats(rng, n=2, dims=((3, 2, 3), (5, 1, 2)))]
    ft = [torch.from_numpy(v).requires_grad_(True) for v in random_feats(rng, n=2, dims=((3, 2, 3), (5, 1, 2)))]

    def f(a, b):
        return kdsvd_loss({"x": a, "y": b}, {"x": ft[0], "y": ft[1]}, eps=1e-9)

    assert torch.autograd.gradcheck(f, tuple(fs), eps=1e-6, atol=1e-6, rtol=1e-4)
    f(*fs).backward()
    assert all(t.grad is None for t in ft) and all(s.grad.abs().sum() > 0 for s in fs)


def test_fused_relation_gap_matches_autograd_of_the_expression():
    from rolekd.distill.kdsvd import rbf_relation, relation_gap

    torch.manual_seed(11)
    v = torch.randn(3, 7, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, 2, dtype=torch.float64, requires_grad=True)
    target = torch.rand(3, 7, 5, 2, dtype=torch.float64)
    fused = relation_gap(v, w, target, sigma=2.0)
    gv, gw = torch.autograd.grad(3.0 * fused, (v, w))
    ref = ((rbf_relation(v, w, 2.0) - target) ** 2).sum()  # summed over the batch too, as upstream
    rv, rw = torch.autograd.grad(3.0 * ref, (v, w))
    torch.testing.assert_close(fused, ref)
    torch.testing.assert_close(gv, rv)
    torch.testing.assert_close(gw, rw)


def test_kdsvd_zero_when_student_equals_teacher():
    rng = np.random.default_rng(5)
    ft = {k: torch.from_numpy(v).float() for k, v in zip("abc", random_feats(rng))}
    assert float(create_distiller("kdsvd")(Outputs(None, ft), Outputs(None, ft), None)) == pytest.approx(0, abs=1e-9)


def degenerate_maps(n, c, h, w):
    """(name, (n, c, h, w) tensor) with zero, constant, rank-one and repeated singular values."""
    hw = h * w
    x = torch.zeros(hw, c)
    r = min(hw, c)
    x[torch.arange(r), torch.arange(r)] = 2.0  # all singular values equal
    rep = x.t().reshape(c, h, w).expand(n, c, h, w).clone()
    rank1 = torch.outer(torch.ones(hw), torch.arange(1.0, c + 1)).t().reshape(c, h, w).expand(n, c, h, w).clone()
    return [("zero", torch.zeros(n, c, h, w)), ("const", torch.full((n, c, h, w), 0.7)),
            ("repeated", rep), ("rank1", rank1)]


@pytest.mark.parametrize("solver", ["eigh", "subspace"])
def test_top_right_singular_finite_on_degenerate_matrices_with_both_solvers(solver):
    """40 channels: large enough for the subspace solver (block of 4 + 16 < 40)."""
    n, hw, c = 2, 8 * 8, 40
    for name, f in degenerate_maps(n, c, 8, 8):
        x = feature_matrix(f).clone().requires_grad_(True)
        v, s = top_right_singular(x, 4, solver=solver)
        (v.sum() + (v ** 2 * torch.arange(1.0, 5.0)).sum()).backward()
        assert torch.isfinite(v).all() and torch.isfinite(s).all(), name
        assert torch.isfinite(x.grad).all(), name


@pytest.mark.parametrize("method", ["kdsvd", "mhgd", "iikd"])
def test_no_nan_gradient_on_degenerate_feature_maps(method):
    torch.manual_seed(6)
    dims = [(4, 6, 6), (8, 3, 3), (16, 2, 2)]  # tall, tall, wide
    d = create_distiller(method)
    if method != "kdsvd":
        (d.mhgd if method == "iikd" else d).build([c for c, _, _ in dims])
        (d.mhgd if method == "iikd" else d).freeze()
    teacher_rand = {f"t{i}": torch.rand(4, *dm) for i, dm in enumerate(dims)}
    cases = list(zip(*[degenerate_maps(4, *dm) for dm in dims]))
    for case in cases:
        name = case[0][0]
        for teacher in (teacher_rand, {f"t{i}": case[i][1] for i in range(3)}):
            feats = {f"t{i}": case[i][1].clone().requires_grad_(True) for i in range(3)}
            logits = torch.zeros(4, 5, requires_grad=True)  # all equal: II-KD's RKD term on the logits
            loss = d(Outputs(logits, feats), Outputs(torch.zeros(4, 5), teacher), None)
            loss.backward()
            assert torch.isfinite(loss), name
            for f in feats.values():
                assert f.grad is not None and torch.isfinite(f.grad).all(), name
            if method == "iikd":
                assert torch.isfinite(logits.grad).all()


def test_kdsvd_refuses_mismatched_taps():
    a = {"x": torch.rand(2, 4, 3, 3), "y": torch.rand(2, 8, 2, 2)}
    with pytest.raises(UserError, match="channels"):
        kdsvd_loss(a, {"x": torch.rand(2, 4, 3, 3), "y": torch.rand(2, 6, 2, 2)})
    with pytest.raises(UserError, match="no feature tap"):
        kdsvd_loss({"x": a["x"]}, a)


# ----------------------------------------------------------------------------- mhgd
def test_mhgd_requires_prepare_and_prepare_trains_then_freezes(batch):
    x, _ = batch
    torch.manual_seed(8)
    teacher = TinyNet().train()
    m = create_distiller("mhgd", heads=2, prepare_epochs=4, prepare_lr=0.05)
    feats = {"s1": torch.rand(2, 4, 8, 8), "s2": torch.rand(2, 8, 4, 4), "s3": torch.rand(2, 16, 2, 2)}
    with pytest.raises(UserError, match="prepare"):
        m(Outputs(None, feats), Outputs(None, feats), None)
    t_state = copy.deepcopy(teacher.state_dict())
    m.prepare(teacher, [x[:6], (x[6:], None)])
    assert m.is_prepared and m.channels.tolist() == [4, 8, 16]
    assert len(m.prepare_history) == 4 and m.prepare_history[-1] < 0.8 * m.prepare_history[0]
    assert teacher.training  # mode restored
    for k, v in teacher.state_dict().items():  # eval-mode taps: not even BN statistics move
        assert torch.equal(v, t_state[k]), k
    assert not any(p.requires_grad for p in m.parameters())
    m.train()
    assert not any(mod.training for mod in m.attention.modules())
    # a fresh instance rebuilt from the state dict gives the same loss
    other = create_distiller("mhgd", heads=2)
    other.load_state_dict(m.state_dict())
    f2 = {k: v + 0.3 * torch.rand_like(v) for k, v in feats.items()}
    assert float(other(Outputs(None, f2), Outputs(None, feats), None)) == pytest.approx(
        float(m(Outputs(None, f2), Outputs(None, feats), None)), rel=1e-6)


def test_mhgd_frozen_graph_folds_batchnorm_into_the_keys_and_queries_and_refolds_after_a_change():
    """The frozen attention network's graphs in evaluation mode (the KD loss) come from linear maps with the
    BatchNorm folded in: the definition's numbers (linear, BatchNorm with running statistics, per-head product)
    in float64 to rounding, made again when a weight or statistic changes in place, is replaced or is loaded."""
    from rolekd.distill import GraphAttention

    def definition(att, v_cur, v_prev):
        b, d, h = len(v_cur), att.dim, att.heads
        parts = []
        for (lin, bn), v in ((att.key, v_cur), (att.query, v_prev)):
            z = F.batch_norm(v @ lin.weight.T, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
            parts.append(z.view(b, d, h))
        return torch.einsum("idh,jdh->hij", *parts)

    def randomised(seed):
        torch.manual_seed(seed)
        att = GraphAttention(12, 8, heads=3)
        for bn in (att.key[1], att.query[1]):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.01, 0.5)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.2, 0.2)
        return att.double().eval().requires_grad_(False)

    att = randomised(0)
    v_cur, v_prev = torch.randn(5, 12, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    torch.testing.assert_close(att.graph(v_cur, v_prev), definition(att, v_cur, v_prev), rtol=1e-12, atol=1e-13)
    assert "_fold" in att.__dict__  # the folded path ran
    swap = att.query[0].weight  # .data replaced: the same object, perhaps the same version, new storage
    for change in (lambda: att.key[1].running_var.mul_(3.0), lambda: att.query[0].weight.add_(0.1),
                   lambda: att.load_state_dict(randomised(1).state_dict()), lambda: setattr(swap, "data", swap * 2)):
        before = att.graph(v_cur, v_prev)
        change()
        got = att.graph(v_cur, v_prev)
        torch.testing.assert_close(got, definition(att, v_cur, v_prev), rtol=1e-12, atol=1e-13)
        assert not torch.allclose(got, before)
    att = att.float()  # replaced tensors
    torch.testing.assert_close(att.graph(v_cur.float(), v_prev.float()), definition(att, v_cur.float(), v_prev.float()),
                               rtol=1e-5, atol=1e-6)
    # a gradient reaches the vectors (the student's) the same way as through the definition
    v = v_cur.clone().requires_grad_(True)
    w = torch.randn(3, 5, 5, dtype=torch.float64)
    att = att.double()
    g, = torch.autograd.grad((att.graph(v, v_prev) * w).sum(), v)
    g_ref, = torch.autograd.grad((definition(att, v, v_prev) * w).sum(), v)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-13)


# ----------------------------------------------------------------------------- objective
def test_lam_schedule():
    obj = KDObjective(TinyNet(), create_distiller("soft"))
    assert [obj.lam_at(e) for e in (0, 59, 60, 119, 120, 199)] == pytest.approx([0.4, 0.4, 0.2, 0.2, 0.1, 0.05])
    obj = KDObjective(TinyNet(), create_distiller("soft"), lam=1.0, lam_decay=0.1, lam_decay_every=10)
    assert obj.lam_at(25) == pytest.approx(0.01)
    obj = KDObjective(TinyNet(), create_distiller("soft"), lam_milestones=[0.3, 0.6, 0.8], lam_gamma=0.6)
    got = [obj.lam_at(e, 100) for e in (0, 29, 30, 59, 60, 79, 80, 99)]
    assert got == pytest.approx([0.4, 0.4, 0.24, 0.24, 0.144, 0.144, 0.0864, 0.0864])
    with pytest.raises(UserError):
        KDObjective(TinyNet(), create_distiller("soft"), lam_milestones=[1.5])


@pytest.mark.parametrize("method", ["soft", "rkd", "kdsvd", "mhgd", "iikd"])
def test_objective_trains_only_the_student(method, batch):
    x, y = batch
    torch.manual_seed(10)
    teacher, student = TinyNet(), TinyNet()
    obj = build_kd_objective(method, teacher, prepare_epochs=1) if method in ("mhgd", "iikd") else \
        build_kd_objective(method, teacher)
    obj.setup(student, CPU)
    obj.prepare([x[:6], x[6:]])
    t_state = copy.deepcopy(teacher.state_dict())
    student.train()
    logits, metrics = obj.train_step(student, x, y, ctx())
    assert set(metrics) >= {"loss", "task_loss", "kd_loss", "lam"}
    assert float(metrics["lam"]) == pytest.approx(0.4)
    assert float(metrics["kd_loss"]) > 0
    assert float(metrics["loss"]) == pytest.approx(float(metrics["task_loss"]) + 0.4 * float(metrics["kd_loss"]),
                                                   rel=1e-5)
    assert logits.shape == (12, 5) and not logits.requires_grad
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, t_state[k]), k
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert obj.extra_parameters() == []
    assert all(p.grad is None for p in obj.distiller.parameters())


def _reference_grads(student, teacher, x, y, lam):
    """Task and λ·RKD gradients of a copy of the student, computed directly."""
    emb = {}
    student.fc.register_forward_pre_hook(lambda m, i: emb.__setitem__("s", i[0]))
    teacher.fc.register_forward_pre_hook(lambda m, i: emb.__setitem__("t", i[0]))
    with torch.no_grad():
        teacher.eval()(x)
    logits = student(x)
    task = F.cross_entropy(logits, y)
    kd = lam * rkd_loss(emb["s"], emb["t"])
    params = list(student.parameters())
    g_task = torch.autograd.grad(task, params, retain_graph=True)
    g_kd = torch.autograd.grad(kd, params, allow_unused=True)  # the classifier does not affect RKD
    return g_task, [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_kd)]


@pytest.mark.parametrize("lam,epoch,e0", [(50.0, 0, 0.0), (1e-4, 3, 0.0), (5.0, 2, 1.5)])
def test_kd_gradient_clipping_rule(lam, epoch, e0, batch):
    x, y = batch
    torch.manual_seed(11)
    teacher, student = TinyNet(), TinyNet()
    ref_t, ref_s = copy.deepcopy(teacher), copy.deepcopy(student).train()
    obj = KDObjective(teacher, create_distiller("rkd"), lam=lam, lam_decay=1.0, clip_kd_grad=True, clip_e0=e0)
    obj.setup(student, CPU)
    student.train()
    obj.train_step(student, x, y, ctx(epoch))
    g_task, g_kd = _reference_grads(ref_s, ref_t, x, y, lam)
    factor = 1 / (1 + math.exp(-(epoch - e0)))
    clipped = 0
    for p, gt, gk in zip(student.parameters(), g_task, g_kd):
        bound = gt.norm() * factor
        assert (p.grad - gt).norm() <= bound * (1 + 1e-4) + 1e-6 * gt.norm()
        scale = min(1.0, float(bound / gk.norm())) if gk.norm() > 0 else 1.0
        clipped += scale < 1
        assert_close_to_scale(p.grad, gt + gk * scale, gt, gk * scale)
    if lam >= 5:
        assert clipped > 0
    else:
        assert clipped == 0  # small KD gradients pass unchanged: grad = task + λ·KD


def test_unclipped_objective_is_one_backward_of_task_plus_lam_kd(batch):
    x, y = batch
    torch.manual_seed(12)
    teacher, student = TinyNet(), TinyNet()
    ref_t, ref_s = copy.deepcopy(teacher), copy.deepcopy(student).train()
    obj = KDObjective(teacher, create_distiller("rkd"), lam=3.0, clip_kd_grad=False)
    obj.setup(student, CPU)
    student.train()
    obj.train_step(student, x, y, ctx(70))  # λ = 3 * 0.5
    g_task, g_kd = _reference_grads(ref_s, ref_t, x, y, 1.5)
    for p, gt, gk in zip(student.parameters(), g_task, g_kd):
        assert_close_to_scale(p.grad, gt + gk, gt, gk)


def test_dml_updates_both_networks_and_resumes(batch):
    x, y = batch
    torch.manual_seed(13)
    teacher, student = TinyNet(), TinyNet()
    ref_t, ref_s = copy.deepcopy(teacher), copy.deepcopy(student)

    def make(t):
        return build_kd_objective("dml", t, lam=1.0, clip=False,
                                  teacher_optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))

    obj = make(teacher)
    obj.setup(student, CPU)
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    student.train()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    _, metrics = obj.train_step(student, x, y, ctx())
    # the teacher took one SGD step on CE + KL(p_s || p_t) (student detached)
    ref_t.train()
    t_logits, s_logits = ref_t(x), ref_s.train()(x).detach()
    lt = F.cross_entropy(t_logits, y) + F.kl_div(F.log_softmax(t_logits, 1), F.softmax(s_logits, 1),
                                                 reduction="batchmean")
    grads = torch.autograd.grad(lt, list(ref_t.parameters()))
    for p, p0, g in zip(teacher.parameters(), ref_t.parameters(), grads):
        # element by element: rounding of the update itself (relative to the weight) plus the gradient's
        # rounding (relative to its norm, as in assert_close_to_scale)
        step = 0.1 * g
        err = (p.detach() - (p0.detach() - step)).abs()
        assert (err <= 1e-6 * p0.detach().abs() + 1e-5 * step.norm()).all(), float(err.max())
        assert p.grad is None
    # the student's gradient is CE + KL(p_t || p_s) with the teacher's pre-update prediction
    ls = F.cross_entropy(ref_s(x), y) + F.kl_div(F.log_softmax(ref_s(x), 1), F.softmax(t_logits.detach(), 1),
                                                 reduction="batchmean")
    for p, g in zip(student.parameters(), torch.autograd.grad(ls, list(ref_s.parameters()))):
        assert_close_to_scale(p.grad, g)
    s_before = [p.detach().clone() for p in student.parameters()]
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(s_before, student.parameters()))
    # state: teacher weights and its optimizer (momentum) resume exactly
    state = copy.deepcopy(obj.state_dict())
    assert "teacher" in state and state["teacher_optimizer"]["state"]
    twin_t = TinyNet()
    obj2 = make(twin_t)
    obj2.load_state_dict(state)
    obj2.setup(student, CPU)
    s2 = copy.deepcopy(student)
    obj.train_step(student, x, y, ctx(1))
    obj2.train_step(s2, x, y, ctx(1))
    for a, b in zip(teacher.parameters(), twin_t.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_dml_teacher_optimizer_mirrors_student(batch):
    x, y = batch
    teacher, student = TinyNet(), TinyNet()
    obj = build_kd_objective("dml", teacher)
    obj.setup(student, CPU)
    with pytest.raises(RuntimeError, match="teacher_optimizer"):
        obj.train_step(student, x, y, ctx())
    s_opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.8, weight_decay=1e-3, nesterov=True)
    obj.bind_optimizer(s_opt)  # the trainer's hook
    obj.train_step(student, x, y, ctx())
    t_opt = obj._teacher_optim()
    assert type(t_opt) is torch.optim.SGD
    g = t_opt.param_groups[0]
    assert (g["lr"], g["momentum"], g["weight_decay"], g["nesterov"]) == (0.05, 0.8, 1e-3, True)
    s_opt.param_groups[0]["lr"] = 0.005  # the trainer's LR schedule
    obj.train_step(student, x, y, ctx(1))
    assert t_opt.param_groups[0]["lr"] == pytest.approx(0.005)


def test_objective_state_dict_restores_mhgd_attention(batch):
    x, y = batch
    torch.manual_seed(14)
    teacher, student = TinyNet(), TinyNet()
    obj = build_kd_objective("iikd", teacher, prepare_epochs=2, heads=2)
    assert obj.needs_prepare
    obj.setup(student, CPU)
    obj.prepare([x[:6], x[6:]])
    assert not obj.needs_prepare
    state = copy.deepcopy(obj.state_dict())
    obj2 = build_kd_objective("iikd", copy.deepcopy(teacher), heads=2)
    obj2.load_state_dict(state)
    assert not obj2.needs_prepare
    s1, s2 = copy.deepcopy(student).eval(), copy.deepcopy(student).eval()
    _, m1 = obj.train_step(s1, x, y, ctx())
    _, m2 = obj2.train_step(s2, x, y, ctx())
    assert float(m1["kd_mhgd"]) == pytest.approx(float(m2["kd_mhgd"]), rel=1e-6)
    assert float(m1["kd_loss"]) == pytest.approx(float(m2["kd_loss"]), rel=1e-6)


def test_quantized_student_from_model_zoo_distils(batch):
    from rolekd.models import create
    from rolekd.quant import quantize_model

    teacher = create("resnet_tiny", num_classes=5)

    torch.manual_seed(15)
    x = torch.randn(8, 3, 32, 32)
    y = torch.randint(0, 5, (8,))
    student = quantize_model(teacher, 2, 2)
    student.load_state_dict(teacher.state_dict(), strict=True)
    obj = build_kd_objective("iikd", teacher, prepare_epochs=1)
    obj.setup(student, CPU)
    obj.prepare([x])
    student.train()
    _, metrics = obj.train_step(student, x, y, ctx())
    assert all(torch.isfinite(v) for v in metrics.values())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    with FeatureTaps(student) as taps:
        assert list(taps(x).features) == list(teacher.kd_taps)


# ----------------------------------------------------------------------------- different widths: the adapter
def _conv1x1(f, m):
    return torch.einsum("oc,bchw->bohw", m, f)


@pytest.mark.parametrize("method", ["kdsvd", "mhgd", "iikd"])
def test_adapter_bridges_widths_and_vanishes_when_it_maps_the_student_onto_the_teacher(method):
    """A teacher whose maps are a fixed channel mixing M of the student's (wider: 6/10/8 vs 3/5/4
    channels): with the adapter set to M the adapted student equals the teacher, so the KD loss is 0;
    from the adapter's own initialisation it is not, and the gradient reaches both the student's
    features and the adapter."""
    torch.manual_seed(16)
    dims = [(3, 6, 6), (5, 3, 3), (4, 2, 2)]
    wide = [6, 10, 8]
    s_feats = {f"t{i}": torch.rand(4, *d, dtype=torch.float64) + 0.1 for i, d in enumerate(dims)}
    mix = {k: torch.randn(c, f.shape[1], dtype=torch.float64) for (k, f), c in zip(s_feats.items(), wide)}
    t_feats = {k: _conv1x1(f, mix[k]) for k, f in s_feats.items()}
    d = create_distiller(method, **({"heads": 2} if method != "kdsvd" else {}))
    if method != "kdsvd":
        m = d.mhgd if method == "iikd" else d
        m.build(wide)
        m.freeze()
    logits = torch.randn(4, 5, dtype=torch.float64)
    s_out, t_out = Outputs(logits, s_feats), Outputs(logits, t_feats)
    assert d.build_adapters(s_out, t_out)
    d.double()
    adapter = d.adapter
    assert sorted((k, tuple(w.shape)) for k, w in adapter.maps.items()) == \
        sorted((k, (c, f.shape[1])) for (k, f), c in zip(s_feats.items(), wide))
    feats = {k: v.clone().requires_grad_(True) for k, v in s_feats.items()}
    loss = d(Outputs(logits, feats), t_out, None)
    assert float(loss.detach()) > 1e-6
    loss.backward()
    assert all(float(f.grad.abs().sum()) > 0 for f in feats.values())
    assert all(w.grad is not None and float(w.grad.abs().sum()) > 0 for w in adapter.maps.values())
    with torch.no_grad():
        for k, w in adapter.maps.items():
            w.copy_(mix[k])
    assert float(d(s_out, t_out, None).detach()) == pytest.approx(0.0, abs=1e-9)
    # a fresh instance restores the adapter from the state dict
    other = create_distiller(method, **({"heads": 2} if method != "kdsvd" else {}))
    other.load_state_dict(d.state_dict())
    other.double()
    for k, w in adapter.maps.items():
        assert torch.equal(other.adapter.maps[k], w)
    assert float(other(s_out, t_out, None).detach()) == pytest.approx(0.0, abs=1e-9)


def test_objective_builds_the_adapter_from_a_probe_before_the_optimizer(batch):
    x, y = batch
    torch.manual_seed(17)
    teacher, student = TinyNet(w=8), TinyNet(w=4)
    # without a probe, unequal widths are one clear error
    obj = build_kd_objective("kdsvd", copy.deepcopy(teacher))
    obj.setup(student, CPU)
    assert obj.extra_parameters() == []
    with pytest.raises(UserError, match="adapter"):
        obj.train_step(student, x, y, ctx())
    student.zero_grad(set_to_none=True)
    obj = build_kd_objective("iikd", teacher, probe=x[:2], prepare_epochs=1, heads=2)
    obj.prepare([x[:6], x[6:]])
    student.train()
    bn_before = {k: v.clone() for k, v in list(student.state_dict().items()) + [
        ("t." + k, v) for k, v in teacher.state_dict().items()] if "running" in k}
    obj.setup(student, CPU)
    assert student.training
    extra = obj.extra_parameters()
    assert sorted(tuple(p.shape) for p in extra) == [(8, 4), (16, 8), (32, 16)]
    after = dict(student.state_dict(), **{"t." + k: v for k, v in teacher.state_dict().items()})
    for k, v in bn_before.items():  # the probe ran in eval mode: no BatchNorm statistics moved
        assert torch.equal(after[k], v), k
    opt = torch.optim.SGD(list(student.parameters()) + extra, lr=0.1)
    _, metrics = obj.train_step(student, x, y, ctx())
    assert torch.isfinite(metrics["kd_loss"]) and float(metrics["kd_loss"]) > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and float(p.grad.abs().sum()) > 0 for p in extra)
    before = [p.detach().clone() for p in extra]
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, extra))
    # a resumed objective (no probe) gets the adapter back from the state dict and gives the same loss
    obj2 = build_kd_objective("iikd", copy.deepcopy(teacher), heads=2)
    obj2.load_state_dict(copy.deepcopy(obj.state_dict()))
    s1, s2 = copy.deepcopy(student).eval(), copy.deepcopy(student).eval()
    _, m1 = obj.train_step(s1, x, y, ctx())
    _, m2 = obj2.train_step(s2, x, y, ctx())
    assert float(m1["kd_loss"]) == pytest.approx(float(m2["kd_loss"]), rel=1e-6)


WIDTHS_DATA = register_noise_dataset("distill-widths-noise", 64, 32, seed=5)


def test_distill_command_between_networks_of_different_widths(tmp_path):
    """`rolekd distill` of a WRN-10-1 student (16/32/64 channels) from a WRN-10-2 teacher (32/64/128):
    II-KD runs through the channel adapter, which trains with the student and is saved in the checkpoint;
    KD gradient clipping follows the method (kd.clip unset) and kd.clip_lam is read."""
    common = [f"dataset={WIDTHS_DATA}", "batch_size=32", "train.eval_batch_size=32", "augment.cutout=0",
              "train.progress=false", "train.device=cpu", "epochs=1"]
    assert main(["train", *common, "model=wrn_10_2", f"out={tmp_path / 'teacher'}"]) == 0
    assert main(["distill", *common, "model=wrn_10_1", f"teacher={tmp_path / 'teacher'}", "method=iikd",
                 "kd.prepare_epochs=1", "kd.clip_lam=authors", f"out={tmp_path / 'student'}"]) == 0
    state = load_state(tmp_path / "student" / "checkpoint" / "state.pt")
    maps = {k: tuple(v.shape) for k, v in state["objective"]["distiller"].items() if k.startswith("adapter.maps.")}
    assert maps == {"adapter.maps.stage1": (32, 16), "adapter.maps.stage2": (64, 32), "adapter.maps.stage3": (128, 64)}
    init = build_kd_objective("iikd", create_wrn("wrn_10_2"), probe=torch.zeros(2, 3, 32, 32))
    init.setup(create_wrn("wrn_10_1"), CPU)  # the adapter's fixed initialisation
    for k, w in init.distiller.adapter.maps.items():  # it trained
        assert not torch.equal(state["objective"]["distiller"][f"adapter.maps.{k}"], w.detach())
    rows = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(math.isfinite(r["train_kd_loss"]) and r["train_kd_loss"] > 0 for r in rows)
    assert main(["distill", *common, "model=wrn_10_1", f"teacher={tmp_path / 'teacher'}", "method=iikd",
                 "kd.clip_lam=sometimes", f"out={tmp_path / 'bad'}"]) == 2
    # the config reaches the objective: clipping as the method declares unless kd.clip says otherwise,
    # kd.clip_lam, and the adapter's parameters in the trainer's optimizer
    base = [*common, "model=wrn_10_1", f"kd.teacher={tmp_path / 'teacher'}", "kd.prepare_epochs=0"]
    with Session() as session:
        for extra, clips, lam_mode in [(["kd.method=kdsvd", "kd.clip_lam=authors"], True, "authors"),
                                       (["kd.method=rkd"], False, "paper"),
                                       (["kd.method=rkd", "kd.clip=true"], True, "paper"),
                                       (["kd.method=kdsvd", "kd.clip=false"], False, "paper")]:
            trainer = build_trainer(load_config(None, base + extra), session)
            obj = trainer.objective
            assert (obj.clip_kd_grad, obj.clip_lam) == (clips, lam_mode), extra
            in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
            adapted = list(obj.distiller.adapter.maps.values()) if hasattr(obj.distiller, "adapter") else []
            assert len(adapted) == (3 if "kd.method=kdsvd" in extra else 0)
            assert all(id(p) in in_opt for p in adapted)
            obj.close()


def create_wrn(name):
    return create(name, num_classes=10)
