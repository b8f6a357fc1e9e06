"""Tiny in-process echo servers and probes for lab tests (plain sockets, bounded timeouts).

Servers take a socket the lab created inside a namespace (``lab.socket(ns, ...)``), so they run
as threads of the test process instead of extra processes.  Every loop is bounded by timeouts.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class UdpEcho:
    """Echo UDP datagrams and remember each sender's (address, port) as the server saw it."""

    def __init__(self, sock: socket.socket, addr: tuple[str, int]):
        self.sock = sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # bursts outrun the GIL
        sock.bind(addr)
        sock.settimeout(0.1)
        self.seen: list[tuple[str, int]] = []
        self.received_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(65535)
            except (TimeoutError, OSError):
                continue
            self.seen.append(peer)
            self.received_bytes += len(data)
            with contextlib.suppress(OSError):
                self.sock.sendto(data, peer)

    def close(self):
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


class TcpEcho:
    """Accept TCP connections and echo one message each; remembers the peers."""

    def __init__(self, sock: socket.socket, addr: tuple[str, int]):
        self.sock = sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(16)
        sock.settimeout(0.1)
        self.seen: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.seen.append(peer)
            with conn:
                conn.settimeout(2)
                with contextlib.suppress(OSError):
                    conn.sendall(conn.recv(65535))

    def close(self):
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


def udp_ping(sock: socket.socket, addr, payload: bytes = b"ping", timeout: float = 1.0):
    """Send one datagram and wait for the same payload back; RTT in seconds or None."""
    sock.settimeout(timeout)
    t0 = time.monotonic()
    try:
        sock.sendto(payload, addr)
        deadline = t0 + timeout
        while True:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            data, _ = sock.recvfrom(65535)
            if data == payload:
                return time.monotonic() - t0
    except (TimeoutError, OSError):
        return None


def drain(sock: socket.socket, quiet: float = 0.3) -> list[bytes]:
    """Receive until ``quiet`` seconds pass with nothing arriving."""
    out = []
    sock.settimeout(quiet)
    while True:
        try:
            out.append(sock.recv(65535))
        except (TimeoutError, OSError):
            return out
