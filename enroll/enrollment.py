"""The CA step of enrollment: token + CSR in, signed identity bundle out.

Used by ``enroll sign`` (offline, air-gapped lines) and by the proxy's enrollment endpoint
(online). Everything happens in one registry transaction: the token use, the device row, the
certificate row and the audit events commit together, so a refused or killed enrollment leaves
no trace but its ``device.enroll.denied`` event.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets

from enroll import audit, certs, tokens
from enroll.registry import Registry, iso
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


def renew(
    state: FleetState, registry: Registry, device_id: str, csr_pem: str, *, now: dt.datetime | None = None
) -> str:
    """A fresh certificate for an admitted device, carrying the registry's *current* labels."""
    now = now or dt.datetime.now(dt.UTC)
    public_key = certs.check_csr(csr_pem)
    with registry.write() as db:
        rows = list(db["devices"].rows_where("id = ?", [device_id]))
        if not rows:
            raise EnrollError(f"device {device_id} is not enrolled")
        labels = json.loads(rows[0]["labels"])
        cert = certs.issue(
            state.ca_cert, state.ca_key, public_key, kind="device", fleet=state.fleet,
            name=device_id, labels=labels, lifetime=state.lifetime("device"), now=now,
        )
        serial = format(cert.serial_number, "x")
        db["certs"].insert({
            "serial": serial, "kind": "device", "subject": device_id, "issued_at": iso(now),
            "not_after": iso(cert.not_valid_after_utc), "revoked_at": None,
        })
        db["devices"].update(device_id, {"cert_serial": serial})
        audit.append(
            db, "cert.issue", actor=f"device:{device_id}", device=device_id, labels=labels,
            now=now, kind="device", serial=serial, not_after=iso(cert.not_valid_after_utc),
            renewal=True,
        )
    return certs.cert_pem(cert).decode()


def issue_user(
    state: FleetState, registry: Registry, name: str, public_key, roles: list[str],
    ttl: dt.timedelta, *, actor: str = "admin", now: dt.datetime | None = None,
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
            "not_after": iso(cert.not_valid_after_utc), "revoked_at": None,
        })
        audit.append(
            db, "cert.issue", actor=actor, actor_roles=roles, now=now, kind="user", user=name,
            serial=serial, not_after=iso(cert.not_valid_after_utc),
        )
    return cert
