"""The aioquic internals the QUIC transport relies on are checked at import, in one module."""

from __future__ import annotations

import aioquic
import pytest
from aioquic import tls
from aioquic.quic.connection import QuicConnection

from tunnel.transport import aioquic_compat as compat
from tunnel.transport import quic


def test_installed_aioquic_passes_the_check():
    compat.check_internals()
    assert aioquic.__version__ == compat.AIOQUIC_VERSION == quic.AIOQUIC_VERSION == "1.7.2"


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
        compat.check_internals()


def test_other_version_is_refused(monkeypatch):
    monkeypatch.setattr(aioquic, "__version__", "1.8.0")
    with pytest.raises(ImportError, match="1.8.0 installed, 1.7.2 required"):
        compat.check_internals()


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
            assert type(conn._quic) is compat.FleetQuicConnection
            assert type(conn._quic.tls) is compat.FleetTLSContext
            assert conn._quic.tls._request_client_certificate is True
            assert type(client._quic.tls) is compat.FleetTLSContext
            client.close()

    run(main())


def test_no_other_module_touches_aioquic_privates():
    # every private hook is in aioquic_compat; the adapter and the rest use aioquic's public API
    import re
    from pathlib import Path

    root = Path(compat.__file__).resolve().parents[1]
    private = re.compile(r"_quic\._|\.tls\._|\._network_paths|\._close_event|\._loss\b|"
                         r"\._handshake_(complete|confirmed)\b|__class__ = ")
    offenders = [
        f"{path.relative_to(root)}:{n}"
        for path in root.rglob("*.py") if path.name != "aioquic_compat.py"
        for n, line in enumerate(path.read_text().splitlines(), 1) if private.search(line)
    ]
    assert offenders == []
