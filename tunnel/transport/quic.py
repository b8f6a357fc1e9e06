"""QUIC transport on aioquic 1.7.2: the asyncio adapter around aioquic's sans-I/O connection.

aioquic is the QUIC engine; every use of its private members (the mTLS hooks, credit on
consumption, loss on migration, read-only views of its state) lives in ``aioquic_compat``,
checked at import against the exact pin. This module only calls aioquic's public API.

Nothing of ``aioquic.asyncio`` is used: ``_Protocol`` drives the ``QuicConnection`` on the
event loop and ``Demux`` routes the proxy's shared socket by connection ID, both over
``udp.DatagramEndpoint`` (batched reads, one transmit per connection per batch, GSO sends).
(About 760 lines: the driver, the connection and the entry points are one adapter; the server's
demultiplexer is already apart in ``quic_demux``.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import sys
from typing import Any

from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ..log import event
from .aioquic_compat import AIOQUIC_VERSION, FleetQuicConnection, PathMtu, TLSPolicy, adopt  # noqa: F401
from .base import (
    Address,
    Authorize,
    Connection,
    ErrorCode,
    OnConnection,
    PathChange,
    Server,
    Stream,
    TLSIdentity,
    TransportError,
)
from .core import CoreConnection, CoreStream
from .pmtu import PROBE_SIZE
from .policy import (
    CRYPTO_ERROR_BASE,
    DEFAULT_SEND_HIGH_WATER,
    DEFAULT_STREAM_WINDOW,
    bind_address,
    describe_close,
    normalize_address,
    send_allowance,
    socket_address,
)
from .quic_demux import (  # noqa: F401  (the admission rules are re-exported for tests)
    MAX_HALF_OPEN,
    MAX_NEW_PER_BATCH,
    SERVER_HANDSHAKE_TIMEOUT,
    Demux,
    admit_initial,
    stale_handshakes,
)
from .serving import AuthorizedServerConnection
from .udp import DatagramEndpoint, tune_buffers

log = logging.getLogger(__name__)
pmtu_log = logging.getLogger("tunnel.transport.pmtu")

#: RFC 9002 initial RTT; long enough that path validation survives a 600 ms satellite RTT.
INITIAL_RTT = 0.333
#: the datagram size a connection uses where the path carries it (``pmtu.py`` searches for it;
#: every connection starts at 1,200)
MAX_DATAGRAM_SIZE = PROBE_SIZE

class _Protocol:
    """Drives one ``QuicConnection`` on the event loop: datagrams in, events out, transmit, timer.

    Our own adapter (not aioquic's ``QuicConnectionProtocol``): a datagram is only *received*
    here (``receive``); the endpoint calls ``flush`` once per batch of datagrams for each
    connection the batch touched, which handles the events and transmits once (see ``udp.py``).
    Application writes ask for ``transmit_soon``: one transmit per connection per loop
    iteration, however many writes.
    """

    owner: _QuicConnection

    def __init__(self, quic: FleetQuicConnection, loop: asyncio.AbstractEventLoop) -> None:
        self._quic = quic
        self._loop = loop
        self.endpoint: DatagramEndpoint | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._transmit_handle: asyncio.Handle | None = None
        self._touched = False
        #: server: the demultiplexer's connection ID bookkeeping
        self.on_cid_issued: Any = None
        self.on_cid_retired: Any = None
        self.on_terminated: Any = None
        #: server: the connection IDs the demultiplexer routes to this connection
        self.cids: set[bytes] = set()
        self.pmtu = _path_mtu(quic)

    # -- input

    def receive(self, data: bytes, addr: Any) -> None:
        """One datagram from the socket; handled and answered in ``flush`` (batch end)."""
        now = self._loop.time()
        self.owner.last_received = now
        self._quic.receive_datagram(data, addr, now=now)
        self._touched = True

    def flush(self) -> None:
        """End of a batch: deliver the events, transmit once, update the owner."""
        if not self._touched:
            return
        self._touched = False
        self._process_events()
        self.transmit()
        self.owner._after_io()

    def error_received(self, exc: OSError) -> None:
        # A send failed locally (ENETUNREACH, EADDRNOTAVAIL after an uplink went away...):
        # tell the owner at once instead of waiting for keepalives to go unanswered.
        self.owner._on_send_error(exc)

    def _handle_timer(self) -> None:
        now = max(self._timer_at or 0.0, self._loop.time())
        self._timer = None
        self._timer_at = None
        self._quic.handle_timer(now=now)
        self._process_events()
        self.transmit()
        self.owner._after_io()

    def _process_events(self) -> None:
        quic = self._quic
        event = quic.next_event()
        while event is not None:
            if isinstance(event, events.ConnectionIdIssued):
                if self.on_cid_issued is not None:
                    self.on_cid_issued(event.connection_id, self)
            elif isinstance(event, events.ConnectionIdRetired):
                if self.on_cid_retired is not None:
                    self.on_cid_retired(event.connection_id, self)
            elif isinstance(event, events.ConnectionTerminated) and self.on_terminated is not None:
                self.on_terminated(self)
            self.owner._on_event(event)
            event = quic.next_event()

    # -- output

    def transmit(self) -> None:
        """Send every datagram aioquic has ready (GSO-batched) and re-arm the timer."""
        self._transmit_handle = None
        datagrams = self.pmtu.datagrams_to_send(self._loop.time())
        if datagrams and self.endpoint is not None:
            self.endpoint.send(datagrams)
        timer_at = self._quic.get_timer()
        if self._timer is not None and self._timer_at != timer_at:
            self._timer.cancel()
            self._timer = None
        if self._timer is None and timer_at is not None:
            self._timer = self._loop.call_at(timer_at, self._handle_timer)
        self._timer_at = timer_at

    def transmit_soon(self) -> None:
        if self._transmit_handle is None:
            self._transmit_handle = self._loop.call_soon(self.transmit)

    def connect(self, addr: Any) -> None:
        self._quic.connect(addr, now=self._loop.time())
        self.transmit()

    def close(self, error_code: int = 0, reason_phrase: str = "") -> None:
        self._quic.close(error_code=error_code, reason_phrase=reason_phrase)
        self.transmit()

    def stop(self) -> None:
        """Terminated: no more timers or deferred transmits."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transmit_handle is not None:
            self._transmit_handle.cancel()
            self._transmit_handle = None


def _path_mtu(quic: FleetQuicConnection) -> PathMtu:
    """The datagram size search of one connection (``pmtu.py``); each change is logged."""

    def changed(size: int, reason: str) -> None:
        side = "client" if quic.configuration.is_client else "server"
        event(pmtu_log, "datagram size", size=size, reason=reason, side=side,
              peer=str(quic.fleet_peer_addr()))

    return PathMtu(quic, on_change=changed)


def _client_endpoint(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                     protocol: _Protocol) -> DatagramEndpoint:
    tune_buffers(sock)
    return DatagramEndpoint(
        loop, sock, protocol.receive, protocol.flush, protocol.error_received
    )


# ------------------------------------------------------------------------------- session


class _QuicSession:
    """The core's wire over aioquic: stream data, FIN, resets, credit and PINGs.

    Send room is the stream's send high-water mark (``policy.send_allowance``) measured on
    what aioquic holds unacknowledged; credit is granted as the application reads
    (``FleetQuicConnection.fleet_consumed``). Every send asks for one transmit per loop
    iteration, however many writes.
    """

    max_reset_code = (1 << 62) - 1

    def __init__(self, protocol: _Protocol, send_high_water: int) -> None:
        self._protocol = protocol
        self._quic: FleetQuicConnection = protocol._quic
        self.send_high_water = send_high_water

    def send_room(self, stream: CoreStream) -> int:
        return send_allowance(self._quic.fleet_stream_buffers(stream.id)[1],
                              self.send_high_water, stream._write_blocked)

    def send_data(self, stream_id: int, data: bytes) -> None:
        self._quic.send_stream_data(stream_id, data)
        self._protocol.transmit_soon()

    def send_fin(self, stream_id: int) -> None:
        self._quic.send_stream_data(stream_id, b"", end_stream=True)
        self._protocol.transmit_soon()

    def send_reset(self, stream_id: int, code: int, *, sending: bool, receiving: bool) -> None:
        if sending:
            self._quic.reset_stream(stream_id, code)
        if receiving:
            with contextlib.suppress(ValueError):  # aioquic: unknown stream
                self._quic.stop_stream(stream_id, code)
        self._protocol.transmit_soon()

    def consumed(self, stream_id: int, n: int, total: int) -> None:
        if self._quic.fleet_consumed(stream_id, total):
            self._protocol.transmit_soon()

    def discarded(self, stream_id: int, n: int) -> None:
        pass  # a reset stream needs no credit back: its peer stops sending

    def forget(self, stream_id: int) -> None:
        self._quic.fleet_forget(stream_id)

    def buffered(self, stream_id: int) -> tuple[int, int]:
        return self._quic.fleet_stream_buffers(stream_id)

    def send_ping(self, uid: int) -> None:
        self._quic.send_ping(uid)
        self._protocol.transmit()

    def close(self, code: int, reason: str, first: bool) -> None:
        self._protocol.close(error_code=code, reason_phrase=reason)


# --------------------------------------------------------------------------- connections


class _QuicConnection(CoreConnection):
    """A QUIC connection: the core's streams over one aioquic ``QuicConnection``.

    Memory bound per stream: the receiving side holds at most ``stream_window`` bytes that the
    application has not read yet (aioquic's reorder buffer included), because credit is granted
    only as ``read()`` consumes data (see ``policy.next_receive_limit``); the sending side holds
    at most ``send_high_water`` bytes not yet acknowledged by the peer, because ``write()``
    waits (see ``policy.send_allowance``). Defaults: 1 MiB each.
    """

    transport_name = "quic"

    def _close_sent(self) -> bool:
        return self.is_closed  # close() transmits the CONNECTION_CLOSE at once (QuicSession.close)

    def __init__(
        self,
        protocol: _Protocol,
        *,
        is_client: bool,
        send_high_water: int,
        family: int | None = None,
    ) -> None:
        super().__init__(is_client=is_client)
        self._protocol = protocol
        protocol.owner = self
        self._quic: FleetQuicConnection = protocol._quic
        self._session = _QuicSession(protocol, send_high_water)
        self._family = family
        self._max_peer_stream = -1
        #: peer stream IDs below ``_max_peer_stream`` not seen yet (their data overtaken by a
        #: later stream's): still new when they come
        self._peer_gaps: set[int] = set()
        self._confirmed: asyncio.Future[None] = self._loop.create_future()
        self._remote: Address | None = None
        self._remote_raw: Any = None

    def __repr__(self) -> str:
        side = "client" if self._is_client else "server"
        return f"<QuicConnection {side} alpn={self.alpn!r} remote={self.remote_address}>"

    # -- properties

    @property
    def remote_address(self) -> Address:
        addr = self._quic.fleet_peer_addr()
        return normalize_address(addr) if addr is not None else ("", 0)

    @property
    def local_address(self) -> Address:
        endpoint = self._protocol.endpoint
        return normalize_address(endpoint.sockname) if endpoint is not None else ("", 0)

    @property
    def rtt(self) -> float | None:
        """Smoothed round-trip time of the current path in seconds (None before a sample)."""
        return self._quic.fleet_rtt()

    @property
    def idle_timeout(self) -> float:
        """The negotiated idle timeout: nothing heard for this long ends the connection."""
        return self._quic.fleet_idle_timeout()

    # -- streams

    async def open_stream(self) -> Stream:
        self._check_open()
        sid = self._quic.get_next_available_stream_id()
        # aioquic creates a stream (and moves to the next ID) on its first send: do it now, with
        # no data and no frame, so streams opened before any is written get distinct IDs
        self._quic.send_stream_data(sid, b"")
        return self._add_stream(CoreStream(self, sid))

    async def ping(self, timeout: float) -> float:
        """Round-trip time of a PING (includes the peer's ACK delay, <= 25 ms with aioquic).

        Raises TimeoutError if no acknowledgement arrives within ``timeout`` seconds, or the
        TransportError that closed the connection.
        """
        return await super().ping(timeout)

    # -- migration

    async def migrate(self, local_addr: tuple[str, int] | None) -> None:
        """Move this client connection to a new local address (same QUIC connection).

        Opens a UDP socket on ``local_addr`` (None: any address, new port) in the address family
        of the connection, makes it the protocol's transport, closes the old one, switches to a
        spare connection ID of the server (unlinkable on the wire), declares in-flight packets
        lost and transmits at once. The server follows by connection ID and validates the path.
        """
        if not self._is_client:
            raise RuntimeError("only the client side can migrate")
        if self._error is not None:
            raise self._error
        sock = _udp_socket(local_addr, self._family or socket.AF_INET)
        old_local = self.local_address
        old_endpoint = self._protocol.endpoint
        self._protocol.endpoint = _client_endpoint(self._loop, sock, self._protocol)
        if old_endpoint is not None:
            old_endpoint.close()
        if self._quic.fleet_spare_peer_cids():
            self._quic.change_connection_id()
        else:
            log.warning("migrating without a spare server connection ID (linkable)")
        self._protocol.pmtu.path_changed(self._loop.time())  # the new uplink may be smaller
        self._quic.fleet_declare_in_flight_lost(self._loop.time())
        self._protocol.transmit()
        self.migrations += 1
        self._report_path(PathChange(old_local, self.local_address))

    # -- event plumbing

    def _stream_for_event(self, sid: int) -> CoreStream | None:
        stream = self._streams.get(sid)
        if stream is not None:
            return stream
        peer_initiated = (sid & 1) == (0 if not self._is_client else 1)
        if not peer_initiated:
            return None  # ours, already forgotten
        if sid & 2:  # unidirectional: not part of the protocol
            with contextlib.suppress(ValueError):
                self._quic.stop_stream(sid, ErrorCode.STREAM_ABORTED)
            return None
        if sid <= self._max_peer_stream:
            if sid not in self._peer_gaps:
                return None  # already forgotten
            self._peer_gaps.discard(sid)
        else:
            first = self._max_peer_stream + 4 if self._max_peer_stream >= 0 else sid & 3
            self._peer_gaps.update(range(first, sid, 4))
            self._max_peer_stream = sid
        stream = CoreStream(self, sid)
        self._deliver(stream)
        return stream

    def _on_event(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            stream = self._stream_for_event(event.stream_id)
            if stream is not None:
                stream.feed(event.data)
                if event.end_stream:
                    stream.feed_eof()
        elif isinstance(event, events.StreamReset):
            stream = self._stream_for_event(event.stream_id)
            if stream is not None:
                stream.on_peer_reset(event.error_code)
        elif isinstance(event, events.StopSendingReceived):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.on_stop_sending(event.error_code)
        elif isinstance(event, events.PingAcknowledged):
            self._ping_acked(event.uid)
        elif isinstance(event, events.HandshakeCompleted):
            self.alpn = event.alpn_protocol or ""
            self.peer_certificate = self._quic.fleet_peer_certificate()
            self._remote = self.remote_address
            self._remote_raw = self._quic.fleet_peer_addr()
            if not self._is_client:
                self._server_conn_handshake_done()
        elif isinstance(event, events.ConnectionTerminated):
            self._note_confirmed()
            self._check_close()
            self._terminate()

    def _note_confirmed(self) -> None:
        # Before any close check: a batch can hold both the server's HANDSHAKE_DONE and its
        # CONNECTION_CLOSE (a refusal); the dial then succeeded and the close is told as a close.
        if (
            self._is_client
            and not self._confirmed.done()
            and self._quic.fleet_handshake_confirmed()
        ):
            self._confirmed.set_result(None)

    def _after_io(self) -> None:
        self._note_confirmed()
        self._check_close()
        if self._error is not None:
            return
        raw = self._quic.fleet_peer_addr()
        if self._remote is not None and raw is not None and raw != self._remote_raw:
            # cheap raw comparison per datagram; normalise only on a change
            self._remote_raw = raw
            old, self._remote = self._remote, self.remote_address
            if old != self._remote:
                self._report_path(PathChange(old, self._remote))
        if self._blocked_writers:
            room = self._session.send_room
            self._wake_writers(lambda stream: room(stream) > 0)

    def _check_close(self) -> None:
        closing = self._quic.fleet_close()
        if closing is None or self._error is not None:
            return
        ev, remote = closing
        application = ev.frame_type is None
        reason = ev.reason_phrase
        if not application and not remote:
            reason = describe_close(ev.error_code, reason, application=False)
        self._fail(TransportError(
            ev.error_code, reason, application=application, remote=remote,
            kind=self._close_kind(ev.error_code, application),
        ))

    def _close_kind(self, code: int, application: bool) -> str | None:
        """What the close was, from what happened (never from its text); None: the default."""
        rejection = self._quic.fleet_rejection()
        if self._quic.fleet_idle_expired:
            return "timeout"
        if rejection is not None and rejection.intercepted:
            return "intercepted"
        if not application and code and not CRYPTO_ERROR_BASE <= code <= CRYPTO_ERROR_BASE + 0xFF:
            return "protocol"
        return None

    def _on_fail(self, error: TransportError) -> None:
        if not self._confirmed.done():
            self._confirmed.set_exception(error)
            self._confirmed.exception()  # mark retrieved

    def _on_terminated(self) -> None:
        if self._is_client and self._protocol.endpoint is not None:
            self._loop.call_soon(self._protocol.endpoint.close)
        self._protocol.stop()

    def _server_conn_handshake_done(self) -> None:  # pragma: no cover - server only
        pass


class _ServerConnection(AuthorizedServerConnection, _QuicConnection):
    def __init__(self, protocol: _Protocol, server: _QuicServer) -> None:
        super().__init__(protocol, is_client=False, send_high_water=server._send_high_water)
        self._server: _QuicServer = server

    def _server_conn_handshake_done(self) -> None:
        task = self._loop.create_task(self._authorize_and_run())
        self._server._tasks.add(task)
        task.add_done_callback(self._server._tasks.discard)



# -------------------------------------------------------------------------------- server


class _QuicServer(Server):
    def __init__(
        self,
        *,
        authorize: Authorize,
        on_connection: OnConnection,
        send_high_water: int,
        authorize_timeout: float,
    ) -> None:
        self._authorize = authorize
        self._on_connection = on_connection
        self._send_high_water = send_high_water
        self._authorize_timeout = authorize_timeout
        self._connections: set[_ServerConnection] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._endpoint: DatagramEndpoint | None = None
        self._demux: Demux | None = None
        self._closed = asyncio.Event()

    @property
    def address(self) -> Address:
        assert self._endpoint is not None
        return self._endpoint.sockname

    @property
    def _transport(self) -> DatagramEndpoint | None:
        """The listening socket's endpoint (``pause_reading``/``resume_reading`` for tests)."""
        return self._endpoint

    @property
    def connections(self) -> list[Connection]:
        return list(self._connections)

    def close(self) -> None:
        """Close every connection (code SHUTDOWN) and stop listening."""
        if self._closed.is_set():
            return
        conns = list(self._connections)
        for conn in conns:
            conn.close(ErrorCode.SHUTDOWN, "server shutting down")
        if self._demux is not None:
            self._demux.close()
        for conn in conns:
            conn._terminate()
        self._closed.set()

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


def _udp_socket(local_addr: tuple[str, int] | None, family: int) -> socket.socket:
    """A non-blocking UDP socket bound to ``local_addr`` (None: any address, a new port)."""
    if local_addr is None:
        bind = ("0.0.0.0", 0) if family == socket.AF_INET else ("::", 0, 0, 0)
    else:
        bind = bind_address(local_addr[0], local_addr[1], family)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind(bind)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def _resolve(
    loop: asyncio.AbstractEventLoop, host: str, port: int, flags: int = 0
) -> tuple[int, Any]:
    """(family, sockaddr) of ``host``; an IP literal is resolved in place.

    ``loop.getaddrinfo`` runs in a worker thread: an agent configured with an address would
    otherwise keep an idle thread (and its malloc arena) alive for nothing.

    An ASCII name goes to the resolver as bytes: given a ``str``, ``socket.getaddrinfo``
    always encodes it with the ``idna`` codec, whose import (``encodings.idna``,
    ``stringprep``) stays in the agent for its whole life (0.25 MiB of idle RSS, measured) for
    a name that is ASCII already. A non-ASCII name still takes the codec.
    """
    name: str | bytes = host.encode("ascii") if host.isascii() else host
    try:
        numeric = socket.getaddrinfo(
            name, port, type=socket.SOCK_DGRAM, flags=flags | socket.AI_NUMERICHOST
        )
    except socket.gaierror:
        numeric = None
    infos = numeric or await loop.getaddrinfo(name, port, type=socket.SOCK_DGRAM, flags=flags)
    return infos[0][0], infos[0][4]


_trim: Any = None


def _load_malloc_trim() -> Any:
    """glibc's ``malloc_trim`` as a callable, or False where the C library has none.

    Looked up through cffi's C backend when this process already loaded it (cryptography's
    bindings do, so in the agent it is always there): importing ``ctypes`` only for this one
    call cost more than the call gave back (+0.29 MiB of idle RSS for ``ctypes`` and
    ``_ctypes``/libffi; measured with ``bench/cases/footprint.py``'s agent, run from compiled
    bytecode). ``load_library``/``load_function`` are the calls cffi's own ABI mode makes;
    ``ctypes`` stays the fallback.
    """
    cffi = sys.modules.get("_cffi_backend")
    if cffi is not None:
        try:
            signature = cffi.new_function_type(
                (cffi.new_primitive_type("size_t"),), cffi.new_primitive_type("int"), False
            )
            return cffi.load_library(None).load_function(signature, "malloc_trim")
        except Exception:  # noqa: BLE001 - not glibc, or another cffi: try ctypes
            pass
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (ImportError, OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return False


def release_free_heap() -> None:
    """Give the C heap's free pages back to the kernel (glibc ``malloc_trim``); else a no-op.

    A device's agent starts (imports, certificates, the TLS handshake), connects, then idles
    for days: the heap that start-up freed stays resident unless trimmed. Called once a client
    connection is up; costs well under a millisecond. Measured on the footprint bench's idle
    agent: run from compiled bytecode (a pip install) it gives back little; with no bytecode
    cached (every module compiled at start) the compiler's freed memory stays resident without
    it (idle RSS 45.7 MiB without the trim, 43.4 with).
    """
    global _trim
    if _trim is None:
        _trim = _load_malloc_trim()
    if _trim:
        _trim(0)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.PEM)


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
    """Dial a QUIC server and return once the server confirmed the handshake.

    The server certificate must chain to ``ca`` (default ``identity.ca``) and match
    ``server_name``. ``identity=None`` connects without a client certificate (only accepted on
    the server's anonymous ALPNs). The UDP socket uses the address family of ``host``.
    Raises TransportError (TLS failure, refusal, timeout).
    """
    trust = ca if ca is not None else (identity.ca if identity is not None else None)
    if trust is None and ca_pin is None:
        raise ValueError("connect() needs identity, ca (the pinned fleet CA) or ca_pin")
    loop = asyncio.get_running_loop()
    family, addr = await _resolve(loop, host, port)
    family = socket.AF_INET6 if family == socket.AF_INET6 else socket.AF_INET
    addr = socket_address(addr[0], addr[1], family)

    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=[alpn],
        server_name=server_name,
        idle_timeout=idle_timeout,
        max_stream_data=stream_window,
        max_data=stream_window * 16,
    )
    config.initial_rtt = INITIAL_RTT
    if trust is not None:
        config.load_verify_locations(cadata=_pem(trust))
    else:  # ca_pin: the CA comes in the server's chain and must match the pin (see pinned_ca)
        config.verify_mode = ssl.CERT_NONE
    if identity is not None:
        config.certificate = identity.cert_chain[0]
        config.certificate_chain = list(identity.cert_chain[1:])
        config.private_key = identity.key
    quic = FleetQuicConnection(configuration=config)
    quic.fleet_setup(TLSPolicy(trust, frozenset(), ca_pin if trust is None else None), stream_window)

    sock = _udp_socket(local_addr, family)
    protocol = _Protocol(quic, loop)
    protocol.endpoint = _client_endpoint(loop, sock, protocol)
    conn = _QuicConnection(
        protocol, is_client=True, send_high_water=send_high_water, family=family
    )
    protocol.connect(addr)
    try:
        async with asyncio.timeout(handshake_timeout):
            await asyncio.shield(conn._confirmed)
    except TimeoutError:
        conn.close(ErrorCode.NO_ERROR, "handshake timeout")
        conn._terminate()
        raise TransportError(
            0, f"handshake with {host}:{port} timed out", application=False, remote=False,
            kind="timeout",
        ) from None
    except TransportError:
        # Keep the socket around for the closing period, then it is closed by _terminate().
        raise
    except BaseException:
        # Cancelled (the other transport won the race, or the caller gave up): this attempt
        # must end here. Left alone it would keep retransmitting its Initial and could complete
        # seconds later as a connection nobody uses (the proxy would take it as the device's).
        conn.close(ErrorCode.NO_ERROR, "connection attempt abandoned")
        conn._terminate()
        raise
    if keepalive:
        conn.start_keepalive(keepalive)
    release_free_heap()
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
) -> Server:
    """Listen for QUIC connections with mutual TLS against ``identity.ca``.

    Every connection must present a client certificate chaining to ``identity.ca`` with the
    clientAuth EKU, except on an ALPN listed in ``anonymous_alpns`` (then a certificate is
    optional, but verified if present). After the handshake ``authorize(conn)`` runs (may be
    async, may raise Refused); only then are the peer's streams delivered and
    ``on_connection(conn)`` is started as a task.
    """
    unknown = set(anonymous_alpns) - set(alpns)
    if unknown:
        raise ValueError(f"anonymous ALPNs not served: {sorted(unknown)}")
    config = QuicConfiguration(
        is_client=False,
        alpn_protocols=list(alpns),
        idle_timeout=idle_timeout,
        max_stream_data=stream_window,
        max_data=stream_window * 16,
    )
    config.initial_rtt = INITIAL_RTT
    config.certificate = identity.cert_chain[0]
    config.certificate_chain = list(identity.cert_chain[1:])
    config.private_key = identity.key
    policy = TLSPolicy(identity.ca, frozenset(anonymous_alpns))

    server = _QuicServer(
        authorize=authorize,
        on_connection=on_connection,
        send_high_water=send_high_water,
        authorize_timeout=authorize_timeout,
    )
    loop = asyncio.get_running_loop()

    def create_protocol(connection: QuicConnection) -> _Protocol:
        # The demultiplexer builds plain QuicConnections; adopt them before any packet.
        protocol = _Protocol(adopt(connection, policy, stream_window), loop)
        conn = _ServerConnection(protocol, server)
        server._connections.add(conn)
        return protocol

    family, bind = await _resolve(loop, host, port, socket.AI_PASSIVE)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind(bind)
        tune_buffers(sock)
    except OSError:
        sock.close()
        raise
    demux = Demux(config, create_protocol)
    demux.endpoint = DatagramEndpoint(loop, sock, demux.datagram_received, demux.batch_end)
    server._endpoint = demux.endpoint
    server._demux = demux
    return server
