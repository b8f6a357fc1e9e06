"""Ops actions on enrolled devices (relabel, decommission, lock, unlock) and certificates.

The registry is authoritative for a device's current labels; the proxy reads it on every
connection and dial, so each change here acts at once. Each action and its audit event commit
in one transaction.
"""

from __future__ import annotations

import datetime as dt
import json

from enroll import audit
from enroll.errors import FleetError
from enroll.labels import LIFECYCLE, validate
from enroll.registry import Device, Registry, iso

FOREVER = "9999-12-31T23:59:59.000000Z"


class AdminError(FleetError, ValueError, code="admin"):
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
            "UPDATE certs SET revoked_at = ?, revoked_reason = 'decommissioned' "
            "WHERE kind = 'device' AND subject = ? AND revoked_at IS NULL",
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


# --- certificates -----------------------------------------------------------------------------
#
# Every certificate the CA issues is in ``certs``; the proxy admits a certificate only while its
# row is not revoked (``tunnel/admission.py``), so revoking here refuses its next connection.


def _serial(text: str) -> str:
    """Serials as the registry writes them: lowercase hex, no leading zeros, ``:`` and ``0x`` allowed."""
    cleaned = text.strip().lower().replace(":", "").removeprefix("0x")
    try:
        return format(int(cleaned, 16), "x")
    except ValueError:
        raise AdminError(f"bad serial {text!r}: give it in hex as 'enroll cert ls' shows it") from None


def list_certs(registry: Registry, *, user: str | None = None, device: str | None = None,
               include_expired: bool = False, now: dt.datetime | None = None) -> list[dict]:
    """Issued certificates, newest first, with their status: valid, expired or revoked."""
    now = now or dt.datetime.now(dt.UTC)
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
    rows = registry.db["certs"].rows_where(" AND ".join(where) or None, params,
                                           order_by="issued_at DESC")
    out = []
    for r in rows:
        status = "revoked" if r["revoked_at"] else ("expired" if r["not_after"] <= iso(now) else "valid")
        out.append({"serial": r["serial"], "kind": r["kind"], "subject": r["subject"], "status": status,
                    "issued_at": r["issued_at"], "not_after": r["not_after"], "origin": r["origin"],
                    "first_used_at": r["first_used_at"], "revoked_at": r["revoked_at"],
                    "revoked_reason": r["revoked_reason"]})
    return out


def revoke_cert(registry: Registry, serial: str, message: str = "", actor: str = "admin") -> dict:
    """Revoke one certificate by serial; its holder is refused from the next connection on."""
    serial = _serial(serial)
    now = dt.datetime.now(dt.UTC)
    with registry.write() as db:
        rows = list(db["certs"].rows_where("serial = ?", [serial]))
        if not rows:
            raise AdminError(f"no certificate {serial}: see 'enroll cert ls'")
        row = rows[0]
        if row["revoked_at"]:
            raise AdminError(f"certificate {serial} was already revoked at {row['revoked_at']}")
        _revoke_rows(db, [row], now, message, actor)
    return {**row, "revoked_at": iso(now)}


def revoke_user_certs(registry: Registry, name: str, message: str = "", actor: str = "admin") -> list[str]:
    """Revoke every unexpired certificate of user ``name`` (login and ``enroll user issue``)."""
    now = dt.datetime.now(dt.UTC)
    with registry.write() as db:
        rows = list(db["certs"].rows_where(
            "kind = 'user' AND subject = ? AND revoked_at IS NULL AND not_after > ?", [name, iso(now)]))
        if not rows:
            raise AdminError(f"user {name!r} holds no valid certificate: see 'enroll cert ls --user {name}'")
        _revoke_rows(db, rows, now, message, actor)
    return [r["serial"] for r in rows]


def _revoke_rows(db, rows: list[dict], now: dt.datetime, message: str, actor: str) -> None:
    reason = f"revoked by {actor}" + (f": {message}" if message else "")
    for row in rows:
        db.execute("UPDATE certs SET revoked_at = ?, revoked_reason = ? WHERE serial = ?",
                   [iso(now), reason, row["serial"]])
    first = rows[0]
    device = first["subject"] if first["kind"] == "device" else None
    labels = None
    if device:
        found = list(db["devices"].rows_where("id = ?", [device]))
        labels = json.loads(found[0]["labels"]) if found else None
    audit.append(db, "cert.revoke", actor=actor, device=device, labels=labels, now=now,
                 reason=message or "revoked by an operator", kind=first["kind"],
                 user=first["subject"] if first["kind"] == "user" else None,
                 serials=[r["serial"] for r in rows])
