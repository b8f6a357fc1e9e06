"""Online enrollment from the device: token + CSR over the proxy's QUIC port.

The device knows only the CA pin. The proxy sends the fleet CA in its TLS chain; the transport
accepts the connection only if a certificate there matches the pin and signed the proxy's
certificate — so the token is never sent to anyone but this fleet's proxy (a TLS-intercepting
middlebox is named in the error instead). The bundle that comes back is installed through the
same check as an offline one (:func:`enroll.device.verify_bundle`: the CA's signature over every
field, the SSH host certificate, size caps) before anything is written: a pinned channel is no
reason to trust fields the CA did not sign.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from enroll import device
from enroll.request import EnrollError
from tunnel.client import ClientError, anonymous_request


async def enroll_online(
    directory: Path, proxy: str, token: str, ca_pin: str, *, name: str | None = None,
    server_name: str | None = None, ssh_host_key: Path | None = None,
    services: dict[str, str] | None = None, timeout: float = 15.0,
) -> dict:
    """Enroll this device through the proxy and install the bundle. Returns a summary."""
    pin = device.check_pin(ca_pin)
    request = device.prepare(directory, name, ssh_host_key)
    try:
        bundle = await anonymous_request(proxy, "enroll", {"request": json.dumps(request), "token": token},
                                         ca_pin=pin, server_name=server_name, timeout=timeout)
    except ClientError as exc:
        raise EnrollError(str(exc)) from None
    return device.install(directory, bundle, pin, services, proxy=proxy)


def run(directory: Path, proxy: str, token: str, ca_pin: str, **kw) -> dict:
    return asyncio.run(enroll_online(directory, proxy, token, ca_pin, **kw))
