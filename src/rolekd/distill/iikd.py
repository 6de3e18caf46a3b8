"""II-KD, the role-wise KD paper's combined loss (Fu et al., "Role-Wise Data Augmentation for Knowledge
Distillation", arXiv:2004.08861, eq. 10): ``L_rkd + L_mhgd + L_kdsvd`` with one λ, as the authors' code
builds it (``bigaidream-projects/role-kd`` ``pba/kd/nets/ResNet.py``, ``Distill == 'MHGD-RKD-SVD'``):

* ``L_rkd``: RKD on the l2-normalised **logits**, weights 50 (distance) / 100 (angle) —
  ``Relation.RKD(logits, logits_tch, l=[5e1, 1e2])``, the paper's Eq. 5 "including the final logits
  layer" (the RKD *baseline* uses the pooled embedding with 25 / 50, see :mod:`rolekd.distill.rkd`);
* ``L_mhgd``: multi-head graph distillation on the feature taps (batch-summed, :mod:`rolekd.distill.mhgd`);
* ``L_kdsvd``: KD-SVD on the feature taps (batch-summed, :mod:`rolekd.distill.kdsvd`).

:class:`~rolekd.distill.objective.KDObjective` multiplies the sum by λ, adds the task loss and, as the
authors' ``Optimizer_w_Distillation`` does for ``MHGD-RKD-SVD``, clips the KD gradient
(``IIKD.clip_kd_grad = True``). The singular vectors are computed once per step and shared by the MHGD
and KD-SVD terms when both use ``k = 1`` and the same candidates; one channel adapter serves both when
the student's tap widths differ from the teacher's.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .adapter import ChannelAdapter
from .base import Distiller, register
from .kdsvd import KDSVD
from .mhgd import MHGD
from .rkd import RelationalKD


@register("iikd")
class IIKD(Distiller):
    """RKD (logits) + MHGD + KD-SVD (feature taps); :meth:`prepare` trains MHGD's attention."""

    needs_features = True
    needs_embedding = False
    needs_prepare = True
    clip_kd_grad = True

    def __init__(self, w_dist: float = 50.0, w_angle: float = 100.0, rkd_on: str = "logits", k: int = 1,
                 candidates: int = 4, sigma: float = 8.0, heads: int = 8, prepare_epochs: int = 40,
                 prepare_lr: float = 0.1, prepare_momentum: float = 0.9, prepare_weight_decay: float = 5e-4,
                 eps: float = 1e-4):
        super().__init__()
        self.rkd = RelationalKD(w_dist=w_dist, w_angle=w_angle, l2_normalize=True, on=rkd_on)
        self.needs_embedding = self.rkd.needs_embedding
        self.mhgd = MHGD(heads=heads, candidates=candidates, prepare_epochs=prepare_epochs, prepare_lr=prepare_lr,
                         prepare_momentum=prepare_momentum, prepare_weight_decay=prepare_weight_decay, eps=eps)
        self.kdsvd = KDSVD(k=k, candidates=max(candidates, k), sigma=sigma, eps=eps)
        self.adapter = ChannelAdapter()
        self._terms: dict[str, torch.Tensor] = {}

    @property
    def is_prepared(self) -> bool:
        return self.mhgd.is_prepared

    def prepare(self, teacher_model: nn.Module, batches: Iterable[torch.Tensor], epochs: int | None = None) -> None:
        self.mhgd.prepare(teacher_model, batches, epochs)

    def forward(self, student, teacher, labels):
        l_rkd = self.rkd(student, teacher, labels)
        feats = self.adapter(student.features)
        pairs = self.mhgd.pairs_from(feats, teacher.features)
        l_mhgd = self.mhgd.loss_from_pairs(pairs)
        shared = self.kdsvd.k == 1 and self.kdsvd.candidates == self.mhgd.candidates
        l_svd = self.kdsvd.loss_from_pairs(pairs if shared else self.kdsvd.pairs_from(feats, teacher.features))
        self._terms = {"rkd": l_rkd.detach(), "mhgd": l_mhgd.detach(), "kdsvd": l_svd.detach()}
        return l_rkd + l_mhgd + l_svd

    def terms(self) -> dict[str, torch.Tensor]:
        return dict(self._terms)
