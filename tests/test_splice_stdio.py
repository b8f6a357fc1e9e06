"""``StdioEnds``: stdin/stdout of ``tunnel proxy-command`` without thread hops (issue 14).

A child process splices its own stdin/stdout with a TCP connection to a device-like service in
this test (real pipes, real sockets, the real ``splice``), and reports which path each end took
and how many threads it ran. Pipes and a stdin=stdout stream socket go through the event loop
(one thread); a file or a stdout shared with stderr keeps the thread path. A cut session keeps
issue 19's guarantee: on a socket the reader gets a reset, never a clean end.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading

import pytest

PY = sys.executable
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import asyncio, json, sys, threading
from tunnel.splice import SocketEnds, StdioEnds, splice

async def main(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    ends = StdioEnds()
    result = await splice(ends, SocketEnds(reader, writer))
    print(json.dumps({"mode": ends.mode, "threads": threading.active_count(),
                      "error": result.error, "in": result.a_to_b, "out": result.b_to_a}),
          file=sys.stderr, flush=True)
    return 4 if result.error else 0

sys.exit(asyncio.run(main(int(sys.argv[1]))))
"""


class Service:
    """TCP service: echoes, then FIN on EOF; with ``reset_after`` it resets after that many bytes."""

    def __init__(self, reset_after: int | None = None):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.reset_after = reset_after
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        got = 0
        with conn:
            while data := conn.recv(65536):
                got += len(data)
                if self.reset_after is not None and got >= self.reset_after:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()


def child(port: int, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([PY, "-c", CHILD, str(port)], env=env, cwd=ROOT, **kw)


def report(text: str) -> dict:
    lines = [ln for ln in text.splitlines() if ln.startswith("{")]
    assert lines, text
    return json.loads(lines[-1])


def send_and_collect(write, read, payload: bytes, done) -> bytes:
    """Write ``payload`` (then ``done()``) from a thread while reading everything back."""
    t = threading.Thread(target=lambda: (write(payload), done()), daemon=True)
    t.start()
    out = bytearray()
    while chunk := read(65536):
        out += chunk
    t.join(30)
    return bytes(out)


PAYLOAD = os.urandom(3 * 1024 * 1024 + 7)


def test_pipes_use_the_event_loop_not_threads():
    svc = Service()
    try:
        proc = child(svc.port, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        got = send_and_collect(proc.stdin.write, proc.stdout.read1, PAYLOAD, proc.stdin.close)
        proc.wait(60)
        info = report(proc.stderr.read().decode())
    finally:
        svc.close()
    assert got == PAYLOAD
    assert proc.returncode == 0, info
    assert info["mode"] == ["pipe", "pipe"] and info["threads"] == 1, info
    assert info["in"] == info["out"] == len(PAYLOAD) and info["error"] is None


def test_one_socket_as_stdin_and_stdout_half_closes_with_a_fin():
    svc = Service()
    ours, theirs = socket.socketpair()
    try:
        proc = child(svc.port, stdin=theirs, stdout=theirs, stderr=subprocess.PIPE)
        theirs.close()
        got = send_and_collect(ours.sendall, ours.recv, PAYLOAD, lambda: ours.shutdown(socket.SHUT_WR))
        proc.wait(60)
        info = report(proc.stderr.read().decode())
    finally:
        ours.close()
        svc.close()
    assert got == PAYLOAD and proc.returncode == 0, info
    assert info["mode"] == ["socket", "socket"] and info["threads"] == 1, info


def test_a_cut_session_on_a_stdio_socket_ends_in_a_reset():
    """The service resets mid-session: the engineer's side of the stdio socket sees RST."""
    svc = Service(reset_after=1024 * 1024)
    listener = socket.create_server(("127.0.0.1", 0))
    ours = socket.create_connection(listener.getsockname())
    theirs, _ = listener.accept()
    listener.close()
    try:
        proc = child(svc.port, stdin=theirs, stdout=theirs, stderr=subprocess.PIPE)
        theirs.close()
        threading.Thread(target=lambda: ours.sendall(PAYLOAD), daemon=True).start()
        with pytest.raises(ConnectionResetError):  # noqa: PT012 - read until the cut shows
            while ours.recv(65536):
                pass
        proc.wait(60)
        info = report(proc.stderr.read().decode())
    finally:
        ours.close()
        svc.close()
    assert proc.returncode == 4 and info["error"], info
    assert info["mode"] == ["socket", "socket"]


def test_files_and_a_stdout_shared_with_stderr_keep_the_thread_path(tmp_path):
    svc = Service()
    src = tmp_path / "in.bin"
    src.write_bytes(PAYLOAD)
    try:
        with open(src, "rb") as stdin:
            proc = child(svc.port, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            out = proc.stdout.read()
            proc.wait(60)
    finally:
        svc.close()
    cut = out.rfind(b'{"mode"')
    info = json.loads(out[cut:])
    assert proc.returncode == 0, info
    assert info["mode"] == ["thread", "thread"], info
    assert out[:cut] == PAYLOAD


def test_a_slow_stdout_reader_still_gets_every_byte():
    """The process exits right after the session: nothing may be left in the pipe transport's
    buffer then (those bytes would be lost while the reader sees a clean end)."""
    import time

    svc = Service()
    try:
        proc = child(svc.port, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        def slow_read(n):
            time.sleep(0.02)  # the pipe stays full: the child's writes back up into its buffer
            return proc.stdout.read1(n)

        got = send_and_collect(proc.stdin.write, slow_read, PAYLOAD, proc.stdin.close)
        proc.wait(60)
        info = report(proc.stderr.read().decode())
    finally:
        svc.close()
    assert len(got) == len(PAYLOAD) and got == PAYLOAD, (len(got), info)
    assert proc.returncode == 0 and info["out"] == len(PAYLOAD), info
