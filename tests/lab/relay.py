"""UDP delay relay: the lab's stand-in for `tc netem delay` (the kernel module is unavailable).

Runs as its own process inside a router namespace (so test-process GIL stalls do not distort
timing).  The router DNATs the device's UDP toward the proxy into ``--map LPORT=IP:PORT``;
each client gets its own upstream socket, and every datagram is forwarded after the current
one-way delay in each direction.  conntrack undoes the DNAT on replies, so the device still
sees the proxy's address.

Control: one line per command on stdin, ``delay <one-way ms>``.  EOF on stdin stops the relay,
so it never outlives the test process that owns the pipe.  Prints ``ready`` once bound.
Standalone on purpose (run by path with ``sys.executable``): no imports from the lab package.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import sys
import threading


class Relay:
    def __init__(self, loop: asyncio.AbstractEventLoop, delay_s: float):
        self.loop = loop
        self.delay = delay_s
        self.upstreams: dict = {}

    def listen(self, bind: str, lport: int, target: tuple[str, int]) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((bind, lport))
        s.setblocking(False)
        self.loop.add_reader(s, self._from_client, s, target)

    def _from_client(self, lsock: socket.socket, target) -> None:
        while True:
            try:
                data, client = lsock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            key = (lsock.fileno(), client)
            up = self.upstreams.get(key)
            if up is None:
                up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                up.setblocking(False)
                up.connect(target)
                self.upstreams[key] = up
                self.loop.add_reader(up, self._from_upstream, up, lsock, client)
            self.loop.call_later(self.delay, _send, up, data, None)

    def _from_upstream(self, up: socket.socket, lsock: socket.socket, client) -> None:
        while True:
            try:
                data = up.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ICMP errors from the proxy side: drop, like a real path would
                continue
            self.loop.call_later(self.delay, _send, lsock, data, client)


def _send(sock: socket.socket, data: bytes, addr) -> None:
    with contextlib.suppress(OSError):
        if addr is None:
            sock.send(data)
        else:
            sock.sendto(data, addr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bind", required=True)
    ap.add_argument("--map", action="append", required=True, help="LPORT=IP:PORT")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay")
    args = ap.parse_args(argv)

    loop = asyncio.new_event_loop()
    relay = Relay(loop, args.delay_ms / 1000)
    for m in args.map:
        lport, target = m.split("=")
        ip, port = target.rsplit(":", 1)
        relay.listen(args.bind, int(lport), (ip, int(port)))

    def control():
        for line in sys.stdin:
            parts = line.split()
            if len(parts) == 2 and parts[0] == "delay":
                loop.call_soon_threadsafe(setattr, relay, "delay", float(parts[1]) / 1000)
        loop.call_soon_threadsafe(loop.stop)

    threading.Thread(target=control, daemon=True).start()
    print("ready", flush=True)
    loop.run_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
