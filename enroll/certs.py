"""X.509 and OpenSSH certificate logic for the fleet: issue, parse and check. No I/O.

One fleet CA signs three kinds of certificate, and a certificate of one kind can never stand in
for another: the kind is written twice — as a SPIFFE-style SAN URI
(``spiffe://FLEET/device/ID``, ``.../user/NAME``, ``.../proxy/NAME``) and as a private extended
key usage — and :func:`identity_of` demands that both agree. Device labels travel signed inside
the certificate (canonical JSON in a non-critical private extension), so a device cannot claim
labels the token did not grant. Private OIDs hang off a UUID arc (``2.25.<uuid>``, ITU-T X.667),
which needs no registration and cannot collide.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import re
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import ssh
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from enroll.errors import FleetError
from enroll.labels import canonical_json
from enroll.names import NAME_RULE, is_name

FLEET_ARC = "2.25.166496121068501678861767238488010321711"
OID_LABELS = x509.ObjectIdentifier(FLEET_ARC + ".1")
OID_ROLES = x509.ObjectIdentifier(FLEET_ARC + ".3")
KIND_EKU = {
    "device": x509.ObjectIdentifier(FLEET_ARC + ".2.1"),
    "user": x509.ObjectIdentifier(FLEET_ARC + ".2.2"),
    "proxy": x509.ObjectIdentifier(FLEET_ARC + ".2.3"),
}
KINDS = tuple(KIND_EKU)

SUPPORTED_CURVES = (ec.SECP256R1, ec.SECP384R1)


class CertError(FleetError, ValueError, code="certificate"):
    """A certificate, CSR or key is not acceptable; the message says why and what to do."""


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def check_name(name: str, what: str = "device name") -> str:
    if not is_name(name):
        raise CertError(f"bad {what} {name!r}: use {NAME_RULE}")
    return name


# --- keys -----------------------------------------------------------------------------------


def new_key() -> ec.EllipticCurvePrivateKey:
    """ECDSA P-256: fast to sign, supported by every TLS 1.3 stack we talk to."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_key(pem: bytes):
    return serialization.load_pem_private_key(pem, password=None)


def load_cert(pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise CertError(f"not a PEM certificate: {exc}") from None


def public_key_pin(public_key) -> str:
    """``sha256:<hex>`` of the SubjectPublicKeyInfo: what devices pin to trust the CA."""
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(spki).hexdigest()


def ca_pin(ca_cert: x509.Certificate) -> str:
    return public_key_pin(ca_cert.public_key())


# --- X.509 issuance -------------------------------------------------------------------------


def _der_utf8(text: str) -> bytes:
    """DER UTF8String: the extension value of the labels extension."""
    data = text.encode()
    n = len(data)
    if n < 0x80:
        length = bytes([n])
    else:
        size = (n.bit_length() + 7) // 8
        length = bytes([0x80 | size]) + n.to_bytes(size, "big")
    return b"\x0c" + length + data


def _read_der_utf8(data: bytes) -> str:
    if len(data) < 2 or data[0] != 0x0C:
        raise CertError("malformed labels extension")
    n, offset = data[1], 2
    if n & 0x80:
        size = n & 0x7F
        n, offset = int.from_bytes(data[2 : 2 + size], "big"), 2 + size
    if offset + n != len(data):
        raise CertError("malformed labels extension")
    return data[offset:].decode()


def spiffe_id(fleet: str, kind: str, name: str) -> str:
    return f"spiffe://{fleet}/{kind}/{name}"


def make_ca(fleet: str, key, lifetime: dt.timedelta = dt.timedelta(days=3650)) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{fleet} fleet CA")])
    now = utcnow()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )


def issue(
    ca_cert: x509.Certificate,
    ca_key,
    public_key,
    *,
    kind: str,
    fleet: str,
    name: str,
    lifetime: dt.timedelta,
    labels: dict[str, str] | None = None,
    roles: list[str] | None = None,
    dns_names: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """Sign a leaf certificate of ``kind`` for ``name``. Labels go only into device certificates."""
    if kind not in KIND_EKU:
        raise CertError(f"unknown certificate kind {kind!r}")
    ca_public = ca_cert.public_key()
    if not isinstance(ca_public, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise CertError("the CA certificate's key is neither EC nor Ed25519: make the CA with 'enroll init'")
    now = now or utcnow()
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id(fleet, kind, name))]
    sans += [x509.DNSName(d) for d in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    usage = [ExtendedKeyUsageOID.SERVER_AUTH if kind == "proxy" else ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + lifetime, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([*usage, KIND_EKU[kind]]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public), False
        )
    )
    if kind == "device":
        value = _der_utf8(canonical_json(labels or {}))
        builder = builder.add_extension(x509.UnrecognizedExtension(OID_LABELS, value), False)
    if kind == "user":
        value = _der_utf8(json.dumps(sorted(roles or [])))
        builder = builder.add_extension(x509.UnrecognizedExtension(OID_ROLES, value), False)
    return builder.sign(ca_key, hashes.SHA256())


# --- reading identities ---------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """Who a fleet certificate names. Built only by :func:`identity_of`."""

    kind: str
    fleet: str
    name: str
    serial: int
    not_after: dt.datetime
    labels: dict[str, str] = field(default_factory=dict)
    roles: tuple[str, ...] = ()

    @property
    def serial_hex(self) -> str:
        return format(self.serial, "x")


def _extension_value(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str | None:
    try:
        ext = cert.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        return None
    if not isinstance(ext.value, x509.UnrecognizedExtension):  # our OIDs are private: always so
        return None
    return _read_der_utf8(ext.value.value)


def identity_of(cert: x509.Certificate, fleet: str | None = None) -> Identity:
    """Read a fleet identity; the SAN URI and the kind's key usage must agree."""
    try:
        uris = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.UniformResourceIdentifier)
        ekus = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        raise CertError("not a fleet certificate: no SPIFFE URI or key usage") from None
    ids = [u for u in uris if u.startswith("spiffe://")]
    if len(ids) != 1:
        raise CertError("not a fleet certificate: expected exactly one spiffe:// URI")
    m = re.fullmatch(r"spiffe://([a-z0-9-]+)/(device|user|proxy)/([a-z0-9-]+)", ids[0])
    if not m:
        raise CertError(f"not a fleet certificate: unexpected identity {ids[0]!r}")
    cert_fleet, kind, name = m.groups()
    marked = [k for k, oid in KIND_EKU.items() if oid in ekus]
    if marked != [kind]:
        raise CertError(f"certificate kind mismatch: URI says {kind}, key usage says {marked}")
    if fleet is not None and cert_fleet != fleet:
        raise CertError(f"certificate belongs to fleet {cert_fleet!r}, not {fleet!r}")
    labels = json.loads(_extension_value(cert, OID_LABELS) or "{}") if kind == "device" else {}
    roles = tuple(json.loads(_extension_value(cert, OID_ROLES) or "[]")) if kind == "user" else ()
    return Identity(kind, cert_fleet, name, cert.serial_number, cert.not_valid_after_utc, labels, roles)


def verify_issued_by(cert: x509.Certificate, ca_cert: x509.Certificate, now=None) -> None:
    """Check that ``ca_cert`` signed ``cert`` and that ``cert`` is within its validity period."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise CertError(
            f"certificate {cert.subject.rfc4514_string()} was not issued by this fleet's CA"
        ) from None
    now = now or utcnow()
    if now < cert.not_valid_before_utc:
        raise CertError("certificate is not valid yet (check the clock)")
    if now > cert.not_valid_after_utc:
        raise CertError(f"certificate expired at {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}")


# --- CSRs -----------------------------------------------------------------------------------


def make_csr(key) -> x509.CertificateSigningRequest:
    """An empty-subject CSR: the CA, not the device, decides the name and the labels."""
    return x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(
        key, hashes.SHA256()
    )


def csr_pem(key) -> str:
    return make_csr(key).public_bytes(serialization.Encoding.PEM).decode()


def check_csr(pem: bytes | str):
    """Return the CSR's public key if it is acceptable; raise CertError saying why not."""
    if isinstance(pem, str):
        pem = pem.encode()
    try:
        csr = x509.load_pem_x509_csr(pem)
    except ValueError:
        raise CertError("malformed CSR: expected a PEM 'CERTIFICATE REQUEST'") from None
    if not csr.is_signature_valid:
        raise CertError("CSR signature is invalid: the request was altered or signed with another key")
    key = csr.public_key()
    if not (isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, SUPPORTED_CURVES)):
        raise CertError("unsupported key in CSR: use an ECDSA P-256 or P-384 key")
    if len(csr.subject) or len(csr.extensions):
        raise CertError(
            "the CSR asks for its own name, labels or extensions; the CA decides those. "
            "Send an empty-subject CSR and pass the name with --name"
        )
    return key


# --- OpenSSH certificates -------------------------------------------------------------------


def new_ssh_ca_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def ssh_private_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )


def ssh_public_line(key, comment: str = "") -> str:
    line = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()
    return f"{line} {comment}".rstrip()


def load_ssh_public(line: str):
    try:
        key = serialization.load_ssh_public_key(line.strip().encode())
    except (ValueError, UnsupportedAlgorithm):
        raise CertError("malformed SSH public key: expected one 'ssh-ed25519 AAAA...' line") from None
    if not isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
        raise CertError("unsupported SSH key type: use ed25519 or ecdsa")
    return key


def ssh_certificate(
    ca_key,
    public_key,
    *,
    host: bool,
    key_id: str,
    principals: list[str],
    lifetime: dt.timedelta,
    now: dt.datetime | None = None,
) -> str:
    """An OpenSSH certificate line. User certificates get only the pty/forwarding extensions."""
    now = now or utcnow()
    builder = (
        ssh.SSHCertificateBuilder()
        .public_key(public_key)
        .serial(x509.random_serial_number() >> 96)
        .type(ssh.SSHCertificateType.HOST if host else ssh.SSHCertificateType.USER)
        .key_id(key_id.encode())
        .valid_principals([p.encode() for p in principals])
        .valid_after(int((now - dt.timedelta(minutes=5)).timestamp()))
        .valid_before(int((now + lifetime).timestamp()))
    )
    if not host:
        for ext in (b"permit-pty", b"permit-port-forwarding"):
            builder = builder.add_extension(ext, b"")
    cert = builder.sign(ca_key)
    return cert.public_bytes().decode()


# --- detached signatures by the fleet CA (enrollment bundles) ---------------------------------


def sign_blob(key, data: bytes) -> bytes:
    """Sign ``data`` with a fleet CA key (ECDSA P-256/P-384 with SHA-256, or Ed25519).

    Callers must prefix ``data`` with a context string of their own, so a signature made for one
    purpose can never be replayed as another (the CA key also signs certificates, whose signed
    part is DER and starts with 0x30, never with printable text).
    """
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    raise CertError("unsupported CA key type for signing: use ECDSA or Ed25519")


def verify_blob(public_key, signature: bytes, data: bytes) -> bool:
    """True if ``signature`` over ``data`` verifies with ``public_key`` (see :func:`sign_blob`)."""
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, data)
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True


def _ssh_public_bytes(key) -> bytes:
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def check_ssh_host_certificate(line: str, ca_line: str, host_key_line: str, device_id: str,
                               aliases: tuple[str, ...] = (), now: dt.datetime | None = None) -> None:
    """Check an OpenSSH host certificate for ``device_id``; raise CertError saying what is wrong.

    It must be a host certificate signed by the SSH host CA ``ca_line`` (signature checked), name
    ``device_id`` as a principal and nothing but it and ``aliases``, certify ``host_key_line``
    (the device's own sshd key), and be valid now. sshd would serve any certificate it is given,
    so this is the only place a swapped one can be caught.
    """
    try:
        cert = ssh.load_ssh_public_identity(line.strip().encode())
    except (ValueError, UnsupportedAlgorithm):
        raise CertError("the SSH host certificate is malformed: expected one '...-cert-v01@openssh.com' line") from None
    if not isinstance(cert, ssh.SSHCertificate):
        raise CertError("the SSH host certificate is a plain key, not a certificate")
    if cert.type != ssh.SSHCertificateType.HOST:
        raise CertError("the SSH host certificate is a user certificate, not a host certificate")
    ca = load_ssh_public(ca_line)
    if _ssh_public_bytes(cert.signature_key()) != _ssh_public_bytes(ca):
        raise CertError("the SSH host certificate was signed by another CA than the fleet's SSH host CA")
    try:
        cert.verify_cert_signature()
    except (InvalidSignature, ValueError):
        raise CertError("the SSH host certificate's signature is invalid (altered after signing)") from None
    principals = [p.decode(errors="replace") for p in cert.valid_principals]
    if device_id not in principals or not set(principals) <= {device_id, *aliases}:
        raise CertError(
            f"the SSH host certificate is for {', '.join(principals) or 'any host'}, not for {device_id}"
        )
    if _ssh_public_bytes(cert.public_key()) != _ssh_public_bytes(load_ssh_public(host_key_line)):
        raise CertError("the SSH host certificate certifies another key than this device's sshd host key")
    stamp = int((now or utcnow()).timestamp())
    if not cert.valid_after <= stamp < cert.valid_before:
        raise CertError("the SSH host certificate is not valid now (check the clock)")
