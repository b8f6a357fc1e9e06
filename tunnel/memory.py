"""Keep the proxy's RSS at the memory it uses: fixed glibc thresholds, a bounded SQLite heap, a periodic collection and trim.

Why (measured in issue 19 under the soak's load: 30 agents, sessions of 64 KiB-4 MiB, the
``FLEET_MEMORY_TRACE`` records below): no proxy table grows and live Python objects stay flat,
yet the proxy's RSS crept up ~1-1.4 MB a minute for 25 minutes. The causes and their remedies:

* **glibc's dynamic mmap threshold** (``tune_allocator``, once at proxy start). glibc serves a
  block of 128 KiB or more with its own ``mmap`` and gives it back at ``free`` - but when such a
  block is freed it raises the threshold to that block's size (up to 32 MiB), and from then on
  every block below it comes from the heap. The proxy's large blocks (QUIC send and receive
  buffers of a 1 MiB stream window, joined reads, TLS records) then land in the heap between
  small long-lived objects; freed, they leave holes that the heap's top cannot shrink past, and
  a hole re-touched between two trims is resident again. With the thresholds fixed at glibc's
  own defaults (128 KiB; ``mallopt`` turns the dynamic adjustment off) large blocks always go
  to ``mmap`` and back to the kernel when freed. Measured side by side under the same load (10
  minutes of soak-shaped churn, no restarts): glibc's free heap bytes 3-6 MB instead of
  15-20 MB, the heap's RSS 17-21 MB instead of swinging 23-41 MB between trims, the proxy's
  RSS 75-80 MB instead of 82-91 MB. Cost: one ``mmap``/``munmap`` pair per large buffer; no
  CPU-per-MB difference showed in the throughput case beyond its noise. The 30-minute soak's
  slope fell from 1.0-1.4 to 0.39 MB/min; most of what was left were ended connections still
  referenced (fixed where they were held: ``AgentLinks.serve``, the registry writer), after
  which it was 0.10 MB/min.
  ``M_ARENA_MAX`` was measured as well (``arena_max=1``): no difference, the proxy's few
  threads (registry writer, policy loader) allocate little, so it is left at glibc's default.
  An operator's own ``GLIBC_TUNABLES=glibc.malloc.…`` wins: then nothing is changed.
* **Garbage waiting for the collector** (``release_free_memory``, once a minute). Every ended
  QUIC connection is a reference cycle in aioquic (bound methods of the connection in its own
  frame-handler table, TLS callbacks, crypto contexts; ~600 objects with their crypto and
  stream buffers): 4,000-9,000 such unreachable objects a minute waited for Python's rare full
  collection, holding their buffers meanwhile. Once a minute the proxy runs a full collection
  (0.1 s for 85,000 objects on a loaded 2-core machine: a pause far below every keepalive and
  dead-peer timeout) and then ``malloc_trim(0)``, which returns every whole free page of every
  glibc arena (``MADV_DONTNEED``).

* **SQLite's page caches** (``limit_sqlite_heap``, once at proxy start, with the glibc
  thresholds). Each of the proxy's long-lived registry connections (the event loop's, the
  registry writer's, the policy loader's) caches up to 2 MB of pages by default and fills it as
  the audit table grows: +40-65 KB a minute at the soak's ~40-60 sessions a minute (``sqlite`` in the
  ``FLEET_MEMORY_TRACE`` records; 1.1-1.5 MB in all in the first minutes), ~6.6 MB at most,
  spread over an hour. A 2 MB soft limit on SQLite's
  whole heap in the process caps it at a third of that.

None is needed for correctness; they keep the RSS an operator watches honest. Only glibc has
``mallopt``/``malloc_trim``; elsewhere (musl, macOS) only the collection runs.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys

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


#: ``mallopt`` parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: blocks this large or larger get their own ``mmap`` and go back to the kernel when freed:
#: glibc's default, fixed (setting it turns off glibc's raising it after each large free).
#: 32 KiB was tried (``GLIBC_TUNABLES``, two 10-minute soaks): the C heap then stopped at 16-19 MB
#: where it had climbed 20 -> 28 MB, yet the RSS still rose 0.13-0.32 MB/min; and a 64 KiB buffer
#: costs 49 µs from ``mmap`` against 1.2 µs from the heap. On a quiet machine (8 alternating pairs
#: of ``bench/run throughput --quick``, every process under the same setting) it cost the proxy
#: 8-13 % more CPU per MB (medians, CPU-ms/MB, 128 KiB vs 32 KiB: TLS/TCP engineer hop 17.2 vs
#: 19.6 down, 23.4 vs 26.4 up; all-QUIC 31.8 vs 33.3 down, 32.0 vs 35.8 up): not taken.
MMAP_THRESHOLD = 128 * 1024
#: free memory at the heap's top beyond this is returned at once (glibc's default, fixed too:
#: the dynamic adjustment raises it to twice the largest freed mmapped block)
TRIM_THRESHOLD = 128 * 1024


def _load_mallopt():
    try:
        fn = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


#: SQLite's heap in the whole proxy (every connection's page cache, schemas, statements): its
#: soft limit. The proxy's few connections need ~0.6 MB besides their caches (measured);
#: SQLite's default lets each cache 2 MB, reached only after tens of minutes of audit appends.
SQLITE_HEAP_LIMIT = 2 * 1024 * 1024


def limit_sqlite_heap(limit: int = SQLITE_HEAP_LIMIT) -> None:
    """Bound the memory SQLite holds in this process (``PRAGMA soft_heap_limit``).

    Why: each SQLite connection keeps up to 2 MB of database pages (``cache_size`` -2000) and
    never gives them back. The proxy's long-lived connections (the event loop's, the registry
    writer's, the policy loader's) fill theirs slowly as the audit table grows - measured in
    the soak: +40-65 KB a minute at 40-60 sessions a minute, so 6 MB of RSS creep spread over an hour
    or more. The soft limit is process-wide (one setting covers connections opened anywhere in
    the proxy, now or later): above it a page cache reuses its own least recently used pages
    instead of growing. Pages evicted are read again from the kernel's page cache (the registry
    is a local file): microseconds, off the event loop for the writer and the policy loader.
    It is soft: an allocation never fails because of it.

    Set through the library's C call (``sqlite3_soft_heap_limit64``, the one the pragma makes),
    like :class:`_SQLiteStatus`'s counters: this module stays out of the database itself.
    """
    import _sqlite3
    import ctypes

    try:
        set_limit = ctypes.CDLL(_sqlite3.__file__).sqlite3_soft_heap_limit64
    except (OSError, AttributeError):  # a build without it: the caches keep their default
        return
    set_limit.argtypes, set_limit.restype = [ctypes.c_int64], ctypes.c_int64
    set_limit(int(limit))


def tune_allocator() -> bool | None:
    """Fix glibc's mmap and trim thresholds for this process, bound SQLite's heap (see the
    module docstring and :func:`limit_sqlite_heap`: why).

    Call it once, early in a long-running process (the proxy calls it first thing in ``tunnel
    proxy``). Returns True if glibc's thresholds were set, False if glibc refused or the
    operator's ``GLIBC_TUNABLES`` already set malloc parameters (theirs win), None where there is
    no ``mallopt`` (not glibc). SQLite's limit is set in every case.
    """
    limit_sqlite_heap()
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    mallopt = _load_mallopt()
    if mallopt is None:
        return None
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


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
# heap (bytes in use, free, mmapped) before and after a full garbage collection, SQLite's own heap
# (``sqlite_memory``: page caches live there, out of Python's sight) and its open connections, how many objects
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


class _SQLiteStatus:
    """SQLite's own allocator counters, read from the ``libsqlite3`` that ``_sqlite3`` links.

    ``sqlite3_memory_used`` is every byte SQLite holds through ``malloc`` (page caches, schema,
    prepared statements) in the whole process, all connections together; the page-cache
    "overflow" counter is the part that is page cache. Python cannot see either. The extension
    module's own handle is used because ``dlsym`` on it searches the libraries it was linked
    with: the counters come from the very copy of SQLite the proxy's connections use.
    """

    #: ``sqlite3_status64`` operations (sqlite3.h)
    MEMORY_USED, PAGECACHE_OVERFLOW, MALLOC_COUNT = 0, 2, 9

    def __init__(self) -> None:
        import _sqlite3

        lib = ctypes.CDLL(_sqlite3.__file__)
        self._status = lib.sqlite3_status64
        self._status.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int64),
                                 ctypes.c_int]
        self._status.restype = ctypes.c_int

    def read(self, op: int) -> tuple[int, int] | None:
        current, highwater = ctypes.c_int64(), ctypes.c_int64()
        if self._status(op, ctypes.byref(current), ctypes.byref(highwater), 0) != 0:
            return None
        return current.value, highwater.value

    def record(self) -> dict[str, int | None]:
        import sqlite3

        used = self.read(self.MEMORY_USED)
        cache = self.read(self.PAGECACHE_OVERFLOW)
        count = self.read(self.MALLOC_COUNT)
        return {"used": used and used[0], "highwater": used and used[1], "page_cache": cache and cache[0],
                "allocations": count and count[0],
                "connections": sum(1 for o in gc.get_objects() if isinstance(o, sqlite3.Connection))}


def sqlite_memory() -> dict[str, int | None] | None:
    """SQLite's heap in this process (bytes in use, its high-water mark, page cache, allocations)
    and how many ``sqlite3`` connections are open; None if the library's counters are unreachable."""
    global _sqlite_status
    if _sqlite_status is None:
        try:
            _sqlite_status = _SQLiteStatus()
        except (OSError, AttributeError, ImportError):
            return None
    return _sqlite_status.record()


_sqlite_status: _SQLiteStatus | None = None


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
               "gc_collections": [g["collections"] for g in gc.get_stats()], "sqlite": sqlite_memory(),
               "pymalloc_blocks": sys.getallocatedblocks()}
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
