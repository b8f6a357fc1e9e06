"""Authorization cost per agent connect, per dial and per once-a-second re-check: registry queries (before) against
the in-memory policy snapshot (after), measured in the same run on the same registry.

A registry with ``devices`` devices of 20 customers, 200 users (one customer role each, some
locked), 21 roles and one certificate per device and user. Before: what the proxy did until
the snapshot, as SQL on the event loop — per dial the user's certificate and record (twice),
their roles and the device; per re-check that for every open session plus the device and its
certificate for every connected agent. After: ``PRAGMA data_version`` (the proxy's cheap check
whether to refresh) and the pure decision over the snapshot. Also the snapshot's build time (off
the event loop, only when the policy changed). CPU time of this one thread, no proxy involved.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import case_main, paths  # noqa: E402

paths()

CUSTOMERS = 20
USERS = 200


def _role(n: int) -> str:
    return f"""kind: role
version: v7
metadata: {{name: cust{n}-ops}}
spec:
  allow:
    node_labels: {{customer: cust{n}}}
    logins: [root, ops]
    services: [ssh, postgres]
  deny:
    node_labels: {{env: prod}}
    services: [postgres]
"""


def _seed(reg, devices: int) -> None:
    from enroll import users
    from enroll.registry import iso
    from enroll.roles import ADMIN_ROLE_YAML

    now = dt.datetime.now(dt.UTC)
    users.apply_roles(reg, "---\n".join([ADMIN_ROLE_YAML] + [_role(n) for n in range(CUSTOMERS)]))
    far = iso(now + dt.timedelta(days=365))
    with reg.write() as db:
        db["devices"].insert_all({
            "id": f"dev-{i}", "labels": json.dumps({"customer": f"cust{i % CUSTOMERS}", "lifecycle": "active",
                                                    "site": f"s{i % 7}"}),
            "cert_serial": format(0x100000 + i, "x"), "enrolled_at": iso(now), "last_seen": iso(now),
            "locked_until": far if i % 97 == 0 else None, "lock_message": None} for i in range(devices))
        db["users"].insert_all({
            "name": f"user-{u}", "roles": json.dumps([f"cust{u % CUSTOMERS}-ops"]), "password_hash": None,
            "totp_secret": None, "invite_hash": None, "invite_expires": None, "created_at": iso(now),
            "locked_until": far if u % 50 == 0 else None, "lock_message": None, "failed_logins": 0,
            "last_failed_at": None} for u in range(USERS))
        db["certs"].insert_all(
            [{"serial": format(0x100000 + i, "x"), "kind": "device", "subject": f"dev-{i}",
              "issued_at": iso(now), "not_after": far, "revoked_at": None} for i in range(devices)]
            + [{"serial": format(0x900000 + u, "x"), "kind": "user", "subject": f"user-{u}",
                "issued_at": iso(now), "not_after": far, "revoked_at": None} for u in range(USERS)])


def _old_decide(reg, peer, device_id: str, service: str, login: str | None, now: dt.datetime) -> bool:
    """The proxy's dial authorization before the snapshot: the same queries, in the same order."""
    from enroll.roles import check, visible
    from tunnel.admission import Denied, check_device

    db = reg._db  # the queries the proxy made before the snapshot, on the registry's connection
    ident = peer.identity
    if now > ident.not_after:
        return False
    row = db.execute("SELECT revoked_at FROM certs WHERE serial = ?", [ident.serial_hex]).fetchone()
    if row and row[0]:
        return False
    user = db.execute("SELECT locked_until, roles FROM users WHERE name = ?", [peer.name]).fetchone()
    if user and user[0] and user[0] > now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"):
        return False
    user = db.execute("SELECT roles FROM users WHERE name = ?", [peer.name]).fetchone()  # peer_roles
    names = json.loads(user[0]) if user else list(ident.roles)
    specs = db.execute(f"SELECT spec FROM roles WHERE name IN ({','.join('?' * len(names))})", names).fetchall()
    roles = [_parsed(s) for (s,) in specs]
    dev = reg.device(device_id)
    if dev is None or not visible(roles, dev.labels) or not check(roles, dev.labels, service, login).allowed:
        return False
    try:
        check_device(dev, now)
    except Denied:
        return False
    return True


_ROLE_CACHE: dict = {}


def _parsed(spec: str):
    from enroll.roles import role_from_spec

    if spec not in _ROLE_CACHE:  # the old path cached parsed roles too (lru_cache)
        _ROLE_CACHE[spec] = role_from_spec(json.loads(spec))
    return _ROLE_CACHE[spec]


def _old_agent(reg, peer, now: dt.datetime) -> bool:
    from tunnel.admission import Denied, check_device

    dev = reg.device(peer.name)
    row = reg._db.execute("SELECT revoked_at FROM certs WHERE serial = ?", [peer.identity.serial_hex]).fetchone()
    if dev is None or (row and row[0]):
        return False
    try:
        check_device(dev, now)
    except Denied:
        return False
    return True


def _old_admit(reg, ident, now: dt.datetime) -> bool:
    """The proxy's admission of an agent before the snapshot: the same queries, in order."""
    from tunnel.admission import Denied, check_device

    if not reg.cert_known(ident.serial_hex) or reg.cert_revoked(ident.serial_hex):
        return False
    dev = reg.device(ident.name)
    if dev is None:
        return False
    try:
        check_device(dev, now)
    except Denied:
        return False
    return True


def _cpu_per_call(fn, calls: int) -> float:
    """CPU seconds per call of ``fn`` (this thread), after a warm-up."""
    for _ in range(min(50, calls)):
        fn()
    t0 = time.thread_time()
    for _ in range(calls):
        fn()
    return (time.thread_time() - t0) / calls


def run(quick: bool = False) -> list[dict]:
    from enroll import snapshot
    from enroll.certs import Identity
    from enroll.registry import Registry, iso
    from enroll.repositories import Certificate, Certificates
    from tunnel import access
    from tunnel.admission import Denied, Peer, admit, recheck_agent

    devices = 1000 if quick else 5000
    sessions = 200 if quick else 1000
    dials = 500 if quick else 2000
    tmp = Path(tempfile.mkdtemp(prefix="bench-authz-"))
    now = dt.datetime.now(dt.UTC)
    try:
        reg = Registry(tmp / "registry.db")
        _seed(reg, devices)
        later = now + dt.timedelta(hours=8)
        engineers = [Peer(Identity("user", "bench", f"user-{u}", 0x900000 + u, later)) for u in range(USERS)]
        agents = [Peer(Identity("device", "bench", f"dev-{i}", 0x100000 + i, later)) for i in range(devices)]
        # sessions: each engineer on a device of its own customer (allowed), ssh as root
        open_sessions = [(engineers[s % USERS], f"dev-{(s % USERS) % CUSTOMERS + CUSTOMERS * (s // USERS + 1)}")
                         for s in range(sessions)]
        t0 = time.perf_counter()
        snapshot.load(reg)  # the first build also parses each role version once
        cold = time.perf_counter() - t0
        builds, certs_builds = [], []
        for n in range(5):  # wall time of one build is noisy on a shared machine: the median of 5
            t0 = time.perf_counter()
            snap = snapshot.load(reg)
            builds.append(time.perf_counter() - t0)
            with reg.write() as db:  # a login: one new user certificate, so only certs are re-read
                Certificates(db).add(Certificate(f"f00d{n}", "user", "user-1", iso(now),
                                                 iso(now + dt.timedelta(hours=8))))
            t0 = time.perf_counter()
            snap = snapshot.load(reg, current=snap)
            certs_builds.append(time.perf_counter() - t0)
        build, certs_only = statistics.median(builds), statistics.median(certs_builds)
        for peer, dev_id in open_sessions[:50]:  # old and new agree
            assert _old_decide(reg, peer, dev_id, "ssh", "root", now) == \
                access.decide(snap, peer, dev_id, "ssh", "root", now=now).allowed

        k = [0]

        def pick():
            k[0] += 1
            return open_sessions[k[0] % sessions]

        def old_dial():
            peer, dev_id = pick()
            _old_decide(reg, peer, dev_id, "ssh", "root", now)

        def new_dial():
            reg.data_version()  # LivePolicy.refresh: nothing changed, so no thread hop
            peer, dev_id = pick()
            access.decide(snap, peer, dev_id, "ssh", "root", now=now)

        def old_recheck():
            for peer, dev_id in open_sessions:
                _old_decide(reg, peer, dev_id, "ssh", "root", now)
            for peer in agents:
                _old_agent(reg, peer, now)

        def new_recheck():
            reg.data_version()
            for peer, dev_id in open_sessions:
                access.decide(snap, peer, dev_id, "ssh", "root", now=now)
            for peer in agents:
                recheck_agent(snap, peer, now)

        def old_connect():
            _old_admit(reg, pick_agent().identity, now)

        def new_connect():
            reg.data_version()
            with contextlib.suppress(Denied):
                admit(pick_agent().identity, "bench", snap, want="device", now=now)

        def pick_agent():
            k[0] += 1
            return agents[k[0] % devices]

        old_c, new_c = _cpu_per_call(old_connect, dials), _cpu_per_call(new_connect, dials)
        old_d, new_d = _cpu_per_call(old_dial, dials), _cpu_per_call(new_dial, dials)
        rounds = 3 if quick else 5
        old_r, new_r = _cpu_per_call(old_recheck, rounds), _cpu_per_call(new_recheck, rounds)
        reg.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    scale = f"{devices} devices, {USERS} users, {CUSTOMERS + 1} roles"
    return [
        {"metric": "admission per agent connect (CPU on the event loop)", "value": round(new_c * 1e6, 1),
         "unit": "µs", "baseline": round(old_c * 1e6, 1), "baseline_name": "registry queries (before)",
         "target": "-", "note": f"{dials} connects; {scale}"},
        {"metric": "authorization per dial (CPU on the event loop)", "value": round(new_d * 1e6, 1),
         "unit": "µs", "baseline": round(old_d * 1e6, 1), "baseline_name": "registry queries (before)",
         "target": "-", "note": f"{dials} dials; {scale}"},
        {"metric": f"re-check of {sessions} sessions + {devices} agents (CPU per second)",
         "value": round(new_r * 1e3, 2), "unit": "ms", "baseline": round(old_r * 1e3, 2),
         "baseline_name": "registry queries (before)", "target": "-",
         "note": f"{rounds} rounds; {scale}"},
        {"metric": "policy snapshot rebuild, every table (off the event loop)",
         "value": round(build * 1e3, 1), "unit": "ms", "target": "-",
         "note": f"median of 5; {scale}; first build at start-up {cold * 1e3:.0f} ms (parses the roles)"},
        {"metric": "policy snapshot rebuild after a login (certificates only)",
         "value": round(certs_only * 1e3, 1), "unit": "ms", "target": "-", "note": f"median of 5; {scale}"},
    ]


if __name__ == "__main__":
    case_main("authz", run)
