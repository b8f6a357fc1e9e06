"""Where a session gets authorized: may this engineer reach this device's service as this login?

Called by the proxy on every dial, listing, SSH certificate request, and once a second for every
open session (so a relabel, lock or decommission cuts sessions at once). Pure functions over a
policy snapshot (:class:`enroll.snapshot.PolicySnapshot`): the device's labels and lock, the
user's lock and roles, the roles' definitions, revoked certificates, as the registry held them
when the proxy last refreshed the snapshot (off the event loop, whenever the registry's policy
changed). No I/O here, so the per-second re-check of thousands of sessions costs none. The role
semantics themselves are in :mod:`enroll.roles`.

What is authorized is always a *canonical* service name (:func:`canonical_service`): the name
the device lists, decided at the proxy before authorization and audit. An engineer may name a
service by its port (ssh's ``%p``); that port is turned into the one listed name listening on it,
so ``deny: services: [postgres]`` also refuses postgres's port, and the audit log says
``service=postgres``. Anything else — other spellings, Unicode digits, unlisted names — is
refused.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass

from enroll.addresses import ascii_port
from enroll.labels import SERVICE_NAME_RULE, valid_service_name
from enroll.registry import Device
from enroll.roles import Role, check, visible
from enroll.snapshot import PolicySnapshot
from tunnel.admission import Denied, Peer, check_device


@dataclass(frozen=True)
class Decision:
    allowed: bool
    code: str = "ok"
    reason: str = ""


def peer_roles(snapshot: PolicySnapshot, peer: Peer) -> list[Role]:
    """A registered user's roles come from the registry (so changes act at once); an identity
    issued with ``enroll user issue`` and no user record holds the roles in its certificate."""
    user = snapshot.user(peer.name)
    return snapshot.roles_named(user.roles if user else peer.identity.roles)


def user_denial(snapshot: PolicySnapshot, peer: Peer, now: dt.datetime) -> Decision | None:
    if now > peer.identity.not_after:
        return Decision(False, "expired", f"your certificate expired at {peer.identity.not_after:%H:%M}Z: log in again")
    if snapshot.cert_revoked(peer.identity.serial_hex):
        return Decision(False, "revoked",
                        f"certificate {peer.identity.serial_hex} of {peer.name} was revoked: log in again")
    user = snapshot.user(peer.name)
    if user and user.locked(now):
        message = f": {user.lock_message}" if user.lock_message else ""
        return Decision(False, "user_locked", f"user {peer.name} is locked{message}")
    return None


def may_see(roles: list[Role], device: Device | None) -> bool:
    """Listed for the holder of ``roles`` (compute the roles once per listing)."""
    return device is not None and visible(roles, device.labels)


def decide(
    snapshot: PolicySnapshot,
    peer: Peer,
    device_id: str,
    service: str,
    login: str | None,
    *,
    online: bool = True,
    now: dt.datetime | None = None,
) -> Decision:
    """May ``peer`` reach ``service`` as ``login`` on ``device_id`` now? (pure)

    Checked in this order: the engineer's certificate (expired, revoked) and account (locked);
    whether the device exists *for this engineer* (one answer for "no such device" and "not
    yours"); the roles (deny wins); the device's lifecycle and lock; whether its agent is online.
    """
    now = now or dt.datetime.now(dt.UTC)
    if denial := user_denial(snapshot, peer, now):
        return denial
    device = snapshot.device(device_id)
    roles = peer_roles(snapshot, peer)
    if device is None or not visible(roles, device.labels):
        # The same answer for "does not exist" and "not yours": no probing for device ids.
        return Decision(False, "unknown_device",
                        f"no device {device_id!r} that you may reach: check the id with 'tunnel ls'")
    verdict = check(roles, device.labels, service, login)
    if not verdict.allowed:
        return Decision(False, "forbidden", f"{device_id}: {verdict.reason}")
    try:
        check_device(device, now)
    except Denied as denied:
        return Decision(False, denied.code, denied.reason)
    if not online:
        seen = f" (last seen {device.last_seen})" if device.last_seen else " (never connected)"
        return Decision(False, "device_offline", f"device {device.id} is offline{seen}")
    return Decision(True)


@dataclass(frozen=True)
class Service:
    """The canonical service for a requested string, and whether the device offers it.

    ``name`` is the canonical name when there is one (a well-formed name, even one the device
    does not list, or the name a port resolved to), else None; ``code`` is ``ok`` or why the
    session is refused.
    """

    name: str | None
    code: str = "ok"
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.code == "ok"


def service_table(reported: object) -> dict[str, int]:
    """The name → port table from an agent's hello, keeping only well-formed entries."""
    if not isinstance(reported, dict):
        return {}
    return {name: port for name, port in reported.items()
            if valid_service_name(name) and type(port) is int and 1 <= port < 65536}


def canonical_service(requested: str, table: Mapping[str, int] | None, device_id: str) -> Service:
    """The one name a session is authorized, audited and opened under (pure).

    ``table`` is the device's listed services (name → port) as its agent reported them, or
    None when the agent has not reported one. A port (ASCII digits only) becomes the single
    listed service listening on it; a name must be of the strict form and, when the table is
    known, listed. Everything else is refused: ``bad_service`` for what is neither a name nor
    a port (or a port the table cannot resolve), ``unknown_service`` for what the device does
    not list.
    """
    listed = ", ".join(sorted(table)) if table else "none"
    if isinstance(requested, str) and requested.isascii() and requested.isdigit():
        port = ascii_port(requested)
        if table is None:
            return Service(None, "bad_service",
                           f"{device_id} does not report which service listens on port {requested}: "
                           "name the service instead")
        names = sorted(name for name, p in table.items() if p == port) if port else []
        if not names:
            return Service(None, "unknown_service",
                           f"{device_id} exposes no service {requested!r}: no listed service listens "
                           f"on that port (listed: {listed})")
        if len(names) > 1:
            return Service(None, "bad_service",
                           f"port {requested} on {device_id} is ambiguous ({', '.join(names)}): name the service")
        return Service(names[0])
    if not valid_service_name(requested):
        return Service(None, "bad_service",
                       f"{requested!r} is not a service name or port: a name is {SERVICE_NAME_RULE}; "
                       "a port is ASCII digits")
    if table is not None and requested not in table:
        return Service(requested, "unknown_service",
                       f"{device_id} exposes no service {requested!r} (listed: {listed})")
    return Service(requested)
