"""Ops actions on enrolled devices: relabel, decommission, lock, unlock.

The registry is authoritative for a device's current labels; the proxy reads it on every
connection and dial, so each change here acts at once. Each action and its audit event commit
in one transaction.
"""

from __future__ import annotations

import datetime as dt
import json

from enroll import audit
from enroll.labels import LIFECYCLE, validate
from enroll.registry import Device, Registry, iso

FOREVER = "9999-12-31T23:59:59.000000Z"


class AdminError(ValueError):
    """The action cannot be done; the message says why."""


def _get(db, device_id: str) -> Device:
    rows = list(db["devices"].rows_where("id = ?", [device_id]))
    if not rows:
        raise AdminError(f"unknown device {device_id!r}: see 'enroll devices' for enrolled ids")
    return Device.from_row(rows[0])


def relabel(
    registry: Registry, device_id: str, set_labels: dict[str, str], remove: list[str], actor: str = "admin"
) -> Device:
    if LIFECYCLE in remove:
        raise AdminError("the lifecycle label cannot be removed; set it to active, maintenance or decommissioned")
    with registry.write() as db:
        dev = _get(db, device_id)
        unknown = [k for k in remove if k not in dev.labels]
        if unknown:
            raise AdminError(f"device {device_id} has no label {unknown[0]!r} to remove")
        new = validate({k: v for k, v in {**dev.labels, **set_labels}.items() if k not in remove})
        if new == dev.labels:
            return dev
        db["devices"].update(device_id, {"labels": json.dumps(new, sort_keys=True)})
        audit.append(
            db, "device.relabel", actor=actor, device=device_id, labels=new, before=dev.labels
        )
    return registry.device(device_id)


def decommission(registry: Registry, device_id: str, actor: str = "admin") -> Device:
    """Lifecycle → decommissioned and the current certificate revoked: it can never connect again."""
    now = dt.datetime.now(dt.UTC)
    with registry.write() as db:
        dev = _get(db, device_id)
        labels = {**dev.labels, LIFECYCLE: "decommissioned"}
        db["devices"].update(device_id, {"labels": json.dumps(labels, sort_keys=True)})
        # every certificate the device ever held, renewals included
        db.execute(
            "UPDATE certs SET revoked_at = ? WHERE kind = 'device' AND subject = ? AND revoked_at IS NULL",
            [iso(now), device_id],
        )
        audit.append(
            db, "device.decommission", actor=actor, device=device_id, labels=labels, now=now,
            revoked_serial=dev.cert_serial,
        )
    return registry.device(device_id)


def lock(
    registry: Registry, device_id: str, ttl: dt.timedelta | None, message: str = "", actor: str = "admin"
) -> Device:
    now = dt.datetime.now(dt.UTC)
    until = iso(now + ttl) if ttl else FOREVER
    with registry.write() as db:
        dev = _get(db, device_id)
        db["devices"].update(device_id, {"locked_until": until, "lock_message": message or None})
        audit.append(
            db, "device.lock", actor=actor, device=device_id, labels=dev.labels, now=now,
            until=until, message=message or None,
        )
    return registry.device(device_id)


def unlock(registry: Registry, device_id: str, actor: str = "admin") -> Device:
    with registry.write() as db:
        dev = _get(db, device_id)
        db["devices"].update(device_id, {"locked_until": None, "lock_message": None})
        audit.append(db, "device.unlock", actor=actor, device=device_id, labels=dev.labels)
    return registry.device(device_id)
