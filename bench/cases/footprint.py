"""Footprint and scale: agent RSS, proxy RSS per connected agent, handshakes/s, restart recovery.

* Agent RSS idle (connected, 25 s keepalive) and with 10 open sessions (each has echoed 64 KiB),
  against the OpenSSH ``ssh -N -R`` client that a fleet would otherwise run on the device.
* A load generator (this file run with ``--loadgen``, one process, one asyncio loop) holds N
  agent connections to a real ``tunnel proxy`` with ``tunnel.transport.connect``, ALPN
  ``fleet-agent/1`` and real device certificates (issued directly with ``enroll.certs.issue`` and
  bulk-inserted into the registry instead of N full enrollments), each with the agent's 25 s
  keepalive. Proxy RSS growth per agent at 100 / 1,000 / 5,000 agents (``--quick`` stops at
  1,000); handshakes per second while ramping (at most ``INFLIGHT`` handshakes in flight; the
  generator shares the two cores with the proxy); then the proxy is stopped (SIGTERM) and
  started again, and the generator reconnects each connection like the agent does (at once,
  then full-jitter exponential backoff 0.5 s .. 30 s): time until all N are back.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# Run as a script (the ``--loadgen`` child), Python puts this file's directory, bench/cases/,
# first on sys.path, where bench/cases/enroll.py would shadow the ``enroll`` package: drop it.
_CASES = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if (p and str(Path(p).resolve())) != _CASES]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import ROOT, case_main, cpu_seconds, paths, rss_kb  # noqa: E402

paths()

INFLIGHT = 200  # concurrent handshakes the generator keeps in flight while ramping
HANDSHAKE_TIMEOUT = 3.0  # tunnel.agent.HANDSHAKE_TIMEOUT


# --- the load generator (child process) ------------------------------------------------------


async def _loadgen(spec: dict) -> None:
    from enroll import certs
    from tunnel.backoff import Backoff
    from tunnel.protocol import ALPN_AGENT
    from tunnel.transport import TLSIdentity, TransportError, connect

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    ca = certs.load_cert(spec["ca"].encode())
    idents = [TLSIdentity([certs.load_cert(c.encode())], certs.load_key(k.encode()), ca)
              for c, k in spec["identities"]]
    host, port = spec["host"], spec["port"]
    connected: set[int] = set()
    stats = {"handshakes": 0, "failures": 0}
    gate = asyncio.Semaphore(INFLIGHT)
    tasks: list[asyncio.Task] = []
    conns: dict[int, object] = {}

    async def hold(i: int) -> None:
        backoff = Backoff(base=0.5, cap=30.0)
        while True:
            try:
                async with gate:
                    conn = await connect(host, port, identity=idents[i], server_name="proxy.test",
                                         alpn=ALPN_AGENT, keepalive=25.0, idle_timeout=75.0,
                                         handshake_timeout=HANDSHAKE_TIMEOUT)
            except (TransportError, OSError):
                stats["failures"] += 1
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            stats["handshakes"] += 1
            connected.add(i)
            conns[i] = conn
            await conn.wait_closed()
            connected.discard(i)
            conns.pop(i, None)

    def say(**msg) -> None:
        print(json.dumps(msg), flush=True)

    loop = asyncio.get_running_loop()
    say(event="ready", identities=len(idents))
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        cmd = line.split()
        if cmd[0] == "up":
            n = min(int(cmd[1]), len(idents))
            t0, h0 = time.perf_counter(), stats["handshakes"]
            tasks += [asyncio.create_task(hold(i)) for i in range(len(tasks), n)]
            deadline = time.monotonic() + float(cmd[2]) if len(cmd) > 2 else time.monotonic() + 300
            while len(connected) < n and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            say(event="up", connected=len(connected), seconds=time.perf_counter() - t0,
                handshakes=stats["handshakes"] - h0, failures=stats["failures"])
        elif cmd[0] == "status":
            say(event="status", connected=len(connected), handshakes=stats["handshakes"],
                failures=stats["failures"])
        elif cmd[0] == "quit":
            break
    for t in tasks:
        t.cancel()
    for c in list(conns.values()):
        c.close(0, "load generator done")
    await asyncio.sleep(0.2)


class LoadGen:
    """The generator process; ``up(n)``, ``status()``; closed with ``close()``."""

    def __init__(self, spec_path: Path):
        self.proc = subprocess.Popen([sys.executable, __file__, "--loadgen", str(spec_path)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd=ROOT)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.expect("ready", 120)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def expect(self, event: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"load generator: no {event!r} within {timeout}s") from None
            if line is None:
                raise RuntimeError(f"load generator exited ({self.proc.wait()})")
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("event") == event:
                return msg

    def send(self, text: str) -> None:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def up(self, n: int, timeout: float) -> dict:
        self.send(f"up {n} {timeout}")
        return self.expect("up", timeout + 30)

    def status(self) -> dict:
        self.send("status")
        return self.expect("status", 30)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(15)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)


# --- device identities in bulk ---------------------------------------------------------------


def issue_devices(state, n: int) -> dict:
    """N device certificates signed by the fleet CA, registered in one transaction."""
    import datetime as dt
    import json as _json

    from enroll import certs
    from enroll.registry import iso

    now = dt.datetime.now(dt.UTC)
    ca_cert, ca_key = state.ca_cert, state.ca_key
    labels = {"customer": "bench", "lifecycle": "active"}
    identities, devices, cert_rows = [], [], []
    for i in range(n):
        name = f"load-{i:05d}"
        key = certs.new_key()
        cert = certs.issue(ca_cert, ca_key, key.public_key(), kind="device", fleet=state.fleet,
                           name=name, labels=labels, lifetime=dt.timedelta(days=1), now=now)
        serial = format(cert.serial_number, "x")
        identities.append((certs.cert_pem(cert).decode(), certs.key_pem(key).decode()))
        devices.append({"id": name, "labels": _json.dumps(labels, sort_keys=True),
                        "cert_serial": serial, "ssh_host_key": None, "enrolled_at": iso(now),
                        "last_seen": None, "locked_until": None, "lock_message": None})
        cert_rows.append({"serial": serial, "kind": "device", "subject": name, "issued_at": iso(now),
                          "not_after": iso(cert.not_valid_after_utc), "revoked_at": None})
    with state.registry() as reg, reg.write() as db:
        db["devices"].insert_all(devices, batch_size=500)
        db["certs"].insert_all(cert_rows, batch_size=500)
    return {"ca": certs.cert_pem(ca_cert).decode(), "identities": identities}


# --- the case --------------------------------------------------------------------------------


def agent_rss(rows: list[dict]) -> None:
    from rig import Services, SshRig, TunnelRig, recv_exact

    with Services() as svc, SshRig() as ssh, \
            TunnelRig({"echo": f"127.0.0.1:{svc.echo_port}"}) as ft:
        rport, ssh_client = ssh.reverse(svc.echo_port)
        time.sleep(3)
        idle = {"agent": rss_kb(ft.agent.pid), "proxy": rss_kb(ft.proxy.pid), "ssh": rss_kb(ssh_client.pid)}
        fport, _ = ft.forward("echo")
        block = os.urandom(65536)
        socks = []
        try:
            for port in [fport] * 10 + [rport] * 10:
                s = socket.create_connection(("127.0.0.1", port), timeout=20)
                s.sendall(block)
                if recv_exact(s, len(block)) != block:
                    raise RuntimeError("echo mismatch")
                socks.append(s)
            time.sleep(1)
            busy = {"agent": rss_kb(ft.agent.pid), "proxy": rss_kb(ft.proxy.pid),
                    "ssh": rss_kb(ssh_client.pid)}
        finally:
            for s in socks:
                s.close()
    rows += [
        {"metric": "agent RSS, idle (connected)", "value": round(idle["agent"] / 1024, 1), "unit": "MB",
         "baseline": round(idle["ssh"] / 1024, 1), "baseline_name": "ssh -R client", "target": "<= 42 MB"},
        {"metric": "agent RSS, 10 open sessions", "value": round(busy["agent"] / 1024, 1), "unit": "MB",
         "baseline": round(busy["ssh"] / 1024, 1), "baseline_name": "ssh -R client", "target": "-"},
        {"metric": "proxy RSS, 1 agent idle", "value": round(idle["proxy"] / 1024, 1), "unit": "MB",
         "target": "-"},
    ]


def proxy_scale(rows: list[dict], quick: bool) -> None:
    from fleet import Fleet

    steps = [100, 1000] if quick else [100, 1000, 5000]
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    fleet = Fleet(tmp)
    gen = None
    try:
        t0 = time.perf_counter()
        spec = issue_devices(fleet.state, steps[-1])
        issue_s = time.perf_counter() - t0
        spec.update(host="127.0.0.1", port=fleet.proxy_port)
        spec_path = tmp / "loadgen.json"
        spec_path.write_text(json.dumps(spec))
        proxy = fleet.start_proxy()
        gen = LoadGen(spec_path)
        time.sleep(2)
        rss0 = rss_kb(proxy.pid)
        rows.append({"metric": "proxy RSS, no agents", "value": round(rss0 / 1024, 1), "unit": "MB",
                     "target": "-", "note": f"{steps[-1]} device certificates issued + registered in {issue_s:.1f} s"})
        for n in steps:
            cpu0 = cpu_seconds(proxy.pid)
            res = gen.up(n, timeout=60 + n * 0.05)
            cpu1 = cpu_seconds(proxy.pid)
            if res["connected"] < n:
                rows.append({"metric": f"proxy RSS per idle agent at {n:,} agents", "value": None,
                             "unit": "KB", "target": "<= 100 KB",
                             "note": f"only {res['connected']} of {n} connected ({res['failures']} failed handshakes)"})
                break
            time.sleep(3)
            rss = rss_kb(proxy.pid)
            rate = res["handshakes"] / res["seconds"] if res["seconds"] else None
            rows.append({"metric": f"proxy RSS per idle agent at {n:,} agents",
                         "value": round((rss - rss0) / n, 1), "unit": "KB", "target": "<= 100 KB",
                         "note": f"proxy RSS {rss / 1024:.1f} MB with {n} agents, {rss0 / 1024:.1f} MB with none"})
            if res["handshakes"] >= 100:
                rows.append({"metric": f"agent handshakes per second, ramp to {n:,}",
                             "value": round(rate, 1), "unit": "handshakes/s", "target": "-",
                             "note": f"{res['handshakes']} handshakes in {res['seconds']:.2f} s; proxy "
                                     f"{(cpu1 - cpu0) * 1000 / res['handshakes']:.2f} CPU-ms each (incl. "
                                     f"registry + audit write); generator shares the 2 cores"})
        n = steps[-1] if rows[-1].get("value") is not None else None
        if n is None:
            return
        # restart: SIGTERM (graceful: CONNECTION_CLOSE to every agent), start again
        t_stop = time.perf_counter()
        fleet.stop(proxy)
        fleet.processes.remove(proxy)
        proxy = fleet.start_proxy()
        t_listen = time.perf_counter()
        back = None
        limit = 180 if quick else 400
        deadline = time.monotonic() + limit
        f0 = gen.status()["failures"]
        last = {}
        while time.monotonic() < deadline:
            last = gen.status()
            if last["connected"] >= n:
                back = time.perf_counter()
                break
            time.sleep(0.1)
        if back is None:
            rows.append({"metric": f"all {n:,} agents back after a proxy restart", "value": None,
                         "unit": "s", "target": "-",
                         "note": f"only {last.get('connected')} back after {limit} s"})
        else:
            rows.append({"metric": f"all {n:,} agents back after a proxy restart (from new proxy listening)",
                         "value": round(back - t_listen, 2), "unit": "s", "target": "-",
                         "note": f"{t_listen - t_stop:.2f} s from SIGTERM to the new proxy listening "
                                 f"(old proxy shutdown + start-up); {back - t_stop:.2f} s from SIGTERM; "
                                 f"{last['failures'] - f0} failed/timed-out dials on the way"})
    finally:
        if gen:
            gen.close()
        fleet.close()
        shutil.rmtree(tmp, ignore_errors=True)


def run(quick: bool = False) -> list[dict]:
    rows: list[dict] = []
    agent_rss(rows)
    proxy_scale(rows, quick)
    return rows


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--loadgen":
        asyncio.run(_loadgen(json.loads(Path(sys.argv[2]).read_text())))
    else:
        case_main("footprint", run)
