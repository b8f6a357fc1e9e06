"""Ops actions on enrolled devices (relabel, decommission, lock, unlock) and certificates.

The registry is authoritative for a device's current labels; the proxy's policy snapshot
follows every change here before its next admission, dial or once-a-second re-check, so each
change acts at once. Each action and its audit event commit in one transaction. Storage is the
repositories' (:mod:`enroll.repositories`); this module holds the rules.
"""

from __future__ import annotations

import datetime as dt

from enroll import audit
from enroll.errors import FleetError
from enroll.labels import LIFECYCLE, validate
from enroll.registry import Device, Registry, iso
from enroll.repositories import FOREVER, Certificate, Certificates, Devices

__all__ = ["FOREVER", "AdminError"]


class AdminError(FleetError, ValueError, code="admin"):
    """The action cannot be done; the message says why."""


def _get(db, device_id: str) -> Device:
    dev = Devices(db).get(device_id)
    if dev is None:
        raise AdminError(f"unknown device {device_id!r}: see 'enroll devices' for enrolled ids")
    return dev


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
        Devices(db).set_labels(device_id, new)
        audit.append(
            db, "device.relabel", actor=actor, device=device_id, labels=new, before=dev.labels
        )
    return _get(registry, device_id)


def decommission(registry: Registry, device_id: str, actor: str = "admin") -> Device:
    """Lifecycle → decommissioned and the current certificate revoked: it can never connect again."""
    now = dt.datetime.now(dt.UTC)
    with registry.write() as db:
        dev = _get(db, device_id)
        labels = {**dev.labels, LIFECYCLE: "decommissioned"}
        Devices(db).set_labels(device_id, labels)
        # every certificate the device ever held, renewals included
        Certificates(db).revoke_all_of("device", device_id, now, "decommissioned")
        audit.append(
            db, "device.decommission", actor=actor, device=device_id, labels=labels, now=now,
            revoked_serial=dev.cert_serial,
        )
    return _get(registry, device_id)


def lock(
    registry: Registry, device_id: str, ttl: dt.timedelta | None, message: str = "", actor: str = "admin"
) -> Device:
    now = dt.datetime.now(dt.UTC)
    until = iso(now + ttl) if ttl else FOREVER
    with registry.write() as db:
        dev = _get(db, device_id)
        Devices(db).set_lock(device_id, until, message or None)
        audit.append(
            db, "device.lock", actor=actor, device=device_id, labels=dev.labels, now=now,
            until=until, message=message or None,
        )
    return _get(registry, device_id)


def unlock(registry: Registry, device_id: str, actor: str = "admin") -> Device:
    with registry.write() as db:
        dev = _get(db, device_id)
        Devices(db).clear_lock(device_id)
        audit.append(db, "device.unlock", actor=actor, device=device_id, labels=dev.labels)
    return _get(registry, device_id)


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
    return [c.as_dict(now) for c in Certificates(registry).listing(
        user=user, device=device, include_expired=include_expired, now=now)]


def revoke_cert(registry: Registry, serial: str, message: str = "", actor: str = "admin") -> dict:
    """Revoke one certificate by serial; its holder is refused from the next connection on."""
    serial = _serial(serial)
    now = dt.datetime.now(dt.UTC)
    with registry.write() as db:
        cert = Certificates(db).get(serial)
        if cert is None:
            raise AdminError(f"no certificate {serial}: see 'enroll cert ls'")
        if cert.revoked_at:
            raise AdminError(f"certificate {serial} was already revoked at {cert.revoked_at}")
        _revoke_rows(db, [cert], now, message, actor)
    return _row(cert, revoked_at=iso(now))


def _row(cert: Certificate, **changes) -> dict:
    """The certificate as the registry holds it (what ``enroll cert revoke`` reports)."""
    return {c: getattr(cert, c) for c in ("serial", "kind", "subject", "issued_at", "not_after",
                                          "revoked_at", "origin", "first_used_at", "revoked_reason")} | changes


def revoke_user_certs(registry: Registry, name: str, message: str = "", actor: str = "admin") -> list[str]:
    """Revoke every unexpired certificate of user ``name`` (login and ``enroll user issue``)."""
    now = dt.datetime.now(dt.UTC)
    with registry.write() as db:
        certs = Certificates(db).valid_of("user", name, now)
        if not certs:
            raise AdminError(f"user {name!r} holds no valid certificate: see 'enroll cert ls --user {name}'")
        _revoke_rows(db, certs, now, message, actor)
    return [c.serial for c in certs]


def _revoke_rows(db, certs: list[Certificate], now: dt.datetime, message: str, actor: str) -> None:
    reason = f"revoked by {actor}" + (f": {message}" if message else "")
    Certificates(db).revoke([c.serial for c in certs], now, reason)
    first = certs[0]
    device = first.subject if first.kind == "device" else None
    found = Devices(db).get(device) if device else None
    audit.append(db, "cert.revoke", actor=actor, device=device, labels=found.labels if found else None,
                 now=now, reason=message or "revoked by an operator", kind=first.kind,
                 user=first.subject if first.kind == "user" else None,
                 serials=[c.serial for c in certs])
