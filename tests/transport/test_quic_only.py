"""What only QUIC does: connection migration (mid-transfer, idle, back, IPv6), with the
server following by connection ID. The rest of the stream contract is in
``test_contract_streams.py``, run on both transports."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from transport_helpers import ALPN, SERVER_NAME, read_all, run, running_server

from tunnel.transport import PathChange, connect


async def _connect(h, pki, **kw):
    host, port = h.server.address[:2]
    kw.setdefault("keepalive", None)
    return await connect(
        host, port, identity=pki.device, server_name=SERVER_NAME, alpn=ALPN, **kw
    )


def test_migration_mid_transfer_byte_exact(pki):
    size = 3 * 1024 * 1024

    async def main():
        changes: list[PathChange] = []

        async def on_connection(conn):
            conn.on_path_change = changes.append
            stream = await conn.accept_stream()
            while True:  # echo
                chunk = await stream.read()
                if not chunk:
                    break
                await stream.write(chunk)
            stream.write_eof()
            await conn.wait_closed()

        async with running_server(pki, on_connection=on_connection) as h:
            client = await _connect(h, pki, local_addr=("127.0.0.1", 0))
            assert client.local_address[0] == "127.0.0.1"
            s = await client.open_stream()
            payload = os.urandom(size)
            received = bytearray()
            marks: dict[str, float] = {}

            async def reader():
                while True:
                    chunk = await s.read()
                    if not chunk:
                        return
                    if "migrated" in marks and "resumed" not in marks:
                        marks["resumed"] = time.monotonic()
                    received.extend(chunk)

            rtask = asyncio.ensure_future(reader())
            for i in range(0, size, 64 * 1024):
                await s.write(payload[i : i + 64 * 1024])
                if i == size // 3:
                    await client.migrate(("127.0.0.2", 0))
                    marks["migrated"] = time.monotonic()
            s.write_eof()
            await rtask
            assert bytes(received) == payload
            assert client.local_address[0] == "127.0.0.2"
            assert [c.new[0] for c in client.path_changes] == ["127.0.0.2"]
            assert changes and changes[-1].new[0] == "127.0.0.2"
            assert changes[-1].old[0] == "127.0.0.1"
            [conn] = h.server.connections
            assert conn.remote_address == client.local_address
            assert conn._quic.fleet_peer_moves >= 1  # in-flight declared lost on the move
            assert conn._quic.fleet_initial_rtt() == 0.333
            print(f"\nmigration: data resumed {1000 * (marks['resumed'] - marks['migrated']):.1f}"
                  " ms after migrate()")
            client.close()

    run(main())


def test_migration_on_idle_stream_then_continues(pki):
    async def main():
        async def on_connection(conn):
            stream = await conn.accept_stream()
            while chunk := await stream.read():
                await stream.write(chunk.upper())
            stream.write_eof()
            await conn.wait_closed()

        async with running_server(pki, on_connection=on_connection) as h:
            client = await _connect(h, pki, local_addr=("127.0.0.1", 0))
            s = await client.open_stream()
            await s.write(b"before")
            assert await s.read() == b"BEFORE"
            await asyncio.sleep(0.2)  # idle
            spare = client._quic.fleet_spare_peer_cids()
            old_cid = client._quic.fleet_peer_cid()
            await client.migrate(("127.0.0.2", 0))
            assert client._quic.fleet_peer_cid() != old_cid and spare > 0
            t0 = time.monotonic()
            await s.write(b"after")
            assert await s.read() == b"AFTER"
            print(f"\nidle migration: first echo {1000 * (time.monotonic() - t0):.1f} ms")
            await client.migrate(("127.0.0.1", 0))  # and back
            await s.write(b"again")
            assert await s.read() == b"AGAIN"
            client.close()

    run(main())


def test_ipv6_migration_keeps_the_family(pki):
    async def main():
        async with running_server(pki, host="::1") as h:
            client = await _connect(h, pki, local_addr=("::1", 0))
            server_conn = await h.connections.get()
            assert server_conn.remote_address[0] == "::1"
            s = await client.open_stream()
            await s.write(b"v6")
            s.write_eof()
            peer = await server_conn.accept_stream()
            assert await read_all(peer) == b"v6"
            with pytest.raises(ValueError):
                await client.migrate(("127.0.0.2", 0))  # family must stay IPv6
            await client.migrate(("::1", 0))
            await peer.write(b"still here")
            assert await s.read() == b"still here"
            client.close()

    run(main())


def test_pinned_ca_mismatch_is_kind_intercepted(pki):
    # enrollment over QUIC knows only the CA pin: a server whose chain has no CA matching it is
    # told as an interception, by kind (the wording is for people, the kind for code)
    from transport_helpers import ENROLL_ALPN

    from tunnel.transport import TransportError
    from tunnel.transport.policy import spki_pin

    async def main():
        async with running_server(pki, identity=pki.foreign_server) as h:
            host, port = h.server.address[:2]
            with pytest.raises(TransportError) as info:
                await connect(host, port, identity=None, ca_pin=spki_pin(pki.ca),
                              server_name=SERVER_NAME, alpn=ENROLL_ALPN, keepalive=None)
            err = info.value
            assert err.code == "intercepted" and not err.remote, err
            assert "intercepting TLS" in err.reason
            assert h.authorized == []

    run(main())
