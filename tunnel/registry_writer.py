"""The proxy's registry writes, off the event loop and committed in groups.

Every connect, session and refusal is an audit event in SQLite with ``synchronous=FULL``: one
fsync each would stall the event loop (and every other agent's handshake) for milliseconds per
event — thousands of agents reconnecting after a proxy restart would queue for tens of seconds.
Instead one thread owns a registry connection and commits whatever has queued up in one
transaction, one fsync. Each write runs in its own savepoint, so a failing write is undone alone.
``submit`` returns a future that resolves once the transaction holding the write has committed:
await it where the caller must be told only after the event is durable (``session.start``).

While another process holds the registry locked longer than SQLite's busy timeout (30 s), the
batch is retried, not dropped: an audit event is never lost to a lock. Callers that must answer
someone wait with a bound of their own (the proxy refuses a session whose start is not durable
within seconds) and leave the write queued. Other failures (disk full) fail the batch's futures.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Any

from enroll.state import FleetState

log = logging.getLogger("tunnel.registry")
MAX_BATCH = 512
_STOP = object()


class RegistryWriter:
    def __init__(self, state: FleetState):
        self._state = state
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closing = threading.Event()
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="registry-writer", daemon=True)
        self._thread.start()

    def submit(self, write: Callable[[Any], Any]) -> asyncio.Future:
        """Run ``write(db)`` in a write transaction; the future resolves after COMMIT."""
        future = self._loop.create_future()
        self._queue.put((write, future))
        return future

    async def close(self) -> None:
        """Commit what is queued, then stop the thread (a batch waiting on a lock gets one more
        busy timeout, then fails)."""
        self._closing.set()
        self._queue.put(_STOP)
        await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
        registry = self._state.registry()
        try:
            while True:
                batch = [self._queue.get()]
                while len(batch) < MAX_BATCH:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                stop = _STOP in batch
                items = [b for b in batch if b is not _STOP]
                if items:
                    self._commit(registry, items)
                if stop:
                    return
                # not kept while waiting for the next write: a write's closure may hold a whole
                # connection (an agent's disconnect audit), kept for as long as the proxy is idle
                del batch, items
        finally:
            registry.close()

    def _commit(self, registry, items) -> None:
        while True:
            results: list[tuple[asyncio.Future[Any], Any, Exception | None]] = []
            try:
                with registry.write() as db:
                    for write, future in items:
                        try:
                            with db.atomic():  # a savepoint: a failing write is undone alone
                                results.append((future, write(db), None))
                        except Exception as exc:  # noqa: BLE001 - handed to the waiting caller
                            results.append((future, None, exc))
            except sqlite3.OperationalError as exc:
                if _locked(exc) and not self._closing.is_set():
                    # Nothing was written (the transaction never began or was rolled back):
                    # run the same writes again once the other process lets go.
                    log.warning("registry locked by another process; retrying %d writes", len(items))
                    continue
                log.exception("registry commit failed")
                results = [(future, None, exc) for _, future in items]
            except Exception as exc:  # the commit itself failed: nobody's write is durable
                log.exception("registry commit failed")
                results = [(future, None, exc) for _, future in items]
            break
        for future, value, error in results:
            self._loop.call_soon_threadsafe(_settle, future, value, error)


def _locked(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _settle(future: asyncio.Future, value, exc) -> None:
    if future.cancelled():
        return
    if exc is not None:
        future.set_exception(exc)
        future.exception()  # fire-and-forget callers must not warn "exception never retrieved"
    else:
        future.set_result(value)
