"""Test helpers: a fleet on disk, enrolled devices, and real proxy/agent processes.

Processes are started as real ``tunnel`` commands (``python -m tunnel.cli``), optionally inside a
lab namespace (pass ``spawn=lab.spawn``-like callables), and are always stopped on teardown.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import sqlite_utils
import yaml

from enroll import certs, device, tokens
from enroll.enrollment import enroll
from enroll.state import FleetState

PY = sys.executable

#: the role most engineer-side tests give "alice": root over ssh on customer acme's devices
ACME_TECH_ROLE = """\
kind: role
version: v7
metadata: {name: acme-tech}
spec:
  allow:
    node_labels: {customer: acme}
    logins: [root]
    services: [ssh]
"""


def missing_peer(reason: str) -> None:
    """A real peer this test needs (a tool ``scripts/test`` installs) is missing: skip with the
    reason on a developer's machine, fail under ``CI=true`` so CI never goes green by skipping."""
    import pytest

    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


def free_udp_port() -> int:
    """A port free for both UDP and TCP, below the kernel's ephemeral range (32768–60999).

    The proxy listens on UDP and TCP on one port and tests restart it on the same port: a port
    from the ephemeral range can meanwhile become some client connection's local port.
    """
    import random

    for _ in range(200):
        port = random.randrange(20000, 32000)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, \
                    socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                u.bind(("127.0.0.1", port))
                t.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port for a test proxy")


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def until(predicate, what: str, timeout: float = 30.0) -> None:
    """``wait_until`` inside an event loop (in-process proxies and agents): sleeps, never blocks."""
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


class Fleet:
    """A fleet state directory plus helpers to enroll devices and issue engineer identities."""

    def __init__(self, root: Path, *, proxy_host: str = "127.0.0.1", proxy_port: int | None = None,
                 fleet: str = "acme-fleet", extra_ips: tuple[str, ...] = (),
                 device_lifetime: str = "30d"):
        self.root = Path(root)
        self.proxy_host = proxy_host
        self.proxy_port = proxy_port or free_udp_port()
        self.state = FleetState.create(
            self.root / "state", fleet=fleet, proxy_name="proxy.test",
            proxy_ips=[proxy_host, *extra_ips], proxy_port=self.proxy_port,
            device_lifetime=device_lifetime,
        )
        self.processes: list[subprocess.Popen] = []
        #: environment for every process started (e.g. FLEET_TRANSPORT=tcp)
        self.env: dict[str, str] = {}

    @property
    def address(self) -> str:
        return f"{self.proxy_host}:{self.proxy_port}"

    @property
    def pin(self) -> str:
        return certs.ca_pin(self.state.ca_cert)

    def enroll_device(self, name: str, labels: dict[str, str], services: dict[str, str],
                      proxies: list[dict] | None = None, **agent_settings) -> Path:
        """Offline enrollment into root/devices/NAME; returns the agent config path."""
        with self.state.registry() as reg:
            token, _ = tokens.create(reg, self.state.fleet, labels=labels)
        directory = self.root / "devices" / name
        request = device.prepare(directory, name)
        with self.state.registry() as reg:
            bundle = enroll(self.state, reg, request, token)
        device.install(directory, bundle, self.pin, services)
        config_path = directory / "agent.yaml"
        config = yaml.safe_load(config_path.read_text())
        config["proxies"] = proxies or [{"address": self.address, "server_name": "proxy.test"}]
        config.update(agent_settings)
        config_path.write_text(yaml.safe_dump(config))
        return config_path

    def user(self, name: str, roles: list[str], ttl: str = "1h") -> Path:
        from enroll.cli import main

        directory = self.root / "users" / name
        args = ["--state", str(self.state.root), "user", "issue", name, "--dir", str(directory),
                "--ttl", ttl, "--proxy", self.address]
        for role in roles:
            args += ["--role", role]
        assert main(args) == 0
        return directory

    # --- processes ----------------------------------------------------------------------------

    def start(self, argv: list[str], log: Path, spawn=None, env=None) -> subprocess.Popen:
        log_file = open(log, "ab")  # noqa: SIM115 - closed with the process
        full_env = {**os.environ, **self.env, **(env or {})}
        if spawn:
            proc = spawn(argv, stdout=log_file, stderr=subprocess.STDOUT, env=full_env)
        else:
            proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=full_env)
        proc._log_file = log_file
        self.processes.append(proc)
        return proc

    def start_proxy(self, spawn=None, listen: str | None = None) -> subprocess.Popen:
        """Start the proxy and wait until it listens."""
        listen = listen or self.address
        log = self.root / "proxy.log"
        mark = log.stat().st_size if log.exists() else 0
        proc = self.start([PY, "-m", "tunnel.cli", "proxy", "--state", str(self.state.root),
                           "--listen", listen, "--log-format", "json"], log, spawn)

        def listening():
            assert proc.poll() is None, log.read_text()[mark:]
            return '"listening"' in log.read_text()[mark:]

        wait_until(listening, 15, 0.05, "proxy listening")
        return proc

    def start_agent(self, config: Path, spawn=None) -> subprocess.Popen:
        return self.start([PY, "-m", "tunnel.cli", "agent", "--config", str(config),
                           "--log-format", "json"], config.parent / "agent.log", spawn)

    def tunnel(self, *args, identity: Path, input: bytes | None = None, timeout: float = 30,
               check: bool = False, run=None) -> subprocess.CompletedProcess:
        argv = [PY, "-m", "tunnel.cli", *map(str, args), "--identity", str(identity)]
        runner = run or subprocess.run
        return runner(argv, input=input, capture_output=True, timeout=timeout, check=check,
                      env={**os.environ, **self.env})

    def online(self, identity: Path, device_id: str, run=None) -> bool:
        out = self.tunnel("ls", "--format", "json", identity=identity, run=run)
        if out.returncode != 0:
            return False
        return any(d["id"] == device_id and d["online"] for d in json.loads(out.stdout))

    def wait_online(self, identity: Path, device_id: str, timeout: float = 15.0, run=None) -> None:
        wait_until(lambda: self.online(identity, device_id, run), timeout, 0.2, f"{device_id} online")

    def stop(self, proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc._log_file.close()

    def close(self) -> None:
        self.stop_helpers()
        for proc in reversed(self.processes):
            self.stop(proc)
        self.processes.clear()

    def stop_helpers(self) -> None:
        """Stop the per-user helpers the engineer commands started for this fleet's identities
        (they would otherwise outlive the test by their 30-minute idle period)."""
        from tunnel import helper_client, helper_protocol

        env = {**os.environ, **self.env}
        users = self.root / "users"
        for identity in sorted(users.iterdir()) if users.is_dir() else ():
            path = helper_protocol.socket_path(str(identity), env)
            if os.path.exists(path):
                with contextlib.suppress(helper_client.Unusable, helper_client.Declined, OSError):
                    sock, _lines, _ack = helper_client.ask(str(identity), path, "stop", {})
                    sock.close()  # asked: it exits on its own (no process started here to wait)

    def audit(self) -> list[dict]:
        """The audit log as plain dicts, for tests to index (``e["type"]``, ``e["fields"]``)."""
        from enroll import audit

        with self.state.registry() as reg:
            return [{**dataclasses.asdict(e), "actor_roles": list(e.actor_roles)} for e in audit.events(reg)]


@contextlib.contextmanager
def raw_registry(where: FleetState | Path, *, writable: bool = False) -> Iterator[sqlite_utils.Database]:
    """The registry file on a connection of the test's own, never the Registry's private one.

    Read-only by default: checks of stored state no repository reads (whole tables for "nothing
    changed", ``PRAGMA integrity_check``). ``writable=True`` is what someone holding the file
    does (the append-only triggers still fire on this connection).
    """
    path = where.registry_path if isinstance(where, FleetState) else Path(where)
    conn = sqlite3.connect(f"file:{path}?mode={'rw' if writable else 'ro'}", uri=True)
    try:
        yield sqlite_utils.Database(conn)
    finally:
        conn.close()


def table_rows(where: FleetState | Path, *tables: str) -> dict[str, list[dict]]:
    """Every row of each table, read on a read-only connection of the test's own."""
    with raw_registry(where) as db:
        return {t: list(db[t].rows) for t in tables}


def integrity_ok(where: FleetState | Path) -> bool:
    """SQLite's own check of the registry file (torn pages, broken indexes)."""
    with raw_registry(where) as db:
        return db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


class EchoServer:
    """A TCP echo service on loopback (a stand-in for a device service in loopback tests)."""

    def __init__(self, host: str = "127.0.0.1"):
        self.sock = socket.create_server((host, 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # a cut session resets us: that is fine
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()
