"""Soft-label KD (Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015).

``T^2 * KL(softmax(t / T) || softmax(s / T))``, averaged over the batch; ``T = 4`` by default. The
objective adds ``λ·KD`` to the task loss without gradient clipping. (The TensorFlow code of the
role-wise KD and KD-SVD authors uses ``0.7 * CE + 0.3 * KL`` without the ``T^2`` factor; see
docs/FIDELITY.md.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UserError
from .base import Distiller, as_float, register


def soft_label_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 4.0) -> torch.Tensor:
    """``T^2 KL(p_t || p_s)`` with temperature-``T`` softmaxes, batch mean; no gradient to the teacher."""
    log_p_s = F.log_softmax(as_float(student_logits) / T, dim=1)
    log_p_t = F.log_softmax(as_float(teacher_logits.detach()) / T, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (T * T)


@register("soft")
class SoftLabel(Distiller):
    """Hinton's soft-label KD on the logits."""

    @classmethod
    def options_from(cls, kd):
        """``kd.T`` (a documented shortcut) and ``kd.options``."""
        return {"T": kd.T, **kd.options}

    def __init__(self, T: float = 4.0):
        super().__init__()
        if not T > 0:
            raise UserError(f"soft KD temperature T={T} must be > 0")
        self.T = float(T)

    def forward(self, student, teacher, labels):
        return soft_label_loss(student.logits, teacher.logits, self.T)

    def extra_repr(self) -> str:
        return f"T={self.T}"
