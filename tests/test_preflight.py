"""``tunnel forward`` and ``tunnel db`` check before they listen (issue 18, Engineers).

Each refusal — unknown device, offline device, a service no role allows, a service the device
does not expose, a service that is not accepting — is performed against a real proxy and agent:
the command must exit 1 with the proxy's one-line reason, before it prints a URL or a
"forwarding" line, and the refusal must be audited. An allowed service still works after the
preflight session.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess

import pytest
from fleet_harness import ACME_TECH_ROLE, PY, EchoServer, Fleet, wait_until

from enroll import users

ROLES = ACME_TECH_ROLE

#: case -> (device, service, user attribute, the reason the proxy gives)
CASES = {
    "unknown-device": ("nosuch", "echo", "ops", "no device 'nosuch' that you may reach"),
    "offline": ("dev-off", "echo", "ops", "device dev-off is offline"),
    "forbidden": ("dev-on", "echo", "alice", "no role allows echo on this device"),
    "unknown-service": ("dev-on", "postgres", "ops", "exposes no service 'postgres'"),
    "not-accepting": ("dev-on", "closed", "ops", "is not accepting"),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    f = Fleet(tmp_path_factory.mktemp("preflight"))
    f.echo = EchoServer()
    with f.state.registry() as reg:
        users.apply_roles(reg, ROLES)
    f.start_proxy()
    f.enroll_device("dev-off", {"customer": "acme"}, {"echo": "127.0.0.1:1"})
    f.start_agent(f.enroll_device("dev-on", {"customer": "acme"},
                                  {"echo": f"127.0.0.1:{f.echo.port}", "closed": "127.0.0.1:1",
                                   "ssh": "127.0.0.1:22"}, keepalive="5s"))
    f.ops = f.user("ops", ["admin"])
    f.alice = f.user("alice", ["acme-tech"])
    f.wait_online(f.ops, "dev-on", timeout=20)
    yield f
    f.echo.close()
    f.close()


def run(world, *args, identity) -> subprocess.CompletedProcess:
    # a refused preflight exits by itself; the timeout only guards against a regression
    return subprocess.run([PY, "-m", "tunnel.cli", *args, "--identity", str(identity)],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env={**os.environ, **world.env})


@pytest.mark.parametrize("command", ["forward", "db"])
@pytest.mark.parametrize("case", CASES)
def test_refused_at_once_with_the_reason_before_any_url(world, command, case):
    device, service, who, reason = CASES[case]
    before = len(world.audit())
    args = [command, device, service] if command == "forward" else [command, device, "--service", service]
    out = run(world, *args, identity=getattr(world, who))
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert out.stdout == ""  # no postgresql:// URL
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tunnel: error: ") and reason in lines[0], out.stderr
    assert "forwarding" not in out.stderr and "Traceback" not in out.stderr
    denied = [e for e in world.audit()[before:] if e["type"] == "access.denied"]
    assert denied and denied[-1]["fields"]["stage"] in ("dial", "device"), world.audit()[before:]


def _started(proc: subprocess.Popen) -> int:
    line = proc.stderr.readline()
    assert line.startswith("forwarding "), line + proc.stderr.read()
    return int(line.split()[1].rsplit(":", 1)[1])


def _echoes(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    return got


def test_allowed_forward_still_works_and_the_preflight_ended_cleanly(world):
    before = len(world.audit())
    proc = subprocess.Popen([PY, "-m", "tunnel.cli", "forward", "dev-on", "echo", "--identity", str(world.ops)],
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            env={**os.environ, **world.env})
    try:
        port = _started(proc)
        assert _echoes(port, b"after the preflight\n") == b"after the preflight\n"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)

    def two_ends():
        ends = [e for e in world.audit()[before:] if e["type"] == "session.end"]
        return ends if len(ends) >= 2 else None

    ends = wait_until(two_ends, what="two session.end records")
    # the preflight is an ordinary audited session: opened, then ended by us, moving no data
    assert ends[0]["result"] == "ok" and ends[0]["fields"]["bytes_to_device"] == 0, ends[0]
    assert ends[1]["fields"]["bytes_to_device"] == len(b"after the preflight\n"), ends[1]


def test_allowed_db_prints_the_url_and_forwards(world):
    proc = subprocess.Popen([PY, "-m", "tunnel.cli", "db", "dev-on", "--service", "echo", "--db-user", "app",
                             "--identity", str(world.ops)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            env={**os.environ, **world.env})
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("postgresql://app@127.0.0.1:"), url + proc.stderr.read()
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        assert _echoes(port, b"select 1;\n") == b"select 1;\n"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def test_no_check_skips_the_preflight(world):
    """``--no-check``: for a service that must not see an extra connection; refusals come per session."""
    before = len(world.audit())
    proc = subprocess.Popen([PY, "-m", "tunnel.cli", "forward", "dev-on", "postgres", "--no-check",
                             "--identity", str(world.ops)],
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            env={**os.environ, **world.env})
    try:
        port = _started(proc)
        assert not [e for e in world.audit()[before:] if e["type"] in ("access.denied", "session.start")]
        assert _echoes(port, b"x") == b""  # refused now, per connection (a reset or an empty read)
    except ConnectionResetError:
        pass
    finally:
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=10)[1]
    assert "exposes no service 'postgres'" in rest, rest
