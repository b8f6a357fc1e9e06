"""Soak: many agents, checksummed sessions through every engineer path, while things break.

Loopback only (127.0.0.1), real processes, bounded in time (``--minutes``; 3 under ``--quick``,
else 30) and stopping by itself:

* ``AGENTS`` agents (10 under ``--quick``, else 30), each exposing an echo service that runs in
  this process.
* ``WORKERS`` (10) concurrent workers, each looping over sessions to a random device (its own
  one for ``tunnel forward``) through one engineer path — the client API in-process,
  ``tunnel forward`` (a long-running process, restarted when it exits) or ``tunnel
  proxy-command`` (one process per session). Each session sends a random payload (64 KB to
  4 MB, to 1 MB under ``--quick``), half-closes, reads to the end and compares what came back byte for byte.
* Disruptions: an agent kill -9 every minute (restarted a second later, as systemd would); an
  agent moved to the TCP fallback and back every 2 minutes (loopback has no way to block UDP
  for one process, so ``transport: tcp`` is written to its agent.yaml and the agent restarted;
  then ``transport: auto`` again); proxy restarts alternating SIGTERM and kill -9 (two or
  three, a minute apart from the first minute on, so a 30-minute run keeps 27 minutes without one).

A session that fails is *expected* when a disruption that concerns it (its device's agent, or
the proxy) happened between its start and its failure (a few seconds of grace), or it started
while the fleet was coming back; anything else is *unexpected*. Disruptions are the soak's own
and every reconnect an agent logged ("connection ended; reconnecting"): those the soak did not
cause are reported in a row of their own, with their reasons. A session that ends "cleanly"
(EOF, exit 0) with fewer bytes than were sent is *truncated seen as clean* — must be 0.

Reported: sessions and bytes verified, failures by class, truncated-as-clean, checksum
failures, time until every agent is back after each proxy restart, proxy and agent RSS slope
(MB/min, least squares after a warm-up) over the longest window without a proxy restart (with
the slopes of its two halves, and the proxy's resident memory by mapping: C heap, anonymous,
files), proxy fds and threads over that window, audit ``session.start`` without ``session.end``, and
tracebacks in every log (proxy, agents, forward, proxy-command).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import ROOT, case_main, paths, rss_kb  # noqa: E402

paths()

PY = sys.executable
TUNNEL = [PY, "-m", "tunnel.cli"]
WORKERS = 10
PATHS = ("api", "forward", "proxy-command")
GRACE = 5.0  # s after a disruption during which a failure counts as caused by it
SAMPLE = 5.0  # s between RSS/fd samples
TRACE = re.compile(r"Traceback \(most recent call last\)|Exception in |Task was destroyed")


@dataclass
class Outcome:
    path: str
    device: str
    start: float
    end: float
    size: int
    status: str  # ok | truncated-clean | checksum | error
    detail: str = ""
    received: int = 0


@dataclass
class Disruption:
    at: float
    kind: str  # agent-kill | transport-switch | proxy-sigterm | proxy-kill
    device: str | None = None
    back_after: float | None = None  # every agent online again this long after ``at``
    waited: float | None = None  # how long the soak waited for that, back or not


def rss_by_kind(pid: int) -> dict[str, int] | None:
    """Resident KiB of ``pid`` by kind of mapping: the C heap (``[heap]``: glibc's main arena),
    anonymous (pymalloc's arenas, glibc's mmapped blocks and thread arenas, stacks) and files
    (libraries). Tells heap fragmentation from Python objects or buffers when RSS grows."""
    kinds = {"heap": 0, "anon": 0, "file": 0}
    kind = "anon"
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split(maxsplit=6)
                if head and "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line
                    path = head[5].strip() if len(head) > 5 else ""
                    kind = "heap" if path == "[heap]" else "anon" if not path or path.startswith("[") else "file"
                elif head and head[0] == "Rss:":
                    kinds[kind] += int(head[1])
    except (OSError, ValueError, IndexError):
        return None
    return kinds


class EchoService:
    """One TCP echo service for every agent (threads in this process)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn):
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)

    def close(self):
        self.sock.close()


@dataclass
class Soak:
    root: Path
    agents: int
    minutes: float
    quick: bool
    outcomes: list[Outcome] = field(default_factory=list)
    disruptions: list[Disruption] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        from fleet_harness import Fleet

        self.fleet = Fleet(self.root)
        self.echo = EchoService()
        self.devices = [f"soak-{i:02d}" for i in range(self.agents)]
        self.configs = {d: self.fleet.enroll_device(d, {"customer": "soak"}, {"echo": f"127.0.0.1:{self.echo.port}"},
                                                    keepalive="5s") for d in self.devices}
        self.agent_procs: dict[str, subprocess.Popen] = {}
        self.ops = self.fleet.user("ops", ["admin"], ttl="8h")
        self.stop = threading.Event()
        self.t0, self.wall0 = time.monotonic(), time.time()
        self.restarting = threading.Event()  # the proxy is down or its agents not all back
        self.max_size = (1 << 20) if self.quick else (4 << 20)

    # --- processes ----------------------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic() - self.t0

    def start_proxy(self) -> subprocess.Popen:
        """Start the proxy; wait up to 90 s for it to listen (a loaded machine can take 20 s)."""
        log = self.fleet.root / "proxy.log"
        mark = log.stat().st_size if log.exists() else 0
        proc = self.fleet.start([*TUNNEL, "proxy", "--state", str(self.fleet.state.root),
                                 "--listen", self.fleet.address, "--log-format", "json"], log)
        deadline = time.monotonic() + 90
        while '"listening"' not in log.read_text(errors="replace")[mark:]:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the proxy did not start: {log.read_text(errors='replace')[mark:][-2000:]}")
            time.sleep(0.1)
        return proc

    def start_agent(self, device: str) -> None:
        self.agent_procs[device] = self.fleet.start_agent(self.configs[device])

    def online(self) -> set[str]:
        try:
            out = self.fleet.tunnel("ls", "--format", "json", identity=self.ops, timeout=20)
        except subprocess.TimeoutExpired:  # a slow answer (e.g. 30 agents starting) is "not yet"
            return set()
        if out.returncode != 0:
            return set()
        return {d["id"] for d in json.loads(out.stdout) if d["online"]}

    def wait_all_back(self, since: float, timeout: float = 90.0) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.online() >= set(self.devices):
                return round(time.monotonic() - since, 2)
            time.sleep(0.2)
        return None

    # --- sessions -----------------------------------------------------------------------------

    def payload(self) -> bytes:
        return random.randbytes(random.randint(64 << 10, self.max_size))

    def record(self, path, device, start, data, got, clean, detail="") -> None:
        end = self.now()
        if clean and got == data:
            status = "ok"
        elif clean and len(got) < len(data) and data.startswith(got):
            status = "truncated-clean"
        elif clean:
            status = "checksum"
        else:
            status = "error"
        with self.lock:
            self.outcomes.append(Outcome(path, device, start, end, len(data), status, detail[:200], len(got)))

    def api_session(self, device: str) -> None:
        from tunnel.client import Client, ClientError, UserIdentity
        from tunnel.transport import TransportError

        data, start = self.payload(), self.now()

        async def go() -> tuple[bytes, bool, str]:
            got = bytearray()
            try:
                client = await Client.connect(UserIdentity.load(self.ops))
            except ClientError as exc:
                return bytes(got), False, f"connect: {exc}"
            watch = asyncio.create_task(client.watch())  # as tunnel forward does: a silent proxy is dead
            sender: asyncio.Task | None = None
            try:
                stream, rest = await client.dial(device, "echo")
                got += rest

                async def send():
                    view = memoryview(data)
                    for i in range(0, len(view), 256 << 10):
                        await stream.write(view[i:i + (256 << 10)])
                    stream.write_eof()

                sender = asyncio.create_task(send())
                async with asyncio.timeout(120):
                    while chunk := await stream.read(65536):
                        got += chunk
                    await sender
                return bytes(got), True, ""
            except (ClientError, TransportError, TimeoutError, OSError) as exc:
                return bytes(got), False, f"{type(exc).__name__}: {exc}"
            finally:
                watch.cancel()
                if sender is not None and not sender.done():
                    sender.cancel()
                if sender is not None:  # its error, if any, is the one the read already reported
                    await asyncio.gather(sender, return_exceptions=True)
                client.close()
                await asyncio.sleep(0.01)

        got, clean, detail = asyncio.run(go())
        self.record("api", device, start, data, got, clean, detail)

    def socket_session(self, path: str, device: str, port: int) -> bool:
        data, start = self.payload(), self.now()
        got = bytearray()
        sent: list[BaseException] = []
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
                sender = threading.Thread(target=self._send, args=(s, data, sent), daemon=True)
                sender.start()
                while chunk := s.recv(65536):
                    got += chunk
                sender.join(10)
            if sent:  # a reset is reported once: to the sending thread if it got there first
                raise sent[0]
            self.record(path, device, start, data, bytes(got), True)
            return True
        except OSError as exc:
            self.record(path, device, start, data, bytes(got), False, f"{type(exc).__name__}: {exc}")
            return False

    @staticmethod
    def _send(s: socket.socket, data: bytes, errors: list) -> None:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError as exc:
            errors.append(exc)

    def proxy_command_session(self, device: str, n: int) -> None:
        data, start = self.payload(), self.now()
        err = self.root / "logs" / f"proxy-command-{n}.log"
        with open(err, "ab") as errf:
            try:
                out = subprocess.run([*TUNNEL, "proxy-command", device, "echo", "--identity", str(self.ops)],
                                     input=data, stdout=subprocess.PIPE, stderr=errf, timeout=150, cwd=ROOT)
            except subprocess.TimeoutExpired as exc:
                self.record("proxy-command", device, start, data, exc.stdout or b"", False, "timeout")
                return
        detail = "" if out.returncode == 0 else f"exit {out.returncode}"
        self.record("proxy-command", device, start, data, out.stdout, out.returncode == 0, detail)

    def worker(self, i: int) -> None:
        path = PATHS[i % len(PATHS)]
        fwd: subprocess.Popen | None = None
        fwd_port = 0
        own = self.devices[i % len(self.devices)]
        n = 0
        try:
            while not self.stop.is_set():
                n += 1
                device = random.choice(self.devices)
                if path == "api":
                    self.api_session(device)
                elif path == "proxy-command":
                    self.proxy_command_session(device, i)
                else:
                    if fwd is None or fwd.poll() is not None:
                        fwd, fwd_port = self.start_forward(own, i)
                        if fwd is None:
                            time.sleep(1)
                            continue
                    if not self.socket_session("forward", own, fwd_port):
                        time.sleep(0.5)  # forward may be exiting (proxy gone): do not spin
        finally:
            if fwd is not None and fwd.poll() is None:
                fwd.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    fwd.wait(10)

    def start_forward(self, device: str, i: int) -> tuple[subprocess.Popen | None, int]:
        log = self.root / "logs" / f"forward-{i}.log"
        if log not in self.logs:
            self.logs.append(log)
        errf = open(log, "ab")  # noqa: SIM115 - kept by the process
        ready = self.root / "logs" / f"forward-{i}.port"
        proc = subprocess.Popen([*TUNNEL, "forward", device, "echo", "--identity", str(self.ops)],
                                stderr=subprocess.PIPE, cwd=ROOT)
        line = proc.stderr.readline().decode()
        errf.write(line.encode())

        def drain():
            for chunk in proc.stderr:
                errf.write(chunk)
                errf.flush()
            errf.close()

        threading.Thread(target=drain, daemon=True).start()
        if not line.startswith("forwarding "):
            proc.wait()
            return None, 0
        ready.write_text(line)
        return proc, int(line.split()[1].rsplit(":", 1)[1])

    # --- disruptions --------------------------------------------------------------------------

    def set_transport(self, device: str, transport: str) -> None:
        import yaml

        path = self.configs[device]
        config = yaml.safe_load(path.read_text())
        config["transport"] = transport
        path.write_text(yaml.safe_dump(config))

    def disrupt(self) -> None:
        m = self.minutes * 60
        # Proxy restarts a minute apart from the first minute on (SIGTERM, kill -9, SIGTERM; two
        # in a run under 10 minutes, spread over it if it is shorter than 3): each still cuts a
        # minute of sessions, and the rest of the run is one window without a restart - 27 of a
        # 30-minute run, 25 after the warm-up, for the slope over at least 20 minutes.
        n = 3 if self.minutes >= 10 else 2
        proxy_restarts = [min(60.0 * k, m * k / (n + 1)) for k in range(1, n + 1)]
        events = [(t, "agent-kill") for t in range(60, int(m) - 10, 60)]
        events += [(t, "transport-switch") for t in range(45, int(m) - 10, 120)]
        events += [(t, "proxy-kill" if k % 2 else "proxy-sigterm") for k, t in enumerate(proxy_restarts)]
        switched: str | None = None
        for at, kind in sorted(events):
            if self.stop.wait(max(0.0, at - self.now())):
                return
            if kind == "agent-kill":
                device = random.choice([d for d in self.devices if d != switched])
                self.agent_procs[device].send_signal(signal.SIGKILL)
                self.agent_procs[device].wait()
                self.disruptions.append(Disruption(self.now(), kind, device))
                time.sleep(1.0)
                self.start_agent(device)
            elif kind == "transport-switch":
                device = switched or random.choice(self.devices)
                self.set_transport(device, "auto" if switched else "tcp")
                self.fleet.stop(self.agent_procs[device])
                self.disruptions.append(Disruption(self.now(), f"{kind} to {'quic' if switched else 'tcp'}",
                                                   device))
                self.start_agent(device)
                switched = None if switched else device
            else:
                self.restarting.set()
                at = time.monotonic()
                d = Disruption(self.now(), kind)  # sessions start failing when the signal is sent
                self.fleet.stop(self.proxy, signal.SIGKILL if kind == "proxy-kill" else signal.SIGTERM)
                self.disruptions.append(d)
                self.proxy = self.start_proxy()
                d.back_after = self.wait_all_back(at)
                d.waited = round(time.monotonic() - at, 2)
                self.restarting.clear()

    # --- measurements -------------------------------------------------------------------------

    def sampler(self) -> None:
        while not self.stop.wait(SAMPLE):
            pid = self.proxy.pid
            try:
                fds = len(os.listdir(f"/proc/{pid}/fd"))
                status = Path(f"/proc/{pid}/status").read_text()
                threads = int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))
            except (OSError, AttributeError):
                fds = threads = None
            self.samples.append({"t": self.now(), "proxy_pid": pid, "proxy_rss_kb": rss_kb(pid),
                                 "proxy_rss_by_kind": rss_by_kind(pid), "proxy_fds": fds, "proxy_threads": threads,
                                 "agents": {d: (p.pid, rss_kb(p.pid)) for d, p in self.agent_procs.items()}})

    def run(self) -> list[dict]:
        (self.root / "logs").mkdir(exist_ok=True)
        self.proxy = self.start_proxy()
        for d in self.devices:
            self.start_agent(d)
        self.wait_all_back(time.monotonic(), 120)
        self.t0, self.wall0 = time.monotonic(), time.time()
        threads = [threading.Thread(target=self.worker, args=(i,), daemon=True) for i in range(WORKERS)]
        threads += [threading.Thread(target=self.disrupt, daemon=True),
                    threading.Thread(target=self.sampler, daemon=True)]
        for t in threads:
            t.start()
        self.stop.wait(self.minutes * 60)
        self.stop.set()
        for t in threads:
            t.join(180)
        time.sleep(2)
        self.fleet.stop(self.proxy)  # SIGTERM: a graceful stop closes what is open
        for p in self.agent_procs.values():
            self.fleet.stop(p)
        return self.report()

    # --- report -------------------------------------------------------------------------------

    def agent_reconnects(self) -> list[Disruption]:
        """Every time an agent's connection ended and it reconnected, from the agents' own logs.

        The soak causes most of them (proxy restarts, transport switches); the others (an agent
        that declared a silent proxy dead under load, a connection the proxy replaced) are
        disruptions too — logged, and a session they cut ends with a reset — and are counted
        in their own row so they stay visible.
        """
        found = []
        for device, config in self.configs.items():
            log = config.parent / "agent.log"
            if not log.exists():
                continue
            for line in log.read_text(errors="replace").splitlines():
                if '"connection ended; reconnecting"' not in line:
                    continue
                with contextlib.suppress(ValueError, KeyError):
                    rec = json.loads(line)
                    at = dt.datetime.fromisoformat(rec["time"].replace("Z", "+00:00")).timestamp() - self.wall0
                    if 0 <= at <= self.minutes * 60:  # not the final stop
                        found.append(Disruption(at, f"agent-reconnect: {rec.get('reason')}", device))
        return found

    @staticmethod
    def recovered(d: Disruption) -> float:
        """When the fleet counts as back after ``d``: every agent online, or the soak gave up
        waiting (agents not back in time are coming back all that while; what fails after
        that is unexpected), plus grace."""
        return d.at + (d.back_after if d.back_after is not None else d.waited or 0) + 2 * GRACE

    def caused_by_soak(self, r: Disruption) -> bool:
        return any(d.device in (None, r.device) and d.at - GRACE <= r.at <= self.recovered(d)
                   for d in self.disruptions)

    def expected(self, o: Outcome) -> bool:
        for d in [*self.disruptions, *self._reconnects]:
            if d.device not in (None, o.device):
                continue
            if o.start - GRACE <= d.at <= o.end + GRACE:
                return True
            if d.at <= o.start <= self.recovered(d):
                return True
        return False

    def window(self) -> tuple[float, float]:
        cuts = [0.0] + [d.at for d in self.disruptions if d.kind.startswith("proxy")] + [self.minutes * 60]
        spans = [(a, b) for a, b in zip(cuts, cuts[1:], strict=False)]
        return max(spans, key=lambda s: s[1] - s[0])

    @staticmethod
    def slope(points: list[tuple[float, float]]) -> float | None:
        if len(points) < 3:
            return None
        n = len(points)
        mx = sum(p[0] for p in points) / n
        my = sum(p[1] for p in points) / n
        den = sum((p[0] - mx) ** 2 for p in points)
        return sum((p[0] - mx) * (p[1] - my) for p in points) / den if den else None

    def audit_pairing(self) -> tuple[int, int, int]:
        """(``session.start`` events, sessions without ``session.end``, of those: still held).

        A resumable session (issue 17) whose tunnel was lost gets ``session.detach``; the ends
        hold it for the resume hold time and the proxy's sweep writes its ``session.end`` (``not
        resumed``) when that runs out. Such a session is not over yet by design, and is counted
        apart from a missing end, only when its detach came with one of the soak's disruptions
        that concerns its device (that device's agent killed or switched, or a proxy restart:
        from GRACE before it until the fleet was back) or with a reconnect its agent logged
        (within GRACE), and less than the proxy's hold time before the end. Any other start
        without an end is a missing end — one detached at the final stop included (the workers
        were done by then: that session had hung).
        """
        from tunnel.resume import DEFAULT_HOLD

        hold = DEFAULT_HOLD  # the soak's proxy runs with its default --resume-hold
        last: dict[str, tuple[str, str, str | None]] = {}
        starts: set[str] = set()
        for e in self.fleet.audit():
            if e["type"] in ("session.start", "session.resume", "session.detach", "session.end"):
                sid = e["fields"].get("session")
                last[sid] = (e["type"], e["time"], e.get("device"))
                if e["type"] == "session.start":
                    starts.add(sid)
        open_ = [sid for sid in starts if last[sid][0] != "session.end"]

        def excused(sid: str) -> bool:
            kind, when, device = last[sid]
            if kind != "session.detach":
                return False
            at = dt.datetime.fromisoformat(when.replace("Z", "+00:00")).timestamp() - self.wall0
            if not 0 <= at <= self.minutes * 60 or self.minutes * 60 - at >= hold:
                return False
            return any(d.device in (None, device) and d.at - GRACE <= at <= self.recovered(d)
                       for d in self.disruptions) or any(
                r.device == device and r.at - GRACE <= at <= r.at + GRACE for r in self._reconnects)

        held = [sid for sid in open_ if excused(sid)]
        return len(starts), len(open_) - len(held), len(held)

    def tracebacks(self) -> dict[str, int]:
        files = [self.root / "proxy.log", *(c.parent / "agent.log" for c in self.configs.values()),
                 *(self.root / "logs").glob("*.log")]
        found = {}
        for f in files:
            if f.exists() and (n := len(TRACE.findall(f.read_text(errors="replace")))):
                found[str(f.relative_to(self.root))] = n
        return found

    def report(self) -> list[dict]:
        self._reconnects = self.agent_reconnects()
        uncaused = [r for r in self._reconnects if not self.caused_by_soak(r)]
        reasons: dict[str, int] = {}
        for r in uncaused:
            reasons[r.kind] = reasons.get(r.kind, 0) + 1
        outs = self.outcomes
        ok = [o for o in outs if o.status == "ok"]
        failed = [o for o in outs if o.status != "ok"]
        truncated = [o for o in outs if o.status == "truncated-clean"]
        checksum = [o for o in outs if o.status == "checksum"]
        unexpected = [o for o in failed if o.status == "error" and not self.expected(o)]
        by_class: dict[str, int] = {}
        for o in failed:
            key = f"{o.path} {o.status}{'' if o.status != 'error' else (' expected' if self.expected(o) else ' UNEXPECTED')}"
            by_class[key] = by_class.get(key, 0) + 1
        per_path = {p: sum(1 for o in ok if o.path == p) for p in PATHS}
        restarts = [d for d in self.disruptions if d.kind.startswith("proxy")]
        back = [d.back_after for d in restarts]
        a, b = self.window()
        warm = min(120.0, (b - a) / 5)
        win = [s for s in self.samples if a + warm <= s["t"] < b]
        proxy_points = [(s["t"] / 60, s["proxy_rss_kb"] / 1024) for s in win if s["proxy_rss_kb"]]
        proxy_slope = self.slope(proxy_points)
        # a plateau still being reached looks different from a steady leak: both halves' slopes
        halves = [self.slope(proxy_points[:len(proxy_points) // 2]), self.slope(proxy_points[len(proxy_points) // 2:])]
        kinds = [s["proxy_rss_by_kind"] for s in win if s.get("proxy_rss_by_kind")]
        by_kind = ", ".join(f"{k} {kinds[0][k] / 1024:.1f} -> {kinds[-1][k] / 1024:.1f}"
                            f" ({self.slope([(s['t'] / 60, s['proxy_rss_by_kind'][k] / 1024) for s in win if s.get('proxy_rss_by_kind')]) or 0:+.3f}/min)"
                            for k in kinds[0]) if len(kinds) >= 3 else "not sampled"
        agent_slopes = []
        for d in self.devices:
            pts: dict[int, list] = {}
            for s in win:
                pid, kb = s["agents"].get(d, (None, 0))
                if kb:
                    pts.setdefault(pid, []).append((s["t"] / 60, kb / 1024))
            longest = max(pts.values(), key=len, default=[])
            if len(longest) >= max(3, len(win) // 2) and (v := self.slope(longest)) is not None:
                agent_slopes.append(v)
        agent_slopes.sort()
        fds = [s["proxy_fds"] for s in win if s["proxy_fds"] is not None]
        thr = [s["proxy_threads"] for s in win if s["proxy_threads"] is not None]
        starts, open_, held = self.audit_pairing()
        tb = self.tracebacks()
        rows = [
            {"metric": "soak: sessions verified (checksummed)", "value": len(ok), "unit": "sessions",
             "note": f"{self.minutes:g} min, {self.agents} agents, {WORKERS} workers; by path "
                     + ", ".join(f"{p} {n}" for p, n in per_path.items())
                     + f"; {len(outs)} sessions in all"},
            {"metric": "soak: bytes verified", "value": round(sum(o.size for o in ok) * 2 / 1e6, 1),
             "unit": "MB", "note": "both directions"},
            {"metric": "soak: checksum failures", "value": len(checksum), "unit": "sessions", "target": "< 1"},
            {"metric": "soak: truncated sessions seen as clean", "value": len(truncated), "unit": "sessions",
             "target": "< 1", "note": "; ".join(f"{o.path} {o.device} {o.received}/{o.size} B"
                                                  for o in truncated[:5]) or None},
            {"metric": "soak: failures expected after a disruption",
             "value": sum(1 for o in failed if o.status == "error" and self.expected(o)), "unit": "sessions",
             "note": ", ".join(f"{k}: {v}" for k, v in sorted(by_class.items())) or "none"},
            {"metric": "soak: unexpected failures", "value": len(unexpected), "unit": "sessions", "target": "< 1",
             "note": "; ".join(f"{o.path} {o.device} at {o.end:.0f}s: {o.detail}" for o in unexpected[:5]) or None},
            {"metric": "soak: disruptions", "value": len(self.disruptions), "unit": "events",
             "note": ", ".join(f"{d.kind}{' ' + d.device if d.device else ''} at {d.at:.0f}s"
                               for d in self.disruptions)},
            {"metric": "soak: agent reconnects the soak did not cause", "value": len(uncaused), "unit": "events",
             "note": ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())) or None},
            {"metric": "soak: all agents back after a proxy restart (worst)",
             "value": max((x for x in back if x is not None), default=None), "unit": "s",
             "note": ", ".join(f"{d.kind}: {d.back_after if d.back_after is not None else 'NOT BACK in 90'} s"
                               for d in restarts)},
            {"metric": "soak: proxy RSS slope without restarts", "unit": "MB/min", "target": "<= 0.2",
             "value": round(proxy_slope, 3) if proxy_slope is not None else None,
             "note": f"window {a:.0f}-{b:.0f} s ({(b - a) / 60:.1f} min), first {warm:.0f} s skipped as "
                     f"warm-up; RSS {win[0]['proxy_rss_kb'] / 1024:.1f} -> {win[-1]['proxy_rss_kb'] / 1024:.1f} MB; "
                     f"slope of the first half {halves[0] or 0:.3f}, of the second {halves[1] or 0:.3f} MB/min; "
                     f"by mapping (MB): {by_kind}"
                     if win else "no samples"},
            {"metric": "soak: agent RSS slope (median)", "unit": "MB/min",
             "value": round(agent_slopes[len(agent_slopes) // 2], 3) if agent_slopes else None,
             "note": f"{len(agent_slopes)} agents not restarted in the window; max "
                     f"{max(agent_slopes):.3f}" if agent_slopes else "no agent ran through the window"},
            {"metric": "soak: proxy fds over the window", "value": (fds[-1] - fds[0]) if fds else None,
             "unit": "fds", "note": f"{fds[0]} -> {fds[-1]} (max {max(fds)}); threads {thr[0]} -> {thr[-1]}"
             if fds and thr else None},
            {"metric": "soak: session.start without session.end", "value": open_, "unit": "sessions",
             "target": "< 1", "note": f"of {starts} session.start in the audit"
             + (f"; {held} more resumable sessions detached by a disruption of their device or the "
                f"proxy, still within the resume hold at the end (the proxy's sweep ends them if "
                f"they are not resumed)"
                if held else "")},
            {"metric": "soak: tracebacks in logs", "value": sum(tb.values()), "unit": "tracebacks",
             "target": "< 1", "note": ", ".join(f"{k}: {v}" for k, v in tb.items()) or None},
        ]
        (self.root.parent / "soak-outcomes.json").write_text(json.dumps(
            {"outcomes": [o.__dict__ for o in outs], "disruptions": [d.__dict__ for d in self.disruptions],
             "samples": self.samples}, default=str))
        return [{k: v for k, v in r.items() if v is not None or k == "value"} for r in rows]


def run(quick: bool = False, minutes: float | None = None) -> list[dict]:
    minutes = minutes or (3.0 if quick else 30.0)
    tmp = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    soak = None
    try:
        soak = Soak(tmp / "fleet", agents=10 if quick else 30, minutes=minutes, quick=quick)
        return soak.run()
    finally:
        if soak is not None:
            soak.stop.set()
            soak.fleet.close()
            soak.echo.close()
        keep = os.environ.get("SOAK_KEEP")
        if keep:
            shutil.copytree(tmp, keep, dirs_exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    case_main("soak", run)
