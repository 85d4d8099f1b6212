"""Give freed heap memory back to the operating system after block-wise passes."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _malloc_trim():
    """Return glibc's ``malloc_trim``, or ``None`` where there is none (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_memory() -> bool:
    """Return the free memory at the top and inside the C heap to the operating system.

    Passes over data larger than memory read one block at a time, so what they hold live is
    bounded by the block. glibc keeps the freed blocks in its heap, though, and after many
    blocks of slightly different sizes the process's resident memory grows with the number
    of blocks (that is, of cells) although nothing in it is in use. Calling this after each
    block keeps resident memory bounded by the block; it costs well under a millisecond.

    Returns
    -------
    bool
        Whether any memory was released (always ``False`` without glibc).
    """
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
