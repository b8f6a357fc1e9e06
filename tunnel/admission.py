"""Who may connect to the proxy: the decision for each peer's certificate, as a pure function.

The transport has already checked that the certificate chains to the fleet CA and is within its
validity period; this module decides whether the identity it names may connect *now*, from the
registry's current view: known certificate, not revoked, device not decommissioned or locked.
Refusals carry a stable code (sent to the peer in the QUIC close and written to the audit log).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from enroll import certs
from enroll.errors import FleetError
from enroll.registry import Device, Registry
from tunnel.protocol import CLOSE_CODES

CODES = CLOSE_CODES


class Denied(FleetError):  # noqa: N818 - reads as "raise Denied(...)"
    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Peer:
    """An admitted peer: an agent (kind ``device``) or an engineer (kind ``user``)."""

    identity: certs.Identity
    device: Device | None = None

    @property
    def kind(self) -> str:
        return self.identity.kind

    @property
    def name(self) -> str:
        return self.identity.name

    @property
    def actor(self) -> str:
        return f"{self.kind}:{self.name}"


def admit(cert, fleet: str, registry: Registry, *, want: str, now: dt.datetime | None = None) -> Peer:
    """Admit a peer whose ALPN asked to be ``want`` (``device`` or ``user``), or raise Denied."""
    now = now or dt.datetime.now(dt.UTC)
    try:
        ident = certs.identity_of(cert, fleet)
    except certs.CertError as exc:
        raise Denied("not_fleet_certificate", str(exc)) from None
    if ident.kind != want:
        raise Denied(
            "wrong_kind",
            f"a {ident.kind} certificate cannot connect as a {want}; use the {want}'s own identity",
        )
    if not registry.cert_known(ident.serial_hex):
        raise Denied("unknown_identity", f"certificate {ident.serial_hex} of {ident.name} is not in the registry")
    if registry.cert_revoked(ident.serial_hex):
        raise Denied("revoked", f"certificate {ident.serial_hex} of {ident.name} was revoked")
    if want == "user":
        return Peer(ident)
    device = registry.device(ident.name)
    if device is None:
        raise Denied("unknown_identity", f"device {ident.name} is not enrolled")
    return Peer(ident, check_device(device, now))


def check_device(device: Device, now: dt.datetime) -> Device:
    """The part of admission that can change while connected (relabel, lock, decommission)."""
    if device.lifecycle == "decommissioned":
        raise Denied("decommissioned", f"device {device.id} is decommissioned")
    if device.locked(now):
        message = f": {device.lock_message}" if device.lock_message else ""
        raise Denied("locked", f"device {device.id} is locked until {device.locked_until}{message}")
    return device
