"""The CA step of enrollment: token + CSR in, signed identity bundle out.

Used by ``enroll sign`` (offline, air-gapped lines) and by the proxy's enrollment endpoint
(online). Everything happens in one registry transaction: the token use, the device row, the
certificate row and the audit events commit together, so a refused or killed enrollment leaves
no trace but its ``device.enroll.denied`` event.
"""

from __future__ import annotations

import datetime as dt
import math
import secrets
from dataclasses import dataclass

from enroll import audit, certs, tokens
from enroll.registry import Registry, iso, parse_iso
from enroll.repositories import Certificate, Certificates, Devices
from enroll.request import BUNDLE_VERSION, EnrollError, sign_bundle
from enroll.state import FleetState

# Engineers may write `ssh LOGIN@DEVICE.fleet` (see `tunnel config`); the host certificate
# names both forms so strict host checking works for either.
SSH_HOST_SUFFIX = ".fleet"

def _device_id(db, requested: str | None, prefix: str) -> str:
    if requested:
        certs.check_name(requested)
        if Devices(db).exists(requested):
            raise EnrollError(
                f"device name {requested!r} is already enrolled: choose another --name, "
                "or decommission the old device first"
            )
        return requested
    for _ in range(10):
        candidate = certs.check_name(f"{prefix}{secrets.token_hex(3)}")
        if not Devices(db).exists(candidate):
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
            used = tokens.consume(db, parsed, now)
            labels = used.labels
            device_id = _device_id(db, request.get("name"), used.name_prefix)
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
            Devices(db).add(device_id, labels, serial, request["ssh_host_key"].strip(), now)
            Certificates(db).add(Certificate(serial, "device", device_id, iso(now),
                                             iso(cert.not_valid_after_utc)))
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
        dev = Devices(db).get(device_id)
        if dev is None:
            raise RenewalError("unknown_identity", f"device {device_id} is not enrolled")
        labels = dev.labels
        live = [CertRow(c.serial, parse_iso(c.issued_at), parse_iso(c.first_used_at) if c.first_used_at else None)
                for c in Certificates(db).valid_of("device", device_id, now)]
        renewed = Certificates(db).renewals_since(device_id, now - renewal_window(lifetime))
        plan = plan_renewal(live, renewed, now, lifetime)
        if not plan.allowed:
            raise RenewalError("renewal_limited", plan.reason)
        cert = certs.issue(
            state.ca_cert, state.ca_key, public_key, kind="device", fleet=state.fleet,
            name=device_id, labels=labels, lifetime=lifetime, now=now,
        )
        serial = format(cert.serial_number, "x")
        Certificates(db).supersede(plan.supersede, now,
                                   f"superseded: replaced by renewal {serial} before it was used")
        Certificates(db).add(Certificate(serial, "device", device_id, iso(now), iso(cert.not_valid_after_utc),
                                         origin="renew"))
        Devices(db).set_cert(device_id, serial)
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
    repo = Certificates(db)
    current = repo.get(serial)
    if current is None or current.kind != "device" or current.subject != device_id:
        return []
    if not current.first_used_at:
        repo.mark_first_used(serial, now)
    older = [c.serial for c in repo.valid_of("device", device_id, now)
             if c.serial != serial and c.issued_at < current.issued_at]
    if older:
        repo.supersede(older, now, f"superseded by {serial}: the device connected with its renewed certificate")
        dev = Devices(db).get(device_id)
        audit.append(db, "cert.revoke", actor=f"device:{device_id}", device=device_id,
                     labels=dev.labels if dev else None, now=now,
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
        Certificates(db).add(Certificate(serial, "user", name, iso(now), iso(cert.not_valid_after_utc),
                                         origin=origin))
        audit.append(
            db, "cert.issue", actor=actor, actor_roles=roles, now=now, kind="user", user=name,
            serial=serial, not_after=iso(cert.not_valid_after_utc),
        )
    return cert
