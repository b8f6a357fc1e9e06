"""TLS 1.3 over TCP with HTTP/2 framing (the h2 library) -- the transport for UDP-blocking networks.

Same surface as ``quic.py`` (``connect``/``serve`` keyword names and meaning, ``Connection``,
``Stream``, ``TransportError``/``StreamReset``/``Refused`` semantics), so the proxy, the agent and
the engineer client do not know which transport they hold.

This module is the asyncio adapter: ``tls_records.TLSProtocol`` carries TLS over the socket,
``h2session.FleetH2Session`` is the protocol below (sans-I/O), and the streams are the shared
core's (``core.py``). It keeps connecting, serving, authorizing, the idle timer and closing.
(About 850 lines: this protocol description, the adapter, ``connect()``'s certificate and
hello checks and the server. What stands alone -- TLS records, the h2 session, the stream core --
is already apart.)

Why HTTP/2 through h2 rather than a home-made framing
------------------------------------------------------
* h2 is a small, pure-Python, well-kept sans-IO implementation (python-hyper; the HTTP/2 stack
  of httpx/hypercorn), fuzzed and conformance-tested; a home-made multiplexer would have to
  re-invent and re-debug all of the below.
* Per-stream *and* per-connection flow control (WINDOW_UPDATE) are built in; credit is returned
  only through ``acknowledge_received_data()``, which we call when the application ``read()``s,
  exactly like the QUIC transport's credit-on-consumption.
* Stream semantics map 1:1 to QUIC bidirectional streams: DATA with END_STREAM is the FIN of a
  half-close, RST_STREAM(code) is RESET_STREAM + STOP_SENDING (both directions abort with the
  application's code), GOAWAY carries the connection close (code and reason, see below),
  PING/PING-ACK measures the round trip.
* The stream payload is opaque bytes: the session headers inside the streams use the same codec
  (``tunnel.wire``) on both transports. The HTTP/2 header block of a stream is a fixed,
  minimal pseudo-header set that only names the stream's role (below).

Wire protocol inside the TLS connection (ALPN is ours -- fleet-agent/1, fleet-user/1,
fleet-enroll/1 -- and the bytes inside are always HTTP/2):

* The dialer is the HTTP/2 client. Right after TLS it sends the connection preface and a
  ``GET /fleet/hello`` request (END_STREAM). The server answers ``200`` with
  ``fleet-reverse-pool: N`` and ``fleet-idle-timeout: S`` headers and a body holding the fleet
  CA certificate (and intermediates) as PEM. ``connect()`` returns only after this answer, so a
  client holding only a CA *pin* (enrollment) checks ``spki_pin(CA) == pin`` and that the TLS
  leaf verifies against that CA before any application byte is sent. The server answers only
  after its own client-certificate checks passed (it runs ``authorize()`` meanwhile, as QUIC
  does after the handshake).
* Streams opened by the client: ``POST /fleet/stream``; the server answers ``200`` at once.
* Streams opened by the server (HTTP/2 only lets the client open streams): the client keeps a
  pool of N idle ``POST /fleet/reverse`` requests open (N from the hello, default 8). The
  server's ``open_stream()`` claims one by sending its ``200`` response headers -- no round
  trip, like QUIC -- and the client, seeing the response, delivers the stream to its
  ``accept_stream()`` and opens a replacement. Only when more than N streams are opened within
  one round trip does ``open_stream()`` on the server wait (about one RTT) for replacements.
  Idle pool streams are invisible to both applications.
* Connection close: GOAWAY whose additional data is the UTF-8 JSON object
  ``{"code": int, "reason": str, "application": bool}``; the peer raises
  ``TransportError(wire_code, reason, application=..., remote=True)`` (kind ``refused`` for an
  application close). ``Refused(wire_code, reason)`` from ``authorize()`` therefore reaches the
  client as an application close with that code and reason. Certificate problems found by the server after the TLS handshake (no certificate on a
  non-anonymous ALPN, ``verify_peer_chain`` failures) close with ``application=False`` and code
  ``0x100 + TLS alert`` (116, 42, 45), like QUIC's CRYPTO_ERROR codes; problems OpenSSL finds
  during the handshake reach the client as a real TLS alert, mapped to the same codes. The
  GOAWAY error code itself is the 32-bit HTTP/2 field: ``code`` when it fits, else
  INTERNAL_ERROR.

TLS: TLS 1.3 only, no system trust store. The server requests a client certificate
(CERT_OPTIONAL, so anonymous ALPNs work) and OpenSSL checks it against ``identity.ca``; after the
handshake ``policy.verify_peer_chain(leaf, [], identity.ca, purpose="client")`` checks it again
(Python 3.11's ssl cannot hand out the peer's intermediates). The client verifies the server with
OpenSSL against ``ca`` + ``server_name`` (so our certificate is never sent to an interceptor) and
then with ``verify_peer_chain``; when OpenSSL rejects the server, a second, certificate-less
handshake fetches the presented leaf only to word the error ("the network is intercepting TLS:
presented issuer X; exempt HOST from inspection").

Differences from QUIC, all documented on the methods: ``migrate()`` raises (a TCP connection
cannot move; reconnect), ``on_path_change`` never fires, stream reset codes must fit 32 bits,
and the send high-water mark bounds the bytes buffered for the whole TCP connection (one
ordered byte pipe) rather than per stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from typing import Any

from cryptography import x509

from . import h2session as wire
from .base import (
    Address,
    Authorize,
    Connection,
    ErrorCode,
    OnConnection,
    Server,
    Stream,
    StreamReset,
    TLSIdentity,
    TransportError,
)
from .core import CoreConnection, CoreStream, wake, wake_all
from .h2session import FleetH2Session
from .h2wire import (  # noqa: F401  (the budget names are re-exported for tests)
    ALERT_BAD_CERTIFICATE,
    ALERT_CERTIFICATE_EXPIRED,
    ALERT_CERTIFICATE_REQUIRED,
    ALERT_NO_APPLICATION_PROTOCOL,
    ANONYMOUS_BUDGET,
    AUTHENTICATED_BUDGET,
    CLIENT_PREFACE,
    HELLO_PATH,
    MAX_CONCURRENT_STREAMS,
    MAX_FRAME_SIZE,
    MAX_H2_CODE,
    REVERSE_PATH,
    REVERSE_POOL,
    STREAM_PATH,
    ControlFrameMeter,
    FrameBudget,
    close_payload,
    crypto,
    parse_goaway,
)
from .policy import (
    DEFAULT_SEND_HIGH_WATER,
    DEFAULT_STREAM_WINDOW,
    CertificateRejected,
    ca_for_pin,
    normalize_address,
    verify_peer_chain,
    verify_server_leaf,
)
from .serving import AuthorizedServerConnection
from .tls_records import (
    TLSProtocol,
    client_context,
    peer_leaf,
    pem,
    probe_leaf,
    server_context,
    ssl_error,
)

log = logging.getLogger(__name__)

#: How long close() waits for the TLS close_notify exchange before aborting the socket.
CLOSE_GRACE = 1.0

# ------------------------------------------------------------------------------- session


class _TcpSession:
    """The core's wire over h2: stream DATA within the peer's window, END_STREAM, RST_STREAM,
    WINDOW_UPDATE as the application reads, PING.

    Send room is the stream's HTTP/2 window (one frame at most), and none while the
    connection's TLS write buffer is above the send high-water mark: that bounds the bytes
    buffered for the whole TCP connection (one ordered byte pipe) rather than per stream.
    """

    max_reset_code = MAX_H2_CODE

    def __init__(self, conn: _TcpConnection) -> None:
        self._conn = conn

    def send_room(self, stream: CoreStream) -> int:
        conn = self._conn
        if conn._protocol.paused:
            return 0
        room = conn._wire.send_room(stream.id)
        if room is None:  # the peer reset it and h2 already forgot it
            stream._write_error = stream._write_error or StreamReset(
                ErrorCode.STREAM_ABORTED, "stream closed by peer", remote=True
            )
            return 0
        return room

    def send_data(self, stream_id: int, data: bytes) -> None:
        self._conn._wire.send_data(stream_id, data)
        self._conn._flush()

    def send_fin(self, stream_id: int) -> None:
        self._conn._wire.end_stream(stream_id)
        self._conn._flush()

    def send_reset(self, stream_id: int, code: int, *, sending: bool, receiving: bool) -> None:
        # RST_STREAM aborts both directions at once (RESET_STREAM + STOP_SENDING in QUIC terms)
        self._conn._wire.reset_stream(stream_id, code)
        self._conn._flush()

    def consumed(self, stream_id: int, n: int, total: int) -> None:
        self._conn._ack(stream_id, n)

    def discarded(self, stream_id: int, n: int) -> None:
        self._conn._ack(stream_id, n)  # dropped unread: its window is free again

    def forget(self, stream_id: int) -> None:
        wake_all(self._conn._stream_slot_waiters)

    def buffered(self, stream_id: int) -> tuple[int, int]:
        # received bytes all sit in the core's buffer; sent ones in the connection's TLS buffer
        return 0, self._conn.send_buffered

    def send_ping(self, uid: int) -> None:
        self._conn._wire.ping(uid)
        self._conn._flush()

    def close(self, code: int, reason: str, first: bool) -> None:
        if first:
            self._conn._send_goaway(code, reason, application=True)
        self._conn._close_transport()


# --------------------------------------------------------------------------- connections


class _TcpConnection(CoreConnection):
    """A TLS/TCP connection: the core's streams as HTTP/2 streams (see the module docstring).

    Memory bound per stream: the receiving side holds at most ``stream_window`` unread bytes
    (HTTP/2 flow control; credit is returned via ``acknowledge_received_data`` only as
    ``read()`` consumes); ``write()`` hands data to HTTP/2 only within the peer's window and
    while the connection's TLS write buffer is below the send high-water mark, else it waits.
    """

    transport_name = "tcp"

    def __init__(
        self,
        protocol: TLSProtocol,
        *,
        is_client: bool,
        stream_window: int,
        send_high_water: int,
        idle_timeout: float,
        server_name: str = "",
    ) -> None:
        super().__init__(is_client=is_client)
        self._protocol = protocol
        self._transport = protocol
        self._session = _TcpSession(self)
        self._stream_window = stream_window
        self._send_high_water = send_high_water
        self._server_name = server_name
        self._transport.set_write_buffer_limits(
            high=send_high_water, low=send_high_water // 2
        )
        self.peer_certificate = peer_leaf(self._transport)
        sslobj = self._transport.get_extra_info("ssl_object")
        self.alpn = (sslobj.selected_alpn_protocol() if sslobj else None) or ""
        #: the fleet CA the server sent in the hello (client side)
        self.peer_ca: x509.Certificate | None = None
        #: the fleet protocol over HTTP/2, sans-I/O (this class feeds it and writes its bytes)
        self._wire = FleetH2Session(
            client=is_client, stream_window=stream_window, server_name=server_name
        )
        #: client: open_stream calls waiting for a stream slot (every one of them: several
        #: sessions may wait at once, and each wakes to look again)
        self._stream_slot_waiters: set[asyncio.Future[None]] = set()
        self._idle_timeout = idle_timeout
        self._idle_handle: asyncio.TimerHandle | None = None
        self._close_handle: asyncio.TimerHandle | None = None
        #: client: the server's hello answer arrived
        self._hello_done: asyncio.Future[None] = self._loop.create_future()
        #: server: open_stream calls waiting for the client to offer a reverse request
        self._pool_waiters: set[asyncio.Future[None]] = set()
        protocol.attach(self)

    def __repr__(self) -> str:
        side = "client" if self._is_client else "server"
        return f"<TcpConnection {side} alpn={self.alpn!r} remote={self.remote_address}>"

    # -- properties

    @property
    def remote_address(self) -> Address:
        peer = self._transport.get_extra_info("peername")
        return normalize_address(peer) if peer else ("", 0)

    @property
    def local_address(self) -> Address:
        sock = self._transport.get_extra_info("sockname")
        return normalize_address(sock) if sock else ("", 0)

    @property
    def rtt(self) -> float | None:
        """Round-trip time of the last ``ping()`` (None before one was answered).

        A TCP socket reports send errors as a lost connection: ``on_send_error`` never fires.
        """
        return self._ping_rtt

    @property
    def idle_timeout(self) -> float:
        """Nothing heard for this long ends the connection (min of both sides' settings)."""
        return self._idle_timeout

    @property
    def send_buffered(self) -> int:
        """Bytes handed to TLS but not yet to the kernel (bounded by the send high-water)."""
        return self._transport.get_write_buffer_size()

    @property
    def _h2(self) -> Any:
        """h2's connection under the session (tests and memory checks look at it)."""
        return self._wire.h2

    # -- h2 plumbing

    def _start_h2(self) -> None:
        self._wire.start()
        self._flush()
        self._arm_idle()

    def _flush(self) -> None:
        data = self._wire.data_to_send()
        if data and not self._transport.is_closing():
            self._transport.write(data)

    def _ack(self, sid: int, n: int) -> None:
        if n <= 0 or self._error is not None:
            return
        self._wire.ack(sid, n)
        self._flush()

    # -- streams

    async def open_stream(self) -> Stream:
        """Open a stream: a ``POST /fleet/stream`` request on the client side (no round trip);
        on the server side claim one of the client's idle reverse streams (no round trip while
        the pool lasts; see the module docstring)."""
        self._check_open()
        while True:
            if self._error is not None:
                raise self._error
            if self._is_client and self._wire.can_open_stream():
                sid = self._wire.open_stream()
                break
            if not self._is_client and (claimed := self._wire.claim_reverse()) is not None:
                sid = claimed
                break
            # client: a stream slot frees when one ends or the peer allows more; server: the
            # client offers a new reverse request about one round trip later
            waiters = self._stream_slot_waiters if self._is_client else self._pool_waiters
            waiter = self._loop.create_future()
            waiters.add(waiter)
            try:
                await waiter
            finally:
                waiters.discard(waiter)
        stream = self._add_stream(CoreStream(self, sid))
        self._flush()
        return stream

    def _replenish_pool(self) -> None:
        """Client: keep the hello's number of idle reverse requests open at the server."""
        if self._error is None:
            self._wire.replenish_pool()
        self._flush()

    # -- incoming

    def _on_data(self, data: bytes) -> None:
        self.last_received = self._loop.time()
        if self._error is not None or not self._wire.started:
            return
        for event in self._wire.receive(data, self.last_received, self._frame_budget()):
            self._on_wire_event(event)
            if self._error is not None and isinstance(event, wire.Closed):
                return
        self._flush()

    def _on_wire_event(self, event: wire.Event) -> None:
        if isinstance(event, wire.StreamData):
            stream = self._streams.get(event.stream_id)
            if stream is None:  # forgotten or unknown stream
                self._ack(event.stream_id, event.flow_len)
            else:
                if event.flow_len > len(event.data):  # padding: credit it now
                    self._ack(event.stream_id, event.flow_len - len(event.data))
                stream.feed(event.data)
        elif isinstance(event, wire.StreamEnd):
            if (stream := self._streams.get(event.stream_id)) is not None:
                stream.feed_eof()
        elif isinstance(event, wire.StreamAborted):
            if (stream := self._streams.get(event.stream_id)) is not None:
                stream.on_peer_reset(event.code)  # RST_STREAM ends both directions
                stream.on_stop_sending(event.code)
            wake_all(self._stream_slot_waiters)
        elif isinstance(event, wire.PeerStream):
            self._deliver(CoreStream(self, event.stream_id))
        elif isinstance(event, wire.PoolGrew):
            wake_all(self._pool_waiters)
        elif isinstance(event, wire.HelloRequested):
            self._on_hello_request(event.headers)
        elif isinstance(event, wire.HelloAnswered):
            wake(self._hello_done)
        elif isinstance(event, wire.SendRoom):
            self._wake_writers()
            wake_all(self._stream_slot_waiters)
        elif isinstance(event, wire.PingAnswered):
            self._ping_acked(event.uid)
        elif isinstance(event, wire.Closed):
            self._on_closed(event)

    def _on_closed(self, event: wire.Closed) -> None:
        self._flush()  # our GOAWAY, if the session queued one
        err = event.error
        if event.stop_reading:
            # Too many control frames: nothing more is read from the peer; handlers waiting
            # on the connection see the reason.
            log.warning("closing the TLS/TCP connection from %s (ALPN %s, %s): %s",
                        self.remote_address, self.alpn,
                        "with certificate" if self.peer_certificate is not None else
                        "no certificate", err.reason)
            self._fail(err)
            self._protocol.stop_reading()
            self._close_transport()
            return
        if not err.remote:
            log.info("HTTP/2 protocol error from %s: %s", self.remote_address, err.reason)
        self._fail(err)
        # with the abort after CLOSE_GRACE armed: a peer that said GOAWAY and never closes its
        # end (an agent gone back to QUIC, a half-dead path) must not keep this connection
        self._close_transport()

    def _on_hello_request(self, headers: dict[str, str]) -> None:  # pragma: no cover
        raise NotImplementedError  # server only

    def _frame_budget(self) -> FrameBudget:
        return AUTHENTICATED_BUDGET

    # -- close

    def close(self, code: int = 0, reason: str = "") -> None:
        """Close with ``code``/``reason`` (a GOAWAY, see the module docstring)."""
        super().close(code, reason)

    def _send_goaway(self, code: int, reason: str, *, application: bool) -> None:
        self._wire.goaway(code, reason, application=application)
        self._flush()

    def _close_transport(self) -> None:
        if not self._transport.is_closing():
            self._transport.close()  # flushes, TLS close_notify, FIN
        if self._close_handle is None and not self._terminated.is_set():
            self._close_handle = self._loop.call_later(CLOSE_GRACE, self._abort)

    def _abort(self) -> None:
        self._transport.abort()
        self._on_lost(None)

    def _abort_soon(self) -> None:
        # let the GOAWAY leave, then drop the socket without waiting for the TLS shutdown
        self._loop.call_soon(self._abort)

    def _on_lost(self, exc: Exception | None) -> None:
        if self._error is None:
            if isinstance(exc, ssl.SSLError):
                self._fail(ssl_error(exc, host=self._peer_label()))
            else:
                detail = f": {exc}" if exc else ""
                self._fail(TransportError(
                    0, f"connection lost{detail}", application=False, remote=True
                ))
        self._terminate()

    def _peer_label(self) -> str:
        return self._server_name or "the peer"

    def _on_fail(self, error: TransportError) -> None:
        if not self._hello_done.done():
            self._hello_done.set_exception(error)
            self._hello_done.exception()
        wake_all(self._pool_waiters)
        wake_all(self._stream_slot_waiters)
        if self._idle_handle is not None:
            self._idle_handle.cancel()

    def _on_terminated(self) -> None:
        if self._close_handle is not None:
            self._close_handle.cancel()

    # -- ping / idle

    async def ping(self, timeout: float) -> float:
        """Round-trip time of an HTTP/2 PING (through the TCP send queue: a full send buffer
        delays it). Raises TimeoutError, or the TransportError that closed the connection."""
        return await super().ping(timeout)

    def _arm_idle(self) -> None:
        if self._idle_timeout and self._idle_timeout > 0 and self._error is None:
            if self._idle_handle is not None:
                self._idle_handle.cancel()
            self._idle_handle = self._loop.call_at(
                self.last_received + self._idle_timeout, self._check_idle
            )

    def _check_idle(self) -> None:
        self._idle_handle = None
        if self._error is not None:
            return
        if self._loop.time() - self.last_received >= self._idle_timeout:
            reason = f"Idle timeout: nothing heard for {self._idle_timeout:g}s"
            self._fail(TransportError(0, reason, application=False, remote=False, kind="timeout"))
            self._send_goaway(0, reason, application=False)
            self._close_transport()
        else:
            self._arm_idle()

    # -- migration

    async def migrate(self, local_addr: tuple[str, int] | None) -> None:
        """A TCP connection is bound to its 4-tuple: always raises TransportError."""
        raise TransportError(
            ErrorCode.INTERNAL, "TCP connections cannot migrate; reconnect",
            application=False, remote=False, kind="internal",
        )


class _ServerConnection(AuthorizedServerConnection, _TcpConnection):
    def __init__(self, protocol: TLSProtocol, server: _TcpServer) -> None:
        super().__init__(
            protocol,
            is_client=False,
            stream_window=server._stream_window,
            send_high_water=server._send_high_water,
            idle_timeout=server._idle_timeout,
        )
        self._server: _TcpServer = server
        self._authorize_task: asyncio.Task[None] | None = None
        # Sees exactly the bytes h2 sees: both start with the client preface after _begin().
        self._wire.meter = ControlFrameMeter(ANONYMOUS_BUDGET, self._loop.time())

    def _frame_budget(self) -> FrameBudget:
        """Strict until authorize() let the peer in, and for good if it has no certificate."""
        if self._authorized and self.peer_certificate is not None:
            return AUTHENTICATED_BUDGET
        return ANONYMOUS_BUDGET

    def _begin(self) -> None:
        """After the TLS handshake: certificate policy, then hello/authorize."""
        server = self._server
        if self.alpn not in server._alpns:
            self._refuse(crypto(ALERT_NO_APPLICATION_PROTOCOL),
                         f"no application protocol in common (offered none of {server._alpns})")
            return
        if self.peer_certificate is None and self.alpn not in server._anonymous:
            self._refuse(crypto(ALERT_CERTIFICATE_REQUIRED),
                         f"a client certificate is required for ALPN {self.alpn!r}")
            return
        if self.peer_certificate is not None:
            try:
                verify_peer_chain(self.peer_certificate, [], server._ca, purpose="client")
            except CertificateRejected as exc:
                alert = ALERT_CERTIFICATE_EXPIRED if exc.expired else ALERT_BAD_CERTIFICATE
                self._refuse(crypto(alert), exc.reason)
                return
        self._start_h2()
        self._authorize_task = self._loop.create_task(self._authorize_and_run())
        server._tasks.add(self._authorize_task)
        self._authorize_task.add_done_callback(server._tasks.discard)

    def _refuse(self, code: int, reason: str) -> None:
        log.info("TLS refused %s: %s", self.remote_address, reason)
        self._fail(TransportError(code, reason, application=False, remote=False))
        self._closed_locally = True
        self._send_goaway(code, reason, application=False)
        self._close_transport()

    def _on_hello_request(self, headers: dict[str, str]) -> None:
        server = self._server
        with contextlib.suppress(ValueError):
            theirs = float(headers.get("fleet-idle-timeout", ""))
            if 0 < theirs < self._idle_timeout:
                self._idle_timeout = theirs
                self._arm_idle()
        self._wire.answer_hello(server._reverse_pool, self._idle_timeout, server._hello_pem)



# -------------------------------------------------------------------------------- server


class _TcpServer(Server):
    def __init__(
        self,
        *,
        identity: TLSIdentity,
        alpns: list[str],
        anonymous: frozenset[str],
        authorize: Authorize,
        on_connection: OnConnection,
        idle_timeout: float,
        authorize_timeout: float,
        stream_window: int,
        send_high_water: int,
        reverse_pool: int,
    ) -> None:
        self._ca = identity.ca
        self._alpns = list(alpns)
        self._anonymous = anonymous
        self._authorize = authorize
        self._on_connection = on_connection
        self._idle_timeout = idle_timeout
        self._authorize_timeout = authorize_timeout
        self._stream_window = stream_window
        self._send_high_water = send_high_water
        self._reverse_pool = reverse_pool
        chain = [identity.ca] + [
            c for c in identity.cert_chain[1:] if c != identity.ca
        ]
        self._hello_pem = b"".join(pem(c) for c in chain)
        self._connections: set[_ServerConnection] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._aserver: asyncio.Server | None = None
        self._closed = asyncio.Event()

    def _made(self, protocol: TLSProtocol, exc: BaseException | None) -> None:
        if exc is not None:
            log.info("TLS handshake from %s failed: %s",
                     protocol.get_extra_info("peername"), exc)
            return
        if self._closed.is_set():
            protocol.abort()
            return
        conn = _ServerConnection(protocol, self)
        self._connections.add(conn)
        conn._begin()

    @property
    def address(self) -> Address:
        assert self._aserver is not None
        return self._aserver.sockets[0].getsockname()

    @property
    def connections(self) -> list[Connection]:
        return list(self._connections)

    def close(self) -> None:
        """Close every connection (code SHUTDOWN) and stop listening."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._aserver is not None:
            self._aserver.close()
        for conn in list(self._connections):
            conn.close(ErrorCode.SHUTDOWN, "server shutting down")
            conn._abort_soon()

    async def wait_closed(self) -> None:
        """Wait for close(); handlers get 1 s to finish on their own, then are cancelled."""
        await self._closed.wait()
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=1.0)
            for t in still:
                t.cancel()
            if still:
                await asyncio.gather(*still, return_exceptions=True)


# ------------------------------------------------------------------------- entry points


def _host_label(host: str, port: int, server_name: str) -> str:
    return server_name if server_name == host else f"{server_name} ({host}:{port})"


async def connect(
    host: str,
    port: int,
    *,
    identity: TLSIdentity | None,
    server_name: str,
    alpn: str,
    ca: x509.Certificate | None = None,
    ca_pin: str | None = None,
    local_addr: tuple[str, int] | None = None,
    keepalive: float | None = 25.0,
    idle_timeout: float = 60.0,
    handshake_timeout: float = 10.0,
    stream_window: int = DEFAULT_STREAM_WINDOW,
    send_high_water: int = DEFAULT_SEND_HIGH_WATER,
) -> Connection:
    """Dial a fleet proxy over TLS/TCP; return once the server answered the hello.

    Same arguments and meaning as ``quic.connect``. The server certificate must chain to ``ca``
    (default ``identity.ca``) and match ``server_name``; with only ``ca_pin``, the CA the server
    sends in the hello must match the pin and the leaf must verify against it -- checked before
    any application stream exists. ``identity=None`` connects without a client certificate
    (only accepted on the server's anonymous ALPNs). Raises TransportError (TLS failure, refusal
    by the server's certificate policy, interception, timeout, unreachable).
    """
    trust = ca if ca is not None else (identity.ca if identity is not None else None)
    if trust is None and ca_pin is None:
        raise ValueError("connect() needs identity, ca (the pinned fleet CA) or ca_pin")
    loop = asyncio.get_running_loop()
    label = _host_label(host, port, server_name)
    ctx = client_context(identity, alpn, trust)
    deadline = loop.time() + handshake_timeout
    ready: asyncio.Future[None] = loop.create_future()

    def on_ready(_: TLSProtocol, exc: BaseException | None) -> None:
        if ready.done():
            return
        if exc is None:
            ready.set_result(None)
        else:
            ready.set_exception(exc)

    protocol = TLSProtocol(
        ctx, server_side=False, on_ready=on_ready, handshake_timeout=handshake_timeout,
        server_hostname=server_name,
    )
    try:
        async with asyncio.timeout(handshake_timeout):
            await loop.create_connection(lambda: protocol, host, port, local_addr=local_addr)
            await ready
    except ssl.SSLCertVerificationError as exc:
        assert trust is not None
        leaf = await probe_leaf(
            host, port, server_name, alpn, local_addr, max(1.0, deadline - loop.time())
        )
        reason = f"server certificate not accepted by the pinned fleet CA: {exc.verify_message}"
        kind = "tls"
        if leaf is not None:
            try:
                verify_server_leaf(leaf, [], trust, server_name=server_name, host=label)
            except CertificateRejected as rej:
                reason = rej.reason
                kind = "intercepted" if rej.intercepted else "tls"
        raise TransportError(
            crypto(ALERT_BAD_CERTIFICATE), reason, application=False, remote=False, kind=kind
        ) from None
    except ssl.SSLError as exc:
        raise ssl_error(exc, host=label) from None
    except TimeoutError:
        protocol.abort()
        raise TransportError(
            0, f"TLS handshake with {host}:{port} timed out", application=False, remote=False,
            kind="timeout",
        ) from None
    except OSError as exc:
        protocol.abort()
        raise TransportError(
            0, f"cannot reach {host}:{port} over TCP: {exc}", application=False, remote=False,
            kind="unreachable",
        ) from None
    except BaseException:
        protocol.abort()  # cancelled (e.g. lost a race): drop the half-open connection
        raise

    conn = _TcpConnection(
        protocol, is_client=True, stream_window=stream_window, send_high_water=send_high_water,
        idle_timeout=idle_timeout, server_name=server_name,
    )

    def fail(code: int, reason: str, *, remote: bool = False, kind: str | None = None) -> TransportError:
        err = TransportError(code, reason, application=False, remote=remote, kind=kind)
        conn._fail(err)
        conn._closed_locally = True
        conn._transport.abort()
        conn._terminate()
        return err

    if conn.alpn != alpn:
        raise fail(crypto(ALERT_NO_APPLICATION_PROTOCOL),
                   f"{label} did not agree on ALPN {alpn!r} over TLS/TCP")
    try:
        conn._start_h2()
        conn._wire.send_hello(conn._idle_timeout)
        conn._flush()
        async with asyncio.timeout(max(0.0, deadline - loop.time())):
            await asyncio.shield(conn._hello_done)
    except TimeoutError:
        raise fail(0, f"no fleet hello from {host}:{port} within {handshake_timeout:g}s "
                      "(not a fleet proxy, or the network interferes)", kind="timeout") from None
    except TransportError:
        conn._close_transport()
        raise
    except BaseException:  # cancelled (e.g. lost a race)
        fail(0, "connect() cancelled", kind="closed")
        raise
    if conn._wire.hello_headers.get(":status") != "200":
        raise fail(0, f"{label} answered the fleet hello with {conn._wire.hello_headers}",
                   kind="protocol")
    try:
        offered = x509.load_pem_x509_certificates(bytes(conn._wire.hello_body))
    except ValueError:
        offered = []
    leaf = conn.peer_certificate
    try:
        if trust is None:
            assert ca_pin is not None
            trust = ca_for_pin(leaf, offered, ca_pin, host=label)
        intermediates = [c for c in offered if c != trust]
        verify_server_leaf(leaf, intermediates, trust, server_name=server_name, host=label)
    except CertificateRejected as exc:
        raise fail(crypto(ALERT_BAD_CERTIFICATE), exc.reason,
                   kind="intercepted" if exc.intercepted else "tls") from None
    conn.peer_ca = trust
    with contextlib.suppress(ValueError):
        theirs = float(conn._wire.hello_headers.get("fleet-idle-timeout", ""))
        if 0 < theirs < conn._idle_timeout:
            conn._idle_timeout = theirs
            conn._arm_idle()
    with contextlib.suppress(ValueError):
        conn._wire.reverse_target = max(0, min(64, int(conn._wire.hello_headers["fleet-reverse-pool"])))
    conn._replenish_pool()
    if keepalive:
        conn.start_keepalive(keepalive)
    return conn


async def serve(
    host: str,
    port: int,
    *,
    identity: TLSIdentity,
    alpns: list[str],
    authorize: Authorize,
    on_connection: OnConnection,
    anonymous_alpns: list[str] | frozenset[str] = frozenset(),
    idle_timeout: float = 60.0,
    authorize_timeout: float = 10.0,
    stream_window: int = DEFAULT_STREAM_WINDOW,
    send_high_water: int = DEFAULT_SEND_HIGH_WATER,
    handshake_timeout: float = 10.0,
    reverse_pool: int = REVERSE_POOL,
) -> Server:
    """Listen for TLS/TCP connections with mutual TLS against ``identity.ca``.

    Same arguments and meaning as ``quic.serve``: a client certificate chaining to
    ``identity.ca`` with the clientAuth EKU is required except on ``anonymous_alpns`` (optional
    there, verified if present); then ``authorize(conn)`` runs (may be async, may raise
    Refused); only then are the peer's streams delivered and ``on_connection(conn)`` started.
    """
    unknown = set(anonymous_alpns) - set(alpns)
    if unknown:
        raise ValueError(f"anonymous ALPNs not served: {sorted(unknown)}")
    server = _TcpServer(
        identity=identity,
        alpns=list(alpns),
        anonymous=frozenset(anonymous_alpns),
        authorize=authorize,
        on_connection=on_connection,
        idle_timeout=idle_timeout,
        authorize_timeout=authorize_timeout,
        stream_window=stream_window,
        send_high_water=send_high_water,
        reverse_pool=reverse_pool,
    )
    ctx = server_context(identity, list(alpns))
    loop = asyncio.get_running_loop()
    server._aserver = await loop.create_server(
        lambda: TLSProtocol(
            ctx, server_side=True, on_ready=server._made, handshake_timeout=handshake_timeout
        ),
        host,
        port,
        family=socket.AF_UNSPEC,
        reuse_address=True,
    )
    return server
