"""Handing freed heap memory back to the operating system.

glibc keeps freed memory of large, mixed-size allocations in its heap, where it still counts as resident; a loader
that reads and frees one float tensor after another (quantizing as it reads) would end holding that garbage
on top of the model. ``malloc_trim`` returns it; elsewhere (no glibc) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def return_freed_memory() -> None:
    """Give the heap's free pages back to the OS (glibc's ``malloc_trim(0)``); cheap, safe to call often."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
