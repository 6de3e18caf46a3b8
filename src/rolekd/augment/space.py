"""PBA's augmentation search space: 15 ops, policies of 60 ints."""

from __future__ import annotations

from typing import Sequence

OPS: tuple[str, ...] = (
    "Rotate", "TranslateX", "TranslateY", "Brightness", "Color", "Invert", "Sharpness", "Posterize",
    "ShearX", "Solarize", "ShearY", "Equalize", "AutoContrast", "Cutout", "Contrast",
)
NUM_OPS = len(OPS)
POLICY_LEN = 4 * NUM_OPS  # two halves of (probability, magnitude) per op
NUM_SLOTS = 2 * NUM_OPS  # (probability, magnitude) slots: slot s holds policy[2 * s] and policy[2 * s + 1]
MAX_PROB = 10  # probability is v/10
MAX_LEVEL = 9


def validate_policy(policy: Sequence[int]) -> list[int]:
    """Return ``policy`` as a list of 60 ints or raise ``ValueError`` saying what is wrong."""
    try:
        v = [int(x) for x in policy]
    except (TypeError, ValueError):
        raise ValueError(f"a policy must be a sequence of 60 ints, got {policy!r:.80}") from None
    if any(float(a) != b for a, b in zip(policy, v)):
        raise ValueError("a policy must hold integers only")
    if len(v) != POLICY_LEN:
        raise ValueError(f"a policy has {POLICY_LEN} ints (2 x {NUM_OPS} ops x (prob, level)), got {len(v)}")
    for i, x in enumerate(v):
        op = OPS[(i % (2 * NUM_OPS)) // 2]
        if i % 2 == 0 and not 0 <= x <= MAX_PROB:
            raise ValueError(f"policy[{i}] ({op} probability) = {x}, must be 0..{MAX_PROB}")
        if i % 2 == 1 and not 0 <= x <= MAX_LEVEL:
            raise ValueError(f"policy[{i}] ({op} magnitude) = {x}, must be 0..{MAX_LEVEL}")
    return v


def policy_tuples(policy: Sequence[int]) -> list[tuple[str, float, int]]:
    """The 30 ``(op name, probability, level)`` tuples of a policy, first half then second."""
    v = validate_policy(policy)
    return [(OPS[(i % (2 * NUM_OPS)) // 2], v[i] / MAX_PROB, v[i + 1]) for i in range(0, POLICY_LEN, 2)]


def active_slots(policy: Sequence[int]) -> int:
    """The number of slots of ``policy`` whose probability is above 0."""
    v = validate_policy(policy)
    return sum(1 for i in range(0, POLICY_LEN, 2) if v[i] > 0)
