"""Relational KD (Park, Kim, Lu, Cho, "Relational Knowledge Distillation", CVPR 2019), as the TensorFlow
code this project follows computes it (``sseung0703/KD_methods_with_TF`` ``nets/Relation.py::RKD``, the
same function in ``bigaidream-projects/role-kd`` ``pba/kd/nets/Relation.py``; definitions read from
them, code our own).

Both networks' vectors of a batch are l2-normalised (``tf.nn.l2_normalize``: ``x / sqrt(max(|x|^2,
1e-12))``), then compared through two potentials:

* distance-wise: ``d_ij = sqrt(max(|x_i|^2 + |x_j|^2 - 2 <x_i, x_j>, 1e-12))`` divided by
  ``mu + 1e-8``, where ``mu`` is the sum of all ``d_ij`` over the number of positive ones — every
  entry is positive after the clamp, so ``mu`` is the mean over all ``B^2`` entries, the diagonal's
  ``1e-6`` included (Park et al.'s PyTorch code averages over the off-diagonal pairs only: a factor
  ``(B - 1) / B`` on ``mu``);
* angle-wise: ``A[i, j, k] = <n(x_j - x_i), n(x_k - x_i)>`` with ``n`` the same l2 normalisation
  (0 for a zero difference);

each compared with the Huber loss (``0.5 d^2`` for ``|d| <= 1``, ``|d| - 0.5`` above) averaged over all
entries (``B^2`` and ``B^3``), weighted ``w_dist`` and ``w_angle``.

What is compared: the RKD *baseline* (``rkd``) uses the pre-logit pooled embedding with weights 25 / 50
(``KD_methods_with_TF``: ``Relation.RKD(fcs, fct, l=[25, 50])``); II-KD's RKD term uses the **logits**
with weights 50 / 100 (role-kd ``ResNet.py``: ``Relation.RKD(logits, logits_tch, l=[5e1, 1e2])``, the
paper's Eq. 5 "including the final logits layer"). ``kd.options={on: logits, w_dist: 50, w_angle: 100}``
gives the role-kd authors' own RKD baseline. RKD's reference code adds ``λ·KD`` unclipped.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..errors import UserError
from .base import Distiller, as_float, register

_SOURCES = ("embedding", "logits")


def l2_normalize(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``tf.nn.l2_normalize``: ``x / sqrt(max(sum x^2, 1e-12))`` along ``dim``."""
    return x * torch.rsqrt((x * x).sum(dim, keepdim=True).clamp_min(1e-12))


@functools.cache
def _eye(n: int, device: torch.device) -> torch.Tensor:
    """The ``n x n`` boolean identity on ``device``, made once."""
    return torch.eye(n, dtype=torch.bool, device=device)


def _distance_potential(e: torch.Tensor) -> torch.Tensor:
    sq = (e * e).sum(1)
    d2 = sq.unsqueeze(0) + sq.unsqueeze(1) - 2 * e @ e.t()
    # the diagonal is exactly max(0, 1e-12) in exact arithmetic; fix it there instead of rounding noise
    d = d2.masked_fill(_eye(e.shape[0], e.device), 0.0).clamp_min(1e-12).sqrt()
    # every entry is >= 1e-6 after the clamp: "the positive ones" are all B^2 (a NaN's mean is NaN either way)
    mu = d.sum() / d.numel()
    return d / (mu + 1e-8)


def _angle_potential(e: torch.Tensor) -> torch.Tensor:
    diff = l2_normalize(e.unsqueeze(0) - e.unsqueeze(1), 2)  # diff[i, j] = n(e_j - e_i)
    return torch.bmm(diff, diff.transpose(1, 2))  # [i, j, k] = <n(e_j - e_i), n(e_k - e_i)>; one operator


def rkd_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, w_dist: float = 25.0, w_angle: float = 50.0,
             l2_normalize_inputs: bool = True) -> torch.Tensor:
    """``w_dist * Huber(psi_D(s), psi_D(t)) + w_angle * Huber(psi_A(s), psi_A(t))`` (means over entries) of
    the batch's vectors, l2-normalised first unless ``l2_normalize_inputs=False``."""
    s = as_float(student_emb).flatten(1)
    t = as_float(teacher_emb.detach() if teacher_emb.requires_grad else teacher_emb).flatten(1)
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"rkd: batch sizes differ ({s.shape[0]} vs {t.shape[0]})")
    if l2_normalize_inputs:
        s, t = l2_normalize(s, 1), l2_normalize(t, 1)
    terms = []
    if w_dist:
        with torch.no_grad():
            pt = _distance_potential(t)
        terms.append(w_dist * F.smooth_l1_loss(_distance_potential(s), pt, reduction="mean", beta=1.0))
    if w_angle:
        with torch.no_grad():
            at = _angle_potential(t)
        terms.append(w_angle * F.smooth_l1_loss(_angle_potential(s), at, reduction="mean", beta=1.0))
    if not terms:
        return s.new_zeros(())
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]


@register("rkd")
class RelationalKD(Distiller):
    """RKD on the pre-logit embeddings (``on="embedding"``, distance 25 + angle 50) or the logits."""

    def __init__(self, w_dist: float = 25.0, w_angle: float = 50.0, l2_normalize: bool = True,
                 on: str = "embedding"):
        super().__init__()
        if on not in _SOURCES:
            raise UserError(f"rkd: on={on!r} must be one of {', '.join(_SOURCES)}")
        self.w_dist, self.w_angle, self.l2_normalize, self.on = float(w_dist), float(w_angle), bool(l2_normalize), on
        self.needs_embedding = on == "embedding"

    def forward(self, student, teacher, labels):
        if self.on == "logits":
            return rkd_loss(student.logits, teacher.logits, self.w_dist, self.w_angle, self.l2_normalize)
        if student.embedding is None or teacher.embedding is None:
            raise UserError("rkd needs pre-logit embeddings: the models must declare kd_embedding")
        return rkd_loss(student.embedding, teacher.embedding, self.w_dist, self.w_angle, self.l2_normalize)

    def extra_repr(self) -> str:
        return f"on={self.on}, w_dist={self.w_dist}, w_angle={self.w_angle}, l2_normalize={self.l2_normalize}"
