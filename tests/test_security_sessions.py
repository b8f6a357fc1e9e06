"""Issue 13 items 1, 11, 12 and issue 19 item 2, each attacked the way it was found.

- A deny rule bypassed by naming the service by its port (ASCII or Unicode digits).
- An agent killed mid-transfer: its sessions must end at once, not after the 60 s idle timeout.
- A locked registry while a session starts: refuse at once, free the device side, keep pairs.
- SIGTERM and kill -9 of the proxy with sessions open: every session.start gets a session.end.

Pure decisions are tested without sockets; the attacks run against real proxy and agent
processes on loopback.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading

import pytest
import yaml
from fleet_harness import wait_until

from enroll import audit, users
from enroll.state import FleetState
from tunnel import agent_config, sshwire
from tunnel.access import canonical_service, service_table
from tunnel.client import Client, Refusal, UserIdentity
from tunnel.protocol import CLOSE_CODES
from tunnel.proxy import Liveness
from tunnel.transport import TransportError

NO_POSTGRES = """\
kind: role
version: v7
metadata:
  name: all-but-postgres
spec:
  allow:
    node_labels:
      '*': '*'
    logins: ['*']
    services: ['*']
  deny:
    services: [postgres]
"""


# --- pure decisions -------------------------------------------------------------------------------


TABLE = {"ssh": 2222, "postgres": 43783, "echo": 7, "web": 8080, "web-alt": 8080}


@pytest.mark.parametrize("requested, name", [
    ("postgres", "postgres"),
    ("43783", "postgres"),       # a port becomes the one listed name on it
    ("2222", "ssh"),             # ssh on a port other than 22 is still ssh
    ("echo", "echo"),
])
def test_canonical_service_resolves_ports_to_names(requested, name):
    got = canonical_service(requested, TABLE, "robot-1")
    assert got.ok and got.name == name


@pytest.mark.parametrize("requested, code", [
    ("\uff14\uff13\uff17\uff18\uff13", "bad_service"),   # fullwidth 43783
    ("\u0664\u0663\u0667\u0668\u0663", "bad_service"),   # Arabic-Indic 43783
    ("\u096a\u0969\u096d\u096e\u0969", "bad_service"),   # Devanagari 43783
    ("4378\u0663", "bad_service"),                        # mixed scripts
    ("\u00b2\u00b2", "bad_service"),                      # superscript digits
    ("Postgres", "bad_service"),                          # case variant
    ("\uff50\uff4f\uff53\uff54\uff47\uff52\uff45\uff53", "bad_service"),  # fullwidth letters
    ("postgres\n", "bad_service"),
    (" 43783", "bad_service"),
    ("+43783", "bad_service"),
    ("", "bad_service"),
    ("8080", "bad_service"),      # two listed services on one port: name one
    ("5432", "unknown_service"),  # no listed service on that port
    ("0", "unknown_service"),
    ("99999", "unknown_service"),
    ("kube", "unknown_service"),
])
def test_canonical_service_refuses_every_other_spelling(requested, code):
    got = canonical_service(requested, TABLE, "robot-1")
    assert not got.ok and got.code == code, got
    assert got.name in (None, requested)


def test_canonical_service_without_a_reported_table():
    assert canonical_service("ssh", None, "robot-1").ok  # an older agent still checks the name
    got = canonical_service("22", None, "robot-1")
    assert got.code == "bad_service" and "name the service" in got.reason


def test_service_table_from_a_hello_keeps_only_well_formed_entries():
    reported = {"ssh": 22, "Postgres": 5432, "x": "80", "web": 0, "ok.svc-1": 65535, "b": True}
    assert service_table(reported) == {"ssh": 22, "ok.svc-1": 65535}
    assert service_table(["ssh"]) == {}


def test_agent_config_serves_exact_names_and_refuses_odd_ones(tmp_path):
    base = {"device_id": "robot-1", "fleet": "f", "identity": {"cert": "c", "key": "k", "ca": "a"},
            "proxies": [{"address": "127.0.0.1:443"}]}
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({**base, "services": {"ssh": "127.0.0.1:2222", "postgres": "127.0.0.1:43783"}}))
    config = agent_config.load(path)
    assert config.service_for("postgres") == ("postgres", ("127.0.0.1", 43783))
    assert config.service_for("43783") is None and config.service_for("\uff14\uff13\uff17\uff18\uff13") is None
    assert config.service_ports() == {"ssh": 2222, "postgres": 43783}
    for services, fragment in (({"Postgres": "127.0.0.1:1"}, "services.Postgres: a service name is"),
                               ({"22": "127.0.0.1:22"}, "services.22"),
                               ({"pg": "127.0.0.1:\uff15\uff14"}, "services.pg: expected HOST:PORT"),
                               ({f"s{i}": "127.0.0.1:1" for i in range(33)}, "at most 32")):
        path.write_text(yaml.safe_dump({**base, "services": services}))
        with pytest.raises(agent_config.ConfigError, match=fragment):
            agent_config.load(path)


def test_the_largest_service_table_fits_in_a_hello():
    from tunnel import wire

    services = {f"s{i:02d}" + "x" * 60: 65535 for i in range(agent_config.MAX_SERVICES)}
    assert all(agent_config.valid_service_name(n) for n in services)
    args = {"uplink": "satellite0", "endpoint": "proxy.example.com:443", "transport": "quic",
            "migrations": 10**6, "reconnects": 10**6, "services": services,
            "reconnect": "x" * 400, "outage": 12345.678, "tls_interception": "y" * 600}
    assert len(wire.encode("request", op="hello", args=args)) <= wire.MAX_PAYLOAD + 4


def test_session_end_is_written_only_behind_its_committed_start(tmp_path):
    from tunnel.proxy import Session

    state = FleetState.create(tmp_path / "s", fleet="f", proxy_name="p", proxy_ips=[])
    common = dict(actor="user:al", device="robot-1", service="ssh")

    def session(sid):
        return Session(sid, None, "robot-1", "ssh", None, (), common={**common, "session": sid})

    with state.registry() as reg:
        committed, rolled_back, never = session("a"), session("b"), session("c")
        with reg.write() as db:
            committed.write_start(db)
        with pytest.raises(RuntimeError), reg.write() as db:  # e.g. the commit failed: disk full
            rolled_back.write_start(db)
            raise RuntimeError("disk full")
        with reg.write() as db:
            audit.append(db, "session.start", **{**common, "session": "other"})  # takes b's seq
            assert rolled_back.write_end(reason="x")(db) is None
            assert never.write_end(reason="x")(db) is None
            assert committed.write_end(reason="done")(db) is not None
        ends = audit.events(reg, "session.end")
        assert [e.field("session") for e in ends] == ["a"] and ends[0].reason == "done"
        assert audit.verify(reg) is None


class ShortBusyState(FleetState):
    """A fleet state whose registry connections give up on a lock after 0.1 s, not 30 s."""

    def registry(self):
        from enroll.registry import Registry

        return Registry(self.registry_path, timeout=0.1)


def test_registry_writer_retries_a_locked_registry_instead_of_dropping_events(tmp_path):
    from tunnel.registry_writer import RegistryWriter

    FleetState.create(tmp_path / "s", fleet="f", proxy_name="p", proxy_ips=[])
    state = ShortBusyState(tmp_path / "s")

    async def scenario():
        writer = RegistryWriter(state)
        locker = sqlite3.connect(state.registry_path, timeout=5, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            queued = writer.submit(lambda db: audit.append(db, "access.denied", actor="user:x", reason="r"))
            await asyncio.sleep(1.0)  # about ten busy timeouts: the write must still be pending
            assert not queued.done()
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        seq = await asyncio.wait_for(queued, 10)
        # closing while locked gives up (one more busy timeout) instead of hanging
        locker = sqlite3.connect(state.registry_path, timeout=5, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            late = writer.submit(lambda db: audit.append(db, "access.denied", actor="user:y", reason="r"))
            await asyncio.sleep(0.3)
            await asyncio.wait_for(writer.close(), 10)
            with pytest.raises(sqlite3.OperationalError):
                await late
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        return seq

    seq = asyncio.run(scenario())
    with state.registry() as reg:
        assert [e.seq for e in audit.events(reg, "access.denied")] == [seq]


def test_liveness_needs_consecutive_silent_misses():
    live = Liveness(dead_after=3)
    assert not live.unanswered(False) and not live.unanswered(False)
    assert not live.unanswered(True)        # data arrived meanwhile: not a miss
    assert not live.unanswered(False) and not live.unanswered(False)
    live.answered()
    assert not live.unanswered(False) and not live.unanswered(False)
    assert live.unanswered(False)


def test_close_open_sessions_pairs_every_start(tmp_path):
    state = FleetState.create(tmp_path / "s", fleet="f", proxy_name="p", proxy_ips=[])
    with state.registry() as reg:
        with reg.write() as db:
            for sid in ("a", "b", "c"):
                audit.append(db, "session.start", actor="user:al", actor_roles=["r"], device="robot-1",
                             labels={"customer": "acme"}, service="ssh", session=sid, remote="1.2.3.4:5")
            audit.append(db, "session.end", actor="user:al", device="robot-1", session="b", reason="")
        with reg.write() as db:
            assert audit.close_open_sessions(db, "proxy restarted") == ["a", "c"]
        with reg.write() as db:
            assert audit.close_open_sessions(db, "proxy restarted") == []
        ends = {e.field("session"): e for e in audit.events(reg, "session.end")}
        assert set(ends) == {"a", "b", "c"}
        a = ends["a"]
        assert (a.reason, a.result, a.actor, a.actor_roles, a.device) == \
            ("proxy restarted", "error", "user:al", ("r",), "robot-1")
        assert a.labels == {"customer": "acme"} and a.field("service") == "ssh"
        assert audit.verify(reg) is None


# --- helpers for the process tests ---------------------------------------------------------------


class CountingEcho:
    """An echo service that knows how many connections are open (the device side of sessions)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.open = 0
        self.accepted = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.open += 1
                self.accepted += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn):
        try:
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self.open -= 1

    def close(self):
        self.sock.close()


@pytest.fixture
def counting_echo():
    server = CountingEcho()
    yield server
    server.close()


def _verify_cli(fleet) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunnel.cli", "audit", "verify", "--state", str(fleet.state.root)],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **fleet.env})


def _pairs(fleet) -> tuple[dict, dict]:
    events = fleet.audit()
    starts = {e["fields"]["session"]: e for e in events if e["type"] == "session.start"}
    ends = {e["fields"]["session"]: e for e in events if e["type"] == "session.end"}
    return starts, ends


async def _open_sessions(identity, n: int, service: str = "echo"):
    """n echo sessions on robot-1 through one client connection, each proven open by a byte."""
    client = await Client.connect(identity)
    streams = []
    for i in range(n):
        stream, rest = await client.dial("robot-1", service)
        await stream.write(bytes([i]))
        got = rest
        while not got:
            got = await asyncio.wait_for(stream.read(10), 10)
        assert got == bytes([i])
        streams.append(stream)
    return client, streams


# --- item 1: a deny rule bypassed by a port number -------------------------------------------------


def test_deny_cannot_be_bypassed_by_port_number(fleet, echo, counting_echo):
    """The attack as found: role '*' with deny postgres; dial postgres's port in ASCII and in
    Unicode digits. Every spelling is refused and audited under the canonical name; a port that
    maps to an allowed service works, audited by its name; ssh on 2222 is reached as 2222."""
    pg = counting_echo  # stands in for postgres: it must never see a connection
    config = fleet.enroll_device("robot-1", {"customer": "acme"},
                                 {"postgres": f"127.0.0.1:{pg.port}", "ssh": f"127.0.0.1:{echo.port}"})
    with fleet.state.registry() as reg:
        users.apply_roles(reg, NO_POSTGRES)
    fleet.start_proxy()
    fleet.start_agent(config)
    eve = fleet.user("eve", ["all-but-postgres"])
    fleet.wait_online(eve, "robot-1")

    ascii_port = str(pg.port)
    spellings = {
        "name": "postgres",
        "ascii port": ascii_port,
        "fullwidth": ascii_port.translate({ord(d): 0xFF10 + int(d) for d in "0123456789"}),
        "arabic-indic": ascii_port.translate({ord(d): 0x0660 + int(d) for d in "0123456789"}),
        "devanagari": ascii_port.translate({ord(d): 0x0966 + int(d) for d in "0123456789"}),
        "bengali tail": ascii_port[:-1] + chr(0x09E6 + int(ascii_port[-1])),
        "case": "Postgres",
    }
    for what, spelling in spellings.items():
        out = fleet.tunnel("proxy-command", "robot-1", spelling, identity=eve, input=b"SELECT 1\n")
        assert out.returncode == 1, (what, out.stdout, out.stderr)
        # stdout carries only the refusal, as an SSH disconnect for ssh (issue 15), nothing else
        payload, rest = sshwire.decode_packet(out.stdout.removeprefix(sshwire.IDENTIFICATION))
        assert rest == b"" and sshwire.decode_disconnect(payload)[0] == sshwire.BY_APPLICATION
    assert pg.accepted == 0, "the denied service saw a connection"

    denied = [e for e in fleet.audit() if e["type"] == "access.denied" and e["fields"].get("stage") == "dial"]
    assert len(denied) == len(spellings)
    by_requested = {e["fields"].get("requested", e["fields"].get("service")): e for e in denied}
    # ASCII port: refused by the deny rule itself, audited as postgres (requested= the raw string)
    port_event = by_requested[ascii_port]
    assert port_event["fields"]["service"] == "postgres" and port_event["fields"]["code"] == "forbidden"
    assert by_requested["postgres"]["fields"]["code"] == "forbidden"
    # Unicode digits and case variants name nothing: refused as not a service, never resolved
    for what in ("fullwidth", "arabic-indic", "devanagari", "bengali tail", "case"):
        event = by_requested[spellings[what]]
        assert event["fields"]["code"] == "bad_service" and "service" not in event["fields"], (what, event)
    assert not [e for e in fleet.audit() if e["type"] == "session.start"]
    # a query for postgres finds both the name and the port attempt
    assert sum(e["fields"].get("service") == "postgres" for e in denied) == 2

    # a port that maps to an allowed service works, audited under its name: ssh on a non-22 port
    out = fleet.tunnel("proxy-command", "robot-1", str(echo.port), identity=eve, input=b"hi\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"hi\n"
    start = next(e for e in fleet.audit() if e["type"] == "session.start")
    assert start["fields"]["service"] == "ssh" and start["fields"]["requested"] == str(echo.port)
    # and 22 (ssh's %p) still means ssh
    out = fleet.tunnel("proxy-command", "robot-1", "22", identity=eve, input=b"again\n")
    assert out.returncode == 0 and out.stdout == b"again\n", out.stderr
    assert _verify_cli(fleet).returncode == 0


# --- item 11: a dead agent's sessions end within seconds -------------------------------------------


@pytest.mark.parametrize("transport, sig", [("quic", signal.SIGKILL), ("tcp", signal.SIGSTOP)],
                         ids=["quic-kill9", "tcp-frozen"])
def test_agent_kill9_mid_transfer_ends_sessions_with_an_error(fleet, counting_echo, transport, sig):
    """kill -9 on QUIC (nothing more arrives); on TCP a frozen agent (SIGSTOP), whose kernel
    keeps the connection open and ACKs, so only an unanswered PING can tell."""
    config = fleet.enroll_device("robot-1", {"customer": "acme"}, {"echo": f"127.0.0.1:{counting_echo.port}"},
                                 transport=transport)
    fleet.start_proxy()
    agent = fleet.start_agent(config)
    ops = fleet.user("ops", ["admin"])
    fleet.wait_online(ops, "robot-1")

    async def attack():
        client = await Client.connect(UserIdentity.load(ops))
        stream, rest = await client.dial("robot-1", "echo")
        received = len(rest)
        chunk = os.urandom(16384)

        async def pump():
            while True:
                await stream.write(chunk)

        pumping = asyncio.create_task(pump())
        try:
            while received < 2_000_000:  # mid-transfer: data flows both ways
                data = await asyncio.wait_for(stream.read(65536), 10)
                assert data, "the echo ended early"
                received += len(data)
            agent.send_signal(sig)
            # "well before the 60 s idle timeout": the stream must end with an error, not EOF
            async with asyncio.timeout(30):
                with pytest.raises(TransportError) as caught:
                    while True:
                        if not await stream.read(65536):
                            raise AssertionError("a clean end of stream after the agent died")
            return caught.value
        finally:
            pumping.cancel()
            await asyncio.gather(pumping, return_exceptions=True)
            client.close()

    try:
        error = asyncio.run(attack())
    finally:
        if sig == signal.SIGSTOP:
            agent.kill()
    assert agent.wait(5) == -signal.SIGKILL
    assert getattr(error, "wire_code", None) == CLOSE_CODES["unresponsive"], error
    wait_until(lambda: not fleet.online(ops, "robot-1"), 10, 0.2, "robot-1 listed offline")
    end = wait_until(lambda: [e for e in fleet.audit() if e["type"] == "session.end"], 10, 0.1, "session.end")[0]
    assert end["result"] == "error" and "robot-1 stopped answering" in end["reason"], end
    assert end["fields"]["bytes_to_device"] >= 2_000_000
    gone = wait_until(lambda: [e for e in fleet.audit() if e["type"] == "device.disconnect"], 10, 0.1,
                      "device.disconnect")[0]
    assert "stopped answering" in gone["reason"]


# --- item 12: a session.start that cannot be written ------------------------------------------------


def test_locked_registry_refuses_at_once_and_frees_the_device_side(fleet, counting_echo):
    config = fleet.enroll_device("robot-1", {"customer": "acme"}, {"echo": f"127.0.0.1:{counting_echo.port}"})
    fleet.start_proxy()
    fleet.start_agent(config)
    ops = fleet.user("ops", ["admin"])
    fleet.wait_online(ops, "robot-1")
    identity = UserIdentity.load(ops)

    async def dial_all(n):
        client = await Client.connect(identity)
        try:
            results = await asyncio.gather(*(client.dial("robot-1", "echo") for _ in range(n)),
                                           return_exceptions=True)
        finally:
            client.close()
        return results

    locker = sqlite3.connect(fleet.state.registry_path, timeout=10, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # another process holds the registry
    try:
        results = asyncio.run(dial_all(3))
        for r in results:
            assert isinstance(r, Refusal) and r.code == "audit_unavailable", r
            assert "audit log" in str(r) and "nothing was opened" in str(r)
        # the device-side connections were reset, not left counting against the agent's limit
        wait_until(lambda: counting_echo.open == 0, 10, 0.1, "device-side connections closed")
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    # the starts were written once the registry was free; each has its end behind it
    wait_until(lambda: len(_pairs(fleet)[1]) == 3, 40, 0.2, "session.end for each late start")
    starts, ends = _pairs(fleet)
    assert set(starts) == set(ends) and len(starts) == 3
    for sid, end in ends.items():
        assert end["seq"] > starts[sid]["seq"] and end["result"] == "error"
        assert "audit log was unavailable" in end["reason"]
    refusals = [e for e in fleet.audit() if e["type"] == "access.denied" and e["fields"].get("stage") == "audit"]
    assert len(refusals) == 3 and all(e["fields"]["code"] == "audit_unavailable" for e in refusals)
    # and the proxy serves normally again
    out = fleet.tunnel("proxy-command", "robot-1", "echo", identity=ops, input=b"ok")
    assert out.returncode == 0 and out.stdout == b"ok", out.stderr
    assert _verify_cli(fleet).returncode == 0


# --- issue 19 item 2: every start has an end, across SIGTERM and kill -9 ---------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill9"])
def test_proxy_stop_leaves_no_session_open_in_the_audit(fleet, echo, sig):
    config = fleet.enroll_device("robot-1", {"customer": "acme"}, {"echo": f"127.0.0.1:{echo.port}"})
    proxy = fleet.start_proxy()
    fleet.start_agent(config)
    ops = fleet.user("ops", ["admin"])
    fleet.wait_online(ops, "robot-1")

    async def open_then_stop():
        client, streams = await _open_sessions(UserIdentity.load(ops), 4)
        try:
            proxy.send_signal(sig)
            await asyncio.to_thread(proxy.wait, 10)
            if sig == signal.SIGKILL:
                return []  # nobody is left to say anything; the client's idle timeout ends them

            async def outcome(stream):
                try:
                    async with asyncio.timeout(10):
                        return await stream.read(10)
                except (TransportError, TimeoutError) as exc:
                    return exc

            return await asyncio.gather(*(outcome(s) for s in streams))
        finally:
            client.close()

    outcomes = asyncio.run(open_then_stop())
    assert b"" not in outcomes, "a cut session looked like a clean end"
    starts, ends = _pairs(fleet)
    assert len(starts) == 4
    if sig == signal.SIGTERM:
        assert proxy.returncode == 0
        assert set(ends) == set(starts)
        assert all(e["reason"] == "proxy shutdown" and e["result"] == "error" for e in ends.values())
        assert all(e["fields"].get("duration") is not None for e in ends.values())  # ended by the session
    else:
        assert proxy.returncode == -signal.SIGKILL and not ends
        fleet.start_proxy()  # start-up closes what the crash left open
        starts, ends = _pairs(fleet)
        assert set(ends) == set(starts)
        assert all(e["reason"] == "proxy restarted" for e in ends.values())
        for sid, end in ends.items():
            assert (end["actor"], end["device"], end["fields"]["service"]) == \
                (starts[sid]["actor"], "robot-1", "echo")
    verified = _verify_cli(fleet)
    assert verified.returncode == 0 and "audit chain intact" in verified.stdout, verified.stderr
