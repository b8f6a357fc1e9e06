"""Who may connect to the proxy: the decision for each peer's certificate, as a pure function.

The transport has already checked that the certificate chains to the fleet CA and is within its
validity period; this module decides whether the identity it names may connect *now*, from a
policy snapshot (:class:`enroll.snapshot.PolicySnapshot`, the registry's view held in memory
by the proxy): known certificate, not revoked, device not decommissioned or locked. No I/O here:
the proxy refreshes the snapshot (off the event loop) before it asks. Refusals carry a stable
code (sent to the peer in the QUIC close and written to the audit log).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from enroll import certs
from enroll.errors import FleetError
from enroll.registry import Device
from enroll.snapshot import PolicySnapshot
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


def identify(cert, fleet: str) -> certs.Identity:
    """The fleet identity a certificate names, or Denied (``not_fleet_certificate``)."""
    try:
        return certs.identity_of(cert, fleet)
    except certs.CertError as exc:
        raise Denied("not_fleet_certificate", str(exc)) from None


def admit(cert, fleet: str, snapshot: PolicySnapshot, *, want: str, now: dt.datetime | None = None) -> Peer:
    """Admit a peer whose ALPN asked to be ``want`` (``device`` or ``user``), or raise Denied.

    ``cert`` is a certificate or the :class:`certs.Identity` already read from it.
    """
    now = now or dt.datetime.now(dt.UTC)
    ident = cert if isinstance(cert, certs.Identity) else identify(cert, fleet)
    if ident.kind != want:
        raise Denied(
            "wrong_kind",
            f"a {ident.kind} certificate cannot connect as a {want}; use the {want}'s own identity",
        )
    if not snapshot.cert_known(ident.serial_hex):
        raise Denied("unknown_identity", f"certificate {ident.serial_hex} of {ident.name} is not in the registry")
    if snapshot.cert_revoked(ident.serial_hex):
        raise Denied("revoked", f"certificate {ident.serial_hex} of {ident.name} was revoked")
    if want == "user":
        return Peer(ident)
    device = snapshot.device(ident.name)
    if device is None:
        raise Denied("unknown_identity", f"device {ident.name} is not enrolled")
    return Peer(ident, check_device(device, now))


def seen_by(snapshot: PolicySnapshot, ident: certs.Identity) -> bool:
    """Whether ``snapshot`` knows this certificate (and its device) at all.

    False means the snapshot may predate the identity (it was issued a moment ago): the proxy
    then refreshes the snapshot once before admitting or refusing.
    """
    if not (snapshot.cert_known(ident.serial_hex) or snapshot.cert_revoked(ident.serial_hex)):
        return False
    return ident.kind != "device" or snapshot.device(ident.name) is not None


def recheck_agent(snapshot: PolicySnapshot, peer: Peer, now: dt.datetime) -> Denied | None:
    """Why a connected agent must be cut now (removed, certificate revoked, decommissioned,
    locked), or None. Run once a second for every connected agent."""
    device = snapshot.device(peer.name)
    try:
        if device is None:
            raise Denied("unknown_identity", f"device {peer.name} was removed")
        if snapshot.cert_revoked(peer.identity.serial_hex):
            raise Denied("revoked", f"certificate {peer.identity.serial_hex} of {peer.name} was revoked")
        check_device(device, now)
    except Denied as denied:
        return denied
    return None


def check_device(device: Device, now: dt.datetime) -> Device:
    """The part of admission that can change while connected (relabel, lock, decommission)."""
    if device.lifecycle == "decommissioned":
        raise Denied("decommissioned", f"device {device.id} is decommissioned")
    if device.locked(now):
        message = f": {device.lock_message}" if device.lock_message else ""
        raise Denied("locked", f"device {device.id} is locked until {device.locked_until}{message}")
    return device
