"""Where a session gets authorized: may this engineer reach this device's service as this login?

Called by the proxy on every dial, listing, SSH certificate request, and once a second for every
open session (so a relabel, lock or decommission cuts sessions at once). It reads the *current*
registry: the device's labels and lock, the user's lock and roles, the roles' definitions. The
role semantics themselves are in :mod:`enroll.roles`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from enroll import users
from enroll.registry import Device, Registry
from enroll.roles import Role, check, visible
from tunnel.admission import Denied, Peer, check_device


@dataclass(frozen=True)
class Decision:
    allowed: bool
    code: str = "ok"
    reason: str = ""


def peer_roles(registry: Registry, peer: Peer) -> list[Role]:
    """A registered user's roles come from the registry (so changes act at once); an identity
    issued with ``enroll user issue`` and no user record holds the roles in its certificate."""
    user = users.get(registry, peer.name)
    names = user["roles"] if user else list(peer.identity.roles)
    return users.load_roles(registry, names)


def user_denial(registry: Registry, peer: Peer, now: dt.datetime) -> Decision | None:
    if now > peer.identity.not_after:
        return Decision(False, "expired", f"your certificate expired at {peer.identity.not_after:%H:%M}Z: log in again")
    user = users.get(registry, peer.name)
    if user and users.locked(user, now):
        message = f": {user['lock_message']}" if user["lock_message"] else ""
        return Decision(False, "user_locked", f"user {peer.name} is locked{message}")
    return None


def may_see(roles: list[Role], device: Device | None) -> bool:
    """Listed for the holder of ``roles`` (compute the roles once per listing)."""
    return device is not None and visible(roles, device.labels)


def decide(
    registry: Registry,
    peer: Peer,
    device_id: str,
    device: Device | None,
    service: str,
    login: str | None,
    *,
    online: bool = True,
    now: dt.datetime | None = None,
) -> Decision:
    now = now or dt.datetime.now(dt.UTC)
    if denial := user_denial(registry, peer, now):
        return denial
    roles = peer_roles(registry, peer)
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
