"""Resumable sessions wired through engineer, proxy and agent (issue 17).

First the decisions without sockets: the agent's resume checks, the proxy's held-session policy
check, the registry-only audit pairing (detach, resume, "not resumed" after the hold, recovery
after a restart) on a real registry. Then loopback runs of real processes (proxy, agent,
``tunnel forward``, ``tunnel proxy-command`` under real ``ssh`` against a real sshd): a proxy
restart mid-transfer (SIGTERM and kill -9) continues the same session byte-exactly; an agent
killed cannot resume and the engineer sees a cut within the hold time; forged, foreign,
out-of-buffer and late resumes are refused with their code, audited, and leave the real session
unharmed; a lock issued during the outage ends the session at both ends with its reason.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import getpass
import hashlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from fleet_harness import PY, wait_until

from enroll import audit
from enroll.registry import Device, iso
from enroll.roles import ADMIN_ROLE_YAML, parse_roles
from enroll.session_log import end_if_not_resumed, find_resumable, recover_open_sessions
from enroll.snapshot import PolicySnapshot, UserPolicy
from enroll.state import FleetState
from tunnel.agent_config import ConfigError, _hold, _size
from tunnel.agent_sessions import HeldSession, resume_refusal
from tunnel.client import Client, ProxyLink, Refusal, ResumableSession, UserIdentity
from tunnel.proxy_resume import held_denials, replayed
from tunnel.resume import new_secret, secret_digest
from tunnel.splice import SocketEnds

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)

# --- the agent's checks on a resume open ---------------------------------------------------------


def _held(secret: str, identity: str = "user:alice") -> HeldSession:
    return HeldSession("s1", secret_digest(secret), identity, "ssh", None, ends=None)  # type: ignore[arg-type]  # the checks never touch the ends


def test_resume_refusal_codes():
    secret = new_secret()
    held = _held(secret)
    assert resume_refusal(held, secret, "user:alice") is None
    assert resume_refusal(None, secret, "user:alice").code == "resume_unknown"
    assert resume_refusal(held, new_secret(), "user:alice").code == "resume_secret"  # forged
    assert resume_refusal(held, None, "user:alice").code == "resume_secret"
    assert resume_refusal(held, secret[:-1] + "A", "user:alice").code == "resume_secret"
    # the right secret in another user's hands (the proxy authenticated mallory)
    assert resume_refusal(held, secret, "user:mallory").code == "resume_identity"
    held.ended = "hold time"
    assert resume_refusal(held, secret, "user:alice").code == "resume_unknown"


# --- agent config knobs ------------------------------------------------------------------------


def test_agent_config_resume_knobs():
    assert _hold("10m", "resume_hold") == 600.0 and _hold(0, "resume_hold") == 0.0
    assert _hold("0", "resume_hold") == 0.0 and _hold(2, "resume_hold") == 2.0
    assert _size("4MiB", "resume_buffer") == 4 * 1024 * 1024 and _size(65536, "resume_buffer") == 65536
    for bad in ("-1", "soon", True):
        with pytest.raises(ConfigError, match="resume_hold"):
            _hold(bad, "resume_hold")
    for bad in ("1KiB", "lots", 10, "4 MB", True):
        with pytest.raises(ConfigError, match="resume_buffer"):
            _size(bad, "resume_buffer")


# --- the proxy's held-session check (pure) -----------------------------------------------------

ROLES = parse_roles(ADMIN_ROLE_YAML + """\
---
kind: role
version: v7
metadata: {name: acme-ops}
spec:
  allow:
    node_labels: {customer: acme}
    logins: [root]
    services: [ssh]
""")


def _device(id_: str, *, locked_until: str | None = None, **labels: str) -> Device:
    return Device(id_, {"lifecycle": "active", **labels}, "d1", iso(NOW), None, locked_until,
                  "incident 42" if locked_until else None)


def test_held_denials_say_why_a_held_session_may_not_resume():
    later = iso(NOW + dt.timedelta(hours=1))
    snap = PolicySnapshot.build(
        devices=[_device("r1", customer="acme"), _device("r2", customer="globex"),
                 _device("r3", customer="acme", locked_until=later)],
        users=[UserPolicy("alice", ("acme-ops",)), UserPolicy("dave", ("acme-ops",), later, "left")],
        roles=ROLES)
    held = [
        {"session": "ok", "identity": "user:alice", "service": "ssh"},
        {"session": "locked-user", "identity": "user:dave", "service": "ssh"},
        {"session": "bad-service", "identity": "user:alice", "service": "postgres"},
        {"session": "no-user-record", "identity": "user:zed", "service": "ssh"},
        "junk", {"session": 5},
    ]
    assert held_denials(snap, "r1", held, NOW) == {
        "locked-user": "user dave is locked: left",
        "bad-service": held_denials(snap, "r1", [held[2]], NOW)["bad-service"],
    }
    assert "postgres" in held_denials(snap, "r1", [held[2]], NOW)["bad-service"]
    # relabelled out of alice's reach, locked, gone from the registry
    assert "no longer within alice's reach" in held_denials(snap, "r2", held[:1], NOW)["ok"]
    assert "locked" in held_denials(snap, "r3", held[:1], NOW)["ok"]
    assert "no longer in the registry" in held_denials(snap, "r9", held[:1], NOW)["ok"]
    assert held_denials(snap, "r1", "not a list", NOW) == {}


# --- audit pairing from the registry alone -----------------------------------------------------


@pytest.fixture
def registry(tmp_path):
    state = FleetState.create(tmp_path / "state", fleet="f", proxy_name="proxy.test",
                              proxy_ips=["127.0.0.1"], proxy_port=4433)
    with state.registry() as reg:
        yield reg


def _start(reg, session: str, resumable: bool, actor: str = "user:alice", when=NOW) -> int:
    with reg.write() as db:
        return audit.append(db, "session.start", actor=actor, device="r1", service="ssh", session=session,
                            resumable=True if resumable else None, now=when)


def test_recovery_detaches_resumable_sessions_and_ends_the_others(registry):
    _start(registry, "raw", False)
    seq = _start(registry, "res", True)
    with registry.write() as db:
        ended, detached = recover_open_sessions(db, "proxy restarted")
    assert ended == ["raw"] and [d.session for d in detached] == ["res"] and detached[0].start_seq == seq
    with registry.write() as db:  # a second restart writes no second detach
        assert recover_open_sessions(db, "proxy restarted") == ([], detached)
    kinds = [(e.type, e.fields.get("session")) for e in audit.events(registry)]
    assert kinds.count(("session.detach", "res")) == 1 and ("session.end", "raw") in kinds


def test_sweep_ends_a_detached_session_only_after_the_hold_and_only_if_not_resumed(registry):
    seq = _start(registry, "a", True)
    _start(registry, "b", True)
    with registry.write() as db:
        _, detached = recover_open_sessions(db, "proxy restarted")
    a, b = detached
    assert a.session == "a" and a.start_seq == seq
    soon, late = dt.datetime.now(dt.UTC), dt.datetime.now(dt.UTC) + dt.timedelta(seconds=120)
    with registry.write() as db:
        assert end_if_not_resumed(db, a, 60, soon) == "waiting"
        audit.append(db, "session.resume", actor="user:alice", device="r1", session="b", outage=3.0)
    with registry.write() as db:
        assert end_if_not_resumed(db, a, 60, late) == "ended"
        assert end_if_not_resumed(db, b, 60, late) == "gone"  # resumed meanwhile
        assert end_if_not_resumed(db, a, 60, late) == "gone"  # ended once
    ends = [e for e in audit.events(registry, "session.end")]
    assert [(e.fields["session"], e.reason) for e in ends] == [("a", "not resumed")]
    assert ends[0].actor == "user:alice" and ends[0].fields["service"] == "ssh"


def test_find_resumable_answers_only_for_the_owner_of_a_live_resumable_session(registry):
    _start(registry, "mine", True)
    _start(registry, "raw", False)

    def find(session: str, actor: str, device: str):
        with registry.write() as db:
            return find_resumable(db, session, actor, device)

    found = find("mine", "user:alice", "r1")
    assert found is not None and found.common["service"] == "ssh" and not found.detached
    assert find("mine", "user:mallory", "r1") is None  # another user's
    assert find("mine", "user:alice", "r2") is None  # another device
    assert find("raw", "user:alice", "r1") is None  # never resumable
    assert find("nope", "user:alice", "r1") is None
    with registry.write() as db:
        audit.append(db, "session.end", actor="user:alice", device="r1", session="mine")
    assert find("mine", "user:alice", "r1") is None  # ended


def test_replayed_bytes_from_the_two_headers():
    assert replayed(1000, 400) == 600 and replayed(5, 9) == 0
    assert replayed(None, 3) is None and replayed(True, 0) is None


# --- real processes on loopback ----------------------------------------------------------------

TOTAL = 24 * 1024 * 1024  # bytes the engineer's client sends through the echo service and back
PIECE = 64 * 1024


def _pattern(i: int) -> bytes:
    """Piece i of the transfer: deterministic, and different for every piece."""
    return hashlib.sha256(i.to_bytes(8, "big")).digest() * (PIECE // 32)


class Transfer:
    """A paced, checksummed echo transfer over one local TCP connection, in two threads.

    ``echoed`` grows as bytes come back; ``result`` is (bytes back, sha256 hex, how it ended:
    "fin" | "reset" | "timeout") once the reader is done.
    """

    def __init__(self, port: int, pace: float = 0.01):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sent_digest = hashlib.sha256()
        self.echoed = 0
        self.result: tuple[int, str, str] | None = None
        self.write_error: str | None = None
        self._pace = pace
        self.writer = threading.Thread(target=self._write, daemon=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.writer.start()
        self.reader.start()

    def _write(self) -> None:
        try:
            for i in range(TOTAL // PIECE):
                data = _pattern(i)
                self.sent_digest.update(data)
                self.sock.sendall(data)
                time.sleep(self._pace)
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.write_error = str(exc)

    def _read(self) -> None:
        digest = hashlib.sha256()
        self.sock.settimeout(90)
        how = "fin"
        try:
            while data := self.sock.recv(65536):
                digest.update(data)
                self.echoed += len(data)
        except ConnectionResetError:
            how = "reset"
        except TimeoutError:
            how = "timeout"
        self.result = (self.echoed, digest.hexdigest(), how)

    def wait(self, timeout: float = 120) -> tuple[int, str, str]:
        """(bytes back, their sha256, how it ended). A reset is reported once, to whichever of
        the two threads' calls meets it first: a reset seen by the writer counts too."""
        self.reader.join(timeout)
        assert self.result is not None, f"the transfer did not end ({self.echoed} bytes back)"
        got, digest, how = self.result
        if how == "fin" and self.write_error and "reset" in self.write_error.lower():
            how = "reset"
        return got, digest, how


def _forward(fleet, ops, service: str = "echo", env: dict | None = None) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [PY, "-m", "tunnel.cli", "forward", "robot-1", service, "--no-check", "--identity", str(ops)],
        stderr=subprocess.PIPE, text=True, env={**os.environ, **fleet.env, **(env or {})})
    line = proc.stderr.readline()
    assert line.startswith("forwarding "), line
    return proc, int(line.split()[1].rsplit(":", 1)[1])


def _stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.stderr.read() if proc.stderr else ""


def _sessions(fleet, types=("session.start", "session.detach", "session.resume", "session.end")) -> list[dict]:
    return [e for e in fleet.audit() if e["type"] in types]


PROXY_HOLD = 20  # tunnel proxy --resume-hold in these tests (seconds)


def _start_proxy(fleet) -> subprocess.Popen:
    """``fleet.start_proxy()`` with a short ``--resume-hold``."""
    log = fleet.root / "proxy.log"
    mark = log.stat().st_size if log.exists() else 0
    proc = fleet.start([PY, "-m", "tunnel.cli", "proxy", "--state", str(fleet.state.root), "--listen",
                        fleet.address, "--log-format", "json", "--resume-hold", f"{PROXY_HOLD}s"], log)
    wait_until(lambda: proc.poll() is None and '"listening"' in log.read_text()[mark:], 15, 0.05,
               "proxy listening")
    return proc


@pytest.fixture
def resumable_fleet(fleet, echo):
    """A proxy, one agent (1 s keepalive, so a dead proxy is noticed within seconds) serving the
    echo service, and an admin identity; short hold times where a test needs them."""
    config = fleet.enroll_device("robot-1", {"customer": "acme"}, {"echo": f"127.0.0.1:{echo.port}"},
                                 keepalive="1s", resume_hold="60s")
    proxy = _start_proxy(fleet)
    agent = fleet.start_agent(config)
    ops = fleet.user("ops", ["admin"])
    fleet.wait_online(ops, "robot-1")
    return {"fleet": fleet, "proxy": proxy, "agent": agent, "ops": ops, "config": config}


@pytest.mark.resumable
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_forward_session_continues_across_a_proxy_restart(resumable_fleet, sig):
    fleet, ops = resumable_fleet["fleet"], resumable_fleet["ops"]
    fwd, port = _forward(fleet, ops)
    try:
        transfer = Transfer(port)
        wait_until(lambda: transfer.echoed > 2 * 1024 * 1024, 30, what="the transfer under way")
        resumable_fleet["proxy"].send_signal(sig)
        resumable_fleet["proxy"].wait(10)
        _start_proxy(fleet)
        got, digest, how = transfer.wait()
        assert (got, how) == (TOTAL, "fin"), (got, how, transfer.write_error)
        assert digest == transfer.sent_digest.hexdigest()  # no byte lost, none repeated
        # the ends finish their closing handshake (the last ACKs) after the local FIN
        wait_until(lambda: _sessions(fleet)[-1]["type"] == "session.end", 15, what="the session's end")
    finally:
        err = _stop(fwd)
    assert "resumed after" in err, err
    events = _sessions(fleet)
    ids = {e["fields"]["session"] for e in events}
    assert len(ids) == 1, events  # the same session continued
    kinds = [e["type"] for e in events]
    assert kinds[0] == "session.start" and kinds[-1] == "session.end", kinds
    assert "session.detach" in kinds and "session.resume" in kinds, kinds
    assert events[-1]["result"] == "ok", events[-1]
    resume = next(e for e in events if e["type"] == "session.resume")
    assert resume["fields"]["outage"] >= 0 and resume["fields"]["replayed_to_device"] >= 0
    if sig == signal.SIGTERM:  # a graceful stop detaches the session, never ends it
        detach = next(e for e in events if e["type"] == "session.detach")
        assert detach["reason"] == "proxy shutdown", detach


def _echo_once(reader_writer, payload: bytes):
    reader, writer = reader_writer

    async def run():
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(payload)), 20)

    return run()


@pytest.mark.resumable
def test_bad_resumes_are_refused_audited_and_harmless(resumable_fleet):
    """A forged secret, another user's resume with the right secret, an offset outside the replay
    buffer and a resume after the proxy's hold time: each refused with its code, audited as an
    access.denied at stage resume, and the real session goes on echoing."""
    fleet, ops = resumable_fleet["fleet"], resumable_fleet["ops"]
    mallory = fleet.user("mallory", ["admin"])

    async def run() -> dict[str, str]:
        me = UserIdentity.load(ops)
        link = ProxyLink(me, await Client.connect(me))
        session = await ResumableSession.open(link.client, "robot-1", "echo", None, 60)
        assert session.resumable and session.id
        ours, theirs = socket.socketpair()
        local = SocketEnds(*await asyncio.open_connection(sock=ours))
        app = await asyncio.open_connection(sock=theirs)
        spliced = asyncio.create_task(session.splice(local))
        assert await _echo_once(app, b"before") == b"before"
        secret = session._secret
        attacker = await Client.connect(UserIdentity.load(mallory))
        again = await Client.connect(me)
        tries = {
            "forged": (again, dict(resume_secret=new_secret(), received=0, sent=0, away=1.0)),
            "mallory": (attacker, dict(resume_secret=secret, received=0, sent=0, away=1.0)),
            "offset": (again, dict(resume_secret=secret, received=10**9, sent=6, away=1.0)),
            "late": (again, dict(resume_secret=secret, received=0, sent=6, away=PROXY_HOLD + 5.0)),
        }
        codes = {}
        for name, (client, fields) in tries.items():
            with pytest.raises(Refusal) as refused:
                await client.dial_reply("robot-1", "echo", resume=session.id, **fields)
            codes[name] = refused.value.code
            assert await _echo_once(app, name.encode()) == name.encode()  # unharmed
        app[1].write_eof()
        assert await asyncio.wait_for(app[0].read(), 20) == b""  # the session ends cleanly
        result = await asyncio.wait_for(spliced, 20)
        assert result.error is None
        for client in (attacker, again):
            client.close()
        link.close()
        return codes

    codes = asyncio.run(run())
    assert codes == {"forged": "resume_secret", "mallory": "resume_unknown", "offset": "resume_offset",
                     "late": "resume_expired"}
    denied = [e for e in fleet.audit() if e["type"] == "access.denied" and e["fields"].get("stage") == "resume"]
    assert sorted(e["fields"]["code"] for e in denied) == sorted(codes.values()), denied
    assert {e["actor"] for e in denied} == {"user:ops", "user:mallory"}
    wait_until(lambda: _sessions(fleet)[-1]["type"] == "session.end", 15, what="the session's end")
    kinds = [e["type"] for e in _sessions(fleet)]
    assert kinds == ["session.start", "session.end"], kinds  # no resume, no detach: untouched


@pytest.mark.resumable
def test_agent_killed_cannot_resume_and_the_engineer_sees_a_cut_after_the_hold(resumable_fleet):
    """The device side is gone (kill -9): nothing can resume. The engineer's end holds the
    session for its hold time (FLEET_RESUME_HOLD=3), then resets the local connection with one
    line; the proxy ends the detached session with ``not resumed`` after its own hold."""
    fleet, ops = resumable_fleet["fleet"], resumable_fleet["ops"]
    fwd, port = _forward(fleet, ops, env={"FLEET_RESUME_HOLD": "3"})
    try:
        transfer = Transfer(port)
        wait_until(lambda: transfer.echoed > 1024 * 1024, 30, what="the transfer under way")
        resumable_fleet["agent"].send_signal(signal.SIGKILL)
        got, _, how = transfer.wait(90)
        assert how == "reset" and got < TOTAL, (got, how)
        assert fwd.poll() is None  # forward itself goes on serving
    finally:
        err = _stop(fwd)
    assert "the tunnel was away for 3 s (hold time)" in err, err
    assert "reset the local connection" in err, err
    wait_until(lambda: _sessions(fleet)[-1]["type"] == "session.end", PROXY_HOLD + 30, 0.5,
               what="the proxy's end of the session not resumed")
    events = _sessions(fleet)
    assert [e["type"] for e in events] == ["session.start", "session.detach", "session.end"], events
    assert events[-1]["reason"] == "not resumed"


@pytest.mark.resumable
def test_a_restarted_agent_refuses_the_resume_and_the_session_ends_at_once(resumable_fleet):
    """The agent was killed and came back without the session: its refusal of the resume
    (``resume_unknown``) ends it for good. The engineer's end resets the local connection with
    the device's reason, and the proxy writes ``session.end`` then, not after its hold (a soak
    stopped within the hold found such sessions with a start and no end)."""
    fleet, ops = resumable_fleet["fleet"], resumable_fleet["ops"]
    fwd, port = _forward(fleet, ops, env={"FLEET_RESUME_HOLD": "600"})
    try:
        transfer = Transfer(port)
        wait_until(lambda: transfer.echoed > 1024 * 1024, 30, what="the transfer under way")
        resumable_fleet["agent"].send_signal(signal.SIGKILL)
        resumable_fleet["agent"].wait(10)
        resumable_fleet["agent"] = fleet.start_agent(resumable_fleet["config"])
        got, _, how = transfer.wait(90)
        assert how == "reset" and got < TOTAL, (got, how)
    finally:
        err = _stop(fwd)
    assert "no such session is held on this device" in err, err
    wait_until(lambda: _sessions(fleet)[-1]["type"] == "session.end", 30, 0.2, what="the session's end")
    events = _sessions(fleet)
    assert [e["type"] for e in events] == ["session.start", "session.detach", "session.end"], events
    assert events[-1]["reason"].startswith("not resumed: no such session is held on this device"), events[-1]


@pytest.mark.resumable
@pytest.mark.parametrize("lock,stage", [
    (["lock", "robot-1"], "resume"),
    (["user", "lock", "ops"], "connect"),
], ids=["device-lock", "user-lock"])
def test_a_lock_during_the_outage_stops_the_resume_at_both_ends(resumable_fleet, lock, stage):
    """The proxy is down; meanwhile the device (or the engineer) is locked. When the proxy is
    back, the agent learns it — refused as locked, or told by the proxy's answer to its list of
    held sessions — and ends its held session with the lock's reason; the engineer's resume is
    refused with that reason, printed in one line, and the local connection is reset."""
    from enroll.cli import main as enroll_main

    fleet, ops = resumable_fleet["fleet"], resumable_fleet["ops"]
    fwd, port = _forward(fleet, ops)
    try:
        transfer = Transfer(port)
        wait_until(lambda: transfer.echoed > 1024 * 1024, 30, what="the transfer under way")
        resumable_fleet["proxy"].send_signal(signal.SIGTERM)
        resumable_fleet["proxy"].wait(10)
        assert enroll_main(["--state", str(fleet.state.root), *lock, "--message", "stolen from the depot"]) == 0
        _start_proxy(fleet)
        got, _, how = transfer.wait(90)
        assert how == "reset", (got, how)
    finally:
        err = _stop(fwd)
    assert "could not resume" in err and "stolen from the depot" in err, err
    agent_log = resumable_fleet["config"].parent / "agent.log"

    def agent_ended() -> list[dict]:
        return [json.loads(line) for line in agent_log.read_text().splitlines() if '"session ended"' in line]

    wait_until(agent_ended, 30, 0.2, what="the agent's line for the held session")
    assert "stolen from the depot" in agent_ended()[-1]["reason"], agent_ended()
    # audited: the resume dial refused (device lock), or the engineer's connection (user lock)
    denied = [e for e in fleet.audit() if e["type"] == "access.denied" and e["fields"].get("code") == "locked"
              and "stolen from the depot" in e["reason"] and e["actor"] == "user:ops"]
    assert denied and denied[-1]["fields"].get("stage") == stage, denied



# --- tunnel proxy-command under real ssh -------------------------------------------------------

LINES = 600  # the remote command prints one numbered line every 20 ms (12 s in all)
REMOTE = ("python3 -c \"import sys, time\n"
          f"for i in range({LINES}):\n"
          "    print(i, 'x' * 100, flush=True); time.sleep(0.02)\"")


@pytest.fixture
def ssh_fleet(fleet, tmp_path):
    """A device whose ssh service is a real sshd (key auth for this user), a proxy, an agent."""
    from lab import plan

    port = socket.create_server(("127.0.0.1", 0))
    sshd_port = port.getsockname()[1]
    port.close()
    config = fleet.enroll_device("robot-1", {"customer": "acme"}, {"ssh": f"127.0.0.1:{sshd_port}"},
                                 keepalive="1s", resume_hold="60s")
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    authorized = tmp_path / "authorized_keys"
    authorized.write_text((tmp_path / "id_ed25519.pub").read_text())
    device_dir = config.parent
    sshd_config = device_dir / "sshd_config"
    sshd_config.write_text(plan.sshd_config(port=sshd_port, host_keys=[device_dir / "ssh_host_ed25519_key"],
                                            pid_file=str(device_dir / "sshd.pid"),
                                            authorized_keys=str(authorized)))
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    log = device_dir / "sshd.log"
    sshd = fleet.start(["/usr/sbin/sshd", "-D", "-e", "-f", str(sshd_config)], log)
    wait_until(lambda: "Server listening on" in log.read_text(errors="replace") or sshd.poll() is not None,
               10, 0.02, "sshd listening")
    assert sshd.poll() is None, log.read_text()
    proxy = _start_proxy(fleet)
    fleet.start_agent(config)
    ops = fleet.user("ops", ["admin"])
    fleet.wait_online(ops, "robot-1")
    return {"fleet": fleet, "proxy": proxy, "ops": ops, "key": key}


@pytest.mark.resumable
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_ssh_session_continues_across_a_proxy_restart(ssh_fleet, sig):
    """ssh through ``tunnel proxy-command``: the proxy restarts mid-session, ssh never notices —
    the same session goes on, every line arrives exactly once and in order, ssh exits 0."""
    fleet, ops = ssh_fleet["fleet"], ssh_fleet["ops"]
    proxy_command = f"{PY} -m tunnel.cli proxy-command %h %p --identity {ops}"
    proc = subprocess.Popen(
        ["ssh", "-F", "/dev/null", "-i", str(ssh_fleet["key"]), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
         "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
         "-o", f"ProxyCommand={proxy_command}", "-p", "22", f"{getpass.getuser()}@robot-1", REMOTE],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **fleet.env})
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    wait_until(lambda: len(lines) > 50 or proc.poll() is not None, 60, what="the remote command printing")
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    ssh_fleet["proxy"].send_signal(sig)
    ssh_fleet["proxy"].wait(10)
    _start_proxy(fleet)
    proc.wait(120)
    reader.join(10)
    err = proc.stderr.read() if proc.stderr else ""
    assert proc.returncode == 0, err
    assert lines == [f"{i} {'x' * 100}\n" for i in range(LINES)], (len(lines), err)
    assert "resumed after" in err, err
    wait_until(lambda: _sessions(fleet)[-1]["type"] == "session.end", 30, what="the session's end")
    events = _sessions(fleet)
    assert len({e["fields"]["session"] for e in events}) == 1, events
    assert [e["type"] for e in events][:1] == ["session.start"] and "session.resume" in [e["type"] for e in events]


@pytest.mark.resumable
def test_a_certificate_revoked_mid_session_ends_it_at_the_device_too(resumable_fleet, capsys):
    """The proxy cuts a live session whose engineer's certificate was revoked; the agent saw
    only its stream lost and holds the session. Its next check of held sessions (every second)
    must end it with the reason, resetting the device's local connection — not leave the
    revoked engineer's service connection open for the hold time (60 s here)."""
    from enroll.cli import main as enroll_main

    fleet, ops = resumable_fleet["fleet"], resumable_fleet["ops"]
    fwd, port = _forward(fleet, ops)
    try:
        transfer = Transfer(port)
        wait_until(lambda: transfer.echoed > 1024 * 1024, 30, what="the transfer under way")
        capsys.readouterr()
        assert enroll_main(["--state", str(fleet.state.root), "cert", "ls", "--user", "ops",
                            "--format", "json"]) == 0
        serial = json.loads(capsys.readouterr().out)[0]["serial"]
        assert enroll_main(["--state", str(fleet.state.root), "cert", "revoke", serial,
                            "--message", "laptop lost"]) == 0
        got, _, how = transfer.wait(90)
        assert how == "reset", (got, how)
    finally:
        _stop(fwd)
    agent_log = resumable_fleet["config"].parent / "agent.log"

    def agent_ended() -> list[dict]:
        return [json.loads(line) for line in agent_log.read_text().splitlines() if '"session ended"' in line]

    # well inside the 60 s hold: the proxy told the agent at its next held-session check
    wait_until(agent_ended, 20, 0.2, what="the agent's line for the cut session")
    assert "revoked" in agent_ended()[-1]["reason"], agent_ended()
