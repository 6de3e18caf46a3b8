"""Apply a PBA policy (60 ints) to a batch, independently per image, as PBA's ``apply_policy`` does.

A policy holds two halves of 15 ``(probability, magnitude)`` pairs, one pair per op of
:data:`rolekd.augment.space.OPS`: 30 slots ``(op, v[2k] / 10, v[2k + 1])``. For every image PBA draws
how many ops to apply (0, 1 or 2 with probability .2, .3, .5), walks the 30 slots in a fresh random
order, fires each slot with its probability and stops once that many fired. So an image gets at most
two ops, in walk order. Here the draws for the whole batch are made at once
(:func:`fired_slots`), then "first fired op" is applied to every image, grouped by kernel (one call
per group of ops, with a level/sign/centre per image), then "second fired op".

On CPU each stage sorts the batch by kernel group and runs each kernel on its contiguous run of
images only; on other devices each kernel runs on the whole batch and a mask keeps the images that
fired it, so nothing reads values back from the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch

from rolekd.augment.ops import (
    Workspace,
    apply_group,
    check_images,
    draw_centres,
    draw_signs,
    fill_tensor,
    kernel_groups,
    scratch,
)
from rolekd.augment.space import MAX_PROB, NUM_OPS, NUM_SLOTS, OPS, validate_policy

__all__ = ["COUNT_PROBS", "MAX_FIRED", "fired_slots", "apply_policy", "slot_ops"]

COUNT_PROBS: tuple[float, float, float] = (0.2, 0.3, 0.5)
"""PBA's distribution of the number of ops per image (0, 1, 2) for its ``cifar10`` aug policy."""

MAX_FIRED = 2


def slot_ops(policy: Sequence[int]) -> list[tuple[str, int, int]]:
    """The 30 slots ``(op name, probability 0..10, level)`` of a policy, first half then second."""
    v = validate_policy(policy)
    return [(OPS[k % NUM_OPS], v[2 * k], v[2 * k + 1]) for k in range(NUM_SLOTS)]


@dataclass(frozen=True)
class _PolicyTables:
    active: torch.Tensor  # (K,) slot ids with probability > 0
    probs: torch.Tensor  # (K,) float32 probabilities of the active slots
    op_of_slot: torch.Tensor  # (31,) entry k + 1: op index of slot k; entry 0 (no op): -1
    level_of_slot: torch.Tensor  # (31,) entry k + 1: level of slot k; entry 0: 0
    active_ops: frozenset[str]  # ops that can fire


@lru_cache(maxsize=32)
def _tables(policy: tuple[int, ...], device: torch.device) -> _PolicyTables:
    """Per-policy lookup tables on ``device`` (``policy`` already validated)."""
    slots = [(OPS[k % NUM_OPS], policy[2 * k], policy[2 * k + 1]) for k in range(NUM_SLOTS)]
    active = [k for k, (_, p, _) in enumerate(slots) if p > 0]
    return _PolicyTables(
        active=torch.tensor(active, dtype=torch.int64, device=device),
        probs=torch.tensor([slots[k][1] / MAX_PROB for k in active], dtype=torch.float32, device=device),
        op_of_slot=torch.tensor([-1] + [k % NUM_OPS for k in range(NUM_SLOTS)], dtype=torch.int64, device=device),
        level_of_slot=torch.tensor([0] + [lv for _, _, lv in slots], dtype=torch.int64, device=device),
        active_ops=frozenset(slots[k][0] for k in active),
    )


@lru_cache(maxsize=8)
def _group_of_op(h: int, w: int, device: torch.device) -> torch.Tensor:
    """(16,) entry o + 1: 1 + index of op o's group in :func:`ops.kernel_groups`; entry 0 (no op): 0."""
    groups = kernel_groups(h, w)
    member = {op: g + 1 for g, (_, ops) in enumerate(groups) for op in ops}
    return torch.tensor([0] + [member[op] for op in OPS], dtype=torch.int64, device=device)


def _fired_slots(policy: tuple[int, ...], n: int, generator: torch.Generator | None,
                 device: torch.device) -> torch.Tensor:
    at = generator.device if generator is not None else device
    tables = _tables(policy, at)
    k = tables.active.numel()
    if k == 0 or n == 0:
        return torch.full((n, MAX_FIRED), -1, dtype=torch.int64, device=device)
    u = torch.rand((n, 1 + 2 * k), generator=generator, device=at)
    count = (u[:, 0] >= COUNT_PROBS[0]).to(torch.int64) + (u[:, 0] >= COUNT_PROBS[0] + COUNT_PROBS[1]).to(torch.int64)
    fires = u[:, 1 + k:] < tables.probs
    # Each slot's place in the random walk is the rank of its key; the j-th fired slot of the walk is
    # the fired slot with the j-th smallest key (slots that do not fire get key 2, above every key).
    keys = torch.where(fires, u[:, 1:1 + k], torch.full_like(u[:, 1:1 + k], 2.0))
    picked = []
    for j in range(1, MAX_FIRED + 1):
        best, pos = keys.min(dim=1, keepdim=True)
        slot = tables.active.index_select(0, pos.squeeze(1))
        ok = (best.squeeze(1) < 2.0) & (count >= j)
        picked.append(torch.where(ok, slot, torch.full_like(slot, -1)))
        keys = keys.scatter(1, pos, 2.0)
    return torch.stack(picked, dim=1).to(device, non_blocking=True)


def fired_slots(
    policy: Sequence[int],
    n: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Draw, for ``n`` images, which policy slots fire and in which order (PBA's rule).

    Per image: the number of ops is 0, 1 or 2 with probability .2, .3, .5; the 30 slots are walked in
    a uniformly random order, each fires with its probability, and the walk stops when that many
    fired. Returns an int64 tensor ``(n, 2)`` on ``device``: row ``i`` holds the slot (0..29, an
    index into :func:`slot_ops`) of the first and the second op applied to image ``i``, -1 where
    fewer fired. Draws are made on the generator's device (default: ``device``, global RNG).
    """
    return _fired_slots(tuple(validate_policy(policy)), n, generator, torch.device(device))


@dataclass(frozen=True)
class _Draw:
    slots: torch.Tensor  # (n, 2) int64, -1 = none
    signs: torch.Tensor  # (n, 2) int64 +-1
    centres: torch.Tensor  # (n, 2, 2) int64 (cy, cx)


def _draw(policy: Sequence[int], images: torch.Tensor, generator: torch.Generator | None) -> _Draw:
    """All random draws of :func:`apply_policy` for a batch, in a fixed order."""
    n, _, h, w = images.shape
    device = images.device
    return _Draw(
        slots=_fired_slots(tuple(policy), n, generator, device),
        signs=draw_signs(n, generator, device, (MAX_FIRED,)),
        centres=draw_centres(n, h, w, generator, device, (MAX_FIRED,)),
    )


def _apply_drawn(
    images: torch.Tensor,
    policy: Sequence[int],
    draw: _Draw,
    fill: torch.Tensor,
    masked: bool | None = None,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """Apply the drawn ops: stage 0 (first fired op) for all images, then stage 1 (second).

    Ops sharing a batched kernel (:func:`ops.kernel_groups`) run together. ``masked`` (default: on
    non-CPU devices) runs every group on the whole batch and keeps the images that fired it, without
    host syncs; otherwise (CPU) each stage sorts the batch by group and runs each group's kernel on
    its contiguous run of images only; the original order is restored at the end. With a
    ``workspace`` the CPU path works in (and returns) buffers kept there.
    """
    device = images.device
    n, _, h, w = images.shape
    tables = _tables(tuple(policy), device)
    group_of_op = _group_of_op(h, w, device)
    groups = kernel_groups(h, w)
    if masked is None:
        masked = device.type != "cpu"
    if masked:
        live = [g + 1 for g, (_, ops) in enumerate(groups) if tables.active_ops.intersection(ops)]
        x = images
        for stage in range(MAX_FIRED):
            slot = draw.slots[:, stage] + 1
            op_of = tables.op_of_slot.index_select(0, slot)
            key = group_of_op.index_select(0, op_of + 1)
            levels = tables.level_of_slot.index_select(0, slot)
            for g in live:
                out = apply_group(x, groups[g - 1][0], op_of.clamp(min=0), levels, draw.signs[:, stage],
                                  draw.centres[:, stage], fill)
                x = torch.where((key == g).view(-1, 1, 1, 1), out, x)
        return x

    src = scratch(workspace, "policy_a", tuple(images.shape), images)
    dst = scratch(workspace, "policy_b", tuple(images.shape), images)
    x, perm = images, None  # x[i] is images[perm[i]]
    for stage in range(MAX_FIRED):
        slot = draw.slots[:, stage]
        if perm is not None:
            slot = slot.index_select(0, perm)
        slot = slot + 1
        op_of = tables.op_of_slot.index_select(0, slot)
        key = group_of_op.index_select(0, op_of + 1)
        order = torch.argsort(key, stable=True)
        sizes = torch.bincount(key, minlength=len(groups) + 1).tolist()  # CPU: no device sync
        perm = order if perm is None else perm.index_select(0, order)
        torch.index_select(x, 0, order, out=src)
        op_of = op_of.index_select(0, order)
        levels = tables.level_of_slot.index_select(0, slot.index_select(0, order))
        signs = draw.signs[:, stage].index_select(0, perm)
        centres = draw.centres[:, stage].index_select(0, perm)
        start = 0
        for g, size in enumerate(sizes):
            if not size:
                continue
            part = slice(start, start + size)
            if g:
                dst[part] = apply_group(src[part], groups[g - 1][0], op_of[part].clamp(min=0), levels[part],
                                        signs[part], centres[part], fill)
            else:
                dst[part] = src[part]
            start += size
        x = dst
    assert perm is not None
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(n, device=device)
    return torch.index_select(dst, 0, inverse, out=src)


def _apply_policy(images: torch.Tensor, policy: tuple[int, ...], generator: torch.Generator | None,
                  fill: torch.Tensor, workspace: Workspace | None = None) -> torch.Tensor:
    if images.shape[0] == 0 or not any(policy[0::2]):
        return images
    return _apply_drawn(images, policy, _draw(policy, images, generator), fill, workspace=workspace)


def apply_policy(
    images: torch.Tensor,
    policy: Sequence[int],
    generator: torch.Generator | None = None,
    fill: Sequence[int] | None = None,
) -> torch.Tensor:
    """Apply PBA policy ``policy`` (60 ints) to a uint8 batch ``(N, 3, H, W)``, per image.

    Every image independently gets 0, 1 or 2 ops by PBA's rule (see :func:`fired_slots`), with its
    own random signs and Cutout centres. Reproducible for a seeded ``generator``; random numbers are
    drawn on the generator's device (use one on the images' device to avoid host copies).

    Raises:
        ValueError: the policy is not 60 ints with probabilities 0..10 and levels 0..9, or the
            images are not a uint8 (N, 3, H, W) tensor.

    Returns:
        A uint8 tensor (N, 3, H, W) on the images' device; ``images`` itself (unmodified) when no
        slot has a non-zero probability.
    """
    v = tuple(validate_policy(policy))
    check_images(images)
    return _apply_policy(images, v, generator, fill_tensor(fill, images.device))
