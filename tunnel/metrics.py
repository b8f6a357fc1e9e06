"""The proxy's Prometheus metrics and health check (``tunnel proxy --metrics-listen``).

Two kinds of value, so the proxy needs only a few one-line hooks:

- counters the proxy bumps as things happen (:meth:`ProxyMetrics.accepted`, ``refused``,
  ``spliced``) and the registry write latency, timed around ``RegistryWriter.submit``;
- gauges and totals read from the proxy's own state at scrape time (agents by transport,
  sessions open, migrations, reconnects): nothing to keep in step, and a scrape sees exactly
  what ``tunnel status`` would.

Metrics live in a registry of their own (not prometheus-client's global one), so two proxies in
one process (tests) never share counters. They are served by a small asyncio HTTP handler on
the proxy's event loop: a scrape reads the proxy's dicts on the thread that writes them, and
never blocks the loop (rendering a few dozen series takes microseconds).

Both endpoints are unauthenticated and read-only; by default they bind to loopback
(:func:`parse_listen`). Server-side only: prometheus-client is in the ``server`` extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import time
from collections import Counter as Tally

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tunnel.log import event
from tunnel.protocol import ALPN_AGENT, ALPN_ENROLL, ALPN_USER

log = logging.getLogger("tunnel.metrics")

KIND = {ALPN_AGENT: "device", ALPN_USER: "user", ALPN_ENROLL: "enroll"}
TRANSPORTS = ("quic", "tcp")
#: A registry write still pending after this long makes /healthz answer 503: the audit log is
#: not being written (registry locked by another process, disk stalled).
WRITE_STUCK_AFTER = 30.0
#: Seconds a client gets to send its request line and headers.
REQUEST_TIMEOUT = 5.0
MAX_HEADER_LINES = 100


def parse_listen(text: str) -> tuple[str, int]:
    """``--metrics-listen``: ``PORT`` or ``:PORT`` binds loopback; ``HOST:PORT`` binds HOST.

    The metrics are unauthenticated: an operator who wants them off the host must name the
    address (``0.0.0.0:9100``); nothing binds beyond loopback by omission.
    """
    text = str(text).strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 1 <= int(port) < 65536:
        raise ValueError(f"--metrics-listen: expected PORT or HOST:PORT (e.g. 127.0.0.1:9100), got {text!r}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ProxyMetrics:
    """The proxy's metrics; ``proxy`` is read at scrape time (``agents``, ``open_sessions``,
    ``device_totals``, ``server``, ``writer``)."""

    def __init__(self, proxy) -> None:
        self.proxy = proxy
        self.registry = CollectorRegistry()
        r = self.registry
        self._accepted = Counter("fleet_proxy_connections_accepted", "Handshakes accepted, by peer kind",
                                 ["kind"], registry=r)
        self._refusals = Counter("fleet_proxy_refusals", "Refusals, by code and stage (connect, dial, "
                                 "open, device, audit, enroll)", ["code", "stage"], registry=r)
        self._bytes = Counter("fleet_proxy_session_bytes", "Session bytes spliced, by direction "
                              "(to_device, from_device)", ["direction"], registry=r)
        self._writes = Histogram(
            "fleet_proxy_registry_write_seconds",
            "Registry/audit writes: from queued to committed (durable)", registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        for kind in KIND.values():
            self._accepted.labels(kind)
        for direction in ("to_device", "from_device"):
            self._bytes.labels(direction)
        r.register(_Live(proxy))
        self._pending: dict[int, float] = {}  # id of a queued write -> monotonic time queued
        # Enrollment refusals are tallied (not audited one by one): count them as they are noted.
        tally = getattr(proxy, "refusals", None)
        if tally is not None:
            note = tally.note

            def counted(source, code, *args, **kw):
                self.refused(code, "enroll")
                return note(source, code, *args, **kw)

            tally.note = counted

    # --- hooks the proxy calls ------------------------------------------------------------------

    def accepted(self, alpn: str) -> None:
        self._accepted.labels(KIND.get(alpn, "other")).inc()

    def refused(self, code: str, stage: str) -> None:
        self._refusals.labels(str(code), stage).inc()

    def spliced(self, to_device: int, from_device: int) -> None:
        self._bytes.labels("to_device").inc(to_device)
        self._bytes.labels("from_device").inc(from_device)

    def watch_writer(self, writer) -> None:
        """Time every write the proxy queues, from ``submit`` to its commit (or failure)."""
        submit = writer.submit

        def timed(write):
            started = time.monotonic()
            future = submit(write)
            key = id(future)
            self._pending[key] = started

            def done(_):
                self._pending.pop(key, None)
                self._writes.observe(time.monotonic() - started)

            future.add_done_callback(done)
            return future

        writer.submit = timed

    # --- health ---------------------------------------------------------------------------------

    def health(self) -> tuple[bool, dict]:
        """200 when the proxy listens and its registry writer is alive and not stuck."""
        proxy = self.proxy
        listening = proxy.server is not None and not proxy.stopping
        writer = proxy.writer
        thread = getattr(writer, "_thread", None)
        writer_alive = writer is not None and (thread is None or thread.is_alive())
        oldest = min(self._pending.values(), default=None)
        waiting = round(time.monotonic() - oldest, 3) if oldest is not None else 0.0
        ok = listening and writer_alive and waiting < WRITE_STUCK_AFTER
        body = {
            "status": "ok" if ok else "unhealthy",
            "listening": listening,
            "registry_writer": "alive" if writer_alive else "dead",
            "oldest_pending_write_seconds": waiting,
            "agents": len(proxy.agents),
            "sessions": len(proxy.open_sessions),
        }
        return ok, body

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Live:
    """Values read from the proxy's state at scrape time."""

    def __init__(self, proxy):
        self.proxy = proxy

    def describe(self):
        return []  # collected only when scraped (the proxy may still be starting)

    def collect(self):
        proxy = self.proxy
        by_transport = Tally(link.transport for link in list(proxy.agents.values()))
        agents = GaugeMetricFamily("fleet_proxy_agents_connected", "Agents connected, by transport",
                                   labels=["transport"])
        for transport in sorted(set(TRANSPORTS) | set(by_transport)):
            agents.add_metric([transport], by_transport.get(transport, 0))
        yield agents
        yield GaugeMetricFamily("fleet_proxy_sessions_open", "Sessions open (start recorded, end not yet)",
                                value=len(proxy.open_sessions))
        totals = list(proxy.device_totals.values())
        yield CounterMetricFamily("fleet_proxy_agent_migrations", "Agent path changes (QUIC migrations "
                                  "and NAT rebindings) since the proxy started",
                                  value=sum(t["migrations"] for t in totals))
        yield CounterMetricFamily("fleet_proxy_agent_reconnects", "Agent connections from a device that "
                                  "had connected before, since the proxy started",
                                  value=sum(max(0, t["connections"] - 1) for t in totals))


async def serve(metrics: ProxyMetrics, host: str, port: int) -> asyncio.Server:
    """Serve ``/metrics`` and ``/healthz`` on ``host:port`` (GET or HEAD; one request a connection)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                request = await reader.readline()
                for _ in range(MAX_HEADER_LINES):
                    if (await reader.readline()) in (b"\r\n", b"\n", b""):
                        break
            status, ctype, body = _answer(metrics, request)
            head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                    "Cache-Control: no-store\r\nConnection: close\r\n\r\n").encode()
            writer.write(head if request.startswith(b"HEAD ") else head + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        except Exception:  # noqa: BLE001 - a scrape must never take the proxy down
            log.exception("metrics request failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    try:
        server = await asyncio.start_server(handle, host, port)
    except OSError as exc:
        raise ValueError(f"--metrics-listen {host}:{port}: cannot listen ({exc.strerror or exc}): "
                         "choose a free port, or an address of this host") from None
    event(log, "metrics listening", address=f"{host}:{port}", paths="/metrics,/healthz")
    if not is_loopback(host):
        event(log, "metrics are served beyond loopback, without authentication", level=logging.WARNING,
              address=f"{host}:{port}")
    return server


def _answer(metrics: ProxyMetrics, request: bytes) -> tuple[str, str, bytes]:
    parts = request.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return "400 Bad Request", "text/plain", b"bad request\n"
    method, path = parts[0], parts[1].split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        return "405 Method Not Allowed", "text/plain", b"only GET and HEAD\n"
    if path == "/metrics":
        return "200 OK", CONTENT_TYPE_LATEST, metrics.render()
    if path == "/healthz":
        ok, body = metrics.health()
        return ("200 OK" if ok else "503 Service Unavailable"), "application/json", (
            json.dumps(body, separators=(",", ":")) + "\n").encode()
    return "404 Not Found", "text/plain", b"not found: try /metrics or /healthz\n"
