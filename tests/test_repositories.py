"""Typed storage: the repositories return records and keep the rules of their tables; the
modules above them hold no SQL.

Each test runs against a real registry file (SQLite, all migrations), as the CLIs and the proxy
open it.
"""

from __future__ import annotations

import ast
import datetime as dt
import json
import re
from pathlib import Path

import pytest

from enroll import audit, snapshot
from enroll.registry import Registry, iso
from enroll.repositories import (
    FOREVER,
    Certificate,
    Certificates,
    Devices,
    LoginFailures,
    Roles,
    Token,
    Tokens,
    User,
    Users,
)
from enroll.roles import ADMIN_ROLE_YAML, parse_roles

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def reg(tmp_path):
    with Registry(tmp_path / "registry.db") as r:
        yield r


def test_users_round_trip_and_status(reg):
    with reg.write() as db:
        Users(db).add(User("alice", ("b-role", "a-role"), iso(NOW), invite_hash="h",
                           invite_expires=iso(NOW + dt.timedelta(hours=1))))
        Users(db).add(User("bob", (), iso(NOW)))
    alice = Users(reg).get("alice")
    assert alice.roles == ("a-role", "b-role") and alice.failed_logins == 0
    assert alice.status(NOW) == "invited" and Users(reg).get("bob").status(NOW) == "certificate-only"
    assert Users(reg).get("nobody") is None and not Users(reg).exists("nobody")
    with reg.write() as db:
        assert Users(db).redeem_invite("alice", "h", "scrypt$x")
        assert not Users(db).redeem_invite("alice", "h", "scrypt$y")  # spent once
        assert Users(db).accept_totp_step("alice", 5) and not Users(db).accept_totp_step("alice", 5)
        Users(db).set_lock("alice", FOREVER, "incident")
    alice = Users(reg).get("alice")
    assert alice.password_hash == "scrypt$x" and alice.invite_hash is None and alice.totp_last_step == 5
    assert alice.status(NOW) == "locked" and alice.lock_message == "incident"
    summary = alice.summary(NOW)
    assert summary == {"name": "alice", "roles": ["a-role", "b-role"], "status": "locked", "totp": False,
                       "failed_logins": 0}
    assert "scrypt" not in json.dumps(summary)
    with reg.write() as db:
        Users(db).clear_lock("alice")
        Users(db).set_roles("alice", ["z", "a-role"])
    assert Users(reg).get("alice").status(NOW) == "active"
    assert Users(reg).holding("z") == ["alice"] and [u.name for u in Users(reg).all()] == ["alice", "bob"]


def test_login_failures_are_counted_per_source_and_overall(reg):
    with reg.write() as db:
        Users(db).add(User("carol", (), iso(NOW)))
        for _ in range(2):
            LoginFailures(db).record("carol", "198.51.100.7", NOW, dt.timedelta(hours=24))
        LoginFailures(db).record("carol", "203.0.113.9", NOW, dt.timedelta(hours=24))
    counts = {s: n for s, n, _ in LoginFailures(reg).of("carol", "198.51.100.7")}
    assert counts == {"198.51.100.7": 2, "*": 3} and Users(reg).get("carol").failed_logins == 3
    with reg.write() as db:
        LoginFailures(db).clear("carol", "198.51.100.7")
    assert {s for s, _, _ in LoginFailures(reg).of("carol", "203.0.113.9")} == {"203.0.113.9"}
    with reg.write() as db:  # a day later the old counters are forgotten
        LoginFailures(db).record("carol", "192.0.2.1", NOW + dt.timedelta(days=2), dt.timedelta(hours=24))
    assert LoginFailures(reg).of("carol", "203.0.113.9") == [("*", 1, NOW + dt.timedelta(days=2))]


def test_roles_upsert_and_remove(reg):
    admin = parse_roles(ADMIN_ROLE_YAML)[0]
    with reg.write() as db:
        Roles(db).put(admin, ADMIN_ROLE_YAML, NOW)
        Roles(db).put(admin, "again", NOW + dt.timedelta(seconds=1))  # replaced, not duplicated
    stored = Roles(reg).all()
    assert [(r.name, r.source) for r in stored] == [("admin", "again")]
    assert Roles(reg).names() == {"admin"} and len(Roles(reg).specs(["admin", "gone"])) == 1
    assert Roles(reg).specs([]) == []
    with reg.write() as db:
        Roles(db).remove("admin")
    assert not Roles(reg).exists("admin")


def test_tokens(reg):
    token = Token("t1", "hash", {"customer": "acme"}, 1, 1, "", iso(NOW), iso(NOW + dt.timedelta(hours=1)), "ops")
    with reg.write() as db:
        Tokens(db).add(token)
    assert Tokens(reg).get("t1") == token and Tokens(reg).exists("t1") and not Tokens(reg).exists("t2")
    assert token.status(NOW) == "valid" and "hash" not in token.summary(NOW)
    with reg.write() as db:
        Tokens(db).use_one("t1")
    assert Tokens(reg).get("t1").status(NOW) == "used"
    with reg.write() as db:
        Tokens(db).revoke("t1", NOW)
    assert Tokens(reg).all()[0].status(NOW) == "revoked"
    assert token.status(NOW + dt.timedelta(hours=2)) == "expired"


def test_devices_and_certificates(reg):
    later = iso(NOW + dt.timedelta(days=30))
    with reg.write() as db:
        Devices(db).add("robot-1", {"customer": "acme", "lifecycle": "active"}, "a1", "ssh-ed25519 AAA", NOW)
        Certificates(db).add(Certificate("a1", "device", "robot-1", iso(NOW), later))
        Certificates(db).add(Certificate("a2", "device", "robot-1", iso(NOW + dt.timedelta(seconds=1)), later,
                                         origin="renew"))
        Certificates(db).add(Certificate("u1", "user", "alice", iso(NOW), iso(NOW + dt.timedelta(hours=1))))
    assert Devices(reg).exists("robot-1") and Devices(reg).get("robot-1").labels["customer"] == "acme"
    assert [c.serial for c in Certificates(reg).valid_of("device", "robot-1", NOW)] == ["a1", "a2"]
    assert Certificates(reg).renewals_since("robot-1", NOW) == [NOW + dt.timedelta(seconds=1)]
    with reg.write() as db:
        Certificates(db).revoke(["a1"], NOW, "revoked by admin")
        Certificates(db).supersede(["a1", "a2"], NOW, "superseded")  # a1 keeps its reason
        Certificates(db).mark_first_used("u1", NOW)
        Devices(db).set_lock("robot-1", FOREVER, "incident")
        Devices(db).set_labels("robot-1", {"customer": "globex", "lifecycle": "active"})
        Devices(db).seen(["robot-1"], NOW)
    assert Certificates(reg).get("a1").revoked_reason == "revoked by admin"
    assert Certificates(reg).get("a2").revoked_reason == "superseded"
    assert Certificates(reg).get("u1").first_used_at == iso(NOW)
    listed = Certificates(reg).listing(device="robot-1", now=NOW)
    assert [c.as_dict(NOW)["status"] for c in listed] == ["revoked", "revoked"]
    assert [c.serial for c in Certificates(reg).listing(user="alice", now=NOW + dt.timedelta(days=1))] == []
    dev = Devices(reg).get("robot-1")
    assert dev.locked(NOW) and dev.labels["customer"] == "globex" and dev.last_seen == iso(NOW)
    with reg.write() as db:
        Devices(db).clear_lock("robot-1")
        Certificates(db).revoke_all_of("user", "alice", NOW, "offboarded")
    assert not Devices(reg).get("robot-1").locked(NOW)
    snap = snapshot.load(reg, now=NOW)
    assert snap.cert_revoked("u1") and snap.cert_revoked("a2") and not snap.cert_known("zz")


def test_export_resumes_after_a_crash_between_write_and_cursor(reg, tmp_path):
    with reg.write() as db:
        for n in range(3):
            audit.append(db, "device.connect", actor="device:r", device="r", n=n)
    rows = [ev.as_record() for ev in audit.export_rows(reg, 0)]
    out = tmp_path / "audit.jsonl"
    # two whole events and half of the third: the run died mid-line before saving its cursor
    text = "".join(json.dumps(r) + "\n" for r in rows[:2]) + json.dumps(rows[2])[:10]
    out.write_text(text)
    assert audit.resume_export(reg, out, 0) == (rows[1]["seq"], rows[1]["hash"])
    assert out.read_text().count("\n") == 2 and out.read_text().endswith("\n")
    assert audit.resume_export(reg, out, rows[1]["seq"]) is None  # the cursor is already there
    forged = tmp_path / "other.jsonl"
    forged.write_text(json.dumps({**rows[1], "hash": "0" * 64}) + "\n")
    assert audit.resume_export(reg, forged, 0) is None  # another log's lines: no resume
    assert audit.resume_export(reg, tmp_path / "missing.jsonl", 0) is None


STORAGE = {"enroll/registry.py", "enroll/repositories.py", "enroll/snapshot.py", "enroll/audit.py",
           "enroll/backup.py",  # backup copies the file with SQLite's own backup API
           "enroll/session_log.py"}  # sessions in the audit log: open, detached, resumable


def _above_storage() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for pkg in ("enroll", "tunnel", "inventory_plugin")
                  for p in (ROOT / pkg).rglob("*.py") if str(p.relative_to(ROOT)) not in STORAGE)


def _raw_access(source: str) -> list[str]:
    """What in ``source`` reaches into the database: SQL text, ``.execute()``, ``db[...]``
    tables, or a registry's ``.db`` handle (found in the syntax tree, so prose is not)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and re.match(r"\s*(SELECT|INSERT|UPDATE|DELETE|PRAGMA)\s", node.value):
            found.append(node.value[:40])
        elif (isinstance(node, ast.Attribute) and node.attr in ("execute", "db", "_db")) or \
                (isinstance(node, ast.Subscript) and ast.unparse(node.value).endswith("db")):
            found.append(ast.unparse(node))
    return found


@pytest.mark.parametrize("path", _above_storage())
def test_no_raw_database_access_above_the_storage_layer(path):
    """Only the storage layer speaks SQL or holds the registry's database handle: the rest asks
    repositories (enroll/repositories.py), the snapshot and the audit module."""
    raw = _raw_access((ROOT / path).read_text())
    assert raw == [], f"{path} reaches into the database: {raw}"
