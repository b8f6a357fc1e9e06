"""The proxy's current policy snapshot, kept fresh off the event loop.

Authorization is pure over a :class:`enroll.snapshot.PolicySnapshot`; this is the thin adapter
that keeps one current. :meth:`LivePolicy.refresh` first asks SQLite's ``PRAGMA data_version``
on the proxy's own connection whether any other connection committed since the last look (a
read of the WAL index in shared memory: no table, no thread hop). Only then does it go to its
loader thread, which reads the registry's policy version (a one-row table bumped by triggers on
the policy tables) and rebuilds the snapshot only when that moved. So audit events and
``last_seen`` updates cost at most that one-row read, and a quiet registry costs nothing.

A rebuild re-reads only the tables whose version moved (a login's new certificate: only the
certificates). Writes the proxy makes on its own connection (issuing a user certificate at login) do not move
its own ``data_version``: the caller says so with :meth:`LivePolicy.changed`.

Callers refresh where the answer must reflect the registry as of now: before each admission,
dial and SSH certificate, and once per re-check interval (then every open session and connected
agent is checked against the same snapshot, without I/O). Concurrent refreshes share one load.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

from enroll import snapshot as snapshots
from enroll.registry import Registry
from enroll.snapshot import PolicySnapshot
from enroll.state import FleetState


class LivePolicy:
    def __init__(self, state: FleetState, registry: Registry):
        self._state = state
        self._registry = registry  # the proxy's event-loop connection: data_version only
        # SQLite connections belong to one thread: the loader keeps its own, on one thread.
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="policy")
        self._loader_registry: Registry | None = None
        self._lock = asyncio.Lock()
        self._seen: int | None = None  # data_version at the last refresh; None: look again
        self._loads_begun = 0  # loads started by refresh(), numbered
        self._fresh_from = 0  # number of the last load that finished
        self.rebuilds = 0  # snapshots built (metrics, tests)
        self.last_build_seconds = 0.0
        self.snapshot: PolicySnapshot = self._pool.submit(self._load, None).result()
        self._seen = self._registry.data_version()

    def changed(self) -> None:
        """The proxy wrote policy on its own connection: the next refresh must look."""
        self._seen = None

    async def refresh(self) -> PolicySnapshot:
        """The snapshot as of now: rebuilt (in the loader thread) only if the policy changed."""
        if self._seen is not None and self._registry.data_version() == self._seen:
            return self.snapshot
        ticket = self._loads_begun
        async with self._lock:
            if self._fresh_from > ticket:
                # a load that began after this call has finished while this one waited: it saw
                # everything committed before this call (a reconnect storm costs two loads, not
                # one per agent, although the audit writer commits between them)
                return self.snapshot
            version = self._registry.data_version()
            if self._seen is not None and version == self._seen:
                return self.snapshot  # another caller refreshed while this one waited
            self._seen = None
            self._loads_begun += 1
            begun = self._loads_begun
            current = self.snapshot
            self.snapshot = await asyncio.get_running_loop().run_in_executor(self._pool, self._load, current)
            self._seen = version  # read before the load: a commit during it is seen next time
            self._fresh_from = begun
        return self.snapshot

    async def reload(self) -> PolicySnapshot:
        """Refresh even if nothing seems to have changed (a certificate the snapshot lacks)."""
        self.changed()
        return await self.refresh()

    def close(self) -> None:
        self._pool.submit(self._close_loader).result()
        self._pool.shutdown(wait=True)

    # --- loader thread --------------------------------------------------------------------------

    def _load(self, current: PolicySnapshot | None) -> PolicySnapshot:
        if self._loader_registry is None:
            self._loader_registry = self._state.registry()
        registry = self._loader_registry
        if current is not None and snapshots.policy_version(registry) == current.version:
            return current
        started = time.perf_counter()
        built = snapshots.load(registry, current=current)
        if built is not current:
            self.last_build_seconds = time.perf_counter() - started
            self.rebuilds += 1
        return built

    def _close_loader(self) -> None:
        if self._loader_registry is not None:
            self._loader_registry.close()
            self._loader_registry = None
