"""Process-wide settings for a training process on the CPU.

:func:`keep_freed_memory`: glibc's ``malloc`` hands large blocks (a batch's activations, several MB each)
back to the kernel when they are freed and maps them again at the next step, so every step of a CPU
training run pays thousands of page faults and the kernel's zeroing of the pages (measured: 1,100-10,600
minor faults per 4-bit II-KD step of resnet_tiny, 3-20 ms of system time per 240 ms step, more with two
worker processes side by side). Keeping freed memory in the process (no trimming, mmap only above 32 MB)
removes them; numerics are untouched. ``rolekd`` commands and pipeline workers call it before training.

:func:`worker_environment`: the environment for a worker process started from here (``rolekd run``'s
``pipeline.workers``), with glibc's ``glibc.malloc.hugetlb=1`` tunable, which backs the allocator's heap
with transparent huge pages where the kernel allows them on request (``madvise`` mode, the common
default): fewer TLB misses on the large activation tensors (measured 2-3% on the II-KD step, issue 21).
A tunable is read when a process starts, so it can only be given to processes started later.

``ROLEKD_MALLOC=default`` leaves glibc's behaviour as it is, for both.
"""

from __future__ import annotations

import ctypes
import os
import platform

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters
_DONE: list[bool] = []


def keep_freed_memory() -> bool:
    """Tell glibc's allocator to keep freed memory in the process (once per process); True if it took
    effect (False on another C library, or with ``ROLEKD_MALLOC=default``)."""
    if _DONE:
        return _DONE[0]
    ok = False
    if _tuned():
        try:
            libc = ctypes.CDLL("libc.so.6")
            ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
                      and libc.mallopt(_M_TOP_PAD, 64 << 20))
        except (OSError, AttributeError):
            ok = False
    _DONE.append(ok)
    return ok


def freed_memory_kept() -> bool:
    """Whether :func:`keep_freed_memory` took effect in this process (False before it is called)."""
    return bool(_DONE and _DONE[0])


def _tuned() -> bool:
    return os.environ.get("ROLEKD_MALLOC", "").lower() != "default" and platform.libc_ver()[0] == "glibc"


def worker_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with ``glibc.malloc.hugetlb=1`` added to ``GLIBC_TUNABLES``
    (a hugetlb setting already there is kept)."""
    env = dict(os.environ if env is None else env)
    if not _tuned():
        return env
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    if not any(t.startswith("glibc.malloc.hugetlb=") for t in tunables):
        tunables.append("glibc.malloc.hugetlb=1")
    env["GLIBC_TUNABLES"] = ":".join(tunables)
    return env
