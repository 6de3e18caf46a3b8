"""PBA's 15 image operations as batched, per-sample tensor kernels.

Every op reproduces what PBA does with Pillow on one image (``pba/augmentation_transforms.py``), for a
whole ``uint8`` batch ``(N, 3, H, W)`` on any device:

* the level -> parameter mapping is PBA's (``int_parameter``/``float_parameter`` with ``PARAMETER_MAX``
  10): Rotate ``int(3 l)`` degrees, TranslateX/Y ``l`` pixels, ShearX/Y ``0.03 l``, Posterize
  ``4 - int(0.4 l)`` bits, Solarize threshold ``256 - int(25.6 l)``, Color/Contrast/Brightness/Sharpness
  factor ``0.18 l + 0.1``, Cutout a square of side ``2 l``; AutoContrast, Equalize and Invert ignore it;
* geometric ops sample exactly the source pixels Pillow's nearest-neighbour affine transform samples
  (16.16 fixed point from pixel centres, or its pure-translation path); the index maps are computed
  once per image size, op, level and sign and applied to a batch as one gather (translations and
  ShearX, whose maps shift whole rows, as one gather of rows);
* ImageEnhance blends are done in single precision with Pillow's truncation and clipping; Equalize and
  AutoContrast build Pillow's per-channel lookup tables per image;
* pixels a geometric op uncovers, and the Cutout square, get the dataset's mean colour, which is what
  PBA's RGBA alpha mask turns into after normalisation (default :data:`CIFAR10_FILL`).

:func:`apply_op` applies one op at one level to a batch. :func:`apply_op_batched` is the per-sample
form (a level, sign and cutout centre per image), and :func:`apply_group` applies several ops that
share a kernel (:func:`kernel_groups`) in one go; :mod:`rolekd.augment.policy` uses those. The
kernels work on CPU and GPU alike and never read values back to the host.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

from rolekd.augment.space import MAX_LEVEL, OPS

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_FILL",
    "SIGNED_OPS",
    "GEOMETRIC_OPS",
    "pba_parameter",
    "apply_op",
    "apply_op_batched",
    "apply_group",
    "kernel_groups",
    "draw_signs",
    "draw_centres",
]

CIFAR10_MEAN: tuple[float, float, float] = (0.49139968, 0.48215841, 0.44653091)
"""CIFAR-10 per-channel mean in [0, 1] (PBA's ``MEANS['cifar10_50000']``)."""

CIFAR10_FILL: tuple[int, int, int] = (125, 123, 114)
"""CIFAR-10 mean colour as uint8 RGB, ``round(255 * CIFAR10_MEAN)``: the default fill colour."""

GEOMETRIC_OPS: tuple[str, ...] = ("Rotate", "TranslateX", "TranslateY", "ShearX", "ShearY")
"""Ops that move pixels (and fill what they uncover); all of them take a random sign."""

SIGNED_OPS: frozenset[str] = frozenset(GEOMETRIC_OPS)
"""Ops whose parameter PBA negates with probability 1/2."""

_PARAMETER_MAX = 10  # PBA's scale: parameter = level * maxval / PARAMETER_MAX
_ENHANCE_OPS = ("Brightness", "Color", "Contrast", "Sharpness")
_OP_INDEX = {name: i for i, name in enumerate(OPS)}


# --------------------------------------------------------------------------- parameters


def _int_parameter(level: int, maxval: int) -> int:
    return int(level * maxval / _PARAMETER_MAX)


def _float_parameter(level: int, maxval: float) -> float:
    return float(level) * maxval / _PARAMETER_MAX


def pba_parameter(name: str, level: int) -> float | int | None:
    """PBA's parameter for op ``name`` at ``level`` (before any random sign); None for level-free ops.

    Rotate: degrees; TranslateX/Y: pixels; ShearX/Y: shear factor; Posterize: bits kept;
    Solarize: threshold; the four enhancers: ImageEnhance factor; Cutout: square side in pixels.
    """
    _check_name_level(name, level)
    if name == "Rotate":
        return _int_parameter(level, 30)
    if name in ("TranslateX", "TranslateY"):
        return _int_parameter(level, 10)
    if name in ("ShearX", "ShearY"):
        return _float_parameter(level, 0.3)
    if name == "Posterize":
        return 4 - _int_parameter(level, 4)
    if name == "Solarize":
        return 256 - _int_parameter(level, 256)
    if name in _ENHANCE_OPS:
        return _float_parameter(level, 1.8) + 0.1
    if name == "Cutout":
        return _int_parameter(level, 20)
    return None


def _check_name_level(name: str, level: int) -> None:
    if name not in _OP_INDEX:
        raise ValueError(f"unknown augmentation op {name!r}; expected one of {', '.join(OPS)}")
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not 0 <= level <= MAX_LEVEL:
        raise ValueError(f"op level must be an int in 0..{MAX_LEVEL}, got {level!r}")


# --------------------------------------------------------------------------- Pillow geometry


def _pillow_affine_data(name: str, level: int, sign: int, h: int, w: int) -> tuple[float, ...] | None:
    """The 6 affine coefficients (output -> input) Pillow uses for op ``name``; None means a plain copy."""
    value = pba_parameter(name, level)
    assert value is not None
    if sign < 0:
        value = -value
    if name == "Rotate":
        # Image.rotate(value): angle 0 is a copy; otherwise the reverse rotation about the image centre.
        angle = value % 360.0
        if angle == 0:
            return None
        rad = -math.radians(angle)
        m = [round(math.cos(rad), 15), round(math.sin(rad), 15), 0.0,
             round(-math.sin(rad), 15), round(math.cos(rad), 15), 0.0]
        cx, cy = w / 2, h / 2
        m[2], m[5] = m[0] * -cx + m[1] * -cy + m[2], m[3] * -cx + m[4] * -cy + m[5]
        m[2] += cx
        m[5] += cy
        return tuple(m)
    return {
        "TranslateX": (1, 0, value, 0, 1, 0),
        "TranslateY": (1, 0, 0, 0, 1, value),
        "ShearX": (1, value, 0, 0, 1, 0),
        "ShearY": (1, 0, 0, value, 1, 0),
    }[name]


def _affine_nearest_sources(data: tuple[float, ...] | None, h: int, w: int) -> np.ndarray:
    """Flat source index per output pixel for Pillow's NEAREST affine transform; ``h * w`` = uncovered.

    Follows libImaging's ``ImagingTransformAffine``: coefficients without cross terms take the
    ``ImagingScaleAffine`` path (double precision, ``COORD`` truncation of pixel-centre coordinates),
    the rest the 16.16 fixed-point path of ``affine_fixed``.
    """
    ys, xs = np.meshgrid(np.arange(h, dtype=np.int64), np.arange(w, dtype=np.int64), indexing="ij")
    if data is None:
        return (ys * w + xs).reshape(-1)
    a = [float(v) for v in data]
    if a[1] == 0 and a[3] == 0:
        def coords(offset: float, step: float, size: int) -> np.ndarray:
            out, v = [], offset + step * 0.5
            for _ in range(size):
                out.append(-1 if v < 0.0 else int(v))
                v += step
            return np.asarray(out, dtype=np.int64)
        xin = np.broadcast_to(coords(a[2], a[0], w)[None, :], (h, w))
        yin = np.broadcast_to(coords(a[5], a[4], h)[:, None], (h, w))
    else:
        if max(h, w) * (abs(a[0]) + abs(a[1]) + abs(a[3]) + abs(a[4])) + abs(a[2]) + abs(a[5]) >= 32768:
            raise ValueError(f"image size {h}x{w} is too large for Pillow's fixed-point affine path")

        def fix(v: float) -> int:
            return math.floor(v * 65536.0 + 0.5)

        a0, a1, a3, a4 = fix(a[0]), fix(a[1]), fix(a[3]), fix(a[4])
        a2 = fix(a[2] + a[0] * 0.5 + a[1] * 0.5)
        a5 = fix(a[5] + a[3] * 0.5 + a[4] * 0.5)
        xin = (a2 + ys * a1 + xs * a0) >> 16
        yin = (a5 + ys * a4 + xs * a3) >> 16
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    return np.where(inside, yin * w + xin, h * w).reshape(-1).astype(np.int64)


@lru_cache(maxsize=8)
def _all_source_maps(h: int, w: int) -> np.ndarray:
    """Source maps of every (geometric op, level, sign): ``(5 * 10 * 2, h * w)``; row index
    ``(op * 10 + level) * 2 + (sign > 0)`` with ``op`` the position in :data:`GEOMETRIC_OPS`."""
    return np.stack([_affine_nearest_sources(_pillow_affine_data(name, level, sign, h, w), h, w)
                     for name in GEOMETRIC_OPS for level in range(MAX_LEVEL + 1) for sign in (-1, 1)])


def _as_row_shifts(sources: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Describe a source map as "output row y is source row r[y] shifted by s[y] columns" if it is one.

    Returns ``(r, s, keep)`` (``keep``: 1 where the output pixel is covered) or None.
    """
    src = sources.reshape(h, w)
    xs = np.arange(w)
    rows, shifts = np.zeros(h, dtype=np.int64), np.zeros(h, dtype=np.int64)
    for y in range(h):
        covered = src[y] < h * w
        if not covered.any():
            continue
        r, c = np.divmod(src[y][covered], w)
        shift = c - xs[covered]
        if (r != r[0]).any() or (shift != shift[0]).any():
            return None
        rows[y], shifts[y] = r[0], shift[0]
        # every output pixel whose shifted column lies inside the row must be covered
        if not np.array_equal(covered, (xs + shift[0] >= 0) & (xs + shift[0] < w)):
            return None
    return rows, shifts, (src < h * w).astype(np.uint8).reshape(-1)


@lru_cache(maxsize=None)
def _row_shift_ops(h: int, w: int) -> frozenset[str]:
    """Geometric ops whose maps (all levels and signs) are row shifts: TranslateX/Y, ShearX."""
    maps = _all_source_maps(h, w).reshape(len(GEOMETRIC_OPS), -1, h * w)
    return frozenset(name for name, op_maps in zip(GEOMETRIC_OPS, maps)
                     if all(_as_row_shifts(m, h, w) is not None for m in op_maps))


@lru_cache(maxsize=None)
def _source_table(h: int, w: int, device: torch.device) -> torch.Tensor:
    """All geometric source maps (see :func:`_all_source_maps`) as int64 on ``device``."""
    return torch.from_numpy(_all_source_maps(h, w)).to(device)


@lru_cache(maxsize=None)
def _row_shift_table(h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For the row-shift ops: per map ``r * w + s`` per output row (E, h) int64, the coverage masks
    (E, h * w) uint8 (zeros for other ops), and the largest ``|s|``."""
    starts = np.zeros((len(GEOMETRIC_OPS) * (MAX_LEVEL + 1) * 2, h), dtype=np.int64)
    keep = np.zeros((starts.shape[0], h * w), dtype=np.uint8)
    largest = 0
    shiftable = _row_shift_ops(h, w)
    for e, sources in enumerate(_all_source_maps(h, w)):
        if GEOMETRIC_OPS[e // (2 * (MAX_LEVEL + 1))] in shiftable:
            rows, shifts, keep[e] = _as_row_shifts(sources, h, w)  # type: ignore[misc]
            starts[e] = rows * w + shifts
            largest = max(largest, int(np.abs(shifts).max()))
    return torch.from_numpy(starts).to(device), torch.from_numpy(keep).to(device), largest


# --------------------------------------------------------------------------- per-device constants


@lru_cache(maxsize=None)
def _level_tables(device: torch.device) -> dict[str, torch.Tensor]:
    levels = range(MAX_LEVEL + 1)
    posterize = [(0xFF << (8 - pba_parameter("Posterize", lv))) & 0xFF for lv in levels]  # type: ignore[operator]
    return {
        "posterize_mask": torch.tensor(posterize, dtype=torch.uint8, device=device),
        "solarize": torch.tensor([min(255, pba_parameter("Solarize", lv)) for lv in levels],  # type: ignore[type-var]
                                 dtype=torch.uint8, device=device),
        "solarize_flip": torch.tensor([255 if pba_parameter("Solarize", lv) < 256 else 0 for lv in levels],  # type: ignore[operator]
                                      dtype=torch.uint8, device=device),
        # ImagingBlend takes alpha as a C float
        "factor": torch.tensor([pba_parameter("Color", lv) for lv in levels], dtype=torch.float32, device=device),
        "cutout": torch.tensor([pba_parameter("Cutout", lv) for lv in levels], dtype=torch.int64, device=device),
        "ramp": torch.arange(256, device=device),
    }


@lru_cache(maxsize=64)
def _fill_cached(fill: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    return torch.tensor(fill, dtype=torch.uint8, device=device)


def fill_tensor(fill: Sequence[int] | None, device: torch.device | str) -> torch.Tensor:
    """The fill colour as a cached ``uint8`` tensor of shape (3,) on ``device`` (None: CIFAR-10 mean)."""
    colour = CIFAR10_FILL if fill is None else tuple(int(c) for c in fill)
    if len(colour) != 3 or not all(0 <= c <= 255 for c in colour):
        raise ValueError(f"fill must be 3 ints in 0..255 (an RGB colour), got {fill!r}")
    return _fill_cached(colour, torch.device(device))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- kernels

Workspace = dict[str, torch.Tensor]
"""Reusable scratch buffers by name (see :func:`scratch`)."""


def scratch(workspace: Workspace | None, key: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised buffer of ``shape`` with ``like``'s dtype and device, kept in ``workspace``.

    Reusing batch-sized buffers between calls avoids fresh multi-MB allocations, which the C
    allocator often serves with new pages (page faults cost as much as the augmentation itself).
    """
    buf = None if workspace is None else workspace.get(key)
    if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
        buf = like.new_empty(shape)
        if workspace is not None:
            workspace[key] = buf
    return buf


def check_images(images: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``images`` is a uint8 tensor of shape (N, 3, H, W)."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 \
            or images.shape[1] != 3:
        desc = f"{images.dtype} tensor of shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) \
            else type(images).__name__
        raise ValueError(f"images must be a uint8 tensor of shape (N, 3, H, W), got {desc}")


def _fill_uncovered(x: torch.Tensor, keep: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """In place: pixels where ``keep`` (uint8 0/1, broadcast over channels) is 0 get ``fill``.

    ``(x - fill) * keep + fill`` in wrapping uint8 arithmetic: exact, and on CPU much faster than
    ``torch.where``.
    """
    colour = fill.view(1, -1, 1, 1)
    return x.sub_(colour).mul_(keep).add_(colour)


def _row_shift(x: torch.Tensor, entries: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Translations and ShearX: every output row is one source row, shifted; one row gather."""
    n, c, h, w = x.shape
    starts, keep, largest = _row_shift_table(h, w, x.device)
    guard = largest + 1  # windows may start before / end after the batch
    flat = x.new_empty(n * c * h * w + 2 * guard)
    flat[guard:guard + n * c * h * w] = x.reshape(-1)
    planes = torch.arange(guard, guard + n * c * h * w, h * w, device=x.device).view(n, c, 1)
    index = starts.index_select(0, entries).view(n, 1, h) + planes
    out = flat.unfold(0, w, 1).index_select(0, index.view(-1)).view(n, c, h, w)
    return _fill_uncovered(out, keep.index_select(0, entries).view(n, 1, h, w), fill)


def _warp(x: torch.Tensor, entries: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Any geometric op per image (``entries``: map index per image): one gather."""
    n, c, h, w = x.shape
    table = _source_table(h, w, x.device)
    src = torch.cat([x.reshape(n, c, h * w), fill.view(1, c, 1).expand(n, c, 1)], dim=2)
    index = table.index_select(0, entries).unsqueeze(1).expand(n, c, h * w)
    return torch.gather(src, 2, index).view(n, c, h, w)


def _to_uint8(values: torch.Tensor) -> torch.Tensor:
    """Truncate float values already clipped to [0, 255] to uint8 (via int16: much faster on CPU)."""
    return values.to(torch.int16).to(torch.uint8)


def _luma(xf: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L, ``(R 19595 + G 38470 + B 7471 + 0x8000) >> 16``, of float images: (N, 1, H, W).

    Exact in float32: every product and partial sum is an integer below 2**24.
    """
    luma = xf[:, 0:1] * 19595.0
    luma.add_(xf[:, 1:2], alpha=38470.0).add_(xf[:, 2:3], alpha=7471.0)
    return luma.add_(32768.0).mul_(1.0 / 65536.0).floor_()


def _smooth_interior(xf: torch.Tensor) -> torch.Tensor:
    """Pillow's SMOOTH filter (3x3 kernel 1,1,1/1,5,1/1,1,1 over 13, rounded) on the interior pixels:
    (N, C, H - 2, W - 2); Pillow keeps the border pixels as they are."""
    rows = xf[..., :-2] + xf[..., 1:-1]
    rows += xf[..., 2:]
    s = rows[..., :-2, :] + rows[..., 1:-1, :]
    s += rows[..., 2:, :]
    s.add_(xf[..., 1:-1, 1:-1], alpha=4.0)
    # (2s + 13) // 26 exactly: s is an integer <= 3315, so (s + 6.5) / 13 is never within 1/26 of an integer
    return s.add_(6.5).div_(13.0).floor_()


def _enhance(x: torch.Tensor, name: str, levels: torch.Tensor) -> torch.Tensor:
    """Pillow's ``Image.blend(degenerate, image, factor)`` for the four ImageEnhance classes.

    Per element in single precision as ImagingBlend: ``d + f * (x - d)``, clipped to [0, 255] and
    truncated; ``f`` is the C float of PBA's factor.
    """
    n = x.shape[0]
    factor = _level_tables(x.device)["factor"].index_select(0, levels).view(n, 1, 1, 1)
    xf = x.to(torch.float32)
    if name == "Brightness":  # degenerate: black
        return _to_uint8(xf.mul_(factor).clamp_(0.0, 255.0))
    if name == "Color":  # degenerate: the grey (L) image
        degenerate = _luma(xf)
    elif name == "Contrast":  # degenerate: int(mean(L) + 0.5), exactly, from the integer sum
        pixels = x.shape[2] * x.shape[3]
        # exact in float32 while the sum stays below 2**24 (any image up to 256 x 256)
        dtype = torch.float32 if pixels * 255 < 2**24 else torch.float64
        total = _luma(xf).sum(dim=(1, 2, 3), dtype=dtype).to(torch.int64)
        degenerate = torch.div(2 * total + pixels, 2 * pixels, rounding_mode="floor")
        degenerate = degenerate.to(torch.float32).view(n, 1, 1, 1)
    else:  # Sharpness; degenerate: the SMOOTH-filtered image, whose border is the image's own
        out = x.clone()
        degenerate = _smooth_interior(xf)
        inner = xf[..., 1:-1, 1:-1] - degenerate
        out[..., 1:-1, 1:-1] = _to_uint8(inner.mul_(factor).add_(degenerate).clamp_(0.0, 255.0))
        return out
    return _to_uint8(xf.sub_(degenerate).mul_(factor).add_(degenerate).clamp_(0.0, 255.0))


def _lut_index(x: torch.Tensor) -> torch.Tensor:
    """Flat int32 index ``(image * 3 + channel) * 256 + value`` of every pixel, shape (N * 3, H * W)."""
    n, c, h, w = x.shape
    offsets = torch.arange(0, n * c * 256, 256, dtype=torch.int32, device=x.device).view(n * c, 1)
    return x.reshape(n * c, h * w).to(torch.int32).add_(offsets)


def _apply_luts(x: torch.Tensor, index: torch.Tensor, luts: torch.Tensor) -> torch.Tensor:
    """Map every channel of every image through its own table; ``luts`` (N * 3, 256), values 0..255."""
    flat = luts.to(torch.uint8).view(-1)
    return flat.index_select(0, index.view(-1)).view(x.shape)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """ImageOps.equalize per image and channel.

    Pillow: ``step = (count - count of the top value) // 255``; no change if ``step`` is 0; else
    value ``v`` maps to ``(step // 2 + count below v) // step``, clipped to 255. All in float32, which
    is exact here: every quantity is an integer below 2**24 and floor division of such integers by
    a float32 division is exact.
    """
    n, c, h, w = x.shape
    index = _lut_index(x)
    if x.device.type == "cpu":
        hist = torch.bincount(index.view(-1), minlength=n * c * 256)
    else:  # scatter_add: no host sync (CUDA bincount reads the maximum back)
        bins = index.view(-1).to(torch.int64)
        hist = torch.zeros(n * c * 256, dtype=torch.int64, device=x.device).scatter_add_(0, bins, torch.ones_like(bins))
    hist = hist.view(n * c, 256).to(torch.float32)
    top_count = hist.gather(1, x.reshape(n * c, h * w).amax(dim=1, keepdim=True).to(torch.int64))
    step = (h * w - top_count).div_(255.0).floor_()
    half = step.div(2.0).floor_()
    lut = hist.cumsum(dim=1).sub_(hist).add_(half).div_(step.clamp(min=1.0)).floor_().clamp_(max=255.0)
    lut = torch.where(step > 0, lut, _level_tables(x.device)["ramp"].to(torch.float32))
    return _apply_luts(x, index, lut)


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    """ImageOps.autocontrast (cutoff 0) per image and channel, with Pillow's double-precision table."""
    n, c, h, w = x.shape
    flat = x.reshape(n * c, h * w)
    lo = flat.amin(dim=1, keepdim=True).to(torch.float64)
    hi = flat.amax(dim=1, keepdim=True).to(torch.float64)
    ramp = _level_tables(x.device)["ramp"].to(torch.float64)
    spread = hi > lo  # otherwise Pillow keeps the channel: scale 1, offset 0
    # 255.0 / (hi - lo) as a true division (``255.0 / tensor`` multiplies by a rounded reciprocal)
    scale = torch.where(spread, torch.full_like(hi, 255.0).div_((hi - lo).clamp_(min=1.0)), torch.ones_like(hi))
    offset = torch.where(spread, -lo * scale, torch.zeros_like(hi))
    # int(ix * scale + offset) clipped to 0..255; clipping first, then truncating, is the same
    lut = (ramp * scale).add_(offset).clamp_(0.0, 255.0)
    return _apply_luts(x, _lut_index(x), lut)


def _cutout(x: torch.Tensor, sizes: torch.Tensor, centres: torch.Tensor, fill: torch.Tensor,
            inplace: bool = False) -> torch.Tensor:
    """PBA's cutout: rows/cols ``[c - size // 2, c + size // 2)`` clipped to the image, filled.

    ``inplace`` overwrites ``x`` (which must then be a tensor the caller owns).
    """
    n, c, h, w = x.shape
    half = torch.div(sizes, 2, rounding_mode="floor").view(n, 1)
    cy, cx = centres[:, 0:1], centres[:, 1:2]
    ry = torch.arange(h, device=x.device).view(1, h)
    rx = torch.arange(w, device=x.device).view(1, w)
    in_rows = ((ry >= cy - half) & (ry < cy + half)).to(torch.uint8).view(n, 1, h, 1)
    in_cols = ((rx >= cx - half) & (rx < cx + half)).to(torch.uint8).view(n, 1, 1, w)
    return _fill_uncovered(x if inplace else x.clone(), 1 - in_rows * in_cols, fill)


def apply_op_batched(
    images: torch.Tensor,
    name: str,
    levels: torch.Tensor,
    signs: torch.Tensor | None = None,
    centres: torch.Tensor | None = None,
    fill: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """Apply op ``name`` with a level per image (``levels``: (N,) int64 on the images' device).

    ``signs`` ((N,), > 0 means PBA's positive parameter) is required for the signed ops and
    ``centres`` ((N, 2) int64 rows ``(cy, cx)``) for Cutout; other ops ignore them. No input checks and no random draws: this is
    the kernel behind :func:`apply_op` and :func:`rolekd.augment.policy.apply_policy`.
    """
    if name not in _OP_INDEX:
        raise ValueError(f"unknown augmentation op {name!r}; expected one of {', '.join(OPS)}")
    x = images
    if x.shape[0] == 0:
        return x.clone()
    fill_t = fill if isinstance(fill, torch.Tensor) else fill_tensor(fill, x.device)
    if name in SIGNED_OPS:
        if signs is None:
            raise ValueError(f"{name} needs signs")
        entries = (GEOMETRIC_OPS.index(name) * (MAX_LEVEL + 1) + levels) * 2 + (signs > 0).to(torch.int64)
        if name in _row_shift_ops(x.shape[2], x.shape[3]):
            return _row_shift(x, entries, fill_t)
        return _warp(x, entries, fill_t)
    if name in _ENHANCE_OPS:
        return _enhance(x, name, levels)
    tables = _level_tables(x.device)
    if name == "Invert":
        return torch.bitwise_not(x)
    if name == "Posterize":
        return x & tables["posterize_mask"].index_select(0, levels).view(-1, 1, 1, 1)
    if name == "Solarize":
        # v >= threshold as max(v, threshold) == v (uint8 == is much faster than >= on CPU), with
        # threshold 256 (level 0: no pixel inverted) as 255 and a zero flip mask
        threshold = tables["solarize"].index_select(0, levels).view(-1, 1, 1, 1)
        flip = tables["solarize_flip"].index_select(0, levels).view(-1, 1, 1, 1)
        above = (torch.maximum(x, threshold) == x).to(torch.uint8)
        return x ^ above.mul_(flip)  # 255 - v == v ^ 0xFF
    if name == "Equalize":
        return _equalize(x)
    if name == "AutoContrast":
        return _autocontrast(x)
    # Cutout
    if centres is None:
        raise ValueError("Cutout needs centres")
    return _cutout(x, tables["cutout"].index_select(0, levels), centres, fill_t)


@lru_cache(maxsize=8)
def kernel_groups(h: int, w: int) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Ops that one batched kernel applies together (for ``h x w`` images), as ``(group, ops)``.

    Translations and ShearX are all row shifts (group ``"RowShift"``), the other geometric ops
    gathers (``"Warp"``); every other op is a group of its own, named after it.
    """
    shifts = tuple(op for op in GEOMETRIC_OPS if op in _row_shift_ops(h, w))
    warps = tuple(op for op in GEOMETRIC_OPS if op not in shifts)
    groups = [("RowShift", shifts), ("Warp", warps)]
    return tuple((g, ops) for g, ops in groups if ops) + tuple((op, (op,)) for op in OPS if op not in SIGNED_OPS)


@lru_cache(maxsize=None)
def _geometric_index(device: torch.device) -> torch.Tensor:
    """Position of each op of :data:`OPS` in :data:`GEOMETRIC_OPS` (0 for the others)."""
    return torch.tensor([GEOMETRIC_OPS.index(op) if op in SIGNED_OPS else 0 for op in OPS],
                        dtype=torch.int64, device=device)


def apply_group(
    images: torch.Tensor,
    group: str,
    ops: torch.Tensor,
    levels: torch.Tensor,
    signs: torch.Tensor,
    centres: torch.Tensor,
    fill: torch.Tensor,
) -> torch.Tensor:
    """Apply a :func:`kernel_groups` group: image ``i`` gets op ``OPS[ops[i]]`` (one of the group's)
    at ``levels[i]`` with ``signs[i]`` / ``centres[i]``. All tensors (N,...) on the images' device."""
    if group in ("RowShift", "Warp"):
        geo = _geometric_index(images.device).index_select(0, ops)
        entries = (geo * (MAX_LEVEL + 1) + levels) * 2 + (signs > 0).to(torch.int64)
        return (_row_shift if group == "RowShift" else _warp)(images, entries, fill)
    return apply_op_batched(images, group, levels, signs, centres, fill)


# --------------------------------------------------------------------------- random draws


def _draw_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    return generator.device if generator is not None else device


def draw_signs(n: int, generator: torch.Generator | None, device: torch.device | str,
               shape: tuple[int, ...] = ()) -> torch.Tensor:
    """Random +-1 int64 signs of shape ``(n, *shape)`` (each with probability 1/2) on ``device``.

    Drawn on the generator's device, then moved (use a generator on ``device`` to avoid the copy).
    """
    device = torch.device(device)
    bits = torch.randint(0, 2, (n, *shape), generator=generator, device=_draw_device(generator, device))
    return (bits * 2 - 1).to(device, non_blocking=True)


def draw_centres(n: int, h: int, w: int, generator: torch.Generator | None, device: torch.device | str,
                 shape: tuple[int, ...] = ()) -> torch.Tensor:
    """Uniform pixel positions ``(cy, cx)``: int64 of shape ``(n, *shape, 2)`` on ``device``."""
    device = torch.device(device)
    at = _draw_device(generator, device)
    cy = torch.randint(0, h, (n, *shape), generator=generator, device=at)
    cx = torch.randint(0, w, (n, *shape), generator=generator, device=at)
    return torch.stack([cy, cx], dim=-1).to(device, non_blocking=True)


def apply_op(
    images: torch.Tensor,
    name: str,
    level: int,
    signs: torch.Tensor | None = None,
    fill: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    *,
    centres: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply PBA op ``name`` at ``level`` (0..9) to every image of a uint8 batch ``(N, 3, H, W)``.

    Args:
        images: uint8 tensor (N, 3, H, W) on any device; not modified.
        name: one of :data:`rolekd.augment.space.OPS`.
        level: PBA magnitude 0..9.
        signs: optional (N,) tensor of +-1 for the signed ops (+1 is PBA's positive parameter, e.g.
            ``Image.rotate(+deg)``); None draws them from ``generator``. Ignored by other ops.
        fill: RGB colour for uncovered pixels and the Cutout square (default :data:`CIFAR10_FILL`).
        generator: source of the random signs and Cutout centres (default: torch's global RNG).
        centres: Cutout only: optional (N, 2) int64 ``(cy, cx)`` square centres; None draws them
            uniformly over the image from ``generator``.

    Returns:
        A new uint8 tensor (N, 3, H, W) on the images' device.
    """
    check_images(images)
    _check_name_level(name, level)
    n, device = images.shape[0], images.device
    levels = torch.full((n,), int(level), dtype=torch.int64, device=device)
    if name in SIGNED_OPS:
        if signs is None:
            signs = draw_signs(n, generator, device)
        elif signs.shape != (n,):
            raise ValueError(f"signs must have shape ({n},), got {tuple(signs.shape)}")
        signs = signs.to(device)
    if name == "Cutout":
        if centres is None:
            centres = draw_centres(n, images.shape[2], images.shape[3], generator, device)
        elif centres.shape != (n, 2):
            raise ValueError(f"centres must have shape ({n}, 2), got {tuple(centres.shape)}")
        centres = centres.to(device=device, dtype=torch.int64)
    return apply_op_batched(images, name, levels, signs, centres, fill_tensor(fill, device))
