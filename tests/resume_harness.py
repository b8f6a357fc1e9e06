"""Lab helpers for resumable sessions (issue 17): what tests/test_resume_lab.py and
bench/cases/migration.py need on top of ``migration_harness``.

* :class:`SeqTickSession`: a :class:`~migration_harness.TickSession` whose remote loop prints a
  sequence number with each line, so a test proves the SAME session went on without a lost or a
  repeated line (a new session would start again at 1; a replay twice would repeat numbers).
* :class:`ByteServer` (device side) and :class:`Transfer` (engineer side, through a real
  ``tunnel forward``): a paced, byte-exact download with sha256 on both ends. The server is a
  thread of the test process with a socket made inside the device's namespace; it records
  whether its connection completed or was reset (what a refused resume must do to the
  device's local connection). Pacing (not a rate limit on the uplink) keeps the transfer going
  for long enough that a disruption lands in the middle of it, without slowing the ssh session.
* :func:`add_resume_device`: a lab device like ``TunnelLab.add_device`` whose agent also serves
  the byte server as service ``bulk``.
* :func:`restart_proxy`: stop the proxy (SIGTERM or SIGKILL) and start it again on the same
  address with the same state directory, as an operator's service manager would.
* ssh through the per-user helper as the generated ssh config runs it (:func:`helper_ssh_argv`:
  its ProxyCommand and its ``ServerAlive*`` settings, read from ``tunnel.engineer.ssh_config``).
* The disruptions themselves (``case_*``): each adds its device, opens a :class:`CaseRun` (tick
  session + transfer), disrupts, waits for the outcome and returns the run; the test judges it,
  the bench (bench/cases/migration.py) reports its gap. :func:`survived` says what broke.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field

from fleet_harness import PY, wait_until
from lab import Lab, netns
from migration_harness import PROXY_PORT, TickSession, TunnelLab

#: the remote loop of a sequence-numbered tick session: "N SECONDS.NANOS" every 100 ms
SEQ_TICK = 'i=0; while :; do i=$((i+1)); echo "$i $(date +%s.%N)"; sleep 0.1; done'
BULK_PORT = 9000
CHUNK = 64 * 1024


class SeqTickSession(TickSession):
    """A tick session that keeps each line's sequence number, and ssh's stderr."""

    def __init__(self, lab: Lab, ns: str, argv: list[str], env: dict | None = None):
        # TickSession.__init__ spawns without an environment (FLEET_HELPER must be set here)
        self.seqs: list[int] = []
        self.stderr_lines: list[str] = []
        self.proc = lab.spawn(ns, argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env if env is not None else os.environ)
        self.arrivals = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        self._err_thread = threading.Thread(target=self._read_stderr, daemon=True)
        self._err_thread.start()

    def _read(self) -> None:
        for line in iter(self.proc.stdout.readline, b""):
            now = time.monotonic()
            with contextlib.suppress(ValueError, IndexError):
                self.seqs.append(int(line.split()[0]))
            self.arrivals.append(now)

    def _read_stderr(self) -> None:
        for line in iter(self.proc.stderr.readline, b""):
            self.stderr_lines.append(line.decode(errors="replace").rstrip("\n"))

    def wait_flowing(self, lines: int = 5, timeout: float = 20.0) -> None:
        wait_until(lambda: len(self.arrivals) >= lines or self.proc.poll() is not None,
                   timeout, 0.05, "session output")
        if self.proc.poll() is not None:
            time.sleep(0.2)
            raise AssertionError(f"session ended: {self.stderr()}")

    def stderr(self) -> str:
        return "\n".join(self.stderr_lines)

    def sequence_problems(self) -> list[str]:
        """What is wrong with the numbers seen: a restart at 1, a hole, a repeat (empty: fine)."""
        problems = []
        if self.seqs and self.seqs[0] != 1:
            problems.append(f"first line is {self.seqs[0]}, not 1")
        for a, b in zip(self.seqs, self.seqs[1:], strict=False):
            if b == a + 1:
                continue
            if b <= a:
                problems.append(f"{b} after {a} (repeated or restarted)")
            else:
                problems.append(f"{b} after {a} (lines {a + 1}..{b - 1} lost)")
        return problems

    def wait_seq_past(self, n: int, timeout: float) -> bool:
        with contextlib.suppress(AssertionError):
            wait_until(lambda: self.seqs and self.seqs[-1] >= n, timeout, 0.05, f"line {n}")
            return True
        return False


def seq_tick_session(tl: TunnelLab, name: str, *, helper: bool = False) -> SeqTickSession:
    """A sequence-numbered tick session to ``name``, flowing.

    Direct (default): ssh's ProxyCommand is ``tunnel proxy-command`` (``FLEET_HELPER=off``, as
    the generated ssh config does without the helper). ``helper=True``: the ProxyCommand the
    generated ssh config uses (``tunnel/helper_client.py dial``), which starts the per-user
    helper and gets the session from it.
    """
    if helper:
        argv, env = helper_ssh_argv(tl, name, SEQ_TICK), helper_env(tl)
    else:
        argv, env = tl.ssh_argv(name, SEQ_TICK), {**os.environ, "FLEET_HELPER": "off"}
    session = SeqTickSession(tl.lab, tl.lab.internet, argv, env=env)
    session.wait_flowing()
    return session


def helper_env(tl: TunnelLab) -> dict:
    """The environment of ssh through the per-user helper: its socket under a private run dir."""
    run_dir = tl.lab.tmpdir / "xdg-run"
    run_dir.mkdir(mode=0o700, exist_ok=True)
    return {**os.environ, **tl.fleet.env, "XDG_RUNTIME_DIR": str(run_dir), "FLEET_HELPER": "on"}


def generated_keepalive_options(tl: TunnelLab) -> list[str]:
    """The ``ServerAlive*`` settings of the ssh config ``tunnel config`` generates, as ``-o``
    options: ssh itself gives up a silent server after interval × count, tunnel or not."""
    from tunnel.client import UserIdentity
    from tunnel.engineer import ssh_config

    text = ssh_config(UserIdentity.load(tl.engineer), "*")
    found = re.findall(r"^\s*(ServerAlive\w+)\s+(\S+)\s*$", text, re.MULTILINE)
    return [a for key, value in found for a in ("-o", f"{key}={value}")]


def helper_ssh_argv(tl: TunnelLab, name: str, *command: str) -> list[str]:
    """ssh to ``name`` as the generated ssh config runs it: its ProxyCommand (the helper
    client) and its keepalive settings; the key and host checks stay the lab's."""
    from tunnel.engineer import helper_client_command

    argv = tl.ssh_argv(name, *command)
    index = next(i for i, a in enumerate(argv) if a.startswith("ProxyCommand="))
    argv[index] = (f"ProxyCommand={helper_client_command()} dial %h %p --login %r "
                   f"--identity {tl.engineer}")
    # the generated config sets no LogLevel: ssh says why it gave up ("Timeout, server …")
    argv = [a.replace("LogLevel=ERROR", "LogLevel=INFO") for a in argv]
    return [argv[0], *generated_keepalive_options(tl), *argv[1:]]


def stop_helper(tl: TunnelLab) -> None:
    """Stop the engineer's helper (it runs detached: the lab's process groups do not hold it)."""
    subprocess.run(netns.ns_argv(tl.lab.internet, [PY, "-m", "tunnel.cli", "helper", "stop",
                                                   "--identity", str(tl.engineer)]),
                   env=helper_env(tl), capture_output=True, timeout=30)


# --- the byte-exact transfer ----------------------------------------------------------------


def payload(size: int, seed: int) -> bytes:
    """The deterministic bytes a transfer sends (both ends can compute the digest)."""
    return random.Random(seed).randbytes(size)


class ByteServer:
    """Serves ``size`` bytes per connection at about ``rate`` bytes/s, then a clean FIN.

    Runs in the device's namespace (socket made there by the lab). ``outcomes`` gets one entry
    per connection: ``"complete"`` (all sent, the peer closed after reading), ``"reset"`` (the
    local connection was reset: a refused or expired resume), or ``"error: …"``.
    """

    def __init__(self, lab: Lab, ns: str, *, size: int, rate: float, seed: int = 17,
                 port: int = BULK_PORT):
        self.data = payload(size, seed)
        self.sha256 = hashlib.sha256(self.data).hexdigest()
        self.rate = rate
        self.sock = lab.socket(ns, socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.outcomes: list[str] = []
        self.sent: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._send, args=(conn,), daemon=True).start()

    def _send(self, conn: socket.socket) -> None:
        index = len(self.outcomes)
        self.outcomes.append("sending")
        self.sent.append(0)
        view = memoryview(self.data)
        started = time.monotonic()
        try:
            with conn:
                conn.settimeout(900)  # a held session may block sends for the whole outage
                for offset in range(0, len(view), CHUNK):
                    if self._stop.is_set():
                        raise OSError("server stopped")
                    ahead = started + offset / self.rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
                    conn.sendall(view[offset:offset + CHUNK])
                    self.sent[index] = offset + len(view[offset:offset + CHUNK])
                conn.shutdown(socket.SHUT_WR)
                while conn.recv(65536):  # the peer closes after reading everything
                    pass
            self.outcomes[index] = "complete"
        except ConnectionResetError:
            self.outcomes[index] = "reset"
        except BrokenPipeError:
            self.outcomes[index] = "reset"
        except OSError as exc:
            self.outcomes[index] = f"error: {exc}"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        with contextlib.suppress(OSError):
            self.sock.close()


class Transfer:
    """One download through a real ``tunnel forward DEVICE bulk`` in the internet namespace.

    ``received``/``arrivals`` track progress; after :meth:`wait`, ``sha256`` is the digest of
    what arrived and ``ended`` how the stream ended (``"eof"`` or the error). ``helper``: the
    forward is served by the per-user helper (the engineer's default), else the direct path.
    """

    def __init__(self, tl: TunnelLab, device: str, env: dict | None = None, helper: bool = False):
        self.tl = tl
        argv = [PY, "-m", "tunnel.cli", "forward", device, "bulk", "--local", "127.0.0.1:0",
                "--identity", str(tl.engineer)]
        base = helper_env(tl) if helper else {**os.environ, **tl.fleet.env, "FLEET_HELPER": "off"}
        self.forward = tl.lab.spawn(tl.lab.internet, argv, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    env={**base, **(env or {})})
        self.stderr_lines: list[str] = []
        self._port: int | None = None
        threading.Thread(target=self._read_stderr, daemon=True).start()
        wait_until(lambda: self._port or self.forward.poll() is not None, 20, 0.05, "forward listening")
        if self._port is None:
            raise AssertionError(f"tunnel forward exited: {self.stderr()}")
        self.received = 0
        self.arrivals: list[tuple[float, int]] = []
        self.ended: str | None = None
        self.sha256: str | None = None
        self._hash = hashlib.sha256()
        self.sock = tl.lab.socket(tl.lab.internet, socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(900)
        self.sock.connect(("127.0.0.1", self._port))
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read_stderr(self) -> None:
        for raw in iter(self.forward.stderr.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            self.stderr_lines.append(line)
            m = re.match(r"forwarding [\d.]+:(\d+) ->", line)
            if m and self._port is None:
                self._port = int(m.group(1))

    def stderr(self) -> str:
        return "\n".join(self.stderr_lines)

    def _read(self) -> None:
        try:
            while data := self.sock.recv(256 * 1024):
                self._hash.update(data)
                self.received += len(data)
                self.arrivals.append((time.monotonic(), self.received))
            self.ended = "eof"
        except OSError as exc:
            self.ended = f"{type(exc).__name__}: {exc}"
        self.sha256 = self._hash.hexdigest()
        with contextlib.suppress(OSError):
            self.sock.close()

    def wait_received(self, n: int, timeout: float) -> None:
        wait_until(lambda: self.received >= n or self.ended, timeout, 0.02, f"{n} bytes received")
        if self.received < n:
            raise AssertionError(f"transfer ended after {self.received} bytes: {self.ended}; "
                                 f"forward said: {self.stderr()}")

    def wait(self, timeout: float) -> str | None:
        with contextlib.suppress(AssertionError):
            wait_until(lambda: self.ended, timeout, 0.1, "transfer end")
        return self.ended

    def max_gap(self, since: float, until: float | None = None) -> float:
        until = until or time.monotonic()
        times = [since] + [t for t, _ in self.arrivals if since < t <= until]
        if len(times) < 2:
            return until - since
        return max(b - a for a, b in zip(times, times[1:], strict=False))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        netns.stop_process(self.forward)


# --- devices and the proxy ------------------------------------------------------------------


def add_resume_device(tl: TunnelLab, name: str, uplinks=("wifi", "cellular"), *, proxies=None,
                      satellite_public: bool = False, **agent_settings):
    """Like ``TunnelLab.add_device``, with the device's byte server as service ``bulk``."""
    dev = tl.lab.add_device(name, uplinks=uplinks, satellite_public=satellite_public)
    sshd = dev.start_sshd()
    config = tl.fleet.enroll_device(
        name, {"customer": "acme"}, {"ssh": "127.0.0.1:22", "bulk": f"127.0.0.1:{BULK_PORT}"},
        proxies=proxies or [tl.endpoint(tl.lab.proxy_public)], **agent_settings,
    )
    agent = tl.fleet.start_agent(config, spawn=tl.spawner(dev.ns))
    tl.devices[name] = {"dev": dev, "sshd": sshd, "config": config, "agent": agent}
    tl.wait_online(name)
    return dev, sshd


def proxy_process(tl: TunnelLab) -> subprocess.Popen:
    running = [p for p in tl.fleet.processes
               if p.poll() is None and "proxy" in p.args and "tunnel.cli" in p.args]
    assert len(running) == 1, f"expected one running proxy, found {len(running)}"
    return running[0]


def restart_proxy(tl: TunnelLab, sig: int = signal.SIGTERM, down: float = 0.0) -> float:
    """Stop the proxy with ``sig``, wait ``down`` seconds, start it on the same address/state.

    Returns the time (monotonic) the new proxy was listening.
    """
    proc = proxy_process(tl)
    tl.fleet.stop(proc, sig)
    tl.fleet.processes.remove(proc)
    if down:
        time.sleep(down)
    tl.fleet.start_proxy(spawn=tl.spawner(tl.lab.internet), listen=f"0.0.0.0:{PROXY_PORT}")
    return time.monotonic()


def session_ids(tl: TunnelLab, device: str) -> dict[str, list[str]]:
    """Session ids per service from the device's ``session.start`` events, oldest first."""
    out: dict[str, list[str]] = {}
    for e in tl.audit("session.start", device=device):
        out.setdefault(e["fields"].get("service", "?"), []).append(e["fields"].get("session"))
    return out


def resumes(tl: TunnelLab, session: str) -> list[dict]:
    return [e for e in tl.audit("session.resume") if e["fields"].get("session") == session]


def replayed_bytes(event: dict) -> int | None:
    """Bytes replayed (both directions) an audited ``session.resume`` names, if it does."""
    fields = event["fields"]
    numbers = [v for k, v in fields.items() if "replay" in k and isinstance(v, int | float)]
    if not numbers:
        nested = [v for k, v in fields.items() if "replay" in k and isinstance(v, dict)]
        numbers = [x for d in nested for x in d.values() if isinstance(x, int | float)]
    return int(sum(numbers)) if numbers else None


# --- one case: a session and a transfer through a disruption ---------------------------------

#: the download: 32 MiB at 2 MiB/s lasts about 16 s undisturbed
TRANSFER_SIZE = 32 * 1024 * 1024
TRANSFER_RATE = 2 * 1024 * 1024
#: how long after the network is back the session must print again
RESUME_WAIT = 30.0


@dataclass
class CaseRun:
    """What one disruption did to one ssh tick session and one checksummed transfer."""

    name: str
    device: str
    session: SeqTickSession
    transfer: Transfer
    server: ByteServer
    ssh_session: str | None
    bulk_session: str | None
    started: float = 0.0  # when the disruption began
    back: float = 0.0  # when the network (or the proxy) was back
    first_line: float | None = None  # seconds from ``back`` to the first tick
    gap: float = 0.0  # largest interval between ticks around the disruption
    transfer_gap: float = 0.0  # largest interval without transfer bytes around it
    transfer_end: str | None = None
    notes: dict = field(default_factory=dict)
    #: the device's session ids per service once both were open (``tunnel forward`` also makes
    #: a short check session when it starts): a resume must add none
    ids_at_start: dict = field(default_factory=dict)
    #: a second tick session through the helper (``start_case(also_helper=True)``), or None
    helper_session: SeqTickSession | None = None
    #: the server's connection index of the transfer (``tunnel forward``'s preflight came first)
    server_index: int = -1

    @property
    def server_outcome(self) -> str:
        """How the device's local connection of the transfer ended ("sending" while open)."""
        return self.server.outcomes[self.server_index]

    @property
    def helper_ssh_session(self) -> str | None:
        ssh = self.ids_at_start.get("ssh", [])
        return ssh[1] if self.helper_session is not None and len(ssh) > 1 else None

    def sessions(self) -> dict[str, SeqTickSession]:
        """The tick sessions by name ("ssh", and "ssh via the helper" when there is one)."""
        out = {"ssh": self.session}
        if self.helper_session is not None:
            out["ssh via the helper"] = self.helper_session
        return out

    def resumes(self, tl: TunnelLab) -> dict[str, list[dict]]:
        out = {"ssh": resumes(tl, self.ssh_session or "?"), "bulk": resumes(tl, self.bulk_session or "?")}
        if self.helper_session is not None:
            out["ssh via the helper"] = resumes(tl, self.helper_ssh_session or "?")
        return out

    def replayed(self, tl: TunnelLab) -> int | None:
        counts = [replayed_bytes(e) for events in self.resumes(tl).values() for e in events]
        counts = [c for c in counts if c is not None]
        return sum(counts) if counts else None

    def close(self) -> None:
        self.session.close()
        if self.helper_session is not None:
            self.helper_session.close()
        self.transfer.close()
        self.server.close()


def start_case(tl: TunnelLab, name: str, device: str, *, size: int = TRANSFER_SIZE,
               rate: float = TRANSFER_RATE, helper: bool = False, also_helper: bool = False) -> CaseRun:
    """Open the tick session and the transfer to ``device`` (added already), all flowing.

    ``helper``: both through the per-user helper (ssh's ProxyCommand and the helper-served
    ``tunnel forward``); ``also_helper``: a second tick session through it besides the direct
    one (the transfer stays direct)."""
    dev = tl.devices[device]["dev"]
    server = ByteServer(tl.lab, dev.ns, size=size, rate=rate)
    session = seq_tick_session(tl, device, helper=helper)
    second = None
    try:
        if also_helper:
            second = seq_tick_session(tl, device, helper=True)
        transfer = Transfer(tl, device, helper=helper)
        transfer.wait_received(min(size // 8, 2 * 1024 * 1024), 30)
    except BaseException:
        session.close()
        if second is not None:
            second.close()
        server.close()
        raise
    wanted = 2 if also_helper else 1
    ids = wait_until(lambda: (lambda s: s if len(s.get("ssh", ())) >= wanted and s.get("bulk") else None)(
        session_ids(tl, device)), 10, 0.1, "session.start of every session")
    return CaseRun(name, device, session, transfer, server, ids["ssh"][0], ids["bulk"][-1],
                   ids_at_start=ids, helper_session=second, server_index=len(server.outcomes) - 1)


def finish_case(run: CaseRun, transfer_timeout: float = 120.0) -> CaseRun:
    """After the disruption: wait for the first tick, a few seconds more, the transfer's end."""
    with contextlib.suppress(AssertionError):  # a session that died cannot print again
        wait_until(lambda: run.session.first_after(run.back) is not None or not run.session.alive,
                   RESUME_WAIT, 0.02, "a tick after the disruption")
    run.first_line = run.session.first_after(run.back)
    if run.helper_session is not None:
        with contextlib.suppress(AssertionError):
            wait_until(lambda: run.helper_session.first_after(run.back) is not None
                       or not run.helper_session.alive, RESUME_WAIT, 0.02, "a tick via the helper")
        run.notes["helper_first_line"] = run.helper_session.first_after(run.back)
    if run.session.seqs and run.session.alive:
        run.session.wait_seq_past(run.session.seqs[-1] + 20, 10)
    run.transfer_end = run.transfer.wait(transfer_timeout)
    run.gap = run.session.max_gap(run.started - 0.2)
    if not run.session.alive and run.session.arrivals:  # a dead session's gap runs until now
        run.gap = max(run.gap, time.monotonic() - run.session.arrivals[-1])
    if run.helper_session is not None:
        helper = run.helper_session
        run.notes["helper_gap"] = helper.max_gap(run.started - 0.2)
        if not helper.alive and helper.arrivals:  # as above: a dead session's gap runs until now
            run.notes["helper_gap"] = max(run.notes["helper_gap"], time.monotonic() - helper.arrivals[-1])
    run.transfer_gap = run.transfer.max_gap(run.started - 0.2, run.transfer.arrivals[-1][0]
                                            if run.transfer.arrivals else None)
    return run


def report(name: str, **numbers) -> str:
    text = f"{name}: " + ", ".join(f"{k}={v:.3f}s" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in numbers.items())
    print("\n" + text, flush=True)
    return text


def enroll_cli(tl: TunnelLab, *args: str) -> None:
    from enroll.cli import main

    assert main(["--state", str(tl.fleet.state.root), *args]) == 0


def mentions(record: dict, *words: str) -> bool:
    text = json.dumps(record).lower()
    return all(w.lower() in text for w in words)


# --- the disruptions (shared by tests/test_resume_lab.py and bench/cases/migration.py) --------
# Each adds its device (name given), opens the session and the transfer, disrupts, and returns
# the finished CaseRun; ``keep`` receives "device" and "run" as soon as they exist, so the
# caller can clean up when a step fails half-way.


def case_ground_endpoint(tl: TunnelLab, name: str, keep: dict, helper: bool = False) -> CaseRun:
    """cellular -> satellite, whose uplink reaches only the ground-station endpoint."""
    proxies = [tl.endpoint(tl.lab.proxy_public), tl.endpoint(tl.lab.proxy_ground, via=["satellite"])]
    dev, _ = add_resume_device(tl, name, ("cellular", "satellite"), proxies=proxies)
    keep["device"] = name
    title = "cellular -> satellite (ground endpoint only)" + (", ssh via the helper" if helper else "")
    run = keep["run"] = start_case(tl, title, name, helper=helper)
    run.started = time.monotonic()
    dev.use("satellite")
    run.back = time.monotonic()
    return finish_case(run)


def case_proxy_restart(tl: TunnelLab, name: str, keep: dict, sig: int = signal.SIGTERM,
                       helper: bool = False) -> CaseRun:
    """The proxy stopped with ``sig`` and started again on the same address and state."""
    add_resume_device(tl, name, ("wifi",))
    keep["device"] = name
    title = f"proxy restart ({signal.Signals(sig).name})" + (", ssh via the helper" if helper else "")
    run = keep["run"] = start_case(tl, title, name, helper=helper)
    run.started = time.monotonic()
    run.back = restart_proxy(tl, sig)
    finish_case(run)
    # where a kill -9's gap goes: the agent hears nothing from the dead proxy (no close comes)
    # until its liveness window, dead_after x max(probe timeout, 2 RTT), has passed
    silent = [r.get("silent", (r.get("fields") or {}).get("silent")) for r in tl.agent_log(name)
              if str(r.get("msg", "")).startswith("path dead")]
    run.notes["agent_silent_before_reconnect"] = silent[-1] if silent else None
    return run


def case_outage(tl: TunnelLab, name: str, keep: dict, seconds: float = 180.0) -> CaseRun:
    """Every uplink down for ``seconds`` (longer than the idle timeout: a new connection).

    A second ssh session runs as the generated ssh config runs it (the helper, and ssh's own
    keepalive settings), since a long outage is where ssh's keepalive would give up first."""
    dev, _ = add_resume_device(tl, name, ("wifi",))
    keep["device"] = name
    run = keep["run"] = start_case(tl, f"{seconds:g} s without any uplink", name, also_helper=True)
    run.started = time.monotonic()
    dev.outage(seconds)
    run.back = time.monotonic()
    return finish_case(run)


def transport_is(tl: TunnelLab, name: str, transport: str) -> bool:
    return (tl.status(name) or {}).get("transport") == transport


def case_udp_blocked(tl: TunnelLab, name: str, keep: dict) -> CaseRun:
    """UDP blocked mid-session (QUIC -> TCP fallback), then unblocked (back to QUIC).

    ``notes``: ``on_tcp`` (seconds from the agent being on TCP to the first tick, None if none
    came), ``gap_back_to_quic`` (largest tick gap from the unblock on), ``quic_after``.
    """
    dev, _ = add_resume_device(tl, name, ("wifi",), quic_retry="2s")
    keep["device"] = name
    run = keep["run"] = start_case(tl, "UDP blocked (QUIC -> TCP) and unblocked", name)
    run.notes["transport_before"] = (tl.status(name) or {}).get("transport")
    run.started = time.monotonic()
    dev.block_udp("wifi", True)
    wait_until(lambda: transport_is(tl, name, "tcp"), 30, 0.3, f"{name} on TCP")
    run.back = time.monotonic()
    with contextlib.suppress(AssertionError):
        wait_until(lambda: run.session.first_after(run.back) is not None or not run.session.alive,
                   RESUME_WAIT, 0.02, "a tick on TCP")
    run.notes["on_tcp"] = run.session.first_after(run.back)
    time.sleep(2)
    unblocked = time.monotonic()
    run.notes["transfer_ended_before_unblock"] = run.transfer.ended
    dev.block_udp("wifi", False)
    with contextlib.suppress(AssertionError):
        wait_until(lambda: transport_is(tl, name, "quic"), 30, 0.3, f"{name} back on QUIC")
    run.notes["quic_after"] = time.monotonic() - unblocked if transport_is(tl, name, "quic") else None
    finish_case(run)
    run.notes["gap_back_to_quic"] = run.session.max_gap(unblocked - 0.2)
    return run


def case_tcp_uplink_change(tl: TunnelLab, name: str, keep: dict) -> CaseRun:
    """The agent on the TCP fallback (UDP blocked on both uplinks) moves wifi -> cellular."""
    dev, _ = add_resume_device(tl, name, ("wifi", "cellular"))
    keep["device"] = name
    for uplink in ("wifi", "cellular"):
        dev.block_udp(uplink, True)
    wait_until(lambda: transport_is(tl, name, "tcp"), 30, 0.3, f"{name} on TCP")
    run = keep["run"] = start_case(tl, "TCP fallback changing uplink", name)
    run.started = time.monotonic()
    dev.use("cellular")
    run.back = time.monotonic()
    return finish_case(run)


def survived(tl: TunnelLab, run: CaseRun, with_helper: bool = True) -> str | None:
    """Why the case did not survive (None: same session, byte-exact, resume audited);
    ``with_helper=False`` leaves a second session through the helper out."""
    for name, session in run.sessions().items():
        if name != "ssh" and not with_helper:
            continue
        if not session.alive:
            lines = [line for line in session.stderr_lines
                     if line.strip() and not line.startswith("Warning: Permanently added")]
            return f"{name} session ended: {' / '.join(lines[:2]) or '?'}"
        if session.sequence_problems():
            return f"{name} tick sequence: {session.sequence_problems()[:3]}"
    if run.transfer_end != "eof" or run.transfer.sha256 != run.server.sha256:
        return f"transfer: {run.transfer_end}"
    missing = [k for k, v in run.resumes(tl).items() if not v and (with_helper or k in ("ssh", "bulk"))]
    if missing:
        return f"no session.resume audited for {', '.join(missing)}"
    return None
