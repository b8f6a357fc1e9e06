"""The ``enroll`` command as installed: enroll's CLI with the tunnel's transport plugged in.

``enroll`` is the lower layer and never imports ``tunnel``; only ``enroll device --proxy``
(online enrollment, on the device) needs to reach the proxy. This top-layer launcher is the
console script's entry point: it hands :func:`enroll.cli.main` the :func:`enroll_exchange` below,
which dials the proxy's anonymous channel with the same transports (QUIC, TLS over TCP) and the
same pinning as ``tunnel login``. The transport loads only when a device enrolls online; every
other ``enroll`` command starts as fast as before.
"""

from __future__ import annotations

import sys

from enroll import cli
from enroll.request import EnrollError


async def enroll_exchange(proxy: str, op: str, args: dict, *, ca_pin: str, server_name: str | None,
                   timeout: float) -> dict:
    """One anonymous request to the proxy, pinned to ``ca_pin`` before anything is sent.

    A failure becomes an :class:`EnrollError` (what enroll's CLI reports) with the client's
    message and its ``code`` (``unreachable``, ``refused``, the proxy's refusal code…).
    """
    from tunnel.client import ClientError, anonymous_request

    try:
        return await anonymous_request(proxy, op, args, ca_pin=ca_pin, server_name=server_name,
                                       timeout=timeout)
    except ClientError as exc:
        failure = EnrollError(str(exc))
        failure.code = exc.code
        raise failure from None


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, exchange=enroll_exchange)


if __name__ == "__main__":
    sys.exit(main())
