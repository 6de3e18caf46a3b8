"""KD-SVD (Lee, Kim, Song, "Self-supervised Knowledge Distillation Using Singular Value Decomposition",
ECCV 2018), after the authors' TensorFlow code (``sseung0703/KD_methods_with_TF``,
``nets/Distillation.py::KD_SVD`` and ``nets/SVP.py``; ``sseung0703/Knowledge_distillation_via_TF2.0``,
``distiller/KDSVD.py``). Read for the definitions; the code here is our own.

Per tapped feature map (shallow to deep), each sample's ``(HW x C)`` matrix is compressed into its
top-``k`` right singular vectors (``k = 1`` as upstream's last version; the student offers ``k + 3``
candidates, aligned to the teacher's vectors by ``|cosine|`` and sign, see :mod:`rolekd.distill.svd`).
Both sets are scaled by the teacher's l2-normalised top-``k`` singular values (1 when ``k = 1``). The
knowledge is the radial-basis relation between consecutive taps' vectors,
``G[d, d', j] = exp(-(v_l[d, j] - v_{l-1}[d', j])^2 / sigma)`` with ``sigma = 8``, and the loss is the
squared difference of the student's and the teacher's ``G``, summed over ``(b, d, d', j)`` — the batch
included, as upstream's ``tf.reduce_sum`` (role-kd ``pba/kd/nets/Shared.py::KD_SVD``) — and over tap
pairs. The loss (and λ's effect) therefore grows with the batch size, as upstream's does.
Maps of different spatial size need no resizing: the vectors live in the channel space; maps of
different *widths* go through a :class:`~rolekd.distill.adapter.ChannelAdapter` first.

Upstream trains with the KD gradient clipped per variable to the norm of the task gradient times
``sigmoid(epoch - 0)`` (``op_util.Optimizer_w_Distillation``); that rule lives in
:class:`~rolekd.distill.objective.KDObjective` (``clip_kd_grad``, ``clip_e0 = 0``), which KD-SVD asks for
(``KDSVD.clip_kd_grad = True``).
"""

from __future__ import annotations

import torch

from ..errors import UserError
from .adapter import ChannelAdapter
from .base import Distiller, register
from .svd import SingularPair, singular_pairs


def rbf_relation(v: torch.Tensor, v_prev: torch.Tensor, sigma: float = 8.0) -> torch.Tensor:
    """``exp(-(v[:, d, j] - v_prev[:, d', j])^2 / sigma)``: (B, C, k), (B, C', k) -> (B, C, C', k)."""
    return torch.exp(-(v.unsqueeze(2) - v_prev.unsqueeze(1)).square() / sigma)


class _RelationGap(torch.autograd.Function):
    """``sum_{b,d,d',j} (rbf_relation(v, v_prev)[b, d, d', j] - target[b, d, d', j])^2`` in one node:
    the (B, C, C', k) intermediates are made in place and the backward is three products and two sums
    (autograd's graph of the same expression costs ~3x more on the CPU)."""

    @staticmethod
    def forward(ctx, v, v_prev, target, sigma: float):
        d = v.unsqueeze(2) - v_prev.unsqueeze(1)
        e = d.square().mul_(-1.0 / sigma).exp_()
        r = e - target
        ctx.save_for_backward(d, e, r)
        ctx.sigma = sigma
        flat = r.flatten()
        return torch.dot(flat, flat)

    @staticmethod
    def backward(ctx, g):
        d, e, r = ctx.saved_tensors
        # d/dd of (e - t)^2 = 2 (e - t) e (-2 d / sigma)
        gd = (r * e).mul_(d).mul_(g * (-4.0 / ctx.sigma))
        return gd.sum(2), -gd.sum(1), None, None


def relation_gap(v: torch.Tensor, v_prev: torch.Tensor, target: torch.Tensor, sigma: float = 8.0) -> torch.Tensor:
    """``((rbf_relation(v, v_prev, sigma) - target) ** 2).sum()``, fused (``target`` carries no gradient)."""
    return _RelationGap.apply(v, v_prev, target.detach() if target.requires_grad else target, float(sigma))


def kdsvd_loss_from_pairs(pairs: list[SingularPair], sigma: float = 8.0) -> torch.Tensor:
    """KD-SVD loss from per-tap aligned singular vectors (see the module docstring)."""
    if len(pairs) < 2:
        raise UserError("kdsvd needs at least two feature taps (it relates consecutive layers)")
    loss = None
    prev = None
    for p in pairs:
        scale = p.teacher_sigma.unsqueeze(1)  # (B, 1, k)
        v_s, v_t = p.student * scale, p.teacher * scale
        if prev is not None:
            with torch.no_grad():
                g_t = rbf_relation(v_t, prev[1], sigma)
            gap = relation_gap(v_s, prev[0], g_t, sigma)
            loss = gap if loss is None else loss + gap
        prev = (v_s, v_t)
    return loss


def kdsvd_loss(student_features: dict[str, torch.Tensor], teacher_features: dict[str, torch.Tensor], k: int = 1,
               candidates: int | None = None, sigma: float = 8.0, eps: float = 1e-4) -> torch.Tensor:
    """KD-SVD loss of two ``{tap: (B, C, H, W)}`` dicts (teacher order; ``candidates`` defaults to ``k + 3``)."""
    pairs = singular_pairs(student_features, teacher_features, k, k + 3 if candidates is None else candidates, eps,
                           method="kdsvd")
    return kdsvd_loss_from_pairs(pairs, sigma)


@register("kdsvd")
class KDSVD(Distiller):
    """KD-SVD on the models' feature taps (a channel adapter for taps of different widths)."""

    needs_features = True
    clip_kd_grad = True

    def __init__(self, k: int = 1, candidates: int | None = None, sigma: float = 8.0, eps: float = 1e-4):
        super().__init__()
        self.k = int(k)
        self.candidates = self.k + 3 if candidates is None else int(candidates)
        if self.k < 1 or self.candidates < self.k:
            raise UserError(f"kdsvd: need 1 <= k <= candidates, got k={k}, candidates={candidates}")
        self.sigma, self.eps = float(sigma), float(eps)
        self.adapter = ChannelAdapter()

    def pairs_from(self, student_features, teacher_features) -> list[SingularPair]:
        """Aligned singular pairs of (already adapted) student features and teacher features."""
        return singular_pairs(student_features, teacher_features, self.k, self.candidates, self.eps, method="kdsvd")

    def pairs(self, student, teacher) -> list[SingularPair]:
        return self.pairs_from(self.adapter(student.features), teacher.features)

    def loss_from_pairs(self, pairs: list[SingularPair]) -> torch.Tensor:
        return kdsvd_loss_from_pairs(pairs, self.sigma)

    def forward(self, student, teacher, labels):
        return self.loss_from_pairs(self.pairs(student, teacher))

    def extra_repr(self) -> str:
        return f"k={self.k}, candidates={self.candidates}, sigma={self.sigma}"
