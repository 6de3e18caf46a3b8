"""rolekd: role-wise data augmentation for knowledge distillation."""

__version__ = "0.1.0"
