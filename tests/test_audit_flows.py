"""Audit events produced by the real flows: enroll commands, the proxy and agents on loopback.

Every event type the issue names is produced here by the code that produces it in production
(not inserted by hand); selector queries see the labels a device had at the time; kill -9 of the
proxy during a burst of sessions loses no session the engineer was told is open.
"""

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import threading

import pytest
from fleet_harness import PY, integrity_ok, wait_until

from enroll import audit
from enroll.cli import main as enroll_main
from enroll.enrollment import enroll
from enroll.request import EnrollError
from tunnel import wire
from tunnel.client import Client, UserIdentity
from tunnel.protocol import read_header

ISSUE_TYPES = {
    "token.create", "device.enroll", "device.enroll.denied", "cert.issue", "device.connect",
    "device.disconnect", "device.migrate", "device.reconnect", "device.relabel",
    "device.decommission", "device.lock", "device.unlock", "user.login", "user.login.failed",
    "session.start", "session.end", "access.denied",
}
# Produced by engineer login: covered by test_tunnel_loopback.py::test_login_with_invite_*.
PENDING = {"user.login", "user.login.failed"}


def ecli(fleet, *args):
    assert enroll_main(["--state", str(fleet.state.root), *map(str, args)]) == 0


def query(fleet, *args) -> list[dict]:
    out = subprocess.run([PY, "-m", "tunnel.cli", "audit", "query", "--state", str(fleet.state.root),
                          "--format", "jsonl", *args], capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def types_of(fleet) -> set[str]:
    return {e["type"] for e in fleet.audit()}


class InProcessAgent:
    """The real Agent in a thread of the test process, so the test can migrate its connection."""

    def __init__(self, config):
        from tunnel import agent_config
        from tunnel.agent import Agent

        self.agent = Agent(agent_config.load(config))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.task = self.loop.create_task(self.agent.run())
        with contextlib.suppress(asyncio.CancelledError, Exception):
            self.loop.run_until_complete(self.task)

    def call(self, coro, timeout=10):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self):
        self.loop.call_soon_threadsafe(self.agent.stop)
        self.thread.join(10)


def test_every_event_type_from_real_flows(fleet, echo, tmp_path):
    services = {"echo": f"127.0.0.1:{echo.port}"}
    config = fleet.enroll_device("robot-1", {"customer": "acme", "site": "dal"}, services)
    with fleet.state.registry() as reg, pytest.raises(EnrollError):
        enroll(fleet.state, reg, {"name": "x"}, "ft1.acme-fleet.0000000000.bogus")
    fleet.start_proxy()
    fleet.start_agent(config)
    ops = fleet.user("ops", ["admin"])
    fleet.wait_online(ops, "robot-1")
    out = fleet.tunnel("proxy-command", "robot-1", "echo", identity=ops, input=b"hello\n")
    assert out.returncode == 0 and out.stdout == b"hello\n"
    assert fleet.tunnel("proxy-command", "robot-1", "kube", identity=ops, input=b"").returncode == 1
    ecli(fleet, "relabel", "robot-1", "fw=2.1")
    # lock cuts the agent (device.disconnect); unlock lets it back (device.reconnect). A locked
    # agent waits minutes, or until the lock's end when the refusal names it: a short --ttl.
    ecli(fleet, "lock", "robot-1", "--message", "incident 42", "--ttl", "10s")
    wait_until(lambda: "device.disconnect" in types_of(fleet), 10, 0.1, "device.disconnect")
    ecli(fleet, "unlock", "robot-1")
    wait_until(lambda: "device.reconnect" in types_of(fleet), 40, 0.2, "device.reconnect")
    # migration: the real agent moves its connection to a new local port
    config2 = fleet.enroll_device("robot-2", {"customer": "acme", "site": "hou"}, services)
    agent2 = InProcessAgent(config2)
    try:
        fleet.wait_online(ops, "robot-2")
        agent2.call(agent2.agent.conn.migrate(("127.0.0.1", 0)))
        agent2.call(agent2.agent.conn.ping(2.0))
        wait_until(lambda: "device.migrate" in types_of(fleet), 10, 0.1, "device.migrate")
    finally:
        agent2.stop()
    ecli(fleet, "decommission", "robot-1")

    events = fleet.audit()
    produced = {e["type"] for e in events}
    assert produced >= ISSUE_TYPES - PENDING, ISSUE_TYPES - PENDING - produced
    assert set(audit.EVENT_TYPES) >= ISSUE_TYPES

    def first(type_, **match):
        return next(e for e in events if e["type"] == type_
                    and all(e["fields"].get(k) == v for k, v in match.items()))

    start = first("session.start", service="echo")
    assert (start["actor"], start["actor_roles"], start["device"]) == ("user:ops", ["admin"], "robot-1")
    assert start["labels"] == {"customer": "acme", "site": "dal", "lifecycle": "active"}
    assert start["fields"]["session"] and start["fields"]["remote"].startswith("127.0.0.1:")
    end = first("session.end", session=start["fields"]["session"])
    assert end["fields"]["bytes_to_device"] == 6 and end["fields"]["bytes_from_device"] == 6
    assert end["fields"]["duration"] >= 0
    denied = first("access.denied", service="kube")
    assert denied["result"] == "denied" and "kube" in denied["reason"]
    assert first("device.connect")["fields"]["remote"].startswith("127.0.0.1:")
    assert first("device.migrate")["device"] == "robot-2"
    assert first("device.relabel")["labels"]["fw"] == "2.1"
    assert first("device.enroll.denied")["result"] == "denied"
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1))
    with fleet.state.registry() as reg:
        assert audit.verify(reg) is None
    # the one-command question from the issue
    hits = query(fleet, "--since", "1d", "--event", "session.start", "customer=acme,site=dal")
    assert [h["session"] for h in hits] == [start["fields"]["session"]]


def test_selector_query_after_relabel_returns_what_was_true_then(fleet, echo):
    config = fleet.enroll_device("robot-1", {"customer": "acme", "site": "dal"},
                                 {"echo": f"127.0.0.1:{echo.port}"})
    fleet.start_proxy()
    fleet.start_agent(config)
    ops = fleet.user("ops", ["admin"])
    fleet.wait_online(ops, "robot-1")
    assert fleet.tunnel("proxy-command", "robot-1", "echo", identity=ops, input=b"a").stdout == b"a"
    wait_until(lambda: "session.end" in types_of(fleet), 10, 0.1, "first session.end")
    ecli(fleet, "relabel", "robot-1", "site=hou")
    assert fleet.tunnel("proxy-command", "robot-1", "echo", identity=ops, input=b"b").stdout == b"b"
    wait_until(lambda: len([e for e in fleet.audit() if e["type"] == "session.end"]) == 2, 10, 0.1,
               "second session.end")
    sessions = [e["fields"]["session"] for e in fleet.audit() if e["type"] == "session.start"]
    dal = query(fleet, "--event", "session.*", "customer=acme,site=dal")
    hou = query(fleet, "--event", "session.*", "site=hou")
    assert {e["session"] for e in dal} == {sessions[0]} and len(dal) == 2
    assert {e["session"] for e in hou} == {sessions[1]} and len(hou) == 2
    assert all(e["labels"]["site"] == "dal" for e in dal)
    # the device is in Houston now, but its Dallas history stays under Dallas
    assert query(fleet, "--device", "robot-1", "site=dal", "--event", "device.connect")


async def _burst(identity: UserIdentity, proxy_pid: int, acked: list[str], kill_after: int) -> None:
    client = await Client.connect(identity)
    killed = asyncio.Event()

    async def one():
        stream = await client.conn.open_stream()
        await stream.write(wire.encode("dial", device="robot-1", service="echo"))
        reply, _ = await read_header(stream, timeout=5.0)
        if reply["ok"]:
            acked.append(reply["session"])
            if len(acked) >= kill_after and not killed.is_set():
                killed.set()
                os.kill(proxy_pid, signal.SIGKILL)
            await stream.write(b"x")
            stream.write_eof()

    async def worker():
        while not killed.is_set():
            try:
                await one()
            except Exception:
                return

    try:
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(8))), 30)
    finally:
        client.close()


def test_kill9_during_session_burst_loses_no_acknowledged_event(fleet, echo):
    config = fleet.enroll_device("robot-1", {"customer": "acme", "site": "dal"},
                                 {"echo": f"127.0.0.1:{echo.port}"})
    proxy = fleet.start_proxy()
    fleet.start_agent(config)
    ops = fleet.user("ops", ["admin"])
    fleet.wait_online(ops, "robot-1")
    acked: list[str] = []
    asyncio.run(_burst(UserIdentity.load(ops), proxy.pid, acked, kill_after=25))
    assert proxy.wait(5) == -signal.SIGKILL
    assert len(acked) >= 25
    with fleet.state.registry() as reg:
        assert integrity_ok(fleet.state)
        assert audit.verify(reg) is None
        started = {e.field("session") for e in audit.events(reg, "session.start")}
    missing = [s for s in acked if s not in started]
    assert not missing, f"{len(missing)} acknowledged sessions have no session.start event"
    # the proxy comes back on the same registry and keeps appending to the same chain
    fleet.start_proxy()
    assert fleet.tunnel("proxy-command", "robot-9", "echo", identity=ops, input=b"").returncode == 1
    with fleet.state.registry() as reg:
        assert audit.events(reg)[-1].type == "access.denied"
        assert audit.verify(reg) is None
