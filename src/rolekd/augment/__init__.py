"""PBA data augmentation on tensors: the 15 ops, policies, the base augmentation, schedules."""

from rolekd.augment.base import BatchAugment, base_augment
from rolekd.augment.ops import CIFAR10_FILL, CIFAR10_MEAN, SIGNED_OPS, apply_op, pba_parameter
from rolekd.augment.policy import apply_policy, fired_slots, slot_ops
from rolekd.augment.schedule import Schedule, write_pbt_log
from rolekd.augment.space import OPS, POLICY_LEN, policy_tuples, validate_policy

__all__ = [
    "OPS",
    "POLICY_LEN",
    "validate_policy",
    "policy_tuples",
    "CIFAR10_MEAN",
    "CIFAR10_FILL",
    "SIGNED_OPS",
    "pba_parameter",
    "apply_op",
    "apply_policy",
    "fired_slots",
    "slot_ops",
    "base_augment",
    "BatchAugment",
    "Schedule",
    "write_pbt_log",
]
