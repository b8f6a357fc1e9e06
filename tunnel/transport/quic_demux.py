"""The QUIC server's shared UDP socket: connections by connection ID, handshakes admitted.

``Demux`` routes each datagram to its connection's protocol (``quic._Protocol``) and, at the
end of every read batch, lets each connection it touched handle its events and transmit once.
New handshakes are admitted by the pure rules below, so overload degrades and never collapses.
aioquic's public API only (its private members are in ``aioquic_compat``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aioquic.buffer import Buffer
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import (
    QuicPacketType,
    encode_quic_version_negotiation,
    pull_quic_header,
)

from .udp import DatagramEndpoint

log = logging.getLogger("tunnel.transport.quic")

#: server: handshakes in progress at once; an Initial beyond it is dropped before any state or
#: crypto (the client retransmits it after its probe timeout, ~1 s, and gets in when there is room)
MAX_HALF_OPEN = 512
#: server: new handshakes started per read batch; the rest of the batch's Initials are dropped
#: (each costs a key exchange and a signature: 16 keep one batch around 50-100 ms on a slow CPU)
MAX_NEW_PER_BATCH = 16
#: server: a handshake not complete after this long is dropped without a word (agents give up
#: after 3 s; left alone aioquic would keep it and resend its flight until the idle timeout)
SERVER_HANDSHAKE_TIMEOUT = 10.0


def admit_initial(half_open: int, new_in_batch: int, *, max_half_open: int = MAX_HALF_OPEN,
                  max_new_per_batch: int = MAX_NEW_PER_BATCH) -> bool:
    """Whether the server starts a handshake for one more Initial (pure; see ``Demux``).

    Overload must degrade, not collapse: past either bound the Initial is dropped before a
    ``QuicConnection`` exists, so a handshake storm costs a header parse per datagram, while
    connected peers (processed first in every batch) keep their keepalives answered.
    """
    return half_open < max_half_open and new_in_batch < max_new_per_batch


def stale_handshakes(started: dict[Any, float], now: float,
                     timeout: float = SERVER_HANDSHAKE_TIMEOUT) -> list[Any]:
    """The half-open connections (key -> loop time the first Initial arrived) past ``timeout``."""
    return [key for key, t in started.items() if now - t >= timeout]


class Demux:
    """The proxy's shared UDP socket: routes datagrams to connections by connection ID.

    Replaces aioquic's asyncio ``QuicServer`` (same rules: version negotiation for unknown
    versions, a new connection only for an Initial of at least 1200 bytes, IDs registered and
    retired as the connection issues them) but receives in batches: each datagram is fed to its
    connection, and at the end of the batch every connection touched handles its events and
    transmits once, in the order the batch first touched them.

    Handshakes are admitted, not just accepted (``admit_initial``): Initials for new connections
    are held until the end of the batch, after the connections already known have handled their
    datagrams and transmitted, so a storm of new agents delays nobody's keepalive; at most
    ``max_new_per_batch`` are started per batch and ``max_half_open`` at once (the rest are
    dropped before any state exists and come back with the client's retransmission); and a
    handshake still not complete after ``handshake_timeout`` is dropped.
    """

    def __init__(
        self,
        configuration: QuicConfiguration,
        create_protocol: Any,
        *,
        max_half_open: int = MAX_HALF_OPEN,
        max_new_per_batch: int = MAX_NEW_PER_BATCH,
        handshake_timeout: float = SERVER_HANDSHAKE_TIMEOUT,
    ) -> None:
        self._configuration = configuration
        self._create_protocol = create_protocol
        self._protocols: dict[bytes, Any] = {}
        self._touched: dict[Any, None] = {}
        self._initials: list[tuple[bytes, Any, bytes]] = []
        #: half-open connections -> loop time their first Initial arrived
        self._half_open: dict[Any, float] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self.max_half_open = max_half_open
        self.max_new_per_batch = max_new_per_batch
        self.handshake_timeout = handshake_timeout
        #: counters (tests, diagnostics)
        self.initials_dropped = 0
        self.handshakes_timed_out = 0
        self._warned_at = -1e9
        self.endpoint: DatagramEndpoint | None = None

    def datagram_received(self, data: bytes, addr: Any) -> None:
        buf = Buffer(data=data)
        try:
            header = pull_quic_header(buf, host_cid_length=self._configuration.connection_id_length)
        except ValueError:
            return
        if (
            header.packet_type != QuicPacketType.VERSION_NEGOTIATION
            and header.version is not None
            and header.version not in self._configuration.supported_versions
        ):
            assert self.endpoint is not None
            self.endpoint.send([(encode_quic_version_negotiation(
                source_cid=header.destination_cid,
                destination_cid=header.source_cid,
                supported_versions=self._configuration.supported_versions,
            ), addr)])
            return
        protocol = self._protocols.get(header.destination_cid)
        if protocol is not None:
            protocol.receive(data, addr)
            self._touched[protocol] = None
        elif (
            len(data) >= SMALLEST_MAX_DATAGRAM_SIZE
            and header.packet_type == QuicPacketType.INITIAL
        ):
            self._initials.append((data, addr, header.destination_cid))  # after the known ones

    def batch_end(self) -> None:
        self._flush_touched()  # connected peers first: their ACKs and keepalive answers leave now
        initials, self._initials = self._initials, []
        started = dropped = 0
        for data, addr, dcid in initials:
            protocol = self._protocols.get(dcid)  # a retransmitted Initial in the same batch
            if protocol is None:
                if not admit_initial(len(self._half_open), started,
                                     max_half_open=self.max_half_open,
                                     max_new_per_batch=self.max_new_per_batch):
                    dropped += 1
                    continue
                started += 1
                protocol = self._start(dcid)
            protocol.receive(data, addr)
            self._touched[protocol] = None
        self._flush_touched()
        if dropped:
            self.initials_dropped += dropped
            self._warn_overload()

    def _flush_touched(self) -> None:
        touched = list(self._touched)
        self._touched.clear()
        for protocol in touched:
            try:
                protocol.flush()
            except Exception:  # one broken connection must not starve the others
                log.exception("QUIC connection failed handling a batch")
            if protocol in self._half_open and protocol._quic.fleet_handshake_complete():
                del self._half_open[protocol]

    def _start(self, dcid: bytes) -> Any:
        connection = QuicConnection(
            configuration=self._configuration,
            original_destination_connection_id=dcid,
        )
        protocol: Any = self._create_protocol(connection)
        protocol.endpoint = self.endpoint
        protocol.on_cid_issued = self._cid_issued
        protocol.on_cid_retired = self._cid_retired
        protocol.on_terminated = self._terminated
        self._protocols[dcid] = protocol
        self._protocols[connection.host_cid] = protocol
        protocol.cids.update((dcid, connection.host_cid))
        self._half_open[protocol] = self._loop.time()
        if self._sweep is None:
            self._sweep = self._loop.call_later(1.0, self._sweep_half_open)
        return protocol

    def _sweep_half_open(self) -> None:
        """Drop handshakes older than ``handshake_timeout`` (checked every second while any)."""
        self._sweep = None
        for protocol in stale_handshakes(self._half_open, self._loop.time(),
                                         self.handshake_timeout):
            self.handshakes_timed_out += 1
            self._half_open.pop(protocol, None)
            self._terminated(protocol)
            protocol.owner._terminate()  # silently: no CONNECTION_CLOSE to a peer that left
        if self._half_open:
            self._sweep = self._loop.call_later(1.0, self._sweep_half_open)

    def _warn_overload(self) -> None:
        now = self._loop.time()
        if now - self._warned_at >= 10.0:
            self._warned_at = now
            log.warning(
                "QUIC handshake overload: %d Initials dropped so far (%d handshakes in progress, "
                "at most %d at once and %d new per read batch); clients retry",
                self.initials_dropped, len(self._half_open), self.max_half_open,
                self.max_new_per_batch,
            )

    def _cid_issued(self, cid: bytes, protocol: Any) -> None:
        self._protocols[cid] = protocol
        protocol.cids.add(cid)

    def _cid_retired(self, cid: bytes, protocol: Any) -> None:
        protocol.cids.discard(cid)
        if self._protocols.get(cid) is protocol:
            del self._protocols[cid]

    def _terminated(self, protocol: Any) -> None:
        # Only this connection's own IDs: a scan of the whole table (~8 IDs per connection) per
        # termination was 61 % of the proxy's CPU at 2,000-5,000 agents (py-spy), and the
        # stall it caused made keepalives late, connections time out, and more terminations.
        self._half_open.pop(protocol, None)
        for cid in protocol.cids:
            if self._protocols.get(cid) is protocol:
                del self._protocols[cid]
        protocol.cids.clear()

    def close(self) -> None:
        """Close every connection still known (half-open ones included) and the socket."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self._initials.clear()
        for protocol in set(self._protocols.values()):
            protocol.close()
        self._protocols.clear()
        if self.endpoint is not None:
            self.endpoint.close()
