"""TLS 1.3 for the TLS/TCP transport: contexts, and the record layer over a TCP socket.

``TLSProtocol`` runs OpenSSL through ``ssl.MemoryBIO`` on a plain asyncio TCP transport (not
asyncio's sslproto), so a failed handshake still sends its alert and the owner learns every
alert with its reason. It hands decrypted bytes to its owner (``_on_data``/``_on_lost``) and
acts as the owner's transport. No h2 here: what runs inside is ``tcp.py``'s business.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import ssl
import tempfile
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    PrivateFormat,
)

from .base import TLSIdentity, TransportError
from .h2wire import crypto
from .policy import describe_close, tls_alert_from_ssl_reason

# ------------------------------------------------------------------------------------ TLS


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.PEM)


def load_identity(ctx: ssl.SSLContext, identity: TLSIdentity) -> None:
    """``load_cert_chain`` needs files: write them to a private temp dir, key encrypted."""
    password = secrets.token_urlsafe(32).encode()
    key_pem = identity.key.private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(password)
    )
    with tempfile.TemporaryDirectory(prefix="fleet-tls-") as tmp:
        cert_path = os.path.join(tmp, "chain.pem")
        key_path = os.path.join(tmp, "key.pem")
        for path, data in ((cert_path, b"".join(pem(c) for c in identity.cert_chain)),
                           (key_path, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        ctx.load_cert_chain(cert_path, key_path, password=password)


def server_context(identity: TLSIdentity, alpns: list[str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_OPTIONAL  # anonymous ALPNs; required-ness is checked per ALPN
    ctx.load_verify_locations(cadata=pem(identity.ca).decode())
    load_identity(ctx, identity)
    ctx.set_alpn_protocols(list(alpns))
    ctx.num_tickets = 0  # no resumption: every connection proves its certificate
    return ctx


def client_context(
    identity: TLSIdentity | None, alpn: str, trust: x509.Certificate | None
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if trust is not None:
        ctx.load_verify_locations(cadata=pem(trust).decode())  # check_hostname stays on
    else:  # ca_pin: the CA comes in the hello and is checked against the pin before any data
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if identity is not None:
        load_identity(ctx, identity)
    ctx.set_alpn_protocols([alpn])
    return ctx


class HasExtraInfo(Protocol):
    """An asyncio transport, or :class:`TLSProtocol` standing in for one."""

    def get_extra_info(self, name: str, default: Any = None) -> Any: ...


def peer_leaf(transport: HasExtraInfo) -> x509.Certificate | None:
    sslobj = transport.get_extra_info("ssl_object")
    der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
    return x509.load_der_x509_certificate(der) if der else None


def ssl_error(exc: BaseException, *, host: str) -> TransportError:
    """A TLS alert from the peer (or a TLS failure here) as a QUIC-like transport error."""
    reason = getattr(exc, "reason", None)
    alert = tls_alert_from_ssl_reason(reason)
    if alert is not None:
        code = crypto(alert)
        what = f"{host} refused our TLS handshake"
        if alert in (43, 45, 46, 48, 42, 116):
            what = f"{host} rejected our client certificate"
        return TransportError(
            code,
            describe_close(code, f"{what} ({reason})", application=False),
            application=False,
            remote=True,
        )
    return TransportError(0, f"TLS failure with {host}: {exc}", application=False, remote=False,
                          kind="tls")


async def probe_leaf(
    host: str, port: int, server_name: str, alpn: str, local_addr: Any, timeout: float
) -> x509.Certificate | None:
    """The certificate a server presents, fetched without verifying it and without sending
    ours -- only to word the error when verification failed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols([alpn])
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            transport, _ = await loop.create_connection(
                asyncio.Protocol, host, port, ssl=ctx, server_hostname=server_name,
                local_addr=local_addr, ssl_handshake_timeout=timeout,
            )
    except (OSError, TimeoutError):
        return None
    try:
        return peer_leaf(transport)
    finally:
        transport.abort()


# -------------------------------------------------------------------------- record layer


class TLSProtocol(asyncio.Protocol):
    """TLS over a plain TCP transport through ``ssl.MemoryBIO`` (not asyncio's sslproto).

    Doing TLS ourselves means a handshake failure still *sends* its alert (asyncio drops it),
    so a client whose certificate OpenSSL rejected learns why; a rejected handshake is logged
    by the server; and a TLS alert after the handshake (TLS 1.3 clients finish before the server
    judged their certificate) is reported to the owner with its reason.

    It also acts as the owner's transport (write/close/abort/get_extra_info/buffer limits).
    ``on_ready(protocol, exc)`` is called once, when the handshake succeeded (exc None) or
    failed. Decrypted bytes and the loss are buffered until ``attach(owner)``.
    """

    def __init__(
        self,
        ctx: ssl.SSLContext,
        *,
        server_side: bool,
        on_ready: Any,
        handshake_timeout: float,
        server_hostname: str | None = None,
    ) -> None:
        self._ctx = ctx
        self._server_side = server_side
        self._server_hostname = server_hostname
        self._on_ready = on_ready
        self._handshake_timeout = handshake_timeout
        self.owner: Any = None
        self.tcp: asyncio.Transport | None = None
        self.sslobj: ssl.SSLObject | None = None
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._state = "handshake"  # -> "open" -> "closed"
        self._timer: asyncio.TimerHandle | None = None
        self._early: list[bytes] = []
        self._lost: tuple[Exception | None] | None = None
        self.paused = False

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # typeshed's Protocol says BaseTransport; a TCP connection is always given a Transport
        self.tcp = transport  # type: ignore[assignment]
        self.sslobj = self._ctx.wrap_bio(
            self._in, self._out, server_side=self._server_side,
            server_hostname=self._server_hostname,
        )
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._handshake_timeout, self._on_handshake_timeout)
        self._handshake()

    def data_received(self, data: bytes) -> None:
        if self._state == "closed":
            return  # nothing more is read from a closed connection: do not buffer it either
        self._in.write(data)
        if self._state == "handshake":
            self._handshake()
        elif self._state == "open":
            self._read()

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self._state == "handshake":
            self._ready(exc or ConnectionResetError("connection closed during the TLS handshake"))
        self._state = "closed"
        self._lost_with(exc)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.owner is not None:
            self.owner._wake_writers()

    # -- TLS

    def _flush_tls(self) -> None:
        data = self._out.read()
        if data and self.tcp is not None and not self.tcp.is_closing():
            self.tcp.write(data)

    def _handshake(self) -> None:
        assert self.sslobj is not None and self.tcp is not None
        try:
            self.sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush_tls()
            return
        except (ssl.SSLError, ValueError) as exc:  # ValueError: bad server_hostname
            self._flush_tls()  # the alert telling the peer why
            self._state = "closed"
            self.tcp.close()
            self._ready(exc)
            return
        self._flush_tls()
        self._state = "open"
        self._ready(None)
        if self._state == "open" and self._in.pending:
            self._read()

    def _on_handshake_timeout(self) -> None:
        if self._state == "handshake" and self.tcp is not None:
            self._state = "closed"
            self.tcp.abort()
            self._ready(TimeoutError("TLS handshake timed out"))

    def _ready(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        cb, self._on_ready = self._on_ready, None
        if cb is not None:
            cb(self, exc)

    def _read(self) -> None:
        assert self.sslobj is not None and self.tcp is not None
        chunks: list[bytes] = []
        end: tuple[Exception | None] | None = None
        while True:
            try:
                chunk = self.sslobj.read(1 << 18)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # close_notify
                end = (None,)
                break
            except ssl.SSLError as exc:  # an alert, or garbage
                end = (exc,)
                break
            if not chunk:
                end = (None,)
                break
            chunks.append(chunk)
        self._flush_tls()  # post-handshake messages (key update) may need an answer
        if chunks:
            data = b"".join(chunks) if len(chunks) > 1 else chunks[0]
            if self.owner is None:
                self._early.append(data)
            else:
                self.owner._on_data(data)
        if end is not None:
            self._state = "closed"
            self.tcp.close()
            self._lost_with(end[0])

    def _lost_with(self, exc: Exception | None) -> None:
        if self.owner is None:
            if self._lost is None:
                self._lost = (exc,)
        else:
            self.owner._on_lost(exc)

    def attach(self, owner: Any) -> None:
        self.owner = owner
        for data in self._early:
            owner._on_data(data)
        self._early.clear()
        if self._lost is not None:
            owner._on_lost(self._lost[0])

    # -- transport surface for the owner

    def write(self, data: bytes) -> None:
        if self._state != "open" or self.sslobj is None:
            return
        self.sslobj.write(data)
        self._flush_tls()

    def close(self) -> None:
        if self.tcp is None or self.tcp.is_closing():
            return
        if self._state == "open" and self.sslobj is not None:
            with contextlib.suppress(ssl.SSLError):
                self.sslobj.unwrap()  # queues close_notify; WantRead: we do not wait for theirs
            self._flush_tls()
        self._state = "closed"
        if self.tcp.can_write_eof():
            # Half-close: a peer that is writing right now still reads our last frames (the
            # GOAWAY with a refusal's reason); a full close would answer its data with a reset
            # that destroys them. The owner aborts the socket after CLOSE_GRACE.
            self.tcp.write_eof()
        else:
            self.tcp.close()

    def abort(self) -> None:
        self._state = "closed"
        if self.tcp is not None:
            self.tcp.abort()

    def stop_reading(self) -> None:
        """Read nothing more from the peer (an abusive one): the kernel's buffers push back."""
        if self.tcp is not None and not self.tcp.is_closing():
            with contextlib.suppress(RuntimeError):
                self.tcp.pause_reading()

    def is_closing(self) -> bool:
        return self.tcp is None or self.tcp.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self.sslobj
        return self.tcp.get_extra_info(name, default) if self.tcp is not None else default

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        assert self.tcp is not None
        self.tcp.set_write_buffer_limits(high=high, low=low)

    def get_write_buffer_size(self) -> int:
        return self.tcp.get_write_buffer_size() if self.tcp is not None else 0
