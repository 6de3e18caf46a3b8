"""What one training step optimises: the trainer's extension point.

The trainer owns the loop, optimizer, LR schedule, data, checkpoints and metrics. An
:class:`Objective` owns one step's forward and backward (never ``optimizer.step``). Plain training
uses :class:`CrossEntropy`; knowledge distillation (frozen teacher, KD loss, gradient clipping,
λ decay) plugs in as another Objective, so KD and search reuse the same trainer.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class StepContext:
    """Per-step facts the trainer hands an objective."""

    epoch: int  # 0-based epoch being trained
    epochs: int  # total epochs of this run
    autocast: Callable[[], AbstractContextManager]  # wrap forwards in it (bf16 on CUDA, no-op on CPU)


class Objective:
    """Plain-training interface. Subclasses override :meth:`train_step` and, if stateful,
    :meth:`state_dict` / :meth:`load_state_dict` (saved in every checkpoint)."""

    def setup(self, model: nn.Module, device: torch.device) -> None:
        """Called once by the trainer before training (move extra modules to ``device``)."""

    def extra_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters besides the model's that the trainer's optimizer should update."""
        return []

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Called once with the trainer's optimizer (e.g. DML copies it for the networks it trains)."""

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        """Called at the start of every training epoch."""

    def train_step(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                   ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward + backward for one batch. Returns (detached logits, {metric: detached scalar})."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def close(self) -> None:
        """Release what the objective attached to shared modules (e.g. feature hooks on a teacher)."""

    def load_state_dict(self, state: dict) -> None:
        pass


class CrossEntropy(Objective):
    """The default objective: cross-entropy on the labels."""

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the loss, its metrics) of one batch's logits (the fused search executor calls it per member)."""
        loss = F.cross_entropy(logits.float(), labels)
        return loss, {"loss": loss.detach()}

    def train_step(self, model, images, labels, ctx):
        with ctx.autocast():
            logits = model(images)
        loss, metrics = self.loss(logits, labels)
        loss.backward()
        return logits.detach(), metrics
