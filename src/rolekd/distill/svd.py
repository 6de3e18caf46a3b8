"""Singular vectors of feature maps for KD-SVD and MHGD: a guarded, differentiable truncated SVD.

Both methods compress a feature map ``(B, C, H, W)`` into the leading *right* singular vectors of its
per-sample ``(HW x C)`` matrix, i.e. vectors in the channel space (``C``). References (definitions read
from them, code our own):

* Lee, Kim, Song, "Self-supervised knowledge distillation using singular value decomposition", ECCV
  2018, and its TensorFlow code (``sseung0703/KD_methods_with_TF``: ``nets/SVP.py``,
  ``nets/Distillation.py``; ``sseung0703/Knowledge_distillation_via_TF2.0``: ``distiller/SVD.py``,
  ``nets/SVP.py``).

What we take from upstream:

* the vectors come from the eigen-decomposition of the smaller Gram matrix (their "EID" variant:
  ``X^T X`` when ``HW >= C``, else ``X X^T`` and ``v = X^T u / s``), with a custom backward whose
  ``1 / (s_j^2 - s_i^2)`` factors are made safe (upstream replaces infinities by 0);
* the teacher keeps its top ``k`` vectors (``k = 1`` upstream), the student its top ``k + 3``, and each
  teacher vector is matched by the student vector of largest ``|cosine|`` whose sign is then flipped to
  agree (``Align_rsv``);
* spatial sizes never need to agree: the right singular vectors live in the channel space, so maps of
  different ``H x W`` (consecutive layers, or a student with another resolution) are compared as
  channel vectors without pooling or resizing. Teacher and student must have the *same channel count*
  at each tap (upstream uses the same widths); for unequal widths the methods first map the student's
  map to the teacher's width with :class:`~rolekd.distill.adapter.ChannelAdapter`, and
  :func:`check_taps` raises :class:`~rolekd.errors.UserError` for a mismatch no adapter bridges.

How we compute it (our own): the derivative of an eigenvector, ``dv_i = (l_i I - G)^+ dG v_i``, is
regularised to ``d / (d^2 + tau^2)`` per eigen-direction (``d = l_i - l_j``, ``tau = eps * l_max``):
``~1/d`` for separated eigenvalues, 0 for equal ones. Two solvers compute the same thing:

* ``eigh``: the full spectrum by ``torch.linalg.eigh`` (float32, or float64 for float64 input); the
  backward is then a few small float64 matrix products in that eigenbasis;
* ``subspace``: only the top few eigenpairs, by batched subspace iteration + Rayleigh-Ritz; the
  backward applies ``Re[(l_i I - G + i tau I)^-1]`` by one complex128 solve per vector, with no full
  spectrum.

``auto`` takes ``eigh`` for Gram matrices up to 32 x 32, and on the CPU (LAPACK) up to 256 x 256 (the
student's vectors: 6-7x faster than ``subspace`` forward + backward there, bench_eigen_solvers.py; the
teacher's, without a gradient, ride in the student's call of the same size: a few operators instead of a
subspace iteration's hundreds and its host-side convergence checks, at the same CPU step speed); ``subspace``
otherwise - CUDA above 32 x 32, where ``eigh`` loops over the batch (it made a ResNet18 KD-SVD step ~20x
slower than plain training).

Guards (no NaN/Inf ever reaches the weights): float32 or better, autocast off, ``1/s`` regularised by
``eps * s_max``, a right vector whose singular value is 0 is the zero vector, non-finite backward
entries are zeroed. Teacher vectors get a canonical sign (entries sum ``>= 0``; upstream's sign is
whatever LAPACK returns), students are aligned to them.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch

from ..errors import UserError
from .adapter import channels

def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def feature_matrix(f: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, HW, C)`` float32 (``(B, C)`` -> ``(B, 1, C)``), any memory format."""
    if f.dim() == 4:
        b, c, h, w = f.shape
        return _f32(f).permute(0, 2, 3, 1).reshape(b, h * w, c)
    if f.dim() == 2:
        return _f32(f).unsqueeze(1)
    if f.dim() == 3:
        return _f32(f)
    raise ValueError(f"expected a (B, C, H, W) or (B, C) feature tensor, got shape {tuple(f.shape)}")


_EIGH_SMALL = 32  # the full eigh up to this size everywhere (CUDA: batched Jacobi)
_EIGH_MAX = 256  # and, off CUDA (LAPACK), up to this size
SOLVERS = ("auto", "eigh", "subspace")
# the subspace block: the wanted pairs and 16 more (8 before: about twice the iterations - and operators - on
# ResNet18's and WRN's taps and on mild or flat spectra, for about the same arithmetic; RESULTS.md, issue 32)
SUBSPACE_EXTRA = 16


def _solver(g: torch.Tensor, p: int, solver: str) -> str:
    """The solver ``auto`` picks for ``g`` (B, r, r) and ``p`` wanted pairs (see the module docstring)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    r = g.shape[-1]
    if p + SUBSPACE_EXTRA >= r:  # a subspace block as large as the matrix: nothing to gain
        return "eigh"
    if solver != "auto":
        return solver
    limit = _EIGH_SMALL if g.device.type == "cuda" else _EIGH_MAX
    return "eigh" if r <= limit else "subspace"


_START: dict[tuple, torch.Tensor] = {}

# On these devices the subspace iteration runs a known number of iterations without a convergence check (each
# check reads the residual on the host: on CUDA a synchronisation per call); every CHECK_EVERY-th call of a given
# shape checks as before and raises the known count when it did not converge. On the CPU every call checks (a
# result that depends on the call history would break bit-identical resumes).
FIXED_ITERATION_DEVICES = {"cuda"}
CHECK_EVERY = 32
_ITERATIONS: dict[tuple, tuple[int, int]] = {}  # key -> (iterations, calls so far)
# On these devices top_right_singular_many runs all its subspace problems in one iteration (the smaller matrices
# zero-padded to the largest: a shared iteration count and one Rayleigh-Ritz eigh, i.e. one synchronisation on CUDA
# instead of one per size; the same vectors to the solver's tolerance); elsewhere each alone (the same bits as one
# call each). The full-spectrum problems of one size are solved together everywhere (the same bits either way).
GROUP_SUBSPACE_DEVICES = {"cuda"}
# On these devices the full-spectrum problems of up to _EIGH_SMALL rows are solved in one eigh call (the smaller
# zero-padded to the largest: one synchronisation on CUDA instead of one per size; the same vectors and gradients to
# float rounding); elsewhere, and for larger ones, one call per size (LAPACK solves each matrix alone: the same bits as
# one call each).
PAD_EIGH_DEVICES = {"cuda"}


def _start_block(r: int, q: int, like: torch.Tensor) -> torch.Tensor:
    """A fixed (seeded) random ``(r, q)`` start block, so results do not depend on the global RNG."""
    key = (r, q, like.device, like.dtype)
    if key not in _START:
        g = torch.Generator().manual_seed(1234 + r * 31 + q)
        _START[key] = torch.randn(r, q, generator=g, dtype=torch.float64).to(device=like.device, dtype=like.dtype)
    return _START[key]


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b``: for two (B, n, m) tensors one ``bmm`` operator (the kernel ``@`` runs, without its five view
    operators around it), else ``@``."""
    return torch.bmm(a, b) if a.dim() == 3 and b.dim() == 3 else a @ b


def _orthonormalize(z: torch.Tensor, passes: int = 2, shift: torch.Tensor | None = None) -> torch.Tensor:
    """Orthonormal columns spanning ``z`` (B, r, q) by shifted Cholesky-QR, ``passes`` times (twice: orthonormal
    to float64 rounding; batched, fast on CUDA where ``torch.linalg.qr`` loops over the batch). Directions ``z``
    lacks shrink to zero. Inside the subspace iteration one pass a step is enough (the basis only has to stay
    well conditioned there: the same iteration counts and residuals as two, measured on ResNet18 taps and on
    steep, repeated, rank-3 and spiked spectra); the Rayleigh-Ritz step gets two.

    ``Z^T Z + shift I`` is made by adding the shift to the diagonal in place (no identity and its products) and
    factored as ``U^T U`` (no transpose): 9 operators a pass (19 with the identity). ``shift``: a ready ``shift I``
    ((B, q, q) or (q, q)) of the right scale instead (the subspace iteration's, made once a call): ``Z^T Z + shift I``
    in one ``baddbmm``, 4 operators a pass."""
    for _ in range(passes):
        if shift is not None:
            m = torch.baddbmm(shift, z.transpose(-1, -2), z)
        else:
            m = _mm(z.transpose(-1, -2), z)
            diag = m.diagonal(dim1=-2, dim2=-1)
            diag.add_(diag.sum(-1, keepdim=True).clamp_min_(1e-300).mul_(1e-13 / m.shape[-1]))
        u, _ = torch.linalg.cholesky_ex(m, upper=True)  # Z^T Z + shift I = U^T U
        z = torch.linalg.solve_triangular(u, z, upper=True, left=False)  # Z U^-1
    return z


@functools.cache
def _identity(q: int, dtype: torch.dtype, device: torch.device, scale: float = 1.0) -> torch.Tensor:
    """``scale * I`` (q, q), made once per size, dtype, device and scale."""
    return torch.eye(q, dtype=dtype, device=device) * scale


def full_eigh(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All eigenpairs of symmetric ``g`` (B, r, r), values descending: ``(B, r), (B, r, r)``, in float32
    for float32 input (1.6x faster than float64 on the CPU) and float64 for float64 input."""
    with torch.no_grad(), torch.autocast(device_type=g.device.type, enabled=False):
        lam, v = torch.linalg.eigh(_f32(g))
        return lam.flip(-1), v.flip(-1)


def top_eigh(g: torch.Tensor, p: int, max_iter: int | None = None, tol: float | None = None,
             solver: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``p`` eigenpairs ``(values (B, p) descending, vectors (B, r, p))`` of symmetric PSD ``g``.

    ``solver="eigh"`` takes them from :func:`full_eigh`. ``"subspace"`` runs batched subspace iteration
    on ``g^2`` with a block of ``p + 16`` vectors (Cholesky-QR re-orthonormalisation, float64
    arithmetic), then a Rayleigh-Ritz step on ``g``, until every wanted Ritz pair has a residual below
    ``tol * lambda_max`` (default 1e-5 for float32 input, 1e-11 for float64; checked every 4 iterations)
    or ``max_iter`` iterations (default 60, 400). ``"auto"`` picks per device and size (module
    docstring). No gradient (see :class:`_TopEigh`).
    """
    r = g.shape[-1]
    p = min(p, r)
    f64 = g.dtype == torch.float64
    tol = (1e-11 if f64 else 1e-5) if tol is None else tol
    max_iter = (400 if f64 else 60) if max_iter is None else max_iter
    with torch.no_grad(), torch.autocast(device_type=g.device.type, enabled=False):
        q = min(r, p + SUBSPACE_EXTRA)
        if _solver(g, p, solver) == "eigh":
            lam, v = full_eigh(g)
            return lam[..., :p].clamp_min(0).to(g.dtype), v[..., :p].to(g.dtype)
        dtype = g.dtype
        g = g.double()
        scale = g.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-300)[..., None, None]
        gn = g / scale  # eigenvalues in [0, 1]
        g2 = _mm(gn, gn)
        basis = _orthonormalize(_mm(gn, _start_block(r, q, g).expand(*g.shape[:-2], r, q)), passes=1)
        # the steps' shift, made once a call: 1e-13 ||G2||_F^2 / q, never below what the per-pass shift takes for
        # Z = G2 B with B orthonormal (trace(Z^T Z) <= ||G2||_F^2), never above 1e-13 r / q of Z^T Z's top eigenvalue
        step_scale = g2.square().sum((-2, -1)).clamp_min_(1e-300).mul_(1e-13 / q)
        step_shift = _identity(q, g.dtype, g.device) * step_scale[..., None, None]
        rr_shift = _identity(q, g.dtype, g.device, 1e-13)  # (q, q), for every matrix of the batch
        key = (tuple(g.shape[:-2]), r, q, dtype, g.device, tol, max_iter)
        known = _ITERATIONS.get(key) if g.device.type in FIXED_ITERATION_DEVICES else None
        check = known is None or known[1] % CHECK_EVERY == CHECK_EVERY - 1
        it = 0
        while True:
            for _ in range(4):
                basis = _orthonormalize(_mm(g2, basis), passes=1, shift=step_shift)
            it += 4
            if not check and it < known[0]:
                continue  # the known count, no convergence check (no host-device synchronisation)
            # exactly orthonormal for the Rayleigh-Ritz step; its columns have norm ~1 already (the step's pass), so
            # the per-pass shift 1e-13 trace(Z^T Z) / q is ~1e-13: taken as that, made once
            basis = _orthonormalize(basis, shift=rr_shift)
            theta, w = torch.linalg.eigh(_mm(_mm(basis.transpose(-1, -2), gn), basis))
            theta, w = theta.flip(-1)[..., :p], w.flip(-1)[..., :p]
            v = _mm(basis, w)
            if not check:
                break
            resid = torch.linalg.vector_norm(_mm(gn, v) - v * theta.unsqueeze(-2), dim=-2)  # (B, p)
            if it >= max_iter or float(resid.max()) <= tol * max(float(theta[..., 0].max()), 1e-30):
                break
        if g.device.type in FIXED_ITERATION_DEVICES:
            # a check raises the known count to what converged (never lowers it); the calls between checks use it
            count = max(it, known[0]) if known is not None and check else (it if known is None else known[0])
            _ITERATIONS[key] = (count, 0 if known is None else known[1] + 1)
        return (theta * scale[..., 0]).clamp_min(0).to(dtype), v.to(dtype)


class _TopEigh(torch.autograd.Function):
    """Top eigenpairs of symmetric PSD matrices with a regularised, NaN-free backward.

    For an eigenvector ``v_i`` (value ``l_i``) the exact derivative is ``dv_i = (l_i I - G)^+ dG v_i``.
    We apply ``(l_i I - G) ((l_i I - G)^2 + tau^2 I)^-1`` instead: per eigen-direction ``j`` this is
    ``d / (d^2 + tau^2)`` with ``d = l_i - l_j``, i.e. ``1/d`` for separated values and 0 for equal
    ones; ``tau = eps * l_max``. With the full spectrum (solver ``eigh``) it is applied in the
    eigenbasis; without it (``subspace``) as ``Re[(l_i I - G + i tau I)^-1]``, one complex128 solve.

    ``apply(p, eps, solver, ns, *grams)``: the matrices ``grams`` (each (B_i, r_i, r_i)) solved in one
    batched call for ``p`` pairs, the ones that need no gradient (the teacher's) first; returns each matrix's
    vectors ``(B_i, r_i, ns[i])``, then each one's values ``(B_i, ns[i])``. Matrices of several sizes are zero-padded
    to the largest (the padding adds only zero eigenvalues; a padded matrix's vectors have zeros in its rows, cut off):
    the full spectrum's backward runs padded (small matrices only: ``PAD_EIGH_DEVICES``), the subspace iteration's
    once per size, unpadded. A matrix's outputs are its own (split and cut inside this node: no split, cut or
    concatenation nodes of autograd around it, and no detach of the gradient-free ones, which come out
    non-differentiable); the backward works on the rows with a gradient only and returns none for the others.
    """

    @staticmethod
    def forward(ctx, p: int, eps: float, solver: str, ns: tuple[int, ...], *grams: torch.Tensor):
        live = ctx.needs_input_grad[4:]
        frozen = sum(g.shape[0] for g, need in zip(grams, live) if not need)
        ctx.eps, ctx.live = eps, live
        ctx.sizes = [g.shape[0] for g, need in zip(grams, live) if need]
        ctx.set_materialize_grads(False)  # an unused output's gradient comes as None: no work on zeros
        rs = [g.shape[-1] for g in grams]
        r = max(rs)
        ctx.rs = [n for n, need in zip(rs, live) if need]  # sizes of the rows with a gradient (sorted by the caller)
        if len(grams) == 1:
            g = grams[0]
        else:  # matrices of several sizes zero-padded to the largest
            g = torch.cat([x if x.shape[-1] == r else torch.nn.functional.pad(x, (0, r - x.shape[-1]) * 2)
                           for x in grams])
        if _solver(g, p, solver) == "eigh":
            lam_all, v_all = full_eigh(g)
            p = min(p, g.shape[-1])
            lam, v = lam_all[..., :p].clamp_min(0).to(g.dtype), v_all[..., :p].to(g.dtype)
            if frozen < g.shape[0]:
                ctx.save_for_backward(*((lam_all, v_all) if not frozen else (lam_all[frozen:], v_all[frozen:])))
            ctx.spectral = True
        else:
            lam, v = top_eigh(g, p, solver="subspace")
            if frozen < g.shape[0]:
                ctx.save_for_backward(*((g, lam, v) if not frozen else (g[frozen:], lam[frozen:], v[frozen:])))
            ctx.spectral = False
        ctx.p = v.shape[-1]
        sizes = [x.shape[0] for x in grams]
        us = (v,) if len(grams) == 1 else v.split(sizes)
        lams = (lam,) if len(grams) == 1 else lam.split(sizes)
        us = [u if n == u.shape[-1] else u[..., :n] for u, n in zip(us, ns)]  # fewer vectors than the group's p
        us = [u if n == r else u[..., :n, :] for u, n in zip(us, rs)]  # a padded matrix's rows
        lams = [lm if n == lm.shape[-1] else lm[..., :n] for lm, n in zip(lams, ns)]
        ctx.mark_non_differentiable(*(t for ts in (us, lams) for t, need in zip(ts, live) if not need))
        return (*us, *lams)

    @staticmethod
    def backward(ctx, *grads):
        m = len(ctx.live)
        g_us = [g for g, need in zip(grads[:m], ctx.live) if need]
        g_lams = [g for g, need in zip(grads[m:], ctx.live) if need]
        saved = ctx.saved_tensors
        if ctx.spectral:  # one backward for all sizes, padded (<= 32 rows on CUDA: little arithmetic)
            r = max(ctx.rs)
            g_v, g_lam = _joined(g_us, ctx.sizes, ctx.p, r), _joined(g_lams, ctx.sizes, ctx.p)
            if g_v is None and g_lam is None:
                return (None,) * (4 + m)
            grad = _spectral_backward(*saved, ctx.eps, g_v, g_lam)
            parts = iter((grad,) if len(ctx.sizes) == 1 else grad.split(ctx.sizes))
            cut = (x if n == r else x[..., :n, :n] for x, n in zip(parts, ctx.rs))  # a padded matrix's own block
            return (None,) * 4 + tuple(next(cut) if need else None for need in ctx.live)
        out, row, one_size = [], 0, len(set(ctx.rs)) == 1
        # the subspace backward once per size, unpadded (padded: ~8x a solve's arithmetic); a size's rows consecutive
        for n, run in itertools.groupby(range(len(ctx.rs)), key=ctx.rs.__getitem__):
            run = list(run)
            lo, hi = run[0], run[-1] + 1
            sizes = ctx.sizes[lo:hi]
            g_v, g_lam = _joined(g_us[lo:hi], sizes, ctx.p), _joined(g_lams[lo:hi], sizes, ctx.p)
            rows = sum(sizes)
            if g_v is None and g_lam is None:
                out += [None] * (hi - lo)
            else:
                g, lam, v = saved if one_size else [t[row:row + rows] for t in saved]
                if g.shape[-1] != n:  # a padded size's own rows and columns
                    g, v = g[..., :n, :n], v[..., :n, :]
                grad = _subspace_backward(g, lam, v, ctx.eps, g_v, g_lam)
                out += [grad] if hi - lo == 1 else grad.split(sizes)
            row += rows
        parts = iter(out)
        return (None,) * 4 + tuple(next(parts) if need else None for need in ctx.live)


def _joined(gs: list, sizes: list[int], k: int, rows: int | None = None) -> torch.Tensor | None:
    """The gradients ``gs`` of the rows with a gradient (None: unused) as one batch of ``k`` columns (the group's
    pairs: zeros for a missing gradient and for the columns a matrix wanting fewer pairs lacks) and, given ``rows``,
    that many rows (zeros below a smaller matrix's vectors); None if all are None."""
    if all(g is None for g in gs):
        return None
    like = next(g for g in gs if g is not None)
    full = []
    for g, size in zip(gs, sizes):
        if g is None:
            g = like.new_zeros((size, *like.shape[1:-2], rows, k) if rows else (size, *like.shape[1:-1], k))
        elif g.shape[-1] < k or (rows and g.shape[-2] < rows):
            g = torch.nn.functional.pad(g, (0, k - g.shape[-1]) + ((0, rows - g.shape[-2]) if rows else ()))
        full.append(g)
    return full[0] if len(full) == 1 else torch.cat(full)


def _subspace_backward(g, lam, v, eps, g_v, g_lam):
    """The backward of :class:`_TopEigh` without the full spectrum (see its docstring): saved ``g``, ``lam``, ``v``."""
    grad = None
    if g_lam is not None:
        grad = _mm(v * g_lam.unsqueeze(-2), v.transpose(-1, -2))
    if g_v is not None:
        lam = lam.double()
        tau = eps * lam[..., :1] + 1e-30  # (B, 1)
        vt = v.double().transpose(-1, -2)  # (B, p, r): v_i as rows
        gt = g_v.double().transpose(-1, -2)
        # dv_i has no component along v_i: project it out before and after the solve
        rhs = gt - vt * (vt * gt).sum(-1, keepdim=True)
        w = _regularised_solve(g.double(), lam, tau, rhs)  # (B, p, r)
        w = w - vt * (vt * w).sum(-1, keepdim=True)
        w = torch.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0)  # non-finite entries zeroed
        gv = _mm(w.transpose(-1, -2), vt).to(g.dtype)  # sum_i w_i v_i^T
        grad = gv if grad is None else grad + gv
    return grad


@functools.cache
def _block_constants(r: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """For the ``2r x 2r`` block system of :func:`_regularised_solve`: the mask of its two diagonal ``r x r``
    blocks, ``[[0, -I], [I, 0]]`` and the identity; made once per size, dtype and device."""
    eye, two = torch.eye(r, dtype=dtype, device=device), torch.eye(2, dtype=dtype, device=device)
    rot = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=dtype, device=device)
    return (torch.kron(two, torch.ones(r, r, dtype=dtype, device=device)), torch.kron(rot, eye),
            torch.eye(2 * r, dtype=dtype, device=device))


def _regularised_solve(g: torch.Tensor, lam: torch.Tensor, tau: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``w_i = Re[(a_i + i tau I)^-1 b_i]`` with ``a_i = l_i I - G``, for ``g`` (B, r, r), ``lam`` (B, p), ``tau``
    (B, 1), ``rhs`` (B, p, r) rows ``b_i``; float64.

    The complex solve in real arithmetic: ``(a + i tau)(x + i y) = b`` is the real block system
    ``[[a, -tau I], [tau I, a]] [x; y] = [b; 0]``, solved by one batched real LU without the error check's
    synchronisation (``solve_ex``); its condition number is the complex matrix's, ``<= l_max / tau`` (squaring it,
    as ``(a^2 + tau^2 I)^-1 a b`` would, loses float64 precision at small ``eps``). The blocks are made as
    ``[[-G, -tau I], [tau I, -G]] + l_i I``: the part common to a matrix's ``p`` systems once, each system one
    ``addcmul`` (the same entries as the four blocks put together, to the bit; 10 operators instead of 20)."""
    r = g.shape[-1]
    diagonal, rot, eye = _block_constants(r, g.dtype, g.device)
    common = torch.addcmul(tau.unsqueeze(-1) * rot, g.repeat(*(1,) * (g.dim() - 2), 2, 2), diagonal, value=-1)
    block = torch.addcmul(common.unsqueeze(-3), lam.reshape(*lam.shape, 1, 1), eye)  # (B, p, 2r, 2r)
    x, _ = torch.linalg.solve_ex(block, torch.nn.functional.pad(rhs, (0, r)), check_errors=False)  # [b; 0]
    return x[..., :r]


def _complex_solve(g: torch.Tensor, lam: torch.Tensor, tau: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """The same as :func:`_regularised_solve` by one complex128 solve (the previous implementation, kept as the
    reference its tests compare with)."""
    r = g.shape[-1]
    eye = torch.eye(r, dtype=torch.float64, device=g.device)
    a = lam[..., None, None] * eye - g.unsqueeze(-3)
    shifted = torch.complex(a, (tau[..., None, None] * eye).expand_as(a))
    return torch.linalg.solve(shifted, rhs.to(shifted.dtype)).real


def _spectral_backward(lam_all, v_all, eps, g_v, g_lam):
    """The backward of :class:`_TopEigh` from the saved full spectrum (float64): ``sum_i w_i v_i^T`` with
    ``w_i = sum_j v_j d_ij / (d_ij^2 + tau^2) (v_j . g_v_i)``, ``d_ij = l_i - l_j``, plus
    ``V diag(g_lam) V^T`` for the values."""
    lam_all, v_all = lam_all.double(), v_all.double()
    dtype = (g_v if g_v is not None else g_lam).dtype
    p = (g_v if g_v is not None else g_lam).shape[-1]
    v = v_all[..., :p]
    grad = None
    if g_lam is not None:
        grad = _mm(v * g_lam.double().unsqueeze(-2), v.transpose(-1, -2))
    if g_v is not None:
        tau = eps * lam_all[..., :1].clamp_min(0) + 1e-30  # (B, 1)
        d = lam_all[..., :p].unsqueeze(-2) - lam_all.unsqueeze(-1)  # (B, r, p): l_i - l_j
        f = d / (d * d + (tau * tau).unsqueeze(-1))
        coeff = f * _mm(v_all.transpose(-1, -2), g_v.double())  # (B, r, p), row j = direction v_j
        w = _mm(v_all, coeff)  # (B, r, p): w_i as columns
        w = torch.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0)  # non-finite entries zeroed
        gw = _mm(w, v.transpose(-1, -2))
        grad = gw if grad is None else grad + gw
    return grad.to(dtype)


def _gram(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The smaller Gram matrix of ``x`` (B, M, N): ``X^T X`` when ``M >= N``, else ``X X^T`` (then True)."""
    if x.shape[-2] >= x.shape[-1]:
        return _mm(x.transpose(-1, -2), x), False
    return _mm(x, x.transpose(-1, -2)), True


def _right_vectors(x: torch.Tensor, u: torch.Tensor, lam: torch.Tensor, eps: float,
                   left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Right singular vectors and values of ``x`` from the top eigenpairs ``u``, ``lam`` of its Gram matrix: ``u``
    itself for ``X^T X``; for ``X X^T`` (``left``) ``v = X^T u / s`` (zero when ``s`` is). The values carry no
    gradient (made without one: no detach operators)."""
    if not left:
        with torch.no_grad():
            return u, lam.clamp_min(0).sqrt()
    lam0 = lam.clamp_min(0)
    with torch.no_grad():
        lam_max = lam[..., :1]
        shift = lam_max * (eps * eps)
        keep = (lam > 1e-12 * lam_max).to(x.dtype)  # no right vector for a zero singular value
        s = lam0.sqrt()
    inv_s = torch.rsqrt(lam0 + shift + 1e-30)  # 1/s, regularised by eps*s_max
    v = _mm(x.transpose(-1, -2), u) * (inv_s * keep).unsqueeze(-2)
    return v, s


def top_right_singular(x: torch.Tensor, n: int, eps: float = 1e-4,
                       solver: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``n`` right singular vectors ``V`` (B, N, n) and values ``s`` (B, n) of ``x`` (B, M, N).

    ``n`` is capped at ``min(M, N)``. Differentiable in ``x`` through ``V`` (the values carry no
    gradient); the backward pass never produces NaN/Inf, also for zero, rank-deficient or repeated
    singular values (``eps`` sets how near-equal values are regularised, relative to ``s_max^2``).
    ``solver``: ``"auto"``, ``"eigh"`` or ``"subspace"`` (module docstring); all give the same result.
    """
    return top_right_singular_many([x], [n], eps, solver)[0]


def top_right_singular_many(xs: list[torch.Tensor], ns: list[int], eps: float = 1e-4,
                            solver: str = "auto") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`top_right_singular` of each ``(x, n)`` (each ``x`` (B, M, N)), with the eigenproblems of one size
    and solver solved in one batched call: all of a KD step's taps, teacher and student, in a few calls instead
    of two per tap (each a chain of dozens of small operators). A matrix needing no gradient (the teacher's)
    shares a call with ones that do and gets no backward work (its rows go first and come out non-differentiable).

    With the full spectrum (``eigh``) every matrix is solved on its own inside the batch: the same vectors as
    one call each, to the bit (on the devices in ``PAD_EIGH_DEVICES`` (CUDA) the problems of every size up to 32
    rows in one call, the smaller zero-padded: to float rounding). On the devices in ``GROUP_SUBSPACE_DEVICES``
    (CUDA) the subspace iteration also runs all its problems together, of every size (zero-padded to the largest),
    with a shared block (as many vectors as the largest ``n`` asks) until every matrix's wanted pairs meet the
    tolerance: the same vectors to that tolerance (tested against each alone in float64), not to the bit;
    elsewhere each subspace problem is solved alone, as before.
    """
    xs = [x if x.dtype == torch.float64 else x.float() for x in xs]  # float64 kept (for checks), else float32
    ns = [max(1, min(int(n), x.shape[-2], x.shape[-1])) for x, n in zip(xs, ns)]
    grads = [x.requires_grad and torch.is_grad_enabled() for x in xs]
    out: list = [None] * len(xs)
    with torch.autocast(device_type=xs[0].device.type, enabled=False):
        grams = []
        for x, grad in zip(xs, grads):
            with torch.set_grad_enabled(grad):
                grams.append(_gram(x))
        groups: dict[tuple, list[int]] = {}
        for i, ((g, _), n, grad) in enumerate(zip(grams, ns, grads)):
            how = _solver(g, n, solver)
            alone = how == "subspace" and g.device.type not in GROUP_SUBSPACE_DEVICES
            # problems of every size together: the subspace ones, and on PAD_EIGH_DEVICES the small full-spectrum ones
            small = g.device.type in PAD_EIGH_DEVICES and g.shape[-1] <= _EIGH_SMALL
            size = None if how == "subspace" or small else g.shape[1:]
            groups.setdefault((how, size, g.dtype, g.device, i if alone else None), []).append(i)
        for (how, *_), idx in groups.items():
            idx.sort(key=lambda i: (grads[i], grams[i][0].shape[-1]))  # without a gradient first; then by size
            with torch.set_grad_enabled(any(grads[i] for i in idx)):
                found = _TopEigh.apply(max(ns[i] for i in idx), eps, how, tuple(ns[i] for i in idx),
                                       *(grams[i][0] for i in idx))
            for i, ui, li in zip(idx, found[:len(idx)], found[len(idx):]):
                with torch.set_grad_enabled(grads[i]):
                    out[i] = _right_vectors(xs[i], ui, li, eps, grams[i][1])
    return out


def canonical_sign(v: torch.Tensor) -> torch.Tensor:
    """Flip each column of ``v`` (B, N, k) so that its entries sum to ``>= 0``."""
    return torch.where(v.sum(dim=-2, keepdim=True) >= 0, v, -v)


@functools.cache
def _plus_minus_one(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``+1`` and ``-1`` as 0-d tensors, made once per dtype and device (``where``'s Python scalars cost an
    operator each, every call)."""
    return torch.ones((), dtype=dtype, device=device), -torch.ones((), dtype=dtype, device=device)


def align_rsv(v_s: torch.Tensor, v_t: torch.Tensor) -> torch.Tensor:
    """Match each teacher vector with a student vector: ``(B, N, ns), (B, N, nt) -> (B, N, nt)``.

    For teacher column ``j`` the student column with the largest ``|cos|`` is taken and multiplied by
    the sign of that cosine (``+1`` when the cosine is 0), as upstream's ``Align_rsv``.
    """
    with torch.no_grad():  # the choice and its sign carry no gradient (made without one: no detach operators)
        cos = _mm(v_s.transpose(-1, -2), v_t)  # (B, ns, nt)
        idx = cos.abs().argmax(dim=-2).unsqueeze(-2)  # (B, 1, nt)
        sign = torch.where(torch.gather(cos, -2, idx) >= 0, *_plus_minus_one(v_s.dtype, v_s.device))  # (B, 1, nt)
    return torch.gather(v_s, -1, idx.expand(-1, v_s.shape[-2], -1)) * sign


@dataclass
class SingularPair:
    """One tap's compressed knowledge: student vectors aligned to the teacher's (both (B, C, k)) and
    the teacher's top-``k`` singular values, l2-normalised over ``k`` (B, k)."""

    name: str
    student: torch.Tensor
    teacher: torch.Tensor
    teacher_sigma: torch.Tensor


def check_taps(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], method: str) -> list[str]:
    """Names of the taps to compare, in the teacher's order; raise UserError on a mismatch."""
    if not teacher:
        raise UserError(f"{method} needs feature taps: the teacher model declares no kd_taps")
    missing = [k for k in teacher if k not in student]
    if missing:
        raise UserError(f"{method}: the student has no feature tap(s) {missing} that the teacher has; use models "
                        f"with the same kd_taps names")
    for k in teacher:
        cs, ct = channels(student[k]), channels(teacher[k])
        if cs != ct:
            raise UserError(f"{method}: tap {k!r} has {cs} channels in the student and {ct} in the teacher; "
                            f"KD-SVD/MHGD compare channel-space singular vectors and need equal widths or a "
                            f"channel adapter (built by the KD objective from a probe batch: "
                            f"build_kd_objective(..., probe=images); rolekd's commands do this)")
    return list(teacher)


def singular_pairs(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], k: int = 1,
                   candidates: int = 4, eps: float = 1e-4, method: str = "kdsvd") -> list[SingularPair]:
    """Per tap (teacher order): teacher top-``k`` right singular vectors (canonical sign, no gradient),
    student top-``candidates`` vectors aligned to them (gradient flows to the student features)."""
    if k < 1 or candidates < k:
        raise UserError(f"{method}: need 1 <= k <= candidates, got k={k}, candidates={candidates}")
    names = check_taps(student, teacher, method)
    with torch.no_grad():
        xs = [feature_matrix(teacher[name]) for name in names]
    xs += [feature_matrix(student[name]) for name in names]
    found = top_right_singular_many(xs, [k] * len(names) + [candidates] * len(names), eps)
    pairs = []
    for name, (v_t, s_t), (v_s, _) in zip(names, found, found[len(names):]):
        with torch.no_grad():
            v_t = canonical_sign(v_t)
            sigma = s_t / (s_t.norm(dim=-1, keepdim=True) + 1e-12)
        pairs.append(SingularPair(name, align_rsv(v_s, v_t), v_t, sigma))
    return pairs
