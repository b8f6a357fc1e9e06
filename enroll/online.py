"""Online enrollment from the device: token + CSR over the proxy's QUIC port.

The device knows only the CA pin. The proxy sends the fleet CA in its TLS chain; the transport
accepts the connection only if a certificate there matches the pin and signed the proxy's
certificate — so the token is never sent to anyone but this fleet's proxy (a TLS-intercepting
middlebox is named in the error instead).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from enroll import device
from enroll.request import EnrollError
from tunnel import wire
from tunnel.agent_config import split_host_port
from tunnel.protocol import ALPN_ENROLL, read_header
from tunnel.transport import TransportError, connect


async def enroll_online(
    directory: Path, proxy: str, token: str, ca_pin: str, *, name: str | None = None,
    server_name: str | None = None, ssh_host_key: Path | None = None,
    services: dict[str, str] | None = None, timeout: float = 15.0,
) -> dict:
    """Enroll this device through the proxy and install the bundle. Returns a summary."""
    pin = device.check_pin(ca_pin)
    host, port = split_host_port(proxy, "--proxy")
    request = device.prepare(directory, name, ssh_host_key)
    try:
        conn = await connect(host, port, identity=None, ca_pin=pin, server_name=server_name or host,
                             alpn=ALPN_ENROLL, keepalive=None, handshake_timeout=timeout)
    except TransportError as exc:
        raise EnrollError(f"cannot reach the proxy at {proxy} safely: {exc.reason or exc}") from None
    except OSError as exc:
        raise EnrollError(f"cannot reach the proxy at {proxy}: {exc.strerror or exc}") from None
    try:
        stream = await conn.open_stream()
        await stream.write(wire.encode("request", op="enroll",
                                       args={"request": json.dumps(request), "token": token}))
        stream.write_eof()
        reply, _ = await read_header(stream, timeout)
    except (TransportError, wire.HeaderError, TimeoutError) as exc:
        raise EnrollError(f"enrollment over {proxy} failed: {exc or 'timeout'}") from None
    finally:
        conn.close(0, "done")
    if not reply["ok"]:
        raise EnrollError(reply.get("reason", "refused by the proxy"))
    return device.install(directory, reply["body"], pin, services)


def run(directory: Path, proxy: str, token: str, ca_pin: str, **kw) -> dict:
    return asyncio.run(enroll_online(directory, proxy, token, ca_pin, **kw))
