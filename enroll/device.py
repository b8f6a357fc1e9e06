"""The device side of enrollment: make keys locally, ask, check the answer, write identity files.

Keys never leave the device: only the CSR and the sshd host *public* key are sent. Before
anything of a bundle is written, its CA must match the pin the manufacturing line was given, the
CA's signature must cover every field (the SSH user CA decides who may log in here, so a swapped
one must not get through), the certificate must chain to that CA and be for this device's key,
and the SSH host certificate must be the fleet host CA's, for this device id and its sshd key.
Sizes are capped before parsing. The online path (``enroll.online``) installs through the same
check.

Files in the device directory::

    device.key                  0600  the device's TLS key (made here, never sent)
    ssh_host_ed25519_key[.pub]  0600  sshd host key, unless --ssh-host-key names an existing one
    request.json                      the enrollment request (CSR + host public key)
    device.crt  ca.crt                the device certificate and the fleet CA
    ssh_host_ed25519_key-cert.pub     host certificate (principal: the device id) for sshd
    user_ca.pub                       the fleet user CA, for sshd's TrustedUserCAKeys
    agent.yaml                        configuration for 'tunnel agent'
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import yaml
from cryptography.hazmat.primitives import serialization

from enroll import certs
from enroll import labels as labels_mod
from enroll.errors import FleetError
from enroll.files import make_private_dir, write_file, write_private
from enroll.request import (
    BUNDLE_FIELDS,
    BUNDLE_VERSION,
    MAX_SIGNATURE_BYTES,
    field_digest,
    make_request,
    signed_message,
)

HOST_KEY = "ssh_host_ed25519_key"


class InstallError(FleetError, ValueError, code="install"):
    """A bundle cannot be installed; the message says why."""


def check_pin(pin: str) -> str:
    pin = (pin or "").strip().lower()
    if not (pin.startswith("sha256:") and len(pin) == 71 and all(c in "0123456789abcdef" for c in pin[7:])):
        raise InstallError(
            "bad --ca-pin: expected sha256:<64 hex digits> as printed by 'enroll init'"
        )
    return pin


def prepare(directory: Path, name: str | None = None, ssh_host_key: Path | None = None) -> dict:
    """Make (or reuse) the device key and sshd host key; return the enrollment request."""
    directory = make_private_dir(directory)
    key_path = directory / "device.key"
    if key_path.exists():
        key = certs.load_key(key_path.read_bytes())
    else:
        key = certs.new_key()
        write_private(key_path, certs.key_pem(key))
    if ssh_host_key is None:
        ssh_host_key = directory / f"{HOST_KEY}.pub"
        if not ssh_host_key.exists():
            host = certs.new_ssh_ca_key()  # an Ed25519 key, like sshd's own
            write_private(directory / HOST_KEY, certs.ssh_private_pem(host))
            write_file(ssh_host_key, certs.ssh_public_line(host) + "\n")
    host_line = Path(ssh_host_key).read_text().strip()
    certs.load_ssh_public(host_line)
    request = make_request(certs.csr_pem(key).encode(), host_line, name)
    write_file(directory / "request.json", json.dumps(request, indent=2) + "\n")
    return request


def _json_size(value) -> int:
    return len(json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass"))


def _check_shape(bundle) -> None:
    """Types and sizes of every field, before anything is parsed or trusted; names the field."""
    if not isinstance(bundle, dict):
        raise InstallError("malformed bundle: expected a JSON object (make it with 'enroll sign')")
    version = bundle.get("version")
    if version == 1:
        raise InstallError(
            "unsigned bundle (version 1): the CA must sign every field; make it again with this "
            "release's 'enroll sign'. Nothing was installed"
        )
    if version != BUNDLE_VERSION:
        raise InstallError(f"unsupported bundle: expected version {BUNDLE_VERSION}")
    for name in bundle:
        if name not in BUNDLE_FIELDS and name != "signature":
            raise InstallError(f"bundle field {name[:40]!r} is not part of the format (and not signed by the CA); "
                               "nothing was installed")
    for name, limit in BUNDLE_FIELDS.items():
        if name not in bundle:
            raise InstallError(f"malformed bundle: field {name!r} is missing; nothing was installed")
        size = _json_size(bundle[name])
        if size > limit:
            raise InstallError(
                f"bundle field {name!r} is {size} bytes, more than the {limit} allowed; nothing was installed"
            )
    for name in ("fleet", "device_id", "cert", "ca", "ssh_host_cert", "ssh_user_ca", "ssh_host_ca"):
        if not isinstance(bundle[name], str):
            raise InstallError(f"malformed bundle: field {name!r} must be a string")
    for name in ("ssh_host_cert", "ssh_user_ca", "ssh_host_ca"):
        if "\n" in bundle[name].strip() or "\r" in bundle[name]:
            raise InstallError(f"malformed bundle: field {name!r} must be a single line")
    proxy = bundle["proxy"]
    if (not isinstance(proxy, dict) or set(proxy) != {"address", "server_name"}
            or not all(isinstance(v, str) for v in proxy.values())):
        raise InstallError("malformed bundle: field 'proxy' must hold exactly 'address' and 'server_name'")
    if not isinstance(bundle["labels"], dict):
        raise InstallError("malformed bundle: field 'labels' must be an object")
    signature = bundle.get("signature")
    if signature is None:
        raise InstallError(
            "the bundle is not signed (its 'signature' is missing or was stripped): only a bundle "
            "signed by the pinned fleet CA is installed; nothing was installed"
        )
    if (not isinstance(signature, dict) or set(signature) != {"digests", "value"}
            or not isinstance(signature["value"], str) or not isinstance(signature["digests"], dict)
            or _json_size(signature) > MAX_SIGNATURE_BYTES):
        raise InstallError("malformed bundle: field 'signature' must hold 'digests' and 'value'")


def _check_signature(bundle: dict, ca) -> None:
    """The CA's signature over the digests, then each field against its digest."""
    signature = bundle["signature"]
    try:
        value = base64.b64decode(signature["value"], validate=True)
    except ValueError:
        raise InstallError("malformed bundle: the signature is not base64; nothing was installed") from None
    digests = signature["digests"]
    if set(digests) != set(BUNDLE_FIELDS) or not certs.verify_blob(ca.public_key(), value, signed_message(digests)):
        raise InstallError(
            "the bundle's signature does not verify against the pinned fleet CA: it was altered "
            "or signed by someone else; nothing was installed"
        )
    for name in BUNDLE_FIELDS:
        if field_digest(bundle[name]) != digests[name]:
            raise InstallError(
                f"bundle field {name!r} differs from what the fleet CA signed: it was altered after "
                "signing; nothing was installed"
            )


def _host_key_line(directory: Path) -> str:
    """This device's sshd host public key, as sent in its request (the host cert must certify it)."""
    try:
        return json.loads((directory / "request.json").read_text())["ssh_host_key"]
    except (OSError, ValueError, KeyError, TypeError):
        raise InstallError(
            f"no enrollment request in {directory}: run 'enroll device --dir {directory} --csr-only' "
            "on this device first (the bundle must answer this device's own request)"
        ) from None


def verify_bundle(directory: Path, bundle: dict, ca_pin: str):
    """Check every field of a bundle before anything is written; return (cert, ca, identity).

    In order: shape and sizes (so nothing huge is parsed), the CA against the pin, the CA's
    signature over all fields, then what the fields say — the certificate chains to the CA and is
    for this device's key, its name, fleet and labels are the bundle's, the SSH host certificate
    is signed by the fleet's host CA for this device id and this device's sshd key, the user CA is
    one SSH key, the proxy address is HOST:PORT.
    """
    directory = Path(directory)
    pin = check_pin(ca_pin)
    _check_shape(bundle)
    try:
        ca = certs.load_cert(bundle["ca"].encode())
    except certs.CertError as exc:
        raise InstallError(f"malformed bundle field 'ca': {exc}") from None
    got = certs.ca_pin(ca)
    if got != pin:
        raise InstallError(
            f"CA pin mismatch: the bundle's CA is {got}, but this line expects {ca_pin}. "
            "It was signed by a different fleet; nothing was installed."
        )
    _check_signature(bundle, ca)
    try:
        cert = certs.load_cert(bundle["cert"].encode())
        certs.verify_issued_by(cert, ca)
        ident = certs.identity_of(cert, bundle["fleet"])
    except certs.CertError as exc:
        raise InstallError(f"bundle field 'cert': {exc}") from None
    if ident.kind != "device":
        raise InstallError(f"the bundle holds a {ident.kind} certificate, not a device certificate")
    if ident.name != bundle["device_id"] or ident.labels != bundle["labels"]:
        raise InstallError("bundle fields 'device_id'/'labels' disagree with its certificate; nothing was installed")
    try:
        labels_mod.validate(bundle["labels"])
    except labels_mod.LabelError as exc:
        raise InstallError(f"bundle field 'labels': {exc}") from None
    key = certs.load_key((directory / "device.key").read_bytes())
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise InstallError("the bundle's certificate is for another device's key; nothing was installed")
    try:
        certs.check_ssh_host_certificate(
            bundle["ssh_host_cert"], bundle["ssh_host_ca"], _host_key_line(directory), ident.name,
            aliases=(f"{ident.name}.fleet",),
        )
    except certs.CertError as exc:
        raise InstallError(f"bundle field 'ssh_host_cert': {exc}; nothing was installed") from None
    try:
        certs.load_ssh_public(bundle["ssh_user_ca"])
        certs.load_ssh_public(bundle["ssh_host_ca"])
    except certs.CertError as exc:
        raise InstallError(f"bundle field 'ssh_user_ca'/'ssh_host_ca': {exc}") from None
    _check_proxy(bundle["proxy"])
    return cert, ca, ident


#: the whole of a host (fullmatch: ``$`` alone would let a trailing newline through)
_HOST_RE = re.compile(r"[A-Za-z0-9.:\[\]-]{1,253}")


def _check_proxy(proxy: dict) -> None:
    host, sep, port = proxy["address"].rpartition(":")
    if not (sep and _HOST_RE.fullmatch(host) and port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise InstallError("bundle field 'proxy': address must be HOST:PORT; nothing was installed")
    if not _HOST_RE.fullmatch(proxy["server_name"]):
        raise InstallError("bundle field 'proxy': server_name must be a DNS name or address")


def install(directory: Path, bundle: dict, ca_pin: str, services: dict[str, str] | None = None,
            proxy: str | None = None) -> dict:
    """Verify the bundle, then write the identity files and agent config. Returns a summary.

    ``proxy`` is the address the device reached the proxy at (online enrollment), which the
    agent then uses too; else the fleet's configured proxy name.
    """
    directory = Path(directory)
    cert, ca, ident = verify_bundle(directory, bundle, ca_pin)
    write_file(directory / "device.crt", certs.cert_pem(cert))
    write_file(directory / "ca.crt", certs.cert_pem(ca))
    write_file(directory / f"{HOST_KEY}-cert.pub", bundle["ssh_host_cert"].strip() + "\n")
    write_file(directory / "user_ca.pub", bundle["ssh_user_ca"].strip() + "\n")
    bundle_proxy, proxy_address = bundle["proxy"], proxy
    config = {
        "device_id": ident.name,
        "fleet": ident.fleet,
        "identity": {"cert": "device.crt", "key": "device.key", "ca": "ca.crt"},
        "proxies": [{"address": proxy_address or bundle_proxy["address"],
                     "server_name": bundle_proxy["server_name"]}],
        "services": services or {"ssh": "127.0.0.1:22"},
        "keepalive": "25s",
    }
    config_path = directory / "agent.yaml"
    if not config_path.exists():  # keep an operator's edits on re-enrollment
        write_file(config_path, "# fleet-tunnel agent configuration\n" + yaml.safe_dump(config, sort_keys=False))
    return {
        "device_id": ident.name,
        "fleet": ident.fleet,
        "labels": ident.labels,
        "not_after": ident.not_after.isoformat(),
        "directory": str(directory),
    }
