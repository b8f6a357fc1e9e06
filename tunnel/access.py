"""Where a session gets authorized: may this engineer reach this device's service as this login?

A pure function of the engineer's admitted identity and the device's *current* registry row,
called by the proxy on every dial and every listing. Until label-based roles land, the ``admin``
role may reach every device that is enrolled, not decommissioned and not locked; nothing is
allowed by default.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from enroll.registry import Device
from tunnel.admission import Denied, Peer, check_device

ADMIN_ROLE = "admin"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    code: str = "ok"
    reason: str = ""


def may_see(peer: Peer, device: Device | None) -> bool:
    return device is not None and ADMIN_ROLE in peer.identity.roles


def decide(
    peer: Peer,
    device_id: str,
    device: Device | None,
    service: str,
    login: str | None,
    *,
    online: bool,
    now: dt.datetime | None = None,
) -> Decision:
    if device is None or not may_see(peer, device):
        # The same answer for "does not exist" and "not yours": no probing for device ids.
        return Decision(
            False, "unknown_device",
            f"no device {device_id!r} that you may reach: check the id with 'tunnel ls'",
        )
    try:
        check_device(device, now or dt.datetime.now(dt.UTC))
    except Denied as denied:
        return Decision(False, denied.code, denied.reason)
    if not online:
        seen = f" (last seen {device.last_seen})" if device.last_seen else " (never connected)"
        return Decision(False, "device_offline", f"device {device.id} is offline{seen}")
    return Decision(True)
