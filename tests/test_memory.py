"""Issue 19: the proxy's memory stays flat over a long run without restarts.

What a leak would look like here is a table that keeps an entry per session or per connection
after it ended. These tests run many sessions through a real proxy (in this process, so its
tables can be read) over QUIC and TCP, with refused dials, a reset session and an agent killed
and moved to the other transport, and check that every table is back to its size before. The
RSS growth seen in the soak was glibc's allocator, not a leak (bytes in use flat, the heap's
free bytes growing): the proxy fixes glibc's mmap threshold at start, so large buffers go back
to the kernel when freed, trims the heap every minute and bounds SQLite's heap, whose page caches
grow with the audit table (tunnel/memory.py); all checked here.
"""

import asyncio
import gc
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys

import pytest
import yaml
from aioquic.quic.connection import QuicConnection, QuicConnectionState
from fleet_harness import until

from tunnel import cli, memory
from tunnel.client import Client, Refusal, UserIdentity
from tunnel.memory import release_free_memory, trim_available
from tunnel.proxy import Proxy
from tunnel.transport.tcp import REVERSE_POOL


def _tables(proxy: Proxy) -> dict[str, int]:
    """Sizes of every table that holds something per session, stream or connection."""
    sizes = {k: len(getattr(proxy, k))
             for k in ("agents", "peers", "sessions", "open_sessions", "device_totals", "_tasks")}
    sizes["refusal windows"] = len(proxy.refusals._open)
    sizes["pending writes"] = len(proxy.metrics._pending)
    for name, server in (("quic", proxy.server), ("tcp", proxy.tcp_server)):
        sizes[f"{name} connections"] = len(server._connections)
        sizes[f"{name} server tasks"] = len(server._tasks)
    demux = proxy.server._demux
    sizes["quic demux connections"] = len(set(demux._protocols.values()))
    sizes["quic half-open"] = len(demux._half_open)
    streams = consumed = quic_streams = h2_open = blocked = 0
    for conn in [*proxy.server._connections, *proxy.tcp_server._connections]:
        streams += len(conn._streams)
        blocked += len(conn._blocked_writers)
        quic = getattr(conn, "_quic", None)
        if quic is not None:
            consumed += len(quic._fleet_consumed)
            quic_streams += len(quic._streams)
        h2 = getattr(conn, "_h2", None)
        if h2 is not None:
            h2_open += h2.open_inbound_streams + h2.open_outbound_streams
    sizes.update({"streams": streams, "quic flow-control records": consumed,
                  "aioquic streams": quic_streams, "h2 open streams": h2_open,
                  "blocked writers": blocked})
    return sizes


async def _session(client: Client, device: str, size: int, *, reset: bool = False) -> None:
    stream, rest = await client.dial(device, "echo")
    data = os.urandom(size)
    await stream.write(data)
    if reset:  # the engineer gives up mid-session
        stream.reset(1)
        return
    stream.write_eof()
    got = bytearray(rest)
    while chunk := await stream.read(65536):
        got += chunk
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


async def _sessions(identity: UserIdentity, devices: list[str], n: int) -> None:
    client = await Client.connect(identity)
    try:
        limit = asyncio.Semaphore(6)

        async def one(i: int) -> None:
            async with limit:
                await _session(client, devices[i % len(devices)], (i % 4 + 1) * 50_000,
                               reset=i % 10 == 9)

        await asyncio.gather(*(one(i) for i in range(n)))
        for device, service in (("robot-q", "nosuch"), ("robot-gone", "echo")):
            with pytest.raises(Refusal):
                await client.dial(device, service)
    finally:
        client.close()


def test_proxy_tables_return_to_baseline_after_many_sessions(fleet, echo, monkeypatch):
    configs = {
        name: fleet.enroll_device(name, {"customer": "acme"}, {"echo": f"127.0.0.1:{echo.port}"},
                                  transport=transport)
        for name, transport in (("robot-q", "quic"), ("robot-t", "tcp"))
    }
    ops = UserIdentity.load(fleet.user("ops", ["admin"]))

    async def run() -> None:
        proxy = Proxy(fleet.state)
        proxy.trim_every = None  # trimming is checked on its own below
        await proxy.start(fleet.proxy_host, fleet.proxy_port, idle_timeout=5.0)
        agents = {name: fleet.start_agent(config) for name, config in configs.items()}
        try:
            await until(lambda: len(proxy.agents) == 2, "both agents online")
            monkeypatch.setenv("FLEET_TRANSPORT", "quic")
            await _sessions(ops, sorted(configs), 4)  # warm-up: every code path ran once
            settled = {"peers": 2, "sessions": 0, "open_sessions": 0, "streams": 0}

            def quiet():
                now = _tables(proxy)
                return all(now[k] == v for k, v in settled.items())

            await until(quiet, "the warm-up sessions to end")
            await asyncio.sleep(1)
            baseline = _tables(proxy)
            assert baseline["h2 open streams"] == REVERSE_POOL  # robot-t's, ready for sessions

            for round_, transport in enumerate(("quic", "tcp", "quic", "tcp")):
                monkeypatch.setenv("FLEET_TRANSPORT", transport)
                await _sessions(ops, sorted(configs), 30)
                if round_ == 1:  # kill -9 the QUIC agent and bring it back over TCP
                    agents["robot-q"].send_signal(signal.SIGKILL)
                    agents["robot-q"].wait()
                    raw = yaml.safe_load(configs["robot-q"].read_text())
                    raw["transport"] = "tcp"
                    configs["robot-q"].write_text(yaml.safe_dump(raw))
                    agents["robot-q"] = fleet.start_agent(configs["robot-q"])
                    await until(lambda: [link.transport for link in proxy.agents.values()]
                                 == ["tcp", "tcp"], "robot-q back over TCP")
            # robot-q's connection moved from QUIC to TCP; everything else is as before
            expected = {**baseline, "quic connections": baseline["quic connections"] - 1,
                        "quic server tasks": baseline["quic server tasks"] - 1,
                        "quic demux connections": baseline["quic demux connections"] - 1,
                        "tcp connections": baseline["tcp connections"] + 1,
                        "tcp server tasks": baseline["tcp server tasks"] + 1,
                        # each agent's TCP connection keeps REVERSE_POOL streams it opened ready
                        "h2 open streams": 2 * REVERSE_POOL}
            try:
                await until(lambda: _tables(proxy) == expected, "the tables to return to baseline")
            except AssertionError:
                diff = {k: (expected.get(k), v) for k, v in _tables(proxy).items() if expected.get(k) != v}
                raise AssertionError(f"tables (expected, now) differ after 120 sessions: {diff}") from None
        finally:
            for agent in agents.values():
                fleet.stop(agent)
            await proxy.stop()

    asyncio.run(run())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_release_free_memory_on_glibc():
    assert trim_available()
    assert release_free_memory() in (True, False)


def _ended_quic_connections() -> int:
    return sum(1 for o in gc.get_objects()
               if isinstance(o, QuicConnection) and o._state == QuicConnectionState.TERMINATED)


def test_ended_quic_connections_are_freed_by_the_periodic_release(fleet, echo, monkeypatch):
    """An ended QUIC connection is a reference cycle (aioquic keeps bound methods of the
    connection in its own frame-handler table, TLS callbacks and crypto contexts), so its
    buffers outlive it until a full garbage collection, which Python runs rarely in a busy
    proxy. ``release_free_memory`` (once a minute in the
    proxy) collects before it trims."""
    config = fleet.enroll_device("robot-q", {"customer": "acme"}, {"echo": f"127.0.0.1:{echo.port}"},
                                 transport="quic")
    ops = UserIdentity.load(fleet.user("ops", ["admin"]))
    monkeypatch.setenv("FLEET_TRANSPORT", "quic")

    async def run() -> None:
        proxy = Proxy(fleet.state)
        proxy.trim_every = None
        await proxy.start(fleet.proxy_host, fleet.proxy_port, tcp=False)
        agent = fleet.start_agent(config)
        gc.disable()  # as when the collector's thresholds have not come round yet
        try:
            await until(lambda: len(proxy.agents) == 1, "the agent online")
            for _ in range(12):  # one engineer connection per session, as tunnel proxy-command makes
                await _sessions(ops, ["robot-q"], 1)
            await until(lambda: len(proxy.server._connections) == 1, "the engineer connections to end")
            await asyncio.sleep(1)  # the last close's pending callbacks have run
            assert _ended_quic_connections() >= 12  # garbage, kept by its cycles
            release_free_memory()
            # the garbage is gone; at most the latest connection is still referenced (through the
            # error it closed with), whatever the number of sessions
            assert _ended_quic_connections() <= 1
        finally:
            gc.enable()
            fleet.stop(agent)
            await proxy.stop()

    asyncio.run(run())


def test_proxy_trims_its_heap_periodically(fleet):
    async def run() -> None:
        proxy = Proxy(fleet.state)
        proxy.trim_every = 0.05
        await proxy.start(fleet.proxy_host, fleet.proxy_port, tcp=False)
        try:
            await until(lambda: proxy.trims >= 2, "two trims")
        finally:
            await proxy.stop()

    asyncio.run(run())


# A large block freed after the allocator saw an 8 MiB one: where does the next 1 MiB buffer go?
_PROBE = """
import json, sys
from tunnel.memory import heap_info, tune_allocator
tuned = tune_allocator() if sys.argv[1] == "tune" else None
big = bytearray(8 << 20)  # glibc serves it with mmap; freeing it raises glibc's dynamic threshold
del big
before = heap_info()
block = bytearray(1 << 20)  # a session-sized buffer
during = heap_info()
del block
after = heap_info()
print(json.dumps({"tuned": tuned, "mmapped": during["mmapped"] - before["mmapped"],
                  "returned": during["mmapped"] - after["mmapped"]}))
"""


def _probe(tune: bool, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", _PROBE, "tune" if tune else "leave"], env={**clean, **env},
                         capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tuned_allocator_gives_large_buffers_back_to_the_kernel():
    """The proxy's RSS creep in the soak: once glibc freed one large mmapped block it serves
    every smaller large block from the heap, where freed buffers leave holes between live
    objects. With the thresholds fixed a 1 MiB buffer gets its own mapping and goes back when freed."""
    untuned = _probe(tune=False)
    assert untuned["mmapped"] == 0  # glibc's default: the 1 MiB buffer went into the heap
    tuned = _probe(tune=True)
    assert tuned["tuned"] is True
    assert tuned["mmapped"] >= 1 << 20  # its own mapping ...
    assert tuned["returned"] >= 1 << 20  # ... unmapped at once when freed


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_an_operators_glibc_malloc_tunables_win():
    probe = _probe(tune=True, GLIBC_TUNABLES="glibc.malloc.arena_max=4")
    assert probe["tuned"] is False
    assert probe["mmapped"] == 0  # nothing changed: glibc's dynamic threshold as the operator chose


def test_tunnel_proxy_tunes_the_allocator_first(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(memory, "tune_allocator", lambda: calls.append("tuned"))
    status = cli.main(["proxy", "--state", str(tmp_path / "no-such-state")])
    assert status != 0  # no fleet state there: refused, after the allocator was set up
    assert calls == ["tuned"]


# SQLite's page caches: what one long-lived connection holds after appending ~6 MB of rows
_SQLITE_PROBE = """
import json, os, sqlite3, sys, tempfile
from tunnel.memory import sqlite_memory, tune_allocator
tuned = tune_allocator() if sys.argv[1] == "tune" else None
conn = sqlite3.connect(os.path.join(tempfile.mkdtemp(), "registry.db"))
conn.execute("PRAGMA journal_mode=WAL")
conn.execute("CREATE TABLE audit (seq INTEGER PRIMARY KEY, device TEXT, fields TEXT)")
conn.execute("CREATE INDEX audit_device ON audit (device, seq)")
for batch in range(60):  # as the registry writer appends audit events: one transaction a batch
    with conn:
        conn.executemany("INSERT INTO audit (device, fields) VALUES (?, ?)",
                         [(f"robot-{i % 30}", os.urandom(100).hex()) for i in range(200)])
print(json.dumps({"tuned": tuned, "limit": conn.execute("PRAGMA soft_heap_limit").fetchone()[0],
                  "sqlite": sqlite_memory(), "rows": conn.execute("SELECT count(*) FROM audit").fetchone()[0]}))
"""


def _sqlite_probe(tune: bool, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", _SQLITE_PROBE, "tune" if tune else "leave"],
                         env={**clean, **env}, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout)


def test_sqlite_memory_reads_the_librarys_own_counters():
    import sqlite3

    before = memory.sqlite_memory()
    assert before is not None  # the counters of the libsqlite3 that _sqlite3 links are reachable
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("CREATE TABLE t (x TEXT)")
        conn.executemany("INSERT INTO t VALUES (?)", [("x" * 200,)] * 2000)
        during = memory.sqlite_memory()
        assert during is not None
        assert during["connections"] == before["connections"] + 1
        assert during["used"] > before["used"] + 200 * 2000  # the rows' pages, out of Python's sight
        assert during["highwater"] >= during["used"]
    finally:
        conn.close()


def test_the_proxys_sqlite_page_caches_stay_under_the_soft_limit():
    """Issue 19: a long-lived connection's page cache grows with the audit table up to 2 MB
    (SQLite's default ``cache_size``), a slow RSS climb over tens of minutes for each of the
    proxy's connections. ``tune_allocator`` (first thing in ``tunnel proxy``) sets SQLite's soft
    heap limit: the cache then reuses its pages instead of growing."""
    untuned = _sqlite_probe(tune=False)
    assert untuned["limit"] == 0  # SQLite's default: no limit
    assert untuned["sqlite"]["used"] > 2_000_000  # the default cache filled up
    tuned = _sqlite_probe(tune=True)
    assert tuned["rows"] == untuned["rows"] == 12_000  # nothing lost: evicted pages are read again
    assert tuned["limit"] == memory.SQLITE_HEAP_LIMIT
    assert tuned["sqlite"]["used"] <= memory.SQLITE_HEAP_LIMIT * 1.05
    # an operator's own glibc tunables leave glibc alone, not SQLite's limit
    theirs = _sqlite_probe(tune=True, GLIBC_TUNABLES="glibc.malloc.arena_max=4")
    assert theirs["tuned"] is False
    assert theirs["limit"] == memory.SQLITE_HEAP_LIMIT
