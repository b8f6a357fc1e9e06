"""UDP socket I/O for the QUIC transport: batched reads, GSO sends, large socket buffers.

Why this exists: aioquic's asyncio adapter (and asyncio's datagram transport under it) runs one
full receive -> events -> ``transmit()`` cycle per ~1.2 KB datagram and one ``sendto`` per
datagram sent. Measured on fleet-tunnel (``../shared/RESEARCH.md``), that per-datagram cost, not
the bytes, dominated the proxy's CPU. Here:

* ``DatagramEndpoint`` drains up to ``READ_BATCH`` waiting datagrams per readiness of the
  socket, hands each to ``on_datagram`` and then calls ``on_batch_end`` once, so the QUIC side
  transmits once per connection touched by the batch instead of once per datagram. The batch is
  bounded so one busy peer on the proxy's shared socket cannot hold the event loop: after
  ``READ_BATCH`` datagrams (plus at most one coalesced read) the loop runs timers and other
  sockets before the next batch. With ``UDP_GRO`` the kernel hands over a run of equal-size
  datagrams from one sender as one read (a GSO peer on loopback, a GRO-capable NIC); it is cut
  up again here (measured: a further 5-10 % CPU per MB in paired runs).
* ``DatagramEndpoint.send`` sends a list of datagrams with UDP GSO (``UDP_SEGMENT``: one
  ``sendmsg`` carries up to 64 equal-size datagrams to one address, the kernel splits them)
  where the kernel supports it, and one ``sendto`` each elsewhere. ``plan_sends`` (pure) decides
  the grouping.
* ``tune_buffers`` asks for 4 MB receive/send buffers: with the kernel's default 212 KB a proxy
  under a handshake ramp drops packets and collapses.

Sends never block and are never queued: a datagram the kernel refuses with EAGAIN is dropped
(and counted) like a datagram lost on the path; QUIC's loss recovery resends what mattered.
Every datagram goes with DF set and is never fragmented (``set_dont_fragment``), so one bigger
than the interface's MTU (``EMSGSIZE``) is dropped the same way: the datagram size search
(``pmtu.py``) sees a lost probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

#: Linux ``UDP_SEGMENT`` / ``UDP_GRO`` (include/uapi/linux/udp.h); Python 3.11 exports neither.
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
UDP_GRO = getattr(socket, "UDP_GRO", 104)
SOL_UDP = getattr(socket, "SOL_UDP", 17)
#: the kernel's UDP_MAX_SEGMENTS (64 before Linux 6.8, 128 after: take the smaller)
GSO_MAX_SEGMENTS = 64
#: payload bytes of one GSO send (an IP datagram carries at most 65,535 bytes with headers)
GSO_MAX_BYTES = 65000
#: datagrams read per socket readiness before the loop runs anything else
READ_BATCH = 64
#: largest datagram we read (anything bigger is not QUIC we sent or accept)
MAX_DATAGRAM = 65536
#: what ``tune_buffers`` asks for, each direction
SOCKET_BUFFER = 4 * 1024 * 1024

#: Linux ``IP_MTU_DISCOVER``/``IPV6_MTU_DISCOVER`` and their PROBE mode (DF set, never fragment,
#: ignore the kernel's path-MTU cache); Python 3.11 exports none of them
IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
IPV6_MTU_DISCOVER = getattr(socket, "IPV6_MTU_DISCOVER", 23)
PMTUDISC_PROBE = 3

# linux SO_*BUFFORCE (root only: ignores net.core.[rw]mem_max)
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)


# ------------------------------------------------------------------------------ pure parts


@dataclass(frozen=True)
class Send:
    """One system call: ``payloads`` to ``addr``; ``segment`` > 0 means one GSO ``sendmsg``."""

    addr: Any
    payloads: tuple[bytes, ...]
    segment: int = 0


def plan_sends(
    datagrams: Sequence[tuple[bytes, Any]],
    gso: bool,
    *,
    max_segments: int = GSO_MAX_SEGMENTS,
    max_bytes: int = GSO_MAX_BYTES,
) -> list[Send]:
    """Group consecutive datagrams into system calls, keeping their order.

    With ``gso``, a run of consecutive datagrams to the same address whose sizes equal the
    first one's (the last of the run may be shorter: the kernel allows a short final segment)
    becomes one GSO send, bounded by ``max_segments`` and ``max_bytes``. A run of one, and
    everything without ``gso``, is a plain send.
    """
    plan: list[Send] = []
    run: list[bytes] = []
    run_addr: Any = None
    size = 0

    def flush() -> None:
        if not run:
            return
        if len(run) == 1:
            plan.append(Send(run_addr, (run[0],)))
        else:
            plan.append(Send(run_addr, tuple(run), size))
        run.clear()

    for data, addr in datagrams:
        if not gso:
            plan.append(Send(addr, (data,)))
            continue
        if run and (
            addr != run_addr
            or len(run[-1]) != size  # the previous one was a short final segment
            or len(data) > size
            or len(run) >= max_segments
            or (len(run) + 1) * size > max_bytes
        ):
            flush()
        if not run:
            run_addr, size = addr, len(data)
        run.append(data)
    flush()
    return plan


def split_segments(data: bytes, segment: int) -> list[bytes]:
    """The datagrams of one GRO read: ``segment``-byte pieces, the last one possibly shorter."""
    if segment <= 0 or len(data) <= segment:
        return [data]
    return [data[i:i + segment] for i in range(0, len(data), segment)]


def gro_segment(ancdata: list[tuple[int, int, bytes]]) -> int:
    """The segment size the kernel reports for a coalesced read (0: one plain datagram)."""
    for level, kind, value in ancdata:
        if level == SOL_UDP and kind == UDP_GRO and len(value) >= 4:
            return struct.unpack("=i", value[:4])[0]
    return 0


def buffer_advice(kind: str, wanted: int, got: int) -> str | None:
    """The sysctl that lifts the kernel's cap, or None if ``got`` is enough.

    Linux reports twice the usable size it granted (bookkeeping overhead), so ``got`` >=
    ``wanted`` means the request was met.
    """
    if got >= wanted:
        return None
    sysctl = "net.core.rmem_max" if kind == "receive" else "net.core.wmem_max"
    return (
        f"UDP {kind} buffer capped at {got // 2} bytes (asked for {wanted}); under load "
        f"datagrams will be dropped. Lift the cap: sysctl -w {sysctl}={wanted}"
    )


# ------------------------------------------------------------------------- socket parts

_gso_supported: bool | None = None
_CMSG_SPACE = socket.CMSG_SPACE(4)
_advised: set[str] = set()


def gso_supported() -> bool:
    """Whether this kernel accepts ``UDP_SEGMENT`` (probed once per process)."""
    global _gso_supported
    if _gso_supported is None:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.setsockopt(SOL_UDP, UDP_SEGMENT, 1200)
            _gso_supported = True
        except OSError:
            _gso_supported = False
    return _gso_supported


def enable_gro(sock: socket.socket) -> bool:
    """Ask the kernel to hand over runs of datagrams from one sender as one read (UDP_GRO).

    A peer sending with GSO over loopback or a GRO-capable NIC then costs one system call per
    run instead of one per datagram; ``split_segments`` cuts it up again. False if unsupported.
    """
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


def set_dont_fragment(sock: socket.socket) -> bool:
    """Send every datagram with DF set and never fragment it (RFC 9000 section 14).

    The datagram size search (``pmtu.py``) needs it: a router that fragments a 1,452-byte probe
    would make a small path look large, and a datagram bigger than the local interface's MTU
    must fail (``EMSGSIZE``, dropped like a loss) rather than leave as fragments. PROBE mode
    also keeps the kernel from lowering the size on a forged ICMP "too big". False where
    unsupported.
    """
    ok = False
    for level, option in ((socket.IPPROTO_IP, IP_MTU_DISCOVER),
                          (socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER)):
        try:
            sock.setsockopt(level, option, PMTUDISC_PROBE)
            ok = True
        except OSError:  # IPv6 option on an IPv4 socket, or not Linux
            pass
    return ok


def tune_buffers(sock: socket.socket, size: int = SOCKET_BUFFER) -> tuple[int, int]:
    """Ask for ``size``-byte receive and send buffers; return what the kernel granted.

    As root ``SO_*BUFFORCE`` ignores the sysctl caps; otherwise ``SO_*BUF`` is capped at
    ``net.core.rmem_max``/``wmem_max``, and the first capped socket logs the sysctl to raise.
    """
    granted = []
    for kind, force, plain in (
        ("receive", _SO_RCVBUFFORCE, socket.SO_RCVBUF),
        ("send", _SO_SNDBUFFORCE, socket.SO_SNDBUF),
    ):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:  # not root (EPERM) or not Linux
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, size)
        got = sock.getsockopt(socket.SOL_SOCKET, plain)
        granted.append(got)
        advice = buffer_advice(kind, size, got)
        if advice is not None and kind not in _advised:
            _advised.add(kind)
            log.warning(advice)
    return granted[0], granted[1]


class DatagramEndpoint:
    """A non-blocking UDP socket on the event loop: batched reads, batched (GSO) sends.

    ``on_datagram(data, addr)`` is called for every datagram read, ``on_batch_end()`` once after
    each batch, ``on_error(exc)`` when the socket reports an error (a failed send: network
    unreachable, address gone...). The endpoint owns the socket and closes it in ``close()``.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        on_datagram: Callable[[bytes, Any], None],
        on_batch_end: Callable[[], None],
        on_error: Callable[[OSError], None] | None = None,
        *,
        gso: bool | None = None,
        gro: bool = True,
    ) -> None:
        sock.setblocking(False)
        self._loop = loop
        self._sock = sock
        self._on_datagram = on_datagram
        self._on_batch_end = on_batch_end
        self._on_error = on_error
        self.gso = gso_supported() if gso is None else gso
        set_dont_fragment(sock)
        self.gro = gro and enable_gro(sock)
        self.sockname = sock.getsockname()
        self.closed = False
        #: counters (tests, diagnostics)
        self.datagrams_received = 0
        self.batches = 0
        self.datagrams_sent = 0
        self.send_calls = 0
        self.dropped_sends = 0
        loop.add_reader(sock.fileno(), self._read_ready)

    def _read_ready(self) -> None:
        sock = self._sock
        gro = self.gro
        got = 0
        try:
            while got < READ_BATCH:
                try:
                    if gro:
                        data, anc, _flags, addr = sock.recvmsg(MAX_DATAGRAM, _CMSG_SPACE)
                    else:
                        data, addr = sock.recvfrom(MAX_DATAGRAM)
                        anc = None
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    self._error(exc)
                    break
                segment = gro_segment(anc) if anc else 0
                for piece in split_segments(data, segment) if segment else (data,):
                    got += 1
                    self._on_datagram(piece, addr)
                if self.closed:
                    break
        finally:
            if got:
                self.datagrams_received += got
                self.batches += 1
                self._on_batch_end()

    def _error(self, exc: OSError) -> None:
        if self._on_error is not None:
            self._on_error(exc)
        else:
            log.debug("UDP socket error: %s", exc)

    def send(self, datagrams: Sequence[tuple[bytes, Any]]) -> None:
        """Send ``datagrams`` in order; GSO where possible, plain ``sendto`` otherwise."""
        if self.closed or not datagrams:
            return
        for step in plan_sends(datagrams, self.gso):
            if step.segment and self._send_gso(step):
                continue
            for payload in step.payloads:
                self._sendto(payload, step.addr)

    def _send_gso(self, step: Send) -> bool:
        try:
            self._sock.sendmsg(
                [b"".join(step.payloads)],
                [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", step.segment))],
                0,
                step.addr,
            )
        except (BlockingIOError, InterruptedError):
            self.dropped_sends += len(step.payloads)
            return True
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:  # bigger than the interface's MTU: lost (pmtu.py)
                self.dropped_sends += len(step.payloads)
                return True
            if exc.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                # this route/device cannot segment (no checksum offload, xfrm...): plain sends
                log.info("UDP GSO unavailable on this socket (%s); sending datagrams one by one",
                         exc)
                self.gso = False
                return False
            self._error(exc)
            return True
        self.send_calls += 1
        self.datagrams_sent += len(step.payloads)
        return True

    def _sendto(self, payload: bytes, addr: Any) -> None:
        try:
            self._sock.sendto(payload, addr)
        except (BlockingIOError, InterruptedError):
            self.dropped_sends += 1
            return
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:  # bigger than the interface's MTU: lost (pmtu.py)
                self.dropped_sends += 1
                return
            self._error(exc)
            return
        self.send_calls += 1
        self.datagrams_sent += 1

    def pause_reading(self) -> None:
        """Stop reading (datagrams queue in the kernel, then drop): a silent peer, in tests."""
        if not self.closed:
            self._loop.remove_reader(self._sock.fileno())

    def resume_reading(self) -> None:
        if not self.closed:
            self._loop.add_reader(self._sock.fileno(), self._read_ready)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
