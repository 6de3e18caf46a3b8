"""Training: one trainer for plain, KD and search training; checkpoints; metrics."""

from .checkpoint import load_weights, read_weights, save_weights
from .objective import CrossEntropy, Objective, StepContext
from .trainer import Trainer, build_optimizer, lr_at, resolve_device

__all__ = ["Trainer", "Objective", "CrossEntropy", "StepContext", "build_optimizer", "lr_at", "resolve_device",
           "load_weights", "read_weights", "save_weights"]
