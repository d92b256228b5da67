"""Handing freed heap memory back to the operating system (glibc; elsewhere these do nothing).

glibc keeps freed memory of large, mixed-size allocations in its heap, where it still counts as resident: a loader
that reads and frees one float tensor after another (quantizing as it reads) would end holding that garbage on top
of the model, and an RSS-sampled peak would miss allocations that reuse it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim, libc.mallopt  # noqa: B018 (glibc has both; another libc may not)
    except (OSError, AttributeError):
        return None
    return libc


def return_freed_memory() -> None:
    """Give the heap's free pages back to the OS (glibc's ``malloc_trim(0)``); cheap, safe to call often."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def unmap_large_blocks(threshold: int = 1 << 20) -> None:
    """From now on this process maps every block of ``threshold`` bytes or more on its own and unmaps it when
    freed (glibc's dynamic threshold would keep freed blocks in the heap), so RSS peaks measure live tensors."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, threshold)  # fixed: no longer raised by each free
        libc.mallopt(_M_TRIM_THRESHOLD, threshold)
