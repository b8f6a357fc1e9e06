"""The enrollment request and bundle formats, shared by the device and the CA (no registry here).

A request carries the device's CSR and its sshd host *public* key, and optionally the device
name it asks for; the bundle that comes back carries the certificates. Both are versioned JSON,
size-limited before parsing.
"""

from __future__ import annotations

import json

REQUEST_VERSION = 1
BUNDLE_VERSION = 1
MAX_REQUEST_BYTES = 16 * 1024


class EnrollError(ValueError):
    """Enrollment refused; the message says why and what to do."""


def make_request(csr_pem: bytes, ssh_host_key: str, name: str | None = None) -> dict:
    return {
        "version": REQUEST_VERSION,
        "csr": csr_pem.decode(),
        "ssh_host_key": ssh_host_key.strip(),
        "name": name,
    }


def parse_request(data: bytes | str) -> dict:
    """Decode and shape-check a request file or message (size-limited, versioned)."""
    if len(data) > MAX_REQUEST_BYTES:
        raise EnrollError(f"enrollment request is larger than {MAX_REQUEST_BYTES} bytes")
    try:
        req = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise EnrollError("malformed enrollment request: not JSON (make it with 'enroll device --csr-only')") from None
    if not isinstance(req, dict) or req.get("version") != REQUEST_VERSION:
        raise EnrollError(f"unsupported enrollment request version: expected {REQUEST_VERSION}")
    for field in ("csr", "ssh_host_key"):
        if not isinstance(req.get(field), str):
            raise EnrollError(f"malformed enrollment request: missing {field!r}")
    if req.get("name") is not None and not isinstance(req["name"], str):
        raise EnrollError("malformed enrollment request: 'name' must be a string")
    return req
