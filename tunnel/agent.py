"""The agent on the device: one outbound QUIC connection, a local TCP connection per session.

It listens on no network port. The loop is: dial the first proxy endpoint that answers
(jittered exponential backoff when none does), say hello (with why it reconnected), then serve
streams the proxy opens — each names a service from the config, which the agent connects to on
the device and splices. Meanwhile :class:`PathWatch` follows the kernel's choice of source
address toward the proxy: when it changes (Wi-Fi → cellular) the live connection migrates;
when keepalives go unanswered the path is declared dead and the agent migrates or reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import socket
import time
from dataclasses import dataclass

from enroll import certs
from enroll.files import write_file
from tunnel import wire
from tunnel.agent_config import AgentConfig, Endpoint
from tunnel.backoff import Backoff
from tunnel.log import event
from tunnel.protocol import ALPN_AGENT, CLOSE_NAMES, read_header
from tunnel.splice import SocketEnds, StreamEnds, splice
from tunnel.transport import Connection, Stream, TLSIdentity, TransportError, connect

log = logging.getLogger("tunnel.agent")

LOCAL_CONNECT_TIMEOUT = 5.0
MAX_SESSIONS = 64
RENEW_AT = 2 / 3  # renew when this fraction of the certificate's life is gone


def load_identity(config: AgentConfig) -> TLSIdentity:
    cert = certs.load_cert(config.cert.read_bytes())
    return TLSIdentity([cert], certs.load_key(config.key.read_bytes()), certs.load_cert(config.ca.read_bytes()))


def source_address_toward(host: str, port: int) -> str | None:
    """The local address the kernel would use to reach ``host`` now (no packet is sent)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, port))
        except OSError:
            return None  # no route: every uplink is down
        return s.getsockname()[0]


@dataclass
class Counters:
    migrations: int = 0
    reconnects: int = 0
    sessions: int = 0


class Agent:
    def __init__(self, config: AgentConfig, *, probe_interval: float = 1.0, probe_timeout: float = 1.0):
        self.config = config
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.counters = Counters()
        self.active_sessions = 0
        self.conn: Connection | None = None
        self.endpoint: Endpoint | None = None
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()
        if self.conn:
            self.conn.close(0, "agent stopping")

    # --- connection loop ------------------------------------------------------------------------

    async def run(self) -> None:
        backoff = Backoff(base=1.0, cap=30.0)
        reason: str | None = None
        outage_started: float | None = None
        while not self._stop.is_set():
            conn = await self._dial_any()
            if conn is None:
                delay = backoff.next_delay()
                event(log, "no proxy endpoint answered; retrying", delay=round(delay, 2))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                outage_started = outage_started or time.monotonic()
                continue
            backoff.reset()
            outage = round(time.monotonic() - outage_started, 3) if outage_started else None
            if reason:
                self.counters.reconnects += 1
            reason = await self._serve(conn, reason, outage)
            outage_started = time.monotonic()
            if self._stop.is_set():
                return
            event(log, "connection ended; reconnecting", reason=reason)

    async def _dial_any(self) -> Connection | None:
        """Try each endpoint the device can route to now, in config order."""
        identity = load_identity(self.config)
        for ep in self.config.proxies:
            source = source_address_toward(ep.host, ep.port)
            if source is None:
                continue
            try:
                conn = await connect(
                    ep.host, ep.port, identity=identity, server_name=ep.server_name,
                    local_addr=(source, 0),
                    alpn=ALPN_AGENT, keepalive=self.config.keepalive,
                    idle_timeout=max(60.0, self.config.keepalive * 3), handshake_timeout=3.0,
                )
            except TransportError as exc:
                code = CLOSE_NAMES.get(exc.code, exc.code) if exc.application else exc.code
                event(log, "dial failed", level=logging.WARNING, endpoint=f"{ep.host}:{ep.port}",
                      code=code, reason=exc.reason)
                continue
            except OSError as exc:
                event(log, "dial failed", level=logging.WARNING, endpoint=f"{ep.host}:{ep.port}",
                      error=str(exc))
                continue
            self.endpoint = ep
            return conn
        return None

    async def _serve(self, conn: Connection, reconnect: str | None, outage: float | None) -> str:
        """Run one connection until it ends; return why it ended."""
        self.conn = conn
        event(log, "connected", endpoint=f"{self.endpoint.host}:{self.endpoint.port}",
              local="{}:{}".format(*conn.local_address[:2]))
        tasks = [asyncio.create_task(self._accept(conn)), asyncio.create_task(self._watch_path(conn))]
        try:
            await self._hello(conn, reconnect, outage)
            await self._maybe_renew(conn)
            closed = asyncio.create_task(conn.wait_closed())
            stop = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait({closed, stop, *tasks}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if closed in done and closed.result() is not None:
                err = closed.result()
                return CLOSE_NAMES.get(err.code, err.reason) if err.application else err.reason
            for t in done:
                if t in tasks and not t.cancelled() and isinstance(t.result(), str):
                    return t.result()
            return "closed"
        except TransportError as exc:
            return exc.reason or "transport error"
        finally:
            for t in tasks:
                t.cancel()
            conn.close(0, "agent reconnecting")
            self.conn = None

    async def _request(self, conn: Connection, op: str, **args) -> wire.Message:
        stream = await conn.open_stream()
        await stream.write(wire.encode("request", op=op, args=args))
        stream.write_eof()
        reply, _ = await read_header(stream)
        return reply

    async def _hello(self, conn: Connection, reconnect: str | None, outage: float | None) -> None:
        args = {"uplink": self.endpoint.via} if self.endpoint.via else {}
        if reconnect:
            args.update(reconnect=reconnect, outage=outage)
        await self._request(conn, "hello", **args)

    async def _maybe_renew(self, conn: Connection) -> None:
        cert = certs.load_cert(self.config.cert.read_bytes())
        life = cert.not_valid_after_utc - cert.not_valid_before_utc
        if dt.datetime.now(dt.UTC) < cert.not_valid_before_utc + life * RENEW_AT:
            return
        key = certs.load_key(self.config.key.read_bytes())
        from cryptography.hazmat.primitives.serialization import Encoding

        csr = certs.make_csr(key).public_bytes(Encoding.PEM).decode()
        reply = await self._request(conn, "renew", csr=csr)
        if not reply.get("ok"):
            event(log, "renewal refused", level=logging.WARNING, reason=reply.get("reason"))
            return
        new = certs.load_cert(reply["body"]["cert"].encode())
        certs.verify_issued_by(new, certs.load_cert(self.config.ca.read_bytes()))
        write_file(self.config.cert, certs.cert_pem(new))
        event(log, "certificate renewed", not_after=new.not_valid_after_utc.isoformat())

    # --- path watching ------------------------------------------------------------------------

    async def _watch_path(self, conn: Connection) -> str:
        """Migrate when the kernel's source address changes; give up when the path stays dead."""
        ep = self.endpoint
        misses = 0
        last_ping = time.monotonic()
        while True:
            await asyncio.sleep(self.probe_interval)
            source = source_address_toward(ep.host, ep.port)
            if source is None:
                continue  # no uplink at all: wait for one (the QUIC idle timeout is the backstop)
            if source != conn.local_address[0]:
                old = conn.local_address[0]
                try:
                    await conn.migrate((source, 0))
                except OSError as exc:
                    event(log, "migration failed", level=logging.WARNING, error=str(exc))
                    continue
                self.counters.migrations += 1
                event(log, "migrated", old=old, new=source)
                misses, last_ping = 0, 0.0  # probe the new path at once
            due = misses > 0 or time.monotonic() - last_ping >= self.config.keepalive
            if not due:
                continue
            last_ping = time.monotonic()
            try:
                await conn.ping(self.probe_timeout)
                misses = 0
            except TimeoutError:
                misses += 1
                event(log, "keepalive unanswered", level=logging.WARNING, misses=misses)
                if misses >= self.config.dead_after:
                    return "path dead: keepalives unanswered"

    # --- sessions -----------------------------------------------------------------------------

    async def _accept(self, conn: Connection) -> None:
        while True:
            stream = await conn.accept_stream()
            asyncio.create_task(self._session(stream))

    async def _session(self, stream: Stream) -> None:
        try:
            msg, rest = await read_header(stream)
        except (wire.HeaderError, TimeoutError, TransportError) as exc:
            with contextlib.suppress(TransportError):
                await stream.write(wire.reply_refused(getattr(exc, "code", "bad_header"), str(exc)))
                stream.write_eof()
            return
        if msg.kind != "open":
            await self._refuse(stream, "bad_header", f"expected an open header, got {msg.kind!r}")
            return
        found = self.config.service_for(msg["service"])
        if found is None:
            listed = ", ".join(sorted(self.config.services)) or "none"
            await self._refuse(stream, "unknown_service",
                               f"{self.config.device_id} exposes no service {msg['service']!r} (listed: {listed})")
            return
        name, (host, port) = found
        if self.active_sessions >= MAX_SESSIONS:
            await self._refuse(stream, "over_limit", f"{self.config.device_id} has {MAX_SESSIONS} sessions open")
            return
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), LOCAL_CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            await self._refuse(stream, "connection_refused",
                               f"service {name} ({host}:{port}) on {self.config.device_id} is not accepting: {exc}")
            return
        try:
            await stream.write(wire.reply_ok(session=msg["session"]))
        except TransportError:
            writer.close()
            return
        self.active_sessions += 1
        self.counters.sessions += 1
        event(log, "session", session=msg["session"], service=name, identity=msg["identity"])
        try:
            await splice(StreamEnds(stream, rest), SocketEnds(reader, writer))
        finally:
            self.active_sessions -= 1
            writer.close()

    async def _refuse(self, stream: Stream, code: str, reason: str) -> None:
        event(log, "session refused", level=logging.WARNING, code=code, reason=reason)
        with contextlib.suppress(TransportError):
            await stream.write(wire.reply_refused(code, reason))
            stream.write_eof()
