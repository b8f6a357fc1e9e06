"""Hand freed heap memory back to the operating system (glibc ``malloc_trim``).

Why: the proxy's live memory is flat over a long run (sessions, connections and their buffers
are all released), but glibc keeps what Python frees inside its heap. Session traffic
allocates and frees many buffers of 64 KiB to 1 MiB (flow-control windows, send buffers);
after the first large free glibc raises its mmap threshold, so later buffers of that size come
from the heap, and the free space between the few long-lived allocations there is kept rather
than returned. RSS then creeps up by the free, reusable part of the heap (measured in issue 19:
bytes in use flat at 12-15 MB while the heap's free part grew to ~15 MB before levelling off).
``malloc_trim(0)`` returns every whole free page of every arena (``MADV_DONTNEED``), which keeps
RSS near what is actually in use. It is not needed for correctness (the free part is reused and
bounded); it keeps the RSS an operator watches honest.

Only glibc has ``malloc_trim``; elsewhere (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes

#: seconds between trims in a running proxy; a trim holds the allocator for milliseconds (22 ms
#: measured for a badly fragmented 70 MB heap), so once a minute costs nothing noticeable
TRIM_INTERVAL = 60.0


def _load_malloc_trim():
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library this process already uses
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_malloc_trim = _load_malloc_trim()


def trim_available() -> bool:
    return _malloc_trim is not None


def release_free_memory() -> bool | None:
    """Return free heap pages to the OS: True if some were, False if none, None if unsupported."""
    if _malloc_trim is None:
        return None
    return bool(_malloc_trim(0))
