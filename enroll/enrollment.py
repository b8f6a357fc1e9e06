"""The CA step of enrollment: token + CSR in, signed identity bundle out.

Used by ``enroll sign`` (offline, air-gapped lines) and by the proxy's enrollment endpoint
(online). Everything happens in one registry transaction: the token use, the device row, the
certificate row and the audit events commit together, so a refused or killed enrollment leaves
no trace but its ``device.enroll.denied`` event.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import secrets
from dataclasses import dataclass

from enroll import audit, certs, tokens
from enroll.registry import Registry, iso, parse_iso
from enroll.request import BUNDLE_VERSION, EnrollError, sign_bundle
from enroll.state import FleetState

# Engineers may write `ssh LOGIN@DEVICE.fleet` (see `tunnel config`); the host certificate
# names both forms so strict host checking works for either.
SSH_HOST_SUFFIX = ".fleet"

def _device_id(db, requested: str | None, prefix: str) -> str:
    if requested:
        certs.check_name(requested)
        if db["devices"].count_where("id = ?", [requested]):
            raise EnrollError(
                f"device name {requested!r} is already enrolled: choose another --name, "
                "or decommission the old device first"
            )
        return requested
    for _ in range(10):
        candidate = certs.check_name(f"{prefix}{secrets.token_hex(3)}")
        if not db["devices"].count_where("id = ?", [candidate]):
            return candidate
    raise EnrollError("could not pick a free device name; pass --name")


def enroll(
    state: FleetState,
    registry: Registry,
    request: dict,
    token: str,
    *,
    remote: str | None = None,
    now: dt.datetime | None = None,
) -> dict:
    """Check everything, then register the device and return its bundle. Raises EnrollError."""
    now = now or dt.datetime.now(dt.UTC)
    fleet = state.fleet
    token_id = None
    try:
        parsed = tokens.parse(token, fleet)
        token_id = parsed.id
        public_key = certs.check_csr(request["csr"])
        host_key = certs.load_ssh_public(request["ssh_host_key"])
        with registry.write() as db:
            row = tokens.consume(db, parsed, now)
            labels = json.loads(row["labels"])
            device_id = _device_id(db, request.get("name"), row["name_prefix"] or "")
            cert = certs.issue(
                state.ca_cert, state.ca_key, public_key,
                kind="device", fleet=fleet, name=device_id, labels=labels,
                lifetime=state.lifetime("device"), now=now,
            )
            host_cert = certs.ssh_certificate(
                state.ssh_host_ca_key, host_key, host=True, key_id=f"{fleet}/{device_id}",
                principals=[device_id, f"{device_id}{SSH_HOST_SUFFIX}"],
                lifetime=state.lifetime("ssh_host"), now=now,
            )
            serial = format(cert.serial_number, "x")
            db["devices"].insert(
                {
                    "id": device_id,
                    "labels": json.dumps(labels, sort_keys=True),
                    "cert_serial": serial,
                    "ssh_host_key": request["ssh_host_key"].strip(),
                    "enrolled_at": iso(now),
                    "last_seen": None,
                    "locked_until": None,
                    "lock_message": None,
                }
            )
            db["certs"].insert(
                {
                    "serial": serial,
                    "kind": "device",
                    "subject": device_id,
                    "issued_at": iso(now),
                    "not_after": iso(cert.not_valid_after_utc),
                    "revoked_at": None,
                }
            )
            audit.append(
                db, "device.enroll", actor=f"token:{parsed.id}", device=device_id,
                labels=labels, now=now, remote=remote, token=parsed.id,
            )
            audit.append(
                db, "cert.issue", actor="ca", device=device_id, labels=labels, now=now,
                kind="device", serial=serial, not_after=iso(cert.not_valid_after_utc),
            )
    except (EnrollError, tokens.TokenError, certs.CertError) as exc:
        with registry.write() as db:
            audit.append(
                db, "device.enroll.denied", actor=f"token:{token_id}" if token_id else "unknown",
                result="denied", reason=str(exc), now=now, remote=remote,
                requested_name=request.get("name"),
            )
        raise EnrollError(str(exc)) from None
    # The CA signs every field: the device trusts none of them until the signature verifies
    # against its pinned CA (see enroll.device.verify_bundle).
    return sign_bundle({
        "version": BUNDLE_VERSION,
        "fleet": fleet,
        "device_id": device_id,
        "labels": labels,
        "cert": certs.cert_pem(cert).decode(),
        "ca": certs.cert_pem(state.ca_cert).decode(),
        "ssh_host_cert": host_cert,
        "ssh_user_ca": state.ssh_ca_public("user"),
        "ssh_host_ca": state.ssh_ca_public("host"),
        "proxy": {
            "address": state.proxy_address,
            "server_name": state.config["proxy_name"],
        },
    }, state.ca_key)


# --- renewal ----------------------------------------------------------------------------------
#
# A device holds one certificate at a time; the registry admits only its current one.
#
# - Renewal issues a successor but does not revoke the certificate the agent is using: if the
#   reply is lost, the agent still holds only that one and must be able to connect and retry.
# - The first time the device connects with a newer certificate, every older one is
#   superseded (revoked, reason ``superseded``): from then on a copy of an old certificate is
#   refused at admission with code ``revoked`` and an ``access.denied`` event
#   (:func:`device_connected`, called by the proxy when it records ``device.connect``).
# - At most one renewal is outstanding: a renewal while an issued successor was never used
#   (its reply was lost, or the agent asked again) revokes that unused one. So a device has at
#   most two live certificates: the one in use and one successor not yet used.
# - At most RENEWALS_PER_WINDOW renewals per device per sixth of the device lifetime; the
#   agent needs one per two thirds of it, the rest leaves room for retries after lost replies
#   while the current certificate still has a third of its life left.

RENEWALS_PER_WINDOW = 5


class RenewalError(EnrollError):
    """A renewal refused; ``code`` is sent to the agent and audited."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class CertRow:
    serial: str
    issued_at: dt.datetime
    first_used_at: dt.datetime | None = None


@dataclass(frozen=True)
class RenewalPlan:
    allowed: bool
    reason: str = ""
    retry_after: dt.timedelta | None = None
    #: issued successors never used, replaced by this renewal
    supersede: tuple[str, ...] = ()


def renewal_window(lifetime: dt.timedelta) -> dt.timedelta:
    return max(lifetime / 6, dt.timedelta(seconds=1))


def plan_renewal(live: list[CertRow], renewed_at: list[dt.datetime], now: dt.datetime,
                 lifetime: dt.timedelta) -> RenewalPlan:
    """Decide a renewal from the device's live certificates and its recent renewal times."""
    window = renewal_window(lifetime)
    recent = sorted(t for t in renewed_at if t > now - window)
    if len(recent) >= RENEWALS_PER_WINDOW:
        retry = recent[len(recent) - RENEWALS_PER_WINDOW] + window - now
        return RenewalPlan(False, f"renewal limit reached: {len(recent)} renewals in the last "
                                  f"{_span(window)}; the current certificate stays valid, retry in "
                                  f"{_span(retry)}", retry)
    used = [c for c in live if c.first_used_at is not None]
    newest_used = max((c.issued_at for c in used), default=None)
    unused = tuple(c.serial for c in live if c.first_used_at is None
                   and newest_used is not None and c.issued_at > newest_used)
    return RenewalPlan(True, supersede=unused)


def _span(t: dt.timedelta) -> str:
    seconds = max(1, math.ceil(t.total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size * 2:
            return f"{math.ceil(seconds / size)}{unit}"
    return f"{seconds}s"


def _live_device_certs(db, device_id: str, now: dt.datetime) -> list[dict]:
    return list(db["certs"].rows_where(
        "kind = 'device' AND subject = ? AND revoked_at IS NULL AND not_after > ?",
        [device_id, iso(now)]))


def _revoke(db, serials, now: dt.datetime, reason: str) -> None:
    for serial in serials:
        db.execute("UPDATE certs SET revoked_at = ?, revoked_reason = ? WHERE serial = ? AND revoked_at IS NULL",
                   [iso(now), reason, serial])


def renew(
    state: FleetState, registry: Registry, device_id: str, csr_pem: str, *, now: dt.datetime | None = None
) -> str:
    """A fresh certificate for an admitted device, carrying the registry's *current* labels.

    Raises RenewalError (nothing changed) for a bad CSR, an unknown device or the rate limit;
    see the comment above for which certificates stay valid.
    """
    now = now or dt.datetime.now(dt.UTC)
    try:
        public_key = certs.check_csr(csr_pem)
    except certs.CertError as exc:
        raise RenewalError("bad_csr", f"renewal refused: {exc}") from None
    lifetime = state.lifetime("device")
    with registry.write() as db:
        rows = list(db["devices"].rows_where("id = ?", [device_id]))
        if not rows:
            raise RenewalError("unknown_identity", f"device {device_id} is not enrolled")
        labels = json.loads(rows[0]["labels"])
        live = [CertRow(r["serial"], parse_iso(r["issued_at"]),
                        parse_iso(r["first_used_at"]) if r["first_used_at"] else None)
                for r in _live_device_certs(db, device_id, now)]
        renewed = [parse_iso(r["issued_at"]) for r in db["certs"].rows_where(
            "kind = 'device' AND subject = ? AND origin = 'renew' AND issued_at > ?",
            [device_id, iso(now - renewal_window(lifetime))])]
        plan = plan_renewal(live, renewed, now, lifetime)
        if not plan.allowed:
            raise RenewalError("renewal_limited", plan.reason)
        cert = certs.issue(
            state.ca_cert, state.ca_key, public_key, kind="device", fleet=state.fleet,
            name=device_id, labels=labels, lifetime=lifetime, now=now,
        )
        serial = format(cert.serial_number, "x")
        _revoke(db, plan.supersede, now, f"superseded: replaced by renewal {serial} before it was used")
        db["certs"].insert({
            "serial": serial, "kind": "device", "subject": device_id, "issued_at": iso(now),
            "not_after": iso(cert.not_valid_after_utc), "revoked_at": None, "origin": "renew",
        })
        db["devices"].update(device_id, {"cert_serial": serial})
        audit.append(
            db, "cert.issue", actor=f"device:{device_id}", device=device_id, labels=labels,
            now=now, kind="device", serial=serial, not_after=iso(cert.not_valid_after_utc),
            renewal=True,
        )
        if plan.supersede:
            audit.append(db, "cert.revoke", actor=f"device:{device_id}", device=device_id, labels=labels,
                         now=now, reason="superseded", kind="device", serials=list(plan.supersede),
                         superseded_by=serial)
    return certs.cert_pem(cert).decode()


def device_connected(db, device_id: str, serial: str, now: dt.datetime) -> list[str]:
    """Record that the device connected with ``serial``; supersede its older certificates.

    Runs inside the proxy's ``device.connect`` write. Returns the serials superseded (audited
    as one ``cert.revoke`` event, reason ``superseded``).
    """
    rows = list(db["certs"].rows_where("serial = ? AND kind = 'device' AND subject = ?", [serial, device_id]))
    if not rows:
        return []
    if not rows[0]["first_used_at"]:
        db["certs"].update(serial, {"first_used_at": iso(now)})
    older = [r["serial"] for r in _live_device_certs(db, device_id, now)
             if r["serial"] != serial and r["issued_at"] < rows[0]["issued_at"]]
    if older:
        _revoke(db, older, now, f"superseded by {serial}: the device connected with its renewed certificate")
        dev = list(db["devices"].rows_where("id = ?", [device_id]))
        audit.append(db, "cert.revoke", actor=f"device:{device_id}", device=device_id,
                     labels=json.loads(dev[0]["labels"]) if dev else None, now=now,
                     reason="superseded", kind="device", serials=older, superseded_by=serial)
    return older


def issue_user(
    state: FleetState, registry: Registry, name: str, public_key, roles: list[str],
    ttl: dt.timedelta, *, actor: str = "admin", now: dt.datetime | None = None, origin: str = "issue",
):
    """A short-lived user certificate; recorded so the proxy knows and can revoke it."""
    now = now or dt.datetime.now(dt.UTC)
    certs.check_name(name, "user name")
    cert = certs.issue(
        state.ca_cert, state.ca_key, public_key, kind="user", fleet=state.fleet, name=name,
        roles=roles, lifetime=ttl, now=now,
    )
    serial = format(cert.serial_number, "x")
    with registry.write() as db:
        db["certs"].insert({
            "serial": serial, "kind": "user", "subject": name, "issued_at": iso(now),
            "not_after": iso(cert.not_valid_after_utc), "revoked_at": None, "origin": origin,
        })
        audit.append(
            db, "cert.issue", actor=actor, actor_roles=roles, now=now, kind="user", user=name,
            serial=serial, not_after=iso(cert.not_valid_after_utc),
        )
    return cert
