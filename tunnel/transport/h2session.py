"""The fleet protocol over HTTP/2 as a sans-I/O session on h2 (bytes in, events and bytes out).

``FleetH2Session`` knows the fleet's use of HTTP/2 (``tcp.py``'s docstring): the hello, the
client's streams (``POST /fleet/stream``), the pool of idle reverse requests the server claims
to open its streams, the close carried in GOAWAY, and the control-frame budget that meters
what a server's peer sends before h2 parses it. It never touches a socket, a timer or the
event loop: ``receive(data, now)`` returns fleet events, ``data_to_send()`` the bytes to write.
``tcp.py`` is the asyncio adapter that feeds it and turns its events into the stream core's;
``tests/transport/test_h2session.py`` drives a client and a server session in memory.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingAckReceived,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    WindowUpdated,
)
from h2.events import StreamReset as H2StreamReset
from h2.exceptions import H2Error, StreamClosedError
from h2.settings import SettingCodes, Settings

from .base import TransportError
from .h2wire import (
    HELLO_PATH,
    MAX_CONCURRENT_STREAMS,
    MAX_FRAME_SIZE,
    MAX_H2_CODE,
    REVERSE_PATH,
    STREAM_PATH,
    ControlFrameMeter,
    FrameBudget,
    close_payload,
    parse_goaway,
)

log = logging.getLogger("tunnel.transport.tcp")


def _text_headers(headers: Iterable[tuple[bytes | str, bytes | str]] | None) -> dict[str, str]:
    """A header list as text. h2 types headers as bytes, but with ``header_encoding="utf-8"``
    (how :class:`FleetH2Session` configures it) it hands them out already decoded."""
    def text(value: bytes | str) -> str:
        return value.decode() if isinstance(value, bytes) else value
    return {text(name): text(value) for name, value in headers or ()}


# ------------------------------------------------------------------------------ events


@dataclass(frozen=True)
class PeerStream:
    """The peer opened a stream (server: a client's request; client: a claimed reverse one)."""

    stream_id: int


@dataclass(frozen=True)
class StreamData:
    stream_id: int
    data: bytes
    #: bytes counted against flow control (data + padding)
    flow_len: int


@dataclass(frozen=True)
class StreamEnd:
    stream_id: int


@dataclass(frozen=True)
class StreamAborted:
    """RST_STREAM: both directions of the stream are over."""

    stream_id: int
    code: int


@dataclass(frozen=True)
class HelloRequested:
    """Server: the client's hello arrived; answer with ``answer_hello``."""

    headers: dict[str, str]


@dataclass(frozen=True)
class HelloAnswered:
    """Client: the server's hello answer is complete."""

    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class PingAnswered:
    uid: int


@dataclass(frozen=True)
class SendRoom:
    """Windows grew or settings changed: blocked writers and stream openers may go on."""


@dataclass(frozen=True)
class PoolGrew:
    """Server: the client offered one more reverse request."""


@dataclass(frozen=True)
class Closed:
    """The connection is over: the peer's GOAWAY, a protocol error, or too many frames."""

    error: TransportError
    #: close the socket without answering (the peer floods us)
    stop_reading: bool = False


Event = (PeerStream | StreamData | StreamEnd | StreamAborted | HelloRequested | HelloAnswered
         | PingAnswered | SendRoom | PoolGrew | Closed)


# ----------------------------------------------------------------------------- session


@dataclass
class FleetH2Session:
    """One side of a fleet connection over HTTP/2 (``client``: the dialer)."""

    client: bool
    stream_window: int
    #: the client's ``:authority``
    server_name: str = ""
    #: server: meters the peer's control frames (None: not metered)
    meter: ControlFrameMeter | None = None
    started: bool = False
    #: the hello stream (client: our request; server: the client's)
    hello_sid: int | None = None
    hello_headers: dict[str, str] = field(default_factory=dict)
    hello_body: bytearray = field(default_factory=bytearray)
    #: client: its idle reverse requests; server: the ones it may claim
    reverse_pool: deque[int] = field(default_factory=deque)
    #: client: how many idle reverse requests to keep open (from the hello)
    reverse_target: int = 0

    def __post_init__(self) -> None:
        self.h2 = H2Connection(H2Configuration(client_side=self.client, header_encoding="utf-8"))
        # Our settings from the first SETTINGS frame on (h2 sends ``local_settings`` in the
        # preface); until the peer read them it assumes the smaller HTTP/2 defaults.
        self.h2.local_settings = Settings(client=self.client, initial_values={
            SettingCodes.INITIAL_WINDOW_SIZE: self.stream_window,
            SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
            SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
            SettingCodes.MAX_HEADER_LIST_SIZE: 16384,
        })
        self.h2.max_inbound_frame_size = MAX_FRAME_SIZE

    # -- output

    def data_to_send(self) -> bytes:
        return self.h2.data_to_send()

    def start(self) -> None:
        """The connection preface and SETTINGS, and the connection's receive window."""
        self.h2.initiate_connection()
        # Connection window = sum of all stream windows: it never binds before the per-stream
        # windows do, so one stalled stream cannot starve the others (as with QUIC).
        target = min(MAX_CONCURRENT_STREAMS * self.stream_window, 2**31 - 1)
        grow = target - self.h2.inbound_flow_control_window
        if grow > 0:
            self.h2.increment_flow_control_window(grow)
        self.started = True

    def request_headers(self, path: str, *, end: bool = False,
                        idle_timeout: float | None = None) -> list[tuple[str, str]]:
        headers = [
            (":method", "GET" if end else "POST"),
            (":scheme", "https"),
            (":authority", self.server_name or "fleet"),
            (":path", path),
        ]
        if idle_timeout is not None:
            headers.append(("fleet-idle-timeout", f"{idle_timeout:g}"))
        return headers

    def send_hello(self, idle_timeout: float) -> None:
        """Client: ``GET /fleet/hello`` with our idle timeout."""
        sid = self.h2.get_next_available_stream_id()
        self.hello_sid = sid
        self.h2.send_headers(
            sid, self.request_headers(HELLO_PATH, end=True, idle_timeout=idle_timeout),
            end_stream=True,
        )

    def answer_hello(self, reverse_pool: int, idle_timeout: float, ca_pem: bytes) -> None:
        """Server: the pool size and idle timeout the client should use, and the fleet CA."""
        assert self.hello_sid is not None
        self.h2.send_headers(self.hello_sid, [
            (":status", "200"),
            ("fleet-reverse-pool", str(reverse_pool)),
            ("fleet-idle-timeout", f"{idle_timeout:g}"),
        ])
        self.h2.send_data(self.hello_sid, ca_pem, end_stream=True)

    def can_open_stream(self) -> bool:
        return self.h2.open_outbound_streams < self.h2.remote_settings.max_concurrent_streams

    def open_stream(self) -> int:
        """Client: a new ``POST /fleet/stream`` (check ``can_open_stream`` first)."""
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, self.request_headers(STREAM_PATH))
        return sid

    def replenish_pool(self) -> None:
        """Client: keep ``reverse_target`` idle reverse requests open at the server."""
        while len(self.reverse_pool) < self.reverse_target and self.can_open_stream():
            sid = self.h2.get_next_available_stream_id()
            self.h2.send_headers(sid, self.request_headers(REVERSE_PATH))
            self.reverse_pool.append(sid)

    def claim_reverse(self) -> int | None:
        """Server: open a stream by answering one of the client's idle reverse requests
        (None: the pool is empty, wait for ``PoolGrew``)."""
        while self.reverse_pool:
            sid = self.reverse_pool.popleft()
            try:
                self.h2.send_headers(sid, [(":status", "200")])
            except StreamClosedError:  # the client withdrew it meanwhile: take the next
                continue
            return sid
        return None

    def send_room(self, sid: int) -> int | None:
        """Bytes the peer's windows let us send on ``sid`` now (one frame at most); None when
        h2 forgot the stream (the peer reset it)."""
        try:
            window = self.h2.local_flow_control_window(sid)
        except StreamClosedError:
            return None
        return min(window, self.h2.max_outbound_frame_size)

    def send_data(self, sid: int, data: bytes) -> None:
        self.h2.send_data(sid, data)

    def end_stream(self, sid: int) -> None:
        with contextlib.suppress(StreamClosedError):
            self.h2.end_stream(sid)

    def reset_stream(self, sid: int, code: int) -> None:
        with contextlib.suppress(StreamClosedError, H2Error):
            self.h2.reset_stream(sid, code)

    def ack(self, sid: int, n: int) -> None:
        """The application consumed (or dropped) ``n`` bytes of ``sid``: WINDOW_UPDATE."""
        if n > 0:
            with contextlib.suppress(H2Error):
                self.h2.acknowledge_received_data(n, sid)

    def ping(self, uid: int) -> None:
        self.h2.ping(uid.to_bytes(8, "big"))

    def goaway(self, code: int, reason: str, *, application: bool) -> None:
        """Close: GOAWAY carrying the code and reason (see ``h2wire.close_payload``)."""
        if not self.started:
            self.start()
        h2_code = code if 0 <= code <= MAX_H2_CODE else ErrorCodes.INTERNAL_ERROR
        with contextlib.suppress(H2Error):
            self.h2.close_connection(
                error_code=h2_code, additional_data=close_payload(code, reason, application)
            )

    # -- input

    def receive(self, data: bytes, now: float, budget: FrameBudget | None = None) -> list[Event]:
        """What ``data`` from the peer means. After a ``Closed`` event nothing else counts."""
        if self.meter is not None and not self.meter.feed(data, now, budget):
            meter, self.meter = self.meter, None
            reason = (f"too many HTTP/2 control frames ({meter.frames} SETTINGS, PING, "
                      f"WINDOW_UPDATE, RST_STREAM, PRIORITY, HEADERS or empty DATA; allowed: "
                      f"{meter.budget.burst:g} at once, {meter.budget.rate:g} a second)")
            self.goaway(ErrorCodes.ENHANCE_YOUR_CALM, reason, application=False)
            return [Closed(TransportError(ErrorCodes.ENHANCE_YOUR_CALM, reason, application=False,
                                          remote=False, kind="protocol"), stop_reading=True)]
        try:
            h2_events = self.h2.receive_data(data)
        except H2Error as exc:  # h2 queued a GOAWAY
            return [Closed(TransportError(
                ErrorCodes.PROTOCOL_ERROR, f"HTTP/2 protocol error: {exc}",
                application=False, remote=False, kind="protocol",
            ))]
        out: list[Event] = []
        for event in h2_events:
            try:
                self._translate(event, out)
            except H2Error as exc:  # e.g. a stream the peer closed meanwhile
                log.debug("ignored h2 error on %s: %s", event, exc)
        return out

    def _translate(self, event: object, out: list[Event]) -> None:
        if isinstance(event, DataReceived):
            sid = event.stream_id
            if sid == self.hello_sid:
                self.hello_body += event.data
                self.ack(sid, event.flow_controlled_length)
            else:
                out.append(StreamData(sid, event.data, event.flow_controlled_length))
        elif isinstance(event, StreamEnded):
            sid = event.stream_id
            if sid == self.hello_sid:
                if self.client:
                    out.append(HelloAnswered(self.hello_headers, bytes(self.hello_body)))
            elif not self.client and sid in self.reverse_pool:
                # the client withdrew a pool request: it is of no use any more
                self.reverse_pool.remove(sid)
            else:
                out.append(StreamEnd(sid))
        elif isinstance(event, H2StreamReset):
            sid = event.stream_id
            if sid in self.reverse_pool:
                self.reverse_pool.remove(sid)
                if self.client:
                    self.replenish_pool()
            out.append(StreamAborted(sid, int(event.error_code)))
        elif isinstance(event, RequestReceived):
            self._on_request(event, out)
        elif isinstance(event, ResponseReceived):
            sid = event.stream_id
            if sid == self.hello_sid:
                self.hello_headers = _text_headers(event.headers)
            elif sid in self.reverse_pool:
                # the server claimed an idle reverse stream: it is a server-opened stream now
                self.reverse_pool.remove(sid)
                out.append(PeerStream(sid))
                self.replenish_pool()
        elif isinstance(event, WindowUpdated | RemoteSettingsChanged):
            out.append(SendRoom())
        elif isinstance(event, PingAckReceived):
            out.append(PingAnswered(int.from_bytes(event.ping_data, "big")))
        elif isinstance(event, ConnectionTerminated):
            out.append(Closed(parse_goaway(event)))

    def _on_request(self, event: RequestReceived, out: list[Event]) -> None:  # server side
        headers = _text_headers(event.headers)
        path = headers.get(":path", "")
        sid = event.stream_id
        if path == STREAM_PATH:
            self.h2.send_headers(sid, [(":status", "200")])
            out.append(PeerStream(sid))
        elif path == REVERSE_PATH:
            self.reverse_pool.append(sid)
            out.append(PoolGrew())
        elif path == HELLO_PATH and self.hello_sid is None:
            self.hello_sid = sid
            out.append(HelloRequested(headers))
        else:
            self.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
