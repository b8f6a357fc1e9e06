"""What proxy, agent and engineer client agree on: ALPNs, close codes, reading a header.

Kept free of the registry and SQLite so the agent on a device imports only what it needs.
"""

from __future__ import annotations

import asyncio
import json

from tunnel import wire
from tunnel.transport import Stream

ALPN_AGENT = "fleet-agent/1"
ALPN_USER = "fleet-user/1"
ALPN_ENROLL = "fleet-enroll/1"
HEADER_TIMEOUT = 10.0
MAX_BODY = 64 * 1024 * 1024  # a device listing of a large fleet, an enrollment bundle

# Application close codes the proxy sends with a refusal. Stable: agents and clients map them
# back to names for their error messages.
CLOSE_CODES = {
    "ok": 0x0,
    "not_fleet_certificate": 0x10,
    "unknown_identity": 0x11,
    "revoked": 0x12,
    "decommissioned": 0x13,
    "locked": 0x14,
    "wrong_kind": 0x15,
    "replaced": 0x16,
    "shutdown": 0x17,
    "renewed": 0x18,
    "expired": 0x19,
    "unresponsive": 0x1A,  # the device stopped answering the proxy's probes
}
CLOSE_NAMES = {v: k for k, v in CLOSE_CODES.items()}


async def read_header(stream: Stream, timeout: float = HEADER_TIMEOUT) -> tuple[wire.Message, bytes]:
    """Read one stream header; raises wire.HeaderError (or TimeoutError)."""
    reader = wire.HeaderReader()
    async with asyncio.timeout(timeout):
        while True:
            data = await stream.read(wire.MAX_PAYLOAD + 4)
            if not data:
                reader.eof()
            if got := reader.feed(data):
                return got


def reply_with_body(body: dict) -> bytes:
    """An ok reply whose JSON body follows the header (headers stay small; bodies may not)."""
    data = json.dumps(body, separators=(",", ":")).encode()
    return wire.reply_ok(body_length=len(data)) + data


async def read_reply(stream: Stream, timeout: float = HEADER_TIMEOUT) -> tuple[wire.Message, dict]:
    """Read a reply header and the body that follows it, if any."""
    reply, rest = await read_header(stream, timeout)
    length = reply.get("body_length", 0)
    if not 0 <= length <= MAX_BODY:
        raise wire.HeaderError("body_too_large", f"reply body of {length} bytes exceeds {MAX_BODY}")
    data = bytearray(rest)
    async with asyncio.timeout(timeout):
        while len(data) < length:
            chunk = await stream.read(min(1 << 20, length - len(data)))
            if not chunk:
                raise wire.HeaderError("truncated_body", "the stream ended inside the reply body")
            data += chunk
    try:
        body = json.loads(data[:length]) if length else {}
    except ValueError:
        raise wire.HeaderError("bad_body", "the reply body is not JSON") from None
    return reply, body
