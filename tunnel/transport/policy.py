"""Pure decision logic of the transport, testable without sockets (no aioquic import).

* certificate chain checks against the pinned fleet CA;
* flow-control accounting (credit granted on consumption, send high-water mark);
* close-code descriptions;
* address normalisation for dual-stack sockets.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import socket
from typing import Any, Literal

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    DNSName,
    IPAddress,
    PolicyBuilder,
    Store,
    VerificationError,
)

from enroll.errors import FleetError

# --------------------------------------------------------------------------- certificates


class CertificateRejected(FleetError, code="certificate_rejected"):  # noqa: N818
    """A peer certificate failed verification. ``expired`` distinguishes validity-period errors;
    ``intercepted`` says the certificate is not of the fleet's PKI at all (TLS interception)."""

    def __init__(self, reason: str, *, expired: bool = False, intercepted: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.expired = expired
        self.intercepted = intercepted


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def spki_pin(cert: x509.Certificate) -> str:
    """``sha256:<hex>`` of a certificate's SubjectPublicKeyInfo (how devices pin the fleet CA)."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(spki).hexdigest()


def pinned_ca(
    leaf: x509.Certificate | None, chain: list[x509.Certificate], pin: str
) -> x509.Certificate:
    """The CA certificate in a server's chain whose key matches ``pin``.

    A device being enrolled knows only the pin; the proxy sends the CA in its chain. When no
    certificate matches, the network is most likely intercepting TLS: say so, naming the issuer.
    """
    for cert in chain:
        if spki_pin(cert) == pin.lower():
            return cert
    issuer = leaf.issuer.rfc4514_string() if leaf is not None else "none"
    raise CertificateRejected(
        f"the server's certificate does not chain to the pinned fleet CA ({pin}); presented "
        f"issuer: {issuer}. If the network is intercepting TLS, exempt the proxy from inspection",
        intercepted=True,
    )


def verify_peer_chain(
    leaf: x509.Certificate | None,
    intermediates: list[x509.Certificate],
    ca: x509.Certificate,
    *,
    purpose: Literal["client", "server"],
    server_name: str | None = None,
    now: datetime.datetime | None = None,
) -> None:
    """Verify ``leaf`` (+ ``intermediates``) chains to the pinned ``ca`` for ``purpose``.

    Checks, in order (first failure wins, with a readable reason):
    the pinned CA is a CA; the leaf is present, not a CA, inside its validity period and carries
    the clientAuth (purpose="client") or serverAuth (purpose="server") extended key usage; then
    the signature path, validity of every certificate, CA constraints and (server) the SAN match
    of ``server_name`` via ``cryptography.x509.verification`` (RFC 5280 / webpki profile, with
    ``ca`` as the only trust anchor). Raises CertificateRejected.
    """
    now = now or _utcnow()
    if leaf is None:
        raise CertificateRejected(f"no {purpose} certificate presented")
    try:
        bc = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise CertificateRejected("the pinned fleet CA certificate is not a CA")

    if now < leaf.not_valid_before_utc:
        raise CertificateRejected(
            f"{purpose} certificate not valid before {leaf.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}",
            expired=True,
        )
    if now > leaf.not_valid_after_utc:
        raise CertificateRejected(
            f"{purpose} certificate expired at {leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}",
            expired=True,
        )
    try:
        leaf_bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
        if leaf_bc.ca:
            raise CertificateRejected(f"{purpose} certificate is a CA certificate")
    except x509.ExtensionNotFound:
        pass
    wanted = ExtendedKeyUsageOID.CLIENT_AUTH if purpose == "client" else ExtendedKeyUsageOID.SERVER_AUTH
    try:
        ekus = set(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        ekus = set()
    except ValueError as exc:
        raise CertificateRejected(f"{purpose} certificate extensions unparsable: {exc}") from exc
    if wanted not in ekus:
        raise CertificateRejected(f"{purpose} certificate lacks the {purpose}Auth extended key usage")

    builder = PolicyBuilder().store(Store([ca])).time(now)
    try:
        if purpose == "client":
            builder.build_client_verifier().verify(leaf, intermediates)
        else:
            if not server_name:
                raise CertificateRejected("no server_name to check the server certificate against")
            try:
                subject: DNSName | IPAddress = IPAddress(ipaddress.ip_address(server_name))
            except ValueError:
                subject = DNSName(server_name)
            builder.build_server_verifier(subject).verify(leaf, intermediates)
    except VerificationError as exc:
        raise CertificateRejected(
            f"{purpose} certificate not accepted by the pinned fleet CA "
            f"({ca.subject.rfc4514_string()}): {exc}"
        ) from exc


# --------------------------------------------------------------------------- flow control

#: Default per-stream receive window (bytes of credit granted beyond what the app consumed).
DEFAULT_STREAM_WINDOW = 1 << 20
#: Default per-stream send high-water mark (bytes queued but not yet acknowledged).
DEFAULT_SEND_HIGH_WATER = 1 << 20


def next_receive_limit(consumed: int, advertised: int, window: int) -> int:
    """New MAX_STREAM_DATA to advertise, given what the application has ``consumed``.

    Credit is re-granted only once the peer's remaining credit ``advertised - consumed`` has
    fallen to half a window, and then up to ``consumed + window``. So the bytes a peer may have
    in flight or buffered with us beyond what the application read never exceed ``window``, and
    the limit never decreases (as long as the invariant ``advertised - consumed <= window`` held
    before, which it does from the initial ``advertised = window, consumed = 0``).
    """
    if advertised - consumed <= window // 2:
        return max(advertised, consumed + window)
    return advertised


def send_allowance(buffered: int, high_water: int, blocked: bool) -> int:
    """How many more bytes a writer may queue on a stream now.

    ``buffered`` counts bytes queued but not yet acknowledged by the peer. A writer fills up to
    ``high_water``; once it had to wait (``blocked``) it resumes only when the buffer drained to
    half the mark (hysteresis, so we do not wake per ACK). The buffer never exceeds
    ``high_water``.
    """
    if blocked and buffered > high_water // 2:
        return 0
    return max(0, high_water - buffered)


# --------------------------------------------------------------------------- error codes

_QUIC_TRANSPORT_ERRORS = {
    0x0: "NO_ERROR",
    0x1: "INTERNAL_ERROR",
    0x2: "CONNECTION_REFUSED",
    0x3: "FLOW_CONTROL_ERROR",
    0x4: "STREAM_LIMIT_ERROR",
    0x5: "STREAM_STATE_ERROR",
    0x6: "FINAL_SIZE_ERROR",
    0x7: "FRAME_ENCODING_ERROR",
    0x8: "TRANSPORT_PARAMETER_ERROR",
    0x9: "CONNECTION_ID_LIMIT_ERROR",
    0xA: "PROTOCOL_VIOLATION",
    0xB: "INVALID_TOKEN",
    0xC: "APPLICATION_ERROR",
    0xD: "CRYPTO_BUFFER_EXCEEDED",
    0xE: "KEY_UPDATE_ERROR",
    0xF: "AEAD_LIMIT_REACHED",
    0x10: "NO_VIABLE_PATH",
}

_TLS_ALERTS = {
    10: "unexpected_message",
    40: "handshake_failure",
    42: "bad_certificate",
    43: "unsupported_certificate",
    44: "certificate_revoked",
    45: "certificate_expired",
    46: "certificate_unknown",
    47: "illegal_parameter",
    48: "unknown_ca",
    50: "decode_error",
    51: "decrypt_error",
    80: "internal_error",
    116: "certificate_required",
    120: "no_application_protocol",
}

CRYPTO_ERROR_BASE = 0x100


def tls_alert_of(code: int) -> int | None:
    """The TLS alert carried in a QUIC CRYPTO_ERROR transport code (0x100-0x1ff), if any."""
    if CRYPTO_ERROR_BASE <= code <= 0x1FF:
        return code - CRYPTO_ERROR_BASE
    return None


def describe_close(code: int, reason: str, *, application: bool) -> str:
    """Human-readable description of a CONNECTION_CLOSE."""
    if application:
        from .base import ErrorCode

        try:
            name = ErrorCode(code).name
        except ValueError:
            name = f"application error {code}"
        return f"{name}: {reason}" if reason else name
    alert = tls_alert_of(code)
    if alert is not None:
        name = f"TLS alert {_TLS_ALERTS.get(alert, alert)}"
    else:
        name = _QUIC_TRANSPORT_ERRORS.get(code, f"transport error {code:#x}")
    return f"{name}: {reason}" if reason else name


# --------------------------------------------------------------------------- addresses


def normalize_address(addr: Any) -> tuple[str, int]:
    """(host, port) for reporting: IPv4-mapped IPv6 ``::ffff:a.b.c.d`` becomes ``a.b.c.d``."""
    host, port = addr[0], int(addr[1])
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host, port
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped), port
    return host, port


def socket_address(host: str, port: int, family: int) -> tuple[Any, ...]:
    """``(host, port)`` in the form a socket of ``family`` uses (and reports in recvfrom).

    An AF_INET6 (dual-stack) socket speaks IPv4 as ``::ffff:a.b.c.d``; an AF_INET socket cannot
    reach an IPv6 address (ValueError).
    """
    ip = ipaddress.ip_address(host)
    if family == socket.AF_INET:
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is None:
                raise ValueError(f"{host} is IPv6, the connection is IPv4")
            ip = ip.ipv4_mapped
        return (str(ip), port)
    if family == socket.AF_INET6:
        if isinstance(ip, ipaddress.IPv4Address):
            return (f"::ffff:{ip}", port, 0, 0)
        return (str(ip), port, 0, 0)
    raise ValueError(f"unsupported address family {family}")


def bind_address(host: str, port: int, family: int) -> tuple[Any, ...]:
    """Local address to bind a socket of ``family`` that talks to a peer of the same family.

    Unlike ``socket_address`` an IPv4 address is never mapped into IPv6: a migration must keep
    the address family of the connection (ValueError otherwise).
    """
    ip = ipaddress.ip_address(host)
    if family == socket.AF_INET6 and (
        isinstance(ip, ipaddress.IPv4Address) or ip.ipv4_mapped is not None
    ):
        raise ValueError(f"{host} is IPv4, the connection is IPv6")
    return socket_address(host, port, family)


# --------------------------------------------------------------------------- TLS over TCP
# (used by tcp.py; Python's ssl reports peer alerts as SSLError.reason strings and cannot hand
# out the peer's chain, so the server certificate checks are phrased here, without sockets)


def interception_message(leaf: x509.Certificate | None, host: str) -> str:
    """The plain statement shown when the server's certificate is not from the fleet CA."""
    issuer = leaf.issuer.rfc4514_string() if leaf is not None else "none"
    return (
        f"the network is intercepting TLS: presented issuer {issuer}; "
        f"exempt {host} from inspection"
    )


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except Exception:  # ValueError (names), TypeError (key type), InvalidSignature
        return False
    return True


def chains_to(
    leaf: x509.Certificate, intermediates: list[x509.Certificate], ca: x509.Certificate
) -> bool:
    """Whether ``leaf`` was signed by ``ca``, directly or through one of ``intermediates``.

    Signatures only (no validity, names or usages): it tells "a certificate of our PKI that
    is wrong for another reason" apart from "somebody else's certificate".
    """
    if _issued_by(leaf, ca):
        return True
    return any(_issued_by(leaf, i) and _issued_by(i, ca) for i in intermediates)


def verify_server_leaf(
    leaf: x509.Certificate | None,
    intermediates: list[x509.Certificate],
    ca: x509.Certificate,
    *,
    server_name: str,
    host: str,
) -> None:
    """``verify_peer_chain`` for a server, worded for people behind a TLS-inspecting network.

    A leaf that is not signed by ``ca`` at all is reported as interception (naming its issuer
    and the ``host`` to exempt); a leaf of our PKI that fails for another reason (name, expiry,
    usage) keeps the precise reason. Raises CertificateRejected.
    """
    try:
        verify_peer_chain(leaf, intermediates, ca, purpose="server", server_name=server_name)
    except CertificateRejected as exc:
        if leaf is None or chains_to(leaf, intermediates, ca):
            raise
        raise CertificateRejected(
            f"{interception_message(leaf, host)} ({exc.reason})", expired=exc.expired,
            intercepted=True,
        ) from exc


def ca_for_pin(
    leaf: x509.Certificate | None, offered: list[x509.Certificate], pin: str, *, host: str
) -> x509.Certificate:
    """The certificate among ``offered`` (sent by the server) whose key matches ``pin``.

    Like ``pinned_ca`` but with the interception wording: no match means that whoever answered
    is not the fleet proxy -- in practice a TLS-inspecting middlebox.
    """
    for cert in offered:
        if spki_pin(cert) == pin.lower():
            return cert
    raise CertificateRejected(
        f"{interception_message(leaf, host)} (no certificate offered by the server matches the "
        f"pinned fleet CA {pin})",
        intercepted=True,
    )


def tls_alert_from_ssl_reason(reason: str | None) -> int | None:
    """The TLS alert number in an OpenSSL reason such as ``TLSV1_ALERT_UNKNOWN_CA`` (48)."""
    if not reason or "ALERT_" not in reason:
        return None
    name = reason.rsplit("ALERT_", 1)[1].lower()
    for number, alert in _TLS_ALERTS.items():
        if alert == name:
            return number
    return None
