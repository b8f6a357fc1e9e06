"""Typed repositories over the registry: the only place that knows its tables and SQL.

Each repository wraps a database handle — the one :meth:`enroll.registry.Registry.write`
yields inside a transaction, or a :class:`Registry` itself for reads outside one — and returns
typed records, never rows.
Callers (users, admin, tokens…) keep the decisions; the repositories keep the storage, so a
second backend (PostgreSQL, for several proxies) implements these classes and nothing above
them changes. The SQL is kept to what both speak: plain SELECT/INSERT/UPDATE/DELETE with ``?``
parameters (a backend maps the placeholder), ``INSERT … ON CONFLICT … DO UPDATE``, no
SQLite-only functions.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from dataclasses import dataclass

import sqlite_utils

from enroll.registry import Device, Registry, iso, parse_iso
from enroll.roles import Role

#: ``locked_until`` of a lock without an end
FOREVER = "9999-12-31T23:59:59.000000Z"


class _Repository:
    def __init__(self, source: Registry | sqlite_utils.Database) -> None:
        """``source``: a :class:`Registry` (reads) or the handle its ``write()`` yields."""
        self._db: sqlite_utils.Database = source._db if isinstance(source, Registry) else source


# --- users ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class User:
    """An engineer's record. ``roles`` are names, sorted; secrets are stored hashed."""

    name: str
    roles: tuple[str, ...] = ()
    created_at: str | None = None
    password_hash: str | None = None
    totp_secret: str | None = None
    invite_hash: str | None = None
    invite_expires: str | None = None
    locked_until: str | None = None
    lock_message: str | None = None
    failed_logins: int = 0
    last_failed_at: str | None = None
    totp_last_step: int | None = None

    def locked(self, now: dt.datetime) -> bool:
        return self.locked_until is not None and parse_iso(self.locked_until) > now

    def status(self, now: dt.datetime) -> str:
        """What ``enroll user ls`` shows: locked, invited (no password yet), active (has a
        password), or certificate-only (made by ``enroll user issue``, cannot log in)."""
        if self.locked(now):
            return "locked"
        if self.invite_hash and not self.password_hash:
            return "invited"
        return "active" if self.password_hash else "certificate-only"

    def summary(self, now: dt.datetime) -> dict:
        """The listing row: no secret, not even a hash."""
        return {"name": self.name, "roles": list(self.roles), "status": self.status(now),
                "totp": bool(self.totp_secret), "failed_logins": self.failed_logins}


_USER_COLUMNS = ("name", "roles", "created_at", "password_hash", "totp_secret", "invite_hash",
                 "invite_expires", "locked_until", "lock_message", "failed_logins", "last_failed_at",
                 "totp_last_step")


def _users(cursor) -> list[User]:
    """Records from ``SELECT *`` (a registry being migrated may lack later columns)."""
    names = [d[0] for d in cursor.description]
    out = []
    for row in cursor:
        values = {k: v for k, v in zip(names, row, strict=True) if k in _USER_COLUMNS}
        values["roles"] = tuple(json.loads(values["roles"]))
        values["failed_logins"] = values.get("failed_logins") or 0
        out.append(User(**values))
    return out


class Users(_Repository):
    def get(self, name: str) -> User | None:
        found = _users(self._db.execute("SELECT * FROM users WHERE name = ?", [name]))
        return found[0] if found else None

    def exists(self, name: str) -> bool:
        return self._db.execute("SELECT 1 FROM users WHERE name = ?", [name]).fetchone() is not None

    def all(self) -> list[User]:
        return _users(self._db.execute("SELECT * FROM users ORDER BY name"))

    def add(self, user: User) -> None:
        values = {**{c: getattr(user, c) for c in _USER_COLUMNS}, "roles": json.dumps(sorted(user.roles))}
        self._db.execute(f"INSERT INTO users ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
                         list(values.values()))

    def set_roles(self, name: str, roles: Iterable[str]) -> None:
        self._db.execute("UPDATE users SET roles = ? WHERE name = ?", [json.dumps(sorted(roles)), name])

    def holding(self, role: str) -> list[str]:
        """Names of the users that hold ``role``."""
        return [u.name for u in self.all() if role in u.roles]

    def set_lock(self, name: str, until: str, message: str | None) -> None:
        self._db.execute("UPDATE users SET locked_until = ?, lock_message = ? WHERE name = ?",
                         [until, message, name])

    def clear_lock(self, name: str) -> None:
        """Unlocked, and its failed logins forgiven (from every source)."""
        self._db.execute("UPDATE users SET locked_until = NULL, lock_message = NULL, failed_logins = 0 "
                         "WHERE name = ?", [name])
        self._db.execute("DELETE FROM login_failures WHERE name = ?", [name])

    def set_invite(self, name: str, invite_hash: str, expires: str) -> None:
        self._db.execute("UPDATE users SET invite_hash = ?, invite_expires = ? WHERE name = ?",
                         [invite_hash, expires, name])

    def redeem_invite(self, name: str, invite_hash: str, password_hash: str) -> bool:
        """Set the password and spend the invite, if it is still ``invite_hash``: exactly one of
        two concurrent redemptions wins."""
        return self._db.execute(
            "UPDATE users SET password_hash = ?, invite_hash = NULL, invite_expires = NULL, "
            "failed_logins = 0 WHERE name = ? AND invite_hash = ?",
            [password_hash, name, invite_hash]).rowcount == 1

    def accept_totp_step(self, name: str, step: int) -> bool:
        """Record ``step`` as used; False if it (or a later one) already was (a replay)."""
        return self._db.execute(
            "UPDATE users SET totp_last_step = ? WHERE name = ? "
            "AND (totp_last_step IS NULL OR totp_last_step < ?)", [step, name, step]).rowcount == 1

    def replace_password_hash(self, name: str, old: str, new: str) -> None:
        self._db.execute("UPDATE users SET password_hash = ? WHERE name = ? AND password_hash = ?",
                         [new, name, old])


class LoginFailures(_Repository):
    """Failed logins per (name, source) and per name overall (source :data:`ALL`)."""

    ALL = "*"

    def of(self, name: str, source: str) -> list[tuple[str, int, dt.datetime]]:
        """(source, failures, last failure) for ``source`` and for the name overall."""
        rows = self._db.execute(
            "SELECT source, failed, last_failed_at FROM login_failures WHERE name = ? AND source IN (?, ?)",
            [name, source, self.ALL]).fetchall()
        return [(s, n, parse_iso(last)) for s, n, last in rows]

    def record(self, name: str, source: str, now: dt.datetime, kept: dt.timedelta) -> None:
        """Count one failure; forget counters with no failure for ``kept``; mirror the overall
        count into the user's record (what ``enroll user ls`` shows)."""
        stamp = iso(now)
        self._db.execute("DELETE FROM login_failures WHERE last_failed_at < ?", [iso(now - kept)])
        for key in (source, self.ALL):
            self._db.execute(
                "INSERT INTO login_failures (name, source, failed, last_failed_at) VALUES (?, ?, 1, ?) "
                "ON CONFLICT (name, source) DO UPDATE SET failed = login_failures.failed + 1, "
                "last_failed_at = ?", [name, key, stamp, stamp])
        self._db.execute("UPDATE users SET failed_logins = (SELECT failed FROM login_failures "
                         "WHERE name = ? AND source = ?), last_failed_at = ? WHERE name = ?",
                         [name, self.ALL, stamp, name])

    def clear(self, name: str, source: str) -> None:
        """A successful login forgives its source and the name overall (other sources stay)."""
        self._db.execute("DELETE FROM login_failures WHERE name = ? AND source IN (?, ?)",
                         [name, source, self.ALL])
        self._db.execute("UPDATE users SET failed_logins = 0 WHERE name = ?", [name])


# --- roles ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredRole:
    name: str
    spec: dict  # as Role.to_spec() wrote it
    source: str | None
    updated_at: str


class Roles(_Repository):
    def put(self, role: Role, source: str, now: dt.datetime) -> None:
        self._db.execute(
            "INSERT INTO roles (name, spec, source, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, source = excluded.source, "
            "updated_at = excluded.updated_at",
            [role.name, json.dumps(role.to_spec()), source, iso(now)])

    def exists(self, name: str) -> bool:
        return self._db.execute("SELECT 1 FROM roles WHERE name = ?", [name]).fetchone() is not None

    def names(self) -> set[str]:
        return {n for (n,) in self._db.execute("SELECT name FROM roles")}

    def remove(self, name: str) -> None:
        self._db.execute("DELETE FROM roles WHERE name = ?", [name])

    def specs(self, names: Iterable[str]) -> list[str]:
        """The stored spec texts of ``names`` that exist, by name."""
        names = sorted(set(names))
        if not names:
            return []
        return [s for (s,) in self._db.execute(
            f"SELECT spec FROM roles WHERE name IN ({', '.join('?' * len(names))}) ORDER BY name", names)]

    def all(self) -> list[StoredRole]:
        return [StoredRole(n, json.loads(spec), source, updated)
                for n, spec, source, updated in self._db.execute(
                    "SELECT name, spec, source, updated_at FROM roles ORDER BY name")]


# --- devices: labels and locks ----------------------------------------------------------------


class Devices(_Repository):
    """Device records (:class:`enroll.registry.Device`) and the changes ops make to them."""

    def get(self, device_id: str) -> Device | None:
        rows = list(self._db["devices"].rows_where("id = ?", [device_id]))
        return Device.from_row(rows[0]) if rows else None

    def exists(self, device_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM devices WHERE id = ?", [device_id]).fetchone() is not None

    def add(self, device_id: str, labels: dict[str, str], cert_serial: str, ssh_host_key: str,
            enrolled_at: dt.datetime) -> None:
        self._db.execute(
            "INSERT INTO devices (id, labels, cert_serial, ssh_host_key, enrolled_at, last_seen, "
            "locked_until, lock_message) VALUES (?, ?, ?, ?, ?, NULL, NULL, NULL)",
            [device_id, json.dumps(labels, sort_keys=True), cert_serial, ssh_host_key, iso(enrolled_at)])

    def set_cert(self, device_id: str, serial: str) -> None:
        """The certificate the device holds now (its latest)."""
        self._db.execute("UPDATE devices SET cert_serial = ? WHERE id = ?", [serial, device_id])

    def seen(self, device_ids: Iterable[str], when: dt.datetime) -> None:
        for device_id in device_ids:
            self._db.execute("UPDATE devices SET last_seen = ? WHERE id = ?", [iso(when), device_id])

    def set_labels(self, device_id: str, labels: dict[str, str]) -> None:
        self._db.execute("UPDATE devices SET labels = ? WHERE id = ?",
                         [json.dumps(labels, sort_keys=True), device_id])

    def set_lock(self, device_id: str, until: str, message: str | None) -> None:
        self._db.execute("UPDATE devices SET locked_until = ?, lock_message = ? WHERE id = ?",
                         [until, message, device_id])

    def clear_lock(self, device_id: str) -> None:
        self._db.execute("UPDATE devices SET locked_until = NULL, lock_message = NULL WHERE id = ?",
                         [device_id])


# --- certificates -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificate:
    """An issued certificate. ``kind`` is ``device`` or ``user``; ``subject`` its id or name."""

    serial: str
    kind: str
    subject: str
    issued_at: str
    not_after: str
    revoked_at: str | None = None
    origin: str | None = None
    first_used_at: str | None = None
    revoked_reason: str | None = None

    def status(self, now: dt.datetime) -> str:
        if self.revoked_at:
            return "revoked"
        return "expired" if self.not_after <= iso(now) else "valid"

    def as_dict(self, now: dt.datetime) -> dict:
        return {"serial": self.serial, "kind": self.kind, "subject": self.subject,
                "status": self.status(now), "issued_at": self.issued_at, "not_after": self.not_after,
                "origin": self.origin, "first_used_at": self.first_used_at,
                "revoked_at": self.revoked_at, "revoked_reason": self.revoked_reason}


_CERT_COLUMNS = ("serial", "kind", "subject", "issued_at", "not_after", "revoked_at", "origin",
                 "first_used_at", "revoked_reason")
_CERT_SELECT = f"SELECT {', '.join(_CERT_COLUMNS)} FROM certs"


class Certificates(_Repository):
    def _select(self, where: str, params: list) -> list[Certificate]:
        return [Certificate(*row) for row in self._db.execute(f"{_CERT_SELECT} {where}", params)]

    def get(self, serial: str) -> Certificate | None:
        found = self._select("WHERE serial = ?", [serial])
        return found[0] if found else None

    def listing(self, *, user: str | None = None, device: str | None = None,
                include_expired: bool = False, now: dt.datetime) -> list[Certificate]:
        """Newest first; without ``include_expired`` only unexpired or revoked ones."""
        where, params = [], []
        if user is not None:
            where.append("kind = 'user' AND subject = ?")
            params.append(user)
        if device is not None:
            where.append("kind = 'device' AND subject = ?")
            params.append(device)
        if not include_expired:
            where.append("(not_after > ? OR revoked_at IS NOT NULL)")
            params.append(iso(now))
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        return self._select(f"{clause}ORDER BY issued_at DESC", params)

    def valid_of(self, kind: str, subject: str, now: dt.datetime) -> list[Certificate]:
        """Unrevoked, unexpired certificates of one subject."""
        return self._select("WHERE kind = ? AND subject = ? AND revoked_at IS NULL AND not_after > ?",
                            [kind, subject, iso(now)])

    def add(self, cert: Certificate) -> None:
        values = {c: getattr(cert, c) for c in _CERT_COLUMNS}
        self._db.execute(f"INSERT INTO certs ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
                         list(values.values()))

    def renewals_since(self, device_id: str, since: dt.datetime) -> list[dt.datetime]:
        """When the device's renewals since ``since`` were issued."""
        return [parse_iso(t) for (t,) in self._db.execute(
            "SELECT issued_at FROM certs WHERE kind = 'device' AND subject = ? AND origin = 'renew' "
            "AND issued_at > ?", [device_id, iso(since)])]

    def mark_first_used(self, serial: str, now: dt.datetime) -> None:
        self._db.execute("UPDATE certs SET first_used_at = ? WHERE serial = ? AND first_used_at IS NULL",
                         [iso(now), serial])

    def supersede(self, serials: Iterable[str], now: dt.datetime, reason: str) -> None:
        """Revoke those of ``serials`` not revoked yet (an earlier revocation keeps its reason)."""
        for serial in serials:
            self._db.execute("UPDATE certs SET revoked_at = ?, revoked_reason = ? "
                             "WHERE serial = ? AND revoked_at IS NULL", [iso(now), reason, serial])

    def revoke(self, serials: Iterable[str], now: dt.datetime, reason: str) -> None:
        for serial in serials:
            self._db.execute("UPDATE certs SET revoked_at = ?, revoked_reason = ? WHERE serial = ?",
                             [iso(now), reason, serial])

    def revoke_all_of(self, kind: str, subject: str, now: dt.datetime, reason: str) -> None:
        """Every certificate the subject ever held that is not revoked yet, renewals included."""
        self._db.execute("UPDATE certs SET revoked_at = ?, revoked_reason = ? "
                         "WHERE kind = ? AND subject = ? AND revoked_at IS NULL",
                         [iso(now), reason, kind, subject])


# --- join tokens ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    """A join token as stored: its secret only as a hash."""

    id: str
    hash: str
    labels: dict[str, str]
    uses_left: int
    uses_total: int
    name_prefix: str
    created_at: str
    expires_at: str
    creator: str
    revoked_at: str | None = None

    def status(self, now: dt.datetime) -> str:
        if self.revoked_at:
            return "revoked"
        if parse_iso(self.expires_at) <= now:
            return "expired"
        return "used" if self.uses_left <= 0 else "valid"

    def summary(self, now: dt.datetime) -> dict:
        """The listing row (``enroll token ls``): never the hash."""
        return {"id": self.id, "status": self.status(now), "labels": self.labels,
                "uses_left": self.uses_left, "uses_total": self.uses_total,
                "name_prefix": self.name_prefix, "expires_at": self.expires_at, "creator": self.creator}

    def row(self) -> dict:
        """As stored (labels as their JSON text)."""
        return {"id": self.id, "hash": self.hash, "labels": json.dumps(self.labels, sort_keys=True),
                "uses_left": self.uses_left, "uses_total": self.uses_total, "name_prefix": self.name_prefix,
                "created_at": self.created_at, "expires_at": self.expires_at, "creator": self.creator,
                "revoked_at": self.revoked_at}


_TOKEN_COLUMNS = ("id", "hash", "labels", "uses_left", "uses_total", "name_prefix", "created_at",
                  "expires_at", "creator", "revoked_at")
_TOKEN_SELECT = f"SELECT {', '.join(_TOKEN_COLUMNS)} FROM tokens"


def _token(row: tuple) -> Token:
    values = dict(zip(_TOKEN_COLUMNS, row, strict=True))
    values["labels"] = json.loads(values["labels"])
    values["name_prefix"] = values["name_prefix"] or ""
    return Token(**values)


class Tokens(_Repository):
    def get(self, token_id: str) -> Token | None:
        row = self._db.execute(f"{_TOKEN_SELECT} WHERE id = ?", [token_id]).fetchone()
        return _token(row) if row else None

    def exists(self, token_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM tokens WHERE id = ?", [token_id]).fetchone() is not None

    def all(self) -> list[Token]:
        return [_token(r) for r in self._db.execute(f"{_TOKEN_SELECT} ORDER BY created_at")]

    def add(self, token: Token) -> None:
        values = token.row()
        self._db.execute(f"INSERT INTO tokens ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
                         list(values.values()))

    def use_one(self, token_id: str) -> None:
        self._db.execute("UPDATE tokens SET uses_left = uses_left - 1 WHERE id = ?", [token_id])

    def revoke(self, token_id: str, now: dt.datetime) -> None:
        self._db.execute("UPDATE tokens SET revoked_at = ? WHERE id = ?", [iso(now), token_id])
