"""Online enrollment from the device: token + CSR to the proxy, the bundle back, checked.

``enroll`` is the lower layer and knows no transport: the caller injects ``exchange``, one
request/reply with the proxy on its anonymous channel (the ``tunnel`` package supplies it:
:func:`tunnel.enroll_cli.enroll_exchange`, wired in by the installed ``enroll`` command). The
contract this module relies on: the exchange checks the proxy against ``ca_pin`` (a certificate
in the proxy's chain must match the pin and have signed the proxy's certificate) before it sends
anything — so the token is never sent to anyone but this fleet's proxy — and it raises an
:class:`~enroll.request.EnrollError` saying what went wrong (unreachable, TLS intercepted,
refused). This module builds the request and checks the reply: the bundle that comes back is
installed through the same check as an offline one (:func:`enroll.device.verify_bundle`: the
CA's signature over every field, the SSH host certificate, size caps) before anything is
written: a pinned channel is no reason to trust fields the CA did not sign.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from pathlib import Path
from typing import Protocol

from enroll import device
from enroll.request import EnrollError


class Exchange(Protocol):
    """One anonymous request to the proxy at ``proxy`` (HOST:PORT); returns the reply body."""

    def __call__(self, proxy: str, op: str, args: dict, *, ca_pin: str, server_name: str | None,
                 timeout: float) -> Awaitable[dict]: ...


async def enroll_online(
    directory: Path, proxy: str, token: str, ca_pin: str, *, exchange: Exchange,
    name: str | None = None, server_name: str | None = None, ssh_host_key: Path | None = None,
    services: dict[str, str] | None = None, timeout: float = 15.0,
) -> dict:
    """Enroll this device through the proxy and install the bundle. Returns a summary."""
    pin = device.check_pin(ca_pin)
    request = device.prepare(directory, name, ssh_host_key)
    bundle = await exchange(proxy, "enroll", {"request": json.dumps(request), "token": token},
                            ca_pin=pin, server_name=server_name, timeout=timeout)
    if not isinstance(bundle, dict):
        raise EnrollError(f"the proxy at {proxy} answered the enrollment with no bundle")
    return device.install(directory, bundle, pin, services, proxy=proxy)


def run(directory: Path, proxy: str, token: str, ca_pin: str, *, exchange: Exchange, **kw) -> dict:
    return asyncio.run(enroll_online(directory, proxy, token, ca_pin, exchange=exchange, **kw))
