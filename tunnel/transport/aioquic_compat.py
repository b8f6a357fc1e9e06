"""Every use of aioquic's private members, in one place (aioquic 1.7.2, exact pin).

fleet-tunnel drives aioquic's sans-I/O ``QuicConnection`` itself (``quic.py``) and needs a few
things aioquic does not offer publicly. They are all here, each checked at import by
``check_internals()`` so an aioquic upgrade fails loudly at start rather than subtly at run
time. No other module touches an aioquic name starting with ``_``.

* mutual TLS: each server connection's ``tls.Context`` gets ``_request_client_certificate =
  True`` and its class is switched to ``FleetTLSContext``, a subclass that hooks
  ``_server_handle_certificate`` (missing certificate on a non-anonymous ALPN -> alert 116),
  ``_server_handle_certificate_verify`` (after aioquic checked the CertificateVerify
  signature, the chain is verified against the pinned CA) and
  ``_client_handle_certificate_verify`` (the server chain is verified against the pinned CA
  before aioquic's own cadata check). The switch happens in
  ``FleetQuicConnection._initialize``. Server connections are built by the demultiplexer as
  plain ``QuicConnection`` objects and ``adopt()``-ed before any packet is processed.
* credit on consumption: ``FleetQuicConnection._write_stream_limits`` replaces aioquic's
  "double the window when half of it *arrived*" with ``policy.next_receive_limit`` applied to
  the bytes the application *read*.
* idle timeout: ``handle_timer`` notes when the timer itself ended the connection.
* migration: in-flight packets are declared lost with ``QuicPacketRecovery._on_packets_lost``
  (as a non-congestion event) on a rebind (client) or peer address change (server).
* datagram size (``PathMtu``, at the end; the decisions are ``pmtu.py``'s): the size in the
  connection, congestion controller and pacer; probe packets built with aioquic's packet builder
  and registered with its loss recovery; the congestion controller's per-packet calls watched
  (on the instance) for full-size packets acknowledged or lost.
* read-only views (``fleet_*`` methods): the current path, RTT, negotiated idle timeout,
  handshake state, the close event, the peer certificate, per-stream buffer sizes (send
  backpressure reads ``QuicStreamSender._buffer_start/_buffer_stop``).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any, cast

import aioquic
from aioquic import tls
from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import (
    MAX_STREAM_DATA_FRAME_CAPACITY,
    QuicConnection,
    QuicConnectionState,
)
from aioquic.quic.packet import (
    QuicFrameType,
    QuicPacketType,
    pull_quic_header,
    pull_quic_transport_parameters,
)
from aioquic.quic.packet_builder import QuicDeliveryState, QuicPacketBuilder, QuicSentPacket
from aioquic.quic.recovery import QuicPacketRecovery
from aioquic.quic.stream import QuicStream
from cryptography import x509

from .pmtu import Prober, SizeChange, State
from .policy import CertificateRejected, next_receive_limit, pinned_ca, verify_peer_chain

AIOQUIC_VERSION = "1.7.2"


def check_internals() -> None:
    """Fail loudly at import if the aioquic internals this module uses are not there."""
    problems: list[str] = []
    if aioquic.__version__ != AIOQUIC_VERSION:
        problems.append(f"aioquic {aioquic.__version__} installed, {AIOQUIC_VERSION} required")
    ctx = tls.Context(is_client=False)
    for attr in ("_request_client_certificate", "_peer_certificate", "_peer_certificate_chain",
                 "alpn_negotiated", "_server_name"):
        if not hasattr(ctx, attr):
            problems.append(f"tls.Context.{attr}")
    for meth in ("_server_handle_certificate", "_server_handle_certificate_verify",
                 "_client_handle_certificate_verify"):
        if not callable(getattr(tls.Context, meth, None)):
            problems.append(f"tls.Context.{meth}()")
    for meth in ("_initialize", "_write_stream_limits", "_on_max_stream_data_delivery",
                 "receive_datagram", "change_connection_id"):
        if not callable(getattr(QuicConnection, meth, None)):
            problems.append(f"QuicConnection.{meth}()")
    write_limits = getattr(QuicConnection, "_write_stream_limits", None)
    if callable(write_limits) and list(inspect.signature(write_limits).parameters) != [
        "self", "builder", "space", "stream"
    ]:
        problems.append("QuicConnection._write_stream_limits(builder, space, stream)")
    on_lost = getattr(QuicPacketRecovery, "_on_packets_lost", None)
    if not callable(on_lost) or not {"congestion_event", "now", "packets", "space"} <= set(
        inspect.signature(on_lost).parameters
    ):
        problems.append("QuicPacketRecovery._on_packets_lost(congestion_event, now, packets, space)")
    qs = QuicStream(stream_id=0, max_stream_data_local=1)
    obj: object
    attrs: tuple[str, ...]
    for obj, attrs in (
        (qs, ("max_stream_data_local", "max_stream_data_local_sent")),
        (qs.sender, ("_buffer_start", "_buffer_stop", "is_finished")),
        (qs.receiver, ("_buffer", "highest_offset", "is_finished")),
    ):
        problems += [f"{type(obj).__name__}.{a}" for a in attrs if not hasattr(obj, a)]
    for meth in ("receive_datagram", "datagrams_to_send", "get_timer", "handle_timer",
                 "next_event", "connect", "close"):
        if not callable(getattr(QuicConnection, meth, None)):
            problems.append(f"QuicConnection.{meth}()")
    conn = QuicConnection(configuration=QuicConfiguration(is_client=True))
    for obj, attrs in (
        (conn, ("_network_paths", "_loss", "_configuration", "_close_event", "_state",
                "_handshake_complete", "_handshake_confirmed", "_peer_cid",
                "_peer_cid_available", "_streams", "_is_client", "_remote_max_idle_timeout")),
        (conn._loss, ("_rtt_smoothed", "_rtt_initialized", "_pto_count", "spaces")),
    ):
        problems += [f"{type(obj).__name__}.{a}" for a in attrs if not hasattr(obj, a)]
    if "host_cid_length" not in inspect.signature(pull_quic_header).parameters:
        problems.append("aioquic.quic.packet.pull_quic_header(buf, host_cid_length)")
    if problems:
        raise ImportError(
            "tunnel.transport.aioquic_compat relies on aioquic==1.7.2 internals that are missing: "
            + ", ".join(problems)
        )




check_internals()


# ------------------------------------------------------------------------------------ TLS


class AlertCertificateRequired(tls.Alert):
    description = tls.AlertDescription.certificate_required


class TLSPolicy:
    def __init__(
        self, ca: x509.Certificate | None, anonymous_alpns: frozenset[str], pin: str | None = None
    ) -> None:
        self.ca = ca
        self.anonymous_alpns = anonymous_alpns
        #: client only: trust the CA in the server's chain whose key matches this pin
        self.pin = pin


def _alert(exc: CertificateRejected) -> tls.Alert:
    cls = tls.AlertCertificateExpired if exc.expired else tls.AlertBadCertificate
    return cls(exc.reason)


class FleetTLSContext(tls.Context):
    """aioquic's TLS context plus chain verification against the pinned fleet CA."""

    _fleet: TLSPolicy
    #: the certificate check that failed this handshake, if one did
    fleet_rejection: CertificateRejected | None = None

    def _fleet_verify(self, purpose: Any, server_name: str | None) -> None:
        try:
            chain = list(self._peer_certificate_chain)
            ca = self._fleet.ca
            if self._fleet.pin is not None:
                ca = pinned_ca(self._peer_certificate, chain, self._fleet.pin)
            if ca is None:
                raise CertificateRejected("no fleet CA (nor CA pin) to verify the peer against")
            verify_peer_chain(
                self._peer_certificate,
                chain,
                ca,
                purpose=purpose,
                server_name=server_name,
            )
        except CertificateRejected as exc:
            self.fleet_rejection = exc  # its kind (interception or not) for the close
            raise _alert(exc) from exc

    def _server_handle_certificate(self, input_buf: Any) -> None:
        super()._server_handle_certificate(input_buf)
        if (
            self._peer_certificate is None
            and self.alpn_negotiated not in self._fleet.anonymous_alpns
        ):
            raise AlertCertificateRequired(
                f"a client certificate is required for ALPN {self.alpn_negotiated!r}"
            )

    def _server_handle_certificate_verify(self, input_buf: Any) -> None:
        # aioquic checks the CertificateVerify signature (possession of the key) ...
        super()._server_handle_certificate_verify(input_buf)
        # ... and we check the chain, validity and clientAuth EKU.
        self._fleet_verify("client", None)

    def _client_handle_certificate_verify(self, input_buf: Any) -> None:
        # Ours first for a clear reason; aioquic then checks signature + cadata chain again
        # (with a pin there is no cadata: aioquic checks the signature only, ours the chain).
        self._fleet_verify("server", self._server_name)
        super()._client_handle_certificate_verify(input_buf)



# ------------------------------------------------------------------------- QUIC connection


class FleetQuicConnection(QuicConnection):
    """QuicConnection with mTLS hooks, credit on consumption and loss-on-migration."""

    def fleet_setup(self, policy: TLSPolicy, window: int) -> None:
        self._fleet_policy = policy
        self._fleet_window = window
        #: bytes the application has read, per stream id (credit is granted from these)
        self._fleet_consumed: dict[int, int] = {}
        #: server: how often the peer address changed (in-flight packets were declared lost)
        self.fleet_peer_moves = 0
        #: the connection ended because its idle timer fired (nothing heard for the timeout)
        self.fleet_idle_expired = False

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        assert type(self.tls) is tls.Context, type(self.tls)
        self.tls.__class__ = FleetTLSContext
        cast(FleetTLSContext, self.tls)._fleet = self._fleet_policy  # its class, swapped above
        if not self._is_client:
            self.tls._request_client_certificate = True

    def _write_stream_limits(self, builder: Any, space: Any, stream: QuicStream) -> None:
        # Replaces aioquic's credit-on-arrival (doubling) with credit on consumption.
        if (stream.max_stream_data_local and not stream.receiver.is_finished
                and stream.stream_id is not None):  # None only in aioquic's types, never here
            stream.max_stream_data_local = next_receive_limit(
                self._fleet_consumed.get(stream.stream_id, 0),
                stream.max_stream_data_local,
                self._fleet_window,
            )
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA,
                capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
                handler=self._on_max_stream_data_delivery,
                handler_args=(stream,),
            )
            buf.push_uint_var(stream.stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local

    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None:
        before = self._network_paths[0].addr if self._network_paths else None
        super().receive_datagram(data, addr, now)
        if (
            not self._is_client
            and before is not None
            and self._handshake_complete
            and self._network_paths
            and self._network_paths[0].addr != before
        ):
            # The peer moved: what is in flight went to the old address. Retransmit now
            # rather than after PTO back-off (RESEARCH.md: 37-952 ms -> 1-11 ms).
            self.fleet_declare_in_flight_lost(now)
            self.fleet_peer_moves += 1

    def fleet_declare_in_flight_lost(self, now: float) -> int:
        count = 0
        loss = self._loss
        for space in loss.spaces:
            packets = list(space.sent_packets.values())
            if packets:
                count += len(packets)
                loss._on_packets_lost(
                    congestion_event=False, now=now, packets=packets, space=space
                )
        loss._pto_count = 0
        return count

    def fleet_spare_peer_cids(self) -> int:
        return len(self._peer_cid_available)

    def handle_timer(self, now: float) -> None:
        closing = self._close_event is not None
        super().handle_timer(now)
        if not closing and self._close_event is not None:
            # the timer itself ended the connection: nothing was heard for the idle timeout
            self.fleet_idle_expired = True

    # -- read-only views of aioquic's state (what the transport may know of it)

    def fleet_peer_addr(self) -> Any:
        """The raw address of the current network path (None before the first datagram)."""
        paths = self._network_paths
        return paths[0].addr if paths else None

    def fleet_rtt(self) -> float | None:
        """Smoothed round-trip time of the current path (None before a sample)."""
        loss = self._loss
        return loss._rtt_smoothed if getattr(loss, "_rtt_initialized", False) else None

    def fleet_idle_timeout(self) -> float:
        """The negotiated idle timeout: the smaller of ours and the peer's."""
        local = self._configuration.idle_timeout
        remote = getattr(self, "_remote_max_idle_timeout", None)
        return min(local, remote) if remote else local

    def fleet_initial_rtt(self) -> float:
        return self._configuration.initial_rtt

    def fleet_handshake_complete(self) -> bool:
        return bool(self._handshake_complete)

    def fleet_handshake_confirmed(self) -> bool:
        return bool(self._handshake_confirmed)

    def fleet_close(self) -> tuple[events.ConnectionTerminated, bool] | None:
        """``(close event, closed by the peer)`` once the connection is closing, else None."""
        ev = self._close_event
        if ev is None:
            return None
        return ev, self._state == QuicConnectionState.DRAINING

    def fleet_peer_certificate(self) -> x509.Certificate | None:
        ctx = getattr(self, "tls", None)
        return ctx._peer_certificate if ctx is not None else None

    def fleet_rejection(self) -> CertificateRejected | None:
        """The certificate check that failed this connection's handshake, if one did."""
        return getattr(getattr(self, "tls", None), "fleet_rejection", None)

    def fleet_peer_cid(self) -> bytes:
        return self._peer_cid.cid

    def fleet_stream_buffers(self, stream_id: int) -> tuple[int, int]:
        """``(bytes in the reorder buffer, bytes sent but not acknowledged)`` of a stream."""
        qs = self._streams.get(stream_id)
        if qs is None:
            return 0, 0
        return len(qs.receiver._buffer), qs.sender._buffer_stop - qs.sender._buffer_start

    def fleet_stream_credit(self, stream_id: int) -> int | None:
        """The highest offset we allow the peer to send on a stream (None: unknown stream)."""
        qs = self._streams.get(stream_id)
        return qs.max_stream_data_local if qs is not None else None

    def fleet_streams(self) -> int:
        """Streams aioquic still holds (tests, memory checks)."""
        return len(self._streams)

    def fleet_consumed(self, stream_id: int, total: int) -> bool:
        """The application has read ``total`` bytes of a stream: whether new credit is due
        (the caller then transmits soon; the MAX_STREAM_DATA frame goes out with it)."""
        self._fleet_consumed[stream_id] = total
        qs = self._streams.get(stream_id)
        return bool(qs is not None and qs.max_stream_data_local and next_receive_limit(
            total, qs.max_stream_data_local, self._fleet_window
        ) != qs.max_stream_data_local)

    def fleet_forget(self, stream_id: int) -> None:
        self._fleet_consumed.pop(stream_id, None)


def adopt(connection: QuicConnection, policy: TLSPolicy, window: int) -> FleetQuicConnection:
    """Make a plain ``QuicConnection`` (built by the server's demultiplexer) a fleet one.

    Must run before any packet is processed: it switches the class, which is how the TLS and
    flow-control hooks above get in without copying aioquic's constructor.
    """
    assert type(connection) is QuicConnection, type(connection)
    connection.__class__ = FleetQuicConnection
    assert isinstance(connection, FleetQuicConnection)
    connection.fleet_setup(policy, window)
    return connection


# ------------------------------------------------------------ datagram size (see pmtu.py)
#
# aioquic 1.7.2 has no path-MTU discovery: ``QuicConfiguration.max_datagram_size`` is read once,
# into ``QuicConnection._max_datagram_size`` (the packet builder of every ``datagrams_to_send``),
# the congestion controller (``_loss._cc._max_datagram_size``: window growth per ACK, minimum
# window) and the pacer (``_loss._pacer._max_datagram_size``: one packet's pacing time). The
# functions below change all three together, build the probe packets ``pmtu.Prober`` asks for
# and report which full-size packets were acknowledged or lost.

#: RFC 9000 section 18.2: a peer that sends no max_udp_payload_size accepts this much
DEFAULT_MAX_UDP_PAYLOAD = 65527


def check_pmtu_internals() -> None:
    """Fail loudly at import if what ``PathMtu`` uses of aioquic is not there."""
    problems: list[str] = []
    conn = QuicConnection(configuration=QuicConfiguration(is_client=True))
    loss = conn._loss
    obj: object
    for obj, attrs in (
        (conn, ("_max_datagram_size", "_cryptos", "_spaces", "_packet_number", "_spin_bit",
                "_version", "host_cid", "_handshake_confirmed", "_network_paths", "_close_event",
                "_peer_cid", "_loss")),
        (tls.Context(is_client=True), ("received_extensions",)),
        (loss, ("_cc", "_pacer", "_time_of_last_sent_ack_eliciting_packet", "_pto_count",
                "_rtt_initialized", "_rtt_smoothed", "spaces")),
        (loss._cc, ("_max_datagram_size", "congestion_window", "on_packet_acked",
                    "on_packets_lost", "on_packets_expired")),
        (loss._pacer, ("_max_datagram_size", "update_rate")),
    ):
        problems += [f"{type(obj).__name__}.{a}" for a in attrs if not hasattr(obj, a)]
    builder_params = set(inspect.signature(QuicPacketBuilder).parameters)
    if not {"host_cid", "peer_cid", "version", "is_client", "max_datagram_size",
            "packet_number", "spin_bit"} <= builder_params:
        problems.append("QuicPacketBuilder(host_cid, peer_cid, version, is_client, ...)")
    if problems:
        raise ImportError(
            "tunnel.transport.aioquic_compat (datagram size) relies on aioquic==1.7.2 internals "
            "that are missing: " + ", ".join(problems)
        )


check_pmtu_internals()


def peer_max_udp_payload(quic: QuicConnection) -> int:
    """The peer's ``max_udp_payload_size`` transport parameter (RFC 9000's default if none).

    aioquic parses but does not keep it; the TLS context keeps the raw extension.
    """
    for ext_type, data in getattr(quic.tls, "received_extensions", None) or ():
        if ext_type == tls.ExtensionType.QUIC_TRANSPORT_PARAMETERS:
            params = pull_quic_transport_parameters(Buffer(data=data))
            return params.max_udp_payload_size or DEFAULT_MAX_UDP_PAYLOAD
    return DEFAULT_MAX_UDP_PAYLOAD


def max_datagram_size(quic: QuicConnection) -> int:
    """The datagram size (UDP payload) the connection builds its packets to."""
    return int(quic._max_datagram_size)


def set_max_datagram_size(quic: QuicConnection, size: int) -> int:
    """Build datagrams of at most ``size`` bytes from now on; returns the size applied.

    Never below aioquic's 1,200 nor above the peer's ``max_udp_payload_size``. The congestion
    window stays as it is in bytes (at least two packets of the new size), so a change never
    makes the connection burst nor stop; the pacer's packet time follows at once.
    """
    size = max(SMALLEST_MAX_DATAGRAM_SIZE, min(size, peer_max_udp_payload(quic)))
    quic._max_datagram_size = size
    loss = quic._loss
    cc: Any = loss._cc  # reno and cubic keep the size; their base class does not declare it
    cc._max_datagram_size = size
    if hasattr(cc, "additive_increase_factor"):  # cubic grows by one packet per window
        cc.additive_increase_factor = size
    cc.congestion_window = max(cc.congestion_window, 2 * size)
    loss._pacer._max_datagram_size = size
    if loss._rtt_initialized:
        loss._pacer.update_rate(
            congestion_window=cc.congestion_window, smoothed_rtt=loss._rtt_smoothed
        )
    return size


def can_probe(quic: QuicConnection) -> bool:
    """Whether a probe may go now: handshake confirmed, not closing, the path validated."""
    paths = quic._network_paths
    return bool(
        quic._handshake_confirmed
        and quic._close_event is None
        and paths
        and paths[0].is_validated
        and quic._cryptos[tls.Epoch.ONE_RTT].send.is_valid()
    )


def send_size_probe(
    quic: QuicConnection, size: int, now: float, on_delivery: Any, *args: Any
) -> tuple[bytes, Any]:
    """One 1-RTT packet of exactly ``size`` bytes: a PING (``on_delivery(state, *args)`` is
    called when it is acknowledged or lost) padded with PADDING frames.

    The packet is registered with loss recovery as ack-eliciting but *not in flight*: its
    loss is detected (time threshold, or PTO) and reported, but it neither takes room in the
    congestion window nor counts as congestion when lost (RFC 9000 section 14.4). The PTO is
    armed from now so that the probe is given one PTO to be acknowledged.
    """
    crypto = quic._cryptos[tls.Epoch.ONE_RTT]
    assert quic._version is not None  # set by the handshake, which is confirmed (can_probe)
    builder = QuicPacketBuilder(
        host_cid=quic.host_cid,
        peer_cid=quic._peer_cid.cid,
        version=quic._version,
        is_client=quic._is_client,
        max_datagram_size=size,
        packet_number=quic._packet_number,
        spin_bit=quic._spin_bit,
    )
    builder.start_packet(QuicPacketType.ONE_RTT, crypto)
    builder.start_frame(QuicFrameType.PING, handler=on_delivery, handler_args=args)
    room = builder.remaining_buffer_space
    builder.start_frame(QuicFrameType.PADDING, capacity=room).push_bytes(bytes(room - 1))
    datagrams, packets = builder.flush()
    quic._packet_number = builder.packet_number
    loss = quic._loss
    space = quic._spaces[tls.Epoch.ONE_RTT]
    for packet in packets:
        packet.sent_time = now
        packet.in_flight = False
        loss.on_packet_sent(packet=packet, space=space)
    loss._time_of_last_sent_ack_eliciting_packet = now
    return datagrams[0], quic._network_paths[0].addr


def declare_large_lost(quic: QuicConnection, size: int, now: float) -> int:
    """Declare every packet in flight bigger than ``size`` lost, without a congestion event.

    After a black hole their data is resent at once, at the new size, instead of after PTOs
    (each further PTO doubling the wait) or as one congestion loss that halves the window.
    """
    count = 0
    loss = quic._loss
    for space in loss.spaces:
        packets = [p for p in space.sent_packets.values() if p.sent_bytes > size]
        if packets:
            count += len(packets)
            loss._on_packets_lost(congestion_event=False, now=now, packets=packets, space=space)
    loss._pto_count = 0
    return count


class PathMtu:
    """Runs a ``pmtu.Prober`` on one aioquic connection (client or server, its send direction).

    ``datagrams_to_send(now)`` replaces ``QuicConnection.datagrams_to_send``: it notices a
    confirmed handshake and a new peer address, applies the prober's size before aioquic
    builds anything, and appends a probe when one is due. ``path_changed(now)`` is for a
    change aioquic cannot see (the client moved to a new local socket). While the larger size
    is in use, the congestion controller's per-packet calls are watched for full-size packets
    acknowledged or lost (black hole detection); at the base size nothing is watched.
    """

    __slots__ = ("_quic", "prober", "on_change", "_applied", "_reason", "_now", "_path_addr",
                 "_watching", "probes_acked", "probes_lost")

    def __init__(self, quic: QuicConnection, prober: Prober | None = None,
                 on_change: Any = None) -> None:
        self._quic = quic
        self.prober = prober if prober is not None else Prober()
        #: ``on_change(size, reason)`` after the size changed (the transport logs it)
        self.on_change = on_change
        self._applied = self.prober.base
        self._reason = ""
        self._now = 0.0
        self._path_addr: Any = None
        self._watching = False
        #: counters (tests, diagnostics)
        self.probes_acked = 0
        self.probes_lost = 0

    @property
    def size(self) -> int:
        return self._applied

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        quic = self._quic
        prober = self.prober
        self._now = now
        if prober.state is State.WAITING:
            if not quic._handshake_confirmed:
                return quic.datagrams_to_send(now=now)
            # never probe beyond what the peer said it accepts (its transport parameter)
            prober.target = min(prober.target, max(prober.base, peer_max_udp_payload(quic)))
            prober.handshake_confirmed(now)
            self._path_addr = quic._network_paths[0].addr if quic._network_paths else None
        elif quic._network_paths and quic._network_paths[0].addr != self._path_addr:
            self._path_addr = quic._network_paths[0].addr
            self._note(prober.path_changed(now))
        if prober.size != self._applied:
            self._apply(now)
        datagrams = quic.datagrams_to_send(now=now)
        if (prober.in_flight is None and prober.next_probe_at is not None
                and now >= prober.next_probe_at and can_probe(quic)):
            probe = prober.poll(now)
            if probe is not None:
                datagrams.append(
                    send_size_probe(quic, probe.size, now, self._probe_delivered, probe.probe_id)
                )
        return datagrams

    def path_changed(self, now: float) -> None:
        """The client moved (new socket or uplink): back to the base size, probe again."""
        self._note(self.prober.path_changed(now))
        if self.prober.size != self._applied:
            self._apply(now)

    # -- internals

    def _note(self, change: SizeChange | None) -> None:
        if change is not None:
            self._reason = change.reason

    def _apply(self, now: float) -> None:
        size = self.prober.size
        lowered = size < self._applied
        self._watch(size > self.prober.base)
        self._applied = set_max_datagram_size(self._quic, size)
        if lowered:
            declare_large_lost(self._quic, size, now)
        if self.on_change is not None:
            self.on_change(self._applied, self._reason)

    def _probe_delivered(self, delivery: QuicDeliveryState, probe_id: int) -> None:
        if delivery == QuicDeliveryState.ACKED:
            self.probes_acked += 1
            self._note(self.prober.probe_acked(probe_id, self._now))
        else:
            self.probes_lost += 1
            searching = self.prober.state is State.SEARCHING
            self._note(self.prober.probe_lost(probe_id, self._now))
            if searching and self.prober.state is State.SMALL and self.on_change is not None:
                # no change of size, but worth a line: this path does not carry the larger one
                self.on_change(self._applied, f"probes of {self.prober.target} bytes lost")

    def _watch(self, on: bool) -> None:
        """Wrap (or unwrap) the congestion controller's per-packet calls on this instance."""
        if on == self._watching:
            return
        self._watching = on
        cc = self._quic._loss._cc
        names = ("on_packet_acked", "on_packets_lost", "on_packets_expired")
        if not on:
            for name in names:
                vars(cc).pop(name, None)
            return
        acked, lost, expired = cc.on_packet_acked, cc.on_packets_lost, cc.on_packets_expired
        prober, base = self.prober, self.prober.base

        def on_packet_acked(*, now: float, packet: QuicSentPacket) -> None:
            if packet.sent_bytes > base:
                prober.large_acked(packet.sent_time or 0.0)
            acked(now=now, packet=packet)

        def on_packets_lost(*, now: float, packets: Iterable[QuicSentPacket]) -> None:
            packets = list(packets)
            self._lost(packets)
            lost(now=now, packets=packets)

        def on_packets_expired(*, packets: Iterable[QuicSentPacket]) -> None:
            packets = list(packets)
            self._lost(packets)
            expired(packets=packets)

        vars(cc).update(zip(names, (on_packet_acked, on_packets_lost, on_packets_expired),
                            strict=True))

    def _lost(self, packets: list[QuicSentPacket]) -> None:
        paths = self._quic._network_paths
        if paths and paths[0].addr != self._path_addr:
            return  # the server saw the peer move: these went to the old address
        base = self.prober.base
        for packet in packets:
            if packet.sent_bytes > base:
                self._note(self.prober.large_lost(packet.sent_time or 0.0, self._now))
