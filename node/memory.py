"""Keeping a process's memory flat while it streams large files.

glibc serves large allocations (over 128 KiB: every 256 KiB document chunk and its
protobuf copies) with mmap, but after the first such block is freed it raises that
threshold, so later chunks come from the heap; with gRPC's threads spread over several
arenas the heaps fragment and the resident size creeps up with the bytes moved (measured:
peak RSS of the hub from about 90 MB to over 150 MB for one 1 GiB transfer under load).
Fixing the threshold and capping the arenas keeps chunk buffers going straight back to
the system. Called once at start, before gRPC starts its threads; a no-op off glibc.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util

__all__ = ["flat_malloc"]

_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 128 * 1024
ARENA_MAX = 2


def flat_malloc() -> bool:
    """Sets glibc's mmap threshold and arena cap; True if it was applied."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        libc.mallopt(_M_ARENA_MAX, ARENA_MAX)
        return bool(ok)
    return False
