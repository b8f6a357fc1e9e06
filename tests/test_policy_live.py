"""The proxy's policy snapshot against real processes: a change made with ``enroll`` (another
process, another SQLite connection) acts on the very next dial, not a re-check later, and each
refusal is audited. The attack: use the moment right after a lock, relabel or role change, hoping
the proxy still decides on what it held a second ago.
"""

from __future__ import annotations

from fleet_harness import wait_until

from enroll import admin, users

ROLE = """kind: role
version: v7
metadata: {name: acme-only}
spec:
  allow:
    node_labels: {customer: acme}
    logins: [root]
    services: [echo]
"""


def _denials(fleet, *codes: str) -> list[dict]:
    return [e for e in fleet.audit() if e["type"] == "access.denied" and e["actor"] == "user:tech"
            and e["fields"].get("code") in codes]


def test_changes_act_on_the_next_dial_and_every_refusal_is_audited(fleet, echo):
    config = fleet.enroll_device("robot-1", {"customer": "acme"}, {"echo": f"127.0.0.1:{echo.port}"})
    with fleet.state.registry() as reg:
        users.apply_roles(reg, ROLE)
    tech = fleet.user("tech", ["acme-only"])
    ops = fleet.user("ops", ["admin"])
    fleet.start_proxy()
    fleet.start_agent(config)
    fleet.wait_online(ops, "robot-1")

    def dial(identity=tech):
        return fleet.tunnel("proxy-command", "robot-1", "echo", identity=identity, input=b"ping\n")

    assert dial().stdout == b"ping\n"

    # the user is locked: the next dial is refused, with no second of grace
    with fleet.state.registry() as reg:
        users.lock(reg, "tech", None, "badge lost")
    out = dial()
    assert out.returncode == 1 and b"locked" in out.stderr, out.stderr
    # (refused as it connects: a locked user's connection is not admitted at all)
    wait_until(lambda: _denials(fleet, "locked", "user_locked"), 5, what="user lock refusal audited")
    with fleet.state.registry() as reg:
        users.unlock(reg, "tech")
    assert dial().stdout == b"ping\n"

    # the device moves to another customer: it no longer exists for this engineer
    with fleet.state.registry() as reg:
        admin.relabel(reg, "robot-1", {"customer": "globex"}, [])
    out = dial()
    assert out.returncode == 1 and b"no device" in out.stderr, out.stderr
    assert dial(ops).stdout == b"ping\n"  # the admin still reaches it: nothing else changed
    wait_until(lambda: _denials(fleet, "unknown_device"), 5, what="unknown_device audited")

    # the role is taken away while the device is back in the customer's fleet
    with fleet.state.registry() as reg:
        admin.relabel(reg, "robot-1", {"customer": "acme"}, [])
        users.set_roles(reg, "tech", [])
    out = dial()
    assert out.returncode == 1 and b"no device" in out.stderr, out.stderr

    # a role granted again works at once, and the proxy is still up for everyone
    with fleet.state.registry() as reg:
        users.set_roles(reg, "tech", ["acme-only"])
    assert dial().stdout == b"ping\n"
    assert fleet.processes[0].poll() is None
