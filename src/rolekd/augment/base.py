"""PBA's base augmentation after the policy, batched on the device, and the loader's batch transform.

PBA's data loader (``pba/data_utils.py``) does, per image and after the policy,
``random_flip(zero_pad_and_crop(img, 4))`` then ``cutout_numpy(img)`` on normalised images, so padding
and the cutout square are zeros there, i.e. the dataset's mean colour here. Its details are kept:

* pad + crop: the crop's top/left offsets are ``randint(0, 2 * pad)``, i.e. 0 .. 2*pad-1 (PBA never
  draws offset ``2 * pad``, so shifts range over -pad .. pad-1);
* flip: horizontal with probability 1/2;
* cutout: centre uniform over the image, rows/cols ``[c - size // 2, c + size // 2)`` clipped at the
  borders (so a square near a border is smaller), filled with the mean colour.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import torch

from rolekd.augment.ops import Workspace, _cutout, check_images, draw_centres, fill_tensor, scratch
from rolekd.augment.policy import _apply_policy
from rolekd.augment.space import validate_policy

__all__ = ["base_augment", "BatchAugment"]


def _check_size(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


def _pad_crop(images: torch.Tensor, pad: int, offsets: torch.Tensor, fill: torch.Tensor,
              out: torch.Tensor | None = None, workspace: Workspace | None = None) -> torch.Tensor:
    """Pad with ``fill`` and crop ``H x W`` at per-image ``offsets`` (top, left): one row gather."""
    n, c, h, w = images.shape
    hp, wp = h + 2 * pad, w + 2 * pad
    padded = scratch(workspace, "base_padded", (n, c, hp, wp), images)
    padded[:] = fill.view(1, c, 1, 1)  # one fill + one copy beats filling the four borders
    padded[:, :, pad:pad + h, pad:pad + w] = images
    device = images.device
    start = (torch.arange(n, device=device) * (c * hp * wp) + offsets[:, 0] * wp + offsets[:, 1]).view(n, 1, 1)
    start = start + (torch.arange(c, device=device) * (hp * wp)).view(1, c, 1) \
        + (torch.arange(h, device=device) * wp).view(1, 1, h)
    rows = padded.view(-1).unfold(0, w, 1)  # rows[i] = flat[i : i + w], a view
    if out is None:
        return rows.index_select(0, start.view(-1)).view(n, c, h, w)
    return torch.index_select(rows, 0, start.view(-1), out=out.view(n * c * h, w)).view(n, c, h, w)


def _flip(images: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Mirror the images where ``flips`` (N,) is true (arithmetic select: exact in uint8)."""
    chosen = flips.to(torch.uint8).view(-1, 1, 1, 1)
    return images.flip(-1).sub_(images).mul_(chosen).add_(images)


def base_augment(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    pad: int = 4,
    flip: bool = True,
    cutout: int = 16,
    fill: Sequence[int] | None = None,
) -> torch.Tensor:
    """PBA's base augmentation for a uint8 batch ``(N, 3, H, W)``, independently per image.

    Pad by ``pad`` pixels of the fill colour and crop back to ``H x W`` at a random offset
    (0 .. 2*pad-1 as PBA), mirror horizontally with probability 1/2 if ``flip``, then cut out a
    ``cutout x cutout`` square (0 = off) at a uniform centre, clipped at the borders. ``fill``
    defaults to the CIFAR-10 mean colour. Random numbers come from ``generator`` (drawn on its
    device). Returns a new uint8 tensor on the images' device.
    """
    check_images(images)
    return _base_augment(images, generator, _check_size("pad", pad), bool(flip), _check_size("cutout", cutout),
                         fill_tensor(fill, images.device))


def _base_augment(images: torch.Tensor, generator: torch.Generator | None, pad: int, flip: bool, cutout: int,
                  fill: torch.Tensor, workspace: Workspace | None = None) -> torch.Tensor:
    """:func:`base_augment` without checks; intermediates (not the result) may live in ``workspace``."""
    n, _, h, w = images.shape
    device = images.device
    at = generator.device if generator is not None else device
    if n == 0:
        return images.clone()
    x, fresh = images, False  # fresh: x is a new tensor, neither the input nor a workspace buffer
    if pad:
        offsets = torch.randint(0, 2 * pad, (n, 2), generator=generator, device=at).to(device, non_blocking=True)
        crop = scratch(workspace, "base_crop", tuple(images.shape), images) if flip and workspace is not None else None
        x, fresh = _pad_crop(x, pad, offsets, fill, out=crop, workspace=workspace), crop is None
    if flip:
        flips = torch.rand((n,), generator=generator, device=at) < 0.5
        x, fresh = _flip(x, flips.to(device, non_blocking=True)), True
    if not fresh:
        x = x.clone()
    if cutout:
        centres = draw_centres(n, h, w, generator, device)
        sizes = torch.full((n,), cutout, dtype=torch.int64, device=device)
        x = _cutout(x, sizes, centres, fill, inplace=True)
    return x


class BatchAugment:
    """The training-batch transform: PBA policy (optional) then :func:`base_augment`.

    ``augment(images_uint8, generator)`` returns a new uint8 batch; :meth:`set_policy` swaps the
    policy (e.g. per epoch of a PBA schedule); None disables it. Batch-sized scratch buffers are
    kept between calls (per thread) to avoid re-allocating them for every batch.
    """

    def __init__(
        self,
        policy: Sequence[int] | None = None,
        pad: int = 4,
        flip: bool = True,
        cutout: int = 16,
        fill: Sequence[int] | None = None,
    ) -> None:
        self.pad = _check_size("pad", pad)
        self.flip = bool(flip)
        self.cutout = _check_size("cutout", cutout)
        self.fill: tuple[int, ...] | None = None if fill is None else tuple(int(c) for c in fill)
        fill_tensor(self.fill, "cpu")  # validate early
        self.policy: list[int] | None = None
        self.set_policy(policy)
        self._local = threading.local()

    def set_policy(self, policy: Sequence[int] | None) -> None:
        """Use PBA policy ``policy`` (60 ints, validated) from now on; None: base augmentation only."""
        self.policy = None if policy is None else validate_policy(policy)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        check_images(images)
        workspace: Workspace = self._local.__dict__.setdefault("workspace", {})
        fill = fill_tensor(self.fill, images.device)
        x = images
        if self.policy is not None:
            x = _apply_policy(x, tuple(self.policy), generator, fill, workspace)
        return _base_augment(x, generator, self.pad, self.flip, self.cutout, fill, workspace)

    def __getstate__(self) -> dict[str, Any]:  # picklable for DataLoader workers
        state = self.__dict__.copy()
        del state["_local"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def __repr__(self) -> str:
        return (f"BatchAugment(policy={self.policy}, pad={self.pad}, flip={self.flip}, "
                f"cutout={self.cutout}, fill={self.fill})")
