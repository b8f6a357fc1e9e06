"""The policy snapshot: what authorization needs from the registry, in memory and immutable.

Admission (:mod:`tunnel.admission`) and session authorization (:mod:`tunnel.access`) are pure
functions over a :class:`PolicySnapshot`: devices with their labels, lifecycle and lock, users
with their roles and lock, the roles' definitions, and which certificates are known and which
revoked. The proxy re-checks every open session and connected agent once a second; over a
snapshot that costs no I/O, and the tenant matrix can be tested without a database.

:func:`load` builds a snapshot from a registry (in one read transaction, so it is consistent);
the proxy does that off the event loop whenever :func:`policy_version` says a policy table
changed (a counter per table bumped by triggers, see ``_v5`` in :mod:`enroll.registry`; audit
writes and ``last_seen`` updates do not bump it, so a busy proxy does not rebuild for its own
bookkeeping). Given the current snapshot, :func:`load` re-reads only the tables whose version
moved: a login adds a certificate, and only the certificates are read again.

Certificates: every revoked serial is kept (a connected peer's certificate may be revoked at any
time, however old); of the others only those not expired for more than :data:`KNOWN_MARGIN`,
since the transport refuses expired certificates before admission looks at them.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from enroll.registry import Device, Registry, iso, parse_iso
from enroll.roles import Role, role_from_spec

#: valid-certificate serials kept in a snapshot: those expired for less than this
KNOWN_MARGIN = dt.timedelta(days=1)

_EMPTY: Mapping = MappingProxyType({})


@dataclass(frozen=True)
class UserPolicy:
    """What authorization reads about a registered user (no secrets)."""

    name: str
    roles: tuple[str, ...] = ()
    locked_until: str | None = None
    lock_message: str | None = None

    def locked(self, now: dt.datetime) -> bool:
        return self.locked_until is not None and parse_iso(self.locked_until) > now


@dataclass(frozen=True)
class PolicySnapshot:
    """One consistent view of the registry's policy tables. Never changed once built.

    ``version`` is the registry's policy version per table it was built at (empty for one
    built in memory).
    """

    devices: Mapping[str, Device] = field(default_factory=lambda: _EMPTY)
    users: Mapping[str, UserPolicy] = field(default_factory=lambda: _EMPTY)
    roles: Mapping[str, Role] = field(default_factory=lambda: _EMPTY)
    known_serials: frozenset[str] = frozenset()
    revoked_serials: frozenset[str] = frozenset()
    version: tuple[tuple[str, int], ...] = ()

    @classmethod
    def build(cls, *, devices: Iterable[Device] = (), users: Iterable[UserPolicy] = (),
              roles: Iterable[Role] = (), known_serials: Iterable[str] = (),
              revoked_serials: Iterable[str] = (),
              version: tuple[tuple[str, int], ...] = ()) -> PolicySnapshot:
        """A snapshot from records (tests build them in memory; :func:`load` from a registry)."""
        revoked = frozenset(revoked_serials)
        return cls(
            MappingProxyType({d.id: d for d in devices}),
            MappingProxyType({u.name: u for u in users}),
            MappingProxyType({r.name: r for r in roles}),
            frozenset(known_serials) | revoked,
            revoked,
            version,
        )

    def device(self, device_id: str) -> Device | None:
        return self.devices.get(device_id)

    def user(self, name: str) -> UserPolicy | None:
        return self.users.get(name)

    def roles_named(self, names: Iterable[str]) -> list[Role]:
        """The current definitions of ``names``; a role that no longer exists grants nothing."""
        return [self.roles[n] for n in sorted(set(names)) if n in self.roles]

    def cert_known(self, serial_hex: str) -> bool:
        return serial_hex in self.known_serials

    def cert_revoked(self, serial_hex: str) -> bool:
        return serial_hex in self.revoked_serials


def policy_version(registry: Registry) -> tuple[tuple[str, int], ...]:
    """The registry's policy version per table: moves whenever a table a snapshot reads changes."""
    return tuple(registry._db.execute("SELECT name, version FROM policy_version ORDER BY name").fetchall())


def load(registry: Registry, now: dt.datetime | None = None,
         current: PolicySnapshot | None = None) -> PolicySnapshot:
    """Read a snapshot in one read transaction (consistent across tables).

    With ``current``, the tables whose version did not move are taken from it, not read again;
    if none moved, ``current`` itself is returned.
    """
    now = now or dt.datetime.now(dt.UTC)
    conn = registry._db.conn
    own = not conn.in_transaction
    if own:
        conn.execute("BEGIN")
    try:
        version = policy_version(registry)
        before = dict(current.version) if current is not None else {}
        moved = {name for name, v in version if before.get(name) != v}
        if current is not None and not moved:
            return current
        devices = current.devices if "devices" not in moved and current else MappingProxyType({
            id_: Device(id_, _labels(labels), serial, enrolled, seen, until, message)
            for id_, labels, serial, enrolled, seen, until, message in conn.execute(
                "SELECT id, labels, cert_serial, enrolled_at, last_seen, locked_until, lock_message "
                "FROM devices")})
        users = current.users if "users" not in moved and current else MappingProxyType({
            name: UserPolicy(name, tuple(json.loads(roles)), until, message)
            for name, roles, until, message in conn.execute(
                "SELECT name, roles, locked_until, lock_message FROM users")})
        roles = current.roles if "roles" not in moved and current else MappingProxyType({
            name: _parsed(spec) for name, spec in conn.execute("SELECT name, spec FROM roles")})
        if "certs" not in moved and current:
            known, revoked = current.known_serials, current.revoked_serials
        else:
            revoked = frozenset(s for (s,) in conn.execute(
                "SELECT serial FROM certs WHERE revoked_at IS NOT NULL"))
            known = revoked | frozenset(s for (s,) in conn.execute(
                "SELECT serial FROM certs WHERE revoked_at IS NULL AND not_after > ?",
                [iso(now - KNOWN_MARGIN)]))
    finally:
        if own:
            conn.execute("COMMIT")
    return PolicySnapshot(devices, users, roles, known, revoked, version)


@functools.lru_cache(maxsize=65536)
def _labels(text: str) -> dict[str, str]:
    """Label sets repeat across a fleet and between rebuilds: each text is parsed once. The dict
    is shared by every device with that text, so it is never modified (nothing does)."""
    return json.loads(text)


@functools.lru_cache(maxsize=1024)
def _parsed(spec_json: str) -> Role:
    """Each stored version of a role is parsed once, however often snapshots are rebuilt."""
    return role_from_spec(json.loads(spec_json))
