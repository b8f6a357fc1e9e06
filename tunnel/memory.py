"""Hand freed memory back to the operating system: collect cyclic garbage, then ``malloc_trim``.

Why (measured in issue 19 under the soak's load: 30 agents, 4 MiB sessions, FLEET_MEMORY_TRACE
below): no proxy table grows, but every ended QUIC connection is a reference cycle in aioquic
(bound methods of the connection in its own frame-handler table, TLS callbacks, crypto
contexts; ~600 objects with their crypto and stream buffers), and 4,000-9,000 such unreachable
objects a minute waited for Python's rare full collection, holding their buffers meanwhile.
(Collecting them did not by itself flatten the soak's ~1 MB/min RSS creep: see bench/RESULTS.md.)
Once a minute the proxy now runs a full collection (0.1 s for 85,000 objects on a loaded 2-core
machine: a pause far below every keepalive and dead-peer timeout) and then
``malloc_trim(0)``, which returns every whole free page of every glibc arena (``MADV_DONTNEED``):
RSS stays near what is in use. Neither is needed for correctness; they keep the RSS an
operator watches honest. (A fixed glibc mmap threshold was tried as well and did not lower RSS.)

Only glibc has ``malloc_trim``; elsewhere (musl, macOS) only the collection runs.
"""

from __future__ import annotations

import ctypes
import gc
import os

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
    """Return free heap pages to the OS: True if some were, False if none, None if unsupported.

    A full garbage collection runs first: ended QUIC connections are reference cycles (the
    connection, its protocol and their callbacks point at each other), so their buffers stay
    allocated until Python's occasional full collection; collecting here lets this trim return
    them (measured under the soak: 5,000-7,000 unreachable objects a minute).
    """
    trace_memory()
    gc.collect()
    if _malloc_trim is None:
        return None
    return bool(_malloc_trim(0))


# --- diagnostics (off by default) ---------------------------------------------------------------
#
# ``FLEET_MEMORY_TRACE=/some/dir`` makes every ``release_free_memory`` call (once a minute in the
# proxy) also append one JSON line to ``/some/dir/memory-<pid>.jsonl``: RSS, glibc's view of its
# heap (bytes in use, free, mmapped) before and after a full garbage collection, how many objects
# that collection found unreachable, the garbage collector's counters, and the object types whose
# live count grew most since the first record. ``FLEET_MEMORY_TRACE_FRAMES=N`` adds tracemalloc
# (N frames deep) and the allocation sites whose traced size grew most. It exists to tell a leak
# (live objects or bytes grow at one site) from garbage waiting for the collector or from
# allocator fragmentation (glibc free bytes grow, bytes in use flat) under real load. It costs
# CPU (tracemalloc a lot): never set it in production.

TRACE_ENV = "FLEET_MEMORY_TRACE"
TRACE_FRAMES_ENV = "FLEET_MEMORY_TRACE_FRAMES"


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]


def heap_info() -> dict[str, int] | None:
    """glibc's ``mallinfo2`` (every arena): heap bytes in use and free, mmapped bytes."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    m = fn()
    return {"heap": m.arena, "in_use": m.uordblks, "free": m.fordblks, "mmapped": m.hblkhd}


def _rss_kb() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class _Tracer:
    def __init__(self, directory: str, frames: int):
        self.path = os.path.join(directory, f"memory-{os.getpid()}.jsonl")
        self.tracemalloc = None
        if frames > 0:
            import tracemalloc

            self.tracemalloc = tracemalloc
            tracemalloc.start(frames)
        self.first = None
        self.first_types: dict[str, int] | None = None

    @staticmethod
    def _types() -> dict[str, int]:
        import gc

        counts: dict[str, int] = {}
        for obj in gc.get_objects():
            name = type(obj).__qualname__
            counts[name] = counts.get(name, 0) + 1
        return counts

    def dump(self) -> None:
        import gc
        import json
        import time

        rec = {"t": time.time(), "rss_kb": _rss_kb(), "heap": heap_info(), "gc_count": gc.get_count(),
               "gc_collections": [g["collections"] for g in gc.get_stats()]}
        rec["unreachable"] = gc.collect()
        rec["heap_after_gc"] = heap_info()
        types = self._types()
        rec["objects"] = sum(types.values())
        if self.first_types is None:
            self.first_types = types
        else:
            diff = sorted(((n - self.first_types.get(k, 0), k) for k, n in types.items()), reverse=True)
            rec["types"] = [[k, d, types[k]] for d, k in diff[:20]]
        if self.tracemalloc is not None:
            tm = self.tracemalloc
            snap = tm.take_snapshot().filter_traces([tm.Filter(False, tm.__file__)])
            rec["traced"] = tm.get_traced_memory()[0]
            if self.first is None:
                self.first = snap
            else:
                rec["growth"] = [{"size_diff": s.size_diff, "count_diff": s.count_diff, "size": s.size,
                                  "where": s.traceback.format()}
                                 for s in snap.compare_to(self.first, "traceback")[:15]]
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")


_tracer: _Tracer | None = None


def trace_memory() -> None:
    """One ``FLEET_MEMORY_TRACE`` record, if that variable is set (the first call starts tracing)."""
    global _tracer
    directory = os.environ.get(TRACE_ENV)
    if not directory:
        return
    if _tracer is None:
        _tracer = _Tracer(directory, int(os.environ.get(TRACE_FRAMES_ENV) or 0))
    _tracer.dump()
