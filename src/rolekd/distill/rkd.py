"""Relational KD (Park, Kim, Lu, Cho, "Relational Knowledge Distillation", CVPR 2019).

On the pre-logit embeddings of a batch: the distance-wise potential (pairwise Euclidean distances
divided by their mean over the off-diagonal pairs) and the angle-wise potential (cosine of the angle at
``j`` in every triplet ``(i, j, k)``), each compared with the Huber (smooth-L1, ``beta = 1``) loss
averaged over all entries, weighted 25 (distance) and 50 (angle). The embeddings are used as they are
(``l2_normalize=True`` l2-normalises them first, as the KD_methods_with_TF re-implementation does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UserError
from .base import Distiller, as_float, register


def _distance_potential(e: torch.Tensor) -> torch.Tensor:
    sq = (e * e).sum(1)
    d2 = (sq.unsqueeze(0) + sq.unsqueeze(1) - 2 * e @ e.t()).clamp_min(1e-12)
    off = 1.0 - torch.eye(e.shape[0], device=e.device, dtype=e.dtype)
    d = d2.sqrt() * off  # exact zeros on the diagonal
    mean = d.sum() / off.sum().clamp_min(1)
    return d / (mean + 1e-12)


def _angle_potential(e: torch.Tensor) -> torch.Tensor:
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # diff[j, i] = e_i - e_j
    return diff @ diff.transpose(1, 2)  # [j, i, k] = cos of angle (e_i, e_j, e_k)


def rkd_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, w_dist: float = 25.0, w_angle: float = 50.0,
             l2_normalize: bool = False) -> torch.Tensor:
    """``w_dist * Huber(psi_D(s), psi_D(t)) + w_angle * Huber(psi_A(s), psi_A(t))`` (means over entries)."""
    s = as_float(student_emb).flatten(1)
    t = as_float(teacher_emb.detach()).flatten(1)
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"rkd: batch sizes differ ({s.shape[0]} vs {t.shape[0]})")
    if l2_normalize:
        s, t = F.normalize(s, dim=1), F.normalize(t, dim=1)
    loss = s.new_zeros(())
    if w_dist:
        with torch.no_grad():
            pt = _distance_potential(t)
        loss = loss + w_dist * F.smooth_l1_loss(_distance_potential(s), pt, reduction="mean")
    if w_angle:
        with torch.no_grad():
            at = _angle_potential(t)
        loss = loss + w_angle * F.smooth_l1_loss(_angle_potential(s), at, reduction="mean")
    return loss


@register("rkd")
class RelationalKD(Distiller):
    """RKD on the pre-logit embeddings (distance 25 + angle 50)."""

    needs_embedding = True

    def __init__(self, w_dist: float = 25.0, w_angle: float = 50.0, l2_normalize: bool = False):
        super().__init__()
        self.w_dist, self.w_angle, self.l2_normalize = float(w_dist), float(w_angle), bool(l2_normalize)

    def forward(self, student, teacher, labels):
        if student.embedding is None or teacher.embedding is None:
            raise UserError("rkd needs pre-logit embeddings: the models must declare kd_embedding")
        return rkd_loss(student.embedding, teacher.embedding, self.w_dist, self.w_angle, self.l2_normalize)

    def extra_repr(self) -> str:
        return f"w_dist={self.w_dist}, w_angle={self.w_angle}, l2_normalize={self.l2_normalize}"
