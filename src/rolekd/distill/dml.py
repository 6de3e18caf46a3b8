"""Deep mutual learning (Zhang, Xiang, Hospedales, Lu, "Deep Mutual Learning", CVPR 2018).

Both networks learn: the student from ``CE + KL(p_t || p_s)`` and the teacher (starting from its
checkpoint) from ``CE + KL(p_s || p_t)``, each against the other's *detached* prediction. This module
gives both losses; :class:`~rolekd.distill.objective.KDObjective` runs the teacher in train mode and
steps its own optimizer inside ``train_step``. The two networks are updated from the same forward pass
(simultaneously), not one after the other as in the paper's Algorithm 1 — one forward per network per
step instead of three. No gradient clipping. (The TensorFlow code of the role-wise KD and KD-SVD authors
adds the symmetric average ``(KL(p_t || p_s) + KL(p_s || p_t)) / 2`` to both losses, with gradients
through both arguments; see docs/FIDELITY.md.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Distiller, as_float, register
from .soft import soft_label_loss


def mutual_kl(logits: torch.Tensor, other_logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """``T^2 KL(softmax(other/T) || softmax(logits/T))``, batch mean; ``other`` is detached (the soft-label
    loss with the other network as teacher, T = 1 by default as in DML)."""
    return soft_label_loss(logits, other_logits, T)


@register("dml")
class DeepMutualLearning(Distiller):
    """DML: the student's KD loss is ``KL(p_t || p_s)``; :meth:`teacher_loss` is the teacher's loss."""

    trains_teacher = True

    def __init__(self, T: float = 1.0):
        super().__init__()
        self.T = float(T)

    def forward(self, student, teacher, labels):
        return mutual_kl(student.logits, teacher.logits, self.T)

    def teacher_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                     weight: float = 1.0) -> torch.Tensor:
        """The teacher's DML loss ``CE(t, y) + weight * KL(p_s || p_t)`` (student detached)."""
        return F.cross_entropy(as_float(teacher_logits), labels) + weight * mutual_kl(teacher_logits, student_logits,
                                                                                    self.T)
