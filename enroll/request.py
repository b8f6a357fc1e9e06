"""The enrollment request and bundle formats, shared by the device and the CA (no registry here).

A request carries the device's CSR and its sshd host *public* key, and optionally the device
name it asks for; the bundle that comes back carries the certificates. Both are versioned JSON,
size-limited before parsing.

The bundle crosses the air gap on a USB stick or a line controller, and every field of it ends up
trusted by the device (the SSH user CA decides who may log in to its sshd), so the fleet CA signs
all of it: ``signature.digests`` holds a SHA-256 of each field's canonical JSON, and
``signature.value`` is the CA's signature over those digests (with a context prefix). The device
checks that signature against its pinned CA before it trusts or writes anything; the per-field
digests let the refusal name the field that was changed.
"""

from __future__ import annotations

import base64
import hashlib
import json

from enroll import certs
from enroll.errors import FleetError

REQUEST_VERSION = 1
BUNDLE_VERSION = 2  # 2: signed by the fleet CA, every field (1 was unsigned)
MAX_REQUEST_BYTES = 16 * 1024
MAX_BUNDLE_BYTES = 64 * 1024  # a real bundle is about 5 KiB

#: Every field of a bundle but ``signature``, with the most bytes (of its canonical JSON) each may
#: take. A field not listed here is refused: nothing unsigned reaches the device.
BUNDLE_FIELDS = {
    "version": 8,
    "fleet": 80,
    "device_id": 80,
    "labels": 16 * 1024,
    "cert": 8 * 1024,
    "ca": 8 * 1024,
    "ssh_host_cert": 4 * 1024,
    "ssh_user_ca": 1024,
    "ssh_host_ca": 1024,
    "proxy": 1024,
}
MAX_SIGNATURE_BYTES = 8 * 1024  # the digests (10 x 64 hex) and a base64 ECDSA/Ed25519 signature
_BUNDLE_CONTEXT = b"fleet-tunnel enrollment bundle v2\n"


class EnrollError(FleetError, ValueError, code="enrollment"):
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


# --- the signed bundle ------------------------------------------------------------------------


def _canonical(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def field_digest(value) -> str:
    """SHA-256 (hex) of one bundle field's canonical JSON."""
    return hashlib.sha256(_canonical(value)).hexdigest()


def signed_message(digests: dict) -> bytes:
    """The exact bytes the CA signs: a context prefix and the canonical per-field digests."""
    return _BUNDLE_CONTEXT + _canonical({"digests": digests, "version": BUNDLE_VERSION})


def sign_bundle(bundle: dict, ca_key) -> dict:
    """Return ``bundle`` with a ``signature`` by the fleet CA key over every field."""
    missing = set(BUNDLE_FIELDS) - set(bundle)
    extra = set(bundle) - set(BUNDLE_FIELDS)
    if missing or extra:  # a programming error on the CA side, never input
        raise ValueError(f"bundle fields do not match the format: missing {missing}, extra {extra}")
    digests = {name: field_digest(bundle[name]) for name in BUNDLE_FIELDS}
    value = certs.sign_blob(ca_key, signed_message(digests))
    return {**bundle, "signature": {"digests": digests, "value": base64.b64encode(value).decode()}}


def load_bundle(data: bytes | str) -> dict:
    """Decode a bundle file, refusing one larger than :data:`MAX_BUNDLE_BYTES` before parsing."""
    if len(data) > MAX_BUNDLE_BYTES:
        raise EnrollError(
            f"the bundle is larger than {MAX_BUNDLE_BYTES} bytes (a real one is about 5 KiB): "
            "it is not from 'enroll sign'; nothing was installed"
        )
    try:
        bundle = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise EnrollError("malformed bundle: not JSON (make it with 'enroll sign'); nothing was installed") from None
    if not isinstance(bundle, dict):
        raise EnrollError("malformed bundle: expected a JSON object (make it with 'enroll sign')")
    return bundle


def read_bundle_file(path) -> dict:
    """Read at most :data:`MAX_BUNDLE_BYTES` + 1 bytes of ``path``, then :func:`load_bundle`."""
    with open(path, "rb") as f:
        return load_bundle(f.read(MAX_BUNDLE_BYTES + 1))
