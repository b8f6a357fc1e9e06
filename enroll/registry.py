"""The registry: devices, join tokens and issued certificates in one SQLite file.

SQLite through sqlite-utils, in WAL mode so the proxy can read while ``enroll`` writes, with
``synchronous=FULL`` so an acknowledged enrollment or audit event survives a crash. Every change
runs in one ``BEGIN IMMEDIATE`` transaction together with its audit event (:meth:`Registry.write`),
so a refused or killed operation leaves nothing half-done. The schema is versioned; each entry of
``MIGRATIONS`` runs once, in order. Writes name their table with ``db.table(name)``: a
:class:`sqlite_utils.db.Table`, where ``db[name]`` would be typed ``Table | View``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

from enroll.errors import RegistryError
from enroll.labels import LIFECYCLE


def iso(t: dt.datetime) -> str:
    """UTC RFC 3339 with microseconds: sorts as text, so indexes on time work."""
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)


def _v1(db: sqlite_utils.Database) -> None:
    db.table("devices").create(
        {
            "id": str,
            "labels": str,
            "cert_serial": str,
            "ssh_host_key": str,
            "enrolled_at": str,
            "last_seen": str,
            "locked_until": str,
            "lock_message": str,
        },
        pk="id",
    )
    db.table("tokens").create(
        {
            "id": str,
            "hash": str,
            "labels": str,
            "uses_left": int,
            "uses_total": int,
            "name_prefix": str,
            "created_at": str,
            "expires_at": str,
            "creator": str,
            "revoked_at": str,
        },
        pk="id",
    )
    db.table("certs").create(
        {
            "serial": str,
            "kind": str,
            "subject": str,
            "issued_at": str,
            "not_after": str,
            "revoked_at": str,
        },
        pk="serial",
    )
    db.table("certs").create_index(["subject"])
    db.table("audit").create(
        {
            "seq": int,
            "time": str,
            "type": str,
            "actor": str,
            "actor_roles": str,
            "device": str,
            "labels": str,
            "result": str,
            "reason": str,
            "fields": str,
            "prev_hash": str,
            "hash": str,
        },
        pk="seq",
    )
    db.table("audit").create_index(["time"])
    db.table("audit").create_index(["device", "time"])
    db.table("audit").create_index(["type", "time"])


def _v2(db: sqlite_utils.Database) -> None:
    """Engineers and label-based roles."""
    db.table("users").create(
        {
            "name": str,
            "roles": str,
            "password_hash": str,
            "totp_secret": str,
            "invite_hash": str,
            "invite_expires": str,
            "created_at": str,
            "locked_until": str,
            "lock_message": str,
            "failed_logins": int,
            "last_failed_at": str,
        },
        pk="name",
        defaults={"failed_logins": 0},
    )
    db.table("roles").create({"name": str, "spec": str, "source": str, "updated_at": str}, pk="name")


def _v3(db: sqlite_utils.Database) -> None:
    """Audit: the label sets events had (indexed with time), an actor index, append-only triggers.

    ``audit_labelsets`` holds each distinct labels text once; ``audit.labelset`` points at the
    one the event recorded, so a selector is evaluated per label set, not per event. Triggers
    refuse UPDATE and DELETE on both tables and any INSERT that is not the next sequence number;
    there is no switch to allow them (see enroll/audit.py).
    """
    db.execute("CREATE TABLE audit_labelsets (id INTEGER PRIMARY KEY, labels TEXT NOT NULL UNIQUE)")
    db.execute("ALTER TABLE audit ADD COLUMN labelset INTEGER")  # audit_labelsets.id; verify checks it
    db.execute("INSERT OR IGNORE INTO audit_labelsets (labels) "
               "SELECT DISTINCT labels FROM audit WHERE labels IS NOT NULL")
    db.execute("UPDATE audit SET labelset = (SELECT id FROM audit_labelsets l WHERE l.labels = audit.labels) "
               "WHERE labels IS NOT NULL")
    db.execute("CREATE INDEX idx_audit_labelset_time ON audit (labelset, time)")
    db.execute("CREATE INDEX idx_audit_actor_time ON audit (actor, time)")
    refuse = "SELECT RAISE(ABORT, 'the audit log is append-only: {what}')"
    for table in ("audit", "audit_labelsets"):
        for op in ("UPDATE", "DELETE"):
            db.execute(f"CREATE TRIGGER {table}_no_{op.lower()} BEFORE {op} ON {table} "
                       f"BEGIN {refuse.format(what=f'{op} refused')}; END")
    db.execute("CREATE TRIGGER audit_next_seq BEFORE INSERT ON audit "
               "WHEN NEW.seq IS NOT (SELECT coalesce(max(seq), 0) + 1 FROM audit) "
               f"BEGIN {refuse.format(what='events take the next sequence number')}; END")


def _v4(db: sqlite_utils.Database) -> None:
    """Identity hardening: TOTP replay, per-source login failures, certificate lifecycle.

    - ``users.totp_last_step``: the last TOTP time step accepted, so a code works once.
    - ``login_failures``: failed logins per (user name, source address) and per name overall
      (source ``*``), for any name, known or not, so the slowdown reveals nothing and one
      address cannot lock a user out (see enroll/users.py).
    - ``certs.origin`` (enroll, renew, login, issue), ``certs.first_used_at`` (a device first
      connected with it) and ``certs.revoked_reason`` (superseded, revoked by an operator…).
    - Every user certificate subject gets a user record, so every issued identity is lockable:
      identities made by ``enroll user issue`` before this version had none. Their roles come
      from the latest ``cert.issue`` event, as the certificate carries them.
    """
    db.execute("ALTER TABLE users ADD COLUMN totp_last_step INTEGER")
    db.execute("ALTER TABLE certs ADD COLUMN origin TEXT")
    db.execute("ALTER TABLE certs ADD COLUMN first_used_at TEXT")
    db.execute("ALTER TABLE certs ADD COLUMN revoked_reason TEXT")
    db.execute("CREATE TABLE login_failures (name TEXT NOT NULL, source TEXT NOT NULL, "
               "failed INTEGER NOT NULL DEFAULT 0, last_failed_at TEXT NOT NULL, PRIMARY KEY (name, source))")
    db.execute("CREATE INDEX idx_login_failures_time ON login_failures (last_failed_at)")
    orphans = db.execute(
        "SELECT subject, min(issued_at) FROM certs WHERE kind = 'user' "
        "AND subject NOT IN (SELECT name FROM users) GROUP BY subject").fetchall()
    for name, first in orphans:
        last = db.execute(
            "SELECT actor_roles FROM audit WHERE type = 'cert.issue' "
            "AND json_extract(fields, '$.kind') = 'user' AND json_extract(fields, '$.user') = ? "
            "ORDER BY seq DESC LIMIT 1", [name]).fetchone()
        db.table("users").insert({
            "name": name, "roles": json.dumps(sorted(json.loads(last[0])) if last else []),
            "password_hash": None, "totp_secret": None, "invite_hash": None, "invite_expires": None,
            "created_at": first, "locked_until": None, "lock_message": None, "failed_logins": 0,
            "last_failed_at": None,
        })


def _v5(db: sqlite_utils.Database) -> None:
    """Policy versions, bumped by triggers whenever something authorization reads changes.

    The proxy keeps an in-memory policy snapshot (enroll/snapshot.py) and rebuilds the part of
    it whose table's version moved: a device's labels, lock or certificate, a user's roles or
    lock, a role, an issued or revoked certificate. Bookkeeping (``last_seen``,
    ``first_used_at``, failed logins, audit events) moves none, so a busy proxy does not rebuild
    for its own writes, and a login (a new certificate) reloads only the certificates. A second
    backend implements the same contract with its own triggers.
    """
    watched = {
        "devices": "labels, cert_serial, locked_until, lock_message",
        "users": "roles, locked_until, lock_message",
        "roles": None,  # any column
        "certs": "revoked_at, not_after",
    }
    db.execute("CREATE TABLE policy_version (name TEXT PRIMARY KEY, version INTEGER NOT NULL)")
    for table, columns in watched.items():
        db.execute("INSERT INTO policy_version (name, version) VALUES (?, 1)", [table])
        bump = f"UPDATE policy_version SET version = version + 1 WHERE name = '{table}'"
        for op in ("INSERT", "DELETE", "UPDATE"):
            what = f"UPDATE OF {columns}" if op == "UPDATE" and columns else op
            db.execute(f"CREATE TRIGGER {table}_policy_{op.lower()} AFTER {what} ON {table} "
                       f"BEGIN {bump}; END")


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_v1, _v2, _v3, _v4, _v5]


@dataclass(frozen=True)
class Device:
    id: str
    labels: dict[str, str]
    cert_serial: str | None
    enrolled_at: str
    last_seen: str | None
    locked_until: str | None
    lock_message: str | None

    @property
    def lifecycle(self) -> str:
        return self.labels.get(LIFECYCLE, "active")

    def locked(self, now: dt.datetime) -> bool:
        return self.locked_until is not None and parse_iso(self.locked_until) > now

    @classmethod
    def from_row(cls, row: dict) -> Device:
        return cls(
            row["id"],
            json.loads(row["labels"]),
            row["cert_serial"],
            row["enrolled_at"],
            row["last_seen"],
            row["locked_until"],
            row["lock_message"],
        )

    def as_dict(self) -> dict:
        return {
            "id": self.id,
            "labels": self.labels,
            "lifecycle": self.lifecycle,
            "cert_serial": self.cert_serial,
            "enrolled_at": self.enrolled_at,
            "last_seen": self.last_seen,
            "locked_until": self.locked_until,
            "lock_message": self.lock_message,
        }


class Registry:
    """One open registry file. Not shared between threads; open one per process or task."""

    def __init__(self, path: Path | str, *, timeout: float = 30.0):
        """``timeout``: seconds a statement waits for another connection's lock before failing,
        once open (opening, which may migrate the schema, waits up to 30 s)."""
        self.path = Path(path)
        try:
            conn = sqlite3.connect(str(self.path), timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot open registry {self.path}: {exc}") from None
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        self._db = sqlite_utils.Database(conn)
        self._migrate()
        if timeout != 30:
            conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")

    def data_version(self) -> int:
        """SQLite's ``PRAGMA data_version``: changes when another connection commits.

        Cheap (it reads the WAL index in shared memory, no table): the proxy polls it to know
        when to look at :func:`enroll.snapshot.policy_version`.
        """
        return self._db.execute("PRAGMA data_version").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _migrate(self) -> None:
        with self.write():
            if "schema_migrations" not in self._db.table_names():
                self._db.table("schema_migrations").create({"version": int, "applied_at": str}, pk="version")
            done = {r["version"] for r in self._db["schema_migrations"].rows}
            for version, migration in enumerate(MIGRATIONS, start=1):
                if version not in done:
                    migration(self._db)
                    self._db.table("schema_migrations").insert(
                        {"version": version, "applied_at": iso(dt.datetime.now(dt.UTC))}
                    )
            if max(done, default=0) > len(MIGRATIONS):
                raise RegistryError(
                    f"registry {self.path} has schema version {max(done)}, newer than this "
                    f"fleet-tunnel knows ({len(MIGRATIONS)}): upgrade fleet-tunnel"
                )

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite_utils.Database]:
        """One write transaction, taken up front so concurrent writers queue instead of failing."""
        conn = self._db.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    # --- devices ----------------------------------------------------------------------------

    def device(self, device_id: str) -> Device | None:
        rows = list(self._db["devices"].rows_where("id = ?", [device_id]))
        return Device.from_row(rows[0]) if rows else None

    def devices(self) -> list[Device]:
        return [Device.from_row(r) for r in self._db["devices"].rows_where(order_by="id")]

    def touch(self, device_id: str, when: dt.datetime) -> None:
        with self.write() as db:
            db.table("devices").update(device_id, {"last_seen": iso(when)})

    # --- certificates -----------------------------------------------------------------------

    def cert_revoked(self, serial_hex: str) -> bool:
        rows = list(self._db["certs"].rows_where("serial = ?", [serial_hex]))
        return bool(rows and rows[0]["revoked_at"])

    def cert_known(self, serial_hex: str) -> bool:
        return bool(self._db["certs"].count_where("serial = ?", [serial_hex]))
