"""An agent the proxy will never take again stops; a locked one waits minutes (issue 18).

The decision is a pure function of the close/refusal code (``tunnel.backoff.after_refusal``),
tested by table; the process test decommissions a device under a running agent.
"""

from __future__ import annotations

import datetime as dt
import json

import pytest
from fleet_harness import wait_until

from enroll.cli import main as enroll_main
from tunnel.backoff import LOCKED_WAIT, after_refusal
from tunnel.cli import EXIT_RETIRED
from tunnel.protocol import CLOSE_CODES

NOW = dt.datetime(2026, 12, 2, 8, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize("code, reason, action, delay", [
    ("decommissioned", "decommissioned: device robot-1 is decommissioned", "stop", 0.0),
    ("revoked", "revoked: certificate ab of robot-1 was revoked", "stop", 0.0),
    ("unknown_identity", "device robot-1 is not enrolled", "stop", 0.0),
    ("not_fleet_certificate", "", "stop", 0.0),
    ("wrong_kind", "", "stop", 0.0),
    ("expired", "", "stop", 0.0),
    ("locked", "locked: device robot-1 is locked until None: incident", "wait", LOCKED_WAIT),
    ("locked", "locked: device robot-1 is locked until 2026-12-02T08:00:42+00:00: x", "wait", 42.0),
    ("locked", "locked: device robot-1 is locked until 2026-12-02T08:00:42Z", "wait", 42.0),
    ("locked", "locked: device robot-1 is locked until 2026-12-02T08:00:42.500000Z: x", "wait", 42.5),
    ("locked", "locked: device robot-1 is locked until 2026-12-03T08:00:00+00:00", "wait", LOCKED_WAIT),
    ("locked", "locked: device robot-1 is locked until 2026-12-01T08:00:00+00:00", "wait", 1.0),
    ("locked", "locked until not-a-date", "wait", LOCKED_WAIT),
    ("shutdown", "proxy shutdown", "retry", 0.0),
    ("replaced", "", "retry", 0.0),
    ("renewed", "", "retry", 0.0),
    ("unresponsive", "", "retry", 0.0),
    ("ok", "", "retry", 0.0),
    (None, "transport error", "retry", 0.0),
    ("something-new", "", "retry", 0.0),
])
def test_after_refusal_table(code, reason, action, delay):
    got = after_refusal(code, reason, NOW)
    assert (got.action, got.delay) == (action, delay)
    if action == "stop":
        assert got.why


def test_every_close_code_has_a_decision():
    for name in CLOSE_CODES:
        assert after_refusal(name, "", NOW).action in {"retry", "wait", "stop"}


def _agent_log(config) -> list[dict]:
    lines = (config.parent / "agent.log").read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def test_decommissioned_while_running_agent_exits(fleet):
    """Decommission a device under its running agent: it stops at once with status 5 and says
    why, instead of reconnecting forever; the proxy audited one refusal at most, not a storm."""
    config = fleet.enroll_device("robot-1", {"env": "lab"}, {"ssh": "127.0.0.1:22"})
    fleet.start_proxy()
    agent = fleet.start_agent(config)
    wait_until(lambda: any(r.get("msg") == "proxy accepted" or r.get("msg", "").startswith("connected")
                           for r in _agent_log(config)) or _connected(fleet), 15, what="agent connected")
    assert enroll_main(["--state", str(fleet.state.root), "decommission", "robot-1"]) == 0
    status = agent.wait(timeout=30)
    assert status == EXIT_RETIRED
    stops = [r for r in _agent_log(config) if r["msg"].startswith("stopping: the proxy refused this device")]
    assert len(stops) == 1 and stops[0]["level"] == "error"
    assert stops[0]["code"] in {"decommissioned", "revoked"} and stops[0]["why"]
    connects = [e for e in fleet.audit() if e["type"] == "device.connect"]
    assert len(connects) == 1


def _connected(fleet) -> bool:
    return any(e["type"] == "device.connect" for e in fleet.audit())


def test_unknown_device_agent_exits_at_once(fleet, tmp_path):
    """An identity the proxy refuses at the handshake (revoked before the agent ever ran)."""
    config = fleet.enroll_device("robot-2", {"env": "lab"}, {"ssh": "127.0.0.1:22"})
    assert enroll_main(["--state", str(fleet.state.root), "decommission", "robot-2"]) == 0
    fleet.start_proxy()
    agent = fleet.start_agent(config)
    assert agent.wait(timeout=30) == EXIT_RETIRED
    assert any(r["msg"].startswith("stopping: the proxy refused this device") for r in _agent_log(config))
    denied = [e for e in fleet.audit() if e["type"] == "access.denied"]
    assert 1 <= len(denied) <= len(["quic", "tcp"])  # one attempt (a race may try both transports)


def test_locked_agent_waits_for_the_lock_end_then_comes_back(fleet):
    """A lock with an end: the agent waits until then (not a refusal a second), then is taken."""
    config = fleet.enroll_device("robot-3", {"env": "lab"}, {"ssh": "127.0.0.1:22"})
    fleet.start_proxy()
    agent = fleet.start_agent(config)
    wait_until(lambda: _connected(fleet), 15, what="agent connected")
    assert enroll_main(["--state", str(fleet.state.root), "lock", "robot-3", "--ttl", "4s"]) == 0
    wait_until(lambda: any(r["msg"] == "the device is locked; waiting" for r in _agent_log(config)),
               15, 0.1, "the agent waiting")
    waiting = next(r for r in _agent_log(config) if r["msg"] == "the device is locked; waiting")
    assert 0 < waiting["delay"] <= 4 and "locked until" in waiting["reason"]
    wait_until(lambda: sum(e["type"] == "device.connect" for e in fleet.audit()) == 2, 30, 0.2,
               "the agent back after the lock ended")
    assert agent.poll() is None
    # it waited rather than hammering the proxy: at most one refused reconnect in between
    assert len([e for e in fleet.audit() if e["type"] == "access.denied" and e["device"] == "robot-3"]) <= 1
