"""Throwaway PKI and loopback helpers for the transport tests (127.0.0.1, 127.0.0.2, ::1 only)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tunnel.transport import TLSIdentity, serve

ALPN = "fleet/1"
ENROLL_ALPN = "fleet-enroll/1"
SERVER_NAME = "proxy.test"

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + 365 * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_leaf(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    cn: str,
    *,
    eku: list[x509.ObjectIdentifier],
    sans: list[x509.GeneralName],
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    is_ca: bool = False,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - DAY)
        .not_valid_after(not_after or NOW + 30 * DAY)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, is_ca, is_ca, False, False),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), False
        )
    )
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _ident(pair, ca) -> TLSIdentity:
    return TLSIdentity(cert_chain=[pair[0]], key=pair[1], ca=ca)


@dataclass
class PKI:
    ca: x509.Certificate
    foreign_ca: x509.Certificate
    server: TLSIdentity
    foreign_server: TLSIdentity
    device: TLSIdentity
    user: TLSIdentity
    expired_device: TLSIdentity
    foreign_device: TLSIdentity
    server_eku_as_client: TLSIdentity
    extra: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="session")
def pki() -> PKI:
    ca = make_ca("fleet test CA")
    foreign = make_ca("foreign CA")
    server_sans = [x509.DNSName(SERVER_NAME), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = make_leaf(ca, "proxy", eku=[ExtendedKeyUsageOID.SERVER_AUTH], sans=server_sans)
    foreign_server = make_leaf(
        foreign, "proxy", eku=[ExtendedKeyUsageOID.SERVER_AUTH], sans=server_sans
    )

    def client(issuer, cn, **kw):
        return make_leaf(
            issuer,
            cn,
            eku=kw.pop("eku", [ExtendedKeyUsageOID.CLIENT_AUTH]),
            sans=[x509.UniformResourceIdentifier(f"spiffe://fleet.test/{cn}")],
            **kw,
        )

    return PKI(
        ca=ca[0],
        foreign_ca=foreign[0],
        server=_ident(server, ca[0]),
        foreign_server=_ident(foreign_server, foreign[0]),
        device=_ident(client(ca, "device/d1"), ca[0]),
        user=_ident(client(ca, "user/alice"), ca[0]),
        expired_device=_ident(
            client(ca, "device/old", not_before=NOW - 10 * DAY, not_after=NOW - DAY), ca[0]
        ),
        foreign_device=_ident(client(foreign, "device/evil"), foreign[0]),
        server_eku_as_client=_ident(
            client(ca, "device/wrong-eku", eku=[ExtendedKeyUsageOID.SERVER_AUTH]), ca[0]
        ),
        extra={"ca_pair": ca, "foreign_pair": foreign, "make_leaf": make_leaf},
    )


def run(coro, timeout: float = 15.0):
    """Run one test coroutine on a fresh event loop with a hard timeout."""

    async def main():
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(main())


class Harness:
    """A running server that records what reached the application."""

    def __init__(self) -> None:
        self.server = None
        self.authorized: list[Any] = []
        self.connections: asyncio.Queue = asyncio.Queue()
        self.streams: list[Any] = []


@contextlib.asynccontextmanager
async def running_server(
    pki: PKI,
    *,
    host: str = "127.0.0.1",
    authorize=None,
    on_connection=None,
    anonymous_alpns=(ENROLL_ALPN,),
    **kw,
):
    h = Harness()

    async def default_authorize(conn):
        h.authorized.append(conn)

    async def default_on_connection(conn):
        await h.connections.put(conn)
        await conn.wait_closed()

    h.server = await serve(
        host,
        0,
        identity=pki.server,
        alpns=[ALPN, ENROLL_ALPN],
        anonymous_alpns=list(anonymous_alpns),
        authorize=authorize or default_authorize,
        on_connection=on_connection or default_on_connection,
        **kw,
    )
    try:
        yield h
    finally:
        h.server.close()
        await h.server.wait_closed()


async def read_all(stream, max_bytes: int = 65536) -> bytes:
    out = bytearray()
    while True:
        chunk = await stream.read(max_bytes)
        if not chunk:
            return bytes(out)
        out += chunk
