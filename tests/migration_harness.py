"""Live SSH sessions through fleet-tunnel in the network lab, for migration tests and the bench.

Where things run (only lab addresses are ever targets):

* the proxy: internet namespace, ``0.0.0.0:443`` (so 198.18.0.1 and the ground address 192.0.2.1);
* the engineer (``ssh``/``scp`` with ``tunnel proxy-command`` as ProxyCommand): internet
  namespace, dialling 198.18.0.1:443;
* each device: its own namespace with a real sshd on 127.0.0.1:22 and ``tunnel agent``.

:class:`TickSession` runs ``while :; do date +%s.%N; sleep 0.1; done`` on the device and records
when each line arrives, so a test can read the largest gap and the first line after an event.
Used by tests/test_migration.py and bench/cases/migration.py.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from pathlib import Path

from fleet_harness import PY, Fleet, wait_until
from lab import Lab, netns

TICK = "while :; do date +%s.%N; sleep 0.1; done"
PROXY_PORT = 443


def ssh_options(key: Path, identity: Path) -> list[str]:
    proxy_command = f"{PY} -m tunnel.cli proxy-command %h %p --identity {identity}"
    return [
        "-o", f"ProxyCommand={proxy_command}", "-i", str(key),
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10",
    ]  # fmt: skip


class TickSession:
    """A line-printing command over a live connection; arrival times recorded per line."""

    def __init__(self, lab: Lab, ns: str, argv: list[str]):
        self.proc = lab.spawn(ns, argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
        self.arrivals: list[float] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for _ in iter(self.proc.stdout.readline, b""):
            self.arrivals.append(time.monotonic())

    def wait_flowing(self, lines: int = 5, timeout: float = 20.0) -> None:
        wait_until(lambda: len(self.arrivals) >= lines or self.proc.poll() is not None,
                   timeout, 0.05, "session output")
        if self.proc.poll() is not None:
            raise AssertionError(f"session ended: {self.proc.stderr.read().decode(errors='replace')}")

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def first_after(self, t: float) -> float | None:
        """Seconds from ``t`` to the first line that arrived after it."""
        return next((a - t for a in self.arrivals if a > t), None)

    def max_gap(self, since: float, until: float | None = None) -> float:
        """Largest time between consecutive lines (or ``since`` and the first) in the window."""
        until = until or time.monotonic()
        times = [since] + [a for a in self.arrivals if since < a <= until]
        if len(times) < 2:
            return until - since
        return max(b - a for a, b in zip(times, times[1:], strict=False))

    def wait_line_after(self, t: float, timeout: float) -> float | None:
        with contextlib.suppress(AssertionError):
            wait_until(lambda: self.first_after(t) is not None, timeout, 0.01, "a line")
        return self.first_after(t)

    def close(self) -> None:
        netns.stop_process(self.proc)


class TunnelLab:
    """A fleet with its proxy in the lab's internet namespace and an engineer identity."""

    def __init__(self, lab: Lab, root: Path):
        self.lab = lab
        self.fleet = Fleet(root, proxy_host=lab.proxy_public, proxy_port=PROXY_PORT,
                           extra_ips=(lab.proxy_ground,))
        self.fleet.start_proxy(spawn=self.spawner(lab.internet), listen=f"0.0.0.0:{PROXY_PORT}")
        self.engineer = self.fleet.user("eng", ["admin"])
        self.devices: dict[str, dict] = {}

    def spawner(self, ns: str):
        return lambda argv, **kw: self.lab.spawn(ns, argv, **kw)

    def run_inet(self, argv, **kw):
        return subprocess.run(netns.ns_argv(self.lab.internet, argv), **kw)

    # --- devices ----------------------------------------------------------------------------

    def endpoint(self, host: str, via=None) -> dict:
        ep = {"address": f"{host}:{PROXY_PORT}", "server_name": "proxy.test"}
        if via:
            ep["via"] = via
        return ep

    def add_device(self, name: str, uplinks=("wifi", "cellular"), *, proxies=None,
                   satellite_public: bool = False, **agent_settings):
        """Lab device + sshd + enrolled agent, online at the proxy. Returns (device, sshd)."""
        dev = self.lab.add_device(name, uplinks=uplinks, satellite_public=satellite_public)
        sshd = dev.start_sshd()
        config = self.fleet.enroll_device(
            name, {"customer": "acme"}, {"ssh": "127.0.0.1:22"},
            proxies=proxies or [self.endpoint(self.lab.proxy_public)], **agent_settings,
        )
        agent = self.fleet.start_agent(config, spawn=self.spawner(dev.ns))
        self.devices[name] = {"dev": dev, "sshd": sshd, "config": config, "agent": agent}
        self.wait_online(name)
        return dev, sshd

    def agent_log(self, name: str) -> list[dict]:
        path = self.devices[name]["config"].parent / "agent.log"
        out = []
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def online(self, name: str) -> bool:
        return self.fleet.online(self.engineer, name, run=self.run_inet)

    def wait_online(self, name: str, timeout: float = 20.0) -> None:
        wait_until(lambda: self.online(name), timeout, 0.1, f"{name} online")

    def status(self, name: str) -> dict | None:
        out = self.fleet.tunnel("status", name, "--format", "json", identity=self.engineer,
                                run=self.run_inet)
        if out.returncode != 0:
            return None
        rows = json.loads(out.stdout)
        return rows[0] if rows else None

    def audit(self, *types: str, device: str | None = None) -> list[dict]:
        return [e for e in self.fleet.audit()
                if (not types or e["type"] in types) and (device is None or e["device"] == device)]

    # --- engineer ---------------------------------------------------------------------------

    def ssh_argv(self, name: str, *command: str) -> list[str]:
        key = self.devices[name]["sshd"].client_key
        return ["ssh", *ssh_options(key, self.engineer), f"root@{name}", *command]

    def tick_session(self, name: str) -> TickSession:
        session = TickSession(self.lab, self.lab.internet, self.ssh_argv(name, TICK))
        session.wait_flowing()
        return session

    def ssh(self, name: str, *command: str, timeout: float = 20) -> subprocess.CompletedProcess:
        return self.run_inet(self.ssh_argv(name, *command), capture_output=True, timeout=timeout)

    def scp_argv(self, name: str, src: Path, dst: Path) -> list[str]:
        key = self.devices[name]["sshd"].client_key
        return ["scp", "-q", *ssh_options(key, self.engineer), str(src), f"root@{name}:{dst}"]

    def close(self) -> None:
        self.fleet.close()
