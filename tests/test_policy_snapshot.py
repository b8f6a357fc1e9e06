"""Authorization over a policy snapshot: the tenant matrix without a database, and the snapshot's
freshness against a real registry (what changes it, what does not).

The matrix tables are the contract: labels × roles × user and device locks × lifecycle ×
certificate state, each row with the code the proxy answers. They run on snapshots built in
memory (no SQLite, no proxy); the loopback and lab tests prove the same decisions end to end.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json

import pytest

from enroll import audit, snapshot
from enroll.admin import lock, relabel
from enroll.certs import Identity
from enroll.registry import Device, Registry, iso
from enroll.roles import ADMIN_ROLE_YAML, parse_roles
from enroll.snapshot import PolicySnapshot, UserPolicy
from tunnel import access
from tunnel.admission import Denied, Peer, admit, recheck_agent, seen_by
from tunnel.live_policy import LivePolicy

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
LATER = iso(NOW + dt.timedelta(hours=1))
EARLIER = iso(NOW - dt.timedelta(hours=1))

ROLES = parse_roles(ADMIN_ROLE_YAML + """\
---
kind: role
version: v7
metadata: {name: acme-ops}
spec:
  allow:
    node_labels: {customer: acme}
    logins: [root, ops]
    services: [ssh, postgres]
  deny:
    node_labels: {env: prod}
    services: [postgres]
---
kind: role
version: v7
metadata: {name: globex-ops}
spec:
  allow:
    node_labels: {customer: globex}
    logins: [ops]
---
kind: role
version: v7
metadata: {name: no-dal}
spec:
  deny:
    node_labels: {site: dal}
""")


def device(id_: str, *, locked_until: str | None = None, **labels: str) -> Device:
    return Device(id_, {"lifecycle": "active", **labels}, f"d{len(id_)}", EARLIER, None,
                  locked_until, "incident 42" if locked_until else None)


DEVICES = [
    device("acme-1", customer="acme", site="hou"),
    device("acme-prod", customer="acme", env="prod"),
    device("acme-dal", customer="acme", site="dal"),
    device("acme-maint", customer="acme", lifecycle="maintenance"),
    device("acme-gone", customer="acme", lifecycle="decommissioned"),
    device("acme-locked", customer="acme", locked_until=LATER),
    device("acme-was-locked", customer="acme", locked_until=EARLIER),
    device("globex-1", customer="globex"),
]
USERS = [
    UserPolicy("alice", ("acme-ops",)),
    UserPolicy("bob", ("globex-ops",)),
    UserPolicy("carol", ("admin",)),
    UserPolicy("dave", ("acme-ops",), locked_until=LATER, lock_message="left the team"),
    UserPolicy("erin", ("acme-ops",), locked_until=EARLIER),
    UserPolicy("gina", ("acme-ops", "no-dal")),
    UserPolicy("hank", ("deleted-role",)),
]
SERIALS = {"alice": 0xA1, "bob": 0xB0, "carol": 0xC0, "dave": 0xD0, "erin": 0xE0, "gina": 0x61,
           "hank": 0x4A, "ivan": 0x1F, "mallory": 0x3A}
SNAP = PolicySnapshot.build(devices=DEVICES, users=USERS, roles=ROLES,
                            known_serials=[format(s, "x") for s in SERIALS.values()],
                            revoked_serials=["3a"])


def user(name: str, *, roles: tuple[str, ...] = (), expires: dt.datetime | None = None) -> Peer:
    return Peer(Identity("user", "f", name, SERIALS[name], expires or NOW + dt.timedelta(hours=8),
                         roles=roles))


@pytest.mark.parametrize(("who", "device_id", "service", "login", "code"), [
    # tenants see only their own devices; another tenant's device does not exist for them
    ("alice", "acme-1", "ssh", "root", "ok"),
    ("alice", "acme-1", "postgres", None, "ok"),
    ("alice", "globex-1", "ssh", "ops", "unknown_device"),
    ("bob", "globex-1", "ssh", "ops", "ok"),
    ("bob", "acme-1", "ssh", "ops", "unknown_device"),
    ("bob", "globex-1", "ssh", "root", "forbidden"),          # login not granted
    ("bob", "globex-1", "postgres", None, "forbidden"),       # services default to [ssh]
    ("alice", "nope", "ssh", "root", "unknown_device"),       # same answer as another tenant's
    # deny wins: over the allowing role's own services, and across roles
    ("alice", "acme-prod", "postgres", None, "forbidden"),
    ("alice", "acme-prod", "ssh", "root", "ok"),
    ("gina", "acme-dal", "ssh", "root", "unknown_device"),    # a deny on labels only hides it
    ("gina", "acme-1", "ssh", "root", "ok"),
    # lifecycle and device locks
    ("alice", "acme-maint", "ssh", "root", "ok"),
    ("alice", "acme-gone", "ssh", "root", "decommissioned"),
    ("carol", "acme-gone", "ssh", "root", "unknown_device"),  # admin denies decommissioned
    ("alice", "acme-locked", "ssh", "root", "locked"),
    ("carol", "acme-locked", "ssh", "root", "locked"),
    ("alice", "acme-was-locked", "ssh", "root", "ok"),        # a lock that ran out
    # user locks, removed roles, revoked certificates
    ("dave", "acme-1", "ssh", "root", "user_locked"),
    ("erin", "acme-1", "ssh", "root", "ok"),
    ("hank", "acme-1", "ssh", "root", "unknown_device"),      # a removed role grants nothing
    ("mallory", "acme-1", "ssh", "root", "revoked"),
    ("carol", "globex-1", "kubernetes", None, "ok"),
])
def test_tenant_matrix(who, device_id, service, login, code):
    decision = access.decide(SNAP, user(who), device_id, service, login, now=NOW)
    assert decision.code == code, decision
    assert decision.allowed == (code == "ok")


def test_user_without_record_holds_the_roles_in_its_certificate():
    ivan = user("ivan", roles=("globex-ops",))
    assert access.decide(SNAP, ivan, "globex-1", "ssh", "ops", now=NOW).allowed
    assert access.decide(SNAP, ivan, "acme-1", "ssh", "root", now=NOW).code == "unknown_device"
    # a registered user's record wins over the roles in the certificate
    alice = user("alice", roles=("admin",))
    assert access.decide(SNAP, alice, "globex-1", "ssh", "ops", now=NOW).code == "unknown_device"


def test_expired_certificate_and_offline_device():
    old = user("alice", expires=NOW - dt.timedelta(seconds=1))
    assert access.decide(SNAP, old, "acme-1", "ssh", "root", now=NOW).code == "expired"
    offline = access.decide(SNAP, user("alice"), "acme-1", "ssh", "root", online=False, now=NOW)
    assert offline.code == "device_offline" and "never connected" in offline.reason


def test_roles_follow_the_snapshot_not_the_peer():
    """A relabel or role change is a new snapshot: the same peer gets the new answer."""
    alice = user("alice")
    moved = PolicySnapshot.build(
        devices=[device("acme-1", customer="globex")], users=USERS, roles=ROLES,
        known_serials=["a1"])
    assert access.decide(SNAP, alice, "acme-1", "ssh", "root", now=NOW).allowed
    assert access.decide(moved, alice, "acme-1", "ssh", "root", now=NOW).code == "unknown_device"
    demoted = PolicySnapshot.build(devices=DEVICES, users=[UserPolicy("alice", ("globex-ops",))],
                                   roles=ROLES, known_serials=["a1"])
    assert access.decide(demoted, alice, "acme-1", "ssh", "root", now=NOW).code == "unknown_device"


def dev_ident(name: str, serial: int, kind: str = "device") -> Identity:
    return Identity(kind, "f", name, serial, NOW + dt.timedelta(days=30))


AGENT_SNAP = PolicySnapshot.build(devices=DEVICES, known_serials=["10", "11", "12", "13"],
                                  revoked_serials=["14"])


@pytest.mark.parametrize(("name", "serial", "kind", "want", "code"), [
    ("acme-1", 0x10, "device", "device", "ok"),
    ("acme-maint", 0x11, "device", "device", "ok"),
    ("acme-gone", 0x12, "device", "device", "decommissioned"),
    ("acme-locked", 0x13, "device", "device", "locked"),
    ("acme-1", 0x14, "device", "device", "revoked"),
    ("acme-1", 0x99, "device", "device", "unknown_identity"),   # not issued (or not yet seen)
    ("not-enrolled", 0x10, "device", "device", "unknown_identity"),
    ("acme-1", 0x10, "device", "user", "wrong_kind"),
    ("alice", 0x10, "user", "device", "wrong_kind"),
])
def test_admission_matrix(name, serial, kind, want, code):
    try:
        peer = admit(dev_ident(name, serial, kind), "f", AGENT_SNAP, want=want, now=NOW)
    except Denied as denied:
        assert denied.code == code, denied.reason
    else:
        assert code == "ok" and peer.device == AGENT_SNAP.device(name)


def test_seen_by_says_when_to_look_again():
    assert seen_by(AGENT_SNAP, dev_ident("acme-1", 0x10))
    assert seen_by(AGENT_SNAP, dev_ident("acme-1", 0x14))  # revoked is known too
    assert not seen_by(AGENT_SNAP, dev_ident("acme-1", 0x99))
    assert not seen_by(AGENT_SNAP, dev_ident("brand-new", 0x10))


def test_recheck_agent():
    peer = Peer(dev_ident("acme-1", 0x10), AGENT_SNAP.device("acme-1"))
    assert recheck_agent(AGENT_SNAP, peer, NOW) is None
    locked = PolicySnapshot.build(devices=[device("acme-1", locked_until=LATER)], known_serials=["10"])
    assert recheck_agent(locked, peer, NOW).code == "locked"
    revoked = PolicySnapshot.build(devices=DEVICES, revoked_serials=["10"])
    assert recheck_agent(revoked, peer, NOW).code == "revoked"
    assert recheck_agent(PolicySnapshot(), peer, NOW).code == "unknown_identity"


def test_snapshot_is_immutable():
    with pytest.raises(TypeError):
        SNAP.devices["x"] = DEVICES[0]  # type: ignore[index]
    with pytest.raises(AttributeError):
        SNAP.version = 3  # type: ignore[misc]


# --- against a real registry ------------------------------------------------------------------


def _seed(reg: Registry) -> None:
    from enroll import users

    users.apply_roles(reg, ADMIN_ROLE_YAML)
    with reg.write() as db:
        db["devices"].insert({"id": "robot-1", "labels": json.dumps({"customer": "acme"}),
                              "cert_serial": "10", "enrolled_at": iso(NOW), "last_seen": None,
                              "locked_until": None, "lock_message": None})
        db["certs"].insert({"serial": "10", "kind": "device", "subject": "robot-1",
                            "issued_at": iso(NOW), "not_after": "9999-01-01T00:00:00.000000Z",
                            "revoked_at": None})


def test_policy_version_moves_with_policy_only(tmp_path):
    with Registry(tmp_path / "registry.db") as reg:
        _seed(reg)
        v = snapshot.policy_version(reg)
        reg.touch("robot-1", NOW)  # last_seen: bookkeeping
        with reg.write() as db:
            audit.append(db, "device.connect", actor="device:robot-1", device="robot-1")
        assert snapshot.policy_version(reg) == v
        relabel(reg, "robot-1", {"site": "dal"}, [])
        assert snapshot.policy_version(reg) > v
        snap = snapshot.load(reg)
        assert snap.device("robot-1").labels["site"] == "dal"
        assert snap.cert_known("10") and not snap.cert_revoked("10")
        assert [r.name for r in snap.roles.values()] == ["admin"]


def test_a_rebuild_reads_again_only_what_moved(tmp_path):
    from enroll.repositories import Certificate, Certificates

    with Registry(tmp_path / "registry.db") as reg:
        _seed(reg)
        first = snapshot.load(reg)
        assert snapshot.load(reg, current=first) is first  # nothing moved
        with reg.write() as db:  # a login: one more certificate
            Certificates(db).add(Certificate("77", "user", "alice", iso(NOW), "9999-01-01T00:00:00.000000Z"))
        second = snapshot.load(reg, current=first)
        assert second.cert_known("77") and not first.cert_known("77")
        assert second.devices is first.devices and second.roles is first.roles
        lock(reg, "robot-1", None)
        third = snapshot.load(reg, current=second)
        assert third.devices is not second.devices and third.device("robot-1").locked(NOW)
        assert third.known_serials is second.known_serials


class _State:
    def __init__(self, path):
        self.path = path

    def registry(self):
        return Registry(self.path)


def test_live_policy_rebuilds_only_when_policy_changed(tmp_path):
    path = tmp_path / "registry.db"
    with Registry(path) as reg:
        _seed(reg)

    async def scenario():
        own = Registry(path)
        live = LivePolicy(_State(path), own)
        other = Registry(path)  # another process, as `enroll lock` is
        try:
            built = live.rebuilds
            assert (await live.refresh()) is live.snapshot and live.rebuilds == built
            with other.write() as db:
                audit.append(db, "device.connect", actor="device:robot-1", device="robot-1")
            await live.refresh()
            assert live.rebuilds == built  # data_version moved, the policy did not
            lock(other, "robot-1", None, "incident")
            snap = await live.refresh()
            assert live.rebuilds == built + 1 and snap.device("robot-1").locked(NOW)
            # concurrent refreshes after a change share one load
            lock(other, "robot-1", dt.timedelta(hours=1))
            await asyncio.gather(*(live.refresh() for _ in range(20)))
            assert live.rebuilds == built + 2
        finally:
            live.close()
            own.close()
            other.close()

    asyncio.run(scenario())


def test_live_policy_sees_the_proxys_own_writes_once_told(tmp_path):
    """A write on the proxy's own connection (a login's certificate) does not move its own
    data_version: ``changed()`` says so, and admission's ``reload()`` looks once more anyway."""
    path = tmp_path / "registry.db"
    with Registry(path) as reg:
        _seed(reg)

    async def scenario():
        own = Registry(path)
        live = LivePolicy(_State(path), own)
        try:
            relabel(own, "robot-1", {"site": "hou"}, [])
            assert "site" not in (await live.refresh()).device("robot-1").labels  # not told yet
            live.changed()
            assert (await live.refresh()).device("robot-1").labels["site"] == "hou"
            relabel(own, "robot-1", {"site": "dal"}, [])
            assert (await live.reload()).device("robot-1").labels["site"] == "dal"
        finally:
            live.close()
            own.close()

    asyncio.run(scenario())


def test_a_storm_of_refreshes_costs_two_loads_while_the_writer_keeps_committing(tmp_path):
    """Thousands of agents reconnecting: each admission refreshes while the audit writer commits
    their device.connect events. Waiters share a load that began after they asked."""
    path = tmp_path / "registry.db"
    with Registry(path) as reg:
        _seed(reg)

    async def scenario():
        own = Registry(path)
        live = LivePolicy(_State(path), own)
        loads = []
        plain = live._load

        def load_while_writer_commits(current):
            loads.append(1)
            with Registry(path) as writer, writer.write() as db:
                audit.append(db, "device.connect", actor="device:robot-1", device="robot-1")
            return plain(current)

        live._load = load_while_writer_commits
        other = Registry(path)
        try:
            lock(other, "robot-1", None, "incident")
            results = await asyncio.gather(*(live.refresh() for _ in range(50)))
            # the first caller's load, then one shared by all who asked while it ran (not 50)
            assert len(loads) == 2 and all(r.device("robot-1").locked(NOW) for r in results)
            await live.refresh()  # the writer committed during that load: one more look
            assert len(loads) == 3
        finally:
            live.close()
            own.close()
            other.close()

    asyncio.run(scenario())
