"""Training: the one trainer (epoch loop, evaluation, checkpoints, resume) for plain, KD and search
training; what a step optimises (objectives); metrics logs."""

from .objective import CrossEntropy, Objective, StepContext
from .trainer import EpochSums, NonFiniteLoss, Trainer, build_optimizer, lr_at, resolve_device

__all__ = ["Trainer", "EpochSums", "NonFiniteLoss", "Objective", "CrossEntropy", "StepContext", "build_optimizer", "lr_at",
           "resolve_device"]
