"""The aioquic internals the QUIC transport patches are checked at import."""

from __future__ import annotations

import aioquic
import pytest
from aioquic import tls
from aioquic.quic.connection import QuicConnection

from tunnel.transport import quic


def test_installed_aioquic_passes_the_check():
    quic._check_aioquic_internals()
    assert aioquic.__version__ == quic.AIOQUIC_VERSION == "1.7.2"


@pytest.mark.parametrize(
    ("target", "name"),
    [
        (tls.Context, "_server_handle_certificate_verify"),
        (tls.Context, "_client_handle_certificate_verify"),
        (QuicConnection, "_write_stream_limits"),
        (QuicConnection, "_initialize"),
    ],
)
def test_missing_internal_is_a_clear_import_error(monkeypatch, target, name):
    monkeypatch.delattr(target, name)
    with pytest.raises(ImportError, match=name):
        quic._check_aioquic_internals()


def test_other_version_is_refused(monkeypatch):
    monkeypatch.setattr(aioquic, "__version__", "1.8.0")
    with pytest.raises(ImportError, match="1.8.0 installed, 1.7.2 required"):
        quic._check_aioquic_internals()


def test_request_flag_still_exists():
    # the one private flag we set: aioquic sends a CertificateRequest when it is true
    assert tls.Context(is_client=False)._request_client_certificate is False


def test_server_connections_get_the_fleet_tls_context(pki):
    from transport_helpers import ALPN, SERVER_NAME, run, running_server

    from tunnel.transport import connect

    async def main():
        async with running_server(pki) as h:
            host, port = h.server.address[:2]
            client = await connect(
                host, port, identity=pki.device, server_name=SERVER_NAME, alpn=ALPN,
                keepalive=None,
            )
            conn = await h.connections.get()
            assert type(conn._quic) is quic._FleetQuicConnection
            assert type(conn._quic.tls) is quic._FleetTLSContext
            assert conn._quic.tls._request_client_certificate is True
            assert type(client._quic.tls) is quic._FleetTLSContext
            client.close()

    run(main())
