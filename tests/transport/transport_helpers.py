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

from tunnel.transport import TLSIdentity, connect, serve

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
    identity: TLSIdentity | None = None,
    authorize=None,
    on_connection=None,
    anonymous_alpns=(ENROLL_ALPN,),
    serve=serve,
    **kw,
):
    """A loopback server of one transport (``serve``: QUIC's by default) recording what
    reached the application."""
    h = Harness()

    async def default_authorize(conn):
        h.authorized.append(conn)

    async def default_on_connection(conn):
        await h.connections.put(conn)
        await conn.wait_closed()

    h.server = await serve(
        host,
        0,
        identity=identity or pki.server,
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


@contextlib.asynccontextmanager
async def running_tcp_server(pki: PKI, **kw):
    from tunnel.transport import tcp

    async with running_server(pki, serve=tcp.serve, **kw) as h:
        yield h


async def tcp_dial(h, identity, **kw):
    from tunnel.transport import tcp

    return await dial(h, identity, connect=tcp.connect, **kw)


async def dial(h, identity, *, connect=connect, **kw):
    """Connect to the harness's server with ``identity`` (None: no client certificate)."""
    host, port = h.server.address[:2]
    kw.setdefault("server_name", SERVER_NAME)
    kw.setdefault("alpn", ALPN)
    kw.setdefault("keepalive", None)
    return await connect(host, port, identity=identity, **kw)


@dataclass(frozen=True)
class Transport:
    """One transport under the contract suite: how to serve and dial it, and the few places
    where the wire differs (documented in ``tunnel/transport/tcp.py``)."""

    name: str

    @property
    def module(self):
        from tunnel.transport import quic, tcp

        return quic if self.name == "quic" else tcp

    def server(self, pki: PKI, **kw):
        return running_server(pki, serve=self.module.serve, **kw)

    async def dial(self, h, identity, **kw):
        return await dial(h, identity, connect=self.module.connect, **kw)

    def silence(self, h, server_conn) -> None:
        """The server stops reading: nothing the client sends is answered."""
        if self.name == "quic":
            h.server._transport.pause_reading()
        else:
            server_conn._protocol.tcp.pause_reading()

    def unsilence(self, h, server_conn) -> None:
        if self.name == "quic":
            h.server._transport.resume_reading()
        else:
            server_conn._protocol.tcp.resume_reading()

    @property
    def send_slack(self) -> int:
        """How far past the high-water mark the sender's buffer may be: TLS/TCP measures the
        connection's TLS buffer, which one frame (64 KiB + TLS overhead) may overshoot."""
        return 0 if self.name == "quic" else 64 * 1024 + 1024


@pytest.fixture(params=["quic", "tcp"])
def transport(request) -> Transport:
    return Transport(request.param)
