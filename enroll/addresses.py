"""``HOST:PORT`` and port numbers as they come in from flags, config files and ssh: pure core.

The agent's config, the proxy's ``--listen``, the engineer's ``--proxy``/``--local`` and the
proxy's resolution of a port to a service all parse addresses the same way, so the rule lives
here, below every layer that reads one (no I/O, no project imports but the error root).
"""

from __future__ import annotations

import re

from enroll.errors import FleetError

_PORT = re.compile(r"[0-9]{1,5}")


class AddressError(FleetError, ValueError):
    """Not a HOST:PORT; the message names the setting and shows what came in."""

    code = "bad_address"


def ascii_port(text: str) -> int | None:
    """``text`` as a port number if it is 1–5 ASCII digits within 1..65535, else None.

    ``str.isdigit`` (and ``int``) also accept Unicode digits such as fullwidth ``４３``; a port
    is only ever spelled in ASCII here.
    """
    if not (isinstance(text, str) and _PORT.fullmatch(text)):
        return None
    port = int(text)
    return port if 1 <= port < 65536 else None


def split_host_port(text: str, what: str, allow_zero: bool = False) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` → (host, port); ``what`` names the setting in the error.

    Port 0 ("any free port") only where ``allow_zero`` says a listener may pick one.
    """
    host, sep, port = str(text).rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not _PORT.fullmatch(port) \
            or not (0 if allow_zero else 1) <= int(port) < 65536:
        raise AddressError(f"{what}: expected HOST:PORT, got {text!r}")
    return host, int(port)
